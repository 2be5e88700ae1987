/*
 * The back end's reads and writes in C (no Python here; _build.py decides which calls keep
 * the GIL). be_pread and be_pwrite move the whole range (a short count is retried from where it
 * stopped); they and be_pread_batch return 0 or the errno of the first failure, EIO for a read
 * past the end.
 *
 * be_pread_batch: read many segments into one buffer in one call: the copier reads every
 * changed extent of a cycle, often thousands of 4 KiB ones, and a GIL round trip per pread(2)
 * dominated that. pairs[2i] = offset, pairs[2i+1] = length; the bytes land one after another.
 *
 * be_pread_cached: as much of the range as the page cache holds, without ever waiting for the
 * disk (preadv2 with RWF_NOWAIT): the bytes read, maybe short, or -errno (-EAGAIN: the first
 * page is not cached; -EOPNOTSUPP where the file system cannot tell).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* preadv2; Python.h, included first by cffi, defines it too */
#endif
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>
#include <unistd.h>

int be_pread(int fd, unsigned char *buf, size_t length, uint64_t offset)
{
    size_t done = 0;
    while (done < length) {
        ssize_t r = pread(fd, buf + done, length - done, offset + done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            return EIO;
        done += (size_t)r;
    }
    return 0;
}

int64_t be_pread_cached(int fd, unsigned char *buf, size_t length, uint64_t offset)
{
    struct iovec iov = {buf, length};
    ssize_t r = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
    return r < 0 ? -errno : r;
}

int be_pwrite(int fd, const unsigned char *buf, size_t length, uint64_t offset)
{
    size_t done = 0;
    while (done < length) {
        ssize_t r = pwrite(fd, buf + done, length - done, offset + done);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)   /* no progress, no error (a file system that cannot take more) */
            return EIO;
        done += (size_t)r;
    }
    return 0;
}

int be_pread_batch(int fd, const uint64_t *pairs, size_t n, unsigned char *buf)
{
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        int rc = be_pread(fd, buf + pos, pairs[2 * i + 1], pairs[2 * i]);
        if (rc)
            return rc;
        pos += pairs[2 * i + 1];
    }
    return 0;
}
