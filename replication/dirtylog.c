/*
 * The dirty-region log: persistent marks of the regions that may hold writes not yet committed
 * on the replica, so that a restart after a crash of the source resyncs those regions only.
 *
 * Theory of operation
 * -------------------
 * Every device is cut into regions of 2^region_shift bytes (1 MiB by default).  The marks live
 * in a bitmap, one bit per region, in a file of the state directory mapped MAP_SHARED: a bit
 * set in the mapping is in the page cache, so it survives the death of the process (kill -9)
 * without any system call.  For power loss it must also be on disk before the data write it
 * covers is issued: a write that sets a new mark waits for an msync that began after the bit
 * was set (group commit: one msync serves every writer that set a bit before it started).
 *
 * Beside the bitmap, each region has a 32-bit word in memory: (last cycle written << 1) |
 * marked, the cycle counted from this run's first (1 = the first; 2^31 cycles, 17 years of
 * 0.25 s cycles, before it saturates, which only keeps a region marked).  The word is the truth the writers and the committer agree on; the bitmap shadows its marked
 * bit, with one invariant:
 *
 *     a word says marked  =>  its bit is set in the mapping.
 *
 * A write tagged with cycle c (the tracker's begin) calls dl_mark before it reaches the back
 * end.  The fast path, with the GIL and no lock: for each region of the write, raise the
 * word's cycle to c with a compare-and-swap that also checks the marked bit; if every region
 * was marked and every mark set so far is synced, the write goes on.  Otherwise dl_mark
 * changes nothing more and returns DL_EWOULDBLOCK, and the caller lets go of the GIL and
 * calls dl_mark_wait, which under `mu` sets the bits, then the words, and waits for the sync.
 *
 * When cycle N is committed (every write of a cycle <= N landed and was flushed), dl_commit
 * clears, under `mu`, the marks of regions whose last write is of a cycle <= N - hot_cycles:
 * regions written recently stay marked ("hot", as in DRBD's activity log), so a steady
 * workload does not pay a new mark and an msync each cycle for the same regions.  A clear is
 * a compare-and-swap of the word from exactly what was read (marked, old cycle) to unmarked,
 * then the bit.  It never needs a sync: a lost clear costs a region resynced for nothing.
 *
 * Why no write is ever left unmarked.  A writer's fast path and a clear both compare-and-swap
 * the same word, so one of them sees the other: if the writer raised the cycle first, the
 * clear's swap fails (the word changed) and the region stays marked; if the clear came first,
 * the writer sees the word unmarked and takes the slow path, which sets the bit again and
 * syncs it before its data write.  The bit and the word change only under `mu` when going
 * unmarked -> marked (bit first) or marked -> unmarked (word first), so the invariant above
 * holds at every instant, for every thread and for the file after a kill -9.  Writers of the
 * open cycle carry c > N >= N - hot_cycles, so a word they raised is never cleared by the
 * commit of N.
 *
 * Why a write after a crash is never unaccounted for.  After kill -9 the mapping's page-cache
 * copy holds every bit set before any data write that reached the back end.  After power
 * loss the file holds every bit that an msync covered before the data write was issued: the
 * fast path only lets a write go when `synced` has caught up with `marks_seq`, which every
 * new mark bumps under `mu` before its word says marked.
 *
 * Locks
 * -----
 * `mu` guards: setting and clearing marks (bitmap and words together), `marks_seq` updates,
 * `syncing`, `synced`, and the counters.  msync runs without `mu` (syncing = 1 keeps it to
 * one at a time); writers waiting for it sleep on `cv`.  The fast path takes no lock.  No
 * call here holds the GIL while it may block: dl_mark never blocks, and the build script's
 * wrappers let go of the GIL around dl_mark_wait and dl_commit.
 *
 * Memory: 4 bytes per region in memory, 1 bit per region on disk (a 1 TiB device at 64 KiB
 * regions: 64 MiB and a 2 MiB file).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "dirtylog.h"

#define REL_MAX UINT32_C(0x7fffffff)

struct dirtylog {
    unsigned shift;
    int ndev;
    uint64_t *base;          /* first region of each device */
    uint64_t *count;         /* regions of each device */
    uint64_t regions;
    uint64_t hot;
    uint64_t first;          /* this run's first cycle: words count cycles from it */
    _Atomic uint32_t *word;  /* per region: (last cycle - first + 1) << 1 | marked */
    _Atomic uint64_t *bits;  /* the mapping: bit r of the bitmap marks region r */
    size_t map_bytes;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t marks_seq;  /* new marks set so far (bumped under mu) */
    _Atomic uint64_t synced;     /* marks_seq as it was when the last msync began */
    int syncing;
    uint64_t marked, marks, syncs, cleared, sync_errors;
};

static int regions_of(struct dirtylog *d, int64_t dev, uint64_t offset, uint64_t length,
                      uint64_t *first, uint64_t *last)
{
    if (dev < 0 || dev >= d->ndev || length == 0)
        return DL_ERANGE;
    uint64_t lo = offset >> d->shift, hi = (offset + length - 1) >> d->shift;
    if (offset + length < offset || hi >= d->count[dev])
        return DL_ERANGE;
    *first = d->base[dev] + lo;
    *last = d->base[dev] + hi;
    return DL_OK;
}

struct dirtylog *dl_new(int fd, uint64_t map_bytes, unsigned region_shift, int ndev,
                        const uint64_t *base, const uint64_t *count, uint64_t first_cycle,
                        uint64_t hot_cycles)
{
    struct dirtylog *d = calloc(1, sizeof *d);
    if (d == NULL)
        return NULL;
    d->shift = region_shift;
    d->first = first_cycle;
    d->ndev = ndev;
    d->hot = hot_cycles;
    d->base = malloc(sizeof(uint64_t) * (size_t)(ndev ? ndev : 1));
    d->count = malloc(sizeof(uint64_t) * (size_t)(ndev ? ndev : 1));
    if (d->base == NULL || d->count == NULL)
        goto fail;
    for (int i = 0; i < ndev; i++) {
        d->base[i] = base[i];
        d->count[i] = count[i];
        if (base[i] + count[i] > d->regions)
            d->regions = base[i] + count[i];
    }
    if (map_bytes < (d->regions + 63) / 64 * 8 || map_bytes % 8 != 0)
        goto fail;
    d->word = calloc(d->regions ? d->regions : 1, sizeof *d->word);
    if (d->word == NULL)
        goto fail;
    d->map_bytes = map_bytes;
    void *map = map_bytes ? mmap(NULL, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                          : NULL;
    if (map == MAP_FAILED)
        goto fail;
    d->bits = map;
    /* Marks already in the file (what this run starts by copying) belong to its first cycle:
     * they clear once it is committed and has cooled down, like any write of that cycle. */
    for (uint64_t r = 0; r < d->regions; r++)
        if (atomic_load(&d->bits[r / 64]) & (UINT64_C(1) << (r % 64))) {
            atomic_store(&d->word[r], UINT32_C(1) << 1 | 1);
            d->marked++;
        }
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    return d;
fail:
    free(d->word);
    free(d->base);
    free(d->count);
    free(d);
    return NULL;
}

/* `cycle` as a word counts it: from this run's first cycle, saturating. */
static uint32_t relative(struct dirtylog *d, uint64_t cycle)
{
    if (cycle < d->first)
        return 1;
    return cycle - d->first + 1 >= REL_MAX ? REL_MAX : (uint32_t)(cycle - d->first + 1);
}

/* Raise region r's cycle to at least `rel`; false if it is not marked (nothing changed). */
static int raise_marked(struct dirtylog *d, uint64_t r, uint32_t rel)
{
    uint32_t w = atomic_load(&d->word[r]);
    for (;;) {
        if (!(w & 1))
            return 0;
        if (w >> 1 >= rel)
            return 1;
        if (atomic_compare_exchange_weak(&d->word[r], &w, rel << 1 | 1))
            return 1;
    }
}

int dl_mark(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset, uint64_t length)
{
    uint64_t first, last;
    int rc = regions_of(d, dev, offset, length, &first, &last);
    if (rc != DL_OK)
        return rc;
    uint32_t rel = relative(d, cycle);
    for (uint64_t r = first; r <= last; r++)
        if (!raise_marked(d, r, rel))
            return DL_EWOULDBLOCK;
    /* Every region is marked; the write may go once those marks are on disk, which is sure
     * when no mark set so far is waiting for its msync. */
    if (atomic_load(&d->synced) != atomic_load(&d->marks_seq))
        return DL_EWOULDBLOCK;
    return DL_OK;
}

int dl_mark_wait(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset,
                 uint64_t length)
{
    uint64_t first, last;
    int rc = regions_of(d, dev, offset, length, &first, &last);
    if (rc != DL_OK)
        return rc;
    uint32_t rel = relative(d, cycle);
    pthread_mutex_lock(&d->mu);
    for (uint64_t r = first; r <= last; r++) {
        if (raise_marked(d, r, rel))
            continue;
        /* Unmarked, and only mu's holder changes an unmarked word: bit first, then word. */
        atomic_fetch_or(&d->bits[r / 64], UINT64_C(1) << (r % 64));
        atomic_fetch_add(&d->marks_seq, 1);
        uint32_t w = atomic_load(&d->word[r]);
        uint32_t c = w >> 1 > rel ? w >> 1 : rel;
        atomic_store(&d->word[r], c << 1 | 1);
        d->marked++;
        d->marks++;
    }
    /* Group commit: wait for an msync that began after our marks were set. */
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
        int err = msync((void *)d->bits, d->map_bytes, MS_SYNC);
        pthread_mutex_lock(&d->mu);
        d->syncing = 0;
        d->syncs++;
        if (err != 0) {
            d->sync_errors++;
            rc = DL_ESYNC;
        }
        atomic_store(&d->synced, target);
        pthread_cond_broadcast(&d->cv);
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

uint64_t dl_commit(struct dirtylog *d, uint64_t committed)
{
    /* Clear what was last written in a cycle <= committed - hot, counted as words count. */
    if (committed < d->first || committed - d->first + 1 <= d->hot)
        return 0;
    uint64_t upto = committed - d->first + 1 - d->hot, n = 0;
    pthread_mutex_lock(&d->mu);
    for (uint64_t k = 0; k < (d->regions + 63) / 64; k++) {
        uint64_t set = atomic_load(&d->bits[k]);
        while (set) {
            uint64_t r = k * 64 + (uint64_t)__builtin_ctzll(set);
            set &= set - 1;
            if (r >= d->regions)
                break;
            uint32_t w = atomic_load(&d->word[r]);
            /* Word first: a writer that raised the cycle since the load makes the swap fail. */
            if ((w & 1) && w >> 1 <= upto &&
                atomic_compare_exchange_strong(&d->word[r], &w, w & ~UINT32_C(1))) {
                atomic_fetch_and(&d->bits[r / 64], ~(UINT64_C(1) << (r % 64)));
                d->marked--;
                n++;
            }
        }
    }
    d->cleared += n;
    pthread_mutex_unlock(&d->mu);
    return n;
}

void dl_stats(struct dirtylog *d, struct dl_stats *st)
{
    pthread_mutex_lock(&d->mu);
    st->regions = d->regions;
    st->marked = d->marked;
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
    if (d->bits != NULL)
        munmap((void *)d->bits, d->map_bytes);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
    free(d->word);
    free(d->base);
    free(d->count);
    free(d);
}
