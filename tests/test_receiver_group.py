"""A consistency group over several receivers (issue #10): two-phase commits, and with the
source lost, the newest RP every receiver holds (``nbdrep rps --group``, ``promote``).

The receivers are real ``nbdrep receive`` processes; the test speaks the metadata protocol
itself (prepare and commit records, ``copier.receiver``) so that it can stop between any two
of the source's steps, as a source killed there would."""
import errno
import gc
import json
import os
import shutil
import signal
import types

import nbd
import pytest

from conftest import Server, make_image, nbdrep, wait_until
from copier import receiver as link
from receiver import store as stores
from test_receiver import (BLOCK, MiB, Receiver, commit_block_0, generation, generations_in, kill9_nbdkit,
                           open_store, read_rp, unlink_stale)

SIZE = MiB


def receivers(procs, tmp_path, n=2):
    """``n`` receivers, each on its own target (export ``eK``), socket and state directory."""
    out = []
    for k in range(n):
        tmp = tmp_path / f"r{k}"
        tmp.mkdir(exist_ok=True)
        out.append(Receiver(procs, str(tmp), [f"e{k}={make_image(str(tmp / 'target.img'), SIZE)}"]))
    return out


def meta(r, magic, cycle, session="s"):
    """Write a prepare or commit record of ``cycle`` to receiver ``r`` and flush."""
    h = nbd.NBD()
    h.connect_uri(link.meta_uri(r.uri("e0")))
    try:
        h.pwrite(link.encode(magic, {"session_id": session, "cycle": cycle, "rp_time": float(cycle)}), 0)
        h.flush()
    finally:
        h.shutdown()


def write_generation(rs, g):
    """Copy generation ``g`` into every receiver's export, flushed (as the copier does)."""
    for k, r in enumerate(rs):
        h = nbd.NBD()
        h.connect_uri(r.uri(f"e{k}"))
        data = generation(g, SIZE)
        for off in range(0, SIZE, 256 << 10):
            h.pwrite(data[off:off + (256 << 10)], off)
        h.flush()
        h.shutdown()


def write_source(server, g):
    """Write generation ``g`` into both exports of the source ``server``, flushed."""
    for k in range(2):
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///e{k}?socket={server.sock}")
        h.pwrite(generation(g, SIZE), 0)
        h.flush()
        h.shutdown()


def shown(rs):
    return [generations_in(r.read(f"e{k}")) for k, r in enumerate(rs)]


def group(rs, *extra):
    out = nbdrep("rps", "--control", rs[0].control, *[a for r in rs[1:] for a in ("--group", r.control)],
                 *extra, check=False)
    return out


def committed_at(rs, g1_cycle=1):
    """Generation 1 as RP 1 on every receiver (a one-phase commit: the initial sync)."""
    write_generation(rs, 1)
    for r in rs:
        meta(r, link.MAGIC_COMMIT, g1_cycle)


@pytest.mark.parametrize("crash", ["amid the prepares", "amid the commits", "receiver after prepare"])
def test_each_crash_point_leaves_a_group_rp_that_promote_makes_whole(procs, tmp_path, crash):
    """Cycle 2 (generation 2) is copied to both receivers, then the source stops at ``crash``
    and is lost. ``rps --group`` names the newest RP both hold; ``promote --to`` it on each
    makes every target that one generation."""
    rs = receivers(procs, tmp_path)
    committed_at(rs)
    write_generation(rs, 2)
    meta(rs[0], link.MAGIC_PREPARE, 2)
    if crash != "amid the prepares":
        meta(rs[1], link.MAGIC_PREPARE, 2)
    if crash == "amid the commits":
        meta(rs[0], link.MAGIC_COMMIT, 2)
    if crash == "receiver after prepare":
        rs[1].kill9()
        rs[1] = Receiver(procs, str(tmp_path / "r1"), [f"e1={tmp_path / 'r1' / 'target.img'}"])
    expected = 1 if crash == "amid the prepares" else 2
    metrics = nbdrep("status", "--prometheus", "--control", rs[1].control).stdout
    assert f"nbdrep_receiver_prepared_rps {0 if crash == 'amid the prepares' else 1}" in metrics
    assert ("prepared, not shown: 2" in nbdrep("status", "--control", rs[1].control).stdout) == \
        (crash != "amid the prepares")
    assert shown(rs) == [[2 if crash == "amid the commits" else 1], [1]], "a prepared RP is shown"
    assert rs[1].status()["prepared"] == ([] if crash == "amid the prepares" else
                                          [{"cycle": 2, "session_id": "s", "rp_time": 2.0,
                                            "bytes": SIZE, "exports": ["e1"]}])
    out = group(rs, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["group_rp"] == expected, out.stdout
    assert f"group RP: {expected}" in group(rs).stdout
    for k, r in enumerate(rs):   # a test of the group RP first: restored, prepared or not
        out = str(tmp_path / f"restored{k}.img")
        nbdrep("restore", "--to", str(expected), "--export", f"e{k}", "--control", r.control, out)
        with open(out, "rb") as f:
            assert generations_in(f.read()) == [expected], f"receiver {k}'s restored RP"
    for r in rs:
        nbdrep("promote", "--to", str(expected), "--control", r.control)
    for k, r in enumerate(rs):
        with open(tmp_path / f"r{k}" / "target.img", "rb") as f:
            assert generations_in(f.read()) == [expected], f"receiver {k} after promote"


def test_a_prepared_rp_survives_kill9_hidden_and_the_next_commit_shows_it(procs, tmp_path):
    rs = receivers(procs, tmp_path, 1)
    committed_at(rs)
    write_generation(rs, 2)
    meta(rs[0], link.MAGIC_PREPARE, 2)
    meta(rs[0], link.MAGIC_PREPARE, 2)   # a retry changes nothing
    rs[0].kill9()
    r = Receiver(procs, str(tmp_path / "r0"), [f"e0={tmp_path / 'r0' / 'target.img'}"])
    assert [p["cycle"] for p in r.status()["prepared"]] == [2] and r.status()["committed_cycle"] == 1
    assert shown([r]) == [[1]]
    write_generation([r], 3)   # the resumed source's next cycle
    meta(r, link.MAGIC_COMMIT, 3)   # shows 2, then commits 3
    assert [rp["cycle"] for rp in r.status()["rps"]] == [1, 2, 3] and r.status()["prepared"] == []
    assert generations_in(r.read("e0@2")) == [2] and shown([r]) == [[3]]


def test_rps_group_says_plainly_when_no_rp_is_common(procs, tmp_path):
    rs = receivers(procs, tmp_path)
    write_generation(rs, 1)
    meta(rs[0], link.MAGIC_COMMIT, 1, session="s")
    meta(rs[1], link.MAGIC_COMMIT, 1, session="other")
    out = group(rs)
    assert out.returncode == 1 and "no RP is held by every receiver" in out.stdout


class _Metadata:
    """Stand-ins for the Link's metadata connections to receivers of ``session``: every
    record written is logged as (data URI, magic); ``fail`` {data URI: magic} makes that
    write fail; ``prepared`` {data URI: cycle}: the newest prepared cycle its state names."""

    def __init__(self, monkeypatch, session):
        self.writes, self.fail, self.decided, self.prepared, committed = [], {}, [], {}, {}

        def write(u, buf):
            block = bytes(buf.to_bytearray())
            magic = block.split(b"\n", 1)[0] + b"\n"
            if self.fail.get(u) == magic:
                raise link.ReplicaError("refused", 5)
            self.writes.append((u, magic))
            if magic == link.MAGIC_PREPARE:
                self.decided.append(link.decode(magic, block)["decided"])
            if magic == link.MAGIC_COMMIT:
                committed[u] = link.decode(magic, block)["cycle"]

        handle = lambda u: types.SimpleNamespace(  # noqa: E731
            uri=u, aio_pwrite=lambda buf, offset: write(u, buf), aio_flush=lambda: None)
        monkeypatch.setattr(link, "_open", lambda u, timeout: handle(u))
        monkeypatch.setattr(link, "_read_state", lambda h, timeout: {
            "session_id": session, "committed_cycle": committed.get(h.uri, 1),
            "prepared": {"session_id": session, "cycle": self.prepared[h.uri]} if h.uri in self.prepared else None})
        monkeypatch.setattr(link, "_close", lambda h, timeout=1.0: None)
        monkeypatch.setattr(link, "_call", lambda h, issue, timeout, what: issue())


def test_the_link_prepares_on_every_receiver_before_any_commit(monkeypatch):
    fake = _Metadata(monkeypatch, "S")
    a, b = "nbd://a/x", "nbd://b/y"
    links = link.Link([a, b], ours=[a, b], committed=1)
    assert links.commit("S", 2, 2.0) == 2   # fenced first: they had no record of this link
    assert fake.writes == [(a, link.MAGIC_FENCE), (b, link.MAGIC_FENCE), (a, link.MAGIC_PREPARE),
                           (b, link.MAGIC_PREPARE), (a, link.MAGIC_COMMIT), (b, link.MAGIC_COMMIT)]
    fake.writes.clear()
    fake.fail[b] = link.MAGIC_PREPARE
    assert links.commit("S", 3, 3.0) == 0, "a cycle shown on a receiver that another did not prepare"
    assert fake.writes == [(a, link.MAGIC_PREPARE)]
    fake.fail.clear()
    assert links.commit("S", 4, 4.0) == 2
    assert fake.decided == [None, None, 2, 2, 2], "a prepare does not say 3 was aborted"
    fake.writes.clear()
    single = link.Link([a], ours=[a], committed=4)   # one receiver: a commit is atomic by itself
    assert single.commit("S", 5, 5.0) == 1 and fake.writes == [(a, link.MAGIC_FENCE), (a, link.MAGIC_COMMIT)]
    fake.writes.clear()
    assert single.commit("S", 6, 6.0) == 1 and fake.writes == [(a, link.MAGIC_COMMIT)], "fenced twice"


def test_a_source_commits_two_receivers_together(procs, tmp_path):
    """A real source with two exports on two receivers: every commit lands on both, and
    neither keeps a prepared RP."""
    rs = receivers(procs, tmp_path)
    srcs = [make_image(str(tmp_path / f"src{k}.img"), SIZE) for k in range(2)]
    server = Server(procs, str(tmp_path), [f"e{k}={s}" for k, s in enumerate(srcs)],
                    [f"e{k}={r.uri(f'e{k}')}" for k, r in enumerate(rs)], extra=["--cycle", "3600"])
    for g in (1, 2, 3):
        write_source(server, g)
        cycle = server.rp()
        for r in rs:
            status = r.status()
            assert status["committed_cycle"] == cycle and status["prepared"] == [], status
    assert shown(rs) == [[3], [3]]
    assert [rp["cycle"] for rp in rs[0].status()["rps"]] == [rp["cycle"] for rp in rs[1].status()["rps"]]


@pytest.mark.parametrize("crash", ["amid the prepares", "amid the commits", "restarted"])
def test_a_source_killed_between_the_phases(procs, nbdkit, tmp_path, crash):
    """A real source, two exports on two receivers, the second behind a proxy that delays
    every write by 4 s (nbdkit's nbd plugin and delay filter). While it holds the prepare (or
    the commit) record of generation 2's cycle, the source and the proxy are killed with
    kill -9. The first receiver then holds that cycle prepared (or committed), the second not
    (or prepared). With the source lost, ``rps --group`` names the newest RP both hold, and
    ``promote --to`` it makes both targets one generation; a source ``restarted`` (killed
    amid the commits) shows the prepared cycle on the second receiver with its next commit."""
    rs = receivers(procs, tmp_path)
    # After rs[0]'s socket in the copier's order, so it is the second to get each record.
    psock, proxy = nbdkit("--filter=delay", "nbd", f"socket={rs[1].sock}", "dynamic-export=true",
                          "delay-write=4", sock=str(tmp_path / "z-proxy.sock"))
    srcs = [make_image(str(tmp_path / f"src{k}.img"), SIZE) for k in range(2)]
    server = Server(procs, str(tmp_path), [f"e{k}={s}" for k, s in enumerate(srcs)],
                    [f"e0={rs[0].uri('e0')}", f"e1=nbd+unix:///e1?socket={psock}"],
                    extra=["--cycle", "3600"])

    write_source(server, 1)
    one = server.rp()   # two-phase from now on: both receivers showed the session
    write_source(server, 2)
    nbdrep("rp", "--control", server.control)
    if crash == "amid the prepares":
        wait_until(lambda: rs[0].status()["prepared"], 120, "the first receiver prepared", poll=0.01)
    else:
        wait_until(lambda: rs[0].status()["committed_cycle"] > one, 120, "the first commit", poll=0.01)
    kill9_nbdkit(procs, server.proc)
    os.kill(proxy.pid, signal.SIGKILL)
    two = (rs[0].status()["prepared"] or rs[0].status()["rps"])[-1]["cycle"]
    held = [r.status() for r in rs]
    if crash == "amid the prepares":
        assert [s["committed_cycle"] for s in held] == [one, one]
        assert [[p["cycle"] for p in s["prepared"]] for s in held] == [[two], []]
        expected, g = one, 1
    else:
        assert [s["committed_cycle"] for s in held] == [two, one], "the proxy let the commit by"
        assert [[p["cycle"] for p in s["prepared"]] for s in held] == [[], [two]]
        expected, g = two, 2
    assert shown(rs) == [[1 if crash == "amid the prepares" else 2], [1]]
    if crash == "restarted":
        os.unlink(psock)
        nbdkit("nbd", f"socket={rs[1].sock}", "dynamic-export=true", sock=psock)
        unlink_stale(server.control)
        server = Server(procs, str(tmp_path), [f"e{k}={s}" for k, s in enumerate(srcs)],
                        [f"e0={rs[0].uri('e0')}", f"e1=nbd+unix:///e1?socket={psock}"],
                        extra=["--cycle", "3600"])
        write_source(server, 3)
        three = server.rp()
        for r in rs:
            cycles = [rp["cycle"] for rp in r.status()["rps"]]   # the resync after kill -9 too
            assert {one, two} <= set(cycles) and cycles[-1] == three, cycles
            assert r.status()["prepared"] == [] and r.status()["committed_cycle"] == three
        assert shown(rs) == [[3], [3]] and generations_in(rs[1].read(f"e1@{two}")) == [2]
        return
    out = group(rs, "--json")
    assert json.loads(out.stdout)["group_rp"] == expected, out.stdout
    for r in rs:
        nbdrep("promote", "--to", str(expected), "--control", r.control)
    for k in range(2):
        with open(tmp_path / f"r{k}" / "target.img", "rb") as f:
            assert generations_in(f.read()) == [g], f"receiver {k} after promote"


def test_a_prepare_shows_the_decided_rps_and_takes_back_the_aborted_ones(tmp_path):
    """In process: RP 2 prepared, then the prepare of 3 says the newest cycle whose commit
    began is 1 (2 was aborted: another receiver did not prepare it). 2 goes back into the
    pending writes, so RP 3 holds what 2 wrote and 3 did not overwrite; a receiver keeps one
    prepared RP however many cycles abort. Said to be decided, a prepared RP is shown."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * 2 * BLOCK, 0)
        s.prepare("a", 2, 2.0)
        s.write("", b"\x03" * BLOCK, BLOCK)
        s.prepare("a", 3, 3.0, decided=1)
        assert [p["cycle"] for p in s.record["prepared"]] == [3]
        assert len(os.listdir(os.path.join(s.state_dir, "journal"))) == 4, "RP 2's journal is left behind"
        s.write("", b"\x04" * BLOCK, 2 * BLOCK)
        s.prepare("a", 4, 4.0, decided=3)   # 3's commit began: shown here too
        assert [rp["cycle"] for rp in s.record["rps"]] == [1, 3]
        assert [p["cycle"] for p in s.record["prepared"]] == [4]
        assert read_rp(s, 3)[:3 * BLOCK] == b"\x02" * BLOCK + b"\x03" * BLOCK + bytes(BLOCK)
        s.commit("a", 4, 4.0)
        assert read_rp(s, 4)[:3 * BLOCK] == b"\x02" * BLOCK + b"\x03" * BLOCK + b"\x04" * BLOCK
    finally:
        s.close()


def old_history(tmp_path):
    """A store whose RP 1 (session "a") is zeros and that holds cycles 2 and 3 of an old run
    prepared (block 0 = 2, blocks 0-1 = 3), never decided (its source lost, then restarted
    from a copy of its state directory that says 1): the new run numbers its cycles from 2
    again. Reopened, as after a restart. Returns the store and RP 1's image."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        s.write("", b"\x02" * BLOCK, 0)
        s.prepare("a", 2, 2.0)
        s.write("", b"\x03" * 2 * BLOCK, 0)
        s.prepare("a", 3, 3.0)
        state = link.decode(link.MAGIC_STATE, s.state_block())
        assert state["prepared"] == {"session_id": "a", "cycle": 3}
        assert link.mismatch(state, "a", 1) == "the receiver prepared cycle 3, after this source's " \
            "last commit 1: another history"
    finally:
        s.close()
    s = None
    s = reopen(tmp_path)
    return s, read_rp(s, 1)


def reopen(tmp_path):
    """The store on ``tmp_path`` opened again, as a start after a crash, once the caller
    closed the old one and dropped its references: the old one's journals are let go first
    (a simulated crash's traceback holds them in a cycle), since a pending one cuts its log
    to its entries as it goes, under the new store's mapping of it."""
    gc.collect()
    return open_store(tmp_path)


def newest(s):
    buf = bytearray(MiB)
    s.read("", None, buf, 0)
    return bytes(buf)


def journal_files(s):
    return sorted(os.listdir(os.path.join(s.state_dir, "journal")))


class Crash(Exception):
    """A kill -9 at that point: the store is closed and opened again."""


@pytest.mark.parametrize("crash", [None, "before the record without them", "before their unlink",
                                   "before the commit's record"])
def test_a_one_phase_commit_drops_the_prepared_rps_of_an_abandoned_history(tmp_path, monkeypatch, crash):
    """The new run (rp_time 12.0, 13.0) writes block 1 and commits cycle 2 in one phase (the
    receiver is resynced in full): the old run's prepared 2 and 3 are never shown, whatever
    point a crash cuts the commit at and however often the store restarts, and RPs 2 and 3
    are the new run's writes byte for byte (without the drop, its commit of 3 showed the old
    run's 3 and left its own writes pending)."""
    s, rp1 = old_history(tmp_path)
    try:
        new2 = rp1[:BLOCK] + b"\x12" * BLOCK + rp1[2 * BLOCK:]
        s.write("", b"\x12" * BLOCK, BLOCK)
        if crash is not None:
            calls = []

            def crashing(*args):   # the n-th record write, or a journal's unlink, never happens
                calls.append(args)
                if crash == "before their unlink" or \
                        len(calls) == (1 if crash == "before the record without them" else 2):
                    raise Crash()
                return real(*args)
            where, real = ((stores.Journal, stores.Journal.unlink) if crash == "before their unlink"
                           else (stores, stores.write_json))
            monkeypatch.setattr(where, "unlink" if where is stores.Journal else "write_json", crashing)
            with pytest.raises(Crash):
                s.commit("a", 2, 12.0)
            monkeypatch.undo()
            s.close()
            s = None
            s = reopen(tmp_path)
            dropped = crash != "before the record without them"
            assert [p["cycle"] for p in s.record["prepared"]] == ([] if dropped else [2, 3])
            assert s.record["committed_cycle"] == 1 and newest(s) == rp1, "a crash showed an RP"
            assert len(journal_files(s)) == (2 if dropped else 6), "a dropped RP's files stayed"
        s.commit("a", 2, 12.0)   # the source's retry: it got no answer
        assert s.record["prepared"] == [] and [rp["cycle"] for rp in s.record["rps"]] == [1, 2]
        assert newest(s) == new2 and read_rp(s, 2) == new2
        s.write("", b"\x13" * BLOCK, 2 * BLOCK)
        s.commit("a", 3, 13.0)
        s.close()
        s = None
        s = reopen(tmp_path)
        new3 = new2[:2 * BLOCK] + b"\x13" * BLOCK + new2[3 * BLOCK:]
        assert [rp["cycle"] for rp in s.record["rps"]] == [1, 2, 3] and s.record["prepared"] == []
        assert read_rp(s, 2) == new2 and read_rp(s, 3) == new3 and newest(s) == new3
        assert link.decode(link.MAGIC_STATE, s.state_block())["prepared"] is None
    finally:
        s.close()


def test_a_fence_drops_the_prepared_rps_after_the_sources_committed_cycle(tmp_path):
    """A source restarted from a record taken while it ran numbers its cycles from far above
    the old run's (``replication.driver``'s reserve), so no commit or prepare id says which
    prepared RPs it abandoned; its fence says its committed cycle. Prepared RPs after it are
    dropped, never shown, and the new run's first commit is RP 1's image with its write over
    it (without the drop, that commit showed the old run's 2 and 3 as RPs). A fence at the
    cycle of a prepared RP (the source crashed amid that RP's prepares, after its record)
    keeps it. Not under an attached export that reads one (EBUSY): its name would stay on an
    image that is no RP any more."""
    s, rp1 = old_history(tmp_path)
    try:
        fence = link.encode(link.MAGIC_FENCE, {"session_id": "a", "export": "", "committed_cycle": 2})
        s.metadata_write(fence)
        assert [p["cycle"] for p in s.record["prepared"]] == [2], "a fence dropped a prepared RP it recorded"
        s.metadata_write(link.encode(link.MAGIC_FENCE, {"session_id": "b", "export": "",
                                                         "committed_cycle": 1}))
        assert [p["cycle"] for p in s.record["prepared"]] == [2], "another session's fence dropped one"
        abandoned = link.encode(link.MAGIC_FENCE, {"session_id": "a", "export": "", "committed_cycle": 1})
        assert s.attach("", 2) is not None   # an operator's look at it, with the source lost
        with pytest.raises(OSError) as e:
            s.metadata_write(abandoned)
        assert e.value.errno == errno.EBUSY and [p["cycle"] for p in s.record["prepared"]] == [2]
        s.detach(2)
        s.metadata_write(abandoned)
        assert s.record["prepared"] == [] and len(journal_files(s)) == 2, "the abandoned RPs stayed"
        far = 1 + (1 << 20)
        s.write("", b"\x12" * BLOCK, BLOCK)
        s.commit("a", far, 12.0)
        assert [rp["cycle"] for rp in s.record["rps"]] == [1, far]
        assert newest(s) == rp1[:BLOCK] + b"\x12" * BLOCK + rp1[2 * BLOCK:]
        with pytest.raises(OSError) as e:
            s.metadata_write(link.encode(link.MAGIC_FENCE, {"session_id": "a", "export": "",
                                                             "committed_cycle": "1"}))
        assert e.value.errno == errno.EINVAL
    finally:
        s.close()


def test_a_prepare_drops_the_prepared_rps_of_an_abandoned_history(tmp_path):
    """A source that resumed the receivers in two phases (one predating the check of the
    prepared cycle) prepares the new run's cycle 2 (another RP time): the old run's 2 and 3
    are dropped, not shown, not put back into the pending writes, and the prepare is taken
    (it was refused: nothing committed until the cycles passed 3). A repeat of it is a no-op."""
    s, rp1 = old_history(tmp_path)
    try:
        s.write("", b"\x12" * BLOCK, BLOCK)
        s.prepare("a", 2, 12.0, decided=None)
        assert [(p["cycle"], p["rp_time"]) for p in s.record["prepared"]] == [(2, 12.0)]
        files = journal_files(s)
        s.prepare("a", 2, 12.0)   # the link's retry of a prepare whose reply it lost
        assert [(p["cycle"], p["rp_time"]) for p in s.record["prepared"]] == [(2, 12.0)]
        assert journal_files(s) == files
        s.close()
        s = None
        s = reopen(tmp_path)
        assert newest(s) == rp1
        s.commit("a", 2, 12.0)
        new2 = rp1[:BLOCK] + b"\x12" * BLOCK + rp1[2 * BLOCK:]
        assert read_rp(s, 2) == new2 and newest(s) == new2 and s.record["prepared"] == []
        with pytest.raises(OSError) as e:
            s.prepare("a", 2, 22.0)   # not after the committed cycle: one phase only
        assert e.value.errno == errno.EINVAL
        s.write("", b"\x13" * BLOCK, 2 * BLOCK)
        s.prepare("a", 3, 13.0)
        s.commit("a", 2, 12.0)   # a repeated commit: it says nothing of the prepared 3
        assert [p["cycle"] for p in s.record["prepared"]] == [3]
        s.commit("a", 3, 13.0)
        assert read_rp(s, 3) == new2[:2 * BLOCK] + b"\x13" * BLOCK + new2[3 * BLOCK:]
    finally:
        s.close()


def committed_history(tmp_path):
    """A store with RPs 1-5 of session "a" (RP 1 zeros, RP k block 0 written k), left open
    right after the commit of 5 (no fence since). Returns the store and RP 5's image."""
    s = open_store(tmp_path)
    s.commit("a", 1, 1.0)
    commit_block_0(s, (2, 3, 4, 5))
    return s, read_rp(s, 5)


def new_run(s, cycle=3, rp_time=13.0):
    """The new run of a source restored to its record of cycle 2: its copier fences (saying
    its committed cycle, 2), resyncs the receiver in full (``b"\\x33"`` everywhere) and
    commits ``cycle`` in one phase. Returns that image."""
    image = b"\x33" * MiB
    s.fence("", "a", 2)
    s.write("", image, 0)
    s.commit("a", cycle, rp_time)
    return image


def cycles_of(s):
    return [(rp["cycle"], rp["rp_time"]) for rp in s.record["rps"]]


@pytest.mark.parametrize("crash", [None, "amid the folds", "before the commit's record"])
def test_a_new_run_of_the_session_makes_its_cycles_the_rps_of_their_ids(tmp_path, monkeypatch, crash):
    """The source restored to its record of cycle 2 while the receiver committed 5: its new
    run (RP times 13.0, 14.0) commits 3 and 4 after its full resync. RPs 3 and 4 are the new
    run's images byte for byte and the newest RP is its newest, the old RPs 3-5 are gone and
    the base images, which hold the old RP 5, are no RP. A crash amid the folds (a fold's
    copy done, its record not) or after them, before the commit's record, leaves the old RP 5
    served whole; the source's retry then commits. (Without the rule both commits were
    repeats: RP 5 of the old run served, the new run's writes pending.)"""
    s, old5 = committed_history(tmp_path)
    try:
        if crash is not None:
            real = stores.write_json

            def crashing(path, record):   # this record write never happens: kill -9
                if (record.get("base_cycle") == 3 and record.get("folding") is None
                        if crash == "amid the folds" else record["committed_cycle"] == 3):
                    raise Crash()
                return real(path, record)
            monkeypatch.setattr(stores, "write_json", crashing)
            with pytest.raises(Crash):
                new_run(s)
            monkeypatch.undo()
            s.close()
            s = None
            s = reopen(tmp_path)
            assert s.record["committed_cycle"] == 5 and newest(s) == old5, "a crash showed no RP or a mix"
            assert [c for c, _ in cycles_of(s)] == ([4, 5] if crash == "amid the folds" else [])
            assert s.record["base_cycle"] == (3 if crash == "amid the folds" else 5)
            s.fence("", "a", 2)   # the source's retry: it connects, so it fences, again
            s.commit("a", 3, 13.0)
            new3 = b"\x33" * MiB
        else:
            new3 = new_run(s)
        assert cycles_of(s) == [(3, 13.0)] and s.record["base_cycle"] is None and not s.retained(5)
        assert newest(s) == new3 and read_rp(s, 3) == new3
        s.write("", b"\x44" * BLOCK, BLOCK)
        s.commit("a", 4, 14.0)
        new4 = new3[:BLOCK] + b"\x44" * BLOCK + new3[2 * BLOCK:]
        s.close()
        s = None
        s = reopen(tmp_path)
        assert cycles_of(s) == [(3, 13.0), (4, 14.0)] and s.record["base_cycle"] is None
        assert read_rp(s, 3) == new3 and read_rp(s, 4) == new4 and newest(s) == new4
        assert link.decode(link.MAGIC_STATE, s.state_block())["committed_cycle"] == 4
    finally:
        s.close()


def test_a_repeat_or_a_late_commit_leaves_the_history(tmp_path):
    """With the new run at cycle 4 (RP time 14.0) and its cycle 5's writes pending, these
    change nothing: a repeat of 4, a late commit of 3 (13.0), the old run's late commit of 4
    (4.0), a late commit of 3 at a newer RP time (the source's clock stepped back after it),
    and the same after a fence of the source at its committed cycle 4, or of an older source
    that does not say its committed cycle. Then 5 commits."""
    s, _ = committed_history(tmp_path)
    try:
        new3 = new_run(s)
        s.write("", b"\x44" * BLOCK, BLOCK)
        s.commit("a", 4, 14.0)
        new4 = new3[:BLOCK] + b"\x44" * BLOCK + new3[2 * BLOCK:]
        s.write("", b"\x55" * BLOCK, 2 * BLOCK)
        files = journal_files(s)
        for cycle, rp_time, fence in ((4, 14.0, None), (3, 13.0, None), (4, 4.0, None),
                                      (3, 20.0, None), (3, 20.0, ("a", 4)), (3, 20.0, (None, None))):
            if fence:
                s.fence("", *fence)
            s.commit("a", cycle, rp_time)
            assert cycles_of(s) == [(3, 13.0), (4, 14.0)], f"the commit of {cycle} at {rp_time}"
            assert newest(s) == new4 and journal_files(s) == files
        s.commit("a", 5, 15.0)
        assert read_rp(s, 5) == new4[:2 * BLOCK] + b"\x55" * BLOCK + new4[3 * BLOCK:]
    finally:
        s.close()


def test_the_fence_not_the_clock_tells_a_new_run(tmp_path):
    """A source restored from a VM snapshot may have its clock put back too: its new run's RP
    times are then older than the receiver's RP 5. Its fence says its committed cycle (2),
    so its commit of 3 at RP time 0.5 is still its own RP 3 (before, a commit was told from a
    repeat by a newer RP time: this one was taken for a repeat, the old RP 5 served, and in a
    group the receiver refused every prepare of ids up to 5). Its ids far above the old ones
    (a record taken while it ran) change nothing either: the old RPs 3-5 go all the same, also
    after a restart of the receiver between the fence and the commit (the mark is recorded)."""
    s, _ = committed_history(tmp_path)
    try:
        assert new_run(s, 3, 0.5) == newest(s) and cycles_of(s) == [(3, 0.5)]
        assert s.record["base_cycle"] is None
    finally:
        s.close()
    s = None
    os.mkdir(tmp_path / "far")
    s, _ = committed_history(tmp_path / "far")
    far = 3 + (1 << 20)
    try:
        assert new_run(s, far, 13.0) == newest(s) and cycles_of(s) == [(far, 13.0)]
    finally:
        s.close()
    # The receiver restarted between the fence that found the history abandoned and the new
    # run's first commit there, whose next fence says a cycle of the new run, past RP 5.
    os.mkdir(tmp_path / "restart")
    s, _ = committed_history(tmp_path / "restart")
    try:
        s.fence("", "a", 2)
    finally:
        s.close()
    s = None
    s = reopen(tmp_path / "restart")
    try:
        assert s.record["abandoned"] == "a", "the receiver forgot the abandoned history"
        s.fence("", "a", far)
        s.write("", b"\x33" * MiB, 0)
        s.commit("a", far + 1, 14.0)
        assert cycles_of(s) == [(far + 1, 14.0)] and s.record["abandoned"] is None
        assert newest(s) == b"\x33" * MiB
    finally:
        s.close()


def test_a_new_run_waits_while_any_rp_is_attached(tmp_path):
    """An attached RP, the oldest or the newest, refuses the new run's commit (EBUSY) and
    reads the same meanwhile: folded, the newest one's base would change under it with the
    new run's RPs folded later (their ids are below its own). Detached, the commit goes."""
    s, old5 = committed_history(tmp_path)
    try:
        for cycle in (2, 5):
            pinned = s.attach("", cycle)
            with pytest.raises(OSError) as e:
                new_run(s)
            assert e.value.errno == errno.EBUSY
            buf = bytearray(MiB)
            s.read("", pinned, buf, 0)
            assert buf[:BLOCK] == bytes([cycle]) * BLOCK
            s.detach(cycle)
            assert [c for c, _ in cycles_of(s)] == [1, 2, 3, 4, 5] and newest(s) == old5
        s.commit("a", 3, 13.0)
        assert cycles_of(s) == [(3, 13.0)] and newest(s) == b"\x33" * MiB
    finally:
        s.close()


def test_a_source_restored_to_an_older_record_makes_its_cycles_the_rps_of_their_ids(procs, tmp_path):
    """Two receivers committed cycles past the record a source's state directory is then
    restored to (a VM put back from a backup), generation 3 in its sources meanwhile. Its new
    run resyncs both in full and commits ids they had committed already: each shows
    generation 3 at once (without the rule both served the abandoned generation 2 until the
    new ids passed the old ones), every RP after the record's is the new run's, the group
    RP is the new run's newest, and each replica equals its source."""
    rs = receivers(procs, tmp_path)
    srcs = [make_image(str(tmp_path / f"src{k}.img"), SIZE) for k in range(2)]

    def serve():
        unlink_stale(str(tmp_path / "state" / "control.sock"))
        return Server(procs, str(tmp_path), [f"e{k}={s}" for k, s in enumerate(srcs)],
                      [f"e{k}={r.uri(f'e{k}')}" for k, r in enumerate(rs)], extra=["--cycle", "3600"])

    server = serve()
    write_source(server, 1)
    server.rp()
    assert procs.stop(server.proc) == 0
    one = rs[0].status()["committed_cycle"]
    shutil.copytree(tmp_path / "state", tmp_path / "state.copy")
    server = serve()
    write_source(server, 2)
    for _ in range(3):
        server.rp()
    assert procs.stop(server.proc) == 0
    old = [r.status()["committed_cycle"] for r in rs]
    assert shown(rs) == [[2], [2]] and min(old) >= one + 3

    for src in srcs:
        with open(src, "r+b") as f:
            f.write(generation(3, SIZE))
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "state.copy", tmp_path / "state")
    server = serve()
    three = server.rp()
    assert three < min(old), "the new run's ids did not come again: nothing tested"
    assert shown(rs) == [[3], [3]], "the abandoned run's RP is served"
    for k, r in enumerate(rs):
        status = r.status()
        assert status["committed_cycle"] == three and status["base_cycle"] is None, status
        assert [generations_in(r.read(f"e{k}@{rp['cycle']}")) for rp in status["rps"]] == [[3]] * \
            len(status["rps"]), "an RP of the abandoned run"
    assert json.loads(group(rs, "--json").stdout)["group_rp"] == three
    write_source(server, 4)
    four = server.rp()
    for k, r in enumerate(rs):
        assert r.status()["committed_cycle"] == four
        assert generations_in(r.read(f"e{k}@{three}")) == [3]
        with open(srcs[k], "rb") as f:
            assert r.read(f"e{k}") == f.read(), f"receiver {k} differs from its source"


def test_mismatch_resyncs_a_receiver_that_prepared_after_the_record_only():
    """A prepared cycle after the source's record: another history. Up to it (the source
    crashed amid the prepares of its recorded cycle), or of another session, or a receiver
    whose state names no prepared cycle: the committed cycle decides, as before."""
    at = lambda prepared, session="S": {"session_id": "S", "committed_cycle": 4,  # noqa: E731
                                        "prepared": {"session_id": session, "cycle": prepared}}
    assert link.mismatch(at(6), "S", 5) == ("the receiver prepared cycle 6, after this source's "
                                            "last commit 5: another history")
    assert link.mismatch(at(5), "S", 5) is None
    assert link.mismatch(at(6, "T"), "S", 5) is None
    assert link.mismatch({"session_id": "S", "committed_cycle": 4, "prepared": None}, "S", 5) is None
    assert link.mismatch({"session_id": "S", "committed_cycle": 4}, "S", 5) is None
    assert "committed cycle 6" in link.mismatch({"session_id": "S", "committed_cycle": 6}, "S", 5)


def test_the_handshake_and_the_link_resync_a_receiver_that_prepared_after_the_record(monkeypatch):
    """The start's handshake turns the resume of such a receiver into a full resync, and a
    link (re)connecting to one sends it no commit until the session resynced it."""
    states = {"nbd://a/x": {"session_id": "S", "committed_cycle": 4, "prepared": {"session_id": "S", "cycle": 6}},
              "nbd://b/y": {"session_id": "S", "committed_cycle": 4, "prepared": {"session_id": "S", "cycle": 5}}}
    monkeypatch.setattr(link, "probe", lambda uri: states[uri])
    plan = types.SimpleNamespace(resume={0: None, 1: None}, full={}, how="resume", session_id="S",
                                 committed_cycle=5)
    devices = [types.SimpleNamespace(dev=k, name=f"e{k}", replica_uri=u) for k, u in enumerate(states)]
    link.handshake(plan, devices)
    assert list(plan.resume) == [1] and list(plan.full) == [0] and "prepared cycle 6" in plan.full[0]

    fake = _Metadata(monkeypatch, "S")
    fake.prepared = {u: s["prepared"]["cycle"] for u, s in states.items()}
    a, b = states
    links = link.Link([a, b], ours=[a, b], committed=5)   # the handshake could not reach them
    assert links.commit("S", 6, 6.0) == 1   # both fenced first: the fence drops a's prepared 6
    assert fake.writes == [(a, link.MAGIC_FENCE), (b, link.MAGIC_FENCE), (b, link.MAGIC_COMMIT)], \
        "a commit went to a"
    assert list(links.take_diverged()) == [link.meta_uri(a)]


def test_a_source_restored_from_a_copy_of_its_state_never_shows_the_abandoned_prepared_cycle(
        procs, nbdkit, tmp_path):
    """Two receivers, the second behind a proxy that delays every write by 4 s. The source
    commits generation 1 and stops cleanly; its state directory is copied aside. The next run
    (generation 2 written, an RP asked) is killed with kill -9 while the proxy holds its first
    prepare: the first receiver holds that cycle prepared, after the copy's record.
    Generation 3 is written into the sources, the copy is put back and the source started
    again (a VM restored from a backup): its cycle ids come again, from its resync on, and no
    RP after the copy's on either receiver is one of the abandoned run (without the drops,
    the first receiver refused the new run's prepare of that id and a later commit showed the
    old prepared RP); every commit lands on both, and each replica equals its source."""
    rs = receivers(procs, tmp_path)
    psock = str(tmp_path / "z-proxy.sock")   # after rs[0]'s: the second to get each record
    _, proxy = nbdkit("--filter=delay", "nbd", f"socket={rs[1].sock}", "dynamic-export=true",
                      "delay-write=4", sock=psock)
    srcs = [make_image(str(tmp_path / f"src{k}.img"), SIZE) for k in range(2)]

    def serve():
        return Server(procs, str(tmp_path), [f"e{k}={s}" for k, s in enumerate(srcs)],
                      [f"e0={rs[0].uri('e0')}", f"e1=nbd+unix:///e1?socket={psock}"],
                      extra=["--cycle", "3600"])

    server = serve()
    write_source(server, 1)
    server.rp()
    assert procs.stop(server.proc) == 0   # its stop commits a cycle too
    one = rs[0].status()["committed_cycle"]
    shutil.copytree(tmp_path / "state", tmp_path / "state.copy")
    unlink_stale(server.control)
    server = serve()
    write_source(server, 2)
    nbdrep("rp", "--control", server.control)
    wait_until(lambda: rs[0].status()["prepared"], 120, "the first receiver prepared", poll=0.01)
    kill9_nbdkit(procs, server.proc)
    procs.kill(proxy)
    held = [r.status() for r in rs]
    assert [s["committed_cycle"] for s in held] == [one, one] and held[1]["prepared"] == []
    two = held[0]["prepared"][-1]["cycle"]

    for src in srcs:
        with open(src, "r+b") as f:
            f.write(generation(3, SIZE))
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "state.copy", tmp_path / "state")
    os.unlink(psock)
    nbdkit("nbd", f"socket={rs[1].sock}", "dynamic-export=true", sock=psock)
    unlink_stale(server.control)
    server = serve()
    three = server.rp()
    assert shown(rs) == [[3], [3]]
    write_source(server, 4)
    four = server.rp()
    for k, r in enumerate(rs):
        status = r.status()
        assert status["committed_cycle"] == four and status["prepared"] == [], status
        cycles = [rp["cycle"] for rp in status["rps"]]
        assert two in cycles and three in cycles, f"the ids {cycles} did not come again"
        assert [generations_in(r.read(f"e{k}@{c}")) for c in cycles if c > one] == \
            [[3]] * (cycles.index(four) - cycles.index(one) - 1) + [[4]], "an RP of the abandoned run"
        with open(srcs[k], "rb") as f:
            assert r.read(f"e{k}") == f.read(), f"receiver {k} differs from its source"
