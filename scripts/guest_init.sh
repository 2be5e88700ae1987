#!/bin/sh
# /init of the nbdrep test guest (packed into the initramfs by scripts/guest.py).
#
# The guest exists only to put a real kernel NBD client in front of an NBD server that lives on a
# host unix socket: the host kernel has no NBD driver and cannot load modules, qemu's kernel can.
# The host sees this script only through the serial console, so it prints marker lines that start
# at column 0:
#
#   NBDREP-STEP <what> rc=<n> <message>   one per set-up step (insmod, network, nbd-client)
#   NBDREP-GUEST-FAIL <reason>            set-up failed; the job did not run
#   NBDREP-GUEST-BEGIN / NBDREP-GUEST-END the job's console output lies between these two
#   NBDREP-GUEST-EXIT <rc>                the job's exit status; printed only after the device was
#                                         synced and disconnected, so the server saw every write
#
# Kernel messages would interleave with those lines, hence printk is turned down to emergencies.
# If anything here dies, the kernel panics, panic=-1 reboots and qemu's -no-reboot ends the run:
# the host then sees a console without an EXIT marker and reports the tail of it.
#
# Modules: insmod costs about 1 s per MiB of module on TCG and xfs.ko alone is 4 MiB, so only what
# the attach needs (virtio-net, nbd) is loaded at boot, from boot.list. File system modules load
# when the kernel first asks for them ("mount -t xfs" makes it request fs-xfs, ext4 metadata
# checksums make it request crypto-crc32c): the kernel runs this same file as its modprobe helper
# (/proc/sys/kernel/modprobe -> /usr/sbin/nbdrep-modprobe -> /init), which insmods the modules of
# /lib/modules/nbdrep/<alias>.list in order. /etc/filesystems lists ext4 then xfs, so a mount
# without -t tries them too.
#
# busybox's shell runs its own applets before searching PATH, so its cut-down mke2fs would shadow
# e2fsprogs'; /etc/nbdrep/prelude.sh (written by guest.py) defines functions that call the real
# programs, and is put in front of the job.
#
# /etc/nbdrep/config (written by guest.py) sets NBDREP_SERVER, NBDREP_PORT and NBDREP_DEVICE; the
# job itself is /nbdrep/job.sh, appended to the initramfs per run.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME
MODULE_DIR=/lib/modules/nbdrep

fail() {
    echo "NBDREP-GUEST-FAIL $*"
    poweroff -f
    exit 1
}

step() {
    what=$1
    shift
    out=$("$@" 2>&1)
    rc=$?
    echo "NBDREP-STEP $what rc=$rc $out"
    return $rc
}

# Called by the kernel as "modprobe -q -- ALIAS"; an unknown alias simply loads nothing.
modprobe_alias() {
    for alias in "$@"; do :; done
    list="$MODULE_DIR/$alias.list"
    [ -f "$list" ] || exit 1
    for name in $(cat "$list"); do
        insmod "$MODULE_DIR/$name.ko" 2>/dev/null
    done
    exit 0
}

mount_pseudo_filesystems() {
    /bin/busybox mount -t proc proc /proc || return 1
    /bin/busybox --install -s /bin || return 1
    mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev
}

# A module that is already there makes insmod fail with "File exists"; that is harmless, so only
# the end result (the nbd driver being there) decides.
load_boot_modules() {
    for name in $(cat "$MODULE_DIR/boot.list"); do
        step "insmod $name" insmod "$MODULE_DIR/$name.ko"
    done
    [ -d /sys/module/nbd ] || fail "the nbd driver did not load (see the insmod nbd step)"
    echo /usr/sbin/nbdrep-modprobe >/proc/sys/kernel/modprobe
}

wait_for() {
    tries=0
    while [ ! -e "$1" ]; do
        tries=$((tries + 1))
        [ "$tries" -le 100 ] || return 1
        sleep 0.1
    done
}

configure_network() {
    wait_for /sys/class/net/eth0 || fail "no eth0 (virtio_net did not bind)"
    step "ip lo" ip link set lo up || fail "cannot bring up lo"
    step "ip addr" ip addr add 10.0.2.15/24 dev eth0 || fail "cannot address eth0"
    step "ip eth0" ip link set eth0 up || fail "cannot bring up eth0"
}

# Without an export name nbd-client 3.24 prints an "oldstyle protocol" warning, then negotiates
# newstyle with the default export "", which is what we want.
attach_device() {
    wait_for "$NBDREP_DEVICE" || fail "no $NBDREP_DEVICE node"
    step "nbd-client" nbd-client "$NBDREP_SERVER" "$NBDREP_PORT" "$NBDREP_DEVICE" ||
        fail "nbd-client could not attach $NBDREP_DEVICE to $NBDREP_SERVER:$NBDREP_PORT"
}

# The job may leave file systems on the device mounted; unmount them so the server ends up with a
# clean file system, then sync so every dirty block reached the server before the disconnect.
detach_device() {
    for dir in $(awk -v dev="$NBDREP_DEVICE" '$1 == dev { print $2 }' /proc/mounts); do
        step "umount $dir" umount "$dir"
    done
    sync
    step "nbd-client -d" nbd-client -d "$NBDREP_DEVICE" || fail "nbd-client -d failed"
}

run_job() {
    cat /etc/nbdrep/prelude.sh /nbdrep/job.sh >/tmp/job.sh || fail "no job script"
    echo "NBDREP-GUEST-BEGIN"
    (cd / && sh -e /tmp/job.sh </dev/null 2>&1)
    job_rc=$?
    echo
    echo "NBDREP-GUEST-END"
}

case "$0" in
*/nbdrep-modprobe) modprobe_alias "$@" ;;
esac
mount_pseudo_filesystems || fail "cannot mount /proc, /sys or /dev"
echo 1 >/proc/sys/kernel/printk
. /etc/nbdrep/config || fail "no /etc/nbdrep/config"
load_boot_modules
configure_network
attach_device
run_job
detach_device
echo "NBDREP-GUEST-EXIT $job_rc"
poweroff -f
