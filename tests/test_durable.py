"""Durable replication (issue 9): a restart copies only what may differ, and says why it copies
more. Real `nbdrep serve` processes stopped with SIGTERM (a clean stop) against real replicas."""
import array
import json
import os
import random
import signal
import subprocess
import time

import nbd
import psutil

from conftest import Server, make_image, nbdrep_cmd, uri, wait_until
from replication import dirtylog, record

MiB = 1 << 20


def write(server, offset, data):
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(data, offset)
    h.shutdown()   # nbdkit's cleanup (the clean stop) waits for its clients to leave


def first_cycle(status):
    """The first cycle of this run: what the restart copied."""
    return status["cycles"][0]


def full(cycle, size=16 * MiB):
    """The cycle covered the whole device: data copied, holes zeroed."""
    return cycle["bytes_copied"] + cycle["bytes_zeroed"] == size


def same(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


class Site:
    """A source image, a replica image served by nbdkit, and `nbdrep serve` between them."""

    def __init__(self, procs, nbdkit, tmp_path, size=16 * MiB):
        self.procs, self.nbdkit, self.tmp = procs, nbdkit, str(tmp_path)
        self.src = make_image(os.path.join(self.tmp, "source.img"), size, random_mib=2)
        self.dst = make_image(os.path.join(self.tmp, "replica.img"), size)
        self.rsock, self.replica = nbdkit("file", self.dst)
        self.server = None

    def serve(self, *extra, replica_uri=None):
        self.server = Server(self.procs, self.tmp, [self.src], [replica_uri or uri(self.rsock)],
                             extra=["--cycle", "3600", *extra])
        return self.server

    def stop(self):
        """SIGTERM: a clean stop (a final RP, or what is outstanding recorded)."""
        assert self.procs.stop(self.server.proc) == 0


def test_a_clean_restart_copies_nothing_and_cycle_ids_continue(procs, nbdkit, tmp_path):
    site = Site(procs, nbdkit, tmp_path)
    server = site.serve()
    server.rp()
    write(server, 3 * MiB, os.urandom(65536))
    before = server.status()
    site.stop()
    assert same(site.src, site.dst), "the final RP of the clean stop reached the replica"
    server = site.serve()
    cycle = server.rp()
    status = server.status()
    assert status["session_id"] == before["session_id"]
    assert status["start"] == "resumed after a clean stop (0 bytes outstanding)"
    # The extents the last run left hot start marked (no msync when written again); no region
    # is: a kill -9 now would resync nothing.
    assert status["dirty_log"]["extents_marked"] > 0 and status["dirty_log"]["marked"] == 0
    assert first_cycle(status)["cycle"] > before["cycle"], "RP ids are unique for the session"
    assert sum(c["bytes_copied"] + c["bytes_zeroed"] for c in status["cycles"]) == 0
    assert status["committed_cycle"] == cycle and same(site.src, site.dst)


def test_a_restart_copies_exactly_what_the_stop_left_outstanding(procs, nbdkit, tmp_path):
    """The replica is down when the source stops: the final RP cannot commit, so the stop
    records the outstanding report, and the next start copies exactly that."""
    site = Site(procs, nbdkit, tmp_path)
    server = site.serve("--stop-timeout", "5")
    server.rp()
    procs.stop(site.replica)
    write(server, 5 * MiB, os.urandom(8192))
    write(server, 9 * MiB + 4096, os.urandom(4096))
    site.stop()
    os.unlink(site.rsock)
    site.rsock, site.replica = nbdkit("file", site.dst, sock=site.rsock)
    server = site.serve()
    server.rp()
    status = server.status()
    assert status["start"] == "resumed after a clean stop (12288 bytes outstanding)", status["start"]
    assert first_cycle(status)["bytes_copied"] == 12288 and not first_cycle(status)["initial_sync"]
    assert same(site.src, site.dst)


def test_a_source_changed_while_stopped_is_resynced_in_full_and_says_why(procs, nbdkit, tmp_path):
    site = Site(procs, nbdkit, tmp_path)
    site.serve().rp()
    site.stop()
    with open(site.src, "r+b") as f:   # written behind nbdrep's back
        f.seek(7 * MiB)
        f.write(b"outside write")
    server = site.serve()
    server.rp()
    status = server.status()
    assert "full resync (the source changed while nbdrep was not serving it" in status["start"]
    assert first_cycle(status)["initial_sync"] and full(first_cycle(status))
    assert same(site.src, site.dst)


def test_a_swapped_replica_is_resynced_in_full(procs, nbdkit, tmp_path):
    site = Site(procs, nbdkit, tmp_path)
    site.serve().rp()
    site.stop()
    other = make_image(os.path.join(site.tmp, "other.img"), 16 * MiB)
    osock, _ = nbdkit("file", other)
    server = site.serve(replica_uri=uri(osock))
    server.rp()
    assert "the replica is not the recorded one (URI)" in server.status()["start"]
    assert same(site.src, other)


def test_resync_full_copies_everything_whatever_the_record_says(procs, nbdkit, tmp_path):
    site = Site(procs, nbdkit, tmp_path)
    site.serve().rp()
    site.stop()
    server = site.serve("--resync", "full")
    server.rp()
    status = server.status()
    assert status["start"] == "full sync (--resync full)"
    assert full(first_cycle(status))


def test_a_corrupt_record_is_one_line_exit_2_and_nothing_written(procs, nbdkit, tmp_path):
    site = Site(procs, nbdkit, tmp_path)
    state = os.path.join(site.tmp, "state")
    os.makedirs(state)
    with open(os.path.join(state, "replication.json"), "w") as f:
        f.write("{not json")
    before = sorted(os.listdir(state))
    run = subprocess.run(nbdrep_cmd("serve", "--source", site.src, "--socket",
                                    os.path.join(site.tmp, "s.sock"), "--state", state,
                                    "--replica", uri(site.rsock)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "replication record" in lines[0] and "move it away" in lines[0]
    assert sorted(os.listdir(state)) == before


def test_a_second_server_on_the_same_state_directory_is_refused(procs, nbdkit, tmp_path):
    """Two runs on one state directory would overwrite each other's record and dirty-region
    log: the second is one line naming the first's pid, exit 2, and changes nothing."""
    site = Site(procs, nbdkit, tmp_path)
    server = site.serve()
    server.rp()   # returns once the commit is recorded; with 1 h cycles nothing is written now
    state = os.path.join(site.tmp, "state")
    before = {name: os.stat(os.path.join(state, name)).st_mtime_ns for name in os.listdir(state)}
    other = make_image(os.path.join(site.tmp, "other.img"), 16 * MiB)
    run = subprocess.run(nbdrep_cmd("serve", "--source", other, "--socket",
                                    os.path.join(site.tmp, "s2.sock"), "--state", state,
                                    "--control", os.path.join(site.tmp, "c2.sock")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    nbdkit_pid = psutil.Process(server.proc.pid).children()[0].pid
    assert f"state directory {state} is in use by another nbdrep serve (pid {nbdkit_pid})" in line
    assert {name: os.stat(os.path.join(state, name)).st_mtime_ns
            for name in os.listdir(state)} == before
    server.rp()   # the first one is unharmed


def test_the_record_is_replaced_whole(procs, nbdkit, tmp_path):
    """Written through a temporary file and a rename: never a torn record, no leftovers."""
    site = Site(procs, nbdkit, tmp_path)
    server = site.serve()
    server.rp()
    state = os.path.join(site.tmp, "state")
    with open(os.path.join(state, "replication.json")) as f:
        record = json.load(f)
    assert record["clean"] is False and record["committed_cycle"] == server.status()["committed_cycle"]
    site.stop()
    with open(os.path.join(state, "replication.json")) as f:
        record = json.load(f)
    assert record["clean"] is True and record["outstanding"] == {}
    assert "replication.json.tmp" not in os.listdir(state)


def marked_after_crash(state):
    """The bytes the crashed run's dirty-region log marked, read from its file as the record
    names it: what the restart may resync at most."""
    with open(os.path.join(state, record.FILE)) as f:
        described = json.load(f)["dirty_log"]
    marks, _ = dirtylog.read(state, described)
    return {name: sum(pairs[1::2]) for name, pairs in marks.items()}


def restart_resyncs_exactly(site, killed, marked, cycle):
    """Start the source again after ``killed`` (its Server) was killed with kill -9, with
    ``cycle`` s cycles: its first RP must resync exactly the ``marked`` bytes and leave the
    replica equal to the source. Returns the new Server."""
    os.unlink(killed.control)   # left by the killed run; the new one is waited for by it
    server = site.serve("--cycle", cycle)
    server.rp()
    status = server.status()
    assert status["start"].startswith("resync after a crash") and not status["last_stop_clean"]
    assert status["resync"]["bytes_total"] == status["resync"]["bytes_done"] == marked
    assert same(site.src, site.dst)
    return server


def test_source_killed_at_random_moments_resyncs_only_marked_regions_and_converges(procs, nbdkit,
                                                                                   tmp_path):
    """kill -9 of the source's nbdkit under fio at a random moment, ten rounds. fio writes the
    first 8 MiB of 64 MiB; each restart resyncs exactly the regions the dirty-region log marked
    (read from its file after the crash), which lie within what fio wrote (regions not written
    for a while were cleared), and after its RP the replica equals the source: nothing that
    may differ was left out."""
    site = Site(procs, nbdkit, tmp_path, size=64 * MiB)
    rng = random.Random(12393603)
    server = site.serve("--cycle", "0.2")
    server.rp()
    for _ in range(10):
        fio = procs.start(["fio", "--name=crash", "--thread", "--ioengine=nbd", f"--uri={server.uri}",
                           "--rw=randwrite", "--bs=4k", "--iodepth=8", "--offset=0",
                           "--size=8M", "--time_based", "--runtime=60", "--output=/dev/null"],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # fio is writing (this run's writes are all fio's), and the last start's marks (the
        # whole resync) cooled down and cleared, while fio's stay.
        def writing_within_range():
            status = server.status()
            return sum(c["writes"] for c in status["cycles"]) > 0 and \
                status["dirty_log"]["marked_bytes"] <= 8 * MiB
        wait_until(writing_within_range, what="fio writing, marks outside its range cleared")
        time.sleep(rng.uniform(0.0, 0.6))       # the random moment of the crash
        (nbdkit_proc,) = psutil.Process(server.proc.pid).children()
        nbdkit_proc.send_signal(signal.SIGKILL)
        server.proc.wait(60)
        procs.procs.remove(server.proc)
        procs.kill(fio)   # its server died under it: fio ignores SIGTERM then
        marked = marked_after_crash(os.path.join(site.tmp, "state"))[""]
        assert 0 < marked <= 8 * MiB
        server = restart_resyncs_exactly(site, server, marked, "0.2")


def test_a_block_device_served_without_replication_in_between_is_resynced(procs, nbdkit, kernel,
                                                                         tmp_path):
    """A block device shows no mtime: a run that serves it without replicating (here tracking
    only, on the same state directory) must mark the record, or the next replicated start
    would resume with nothing to copy and the replica would miss that run's writes."""
    image = make_image(str(tmp_path / "dev.img"), 16 * MiB, random_mib=2)
    dev = kernel.loop(image, 512)
    dst = make_image(str(tmp_path / "replica.img"), 16 * MiB)
    rsock, _ = nbdkit("file", dst)
    server = Server(procs, str(tmp_path), [dev], [uri(rsock)], extra=["--cycle", "3600"])
    server.rp()
    assert procs.stop(server.proc) == 0
    tracking_only = Server(procs, str(tmp_path), [dev])
    write(tracking_only, 4 * MiB, os.urandom(4096))
    assert procs.stop(tracking_only.proc) == 0
    server = Server(procs, str(tmp_path), [dev], [uri(rsock)], extra=["--cycle", "3600"])
    server.rp()
    assert "the last run did not stop cleanly" in server.status()["start"]
    assert same(dev, dst)


def test_a_replica_rewritten_behind_the_same_uri_is_resynced_in_full(procs, nbdkit, tmp_path):
    """The URI and size match the record, but the image behind them changed (another image,
    or a test failover that wrote to the replica): the sampled blocks differ, so the source
    is resynced in full and the start says why."""
    site = Site(procs, nbdkit, tmp_path)
    site.serve().rp()
    site.stop()
    with open(site.dst, "r+b") as f:   # every block differs from the source now
        for _ in range(16):
            f.write(os.urandom(MiB))
    server = site.serve()
    server.rp()
    assert "the replica is not the recorded one (it differs from the source at offset" in \
        server.status()["start"]
    assert same(site.src, site.dst)


def test_sample_offsets_avoid_what_is_outstanding_and_include_both_ends():
    outstanding = array.array("Q", [4096, 8192, 40960, 100])   # blocks 1-2 and 10
    offsets = record.sample_offsets(64 * 4096 + 10, outstanding, random.Random(1), count=500)
    assert offsets[0] == 0 and offsets[-1] == 64 * 4096, "the first and the last (partial) block"
    assert not {4096, 8192, 40960} & set(offsets)
    assert offsets == sorted(set(offsets)) and all(o % 4096 == 0 for o in offsets)
