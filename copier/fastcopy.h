/*
 * Interface of fastcopy.c.  _build.py hands this file verbatim to cffi's cdef, so it holds only
 * declarations cffi can parse (no preprocessor lines); it is included once, by fastcopy.c.
 */

struct fc_engine;
struct fc_batch;
struct fc_info {
    int64_t size;
    int can_zero, can_flush, can_multi_conn, can_fast_zero, read_only;
    int connections;
};
/* What a call reports: errnum 0 on success; else the failure, `kind` naming the failed command. */
struct fc_report {
    int errnum;
    int kind;
    uint64_t offset;
    uint64_t length;
    int retries;         /* times the failed command had been re-issued */
    uint64_t retried;    /* commands re-issued during this call */
    char message[256];
};
/* What a failure was about: FC_CONN is a connection, a timeout or a cancel, not one command. */
enum {
    FC_CONN = 0,
    FC_DATA = 1,
    FC_ZERO = 2,
    FC_FLUSH = 3
};
struct fc_engine *fc_open(const char *uri, int connections, int connect_timeout_ms,
                          int io_timeout_ms, int retries, struct fc_info *info,
                          struct fc_report *report);
void fc_close(struct fc_engine *e);
void fc_cancel(struct fc_engine *e);
struct fc_batch *fc_batch_new(void);
void fc_batch_free(struct fc_batch *st);
int64_t fc_check(const uint64_t *pairs, size_t n, uint64_t size, size_t *bad);
int fc_send(struct fc_engine *e, struct fc_batch *st, const uint64_t *pairs, size_t n,
            const unsigned char *buf, int max_inflight, struct fc_report *report);
int fc_send_zero(struct fc_engine *e, struct fc_batch *st, const uint64_t *pairs, size_t n,
                 int max_inflight, struct fc_report *report);
int fc_wait(struct fc_engine *e, struct fc_batch *st, struct fc_report *report);
int fc_flush(struct fc_engine *e, struct fc_report *report);
