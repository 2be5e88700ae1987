#!/usr/bin/env python3
"""Restart benchmark: time from `nbdrep serve` starting to its first commit, after a clean stop.

    .venv/bin/python scripts/bench_restart.py [--dir /var/tmp] [--size 16G] [--data 2G] [--rounds 3]

A sparse source of --size holding --data of random data, replicated to `nbdkit file` over unix
sockets. After the initial sync and a clean stop (SIGTERM), the same `nbdrep serve` is started
again, alternately as it is (resuming from the replication record) and with `--resync full`
(what every restart cost before the record), and timed from the process's start until status
shows the first cycle of the run committed. Prints a table.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from benchlib import format_table  # noqa: E402
from procs import Procs, nbdrep_cmd  # noqa: E402

from nbd_plugin import control  # noqa: E402
from nbd_plugin.params import parse_size  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default: %(default)s)")
    ap.add_argument("--size", default="16G", help="source size (default: %(default)s)")
    ap.add_argument("--data", default="2G", help="random data at its start (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="restarts of each kind (default: %(default)s)")
    args = ap.parse_args()
    size, data = parse_size(args.size, "--size"), parse_size(args.data, "--data")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbdrep-bench-restart-") as work:
        src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
        with open(src, "wb") as f:
            for _ in range(data >> 20):
                f.write(os.urandom(1 << 20))
            f.truncate(size)
        with open(dst, "wb") as f:
            f.truncate(size)
        rows = {"resume (the record)": [], "--resync full": []}
        with Procs() as procs:
            rsock = os.path.join(work, "r.sock")
            procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "file", dst], wait_for=rsock)
            print("[bench] initial sync", file=sys.stderr, flush=True)
            _run(procs, work, src, rsock, [])
            for i in range(args.rounds):
                for name, extra in (("resume (the record)", []), ("--resync full", ["--resync", "full"])):
                    print(f"[bench] restart {i + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                    rows[name].append(_run(procs, work, src, rsock, extra))
    print(f"\nStart to first commit after a clean stop ({args.size} sparse source, {args.data} of data)")
    print(format_table(["restart", "best s", "median s", "copied or zeroed MiB (each run)"],
                       [[name, f"{min(s for s, _ in r):.2f}", f"{statistics.median(s for s, _ in r):.2f}",
                         ", ".join(f"{n / 2**20:.1f}" for _, n in r)] for name, r in rows.items()]))


def _run(procs, work, src, rsock, extra):
    """Start `nbdrep serve`, wait for the run's first commit, stop it cleanly; returns
    (seconds from start to that commit, bytes it copied)."""
    ctl = os.path.join(work, "c.sock")
    started = time.monotonic()
    proc = procs.start(nbdrep_cmd("serve", "--source", src, "--socket", os.path.join(work, "s.sock"),
                                  "--control", ctl, "--state", os.path.join(work, "state"),
                                  "--cycle", "3600", "--replica", f"nbd+unix:///?socket={rsock}", *extra),
                       wait_for=ctl, timeout=600, stdout=subprocess.DEVNULL)
    deadline = started + 3600
    while time.monotonic() < deadline:
        status = control.request(ctl, {"cmd": "status"}, 30)
        first = status["cycles"][0] if status["cycles"] else None
        if first and first["state"] == "committed":
            seconds = time.monotonic() - started
            procs.stop(proc)
            return seconds, first["bytes_copied"] + first["bytes_zeroed"]
        time.sleep(0.01)
    raise RuntimeError("no commit within an hour")


if __name__ == "__main__":
    main()
