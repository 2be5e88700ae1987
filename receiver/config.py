"""The receiver plugin's parameters: ``nbdkit python receiver/plugin.py key=value ...``.

Checked in full before anything is opened, by the plugin and, first, by ``nbdrep receive``,
so that a bad one is one line and changes nothing.
"""
import dataclasses

from nbd_plugin.params import ParamError, split_named
from receiver import journal

KEYS = ("target", "state", "control", "keep", "journal-max")
DEFAULT_KEEP = "10m"
DEFAULT_JOURNAL_MAX = "1G"


@dataclasses.dataclass
class Config:
    targets: list = dataclasses.field(default_factory=list)   # [(name, path)]
    state: str | None = None
    control: str | None = None
    keep: tuple = journal.parse_keep(DEFAULT_KEEP)
    journal_max: int = journal.parse_journal_max(DEFAULT_JOURNAL_MAX)

    def add(self, key, value):
        if key not in KEYS:
            raise ParamError(f"unknown parameter {key!r} (known: {', '.join(KEYS)})")
        if key == "target":
            name, path = split_named(value, "target")
            if any(n == name for n, _ in self.targets):
                raise ParamError(f"two targets for export {name or '(default)'!r}")
            self.targets.append((name, path))
        elif key == "keep":
            self.keep = journal.parse_keep(value)
        elif key == "journal-max":
            self.journal_max = journal.parse_journal_max(value)
        elif not value:
            raise ParamError(f"{key}= needs a path")
        else:
            setattr(self, key, value)

    def complete(self):
        if not self.targets:
            raise ParamError("no target given: use target=PATH (or target=NAME=PATH)")
        if not self.state:
            raise ParamError("the receiver needs state=DIR for its journals")
