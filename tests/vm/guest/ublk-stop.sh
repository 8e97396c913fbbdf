# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-stop.sh: safe stop (issue 8).  Where the ublk driver
# offers safe_stop_dev (TRY_STOP_DEV: 7.3), `qublk del` refuses, exit 1
# with a message naming the device as busy, while /dev/ublkbN is mounted
# or merely held open (del -n and del --all alike); the device is left
# exactly as it was (same daemon, live, the file system goes on writing);
# once it is free, del removes it and the image holds the files written
# (e2fsck -fn, checksums through a loop mount).  `del --force` stops a
# mounted device (the old behaviour).  Both skip on a kernel without the
# feature (6.12), where del stops a device whatever uses it.

W=/tmp/ublk-stop
mkdir -p "$W"

devnum() { echo "${1#/dev/ublkb}"; }
daemon_pid() { sed -n 's/^pid=//p' "/run/qublk/ublk$1"; }

# refused ARGS...: qublk del ARGS must exit 1 saying the device is busy.
refused() {
    local rc=0
    qublk del "$@" 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] || fail "qublk del $*: exit $rc on a busy device"
    grep -q "ublk$id is busy" "$W/err" || fail "qublk del $*: no 'busy' message"
}

t_stop_busy() {
    ublk_has safe_stop_dev || skip "this kernel's ublk driver has no safe_stop_dev"
    local img=$W/s.raw dev id pid
    truncate -s 64M "$img"
    dev=$(qublk add "$img")
    id=$(devnum "$dev")
    pid=$(daemon_pid "$id")
    mkfs.ext4 -q "$dev"
    mkdir -p "$W/mnt"
    mount "$dev" "$W/mnt"
    dd if=/dev/urandom of="$W/mnt/a" bs=64k count=16 status=none
    sync
    refused -n "$id"
    refused --all
    # Nothing happened to it: same daemon, live, the file system writes.
    [ "$(daemon_pid "$id")" = "$pid" ] || fail "the daemon changed"
    kill -0 "$pid"
    qublk list | grep -Eq "^$id +live " || fail "ublk$id not live after a refused del"
    dd if=/dev/urandom of="$W/mnt/b" bs=64k count=16 status=none
    (cd "$W/mnt" && sha256sum a b) >"$W/sums"
    umount "$W/mnt"
    # Open, not mounted: busy as well.
    exec 9<"$dev"
    refused -n "$id"
    exec 9<&-
    # Free: del removes it, the daemon writes everything back.
    qublk del -n "$id"
    [ ! -e "$dev" ] || fail "$dev still there after del"
    [ ! -d "/proc/$pid" ] || fail "daemon $pid still running after del"
    e2fsck -fn "$img"
    mount -o loop,ro "$img" "$W/mnt"
    (cd "$W/mnt" && sha256sum -c "$W/sums")
    umount "$W/mnt"
    rm -f "$img" "$W/sums"
}

t_stop_force() {
    ublk_has safe_stop_dev || skip "this kernel's ublk driver has no safe_stop_dev"
    local img=$W/f.raw dev id pid
    truncate -s 64M "$img"
    dev=$(qublk add "$img")
    id=$(devnum "$dev")
    pid=$(daemon_pid "$id")
    mkfs.ext4 -q "$dev"
    mkdir -p "$W/mnt"
    mount "$dev" "$W/mnt"
    dd if=/dev/urandom of="$W/mnt/a" bs=64k count=16 status=none
    sync
    qublk del --force -n "$id"
    [ ! -e "$dev" ] || fail "$dev still there after del --force"
    [ ! -d "/proc/$pid" ] || fail "daemon $pid still running after del --force"
    ! qublk list | grep -Eq "^$id " || fail "ublk$id still listed"
    # The file system lost its device; it can still be unmounted.
    umount "$W/mnt" 2>/dev/null || umount -l "$W/mnt"
    rm -f "$img"
}

need qublk mkfs.ext4 e2fsck
vmtest ublk-stop-busy t_stop_busy
vmtest ublk-stop-force t_stop_force
