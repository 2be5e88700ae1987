"""cffi build script for ``copier._keepaside``, the keep-aside store's C core (``keepaside.c``).

Run directly to rebuild in place: ``.venv/bin/python copier/_keepaside_build.py``.

Why the wrappers keep the GIL
-----------------------------
cffi lets go of the GIL around every C call. ``ka_needs`` and ``ka_keep`` run on the host's
write path on many nbdkit threads, and their usual work (an atomic load; a few checks under a
mutex, maybe a page-cache read of one block) takes less than the GIL hand-off that letting go
costs (tracker/_build.py measured two hand-offs per write at ~20% of 4k random-write
throughput). So, as in tracker/_build.py, the preamble turns cffi's release macros into plain
blocks, and keepaside.c lets go of the GIL itself exactly where a call may wait: a source read
that misses the page cache, a spill-file write, a wait for the lock or for the drain, and on
entry to the controller's calls (see "The GIL" in keepaside.c).
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

PREAMBLE = r"""
#include "keepaside.c"

#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
"""

ffi = FFI()
ffi.cdef("""
#define KA_BLOCK ...
#define KA_INDEX_BYTES_PER_BLOCK ...
#define KA_INDEX_BYTES_FIXED ...
#define KA_INDEX_BYTES_PER_DEV ...

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
""")
ffi.set_source(
    "copier._keepaside",
    PREAMBLE,
    include_dirs=[HERE],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
