"""The tracking structure: every write becomes a tracking entry (TE) in per-CPU shards.

A TE is (device id, cycle id, kind, offset, length), a 24-byte C struct in a
per-CPU array (``shards.c``); recording one costs no Python object, and no
allocation unless its shard's array must grow.  The module does no I/O: writes
come in as numbers, closed cycles go out as buffers of (offset, length) pairs
for the reporter.

How a front end uses it, per write (many threads at once)::

    c = tracker.begin()
    try:
        ...write to the back end...
    finally:
        tracker.end(c, dev, kind, offset, length)

and at each recovery point (RP), from another thread::

    closed = tracker.close_cycle(timeout)

close_cycle opens cycle c+1 at once (writes never pause), waits until every
write that began in cycle c has ended, and returns cycle c's TEs.  If the wait
times out it raises TimeoutError and cycle c stays closed and "draining"
(``Tracker.draining``); the next close_cycle call resumes that drain and
returns cycle c, leaving the open cycle open, so no TE is ever skipped.

Memory is capped by ``max_bytes``; instead of growing past its share, a full
shard folds (merges) its TEs and coarsens them if merging freed too little, so
past the cap extents get coarser and no change is lost (``shards.c`` explains
how and why zero/trim TEs become data TEs).  A fold runs without the GIL, so
other Python threads go on; only writes that land on the folding shard wait.
"""
import threading
import time

import psutil

from tracker._shards import ffi, lib

KIND_DATA = lib.TR_KIND_DATA
KIND_ZERO = lib.TR_KIND_ZERO
KIND_TRIM = lib.TR_KIND_TRIM
TE_BYTES = ffi.sizeof("struct tr_te")
assert TE_BYTES <= 24, "a TE must fit in 24 bytes"

INITIAL_TES = 1024
MIN_SHARD_TES = 16
MAX_SHARDS = 4096
MAX_CYCLE = 1 << 62
_PAIR_BYTES = 16

__all__ = ["KIND_DATA", "KIND_ZERO", "KIND_TRIM", "TE_BYTES", "Tracker", "ClosedCycle", "min_bytes"]


def _default_shards():
    return min(psutil.cpu_count() or 1, MAX_SHARDS)


def min_bytes(shards=None):
    """The smallest ``max_bytes`` a Tracker of ``shards`` shards (default: one per CPU) takes."""
    return (shards or _default_shards()) * MIN_SHARD_TES * TE_BYTES


def _te_error(dev, kind, offset, length):
    """Return the message for an invalid TE, or None if it is valid.  O(1)."""
    checks = (
        (isinstance(length, int) and 1 <= length < 1 << 64,
         f"length must be in 1..2**64-1, got {length!r}"),
        (isinstance(kind, int) and kind in (KIND_DATA, KIND_ZERO, KIND_TRIM),
         f"kind must be KIND_DATA, KIND_ZERO or KIND_TRIM (0..2), got {kind!r}"),
        (isinstance(dev, int) and 0 <= dev <= 0xFFFF, f"dev must be in 0..65535, got {dev!r}"),
        (isinstance(offset, int) and 0 <= offset < 1 << 64,
         f"offset must be in 0..2**64-1, got {offset!r}"),
    )
    for ok, message in checks:
        if not ok:
            return message
    if offset + length >= 1 << 64:
        return f"offset + length overflows 64 bits: {offset} + {length}"
    return None


def _raise_for(rc, dev, kind, offset, length, cycle=None):
    if rc == lib.TR_ECYCLE:
        raise ValueError(f"cycle {cycle!r} is neither open nor draining")
    if rc == lib.TR_ENOMEM:
        raise MemoryError("out of memory growing a tracker shard; the TE was not recorded")
    raise ValueError(_te_error(dev, kind, offset, length) or f"invalid TE (code {rc})")


def _check_int(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")


class ClosedCycle:
    """The TEs of one closed cycle, grouped by (device, kind), ready for the reporter.

    ``bytes_written`` is the sum of the TE lengths as they left the tracker: when
    TEs were folded (``folded``), overlaps merged away shrink it and coarsening
    (``granule`` > 1) grows it, so it is then not the bytes the host wrote.
    """

    __slots__ = ("cycle", "count", "bytes_written", "folded", "granule", "_pairs", "_groups")

    def __init__(self, cycle, count, bytes_written, folded, granule, pairs, groups):
        """Wrap already gathered data; made by Tracker.close_cycle.  O(1)."""
        self.cycle = cycle
        self.count = count
        self.bytes_written = bytes_written
        self.folded = folded
        self.granule = granule
        self._pairs = memoryview(pairs)
        self._groups = groups

    @classmethod
    def _from_c(cls, cl):
        """Copy a C ``tr_closed`` into Python.  O(count) memcpy plus O(groups)."""
        pairs = ffi.buffer(cl.pairs, _PAIR_BYTES * cl.count)[:]
        groups = {}
        for i in range(cl.ngroups):
            g = cl.groups[i]
            groups[(g.dev, g.kind)] = (g.start, g.n)
        bytes_written = (cl.bytes_hi << 64) | cl.bytes_lo
        return cls(cl.cycle, cl.count, bytes_written, bool(cl.folded), cl.granule, pairs, groups)

    def devices(self):
        """Sorted ids of the devices that have TEs in this cycle.  O(g log g), g = groups."""
        return sorted({dev for dev, _ in self._groups})

    def entries(self, dev, kind):
        """(offset, length) pairs of one device and kind, as native uint64, sorted by offset.

        Returns a read-only memoryview of 16 bytes per TE, empty if there are none,
        meant for ``MergingBTree.insert_batch``.  O(1): no copy.
        """
        if kind not in (KIND_DATA, KIND_ZERO, KIND_TRIM):
            raise ValueError(f"kind must be KIND_DATA, KIND_ZERO or KIND_TRIM (0..2), got {kind!r}")
        start, n = self._groups.get((dev, kind), (0, 0))
        return self._pairs[_PAIR_BYTES * start:_PAIR_BYTES * (start + n)]

    def __repr__(self):
        return (f"ClosedCycle(cycle={self.cycle}, count={self.count}, "
                f"bytes_written={self.bytes_written}, folded={self.folded}, granule={self.granule})")


class Tracker:
    """Per-CPU shards of TEs tagged with the cycle id; thread-safe.

    ``shards`` defaults to ``psutil.cpu_count()``; ``max_bytes`` caps the TE
    arrays (each shard gets an equal share, at least 16 TEs); ``first_cycle``
    is the id of the cycle open at the start.  Bad values raise ValueError.
    O(shards) to build.
    """

    def __init__(self, shards=None, max_bytes=64 << 20, first_cycle=1):
        if shards is None:
            shards = _default_shards()
        _check_int("shards", shards, 1, MAX_SHARDS)
        _check_int("max_bytes", max_bytes, min_bytes(shards), 1 << 62)
        _check_int("first_cycle", first_cycle, 0, MAX_CYCLE)
        share = max_bytes // TE_BYTES // shards
        ptr = lib.tr_new(shards, share, min(INITIAL_TES, share), first_cycle)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate the tracker shards")
        self._t = ffi.gc(ptr, lib.tr_free)
        self._shards = shards
        self._max_bytes = max_bytes
        self._closing = threading.Lock()

    def begin(self):
        """Start a write: return the open cycle id and count the write in flight there.

        Pair every begin() with exactly one end().  O(1), lock-free.
        """
        return lib.tr_begin(self._t)

    def end(self, cycle, dev, kind, offset, length):
        """Record the TE of a write that began in ``cycle`` and end its in-flight count.

        ``cycle`` must be the open cycle or the closed one still draining, else
        ValueError and nothing changes.  A bad TE raises ValueError and is not
        recorded, but the write still stops counting as in flight, so a caller
        bug cannot stall close_cycle.  O(1) with the GIL held when the shard
        has room; otherwise it gives up the GIL while it waits for the shard
        and makes room (``tracker/_build.py``), amortised O(log n) for a shard
        of n TEs, O(n log n) for the call that folds.
        """
        try:
            rc = lib.tr_end(self._t, cycle, dev, kind, offset, length)
        except (OverflowError, TypeError):
            rc = self._abort(cycle) or -1
        if rc:
            _raise_for(rc, dev, kind, offset, length, cycle)

    def c_parts(self):
        """(this tracker's C address, tr_begin's, tr_end's) as ints, for C code that brackets a
        write itself (``nbd_plugin/writepath.c``), holding the GIL as a call from Python would.
        The tracker's address is valid while this object lives. O(1)."""
        return tuple(int(ffi.cast("uintptr_t", p))
                     for p in (self._t, ffi.addressof(lib, "tr_begin"), ffi.addressof(lib, "tr_end")))

    def end_failed(self, rc, cycle, dev, kind, offset, length):
        """Raise what ``end`` raises when tr_end, called from C (``c_parts``), answered ``rc``."""
        _raise_for(rc, dev, kind, offset, length, cycle)

    def _abort(self, cycle):
        """End the in-flight count of a write whose TE cannot be recorded.  O(1)."""
        if not isinstance(cycle, int) or not 0 <= cycle < 1 << 64:
            return lib.TR_ECYCLE
        return lib.tr_abort(self._t, cycle)

    def record(self, dev, kind, offset, length):
        """Record a write that is already complete (begin() + end()); bad TE → ValueError.

        Costs as end(): O(1) with the GIL held when the shard has room, else
        without the GIL, amortised O(log n) for a shard of n TEs.
        """
        try:
            rc = lib.tr_record(self._t, dev, kind, offset, length)
        except (OverflowError, TypeError):
            rc = -1
        if rc:
            _raise_for(rc, dev, kind, offset, length)

    @property
    def cycle(self):
        """Id of the open cycle.  O(1)."""
        return lib.tr_cycle(self._t)

    @property
    def draining(self):
        """Id of the closed cycle whose drain timed out, or None.  O(1)."""
        d = lib.tr_draining1(self._t)
        return d - 1 if d else None

    @property
    def inflight(self):
        """Writes between begin() and end() right now, over all cycles.  O(shards)."""
        return lib.tr_inflight(self._t)

    def close_cycle(self, timeout=30.0, on_drained=None):
        """Close the open cycle (an RP) and return its TEs as a ClosedCycle.

        Cycle c+1 opens at once; then waits, without the GIL, for the writes
        that began in c to end, and calls ``on_drained()`` (if given) as soon as
        they have, before gathering and sorting c's TEs: a keep-aside store waits
        for that moment, and the gathering of millions of TEs takes 100 ms.
        After ``timeout`` seconds raises TimeoutError: cycle c stays closed and
        draining, and the next call resumes its drain and returns it instead of
        closing another cycle.  TEs of c+1 stay.  Calls are serialised.
        O(N + m log m) for N TEs in the tracker and m in cycle c, plus the wait.
        """
        if not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a number >= 0, got {timeout!r}")
        deadline = time.monotonic() + timeout
        if not self._closing.acquire(timeout=min(timeout, threading.TIMEOUT_MAX)):
            raise TimeoutError(f"another close_cycle still running after {timeout} s")
        try:
            return self._close_locked(deadline, on_drained)
        finally:
            self._closing.release()

    def _close_locked(self, deadline, on_drained):
        c = lib.tr_close(self._t)
        left = lib.tr_drain(self._t, c, max(0.0, deadline - time.monotonic()))
        if left:
            raise TimeoutError(f"cycle {c} still has {left} write(s) in flight; it stays "
                               "closed and the next close_cycle resumes the drain")
        if on_drained is not None:
            on_drained()
        cl = lib.tr_detach(self._t, c)
        if cl == ffi.NULL:
            raise MemoryError(f"cannot allocate the TEs of cycle {c}; they stay in the tracker")
        try:
            return ClosedCycle._from_c(cl)
        finally:
            lib.tr_closed_free(cl)

    def stats(self):
        """Counters and memory use of the shards, as a dict.  O(shards), without the
        GIL while it waits for a shard lock (a fold may hold one).

        ``entries`` TEs held, ``memory_bytes`` allocated for TEs (at most
        ``max_bytes`` unless ``over_cap`` > 0), ``folds``/``coarsenings`` so far,
        ``granule`` the largest coarsening granule on TEs still held (1 if none).
        """
        st = ffi.new("struct tr_stats *")
        lib.tr_stats(self._t, st)
        return {
            "shards": self._shards,
            "entries": st.entries,
            "memory_bytes": st.capacity * TE_BYTES,
            "max_bytes": self._max_bytes,
            "folds": st.folds,
            "coarsenings": st.coarsenings,
            "over_cap": st.over_cap,
            "granule": st.granule,
            "te_bytes": TE_BYTES,
            "cycle": self.cycle,
            "draining": self.draining,
            "inflight": self.inflight,
        }
