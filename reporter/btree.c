/*
 * The report: a merging B-tree of reporting entries (US 12,393,603 claims 5-11, FIG. 7).
 *
 * Theory of operation
 * -------------------
 * Every node holds up to `order` (N) REs sorted by offset; an internal node with n REs
 * has n + 1 children, and the REs of child i lie strictly between RE i-1 and RE i.
 * All leaves sit at the same depth.  Every node but the root holds at least
 * min = floor(N/2) REs.  The REs are kept disjoint and non-adjacent, so ordering them
 * by offset also orders them by end, and "first RE whose end >= x" is a binary search.
 * An RE is stored as the half-open range [off, end) with length end - off; the public
 * contract keeps off + length <= 2^64 - 1, so no end ever overflows and the touch test
 * (overlap or adjoin, claim 5) needs no additions: RE touches [s, e] iff
 * RE.end >= s && RE.off <= e.
 *
 * Insert of a TE [s, e) descends from the root.  In each node the only RE that can
 * touch the TE is the first one whose end >= s; if it does not touch, every RE that
 * could touch lies in the child between that RE and its predecessor.  So one descent
 * either finds the highest RE touching the TE (the anchor) or reaches the leaf where a
 * new RE belongs.
 *
 *  - No anchor (claims 7-9): the RE goes into the leaf.  A node that overflows to N + 1
 *    REs (each node has one spare slot for that moment) is split: RE m moves up to the
 *    parent, REs below m stay, REs above m go to a new peer node.  A root split makes a
 *    new root, the only way the tree grows taller.  m is N/2 ("count", claim 9), or for
 *    the "range" policy the RE that straddles the midpoint of the node's address span,
 *    clamped to [min, N - min] so that both halves keep at least min REs.  With
 *    N + 1 REs that clamp leaves a choice only for odd N, where floor and ceil differ.
 *    Every node a split chain needs is allocated before the tree is touched, so an
 *    out-of-memory error leaves the tree as it was.
 *
 *  - Anchor found (claims 6, 10, 11): the anchor is expanded to span the TE and every
 *    RE that touches the grown span.  Those REs form a contiguous run in key order
 *    around the anchor, wherever they sit in the tree (peers in its node, its
 *    descendants, other subtrees), so they are swallowed one by one: look up the
 *    in-order predecessor (successor) of the anchor's key, and while it touches the
 *    span, widen the span and erase it.  The left side is only searched when the TE
 *    starts before the anchor and the right side only when it ends after it, so the
 *    common "TE inside or at the edge of an RE" case costs one descent.  Each erase is
 *    a standard B-tree delete: an internal RE is replaced by its in-order predecessor
 *    from a leaf; an under-full node borrows from a sibling with spare REs or is joined
 *    with a sibling and their separator ((min-1) + 1 + min = 2 min <= N REs, valid for
 *    every N >= 2); an empty root is dropped (FIG. 7, state 80-5).  Erasing moves REs
 *    between nodes, so the anchor is looked up again by its (unchanged) key before it
 *    is rewritten.  The new span touches nothing else, so the anchor's place in the
 *    order is still right.
 *
 * Every RE is created once and erased at most once, so an insert costs O(log n) plus
 * O(log n) per RE it swallows.  The tree holds no pointer to its parent: operations
 * that must walk back up record their descent in a path on the stack.  The height of
 * a tree with n REs is at most log2(n) + 1 < RB_MAX_HEIGHT (root with >= 2 children,
 * others with >= min + 1 >= 2).
 *
 * A batch is merged in chunks of RB_SORT_CHUNK TEs, each radix-sorted by offset first.
 * The union does not depend on the order of the TEs, but the cost does: in key order,
 * consecutive TEs walk the same path and hit nodes already in cache, which roughly
 * halves the time of a random batch.  Chunks rather than the whole batch, because
 * ascending inserts into a sparse region split only the rightmost leaf and leave every
 * other leaf half full; with chunks, later chunks fill the leaves earlier ones left
 * (measured: the same ~69 % fill as arrival order at order 32, against 50 % for one
 * sorted batch).
 */
#include "btree.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RB_MAX_HEIGHT 72
#define RB_MAX_ORDER 65536u
#ifndef RB_SORT_CHUNK
#define RB_SORT_CHUNK 65536u /* TEs per sorted chunk: 1 MiB of pairs + 1 MiB scratch */
#endif

struct re {
    uint64_t off, end;
};

struct node {
    unsigned n;
    struct node **kid; /* NULL in a leaf; else n + 1 children, in the same block */
    struct re re[];    /* order + 1 slots: the spare one holds the overflow before a split */
};

struct step {
    struct node *node;
    unsigned idx; /* child taken in an internal node; RE position in a leaf */
};

struct rb_tree {
    struct node *root;
    unsigned order, min, height;
    int split;
    size_t count, nodes, mem;
    uint64_t covered;
};

static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max64(uint64_t a, uint64_t b) { return a > b ? a : b; }

/* ---- nodes ---------------------------------------------------------------- */

static size_t kid_offset(unsigned order)
{
    size_t at = sizeof(struct node) + ((size_t)order + 1) * sizeof(struct re);
    size_t align = sizeof(struct node *);
    return (at + align - 1) / align * align;
}

size_t rb_node_bytes(unsigned order, int leaf)
{
    if (leaf)
        return sizeof(struct node) + ((size_t)order + 1) * sizeof(struct re);
    return kid_offset(order) + ((size_t)order + 2) * sizeof(struct node *);
}

static struct node *node_new(struct rb_tree *t, int leaf)
{
    size_t bytes = rb_node_bytes(t->order, leaf);
    struct node *x = malloc(bytes);
    if (!x)
        return NULL;
    x->n = 0;
    x->kid = leaf ? NULL : (struct node **)(void *)((char *)x + kid_offset(t->order));
    t->nodes++;
    t->mem += bytes;
    return x;
}

static void node_free(struct rb_tree *t, struct node *x)
{
    t->nodes--;
    t->mem -= rb_node_bytes(t->order, x->kid == NULL);
    free(x);
}

static void subtree_free(struct rb_tree *t, struct node *x)
{
    if (x->kid)
        for (unsigned i = 0; i <= x->n; i++)
            subtree_free(t, x->kid[i]);
    node_free(t, x);
}

/* ---- searching inside one node --------------------------------------------- */

static int below(const struct re *r, uint64_t key, int by_end)
{
    return (by_end ? r->end : r->off) < key;
}

/*
 * First RE in x not below key (by offset or by end; both ascend).  Branch-free: the
 * compiler emits conditional moves, because TE offsets are random and a branching
 * binary search mispredicts about every other probe.  base[0 .. len] always brackets
 * the answer.
 */
static unsigned bound(const struct node *x, uint64_t key, int by_end)
{
    const struct re *base = x->re;
    unsigned len = x->n;
    if (len == 0)
        return 0;
    while (len > 1) {
        unsigned half = len / 2;
        base = below(&base[half], key, by_end) ? base + half : base;
        len -= half;
    }
    return (unsigned)(base - x->re) + (unsigned)below(base, key, by_end);
}

/* The only RE in x that can touch a range starting at key. */
static unsigned lower_end(const struct node *x, uint64_t key) { return bound(x, key, 1); }

static unsigned lower_off(const struct node *x, uint64_t key) { return bound(x, key, 0); }

/* ---- searching the tree ----------------------------------------------------- */

/* Depth of the anchor (path[depth] names it), or -1 with path ending at the leaf slot. */
static int descend(const struct rb_tree *t, uint64_t s, uint64_t e, struct step *path)
{
    struct node *x = t->root;
    for (int d = 0;; d++) {
        unsigned i = lower_end(x, s);
        path[d].node = x;
        path[d].idx = i;
        if (i < x->n && x->re[i].off <= e)
            return d;
        if (!x->kid)
            return -1;
        x = x->kid[i];
    }
}

static struct re *find(const struct rb_tree *t, uint64_t key)
{
    struct node *x = t->root;
    for (;;) {
        unsigned i = lower_off(x, key);
        if (i < x->n && x->re[i].off == key)
            return &x->re[i];
        x = x->kid[i];
    }
}

/* The RE just before (after) `key` in key order; the deepest candidate is the closest.
 * `key` is an RE's offset, which is < 2^64 - 1, so key + 1 cannot wrap. */
static int before(const struct rb_tree *t, uint64_t key, struct re *out)
{
    int found = 0;
    for (const struct node *x = t->root; x;) {
        unsigned i = lower_off(x, key);
        if (i > 0) {
            *out = x->re[i - 1];
            found = 1;
        }
        x = x->kid ? x->kid[i] : NULL;
    }
    return found;
}

static int after(const struct rb_tree *t, uint64_t key, struct re *out)
{
    int found = 0;
    for (const struct node *x = t->root; x;) {
        unsigned i = lower_off(x, key + 1);
        if (i < x->n) {
            *out = x->re[i];
            found = 1;
        }
        x = x->kid ? x->kid[i] : NULL;
    }
    return found;
}

/* ---- growing: new RE, splits -------------------------------------------------- */

/* Put `r` at position i and, in an internal node, `right` as the child after it. */
static void node_put(struct node *x, unsigned i, struct re r, struct node *right)
{
    memmove(x->re + i + 1, x->re + i, (x->n - i) * sizeof *x->re);
    x->re[i] = r;
    if (x->kid) {
        memmove(x->kid + i + 2, x->kid + i + 1, (x->n - i) * sizeof *x->kid);
        x->kid[i + 1] = right;
    }
    x->n++;
}

static unsigned split_point(const struct rb_tree *t, const struct node *x)
{
    unsigned m = t->order / 2;
    if (t->split == RB_SPLIT_RANGE) {
        uint64_t lo = x->re[0].off, hi = x->re[t->order].end;
        m = lower_end(x, lo + (hi - lo) / 2 + 1);
        if (m < t->min)
            m = t->min;
        if (m > t->order - t->min)
            m = t->order - t->min;
    }
    return m;
}

/* Split the overflowing node x (order + 1 REs) into x and `peer`; return the RE to promote. */
static struct re split(const struct rb_tree *t, struct node *x, struct node *peer)
{
    unsigned m = split_point(t, x), moved = t->order - m;
    memcpy(peer->re, x->re + m + 1, moved * sizeof *x->re);
    if (x->kid)
        memcpy(peer->kid, x->kid + m + 1, (moved + 1) * sizeof *x->kid);
    peer->n = moved;
    x->n = m;
    return x->re[m];
}

/* Nodes a new RE at the end of `path` will need: a peer per full node, maybe a root. */
static unsigned nodes_needed(const struct rb_tree *t, const struct step *path)
{
    unsigned full = 0;
    while (full < t->height && path[t->height - 1 - full].node->n == t->order)
        full++;
    return full + (full == t->height);
}

static int reserve(struct rb_tree *t, struct node **spare, unsigned need)
{
    for (unsigned j = 0; j < need; j++) {
        spare[j] = node_new(t, j == 0);
        if (!spare[j]) {
            while (j-- > 0)
                node_free(t, spare[j]);
            return RB_ENOMEM;
        }
    }
    return RB_OK;
}

static void new_root(struct rb_tree *t, struct node *root, struct node *left,
                     struct re r, struct node *right)
{
    root->re[0] = r;
    root->kid[0] = left;
    root->kid[1] = right;
    root->n = 1;
    t->root = root;
    t->height++;
}

static void note_new(struct rb_tree *t, struct re r)
{
    t->count++;
    t->covered += r.end - r.off;
}

static int plant(struct rb_tree *t, struct re r)
{
    struct node *leaf = node_new(t, 1);
    if (!leaf)
        return RB_ENOMEM;
    leaf->re[0] = r;
    leaf->n = 1;
    t->root = leaf;
    t->height = 1;
    note_new(t, r);
    return RB_OK;
}

static int grow(struct rb_tree *t, const struct step *path, struct re r)
{
    struct node *spare[RB_MAX_HEIGHT + 1];
    unsigned need = nodes_needed(t, path), used = 0, d = t->height - 1;
    if (need > t->height && t->height == RB_MAX_HEIGHT)
        return RB_ENOMEM;
    if (reserve(t, spare, need) != RB_OK)
        return RB_ENOMEM;
    note_new(t, r);
    node_put(path[d].node, path[d].idx, r, NULL);
    while (path[d].node->n > t->order) {
        struct node *peer = spare[used++];
        struct re up = split(t, path[d].node, peer);
        if (d == 0) {
            new_root(t, spare[used], path[0].node, up, peer);
            break;
        }
        d--;
        node_put(path[d].node, path[d].idx, up, peer);
    }
    return RB_OK;
}

/* ---- shrinking: erase, borrow, join ------------------------------------------------ */

static void rotate_right(struct node *p, unsigned k)
{
    struct node *l = p->kid[k], *r = p->kid[k + 1];
    memmove(r->re + 1, r->re, r->n * sizeof *r->re);
    r->re[0] = p->re[k];
    p->re[k] = l->re[l->n - 1];
    if (r->kid) {
        memmove(r->kid + 1, r->kid, (r->n + 1) * sizeof *r->kid);
        r->kid[0] = l->kid[l->n];
    }
    r->n++;
    l->n--;
}

static void rotate_left(struct node *p, unsigned k)
{
    struct node *l = p->kid[k], *r = p->kid[k + 1];
    l->re[l->n] = p->re[k];
    p->re[k] = r->re[0];
    memmove(r->re, r->re + 1, (r->n - 1) * sizeof *r->re);
    if (l->kid) {
        l->kid[l->n + 1] = r->kid[0];
        memmove(r->kid, r->kid + 1, r->n * sizeof *r->kid);
    }
    l->n++;
    r->n--;
}

/* Fold child k + 1 and the separator k into child k. */
static void join(struct rb_tree *t, struct node *p, unsigned k)
{
    struct node *l = p->kid[k], *r = p->kid[k + 1];
    l->re[l->n] = p->re[k];
    memcpy(l->re + l->n + 1, r->re, r->n * sizeof *r->re);
    if (l->kid)
        memcpy(l->kid + l->n + 1, r->kid, (r->n + 1) * sizeof *r->kid);
    l->n += r->n + 1;
    memmove(p->re + k, p->re + k + 1, (p->n - k - 1) * sizeof *p->re);
    memmove(p->kid + k + 1, p->kid + k + 2, (p->n - k - 1) * sizeof *p->kid);
    p->n--;
    node_free(t, r);
}

/* Child ci of p is one RE short: borrow from a sibling that can spare one, else join. */
static void refill(struct rb_tree *t, struct node *p, unsigned ci)
{
    if (ci > 0 && p->kid[ci - 1]->n > t->min)
        rotate_right(p, ci - 1);
    else if (ci < p->n && p->kid[ci + 1]->n > t->min)
        rotate_left(p, ci);
    else
        join(t, p, ci > 0 ? ci - 1 : ci);
}

static void rebalance(struct rb_tree *t, const struct step *path, unsigned d)
{
    struct node *root;
    for (; d > 0 && path[d].node->n < t->min; d--)
        refill(t, path[d - 1].node, path[d - 1].idx);
    root = t->root;
    if (root->n == 0) {
        t->root = root->kid ? root->kid[0] : NULL;
        node_free(t, root);
        t->height--;
    }
}

/* Unlink the last RE of the rightmost leaf under path[d]'s child, recording the way down. */
static struct re pop_max(struct step *path, unsigned *d)
{
    struct node *y = path[*d].node->kid[path[*d].idx];
    while (y->kid) {
        ++*d;
        path[*d].node = y;
        path[*d].idx = y->n;
        y = y->kid[y->n];
    }
    ++*d;
    path[*d].node = y;
    return y->re[--y->n];
}

static void erase(struct rb_tree *t, uint64_t key)
{
    struct step path[RB_MAX_HEIGHT];
    struct node *x = t->root;
    struct re *hit;
    unsigned d = 0, i;
    for (;; d++) {
        i = lower_off(x, key);
        path[d].node = x;
        path[d].idx = i;
        if (i < x->n && x->re[i].off == key)
            break;
        x = x->kid[i];
    }
    hit = &x->re[i];
    t->count--;
    t->covered -= hit->end - hit->off;
    if (x->kid) {
        *hit = pop_max(path, &d);
    } else {
        memmove(hit, hit + 1, (x->n - i - 1) * sizeof *hit);
        x->n--;
    }
    rebalance(t, path, d);
}

/* ---- merging ------------------------------------------------------------------------ */

static int swallow_left(struct rb_tree *t, uint64_t key, struct re *span)
{
    struct re p;
    int erased = 0;
    while (before(t, key, &p) && p.end >= span->off) {
        erase(t, p.off);
        span->off = min64(span->off, p.off);
        erased = 1;
    }
    return erased;
}

static int swallow_right(struct rb_tree *t, uint64_t key, struct re *span)
{
    struct re q;
    int erased = 0;
    while (after(t, key, &q) && q.off <= span->end) {
        erase(t, q.off);
        span->end = max64(span->end, q.end);
        erased = 1;
    }
    return erased;
}

static void merge(struct rb_tree *t, struct re *anchor, uint64_t s, uint64_t e)
{
    struct re old = *anchor;
    struct re span = {min64(s, old.off), max64(e, old.end)};
    int erased = 0;
    if (s < old.off)
        erased |= swallow_left(t, old.off, &span);
    if (e > old.end)
        erased |= swallow_right(t, old.off, &span);
    if (erased)
        anchor = find(t, old.off);
    t->covered = t->covered - (old.end - old.off) + (span.end - span.off);
    *anchor = span;
}

static int insert_one(struct rb_tree *t, uint64_t s, uint64_t e)
{
    struct step path[RB_MAX_HEIGHT];
    int d;
    if (!t->root)
        return plant(t, (struct re){s, e});
    d = descend(t, s, e, path);
    if (d < 0)
        return grow(t, path, (struct re){s, e});
    merge(t, &path[d].node->re[path[d].idx], s, e);
    return RB_OK;
}

/* ---- public entry points -------------------------------------------------------- */

struct rb_tree *rb_new(unsigned order, int split)
{
    struct rb_tree *t;
    if (order < 2 || order > RB_MAX_ORDER)
        return NULL;
    if (split != RB_SPLIT_COUNT && split != RB_SPLIT_RANGE)
        return NULL;
    t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->order = order;
    t->min = order / 2;
    t->split = split;
    return t;
}

void rb_clear(struct rb_tree *t)
{
    if (t->root)
        subtree_free(t, t->root);
    t->root = NULL;
    t->height = 0;
    t->count = 0;
    t->covered = 0;
}

void rb_free(struct rb_tree *t)
{
    if (!t)
        return;
    rb_clear(t);
    free(t);
}

static int validate(uint64_t off, uint64_t len)
{
    if (len == 0)
        return RB_EZERO;
    if (off > UINT64_MAX - len)
        return RB_EOVERFLOW;
    return RB_OK;
}

int rb_insert(struct rb_tree *t, uint64_t off, uint64_t len)
{
    int rc = validate(off, len);
    return rc != RB_OK ? rc : insert_one(t, off, off + len);
}

/* at[d] = where the first pair whose offset has digit d (at `shift`) goes. */
static void digit_starts(const uint64_t *a, size_t n, unsigned shift, size_t *at)
{
    size_t sum = 0;
    memset(at, 0, 256 * sizeof *at);
    for (size_t i = 0; i < n; i++)
        at[(a[2 * i] >> shift) & 0xff]++;
    for (size_t d = 0; d < 256; d++) {
        size_t c = at[d];
        at[d] = sum;
        sum += c;
    }
}

static void scatter(const uint64_t *a, uint64_t *to, size_t n, unsigned shift, size_t *at)
{
    for (size_t i = 0; i < n; i++) {
        size_t j = at[(a[2 * i] >> shift) & 0xff]++;
        to[2 * j] = a[2 * i];
        to[2 * j + 1] = a[2 * i + 1];
    }
}

/* LSD radix sort of n (off, len) pairs by off, 8 bits a pass, skipping the digits in
 * which all offsets agree.  Ping-pongs between a and spare; returns the sorted copy. */
static uint64_t *sort_pairs(uint64_t *a, uint64_t *spare, size_t n)
{
    uint64_t all = UINT64_MAX, any = 0;
    size_t at[256];
    for (size_t i = 0; i < n; i++) {
        all &= a[2 * i];
        any |= a[2 * i];
    }
    for (unsigned shift = 0; shift < 64; shift += 8) {
        uint64_t *sorted = spare;
        if ((((all ^ any) >> shift) & 0xff) == 0)
            continue;
        digit_starts(a, n, shift, at);
        scatter(a, sorted, n, shift, at);
        spare = a;
        a = sorted;
    }
    return a;
}

static int insert_run(struct rb_tree *t, const uint64_t *pairs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (insert_one(t, pairs[2 * i], pairs[2 * i] + pairs[2 * i + 1]) != RB_OK)
            return RB_ENOMEM;
    return RB_OK;
}

/* Insert pairs[0 .. npairs) chunk by chunk, each sorted by offset first; on failure
 * *where is the first pair of the chunk that failed.  Without scratch memory the
 * pairs go in as they come. */
static int insert_sorted(struct rb_tree *t, const uint64_t *pairs, size_t npairs, size_t *where)
{
    size_t chunk = npairs < RB_SORT_CHUNK ? npairs : RB_SORT_CHUNK;
    uint64_t *scratch = malloc(4 * chunk * sizeof *scratch);
    int rc = RB_OK;
    if (!scratch) {
        *where = 0;
        return insert_run(t, pairs, npairs);
    }
    for (size_t i = 0; i < npairs && rc == RB_OK; i += chunk) {
        size_t n = npairs - i < chunk ? npairs - i : chunk;
        memcpy(scratch, pairs + 2 * i, 2 * n * sizeof *scratch);
        *where = i;
        rc = insert_run(t, sort_pairs(scratch, scratch + 2 * chunk, n), n);
    }
    free(scratch);
    return rc;
}

int rb_insert_batch(struct rb_tree *t, const uint64_t *pairs, size_t npairs, size_t *where)
{
    for (size_t i = 0; i < npairs; i++) {
        int rc = validate(pairs[2 * i], pairs[2 * i + 1]);
        if (rc != RB_OK) {
            *where = i;
            return rc;
        }
    }
    return insert_sorted(t, pairs, npairs, where);
}

size_t rb_count(const struct rb_tree *t) { return t->count; }
size_t rb_nodes(const struct rb_tree *t) { return t->nodes; }
unsigned rb_height(const struct rb_tree *t) { return t->height; }
size_t rb_memory(const struct rb_tree *t) { return sizeof *t + t->mem; }
uint64_t rb_covered(const struct rb_tree *t) { return t->covered; }

static uint64_t *walk(const struct node *x, uint64_t *out)
{
    for (unsigned i = 0; i <= x->n; i++) {
        if (x->kid)
            out = walk(x->kid[i], out);
        if (i < x->n) {
            *out++ = x->re[i].off;
            *out++ = x->re[i].end - x->re[i].off;
        }
    }
    return out;
}

/* Write the REs in key order as (offset, length) pairs into out[2 * count]. */
size_t rb_extents(const struct rb_tree *t, uint64_t *out)
{
    if (t->root)
        walk(t->root, out);
    return t->count;
}

/* ---- invariant audit ---------------------------------------------------------- */

struct audit {
    const struct rb_tree *t;
    char *msg;
    size_t cap, count, nodes, mem;
    uint64_t covered;
};

static int fail(struct audit *a, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->msg, a->cap, fmt, ap);
    va_end(ap);
    return -1;
}

static int audit_res(struct audit *a, const struct node *x, unsigned depth,
                     const struct re *lo, const struct re *hi)
{
    for (unsigned i = 0; i < x->n; i++) {
        const struct re *r = &x->re[i], *prev = i ? &x->re[i - 1] : lo;
        if (r->end <= r->off)
            return fail(a, "empty RE at offset %llu (depth %u)", (unsigned long long)r->off, depth);
        if (prev && prev->end >= r->off)
            return fail(a, "REs at %llu and %llu overlap, adjoin or are out of order (depth %u)",
                        (unsigned long long)prev->off, (unsigned long long)r->off, depth);
        a->covered += r->end - r->off;
    }
    if (hi && x->re[x->n - 1].end >= hi->off)
        return fail(a, "RE at %llu reaches the separator at %llu (depth %u)",
                    (unsigned long long)x->re[x->n - 1].off, (unsigned long long)hi->off, depth);
    return 0;
}

/* lo and hi are the REs just before and after this subtree in key order (or NULL). */
static int audit_node(struct audit *a, const struct node *x, unsigned depth,
                      const struct re *lo, const struct re *hi)
{
    const struct rb_tree *t = a->t;
    unsigned least = depth == 0 ? 1 : t->min;
    if (depth >= t->height)
        return fail(a, "node at depth %u but height is %u", depth, t->height);
    if ((x->kid == NULL) != (depth == t->height - 1))
        return fail(a, "%s at depth %u in a tree of height %u", x->kid ? "internal node" : "leaf",
                    depth, t->height);
    if (x->n < least || x->n > t->order)
        return fail(a, "node at depth %u holds %u REs, outside [%u, %u]", depth, x->n, least,
                    t->order);
    a->nodes++;
    a->count += x->n;
    a->mem += rb_node_bytes(t->order, x->kid == NULL);
    if (audit_res(a, x, depth, lo, hi))
        return -1;
    for (unsigned i = 0; x->kid && i <= x->n; i++) {
        if (!x->kid[i])
            return fail(a, "node at depth %u lacks child %u of %u", depth, i, x->n + 1);
        if (audit_node(a, x->kid[i], depth + 1, i ? &x->re[i - 1] : lo, i < x->n ? &x->re[i] : hi))
            return -1;
    }
    return 0;
}

static int audit_totals(struct audit *a)
{
    const struct rb_tree *t = a->t;
    if (a->count != t->count)
        return fail(a, "tree counts %zu REs but holds %zu", t->count, a->count);
    if (a->nodes != t->nodes)
        return fail(a, "tree counts %zu nodes but holds %zu", t->nodes, a->nodes);
    if (a->mem != t->mem)
        return fail(a, "tree counts %zu node bytes but holds %zu", t->mem, a->mem);
    if (a->covered != t->covered)
        return fail(a, "tree counts %llu bytes covered but holds %llu",
                    (unsigned long long)t->covered, (unsigned long long)a->covered);
    return 0;
}

/* 0 if every invariant holds; else -1 with a message in msg[cap]. */
int rb_check(const struct rb_tree *t, char *msg, size_t cap)
{
    struct audit a = {t, msg, cap, 0, 0, 0, 0};
    if (!t->root && t->height != 0)
        return fail(&a, "empty tree with height %u", t->height);
    if (t->root && audit_node(&a, t->root, 0, NULL, NULL))
        return -1;
    return audit_totals(&a);
}
