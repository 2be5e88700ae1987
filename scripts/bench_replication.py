#!/usr/bin/env python3
"""Replication benchmark: bytes sent, copier throughput, achieved RPO.

    .venv/bin/python scripts/bench_replication.py [--dir /var/tmp] [--seconds 30] [--size 1G]

1. Bytes: fio 4k random writes (zipf-skewed, so blocks are rewritten within a cycle, as real
   workloads do) with 1 s cycles. Every cycle's report is collected from the control socket;
   for the same writes it prints what nbdrep copied, what a log-shipping copier sends (every
   write: bytes_written) and what a 64 KiB dirty-bitmap copier sends (every 64 KiB chunk a
   write touched).
2. Copier throughput: nbdrep's initial sync of a --size image of random data, from RP to commit
   (the replica's flush included), against ``nbdcopy --flush`` from the same source file to the
   same replica server; after one untimed warm-up copy, alternated three times, best and median.
3. Achieved RPO: lag (now minus the RP time of the newest committed cycle) sampled every
   0.1 s during the fio run of part 1; p50/p99 and a PNG plot of lag over time.

Everything runs on unix sockets in a temporary folder under --dir, removed afterwards.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from benchlib import fio_report, format_table  # noqa: E402
from procs import Procs, nbdrep_cmd  # noqa: E402

from nbd_plugin import control  # noqa: E402
from nbd_plugin.params import parse_size  # noqa: E402

CHUNK = 64 << 10
ROUNDS = 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default: %(default)s)")
    ap.add_argument("--size", default="1G", help="image size (default: %(default)s)")
    ap.add_argument("--seconds", type=int, default=30, help="fio run time (default: %(default)s)")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(HERE), "docs", "bench_replication_lag.png"))
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    work = tempfile.mkdtemp(prefix="nbdrep-bench-", dir=args.dir)
    try:
        sync = bench_copier(work, size)
        run = bench_cycles(work, size, args.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(sync, run)
    plot_lag(run["lag"], args.png)
    print(f"\nlag plot: {args.png}")


def progress(text):
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# -- part 2: copier throughput ------------------------------------------------------------------

def bench_copier(work, size):
    src = os.path.join(work, "src.img")
    progress(f"writing {size >> 20} MiB of random data")
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    runners = (("nbdrep initial sync", _time_nbdrep_sync), ("nbdcopy --flush file -> NBD", _time_nbdcopy))
    # An untimed copy first, so that no counted run pays one-time costs (cold caches, the
    # image's first allocation), which made the first run up to 40% slower, whichever copier.
    plan = [("warm-up (nbdcopy, not counted)", _time_nbdcopy)] + list(runners) * ROUNDS
    results = {name: [] for name, _ in runners}
    dst = os.path.join(work, "dst.img")
    for i, (name, runner) in enumerate(plan):
        _overwrite(dst, size)
        os.sync()  # no writeback of an earlier run's pages during this one
        with Procs() as procs:
            rsock = os.path.join(work, f"r{i}.sock")
            procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "file", dst], wait_for=rsock)
            progress(f"copier {i}/{len(plan) - 1}: {name}")
            seconds = runner(procs, work, src, rsock)
        same = subprocess.run(["cmp", "-s", src, dst]).returncode == 0
        if name in results:  # not the warm-up
            results[name].append((seconds, same))
    return {"size": size, "results": results}


def _overwrite(dst, size):
    """Fill the replica image with a byte no copy writes, in place.

    In place, not a fresh file: this VM hands freed memory back to its host (virtio-balloon
    free page reporting), and the first touch of such a page costs a fault in the host. With a
    fresh image every run, the replica server's write time for the same GiB swung from 0.4 s
    to 1.5 s between runs (to 16 s once), depending on which pages the kernel handed it.
    """
    block = b"\xaa" * (1 << 20)
    with open(dst, "r+b" if os.path.exists(dst) else "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.truncate(size)


def _time_nbdrep_sync(procs, work, src, rsock):
    server = _serve(procs, work, src, rsock, cycle="3600")
    _ask(server, {"cmd": "rp", "wait": True, "timeout": 3600}, 3700)
    cycle = _ask(server, {"cmd": "status"})["cycles"][0]
    procs.stop(server["proc"])
    return cycle["commit_time"] - cycle["rp_time"]


def _time_nbdcopy(procs, work, src, rsock):
    started = time.monotonic()
    # --flush: a cycle is committed only once the replica flushed, so nbdcopy must flush too.
    subprocess.run(["nbdcopy", "--flush", src, f"nbd+unix:///?socket={rsock}"], check=True)
    return time.monotonic() - started


# -- parts 1 and 3: cycles under fio ---------------------------------------------------------------

def bench_cycles(work, size, seconds):
    src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
    for path in (src, dst):
        with open(path, "wb") as f:
            f.truncate(size)
    with Procs() as procs:
        rsock = os.path.join(work, "r-cycles.sock")
        procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "file", dst], wait_for=rsock)
        server = _serve(procs, work, src, rsock, cycle="1")
        _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
        progress(f"fio 4k zipf random writes for {seconds} s with 1 s cycles")
        fio = procs.start(["fio", "--name=bench", "--ioengine=nbd", f"--uri={server['uri']}",
                           "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=100%",
                           "--random_distribution=zipf:1.1", "--norandommap", f"--runtime={seconds}",
                           "--time_based", "--output-format=json"], stdout=subprocess.PIPE, cwd=work)
        samples, reports = _sample(server, fio, seconds + 120)
        fio_out = fio_report(fio.stdout.read().decode())
        _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
        status = _ask(server, {"cmd": "status"})
    return {"lag": samples, "reports": reports, "status": status,
            "iops": fio_out["jobs"][0]["write"]["iops"]}


def _sample(server, fio, timeout):
    """Poll status and the newest report every 0.1 s until fio exits (bounded by timeout)."""
    samples, reports = [], {}
    started = time.monotonic()
    while fio.poll() is None and time.monotonic() - started < timeout:
        status = _ask(server, {"cmd": "status"})
        if status["lag"] is not None:
            samples.append((time.monotonic() - started, status["lag"]))
        report = _ask(server, {"cmd": "report"})
        if report["cycle"] is not None:
            reports.setdefault(report["cycle"], report["exports"][""])
        time.sleep(0.1)
    return samples, reports


def _serve(procs, work, src, rsock, cycle):
    tag = os.path.basename(rsock).split(".")[0]
    sock, ctl = os.path.join(work, f"s-{tag}.sock"), os.path.join(work, f"c-{tag}.sock")
    proc = procs.start(nbdrep_cmd("serve", "--source", src, "--socket", sock, "--control", ctl,
                                  "--state", os.path.join(work, "state"), "--cycle", cycle,
                                  "--replica", f"nbd+unix:///?socket={rsock}"),
                       wait_for=ctl, stdout=subprocess.DEVNULL)
    return {"proc": proc, "control": ctl, "uri": f"nbd+unix:///?socket={sock}"}


def _ask(server, message, timeout=30):
    return control.request(server["control"], message, timeout)


# -- tables and plot -----------------------------------------------------------------------------

def bitmap_bytes(extents):
    """What a 64 KiB dirty-bitmap copier sends for these extents: every chunk they touch."""
    chunks = set()
    for off, n in extents:
        chunks.update(range(off // CHUNK, (off + n - 1) // CHUNK + 1))
    return len(chunks) * CHUNK


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def print_tables(sync, run):
    size_mb = sync["size"] / 1e6
    print(f"\nCopier throughput (same source file, same replica server; {ROUNDS} alternated runs each)")
    rows, best, median = [], {}, {}
    for name, runs in sync["results"].items():
        times = [secs for secs, _ in runs]
        best[name], median[name] = min(times), statistics.median(times)
        rows.append((name, f"{best[name]:.2f}", f"{median[name]:.2f}", f"{size_mb / best[name]:.0f}",
                     f"{size_mb / median[name]:.0f}", "yes" if all(same for _, same in runs) else "NO"))
    print(format_table(("copier", "best s", "median s", "best MB/s", "median MB/s", "replica == source"),
                       rows))
    ours, theirs = "nbdrep initial sync", "nbdcopy --flush file -> NBD"
    print(f"nbdrep / nbdcopy throughput: best {best[theirs] / best[ours]:.2f}x, "
          f"median {median[theirs] / median[ours]:.2f}x")

    cycles = {c["cycle"]: c for c in run["status"]["cycles"]}
    seen = [c for c in sorted(run["reports"]) if c in cycles and cycles[c]["writes"]]
    written = sum(cycles[c]["bytes_written"] for c in seen)
    copied = sum(sum(n for _, n in run["reports"][c]["data"]) for c in seen)
    bitmap = sum(bitmap_bytes(run["reports"][c]["data"] + run["reports"][c]["zero"]) for c in seen)
    print(f"\nBytes sent for the same writes ({len(seen)} cycles of fio 4k zipf randwrite, "
          f"{run['iops']:.0f} IOPS)")
    print(format_table(("copier", "MiB sent", "vs nbdrep"), [
        ("nbdrep (merged report)", f"{copied / 2**20:.1f}", "1.00x"),
        ("log shipping (every write)", f"{written / 2**20:.1f}", f"{written / copied:.2f}x"),
        ("64 KiB dirty bitmap", f"{bitmap / 2**20:.1f}", f"{bitmap / copied:.2f}x")]))

    lags = [lag for _, lag in run["lag"]]
    print("\nAchieved RPO (lag) under sustained fio randwrite, 1 s cycles")
    print(format_table(("samples", "p50 (s)", "p99 (s)", "max (s)"), [
        (str(len(lags)), f"{percentile(lags, 50):.2f}", f"{percentile(lags, 99):.2f}",
         f"{max(lags, default=float('nan')):.2f}")]))


def plot_lag(samples, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in samples], [lag for _, lag in samples], lw=1)
    ax.axhline(2.0, color="red", ls="--", lw=0.8, label="goal: p99 ≤ 2 s")
    ax.set_xlabel("seconds into the fio run")
    ax.set_ylabel("lag (s)")
    ax.set_title("nbdrep achieved RPO under 4k random writes, 1 s cycles")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
