# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-snapshot.sh: internal snapshots of a live qcow2
# device through its daemon (issue 10), with QEMU as the oracle.
#   - `qublk snapshot -n ID -c s1` while fio --verify writes the device
#     (2 queues, the default recoverable device: crash-safe metadata and
#     lazy refcounts; and 1 queue, --no-recovery, over a backing file):
#     data written with dd conv=fsync before the snapshot is in s1, the
#     data written after it over the same range is in the active layer
#     only; fio's verify pass (after the snapshot) finds every block;
#     a snapshot of the idle device equals the device read whole at that
#     moment; `-l` lists what `-c` made and `-d` removed; `-a` is refused
#     live and changes nothing; the offline `qublk snapshot FILE` is still
#     refused while the device holds the image.  After `qublk del`:
#     qemu-img snapshot -l shows the snapshots, qemu-img check is clean,
#     qemu-img convert -l snapshot.name=... reads what the device held at
#     each snapshot, and the active layer is what the device read last.
#   - kill -9 of the daemon at several moments of a live snapshot (4 KiB
#     clusters, so that it lasts): qemu-img check finds leaks at most
#     (and, as for any qcow2 snapshot cut short, active entries whose
#     refcount is 1 still lacking OFLAG_COPIED), is clean after -r all,
#     the snapshot is there whole or not at all, and no data changed.

W=/tmp/ublk-snapshot
mkdir -p "$W"
FIO_SIZE=${UBLK_TEST_FIO_SIZE:-40M}

devnum() { echo "${1#/dev/ublkb}"; }
# random FILE MB: MB MiB of random bytes (busybox head has no size suffixes).
random() { dd if=/dev/urandom of="$1" bs=1M count="$2" status=none; }
# daemon_pid ID: the pid of device ID's daemon.
daemon_pid() {
    qublk list --output json | grep "\"id\": $1," | sed -n 's/.*"pid": \([0-9]*\).*/\1/p'
}

# snap_names IMG: the names qemu-img lists, space separated.
snap_names() { qemu-img snapshot -l "$1" | awk 'NR > 2 { printf "%s ", $2 }'; }

# live_names ID: the names `qublk snapshot -n ID -l` lists.
live_names() { qublk snapshot -n "$1" -l | awk 'NR > 2 { printf "%s ", $2 }'; }

# region DEV|FILE OFFSET_MB LEN_MB OUT
region() { dd if="$1" of="$4" bs=1M skip="$2" count="$3" iflag=direct status=none 2>/dev/null ||
           dd if="$1" of="$4" bs=1M skip="$2" count="$3" status=none; }

# fio_verify DEV JOBS OFFSET: random writes then a verify pass over
# FIO_SIZE per job, from OFFSET on (jobs 48 MiB apart).
fio_verify() {
    local dev=$1 jobs=$2 off=$3
    fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio \
        --rw=randwrite --bssplit=4k/40:64k/30:256k/30 --iodepth=32 \
        --offset="$off" --size="$FIO_SIZE" --numjobs="$jobs" --offset_increment=48M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=1 \
        --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 \
        >"$W/fio.out" 2>&1 || { cat "$W/fio.out"; return 1; }
    awk -F';' '{ if ($5 != 0) { print "fio errors: " $5; exit 1 } }' "$W/fio.out"
}

# written_mb DEV: MiB the device has been asked to write so far.
written_mb() { awk '{ print int($7 / 2048) }' "/sys/block/${1#/dev/}/stat"; }

# live_case QUEUES BACKING ADD-OPTS... : see the top.
live_case() {
    local queues=$1 backing=$2; shift 2
    local img=$W/live.qcow2 dev id fio_pid rc w0 i
    rm -f "$img" "$W/base.qcow2"
    if [ -n "$backing" ]; then
        qemu-img create -q -f qcow2 "$W/base.qcow2" 160M
        qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' -c 'write -P 0xa5 140M 8M' "$W/base.qcow2" \
            >/dev/null
        qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$img"
    else
        qemu-img create -q -f qcow2 "$img" 160M
    fi
    dev=$(qublk add -q "$queues" "$@" "$img")
    id=$(devnum "$dev")
    # Known data A on [0, 8M), on the device (synced).
    random "$W/A" 8
    dd if="$W/A" of="$dev" bs=1M oflag=direct conv=fsync status=none
    # fio writes [16M, ...) meanwhile; the snapshot is taken mid-run,
    # once fio has written a few MiB.
    w0=$(written_mb "$dev")
    fio_verify "$dev" "$queues" 16M &
    fio_pid=$!
    for i in $(seq 1 600); do
        [ "$(written_mb "$dev")" -ge $((w0 + 4)) ] && break
        kill -0 "$fio_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$fio_pid" || fail "fio ended before the snapshot (make FIO_SIZE larger)"
    echo "snapshot after $(($(written_mb "$dev") - w0)) MiB of fio's writes (poll $i)"
    qublk snapshot -n "$id" -c s1
    kill -0 "$fio_pid" || fail "fio ended during the snapshot: not mid-run (FIO_SIZE)"
    # B over A's range, after the snapshot.
    random "$W/B" 8
    dd if="$W/B" of="$dev" bs=1M oflag=direct conv=fsync status=none
    rc=0; wait "$fio_pid" || rc=$?
    [ "$rc" = 0 ] || fail "fio --verify across the live snapshot failed"
    tail -n 1 "$W/fio.out" | cut -c1-80
    region "$dev" 0 8 "$W/dev.B"
    cmp "$W/dev.B" "$W/B"

    # The idle device, read whole, is what the snapshot s2 holds.
    dd if="$dev" of="$W/dump2" bs=1M iflag=direct status=none
    qublk snapshot -n "$id" -c s2
    # C after it; a snapshot made and deleted live.
    random "$W/C" 4
    dd if="$W/C" of="$dev" bs=1M seek=2 oflag=direct conv=fsync status=none
    qublk snapshot -n "$id" -c tmp
    [ "$(live_names "$id")" = "s1 s2 tmp " ] || fail "live list: '$(live_names "$id")'"
    qublk snapshot -n "$id" -d tmp
    [ "$(live_names "$id")" = "s1 s2 " ] || fail "live list after -d: '$(live_names "$id")'"
    # Deleting a snapshot that does not exist fails, naming it.
    rc=0; qublk snapshot -n "$id" -d nosuch 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] && grep -q "not found" "$W/err" || fail "deleting nosuch: exit $rc"

    # Reverting live is refused; nothing changes.
    rc=0; qublk snapshot -n "$id" -a s1 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] && grep -q "refused" "$W/err" || fail "-a on a live device: exit $rc"
    # The offline command still refuses the image in use.
    rc=0; qublk snapshot -c x "$img" 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] && grep -q "lock" "$W/err" || fail "offline snapshot of an image in use: exit $rc"
    region "$dev" 2 4 "$W/dev.C"
    cmp "$W/dev.C" "$W/C"

    dd if="$dev" of="$W/dump3" bs=1M iflag=direct status=none
    qublk del -n "$id"
    [ ! -e "$dev" ]

    qemu-img check "$img"
    [ "$(snap_names "$img")" = "s1 s2 " ] || fail "qemu-img snapshot -l: '$(snap_names "$img")'"
    qemu-img convert -f qcow2 -O raw -l snapshot.name=s1 "$img" "$W/s1.raw"
    region "$W/s1.raw" 0 8 "$W/s1.A"
    cmp "$W/s1.A" "$W/A" || fail "snapshot s1 does not hold what was written before it"
    if [ -n "$backing" ]; then
        # What neither the device nor fio wrote comes from the backing file.
        region "$W/s1.raw" 140 8 "$W/s1.base"
        cmp "$W/s1.base" <(dd if=/dev/zero bs=1M count=8 status=none | tr '\0' '\245')
    fi
    qemu-img convert -f qcow2 -O raw -l snapshot.name=s2 "$img" "$W/s2.raw"
    cmp "$W/s2.raw" "$W/dump2" || fail "snapshot s2 is not what the device held"
    qemu-img convert -f qcow2 -O raw "$img" "$W/active.raw"
    cmp "$W/active.raw" "$W/dump3" || fail "the active layer is not what the device held"
    rm -f "$img" "$W"/*.raw "$W"/dump* "$W"/dev.* "$W"/[ABC] "$W/s1.A" "$W/s1.base" \
        "$W/base.qcow2"
}

t_live_q2() { live_case 2 ""; }
t_live_q1_backing() { live_case 1 backing --no-recovery; }

# elapsed CMD...: run CMD, print the seconds it took.
elapsed() {
    local t0=$EPOCHREALTIME
    "$@" >/dev/null
    awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }'
}

# kill -9 of the daemon during live snapshots: at fractions of the time
# the daemon spends on one, measured first (a whole `-c` less a `-l`,
# which costs the command's start-up and the socket round trip only).
# 512 B clusters make it last: 32 MiB of data are 65536 clusters and
# 1024 L2 tables.
t_kill() {
    local img=$W/k.qcow2 dev id pid o t frac delay rc n=0 with=0 without=0
    qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 40M
    dev=$(qublk add --no-recovery "$img")
    id=$(devnum "$dev")
    dd if=/dev/urandom of="$dev" bs=1M count=32 oflag=direct conv=fsync status=none
    o=$(elapsed qublk snapshot -n "$id" -l)
    t=$(elapsed qublk snapshot -n "$id" -c cal)
    qublk snapshot -n "$id" -d cal
    qublk del -n "$id"
    echo "a live snapshot takes $t s here, a list $o s"
    for frac in 0.1 0.3 0.5 0.7 0.9; do
        delay=$(awk -v t="$t" -v o="$o" -v f="$frac" 'BEGIN { d = t - o; print o + f * (d > 0 ? d : 0) }')
        dev=$(qublk add --no-recovery "$img")
        id=$(devnum "$dev")
        pid=$(daemon_pid "$id")
        [ -n "$pid" ] || fail "no daemon pid for ublk$id"
        dd if=/dev/urandom of="$dev" bs=1M count=1 seek=$((n + 32)) oflag=direct conv=fsync \
            status=none
        dd if="$dev" of="$W/before" bs=1M iflag=direct status=none
        qublk snapshot -n "$id" -c "k$n" &
        sleep "$delay"
        kill -KILL "$pid"
        wait $! || true
        qublk del -n "$id"
        rc=0; qemu-img check "$img" >"$W/chk" 2>&1 || rc=$?
        if grep -E '^(ERROR|Warning)' "$W/chk" |
           grep -vqE '^ERROR OFLAG_COPIED (data|L2) cluster: .* refcount=1$' ||
           { [ "$rc" != 0 ] && [ "$rc" != 2 ] && [ "$rc" != 3 ]; }; then
            cat "$W/chk"
            fail "kill -9 after $delay s: qemu-img check exit $rc, more than leaks"
        fi
        echo "kill -9 after $delay s: qemu-img check exit $rc"
        grep -E '^(ERROR|Leaked)' "$W/chk" | head -n 3 || true
        # (-r all lists every flag it sets: thousands of lines.)
        [ "$rc" = 0 ] || qemu-img check -q -r all "$img" >/dev/null 2>&1 || true
        qemu-img check -q "$img" || fail "kill -9 after $delay s: not clean after -r all"
        qemu-img convert -f qcow2 -O raw "$img" "$W/after"
        cmp "$W/before" "$W/after" || fail "kill -9 after $delay s: the data changed"
        if snap_names "$img" | grep -qw "k$n"; then
            qemu-img convert -f qcow2 -O raw -l "snapshot.name=k$n" "$img" "$W/snap"
            cmp "$W/before" "$W/snap" || fail "kill -9 after $delay s: snapshot k$n is damaged"
            with=$((with + 1))
        else
            without=$((without + 1))
        fi
        n=$((n + 1))
    done
    echo "kill -9 during a live snapshot: $with times after it, $without before it ended"
    rm -f "$img" "$W/before" "$W/after" "$W/snap" "$W/chk"
}

need qublk fio qemu-img qemu-io cmp
vmtest ublk-snapshot-live-q2 t_live_q2
vmtest ublk-snapshot-live-q1-backing t_live_q1_backing
vmtest ublk-snapshot-kill9 t_kill
