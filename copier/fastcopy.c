/*
 * The copier's data path: send batches of data segments to the replica from C.
 *
 * Why C: libnbd's Python aio_pwrite costs a GIL round trip per request, and a cycle of small
 * random writes is thousands of 4 KiB segments; even a bare Python loop reached a quarter of
 * nbdcopy's throughput through the same libnbd. Here one call sends a whole batch, with the GIL
 * released (cffi's default), on the connection the Python side opened: the handle comes from
 * the libnbd Python object's capsule, so connect, size checks, zeroing and flush stay in Python.
 *
 * Pipelining: fc_send issues a batch's commands and returns without waiting for their replies;
 * fc_wait waits for one batch. The copier sends batch k before it waits for batch k-1, so the
 * replica always has work queued: waiting for each batch's last reply before sending the next
 * left the replica idle once per batch.
 *
 * Lifetime: a batch (struct fc_state) is counted by its commands, which libnbd frees exactly
 * once each through their .free callbacks (on completion, or when the handle is closed with
 * them still in flight), plus one reference for the caller, dropped by fc_batch_free. So the
 * caller may let go of a batch whenever it likes; it must only keep the batch's buffer until
 * fc_wait returned or the handle was closed.
 */
#include <errno.h>
#include <poll.h>
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

static int fc_in_flight(struct nbd_handle **hs, int nh)
{
    int total = 0;
    for (int j = 0; j < nh; j++)
        total += nbd_aio_in_flight(hs[j]);
    return total;
}

/* One poll(2) over every connection, then let libnbd act on what is ready. */
static int fc_poll(struct nbd_handle **hs, int nh, int timeout_ms, char *err, size_t errcap)
{
    struct pollfd fds[nh];
    for (int j = 0; j < nh; j++) {
        unsigned dir = nbd_aio_get_direction(hs[j]);
        fds[j].fd = nbd_aio_get_fd(hs[j]);
        fds[j].events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                        (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
        fds[j].revents = 0;
    }
    int r = poll(fds, nh, timeout_ms);
    if (r == 0)
        return fc_fail(ETIMEDOUT, "the replica did not answer in time", err, errcap);
    if (r < 0)
        return fc_fail(errno, "poll failed", err, errcap);
    for (int j = 0; j < nh; j++) {
        if ((fds[j].revents & (POLLIN | POLLHUP | POLLERR)) && nbd_aio_notify_read(hs[j]) == -1)
            return fc_fail(nbd_get_errno() ? nbd_get_errno() : EIO, nbd_get_error(), err, errcap);
        if ((fds[j].revents & POLLOUT) && nbd_aio_notify_write(hs[j]) == -1)
            return fc_fail(nbd_get_errno() ? nbd_get_errno() : EIO, nbd_get_error(), err, errcap);
    }
    return 0;
}

/* Wait until fewer than `limit` commands are in flight on all connections, or a command of
 * `st` failed; 0, or an errno with `err` filled. */
static int fc_wait_below(struct nbd_handle **hs, int nh, int limit, int timeout_ms,
                         const struct fc_state *st, char *err, size_t errcap)
{
    while (fc_in_flight(hs, nh) >= limit && !st->error) {
        int rc = fc_poll(hs, nh, timeout_ms, err, errcap);
        if (rc)
            return rc;
    }
    return 0;
}

/* The connection with the fewest commands in flight. */
static struct nbd_handle *fc_least_busy(struct nbd_handle **hs, int nh)
{
    int best = 0;
    for (int j = 1; j < nh; j++)
        if (nbd_aio_in_flight(hs[j]) < nbd_aio_in_flight(hs[best]))
            best = j;
    return hs[best];
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

struct fc_state *fc_batch_new(void)
{
    struct fc_state *st = calloc(1, sizeof *st);
    if (st)
        st->refs = 1;
    return st;
}

void fc_batch_free(struct fc_state *st)
{
    fc_unref(st);
}

/*
 * Issue the writes of `n` segments, pairs[2i] = offset and pairs[2i+1] = length, whose bytes
 * lie one after another in `buf`, spread over the `nh` connections `hs` (each goes to the least
 * busy), at most `max_inflight` commands in flight in all (counting earlier batches'). Returns
 * once all are issued, or early when one of them already failed: 0, or an errno with `err` set
 * if a command could not be issued.
 */
int fc_send(struct nbd_handle **hs, int nh, struct fc_state *st, const uint64_t *pairs, size_t n,
            const unsigned char *buf, int max_inflight, int timeout_ms, char *err, size_t errcap)
{
    int rc = 0;
    size_t pos = 0;
    for (size_t i = 0; i < n && !rc && !st->error; i++) {
        rc = fc_wait_below(hs, nh, max_inflight, timeout_ms, st, err, errcap);
        if (!rc && !st->error)
            rc = fc_issue(fc_least_busy(hs, nh), st, buf + pos, pairs[2 * i], pairs[2 * i + 1],
                          err, errcap);
        pos += pairs[2 * i + 1];
    }
    return rc;
}

/*
 * Wait until every command of batch `st` has completed: 0, or an errno with `err` set, and
 * *bad_offset set when a write failed (rather than the connection).
 */
int fc_wait(struct nbd_handle **hs, int nh, struct fc_state *st, int timeout_ms,
            uint64_t *bad_offset, char *err, size_t errcap)
{
    while (st->refs > 1) {
        int rc = fc_poll(hs, nh, timeout_ms, err, errcap);
        if (rc)
            return rc;
    }
    if (st->error) {
        *bad_offset = st->bad_offset;
        snprintf(err, errcap, "%s", strerror(st->error));
    }
    return st->error;
}
