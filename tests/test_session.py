"""The replication driver in-process, over real back ends and a real nbdkit replica."""
import errno
import os
import signal
import threading
import time

import pytest

from conftest import make_image, uri, wait_until
from replication import driver as session_mod
from replication.driver import Session
from nbd_plugin.backend import Backend
from nbd_plugin.params import Config
from tracker import KIND_DATA, KIND_ZERO

MiB = 1 << 20


@pytest.fixture
def make_session(nbdkit, tmp_path):
    made = []

    def make(replicated=True, cycle="3600", filters=(), params=(), size=8 * MiB, config=()):
        src = make_image(str(tmp_path / "source.img"), size, random_mib=1)
        dst = make_image(str(tmp_path / "replica.img"), size)
        cfg = Config()
        cfg.add("source", src)
        cfg.add("cycle", cycle)
        for key, value in config:
            cfg.add(key, value)
        if replicated:
            sock, make.replica = nbdkit(*filters, "file", dst, *params)
            cfg.add("replica", uri(sock))
        cfg.complete()
        backend = Backend(src)
        s = Session(cfg, {"": backend})
        made.append((s, backend))
        s.start()
        return s, backend, src, dst
    yield make
    for s, backend in made:
        assert s.stop(), "the worker ended"
        backend.close()


def write(s, backend, offset, data, dev=0):
    cycle = s.hook.begin(dev, offset, len(data))
    try:
        backend.pwrite(data, offset)
    finally:
        s.hook.end(cycle, dev, KIND_DATA, offset, len(data))


def rp(s, timeout=60):
    cycle = s.request_rp()
    assert s.wait_for(cycle, timeout), s.status()
    return cycle


def test_initial_sync_then_cycles_keep_the_replica_equal(make_session):
    s, backend, src, dst = make_session()
    rp(s)
    write(s, backend, 3 * MiB + 5, os.urandom(70000))
    cycle = rp(s)
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert (record["writes"], record["bytes_copied"], record["state"]) == (1, 70000, "committed")
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_an_rp_waits_for_writes_in_flight_and_times_out_without_losing_them(make_session, monkeypatch):
    monkeypatch.setattr(session_mod, "DRAIN_TIMEOUT", 0.2)
    s, backend, src, dst = make_session()
    rp(s)
    data = os.urandom(4096)
    cycle = s.hook.begin(0, MiB, 4096)               # a write that began before the RP ...
    target = s.request_rp()
    assert not s.wait_for(target, 1.0)               # ... holds the RP: the drain times out
    assert s.status()["state"] == "draining"
    later = s.request_rp()                           # asked while draining: promises the open cycle
    assert later == target + 1
    backend.pwrite(data, MiB)
    s.hook.end(cycle, 0, KIND_DATA, MiB, 4096)       # ... and once it ends, the RP completes
    assert s.wait_for(target, 60)
    assert s.wait_for(later, 60), "the request made while draining got its own RP"
    assert open(dst, "rb").read()[MiB:MiB + 4096] == data


def test_an_unexpected_error_costs_a_full_resync_not_a_change(make_session, monkeypatch):
    s, backend, src, dst = make_session()
    rp(s)
    broken = threading.Event()
    real_build = session_mod.reports.build

    def build_once_broken(*args):
        if not broken.is_set():
            broken.set()
            raise RuntimeError("injected")
        return real_build(*args)
    monkeypatch.setattr(session_mod.reports, "build", build_once_broken)
    write(s, backend, 5 * MiB, os.urandom(8192))
    target = s.request_rp()
    assert s.wait_for(target + 1, 60)
    records = {c["cycle"]: c for c in s.status()["cycles"]}
    assert records[target]["state"] == "failed" and "injected" in records[target]["error"]
    assert records[target + 1]["bytes_copied"] == MiB + 8192, "resync skips holes"
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_tracking_only_keeps_the_last_report(make_session):
    s, backend, _, _ = make_session(replicated=False)
    write(s, backend, 0, b"a" * 100)
    write(s, backend, 100, b"b" * 100)
    write(s, backend, 4096, b"c")
    rp(s)
    assert s.report_json()["exports"][""] == {"data": [(0, 200), (4096, 1)], "zero": []}
    assert s.status()["committed_cycle"] is None


def test_a_report_past_its_cap_copies_coarser_extents_and_loses_nothing(make_session, monkeypatch):
    monkeypatch.setattr(session_mod, "MAX_REPORT_EXTENTS", 8)
    s, backend, src, dst = make_session()
    rp(s)
    for i in range(40):
        write(s, backend, i * 3 * 65536 + 100, os.urandom(1000))
    cycle = s.hook.begin(0, 7 * MiB + 5, 3000)
    backend.zero(7 * MiB + 5, 3000, may_trim=False, fast=False)
    s.hook.end(cycle, 0, KIND_ZERO, 7 * MiB + 5, 3000)
    cycle = rp(s)
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert record["extents"] <= 8
    assert record["bytes_zeroed"] == 0, "a coarsened zero range is copied as data"
    assert record["bytes_copied"] >= 40 * 1000 + 3000
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_a_stop_whose_timeout_runs_out_abandons_a_slow_copy(make_session):
    s, backend, src, dst = make_session(filters=["--filter=delay"], params=["delay-write=2000ms"],
                                        size=64 * MiB)
    rp(s, timeout=120)
    write(s, backend, 0, os.urandom(40 * MiB))      # 40 segments: more than the 16 in flight
    cycle = s.request_rp()
    wait_until(lambda: s.status()["state"] == "copying", what="copying")
    assert s.stop(timeout=0.5)
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert record["state"] == "abandoned"


def test_status_answers_throughout_cycles(make_session):
    """Issue 8, bug 4: status iterated the cycle history while the worker appended to it
    ("deque mutated during iteration") and the control socket dropped the connection."""
    s, backend, src, dst = make_session(cycle="0.02")
    rp(s)
    seen, errors, done = set(), [], threading.Event()

    def poll():
        for _ in range(20000):
            if done.is_set():
                return
            try:
                status = s.status()
                seen.add(status["state"])
                assert all(isinstance(c["cycle"], int) for c in status["cycles"])
            except Exception as e:   # noqa: BLE001 -- any error is the failure under test
                errors.append(e)
                return
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for i in range(100):
            write(s, backend, (i * 7919 % 2000) * 4096, os.urandom(4096))
            if i % 10 == 9:
                rp(s)
    finally:
        done.set()
        poller.join(60)
    assert not errors, errors
    assert seen, "status was read during the cycles"
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_tracker_coarsened_past_the_end_of_the_device_still_commits(make_session):
    """Issue 8, bug 2: with a tiny tracker-mem the tracker coarsens TEs to 64 KiB granules; on
    a source whose size is not a multiple of that, the last one ran past EOF, the source read
    failed with EIO and no cycle ever committed again."""
    size = 8 * MiB + 1000
    s, backend, src, dst = make_session(size=size, config=[("tracker-mem", "1k")])
    rp(s)
    for i in range(300):
        write(s, backend, size - 1 - 4099 * i, b"x")
    cycle = rp(s)
    assert s.status()["tracker"]["coarsenings"] > 0, "the tracker coarsened"
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert record["state"] == "committed" and record["bytes_copied"] > 300
    assert open(src, "rb").read() == open(dst, "rb").read()


@pytest.mark.parametrize("rate", ["1%", "10%"])
def test_a_flaky_replica_keeps_committing(make_session, rate):
    """Issue 8, bug 6: one failed request failed the whole cycle; at 1% request errors no
    cycle committed again. Failed requests are now retried on their own."""
    s, backend, src, dst = make_session(filters=["--filter=error"],
                                        params=[f"error-pwrite-rate={rate}", f"error-zero-rate={rate}",
                                                "error-pwrite=EIO"])
    rp(s)
    for round_ in range(5):
        # 300 writes a cycle, none adjacent (so 300 requests): 1,500 requests in all, so even at
        # 1% the chance that none failed is 3e-7.
        for i in range(300):
            write(s, backend, ((round_ * 300 + i) * 104729 % 1000) * 8192, os.urandom(4096))
        rp(s)
    assert s.status()["requests_retried"] > 0, "the error filter failed some requests"
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_stop_cancels_a_copy_stalled_on_the_replica(make_session):
    """Issue 8, bug 5: stop() closed the replica connections after a join that timed out,
    under a copy still using them. Now a stop cancels the stalled call and the worker ends."""
    s, backend, src, dst = make_session()
    rp(s)
    write(s, backend, 0, os.urandom(4 * MiB))
    os.kill(make_session.replica.pid, signal.SIGSTOP)
    try:
        cycle = s.request_rp()
        wait_until(lambda: s.status()["state"] == "copying", what="copying")
        started = time.monotonic()
        assert s.stop(timeout=2)
        assert time.monotonic() - started < 15, "the stop did not wait for the 60 s I/O timeout"
    finally:
        os.kill(make_session.replica.pid, signal.SIGCONT)
    assert not s._replicas, "the worker closed its connections on its way out"
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert record["state"] == "abandoned" and s.status()["state"] == "stopped"


def test_stop_leaves_a_worker_held_by_a_hung_write_to_end_on_its_own(make_session, monkeypatch):
    """A drain waits for a write that never ends: stop() says the worker did not end (so the
    plugin keeps the back ends open), and the worker ends once the write does."""
    monkeypatch.setattr(session_mod, "DRAIN_TIMEOUT", 60.0)
    s, backend, src, dst = make_session()
    rp(s)
    cycle = s.hook.begin(0, MiB, 4096)
    s.request_rp()
    wait_until(lambda: s.tracker.draining is not None or s.tracker.cycle > cycle, what="the RP")
    assert not s.stop(timeout=0.5)
    assert s._thread.is_alive()
    s.hook.end(cycle, 0, KIND_DATA, MiB, 4096)
    wait_until(lambda: not s._thread.is_alive(), what="the worker's own end")
    assert s.status()["state"] == "stopped"


def test_a_full_keepaside_degrades_the_cycle_never_a_host_write(make_session):
    """Issue 8, bug 8: with the spill file's file system full, 48 of 64 host overwrites failed
    with EIO. Now the keep-aside gives up the cycle's point in time instead: the cycle is copied
    but marked inconsistent (committed does not move to it), the next RP follows at once, and
    its commit is a recovery point again."""
    s, backend, src, dst = make_session(filters=["--filter=delay"], params=["delay-write=100ms"],
                                        size=16 * MiB, config=[("keepaside-mem", "4k"),
                                                               ("keepaside-spill", "8k")])
    rp(s)
    write(s, backend, 0, os.urandom(16 * MiB))
    cycle = s.request_rp()
    wait_until(lambda: s.status()["state"] == "copying", what="copying")
    for i in range(64):                      # overwrite blocks the copy has not read yet
        write(s, backend, 16 * MiB - (i + 1) * 65536, os.urandom(4096))
    wait_until(lambda: s.status()["committed_cycle"] > cycle, what="a later commit")
    records = {c["cycle"]: c for c in s.status()["cycles"]}
    assert records[cycle]["state"] == "inconsistent" and not records[cycle]["point_in_time"]
    assert records[cycle]["commit_time"] is not None, "its copy still landed"
    assert open(src, "rb").read() == open(dst, "rb").read()


@pytest.mark.parametrize("multi_conn", [True, False], ids=["multi-conn", "single-conn"])
def test_a_failed_cycle_resends_only_what_did_not_land(nbdkit, tmp_path, multi_conn):
    """Issue 8, bug 6: a failed cycle's retry resends only what did not land. Two exports in
    one consistency group; the second replica fails every write while a flag file exists, so
    the first device's extents land and the cycle fails on the second. With multi-conn, a
    FLUSH on a fresh connection makes what landed durable and the retry copies only the second
    device; without it nothing is known durable and the retry copies both."""
    flag = tmp_path / "fail-b"
    cfg, backends = Config(), {}
    for name in ("a", "b"):
        src = make_image(str(tmp_path / f"{name}.img"), 8 * MiB)
        dst = make_image(str(tmp_path / f"{name}-replica.img"), 8 * MiB)
        filters = [] if name == "b" or multi_conn else ["--filter=multi-conn", "multi-conn-mode=disable"]
        if name == "b":
            filters = ["--filter=error", "error-pwrite-rate=100%", "error-pwrite=EIO", f"error-file={flag}"]
        sock, _ = nbdkit(*[f for f in filters if f.startswith("--")], "file", dst,
                         *[f for f in filters if not f.startswith("--")])
        cfg.add("source", f"{name}={src}")
        cfg.add("replica", f"{name}={uri(sock)}")
        backends[name] = Backend(src)
    cfg.add("cycle", "3600")
    cfg.complete()
    s = Session(cfg, backends)
    s.start()
    try:
        rp(s)
        for dev, name in enumerate(("a", "b")):
            write(s, backends[name], 0, os.urandom(MiB), dev=dev)
        flag.touch()
        failed = s.request_rp()
        wait_until(lambda: s.status()["failures"] > 0, timeout=120, what="the failed cycle")
        flag.unlink()
        retry = rp(s)
        records = {c["cycle"]: c for c in s.status()["cycles"]}
        assert records[failed]["state"] == "failed"
        assert records[retry]["bytes_copied"] == (MiB if multi_conn else 2 * MiB)
        for name in ("a", "b"):
            assert (tmp_path / f"{name}.img").read_bytes() == (tmp_path / f"{name}-replica.img").read_bytes()
    finally:
        assert s.stop()
        for backend in backends.values():
            backend.close()


def test_a_step_that_fails_unexpectedly_mid_batch_never_ends_the_worker(make_session, monkeypatch):
    """Review finding: an error in an action that was not the last of its batch (here the
    keep-aside release that opens a commit) fed the machine an event its state had no row
    for, and the worker died for good while status still said replicating."""
    s, backend, src, dst = make_session()
    rp(s)
    real_release, broken = s.keepaside.release, threading.Event()

    def release_once_broken():
        if not broken.is_set():
            broken.set()
            raise RuntimeError("injected")
        real_release()
    monkeypatch.setattr(s.keepaside, "release", release_once_broken)
    write(s, backend, 3 * MiB, os.urandom(65536))
    rp(s)
    assert broken.is_set()
    write(s, backend, 5 * MiB, os.urandom(4096))
    cycle = rp(s)
    assert s._thread.is_alive()
    states = [c["state"] for c in s.status()["cycles"]]
    assert "inconsistent" in states, "the commit after the error was not trusted"
    assert s.status()["committed_cycle"] >= cycle
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_a_full_state_directory_is_shown_never_a_failed_cycle(kernel, make_session):
    """The record is written at every commit; when the state directory is full, replication
    goes on, the error is in status, and the record on disk (a run in progress) makes the
    next start resync in full, which is safe."""
    tiny_state = kernel.mount("tmpfs", "-o", "size=64k")   # unmounted after the sessions stop
    s, backend, src, dst = make_session(config=[("state", tiny_state)])
    rp(s)
    assert s.status()["record_error"] is None
    fd = os.open(os.path.join(tiny_state, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(64):   # 64 KiB: more than is left
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    write(s, backend, 2 * MiB, os.urandom(4096))
    cycle = rp(s)
    # rp returns at the commit; the driver writes the record right after it.
    wait_until(lambda: s.status()["record_error"] is not None, what="the record's error")
    status = s.status()
    assert status["committed_cycle"] == cycle and status["failures"] == 0
    assert "No space left" in status["record_error"]
    os.unlink(os.path.join(tiny_state, "filler"))
    write(s, backend, 3 * MiB, os.urandom(4096))
    rp(s)
    wait_until(lambda: s.status()["record_error"] is None, what="the next commit's record")
    assert open(src, "rb").read() == open(dst, "rb").read()
