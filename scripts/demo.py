#!/usr/bin/env python3
"""nbdrep demo: a source, a local replica, real writes, replication status, verification.

    .venv/bin/python scripts/demo.py [--dir DIR] [--size 256M] [--seconds 10]

Starts a replica (``nbdkit file`` on a unix socket) and ``nbdrep serve`` over a source image
with 1 s cycles, writes to the source with fio (4k random writes through libnbd) while showing
the session's status, then takes a recovery point, waits for it to commit and checks that the
two images are byte-for-byte equal with ``nbdrep verify`` and ``cmp``. Stops everything it
started, by pid, even on failure.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from procs import Procs, nbdrep_cmd  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="work directory (default: a new temporary one, removed after)")
    ap.add_argument("--size", default="256M", help="image size (default: %(default)s)")
    ap.add_argument("--seconds", type=int, default=10, help="how long fio writes (default: %(default)s)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="nbdrep-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        return run(work, args)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def run(work, args):
    src, dst = os.path.join(work, "source.img"), os.path.join(work, "replica.img")
    src_sock, dst_sock = os.path.join(work, "source.sock"), os.path.join(work, "replica.sock")
    ctl = os.path.join(work, "control.sock")
    for path in (src, dst):
        subprocess.run(["truncate", "-s", args.size, path], check=True)
    subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", "count=16", "conv=notrunc",
                    "status=none"], check=True)
    src_uri, dst_uri = f"nbd+unix:///?socket={src_sock}", f"nbd+unix:///?socket={dst_sock}"
    with Procs() as procs:
        step("replica: nbdkit file " + dst)
        procs.start(["nbdkit", "--foreground", "--exit-with-parent", "-U", dst_sock, "file", dst],
                    wait_for=dst_sock)
        step("source: nbdrep serve with 1 s cycles; the first cycle is the initial sync")
        procs.start(nbdrep_cmd("serve", "--source", src, "--socket", src_sock, "--replica", dst_uri,
                               "--cycle", "1", "--control", ctl, "--state", os.path.join(work, "state")),
                    wait_for=ctl)
        nbdrep("rp", "--wait", "--control", ctl)
        step(f"host writes: fio 4k random writes for {args.seconds} s while cycles run")
        fio = procs.start(["fio", "--name=demo", "--thread", "--ioengine=nbd", f"--uri={src_uri}", "--rw=randwrite",
                           "--bs=4k", "--iodepth=16", f"--runtime={args.seconds}", "--time_based",
                           "--size=100%", "--output=/dev/null"])
        for _ in range(args.seconds // 3 + 1):
            time.sleep(3)
            nbdrep("status", "--control", ctl)
        procs.wait(fio, args.seconds + 60)
        step("recovery point: rp --wait returns when the cycle is committed on the replica")
        nbdrep("rp", "--wait", "--control", ctl)
        nbdrep("status", "--control", ctl)
        step("verify: the replica equals the source")
        rc = nbdrep("verify", src_uri, dst_uri, check=False)
    same = subprocess.run(["cmp", src, dst]).returncode == 0
    print(f"\ncmp {src} {dst}: {'identical' if same else 'DIFFERENT'}")
    return 0 if rc == 0 and same else 1


def step(text):
    print(f"\n== {text}", flush=True)


def nbdrep(*argv, check=True):
    return subprocess.run(nbdrep_cmd(*argv), check=check).returncode


if __name__ == "__main__":
    sys.exit(main())
