# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-unpriv.sh: unprivileged devices (issue 8).  A user
# who is not root (qtest, uid/gid 1000, through setpriv) adds a qcow2
# image they own as a device (UBLK_F_UNPRIVILEGED_DEV: the default of
# `qublk add` for non-root users), writes it with fio --verify=crc32c,
# reads it back, lists and deletes it; root then finds the image clean
# (qemu-img check) and reading what the user's device read (qemu-img
# convert | cmp).  The device is the user's alone: its nodes are owned by
# uid 1000 mode 0600, another user (uid 1001) cannot open it, it has no
# recovery (the kernel's rule).
#
# The guest has no udev.  What udev/60-qublk.rules.in does is done by a
# stand-in: its GROUP/MODE for /dev/ublk-control by chgrp/chmod (the test
# users are in group disk, as the rules expect), and for each new
# ublkcN/ublkbN node busybox's `uevent` applet, which listens to the
# kernel's uevents, runs what the rules import, `qublk udev-id NAME`, and
# applies its owner as the rules' OWNER/GROUP/MODE do.  Skips without
# unprivileged_dev.

W=/tmp/ublk-unpriv
U=1000
DISK_GID=6   # Debian's "disk" (the guest has no such name)
mkdir -p "$W"
chown "$U:$U" "$W"

as_user() { setpriv --reuid="$1" --regid="$1" --groups="$DISK_GID" -- "${@:2}"; }
devnum() { echo "${1#/dev/ublkb}"; }

UEVENT_PID=
udev_standin_start() {
    chgrp "$DISK_GID" /dev/ublk-control
    chmod 0660 /dev/ublk-control
    # shellcheck disable=SC2016 # (expanded by the handler's shell)
    busybox uevent sh -c 'case "$ACTION:$DEVNAME" in
        add:ublkc[0-9]*|add:ublkb[0-9]*)
            props=$(qublk udev-id "$DEVNAME") || exit 0
            echo "$DEVNAME: $props" | tr "\n" " "; echo
            uid=$(echo "$props" | sed -n "s/^QUBLK_OWNER_UID=//p")
            gid=$(echo "$props" | sed -n "s/^QUBLK_OWNER_GID=//p")
            if echo "$props" | grep -qx QUBLK_UNPRIVILEGED=1; then
                chown "$uid:$gid" "/dev/$DEVNAME" && chmod 0600 "/dev/$DEVNAME"
            fi ;;
        esac' >"$W/uevent.log" 2>&1 &
    UEVENT_PID=$!
    sleep 0.5   # listening before the first event
}
udev_standin_stop() {
    [ -z "$UEVENT_PID" ] || kill "$UEVENT_PID" 2>/dev/null || true
    chgrp 0 /dev/ublk-control
    chmod 0600 /dev/ublk-control
    cat "$W/uevent.log"
}

t_unpriv() {
    ublk_has unprivileged_dev || skip "this kernel's ublk driver has no unprivileged_dev"
    need setpriv busybox
    local img=$W/u.qcow2 dev id rc
    udev_standin_start
    trap udev_standin_stop EXIT
    as_user "$U" qemu-img create -q -f qcow2 "$img" 96M
    as_user "$U" qublk add -q 2 "$img" >"$W/add.out"
    dev=$(cat "$W/add.out")
    id=$(devnum "$dev")
    # The nodes are the user's, and the user's only.
    [ "$(stat -c '%u %g %a' "/dev/ublkc$id")" = "$U $U 600" ] || fail "ublkc$id: $(stat -c '%u %g %a' "/dev/ublkc$id")"
    [ "$(stat -c '%u %g %a' "$dev")" = "$U $U 600" ] || fail "$dev: $(stat -c '%u %g %a' "$dev")"
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, \"state\": \"live\", \"recoverable\": false" "$W/list.json"
    as_user "$U" qublk list | grep -E "^$id +live .* $img\$"
    # Not even another member of group disk.
    if as_user 1001 dd if="$dev" of=/dev/null bs=4k count=1 2>"$W/err"; then
        fail "another user read $dev"
    fi
    as_user "$U" fio --allow_file_create=0 --name=v --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --bssplit=4k/50:64k/40:512k/10 --iodepth=32 --numjobs=2 --size=24M \
        --offset_increment=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --group_reporting >"$W/fio.out" 2>&1 || { cat "$W/fio.out"; fail "fio as uid $U"; }
    as_user "$U" dd if="$dev" of="$W/dev.raw" bs=1M iflag=direct status=none
    # The user deletes it, with the same command root uses.
    as_user "$U" qublk del -n "$id"
    [ ! -e "$dev" ] && [ ! -e "/dev/ublkc$id" ] || fail "the device is still there"
    rc=0; qublk list --output json | grep -q "\"id\": $id," || rc=1
    [ "$rc" = 1 ] || fail "ublk$id still listed"
    qemu-img check "$img"
    qemu-img convert -f qcow2 -O raw "$img" "$W/qemu.raw"
    cmp "$W/dev.raw" "$W/qemu.raw"
    rm -f "$W/dev.raw" "$W/qemu.raw" "$img"
}

# Without the rule's work the user gets a clear error, and no device.
t_unpriv_no_udev() {
    ublk_has unprivileged_dev || skip "this kernel's ublk driver has no unprivileged_dev"
    local img=$W/n.raw rc=0
    as_user "$U" truncate -s 16M "$img"
    as_user "$U" qublk add "$img" 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] || fail "qublk add as uid $U without access to /dev/ublk-control: exit $rc"
    grep -q "udev rule" "$W/err" || fail "the error does not point at the udev rule"
    rm -f "$img"
}

need qublk fio qemu-img
vmtest ublk-unpriv t_unpriv
vmtest ublk-unpriv-no-udev t_unpriv_no_udev
