"""Keep-aside: whatever N+1 writes while N is copied, the copier reads N's bytes as of the RP.

The oracle everywhere is the source image at the RP: the initial image plus, in landing order,
every write of a cycle up to the RP's. The stateful test and the threaded stress test drive
the store through whole cycles (arm, close, drain, install, reads, release) with writes of
two cycles interleaved, and compare each copied cycle with that image.
"""
import array
import dataclasses
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from copier.keepaside import BLOCK, KeepAside, index_bound
from tracker import KIND_DATA, Tracker

SIZE = 16 * BLOCK + 123   # a partial last block
JOIN = 10.0               # seconds before a keep that does not return counts as a deadlock


class Device:
    """A back end over an anonymous file, with the interface KeepAside reads through."""

    def __init__(self, size=SIZE, seed=0, fd=None):
        self.size = size
        self.fd = os.memfd_create("keepaside-test") if fd is None else fd
        os.ftruncate(self.fd, size)
        if seed is not None:
            os.pwrite(self.fd, random.Random(seed).randbytes(size), 0)

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)

    def read_batch(self, pairs, into):
        pos = 0
        for offset, length in zip(pairs[0::2], pairs[1::2]):
            into[pos:pos + length] = self.read(offset, length)
            pos += length

    def image(self):
        return self.read(0, self.size)

    def write(self, store, cycle, offset, payload, dev=0):
        """A host write tagged ``cycle``, as the front end does it: keep if needed, then write."""
        if store.needs(cycle):
            store.keep(cycle, dev, offset, len(payload))
        os.pwrite(self.fd, payload, offset)

    def close(self):
        os.close(self.fd)


def pairs_of(extents):
    return array.array("Q", [x for extent in extents for x in extent])


def read(store, offset, length, dev=0):
    """The copier's read of one segment."""
    return bytes(store.read_batch(dev, pairs_of([(offset, length)]), bytearray(length)))


def armed(store, cycle=1, report=None):
    """``store`` armed for ``cycle``, drained, and (if given) with ``report`` installed."""
    store.arm(cycle)
    store.drained()
    if report is not None:
        store.install({0: pairs_of(report)})
    return store


extent = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * BLOCK)).map(
    lambda e: (e[0], min(e[1], SIZE - e[0])))


def disjoint(extents):
    out, end = [], -1
    for off, n in sorted(extents):
        if off > end:
            out.append((off, n))
            end = off + n
    return out


def merged(extents):
    """Sorted (offset, length) extents with overlapping and touching ones joined."""
    out = []
    for off, n in sorted(extents):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_n, off + n - last_off))
        else:
            out.append((off, n))
    return out


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- one cycle, writes of the next one interleaved with the copier's reads -------------------

@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), report=st.lists(extent, min_size=1, max_size=8),
       writes=st.lists(extent, max_size=30), install_after=st.integers(0, 30),
       mem_cap=st.sampled_from([0, 2 * BLOCK, 1 << 20]))
def test_copier_reads_the_snapshot_whatever_is_written_meanwhile(seed, report, writes, install_after, mem_cap):
    dev = Device(seed=seed)
    store = KeepAside({0: dev}, mem_cap=mem_cap)
    snapshot = dev.image()
    report = disjoint(report)
    store.arm(1)
    assert store.needs(2) and not store.needs(1)
    store.drained()
    rng = random.Random(seed)
    ops = [("write", w) for w in writes]
    reads = [("read", r) for r in report]
    # Interleave writes with the in-order reads; install the report somewhere in between.
    merged_ops = sorted(ops + reads, key=lambda op: rng.random())
    reads_iter = iter(report)
    installed = False
    for step, (kind, _) in enumerate(merged_ops):
        if step == install_after and not installed:
            store.install({0: pairs_of(report)})
            installed = True
        if kind == "write":
            off, n = writes.pop(0)
            dev.write(store, 2, off, rng.randbytes(n))
        else:
            if not installed:
                store.install({0: pairs_of(report)})
                installed = True
            off, n = next(reads_iter)
            assert read(store, off, n) == snapshot[off:off + n]
        stats = store.stats()
        assert 0 <= stats["mem_bytes"] <= mem_cap and store.point_in_time
    store.release()
    assert store.stats()["blocks"] == 0 and not store.needs(2)
    dev.close()


def test_only_pending_unread_blocks_are_kept():
    dev = Device(seed=1)
    store = armed(KeepAside({0: dev}), 5, [(0, 2 * BLOCK), (8 * BLOCK, BLOCK)])
    dev.write(store, 6, 4 * BLOCK, b"x" * BLOCK)          # outside the report: nothing to keep
    assert store.stats()["blocks"] == 0
    read(store, 0, 2 * BLOCK)                               # the copier is past the first extent
    dev.write(store, 6, 0, b"y" * 2 * BLOCK)                # already read: nothing to keep
    assert store.stats()["blocks"] == 0
    dev.write(store, 6, 8 * BLOCK + 10, b"z")               # pending and unread: keep its block
    assert store.stats()["blocks"] == 1
    dev.write(store, 5, 9 * BLOCK - 1, b"z")                # the armed cycle's own write: never
    assert store.stats()["blocks"] == 1


def test_blocks_kept_before_the_report_are_dropped_when_outside_it():
    dev = Device(seed=2)
    store = armed(KeepAside({0: dev}))
    dev.write(store, 2, 0, b"a" * (3 * BLOCK))              # report unknown yet: everything pending
    assert store.stats()["blocks"] == 3
    store.install({0: [(BLOCK, 10)]})                       # tuples are accepted too
    assert store.stats()["blocks"] == 1


def test_spill_file_holds_blocks_past_the_memory_cap():
    dev = Device(seed=3)
    store = KeepAside({0: dev}, mem_cap=BLOCK)
    snapshot = dev.image()
    armed(store, 1, [(0, SIZE)])
    dev.write(store, 2, 0, b"w" * SIZE)
    stats = store.stats()
    assert stats["mem_bytes"] == BLOCK and stats["spill_bytes"] == SIZE - BLOCK
    assert read(store, 0, SIZE) == snapshot


def test_reads_free_the_blocks_they_pass_and_a_block_split_across_batches_serves_both():
    dev = Device(seed=4)
    snapshot = dev.image()
    store = armed(KeepAside({0: dev}, mem_cap=2 * BLOCK), 1, [(0, SIZE)])
    dev.write(store, 2, 0, b"v" * SIZE)
    assert store.stats()["blocks"] == 17
    cut = 5 * BLOCK + 100                                   # inside block 5
    assert read(store, 0, cut) == snapshot[:cut]
    assert store.stats()["blocks"] == 12                    # blocks 0-4 are done; 5 is half read
    assert read(store, cut, SIZE - cut) == snapshot[cut:]
    stats = store.stats()
    assert stats["blocks"] == 0 and stats["mem_bytes"] == stats["spill_bytes"] == 0


def test_several_devices_and_segments_in_one_batch():
    devs = {3: Device(seed=5), 9: Device(size=3 * BLOCK, seed=6)}
    snapshots = {dev: d.image() for dev, d in devs.items()}
    store = KeepAside(devs, mem_cap=BLOCK)
    store.arm(1)
    store.drained()
    store.install({3: pairs_of([(10, 100), (BLOCK - 5, 10), (7 * BLOCK, 2 * BLOCK)]),
                   9: pairs_of([(0, 3 * BLOCK)])})
    for dev, d in devs.items():
        d.write(store, 2, 0, b"q" * d.size, dev=dev)
    batch = pairs_of([(10, 100), (BLOCK - 5, 10), (7 * BLOCK, 2 * BLOCK)])
    got = bytes(store.read_batch(3, batch, bytearray(3 * BLOCK)))
    s = snapshots[3]
    assert got == s[10:110] + s[BLOCK - 5:BLOCK + 5] + s[7 * BLOCK:9 * BLOCK]
    assert read(store, 0, 3 * BLOCK, dev=9) == snapshots[9]


def test_bad_extents_and_backward_reads_are_refused():
    dev = Device(seed=7)
    store = armed(KeepAside({0: dev}))
    with pytest.raises(ValueError, match="ascending and disjoint"):
        store.install({0: pairs_of([(BLOCK, 10), (0, 10)])})
    with pytest.raises(ValueError, match="unknown device"):
        store.install({1: pairs_of([(0, 10)])})
    store.install({0: pairs_of([(0, SIZE)])})
    read(store, 2 * BLOCK, BLOCK)
    with pytest.raises(ValueError, match="go back"):
        read(store, 0, BLOCK)
    with pytest.raises(ValueError, match="mem_cap"):
        KeepAside({0: dev}, mem_cap=-1)


# -- the two races of issue 8 -----------------------------------------------------------------

def test_a_write_that_passed_needs_before_the_next_arm_does_not_keep_its_own_old_bytes():
    dev = Device(seed=8)
    store = armed(KeepAside({0: dev}))
    assert store.needs(2)               # a write W of cycle 2 passes needs() while 1 is armed...
    store.release()                     # ...then 1 commits
    store.arm(2)                        # and 2 is armed before W keeps
    store.keep(2, 0, 0, BLOCK)          # W keeps: it is of the armed cycle, so nothing
    os.pwrite(dev.fd, b"W" * BLOCK, 0)  # W lands
    store.drained()
    store.install({0: pairs_of([(0, BLOCK)])})
    assert read(store, 0, BLOCK) == b"W" * BLOCK


def test_a_keep_waits_until_the_writes_of_the_armed_cycle_have_landed():
    dev = Device(seed=9)
    store = KeepAside({0: dev}, drain_wait=30)
    store.arm(1)                        # a write A of cycle 1 is still in flight at the RP
    later = threading.Thread(target=dev.write, args=(store, 2, 0, b"B" * 10))
    later.start()                       # B, of cycle 2, shares A's block
    later.join(0.2)
    waited = later.is_alive()
    started = time.monotonic()
    dev.write(store, 1, 100, b"A" * 10)  # A lands; a write of the armed cycle never waits
    assert time.monotonic() - started < 1
    store.drained()
    later.join(JOIN)
    assert not later.is_alive()
    store.install({0: pairs_of([(100, 10)])})
    assert read(store, 100, 10) == b"A" * 10 and store.point_in_time
    assert waited, "B kept its block before cycle 1 drained"


def test_a_drain_that_takes_too_long_degrades_instead_of_blocking_the_host():
    dev = Device(seed=10)
    store = KeepAside({0: dev}, drain_wait=0.2)
    store.arm(1)
    started = time.monotonic()
    dev.write(store, 2, 0, b"x" * 10)
    assert 0.15 < time.monotonic() - started < JOIN
    assert not store.point_in_time and "still not drained" in store.degraded
    assert not store.needs(2)
    store.release()
    assert store.point_in_time and store.degraded is None


def test_release_wakes_a_keep_waiting_for_the_drain():
    dev = Device(seed=11)
    store = KeepAside({0: dev}, drain_wait=30)
    store.arm(1)
    waiting = threading.Thread(target=store.keep, args=(2, 0, 0, 10))
    waiting.start()
    waiting.join(0.1)
    store.release()
    waiting.join(JOIN)
    assert not waiting.is_alive() and store.stats()["blocks"] == 0


# -- faults degrade, never fail the write -----------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "tiny"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def assert_degraded(store, dev, words):
    reason = store.degraded
    assert not store.point_in_time and reason and "\n" not in reason and words in reason, reason
    stats = store.stats()
    assert stats["blocks"] == stats["mem_bytes"] == stats["spill_bytes"] == 0
    assert stats["degraded"] == reason and not store.needs(stats["cycle"] + 1)
    assert read(store, 0, dev.size) == dev.image()          # reads pass through


def test_a_full_spill_file_system_degrades_instead_of_failing_writes(tiny_tmpfs):
    dev = Device(size=64 * BLOCK, seed=12)
    store = armed(KeepAside({0: dev}, mem_cap=0, spill_dir=tiny_tmpfs), 1, [(0, dev.size)])
    for offset in range(0, dev.size, BLOCK):
        dev.write(store, 2, offset, b"n" * BLOCK)           # never raises
        assert store.stats()["spill_bytes"] <= 64 << 10
    assert_degraded(store, dev, "No space left on device")
    store.release()
    assert store.point_in_time and store.degraded is None
    store.arm(2)                                            # the next cycle keeps again
    store.drained()
    dev.write(store, 3, 0, b"m" * BLOCK)
    assert store.stats()["spill_bytes"] == BLOCK and store.point_in_time
    store.release()                                         # closes the spill file before umount


def test_reaching_the_spill_cap_degrades():
    dev = Device(seed=13)
    store = armed(KeepAside({0: dev}, mem_cap=2 * BLOCK, spill_cap=3 * BLOCK), 1, [(0, SIZE)])
    for block in range(5):
        dev.write(store, 2, block * BLOCK, b"c" * BLOCK)
    stats = store.stats()
    assert (stats["blocks"], stats["mem_bytes"], stats["spill_bytes"]) == (5, 2 * BLOCK, 3 * BLOCK)
    dev.write(store, 2, 5 * BLOCK, b"c")
    assert_degraded(store, dev, "spill file full at 12.0 KiB")


def test_no_memory_and_no_spill_degrades_at_the_first_keep():
    dev = Device(seed=14)
    store = armed(KeepAside({0: dev}, mem_cap=0, spill_cap=0))
    dev.write(store, 2, 0, b"z")
    assert_degraded(store, dev, "spilling is off")


def test_a_spill_directory_that_cannot_hold_a_file_degrades(tmp_path):
    dev = Device(seed=15)
    store = armed(KeepAside({0: dev}, mem_cap=0, spill_dir=str(tmp_path / "missing")))
    dev.write(store, 2, 0, b"z")
    assert_degraded(store, dev, "cannot create a spill file")


def test_a_source_that_cannot_be_read_degrades():
    good = Device(seed=16)
    path = f"/proc/self/fd/{good.fd}"
    broken = Device(seed=None, fd=os.open(path, os.O_WRONLY))  # pread answers EBADF
    broken.read = good.read
    store = armed(KeepAside({0: broken}))
    broken.write(store, 2, 0, b"z")
    assert_degraded(store, good, "reading source 0")


# -- cost ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [1, 3000, 40000])
def test_the_index_costs_at_most_its_stated_bytes_per_kept_block(blocks):
    dev = Device(size=blocks * BLOCK, seed=None)             # sparse: reads as zeros
    store = armed(KeepAside({0: dev}, mem_cap=blocks * BLOCK // 2))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for block in range(blocks):
            store.keep(2, 0, block * BLOCK, 1)
        python_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = store.stats()
    assert stats["blocks"] == blocks
    assert stats["mem_bytes"] + stats["spill_bytes"] == blocks * BLOCK
    assert stats["index_bytes"] <= index_bound(blocks, 1), stats
    assert python_bytes < 16 << 10, "keeping allocated Python objects per block"


# -- whole cycles: a stateful model ------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Write:
    cycle: int
    dev: int
    offset: int
    payload: bytes
    needs: bool
    state: str = "begun"            # begun -> keeping -> kept; landed writes leave the list
    thread: threading.Thread | None = None


class KeepAsideMachine(RuleBasedStateMachine):
    """arm -> (writes tagged armed or armed+1, each split in begin/keep/land) -> close -> drained
    -> install -> batches of reads -> commit (check, release) -> arm ..., against the RP images.

    A write's keep runs on its own thread: a keep that must wait for the drain blocks there
    until the ``drained`` rule, as a host write would. Model rules only let a write land once
    its keep has returned, and only end a drain once every write of the armed cycle landed.
    """

    store_class = KeepAside
    SIZES = {0: 6 * BLOCK + 123, 5: 3 * BLOCK}

    def __init__(self):
        super().__init__()
        self.devices = {dev: Device(size, seed=dev) for dev, size in self.SIZES.items()}
        self.initial = {dev: d.image() for dev, d in self.devices.items()}
        self.replica = {dev: bytearray(image) for dev, image in self.initial.items()}
        self.log = []               # landed writes: (cycle, dev, offset, payload), in order
        self.open = 1               # the tracker's open cycle
        self.armed = None
        self.closed = self.drained_ = self.installed = False
        self.batches = []
        self.writes = []
        self.count = 0
        self.store = None

    @initialize(mem_cap=st.sampled_from([0, 2 * BLOCK, 1 << 20]),
                spill_cap=st.sampled_from([0, 3 * BLOCK, 1 << 20]))
    def make_store(self, mem_cap, spill_cap):
        self.mem_cap, self.spill_cap = mem_cap, spill_cap
        self.store = self.store_class(self.devices, mem_cap=mem_cap, spill_cap=spill_cap, drain_wait=60)

    def teardown(self):
        if self.store is not None:
            self.store.release()    # wakes keeps still waiting for a drain
        for w in self.writes:
            if w.thread is not None:
                w.thread.join(JOIN)
        for d in self.devices.values():
            d.close()

    def image(self, cycle, dev):
        out = bytearray(self.initial[dev])
        for c, d, offset, payload in self.log:
            if c <= cycle and d == dev:
                out[offset:offset + len(payload)] = payload
        return out

    def may_block(self, w):
        """A keep of ``w`` waits for the drain now."""
        return (self.armed is not None and w.cycle > self.armed and not self.drained_
                and self.store.point_in_time)

    def finish_keep(self, w):
        w.thread.join(JOIN)
        assert not w.thread.is_alive(), "keep did not return"
        w.state = "kept"

    # writes

    @precondition(lambda self: self.store is not None and len(self.writes) < 6)
    @rule(dev=st.sampled_from(sorted(SIZES)), data=st.data())
    def begin(self, dev, data):
        size = self.SIZES[dev]
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(2 * BLOCK + 10, size - offset)), label="length")
        self.count += 1
        payload = random.Random(self.count).randbytes(length)
        w = Write(self.open, dev, offset, payload, self.store.needs(self.open))
        assert w.needs == (self.armed is not None and self.store.point_in_time and w.cycle > self.armed)
        self.writes.append(w)

    @precondition(lambda self: any(w.state == "begun" and w.needs for w in self.writes))
    @rule(data=st.data())
    def keep(self, data):
        w = data.draw(st.sampled_from([w for w in self.writes if w.state == "begun" and w.needs]))
        w.thread = threading.Thread(target=self.store.keep,
                                    args=(w.cycle, w.dev, w.offset, len(w.payload)), daemon=True)
        w.state = "keeping"
        w.thread.start()
        if not self.may_block(w):
            self.finish_keep(w)

    @precondition(lambda self: any(w.state == "kept" or (w.state == "begun" and not w.needs)
                                   for w in self.writes))
    @rule(data=st.data())
    def land(self, data):
        w = data.draw(st.sampled_from([w for w in self.writes
                                       if w.state == "kept" or (w.state == "begun" and not w.needs)]))
        os.pwrite(self.devices[w.dev].fd, w.payload, w.offset)
        self.log.append((w.cycle, w.dev, w.offset, w.payload))
        self.writes.remove(w)

    # the cycle

    @precondition(lambda self: self.store is not None and self.armed is None)
    @rule()
    def arm(self):
        self.store.arm(self.open)
        self.armed = self.open
        self.closed = self.drained_ = self.installed = False

    @precondition(lambda self: self.armed is not None and not self.closed)
    @rule()
    def close(self):
        self.open += 1
        self.closed = True

    @precondition(lambda self: self.closed and not self.drained_
                  and all(w.cycle > self.armed for w in self.writes))
    @rule()
    def drained(self):
        self.store.drained()
        self.drained_ = True
        for w in self.writes:
            if w.state == "keeping":
                self.finish_keep(w)

    @precondition(lambda self: self.drained_ and not self.installed)
    @rule(data=st.data())
    def install(self, data):
        report = {dev: merged((o, len(p)) for c, d, o, p in self.log if c == self.armed and d == dev)
                  for dev in self.devices}
        self.store.install({dev: pairs_of(extents) for dev, extents in report.items()})
        self.installed = True
        self.batches = []
        for dev, extents in report.items():
            longest = data.draw(st.sampled_from([1, 100, BLOCK, 3 * BLOCK + 7]), label="segment")
            segments = [(o + at, min(longest, n - at)) for o, n in extents for at in range(0, n, longest)]
            while segments:
                count = data.draw(st.integers(1, 4), label="batch")
                self.batches.append((dev, segments[:count]))
                segments = segments[count:]

    @precondition(lambda self: self.installed and self.batches)
    @rule()
    def read(self):
        dev, segments = self.batches.pop(0)
        total = sum(n for _, n in segments)
        view = self.store.read_batch(dev, pairs_of(segments), bytearray(total + 17))
        assert len(view) == total
        pos = 0
        for offset, length in segments:
            self.replica[dev][offset:offset + length] = view[pos:pos + length]
            pos += length

    @precondition(lambda self: self.installed and not self.batches)
    @rule()
    def commit(self):
        if self.store.point_in_time:
            for dev, replica in self.replica.items():
                want = self.image(self.armed, dev)
                assert replica == want, (f"cycle {self.armed}: device {dev} differs from its RP "
                                         f"image at byte {first_difference(replica, want)}")
        self.store.release()
        assert self.store.point_in_time and self.store.stats()["blocks"] == 0
        self.armed = None
        self.closed = self.drained_ = self.installed = False

    @invariant()
    def bounded_and_consistent(self):
        if self.store is None:
            return
        stats = self.store.stats()
        assert 0 <= stats["mem_bytes"] <= self.mem_cap and 0 <= stats["spill_bytes"] <= self.spill_cap
        assert stats["cycle"] == self.armed
        assert (stats["degraded"] is None) == self.store.point_in_time
        if stats["degraded"] is not None:
            assert stats["blocks"] == stats["mem_bytes"] == stats["spill_bytes"] == 0
        keeping = self.armed is not None and self.store.point_in_time
        assert self.store.needs(self.open) == (keeping and self.open > self.armed)
        assert not self.store.needs(self.armed or 0)


KeepAsideMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestKeepAsideMachine = KeepAsideMachine.TestCase


# -- whole cycles: threads, the real tracker ---------------------------------------------------

def stress(store_class, seconds=4.0, cycles=400, writers=3, seed=0, **store_args):
    """Writer threads and a controller thread over the real Tracker; returns (cycles checked,
    failures). Landing (the back-end write and its log entry) is serialised so the landing order,
    hence each RP image, is known; everything else runs concurrently.
    """
    sizes = {0: 24 * BLOCK + 100, 1: 6 * BLOCK}
    devices = {dev: Device(size, seed=seed + dev) for dev, size in sizes.items()}
    initial = {dev: d.image() for dev, d in devices.items()}
    tracker = Tracker(shards=2)
    store = store_class(devices, drain_wait=30, **store_args)
    landing = threading.Lock()
    log = []
    failures = []
    stop = threading.Event()

    def writer(n):
        rng = random.Random(seed * 100 + n)
        count = 0
        while not stop.is_set():
            count += 1
            dev = rng.choice(sorted(sizes))
            offset = rng.randrange(sizes[dev])
            length = rng.randint(1, min(3 * BLOCK, sizes[dev] - offset))
            payload = bytes([(n * 61 + count) % 256]) * length   # a generation pattern
            cycle = tracker.begin()
            try:
                if store.needs(cycle):
                    store.keep(cycle, dev, offset, length)
                if rng.random() < 0.5:
                    time.sleep(0)                                # widen the race windows
                with landing:
                    os.pwrite(devices[dev].fd, payload, offset)
                    log.append((cycle, dev, offset, payload))
            except BaseException as e:
                failures.append(f"writer {n}: {e!r}")
                raise
            finally:
                tracker.end(cycle, dev, KIND_DATA, offset, length)

    floor = {dev: bytearray(image) for dev, image in initial.items()}
    replica = {dev: bytearray(image) for dev, image in initial.items()}
    applied = 0
    checked = 0
    rng = random.Random(seed)
    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(writers)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    deadline = time.monotonic() + seconds
    try:
        for t in threads:
            t.start()
        for _ in range(cycles):
            if time.monotonic() > deadline or failures:
                break
            cycle = tracker.cycle
            store.arm(cycle)
            closed = tracker.close_cycle(timeout=30)
            assert closed.cycle == cycle
            store.drained()
            report = {dev: merged(zip(closed.entries(dev, KIND_DATA).cast("Q")[0::2],
                                      closed.entries(dev, KIND_DATA).cast("Q")[1::2]))
                      for dev in devices}
            store.install({dev: pairs_of(extents) for dev, extents in report.items()})
            for dev, extents in report.items():
                longest = rng.choice([512, BLOCK, 5 * BLOCK])
                segments = [(o + at, min(longest, n - at)) for o, n in extents for at in range(0, n, longest)]
                for at in range(0, len(segments), 3):
                    batch = segments[at:at + 3]
                    view = store.read_batch(dev, pairs_of(batch), bytearray(sum(n for _, n in batch)))
                    pos = 0
                    for offset, length in batch:
                        replica[dev][offset:offset + length] = view[pos:pos + length]
                        pos += length
                    time.sleep(0)
            with landing:
                landed = log[applied:]
            # Writes of cycles up to this one all landed before close_cycle returned; move the
            # floor image over the prefix of the log that holds only such writes.
            while landed and landed[0][0] <= cycle:
                c, dev, offset, payload = landed.pop(0)
                floor[dev][offset:offset + len(payload)] = payload
                applied += 1
            if store.point_in_time:
                for dev in devices:
                    want = bytearray(floor[dev])
                    for c, d, offset, payload in landed:
                        if c <= cycle and d == dev:
                            want[offset:offset + len(payload)] = payload
                    if replica[dev] != want:
                        failures.append(f"cycle {cycle}: device {dev} differs from its RP image at "
                                        f"byte {first_difference(replica[dev], want)}")
                checked += 1
            store.release()
    finally:
        stop.set()
        store.release()
        for t in threads:
            t.join(JOIN)
        sys.setswitchinterval(switch)
        for d in devices.values():
            d.close()
    assert not any(t.is_alive() for t in threads), "a writer is stuck"
    return checked, failures, store.stats()["kept_blocks_total"]


@pytest.mark.parametrize("store_args", [{}, {"mem_cap": 0, "spill_dir": tempfile.gettempdir()}],
                         ids=["memory", "spill"])
def test_every_copied_cycle_is_its_rp_image_under_concurrent_writers(store_args):
    checked, failures, kept = stress(KeepAside, **store_args)
    assert not failures, failures[0]
    assert checked >= 20 and kept > 0, (checked, kept)
