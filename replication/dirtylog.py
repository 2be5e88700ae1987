"""The dirty-region log: marks of the parts of each source that may hold writes not yet committed
on the replica.

After a crash of the source (kill -9 of nbdkit, power loss) nothing in memory says which writes
reached the source without reaching the replica. This log does, so the next start resyncs the
marked parts instead of the whole disk. ``dirtylog.c`` holds the theory of operation: every
write marks its fine regions (64 KiB by default: they survive kill -9) and its extents (1 MiB:
made durable by an msync the write waits for, one per group of writers, so they survive power
loss) before it reaches the back end; a region's mark is cleared once a committed cycle covers
every write to it, an extent's once it has also not been written for ``HOT_CYCLES`` cycles and
its writes are durable on the source (``durable``: the back ends write through the page cache,
which power loss takes with it). After a crash the boot id tells
which level to trust: the same boot (the page cache survived) resyncs the fine regions, a new
one the extents.

Files. Each run maps a new file ``dirty-<first cycle>-<random>.map`` in the state directory:
the extents' bitmap, then the regions' bitmap, one bit each, devices one after the other
(``describe`` gives the layout). The run starts with the marks of what it must copy first (a
sync, a resume's outstanding report, the last crash's marks), so a crash before that copy is
committed loses nothing. The replication record names the file and its layout; the record is
written after the file is complete and synced, and older files are removed only after that
(``prune``), so after a crash at any instant the record names a file that exists and is whole.

Cost: 4 bytes of memory per region and per extent, one bit each on disk: a 1 TiB source at
64 KiB regions is 68 MiB of memory and a 2.1 MiB file.
"""
import array
import functools
import glob
import os
import re
import uuid

from copier.sizes import format_size
from replication._dirtylog import ffi, lib
from replication.record import write_bytes

MIN_REGION, MAX_REGION = 4096, 1 << 30
EXTENT = 1 << 20   # the durable level; the region if that is larger
# Cycles an extent stays marked after its last write was committed: a new extent mark costs an
# msync the writer waits for, so an extent written at least every few cycles stays marked. What
# it costs after power loss: the extents written in the last HOT_CYCLES cycles (and since the
# sources' last sync: ``durable``), resynced though they may be equal (after kill -9 the regions
# say more precisely).
HOT_CYCLES = 4
PREFIX, SUFFIX = "dirty-", ".map"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


class DirtyLogError(Exception):
    """The log cannot be used; the message says why."""


def layout(devices, unit):
    """{name: [first unit, units]} for ``devices`` (each with ``name`` and ``size``) cut into
    ``unit``-byte units, one device after the other. O(devices)."""
    out, base = {}, 0
    for d in devices:
        count = -(-d.size // unit)
        out[d.name] = [base, count]
        base += count
    return out


def map_bytes(units):
    """Bytes of a bitmap of ``units`` bits: whole 64-bit words. O(1)."""
    return -(-units // 64) * 8


def boot_id():
    """This boot's id: a crash in the same boot kept the page cache, so the fine marks."""
    with open(BOOT_ID, encoding="ascii") as f:
        return f.read().strip()


class DirtyLog:
    """The log of one run over ``devices`` (each with ``dev``, ``name``, ``size``), in a new file
    of ``state_dir``, starting with ``preset`` ({dev: flat (offset, length) pairs}) marked.

    ``region`` is a power of two in [``MIN_REGION``, ``MAX_REGION``]; device ids are 0, 1, ...
    in order (as the plugin numbers its sources). ``on_sync_error()`` is called (from a writer's
    thread) the first time an msync fails. ``warm`` ({dev: flat pairs}) presets extents only:
    those the last run left hot at its clean stop, so that a restarted steady workload does not
    wait for an msync per extent again (DRBD keeps its activity log across restarts too). The file is complete and synced when this returns.
    O(regions + preset extents).
    """

    def __init__(self, state_dir, devices, region, first_cycle, preset=None, hot=HOT_CYCLES,
                 on_sync_error=None, warm=None):
        if not MIN_REGION <= region <= MAX_REGION or region & (region - 1):
            raise ValueError(f"dirty region must be a power of two in {MIN_REGION}..{MAX_REGION}, "
                             f"got {region}")
        if [d.dev for d in devices] != list(range(len(devices))):
            raise ValueError("device ids must be 0, 1, ... in order")
        self.region, self.extent = region, max(region, EXTENT)
        self.layout, self.extents = layout(devices, region), layout(devices, self.extent)
        # Never the name of a file an older record may still name: a crash before this run's
        # record is written must leave that one as it was.
        self.file = f"{PREFIX}{first_cycle}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        self.path = os.path.join(state_dir, self.file)
        self.boot_id = boot_id()
        fine_at = map_bytes(_units(self.extents))   # the extents' bitmap first
        bitmap = bytearray(fine_at + map_bytes(_units(self.layout)))
        levels = ((self.extents, self.extent, 0), (self.layout, region, fine_at * 8))
        for d in devices:
            for marks, where in ((preset, levels), (warm, levels[:1])):
                for off, length in zip(*[iter((marks or {}).get(d.dev, ()))] * 2):
                    for lay, unit, at in where if length else ():
                        base, count = lay[d.name]
                        _set_bits(bitmap, at + base + off // unit,
                                  at + base + min(count, -(-(off + length) // unit)))
        write_bytes(self.path, bytes(bitmap))
        keep = []   # what the specs point to, alive until dl_new copied it

        def spec(lay, unit, offset):
            bases, counts = [b for b, _ in lay.values()] or [0], [c for _, c in lay.values()] or [0]
            keep.extend([ffi.new("uint64_t[]", bases), ffi.new("uint64_t[]", counts)])
            return ffi.new("struct dl_level_spec *", {"shift": unit.bit_length() - 1,
                                                      "offset": offset, "base": keep[-2],
                                                      "count": keep[-1]})
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            handle = lib.dl_new(fd, len(bitmap), len(devices), spec(self.layout, region, fine_at),
                                spec(self.extents, self.extent, 0), first_cycle, hot)
        finally:
            os.close(fd)   # the mapping keeps the file
        if handle == ffi.NULL:
            raise OSError(f"cannot map the dirty-region log {self.path}")
        self._handle = ffi.gc(handle, lib.dl_free)
        self._hot = hot
        self._durable = first_cycle - 1   # what the sources hold durably, as this run knows it
        self._on_sync_error = on_sync_error
        self.sync_error = False

    def marker(self):
        """The per-write call, ``mark(cycle, dev, offset, length) -> rc``, with no Python frame
        of its own (it runs on every write). 0 is success; see ``check``. O(regions of the
        write); it waits (without the GIL) only for a new extent mark's msync."""
        return functools.partial(lib.dl_mark, self._handle)

    def c_parts(self):
        """(this log's C address, dl_mark's) as ints: ``marker`` for C code (``nbd_plugin/
        writepath.c``), holding the GIL as a call from Python would. The log's address is valid
        until ``close``. O(1)."""
        return tuple(int(ffi.cast("uintptr_t", p)) for p in (self._handle, ffi.addressof(lib, "dl_mark")))

    def mark(self, cycle, dev, offset, length):
        """Mark [offset, offset+length) of ``dev`` as written in ``cycle``. As ``marker``."""
        rc = lib.dl_mark(self._handle, cycle, dev, offset, length)
        if rc:
            self.check(rc)

    def check(self, rc):
        """Act on a non-zero ``marker`` result: an msync that failed leaves the marks in the
        mapping (they survive kill -9, maybe not power loss): ``sync_error`` is set and
        ``on_sync_error`` told, never a failed write; anything else is a bug of the caller (a
        write outside its device)."""
        if rc == lib.DL_ESYNC:
            first, self.sync_error = not self.sync_error, True
            if first and self._on_sync_error is not None:
                self._on_sync_error()
            return
        raise ValueError(f"dirty-region log: bad mark (code {rc})")

    def mark_all(self, cycle):
        """Mark everything as written in ``cycle`` (a full resync is under way). O(regions)."""
        for dev, (_, count) in enumerate(self.layout.values()):
            if count:
                self.mark(cycle, dev, 0, count * self.region)

    def commit(self, cycle):
        """Cycle ``cycle`` is committed: clear the marks it covers that have cooled down (and,
        for extents, are durable on the sources). Returns how many regions were cleared.
        O(bitmap words + marked units)."""
        return lib.dl_commit(self._handle, cycle)

    def durable(self, cycle):
        """Every write of a cycle <= ``cycle`` is durable on the sources (they were fdatasynced
        after those writes ended): the next commits may clear their extents. O(1)."""
        lib.dl_durable(self._handle, cycle)
        self._durable = max(self._durable, cycle)

    def sync_due(self, committed):
        """Whether the commit of ``committed`` may leave an extent marked only because the
        sources were not made durable lately: then a source sync is worth its fdatasyncs
        (``dirtylog.c`` says why no more often). O(1)."""
        return committed - self._hot > self._durable

    def close(self):
        """Unmap the file. No call may follow, nor be in progress. O(1)."""
        ffi.release(self._handle)

    def describe(self):
        """What the replication record keeps of this log. O(devices)."""
        return {"file": self.file, "boot_id": self.boot_id, "region": self.region,
                "layout": self.layout, "extent": self.extent, "extents": self.extents}

    def stats(self):
        """Counters for status. O(1) (takes the log's lock)."""
        st = ffi.new("struct dl_stats *")
        lib.dl_stats(self._handle, st)
        return {"region": self.region, "regions": st.regions, "marked": st.marked,
                "marked_bytes": st.marked * self.region, "extent": self.extent,
                "extents": st.extents, "extents_marked": st.extents_marked, "marks": st.marks,
                "syncs": st.syncs, "cleared": st.cleared, "sync_errors": st.sync_errors,
                "durable_cycle": self._durable}


def read(state_dir, described, current_boot=None, extents=False):
    """The marks a run left, as ({name: flat (offset, length) pairs, adjacent units joined},
    what they are): its fine regions if the machine has not restarted since (``current_boot``,
    default this boot's id), else (or if ``extents``) its extents, the only marks that were
    synced. Raises DirtyLogError saying why the log cannot be used. O(units), in C-speed runs
    of bytes."""
    if not described:
        raise DirtyLogError("no dirty-region log covers all of its writes (the log was off or "
                            "failed, or a run served the sources without replicating them)")
    path = os.path.join(state_dir, described["file"])
    try:
        with open(path, "rb") as f:
            bitmap = f.read()
        fine_at = map_bytes(_units(described["extents"]))
        expected = fine_at + map_bytes(_units(described["layout"]))
    except OSError as e:
        raise DirtyLogError(f"the dirty-region log {path} is unreadable ({e.strerror})") from None
    except (KeyError, TypeError, ValueError):
        raise DirtyLogError(f"the dirty-region log {path} is of another version") from None
    if len(bitmap) != expected:
        raise DirtyLogError(f"the dirty-region log {path} has the wrong size")
    if not extents and described["boot_id"] == (current_boot or boot_id()):
        lay, unit, at, what = described["layout"], described["region"], fine_at, "regions"
    else:
        lay, unit, at, what = described["extents"], described["extent"], 0, \
            "extents (the machine restarted since: only they were synced)"
    out = {}
    for name, (base, count) in lay.items():
        pairs = out[name] = array.array("Q")
        for lo, hi in _runs(bitmap, at * 8 + base, at * 8 + base + count):
            pairs.extend(((lo - at * 8 - base) * unit, (hi - lo) * unit))
    return out, f"{format_size(unit)} {what}"


def _units(lay):
    return sum(count for _, count in lay.values())


def _set_bits(bitmap, lo, hi):
    """Set bits [lo, hi) of ``bitmap`` (bit k is bit k % 8 of byte k // 8). O(hi - lo) / 8."""
    while lo < hi and lo % 8:
        bitmap[lo // 8] |= 1 << (lo % 8)
        lo += 1
    whole = (hi - lo) // 8
    bitmap[lo // 8:lo // 8 + whole] = b"\xff" * whole
    lo += 8 * whole
    while lo < hi:
        bitmap[lo // 8] |= 1 << (lo % 8)
        lo += 1


def _runs(bitmap, lo, hi):
    """The runs of set bits within bits [lo, hi), as (start, end), joined. Whole bytes of ones
    and zeros are skipped by the regular-expression engine, so a full or empty bitmap costs
    O(bytes) in C, not in Python."""
    out = []
    for m in re.finditer(rb"\xff+|[^\x00\xff]", bitmap[lo // 8:-(-hi // 8)]):
        start = (lo // 8 + m.start()) * 8
        if m.group()[0] == 0xff:
            bits = [(start, start + 8 * len(m.group()))]
        else:
            byte = m.group()[0]
            bits = [(start + k, start + k + 1) for k in range(8) if byte >> k & 1]
        for a, b in bits:
            a, b = max(a, lo), min(b, hi)
            if a >= b:
                continue
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
    return out


def prune(state_dir, keep):
    """Remove the log files of earlier runs but ``keep``, and any temporary file a crash left
    while one was written. O(files)."""
    for path in glob.glob(os.path.join(state_dir, PREFIX + "*" + SUFFIX + "*")):
        if os.path.basename(path) != keep:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
