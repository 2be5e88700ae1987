"""The reporter: turns a cycle's TEs into its report and the report into an SGL.

``MergingBTree`` is the report of US 12,393,603 claims 5-11 (FIG. 6/7): a B-tree of REs
in which every TE either grows the REs it overlaps or adjoins into one RE, or becomes
a new RE.  The tree lives in C (``reporter/btree.c``, whose header comment is the theory
of operation); this module only checks arguments, holds a lock, and converts results.

``sgl_batches`` and ``subtract`` are the pure functions between the report and the copier:
the SGL cuts REs into copier-sized segments, in batches of one read and one send each, and
``subtract`` finds the zero/trim ranges that no data write touched, which are sent as
WRITE_ZEROES rather than as data. ``report`` builds a cycle's report from the tracker's TEs.

Sans-I/O: nothing here reads or writes a device.
"""
import array
import operator
import sys
import threading

from reporter._btree import ffi, lib

__all__ = ["MergingBTree", "sgl_batches", "subtract"]

_SPLITS = {"count": lib.RB_SPLIT_COUNT, "range": lib.RB_SPLIT_RANGE}
_MAX_ORDER = 65536
_LAST_BYTE = 2**64 - 1
_RAW_FORMATS = {"B", "b", "c"}
_U64_FORMATS = {"Q", "L", "@Q", "@L", "=Q", "=L"}
if sys.byteorder == "little":
    _U64_FORMATS |= {"<Q", "<L"}


def _integer(value, name):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def _extent(offset, length):
    offset = _integer(offset, "offset")
    length = _integer(length, "length")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if offset + length > _LAST_BYTE:
        raise ValueError(f"offset + length = {offset + length} overflows 2**64 - 1")
    return offset, length


def _batch_view(pairs):
    view = memoryview(pairs)
    raw = view.format in _RAW_FORMATS and view.itemsize == 1
    if not raw and not (view.format in _U64_FORMATS and view.itemsize == 8):
        raise TypeError(f"pairs must hold native uint64 (or raw bytes), not format {view.format!r}")
    if not view.c_contiguous:
        raise ValueError("pairs must be a C-contiguous buffer")
    if view.nbytes % 16:
        raise ValueError(f"pairs holds {view.nbytes} bytes, not a whole number of 16-byte pairs")
    return view


class MergingBTree:
    """The report of one cycle: a merging B-tree of REs (offset, length).

    Each node holds up to ``order`` REs and every node but the root at least
    ``order // 2``; all leaves are at the same depth.  A TE that overlaps or adjoins REs
    expands one of them to span all and removes the rest; otherwise it becomes a new RE.

    Memory (``memory_bytes``): a 56-byte tree header (64-bit build) plus, per node,
    16 + 16 * (order + 1) bytes for a leaf and that plus 8 * (order + 2) for an
    internal node: 16 bytes per RE slot, one spare slot per node for the overflow
    before a split.  At order 32 a leaf is 544 bytes, i.e. 17 to 34 bytes per RE
    depending on fill, and internal nodes add about 1/16 of that; measured: about
    25 bytes per RE for random TEs, 35 for strictly ascending ones.  Allocator overhead
    (about 16 bytes per node with glibc) is not included, nor the up to 2 MiB of scratch
    that ``insert_batch`` holds during the call.

    Thread-safe: a lock serialises calls, because the C calls run without the GIL.
    """

    def __init__(self, order=32, split="count"):
        """Empty report; ``order`` in [2, 65536], ``split`` "count" or "range".  O(1).

        "count" promotes the middle RE of a full node (claim 9).  "range" promotes the
        RE straddling the midpoint of the node's address span, clamped so that both
        halves keep ``order // 2`` REs; the clamp leaves room to differ only for odd
        orders.  Raises ValueError for any other value.
        """
        order = _integer(order, "order")
        if not 2 <= order <= _MAX_ORDER:
            raise ValueError(f"order must be in [2, {_MAX_ORDER}], got {order}")
        if split not in _SPLITS:
            raise ValueError(f"split must be 'count' or 'range', got {split!r}")
        tree = lib.rb_new(order, _SPLITS[split])
        if tree == ffi.NULL:
            raise MemoryError("cannot allocate a report")
        self._tree = ffi.gc(tree, lib.rb_free)
        self._lock = threading.Lock()
        self.order = order
        self.split = split

    def insert(self, offset, length):
        """Merge the TE [offset, offset + length) into the report.

        O(log n) plus O(log n) per RE it swallows, which is O(log n) amortised since
        each RE is swallowed at most once.  Raises TypeError for a bool or non-integer
        argument and ValueError for offset < 0, length < 1 or offset + length > 2**64 - 1;
        on error the tree is unchanged.
        """
        offset, length = _extent(offset, length)
        with self._lock:
            rc = lib.rb_insert(self._tree, offset, length)
        if rc == lib.RB_ENOMEM:
            raise MemoryError("out of memory; the report is unchanged")

    def insert_batch(self, pairs):
        """Merge many TEs, given as native uint64 (offset, length) pairs, in one C call.

        ``pairs`` is any C-contiguous buffer: bytes, bytearray, memoryview, array('Q'),
        a numpy uint64 array.  The GIL is released during the call.  The C core merges
        the pairs in chunks of 65536, each radix-sorted by offset first (same report,
        better cache locality; the node shapes may differ from one-by-one inserts).
        O(k log n) for k pairs.  All pairs are validated before any is merged: a length
        of 0 or an offset + length beyond 2**64 - 1 raises ValueError naming the pair's
        index and leaves the tree unchanged.  A buffer of other items raises TypeError;
        a size that is not a whole number of pairs raises ValueError.  Out of memory
        raises MemoryError; the pairs before the index it names were merged, some after
        it may have been, and the tree stays valid.
        """
        view = _batch_view(pairs)
        count = view.nbytes // 16
        if count == 0:
            return
        where = ffi.new("size_t *")
        with self._lock, ffi.from_buffer("uint64_t[]", view) as words:
            rc = lib.rb_insert_batch(self._tree, words, count, where)
        self._raise_batch(rc, where[0])

    @staticmethod
    def _raise_batch(rc, index):
        if rc == lib.RB_EZERO:
            raise ValueError(f"pair {index}: length is 0")
        if rc == lib.RB_EOVERFLOW:
            raise ValueError(f"pair {index}: offset + length overflows 2**64 - 1")
        if rc == lib.RB_ENOMEM:
            raise MemoryError(f"out of memory merging the pairs from index {index} on; "
                              "those before it were merged")

    def pairs(self):
        """The REs as one flat array('Q') of (offset, length) pairs: ascending, disjoint,
        non-adjacent. The form the copier and ``Report`` use; no Python object per RE.  O(n)."""
        with self._lock:
            out = array.array("Q", bytes(16 * lib.rb_count(self._tree)))
            if out:
                lib.rb_extents(self._tree, ffi.from_buffer("uint64_t[]", out))
        return out

    def extents(self):
        """The REs as (offset, length) tuples: ascending, disjoint, non-adjacent.  O(n)."""
        flat = self.pairs()
        return list(zip(flat[0::2], flat[1::2]))

    def _read(self, counter):
        with self._lock:
            return counter(self._tree)

    def __len__(self):
        """Number of REs.  O(1)."""
        return self._read(lib.rb_count)

    @property
    def height(self):
        """Number of levels: 0 when empty, 1 for a lone leaf.  O(1)."""
        return self._read(lib.rb_height)

    @property
    def nodes(self):
        """Number of nodes.  O(1)."""
        return self._read(lib.rb_nodes)

    @property
    def memory_bytes(self):
        """Bytes the C structures use; see the class docstring for the costs.  O(1)."""
        return self._read(lib.rb_memory)

    @property
    def bytes_covered(self):
        """Sum of the RE lengths.  O(1)."""
        return self._read(lib.rb_covered)

    def check(self):
        """Walk the whole tree; raise AssertionError naming the first broken invariant.

        Checks key order, disjoint non-adjacent REs of length >= 1, separators between
        subtrees, node fill bounds, child counts, equal leaf depth, and the counters
        behind len, nodes, memory_bytes and bytes_covered.  O(n).
        """
        message = ffi.new("char[]", 256)
        with self._lock:
            rc = lib.rb_check(self._tree, message, len(message))
        if rc:
            raise AssertionError(ffi.string(message).decode())

    def clear(self):
        """Drop every RE and free every node.  O(n)."""
        with self._lock:
            lib.rb_clear(self._tree)

    def __repr__(self):
        return (f"MergingBTree(order={self.order}, split={self.split!r}): "
                f"{len(self)} REs, height {self.height}, {self.nodes} nodes")


def _checked_extents(extents, name):
    """Yield (offset, end) of sorted, disjoint extents; ValueError otherwise."""
    last_end = -1
    for offset, length in extents:
        offset, length = _extent(offset, length)
        if offset < last_end:
            raise ValueError(f"{name} are not sorted and disjoint at offset {offset}")
        last_end = offset + length
        yield offset, last_end


def sgl_batches(pairs, max_segment, batch_bytes, batch_segments):
    """The SGL of ``pairs`` (a flat uint64 (offset, length) buffer, ascending and disjoint, as
    ``MergingBTree.pairs`` gives) in consecutive batches, each an array('Q') of at most
    ``batch_segments`` segments and ``batch_bytes`` bytes (a longer segment is a batch of its
    own), segments at most ``max_segment`` long: one batch is one read and one send call of
    the copier.  A generator.  O(n + segments).
    """
    max_segment = _max_segment(max_segment)
    batch, size = array.array("Q"), 0
    for offset, length in zip(pairs[0::2], pairs[1::2]):
        for at, n in _cut(offset, length, max_segment):
            if batch and (size + n > batch_bytes or len(batch) >= 2 * batch_segments):
                yield batch
                batch, size = array.array("Q"), 0
            batch.extend((at, n))
            size += n
    if batch:
        yield batch


def _max_segment(max_segment):
    if max_segment is None:
        return None
    max_segment = _integer(max_segment, "max_segment")
    if max_segment < 1:
        raise ValueError(f"max_segment must be >= 1, got {max_segment}")
    return max_segment


def _cut(offset, length, max_segment):
    step = length if max_segment is None else max_segment
    end = offset + length
    return ((at, min(step, end - at)) for at in range(offset, end, step))


def _append(out, start, end):
    if out and out[-1][0] + out[-1][1] == start:
        start = out.pop()[0]
    out.append((start, end - start))


def subtract(extents, holes):
    """``extents`` minus ``holes``: sorted, maximal (offset, length) extents.

    Both inputs are sorted lists of disjoint (offset, length) extents (ValueError
    otherwise).  The report's use: zero_extents minus data_extents are the ranges to
    send as WRITE_ZEROES.  O(n + m).
    """
    holes = list(_checked_extents(holes, "holes"))
    out, j = [], 0
    for start, end in _checked_extents(extents, "extents"):
        while j < len(holes) and holes[j][1] <= start:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] < end and start < end:
            if holes[k][0] > start:
                _append(out, start, holes[k][0])
            start = max(start, holes[k][1])
            k += 1
        if start < end:
            _append(out, start, end)
    return out
