"""cffi build script for ``tracker._shards`` (API mode; the C code is ``shards.c``).

Why this module keeps the GIL
-----------------------------
cffi releases the GIL around every C call. For the write path that is the wrong trade:
``tr_begin``/``tr_end`` take well under a microsecond, but nbdkit runs the plugin on many
threads, so each release hands the GIL to a waiting thread and the caller then queues to get
it back. Two such hand-offs per write cost ~20% of 4k random-write throughput (measured with
``scripts/bench_server.py``). So the preamble below redefines the macros cffi's wrappers use
to release the GIL, making every call here keep it, and gives back the GIL explicitly in the
two calls that wait or do real work while writers must go on: the drain (it waits for writes
that need the GIL to finish) and the detach (it sorts a whole cycle of TEs).

Keeping the GIL is safe because no function here calls back into Python, and a shard lock is
only ever held briefly: a writer that blocks on one while holding the GIL waits for a detach or
another writer, neither of which needs the GIL.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

PREAMBLE = r"""
#include "shards.c"

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

#define tr_drain tr_drain_released
#define tr_detach tr_detach_released
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
