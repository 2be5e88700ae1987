"""cffi build script for ``copier._fastcopy``, the copier's data path in C (``fastcopy.c``).

Links against libnbd (Debian ``libnbd-dev``). Run directly to rebuild in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffi = FFI()
with open(os.path.join(HERE, "fastcopy.h"), encoding="utf-8") as header:
    ffi.cdef(header.read())
ffi.set_source(
    "copier._fastcopy",
    '#include "fastcopy.c"',
    include_dirs=[HERE],
    libraries=["nbd"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
