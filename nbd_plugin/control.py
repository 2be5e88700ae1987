"""The control socket: a unix socket where ``nbdrep rp`` and ``nbdrep status`` talk to a server.

One JSON object per line each way; one request per connection. Requests:

    {"cmd": "status"}                           -> the session's status dict
    {"cmd": "rp", "wait": true, "timeout": 30}  -> {"cycle": N, "committed": bool}
    {"cmd": "report"}                           -> the last report's extents per export
    {"cmd": "metrics"}                          -> {"text": Prometheus exposition text}

Errors come back as {"error": "..."}.

Access rule: the socket file is mode 0600, owned by the server's user, so only that user (and
root) can connect; with a control group it is 0660 and that group's, so its members can too.
The file appears only once the socket listens with its final mode and group (it is bound under
a temporary name and renamed into place), so no connection ever sees a wider mode. Whoever can
connect may read (status, report, metrics); a command that changes state (rp) is also checked
against the peer's credentials (SO_PEERCRED), in case the file's mode was widened by hand: the
server's own user, root, or a member of the control group.

Robustness: at most ``max_clients`` requests are served at once, each in its own thread; a
connection beyond that is answered "busy" at once and closed. A request must arrive whole
within ``request_timeout`` seconds and ``MAX_REQUEST`` bytes, else it is answered with an error
and closed, so idle or half-open connections cannot pile up. When accept() fails (EMFILE: the
process is out of descriptors) the loop waits and tries again, backing off to a second, and
logs the episode once: waiting connections are served once descriptors return.
"""
import errno
import json
import logging
import os
import pwd
import socket
import struct
import threading
import time

from nbd_plugin import metrics

MAX_REQUEST = 64 << 10
MAX_CLIENTS = 8
REQUEST_TIMEOUT = 5.0
# Commands anyone who can connect may send; every other one (rp, and the receiver's restore and
# promote) changes state and needs the server's user, root or the control group.
READ_ONLY = frozenset({"status", "report", "metrics", "rps"})
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid
log = logging.getLogger("nbdrep")


class ControlServer:
    """Serves one session on ``path``: one thread per request, at most ``max_clients`` at once.

    ``group`` (a gid, or None) shares the socket with that group. The accept loop works on its
    own reference to the listening socket; ``stop`` shuts it down, which wakes a blocked
    accept() with an error that ends the loop.
    """

    def __init__(self, path, session, group=None, max_clients=MAX_CLIENTS,
                 request_timeout=REQUEST_TIMEOUT):
        self.path = path
        self.session = session
        self.group = group
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_clients)
        self._sock = None
        self._stopping = False

    def start(self):
        """Listen on ``path`` (replacing a stale socket file) and serve in a daemon thread."""
        temporary = f"{self.path}.{os.getpid()}.tmp"
        if os.path.lexists(temporary):
            os.unlink(temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temporary)
            if self.group is not None:
                os.chown(temporary, -1, self.group)
            os.chmod(temporary, 0o600 if self.group is None else 0o660)
            sock.listen(16)
            os.replace(temporary, self.path)
        except BaseException:
            sock.close()
            if os.path.lexists(temporary):
                os.unlink(temporary)
            raise
        self._sock = sock
        threading.Thread(target=self._accept_loop, args=(sock,), name="nbdrep-control",
                         daemon=True).start()

    def stop(self):
        """Stop accepting and remove the socket file; requests being served finish."""
        self._stopping = True
        if self._sock is not None:
            self._sock.shutdown(socket.SHUT_RDWR)   # Linux: wakes the accept() with EINVAL
            self._sock.close()
            self._sock = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept_loop(self, sock):
        delay, failing_since = _BACKOFF_FIRST, None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError as e:
                if self._stopping:
                    return
                if e.errno == errno.ECONNABORTED:   # that client gave up before we got to it
                    continue
                # Out of descriptors (EMFILE) or memory: they come back as connections close.
                # Anything else is retried the same way: only stop() ends the loop.
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("control socket: cannot accept (%s); retrying", e.strerror or e)
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            if failing_since is not None:
                log.info("control socket: accepting again after %.1f s", time.monotonic() - failing_since)
                delay, failing_since = _BACKOFF_FIRST, None
            self._dispatch(conn)

    def _dispatch(self, conn):
        if not self._slots.acquire(blocking=False):
            _answer_and_close(conn, {"error": "busy: too many control requests at once; try again"})
            return
        try:
            threading.Thread(target=self._serve, args=(conn,), name="nbdrep-control-request",
                             daemon=True).start()
        except RuntimeError:   # no thread to be had: the same answer as a full house
            self._slots.release()
            _answer_and_close(conn, {"error": "busy: cannot start a thread for the request"})

    def _serve(self, conn):
        try:
            with conn:
                # One deadline for the whole request, not a timeout per recv: a client that
                # trickles a byte at a time must not hold its slot for longer.
                deadline = time.monotonic() + self.request_timeout
                try:
                    line = _read_line(conn, deadline)
                except _RequestError as e:
                    reply = json.dumps({"error": str(e)}).encode()
                else:
                    reply = self.answer(line, _peer(conn))
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                conn.sendall(reply + b"\n")
        except OSError:
            pass   # the client went away or stopped reading; nothing more to say
        finally:
            self._slots.release()

    def answer(self, line, peer=None):
        """The reply to one request line from ``peer`` ((pid, uid, gid), None if unknown),
        encoded: never raises, whatever the line or the session do. A malformed request is the
        client's error; anything else is logged."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise TypeError("a request is a JSON object")
        except (ValueError, TypeError) as e:
            return json.dumps({"error": f"bad request: {e}"}).encode()
        if request.get("cmd") not in READ_ONLY and not self.allowed(peer):
            return json.dumps({"error": f"permission denied: {request.get('cmd')!r} needs the "
                                        "server's user, root or the control group"}).encode()
        try:
            return json.dumps(self.handle(request)).encode()
        except Exception as e:
            log.exception("control request %r failed", request.get("cmd"))
            return json.dumps({"error": f"internal error answering the request: {e!r}"}).encode()

    def allowed(self, peer):
        """May ``peer`` ((pid, uid, gid) or None) change state? O(groups of its user)."""
        if peer is None:
            return False
        _, uid, gid = peer
        if uid in (0, os.geteuid()):
            return True
        return self.group is not None and self.group in _groups(uid, gid)

    def handle(self, request):
        """Answer one request dict. Pure dispatch over the session's methods."""
        cmd = request.get("cmd")
        if cmd == "status":
            return self.session.status()
        if cmd == "rp":
            try:
                timeout = float(request.get("timeout", 60))
            except (TypeError, ValueError):
                return {"error": f"bad request: timeout {request.get('timeout')!r} is not a number"}
            return self._rp(bool(request.get("wait")), timeout)
        if cmd == "report":
            return self.session.report_json()
        if cmd == "metrics":
            return {"text": metrics.text(self.session)}
        return {"error": f"unknown command {cmd!r}"}

    def _rp(self, wait, timeout):
        if not 0 < timeout <= 86400:
            return {"error": f"timeout {timeout} must be > 0 and at most 86400 seconds"}
        cycle = self.session.request_rp()
        committed = self.session.wait_for(cycle, timeout) if wait else False
        return {"cycle": cycle, "committed": committed}


class _RequestError(Exception):
    """A request that did not arrive whole; the message is the answer."""


def _read_line(conn, deadline):
    """The first line the client sends, without its newline, by ``deadline`` (monotonic). A
    client that closes its side after part of a line sent that part. O(MAX_REQUEST)."""
    data = bytearray()
    started = time.monotonic()
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            raise _RequestError(f"request longer than {MAX_REQUEST} bytes")
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)
            chunk = conn.recv(4096)
        except TimeoutError:
            raise _RequestError(f"no complete request within {deadline - started:.0f} s") from None
        if not chunk:
            break
        data += chunk
    line = bytes(data).split(b"\n", 1)[0]
    if len(line) > MAX_REQUEST:
        raise _RequestError(f"request longer than {MAX_REQUEST} bytes")
    return line


def _peer(conn):
    """(pid, uid, gid) of the process at the other end. O(1)."""
    return _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def _groups(uid, gid):
    """Every group of user ``uid`` whose process runs with primary group ``gid``. O(groups)."""
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:   # a uid without a passwd entry has only its process's group
        return [gid]


def _answer_and_close(conn, reply):
    """Answer without waiting for the client: the reply fits in an empty socket buffer, and a
    client that does not read it only loses it."""
    with conn:
        try:
            conn.setblocking(False)
            conn.send(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def request(path, message, timeout):
    """Client side: send one request to the server at ``path``, return its reply dict."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                # A unix socket with a timeout does not wait for room in a full backlog (the
                # server is busy, or out of descriptors): wait here, until the deadline.
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: backlog full") from None
                time.sleep(0.01)
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass   # a busy server answers and closes at once: its answer is still to be read
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
