"""Prometheus metrics: the controller's totals and lag, /metrics over HTTP, status --prometheus."""
import array
import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import nbd
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, make_image, nbdrep, uri, wait_until
from nbd_plugin import control, metrics
from procs import nbdrep_cmd
from replication import machine as m
from reporter import report as reports

MiB = 1 << 20


class _Closed:
    """A closed cycle as the machine reads it."""

    def __init__(self, cycle, count=0, bytes_written=0):
        self.cycle, self.count, self.bytes_written = cycle, count, bytes_written


def test_totals_count_commits_failures_and_resyncs_and_lag_grows_during_the_first_sync():
    """Before: lag was None (-1 in Prometheus) until the first commit, however long the sync."""
    sync = reports.Report({0: array.array("Q", [0, 4096]), 1: array.array("Q", [8192, 4096])},
                          {1: array.array("Q", [0, 8192])})
    c = m.Controller(sizes={0: MiB, 1: MiB}, replicated=True, cycle_seconds=1, now=100, carry=sync)
    assert c.status(100)["lag"] == 0
    cycle = c.handle(m.Timer(), 100)[1].cycle
    c.handle(m.Drained(_Closed(cycle, count=3, bytes_written=5000)), 100)
    c.handle(m.Reported(sync), 100)
    assert c.handle(m.Failed("EIO"), 101)
    assert c.status(130)["lag"] == 30, "a first sync that fails and retries still lags from the start"
    cycle = c.handle(m.Timer(), c.wake_at)[1].cycle
    c.handle(m.Drained(_Closed(cycle)), c.wake_at)
    c.handle(m.Reported(c.carry), c.wake_at)
    c.handle(m.Copied(), 140)
    c.handle(m.Flushed(), 141)
    status = c.status(145)
    assert status["lag"] == 145 - c.committed_rp_time
    assert status["totals"] == {"writes": 3, "bytes_written": 5000, "cycles_failed": 1,
                                "cycles_committed": 1, "resyncs": 1}
    assert status["device_totals"] == {
        0: {"extents": 1, "bytes_copied": 4096, "bytes_zeroed": 0},
        1: {"extents": 2, "bytes_copied": 4096, "bytes_zeroed": 8192}}
    tracking = m.Controller(sizes={0: MiB}, replicated=False, cycle_seconds=1, now=0)
    assert tracking.status(10)["lag"] is None


def free_port():
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def samples(text):
    """{(name, frozenset(labels)): value} of a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def write(nbd_uri, offset, data):
    h = nbd.NBD()
    h.connect_uri(nbd_uri)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def test_metrics_over_http_count_what_reaches_the_replica_per_export(procs, nbdkit, tmp_path):
    src = make_image(str(tmp_path / "src.img"), 16 * MiB, random_mib=1)
    logs = make_image(str(tmp_path / "logs.img"), 4 * MiB)
    rsock, _ = nbdkit("memory", "16M")
    lsock, _ = nbdkit("memory", "4M")
    port = free_port()
    server = Server(procs, str(tmp_path), [src, f"logs={logs}"], [uri(rsock), f"logs={uri(lsock)}"],
                    extra=["--cycle", "0.2", "--metrics", f"127.0.0.1:{port}"])
    server.rp()
    first = samples(scrape(port))
    default, named = frozenset({("export", "(default)")}), frozenset({("export", "logs")})
    assert first[("nbdrep_bytes_copied_total", default)] == MiB, "the sync copies the random MiB"
    assert first[("nbdrep_bytes_zeroed_total", default)] == 15 * MiB
    assert first[("nbdrep_resyncs_total", frozenset())] == 1
    assert first[("nbdrep_replica_connected", named)] == 1
    assert first[("nbdrep_state", frozenset({("state", "replicating")}))] == 1
    assert 0 <= first[("nbdrep_lag_seconds", frozenset())] < 60

    write(f"nbd+unix:///logs?socket={server.sock}", 64 * 1024, os.urandom(65536))
    server.rp()
    second = samples(scrape(port))
    assert second[("nbdrep_bytes_copied_total", named)] - first[("nbdrep_bytes_copied_total", named)] == 65536
    assert second[("nbdrep_bytes_copied_total", default)] == first[("nbdrep_bytes_copied_total", default)]
    assert second[("nbdrep_extents_total", named)] - first[("nbdrep_extents_total", named)] == 1
    for key, value in first.items():
        if key[0].endswith("_total"):
            assert second[key] >= value, f"counter {key} went down"
    assert second[("nbdrep_cycles_committed_total", frozenset())] > first[("nbdrep_cycles_committed_total", frozenset())]

    text = nbdrep("status", "--prometheus", "--control", server.control).stdout
    assert {k for k in samples(text)} == set(second), "status --prometheus and /metrics differ"


def test_a_busy_metrics_port_is_one_line_exit_2_and_nothing_written(tmp_path):
    src = make_image(str(tmp_path / "src.img"), MiB)
    state = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(nbdrep_cmd("serve", "--source", src, "--socket", str(tmp_path / "s.sock"),
                                        "--state", str(state), "--metrics", f"127.0.0.1:{port}"),
                             capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f"nbdrep: --metrics 127.0.0.1:{port}: Address already in use\n"
    assert not state.exists() and not (tmp_path / "s.sock").exists()


def test_a_bad_metrics_address_is_one_line_exit_2(tmp_path):
    src = make_image(str(tmp_path / "src.img"), MiB)
    for value in ("localhost:9100", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:http"):
        run = subprocess.run(nbdrep_cmd("serve", "--source", src, "--socket", str(tmp_path / "s.sock"),
                                        "--state", str(tmp_path / "state"), "--metrics", value),
                             capture_output=True, text=True, timeout=120)
        assert (run.returncode, run.stderr) == (
            2, f"nbdrep: metrics={value!r} is not IP:PORT (e.g. 127.0.0.1:9100)\n"), run.stderr
    assert not (tmp_path / "state").exists()


STATUS = {
    "state": "replicating", "cycle": 9, "committed_cycle": 8, "lag": 1.5, "replicated": True,
    "failures": 0, "stuck": None, "requests_retried": 2,
    "totals": {"writes": 10, "cycles_committed": 8},
    "devices": [{"name": "", "replica": "nbd://r/", "replica_connected": True,
                 "totals": {"bytes_copied": 4096}}],
    "keepaside": {"mem_bytes": 0, "spill_bytes": 0},
    "tracker": {"memory_bytes": 1 << 20, "entries": 3},
}


class Fixed:
    def status(self):
        return STATUS


def test_idle_http_connections_are_bounded_and_scrapes_still_work(monkeypatch):
    """A thread per scrape, but at most MAX_SCRAPES at once: further connections are closed
    unanswered instead of each holding a thread until its timeout (here longer than the test)."""
    monkeypatch.setattr(metrics._Handler, "timeout", 300)
    server = metrics.MetricsServer("127.0.0.1", 0, Fixed())
    server.start()
    port = server.address[1]
    try:
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
                    for _ in range(metrics.MAX_SCRAPES + 3)]
            assert [s.recv(1) for s in idle[metrics.MAX_SCRAPES:]] == [b""] * 3
        got = {}
        wait_until(lambda: got.update(text=_try_scrape(port)) or got["text"], what="a scrape answered")
        assert samples(got["text"])[("nbdrep_bytes_copied_total", frozenset({("export", "(default)")}))] == 4096
    finally:
        server.stop()


def test_a_trickling_scrape_is_cut_at_the_deadline_without_a_traceback(monkeypatch, capsys):
    """The deadline is per request, not per read: a client sending a byte every 0.2 s (each
    read within its timeout) is cut at HTTP_TIMEOUT, and the log gets no traceback for it."""
    monkeypatch.setattr(metrics, "HTTP_TIMEOUT", 1.0)
    monkeypatch.setattr(metrics._Handler, "timeout", 1.0)
    server = metrics.MetricsServer("127.0.0.1", 0, Fixed())
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.address[1]), timeout=30) as s:
            reply = b""
            for byte in b"GET /metrics HTTP/1.0\r\n\r\n":   # 26 bytes: 5.2 s if never cut
                try:
                    s.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.2)
            try:
                reply = s.recv(65536)
            except ConnectionResetError:
                pass
            assert b"nbdrep_" not in reply, "a request that took 5 s was answered"
        assert "Traceback" not in capsys.readouterr().err
        assert scrape(server.address[1])   # the slot was given back
    finally:
        server.stop()


def _try_scrape(port):
    """The scrape's text, or None while the idle connections' slots are still being freed."""
    try:
        return scrape(port)
    except (ConnectionError, urllib.error.URLError):
        return None


def test_lag_is_meaningful_during_the_initial_sync(replicated):
    """Before: -1 (status: None) until the first commit, however long the first sync took."""
    server = replicated(16 * MiB, cycle=3600, random_mib=16, filters=["--filter=delay"],
                        params=["delay-write=2000ms"]).server
    seen = []

    def syncing():
        text = control.request(server.control, {"cmd": "metrics"}, timeout=30)["text"]
        seen.append(samples(text))
        return seen[-1].get(("nbdrep_state", frozenset({("state", "initial-sync")}))) == 1
    wait_until(syncing, what="the initial sync")
    lag = seen[-1][("nbdrep_lag_seconds", frozenset())]
    assert lag > 0
    wait_until(lambda: syncing() and seen[-1][("nbdrep_lag_seconds", frozenset())] > lag,
               what="the lag growing during the sync")
    server.rp()
    assert samples(control.request(server.control, {"cmd": "metrics"}, timeout=30)["text"])[
        ("nbdrep_resyncs_total", frozenset())] == 1
