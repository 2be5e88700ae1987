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


# -- access, limits and resources (issue 12) ----------------------------------------------------

import contextlib  # noqa: E402
import errno  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import nbd  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402

from conftest import make_image, nbdrep, uri, wait_until  # noqa: E402
from procs import nbdrep_cmd  # noqa: E402

NOBODY = 65534   # nobody:nogroup on Debian

AS_NOBODY = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    sys.exit(print(json.dumps({"connect": e.errno})))
s.sendall(sys.argv[2].encode() + b"\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().strip())
"""


class Fake:
    """A session that counts the RPs it was asked for."""

    def __init__(self):
        self.rps = 0

    def status(self):
        return {"state": "fake"}

    def request_rp(self):
        self.rps += 1
        return 7

    def wait_for(self, cycle, timeout):
        return True


@pytest.fixture
def open_dir():
    """A directory other users may traverse (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="nbdrep-control-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path)


@contextlib.contextmanager
def serving(path, session, **options):
    server = control.ControlServer(path, session, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def as_nobody(path, message):
    """``message`` sent by a process of user nobody (group nogroup only); its reply dict, or
    {"connect": errno} if it could not connect."""
    done = subprocess.run(["/usr/bin/python3", "-c", AS_NOBODY, path, json.dumps(message)],
                          user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_the_socket_is_this_users_alone_unless_a_control_group_shares_it(open_dir):
    path = os.path.join(open_dir, "c.sock")
    with serving(path, Fake()):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert as_nobody(path, {"cmd": "status"}) == {"connect": errno.EACCES}
    with serving(path, Fake(), group=NOBODY):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
        assert as_nobody(path, {"cmd": "status"}) == {"state": "fake"}
    assert not [n for n in os.listdir(open_dir)], "a temporary socket file was left behind"


def test_rp_needs_the_servers_user_root_or_the_control_group(open_dir):
    """Whoever can connect may read; changing state is checked against SO_PEERCRED, so a
    socket file whose mode was widened by hand does not let anyone take RPs."""
    path = os.path.join(open_dir, "c.sock")
    session = Fake()
    with serving(path, session):
        os.chmod(path, 0o666)
        assert as_nobody(path, {"cmd": "status"}) == {"state": "fake"}
        reply = as_nobody(path, {"cmd": "rp"})
        assert reply["error"].startswith("permission denied: 'rp' needs"), reply
        for cmd in ("promote", "restore", "anything new"):   # what is not read-only is checked
            reply = as_nobody(path, {"cmd": cmd})
            assert reply["error"].startswith(f"permission denied: {cmd!r} needs"), reply
        assert session.rps == 0
        assert ask(path, b'{"cmd": "rp"}\n') == {"cycle": 7, "committed": False}   # root
    with serving(path, session, group=NOBODY):
        assert as_nobody(path, {"cmd": "rp", "wait": True}) == {"cycle": 7, "committed": True}
    assert session.rps == 2


def request_threads():
    return sum(t.name == "nbdrep-control-request" for t in threading.enumerate())


def test_requests_are_bounded_in_number_and_idle_ones_time_out(tmp_path):
    """Before: a thread per connection, never timed out (300 idle connections, 300 threads)."""
    path = str(tmp_path / "c.sock")
    with serving(path, Fake(), max_clients=4, request_timeout=5.0), contextlib.ExitStack() as stack:
        idle = []
        for _ in range(40):
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            s.connect(path)   # blocking: waits for room in the backlog while the server answers
            s.settimeout(30)
            idle.append(s)
        wait_until(lambda: request_threads() == 4, what="four requests being served")
        busy = control.request(path, {"cmd": "status"}, timeout=30)
        assert busy["error"].startswith("busy: too many control requests"), busy
        assert request_threads() == 4
        answers = []
        for s in idle:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            answers.append(json.loads(data))
        timed_out = {"error": "no complete request within 5 s"}
        assert answers.count(timed_out) == 4, answers
        assert all(a == timed_out or a["error"].startswith("busy") for a in answers), answers
        wait_until(lambda: request_threads() == 0, what="the timed-out requests ending")
        assert ask(path, b'{"cmd": "status"}\n') == {"state": "fake"}


def test_huge_garbage_and_half_open_requests_are_answered_and_harm_nothing(tmp_path):
    path = str(tmp_path / "c.sock")
    with serving(path, Fake(), request_timeout=1.0):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            try:
                s.sendall(b"x" * (1 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass   # the server answered and closed before taking it all
            assert json.loads(s.recv(4096)) == {"error": f"request longer than {control.MAX_REQUEST} bytes"}
        assert "bad request" in ask(path, b'{"cmd": "sta')["error"]    # half a request, then EOF
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:   # half, then silence
            s.settimeout(30)
            s.connect(path)
            s.sendall(b'{"cmd": "sta')
            assert json.loads(s.recv(4096)) == {"error": "no complete request within 1 s"}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:   # a byte at a time
            s.settimeout(30)
            s.connect(path)
            reply = b""
            for byte in b'{"cmd": "status"}\n':   # 18 bytes at 0.2 s: 3.6 s if never cut
                try:
                    s.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.2)
                s.setblocking(False)
                try:
                    reply = s.recv(4096)
                except BlockingIOError:
                    pass
                finally:
                    s.settimeout(30)
                if reply:
                    break
            reply = reply or s.recv(4096)
            # Each byte came within 0.2 s, so a timeout per recv would never have fired.
            assert json.loads(reply) == {"error": "no complete request within 1 s"}
        assert "bad request" in ask(path, os.urandom(4096).replace(b"\n", b"") + b"\n")["error"]
        assert ask(path, b'{"cmd": "status"}\n') == {"state": "fake"}


def fds(pid):
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def logged(path, text):
    with open(path) as f:
        return text in f.read()


def connect(stack, path):
    """A connection to ``path`` that sends nothing, closed when ``stack`` closes."""
    s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    s.connect(path)
    return s


def test_the_server_survives_running_out_of_descriptors_and_recovers(procs, tmp_path):
    """Before: 1,029 idle connections used up the fds, and the control socket stayed dead for
    good once they closed, its accept loop ended by EMFILE. Here nbdkit's descriptor limit is
    lowered, raw NBD connections use up what nbdkit can use, idle control connections the
    rest; the control socket's accept fails, and once the connections close everything
    answers again."""
    src = make_image(str(tmp_path / "src.img"), 1 << 20)
    sock, ctl, log = (str(tmp_path / n) for n in ("src.sock", "control.sock", "serve.log"))
    with open(log, "w") as err:
        server = procs.start(nbdrep_cmd("serve", "--source", src, "--socket", sock, "--control", ctl,
                                        "--state", str(tmp_path / "state")),
                             wait_for=ctl, stdout=subprocess.DEVNULL, stderr=err)
    nbdkit_pid = next(p.pid for p in psutil.Process(server.pid).children() if p.name() == "nbdkit")
    limit = max(fds(nbdkit_pid)) + 8
    subprocess.run(["prlimit", "--pid", str(nbdkit_pid), f"--nofile={limit}:{limit}"], check=True, timeout=60)
    exhausted = "control socket: cannot accept (Too many open files)"
    with contextlib.ExitStack() as stack:
        for _ in range(limit):   # an NBD connection takes a socket and a pipe in nbdkit
            before = fds(nbdkit_pid)
            connect(stack, sock)
            wait_until(lambda: fds(nbdkit_pid) - before or logged(log, "Too many open files"),
                       what="nbdkit taking the NBD connection or running out", poll=0.05)
            if logged(log, "Too many open files"):
                break
        assert logged(log, "Too many open files"), "nbdkit never ran out of descriptors"
        for _ in range(control.MAX_CLIENTS):   # what is left, one control connection at a time
            before = fds(nbdkit_pid)
            connect(stack, ctl)
            wait_until(lambda: fds(nbdkit_pid) - before or logged(log, exhausted),
                       what="the control socket taking the connection or running out", poll=0.05)
            if logged(log, exhausted):
                break
        assert logged(log, exhausted), "the control socket never ran out of descriptors"
    # The connections are closed: the descriptors return.
    assert json.loads(nbdrep("status", "--json", "--control", ctl).stdout)["state"] == "tracking"
    assert logged(log, "control socket: accepting again after")
    h = nbd.NBD()
    h.connect_uri(uri(sock))
    assert h.get_size() == 1 << 20
    h.shutdown()


def test_serve_control_group_shares_the_socket_and_an_unknown_group_is_one_line(procs, tmp_path):
    src = make_image(str(tmp_path / "src.img"), 1 << 20)
    ctl, state = str(tmp_path / "control.sock"), tmp_path / "state"
    args = ["serve", "--source", src, "--socket", str(tmp_path / "s.sock"), "--control", ctl,
            "--state", str(state)]
    run = subprocess.run(nbdrep_cmd(*args, "--control-group", "no-such-group"), capture_output=True,
                         text=True, timeout=120)
    assert (run.returncode, run.stderr) == (2, "nbdrep: control-group='no-such-group': no such group\n")
    assert not state.exists()
    procs.start(nbdrep_cmd(*args, "--control-group", "nogroup"), wait_for=ctl, stdout=subprocess.DEVNULL)
    st = os.stat(ctl)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, NOBODY)
