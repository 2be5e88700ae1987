"""The receiver's pure logic: which journal holds each byte of an RP, and what to fold.

No I/O here (the rest of the project keeps its logic sans-I/O the same way): ``ExtentMap``
answers "where is this range of RP N", ``to_fold`` decides how many of the oldest retained
RPs go into the base image, ``parse_keep`` reads ``--keep``.
"""

import numpy as np

from nbd_plugin.params import ParamError, parse_duration, parse_size

_EMPTY = np.zeros(0, dtype=np.uint64)
_NO_KEYS = np.zeros(0, dtype=np.int64)


class ExtentMap:
    """Sorted, disjoint byte ranges, each owned by the journal that holds its newest bytes;
    a range in none is read from the base image.

    numpy arrays of starts, ends and owner keys (``id`` of the owner, which ``owners`` keeps
    alive), so that a commit's overlay is one vectorised merge, O((n + k) log(n + k)): as
    nested Python lists, the splices made it O(n k), 0.1 s a commit once an hour of 4 KiB
    random writes was retained. Copy-on-write for readers: the receiver builds a new map
    (``overlaid``, ``without``) and swaps the reference, so a read in progress keeps the map
    (and the journals) it started with.
    """

    __slots__ = ("starts", "ends", "keys", "owners")

    def __init__(self, starts=_EMPTY, ends=_EMPTY, keys=_NO_KEYS, owners=None):
        self.starts, self.ends, self.keys = starts, ends, keys
        self.owners = owners or {}

    def overlaid(self, pairs, owner):
        """A new map where ``owner`` holds every range of ``pairs`` (flat offset, length,
        ascending and disjoint), over older owners."""
        flat = np.array(pairs, dtype=np.uint64)
        if not len(flat):
            return self
        new_s, new_e = flat[0::2], flat[0::2] + flat[1::2]
        # Both boundary lists are sorted runs already: a stable sort merges them in one pass.
        points = np.sort(np.concatenate((np.column_stack((self.starts, self.ends)).ravel(), flat_ends(flat))),
                         kind="stable")
        points = points[np.concatenate(([True], points[1:] != points[:-1]))]
        seg_s, seg_e = points[:-1], points[1:]
        keys = np.full(len(seg_s), -1, dtype=np.int64)
        old = _covering(self.starts, self.ends, seg_s)
        keys[old >= 0] = self.keys[old[old >= 0]]
        keys[_covering(new_s, new_e, seg_s) >= 0] = id(owner)
        live = keys >= 0
        seg_s, seg_e, keys = seg_s[live], seg_e[live], keys[live]
        # Merge neighbours of one owner, so the map stays as small as the union allows.
        first = np.ones(len(seg_s), dtype=bool)
        first[1:] = (seg_s[1:] != seg_e[:-1]) | (keys[1:] != keys[:-1])
        last = np.ones(len(seg_s), dtype=bool)
        last[:-1] = first[1:]
        owners = {k: o for k, o in self.owners.items()}
        owners[id(owner)] = owner
        return ExtentMap(seg_s[first], seg_e[last], keys[first], owners)

    def without(self, owner):
        """A new map without ``owner``'s ranges (they are now in the base image). O(n)."""
        keep = self.keys != id(owner)
        owners = {k: o for k, o in self.owners.items() if o is not owner}
        return ExtentMap(self.starts[keep], self.ends[keep], self.keys[keep], owners)

    def lookup(self, offset, length):
        """[(offset, length, owner or None)] covering [offset, offset+length) in order.
        O(log n + k)."""
        end = offset + length
        out = []
        at = offset
        i = int(np.searchsorted(self.ends, np.uint64(offset), side="right"))
        n = len(self.starts)
        while at < end and i < n and int(self.starts[i]) < end:
            s, e = max(int(self.starts[i]), at), min(int(self.ends[i]), end)
            if s > at:
                out.append((at, s - at, None))
            out.append((s, e - s, self.owners[int(self.keys[i])]))
            at = e
            i += 1
        if at < end:
            out.append((at, end - at, None))
        return out

    def __len__(self):
        return len(self.starts)


def flat_ends(flat):
    """Flat (offset, length) pairs -> flat (start, end) boundaries, in the same order."""
    out = flat.copy()
    out[1::2] += flat[0::2]
    return out


def _covering(starts, ends, points):
    """For each of ``points``, the index of the range [starts, ends) holding it, or -1."""
    i = np.searchsorted(starts, points, side="right").astype(np.int64) - 1
    inside = i >= 0
    inside[inside] = points[inside] < ends[i[inside]]
    return np.where(inside, i, -1)


def parse_keep(text):
    """``--keep``: a count of RPs (``100``) or a duration (``90s``, ``10m``, ``2h``, ``30d``).
    Returns (count, seconds), one of them None."""
    text = str(text)
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise ParamError(f"keep={text!r}: keep at least 1 recovery point")
        return count, None
    seconds = parse_duration(text)
    if not seconds:
        raise ParamError(f"keep={text!r} is neither a count (e.g. 100) nor a duration (e.g. 90s, 10m, 2h, 30d)")
    return None, seconds


def parse_journal_max(text):
    return parse_size(text, "journal-max")


def to_fold(rps, now, keep_count, keep_seconds, journal_max, pinned=None):
    """How many of the oldest retained RPs to fold into the base image.

    ``rps``: the retained RPs, oldest first, dicts with ``cycle``, ``commit_time``, ``bytes``.
    Fold while there are more than ``keep_count``, or the oldest was committed more than
    ``keep_seconds`` ago (but the newest stays, however old: it can still be attached), or
    the journals hold more than ``journal_max`` bytes (then even the newest goes: the base
    image then is that RP). Never fold an RP newer than ``pinned``, the
    oldest RP attached as an export: its reads of the base image must not change under it.
    O(len(rps)).
    """
    total = sum(rp["bytes"] for rp in rps)
    n = 0
    while n < len(rps):
        rp, left = rps[n], len(rps) - n
        due = ((keep_count is not None and left > keep_count)
               or (keep_seconds is not None and left > 1 and rp["commit_time"] < now - keep_seconds)
               or total > journal_max)
        if not due or (pinned is not None and rp["cycle"] > pinned):
            break
        total -= rp["bytes"]
        n += 1
    return n
