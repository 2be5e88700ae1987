"""The systemd unit (service/nbdrep@.service) without systemd: its ExecStart run with test paths,
readiness through a fake NOTIFY_SOCKET, --pidfile, and a clean stop on SIGTERM or SIGHUP."""
import configparser
import os
import shlex
import signal
import socket

import nbd
import pytest

from conftest import ROOT, make_image, nbdrep, uri
from nbd_plugin import cli, control
from procs import nbdrep_cmd

UNIT = os.path.join(ROOT, "service", "nbdrep@.service")
EXAMPLE = os.path.join(ROOT, "service", "example.conf")
BINARY = "/usr/local/bin/nbdrep"


def unit_service():
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read(UNIT)
    return parser["Service"]


def environment_file(path):
    """KEY=VALUE lines, as systemd's EnvironmentFile= reads them (comments and blanks skipped)."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def exec_start(instance, env, run, lib):
    """The unit's ExecStart as systemd would run it for ``instance``, with /run and /var/lib
    moved under the test's directory and the venv's nbdrep for /usr/local/bin/nbdrep."""
    line = unit_service()["ExecStart"].replace("%i", instance)
    line = line.replace("/run/nbdrep", run).replace("/var/lib/nbdrep", lib)
    words = []
    for word in shlex.split(line):
        # An unbraced $VAR is split into words by systemd (systemd.service(5), "Command lines").
        words += env[word[1:]].split() if word.startswith("$") else [word]
    assert words[0] == BINARY
    return nbdrep_cmd(*words[1:])


def test_the_unit_says_how_it_starts_and_stops():
    service = unit_service()
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert "ExecReload" not in service
    # systemd must wait longer than nbdrep's own clean stop (--stop-timeout, 30 s by default).
    assert int(service["TimeoutStopSec"]) > 30
    assert service["EnvironmentFile"] == "/etc/nbdrep/%i.conf"
    # A replica unreachable at boot is exit status 2 too: it must be retried, not given up.
    assert service["Restart"] == "on-failure" and "RestartPreventExitStatus" not in service


def test_the_example_configuration_parses():
    words = exec_start("disk", environment_file(EXAMPLE), "/run/nbdrep", "/var/lib/nbdrep")
    args = cli.build_parser().parse_args(words[words.index("serve"):])
    assert args.state == "/var/lib/nbdrep/disk" and args.pidfile == "/run/nbdrep/disk/serve.pid"
    assert args.replica and args.source and args.tls_psk


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_exec_start_notifies_ready_once_serving_and_stops_cleanly(procs, tmp_path, stop):
    run, lib = str(tmp_path / "run"), str(tmp_path / "lib")
    os.makedirs(os.path.join(run, "t1"))   # RuntimeDirectory= and StateDirectory=, made by systemd
    os.makedirs(os.path.join(lib, "t1"))
    src = make_image(str(tmp_path / "source.img"), 1 << 20, random_mib=1)
    sock = str(tmp_path / "source.sock")
    cmd = exec_start("t1", {"NBDREP_ARGS": f"--source {src} --socket {sock}"}, run, lib)
    pidfile = os.path.join(run, "t1", "serve.pid")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(60)
        proc = procs.start(cmd, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        message = notify.recv(4096).decode().split("\n")
    assert "READY=1" in message and f"MAINPID={proc.pid}" in message
    # At READY=1: the pidfile names the process systemd watches, the session answers, and a
    # host can attach and read.
    with open(pidfile) as f:
        assert f.read() == f"{proc.pid}\n"
    assert control.request(os.path.join(run, "t1", "control.sock"), {"cmd": "status"}, 10)["cycle"] >= 1
    h = nbd.NBD()
    h.connect_uri(uri(sock))
    with open(src, "rb") as f:
        assert h.pread(4096, 0) == f.read(4096)
    h.shutdown()
    os.kill(proc.pid, stop)
    assert procs.wait(proc, 60) == 0
    assert not os.path.exists(pidfile)
    assert nbdrep("status", "--control", os.path.join(run, "t1", "control.sock"), check=False).returncode == 2


def test_an_unwritable_pidfile_directory_is_one_line_and_writes_nothing(tmp_path):
    src = make_image(str(tmp_path / "source.img"), 1 << 20)
    done = nbdrep("serve", "--source", src, "--socket", str(tmp_path / "s.sock"),
                  "--state", str(tmp_path / "state"), "--pidfile", str(tmp_path / "no" / "x.pid"),
                  check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--pidfile" in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["source.img"]
