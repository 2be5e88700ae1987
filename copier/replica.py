"""The replica: the destination NBD export, and the one copy engine that writes to it.

Theory of operation
-------------------
The controller hands the replica a cycle's SGL in batches of ``(offset, length)`` pairs:
`Replica.send_batch` for data, whose bytes lie back to back in one buffer, and
`Replica.send_zero` for ranges that must read as zeros (zero and trim extents alike:
WRITE_ZEROES without NO_HOLE, never TRIM, because a trimmed range of the source reads as
zeros and NBD TRIM does not promise that; ``fastcopy.c`` says more).  Both return once the
batch is issued, without waiting for its replies; `Replica.wait_batch` waits for one batch.
Several batches may be in flight at once -- send k, then wait k-1 -- so the replica always
has work queued.  `Replica.flush` commits: only after it returns is the cycle on the replica.

Every command goes out from C (``fastcopy.c``) on libnbd handles it opened itself, in one call
per batch without the GIL.  This module checks arguments, keeps buffers and handles alive as
long as libnbd may use them, and turns failures into `ReplicaError`.

Retries (invariant 8): a command that fails with an error reply is re-issued by itself after
a backoff (10 ms, doubling, at most 1 s), up to ``retries`` times, so a flaky replica makes a
cycle later, not failed.  Anything else -- a command out of retries, a dead connection, no
reply for ``io_timeout`` seconds -- closes the connections (their state is unknown) and
raises ReplicaError; the replication driver then drops this Replica and opens a new one for
the retry, whose report holds what did not land (merged upstream into the next cycle).

Buffer ownership: a batch's buffer is held by its `SentBatch`, which the Replica keeps with
the connections it went out on until `Replica.wait_batch` returned for it or those
connections closed; closing frees libnbd's commands, after which nothing reads the buffer.
The caller must not change the buffer before then either.

Threads and locks: one thread does the I/O (send, wait, flush); another may call `close`
(a stop that gave up waiting), `reconnect` or `stats` at any time.

* ``_io`` is held for the whole of every C call on the connections, so there is one at a
  time: the engine's retry queue and batch states are not thread-safe.
* ``_lock`` guards ``_engine`` (the open connections, or None), ``_busy`` (the engine a C call
  is running on) and the counters.  It is held only briefly, never across a C call.
* `close` detaches the engine under ``_lock``.  If a C call is running on it, close only
  cancels that call (``fc_cancel`` wakes its poll; it returns ECANCELED) and the call frees
  the engine as it returns; otherwise close frees it at once.  So no C call ever has its
  handles freed under it, and close never waits for one.
"""

import errno as errno_module
import threading

from copier._fastcopy import ffi as _ffi, lib as _lib
from copier.uri import describe_error, parse_uri

__all__ = ["Replica", "ReplicaError", "SentBatch", "describe_error", "parse_uri"]

# C takes ints: past this many (~24.8 days in milliseconds), a limit is as good as none.
_INT_MAX = (1 << 31) - 1

_DOING = {_lib.FC_DATA: "writing data", _lib.FC_ZERO: "zeroing"}


class ReplicaError(Exception):
    """The replica (or another NBD export) is unreachable, too small, or failed.

    ``errno`` is the errno libnbd reported (an int), or None.
    """

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


class SentBatch:
    """A batch on its way to the replica (`Replica.send_batch`, `Replica.send_zero`): its C
    completion state, its buffer and cffi's view of it, which pins the buffer's memory (both
    None for zeros), and its total length in bytes."""

    __slots__ = ("state", "buf", "cbuf", "total")

    def __init__(self, state, buf, cbuf, total):
        self.state, self.buf, self.cbuf, self.total = state, buf, cbuf, total


class _Engine:
    """One set of open connections (a C ``struct fc_engine``) and the batches sent on it,
    whose buffers it holds until it is closed."""

    __slots__ = ("ptr", "batches")

    def __init__(self, ptr):
        self.ptr = ptr
        self.batches = set()

    def close(self):
        """Free the connections, then the buffers libnbd can no longer read. Idempotent."""
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            _lib.fc_close(ptr)
        self.batches.clear()

    __del__ = close


class Replica:
    """A connection (or several) to the replica export, and the copy engine writing to it.

    ``Replica(uri, connections=1, connect_timeout=10.0, io_timeout=60.0, retries=8)``
    connects at once: ValueError for a bad parameter, ReplicaError if the replica is
    unreachable, gives no NBD handshake within ``connect_timeout`` seconds, or is read-only.
    With ``connections > 1`` commands spread over that many NBD connections if the replica
    advertises multi-conn (else one is used).  A command failing with an error reply is
    re-issued up to ``retries`` times.  Use as a context manager, or call `close`.

    Attributes, as the replica reported them at the last (re)connect: ``size`` in bytes,
    ``can_zero``, ``can_flush``, ``can_multi_conn``, ``can_fast_zero``; and ``uri``.
    """

    def __init__(self, uri, *, connections=1, connect_timeout=10.0, io_timeout=60.0, retries=8):
        self.uri = parse_uri(uri)
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"bad connections {connections!r}: must be an integer >= 1")
        if not connect_timeout > 0 or not io_timeout > 0:
            raise ValueError("bad timeout: connect_timeout and io_timeout must be > 0 seconds")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"bad retries {retries!r}: must be an integer >= 0")
        self.connections = connections
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.retries = retries
        self._io = threading.Lock()
        self._lock = threading.Lock()
        self._engine = None
        self._busy = None
        self._retried = 0
        self._failed = 0
        self._open_connections = 0
        self.reconnect()

    def reconnect(self):
        """Drop the current connections and open new ones. O(connections) handshakes.

        Raises ReplicaError if the replica is unreachable or read-only; the Replica is then
        closed until a later `reconnect` succeeds.  Batches in flight are abandoned.
        """
        self.close()
        info = _ffi.new("struct fc_info *")
        report = _ffi.new("struct fc_report *")
        ptr = _lib.fc_open(self.uri.encode(), min(self.connections, _INT_MAX),
                           _milliseconds(self.connect_timeout), _milliseconds(self.io_timeout),
                           min(self.retries, _INT_MAX), info, report)
        if ptr == _ffi.NULL:
            raise ReplicaError(f"cannot connect to replica {self.uri!r}: {_text(report)} "
                               f"({errno_module.errorcode.get(report.errnum, report.errnum)})",
                               report.errnum)
        engine = _Engine(ptr)
        if info.read_only:
            engine.close()
            raise ReplicaError(f"replica {self.uri!r} is read-only", errno_module.EROFS)
        self.size = info.size
        self.can_zero = bool(info.can_zero)
        self.can_flush = bool(info.can_flush)
        self.can_multi_conn = bool(info.can_multi_conn)
        self.can_fast_zero = bool(info.can_fast_zero)
        self._replace(engine, info.connections)

    def close(self):
        """Disconnect (NBD_CMD_DISC where idle) and free the connections. O(connections).

        Batches in flight are abandoned: waiting for one raises.  Safe from any thread: a C
        call running on the connections in another thread is cancelled (it raises
        ReplicaError) and frees them as it returns.
        """
        self._replace(None, 0)

    def _replace(self, engine, connections):
        """Make `engine` current and free the old one, unless a C call runs on it: then cancel
        that call, which frees it as it returns.  One critical section decides, so exactly one
        thread frees an engine."""
        with self._lock:
            old, self._engine = self._engine, engine
            self._open_connections = connections
            if old is not None and self._busy is old:
                _lib.fc_cancel(old.ptr)
                old = None
        if old is not None:
            old.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_size(self, source_size):
        """Raise ReplicaError if the replica is smaller than `source_size` bytes. O(1).

        The controller calls this before writing anything, so a too-small
        replica is left untouched.
        """
        if not isinstance(source_size, int) or source_size < 0:
            raise ValueError(f"bad source size {source_size!r}: must be an integer >= 0")
        if self.size < source_size:
            raise ReplicaError(f"replica is smaller than the source "
                               f"({self.size} < {source_size} bytes)")

    def send_batch(self, pairs, buf, *, max_inflight=64):
        """Start writing data whose bytes lie back to back in ``buf``; return a `SentBatch`
        for `wait_batch`, without waiting for the replies.

        ``pairs``: array('Q') of offset, length, offset, length...: ascending, disjoint,
        non-empty, within the replica, and disjoint from every batch still in flight.  The
        writes go out from C in one call without the GIL, spread over the connections, at
        most ``max_inflight`` commands outstanding in all, this batch's and earlier ones'.
        ``buf`` is held until `wait_batch` returned for this batch or the connections closed,
        and must not change until then.  Raises ValueError for a bad batch before sending
        any of it, ReplicaError as `wait_batch` does.  O(pairs + total length / 32 MiB).
        """
        cpairs, n, total = self._check(pairs, max_inflight)
        cbuf = _ffi.from_buffer("unsigned char[]", buf)
        if len(cbuf) < total:
            raise ValueError(f"bad batch: its buffer holds {len(cbuf)} of its {total} bytes")
        sent = SentBatch(_new_state(), buf, cbuf, total)
        limit = min(max_inflight, _INT_MAX)
        self._run(lambda ptr, report: _lib.fc_send(ptr, sent.state, cpairs, n, cbuf, limit,
                                                   report), sending=sent)
        return sent

    def send_zero(self, pairs, *, max_inflight=64):
        """Start making ranges read as zeros; return a `SentBatch` for `wait_batch`.

        ``pairs`` as for `send_batch`.  WRITE_ZEROES (without NO_HOLE, so the replica may
        deallocate) in pieces below the protocol's 32-bit limit, or, where the replica cannot
        zero, WRITEs of a shared zero buffer in 1 MiB pieces.  Raises as `send_batch` does.
        O(pairs + total length / 1 GiB), or O(total length / 1 MiB) without zeroing.
        """
        cpairs, n, total = self._check(pairs, max_inflight)
        sent = SentBatch(_new_state(), None, None, total)
        limit = min(max_inflight, _INT_MAX)
        self._run(lambda ptr, report: _lib.fc_send_zero(ptr, sent.state, cpairs, n, limit,
                                                        report), sending=sent)
        return sent

    def _check(self, pairs, max_inflight):
        if not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"bad max_inflight {max_inflight!r}: must be an integer >= 1")
        if memoryview(pairs).itemsize != 8:
            raise ValueError("bad batch: pairs must be an array('Q')")
        cpairs = _ffi.from_buffer("uint64_t[]", pairs)
        if len(cpairs) == 0 or len(cpairs) % 2:
            raise ValueError("bad batch: pairs must hold at least one (offset, length) pair")
        n = len(cpairs) // 2
        bad = _ffi.new("size_t *")
        total = _lib.fc_check(cpairs, n, self.size, bad)
        if total < 0:
            offset, length = cpairs[2 * bad[0]], cpairs[2 * bad[0] + 1]
            if length == 0:
                why = "is empty"
            elif offset > self.size or length > self.size - offset:
                why = f"ends past the replica's {self.size} bytes"
            else:
                why = "is out of order or overlaps the pair before it"
            raise ValueError(f"bad batch: pair {bad[0]} ({offset}, {length}) {why}")
        return cpairs, n, total

    def wait_batch(self, sent):
        """Wait until every command of ``sent`` has completed; return its bytes.

        Commands that failed with an error reply are re-issued meanwhile, as needed.  On a
        failure the connections are closed and ReplicaError names it (the first failed
        command, its offset and errno, or the connection's fault); so it does for a batch
        the connections were closed under, even if they were opened again since, and for
        one already waited for.  O(replies).
        """
        self._run(lambda ptr, report: _lib.fc_wait(ptr, sent.state, report), waiting=sent)
        return sent.total

    def flush(self):
        """Commit: FLUSH and wait for the reply (retried as a write is).

        One FLUSH covers every connection: there is more than one only where the replica
        advertises multi-conn consistency.  If the replica cannot flush, this does nothing:
        such a server has no flush command (typically no volatile write cache), so its writes
        are as stable as it can make them when acknowledged, and `wait_batch` returning is
        the commit.  Raises ReplicaError on failure.  One round trip (plus the server's sync).
        """
        if self.can_flush:
            self._run(_lib.fc_flush)
            return
        with self._lock:
            if self._engine is None:
                raise _not_connected(self.uri)

    def stats(self):
        """Counters since construction, across reconnects. O(1).

        ``{"retried": commands re-issued after an error reply, "failed": sends, waits and
        flushes that raised ReplicaError for a failure of the replica or its connections,
        "connections": connections open now}``.
        """
        with self._lock:
            return {"retried": self._retried, "failed": self._failed,
                    "connections": self._open_connections}

    def _run(self, call, *, sending=None, waiting=None):
        """Run ``call(engine pointer, report)``, one C call, on the current connections.

        ``sending``: a batch to hold with the connections from now on.  ``waiting``: a batch
        that must be in flight on them, let go of once the call succeeded.  Raises
        ReplicaError, the connections closed, if the call failed.
        """
        with self._io:
            with self._lock:
                engine = self._engine
                if waiting is not None and (engine is None or waiting not in engine.batches):
                    raise ReplicaError("the batch is not in flight here: already waited for, or "
                                       "abandoned when the replica's connections closed",
                                       errno_module.ENOTCONN)
                if engine is None:
                    raise _not_connected(self.uri)
                if sending is not None:
                    engine.batches.add(sending)
                self._busy = engine
            report = _ffi.new("struct fc_report *")
            try:
                call(engine.ptr, report)
            finally:
                with self._lock:
                    self._busy = None
                    self._retried += report.retried
                    if report.errnum and engine is self._engine:
                        self._engine = None
                        self._open_connections = 0
                    # Detached by close(), reconnect() or the failure: this call frees it.
                    orphan = engine is not self._engine
                    if not report.errnum and waiting is not None and not orphan:
                        engine.batches.discard(waiting)
                    if report.errnum:
                        self._failed += 1
                if orphan:
                    engine.close()
        if report.errnum:
            raise ReplicaError(_failure(report), report.errnum)


def _milliseconds(seconds):
    return max(1, min(_INT_MAX, round(seconds * 1000)))


def _new_state():
    state = _lib.fc_batch_new()
    if state == _ffi.NULL:
        raise MemoryError("no memory for a batch")
    return _ffi.gc(state, _lib.fc_batch_free)


def _not_connected(uri):
    return ReplicaError(f"replica {uri!r} is not connected (call reconnect())",
                        errno_module.ENOTCONN)


def _text(report):
    return _ffi.string(report.message).decode(errors="replace")


def _failure(report):
    """One line for a failed call: what failed, where, after how many retries, and why."""
    if report.kind == _lib.FC_FLUSH:
        where = " on flush"
    elif report.kind in _DOING:
        where = f" {_DOING[report.kind]} at offset {report.offset} (+{report.length} bytes)"
    else:
        where = ""
    after = f" after {report.retries} retries" if report.retries else ""
    detail = f": {_text(report)}" if report.message[0] != b"\0" else ""
    return f"replica I/O failed{where}{after}: {describe_error(report.errnum)}{detail}"
