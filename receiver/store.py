"""The receiver's storage: base images, per-cycle journals, the commit record. All its I/O.

Theory of operation
-------------------
Each target (a file or block device, served as export NAME) is a *base image* plus the
journals of the retained RPs, newest on top. Writes from the copier never touch either: they
go to the export's *pending* journal, which no read sees. A journal is a sparse file of the
target's size, written at the same offsets as the target (its bytes hold the data, its holes
the zeroed ranges), and a log of the (offset, length) of every write, filled in after the
write returns, so a kill -9 leaves a log that names only writes that completed (``Journal``
says how). A FLUSH makes both durable.

A commit (a commit record written to the metadata export, ``copier.receiver``) turns every
export's pending journal into RP ``cycle`` at once: new empty pending journals are made and
the *record* (``receiver.json``, written as replication/record.py's ``write_json`` writes:
temporary file, fsync, rename, fsync of the directory) now lists the old ones under RP
``cycle`` and the new ones as pending. That rename is the commit point for every export
together. After a crash at any instant the record is the old one (the writes stay pending,
invisible, and the next commit covers them: nothing the copier sent is lost) or the new one.
Journal files that neither the record's RPs nor its pending entries name are leftovers of a
crash and are deleted at start. Before the first commit there is no RP to keep whole, and the
writes (the initial sync) go straight into the targets; the first commit records an RP that
lives in them.

RP ``N`` of an export reads, per byte, from the newest journal of an RP <= N that holds it,
else from the base image. Retention folds the oldest RP into the base image: copy its
journal's ranges there, fsync, then a record without it. The record says ``folding`` first:
a crash in the copy leaves base images that are no RP (part of the folded one over the base
one), so the base's RP is not served while it says so, and a start redoes the copy first.
No retained RP sees the base change, since each reads those ranges from that journal or a
newer one; a read of the newest RP that took its map before, and may be sent to the base,
is waited for (``_grace``). An RP attached as an export (``NAME@N``) pins every RP newer
than it, so the base under it never changes. A folded journal's data file is kept, cut to
its logged ranges, for the next pending journal (``_retire``): writing into allocated, cached
blocks is cheaper than into a fresh sparse file, and only logged ranges are ever read.

A copier whose connections dropped (a cut, a timeout, kill -9) may have writes still on their
way: queued in nbdkit, held in a proxy. Before it opens data connections to an export it
*fences* it (``fence``, a fence record on the metadata export): every connection takes its
export's epoch when it opens; the fence holds the writes, waits for those inside, and makes
the export's epoch newer than every connection open then. From then on those connections'
writes, zeroes, trims and flushes, and the commit records of metadata connections opened
before, are refused (ESHUTDOWN): a late write can no longer land over the new connections'
bytes of the same blocks and be committed with them.

Where a consistency group spans several receivers, the copier commits in two phases
(``copier.receiver.Link.commit`` has the state table): a *prepare* does what a commit does
(fresh pending journals, one record rename) but lists the RP under ``prepared``, which no
read sees; the commit of that cycle or a later one moves it to the RPs in one record write
(``_publish``), as ``promote`` does when the operator decides with the source lost. A
prepared RP the copier aborted (another receiver did not prepare it) goes back into the
pending journals at the next prepare (``_unprepare``), so at most one waits. The source
records cycle N before it prepares N, so a prepared RP of its session newer than its
committed cycle is of a history it abandoned (its state directory restored, or its record
not written before a crash). Every copy fences first, and the fence record carries the
source's committed cycle: the fence drops those RPs, never shown (``fence``), whatever ids
the new run uses (a record taken while the source ran makes it number from far above; one
taken after a clean stop, from the record's next cycle, so its ids come again). A commit or
prepare of cycle M drops, the same way, the session's prepared RPs newer than M or of M under
another RP time (``_stale``), for a record that reaches a receiver before any fence. The
state block names the newest prepared cycle so that the source resyncs such a receiver in
full (``copier.receiver.mismatch``) instead of trusting what it holds.

The same fence says whether the committed history is the source's: a receiver that
committed cycle K of the session after the fence's committed cycle holds a history the
source abandoned (its state directory restored from a backup or a VM snapshot, or its record
not written before a crash), and the source resyncs it in full. The session's next commit,
whatever its cycle id (from the record's next cycle again after a clean stop, or from far
above), is then taken like a new session's first: it folds every retained RP into the base
images, which the record then names as no RP, before it commits, so an RP id never names
images of two histories, here or across a group (``rps --group``). No clock decides it: a
source restored with its clock put back is told apart as well.
"""
import array
import bisect
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import mmap
import os
import struct
import threading
import time

import numpy as np

from copier.receiver import MAGIC_COMMIT, MAGIC_FENCE, MAGIC_PREPARE, MAGIC_STATE, decode, encode
from nbd_plugin.backend import Backend, BackendError
from receiver import journal as policy
from reporter.report import clip, difference, merge
from replication.record import write_json

log = logging.getLogger("nbdrep")

RECORD = "receiver.json"
LOCK = "receiver.lock"
JOURNALS = "journal"
VERSION = 1
ENTRY = struct.Struct("<QQ")
_WORD = struct.Struct("<Q")
LOG_SLOTS = 1 << 16   # the log grows a mapping of 1 MiB at a time, doubling
# A pending log is compacted (``Journal.compact``) once its mapping holds this many times the
# slots its last compaction left (at least LOG_SLOTS): it stays within a few times its union.
COMPACT_GROWTH = 4
QUIESCE_POLL = 0.0002
COPY_CHUNK = 4 << 20


class StoreError(Exception):
    """The state directory or a target cannot be used as asked; the message says why."""


class Journal:
    """One export's writes of one cycle (or the pending ones): the sparse data file and the
    log of written ranges. A pending journal holds its files open and its log mapped; a
    committed one only its data file's descriptor (retention keeps hundreds: one per RP and
    export). Closed when the last reference goes (a reader of an RP that is being folded keeps
    it open until its read ends).

    The log is a file of 16-byte slots (offset, length), written through a shared mapping: a
    slot is reserved (an atomic counter) and filled after the write returns, offset first,
    so a kill -9 leaves filled slots in the page cache and an unfilled one reads as length 0,
    which is ignored. Not a write() per entry: each system call that drops the GIL costs a GIL
    hand-off, and 4k writes into the receiver ran at half the rate of the source's plugin with
    one per write and a lock per write. A commit reads the entries from the mapping and cuts
    the log file to them, so a start reads each retained log's entries, not its mapping's size.
    """

    def __init__(self, folder, seq, size, create=False, pending=False, reuse=None):
        """``create`` the files (the data file from ``reuse``, a spare, if given: see
        ``Store._retire``), or open those of journal ``seq``."""
        self.seq = seq
        self.folder = folder
        self._renamed = False   # a compaction's rename not yet durable
        # Made from a spare: blocks outside its own ranges are the spare's until its commit is
        # trimmed (``Store._trim_inherited``).
        self.reused = reuse is not None
        self.data_path = os.path.join(folder, f"{seq}.data")
        self.log_path = os.path.join(folder, f"{seq}.log")
        if create:
            if reuse is not None:
                os.rename(reuse, self.data_path)
            else:
                with open(self.data_path, "wb") as f:
                    f.truncate(size)
            open(self.log_path, "wb").close()
        self.data = Backend(self.data_path, readonly=not pending)
        self.log_fd = None
        self._maps = []   # every mapping made: a writer may still hold an earlier one
        self.slots = 0
        if pending:
            self.log_fd = os.open(self.log_path, os.O_RDWR | os.O_CLOEXEC)
            used = len(_entries(self.log_path))
            self._next = itertools.count(used)
            self._grow_lock = threading.Lock()
            self._grow(used + 1)
            self.compacted = used   # the slots the last compaction (or the start) left
        self.pairs = None   # the merged extents, once the journal is committed
        self.bytes = 0

    def __del__(self):
        with contextlib.suppress(Exception):
            self.seal()
            self.data.close()

    def _grow(self, need):
        """Map at least ``need`` slots. The count is published after the mapping, so a
        writer that finds its slot under ``slots`` finds a mapping holding it."""
        with self._grow_lock:
            if need <= self.slots:
                return
            slots = max(LOG_SLOTS, -(-need // LOG_SLOTS) * LOG_SLOTS, self.slots * 2)
            os.ftruncate(self.log_fd, slots * ENTRY.size)
            self._maps.append(mmap.mmap(self.log_fd, slots * ENTRY.size))
            self.slots = slots

    def reserve(self):
        """A slot for one write's entry: (mapping, position). Thread-safe without a lock:
        ``next`` on an itertools.count is atomic under the GIL."""
        i = next(self._next)
        if i >= self.slots:
            self._grow(i + 1)
        return self._maps[-1], i * ENTRY.size

    @staticmethod
    def note(slot, offset, length):
        """Fill a reserved slot once its write completed: offset, then length (see above)."""
        mapping, pos = slot
        _WORD.pack_into(mapping, pos, offset)
        _WORD.pack_into(mapping, pos + 8, length)

    def seal(self):
        """Committed (or gone): no more entries, so the log's mappings and descriptor go, and
        the log file is cut to the slots reserved (the rest are empty: cutting them is safe at
        any time). No writer can reserve one meanwhile: they are held, or hold no reference."""
        used = min(self._reserved(), self.slots) if self.log_fd is not None else 0
        for mapping in self._maps:
            mapping.close()
        self._maps = []
        if self.log_fd is not None:
            os.ftruncate(self.log_fd, used * ENTRY.size)
            os.close(self.log_fd)
            self.log_fd = None

    def _reserved(self):
        """How many slots were reserved. Only with the writes held: it takes a number from
        the counter and starts a new counter there."""
        n = next(self._next)
        self._next = itertools.count(n)
        return n

    def _mapped_entries(self):
        """The reserved slots, as an (n, 2) array copied out of the mapping (writes held)."""
        n = min(self._reserved(), self.slots)
        return np.frombuffer(self._maps[-1], dtype="<u8", count=2 * n).reshape(-1, 2).copy()

    def due_compaction(self):
        return self.log_fd is not None and self.slots >= COMPACT_GROWTH * max(LOG_SLOTS, self.compacted)

    def compact(self, size):
        """Rewrite a pending log as the merged union of its entries (writes held). Commits
        that keep failing leave the pending journal taking every retried cycle's writes, 16
        bytes each, for as long as they fail; the union is bounded by the target. The data
        is made durable first (the new log is), and the new log is written aside and renamed
        over the old one: after a crash the log is either, and both name the same ranges. Once
        renamed, the new log takes the entries; until its directory entry is durable, a FLUSH
        makes it so (``sync``), so a FLUSH never vouches for entries in a log power loss undoes."""
        pairs = np.asarray(self.extents(size), dtype="<u8")
        self.data.flush()
        aside = os.path.join(self.folder, f"compact-{self.seq}.log")   # no seq: a start deletes it
        fd = os.open(aside, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, pairs.tobytes()) != pairs.nbytes:   # small: the union's entries
                raise OSError(errno.ENOSPC, f"short write of {aside}")
            os.fdatasync(fd)
            os.rename(aside, self.log_path)
            self._renamed = True
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(aside)
            raise
        for mapping in self._maps:
            mapping.close()
        os.close(self.log_fd)
        self._maps, self.slots, self.log_fd = [], 0, fd
        self.compacted = len(pairs) // 2
        self._next = itertools.count(self.compacted)
        self._grow(self.compacted + 1)
        _fsync_dir(self.folder)
        self._renamed = False

    def sync(self):
        """Make the data and the log durable."""
        self.data.flush()
        if self._maps:
            self._maps[-1].flush()
        os.fdatasync(self.log_fd)
        if self._renamed:
            _fsync_dir(self.folder)
            self._renamed = False

    def extents(self, size):
        """The union of the logged writes, as merged flat pairs: of a pending journal (writes
        held) from its mapping, else from its file. O(n log n)."""
        if self._maps:
            pairs = self._mapped_entries()
        else:
            pairs = _entries(self.log_path)
        return clip(merge(array.array("Q", pairs[pairs[:, 1] > 0].ravel().tobytes())), size)

    def unlink(self):
        for path in (self.data_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Store:
    """The targets, their journals and the record in ``state_dir``.

    ``targets``: [(name, path)]. Holds an exclusive lock on the state directory for its life.
    Thread-safe: nbdkit's threads write pending journals and read RPs concurrently; commits,
    folds and pins are serialised by ``_fold_lock`` (folding) and ``_record_lock`` (the record).
    """

    def __init__(self, state_dir, targets, keep=(None, 600.0), journal_max=1 << 30,
                 clock=time.time, readonly=False):
        self.state_dir = state_dir
        self.folder = os.path.join(state_dir, JOURNALS)
        self.keep_count, self.keep_seconds = keep
        self.journal_max = journal_max
        self.clock = clock
        self.readonly = readonly
        self.bases = {}
        self.journals = {}   # seq -> Journal of a retained RP
        self.pending = {}    # name -> Journal
        self.latest = {}     # name -> ExtentMap of the newest RP
        self._cond = threading.Condition(threading.Lock())   # a plain lock: cheaper than an RLock
        self._inflight = []      # one entry per write in progress (see _enter)
        self._readers = set()    # one token per read of a newest RP in progress (see read)
        self._spares = {}        # name -> a folded journal's data file to reuse (see _retire)
        self._retired = []       # (name, journal) folded, their files not yet deleted (_reap)
        self._inherited = []     # committed journals made from a spare (_trim_inherited)
        self._reap_lock = threading.Lock()
        self._held = False       # writes wait: a commit or promotion, or folding over --journal-max
        self.pending_bytes = 0   # written since the last commit (a restart counts afresh)
        self._throttled = False
        self._quiescing = False
        self._stopping = False
        self._pins = {}      # cycle -> open RP exports
        # Fences (``fence``): a connection takes its export's epoch (the metadata export's:
        # ``meta_epoch``) when it opens; its writes (commits) are refused once a fence made it
        # older. Numbers of this process: a restart ends every older connection anyway.
        self.meta_epoch = 0
        self._fences = 0
        self._fold_lock = threading.Lock()
        self._record_lock = threading.Lock()
        self._fold_thread = None
        self._lock_fd = None
        try:
            if not readonly:
                os.makedirs(self.folder, exist_ok=True)
            self._lock_fd = _lock(state_dir)
            for name, path in targets:
                self.bases[name] = Backend(path, readonly=readonly)
            self.sizes = {n: b.size for n, b in self.bases.items()}
            self.epochs = dict.fromkeys(self.sizes, 0)   # name -> its last fence's number
            self.record = load(state_dir, targets, self.sizes)
            self._unsure = False   # the record in memory is on disk, but maybe not durably
            # Before the first commit the targets hold no RP to keep whole: the initial sync
            # goes straight into them, as into a plain replica, not through a journal as big
            # as the targets (and a fold of as much).
            self._direct = not readonly and self.record["committed_cycle"] is None
            self._recover()
        except BaseException:
            self.close()
            raise

    # -- start -------------------------------------------------------------------------------

    def _recover(self):
        """Open what the record names, delete what it does not (a crash's leftovers), build
        each export's newest RP map. O(retained extents)."""
        named = {seq for rp in self.record["rps"] + self.record["prepared"]
                 for seq in rp["journals"].values()}
        named |= set(self.record["pending"].values())
        if not self.readonly:
            for entry in os.listdir(self.folder):
                seq = entry.split(".", 1)[0]
                if not (seq.isdigit() and int(seq) in named):
                    os.unlink(os.path.join(self.folder, entry))
        for name in self.bases:
            self.latest[name] = policy.ExtentMap()
        for shown, rps in ((True, self.record["rps"]), (False, self.record["prepared"])):
            for rp in rps:
                for name, seq in rp["journals"].items():
                    j = Journal(self.folder, seq, self.sizes[name])
                    j.pairs = j.extents(self.sizes[name])
                    self.journals[seq] = j
                    if shown:
                        self.latest[name] = self.latest[name].overlaid(j.pairs, j)
        if self.readonly:
            return
        if self.record.get("folding") is not None:
            log.info("finishing the fold of RP %d into the base images, cut short by a crash",
                     self.record["folding"])
            self._fold_one()
        if self.record["promoted"] is not None:
            raise StoreError(f"the targets in {self.state_dir} were promoted at cycle "
                             f"{self.record['promoted']} and receive no more; move the state "
                             "directory away to receive into them again")
        for name in self.bases:
            seq = self.record["pending"].get(name)
            self.pending[name] = (Journal(self.folder, seq, self.sizes[name], pending=True)
                                  if seq is not None else self._new_journal(name))
        self._write_record(dict(self.record, pending={n: j.seq for n, j in self.pending.items()}))

    def _new_journal(self, name):
        seq = self.record["next_seq"]
        self.record = dict(self.record, next_seq=seq + 1)
        spare = self._spares.pop(name, None)
        if spare is not None:
            self._grace()   # a read that took a map still holding the folded journal has ended
        return Journal(self.folder, seq, self.sizes[name], create=True, pending=True, reuse=spare)

    def _reap(self, keep=True):
        """Delete the files of the journals folds retired, outside ``_fold_lock``: freeing
        thousands of scattered blocks takes seconds on a file system mounted with ``discard``
        (5.3 s for the close of one 1 GiB journal of 8,000 4 KiB writes), and commits must
        not wait for that. With ``keep``, one per export is kept for reuse (``_retire``).
        One caller at a time (the fold thread, or a promotion that must leave no spare)."""
        with self._reap_lock:
            while self._retired:
                name, j = self._retired.pop(0)
                try:
                    if keep:
                        self._retire(name, j)
                    else:
                        j.unlink()
                except OSError as e:   # the fold thread must go on: folds bound the journals
                    log.error("journal %d: its files cannot be deleted (%s); the next start "
                              "deletes them", j.seq, e.strerror or e)
                del j   # the last reference, unless a read still holds its map: the file closes

    def _trim_inherited(self):
        """Punch, in each committed journal made from a spare, the blocks outside its own
        ranges: the spare's, which no read or fold of it touches but which would otherwise
        stay on disk, uncounted, as long as its RP is retained (past ``--journal-max``). Its
        RP's reads and folds touch only its ranges, so this runs outside every lock but
        ``_reap_lock`` (a retire would rename its file into a spare meanwhile). A journal whose
        files went meanwhile (folded, taken back into the pending writes, a promotion) is
        skipped as its open finds no file; another failure is logged (the blocks go with the
        journal)."""
        with self._reap_lock:
            while self._inherited:
                name, j = self._inherited.pop(0)
                try:
                    _trim_outside(j.data_path, j.pairs, self.sizes[name])
                except FileNotFoundError:
                    pass
                except (OSError, BackendError) as e:
                    log.warning("journal %d: the blocks it took over from a spare stay until it "
                                "is folded (%s)", j.seq, e)

    def _retire(self, name, j):
        """Delete folded journal ``j``, but keep its data file as the export's spare (one at
        most), which the next pending journal takes (``_new_journal``). Writing into a fresh
        sparse file costs block allocation and fresh page-cache pages: on this VM 512 MiB took
        0.8-1.3 s against 0.3-0.5 s into the same file written before, and a cycle of 8,000
        scattered 4 KiB writes spent a quarter of the receiver's CPU in ext4's block allocator.
        The spare is cut to its logged ranges first (``_trim_outside``), so a kept file holds
        no more than its RP did: a pending journal's reads and folds see only its logged
        ranges, which its new writes fill. Not while an RP export is attached: its map may
        read ``j`` (a map made later cannot). A start deletes spares (they are no journal)."""
        if name in self._spares or self._pins:
            j.unlink()
            return
        spare = os.path.join(self.folder, f"spare-{j.seq}.data")
        try:
            _trim_outside(j.data_path, j.pairs, self.sizes[name])
            os.rename(j.data_path, spare)
        except (OSError, BackendError) as e:
            log.warning("journal %d: not kept for reuse (%s)", j.seq, e)
            j.unlink()
            return
        # Kept before its log goes: a log that cannot be deleted (logged by ``_reap``) is a
        # leftover the next start deletes, and must not cost the spare too.
        self._spares[name] = spare
        with contextlib.suppress(FileNotFoundError):
            os.unlink(j.log_path)

    def _write_record(self, record):
        """Replace the record crash-safely (the journal directory first, so that the files it
        names are there after a crash too)."""
        _fsync_dir(self.folder)
        write_json(os.path.join(self.state_dir, RECORD), record)
        self.record = record
        self._unsure = False

    def start(self):
        """Start the fold thread (after nbdkit's fork)."""
        self._fold_thread = threading.Thread(target=self._fold_loop, name="nbdrep-fold", daemon=True)
        self._fold_thread.start()
        self._wake()

    def close(self):
        """Stop the fold thread and close the targets (a fold in progress finishes first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._fold_thread is not None:
            self._fold_thread.join()
        for base in self.bases.values():
            base.close()
        self.bases = {}
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the copier's writes -----------------------------------------------------------------

    def _enter(self, name, length, epoch=None):
        """Admit a write (or flush) of ``name`` on a connection of ``epoch`` (None: no
        connection, never fenced); returns where it goes: (pending journal, log slot for a
        write (``length`` not None), Backend to write), or, before the first commit, (None,
        None, the target). Pair with ``_leave``. OSError(ESHUTDOWN) if a fence made the
        connection older than the export: the epoch is read after ``_held``, so ``fence``,
        which bumps it while holding the writes, either waits for this one or refuses it.

        No lock on this path: two nbdkit threads contending for one lock per write hand the
        GIL over at every contended acquire. A writer announces itself (a list append, atomic
        under the GIL) before it looks at ``_held``; ``_quiesce`` sets ``_held`` before it waits
        for the list to empty; so either the writer sees ``_held`` and backs off, or the
        quiescer waits for it."""
        while True:
            self._inflight.append(None)
            if not self._held:
                break
            self._inflight.pop()
            with self._cond:
                self._cond.wait_for(lambda: not self._held)
        if self.record["promoted"] is not None:
            self._inflight.pop()
            raise OSError(errno.EROFS, "the targets were promoted: this receiver receives no more")
        if epoch is not None and epoch < self.epochs[name]:
            self._inflight.pop()
            raise OSError(errno.ESHUTDOWN, f"export {name!r}: a request on a connection opened "
                          "before the copier's last fence (a dropped connection's late one): refused")
        # Unlocked, so a racing increment may be lost: a status figure, not an account.
        self.pending_bytes += length or 0
        if self._direct:
            return None, None, self.bases[name]
        j = self.pending[name]
        try:
            slot = None if length is None else j.reserve()
        except BaseException:   # the log could not grow: this write fails, the rest go on
            self._inflight.pop()
            raise
        return j, slot, j.data

    def _leave(self):
        self._inflight.pop()

    @contextlib.contextmanager
    def _quiesce(self):
        """Hold the copier's writes out (and wait for those in flight) for the block.
        Callers hold ``_fold_lock``, so one at a time."""
        with self._cond:
            self._quiescing = self._held = True
        try:
            while self._inflight:   # writes in flight end within a system call
                time.sleep(QUIESCE_POLL)
            yield
        finally:
            with self._cond:
                self._quiescing = False
                self._held = self._throttled
                self._cond.notify_all()

    def _throttle(self, on):
        """Hold new writes (not those in flight) while folding catches up with --journal-max."""
        with self._cond:
            self._throttled = on
            self._held = on or self._quiescing
            self._cond.notify_all()

    def write(self, name, buf, offset, epoch=None):
        j, slot, dest = self._enter(name, len(buf), epoch)
        try:
            dest.pwrite(buf, offset)
            if j is not None:
                j.note(slot, offset, len(buf))
        finally:
            self._leave()

    def zero(self, name, offset, length, epoch=None):
        j, slot, dest = self._enter(name, length, epoch)
        try:
            dest.zero(offset, length, True, False)
            if j is not None:
                j.note(slot, offset, length)
        finally:
            self._leave()

    def flush(self, name, epoch=None):
        j, _, dest = self._enter(name, None, epoch)
        try:
            if j is None:
                dest.flush()
            else:
                j.sync()
        finally:
            self._leave()

    # -- reads --------------------------------------------------------------------------------

    def read(self, name, extents, buf, offset):
        """Fill ``buf`` from ``offset`` of the RP whose map is ``extents`` (pinned: ``attach``),
        or of the newest RP (None). O(pieces).

        A read of the newest RP is announced (a set add, atomic under the GIL) before it takes
        the map, and a fold waits for the reads announced before it starts (``_grace``): such
        a map may send the read to the base image for a range that a newer RP, committed and
        folded meanwhile, changes there, and the read would mix two RPs. A pinned map needs
        no grace: no RP newer than it is folded."""
        token = None
        if extents is None:
            if not self.has_rp():
                raise OSError(errno.EIO, "no recovery point committed yet: the initial sync is "
                              "landing in the target, which is no RP until it commits")
            token = object()
            self._readers.add(token)
            extents = self.latest[name]
        try:
            view = memoryview(buf).cast("B")
            base = self.bases[name]
            for off, length, owner in extents.lookup(offset, len(view)):
                at = off - offset
                (owner.data if owner is not None else base).pread(view[at:at + length], off)
        finally:
            if token is not None:
                self._readers.discard(token)

    def has_rp(self):
        """True once a first commit made an RP (before it, the targets take the initial sync
        as it lands: torn, so never served)."""
        return self.record["committed_cycle"] is not None

    def _grace(self):
        """Wait for the reads of newest RPs in progress now (see ``read``); they end within
        a few system calls. Later ones take the map as it is then: the caller changed it
        first, or (a fold) changes the base only where that map reads the folded journal."""
        before = set(self._readers)
        while not before.isdisjoint(self._readers):
            time.sleep(QUIESCE_POLL)

    def attach(self, name, cycle):
        """The map of RP ``cycle`` of export ``name``, pinned until ``detach(cycle)``: no RP
        newer than it is folded meanwhile, so the base image it reads from does not change
        under it. None if that RP is not retained. O(retained extents)."""
        with self._fold_lock:
            if not self.retained(cycle):
                return None
            rps = self.record["rps"] + self.record["prepared"]   # prepared ones are the newest
            out = policy.ExtentMap()
            for rp in rps:
                if rp["cycle"] > cycle:
                    break
                seq = rp["journals"].get(name)
                if seq is not None:
                    out = out.overlaid(self.journals[seq].pairs, self.journals[seq])
            self._pins[cycle] = self._pins.get(cycle, 0) + 1
            return out

    def retained(self, cycle):
        """True if RP ``cycle`` can be read: a retained one, a prepared one (attached or
        restored as the operator's test of the group RP, not shown as NAME), or the one the
        base images hold (not while a fold is recorded as in progress: the base images then
        hold part of the next RP too)."""
        r = self.record
        return any(rp["cycle"] == cycle for rp in r["rps"] + r["prepared"]) or (
            cycle is not None and cycle == r["base_cycle"] and r.get("folding") is None)

    def detach(self, cycle):
        with self._fold_lock:
            self._pins[cycle] -= 1
            if not self._pins[cycle]:
                del self._pins[cycle]
        self._wake()

    def materialise(self, name, cycle, out_fd):
        """Write RP ``cycle`` of export ``name`` into ``out_fd`` from offset 0. False if that
        RP is not retained. O(size)."""
        extents = self.attach(name, cycle)
        if extents is None:
            return False
        try:
            buf = bytearray(COPY_CHUNK)
            size = self.sizes[name]
            for off in range(0, size, COPY_CHUNK):
                view = memoryview(buf)[:min(COPY_CHUNK, size - off)]
                self.read(name, extents, view, off)
                done = 0
                while done < len(view):
                    done += os.pwrite(out_fd, view[done:], off + done)
            os.fsync(out_fd)
        finally:
            self.detach(cycle)
        return True

    # -- commit -------------------------------------------------------------------------------

    def state_block(self):
        """The metadata export's contents: what the copier reads on (re)connect. ``prepared``
        names the newest prepared RP (cycle, session), or is null: a source whose record is
        older than it resyncs this receiver in full (``copier.receiver.mismatch``); one that
        predates the key ignores it."""
        r = self.record
        newest = max(r["prepared"], key=lambda p: p["cycle"], default=None)
        return encode(MAGIC_STATE, {"session_id": r["session_id"], "committed_cycle": r["committed_cycle"],
                                    "rp_time": r["rp_time"], "prepared": None if newest is None else {
                                        "session_id": newest["session_id"], "cycle": newest["cycle"]}})

    def metadata_write(self, block, epoch=None):
        """Handle a record written to the metadata export on a connection of metadata
        ``epoch`` (None: never fenced): a commit record or a fence. Returns the connection's
        epoch from now on (a fence's own connection is the newest)."""
        if bytes(block[:len(MAGIC_FENCE)]) == MAGIC_FENCE:
            name = decode(MAGIC_FENCE, block).get("export")
            if name == "" and name not in self.sizes:   # the default export, as the plugin's
                name = next(iter(self.sizes))
            if name not in self.sizes:
                raise OSError(errno.ENOENT, f"fence of {name!r}: no such export")
            req = decode(MAGIC_FENCE, block)
            committed = req.get("committed_cycle")   # absent from an older source's fences
            if not (committed is None or type(committed) is int) or \
                    not isinstance(req.get("session_id"), (str, type(None))):
                raise OSError(errno.EINVAL, f"bad fence record: {req!r}")
            return self.fence(name, req.get("session_id"), committed)
        prepare = bytes(block[:len(MAGIC_PREPARE)]) == MAGIC_PREPARE
        req = decode(MAGIC_PREPARE if prepare else MAGIC_COMMIT, block)
        try:
            session, cycle, rp_time = str(req["session_id"]), int(req["cycle"]), float(req["rp_time"])
            decided = None if req.get("decided") is None else int(req["decided"])
        except (KeyError, TypeError, ValueError) as e:
            raise OSError(errno.EINVAL, f"bad commit record: {e!r}") from None
        if prepare:
            self.prepare(session, cycle, rp_time, epoch, decided)
        else:
            self.commit(session, cycle, rp_time, epoch)
        return epoch

    def fence(self, name, session_id=None, committed_cycle=None):
        """Open a new epoch of export ``name`` (``copier.receiver.Link.fence``, before the
        copier opens data connections to it): once the writes inside the receiver are done,
        refuse those of connections to ``name`` opened before, and the commit records of
        metadata connections opened before. Returns the new epoch. Waits for a fold.

        ``committed_cycle``: the newest cycle that source ``session_id`` counts committed
        (None: not said). It records a cycle before it prepares or commits it anywhere, and
        fences every receiver before its first record there, so the session's RPs after that
        cycle are of a history it abandoned. Prepared ones are dropped, never shown, before
        any write of the new one arrives (``_discard``: a crash before its record leaves them
        prepared, and the next fence drops them); committed ones are folded away by the
        session's next commit (``commit``), marked ``abandoned`` in the record until then."""
        with self._fold_lock, self._quiesce():
            r = self.record
            if session_id is not None and committed_cycle is not None:
                self._discard([p for p in r["prepared"] if p["session_id"] == session_id
                               and p["cycle"] > committed_cycle],
                              f"fence of a source at committed cycle {committed_cycle}")
                if r["session_id"] == session_id and (r["committed_cycle"] or 0) > committed_cycle \
                        and r.get("abandoned") != session_id:
                    log.warning("session %s is at committed cycle %d, and this receiver committed "
                                "%d: a history its source abandoned (its state restored); its next "
                                "commit folds the retained RPs into the base", session_id,
                                committed_cycle, r["committed_cycle"])
                    # Kept in the record until that commit: after a restart of this receiver
                    # the source's next fence may carry a cycle of its new run, past ours.
                    with self._record_lock:
                        self._write_record(dict(self.record, abandoned=session_id))
            self._fences += 1
            self.epochs[name] = self.meta_epoch = self._fences
        log.info("export %r fenced: its connections opened before refuse every request", name)
        return self._fences

    def commit(self, session_id, cycle, rp_time, epoch=None):
        """Make every export's pending writes RP ``cycle``, durably and at once. A commit of
        the session's committed cycle or an older one is a no-op (a copier retrying a commit
        whose reply it lost, or one that arrives late): the pending writes are a later
        cycle's. Unless a fence showed the committed history abandoned (``fence``): then it is
        the session's new run's, whatever its id. Checked under ``_fold_lock``, which a repeat
        queues on behind the first. Refused on a metadata connection of an ``epoch`` a fence
        made old (a dropped copier's late commit would make the new one's partial writes an RP).

        Any other commit first drops, never shown, the prepared RPs of the session newer than
        ``cycle`` or of ``cycle`` under another RP time (``_stale``): a source sends its records
        in cycle order, so in its history none after ``cycle`` was prepared yet. Shown, their
        writes would be RPs over the new history's, or stand in for its cycle.
        After a crash at any point: before the record without them, they are prepared still
        (hidden; the source got no answer and commits again); after it, their journal files are
        leftovers that the start deletes, the pending writes as they were; after the commit's
        own record, RP ``cycle``.

        A commit whose cycle ids come again (a new session's not after a retained RP, or one
        that abandons the history) folds every retained RP into the base images first, so that
        no RP id names images of two histories, and its record names no RP in the base images
        (they hold one of the old history, under the new RPs). EBUSY while any RP is attached:
        the new ids do not order against its id, and a fold of a new RP could change the base
        under it. A crash amid those folds or after them, before the commit's record, leaves
        the old history's newest RP served, whole (a start finishes a fold cut short), and the
        new run's writes pending; the source got no answer and commits again."""
        with self._fold_lock:
            self._admit_record("commit", epoch)
            r = self.record
            abandons = r.get("abandoned") == session_id
            if r["session_id"] != session_id or cycle > (r["committed_cycle"] or 0) or abandons:
                self._discard(self._stale(session_id, cycle, rp_time), f"commit of cycle {cycle}")
                r = self.record
            if r["prepared"]:   # the commit of a prepared cycle, or of a later one
                self._publish(cycle, session_id)
                r = self.record
            if not abandons and r["session_id"] == session_id and cycle <= (r["committed_cycle"] or 0):
                if self._unsure:   # the copier's retry of a commit whose record may not be durable
                    with self._record_lock:
                        self._write_record(self.record)   # raises while it still cannot be
                return
            again = abandons or bool(r["rps"] and cycle <= r["rps"][-1]["cycle"])
            if again:
                if self._pins:
                    raise OSError(errno.EBUSY, f"cycle {cycle} of session {session_id} needs the retained "
                                  f"RPs folded (its id comes again), and RPs {sorted(self._pins)} are "
                                  "attached as exports")
                if not abandons:
                    log.info("cycle %d after cycle %d (session %s): the retained RPs go into the base",
                             cycle, r["rps"][-1]["cycle"], session_id)
                while self.record["rps"]:
                    self._fold_one()
            with self._quiesce():
                self._commit(session_id, cycle, rp_time, unnamed_base=again)
        self._wake()

    def _admit_record(self, what, epoch):
        """Refuse a ``what`` ("commit", "prepare") record once the targets were promoted, or on
        a metadata connection of an ``epoch`` a fence made old. Caller holds ``_fold_lock``."""
        if self.record["promoted"] is not None:
            raise OSError(errno.EROFS, "the targets were promoted: this receiver receives no more")
        if epoch is not None and epoch < self.meta_epoch:
            raise OSError(errno.ESHUTDOWN, f"a {what} record on a metadata connection opened "
                          "before the copier's last fence: refused")

    def prepare(self, session_id, cycle, rp_time, epoch=None, decided=None):
        """Phase one of a commit across several receivers: make every export's pending writes
        RP ``cycle``, durable but not shown (``prepared`` in the record), until the commit of
        ``cycle`` or a later one shows it (``_publish``). ``decided``: the newest cycle whose
        commit records the copier began to send (None: it does not know, after a restart);
        older prepared RPs are shown, newer ones were aborted (a receiver did not prepare
        them) and go back into the pending writes (``_unprepare``), so a live copier leaves
        at most one prepared RP. A repeat (the same cycle, RP time and session: a copier
        retrying a prepare whose reply it lost) is a no-op. EINVAL where only a one-phase commit
        fits: another session than the committed one (its cycle ids start afresh), or a cycle
        not after the committed one. Before the first commit the initial sync lands in the
        targets, which serve no reads until a commit: the writes are only made durable.

        Prepared RPs of the session newer than ``cycle``, or of ``cycle`` under another RP
        time, are dropped first, never shown (``_stale``; ``commit`` says why, and what a crash
        leaves), not refused: refused, every prepare of their cycle ids would fail, and the
        group commit nothing, until the source's cycles passed them, and then a commit would
        show them over the new history (and unprepared, their writes would join its RP)."""
        with self._fold_lock:
            self._admit_record("prepare", epoch)
            r = self.record
            if any((p["session_id"], p["cycle"], p["rp_time"]) == (session_id, cycle, rp_time)
                   for p in r["prepared"]):
                return
            if r["session_id"] not in (None, session_id) or cycle <= (r["committed_cycle"] or 0):
                raise OSError(errno.EINVAL, f"cannot prepare cycle {cycle} of session {session_id} "
                              f"after cycle {r['committed_cycle']} of session {r['session_id']}: "
                              "commit it in one phase")
            with self._quiesce():
                self._discard(self._stale(session_id, cycle, rp_time), f"prepare of cycle {cycle}")
                if decided is not None:
                    self._publish(decided, session_id)
                    for p in reversed(self.record["prepared"]):   # newest first: newest wins
                        self._unprepare(p)
                self._commit(session_id, cycle, rp_time, prepare=True)

    def _unprepare(self, p):
        """Put the aborted prepared RP ``p`` back into the pending writes: its ranges that no
        later write covers are copied into the pending journals and logged, made durable,
        then a record without it (``_discard``). A crash before that record leaves ``p``
        prepared and the pending journals holding the same bytes again: the same RPs either
        way. Caller holds ``_fold_lock`` with the writes out. O(p's bytes)."""
        self._not_attached([p])
        for name, seq in p["journals"].items():
            j, pending = self.journals[seq], self.pending[name]
            keep = difference(j.pairs, pending.extents(self.sizes[name]))
            for off, length in zip(keep[0::2], keep[1::2]):
                _fold_range(j.data, pending.data, off, length)
                pending.note(pending.reserve(), off, length)
            pending.sync()
        self._discard([p])

    def _stale(self, session_id, cycle, rp_time):
        """The prepared RPs that a record of ``cycle`` of ``session_id`` at ``rp_time`` shows
        to be of another history: of that session, and newer than ``cycle`` or ``cycle`` under
        another RP time (the same cycle's prepare and commit records carry the same one)."""
        return [p for p in self.record["prepared"] if p["session_id"] == session_id and
                (p["cycle"] > cycle or (p["cycle"] == cycle and p["rp_time"] != rp_time))]

    def _discard(self, dropped, why=None):
        """Forget the prepared RPs ``dropped``: a record without them, then their journals'
        files (a crash between leaves files that no record names, which a start deletes).
        ``why``: the record that showed them stale, logged; None for an aborted one whose
        writes went back into the pending ones. EBUSY, nothing changed, while an attached RP
        export reads one of them. Caller holds ``_fold_lock``."""
        if not dropped:
            return
        self._not_attached(dropped)
        with self._record_lock:
            self._write_record(dict(self.record, prepared=[q for q in self.record["prepared"]
                                                           if q not in dropped]))
        for p in dropped:
            if why is not None:
                log.warning("prepared RP %d of session %s dropped, never shown: the %s says it is "
                            "of a history the source abandoned", p["cycle"], p["session_id"], why)
            for seq in p["journals"].values():
                self.journals.pop(seq).unlink()

    def _not_attached(self, prepared):
        """EBUSY if an attached RP export reads any of the ``prepared`` RPs (its map holds
        every RP up to its own): dropped under it, its name would stay on an image that is no
        RP any more, and may come again for another. Caller holds ``_fold_lock``."""
        held = [p["cycle"] for p in prepared if any(c >= p["cycle"] for c in self._pins)]
        if held:
            raise OSError(errno.EBUSY, f"prepared RPs {held} are read by the attached RP exports "
                          f"{sorted(self._pins)}; detach them first")

    def _publish(self, upto, session_id=None):
        """Show the prepared RPs up to cycle ``upto`` (all those of another session than
        ``session_id``: their source flushed them, and they precede its cycles), in one record
        write. Caller holds ``_fold_lock``."""
        r = self.record
        shown = [p for p in r["prepared"] if p["cycle"] <= upto or
                 (session_id is not None and p["session_id"] != session_id)]
        if not shown:
            return
        last = shown[-1]
        with self._record_lock:
            self._write_record(dict(r, rps=r["rps"] + shown,
                                    prepared=[p for p in r["prepared"] if p not in shown],
                                    session_id=last["session_id"], committed_cycle=last["cycle"],
                                    rp_time=last["rp_time"], commit_time=last["commit_time"]))
        for rp in shown:
            for name, seq in rp["journals"].items():
                j = self.journals[seq]
                self.latest[name] = self.latest[name].overlaid(j.pairs, j)

    def _commit(self, session_id, cycle, rp_time, prepare=False, unnamed_base=False):
        """Make the pending writes RP ``cycle``: shown, or only ``prepare``d. ``unnamed_base``:
        the record names no RP in the base images from then on (see ``commit``). Caller holds
        ``_fold_lock`` and the writes out."""
        now = self.clock()
        journals, fresh = {}, {}
        total = 0
        unsure = None   # the error of a record written but maybe not durable
        if self._direct:   # the first RP is in the targets themselves
            for base in self.bases.values():
                base.flush()
            if prepare:
                return
            rp = {"cycle": cycle, "rp_time": rp_time, "commit_time": now, "bytes": 0, "journals": {}}
            with self._record_lock:
                self._write_record(dict(self.record, session_id=session_id, committed_cycle=cycle,
                                        rp_time=rp_time, commit_time=now, rps=[rp]))
            self._direct = False
            self.pending_bytes = 0
            return
        try:
            for name, j in self.pending.items():
                j.sync()
                pairs = j.extents(self.sizes[name])
                if pairs:
                    j.pairs, j.bytes = pairs, sum(pairs[1::2])
                    total += j.bytes
                    journals[name] = j
                    fresh[name] = self._new_journal(name)
            rp = {"cycle": cycle, "rp_time": rp_time, "commit_time": now, "bytes": total,
                  "journals": {n: j.seq for n, j in journals.items()}}
            pending = {n: fresh.get(n, self.pending[n]).seq for n in self.pending}
            if prepare:
                new = dict(self.record, pending=pending,
                           prepared=self.record["prepared"] + [dict(rp, session_id=session_id)])
            else:
                new = dict(self.record, session_id=session_id, committed_cycle=cycle, rp_time=rp_time,
                           commit_time=now, rps=self.record["rps"] + [rp], pending=pending,
                           abandoned=None)
                if unnamed_base:
                    new.update(base_cycle=None, base_rp_time=None)
            with self._record_lock:
                try:
                    self._write_record(new)
                except OSError as e:
                    if _on_disk(self.state_dir) != new:
                        raise
                    # Renamed, but the directory's fsync failed: the record on disk names the
                    # fresh journals, so they stay and take the writes from now on (the next
                    # record's fsync makes it durable); the copier hears of the failure.
                    self.record, unsure = new, e
                    self._unsure = True   # until a record write is durable, a repeat redoes it
        except BaseException:
            for j in fresh.values():
                j.unlink()
            raise
        for name, j in journals.items():
            j.seal()
            self.journals[j.seq] = j
            if j.reused:
                self._inherited.append((name, j))
            if not prepare:
                self.latest[name] = self.latest[name].overlaid(j.pairs, j)
            self.pending[name] = fresh[name]
        self.pending_bytes = 0
        if unsure is not None:
            raise unsure

    def promote(self, cycle):
        """Make the targets RP ``cycle`` for real use and stop receiving: fold every RP up to
        it into the base images, drop the newer ones and the pending writes, and record the
        promotion (a receiver never starts on promoted targets again). An error string if it
        cannot, else None."""
        with self._fold_lock:
            if any(p["cycle"] == cycle for p in self.record["prepared"]):
                self._publish(cycle)   # the operator's decision: the group's source is lost
            if not self.retained(cycle):
                return f"RP {cycle} is not retained (see nbdrep rps)"
            if self._pins:
                return f"RPs {sorted(self._pins)} are attached as exports; detach them first"
            with self._quiesce():
                rp_time = next((rp["rp_time"] for rp in self.record["rps"] if rp["cycle"] == cycle),
                               self.record.get("base_rp_time"))   # else the base's: retained() said so
                while self.record["rps"] and self.record["rps"][0]["cycle"] <= cycle:
                    self._fold_one()
                dropped = list(self.journals.values()) + list(self.pending.values())
                with self._record_lock:
                    self._write_record(dict(self.record, rps=[], prepared=[], pending={}, promoted=cycle,
                                            committed_cycle=cycle, rp_time=rp_time))
                for name in self.latest:
                    self.latest[name] = policy.ExtentMap()
                self.journals = {}
                for j in dropped:
                    j.unlink()
                self._reap(keep=False)
                for spare in self._spares.values():
                    os.unlink(spare)
                self._spares = {}
        log.info("targets promoted at RP %d: receiving no more", cycle)
        return None

    # -- retention ----------------------------------------------------------------------------

    def _wake(self):
        with self._cond:
            self._cond.notify_all()

    def _due(self):
        pinned = min(self._pins) if self._pins else None
        return policy.to_fold(self.record["rps"], self.clock(), self.keep_count, self.keep_seconds,
                              self.journal_max, pinned)

    def _fold_loop(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._due(), timeout=1.0)
                if self._stopping:
                    return
            with self._fold_lock:
                self._compact_logs()
                n = self._due()
                over = self.retained_bytes() > self.journal_max
                if over:   # the copier outpaces folding: hold its writes until the journals fit
                    self._throttle(True)
                for _ in range(n):
                    try:
                        self._fold_one()
                    except Exception as e:   # a full disk, or a bug: the thread must go on,
                        # and the copier's writes must not stay held meanwhile
                        (log.error if isinstance(e, OSError) else log.exception)(
                            "cannot fold RP %d into the base images: %s; retrying",
                            self.record["rps"][0]["cycle"], e)
                        self._throttle(False)
                        with self._cond:
                            self._cond.wait(1.0)
                        break
            self._throttle(False)
            self._reap()
            self._trim_inherited()

    def _compact_logs(self):
        """Compact the pending logs that grew (``Journal.compact``), writes held meanwhile.
        Caller holds ``_fold_lock``. A failure is logged: the log only stays longer."""
        for name, j in self.pending.items():
            if j.due_compaction():
                with self._quiesce():
                    try:
                        j.compact(self.sizes[name])
                    except OSError as e:
                        log.error("cannot compact the pending log of %r: %s", name, e)

    def retained_bytes(self):
        return _retained_bytes(self.record)

    def _fold_one(self):
        """Copy the oldest retained RP's journals into the base images and forget it.
        Caller holds ``_fold_lock``. The record says ``folding`` before the base images
        change: after a crash in the copy they hold part of this RP, so they are RP
        ``base_cycle`` no more until a start redoes the fold (``_recover``)."""
        rp = self.record["rps"][0]
        if self.record.get("folding") != rp["cycle"]:
            with self._record_lock:
                self._write_record(dict(self.record, folding=rp["cycle"]))
        self._grace()
        folded = []
        for name, seq in rp["journals"].items():
            j = self.journals[seq]
            base = self.bases[name]
            for off, length in zip(j.pairs[0::2], j.pairs[1::2]):
                _fold_range(j.data, base, off, length)
            base.flush()
            folded.append((name, j))
        with self._record_lock:
            self._write_record(dict(self.record, rps=self.record["rps"][1:], base_cycle=rp["cycle"],
                                    base_rp_time=rp["rp_time"], folding=None))
        for name, j in folded:
            self.latest[name] = self.latest[name].without(j)
            del self.journals[j.seq]
        self._retired += folded   # their files go after the lock (``_reap``)

    # -- status -------------------------------------------------------------------------------

    def status(self):
        """The record's part (``record_status``) and the live figures. O(RPs)."""
        r = self.record
        return dict(record_status(r), lag=None if r["rp_time"] is None else self.clock() - r["rp_time"],
                    journal_max=self.journal_max, pending_bytes=self.pending_bytes,
                    throttled=self._throttled, keep={"count": self.keep_count, "seconds": self.keep_seconds},
                    pinned=sorted(self._pins))


def record_status(r):
    """The part of a receiver's status that its record ``r`` alone says: what ``Store.status``
    shows beside the live figures, and what ``nbdrep rps`` shows of a stopped receiver.
    KeyError or TypeError for a record of another shape. O(RPs)."""
    return {
        "role": "receiver",
        "session_id": r["session_id"], "committed_cycle": r["committed_cycle"],
        "rp_time": r["rp_time"], "commit_time": r["commit_time"],
        "base_cycle": r["base_cycle"], "folding": r.get("folding"), "promoted": r["promoted"],
        "journal_bytes": _retained_bytes(r),
        "targets": [{"name": n, "path": t["path"], "size": t["size"]} for n, t in r["targets"].items()],
        "rps": [{"cycle": rp["cycle"], "rp_time": rp["rp_time"], "commit_time": rp["commit_time"],
                 "bytes": rp["bytes"], "exports": sorted(rp["journals"])} for rp in r["rps"]],
        "prepared": [{"cycle": rp["cycle"], "session_id": rp["session_id"], "rp_time": rp["rp_time"],
                      "bytes": rp["bytes"], "exports": sorted(rp["journals"])}
                     for rp in r.get("prepared", [])],   # none in a record older than prepares
    }


def _retained_bytes(r):
    return sum(rp["bytes"] for rp in r["rps"])


def _entries(log_path):
    """The filled slots of a log, up to the last one, as an (n, 2) array (empty slots and
    unfilled ones have length 0)."""
    with open(log_path, "rb") as f:
        raw = f.read()
    pairs = np.frombuffer(raw[:len(raw) - len(raw) % ENTRY.size], dtype="<u8").reshape(-1, 2)
    filled = np.flatnonzero(pairs[:, 1])
    return pairs[:filled[-1] + 1 if len(filled) else 0].astype(np.uint64)


def _on_disk(state_dir):
    """The record in ``state_dir`` as it is on disk now, or None if it cannot be read."""
    try:
        return read_record(state_dir)
    except StoreError:
        return None


def read_record(state_dir):
    """The record in ``state_dir`` as its JSON says, None if there is none; StoreError if it
    cannot be read or is not a receiver's record of this version. Reads only, no lock."""
    path = os.path.join(state_dir, RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"receiver record {path} cannot be read "
                         f"({e.strerror if isinstance(e, OSError) else e})") from None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise StoreError(f"receiver record {path} is not an nbdrep receiver record of version {VERSION}")
    return record


def load(state_dir, targets, sizes):
    """The record in ``state_dir`` for ``targets`` [(name, path)] of ``sizes`` {name: bytes},
    or a new one; StoreError if it cannot be read or is another receiver's. Reads only."""
    expected = {n: {"path": os.path.realpath(p), "size": sizes[n]} for n, p in targets}
    try:
        record = read_record(state_dir)
    except StoreError as e:
        raise StoreError(f"{e}; move the state directory away to start afresh") from None
    if record is None:
        return {"version": VERSION, "session_id": None, "committed_cycle": None, "rp_time": None,
                "commit_time": None, "base_cycle": None, "base_rp_time": None, "folding": None,
                "next_seq": 1, "rps": [], "prepared": [],
                "pending": {}, "targets": expected, "promoted": None, "abandoned": None}
    if record["targets"] != expected:
        raise StoreError(f"state directory {state_dir} holds the journals of other "
                         f"targets ({_describe(record['targets'])}); use another --state")
    record.setdefault("prepared", [])   # a record written before two-phase commits
    return record


def _trim_outside(path, pairs, size):
    """Punch every allocated range of the file at ``path`` that ``pairs`` (flat, ascending,
    disjoint) does not cover. O(allocated extents + pairs)."""
    f = Backend(path)
    try:
        starts = pairs[0::2]
        ends = [o + n for o, n in zip(pairs[0::2], pairs[1::2])]
        for offset, length, is_hole in f.extents(0, size):
            at, end = offset, offset + length
            i = bisect.bisect_right(ends, at)
            while not is_hole and at < end:
                if i < len(starts) and starts[i] <= at:   # inside a logged range: kept
                    at, i = ends[i], i + 1
                    continue
                stop = min(end, starts[i]) if i < len(starts) else end
                f.trim(at, stop - at)
                at = stop
    finally:
        f.close()


def _fold_range(journal, base, offset, length):
    """Make [offset, offset+length) of ``base`` what it is in ``journal`` (a Backend of its
    data file): its data copied, its holes (zeroed ranges) zeroed in place. An initial sync's
    journal is mostly one hole: copying it took seconds a GiB, zeroing takes milliseconds."""
    for off, n, is_hole in journal.extents(offset, length):
        if is_hole:
            try:
                base.zero(off, n, True, False)
                continue
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
        _copy_range(journal.fd, base.fd, off, n)


def _copy_range(src, dst, offset, length):
    """Copy [offset, offset+length) from fd ``src`` to fd ``dst`` at the same offset, in the
    kernel (copy_file_range), falling back to read and write across file systems."""
    end = offset + length
    while offset < end:
        n = min(COPY_CHUNK, end - offset)
        try:
            done = os.copy_file_range(src, dst, n, offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            done = os.pwrite(dst, os.pread(src, n, offset), offset)
        if done <= 0:
            raise OSError(errno.EIO, f"short copy at {offset}")
        offset += done


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(state_dir):
    try:
        fd = os.open(os.path.join(state_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"state directory {state_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"another receiver uses the state directory {state_dir}") from None
    return fd


def _describe(targets):
    return ", ".join(f"{n or '(default)'}={t['path']} ({t['size']} bytes)" for n, t in sorted(targets.items()))
