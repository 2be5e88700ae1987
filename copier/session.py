"""The replication session (claim 1): cycles, reports, copies, commits.

Theory of operation
-------------------
One worker thread runs the cycle loop; writes run on nbdkit's threads and only touch the
tracker (and, while a cycle is being copied, the keep-aside store).

Each turn of the loop takes a recovery point and handles the cycle it closes, N:

1. Arm the keep-aside store for N, then close N in the tracker. The tracker opens N+1 at
   once (writes never pause) and waits for writes still in flight in N, so N's TEs are
   complete; arming first guarantees every write of N+1 keeps what it overwrites.
2. Build N's report: per device, one merging B-tree of data TEs and one of zero/trim TEs.
   Zero ranges that no data write touched go out as WRITE_ZEROES; the rest is read.
3. Copy the SGL to every replica through the keep-aside store, then flush each replica:
   N is committed and the replicas equal the sources at RP N (a consistency group: one RP
   across all exports).

Only one cycle is copied at a time. An RP that falls due during a copy waits for it, so a
slow replica makes cycles longer (they merge) instead of queueing reports without bound.

A copy that fails (replica down, I/O error) does not lose the cycle: its report becomes the
*carry*, merged into the next cycle's report, and the loop backs off and retries with a fresh
connection. The replica is inconsistent until that next commit, which is why "committed"
only ever moves forward. The initial sync is the same mechanism: at start the carry is the
whole of every source, its data extents (holes are skipped and sent as zeros).

Without replicas (tracking only) the loop still closes cycles and keeps the last report, so
what the tracker saw can be inspected.
"""
import array
import collections
import concurrent.futures
import dataclasses
import logging
import mmap
import threading
import time

import reporter
from copier.keepaside import KeepAside
from copier.replica import Replica, ReplicaError
from tracker import KIND_DATA, KIND_TRIM, KIND_ZERO, Tracker

log = logging.getLogger("nbdrep")

# nbdcopy's request size: 1 MiB writes took twice as long per byte at an nbdkit file replica
# (initial sync of 1 GiB, scripts/bench_replication.py).
MAX_SEGMENT = 256 << 10
# Cycles of small random writes are thousands of 4 KiB segments; 64 in flight instead of 16
# cut p99 lag under fio 4k randwrite from 2.52 s to 2.18 s (scripts/bench_replication.py).
MAX_INFLIGHT = 64
# nbdcopy's default, where the replica advertises multi-conn (else one is used): a server reads
# one connection's requests one at a time, so more connections receive in parallel. 1 GiB to
# nbdkit file: 0.82 s with one, 0.68 s with four, 0.70 s with two, 0.79 s with eight.
REPLICA_CONNECTIONS = 4
# One read and one send call per batch: big enough that per-call costs vanish, small enough
# that the batch buffers stay in the CPU's last-level cache, so the send finds there what the
# read just wrote, and that a stop or a keep-aside writer waits only for one batch's read
# (about a millisecond). 32 MiB batches read at a third of the speed.
BATCH_BYTES = 4 << 20
BATCH_SEGMENTS = 8192
MAX_REPORT_EXTENTS = 1 << 20
FIRST_GRANULE = 64 << 10
HISTORY = 64
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
DRAIN_TIMEOUT = 60.0


class Stopping(Exception):
    """The session is stopping: the copy in progress is abandoned, not failed."""


@dataclasses.dataclass
class CycleRecord:
    """What status shows for one cycle."""
    cycle: int
    rp_time: float
    writes: int = 0
    extents: int = 0
    bytes_written: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_copied: int = 0
    bytes_zeroed: int = 0
    commit_time: float | None = None
    state: str = "reporting"
    error: str | None = None
    initial_sync: bool = False


@dataclasses.dataclass
class Device:
    """One source as the session sees it."""
    dev: int
    name: str
    path: str
    size: int
    backend: object
    replica_uri: str | None


@dataclasses.dataclass
class Report:
    """One cycle's report: per device, sorted disjoint extents."""
    data: dict
    zero: dict

    def extent_count(self):
        return sum(map(len, self.data.values())) + sum(map(len, self.zero.values()))

    def byte_count(self):
        return sum(n for part in (self.data, self.zero) for ext in part.values() for _, n in ext)

    def merged_with(self, other):
        """This report plus ``other`` (a carried-over failed report), re-merged."""
        devs = set(self.data) | set(other.data)
        data = {d: _union(self.data.get(d, []), other.data.get(d, [])) for d in devs}
        zero = {d: reporter.subtract(_union(self.zero.get(d, []), other.zero.get(d, [])), data[d])
                for d in devs}
        return Report(data, zero)


class Session:
    """A replication session over the plugin's back ends (``backends``: export name -> Backend)."""

    def __init__(self, config, backends, clock=time.time):
        self.devices = [Device(s.dev, s.name, s.path, backends[s.name].size, backends[s.name],
                               s.replica) for s in config.sources]
        self.cycle_seconds = config.cycle
        self.replicated = any(d.replica_uri for d in self.devices)
        self.tracker = Tracker(max_bytes=config.tracker_mem)
        self.keepaside = KeepAside({d.dev: d.backend for d in self.devices},
                                   mem_cap=config.keepaside_mem, spill_dir=config.state)
        self.clock = clock
        self.history = collections.deque(maxlen=HISTORY)
        self.last_report = None
        self.last_report_cycle = None
        self.state = "starting"
        self.committed_cycle = 0
        self.committed_rp_time = None
        self.closed_cycle = 0
        self.failures = 0
        self._carry = None
        self._draining = None
        self._buffers = None
        self._replicas = {}
        self._cond = threading.Condition()
        self._rp_requested = False
        self._stopping = False
        self._thread = None

    # -- the write path (nbdkit threads) -------------------------------------------------

    def begin_write(self, dev, offset, length):
        """Tag a write with the open cycle; keep aside what it overwrites if needed. O(1) usually."""
        cycle = self.tracker.begin()
        if self.keepaside.needs(cycle):
            try:
                self.keepaside.keep(dev, offset, length)
            except BaseException:
                self.tracker.end(cycle, dev, KIND_DATA, offset, length)
                raise
        return cycle

    def end_write(self, cycle, dev, kind, offset, length):
        """Record the write's TE in its cycle. O(1)."""
        self.tracker.end(cycle, dev, kind, offset, length)

    # -- life cycle ------------------------------------------------------------------------

    def start(self):
        """Start the cycle loop (after nbdkit's fork). The first cycle is the initial sync."""
        if self.replicated:
            self._carry = self._initial_sync_report()
        else:
            self.state = "tracking"
        self._thread = threading.Thread(target=self._run, name="nbdrep-session", daemon=True)
        self._thread.start()

    def stop(self, timeout=30.0):
        """Stop the loop after the current step and close the replicas. Bounded by ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_replicas()

    def request_rp(self):
        """Ask for an RP now; returns the id of the cycle it will close. O(1).

        If a copy is running, the RP is taken as soon as it commits, closing this same cycle.
        """
        with self._cond:
            self._rp_requested = True
            self._cond.notify_all()
            return self.tracker.cycle

    def wait_for(self, cycle, timeout):
        """Wait until ``cycle`` is committed (or, tracking only, reported). True if it was."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done_upto() >= cycle or self._stopping, timeout) \
                and self._done_upto() >= cycle

    # -- the cycle loop (worker thread) -----------------------------------------------------

    def _run(self):
        next_rp = self.clock() if self.replicated else self.clock() + self.cycle_seconds
        while self._wait_until(next_rp):
            started = self.clock()
            ok = self._guarded_cycle()
            next_rp = started + (self.cycle_seconds if ok else self._backoff())
        self.state = "stopped"

    def _guarded_cycle(self):
        """One cycle; a failure is retried later and never loses a change."""
        try:
            return self._one_cycle()
        except TimeoutError as e:
            log.warning("nbdrep: %s; retrying the RP", e)
            return self._failed("draining")
        except Exception as e:
            log.exception("nbdrep: cycle failed unexpectedly; the next cycle resyncs every source")
            if self.history and self.history[-1].state in ("reporting", "copying"):
                self.history[-1].state, self.history[-1].error = "failed", repr(e)
            self.keepaside.release()
            self._draining = None
            if self.replicated:
                self._carry = self._initial_sync_report()
            return self._failed("retrying")

    def _failed(self, state):
        self.failures += 1
        self.state = state
        return False

    def _wait_until(self, deadline):
        """Sleep until ``deadline`` or an RP request; False when stopping."""
        with self._cond:
            while not self._stopping and not self._rp_requested:
                delay = deadline - self.clock()
                if delay <= 0:
                    break
                self._cond.wait(min(delay, 1.0))
            # A retried drain closes an older cycle than the one an RP request was promised
            # (request_rp returns the open cycle), so the request waits for the next turn.
            if self._draining is None:
                self._rp_requested = False
            return not self._stopping

    def _one_cycle(self):
        """Take an RP and report (and copy) the cycle it closes. False if the copy failed."""
        if self._draining is None:
            self._draining = (self.tracker.cycle, self.clock())
            if self.replicated:
                self.keepaside.arm(self._draining[0])
        closed = self.tracker.close_cycle(timeout=DRAIN_TIMEOUT)
        cycle, rp_time = self._draining
        self._draining = None
        record = CycleRecord(cycle, rp_time, writes=closed.count, bytes_written=closed.bytes_written)
        self.history.append(record)
        report = self._build_report(closed)
        if self._carry is not None:
            record.initial_sync = self.committed_cycle == 0
            report = report.merged_with(self._carry)
        report = self._capped(report)
        record.extents = report.extent_count()
        if not self.replicated:
            return self._finish_reported(record, report)
        return self._copy_cycle(record, report)

    def _finish_reported(self, record, report):
        record.state = "reported"
        self.last_report, self.last_report_cycle = report, record.cycle
        with self._cond:
            self.closed_cycle = record.cycle
            self._cond.notify_all()
        return True

    def _copy_cycle(self, record, report):
        self.keepaside.install(report.data)
        record.state = "copying"
        self.state = "initial-sync" if record.initial_sync else "copying"
        record.bytes_total = report.byte_count()
        try:
            self._copy(record, report)
        except (ReplicaError, OSError) as e:
            return self._fail(record, report, e)
        except Stopping:
            record.state = "abandoned"
            return False
        finally:
            self.keepaside.release()
        self._commit(record, report)
        return True

    def _copy(self, record, report):
        for d in self.devices:
            replica = self._replica(d)
            self._copy_data(record, d.dev, replica, report.data.get(d.dev, []))
            zero = [(o, n, "zero") for o, n in report.zero.get(d.dev, [])]
            if zero:
                counts = replica.execute(zero, None, max_inflight=MAX_INFLIGHT)
                record.bytes_zeroed += counts["bytes_zeroed"]
                self._progress(record, record.bytes_copied + record.bytes_zeroed)
        for d in self.devices:
            self._replica(d).flush()

    def _copy_data(self, record, dev, replica, extents):
        """Send the data extents batch by batch, three stages deep.

        While batch k is sent, batch k-1 may still await its replies and batch k+1 is read
        (both the read and the wait release the GIL). So there are three buffers; batch k+1 is
        read into the one batch k-2 used, and batch k-2 was waited for before. If anything
        goes wrong with a batch in flight, the replica connection is dropped: a later cycle
        refills the buffers, and the abandoned writes must not be sent from them then.
        """
        batches = [_pack(b) for b in _batches(reporter.sgl(extents, MAX_SEGMENT))]
        if not batches:
            return
        buffers = self._batch_buffers()
        read = lambda k: self.keepaside.read_batch(dev, batches[k], buffers[k % 3])  # noqa: E731
        pending = None
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbdrep-read") as reader:
            ahead = reader.submit(read, 0)
            try:
                for k, pairs in enumerate(batches):
                    view = ahead.result()
                    if self._stopping:
                        raise Stopping()
                    if k + 1 < len(batches):
                        ahead = reader.submit(read, k + 1)
                    sent = replica.send_batch(pairs, view, max_inflight=MAX_INFLIGHT)
                    if pending is not None:
                        self._copied(record, replica.wait_batch(pending))
                    pending = sent
                self._copied(record, replica.wait_batch(pending))
                pending = None
            finally:
                if pending is not None:
                    self._close_replicas()

    def _copied(self, record, nbytes):
        record.bytes_copied += nbytes
        self._progress(record, record.bytes_copied + record.bytes_zeroed)

    def _batch_buffers(self):
        """Three batch buffers, kept for the session: fresh memory each cycle costs page faults.

        Page-aligned (mmap), not bytearrays: malloc puts large blocks 16 bytes into a page, and
        the kernel's copy into a destination that is not cache-line aligned ran 4x slower here
        (pread of page cache into a bytearray: 2.1 GB/s; into an aligned buffer: 9 GB/s).
        """
        if self._buffers is None:
            self._buffers = tuple(mmap.mmap(-1, BATCH_BYTES) for _ in range(3))
        return self._buffers

    def _progress(self, record, done):
        """Copy progress; the initial sync, which may take long, also says so every 10%."""
        before, record.bytes_done = record.bytes_done, done
        if record.initial_sync and record.bytes_total:
            tenth = record.bytes_total / 10
            if int(done / tenth) > int(before / tenth):
                log.info("initial sync: %d%% (%d of %d bytes)", 100 * done // record.bytes_total,
                         done, record.bytes_total)

    def _commit(self, record, report):
        record.state = "committed"
        record.commit_time = self.clock()
        self.last_report, self.last_report_cycle = report, record.cycle
        self._carry = None
        self.failures = 0
        self.state = "replicating"
        with self._cond:
            self.closed_cycle = self.committed_cycle = record.cycle
            self.committed_rp_time = record.rp_time
            self._cond.notify_all()

    def _fail(self, record, report, error):
        record.state = "failed"
        record.error = str(error)
        self._carry = report
        log.warning("nbdrep: cycle %d failed (%s); its report merges into the next", record.cycle, error)
        self._close_replicas()
        return self._failed("retrying")

    def _backoff(self):
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.failures - 1, 16))

    def _replica(self, d):
        replica = self._replicas.get(d.dev)
        if replica is None:
            replica = Replica(d.replica_uri, connections=REPLICA_CONNECTIONS)
            replica.check_size(d.size)
            self._replicas[d.dev] = replica
        return replica

    def _close_replicas(self):
        for replica in self._replicas.values():
            try:
                replica.close()
            except ReplicaError:
                pass
        self._replicas.clear()

    def _done_upto(self):
        return self.committed_cycle if self.replicated else self.closed_cycle

    # -- reports ------------------------------------------------------------------------------

    def _build_report(self, closed):
        data, zero = {}, {}
        for d in self.devices:
            data[d.dev] = _merge(closed.entries(d.dev, KIND_DATA))
            zeros = _merge(closed.entries(d.dev, KIND_ZERO), closed.entries(d.dev, KIND_TRIM))
            zero[d.dev] = reporter.subtract(zeros, data[d.dev])
        return Report(data, zero)

    def _capped(self, report):
        """The report within MAX_REPORT_EXTENTS per device (coarser, never smaller)."""
        for d in self.devices:
            data, zero = report.data.get(d.dev, []), report.zero.get(d.dev, [])
            if len(data) + len(zero) > MAX_REPORT_EXTENTS:
                report.data[d.dev] = coarsen(_union(data, zero), d.size)
                report.zero[d.dev] = []
        return report

    def _initial_sync_report(self):
        data, zero = {}, {}
        for d in self.devices:
            extents = d.backend.extents(0, d.size)
            data[d.dev] = [(o, n) for o, n, hole in extents if not hole]
            zero[d.dev] = [(o, n) for o, n, hole in extents if hole]
        return Report(data, zero)

    # -- status --------------------------------------------------------------------------------

    def status(self):
        """The session as a JSON-able dict (the keys ``nbdrep status --json`` prints). O(history)."""
        now = self.clock()
        return {
            "state": self.state,
            "cycle": self.tracker.cycle,
            "committed_cycle": self.committed_cycle if self.replicated else None,
            "lag": None if self.committed_rp_time is None else now - self.committed_rp_time,
            "replicated": self.replicated,
            "devices": [{"dev": d.dev, "name": d.name, "path": d.path, "size": d.size,
                         "replica": d.replica_uri} for d in self.devices],
            "cycles": [dataclasses.asdict(r) for r in self.history],
            "tracker": self.tracker.stats(),
            "keepaside": self.keepaside.stats(),
        }


def _merge(*entry_buffers):
    """Union of TE extents through the merging B-tree (the reporter). O(n log n)."""
    tree = reporter.MergingBTree(order=32)
    for buf in entry_buffers:
        tree.insert_batch(buf)
    return tree.extents()


def coarsen(extents, size, cap=None):
    """At most ``cap`` extents covering ``extents``, rounded out to a doubling granule.

    The report's memory cap (invariant 4): past it the report degrades to coarser extents,
    copying more bytes but never fewer. Every extent becomes data, since a widened zero range
    would zero bytes nobody zeroed. Ends are clipped to the device ``size``. O(n log n) a round.
    """
    cap = MAX_REPORT_EXTENTS if cap is None else cap
    granule = FIRST_GRANULE
    while len(extents) > cap:
        rounded = []
        for off, n in extents:
            start = off - off % granule
            rounded.append((start, min(size, -(-(off + n) // granule) * granule) - start))
        extents = _merge(_pack(rounded))
        granule *= 2
    return extents


def _union(a, b):
    return _merge(_pack(a), _pack(b))


def _pack(extents):
    """[(offset, length)] -> the uint64 pair buffer that insert_batch takes."""
    return array.array("Q", [v for ext in extents for v in ext])


def _batches(segments):
    """The SGL in consecutive runs of at most BATCH_BYTES and BATCH_SEGMENTS."""
    batch, size = [], 0
    for off, n in segments:
        if batch and (size + n > BATCH_BYTES or len(batch) == BATCH_SEGMENTS):
            yield batch
            batch, size = [], 0
        batch.append((off, n))
        size += n
    if batch:
        yield batch
