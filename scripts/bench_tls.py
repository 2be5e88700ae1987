#!/usr/bin/env python3
"""TLS benchmark: the copier's throughput to a replica over a plain link and over TLS (PSK).

    .venv/bin/python scripts/bench_tls.py [--dir /var/tmp] [--size 1G] [--rounds 3]

nbdrep's initial sync of a --size image of random data to `nbdkit file`, from RP to commit (the
replica's flush included), over a unix socket: once as ``nbd+unix://`` and once as
``nbds+unix://alice@/?tls-psk-file=...`` to an nbdkit started with ``--tls=require`` and the same
key, and once more so with ChaCha20-Poly1305 disabled for both ends through a gnutls system
priority file (GNUTLS_SYSTEM_PRIORITY_FILE; /etc/gnutls/config by default): gnutls negotiated it
here although the CPU has AES-NI, and perf showed 64% of nbdcopy's time over TLS in nettle's
ChaCha20 and Poly1305. Each run has a fresh state directory (so it is an initial sync); the
replica image is overwritten in place first (see bench_replication._overwrite). Alternated
--rounds times; prints MB/s side by side.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from bench_replication import _overwrite  # noqa: E402
from benchlib import format_table  # noqa: E402
from procs import Procs, nbdrep_cmd  # noqa: E402

from nbd_plugin import control  # noqa: E402
from nbd_plugin.params import parse_size  # noqa: E402

KINDS = ("plain (nbd+unix://)", "TLS, PSK (nbds+unix://)", "TLS, PSK, ChaCha20 disabled")
NO_CHACHA = "[overrides]\ntls-disabled-cipher = CHACHA20-POLY1305\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default: %(default)s)")
    ap.add_argument("--size", default="1G", help="image size (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each kind (default: %(default)s)")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    results = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbdrep-bench-tls-") as work:
        src, dst, psk = (os.path.join(work, name) for name in ("src.img", "dst.img", "keys.psk"))
        with open(src, "wb") as f:
            for done in range(0, size, 1 << 20):
                f.write(os.urandom(min(1 << 20, size - done)))
        with open(psk, "w") as f:
            f.write(f"alice:{os.urandom(32).hex()}\n")
        no_chacha = os.path.join(work, "gnutls.conf")
        with open(no_chacha, "w") as f:
            f.write(NO_CHACHA)
        environments = (None, None, {**os.environ, "GNUTLS_SYSTEM_PRIORITY_FILE": no_chacha})
        for i in range(args.rounds):
            for k, (kind, env) in enumerate(zip(KINDS, environments)):
                print(f"[bench] round {i + 1}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
                _overwrite(dst, size)
                os.sync()  # no writeback of an earlier run's pages during this one
                results[kind].append(_sync_seconds(os.path.join(work, f"run{i}-{k}"), src, dst,
                                                   psk if k else None, env))
                if subprocess.run(["cmp", "-s", src, dst]).returncode:
                    sys.exit(f"bench_tls: the replica differs from the source after {kind}")
    print(f"\nCopier: initial sync of {args.size} of random data to nbdkit file, RP to commit")
    medians = {kind: statistics.median(size / s / 1e6 for s in runs) for kind, runs in results.items()}
    print(format_table(["link", "best MB/s", "median MB/s", "runs s"],
                       [[kind, f"{size / min(runs) / 1e6:,.0f}", f"{medians[kind]:,.0f}",
                         " ".join(f"{s:.2f}" for s in runs)] for kind, runs in results.items()]))
    for kind in KINDS[1:]:
        print(f"{kind} / plain (medians): {medians[kind] / medians[KINDS[0]]:.2f}x")


def _sync_seconds(run, src, dst, psk, env):
    """Serve ``src`` replicating to a fresh nbdkit on ``dst``, both with environment ``env``
    (None: this one); seconds of the initial sync."""
    os.mkdir(run)
    rsock, rpid = os.path.join(run, "r.sock"), os.path.join(run, "r.pid")
    ctl = os.path.join(run, "control.sock")
    tls = [] if psk is None else ["--tls=require", f"--tls-psk={psk}"]
    replica = (f"nbd+unix:///?socket={rsock}" if psk is None
               else f"nbds+unix://alice@/?socket={rsock}&tls-psk-file={psk}")
    with Procs() as procs:
        procs.start(["nbdkit", "-f", "--exit-with-parent", "-U", rsock, "-P", rpid, *tls, "file", dst],
                    wait_for=rpid, env=env)
        procs.start(nbdrep_cmd("serve", "--source", src, "--socket", os.path.join(run, "s.sock"),
                               "--control", ctl, "--state", os.path.join(run, "state"),
                               "--cycle", "3600", "--replica", replica),
                    wait_for=ctl, stdout=subprocess.DEVNULL, env=env)
        control.request(ctl, {"cmd": "rp", "wait": True, "timeout": 3600}, 3700)
        cycle = control.request(ctl, {"cmd": "status"}, 30)["cycles"][0]
    return cycle["commit_time"] - cycle["rp_time"]


if __name__ == "__main__":
    main()
