"""The receiver's pure logic: which journal holds each byte of an RP, and what to fold.

No I/O here (the rest of the project keeps its logic sans-I/O the same way): ``ExtentMap``
answers "where is this range of RP N", ``to_fold`` decides how many of the oldest retained
RPs go into the base image, ``parse_keep`` reads ``--keep``.
"""
import bisect
import re

from nbd_plugin.params import ParamError, parse_size

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ExtentMap:
    """Sorted, disjoint byte ranges, each owned by the journal that holds its newest bytes;
    a range in none is read from the base image.

    Copy-on-write for readers: the receiver builds a new map (``copy`` then ``overlay`` or
    ``drop``) and swaps the reference, so a read in progress keeps the map it started with.
    """

    __slots__ = ("starts", "ends", "owners")

    def __init__(self):
        self.starts, self.ends, self.owners = [], [], []

    def copy(self):
        """A new map with the same ranges. O(n)."""
        out = ExtentMap()
        out.starts, out.ends, out.owners = list(self.starts), list(self.ends), list(self.owners)
        return out

    def overlay(self, pairs, owner):
        """Give ``owner`` every range of ``pairs`` (flat offset, length), over older owners.
        O(k (log n + n)) for k pairs; the splice is a memmove."""
        for off, length in zip(pairs[0::2], pairs[1::2]):
            if length:
                self._put(off, off + length, owner)

    def _put(self, start, end, owner):
        i = bisect.bisect_right(self.ends, start)
        j = bisect.bisect_left(self.starts, end, lo=i)
        starts, ends, owners = [start], [end], [owner]
        if i < j:
            if self.starts[i] < start:
                starts.insert(0, self.starts[i])
                ends.insert(0, start)
                owners.insert(0, self.owners[i])
            if self.ends[j - 1] > end:
                starts.append(end)
                ends.append(self.ends[j - 1])
                owners.append(self.owners[j - 1])
        self.starts[i:j], self.ends[i:j], self.owners[i:j] = starts, ends, owners

    def drop(self, owner):
        """Forget ``owner``'s ranges (they are now in the base image). O(n)."""
        keep = [k for k, o in enumerate(self.owners) if o is not owner]
        self.starts = [self.starts[k] for k in keep]
        self.ends = [self.ends[k] for k in keep]
        self.owners = [self.owners[k] for k in keep]

    def lookup(self, offset, length):
        """[(offset, length, owner or None)] covering [offset, offset+length) in order. O(log n + k)."""
        end = offset + length
        out = []
        at = offset
        i = bisect.bisect_right(self.ends, offset)
        while at < end and i < len(self.starts) and self.starts[i] < end:
            s, e = max(self.starts[i], at), min(self.ends[i], end)
            if s > at:
                out.append((at, s - at, None))
            out.append((s, e - s, self.owners[i]))
            at = e
            i += 1
        if at < end:
            out.append((at, end - at, None))
        return out

    def __len__(self):
        return len(self.starts)


def parse_keep(text):
    """``--keep``: a count of RPs (``100``) or a duration (``90s``, ``10m``, ``2h``, ``30d``).
    Returns (count, seconds), one of them None."""
    text = str(text)
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise ParamError(f"keep={text!r}: keep at least 1 recovery point")
        return count, None
    m = _DURATION.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise ParamError(f"keep={text!r} is neither a count (e.g. 100) nor a duration (e.g. 90s, 10m, 2h, 30d)")
    return None, float(m.group(1)) * _UNITS[m.group(2)]


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
