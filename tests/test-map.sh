#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk map against qemu-img map, on images QEMU wrote:
#   1. --output=json is byte for byte qemu-img map --output=json (QEMU
#      7.2's format), host offsets included, on qcow2 images with holes,
#      data written out of order (host offsets that jump), zero clusters
#      (with a host cluster kept: offset given, and without), discards,
#      zlib/zstd compressed clusters (no offset), at 512 B, 4 KiB, 64 KiB
#      and 2 MiB clusters, v2 and v3, preallocation=falloc|metadata; extended L2
#      (subclusters) over a backing file, and preallocated (offsets of
#      unallocated subclusters too); external data files (offsets in
#      the data file; data_file_raw too); a qcow2 -> qcow2 -> short raw
#      chain (zeros past the end of the short file: "present": false);
#      raw images with holes.  With QEMU 10 set up, its output too, less
#      the "compressed" field it adds (QEMU 8.2+).
#   2. --start-offset/--max-length; the human table byte for byte, and
#      refused as qemu-img refuses it (exit 1, same message, same rows
#      before) where there are compressed clusters.
#   3. Locks (a writer makes map fail unless -U), usage errors (exit 2),
#      missing and malformed files (exit 1), no sanitizer reports.
# Images that reference clearly more clusters than their file holds
# (metadata preallocation; sparse 2 MiB clusters) have their data clusters
# over holes of the file reported as "zero": true too, as QEMU does.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
QUBLK=$(realpath "$QUBLK")   # one check runs in another directory
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=99"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=98:halt_on_error=1"
VERSIONS=$(qemu_versions)

# check_json IMAGE [map options]: the same JSON as every QEMU's.
check_json() {
    local img=$1 v; shift
    "$QUBLK" map --output=json "$@" "$img" >"$TMPD/u.json" || fail "qublk map $* $img"
    "$PYTHON" -c 'import json,sys; json.load(open(sys.argv[1]))' "$TMPD/u.json" \
        || fail "qublk map $* $img: not JSON"
    for v in $VERSIONS; do
        if [ "$v" = 7 ]; then
            qemu-img map --output=json "$@" "$img" >"$TMPD/q.json" || fail "qemu-img map $img"
        else
            qemu10 qemu-img map --output=json "$@" "$img" |
                sed 's/, "compressed": \(true\|false\)//' >"$TMPD/q.json" \
                || fail "QEMU $v: qemu-img map $img"
        fi
        diff -u "$TMPD/q.json" "$TMPD/u.json" >&2 \
            || fail "qublk map --output=json $* $img differs from QEMU $v's qemu-img map"
    done
    echo "  json ok: $(basename "$img") $* ($(wc -l <"$TMPD/u.json") entries," \
        "$(grep -c '"offset"' "$TMPD/u.json") with offsets)"
}

# check_human IMAGE: the table, or the refusal, as qemu-img's.
check_human() {
    local img=$1 qrc=0 urc=0
    qemu-img map "$img" >"$TMPD/q.txt" 2>"$TMPD/q.err" || qrc=$?
    "$QUBLK" map "$img" >"$TMPD/u.txt" 2>"$TMPD/u.err" || urc=$?
    [ "$qrc" = "$urc" ] || fail "qublk map $img (human): exit $urc, qemu-img $qrc"
    diff -u "$TMPD/q.txt" "$TMPD/u.txt" >&2 || fail "qublk map $img (human) differs"
    if [ "$qrc" != 0 ]; then
        grep -q 'compressed clusters' "$TMPD/q.err" || fail "qemu-img map: $(cat "$TMPD/q.err")"
        grep -q 'compressed clusters' "$TMPD/u.err" || fail "qublk map $img: $(cat "$TMPD/u.err")"
    fi
    echo "  human ok: $(basename "$img") (exit $urc, $(($(wc -l <"$TMPD/u.txt") - 1)) rows)"
}

# ---- 1. qcow2 images, one layer ----
for cfg in "512 1.1 zlib" "64k 1.1 zstd" "2M 1.1 zlib" "64k 0.10 zlib"; do
    read -r cs compat ctype <<<"$cfg"
    img=$TMPD/a-$cs-$compat.qcow2
    opts="cluster_size=$cs,compat=$compat"
    [ "$compat" = 0.10 ] || opts+=",compression_type=$ctype"
    mkimg -f qcow2 -o "$opts" "$img" 64M
    qemu-io -f qcow2 "$img" >/dev/null <<'EOF' || fail "qemu-io on $img"
write -P 1 0 4M
write -z 6M 2M
write -P 2 10M 4M
write -z 11M 1M
discard 12M 1M
write -c -P 3 16M 2M
write -c -P 0 20M 2M
write -P 0 24M 2M
write -P 5 62M 2M
write -z -u 40M 4M
write -P 6 50M 1M
write -P 6 48M 1M
write -P 6 49M 1M
write -z 48M 1M
EOF
    check_json "$img"
done
img=$TMPD/a-64k-1.1.qcow2
check_json "$img" --start-offset 5M --max-length 9M
check_json "$img" --start-offset 63M
check_json "$img" --start-offset 48M --max-length 100k
check_human "$img"
# Without compressed clusters the table is qemu-img's.
img=$TMPD/plain.qcow2
mkimg -f qcow2 -o cluster_size=4k "$img" 16M
qemu-io -f qcow2 "$img" -c 'write -P 1 8M 1M' -c 'write -P 2 0 64k' -c 'write -P 3 1M 8k' \
    -c 'write -z 8M 4k' -c 'write -P 4 12k 4k' >/dev/null || fail "qemu-io on $img"
check_json "$img"
check_human "$img"
# Preallocated: with metadata only, data clusters over holes of the file
# read as zeros ("zero": true, "data": true).
for p in falloc metadata; do
    img=$TMPD/$p.qcow2
    mkimg -f qcow2 -o preallocation=$p "$img" 16M
    qemu-io -f qcow2 "$img" -c 'write -P 1 1M 1M' -c 'write -P 2 1100k 4k' -c 'write -z 4M 64k' \
        -c 'discard 8M 1M' >/dev/null || fail "qemu-io on $img"
    check_json "$img"
    check_human "$img"
done

# ---- external data files ----
# QEMU opens a relative data file name relative to its working directory
# (qublk: relative to the image's): work where both agree.
for raw in off on; do
    (
        cd "$TMPD"
        img=df-$raw.qcow2
        mkimg -f qcow2 -o "data_file=df-$raw.data,data_file_raw=$raw" "$img" 16M
        qemu-io -f qcow2 "$img" -c 'write -P 1 2M 1M' -c 'write -P 2 0 64k' -c 'write -z 2M 64k' \
            -c 'write -z -u 8M 1M' -c 'discard 2304k 64k' >/dev/null || fail "qemu-io on $img"
        check_json "$img"
        check_human "$img"
    )
done

# ---- extended L2 over a backing file ----
XB=$TMPD/xl2-base.qcow2 XT=$TMPD/xl2.qcow2
mkimg -f qcow2 "$XB" 16M
qemu-io -f qcow2 -c 'write -P 7 0 8M' "$XB" >/dev/null || fail "qemu-io on $XB"
mkimg -f qcow2 -o cluster_size=64k,extended_l2=on -b "$(basename "$XB")" -F qcow2 "$XT"
qemu-io -f qcow2 "$XT" >/dev/null <<'EOF' || fail "qemu-io on $XT"
write -P 8 4k 8k
write -z 64k 6k
write -z 4M 64k
write -P 9 9M 2k
discard 9M 2k
EOF
check_json "$XT"
check_human "$XT"
# Preallocated with extended L2: clusters whose subclusters are all
# unallocated still have their host cluster (QEMU gives its offset at the
# bottom of a chain), alone and under an overlay.
XP=$TMPD/xl2-pre.qcow2
mkimg -f qcow2 -o extended_l2=on,preallocation=metadata "$XP" 4M
qemu-io -f qcow2 -c 'write -P 1 8k 4k' -c 'write -z 128k 8k' "$XP" >/dev/null || fail "qemu-io on $XP"
mkimg -f qcow2 -b xl2-pre.qcow2 -F qcow2 "$TMPD/xl2-pre-top.qcow2"
check_json "$XP"
check_json "$TMPD/xl2-pre-top.qcow2"

# ---- 2. a qcow2 -> qcow2 -> short raw chain, and raw images ----
B=$TMPD/base.raw MID=$TMPD/mid.qcow2 TOP=$TMPD/top.qcow2
truncate -s 24M "$B"
qemu-io -f raw "$B" -c 'write -P 7 0 2M' -c 'write -P 8 12M 64k' -c 'write -P 0 20M 1M' >/dev/null \
    || fail "qemu-io on $B"
mkimg -f qcow2 -b base.raw -F raw "$MID" 48M
qemu-io -f qcow2 "$MID" -c 'write -P 9 1M 2M' -c 'write -z 12M 64k' -c 'write -P 10 30M 1M' \
    -c 'write -c -P 11 32M 64k' >/dev/null || fail "qemu-io on $MID"
mkimg -f qcow2 -b mid.qcow2 -F qcow2 "$TOP" 64M
qemu-io -f qcow2 "$TOP" -c 'write -P 11 1536k 64k' -c 'write -z 30M 512k' -c 'write -P 12 50M 1M' \
    >/dev/null || fail "qemu-io on $TOP"
check_json "$TOP"
check_json "$MID"
check_json "$B"
check_human "$TOP"
V2=$TMPD/v2.qcow2
mkimg -f qcow2 -o compat=0.10 -b mid.qcow2 -F qcow2 "$V2" 40M
qemu-io -f qcow2 "$V2" -c 'write -P 13 5M 1M' -c 'write -z 1M 64k' >/dev/null || fail "qemu-io on $V2"
check_json "$V2"
# A relative backing name from another directory; a raw file whose size
# is not a multiple of 4 KiB (QEMU rounds a raw size up to 512 bytes: a
# size that is not a multiple of 512 maps 0..511 bytes more in qemu-img).
(cd "$TMPD" && check_json top.qcow2)
ODD=$TMPD/odd.raw
head -c 1000448 /dev/urandom >"$ODD"
check_json "$ODD"
check_human "$B"
check_human "$V2"
# An empty image: one empty entry, as qemu-img prints.
mkimg -f qcow2 "$TMPD/empty.qcow2" 0
check_json "$TMPD/empty.qcow2"

# ---- 3. locks, usage, bad input ----
# qemu-io holds the image until killed (a timed sleep could end first on
# a loaded machine).
qemu-io -f qcow2 "$TOP" -c 'sleep 600000' >/dev/null 2>&1 &
sleep_pid=$!
# Ready once it holds the write permission's lock byte (101).
wait_lock_byte "$sleep_pid" "$TOP" 101 || fail "qemu-io never took $TOP"
rc=0 rc_u=0
"$QUBLK" map "$TOP" >/dev/null 2>"$TMPD/err" || rc=$?
"$QUBLK" map -U --output=json "$TOP" >/dev/null || rc_u=$?
kill "$sleep_pid"
wait "$sleep_pid" 2>/dev/null || true
[ "$rc" = 1 ] || fail "map of an image qemu-io writes: exit $rc, want 1"
grep -q 'Failed to get' "$TMPD/err" || fail "map of a locked image: $(cat "$TMPD/err")"
[ "$rc_u" = 0 ] || fail "map -U of an image qemu-io writes: exit $rc_u"

expect_rc() {   # RC ARGS...
    local want=$1 rc=0; shift
    "$QUBLK" map "$@" >"$TMPD/out" 2>&1 || rc=$?
    [ "$rc" = "$want" ] || { cat "$TMPD/out" >&2; fail "qublk map $*: exit $rc, want $want"; }
}
expect_rc 2 --output=xml "$TOP"
expect_rc 2 -f vmdk "$TOP"
expect_rc 2
expect_rc 2 "$TOP" "$MID"
expect_rc 2 --bogus "$TOP"
expect_rc 0 --help
expect_rc 1 "$TMPD/does-not-exist"
BAD=$TMPD/bad.qcow2
cp "$MID" "$BAD"
printf '\xff\xff\xff\xff' | dd of="$BAD" bs=1 seek=20 conv=notrunc 2>/dev/null  # cluster_bits
expect_rc 1 "$BAD"
cp "$TOP" "$TMPD/dangling.qcow2"
rm "$MID"
expect_rc 1 "$TMPD/dangling.qcow2"
echo "PASS"
