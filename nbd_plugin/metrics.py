"""Prometheus metrics of a session: one collector over ``Session.status()``.

The same collector renders ``nbdrep status --prometheus`` (text format 0.0.4, through the
control socket) and serves ``/metrics`` over HTTP for ``nbdrep serve --metrics ADDR:PORT``, with
Debian's python3-prometheus-client. It reads the status at each scrape, so there is nothing to
keep in step. Counters are monotonic for the life of the server process (a restart starts them
at 0, which Prometheus's rate() understands). Per export (label ``export``, "(default)" for the
unnamed one): what committed cycles carried, the replica connection; the rest is per session
(one consistency group: one lag, one state, one tracker).
"""
import errno
import logging
import socket
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

# A scrape that does not arrive whole in this time is dropped, so idle connections end; past
# MAX_SCRAPES at once a connection is closed unanswered (Prometheus scrapes one at a time).
HTTP_TIMEOUT = 10.0
MAX_SCRAPES = 4
# Out of descriptors, accept() fails at once and the listening socket stays readable: wait a
# little before the next try instead of spinning on a core.
ACCEPT_BACKOFF = 0.1
log = logging.getLogger("nbdrep")

# (status["totals"] key, metric name without _total, help)
SESSION_COUNTERS = (
    ("writes", "nbdrep_writes", "Writes tracked (TEs)."),
    ("bytes_written", "nbdrep_bytes_written", "Bytes of the writes tracked."),
    ("cycles_committed", "nbdrep_cycles_committed", "Cycles committed on the replicas as recovery points."),
    ("cycles_inconsistent", "nbdrep_cycles_inconsistent",
     "Cycles copied without their point in time (not recovery points)."),
    ("cycles_failed", "nbdrep_cycles_failed", "Cycle attempts that failed (each is retried)."),
    ("resyncs", "nbdrep_resyncs", "Full resyncs committed, initial syncs included."),
)
EXPORT_COUNTERS = (
    ("extents", "nbdrep_extents", "Extents of committed cycles."),
    ("bytes_copied", "nbdrep_bytes_copied", "Bytes of committed cycles sent to the replica as data."),
    ("bytes_zeroed", "nbdrep_bytes_zeroed", "Bytes of committed cycles sent to the replica as WRITE_ZEROES."),
)


class StatusCollector:
    """A prometheus_client collector over a session (anything with ``status()``)."""

    def __init__(self, session):
        self.session = session

    def collect(self):
        return families(self.session.status())


def families(status):
    """The metric families of a status dict (``Session.status()``). O(devices + history)."""
    out = []
    for key, name, help_text in SESSION_COUNTERS:
        out.append(CounterMetricFamily(name, help_text, value=status["totals"].get(key, 0)))
    out.append(CounterMetricFamily("nbdrep_requests_retried", "Replica requests retried.",
                                   value=status["requests_retried"]))
    exports = [(d["name"] or "(default)", d) for d in status["devices"]]
    for key, name, help_text in EXPORT_COUNTERS:
        family = CounterMetricFamily(name, help_text, labels=["export"])
        for export, d in exports:
            family.add_metric([export], d["totals"].get(key, 0))
        out.append(family)
    connected = GaugeMetricFamily("nbdrep_replica_connected",
                                  "1 while the copier holds a connection to the export's replica.",
                                  labels=["export"])
    for export, d in exports:
        if d["replica"]:
            connected.add_metric([export], int(d["replica_connected"]))
    out.append(connected)
    state = GaugeMetricFamily("nbdrep_state", "The session's state, as in nbdrep status (1).",
                              labels=["state"])
    state.add_metric([status["state"]], 1)
    out += [state, _gauge("nbdrep_cycle", "Open cycle id.", status["cycle"])]
    if status["replicated"]:
        out += [
            _gauge("nbdrep_committed_cycle", "Newest cycle committed on the replicas.",
                   status["committed_cycle"]),
            _gauge("nbdrep_lag_seconds", "Now minus the RP time of the newest committed cycle "
                   "(before the first commit: minus the session's start).", status["lag"]),
            _gauge("nbdrep_failures", "Failed cycle attempts in a row.", status["failures"]),
            _gauge("nbdrep_stuck", "1 once the same failure repeated (see nbdrep status).",
                   int(bool(status["stuck"]))),
        ]
    keepaside = GaugeMetricFamily("nbdrep_keepaside_bytes",
                                  "Bytes kept aside for the cycle being copied.", labels=["where"])
    keepaside.add_metric(["memory"], status["keepaside"]["mem_bytes"])
    keepaside.add_metric(["spill"], status["keepaside"]["spill_bytes"])
    out += [keepaside,
            _gauge("nbdrep_tracker_memory_bytes", "Memory of the tracker's TE arrays.",
                   status["tracker"]["memory_bytes"]),
            _gauge("nbdrep_tracker_entries", "TEs the tracker holds.", status["tracker"]["entries"])]
    return out


def _gauge(name, help_text, value):
    return GaugeMetricFamily(name, help_text, value=value)


def registry(session):
    """A registry holding only ``session``'s metrics (not the library's process metrics)."""
    reg = CollectorRegistry()
    reg.register(StatusCollector(session))
    return reg


def text(session):
    """``session``'s metrics in Prometheus text format, as /metrics serves them."""
    return generate_latest(registry(session)).decode()


class _Handler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT   # per read; the server's watchdog bounds the whole request

    def log_message(self, format, *args):
        """Scrapes every few seconds would flood the server's log."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per scrape, at most MAX_SCRAPES at once. (socketserver's loop already
    survives a failing accept, EMFILE included: it tries again at the next poll.)"""

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:   # no thread started: nothing will release the slot
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        # One deadline for the whole request: a client trickling a byte at a time would
        # otherwise hold its slot for as long as it likes.
        watchdog = threading.Timer(HTTP_TIMEOUT, _cut, args=(request,))
        watchdog.daemon = True
        watchdog.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            watchdog.cancel()
            self._slots.release()

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(ACCEPT_BACKOFF)
            raise

    def handle_error(self, request, client_address):
        """A client that timed out, was cut or went away is not news; anything else is one
        line, never a traceback in the server's log."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log.warning("metrics request failed: %r", error)


def _cut(request):
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class MetricsServer:
    """/metrics over HTTP for one session: bound at construction (before nbdkit forks, so a
    failure reaches the user), served from ``start`` (after the fork) in daemon threads."""

    def __init__(self, address, port, session):
        class Server(_BoundedServer):
            address_family = _family(address)
        self._httpd = make_server(address, port, make_wsgi_app(registry(session)), Server,
                                  handler_class=_Handler)
        self.address = self._httpd.server_address   # the port chosen, if given 0
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="nbdrep-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self):
        """Stop serving (waiting for the loop only if it runs: shutdown() waits for it) and
        close the listening socket."""
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()


def _family(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET
