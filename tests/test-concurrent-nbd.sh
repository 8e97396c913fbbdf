#!/bin/bash
# SPDX-License-Identifier: MIT
# Concurrent differential test of the NBD server against QEMU.
# Requests on disjoint byte ranges commute, so a batch of them issued at
# once has one defined result whatever order the server runs them in.
# tests/gen-ops.py --batch-ratio 1 generates only such batches: writes,
# write-zeroes with and without unmap, discards, flushes and reads of known
# content, on disjoint ranges that share clusters, issued by qemu-io
# (aio_*, then aio_flush, then reads of the whole window) against
# `qublk nbd`; the raw reference gets the same operations one at a time.
# After each segment the export must read back equal to the reference;
# after the server exits 0, qemu-img compare and qemu-img check must pass.
# Image kinds: empty, preallocated (metadata, falloc), compressed (qemu-img
# convert -c of patterned data) and over a qcow2 backing file with data,
# each with 512 B, 4 KiB, 64 KiB and 2 MiB clusters (v3), plus v2 over a
# backing file (where QEMU ignores discards and writes explicit zeros);
# and full (every page written) with inline I/O on, so that the server
# reads and writes the image through its mapping (io_map.h) while
# discards punch holes in it (whole-image reads first put the mapping in
# use whatever the seed's ops; its count of such copies is checked).
#
# Replay a failure: QUBLK_SEED=N tests/test-concurrent-nbd.sh [CASE-PATTERN]
# (QUBLK_KEEP=1 keeps the scripts: the failing offset is in img.N.io).
# Against QEMU itself: QUBLK_TEST_SERVER=qemu-nbd tests/test-concurrent-nbd.sh
# runs every case, but without write-zeroes that share a cluster with a
# concurrent write, which QEMU 7.2 gets wrong (lib.sh gen_ops).
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
# A third of the batches under the sanitizers (every case still runs).
case $QUBLK in *asan*) BATCHES=${QUBLK_CONC_BATCHES:-40} ;; *) BATCHES=${QUBLK_CONC_BATCHES:-120} ;; esac
PATTERN=${1:-}
echo "seed $SEED (replay: QUBLK_SEED=$SEED $0 ${PATTERN})"

# name  kind  cluster_size  compat  size  cache
CASES=(
    "empty-c512      empty       512  1.1   2M   writeback"
    "empty-c4k       empty       4k   1.1   4M   none"
    "empty-c64k      empty       64k  1.1   16M  writeback"
    "empty-c2M       empty       2M   1.1   32M  none"
    "metadata-c512   metadata    512  1.1   2M   none"
    "metadata-c4k    metadata    4k   1.1   4M   writeback"
    "metadata-c64k   metadata    64k  1.1   16M  none"
    "metadata-c2M    metadata    2M   1.1   32M  writeback"
    "falloc-c512     falloc      512  1.1   2M   writeback"
    "falloc-c4k      falloc      4k   1.1   4M   none"
    "falloc-c64k     falloc      64k  1.1   16M  writeback"
    "falloc-c2M      falloc      2M   1.1   32M  none"
    "compressed-c512 compressed  512  1.1   2M   none"
    "compressed-c4k  compressed  4k   1.1   4M   writeback"
    "compressed-c64k compressed  64k  1.1   16M  none"
    "compressed-c2M  compressed  2M   1.1   32M  writeback"
    "backing-c512    backing     512  1.1   2M   writeback"
    "backing-c4k     backing     4k   1.1   4M   none"
    "backing-c64k    backing     64k  1.1   16M  writeback"
    "backing-c2M     backing     2M   1.1   32M  none"
    "backing-c64k-v2 backing     64k  0.10  16M  writeback"
    "full-c64k       full        64k  1.1   16M  writeback"
    "full-c2M        full        2M   1.1   32M  writeback"
)

# make_images KIND OPTS SIZE DIR: DIR/img.qcow2 and its starting content in
# DIR/ref.raw (DIR/init.io from gen-ops.py --init for the kinds with data).
make_images() {
    local kind=$1 opts=$2 size=$3 dir=$4
    local img=$dir/img.qcow2 ref=$dir/ref.raw
    mkimg -f raw "$ref" "$size"
    case $kind in
        empty) mkimg -f qcow2 -o "$opts" "$img" "$size" ;;
        metadata|falloc|full)
            mkimg -f qcow2 -o "$opts,preallocation=$kind" "$img" "$size" ;;
        compressed)
            qio "$ref" raw <"$dir/init.io"
            qemu-img convert -c -f raw -O qcow2 -o "$opts" "$ref" "$img" \
                || fail "qemu-img convert -c failed"
            # Not vacuous: the data really is in compressed clusters.
            qemu-img check --output=json "$img" | grep -q '"compressed-clusters": [1-9]' \
                || fail "qemu-img convert -c made no compressed clusters"
            ;;
        backing)
            mkimg -f qcow2 "$dir/base.qcow2" "$size"
            qio "$dir/base.qcow2" qcow2 <"$dir/init.io"
            qio "$ref" raw <"$dir/init.io"
            cp "$dir/base.qcow2" "$dir/base.orig"
            mkimg -f qcow2 -o "$opts" -b "$dir/base.qcow2" -F qcow2 "$img"
            ;;
        *) fail "unknown image kind $kind" ;;
    esac
}

run_case() {
    local idx=$1 name=$2 kind=$3 cs=$4 compat=$5 size=$6 cache=$7
    local seed=$((SEED + idx))
    local dir=$TMPD/$name
    mkdir -p "$dir"
    FAIL_CONTEXT="case $name seed $SEED (case seed $seed); replay: QUBLK_SEED=$SEED $0 '^$name\$'"
    local -a gen=()
    case $kind in
        compressed) gen=(--init) ;;
        backing) gen=(--init --backing) ;;
    esac
    gen_ops --seed "$seed" --size "$size" --cluster-size "$cs" \
        --compat "$compat" --ops "$BATCHES" --batch-ratio 1 --segments 2 \
        "${gen[@]}" "$dir"

    local img=$dir/img.qcow2 ref=$dir/ref.raw s
    make_images "$kind" "cluster_size=$cs,compat=$compat" "$size" "$dir"
    if [ "$kind" = full ]; then
        # The map is for files in memory with inline I/O (io.c), which
        # the host tests turn off (tests/run.sh); its debug line counts.
        QUBLK_IO_INLINE=1 QUBLK_DEBUG=1 start_nbd_server "$img" --cache "$cache"
    else
        start_nbd_server "$img" --cache "$cache"
    fi
    if [ "$kind" = full ]; then
        # Whole chunks in use before the random ops, whatever they are: a
        # seed whose discards leave no 2 MiB host chunk whole would
        # otherwise give the mapping nothing to serve.  Large reads count
        # toward mapping a chunk (io_map.c: asked, warm, then mapped), so
        # the later passes and the ops go through the mapping while the
        # discards punch holes under it.
        for s in 1 2 3 4; do
            nbd_read_all "$dir/readback.raw"
            cmp "$dir/readback.raw" "$ref" >&2 \
                || fail "warm-up read $s: export reads back different from the reference"
        done
        rm -f "$dir/readback.raw"
    fi
    for s in 0 1; do
        qio "$NBD_URI" raw <"$dir/img.$s.io"
        qio "$ref" raw <"$dir/ref.$s.io"
        # The generator chose the reads from its own model of the content:
        # the model must agree with what qemu-io made of the reference.
        qio "$ref" raw <"$dir/model.$s.io"
        nbd_read_all "$dir/readback.raw"
        cmp "$dir/readback.raw" "$ref" >&2 \
            || fail "segment $s: export reads back different from the reference"
        rm -f "$dir/readback.raw"
    done
    stop_nbd_server
    if [ "$kind" = full ] && [ "$QUBLK_TEST_SERVER" != qemu-nbd ]; then
        grep -E 'through its mapping' "$NBD_LOG" || true
        grep -Eq 'img\.qcow2: [1-9][0-9]* reads and writes through its mapping' "$NBD_LOG" \
            || fail "no I/O went through the image's mapping"
    fi
    qcompare "$img" "$ref"
    qcheck "$img"
    if [ "$kind" = backing ]; then
        cmp "$dir/base.qcow2" "$dir/base.orig" >&2 || fail "the backing file changed"
    fi
    rm -rf "$dir"
    FAIL_CONTEXT=
}

run_table run_case "$PATTERN" "${CASES[@]}"
