"""The back end on real block devices and on a full file system (issue 8, bugs 3 and 7).

Block devices are loop devices (the tests run as root) with 4096- and 512-byte logical blocks.
Over an image on the test's own file system the loop driver zeroes and discards by fallocate on
the image, so the device can zero without writing. Over an image on a ramfs, which has no
fallocate, the device can neither discard nor zero by itself: the kernel's BLKZEROOUT then writes
zero pages, which is the "cannot be done fast" case of a fast zero.

Each test reads the whole device back and compares it with a model of what must be there; the
end-to-end tests also check what the client sees (block sizes, errnos) and the tracker's report.
"""
import array
import collections
import contextlib
import ctypes
import errno
import json
import os
import threading

import nbd
import pytest
from conftest import Server, make_image, run

from nbd_plugin._io.lib import keep_thread_state
from nbd_plugin.backend import Backend

KiB = 1 << 10
MiB = 1 << 20
SIZE = 1 * MiB
SECTORS = [4096, 512]
CYCLE = ["--cycle", "3600"]


@pytest.fixture
def connect(kernel):
    """connect(uri) -> a libnbd handle. At teardown each one still connected disconnects, before
    ``kernel`` stops the servers: one with a client still connected may outlast SIGTERM's grace."""
    handles = []

    def connect_(nbd_uri):
        h = nbd.NBD()
        h.connect_uri(nbd_uri)
        handles.append(h)
        return h
    yield connect_
    for h in handles:
        if h.aio_is_ready() or h.aio_is_processing():
            h.shutdown()


Device = collections.namedtuple("Device", "path image data")


def device(kernel, sector, folder):
    """A loop device of SIZE bytes over an image in ``folder``, filled with random bytes."""
    image = make_image(os.path.join(folder, f"dev{len(kernel.loops)}.img"), SIZE)
    path = kernel.loop(image, sector)
    data = os.urandom(SIZE)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Device(path, image, data)


def opened(path):
    """``Backend(path)``, closed when the with-block ends."""
    return contextlib.closing(Backend(path))


def queue_limit(dev, name):
    """A block device's request-queue limit from sysfs, such as write_zeroes_max_bytes."""
    with open(f"/sys/block/{os.path.basename(dev.path)}/queue/{name}") as f:
        return int(f.read())


def ranges(block):
    """Requests named by what they cover: an unaligned head, whole blocks and an unaligned tail;
    a few bytes inside one block; whole blocks only. Disjoint, 64 KiB apart."""
    return {"unaligned": (64 * KiB + 100, 3 * block + 200),
            "inside one block": (128 * KiB + 10, 50),
            "aligned": (192 * KiB, 2 * block)}


def whole_blocks(offset, length, block):
    """(start, end) of the whole blocks inside a range; start == end if there are none."""
    start, end = -(-offset // block) * block, (offset + length) // block * block
    return start, max(start, end)


def assert_reads(backend, model, dev=None):
    """The device reads as ``model``; with ``dev``, after a flush, so does its image file."""
    assert os.pread(backend.fd, SIZE, 0) == bytes(model)
    if dev:
        backend.flush()
        with open(dev.image, "rb") as f:
            assert f.read() == bytes(model)


def zeroed(model, offset, length):
    model[offset:offset + length] = bytes(length)


# -- block sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("sector", SECTORS)
def test_block_sizes_are_the_devices_and_a_files_are_any_byte(kernel, tmp_path, sector):
    dev = device(kernel, sector, str(tmp_path))
    with opened(dev.path) as blockdev, opened(make_image(str(tmp_path / "file.img"), SIZE)) as regular:
        assert blockdev.block_sizes == (sector, 4096, 0xFFFFFFFF)
        assert regular.block_sizes == (1, 4096, 0xFFFFFFFF)


# -- zero ------------------------------------------------------------------------------------

@pytest.mark.parametrize("may_trim", [False, True])
@pytest.mark.parametrize("sector", SECTORS)
def test_zero_on_a_device_zeros_exactly_unaligned_ranges(kernel, tmp_path, sector, may_trim):
    dev = device(kernel, sector, str(tmp_path))
    model = bytearray(dev.data)
    with opened(dev.path) as backend:
        for offset, length in ranges(sector).values():
            backend.zero(offset, length, may_trim=may_trim, fast=False)
            zeroed(model, offset, length)
        assert_reads(backend, model, dev)


@pytest.mark.parametrize("sector", SECTORS)
def test_fast_zero_is_done_by_the_device_or_refused_untouched(kernel, tmp_path, sector):
    dev = device(kernel, sector, str(tmp_path))
    assert queue_limit(dev, "write_zeroes_max_bytes") > 0
    model = bytearray(dev.data)
    r = ranges(sector)
    with opened(dev.path) as backend:
        for name, may_trim in (("inside one block", True), ("unaligned", False)):
            with pytest.raises(OSError) as err:
                backend.zero(*r[name], may_trim=may_trim, fast=True)
            assert err.value.errno == errno.EOPNOTSUPP, name
        assert_reads(backend, model)
        backend.zero(*r["unaligned"], may_trim=True, fast=True)
        zeroed(model, *r["unaligned"])
        assert_reads(backend, model, dev)


def test_fast_zero_is_refused_where_the_kernel_would_write_zeros(kernel):
    dev = device(kernel, 4096, kernel.mount("ramfs"))
    assert queue_limit(dev, "write_zeroes_max_bytes") == 0
    model = bytearray(dev.data)
    r = ranges(4096)
    with opened(dev.path) as backend:
        with pytest.raises(OSError) as err:
            backend.zero(*r["unaligned"], may_trim=True, fast=True)
        assert err.value.errno == errno.EOPNOTSUPP
        assert_reads(backend, model)
        backend.zero(*r["unaligned"], may_trim=True, fast=False)
        backend.zero(*r["aligned"], may_trim=False, fast=False)
        zeroed(model, *r["unaligned"])
        zeroed(model, *r["aligned"])
        assert_reads(backend, model, dev)


def test_zero_without_blkzeroout_asks_nbdkit_to_write_and_writes_nothing(kernel, tmp_path, monkeypatch):
    dev = device(kernel, 4096, str(tmp_path))

    def no_ioctl(request, offset, length):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
    with opened(dev.path) as backend:
        monkeypatch.setattr(backend, "_ioctl_range", no_ioctl)
        with pytest.raises(OSError) as err:
            backend.zero(*ranges(4096)["unaligned"], may_trim=False, fast=False)
        assert err.value.errno == errno.EOPNOTSUPP
        assert_reads(backend, dev.data)


# -- trim ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sector, where", [(4096, "disk"), (512, "disk"), (4096, "ramfs")])
def test_trim_on_a_device_is_advisory_and_spares_partial_blocks(kernel, tmp_path, sector, where):
    dev = device(kernel, sector, str(tmp_path) if where == "disk" else kernel.mount("ramfs"))
    assert (queue_limit(dev, "discard_max_bytes") > 0) == (where == "disk")
    with opened(dev.path) as backend:
        for offset, length in ranges(sector).values():
            backend.trim(offset, length)
        after = os.pread(backend.fd, SIZE, 0)
    kept = bytearray(after)  # with the whole blocks a trim may discard put back as they were
    for offset, length in ranges(sector).values():
        start, end = whole_blocks(offset, length, sector)
        kept[start:end] = dev.data[start:end]
    assert kept == dev.data, "trim changed bytes outside the whole blocks of its range"
    if where == "ramfs":
        assert after == dev.data, "a device that cannot discard changed"


# -- end to end: a device served by nbdrep, a libnbd client -------------------------------------

def report(server):
    """Close the cycle and return its report's (data, zero) extents."""
    server.rp()
    exported = server.report()["exports"][""]
    return [tuple(e) for e in exported["data"]], [tuple(e) for e in exported["zero"]]


@pytest.mark.parametrize("sector", SECTORS)
def test_served_device_takes_unaligned_requests_and_tracks_them(kernel, procs, connect, tmp_path, sector):
    dev = device(kernel, sector, str(tmp_path))
    server = Server(procs, str(tmp_path), [dev.path], extra=CYCLE)
    server.rp()
    info = json.loads(run("nbdinfo", "--json", server.uri, timeout=60).stdout)["exports"][0]
    assert (info["block_size_minimum"], info["block_size_preferred"],
            info["block_size_maximum"]) == (sector, 4096, 0xFFFFFFFF)

    h = connect(server.uri)
    assert [h.get_block_size(s) for s in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)] == \
        [sector, 4096, 0xFFFFFFFF]
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)  # a client that ignores them
    model = bytearray(dev.data)
    write, zero, fast, trim = ((base + 100, 3 * sector + 200) for base in (0, 64 * KiB, 128 * KiB, 192 * KiB))
    payload = os.urandom(write[1])
    h.pwrite(payload, write[0])
    model[write[0]:write[0] + write[1]] = payload
    h.zero(zero[1], zero[0], nbd.CMD_FLAG_NO_HOLE)
    h.zero(fast[1], fast[0], nbd.CMD_FLAG_FAST_ZERO)
    zeroed(model, *zero)
    zeroed(model, *fast)
    h.trim(trim[1], trim[0], nbd.CMD_FLAG_FUA)
    h.flush()
    got = h.pread(SIZE, 0)
    start, end = whole_blocks(*trim, sector)
    model[start:end] = got[start:end]  # whatever the discarded blocks read now
    assert got == model
    assert report(server) == ([write, trim], [zero, fast])  # a device's trim is copied as data

    with pytest.raises(nbd.Error) as err:  # a fast zero that may not unmap: only by writing
        h.zero(3 * sector, 256 * KiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert err.value.errnum == errno.ENOTSUP
    assert h.pread(SIZE, 0) == got


# -- end to end: a full file system ---------------------------------------------------------------

def test_full_file_system_answers_enospc_and_keeps_serving(kernel, procs, connect, tmp_path):
    image = make_image(os.path.join(kernel.mount("tmpfs", "-o", "size=1m"), "disk.img"), 8 * MiB)
    server = Server(procs, str(tmp_path), [image], extra=CYCLE)
    server.rp()
    h = connect(server.uri)
    first = os.urandom(64 * KiB)
    h.pwrite(first, 0)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(os.urandom(2 * MiB), 4 * MiB)
    assert err.value.errnum == errno.ENOSPC
    assert h.pread(len(first), 0) == first
    # The failed write may have changed some of its bytes: it is tracked as data, all of it.
    assert report(server) == ([(0, 64 * KiB), (4 * MiB, 2 * MiB)], [])

    h.trim(2 * MiB, 4 * MiB)  # gives the full file system its pages back
    second = os.urandom(64 * KiB)
    h.pwrite(second, 7 * MiB)
    assert h.pread(len(second), 7 * MiB) == second and h.pread(len(first), 0) == first
    assert report(server) == ([(7 * MiB, 64 * KiB)], [(4 * MiB, 2 * MiB)])


# -- reads and writes from nbdkit's worker threads ------------------------------------------------

# A thread that Python did not create and that calls Python twice, the way nbdkit's workers call
# the plugin: each call enters with PyGILState_Ensure and leaves with PyGILState_Release (ctypes
# callbacks do exactly that). The plugin calls keep_thread_state at every request.
TWO_CALLS_C = r"""
#include <pthread.h>
struct job { void (*call)(int); };
static void *body(void *arg) { struct job *j = arg; j->call(0); j->call(1); return NULL; }
int call_twice_in_a_new_thread(void (*call)(int))
{
    struct job j = {call};
    pthread_t t;
    return pthread_create(&t, NULL, body, &j) || pthread_join(t, NULL);
}
"""


def thread_states():
    """How many Python thread states the interpreter holds."""
    api = ctypes.pythonapi
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.argtypes = api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
    api.PyInterpreterState_ThreadHead.restype = api.PyThreadState_Next.restype = ctypes.c_void_p
    n, ts = 0, api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Get())
    while ts:
        n, ts = n + 1, api.PyThreadState_Next(ts)
    return n


def test_a_worker_keeps_its_python_state_between_requests_and_frees_it_when_it_ends(tmp_path):
    # Without keep_thread_state, every request made and freed a thread state and its frame stack
    # (an mmap): the minimal plugin's 4k reads run at a third of nbdrep's.
    source = tmp_path / "helper.c"
    source.write_text(TWO_CALLS_C)
    run("cc", "-shared", "-fPIC", "-o", str(tmp_path / "helper.so"), str(source), "-lpthread")
    helper = ctypes.CDLL(str(tmp_path / "helper.so"))
    backend = Backend(make_image(str(tmp_path / "disk.img"), MiB, random_mib=1))
    mine, seen = threading.local(), []

    def call(i):
        keep_thread_state()
        if i == 0:
            backend.pread(bytearray(4096), 0)
            mine.mark = "kept"
        else:
            seen.extend([getattr(mine, "mark", "a new thread state"), thread_states()])
    before = thread_states()
    call_c = ctypes.CFUNCTYPE(None, ctypes.c_int)(call)
    assert helper.call_twice_in_a_new_thread(call_c) == 0
    backend.close()
    assert seen == ["kept", before + 1]
    assert thread_states() == before


def test_a_read_takes_the_cached_part_then_waits_for_the_rest(tmp_path):
    image = make_image(str(tmp_path / "disk.img"), MiB, random_mib=1)
    with open(image, "rb") as f:
        data = f.read()
    with opened(image) as backend:
        os.fsync(backend.fd)
        os.posix_fadvise(backend.fd, 0, MiB, os.POSIX_FADV_DONTNEED)
        os.pread(backend.fd, 8 * KiB, 64 * KiB)   # the first half of the range below is cached
        probe = bytearray(16 * KiB)
        assert os.preadv(backend.fd, [probe], 64 * KiB, os.RWF_NOWAIT) == 8 * KiB
        buf = bytearray(16 * KiB + 100)
        backend.pread(buf, 64 * KiB)
        assert buf == data[64 * KiB:80 * KiB + 100]
        with pytest.raises(OSError) as err:
            backend.pread(bytearray(200), MiB - 100)
        assert err.value.errno == errno.EIO and "reading 200 bytes at 1048476" in str(err.value)


def test_a_write_writes_all_of_any_buffer_and_names_a_failure(tmp_path):
    image = make_image(str(tmp_path / "disk.img"), MiB)
    payload = os.urandom(3 * 4096 + 5)
    with opened(image) as backend:
        backend.pwrite(memoryview(payload), 100)
        backend.pwrite(array.array("I", [1, 2]), MiB - 8)   # any buffer, counted in bytes
        assert os.pread(backend.fd, len(payload), 100) == payload
        assert os.pread(backend.fd, 8, MiB - 8) == array.array("I", [1, 2]).tobytes()
    with opened(image) as backend:
        os.close(backend.fd)
        backend.fd = os.open(image, os.O_RDONLY)
        with pytest.raises(OSError) as err:
            backend.pwrite(b"x", 0)
        assert err.value.errno == errno.EBADF and "writing 1 bytes at 0" in str(err.value)


def test_a_failed_flush_fails_every_later_one(tmp_path, monkeypatch):
    """Linux reports a write-back error to the first fdatasync only; a second one succeeds
    with the write lost. A host's FLUSH after the session's source sync met the error must
    fail too, and so must the sync after it (the dirty-region log would count it durable)."""
    b = Backend(make_image(str(tmp_path / "src.img"), 1 << 20))
    try:
        b.pwrite(b"\x01" * 4096, 0)
        real, calls = os.fdatasync, []

        def write_back_failed_once(fd):
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)
        monkeypatch.setattr(os, "fdatasync", write_back_failed_once)
        for _ in range(3):
            with pytest.raises(OSError) as e:
                b.flush()
            assert e.value.errno == errno.EIO
    finally:
        b.close()
    b = Backend(str(tmp_path / "src.img"))   # a restart opens the file again
    try:
        b.flush()
    finally:
        b.close()
