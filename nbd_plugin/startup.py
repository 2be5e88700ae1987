"""Start-up checks shared by the plugin's ``get_ready`` and ``nbdrep serve``'s preflight.

nbdkit reports a failing callback as a Python traceback, so ``nbdrep serve`` runs the same
checks first and prints one clean line; the plugin runs them again because nbdkit can also be
started by hand. Nothing here writes to a source or a replica.
"""
import os
import sys

from copier.replica import Replica, ReplicaError
from nbd_plugin import state
from nbd_plugin.backend import Backend, BackendError
from replication import record

ERRORS = (BackendError, ReplicaError, state.StateError, record.RecordError, ValueError)


def on_the_journal():
    """True if stderr is systemd's journal (JOURNAL_STREAM names the stream's device and inode,
    systemd.exec(5)), which stamps each line with the time and the unit's name itself."""
    st = os.fstat(sys.stderr.fileno())
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def log_format():
    """The plugin's log lines: named, unless the journal names them already (it would show
    "nbdrep[pid]: nbdrep: cycle 15 failed")."""
    return "%(message)s" if on_the_journal() else "nbdrep: %(message)s"


def open_sources(cfg):
    """Open every source; on any failure close those already open and re-raise. O(sources)."""
    backends = {}
    try:
        for src in cfg.sources:
            backends[src.name] = Backend(src.path, readonly=cfg.readonly)
    except BaseException:
        for backend in backends.values():
            backend.close()
        raise
    return backends


def check(cfg, backends):
    """Check sizes against the last run, the replication record, and every replica; writes
    nothing. Returns {export name: replica size}. O(sources) connections."""
    if cfg.state:
        record.check_unlocked(cfg.state)
        state.check_sizes(cfg.state, _sizes(backends), cfg.accept_resize)
        if cfg.replicas:
            record.load(cfg.state)   # a corrupt record stops the start here, in one line
    replica_sizes = {}
    for src in cfg.sources:
        if src.replica:
            with Replica(src.replica) as replica:
                replica.check_size(backends[src.name].size)
                replica_sizes[src.name] = replica.size
    return replica_sizes


def record_sources(cfg, backends):
    """Record the sources served in the state directory, once serving begins (nbdkit has bound
    its sockets): a start that fails before then leaves the directory as it was."""
    if cfg.state:
        state.record_sizes(cfg.state, _sizes(backends))


def _sizes(backends):
    return {os.path.realpath(b.path): b.size for b in backends.values()}
