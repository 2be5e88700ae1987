/*
 * The copier's data path: send a batch of data segments to the replica from C.
 *
 * Why C: libnbd's Python aio_pwrite costs a GIL round trip per request, and a cycle of small
 * random writes is thousands of 4 KiB segments; even a bare Python loop reached a quarter of
 * nbdcopy's throughput through the same libnbd. Here one call sends a whole batch, with the GIL
 * released (cffi's default), on the connection the Python side opened: the handle comes from
 * the libnbd Python object's capsule, so connect, size checks, zeroing and flush stay in Python.
 *
 * Lifetime: libnbd may still hold commands when we return early (an error, or a replica that
 * stopped answering). Their completion state is therefore on the heap, reference-counted by the
 * commands' .free callbacks, which libnbd calls exactly once per command; the caller closes the
 * handle after any error before it lets go of the batch buffer.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>

struct fc_state {
    int refs;           /* commands not yet freed by libnbd, plus one for the caller */
    int error;          /* first errno a command completed with */
    uint64_t bad_offset;
};

struct fc_cmd {
    struct fc_state *st;
    uint64_t offset;
};

static int fc_done(void *user_data, int *error)
{
    struct fc_cmd *cmd = user_data;
    if (*error && !cmd->st->error) {
        cmd->st->error = *error;
        cmd->st->bad_offset = cmd->offset;
    }
    return 1;
}

static void fc_unref(struct fc_state *st)
{
    if (--st->refs == 0)
        free(st);
}

static void fc_free(void *user_data)
{
    struct fc_cmd *cmd = user_data;
    fc_unref(cmd->st);
    free(cmd);
}

static int fc_fail(int rc, const char *what, char *err, size_t errcap)
{
    snprintf(err, errcap, "%s", what);
    return rc;
}

/* Wait until fewer than `limit` commands are in flight, or (with `stop`) a command failed;
 * 0, or an errno with `err` filled. */
static int fc_wait_below(struct nbd_handle *h, int limit, int timeout_ms,
                         const struct fc_state *st, int stop, char *err, size_t errcap)
{
    while (nbd_aio_in_flight(h) >= limit && !(stop && st->error)) {
        int r = nbd_poll(h, timeout_ms);
        if (r == -1)
            return fc_fail(nbd_get_errno() ? nbd_get_errno() : EIO, nbd_get_error(), err, errcap);
        if (r == 0)
            return fc_fail(ETIMEDOUT, "the replica did not answer in time", err, errcap);
    }
    return 0;
}

static int fc_issue(struct nbd_handle *h, struct fc_state *st, const unsigned char *buf,
                    uint64_t offset, uint64_t length, char *err, size_t errcap)
{
    struct fc_cmd *cmd = malloc(sizeof *cmd);
    if (!cmd)
        return fc_fail(ENOMEM, "out of memory", err, errcap);
    cmd->st = st;
    cmd->offset = offset;
    st->refs++;
    nbd_completion_callback cb = { .callback = fc_done, .user_data = cmd, .free = fc_free };
    if (nbd_aio_pwrite(h, buf, length, offset, cb, 0) == -1)
        return fc_fail(nbd_get_errno() ? nbd_get_errno() : EIO, nbd_get_error(), err, errcap);
    return 0;
}

/*
 * Write `n` segments, pairs[2i] = offset and pairs[2i+1] = length, whose bytes lie one after
 * another in `buf`. At most `max_inflight` commands in flight (counting any already there);
 * returns when all have completed: 0, or an errno with *bad_offset and `err` set.
 */
int fc_pwrite(struct nbd_handle *h, const uint64_t *pairs, size_t n, const unsigned char *buf,
              int max_inflight, int timeout_ms, uint64_t *bad_offset, char *err, size_t errcap)
{
    struct fc_state *st = calloc(1, sizeof *st);
    if (!st)
        return fc_fail(ENOMEM, "out of memory", err, errcap);
    st->refs = 1;
    int rc = 0;
    size_t pos = 0;
    for (size_t i = 0; i < n && !rc && !st->error; i++) {
        rc = fc_wait_below(h, max_inflight, timeout_ms, st, 1, err, errcap);
        if (!rc && !st->error)
            rc = fc_issue(h, st, buf + pos, pairs[2 * i], pairs[2 * i + 1], err, errcap);
        pos += pairs[2 * i + 1];
    }
    if (!rc)
        rc = fc_wait_below(h, 1, timeout_ms, st, 0, err, errcap);
    if (!rc && st->error) {
        rc = st->error;
        *bad_offset = st->bad_offset;
        snprintf(err, errcap, "%s", strerror(rc));
    }
    fc_unref(st);
    return rc;
}
