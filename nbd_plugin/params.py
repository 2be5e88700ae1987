"""The plugin's parameters: ``nbdkit python plugin.py key=value ...``, parsed and checked.

Everything is validated before a single source is opened, so a bad parameter fails at
start-up with one clear message and touches no data.
"""
import dataclasses
import grp
import ipaddress
import math
import os
import re

import tracker
from copier.sizes import format_size, parse_size as _parse_size
from copier.uri import parse_uri

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
KEYS = ("source", "replica", "tracking", "readonly", "cycle", "control", "state", "keepaside-mem", "keepaside-spill",
        "tracker-mem", "stop-timeout", "resync", "accept-resize", "dirty-region", "control-group", "metrics")


class ParamError(ValueError):
    """A parameter nbdrep cannot accept; the message names it."""


@dataclasses.dataclass
class Source:
    name: str
    path: str
    dev: int
    replica: str | None = None


@dataclasses.dataclass
class Config:
    sources: list = dataclasses.field(default_factory=list)
    replicas: dict = dataclasses.field(default_factory=dict)
    tracking: bool = True
    readonly: bool = False
    cycle: float = 1.0
    control: str | None = None
    state: str | None = None
    keepaside_mem: int = 256 << 20
    keepaside_spill: int = 1 << 30
    tracker_mem: int = 64 << 20
    stop_timeout: float = 30.0
    resync: str = "auto"
    accept_resize: bool = False
    # 64 KiB: after a crash under 4 KiB random writes over 4 GiB, 0.06x of what DRBD's activity
    # log would resync, against 1.0x at 1 MiB, where every region is rewritten within seconds
    # (scripts/bench_crash.py); 64 MiB of memory per TiB (replication/dirtylog.py).
    dirty_region: int = 64 << 10
    control_group: int | None = None
    metrics: tuple | None = None

    def add(self, key, value):
        """Take one ``key=value`` from nbdkit's command line. O(1) (O(sources) for source names)."""
        if key not in KEYS:
            raise ParamError(f"unknown parameter {key!r} (known: {', '.join(KEYS)})")
        _SETTERS[key](self, value)

    def complete(self):
        """Check the whole configuration once all parameters are in. O(sources)."""
        if not self.sources:
            raise ParamError("no source given: use source=PATH (or source=NAME=PATH)")
        names = {s.name for s in self.sources}
        for name, uri in self.replicas.items():
            if name not in names:
                raise ParamError(f"replica for {name or 'the default export'!r} names no source")
            self.by_name(name).replica = uri
        missing = [s.name or "(default)" for s in self.sources if self.replicas and s.replica is None]
        if missing:
            raise ParamError(f"every source of a replication session needs a replica; missing for {missing}")
        if self.replicas and not self.tracking:
            raise ParamError("replication needs tracking: drop tracking=off or the replicas")
        if self.metrics and not self.tracking:
            raise ParamError("metrics need tracking: drop tracking=off or metrics=")
        if self.readonly and self.replicas:
            raise ParamError("a read-only source never changes: replicate it once with nbdcopy instead")

    def by_name(self, name):
        """The source serving export ``name``, or None. O(sources)."""
        return next((s for s in self.sources if s.name == name), None)


def split_named(value, what):
    """'NAME=VALUE' -> (NAME, VALUE); a plain VALUE -> ('', VALUE).

    A prefix counts as a name only if it looks like one, so paths and URIs containing '='
    (``nbd+unix:///?socket=/run/x``) stay whole.
    """
    head, sep, tail = value.partition("=")
    if sep and NAME_RE.fullmatch(head):
        return head, tail
    if not value:
        raise ParamError(f"empty {what}")
    return "", value


def parse_size(text, what, minimum=1):
    """'256M' -> 268435456 (the grammar of ``copier.sizes``); at least ``minimum`` bytes."""
    try:
        size = _parse_size(text)
    except ValueError as e:
        raise ParamError(f"{what}={e}") from None
    if size < minimum:
        raise ParamError(f"{what}={text!r} must be at least {format_size(minimum)}")
    return size


def _set_tracker_mem(cfg, value):
    # The tracker needs room for a few TEs per CPU; below that it could not start at all.
    cfg.tracker_mem = parse_size(value, "tracker-mem", minimum=tracker.min_bytes())


def _set_dirty_region(cfg, value):
    # Regions are whole pages (a mark per 4 KiB is already 1 bit per 32 Ki of data) and powers
    # of two, so a write's regions are two shifts; 0 turns the log off.
    region = parse_size(value, "dirty-region", minimum=0)
    if region and (not 4096 <= region <= 1 << 30 or region & (region - 1)):
        raise ParamError(f"dirty-region={value!r} must be 0 (off) or a power of two from 4K to 1G")
    cfg.dirty_region = region


def parse_seconds(text, what):
    """A duration in seconds: a finite number in (0, 86400]."""
    try:
        seconds = float(text)
    except ValueError:
        raise ParamError(f"{what}={text!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= 86400):
        raise ParamError(f"{what}={text!r} must be > 0 and at most 86400 seconds")
    return seconds


DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """A duration with its unit (``90s``, ``10m``, ``2h``, ``30d``) in seconds, or None if
    ``text`` is not one."""
    m = DURATION_RE.fullmatch(text)
    return None if m is None else float(m.group(1)) * DURATION_UNITS[m.group(2)]


def _set_control_group(cfg, value):
    try:
        gid = grp.getgrgid(int(value)).gr_gid if value.isdigit() else grp.getgrnam(value).gr_gid
    except KeyError:
        raise ParamError(f"control-group={value!r}: no such group") from None
    # Giving the socket to a group takes root or membership; found out only after the fork,
    # it would fail once serving had begun.
    if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
        raise ParamError(f"control-group={value!r}: this user is not in that group")
    cfg.control_group = gid


def _set_metrics(cfg, value):
    """'ADDR:PORT' ('[ADDR]:PORT' for IPv6) -> (address, port); an IP address, not a name."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        if not (sep and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError
    except ValueError:
        raise ParamError(f"metrics={value!r} is not IP:PORT (e.g. 127.0.0.1:9100)") from None
    cfg.metrics = (host, int(port))


def _set_resync(cfg, value):
    if value not in ("auto", "full"):
        raise ParamError(f"resync={value!r}: use auto or full")
    cfg.resync = value


def _set_source(cfg, value):
    name, path = split_named(value, "source")
    if cfg.by_name(name) is not None:
        raise ParamError(f"two sources for export {name or '(default)'!r}")
    cfg.sources.append(Source(name, path, dev=len(cfg.sources)))


def _set_replica(cfg, value):
    name, uri = split_named(value, "replica")
    try:
        parse_uri(uri)
    except ValueError as e:
        raise ParamError(str(e)) from None
    if name in cfg.replicas:
        raise ParamError(f"two replicas for export {name or '(default)'!r}")
    cfg.replicas[name] = uri


def _set_switch(key):
    def setter(cfg, value):
        if value not in ("on", "off"):
            raise ParamError(f"{key}={value!r}: use on or off")
        setattr(cfg, key.replace("-", "_"), value == "on")
    return setter


def _set_path(attr):
    def setter(cfg, value):
        if not value:
            raise ParamError(f"{attr}= needs a path")
        setattr(cfg, attr, value)
    return setter


_SETTERS = {
    "source": _set_source,
    "replica": _set_replica,
    "tracking": _set_switch("tracking"),
    "readonly": _set_switch("readonly"),
    "accept-resize": _set_switch("accept-resize"),
    "cycle": lambda cfg, v: setattr(cfg, "cycle", parse_seconds(v, "cycle")),
    "stop-timeout": lambda cfg, v: setattr(cfg, "stop_timeout", parse_seconds(v, "stop-timeout")),
    "resync": _set_resync,
    "control": _set_path("control"),
    "state": _set_path("state"),
    "keepaside-mem": lambda cfg, v: setattr(cfg, "keepaside_mem", parse_size(v, "keepaside-mem")),
    "keepaside-spill": lambda cfg, v: setattr(cfg, "keepaside_spill", parse_size(v, "keepaside-spill")),
    "tracker-mem": _set_tracker_mem,
    "dirty-region": _set_dirty_region,
    "control-group": _set_control_group,
    "metrics": _set_metrics,
}
