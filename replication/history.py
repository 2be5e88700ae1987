"""The cycle history on disk: one compact JSON line per finished cycle, for ``nbdrep plot``.

Theory of operation
-------------------
The controller keeps the last ``machine.HISTORY`` cycles in memory (what ``status`` shows);
this keeps far more, in the state directory: ``history.jsonl``, appended at every commit with
the cycles finished since the last one (committed, inconsistent, and the failed ones before
it), and ``history.1.jsonl``, the one before. Once an append would take ``history.jsonl``
past ``MAX_BYTES`` it is renamed over ``history.1.jsonl`` first, so the two never hold more
than ``2 * MAX_BYTES`` (16 MiB: at about 200 bytes a line, 80,000 cycles, 22 hours at 1 s
cycles) and always the newest cycles.

Appends are not fsynced: the history is for pictures, not for recovery, and a cycle must not
wait for it. A crash may leave a torn last line; the next append starts on a line of its own
and ``read`` skips lines that are not records. One that cannot be written (a full state
directory) is logged once and shown in status, never a failed cycle.
"""
import json
import logging
import os

log = logging.getLogger("nbdrep")

FILE = "history.jsonl"
OLD = "history.1.jsonl"
MAX_BYTES = 8 << 20
FINISHED = ("committed", "inconsistent", "failed")
KEYS = ("cycle", "rp_time", "commit_time", "bytes_copied", "bytes_zeroed", "writes", "state",
        "lag", "point_in_time", "error")


class HistoryError(Exception):
    """The history cannot be read: one line naming the file and why."""


def line(record):
    """The history line of a ``machine.CycleRecord``: times to the millisecond; ``lag`` is
    how far the replica trailed the source when the cycle committed (None if it did not)."""
    commit = record.commit_time
    return json.dumps({
        "cycle": record.cycle, "rp_time": round(record.rp_time, 3),
        "commit_time": None if commit is None else round(commit, 3),
        "bytes_copied": record.bytes_copied, "bytes_zeroed": record.bytes_zeroed,
        "writes": record.writes, "state": record.state,
        "lag": None if commit is None else round(commit - record.rp_time, 3),
        "point_in_time": record.point_in_time, "error": record.error,
    }, separators=(",", ":")) + "\n"


class Writer:
    """Appends the cycles that finished since its last call, to ``state_dir``'s history.
    ``error`` is why the last append failed, or None. Called by one thread only."""

    def __init__(self, state_dir, max_bytes=MAX_BYTES):
        self.path = os.path.join(state_dir, FILE)
        self.old = os.path.join(state_dir, OLD)
        self.max_bytes = max_bytes
        self.error = None
        self._upto = None   # newest cycle written by this run

    def take(self, records):
        """The lines of ``records`` (oldest first) that finished since the last call. Call
        with the controller's lock held; O(history)."""
        lines = [line(r) for r in records
                 if r.state in FINISHED and (self._upto is None or r.cycle > self._upto)]
        if lines:
            self._upto = max(r.cycle for r in records if r.state in FINISHED)
        return lines

    def append(self, lines):
        """Append ``lines``, rotating first if they would take the file past ``max_bytes``;
        an error is logged (once per run of failures) and kept in ``error``, never raised."""
        if not lines:
            return
        data = "".join(lines).encode()
        try:
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.max_bytes:
                os.replace(self.path, self.old)
                size = 0
            with open(self.path, "a+b") as f:
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":   # a line torn by a crash
                        data = b"\n" + data
                f.write(data)   # appended, wherever the read left the position
        except OSError as e:
            if self.error is None:
                log.error("cannot append to the cycle history %s (%s); replication goes on",
                          self.path, e.strerror or e)
            self.error = f"{e.strerror or e}"
            return
        self.error = None


def read(state_dir, since=None):
    """The records of ``state_dir``'s history (dicts with ``KEYS``), oldest first, those with
    an RP at or after ``since`` (epoch seconds) only. Lines that are not records (a line torn
    by a crash) are skipped; HistoryError if there is no history, or nothing in it is one.
    O(lines)."""
    found, records, valid = False, {}, 0
    # The current file first: a rotation between the two reads then shows its lines twice
    # (dropped below, by cycle and RP time), rather than not at all.
    for name in (FILE, OLD):
        try:
            with open(os.path.join(state_dir, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise HistoryError(f"{os.path.join(state_dir, name)}: {e.strerror or e}") from None
        found = True
        for raw in data.splitlines():
            r = _record(raw)
            valid += r is not None
            if r is not None and (since is None or r["rp_time"] >= since):
                records[(r["cycle"], r["rp_time"])] = r
    if not found:
        raise HistoryError(f"no cycle history in {state_dir} (nbdrep serve with a --replica "
                           f"writes {FILE} there at every commit)")
    if not valid:
        raise HistoryError(f"{state_dir}: {FILE} and {OLD} hold no nbdrep cycle records")
    return sorted(records.values(), key=lambda r: r["rp_time"])


def _record(raw):
    """The record in one line, or None if it is not one."""
    try:
        r = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(r, dict) or not set(KEYS) <= r.keys():
        return None
    numbers = (r["cycle"], r["rp_time"], r["bytes_copied"], r["bytes_zeroed"])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return None
    if not all(v is None or isinstance(v, (int, float)) for v in (r["commit_time"], r["lag"])):
        return None
    return r
