"""`nbdrep` as a user meets it (issue 12): every bad input is one line naming the problem, exit
status 2, no traceback, and nothing written; state is written only once serving began; the
state file forgets sources no longer served; a resize is accepted with --accept-resize."""
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess

import pytest

from conftest import Server, make_image, nbdrep, nbdrep_cmd, uri, wait_until

MiB = 1 << 20


def snapshot(root):
    """{relative path: sha256 of a regular file, else its file type} of everything under root:
    what a command wrote, made or removed there shows as a difference."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[os.path.relpath(path, root)] = stat.S_IFMT(mode)
    return out


def refused(tmp_path, *argv, env=None):
    """Run ``nbdrep *argv``, which must fail as bad input: exit 2, one line on stderr, nothing on
    stdout (no "serving ..." first), and no file under ``tmp_path`` written or removed.
    Returns that line."""
    before = snapshot(tmp_path)
    run = subprocess.run(nbdrep_cmd(*argv), capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2, run
    assert run.stdout == "", run.stdout
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdrep"), run.stderr
    assert snapshot(tmp_path) == before, "bad input changed no file"
    return lines[0]


@pytest.fixture
def source(tmp_path):
    return make_image(str(tmp_path / "source.img"), 8 * MiB)


def serve_args(tmp_path, source, *extra):
    return ["serve", "--source", source, "--state", str(tmp_path / "state"), *extra]


def test_a_busy_port_is_refused_before_nbdkit_starts(tmp_path, source):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = refused(tmp_path, *serve_args(tmp_path, source, "--port", str(port)))
    assert line == f"nbdrep: port {port} on 127.0.0.1 is in use by another program"
    assert not os.path.exists(tmp_path / "state"), "no state directory made"


@pytest.mark.parametrize("bind, message", [
    ("not_an_ip", "--bind not_an_ip is not an address"),
    ("192.0.2.1", "--bind 192.0.2.1 --port 1: Cannot assign requested address"),
])
def test_a_bind_address_not_of_this_host_is_refused(tmp_path, source, bind, message):
    assert message in refused(tmp_path, *serve_args(tmp_path, source, "--bind", bind, "--port", "1"))


def test_a_socket_in_a_missing_directory_is_refused(tmp_path, source):
    sock = tmp_path / "missing" / "nbd.sock"
    line = refused(tmp_path, *serve_args(tmp_path, source, "--socket", str(sock)))
    assert line == f"nbdrep: --socket {sock}: directory {tmp_path / 'missing'} does not exist"


def test_a_control_socket_in_a_missing_directory_is_refused(tmp_path, source):
    control = tmp_path / "missing" / "c.sock"
    line = refused(tmp_path, *serve_args(tmp_path, source, "--socket", str(tmp_path / "s.sock"),
                                         "--control", str(control)))
    assert "directory" in line and "does not exist" in line and "--control" in line


@pytest.mark.parametrize("state", ["file", "file/below"])
def test_a_state_path_that_is_a_file_is_refused(tmp_path, source, state):
    (tmp_path / "file").write_text("not a directory")
    line = refused(tmp_path, "serve", "--source", source, "--state", str(tmp_path / state),
                   "--socket", str(tmp_path / "s.sock"))
    assert line.endswith(f"{tmp_path / 'file'} is not a directory")


def test_a_default_state_directory_that_cannot_be_made_is_refused(tmp_path, source, kernel):
    home = kernel.mount("tmpfs", "-o", "ro,size=1m")   # root may write anywhere else
    env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
    env["HOME"] = home
    line = refused(tmp_path, "serve", "--source", source, "--socket", str(tmp_path / "s.sock"),
                   env=env)
    assert line == (f"nbdrep: --state {home}/.local/state/nbdrep: {home}/.local/state/nbdrep "
                    f"cannot be created ({home} is not writable)")


def test_a_tracker_mem_too_small_is_refused_by_name(tmp_path, source):
    line = refused(tmp_path, *serve_args(tmp_path, source, "--socket", str(tmp_path / "s.sock"),
                                         "--tracker-mem", "1"))
    assert line.startswith("nbdrep: tracker-mem='1' must be at least ")


def test_status_at_a_socket_that_is_not_nbdreps(tmp_path, nbdkit):
    sock, _ = nbdkit("memory", "1M")
    line = refused(tmp_path, "status", "--control", sock)
    assert line == f"nbdrep: {sock} is not an nbdrep control socket"
    assert refused(tmp_path, "status", "--control", str(tmp_path / "none.sock")) == \
        f"nbdrep: no nbdrep server at control socket {tmp_path / 'none.sock'}"


def closed_pipe_run(*argv):
    """Run ``nbdrep *argv`` with its stdout a pipe whose reader already left (``| head``)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(nbdrep_cmd(*argv), stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write)


def test_a_reader_that_leaves_ends_the_command_quietly(procs, tmp_path, source):
    server = Server(procs, str(tmp_path), [source])
    for argv in (["status", "--control", server.control], ["verify", "--help"]):
        run = closed_pipe_run(*argv)
        assert (run.returncode, run.stderr) == (128 + signal.SIGPIPE, ""), argv


def test_verify_is_a_subcommand_with_help_and_options_anywhere(nbdkit, tmp_path):
    help_ = nbdrep("verify", "--help")
    assert "--chunk SIZE" in help_.stdout and "SOURCE_URI" in help_.stdout
    images = [make_image(str(tmp_path / f"{n}.img"), MiB) for n in ("a", "b")]
    uris = [uri(nbdkit("file", image)[0]) for image in images]
    run = nbdrep("verify", "--quiet", "--chunk", "64K", *uris)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    bad = nbdrep("verify", "--chunk", "1.5M", *uris, check=False)
    assert bad.returncode == 2 and "'1.5M' is not a size" in bad.stderr


def test_version():
    assert nbdrep("--version").stdout.startswith("nbdrep ")


def sources_json(tmp_path):
    with open(tmp_path / "state" / "sources.json") as f:
        return json.load(f)


def test_the_state_file_forgets_sources_no_longer_served(procs, tmp_path, source):
    other = make_image(str(tmp_path / "other.img"), 4 * MiB)
    server = Server(procs, str(tmp_path), [source, f"db={other}"])
    procs.stop(server.proc)
    assert sources_json(tmp_path) == {source: 8 * MiB, other: 4 * MiB}
    server = Server(procs, str(tmp_path), [source])
    procs.stop(server.proc)
    assert sources_json(tmp_path) == {source: 8 * MiB}


def test_a_resize_is_refused_until_accepted_then_resynced_in_full(procs, nbdkit, tmp_path, source):
    replica = make_image(str(tmp_path / "replica.img"), 16 * MiB)
    rsock, _ = nbdkit("file", replica)
    args = ["--cycle", "3600"]
    server = Server(procs, str(tmp_path), [source], [uri(rsock)], extra=args)
    server.rp()
    assert procs.stop(server.proc) == 0
    with open(source, "r+b") as f:   # grown while stopped, with new data in the new part
        f.truncate(12 * MiB)
        f.seek(10 * MiB)
        f.write(os.urandom(MiB))
    line = refused(tmp_path, "serve", "--source", source, "--socket", str(tmp_path / "source.sock"),
                   "--control", str(tmp_path / "control.sock"), "--state", str(tmp_path / "state"),
                   "--replica", uri(rsock), *args)
    assert line == (f"nbdrep: source {source!r} is {12 * MiB} bytes but was {8 * MiB} bytes when "
                    "nbdrep last served it; if the resize is intended, start with --accept-resize")
    server = Server(procs, str(tmp_path), [source], [uri(rsock)], extra=[*args, "--accept-resize"])
    server.rp()
    assert "changed" in server.status()["start"]
    assert sources_json(tmp_path) == {source: 12 * MiB}
    with open(source, "rb") as s, open(replica, "rb") as r:
        assert s.read() == r.read(12 * MiB), "the resized source reached the replica whole"


STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")


def test_every_log_line_is_stamped_once_and_a_replica_back_is_told(procs, nbdkit, tmp_path, source):
    """The log of a run where the replica goes away and comes back and a client vanishes with a
    write in flight: every line starts with the time, no line names nbdrep twice, the replica's return
    says how long it was out, and the vanished client leaves no traceback."""
    replica = make_image(str(tmp_path / "replica.img"), 8 * MiB)
    rsock, rproc = nbdkit("file", replica)
    control, sock = str(tmp_path / "control.sock"), str(tmp_path / "source.sock")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = procs.start(nbdrep_cmd(*serve_args(tmp_path, source, "--socket", sock, "--control",
                                                    control, "--replica", uri(rsock),
                                                    "--cycle", "0.2")),
                             wait_for=control, stdout=subprocess.DEVNULL, stderr=log)
    status = lambda: json.loads(nbdrep("status", "--json", "--control", control).stdout)  # noqa: E731
    wait_until(lambda: status()["committed_cycle"] is not None, what="the initial sync")
    procs.stop(rproc)
    vanish = ("import nbd, os; h = nbd.NBD(); h.connect_uri(%r); h.pwrite(b'x' * 4096, 0); "
              "h.aio_pwrite(b'y' * (1 << 20), 4096); os._exit(0)" % uri(sock))
    subprocess.run(["/usr/bin/python3", "-c", vanish], check=True, timeout=60)
    wait_until(lambda: status()["failures"] > 0, what="a failed cycle while the replica is down")
    os.unlink(rsock)   # nbdkit leaves its socket file behind
    nbdkit("file", replica, sock=rsock)
    wait_until(lambda: b"replica back" in log_path.read_bytes(), what="the replica back line")
    assert procs.stop(server) == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(STAMPED.match(line) for line in lines), lines
    assert not any("nbdrep: nbdrep:" in line or "Traceback" in line for line in lines), lines
    assert any(re.search(r"replica back: cycle \d+ committed after \d+\.\d s of failures", line)
               for line in lines), lines


def test_on_the_journal_lines_are_neither_stamped_nor_named_twice(procs, nbdkit, tmp_path, source):
    """systemd's journal stamps and names every line itself (JOURNAL_STREAM says stderr is it)."""
    rsock, _ = nbdkit("file", make_image(str(tmp_path / "replica.img"), 8 * MiB))
    control = str(tmp_path / "control.sock")
    log_path = tmp_path / "journal.log"
    with open(log_path, "wb") as log:
        st = os.fstat(log.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        server = procs.start(nbdrep_cmd(*serve_args(tmp_path, source, "--socket",
                                                    str(tmp_path / "s.sock"), "--control", control,
                                                    "--replica", uri(rsock))),
                             wait_for=control, stdout=subprocess.DEVNULL, stderr=log, env=env)
    nbdrep("rp", "--wait", "--control", control)
    assert procs.stop(server) == 0
    lines = log_path.read_text().splitlines()
    assert any(line.startswith("session ") for line in lines), lines
    assert not any(STAMPED.match(line) or line.startswith("nbdrep: ") for line in lines), lines


def test_ctrl_c_in_a_client_command_is_quiet(procs, tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:   # a server that never answers
        silent.bind(path)
        silent.listen()
        silent.settimeout(60)
        asking = procs.start(nbdrep_cmd("status", "--control", path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(60)
            assert conn.recv(1 << 16).endswith(b"\n"), "the request was sent: now it waits"
            asking.send_signal(signal.SIGINT)
            out, err = asking.communicate(timeout=60)
    procs.procs.remove(asking)
    assert (asking.returncode, out, err) == (128 + signal.SIGINT, b"", b""), err
