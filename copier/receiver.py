"""The copier's side of the receiver protocol: commit records sent as NBD requests.

A receiver (``nbdrep receive``) serves, next to the data exports, a small metadata export
named ``META_EXPORT`` on the same server. Everything the copier says to it travels as NBD
requests on the URIs the user gave, with the export name swapped, so an NBD proxy between the
sites that forwards export names (nbdkit's nbd plugin with ``dynamic-export=true``, a TLS
tunnel) carries it unchanged:

* READ of block 0: the receiver's state, ``MAGIC_STATE`` and JSON (session id, committed
  cycle, its RP time, and ``prepared``: the newest prepared cycle and its session, or null),
  padded with NULs to ``META_SIZE``.
* WRITE of block 0: a commit record, ``MAGIC_COMMIT`` and JSON (session id, cycle, RP time),
  padded likewise, then FLUSH. The receiver answers the write only once the commit is durable:
  every write it received on any data export since its last commit becomes the recovery point
  ``cycle`` of all its exports at once.
* WRITE of block 0: a prepare record, ``MAGIC_PREPARE`` and the commit record's JSON plus
  ``decided`` (the newest cycle whose commit records were sent, or null), where the session's
  consistency group spans several receivers (``Link.commit``): the receiver makes its pending
  writes RP ``cycle`` durably but does not show it; the commit record of ``cycle`` or a later
  one shows it.
* WRITE of block 0: a fence record, ``MAGIC_FENCE`` and JSON (session id, export name, the
  session's committed cycle: its prepared RPs after that one are of an abandoned history), before
  the copier opens data connections to that export (``Link.fence``). The receiver answers once
  every write already inside it is done, and from then on refuses (ESHUTDOWN) every write,
  zero, trim and flush on a connection to that export opened before the fence, and every
  commit record on a metadata connection opened before it. So a write of a dropped connection
  still on its way (held in the receiver's queue, a proxy's buffers, a stalled network) can
  never land after the new connections rewrote its blocks and be committed with them.

The fence assumes what nbdkit's nbd plugin (without ``shared=true``), a TLS tunnel or socat do:
a proxy opens one connection to the receiver per client connection, during that client's
handshake, and never sends one client's requests on another's connection or replays them on a
connection it opened later. A proxy that pools or shares connections across clients gets the
new session's writes refused (replication fails, loudly), not stale bytes committed. One that
replays defeats it: nbdkit's ``retry`` filter reopens after an error (ESHUTDOWN included) and
resends the request on the new connection, under the new epoch.

A plain NBD export must stay a valid replica, and ``nbdkit file`` serves any export name as
the same file, so the copier writes a commit record only to an export that first read back
as a receiver's state (the magic, and exactly ``META_SIZE`` bytes); it never writes to
anything else.
"""
import errno
import json
import logging
import time
from urllib.parse import unquote, urlsplit

import nbd

from copier.nbdclient import Pump, Stalled, connect
from copier.replica import ReplicaError

log = logging.getLogger("nbdrep")

# Not a valid export NAME (those start with a letter or digit), so never a user's export.
META_EXPORT = ".nbdrep"
META_SIZE = 4096
MAGIC_STATE = b"nbdrep-receiver/1\n"
MAGIC_COMMIT = b"nbdrep-commit/1\n"
MAGIC_FENCE = b"nbdrep-fence/1\n"
MAGIC_PREPARE = b"nbdrep-prepare/1\n"
# Every metadata call (connect, read, commit, flush) is bounded: a receiver that stopped
# answering (SIGSTOP, a hung host) must not hold the session's worker.
META_TIMEOUT = 10.0


class ProtocolError(ValueError):
    """A metadata block that is not what the protocol says."""


def meta_uri(data_uri):
    """The metadata export's URI on the server of ``data_uri``: the same URI, export swapped."""
    parts = urlsplit(data_uri)
    # Not urlunsplit: it drops the '//' of an empty authority (nbd+unix:///...).
    return f"{parts.scheme}://{parts.netloc}/{META_EXPORT}" + (f"?{parts.query}" if parts.query else "")


def export_name(data_uri):
    """The export name ``data_uri`` asks for, as libnbd sends it ("" for the default one)."""
    return unquote(urlsplit(data_uri).path[1:])


def encode(magic, obj):
    """A metadata block: ``magic``, compact JSON, NUL padding to META_SIZE."""
    body = magic + json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > META_SIZE:
        raise ProtocolError(f"metadata record of {len(body)} bytes is over {META_SIZE}")
    return body + bytes(META_SIZE - len(body))


def decode(magic, block):
    """The JSON object of a metadata block starting with ``magic``; ProtocolError otherwise."""
    block = bytes(block)
    if not block.startswith(magic):
        raise ProtocolError("not an nbdrep metadata block")
    try:
        obj = json.loads(block[len(magic):].rstrip(b"\0"))
    except ValueError as e:
        raise ProtocolError(f"bad metadata record: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad metadata record: not a JSON object")
    return obj


def probe(data_uri, timeout=META_TIMEOUT):
    """The receiver state behind ``data_uri``'s server, or None for a plain NBD export (or a
    server that has no such export). Reads only. Raises ReplicaError if the server is down
    or does not answer within ``timeout`` seconds."""
    h = _open(data_uri, timeout)
    if h is None:
        return None
    try:
        return _read_state(h, timeout)
    finally:
        _close(h)


def _open(data_uri, timeout):
    """A connection to the metadata export of ``data_uri``'s server; None if that server is
    up and says it has no such export; ReplicaError otherwise (down, a timeout, out of
    descriptors, a TLS failure: none of them says the server is no receiver)."""
    try:
        return connect(meta_uri(data_uri), timeout=timeout, what="receiver metadata")
    except ReplicaError as e:
        if e.errno != errno.ENOENT:
            raise
        # Both a refused export name and a missing socket are ENOENT: ask the data export.
        _close(connect(data_uri, timeout=timeout))
        return None


def _close(h, timeout=1.0):
    """Disconnect politely, waiting at most ``timeout`` seconds for a server that stopped
    answering; the connection closes when the handle goes."""
    try:
        h.aio_disconnect(0)
        pump, deadline = Pump([h]), time.monotonic() + timeout
        while not (h.aio_is_closed() or h.aio_is_dead()):
            pump.wait(deadline - time.monotonic())
    except (nbd.Error, Stalled):
        pass


def _call(h, issue, timeout, what):
    """Issue one aio command (``issue()`` returns its cookie) and wait at most ``timeout``
    seconds for it; ReplicaError if it fails or times out (the handle is then unusable)."""
    deadline = time.monotonic() + timeout
    try:
        cookie = issue()
        pump = Pump([h])
        while not h.aio_command_completed(cookie):
            pump.wait(deadline - time.monotonic())
    except Stalled:
        raise ReplicaError(f"{what} receiver metadata: no reply within {timeout:g} s",
                           errno.ETIMEDOUT) from None
    except nbd.Error as e:
        raise ReplicaError(f"{what} receiver metadata: {e}", e.errnum) from None


def _read_state(h, timeout):
    """The receiver state on the metadata connection ``h``, or None if that export is not a
    receiver's (another size, or not its magic)."""
    if h.get_size() != META_SIZE:
        return None
    buf = nbd.Buffer(META_SIZE)
    _call(h, lambda: h.aio_pread(buf, 0), timeout, "reading")
    try:
        return decode(MAGIC_STATE, buf.to_bytearray())
    except ProtocolError:
        return None


def mismatch(state, session_id, committed_cycle):
    """Why a receiver in ``state`` cannot resume a session at ``committed_cycle``, or None.

    Behind by some cycles is fine: it keeps what it received after its last commit (flushed
    before the source counted those cycles committed) and the next commit covers it. So is a
    prepared cycle up to ``committed_cycle`` (the source crashed amid its prepares or commits):
    the source wrote its record before any prepare, so in its history no receiver prepared a
    later one. A later one (the source's state directory restored from a backup, or its record
    not written before a crash) is of a history the source no longer has, and so is what the
    receiver took after it: it is resynced in full, and its first fence, which carries
    ``committed_cycle``, drops those prepared RPs (``receiver.store.Store.fence``)."""
    if state.get("session_id") != session_id:
        return (f"the receiver holds session {state.get('session_id')}, not {session_id}"
                if state.get("session_id") else "the receiver has no commit of this session")
    if (state.get("committed_cycle") or 0) > (committed_cycle or 0):
        return (f"the receiver committed cycle {state['committed_cycle']}, after this source's "
                f"last commit {committed_cycle}: another history")
    prepared = state.get("prepared")   # absent from a receiver that predates it
    if isinstance(prepared, dict) and prepared.get("session_id") == session_id and \
            (prepared.get("cycle") or 0) > (committed_cycle or 0):
        return (f"the receiver prepared cycle {prepared['cycle']}, after this source's last "
                f"commit {committed_cycle}: another history")
    return None


def handshake(plan, devices):
    """The resume handshake: every source that ``plan`` (replication.record.Plan) resumes and
    whose replica is a receiver is resynced in full instead if the receiver's session, its
    committed cycle or its newest prepared one says it holds another history (``mismatch``),
    with the reason logged and
    in ``plan.how``. Receivers that agree resume with no resync. Plain exports are left to the
    plan's sampled-block check. O(devices) connections."""
    for d in devices:
        if d.dev not in plan.resume:
            continue
        try:
            state = probe(d.replica_uri)
        except ReplicaError:
            continue   # reachable at the start-up check a moment ago; the first cycle will say
        if state is None:
            continue
        why = mismatch(state, plan.session_id, plan.committed_cycle)
        label = repr(d.name or "(default)")
        if why is None:
            log.info("%s: the receiver is at cycle %s of session %s: resuming without a resync",
                     label, state.get("committed_cycle"), plan.session_id)
            continue
        log.info("%s: full resync: %s", label, why)
        del plan.resume[d.dev]
        plan.full[d.dev] = why
        plan.how += f"; {label}: full resync ({why})"


class Link:
    """Commits and fences to the receivers among a session's replicas: {data URI} -> one
    metadata connection per receiver, opened lazily and re-probed after any failure. Every
    call is bounded by ``timeout`` seconds.

    A receiver that showed this session once (its state, or a commit it took) must still
    show it on every later connection: one restarted on another state directory, or given
    another history, gets no increment committed over it (logged) until the caller took it
    from ``take_diverged`` to resync it in full."""

    def __init__(self, data_uris, timeout=META_TIMEOUT, ours=(), committed=None):
        self._uris = sorted({meta_uri(u): u for u in data_uris}.items())
        # The session's newest commit before the next ``commit`` (at first the one it resumes
        # from), and the receivers fenced since this link was made (``fence_new``).
        self._committed = committed
        self._fenced = set()
        self._timeout = timeout
        self._handles = {}   # meta URI -> nbd handle of a receiver; None: a plain export
        # Meta URIs of receivers that hold this session: those that showed it, and from the
        # start those of the exports the session resumes (``ours``: data URIs), checked on
        # their first connection even if the start-up handshake could not reach them.
        self._ours = {meta_uri(u) for u in ours}
        self._taken = {}     # meta URI -> the newest cycle it took: it may not go back
        self._diverged = {}   # meta URI -> why no commit goes there until take_diverged
        self._decided = None   # the newest cycle whose commit records were sent (see commit)
        self._seen_receiver = False   # see has_receivers
        # A prepare or commit record of the last commit got no answer: it may still be acted
        # on later (see ``unsettled``).
        self.unsettled = False

    def has_receivers(self):
        """Whether any replica of the session answered as a receiver. A receiver takes data
        only after a fence (``fence``), which connects it, so this is true before the first
        commit it could take. O(1)."""
        return self._seen_receiver

    def commit(self, session_id, cycle, rp_time):
        """Make ``cycle`` the recovery point on every receiver; returns how many took it.

        Never raises: a receiver that does not take a commit loses nothing (it keeps what it
        received, invisible, and the next commit covers it), so the failure is logged and the
        cycle stays committed on the source's side. But a record that got no answer (a
        timeout: the receiver held it behind a long fold, a proxy delayed it) may still be
        acted on later, and would then show as RP ``cycle`` whatever the next cycle wrote in
        the meantime over the same connections: ``unsettled`` is then True, and the caller
        must close its data connections before the next cycle writes, so that the next copy
        fences first (a late record is then either acted on before the fence, over this
        cycle's writes only, or refused as older than it).

        Where the group spans several receivers that all showed this session, the commit is
        two-phase, so that no receiver shows ``cycle`` unless every one holds it: a prepare
        record to each, then, only if all of them took it, the commit records. The caller
        wrote its own record first (the source counts N copied); that every receiver prepared
        N decides that N is shown. State table (N = ``cycle``):

        ============================  ==========================  =============================
        crash (kill -9, power) of     receivers hold              after restart / source lost
        ============================  ==========================  =============================
        source before any prepare     N pending on each           the next commit covers N; lost:
                                                                  every receiver shows N-1
        source amid the prepares      N prepared on some,         the next commit shows N, then
                                      pending on the others       its own cycle; lost: the group
                                                                  RP is N-1 (``rps --group``)
        source amid the commits       N shown on some,            the next commit shows N; lost:
                                      prepared on the others      the group RP is N: ``promote
                                                                  --to N`` shows it on each
        a receiver before prepare     N pending (durable if it    its prepare fails: N committed
                                      flushed), the record N-1    on none; the next prepare puts
                                                                  N back into the pending writes
                                                                  where it was prepared
        a receiver after prepare      N prepared                  as "amid the commits"
        source, its record then       N prepared on some, the     those are resynced in full
        older than N (its state       source's record says < N    (``mismatch``); the first
        directory restored, or the                                fence there (before any
        record not written before                                 record: ``fence_new``)
        its crash)                                                drops their prepared RPs
                                                                  after the record, never shown
        source, its record then       N shown on some, the        those are resynced in full
        older than N (as above)       source's record says < N    (``mismatch``); after the
                                                                  first fence their first
                                                                  commit M, whatever its id,
                                                                  folds their RPs into the base
                                                                  and shows M
        ============================  ==========================  =============================

        A receiver that is new to the session (a full sync) takes one-phase commits until it
        showed the session: its older RPs are of another history anyway. So does one that
        committed cycles after the source's, until it took one (it refuses a prepare of them)."""
        body = {"session_id": session_id, "cycle": cycle, "rp_time": rp_time}
        self.unsettled = False
        fenced = self.fence_new(session_id, cycle)
        self._committed = cycle   # the source counts it committed
        if not fenced:
            return 0
        live = [(meta, uri) for meta, uri in self._uris if meta not in self._diverged]
        # The receivers: a plain export's handle is None (one not connected yet is not in
        # _ours either, so that commit is one-phase).
        group = [(meta, uri) for meta, uri in live if self._handles.get(meta, meta) is not None]
        if len(group) > 1 and all(meta in self._ours for meta, _ in group):
            # Prepared RPs newer than ``decided`` were aborted: a receiver puts them back
            # into its pending writes, so an abort repeated each cycle adds no RP.
            prepare = encode(MAGIC_PREPARE, dict(body, decided=self._decided))
            for meta, data_uri in group:
                try:
                    self._send(meta, data_uri, session_id, cycle, prepare, "preparing on")
                except ReplicaError as e:
                    log.warning("receiver %s did not prepare cycle %d (%s): no receiver shows it; "
                                "the next commit covers it", meta, cycle, e)
                    self.unsettled = True
                    return 0
        self._decided = cycle
        done = 0
        for meta, data_uri in live:
            try:
                if self._send(meta, data_uri, session_id, cycle, encode(MAGIC_COMMIT, body), "committing to"):
                    self._ours.add(meta)
                    self._taken[meta] = cycle
                    done += 1
            except ReplicaError as e:
                log.warning("receiver %s did not take the commit of cycle %d (%s); the "
                            "next commit covers it", meta, cycle, e)
                self.unsettled = True
        return done

    def fence_new(self, session_id, cycle):
        """Before the commit of ``cycle``: fence each receiver this link has not fenced yet, so
        that the first record it gets from this link is a fence. A run whose first cycles
        copied nothing (empty reports) commits without a copy, so without the copy's fence, and
        the fence is what tells a receiver the source's committed cycle (the one before
        ``cycle``), by which it drops and folds away the RPs of a history the source abandoned
        (``receiver.store.Store.fence``). The caller calls it before it writes its own record,
        so that ``has_receivers`` knows every receiver by then (a receiver's commit must be
        recorded first); ``commit`` calls it too. False, logged, if one could not be fenced:
        no receiver is then sent the commit of ``cycle``. O(receivers not fenced yet)."""
        for meta, data_uri in self._uris:
            if meta in self._fenced or meta in self._diverged:
                continue
            try:
                self.fence(data_uri, session_id, self._committed)
            except ReplicaError as e:
                log.warning("receiver %s could not be fenced before its first commit record (%s): "
                            "no receiver shows cycle %d; the next commit covers it", meta, e, cycle)
                return False
        return True

    def fence(self, data_uri, session_id, committed_cycle):
        """Before opening data connections to ``data_uri``: if its server is a receiver, make it
        refuse, from now on, the writes of every connection to that export opened before (see
        the module's docstring), once those already inside it are done. ``committed_cycle``:
        the session's newest commit, for the history check of a first connection and, in the
        fence record, for the receiver to drop the session's prepared RPs after it. Fences a
        receiver found holding another history too (the full resync's writes need it). Raises
        ReplicaError if a receiver does not take the fence: no data may go there unfenced."""
        block = encode(MAGIC_FENCE, {"session_id": session_id, "export": export_name(data_uri),
                                     "committed_cycle": committed_cycle})
        meta = meta_uri(data_uri)
        self._send(meta, data_uri, session_id, committed_cycle, block, "fencing", diverged_ok=True)
        self._fenced.add(meta)

    def _send(self, meta, data_uri, session_id, cycle, block, what, diverged_ok=False):
        """Write the metadata ``block`` to the receiver of ``data_uri`` and FLUSH; False if its
        server is a plain export (or, unless ``diverged_ok``, a receiver whose history
        diverged), True once sent. ReplicaError after two failed attempts: a kept connection
        may be to a receiver since restarted, so the second one connects afresh."""
        buf = nbd.Buffer.from_bytearray(bytearray(block))
        for attempt in (1, 2):
            try:
                h = self._handle(meta, data_uri, session_id, cycle)
                if h is None or (meta in self._diverged and not diverged_ok):
                    return False
                _call(h, lambda: h.aio_pwrite(buf, 0), self._timeout, what)
                _call(h, h.aio_flush, self._timeout, "flushing")
                return True
            except ReplicaError:
                self._drop(meta)
                if attempt == 2:
                    raise

    def _handle(self, meta, data_uri, session_id, cycle):
        """The kept metadata connection of ``meta``, or a new one, its state checked; None for
        a plain export. A receiver showing another history is put in ``_diverged`` (logged),
        its connection kept: it gets fences, not commits."""
        if meta not in self._handles:
            h = _open(data_uri, self._timeout)
            state = None
            try:
                state = None if h is None else _read_state(h, self._timeout)
            finally:
                if h is not None and state is None:
                    _close(h)
                    h = None
            why = None if state is None or meta not in self._ours else mismatch(state, session_id, cycle)
            if why is None and state is not None and \
                    (state.get("committed_cycle") or 0) < self._taken.get(meta, 0):
                why = (f"the receiver is at cycle {state.get('committed_cycle')}, before cycle "
                       f"{self._taken[meta]} it took: its state went back")
            if why is not None:
                self._diverged[meta] = why
                log.error("receiver %s: %s; no commit goes there before a full resync", meta, why)
            elif state is not None and mismatch(state, session_id, cycle) is None:
                # Of this session and history. One that holds cycles after ``cycle`` (one being
                # resynced after its source's state was restored) takes one-phase commits until
                # it took one: it refuses a prepare of an id it committed.
                self._ours.add(meta)
            self._seen_receiver = self._seen_receiver or state is not None
            self._handles[meta] = h
        return self._handles[meta]

    def take_diverged(self):
        """{metadata URI (``meta_uri``): why} of the receivers found holding another history
        since the last call. They take commits again from now on, as receivers new to this
        session: the caller copies every export on them in full before its next commit."""
        found, self._diverged = self._diverged, {}
        self._ours.difference_update(found)
        for meta in found:
            self._taken.pop(meta, None)
        return found

    def _drop(self, meta):
        h = self._handles.pop(meta, None)
        if h is not None:
            _close(h)

    def close(self):
        """Close every metadata connection (the next commit opens them again)."""
        for meta in list(self._handles):
            self._drop(meta)
