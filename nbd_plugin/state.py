"""Per-source state kept across restarts, in ``<state dir>/sources.json``.

It remembers the size of each source served. A source whose size changed between two runs means
either the wrong file or a resize the replica has not seen; both deserve a stop, not a guess,
unless the user says the resize is intended (``--accept-resize``): the replication record then
sees a changed source and resyncs it in full.
"""
import json
import os

from replication import record as record_module

FILE = "sources.json"


class StateError(Exception):
    """The state directory disagrees with what is being served."""


def check_sizes(state_dir, sizes, accept_resize=False):
    """Check ``sizes`` ({realpath: bytes}) against the last run; writes nothing. O(sources)."""
    path = os.path.join(state_dir, FILE)
    known = _load(path)
    for source, size in sizes.items():
        if source in known and known[source] != size and not accept_resize:
            raise StateError(
                f"source {source!r} is {size} bytes but was {known[source]} bytes when nbdrep last "
                f"served it; if the resize is intended, start with --accept-resize")


def record_sizes(state_dir, sizes):
    """Record ``sizes`` as those of the sources served now, and only those: a source no longer
    served is forgotten (served again later, it is new). Crash-safe. O(sources)."""
    record_module.write_json(os.path.join(state_dir, FILE), sizes)


def _load(path):
    try:
        with open(path) as f:
            known = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise StateError(f"state file {path} is corrupt ({e}); move it away to start afresh") from None
    if not isinstance(known, dict):
        raise StateError(f"state file {path} is corrupt (not a JSON object); move it away to start afresh")
    return known
