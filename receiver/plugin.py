"""nbdrep's receiver plugin: the replica side, made visible one committed cycle at a time.

    nbdkit python /path/to/receiver/plugin.py target=[NAME=]PATH state=DIR [control=PATH]

``nbdrep receive`` builds that command line (``receiver.config`` has every key). Exports:

* ``NAME``: the newest committed RP of target NAME. Writes go to its pending journal and
  stay invisible (reads still return the RP) until a commit; FLUSH makes them durable.
* ``NAME@CYCLE``: retained RP CYCLE, read-only (a test failover: mount it, fsck it, while
  new cycles keep arriving).
* ``.nbdrep``: the metadata export of ``copier.receiver``: read, the receiver's state; a
  commit record written there commits every export at once (a prepare record, where a
  group spans several receivers, makes them an RP not shown until its commit); a fence record
  refuses, from then on, the requests of connections to its export opened before it.

A flat module of nbdkit callbacks, as ``nbd_plugin/plugin.py`` is; ``receiver.store`` does
the I/O. Threads start in ``after_fork`` (nbdkit forks after ``get_ready``).
"""
import errno
import functools
import logging
import resource
import sys

import nbdkit

from copier.receiver import META_EXPORT, META_SIZE, ProtocolError
from nbd_plugin._io.lib import keep_thread_state
from nbd_plugin.backend import FILE_BLOCK_SIZES
from receiver.config import Config
from receiver.control import ReceiverControl
from receiver.store import Store

API_VERSION = 2

config_ = Config()
store = None
control = None


class Handle:
    """One client connection: its export, the RP it reads (None: the newest), and the epoch
    it was opened in (``Store.fence``)."""
    __slots__ = ("name", "cycle", "extents", "epoch")

    def __init__(self, name, cycle=None, extents=None, epoch=None):
        self.name, self.cycle, self.extents, self.epoch = name, cycle, extents, epoch


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    config_.add(key, value)


def config_complete():
    config_.complete()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="nbdrep receive: %(message)s")


def get_ready():
    global store
    # A descriptor per retained RP and export (600 for --keep 10m of 1 s cycles): past the
    # usual soft limit of 1024, up to the hard one.
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    store = Store(config_.state, config_.targets, keep=config_.keep, journal_max=config_.journal_max)


def after_fork():
    global control
    store.start()
    if config_.control:
        control = ReceiverControl(config_.control, store)
        control.start()


def cleanup():
    if control is not None:
        control.stop()
    if store is not None:
        store.close()


def list_exports(readonly, is_tls):
    return [(name, path) for name, path in config_.targets]


def default_export(readonly, is_tls):
    return config_.targets[0][0]


def open(readonly):
    name = nbdkit.export_name()
    if name == META_EXPORT:
        return Handle(META_EXPORT, epoch=store.meta_epoch)
    if name in store.sizes:
        return Handle(name, epoch=store.epochs[name])
    target, sep, cycle = name.rpartition("@")
    if sep and target in store.sizes and cycle.isdigit():
        extents = store.attach(target, int(cycle))
        if extents is not None:
            return Handle(target, int(cycle), extents)
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"RP {cycle} of {target or '(default)'!r} is not retained (see nbdrep rps)")
    nbdkit.set_error(errno.ENOENT)
    raise LookupError(f"no export named {name!r}")


def close(h):
    if h.cycle is not None:
        store.detach(h.cycle)


def get_size(h):
    return META_SIZE if h.name == META_EXPORT else store.sizes[h.name]


def block_size(h):
    return (META_SIZE, META_SIZE, META_SIZE) if h.name == META_EXPORT else FILE_BLOCK_SIZES


def can_write(h):
    return h.cycle is None


def can_multi_conn(h):
    # One pending journal per export, shared by every connection: a flush on one covers all.
    return True


def can_flush(h):
    return True


def can_trim(h):
    return h.cycle is None and h.name != META_EXPORT


def can_zero(h):
    return h.cycle is None and h.name != META_EXPORT


def can_fua(h):
    return nbdkit.FUA_EMULATE


def is_rotational(h):
    return False


def _client_errno(callback):
    """Hand an OSError's errno to nbdkit for the client (EIO otherwise). Each request first
    keeps its worker's Python thread state for the thread's life (``nbd_plugin/_build.py``
    says why: nbdkit would make and free one per request)."""
    @functools.wraps(callback)
    def call(*args):
        keep_thread_state()
        try:
            return callback(*args)
        except OSError as e:
            if e.errno:
                nbdkit.set_error(e.errno)
            raise
        except ProtocolError:
            nbdkit.set_error(errno.EINVAL)
            raise
    return call


@_client_errno
def pread(h, buf, offset, flags):
    if h.name == META_EXPORT:
        buf[:] = store.state_block()[offset:offset + len(buf)]
        return
    # The newest RP (h.extents None) is looked up per read: a connection sees each commit.
    store.read(h.name, h.extents, buf, offset)


@_client_errno
def pwrite(h, buf, offset, flags):
    if h.name == META_EXPORT:
        if offset or len(buf) != META_SIZE:
            raise OSError(errno.EINVAL, f"a metadata record is one {META_SIZE}-byte block at 0")
        h.epoch = store.metadata_write(buf, h.epoch)
        return
    store.write(h.name, buf, offset, h.epoch)


@_client_errno
def zero(h, count, offset, flags):
    store.zero(h.name, offset, count, h.epoch)


@_client_errno
def trim(h, count, offset, flags):
    # A trimmed range reads as anything; zeros are one such thing, and keep the RP exact.
    store.zero(h.name, offset, count, h.epoch)


@_client_errno
def flush(h, flags):
    if h.name != META_EXPORT and h.cycle is None:
        store.flush(h.name, h.epoch)
