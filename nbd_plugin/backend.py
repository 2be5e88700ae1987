"""Back end: the bytes of one source, a regular file or a raw block device.

The plugin calls these methods from nbdkit's worker threads; every one of them is a single
system call (or a short loop of them) that releases the GIL, so concurrent requests overlap.

Zeroing and trimming use the cheapest call that makes the range read back as zeros:
``fallocate`` on files; on block devices ``fallocate`` and the ``BLKZEROOUT``/``BLKDISCARD``
ioctls, which take whole logical blocks only (EINVAL otherwise), so there they get the aligned
middle of a request and the unaligned head and tail are written as zeros. Whether a trim reads
back as zeros matters to replication: a trim recorded as a zero TE is sent to the replica as
WRITE_ZEROES, so it must only be recorded so where the source really reads zeros afterwards
(``trim_reads_zero``); elsewhere the plugin records it as data and the copier copies whatever
the device returns.
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
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
# Advertised request sizes. 4096, the page size, is the least preferred size: smaller writes
# cost a read-modify-write in the page cache. The maximum is the NBD protocol's: no limit of ours.
PAGE = 4096
NO_MAXIMUM = 0xFFFFFFFF
FILE_BLOCK_SIZES = (1, PAGE, NO_MAXIMUM)  # (minimum, preferred, maximum): any byte range works

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
        self.flush_error = None   # the errno of the first failed flush (see flush)
        self.is_block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.size = _device_size(self.fd, self.is_block)
        if self.size == 0:
            os.close(self.fd)
            raise BackendError(f"source {path!r} is empty (0 bytes): nothing to serve")
        self.block_sizes = _block_sizes(self.fd) if self.is_block else FILE_BLOCK_SIZES

    @property
    def trim_reads_zero(self):
        """A punched hole reads as zeros; a discarded block-device range need not."""
        return not self.is_block

    def close(self):
        """Close the file descriptor. O(1)."""
        os.close(self.fd)

    def pread(self, buf, offset):
        """Fill the writable buffer ``buf`` from ``offset``; a short read past the end is an error.

        A page-cache hit keeps the GIL; a miss releases it while the disk answers (``_build.py``
        says why). O(len).
        """
        data = _io_ffi.from_buffer(buf, require_writable=True)
        rc = _io_lib.be_pread(self.fd, data, len(data), offset)
        if rc:
            raise OSError(rc, f"{os.strerror(rc)} reading {len(data)} bytes at {offset} in {self.path}")

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
        """Write all of ``buf`` at ``offset``, without the GIL. O(len)."""
        data = _io_ffi.from_buffer(buf)
        rc = _io_lib.be_pwrite(self.fd, data, len(data), offset)
        if rc:
            raise self.write_error(rc, len(data), offset)

    def write_error(self, rc, length, offset):
        """The OSError for a write of ``length`` bytes at ``offset`` that failed with errno ``rc``."""
        return OSError(rc, f"{os.strerror(rc)} writing {length} bytes at {offset} in {self.path}")

    def flush(self):
        """Make every completed write durable. Cost: one fdatasync.

        A failure is sticky: Linux reports a write-back error once per open file, to
        whichever fdatasync asks first (the session's source sync, or a host's FLUSH), and
        marks the pages clean, so the next fdatasync succeeds with the write lost. Once one
        failed, every later flush raises the same error until the file is opened again (a
        restart): no host is told a lost write is durable, the dirty-region log never counts
        it as durable on the source, and a stop is not recorded as clean."""
        if self.flush_error is not None:
            raise OSError(self.flush_error, f"{os.strerror(self.flush_error)}: an earlier "
                          f"flush of {self.path} failed, so writes since its open may be lost")
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self.flush_error = e.errno or errno.EIO
            raise

    def zero(self, offset, length, may_trim, fast):
        """Make the range read as zeros, cheaper than writing them where the source allows.

        Raises OSError(EOPNOTSUPP) when that is not possible cheaply, so nbdkit falls back
        to writing zeros, or, for a ``fast`` request, when the source cannot zero the range
        faster than writing zeros (nbdkit then answers ENOTSUP and writes nothing).
        O(1) system calls; the kernel's work is O(length).
        """
        if self.is_block:
            return self._zero_block(offset, length, may_trim, fast)
        if may_trim and _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if not fast and _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        raise OSError(errno.EOPNOTSUPP, "zeroing is not supported here")

    def trim(self, offset, length):
        """Release the range: punch a hole in a file, discard on a block device.

        On a block device the trim is advisory: only whole logical blocks are discarded, and a
        device that cannot discard them is left as it is. O(1) system calls.
        """
        if self.is_block:
            return self._discard(offset, length)
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

    def _zero_block(self, offset, length, may_trim, fast):
        # nbdkit's file.c hands only aligned requests to BLKZEROOUT and leaves the rest to
        # nbdkit's pwrite fallback, which would write zeros over the whole range; here the
        # aligned middle still goes to the device and only the head and tail (each shorter than
        # a logical block) are written, as plain zeros: a buffered pwrite of any length works.
        start, end = self._aligned(offset, length)
        if start >= end:
            if fast:
                raise OSError(errno.EOPNOTSUPP, f"no whole block in {length} bytes at {offset} to zero fast")
            return self._write_zeros(offset, length)
        self._zero_aligned(start, end - start, may_trim, fast)
        self._write_zeros(offset, start - offset)
        self._write_zeros(end, offset + length - end)

    def _zero_aligned(self, offset, length, may_trim, fast):
        # Like file.c, punch first when trimming is allowed. On a block device fallocate's
        # PUNCH_HOLE asks for the device's own zeroing with no fallback (the kernel passes
        # BLKDEV_ZERO_NOFALLBACK) and may unmap, so it is fast or fails. BLKZEROOUT keeps the
        # blocks mapped but, lacking device support, the kernel writes zero pages itself, which
        # nbdkit-plugin(3) says is not fast: a fast request stops before it, having written nothing.
        if may_trim and _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if fast:
            raise OSError(errno.EOPNOTSUPP, f"{self.path} cannot zero {length} bytes at {offset} fast")
        try:
            self._ioctl_range(BLKZEROOUT, offset, length)
        except OSError as e:
            # file.c gives up on BLKZEROOUT on ENOTTY only; EOPNOTSUPP is the same answer.
            if e.errno not in (errno.ENOTTY, errno.EOPNOTSUPP):
                raise
            raise OSError(errno.EOPNOTSUPP, f"{self.path} does not support BLKZEROOUT") from None

    def _discard(self, offset, length):
        # Trim is advisory (file.c ignores failed trims too): a device that cannot discard, or
        # not these blocks, keeps its bytes. The plugin records a block-device trim as data, so
        # the copier sends whatever the range reads after it.
        start, end = self._aligned(offset, length)
        if start >= end:
            return
        try:
            self._ioctl_range(BLKDISCARD, start, end - start)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def _aligned(self, offset, length):
        """The whole logical blocks inside the range, as (start, end); start >= end if none."""
        block = self.block_sizes[0]
        return -(-offset // block) * block, (offset + length) // block * block

    def _write_zeros(self, offset, length):
        if length > 0:
            self.pwrite(bytes(length), offset)

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


def _block_sizes(fd):
    """(minimum, preferred, maximum) of a block device: its logical block, its physical block or a page."""
    logical = struct.unpack("I", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    physical = struct.unpack("I", fcntl.ioctl(fd, BLKPBSZGET, b"\0" * 4))[0]
    return logical, max(physical, PAGE), NO_MAXIMUM


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
