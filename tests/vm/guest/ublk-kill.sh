# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-kill.sh: kill -9 of a daemon under load (issue 3
# acceptance), on a device made with --no-recovery (the default keeps the
# device for `qublk recover`: ublk-recover.sh).  Pending I/O must fail
# cleanly (fio ends, no hung task), `qublk del` must clean up the dead
# daemon's device, and qemu-img check may find leaked clusters but never
# corruption.  With lazy refcounts (ublk-kill9-lazy): the killed daemon
# leaves the image dirty; the next `add` repairs it (saying so) and every
# byte flushed before the kill reads back; `qemu-img check` is clean.
# KILL_ONLY="qcow2 ..." runs only those cases (raw, qcow2, lazy): on a
# kernel where the held requests wait for the block timeout each case
# costs 30 s.

W=/tmp/ublk-kill
mkdir -p "$W"
devnum() { echo "${1#/dev/ublkb}"; }

kill_case() {
    local fmt=$1 img dev pid fio_pid rc
    img=$W/k.$fmt
    qemu-img create -q -f "$fmt" "$img" 128M
    dev=$(qublk add --no-recovery -t "$fmt" "$img")
    qublk list --output json | grep -q '"recoverable": false'
    pid=$(qublk list --output json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -n 1)
    fio --allow_file_create=0 --name=load --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --bssplit=4k/50:64k/50 --iodepth=64 --size=100M --time_based --runtime=60 \
        >"$W/fio.out" 2>&1 &
    fio_pid=$!
    sleep 4
    kill -KILL "$pid"
    # fio must see errors and end, not hang on a dead device.  Requests the
    # daemon held when it died end at the block layer timeout (30 s).
    for _ in $(seq 1 600); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$fio_pid" 2>/dev/null; then
        kill -KILL "$fio_pid"
        fail "fio still running 60 s after the daemon was killed"
    fi
    rc=0; wait "$fio_pid" || rc=$?
    tail -n 5 "$W/fio.out"
    echo "fio exit $rc (errors expected)"
    qublk list || true
    qublk del -n "$(devnum "$dev")"
    [ ! -e "$dev" ]
    [ ! -e "/dev/ublkc$(devnum "$dev")" ]
    if [ "$fmt" = qcow2 ]; then
        # exit 0: clean; 3: leaks only.  2 (corruption) or 1 fail.
        rc=0; qemu-img check "$img" || rc=$?
        [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "qemu-img check exit $rc"
    fi
    # The device number is free again.
    dev=$(qublk add -t "$fmt" "$img")
    dd if="$dev" of=/dev/null bs=1M count=4 iflag=direct status=none
    qublk del -n "$(devnum "$dev")"
    rm -f "$img"
}

# The incompatible-features dirty bit (header offset 72, bit 0).
dirty_bit() {
    local b
    b=$(od -An -tu1 -j79 -N1 "$1" | tr -d ' ')
    echo $((b & 1))
}

t_kill_lazy() {
    local img=$W/lazy.qcow2 dev pid fio_pid rc
    qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 128M
    dev=$(qublk add --no-recovery "$img")
    pid=$(qublk list --output json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -n 1)
    # 32 MiB of random data, flushed (conv=fsync: a FLUSH to the device).
    dd if=/dev/urandom of="$W/flushed.bin" bs=1M count=32 status=none
    dd if="$W/flushed.bin" of="$dev" bs=1M oflag=direct conv=fsync status=none
    [ "$(dirty_bit "$img")" = 1 ] || fail "no dirty bit after allocating writes with lazy refcounts"
    # Load elsewhere (allocations with refcounts only in memory), then kill.
    fio --allow_file_create=0 --name=load --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite \
        --offset=64M --size=64M --bssplit=4k/50:64k/50 --iodepth=32 --time_based \
        --runtime=60 >"$W/fio.out" 2>&1 &
    fio_pid=$!
    sleep 4
    kill -0 "$fio_pid" || fail "fio ended before the kill"
    kill -KILL "$pid"
    for _ in $(seq 1 600); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$fio_pid" 2>/dev/null && { kill -KILL "$fio_pid"; fail "fio still running 60 s after the kill"; }
    wait "$fio_pid" || true
    qublk del -n "$(devnum "$dev")"
    [ "$(dirty_bit "$img")" = 1 ] || fail "the killed daemon's image is not dirty"
    # What QEMU sees before the repair: refcounts behind the L2 tables.
    rc=0; qemu-img check "$img" >"$W/check-before.out" 2>&1 || rc=$?
    echo "qemu-img check of the dirty image: exit $rc"
    # A read-write open repairs it first, and says so.
    dev=$(qublk add "$img" 2>"$W/add.err")
    cat "$W/add.err"
    grep -q "not closed cleanly" "$W/add.err" || fail "add did not say it repaired the dirty image"
    [ "$(dirty_bit "$img")" = 0 ] || fail "the dirty bit is still set after the repairing open"
    cmp -n $((32 << 20)) "$dev" "$W/flushed.bin" || fail "flushed data lost"
    qublk del -n "$(devnum "$dev")"
    qemu-img check "$img" || fail "qemu-img check after the repair (exit $?)"
    rm -f "$img" "$W/flushed.bin"
}

t_kill_raw() { kill_case raw; }
t_kill_qcow2() { kill_case qcow2; }

need qublk fio qemu-img
if [ -n "${KILL_ONLY:-}" ]; then
    for t in $KILL_ONLY; do vmtest "ublk-kill9-$t" "t_kill_$t"; done
    return 0
fi
vmtest ublk-kill9-raw t_kill_raw
vmtest ublk-kill9-qcow2 t_kill_qcow2
vmtest ublk-kill9-lazy t_kill_lazy
