/*
 * The tracking structure (US 12,393,603 claims 1-3): per-CPU shards of
 * fixed-size tracking entries (TEs), tagged with the cycle they belong to.
 *
 * Theory of operation
 * ===================
 *
 * Recording.  A write is recorded into the shard of the CPU it runs on
 * (sched_getcpu() % nshards), under that shard's mutex: one 24-byte struct
 * copied into a C array, no allocation except when the array is full.  A
 * thread that migrates between CPUs only makes two shards hold TEs of the
 * same cycle, which close_cycle gathers anyway.
 *
 * Two speeds.  tr_end and tr_record run with the caller's GIL held (_build.py
 * says why), so they must never wait: they only try-lock the shard and only
 * append.  If the shard is locked (by a fold, a detach or tr_stats, which run
 * without the GIL) or full, they return TR_EWOULDBLOCK having changed nothing,
 * and the caller gives up the GIL and calls tr_end_wait / tr_record_wait, which
 * wait for the lock and make room (grow, or fold: up to O(n log n)).  Threads
 * holding the GIL never contend with each other for a shard lock, since one
 * that holds a shard lock does not give up the GIL before it unlocks.
 *
 * Cycle switch without a pause.  The open cycle id is one atomic word.  A
 * recovery point (RP) stores c+1 there: writes that begin afterwards are in
 * c+1 at once.  The RP must then wait for the writes that began in c and are
 * still running, because their TEs are only recorded when they end.  Each
 * shard counts writes in flight per cycle parity (inflight[c & 1]); begin()
 * does
 *
 *     c = cycle; inflight[c & 1] += 1; if (cycle != c) undo and retry;
 *
 * With sequentially consistent atomics, a begin() that returns c made its
 * increment before the RP's store of c+1, so the RP, which reads the counters
 * after its store, sees it.  An increment made on a stale c is undone at
 * once; it can only delay a drain, never hide a write.  Parities suffice
 * because cycle c+2 cannot open before cycle c is drained and detached: a
 * closed cycle that did not drain in time stays "draining" and the next close
 * resumes it instead of opening another cycle.
 *
 * The counters are per shard to keep writers off one shared cache line.  A
 * write may begin on one shard and end on another; the drain sums the
 * parity's counters over all shards.  After the switch every increment of
 * cycle c is already visible, so a sum taken shard by shard can over-count
 * (a decrement not yet seen) but never under-count: a sum of zero means no
 * write of c is in flight.  end() records the TE under the shard lock before
 * its decrement, so the drainer, which then takes each shard lock, sees it.
 *
 * Bounded memory (design invariant 4).  A shard array starts small and
 * doubles up to its share of the cap (max_bytes / nshards).  A full shard at
 * its share folds in place instead: sort by (dev, kind, cycle, offset) and
 * merge overlapping or adjacent TEs with the same key.  If less than half the
 * array is then free, it coarsens: offsets round down and ends round up to a
 * granule (64 KiB, doubling per pass) and TEs merge again.  A coarsened zero
 * or trim TE becomes a data TE, since widening it would zero bytes nobody
 * zeroed, while data is read from the source, so over-reporting is safe.  Each
 * step only widens extents, so the union after a fold covers the union before.
 * Only when coarsening to the largest granule still leaves the array more than
 * half full (hundreds of devices in one shard) does the shard grow past its
 * share, counted in over_cap; a change is never dropped to honour the cap.
 * Halving the array per fold keeps the amortised cost per TE O(log n).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getcpu */
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shards.h"

#define FIRST_GRANULE ((uint64_t)64 << 10)
#define CACHE_LINE 64

struct shard {
    _Alignas(CACHE_LINE) pthread_mutex_t lock;
    struct tr_te *tes;
    size_t n, cap;
    uint64_t granule[2];    /* largest granule applied to a live cycle, by parity */
    int folded[2];          /* whether a live cycle's TEs were merged, by parity */
    uint64_t folds, coarsenings, over_cap;
    _Alignas(CACHE_LINE) _Atomic int64_t inflight[2];
};

struct tracker {
    _Atomic uint64_t cycle;
    _Atomic uint64_t draining1; /* closed cycle not yet detached, plus one; 0 if none */
    size_t nshards, share, initial;
    struct shard *shards;
};

/* ---- construction ---------------------------------------------------- */

struct tracker *tr_new(size_t nshards, size_t share, size_t initial, uint64_t first_cycle)
{
    struct tracker *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->shards = aligned_alloc(CACHE_LINE, nshards * sizeof *t->shards);
    if (!t->shards) {
        free(t);
        return NULL;
    }
    memset(t->shards, 0, nshards * sizeof *t->shards);
    t->nshards = nshards;
    t->share = share;
    t->initial = initial;
    atomic_init(&t->cycle, first_cycle);
    atomic_init(&t->draining1, 0);
    for (size_t i = 0; i < nshards; i++) {
        struct shard *s = &t->shards[i];
        s->tes = malloc(initial * sizeof *s->tes);
        if (!s->tes || pthread_mutex_init(&s->lock, NULL) != 0) {
            free(s->tes);
            t->nshards = i;
            tr_free(t);
            return NULL;
        }
        s->cap = initial;
        s->granule[0] = s->granule[1] = 1;
        atomic_init(&s->inflight[0], 0);
        atomic_init(&s->inflight[1], 0);
    }
    return t;
}

void tr_free(struct tracker *t)
{
    for (size_t i = 0; i < t->nshards; i++) {
        pthread_mutex_destroy(&t->shards[i].lock);
        free(t->shards[i].tes);
    }
    free(t->shards);
    free(t);
}

/* ---- folding ---------------------------------------------------------- */

static uint64_t te_end(const struct tr_te *e)
{
    return e->offset + e->length;
}

static int cmp_u64(uint64_t a, uint64_t b)
{
    return (a > b) - (a < b);
}

static int cmp_fold_key(const void *pa, const void *pb)
{
    const struct tr_te *a = pa, *b = pb;
    int r = cmp_u64(a->dev, b->dev);
    if (!r)
        r = cmp_u64(a->kind, b->kind);
    if (!r)
        r = cmp_u64(a->cycle, b->cycle);
    return r ? r : cmp_u64(a->offset, b->offset);
}

static int same_key(const struct tr_te *a, const struct tr_te *b)
{
    return a->dev == b->dev && a->kind == b->kind && a->cycle == b->cycle;
}

/* Merges overlapping or adjacent TEs of the array sorted by cmp_fold_key. */
static void merge_sorted(struct shard *s)
{
    size_t out = 0;
    for (size_t i = 0; i < s->n; i++) {
        struct tr_te *prev = out ? &s->tes[out - 1] : NULL;
        const struct tr_te *e = &s->tes[i];
        if (prev && same_key(prev, e) && e->offset <= te_end(prev)) {
            uint64_t end = te_end(e) > te_end(prev) ? te_end(e) : te_end(prev);
            prev->length = end - prev->offset;
            s->folded[e->cycle & 1] = 1;
        } else {
            s->tes[out++] = *e;
        }
    }
    s->n = out;
}

static uint64_t round_up(uint64_t x, uint64_t g)
{
    uint64_t down = x & ~(g - 1);
    if (down == x)
        return x;
    return down + g < down ? UINT64_MAX : down + g;
}

/* Widens every TE to granule g; zero and trim TEs become data TEs. */
static void coarsen(struct shard *s, uint64_t g)
{
    int kind_changed = 0;
    s->coarsenings++;
    for (size_t i = 0; i < s->n; i++) {
        struct tr_te *e = &s->tes[i];
        uint64_t end = round_up(te_end(e), g);
        e->offset &= ~(g - 1);
        e->length = end - e->offset;
        kind_changed |= e->kind != TR_KIND_DATA;
        e->kind = TR_KIND_DATA;
        s->folded[e->cycle & 1] = 1;
        if (s->granule[e->cycle & 1] < g)
            s->granule[e->cycle & 1] = g;
    }
    /* Rounding is monotone, so only a change of kind can break the order. */
    if (kind_changed)
        qsort(s->tes, s->n, sizeof *s->tes, cmp_fold_key);
    merge_sorted(s);
}

static void fold(struct shard *s)
{
    s->folds++;
    qsort(s->tes, s->n, sizeof *s->tes, cmp_fold_key);
    merge_sorted(s);
    for (uint64_t g = FIRST_GRANULE; g != 0 && s->n > s->cap / 2; g <<= 1)
        coarsen(s, g);
}

static int resize(struct shard *s, size_t cap)
{
    struct tr_te *tes;
    if (cap > SIZE_MAX / sizeof *tes)
        return -1;
    tes = realloc(s->tes, cap * sizeof *tes);
    if (!tes)
        return -1;
    s->tes = tes;
    s->cap = cap;
    return 0;
}

/* Makes room for one TE in a full shard: grow, else fold, else overrun the cap. */
static int make_room(const struct tracker *t, struct shard *s)
{
    size_t grown = s->cap * 2 < t->share ? s->cap * 2 : t->share;
    if (s->cap < t->share && resize(s, grown) == 0)
        return TR_OK;
    fold(s);
    if (s->n <= s->cap / 2)
        return TR_OK;
    if (resize(s, s->cap * 2) == 0) {
        s->over_cap++;
        return TR_OK;
    }
    return s->n < s->cap ? TR_OK : TR_ENOMEM;
}

/* ---- recording -------------------------------------------------------- */

static struct shard *cpu_shard(const struct tracker *t)
{
    int cpu = sched_getcpu();
    return &t->shards[cpu < 0 ? 0 : (size_t)cpu % t->nshards];
}

static int check_te(int64_t dev, int64_t kind, uint64_t offset, uint64_t length)
{
    if (length < 1)
        return TR_ELENGTH;
    if (kind < TR_KIND_DATA || kind > TR_KIND_TRIM)
        return TR_EKIND;
    if (dev < 0 || dev > UINT16_MAX)
        return TR_EDEV;
    if (offset > UINT64_MAX - length)
        return TR_EOVERFLOW;
    return TR_OK;
}

/*
 * Fills te from a write; its cycle is set when it is appended.  Returns
 * check_te's code.
 */
static int make_te(struct tr_te *te, int64_t dev, int64_t kind, uint64_t offset,
                   uint64_t length)
{
    int rc = check_te(dev, kind, offset, length);
    if (rc != TR_OK)
        return rc;
    memset(te, 0, sizeof *te);
    te->offset = offset;
    te->length = length;
    te->dev = (uint16_t)dev;
    te->kind = (uint8_t)kind;
    return TR_OK;
}

/*
 * Locks s with room for one more TE; returns TR_OK with the lock held, or an
 * error without it.  Without wait it only try-locks and never makes room, so
 * it takes O(1) and cannot block: TR_EWOULDBLOCK if s is locked or full.  With
 * wait it blocks on the lock and makes room, which may fold (O(n log n)).
 */
static int lock_room(const struct tracker *t, struct shard *s, int wait)
{
    int rc;
    if (!wait) {
        if (pthread_mutex_trylock(&s->lock) != 0)
            return TR_EWOULDBLOCK;
        if (s->n < s->cap)
            return TR_OK;
        pthread_mutex_unlock(&s->lock);
        return TR_EWOULDBLOCK;
    }
    pthread_mutex_lock(&s->lock);
    rc = s->n < s->cap ? TR_OK : make_room(t, s);
    if (rc != TR_OK)
        pthread_mutex_unlock(&s->lock);
    return rc;
}

static uint64_t begin_on(struct tracker *t, struct shard *s)
{
    for (;;) {
        uint64_t c = atomic_load(&t->cycle);
        atomic_fetch_add(&s->inflight[c & 1], 1);
        if (atomic_load(&t->cycle) == c)
            return c;
        atomic_fetch_sub(&s->inflight[c & 1], 1);
    }
}

uint64_t tr_begin(struct tracker *t)
{
    return begin_on(t, cpu_shard(t));
}

static int cycle_live(struct tracker *t, uint64_t cycle)
{
    return cycle == atomic_load(&t->cycle) || cycle + 1 == atomic_load(&t->draining1);
}

/*
 * The TE is appended under the shard lock before the write stops counting as
 * in flight, so a drain that sees the count reach zero finds the TE.  A
 * TR_EWOULDBLOCK return changed nothing: the write is still in flight.
 */
static int end_write(struct tracker *t, uint64_t cycle, int64_t dev, int64_t kind,
                     uint64_t offset, uint64_t length, int wait)
{
    struct tr_te te;
    struct shard *s;
    int rc;
    if (!cycle_live(t, cycle))
        return TR_ECYCLE;
    s = cpu_shard(t);
    rc = make_te(&te, dev, kind, offset, length);
    if (rc == TR_OK) {
        rc = lock_room(t, s, wait);
        if (rc == TR_EWOULDBLOCK)
            return rc;
        if (rc == TR_OK) {
            te.cycle = (uint32_t)cycle; /* unambiguous: only cycles c and c+1 are live */
            s->tes[s->n++] = te;
            pthread_mutex_unlock(&s->lock);
        }
    }
    atomic_fetch_sub(&s->inflight[cycle & 1], 1);
    return rc;
}

/*
 * begin() + end() in one: the write is counted in flight in the cycle its TE
 * is tagged with until the TE is appended, as in end_write.
 */
static int record_write(struct tracker *t, int64_t dev, int64_t kind, uint64_t offset,
                        uint64_t length, int wait)
{
    struct tr_te te;
    struct shard *s;
    uint64_t c;
    int rc = make_te(&te, dev, kind, offset, length);
    if (rc != TR_OK)
        return rc;
    s = cpu_shard(t);
    rc = lock_room(t, s, wait);
    if (rc != TR_OK)
        return rc;
    c = begin_on(t, s);
    te.cycle = (uint32_t)c;
    s->tes[s->n++] = te;
    pthread_mutex_unlock(&s->lock);
    atomic_fetch_sub(&s->inflight[c & 1], 1);
    return TR_OK;
}

int tr_end(struct tracker *t, uint64_t cycle, int64_t dev, int64_t kind,
           uint64_t offset, uint64_t length)
{
    return end_write(t, cycle, dev, kind, offset, length, 0);
}

int tr_record(struct tracker *t, int64_t dev, int64_t kind, uint64_t offset, uint64_t length)
{
    return record_write(t, dev, kind, offset, length, 0);
}

/*
 * The waiting variants, for the caller to use after tr_end or tr_record
 * returned TR_EWOULDBLOCK.  Static and absent from shards.h, so that cffi does
 * not expose them: Python may only reach them through _build.py's wrappers,
 * which give up the GIL first.
 */
static int tr_end_wait(struct tracker *t, uint64_t cycle, int64_t dev, int64_t kind,
                       uint64_t offset, uint64_t length)
{
    return end_write(t, cycle, dev, kind, offset, length, 1);
}

static int tr_record_wait(struct tracker *t, int64_t dev, int64_t kind, uint64_t offset,
                          uint64_t length)
{
    return record_write(t, dev, kind, offset, length, 1);
}

int tr_abort(struct tracker *t, uint64_t cycle)
{
    if (!cycle_live(t, cycle))
        return TR_ECYCLE;
    atomic_fetch_sub(&cpu_shard(t)->inflight[cycle & 1], 1);
    return TR_OK;
}

/* ---- cycle switch ----------------------------------------------------- */

uint64_t tr_cycle(struct tracker *t)
{
    return atomic_load(&t->cycle);
}

uint64_t tr_draining1(struct tracker *t)
{
    return atomic_load(&t->draining1);
}

static int64_t inflight_sum(struct tracker *t, unsigned parity)
{
    int64_t sum = 0;
    for (size_t i = 0; i < t->nshards; i++)
        sum += atomic_load(&t->shards[i].inflight[parity]);
    return sum;
}

int64_t tr_inflight(struct tracker *t)
{
    return inflight_sum(t, 0) + inflight_sum(t, 1);
}

uint64_t tr_close(struct tracker *t)
{
    uint64_t d = atomic_load(&t->draining1);
    uint64_t c;
    if (d)
        return d - 1;
    c = atomic_load(&t->cycle);
    atomic_store(&t->draining1, c + 1); /* before the switch, so end(c) stays valid */
    atomic_store(&t->cycle, c + 1);
    return c;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int64_t tr_drain(struct tracker *t, uint64_t c, double timeout)
{
    double deadline = now() + timeout;
    long nap = 20000;
    int64_t left;
    while ((left = inflight_sum(t, c & 1)) > 0 && now() < deadline) {
        struct timespec ts = {0, nap};
        nanosleep(&ts, NULL);
        nap = nap < 1000000 ? nap * 2 : nap;
    }
    return left > 0 ? left : 0;
}

/* ---- detaching a drained cycle ---------------------------------------- */

static int cmp_report_key(const void *pa, const void *pb)
{
    const struct tr_te *a = pa, *b = pb;
    int r = cmp_u64(a->dev, b->dev);
    if (!r)
        r = cmp_u64(a->kind, b->kind);
    return r ? r : cmp_u64(a->offset, b->offset);
}

static size_t count_cycle(struct tracker *t, uint32_t tag)
{
    size_t m = 0;
    for (size_t i = 0; i < t->nshards; i++) {
        struct shard *s = &t->shards[i];
        pthread_mutex_lock(&s->lock);
        for (size_t j = 0; j < s->n; j++)
            m += s->tes[j].cycle == tag;
        pthread_mutex_unlock(&s->lock);
    }
    return m;
}

static void shrink_if_sparse(const struct tracker *t, struct shard *s)
{
    if (s->cap > t->initial && s->n <= s->cap / 4)
        resize(s, s->cap / 2 > t->initial ? s->cap / 2 : t->initial);
}

/* Moves up to room of the shard's TEs of the cycle to out; returns how many. */
static size_t take_cycle(const struct tracker *t, struct shard *s, uint32_t tag,
                         struct tr_te *out, size_t room, struct tr_closed *cl)
{
    size_t m = 0, keep = 0;
    unsigned p = tag & 1;
    for (size_t j = 0; j < s->n; j++) {
        if (s->tes[j].cycle == tag && m < room)
            out[m++] = s->tes[j];
        else
            s->tes[keep++] = s->tes[j];
    }
    s->n = keep;
    cl->folded |= s->folded[p];
    cl->granule = s->granule[p] > cl->granule ? s->granule[p] : cl->granule;
    s->folded[p] = 0;
    s->granule[p] = 1;
    shrink_if_sparse(t, s);
    return m;
}

/* Fills pairs and groups from TEs sorted by (dev, kind, offset). */
static void build_report_input(struct tr_closed *cl, const struct tr_te *tes)
{
    for (size_t i = 0; i < cl->count; i++) {
        const struct tr_te *e = &tes[i];
        struct tr_group *g = cl->ngroups ? &cl->groups[cl->ngroups - 1] : NULL;
        if (!g || g->dev != e->dev || g->kind != e->kind) {
            g = &cl->groups[cl->ngroups++];
            g->dev = e->dev;
            g->kind = e->kind;
            g->start = i;
            g->n = 0;
        }
        g->n++;
        cl->pairs[2 * i] = e->offset;
        cl->pairs[2 * i + 1] = e->length;
        cl->bytes_lo += e->length;
        cl->bytes_hi += cl->bytes_lo < e->length;
    }
}

void tr_closed_free(struct tr_closed *cl)
{
    if (!cl)
        return;
    free(cl->pairs);
    free(cl->groups);
    free(cl);
}

static struct tr_closed *closed_alloc(uint64_t c, size_t m)
{
    struct tr_closed *cl = calloc(1, sizeof *cl);
    size_t slots = m ? m : 1;
    if (!cl)
        return NULL;
    cl->cycle = c;
    cl->granule = 1;
    cl->pairs = slots <= SIZE_MAX / 16 ? malloc(slots * 16) : NULL;
    cl->groups = calloc(slots, sizeof *cl->groups);
    if (!cl->pairs || !cl->groups) {
        tr_closed_free(cl);
        return NULL;
    }
    return cl;
}

/*
 * Everything is allocated before the first TE leaves a shard, so a failed
 * allocation loses nothing and the call can be repeated.  Concurrent folds
 * can only shrink the cycle's TE count between counting and taking, and no
 * new TE of a drained cycle can arrive.
 */
struct tr_closed *tr_detach(struct tracker *t, uint64_t c)
{
    uint32_t tag = (uint32_t)c;
    size_t m = count_cycle(t, tag);
    struct tr_closed *cl = closed_alloc(c, m);
    struct tr_te *tes = malloc((m ? m : 1) * sizeof *tes);
    if (!cl || !tes) {
        tr_closed_free(cl);
        free(tes);
        return NULL;
    }
    for (size_t i = 0; i < t->nshards; i++) {
        struct shard *s = &t->shards[i];
        pthread_mutex_lock(&s->lock);
        cl->count += take_cycle(t, s, tag, tes + cl->count, m - cl->count, cl);
        pthread_mutex_unlock(&s->lock);
    }
    atomic_store(&t->draining1, 0);
    qsort(tes, cl->count, sizeof *tes, cmp_report_key);
    build_report_input(cl, tes);
    free(tes);
    return cl;
}

/* ---- statistics ------------------------------------------------------- */

void tr_stats(struct tracker *t, struct tr_stats *st)
{
    memset(st, 0, sizeof *st);
    st->granule = 1;
    for (size_t i = 0; i < t->nshards; i++) {
        struct shard *s = &t->shards[i];
        pthread_mutex_lock(&s->lock);
        st->entries += s->n;
        st->capacity += s->cap;
        st->folds += s->folds;
        st->coarsenings += s->coarsenings;
        st->over_cap += s->over_cap;
        for (int p = 0; p < 2; p++)
            st->granule = s->granule[p] > st->granule ? s->granule[p] : st->granule;
        pthread_mutex_unlock(&s->lock);
    }
}
