# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-recover.sh: daemon recovery (issue 8).  kill -9 of
# the daemon at random moments under fio --verify=crc32c (iodepth 64, 1
# and 2 queues, qcow2 with and without a backing file), each time followed
# by `qublk recover`: fio must finish with no I/O error and no verify
# failure; the same under a mounted ext4 (e2fsck -fn clean, file checksums
# intact); after del, qemu-img check finds leaks at most and QEMU reads
# what the device read.  `list` shows the dead daemon's device as quiesced.
# `qublk add --recover-on-restart -n ID` run again after a kill takes the
# device back (and refuses a live daemon or another image).
# RECOVER_KILLS (default 3) kills per fio run (the first 0.2..0.8 s in,
# so that a fast machine gets one too); fio writes and verifies its region
# one more time than that (--loops), so that the later kills land while it
# still runs (one pass ended after the first kill on 7.3); 4 runs + the
# ext4 case.

W=/tmp/ublk-recover
mkdir -p "$W"
KILLS=${RECOVER_KILLS:-3}
RANDOM=${SEED:-$$}

devnum() { echo "${1#/dev/ublkb}"; }
daemon_pid() { sed -n 's/^pid=//p' "/run/qublk/ublk$1"; }

# kill_recover ID: kill -9 the daemon, check the device waits (quiesced),
# start a new daemon.
kill_recover() {
    local id=$1 pid i
    pid=$(daemon_pid "$id")
    [ -n "$pid" ] || fail "no daemon pid for ublk$id"
    kill -KILL "$pid"
    for i in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ ! -d "/proc/$pid" ] || fail "daemon $pid survived kill -9"
    qublk list | tee "$W/list.out"
    grep -Eq "^$id +(quiesced|quiescing) " "$W/list.out" || fail "ublk$id not shown as quiesced"
    qublk recover -n "$id" >"$W/recover.out"
    grep -qx "/dev/ublkb$id" "$W/recover.out" || fail "recover printed $(cat "$W/recover.out")"
    [ "$(daemon_pid "$id")" != "$pid" ] || fail "the state file still names the dead daemon"
    qublk list | grep -Eq "^$id +live " || fail "ublk$id not live after recover"
}

# fio_verify_terse OUT: no errors in fio's terse v3 output (field 5).
fio_ok() {
    awk -F';' '{ if ($5 != 0) { print "fio errors: " $5; exit 1 } }' "$1"
}

# recover_case FMT QUEUES [backing]
recover_case() {
    local fmt=$1 queues=$2 backing=${3:-} img=$W/img.qcow2 dev id fio_pid rc k t
    rm -f "$img" "$W/base.qcow2"
    if [ -n "$backing" ]; then
        qemu-img create -q -f qcow2 "$W/base.qcow2" 128M
        qemu-io -f qcow2 -c 'write -P 0x5a 0 16M' -c 'write -P 0xa5 40M 8M' "$W/base.qcow2" >/dev/null
        qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$img"
    else
        qemu-img create -q -f "$fmt" ${PREALLOC:+-o preallocation=$PREALLOC} "$img" 128M
    fi
    dev=$(qublk add -q "$queues" "$img")
    id=$(devnum "$dev")
    fio --allow_file_create=0 --name=v --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --bssplit=4k/50:64k/40:512k/10 --iodepth=64 --numjobs="$queues" --size=32M --loops=$((KILLS + 1)) \
        --offset_increment=48M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 \
        >"$W/fio.out" 2>&1 &
    fio_pid=$!
    for ((k = 0; k < KILLS; k++)); do
        # A random moment: the first 0.2..0.8 s into fio (which runs for
        # seconds even on a fast idle machine, so there is always one),
        # the others 0.5..3 s after the previous recovery.
        if [ "$k" = 0 ]; then t=$((2 + RANDOM % 7)); else t=$((5 + RANDOM % 26)); fi
        sleep "$((t / 10)).$((t % 10))"
        kill -0 "$fio_pid" 2>/dev/null || break
        echo "kill $((k + 1)) after ${t}00 ms"
        kill_recover "$id"
    done
    echo "$k kills"
    [ "$k" -ge 1 ] || fail "fio ended before the first kill: make it longer"
    rc=0; wait "$fio_pid" || rc=$?
    cat "$W/fio.out"
    [ "$rc" = 0 ] || fail "fio exit $rc"
    fio_ok "$W/fio.out"
    dd if="$dev" of="$W/dev.raw" bs=1M iflag=direct status=none
    qublk del -n "$id"
    if [ "$fmt" = qcow2 ]; then
        rc=0; qemu-img check "$img" || rc=$?
        [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "qemu-img check exit $rc (corruption?)"
    fi
    qemu-img convert -f "$fmt" -O raw "$img" "$W/qemu.raw"
    cmp "$W/dev.raw" "$W/qemu.raw"
    rm -f "$W/dev.raw" "$W/qemu.raw" "$img" "$W/base.qcow2"
}

t_recover_raw_q2() { recover_case raw 2; }
t_recover_prealloc_q2() { PREALLOC=metadata recover_case qcow2 2; }
t_recover_q1() { recover_case qcow2 1; }
t_recover_q2() { recover_case qcow2 2; }
t_recover_q1_backing() { recover_case qcow2 1 backing; }
t_recover_q2_backing() { recover_case qcow2 2 backing; }

# ext4 on the device survives kills while files are written.
t_recover_ext4() {
    local img=$W/fs.qcow2 dev id pid rc k
    qemu-img create -q -f qcow2 "$img" 256M
    dev=$(qublk add -q 2 "$img")
    id=$(devnum "$dev")
    mkfs.ext4 -q -O metadata_csum "$dev"
    mkdir -p "$W/mnt"
    mount "$dev" "$W/mnt"
    (
        for i in $(seq 1 24); do
            dd if=/dev/urandom of="$W/mnt/f$i" bs=256k count=8 status=none
            sha256sum "$W/mnt/f$i" | sed "s|$W/mnt/||" >>"$W/sums"
            [ $((i % 6)) != 0 ] || sync
        done
    ) &
    pid=$!
    : >"$W/sums"
    for ((k = 0; k < KILLS; k++)); do
        # The first kill early (the writer runs for seconds), then 1..3 s apart.
        if [ "$k" = 0 ]; then sleep "0.$((3 + RANDOM % 6))"; else sleep "$((1 + RANDOM % 3))"; fi
        kill -0 "$pid" 2>/dev/null || break
        kill_recover "$id"
    done
    echo "$k kills"
    [ "$k" -ge 1 ] || fail "the writer ended before the first kill"
    rc=0; wait "$pid" || rc=$?
    [ "$rc" = 0 ] || fail "writer exit $rc (I/O error on the file system?)"
    sync
    (cd "$W/mnt" && sha256sum -c "$W/sums" >/dev/null) || fail "file checksums differ"
    umount "$W/mnt"
    e2fsck -fn "$dev"
    qublk del -n "$id"
    rc=0; qemu-img check "$img" || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "qemu-img check exit $rc (corruption?)"
    rm -f "$img" "$W/sums"
}

# add --recover-on-restart: the same command, run again after the daemon
# died (as a service manager restarts it), takes the device back; fio
# under it sees no error.  Refused: while the daemon runs, for another
# image; without the flag the number is taken.
t_recover_restart() {
    local img=$W/rs.qcow2 other=$W/other.raw dev fio_pid pid rc
    qemu-img create -q -f qcow2 "$img" 128M
    truncate -s 16M "$other"
    dev=$(qublk add --recover-on-restart -n 7 -q 2 "$img")
    [ "$dev" = /dev/ublkb7 ]
    if qublk add --recover-on-restart -n 7 "$img" 2>"$W/err"; then fail "taken from a live daemon"; fi
    grep -q 'its daemon (pid [0-9]*) is running' "$W/err"
    fio --allow_file_create=0 --name=v --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --bssplit=4k/50:64k/50 --iodepth=32 --numjobs=2 --size=24M --offset_increment=48M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
        --output-format=terse --terse-version=3 >"$W/fio.out" 2>&1 &
    fio_pid=$!
    sleep 0.5
    kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before the kill"
    pid=$(daemon_pid 7)
    kill -KILL "$pid"
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if qublk add --recover-on-restart -n 7 "$other" 2>"$W/err"; then fail "ublk7 taken for another image"; fi
    grep -q "ublk7 serves qcow2 $img" "$W/err"
    if qublk add -n 7 "$img" 2>"$W/err"; then fail "add -n 7 without the flag succeeded"; fi
    # The restart.
    [ "$(qublk add --recover-on-restart -n 7 -q 2 "$img")" = /dev/ublkb7 ]
    [ "$(daemon_pid 7)" != "$pid" ] || fail "the state file still names the dead daemon"
    qublk list | grep -Eq "^7 +live " || fail "ublk7 not live after the restart"
    rc=0; wait "$fio_pid" || rc=$?
    cat "$W/fio.out"
    [ "$rc" = 0 ] || fail "fio exit $rc"
    fio_ok "$W/fio.out"
    qublk del -n 7
    rc=0; qemu-img check "$img" || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "qemu-img check exit $rc (corruption?)"
    rm -f "$img" "$other"
}

# A device whose daemon died can still be deleted (its queued I/O fails);
# while fio has it open only with --force where del is a safe stop.
t_recover_del() {
    local img=$W/d.raw dev id pid fio_pid rc
    truncate -s 64M "$img"
    dev=$(qublk add "$img")
    id=$(devnum "$dev")
    fio --allow_file_create=0 --name=l --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
        --iodepth=16 --size=32M --time_based --runtime=30 >"$W/fio.out" 2>&1 &
    fio_pid=$!
    sleep 2
    pid=$(daemon_pid "$id")
    kill -KILL "$pid"
    sleep 1
    # fio holds it open: a safe stop refuses, --force stops it.
    if ublk_has safe_stop_dev; then
        if qublk del -n "$id" 2>"$W/err"; then fail "del of an open device succeeded"; fi
        grep -q "ublk$id is busy" "$W/err"
    fi
    qublk del --force -n "$id"
    for _ in $(seq 1 300); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$fio_pid" 2>/dev/null; then
        kill -KILL "$fio_pid"
        fail "fio still running 30 s after del"
    fi
    rc=0; wait "$fio_pid" || rc=$?
    [ "$rc" != 0 ] || fail "fio saw no error from a deleted device"
    [ ! -e "$dev" ]
    rm -f "$img"
}

need qublk fio qemu-img mkfs.ext4 e2fsck
if [ -n "${RECOVER_ONLY:-}" ]; then
    for t in $RECOVER_ONLY; do vmtest "ublk-recover-$t" "t_recover_${t//-/_}"; done
    return 0
fi
vmtest ublk-recover-q1 t_recover_q1
vmtest ublk-recover-q2 t_recover_q2
vmtest ublk-recover-q1-backing t_recover_q1_backing
vmtest ublk-recover-q2-backing t_recover_q2_backing
vmtest ublk-recover-ext4 t_recover_ext4
vmtest ublk-recover-restart t_recover_restart
vmtest ublk-recover-del t_recover_del
