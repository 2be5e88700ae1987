"""cffi build script for ``nbd_plugin._io``, the back end's reads and writes (``preadv.c``).

Which calls keep the GIL, and why
---------------------------------
nbdkit runs the plugin on ``--threads`` worker threads per connection, and every release of
the GIL while another worker waits for it is a hand-off: the caller then queues to get it
back. A 4k read served from the page cache takes about a microsecond, less than a hand-off.
So, as in ``tracker/_build.py``, the preamble makes cffi's wrappers keep the GIL, and:

* ``be_pread`` first asks the page cache only (``preadv2`` with ``RWF_NOWAIT``), keeping the
  GIL; only the part that is not cached is read with the GIL released, since a read from the
  disk may take milliseconds and must not stall the other workers.
* ``be_pwrite`` releases the GIL: a buffered write may wait for writeback (dirty-page
  throttling), and this kernel's ext4 refuses ``RWF_NOWAIT`` on buffered writes (EOPNOTSUPP).
* ``be_pread_batch`` (the copier's reads, megabytes at a time) releases it.
* ``wp_pwrite`` (``writepath.c``), a tracked write in one call, keeps it except around the
  ``pwrite``, as ``be_pwrite`` does, and where the tracker or the dirty-region log waits.

Keeping each worker's Python thread state
-----------------------------------------
nbdkit's Python plugin enters every callback with ``PyGILState_Ensure`` and leaves it with
``PyGILState_Release``; on a thread Python did not create, that makes a thread state and its
frame stack (an mmap) at the start of every request and frees them (a munmap) at the end.
``keep_thread_state``, which the plugin calls at every request, takes one more
``PyGILState_Ensure`` the first time a thread calls it, so the state lives as long as the
thread: nbdkit's CPU per 4k random read fell from 24 to 11 us and per write from 25 to 13 us
(README, Benchmarks). Keeping the GIL on page-cache hits added a median 1.09x on reads on top
of that. A thread-exit destructor deletes the state. Only
nbdkit's threads may call it: a ``threading.Thread`` deletes its own state when it ends, and the
destructor would then delete it again. glibc clears every thread-specific value before the
destructors run, so CPython's own record of the thread's state is gone by then and the
destructor uses the pointer it kept instead of ``PyGILState_Release``.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

PREAMBLE = r"""
#include <pthread.h>
#include "preadv.c"

/* Exported by CPython 3.11 but hidden from the limited API that cffi compiles against. */
PyAPI_FUNC(int) _Py_IsFinalizing(void);

static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;

static void delete_thread_state(void *tstate)
{
    if (!Py_IsInitialized() || _Py_IsFinalizing())
        return;   /* the interpreter is going away with every state it holds */
    PyEval_RestoreThread(tstate);
    PyThreadState_Clear(tstate);
    PyEval_ReleaseThread(tstate);
    PyThreadState_Delete(tstate);
}

static void make_kept_key(void)
{
    pthread_key_create(&kept_key, delete_thread_state);
}

/* With the GIL held, on a thread Python did not create. */
static void keep_thread_state(void)
{
    pthread_once(&kept_once, make_kept_key);
    if (pthread_getspecific(kept_key))
        return;
    PyGILState_Ensure();   /* this thread's state is current: this only counts one more user */
    pthread_setspecific(kept_key, PyThreadState_Get());
}

/* Up to this much, a cached read keeps the GIL: a page-cache copy of 128 KiB takes ~15 us,
 * about a GIL hand-off; a longer one would hold every other thread for its whole copy. */
#define GIL_READ_MAX (128 * 1024)

static int be_pread_gil(int fd, unsigned char *buf, size_t length, uint64_t offset)
{
    int64_t cached = length <= GIL_READ_MAX ? be_pread_cached(fd, buf, length, offset) : 0;
    if (cached == (int64_t)length)
        return 0;
    if (cached < 0)   /* not cached, or no answer: the blocking read tells */
        cached = 0;
    PyThreadState *save = PyEval_SaveThread();
    int rc = be_pread(fd, buf + cached, length - (size_t)cached, offset + (uint64_t)cached);
    PyEval_RestoreThread(save);
    return rc;
}

static int be_pwrite_released(int fd, const unsigned char *buf, size_t length, uint64_t offset)
{
    PyThreadState *save = PyEval_SaveThread();
    int rc = be_pwrite(fd, buf, length, offset);
    PyEval_RestoreThread(save);
    return rc;
}

#include "writepath.c"

static int be_pread_batch_released(int fd, const uint64_t *pairs, size_t n, unsigned char *buf)
{
    PyThreadState *save = PyEval_SaveThread();
    int rc = be_pread_batch(fd, pairs, n, buf);
    PyEval_RestoreThread(save);
    return rc;
}

#define be_pread(...) be_pread_gil(__VA_ARGS__)
#define be_pwrite(...) be_pwrite_released(__VA_ARGS__)
#define be_pread_batch(...) be_pread_batch_released(__VA_ARGS__)
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
"""

ffi = FFI()
ffi.cdef("""
void keep_thread_state(void);
int be_pread(int fd, unsigned char *buf, size_t length, uint64_t offset);
int be_pwrite(int fd, const unsigned char *buf, size_t length, uint64_t offset);
int be_pread_batch(int fd, const uint64_t *pairs, size_t n, unsigned char *buf);
enum { WP_TRACKER, WP_TR_BEGIN, WP_TR_END, WP_DIRTY, WP_DL_MARK, WP_KA, WP_KA_NEEDS, WP_PARTS };
enum { WP_DONE, WP_BEGUN, WP_WRITE_FAILED, WP_END_FAILED };
int wp_pwrite(const uintptr_t *parts, int fd, int64_t dev, int64_t kind,
              const unsigned char *buf, size_t length, uint64_t offset);
uint64_t wp_cycle(void);
int wp_rc(void);
""")
ffi.set_source(
    "nbd_plugin._io",
    PREAMBLE,
    include_dirs=[HERE],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=os.path.dirname(HERE), verbose=False)
