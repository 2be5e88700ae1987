/*
 * The copier's one copy engine: every command nbdrep sends to a replica goes out from here.
 *
 * Theory of operation
 * -------------------
 * Why C: libnbd's Python aio_pwrite costs a GIL round trip per request, and a cycle of small
 * random writes is thousands of 4 KiB segments; even a bare Python loop reached a quarter of
 * nbdcopy's throughput through the same libnbd. Here one call sends a whole batch with the GIL
 * released (cffi's default).
 *
 * An engine (struct fc_engine) is the set of connections to one replica export: fc_open
 * connects them (libnbd handles of its own, driven by poll(2) with a deadline, so a refused
 * connection fails at once and a silent server with ETIMEDOUT) and reports the export's size
 * and flags; fc_close disconnects and frees them.
 *
 * A batch is a list of (offset, length) pairs, ascending and disjoint. fc_send issues WRITEs of
 * bytes that lie back to back in one buffer; fc_send_zero issues WRITE_ZEROES, or WRITEs of a
 * static zero buffer when the replica cannot zero. WRITE_ZEROES goes without NO_HOLE: a trimmed
 * range of the source reads as zeros, so the replica must read zeros there too. NBD TRIM does not
 * promise that (the spec leaves a trimmed range's contents unspecified), whereas WRITE_ZEROES
 * without NO_HOLE both guarantees zeros and lets the server deallocate, which is what a trim is
 * for. So no TRIM is ever sent. fc_flush commits what completed before it: one FLUSH, as
 * there is more than one connection only where the server advertises multi-conn consistency.
 *
 * Pipelining: fc_send returns once the batch is issued, without waiting for its replies;
 * fc_wait waits for one batch. The copier sends batch k before it waits for batch k-1, so the
 * replica always has work queued. At most max_inflight commands are outstanding in all, every
 * batch's counted. Which connection a command goes on: fc_pick. Batches in flight
 * together must not overlap (the copier's batches of one cycle are disjoint): then completion
 * order, and the re-issue of a failed command while others are in flight, cannot matter.
 *
 * Retries: a command that completes with an error reply (the connection still alive) is queued
 * on the engine with a not-before time (10 ms, doubling, at most 1 s) and re-issued by whichever
 * call is polling then -- fc_send, fc_wait or fc_flush, whose poll timeout shortens to the
 * earliest due retry -- up to `retries` times; libnbd forbids issuing from inside its
 * completion callback, which holds the handle's lock. ENOTCONN is not a reply: libnbd completes
 * the commands of a dead connection with it, and those are not retried.
 *
 * Failure: the first command out of retries, the first dead connection, a call that sees no
 * reply for io_timeout while commands are on the wire, or fc_cancel fails the engine for good:
 * every later call returns that failure at once. The caller then closes the engine (and opens a
 * new one): commands may still be on the wire, so nothing about the replica's state is known.
 *
 * Threads: one thread at a time calls fc_open/fc_send/fc_send_zero/fc_wait/fc_flush/fc_close on
 * an engine (the Python side holds a lock), and fc_close only when no other call on it is
 * running. fc_cancel is the one call allowed from another thread during a call: it sets an
 * atomic flag and wakes the poll through an eventfd, and the running call returns ECANCELED.
 * fc_batch_free may run on any thread at any time (Python's garbage collector), concurrently
 * with libnbd freeing the batch's commands in the engine's thread: hence the atomic count.
 *
 * Ownership (as in libnbd's copy/): a batch (struct fc_batch) is counted by its commands --
 * one reference per command, held while libnbd has it in flight and while it waits in the
 * retry queue -- plus one for the caller, dropped by fc_batch_free; the last reference frees
 * it, so the caller may let go of a batch whenever it likes. The buffer of fc_send is not
 * copied: the caller must keep it unchanged until fc_wait returned 0 for the batch or the
 * engine was closed (closing frees every command, in flight or queued, and libnbd reads no
 * buffer after nbd_close). The pairs are read during the call only. The zero buffer is static.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <libnbd.h>

#include "fastcopy.h"

/* NBD servers commonly refuse payloads above 32 MiB; longer data pairs go in pieces. */
#define FC_MAX_WRITE (32u << 20)
/* WRITE_ZEROES lengths are 32-bit in the protocol; stay well below. */
#define FC_MAX_ZERO (1u << 30)
/* The zero buffer written where the replica cannot zero. */
#define FC_ZERO_BUFFER (1u << 20)
/* Payload bytes in flight on the first connection before commands spread to the others
 * (fc_pick): four 256 KiB segments of a sync; 64 commands of 4 KiB never reach it. */
#define FC_FILL (1u << 20)
#define FC_BACKOFF_FIRST_MS 10
#define FC_BACKOFF_MAX_MS 1000

struct fc_batch {
    atomic_int refs;     /* commands alive (in flight or queued), plus one for the caller */
};

struct fc_cmd;

struct fc_engine {
    struct nbd_handle **hs;
    uint64_t *payload;          /* per connection: WRITE payload bytes in flight */
    int nh;
    int wake;                   /* eventfd: fc_cancel wakes the poll of a running call */
    atomic_int cancelled;
    bool can_zero;
    bool closing;               /* in fc_close: completions are not queued for retry */
    int retries;
    int io_timeout_ms;
    int64_t last_event;         /* when a socket was last ready (or the call began), in ms */
    struct fc_cmd *queue;       /* commands waiting to be re-issued */
    int queued;
    uint64_t retried;           /* commands re-issued, over the engine's life */
    bool failed;
    struct fc_report failure;   /* the first failure */
};

struct fc_cmd {
    struct fc_engine *e;
    struct fc_batch *st;
    struct fc_cmd *next;        /* in e->queue */
    const unsigned char *buf;   /* the bytes of a WRITE; NULL: WRITE_ZEROES or FLUSH */
    int conn;                   /* the connection it was last issued on */
    uint64_t offset;
    uint64_t length;
    int kind;
    int retries;
    int64_t due;                /* not before this (ms), while queued */
    bool queued;                /* owned by e->queue, not by libnbd */
};

/* Never written; not const, which would put 1 MiB of zeros in the shared object's file. */
static unsigned char fc_zeros[FC_ZERO_BUFFER];

static int64_t fc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void fc_vreport(struct fc_report *r, int errnum, int kind, const char *fmt, va_list ap)
{
    memset(r, 0, sizeof *r);
    r->errnum = errnum ? errnum : EIO;
    r->kind = kind;
    vsnprintf(r->message, sizeof r->message, fmt, ap);
}

static void fc_report_set(struct fc_report *r, int errnum, int kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fc_vreport(r, errnum, kind, fmt, ap);
    va_end(ap);
}

/* Fail the engine for a reason other than one command; the first failure is kept. */
static void fc_fail(struct fc_engine *e, int errnum, const char *fmt, ...)
{
    va_list ap;
    if (e->failed)
        return;
    e->failed = true;
    va_start(ap, fmt);
    fc_vreport(&e->failure, errnum, FC_CONN, fmt, ap);
    va_end(ap);
}

static void fc_fail_cmd(struct fc_engine *e, const struct fc_cmd *cmd, int errnum,
                        const char *detail)
{
    if (e->failed)
        return;
    e->failed = true;
    fc_report_set(&e->failure, errnum, cmd->kind, "%s", detail);
    e->failure.offset = cmd->offset;
    e->failure.length = cmd->length;
    e->failure.retries = cmd->retries;
}

static void fc_unref(struct fc_batch *st)
{
    if (atomic_fetch_sub(&st->refs, 1) == 1)
        free(st);
}

/* The wait before re-issuing a command that failed `retries` times before. */
static int64_t fc_backoff_ms(int retries)
{
    if (retries >= 10)
        return FC_BACKOFF_MAX_MS;
    int64_t ms = (int64_t) FC_BACKOFF_FIRST_MS << retries;
    return ms < FC_BACKOFF_MAX_MS ? ms : FC_BACKOFF_MAX_MS;
}

static int fc_done(void *user_data, int *error)
{
    struct fc_cmd *cmd = user_data;
    struct fc_engine *e = cmd->e;
    if (cmd->buf)
        e->payload[cmd->conn] -= cmd->length;
    if (!*error)
        return 1;
    if (*error != ENOTCONN && !e->closing && !e->failed && cmd->retries < e->retries) {
        cmd->due = fc_now_ms() + fc_backoff_ms(cmd->retries++);
        cmd->queued = true;
        cmd->next = e->queue;
        e->queue = cmd;
        e->queued++;
        return 1;
    }
    fc_fail_cmd(e, cmd, *error, "");
    return 1;
}

/* libnbd's .free: after the completion, when the handle closes with the command in flight, or
 * when issuing it failed. A command queued for retry belongs to the queue instead. */
static void fc_free(void *user_data)
{
    struct fc_cmd *cmd = user_data;
    if (cmd->queued)
        return;
    fc_unref(cmd->st);
    free(cmd);
}

static short fc_events(struct nbd_handle *h)
{
    unsigned dir = nbd_aio_get_direction(h);
    return (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
           (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
}

/* Let libnbd act on what poll(2) found; -1 if the connection failed. One event per turn: after a
 * read the state may no longer expect a write, and libnbd refuses events its state does not. */
static int fc_notify(struct nbd_handle *h, short revents)
{
    if (revents & (POLLIN | POLLHUP | POLLERR))
        return nbd_aio_notify_read(h);
    if (revents & POLLOUT)
        return nbd_aio_notify_write(h);
    return 0;
}

static int fc_wire(const struct fc_engine *e)
{
    int total = 0;
    for (int j = 0; j < e->nh; j++)
        total += nbd_aio_in_flight(e->hs[j]);
    return total;
}

/*
 * The connection for the next command: the first one until it has FC_FILL payload bytes in
 * flight, then the one with the fewest. A server receives one connection's requests one at a
 * time, so big payloads go out over several connections to be received in parallel (1 GiB to
 * nbdkit file: 0.68 s over four, 0.82 s over one). But every connection in use costs the
 * server a wakeup per request or few: batches of 4 KiB random writes (64 in flight) cost the
 * replica's nbdkit 5.5-7.7 ms of CPU per MiB spread over four connections, 3.9-5.6 ms this
 * way, and this engine 2.2-2.4 ms against 1.7-2.0, at 34-64 against 52-89 MiB/s; 256 KiB
 * segments, which pass FC_FILL, went as fast either way. On a machine the replica shares
 * with the front end, that CPU is the hosts' (scripts/bench_replication.py).
 */
static int fc_pick(const struct fc_engine *e)
{
    int best = 0;
    if (e->payload[0] < FC_FILL)
        return 0;
    for (int j = 1; j < e->nh; j++)
        if (e->payload[j] < e->payload[best])
            best = j;
    return best;
}

/* Hand `cmd` to libnbd on the connection fc_pick chose. On failure libnbd has already freed
 * it through fc_free. */
static void fc_issue(struct fc_engine *e, struct fc_cmd *cmd)
{
    int j = fc_pick(e);
    struct nbd_handle *h = e->hs[j];
    nbd_completion_callback cb = { .callback = fc_done, .user_data = cmd, .free = fc_free };
    struct fc_cmd copy = *cmd;
    int64_t r;
    cmd->conn = j;
    if (cmd->buf)
        e->payload[j] += cmd->length;
    if (cmd->kind == FC_FLUSH)
        r = nbd_aio_flush(h, cb, 0);
    else if (cmd->buf)
        r = nbd_aio_pwrite(h, cmd->buf, cmd->length, cmd->offset, cb, 0);
    else
        r = nbd_aio_zero(h, cmd->length, cmd->offset, cb, 0);
    if (r == -1) {   /* never issued: no completion will count it out */
        if (copy.buf)
            e->payload[j] -= copy.length;
        fc_fail_cmd(e, &copy, nbd_get_errno(), nbd_get_error());
    }
}

/* Re-issue the queued commands that are due. The queue is detached first: completions run
 * while issuing may queue more. */
static void fc_issue_due(struct fc_engine *e)
{
    struct fc_cmd *list = e->queue;
    int64_t now = fc_now_ms();
    e->queue = NULL;
    while (list) {
        struct fc_cmd *cmd = list;
        list = cmd->next;
        if (e->failed || cmd->due > now) {
            cmd->next = e->queue;
            e->queue = cmd;
            continue;
        }
        e->queued--;
        e->retried++;
        cmd->queued = false;
        fc_issue(e, cmd);
    }
}

static int64_t fc_next_due(const struct fc_engine *e)
{
    int64_t due = INT64_MAX;
    for (const struct fc_cmd *cmd = e->queue; cmd; cmd = cmd->next)
        if (cmd->due < due)
            due = cmd->due;
    return due;
}

/*
 * One turn of the engine: re-issue due retries, sleep in poll(2) until a socket is ready, the
 * next retry is due or the stall deadline passed, then let libnbd act on what is ready. Waiting
 * only for a retry's backoff is no stall.
 */
static void fc_step(struct fc_engine *e)
{
    if (atomic_load(&e->cancelled))
        fc_fail(e, ECANCELED, "%s", "the connections were closed during the call");
    fc_issue_due(e);
    if (e->failed)
        return;
    int64_t now = fc_now_ms();
    if (e->queued && fc_wire(e) == 0)
        e->last_event = now;
    int64_t wait = e->last_event + e->io_timeout_ms - now;
    if (e->queued && fc_next_due(e) - now < wait)
        wait = fc_next_due(e) - now;
    struct pollfd fds[e->nh + 1];
    for (int j = 0; j < e->nh; j++)
        fds[j] = (struct pollfd) { .fd = nbd_aio_get_fd(e->hs[j]), .events = fc_events(e->hs[j]) };
    fds[e->nh] = (struct pollfd) { .fd = e->wake, .events = POLLIN };
    int r = poll(fds, e->nh + 1, wait < 0 ? 0 : wait > INT_MAX ? INT_MAX : (int) wait);
    if (r < 0 && errno == EINTR)
        return;
    if (r < 0) {
        fc_fail(e, errno, "poll failed: %s", strerror(errno));
        return;
    }
    now = fc_now_ms();
    if (r == 0) {
        if (now - e->last_event >= e->io_timeout_ms)
            fc_fail(e, ETIMEDOUT, "no reply for %g s", e->io_timeout_ms / 1000.0);
        return;
    }
    e->last_event = now;
    for (int j = 0; j < e->nh && !e->failed; j++)
        if (fc_notify(e->hs[j], fds[j].revents) == -1)
            fc_fail(e, nbd_get_errno() ? nbd_get_errno() : ENOTCONN, "%s", nbd_get_error());
}

/* Issue one command of batch `st` once fewer than `limit` are outstanding (on the wire or
 * waiting to be re-issued). */
static void fc_put(struct fc_engine *e, struct fc_batch *st, int kind, const unsigned char *buf,
                   uint64_t offset, uint64_t length, int limit)
{
    while (!e->failed && fc_wire(e) + e->queued >= limit)
        fc_step(e);
    if (e->failed)
        return;
    struct fc_cmd *cmd = malloc(sizeof *cmd);
    if (!cmd) {
        fc_fail(e, ENOMEM, "%s", "out of memory for a command");
        return;
    }
    *cmd = (struct fc_cmd) { .e = e, .st = st, .buf = buf, .offset = offset, .length = length,
                             .kind = kind };
    atomic_fetch_add(&st->refs, 1);
    fc_issue(e, cmd);
}

static uint64_t fc_begin(struct fc_engine *e)
{
    e->last_event = fc_now_ms();
    return e->retried;
}

static int fc_end(struct fc_engine *e, uint64_t retried_before, struct fc_report *report)
{
    if (e->failed)
        *report = e->failure;
    else
        memset(report, 0, sizeof *report);
    report->retried = e->retried - retried_before;
    return report->errnum;
}

static void fc_wait_batch(struct fc_engine *e, struct fc_batch *st)
{
    while (!e->failed && atomic_load(&st->refs) > 1)
        fc_step(e);
}

/* Connect one handle; NULL with `report` filled on failure. */
static struct nbd_handle *fc_connect(const char *uri, int timeout_ms, struct fc_report *report)
{
    struct nbd_handle *h = nbd_create();
    if (!h) {
        fc_report_set(report, nbd_get_errno(), FC_CONN, "%s", nbd_get_error());
        return NULL;
    }
    int64_t deadline = fc_now_ms() + timeout_ms;
    if (nbd_set_uri_allow_local_file(h, true) == -1 || nbd_aio_connect_uri(h, uri) == -1)
        goto failed;
    while (nbd_aio_is_connecting(h)) {
        int64_t left = deadline - fc_now_ms();
        if (left <= 0) {
            fc_report_set(report, ETIMEDOUT, FC_CONN, "no NBD handshake within %g s",
                          timeout_ms / 1000.0);
            nbd_close(h);
            return NULL;
        }
        struct pollfd fd = { .fd = nbd_aio_get_fd(h), .events = fc_events(h) };
        int r = poll(&fd, 1, left > INT_MAX ? INT_MAX : (int) left);
        if (r < 0 && errno != EINTR) {
            fc_report_set(report, errno, FC_CONN, "poll failed: %s", strerror(errno));
            nbd_close(h);
            return NULL;
        }
        if (r > 0 && fc_notify(h, fd.revents) == -1)
            goto failed;
    }
    if (nbd_aio_is_ready(h))
        return h;
    fc_report_set(report, ENOTCONN, FC_CONN, "the connection ended in state %s",
                  nbd_connection_state(h));
    nbd_close(h);
    return NULL;
failed:
    fc_report_set(report, nbd_get_errno(), FC_CONN, "%s", nbd_get_error());
    nbd_close(h);
    return NULL;
}

/*
 * Disconnect (NBD_CMD_DISC where a connection is idle) and free an engine: its handles, with
 * any commands still in flight on them, and its retry queue. Only when no other call on it runs.
 */
void fc_close(struct fc_engine *e)
{
    e->closing = true;
    for (int j = 0; j < e->nh; j++) {
        if (nbd_aio_is_ready(e->hs[j]) && nbd_aio_in_flight(e->hs[j]) == 0)
            nbd_aio_disconnect(e->hs[j], 0);
        nbd_close(e->hs[j]);
    }
    while (e->queue) {
        struct fc_cmd *cmd = e->queue;
        e->queue = cmd->next;
        fc_unref(cmd->st);
        free(cmd);
    }
    close(e->wake);
    free(e->payload);
    free(e->hs);
    free(e);
}

/*
 * Open `connections` connections to the export at `uri` (only one unless the server advertises
 * multi-conn consistency: one that does not may not even accept a second client, as
 * qemu-nbd --shared=1; and only one to a read-only export, which the caller refuses), each
 * within `connect_timeout_ms`. Fills `info`; NULL with `report` filled on failure.
 */
struct fc_engine *fc_open(const char *uri, int connections, int connect_timeout_ms,
                          int io_timeout_ms, int retries, struct fc_info *info,
                          struct fc_report *report)
{
    memset(report, 0, sizeof *report);
    struct fc_engine *e = calloc(1, sizeof *e);
    struct nbd_handle **hs = calloc(connections, sizeof *hs);
    uint64_t *payload = calloc(connections, sizeof *payload);
    int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!e || !hs || !payload || wake == -1) {
        fc_report_set(report, wake == -1 ? errno : ENOMEM, FC_CONN, "%s",
                      "no memory or file descriptor for a replica engine");
        if (wake != -1)
            close(wake);
        free(payload);
        free(hs);
        free(e);
        return NULL;
    }
    *e = (struct fc_engine) { .hs = hs, .payload = payload, .wake = wake, .retries = retries,
                              .io_timeout_ms = io_timeout_ms };
    hs[0] = fc_connect(uri, connect_timeout_ms, report);
    if (!hs[0]) {
        fc_close(e);
        return NULL;
    }
    e->nh = 1;
    struct nbd_handle *h = hs[0];
    *info = (struct fc_info) { .size = nbd_get_size(h), .can_zero = nbd_can_zero(h) == 1,
                               .can_flush = nbd_can_flush(h) == 1,
                               .can_multi_conn = nbd_can_multi_conn(h) == 1,
                               .can_fast_zero = nbd_can_fast_zero(h) == 1,
                               .read_only = nbd_is_read_only(h) == 1 };
    e->can_zero = info->can_zero;
    if (info->can_multi_conn && !info->read_only) {
        for (; e->nh < connections; e->nh++) {
            hs[e->nh] = fc_connect(uri, connect_timeout_ms, report);
            if (!hs[e->nh]) {
                fc_close(e);
                return NULL;
            }
        }
    }
    info->connections = e->nh;
    return e;
}

/* End the call running on `e` in another thread (it returns ECANCELED), and fail the engine.
 * The only call that may run concurrently with another on the same engine. */
void fc_cancel(struct fc_engine *e)
{
    uint64_t one = 1;
    atomic_store(&e->cancelled, 1);
    /* A full eventfd (EAGAIN) is already readable, which is all the poll needs. */
    if (write(e->wake, &one, sizeof one) < 0)
        return;
}

struct fc_batch *fc_batch_new(void)
{
    struct fc_batch *st = malloc(sizeof *st);
    if (st)
        atomic_init(&st->refs, 1);
    return st;
}

void fc_batch_free(struct fc_batch *st)
{
    fc_unref(st);
}

/*
 * Check a batch against an export of `size` bytes: pairs non-empty, ascending, disjoint and
 * within the export. Returns its total length, or -1 with *bad the index of the first bad pair.
 */
int64_t fc_check(const uint64_t *pairs, size_t n, uint64_t size, size_t *bad)
{
    uint64_t end = 0, total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t offset = pairs[2 * i], length = pairs[2 * i + 1];
        if (length == 0 || offset < end || offset > size || length > size - offset) {
            *bad = i;
            return -1;
        }
        end = offset + length;
        total += length;
    }
    return (int64_t) total;
}

/* Issue the commands of `n` pairs of `kind`, each cut into pieces of at most `limit` bytes;
 * a piece's bytes are at `buf`, which moves on with each piece if `advance` (data lie back to
 * back) and stays put otherwise (the shared zero buffer, or NULL for WRITE_ZEROES). */
static int fc_put_pairs(struct fc_engine *e, struct fc_batch *st, int kind, const unsigned char *buf,
                        int advance, const uint64_t *pairs, size_t n, uint64_t limit,
                        int max_inflight, struct fc_report *report)
{
    uint64_t before = fc_begin(e);
    for (size_t i = 0; i < n && !e->failed; i++) {
        for (uint64_t done = 0; done < pairs[2 * i + 1] && !e->failed;) {
            uint64_t piece = pairs[2 * i + 1] - done;
            piece = piece < limit ? piece : limit;
            fc_put(e, st, kind, buf, pairs[2 * i] + done, piece, max_inflight);
            buf += advance ? piece : 0;
            done += piece;
        }
    }
    return fc_end(e, before, report);
}

/*
 * Issue the WRITEs of `n` pairs (pairs[2i] = offset, pairs[2i+1] = length, checked by fc_check)
 * whose bytes lie one after another in `buf`, at most `max_inflight` commands outstanding.
 * Returns once all are issued: 0, or an errno with `report` filled.
 */
int fc_send(struct fc_engine *e, struct fc_batch *st, const uint64_t *pairs, size_t n,
            const unsigned char *buf, int max_inflight, struct fc_report *report)
{
    return fc_put_pairs(e, st, FC_DATA, buf, 1, pairs, n, FC_MAX_WRITE, max_inflight, report);
}

/* As fc_send, but the pairs are to read as zeros: WRITE_ZEROES (no NO_HOLE) in pieces of at
 * most 1 GiB, or WRITEs of the zero buffer in 1 MiB pieces where the replica cannot zero. */
int fc_send_zero(struct fc_engine *e, struct fc_batch *st, const uint64_t *pairs, size_t n,
                 int max_inflight, struct fc_report *report)
{
    return fc_put_pairs(e, st, FC_ZERO, e->can_zero ? NULL : fc_zeros, 0, pairs, n,
                        e->can_zero ? FC_MAX_ZERO : FC_ZERO_BUFFER, max_inflight, report);
}

/* Wait until every command of batch `st` has completed: 0, or an errno with `report` filled
 * (the engine's first failure, which may be another batch's). */
int fc_wait(struct fc_engine *e, struct fc_batch *st, struct fc_report *report)
{
    uint64_t before = fc_begin(e);
    fc_wait_batch(e, st);
    return fc_end(e, before, report);
}

/* FLUSH and wait for the reply, retried as a write is: 0, or an errno with `report` filled.
 * One FLUSH is enough: there is more than one connection only where the server advertises
 * multi-conn consistency, under which a FLUSH covers the writes completed on every connection. */
int fc_flush(struct fc_engine *e, struct fc_report *report)
{
    uint64_t before = fc_begin(e);
    struct fc_batch *st = fc_batch_new();
    if (!st) {
        fc_fail(e, ENOMEM, "%s", "out of memory for a flush");
        return fc_end(e, before, report);
    }
    fc_put(e, st, FC_FLUSH, NULL, 0, 0, INT_MAX);
    fc_wait_batch(e, st);
    fc_batch_free(st);
    return fc_end(e, before, report);
}
