#!/usr/bin/env python3
"""Crash benchmark: what the dirty-region log costs on writes, and what it saves after a crash.

    .venv/bin/python scripts/bench_crash.py [--dir /var/tmp] [--size 4G] [--seconds 10] [--rounds 3]

1. Cost: 4k random-write IOPS (fio's nbd engine, QD16) on a replicating `nbdrep serve`, with the
   dirty-region log (default 64 KiB regions) and without it (`--dirty-region 0`), in interleaved
   rounds. Prints the IOPS and their ratio.
2. Saving: for each workload (4k random writes, zipf 1.2 and uniform) and region size, fio writes
   with 1 s cycles for --seconds, then the source's nbdkit is killed with kill -9 and `nbdrep serve`
   started again. Prints the bytes the restart resynced, beside what DRBD's activity log would
   resync on the same run (its default: the 1,237 most recently written 4 MiB extents, simulated
   over fio's log of the writes it issued), and what the restart after a clean stop then copies.
"""
import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from benchlib import fio_report, format_table  # noqa: E402
from procs import Procs, nbdrep_cmd, stop  # noqa: E402

from nbd_plugin import control  # noqa: E402
from nbd_plugin.params import parse_size  # noqa: E402

AL_EXTENTS, AL_EXTENT = 1237, 4 << 20   # DRBD's defaults: al-extents 1237, 4 MiB each
WORKLOADS = {"zipf 1.2": ["--random_distribution=zipf:1.2"], "uniform": []}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default: %(default)s)")
    ap.add_argument("--size", default="4G", help="source size (default: %(default)s)")
    ap.add_argument("--seconds", type=int, default=10, help="fio time per run (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="IOPS rounds of each kind, 0 for none (default: %(default)s)")
    ap.add_argument("--regions", default="1M,64K,4K",
                    help="region sizes to crash with, or none (default: %(default)s)")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbdrep-bench-crash-") as work, Procs() as procs:
        site = Site(procs, work, size)
        iops = {"dirty-region log on (64K)": [], "off (--dirty-region 0)": []}
        kinds = [("dirty-region log on (64K)", "64K"), ("off (--dirty-region 0)", "0")]
        for i in range(args.rounds):
            # Alternate which goes first: a run leaves dirty pages that slow the next one.
            for name, region in kinds[::1 if i % 2 == 0 else -1]:
                print(f"[bench] IOPS round {i + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                server = site.serve(region)
                iops[name].append(fio_iops(site.fio(server, args.seconds, [])))
                site.stop(server)
        crashes = []
        for workload, extra in WORKLOADS.items():
            for region in [] if args.regions == "none" else args.regions.split(","):
                print(f"[bench] crash: {workload}, {region} regions", file=sys.stderr, flush=True)
                crashes.append([workload, region, *site.crash(region, args.seconds, extra)])
    if args.rounds:
        on, off = iops.values()
        print(f"\n4k random writes, QD16, replicating ({args.size} source, {args.seconds} s x "
              f"{args.rounds} rounds)")
        print(format_table(["server", "IOPS median", "IOPS each run"],
                           [[name, f"{statistics.median(r):.0f}", ", ".join(f"{x:.0f}" for x in r)]
                            for name, r in iops.items()]))
        print(f"ratio on/off (median): {statistics.median(on) / statistics.median(off):.3f}")
    print(f"\nResync after kill -9 under fio ({args.size} source, 1 s cycles, {args.seconds} s of fio)")
    print(format_table(["workload", "region", "written MiB", "nbdrep resync MiB", "DRBD AL MiB",
                        "nbdrep / DRBD", "after a clean stop MiB"],
                       [[w, r, f"{written / 2**20:.0f}", f"{ours / 2**20:.0f}", f"{al / 2**20:.0f}",
                         f"{ours / al:.3f}" if al else "-", f"{clean / 2**20:.0f}"]
                        for w, r, written, ours, al, clean in crashes]))


def fio_iops(report):
    return report["jobs"][0]["write"]["iops"]


class Site:
    """A sparse source and a replica (`nbdkit file`), both of ``size`` bytes, in ``work``."""

    def __init__(self, procs, work, size):
        self.procs, self.work, self.size = procs, work, size
        self.src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
        for path in (self.src, dst):
            with open(path, "wb") as f:
                f.truncate(size)
        self.rsock = os.path.join(work, "r.sock")
        procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", self.rsock, "file", dst],
                    wait_for=self.rsock)
        self.ctl = os.path.join(work, "c.sock")
        self.log = open(os.path.join(work, "serve.log"), "ab")   # noqa: SIM115 (the site's life)
        self.sock = os.path.join(work, "s.sock")
        self.crashes = 0

    def serve(self, region):
        """`nbdrep serve` with 1 s cycles, once its first cycle is committed. A state directory
        per region size: each run resumes from the last one of the same setting, as a server
        restarted with its settings does."""
        proc = self.procs.start(nbdrep_cmd(
            "serve", "--source", self.src, "--socket", self.sock, "--control", self.ctl,
            "--state", os.path.join(self.work, f"state-{region}"), "--cycle", "1", "--dirty-region", region,
            "--replica", f"nbd+unix:///?socket={self.rsock}"),
            wait_for=self.ctl, timeout=600, stdout=subprocess.DEVNULL, stderr=self.log)
        wait(lambda: self.status()["committed_cycle"] >= self.status()["cycles"][0]["cycle"])
        return proc

    def status(self):
        return control.request(self.ctl, {"cmd": "status"}, 30)

    def stop(self, proc):
        self.procs.procs.remove(proc)
        if stop(proc, 120) != 0:
            raise RuntimeError("nbdrep serve did not stop cleanly")

    def fio(self, server, seconds, extra, iolog=None, wait_for_end=True):
        cmd = ["fio", "--name=bench", "--thread", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={self.sock}",
               "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=100%", "--time_based",
               f"--runtime={seconds}", "--norandommap", "--randrepeat=0", "--output-format=json", *extra]
        if iolog:
            cmd.append(f"--write_iolog={iolog}")
        proc = self.procs.start(cmd, cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if not wait_for_end:
            return proc
        out, _ = proc.communicate(timeout=seconds + 120)
        self.procs.procs.remove(proc)
        return fio_report(out.decode())

    def crash(self, region, seconds, extra):
        """(bytes fio wrote, bytes the restart resynced, DRBD AL bytes, bytes the restart after
        a clean stop copied) for a kill -9 after ``seconds`` of fio."""
        server = self.serve(region)
        self.crashes += 1
        iolog = os.path.join(self.work, f"writes-{self.crashes}.iolog")   # fio appends to a log
        fio = self.fio(server, seconds + 60, extra, iolog, wait_for_end=False)
        time.sleep(seconds)
        (nbdkit_proc,) = psutil.Process(server.pid).children()
        nbdkit_proc.send_signal(signal.SIGKILL)
        server.wait(60)
        self.procs.procs.remove(server)
        fio.wait(60)
        self.procs.procs.remove(fio)
        os.unlink(self.ctl)
        written, al = drbd_al(iolog, self.size)
        server = self.serve(region)
        ours = self.status()["resync"]["bytes_total"]
        self.stop(server)
        server = self.serve(region)
        status = self.status()
        clean = status["resync"]["bytes_total"] if status["resync"] else 0
        clean += status["cycles"][0]["bytes_copied"] + status["cycles"][0]["bytes_zeroed"]
        self.stop(server)
        return written, ours, al, clean


def drbd_al(iolog, size):
    """(bytes written, bytes DRBD's activity log would resync) for fio's write log: the AL
    holds the AL_EXTENTS most recently written AL_EXTENT extents, and a crash resyncs them."""
    lru, written = collections.OrderedDict(), 0
    with open(iolog, encoding="utf-8") as f:
        for line in f:
            parts = line.split()   # version 3: "msec file write offset length"
            if len(parts) >= 4 and parts[-3] == "write":
                offset, length = int(parts[-2]), int(parts[-1])
                written += length
                for extent in range(offset // AL_EXTENT, (offset + length - 1) // AL_EXTENT + 1):
                    lru.pop(extent, None)
                    lru[extent] = True
                    if len(lru) > AL_EXTENTS:
                        lru.popitem(last=False)
    return written, min(len(lru) * AL_EXTENT, size)


def wait(predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("state not reached in time")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
