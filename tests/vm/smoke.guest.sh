# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/smoke.guest.sh: the harness's smoke (runs inside the VM through
# tests/vm/run.sh, alone or first in each boot of tests/test-vm-ublk.sh;
# see tests/vm/README.md).  Checks that the real ublk driver is there,
# that the qublk binary runs in the guest, that a null device comes and
# goes, and a raw image served over ublk passes fio --verify (skipped
# with SMOKE_QUICK=1, where other scripts run fio anyway).

t_ublk_control() {
    grep -qw ublk_drv /proc/modules || fail "ublk_drv is not loaded"
    [ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
}

t_qublk_help() {
    [ -x "$QUBLK" ] || fail "no qublk binary in the guest"
    "$QUBLK" --help
}

# (Not `qublk --help | grep -q`: with pipefail, grep's early exit can fail it.)
has_add() { grep -qE '^[[:space:]]+add[[:space:]]' <<<"$("$QUBLK" --help 2>&1)"; }

# Device number from `qublk add` output ("/dev/ublkbN").
dev_id() { sed -n 's|.*/dev/ublkb\([0-9][0-9]*\).*|\1|p' "$1" | head -n 1; }

t_null_add_del() {
    has_add || skip "qublk has no 'add' command yet"
    # Output to a file, not $(...): a daemon holding the pipe would hang us.
    "$QUBLK" add -t null --size 256M >/tmp/add.out
    cat /tmp/add.out
    local id
    id=$(dev_id /tmp/add.out)
    [ -n "$id" ] || fail "qublk add printed no /dev/ublkbN"
    wait_for "/dev/ublkb$id"
    [ "$(blockdev --getsize64 "/dev/ublkb$id")" = $((256 << 20)) ] \
        || fail "/dev/ublkb$id is not 256 MiB"
    "$QUBLK" list
    dd if="/dev/ublkb$id" of=/dev/null bs=1M count=16 iflag=direct
    "$QUBLK" del -n "$id"
    [ ! -e "/dev/ublkb$id" ] || fail "/dev/ublkb$id still there after del"
}

t_raw_fio_verify() {
    has_add || skip "qublk has no 'add' command yet"
    [ "${SMOKE_QUICK:-0}" = 0 ] || skip "quick smoke run"
    truncate -s 256M /tmp/disk.raw
    "$QUBLK" add -t raw /tmp/disk.raw >/tmp/add.out
    cat /tmp/add.out
    local id
    id=$(dev_id /tmp/add.out)
    [ -n "$id" ] || fail "qublk add printed no /dev/ublkbN"
    wait_for "/dev/ublkb$id"
    fio --allow_file_create=0 --name=smoke --filename="/dev/ublkb$id" --rw=randwrite --bs=4k \
        --size=64M --verify=crc32c --ioengine=libaio --direct=1 --iodepth=16 \
        --verify_fatal=1
    # The data went to the file: what the device reads equals the file.
    local a b
    a=$(dd if="/dev/ublkb$id" bs=1M count=64 iflag=direct 2>/dev/null | sha256sum)
    "$QUBLK" del -n "$id"
    b=$(dd if=/tmp/disk.raw bs=1M count=64 2>/dev/null | sha256sum)
    [ "$a" = "$b" ] || fail "device and backing file differ after fio"
    rm -f /tmp/disk.raw
}

vmtest ublk-control t_ublk_control
vmtest qublk-help t_qublk_help
vmtest null-add-del t_null_add_del
vmtest raw-fio-verify t_raw_fio_verify
