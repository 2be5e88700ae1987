"""Unit tests for the report (merging B-tree), the SGL and subtract."""
import array
import threading

import numpy as np
import pytest

from reporter import MergingBTree, sgl_batches, subtract

KIB = 1024
LAST = 2**64 - 1

# FIG. 6: writes 1-3 disjoint and non-adjacent, 4 envelops 2, 5 overlaps part of 4 and envelops 3.
W1, W2, W3 = (100, 50), (300, 40), (500, 60)
W4 = (280, 100)
W5 = (350, 250)


def test_fig6_report_after_each_write():
    tree = MergingBTree(order=2)
    reports = []
    for write in (W1, W2, W3, W4, W5):
        tree.insert(*write)
        reports.append(tree.extents())
    assert reports == [
        [W1],
        [W1, W2],
        [W1, W2, W3],            # disjoint and non-adjacent: one RE each
        [W1, W4, W3],            # 4 envelops 2: its RE replaces 2's
        [W1, (280, 600 - 280)],  # 5 overlaps 4 and envelops 3: one RE from 4's start to 5's end
    ]


def test_fig7_states_and_final_report():
    tree = MergingBTree(order=2)
    states = []
    for write in (W1, W2, W3, W4, W5):
        tree.insert(*write)
        tree.check()
        states.append((len(tree), tree.height))
    assert states == [(1, 1), (2, 1), (3, 2), (3, 2), (2, 1)]
    (o1, l1), (o4, _), (o5, l5) = W1, W4, W5
    assert tree.extents() == [(o1, l1), (o4, (o5 - o4) + l5)]
    assert tree.nodes == 1
    assert tree.bytes_covered == l1 + (o5 - o4) + l5


def test_fig7_state_80_3_is_a_split_with_e2_promoted():
    tree = MergingBTree(order=2)
    for write in (W1, W2, W3):
        tree.insert(*write)
    assert (tree.nodes, tree.height) == (3, 2)
    assert tree.extents() == [W1, W2, W3]


def test_fig7_batch_gives_the_same_report():
    tree = MergingBTree(order=2)
    tree.insert_batch(np.array([W1, W2, W3, W4, W5], dtype=np.uint64))
    tree.check()
    assert tree.extents() == [(100, 50), (280, 320)]


@pytest.mark.parametrize("write", [(90, 10), (150, 10), (95, 5), (150, 1), (90, 70)])
def test_adjoining_writes_merge(write):
    tree = MergingBTree(order=2)
    tree.insert(100, 50)
    tree.insert(*write)
    tree.check()
    start, end = min(100, write[0]), max(150, sum(write))
    assert tree.extents() == [(start, end - start)]


def test_write_bridging_two_res_by_adjoining_both_merges_three():
    tree = MergingBTree(order=2)
    tree.insert(0, 10)
    tree.insert(20, 10)
    tree.insert(10, 10)
    assert tree.extents() == [(0, 30)]
    assert len(tree) == 1


def test_gap_of_one_byte_does_not_merge():
    tree = MergingBTree(order=2)
    tree.insert(0, 10)
    tree.insert(11, 10)
    assert tree.extents() == [(0, 10), (11, 10)]


@pytest.mark.parametrize("order", [2, 3, 4, 5, 32])
def test_one_write_swallows_res_across_nodes_and_levels(order):
    tree = MergingBTree(order=order)
    for i in range(1000):
        tree.insert(10 * i, 5)
    tall = tree.height
    tree.insert(3, 10 * 998)
    tree.check()
    assert tall >= 2
    assert tree.extents() == [(0, 9985), (9990, 5)]
    assert tree.height == 1


def test_100k_disjoint_res_at_order_32_stay_shallow():
    rng = np.random.default_rng(7)
    offsets = rng.permutation(100_000).astype(np.uint64) * np.uint64(8 * KIB)
    pairs = np.column_stack([offsets, np.full(100_000, 4 * KIB, dtype=np.uint64)])
    tree = MergingBTree(order=32)
    tree.insert_batch(pairs)
    tree.check()
    assert len(tree) == 100_000
    assert tree.height <= 4
    assert tree.bytes_covered == 100_000 * 4 * KIB


def test_batch_spanning_several_sort_chunks_equals_single_inserts():
    rng = np.random.default_rng(11)
    count = 150_000
    pairs = np.column_stack([rng.integers(0, 4 * count, count, dtype=np.uint64),
                             rng.integers(1, 4, count, dtype=np.uint64)])
    batch, single = MergingBTree(order=8), MergingBTree(order=8)
    batch.insert_batch(pairs)
    for offset, length in pairs.tolist():
        single.insert(offset, length)
    batch.check()
    assert batch.extents() == single.extents()
    assert 1000 < len(batch) < count


def test_sequential_appends_shallow_and_valid_for_both_policies():
    for split in ("count", "range"):
        tree = MergingBTree(order=3, split=split)
        for i in range(2000):
            tree.insert(2 * i, 1)
        tree.check()
        assert len(tree) == 2000
        assert tree.height <= 11


def test_memory_bytes_follows_the_stated_node_costs():
    tree = MergingBTree(order=32)
    empty = tree.memory_bytes
    tree.insert(0, 1)
    leaf = tree.memory_bytes - empty
    assert leaf == 16 + 16 * 33
    for i in range(1, 33):
        tree.insert(2 * i, 1)
    assert tree.nodes == 3
    internal = 16 + 16 * 33 + 8 * 34
    assert tree.memory_bytes == empty + 2 * leaf + internal
    tree.clear()
    assert tree.memory_bytes == empty


def test_clear_empties_and_tree_is_reusable():
    tree = MergingBTree(order=4)
    for i in range(100):
        tree.insert(3 * i, 1)
    tree.clear()
    tree.check()
    assert (len(tree), tree.height, tree.nodes, tree.bytes_covered) == (0, 0, 0, 0)
    assert tree.extents() == []
    tree.insert(5, 5)
    assert tree.extents() == [(5, 5)]


def test_top_of_the_address_space():
    tree = MergingBTree(order=2)
    tree.insert(LAST - 1, 1)
    tree.insert(0, LAST - 1)
    tree.check()
    assert tree.extents() == [(0, LAST)]
    assert tree.bytes_covered == LAST


@pytest.fixture
def populated():
    tree = MergingBTree(order=3)
    for i in range(50):
        tree.insert(10 * i, 3)
    return tree


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((-1, 5), ValueError, "offset must be >= 0"),
        ((5, 0), ValueError, "length must be >= 1"),
        ((5, -3), ValueError, "length must be >= 1"),
        ((LAST, 1), ValueError, "overflows"),
        ((2**64, 1), ValueError, "overflows"),
        ((True, 5), TypeError, "not bool"),
        ((5, False), TypeError, "not bool"),
        ((1.0, 5), TypeError, "not float"),
        (("1", 5), TypeError, "not str"),
    ],
)
def test_insert_rejects_bad_input_and_changes_nothing(populated, args, error, message):
    before = populated.extents()
    with pytest.raises(error, match=message):
        populated.insert(*args)
    assert populated.extents() == before
    populated.check()


def test_insert_accepts_numpy_integers(populated):
    populated.insert(np.uint64(1000), np.int32(1))
    assert populated.extents()[-1] == (1000, 1)


@pytest.mark.parametrize(
    "pairs, index, message",
    [
        ([(1, 1), (5, 2), (9, 0)], 2, "length is 0"),
        ([(0, 0), (5, 2)], 0, "length is 0"),
        ([(1, 1), (LAST, 1), (3, 3)], 1, "overflows"),
        ([(1, 1), (2, 1), (LAST - 5, 6)], 2, "overflows"),
    ],
)
def test_insert_batch_names_the_bad_pair_and_changes_nothing(populated, pairs, index, message):
    before = populated.extents()
    with pytest.raises(ValueError, match=f"pair {index}: .*{message}"):
        populated.insert_batch(array.array("Q", [v for pair in pairs for v in pair]))
    assert populated.extents() == before
    populated.check()


@pytest.mark.parametrize(
    "make",
    [
        lambda words: bytes(array.array("Q", words)),
        lambda words: bytearray(array.array("Q", words)),
        lambda words: memoryview(array.array("Q", words)),
        lambda words: array.array("Q", words),
        lambda words: np.array(words, dtype=np.uint64),
        lambda words: np.array(words, dtype=np.uint64).reshape(-1, 2),
    ],
)
def test_insert_batch_accepts_every_buffer_kind(make):
    tree = MergingBTree(order=2)
    tree.insert_batch(make([0, 10, 10, 5, 40, 2, 30, 1]))
    assert tree.extents() == [(0, 15), (30, 1), (40, 2)]


@pytest.mark.parametrize(
    "pairs, error, message",
    [
        (np.array([1.0, 2.0]), TypeError, "native uint64"),
        (array.array("I", [1, 2, 3, 4]), TypeError, "native uint64"),
        (np.array([1, 2], dtype=">u8"), TypeError, "native uint64"),
        (b"\x01" * 24, ValueError, "16-byte pairs"),
        (np.arange(8, dtype=np.uint64)[::2], ValueError, "contiguous"),
        ([1, 2], TypeError, "bytes-like"),
    ],
)
def test_insert_batch_rejects_bad_buffers(populated, pairs, error, message):
    before = populated.extents()
    with pytest.raises(error, match=message):
        populated.insert_batch(pairs)
    assert populated.extents() == before


def test_insert_batch_of_nothing_is_a_no_op(populated):
    before = populated.extents()
    populated.insert_batch(b"")
    assert populated.extents() == before


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"order": 1}, ValueError),
        ({"order": 0}, ValueError),
        ({"order": 65537}, ValueError),
        ({"order": True}, TypeError),
        ({"order": 2.5}, TypeError),
        ({"split": "middle"}, ValueError),
        ({"split": None}, ValueError),
    ],
)
def test_constructor_rejects_bad_parameters(kwargs, error):
    with pytest.raises(error):
        MergingBTree(**kwargs)


def test_threads_inserting_at_once_lose_nothing():
    tree = MergingBTree(order=4)
    chunks = [np.array([(2 * (k + 4 * i), 1) for i in range(5000)], dtype=np.uint64)
              for k in range(4)]

    def work(chunk):
        tree.insert_batch(chunk)
        for off, length in chunk[:200].tolist():
            tree.insert(off + 1, length)

    threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    tree.check()
    assert tree.bytes_covered == 4 * 5000 + 4 * 200
    assert tree.extents() == [(0, 1601)] + [(2 * j, 1) for j in range(801, 20000)]


def test_repr_names_the_shape():
    tree = MergingBTree(order=5, split="range")
    tree.insert(0, 1)
    assert repr(tree) == "MergingBTree(order=5, split='range'): 1 REs, height 1, 1 nodes"


# ---- SGL ------------------------------------------------------------------------------

def segments(extents, max_segment=None, batch_bytes=1 << 62, batch_segments=1 << 30):
    """The SGL of ``extents`` as (offset, length) tuples, batch boundaries dropped."""
    batches = sgl_batches(array.array("Q", [v for e in extents for v in e]), max_segment,
                          batch_bytes, batch_segments)
    return [(b[i], b[i + 1]) for b in batches for i in range(0, len(b), 2)]


def test_sgl_cuts_long_extents():
    assert segments([(0, 10), (20, 3), (30, 8)], max_segment=4) == [
        (0, 4), (4, 4), (8, 2), (20, 3), (30, 4), (34, 4)]


def test_sgl_without_limit_is_the_extents():
    assert segments([(0, 10), (50, 5)]) == [(0, 10), (50, 5)]


def test_sgl_segments_cover_exactly_the_extents():
    extents = [(i * 1000, 1 + i * 37) for i in range(20)]
    cut = segments(extents, max_segment=64)
    assert all(1 <= n <= 64 for _, n in cut)
    assert sum(n for _, n in cut) == sum(n for _, n in extents)
    rebuilt = MergingBTree()
    for seg in cut:
        rebuilt.insert(*seg)
    assert rebuilt.extents() == extents


def test_sgl_batches_hold_at_most_their_bytes_and_segments():
    pairs = array.array("Q", [v for i in range(10) for v in (i * 100, 40)])
    by_bytes = list(sgl_batches(pairs, None, 100, 1000))
    assert [list(b) for b in by_bytes] == [list(pairs[k:k + 4]) for k in range(0, 20, 4)]
    by_count = list(sgl_batches(pairs, None, 1 << 30, 3))
    assert [len(b) // 2 for b in by_count] == [3, 3, 3, 1]
    alone = list(sgl_batches(array.array("Q", [0, 500, 1000, 10]), None, 100, 10))
    assert [list(b) for b in alone] == [[0, 500], [1000, 10]], "a longer segment is a batch of its own"


@pytest.mark.parametrize("bad", [0, -4])
def test_sgl_rejects_bad_max_segment(bad):
    with pytest.raises(ValueError, match="max_segment must be >= 1"):
        list(sgl_batches(array.array("Q", [0, 10]), bad, 100, 10))


# ---- subtract -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "extents, holes, expected",
    [
        ([(0, 100)], [], [(0, 100)]),
        ([], [(0, 100)], []),
        ([(0, 100)], [(10, 5), (15, 5), (50, 60)], [(0, 10), (20, 30)]),
        ([(0, 10), (20, 10)], [(5, 20)], [(0, 5), (25, 5)]),
        ([(0, 10), (10, 10)], [], [(0, 20)]),
        ([(10, 10)], [(0, 10), (20, 5)], [(10, 10)]),
        ([(10, 10)], [(0, 30)], []),
        ([(0, 10), (20, 10), (40, 10)], [(5, 40)], [(0, 5), (45, 5)]),
    ],
)
def test_subtract(extents, holes, expected):
    assert subtract(extents, holes) == expected


def test_subtract_zero_ranges_minus_data_writes():
    zeros, data = MergingBTree(), MergingBTree()
    zeros.insert(0, 1 << 20)
    data.insert(4096, 4096)
    data.insert(1 << 20, 4096)
    assert subtract(zeros.extents(), data.extents()) == [(0, 4096), (8192, (1 << 20) - 8192)]


def test_subtract_rejects_unsorted_input():
    with pytest.raises(ValueError, match="holes are not sorted"):
        subtract([(0, 10)], [(5, 1), (0, 1)])
    with pytest.raises(ValueError, match="extents are not sorted"):
        subtract([(0, 10), (5, 10)], [])
