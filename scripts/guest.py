"""Run a shell script in a qemu guest whose /dev/nbd0 is a real kernel NBD client of a host socket.

Theory of operation
-------------------
The host kernel has no NBD driver and cannot load modules, yet the product must be exercised by the
real Linux `nbd-client` -> `/dev/nbd0` path (block layer, page cache, file systems, flushes). So we
boot Debian's own kernel under qemu's TCG (KVM hangs on these machines) with qboot as firmware and
a tiny initramfs, and let the guest's kernel be the NBD client:

    host: nbdkit -U SOCK ...                  guest (qemu TCG, 1 vCPU)
          ^                                   /init = guest_init.sh
          | guest_relay.py SOCK                 insmod virtio_net, nbd (file systems on demand)
          |  (run by qemu per connection)       eth0 = 10.0.2.15
    qemu -netdev user,restrict=on,              nbd-client 10.0.2.100 10809 /dev/nbd0
         guestfwd=tcp:10.0.2.100:10809-cmd:...  sh -e job.sh   <- the caller's script
                                                sync; nbd-client -d; poweroff -f

`restrict=on` cuts the guest off from everything but that one forwarded address, so the guest can
only ever talk to the server under test. The relay is ours rather than socat because libslirp
hands the command a TCP loopback socket, where Nagle and delayed ACKs cost 40 ms per NBD write
(see guest_relay.py); with it a 4 KiB O_DIRECT write takes about 2 ms instead of 45 ms.

Speed, all measured on TCG: a compressed bzImage spends 4-8 s decompressing itself before the
kernel prints a line, so the vmlinux inside it is extracted once (xz or gzip) and booted through
its PVH entry point; `-cpu max` gives the guest RDRAND, without which its random pool is not ready
and every mkfs.ext4 sleeps 3 s in libuuid; `mitigations=off` spares the emulator work that
protects nothing in a throwaway guest; file system modules load on first use (guest_init.sh).

The initramfs is a cpio "newc" archive written here in Python (no cpio tool needed). It holds
busybox, nbd-client, e2fsprogs and xfsprogs with the shared libraries `ldd` names (plus the
loader), /etc/mke2fs.conf (without it mkfs.ext4 falls back to ext2-like defaults), the kernel
modules decompressed on the host (busybox insmod reads only plain .ko), and /init. Building it
takes about a second, the vmlinux a few more, so both are cached under $XDG_CACHE_HOME/nbdrep
(default ~/.cache/nbdrep), keyed by a hash of every input (host files by path, size and mtime,
generated text by content): a package upgrade changes the key and the stale file is removed.

The caller's script travels in a second, per-run cpio archive concatenated after the cached one:
the kernel unpacks concatenated archives in order, so no rebuild and no size limit (the kernel
command line would allow only 2 KiB).

The host learns everything from the serial console: the guest prints marker lines (see
guest_init.sh). The job's exit status is reported only after the guest synced and disconnected,
so once `run_in_guest` returns, every acknowledged write is on the server. qemu is always killed
by pid in a `finally`, whatever happened.

qemu splits -netdev options at ',' (",," escapes one) and a sun_path holds at most 107 bytes, so
the socket is reached through a symlink with a short, plain name in a private temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

SERVER_IP = "10.0.2.100"
SERVER_PORT = 10809
DEVICE = "/dev/nbd0"

# insmod order within each list: every module after the ones it depends on (see modules.dep).
BOOT_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                "failover", "net_failover", "virtio_net", "nbd")
# Loaded when the guest kernel asks for the alias (its modprobe helper is guest_init.sh).
ON_DEMAND_MODULES = {
    "fs-ext4": ("crc32c_generic", "crc16", "mbcache", "jbd2", "ext4"),
    "fs-xfs": ("crc32c_generic", "libcrc32c", "xfs"),
    "crypto-crc32c": ("crc32c_generic",),
}

# (command, Debian package): programs copied into the guest.
GUEST_PROGRAMS = (
    ("busybox", "busybox-static"),
    ("nbd-client", "nbd-client"),
    ("mke2fs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("xfs_repair", "xfsprogs"),
)
GUEST_ALIASES = {"mkfs.ext4": "mke2fs", "fsck.ext4": "e2fsck", "nbdrep-modprobe": "/init"}
HOST_PROGRAMS = (("qemu-system-x86_64", "qemu-system-x86"), ("ldd", "libc-bin"))
QBOOT = Path("/usr/share/qemu/qboot.rom")
INIT_SCRIPT = Path(__file__).resolve().with_name("guest_init.sh")
RELAY = Path(__file__).resolve().with_name("guest_relay.py")
CACHE_FORMAT = "nbdrep-guest-initramfs-2"
KERNEL_ARGS = "console=ttyS0 quiet panic=-1 mitigations=off"

BEGIN, END, EXIT, FAIL = "NBDREP-GUEST-BEGIN", "NBDREP-GUEST-END", "NBDREP-GUEST-EXIT", "NBDREP-GUEST-FAIL"
EXIT_GRACE_SECONDS = 15.0
TAIL_LINES = 40
# An ELF note named "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) is what qemu needs for a PVH boot.
PVH_NOTE = re.compile(rb"\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00")


class GuestError(RuntimeError):
    """The guest could not be built, booted or attached, or did not finish in time."""


@dataclasses.dataclass(frozen=True)
class GuestResult:
    rc: int          # exit status of the caller's script
    output: str      # its console output (stdout and stderr, in order)
    log: str         # the whole console, boot included
    seconds: float   # qemu start to qemu exit


@dataclasses.dataclass(frozen=True)
class Member:
    """One initramfs entry: a folder, a file (bytes or a host path), a kernel module (a host path,
    stored decompressed) or a symlink."""
    name: str
    kind: str                       # "dir", "file", "module" or "link"
    payload: bytes | Path | str = b""
    mode: int = 0o755


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    files: dict[str, Path]          # module name -> host file, for every module to pack
    lists: dict[str, list[str]]     # "boot" and each on-demand alias -> names to insmod, in order
    builtin: list[str]              # wanted modules the kernel has built in


# ---------------------------------------------------------------- prerequisites

def _which(command: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which(command, path=path)


def find_kernel(boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")) -> tuple[Path, str] | None:
    """Newest /boot/vmlinuz-<ver> that has a modules.dep, as (path, ver); None if none. O(k log k)."""
    found = [(p, p.name[len("vmlinuz-"):]) for p in boot.glob("vmlinuz-*")]
    usable = [(p, ver) for p, ver in found if (modules_root / ver / "modules.dep").is_file()]
    return max(usable, key=lambda item: _version_key(item[1]), default=None)


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"[.-]", version)]


def missing_packages() -> list[str]:
    """Debian packages whose files the guest needs but which are absent (sorted, no repeats). O(1)."""
    missing = {pkg for cmd, pkg in HOST_PROGRAMS + GUEST_PROGRAMS if _which(cmd) is None}
    if not QBOOT.is_file():
        missing.add("qemu-system-data")
    if find_kernel() is None:
        missing.add("linux-image-amd64")
    return sorted(missing)


def check_prerequisites() -> tuple[Path, str]:
    """Return (kernel, version) or raise GuestError naming the Debian packages to install. O(1)."""
    missing = missing_packages()
    if missing:
        raise GuestError("the NBD test guest needs these Debian packages: apt-get install -y "
                         + " ".join(missing))
    kernel, version = find_kernel()
    if not os.access(kernel, os.R_OK):
        raise GuestError(f"cannot read {kernel} (Debian makes it readable by root only)")
    return kernel, version


# ---------------------------------------------------------------- kernel modules

def module_paths(version: str, root: Path = Path("/lib/modules")) -> dict[str, Path]:
    """Module name (with '_') -> file, from modules.dep. O(modules)."""
    lines = (root / version / "modules.dep").read_text().splitlines()
    return {_module_name(rel): root / version / rel for rel in (line.split(":", 1)[0] for line in lines)}


def builtin_modules(version: str, root: Path = Path("/lib/modules")) -> set[str]:
    """Names of the modules compiled into the kernel. O(modules)."""
    listing = root / version / "modules.builtin"
    lines = listing.read_text().splitlines() if listing.is_file() else []
    return {_module_name(line) for line in lines if line}


def _module_name(rel: str) -> str:
    return re.sub(r"\.ko(\.\w+)?$", "", rel.rsplit("/", 1)[-1]).replace("-", "_")


def plan_modules(version: str) -> ModulePlan:
    """Which modules to pack and insmod; GuestError if one is neither a module nor built in. O(modules)."""
    paths, builtin = module_paths(version), builtin_modules(version)
    wanted = dict.fromkeys(BOOT_MODULES + sum(ON_DEMAND_MODULES.values(), ()))
    absent = [name for name in wanted if name not in paths and name not in builtin]
    if absent:
        raise GuestError(f"kernel {version} has neither a module nor a built-in for: {', '.join(absent)}")
    wanted_lists = {"boot": BOOT_MODULES, **ON_DEMAND_MODULES}
    lists = {key: [n for n in names if n not in builtin] for key, names in wanted_lists.items()}
    files = {name: paths[name] for name in wanted if name not in builtin}
    return ModulePlan(files=files, lists=lists, builtin=[name for name in wanted if name in builtin])


def decompress_module(path: Path) -> bytes:
    """The plain ELF of a .ko, .ko.xz, .ko.gz or .ko.zst file. O(size)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60).stdout
    return data


# ---------------------------------------------------------------- initramfs content

def shared_libraries(program: str) -> list[Path]:
    """Libraries and loader that `ldd` lists for program; [] for a static one. O(libraries)."""
    done = subprocess.run(["ldd", program], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return []
    return [Path(m.group(1)) for m in re.finditer(r"(?:=>\s*|^\s*)(/\S+)\s+\(0x", done.stdout, re.M)]


def guest_config() -> bytes:
    """Shell assignments /init sources: where the server is. O(1)."""
    return f"NBDREP_SERVER={SERVER_IP}\nNBDREP_PORT={SERVER_PORT}\nNBDREP_DEVICE={DEVICE}\n".encode()


def guest_prelude(busybox: Path) -> bytes:
    """Shell functions that make the job run e2fsprogs & co. rather than busybox applets of the same
    name (busybox's shell prefers its applets to PATH). O(applets)."""
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=60)
    applets = set(listed.stdout.split())
    names = [cmd for cmd, _ in GUEST_PROGRAMS[1:]] + [a for a in GUEST_ALIASES if not a.startswith("nbdrep")]
    shadowed = [n for n in names if n in applets and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    return "".join(f'{n}() {{ /usr/sbin/{n} "$@"; }}\n' for n in shadowed).encode()


def base_members(version: str) -> list[Member]:
    """Every initramfs entry but the job, in archive order (folders before their content). O(files)."""
    programs = {cmd: Path(_which(cmd)) for cmd, _ in GUEST_PROGRAMS}
    libraries = {lib for prog in programs.values() for lib in shared_libraries(str(prog))}
    busybox = programs.pop("busybox")
    members = [Member(d, "dir") for d in ("bin", "dev", "etc", "etc/nbdrep", "lib", "lib/modules",
                                         "lib/modules/nbdrep", "lib64", "mnt", "nbdrep", "proc", "root",
                                         "run", "sys", "tmp", "usr", "usr/bin", "usr/sbin")]
    members += _library_dirs(libraries)
    members += [Member(str(lib).lstrip("/"), "file", lib.resolve()) for lib in sorted(libraries)]
    members += [Member("bin/busybox", "file", busybox.resolve()), Member("bin/sh", "link", "busybox")]
    members += [Member(f"usr/sbin/{cmd}", "file", path.resolve()) for cmd, path in sorted(programs.items())]
    members += [Member(f"usr/sbin/{alias}", "link", target) for alias, target in sorted(GUEST_ALIASES.items())]
    members += _module_members(plan_modules(version))
    members += _etc_members(busybox)
    members.append(Member("init", "file", INIT_SCRIPT.read_bytes()))
    return members


def _library_dirs(libraries: set[Path]) -> list[Member]:
    known = {"lib", "lib64", "usr", "usr/bin", "usr/sbin"}
    parents = {str(p).lstrip("/") for lib in libraries for p in lib.parents if str(p) != "/"}
    return [Member(d, "dir") for d in sorted(parents - known, key=lambda d: (d.count("/"), d))]


def _module_members(plan: ModulePlan) -> list[Member]:
    folder = "lib/modules/nbdrep"
    members = [Member(f"{folder}/{name}.ko", "module", path) for name, path in plan.files.items()]
    members += [Member(f"{folder}/{key}.list", "file", ("\n".join(names) + "\n").encode(), 0o644)
                for key, names in plan.lists.items()]
    return members


def _etc_members(busybox: Path) -> list[Member]:
    mke2fs_conf = Path("/etc/mke2fs.conf")
    members = [Member("etc/mtab", "link", "/proc/mounts"),
               Member("etc/filesystems", "file", b"ext4\nxfs\n", 0o644),
               Member("etc/nbdrep/config", "file", guest_config(), 0o644),
               Member("etc/nbdrep/prelude.sh", "file", guest_prelude(busybox), 0o644)]
    if mke2fs_conf.is_file():
        members.append(Member("etc/mke2fs.conf", "file", mke2fs_conf.read_bytes(), 0o644))
    return members


def job_members(script: str) -> list[Member]:
    """The per-run archive: only the caller's script. O(len(script))."""
    return [Member("nbdrep", "dir"), Member("nbdrep/job.sh", "file", script.encode(), 0o755)]


# ---------------------------------------------------------------- cpio "newc" writer

def cpio_bytes(members: list[Member]) -> bytes:
    """A complete newc archive (with trailer) of members, mtimes 0, owner root. O(total size)."""
    out = bytearray()
    for ino, member in enumerate(members, start=1):
        mode, data = _cpio_mode_and_data(member)
        out += _cpio_entry(ino, mode, member.name, data)
    out += _cpio_entry(0, 0, "TRAILER!!!", b"")
    return bytes(out)


def _cpio_mode_and_data(member: Member) -> tuple[int, bytes]:
    if member.kind == "dir":
        return 0o040000 | member.mode, b""
    if member.kind == "link":
        return 0o120777, str(member.payload).encode()
    if member.kind == "module":
        return 0o100644, decompress_module(member.payload)
    if member.kind == "file":
        payload = member.payload
        return 0o100000 | member.mode, payload.read_bytes() if isinstance(payload, Path) else payload
    raise ValueError(f"unknown initramfs member kind {member.kind!r}")


def _cpio_entry(ino: int, mode: int, name: str, data: bytes) -> bytes:
    encoded = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    return _pad4(header + encoded) + _pad4(data)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


# ---------------------------------------------------------------- boot kernel

def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed kernel inside a bzImage if it is xz or gzip and has a PVH entry, else None. O(size)."""
    for magic, decompress in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        start = bzimage.find(magic)
        if start >= 0:
            elf = decompress(bzimage[start:])
            return elf if elf[:4] == b"\x7fELF" and PVH_NOTE.search(elf) else None
    return None


def _unxz(data: bytes) -> bytes:
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    except lzma.LZMAError:
        return b""


def _gunzip(data: bytes) -> bytes:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    except zlib.error:
        return b""


def boot_kernel(kernel: Path) -> Path:
    """The image to hand qemu: the cached PVH vmlinux of kernel, or kernel itself if it has none. O(size) on a miss."""
    target = cache_dir() / f"vmlinux-{_hash_of([Member(kernel.name, 'file', kernel)])}"
    if target.is_file():
        return target
    vmlinux = extract_vmlinux(kernel.read_bytes())
    if vmlinux is None:
        return kernel
    _store(target, vmlinux, "vmlinux-*")
    return target


# ---------------------------------------------------------------- cache

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nbdrep"


def _hash_of(members: list[Member]) -> str:
    """Hash of everything that shapes an archive; host files count by path, size and mtime. O(members)."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for m in members:
        digest.update(repr((m.name, m.kind, m.mode, _payload_identity(m.payload))).encode())
    return digest.hexdigest()[:24]


def _payload_identity(payload: bytes | Path | str) -> object:
    if isinstance(payload, Path):
        st = payload.stat()
        return str(payload), st.st_size, st.st_mtime_ns
    if isinstance(payload, bytes):
        return hashlib.sha256(payload).hexdigest()
    return payload


def base_initramfs(version: str) -> Path:
    """Path of the cached base archive for kernel version, building it on a miss. O(size) on a miss."""
    members = base_members(version)
    target = cache_dir() / f"guest-initramfs-{_hash_of(members)}.cpio"
    if not target.is_file():
        _store(target, cpio_bytes(members), "guest-initramfs-*.cpio")
    return target


def _store(target: Path, data: bytes, family: str) -> None:
    """Write target atomically (concurrent builders race harmlessly), then drop its stale siblings."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    for stale in target.parent.glob(family):
        if stale != target:
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------- qemu

def qemu_command(kernel: Path, initrd: Path, socket_link: Path, memory_mb: int) -> list[str]:
    """argv of a TCG guest whose only network peer is socket_link via guestfwd. O(1)."""
    relay = shlex.join([sys.executable, "-I", "-S", str(RELAY), str(socket_link)]).replace(",", ",,")
    forward = f"guestfwd=tcp:{SERVER_IP}:{SERVER_PORT}-cmd:{relay}"
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(memory_mb),
        "-bios", str(QBOOT), "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", KERNEL_ARGS,
        "-netdev", f"user,id=n0,restrict=on,{forward}",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
    ]


def _socket_link(folder: Path, socket_path: Path) -> Path:
    if len(str(folder)) > 100:
        raise GuestError(f"temporary folder {folder} is too long for a unix socket path; set TMPDIR")
    link = folder / "sock"
    link.symlink_to(socket_path.resolve())
    return link


def _write_initrd(folder: Path, base: Path, script: str) -> Path:
    initrd = folder / "initrd.cpio"
    with open(initrd, "wb") as out, open(base, "rb") as src:
        shutil.copyfileobj(src, out)
        out.write(cpio_bytes(job_members(script)))
    return initrd


def _read_console(proc: subprocess.Popen, timeout: float) -> tuple[str, bool]:
    """(console text, timed out). Stops at EOF, or a short grace after the EXIT marker. O(output)."""
    fd, buf = proc.stdout.fileno(), bytearray()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        chunk = os.read(fd, 65536) if ready else b""
        if ready and not chunk:
            return _decode(buf), False
        if EXIT.encode() in buf[-64:] + chunk:
            deadline = min(deadline, time.monotonic() + EXIT_GRACE_SECONDS)
        buf += chunk
    return _decode(buf), EXIT.encode() not in buf


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()


# ---------------------------------------------------------------- console parsing

def parse_console(log: str) -> tuple[int, str]:
    """(job rc, job output) from a finished console; GuestError if set-up failed or EXIT is absent. O(len)."""
    failed = re.search(rf"^{FAIL} (.*)$", log, re.M)
    if failed:
        raise GuestError(f"guest set-up failed: {failed.group(1)}\n{tail(log)}")
    exits = re.findall(rf"^{EXIT} (\d+)$", log, re.M)
    if not exits:
        raise GuestError(f"guest stopped without reporting an exit status\n{tail(log)}")
    return int(exits[-1]), _between(log, f"{BEGIN}\n", f"\n{END}\n")


def _between(text: str, start: str, stop: str) -> str:
    begin = text.find(start)
    end = text.rfind(stop)
    return text[begin + len(start):end] if 0 <= begin and begin + len(start) <= end else ""


def tail(log: str, lines: int = TAIL_LINES) -> str:
    """The last lines of a console, headed so they stand out in an error message. O(len)."""
    return "--- last console lines ---\n" + "\n".join(log.splitlines()[-lines:])


# ---------------------------------------------------------------- API

def run_in_guest(socket_path, script: str, *, timeout: float = 180, memory_mb: int = 512) -> GuestResult:
    """Boot a guest, attach /dev/nbd0 to the NBD server on unix socket socket_path, run script under
    `sh -e`, unmount what it left mounted on /dev/nbd0, sync, disconnect, power off. Returns the
    script's rc and output; raises GuestError on a missing prerequisite, a boot or attach failure
    or a timeout, and ValueError on bad input. O(boot): about 10 s on TCG, plus the script."""
    socket_path = _checked_socket(socket_path)
    _check_limits(script, timeout, memory_mb)
    kernel, version = check_prerequisites()
    base, image = base_initramfs(version), boot_kernel(kernel)
    with tempfile.TemporaryDirectory(prefix="nbdrep-guest-") as tmp:
        folder = Path(tmp)
        command = qemu_command(image, _write_initrd(folder, base, script),
                               _socket_link(folder, socket_path), memory_mb)
        return _boot(command, timeout)


def _checked_socket(socket_path) -> Path:
    path = Path(socket_path)
    if not path.is_socket():
        raise ValueError(f"no unix socket at {path}")
    return path


def _check_limits(script: str, timeout: float, memory_mb: int) -> None:
    if not isinstance(script, str):
        raise ValueError(f"script must be a str, not {type(script).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if not 128 <= memory_mb <= 16384:
        raise ValueError(f"memory_mb must be within 128..16384, got {memory_mb!r}")


def _boot(command: list[str], timeout: float) -> GuestResult:
    started = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        log, timed_out = _read_console(proc, timeout)
    finally:
        _stop(proc)
    seconds = time.monotonic() - started
    if timed_out:
        raise GuestError(f"guest did not finish within {timeout} s\n{tail(log)}")
    rc, output = parse_console(log)
    return GuestResult(rc=rc, output=output, log=log, seconds=seconds)


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a shell script in a qemu guest with /dev/nbd0 "
                                     "attached to an NBD server on a unix socket; exit with its status "
                                     "(125 if the guest itself failed).")
    parser.add_argument("--socket", required=True, help="unix socket of the NBD server")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--script", type=Path, help="file with the guest shell script")
    source.add_argument("-c", dest="command", help="guest shell commands")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--memory", type=int, default=512, help="guest memory in MiB")
    parser.add_argument("--log", action="store_true", help="print the whole console, not only the output")
    args = parser.parse_args(argv)
    script = args.command if args.command is not None else args.script.read_text()
    try:
        result = run_in_guest(args.socket, script, timeout=args.timeout, memory_mb=args.memory)
    except (GuestError, ValueError) as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 125
    sys.stdout.write(result.log if args.log else result.output)
    print(f"guest: rc={result.rc} after {result.seconds:.1f} s", file=sys.stderr)
    return result.rc


if __name__ == "__main__":
    sys.exit(main())
