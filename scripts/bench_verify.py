#!/usr/bin/env python3
"""Verify benchmark: `nbdrep verify` against `qemu-img compare` on the same pair of exports.

    .venv/bin/python scripts/bench_verify.py [--dir /var/tmp] [--size 1G] [--rounds 5]

Two equal images of --size random bytes (nothing for block status to skip), each served by
`nbdkit file` on a unix socket; the two commands alternate, each timed as a whole process (start,
connect, read both exports, exit) with the images in the page cache. A third command runs the
same comparison without the rest of the CLI, to show what its imports cost. Prints a table and
the ratio of the medians (qemu-img's time / nbdrep's: >= 1 means nbdrep is as fast).
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

from nbd_plugin.params import parse_size  # noqa: E402


VERIFY_ALONE = "import sys; from copier.verify import main; sys.exit(main(sys.argv[1:]))"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default: %(default)s)")
    ap.add_argument("--size", default="1G", help="image size (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each command (default: %(default)s)")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbdrep-bench-verify-") as work, Procs() as procs:
        uris = []
        for name in ("a", "b"):
            path, sock, pid = (os.path.join(work, name + ext) for ext in (".img", ".sock", ".pid"))
            if uris:
                subprocess.run(["cp", os.path.join(work, "a.img"), path], check=True)
            else:
                _write_random(path, size)
            procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "-P", pid, "file", path],
                        wait_for=pid)
            uris.append(f"nbd+unix:///?socket={sock}")
        commands = {
            "nbdrep verify": nbdrep_cmd("verify", *uris, "--quiet"),
            # The same comparison without importing the rest of the CLI (the server's modules).
            "copier.verify alone": [sys.executable, "-c", VERIFY_ALONE, *uris, "--quiet"],
            "qemu-img compare": ["qemu-img", "compare", "-f", "raw", "-F", "raw", *uris],
        }
        times = {name: [] for name in commands}
        for i in range(args.rounds):
            for name, cmd in commands.items():
                print(f"[bench] round {i + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                times[name].append(_timed(cmd))
    print(f"\nComparing two equal {args.size} exports (nbdkit file, unix sockets, page cache warm)")
    print(format_table(["command", "best s", "median s", "MB/s (median, both exports)", "runs s"],
                       [[name, f"{min(t):.2f}", f"{statistics.median(t):.2f}",
                         f"{2 * size / statistics.median(t) / 1e6:,.0f}", " ".join(f"{x:.2f}" for x in t)]
                        for name, t in times.items()]))
    qemu = statistics.median(times["qemu-img compare"])
    for name in ("nbdrep verify", "copier.verify alone"):
        print(f"\n{name} speed / qemu-img compare speed (medians): "
              f"{qemu / statistics.median(times[name]):.2f}x", end="")
    print()


def _write_random(path, size):
    with open(path, "wb") as f:
        for done in range(0, size, 1 << 20):
            f.write(os.urandom(min(1 << 20, size - done)))


def _timed(cmd):
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"bench_verify: {cmd[0]} exited {result.returncode}: {result.stderr.strip()}")
    return elapsed


if __name__ == "__main__":
    main()
