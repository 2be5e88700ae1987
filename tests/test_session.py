"""The session's cycle loop in-process, over real back ends and a real nbdkit replica."""
import os
import threading

import pytest

from conftest import make_image, uri
from copier import session as session_mod
from copier.session import Session
from nbd_plugin.backend import Backend
from nbd_plugin.params import Config
from tracker import KIND_DATA, KIND_ZERO

MiB = 1 << 20


@pytest.fixture
def make_session(nbdkit, tmp_path):
    made = []

    def make(replicated=True, cycle="3600", filters=(), params=(), size=8 * MiB):
        src = make_image(str(tmp_path / "source.img"), size, random_mib=1)
        dst = make_image(str(tmp_path / "replica.img"), size)
        cfg = Config()
        cfg.add("source", src)
        cfg.add("cycle", cycle)
        if replicated:
            cfg.add("replica", uri(nbdkit(*filters, "file", dst, *params)[0]))
        cfg.complete()
        backend = Backend(src)
        s = Session(cfg, {"": backend})
        made.append((s, backend))
        s.start()
        return s, backend, src, dst
    yield make
    for s, backend in made:
        s.stop()
        backend.close()


def write(s, backend, offset, data):
    cycle = s.begin_write(0, offset, len(data))
    try:
        backend.pwrite(data, offset)
    finally:
        s.end_write(cycle, 0, KIND_DATA, offset, len(data))


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
    cycle = s.begin_write(0, MiB, 4096)              # a write that began before the RP ...
    target = s.request_rp()
    assert not s.wait_for(target, 1.0)               # ... holds the RP: the drain times out
    assert s.status()["state"] == "draining"
    later = s.request_rp()                           # asked while draining: promises the open cycle
    assert later == target + 1
    backend.pwrite(data, MiB)
    s.end_write(cycle, 0, KIND_DATA, MiB, 4096)      # ... and once it ends, the RP completes
    assert s.wait_for(target, 60)
    assert s.wait_for(later, 60), "the request made while draining got its own RP"
    assert open(dst, "rb").read()[MiB:MiB + 4096] == data


def test_an_unexpected_error_costs_a_full_resync_not_a_change(make_session, monkeypatch):
    s, backend, src, dst = make_session()
    rp(s)
    broken = threading.Event()
    real_build = Session._build_report

    def build_once_broken(self, closed):
        if not broken.is_set():
            broken.set()
            raise RuntimeError("injected")
        return real_build(self, closed)
    monkeypatch.setattr(Session, "_build_report", build_once_broken)
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
    assert s.last_report.data == {0: [(0, 200), (4096, 1)]}
    assert s.status()["committed_cycle"] is None


def test_a_report_past_its_cap_copies_coarser_extents_and_loses_nothing(make_session, monkeypatch):
    monkeypatch.setattr(session_mod, "MAX_REPORT_EXTENTS", 8)
    s, backend, src, dst = make_session()
    rp(s)
    for i in range(40):
        write(s, backend, i * 3 * 65536 + 100, os.urandom(1000))
    cycle = s.begin_write(0, 7 * MiB + 5, 3000)
    backend.zero(7 * MiB + 5, 3000, may_trim=False, fast=False)
    s.end_write(cycle, 0, KIND_ZERO, 7 * MiB + 5, 3000)
    cycle = rp(s)
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert record["extents"] <= 8
    assert record["bytes_zeroed"] == 0, "a coarsened zero range is copied as data"
    assert record["bytes_copied"] >= 40 * 1000 + 3000
    assert open(src, "rb").read() == open(dst, "rb").read()


def test_coarsen_rounds_out_clips_and_never_drops_a_byte():
    extents = [(i * 100_000, 10) for i in range(50)] + [(8 * MiB - 7, 7)]
    out = session_mod.coarsen(extents, 8 * MiB, cap=4)
    assert len(out) <= 4
    assert out[-1][0] + out[-1][1] == 8 * MiB
    covered = lambda o, n: any(a <= o and o + n <= a + m for a, m in out)  # noqa: E731
    assert all(covered(o, n) for o, n in extents)


def test_stop_abandons_a_slow_copy_instead_of_finishing_it(make_session):
    s, backend, src, dst = make_session(filters=["--filter=delay"], params=["delay-write=2000ms"],
                                        size=64 * MiB)
    rp(s, timeout=120)
    write(s, backend, 0, os.urandom(40 * MiB))      # 40 segments: more than the 16 in flight
    cycle = s.request_rp()
    deadline = 600
    while s.status()["state"] != "copying" and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    s.stop()
    assert not s._thread.is_alive()
    record = next(c for c in s.status()["cycles"] if c["cycle"] == cycle)
    assert record["state"] == "abandoned"
