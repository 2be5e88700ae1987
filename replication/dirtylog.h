/*
 * Interface of dirtylog.c.  _dirtylog_build.py hands this file verbatim to cffi's cdef, so it
 * holds only declarations cffi can parse (no preprocessor lines); it is included once, by
 * dirtylog.c.
 */

enum {
    DL_OK = 0,
    DL_EWOULDBLOCK = 1, /* dl_mark: a region needs a new mark or a sync; call dl_mark_wait */
    DL_ERANGE = 2,      /* a write outside its device, or an unknown device */
    DL_ESYNC = 3        /* the mark is set, but msync failed: it may not survive power loss */
};

struct dl_stats {
    uint64_t regions;   /* regions of all devices */
    uint64_t marked;    /* regions marked now */
    uint64_t marks;     /* new marks set since dl_new */
    uint64_t syncs;     /* msync calls (each covers every mark set before it began) */
    uint64_t cleared;   /* marks cleared by dl_commit since dl_new */
    uint64_t sync_errors;
};

struct dirtylog;

struct dirtylog *dl_new(int fd, uint64_t map_bytes, unsigned region_shift, int ndev,
                        const uint64_t *base, const uint64_t *count, uint64_t first_cycle,
                        uint64_t hot_cycles);
int dl_mark(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset, uint64_t length);
int dl_mark_wait(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset,
                 uint64_t length);
uint64_t dl_commit(struct dirtylog *d, uint64_t committed);
void dl_stats(struct dirtylog *d, struct dl_stats *st);
void dl_free(struct dirtylog *d);
