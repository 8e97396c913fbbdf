# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-race.sh: concurrent requests on disjoint ranges that
# share clusters, through a two-queue qublk device (issue 6), run by
# tests/test-vm-ublk.sh.  For every image kind (empty, preallocated with
# metadata or falloc, compressed, over a backing file with data) and
# cluster size (512 B, 4 KiB, 64 KiB, 2 MiB; v3), `qublk add -q 2` serves
# the image and /vmtest/ublk-race (tests/vm/tools/ublk-race.c) issues
# batches of writes, write-zeroes (with and without unmap), discards,
# fsyncs and reads from two threads pinned to the two CPUs, checking every
# batch against its model; after `qublk del` the image must compare equal
# to the model (qemu-img compare) and check clean.  Both blk-mq queues must
# have dispatched requests.  Every other case runs the daemon with
# QUBLK_IO_INLINE=0: its reads and writes of the image (in tmpfs) then go
# through io_uring, as on a disk, and yield, so that the requests of one
# queue interleave around them too; the others with inline I/O (io.c).
# The starting content of the compressed and backing-file cases and the
# compressed images come from the host (race_files in tests/test-vm-ublk.sh).
# Replay: QUBLK_SEED=N QUBLK_VM_GUEST=race tests/test-vm-ublk.sh (tests/vm/run.sh
# --env UBLK_RACE_BATCHES=N changes the batches per case).

RACE=$VMTEST_DIR/ublk-race
FILES=$VMTEST_DIR/race
SEED=${QUBLK_SEED:-$(( $(od -An -tu4 -N4 /dev/urandom) % 1000000000 ))}
W=/tmp/ublk-race
mkdir -p "$W"
echo "ublk-race: seed $SEED"

devnum() { echo "${1#/dev/ublkb}"; }

# Image size per cluster size (as in race_files in tests/test-vm-ublk.sh):
# at least 8 windows of 2-3 clusters, small enough for TCG.
img_size() {
    case $1 in
        512) echo 2M ;;
        4k) echo 4M ;;
        64k) echo 8M ;;
        2M) echo 16M ;;
    esac
}

# Batches per case: big clusters move more bytes per batch, and under TCG
# bytes are what the time goes on.  UBLK_RACE_BATCHES overrides.
batches() {
    case $1 in
        512|4k) echo "${UBLK_RACE_BATCHES:-150}" ;;
        64k) echo "${UBLK_RACE_BATCHES:-120}" ;;
        2M) echo "${UBLK_RACE_BATCHES:-60}" ;;
    esac
}

bytes() {
    case $1 in
        *k) echo $(( ${1%k} << 10 )) ;;
        *M) echo $(( ${1%M} << 20 )) ;;
        *) echo "$1" ;;
    esac
}

# race_case KIND CLUSTER CASE-INDEX
race_case() {
    local kind=$1 cs=$2 seed=$((SEED + $3)) size dev opts
    local img=$W/img.qcow2 init=()
    size=$(img_size "$cs")
    opts=cluster_size=$(bytes "$cs")
    rm -f "$W"/*
    case $kind in
        empty) qemu-img create -q -f qcow2 -o "$opts" "$img" "$size" ;;
        metadata|falloc)
            qemu-img create -q -f qcow2 -o "$opts,preallocation=$kind" "$img" "$size" ;;
        compressed)
            # Made on the host: qemu-img convert -c takes minutes under TCG.
            cp "$FILES/compressed-$cs.qcow2" "$img"
            qemu-img check --output=json "$img" | grep -q '"compressed-clusters": [1-9]'
            init=(-i "$FILES/init-$cs.raw")
            ;;
        backing)
            qemu-img convert -f raw -O qcow2 "$FILES/init-$cs.raw" "$W/base.qcow2"
            qemu-img create -q -f qcow2 -o "$opts" -b "$W/base.qcow2" -F qcow2 "$img"
            sha256sum "$W/base.qcow2" >"$W/base.sum"
            init=(-i "$FILES/init-$cs.raw")
            ;;
    esac
    if [ $(($3 % 2)) = 1 ]; then
        dev=$(QUBLK_IO_INLINE=0 qublk add -t qcow2 -q 2 "$img")
    else
        dev=$(qublk add -t qcow2 -q 2 "$img")
    fi
    [ -b "$dev" ]
    local dbg=/sys/kernel/debug/block/${dev#/dev/}
    if ! "$RACE" -s "$seed" -c "$(bytes "$cs")" -b "$(batches "$cs")" "${init[@]}" "$dev" "$W/model.raw"; then
        qublk del -n "$(devnum "$dev")" || true
        fail "ublk-race found a mismatch ($kind, cluster $cs, seed $seed)"
    fi
    # Both queues saw requests (blk-mq debugfs, when the kernel has it).
    if [ -r "$dbg/hctx1/dispatched" ]; then
        head -n 3 "$dbg/hctx0/dispatched" "$dbg/hctx1/dispatched"
        [ "$(awk '{ s += $2 } END { print s }' "$dbg/hctx0/dispatched")" -gt 0 ]
        [ "$(awk '{ s += $2 } END { print s }' "$dbg/hctx1/dispatched")" -gt 0 ]
    fi
    qublk del -n "$(devnum "$dev")"
    [ ! -e "$dev" ]
    qemu-img check "$img"
    qemu-img compare -f raw -F qcow2 "$W/model.raw" "$img"
    [ "$kind" != backing ] || sha256sum -c "$W/base.sum"
    rm -f "$W"/*
}

need qublk qemu-img sha256sum
[ -x "$RACE" ] && [ -d "$FILES" ] \
    || fail "$RACE or $FILES missing: run this through tests/test-vm-ublk.sh"
# Preallocated images: metadata or falloc, alternating over the cluster
# sizes (test-concurrent-nbd.sh runs both with every size).
i=0
for kind in empty prealloc compressed backing; do
    for cs in 512 4k 64k 2M; do
        i=$((i + 1))
        k=$kind
        if [ "$kind" = prealloc ]; then
            case $cs in 512|64k) k=metadata ;; *) k=falloc ;; esac
        fi
        vmtest "ublk-race-$k-c$cs" race_case "$k" "$cs" "$i"
    done
done
