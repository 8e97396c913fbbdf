#!/bin/bash
# SPDX-License-Identifier: MIT
# Randomized differential test of the NBD server against QEMU.
# For each image configuration: create a qcow2 image with qemu-img, serve it
# with `qublk nbd`, run random writes / write-zeroes / discards / flushes /
# reads, some in concurrent batches on disjoint ranges that share clusters
# (tests/gen-ops.py), through qemu-io over NBD, and the equivalent script
# on a raw reference file.  After each segment the export must read back equal
# to the reference; after the server stops (exit 0) qemu-img compare must
# find the image identical to the reference and qemu-img check clean.
# Every configuration runs with --cache writeback and --cache none.
#
# Replay a failure: QUBLK_SEED=N tests/test-diff-nbd.sh [CONFIG-PATTERN]
# Against QEMU itself: QUBLK_TEST_SERVER=qemu-nbd tests/test-diff-nbd.sh
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
OPS=${QUBLK_DIFF_OPS:-250}
PATTERN=${1:-}
echo "seed $SEED (replay: QUBLK_SEED=$SEED $0 ${PATTERN})"

# name  cluster_size  compat  refcount_bits  size  extra-create-opts  gen-args
CONFIGS=(
    "c512-v3-r16     512  1.1  16  8M   -                    -"
    "c512-v2         512  0.10 16  8M   -                    -"
    "c4k-v3-r1       4k   1.1  1   32M  -                    -"
    "c4k-v2          4k   0.10 16  32M  -                    -"
    "c64k-v3-r16     64k  1.1  16  64M  -                    -"
    "c64k-v3-r64     64k  1.1  64  64M  -                    -"
    "c64k-v2         64k  0.10 16  64M  -                    -"
    "c64k-v3-lazy    64k  1.1  16  64M  lazy_refcounts=on    -"
    "c2M-v3-r16      2M   1.1  16  64M  -                    -"
    "c2M-v2          2M   0.10 16  64M  -                    -"
    "c4k-v3-r64      4k   1.1  64  32M  -                    -"
    "grow-c512-r64   512  1.1  64  256M -                    --spread,--max-len=64k"
    "xl2-c32k        32k  1.1  16  32M  extended_l2=on       -"
    "xl2-c64k-r1     64k  1.1  1   64M  extended_l2=on       -"
    "xl2-c2M         2M   1.1  16  64M  extended_l2=on       -"
)

# be32 at byte offset $2 of file $1
be32() {
    od -An -tu1 -j "$2" -N 4 "$1" | awk '{print (($1 * 256 + $2) * 256 + $3) * 256 + $4}'
}

run_config() {
    local idx=$1 name=$2 cs=$3 compat=$4 rb=$5 size=$6 extra=$7 genargs=$8
    local cache=$9
    local seed=$((SEED + idx))
    local dir=$TMPD/$name-$cache
    mkdir -p "$dir"
    FAIL_CONTEXT="config $name cache=$cache seed $SEED (config seed $seed); replay: QUBLK_SEED=$SEED $0 '^$name\$'"
    local opts="cluster_size=$cs,compat=$compat,refcount_bits=$rb"
    [ "$extra" = - ] || opts+=",$extra"
    local -a gen=()
    [ "$genargs" = - ] || IFS=, read -r -a gen <<<"$genargs"
    local segments=2 ops=$OPS
    case $name in grow-*) segments=1; ops=$((OPS * 2)) ;; esac

    gen_ops --seed "$seed" --size "$size" --cluster-size "$cs" \
        --compat "$compat" --ops "$ops" --segments "$segments" "${gen[@]}" "$dir"

    local img=$dir/img.qcow2 ref=$dir/ref.raw
    mkimg -f qcow2 -o "$opts" "$img" "$size"
    mkimg -f raw "$ref" "$size"

    start_nbd_server "$img" --cache "$cache"
    local s
    for ((s = 0; s < segments; s++)); do
        qio "$NBD_URI" raw <"$dir/img.$s.io"
        qio "$ref" raw <"$dir/ref.$s.io"
        # The reads were chosen from the generator's model of the content:
        # it must agree with what qemu-io made of the reference.
        qio "$ref" raw <"$dir/model.$s.io"
        nbd_read_all "$dir/readback.raw"
        cmp "$dir/readback.raw" "$ref" >&2 \
            || fail "segment $s: export reads back different from the reference"
        rm -f "$dir/readback.raw"
    done
    stop_nbd_server
    qcompare "$img" "$ref"
    qcheck "$img"

    if [[ $name == grow-* ]]; then
        # The point of this configuration: the refcount table must have
        # outgrown its first cluster (header field refcount_table_clusters).
        local rtc
        rtc=$(be32 "$img" 56)
        [ "$rtc" -gt 1 ] || fail "refcount table did not grow (refcount_table_clusters=$rtc); test is too small"
    fi
    # Reopen read-only after the clean close: the export still matches.
    # (Once per configuration: with --cache writeback.)
    if [ "$cache" = writeback ]; then
        start_nbd_server "$img" --read-only
        nbd_read_all "$dir/readback.raw"
        stop_nbd_server
        cmp "$dir/readback.raw" "$ref" >&2 || fail "read-only reopen reads back different data"
    fi
    rm -rf "$dir"
    FAIL_CONTEXT=
}

n=0
idx=0
for c in "${CONFIGS[@]}"; do
    # shellcheck disable=SC2086 # split the table row into fields
    set -- $c
    idx=$((idx + 1))
    if [ -n "$PATTERN" ] && ! [[ $1 =~ $PATTERN ]]; then
        continue
    fi
    for cache in writeback none; do
        t0=$SECONDS
        run_config "$idx" "$@" "$cache"
        echo "ok $1 cache=$cache ($((SECONDS - t0)) s)"
        n=$((n + 1))
    done
done
[ "$n" -gt 0 ] || fail "no configuration matches '$PATTERN'"
echo "$n configurations passed"
