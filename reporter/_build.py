"""cffi (API mode) build script for ``reporter._btree``, the report's C core.

Run directly to rebuild in place: ``.venv/bin/python reporter/_build.py``.
"""
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

ffi = FFI()
ffi.cdef(
    """
    struct rb_tree;
    enum { RB_SPLIT_COUNT = 0, RB_SPLIT_RANGE = 1 };
    enum { RB_OK = 0, RB_ENOMEM = -1, RB_EZERO = 1, RB_EOVERFLOW = 2 };

    struct rb_tree *rb_new(unsigned order, int split);
    void rb_free(struct rb_tree *t);
    void rb_clear(struct rb_tree *t);

    int rb_insert(struct rb_tree *t, uint64_t off, uint64_t len);
    int rb_insert_batch(struct rb_tree *t, const uint64_t *pairs, size_t npairs,
                        size_t *where);

    size_t rb_count(const struct rb_tree *t);
    size_t rb_nodes(const struct rb_tree *t);
    unsigned rb_height(const struct rb_tree *t);
    size_t rb_memory(const struct rb_tree *t);
    uint64_t rb_covered(const struct rb_tree *t);
    size_t rb_node_bytes(unsigned order, int leaf);

    size_t rb_extents(const struct rb_tree *t, uint64_t *out);
    int rb_check(const struct rb_tree *t, char *msg, size_t cap);
    """
)
ffi.set_source(
    "reporter._btree",
    '#include "btree.h"',
    sources=[os.path.join(_HERE, "btree.c")],
    include_dirs=[_HERE],
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffi.compile(tmpdir=_ROOT, verbose=False)
