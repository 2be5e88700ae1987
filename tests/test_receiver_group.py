"""A consistency group over several receivers (issue #10): two-phase commits, and with the
source lost, the newest RP every receiver holds (``nbdrep rps --group``, ``promote``).

The receivers are real ``nbdrep receive`` processes; the test speaks the metadata protocol
itself (prepare and commit records, ``copier.receiver``) so that it can stop between any two
of the source's steps, as a source killed there would."""
import json
import os
import signal
import types

import nbd
import pytest

from conftest import Server, make_image, nbdrep, wait_until
from copier import receiver as link
from test_receiver import (BLOCK, MiB, Receiver, generation, generations_in, kill9_nbdkit, open_store,
                           read_rp, unlink_stale)

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
    write fail."""

    def __init__(self, monkeypatch, session):
        self.writes, self.fail, self.decided, committed = [], {}, [], {}

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
            "session_id": session, "committed_cycle": committed.get(h.uri, 1)})
        monkeypatch.setattr(link, "_close", lambda h, timeout=1.0: None)
        monkeypatch.setattr(link, "_call", lambda h, issue, timeout, what: issue())


def test_the_link_prepares_on_every_receiver_before_any_commit(monkeypatch):
    fake = _Metadata(monkeypatch, "S")
    a, b = "nbd://a/x", "nbd://b/y"
    links = link.Link([a, b], ours=[a, b])
    assert links.commit("S", 2, 2.0) == 2
    assert fake.writes == [(a, link.MAGIC_PREPARE), (b, link.MAGIC_PREPARE),
                           (a, link.MAGIC_COMMIT), (b, link.MAGIC_COMMIT)]
    fake.writes.clear()
    fake.fail[b] = link.MAGIC_PREPARE
    assert links.commit("S", 3, 3.0) == 0, "a cycle shown on a receiver that another did not prepare"
    assert fake.writes == [(a, link.MAGIC_PREPARE)]
    fake.fail.clear()
    assert links.commit("S", 4, 4.0) == 2
    assert fake.decided == [None, None, 2, 2, 2], "a prepare does not say 3 was aborted"
    fake.writes.clear()
    single = link.Link([a], ours=[a])   # one receiver: a commit is atomic by itself
    assert single.commit("S", 5, 5.0) == 1 and fake.writes == [(a, link.MAGIC_COMMIT)]


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
