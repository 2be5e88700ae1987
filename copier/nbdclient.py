"""libnbd Python handles for readers (`nbdrep verify`): connect, and drive several from one thread.

The copy engine does not use these: it opens its own handles in C (``fastcopy.c``).  A reader
issues few, large requests, where a GIL round trip per request costs nothing that matters.
"""

import errno as errno_module
import select
import time

import nbd

from copier.replica import ReplicaError
from copier.uri import parse_uri


def connect(uri, *, timeout=10.0, what="replica", block_status=False):
    """Connect to the NBD export at `uri` and return its ready nbd.NBD handle.

    Raises ValueError for a bad URI and ReplicaError when the export is
    unreachable or does not finish the handshake within `timeout` seconds
    (a refused connection fails at once).  `what` names the export in
    messages.  With `block_status`, base:allocation is requested.  The host
    name lookup of a TCP URI is done by libnbd and is not covered by
    `timeout`.  Cost: one connection and one handshake.
    """
    parse_uri(uri)
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    if block_status:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    try:
        h.aio_connect_uri(uri)
        _finish_handshake(h, time.monotonic() + timeout)
    except nbd.Error as e:
        raise ReplicaError(f"cannot connect to {what} {uri!r}: {e}", e.errnum) from None
    except Stalled:
        raise ReplicaError(
            f"cannot connect to {what} {uri!r}: no NBD handshake within {timeout:g} s",
            errno_module.ETIMEDOUT) from None
    return h


def _finish_handshake(h, deadline):
    pump = Pump([h])
    while h.aio_is_connecting():
        pump.wait(deadline - time.monotonic())
    if not h.aio_is_ready():
        raise nbd.Error(f"connection ended in state {h.connection_state()}", 0)


class Stalled(Exception):
    """No socket became ready before the timeout."""


class Pump:
    """Drives several libnbd handles from one thread with poll(2).

    This is what ``nbd.NBD.poll`` does for one handle, extended to many so
    that several connections progress while the thread sleeps.
    """

    def __init__(self, handles):
        self.handles = list(handles)

    def wait(self, timeout):
        """Sleep until a socket is ready (or `timeout` s), then let libnbd act.

        Raises Stalled on timeout and nbd.Error if a connection broke or
        no connection is left to wait on.  O(number of handles) per call.
        """
        poller, by_fd = self._register()
        if not by_fd:
            raise nbd.Error("no open NBD connection to wait on", errno_module.ENOTCONN)
        ready = poller.poll(max(0, int(timeout * 1000)))
        if not ready:
            raise Stalled()
        for fd, events in ready:
            _notify(by_fd[fd], events)

    def _register(self):
        poller = select.poll()
        by_fd = {}
        for h in self.handles:
            events = _poll_events(h)
            if events:
                fd = h.aio_get_fd()
                poller.register(fd, events)
                by_fd[fd] = h
        return poller, by_fd


def _poll_events(h):
    if h.aio_is_dead() or h.aio_is_closed() or h.aio_is_created():
        return 0
    direction = h.aio_get_direction()
    events = select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0
    return events | (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0)


def _notify(h, events):
    if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
        h.aio_notify_read()
    elif events & select.POLLOUT:
        h.aio_notify_write()
