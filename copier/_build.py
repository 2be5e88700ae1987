"""cffi build script for ``copier._fastcopy``, the copier's data path in C (``fastcopy.c``).

Links against libnbd (Debian ``libnbd-dev``). Run directly to rebuild in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffi = FFI()
ffi.cdef("""
struct fc_engine;
struct fc_batch;
struct fc_info {
    int64_t size;
    int can_zero, can_flush, can_multi_conn, can_fast_zero, read_only;
    int connections;
};
struct fc_report {
    int errnum;
    int kind;
    uint64_t offset;
    uint64_t length;
    int retries;
    uint64_t retried;
    char message[256];
};
#define FC_CONN ...
#define FC_DATA ...
#define FC_ZERO ...
#define FC_FLUSH ...
struct fc_engine *fc_open(const char *uri, int connections, int connect_timeout_ms,
                          int io_timeout_ms, int retries, struct fc_info *info,
                          struct fc_report *report);
void fc_close(struct fc_engine *e);
void fc_cancel(struct fc_engine *e);
struct fc_batch *fc_batch_new(void);
void fc_batch_free(struct fc_batch *st);
int64_t fc_check(const uint64_t *pairs, size_t n, uint64_t size, size_t *bad);
int fc_send(struct fc_engine *e, struct fc_batch *st, const uint64_t *pairs, size_t n,
            const unsigned char *buf, int max_inflight, struct fc_report *report);
int fc_send_zero(struct fc_engine *e, struct fc_batch *st, const uint64_t *pairs, size_t n,
                 int max_inflight, struct fc_report *report);
int fc_wait(struct fc_engine *e, struct fc_batch *st, struct fc_report *report);
int fc_flush(struct fc_engine *e, struct fc_report *report);
""")
ffi.set_source(
    "copier._fastcopy",
    '#include "fastcopy.c"',
    include_dirs=[HERE],
    libraries=["nbd"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
