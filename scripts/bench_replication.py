#!/usr/bin/env python3
"""Replication benchmark: bytes sent, copier throughput, achieved RPO.

    .venv/bin/python scripts/bench_replication.py [--dir /var/tmp] [--seconds 30] [--size 1G]
                                                  [--cycles 1,0.5,0.25] [--rounds 1] [--no-copier]
                                                  [--pin [--rate 24700]]

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
   length side by side, a row per setup. The same fio run against nbdrep tracking without a replica, before
   and after each round of those runs, gives the front end's IOPS replicating against not
   replicating: each run against the mean of its round's two. With --rounds N the rounds
   repeat (lags pooled, ratios as median and range): on a shared machine IOPS drift by half
   within minutes, so one round says little. Every run also counts the CPU each side took per
   write from /proc (fio; the source's nbdkit split into fio's connection, the dirty-region
   log's source sync and the rest, with the copier; the replica's nbdkit) and how busy each
   core was; a replicating run first writes 12 MiB and takes a few RPs, so that the session's
   threads that start on first need run before fio connects, as on a server up for a while.
   The longest time from one RP to the next shows a worker held up between cycles.

   With --pin, as a deployment runs it, where the replica is another machine: the replica's
   nbdkit runs on CPU 1 only, and the source (``nbdrep serve``, its nbdkit with the copier's
   threads) and fio on CPU 0 only, in the runs replicating and in those not replicating
   alike, so that the front end has one core in both and the replica's cost lands where
   another machine would carry it. Each round then also runs, pinned, the same fio
   unthrottled, the same with ``--dirty-region 0`` (the dirty-region log and its source
   syncs off: their share), and fio held to --rate IOPS (the issue's load), each setup after
   its own run not replicating; the unpinned runs are the measurement without --pin.
4. What a cycle costs when it carries little: the replication worker in this process (no
   nbdkit; the same Session, a real ``nbdkit file`` replica), a trickle of 4k writes (100 per
   second) and the shortest of --cycles; the worker's time per step of a cycle (RP and drain,
   report, copy, flush, commit with its record), median over the cycles.

Everything runs on unix sockets in a temporary folder under --dir, removed afterwards.
"""
import argparse
import collections
import itertools
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
from nbd_plugin.cli import DEFAULT_THREADS  # noqa: E402
from nbd_plugin.params import parse_size  # noqa: E402

CHUNK = 64 << 10
ROUNDS = 3
WARM_UP_BYTES, WARM_UP_RPS = 12 << 20, 6   # three 4 MiB copy batches; commits past 4 hot cycles
SOURCE_CPU, REPLICA_CPU = 0, 1   # --pin: the front end's core and the replica's "other machine"


class Setup(collections.namedtuple("Setup", "label pin rate dirty_region")):
    """How a lag/IOPS run is made: pinned or not, fio's rate (None: as fast as it goes), the
    source's ``--dirty-region`` (None: the default)."""


UNPINNED = Setup("unpinned", False, None, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default: %(default)s)")
    ap.add_argument("--size", default="1G", help="image size (default: %(default)s)")
    ap.add_argument("--seconds", type=int, default=None,
                    help="fio run time of each lag run (default: 30, 10 with --pin)")
    ap.add_argument("--cycles", default="1,0.5,0.25",
                    help="cycle lengths in seconds for the lag runs (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the lag runs, each between two runs not replicating (default: 1, 3 with --pin)")
    ap.add_argument("--pin", action="store_true",
                    help=f"also run the source and fio on CPU {SOURCE_CPU} only, the replica on CPU {REPLICA_CPU}")
    ap.add_argument("--rate", type=int, default=24700,
                    help="with --pin, the IOPS of the throttled runs (default: %(default)s, the issue's load)")
    ap.add_argument("--no-copier", action="store_true", help="skip part 2, the copier against nbdcopy")
    ap.add_argument("--png", default=os.path.join(os.path.dirname(HERE), "docs", "bench_replication_lag.png"))
    args = ap.parse_args()
    seconds = args.seconds if args.seconds is not None else 10 if args.pin else 30
    rounds = args.rounds if args.rounds is not None else 3 if args.pin else 1
    size = parse_size(args.size, "--size")
    try:
        cycles = [float(c) for c in args.cycles.split(",")]
    except ValueError:
        ap.error(f"--cycles must be comma-separated seconds, not {args.cycles!r}")
    if not cycles or min(cycles) <= 0:
        ap.error("--cycles must be positive numbers of seconds")
    if rounds < 1 or seconds < 3:
        ap.error("--rounds must be at least 1 and --seconds at least 3")
    if args.rate < 1:
        ap.error("--rate must be a positive number of IOPS")
    if args.pin and not {SOURCE_CPU, REPLICA_CPU} <= os.sched_getaffinity(0):
        ap.error(f"--pin needs CPUs {SOURCE_CPU} and {REPLICA_CPU}, this process may use "
                 f"{sorted(os.sched_getaffinity(0))}")
    # Each group: the setup of its runs not replicating, then the setups replicating after it.
    groups = [(UNPINNED, [UNPINNED])]
    if args.pin:
        pinned = Setup("pinned", True, None, None)
        rated = Setup(f"pinned, {args.rate:,} IOPS", True, args.rate, None)
        groups += [(pinned, [pinned, Setup("pinned, --dirty-region 0", True, None, "0")]),
                   (rated, [rated])]
    part1 = 1.0 if 1.0 in cycles else cycles[0]
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="nbdrep-bench-", dir=args.dir)
    try:
        sync = None if args.no_copier else bench_copier(work, size)
        bases, runs = collections.defaultdict(list), collections.defaultdict(list)
        for r in range(rounds):
            for base, setups in groups:
                bases[base].append(bench_cycles(work, size, seconds, None, base))
                for c, setup in itertools.product(cycles, setups):   # the setups interleaved
                    # Part 1's reports from one run only: asking for them costs the source CPU.
                    wanted = r == 0 and setup == UNPINNED and c == part1
                    runs[setup, c].append(bench_cycles(work, size, seconds, c, setup, reports=wanted))
        for base, setups in groups:   # each round's runs against its runs not replicating, before and after
            bases[base].append(bench_cycles(work, size, seconds, None, base))
            for setup, c in itertools.product(setups, cycles):
                for r, run in enumerate(runs[setup, c]):
                    run["base"] = (bases[base][r]["iops"] + bases[base][r + 1]["iops"]) / 2
        steps = bench_steps(work, min(cycles))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if sync is not None:
        print_copier(sync)
    print_tables(groups, cycles, runs, bases, steps, min(cycles))
    plot_lag(groups, cycles, runs, args.png)
    print(f"\nlag plot: {args.png}")
    print(f"whole benchmark: {time.monotonic() - started:.0f} s; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


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

def bench_cycles(work, size, seconds, cycle, setup=UNPINNED, reports=False):
    """fio 4k zipf random writes for ``seconds`` against nbdrep with ``cycle`` s cycles, or,
    with ``cycle`` None, tracking without a replica (the IOPS to compare with), made as
    ``setup`` says; with ``reports``, every cycle's report too (for part 1)."""
    src, dst = os.path.join(work, "src.img"), os.path.join(work, "dst.img")
    for path in (src, dst):
        if os.path.exists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.truncate(size)
    run = tempfile.mkdtemp(prefix="run-", dir=work)   # sockets and a fresh state: an initial sync
    source_cpu, replica_cpu = (SOURCE_CPU, REPLICA_CPU) if setup.pin else (None, None)
    load = os.getloadavg()[0]
    with Procs() as procs:
        rsock = os.path.join(run, "r-cycles.sock")
        replica = None
        if cycle is None:
            server = _serve(procs, run, src, None, "1", setup.dirty_region, source_cpu)
        else:
            replica = procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "file", dst],
                                  wait_for=rsock, preexec_fn=pinned(replica_cpu))
            server = _serve(procs, run, src, rsock, str(cycle), setup.dirty_region, source_cpu)
            _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
        source = _child(server["proc"].pid, "nbdkit")
        sync_tids = _warm_up(server, source) if cycle is not None else set()
        session_tids = set(os.listdir(f"/proc/{source}/task"))   # before fio's connection
        label = "not replicating" if cycle is None else f"{cycle:g} s cycles"
        progress(f"fio 4k zipf random writes for {seconds} s, {label}, {setup.label}")
        rate = [] if setup.rate is None else [f"--rate_iops={setup.rate}"]
        fio = procs.start(["fio", "--name=bench", "--thread", "--ioengine=nbd", f"--uri={server['uri']}",
                           "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=100%",
                           "--random_distribution=zipf:1.1", "--norandommap", f"--runtime={seconds}",
                           "--time_based", "--output-format=json", *rate],
                           stdout=subprocess.PIPE, cwd=work, preexec_fn=pinned(source_cpu))
        front_tids = _new_threads(source, session_tids)
        pids = {"fio": fio.pid, "serve": server["proc"].pid, "source": source}
        if replica is not None:
            pids["replica"] = replica.pid
        sampled = _sample(server, fio, seconds, seconds + 120, cycle is not None, reports, pids)
        fio_out = fio_report(fio.stdout.read().decode())
        if cycle is not None:
            _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
        status = _ask(server, {"cmd": "status"})
    iops = fio_out["jobs"][0]["write"]["iops"]
    first, last = sampled["window"]
    pins = _pins(last, pids, source_cpu, replica_cpu)
    return {"lag": sampled["lag"], "reports": sampled["reports"], "status": status, "iops": iops,
            "cpu": _cpu_use(first, last, front_tids, sync_tids, iops), "pins": pins, "load": load,
            "source_syncs": sampled["source_syncs"]}


def pinned(cpu):
    """A ``preexec_fn`` that confines the child to ``cpu`` before it runs its program, so that
    every thread and process it starts inherits that (None: no confinement)."""
    return None if cpu is None else lambda: os.sched_setaffinity(0, {cpu})


def _child(pid, name, timeout=30):
    """The pid of ``pid``'s child process called ``name`` (nbdrep serve's nbdkit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in filter(str.isdigit, os.listdir("/proc")):
            stat = _stat(f"/proc/{entry}/stat")
            if stat and stat["ppid"] == pid and stat["comm"] == name:
                return int(entry)
        time.sleep(0.05)
    raise RuntimeError(f"pid {pid} has no child {name!r} after {timeout} s")


def _warm_up(server, source, rps=WARM_UP_RPS):
    """Start the session's threads that start on first need, as a server running for a while
    has them, so that fio's connection brings only its own: the copy's reader (a copy of more
    than one batch) and the dirty-region log's source sync (due once the commits are
    ``rps`` cycles past the last sync). Returns the threads that started during the RPs: the
    source sync's (none with the log off)."""
    import nbd
    client = nbd.NBD()
    client.connect_uri(server["uri"])
    try:
        client.pwrite(os.urandom(WARM_UP_BYTES), 0)
    finally:
        client.shutdown()
    _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
    before = set(os.listdir(f"/proc/{source}/task"))
    for _ in range(rps):
        _ask(server, {"cmd": "rp", "wait": True, "timeout": 600}, 700)
    return set(os.listdir(f"/proc/{source}/task")) - before


def _new_threads(pid, before, timeout=30):
    """The threads of ``pid`` not in ``before`` once there are as many as nbdkit starts for a
    client's connection: one for the connection and its ``--threads`` workers."""
    deadline = time.monotonic() + timeout
    while len(set(os.listdir(f"/proc/{pid}/task")) - before) < 1 + DEFAULT_THREADS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not start fio's connection's threads within {timeout} s")
        time.sleep(0.01)
    return set(os.listdir(f"/proc/{pid}/task")) - before


def _stat(path):
    """A task's comm, ppid, CPU ticks (user + system) and the CPU it last ran on, from a
    /proc .../stat file; None if the task is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # fields[0] is stat's field 3
    return {"comm": text[text.index("(") + 1:text.rindex(")")], "ppid": int(fields[1]),
            "ticks": int(fields[11]) + int(fields[12]), "psr": int(fields[36])}


def _snapshot(pids):
    """Now: each process's CPU ticks (its ended threads included), the source's threads one by
    one, each task's allowed CPUs and last CPU, and the cores' busy and total ticks."""
    procs, tasks = {}, {}
    for name, pid in pids.items():
        whole = _stat(f"/proc/{pid}/stat")
        procs[name] = whole["ticks"] if whole else None
        tasks[name] = {}
        for tid in os.listdir(f"/proc/{pid}/task") if whole else ():
            stat = _stat(f"/proc/{pid}/task/{tid}/stat")
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    allowed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
            except (OSError, StopIteration):
                continue   # the thread ended meanwhile
            if stat:
                tasks[name][tid] = {**stat, "allowed": allowed}
    cores = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                ticks = [int(t) for t in ticks]
                cores[name] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))   # busy: not idle, not iowait
    return {"time": time.monotonic(), "procs": procs, "tasks": tasks, "cores": cores}


def _cpu_use(first, last, front_tids, sync_tids, iops):
    """Microseconds of CPU per write between two snapshots: fio; the source's nbdkit split into
    the threads of fio's connection (the front end), the dirty-region log's source sync and the
    rest (the session's: copier, worker, control, with the threads that ended); the replica's
    nbdkit. And each core's busy share."""
    tick = 1e6 / os.sysconf("SC_CLK_TCK")
    writes = iops * (last["time"] - first["time"])

    def per_write(ticks):
        return ticks * tick / writes

    def used(tids):
        return sum(t["ticks"] - first["tasks"]["source"].get(tid, {"ticks": 0})["ticks"]
                   for tid, t in last["tasks"]["source"].items() if tid in tids)
    front, sync = used(front_tids), used(sync_tids)
    whole = {name: None if first["procs"].get(name) is None or last["procs"].get(name) is None
             else last["procs"][name] - first["procs"][name] for name in last["procs"]}
    out = {"fio": per_write(whole["fio"]), "front end": per_write(front), "source sync": per_write(sync),
           "session": per_write(whole["source"] - front - sync),
           "replica": per_write(whole["replica"]) if "replica" in whole else None}
    for core, (busy, total) in last["cores"].items():
        busy0, total0 = first["cores"][core]
        out[core] = (busy - busy0) / max(1, total - total0)
    return out


def _pins(snapshot, pids, source_cpu, replica_cpu):
    """{process: (sorted allowed CPU lists of its threads, sorted CPUs they last ran on, thread
    count)}; with pinning, fails unless every thread of each process is confined as asked."""
    out = {}
    for name in pids:
        tasks = snapshot["tasks"][name].values()
        out[name] = (sorted({t["allowed"] for t in tasks}), sorted({t["psr"] for t in tasks}), len(tasks))
        want = replica_cpu if name == "replica" else source_cpu
        if want is not None and out[name][0] != [str(want)]:
            raise RuntimeError(f"{name} (pid {pids[name]}) is not confined to CPU {want}: "
                               f"its threads may run on {out[name][0]}")
    return out


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


def _sample(server, fio, seconds, timeout, replicated, reports, pids):
    """Poll status every 0.1 s until fio exits (bounded by timeout), in runs not replicating too
    (what it costs the source is then the same); with ``reports``, the newest report once per
    cycle. CPU snapshots: the first 1 s into fio's run (its connection made), the last while
    fio still writes."""
    samples, kept, durable = [], {}, set()
    window = [None, None]
    started = time.monotonic()
    while fio.poll() is None and time.monotonic() - started < timeout:
        status = _ask(server, {"cmd": "status"})
        if replicated and status["lag"] is not None:
            samples.append((time.monotonic() - started, status["lag"]))
        if status.get("dirty_log"):
            durable.add(status["dirty_log"]["durable_cycle"])
        if reports and status["cycle"] - 1 not in kept:
            report = _ask(server, {"cmd": "report"})
            if report["cycle"] is not None:
                kept.setdefault(report["cycle"], report["exports"][""])
        elapsed = time.monotonic() - started
        if 1 <= elapsed <= seconds - 0.5:
            snapshot = _snapshot(pids)
            window = [window[0] or snapshot, snapshot]
        time.sleep(0.1)
    if window[0] is window[1]:
        raise RuntimeError(f"fio ran too short to measure CPU: {seconds} s")
    return {"lag": samples, "reports": kept, "window": window, "source_syncs": max(0, len(durable) - 1)}


def _serve(procs, work, src, rsock, cycle, dirty_region=None, cpu=None):
    tag = os.path.basename(rsock).split(".")[0] if rsock else "unreplicated"
    sock, ctl = os.path.join(work, f"s-{tag}.sock"), os.path.join(work, f"c-{tag}.sock")
    replica = ["--replica", f"nbd+unix:///?socket={rsock}"] if rsock else []
    dirty = [] if dirty_region is None else ["--dirty-region", dirty_region]
    proc = procs.start(nbdrep_cmd("serve", "--source", src, "--socket", sock, "--control", ctl,
                                  "--state", os.path.join(work, "state"), "--cycle", cycle, *replica, *dirty),
                       wait_for=ctl, stdout=subprocess.DEVNULL, preexec_fn=pinned(cpu))
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


def print_tables(groups, cycles, runs, bases, steps, step_cycle):
    cycle, run = next((c, r) for (_, c), rs in runs.items() for r in rs if r["reports"])
    done = {c["cycle"]: c for c in run["status"]["cycles"]}
    seen = [c for c in sorted(run["reports"]) if c in done and done[c]["writes"]]
    written = sum(done[c]["bytes_written"] for c in seen)
    copied = sum(sum(n for _, n in run["reports"][c]["data"]) for c in seen)
    bitmap = sum(bitmap_bytes(run["reports"][c]["data"] + run["reports"][c]["zero"]) for c in seen)
    print(f"\nBytes sent for the same writes ({len(seen)} cycles of {cycle:g} s, fio 4k zipf randwrite, "
          f"{run['iops']:.0f} IOPS)")
    print(format_table(("copier", "MiB sent", "vs nbdrep"), [
        ("nbdrep (merged report)", f"{copied / 2**20:.1f}", "1.00x"),
        ("log shipping (every write)", f"{written / 2**20:.1f}", f"{written / copied:.2f}x"),
        ("64 KiB dirty bitmap", f"{bitmap / 2**20:.1f}", f"{bitmap / copied:.2f}x")]))

    everything = [r for rs in runs.values() for r in rs] + [r for rs in bases.values() for r in rs]
    loads = [r["load"] for r in everything]
    print("\nAchieved RPO (lag) under sustained fio 4k randwrite; IOPS against not replicating, each "
          f"run against its setup's runs before and after its round (load average {min(loads):.1f}-"
          f"{max(loads):.1f})")
    rows = []
    for base, setups in groups:
        rows.append((base.label, "not replicating", "", "", "", "", "", "", "", ", ".join(
            str(round(r["iops"])) for r in bases[base]), "", ""))
        for setup, c in itertools.product(setups, cycles):
            rounds = runs[setup, c]
            lags = [lag for r in rounds for _, lag in r["lag"]]
            spans = [x["commit_time"] - x["rp_time"] for r in rounds for x in r["status"]["cycles"]
                     if x["state"] == "committed" and x["commit_time"] and x["writes"]]
            # The longest wait from one RP to the next: a worker held up between cycles.
            gaps = [b["rp_time"] - a["rp_time"] for r in rounds for a, b in
                    zip(sorted(r["status"]["cycles"], key=lambda x: x["cycle"]),
                        sorted(r["status"]["cycles"], key=lambda x: x["cycle"])[1:]) if b["writes"]]
            rows.append((setup.label, f"{c:g} s", str(len(lags)), f"{percentile(lags, 50):.2f}",
                         f"{percentile(lags, 99):.2f}", f"{max(lags, default=float('nan')):.2f}",
                         f"{percentile(spans, 50):.3f}", f"{percentile(spans, 99):.3f}",
                         f"{max(gaps, default=float('nan')):.2f}",
                         f"{statistics.median(r['iops'] for r in rounds):.0f}",
                         _median_range([r["iops"] / r["base"] for r in rounds]),
                         str(round(statistics.median(r["source_syncs"] for r in rounds)))))
    print(format_table(("setup", "cycle", "samples", "lag p50 (s)", "lag p99 (s)", "max (s)",
                        "RP->commit p50 (s)", "p99 (s)", "RP to RP max (s)", "IOPS", "vs not replicating",
                        "source syncs"), rows))

    off = [s for _, setups in groups for s in setups if s.dirty_region == "0"]
    for setup in off:   # the dirty-region log's share: the same pinned fio with the log on and off
        on = next(s for s in next(ss for _, ss in groups if setup in ss) if s.dirty_region is None)
        print(f"\nThe dirty-region log's share ({on.label} with the log on against {setup.label}, "
              "same rounds)")
        print(format_table(("cycle", "IOPS log on", "IOPS log off", "on / off"), [
            (f"{c:g} s", f"{statistics.median(r['iops'] for r in runs[on, c]):.0f}",
             f"{statistics.median(r['iops'] for r in runs[setup, c]):.0f}",
             _median_range([a["iops"] / b["iops"] for a, b in zip(runs[on, c], runs[setup, c])]))
            for c in cycles]))

    print("\nCPU per write (microseconds, median over the rounds; of the source's nbdkit, front end: the threads "
          "of fio's connection; source sync: the dirty-region log's; session: the rest, with the copier) and how "
          "busy each core was")
    cores = sorted(k for k in everything[0]["cpu"] if k.startswith("cpu"))
    rows = []
    for base, setups in groups:
        for setup, c in [(base, None)] + list(itertools.product(setups, cycles)):
            rounds = bases[base] if c is None else runs[setup, c]

            def med(key):
                values = [r["cpu"][key] for r in rounds if r["cpu"][key] is not None]
                return statistics.median(values) if values else None
            rows.append((setup.label, "not replicating" if c is None else f"{c:g} s",
                         *(f"{med(k):.2f}" if med(k) is not None else "-"
                           for k in ("fio", "front end", "session", "source sync", "replica")),
                         *(f"{med(k):.0%}" for k in cores)))
    print(format_table(("setup", "cycle", "fio", "front end", "session", "source sync", "replica", *cores),
                       rows))
    pinned = [r for (setup, _), rs in runs.items() if setup.pin for r in rs] + \
        [r for setup, rs in bases.items() if setup.pin for r in rs]
    if pinned:
        pins = collections.defaultdict(set)
        for r in pinned:
            for name, (allowed, ran, count) in r["pins"].items():
                pins[name, tuple(allowed)].update(ran)
        print("Pinning, checked in every pinned run (allowed CPUs of every thread; CPUs they "
              "last ran on): " + "; ".join(f"{name} {','.join(allowed)} (ran on {sorted(ran)})"
                                           for (name, allowed), ran in sorted(pins.items())))

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


def _median_range(ratios):
    ratios = sorted(ratios)
    spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


STEP_NAMES = {"Arm": "arm the keep-aside", "CloseCycle": "RP and drain", "BuildReport": "report",
              "Copy": "copy", "Flush": "flush the replica", "Commit": "commit (with the record)",
              "_save_record": "  of which the record (its hand-off, where written behind)",
              "Publish": "publish the report",
              "Release": "release the keep-aside"}


def plot_lag(groups, cycles, runs, path):
    """One row of panels per setup replicating, one panel per cycle length, all on one lag
    scale: each round's lag over its fio run, the p99 of all rounds, the goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path), exist_ok=True)
    setups = [s for _, ss in groups for s in ss]
    fig, axes = plt.subplots(len(setups), len(cycles), sharey=True, squeeze=False,
                             figsize=(3.6 * len(cycles), 0.4 + 3 * len(setups)))
    for row, setup in zip(axes, setups):
        for ax, cycle in zip(row, cycles):
            rounds = runs[setup, cycle]
            lags = [lag for r in rounds for _, lag in r["lag"]]
            for i, run in enumerate(rounds):
                ax.plot([t for t, _ in run["lag"]], [lag for _, lag in run["lag"]], lw=0.8,
                        label=f"round {i + 1}" if len(rounds) > 1 else None)
            ax.axhline(percentile(lags, 99), color="black", ls=":", lw=0.8,
                       label=f"p99 {percentile(lags, 99):.2f} s")
            ax.axhline(1.0, color="red", ls="--", lw=0.8, label="goal: p99 ≤ 1 s")
            ax.set_title(f"{cycle:g} s cycles" if len(setups) == 1 else f"{setup.label}, {cycle:g} s cycles",
                         fontsize=9)
            ax.set_xlabel("seconds into the fio run")
            ax.legend(loc="upper right", fontsize=7)
        row[0].set_ylabel("lag (s)")
    fig.suptitle("nbdrep achieved RPO under 4k random writes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
