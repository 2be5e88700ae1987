/*
 * The dirty-region log: persistent marks of the parts of each source that may hold writes not
 * yet committed on the replica, so that a restart after a crash of the source resyncs those
 * parts only.
 *
 * Theory of operation
 * -------------------
 * Marks are kept at two sizes, in two bitmaps of one file of the state directory, mapped
 * MAP_SHARED:
 *
 *   - fine regions (--dirty-region, 64 KiB by default).  A bit set in the mapping is in the page
 *     cache, so it survives the death of the process (kill -9) with no system call; it does not
 *     survive power loss.
 *   - coarse extents (1 MiB, or the region if larger).  A write that marks a new extent waits
 *     for an msync that began after the bit was set, so extent marks survive power loss too
 *     (group commit: one msync serves every writer that marked an extent before it started).
 *
 * After kill -9 the machine kept its page cache and the fine marks are complete; after power
 * loss (a new boot id) only the extent marks are.  The next start resyncs the fine regions or
 * the extents accordingly (dirtylog.py).  Why two sizes: a new mark that must be durable costs
 * an msync the write waits for.  At 64 KiB, 4 KiB random writes over 4 GiB marked a new region
 * on most writes and ran at 0.15x of the IOPS without the log; extents are marked 16 times less
 * often and stay marked while hot, and fine regions cost no system call.  A crash then resyncs
 * the fine regions (a few hundred MiB in that benchmark, where whole 1 MiB extents were the
 * whole disk).
 *
 * Each level has, per unit, a 32-bit word in memory: (last cycle written << 2) | SYNCED |
 * MARKED, the cycle counted from this run's first (1 = the first; 2^30 cycles, 8 years of
 * 0.25 s cycles, before it saturates, which only keeps a unit marked).  The word is the truth
 * the writers and the committer agree on; the bitmap shadows it, with one invariant per level:
 *
 *     a word says MARKED  =>  its bit is set in the mapping;
 *     a word says SYNCED  =>  its bit was on disk (extents) -- fine regions are SYNCED at once.
 *
 * A write tagged with cycle c (the tracker's begin) calls dl_mark before it reaches the back
 * end.  The fast path, with the GIL and no lock: for each extent and each region of the write,
 * raise the word's cycle to c with a compare-and-swap that also checks MARKED and SYNCED; if
 * all were, the write goes on.  Otherwise dl_mark returns DL_EWOULDBLOCK having changed nothing
 * more, and the caller lets go of the GIL and calls dl_mark_wait, which under `mu` sets bits,
 * then words, queues new extent marks for the next msync, and waits for it.  The msync's owner
 * sets SYNCED on the extents it covered.
 *
 * A write whose extents are all marked and synced but that marks a new fine region needs only
 * `mu`: dl_mark tries it, keeping the GIL (a try never blocks), and takes the waiting path only
 * if it is held.
 *
 * When cycle N is committed (every write of a cycle <= N is on the replica and flushed),
 * dl_commit clears, under `mu`, the SYNCED extents whose last write is of a cycle
 * <= min(N - hot_cycles, D), D the newest cycle dl_durable said the sources hold durably (below),
 * and the regions whose last write is of a cycle <= N: recently written
 * extents stay marked ("hot", as in DRBD's activity log), so a steady workload does not wait
 * for an msync each cycle for the same extents; regions cost no system call to mark again.  A clear
 * is a compare-and-swap of the word from exactly what was read to 0, then the bit.  It never
 * needs a sync: a lost clear costs a unit resynced for nothing.
 *
 * Why an extent also waits for the source.  A committed write is on the replica, but on the
 * source it may still be only in the page cache: the back end writes with buffered pwrite and
 * fdatasyncs only at a host's FLUSH or a clean stop.  Were its extent cleared then and the power
 * lost before writeback, the source would come back with the old bytes, the extent unmarked,
 * and the replica would keep bytes the source never kept, for good.  So an extent is cleared
 * only once its last write is durable on the source too: the driver's source sync notes the
 * newest cycle D whose writes have all ended (the tracker drained it), fdatasyncs every source,
 * then calls dl_durable(D).  Fine regions need no such wait: they are trusted only after a
 * crash in the same boot, which kept the page cache, and with it the source's writes.  The
 * sync runs on a thread of its own, never in a cycle's critical path, and only when a commit
 * finds D < N - hot_cycles (an extent might be due to clear and not be allowed to): at most
 * one fdatasync per hot_cycles + 1 cycles, and an extent clears about a cycle (plus the sync's
 * time) later than without the wait.  A mark cleared late costs only a resync of it.  What a
 * sync costs the hosts is writeback done sooner than the kernel's 30 s dirty expiry would, so a
 * page rewritten every few seconds is written back more often.  Measured with 4 KiB random
 * writes over 1 GiB (scripts/bench_crash.py, README): IOPS with the log on/off 1.02x before,
 * 0.85x with this; at most one sync per 30 s (the kernel's writeback age, extents marked up to
 * 30 s longer) measured 0.76x, no better within that machine's noise, so not worth its larger
 * resync after power loss.
 *
 * Why no write is ever left unmarked.  A writer's fast path and a clear both compare-and-swap
 * the same word, so one sees the other: if the writer raised the cycle first, the clear's swap
 * fails and the unit stays marked; if the clear came first, the writer sees the word unmarked
 * and takes the slow path, which sets the bit again (and syncs an extent) before its data
 * write.  Bits and words change only under `mu` when going unmarked -> marked (bit first) or
 * marked -> unmarked (word first), so the invariants hold at every instant, for every thread
 * and for the file after a kill -9.  Writers of the open cycle carry c > N, so a word they
 * raised is never cleared by the commit of N; an extent waiting for its msync is not SYNCED,
 * so it is not cleared either.
 *
 * Locks
 * -----
 * `mu` guards: marking and clearing (bits and words together), the queue of extents waiting for
 * an msync, `marks_seq` updates, `syncing`, `synced`, and the counters.  msync runs without
 * `mu` (`syncing` keeps it to one at a time); writers waiting for it sleep on `cv`.  The fast
 * path takes no lock but a try of `mu`.  No call holds the GIL while it may block: dl_mark never
 * blocks, and the build script's wrappers let go of the GIL around dl_mark_wait, dl_commit and
 * dl_stats.
 *
 * Memory: 4 bytes per region and per extent; on disk, 1 bit each.  A 1 TiB source at 64 KiB
 * regions and 1 MiB extents: 68 MiB of memory and a 2.1 MiB file.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "dirtylog.h"

#define MARKED UINT32_C(1)
#define SYNCED UINT32_C(2)
#define REL_MAX UINT32_C(0x3fffffff)

struct level {
    unsigned shift;
    uint64_t *base;          /* first unit of each device */
    uint64_t *count;         /* units of each device */
    uint64_t units;
    _Atomic uint32_t *word;  /* per unit: (last cycle - first + 1) << 2 | SYNCED | MARKED */
    _Atomic uint64_t *bits;  /* in the mapping: bit u marks unit u */
    uint64_t marked;
};

struct dirtylog {
    int ndev;
    uint64_t hot;
    uint64_t first;          /* this run's first cycle: words count cycles from it */
    struct level fine, coarse;
    _Atomic uint32_t durable;    /* sources durable up to this cycle (as words count it; 0: none) */
    void *map;
    size_t map_bytes;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t marks_seq;  /* extent marks set so far (bumped under mu) */
    _Atomic uint64_t synced;     /* marks_seq as it was when the last msync began */
    int syncing;
    uint64_t *queue;             /* extents marked but not yet SYNCED, in marks_seq order */
    uint64_t *queue_seq;         /* ... and the marks_seq each was given */
    size_t queued, queue_cap;
    uint64_t marks, syncs, cleared, sync_errors;
};

static int level_init(struct level *l, const struct dl_level_spec *spec, int ndev, void *map,
                      uint64_t map_bytes)
{
    l->shift = spec->shift;
    l->base = malloc(sizeof(uint64_t) * (size_t)(ndev ? ndev : 1));
    l->count = malloc(sizeof(uint64_t) * (size_t)(ndev ? ndev : 1));
    if (l->base == NULL || l->count == NULL || spec->offset % 8 != 0)
        return -1;
    for (int i = 0; i < ndev; i++) {
        l->base[i] = spec->base[i];
        l->count[i] = spec->count[i];
        if (spec->base[i] + spec->count[i] > l->units)
            l->units = spec->base[i] + spec->count[i];
    }
    if (spec->offset + (l->units + 63) / 64 * 8 > map_bytes)
        return -1;
    l->word = calloc(l->units ? l->units : 1, sizeof *l->word);
    if (l->word == NULL)
        return -1;
    l->bits = (_Atomic uint64_t *)((char *)map + spec->offset);
    /* Marks already in the file (what this run starts by copying) belong to its first cycle,
     * and are on disk (the file was synced before it was mapped). */
    for (uint64_t u = 0; u < l->units; u++)
        if (atomic_load(&l->bits[u / 64]) & (UINT64_C(1) << (u % 64))) {
            atomic_store(&l->word[u], UINT32_C(1) << 2 | SYNCED | MARKED);
            l->marked++;
        }
    return 0;
}

static void level_free(struct level *l)
{
    free(l->word);
    free(l->base);
    free(l->count);
}

struct dirtylog *dl_new(int fd, uint64_t map_bytes, int ndev, const struct dl_level_spec *fine,
                        const struct dl_level_spec *coarse, uint64_t first_cycle,
                        uint64_t hot_cycles)
{
    struct dirtylog *d = calloc(1, sizeof *d);
    if (d == NULL)
        return NULL;
    d->ndev = ndev;
    d->hot = hot_cycles;
    d->first = first_cycle;
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    d->map = mmap(NULL, map_bytes ? map_bytes : 1, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (d->map == MAP_FAILED) {
        d->map = NULL;
        dl_free(d);
        return NULL;
    }
    d->map_bytes = map_bytes ? map_bytes : 1;
    if (level_init(&d->fine, fine, ndev, d->map, map_bytes) != 0 ||
        level_init(&d->coarse, coarse, ndev, d->map, map_bytes) != 0) {
        dl_free(d);
        return NULL;
    }
    return d;
}

static int units_of(struct dirtylog *d, struct level *l, int64_t dev, uint64_t offset,
                    uint64_t length, uint64_t *first, uint64_t *last)
{
    if (dev < 0 || dev >= d->ndev || length == 0 || offset + length < offset)
        return DL_ERANGE;
    uint64_t lo = offset >> l->shift, hi = (offset + length - 1) >> l->shift;
    if (hi >= l->count[dev])
        return DL_ERANGE;
    *first = l->base[dev] + lo;
    *last = l->base[dev] + hi;
    return DL_OK;
}

/* `cycle` as words count it: from this run's first cycle, saturating. */
static uint32_t relative(struct dirtylog *d, uint64_t cycle)
{
    if (cycle < d->first)
        return 1;
    return cycle - d->first + 1 >= REL_MAX ? REL_MAX : (uint32_t)(cycle - d->first + 1);
}

/* Raise unit u's cycle to at least `rel` if its word has all of `need`; false (nothing
 * changed) if it lacks one. */
static int raise(struct level *l, uint64_t u, uint32_t rel, uint32_t need)
{
    uint32_t w = atomic_load(&l->word[u]);
    for (;;) {
        if ((w & need) != need)
            return 0;
        if (w >> 2 >= rel)
            return 1;
        if (atomic_compare_exchange_weak(&l->word[u], &w, rel << 2 | (w & 3)))
            return 1;
    }
}

/* The fast path: every unit of the write marked (and its extents synced). */
static int raise_all(struct dirtylog *d, struct level *l, int64_t dev, uint64_t offset,
                     uint64_t length, uint32_t rel)
{
    uint64_t first, last;
    int rc = units_of(d, l, dev, offset, length, &first, &last);
    if (rc != DL_OK)
        return rc;
    for (uint64_t u = first; u <= last; u++)
        if (!raise(l, u, rel, MARKED | SYNCED))
            return DL_EWOULDBLOCK;
    return DL_OK;
}

static void mark_locked(struct dirtylog *d, struct level *l, uint64_t first, uint64_t last,
                        uint32_t rel, int durable);

int dl_mark(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset, uint64_t length)
{
    uint32_t rel = relative(d, cycle);
    int rc = raise_all(d, &d->coarse, dev, offset, length, rel);
    if (rc != DL_OK)
        return rc;
    rc = raise_all(d, &d->fine, dev, offset, length, rel);
    if (rc != DL_EWOULDBLOCK)
        return rc;
    /* New fine marks need no msync, only mu: take it if it is free, without letting go of the
     * GIL (a try never blocks); if it is held, the waiting path. */
    if (pthread_mutex_trylock(&d->mu) != 0)
        return DL_EWOULDBLOCK;
    uint64_t first, last;
    units_of(d, &d->fine, dev, offset, length, &first, &last);
    mark_locked(d, &d->fine, first, last, rel, 0);
    pthread_mutex_unlock(&d->mu);
    return DL_OK;
}

static int enqueue(struct dirtylog *d, uint64_t u, uint64_t seq)
{
    if (d->queued == d->queue_cap) {
        size_t cap = d->queue_cap ? 2 * d->queue_cap : 64;
        uint64_t *q = realloc(d->queue, cap * sizeof *q);
        if (q == NULL)
            return -1;
        d->queue = q;
        q = realloc(d->queue_seq, cap * sizeof *q);
        if (q == NULL)
            return -1;
        d->queue_seq = q;
        d->queue_cap = cap;
    }
    d->queue[d->queued] = u;
    d->queue_seq[d->queued++] = seq;
    return 0;
}

/* Under mu: mark the units of a write in level l; extents are queued for the next msync. */
static void mark_locked(struct dirtylog *d, struct level *l, uint64_t first, uint64_t last,
                        uint32_t rel, int durable)
{
    for (uint64_t u = first; u <= last; u++) {
        if (raise(l, u, rel, MARKED))
            continue;   /* marked; an extent maybe still waiting for its msync */
        /* Unmarked, and only mu's holder changes an unmarked word: bit first, then word. */
        atomic_fetch_or(&l->bits[u / 64], UINT64_C(1) << (u % 64));
        uint32_t w = atomic_load(&l->word[u]);
        uint32_t c = w >> 2 > rel ? w >> 2 : rel;
        if (durable) {
            uint64_t seq = atomic_fetch_add(&d->marks_seq, 1) + 1;
            if (enqueue(d, u, seq) != 0)
                d->sync_errors++;   /* stays un-SYNCED, so never cleared: only resynced */
            atomic_store(&l->word[u], c << 2 | MARKED);
            d->marks++;
        } else {
            atomic_store(&l->word[u], c << 2 | SYNCED | MARKED);
        }
        l->marked++;
    }
}

/* Under mu, after an msync that began at marks_seq == target: the extents it covered are on
 * disk. */
static void synced_locked(struct dirtylog *d, uint64_t target)
{
    size_t k = 0;
    for (; k < d->queued && d->queue_seq[k] <= target; k++) {
        _Atomic uint32_t *word = &d->coarse.word[d->queue[k]];
        uint32_t w = atomic_load(word);
        while ((w & MARKED) && !(w & SYNCED) &&
               !atomic_compare_exchange_weak(word, &w, w | SYNCED))
            ;
    }
    for (size_t j = k; j < d->queued; j++) {
        d->queue[j - k] = d->queue[j];
        d->queue_seq[j - k] = d->queue_seq[j];
    }
    d->queued -= k;
    atomic_store(&d->synced, target);
}

static int dl_mark_wait(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset,
                        uint64_t length)
{
    uint64_t cf, cl, ff, fl;
    int rc = units_of(d, &d->coarse, dev, offset, length, &cf, &cl);
    if (rc == DL_OK)
        rc = units_of(d, &d->fine, dev, offset, length, &ff, &fl);
    if (rc != DL_OK)
        return rc;
    uint32_t rel = relative(d, cycle);
    pthread_mutex_lock(&d->mu);
    mark_locked(d, &d->coarse, cf, cl, rel, 1);
    mark_locked(d, &d->fine, ff, fl, rel, 0);
    /* Group commit: wait until every extent of the write is SYNCED. An extent another writer
     * marked is queued with an earlier marks_seq, so waiting for an msync that began at the
     * current marks_seq covers it too. */
    uint64_t mine = atomic_load(&d->marks_seq);
    rc = DL_OK;
    while (atomic_load(&d->synced) < mine) {
        if (d->syncing) {
            pthread_cond_wait(&d->cv, &d->mu);
            continue;
        }
        d->syncing = 1;
        uint64_t target = atomic_load(&d->marks_seq);
        pthread_mutex_unlock(&d->mu);
        int err = msync(d->map, d->map_bytes, MS_SYNC);
        pthread_mutex_lock(&d->mu);
        d->syncing = 0;
        d->syncs++;
        if (err != 0) {
            d->sync_errors++;
            rc = DL_ESYNC;
        }
        synced_locked(d, target);
        pthread_cond_broadcast(&d->cv);
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

/* Under mu: clear the SYNCED marks of level l last written in a cycle <= upto (relative). */
static uint64_t clear_locked(struct level *l, uint64_t upto)
{
    uint64_t n = 0;
    for (uint64_t k = 0; k < (l->units + 63) / 64; k++) {
        uint64_t set = atomic_load(&l->bits[k]);
        while (set) {
            uint64_t u = k * 64 + (uint64_t)__builtin_ctzll(set);
            set &= set - 1;
            if (u >= l->units)
                break;
            uint32_t w = atomic_load(&l->word[u]);
            /* Word first: a writer that raised the cycle since the load makes the swap fail. */
            if ((w & (MARKED | SYNCED)) == (MARKED | SYNCED) && w >> 2 <= upto &&
                atomic_compare_exchange_strong(&l->word[u], &w, 0)) {
                atomic_fetch_and(&l->bits[u / 64], ~(UINT64_C(1) << (u % 64)));
                l->marked--;
                n++;
            }
        }
    }
    return n;
}

/* `committed` - `hot` as words count cycles (0: nothing to clear). */
static uint64_t clear_upto(struct dirtylog *d, uint64_t committed, uint64_t hot)
{
    if (committed < d->first || committed - d->first + 1 <= hot)
        return 0;
    uint64_t upto = committed - d->first + 1 - hot;
    return upto >= REL_MAX ? REL_MAX - 1 : upto;   /* saturated words may hold later writes */
}

void dl_durable(struct dirtylog *d, uint64_t cycle)
{
    /* A cycle before this run's first says nothing of the marks it starts with (cycle 1). */
    uint32_t rel = cycle < d->first ? 0 : relative(d, cycle);
    uint32_t w = atomic_load(&d->durable);
    while (w < rel && !atomic_compare_exchange_weak(&d->durable, &w, rel))
        ;
}

uint64_t dl_commit(struct dirtylog *d, uint64_t committed)
{
    /* Extents stay marked while hot (a new one costs an msync), and until the source holds
     * their writes durably (dl_durable); fine regions cost nothing to mark again, so they
     * clear as soon as their writes are committed: what a crash resyncs is then what was
     * written since the last commit, at the regions' size. */
    uint64_t coarse = clear_upto(d, committed, d->hot), fine = clear_upto(d, committed, 0);
    uint64_t durable = atomic_load(&d->durable);
    if (coarse > durable)
        coarse = durable;
    pthread_mutex_lock(&d->mu);
    if (coarse)
        clear_locked(&d->coarse, coarse);
    uint64_t n = fine ? clear_locked(&d->fine, fine) : 0;
    d->cleared += n;
    pthread_mutex_unlock(&d->mu);
    return n;
}

void dl_stats(struct dirtylog *d, struct dl_stats *st)
{
    pthread_mutex_lock(&d->mu);
    st->regions = d->fine.units;
    st->marked = d->fine.marked;
    st->extents = d->coarse.units;
    st->extents_marked = d->coarse.marked;
    st->marks = d->marks;
    st->syncs = d->syncs;
    st->cleared = d->cleared;
    st->sync_errors = d->sync_errors;
    pthread_mutex_unlock(&d->mu);
}

void dl_free(struct dirtylog *d)
{
    if (d == NULL)
        return;
    if (d->map != NULL)
        munmap(d->map, d->map_bytes);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
    level_free(&d->fine);
    level_free(&d->coarse);
    free(d->queue);
    free(d->queue_seq);
    free(d);
}
