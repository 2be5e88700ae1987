"""verify() and `nbdrep verify` against real nbdkit file exports under tmp_path."""

import argparse
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import uri
from copier.nbdclient import connect
from copier.sizes import size_argument
from copier.verify import (ProgressLine, add_range, covered, differing_blocks, format_ranges, main,
                           verify, zero_extents)

MiB = 1 << 20
BLOCK = 4096


class Pair:
    """Source and replica image files under tmp_path, each served by `nbdkit file`."""

    def __init__(self, nbdkit, directory, source_bytes, replica_bytes):
        self.paths = []
        self.uris = []
        for name, data in (("source", source_bytes), ("replica", replica_bytes)):
            path = directory / f"{name}.img"
            path.write_bytes(data)
            sock, _ = nbdkit("file", str(path))
            self.paths.append(path)
            self.uris.append(uri(sock))


@pytest.fixture
def make_pair(nbdkit, tmp_path):
    return lambda source_bytes, replica_bytes: Pair(nbdkit, tmp_path, source_bytes,
                                                    replica_bytes)


def naive_diff(a, b):
    """The oracle: differing 4 KiB blocks of the common prefix, merged, plus the tail."""
    ranges = []
    common = min(len(a), len(b))
    for off in range(0, common, BLOCK):
        if a[off:off + BLOCK] != b[off:off + BLOCK]:
            add_range(ranges, off, min(BLOCK, common - off))
    if len(a) != len(b):
        add_range(ranges, common, abs(len(a) - len(b)))
    return ranges


def image(size, seed):
    return bytearray(random.Random(seed).randbytes(size))


def test_equal_exports(make_pair, capsys):
    data = image(6 * MiB + 512, seed=1)
    pair = make_pair(data, data)
    assert verify(*pair.uris, chunk=MiB) == []
    assert main(list(pair.uris)) == 0
    out, err = capsys.readouterr()
    assert "identical" in out
    assert "100%" in err


def test_two_differences_found_at_block_precision(make_pair, capsys):
    source = image(10 * MiB, seed=2)
    replica = bytearray(source)
    replica[5000] ^= 1
    replica[4 * MiB - 100:4 * MiB + 5000] = bytes(5100)
    pair = make_pair(source, replica)
    expected = [(4096, 4096), (4 * MiB - 4096, 4096 + 8192)]
    assert naive_diff(source, replica) == expected
    assert verify(*pair.uris) == expected
    assert verify(*pair.uris, chunk=64 * 1024) == expected
    assert main([*pair.uris, "--quiet", "--chunk", "1M"]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    assert "2 differing range(s)" in out
    assert f"{4 * MiB - 4096}" in out and "12288 (12.0 KiB)" in out


@pytest.mark.parametrize("extra", [5000, -8192])
def test_different_sizes_are_reported(make_pair, capsys, extra):
    source = image(3 * MiB, seed=3)
    replica = source + image(extra, seed=4) if extra > 0 else source[:extra]
    pair = make_pair(source, replica)
    common = min(len(source), len(replica))
    assert verify(*pair.uris) == [(common, abs(extra))]
    assert main([*pair.uris, "--quiet"]) == 1
    assert str(common) in capsys.readouterr().out


def test_sparse_and_written_zeros_compare_equal(make_pair, tmp_path):
    data = image(8 * MiB, seed=5)
    data[MiB:5 * MiB] = bytes(4 * MiB)
    pair = make_pair(data, data)
    os.truncate(pair.paths[0], 0)
    with open(pair.paths[0], "r+b") as f:
        f.write(data[:MiB])
        f.seek(5 * MiB)
        f.write(data[5 * MiB:])
    assert verify(*pair.uris, chunk=MiB) == []
    with open(pair.paths[1], "r+b") as f:
        f.seek(3 * MiB + 7)
        f.write(b"\1")
    assert verify(*pair.uris, chunk=MiB) == [(3 * MiB, 4096)]


def test_sparse_on_both_sides_is_equal(make_pair):
    pair = make_pair(b"", b"")
    for path in pair.paths:
        os.truncate(path, 300 * MiB)
    assert verify(*pair.uris) == []
    with open(pair.paths[1], "r+b") as f:
        f.seek(299 * MiB)
        f.write(b"x")
    assert verify(*pair.uris) == [(299 * MiB, 4096)]


@pytest.fixture
def shared_pair(make_pair):
    source = image(2 * MiB + 3000, seed=6)
    return make_pair(source, source), source


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 2 * MiB + 2999), st.integers(1, 20000)),
                      max_size=6),
       chunk=st.sampled_from([BLOCK, 64 * 1024, MiB, 4 * MiB]))
def test_random_edits_match_oracle(shared_pair, edits, chunk):
    pair, source = shared_pair
    replica = bytearray(source)
    for offset, length in edits:
        end = min(offset + length, len(replica))
        replica[offset:end] = bytes(b ^ 0xFF for b in replica[offset:end])
    pair.paths[1].write_bytes(replica)
    assert verify(*pair.uris, chunk=chunk) == naive_diff(source, replica)


@pytest.mark.parametrize("argv", [["x", "nbd://h"], ["nbd+unix:///", "nbd://h"]])
def test_bad_uri_exits_2(capsys, argv):
    assert main(argv) == 2
    assert "bad NBD URI" in capsys.readouterr().err


def test_unreachable_export_exits_2(tmp_path, capsys):
    uri = f"nbd+unix:///?socket={tmp_path}/none.sock"
    assert main([uri, uri]) == 2
    assert "cannot connect to source" in capsys.readouterr().err


def test_bad_chunk_exits_2(make_pair, capsys):
    pair = make_pair(b"a" * 4096, b"a" * 4096)
    assert main([*pair.uris, "--chunk", "1000"]) == 2
    assert "bad chunk 1000" in capsys.readouterr().err
    assert main([*pair.uris, "--chunk", "lots"]) == 2
    assert "'lots' is not a size" in capsys.readouterr().err


def test_helpers():
    ranges = []
    for off, n in [(0, 4096), (4096, 4096), (12288, 10)]:
        add_range(ranges, off, n)
    assert ranges == [(0, 8192), (12288, 10)]
    a, b = bytes(10000), bytearray(10000)
    b[9000] = 1
    assert list(differing_blocks(a, b, 100)) == [(8292, 10000 - 8192)]
    assert covered([(0, 10), (20, 30)], 20, 30) and not covered([(0, 10), (20, 30)], 5, 15)
    assert not covered([], 0, 1)
    assert size_argument("4M") == 4 * MiB and size_argument("512KiB") == 512 * 1024
    with pytest.raises(argparse.ArgumentTypeError):
        size_argument("4X")
    assert "4096 (4.0 KiB)" in format_ranges([(MiB, 4096)])


def test_zero_extents_follow_holes(make_pair):
    pair = make_pair(b"", b"")
    os.truncate(pair.paths[0], 64 * MiB)
    with open(pair.paths[0], "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"x" * MiB)
    h = connect(pair.uris[0], what="source", block_status=True)
    extents = zero_extents(h, 0, 64 * MiB)
    assert covered(extents, 0, 10 * MiB) and covered(extents, 11 * MiB, 64 * MiB)
    assert not any(covered(extents, off, off + 1) for off in (10 * MiB, 11 * MiB - 1))


def test_progress_lines_have_rate_and_eta(make_pair, capsys):
    data = image(4 * MiB, seed=7)
    pair = make_pair(data, data)
    assert main([*pair.uris, "--chunk", "256K"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("verify: 100% of 4.00MiB, ") and "iB/s, ETA 00:00" in lines[-1]
    percents = [int(line.split("%")[0].split()[-1]) for line in lines]
    assert percents == sorted(set(percents)) and len(percents) <= 10


def test_progress_on_a_terminal_is_a_bar():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        line = ProgressLine(tty)
        line(MiB, 4 * MiB)
        line(4 * MiB, 4 * MiB)
        line.finish()
    shown = read_all(master)
    assert "\r" in shown and "100%|" in shown and "4.00M/4.00M" in shown and "█" in shown


def read_all(master):
    """All that was written to a pty whose other end is closed: a read may return only part
    of it (the kernel passes it on in pieces), and the end shows as EIO."""
    chunks = []
    for _ in range(1000):
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()
