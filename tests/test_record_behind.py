"""The replication record written behind the worker (issue 11): a periodic record is written
by the record thread while the worker goes on to the next RP; the records something waits for
(an ``rp``'s, a receiver's, the stop's) are on disk before it goes on, and none is ever
replaced by an older one. The session in-process against a real nbdkit replica, the record
thread held (``records.save`` waits on an Event) as a slow device flush would hold it."""
import json
import os
import threading

import pytest

from conftest import wait_until
from copier.receiver import Link as ReceiverLink, meta_uri
from nbd_plugin.params import Config
from replication import driver, record
from test_session import make_session, rp, write  # noqa: F401 (make_session: a fixture)

MiB = 1 << 20


class HeldRecords:
    """``records.save`` that, once ``armed``, holds the record thread's writes until ``free``
    is set. ``submitted`` lists what the worker handed that thread once ``watch`` was called."""

    def __init__(self, monkeypatch):
        self.real = record.save
        self.armed, self.held, self.free = threading.Event(), threading.Event(), threading.Event()
        self.submitted = []
        monkeypatch.setattr(record, "save", self)

    def __call__(self, state_dir, rec):
        if self.armed.is_set() and threading.current_thread().name.startswith("nbdrep-record"):
            self.held.set()
            assert self.free.wait(60), "the test never let the record thread go"
        self.real(state_dir, rec)

    def watch(self, s, monkeypatch):
        submit = s._recorder.submit

        def spy(fn, rec):
            self.submitted.append(rec)
            return submit(fn, rec)
        monkeypatch.setattr(s._recorder, "submit", spy)


def on_disk(state):
    with open(os.path.join(state, record.FILE)) as f:
        return json.load(f)


@pytest.fixture
def held(monkeypatch):
    h = HeldRecords(monkeypatch)
    yield h
    h.free.set()   # before the session's stop, whatever the test's outcome


@pytest.fixture
def session(make_session, held, tmp_path, monkeypatch):  # noqa: F811
    """A session of 0.1 s cycles whose commits write a periodic record every 0.2 s, synced and
    recorded once (an rp); then ``held`` is armed: the next periodic record holds the thread."""
    monkeypatch.setattr(driver, "RECORD_INTERVAL", 0.2)
    state = str(tmp_path / "state")
    s, backend, src, dst = make_session(cycle="0.1", config=[("state", state)])
    rp(s)
    held.armed.set()
    wait_until(held.held.is_set, what="a periodic record held on the record thread")
    held.watch(s, monkeypatch)
    return s, backend, state


def test_cycles_commit_while_a_periodic_record_is_held(session, held):
    """Cycles keep committing while a periodic record's write is held; once it is let go, the
    record on disk names a cycle the session committed."""
    s, backend, state = session
    at = s.status()["committed_cycle"]
    for k in range(4):   # cycles that carry writes, not only empty ones
        write(s, backend, k * MiB, os.urandom(4096))
        wait_until(lambda: s.status()["committed_cycle"] >= at + 2 * (k + 1),
                   what="commits while the record thread is held")
    assert held.submitted, "newer periodic records were made while one was held"
    newest = held.submitted[-1]["committed_cycle"]
    held.free.set()
    wait_until(lambda: on_disk(state)["committed_cycle"] >= newest,
               what="the newest periodic record on disk")
    recorded = on_disk(state)
    assert not recorded["clean"] and recorded["committed_cycle"] <= s.status()["committed_cycle"]
    committed = {c["cycle"] for c in s.status()["cycles"] if c["state"] == "committed"}
    assert recorded["committed_cycle"] in committed


def test_a_clean_stop_is_the_last_record_written(session, held):
    """A clean stop while a periodic record is held: the stop's record lands after it, so the
    record on disk is the clean one with the exact next cycle, never the older one."""
    s, backend, state = session
    write(s, backend, 5 * MiB, os.urandom(8192))
    stopped = []
    stopper = threading.Thread(target=lambda: stopped.append(s.stop()))
    stopper.start()
    try:
        # The stop's record made: handed to the record thread, or (if it skipped the queue)
        # already written on the worker; only then is the held one let go.
        wait_until(lambda: any(r["clean"] for r in held.submitted) or on_disk(state)["clean"],
                   what="the stop's record made")
    finally:
        held.free.set()
        stopper.join(60)
    assert stopped == [True]
    recorded = on_disk(state)
    assert recorded["clean"] and recorded["outstanding"] == {}
    assert recorded["next_cycle"] == s.tracker.cycle
    assert recorded["committed_cycle"] == s.status()["committed_cycle"]


def test_an_rp_returns_only_once_its_record_is_on_disk(session, held):
    """``wait_for`` of a requested RP returns only after the record naming its commit is on
    disk, even with the record thread held by an older periodic one."""
    s, backend, state = session
    write(s, backend, 2 * MiB, os.urandom(4096))
    cycle = s.request_rp()
    seen = []
    waiter = threading.Thread(target=lambda: seen.append((s.wait_for(cycle, 60), on_disk(state))))
    waiter.start()
    try:
        wait_until(lambda: any(r["committed_cycle"] >= cycle for r in held.submitted),
                   what="the rp's record handed to the record thread")
        waiter.join(1.0)   # a return now would be before its record
        assert waiter.is_alive(), "wait_for returned while its record was held"
    finally:
        held.free.set()
        waiter.join(60)
    ((done, recorded),) = seen
    assert done and recorded["committed_cycle"] >= cycle


def test_a_receiver_takes_a_commit_only_once_it_is_recorded(make_session, held, tmp_path,  # noqa: F811
                                                              monkeypatch):
    """Where a replica is a receiver every commit's record is on disk before ``Link.commit``,
    even one the interval made due, and with the record thread slow: a receiver must never
    hold a newer commit than the record names."""
    monkeypatch.setattr(driver, "RECORD_INTERVAL", 0.2)
    state = str(tmp_path / "state")
    seen = []

    def commit(self, session_id, cycle, rp_time):
        seen.append((cycle, on_disk(state)["committed_cycle"]))
        return 1
    # From the start: a receiver answered (the Link's own test covers when it says so).
    monkeypatch.setattr(ReceiverLink, "has_receivers", lambda self: True)
    monkeypatch.setattr(ReceiverLink, "commit", commit)
    s, backend, src, dst = make_session(cycle="0.1", config=[("state", state)])
    rp(s)
    held.armed.set()   # the record thread waits for the test, as a slow disk would make it
    wait_until(held.held.is_set, what="a record held on the record thread")
    taken = len(seen)
    quiet = threading.Event()
    quiet.wait(0.5)   # cycles of 0.1 s: a commit that did not wait for its record shows by now
    assert len(seen) == taken, "a receiver took a commit whose record was held"
    held.free.set()
    wait_until(lambda: len(seen) >= taken + 3, what="three more commits taken by the receiver")
    assert all(recorded == cycle for cycle, recorded in seen), seen


def test_a_receiver_met_by_a_runs_first_commit_takes_it_recorded(make_session, held, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    """A clean restart with nothing outstanding commits its first cycle without a copy, so
    without the copy's fence: the receiver is met only at that commit. It is fenced before
    the session decides whether to wait for the record (``Link.fence_new``), so its commit is
    on disk before the receiver takes it (else the first record went behind, and a crash then
    left the receiver ahead of the record: a full resync, its RPs folded away)."""
    state = str(tmp_path / "state")
    seen = []

    def fence(self, data_uri, session_id, committed_cycle):   # as a receiver answers it
        self._seen_receiver = True
        self._fenced.add(meta_uri(data_uri))

    def commit(self, session_id, cycle, rp_time):
        self.fence_new(session_id, cycle)
        seen.append((cycle, on_disk(state)["committed_cycle"]))
        return 1
    monkeypatch.setattr(ReceiverLink, "fence", fence)
    monkeypatch.setattr(ReceiverLink, "commit", commit)
    s, backend, src, dst = make_session(cycle="0.2", config=[("state", state)])
    rp(s)
    assert s.stop()
    held.armed.set()   # from now on a record written behind waits for the test
    cfg = Config()
    for key, value in (("source", src), ("cycle", "0.2"), ("state", state),
                       ("replica", s.devices[0].replica_uri)):
        cfg.add(key, value)
    cfg.complete()
    again = driver.Session(cfg, {"": backend})
    again.start()
    try:
        wait_until(held.held.is_set, what="the new run's first record held on the record thread")
        taken = len(seen)
        threading.Event().wait(0.5)   # 0.2 s cycles: a commit that did not wait shows by now
        assert len(seen) == taken, f"the receiver took a commit whose record was held: {seen}"
        held.free.set()
        wait_until(lambda: any(c >= again.plan.first_cycle for c, _ in seen), what="the new run's commit")
        assert all(recorded == cycle for cycle, recorded in seen if cycle >= again.plan.first_cycle), seen
    finally:
        held.free.set()
        again.stop()
