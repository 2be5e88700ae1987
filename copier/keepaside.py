"""Keep-aside: old bytes of cycle N that writes of cycle N+1 overwrote before the copier read them.

Theory of operation
-------------------
The replica must equal the source *as it was at RP N* once cycle N is committed, yet hosts
keep writing while N is copied. Nothing stops a write of N+1 from landing on a range of N the
copier has not read yet. So, while N is being copied, such a write first copies the bytes it
is about to destroy into this store, and the copier reads N's extents through the store:
bytes kept aside win over the back end's current bytes.

Three facts keep that cheap and correct:

* Who keeps: only writes tagged with a cycle newer than the one being copied (``needs``).
  Writes of N still in flight at the RP finish first: the tracker's cycle switch waits for
  them, and the session arms this store *before* that switch, so every write of N+1 sees it.
* What to keep: between the RP and the moment N's report is built, nobody knows N's extents;
  then the whole device counts as pending. ``install`` narrows it to N's data extents and
  drops what was kept outside them. A range is pending only until the copier has read it:
  the copier reads each device in offset order, so "read" is one high-water mark per device.
  Zero extents are never kept: the copier sends them as WRITE_ZEROES without reading.
* First write wins: the store keeps whole blocks (``BLOCK`` bytes), and a block kept once is
  never replaced, so it holds the bytes of RP N even if N+1 writes it many times.

One lock orders keeping against the copier's reads. A writer keeps (reading the back end)
under the lock *before* it writes the back end, and the copier reads the back end and
overlays kept blocks under the same lock, so a block is either kept before the copier reads
it, or read by the copier before the write lands. Writers only touch the lock while a cycle
is being copied and their range is pending.

Memory is capped at ``mem_cap`` bytes of kept blocks; past that, blocks go to an unlinked
spill file, so a slow replica costs disk space instead of failing writes. Each kept block
costs BLOCK bytes plus about 100 bytes of dict entry.
"""
import bisect
import itertools
import os
import tempfile
import threading

BLOCK = 4096


class KeepAside:
    """The store for one session.

    ``devices`` maps dev id -> a back end with ``size``, ``read(offset, length)`` and
    ``read_batch(pairs)``.
    """

    def __init__(self, devices, mem_cap=256 << 20, spill_dir=None):
        self._devices = devices
        self._mem_cap = mem_cap
        self._spill_dir = spill_dir
        self._spill = None
        self._spill_end = 0
        self._lock = threading.Lock()
        self._blocks = {}
        self._pending = None
        self._read_upto = {}
        self.cycle = None
        self.mem_bytes = 0
        self.kept_blocks_total = 0

    def needs(self, cycle):
        """True if a write tagged ``cycle`` must call ``keep`` first. O(1), lock-free."""
        armed = self.cycle
        return armed is not None and cycle > armed

    def arm(self, cycle):
        """Start protecting cycle ``cycle``: every device range is pending. O(1)."""
        with self._lock:
            self._pending = None
            self._read_upto = {dev: 0 for dev in self._devices}
            self.cycle = cycle

    def install(self, data_extents):
        """Narrow what is pending to the report's data extents {dev: [(offset, length)]}.

        Drops blocks kept outside them. O(E + K log E) for E extents and K kept blocks.
        """
        pending = {dev: _Ranges(data_extents.get(dev, ())) for dev in self._devices}
        with self._lock:
            self._pending = pending
            for key in [k for k in self._blocks if not self._is_pending_locked(*k)]:
                self._drop_locked(key)

    def release(self):
        """Cycle committed or abandoned: forget everything kept. O(K)."""
        with self._lock:
            self.cycle = None
            self._pending = None
            self._blocks.clear()
            self.mem_bytes = 0
            if self._spill is not None:
                self._spill.close()
                self._spill = None
                self._spill_end = 0

    def keep(self, dev, offset, length):
        """Before a write of a newer cycle to [offset, offset+length): keep its pending blocks.

        O(B log E) for B blocks in the range, plus reading the blocks not yet kept.
        """
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        with self._lock:
            if self.cycle is None:
                return
            for block in range(first, last + 1):
                key = (dev, block)
                if key not in self._blocks and self._is_pending_locked(dev, block):
                    self._store_locked(key, self._read_block(dev, block))

    def read_batch(self, dev, pairs, into):
        """The copier's read of cycle N's bytes: segments back to back in ``into``, kept blocks
        laid over them; returns the filled view of ``into``.

        ``pairs``: array('Q') of (offset, length), ascending; batches must come in ascending
        offset order per device. O(total length + kept blocks of the device).
        """
        view = memoryview(into)[:sum(pairs[1::2])]
        with self._lock:
            self._devices[dev].read_batch(pairs, view)
            if self._blocks:
                self._overlay_locked(dev, pairs, view)
            self._read_upto[dev] = max(self._read_upto.get(dev, 0), pairs[-2] + pairs[-1])
        return view

    def stats(self):
        """Counters for status. O(1)."""
        return {
            "cycle": self.cycle,
            "blocks": len(self._blocks),
            "mem_bytes": self.mem_bytes,
            "spill_bytes": self._spill_end,
            "kept_blocks_total": self.kept_blocks_total,
        }

    def _is_pending_locked(self, dev, block):
        start, end = block * BLOCK, (block + 1) * BLOCK
        start = max(start, self._read_upto.get(dev, 0))
        if start >= end:
            return False
        return self._pending is None or self._pending[dev].intersects(start, end)

    def _read_block(self, dev, block):
        backend = self._devices[dev]
        start = block * BLOCK
        return bytes(backend.read(start, min(BLOCK, backend.size - start)))

    def _store_locked(self, key, data):
        self.kept_blocks_total += 1
        if self.mem_bytes + len(data) <= self._mem_cap:
            self._blocks[key] = data
            self.mem_bytes += len(data)
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="nbdrep-keepaside-", dir=self._spill_dir)
        os.pwrite(self._spill.fileno(), data, self._spill_end)
        self._blocks[key] = (self._spill_end, len(data))
        self._spill_end += len(data)

    def _load_locked(self, key):
        value = self._blocks[key]
        if isinstance(value, bytes):
            return value
        where, length = value
        return os.pread(self._spill.fileno(), length, where)

    def _drop_locked(self, key):
        value = self._blocks.pop(key)
        if isinstance(value, bytes):
            self.mem_bytes -= len(value)

    def _overlay_locked(self, dev, pairs, buf):
        """Copy the kept blocks of ``dev`` over the segments of ``buf`` they overlap."""
        starts, lengths = pairs[0::2], pairs[1::2]
        positions = list(itertools.accumulate(lengths, initial=0))
        for key in [k for k in self._blocks if k[0] == dev]:
            kept = self._load_locked(key)
            lo_block, hi_block = key[1] * BLOCK, key[1] * BLOCK + len(kept)
            i = max(0, bisect.bisect_right(starts, lo_block) - 1)
            while i < len(starts) and starts[i] < hi_block:
                lo, hi = max(starts[i], lo_block), min(starts[i] + lengths[i], hi_block)
                if lo < hi:
                    at = positions[i] - starts[i]
                    buf[at + lo:at + hi] = kept[lo - lo_block:hi - lo_block]
                i += 1


class _Ranges:
    """Sorted disjoint extents with an O(log n) intersection test."""

    def __init__(self, extents):
        ordered = sorted(extents)
        self._starts = [o for o, _ in ordered]
        self._ends = [o + n for o, n in ordered]

    def intersects(self, start, end):
        i = bisect.bisect_right(self._ends, start)
        return i < len(self._starts) and self._starts[i] < end
