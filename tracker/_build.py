"""cffi build script for ``tracker._shards`` (API mode; the C code is ``shards.c``)."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffi = FFI()
with open(os.path.join(HERE, "shards.h"), encoding="utf-8") as header:
    ffi.cdef(header.read())
ffi.set_source(
    "tracker._shards",
    '#include "shards.c"',
    include_dirs=[HERE],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
