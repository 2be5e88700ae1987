"""Benchmark the NBD server: fio IOPS and MB/s against three servers on unix sockets.

Usage: .venv/bin/python scripts/bench_server.py [--seconds S] [--rounds R] [--dir DIR]

Servers, each serving the same 1 GiB image (filled with data, so reads are not of holes):

  nbdkit file        nbdkit's C ``file`` plugin: the ceiling for this machine
  nbdrep untracked   our Python plugin, ``--tracking off``
  nbdrep tracked     our Python plugin, tracking only (no replica), ``--cycle 1``

Workloads (fio ``--ioengine=nbd``, one job, S seconds each): 4k random write at queue depth 16,
4k random read at QD16, 1 MiB sequential write at QD4. Then the tracked server is run with
``--threads`` 1, 2, 4 and 16 on 4k random write, because GIL hand-off dominates small requests and
fewer worker threads may be faster.

The goal for tracking is at least 0.95 of the untracked IOPS on 4k random write. The machine is
shared and its load drifts by tens of percent within a minute, so that ratio is not taken from
the table: both servers run side by side and R rounds alternate between them (untracked, tracked,
untracked, ...); each round's ratio compares two neighbouring runs, and the median is printed.
Progress goes to stderr, the tables to stdout.
"""
import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile

import psutil

from benchlib import fio_report, format_table
from procs import Procs, nbdrep_cmd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nbd_plugin.cli import DEFAULT_THREADS  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
IMAGE_SIZE = GiB
WORKLOADS = {
    "4k randwrite QD16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "4k randread QD16": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "1M seqwrite QD4": ["--rw=write", "--bs=1M", "--iodepth=4"],
}
SERVERS = ("nbdkit file", "nbdrep untracked", "nbdrep tracked")
RANDWRITE = "4k randwrite QD16"
THREADS = (1, 2, 4, 16)
GOAL = 0.95


def progress(message):
    print(message, file=sys.stderr, flush=True)


# ---- fio -----------------------------------------------------------------------------------

def fio_command(uri, workload, seconds):
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", *WORKLOADS[workload],
            f"--size={IMAGE_SIZE}", "--time_based", f"--runtime={seconds}", "--norandommap",
            "--randrepeat=0", "--output-format=json"]


def parse_fio(stdout):
    """(IOPS, MB/s) of fio's JSON report; the nbd engine prints lines before the JSON."""
    (job,) = fio_report(stdout)["jobs"]
    if job["error"]:
        raise RuntimeError(f"fio job failed with error {job['error']}")
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    return side["iops"], side["bw_bytes"] / 1e6, side["total_ios"]


def run_fio(uri, workload, seconds, label):
    progress(f"  {label}: {workload} for {seconds} s")
    done = subprocess.run(fio_command(uri, workload, seconds), check=False, capture_output=True,
                          text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"fio exited {done.returncode}: {done.stderr.strip()}")
    return parse_fio(done.stdout)


# ---- servers -------------------------------------------------------------------------------

def server_command(kind, image, folder, threads):
    """(argv, socket) of one server of ``kind`` (one of SERVERS) living in ``folder``."""
    sock = os.path.join(folder, "nbd.sock")
    if kind == "nbdkit file":
        return ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, "file", image], sock
    tracking = "off" if kind == "nbdrep untracked" else "on"
    return nbdrep_cmd("serve", "--source", image, "--socket", sock, "--state", folder,
                      "--control", os.path.join(folder, "control.sock"), "--tracking", tracking,
                      "--cycle", "1", "--threads", str(threads)), sock


@contextlib.contextmanager
def serving(procs, kind, image, threads=DEFAULT_THREADS):
    """Run one server until the block ends; yields its NBD URI."""
    with tempfile.TemporaryDirectory(prefix="nbdrep-bench-") as folder:
        cmd, sock = server_command(kind, image, folder, threads)
        proc = procs.start(cmd, wait_for=sock, stdout=subprocess.DEVNULL)
        try:
            yield f"nbd+unix:///?socket={sock}", proc
        finally:
            procs.stop(proc)


def measure(procs, kind, image, workloads, seconds, threads=DEFAULT_THREADS):
    """{workload: (IOPS, MB/s)} on a fresh server of ``kind``."""
    with serving(procs, kind, image, threads) as (uri, _):
        return {w: run_fio(uri, w, seconds, f"{kind} (threads {threads})")[:2] for w in workloads}


def tracking_ratios(procs, image, seconds, rounds):
    """Per round: tracked / untracked IOPS, and tracked / untracked nbdkit CPU per write.

    The untracked side of a round is the mean of its runs just before and after the tracked
    run. CPU per write is steadier than IOPS on a shared machine: another process's load slows
    both servers' clocks, not the work each write costs.
    """
    with serving(procs, "nbdrep untracked", image) as off, serving(procs, "nbdrep tracked", image) as on:
        untracked = [cpu_run(off, "A/B untracked", seconds)]
        ratios = []
        for _ in range(rounds):
            tracked = cpu_run(on, "A/B tracked", seconds)
            untracked.append(cpu_run(off, "A/B untracked", seconds))
            iops_off = statistics.mean(u[0] for u in untracked[-2:])
            cpu_off = statistics.mean(u[1] for u in untracked[-2:])
            ratios.append((tracked[0] / iops_off, tracked[1] / cpu_off, tracked[1], cpu_off))
    return ratios


def cpu_run(server, label, seconds):
    """(IOPS, nbdkit CPU microseconds per write) of one 4k random-write run."""
    uri, proc = server
    nbdkit = psutil.Process(proc.pid).children()[0]
    before = sum(nbdkit.cpu_times()[:2])
    iops, _, ios = run_fio(uri, RANDWRITE, seconds, label)
    return iops, (sum(nbdkit.cpu_times()[:2]) - before) / ios * 1e6


def fill_image(path, size):
    """Write ``size`` bytes of data (a random MiB repeated) so that reads hit real blocks."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(size // MiB))
        os.fsync(f.fileno())


# ---- tables --------------------------------------------------------------------------------

def main_table(results):
    base = results["nbdkit file"]
    rows = [[kind, w, f"{iops:.0f}", f"{mbps:.1f}", f"{iops / base[w][0]:.2f}"]
            for kind, res in results.items() for w, (iops, mbps) in res.items()]
    return format_table(["server", "workload", "IOPS", "MB/s", "vs nbdkit file"], rows)


def threads_table(sweep):
    best = max(sweep, key=lambda t: sweep[t][0])
    rows = [[f"--threads {t}", f"{iops:.0f}", f"{mbps:.1f}", "fastest" if t == best else ""]
            for t, (iops, mbps) in sweep.items()]
    return format_table([f"nbdrep tracked, {RANDWRITE}", "IOPS", "MB/s", ""], rows)


def ratio_summary(ratios):
    rows = [[f"round {i + 1}", f"{iops:.3f}", f"{on:.1f}", f"{off:.1f}", f"{cpu:.3f}"]
            for i, (iops, cpu, on, off) in enumerate(ratios)]
    iops = statistics.median(r[0] for r in ratios)
    cpu = statistics.median(r[1] for r in ratios)
    rows.append(["median", f"{iops:.3f}", "", "", f"{cpu:.3f}"])
    table = format_table([f"tracking on/off, {RANDWRITE}, --threads {DEFAULT_THREADS}", "IOPS ratio",
                          "CPU us/write on", "off", "CPU ratio"], rows)
    verdict = "meets" if iops >= GOAL else "misses"
    return f"{table}\nIOPS ratio {iops:.3f} {verdict} the goal of {GOAL}; tracking costs {cpu - 1:+.1%} CPU per write"


# ---- main ----------------------------------------------------------------------------------

def run_all(image, seconds, rounds):
    with Procs() as procs:
        results = {kind: measure(procs, kind, image, WORKLOADS, seconds) for kind in SERVERS}
        sweep = {t: measure(procs, "nbdrep tracked", image, [RANDWRITE], seconds, t)[RANDWRITE]
                 for t in THREADS}
        ratios = tracking_ratios(procs, image, seconds, rounds)
    return results, sweep, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="run time of each fio run (default: 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="A/B rounds for the tracking ratio (default: 3)")
    parser.add_argument("--dir", default="/var/tmp", help="where the 1 GiB image goes (default: /var/tmp)")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    fd, image = tempfile.mkstemp(prefix="nbdrep-bench-", suffix=".img", dir=args.dir)
    os.close(fd)
    try:
        progress(f"filling {image} ({IMAGE_SIZE >> 20} MiB)")
        fill_image(image, IMAGE_SIZE)
        results, sweep, ratios = run_all(image, args.seconds, args.rounds)
    finally:
        os.unlink(image)
    print(main_table(results))
    print()
    print(threads_table(sweep))
    print()
    print(ratio_summary(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
