"""cffi build script for ``nbd_plugin._io``, the back end's batched read (``preadv.c``).

Run directly to rebuild in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffi = FFI()
ffi.cdef("int be_pread_batch(int fd, const uint64_t *pairs, size_t n, unsigned char *buf);")
ffi.set_source(
    "nbd_plugin._io",
    '#include "preadv.c"',
    include_dirs=[HERE],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
