#!/usr/bin/env python3
"""Replication benchmark: bytes sent, copier throughput, achieved RPO.

    .venv/bin/python scripts/bench_replication.py [--dir /var/tmp] [--seconds 30] [--size 1G]
                                                  [--cycles 1,0.5,0.25] [--rounds 1] [--no-copier]

1. Bytes: fio 4k random writes (zipf-skewed, so blocks are rewritten within a cycle, as real
   workloads do) with 1 s cycles. Every cycle's report is collected from the control socket;
   for the same writes it prints what nbdrep copied, what a log-shipping copier sends (every
   write: bytes_written) and what a 64 KiB dirty-bitmap copier sends (every 64 KiB chunk a
   write touched).
2. Copier throughput: nbdrep's initial sync of a --size image of random data, from RP to commit
   (the replica's flush included), against ``nbdcopy --flush`` from the same source file to the
   same replica server; after one untimed warm-up copy, alternated three times, best and median.
3. Achieved RPO: lag (now minus the RP time of the newest committed cycle) sampled every
   0.1 s during a fio run like part 1's for each of --cycles (part 1 is the 1 s run); p50/p99,
   each cycle's time from RP to commit, and a PNG plot of lag over time, one panel per cycle
   length, side by side. The same fio run against nbdrep tracking without a replica, before
   and after each round of those runs, gives the front end's IOPS replicating against not
   replicating: each run against the mean of its round's two. With --rounds N the rounds
   repeat (lags pooled, ratios as median and range): on a shared machine IOPS drift by half
   within minutes, so one round says little.
4. What a cycle costs when it carries little: the replication worker in this process (no
   nbdkit; the same Session, a real ``nbdkit file`` replica), a trickle of 4k writes (100 per
   second) and the shortest of --cycles; the worker's time per step of a cycle (RP and drain,
   report, copy, flush, commit with its record), median over the cycles.

Everything runs on unix sockets in a temporary folder under --dir, removed afterwards.
"""
import argparse
import collections
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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
    ap.add_argument("--cycles", default="1,0.5,0.25",
                    help="cycle lengths in seconds for the lag runs (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of the lag runs, each between two runs not replicating (default: %(default)s)")
    ap.add_argument("--no-copier", action="store_true", help="skip part 2, the copier against nbdcopy")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(HERE), "docs", "bench_replication_lag.png"))
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    try:
        cycles = [float(c) for c in args.cycles.split(",")]
    except ValueError:
        ap.error(f"--cycles must be comma-separated seconds, not {args.cycles!r}")
    if not cycles or min(cycles) <= 0:
        ap.error("--cycles must be positive numbers of seconds")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    work = tempfile.mkdtemp(prefix="nbdrep-bench-", dir=args.dir)
    try:
        sync = None if args.no_copier else bench_copier(work, size)
        unreplicated = [bench_cycles(work, size, args.seconds, None)]
        runs = {c: [] for c in cycles}
        for _ in range(args.rounds):
            for c in cycles:
                runs[c].append(bench_cycles(work, size, args.seconds, c))
            unreplicated.append(bench_cycles(work, size, args.seconds, None))
            for c in cycles:   # against this round's runs not replicating, before and after
                runs[c][-1]["base"] = (unreplicated[-2]["iops"] + unreplicated[-1]["iops"]) / 2
        steps = bench_steps(work, min(cycles))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if sync is not None:
        print_copier(sync)
    print_tables(runs, unreplicated, steps, min(cycles))
    plot_lag(runs, args.png)
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

def bench_cycles(work, size, seconds, cycle):
    """fio 4k zipf random writes for ``seconds`` against nbdrep with ``cycle`` s cycles, or,
    with ``cycle`` None, tracking without a replica (the IOPS to compare with)."""
    src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
    for path in (src, dst):
        if os.path.exists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.truncate(size)
    run = tempfile.mkdtemp(prefix="run-", dir=work)   # sockets and a fresh state: an initial sync
    with Procs() as procs:
        rsock = os.path.join(run, "r-cycles.sock")
        if cycle is None:
            server = _serve(procs, run, src, None, cycle="1")
        else:
            procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "file", dst], wait_for=rsock)
            server = _serve(procs, run, src, rsock, cycle=str(cycle))
            _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
        label = "not replicating" if cycle is None else f"{cycle:g} s cycles"
        progress(f"fio 4k zipf random writes for {seconds} s, {label}")
        fio = procs.start(["fio", "--name=bench", "--thread", "--ioengine=nbd", f"--uri={server['uri']}",
                           "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=100%",
                           "--random_distribution=zipf:1.1", "--norandommap", f"--runtime={seconds}",
                           "--time_based", "--output-format=json"], stdout=subprocess.PIPE, cwd=work)
        samples, reports = _sample(server, fio, seconds + 120, replicated=cycle is not None)
        fio_out = fio_report(fio.stdout.read().decode())
        if cycle is not None:
            _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
        status = _ask(server, {"cmd": "status"})
    return {"lag": samples, "reports": reports, "status": status,
            "iops": fio_out["jobs"][0]["write"]["iops"]}


def bench_steps(work, cycle, count=40, writes_per_second=100):
    """{action name: [seconds per call]} of the replication worker over ``count`` cycles of
    ``cycle`` seconds, plus "_save_record" (part of Commit). In this process: the worker's
    steps are timed by wrapping the Session's methods."""
    from nbd_plugin.backend import Backend
    from nbd_plugin.params import Config
    from replication import driver
    from tracker import KIND_DATA

    size = 64 << 20
    src, dst = os.path.join(work, "steps-src.img"), os.path.join(work, "steps-dst.img")
    for path in (src, dst):
        with open(path, "wb") as f:
            f.truncate(size)
    steps = collections.defaultdict(list)
    timing = threading.Event()

    def timed(method, name=None):
        def call(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                if timing.is_set():
                    steps[name or type(args[0]).__name__].append(time.perf_counter() - started)
        return call

    with Procs() as procs:
        rsock = os.path.join(work, "r-steps.sock")
        procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "file", dst], wait_for=rsock)
        cfg = Config()
        for key, value in (("source", src), ("replica", f"nbd+unix:///?socket={rsock}"),
                           ("cycle", str(cycle)), ("state", os.path.join(work, "steps-state"))):
            cfg.add(key, value)
        cfg.complete()
        backend = Backend(src)
        originals = driver.Session._perform, driver.Session._save_record
        driver.Session._perform = timed(originals[0])
        driver.Session._save_record = timed(originals[1], "_save_record")
        session = driver.Session(cfg, {"": backend})
        try:
            session.start()
            if not session.wait_for(session.request_rp(), 600):
                raise RuntimeError(f"the initial sync did not commit: {session.status()}")
            progress(f"cycle steps: {count} cycles of {cycle:g} s, {writes_per_second} 4k writes/s")
            timing.set()
            block = os.urandom(4096)
            deadline = time.monotonic() + count * cycle
            while time.monotonic() < deadline:
                offset = random.randrange(size // 4096) * 4096
                token = session.hook.begin(0, offset, 4096)
                try:
                    backend.pwrite(block, offset)
                finally:
                    session.hook.end(token, 0, KIND_DATA, offset, 4096)
                time.sleep(1 / writes_per_second)
            timing.clear()
        finally:
            session.stop(30)
            driver.Session._perform, driver.Session._save_record = originals
            backend.close()
    return steps


def _sample(server, fio, timeout, replicated):
    """Poll status and the newest report every 0.1 s until fio exits (bounded by timeout)."""
    samples, reports = [], {}
    started = time.monotonic()
    while fio.poll() is None and time.monotonic() - started < timeout:
        if not replicated:
            time.sleep(0.1)
            continue
        status = _ask(server, {"cmd": "status"})
        if status["lag"] is not None:
            samples.append((time.monotonic() - started, status["lag"]))
        report = _ask(server, {"cmd": "report"})
        if report["cycle"] is not None:
            reports.setdefault(report["cycle"], report["exports"][""])
        time.sleep(0.1)
    return samples, reports


def _serve(procs, work, src, rsock, cycle):
    tag = os.path.basename(rsock).split(".")[0] if rsock else "unreplicated"
    sock, ctl = os.path.join(work, f"s-{tag}.sock"), os.path.join(work, f"c-{tag}.sock")
    replica = ["--replica", f"nbd+unix:///?socket={rsock}"] if rsock else []
    proc = procs.start(nbdrep_cmd("serve", "--source", src, "--socket", sock, "--control", ctl,
                                  "--state", os.path.join(work, "state"), "--cycle", cycle, *replica),
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


def print_copier(sync):
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


def print_tables(runs, unreplicated, steps, step_cycle):
    cycle, run = next(((c, r[0]) for c, r in runs.items() if c == 1.0),
                      next((c, r[0]) for c, r in runs.items()))
    cycles = {c["cycle"]: c for c in run["status"]["cycles"]}
    seen = [c for c in sorted(run["reports"]) if c in cycles and cycles[c]["writes"]]
    written = sum(cycles[c]["bytes_written"] for c in seen)
    copied = sum(sum(n for _, n in run["reports"][c]["data"]) for c in seen)
    bitmap = sum(bitmap_bytes(run["reports"][c]["data"] + run["reports"][c]["zero"]) for c in seen)
    print(f"\nBytes sent for the same writes ({len(seen)} cycles of {cycle:g} s, fio 4k zipf randwrite, "
          f"{run['iops']:.0f} IOPS)")
    print(format_table(("copier", "MiB sent", "vs nbdrep"), [
        ("nbdrep (merged report)", f"{copied / 2**20:.1f}", "1.00x"),
        ("log shipping (every write)", f"{written / 2**20:.1f}", f"{written / copied:.2f}x"),
        ("64 KiB dirty bitmap", f"{bitmap / 2**20:.1f}", f"{bitmap / copied:.2f}x")]))

    print("\nAchieved RPO (lag) under sustained fio 4k randwrite; IOPS against not replicating "
          f"({', '.join(str(round(r['iops'])) for r in unreplicated)} IOPS, between the rounds)")
    rows = []
    for c, rounds in runs.items():
        lags = [lag for r in rounds for _, lag in r["lag"]]
        spans = [x["commit_time"] - x["rp_time"] for r in rounds for x in r["status"]["cycles"]
                 if x["state"] == "committed" and x["commit_time"] and x["writes"]]
        ratios = sorted(r["iops"] / r["base"] for r in rounds)
        spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        rows.append((f"{c:g} s", str(len(lags)), f"{percentile(lags, 50):.2f}", f"{percentile(lags, 99):.2f}",
                     f"{max(lags, default=float('nan')):.2f}", f"{percentile(spans, 50):.3f}",
                     f"{percentile(spans, 99):.3f}", f"{statistics.median(r['iops'] for r in rounds):.0f}",
                     f"{statistics.median(ratios):.2f}{spread}"))
    print(format_table(("cycle", "samples", "lag p50 (s)", "lag p99 (s)", "max (s)", "RP->commit p50 (s)",
                        "p99 (s)", "IOPS", "vs not replicating"), rows))

    committed = len(steps["Commit"])
    print(f"\nWhat a cycle costs when it carries little ({committed} cycles of {step_cycle:g} s, "
          "100 4k writes/s; the replication worker's time per step)")
    rows = []
    for step, times in steps.items():
        rows.append((STEP_NAMES.get(step, step), f"{len(times) / committed:.2f}",
                     f"{statistics.median(times) * 1e3:.2f}", f"{percentile(times, 90) * 1e3:.2f}",
                     f"{sum(times) / committed * 1e3:.2f}"))
    total = sum(sum(t) for k, t in steps.items() if k != "_save_record") / committed
    rows.append(("all steps", "", "", "", f"{total * 1e3:.2f}"))
    print(format_table(("step", "calls per cycle", "median ms", "p90 ms", "ms per cycle"), rows))


STEP_NAMES = {"Arm": "arm the keep-aside", "CloseCycle": "RP and drain", "BuildReport": "report",
              "Copy": "copy", "Flush": "flush the replica", "Commit": "commit (with the record)",
              "_save_record": "  of which the record", "Publish": "publish the report",
              "Release": "release the keep-aside"}


def plot_lag(runs, path):
    """One panel per cycle length, side by side on one lag scale: each round's lag over its
    fio run, the p99 of all rounds, the goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, axes = plt.subplots(1, len(runs), sharey=True, squeeze=False, figsize=(3.6 * len(runs), 3.4))
    for ax, (cycle, rounds) in zip(axes[0], runs.items()):
        lags = [lag for r in rounds for _, lag in r["lag"]]
        for i, run in enumerate(rounds):
            ax.plot([t for t, _ in run["lag"]], [lag for _, lag in run["lag"]], lw=0.8,
                    label=f"round {i + 1}" if len(rounds) > 1 else None)
        ax.axhline(percentile(lags, 99), color="black", ls=":", lw=0.8,
                   label=f"p99 {percentile(lags, 99):.2f} s")
        ax.axhline(1.0, color="red", ls="--", lw=0.8, label="goal: p99 ≤ 1 s")
        ax.set_title(f"{cycle:g} s cycles")
        ax.set_xlabel("seconds into the fio run")
        ax.legend(loc="upper right", fontsize=7)
    axes[0][0].set_ylabel("lag (s)")
    fig.suptitle("nbdrep achieved RPO under 4k random writes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
