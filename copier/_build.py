"""cffi build script for ``copier._fastcopy``, the copier's data path in C (``fastcopy.c``).

Links against libnbd (Debian ``libnbd-dev``). Run directly to rebuild in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffi = FFI()
ffi.cdef("""
struct nbd_handle;
struct fc_state;
struct fc_state *fc_batch_new(void);
void fc_batch_free(struct fc_state *st);
int fc_send(struct nbd_handle **hs, int nh, struct fc_state *st, const uint64_t *pairs, size_t n,
            const unsigned char *buf, int max_inflight, int timeout_ms, char *err, size_t errcap);
int fc_wait(struct nbd_handle **hs, int nh, struct fc_state *st, int timeout_ms,
            uint64_t *bad_offset, char *err, size_t errcap);
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
