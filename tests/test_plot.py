"""The cycle history on disk (replication/history.py) and ``nbdrep plot`` (issue 12): bounded
rotation, each finished cycle written once, a real server's history drawn to a PNG, bad input."""
import os
import struct

import nbd
import pytest

from conftest import nbdrep, wait_until
from replication import history, machine as m

MiB = 1 << 20
PNG = b"\x89PNG\r\n\x1a\n"


def cycle(n, state="committed", rp_time=None, copied=4096):
    r = m.CycleRecord(n, rp_time=1_700_000_000.0 + n if rp_time is None else rp_time)
    r.state, r.bytes_copied, r.writes = state, copied, 1
    if state in ("committed", "inconsistent"):
        r.commit_time = r.rp_time + 0.25
    r.point_in_time = state == "committed"
    return r


def lines(path):
    with open(path, "rb") as f:
        return f.read().splitlines()


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails the test if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_rotation_keeps_the_newest_cycles_within_twice_the_bound(tmp_path):
    w = history.Writer(str(tmp_path), max_bytes=8192)
    records = []
    for n in range(1, 1001):   # one append per commit, as the driver does
        records.append(cycle(n))
        w.append(w.take(records[-64:]))
    current, old = tmp_path / history.FILE, tmp_path / history.OLD
    assert current.stat().st_size <= 8192 and old.stat().st_size <= 8192
    kept = [r["cycle"] for r in history.read(str(tmp_path))]
    assert kept == list(range(kept[0], 1001)), "the newest, contiguous, oldest first"
    assert 1 < kept[0] and len(kept) > 8192 // len(history.line(cycle(1000))), \
        "old cycles dropped, but more than one file's worth kept"
    assert w.error is None


def test_each_finished_cycle_is_written_once_failures_included(tmp_path):
    w = history.Writer(str(tmp_path))
    records = [cycle(1), cycle(2, "failed"), cycle(3, "inconsistent"), cycle(4, "copying")]
    w.append(w.take(records))
    records[3].state, records[3].commit_time = "committed", records[3].rp_time + 1.5
    w.append(w.take(records))
    got = history.read(str(tmp_path))
    assert [(r["cycle"], r["state"]) for r in got] == \
        [(1, "committed"), (2, "failed"), (3, "inconsistent"), (4, "committed")]
    assert got[1]["lag"] is None and got[3]["lag"] == 1.5
    assert w.take(records) == []


def test_a_torn_last_line_is_skipped_and_the_next_append_starts_a_line_of_its_own(tmp_path):
    w = history.Writer(str(tmp_path))
    w.append(w.take([cycle(1)]))
    with open(tmp_path / history.FILE, "ab") as f:
        f.write(b'{"cycle":2,"rp_ti')   # a crash in the middle of an append
    w.append(w.take([cycle(3)]))
    assert [r["cycle"] for r in history.read(str(tmp_path))] == [1, 3]
    assert len(lines(tmp_path / history.FILE)) == 3


@pytest.fixture
def served(replicated):
    """A real nbdrep serve against an nbdkit file replica, with three RPs of writes taken."""
    site = replicated(16 * MiB, cycle=3600, random_mib=2)
    h = nbd.NBD()
    h.connect_uri(site.server.uri)
    cycles = [site.server.rp()]
    for i in range(3):
        h.pwrite(os.urandom((i + 1) * MiB), 4 * MiB)
        cycles.append(site.server.rp())
    h.shutdown()
    return site, cycles


def state_of(site):
    return os.path.join(os.path.dirname(site.src), "state")


def test_serve_keeps_a_history_and_plot_draws_it(served, tmp_path):
    site, cycles = served
    state = state_of(site)
    # rp --wait returns at the commit; the driver appends to the history right after it.
    wait_until(lambda: os.path.exists(os.path.join(state, history.FILE)) and
               history.read(state)[-1]["cycle"] == cycles[-1], what="the history")
    got = history.read(state)
    shown = {c["cycle"]: c for c in site.server.status()["cycles"]}
    assert [r["cycle"] for r in got] == sorted(shown), "every cycle, the first sync's too"
    assert set(cycles) <= set(shown) and {r["state"] for r in got} == {"committed"}
    for r in got:
        assert r["bytes_copied"] == shown[r["cycle"]]["bytes_copied"]
        assert r["lag"] == pytest.approx(r["commit_time"] - r["rp_time"], abs=0.002) and r["lag"] >= 0
    assert [r["bytes_copied"] for r in got[-3:]] == [1 * MiB, 2 * MiB, 3 * MiB]
    out = tmp_path / "lag.png"
    done = nbdrep("plot", "--state", state, "--since", "1h", "-o", str(out))
    assert f"{len(got)} cycles" in done.stdout
    assert png_size(out) == (1000, 600) and out.stat().st_size > 10_000, "a drawing, not a blank"


def test_an_unwritable_history_is_shown_and_fails_no_cycle(replicated):
    site = replicated(16 * MiB, cycle=3600)
    site.server.rp()
    path = os.path.join(state_of(site), history.FILE)
    wait_until(lambda: os.path.exists(path), what="the history")
    os.rename(path, path + ".moved")
    os.mkdir(path)   # appending to a directory fails, even as root
    cycle = site.server.rp()
    wait_until(lambda: site.server.status()["history_error"] is not None, what="the error")
    status = site.server.status()
    assert status["committed_cycle"] == cycle and status["failures"] == 0
    assert "directory" in status["history_error"]
    assert "history error:" in nbdrep("status", "--control", site.server.control).stdout
    os.rmdir(path)
    cycle = site.server.rp()
    wait_until(lambda: site.server.status()["history_error"] is None, what="the next append")
    assert [r["cycle"] for r in history.read(state_of(site))] == [cycle]


def bad(tmp_path, *argv):
    """Run ``nbdrep plot`` expecting bad input: its one line, and nothing written."""
    out = tmp_path / "out.png"
    done = nbdrep("plot", *argv, "-o", str(out), check=False)
    assert done.returncode == 2 and not out.exists(), done
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    return done.stderr


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path):
    state = tmp_path / "state"
    assert "no cycle history" in bad(tmp_path, "--state", str(state))
    state.mkdir()
    (state / history.FILE).write_text("hello\n")
    assert "no nbdrep cycle records" in bad(tmp_path, "--state", str(state))
    (state / history.FILE).write_text(history.line(cycle(1)))   # cycle 1 was in 2023
    assert "not a duration" in bad(tmp_path, "--state", str(state), "--since", "5 minutes")
    assert "no cycles in the last 1h" in bad(tmp_path, "--state", str(state), "--since", "1h")
    done = nbdrep("plot", "--state", str(state), "-o", str(tmp_path / "missing" / "x.png"),
                  check=False)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "missing").exists()
