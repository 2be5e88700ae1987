/* The report: a merging B-tree of reporting entries (REs).  See btree.c. */
#ifndef NBDREP_REPORTER_BTREE_H
#define NBDREP_REPORTER_BTREE_H

#include <stddef.h>
#include <stdint.h>

enum rb_split { RB_SPLIT_COUNT = 0, RB_SPLIT_RANGE = 1 };

enum rb_status {
    RB_OK = 0,
    RB_ENOMEM = -1,
    RB_EZERO = 1,     /* a length of 0 */
    RB_EOVERFLOW = 2  /* offset + length does not fit in 64 bits */
};

struct rb_tree;

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

#endif
