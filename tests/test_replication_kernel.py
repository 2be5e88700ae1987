"""Replication under the kernel's own NBD client: ext4 written by a qemu guest via /dev/nbd0."""
import os
import re
import subprocess

import pytest

import guest
from conftest import mounted

MiB = 1 << 20
GUEST_SCRIPT = """
mkfs.ext4 -q /dev/nbd0
mkdir -p /mnt
mount /dev/nbd0 /mnt
mkdir /mnt/dir
dd if=/dev/urandom of=/mnt/dir/data bs=1M count=8 2>/dev/null
dd if=/dev/urandom of=/mnt/small bs=4k count=3 2>/dev/null
sha256sum /mnt/dir/data /mnt/small
umount /mnt
e2fsck -fn /dev/nbd0
"""


@pytest.fixture(scope="module")
def guest_ready():
    missing = guest.missing_packages()
    if missing:
        pytest.skip(f"qemu guest needs Debian packages: {missing}")


def test_guest_ext4_over_nbd0_is_replicated(guest_ready, replicated, tmp_path):
    server, src, dst, _, _ = replicated(128 * MiB, cycle=1)
    result = guest.run_in_guest(server.sock, GUEST_SCRIPT, timeout=300)
    assert result.rc == 0, result.log[-3000:]
    digests = {path: digest for digest, path in re.findall(r"([0-9a-f]{64})\s+/mnt/(\S+)", result.output)}
    assert set(digests) == {"dir/data", "small"}
    server.rp()
    assert subprocess.run(["e2fsck", "-fn", dst], capture_output=True).returncode == 0
    with mounted(dst, str(tmp_path / "dst-mnt"), "-o", "loop,ro") as mnt:
        for path, digest in digests.items():
            out = subprocess.run(["sha256sum", os.path.join(mnt, path)], capture_output=True, text=True, check=True)
            assert out.stdout.split()[0] == digest
    assert os.path.getsize(dst) == 128 * MiB
