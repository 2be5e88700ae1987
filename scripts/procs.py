"""Processes for scripts and tests: start, wait until ready, always stop by pid.

Every wait is bounded; leaving the ``Procs`` context stops whatever is still running
(SIGTERM, then SIGKILL after a grace period), in reverse order of starting.
"""
import os
import signal
import subprocess
import sys
import time

GRACE = 10.0


def nbdrep_cmd(*argv):
    """The ``nbdrep`` command run by this interpreter (the venv's), so it works uninstalled too."""
    return [sys.executable, "-m", "nbd_plugin.cli", *argv]


class ProcError(RuntimeError):
    """A process died or did not become ready in time."""


class Procs:
    """A set of started processes, stopped by pid when the context exits."""

    def __init__(self):
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()

    def start(self, cmd, wait_for=None, timeout=60.0, **popen):
        """Start ``cmd``; with ``wait_for``, wait until that path exists (socket, file)."""
        proc = subprocess.Popen(cmd, **popen)
        self.procs.append(proc)
        if wait_for is not None:
            self._wait_path(proc, wait_for, timeout, cmd)
        return proc

    def wait(self, proc, timeout):
        """Wait for ``proc`` to exit; return its exit status. Kills it past ``timeout``."""
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise ProcError(f"pid {proc.pid} ({proc.args[0]}) still running after {timeout} s") from None

    def stop(self, proc):
        """Stop one process by pid; returns its exit status."""
        status = stop(proc)
        self.procs.remove(proc)
        return status

    def kill(self, proc):
        """SIGKILL one process by pid now and reap it; returns its exit status. For fio whose
        server was killed under it: its nbd engine then polls the dead connection in a loop
        and ignores SIGTERM. Start fio with ``--thread`` so that its jobs die with its pid
        (by default each job is a forked process, which would outlive it)."""
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.remove(proc)
        return proc.wait()

    def stop_all(self):
        while self.procs:
            stop(self.procs.pop())

    def _wait_path(self, proc, path, timeout, cmd):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise ProcError(f"{cmd[0]} exited with status {proc.returncode} before {path} appeared")
            if time.monotonic() > deadline:
                raise ProcError(f"{path} did not appear within {timeout} s of starting {cmd[0]}")
            time.sleep(0.02)


def stop(proc, grace=GRACE):
    """SIGTERM ``proc`` by pid, SIGKILL after ``grace`` seconds; returns its exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait()
