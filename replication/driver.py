"""The replication session: the thin driver that performs the controller's actions.

Theory of operation
-------------------
``replication.machine.Controller`` decides; this module does. One worker thread waits for
the machine's next deadline, an RP request or a stop, hands the machine the event, and
performs the actions it returns with the real parts: the tracker (close a cycle), the
keep-aside (arm, drained, install, release), the reporter (build the report) and the copier
(copy, flush). Each action's outcome is the next event. Writes run on nbdkit's threads and
only touch the tracker, the dirty-region log (marked before the back end) and, while a cycle
is copied, the keep-aside, through ``WriteHook``. At each point-in-time commit the worker
writes the replication record when it is due (``_record_due``: at most once per
``RECORD_INTERVAL`` s, unless an RP was requested or a replica is a receiver), commits to
the receivers (closing the data connections if a record may land late), clears the
dirty-region log's marks the commit covers and appends the cycle history (``_committed``).
Every record after the start's is written by a thread of its own, in the order submitted
(``_save_record``); the worker waits for it but for a periodic one, which nothing waits for.
When the log's extents wait for the sources to be durable, another thread fdatasyncs them
(``_sync_sources_if_due``).

Locks:

* ``Session._cond`` guards the controller (its state, records, carry), the pending RP
  request, the stopping flag, the published report (``last_report``, ``last_report_cycle``),
  the count of requests retried on connections since closed, ``_performed_upto`` (the newest
  commit performed), ``_asked`` (the newest cycle requested), ``_rerecord`` and which
  dirty-region log is open (``dirty``). The worker holds it only to hand the machine an
  event, never while it performs an action, so ``status`` and ``request_rp`` answer at once
  during a copy. ``wait_for`` waits on it for commits.
* The replica connections (``_replicas``) belong to the worker thread, which opens and
  closes them. The one exception is ``stop``: a worker still inside a call to a replica that
  stopped answering gets that call cancelled (``Replica.close`` from another thread wakes the
  C call, which frees its connections as it returns; nothing is freed under it).

The copy sends each device's data extents batch by batch, three stages deep: while batch k
is sent, batch k-1 may still await its replies and batch k+1 is read (the read and the wait
run without the GIL). Three page-aligned buffers, reused every cycle: batch k+1 is read into
the buffer batch k-2 used, and batch k-2 was waited for before. A batch's buffer belongs to
the copier from ``send_batch`` until ``wait_batch`` returned or the connections closed.
Zero extents go out as one batch of WRITE_ZEROES per device. Batches that were waited for
have landed; after a failure they count as done only if a FLUSH on a fresh connection makes
them durable, else the whole report is carried.
"""
import concurrent.futures
import logging
import mmap
import threading
import time

from copier.keepaside import KeepAside
from copier.receiver import Link as ReceiverLink, handshake as receiver_handshake, meta_uri
from copier.replica import Replica, ReplicaError
from copier.verify import sample_differs
from nbd_plugin._io import ffi as io_ffi, lib as io_lib
from replication import dirtylog, history, machine as m, record as records
from reporter import report as reports, sgl_batches
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
MAX_REPORT_EXTENTS = reports.MAX_EXTENTS
DRAIN_TIMEOUT = 60.0
# How long a stop waits for a worker held elsewhere once its replica calls are cancelled.
STOP_GRACE = 1.0
# Of a stop's timeout, what is kept to record an abandoned copy's outstanding report: a report
# at its cap (a million extents) took 2 s to write.
PERSIST_RESERVE = 5.0
# The record is written at a commit at most once per this many seconds (unless ``_record_due``
# says otherwise): its two fsyncs and a rename were the largest and most variable fixed cost of
# a cycle (0.5-17 ms under load, scripts/bench_replication.py), once per commit; at the default
# 1 s cycles every commit is still recorded, at 0.25 s one in four. Those periodic records are
# written behind the worker, on the record thread, while it goes on to the next RP: a device
# flush of the state directory's disk held up by a neighbour's fsyncs kept the worker in fsync
# for over 2.5 s, and no RP was taken meanwhile (issue 11).
#
# Why a record that names an older commit than the replica holds is safe. It is made only
# here, after the replicas' flush, so it never names a cycle the replica does not hold, however
# late the record thread writes it; records land in the order made, so a newer one is never
# replaced by an older (the stop's waits for those before it). After
# a crash a record of a run in progress makes plan() resync what the dirty-region log marked,
# and dl_commit clears a mark only once a commit covered every write to it, whatever the
# record says (dirtylog.c): so every part that may differ is marked however old the record's
# commit (invariants 1 and 7), and the replica equals the source again once that resync
# commits (invariant 3). Nothing else in the record changes at a commit: the session, the
# dirty-region log it names (an msync failure rewrites the record at once: ``_rerecord``),
# the replicas, the sources' identities but their times (which a crash's plan ignores), and
# ``next_cycle``, reserved ``records.RESERVE`` ids ahead, which a second of cycles cannot use
# up. What it costs: after a crash, status shows the older commit until the first new one. A
# receiver that took a newer commit than the record names would read as another history and
# be resynced in full, so where any replica is a receiver every commit is recorded first, and
# the worker waits for it.
RECORD_INTERVAL = 1.0
KINDS = (KIND_DATA, KIND_ZERO, KIND_TRIM)


class Stopping(Exception):
    """The stop's timeout ran out: the copy in progress is abandoned, not failed."""


class Device:
    """One source as the session sees it."""

    __slots__ = ("dev", "name", "path", "size", "backend", "replica_uri", "identity", "replica_size")

    def __init__(self, dev, name, path, size, backend, replica_uri):
        self.dev, self.name, self.path, self.size = dev, name, path, size
        self.backend, self.replica_uri = backend, replica_uri


class WriteHook:
    """The plugin's two calls per write: ``begin`` before the back end changes, ``end`` after.

    ``begin`` tags the write with the open cycle and, while a cycle is being copied, keeps
    aside the bytes it is about to overwrite; ``end`` records its TE. O(1) usually.

    ``parts`` is the same bracket for C: the plugin's one-call write (``nbd_plugin/
    writepath.c``, whose WP_* constants name the slots) calls the tracker, the dirty-region log
    and the keep-aside through these addresses, and hands what it cannot finish back to
    ``begun``, ``end`` or ``end_failed``. Ownership: the hook owns the array, and holds the
    Python objects that own what each address points at (the tracker, the keep-aside, the
    dirty-region log while it logs to it), so an address is valid while the hook holds its
    owner; the functions live in extension modules, which are never unloaded. ``log_to`` changes
    the log's two slots; it is called before the first write and after the last, as for the
    Python path.
    """

    __slots__ = ("_tracker", "_keepaside", "_dirty", "_mark", "parts")

    def __init__(self, tracker, keepaside):
        self._tracker, self._keepaside = tracker, keepaside
        self._dirty = self._mark = None
        self.parts = io_ffi.new("uintptr_t[]", io_lib.WP_PARTS)
        self.parts[io_lib.WP_TRACKER:io_lib.WP_TR_END + 1] = tracker.c_parts()
        self.parts[io_lib.WP_KA:io_lib.WP_KA_NEEDS + 1] = keepaside.c_parts()

    def log_to(self, dirty):
        """Mark every write in the dirty-region log ``dirty`` before it reaches the back end
        (from now on: call before the first write is served); None: stop marking."""
        self._dirty, self._mark = dirty, dirty and dirty.marker()
        self.parts[io_lib.WP_DIRTY:io_lib.WP_DL_MARK + 1] = dirty.c_parts() if dirty else (0, 0)

    def begin(self, dev, offset, length):
        """Start a write; returns the token to hand to ``end``. O(1) unless it keeps aside or
        marks a new region in the dirty-region log (then it waits for that mark's msync)."""
        cycle = self._tracker.begin()
        marked = 0 if self._mark is None else self._mark(cycle, dev, offset, length)
        return self.begun(cycle, marked, dev, offset, length)

    def begun(self, cycle, marked, dev, offset, length):
        """The rest of ``begin`` for a write the tracker began in ``cycle`` and the dirty-region
        log marked with result ``marked`` (0: done, or no log): the way back into Python of the
        one-call write. Returns ``cycle``; raises having ended the write."""
        if marked:
            try:
                self._dirty.check(marked)
            except BaseException:
                self._tracker.end(cycle, dev, KIND_DATA, offset, length)
                raise
        if self._keepaside.needs(cycle):
            try:
                self._keepaside.keep(cycle, dev, offset, length)
            except BaseException:
                self._tracker.end(cycle, dev, KIND_DATA, offset, length)
                raise
        return cycle

    def end(self, cycle, dev, kind, offset, length):
        """Record the write's TE in its cycle. O(1) amortised."""
        self._tracker.end(cycle, dev, kind, offset, length)

    def end_failed(self, rc, cycle, dev, kind, offset, length):
        """Raise what ``end`` would have for the one-call write's tr_end result ``rc``."""
        self._tracker.end_failed(rc, cycle, dev, kind, offset, length)


class Session:
    """A replication session over the plugin's back ends (``backends``: export name -> Backend).

    ``replica_sizes`` {export name: bytes} as the start-up check found them. The durable record
    in ``config.state`` decides how the session starts (``replication.record``); a record that
    cannot be read raises RecordError here, before anything is served.
    """

    def __init__(self, config, backends, replica_sizes=None, clock=time.time):
        self.devices = [Device(s.dev, s.name, s.path, backends[s.name].size, backends[s.name],
                               s.replica) for s in config.sources]
        self.replicated = any(d.replica_uri for d in self.devices)
        self.state_dir = config.state if self.replicated else None
        for d in self.devices:
            d.identity = records.identity(d.path, d.backend.fd, d.size)
            d.replica_size = (replica_sizes or {}).get(d.name)
        self.dirty_region = config.dirty_region if self.replicated else 0
        self.dirty = None
        self._warm = {}   # {name: extents} the last run left hot at its clean stop
        self.resync_bytes = 0   # what this run started by copying for a sync or a crash
        self._performed_upto = 0   # newest commit whose Commit action was performed
        self._record_at = None    # time.monotonic() of this run's last record at a commit
        self._asked = 0   # newest cycle request_rp named: its commit writes the record
        self._rerecord = False    # the record must be written now (the dirty-region log failed)
        self.plan = self._plan(config.resync == "full") if self.replicated else None
        if self.plan is not None:
            receiver_handshake(self.plan, self.devices)
        self.tracker = Tracker(max_bytes=config.tracker_mem,
                               first_cycle=self.plan.first_cycle if self.plan else 1)
        self.keepaside = KeepAside({d.dev: d.backend for d in self.devices},
                                   mem_cap=config.keepaside_mem, spill_cap=config.keepaside_spill,
                                   spill_dir=config.state)
        self.hook = WriteHook(self.tracker, self.keepaside)
        self.clock = clock
        self.cycle_seconds = config.cycle
        self.sizes = {d.dev: d.size for d in self.devices}
        self.last_report = None
        self.last_report_cycle = None
        self.controller = None
        self._cond = threading.Condition()
        self._request = 0
        self._stopping = False
        self._abandon = False
        self.record_error = None   # why the record could not be written last time, or None
        self.history = history.Writer(self.state_dir) if self.state_dir else None
        self._thread = None
        self._replicas = {}
        self.receivers = (ReceiverLink([d.replica_uri for d in self.devices if d.replica_uri],
                                       ours=[d.replica_uri for d in self.devices
                                             if d.dev in self.plan.resume],
                                       committed=self.plan.committed_cycle)
                          if self.replicated else None)
        self._retried_before = 0   # requests retried on replica connections since closed
        self._buffers = None
        self._reader = None   # _reader_thread
        self._syncer = self._sync = None   # _sync_sources_if_due: its thread, its last job
        self._recorder = self._record = None   # _save_record: its thread, its last unwaited job

    def _plan(self, resync_full):
        record = records.load(self.state_dir) if self.state_dir else None
        marks, marked = None, None
        if record is not None and not record["clean"]:
            try:
                marks, marked = dirtylog.read(self.state_dir, record.get("dirty_log"))
                # After kill -9 the crashed run's committed writes may still be only in the
                # sources' page cache, their regions unmarked: their extents start marked
                # (warm), cleared once a source sync made them durable (dirtylog.c).
                self._warm, _ = dirtylog.read(self.state_dir, record["dirty_log"], extents=True)
            except dirtylog.DirtyLogError as e:
                marks = str(e)
        elif record is not None and record.get("dirty_log"):
            try:   # the extents the last run left hot: this one starts with them marked
                self._warm, _ = dirtylog.read(self.state_dir, record["dirty_log"], extents=True)
            except dirtylog.DirtyLogError:
                pass   # only a warm start lost: those extents are marked anew when written
        return records.plan(record, self.devices, resync_full, sample=self._sample, marks=marks,
                            marked=marked)

    @staticmethod
    def _sample(d, offsets):
        """Where the replica of ``d`` first differs from the source at ``offsets``, or None.
        Unreachable now (it was reachable at the start-up check a moment ago): treated as
        different, the safe side."""
        try:
            return sample_differs(d.backend.fd, d.replica_uri, offsets)
        except ReplicaError:
            return offsets[0] if offsets else 0

    # -- life cycle (nbdkit's threads) ------------------------------------------------------

    def start(self):
        """Start the worker (after nbdkit's fork). The first cycle copies what the plan says:
        a full sync of the sources that need one, what a clean stop left outstanding of the
        others (often nothing)."""
        carry, plan = None, self.plan
        if plan is not None:
            full = reports.whole(self.source_extents(plan.full)) if plan.full else reports.Report()
            carry = full
            for report in plan.resume.values():
                carry = carry.merged_with(report, self.sizes)
            self.resync_bytes = carry.byte_count() if plan.full or plan.crashed else 0
            self._performed_upto = plan.committed_cycle
        if self.state_dir is not None:
            # Before the first write is served (nbdkit calls this after binding its sockets,
            # before accepting a client, so a start that fails earlier leaves the last record
            # as it was): from here on a crash must read as a run in progress, a resync of what
            # the dirty-region log marks, not as the last run's clean stop, whose outstanding
            # report lacks this run's writes. The log starts with what this run must copy
            # first marked, and is complete on disk before the record names it.
            # Raises if either cannot be written: better not to serve than to lose a change.
            if self.dirty_region:
                self.dirty = dirtylog.DirtyLog(
                    self.state_dir, self.devices, self.dirty_region, plan.first_cycle,
                    {dev: reports.merge(carry.data_of(dev), carry.zero_of(dev))
                     for dev in self.sizes}, on_sync_error=self._dirty_log_failed,
                    warm={d.dev: self._warm[d.name] for d in self.devices
                          if d.name in self._warm and d.dev in plan.resume})
                self.hook.log_to(self.dirty)
            records.save(self.state_dir, self._make_record(False, None, plan.committed_cycle,
                                                           plan.rp_time))
            dirtylog.prune(self.state_dir, self.dirty.file if self.dirty else None)
        if plan is not None:
            for reason in sorted(set(plan.full.values())):
                log.info("%s: %s", ", ".join(repr(d.name or "(default)") for d in self.devices
                                               if plan.full.get(d.dev) == reason), reason)
            log.info("session %s starts at cycle %d: %s", plan.session_id, plan.first_cycle, plan.how)
        self.controller = m.Controller(
            sizes=self.sizes, replicated=self.replicated, cycle_seconds=self.cycle_seconds,
            now=self.clock(), first_cycle=self.tracker.cycle, carry=carry or None,
            carry_is_sync=bool(plan and (plan.full or plan.crashed)),
            committed=(plan.committed_cycle, plan.rp_time) if plan else None)
        self._thread = threading.Thread(target=self._run, name="nbdrep-session", daemon=True)
        self._thread.start()

    def stop(self, timeout=30.0):
        """Stop cleanly, within ``timeout`` s if it can: finish the cycle in progress, take a
        final RP, copy and commit it, and record the stop. True if the worker ended.

        Call once the hosts are gone (nbdkit's cleanup), so that no write is in flight. When
        ``timeout`` runs out, the copy in progress is abandoned (between two batches, and a
        call to a replica that stopped answering is cancelled) and what it left is recorded
        as outstanding, for the next start to copy. A worker held up elsewhere -- a drain
        waiting for a hung write -- gets ``STOP_GRACE`` s more, then is left to end on its own;
        the caller must not close the back ends under it.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        reserve = min(PERSIST_RESERVE, timeout / 2)
        self._thread.join(timeout - reserve)
        if self._thread.is_alive():
            self._abandon = True
            for replica in list(self._replicas.values()):
                replica.close()
            self._thread.join(reserve + STOP_GRACE)
        if self._thread.is_alive():
            return False
        self._close_dirty_log()
        return True

    def _dirty_log_failed(self):
        """An msync of the dirty-region log failed (a writer's thread): its marks may not
        survive power loss, so the worker drops it from the record at once (a crash then
        resyncs in full) rather than at the next commit, which a replica that is down delays."""
        log.error("dirty-region log: msync failed; until restart a crash resyncs in full")
        with self._cond:
            self._rerecord = True
            self._cond.notify_all()

    def _close_dirty_log(self):
        """Unmap the dirty-region log once the worker ended and no host is left: a mapped file
        keeps its file system busy (a state directory on its own mount could not be unmounted)."""
        with self._cond:   # status reads it under the lock
            dirty, self.dirty = self.dirty, None
        if dirty is not None:
            self.hook.log_to(None)
            dirty.close()

    def request_rp(self):
        """Ask for an RP now; returns the id of the cycle it will close (the open one). O(1).

        If a cycle is being copied, the RP is taken as soon as it commits.
        """
        with self._cond:
            cycle = self.tracker.cycle
            self._request = max(self._request, cycle)
            self._asked = max(self._asked, cycle)
            self._cond.notify_all()
            return cycle

    def wait_for(self, cycle, timeout):
        """Wait until ``cycle`` is committed (or, tracking only, reported), and its commit is
        performed (the receivers, the dirty-region log; the record too if ``cycle`` was
        requested with ``request_rp``, see ``_record_due``). True if it was."""
        def done():
            return self.controller.done_upto() >= cycle and \
                (not self.replicated or self._performed_upto >= cycle)
        with self._cond:
            return self._cond.wait_for(lambda: done() or self._stopping, timeout) and done()

    def status(self):
        """The session as a JSON-able dict (what ``nbdrep status --json`` prints). O(history)."""
        with self._cond:
            out = self.controller.status(self.clock())
            out["session_id"] = self.plan.session_id if self.plan else None
            out["start"] = self.plan.how if self.plan else None
            out["record_error"] = self.record_error
            out["history_error"] = self.history.error if self.history else None
            out["last_stop_clean"] = None if self.plan is None or self.plan.crashed is None \
                else not self.plan.crashed
            out["resync"] = self._resync_status(out["cycles"])
            device_totals, connected = out.pop("device_totals"), set(self._replicas)
            retried = self._retried_before + sum(
                r.stats()["retried"] for r in list(self._replicas.values()))
            out["dirty_log"] = None if self.dirty is None else \
                {**self.dirty.stats(), "sync_error": self.dirty.sync_error}
        out.update({
            "cycle": self.tracker.cycle,
            "devices": [{"dev": d.dev, "name": d.name, "path": d.path, "size": d.size,
                         "replica": d.replica_uri, "replica_connected": d.dev in connected,
                         "totals": device_totals[d.dev]} for d in self.devices],
            "tracker": self.tracker.stats(),
            "keepaside": self.keepaside.stats(),
            "requests_retried": retried,
        })
        return out

    def _resync_status(self, cycles):
        """The resync this run started with (a sync, or the marked regions after a crash):
        its reason, bytes and bytes done so far, or None. O(history)."""
        if not self.resync_bytes:
            return None
        if self.controller.committed_cycle >= self.plan.first_cycle:
            done = self.resync_bytes
        else:
            done = max((c["bytes_done"] for c in cycles if c["initial_sync"]), default=0)
        return {"reason": self.plan.how, "bytes_total": self.resync_bytes,
                "bytes_done": min(done, self.resync_bytes)}

    def report_json(self):
        """The newest report's extents per export, for ``nbdrep report``. O(extents)."""
        with self._cond:
            report, cycle = self.last_report, self.last_report_cycle
        names = {d.dev: d.name for d in self.devices}
        return {"cycle": cycle, "exports": {} if report is None else report.as_json(names)}

    def full_report(self):
        """Every source's data extents as data and its holes as zeros: a full resync.
        O(extents)."""
        return reports.whole(self.source_extents({d.dev for d in self.devices}))

    def source_extents(self, devs):
        """{dev: [(offset, length, is_hole)]} for the devices ``devs``. A source whose extents
        cannot be listed, for whatever reason, counts as all data: this also runs in the
        worker's error path and must not fail itself. O(extents)."""
        extents = {}
        for d in self.devices:
            if d.dev in devs:
                try:
                    extents[d.dev] = d.backend.extents(0, d.size)
                except Exception:
                    extents[d.dev] = [(0, d.size, False)]
        return extents

    # -- the worker ---------------------------------------------------------------------------

    def _run(self):
        try:
            while self.controller.state != m.State.STOPPED:
                try:
                    with self._cond:
                        actions = self._handle_locked(self._next_event_locked())
                    self._perform_all(actions)
                except m.ProtocolError as e:
                    # A bug of this module or the machine. Writes are still tracked, so
                    # nothing is lost while it is shown, logged and retried once a second;
                    # a stop ends the worker here, since the machine may have no way to stop
                    # from the state it was left in.
                    log.exception("replication controller error")
                    with self._cond:
                        self.controller.stuck = f"internal error: {e}"
                        if self._stopping:
                            return
                        self._cond.wait(1.0)
        finally:
            if self._syncer is not None:   # first: the log is closed once the worker ended
                self._syncer.shutdown()
            if self._recorder is not None:   # a record written behind lands before stop returns
                self._recorder.shutdown()
            self._close_replicas()
            if self._reader is not None:
                self._reader.shutdown()

    def _next_event_locked(self):
        """Wait for a stop, an RP request or the machine's deadline; return that event."""
        while True:
            if self._rerecord:   # not an event of the machine: the record, on its own
                self._rerecord = False
                self._cond.release()
                try:
                    self._save_record(clean=False)
                finally:
                    self._cond.acquire()
            if self._stopping:
                return m.Stop()
            if self._request > self.controller.done_upto():
                cycle, self._request = self._request, 0
                return m.RpRequested(cycle)
            delay = self.controller.wake_at - self.clock()
            if delay <= 0:
                return m.Timer()
            self._cond.wait(min(delay, 1.0))

    def _handle_locked(self, event):
        actions = self.controller.handle(event, self.clock())
        self._cond.notify_all()
        return actions

    def _perform_all(self, actions):
        """Perform actions in order; each outcome is an event that may add more. After an
        unexpected error the rest of the batch is dropped: the machine decides anew."""
        queue = list(actions)
        while queue:
            event = self._perform_guarded(queue.pop(0))
            if event is None:
                continue
            if isinstance(event, m.Failed) and event.resync is not None:
                queue.clear()
            with self._cond:
                queue.extend(self._handle_locked(event))

    def _perform_guarded(self, action):
        """Perform one action; an unexpected error becomes a failure with a full resync,
        since a bug may have lost TEs, and never ends the worker."""
        try:
            return self._perform(action)
        except Exception as e:
            log.exception("cycle step %s failed unexpectedly; the next cycle resyncs every "
                          "source", type(action).__name__)
            self._close_replicas()
            if self.dirty is not None:   # until that resync is committed, a crash repeats it
                self.dirty.mark_all(self.tracker.cycle)
            return m.Failed(f"unexpected error: {e!r}", resync=self.full_report())

    def _perform(self, action):
        kind = type(action)
        if kind is m.Arm:
            self.keepaside.arm(action.cycle)
        elif kind is m.CloseCycle:
            try:
                return m.Drained(self.tracker.close_cycle(timeout=DRAIN_TIMEOUT,
                                                          on_drained=self.keepaside.drained))
            except TimeoutError as e:
                return m.DrainTimedOut(str(e), self.tracker.draining)
        elif kind is m.BuildReport:
            return m.Reported(reports.build(action.closed, self.sizes, KINDS, action.carry,
                                            MAX_REPORT_EXTENTS, action.zeros_as_data))
        elif kind is m.Copy:
            return self._copy(action.report)
        elif kind is m.Flush:
            return self._flush()
        elif kind is m.Commit:
            return self._committed(action)
        elif kind is m.Publish:
            self._publish(action.report, action.cycle)
        elif kind is m.Release:
            self.keepaside.release()
        elif kind is m.Disconnect:
            self._close_replicas()
        elif kind is m.Persist:
            self._persist(action)
        elif kind is m.Log:
            getattr(log, action.level)("%s", action.message)
        else:
            raise TypeError(f"unknown action {action!r}")
        return None

    def _publish(self, report, cycle):
        with self._cond:
            self.last_report, self.last_report_cycle = report, cycle

    def _committed(self, action):
        """Record a commit; a Failed with a resync of the sources whose receivers turned out
        to hold another history (restarted on another state directory), else None."""
        self._publish(action.report, action.cycle)
        diverged = {}
        if action.point_in_time:
            if self.receivers is not None:   # so that one met for the first time is known to be a
                # receiver (``has_receivers``) before _record_due decides whether to wait
                self.receivers.fence_new(self.plan.session_id, action.cycle)
            wait = self._record_due(action.cycle)
            if wait is not None:
                self._save_record(clean=False, wait=wait)
            if self.receivers is not None:   # receivers show the cycle only now
                self.receivers.commit(self.plan.session_id, action.cycle,
                                      self.controller.committed_rp_time)
                diverged = self.receivers.take_diverged()
                if self.receivers.unsettled:   # a late record must meet a fence, not new writes
                    self._close_replicas()
            if self.dirty is not None:   # every write of a cycle <= action.cycle is committed
                self.dirty.commit(action.cycle)
                self._sync_sources_if_due(action.cycle)
            with self._cond:
                self._performed_upto = action.cycle
                self._cond.notify_all()
        if action.outage is not None:
            log.info("replica back: cycle %d committed after %.1f s of failures", action.cycle,
                     action.outage)
        if self.history is not None:   # for nbdrep plot: this cycle and the failures before it
            with self._cond:
                lines = self.history.take(self.controller.history)
            self.history.append(lines)
        if diverged:
            devs = {d.dev for d in self.devices if d.replica_uri and meta_uri(d.replica_uri) in diverged}
            if self.dirty is not None:   # until that resync is committed, a crash repeats it
                self.dirty.mark_all(self.tracker.cycle)
            return m.Failed("; ".join(f"receiver {u}: {why}: full resync" for u, why in diverged.items()),
                            resync=reports.whole(self.source_extents(devs)))
        return None

    def _record_due(self, cycle):
        """Whether the commit of ``cycle`` writes the record (``RECORD_INTERVAL`` says why it
        may not), and whether the worker waits for it: None for no record; True (waited for)
        for a requested RP (``wait_for`` returns with it recorded; a request may name a cycle a
        timer's RP is already closing), where a replica is a receiver (recorded before it takes
        the commit), while the last write failed (its error stays in status until one is
        written) or the dirty-region log must leave the record; False (written behind) for
        the run's first commit and once ``RECORD_INTERVAL`` s passed since the last. O(1)."""
        with self._cond:
            wanted = max(self.controller.rp_wanted, self._asked)
            requested = self._performed_upto < wanted <= cycle
            rerecord, self._rerecord = self._rerecord, False   # this record drops the log
        now = time.monotonic()
        wait = requested or rerecord or self.record_error is not None or \
            (self.receivers is not None and self.receivers.has_receivers())
        if wait or self._record_at is None or now - self._record_at >= RECORD_INTERVAL:
            self._record_at = now
            return wait
        return None

    def _persist(self, action):
        """Record the stop. A clean one adds the open cycle's TEs to what is outstanding: the
        writes after the last RP, which no report holds (the hosts are gone, so none is in
        flight; if one is, the stop is recorded as unclean). The sources are made durable
        first: a clean record vouches for them, and their identities are taken after."""
        outstanding, clean = action.outstanding, action.clean
        if clean:
            try:
                closed = self.tracker.close_cycle(timeout=STOP_GRACE)
                for d in self.devices:
                    d.backend.flush()
            except (TimeoutError, OSError) as e:
                log.warning("stop not recorded as clean: %s", e)
                clean, outstanding = False, None
            else:
                left = reports.build(closed, self.sizes, KINDS, zeros_as_data=action.zeros_as_data)
                outstanding = left if outstanding is None else left.merged_with(outstanding, self.sizes)
        if not self._save_record(clean, outstanding, exact=True):
            log.error("stopped, but the record could not be written: the next start resyncs "
                      "what the dirty-region log marked (in full without the log)")
            return
        what = "nothing" if not outstanding else f"{outstanding.byte_count()} bytes"
        log.info("stopped %s; %s outstanding for the next start", "cleanly" if clean else
                 "without a clean record (the next start resyncs what the dirty-region log "
                 "marked, in full without the log)", what)

    def _save_record(self, clean, outstanding=None, exact=False, wait=True):
        """Make the record now and write it on the record thread, after every record made
        before it. ``wait``: return once it is written, True if it was; else return None at
        once (a periodic record: nothing waits for it, and a newer one replaces it if its write
        has not started yet, so they never queue up behind a slow disk)."""
        if self.state_dir is None:
            return True
        record = self._make_record(clean, outstanding, self.controller.committed_cycle,
                                   self.controller.committed_rp_time, exact)
        previous, self._record = self._record, None
        if previous is not None and not previous.cancel() and previous.done():
            previous.result()   # a bug's exception, raised on the worker as it was before
        if self._recorder is None:
            self._recorder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbdrep-record")
        job = self._recorder.submit(self._store_record, record)
        if wait:
            return job.result()
        self._record = job
        return None

    def _store_record(self, record):
        """Write ``record`` (the record thread); True if it was. One that cannot be written (a
        full state directory) is logged and shown in status, never a failed cycle: the record
        on disk then is an older one of a run in progress, so the next start resyncs what the
        dirty-region log marked (in full without the log), which is safe; the next commit's
        record is waited for (``_record_due``)."""
        try:
            records.save(self.state_dir, record)
        except OSError as e:
            if self.record_error is None:
                log.error("cannot write the replication record in %s (%s); until it can be "
                          "written, a restart resyncs what the dirty-region log marked (in full "
                          "without the log)", self.state_dir, e.strerror or e)
            self.record_error = f"{e.strerror or e}"
            return False
        self.record_error = None
        return True

    def _make_record(self, clean, outstanding, committed_cycle, rp_time, exact=False):
        """The record's content as of now (the tracker's open cycle, the dirty-region log's
        state), made by the caller, never on the record thread. ``exact``: the open cycle is
        the next id (a stop); otherwise ids are reserved ahead."""
        return records.make(
            self.plan.session_id, clean=clean, committed_cycle=committed_cycle, rp_time=rp_time,
            next_cycle=self.tracker.cycle + (0 if exact else records.RESERVE),
            sources={d.name: records.identity(d.path, d.backend.fd, d.size) for d in self.devices},
            replicas={d.name: {"uri": d.replica_uri, "size": d.replica_size} for d in self.devices},
            outstanding=outstanding, names={d.dev: d.name for d in self.devices},
            dirty_log=self.dirty.describe() if self.dirty and not self.dirty.sync_error else None)

    def _sync_sources_if_due(self, committed):
        """Let the dirty-region log clear extents whose writes are committed: once a commit
        finds them waiting for the sources to be durable (``DirtyLog.sync_due``), fdatasync
        every source on a thread of its own (never in the cycle's path), then tell the log up
        to which cycle. That cycle is taken first, on the worker, which alone closes cycles:
        every cycle before the open one has ended all its writes (drained), but one whose
        drain timed out. Once a flush of a source failed (``Backend.flush_error``: this
        sync's or a host's FLUSH), none is tried again: its lost writes never become
        durable, so the extents stay marked until a restart, which resyncs them after a
        crash."""
        if any(d.backend.flush_error for d in self.devices) or \
                self._sync is not None and not self._sync.done() or not self.dirty.sync_due(committed):
            return
        if self._syncer is None:
            self._syncer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbdrep-sync")
        ended = (self.tracker.draining or self.tracker.cycle) - 1
        self._sync = self._syncer.submit(self._sync_sources, self.dirty, ended)

    def _sync_sources(self, dirty, ended):
        try:
            for d in self.devices:
                d.backend.flush()
        except OSError as e:
            log.error("source sync failed (%s): writes may be lost on the source; the "
                      "dirty-region log keeps every extent written since marked until a "
                      "restart", e.strerror or e)
            return
        dirty.durable(ended)

    # -- copy and flush ---------------------------------------------------------------------------

    def _copy(self, report):
        """Copy ``report`` to every replica; Copied, Failed (with what landed) or Abandoned."""
        self.keepaside.install(report.data)
        landed = {}
        try:
            for d in self.devices:
                replica = self._replica(d)
                self._copy_data(d.dev, replica, report.data_of(d.dev), landed)
                self._copy_zero(d.dev, replica, report.zero_of(d.dev), landed)
        except Stopping:
            return m.Abandoned()
        except (ReplicaError, OSError) as e:
            self._close_replicas()
            if self._abandon:   # the stop's timeout cancelled the call
                return m.Abandoned()
            return m.Failed(str(e), landed=self._durable(landed),
                            point_in_time=self.keepaside.point_in_time)
        return m.Copied(point_in_time=self.keepaside.point_in_time, reason=self.keepaside.degraded)

    def _copy_data(self, dev, replica, pairs, landed):
        batches = list(sgl_batches(pairs, MAX_SEGMENT, BATCH_BYTES, BATCH_SEGMENTS))
        if not batches:
            return
        buffers = self._batch_buffers()
        read = lambda k: self.keepaside.read_batch(dev, batches[k], buffers[k % 3])  # noqa: E731
        pending = ahead = None
        try:
            view = read(0)   # nothing to overlap the first read with: no hop to the reader
            for k in range(len(batches)):
                if k:
                    view, ahead = ahead.result(), None
                if self._abandon:
                    raise Stopping()
                if k + 1 < len(batches):
                    ahead = self._reader_thread().submit(read, k + 1)
                sent = replica.send_batch(batches[k], view, max_inflight=MAX_INFLIGHT)
                if pending is not None:
                    self._landed(dev, replica, pending, landed, "copied")
                pending = (sent, batches[k])
            self._landed(dev, replica, pending, landed, "copied")
            pending = None
        finally:
            if ahead is not None:   # its buffer must be free before the next cycle reuses it
                concurrent.futures.wait([ahead])
            if pending is not None:
                self._close_replicas()

    def _copy_zero(self, dev, replica, pairs, landed):
        if pairs:
            self._landed(dev, replica, (replica.send_zero(pairs, max_inflight=MAX_INFLIGHT), pairs),
                         landed, "zeroed")

    def _landed(self, dev, replica, pending, landed, counter):
        sent, pairs = pending
        nbytes = replica.wait_batch(sent)
        landed.setdefault(dev, []).append(pairs)
        with self._cond:
            actions = self.controller.handle(m.Progress(**{counter: nbytes}), self.clock())
        for action in actions:
            self._perform(action)

    def _durable(self, landed):
        """The part of ``landed`` a FLUSH on fresh connections made durable: per device, all
        of it if the replica advertises multi-conn (a flush on one connection then covers
        writes completed on others) and the flush succeeds, else nothing. The connections
        are the session's, so a stop can cancel them and the next cycle reuses them.
        O(extents)."""
        out = {}
        for d in self.devices:
            if d.dev not in landed or self._abandon:
                continue
            try:
                replica = self._replica(d)
                if not replica.can_multi_conn:
                    continue
                replica.flush()
            except (ReplicaError, OSError, Stopping):
                self._close_replicas()
                continue
            out[d.dev] = reports.merge(*landed[d.dev])
        return out

    def _flush(self):
        try:
            for d in self.devices:
                self._replica(d).flush()
        except Stopping:
            return m.Abandoned()
        except (ReplicaError, OSError) as e:
            self._close_replicas()
            return m.Abandoned() if self._abandon else m.Failed(f"flush failed: {e}")
        return m.Flushed()

    def _reader_thread(self):
        """The thread that reads batch k+1 while batch k is sent, kept for the session (one
        started per cycle cost a thread's start and end every cycle); ended with the worker."""
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbdrep-read")
        return self._reader

    def _batch_buffers(self):
        """Three batch buffers, kept for the session: fresh memory each cycle costs page faults.

        Page-aligned (mmap), not bytearrays: malloc puts large blocks 16 bytes into a page, and
        the kernel's copy into a destination that is not cache-line aligned ran 4x slower here
        (pread of page cache into a bytearray: 2.1 GB/s; into an aligned buffer: 9 GB/s).
        """
        if self._buffers is None:
            self._buffers = tuple(mmap.mmap(-1, BATCH_BYTES) for _ in range(3))
        return self._buffers

    def _replica(self, d):
        replica = self._replicas.get(d.dev)
        if replica is None:
            if self._abandon:   # the stop's time ran out: open nothing new
                raise Stopping()
            if self.receivers is not None:   # late writes of the connections dropped before
                with self._cond:              # can no longer land over this one's
                    committed = self.controller.committed_cycle
                self.receivers.fence(d.replica_uri, self.plan.session_id, committed)
            replica = Replica(d.replica_uri, connections=REPLICA_CONNECTIONS)
            self._replicas[d.dev] = replica
            replica.check_size(d.size)
        return replica

    def _close_replicas(self):
        with self._cond:
            replicas, self._replicas = self._replicas, {}
            self._retried_before += sum(r.stats()["retried"] for r in replicas.values())
        for replica in replicas.values():
            try:
                replica.close()
            except ReplicaError:
                pass
        if self.receivers is not None:
            self.receivers.close()
