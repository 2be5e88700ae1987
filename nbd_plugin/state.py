"""Per-source state kept across restarts, in ``<state dir>/sources.json``.

It remembers each source's size. A source whose size changed between two runs means either the
wrong file or a resize the replica has not seen; both deserve a stop, not a guess.
"""
import json
import os

from replication import record as record_module

FILE = "sources.json"


class StateError(Exception):
    """The state directory disagrees with what is being served."""


def check_sizes(state_dir, sizes, record=True):
    """Check ``sizes`` ({realpath: bytes}) against the last run, then record them. O(sources)."""
    path = os.path.join(state_dir, FILE)
    known = _load(path)
    for source, size in sizes.items():
        if source in known and known[source] != size:
            raise StateError(
                f"source {source!r} is {size} bytes but was {known[source]} bytes when nbdrep last "
                f"served it; if the resize is intended, remove its entry from {path}")
    if record:
        record_module.write_json(path, {**known, **sizes})


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise StateError(f"state file {path} is corrupt ({e}); move it away to start afresh") from None
