# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-upgrade.sh: live upgrade (issue 8).  `qublk upgrade`
# hands a device over to a new daemon while fio --verify=crc32c writes to
# it at iodepth 64 (1 and 2 queues, qcow2; on 7.3 2 queues once more with
# --no-batch): fio must see zero errors, the
# daemon pid must change, the image must stay locked against qemu-io
# throughout (it is passed open, with its locks), and after del qemu-img
# check must be clean (a hand-over is not a crash: no leaks) and QEMU must
# read what the device read.  On 6.12 (no QUIESCE_DEV), and on 7.3 with
# batched commands (there QUIESCE_DEV fails the requests that arrive
# before the new daemon takes over), the old daemon stops its queues and
# the kernel requeues what they held.  A hand-over
# that hangs or fails prints both daemons' threads (kernel stacks) and
# the device's log (ublk_dump).
# UPGRADES (default 3) hand-overs per fio run, the first 0.2..0.8 s in,
# then 0.5..3 s apart;
# UPGRADE_FIO_SIZE (default 32M) per fio job; UPGRADE_ONLY="q2 q2 ..."
# runs only those cases (repeats allowed: a stress run).

W=/tmp/ublk-upgrade
mkdir -p "$W"
RANDOM=${SEED:-$$}

devnum() { echo "${1#/dev/ublkb}"; }
daemon_pid() { sed -n 's/^pid=//p' "/run/qublk/ublk$1"; }

# children PID: the processes whose parent is PID.
children() {
    local st
    for st in /proc/[0-9]*/stat; do
        awk -v p="$1" '$4 == p { print $1 }' "$st" 2>/dev/null
    done
}

# run_upgrade ID OLD_PID: qublk upgrade -n ID; a hand-over that takes more
# than 60 s, or fails, dumps what the old and the new daemon are doing.
run_upgrade() {
    local id=$1 old=$2 up_pid i rc=0 dumped=0
    qublk upgrade -n "$id" >"$W/up.out" 2>"$W/up.err" &
    up_pid=$!
    { local -; set +x; } 2>/dev/null
    for ((i = 0; i < 1800; i++)); do
        kill -0 "$up_pid" 2>/dev/null || break
        if [ "$i" = 600 ]; then
            echo "qublk upgrade still running after 60 s"
            # shellcheck disable=SC2046 # (one pid per word)
            ublk_dump "$id" "$old" $(children "$up_pid")
            dumped=1
        fi
        sleep 0.1
    done
    wait "$up_pid" || rc=$?
    cat "$W/up.err"
    if [ "$rc" != 0 ]; then
        [ "$dumped" = 1 ] || ublk_dump "$id" "$old"
        fail "qublk upgrade -n $id: exit $rc"
    fi
}

upgrade_case() {
    local queues=$1 img=$W/img.qcow2 dev id fio_pid rc k t old new
    qemu-img create -q -f qcow2 "$img" 128M
    # shellcheck disable=SC2086 # ADD_OPTS: words
    dev=$(qublk add -q "$queues" ${ADD_OPTS:-} "$img")
    id=$(devnum "$dev")
    fio --allow_file_create=0 --name=v --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --bssplit=4k/50:64k/40:512k/10 --iodepth=64 --numjobs="$queues" --size="${UPGRADE_FIO_SIZE:-32M}" \
        --offset_increment=48M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 \
        >"$W/fio.out" 2>&1 &
    fio_pid=$!
    for ((k = 0; k < ${UPGRADES:-3}; k++)); do
        # The first hand-over 0.2..0.8 s into fio (always one, even on a
        # fast machine), the others 0.5..3 s after the previous one.
        if [ "$k" = 0 ]; then t=$((2 + RANDOM % 7)); else t=$((5 + RANDOM % 26)); fi
        sleep "$((t / 10)).$((t % 10))"
        kill -0 "$fio_pid" 2>/dev/null || break
        old=$(daemon_pid "$id")
        run_upgrade "$id" "$old"
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
# Where batched commands are the default (7.3), a device without them is
# the one that is quiesced (QUIESCE_DEV) for its hand-over.
t_upgrade_nobatch() {
    ublk_has batch_io || skip "no batch_io on $VMTEST_KERNEL"
    (export ADD_OPTS=--no-batch; upgrade_case 2)
}

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
if [ -n "${UPGRADE_ONLY:-}" ]; then
    for t in $UPGRADE_ONLY; do vmtest "ublk-upgrade-$t" "t_upgrade_${t//-/_}"; done
    return 0
fi
vmtest ublk-upgrade-q1 t_upgrade_q1
vmtest ublk-upgrade-q2 t_upgrade_q2
vmtest ublk-upgrade-nobatch t_upgrade_nobatch
vmtest ublk-upgrade-refusals t_upgrade_refusals
