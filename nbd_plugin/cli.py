"""The ``nbdrep`` command: serve, rp, status, report, verify.

``serve`` runs nbdkit in the foreground with this package's plugin. nbdkit embeds Debian's
``/usr/bin/python3``, which knows nothing of our venv, so the CLI hands it the package root
and the venv's sys.path through PYTHONPATH.
"""
import argparse
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import nbd_plugin
from copier import verify
from copier.sizes import format_size

# The server's modules (control and its Prometheus exporter, startup, params, the record,
# systemd) are imported in the functions that use them: at the top they took 0.09 s of CPU
# before every command, a tenth of what `nbdrep verify` of 1 GiB costs in all.

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(nbd_plugin.__file__)), "plugin.py")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(PLUGIN))
START_TIMEOUT = 60.0
RELAY_TIMEOUT = 10.0
PSK_LINE = re.compile(r"[^:\s]+:(?:[0-9A-Fa-f]{2})+")
# nbdkit worker threads per connection. Since the workers keep their Python thread states
# (nbd_plugin/_build.py), 4k random reads measured 26k IOPS at 1 thread, 51k at 2, 44k at 4 and
# 37k at 16 (scripts/bench_server.py, medians of three interleaved rounds): two serve a cached
# read while the other waits for a flush or the disk, and more add GIL hand-offs.
DEFAULT_THREADS = 2


def default_state_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "nbdrep")


# The exit status of a command whose reader went away (``nbdrep status | head -3``): what a
# shell reports for ``cat`` killed by SIGPIPE there (128 + 13).
EXIT_PIPE = 128 + signal.SIGPIPE


def main(argv=None):
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        return args.func(args)
    except BrokenPipeError:
        # Quietly, as cat does; stdout goes to /dev/null so that Python's flush at exit does
        # not complain about the pipe once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:
        # Ctrl-C in a client command (rp --wait) or before nbdkit starts: the user knows why.
        return 128 + signal.SIGINT
    except (CLIError, *_user_errors()) as e:   # evaluated only once something was raised
        print(f"nbdrep: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Any other refusal of the system (a file we may not read, a directory we may not
        # write) is the user's to fix: one line naming the file, never a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"nbdrep: {where}{e.strerror or e}", file=sys.stderr)
        return 2


class CLIError(Exception):
    """A user-facing failure with a clear message."""


def _user_errors():
    from nbd_plugin import startup
    return startup.ERRORS


def build_parser(command=None):
    """The ``nbdrep`` parser. Given the ``command`` about to run, one of this module's own,
    the receiver's subcommands are left out: receiver.cli imports numpy, and with it every
    command took 0.2 s of CPU to start (`nbdrep verify` of 1 GiB takes under a second)."""
    parser = argparse.ArgumentParser(prog="nbdrep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_rp(sub)
    _add_status(sub)
    _add_report(sub)
    if command not in OWN_COMMANDS:
        from receiver.cli import add_parsers   # receiver.cli builds on this module
        add_parsers(sub)
        from nbd_plugin import plot   # as does plot
        plot.add_parser(sub)
    _add_verify(sub)
    return parser


OWN_COMMANDS = ("serve", "rp", "status", "report", "verify")


class _Version(argparse.Action):
    """--version, reading the installed version only when asked (importlib.metadata takes
    25 ms to import)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib.metadata
        print(f"nbdrep {importlib.metadata.version('nbdrep')}")
        parser.exit()


def _control_arg(p):
    p.add_argument("--control", default=os.path.join(default_state_dir(), "control.sock"),
                   help="the server's control socket (default: %(default)s)")


def _add_serve(sub):
    p = sub.add_parser("serve", help="serve sources over NBD, tracking and replicating writes")
    p.add_argument("--source", action="append", required=True, metavar="[NAME=]PATH",
                   help="file or block device to serve; repeat with NAME= for named exports")
    add_listen_arguments(p)
    p.add_argument("--replica", action="append", default=[], metavar="[NAME=]URI",
                   help="NBD URI of the replica export (nbd://, nbd+unix://); one per source")
    p.add_argument("--cycle", default="1", metavar="SECONDS", help="RP interval (default: %(default)s)")
    p.add_argument("--control", metavar="PATH", help="control socket (default: STATE/control.sock)")
    p.add_argument("--control-group", metavar="GROUP",
                   help="share the control socket with this group (mode 0660; default: 0600, "
                        "this user only)")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics")
    p.add_argument("--state", default=default_state_dir(), metavar="DIR",
                   help="state directory (default: %(default)s)")
    p.add_argument("--tracking", choices=("on", "off"), default="on",
                   help="off serves without tracking, for benchmarks")
    p.add_argument("--readonly", action="store_true", help="serve read-only")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="nbdkit worker threads (default: %(default)s)")
    p.add_argument("--keepaside-mem", default="256M", help="memory for point-in-time copies before spilling")
    p.add_argument("--keepaside-spill", default="1G",
                   help="cap of the spill file in the state directory; past it a cycle is copied "
                        "without its point in time instead of failing writes (default: %(default)s)")
    p.add_argument("--tracker-mem", default="64M", help="memory cap of the tracker's TE arrays")
    p.add_argument("--stop-timeout", default="30", metavar="SECONDS",
                   help="on SIGTERM/SIGINT, time to copy and commit a final RP before recording "
                        "what is outstanding instead (default: %(default)s)")
    p.add_argument("--dirty-region", default="64K", metavar="SIZE",
                   help="region of the dirty-region log, which bounds the resync after a crash "
                        "(default: %(default)s; 0: off, a crash resyncs in full)")
    p.add_argument("--resync", choices=("auto", "full"), default="auto",
                   help="full: copy every source in full at start, whatever the record in the "
                        "state directory says (a block device written while nbdrep was stopped)")
    p.add_argument("--accept-resize", action="store_true",
                   help="serve a source whose size changed since the last run (it is then "
                        "resynced in full) instead of refusing to start")
    add_tls_arguments(p)
    p.add_argument("--pidfile", metavar="FILE",
                   help="write this process's pid here once serving (removed at exit)")
    p.add_argument("--verbose", action="store_true", help="nbdkit -v")
    p.set_defaults(func=_serve)


def add_listen_arguments(p):
    """Where nbdkit listens: --socket PATH, or --port N [--bind ADDR] (serve and receive)."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on this unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on this TCP port")
    p.add_argument("--bind", default="127.0.0.1", help="TCP address with --port (default: %(default)s)")


def add_tls_arguments(p):
    """nbdkit's TLS options, for ``serve`` and ``receive`` alike (see ``tls_options``)."""
    tls = p.add_argument_group("TLS (nbdkit's own; clients connect with nbds:// URIs)")
    tls.add_argument("--tls", choices=("off", "on", "require"),
                     help="off: plain only; on: TLS offered; require: plain clients refused "
                          "(default: require when --tls-psk or --tls-certificates is given, else off)")
    tls.add_argument("--tls-psk", metavar="FILE",
                     help="pre-shared keys, one USERNAME:HEXKEY a line (psktool -p FILE -u USER)")
    tls.add_argument("--tls-certificates", metavar="DIR",
                     help="X.509: DIR holds ca-cert.pem, server-cert.pem and server-key.pem")
    tls.add_argument("--tls-verify-peer", action="store_true",
                     help="with --tls-certificates: clients must present a certificate the CA signed")


def _add_rp(sub):
    p = sub.add_parser("rp", help="take a recovery point now")
    p.add_argument("--wait", action="store_true", help="return when the cycle is committed")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default: %(default)s)")
    _control_arg(p)
    p.set_defaults(func=_rp)


def _add_status(sub):
    p = sub.add_parser("status", help="show the replication session")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    _control_arg(p)
    p.set_defaults(func=_status)


def _add_report(sub):
    p = sub.add_parser("report", help="print the extents of the newest report, as JSON")
    _control_arg(p)
    p.set_defaults(func=_report)


def _add_verify(sub):
    p = sub.add_parser("verify", help="compare two NBD exports", description=verify.DESCRIPTION)
    verify.add_arguments(p)
    p.set_defaults(func=verify.run)


# -- serve ------------------------------------------------------------------------------------

def serve_config(args):
    """The plugin's key=value parameters for ``args``, checked exactly as the plugin checks them."""
    params = [("source", s) for s in args.source] + [("replica", r) for r in args.replica]
    params += [("cycle", str(args.cycle)), ("tracking", args.tracking), ("state", args.state),
               ("control", control_path(args)), ("readonly", "on" if args.readonly else "off"),
               ("keepaside-mem", args.keepaside_mem), ("keepaside-spill", args.keepaside_spill),
               ("tracker-mem", args.tracker_mem), ("stop-timeout", args.stop_timeout),
               ("dirty-region", args.dirty_region),
               ("resync", args.resync), ("accept-resize", "on" if args.accept_resize else "off")]
    params += [(key, value) for key, value in (("control-group", args.control_group),
                                               ("metrics", args.metrics)) if value is not None]
    from nbd_plugin.params import Config
    cfg = Config()
    for key, value in params:
        cfg.add(key, value)
    cfg.complete()
    return cfg, params


def preflight(cfg):
    """The plugin's start-up checks, run here first so a failure is one clean line."""
    from nbd_plugin import startup
    backends = startup.open_sources(cfg)
    try:
        startup.check(cfg, backends)
    finally:
        for backend in backends.values():
            backend.close()


def control_path(args):
    """The control socket: --control, else one per state directory, where rp/status look."""
    return args.control or os.path.join(args.state, "control.sock")


def nbdkit_command(args, params, plugin=PLUGIN):
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", "--threads", str(args.threads)]
    if args.verbose:
        cmd.append("--verbose")
    if args.readonly:
        cmd.append("--readonly")
    if args.socket:
        cmd += ["--unix", args.socket]
    else:
        cmd += ["--ipaddr", args.bind, "--port", str(args.port)]
    return cmd + tls_options(args) + ["python", plugin] + [f"{k}={v}" for k, v in params]


CERTIFICATE_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def tls_options(args):
    """nbdkit's TLS options for ``args``; CLIError, naming the option, for a combination
    nbdkit would refuse or a key file or certificate directory it could not read."""
    mode = args.tls or ("require" if args.tls_psk or args.tls_certificates else "off")
    if mode == "off":
        if args.tls_verify_peer and not args.tls:
            raise CLIError("--tls-verify-peer needs --tls-certificates (a PSK already proves the client)")
        if args.tls_psk or args.tls_certificates or args.tls_verify_peer:
            raise CLIError("--tls off contradicts --tls-psk, --tls-certificates and --tls-verify-peer")
        return []
    if bool(args.tls_psk) == bool(args.tls_certificates):
        raise CLIError(f"--tls {mode} needs exactly one of --tls-psk FILE and --tls-certificates DIR")
    if args.tls_verify_peer and not args.tls_certificates:
        raise CLIError("--tls-verify-peer needs --tls-certificates (a PSK already proves the client)")
    options = [f"--tls={mode}"]
    if args.tls_psk:
        _check_psk_file(args.tls_psk)
        options.append(f"--tls-psk={os.path.abspath(args.tls_psk)}")
    else:
        missing = [f for f in CERTIFICATE_FILES
                   if not os.access(os.path.join(args.tls_certificates, f), os.R_OK)]
        if missing:
            raise CLIError(f"--tls-certificates {args.tls_certificates}: cannot read "
                           f"{', '.join(missing)}")
        options.append(f"--tls-certificates={os.path.abspath(args.tls_certificates)}")
    if args.tls_verify_peer:
        options.append("--tls-verify-peer")
    return options


def _check_psk_file(path):
    """A readable file of USERNAME:HEXKEY lines, the format gnutls (and so nbdkit) reads."""
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--tls-psk {path}: {getattr(e, 'strerror', None) or e}") from None
    bad = [i + 1 for i, line in enumerate(lines) if not PSK_LINE.fullmatch(line)]
    if not lines or bad:
        raise CLIError(f"--tls-psk {path}: not a PSK file (want USERNAME:HEXKEY lines"
                       f"{f'; line {bad[0]} is not' if bad else ''})")


def nbdkit_env():
    env = dict(os.environ)
    paths = [PACKAGE_ROOT] + [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _serve(args):
    if args.threads < 1:
        raise CLIError("--threads must be at least 1")
    if args.port is not None and not 0 < args.port < 65536:
        raise CLIError(f"--port {args.port} is not a TCP port")
    tls_options(args)
    cfg, params = serve_config(args)
    _check_places(args)
    if args.pidfile:
        _check_dir(os.path.dirname(os.path.abspath(args.pidfile)), f"--pidfile {args.pidfile}")
    preflight(cfg)
    if cfg.metrics:
        _check_metrics_port(cfg.metrics)
    for path in ([args.socket] if args.socket else []) + [control_path(args)]:
        _claim_socket(path)
    from nbd_plugin import startup
    stamp = not startup.on_the_journal()
    proc = subprocess.Popen(nbdkit_command(args, params), env=nbdkit_env(),
                            stderr=subprocess.PIPE if stamp else None)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    relay = None
    if stamp:
        relay = threading.Thread(target=_stamp_lines, args=(proc.stderr, sys.stderr.buffer),
                                 name="nbdrep-log", daemon=True)
        relay.start()
    if _wait_listening(proc, args):
        print(attach_help(args), flush=True)
        _announce_ready(proc, args)
    status = proc.wait()
    _remove_pidfile(args)
    if relay is not None:
        relay.join(RELAY_TIMEOUT)   # nbdkit's last lines (how the stop went)
    return status


def _stamp_lines(source, sink):
    """Copy nbdkit's stderr (its own lines, the plugin's log, any traceback) to ``sink`` with
    the local time at the start of every line, until nbdkit closes it."""
    for line in iter(source.readline, b""):
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d} "
        try:
            sink.write(stamp.encode() + line)
            sink.flush()
        except (OSError, ValueError):
            # Our stderr is gone (a closed pipe, a lost terminal): keep draining nbdkit's, or
            # its writes would block once the pipe fills, and the server with them.
            sink = open(os.devnull, "wb")  # noqa: SIM115 (lives as long as the relay)


def _check_metrics_port(address):
    """Bind the metrics server's port and let it go: a busy port fails here, in one line."""
    try:
        from nbd_plugin import metrics
        metrics.MetricsServer(*address, session=None).stop()
    except OSError as e:
        raise CLIError(f"--metrics {address[0]}:{address[1]}: {e.strerror or e}") from None


def _check_places(args):
    """Refuse, before nbdkit starts, the places it could not listen on or write to: a busy
    port, an address not of this host, a socket or state directory that cannot be made."""
    state = os.path.abspath(args.state)
    _check_dir(state, f"--state {args.state}", may_create=True)
    if args.socket:
        _check_dir(os.path.dirname(os.path.abspath(args.socket)), f"--socket {args.socket}")
    control = os.path.dirname(os.path.abspath(control_path(args)))
    if control != state:
        _check_dir(control, f"--control {args.control}")
    if args.port is not None:
        _check_port(args.bind, args.port)


def _check_dir(path, what, may_create=False):
    """``path`` is a directory we can write in, or (``may_create``) one we can make."""
    existing = path
    while may_create and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.exists(existing):
        raise CLIError(f"{what}: directory {existing} does not exist")
    if not os.path.isdir(existing):
        raise CLIError(f"{what}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "cannot be created" if existing != path else "is not writable"
        raise CLIError(f"{what}: {path} {verb} ({existing} is not writable)")


def _check_port(host, port):
    """Bind every address nbdkit will listen on and let go: what fails here would fail it."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CLIError(f"--bind {host} is not an address ({e.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            # As nbdkit does: a port whose last connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise CLIError(f"port {port} on {host} is in use by another program") from None
                raise CLIError(f"--bind {host} --port {port}: {e.strerror}") from None


def _wait_listening(proc, args):
    """True once nbdkit accepts connections; False if it exited first (its stderr says why)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if _listening(args):
            return True
        time.sleep(0.05)
    return False


def _announce_ready(proc, args):
    """Once the session answers on its control socket (the plugin starts it after nbdkit
    listens), write --pidfile and tell systemd READY=1 (sd_notify; nothing without
    NOTIFY_SOCKET). Returns without either if nbdkit exits or START_TIMEOUT passes first."""
    from systemd import daemon

    from nbd_plugin import control
    from replication import record
    path = control_path(args)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.poll() is None:
        try:
            status = control.request(path, {"cmd": "status"},
                                     timeout=max(deadline - time.monotonic(), 0.1))
            break
        except (OSError, ValueError):   # not bound yet, or closed mid-reply while starting
            if time.monotonic() > deadline:
                # systemd would time the start out and restart it: say why in its journal.
                print(f"nbdrep: the session did not answer on {path} within {START_TIMEOUT:g} s "
                      "of starting; not announcing readiness", file=sys.stderr, flush=True)
                return
            time.sleep(0.05)
    else:
        return
    if args.pidfile:
        record.write_bytes(os.path.abspath(args.pidfile), f"{os.getpid()}\n".encode())
    daemon.notify(f"READY=1\nSTATUS={status.get('state')}, cycle {status.get('cycle')}\n"
                  f"MAINPID={os.getpid()}")


def _remove_pidfile(args):
    """Remove --pidfile if it still names this process."""
    if not args.pidfile:
        return
    try:
        with open(args.pidfile) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(args.pidfile)
    except FileNotFoundError:
        pass


def _listening(args):
    if args.socket:
        # _claim_socket removed any stale file, so the file means nbdkit has bound it.
        return os.path.exists(args.socket)
    family, _, _, _, address = socket.getaddrinfo(args.bind, args.port, type=socket.SOCK_STREAM)[0]
    return _answers(family, address)


def _answers(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        return s.connect_ex(address) == 0


def _claim_socket(path):
    """Remove a socket file a dead server left behind; refuse one a live server listens on."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise CLIError(f"{path} exists and is not a socket; choose another --socket")
    if _answers(socket.AF_UNIX, path):
        raise CLIError(f"a server is already listening on {path}")
    os.unlink(path)


def attach_help(args):
    scheme, user, query = "nbd", "", []
    if tls_options(args):
        # libnbd's TLS schemes; a PSK client names its user and key file in the URI.
        scheme = "nbds"
        if args.tls_psk:
            with open(args.tls_psk, encoding="ascii") as f:
                user = f.readline().split(":")[0] + "@"
            query = [f"tls-psk-file={os.path.abspath(args.tls_psk)}"]
    if args.socket:
        query.insert(0, f"socket={args.socket}")
        uri = f"{scheme}+unix://{user}/?{'&'.join(query)}"
        kernel = f"nbd-client -unix {args.socket} /dev/nbd0"
    else:
        host = f"[{args.bind}]" if ":" in args.bind else args.bind   # an IPv6 address
        uri = f"{scheme}://{user}{host}:{args.port}/" + (f"?{'&'.join(query)}" if query else "")
        kernel = f"nbd-client {args.bind} {args.port} /dev/nbd0"
    return "\n".join([
        f"nbdrep: serving {', '.join(args.source)} at {uri}",
        f"  kernel:  {kernel}",
        f"  fuse:    mkdir m && nbdfuse m/disk '{uri}' &   # then losetup -f --show m/disk",
        f"  fio:     fio --ioengine=nbd --uri='{uri}' ...",
        f"  control: nbdrep status --control {control_path(args)}",
    ])


# -- control clients ---------------------------------------------------------------------------

def _ask(args, message, timeout=10.0):
    try:
        from nbd_plugin import control
        reply = control.request(args.control, message, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise CLIError(f"no nbdrep server at control socket {args.control}") from None
    except TimeoutError:
        raise CLIError(f"control socket {args.control} did not answer in {timeout:.0f} s") from None
    except (OSError, ValueError):
        # Not a socket, or another server's (nbdkit's own hangs up on a JSON line).
        raise CLIError(f"{args.control} is not an nbdrep control socket") from None
    if not isinstance(reply, dict):
        raise CLIError(f"{args.control} is not an nbdrep control socket")
    if "error" in reply:
        raise CLIError(reply["error"])
    return reply


def _rp(args):
    if not 0 < args.timeout <= 86400:
        raise CLIError(f"--timeout {args.timeout} must be > 0 and at most 86400 seconds")
    reply = _ask(args, {"cmd": "rp", "wait": args.wait, "timeout": args.timeout},
                 timeout=args.timeout + 10)
    if args.wait and not reply["committed"]:
        print(f"nbdrep: cycle {reply['cycle']} not committed within {args.timeout} s", file=sys.stderr)
        return 1
    print(reply["cycle"])
    return 0


def _status(args):
    if args.prometheus:
        print(_ask(args, {"cmd": "metrics"})["text"], end="")
        return 0
    status = _ask(args, {"cmd": "status"})
    if status.get("role") == "receiver" and not args.json:   # nbdrep receive's control socket
        from receiver.cli import format_rps
        print(format_rps(status))
        return 0
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _report(args):
    print(json.dumps(_ask(args, {"cmd": "report"})))
    return 0


# -- status table ------------------------------------------------------------------------------

COLUMNS = ("cycle", "state", "writes", "extents", "bytes_written", "bytes_copied", "bytes_zeroed",
           "rp_time", "commit_time")


def format_status(status, rows=10):
    """The status dict as a readable summary and a table of recent cycles."""
    lag = "-" if status["lag"] is None else f"{status['lag']:.2f} s"
    head = [
        f"state: {status['state']}   cycle: {status['cycle']}   "
        f"committed: {status['committed_cycle'] if status['replicated'] else '(no replica)'}   lag: {lag}",
    ]
    if status.get("session_id"):
        head.append(f"session: {status['session_id']}   start: {status['start']}")
    for key in ("stuck", "record_error", "history_error"):
        if status.get(key):
            head.append(f"{key.replace('_', ' ')}: {status[key]}")
    head += [f"  export {d['name'] or '(default)'!r}: {d['path']} ({format_size(d['size'])})"
             f" -> {d['replica'] or '-'}" for d in status["devices"]]
    cycles = status["cycles"][-rows:]
    table = [list(COLUMNS)] + [[_cell(c, k) for k in COLUMNS] for c in cycles]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table]
    return "\n".join(head + [""] + lines)


def _cell(cycle, key):
    value = cycle[key]
    if value is None:
        return "-"
    if key.endswith("_time"):
        return time.strftime("%H:%M:%S", time.localtime(value)) + f".{int(value * 1000) % 1000:03d}"
    if key.startswith("bytes"):
        return format_size(value)
    if key == "state":
        return _state_cell(cycle)
    return str(value)


def _state_cell(cycle):
    text = cycle["state"]
    if text == "copying" and cycle["bytes_total"]:
        text += f" {100 * cycle['bytes_done'] // cycle['bytes_total']}%"
    return text + " (sync)" if cycle["initial_sync"] else text


if __name__ == "__main__":
    sys.exit(main())
