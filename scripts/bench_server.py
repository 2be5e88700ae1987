"""Benchmark the NBD front end: fio against several servers side by side, in interleaved rounds.

Usage: .venv/bin/python scripts/bench_server.py [--seconds S] [--rounds R] [--threads N,...]
                                               [--workloads NAME,...] [--size MIB] [--dir DIR] [--steps]
                                               [--baseline DIR] [--no-stall-check]

Servers, all serving the same image of random data (1 GiB), each started once and kept running:

  C file      nbdkit's C ``file`` plugin: the ceiling for this machine
  minimal     nbdkit's Python plugin doing nothing but ``os.preadv``/``os.pwrite``, ``--threads 1``:
              what a Python plugin can do here at all, the yardstick of issue 11
  untracked   nbdrep ``--tracking off``, default ``--threads``
  tracked     nbdrep tracking (no replica), ``--cycle 1``, default ``--threads``
  tracked tN  the same with ``--threads N``, for each N of ``--threads``
  baseline    with ``--baseline DIR``: ``tracked`` run from another checkout of nbdrep (its cffi
              modules built in place), to compare two versions side by side in one run

Workloads (fio ``--ioengine=nbd``, one job, one connection, S seconds each): 4k random read and
write at queue depth 16, 1 MiB sequential read and write at QD4. The machine is shared and its
speed drifts by tens of percent within a minute, so no ratio is taken across rounds: each round
runs every server once per workload, in an order that rotates from round to round, and a ratio
compares two runs of the same round. The table prints medians over the rounds. CPU per request
is the nbdkit process's user+system time over the requests fio completed.

Then the stall check, on the tracked server and on the C plugin for comparison: a 4k random
reader (QD16) alone, then while a second connection writes 4k blocks each followed by a flush (fio
``--fsync=1``), then alone again. A flush (or a read that misses the page cache) must not stall
the other connections: the reader keeps at least half its IOPS (against the mean of the runs
alone), and its slowest read shows whether any waited for a flush (``--no-stall-check`` skips
it). Progress goes to stderr, the tables to stdout.

``--steps`` prints instead what each step of a 4k request costs in this process, without
nbdkit (timeit, best of five, less the cost of calling an empty lambda): where the plugin's part
of the CPU time per request goes.
"""
import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import timeit

import psutil

from benchlib import fio_report, format_table
from procs import Procs, nbdrep_cmd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nbd_plugin.cli import DEFAULT_THREADS  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
WORKLOADS = {
    "4k randread QD16": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "4k randwrite QD16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "1M seqread QD4": ["--rw=read", "--bs=1M", "--iodepth=4"],
    "1M seqwrite QD4": ["--rw=write", "--bs=1M", "--iodepth=4"],
}
FLUSHING_WRITER = ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]
# Goals of issue 11: nbdrep tracked against the minimal plugin, tracked against untracked
# (4k random write), and the reader's IOPS beside a flushing writer against alone.
GOAL_VS_MINIMAL = 0.85
GOAL_TRACKING = 0.95
GOAL_STALL = 0.5

# The yardstick: nothing a Python plugin could leave out (no short-read loop, no errno mapping).
MINIMAL_PLUGIN = '''\
import os
import nbdkit
API_VERSION = 2
fd = -1
def thread_model(): return nbdkit.THREAD_MODEL_PARALLEL
def config(key, value):
    global fd
    fd = os.open(value, os.O_RDWR)
def open(readonly): return 1
def get_size(h): return os.fstat(fd).st_size
def can_write(h): return True
def can_flush(h): return True
def pread(h, buf, offset, flags): os.preadv(fd, [buf], offset)
def pwrite(h, buf, offset, flags): os.pwrite(fd, buf, offset)
def flush(h, flags): os.fdatasync(fd)
'''


def progress(message):
    print(message, file=sys.stderr, flush=True)


# ---- fio -----------------------------------------------------------------------------------

def fio_command(uri, args, seconds, size):
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", *args, f"--size={size}",
            "--time_based", f"--runtime={seconds}", "--norandommap", "--randrepeat=0",
            "--output-format=json"]


def parse_fio(stdout):
    """(IOPS, MB/s, requests, the slowest request's milliseconds) of fio's JSON report."""
    (job,) = fio_report(stdout)["jobs"]
    if job["error"]:
        raise RuntimeError(f"fio job failed with error {job['error']}")
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    return side["iops"], side["bw_bytes"] / 1e6, side["total_ios"], side["clat_ns"]["max"] / 1e6


def run_fio(uri, args, seconds, size):
    done = subprocess.run(fio_command(uri, args, seconds, size), check=False, capture_output=True,
                          text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"fio exited {done.returncode}: {done.stderr.strip()}")
    return parse_fio(done.stdout)


# ---- servers -------------------------------------------------------------------------------

class Server:
    """One running server: its NBD URI and the nbdkit process that does the work."""

    def __init__(self, name, uri, nbdkit):
        self.name, self.uri, self.nbdkit = name, uri, nbdkit

    def run(self, workload, seconds, size):
        """(IOPS, MB/s, nbdkit CPU microseconds per request) of one fio run."""
        progress(f"  {self.name}: {workload} for {seconds} s")
        before = sum(self.nbdkit.cpu_times()[:2])
        iops, mbps, ios, _ = run_fio(self.uri, WORKLOADS[workload], seconds, size)
        return iops, mbps, (sum(self.nbdkit.cpu_times()[:2]) - before) / max(ios, 1) * 1e6


def server_command(name, image, folder, threads):
    """(argv, socket) of the server called ``name`` living in ``folder`` (``baseline``: run
    from the other checkout's folder, so that ``python -m`` imports that nbdrep)."""
    sock = os.path.join(folder, "nbd.sock")
    nbdkit = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock]
    if name == "C file":
        return [*nbdkit, "file", image], sock
    if name == "minimal":
        plugin = os.path.join(folder, "minimal.py")
        with open(plugin, "w", encoding="utf-8") as f:
            f.write(MINIMAL_PLUGIN)
        return [*nbdkit, "--threads", "1", "python", plugin, f"file={image}"], sock
    tracking = "off" if name == "untracked" else "on"
    return nbdrep_cmd("serve", "--source", image, "--socket", sock, "--state", folder,
                      "--control", os.path.join(folder, "control.sock"), "--tracking", tracking,
                      "--cycle", "1", "--threads", str(threads)), sock


@contextlib.contextmanager
def servers(procs, image, threads, baseline=None):
    """Start every server; yields {name: Server}."""
    names = {"C file": 0, "minimal": 1, "untracked": DEFAULT_THREADS, "tracked": DEFAULT_THREADS}
    names.update({f"tracked t{n}": n for n in threads if n != DEFAULT_THREADS})
    if baseline:
        names["baseline"] = DEFAULT_THREADS
    with contextlib.ExitStack() as stack:
        running = {}
        for name, n in names.items():
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="nbdrep-bench-"))
            cmd, sock = server_command(name, image, folder, n)
            proc = procs.start(cmd, wait_for=sock, stdout=subprocess.DEVNULL,
                               cwd=baseline if name == "baseline" else None)
            stack.callback(procs.stop, proc)
            nbdkit = psutil.Process(proc.pid)
            if cmd[0] != "nbdkit":   # nbdrep serve runs nbdkit as its child
                nbdkit = nbdkit.children()[0]
            running[name] = Server(name, f"nbd+unix:///?socket={sock}", nbdkit)
        yield running


def fill_image(path, size):
    """Write ``size`` bytes of data (a random MiB repeated) so that reads hit real blocks."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(size // MiB))
        os.fsync(f.fileno())


# ---- measuring -----------------------------------------------------------------------------

def rounds_of(running, workloads, rounds, seconds, size):
    """{workload: {server: [(IOPS, MB/s, CPU us) per round]}}, server order rotating per round."""
    names = list(running)
    results = {w: {n: [] for n in names} for w in workloads}
    for r in range(rounds):
        progress(f"round {r + 1} of {rounds}")
        order = names[r % len(names):] + names[:r % len(names)]
        for w in workloads:
            for name in order:
                results[w][name].append(running[name].run(w, seconds, size))
    return results


def stall_check(server, seconds, size):
    """Reader alone, beside a flushing writer, alone again: [(IOPS, slowest read ms)] of the
    three reader runs and (IOPS, slowest write+flush ms) of the writer."""
    progress(f"  {server.name}: stall check, a reader alone, beside a flushing writer, alone")
    reader = WORKLOADS["4k randread QD16"]
    alone = run_fio(server.uri, reader, seconds, size)
    # The writer starts first and runs two seconds longer, so it overlaps the whole reader run.
    writer = subprocess.Popen(fio_command(server.uri, FLUSHING_WRITER, seconds + 2, size),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        beside = run_fio(server.uri, reader, seconds, size)
        out, err = writer.communicate(timeout=seconds + 120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    if writer.returncode != 0:
        raise RuntimeError(f"the flushing fio exited {writer.returncode}: {err.strip()}")
    again = run_fio(server.uri, reader, seconds, size)
    written = parse_fio(out)
    return [(r[0], r[3]) for r in (alone, beside, again)], (written[0], written[3])


def request_steps(image, calls=100_000):
    """[(step, microseconds per call)] of the parts of a 4k request, in this process."""
    from copier.keepaside import KeepAside
    from nbd_plugin._io import ffi as io_ffi
    from nbd_plugin._io.lib import keep_thread_state, wp_pwrite
    from nbd_plugin.backend import Backend
    from replication.driver import WriteHook
    from tracker import KIND_DATA, Tracker

    backend = Backend(image)
    hook = WriteHook(Tracker(), KeepAside({0: backend}))
    buf, block, offset = bytearray(4096), bytes(4096), 4096 * 1000
    os.pread(backend.fd, 4096, offset)   # in the page cache

    def request(*args):   # the shape of the plugin's _request wrapper around a callback
        keep_thread_state()
        try:
            return None
        except OSError:
            raise

    def tracked_write():
        cycle = hook.begin(0, offset, 4096)
        backend.pwrite(block, offset)
        hook.end(cycle, 0, KIND_DATA, offset, 4096)

    steps = [
        ("os.preadv 4k, page-cache hit (the minimal plugin's read)",
         lambda: os.preadv(backend.fd, [buf], offset)),
        ("Backend.pread 4k, page-cache hit (C, keeps the GIL)", lambda: backend.pread(buf, offset)),
        ("os.pwrite 4k (the minimal plugin's write)", lambda: os.pwrite(backend.fd, block, offset)),
        ("Backend.pwrite 4k (C, without the GIL)", lambda: backend.pwrite(block, offset)),
        ("WriteHook.begin + end (tracker, keep-aside check)",
         lambda: hook.end(hook.begin(0, offset, 4096), 0, KIND_DATA, offset, 4096)),
        ("a tracked 4k write: begin, Backend.pwrite, end", tracked_write),
        ("a tracked 4k write in one C call (wp_pwrite, as the plugin does)",
         lambda: wp_pwrite(hook.parts, backend.fd, 0, KIND_DATA, io_ffi.from_buffer(block), 4096, offset)),
        ("the plugin's per-request wrapper (keep_thread_state, try)", lambda: request(None, buf, offset, 0)),
    ]
    try:
        empty = min(timeit.repeat(lambda: None, number=calls, repeat=5)) / calls
        return [(name, (min(timeit.repeat(step, number=calls, repeat=5)) / calls - empty) * 1e6)
                for name, step in steps]
    finally:
        backend.close()


# ---- tables --------------------------------------------------------------------------------

def median_ratio(runs, base, i=0):
    return statistics.median(a[i] / b[i] for a, b in zip(runs, base))


def main_table(results):
    rows = []
    for w, by_server in results.items():
        for name, runs in by_server.items():
            rows.append([w, name, f"{statistics.median(r[0] for r in runs):,.0f}",
                         f"{statistics.median(r[1] for r in runs):,.0f}",
                         f"{statistics.median(r[2] for r in runs):.1f}",
                         f"{median_ratio(runs, by_server['minimal']):.2f}",
                         f"{median_ratio(runs, by_server['C file']):.2f}",
                         " ".join(f"{r[0]:.0f}" for r in runs)])
    return format_table(["workload", "server", "IOPS", "MB/s", "CPU us/req", "vs minimal", "vs C",
                         "IOPS per round"], rows)


def goals(results, stalls):
    lines = []

    def verdict(what, ratio, goal):
        judged = "for comparison" if goal is None else \
            f"{'meets' if ratio >= goal else 'misses'} the goal of {goal}"
        lines.append(f"{what}: {ratio:.2f} ({judged})")

    for w in ("4k randread QD16", "4k randwrite QD16"):
        if w in results:
            verdict(f"{w}, tracked / minimal", median_ratio(results[w]["tracked"], results[w]["minimal"]),
                    GOAL_VS_MINIMAL)
    for w, by_server in results.items():
        verdict(f"{w}, tracked / untracked", median_ratio(by_server["tracked"], by_server["untracked"]),
                GOAL_TRACKING)
        if "baseline" in by_server:
            verdict(f"{w}, baseline / untracked", median_ratio(by_server["baseline"], by_server["untracked"]),
                    None)
            verdict(f"{w}, tracked / baseline", median_ratio(by_server["tracked"], by_server["baseline"]),
                    None)
    for name, checks in stalls.items():
        for (alone, beside, again), writer in checks:
            verdict(f"{name}: reader beside a flushing writer ({writer[0]:,.0f} write+flush/s, slowest "
                    f"{writer[1]:.1f} ms) / alone: {beside[0]:,.0f} / {alone[0]:,.0f} and {again[0]:,.0f} "
                    f"IOPS, slowest read {beside[1]:.1f} ms / {max(alone[1], again[1]):.1f} ms",
                    beside[0] / statistics.mean([alone[0], again[0]]),
                    GOAL_STALL if name == "tracked" else None)
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="run time of each fio run (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", default="",
                        help="comma-separated --threads values to add as 'tracked tN' servers")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    parser.add_argument("--size", type=int, default=1024, help="image size in MiB (default: 1024)")
    parser.add_argument("--dir", default="/var/tmp", help="where the image goes (default: /var/tmp)")
    parser.add_argument("--steps", action="store_true",
                        help="time the steps of a 4k request in this process instead")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run 'baseline': nbdrep tracking from the checkout in DIR")
    parser.add_argument("--no-stall-check", action="store_true", help="skip the stall check")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1 or args.size < 1:
        parser.error("--seconds, --rounds and --size must be at least 1")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        parser.error(f"unknown workload {unknown[0] if unknown else '(none given)'!r}")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads must be comma-separated numbers, not {args.threads!r}")
    if any(t < 1 for t in threads):
        parser.error("--threads values must be at least 1")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "nbd_plugin", "cli.py")):
        parser.error(f"--baseline {args.baseline}: not a checkout of nbdrep (no nbd_plugin/cli.py)")
    fd, image = tempfile.mkstemp(prefix="nbdrep-bench-", suffix=".img", dir=args.dir)
    os.close(fd)
    size = args.size * MiB
    try:
        progress(f"filling {image} ({args.size} MiB)")
        fill_image(image, size)
        if args.steps:
            print(format_table(["step of a 4k request, in this process", "us per call"],
                               [[name, f"{us:.2f}"] for name, us in request_steps(image)]))
            return 0
        with Procs() as procs, servers(procs, image, threads, args.baseline) as running:
            results = rounds_of(running, workloads, args.rounds, args.seconds, size)
            stalls = {name: [] for name in ("C file", "tracked")}
            for _ in range(0 if args.no_stall_check else args.rounds):
                for name, checks in stalls.items():
                    checks.append(stall_check(running[name], args.seconds, size))
    finally:
        os.unlink(image)
    print(main_table(results))
    print()
    print(goals(results, stalls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
