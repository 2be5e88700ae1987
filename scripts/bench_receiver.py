"""Benchmark the receiver (``nbdrep receive``) side by side with a plain ``nbdkit file`` replica.

1. Copy throughput: the initial sync of a source of random data (``--size``), then
   ``FULL_CYCLES`` cycles that each rewrote all of it with new random data (which the receiver
   journals: its initial sync goes straight into the target), each timed from the RP to the
   commit (for the receiver: to its commit record), into ``nbdkit file`` and into the
   receiver, alternated, ``ROUNDS`` each after an untimed warm-up; the replica image is
   overwritten in place before each run. The receiver's journals may hold one full cycle
   (``--journal-max`` the size), so each commit folds the RP before and, from the fourth full
   cycle on, the pending journal is a folded journal's file reused
   (``receiver.store.Store._retire``); the first full cycle and the last are reported
   (before each, the bench waits for the folds to end).
2. Lag: fio 4k zipf random writes for ``--seconds`` with 1 s cycles, replicating into the
   receiver (every RP kept; then bounded, folding every cycle: see ``FOLDING``), then the
   same into ``nbdkit file``; lag sampled every 0.1 s (on the receiver's side: now minus the
   RP time of its newest commit; for nbdkit file, the source's), p50/p99/max.
3. Journal bytes of that run: what the receiver's journals hold (each cycle's merged union)
   against what a journal of every write holds (the sum of the write lengths, as a per-write
   journal such as Zerto's stores), over the same cycles, and per hour.

   ``--rate-iops N`` holds fio to N writes a second (fio's ``rate_iops``), so that the lag is
   measured at a stated load rather than at whatever the front end reaches that day.

    .venv/bin/python scripts/bench_receiver.py [--size 512M] [--seconds 30] [--only throughput|lag]
                                               [--rate-iops N]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import nbd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from benchlib import format_table  # noqa: E402
from procs import Procs, nbdrep_cmd  # noqa: E402

from copier.sizes import format_size  # noqa: E402
from nbd_plugin import control  # noqa: E402
from nbd_plugin.params import parse_size  # noqa: E402

ROUNDS = 3
FULL_CYCLES = 4   # the fourth is the first into a reused journal file


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M", help="source size for the throughput runs")
    ap.add_argument("--seconds", type=int, default=30, help="fio run for lag and journal bytes")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--only", choices=("throughput", "lag"), help="run one of the two parts")
    ap.add_argument("--rate-iops", type=int, default=None, metavar="N",
                    help="hold fio to N writes a second in the lag runs (default: as fast as it goes)")
    args = ap.parse_args()
    if args.rate_iops is not None and args.rate_iops < 1:
        ap.error(f"--rate-iops {args.rate_iops}: give a rate of at least 1 write a second")
    work = args.work or tempfile.mkdtemp(prefix="bench-receiver-")
    os.makedirs(work, exist_ok=True)
    size = parse_size(args.size, "--size")
    if args.only != "lag":
        print_throughput(size, bench_throughput(work, size))
    if args.only != "throughput":
        run = bench_lag(work, args.seconds, "receiver", rate=args.rate_iops)
        folding = bench_lag(work, args.seconds, "receiver", FOLDING, rate=args.rate_iops)
        plain = bench_lag(work, args.seconds, "nbdkit file", rate=args.rate_iops)
        print_lag(run, folding, plain, args.rate_iops)


def progress(text):
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def ask(path, message, timeout=30):
    return control.request(path, message, timeout)


def start_replica(procs, work, kind, dst, tag, extra=()):
    """A replica of ``kind`` ("nbdkit file" or "receiver") of ``dst``; returns (URI, control or None)."""
    sock = os.path.join(work, f"r-{tag}.sock")
    if kind == "nbdkit file":
        procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "file", dst], wait_for=sock)
        return f"nbd+unix:///?socket={sock}", None
    ctl = os.path.join(work, f"rc-{tag}.sock")
    procs.start(nbdrep_cmd("receive", "--target", dst, "--socket", sock, "--control", ctl,
                           "--state", os.path.join(work, f"rstate-{tag}"), *extra),
                wait_for=ctl, stdout=subprocess.DEVNULL)
    return f"nbd+unix:///?socket={sock}", ctl


def serve(procs, work, src, replica, tag, cycle):
    sock, ctl = os.path.join(work, f"s-{tag}.sock"), os.path.join(work, f"c-{tag}.sock")
    procs.start(nbdrep_cmd("serve", "--source", src, "--socket", sock, "--control", ctl,
                           "--state", os.path.join(work, f"state-{tag}"), "--cycle", cycle,
                           "--replica", replica), wait_for=ctl, stdout=subprocess.DEVNULL)
    return f"nbd+unix:///?socket={sock}", ctl


def wait_receiver(rctl, cycle, timeout=600):
    status = {}

    def committed():
        status.update(ask(rctl, {"cmd": "status"}))
        return (status["committed_cycle"] or 0) >= cycle

    wait_until(committed, f"the receiver's commit of cycle {cycle}", timeout)
    return status


# -- 1. throughput ---------------------------------------------------------------------------------

def bench_throughput(work, size):
    src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
    progress(f"writing {size >> 20} MiB of random data")
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    kinds = ("nbdkit file", "receiver")
    plan = [("nbdkit file", False)] + [(k, True) for _ in range(ROUNDS) for k in kinds]
    results = {(k, what): [] for k in kinds for what in THROUGHPUT_RUNS}
    for i, (kind, counted) in enumerate(plan):
        overwrite(dst, size)
        os.sync()
        with Procs() as procs:
            uri, rctl = start_replica(procs, work, kind, dst, f"t{i}", extra=["--journal-max", str(size)])
            suri, ctl = serve(procs, work, src, uri, f"t{i}", "3600")
            progress(f"throughput {i}/{len(plan) - 1}: {kind}{'' if counted else ' (warm-up)'}")
            times = [timed_rp(ctl, rctl, first=True)]
            for _ in range(FULL_CYCLES):
                if rctl is not None:   # the folds down to --journal-max
                    wait_until(lambda: ask(rctl, {"cmd": "status"})["journal_bytes"] <= size, "the folds")
                rewrite(suri, size)
                os.sync()
                times.append(timed_rp(ctl, rctl))
        remove_run(work, f"t{i}")
        if counted:
            for what, seconds in zip(THROUGHPUT_RUNS, (times[0], times[1], times[-1])):
                results[(kind, what)].append(seconds)
    return results


THROUGHPUT_RUNS = ("initial sync", "first full cycle", f"full cycle {FULL_CYCLES}")


def wait_until(predicate, what, timeout=600):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} took over {timeout} s")
        time.sleep(0.05)


def timed_rp(ctl, rctl, first=False):
    """Take an RP, wait for its commit; seconds from the RP to the (receiver's) commit of that
    cycle or, with ``first``, of the session's first cycle (the initial sync, which starts
    by itself)."""
    cycle = ask(ctl, {"cmd": "rp", "wait": True, "timeout": 3600}, 3700)["cycle"]
    cycles = ask(ctl, {"cmd": "status"})["cycles"]
    record = cycles[0] if first else next(c for c in cycles if c["cycle"] == cycle)
    end = record["commit_time"]
    if rctl is not None:
        rps = wait_receiver(rctl, cycle)["rps"]
        end = next(rp for rp in rps if rp["cycle"] == record["cycle"])["commit_time"]
    return end - record["rp_time"]


def rewrite(uri, size):
    """New random data over all of the source, through nbdrep serve (so it is tracked)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    for off in range(0, size, 1 << 20):
        h.pwrite(os.urandom(1 << 20), off)
    h.flush()
    h.shutdown()


def overwrite(dst, size):
    """The replica image overwritten in place with a byte no copy writes (see
    bench_replication.py: fresh images made the replica's write time swing 4x on this VM)."""
    block = b"\xaa" * (1 << 20)
    with open(dst, "r+b" if os.path.exists(dst) else "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.truncate(size)


def remove_run(work, tag, *paths):
    """Delete a run's state directories (and ``paths``): a run's journals take gigabytes."""
    for state in (f"rstate-{tag}", f"state-{tag}"):
        shutil.rmtree(os.path.join(work, state), ignore_errors=True)
    for path in paths:
        os.unlink(path)


# -- 2 and 3. lag and journal bytes --------------------------------------------------------------

# The receiver's retention in the lag runs: every RP of the run kept (for the journal bytes,
# and each cycle into a fresh journal file), or a bound of a few cycles, so that every commit
# is followed by a fold and the pending journal is a folded one's file reused (the steady
# state of a receiver that ran longer than --keep or up to --journal-max).
RETAIN_ALL = ("--keep", "1h", "--journal-max", "8G")
FOLDING = ("--keep", "1h", "--journal-max", "128M")


def bench_lag(work, seconds, kind, retention=RETAIN_ALL, size=1 << 30, rate=None):
    tag = "lag-f" if kind != "receiver" else "lag-r" if retention == RETAIN_ALL else "lag-rf"
    src, dst = os.path.join(work, f"{tag}-src.img"), os.path.join(work, f"{tag}-dst.img")
    for path in (src, dst):
        if os.path.exists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.truncate(size)
    report = os.path.join(work, f"{tag}-fio.json")
    try:
        with Procs() as procs:
            uri, rctl = start_replica(procs, work, kind, dst, tag, extra=retention)
            suri, ctl = serve(procs, work, src, uri, tag, "1")
            ask(ctl, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
            lag_at = rctl or ctl
            first = ask(lag_at, {"cmd": "status"})["committed_cycle"]
            progress(f"fio 4k zipf random writes for {seconds} s, 1 s cycles, into {kind}"
                     + (f" {' '.join(retention)}" if rctl else "") + (f" at {rate} IOPS" if rate else ""))
            fio = procs.start(["fio", "--name=bench", "--thread", "--ioengine=nbd", f"--uri={suri}", "--rw=randwrite",
                               "--bs=4k", "--iodepth=16", "--size=100%", "--random_distribution=zipf:1.1",
                               "--norandommap", f"--runtime={seconds}", "--time_based",
                               "--output-format=json", f"--output={report}"]
                              + ([f"--rate_iops={rate}"] if rate else []), cwd=work)
            lags = []
            started = time.monotonic()
            while fio.poll() is None and time.monotonic() - started < seconds + 120:
                lag = ask(lag_at, {"cmd": "status"})["lag"]
                if lag is not None:
                    lags.append(lag)
                time.sleep(0.1)
            if fio.poll() is None:
                procs.kill(fio)
                sys.exit(f"bench_receiver: fio into {kind} did not end {seconds + 120} s after it started")
            last = ask(ctl, {"cmd": "rp", "wait": True, "timeout": 600}, 700)["cycle"]
            cycles = {c["cycle"]: c for c in ask(ctl, {"cmd": "status"})["cycles"]}
            with open(report) as f:   # fio's nbd engine prints a line of its own first
                text = f.read()
            iops = json.loads(text[text.index("{"):])["jobs"][0]["write"]["iops"]
            if rctl is None:
                return {"lags": lags, "iops": iops}
            rstatus = ask(rctl, {"cmd": "status"})
    finally:
        remove_run(work, tag, src, dst)
        if os.path.exists(report):
            os.unlink(report)
    rps = [rp for rp in rstatus["rps"] if first < rp["cycle"] <= last and rp["cycle"] in cycles]
    span = rps[-1]["rp_time"] - rps[0]["rp_time"] if len(rps) > 1 else float("nan")
    return {"lags": lags, "iops": iops, "rps": rps, "span": span,
            "union": sum(rp["bytes"] for rp in rps),
            "per_write": sum(cycles[rp["cycle"]]["bytes_written"] for rp in rps)}


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def print_throughput(size, throughput):
    mb = size / 1e6
    print(f"\nCopy throughput, {size >> 20} MiB of random data, RP to commit "
          f"({ROUNDS} alternated runs each)")
    rows, best, median = [], {}, {}
    for (kind, what), times in throughput.items():
        key = (kind, what)
        best[key], median[key] = min(times), statistics.median(times)
        rows.append((f"{kind}, {what}", f"{best[key]:.2f}", f"{median[key]:.2f}",
                     f"{mb / best[key]:.0f}", f"{mb / median[key]:.0f}"))
    print(format_table(("replica", "best (s)", "median (s)", "best MB/s", "median MB/s"), rows))
    for what in THROUGHPUT_RUNS:
        f, r = ("nbdkit file", what), ("receiver", what)
        print(f"{what}: receiver / nbdkit file {best[f] / best[r]:.2f}x best, "
              f"{median[f] / median[r]:.2f}x median (goal >= 0.8x)")


def print_lag(run, folding, plain, rate=None):
    print("\nLag under fio 4k zipf randwrite" + (f" held to {rate} IOPS" if rate else "")
          + ", 1 s cycles, one run each (goal: receiver p99 <= 1.5 s)")
    print(format_table(("replica", "IOPS", "samples", "p50 (s)", "p99 (s)", "max (s)"), [
        (kind, f"{r['iops']:,.0f}", str(len(r["lags"])), f"{percentile(r['lags'], 50):.2f}",
         f"{percentile(r['lags'], 99):.2f}",
         f"{max(r['lags'], default=float('nan')):.2f}")
        for kind, r in (("receiver, every RP kept (its side)", run),
                        (f"receiver, {' '.join(FOLDING[2:])}: a fold a cycle (its side)", folding),
                        ("nbdkit file (source side)", plain))]))
    hour = 3600 / run["span"]
    print(f"\nJournal bytes over the same {len(run['rps'])} cycles ({run['span']:.0f} s):")
    print(format_table(("journal", "bytes", "per hour", "vs nbdrep"), [
        ("nbdrep: each cycle's merged union", format_size(run["union"]),
         format_size(int(run["union"] * hour)), "1.00x"),
        ("per write: the sum of write lengths", format_size(run["per_write"]),
         format_size(int(run["per_write"] * hour)), f"{run['per_write'] / max(run['union'], 1):.2f}x"),
    ]))


if __name__ == "__main__":
    main()
