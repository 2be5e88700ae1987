"""The replication controller (FIG. 4): the cycle state machine, with no I/O.

Theory of operation
-------------------
As h11 does for HTTP, this module only decides. The driver (``replication.driver``) feeds it
events -- a timer came due, an RP was requested, a cycle drained, a copy landed or failed,
stop -- and performs the actions it returns (arm the keep-aside, close the cycle, build the
report, copy, flush, commit, release, disconnect, log). Every transition is one row of
``TRANSITIONS``; an event a state has no row for is a bug in the driver and raises
``ProtocolError``. Time comes in with each event, so tests drive the machine at any pace.

A turn of the cycle, for cycle N::

    IDLE --timer/rp--> CLOSING: Arm(N), CloseCycle(N)     (the tracker opens N+1 at once)
    CLOSING --drained--> REPORTING: BuildReport(N's TEs + carry)
    REPORTING --reported--> COPYING: Copy(N, report)      (empty report: commit at once)
    COPYING --copied--> FLUSHING: Flush
    FLUSHING --flushed--> IDLE: Release, Commit(N)        (the replica equals RP N)

Failures never lose a change (invariant 1). A copy or flush that fails leaves the *carry*:
the report less what is known to have landed durably, merged into the next cycle's report, so
a retry resends only what did not land. The drain of a cycle that times out leaves the cycle
closed and draining in the tracker; the retry resumes that drain instead of closing another.
An unexpected error in the driver, in any step, arrives as ``Failed`` with a full-resync
report, because the driver may have lost TEs; since the step may also have left the
keep-aside half done, the store is released and the next commit is not trusted as a recovery
point (it is "inconsistent", and the RP after it follows at once). Every failure backs off
(0.5 s doubling to 30 s) and counts; after ``STUCK_AFTER`` failures in a row the session is
reported as *stuck*, with the last reason, in status and in the log, instead of being
retried silently forever.

The driver hands over RP requests only between cycles (in IDLE or BACKOFF); one made during
a copy waits until then. The machine keeps the highest cycle promised to a requester
(``rp_wanted``); after a commit, if that cycle is not committed yet, the next RP is taken at
once. So a slow replica makes cycles longer (they merge) instead of queueing them.

A stop is clean: ``Stop`` between cycles takes a final RP, and the machine stops once that
cycle committed, failed or was abandoned (the driver abandons the copy when the stop timeout
runs out), asking the driver to ``Persist`` what is outstanding: nothing after a commit, the
carry otherwise. A stop whose last cycle could not drain, or that follows an unexpected error,
is recorded as unclean, so the next start resyncs in full.

A cycle the keep-aside could not hold at its RP (``point_in_time=False``, e.g. the spill
file filled) is copied and flushed but is not a recovery point: its state is "inconsistent",
``committed_cycle`` does not move, and the next RP is taken at once; that cycle's report
covers every write since, so its commit is a recovery point again -- with one precaution.
While the keep-aside holds a cycle, a write of the next cycle waits for the closed cycle's
writes to end before it lands, so writes land in cycle order; once it gave up, a zero write
of N+1 may land before an overlapping write of N still in flight, and the source keeps N's
bytes there. Sending that zero range as WRITE_ZEROES would lose them, so the next report
reads its zero ranges as data (``BuildReport.zeros_as_data``).
"""
import collections
import dataclasses
import enum

from copier.sizes import format_size

HISTORY = 64
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
STUCK_AFTER = 5


class State(enum.Enum):
    IDLE = "idle"            # waiting for the next RP
    CLOSING = "closing"      # RP taken, waiting for the closed cycle's writes to end
    REPORTING = "reporting"  # building the closed cycle's report
    COPYING = "copying"      # sending the report to the replicas
    FLUSHING = "flushing"    # committing: FLUSH on every replica
    BACKOFF = "backoff"      # after a failure, until the retry is due
    STOPPED = "stopped"


class ProtocolError(Exception):
    """The driver sent an event the current state has no transition for."""


# -- events (driver -> machine) ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timer:
    """The deadline the machine asked for (``wake_at``) has come."""


@dataclasses.dataclass(frozen=True)
class RpRequested:
    """A user asked for an RP and was promised the cycle ``cycle`` (open at the request)."""
    cycle: int


@dataclasses.dataclass(frozen=True)
class Drained:
    """The tracker closed the cycle and every write of it ended; ``closed`` holds its TEs."""
    closed: object


@dataclasses.dataclass(frozen=True)
class DrainTimedOut:
    """The tracker still drains ``cycle`` (closed, with writes in flight)."""
    message: str
    cycle: int


@dataclasses.dataclass(frozen=True)
class Reported:
    report: object


@dataclasses.dataclass(frozen=True)
class Progress:
    copied: int = 0
    zeroed: int = 0


@dataclasses.dataclass(frozen=True)
class Copied:
    """Every extent landed; ``point_in_time`` False (with ``reason``) if the keep-aside gave up."""
    point_in_time: bool = True
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Flushed:
    """Every replica flushed: the cycle is durable there."""


@dataclasses.dataclass(frozen=True)
class Failed:
    """A step failed. ``landed`` {dev: pairs} is what reached the replica durably (None:
    nothing known); ``resync`` a full report when the driver may have lost TEs;
    ``point_in_time`` False if the keep-aside had given up on the cycle."""
    error: str
    landed: dict | None = None
    resync: object = None
    point_in_time: bool = True


@dataclasses.dataclass(frozen=True)
class Abandoned:
    """The copy stopped because the session is stopping."""


@dataclasses.dataclass(frozen=True)
class Stop:
    pass


# -- actions (machine -> driver) -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """Arm the keep-aside for ``cycle`` (before its close, so every later write sees it)."""
    cycle: int


@dataclasses.dataclass(frozen=True)
class CloseCycle:
    """Close the cycle in the tracker (or resume its drain), telling the keep-aside the moment
    no write of it is in flight any more; answer Drained or DrainTimedOut."""
    cycle: int


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """Build the report of ``closed`` merged with ``carry``; answer Reported."""
    closed: object
    carry: object
    zeros_as_data: bool = False


@dataclasses.dataclass(frozen=True)
class Copy:
    """Install the report in the keep-aside and copy it; answer Progress..., then Copied,
    Failed or Abandoned."""
    cycle: int
    report: object


@dataclasses.dataclass(frozen=True)
class Flush:
    cycle: int


@dataclasses.dataclass(frozen=True)
class Commit:
    """``cycle`` is on the replicas (a recovery point if ``point_in_time``); ``outage`` is how
    long replication had been failing before it, or None."""
    cycle: int
    report: object
    point_in_time: bool
    outage: float | None


@dataclasses.dataclass(frozen=True)
class Publish:
    """Tracking only: ``report`` is the newest report."""
    cycle: int
    report: object


@dataclasses.dataclass(frozen=True)
class Persist:
    """The session stopped: record whether cleanly and what is still to copy -- ``outstanding``
    (a report, or None) plus, for a clean stop, the TEs of the cycle still open in the tracker
    (writes after the last RP that no report holds; none are in flight, the hosts are gone)."""
    clean: bool
    outstanding: object
    zeros_as_data: bool = False


@dataclasses.dataclass(frozen=True)
class Release:
    """Forget what the keep-aside holds."""


@dataclasses.dataclass(frozen=True)
class Disconnect:
    """Drop the replica connections (their state is unknown after a failure)."""


@dataclasses.dataclass(frozen=True)
class Log:
    level: str
    message: str


@dataclasses.dataclass
class CycleRecord:
    """What status shows for one cycle (``nbdrep status --json`` keys)."""
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
    state: str = "closing"
    error: str | None = None
    initial_sync: bool = False
    point_in_time: bool = True


class Controller:
    """The cycle state machine of one session (consistency group).

    ``sizes`` {dev: bytes} of the sources; ``replicated`` False means tracking only (cycles
    are reported, not copied); ``carry`` the report to copy first (a sync, unless
    ``carry_is_sync`` is False: what a clean stop left outstanding); ``committed`` the
    (cycle, RP time) a previous run committed last; ``now`` the time the session starts.
    Not thread-safe: the driver serialises calls.
    """

    def __init__(self, *, sizes, replicated, cycle_seconds, now, first_cycle=1, carry=None,
                 carry_is_sync=None, committed=None):
        self.sizes = dict(sizes)
        self.replicated = replicated
        self.cycle_seconds = cycle_seconds
        self.state = State.IDLE
        self.open_cycle = first_cycle
        self.draining = None
        self.carry = carry
        self.carry_is_sync = carry is not None if carry_is_sync is None else carry_is_sync
        self.committed_cycle, self.committed_rp_time = committed or (first_cycle - 1, None)
        self.started = now
        # Monotonic since this process started, for Prometheus: session counters, and per
        # device what committed reports carried (status reads them; only handlers write them).
        self.totals = collections.Counter()
        self.device_totals = {dev: collections.Counter() for dev in self.sizes}
        self.stopping = False
        self.persist_failed = False
        self.reported_cycle = first_cycle - 1
        self.rp_wanted = 0
        self.wake_at = now if replicated else now + cycle_seconds
        self.history = collections.deque(maxlen=HISTORY)
        self.failures = 0
        self.failing_since = None
        self.last_error = None
        self.stuck = None
        self.zeros_as_data = False
        self.distrust = False
        self._record = None
        self._report = None

    # -- the one entry point -------------------------------------------------------------

    def handle(self, event, now):
        """Apply ``event`` at time ``now``; return the actions to perform, in order. O(1)
        except BuildReport's result (O(extents) for its counts)."""
        row = TRANSITIONS.get((self.state, type(event)))
        if row is None:
            raise ProtocolError(f"{type(event).__name__} in state {self.state.value}")
        handler, targets = row
        actions = handler(self, event, now)
        assert self.state in targets, f"{handler.__name__} went to {self.state}, not one of {targets}"
        return actions

    # -- handlers (one per row group of the table) ------------------------------------------

    def _take_rp(self, event, now):
        if isinstance(event, RpRequested):
            self.rp_wanted = max(self.rp_wanted, event.cycle)
        self.state = State.CLOSING
        if self.draining is not None:
            return [CloseCycle(self.draining)]
        cycle = self.open_cycle
        self.open_cycle += 1
        self._record = CycleRecord(cycle, rp_time=now)
        self.history.append(self._record)
        return ([Arm(cycle)] if self.replicated else []) + [CloseCycle(cycle)]

    def _drained(self, event, now):
        closed, record = event.closed, self._record
        self.draining = None
        self._adopt(closed.cycle)
        record.writes, record.bytes_written = closed.count, closed.bytes_written
        self.totals.update(writes=closed.count, bytes_written=closed.bytes_written)
        record.state = "reporting"
        self.state = State.REPORTING
        if not self.replicated:
            return [BuildReport(closed, None)]
        record.initial_sync = self.carry_is_sync
        zeros_as_data, self.zeros_as_data = self.zeros_as_data, False
        return [BuildReport(closed, self.carry, zeros_as_data)]

    def _drain_timed_out(self, event, now):
        self._adopt(event.cycle)
        self.draining = event.cycle
        if self.stopping:   # the undrained cycle's TEs die with the process
            return self._stopped(clean=False)
        return self._fail(event.message, now)

    def _adopt(self, cycle):
        """The tracker's cycle ids are the truth. They differ from the machine's only after an
        unexpected error inside CloseCycle (the tracker may have closed the cycle, or not)."""
        if cycle != self._record.cycle:
            self._record.cycle, self.open_cycle = cycle, cycle + 1

    def _reported(self, event, now):
        report, record = event.report, self._record
        record.extents = report.extent_count()
        record.bytes_total = report.byte_count()
        if not self.replicated:
            record.state = "reported"
            self.reported_cycle = record.cycle
            return [Publish(record.cycle, report)] + self._next_rp(now)
        self._report, self.carry, self.carry_is_sync = report, None, False
        if not report:
            return self._commit(now, point_in_time=True)
        record.state = "copying"
        self.state = State.COPYING
        return [Copy(record.cycle, report)]

    def _progress(self, event, now):
        record = self._record
        before = record.bytes_done
        record.bytes_copied += event.copied
        record.bytes_zeroed += event.zeroed
        record.bytes_done = done = record.bytes_copied + record.bytes_zeroed
        total = record.bytes_total
        # A sync may take hours: say how far it got at every tenth, with rate and ETA.
        if not record.initial_sync or not total or done * 10 // total == before * 10 // total:
            return []
        rate = done / max(now - record.rp_time, 1e-6)
        return [Log("info", f"sync (cycle {record.cycle}): {100 * done // total}% of "
                            f"{format_size(total)}, {format_size(int(rate))}/s, "
                            f"ETA {(total - done) / rate:.0f} s")]

    def _copied(self, event, now):
        record = self._record
        record.point_in_time = event.point_in_time
        if not event.point_in_time:
            record.error = f"keep-aside gave up: {event.reason}"
        self.zeros_as_data |= not event.point_in_time
        self.state = State.FLUSHING
        return [Flush(self._record.cycle)]

    def _flushed(self, event, now):
        return self._commit(now, self._record.point_in_time)

    def _failed(self, event, now):
        record = self._record
        unexpected = event.resync is not None
        # Closing: the tracker still holds the cycle, draining, and the retry resumes that
        # drain without arming again, so the keep-aside must stay armed for it -- unless the
        # failure was unexpected, after which nothing the store holds is trusted.
        keep_armed = self.state == State.CLOSING and not unexpected
        actions = [] if keep_armed else [Release(), Disconnect()]
        if self.state in (State.COPYING, State.FLUSHING):
            self.zeros_as_data |= not event.point_in_time
            landed = event.landed if self.state == State.COPYING else None
            self.carry = self._report.minus(landed) if landed else self._report
            self.carry_is_sync = record.initial_sync
        elif self.state == State.CLOSING:
            self.draining = record.cycle
        if unexpected:
            self.carry = event.resync if self.carry is None else event.resync.merged_with(self.carry, self.sizes)
            self.carry_is_sync = True
            self.distrust = self.zeros_as_data = True
        if record is not None and record.state not in ("committed", "reported", "inconsistent"):
            record.state, record.error = "failed", event.error
        self._report = None
        if self.stopping:
            return actions + [Log("warning", f"final cycle failed ({event.error}); its report is "
                                             "recorded for the next start")] + self._stopped(not unexpected)
        return actions + self._fail(event.error, now)

    def _abandoned(self, event, now):
        self._record.state = "abandoned"
        self.carry = self._report if self.carry is None else self._report.merged_with(self.carry, self.sizes)
        self._report = None
        return [Release(), Disconnect()] + self._stopped(clean=True)

    def _stop(self, event, now):
        """Between cycles: a replicated session takes a final RP first."""
        if not self.replicated:
            self.state = State.STOPPED
            return []
        self.stopping = True
        return self._take_rp(event, now)

    def _stopped(self, clean):
        self.state = State.STOPPED
        return [Persist(clean, self.carry if clean else None, self.zeros_as_data)]

    def _failed_stopped(self, event, now):
        """A step of the stop failed, and the driver dropped what followed it: record the
        stop once more, as unclean (the next start resyncs in full). Only once, in case the
        recording itself is what fails."""
        if self.persist_failed:
            return [Log("error", f"cannot record the stop ({event.error}); the next start "
                                 "finds the record of the last commit and resyncs in full")]
        self.persist_failed = True
        return [Persist(False, None)]

    # -- shared steps --------------------------------------------------------------------

    def _commit(self, now, point_in_time):
        record, report = self._record, self._report
        record.commit_time = now
        outage = None if self.failing_since is None else now - self.failing_since
        self.failures, self.failing_since, self.stuck = 0, None, None
        self._report = None
        if self.distrust:
            point_in_time, record.error = False, "copied after an unexpected error: not trusted"
            self.zeros_as_data, self.distrust = True, False
        record.point_in_time = point_in_time
        self._count_commit(record, report)
        if point_in_time:
            record.state = "committed"
            self.committed_cycle, self.committed_rp_time = record.cycle, record.rp_time
        else:
            record.state = "inconsistent"
            self.rp_wanted = max(self.rp_wanted, self.open_cycle)
        actions = [Release(), Commit(record.cycle, report, point_in_time, outage)]
        if not point_in_time:
            actions.append(Log("warning", f"cycle {record.cycle} is not a recovery point "
                                          f"({record.error}); taking the next RP now"))
        return actions + self._next_rp(now)

    def _count_commit(self, record, report):
        """Add a commit to the totals. O(extents), as Report.byte_count."""
        self.totals["cycles_committed" if record.point_in_time else "cycles_inconsistent"] += 1
        self.totals["resyncs"] += record.initial_sync
        for dev, counts in self.device_totals.items():
            data, zero = report.data_of(dev), report.zero_of(dev)
            counts.update(extents=(len(data) + len(zero)) // 2, bytes_copied=sum(data[1::2]),
                          bytes_zeroed=sum(zero[1::2]))

    def _next_rp(self, now):
        """Back to IDLE; the next RP is due a cycle after this one's, or now if promised. A
        stopping session stops instead: its final cycle is done."""
        if self.stopping:
            return self._stopped(clean=True)
        self.state = State.IDLE
        due = self._record.rp_time + self.cycle_seconds
        self.wake_at = now if self.rp_wanted > self.done_upto() else due
        return []

    def _fail(self, error, now):
        self.state = State.BACKOFF
        self.failures += 1
        self.totals["cycles_failed"] += 1
        if self.failing_since is None:
            self.failing_since = now
        self.last_error = error
        self.wake_at = now + self.backoff()
        cycle = self._record.cycle if self._record else self.open_cycle
        actions = [Log("warning", f"cycle {cycle} failed ({error}); retrying in "
                                  f"{self.backoff():g} s, nothing is lost")]
        # Counted, not matched by text: a replica failing at a new offset each time is as stuck.
        if self.failures >= STUCK_AFTER:
            self.stuck = f"{self.failures} failures in a row since {self.failing_since:.0f}; the last: {error}"
            if self.failures == STUCK_AFTER:
                actions.append(Log("error", f"replication is stuck: {self.stuck}"))
        return actions

    def backoff(self):
        """Seconds until the retry after the current run of failures. O(1)."""
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(max(self.failures - 1, 0), 16))

    # -- what the driver and status read -------------------------------------------------------

    def done_upto(self):
        """Newest cycle committed (replicated) or reported (tracking only). O(1)."""
        return self.committed_cycle if self.replicated else self.reported_cycle

    def status(self, now):
        """The machine's part of ``nbdrep status --json``. O(history)."""
        return {
            "state": self._status_word(),
            "committed_cycle": self.committed_cycle if self.replicated else None,
            "lag": self._lag(now),
            "replicated": self.replicated,
            "failures": self.failures,
            "last_error": self.last_error if self.failures else None,
            "stuck": self.stuck,
            "cycles": [dataclasses.asdict(r) for r in self.history],
            "totals": dict(self.totals),
            "device_totals": {dev: dict(counts) for dev, counts in self.device_totals.items()},
        }

    def _lag(self, now):
        """Now minus the newest committed RP; before a session's first commit the replica
        holds no RP of it, so its lag is at least the time since the start (the first sync's
        lag grows until it commits). None when not replicating."""
        if not self.replicated:
            return None
        return now - (self.started if self.committed_rp_time is None else self.committed_rp_time)

    def _status_word(self):
        if self.state == State.STOPPED:
            return "stopped"
        if self.stopping:
            return "stopping"
        if not self.replicated:
            return "tracking"
        if self.state == State.BACKOFF:
            return "draining" if self.draining is not None else "retrying"
        if self.state in (State.COPYING, State.FLUSHING):
            return "initial-sync" if self._record.initial_sync else "copying"
        return "replicating" if self.committed_cycle >= 1 else "starting"


_RP = (State.CLOSING,)

# (state, event) -> (handler, the states it may go to). Every transition the machine has.
_END = (State.IDLE, State.STOPPED)      # a cycle ends: the next one, or the end of a stop
_FAIL = (State.BACKOFF, State.STOPPED)  # a failure: retry, or the end of a stop

TRANSITIONS = {
    (State.IDLE, Timer): (Controller._take_rp, _RP),
    (State.IDLE, RpRequested): (Controller._take_rp, _RP),
    (State.IDLE, Failed): (Controller._failed, _FAIL),
    (State.IDLE, Stop): (Controller._stop, (State.CLOSING, State.STOPPED)),

    (State.CLOSING, Drained): (Controller._drained, (State.REPORTING,)),
    (State.CLOSING, DrainTimedOut): (Controller._drain_timed_out, _FAIL),
    (State.CLOSING, Failed): (Controller._failed, _FAIL),

    (State.REPORTING, Reported): (Controller._reported, (State.COPYING,) + _END),
    (State.REPORTING, Failed): (Controller._failed, _FAIL),

    (State.COPYING, Progress): (Controller._progress, (State.COPYING,)),
    (State.COPYING, Copied): (Controller._copied, (State.FLUSHING,)),
    (State.COPYING, Failed): (Controller._failed, _FAIL),
    (State.COPYING, Abandoned): (Controller._abandoned, (State.STOPPED,)),

    (State.FLUSHING, Flushed): (Controller._flushed, _END),
    (State.FLUSHING, Failed): (Controller._failed, _FAIL),
    (State.FLUSHING, Abandoned): (Controller._abandoned, (State.STOPPED,)),

    (State.BACKOFF, Timer): (Controller._take_rp, _RP),
    (State.BACKOFF, RpRequested): (Controller._take_rp, _RP),
    (State.BACKOFF, Failed): (Controller._failed, _FAIL),
    (State.BACKOFF, Stop): (Controller._stop, (State.CLOSING, State.STOPPED)),

    (State.STOPPED, Failed): (Controller._failed_stopped, (State.STOPPED,)),
}
