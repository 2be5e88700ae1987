"""Fixtures for end-to-end tests: real nbdkit servers on unix sockets, stopped by pid."""
import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time

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


def wait_until(predicate, timeout=60, what="the state", poll=0.01):
    """Wait for a state another thread or process reaches: poll ``predicate`` every ``poll`` s
    until it is true; fail the test if ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(poll)


DETACH_TIMEOUT = 30.0


class Kernel:
    """Mounts and loop devices made for one test; ``release`` undoes them, last made first."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.mounts = []
        self.loops = []

    def mount(self, fstype, *options):
        """Mount a fresh ``fstype`` (tmpfs, ramfs) with ``options``; returns its directory."""
        mnt = os.path.join(self.tmp, f"{fstype}{len(self.mounts)}")
        os.mkdir(mnt)
        run("mount", "-t", fstype, *options, fstype, mnt, timeout=60)
        self.mounts.append(mnt)
        return mnt

    def loop(self, image, sector):
        """Attach ``image`` as a loop device with ``sector``-byte logical blocks; returns /dev/loopN."""
        dev = run("losetup", "-f", "--show", "--sector-size", str(sector), image, timeout=60).stdout.strip()
        self.loops.append((dev, os.path.realpath(image)))
        return dev

    def release(self):
        """Detach every loop device, wait until each lets go of its image, then unmount."""
        failed = []
        for dev, image in reversed(self.loops):
            done = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True, timeout=60)
            if done.returncode:
                failed.append(f"losetup -d {dev}: {done.stderr.strip()}")
            elif not _wait_detached(dev, image):
                failed.append(f"{dev} still holds {image} after {DETACH_TIMEOUT} s")
        for mnt in reversed(self.mounts):
            done = subprocess.run(["umount", mnt], capture_output=True, text=True, timeout=60)
            if done.returncode:
                failed.append(f"umount {mnt}: {done.stderr.strip()}")
        assert not failed, "; ".join(failed)


def _wait_detached(dev, image):
    """Wait until ``dev`` is no longer backed by ``image`` (a detach completes at the last close)."""
    backing = f"/sys/block/{os.path.basename(dev)}/loop/backing_file"
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with open(backing) as f:
                if os.path.realpath(f.read().strip()) != image:
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def kernel(procs, tmp_path):
    """A ``Kernel``; at teardown the test's processes stop first, as they hold its devices open."""
    k = Kernel(str(tmp_path))
    yield k
    procs.stop_all()
    k.release()


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
