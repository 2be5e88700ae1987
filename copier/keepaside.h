/*
 * Interface of keepaside.c.  _keepaside_build.py hands this file verbatim to cffi's cdef, after
 * the KA_* constants (defined in keepaside.c), so it holds only declarations cffi can parse (no
 * preprocessor lines); it is included once, by keepaside.c.
 */

struct ka;
struct ka_stats {
    int armed;
    int degraded;
    uint64_t cycle;
    uint64_t blocks;
    uint64_t mem_bytes;
    uint64_t spill_bytes;
    uint64_t kept_total;
    uint64_t index_bytes;
    uint64_t extent_bytes;
};

struct ka *ka_new(size_t ndev, const int *fds, const uint64_t *sizes, const long long *ids,
                  uint32_t mem_slots, uint32_t spill_slots, const char *spill_dir, double drain_wait);
void ka_free(struct ka *k);
_Bool ka_needs(struct ka *k, uint64_t cycle);
void ka_keep(struct ka *k, uint64_t cycle, size_t d, uint64_t offset, uint64_t length);
void ka_arm(struct ka *k, uint64_t cycle);
void ka_drained(struct ka *k);
int ka_install(struct ka *k, const uint64_t *const *pairs, const size_t *npairs);
int ka_overlay(struct ka *k, size_t d, const uint64_t *pairs, size_t n, unsigned char *buf);
void ka_release(struct ka *k);
int ka_state(struct ka *k, struct ka_stats *st, char *reason, size_t cap);
