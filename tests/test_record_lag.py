"""A replication record older than the replica (issue 11): under sub-second cycles the driver
writes the record at most once per ``RECORD_INTERVAL`` of commits, so a crash can leave a record
naming an older commit than the replica holds. Real `nbdrep serve` processes killed with
`kill -9` in that window, under fio."""
import json
import os
import signal
import subprocess

import psutil
import pytest

from conftest import wait_until
from replication import dirtylog, history, record
from test_durable import Site, restart_resyncs_exactly

MiB = 1 << 20
ROUNDS = 5


def newest_commit(state):
    """The newest cycle the killed run committed, from its history (appended at every commit
    after the replicas' flush; a kill -9 keeps the page cache, so the last line is there)."""
    with open(os.path.join(state, history.FILE)) as f:
        return max(json.loads(line)["cycle"] for line in f
                   if line.strip() and json.loads(line)["state"] == "committed")


@pytest.mark.parametrize("power_lost", [False, True], ids=["kill-9", "power-loss"])
def test_a_crash_while_the_record_lags_the_replica_resyncs_what_is_marked(procs, nbdkit, tmp_path,
                                                                          power_lost):
    """fio writes 1,000 4 KiB blocks a second over the first 32 MiB of 64 MiB (slowly enough
    that a region is seldom written twice in a cycle) under 0.1 s cycles; the source's nbdkit is killed
    once the record names an older commit than the history shows (rounds until one crash lands
    in that window, at most ROUNDS). The restart resyncs exactly what the dirty-region log
    marked -- its fine regions after kill -9; its durable extents after a power loss, modelled
    by giving the record another boot id -- and after its RP the replica equals the source."""
    site = Site(procs, nbdkit, tmp_path, size=64 * MiB)
    state = os.path.join(site.tmp, "state")
    server = site.serve("--cycle", "0.1")
    server.rp()
    lagged = 0
    for _ in range(ROUNDS):
        fio = procs.start(["fio", "--name=lag", "--thread", "--ioengine=nbd", f"--uri={server.uri}",
                           "--rw=randwrite", "--bs=4k", "--iodepth=4", "--offset=0",
                           "--size=32M", "--rate_iops=1000", "--time_based", "--runtime=60", "--output=/dev/null"],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def record_behind():
            with open(os.path.join(state, record.FILE)) as f:
                recorded = json.load(f)["committed_cycle"]
            status = server.status()
            dirty = status["dirty_log"]   # the start's extents cooled and their source synced
            return status["cycles"][-1]["writes"] > 0 and status["committed_cycle"] > recorded \
                and dirty["extents_marked"] * dirty["extent"] <= 32 * MiB
        wait_until(record_behind, what="commits of fio's writes newer than the record, "
                                       "extents outside fio's range cleared")
        (nbdkit_proc,) = psutil.Process(server.proc.pid).children()
        nbdkit_proc.send_signal(signal.SIGKILL)
        server.proc.wait(60)
        procs.procs.remove(server.proc)
        procs.kill(fio)   # its server died under it: fio ignores SIGTERM then
        with open(os.path.join(state, record.FILE)) as f:
            crashed = json.load(f)
        assert crashed["clean"] is False
        lagged += crashed["committed_cycle"] < newest_commit(state)
        if power_lost:
            crashed["dirty_log"]["boot_id"] = "another boot"
            record.save(state, crashed)
        marks, what = dirtylog.read(state, crashed["dirty_log"])
        marked = sum(marks[""][1::2])
        assert 0 < marked <= 32 * MiB and ("extents" in what) == power_lost, what
        server = restart_resyncs_exactly(site, server, marked, "0.1")
        if lagged:
            break
    assert lagged, f"no crash in {ROUNDS} rounds found the record older than the replica"
