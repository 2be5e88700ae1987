"""nbdrep's nbdkit plugin: serves files or raw block devices and records every write.

    nbdkit python /path/to/nbd_plugin/plugin.py source=disk.img [replica=nbd+unix:///?socket=r.sock]

``nbdrep serve`` builds that command line; see ``nbd_plugin.params`` for every key.

A flat module of nbdkit callbacks, as nbdkit's own example plugins are. Each write callback
brackets the back-end call with the session's write hook, ``hook.begin``/``hook.end``: begin
tags the write with the open cycle (and, while a cycle is being copied, keeps aside the bytes it is
about to overwrite), end records the tracking entry. A write that fails is recorded as data over
its whole range, because its bytes may have changed and only reading the source tells how.
``pwrite``, the common write, does all of it in one C call (``writepath.c``), which hands back to
that Python path whatever it cannot finish.

Start-up order matters (nbdkit forks after ``get_ready``, and threads do not survive a fork):
``config``/``config_complete`` parse and check, ``get_ready`` opens the sources and checks that
every replica is reachable and big enough (its errors reach the user; those of ``after_fork``
only reach syslog), ``after_fork`` starts the session's threads.
"""
import errno
import functools
import logging
import sys

import nbdkit

from replication.driver import Session
from nbd_plugin import startup
from nbd_plugin._io import ffi as io_ffi, lib as io_lib
from nbd_plugin._io.lib import keep_thread_state, wp_pwrite
from nbd_plugin.control import ControlServer
from nbd_plugin.metrics import MetricsServer
from nbd_plugin.params import Config
from replication import record
from tracker import KIND_DATA, KIND_TRIM, KIND_ZERO

API_VERSION = 2

config_ = Config()
backends = {}
session = None
hook = None
control = None
metrics = None
state_lock = []   # the state directory's lock (record.lock): its descriptor stays open


class Handle:
    __slots__ = ("backend", "dev", "fd")

    def __init__(self, backend, dev):
        self.backend = backend
        self.dev = dev
        self.fd = backend.fd


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    config_.add(key, value)


def config_complete():
    config_.complete()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=startup.log_format())


def get_ready():
    global session, hook, metrics
    backends.update(startup.open_sources(config_))
    replica_sizes = startup.check(config_, backends)
    if config_.state:
        state_lock.append(record.lock(config_.state))   # held until the process exits
    if config_.tracking:
        session = Session(config_, backends, replica_sizes)
        hook = session.hook
    if config_.metrics:
        # Bound here, where a busy port still reaches the user; served after the fork.
        metrics = MetricsServer(*config_.metrics, session)


def after_fork():
    global control
    startup.record_sources(config_, backends)
    if not config_.replicas and config_.state and not config_.readonly:
        # Serving without replicating writes behind a replication record's back: a later
        # replicated start must resync in full. nbdkit has bound its sockets but accepts no
        # client before this returns.
        record.taint(config_.state)
    if session is None:
        return
    session.start()
    if config_.control:
        control = ControlServer(config_.control, session, config_.control_group)
        control.start()
    if metrics is not None:
        metrics.start()


def cleanup():
    # The control socket stays up during the stop, so that status shows it ("stopping").
    # A worker still held after the stop timeout (its drain waits for a hung write) may still
    # read the back ends; the process is exiting, so their descriptors are left to it.
    stopped = session is None or session.stop(config_.stop_timeout)
    if control is not None:
        control.stop()
    if metrics is not None:
        metrics.stop()
    if not stopped:
        return
    for backend in backends.values():
        backend.close()


def list_exports(readonly, is_tls):
    return [(s.name, s.path) for s in config_.sources]


def default_export(readonly, is_tls):
    return config_.sources[0].name


def open(readonly):
    name = nbdkit.export_name()
    src = config_.by_name(name)
    if src is None:
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"no export named {name!r}")
    return Handle(backends[name], src.dev)


def export_description(h):
    return h.backend.path


def get_size(h):
    return h.backend.size


def block_size(h):
    # A block device's logical block is its minimum: the kernel refuses BLKZEROOUT and
    # BLKDISCARD on smaller units (the back end still serves unaligned requests).
    return h.backend.block_sizes


def is_rotational(h):
    return False


def can_multi_conn(h):
    # One back end per export, shared by all connections: a flush on one covers them all.
    return True


def can_write(h):
    return not h.backend.readonly


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def _request(callback):
    """Wrap a request callback: keep the worker's Python thread state, hand errors' errno to nbdkit.

    The thread state: nbdkit's Python plugin makes one at every callback on its worker threads
    and frees it at the end, unless something keeps it (``nbd_plugin/_build.py``); that cost
    more than the read itself. The errno: without ``nbdkit.set_error`` the client sees EIO for
    every failure (nbdkit-python-plugin(3)); with it a full file system is ENOSPC, and a zero
    that can only be done by writing is EOPNOTSUPP, which makes nbdkit fall back to writing
    zeros (or refuse a fast zero).
    """
    @functools.wraps(callback)
    def call(*args):
        keep_thread_state()
        try:
            return callback(*args)
        except OSError as e:
            if e.errno:
                nbdkit.set_error(e.errno)
            raise
    return call


@_request
def pread(h, buf, offset, flags):
    h.backend.pread(buf, offset)


@_request
def pwrite(h, buf, offset, flags):
    if hook is None:
        h.backend.pwrite(buf, offset)
    else:
        data = io_ffi.from_buffer(buf)
        rc = wp_pwrite(hook.parts, h.fd, h.dev, KIND_DATA, data, len(data), offset)
        if rc:
            _pwrite_rest(h, rc, buf, offset)
    if flags & nbdkit.FLAG_FUA:
        h.backend.flush()


@_request
def zero(h, count, offset, flags):
    may_trim = bool(flags & nbdkit.FLAG_MAY_TRIM)
    fast = bool(flags & nbdkit.FLAG_FAST_ZERO)
    _tracked(h, KIND_ZERO, offset, count, lambda: h.backend.zero(offset, count, may_trim, fast), flags)


@_request
def trim(h, count, offset, flags):
    kind = KIND_TRIM if h.backend.trim_reads_zero else KIND_DATA
    _tracked(h, kind, offset, count, lambda: h.backend.trim(offset, count), flags)


@_request
def flush(h, flags):
    h.backend.flush()


@_request
def cache(h, count, offset, flags):
    h.backend.cache(offset, count)


@_request
def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(off, length, hole if is_hole else 0)
            for off, length, is_hole in h.backend.extents(offset, count)]


def _pwrite_rest(h, rc, buf, offset):
    """Finish, on the Python path, a write that ``wp_pwrite`` handed back (``writepath.c``)."""
    cycle, length = io_lib.wp_cycle(), len(buf)
    if rc == io_lib.WP_BEGUN:
        cycle = hook.begun(cycle, io_lib.wp_rc(), h.dev, offset, length)
        try:
            h.backend.pwrite(buf, offset)
        finally:
            hook.end(cycle, h.dev, KIND_DATA, offset, length)
    elif rc == io_lib.WP_WRITE_FAILED:
        err = io_lib.wp_rc()
        hook.end(cycle, h.dev, KIND_DATA, offset, length)
        raise h.backend.write_error(err, length, offset)
    else:
        hook.end_failed(io_lib.wp_rc(), cycle, h.dev, KIND_DATA, offset, length)


def _tracked(h, kind, offset, length, write, flags):
    """Run ``write`` on the back end inside a tracked bracket."""
    if hook is None:
        write()
    else:
        cycle = hook.begin(h.dev, offset, length)
        ok = False
        try:
            write()
            ok = True
        finally:
            hook.end(cycle, h.dev, kind if ok else KIND_DATA, offset, length)
    if flags & nbdkit.FLAG_FUA:
        h.backend.flush()

