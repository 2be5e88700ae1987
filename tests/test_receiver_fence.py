"""Fencing (issue #10): a dropped connection's late write never reaches a committed RP.

When the copier's connections drop (a cut, a timeout, kill -9 of the source) writes of the
old ones may still be on their way (nbdkit's queue inside the receiver, a proxy's buffers).
Before it opens data connections the copier fences the export on the metadata export; the
receiver then refuses every request of a connection opened before (``copier.receiver``).
"""
import errno
import os
import signal
import subprocess
import threading
import time

import nbd
import psutil
import pytest

from conftest import Server, make_image, nbdrep, uri, wait_until
from copier import receiver as link
from nbd_plugin.backend import Backend
from test_receiver import (BLOCK, MiB, Receiver, generation, generations_in, kill9_nbdkit,
                           open_store, unlink_stale, write_image)


def queued(pid):
    """Bytes waiting unread in the unix sockets of process ``pid`` (ss's Recv-Q)."""
    out = subprocess.run(["ss", "-xnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    return sum(int(line.split()[2]) for line in out.splitlines() if f"pid={pid}," in line)


def connections(pid):
    """The unix sockets process ``pid`` holds (its listener included)."""
    return len(psutil.Process(pid).net_connections("unix"))


def test_a_held_write_of_a_killed_source_never_reaches_a_committed_rp(procs, nbdkit, tmp_path):
    """The source replicates through a proxy (nbdkit's nbd plugin). The proxy is stopped
    (SIGSTOP) in the middle of copying generation 2 and the source killed with kill -9, so
    writes of generation 2 wait in the proxy's sockets. A new source process writes
    generation 3 straight to the receiver and commits it; then the proxy resumes and hands
    the receiver the held writes on its old connections. The receiver must refuse them: no
    committed RP may ever hold a block of generation 2 next to generation 3."""
    size, tmp = 4 * MiB, str(tmp_path)
    src = make_image(str(tmp_path / "source.img"), size)
    target = make_image(str(tmp_path / "target.img"), size)
    r = Receiver(procs, tmp, [target])
    psock, proxy = nbdkit("nbd", f"socket={r.sock}", "dynamic-export=true")
    server = Server(procs, tmp, [src], [uri(psock)], extra=["--cycle", "3600"])
    write_image(server.sock, generation(1, size))
    r.wait_committed(server.rp())
    # Every other block: 4 KiB extents, so whole requests fit in the proxy's socket buffers.
    h = nbd.NBD()
    h.connect_uri(uri(server.sock))
    one, two = generation(1, size), generation(2, size)
    half = b"".join(two[off:off + BLOCK] + one[off + BLOCK:off + 2 * BLOCK] for off in range(0, size, 2 * BLOCK))
    for off in range(0, size, 2 * BLOCK):
        h.pwrite(two[off:off + BLOCK], off)
    h.flush()
    h.shutdown()
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        nbdrep("rp", "--control", server.control)   # starts the copy; does not wait for it
        wait_until(lambda: queued(proxy.pid) > 0, 60, "generation 2's writes held in the proxy")
        kill9_nbdkit(procs, server.proc)
        unlink_stale(server.control)
        server = Server(procs, tmp, [src], [r.uri()], extra=["--cycle", "3600"])
        write_image(server.sock, generation(3, size))
        r.wait_committed(server.rp())
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    # The proxy forwards what it read before its clients' end, then closes its connections.
    wait_until(lambda: connections(proxy.pid) <= 1, 60, "the proxy done with its dead clients")
    write_image(server.sock, generation(3, size)[:BLOCK])   # a write, so the next RP commits
    r.wait_committed(server.rp())
    assert generations_in(r.read()) == [3], "a held write of generation 2 was committed"
    sources = {bytes(size): 0, one: 1, half: 2, generation(3, size): 3}   # what the source held
    assert [sources.get(r.read(f"@{rp['cycle']}", size), "stale") for rp in r.status()["rps"]] == [0, 1, 2, 3, 3]


def test_a_fence_waits_for_writes_inside_the_receiver_then_refuses_older_connections(tmp_path, monkeypatch):
    """In process: a write blocked inside the store (as in a slow pwrite) when the fence
    comes is waited for; after the fence, the old epoch's writes, zeroes, flushes and commit
    records are refused (ESHUTDOWN), the new epoch's pass."""
    s = open_store(tmp_path)
    try:
        s.commit("a", 1, 1.0)
        old, meta_old = s.epochs[""], s.meta_epoch
        inside, release = threading.Event(), threading.Event()
        real = Backend.pwrite

        def slow(self, buf, offset):
            inside.set()
            assert release.wait(30)
            return real(self, buf, offset)

        monkeypatch.setattr(Backend, "pwrite", slow)
        writer = threading.Thread(target=s.write, args=("", b"\x02" * BLOCK, 0, old))
        writer.start()
        assert inside.wait(30)
        fenced = []
        fencer = threading.Thread(target=lambda: fenced.append(s.fence("")))
        fencer.start()
        fencer.join(0.5)
        assert fencer.is_alive(), "the fence returned with a write of the old epoch inside"
        release.set()
        writer.join(30)
        fencer.join(30)
        assert fenced == [s.epochs[""]] and s.epochs[""] > old and s.meta_epoch > meta_old
        monkeypatch.setattr(Backend, "pwrite", real)
        for request in (lambda: s.write("", b"\x03" * BLOCK, 0, old),
                        lambda: s.zero("", 0, BLOCK, old), lambda: s.flush("", old),
                        lambda: s.commit("a", 2, 2.0, meta_old)):
            with pytest.raises(OSError) as e:
                request()
            assert e.value.errno == errno.ESHUTDOWN
        s.write("", b"\x04" * BLOCK, BLOCK, s.epochs[""])
        s.commit("a", 2, 2.0, s.meta_epoch)
        extents = s.attach("", 2)
        buf = bytearray(2 * BLOCK)
        s.read("", extents, buf, 0)
        s.detach(2)
        assert bytes(buf) == b"\x02" * BLOCK + b"\x04" * BLOCK, "the write before the fence was lost"
    finally:
        s.close()


def test_a_fence_through_the_link_refuses_a_connection_opened_before(procs, tmp_path):
    """Over NBD: a data connection opened before ``Link.fence`` gets its write refused, a
    metadata connection opened before it cannot commit, and those opened after write and
    commit."""
    r = Receiver(procs, str(tmp_path), [f"disk={make_image(str(tmp_path / 't.img'), MiB)}"])
    data_uri = r.uri("disk")
    old = nbd.NBD()
    old.connect_uri(data_uri)
    assert link.Link([data_uri]).commit("s", 1, time.time()) == 1
    stale = nbd.NBD()   # a metadata connection of a copier since dropped
    stale.connect_uri(link.meta_uri(data_uri))
    fresh = link.Link([data_uri])
    fresh.fence(data_uri, "s", 1)
    with pytest.raises(nbd.Error) as e:
        old.pwrite(b"X" * BLOCK, 0)
    assert e.value.errnum == errno.ESHUTDOWN
    old.shutdown()
    with pytest.raises(nbd.Error) as e:
        stale.pwrite(link.encode(link.MAGIC_COMMIT, {"session_id": "s", "cycle": 2, "rp_time": 2.0}), 0)
    assert e.value.errnum == errno.ESHUTDOWN
    stale.shutdown()
    new = nbd.NBD()
    new.connect_uri(data_uri)
    new.pwrite(b"Y" * BLOCK, 0)
    new.flush()
    new.shutdown()
    assert fresh.commit("s", 2, time.time()) == 1
    assert r.read("disk", BLOCK) == b"Y" * BLOCK
    fresh.close()


def test_a_plain_export_gets_no_fence(nbdkit, tmp_path):
    plain = make_image(str(tmp_path / "plain.img"), MiB)
    sock, _ = nbdkit("file", plain)
    links = link.Link([uri(sock)])
    links.fence(uri(sock), "s", 0)
    links.close()
    with open(plain, "rb") as f:
        assert f.read() == bytes(MiB)
