"""The receiver (``nbdrep receive``): atomic cycles, crash safety, RP exports, restore."""
import errno
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
import types

import nbd
import psutil
import pytest

from conftest import Server, file_digests, make_image, mounted, nbdrep, nbdrep_cmd, run, uri, wait_until
from copier import receiver as link
from nbd_plugin import control
from receiver.journal import ExtentMap, parse_keep, to_fold
from receiver import control as receiver_control, store as stores
from receiver.store import Store
from nbd_plugin.backend import Backend

MiB = 1 << 20
BLOCK = 4096
# Every commit folds: the journals may not hold even one 32 MiB generation.
FOLD_ALL = ["--keep", "2", "--journal-max", "16M"]


class Receiver:
    """An ``nbdrep receive`` under test; ``sock`` and ``control`` may be chosen per start."""

    def __init__(self, procs, tmp, targets, extra=(), sock=None, control_path=None):
        self.procs = procs
        self.sock = sock or os.path.join(tmp, "receiver.sock")
        self.control = control_path or os.path.join(tmp, "receiver-control.sock")
        self.state = os.path.join(tmp, "receiver-state")
        args = ["receive", "--socket", self.sock, "--control", self.control, "--state", self.state]
        for t in targets:
            args += ["--target", t]
        unlink_stale(self.control)
        self.proc = procs.start(nbdrep_cmd(*args, *extra), wait_for=self.control, timeout=60,
                                stdout=subprocess.DEVNULL)

    def uri(self, name=""):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def status(self):
        return control.request(self.control, {"cmd": "status"}, 10)

    def wait_committed(self, cycle):
        """Wait for the receiver's commit of ``cycle`` (after a restart of the receiver, the
        source may commit a cycle before the receiver takes a record: the next one covers it)."""
        wait_until(lambda: (self.status()["committed_cycle"] or 0) >= cycle, 60,
                   f"cycle {cycle} committed on the receiver")

    def read(self, name="", size=None):
        h = nbd.NBD()
        h.connect_uri(self.uri(name))
        try:
            size = size or h.get_size()
            return b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))
        finally:
            h.shutdown()

    def kill9(self):
        """kill -9 the nbdkit process that holds the journals (not the CLI in front of it)."""
        kill9_nbdkit(self.procs, self.proc)

    def stop(self):
        self.procs.stop(self.proc)


def unlink_stale(path):
    """A process killed with kill -9 leaves its control socket: waiting for the file to
    appear must wait for the new one."""
    if os.path.exists(path):
        os.unlink(path)


def kill9_nbdkit(procs, proc):
    """kill -9 the nbdkit that the nbdrep command ``proc`` runs, then reap ``proc``."""
    children = psutil.Process(proc.pid).children()
    assert [c.name() for c in children] == ["nbdkit"], \
        f"{proc.args[3]} (exit status {proc.poll()}) runs {[c.name() for c in children]}, not nbdkit"
    os.kill(children[0].pid, signal.SIGKILL)
    procs.wait(proc, 30)
    procs.procs.remove(proc)


def generation(g, size):
    """Every 4 KiB block names its generation and its index, so a mix of two is visible."""
    fill = bytes([g % 251 + 1]) * (BLOCK - 16)
    return b"".join(struct.pack("<QQ", g, i) + fill for i in range(size // BLOCK))


def generations_in(image):
    return sorted({struct.unpack_from("<Q", image, off)[0] for off in range(0, len(image), BLOCK)})


def write_image(sock, data):
    h = nbd.NBD()
    h.connect_uri(uri(sock))
    for off in range(0, len(data), MiB):
        h.pwrite(data[off:off + MiB], off)
    h.flush()
    h.shutdown()


# -- pure logic ---------------------------------------------------------------------------------

def test_extent_map_newest_owner_wins_and_without_returns_to_base():
    a, b = object(), object()
    m = ExtentMap().overlaid([0, 100, 200, 100], a).overlaid([50, 200], b)
    assert m.lookup(0, 400) == [(0, 50, a), (50, 200, b), (250, 50, a), (300, 100, None)]
    m = m.without(a)
    assert m.lookup(0, 400) == [(0, 50, None), (50, 200, b), (250, 150, None)]


def test_extent_map_against_a_byte_model():
    rng = random.Random(3)
    owners = [object() for _ in range(6)]
    m, model = ExtentMap(), [None] * 256
    for step in range(300):
        owner = rng.choice(owners)
        if rng.random() < 0.2:
            m = m.without(owner)
            model = [None if o is owner else o for o in model]
        else:
            starts = sorted(rng.sample(range(256), rng.randrange(0, 8) * 2))
            pairs = [v for s, e in zip(starts[0::2], starts[1::2]) for v in (s, e - s)]
            m = m.overlaid(pairs, owner)
            for s, n in zip(pairs[0::2], pairs[1::2]):
                model[s:s + n] = [owner] * n
        off = rng.randrange(256)
        pieces = m.lookup(off, rng.randrange(1, 257 - off))
        assert [o for s, n, o in pieces for _ in range(n)] == model[off:off + sum(n for _, n, _ in pieces)]
        assert pieces[0][0] == off and all(p[0] + p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
        assert all(m.starts[1:] >= m.ends[:-1]), "ranges overlap"


def test_fold_policy_count_duration_bytes_and_pins():
    rps = [{"cycle": c, "commit_time": 100.0 + c, "bytes": 10} for c in range(1, 6)]
    assert to_fold(rps, 110, 3, None, 1000) == 2
    assert to_fold(rps, 110, None, 6.5, 1000) == 3     # committed before 103.5
    assert to_fold(rps, 9999, None, 6.5, 1000) == 4    # the newest stays, however old
    assert to_fold(rps, 110, None, None, 25) == 3      # 50 bytes held, 25 allowed
    assert to_fold(rps, 110, 3, None, 1000, pinned=1) == 1
    assert parse_keep("100") == (100, None) and parse_keep("2h") == (None, 7200.0)


# -- the store, in process ----------------------------------------------------------------------

def open_store(tmp_path, size=MiB, **kw):
    """A Store on one target of ``size`` bytes in ``tmp_path`` (no fold thread: folds only
    where a commit or the test makes them)."""
    target = str(tmp_path / "t.img")
    if not os.path.exists(target):
        make_image(target, size)
    return Store(str(tmp_path / "state"), [("", target)], **kw)


def commit_block_0(store, cycles):
    """Commit each of ``cycles`` (session "a") with block 0 written to the cycle's number."""
    for cycle in cycles:
        store.write("", bytes([cycle]) * BLOCK, 0)
        store.commit("a", cycle, float(cycle))


def read_rp(store, cycle, size=MiB):
    extents = store.attach("", cycle)
    assert extents is not None, f"RP {cycle} not retained"
    try:
        buf = bytearray(size)
        store.read("", extents, buf, 0)
        return bytes(buf)
    finally:
        store.detach(cycle)


def test_a_late_or_repeated_commit_changes_nothing(tmp_path):
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)   # the initial sync, straight into the target
        for cycle in (2, 3):
            s.write("", bytes([cycle]) * BLOCK, 0)
            s.commit("a", cycle, float(cycle))
        s.write("", b"\x09" * BLOCK, 0)   # cycle 4's, not committed yet
        s.commit("a", 2, 2.0)           # a late commit of an older cycle
        s.commit("a", 3, 3.0)           # a repeated one
        assert [rp["cycle"] for rp in s.record["rps"]] == [1, 2, 3]
        assert s.record["committed_cycle"] == 3
        assert read_rp(s, 3)[:BLOCK] == b"\x03" * BLOCK
        assert read_rp(s, 2)[:BLOCK] == b"\x02" * BLOCK
        s.commit("a", 4, 4.0)
        assert read_rp(s, 4)[:BLOCK] == b"\x09" * BLOCK
    finally:
        s.close()


def test_a_new_session_folds_the_old_rps_but_not_past_a_pin(tmp_path):
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        commit_block_0(s, (2, 3))
        pinned = s.attach("", 2)
        s.write("", b"\x07" * BLOCK, 0)
        with pytest.raises(OSError):
            s.commit("b", 1, 10.0)   # would fold RP 3 under the attached RP 2
        buf = bytearray(BLOCK)
        s.read("", pinned, buf, 0)
        assert buf == b"\x02" * BLOCK
        s.detach(2)
        s.commit("b", 1, 10.0)
        assert [rp["cycle"] for rp in s.record["rps"]] == [1]
        assert s.record["base_cycle"] is None and not s.retained(3)   # RP 3 of "a", no RP of "b"
        assert read_rp(s, 1)[:BLOCK] == b"\x07" * BLOCK
    finally:
        s.close()


def test_a_fold_cut_short_is_finished_at_start_and_its_base_rp_is_not_served_torn(tmp_path, monkeypatch):
    s = open_store(tmp_path)
    s.commit("a", 1, 1.0)   # RP 1: the target itself
    s.write("", b"\x02" * BLOCK, 0)
    s.write("", b"\x02" * BLOCK, 8 * BLOCK)
    s.commit("a", 2, 2.0)
    s.write("", b"\x03" * BLOCK, 16 * BLOCK)
    s.commit("a", 3, 3.0)
    rp2 = read_rp(s, 2)
    with s._fold_lock:
        s._fold_one()   # RP 1 has no journal: the base is RP 1
    assert s.record["base_cycle"] == 1 and s.retained(1)
    real = stores._fold_range
    copied = []

    def killed_after_one_range(journal, base, offset, length):
        if copied:
            raise KeyboardInterrupt("kill -9")   # not an OSError: nothing may catch it
        real(journal, base, offset, length)
        copied.append(offset)

    monkeypatch.setattr(stores, "_fold_range", killed_after_one_range)
    with pytest.raises(KeyboardInterrupt), s._fold_lock:
        s._fold_one()   # the base holds RP 2's first range, not its second
    monkeypatch.setattr(stores, "_fold_range", real)
    assert not s.retained(1) and s.attach("", 1) is None   # torn: neither RP 1 nor RP 2
    s.close()
    offline = open_store(tmp_path, readonly=True)   # restore with no receiver running
    try:
        assert not offline.retained(1)
        assert read_rp(offline, 2) == rp2
    finally:
        offline.close()
    s = open_store(tmp_path)   # a start finishes the fold
    try:
        assert s.record["base_cycle"] == 2 and s.retained(2)
        assert [rp["cycle"] for rp in s.record["rps"]] == [3]
        assert read_rp(s, 2) == rp2
    finally:
        s.close()


def test_restore_truncates_refuses_targets_and_state_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x05" * BLOCK, 0)
        s.commit("a", 2, 2.0)
        out = tmp_path / "out.img"
        out.write_bytes(b"\xff" * (2 * MiB))   # bigger than the RP
        assert receiver_control.restore(s, "", 2, str(out)) == {"restored": True}
        assert out.read_bytes() == read_rp(s, 2)
        with open(tmp_path / "t.img", "rb") as f:
            before = f.read()
        for inside in (tmp_path / "t.img", tmp_path / "state" / "x.img", tmp_path / "state" / "receiver.json"):
            assert "error" in receiver_control.restore(s, "", 2, str(inside)), inside
        assert not (tmp_path / "state" / "x.img").exists()
        with open(tmp_path / "t.img", "rb") as f:
            assert f.read() == before
        monkeypatch.setattr(s, "materialise", lambda *a: False)   # folded away meanwhile
        assert "error" in receiver_control.restore(s, "", 2, str(tmp_path / "new.img"))
        assert not (tmp_path / "new.img").exists()
    finally:
        s.close()


def test_a_commit_whose_directory_fsync_fails_keeps_the_journals_its_record_names(tmp_path, monkeypatch):
    s = open_store(tmp_path)
    s.commit("a", 1, 1.0)
    s.write("", b"\x02" * BLOCK, 0)
    real = stores.write_json

    def renamed_then_fsync_failed(path, obj):
        real(path, obj)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(stores, "write_json", renamed_then_fsync_failed)
    with pytest.raises(OSError):
        s.commit("a", 2, 2.0)
    monkeypatch.setattr(stores, "write_json", real)
    s.write("", b"\x03" * BLOCK, 0)   # the next cycle's
    s.close()
    s = open_store(tmp_path)   # the record on disk says RP 2: its journals must be there
    try:
        assert read_rp(s, 2)[:BLOCK] == b"\x02" * BLOCK
        s.commit("a", 3, 3.0)
        assert read_rp(s, 3)[:BLOCK] == b"\x03" * BLOCK
    finally:
        s.close()


def test_a_retried_commit_whose_record_may_not_be_durable_is_not_a_no_op(tmp_path, monkeypatch):
    """The copier retries a commit that failed. If the record was renamed but the directory's
    fsync failed, the retry must redo the durable write (and fail while it cannot), not return
    'already committed': the source would count a cycle that power loss can still undo."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * BLOCK, 0)
        real, writes = stores.write_json, []

        def renamed_then_fsync_failed(path, obj):
            writes.append(obj["committed_cycle"])
            real(path, obj)
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(stores, "write_json", renamed_then_fsync_failed)
        with pytest.raises(OSError):
            s.commit("a", 2, 2.0)
        with pytest.raises(OSError):   # the retry: still not durable, still an error
            s.commit("a", 2, 2.0)
        assert writes == [2, 2], "the retry did not write the record again"
        monkeypatch.setattr(stores, "write_json", real)
        s.commit("a", 2, 2.0)          # now it is durable: success
        s.commit("a", 2, 2.0)          # and a repeat is the no-op it should be
        assert read_rp(s, 2)[:BLOCK] == b"\x02" * BLOCK
    finally:
        s.close()


def test_an_unexpected_error_in_a_fold_neither_stops_folding_nor_holds_the_writes(tmp_path, monkeypatch):
    s = open_store(tmp_path, journal_max=1)   # every RP with a journal is over the bound
    real, calls = s._fold_one, []

    def a_bug_once():
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        real()

    monkeypatch.setattr(s, "_fold_one", a_bug_once)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * BLOCK, 0)
        s.commit("a", 2, 2.0)
        s.start()
        wait_until(lambda: not s.record["rps"], 30, "RP 2 folded after the failed attempt")
        assert len(calls) >= 2 and s._fold_thread.is_alive()
        writer = threading.Thread(target=s.write, args=("", b"\x03" * BLOCK, 0), daemon=True)
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "a write waits for a fold thread that is gone"
    finally:
        s.close()


def test_promote_to_the_base_rp_keeps_its_rp_time(tmp_path):
    """The base image's RP is no retained RP: its time comes from the fold that made it."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        commit_block_0(s, (2, 3))
        with s._fold_lock:
            s._fold_one()
            s._fold_one()
        assert s.record["base_cycle"] == 2 and s.retained(2)
        assert s.promote(2) is None
        assert (s.record["committed_cycle"], s.record["rp_time"]) == (2, 2.0)
        assert s.status()["lag"] is not None
    finally:
        s.close()


def test_a_committed_log_is_cut_to_its_entries(tmp_path):
    """A commit reads the entries from the mapping and cuts the log file to them: a start
    then reads 16 bytes per write of each retained RP, not a 1 MiB mapping per RP."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        log_path = s.pending[""].log_path
        assert os.path.getsize(log_path) == stores.LOG_SLOTS * 16
        for i in range(3):
            s.write("", b"\x02" * BLOCK, 2 * i * BLOCK)
        s.commit("a", 2, 2.0)
        assert os.path.getsize(log_path) == 3 * 16
        rp2 = read_rp(s, 2)
    finally:
        s.close()
    s = open_store(tmp_path)
    try:
        assert read_rp(s, 2) == rp2 and rp2[2 * BLOCK:3 * BLOCK] == b"\x02" * BLOCK
    finally:
        s.close()


def test_journal_max_bounds_the_disk_with_journals_made_from_spares(tmp_path):
    """Each pending journal takes the last fold's data file (a spare); its committed RP must
    not keep that file's old blocks on disk, uncounted, beside its own: the journal directory
    stays within --journal-max plus a few cycles, as README says."""
    cycle_bytes, journal_max = 2 * MiB, 16 * MiB
    s = open_store(tmp_path, size=64 * MiB, keep=(1000, None), journal_max=journal_max)
    try:
        s.commit("a", 1, 1.0)
        for c in range(2, 40):   # each cycle a fresh range: nothing overlaps
            s.write("", os.urandom(cycle_bytes), (c % 32) * cycle_bytes)
            s.commit("a", c, float(c))
            with s._fold_lock:   # as the fold thread does
                for _ in range(s._due()):
                    s._fold_one()
            s._reap()
            s._trim_inherited()
        on_disk = sum(os.stat(os.path.join(s.folder, e)).st_blocks * 512 for e in os.listdir(s.folder))
        assert s.retained_bytes() <= journal_max
        assert on_disk <= journal_max + 3 * cycle_bytes + 2 * MiB, f"{on_disk / MiB:.1f} MiB on disk"
    finally:
        s.close()


def test_a_write_whose_log_cannot_grow_fails_alone(tmp_path, monkeypatch):
    """A failed growth of the pending log (ENOMEM from mmap) fails that write; it must not
    stay counted as in flight, or every later commit, fence and fold would wait for it."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        j = s.pending[""]
        s.write("", b"\x01" * BLOCK, 0)

        def cannot_grow(need):
            raise OSError(errno.ENOMEM, "cannot map the log")
        monkeypatch.setattr(j, "slots", 1)   # the next write needs a slot past the mapping
        monkeypatch.setattr(j, "_grow", cannot_grow)
        with pytest.raises(OSError):
            s.write("", b"\x02" * BLOCK, BLOCK)
        assert not s._inflight
        monkeypatch.undo()
        done = threading.Thread(target=s.commit, args=("a", 2, 2.0), daemon=True)
        done.start()
        done.join(30)
        assert not done.is_alive(), "the commit waits for a write that failed"
        assert read_rp(s, 2)[:BLOCK] == b"\x01" * BLOCK
    finally:
        s.close()


def test_the_fold_thread_goes_on_when_a_journal_cannot_be_deleted(tmp_path, monkeypatch):
    """A folded journal whose files cannot be deleted (EIO) is logged and left for the next
    start; the fold thread must go on folding, or nothing would bound the journals."""
    def cannot_delete(self):
        raise OSError(errno.EIO, "cannot delete")

    def cannot_trim(*args):
        raise OSError(errno.EIO, "cannot trim")
    monkeypatch.setattr(stores.Journal, "unlink", cannot_delete)
    monkeypatch.setattr(stores, "_trim_outside", cannot_trim)   # so no spare is kept either
    s = open_store(tmp_path, keep=(1, None))
    s.start()
    try:
        s.commit("a", 1, 1.0)
        for c in range(2, 6):
            s.write("", bytes([c]) * BLOCK, c * BLOCK)
            s.commit("a", c, float(c))
            wait_until(lambda: len(s.record["rps"]) == 1, 30, f"RPs before {c} folded")
        assert s._fold_thread.is_alive()
        assert read_rp(s, 5)[2 * BLOCK:6 * BLOCK] == b"".join(bytes([c]) * BLOCK for c in range(2, 6))
    finally:
        monkeypatch.undo()
        s.close()


def test_a_spare_is_kept_when_its_folded_log_cannot_be_deleted(tmp_path, monkeypatch):
    """The folded journal's data file is renamed into a spare before its log is deleted: a
    log that cannot be deleted is the next start's leftover, and the spare is still reused
    (else it would sit on disk, unused and uncounted, until that start)."""
    s = open_store(tmp_path)
    real_unlink = os.unlink

    def logs_cannot_go(path, *args, **kwargs):
        if str(path).endswith(".log"):
            raise OSError(errno.EIO, "cannot delete")
        return real_unlink(path, *args, **kwargs)

    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * BLOCK, 0)
        s.commit("a", 2, 2.0)
        folded = s.record["rps"][1]["journals"][""]
        with s._fold_lock:
            s._fold_one()
            s._fold_one()
        monkeypatch.setattr(stores.os, "unlink", logs_cannot_go)
        s._reap()   # logs the EIO
        monkeypatch.undo()
        assert s._spares, "the spare was dropped with its log"
        assert os.path.exists(os.path.join(s.folder, f"{folded}.log"))   # the leftover
        s.write("", b"\x03" * BLOCK, BLOCK)
        s.commit("a", 3, 3.0)
        assert not s._spares, "the next pending journal did not take the spare"
        assert read_rp(s, 3)[:2 * BLOCK] == b"\x02" * BLOCK + b"\x03" * BLOCK
    finally:
        monkeypatch.undo()
        s.close()


def test_the_pending_log_is_compacted_while_commits_fail(tmp_path, monkeypatch):
    """Commits that keep failing leave one pending journal taking every retried cycle's
    writes; its log must stay near the size of their union, not grow 16 bytes a write."""
    monkeypatch.setattr(stores, "LOG_SLOTS", 64)
    s = open_store(tmp_path)
    expected = bytearray(MiB)

    def retried_cycle(gen):   # the same four blocks, sent again and again
        for i in range(2000):
            off = (i % 4) * 2 * BLOCK
            s.write("", bytes([gen]) * BLOCK, off)
            expected[off:off + BLOCK] = bytes([gen]) * BLOCK

    try:
        s.commit("a", 1, 1.0)
        log_path = s.pending[""].log_path
        retried_cycle(2)
        assert os.path.getsize(log_path) >= 2000 * 16
        s.start()
        compact = 4 * 64 * 16
        wait_until(lambda: os.path.getsize(log_path) <= compact, 20, "the pending log compacted")
        retried_cycle(3)   # while the fold thread compacts
        wait_until(lambda: os.path.getsize(log_path) <= compact, 20, "the pending log compacted again")
    finally:
        s.close()
    s = open_store(tmp_path)   # a restart takes the compacted log as the pending one
    try:
        s.commit("a", 2, 2.0)
        assert read_rp(s, 2) == expected
    finally:
        s.close()


def test_a_read_of_the_newest_rp_is_not_torn_by_folds_meanwhile(tmp_path, monkeypatch):
    """A read of NAME takes the newest RP's map, which sends block 1 to the base image. If
    RP 3 changes block 1 and is folded into the base before that read reaches it, the read
    must not return RP 2's block 0 with RP 3's block 1: the fold waits for it."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * BLOCK, 0)
        s.commit("a", 2, 2.0)
        base = s.bases[""]
        real_pread, real_grace = base.pread, s._grace
        in_base, go_on, in_grace = threading.Event(), threading.Event(), threading.Event()

        def paused(buf, offset):
            if threading.current_thread() is reader:
                in_base.set()
                go_on.wait(30)
            real_pread(buf, offset)

        def grace():
            in_grace.set()
            real_grace()

        monkeypatch.setattr(base, "pread", paused)
        monkeypatch.setattr(s, "_grace", grace)
        out = bytearray(2 * BLOCK)
        reader = threading.Thread(target=s.read, args=("", None, out, 0), daemon=True)
        reader.start()
        assert in_base.wait(30), "the read did not reach the base image"
        s.write("", b"\x03" * BLOCK, BLOCK)
        s.commit("a", 3, 3.0)

        def fold_all():
            with s._fold_lock:
                while s.record["rps"]:
                    s._fold_one()

        folder = threading.Thread(target=fold_all, daemon=True)
        folder.start()
        wait_until(lambda: in_grace.is_set() or not folder.is_alive(), 30, "the fold waiting or done")
        go_on.set()
        reader.join(30)
        folder.join(30)
        assert not reader.is_alive() and not folder.is_alive()
        assert s.record["base_cycle"] == 3
        assert bytes(out) == b"\x02" * BLOCK + bytes(BLOCK), "a read mixed RP 2 and RP 3"
    finally:
        s.close()


def test_a_folded_journal_file_is_reused_and_shows_none_of_its_old_bytes(tmp_path):
    """The data file of a folded journal becomes the next pending journal (allocated, cached:
    cheaper to write than a fresh sparse file). Its old bytes must never be read, and once
    folded again it keeps only the ranges its last RP logged (no stale blocks piling up)."""
    s = open_store(tmp_path)

    def data_blocks(path):
        b = Backend(path)
        try:
            return [(o // BLOCK, n // BLOCK) for o, n, hole in b.extents(0, MiB) if not hole]
        finally:
            b.close()

    def fold_all():
        with s._fold_lock:
            while s.record["rps"]:
                s._fold_one()
        s._reap()

    try:
        s.commit("a", 1, 1.0)
        for gen in (2, 3):   # RP 3 rewrites what RP 2 wrote: RP 2's file then holds stale bytes
            s.write("", bytes([gen]) * 8 * BLOCK, 0)
            s.commit("a", gen, float(gen))
        rp2_file = os.stat(os.path.join(s.folder, f"{s.record['rps'][1]['journals']['']}.data")).st_ino
        fold_all()
        s.write("", b"\x04" * BLOCK, 9 * BLOCK)
        s.commit("a", 4, 4.0)
        reused = s.pending[""]
        assert os.stat(reused.data_path).st_ino == rp2_file, "the spare was not reused"
        s.write("", b"\x05" * BLOCK, BLOCK)
        s.zero("", 3 * BLOCK, BLOCK)
        s.commit("a", 5, 5.0)
        expected = bytearray(MiB)
        expected[:8 * BLOCK] = b"\x03" * 8 * BLOCK
        expected[BLOCK:2 * BLOCK] = b"\x05" * BLOCK
        expected[3 * BLOCK:4 * BLOCK] = bytes(BLOCK)
        expected[9 * BLOCK:10 * BLOCK] = b"\x04" * BLOCK
        assert read_rp(s, 5) == expected, "a reused journal showed its old bytes"
        with s._fold_lock:
            s._fold_one()   # RP 4
        s._reap()
        os.unlink(s._spares.pop(""))   # so that RP 5's reused file is kept next
        with s._fold_lock:
            s._fold_one()
        s._reap()
        assert read_rp(s, 5) == expected
        (spare,) = s._spares.values()
        assert data_blocks(spare) == [(1, 1)], "the kept file holds more than its RP logged"
        s.write("", b"\x06" * BLOCK, 0)
        s.commit("a", 6, 6.0)
        pinned = s.attach("", 6)
        assert pinned is not None
        s.write("", b"\x07" * BLOCK, 0)
        s.commit("a", 7, 7.0)
        s._spares.clear()
        with s._fold_lock:
            s._fold_one()   # RP 6, under its attached export: its file must not be reused
        s._reap()
        assert not s._spares
        buf = bytearray(BLOCK)
        s.read("", pinned, buf, 0)
        assert buf == b"\x06" * BLOCK
        s.detach(6)
    finally:
        s.close()


def test_a_commit_does_not_wait_for_a_folded_journals_files_to_go(tmp_path, monkeypatch):
    """Deleting a folded journal can take seconds (freeing scattered blocks on a file system
    mounted with discard): the fold thread does it after letting commits in again."""
    s = open_store(tmp_path, journal_max=1)   # every RP with a journal is folded at once
    deleting, go_on = threading.Event(), threading.Event()
    real = s._retire

    def slow_retire(name, j):
        deleting.set()
        go_on.wait(30)
        real(name, j)

    monkeypatch.setattr(s, "_retire", slow_retire)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * BLOCK, 0)
        s.commit("a", 2, 2.0)
        s.write("", b"\x03" * BLOCK, 0)
        s.start()
        assert deleting.wait(30), "RP 2 was not folded"
        committer = threading.Thread(target=s.commit, args=("a", 3, 3.0), daemon=True)
        committer.start()
        committer.join(20)
        assert not committer.is_alive(), "the commit waited for a fold's file deletion"
    finally:
        go_on.set()
        s.close()


# -- end to end ---------------------------------------------------------------------------------

def test_writes_are_invisible_until_the_commit_record(procs, tmp_path):
    target = make_image(str(tmp_path / "t.img"), 8 * MiB)
    r = Receiver(procs, str(tmp_path), [target])
    lk = link.Link([r.uri()])
    lk.fence(r.uri(), "s1", None)   # as a copier does before it opens data connections
    h = nbd.NBD()
    h.connect_uri(r.uri())
    # Before a first commit there is no RP: writes (an initial sync) go into the target, and
    # nothing is read (the target is torn until the sync commits), not even an RP export.
    h.pwrite(b"S" * 4096, 0)
    with pytest.raises(nbd.Error, match="Input/output error"):
        h.pread(4, 0)
    with pytest.raises(nbd.Error):
        r.read("@0", BLOCK)
    assert lk.commit("s1", 6, time.time()) == 1
    assert h.pread(4, 0) == b"SSSS"
    assert r.read("@6", BLOCK)[:4] == b"SSSS"
    h.pwrite(b"A" * 65536, 4096)
    h.flush()
    assert h.pread(8, 4096) == bytes(8), "a write before its commit is visible"
    assert lk.commit("s1", 7, time.time()) == 1
    assert h.pread(8, 4096) == b"A" * 8
    h.pwrite(b"B" * 4096, 4096)
    h.zero(4096, 8192)
    h.flush()
    assert lk.commit("s1", 8, time.time()) == 1
    assert (h.pread(4, 4096), h.pread(4, 8192), h.pread(4, 12288)) == (b"BBBB", bytes(4), b"AAAA")
    h.shutdown()
    assert r.read("@7", 16384)[4096:] == b"A" * 12288
    assert [rp["cycle"] for rp in r.status()["rps"]] == [6, 7, 8]
    # A plain nbdkit file export is never written by the link: it is not a receiver.
    assert link.probe(uri(r.sock)) is not None
    with open(target, "rb") as f:
        assert f.read(16384) == b"S" * 4096 + bytes(12288), "the target changed while RPs are retained"


def test_a_failed_metadata_connection_is_retried_not_taken_for_a_plain_export(procs, tmp_path, monkeypatch):
    r = Receiver(procs, str(tmp_path), [make_image(str(tmp_path / "t.img"), MiB)])
    real, calls = link.connect, []

    def out_of_descriptors_once(uri, **kw):
        calls.append(uri)
        if len(calls) == 1:
            raise link.ReplicaError("cannot connect: Too many open files", 24)
        return real(uri, **kw)

    monkeypatch.setattr(link, "connect", out_of_descriptors_once)
    links = link.Link([r.uri()])
    links.commit("s1", 1, time.time())   # the failure may cost this commit, not the session's
    assert links.commit("s1", 2, time.time()) == 1
    assert r.status()["committed_cycle"] == 2
    links.close()


def test_a_stopped_receiver_does_not_hold_the_commit_or_the_close(procs, tmp_path):
    r = Receiver(procs, str(tmp_path), [make_image(str(tmp_path / "t.img"), MiB)])
    links = link.Link([r.uri()], timeout=1.0)
    assert links.commit("s1", 1, time.time()) == 1
    nbdkit = psutil.Process(r.proc.pid).children()[0]
    nbdkit.suspend()
    try:
        results = []
        worker = threading.Thread(target=lambda: (results.append(links.commit("s1", 2, time.time())),
                                                  links.close()), daemon=True)
        worker.start()
        worker.join(20)   # two attempts of a write, a reconnect: ~4 s of timeouts, closes ~1 s
        assert not worker.is_alive(), "a commit to a stopped receiver does not return"
        assert results == [0]
        assert links.unsettled, "a record that may land late must make the caller fence first"
    finally:
        nbdkit.resume()
    assert links.commit("s1", 3, time.time()) == 1
    assert not links.unsettled
    links.close()


def test_every_commit_is_recorded_before_a_receiver_shows_it(procs, tmp_path):
    """Under sub-second cycles the source writes its record at most once a second, but not
    where a replica is a receiver: one that showed a newer cycle than the record would read,
    after a crash of the source, as another history and be resynced in full. The receiver's
    committed cycle, read first, never passes the record's, read after."""
    size, tmp = 4 * MiB, str(tmp_path)
    src = make_image(str(tmp_path / "source.img"), size)
    r = Receiver(procs, tmp, [make_image(str(tmp_path / "target.img"), size)])
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "0.05"])
    first = server.rp()
    h = nbd.NBD()
    h.connect_uri(server.uri)
    deadline, shown = time.monotonic() + 120, 0
    try:
        for i in range(20000):
            h.pwrite(bytes([i % 251 + 1]) * 4096, (i % 64) * 4096)
            shown = r.status()["committed_cycle"] or 0
            with open(os.path.join(tmp, "state", "replication.json")) as f:
                recorded = json.load(f)["committed_cycle"] or 0
            assert shown <= recorded, f"the receiver shows cycle {shown}, the record names {recorded}"
            if shown >= first + 20 or time.monotonic() > deadline:
                break
        assert shown >= first + 20, f"the receiver showed cycles {first}..{shown} only"
    finally:
        h.shutdown()


def test_a_receiver_restarted_on_another_state_gets_no_commit_over_it(procs, tmp_path):
    target = make_image(str(tmp_path / "t.img"), MiB)
    r = Receiver(procs, str(tmp_path), [target])
    links = link.Link([r.uri()])
    assert links.commit("s1", 1, time.time()) == 1
    links.close()   # as the driver does after a failed cycle
    r.stop()
    other = tmp_path / "other"
    other.mkdir()
    r = Receiver(procs, str(other), [target], sock=r.sock)   # a fresh state directory
    assert links.commit("s1", 2, time.time()) == 0
    assert r.status()["committed_cycle"] is None
    assert links.commit("s1", 3, time.time()) == 0, "committed over another history"
    assert "no commit of this session" in links.take_diverged()[link.meta_uri(r.uri())]
    assert links.commit("s1", 4, time.time()) == 1   # the caller resynced it in full meanwhile
    links.close()


def generation_1_on_a_receiver(procs, tmp_path, size):
    """A source replicating to a receiver (1 h cycles), generation 1 committed there:
    (source path, target path, Receiver, Server)."""
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, str(tmp_path), [target])
    server = Server(procs, str(tmp_path), [src], [r.uri()], extra=["--cycle", "3600"])
    write_image(server.sock, generation(1, size))
    r.wait_committed(server.rp())
    return src, target, r, server


def test_the_session_resyncs_in_full_a_receiver_restarted_on_another_state(procs, tmp_path):
    size, tmp = 4 * MiB, str(tmp_path)
    src, target, r, server = generation_1_on_a_receiver(procs, tmp_path, size)
    r.kill9()
    os.rename(r.state, r.state + ".old")
    with open(target, "r+b") as t:   # what the fresh state directory knows nothing of
        t.write(bytes(size))
    r = Receiver(procs, tmp, [target])
    write_image(server.sock, generation(2, MiB))   # an increment of 1 MiB
    server.rp()   # copies the increment, then finds the receiver's other history
    r.wait_committed(server.rp())
    with open(src, "rb") as f:
        assert r.read() == f.read(), "an increment committed over another history"


def test_rps_restore_and_rp_export_while_replicating(procs, tmp_path):
    size = 4 * MiB
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, str(tmp_path), [target], extra=["--keep", "3"])
    server = Server(procs, str(tmp_path), [src], [r.uri()], extra=["--cycle", "3600"])
    server.rp()
    cycles = []
    for g in range(1, 6):
        write_image(server.sock, generation(g, size))
        cycles.append(server.rp())
        r.wait_committed(cycles[-1])
        assert r.read() == generation(g, size)
    wait_until(lambda: len(r.status()["rps"]) <= 3, 60, "the fold down to --keep 3")
    status = r.status()
    assert [rp["cycle"] for rp in status["rps"]] == cycles[-3:], "--keep 3 keeps the newest three"
    assert status["base_cycle"] == cycles[-4]
    assert r.read(f"@{cycles[-3]}") == generation(3, size)
    out = str(tmp_path / "restored.img")
    nbdrep("restore", "--control", r.control, "--state", r.state, "--to", str(cycles[-2]), out)
    with open(out, "rb") as f:
        assert f.read() == generation(4, size)
    bad = nbdrep("restore", "--control", r.control, "--to", str(cycles[0]), out + ".x", check=False)
    assert bad.returncode == 2 and "not retained" in bad.stderr and "Traceback" not in bad.stderr
    assert not os.path.exists(out + ".x")
    listing = nbdrep("rps", "--control", r.control).stdout
    assert all(str(c) in listing for c in cycles[-3:])
    assert f"committed: {cycles[-1]}" in nbdrep("status", "--control", r.control).stdout
    metrics = nbdrep("status", "--prometheus", "--control", r.control).stdout
    assert f"nbdrep_receiver_committed_cycle {cycles[-1]}" in metrics
    assert "nbdrep_receiver_retained_rps 3" in metrics


def test_kill9_receiver_or_source_20_rounds_never_torn_never_lost(procs, tmp_path):
    """Each round writes a new generation over the whole source and takes an RP, then kills
    the receiver's nbdkit (or, every fourth round, the source's) with kill -9 at a random
    moment of the copy. The receiver is restarted on another socket, where the source cannot
    reach it, and must serve exactly one generation: the last committed one or the new one,
    never a mix, never an older one. Then it rejoins and the new generation commits. Every
    commit is folded into the target at once (a generation is over --journal-max), so the
    image is read from the target itself, and every third round kills just after the commit,
    in the middle of its fold."""
    size = 32 * MiB
    rng = random.Random(10)
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    tmp = str(tmp_path)
    r = Receiver(procs, tmp, [target], extra=FOLD_ALL)
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
    write_image(server.sock, generation(0, size))
    last = server.rp()
    r.wait_committed(last)
    assert r.read() == generation(0, size)
    seen_new = seen_old = 0
    for g in range(1, 21):
        write_image(server.sock, generation(g, size))
        nbdrep("rp", "--control", server.control)
        if g % 3 == 0:
            time.sleep(rng.uniform(0.0, 0.3))
        elif g % 3 == 1:   # in the middle of the copy, unless it commits first
            wait_until(lambda: r.status()["pending_bytes"] or r.status()["committed_cycle"] > last,
                       60, "the copy under way", poll=0.002)
        else:   # just after the commit: in the middle of folding it into the target
            wait_until(lambda: r.status()["committed_cycle"] > last, 60, "the commit", poll=0.002)
        kill_source = g % 4 == 0
        if kill_source:
            kill9_nbdkit(procs, server.proc)
        r.kill9()
        check = Receiver(procs, tmp, [target], extra=FOLD_ALL, sock=str(tmp_path / "check.sock"),
                         control_path=str(tmp_path / "check-control.sock"))
        image = check.read()
        held = generations_in(image)
        assert held in ([g - 1], [g]), f"round {g}: the receiver serves generations {held}"
        assert g % 3 != 2 or held == [g], f"round {g}: generation {g} lost after its commit"
        assert image == generation(held[0], size)
        seen_new += held == [g]
        seen_old += held == [g - 1]
        check.stop()
        r = Receiver(procs, tmp, [target], extra=FOLD_ALL)
        if kill_source:
            unlink_stale(server.control)
            server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
        last = server.rp()
        r.wait_committed(last)
        assert r.read() == generation(g, size), f"round {g}: generation {g} lost after its commit"
    assert seen_new and seen_old, "the kills all fell on the same side of the commit"
    assert r.status()["base_cycle"] is not None, "nothing was folded"


def test_resume_handshake_trusts_an_agreeing_receiver_and_resyncs_another(procs, tmp_path):
    size, tmp = 4 * MiB, str(tmp_path)
    src, target, r, server = generation_1_on_a_receiver(procs, tmp_path, size)
    procs.stop(server.proc)
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
    assert server.status()["start"].startswith("resumed"), server.status()["start"]
    procs.stop(server.proc)
    # The same target behind a receiver with a fresh state that another session committed:
    # another history, even though it holds what the source holds (so the sampled blocks
    # agree; before a first commit a receiver serves no reads, and they would differ).
    r.stop()
    os.rename(r.state, r.state + ".old")
    with open(src, "rb") as f, open(target, "r+b") as t:
        t.write(f.read())
    r = Receiver(procs, tmp, [target])
    assert link.Link([r.uri()]).commit("another", 1, time.time()) == 1
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
    assert "the receiver holds session another" in server.status()["start"]
    r.wait_committed(server.rp())
    assert r.read() == generation(1, size)


def test_journal_max_holds_under_a_burst_bigger_than_it(procs, tmp_path):
    """Cycles of 6 MiB each into a receiver allowed 2 MiB of journals: the oldest RPs (even
    the newest, past the bound) fold into the target, the journals end within the bound, the
    journal directory holds at most that plus two cycles (the pending journal, a folded
    journal's file reused, still holding its last RP's blocks; and the next such file, kept
    for reuse), and nothing is lost."""
    size = 16 * MiB
    tmp = str(tmp_path)
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, tmp, [target], extra=["--journal-max", "2M", "--keep", "1000"])
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
    server.rp()
    rng = random.Random(4)
    h = nbd.NBD()
    h.connect_uri(server.uri)
    for _ in range(6):
        off = rng.randrange(0, size - 6 * MiB, BLOCK)
        h.pwrite(os.urandom(6 * MiB), off)
        r.wait_committed(server.rp())
    h.shutdown()
    wait_until(lambda: r.status()["journal_bytes"] <= 2 * MiB, 60, "journals folded within --journal-max")
    with open(src, "rb") as f:
        assert r.read() == f.read(), "a fold lost or reordered a write"
    journal = os.path.join(r.state, "journal")
    used = sum(os.stat(os.path.join(journal, n)).st_blocks * 512 for n in os.listdir(journal))
    assert used <= 2 * MiB + 2 * 6 * MiB + MiB, f"journal directory holds {used} bytes"
    assert r.status()["base_cycle"] is not None


def test_rp_export_mounts_and_fscks_clean_while_replication_goes_on(procs, tmp_path):
    size = 64 * MiB
    tmp = str(tmp_path)
    files = tmp_path / "files"
    files.mkdir()
    for i in range(20):
        (files / f"f{i}").write_bytes(os.urandom(rng_size(i)))
    src = str(tmp_path / "source.img")
    run("mkfs.ext4", "-q", "-F", "-d", str(files), src, str(size // 1024))
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, tmp, [target], extra=["--keep", "3"])
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "0.2"])
    # Once the initial sync is folded into the target, an RP reads its blocks from there:
    # the case where folding a newer RP would change the mounted one under it.
    wait_until(lambda: r.status()["base_cycle"] is not None, 60, "the initial sync folded")
    rp = server.rp()
    r.wait_committed(rp)
    # The file system stops here; the source keeps changing under it (raw writes past it
    # would not do: they must land where the RP's blocks are, to show they stay out of it).
    stop = threading.Event()

    def scribble():
        h = nbd.NBD()
        h.connect_uri(server.uri)
        rng = random.Random(1)
        while not stop.is_set():
            h.pwrite(os.urandom(64 << 10), rng.randrange(0, size - (64 << 10), BLOCK))
        h.shutdown()

    writer = threading.Thread(target=scribble)
    writer.start()
    try:
        mnt = tmp_path / "fuse"
        mnt.mkdir()
        disk = str(mnt / "disk")
        fuse = procs.start(["nbdfuse", "-r", disk, r.uri(f"@{rp}")], wait_for=disk)
        loop = run("losetup", "-r", "-f", "--show", disk).stdout.strip()
        try:
            run("e2fsck", "-fn", loop)
            with mounted(loop, str(tmp_path / "m"), "-o", "ro,noload"):
                # New cycles commit while it is mounted (and fold less: the mount pins them).
                wait_until(lambda: r.status()["committed_cycle"] > rp + 5, 60, "cycles committed")
                held = file_digests(str(tmp_path / "m"))
                assert {k: held.get(k) for k in file_digests(str(files))} == file_digests(str(files))
                assert len(r.status()["rps"]) > 3, "RPs newer than a mounted one were folded"
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], timeout=60)
            run("e2fsck", "-fn", loop)
        finally:
            subprocess.run(["losetup", "-d", loop], timeout=60)
            subprocess.run(["fusermount3", "-u", str(mnt)], timeout=60)
            procs.stop(fuse)
    finally:
        stop.set()
        writer.join(60)
    wait_until(lambda: len(r.status()["rps"]) <= 3, 60, "the RPs pinned by the mount folded after it")


def rng_size(i):
    return 4096 * (1 + (i * 37) % 50)


@pytest.mark.parametrize("case", ["missing target", "bad keep", "bad journal-max", "other targets"])
def test_bad_receive_input_is_one_line_and_changes_nothing(tmp_path, case):
    target = make_image(str(tmp_path / "t.img"), MiB)
    state = tmp_path / "state"
    args = ["receive", "--socket", str(tmp_path / "r.sock"), "--state", str(state)]
    if case == "missing target":
        args += ["--target", str(tmp_path / "nope.img")]
    else:
        args += ["--target", target]
    args += {"bad keep": ["--keep", "soon"], "bad journal-max": ["--journal-max", "-1"]}.get(case, [])
    if case == "other targets":
        state.mkdir()
        (state / "receiver.json").write_text(json.dumps(
            {"version": 1, "targets": {"": {"path": "/elsewhere.img", "size": MiB}}}))
    before = sorted(os.listdir(tmp_path)) + (sorted(os.listdir(state)) if state.exists() else [])
    done = nbdrep(*args, check=False, timeout=60)
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "source" not in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) + (sorted(os.listdir(state)) if state.exists() else []) == before


def test_promote_makes_the_target_an_older_rp_and_ends_receiving(procs, tmp_path):
    size = 4 * MiB
    tmp = str(tmp_path)
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, tmp, [target])
    server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
    cycles = []
    for g in (1, 2):
        write_image(server.sock, generation(g, size))
        cycles.append(server.rp())
        r.wait_committed(cycles[-1])
    procs.stop(server.proc)
    nbdrep("promote", "--to", str(cycles[0]), "--control", r.control)
    with open(target, "rb") as f:
        assert f.read() == generation(1, size)
    assert r.read() == generation(1, size)
    assert r.status()["promoted"] == cycles[0] and not r.status()["rps"]
    h = nbd.NBD()
    h.connect_uri(r.uri())
    with pytest.raises(nbd.Error):
        h.pwrite(bytes(BLOCK), 0)
    h.shutdown()
    r.stop()
    assert not os.listdir(os.path.join(r.state, "journal"))
    again = nbdrep("receive", "--target", target, "--socket", r.sock, "--state", r.state,
                   check=False, timeout=60)
    assert again.returncode == 2 and "promoted" in again.stderr and len(again.stderr.splitlines()) == 1


def test_commit_travels_through_an_nbd_proxy(procs, nbdkit, tmp_path):
    """nbdkit's nbd plugin with dynamic-export=true between the sites: the commit record and
    the RP exports are ordinary NBD requests on forwarded export names."""
    size = 4 * MiB
    tmp = str(tmp_path)
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, tmp, [target])
    psock, _ = nbdkit("nbd", f"socket={r.sock}", "dynamic-export=true")
    server = Server(procs, tmp, [src], [uri(psock)], extra=["--cycle", "3600"])
    server.rp()
    write_image(server.sock, generation(1, size))
    cycle = server.rp()
    assert r.status()["committed_cycle"] == cycle, "rp --wait returned before the receiver committed"
    assert r.read() == generation(1, size)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///@{cycle}?socket={psock}")
    assert h.pread(BLOCK, 0) == generation(1, size)[:BLOCK]
    h.shutdown()


def test_commit_travels_over_tls(procs, tmp_path):
    """A receiver with nbdkit's TLS (PSK): the source replicates to an nbds+unix:// URI and
    the commit record, on the metadata export of the same URI, goes over TLS too."""
    size = 4 * MiB
    tmp = str(tmp_path)
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:" + "ab" * 32 + "\n")
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, tmp, [target], extra=["--tls-psk", str(psk)])
    tls = f"nbds+unix://alice@/?socket={r.sock}&tls-psk-file={psk}"
    server = Server(procs, tmp, [src], [tls], extra=["--cycle", "3600"])
    write_image(server.sock, generation(1, size))
    cycle = server.rp()
    assert r.status()["committed_cycle"] == cycle
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(tls)
    assert h.pread(BLOCK, 0) == generation(1, size)[:BLOCK]
    h.shutdown()


class _Receivers:
    """Stand-ins for the metadata connections of copier.receiver.Link: ``states`` {data URI:
    the state the receiver shows on its next connection}; every call is logged in ``commits``
    as (data URI, what: "fencing", "committing to", "flushing", ...)."""

    def __init__(self, monkeypatch, states):
        self.states, self.commits = states, []
        handle = lambda uri: types.SimpleNamespace(uri=uri, aio_pwrite=None, aio_flush=None)  # noqa: E731
        monkeypatch.setattr(link, "_open", lambda uri, timeout: handle(uri))
        monkeypatch.setattr(link, "_read_state", lambda h, timeout: self.states[h.uri])
        monkeypatch.setattr(link, "_close", lambda h, timeout=1.0: None)
        monkeypatch.setattr(link, "_call", lambda h, issue, timeout, what: self.commits.append((h.uri, what)))


def test_a_receiver_the_session_resumes_is_checked_on_its_first_connection(monkeypatch):
    """The start-up handshake could not reach it: a receiver that then shows another history
    (restarted on another state directory) must not get this session's increments."""
    fake = _Receivers(monkeypatch, {"nbd://r/": {"session_id": None, "committed_cycle": None}})
    resumed = link.Link(["nbd://r/"], ours=["nbd://r/"], committed=7)
    assert resumed.commit("S", 8, 8.0) == 0   # fenced (that refuses nothing of ours), not committed
    assert [what for _, what in fake.commits if what != "flushing"] == ["fencing"]
    assert list(resumed.take_diverged().values()) == ["the receiver has no commit of this session"]
    fresh = link.Link(["nbd://r/"])   # a full sync: a receiver new to the session is fine
    assert fresh.commit("S", 8, 8.0) == 1


def test_only_a_replica_that_answered_as_a_receiver_counts_as_one(monkeypatch):
    fake = _Receivers(monkeypatch, {"nbd://plain/": None, "nbd://r/": {"session_id": None}})
    plain = link.Link(["nbd://plain/"], ours=["nbd://plain/"])   # resumed, but a plain export
    plain.commit("S", 1, 1.0)
    assert not plain.has_receivers()
    mixed = link.Link(["nbd://plain/", "nbd://r/"])
    assert not mixed.has_receivers()   # none connected yet
    mixed.fence("nbd://r/", "S", None)   # before its first data connection
    assert mixed.has_receivers() and fake.commits


def test_a_receiver_whose_state_went_back_gets_no_commit(monkeypatch):
    """It took cycle 10; after a reconnection it shows cycle 7 of the same session (its state
    directory rolled back, or a commit record power loss undid): committing 12 over it would
    make an RP without cycles 8-10."""
    fake = _Receivers(monkeypatch, {"nbd://r/": {"session_id": "S", "committed_cycle": 9}})
    receivers = link.Link(["nbd://r/"], ours=["nbd://r/"], committed=9)
    assert receivers.commit("S", 10, 10.0) == 1
    fake.states["nbd://r/"] = {"session_id": "S", "committed_cycle": 7}
    receivers.close()   # the next commit connects afresh
    assert receivers.commit("S", 12, 12.0) == 0
    assert "before cycle 10 it took" in receivers.take_diverged()[link.meta_uri("nbd://r/")]
