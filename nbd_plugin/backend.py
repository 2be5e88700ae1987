"""Back end: the bytes of one source, a regular file or a raw block device.

The plugin calls these methods from nbdkit's worker threads; every one of them is a single
system call (or a short loop of them) that releases the GIL, so concurrent requests overlap.

Zeroing and trimming use the cheapest call that makes the range read back as zeros:
``fallocate`` on files, the ``BLKZEROOUT``/``BLKDISCARD`` ioctls on block devices. Whether a
trim reads back as zeros matters to replication: a trim recorded as a zero TE is sent to the
replica as WRITE_ZEROES, so it must only be recorded so where the source really reads zeros
afterwards (``trim_reads_zero``); elsewhere the plugin records it as data and the copier copies
whatever the device returns.
"""
import ctypes
import errno
import fcntl
import os
import stat
import struct

from nbd_plugin._io import ffi as _io_ffi, lib as _io_lib

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class BackendError(Exception):
    """A source that cannot be served: missing, a directory, unreadable, or of size zero."""


class Backend:
    """One opened source. Thread-safe: every method is a positioned system call."""

    def __init__(self, path, readonly=False):
        self.path = path
        self.readonly = readonly
        self.fd = _open_source(path, readonly)
        self.is_block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.size = _device_size(self.fd, self.is_block)
        if self.size == 0:
            os.close(self.fd)
            raise BackendError(f"source {path!r} is empty (0 bytes): nothing to serve")

    @property
    def trim_reads_zero(self):
        """A punched hole reads as zeros; a discarded block-device range need not."""
        return not self.is_block

    def close(self):
        """Close the file descriptor. O(1)."""
        os.close(self.fd)

    def pread(self, buf, offset):
        """Fill ``buf`` from ``offset``; a short read past the end is an error. O(len)."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"short read at {offset + done} in {self.path}")
            done += n

    def read(self, offset, length):
        """Return ``length`` bytes from ``offset`` (the keep-aside store's reads). O(length)."""
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        self.pread(buf, offset)
        return bytes(buf)

    def read_batch(self, pairs, into):
        """Read many segments back to back into the buffer ``into``, in one call without the GIL.

        ``pairs``: an array('Q') of (offset, length) pairs. The caller reuses ``into``: fresh
        memory for every batch cost more in page faults than the reads themselves. O(total length).
        """
        if len(into) < sum(pairs[1::2]):
            raise ValueError(f"buffer of {len(into)} bytes is smaller than the batch")
        rc = _io_lib.be_pread_batch(self.fd, _io_ffi.from_buffer("uint64_t[]", pairs), len(pairs) // 2,
                                    _io_ffi.from_buffer(into, require_writable=True))
        if rc:
            raise OSError(rc, f"{os.strerror(rc)} reading {self.path}")

    def pwrite(self, buf, offset):
        """Write all of ``buf`` at ``offset``. O(len)."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def flush(self):
        """Make every completed write durable. Cost: one fdatasync."""
        os.fdatasync(self.fd)

    def zero(self, offset, length, may_trim, fast):
        """Make the range read as zeros without writing data.

        Raises OSError(EOPNOTSUPP) when that is not possible cheaply, so nbdkit falls back
        to writing zeros (or, for a fast-zero request, tells the client it would be slow).
        """
        if self.is_block:
            return self._ioctl_range(BLKZEROOUT, offset, length)
        if may_trim and _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if not fast and _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        raise OSError(errno.EOPNOTSUPP, "zeroing is not supported here")

    def trim(self, offset, length):
        """Release the range: punch a hole in a file, discard on a block device."""
        if self.is_block:
            return self._ioctl_range(BLKDISCARD, offset, length)
        if not _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            raise OSError(errno.EOPNOTSUPP, "punching holes is not supported here")

    def cache(self, offset, length):
        """Ask the kernel to read the range ahead. O(1)."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset, length):
        """Data and hole extents covering [offset, offset+length): list of (offset, length, is_hole).

        Holes come from SEEK_DATA/SEEK_HOLE; a block device is reported as all data.
        O(number of extents in the range).
        """
        end = min(offset + length, self.size)
        if self.is_block:
            return [(offset, end - offset, False)]
        out = []
        pos = offset
        while pos < end:
            data = _seek(self.fd, pos, os.SEEK_DATA, end)
            if data > pos:
                out.append((pos, min(data, end) - pos, True))
            if data >= end:
                break
            hole = min(_seek(self.fd, data, os.SEEK_HOLE, end), end)
            out.append((data, hole - data, False))
            pos = hole
        return out

    def _ioctl_range(self, request, offset, length):
        fcntl.ioctl(self.fd, request, struct.pack("QQ", offset, length))


def _open_source(path, readonly):
    if not path:
        raise BackendError("empty source path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BackendError(f"source {path!r} does not exist") from None
    except OSError as e:
        raise BackendError(f"source {path!r}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BackendError(f"source {path!r} is a directory, not a file or block device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BackendError(f"source {path!r} is neither a regular file nor a block device")
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as e:
        raise BackendError(f"cannot open source {path!r}: {e.strerror}") from None


def _device_size(fd, is_block):
    if is_block:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return os.fstat(fd).st_size


def _fallocate(fd, mode, offset, length):
    """True if done; False if this file system cannot; other errors raise."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _seek(fd, pos, whence, end):
    """lseek that maps 'no more data' (ENXIO) to ``end``."""
    try:
        return os.lseek(fd, pos, whence)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end
        raise
