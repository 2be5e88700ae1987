/*
 * One C call per host write (issue 11): the tracker's begin, the dirty-region mark, the
 * keep-aside check, the pwrite and the tracker's end, which were five Python-level steps
 * (WriteHook.begin, the back end's pwrite, WriteHook.end) that cost about 1 us more (README, #11).
 * Only the common case is done here; whatever else can happen is handed back to the plugin's
 * Python path at the point where it diverges, with the state this call reached (wp_pwrite's
 * return value says which point; wp_cycle and wp_rc say the rest).
 *
 * The parts belong to three other cffi extensions (tracker._shards, replication._dirtylog,
 * copier._keepaside), so this module calls them through the addresses in `parts`, a
 * uintptr_t[WP_PARTS] array that replication.driver.WriteHook fills and owns (its comment says
 * for how long each address is valid). The function addresses are those cffi's
 * ffi.addressof(lib, name) gives: the extensions' direct-call entry points, which run the
 * wrappers their _build.py preambles put in place (tr_end and dl_mark let go of the GIL only
 * while they wait, for a full or locked shard or for a new mark's msync). They need the GIL
 * held, as a call from Python would: this module's cffi wrappers keep it (_build.py).
 *
 * Included by _build.py's preamble after be_pwrite_released, which it uses.
 */
#include <stdint.h>

enum {
    WP_TRACKER,    /* struct tracker * */
    WP_TR_BEGIN,   /* tr_begin */
    WP_TR_END,     /* tr_end */
    WP_DIRTY,      /* struct dirtylog *, or 0: no dirty-region log */
    WP_DL_MARK,    /* dl_mark, or 0 */
    WP_KA,         /* struct ka * */
    WP_KA_NEEDS,   /* ka_needs */
    WP_PARTS
};

/* wp_pwrite's answers; with each, the state the Python path resumes from. */
enum {
    WP_DONE = 0,          /* written, TE recorded */
    WP_BEGUN = 1,         /* begun in wp_cycle(), marked with result wp_rc() (0: no log or
                             marked), nothing written: the mark needs Python (an msync that
                             failed, a bad mark) or the keep-aside needs the old bytes kept */
    WP_WRITE_FAILED = 2,  /* begun in wp_cycle(), marked, nothing to keep aside, pwrite failed
                             with errno wp_rc(): the write is still in flight (not ended) */
    WP_END_FAILED = 3     /* written; tr_end answered wp_rc() (no TE; no longer in flight) */
};

struct tracker;
struct dirtylog;
struct ka;

typedef uint64_t (*wp_tr_begin_fn)(struct tracker *);
typedef int (*wp_tr_end_fn)(struct tracker *, uint64_t, int64_t, int64_t, uint64_t, uint64_t);
typedef int (*wp_dl_mark_fn)(struct dirtylog *, uint64_t, int64_t, uint64_t, uint64_t);
typedef _Bool (*wp_ka_needs_fn)(struct ka *, uint64_t);

/* What the last wp_pwrite on this thread handed back; read by the caller right after it. */
static __thread struct {
    uint64_t cycle;
    int rc;
} wp_last;

static int wp_pwrite(const uintptr_t *parts, int fd, int64_t dev, int64_t kind,
                     const unsigned char *buf, size_t length, uint64_t offset)
{
    struct tracker *t = (struct tracker *)parts[WP_TRACKER];
    struct dirtylog *dirty = (struct dirtylog *)parts[WP_DIRTY];
    uint64_t cycle = ((wp_tr_begin_fn)parts[WP_TR_BEGIN])(t);
    int rc = dirty ? ((wp_dl_mark_fn)parts[WP_DL_MARK])(dirty, cycle, dev, offset, length) : 0;
    wp_last.cycle = cycle;
    wp_last.rc = rc;
    if (rc || ((wp_ka_needs_fn)parts[WP_KA_NEEDS])((struct ka *)parts[WP_KA], cycle))
        return WP_BEGUN;
    rc = be_pwrite_released(fd, buf, length, offset);
    if (rc) {
        wp_last.rc = rc;
        return WP_WRITE_FAILED;
    }
    rc = ((wp_tr_end_fn)parts[WP_TR_END])(t, cycle, dev, kind, offset, length);
    wp_last.rc = rc;
    return rc ? WP_END_FAILED : WP_DONE;
}

static uint64_t wp_cycle(void)
{
    return wp_last.cycle;
}

static int wp_rc(void)
{
    return wp_last.rc;
}
