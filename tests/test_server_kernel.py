"""The Linux kernel's own NBD client (nbd-client -> /dev/nbd0) against ``nbdrep serve``.

The host kernel has no NBD driver, so a qemu TCG guest (``scripts/guest.py``) is the client: it
makes an ext4 file system on /dev/nbd0, writes a file of random data, checks the file system and
disconnects. On the host, the cycle that holds all of that must cover every changed byte of the
image, and the image must be a clean ext4 holding the very file the guest wrote.

One boot only: a TCG boot costs 10-40 s on a loaded machine.
"""
import hashlib
import re
import subprocess

import guest
import pytest
from conftest import Server, make_image
from test_server import CYCLE, MiB, changed_runs, check_tracker, run, snapshot

# Full paths: the guest's shell is busybox, whose own (much smaller) mke2fs applet would win.
GUEST_JOB = """
/usr/sbin/mke2fs -q -F -t ext4 /dev/nbd0
mkdir -p /mnt/t
mount -t ext4 /dev/nbd0 /mnt/t
dd if=/dev/urandom of=/mnt/t/f bs=1M count=8 2>/dev/null
sync
echo "SHA256=$(sha256sum /mnt/t/f | cut -d' ' -f1)"
umount /mnt/t
/usr/sbin/e2fsck -fn /dev/nbd0
"""


@pytest.fixture(scope="module")
def guest_ready():
    try:
        guest.check_prerequisites()
    except guest.GuestError as e:
        pytest.skip(f"no qemu guest: {e}")


def test_kernel_client_ext4_is_tracked_and_intact(guest_ready, procs, tmp_path):
    image = make_image(str(tmp_path / "disk.img"), 128 * MiB)
    server = Server(procs, str(tmp_path), [image], extra=CYCLE)
    server.rp()
    before = snapshot(image, tmp_path)
    result = guest.run_in_guest(server.sock, GUEST_JOB, timeout=240)
    assert result.rc == 0, result.output
    digest = re.search(r"^SHA256=([0-9a-f]{64})$", result.output, re.MULTILINE).group(1)
    data, _ = check_tracker(server, before, image)
    assert sum(n for _, n in data) >= 8 * MiB
    assert changed_runs(before, image)[0].size > 0
    procs.stop(server.proc)
    run(["e2fsck", "-fn", image])
    dumped = subprocess.run(["debugfs", "-R", "dump /f /dev/stdout", image], capture_output=True,
                            check=True, timeout=120).stdout
    assert len(dumped) == 8 * MiB
    assert hashlib.sha256(dumped).hexdigest() == digest
