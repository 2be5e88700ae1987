"""The dirty-region log's extents wait for the source (replication/dirtylog.c, "Why an extent
also waits for the source"), with a real `nbdrep serve`: a host that never sends FLUSH still
sees its extents cleared, because the session's source sync makes its writes durable."""
import os

import nbd

from conftest import Server, make_image, uri, wait_until
from replication import dirtylog

MiB = 1 << 20


def test_a_server_clears_extents_once_its_source_sync_made_their_writes_durable(procs, nbdkit,
                                                                               tmp_path):
    """RPs on request only, so the first source sync (due once the first sync's extents cooled
    down, HOT_CYCLES commits on) comes after the host's write."""
    src = make_image(os.path.join(tmp_path, "source.img"), 16 * MiB, random_mib=1)
    rsock, _ = nbdkit("file", make_image(os.path.join(tmp_path, "replica.img"), 16 * MiB))
    server = Server(procs, str(tmp_path), [src], [uri(rsock)], extra=["--cycle", "3600"])
    server.rp()

    def log():
        return server.status()["dirty_log"]
    assert log()["durable_cycle"] < server.status()["cycle"] - 1, "no source sync yet"
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"x" * 4096, 5 * MiB)   # no FLUSH, before or after
    h.shutdown()
    written_in = server.rp()
    for _ in range(dirtylog.HOT_CYCLES):
        assert log()["extents_marked"] > 0, "the first sync's extents stay until a source sync"
        server.rp()
    # The commit that found them cooled started the source sync; one after it ended clears.
    wait_until(lambda: server.rp() and log()["extents_marked"] == 0, poll=0.2,
               what="the extents cleared after a source sync")
    assert log()["durable_cycle"] >= written_in
