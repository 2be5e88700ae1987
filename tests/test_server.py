"""End-to-end tests of ``nbdrep serve`` with real clients: nbdinfo, libnbd, fio, nbdfuse + dd,
and mkfs/mount/fsck on a loop device over nbdfuse.

Every test also checks the tracker against the back-end file itself, not against what the test
believes it wrote. The server runs with ``--cycle 3600``, so cycles close only on request: an RP
before the workload starts an empty cycle, an RP after it closes the cycle that holds exactly the
workload. Then a copy of the image taken before is compared with the image after:

* nothing lost (invariant 1): every changed byte lies inside a data or zero extent of the report;
* exact report (invariant 2), for workloads of random data in whole 4 KiB blocks (fio, dd from
  /dev/urandom): the data extents are exactly the changed blocks. Random data leaves a written
  byte unchanged with probability 1/256, but a written 4 KiB block unchanged with probability
  2^-32768, so the comparison is exact at block granularity.

A file system's own writes (mkfs, journal) are not random, and may rewrite bytes with their old
value, so there only the first property holds.
"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time

import nbd
import numpy as np
import pytest
from conftest import Server, make_image, mounted, nbdrep, uri

BLOCK = 4096
CHUNK = 8 << 20
MiB = 1 << 20
CYCLE = ["--cycle", "3600"]


# -- image comparison ----------------------------------------------------------------------------

def snapshot(path, tmp_path):
    """A sparse copy of the image at ``path``, to compare with later."""
    copy = str(tmp_path / (os.path.basename(path) + ".before"))
    subprocess.run(["cp", "--sparse=always", path, copy], check=True, timeout=120)
    return copy


def changed_runs(before, after):
    """Runs of changed bytes between two equal-sized images: (starts, ends) arrays. O(size)."""
    starts, ends = [], []
    with open(before, "rb") as a, open(after, "rb") as b:
        base = 0
        while True:
            x, y = a.read(CHUNK), b.read(CHUNK)
            assert len(x) == len(y), "the image changed size"
            if not x:
                break
            s, e = _runs(np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8)))
            starts.append(s + base)
            ends.append(e + base)
            base += len(x)
    return np.concatenate(starts), np.concatenate(ends)


def _runs(idx):
    """Sorted distinct positions -> (starts, ends) of their maximal runs."""
    if idx.size == 0:
        return idx, idx
    breaks = np.flatnonzero(np.diff(idx) != 1)
    return idx[np.r_[0, breaks + 1]], idx[np.r_[breaks, idx.size - 1]] + 1


def merge(extents):
    """[(offset, length)] -> sorted, maximal, disjoint and non-adjacent extents."""
    out = []
    for off, length in sorted(extents):
        if out and off <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        elif length:
            out.append((off, length))
    return out


def block_extents(starts, ends, block=BLOCK):
    """The changed runs widened to whole blocks, as maximal byte extents."""
    first, last = starts // block, (ends + block - 1) // block
    return merge((int(f) * block, int(e - f) * block) for f, e in zip(first, last))


def uncovered(starts, ends, extents):
    """The changed runs that the ``extents`` do not cover, as (start, end) pairs."""
    cover = merge(extents)
    cs = np.array([o for o, _ in cover] or [0], dtype=np.int64)
    ce = np.array([o + n for o, n in cover] or [0], dtype=np.int64)
    i = np.searchsorted(cs, starts, side="right") - 1
    ok = (i >= 0) & (ce[np.maximum(i, 0)] >= ends)
    return list(zip(starts[~ok].tolist(), ends[~ok].tolist()))


def check_tracker(server, before, after, name="", exact=False):
    """Close the cycle and check its report against the image change; returns the report's extents."""
    server.rp()
    report = server.report()["exports"][name]
    data = [tuple(e) for e in report["data"]]
    zero = [tuple(e) for e in report["zero"]]
    starts, ends = changed_runs(before, after)
    missing = uncovered(starts, ends, data + zero)
    assert not missing, f"changed bytes outside the report (first 5): {missing[:5]}"
    if exact:
        assert data == block_extents(starts, ends), "data extents differ from the changed blocks"
        assert zero == []
    return data, zero


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def serve(procs, tmp_path):
    """Factory: an image of ``size`` bytes served by nbdrep (tracking only), cycle started afresh."""
    def start(size, random_mib=0, extra=()):
        image = make_image(str(tmp_path / "disk.img"), size, random_mib)
        server = Server(procs, str(tmp_path), [image], extra=[*CYCLE, *extra])
        server.rp()
        return server, image, snapshot(image, tmp_path)
    return start


@pytest.fixture
def fuse(procs, tmp_path):
    """Factory: expose an NBD URI as a file through nbdfuse; unmounted and stopped at teardown."""
    started = []

    def attach(nbd_uri):
        mnt = tmp_path / "fuse"
        mnt.mkdir()
        disk = str(mnt / "disk")
        proc = procs.start(["nbdfuse", disk, nbd_uri], wait_for=disk, timeout=60,
                           stdout=subprocess.DEVNULL)
        started.append((mnt, proc))
        return disk
    yield attach
    for mnt, proc in started:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True, timeout=60)
        procs.stop(proc)


@pytest.fixture
def loop(fuse):
    """Factory: ``losetup`` a file; ``loop.detach(dev)`` early, or teardown detaches it, always."""
    attached = []

    def attach(path):
        out = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True,
                             check=True, timeout=60)
        attached.append(out.stdout.strip())
        return attached[-1]

    def detach(dev):
        subprocess.run(["losetup", "-d", dev], check=True, timeout=60)
        attached.remove(dev)
    attach.detach = detach
    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=60)


def connect(nbd_uri, meta=False):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(nbd_uri)
    return h


def run(cmd, timeout=120, cwd=None):
    """Run a tool to completion, failing the test with its output if it fails."""
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, f"{cmd[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


# -- 1. clients see the right export, and get back what they wrote -----------------------------

def test_nbdinfo_shows_size_and_capabilities(serve):
    server, image, before = serve(24 * MiB)
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == 24 * MiB
    for cap in ("can_flush", "can_fua", "can_zero", "can_fast_zero", "can_trim", "can_multi_conn",
                "can_cache"):
        assert export[cap] is True, cap
    assert export["is_read_only"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 0xFFFFFFFF)
    assert check_tracker(server, before, image) == ([], [])


def test_named_exports_are_listed_and_tracked_apart(procs, tmp_path):
    a = make_image(str(tmp_path / "a.img"), 4 * MiB)
    b = make_image(str(tmp_path / "b.img"), 12 * MiB)
    server = Server(procs, str(tmp_path), [f"alpha={a}", f"beta={b}"], extra=CYCLE)
    server.rp()
    before = snapshot(b, tmp_path)
    listing = json.loads(run(["nbdinfo", "--list", "--json", server.uri]).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes == {"alpha": 4 * MiB, "beta": 12 * MiB}
    h = connect(server.uri.replace(":///", ":///beta"))
    h.pwrite(os.urandom(3 * BLOCK), 5 * BLOCK)
    h.shutdown()
    assert check_tracker(server, before, b, name="beta", exact=True)[0] == [(5 * BLOCK, 3 * BLOCK)]
    assert server.report()["exports"]["alpha"] == {"data": [], "zero": []}


def test_libnbd_reads_back_writes_zeros_trims_and_holes(serve):
    server, image, before = serve(8 * MiB, random_mib=2)
    h = connect(server.uri, meta=True)
    a, b = os.urandom(64 << 10), os.urandom(8 << 10)
    h.pwrite(a, 3 * MiB)
    h.pwrite(b, 256 << 10, nbd.CMD_FLAG_FUA)
    h.zero(128 << 10, 512 << 10)
    h.trim(64 << 10, 1 * MiB)
    h.flush()
    h.cache(1 * MiB, 0)
    assert h.pread(len(a), 3 * MiB) == a
    assert h.pread(len(b), 256 << 10) == b
    assert h.pread(128 << 10, 512 << 10) == bytes(128 << 10)
    assert h.pread(64 << 10, 1 * MiB) == bytes(64 << 10)
    sparse = block_status(h, 6 * MiB, 2 * MiB)
    assert sparse and all(flags == nbd.STATE_HOLE | nbd.STATE_ZERO for _, flags in sparse)
    assert block_status(h, 3 * MiB, 64 << 10)[0][1] == 0
    h.shutdown()
    data, zero = check_tracker(server, before, image)
    assert data == [(256 << 10, 8 << 10), (3 * MiB, 64 << 10)]
    assert zero == [(512 << 10, 128 << 10), (1 * MiB, 64 << 10)]
    starts, ends = changed_runs(before, image)
    assert block_extents(starts, ends) == merge(data + zero)


def block_status(h, offset, count):
    """[(length, flags)] of base:allocation from ``offset`` (at most ``count`` bytes asked)."""
    found = []

    def extent(context, off, entries, err):
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            found.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, offset, extent)
    return found


def test_readonly_refuses_writes_and_changes_nothing(serve):
    server, image, before = serve(4 * MiB, random_mib=1, extra=["--readonly"])
    digest = sha256(image)
    h = connect(server.uri)
    assert h.is_read_only()
    h.set_strict_mode(0)  # send the writes anyway: the server itself must refuse them
    for write in (lambda: h.pwrite(b"x" * BLOCK, 0), lambda: h.zero(BLOCK, 0),
                  lambda: h.trim(BLOCK, 0)):
        with pytest.raises(nbd.Error) as err:
            write()
        assert err.value.errnum in (errno.EPERM, errno.EROFS)
    with open(image, "rb") as f:
        assert h.pread(BLOCK, 0) == f.read(BLOCK)
    h.shutdown()
    assert sha256(image) == digest
    assert check_tracker(server, before, image) == ([], [])


# -- 2. bad parameters fail at start-up with a clear message and touch no data ------------------

def serve_fails(tmp_path, *args):
    """Run ``nbdrep serve`` that must fail by itself; returns its stderr."""
    sock = str(tmp_path / "bad.sock")
    cmd = ["serve", "--socket", sock, "--state", str(tmp_path / "state"), *args]
    done = nbdrep(*cmd, check=False, timeout=60)
    assert done.returncode != 0, done.stdout
    return done.stderr


@pytest.mark.parametrize("what, message", [("missing", "does not exist"),
                                           ("directory", "is a directory")])
def test_bad_source_fails_at_start(tmp_path, what, message):
    path = tmp_path / what
    if what == "directory":
        path.mkdir()
    assert message in serve_fails(tmp_path, "--source", str(path))
    assert not (tmp_path / "missing").exists()
    assert not path.is_dir() or not any(path.iterdir())


def test_bad_cycle_fails_before_opening_the_source(tmp_path):
    image = make_image(str(tmp_path / "disk.img"), MiB, random_mib=1)
    digest = sha256(image)
    assert "cycle='-1' must be > 0" in serve_fails(tmp_path, "--source", image, "--cycle=-1")
    assert sha256(image) == digest


def test_unknown_export_name_cannot_connect(procs, tmp_path):
    image = make_image(str(tmp_path / "disk.img"), MiB)
    server = Server(procs, str(tmp_path), [f"known={image}"], extra=CYCLE)
    with pytest.raises(nbd.Error):
        connect(server.uri.replace(":///", ":///unknown"))
    assert subprocess.run(["nbdinfo", server.uri.replace(":///", ":///unknown")],
                          check=False, capture_output=True, timeout=60).returncode != 0
    connect(server.uri.replace(":///", ":///known")).shutdown()


def test_size_change_across_restarts_is_refused(procs, tmp_path):
    image = make_image(str(tmp_path / "disk.img"), 2 * MiB, random_mib=1)
    server = Server(procs, str(tmp_path), [image], extra=CYCLE)
    procs.stop(server.proc)
    subprocess.run(["truncate", "-s", str(3 * MiB), image], check=True, timeout=60)
    digest = sha256(image)
    stderr = serve_fails(tmp_path, "--source", image)
    assert "3145728 bytes but was 2097152 bytes" in stderr
    assert sha256(image) == digest


# -- 3. fio with verification, four jobs on disjoint regions -------------------------------------

def fio_json(stdout):
    """fio's JSON report; the nbd engine prints a line or two before it on stdout."""
    return json.loads(stdout[stdout.index("{"):])


def test_fio_randwrite_verifies_and_is_tracked(serve, tmp_path):
    server, image, before = serve(40 * MiB)
    done = run(["fio", "--name=nbdrep", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
                "--bs=4k", "--iodepth=8", "--numjobs=4", "--offset=4M", "--size=8M",
                "--offset_increment=8M", "--io_size=4M", "--verify=crc32c", "--do_verify=1",
                "--verify_fatal=1", "--output-format=json"], timeout=300,
               cwd=tmp_path)  # fio --verify leaves a *-verify.state file per job in its cwd
    jobs = fio_json(done.stdout)["jobs"]
    assert [j["error"] for j in jobs] == [0] * 4
    assert all(j["write"]["io_bytes"] == 4 * MiB and j["read"]["io_bytes"] == 4 * MiB for j in jobs)
    assert "verify" not in done.stderr
    data, _ = check_tracker(server, before, image, exact=True)
    assert sum(n for _, n in data) == 16 * MiB
    assert 4 * MiB <= data[0][0] and data[-1][0] + data[-1][1] <= 36 * MiB


# -- 4. dd through nbdfuse --------------------------------------------------------------------

def test_dd_through_nbdfuse_is_tracked_exactly(serve, fuse):
    server, image, before = serve(16 * MiB)
    disk = fuse(server.uri)
    for count, seek in ((16, 3), (8, 100), (1, 255)):
        run(["dd", "if=/dev/urandom", f"of={disk}", "bs=64k", f"count={count}", f"seek={seek}",
             "conv=notrunc,fsync", "status=none"])
    data, _ = check_tracker(server, before, image, exact=True)
    k64 = 64 << 10
    assert data == [(3 * k64, 16 * k64), (100 * k64, 8 * k64), (255 * k64, k64)]


# -- 5. file systems on a loop device over nbdfuse -------------------------------------------------

FILESYSTEMS = {
    "ext4": (256 * MiB, ["mkfs.ext4", "-q", "-F"], ["e2fsck", "-fn"]),
    "xfs": (320 * MiB, ["mkfs.xfs", "-q", "-f"], ["xfs_repair", "-n"]),  # xfsprogs 6.1: >= 300 MB
}


@pytest.mark.parametrize("fs", sorted(FILESYSTEMS))
def test_filesystem_on_loop_over_nbdfuse(serve, fuse, loop, tmp_path, fs):
    if shutil.which("losetup") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs losetup and /dev/fuse")
    size, mkfs, fsck = FILESYSTEMS[fs]
    server, image, before = serve(size)
    disk = fuse(server.uri)
    dev = loop(disk)
    run([*mkfs, dev])
    payload = os.urandom(3 * MiB + 1234)
    with mounted(dev, str(tmp_path / "mnt")) as mnt, open(os.path.join(mnt, "payload"), "wb") as f:
        f.write(payload)
        os.fsync(f.fileno())
    run([*fsck, dev])
    with mounted(dev, str(tmp_path / "mnt"), "-o", "ro") as mnt:
        assert sha256(os.path.join(mnt, "payload")) == hashlib.sha256(payload).hexdigest()
    loop.detach(dev)
    with open(disk, "rb") as f:
        os.fsync(f.fileno())
    data, _ = check_tracker(server, before, image)
    assert sum(n for _, n in data) >= len(payload)


def test_tracker_check_catches_a_write_behind_the_servers_back(serve):
    server, image, before = serve(4 * MiB)
    h = connect(server.uri)
    h.pwrite(os.urandom(BLOCK), 0)
    h.shutdown()
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(16))
    with pytest.raises(AssertionError, match="outside the report"):
        check_tracker(server, before, image)


# -- 6. a slow request on one connection does not hold up the others ----------------------------

SLOW = 4   # seconds each read and write of the slow source's own back end takes


def test_a_cold_read_or_a_flush_on_one_connection_does_not_hold_up_another(procs, nbdkit, fuse, tmp_path):
    # The slow source is a file on nbdfuse over nbdkit's delay filter: a read that misses the
    # page cache, and a write (or the flush that pushes it out), waits SLOW seconds there. A
    # worker that kept the GIL while it waited would stall every other connection that long.
    slow_sock, _ = nbdkit("--filter=delay", "memory", "16M", f"rdelay={SLOW}", f"wdelay={SLOW}")
    slow = fuse(uri(slow_sock))
    fast = make_image(str(tmp_path / "fast.img"), 4 * MiB, random_mib=4)
    server = Server(procs, str(tmp_path), [f"slow={slow}", f"fast={fast}"], extra=CYCLE)
    hs = connect(server.uri.replace(":///", ":///slow"))
    hf = connect(server.uri.replace(":///", ":///fast"))
    data = hf.pread(4 * MiB, 0)   # the fast source is in the page cache now

    started = time.monotonic()
    cookies = [hs.aio_pread(nbd.Buffer(BLOCK), 0),
               hs.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(BLOCK)), MiB), hs.aio_flush()]
    for i in range(200):
        offset = i * 7919 % 1024 * BLOCK
        assert hf.pread(BLOCK, offset) == data[offset:offset + BLOCK]
    fast_done = time.monotonic() - started
    for cookie in cookies:
        while not hs.aio_command_completed(cookie):
            assert time.monotonic() - started < 20 * SLOW, "the slow source never answered"
            hs.poll(1000)
    slow_done = time.monotonic() - started
    assert slow_done >= SLOW, "the slow source answered at once: the test proves nothing"
    assert fast_done < SLOW / 2, \
        f"200 cached reads took {fast_done:.1f} s beside a slow read, write and flush"
    hs.shutdown()
    hf.shutdown()
