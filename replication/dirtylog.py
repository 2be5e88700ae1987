"""The dirty-region log: marks of the regions that may hold writes not yet committed on the replica.

After a crash of the source (kill -9 of nbdkit, power loss) nothing in memory says which writes
reached the source without reaching the replica. This log does, region by region, so the next
start resyncs the marked regions instead of the whole disk. ``dirtylog.c`` holds the theory of
operation: a region is marked (and the mark made durable, one msync per group of writers)
before the first write to it reaches the back end, and cleared once a committed cycle covers
all of its writes and it has not been written for ``HOT_CYCLES`` cycles.

Files. Each run maps a new file ``dirty-<first cycle>-<random>.map`` in the state directory: a bitmap,
one bit per region, devices one after the other (``layout``). The run starts with the marks of
what it must copy first (a sync, a resume's outstanding report, the last crash's marks), so a
crash before that copy is committed loses nothing. The replication record names the file and
its layout (``describe``); the record is written after the file is complete and synced, and
older files are removed only after that (``prune``), so after a crash at any instant the
record names a file that exists and is whole.

Cost: 4 bytes of memory per region and one bit on disk; a 1 TiB device at the default 64 KiB
regions is 64 MiB of memory and a 2 MiB file (at 1 MiB regions: 4 MiB and 128 KiB).
"""
import array
import bisect
import functools
import glob
import os
import uuid

from replication._dirtylog import ffi, lib
from replication.record import write_bytes

MIN_REGION = 4096
# Cycles a region stays marked after its last write was committed. Marking is cheap once a
# region is marked, and a new mark costs an msync the writer waits for: a region written at
# least every few cycles stays marked. What it costs after a crash: the regions written in the
# last HOT_CYCLES cycles before it, resynced though they may be equal.
HOT_CYCLES = 4
PREFIX, SUFFIX = "dirty-", ".map"


class DirtyLogError(Exception):
    """The log cannot be used; the message says why."""


def layout(devices, region):
    """{name: [first region, regions]} for ``devices`` (each with ``name`` and ``size``), in
    order. O(devices)."""
    out, base = {}, 0
    for d in devices:
        count = -(-d.size // region)
        out[d.name] = [base, count]
        base += count
    return out


def map_bytes(regions):
    """Bytes of the bitmap file for ``regions`` regions: whole 64-bit words. O(1)."""
    return -(-regions // 64) * 8


class DirtyLog:
    """The log of one run over ``devices`` (each with ``dev``, ``name``, ``size``), in a new file
    of ``state_dir``, starting with ``preset`` ({dev: flat (offset, length) pairs}) marked.

    ``region`` is a power of two >= ``MIN_REGION``; device ids are 0, 1, ... in order (as the
    plugin numbers its sources). The file is complete and synced when this returns.
    O(regions + preset extents).
    """

    def __init__(self, state_dir, devices, region, first_cycle, preset=None, hot=HOT_CYCLES):
        if region < MIN_REGION or region & (region - 1):
            raise ValueError(f"dirty region must be a power of two >= {MIN_REGION}, got {region}")
        if [d.dev for d in devices] != list(range(len(devices))):
            raise ValueError("device ids must be 0, 1, ... in order")
        self.region = region
        self.layout = layout(devices, region)
        # Never the name of a file an older record may still name: a crash before this run's
        # record is written must leave that one as it was.
        self.file = f"{PREFIX}{first_cycle}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        self.path = os.path.join(state_dir, self.file)
        regions = sum(count for _, count in self.layout.values())
        bitmap = bytearray(map_bytes(regions))
        for d in devices:
            base, count = self.layout[d.name]
            pairs = (preset or {}).get(d.dev, ())
            for off, length in zip(pairs[0::2], pairs[1::2]):
                if length:
                    for r in range(off // region, min(count, -(-(off + length) // region))):
                        bitmap[(base + r) // 8] |= 1 << ((base + r) % 8)
        write_bytes(self.path, bytes(bitmap))
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            ordered = list(self.layout.values())
            handle = lib.dl_new(fd, len(bitmap), region.bit_length() - 1, len(ordered),
                                [b for b, _ in ordered] or [0], [c for _, c in ordered] or [0],
                                first_cycle, hot)
        finally:
            os.close(fd)   # the mapping keeps the file
        if handle == ffi.NULL:
            raise OSError(f"cannot map the dirty-region log {self.path}")
        self._handle = ffi.gc(handle, lib.dl_free)
        self.sync_error = False

    def marker(self):
        """The per-write call, ``mark(cycle, dev, offset, length) -> rc``, with no Python frame
        of its own (it runs on every write). 0 is success; see ``check``. O(regions of the
        write); it waits (without the GIL) only for a new mark's msync."""
        return functools.partial(lib.dl_mark, self._handle)

    def mark(self, cycle, dev, offset, length):
        """Mark [offset, offset+length) of ``dev`` as written in ``cycle``. As ``marker``."""
        rc = lib.dl_mark(self._handle, cycle, dev, offset, length)
        if rc:
            self.check(rc)

    def check(self, rc):
        """Act on a non-zero ``marker`` result: an msync that failed leaves the mark in the
        mapping (it survives kill -9, maybe not power loss) and is shown in status, never a
        failed write; anything else is a bug of the caller (a write outside its device)."""
        if rc == lib.DL_ESYNC:
            self.sync_error = True
            return
        raise ValueError(f"dirty-region log: bad mark (code {rc})")

    def mark_all(self, cycle):
        """Mark every region as written in ``cycle`` (a full resync is under way).
        O(regions)."""
        for dev, (_, count) in enumerate(self.layout.values()):
            if count:
                self.mark(cycle, dev, 0, count * self.region)

    def commit(self, cycle):
        """Cycle ``cycle`` is committed: clear the marks it covers that have cooled down.
        Returns how many were cleared. O(bitmap words + marked regions)."""
        return lib.dl_commit(self._handle, cycle)

    def close(self):
        """Unmap the file. No call may follow, nor be in progress. O(1)."""
        ffi.release(self._handle)

    def describe(self):
        """What the replication record keeps of this log. O(devices)."""
        return {"file": self.file, "region": self.region, "layout": self.layout}

    def stats(self):
        """Counters for status. O(1) (takes the log's lock)."""
        st = ffi.new("struct dl_stats *")
        lib.dl_stats(self._handle, st)
        return {"region": self.region, "regions": st.regions, "marked": st.marked,
                "marked_bytes": st.marked * self.region, "marks": st.marks, "syncs": st.syncs,
                "cleared": st.cleared, "sync_errors": st.sync_errors}


def read(state_dir, described):
    """The marks a run left, as {name: flat (offset, length) pairs, region-aligned, adjacent
    regions joined}, from the record's ``described`` log. Raises DirtyLogError saying why it
    cannot be used. O(regions)."""
    if not described:
        raise DirtyLogError("no dirty-region log covers all of its writes (the log was off or "
                            "failed, or a run served the sources without replicating them)")
    path = os.path.join(state_dir, described["file"])
    region, lay = described["region"], described["layout"]
    try:
        with open(path, "rb") as f:
            bitmap = f.read()
    except OSError as e:
        raise DirtyLogError(f"the dirty-region log {path} is unreadable ({e.strerror})") from None
    regions = sum(count for _, count in lay.values())
    if len(bitmap) != map_bytes(regions):
        raise DirtyLogError(f"the dirty-region log {path} has the wrong size")
    out = {name: array.array("Q") for name in lay}
    spans = sorted((base, base + count, name) for name, (base, count) in lay.items())
    for i in (i for i, byte in enumerate(bitmap) if byte):
        for bit in range(8):
            if bitmap[i] >> bit & 1:
                _add(out, spans, i * 8 + bit, region)
    return out


def _add(out, spans, r, region):
    """Add global region ``r`` to its device's pairs in ``out``, joining it to the last."""
    k = bisect.bisect_right(spans, (r, float("inf"))) - 1
    if k < 0 or r >= spans[k][1]:
        return   # padding bits past the last device
    base, _, name = spans[k]
    pairs, at = out[name], (r - base) * region
    if pairs and pairs[-2] + pairs[-1] == at:
        pairs[-1] += region
    else:
        pairs.extend((at, region))


def prune(state_dir, keep):
    """Remove the log files of earlier runs but ``keep``. O(files)."""
    for path in glob.glob(os.path.join(state_dir, PREFIX + "*" + SUFFIX)):
        if os.path.basename(path) != keep:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
