"""cffi (API mode) build script for ``reporter._btree``, the report's C core.

Run directly to rebuild in place: ``.venv/bin/python reporter/_build.py``.
"""
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

ffi = FFI()
with open(os.path.join(_HERE, "btree.h"), encoding="utf-8") as header:
    # cdef cannot parse preprocessor lines (include guard, #include); the rest is plain declarations.
    ffi.cdef("".join(line for line in header if not line.lstrip().startswith("#")))
ffi.set_source(
    "reporter._btree",
    # Included rather than listed in sources=: setuptools refuses absolute source paths when it
    # builds a wheel, and a relative one would depend on the directory the build runs from.
    '#include "btree.c"',
    include_dirs=[_HERE],
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=_ROOT, verbose=False)
