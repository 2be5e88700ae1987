"""The durable replication record: what a restart needs to copy only what may differ.

Theory of operation
-------------------
One JSON file per state directory (one session, i.e. consistency group, per state directory,
as the control socket's default already implies), written crash-safely: a temporary file,
fsync, rename over the old one, fsync of the directory. So after a crash at any instant the
file is the old record or the new one, never a mix.

It holds the session id (made at the first full sync; with a cycle id it names an RP for the
life of the session), the last committed cycle and its RP time, the next cycle id (so ids
continue across restarts), each source's identity, each replica's URI and size, whether the
last run stopped cleanly, and what it left outstanding.

The driver writes it at every commit (``clean`` false: a run is in progress) and once at a
clean stop (``clean`` true, with the outstanding report: nothing if the final RP committed,
else the carry). ``plan`` reads it at start and decides, per source, between resuming (copy
the outstanding report, often nothing) and a full resync, with the reason:

* no record, or ``--resync full``: a full sync;
* the last run did not stop cleanly (kill -9, power loss): a full resync, since writes may
  have reached a source without reaching the replica and nothing recorded which (the
  dirty-region log of issue 9 will narrow this);
* a source whose identity changed while nbdrep was not serving it (path, device and inode,
  size; for a file also mtime and ctime): a full resync of that source;
* a replica whose URI or size is not the recorded one: a full resync of that source;
* a source not in the record (an added export): a full sync of that source only.

A block device cannot show outside writes (no mtime): the README says so, and
``--resync full`` is for that case.
"""
import json
import os
import stat
import uuid

from reporter.report import Report, pack

FILE = "replication.json"
VERSION = 1


class RecordError(Exception):
    """The record cannot be read; the message says how to start afresh."""


def identity(path, fd):
    """What names a source and shows a change made while nbdrep was not serving it. O(1)."""
    st = os.fstat(fd)
    block = stat.S_ISBLK(st.st_mode)
    out = {"path": os.path.realpath(path), "dev": st.st_rdev if block else st.st_dev,
           "ino": 0 if block else st.st_ino, "block": block}
    if not block:
        out.update(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
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
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise RecordError(f"replication record {path} is not version {VERSION}; move it away "
                          "to start afresh with a full sync")
    return record


def save(state_dir, record):
    """Replace the record crash-safely (temporary file, fsync, rename, fsync the directory).
    Cost: two fsyncs."""
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make(session_id, *, clean, committed_cycle, rp_time, next_cycle, sources, replicas,
         outstanding=None):
    """A record: ``sources`` {name: identity}, ``replicas`` {name: {"uri", "size"}},
    ``outstanding`` {name: Report-as-JSON} (None: nothing). O(outstanding extents)."""
    return {"version": VERSION, "session_id": session_id, "clean": clean,
            "committed_cycle": committed_cycle, "rp_time": rp_time, "next_cycle": next_cycle,
            "sources": sources, "replicas": replicas, "outstanding": outstanding or {}}


class Plan:
    """How this run starts: ``session_id``, ``first_cycle``, ``resume`` {dev: Report}
    (outstanding extents of sources that resume), ``full`` {dev: reason} (sources to sync in
    full), ``committed_cycle`` and ``rp_time`` carried over, and ``how`` for status."""

    def __init__(self, session_id, first_cycle, resume, full, committed_cycle, rp_time, how):
        self.session_id, self.first_cycle = session_id, first_cycle
        self.resume, self.full = resume, full
        self.committed_cycle, self.rp_time, self.how = committed_cycle, rp_time, how


def plan(record, devices, resync_full=False):
    """Decide how this run starts from ``record`` (or None) for ``devices`` (each with
    ``dev``, ``name``, ``identity`` and ``replica_uri``/``replica_size``). O(sources +
    outstanding extents)."""
    if record is None or resync_full:
        reason = "--resync full" if resync_full and record is not None else "first run: initial sync"
        return Plan(uuid.uuid4().hex, 1 if record is None else record["next_cycle"],
                    {}, {d.dev: reason for d in devices}, 0, None, f"full sync ({reason})")
    if not record["clean"]:
        reason = "the last run did not stop cleanly (killed or power lost)"
        return Plan(record["session_id"], record["next_cycle"], {},
                    {d.dev: reason for d in devices}, record["committed_cycle"], record["rp_time"],
                    f"full resync ({reason})")
    resume, full = {}, {}
    for d in devices:
        why = _changed(record, d)
        if why:
            full[d.dev] = why
        else:
            resume[d.dev] = _report(record["outstanding"].get(d.name), d.dev)
    if full:
        how = "; ".join(f"{_label(d)}: full resync ({full[d.dev]})" for d in devices if d.dev in full)
    else:
        outstanding = sum(r.byte_count() for r in resume.values())
        how = f"resumed after a clean stop ({outstanding} bytes outstanding)"
    return Plan(record["session_id"], record["next_cycle"], resume, full,
                record["committed_cycle"], record["rp_time"], how)


def _changed(record, d):
    """Why source ``d`` cannot resume from ``record``, or None."""
    known, replica = record["sources"].get(d.name), record["replicas"].get(d.name)
    if known is None:
        return "a new export"
    for key in ("path", "dev", "ino", "block", "size", "mtime_ns", "ctime_ns"):
        if known.get(key) != d.identity.get(key):
            return f"the source changed while nbdrep was not serving it ({key})"
    if replica is None or replica["uri"] != d.replica_uri:
        return "the replica is not the recorded one (URI)"
    if replica["size"] != d.replica_size:
        return f"the replica is not the recorded one (size {d.replica_size}, was {replica['size']})"
    return None


def _report(outstanding, dev):
    if not outstanding:
        return Report()
    return Report({dev: pack(outstanding["data"])}, {dev: pack(outstanding["zero"])})


def _label(d):
    return f"export {d.name or '(default)'!r}"
