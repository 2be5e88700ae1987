"""The control socket: a unix socket where ``nbdrep rp`` and ``nbdrep status`` talk to a server.

One JSON object per line each way; one request per connection. Requests:

    {"cmd": "status"}                           -> the session's status dict
    {"cmd": "rp", "wait": true, "timeout": 30}  -> {"cycle": N, "committed": bool}
    {"cmd": "report"}                           -> the last report's extents per export
    {"cmd": "metrics"}                          -> {"text": Prometheus exposition text}

Errors come back as {"error": "..."}.
"""
import json
import logging
import os
import socket
import threading

from nbd_plugin import metrics

MAX_REQUEST = 64 << 10
log = logging.getLogger("nbdrep")


class ControlServer:
    """Serves one session on ``path``; a daemon thread per connection, bounded requests.

    The accept loop works on its own reference to the listening socket, so ``stop`` closing
    it from another thread makes accept fail (and the loop end) instead of racing a check of
    ``_sock`` against its reset to None.
    """

    def __init__(self, path, session):
        self.path = path
        self.session = session
        self._sock = None

    def start(self):
        """Bind (replacing a stale socket file) and serve in a daemon thread."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        threading.Thread(target=self._accept_loop, args=(self._sock,), name="nbdrep-control",
                         daemon=True).start()

    def stop(self):
        """Close the listening socket and remove its file."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept_loop(self, sock):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                conn.sendall(self.answer(_read_line(conn)) + b"\n")
            except OSError:
                pass   # the client went away; nothing to answer

    def answer(self, line):
        """The reply to one request line, encoded: never raises, whatever the line or the
        session do. A malformed request is the client's error; anything else is logged."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise TypeError("a request is a JSON object")
        except (ValueError, TypeError) as e:
            return json.dumps({"error": f"bad request: {e}"}).encode()
        try:
            return json.dumps(self.handle(request)).encode()
        except Exception as e:
            log.exception("control request %r failed", request.get("cmd"))
            return json.dumps({"error": f"internal error answering the request: {e!r}"}).encode()

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
            return {"text": metrics.prometheus(self.session.status())}
        return {"error": f"unknown command {cmd!r}"}

    def _rp(self, wait, timeout):
        if not 0 < timeout <= 86400:
            return {"error": f"timeout {timeout} must be > 0 and at most 86400 seconds"}
        cycle = self.session.request_rp()
        committed = self.session.wait_for(cycle, timeout) if wait else False
        return {"cycle": cycle, "committed": committed}


def _read_line(conn):
    chunks, size = [], 0
    while size < MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks).split(b"\n", 1)[0]


def request(path, message, timeout):
    """Client side: send one request to the server at ``path``, return its reply dict."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
