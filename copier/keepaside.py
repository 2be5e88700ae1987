"""Keep-aside: old bytes of cycle N that writes of cycle N+1 overwrote before the copier read them.

Theory of operation
-------------------
The replica must equal the source *as it was at RP N* once cycle N is committed, yet hosts
keep writing while N is copied. Nothing stops a write of N+1 from landing on a range of N the
copier has not read yet. So, while N is being copied, such a write first copies the bytes it
is about to destroy into this store, and the copier reads N's extents through the store:
bytes kept aside win over the back end's current bytes.

The controller drives one cycle at a time::

    arm(N)                 # before the tracker closes N: every write of N+1 will see it
    tracker.close_cycle()  # N+1 opens; returns once every write of N has ended
    drained()              # tells the store so
    install(report.data)   # N's data extents: what stays pending
    read_batch(...) ...    # the copier, ascending per device
    release()              # N committed or abandoned

and every write does ``c = tracker.begin(); if needs(c): keep(c, ...)``, then writes the back
end, then ``tracker.end(c, ...)``.

* Who keeps: only writes tagged with a cycle newer than the armed one (``needs``).
* What to keep: between the RP and ``install`` nobody knows N's extents, so every byte is
  pending; ``install`` narrows that to N's data extents and drops what was kept outside them.
  A byte is pending only until the copier has read it: the copier reads each device in offset
  order, so "read" is one high-water mark per device. Zero extents are never kept: the copier
  sends them as WRITE_ZEROES without reading.
* First write wins: the store keeps whole blocks (``BLOCK`` bytes; a device's last block may
  be shorter), and a block kept once is never replaced, so it holds the bytes of RP N however
  often N+1 writes it.

Why a kept block holds the bytes of RP N, and the copier gets them
------------------------------------------------------------------
A keeper checks under the store's lock that its block is pending, unread and not kept, reads
it from the back end without the lock, then takes the lock again and stores it only if that
is all still true and the store was not re-armed, released or degraded meanwhile; its write
lands only after ``keep`` returns. The copier reads a batch from the back end without the
lock, then under the lock lays over it every kept block of the batch and only then moves the
high-water mark. So for every block of a batch either some write of N+1 kept it before
landing, and the overlay (which comes after the read) finds it kept; or every write of N+1 to
it landed after the overlay, hence after the read. Among keepers of one block the first to
store wins, and it read before any other writer of N+1 could land there (each of them
stores, or finds the block kept, before it lands).

That argument needs the back end to hold RP N's bytes when the keeper reads: nothing of N+1
landed there yet (above), and everything of N did. Two races broke that, and are closed:

1. A write of N+1 passed ``needs`` while N was armed, then was held up (waiting for the lock,
   or just descheduled); meanwhile N committed, was released, and N+1 was armed. Keeping then
   would store the writer's own pre-write bytes as "N+1's RP", and the replica would keep
   the old block for good. So
   ``keep`` takes the writer's cycle and re-checks ``cycle > armed`` under the lock: a write
   of the armed cycle never keeps.
2. Writes of N are still in flight at the RP (the tracker's close waits for them *after*
   opening N+1). A write of N+1 sharing a block with such a write could keep the block before
   the write of N landed: the kept block then lacks bytes of N that no later report covers.
   So a keep reads the back end only after ``drained()``, which the controller calls when
   ``close_cycle`` has returned, i.e. when every write of N has ended. It cannot deadlock:
   the re-check of (1) comes first, so a write of N never waits, and the drain waits only for
   writes of N. A keep that waits longer than ``drain_wait`` seconds degrades instead.

Failure never reaches the host
------------------------------
The store runs on the host's write path, so it never fails a write (design invariant 8).
Whatever goes wrong while keeping -- the spill file's file system is full or failing, the
spill cap or the memory cap with no spill is reached, memory runs out, the back end cannot be
read, the drain takes too long -- the store gives up point in time for the armed cycle: it
stops keeping, drops what it kept, reads pass through to the back end, ``point_in_time``
turns False and ``degraded`` says why in one line. The controller then records the cycle as
copied but not a recovery point; the next cycle's report covers every write since, so its
commit is a recovery point again. ``release`` (or the next ``arm``) clears the state.

Cost
----
Kept bytes go to a memory arena up to ``mem_cap``, then to an unlinked spill file up to
``spill_cap``; the index is C arrays, no Python object per block: at most
``INDEX_BYTES_PER_BLOCK`` (56) bytes per block kept since the arm, plus a small floor
(``index_bound``), all given back at the release. The copier's reads free the blocks they
pass, so a store holds only blocks the copier has still to read.
"""
import array
import itertools
import os
import tempfile

from copier._keepaside import ffi, lib

BLOCK = lib.KA_BLOCK
INDEX_BYTES_PER_BLOCK = lib.KA_INDEX_BYTES_PER_BLOCK
DRAIN_WAIT = 5.0
_MAX_SLOTS = (1 << 32) - 2
_MAX_SIZE = 1 << 60
_REASON_BYTES = 256


def index_bound(blocks, devices):
    """Most bytes ``stats()["index_bytes"]`` can reach after ``blocks`` keeps since the arm. O(1)."""
    return (INDEX_BYTES_PER_BLOCK * blocks + lib.KA_INDEX_BYTES_FIXED
            + lib.KA_INDEX_BYTES_PER_DEV * devices)


class KeepAside:
    """The store for one session; thread-safe.

    ``devices`` maps dev id (int) -> a back end with ``fd`` and ``size`` (read by the keep path
    in C) and ``read_batch(pairs, into)`` (the copier's reads). ``mem_cap`` and ``spill_cap``
    bound the kept bytes in memory and in the spill file (``spill_dir``, default the system's
    temporary directory), in whole blocks; ``drain_wait`` bounds how long a keep waits for
    ``drained()``. Bad values raise ValueError. O(devices).
    """

    def __init__(self, devices, mem_cap=256 << 20, spill_dir=None, spill_cap=1 << 30,
                 drain_wait=DRAIN_WAIT):
        for name, value in (("mem_cap", mem_cap), ("spill_cap", spill_cap)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if mem_cap // BLOCK + spill_cap // BLOCK > _MAX_SLOTS:
            raise ValueError(f"mem_cap + spill_cap must stay under {_MAX_SLOTS * BLOCK} bytes")
        if not isinstance(drain_wait, (int, float)) or isinstance(drain_wait, bool) \
                or not 0 <= drain_wait <= 3600:
            raise ValueError(f"drain_wait must be 0..3600 seconds, got {drain_wait!r}")
        self._devices = dict(devices)
        self._index = {dev: i for i, dev in enumerate(self._devices)}
        for dev, backend in self._devices.items():
            if not isinstance(dev, int) or not 0 <= dev < 1 << 63:
                raise ValueError(f"device ids must be ints >= 0, got {dev!r}")
            if not 0 < backend.size < _MAX_SIZE:
                raise ValueError(f"device {dev}: size must be 1..2**60-1, got {backend.size!r}")
        spill_dir = tempfile.gettempdir() if spill_dir is None else spill_dir
        backends = self._devices.values()
        k = lib.ka_new(len(backends), [b.fd for b in backends], [b.size for b in backends],
                       list(self._devices), mem_cap // BLOCK, spill_cap // BLOCK,
                       os.fsencode(spill_dir), float(drain_wait))
        if k == ffi.NULL:
            raise MemoryError("cannot allocate the keep-aside store")
        self._k = ffi.gc(k, lib.ka_free)

    def c_parts(self):
        """(this store's C address, ka_needs's) as ints, for C code that checks ``needs`` itself
        (``nbd_plugin/writepath.c``). The store's address is valid while this object lives. O(1)."""
        return tuple(int(ffi.cast("uintptr_t", p)) for p in (self._k, ffi.addressof(lib, "ka_needs")))

    def needs(self, cycle):
        """True if a write tagged ``cycle`` must call ``keep`` before it writes. O(1), lock-free."""
        return lib.ka_needs(self._k, cycle)

    def keep(self, cycle, dev, offset, length):
        """Before a write of ``cycle`` to [offset, offset+length) lands: keep its pending blocks.

        Never raises for trouble of the store or the back end: that degrades (see the module
        doc); ``dev`` must be a key of ``devices``. Does nothing unless ``cycle`` is newer
        than the armed cycle; waits (without the GIL) until ``drained()`` if the armed cycle
        is not drained yet. O(B) for B blocks in the range (hash lookups), plus, per block
        kept, reading it and O(log K) for K blocks kept.
        """
        lib.ka_keep(self._k, cycle, self._index[dev], offset, length)

    def arm(self, cycle):
        """Start protecting cycle ``cycle``: every byte is pending. Call before the tracker
        closes ``cycle``. Arming an armed store starts over, as ``release`` would. O(1) plus
        freeing what a previous cycle left.
        """
        lib.ka_arm(self._k, cycle)

    def drained(self):
        """Every write of the armed cycle has ended (``close_cycle`` returned): keeps may read
        the back end now. Ignored when nothing is armed. O(1) plus waking waiting keeps.
        """
        lib.ka_drained(self._k)

    def install(self, data):
        """Narrow what is pending to the report's data extents and drop what was kept outside.

        ``data``: {dev: array('Q') of flat (offset, length) pairs, ascending and disjoint}; a
        sequence of (offset, length) tuples is accepted too. Devices left out have nothing
        pending. Ignored unless a cycle is armed and not degraded. Unsorted or overlapping
        extents raise ValueError and change nothing. O(E + K log E) for E extents and K
        kept blocks.
        """
        arrays = [array.array("Q") for _ in self._devices]
        for dev, pairs in data.items():
            i = self._device(dev)
            if not (isinstance(pairs, array.array) and pairs.typecode == "Q"):
                pairs = array.array("Q", itertools.chain.from_iterable(pairs))
            if len(pairs) % 2:
                raise ValueError(f"device {dev}: data extents must be (offset, length) pairs")
            arrays[i] = pairs
        pointers = [ffi.from_buffer("uint64_t[]", a) for a in arrays]
        bad = lib.ka_install(self._k, pointers, [len(a) // 2 for a in arrays])
        if bad:
            dev = list(self._devices)[bad - 1]
            raise ValueError(f"device {dev}: data extents must be ascending and disjoint")

    def read_batch(self, dev, pairs, into):
        """The copier's read of cycle N's bytes: segments back to back in ``into``, kept blocks
        laid over them; returns the filled view of ``into``.

        ``pairs``: array('Q') of (offset, length), ascending and disjoint; batches must come in
        ascending offset order per device, and a batch that starts before the end of one
        already read raises ValueError. A back-end read error raises OSError and changes
        nothing. Frees the kept blocks the batch passed. O(total length) for the read, plus
        O(S + k log K) for the overlay: S segments, k kept blocks in the batch's range, K kept
        blocks of the device.
        """
        view = memoryview(into)[:sum(pairs[1::2])]
        n = len(pairs) // 2
        if not n:
            return view
        self._devices[dev].read_batch(pairs, view)
        if lib.ka_overlay(self._k, self._device(dev), ffi.from_buffer("uint64_t[]", pairs), n,
                          ffi.from_buffer(view, require_writable=True)):
            raise ValueError(f"device {dev}: segments must be ascending and disjoint, and batches "
                             "must not go back before what was read")
        return view

    def release(self):
        """Cycle committed or abandoned: forget everything kept; ``point_in_time`` is True again.
        O(devices) plus freeing the memory and closing the spill file.
        """
        lib.ka_release(self._k)

    @property
    def point_in_time(self):
        """False once the armed cycle was degraded (its copy is not a recovery point). O(1)."""
        return self._state()[1] is None

    @property
    def degraded(self):
        """One line saying why point in time was given up for the armed cycle, or None. O(1)."""
        return self._state()[1]

    def stats(self):
        """Counters for status. O(devices).

        ``cycle`` armed (None if none), ``blocks`` held, ``mem_bytes``/``spill_bytes`` their
        bytes in memory and in the spill file, ``kept_blocks_total`` kept over the store's
        life, ``index_bytes`` the C index (at most ``index_bound``), ``extent_bytes`` the
        installed report's extents, ``degraded`` as the property.
        """
        st, reason = self._state()
        return {
            "cycle": st.cycle if st.armed else None,
            "blocks": st.blocks,
            "mem_bytes": st.mem_bytes,
            "spill_bytes": st.spill_bytes,
            "kept_blocks_total": st.kept_total,
            "index_bytes": st.index_bytes,
            "extent_bytes": st.extent_bytes,
            "degraded": reason,
        }

    def _state(self):
        st = ffi.new("struct ka_stats *")
        reason = ffi.new("char[]", _REASON_BYTES)
        degraded = lib.ka_state(self._k, st, reason, _REASON_BYTES)
        return st, (ffi.string(reason).decode(errors="replace") if degraded else None)

    def _device(self, dev):
        try:
            return self._index[dev]
        except KeyError:
            raise ValueError(f"unknown device {dev!r}") from None
