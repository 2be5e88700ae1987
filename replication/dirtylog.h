/*
 * Interface of dirtylog.c.  _dirtylog_build.py hands this file verbatim to cffi's cdef, so it
 * holds only declarations cffi can parse (no preprocessor lines); it is included once, by
 * dirtylog.c.
 */

enum {
    DL_OK = 0,
    DL_EWOULDBLOCK = 1, /* dl_mark: a new mark, or a mark waiting for its msync: the wrapper
                           lets go of the GIL and calls the waiting variant */
    DL_ERANGE = 2,      /* a write outside its device, or an unknown device */
    DL_ESYNC = 3        /* the marks are set, but msync failed: they may not survive power loss */
};

struct dl_stats {
    uint64_t regions;         /* fine regions of all devices */
    uint64_t marked;          /* fine regions marked now */
    uint64_t extents;         /* extents (the coarse level) of all devices */
    uint64_t extents_marked;  /* extents marked now */
    uint64_t marks;           /* new extent marks since dl_new (each waited for an msync) */
    uint64_t syncs;           /* msync calls (each covers every extent marked before it) */
    uint64_t cleared;         /* fine marks cleared by dl_commit since dl_new */
    uint64_t sync_errors;
};

/* One level of marks for devices 0..ndev-1: device i has count[i] units of 2^shift bytes,
 * numbered from base[i]; its bitmap starts at byte `offset` of the mapped file. */
struct dl_level_spec {
    unsigned shift;
    uint64_t offset;
    const uint64_t *base;
    const uint64_t *count;
};

struct dirtylog;

struct dirtylog *dl_new(int fd, uint64_t map_bytes, int ndev, const struct dl_level_spec *fine,
                        const struct dl_level_spec *coarse, uint64_t first_cycle,
                        uint64_t hot_cycles);
int dl_mark(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset, uint64_t length);
void dl_durable(struct dirtylog *d, uint64_t cycle);
uint64_t dl_commit(struct dirtylog *d, uint64_t committed);
void dl_stats(struct dirtylog *d, struct dl_stats *st);
void dl_free(struct dirtylog *d);
