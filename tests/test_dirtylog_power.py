"""The dirty-region log's extents wait for the source (replication/dirtylog.c, "Why an extent
also waits for the source"), with a real `nbdrep serve`: a host that never sends FLUSH still
sees its extents cleared, because the session's source sync makes its writes durable."""
import os

import nbd

from conftest import Server, make_image, uri, wait_until

MiB = 1 << 20


def test_a_server_clears_extents_once_its_source_sync_made_their_writes_durable(procs, nbdkit,
                                                                               tmp_path):
    src = make_image(os.path.join(tmp_path, "source.img"), 16 * MiB, random_mib=1)
    rsock, _ = nbdkit("file", make_image(os.path.join(tmp_path, "replica.img"), 16 * MiB))
    server = Server(procs, str(tmp_path), [src], [uri(rsock)], extra=["--cycle", "0.1"])
    server.rp()

    def log():
        return server.status()["dirty_log"]
    # The first sync's marks (the whole source) clear: no host flushed anything.
    wait_until(lambda: log()["extents_marked"] == 0, what="the first sync's extents cleared")
    before = log()
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"x" * 4096, 5 * MiB)   # no FLUSH, before or after
    h.shutdown()
    assert log()["marks"] == before["marks"] + 1, "the write marked its extent"
    wait_until(lambda: log()["extents_marked"] == 0, what="the written extent cleared")
    assert log()["durable_cycle"] > before["durable_cycle"], "a source sync since the write let it clear"
