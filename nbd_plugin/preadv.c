/*
 * Read a batch of segments of the back end into one buffer, in one call without the GIL: the
 * copier reads every changed extent of a cycle, often thousands of 4 KiB ones, and a GIL round
 * trip per pread(2) dominated that. pairs[2i] = offset, pairs[2i+1] = length; the bytes land
 * one after another in `buf`. Returns 0, or the errno of the first failure (EIO at end of file).
 */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

int be_pread_batch(int fd, const uint64_t *pairs, size_t n, unsigned char *buf)
{
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t offset = pairs[2 * i], length = pairs[2 * i + 1], done = 0;
        while (done < length) {
            ssize_t r = pread(fd, buf + pos + done, length - done, offset + done);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0)
                return errno;
            if (r == 0)
                return EIO;
            done += (uint64_t)r;
        }
        pos += length;
    }
    return 0;
}
