"""Property tests: the tracker against a naive oracle, a Python list of TEs.

Random sequences of record / begin / end / close_cycle / bad record run on a
Tracker and on the oracle; after every step an invariant checker compares
their state.  Each closed cycle must report exactly the oracle's TEs when it
was not folded, the same union per kind when folds only merged, and a cover of
it when folds coarsened (without ever widening a zero or trim range).
"""
import collections
import struct

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oracle import covers, union
from tracker import KIND_DATA, KIND_TRIM, KIND_ZERO, TE_BYTES, Tracker

TOP = (1 << 64) - 1
DEVS = st.integers(0, 2)
KINDS = st.integers(0, 2)
PAGE = 4096
OFFSETS = st.one_of(
    st.integers(0, 64).map(lambda i: i * PAGE),
    st.integers(0, 1 << 22),
    st.integers(TOP - (1 << 20), TOP - 1),
)
LENGTHS = st.one_of(st.sampled_from([PAGE, 2 * PAGE]), st.integers(1, 1 << 16), st.integers(1, 1 << 40))


def widened(extents, granule):
    """The extents rounded out to the granule, as shards.c coarsens them."""
    out = []
    for off, length in extents:
        start = off - off % granule
        end = min(-(-(off + length) // granule) * granule, TOP)
        out.append((start, end - start))
    return out


def fit(offset, length):
    return offset, min(length, TOP - offset)


class TrackerMachine(RuleBasedStateMachine):
    """Oracle: open/draining cycle ids, TEs not yet closed, cycles of writes in flight."""

    SHARDS = 2
    MAX_BYTES = 64 << 20

    def __init__(self):
        super().__init__()
        self.tr = Tracker(shards=self.SHARDS, max_bytes=self.MAX_BYTES, first_cycle=5)
        self.open, self.draining = 5, None
        self.tes = []
        self.inflight = []

    @rule(dev=DEVS, kind=KINDS, offset=OFFSETS, length=LENGTHS)
    def record(self, dev, kind, offset, length):
        offset, length = fit(offset, length)
        self.tr.record(dev, kind, offset, length)
        self.tes.append((self.open, dev, kind, offset, length))

    @rule(batch=st.lists(st.tuples(DEVS, KINDS, OFFSETS, LENGTHS), max_size=24))
    def record_batch(self, batch):
        for te in batch:
            self.record(*te)

    @rule(dev=DEVS, kind=KINDS, first=st.integers(0, 64), pages=st.integers(1, 40))
    def record_run(self, dev, kind, first, pages):
        for page in range(first, first + pages):
            self.record(dev, kind, page * PAGE, PAGE)

    @rule()
    def begin(self):
        assert self.tr.begin() == self.open
        self.inflight.append(self.open)

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 64), dev=DEVS, kind=KINDS, offset=OFFSETS, length=LENGTHS)
    def end(self, pick, dev, kind, offset, length):
        offset, length = fit(offset, length)
        cycle = self.inflight.pop(pick % len(self.inflight))
        self.tr.end(cycle, dev, kind, offset, length)
        self.tes.append((cycle, dev, kind, offset, length))

    @rule(dev=st.sampled_from([-1, 65536]), kind=st.sampled_from([-1, 3]),
          offset=st.sampled_from([-1, TOP]), length=st.sampled_from([0, -1, 2]))
    def bad_record(self, dev, kind, offset, length):
        before = self.tr.stats()["entries"]
        with pytest.raises(ValueError):
            self.tr.record(dev, kind, offset, length)
        assert self.tr.stats()["entries"] == before

    @rule()
    def close_cycle(self):
        target = self.open if self.draining is None else self.draining
        if self.draining is None:
            self.draining, self.open = self.open, self.open + 1
        if target in self.inflight:
            with pytest.raises(TimeoutError):
                self.tr.close_cycle(timeout=0)
            return
        closed = self.tr.close_cycle(timeout=30)
        self.draining = None
        assert closed.cycle == target
        mine = [te[1:] for te in self.tes if te[0] == target]
        self.tes = [te for te in self.tes if te[0] != target]
        check_closed(closed, mine)

    @invariant()
    def matches_oracle(self):
        stats = self.tr.stats()
        assert (self.tr.cycle, self.tr.draining) == (self.open, self.draining)
        assert self.tr.inflight == len(self.inflight) == stats["inflight"]
        assert stats["over_cap"] == 0 and stats["memory_bytes"] <= self.MAX_BYTES
        if stats["folds"] == 0:
            assert stats["entries"] == len(self.tes)
            assert stats["granule"] == 1
        else:
            assert stats["entries"] <= len(self.tes)


def by_key(closed):
    got = {}
    for dev in closed.devices():
        for kind in (KIND_DATA, KIND_ZERO, KIND_TRIM):
            got[dev, kind] = list(struct.iter_unpack("=QQ", closed.entries(dev, kind)))
    return got


def check_closed(closed, mine):
    """The closed cycle against the oracle's TEs (dev, kind, offset, length) of that cycle."""
    expected = collections.defaultdict(list)
    for dev, kind, offset, length in mine:
        expected[dev, kind].append((offset, length))
    got = by_key(closed)
    event(f"closed cycle: folded={closed.folded}, coarsened={closed.granule > 1}")
    if not closed.folded:
        assert closed.count == len(mine) and closed.granule == 1
        assert closed.bytes_written == sum(te[3] for te in mine)
        assert closed.devices() == sorted({te[0] for te in mine})
        for key in set(got) | set(expected):
            assert sorted(got.get(key, [])) == sorted(expected[key])
    elif closed.granule == 1:
        for key in set(got) | set(expected):
            assert union(got.get(key, [])) == union(expected[key])
    else:
        check_coarsened(closed.granule, got, expected)


def check_coarsened(granule, got, expected):
    for dev in {dev for dev, _ in list(got) + list(expected)}:
        mine = {k: expected.get((dev, k), []) for k in (KIND_DATA, KIND_ZERO, KIND_TRIM)}
        theirs = {k: got.get((dev, k), []) for k in (KIND_DATA, KIND_ZERO, KIND_TRIM)}
        every_mine = [e for k in mine for e in mine[k]]
        every_theirs = [e for k in theirs for e in theirs[k]]
        assert covers(every_theirs, every_mine), "a changed byte is missing"
        assert covers(theirs[KIND_DATA], mine[KIND_DATA])
        assert covers(mine[KIND_ZERO], theirs[KIND_ZERO]), "zeroes a byte nobody zeroed"
        assert covers(mine[KIND_TRIM], theirs[KIND_TRIM]), "trims a byte nobody trimmed"
        assert covers(widened(every_mine, granule), every_theirs), "wider than the granule"


class TinyCapMachine(TrackerMachine):
    """One shard of 16 TEs: folds and coarsening happen every few steps."""

    SHARDS = 1
    MAX_BYTES = 16 * TE_BYTES


SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestTrackerExact = TrackerMachine.TestCase
TestTrackerExact.settings = SETTINGS
TestTrackerTinyCap = TinyCapMachine.TestCase
TestTrackerTinyCap.settings = SETTINGS
