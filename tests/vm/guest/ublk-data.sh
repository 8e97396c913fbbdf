# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-data.sh: data integrity of qublk's ublk devices on the
# real ublk_drv (issue 3 acceptance), run by tests/vm/run.sh:
#   - fio --verify=crc32c random writes then verify, 512 B..1 MiB blocks,
#     iodepth 64, over raw (1 and 2 queues), qcow2, qcow2 over a qcow2
#     backing file, then the whole device read with dd before `qublk del`;
#     after del: qemu-img check clean and qemu-img convert -O raw identical
#     to what the device returned;
#   - the same at iodepth 1 with small blocks on a zero-copy device (7.3),
#     where lone requests go by user copy (the daemon's count is checked);
#   - the same over an image whose pages are all written, read and
#     written through its mapping (the daemon's count is checked);
#   - --read-only refuses writes and leaves the image byte-identical;
#   - blkdiscard and blkdiscard -z on ranges give what qemu-io gives for the
#     same operations on a copy (qemu-img compare).
# Scratch images live in /tmp (tmpfs inside the VM).  DATA_ONLY: the
# names of the cases to run (default all; ublk-clean always runs).

IMG_SIZE=${UBLK_TEST_IMG_SIZE:-128M}
FIO_SIZE=${UBLK_TEST_FIO_SIZE:-40M}
W=/tmp/ublk-data
mkdir -p "$W"

devnum() { echo "${1#/dev/ublkb}"; }

# fio_verify DEV JOBS: random writes of 512 B..1 MiB at iodepth 64 (or
# $FIO_BSSPLIT at $FIO_DEPTH), then a verify pass; JOBS > 1 writes disjoint
# regions from several CPUs so that more than one hardware queue sees
# requests.
fio_verify() {
    local dev=$1 jobs=$2
    fio --allow_file_create=0 --name=verify --filename="$dev" --direct=1 --ioengine=libaio \
        --rw=randwrite --bssplit="${FIO_BSSPLIT:-512/10:4k/40:64k/20:256k/15:1m/15}" \
        --iodepth="${FIO_DEPTH:-64}" --size="$FIO_SIZE" --numjobs="$jobs" --offset_increment=48M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=1 \
        --randrepeat=0 --group_reporting --output-format=terse --terse-version=3 \
        >"$W/fio.out" 2>&1 || { cat "$W/fio.out"; return 1; }
    # terse v3: field 5 is the error count
    awk -F';' '{ if ($5 != 0) { print "fio errors: " $5; exit 1 } }' "$W/fio.out"
}

# check_image IMG FMT DEVDUMP: after del, QEMU agrees with the device.
check_image() {
    local img=$1 fmt=$2 dump=$3
    if [ "$fmt" = qcow2 ]; then
        qemu-img check "$img"
    fi
    qemu-img convert -f "$fmt" -O raw "$img" "$W/qemu.raw"
    cmp "$dump" "$W/qemu.raw"
    rm -f "$W/qemu.raw"
}

# fio_case FMT QUEUES [BACKING]; $ADD_OPTS: more options for qublk add,
# $PREALLOC: the image's preallocation.
fio_case() {
    local fmt=$1 queues=$2 backing=${3:-} img dev
    img=$W/img.$fmt
    rm -f "$img" "$W/base.qcow2"
    if [ -n "$backing" ]; then
        qemu-img create -q -f qcow2 "$W/base.qcow2" "$IMG_SIZE"
        qemu-io -f qcow2 -c 'write -P 0x5a 0 16M' -c 'write -P 0xa5 100M 8M' "$W/base.qcow2" >/dev/null
        qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$img"
    else
        qemu-img create -q -f "$fmt" ${PREALLOC:+-o preallocation=$PREALLOC} "$img" "$IMG_SIZE"
    fi
    # shellcheck disable=SC2086 # ADD_OPTS: words
    dev=$(qublk add -t "$fmt" -q "$queues" ${ADD_OPTS:-} "$img")
    [ -b "$dev" ]
    devnum "$dev" >"$W/last-id"
    fio_verify "$dev" "$queues"
    dd if="$dev" of="$W/dev.dump" bs=1M iflag=direct status=none
    qublk del -n "$(devnum "$dev")"
    [ ! -e "$dev" ]
    check_image "$img" "$fmt" "$W/dev.dump"
    rm -f "$img" "$W/base.qcow2" "$W/dev.dump"
}

t_fio_raw_q1() { fio_case raw 1; }
t_fio_raw_q2() { fio_case raw 2; }
t_fio_qcow2_q1() { fio_case qcow2 1; }
t_fio_qcow2_backing_q1() { fio_case qcow2 1 backing; }
t_fio_qcow2_q2() {
    # Multi-queue qcow2 waits for cross-thread metadata locking: skip while
    # qublk refuses it, run the full case once it accepts it.
    qemu-img create -q -f qcow2 "$W/q2probe.qcow2" 1M
    if ! qublk add -t qcow2 -q 2 "$W/q2probe.qcow2" >"$W/q2.out" 2>"$W/q2.err"; then
        cat "$W/q2.err"
        grep -q 'not yet' "$W/q2.err" && skip "--queues > 1 with qcow2 is not enabled yet"
        fail "qublk add -q 2 failed"
    fi
    qublk del -n "$(devnum "$(cat "$W/q2.out")")"
    rm -f "$W/q2probe.qcow2" "$W/q2.out" "$W/q2.err"
    fio_case qcow2 2
}
# Zero copy's fallback: a buffer table of 8 slots for 64 tags, so the
# driver cannot register the pages of most requests and hands them over
# with UBLK_IO_F_NEED_REG_BUF: they go through the tag's buffer by user
# copy, next to zero-copy ones, over a backing file (copy-on-write).
t_fio_zc_fallback() {
    ublk_has auto_buf_reg || skip "no zero copy on $VMTEST_KERNEL"
    (export QUBLK_TEST_ZC_SLOTS=8; fio_case qcow2 1 backing)
}
# Where the driver takes batches (7.3) they are the default, with zero
# copy: the two other ways a request can travel there, each checked as
# the default one is: one command per request (zero copy), and batches
# with copies (each element then carries the tag's buffer address).
t_fio_modes() {
    ublk_has batch_io || skip "no batch_io on $VMTEST_KERNEL"
    (export ADD_OPTS=--no-batch; fio_case qcow2 2)
    (export ADD_OPTS=--no-zero-copy; fio_case qcow2 2)
}
# Zero copy, one request at a time: a read or write of up to 16 KiB that
# is its queue's only work goes by user copy through the tag's buffer and
# inline to the image (in tmpfs), a larger one by zero copy; over a
# backing file (copy-on-write).  The daemon's exit line (QUBLK_DEBUG)
# counts the requests that went by copy.
t_fio_lone() {
    local id n
    ublk_has auto_buf_reg || skip "no zero copy on $VMTEST_KERNEL"
    (export QUBLK_DEBUG=1 FIO_DEPTH=1 FIO_BSSPLIT=512/20:4k/40:16k/20:64k/20 FIO_SIZE=16M
     fio_case qcow2 1 backing)
    id=$(cat "$W/last-id")
    grep 'exit after' "/run/qublk/ublk$id.log" || true
    n=$(sed -n 's/.*queue 0: exit after [0-9]* requests ([0-9]* errors, \([0-9]*\) by user copy).*/\1/p' \
        "/run/qublk/ublk$id.log")
    [ "${n:-0}" -gt 0 ] || fail "no request went by user copy at iodepth 1"
}
t_fio_null_q2() {
    local dev
    dev=$(qublk add -t null -q 2 --size 256M)
    fio --allow_file_create=0 --name=null --filename="$dev" --direct=1 --ioengine=libaio --rw=randrw \
        --bs=4k --iodepth=64 --size=64M --numjobs=2 --group_reporting >/dev/null
    qublk del -n "$(devnum "$dev")"
}

# A FLUSH must reach us: VOLATILE_CACHE is advertised.
t_params() {
    local dev q
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$W/p.qcow2" 64M
    dev=$(qublk add "$W/p.qcow2")
    q=/sys/block/${dev#/dev/}/queue
    [ "$(cat "$q"/logical_block_size)" = 512 ]
    [ "$(cat "$q"/physical_block_size)" = 4096 ]
    [ "$(cat "$q"/write_cache)" = "write back" ]
    [ "$(cat "$q"/fua)" = 1 ]
    [ "$(cat "$q"/minimum_io_size)" = 65536 ]
    [ "$(cat "$q"/discard_granularity)" = 65536 ]
    [ "$(cat "$q"/write_zeroes_max_bytes)" != 0 ]
    [ "$(cat "/sys/block/${dev#/dev/}/size")" = $((64 * 2048)) ]
    qublk list | grep -q "p.qcow2"
    qublk list --output json | grep -q '"target": "qcow2"'
    qublk del -n "$(devnum "$dev")"
    qemu-img check "$W/p.qcow2"
    rm -f "$W/p.qcow2"
}

t_read_only() {
    local fmt dev img
    for fmt in raw qcow2; do
        img=$W/ro.$fmt
        qemu-img create -q -f "$fmt" "$img" 64M
        qemu-io -f "$fmt" -c 'write -P 0x33 1M 3M' "$img" >/dev/null
        sha256sum "$img" >"$W/ro.sum"
        dev=$(qublk add --read-only -t "$fmt" "$img")
        [ "$(cat "/sys/block/${dev#/dev/}/ro")" = 1 ]
        if dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>"$W/dd.err"; then
            fail "a write to a read-only device succeeded"
        fi
        cat "$W/dd.err"
        grep -qiE 'read-only|not permitted' "$W/dd.err"
        if blkdiscard -o 0 -l 1M "$dev" 2>/dev/null; then
            fail "discard on a read-only device succeeded"
        fi
        # reads still work and see the data
        dd if="$dev" of="$W/ro.dump" bs=1M skip=1 count=3 iflag=direct status=none
        cmp "$W/ro.dump" <(head -c $((3 << 20)) /dev/zero | tr '\0' '\063')
        qublk del -n "$(devnum "$dev")"
        sha256sum -c "$W/ro.sum"
        rm -f "$img" "$W/ro.sum" "$W/ro.dump"
    done
}

# blkdiscard [-z] on ranges of the device vs the same operation by qemu-io
# on a copy of the image.
t_discard() {
    local fmt dev img ref
    for fmt in qcow2 raw; do
        img=$W/d.$fmt ref=$W/d-ref.$fmt
        qemu-img create -q -f "$fmt" "$img" 64M
        qemu-io -f "$fmt" -c 'write -P 0x11 0 32M' -c 'write -P 0x22 40M 8M' "$img" >/dev/null
        cp "$img" "$ref"
        dev=$(qublk add -t "$fmt" "$img")
        blkdiscard -o 1M -l 3M "$dev"
        blkdiscard -z -o 8M -l 4M "$dev"
        blkdiscard -z -o 44M -l 64k "$dev"
        blkdiscard -o 16M -l 16M "$dev"
        sync
        dd if="$dev" of="$W/d.dump" bs=1M iflag=direct status=none
        qublk del -n "$(devnum "$dev")"
        qemu-io -f "$fmt" -c 'discard 1M 3M' -c 'write -z 8M 4M' \
            -c 'write -z 44M 64k' -c 'discard 16M 16M' "$ref" >/dev/null
        # discarded ranges read as zeros on both sides (no backing file)
        qemu-img compare -f "$fmt" -F "$fmt" "$img" "$ref"
        check_image "$img" "$fmt" "$W/d.dump"
        if [ "$fmt" = qcow2 ]; then
            qemu-img map --output=json "$img" >"$W/map.a"
            qemu-img map --output=json "$ref" >"$W/map.b"
            diff "$W/map.a" "$W/map.b" || echo "(allocation maps differ; data is identical)"
        fi
        rm -f "$img" "$ref" "$W/d.dump" "$W/map.a" "$W/map.b"
    done
}

need qublk fio qemu-img qemu-io blkdiscard cmp sha256sum
# `qublk add PATH` looks for a relative backing file next to PATH as the
# user gave it (a symlink's directory, not its target's), as QEMU does:
# the device must read what qemu-img reads through the same path.
t_symlink_backing() {
    local a=$W/real b=$W/link dev
    mkdir -p "$a" "$b"
    qemu-img create -q -f qcow2 "$a/base.qcow2" 16M
    qemu-io -f qcow2 -c 'write -P 0x11 0 1M' "$a/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 "$b/base.qcow2" 16M
    qemu-io -f qcow2 -c 'write -P 0x22 0 1M' "$b/base.qcow2" >/dev/null
    (cd "$a" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2)
    ln -s "$a/top.qcow2" "$b/top.qcow2"
    qemu-img convert -f qcow2 -O raw "$b/top.qcow2" "$W/qemu.raw"
    dev=$(cd "$b" && qublk add top.qcow2)
    [ -b "$dev" ]
    dd if="$dev" of="$W/dev.dump" bs=1M iflag=direct status=none
    qublk del -n "$(devnum "$dev")"
    cmp "$W/dev.dump" "$W/qemu.raw"
    rm -rf "$a" "$b" "$W/qemu.raw" "$W/dev.dump"
}

# A file in memory through its mapping (io_map.h): an image whose pages
# are all written (preallocation=full) is read and written by memcpy
# from two queue threads; the daemon's debug log counts the copies made
# so when it closes the image.
t_fio_mapped() {
    local id
    (export QUBLK_DEBUG=1 PREALLOC=full; fio_case qcow2 2)
    id=$(cat "$W/last-id")
    grep 'through its mapping' "/run/qublk/ublk$id.log" || true
    grep -Eq 'img\.qcow2: [1-9][0-9]* reads and writes through its mapping' \
        "/run/qublk/ublk$id.log" || fail "no I/O went through the image's mapping"
    # User copy alone (QUBLK_USER_COPY=1, a driver without zero copy):
    # the larger requests' data goes by pread/pwrite of /dev/ublkcN
    # straight between the request's pages and the mapping.
    if ublk_has user_copy && ! ublk_has auto_buf_reg; then
        rm -f "/run/qublk/ublk$id.log"
        (export QUBLK_DEBUG=1 PREALLOC=full QUBLK_USER_COPY=1; fio_case qcow2 2)
        id=$(cat "$W/last-id")
        grep 'by user copy' "/run/qublk/ublk$id.log" || true
        grep -Eq 'queue 0: exit after .* [1-9][0-9]* by user copy' "/run/qublk/ublk$id.log" ||
            fail "QUBLK_USER_COPY=1: no request of queue 0 went by user copy"
        grep 'through its mapping' "/run/qublk/ublk$id.log" || true
        grep -Eq 'img\.qcow2: [1-9][0-9]* reads and writes through its mapping \([1-9][0-9]* copied by the kernel\)' \
            "/run/qublk/ublk$id.log" || fail "no user copy went through the image's mapping"
        # Over a backing file: holes the mapping leaves to system calls
        # (the larger requests bounce through their tag's buffer),
        # copy-on-write merging guest data by user copy.
        rm -f "/run/qublk/ublk$id.log"
        (export QUBLK_DEBUG=1 QUBLK_USER_COPY=1; fio_case qcow2 2 backing)
        id=$(cat "$W/last-id")
        grep 'bounce buffer' "/run/qublk/ublk$id.log" || true
        grep -Eq 'img\.qcow2: [1-9][0-9]* reads and writes of kernel buffers through a bounce buffer' \
            "/run/qublk/ublk$id.log" || fail "QUBLK_USER_COPY=1: no request bounced over holes"
    fi
}

data_case() { case " ${DATA_ONLY:-$1} " in *" $1 "*) vmtest "$@" ;; esac; }
data_case ublk-params t_params
data_case ublk-fio-raw-q1 t_fio_raw_q1
data_case ublk-fio-raw-q2 t_fio_raw_q2
data_case ublk-fio-null-q2 t_fio_null_q2
data_case ublk-fio-zc-fallback t_fio_zc_fallback
data_case ublk-fio-lone t_fio_lone
data_case ublk-fio-mapped t_fio_mapped
data_case ublk-fio-qcow2-q1 t_fio_qcow2_q1
data_case ublk-fio-qcow2-backing-q1 t_fio_qcow2_backing_q1
data_case ublk-fio-qcow2-q2 t_fio_qcow2_q2
data_case ublk-fio-modes t_fio_modes
data_case ublk-read-only t_read_only
data_case ublk-discard t_discard
data_case ublk-symlink-backing t_symlink_backing
# Nothing may be left behind.
t_clean() { qublk del --all; ! ls /dev/ublkb* >/dev/null 2>&1; }
vmtest ublk-clean t_clean
