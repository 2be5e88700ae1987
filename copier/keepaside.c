/*
 * The keep-aside store's data path.  copier/keepaside.py holds the theory of operation (what
 * is kept, when, and why that gives the copier the image of the recovery point); this file
 * holds how it is done without a Python object per block and without failing a host write.
 *
 * It is compiled inside the cffi module copier._keepaside (copier/_keepaside_build.py), after
 * Python.h: cffi's wrappers keep the GIL there, and the functions below let go of it
 * themselves, only where they may wait (see "The GIL").
 *
 * Locking
 * -------
 * One mutex, `mu`, guards the whole store except `keep_below`, an atomic that ka_needs reads
 * without the lock.  Two rules make `mu` and the GIL deadlock-free together:
 *   1. nobody takes the GIL back while holding `mu` (gil_restore comes after the unlock);
 *   2. nobody blocks on `mu` while holding the GIL: lock() tries it, and when it is taken
 *      lets go of the GIL before waiting.
 * So whoever waits for `mu` holds nothing its holder could be waiting for.  Nothing here
 * calls back into Python.
 *
 * No I/O of the source happens under `mu`: a keeper reads the blocks it found pending into
 * a buffer on its stack with the lock released, then stores them under the lock after
 * checking again that they are still pending and not kept, and that the store was not
 * re-armed, released or degraded meanwhile (`epoch`).  The copier's read of a batch happens
 * in Python before ka_overlay, also without `mu`.  Spill-file reads and writes do happen
 * under `mu` (they are page-cache copies, and a slot must not be reused while it is written).
 *
 * The GIL
 * -------
 * ka_keep runs on the host's write path, on many nbdkit threads at once.  Its common cases
 * are short: nothing to keep (the range was read, kept or is not in the report: 0.34 us a
 * call from Python here), or blocks in the page cache (3.0 us for a 4 KiB block, most of it
 * the kernel's copy).  A GIL hand-off costs about as much as the shorter of those
 * (design.md: a page-cache hit is about a microsecond, less than a hand-off), and letting go
 * of the GIL means queueing to get it back behind the other writers.  So ka_keep keeps the
 * GIL for the checks, the copy into the arena, and its first read of the source, which asks
 * RWF_NOWAIT: what the page cache holds comes back at once, a miss comes back as EAGAIN
 * instead of a disk wait.  It lets go of the GIL only where it may wait -- a read that
 * missed, a spill-file write, a new arena chunk, a busy lock, the drain -- and takes it back
 * once, on the way out.  The controller's calls (arm, drained, install, release, overlay,
 * state) come a few per cycle: they let go of the GIL on entry.
 *
 * Memory
 * ------
 * Kept bytes live in numbered slots of BLOCK bytes: slots [0, mem_slots) in an arena of
 * 1 MiB mmaps made on demand (so an idle store costs nothing, and a release or a degrade
 * gives the memory back to the system), slots [mem_slots, mem_slots + spill_slots) in an unlinked spill file.
 * Freed memory slots form a list threaded through the slots themselves; freed spill slots
 * are a stack of uint32.  The index is an open-addressing hash (dev, block) -> slot (linear
 * probing, backward-shift deletion, at most 3/4 full, 12 bytes a bucket) plus, per device, a
 * min-heap of the kept block numbers: the copier reads in ascending order, so each batch
 * pops its blocks from the heap in order and frees them.  Per kept block: at most 32 bytes
 * of hash (under 8/3 buckets of 12 bytes), 16 of heap (doubling) and 8 of free stack
 * (doubling), so KA_INDEX_BYTES_PER_BLOCK = 56 per block kept since the arm, over a floor of
 * KA_INDEX_BYTES_FIXED plus KA_INDEX_BYTES_PER_DEV per device (the minimum sizes).  None of
 * it shrinks before the release, so the bound counts blocks kept, not blocks still held.
 *
 * Failure
 * -------
 * No function that serves a host write reports an error.  Whatever goes wrong (the source
 * or the spill file cannot be read or written, a cap is reached, malloc fails, the drain
 * takes too long) calls degrade(): keeping stops, everything kept is dropped, reads pass
 * through, and `reason` says why, until the next arm or release.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "keepaside.h"

#define KA_BLOCK 4096
#define KA_INDEX_BYTES_PER_BLOCK 56
#define KA_INDEX_BYTES_FIXED (HASH_MIN * 12 + FREE_MIN * 4)
#define KA_INDEX_BYTES_PER_DEV (HEAP_MIN * 8)

/* Blocks read from the source in one step of a keep: a 64 KiB buffer on the stack. */
#define RUN_BLOCKS 16
/* Memory slots per arena chunk: 1 MiB per mmap. */
#define CHUNK_SLOTS 256
#define HASH_MIN 1024
#define HEAP_MIN 64
#define FREE_MIN 256
#define NO_SLOT UINT32_MAX
#define NOT_KEEPING UINT64_MAX

struct gil {
    PyThreadState *save;
};

static void gil_release(struct gil *g)
{
    if (!g->save)
        g->save = PyEval_SaveThread();
}

static void gil_restore(struct gil *g)
{
    if (g->save) {
        PyEval_RestoreThread(g->save);
        g->save = NULL;
    }
}

struct ka_dev {
    int fd;
    long long id;
    uint64_t size;
    uint64_t read_upto;    /* the copier has read every byte of the report below this */
    int pending_all;       /* armed and no report installed yet: every unread byte is pending */
    uint64_t *ext;         /* the installed report's data extents: sorted disjoint pairs */
    size_t next;
    uint64_t *heap;        /* kept block numbers of this device, a min-heap */
    size_t hn, hcap;
    atomic_int nowait;     /* 0 once the source answered RWF_NOWAIT with EOPNOTSUPP */
};

struct ka {
    pthread_mutex_t mu;
    pthread_cond_t cond;           /* drained, arm, release and degrade broadcast it */
    _Atomic uint64_t keep_below;   /* writes of a later cycle keep; NOT_KEEPING if none must */
    int armed, drained, degraded;
    uint64_t cycle;                /* the armed cycle */
    uint64_t epoch;                /* bumped by arm, release and degrade */
    double drain_wait;
    char reason[256];
    size_t ndev;
    struct ka_dev *devs;
    uint64_t *hkeys;               /* key + 1, 0 for an empty bucket */
    uint32_t *hslots;
    size_t hcap, hcount;
    uint32_t mem_slots, mem_fresh, mem_free;
    unsigned char **chunks;
    uint32_t spill_slots, spill_fresh;
    uint32_t *spill_free;
    size_t spill_nfree, spill_free_cap;
    int spill_fd;
    char *spill_dir;
    uint64_t mem_bytes, spill_bytes, kept_total;
};

static uint64_t min64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static uint64_t max64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

static const char *human(uint64_t n, char *out, size_t cap)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double x = (double)n;
    int u = 0;
    while (x >= 1024 && u < 5) {
        x /= 1024;
        u++;
    }
    if (u)
        snprintf(out, cap, "%.1f %s", x, units[u]);
    else
        snprintf(out, cap, "%llu B", (unsigned long long)n);
    return out;
}

static void lock(struct ka *k, struct gil *g)
{
    if (g->save || pthread_mutex_trylock(&k->mu)) {
        gil_release(g);
        pthread_mutex_lock(&k->mu);
    }
}

/* ---- the index: hash (dev, block) -> slot ---------------------------------------------- */

static uint64_t key_of(size_t d, uint64_t block)
{
    return ((uint64_t)d << 48) | block;
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The bucket holding `key`, or hcap if it is not kept. */
static size_t h_find(const struct ka *k, uint64_t key)
{
    if (!k->hcap)
        return 0;
    size_t mask = k->hcap - 1;
    for (size_t i = mix(key) & mask;; i = (i + 1) & mask) {
        if (k->hkeys[i] == key + 1)
            return i;
        if (!k->hkeys[i])
            return k->hcap;
    }
}

static void h_put(struct ka *k, uint64_t key, uint32_t slot)
{
    size_t mask = k->hcap - 1, i = mix(key) & mask;
    while (k->hkeys[i])
        i = (i + 1) & mask;
    k->hkeys[i] = key + 1;
    k->hslots[i] = slot;
    k->hcount++;
}

/* Room for one more key, growing to twice the buckets past 3/4 full: 0 or ENOMEM. */
static int h_reserve(struct ka *k)
{
    if ((k->hcount + 1) * 4 <= k->hcap * 3)
        return 0;
    size_t cap = k->hcap ? 2 * k->hcap : HASH_MIN;
    uint64_t *keys = calloc(cap, sizeof *keys), *old_keys = k->hkeys;
    uint32_t *slots = malloc(cap * sizeof *slots), *old_slots = k->hslots;
    if (!keys || !slots) {
        free(keys);
        free(slots);
        return ENOMEM;
    }
    size_t old_cap = k->hcap;
    k->hkeys = keys;
    k->hslots = slots;
    k->hcap = cap;
    k->hcount = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old_keys[i])
            h_put(k, old_keys[i] - 1, old_slots[i]);
    free(old_keys);
    free(old_slots);
    return 0;
}

/* Empty bucket i, shifting later keys of its probe chain back so that no lookup stops early. */
static void h_del_at(struct ka *k, size_t i)
{
    size_t mask = k->hcap - 1;
    for (size_t j = (i + 1) & mask; k->hkeys[j]; j = (j + 1) & mask) {
        size_t home = mix(k->hkeys[j] - 1) & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            k->hkeys[i] = k->hkeys[j];
            k->hslots[i] = k->hslots[j];
            i = j;
        }
    }
    k->hkeys[i] = 0;
    k->hcount--;
}

/* ---- per-device heaps of kept blocks ---------------------------------------------------- */

static int heap_reserve(struct ka_dev *v)
{
    if (v->hn < v->hcap)
        return 0;
    size_t cap = v->hcap ? 2 * v->hcap : HEAP_MIN;
    uint64_t *heap = realloc(v->heap, cap * sizeof *heap);
    if (!heap)
        return ENOMEM;
    v->heap = heap;
    v->hcap = cap;
    return 0;
}

static void sift_down(uint64_t *h, size_t n, size_t i)
{
    uint64_t x = h[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && h[c + 1] < h[c])
            c++;
        if (h[c] >= x)
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static void heap_push(struct ka_dev *v, uint64_t block)
{
    size_t i = v->hn++;
    while (i && v->heap[(i - 1) / 2] > block) {
        v->heap[i] = v->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    v->heap[i] = block;
}

static void heap_pop(struct ka_dev *v)
{
    v->heap[0] = v->heap[--v->hn];
    if (v->hn)
        sift_down(v->heap, v->hn, 0);
}

/* ---- what is pending -------------------------------------------------------------------- */

static uint64_t block_len(const struct ka_dev *v, uint64_t block)
{
    return min64(KA_BLOCK, v->size - block * KA_BLOCK);
}

static int extents_meet(const struct ka_dev *v, uint64_t start, uint64_t end)
{
    size_t lo = 0, hi = v->next;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v->ext[2 * mid] + v->ext[2 * mid + 1] <= start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < v->next && v->ext[2 * lo] < end;
}

/* Block `block` still holds bytes of the report that the copier has not read. */
static int pending(const struct ka_dev *v, uint64_t block)
{
    uint64_t start = block * KA_BLOCK;
    if (start >= v->size)
        return 0;
    uint64_t end = start + block_len(v, block);
    start = max64(start, v->read_upto);
    return start < end && (v->pending_all || extents_meet(v, start, end));
}

static int needed(const struct ka *k, size_t d, uint64_t block)
{
    return pending(&k->devs[d], block) && h_find(k, key_of(d, block)) == k->hcap;
}

/* ---- slots ------------------------------------------------------------------------------ */

static unsigned char *mem_slot(const struct ka *k, uint32_t s)
{
    return k->chunks[s / CHUNK_SLOTS] + (size_t)(s % CHUNK_SLOTS) * KA_BLOCK;
}

static uint64_t spill_offset(const struct ka *k, uint32_t s)
{
    return (uint64_t)(s - k->mem_slots) * KA_BLOCK;
}

static void free_slot(struct ka *k, uint32_t s, uint64_t n)
{
    if (s < k->mem_slots) {
        memcpy(mem_slot(k, s), &k->mem_free, sizeof k->mem_free);
        k->mem_free = s;
        k->mem_bytes -= n;
    } else {
        k->spill_free[k->spill_nfree++] = s;
        k->spill_bytes -= n;
    }
}

static void drop_kept(struct ka *k)
{
    for (uint32_t c = 0; c * CHUNK_SLOTS < k->mem_fresh; c++) {
        munmap(k->chunks[c], (size_t)min64(CHUNK_SLOTS, k->mem_slots - c * CHUNK_SLOTS) * KA_BLOCK);
        k->chunks[c] = NULL;
    }
    if (k->spill_fd >= 0)
        close(k->spill_fd);
    k->spill_fd = -1;
    free(k->hkeys);
    free(k->hslots);
    free(k->spill_free);
    k->hkeys = NULL;
    k->hslots = NULL;
    k->spill_free = NULL;
    k->hcap = k->hcount = k->spill_nfree = k->spill_free_cap = 0;
    k->mem_fresh = k->spill_fresh = 0;
    k->mem_free = NO_SLOT;
    k->mem_bytes = k->spill_bytes = 0;
    for (size_t d = 0; d < k->ndev; d++) {
        free(k->devs[d].heap);
        k->devs[d].heap = NULL;
        k->devs[d].hn = k->devs[d].hcap = 0;
    }
}

static void forget_report(struct ka *k)
{
    for (size_t d = 0; d < k->ndev; d++) {
        free(k->devs[d].ext);
        k->devs[d].ext = NULL;
        k->devs[d].next = 0;
        k->devs[d].read_upto = 0;
        k->devs[d].pending_all = 0;
    }
}

/* Give up point in time for the armed cycle (holds mu).  The first reason stays. */
static void degrade(struct ka *k, const char *fmt, ...)
{
    if (!k->degraded) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(k->reason, sizeof k->reason, fmt, ap);
        va_end(ap);
    }
    k->degraded = 1;
    atomic_store(&k->keep_below, NOT_KEEPING);
    k->epoch++;
    drop_kept(k);
    forget_report(k);
    pthread_cond_broadcast(&k->cond);
}

static int open_spill(struct ka *k)
{
    int fd = open(k->spill_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
        /* A file system without O_TMPFILE: a named file, unlinked at once. */
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/nbdrep-keepaside-XXXXXX", k->spill_dir) >= (int)sizeof path)
            return ENAMETOOLONG;
        fd = mkostemp(path, O_CLOEXEC);
        if (fd >= 0)
            unlink(path);
    }
    if (fd < 0)
        return errno;
    k->spill_fd = fd;
    return 0;
}

/* A free slot, or NO_SLOT after degrading (holds mu). */
static uint32_t take_slot(struct ka *k, struct gil *g)
{
    char a[32], b[32];
    uint32_t s;
    if (k->mem_free != NO_SLOT) {
        s = k->mem_free;
        memcpy(&k->mem_free, mem_slot(k, s), sizeof k->mem_free);
        return s;
    }
    if (k->mem_fresh < k->mem_slots) {
        uint32_t c = k->mem_fresh / CHUNK_SLOTS;
        if (!k->chunks[c]) {
            /* Populated at once: one fault per chunk instead of one per block took a keep from
               4.1 to 3.0 us here; zeroing 1 MiB takes long enough to let go of the GIL. */
            size_t n = (size_t)min64(CHUNK_SLOTS, k->mem_slots - c * CHUNK_SLOTS) * KA_BLOCK;
            gil_release(g);
            void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                           -1, 0);
            if (p == MAP_FAILED) {
                degrade(k, "out of memory for kept blocks at %s", human(k->mem_bytes, a, sizeof a));
                return NO_SLOT;
            }
            k->chunks[c] = p;
        }
        return k->mem_fresh++;
    }
    if (k->spill_nfree)
        return k->spill_free[--k->spill_nfree];
    gil_release(g);
    if (k->spill_fresh >= k->spill_slots) {
        if (k->spill_slots)
            degrade(k, "spill file full at %s", human((uint64_t)k->spill_slots * KA_BLOCK, a, sizeof a));
        else
            degrade(k, "memory cap full at %s and spilling is off",
                    human((uint64_t)k->mem_slots * KA_BLOCK, a, sizeof a));
        return NO_SLOT;
    }
    if (k->spill_fresh == k->spill_free_cap) {
        /* Every spill slot handed out can come back: size the stack now, so freeing never fails. */
        size_t cap = k->spill_free_cap ? 2 * k->spill_free_cap : FREE_MIN;
        uint32_t *stack = realloc(k->spill_free, cap * sizeof *stack);
        if (!stack) {
            degrade(k, "out of memory for the spill slot list at %s", human(k->spill_bytes, a, sizeof a));
            return NO_SLOT;
        }
        k->spill_free = stack;
        k->spill_free_cap = cap;
    }
    if (k->spill_fd < 0) {
        int err = open_spill(k);
        if (err) {
            degrade(k, "cannot create a spill file in %s: %s (memory cap full at %s)", k->spill_dir,
                    strerror(err), human((uint64_t)k->mem_slots * KA_BLOCK, b, sizeof b));
            return NO_SLOT;
        }
    }
    return k->mem_slots + k->spill_fresh++;
}

/* Write (`writing`) or read all `n` bytes at `off` within spill slot `s`: 0, or an errno (a
 * write that makes no progress is a full file system, a read that finds nothing is EIO). */
static int spill_io(const struct ka *k, uint32_t s, uint64_t off, unsigned char *buf, uint64_t n,
                    int writing)
{
    uint64_t done = 0, at = spill_offset(k, s) + off;
    while (done < n) {
        ssize_t r = writing ? pwrite(k->spill_fd, buf + done, n - done, (off_t)(at + done))
                            : pread(k->spill_fd, buf + done, n - done, (off_t)(at + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            return writing ? ENOSPC : EIO;
        done += (uint64_t)r;
    }
    return 0;
}

/* Keep block `block` of device d from `src` (holds mu; the block is needed): 0, or -1 after degrading. */
static int store(struct ka *k, size_t d, uint64_t block, const unsigned char *src, struct gil *g)
{
    struct ka_dev *v = &k->devs[d];
    uint64_t n = block_len(v, block);
    char a[32];
    if (h_reserve(k) || heap_reserve(v)) {
        gil_release(g);
        degrade(k, "out of memory for the index of %llu kept blocks", (unsigned long long)k->hcount);
        return -1;
    }
    uint32_t s = take_slot(k, g);
    if (s == NO_SLOT)
        return -1;
    if (s < k->mem_slots) {
        memcpy(mem_slot(k, s), src, n);
        k->mem_bytes += n;
    } else {
        gil_release(g);
        int err = spill_io(k, s, 0, (unsigned char *)src, n, 1);
        if (err) {
            degrade(k, "writing the spill file in %s failed at %s: %s", k->spill_dir,
                    human(spill_offset(k, s), a, sizeof a), strerror(err));
            return -1;
        }
        k->spill_bytes += n;
    }
    h_put(k, key_of(d, block), s);
    heap_push(v, block);
    k->kept_total++;
    return 0;
}

/* ---- the source ------------------------------------------------------------------------- */

/* Read [off, off+len) of the source: with the GIL if the page cache has it all, else without. */
static int read_source(struct ka_dev *v, unsigned char *buf, uint64_t len, uint64_t off, struct gil *g)
{
    uint64_t done = 0;
    if (!g->save && atomic_load(&v->nowait)) {
        struct iovec iov = {buf, len};
        ssize_t r = preadv2(v->fd, &iov, 1, (off_t)off, RWF_NOWAIT);
        if (r > 0)
            done = (uint64_t)r;
        else if (r < 0 && errno == EOPNOTSUPP)
            atomic_store(&v->nowait, 0);
    }
    if (done < len)
        gil_release(g);
    while (done < len) {
        ssize_t r = pread(v->fd, buf + done, len - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            return EIO;
        done += (uint64_t)r;
    }
    return 0;
}

/* ---- the interface ---------------------------------------------------------------------- */

struct ka *ka_new(size_t ndev, const int *fds, const uint64_t *sizes, const long long *ids,
                  uint32_t mem_slots, uint32_t spill_slots, const char *spill_dir, double drain_wait)
{
    struct ka *k = calloc(1, sizeof *k);
    pthread_condattr_t attr;
    if (!k)
        return NULL;
    k->devs = calloc(ndev ? ndev : 1, sizeof *k->devs);
    k->chunks = calloc(mem_slots / CHUNK_SLOTS + 1, sizeof *k->chunks);
    k->spill_dir = strdup(spill_dir);
    if (!k->devs || !k->chunks || !k->spill_dir) {
        free(k->devs);
        free(k->chunks);
        free(k->spill_dir);
        free(k);
        return NULL;
    }
    pthread_mutex_init(&k->mu, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&k->cond, &attr);
    pthread_condattr_destroy(&attr);
    atomic_init(&k->keep_below, NOT_KEEPING);
    k->ndev = ndev;
    for (size_t d = 0; d < ndev; d++) {
        k->devs[d].fd = fds[d];
        k->devs[d].size = sizes[d];
        k->devs[d].id = ids[d];
        atomic_init(&k->devs[d].nowait, 1);
    }
    k->mem_slots = mem_slots;
    k->spill_slots = spill_slots;
    k->mem_free = NO_SLOT;
    k->spill_fd = -1;
    k->drain_wait = drain_wait;
    return k;
}

void ka_free(struct ka *k)
{
    drop_kept(k);
    forget_report(k);
    pthread_mutex_destroy(&k->mu);
    pthread_cond_destroy(&k->cond);
    free(k->devs);
    free(k->chunks);
    free(k->spill_dir);
    free(k);
}

_Bool ka_needs(struct ka *k, uint64_t cycle)
{
    return cycle > atomic_load(&k->keep_below);
}

static void reset(struct ka *k, int armed, uint64_t cycle)
{
    drop_kept(k);
    forget_report(k);
    k->armed = armed;
    k->cycle = cycle;
    k->drained = k->degraded = 0;
    k->reason[0] = 0;
    k->epoch++;
    for (size_t d = 0; d < k->ndev; d++)
        k->devs[d].pending_all = armed;
    atomic_store(&k->keep_below, armed ? cycle : NOT_KEEPING);
    pthread_cond_broadcast(&k->cond);
}

void ka_arm(struct ka *k, uint64_t cycle)
{
    struct gil g = {NULL};
    gil_release(&g);
    pthread_mutex_lock(&k->mu);
    reset(k, 1, cycle);
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
}

void ka_release(struct ka *k)
{
    struct gil g = {NULL};
    gil_release(&g);
    pthread_mutex_lock(&k->mu);
    reset(k, 0, 0);
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
}

void ka_drained(struct ka *k)
{
    struct gil g = {NULL};
    gil_release(&g);
    pthread_mutex_lock(&k->mu);
    if (k->armed) {
        k->drained = 1;
        pthread_cond_broadcast(&k->cond);
    }
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
}

void ka_keep(struct ka *k, uint64_t cycle, size_t d, uint64_t offset, uint64_t length)
{
    struct ka_dev *v = &k->devs[d];
    unsigned char buf[RUN_BLOCKS * KA_BLOCK];
    struct gil g = {NULL};
    struct timespec deadline;
    uint64_t waiting_epoch = 0;
    int waiting = 0;
    char a[32];
    if (cycle <= atomic_load(&k->keep_below) || !length || offset >= v->size)
        return;
    uint64_t end = length > v->size - offset ? v->size : offset + length;
    uint64_t block = offset / KA_BLOCK, last = (end - 1) / KA_BLOCK;
    lock(k, &g);
    /* The re-check under the lock: the store may have been released and re-armed since
       ka_needs, and a write of the armed cycle must neither keep nor wait (the drain waits
       for it). */
    while (block <= last && k->armed && !k->degraded && cycle > k->cycle) {
        if (!k->drained) {
            gil_release(&g);
            if (!waiting || waiting_epoch != k->epoch) {
                clock_gettime(CLOCK_MONOTONIC, &deadline);
                deadline.tv_sec += (time_t)k->drain_wait;
                deadline.tv_nsec += (long)((k->drain_wait - (double)(time_t)k->drain_wait) * 1e9);
                if (deadline.tv_nsec >= 1000000000L) {
                    deadline.tv_sec++;
                    deadline.tv_nsec -= 1000000000L;
                }
                waiting = 1;
                waiting_epoch = k->epoch;
            }
            if (pthread_cond_timedwait(&k->cond, &k->mu, &deadline) == ETIMEDOUT && !k->drained
                && waiting_epoch == k->epoch)
                degrade(k, "cycle %llu still not drained after a keep waited %.1f s for it",
                        (unsigned long long)k->cycle, k->drain_wait);
            continue;
        }
        while (block <= last && !needed(k, d, block))
            block++;
        if (block > last)
            break;
        uint64_t first = block, run_last = min64(last, first + RUN_BLOCKS - 1);
        uint64_t at = first * KA_BLOCK, len = run_last * KA_BLOCK + block_len(v, run_last) - at;
        uint64_t epoch = k->epoch;
        pthread_mutex_unlock(&k->mu);
        int err = read_source(v, buf, len, at, &g);
        lock(k, &g);
        if (k->epoch != epoch)
            continue;
        if (err) {
            gil_release(&g);
            degrade(k, "reading source %lld at %s to keep it aside failed: %s", v->id,
                    human(at, a, sizeof a), strerror(err));
            break;
        }
        for (; block <= run_last; block++)
            if (needed(k, d, block) && store(k, d, block, buf + (block - first) * KA_BLOCK, &g))
                break;
    }
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
}

/* The n (offset, length) pairs are ascending and disjoint, and none wraps around. */
static int ascending(const uint64_t *pairs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (pairs[2 * i] + pairs[2 * i + 1] < pairs[2 * i]
            || (i && pairs[2 * i] < pairs[2 * i - 2] + pairs[2 * i - 1]))
            return 0;
    return 1;
}

/* Lay the kept blocks of one batch over the bytes the copier read for it (holds mu). */
static void overlay(struct ka *k, size_t d, const uint64_t *pairs, size_t n, unsigned char *buf)
{
    struct ka_dev *v = &k->devs[d];
    uint64_t hi = pairs[2 * n - 2] + pairs[2 * n - 1], pos = 0;
    size_t i = 0;
    char a[32];
    while (v->hn) {
        uint64_t block = v->heap[0], bs = block * KA_BLOCK, be = bs + block_len(v, block);
        if (bs >= hi)
            break;
        while (i < n && pairs[2 * i] + pairs[2 * i + 1] <= bs)
            pos += pairs[2 * i + 1], i++;
        size_t at = h_find(k, key_of(d, block));
        uint32_t s = k->hslots[at];
        uint64_t p = pos;
        for (size_t j = i; j < n && pairs[2 * j] < be; p += pairs[2 * j + 1], j++) {
            uint64_t lo = max64(pairs[2 * j], bs), top = min64(pairs[2 * j] + pairs[2 * j + 1], be);
            if (lo >= top)
                continue;
            unsigned char *dst = buf + p + (lo - pairs[2 * j]);
            if (s < k->mem_slots) {
                memcpy(dst, mem_slot(k, s) + (lo - bs), top - lo);
            } else {
                int err = spill_io(k, s, lo - bs, dst, top - lo, 0);
                if (err) {
                    degrade(k, "reading the spill file in %s failed at %s: %s", k->spill_dir,
                            human(spill_offset(k, s), a, sizeof a), strerror(err));
                    return;
                }
            }
        }
        if (be > hi)
            break; /* its tail is in the next batch */
        heap_pop(v);
        free_slot(k, s, be - bs);
        h_del_at(k, at);
    }
    v->read_upto = max64(v->read_upto, hi);
}

/* 0, or EINVAL if the segments are not ascending and disjoint or go back before a batch already read. */
int ka_overlay(struct ka *k, size_t d, const uint64_t *pairs, size_t n, unsigned char *buf)
{
    struct gil g = {NULL};
    int rc = 0;
    gil_release(&g);
    if (!ascending(pairs, n)) {
        gil_restore(&g);
        return EINVAL;
    }
    pthread_mutex_lock(&k->mu);
    if (n && k->armed && !k->degraded) {
        if (pairs[0] < k->devs[d].read_upto)
            rc = EINVAL;
        else
            overlay(k, d, pairs, n, buf);
    }
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
    return rc;
}

/* Narrow what is pending to the report's data extents: 0, or 1 + the index of a device whose
   extents are not ascending and disjoint (then nothing changed). */
int ka_install(struct ka *k, const uint64_t *const *pairs, const size_t *npairs)
{
    struct gil g = {NULL};
    char a[32];
    gil_release(&g);
    for (size_t d = 0; d < k->ndev; d++)
        if (!ascending(pairs[d], npairs[d])) {
            gil_restore(&g);
            return (int)d + 1;
        }
    pthread_mutex_lock(&k->mu);
    if (k->armed && !k->degraded) {
        uint64_t bytes = 0;
        for (size_t d = 0; d < k->ndev && !k->degraded; d++) {
            struct ka_dev *v = &k->devs[d];
            free(v->ext);   /* a second install in one arm replaces the first */
            v->ext = npairs[d] ? malloc(npairs[d] * 2 * sizeof *v->ext) : NULL;
            if (npairs[d] && !v->ext) {
                degrade(k, "out of memory for the %s of report extents of cycle %llu",
                        human(bytes + npairs[d] * 16, a, sizeof a), (unsigned long long)k->cycle);
                break;
            }
            if (npairs[d])
                memcpy(v->ext, pairs[d], npairs[d] * 2 * sizeof *v->ext);
            v->next = npairs[d];
            v->pending_all = 0;
            bytes += npairs[d] * 16;
        }
        for (size_t d = 0; d < k->ndev && !k->degraded; d++) {
            struct ka_dev *v = &k->devs[d];
            size_t kept = 0;
            for (size_t i = 0; i < v->hn; i++) {
                uint64_t block = v->heap[i];
                if (pending(v, block)) {
                    v->heap[kept++] = block;
                } else {
                    size_t at = h_find(k, key_of(d, block));
                    free_slot(k, k->hslots[at], block_len(v, block));
                    h_del_at(k, at);
                }
            }
            v->hn = kept;
            for (size_t i = kept / 2; i-- > 0;)
                sift_down(v->heap, kept, i);
        }
    }
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
    return 0;
}

int ka_state(struct ka *k, struct ka_stats *st, char *reason, size_t cap)
{
    struct gil g = {NULL};
    gil_release(&g);
    pthread_mutex_lock(&k->mu);
    st->armed = k->armed;
    st->degraded = k->degraded;
    st->cycle = k->cycle;
    st->blocks = k->hcount;
    st->mem_bytes = k->mem_bytes;
    st->spill_bytes = k->spill_bytes;
    st->kept_total = k->kept_total;
    st->index_bytes = k->hcap * (sizeof *k->hkeys + sizeof *k->hslots)
                      + k->spill_free_cap * sizeof *k->spill_free;
    st->extent_bytes = 0;
    for (size_t d = 0; d < k->ndev; d++) {
        st->index_bytes += k->devs[d].hcap * sizeof *k->devs[d].heap;
        st->extent_bytes += k->devs[d].next * 2 * sizeof *k->devs[d].ext;
    }
    snprintf(reason, cap, "%s", k->reason);
    pthread_mutex_unlock(&k->mu);
    gil_restore(&g);
    return st->degraded;
}
