"""A cycle's report as the copier takes it: per device, data extents and zero extents.

Theory of operation
-------------------
One format from the tracker to the copier: a flat ``array('Q')`` of (offset, length) pairs,
ascending, disjoint and non-adjacent (what ``MergingBTree.pairs`` returns and what the C
copier and ``ClosedCycle.entries`` speak). Tuples appear at the JSON edge (``as_json``) and,
for now, inside two subtractions that go through ``reporter.subtract``: zero extents minus
data extents, and a failed report minus what landed. Both are O(n + m) but run in Python
with the GIL: 0.66 s for 500,000 extents against 500,000, the report cap's order of size;
ordinary cycles have few zero extents and failures are rare.

``build`` turns a closed cycle into its report (claims 5-11 do the merging):

1. Per device, the data TEs merge into one set of extents and the zero/trim TEs into another.
2. A failed cycle's report (the *carry*) merges in: its data with the data, its zeros with
   the zeros. Bytes a carried data extent covers are read at this RP; bytes a carried zero
   extent covers read as zeros at this RP unless a later data write touched them, in which
   case they are in the data set.
3. Every extent is clipped to the device size. The tracker may widen TEs past the end of a
   device when it coarsens them under its memory cap (64 KiB granules), and an extent past
   EOF can never be read: before the clip, such a cycle failed with EIO forever.
4. Zero extents minus data extents are what is sent as WRITE_ZEROES; the rest is read.
5. Past ``cap`` extents on a device the report coarsens (invariant 4): rounded out to a
   doubling granule, zero extents become data (a widened zero range would zero bytes nobody
   zeroed), clipped again. More is copied; nothing is lost.

``minus`` is what a failed copy leaves to do: the report less the extents that landed, so
the retry resends only what did not land.

Sans-I/O: nothing here reads or writes a device.
"""
import array

from reporter import MergingBTree, subtract

MAX_EXTENTS = 1 << 20
FIRST_GRANULE = 64 << 10

_EMPTY = array.array("Q")


class Report:
    """One cycle's report: ``data`` and ``zero``, each {dev: array('Q') pairs}.

    Immutable by convention: every method returns a new Report. Memory: 16 bytes per extent.
    """

    __slots__ = ("data", "zero")

    def __init__(self, data=None, zero=None):
        self.data = {d: p for d, p in (data or {}).items() if p}
        self.zero = {d: p for d, p in (zero or {}).items() if p}

    def data_of(self, dev):
        """The data pairs of ``dev`` (empty if none). O(1)."""
        return self.data.get(dev, _EMPTY)

    def zero_of(self, dev):
        """The zero pairs of ``dev`` (empty if none). O(1)."""
        return self.zero.get(dev, _EMPTY)

    def devices(self):
        """Sorted ids of the devices with extents. O(d log d)."""
        return sorted(set(self.data) | set(self.zero))

    def extent_count(self):
        """Number of extents, data and zero. O(devices)."""
        return sum(len(p) // 2 for part in (self.data, self.zero) for p in part.values())

    def byte_count(self):
        """Bytes covered, data and zero. O(extents)."""
        return sum(sum(p[1::2]) for part in (self.data, self.zero) for p in part.values())

    def __bool__(self):
        return bool(self.data or self.zero)

    def merged_with(self, other, sizes, cap=MAX_EXTENTS):
        """This report and ``other`` (a carry) as one, clipped and capped. O(n log n)."""
        devs = set(self.devices()) | set(other.devices())
        data = {d: merge(self.data_of(d), other.data_of(d)) for d in devs}
        zero = {d: merge(self.zero_of(d), other.zero_of(d)) for d in devs}
        return _finish(data, zero, sizes, cap)

    def minus(self, landed):
        """What is left of this report once ``landed`` ({dev: pairs}) is on the replica.
        O(n + m) per device."""
        return Report({d: difference(p, landed.get(d, _EMPTY)) for d, p in self.data.items()},
                      {d: difference(p, landed.get(d, _EMPTY)) for d, p in self.zero.items()})

    def as_json(self, names):
        """{export name: {"data": [[o, n], ...], "zero": [...]}} for ``names`` {dev: name}. O(n)."""
        return {name: {"data": _tuples(self.data_of(dev)), "zero": _tuples(self.zero_of(dev))}
                for dev, name in names.items()}

    def __eq__(self, other):
        return isinstance(other, Report) and (self.data, self.zero) == (other.data, other.zero)

    def __repr__(self):
        return f"Report({self.extent_count()} extents, {self.byte_count()} bytes)"


def build(closed, sizes, kinds, carry=None, cap=MAX_EXTENTS, zeros_as_data=False):
    """The report of a closed cycle (``ClosedCycle``), merged with ``carry`` if given.

    ``sizes`` {dev: bytes} names the devices and clips every extent to its size. ``kinds`` is
    (data kind, zero kind, trim kind) as the tracker numbers them. With ``zeros_as_data`` the
    cycle's zero and trim TEs are read like data instead of sent as WRITE_ZEROES: needed when
    its writes may have completed before overlapping writes of the cycle before (the
    controller says when). O(n log n) for n TEs.
    """
    data_kind, zero_kind, trim_kind = kinds
    zeros = {d: (closed.entries(d, zero_kind), closed.entries(d, trim_kind)) for d in sizes}
    if zeros_as_data:
        data = {d: merge(closed.entries(d, data_kind), *zeros[d]) for d in sizes}
        zero = {d: _EMPTY for d in sizes}
    else:
        data = {d: merge(closed.entries(d, data_kind)) for d in sizes}
        zero = {d: merge(*zeros[d]) for d in sizes}
    if carry is not None:
        data = {d: merge(data[d], carry.data_of(d)) for d in sizes}
        zero = {d: merge(zero[d], carry.zero_of(d)) for d in sizes}
    return _finish(data, zero, sizes, cap)


def whole(extents_by_dev):
    """The report of a full sync: {dev: [(offset, length, is_hole)]} (a back end's extents)
    -> data for the data extents, zero for the holes. O(n)."""
    data = {d: pack((o, n) for o, n, hole in ext if not hole) for d, ext in extents_by_dev.items()}
    zero = {d: pack((o, n) for o, n, hole in ext if hole) for d, ext in extents_by_dev.items()}
    return Report(data, zero)


def _finish(data, zero, sizes, cap):
    out_data, out_zero = {}, {}
    for dev, size in sizes.items():
        d = clip(data.get(dev, _EMPTY), size)
        z = clip(zero.get(dev, _EMPTY), size)
        z = difference(z, d)
        if (len(d) + len(z)) // 2 > cap:
            d, z = coarsen(merge(d, z), size, cap), _EMPTY
        out_data[dev], out_zero[dev] = d, z
    return Report(out_data, out_zero)


def merge(*pair_buffers):
    """Union of extents given as uint64 pair buffers, through the merging B-tree. O(n log n)."""
    tree = MergingBTree(order=32)
    for buf in pair_buffers:
        tree.insert_batch(buf)
    return tree.pairs()


def clip(pairs, size):
    """``pairs`` (ascending, disjoint) without anything at or past ``size``. O(k) for the k
    extents that reach past it (only the last ones can)."""
    n = len(pairs)
    while n and pairs[n - 2] >= size:
        n -= 2
    if n == len(pairs) and (not n or pairs[n - 2] + pairs[n - 1] <= size):
        return pairs
    out = pairs[:n]
    if n and out[n - 2] + out[n - 1] > size:
        out[n - 1] = size - out[n - 2]
    return out


def coarsen(pairs, size, cap=MAX_EXTENTS):
    """At most ``cap`` extents covering ``pairs``, rounded out to a doubling granule (64 KiB
    first) and clipped to ``size``: coarser, never smaller. O(n log n) a round."""
    granule = FIRST_GRANULE
    while len(pairs) // 2 > cap:
        rounded = array.array("Q")
        for off, n in zip(pairs[0::2], pairs[1::2]):
            start = off - off % granule
            rounded.extend((start, min(size, -(-(off + n) // granule) * granule) - start))
        pairs = merge(rounded)
        granule *= 2
    return pairs


def difference(pairs, holes):
    """``pairs`` minus ``holes`` (both ascending, disjoint), maximal. O(n + m)."""
    if not pairs or not holes:
        return pairs
    return pack(subtract(_tuples(pairs), _tuples(holes)))


def pack(extents):
    """[(offset, length)] -> the flat array('Q') of pairs. O(n)."""
    return array.array("Q", [v for ext in extents for v in ext])


def _tuples(pairs):
    return list(zip(pairs[0::2], pairs[1::2]))
