"""Keep-aside: whatever N+1 writes while N is copied, the copier reads N's bytes as of the RP."""
import array
import random

from hypothesis import given, settings, strategies as st

from copier.keepaside import BLOCK, KeepAside

SIZE = 16 * BLOCK + 123   # a partial last block


class Device:
    """A bytearray back end with the KeepAside device interface."""

    size = SIZE

    def __init__(self, seed):
        self.data = bytearray(random.Random(seed).randbytes(SIZE))

    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])

    def read_batch(self, pairs, into):
        data = b"".join(self.read(o, n) for o, n in zip(pairs[0::2], pairs[1::2]))
        into[:len(data)] = data


    def write(self, store, offset, payload):
        store.keep(0, offset, len(payload))
        self.data[offset:offset + len(payload)] = payload


def read(store, offset, length):
    """The copier's read of one segment."""
    return bytes(store.read_batch(0, array.array("Q", [offset, length]), bytearray(length)))


extent = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * BLOCK)).map(
    lambda e: (e[0], min(e[1], SIZE - e[0])))


def disjoint(extents):
    out, end = [], -1
    for off, n in sorted(extents):
        if off > end:
            out.append((off, n))
            end = off + n
    return out


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), report=st.lists(extent, min_size=1, max_size=8),
       writes=st.lists(extent, max_size=30), install_after=st.integers(0, 30),
       mem_cap=st.sampled_from([0, 2 * BLOCK, 1 << 20]))
def test_copier_reads_the_snapshot_whatever_is_written_meanwhile(seed, report, writes, install_after, mem_cap):
    dev = Device(seed)
    store = KeepAside({0: dev}, mem_cap=mem_cap)
    snapshot = bytes(dev.data)
    report = disjoint(report)
    store.arm(1)
    assert store.needs(2) and not store.needs(1)
    rng = random.Random(seed)
    ops = [("write", w) for w in writes]
    reads = [("read", r) for r in report]
    # Interleave writes with the in-order reads; install the report somewhere in between.
    merged = sorted(ops + reads, key=lambda op: rng.random())
    reads_iter = iter(report)
    installed = False
    for step, (kind, _) in enumerate(merged):
        if step == install_after and not installed:
            store.install({0: report})
            installed = True
        if kind == "write":
            off, n = writes.pop(0)
            dev.write(store, off, rng.randbytes(n))
        else:
            if not installed:
                store.install({0: report})
                installed = True
            off, n = next(reads_iter)
            assert read(store, off, n) == snapshot[off:off + n]
        stats = store.stats()
        assert stats["mem_bytes"] <= max(mem_cap, 0) and stats["mem_bytes"] >= 0
    store.release()
    assert store.stats()["blocks"] == 0 and not store.needs(2)


def test_only_pending_unread_blocks_are_kept():
    dev = Device(1)
    store = KeepAside({0: dev})
    store.arm(5)
    store.install({0: [(0, 2 * BLOCK), (8 * BLOCK, BLOCK)]})
    dev.write(store, 4 * BLOCK, b"x" * BLOCK)          # outside the report: nothing to keep
    assert store.stats()["blocks"] == 0
    read(store, 0, 2 * BLOCK)                            # the copier is past the first extent
    dev.write(store, 0, b"y" * 2 * BLOCK)                # already read: nothing to keep
    assert store.stats()["blocks"] == 0
    dev.write(store, 8 * BLOCK + 10, b"z")               # pending and unread: keep its block
    assert store.stats()["blocks"] == 1


def test_blocks_kept_before_the_report_are_dropped_when_outside_it():
    dev = Device(2)
    store = KeepAside({0: dev})
    store.arm(1)
    dev.write(store, 0, b"a" * (3 * BLOCK))              # report unknown yet: everything pending
    assert store.stats()["blocks"] == 3
    store.install({0: [(BLOCK, 10)]})
    assert store.stats()["blocks"] == 1


def test_spill_file_holds_blocks_past_the_memory_cap():
    dev = Device(3)
    store = KeepAside({0: dev}, mem_cap=BLOCK)
    snapshot = bytes(dev.data)
    store.arm(1)
    store.install({0: [(0, SIZE)]})
    dev.write(store, 0, b"w" * SIZE)
    stats = store.stats()
    assert stats["mem_bytes"] == BLOCK and stats["spill_bytes"] == SIZE - BLOCK
    assert read(store, 0, SIZE) == snapshot
