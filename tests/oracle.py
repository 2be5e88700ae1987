"""Naive oracles shared by the tracker and reporter tests: the union of (offset, length) extents."""


def union(extents):
    """Sorted, disjoint, non-adjacent [start, end) list covering the (offset, length) extents."""
    out = []
    for off, length in sorted(extents):
        if out and off <= out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length)
        else:
            out.append([off, off + length])
    return [tuple(x) for x in out]


def union_extents(extents):
    """The same union as (offset, length) pairs, the shape of a report's extents."""
    return [(start, end - start) for start, end in union(extents)]


def covers(outer, inner):
    """Whether the union of outer (offset, length) extents contains that of inner."""
    big = union(outer)
    return all(any(s <= a and b <= e for s, e in big) for a, b in union(inner))
