"""Unit and concurrency tests of the tracker (per-CPU TE shards, cycle switch, folding, the GIL)."""
import collections
import random
import struct
import sys
import threading
import time

import numpy as np
import pytest

import tracker
from conftest import wait_until
from oracle import covers, union
from tracker import KIND_DATA, KIND_TRIM, KIND_ZERO, TE_BYTES, Tracker

WAIT = 30.0  # generous bound on every wait, only to avoid hanging the suite


def pairs(buf):
    return list(struct.iter_unpack("=QQ", buf))


def start(target):
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def join(*threads):
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def test_max_bytes_holds_one_te_per_24_bytes_before_the_first_fold():
    tr = Tracker(shards=1, max_bytes=64 * 24)
    for i in range(64):
        tr.record(0, KIND_DATA, 2 * i, 1)
    stats = tr.stats()
    assert (stats["entries"], stats["folds"], stats["memory_bytes"]) == (64, 0, 64 * 24)
    tr.record(0, KIND_DATA, 1000, 1)
    assert tr.stats()["folds"] == 1


def test_record_and_close_round_trip():
    tr = Tracker(shards=2, first_cycle=7)
    tr.record(3, KIND_DATA, 8192, 4096)
    tr.record(3, KIND_DATA, 0, 512)
    tr.record(3, KIND_ZERO, 1 << 40, 1 << 20)
    tr.record(9, KIND_TRIM, 0, 1)
    assert tr.stats()["entries"] == 4
    closed = tr.close_cycle()
    assert (closed.cycle, closed.count, closed.folded, closed.granule) == (7, 4, False, 1)
    assert closed.bytes_written == 4096 + 512 + (1 << 20) + 1
    assert closed.devices() == [3, 9]
    assert pairs(closed.entries(3, KIND_DATA)) == [(0, 512), (8192, 4096)]
    assert pairs(closed.entries(3, KIND_ZERO)) == [(1 << 40, 1 << 20)]
    assert pairs(closed.entries(9, KIND_TRIM)) == [(0, 1)]
    assert len(closed.entries(3, KIND_TRIM)) == 0
    assert len(closed.entries(4, KIND_DATA)) == 0
    assert tr.cycle == 8 and tr.stats()["entries"] == 0


def test_entries_are_native_uint64_pairs():
    tr = Tracker(shards=1)
    tr.record(0, KIND_DATA, (1 << 64) - 2, 1)
    tr.record(0, KIND_DATA, 5, 6)
    array = np.frombuffer(tr.close_cycle().entries(0, KIND_DATA), dtype=np.uint64).reshape(-1, 2)
    assert array.tolist() == [[5, 6], [(1 << 64) - 2, 1]]


def test_empty_cycle_closes():
    tr = Tracker(shards=1)
    closed = tr.close_cycle(timeout=0)
    assert (closed.cycle, closed.count, closed.bytes_written, closed.devices()) == (1, 0, 0, [])
    assert tr.cycle == 2


def test_write_that_began_before_the_switch_stays_in_the_old_cycle():
    tr = Tracker(shards=2)
    began, release, results = threading.Event(), threading.Event(), []

    def writer():
        c = tr.begin()
        began.set()
        release.wait(WAIT)
        tr.end(c, 7, KIND_DATA, 0, 4096)

    writing = start(writer)
    assert began.wait(WAIT)
    closing = start(lambda: results.append(tr.close_cycle(timeout=WAIT)))
    wait_until(lambda: tr.cycle == 2, timeout=WAIT, poll=0.001)
    assert closing.is_alive(), "close_cycle returned while a write of its cycle was in flight"
    tr.record(7, KIND_DATA, 8192, 4096)
    assert tr.inflight == 1
    release.set()
    join(writing, closing)
    assert results[0].cycle == 1
    assert pairs(results[0].entries(7, KIND_DATA)) == [(0, 4096)]
    assert pairs(tr.close_cycle().entries(7, KIND_DATA)) == [(8192, 4096)]


def test_close_times_out_cleanly_and_a_later_close_finishes_the_drain():
    tr = Tracker(shards=2)
    old = tr.begin()
    tr.record(1, KIND_DATA, 0, 10)
    with pytest.raises(TimeoutError, match="cycle 1 still has 1 write"):
        tr.close_cycle(timeout=0.05)
    assert (tr.cycle, tr.draining, tr.inflight) == (2, 1, 1)
    tr.record(1, KIND_DATA, 100, 10)
    new = tr.begin()
    assert new == 2
    tr.end(new, 1, KIND_DATA, 200, 10)
    with pytest.raises(TimeoutError):
        tr.close_cycle(timeout=0)
    assert tr.cycle == 2, "a close that resumes a drain must not open another cycle"
    tr.end(old, 1, KIND_ZERO, 50, 5)
    closed = tr.close_cycle(timeout=WAIT)
    assert closed.cycle == 1 and tr.draining is None and tr.cycle == 2
    assert pairs(closed.entries(1, KIND_DATA)) == [(0, 10)]
    assert pairs(closed.entries(1, KIND_ZERO)) == [(50, 5)]
    assert pairs(tr.close_cycle().entries(1, KIND_DATA)) == [(100, 10), (200, 10)]
    with pytest.raises(ValueError, match="cycle 1 is neither open nor draining"):
        tr.end(old, 1, KIND_DATA, 0, 1)


def _writer(tr, dev, use_begin, count, tagged, recorded):
    rng = random.Random(dev)
    for i in range(count):
        te = (dev, rng.randrange(3), rng.randrange(1 << 30), rng.randrange(1, 1 << 16))
        if use_begin:
            c = tr.begin()
            if i % 256 == 0:
                time.sleep(0.0002)
            tr.end(c, *te)
            tagged.append((c, te))
        else:
            tr.record(*te)
        recorded.append(te)


def _hammer(tr, writes):
    """Four writer threads (``writes`` each, odd ones bracketing with begin/end) against a
    closer thread taking an RP every 2 ms; returns (closed cycles, recorded TEs per writer,
    (cycle, TE) tagged per writer)."""
    recorded = [[] for _ in range(4)]
    tagged = [[] for _ in range(4)]
    writers = [
        start(lambda d=d: _writer(tr, d, d % 2 == 1, writes, tagged[d], recorded[d]))
        for d in range(4)
    ]
    closed = []

    def closer():
        for _ in range(10000):
            if not any(w.is_alive() for w in writers):
                return
            closed.append(tr.close_cycle(timeout=WAIT))
            time.sleep(0.002)

    closing = start(closer)
    join(*writers, closing)
    closed.append(tr.close_cycle(timeout=WAIT))
    return closed, recorded, tagged


def test_hammer_threads_with_periodic_close():
    tr = Tracker(shards=4)
    closed, recorded, tagged = _hammer(tr, 20000)

    assert [c.cycle for c in closed] == list(range(1, len(closed) + 1))
    assert not any(c.folded for c in closed) and tr.stats()["folds"] == 0
    assert sum(c.count for c in closed) == 80000
    got = collections.Counter()
    by_cycle = {}
    for c in closed:
        by_cycle[c.cycle] = collections.Counter(
            (dev, kind) + p for dev in c.devices() for kind in range(3)
            for p in pairs(c.entries(dev, kind)))
        got += by_cycle[c.cycle]
    assert got == collections.Counter(te for r in recorded for te in r)
    for cycle, te in (x for t in tagged for x in t):
        assert by_cycle[cycle][te] > 0, f"TE {te} begun in cycle {cycle} landed elsewhere"
    assert tr.stats()["entries"] == 0 and tr.inflight == 0


def test_hammer_threads_with_folds_and_periodic_close_lose_nothing():
    tr = Tracker(shards=2, max_bytes=2 * 64 * TE_BYTES)
    closed, recorded, tagged = _hammer(tr, 5000)

    assert [c.cycle for c in closed] == list(range(1, len(closed) + 1))
    assert tr.stats()["folds"] > 0 and any(c.folded for c in closed)
    got = collections.defaultdict(list)
    for c in closed:
        for dev in c.devices():
            got[c.cycle, dev] = [p for kind in range(3) for p in pairs(c.entries(dev, kind))]
    for dev in range(4):
        everything = [p for (_, d), extents in got.items() if d == dev for p in extents]
        assert covers(everything, [te[2:] for te in recorded[dev]]), f"device {dev} lost a write"
    for cycle, te in (x for t in tagged for x in t):
        assert covers(got[cycle, te[0]], [te[2:]]), f"TE {te} begun in cycle {cycle} landed elsewhere"
    assert tr.stats()["entries"] == 0 and tr.inflight == 0


def test_fold_merges_adjacent_entries_exactly():
    tr = Tracker(shards=1, max_bytes=64 * TE_BYTES)
    for i in range(1000):
        tr.record(2, KIND_DATA, 4096 * i, 4096)
    stats = tr.stats()
    assert stats["folds"] >= 1 and stats["coarsenings"] == 0
    assert stats["memory_bytes"] <= stats["max_bytes"]
    closed = tr.close_cycle()
    assert closed.folded and closed.granule == 1
    assert union(pairs(closed.entries(2, KIND_DATA))) == [(0, 4096 * 1000)]
    assert closed.count <= 64 and closed.bytes_written == 4096 * 1000


def test_coarsening_keeps_every_byte_and_turns_zero_into_data():
    tr = Tracker(shards=1, max_bytes=64 * TE_BYTES)
    rng = random.Random(1)
    recorded = {k: [] for k in range(3)}
    for i in range(2000):
        kind = (KIND_ZERO, KIND_ZERO, KIND_TRIM, KIND_DATA)[i % 4]
        extent = (rng.randrange(1 << 34), rng.randrange(1, 8192))
        tr.record(5, kind, *extent)
        recorded[kind].append(extent)
    stats = tr.stats()
    assert stats["coarsenings"] >= 1 and stats["granule"] >= 64 << 10
    assert stats["memory_bytes"] <= stats["max_bytes"] and stats["over_cap"] == 0
    closed = tr.close_cycle()
    assert closed.folded and closed.granule >= 64 << 10
    got = {k: pairs(closed.entries(5, k)) for k in range(3)}
    everything = [e for k in range(3) for e in recorded[k]]
    assert covers(got[KIND_DATA] + got[KIND_ZERO] + got[KIND_TRIM], everything)
    assert covers(got[KIND_DATA], recorded[KIND_DATA])
    assert covers(recorded[KIND_ZERO], got[KIND_ZERO]), "zeroed a byte nobody zeroed"
    assert covers(recorded[KIND_TRIM], got[KIND_TRIM]), "trimmed a byte nobody trimmed"
    assert len(got[KIND_DATA]) > 0 and closed.count <= 64


def test_fold_never_mixes_cycles():
    tr = Tracker(shards=1, max_bytes=32 * TE_BYTES)
    held = tr.begin()
    for i in range(200):
        tr.record(0, KIND_DATA, i << 30, 1)
    with pytest.raises(TimeoutError):
        tr.close_cycle(timeout=0)
    for i in range(200):
        tr.record(0, KIND_DATA, (i << 30) + (1 << 29), 1)
    tr.end(held, 0, KIND_DATA, 0, 1)
    first, second = tr.close_cycle(), tr.close_cycle()
    assert covers(pairs(first.entries(0, KIND_DATA)), [(i << 30, 1) for i in range(200)])
    assert covers(pairs(second.entries(0, KIND_DATA)),
                  [((i << 30) + (1 << 29), 1) for i in range(200)])
    assert first.granule > 1 and second.granule > 1


def test_many_devices_overrun_the_cap_rather_than_lose_a_change():
    tr = Tracker(shards=1, max_bytes=16 * TE_BYTES)
    for dev in range(40):
        tr.record(dev, KIND_ZERO, dev << 20, 10)
    stats = tr.stats()
    assert stats["over_cap"] >= 1 and stats["memory_bytes"] > stats["max_bytes"]
    closed = tr.close_cycle()
    assert closed.devices() == list(range(40))
    for dev in range(40):
        got = pairs(closed.entries(dev, KIND_DATA)) + pairs(closed.entries(dev, KIND_ZERO))
        assert covers(got, [(dev << 20, 10)])


@pytest.mark.parametrize("args, message", [
    ((0, KIND_DATA, 0, 0), "length must be"),
    ((0, KIND_DATA, 0, -5), "length must be"),
    ((0, 3, 0, 1), "kind must be"),
    ((0, -1, 0, 1), "kind must be"),
    ((0, 1.0, 0, 1), "kind must be"),
    ((65536, KIND_DATA, 0, 1), "dev must be in 0..65535"),
    ((-1, KIND_DATA, 0, 1), "dev must be in 0..65535"),
    ((1 << 70, KIND_DATA, 0, 1), "dev must be in 0..65535"),
    ((0, KIND_DATA, -1, 1), "offset must be"),
    ((0, KIND_DATA, "0", 1), "offset must be"),
    ((0, KIND_DATA, (1 << 64) - 1, 1), "overflows 64 bits"),
    ((0, KIND_DATA, 1 << 63, 1 << 63), "overflows 64 bits"),
])
def test_bad_write_raises_and_records_nothing(args, message):
    tr = Tracker(shards=1)
    with pytest.raises(ValueError, match=message):
        tr.record(*args)
    c = tr.begin()
    with pytest.raises(ValueError, match=message):
        tr.end(c, *args)
    assert tr.inflight == 0, "a rejected end() must still end the write"
    assert tr.stats()["entries"] == 0
    assert tr.close_cycle(timeout=WAIT).count == 0


def test_end_with_a_cycle_that_is_not_live_changes_nothing():
    tr = Tracker(shards=1, first_cycle=10)
    c = tr.begin()
    for bad in (9, 11, -1, 1 << 64, None):
        with pytest.raises(ValueError, match="neither open nor draining"):
            tr.end(bad, 0, KIND_DATA, 0, 1)
    assert tr.inflight == 1
    tr.end(c, 0, KIND_DATA, 0, 1)
    assert tr.close_cycle().count == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"shards": 0}, "shards must be"),
    ({"shards": "2"}, "shards must be"),
    ({"shards": tracker.MAX_SHARDS + 1}, "shards must be"),
    ({"shards": 2, "max_bytes": 100}, "max_bytes must be"),
    ({"shards": 1, "max_bytes": 2.5e9}, "max_bytes must be"),
    ({"first_cycle": -1}, "first_cycle must be"),
    ({"first_cycle": 1 << 63}, "first_cycle must be"),
])
def test_bad_tracker_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tracker(**kwargs)


def test_bad_close_and_entries_arguments():
    tr = Tracker(shards=1)
    tr.record(0, KIND_DATA, 0, 1)
    for timeout in (-1, float("nan"), "1"):
        with pytest.raises(ValueError, match="timeout must be"):
            tr.close_cycle(timeout=timeout)
    assert tr.cycle == 1 and tr.stats()["entries"] == 1
    with pytest.raises(ValueError, match="kind must be"):
        tr.close_cycle().entries(0, 3)


def test_stats_report_memory_and_counters():
    tr = Tracker(shards=3, max_bytes=1 << 20)
    stats = tr.stats()
    for key in ("shards", "entries", "memory_bytes", "max_bytes", "folds", "coarsenings",
                "granule", "te_bytes"):
        assert key in stats
    assert (stats["shards"], stats["max_bytes"], stats["entries"]) == (3, 1 << 20, 0)
    assert stats["memory_bytes"] == 3 * 1024 * TE_BYTES
    assert (stats["folds"], stats["coarsenings"], stats["granule"]) == (0, 0, 1)


# ---- a fold gives up the GIL ----------------------------------------------------------------
#
# A fold of a million TEs takes hundreds of milliseconds. Writers run on nbdkit's threads, so a
# fold that kept the GIL would stop every one of them for that long. These tests run a call
# while a second Python thread spins, and measure the longest time within the call during
# which the spinner did not run: it needs the GIL to run, so that silence is the time the GIL
# was kept. The control shows the measurement sees a call that keeps the GIL.

FOLD_TES = 1 << 20
SCRAMBLE = 0x9E3779B1 % FOLD_TES | 1  # odd: i * SCRAMBLE % FOLD_TES permutes range(FOLD_TES)
# The spinner may also run just before the call enters C and just after it returns, at most a
# switch interval each time, so only a call much longer than that tells the two cases apart.
LONG_CALL = 10 * sys.getswitchinterval()


def full_tracker():
    """A one-shard tracker so full that the next write folds FOLD_TES TEs.

    The TEs are one byte each, 1 TiB apart, in scrambled order: the fold sorts them and only
    the 25th coarsening (64 KiB to 1 TiB granules) merges any, hundreds of milliseconds of work.
    """
    tr = Tracker(shards=1, max_bytes=FOLD_TES * TE_BYTES)
    for i in range(FOLD_TES):
        tr.record(0, KIND_DATA, (i * SCRAMBLE % FOLD_TES) << 40, 1)
    stats = tr.stats()
    assert (stats["entries"], stats["folds"]) == (FOLD_TES, 0)
    return tr


def longest_silence(call):
    """Run call() while another thread spins: (seconds the call took, longest time within the
    call during which the spinner did not run)."""
    gaps, running, stop = [], threading.Event(), threading.Event()

    def spin():
        last = time.perf_counter()
        running.set()
        while True:
            now = time.perf_counter()
            if now - last > 0.001:
                gaps.append((last, now))
            last = now
            if stop.is_set():
                return  # after one more tick, which closes a gap that spans the call's end

    spinner = start(spin)
    assert running.wait(WAIT)
    began = time.perf_counter()
    call()
    ended = time.perf_counter()
    stop.set()
    join(spinner)
    return ended - began, max([min(b, ended) - max(a, began) for a, b in gaps] + [0.0])


def check_fold(tr, took, silence):
    """The call folded every TE without losing one, and other threads ran during it."""
    assert tr.stats()["folds"] == 1
    assert took > LONG_CALL, f"a fold of {took:.3f} s is too short to tell"
    assert silence < took / 2, f"other threads stopped for {silence:.3f} s of a {took:.3f} s fold"
    assert union(pairs(tr.close_cycle().entries(0, KIND_DATA))) == [(0, FOLD_TES << 40)]


def test_end_that_folds_gives_up_the_gil():
    tr = full_tracker()
    c = tr.begin()
    check_fold(tr, *longest_silence(lambda: tr.end(c, 0, KIND_DATA, 5, 1)))


def test_record_that_folds_gives_up_the_gil():
    tr = full_tracker()
    check_fold(tr, *longest_silence(lambda: tr.record(0, KIND_DATA, 5, 1)))


def test_a_write_whose_end_folds_stays_in_flight_until_its_te_is_recorded():
    tr = full_tracker()
    c = tr.begin()
    returned = threading.Event()

    def end():
        tr.end(c, 1, KIND_DATA, 5, 1)
        returned.set()

    began = time.perf_counter()
    ending = start(end)
    longest, zero_since = 0.0, None
    while not returned.is_set():
        now = time.perf_counter()
        if tr.inflight:
            zero_since = None
        else:
            zero_since = zero_since or now
            longest = max(longest, now - zero_since)
    took = time.perf_counter() - began
    join(ending)
    # After the TE is recorded, end() still needs the GIL back to return: a switch interval.
    assert took > LONG_CALL, f"an end() of {took:.3f} s is too short to tell"
    assert longest < took / 2, f"no write in flight for {longest:.3f} s before end() returned"
    closed = tr.close_cycle(timeout=0)
    assert closed.cycle == c and pairs(closed.entries(1, KIND_DATA)) == [(5, 1)]


@pytest.mark.parametrize("other", ["record", "stats"])
def test_a_call_that_waits_for_a_folding_shard_gives_up_the_gil(other):
    tr = full_tracker()
    call = {"record": lambda: tr.record(0, KIND_DATA, 7, 1), "stats": tr.stats}[other]
    longest, done = [0.0], threading.Event()

    def repeat():
        while not done.is_set():
            began = time.perf_counter()
            call()
            longest[0] = max(longest[0], time.perf_counter() - began)

    def fold_while_repeating():
        repeating = start(repeat)
        tr.record(0, KIND_DATA, 5, 1)  # this write or the other thread's first one folds
        done.set()
        join(repeating)

    total, silence = longest_silence(fold_while_repeating)
    assert longest[0] > total / 2, f"no {other}() call waited for the fold"
    check_fold(tr, total, silence)


def test_control_a_call_that_keeps_the_gil_silences_the_spinner():
    numbers = [i * SCRAMBLE % FOLD_TES for i in range(FOLD_TES)]
    took, silence = longest_silence(lambda: sorted(numbers))  # sorting ints keeps the GIL
    assert took > LONG_CALL, f"a sort of {took:.3f} s is too short to tell"
    assert silence > took / 2
