"""``nbdrep rps`` and ``rps --group`` with receivers stopped (issue #10): with the source lost,
the receivers may be down too, and the group RP is read from their state directories'
records, without writing anything."""
import json
import os
import socket

import pytest

from conftest import make_image, nbdrep
from copier import receiver as link
from receiver import control as receiver_control
from test_receiver import Receiver, generations_in, open_store
from test_receiver_group import committed_at, meta, receivers, write_generation

# What ``nbdrep rps`` shows of a receiver that the record holds too (the rest only a running
# receiver knows: lag, --journal-max, pending bytes).
RECORDED = ("session_id", "committed_cycle", "base_cycle", "folding", "promoted", "journal_bytes",
            "rps", "prepared")


def snapshot(*folders):
    """Every file under ``folders`` with its size and mtime: what reading must not change."""
    return {os.path.join(d, f): (st.st_size, st.st_mtime_ns)
            for top in folders for d, _, files in os.walk(top) for f in files
            for st in [os.stat(os.path.join(d, f))]}


def amid_the_commits(procs, tmp_path):
    """Two receivers of one session where the source was lost amid the commits of cycle 2:
    the first committed it, the second holds it prepared. Returns them and their statuses."""
    rs = receivers(procs, tmp_path)
    committed_at(rs)
    write_generation(rs, 2)
    for r in rs:
        meta(r, link.MAGIC_PREPARE, 2)
    meta(rs[0], link.MAGIC_COMMIT, 2)
    return rs, [r.status() for r in rs]


def test_rps_group_reads_stopped_receivers_from_their_records(procs, tmp_path):
    rs, live = amid_the_commits(procs, tmp_path)
    assert [s["committed_cycle"] for s in live] == [2, 1] and live[1]["prepared"][0]["cycle"] == 2
    rs[0].stop()    # an operator's stop
    rs[1].kill9()   # a host that went down
    for r, status in zip(rs, live):   # offline, the record says what the receiver said
        offline = receiver_control.stopped_status(r.state)
        assert {k: offline[k] for k in RECORDED} == {k: status[k] for k in RECORDED}
        assert offline["lag"] is None
    before = snapshot(*(str(tmp_path / f"r{k}") for k in range(2)))
    args = ["rps", "--state", rs[0].state, "--group", rs[1].state]
    out = nbdrep(*args, "--json")
    assert json.loads(out.stdout) == {"group_rp": 2, "receivers": {
        rs[0].state: {"session_id": "s", "committed_cycle": 2, "prepared": [], "offline": True},
        rs[1].state: {"session_id": "s", "committed_cycle": 1, "prepared": [2], "offline": True}}}
    text = nbdrep(*args).stdout
    assert (f"{rs[1].state}: session s, committed 1, prepared 2   (offline: no receiver at "
            f"{rs[1].state}/control.sock; read from its record)") in text
    assert "group RP: 2;" in text
    out = nbdrep("rps", "--state", rs[1].state)
    assert out.stdout.startswith(f"offline: no receiver answers at {rs[1].state}/control.sock; "
                                 f"read from {rs[1].state}/receiver.json\n")
    assert "lag: -" in out.stdout and "prepared, not shown: 2" in out.stdout
    out = nbdrep("rps", "--state", rs[0].state, "--json")
    assert json.loads(out.stdout) == live[0]["rps"] and "offline" in out.stderr
    assert snapshot(*(str(tmp_path / f"r{k}") for k in range(2))) == before, "reading wrote"
    for k, r in enumerate(rs):   # what the group RP is for: promote it on each, offline too
        target = str(tmp_path / f"r{k}" / "target.img")
        nbdrep("promote", "--to", "2", "--state", r.state, "--target", f"e{k}={target}")
        with open(target, "rb") as f:
            assert generations_in(f.read()) == [2], f"receiver {k} after promote"


def test_rps_group_mixes_running_and_stopped_receivers(procs, tmp_path):
    rs, _ = amid_the_commits(procs, tmp_path)
    rs[0].stop()
    # The first runs again, with its control socket in its state directory (the default), so
    # --group STATE asks it; the second stays stopped.
    state0 = rs[0].state
    rs[0] = Receiver(procs, str(tmp_path / "r0"), [f"e0={tmp_path / 'r0' / 'target.img'}"],
                     control_path=os.path.join(state0, "control.sock"))
    rs[1].stop()
    out = nbdrep("rps", "--state", rs[1].state, "--group", state0, "--json")
    assert json.loads(out.stdout) == {"group_rp": 2, "receivers": {
        rs[1].state: {"session_id": "s", "committed_cycle": 1, "prepared": [2], "offline": True},
        rs[0].control: {"session_id": "s", "committed_cycle": 2, "prepared": [], "offline": False}}}
    out = nbdrep("rps", "--control", rs[0].control, "--group", rs[1].state)
    assert out.stdout.splitlines()[0] == f"{rs[0].control}: session s, committed 2, prepared -"
    assert "group RP: 2;" in out.stdout


def _record(state, text):
    os.makedirs(state)
    with open(os.path.join(state, "receiver.json"), "w") as f:
        f.write(text)


def _dead_socket(path):
    """A unix socket file no one listens on, as a receiver killed with kill -9 leaves."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    return path


@pytest.mark.parametrize("case, message", [
    ("group names a file", "--group {p} is neither a control socket nor a state directory"),
    ("group names nothing", "--group {p} is neither a control socket nor a state directory"),
    ("group names a dead socket", "no nbdrep receiver at control socket {p}; to read a stopped one, "
                                  "name its state directory (--state DIR, --group DIR)"),
    ("state with no record", "no nbdrep receiver at control socket {p}/control.sock, and {p} is not "
                             "a receiver's state directory (no receiver.json)"),
    ("state with a torn record", "no nbdrep receiver at control socket {p}/control.sock, and receiver "
                                 "record {p}/receiver.json cannot be read (Expecting"),
    ("state with another record", "no nbdrep receiver at control socket {p}/control.sock, and receiver "
                                  "record {p}/receiver.json is not an nbdrep receiver record of version 1"),
    ("state with mistyped figures", "no nbdrep receiver at control socket {p}/control.sock, and receiver "
                                    "record {p}/receiver.json is not an nbdrep receiver record of version 1"),
    ("control alone", "no nbdrep receiver at control socket {p}; to read a stopped one, name its "
                      "state directory (--state DIR, --group DIR)"),
])
def test_rps_bad_paths_are_one_line_and_exit_2(tmp_path, case, message):
    good = str(tmp_path / "good")   # a stopped receiver's state directory, before its first commit
    open_store(tmp_path).close()
    os.rename(tmp_path / "state", good)
    p = str(tmp_path / "p")
    if case == "group names a file":
        make_image(p, 0)
    if case == "group names a dead socket" or case == "control alone":
        _dead_socket(p)
    if case == "state with no record":
        os.mkdir(p)
    if case == "state with a torn record":
        _record(p, '{"version": 1, "rps"')
    if case == "state with another record":
        _record(p, '{"version": 1}')
    if case == "state with mistyped figures":   # parses, has every key, a cycle is a string
        with open(os.path.join(good, "receiver.json")) as f:
            _record(p, json.dumps(dict(json.load(f), committed_cycle="2")))
    args = (["--control", p] if case == "control alone" else
            ["--state", p, "--group", good] if case.startswith("state") else ["--state", good, "--group", p])
    before = snapshot(str(tmp_path))
    out = nbdrep("rps", *args, check=False)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith(f"nbdrep: {message.format(p=p)}"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert snapshot(str(tmp_path)) == before, "a refused rps wrote"
