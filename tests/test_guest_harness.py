"""The qemu guest harness (scripts/guest.py): a real kernel NBD client against nbdkit on a unix socket.

The end-to-end tests boot a TCG guest each (10-30 s on a loaded 2-core machine); the rest check the
harness's pure parts (console parsing, cpio writer) without booting anything.
"""

import hashlib
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import guest  # noqa: E402

GUEST_TIMEOUT = 400
EXT4_JOB = """\
mkfs.ext4 -q /dev/nbd0
mount /dev/nbd0 /mnt
dd if=/dev/urandom of=/mnt/f bs=1M count=4
sha256sum /mnt/f
umount /mnt
e2fsck -fn /dev/nbd0
"""
# No -t on mount: xfs must load on demand through /etc/filesystems and the modprobe helper.
XFS_JOB = """\
echo before
mkfs.xfs -q /dev/nbd0
mount /dev/nbd0 /mnt
grep '^/dev/nbd0 /mnt xfs ' /proc/mounts
echo hello >/mnt/x
umount /mnt
xfs_repair -n /dev/nbd0 >/dev/null 2>&1 && echo repair-clean
false
echo not-reached
"""


def _require_guest():
    absent = {"qemu-system-x86", "qemu-system-data", "linux-image-amd64"} & set(guest.missing_packages())
    if absent:
        pytest.skip(f"no qemu guest possible here: missing Debian packages {sorted(absent)}")


def _children_named(name: str) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name() == name]


# ---------------------------------------------------------------- end to end (boots qemu)

def test_ext4_written_through_kernel_nbd_is_intact_on_host(tmp_path, nbdkit, procs):
    _require_guest()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sock, proc = nbdkit("file", str(image))

    result = guest.run_in_guest(sock, EXT4_JOB, timeout=GUEST_TIMEOUT)
    print(f"\nguest boot-to-exit: {result.seconds:.1f} s")
    assert result.rc == 0, result.log
    digest = re.search(r"^([0-9a-f]{64})  /mnt/f$", result.output, re.M)
    assert digest, result.output

    procs.stop(proc)
    assert proc.returncode is not None
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumped = tmp_path / "f"
    subprocess.run(["debugfs", "-R", f"dump /f {dumped}", str(image)], capture_output=True, check=True,
                   timeout=120)
    assert dumped.stat().st_size == 4 << 20
    assert hashlib.sha256(dumped.read_bytes()).hexdigest() == digest.group(1)


def test_xfs_on_demand_and_exit_status_under_set_e(nbdkit):
    _require_guest()
    sock, _ = nbdkit("memory", "512M")

    result = guest.run_in_guest(sock, XFS_JOB, timeout=GUEST_TIMEOUT)
    print(f"\nguest boot-to-exit: {result.seconds:.1f} s")
    assert result.rc == 1, result.log
    assert result.output.startswith("before\n")
    assert "/dev/nbd0 /mnt xfs " in result.output
    assert "repair-clean" in result.output
    assert "not-reached" not in result.output


def test_timeout_raises_with_console_tail_and_leaves_no_qemu(nbdkit):
    _require_guest()
    sock, _ = nbdkit("memory", "1M")
    with pytest.raises(guest.GuestError, match="did not finish within 3 s"):
        guest.run_in_guest(sock, "sleep 600", timeout=3)
    assert _children_named("qemu-system-x86_64") == []


# ---------------------------------------------------------------- no boot

def test_bad_input_is_refused_before_booting(tmp_path):
    with pytest.raises(ValueError, match="no unix socket"):
        guest.run_in_guest(tmp_path / "absent.sock", "true")
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="no unix socket"):
        guest.run_in_guest(tmp_path / "plain", "true")


def test_parse_console_extracts_status_and_output():
    log = ("boot noise\nNBDREP-STEP nbd-client rc=0 Connected /dev/nbd0\nNBDREP-GUEST-BEGIN\n"
           "line one\nno newline at end\nNBDREP-GUEST-END\nNBDREP-STEP nbd-client -d rc=0 \n"
           "NBDREP-GUEST-EXIT 7\n[ 9.1] reboot: Power down\n")
    assert guest.parse_console(log) == (7, "line one\nno newline at end")
    assert guest.parse_console(log.replace("at end\n", "at end\n\n")) == (7, "line one\nno newline at end\n")


def test_parse_console_reports_setup_failure_and_missing_exit():
    with pytest.raises(guest.GuestError, match="set-up failed: nbd-client could not attach"):
        guest.parse_console("x\nNBDREP-GUEST-FAIL nbd-client could not attach\n")
    with pytest.raises(guest.GuestError, match="without reporting an exit status(.|\n)*Kernel panic"):
        guest.parse_console("NBDREP-GUEST-BEGIN\nKernel panic - not syncing\n")


def test_cpio_archive_unpacks_with_cpio(tmp_path):
    members = [guest.Member("d", "dir"), guest.Member("d/a.sh", "file", b"echo hi\n", 0o755),
               guest.Member("d/odd", "file", b"x" * 5, 0o644), guest.Member("d/link", "link", "a.sh")]
    archive = tmp_path / "a.cpio"
    archive.write_bytes(guest.cpio_bytes(members))
    out = tmp_path / "out"
    out.mkdir()
    with open(archive, "rb") as src:
        subprocess.run(["cpio", "-id", "--quiet"], stdin=src, cwd=out, check=True, capture_output=True,
                       timeout=60)
    assert (out / "d/a.sh").read_bytes() == b"echo hi\n"
    assert (out / "d/a.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "d/odd").read_bytes() == b"xxxxx"
    assert (out / "d/link").readlink() == Path("a.sh")


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_relay_copies_both_ways_and_passes_half_close(tmp_path):
    rng = random.Random(7)
    request, reply = rng.randbytes(3 << 20), rng.randbytes(2 << 20)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "s.sock"))
    server.listen(1)
    listener = socket.create_server(("127.0.0.1", 0))
    guest_end = socket.create_connection(listener.getsockname())
    relay_end, _ = listener.accept()
    relay = subprocess.Popen([sys.executable, "-I", "-S", str(SCRIPTS / "guest_relay.py"),
                              str(tmp_path / "s.sock")], stdin=relay_end, stdout=subprocess.DEVNULL)
    try:
        relay_end.close()
        for sock in (server, guest_end):
            sock.settimeout(60)
        conn, _ = server.accept()
        conn.settimeout(60)
        sender = threading.Thread(target=lambda: (guest_end.sendall(request), guest_end.shutdown(socket.SHUT_WR)))
        sender.start()
        assert _read_to_eof(conn) == request
        sender.join(timeout=60)
        conn.sendall(reply)
        conn.close()
        assert _read_to_eof(guest_end) == reply
        assert relay.wait(timeout=60) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
        relay.wait(timeout=60)
        for sock in (server, listener, guest_end):
            sock.close()
