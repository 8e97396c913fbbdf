#!/bin/bash
# SPDX-License-Identifier: MIT
# Refcount-table growth after frees, through `qublk nbd` (issue 6, item 2).
#
# The refcount table must grow when the image file crosses what its
# refcount blocks can cover.  The allocation that crosses may be a run of
# several clusters while free space below it is fragmented (single
# clusters freed by write-zeroes with unmap): the new table and blocks must
# land past that run, never inside it.  For each geometry the file is
# brought just below the table's coverage (by writes, or cheaply by a
# metadata-preallocated image, whose data clusters are holes in the
# file), 300 scattered single clusters are freed, and multi-cluster
# writes then push the file across the coverage.  QEMU is the oracle:
# `qemu-img check` clean (no leaks, no corruption), every written range
# reads back its pattern and every freed cluster zeros (qemu-io read -P on
# the image file), and with 512 B clusters `qemu-img compare` against a
# raw reference given the same operations.  The refcount table must have
# moved (the header's refcount_table_offset), or the test is too small.
#
#   c512-r16   512 B clusters, refcount_bits=16: coverage 8 MiB
#   c4k-r16    4 KiB clusters, refcount_bits=16: coverage 4 GiB
#   c64k-r64   64 KiB clusters, refcount_bits=64: coverage 4 TiB
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
PATTERN=${1:-}
echo "seed $SEED (replay: QUBLK_SEED=$SEED $0 ${PATTERN})"

# be64 at byte offset $2 of file $1
be64() {
    od -An -tu1 -j "$2" -N 8 "$1" |
        awk '{ v = 0; for (i = 1; i <= 8; i++) v = v * 256 + $i; printf "%.0f\n", v }'
}

# gen.py MODE ...: the operation scripts (see the heredoc).
GEN=$TMPD/gen.py
cat >"$GEN" <<'EOF'
import random, sys
# argv: seed cs phase1_start phase1_len chunk1 phase2_start phase2_len chunk2 nfree outdir
seed, cs, p1s, p1l, c1, p2s, p2l, c2, nfree = map(int, sys.argv[1:10])
out = sys.argv[10]
rng = random.Random(seed)
img, ref, verify = [], [], []
pat = 0
def nextpat():
    global pat
    pat = pat % 254 + 1
    return pat
ranges = []          # (start, end, pattern) of final contents, disjoint
# Phase 1: fill with chunk1-sized writes (may be empty: preallocated).
for off in range(p1s, p1s + p1l, c1) if c1 else []:
    p = nextpat()
    img.append("write -P %d %d %d" % (p, off, c1))
    ranges.append([off, off + c1, p])
img.append("flush")
# Free scattered single clusters inside phase 1 (fragmented free space).
nclusters = p1l // cs
freed = sorted(rng.sample(range(nclusters), nfree))
for c in freed:
    off = p1s + c * cs
    img.append("write -z -u %d %d" % (off, cs))
img.append("flush")
# Phase 2: multi-cluster writes past everything: the file crosses the
# refcount table's coverage somewhere in here.
for off in range(p2s, p2s + p2l, c2):
    p = nextpat()
    img.append("write -P %d %d %d" % (p, off, c2))
    ranges.append([off, off + c2, p])
img.append("flush")
# Expected contents: pattern ranges with the freed clusters cut out.
cuts = set(p1s + c * cs for c in freed)
for s, e, p in ranges:
    a = s
    while a < e:
        b = a
        while b < e and b not in cuts:
            b += cs
        if b > a:
            verify.append("read -P %d %d %d" % (p, a, b - a))
        if b < e:
            verify.append("read -P 0 %d %d" % (b, cs))
            b += cs
        a = b
for c in freed:
    if not any(s <= p1s + c * cs < e for s, e, _ in ranges):
        verify.append("read -P 0 %d %d" % (p1s + c * cs, cs))
open(out + "/img.io", "w").write("\n".join(img) + "\n")
open(out + "/verify.io", "w").write("\n".join(verify) + "\n")
EOF

# run_case NAME CS RBITS PREALLOC_CLUSTERS VSIZE P1S P1L C1 P2S P2L C2
run_case() {
    local name=$1 cs=$2 rbits=$3 pre=$4 vsize=$5
    local p1s=$6 p1l=$7 c1=$8 p2s=$9 p2l=${10} c2=${11}
    local dir=$TMPD/$name img rt0 rt1 t0=$SECONDS
    mkdir -p "$dir"
    img=$dir/img.qcow2
    FAIL_CONTEXT="case $name seed $SEED; replay: QUBLK_SEED=$SEED $0 '^$name\$'"
    if [ "$pre" -gt 0 ]; then
        mkimg -f qcow2 -o "cluster_size=$cs,refcount_bits=$rbits,preallocation=metadata" \
            "$img" "$((pre * cs))"
        qemu-img resize -q "$img" "$vsize" || fail "qemu-img resize"
    else
        mkimg -f qcow2 -o "cluster_size=$cs,refcount_bits=$rbits" "$img" "$vsize"
    fi
    "$PYTHON" "$GEN" "$SEED" "$cs" "$p1s" "$p1l" "$c1" "$p2s" "$p2l" "$c2" 300 "$dir" \
        || fail "generator failed"
    rt0=$(be64 "$img" 48)
    start_nbd_server "$img"
    qio "$NBD_URI" raw <"$dir/img.io"
    stop_nbd_server
    rt1=$(be64 "$img" 48)
    [ "$rt1" != "$rt0" ] ||
        fail "the refcount table did not move (offset $rt0): the file never crossed its coverage"
    qcheck "$img"
    qio "$img" qcow2 <"$dir/verify.io"
    if [ "$name" = c512-r16 ]; then
        # Small enough for a byte-exact comparison with a raw reference.
        mkimg -f raw "$dir/ref.raw" "$vsize"
        grep -v '^flush$' "$dir/img.io" | sed 's/^write -z -u /write -z /' |
            qio "$dir/ref.raw" raw
        qcompare "$img" "$dir/ref.raw"
    fi
    echo "ok $name (refcount table $rt0 -> $rt1, $((SECONDS - t0)) s)"
    rm -rf "$dir"
    FAIL_CONTEXT=
}

# Guest clusters to preallocate so that the file ends ~GAP bytes below the
# coverage: every guest cluster costs cs + 8 (L2 entry) + rbits/8 bytes.
prealloc_clusters() {
    local cs=$1 rbits=$2 coverage=$3 gap=$4
    "$PYTHON" -c "
cs, rb, cov, gap = $cs, $rbits, $coverage, $gap
print((cov - gap) // (cs + 8 + rb // 8))"
}

M=$((1 << 20))
n=0
if [ -z "$PATTERN" ] || [[ c512-r16 =~ $PATTERN ]]; then
    # 16 MiB image; coverage 64 entries * 256 clusters * 512 B = 8 MiB.
    run_case c512-r16 512 16 0 $((16 * M)) 0 $((7 * M)) $((32 << 10)) \
        $((7 * M)) $((2 * M)) $((32 << 10))
    n=$((n + 1))
fi
if [ -z "$PATTERN" ] || [[ c4k-r16 =~ $PATTERN ]]; then
    # Coverage 512 entries * 2048 clusters * 4 KiB = 4 GiB.
    cov=$((4096 * M))
    pre=$(prealloc_clusters 4096 16 "$cov" $((12 * M)))
    run_case c4k-r16 4096 16 "$pre" $((pre * 4096 + 256 * M)) \
        0 $((pre * 4096)) 0 $((pre * 4096)) $((48 * M)) $((32 << 10))
    n=$((n + 1))
fi
if [ -z "$PATTERN" ] || [[ c64k-r64 =~ $PATTERN ]]; then
    # Coverage 8192 entries * 8192 clusters * 64 KiB = 4 TiB.
    cov=$((4 * 1024 * 1024 * M))
    pre=$(prealloc_clusters 65536 64 "$cov" $((12 * M)))
    run_case c64k-r64 65536 64 "$pre" $((pre * 65536 + 1024 * M)) \
        0 $((pre * 65536)) 0 $((pre * 65536)) $((48 * M)) $((128 << 10))
    n=$((n + 1))
fi
[ "$n" -gt 0 ] || fail "no case matches '$PATTERN'"
echo "$n cases passed"
