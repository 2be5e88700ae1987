"""The receiver's control socket: ``nbdrep status``, ``rps`` and ``restore`` talk to it
(``stopped_status`` is what ``rps`` reads instead when no receiver answers).

The same protocol as ``nbd_plugin.control`` (one JSON line each way), with the receiver's
commands:

    {"cmd": "status"}   -> the store's status dict (role "receiver")
    {"cmd": "metrics"}  -> {"text": Prometheus exposition text}
    {"cmd": "restore", "export": NAME, "cycle": N, "output": PATH}
                        -> {"restored": bool}: RP N of NAME written into PATH
    {"cmd": "promote", "cycle": N}
                        -> {"promoted": N}: the targets are RP N, and receive no more
"""
import contextlib
import math
import os
import stat

from nbd_plugin.control import ControlServer
from receiver import store as stores


class ReceiverControl(ControlServer):
    def handle(self, request):
        cmd = request.get("cmd")
        if cmd == "status":
            return self.session.status()
        if cmd == "metrics":
            return {"text": prometheus(self.session.status())}
        if cmd == "restore":
            return restore(self.session, request.get("export"), request.get("cycle"),
                           request.get("output"))
        if cmd == "promote":
            return promote(self.session, request.get("cycle"))
        return {"error": f"unknown command {cmd!r} (this is a receiver)"}


def restore(store, name, cycle, output):
    """Write RP ``cycle`` of export ``name`` into the file or device ``output``."""
    if name not in store.sizes:
        return {"error": f"no export named {name!r}"}
    if not isinstance(cycle, int):
        return {"error": f"cycle {cycle!r} is not a cycle id"}
    if not store.retained(cycle):
        return {"error": f"RP {cycle} is not retained (see nbdrep rps)"}
    if not isinstance(output, str):
        return {"error": f"output {output!r} is not a path"}
    refusal = _unsafe_output(store, output)
    if refusal:
        return {"error": refusal}
    created = False
    try:
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        return {"error": f"cannot open {output!r}: {e.strerror}"}
    try:
        error = _write_rp(store, name, cycle, fd, output)
    except OSError as e:
        error = f"restoring RP {cycle} into {output}: {e.strerror}"
    finally:
        os.close(fd)
    if error is not None and created:   # nothing written: not even an empty file
        os.unlink(output)
    return {"error": error} if error else {"restored": True}


def _write_rp(store, name, cycle, fd, output):
    """Write RP ``cycle`` of ``name`` into ``fd``; an error string, or None."""
    size = store.sizes[name]
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, size)   # exactly the RP: no older file's tail after it
    elif os.lseek(fd, 0, os.SEEK_END) < size:
        return f"{output} holds {os.lseek(fd, 0, os.SEEK_END)} bytes, less than the RP's {size}"
    if not store.materialise(name, cycle, fd):
        return f"RP {cycle} was folded away meanwhile"
    return None


def _unsafe_output(store, output):
    """Why ``output`` must not be written (a target, or a file in the state directory), or
    None. Both are what a restore is meant to leave alone."""
    real = os.path.realpath(output)
    state = os.path.realpath(store.state_dir)
    if os.path.commonpath([real, state]) == state:
        return f"{output} is in the receiver's state directory {store.state_dir}"
    for target_name, base in store.bases.items():
        with contextlib.suppress(OSError):
            if os.path.samefile(output, base.path):
                return f"{output} is the target of export {target_name or '(default)'!r}"
    return None


def promote(store, cycle):
    """Make the targets RP ``cycle`` for real use; the receiver takes no more writes."""
    if not isinstance(cycle, int):
        return {"error": f"cycle {cycle!r} is not a cycle id"}
    error = store.promote(cycle)
    return {"error": error} if error else {"promoted": cycle}


def group_rp(statuses):
    """The newest cycle that every receiver of a consistency group (``statuses``: their
    status dicts) holds, retained (the base image's included) or prepared, in one session:
    with the source lost, the newest RP that the group can show as one (``promote --to`` it
    on each; a prepared one is shown first). None if there is none. O(RPs)."""
    sessions = {s["session_id"] for s in statuses}
    if len(sessions) != 1 or None in sessions:
        return None
    session, = sessions
    common = None
    for s in statuses:
        held = {rp["cycle"] for rp in s["rps"]}
        held |= {p["cycle"] for p in s["prepared"] if p["session_id"] == session}
        if s["base_cycle"] is not None and s["folding"] is None:
            held.add(s["base_cycle"])
        common = held if common is None else common & held
    return max(common, default=None)


def stopped_status(state_dir):
    """A receiver's status read from the record in ``state_dir`` alone (``nbdrep rps`` with
    no receiver answering): the keys of ``Store.status``, with None for what only a running
    receiver knows (lag, pending bytes, its --keep and --journal-max). Reads only, and without
    the state directory's lock: the record is replaced by rename, so it is read whole, old or
    new, and a lock, even a shared one, would make a receiver starting at that instant refuse
    to start. StoreError if there is no record or it cannot be read. O(RPs)."""
    r = stores.read_record(state_dir)
    if r is None:
        raise stores.StoreError(f"{state_dir} is not a receiver's state directory (no {stores.RECORD})")
    foreign = stores.StoreError(f"receiver record {os.path.join(state_dir, stores.RECORD)} is not "
                                f"an nbdrep receiver record of version {stores.VERSION}")
    try:
        status = dict(stores.record_status(r), lag=None, journal_max=None, pending_bytes=None,
                      throttled=False, keep=None, pinned=[])
    except (KeyError, TypeError, AttributeError):   # hand-edited, or another program's JSON
        raise foreign from None
    if not _well_typed(status):
        raise foreign
    return status


def _whole(v, none=True):
    return (none and v is None) or (isinstance(v, int) and not isinstance(v, bool))


def _time(v, none=True):
    return (none and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and math.isfinite(v))


def _well_typed(status):
    """Whether the figures ``rps`` prints and compares are of their types (a record that
    parsed may still not be a receiver's: hand-edited, another program's). O(RPs)."""
    return (_whole(status["committed_cycle"]) and _whole(status["base_cycle"])
            and (status["session_id"] is None or isinstance(status["session_id"], str))
            and _time(status["rp_time"]) and _time(status["commit_time"])
            and all(_whole(rp["cycle"], none=False) and _whole(rp["bytes"], none=False)
                    and _time(rp["rp_time"], none=False)
                    and _time(rp.get("commit_time"), none="commit_time" not in rp)
                    and all(isinstance(name, str) for name in rp["exports"])
                    for rp in status["rps"] + status["prepared"]))


def prometheus(status):
    """The receiver's figures in Prometheus text format 0.0.4."""
    figures = [
        ("nbdrep_receiver_committed_cycle", "Newest committed cycle.", status["committed_cycle"] or 0),
        ("nbdrep_receiver_lag_seconds", "Now minus the RP time of the newest committed cycle.",
         -1 if status["lag"] is None else round(status["lag"], 3)),
        ("nbdrep_receiver_journal_bytes", "Bytes held by the journals of retained RPs.",
         status["journal_bytes"]),
        ("nbdrep_receiver_journal_max_bytes", "The --journal-max bound.", status["journal_max"]),
        ("nbdrep_receiver_retained_rps", "Recovery points retained.", len(status["rps"])),
        ("nbdrep_receiver_prepared_rps", "Recovery points prepared, not shown: their commit has "
         "not come (several receivers)", len(status["prepared"])),
        ("nbdrep_receiver_throttled", "1 while the copier's writes wait for folding.",
         int(status["throttled"])),
    ]
    return "".join(f"# HELP {n} {h}\n# TYPE {n} gauge\n{n} {v}\n" for n, h, v in figures)
