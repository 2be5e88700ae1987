"""The replica: the destination NBD export, and the execution of an SGL on it.

Theory of operation
-------------------
Each cycle the session hands `Replica.execute` the cycle's SGL -- segments
``(offset, length, kind)`` in offset order, disjoint -- and a ``read``
function that returns the source bytes of a data segment as of the RP.  The
copier turns every segment into NBD commands:

* ``data``  -> WRITE of ``read(offset, length)``;
* ``zero``  -> WRITE_ZEROES, or WRITEs of a shared zero buffer when the
  replica cannot zero;
* ``trim``  -> WRITE_ZEROES *without* NO_HOLE, or zero-buffer WRITEs.  A
  trimmed range of the source reads as zeros, so the replica must read zeros
  there too (invariant 3).  NBD TRIM does not promise that (the spec leaves a
  trimmed range's contents unspecified), whereas WRITE_ZEROES without NO_HOLE
  both guarantees zeros and lets the server deallocate, which is what a trim
  is for.  So no TRIM command is ever sent; ``can_trim`` is informational.

Commands are asynchronous (libnbd aio): up to ``max_inflight`` are in flight
at once, over one or more connections.  Because the SGL is disjoint, the
commands in flight never overlap, so their completion order does not matter.
One thread drives every connection with ``poll(2)`` on the handles' sockets
(`Pump`); libnbd releases the GIL in every call, and the thread sleeps in
``poll`` while it waits, so nothing spins.  A command's buffer is referenced
by its `_Command` until its completion callback has run.

Failure model: the first failed command stops the issuing of new ones; the
commands already in flight are drained (each may fail too: a dead connection
fails them all with ENOTCONN), then `ReplicaError` names the first failure
and its errno.  If the replica answers nothing for ``io_timeout`` seconds the
connections are dropped (their state is unknown) and `ReplicaError` is
raised; the session's retry loop calls `Replica.reconnect`.  Nothing here
retries by itself: a failed cycle is merged into the next report upstream.

Commit: `Replica.flush` sends FLUSH on every connection (one is enough when
the server advertises multi-conn consistency).  Only after it returns is the
cycle committed.
"""

import ctypes
import errno as errno_module
import os
import select
import time
from urllib.parse import parse_qs, urlsplit

import nbd

from copier._fastcopy import ffi as _fc_ffi, lib as _fc_lib

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

# NBD servers commonly refuse payloads above 32 MiB; larger data segments
# are cut into pieces this size.
MAX_WRITE = 32 << 20
# WRITE_ZEROES lengths are 32-bit in the protocol; stay well below.
MAX_ZERO = 1 << 30
# Size of the shared zero buffer used when the replica cannot zero.
ZERO_BUFFER = 1 << 20
KINDS = ("data", "zero", "trim")
PROGRESS_INTERVAL = 0.25


class ReplicaError(Exception):
    """The replica (or another NBD export) is unreachable, too small, or failed.

    ``errno`` is the errno libnbd reported (an int), or None.
    """

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


def parse_uri(uri):
    """Return `uri` if it is an NBD URI libnbd can connect to, else raise ValueError.

    Accepts nbd://, nbds://, nbd+unix:// and nbds+unix://; a unix URI must
    name its socket (``?socket=PATH``), a TCP URI its host.  O(len(uri)).
    """
    if not isinstance(uri, str):
        raise ValueError(f"bad NBD URI {uri!r}: must be a string")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"bad NBD URI {uri!r}: must be nbd://HOST[:PORT]/[EXPORT] or "
            "nbd+unix:///[EXPORT]?socket=PATH (or nbds:// / nbds+unix:// for TLS)")
    if parts.scheme.endswith("+unix") and not parse_qs(parts.query).get("socket"):
        raise ValueError(f"bad NBD URI {uri!r}: a unix URI needs ?socket=PATH")
    if not parts.scheme.endswith("+unix") and not parts.hostname:
        raise ValueError(f"bad NBD URI {uri!r}: a TCP URI needs a host")
    return uri


def describe_error(err):
    """Return 'NAME (message)' for an errno int (or 'unknown error'). O(1)."""
    if not err:
        return "unknown error"
    name = errno_module.errorcode.get(err, str(err))
    return f"{name} ({os.strerror(err)})"


def connect(uri, *, timeout=10.0, what="replica", block_status=False):
    """Connect to the NBD export at `uri` and return its ready nbd.NBD handle.

    Raises ValueError for a bad URI and ReplicaError when the export is
    unreachable or does not finish the handshake within `timeout` seconds
    (a refused connection fails at once).  `what` names the export in
    messages.  With `block_status`, base:allocation is requested.  The host
    name lookup of a TCP URI is done by libnbd and is not covered by
    `timeout`.  Cost: one connection and one handshake.
    """
    parse_uri(uri)
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    if block_status:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    try:
        h.aio_connect_uri(uri)
        _finish_handshake(h, time.monotonic() + timeout)
    except nbd.Error as e:
        raise ReplicaError(f"cannot connect to {what} {uri!r}: {e}", e.errnum) from None
    except Stalled:
        raise ReplicaError(
            f"cannot connect to {what} {uri!r}: no NBD handshake within {timeout:g} s",
            errno_module.ETIMEDOUT) from None
    return h


def _finish_handshake(h, deadline):
    pump = Pump([h])
    while h.aio_is_connecting():
        pump.wait(deadline - time.monotonic())
    if not h.aio_is_ready():
        raise nbd.Error(f"connection ended in state {h.connection_state()}", 0)


class Stalled(Exception):
    """No socket became ready before the timeout."""


class Pump:
    """Drives several libnbd handles from one thread with poll(2).

    This is what ``nbd.NBD.poll`` does for one handle, extended to many so
    that several connections progress while the thread sleeps.
    """

    def __init__(self, handles):
        self.handles = list(handles)

    def wait(self, timeout):
        """Sleep until a socket is ready (or `timeout` s), then let libnbd act.

        Raises Stalled on timeout and nbd.Error if a connection broke or
        no connection is left to wait on.  O(number of handles) per call.
        """
        poller, by_fd = self._register()
        if not by_fd:
            raise nbd.Error("no open NBD connection to wait on", errno_module.ENOTCONN)
        ready = poller.poll(max(0, int(timeout * 1000)))
        if not ready:
            raise Stalled()
        for fd, events in ready:
            _notify(by_fd[fd], events)

    def _register(self):
        poller = select.poll()
        by_fd = {}
        for h in self.handles:
            events = _poll_events(h)
            if events:
                fd = h.aio_get_fd()
                poller.register(fd, events)
                by_fd[fd] = h
        return poller, by_fd


def _gone(h):
    return h.aio_is_dead() or h.aio_is_closed()


def _poll_events(h):
    if _gone(h) or h.aio_is_created():
        return 0
    direction = h.aio_get_direction()
    events = select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0
    return events | (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0)


def _notify(h, events):
    if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
        h.aio_notify_read()
    elif events & select.POLLOUT:
        h.aio_notify_write()


class _Command:
    """One NBD command in flight; holds its buffer alive until completion."""

    __slots__ = ("run", "offset", "length", "kind", "buffer", "conn")

    def __init__(self, run, offset, length, kind, conn):
        self.run = run
        self.offset = offset
        self.length = length
        self.kind = kind
        self.buffer = None
        self.conn = conn

    def __call__(self, error):
        self.run.completed(self, error.value)
        return 1


def validate_sgl(segments, size):
    """Return `segments` as a list after checking it is a valid SGL for `size` bytes.

    Raises ValueError for an unknown kind, a negative or empty length, a
    segment past `size`, or segments out of order or overlapping.  O(n).
    """
    sgl = [tuple(s) for s in segments]
    end = 0
    for offset, length, kind in sgl:
        if kind not in KINDS:
            raise ValueError(f"bad segment kind {kind!r}: must be one of {KINDS}")
        if offset < end or length <= 0:
            raise ValueError(
                f"bad SGL: segment ({offset}, {length}) is empty, out of order or overlaps")
        end = offset + length
        if end > size:
            raise ValueError(f"bad SGL: segment ({offset}, {length}) ends past the replica's "
                             f"{size} bytes")
    return sgl


def pieces(offset, length, limit):
    """Yield (offset, length) pieces of at most `limit` bytes covering the range. O(length/limit)."""
    end = offset + length
    while offset < end:
        n = min(limit, end - offset)
        yield offset, n
        offset += n


class _Run:
    """The state of one `Replica.execute`: issuing, completions, counts."""

    def __init__(self, handles, max_inflight, io_timeout, progress=None, total=0):
        self.handles = handles
        self.io_timeout = io_timeout
        self.inflight = [0] * len(handles)
        self.max_inflight = max_inflight
        self.progress = progress
        self.total = total
        self.done = 0
        self.counts = {"bytes_copied": 0, "bytes_zeroed": 0, "bytes_trimmed": 0,
                       "segments": 0}
        self.failure = None
        self.stalled = False
        self.last_progress = time.monotonic()

    def issue(self, pump, offset, length, kind, send):
        """Wait for a free slot, then send one command via `send(h, command)`."""
        while sum(self.inflight) >= self.max_inflight and self.failure is None:
            self.pump_once(pump)
        if self.failure is not None:
            return
        conn = self.inflight.index(min(self.inflight))
        command = _Command(self, offset, length, kind, conn)
        self.inflight[conn] += 1
        try:
            send(self.handles[conn], command)
        except nbd.Error as e:
            self.completed(command, e.errnum or errno_module.EIO, str(e))

    def completed(self, command, error, message=None):
        """Account for a finished command (called by libnbd's completion callback)."""
        self.inflight[command.conn] -= 1
        command.buffer = None
        if error:
            self._fail(command, error, message)
            return
        if command.kind in _COUNTER:
            self.counts[_COUNTER[command.kind]] += command.length
        self.done += command.length
        self._report_progress(False)

    def _report_progress(self, final):
        now = time.monotonic()
        if self.progress and (final or now - self.last_progress >= PROGRESS_INTERVAL):
            self.last_progress = now
            self.progress(self.done, self.total)

    def _fail(self, command, error, message):
        if self.failure is None:
            self.failure = (command, error, message)

    def pump_once(self, pump):
        try:
            pump.wait(self.io_timeout)
        except nbd.Error as e:
            self._fail(None, e.errnum or errno_module.ENOTCONN, str(e))
        except Stalled:
            self.stalled = True
            self._fail(None, errno_module.ETIMEDOUT,
                       f"did not answer for {self.io_timeout:g} s; disconnected")

    def drain(self, pump):
        """Wait for the commands in flight, unless the replica stalled."""
        while not self.stalled and any(
                n and not _gone(h) for n, h in zip(self.inflight, self.handles)):
            self.pump_once(pump)
        self._report_progress(True)


class SentBatch:
    """A batch on its way to the replica (`Replica.send_batch`): its C completion state, and
    its buffer, held until the batch completed or the connections closed."""

    def __init__(self, state, buf, total):
        self.state, self.buf, self.total = state, buf, total


_COUNTER = {"data": "bytes_copied", "zero": "bytes_zeroed", "trim": "bytes_trimmed"}


class Replica:
    """A connection (or several) to the replica export.

    ``Replica(uri, connections=1, connect_timeout=10.0, io_timeout=60.0)``
    connects at once (ValueError for a bad URI, ReplicaError if unreachable).
    With ``connections > 1`` the segments of an SGL are spread over that many
    NBD connections, if the replica advertises multi-conn (else one is used).
    Use as a context manager, or call `close`.
    """

    def __init__(self, uri, *, connections=1, connect_timeout=10.0, io_timeout=60.0):
        self.uri = parse_uri(uri)
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"bad connections {connections!r}: must be an integer >= 1")
        if not connect_timeout > 0 or not io_timeout > 0:
            raise ValueError("bad timeout: connect_timeout and io_timeout must be > 0 seconds")
        self.connections = connections
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._handles = []
        self._sending = set()
        self.reconnect()

    def reconnect(self):
        """Drop the current connections and open new ones. O(connections) handshakes.

        Raises ReplicaError if the replica is unreachable; the Replica is then
        closed until a later `reconnect` succeeds.
        """
        self.close()
        first = connect(self.uri, timeout=self.connect_timeout)
        handles = [first]
        # More connections only where the replica says they are consistent: one that does not
        # advertise multi-conn may not even accept a second client (qemu-nbd --shared=1).
        if first.can_multi_conn():
            handles += [connect(self.uri, timeout=self.connect_timeout)
                        for _ in range(self.connections - 1)]
        self.size = first.get_size()
        self.can_zero = first.can_zero()
        self.can_trim = first.can_trim()
        self.can_flush = first.can_flush()
        self.can_fast_zero = first.can_fast_zero()
        self.can_multi_conn = first.can_multi_conn()
        if first.is_read_only():
            raise ReplicaError(f"replica {self.uri!r} is read-only")
        self._handles = handles

    def close(self):
        """Disconnect politely (NBD_CMD_DISC when idle) and free the handles. O(connections).

        Batches still in flight are abandoned: their buffers are let go only after the
        handles, whose closing ends libnbd's use of them.
        """
        handles, self._handles = self._handles, []
        while handles:
            _disconnect(handles.pop())
        self._sending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live_handles(self):
        if not self._handles or any(_gone(h) for h in self._handles):
            raise ReplicaError(f"replica {self.uri!r} is not connected (call reconnect())",
                               errno_module.ENOTCONN)
        return self._handles

    def check_size(self, source_size):
        """Raise ReplicaError if the replica is smaller than `source_size` bytes. O(1).

        The session calls this before writing anything, so a too-small
        replica is left untouched.
        """
        if not isinstance(source_size, int) or source_size < 0:
            raise ValueError(f"bad source size {source_size!r}: must be an integer >= 0")
        if self.size < source_size:
            raise ReplicaError(f"replica is smaller than the source "
                               f"({self.size} < {source_size} bytes)")

    def execute(self, segments, read, *, max_inflight=16, progress=None):
        """Write an SGL to the replica; return the byte counts.

        `segments`: iterable of ``(offset, length, kind)``, kind in data /
        zero / trim, in offset order and disjoint (validated first: a bad SGL
        raises ValueError before anything is written).  ``read(offset,
        length)`` returns the source bytes of a data segment (a bytes-like of
        exactly `length` bytes); it is called just before that segment's
        WRITE, so at most `max_inflight` buffers are alive; it may be None
        for an SGL without data (the session sends data with `send_batch`).  `progress(done,
        total)` is called at most every 0.25 s and once at the end.

        Returns ``{"bytes_copied", "bytes_zeroed", "bytes_trimmed",
        "segments"}``.  Raises ReplicaError on the first failed command, after
        the commands in flight have finished.  Does not flush: call `flush`
        to commit.

        Cost: O(n) Python work for n segments plus one command per data
        segment (per 32 MiB of it) and per GiB of zero/trim; memory
        O(n + max_inflight * largest data segment).
        """
        handles = self._live_handles()
        if not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"bad max_inflight {max_inflight!r}: must be an integer >= 1")
        sgl = validate_sgl(segments, self.size)
        run = _Run(handles, max_inflight, self.io_timeout, progress, sum(s[1] for s in sgl))
        pump = Pump(handles)
        try:
            self._issue_all(run, pump, sgl, read)
        finally:
            run.drain(pump)
        self._finish(run)
        return run.counts

    def _finish(self, run):
        if run.stalled:
            self.close()
        _raise_failure(run.failure)

    def _issue_all(self, run, pump, sgl, read):
        for offset, length, kind in sgl:
            if run.failure is not None:
                return
            if kind == "data":
                self._issue_data(run, pump, offset, length, read)
            else:
                self._issue_zero(run, pump, offset, length, kind)
            run.counts["segments"] += 1

    def _issue_data(self, run, pump, offset, length, read):
        for off, n in pieces(offset, length, MAX_WRITE):
            buf = read(off, n)
            if memoryview(buf).nbytes != n:
                raise ValueError(f"read({off}, {n}) returned {memoryview(buf).nbytes} bytes")
            run.issue(pump, off, n, "data", _pwrite(buf, off))

    def _issue_zero(self, run, pump, offset, length, kind):
        if not self.can_zero:
            for off, n in pieces(offset, length, ZERO_BUFFER):
                run.issue(pump, off, n, kind, _pwrite(_ZEROS[:n], off))
            return
        for off, n in pieces(offset, length, MAX_ZERO):
            run.issue(pump, off, n, kind, _zero(n, off))

    def send_batch(self, pairs, buf, *, max_inflight=64):
        """Start writing data segments whose bytes lie back to back in ``buf``; return a
        `SentBatch` to pass to `wait_batch`, without waiting for the replies.

        ``pairs``: array('Q') of (offset, length), ascending and disjoint, within the replica.
        The batch goes out from C in one call without the GIL (``fastcopy.c``), spread over
        every connection, at most ``max_inflight`` commands in flight in all, this batch's and
        earlier ones'. ``buf`` must not change until `wait_batch` returned for this batch (or
        the connections were closed). Raises ValueError for a bad batch before sending any of
        it, and ReplicaError as `wait_batch` does. O(total length).
        """
        if len(pairs) % 2 or not pairs:
            raise ValueError("pairs must hold at least one (offset, length) pair")
        if pairs[-2] + pairs[-1] > self.size:
            raise ValueError(f"bad batch: it ends at {pairs[-2] + pairs[-1]}, past the replica's {self.size} bytes")
        total = sum(pairs[1::2])
        if memoryview(buf).nbytes < total:
            raise ValueError(f"bad batch: its buffer holds {memoryview(buf).nbytes} of its {total} bytes")
        state = _fc_lib.fc_batch_new()
        if state == _fc_ffi.NULL:
            raise MemoryError("no memory for a batch")
        sent = SentBatch(_fc_ffi.gc(state, _fc_lib.fc_batch_free), buf, total)
        err = _fc_ffi.new("char[]", 256)
        handles, c_handles = self._c_handles()
        rc = _fc_lib.fc_send(c_handles, len(handles), sent.state,
                             _fc_ffi.from_buffer("uint64_t[]", pairs), len(pairs) // 2,
                             _fc_ffi.from_buffer(buf), max_inflight, int(self.io_timeout * 1000),
                             err, len(err))
        self._sending.add(sent)
        if rc:
            self._batch_failed(rc, "sending data", err)
        return sent

    def wait_batch(self, sent):
        """Wait until every write of ``sent`` (from `send_batch`) has completed; return its bytes.

        On any failure the connections are dropped (commands may still be in flight on
        them) and ReplicaError names the first failed offset and its errno; so it does for a
        batch the connections were closed under, even if they were opened again since.
        O(replies).
        """
        if sent not in self._sending:
            raise ReplicaError("the batch is not in flight here: already waited for, or abandoned "
                               "when the replica's connections closed", errno_module.ENOTCONN)
        err, bad = _fc_ffi.new("char[]", 256), _fc_ffi.new("uint64_t *")
        handles, c_handles = self._c_handles()
        rc = _fc_lib.fc_wait(c_handles, len(handles), sent.state,
                             int(self.io_timeout * 1000), bad, err, len(err))
        if rc:
            self._batch_failed(rc, f"writing data at offset {bad[0]}", err)
        self._sending.discard(sent)
        return sent.total

    def _c_handles(self):
        """The live handles and their C pointers. A list of its own: it keeps the handles open
        through the C call even if another thread closes this Replica meanwhile (`Session.stop`
        after its join timed out)."""
        handles = list(self._live_handles())
        return handles, _fc_ffi.new("struct nbd_handle *[]", [_handle_pointer(h) for h in handles])

    def _batch_failed(self, rc, what, err):
        self.close()
        raise ReplicaError(f"replica I/O failed {what}: {describe_error(rc)}: "
                           f"{_fc_ffi.string(err).decode(errors='replace')}", rc)

    def flush(self):
        """Commit: FLUSH every connection and wait for the replies.

        One FLUSH suffices when the server advertises multi-conn consistency.
        If the replica cannot flush, this does nothing: such a server has no
        flush command (typically no volatile write cache), so its writes are
        as stable as it can make them when they are acknowledged, and
        `execute` returning is the commit.  Raises ReplicaError on failure.
        Cost: one round trip (plus the server's sync).
        """
        handles = self._live_handles()
        if not self.can_flush:
            return
        targets = handles[:1] if self.can_multi_conn else handles
        run = _Run(targets, len(targets), self.io_timeout)
        pump = Pump(targets)
        # issue() picks the least busy connection, so each target gets one FLUSH.
        for _ in targets:
            run.issue(pump, 0, 0, "flush", _flush)
        run.drain(pump)
        self._finish(run)


def _disconnect(h):
    """NBD_CMD_DISC when idle; the handle closes when its last reference goes."""
    if h.aio_is_ready() and not h.aio_in_flight():
        try:
            h.aio_disconnect()
        except nbd.Error:
            pass


_ZEROS = memoryview(bytes(ZERO_BUFFER))

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _handle_pointer(h):
    """The C ``struct nbd_handle *`` inside a libnbd Python handle (a capsule of that name)."""
    return _fc_ffi.cast("struct nbd_handle *", _capsule_pointer(h._o, b"nbd_handle"))


def _pwrite(buf, offset):
    def send(h, command):
        command.buffer = buf
        h.aio_pwrite(buf, offset, completion=command)
    return send


def _zero(length, offset):
    def send(h, command):
        h.aio_zero(length, offset, completion=command)
    return send


def _flush(h, command):
    h.aio_flush(completion=command)


def _raise_failure(failure):
    if failure is None:
        return
    command, err, message = failure
    where = "" if command is None else _where(command)
    raise ReplicaError(f"replica I/O failed{where}: {message or describe_error(err)}", err)


def _where(command):
    if command.kind == "flush":
        return " on flush"
    return f" writing {command.kind} at offset {command.offset} (+{command.length} bytes)"
