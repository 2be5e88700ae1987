"""cffi build script for ``tracker._shards`` (API mode; the C code is ``shards.c``).

Which calls keep the GIL, and why
---------------------------------
cffi releases the GIL around every C call. For the write path that is the wrong trade:
``tr_begin``/``tr_end`` take well under a microsecond, but nbdkit runs the plugin on many
threads, so each release hands the GIL to a waiting thread and the caller then queues to get
it back. Two such hand-offs per write cost ~20% of 4k random-write throughput (measured with
``scripts/bench_server.py``). So the preamble below redefines the macros cffi's wrappers use
to release the GIL, making every call here keep it by default.

A call that keeps the GIL stalls every other Python thread for as long as it runs, so only
calls that cannot wait and do O(1) work may keep it. The others give the GIL back:

* ``tr_end`` and ``tr_record`` keep it while they only append to a shard (the fast path,
  which try-locks and never blocks). If the shard is full, making room may fold it (sort,
  merge, coarsen: 523 ms measured for 1.4 M TEs), and if the shard is locked its holder may
  be such a fold; the C call then returns ``TR_EWOULDBLOCK`` having changed nothing, and the
  wrapper below gives up the GIL and calls the waiting variant, all in one Python call, so
  no Python code runs between the two and the write stays counted in flight until its TE is
  recorded.
* The drain waits for writes that need the GIL to finish; the detach sorts a whole cycle.
* ``tr_stats`` takes every shard lock, and one may be held by a fold.

No function here calls back into Python. Every shard lock is taken either by a call without
the GIL or by the fast path, which holds it for a few instructions and never waits for it,
so a thread never waits for a shard lock while holding the GIL.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

PREAMBLE = r"""
#include "shards.c"

static int tr_end_gil(struct tracker *t, uint64_t cycle, int64_t dev, int64_t kind,
                      uint64_t offset, uint64_t length)
{
    int rc = tr_end(t, cycle, dev, kind, offset, length);
    if (rc == TR_EWOULDBLOCK) {
        PyThreadState *save = PyEval_SaveThread();
        rc = tr_end_wait(t, cycle, dev, kind, offset, length);
        PyEval_RestoreThread(save);
    }
    return rc;
}

static int tr_record_gil(struct tracker *t, int64_t dev, int64_t kind, uint64_t offset,
                         uint64_t length)
{
    int rc = tr_record(t, dev, kind, offset, length);
    if (rc == TR_EWOULDBLOCK) {
        PyThreadState *save = PyEval_SaveThread();
        rc = tr_record_wait(t, dev, kind, offset, length);
        PyEval_RestoreThread(save);
    }
    return rc;
}

static int64_t tr_drain_released(struct tracker *t, uint64_t c, double timeout)
{
    PyThreadState *save = PyEval_SaveThread();
    int64_t left = tr_drain(t, c, timeout);
    PyEval_RestoreThread(save);
    return left;
}

static struct tr_closed *tr_detach_released(struct tracker *t, uint64_t c)
{
    PyThreadState *save = PyEval_SaveThread();
    struct tr_closed *cl = tr_detach(t, c);
    PyEval_RestoreThread(save);
    return cl;
}

static void tr_stats_released(struct tracker *t, struct tr_stats *st)
{
    PyThreadState *save = PyEval_SaveThread();
    tr_stats(t, st);
    PyEval_RestoreThread(save);
}

/* Function-like, so that "struct tr_stats" keeps its name. */
#define tr_end(...) tr_end_gil(__VA_ARGS__)
#define tr_record(...) tr_record_gil(__VA_ARGS__)
#define tr_drain(...) tr_drain_released(__VA_ARGS__)
#define tr_detach(...) tr_detach_released(__VA_ARGS__)
#define tr_stats(...) tr_stats_released(__VA_ARGS__)
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
"""

ffi = FFI()
with open(os.path.join(HERE, "shards.h"), encoding="utf-8") as header:
    ffi.cdef(header.read())
ffi.set_source(
    "tracker._shards",
    PREAMBLE,
    include_dirs=[HERE],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
