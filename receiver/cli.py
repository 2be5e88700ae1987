"""The receiver's subcommands: ``nbdrep receive``, ``nbdrep rps``, ``nbdrep restore``.

``receive`` runs nbdkit in the foreground with ``receiver/plugin.py``, as ``serve`` does with
the source's plugin (same command-line builder, environment and socket handling).
"""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from copier.sizes import format_size
from nbd_plugin import cli as base, control
from nbd_plugin.backend import BackendError
from nbd_plugin.params import ParamError
from receiver import config as receiver_config, control as receiver_control, store as stores

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
DEFAULT_STATE = os.path.join(base.default_state_dir(), "receiver")


class ReceiveError(ValueError):
    """A user-facing failure: one line, exit status 2. A ValueError, which ``nbdrep``'s main
    catches even when nbd_plugin.cli runs as ``__main__`` (then its CLIError is another class
    than the one this module sees)."""


def add_parsers(sub):
    """Register receive, rps and restore on the ``nbdrep`` parser's subcommands."""
    p = sub.add_parser("receive", help="serve replica targets that show only committed recovery points")
    p.add_argument("--target", action="append", required=True, metavar="[NAME=]PATH",
                   help="file or block device to receive into; NAME= as the source's export names")
    base.add_listen_arguments(p)
    p.add_argument("--state", default=DEFAULT_STATE, metavar="DIR",
                   help="journals and the commit record (default: %(default)s)")
    p.add_argument("--control", metavar="PATH", help="control socket (default: STATE/control.sock)")
    p.add_argument("--keep", default=receiver_config.DEFAULT_KEEP, metavar="COUNT|DURATION",
                   help="RPs to retain: a count (100) or a duration (90s, 10m, 2h, 30d); older ones "
                        "are folded into the targets (default: %(default)s)")
    p.add_argument("--journal-max", default=receiver_config.DEFAULT_JOURNAL_MAX, metavar="SIZE",
                   help="bytes the retained RPs' journals may hold; past it the oldest are folded "
                        "early and the copier waits for that (default: %(default)s)")
    p.add_argument("--threads", type=int, default=base.DEFAULT_THREADS,
                   help="nbdkit worker threads (default: %(default)s)")
    base.add_tls_arguments(p)
    p.add_argument("--verbose", action="store_true", help="nbdkit -v")
    # What serve's nbdkit_command reads that receive does not offer.
    p.set_defaults(func=_receive, readonly=False)

    p = sub.add_parser("rps", help="list a receiver's retained recovery points (a stopped "
                                   "receiver's from its state directory)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.add_argument("--group", action="append", default=[], metavar="CONTROL|DIR",
                   help="another receiver of the consistency group (repeat), by its control socket "
                        "or, running or not, its state directory: show the newest RP every one of "
                        "them holds")
    _where(p)
    p.set_defaults(func=_rps)

    p = sub.add_parser("restore", help="write a retained recovery point into a file or device")
    p.add_argument("--to", type=int, required=True, metavar="CYCLE", help="the RP's cycle (see nbdrep rps)")
    p.add_argument("--export", default="", metavar="NAME", help="which target (default: the unnamed one)")
    p.add_argument("--target", action="append", default=[], metavar="[NAME=]PATH",
                   help="with no receiver running: the targets, as given to receive")
    p.add_argument("output", metavar="OUTPUT", help="file or block device to write the RP into")
    _where(p)
    p.set_defaults(func=_restore)

    p = sub.add_parser("promote", help="make a receiver's targets a retained RP, for real use; "
                                       "they receive no more")
    p.add_argument("--to", type=int, required=True, metavar="CYCLE", help="the RP's cycle (see nbdrep rps)")
    p.add_argument("--target", action="append", default=[], metavar="[NAME=]PATH",
                   help="with no receiver running: the targets, as given to receive")
    _where(p)
    p.set_defaults(func=_promote)


def _where(p):
    # None, not the default itself: rps tells a --state given from one left out.
    p.add_argument("--state", metavar="DIR",
                   help=f"the receiver's state directory (default: {DEFAULT_STATE})")
    p.add_argument("--control", metavar="PATH", help="its control socket (default: STATE/control.sock)")


def _state(args):
    return args.state or DEFAULT_STATE


def _control(args):
    return args.control or _state_control(_state(args))


def _state_control(state):
    return os.path.join(state, "control.sock")


def _running(control_path):
    """Whether a receiver answers at ``control_path``."""
    return os.path.exists(control_path) and base._answers(socket.AF_UNIX, control_path)


def receive_config(args):
    params = [("target", t) for t in args.target]
    params += [("state", args.state), ("control", _control(args)), ("keep", args.keep),
               ("journal-max", args.journal_max)]
    cfg = receiver_config.Config()
    try:
        for key, value in params:
            cfg.add(key, value)
        cfg.complete()
    except ParamError as e:
        raise ReceiveError(str(e)) from None
    return cfg, params


def _refusal(e):
    """The one-line error for a target or state directory that cannot be used. The back
    end's words are a source's; here it is a target."""
    text = str(e)
    return ReceiveError(text.replace("source", "target", 1) if isinstance(e, BackendError) else text)


def preflight(cfg):
    """The plugin's start-up checks, read-only, so a failure is one line and changes nothing."""
    sizes, opened = {}, []
    try:
        for name, path in cfg.targets:
            backend = stores.Backend(path)
            opened.append(backend)
            sizes[name] = backend.size
        record = stores.load(cfg.state, cfg.targets, sizes)
    except (BackendError, stores.StoreError) as e:
        raise _refusal(e) from None
    finally:
        for backend in opened:
            backend.close()
    if record["promoted"] is not None:
        raise ReceiveError(f"the targets in {cfg.state} were promoted at cycle {record['promoted']} "
                            "and receive no more; move the state directory away to receive again")


def _receive(args):
    if args.threads < 1:
        raise ReceiveError("--threads must be at least 1")
    if args.port is not None and not 0 < args.port < 65536:
        raise ReceiveError(f"--port {args.port} is not a TCP port")
    cfg, params = receive_config(args)
    preflight(cfg)
    try:
        for path in ([args.socket] if args.socket else []) + [_control(args)]:
            base._claim_socket(path)
        command = base.nbdkit_command(args, params, plugin=PLUGIN)
    except base.CLIError as e:
        raise ReceiveError(str(e)) from None
    os.makedirs(args.state, exist_ok=True)
    proc = subprocess.Popen(command, env=base.nbdkit_env())
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    if base._wait_listening(proc, args):
        print(_attach_help(args, cfg), flush=True)
    return proc.wait()


def _attach_help(args, cfg):
    if args.socket:
        uri = lambda name: f"nbd+unix:///{name}?socket={args.socket}"  # noqa: E731
    else:
        uri = lambda name: f"nbd://{args.bind}:{args.port}/{name}"  # noqa: E731
    lines = [f"nbdrep: receiving into {', '.join(args.target)}"]
    lines += [f"  replicate to it:  --replica {name + '=' if name else ''}'{uri(name)}'"
              for name, _ in cfg.targets]
    lines += [f"  a recovery point: {uri((cfg.targets[0][0]) + '@CYCLE')}   (read-only; see nbdrep rps)",
              f"  control: nbdrep rps --control {_control(args)}"]
    return "\n".join(lines)


def _ask(args, message, timeout=10.0):
    return _ask_at(_control(args), message, timeout)


def _ask_at(path, message, timeout=10.0):
    try:
        reply = control.request(path, message, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ReceiveError(f"no nbdrep receiver at control socket {path}") from None
    except TimeoutError:
        raise ReceiveError(f"control socket {path} did not answer in {timeout:.0f} s") from None
    if "error" in reply:
        raise ReceiveError(reply["error"])
    return reply


def _rps(args):
    # --control alone does not say where its receiver's state is: the default state
    # directory may be another receiver's.
    state = None if args.control and args.state is None else _state(args)
    where, status, offline = _status_of(_control(args), state)
    if args.group:
        return _group(args, [(where, status, offline)] + [_member(path) for path in args.group])
    if offline:   # with --json on stderr: stdout stays the list of RPs a running receiver gives
        print(f"offline: no receiver answers at {offline}; read from "
              f"{os.path.join(where, stores.RECORD)}", file=sys.stderr if args.json else sys.stdout)
    print(json.dumps(status["rps"], indent=2) if args.json else format_rps(status))
    return 0


def _status_of(control_path, state):
    """A receiver's status: asked at ``control_path``, or, with no receiver answering there,
    read from the record in the state directory ``state`` (None: unknown). Returns (where it
    was read, status, None, or the control socket that did not answer if read offline)."""
    if _running(control_path):
        return control_path, _ask_at(control_path, {"cmd": "status"}), None
    if state is None:
        raise ReceiveError(f"no nbdrep receiver at control socket {control_path}; to read a "
                           "stopped one, name its state directory (--state DIR, --group DIR)")
    try:
        return state, receiver_control.stopped_status(state), control_path
    except stores.StoreError as e:
        raise ReceiveError(f"no nbdrep receiver at control socket {control_path}, and {e}") from None


def _member(path):
    """A receiver named by ``--group``: a state directory (asked at its control.sock, else
    read offline) or a control socket."""
    if os.path.isdir(path):
        return _status_of(_state_control(path), path)
    if not (os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode)):
        raise ReceiveError(f"--group {path} is neither a control socket nor a state directory")
    return _status_of(path, None)


def _group(args, members):
    """``rps --group``: each receiver's newest committed and prepared cycles, and the group's
    newest common RP; ``members`` [(where, status, offline)], as ``_status_of`` returns.
    Exit status 1 if the receivers hold none in common."""
    common = receiver_control.group_rp([s for _, s, _ in members])
    if args.json:
        print(json.dumps({"group_rp": common, "receivers": {
            where: {"session_id": s["session_id"], "committed_cycle": s["committed_cycle"],
                    "prepared": [p["cycle"] for p in s["prepared"]], "offline": offline is not None}
            for where, s, offline in members}}, indent=2))
        return 0 if common is not None else 1
    for where, s, offline in members:
        prepared = ",".join(str(p["cycle"]) for p in s["prepared"]) or "-"
        print(f"{where}: session {s['session_id'] or '-'}, committed {s['committed_cycle'] or '-'}, "
              f"prepared {prepared}" + (f"   (offline: no receiver at {offline}; read from its record)"
                                        if offline else ""))
    if common is None:
        print("no RP is held by every receiver (another session, or folded away): the group "
              "cannot be shown at one RP; promote each to its own newest and check the data")
        return 1
    print(f"group RP: {common}; with the source lost, run nbdrep promote --to {common} on each "
          "receiver (restore --to, or an export NAME@CYCLE, tests it first)")
    return 0


def format_rps(status):
    lag = "-" if status["lag"] is None else f"{status['lag']:.2f} s"
    bound = "" if status["journal_max"] is None else f" of {format_size(status['journal_max'])}"
    head = [f"committed: {status['committed_cycle'] or '-'}   lag: {lag}   base: "
            f"{status['base_cycle'] or '-'}   journals: {format_size(status['journal_bytes'])}{bound}"
            + ("   (throttled)" if status["throttled"] else "")]
    rows = [("cycle", "rp_time", "commit_time", "bytes", "exports")]
    for rp in status["rps"]:
        rows.append((str(rp["cycle"]), _clock(rp["rp_time"]), _clock(rp["commit_time"]),
                     format_size(rp["bytes"]), ",".join(n or "(default)" for n in rp["exports"]) or "-"))
    if status["prepared"]:   # the group's source decides; see nbdrep rps --group
        head.append("prepared, not shown: " + ", ".join(str(p["cycle"]) for p in status["prepared"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(head + [""] + ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows])


def _clock(t):
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _restore(args):
    output = os.path.abspath(args.output)
    _run(args, {"cmd": "restore", "export": args.export, "cycle": args.to, "output": output},
         lambda store: receiver_control.restore(store, args.export, args.to, output), readonly=True)
    return 0


def _promote(args):
    _run(args, {"cmd": "promote", "cycle": args.to},
         lambda store: receiver_control.promote(store, args.to), readonly=False)
    print(f"nbdrep: the targets are RP {args.to} now; this state directory receives no more")
    return 0


def _run(args, request, offline, readonly):
    """Ask the running receiver; with none running, open the state directory here (its lock
    keeps a receiver from starting meanwhile) and do it with ``offline(store)``."""
    control_path = _control(args)
    if _running(control_path):
        _ask(args, request, timeout=3600)
        return
    cfg = receiver_config.Config()
    try:
        for t in args.target:
            cfg.add("target", t)
        cfg.add("state", _state(args))
        cfg.complete()
    except ParamError as e:
        raise ReceiveError(f"no receiver answers at {control_path}; {e}") from None
    try:
        store = stores.Store(cfg.state, cfg.targets, readonly=readonly)
    except (BackendError, stores.StoreError) as e:
        raise _refusal(e) from None
    try:
        reply = offline(store)
    finally:
        store.close()
    if "error" in reply:
        raise ReceiveError(reply["error"])
