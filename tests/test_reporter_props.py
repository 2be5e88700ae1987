"""Property tests: the merging B-tree against a naive union oracle, invariants after every step."""
import array
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import union_extents
from reporter import MergingBTree, sgl_batches, subtract

LAST = 2**64 - 1


def covered_bytes(extents):
    return {b for offset, length in extents for b in range(offset, offset + length)}


orders = st.one_of(st.integers(2, 5), st.integers(2, 64))
splits = st.sampled_from(["count", "range"])


def _sequential(rng, count):
    at, writes = rng.randrange(2**40), []
    for _ in range(count):
        at += rng.choice((0, 0, 1, 2, 3))
        writes.append((at, rng.randint(1, 4)))
        at += writes[-1][1]
    return writes


def _random(rng, count):
    space = rng.choice((64, 4096, 2**40, LAST))
    offsets = (rng.randrange(space) for _ in range(count))
    return [(off, min(rng.randint(1, 64), LAST - off)) for off in offsets]


def _storm(rng, count):
    return [(rng.randint(0, count), rng.randint(1, 8)) for _ in range(count)]


def _reverse(rng, count):
    return _sequential(rng, count)[::-1]


BUILDERS = {"sequential": _sequential, "random": _random, "storm": _storm, "reverse": _reverse}


@st.composite
def bulk(draw):
    """Hundreds of writes of one kind, built from a drawn seed (lists alone stay short)."""
    build = BUILDERS[draw(st.sampled_from(sorted(BUILDERS)))]
    return build(random.Random(draw(st.integers(0, 2**32))), draw(st.integers(50, 400)))


@st.composite
def sequential(draw):
    """Ascending writes with small gaps, many of them adjoining (gap 0)."""
    at, writes = draw(st.integers(0, 2**40)), []
    for gap, length in draw(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=60)):
        at += gap
        writes.append((at, length))
        at += length
    return writes


@st.composite
def random_writes(draw):
    """Writes anywhere in a space from tiny to the whole 64-bit range."""
    space = draw(st.sampled_from([64, 4096, 2**40, LAST]))
    pairs = draw(st.lists(st.tuples(st.integers(0, space - 1), st.integers(1, 64)), max_size=60))
    return [(off, min(length, LAST - off)) for off, length in pairs if off < LAST]


@st.composite
def storm(draw):
    """Many overlapping writes packed into a small space."""
    return draw(st.lists(st.tuples(st.integers(0, 96), st.integers(1, 24)), max_size=60))


@st.composite
def reverse(draw):
    return list(reversed(draw(sequential())))


workloads = st.one_of(sequential(), random_writes(), storm(), reverse(), bulk(), bulk())


@settings(deadline=None, max_examples=300)
@given(order=orders, split=splits, writes=workloads)
def test_inserts_match_the_oracle_and_keep_invariants(order, split, writes):
    tree = MergingBTree(order=order, split=split)
    for step, write in enumerate(writes, 1):
        tree.insert(*write)
        tree.check()
        if step % 40 == 0:
            assert tree.extents() == union_extents(writes[:step])
    assert tree.extents() == union_extents(writes)
    expected = union_extents(writes)
    assert len(tree) == len(expected)
    assert tree.bytes_covered == sum(length for _, length in expected)


@settings(deadline=None, max_examples=150)
@given(order=orders, split=splits, writes=workloads)
def test_insert_batch_equals_single_inserts(order, split, writes):
    single, batch = MergingBTree(order=order, split=split), MergingBTree(order=order, split=split)
    for write in writes:
        single.insert(*write)
    batch.insert_batch(np.array(writes, dtype=np.uint64).reshape(-1, 2))
    batch.check()
    assert batch.extents() == single.extents() == union_extents(writes)
    assert (len(batch), batch.bytes_covered) == (len(single), single.bytes_covered)


@settings(deadline=None, max_examples=100)
@given(order=orders, first=workloads, second=workloads)
def test_batches_accumulate(order, first, second):
    tree = MergingBTree(order=order)
    for writes in (first, second):
        tree.insert_batch(np.array(writes, dtype=np.uint64).reshape(-1, 2))
        tree.check()
    assert tree.extents() == union_extents(first + second)


@settings(deadline=None, max_examples=150)
@given(extents=storm(), holes=storm())
def test_subtract_matches_set_difference(extents, holes):
    left, right = union_extents(extents), union_extents(holes)
    result = subtract(left, right)
    assert covered_bytes(result) == covered_bytes(left) - covered_bytes(right)
    assert result == union_extents(result)


@settings(deadline=None, max_examples=150)
@given(extents=storm(), max_segment=st.integers(1, 40))
def test_sgl_partitions_the_extents(extents, max_segment):
    merged = union_extents(extents)
    pairs = array.array("Q", [v for e in merged for v in e])
    segments = [(b[i], b[i + 1]) for b in sgl_batches(pairs, max_segment, 64, 3)
                for i in range(0, len(b), 2)]
    assert all(1 <= length <= max_segment for _, length in segments)
    assert segments == sorted(segments)
    assert union_extents(segments) == merged
    assert sum(length for _, length in segments) == sum(length for _, length in merged)


def test_long_mixed_runs_deep_trees():
    """Thousands of steps at small orders reach heights hypothesis's short lists do not."""
    rng = random.Random(12393603)
    for order, split in [(2, "count"), (3, "range"), (4, "count"), (5, "range"), (7, "count")]:
        tree, writes = MergingBTree(order=order, split=split), []
        for step in range(3000):
            if step % 500 < 300:
                write = (rng.randrange(0, 200_000, 3), rng.randint(1, 2))
            else:
                write = (rng.randrange(0, 200_000), rng.randint(1, 400))
            tree.insert(*write)
            writes.append(write)
            tree.check()
        assert tree.extents() == union_extents(writes)
