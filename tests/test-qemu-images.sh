#!/bin/bash
# SPDX-License-Identifier: MIT
# Images written by QEMU, read and written through the NBD server, once
# with each QEMU version as the oracle (7.2, and 10 when tests/setup-qemu10.sh
# has unpacked it): that QEMU writes the images, converts them, replays the
# writes and checks the results.
#  1. Build images with qemu-img/qemu-io: zlib- and zstd-compressed, internal
#     snapshots, a qcow2 -> qcow2 -> raw backing chain with a short raw base,
#     zero clusters and discarded ranges (v3 and v2), 512 B and 2 MiB
#     clusters.
#  2. Read each through `qublk nbd --read-only` and compare with
#     `qemu-img convert -O raw` of the same image.
#  3. On two copies of the images that have shared or special clusters
#     (compressed, backing, snapshotted): the same partial writes through
#     `qublk nbd` on one copy and through qemu-io (QEMU's own driver) on the
#     other; the two must compare equal and both pass qemu-img check.
#     Snapshots and backing files must be left untouched.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
echo "seed $SEED (replay: QUBLK_SEED=$SEED $0)"
D=$TMPD
SIZE=8M
SRC=$TMPD/src.raw

# Source data: mixed patterns at unaligned boundaries (compressible),
# a few incompressible stretches, and holes that stay zero.
make_source() {
    local f=$1 size=$2
    mkimg -f raw "$f" "$size"
    qio "$f" raw <<EOF
write -P 0x11 0 300000
write -P 0x22 300000 1000001
write -P 0x33 1500000 77777
write -P 0x44 2097152 1048576
write -P 0x55 3300000 500000
write -P 0x66 5000000 1234567
write -P 0x77 7340032 65536
EOF
    dd if=/dev/urandom of="$f" bs=64k seek=20 count=3 conv=notrunc status=none
    dd if=/dev/urandom of="$f" bs=4k seek=1800 count=5 conv=notrunc status=none
}

# Writes in the style of a guest on top of existing data.
mutate() {
    local f=$1 fmt=$2
    qio "$f" "$fmt" <<EOF
write -P 0x88 70000 4096
write -P 0x99 1048576 131072
write -z 2200000 300000
write -z 4194304 1048576
discard 6291456 1048576
discard 100000 1000
write -P 0xaa 6400000 3000
EOF
}

check_read() {
    local name=$1 img=$2
    FAIL_CONTEXT="reading image $name, QEMU $QEMU_VER"
    qemu-img convert -O raw "$img" "$D/$name.expect.raw" \
        || fail "qemu-img convert $img"
    start_nbd_server "$img" --read-only
    nbd_read_all "$D/$name.got.raw"
    stop_nbd_server
    cmp "$D/$name.got.raw" "$D/$name.expect.raw" >&2 \
        || fail "$name: data read through the server differs from qemu-img convert"
    rm -f "$D/$name.got.raw" "$D/$name.expect.raw"
    echo "ok read $name (QEMU $QEMU_VER)"
}

# write_both NAME IMG SEEDOFS: the same writes via the server on one copy and
# via qemu-io on another; both copies must end up equal and clean.
write_both() {
    local name=$1 img=$2 seedofs=$3
    local a=$D/$name.A.qcow2 b=$D/$name.B.qcow2
    FAIL_CONTEXT="writing image $name, QEMU $QEMU_VER, seed $SEED; replay: QUBLK_SEED=$SEED $0"
    cp "$img" "$a"
    cp "$img" "$b"
    local cs
    cs=$(qemu-img info --output=json "$img" | "$PYTHON" -c \
        'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
    mkdir -p "$D/$name.ops"
    "$PYTHON" "$TESTS_DIR/gen-ops.py" --seed $((SEED + seedofs)) --size "$SIZE" \
        --cluster-size "$cs" --ops 150 --segments 1 "$D/$name.ops" \
        || fail "gen-ops.py"
    # Targeted partial writes: mid-cluster, across a cluster boundary, and
    # single bytes, on clusters that are compressed/backing/snapshotted.
    {
        echo "write -P 0xc1 $((cs / 2 + 7)) 100"
        echo "write -P 0xc2 $((3 * cs - 10)) 20"
        echo "write -P 0xc3 $((2097152 + 5)) 1"
        echo "write -z $((5000000 + 3)) 999"
        echo "write -P 0xc4 $((4194304 + 1)) $((cs + 1))"
        cat "$D/$name.ops/img.0.io"
    } >"$D/$name.ops/all.io"

    start_nbd_server "$a"
    qio "$NBD_URI" raw <"$D/$name.ops/all.io"
    stop_nbd_server
    qio "$b" qcow2 -d unmap <"$D/$name.ops/all.io"

    qcompare "$a" "$b"
    qcheck "$a"
    qcheck "$b"
    echo "ok write $name (QEMU $QEMU_VER)"
}

# Snapshot contents must survive writes to the active layer.
same_snapshot() {
    local a=$1 b=$2 snap=$3
    qemu-img convert -f qcow2 -l "snapshot.name=$snap" "$a" -O raw "$D/sa.raw" \
        || fail "qemu-img convert -l $snap $a"
    qemu-img convert -f qcow2 -l "snapshot.name=$snap" "$b" -O raw "$D/sb.raw" \
        || fail "qemu-img convert -l $snap $b"
    cmp "$D/sa.raw" "$D/sb.raw" >&2 || fail "snapshot $snap of $a changed"
    rm -f "$D/sa.raw" "$D/sb.raw"
}

make_source "$SRC" "$SIZE"

# Every image kind, written, read, rewritten and checked by QEMU $1.
one_version() {
    use_qemu "$1"
    D=$TMPD/q$1
    mkdir -p "$D"

    # Compressed, zlib and zstd, 64 KiB and 4 KiB clusters.
    qemu-img convert -c -f raw -O qcow2 "$SRC" "$D/zlib.qcow2" || fail "convert zlib"
    qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd \
        "$SRC" "$D/zstd.qcow2" || fail "convert zstd"
    qemu-img convert -c -f raw -O qcow2 -o cluster_size=4k \
        "$SRC" "$D/zlib4k.qcow2" || fail "convert zlib 4k"
    qemu-img info "$D/zstd.qcow2" | grep -q 'compression type: zstd' \
        || fail "qemu-img did not make a zstd image"

    # Internal snapshots with writes after each.
    qemu-img convert -f raw -O qcow2 "$SRC" "$D/snap.qcow2" || fail "convert snap"
    qemu-img snapshot -c s1 "$D/snap.qcow2" || fail "snapshot s1"
    mutate "$D/snap.qcow2" qcow2
    qemu-img snapshot -c s2 "$D/snap.qcow2" || fail "snapshot s2"
    qio "$D/snap.qcow2" qcow2 <<EOF
write -P 0xd1 0 65536
write -P 0xd2 1000000 5000
EOF

    # Backing chain: top.qcow2 -> mid.qcow2 -> base.raw (3 MiB, shorter than
    # the 8 MiB overlays: reads past its end are zeros).
    head -c 3M "$SRC" >"$D/base.raw"
    mkimg -f qcow2 -b "$D/base.raw" -F raw "$D/mid.qcow2" "$SIZE"
    qio "$D/mid.qcow2" qcow2 <<EOF
write -P 0xe1 1000000 70000
write -P 0xe2 3100000 200000
write -z 2500000 131072
EOF
    mkimg -f qcow2 -b "$D/mid.qcow2" -F qcow2 "$D/top.qcow2" "$SIZE"
    qio "$D/top.qcow2" qcow2 -d unmap <<EOF
write -P 0xf1 65536 100
write -P 0xf2 1048000 10000
write -z 2162688 65536
discard 1179648 131072
write -P 0xf3 7000000 4096
EOF
    # The same chain with a v2 top (discard then leaves backing data visible).
    mkimg -f qcow2 -o compat=0.10 -b "$D/mid.qcow2" -F qcow2 "$D/topv2.qcow2" "$SIZE"
    qio "$D/topv2.qcow2" qcow2 -d unmap <<EOF
write -P 0xf4 200000 300000
discard 0 1048576
EOF

    # Zero clusters and discarded ranges, v3 and v2.
    qemu-img convert -f raw -O qcow2 "$SRC" "$D/zero.qcow2" || fail "convert zero"
    mutate "$D/zero.qcow2" qcow2
    qemu-img convert -f raw -O qcow2 -o compat=0.10 "$SRC" "$D/zerov2.qcow2" \
        || fail "convert zerov2"
    mutate "$D/zerov2.qcow2" qcow2

    # Small and large clusters.
    qemu-img convert -f raw -O qcow2 -o cluster_size=512 "$SRC" "$D/c512.qcow2" \
        || fail "convert c512"
    mutate "$D/c512.qcow2" qcow2
    qemu-img convert -f raw -O qcow2 -o cluster_size=2M "$SRC" "$D/c2M.qcow2" \
        || fail "convert c2M"
    mutate "$D/c2M.qcow2" qcow2

    for i in zlib zstd zlib4k snap top topv2 mid zero zerov2 c512 c2M; do
        qcheck "$D/$i.qcow2"
        check_read "$i" "$D/$i.qcow2"
    done

    base_sum=$(md5sum <"$D/base.raw")
    mid_sum=$(md5sum <"$D/mid.qcow2")
    write_both zlib "$D/zlib.qcow2" 1
    write_both zstd "$D/zstd.qcow2" 2
    write_both zlib4k "$D/zlib4k.qcow2" 3
    write_both snap "$D/snap.qcow2" 4
    same_snapshot "$D/snap.A.qcow2" "$D/snap.qcow2" s1
    same_snapshot "$D/snap.A.qcow2" "$D/snap.qcow2" s2
    write_both top "$D/top.qcow2" 5
    write_both topv2 "$D/topv2.qcow2" 6
    write_both c512 "$D/c512.qcow2" 7
    write_both c2M "$D/c2M.qcow2" 8
    [ "$(md5sum <"$D/base.raw")" = "$base_sum" ] || fail "base.raw was modified"
    [ "$(md5sum <"$D/mid.qcow2")" = "$mid_sum" ] || fail "mid.qcow2 was modified"
}

for v in $(qemu_versions); do
    one_version "$v"
done
echo "all passed"
