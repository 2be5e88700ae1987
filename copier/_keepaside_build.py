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
with open(os.path.join(HERE, "keepaside.h"), encoding="utf-8") as header:
    ffi.cdef("""
#define KA_BLOCK ...
#define KA_INDEX_BYTES_PER_BLOCK ...
#define KA_INDEX_BYTES_FIXED ...
#define KA_INDEX_BYTES_PER_DEV ...
""" + header.read())
ffi.set_source(
    "copier._keepaside",
    PREAMBLE,
    include_dirs=[HERE],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
