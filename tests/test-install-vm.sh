#!/bin/bash
# SPDX-License-Identifier: MIT
# run.sh: alone
# The systemd unit's life in the VM, with a stand-in for systemd and udev
# (the guest has neither: its /init is busybox): what qublk@.service
# runs, run by hand the way systemd runs it, against the real ublk driver
# (Debian 12's 6.12 kernel):
#  - `qublk service start` with $NOTIFY_SOCKET on an abstract socket:
#    READY=1 arrives from the main process (the pid systemd checks), and
#    only once /dev/ublkbN is there and its state file written; a uevent
#    listener (busybox uevent, running `qublk udev-id` for every ublk
#    event as the udev rules do) sees a "change" event whose udev-id has
#    the image's ID (the "add" event comes before the state file);
#  - kill -9 of the daemon: ExecStop without $MAINPID leaves the device,
#    a read issued meanwhile waits; the restart's `service start`
#    recovers the same device (no new one), READY=1 again from the new
#    daemon, the waiting read completes with the data written before the
#    kill;
#  - ExecStop with $MAINPID: a clean del; the daemon exits 0, the device
#    and its state file are gone, qemu-img check has leaks at most, QEMU
#    reads what was written;
#  - a device created without recovery whose daemon died is deleted and
#    a new one added; a configuration's number= and read-only= reach the
#    device.
# The receiver of the notifications is tests/unit/test_notify --recv.
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
B=$(dirname "$QUBLK")
[ -x "$B/tests/test_notify" ] || skip "$B/tests/test_notify not built"
require_vm_kernel 6.12

cat >"$TMPD/install-vm.guest.sh" <<'GUEST'
# shellcheck shell=bash
S=/tmp/svc
IMG=$S/vm-1.qcow2
ID='tmp-svc-vm\x2d1.qcow2'   # systemd-escape --path /tmp/svc/vm-1.qcow2
SOCK=@qublk/vmtest/notify

# recv_start: a notification receiver, bound before we go on.
recv_start() {
    rm -f "$S/bound" "$S/notify.out"
    /vmtest/test_notify --recv "$SOCK" "$S/bound" >"$S/notify.out" &
    RPID=$!
    wait_for "$S/bound" 30
}
# recv_wait PID DEV: the one notification came from PID, says DEV (an ERE)
# is served.
recv_wait() {
    local i
    for ((i = 0; i < 1200; i++)); do kill -0 "$RPID" 2>/dev/null || break; sleep 0.1; done
    wait "$RPID" || fail "no notification"
    cat "$S/notify.out"
    grep -qx "pid=$1" "$S/notify.out" || fail "the notification did not come from the main process $1"
    grep -qx 'READY=1' "$S/notify.out" || fail "no READY=1"
    grep -Eqx "STATUS=serving $2" "$S/notify.out" || fail "no STATUS=serving $2"
}
# A "change" uevent of ublkb0 whose udev-id printed the image's ID.
change_has_id() {
    awk '/^EVENT change ublkb0$/ { on = 1; next } /^EVENT/ { on = 0 } on' "$S/uevents.log" 2>/dev/null |
        grep -qxF "ID_SERIAL=$ID"
}
gone() { local i; for ((i = 0; i < 200; i++)); do [ -e "$1" ] || return 0; sleep 0.1; done; return 1; }

t_service() {
    local spid spid2 dpid rc i
    mkdir -p "$S/etc"
    qemu-img create -q -f qcow2 "$IMG" 64M
    printf '# the test VM disk\nimage = %s\nqueues = 2\ncache = none\n' "$IMG" >"$S/etc/vm.conf"
    qublk service show -C "$S/etc" vm

    # The udev stand-in: udev-id for every uevent of a ublk device.
    cat >"$S/uevent.sh" <<'EOF'
#!/bin/sh
case $DEVNAME in ublkb*|ublkc*) ;; *) exit 0 ;; esac
{ echo "EVENT $ACTION $DEVNAME"; /usr/local/bin/qublk udev-id "$DEVNAME" 2>&1; echo "rc=$?"; } >>/tmp/svc/uevents.log
EOF
    chmod +x "$S/uevent.sh"
    busybox uevent "$S/uevent.sh" &
    echo $! >"$S/uevent.pid"

    # ExecStart
    recv_start
    NOTIFY_SOCKET=$SOCK qublk service start -C "$S/etc" vm >"$S/start1.out" 2>"$S/start1.err" &
    spid=$!
    recv_wait "$spid" /dev/ublkb0
    # At READY=1 the device and its state file are there.
    [ -b /dev/ublkb0 ] || fail "READY=1 before /dev/ublkb0"
    grep -qx "pid=$spid" /run/qublk/ublk0 || fail "READY=1 before the state file"
    qublk list | tee "$S/list"
    grep -Eq "^0 +live +qcow2 +2 " "$S/list" || fail "ublk0 not live with 2 queues"
    qublk udev-id ublkb0 | tee "$S/udev"
    grep -qxF "ID_SERIAL=$ID" "$S/udev" || fail "udev-id: wrong ID"
    grep -qx QUBLK_TARGET=qcow2 "$S/udev" || fail "udev-id: no QUBLK_TARGET"
    grep -qx QUBLK_READ_ONLY=0 "$S/udev" || fail "udev-id: no QUBLK_READ_ONLY"
    ! grep -q UNPRIVILEGED "$S/udev" || fail "udev-id: a privileged device is called unprivileged"
    [ "$(qublk udev-id ublkc0)" = "$(cat "$S/udev")" ] || fail "udev-id ublkc0 differs"
    # The change event after the state file: udev's second look finds the ID.
    for ((i = 0; i < 100; i++)); do change_has_id && break; sleep 0.1; done
    cat "$S/uevents.log"
    change_has_id || fail "no change uevent with the image's ID"

    dd if=/dev/urandom of="$S/data" bs=1M count=4 2>/dev/null
    dd if="$S/data" of=/dev/ublkb0 bs=1M oflag=direct conv=fsync 2>/dev/null

    # The daemon crashes: systemd runs ExecStop without $MAINPID.
    kill -KILL "$spid"
    rc=0; wait "$spid" || rc=$?
    [ "$rc" = 137 ] || fail "the daemon exited $rc, not by SIGKILL"
    env -u MAINPID SERVICE_RESULT=signal EXIT_CODE=killed EXIT_STATUS=KILL \
        qublk service stop vm
    [ -b /dev/ublkb0 ] || fail "ExecStop after a crash removed the device"
    qublk list | tee "$S/list"
    grep -Eq "^0 +(quiesced|quiescing) " "$S/list" || fail "ublk0 not waiting for recovery"
    dd if=/dev/ublkb0 of="$S/during" bs=1M count=4 iflag=direct 2>/dev/null &
    dpid=$!

    # Restart=on-failure: ExecStart again recovers the device.
    recv_start
    NOTIFY_SOCKET=$SOCK qublk service start -C "$S/etc" vm >"$S/start2.out" 2>"$S/start2.err" &
    spid2=$!
    recv_wait "$spid2" /dev/ublkb0
    cat "$S/start2.err"
    grep -q 'recovering the device' "$S/start2.err" || fail "start did not recover"
    [ ! -e /dev/ublkb1 ] || fail "start added a second device"
    qublk list | tee "$S/list"
    grep -Eq "^0 +live +qcow2 +2 +[0-9]+ +$spid2 " "$S/list" || fail "ublk0 not live under the new daemon"
    wait "$dpid" || fail "the read issued while the daemon was dead failed"
    cmp "$S/during" "$S/data" || fail "the read issued while the daemon was dead read wrong data"
    qublk udev-id ublkb0 | grep -qxF "ID_SERIAL=$ID" || fail "no ID after recovery"

    # systemctl stop: ExecStop with $MAINPID deletes the device cleanly.
    MAINPID=$spid2 SERVICE_RESULT=success qublk service stop vm
    rc=0; wait "$spid2" || rc=$?
    [ "$rc" = 0 ] || fail "the daemon exited $rc on stop"
    gone /dev/ublkb0 || fail "/dev/ublkb0 still there after stop"
    [ ! -e /run/qublk/ublk0 ] || fail "the state file survived the stop"
    rc=0; qemu-img check "$IMG" || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "qemu-img check: $rc"
    qemu-img convert -O raw "$IMG" "$S/out.raw"
    cmp -n 4194304 "$S/out.raw" "$S/data" || fail "the image does not hold what was written"
    kill "$(cat "$S/uevent.pid")" 2>/dev/null || true
}

t_no_recovery() {
    local dev pid spid
    qemu-img create -q -f raw "$S/b.raw" 16M
    printf 'image=%s\n' "$S/b.raw" >"$S/etc/b.conf"
    dev=$(qublk add --no-recovery "$S/b.raw")
    pid=$(sed -n 's/^pid=//p' "/run/qublk/ublk${dev#/dev/ublkb}")
    kill -KILL "$pid"
    while [ -d "/proc/$pid" ]; do sleep 0.1; done
    recv_start
    NOTIFY_SOCKET=$SOCK qublk service start -C "$S/etc" b >"$S/b.out" 2>"$S/b.err" &
    spid=$!
    recv_wait "$spid" '/dev/ublkb[0-9]+'
    cat "$S/b.out" "$S/b.err"
    grep -qx "STATUS=serving $(cat "$S/b.out")" "$S/notify.out" || fail "READY=1 names another device"
    grep -q 'without recovery: deleting it' "$S/b.err" || fail "the dead device was not deleted"
    [ "$(qublk list | grep -c ' live ')" = 1 ] || fail "not exactly one live device"
    MAINPID=$spid qublk service stop b
    wait "$spid"
    [ "$(qublk list | wc -l)" = 1 ] || fail "devices left: $(qublk list)"
}

t_options() {
    local spid
    qemu-img create -q -f qcow2 "$S/ro.qcow2" 16M
    printf 'image=%s\nnumber=5\nread-only=yes\ntarget=qcow2\ndepth=32\n' "$S/ro.qcow2" >"$S/etc/ro.conf"
    recv_start
    NOTIFY_SOCKET=$SOCK qublk service start -C "$S/etc" ro >/dev/null 2>"$S/ro.err" &
    spid=$!
    recv_wait "$spid" /dev/ublkb5
    qublk list | tee "$S/list"
    grep -Eq "^5 +live +qcow2 +1 +32 +$spid +yes " "$S/list" || fail "number/read-only/depth not applied"
    qublk udev-id ublkb5 | grep -qx QUBLK_READ_ONLY=1 || fail "udev-id: not read-only"
    MAINPID=$spid qublk service stop ro
    wait "$spid"
}

mkdir -p "$S"
vmtest service t_service
vmtest service-no-recovery t_no_recovery
vmtest service-options t_options
GUEST

vm_run 6.12 --timeout "${QUBLK_VM_TIMEOUT:-600}" "$TMPD/install-vm.guest.sh" "$B/tests/test_notify" ||
    fail "guest tests failed"
echo "PASS: $TEST_NAME"
