"""cffi build script for ``replication._dirtylog``, the dirty-region log's C core (``dirtylog.c``).

Which calls keep the GIL, and why: as in tracker/_build.py, ``dl_mark`` runs on every write on
many nbdkit threads and its usual work (one compare-and-swap per region) is shorter than a GIL
hand-off, so it keeps the GIL; when it answers DL_EWOULDBLOCK (a new mark, or a mark waiting
for its msync) the wrapper lets go of the GIL and calls ``dl_mark_wait``, all in one Python
call. ``dl_commit`` scans the bitmap and ``dl_stats`` takes the lock: both let go of the GIL.
``dl_durable`` is one compare-and-swap: it keeps it.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

PREAMBLE = r"""
#include "dirtylog.c"

static int dl_mark_gil(struct dirtylog *d, uint64_t cycle, int64_t dev, uint64_t offset,
                       uint64_t length)
{
    int rc = dl_mark(d, cycle, dev, offset, length);
    if (rc == DL_EWOULDBLOCK) {
        PyThreadState *save = PyEval_SaveThread();
        rc = dl_mark_wait(d, cycle, dev, offset, length);
        PyEval_RestoreThread(save);
    }
    return rc;
}

static uint64_t dl_commit_released(struct dirtylog *d, uint64_t committed)
{
    PyThreadState *save = PyEval_SaveThread();
    uint64_t n = dl_commit(d, committed);
    PyEval_RestoreThread(save);
    return n;
}

static void dl_stats_released(struct dirtylog *d, struct dl_stats *st)
{
    PyThreadState *save = PyEval_SaveThread();
    dl_stats(d, st);
    PyEval_RestoreThread(save);
}

/* Function-like, so that "struct dl_stats" keeps its name. */
#define dl_mark(...) dl_mark_gil(__VA_ARGS__)
#define dl_commit(...) dl_commit_released(__VA_ARGS__)
#define dl_stats(...) dl_stats_released(__VA_ARGS__)
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
"""

ffi = FFI()
with open(os.path.join(HERE, "dirtylog.h"), encoding="utf-8") as header:
    ffi.cdef(header.read())
ffi.set_source(
    "replication._dirtylog",
    PREAMBLE,
    include_dirs=[HERE],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
