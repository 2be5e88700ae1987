"""The durable replication record: what a restart needs to copy only what may differ.

Theory of operation
-------------------
One JSON file per state directory (one session, i.e. consistency group, per state directory,
as the control socket's default already implies), written crash-safely: a temporary file,
fsync, rename over the old one, fsync of the directory. So after a crash at any instant the
file is the old record or the new one, never a mix.

It holds the session id (made at the first full sync; with a cycle id it names an RP for the
life of the session), the last committed cycle and its RP time, the next cycle id, each
source's identity, each replica's URI and size, whether the last run stopped cleanly, and what
it left outstanding (flat lists of offset, length, compact: a report at its cap of a million
extents is tens of MB and must be written within the stop's time).

The driver writes it once serving is about to begin (``clean`` false: a run is in progress),
at commits (at most once a second unless an RP was requested or receivers take the commits:
``replication.driver.RECORD_INTERVAL`` says why a record older than the replica is safe), and
at a clean stop (``clean`` true, with the outstanding report: nothing if
the final RP committed, else the carry and the writes after the last RP). While a run is in
progress, ``next_cycle`` is ``RESERVE`` ahead of the open cycle, so the ids a crashed run
used are never issued again. A run that serves the sources without replicating them marks the
record as not clean (``taint``): it writes behind the record's back. ``plan`` reads the record
at start and decides, per source, between resuming (copy the outstanding report, often
nothing) and a full resync, with the reason:

* no record, or ``--resync full``: a full sync;
* the last run did not stop cleanly (kill -9, power loss): a resync of the regions its
  dirty-region log marked (``replication.dirtylog``: every region that may hold a write not
  yet committed), after the same source and replica checks as below (but the source's times,
  which the crashed run changed); a full resync if there is no usable log: it was off
  (``--dirty-region 0``), unreadable, an msync of it failed, or a run served the sources
  without replicating them (``taint``);
* a source whose identity changed while nbdrep was not serving it (path, device and inode,
  size; for a file also mtime and ctime): a full resync of that source;
* a replica whose URI or size is not the recorded one, or that differs from the source in
  any of ``SAMPLES`` 4 KiB blocks (the first, the last and the rest at random) outside what
  was left outstanding, since after a clean stop the two must be equal there: a full resync
  of that source (a different image behind the same URI, a replica written by a test
  failover);
* a source not in the record (an added export): a full sync of that source only.

A block device cannot show outside writes (no mtime): the README says so, and
``--resync full`` is for that case.
"""
import array
import bisect
import fcntl
import json
import os
import random
import stat
import uuid

from reporter.report import Report, clip, merge as reports_merge

FILE = "replication.json"
LOCK_FILE = "lock"
VERSION = 1
KEYS = ("session_id", "clean", "committed_cycle", "rp_time", "next_cycle", "sources", "replicas",
        "outstanding")
# Ids reserved ahead of the open cycle while a run is in progress: a year of failed cycles
# retried every 30 s.
RESERVE = 1 << 20
SAMPLES = 64
SAMPLE_BLOCK = 4096


class RecordError(Exception):
    """The record cannot be read; the message says how to start afresh."""


def identity(path, fd, size):
    """What names a source of ``size`` bytes and shows a change made while nbdrep was not
    serving it (for a file: mtime and ctime; a block device shows none). O(1)."""
    st = os.fstat(fd)
    block = stat.S_ISBLK(st.st_mode)
    out = {"path": os.path.realpath(path), "dev": st.st_rdev if block else st.st_dev,
           "ino": 0 if block else st.st_ino, "block": block, "size": size}
    if not block:
        out.update(mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
    return out


def load(state_dir):
    """The record in ``state_dir``, or None if there is none. O(size of the record)."""
    path = os.path.join(state_dir, FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RecordError(f"replication record {path} is unreadable ({e}); move it away to "
                          "start afresh with a full sync") from None
    if not isinstance(record, dict) or record.get("version") != VERSION or \
            any(key not in record for key in KEYS):
        raise RecordError(f"replication record {path} is not a version {VERSION} record; move "
                          "it away to start afresh with a full sync")
    return record


def lock(state_dir):
    """Take the state directory for this process, until it exits: an exclusive flock on
    ``LOCK_FILE``, whose descriptor is returned and must stay open. Two runs on one directory
    would overwrite each other's record and dirty-region log. Raises RecordError naming the
    run that holds it. O(1)."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RecordError(_in_use(state_dir, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_unlocked(state_dir):
    """Raise RecordError if another run holds ``state_dir`` (see ``lock``); creates nothing.
    O(1)."""
    try:
        fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return   # no lock file (or no directory): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RecordError(_in_use(state_dir, os.pread(fd, 32, 0).decode(errors="replace").strip())) \
            from None
    finally:
        os.close(fd)


def _in_use(state_dir, holder):
    return (f"state directory {state_dir} is in use by another nbdrep serve (pid {holder or '?'}); "
            "give this one its own --state")


def save(state_dir, record):
    """Replace the record crash-safely. Cost: two fsyncs."""
    write_json(os.path.join(state_dir, FILE), record)


def taint(state_dir):
    """Mark a record as not clean and without a dirty-region log, before a run serves its
    sources without replicating them: their next replicated start then resyncs in full. A record that cannot be read is
    left as it is: the next replicated start refuses it anyway, with a clear message.
    O(size of the record)."""
    try:
        record = load(state_dir)
    except RecordError:
        return
    if record is not None and (record["clean"] or record.get("dirty_log")):
        record["clean"], record["dirty_log"] = False, None
        save(state_dir, record)


def write_json(path, obj):
    """Replace the JSON file ``path`` crash-safely (``write_bytes``), compact (no
    indentation). Cost: two fsyncs."""
    write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


def write_bytes(path, data):
    """Replace the file ``path`` with ``data`` crash-safely: a temporary file, fsync, rename
    over the old one, fsync of the directory; after a crash it is the old file or the new one,
    whole. Cost: two fsyncs."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make(session_id, *, clean, committed_cycle, rp_time, next_cycle, sources, replicas,
         outstanding=None, names=None, dirty_log=None):
    """A record: ``sources`` {name: identity}, ``replicas`` {name: {"uri", "size"}},
    ``outstanding`` a Report (or None) whose devices ``names`` {dev: name} names,
    ``dirty_log`` the run's dirty-region log as ``DirtyLog.describe`` gives it (or None: off,
    or unreliable). O(outstanding extents)."""
    left = {}
    if outstanding:
        left = {name: {"data": outstanding.data_of(dev).tolist(), "zero": outstanding.zero_of(dev).tolist()}
                for dev, name in names.items() if outstanding.data_of(dev) or outstanding.zero_of(dev)}
    return {"version": VERSION, "session_id": session_id, "clean": clean,
            "committed_cycle": committed_cycle, "rp_time": rp_time, "next_cycle": next_cycle,
            "sources": sources, "replicas": replicas, "outstanding": left, "dirty_log": dirty_log}


class Plan:
    """How this run starts: ``session_id``, ``first_cycle``, ``resume`` {dev: Report}
    (outstanding extents of sources that resume), ``full`` {dev: reason} (sources to sync in
    full), ``committed_cycle`` and ``rp_time`` carried over, ``how`` for status, and
    ``crashed``: the last run did not stop cleanly (None: there was no last run)."""

    def __init__(self, session_id, first_cycle, resume, full, committed_cycle, rp_time, how,
                 crashed=None):
        self.session_id, self.first_cycle = session_id, first_cycle
        self.resume, self.full = resume, full
        self.committed_cycle, self.rp_time, self.how = committed_cycle, rp_time, how
        self.crashed = crashed


def plan(record, devices, resync_full=False, sample=None, marks=None, marked="regions"):
    """Decide how this run starts from ``record`` (or None) for ``devices`` (each with
    ``dev``, ``name``, ``size``, ``identity`` and ``replica_uri``/``replica_size``).
    ``sample(device, offsets)`` returns the first offset where the source and the replica
    differ, or None (not called when None). ``marks``, for a record of a run that did not stop
    cleanly: the parts its dirty-region log marked, {name: flat pairs}, or why there are none
    (a string); ``marked`` says what they are (``dirtylog.read``). O(sources + outstanding extents), plus the samples."""
    if record is None or resync_full:
        reason = "--resync full" if resync_full and record is not None else "first run: initial sync"
        return Plan(uuid.uuid4().hex, 1 if record is None else record["next_cycle"],
                    {}, {d.dev: reason for d in devices}, 0, None, f"full sync ({reason})",
                    None if record is None else not record["clean"])
    crashed = not record["clean"]
    if crashed and not isinstance(marks, dict):
        reason = f"the last run did not stop cleanly (killed or power lost) and {marks}"
        return Plan(record["session_id"], record["next_cycle"], {},
                    {d.dev: reason for d in devices}, record["committed_cycle"], record["rp_time"],
                    f"full resync ({reason})", crashed)
    resume, full = {}, {}
    for d in devices:
        why = _changed(record, d, crashed)
        if why:
            full[d.dev] = why
            continue
        if crashed:
            resume[d.dev] = Report({d.dev: clip(marks.get(d.name, array.array("Q")), d.size)})
        else:
            resume[d.dev] = _report(record["outstanding"].get(d.name), d.dev)
        why = _sampled(d, resume[d.dev], sample)
        if why:
            full[d.dev] = why
            del resume[d.dev]
    outstanding = sum(r.byte_count() for r in resume.values())
    if crashed:
        how = (f"resync after a crash: the last run did not stop cleanly, {outstanding} bytes "
               f"of the {marked} its dirty-region log marked")
    else:
        how = f"resumed after a clean stop ({outstanding} bytes outstanding)"
    if full:
        how = "; ".join([f"{_label(d)}: full resync ({full[d.dev]})" for d in devices
                         if d.dev in full] + ([how] if resume else []))
    return Plan(record["session_id"], record["next_cycle"], resume, full,
                record["committed_cycle"], record["rp_time"], how, crashed)


def _changed(record, d, crashed=False):
    """Why source ``d`` cannot resume from ``record``, or None. After a crash the source's
    times say nothing (the crashed run wrote to it); its dirty-region log covers those writes."""
    known, replica = record["sources"].get(d.name), record["replicas"].get(d.name)
    if known is None:
        return "a new export"
    for key in ("path", "dev", "ino", "block", "size") + (() if crashed else ("mtime_ns", "ctime_ns")):
        if known.get(key) != d.identity.get(key):
            return f"the source changed while nbdrep was not serving it ({key})"
    if replica is None or replica["uri"] != d.replica_uri:
        return "the replica is not the recorded one (URI)"
    if replica["size"] != d.replica_size:
        return f"the replica is not the recorded one (size {d.replica_size}, was {replica['size']})"
    return None


def sample_offsets(size, outstanding, rng, count=SAMPLES, block=SAMPLE_BLOCK):
    """Block-aligned offsets to compare: the first and last block and the rest at random,
    none overlapping ``outstanding`` (flat pairs). O(count * log extents)."""
    last = max(0, (size - 1) // block)
    starts = outstanding[0::2]
    ends = [o + n for o, n in zip(outstanding[0::2], outstanding[1::2])]

    def clear(at):
        i = bisect.bisect_right(ends, at)
        return i >= len(starts) or starts[i] >= at + block

    picks = [0, last] + [rng.randint(0, last) for _ in range(count - 2)]
    return sorted({b * block for b in picks if clear(b * block)})


def _sampled(d, outstanding, sample):
    """Why the replica of ``d`` is not the one recorded, judged by sampled blocks, or None."""
    if sample is None:
        return None
    left = reports_merge(outstanding.data_of(d.dev), outstanding.zero_of(d.dev))
    at = sample(d, sample_offsets(d.size, left, random.Random()))
    if at is None:
        return None
    return f"the replica is not the recorded one (it differs from the source at offset {at})"


def _report(outstanding, dev):
    if not outstanding:
        return Report()
    return Report({dev: array.array("Q", outstanding["data"])},
                  {dev: array.array("Q", outstanding["zero"])})


def _label(d):
    return f"export {d.name or '(default)'!r}"
