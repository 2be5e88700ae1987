"""The control server answers every request, whatever the request or the session do."""
import json
import os
import socket

from nbd_plugin import control


class Broken:
    """A session whose every method fails the way a bug would."""

    def status(self):
        raise RuntimeError("deque mutated during iteration")

    def report_json(self):
        raise AttributeError("no report")


def ask(path, payload):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data)


def test_an_unexpected_error_is_answered_not_a_dropped_connection(tmp_path):
    """Issue 8, bug 4: only Value/Key/TypeError were caught; anything else closed the
    connection with no reply and a traceback in the server log."""
    server = control.ControlServer(str(tmp_path / "c.sock"), Broken())
    server.start()
    try:
        for cmd in ("status", "report"):
            reply = ask(server.path, json.dumps({"cmd": cmd}).encode() + b"\n")
            assert reply["error"].startswith("internal error answering the request"), reply
        assert "bad request" in ask(server.path, b"[1, 2]\n")["error"]
        assert "bad request" in ask(server.path, b"\xff\xfe garbage\n")["error"]
        assert ask(server.path, b'{"cmd": "nope"}\n') == {"error": "unknown command 'nope'"}
    finally:
        server.stop()
    assert not os.path.exists(server.path)


def test_a_bad_timeout_is_the_clients_error(tmp_path):
    server = control.ControlServer(str(tmp_path / "c.sock"), Broken())
    server.start()
    try:
        reply = ask(server.path, b'{"cmd": "rp", "timeout": "soon"}\n')
        assert reply == {"error": "bad request: timeout 'soon' is not a number"}
    finally:
        server.stop()
