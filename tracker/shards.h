/*
 * Interface of shards.c.  _build.py hands this file verbatim to cffi's cdef,
 * so it holds only declarations cffi can parse (no preprocessor lines); it is
 * included once, by shards.c.
 */

enum {
    TR_KIND_DATA = 0,
    TR_KIND_ZERO = 1,
    TR_KIND_TRIM = 2
};

enum {
    TR_OK = 0,
    TR_ELENGTH = 1,
    TR_EKIND = 2,
    TR_EDEV = 3,
    TR_EOVERFLOW = 4,
    TR_ECYCLE = 5,
    TR_ENOMEM = 6,
    TR_EWOULDBLOCK = 7 /* tr_end/tr_record: the shard is locked or full; nothing changed */
};

/* One tracking entry: 24 bytes.  cycle holds the low 32 bits of the cycle id. */
struct tr_te {
    uint64_t offset;
    uint64_t length;
    uint32_t cycle;
    uint16_t dev;
    uint8_t kind;
};

/* The TEs of one (dev, kind) in a closed cycle: pairs[2*start .. 2*(start+n)). */
struct tr_group {
    uint64_t start;
    uint64_t n;
    uint16_t dev;
    uint8_t kind;
};

struct tr_closed {
    uint64_t cycle;
    uint64_t count;
    uint64_t bytes_lo;
    uint64_t bytes_hi;
    uint64_t granule;
    int folded;
    uint64_t ngroups;
    struct tr_group *groups;
    uint64_t *pairs;
};

struct tr_stats {
    uint64_t entries;
    uint64_t capacity;
    uint64_t folds;
    uint64_t coarsenings;
    uint64_t over_cap;
    uint64_t granule;
};

struct tracker;

struct tracker *tr_new(size_t nshards, size_t share, size_t initial, uint64_t first_cycle);
void tr_free(struct tracker *t);
uint64_t tr_begin(struct tracker *t);
int tr_end(struct tracker *t, uint64_t cycle, int64_t dev, int64_t kind,
           uint64_t offset, uint64_t length);
int tr_abort(struct tracker *t, uint64_t cycle);
int tr_record(struct tracker *t, int64_t dev, int64_t kind, uint64_t offset, uint64_t length);
uint64_t tr_cycle(struct tracker *t);
uint64_t tr_draining1(struct tracker *t);
int64_t tr_inflight(struct tracker *t);
uint64_t tr_close(struct tracker *t);
int64_t tr_drain(struct tracker *t, uint64_t c, double timeout);
struct tr_closed *tr_detach(struct tracker *t, uint64_t c);
void tr_closed_free(struct tr_closed *cl);
void tr_stats(struct tracker *t, struct tr_stats *st);
