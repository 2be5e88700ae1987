"""Fixtures for end-to-end tests: real nbdkit servers on unix sockets, stopped by pid."""
import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from procs import Procs, nbdrep_cmd  # noqa: E402


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def make_image(path, size, random_mib=0):
    """A sparse image of ``size`` bytes whose first ``random_mib`` MiB are random."""
    with open(path, "wb") as f:
        f.truncate(size)
        if random_mib:
            f.write(os.urandom(random_mib << 20))
    return path


def nbdrep(*argv, check=True, timeout=120):
    """Run an nbdrep subcommand to completion; returns the CompletedProcess (text)."""
    return subprocess.run(nbdrep_cmd(*argv), capture_output=True, text=True, check=check, timeout=timeout)


class Server:
    """An ``nbdrep serve`` under test, with its sockets and helpers."""

    def __init__(self, procs, tmp, sources, replicas=(), extra=()):
        self.sock = os.path.join(tmp, "source.sock")
        self.control = os.path.join(tmp, "control.sock")
        args = ["serve", "--socket", self.sock, "--control", self.control,
                "--state", os.path.join(tmp, "state")]
        for s in sources:
            args += ["--source", s]
        for r in replicas:
            args += ["--replica", r]
        self.proc = procs.start(nbdrep_cmd(*args, *extra), wait_for=self.control, timeout=60,
                                stdout=subprocess.DEVNULL)
        self.uri = uri(self.sock)

    def rp(self, timeout=120):
        """Take an RP and wait for it to commit; returns the cycle id."""
        out = nbdrep("rp", "--wait", "--timeout", str(timeout), "--control", self.control,
                     timeout=timeout + 30)
        return int(out.stdout)

    def status(self):
        return json.loads(nbdrep("status", "--json", "--control", self.control).stdout)

    def report(self):
        return json.loads(nbdrep("report", "--control", self.control).stdout)


@pytest.fixture
def procs():
    with Procs() as p:
        yield p


@pytest.fixture
def nbdkit(procs, tmp_path):
    """Start ``nbdkit [filters] PLUGIN ARGS`` on a unix socket; returns (socket, Popen) once it
    accepts connections. Not when the socket file appears: that is at bind(), before listen(),
    and a connection in between is refused; nbdkit writes its -P pidfile once it listens."""
    count = [0]

    def start(*args, sock=None):
        count[0] += 1
        sock = sock or str(tmp_path / f"nbdkit{count[0]}.sock")
        ready = str(tmp_path / f"nbdkit{count[0]}.pid")
        proc = procs.start(["nbdkit", "--foreground", "--exit-with-parent", "-U", sock, "-P", ready,
                            *args], wait_for=ready)
        return sock, proc
    return start


Replicated = collections.namedtuple("Replicated", "server src dst rsock rproc")


@pytest.fixture
def replicated(procs, nbdkit, tmp_path):
    """start(size, cycle, random_mib=0, filters=(), params=()) -> Replicated.

    A source image (its first ``random_mib`` MiB random), an empty replica image served by
    ``nbdkit [filters] file DST [params]``, and ``nbdrep serve`` replicating one to the other.
    """
    def start(size, cycle, random_mib=0, filters=(), params=()):
        src = make_image(str(tmp_path / "source.img"), size, random_mib)
        dst = make_image(str(tmp_path / "replica.img"), size)
        rsock, rproc = nbdkit(*filters, "file", dst, *params)
        server = Server(procs, str(tmp_path), [src], [uri(rsock)], extra=["--cycle", str(cycle)])
        return Replicated(server, src, dst, rsock, rproc)
    return start


@pytest.fixture
def fuse_loop(procs, tmp_path):
    """attach(uri) -> /dev/loopN over nbdfuse; detached, unmounted and stopped at teardown."""
    attached = []

    def attach(nbd_uri):
        mountpoint = tmp_path / f"fuse{len(attached)}"
        mountpoint.mkdir()
        disk = str(mountpoint / "disk")
        proc = procs.start(["nbdfuse", disk, nbd_uri], wait_for=disk)
        attached.append((str(mountpoint), proc, None))
        loop = run("losetup", "-f", "--show", disk).stdout.strip()
        attached[-1] = (str(mountpoint), proc, loop)
        return loop
    yield attach
    for mountpoint, proc, loop in reversed(attached):
        if loop:
            subprocess.run(["losetup", "-d", loop], timeout=60)
        subprocess.run(["fusermount3", "-u", mountpoint], timeout=60)
        procs.stop(proc)


@contextlib.contextmanager
def mounted(device, mountpoint, *options):
    """Mount ``device`` (a block device or, with -o loop, an image) for the block; always unmount."""
    os.makedirs(mountpoint, exist_ok=True)
    run("mount", *options, device, mountpoint)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", mountpoint], timeout=120)


def run(*cmd, timeout=300):
    """Run a command that must succeed; its output is in the exception if it does not."""
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)


def file_digests(root):
    """{relative path: sha256} of every regular file under ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out
