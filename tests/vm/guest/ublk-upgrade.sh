# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-upgrade.sh: live upgrade (issue 8).  `qublk upgrade`
# hands a device over to a new daemon while fio --verify=crc32c writes to
# it at iodepth 64 (1 and 2 queues, qcow2): fio must see zero errors, the
# daemon pid must change, the image must stay locked against qemu-io
# throughout (it is passed open, with its locks), and after del qemu-img
# check must be clean (a hand-over is not a crash: no leaks) and QEMU must
# read what the device read.  On 6.12 (no QUIESCE_DEV) the old daemon
# stops its queues and the kernel requeues what they held.

W=/tmp/ublk-upgrade
mkdir -p "$W"
RANDOM=${SEED:-$$}

devnum() { echo "${1#/dev/ublkb}"; }
daemon_pid() { sed -n 's/^pid=//p' "/run/qublk/ublk$1"; }

upgrade_case() {
    local queues=$1 img=$W/img.qcow2 dev id fio_pid rc k old new
    qemu-img create -q -f qcow2 "$img" 128M
    dev=$(qublk add -q "$queues" "$img")
    id=$(devnum "$dev")
    fio --name=v --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --bssplit=4k/50:64k/40:512k/10 --iodepth=64 --numjobs="$queues" --size=32M \
        --offset_increment=48M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 \
        >"$W/fio.out" 2>&1 &
    fio_pid=$!
    for ((k = 0; k < 3; k++)); do
        sleep "$((1 + RANDOM % 3))"
        kill -0 "$fio_pid" 2>/dev/null || break
        old=$(daemon_pid "$id")
        qublk upgrade -n "$id" >"$W/up.out"
        grep -qx "$dev" "$W/up.out" || fail "upgrade printed $(cat "$W/up.out")"
        new=$(daemon_pid "$id")
        [ "$new" != "$old" ] || fail "the daemon did not change"
        for _ in $(seq 1 100); do [ -d "/proc/$old" ] || break; sleep 0.1; done
        [ ! -d "/proc/$old" ] || fail "the old daemon $old is still running"
        # The new daemon holds the image: QEMU is refused.
        if qemu-io -c 'read 0 512' "$img" >"$W/qio.out" 2>&1; then
            fail "qemu-io opened the image while the new daemon serves it"
        fi
        grep -q 'Failed to get' "$W/qio.out"
        qublk list | grep -Eq "^$id +live " || fail "ublk$id not live after upgrade"
    done
    echo "$k upgrades"
    [ "$k" -ge 1 ] || fail "fio ended before the first upgrade"
    rc=0; wait "$fio_pid" || rc=$?
    cat "$W/fio.out"
    [ "$rc" = 0 ] || fail "fio exit $rc"
    awk -F';' '{ if ($5 != 0) { print "fio errors: " $5; exit 1 } }' "$W/fio.out"
    dd if="$dev" of="$W/dev.raw" bs=1M iflag=direct status=none
    qublk del -n "$id"
    qemu-img check "$img"
    qemu-img convert -f qcow2 -O raw "$img" "$W/qemu.raw"
    cmp "$W/dev.raw" "$W/qemu.raw"
    rm -f "$W/dev.raw" "$W/qemu.raw" "$img"
}

t_upgrade_q1() { upgrade_case 1; }
t_upgrade_q2() { upgrade_case 2; }

# Refusals: upgrade of a device with no daemon, recover of a live one.
t_upgrade_refusals() {
    local img=$W/r.raw dev id
    truncate -s 16M "$img"
    dev=$(qublk add "$img")
    id=$(devnum "$dev")
    if qublk recover -n "$id" 2>"$W/err"; then fail "recover of a live device succeeded"; fi
    grep -q "is running: use 'qublk upgrade" "$W/err"
    qublk del -n "$id"
    dev=$(qublk add --no-recovery "$img")
    id=$(devnum "$dev")
    if qublk upgrade -n "$id" 2>"$W/err"; then fail "upgrade without user_recovery succeeded"; fi
    grep -q "without user_recovery" "$W/err"
    qublk del -n "$id"
    rm -f "$img"
}

need qublk fio qemu-img qemu-io
vmtest ublk-upgrade-q1 t_upgrade_q1
vmtest ublk-upgrade-q2 t_upgrade_q2
vmtest ublk-upgrade-refusals t_upgrade_refusals
