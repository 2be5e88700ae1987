"""Replica against real nbdkit servers on unix sockets under tmp_path."""

import array
import errno
import hashlib
import os
import random
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import uri
from copier.replica import Replica, ReplicaError, parse_uri, pieces, validate_sgl
from procs import Procs

MiB = 1 << 20


def make_image(path, size, seed):
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return bytearray(data)


def apply(image, source, sgl):
    """The oracle: what the replica must read after executing `sgl`."""
    for offset, length, kind in sgl:
        if kind == "data":
            image[offset:offset + length] = source[offset:offset + length]
        else:
            image[offset:offset + length] = bytes(length)


def reader(source):
    return lambda offset, length: memoryview(source)[offset:offset + length]


def digest(path):
    return hashlib.blake2b(path.read_bytes()).hexdigest()


MIXED_SGL = [
    (0, 4096, "data"),
    (4096, 12288, "zero"),
    (20000, 777, "data"),
    (65536, 3 * MiB, "trim"),
    (4 * MiB, 1 * MiB + 5, "data"),
    (5 * MiB + 100, 2 * MiB, "zero"),
    (7 * MiB + 200, 100, "trim"),
    (8 * MiB - 4096, 4096, "data"),
]


@pytest.mark.parametrize("connections", [1, 3])
@pytest.mark.parametrize("filters", [[], ["--filter=nozero"]], ids=["zero", "nozero"])
def test_execute_mixed_sgl_matches_oracle(nbdkit, tmp_path, connections, filters):
    img = tmp_path / "replica.img"
    image = make_image(img, 8 * MiB, seed=1)
    source = bytearray(random.Random(2).randbytes(8 * MiB))
    sock, _ = nbdkit(*filters, "file", str(img))
    calls = []
    with Replica(uri(sock), connections=connections) as r:
        assert r.can_zero == (not filters)
        counts = r.execute(MIXED_SGL, reader(source), max_inflight=3,
                           progress=lambda d, t: calls.append((d, t)))
        r.flush()
    apply(image, source, MIXED_SGL)
    assert img.read_bytes() == image
    sizes = {k: sum(n for _, n, kind in MIXED_SGL if kind == k) for k in ("data", "zero", "trim")}
    assert counts == {"bytes_copied": sizes["data"], "bytes_zeroed": sizes["zero"],
                      "bytes_trimmed": sizes["trim"], "segments": len(MIXED_SGL)}
    assert calls[-1] == (sum(sizes.values()), sum(sizes.values()))


def test_properties_and_size(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    make_image(img, 3 * MiB, seed=3)
    sock, _ = nbdkit("file", str(img))
    with Replica(uri(sock)) as r:
        assert r.size == 3 * MiB
        assert r.can_flush and r.can_zero and r.can_trim
        r.check_size(3 * MiB)
        r.check_size(0)


@pytest.fixture(scope="module")
def shared_replica(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shared")
    img = directory / "replica.img"
    image = make_image(img, 2 * MiB, seed=4)
    sock = str(directory / "r.sock")
    with Procs() as procs:
        procs.start(["nbdkit", "--foreground", "--exit-with-parent", "-U", sock, "file", str(img)],
                    wait_for=sock)
        with Replica(uri(sock), connections=2) as r:
            yield r, img, image


@st.composite
def sgls(draw, size=2 * MiB):
    cuts = sorted(set(draw(st.lists(st.integers(0, size), min_size=1, max_size=30))))
    bounds = list(zip(cuts, cuts[1:]))
    kinds = draw(st.lists(st.sampled_from(["data", "zero", "trim", None]),
                          min_size=len(bounds), max_size=len(bounds)))
    return [(a, b - a, k) for (a, b), k in zip(bounds, kinds) if k]


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sgl=sgls(), seed=st.integers(0, 2**32), inflight=st.integers(1, 8))
def test_random_sgl_matches_oracle(shared_replica, sgl, seed, inflight):
    r, img, image = shared_replica
    source = bytearray(random.Random(seed).randbytes(r.size))
    r.execute(sgl, reader(source), max_inflight=inflight)
    r.flush()
    apply(image, source, sgl)
    assert img.read_bytes() == image


def test_too_small_replica_is_refused_and_untouched(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    make_image(img, 1 * MiB, seed=5)
    before = digest(img)
    sock, _ = nbdkit("file", str(img))
    with Replica(uri(sock)) as r:
        with pytest.raises(ReplicaError, match=r"replica is smaller than the source "
                                               r"\(1048576 < 2097152 bytes\)"):
            r.check_size(2 * MiB)
        with pytest.raises(ValueError, match="past the replica"):
            r.execute([(0, 4096, "data"), (MiB - 10, 20, "zero")], reader(bytearray(2 * MiB)))
    assert digest(img) == before


@pytest.mark.parametrize("sgl, message", [
    ([(0, 10, "copy")], "bad segment kind"),
    ([(100, 10, "data"), (50, 10, "data")], "out of order"),
    ([(0, 10, "data"), (5, 10, "zero")], "overlaps"),
    ([(0, 0, "zero")], "empty"),
])
def test_bad_sgl_raises_before_writing(nbdkit, tmp_path, sgl, message):
    img = tmp_path / "replica.img"
    make_image(img, MiB, seed=6)
    before = digest(img)
    sock, _ = nbdkit("file", str(img))
    with Replica(uri(sock)) as r:
        with pytest.raises(ValueError, match=message):
            r.execute(sgl, reader(bytearray(MiB)))
    assert digest(img) == before


def test_short_read_is_a_value_error(nbdkit):
    sock, _ = nbdkit("memory", "1M")
    with Replica(uri(sock)) as r:
        with pytest.raises(ValueError, match="returned 10 bytes"):
            r.execute([(0, 4096, "data")], lambda o, n: b"x" * 10)


def test_unreachable_replica_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(ReplicaError, match="cannot connect to replica.*ENOENT") as e:
        Replica(f"nbd+unix:///?socket={tmp_path}/none.sock", connect_timeout=30)
    assert e.value.errno == errno.ENOENT
    assert time.monotonic() - start < 20


def test_silent_server_times_out(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        with pytest.raises(ReplicaError, match="no NBD handshake within 0.5 s"):
            Replica(f"nbd+unix:///?socket={path}", connect_timeout=0.5)


@pytest.mark.parametrize("uri", [
    "x", "http://host/", "/dev/sda", "nbd+unix:///", "nbd:///export", "nbd+vsock://1", 42])
def test_bad_uri_is_a_value_error(uri):
    with pytest.raises(ValueError, match="bad NBD URI"):
        parse_uri(uri)
    with pytest.raises(ValueError, match="bad NBD URI"):
        Replica(uri)


def test_good_uris_are_accepted():
    for good in ["nbd://h", "nbds://h:10810/exp", "nbd+unix:///?socket=/s", "nbds+unix:///e?socket=/s"]:
        assert parse_uri(good) == good


def test_bad_parameters():
    with pytest.raises(ValueError, match="connections"):
        Replica("nbd://h", connections=0)
    with pytest.raises(ValueError, match="timeout"):
        Replica("nbd://h", connect_timeout=0)


def test_failing_writes_raise_with_eio(nbdkit):
    sock, _ = nbdkit("--filter=error", "memory", "64M", "error-pwrite-rate=1", "error-pwrite=EIO")
    sgl = [(i * 256 * 1024, 256 * 1024, "data") for i in range(40)]
    with Replica(uri(sock)) as r:
        with pytest.raises(ReplicaError, match=r"writing data at offset \d+.*EIO") as e:
            r.execute(sgl, reader(bytearray(64 * MiB)), max_inflight=8)
    assert e.value.errno == errno.EIO


def test_killed_replica_raises_then_reconnect_works(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    image = make_image(img, 8 * MiB, seed=7)
    source = bytearray(random.Random(8).randbytes(8 * MiB))
    sock, proc = nbdkit("file", str(img))
    calls = 0

    def read_then_kill(offset, length):
        nonlocal calls
        calls += 1
        if calls == 10:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        return memoryview(source)[offset:offset + length]

    sgl = [(o, 64 * 1024, "data") for o in range(0, 8 * MiB, 64 * 1024)]
    r = Replica(uri(sock), io_timeout=30)
    with pytest.raises(ReplicaError, match="replica"):
        r.execute(sgl, read_then_kill, max_inflight=4)
    assert calls < len(sgl)
    with pytest.raises(ReplicaError, match="not connected"):
        r.execute(sgl[:1], reader(source))
    os.unlink(sock)  # the killed nbdkit left its socket file: wait for the new server's instead
    nbdkit("file", str(img), sock=sock)
    r.reconnect()
    r.execute(sgl, reader(source))
    r.flush()
    r.close()
    apply(image, source, sgl)
    assert img.read_bytes() == image


def test_stalled_replica_times_out_then_reconnects(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    make_image(img, 4 * MiB, seed=9)
    sock, proc = nbdkit("file", str(img))
    source = bytearray(4 * MiB)
    r = Replica(uri(sock), io_timeout=0.5)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ReplicaError, match="did not answer for 0.5 s") as e:
            r.execute([(0, 4 * MiB, "data")], reader(source))
        assert e.value.errno == errno.ETIMEDOUT
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    r.reconnect()
    r.execute([(0, 4 * MiB, "zero")], reader(source))
    r.flush()
    r.close()
    assert img.read_bytes() == source


def test_closed_replica_refuses_work(nbdkit):
    sock, _ = nbdkit("memory", "1M")
    r = Replica(uri(sock))
    r.close()
    with pytest.raises(ReplicaError, match="not connected"):
        r.flush()


def test_validate_sgl_and_pieces():
    assert validate_sgl(iter([[0, 5, "data"], (5, 5, "zero")]), 10) == [(0, 5, "data"),
                                                                          (5, 5, "zero")]
    assert list(pieces(10, 25, 10)) == [(10, 10), (20, 10), (30, 5)]


def batch(segments):
    return array.array("Q", [v for seg in segments for v in seg])


def write_batch(r, pairs, buf, **kw):
    return r.wait_batch(r.send_batch(pairs, buf, **kw))


def test_batch_sends_segments_from_one_buffer(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    image = make_image(img, 8 * MiB, seed=11)
    source = bytearray(random.Random(12).randbytes(8 * MiB))
    segments = [(0, 1), (4096, 4096), (65536 + 7, 300000), (5 * MiB, 2 * MiB + 3)]
    buf = b"".join(source[o:o + n] for o, n in segments)
    sock, _ = nbdkit("file", str(img))
    with Replica(uri(sock)) as r:
        assert write_batch(r, batch(segments), buf, max_inflight=2) == len(buf)
        r.flush()
    apply(image, source, [(o, n, "data") for o, n in segments])
    assert img.read_bytes() == image


def test_batch_failure_names_the_offset_and_errno_and_drops_the_connection(nbdkit):
    sock, _ = nbdkit("--filter=error", "memory", "64M", "error-pwrite-rate=1", "error-pwrite=EIO")
    segments = [(i * MiB, MiB) for i in range(20)]
    r = Replica(uri(sock))
    with pytest.raises(ReplicaError, match=r"writing data at offset \d+: EIO") as e:
        write_batch(r, batch(segments), bytes(20 * MiB), max_inflight=8)
    assert e.value.errno == errno.EIO
    with pytest.raises(ReplicaError, match="not connected"):
        r.flush()


def test_batch_refuses_bad_batches_before_sending(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    make_image(img, MiB, seed=13)
    before = img.read_bytes()
    sock, _ = nbdkit("file", str(img))
    with Replica(uri(sock)) as r:
        with pytest.raises(ValueError, match="past the replica"):
            write_batch(r, batch([(MiB - 10, 11)]), bytes(11))
        with pytest.raises(ValueError, match="at least one"):
            write_batch(r, array.array("Q"), b"")
        with pytest.raises(ValueError, match="holds 10 of its 11 bytes"):
            write_batch(r, batch([(0, 11)]), bytes(10))
    assert img.read_bytes() == before


def test_batch_spreads_over_connections_only_where_multi_conn_is_advertised(nbdkit, tmp_path):
    source = bytearray(random.Random(14).randbytes(8 * MiB))
    segments = [(i * 512 * 1024, 256 * 1024) for i in range(16)]
    buf = b"".join(source[o:o + n] for o, n in segments)
    for mode, expected in (("emulate", 3), ("disable", 1)):
        img = tmp_path / f"{mode}.img"
        image = make_image(img, 8 * MiB, seed=15)
        sock, _ = nbdkit("--filter=multi-conn", "file", str(img), f"multi-conn-mode={mode}")
        with Replica(uri(sock), connections=3) as r:
            assert len(r._live_handles()) == expected
            assert write_batch(r, batch(segments), buf, max_inflight=6) == len(buf)
            r.flush()
        apply(image, source, [(o, n, "data") for o, n in segments])
        assert img.read_bytes() == image


def test_batches_in_flight_together_land_whatever_order_they_are_waited_in(nbdkit, tmp_path):
    img = tmp_path / "replica.img"
    image = make_image(img, 8 * MiB, seed=16)
    source = bytearray(random.Random(17).randbytes(8 * MiB))
    batches = [[(0, 4096), (MiB, 300000)], [(3 * MiB + 5, MiB)], [(6 * MiB, 2 * MiB)]]
    sock, _ = nbdkit("file", str(img))
    with Replica(uri(sock)) as r:
        sent = [r.send_batch(batch(segs), b"".join(source[o:o + n] for o, n in segs), max_inflight=64)
                for segs in batches]
        # Nothing has been waited for: libnbd only learns of replies while we poll.
        assert sum(h.aio_in_flight() for h in r._live_handles()) == 4
        assert [r.wait_batch(s) for s in reversed(sent)] == [2 * MiB, MiB, 4096 + 300000]
        assert sum(h.aio_in_flight() for h in r._live_handles()) == 0
        r.flush()
    apply(image, source, [(o, n, "data") for segs in batches for o, n in segs])
    assert img.read_bytes() == image


def test_a_failed_batch_in_flight_fails_its_wait_and_abandons_the_rest(nbdkit):
    sock, _ = nbdkit("--filter=error", "memory", "64M", "error-pwrite-rate=1", "error-pwrite=EIO")
    r = Replica(uri(sock))
    first = r.send_batch(batch([(0, MiB)]), bytes(MiB))
    second = r.send_batch(batch([(MiB, MiB)]), bytes(MiB))
    with pytest.raises(ReplicaError, match=r"writing data at offset 0: EIO"):
        r.wait_batch(first)
    with pytest.raises(ReplicaError, match="abandoned when the replica's connections closed"):
        r.wait_batch(second)
    with pytest.raises(ReplicaError, match="not connected"):
        r.flush()


def test_close_abandons_batches_in_flight_even_after_a_reconnect(nbdkit, tmp_path):
    sock, _ = nbdkit("memory", "8M")
    r = Replica(uri(sock))
    sent = r.send_batch(batch([(0, MiB)]), bytes(MiB))
    r.close()
    with pytest.raises(ReplicaError, match="not connected"):
        r.flush()
    r.reconnect()
    with pytest.raises(ReplicaError, match="abandoned when the replica's connections closed"):
        r.wait_batch(sent)
    done = r.send_batch(batch([(MiB, MiB)]), bytes(MiB))
    assert r.wait_batch(done) == MiB
    with pytest.raises(ReplicaError, match="already waited for"):
        r.wait_batch(done)
    r.close()
