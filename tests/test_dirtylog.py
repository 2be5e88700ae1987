"""The dirty-region log (replication/dirtylog.c) against a model: after any sequence of writes,
RPs, commits, source syncs and crashes, every region with a write not yet committed is marked in
the file, at both levels (what a restart reads after kill -9: the regions; after power loss: the
extents), every region where the source would differ from the replica after a crash is marked
(power loss also takes the source's writes not yet made durable), and a region stays marked only
while it may differ or is hot."""
import os
import random
import tempfile
import threading
import types

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from replication import dirtylog
from tracker import KIND_DATA, Tracker

REGION = 4096
HOT = 2
EXTENT = dirtylog.EXTENT


def devices(*regions):
    return [types.SimpleNamespace(dev=i, name=f"d{i}", size=n * REGION - i)
            for i, n in enumerate(regions)]


def on_disk(state, log, power_lost=False):
    """The marks a restart would read now, as {(name, unit)}: the file, not the mapping's
    owner (a kill -9 keeps exactly what the file's page cache holds). After power loss (a new
    boot id) the extents, in units of REGION too."""
    marks, _ = dirtylog.read(state, log.describe(), "another boot" if power_lost else None)
    return regions(marks)


def regions(marks):
    """{(name, region)} of marks as ``dirtylog.read`` gives them."""
    return {(name, off // REGION + k) for name, pairs in marks.items()
            for off, length in zip(pairs[0::2], pairs[1::2]) for k in range(-(-length // REGION))}


class DirtyLogModel(RuleBasedStateMachine):
    """Model: per region, the cycle of its last write (or of the start that preset it), and
    its content as versions: in the source's page cache, on the source's disk (what power loss
    leaves), at each RP of this run, and on the replica (the content at the last commit's RP)."""

    @initialize(sizes=st.lists(st.integers(1, 3 * EXTENT // REGION), min_size=1, max_size=3))
    def start(self, sizes):
        self.state = tempfile.mkdtemp(prefix="dirtylog-")
        self.devs = devices(*sizes)
        self.last = {}            # (name, region) -> cycle of its last write
        self.committed = 0        # newest committed cycle
        self.cleared_upto = None  # the last commit handed to the log
        self.cache, self.disk, self.replica = {}, {}, {}   # (name, region) -> version; 0 if absent
        self.at_rp = {}           # cycle -> the cache at its RP
        self.version = 0
        self.open_log(first_cycle=1, preset=None, warm=None)

    def open_log(self, first_cycle, preset, warm):
        self.cycle = self.cycle_first = first_cycle
        self.warm = {(name, off // EXTENT + k) for name, pairs in (warm or {}).items()
                     for off, length in zip(pairs[0::2], pairs[1::2])
                     for k in range(-(-length // EXTENT))}   # (name, extent) preset at first_cycle
        self.durable_upto = first_cycle - 1   # what the log was told the source holds durably
        self.extent_bound = None              # extents of a cycle <= this one cleared at the last commit
        self.log = dirtylog.DirtyLog(self.state, self.devs, REGION, first_cycle, preset, hot=HOT,
                                     warm=warm and {d.dev: warm[d.name] for d in self.devs})
        dirtylog.prune(self.state, self.log.file)

    def teardown(self):
        for name in os.listdir(self.state):
            os.unlink(os.path.join(self.state, name))
        os.rmdir(self.state)

    @rule(data=st.data())
    def write(self, data):
        d = data.draw(st.sampled_from(self.devs))
        offset = data.draw(st.integers(0, d.size - 1))
        length = data.draw(st.integers(1, d.size - offset))
        self.log.mark(self.cycle, d.dev, offset, length)
        self.version += 1
        for r in range(offset // REGION, (offset + length - 1) // REGION + 1):
            self.last[(d.name, r)] = self.cycle
            self.cache[(d.name, r)] = self.version

    @rule()
    def rp(self):
        self.at_rp[self.cycle] = dict(self.cache)
        self.cycle += 1

    @rule()
    def sync_sources(self):
        """The driver's source sync: the newest cycle whose writes all ended (the closed one;
        the model's writes end at once), then an fdatasync of the source (it also makes the
        open cycle's writes so far durable), then the log is told."""
        ended = self.cycle - 1
        self.disk = dict(self.cache)
        self.log.durable(ended)
        self.durable_upto = max(self.durable_upto, ended)

    @precondition(lambda self: self.committed < self.cycle - 1)
    @rule(data=st.data())
    def commit(self, data):
        self.committed = data.draw(st.integers(self.committed + 1, self.cycle - 1))
        self.log.commit(self.committed)
        self.cleared_upto = self.committed
        self.extent_bound = min(self.committed - HOT, self.durable_upto)
        self.replica = dict(self.at_rp[self.committed])

    @rule(skip=st.integers(1, 5), power_lost=st.booleans())
    def crash_and_restart(self, skip, power_lost):
        """kill -9 (the page cache kept the regions' marks) or power loss (only the extents'
        were synced, and the source's writes only as far as they were made durable): only the
        files are left. Every region where the source then differs from the replica is in the
        marks the restart resyncs. The next run starts with those marks preset, at a fresh cycle
        id, and nothing committed since; as the driver does, it starts with the crashed run's
        extents marked too (after kill -9 the source may hold their writes only in its page
        cache, so power loss may yet take them)."""
        marks, _ = dirtylog.read(self.state, self.log.describe(),
                                 "another boot" if power_lost else None)
        warm, _ = dirtylog.read(self.state, self.log.describe(), extents=True)
        self.log = None
        if power_lost:
            self.cache = dict(self.disk)
        differ = {key for key in set(self.cache) | set(self.replica)
                  if self.cache.get(key, 0) != self.replica.get(key, 0)}
        assert differ <= regions(marks), "the restart would leave source and replica differing"
        first = self.cycle + skip
        preset = {d.dev: marks[d.name] for d in self.devs}
        units = {d.name: -(-d.size // REGION) for d in self.devs}
        self.last = {(name, r): first for name, r in regions(marks) if r < units[name]}
        self.cleared_upto = None
        self.committed, self.at_rp = first - 1, {}
        self.open_log(first, preset, warm)

    @invariant()
    def every_uncommitted_write_is_marked(self):
        if getattr(self, "log", None) is None:
            return
        marked = on_disk(self.state, self.log)
        uncommitted = {key for key, c in self.last.items() if c > self.committed}
        assert uncommitted <= marked

    @invariant()
    def every_uncommitted_write_is_in_a_synced_extent(self):
        """What survives power loss: the extents cover every region with a write not yet
        committed (the extents are whole EXTENTs, so compare by extent)."""
        if getattr(self, "log", None) is None:
            return
        per = EXTENT // REGION
        extents = {(name, r // per) for name, r in on_disk(self.state, self.log, power_lost=True)}
        uncommitted = {(name, r // per) for (name, r), c in self.last.items() if c > self.committed}
        assert uncommitted <= extents

    @invariant()
    def what_power_loss_would_leave_differing_is_in_a_synced_extent(self):
        """The source's disk (its page cache lost) against the replica: every region that
        differs is in an extent the restart after power loss would resync."""
        if getattr(self, "log", None) is None:
            return
        per = EXTENT // REGION
        extents = {(name, r // per) for name, r in on_disk(self.state, self.log, power_lost=True)}
        differ = {(name, r // per) for name, r in set(self.disk) | set(self.replica)
                  if self.disk.get((name, r), 0) != self.replica.get((name, r), 0)}
        assert differ <= extents, "power loss would leave source and replica differing, unmarked"

    @invariant()
    def marks_clear_once_committed_and_cool(self):
        if getattr(self, "log", None) is None:
            return
        marked = on_disk(self.state, self.log)
        assert marked <= set(self.last), "a region never written is marked"
        if self.cleared_upto is not None:
            stale = {key for key in marked if self.last[key] <= self.cleared_upto}
            assert not stale, "committed regions stay marked"
            per = EXTENT // REGION
            extents = {(name, r // per) for name, r in on_disk(self.state, self.log, True)}
            hot = {(name, r // per) for (name, r), c in self.last.items()
                   if c > self.extent_bound}
            hot |= self.warm if self.cycle_first > self.extent_bound else set()
            assert extents <= hot, "committed extents that cooled down and are durable stay marked"
        assert self.log.stats()["marked"] == len(marked)


TestDirtyLogModel = DirtyLogModel.TestCase
TestDirtyLogModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_marks_race_commits_and_none_is_lost(tmp_path):
    """Writers on several threads (tagged by a real tracker) mark while the committer closes
    cycles and clears; a clear that raced a write of the open cycle must leave it marked."""
    devs = devices(3 * EXTENT // REGION)   # three extents: their marks race too
    log = dirtylog.DirtyLog(str(tmp_path), devs, REGION, 1, hot=0)
    tracker = Tracker(max_bytes=1 << 20, first_cycle=1)
    written = []               # (region, cycle) of every write
    stop = threading.Event()

    len_regions = 3 * EXTENT // REGION

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(20000):
            if stop.is_set():
                return
            r = rng.randrange(len_regions)
            c = tracker.begin()
            log.mark(c, 0, r * REGION, REGION)
            written.append((r, c))
            tracker.end(c, 0, KIND_DATA, r * REGION, REGION)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    committed = 0
    try:
        for _ in range(200):
            committed = tracker.close_cycle(timeout=30).cycle
            log.commit(committed)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    marked = {r for _, r in on_disk(str(tmp_path), log)}
    extents = {r for _, r in on_disk(str(tmp_path), log, power_lost=True)}
    missing = {r for r, c in written if c > committed} - marked
    assert not missing, f"regions written after cycle {committed} lost their marks: {missing}"
    assert not {r for r, c in written if c > committed} - extents, "an extent lost its mark"
    assert log.stats()["cleared"] > 0, "the commits cleared nothing: the race was not exercised"


def test_a_log_file_of_the_wrong_size_or_missing_is_refused(tmp_path):
    log = dirtylog.DirtyLog(str(tmp_path), devices(100), REGION, 1)
    described = log.describe()
    with open(os.path.join(tmp_path, described["file"]), "ab") as f:
        f.write(b"\0")
    with pytest.raises(dirtylog.DirtyLogError, match="wrong size"):
        dirtylog.read(str(tmp_path), described)
    os.unlink(os.path.join(tmp_path, described["file"]))
    with pytest.raises(dirtylog.DirtyLogError, match="unreadable"):
        dirtylog.read(str(tmp_path), described)
    with pytest.raises(dirtylog.DirtyLogError, match="no dirty-region log"):
        dirtylog.read(str(tmp_path), None)


def test_a_write_outside_its_device_is_a_bug_not_a_mark(tmp_path):
    log = dirtylog.DirtyLog(str(tmp_path), devices(2), REGION, 1)
    with pytest.raises(ValueError):
        log.mark(1, 0, 2 * REGION, 1)
    with pytest.raises(ValueError):
        log.mark(1, 1, 0, 1)


def test_warm_extents_are_preset_as_extents_only(tmp_path):
    """A clean stop leaves its hot extents in the file; the next run starts with them marked
    (no msync when the workload writes them again) but no region marked: a kill -9 then
    resyncs nothing that was not written."""
    devs = devices(3 * EXTENT // REGION)
    log = dirtylog.DirtyLog(str(tmp_path), devs, REGION, 1, warm={0: [EXTENT, 1]})
    assert on_disk(str(tmp_path), log) == set()
    per = EXTENT // REGION
    assert {r // per for _, r in on_disk(str(tmp_path), log, power_lost=True)} == {1}
    log.mark(1, 0, EXTENT + REGION, REGION)   # the warm extent again: no new extent mark
    assert log.stats()["marks"] == 0 and log.stats()["syncs"] == 0
    log.mark(1, 0, 0, REGION)                 # a cold one: marked, and synced
    assert log.stats()["marks"] == 1 and log.stats()["syncs"] == 1


def test_an_extent_stays_marked_until_its_writes_are_durable_on_the_source(tmp_path):
    """A committed, cooled-down extent whose writes the source may hold only in its page cache
    (no source sync since) survives the commits: power loss could still take them from the
    source after the replica got them. Once the sources are durable up to its last write, the
    next commit clears it; the regions never wait for that."""
    log = dirtylog.DirtyLog(str(tmp_path), devices(EXTENT // REGION), REGION, 1, hot=HOT)

    def extents():
        return {r // (EXTENT // REGION) for _, r in on_disk(str(tmp_path), log, power_lost=True)}
    log.mark(1, 0, 0, REGION)
    assert not log.sync_due(HOT), "nothing is cool yet: no source sync is worth it"
    log.commit(HOT)
    assert on_disk(str(tmp_path), log) == set(), "the region's mark waits for nothing"
    assert log.sync_due(1 + HOT)
    log.commit(1 + HOT)
    assert extents() == {0}, "cleared before the source was durable"
    log.durable(1)
    assert not log.sync_due(1 + HOT)
    log.commit(1 + HOT)
    assert extents() == set()
