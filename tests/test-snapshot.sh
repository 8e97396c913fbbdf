#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk snapshot against qemu-img snapshot, with each QEMU version as the
# oracle (7.2, and 10 when tests/setup-qemu10.sh has unpacked it).
# On a v3 image (64 KiB clusters), a v2 image with 512 B clusters, one with
# 2 MiB clusters and a backing file, and one with compressed clusters: snapshots are created,
# listed, applied and deleted by qublk and by qemu-img, interleaved with
# guest writes through qemu-io, so that each tool works on the other's
# snapshots.  After every step qemu-img check must be clean (no leaks
# either), and the contents of every snapshot (qemu-img convert -l) must
# equal the guest contents at its creation; an applied snapshot must
# read back as such, virtual size included (v3 images resized between).
# Then the snapshot table must grow past one cluster (many snapshots with
# long names at 512 B clusters, the refcount table growing too), and an
# image in use must be refused.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io python3
[ -x "$QUBLK" ] || skip "$QUBLK not built"

D=$TMPD
SIZE=4M

snap() { "$QUBLK" snapshot "$@" || fail "qublk snapshot $*"; }
# qemu-img check exits 0 only when it finds neither corruption nor leaks.
qc() {
    qemu-img check -q "$1" >/dev/null 2>&1 && return 0
    qemu-img check "$1" >&2
    fail "qemu-img check $1 (QEMU $QEMU_VER) is not clean"
}
qsnap() { qemu-img snapshot "$@" || fail "qemu-img snapshot $* (QEMU $QEMU_VER)"; }
raw_of() { qemu-img convert -f qcow2 -O raw "$1" "$2" || fail "convert $1"; }
# same_snapshot IMG NAME RAW: the snapshot's contents are RAW's.
same_snapshot() {
    qemu-img convert -f qcow2 -l "snapshot.name=$2" -O raw "$1" "$D/sn.raw" \
        || fail "convert -l $2 $1 (QEMU $QEMU_VER)"
    cmp "$D/sn.raw" "$3" >&2 || fail "snapshot $2 of $1 differs from the guest contents at its creation"
}
# names IMG: "id:name ..." as qemu-img lists them; qublk must agree.
names() {
    local q u
    q=$(qemu-img info --output=json "$1" | "$PYTHON" -c '
import json, sys
print(" ".join("%s:%s" % (s["id"], s["name"]) for s in json.load(sys.stdin).get("snapshots", [])))')
    u=$("$QUBLK" info --output json "$1" | "$PYTHON" -c '
import json, sys
print(" ".join("%s:%s" % (s["id"], s["name"]) for s in json.load(sys.stdin).get("snapshots", [])))')
    [ "$q" = "$u" ] || fail "snapshot lists differ: qemu-img '$q', qublk '$u'"
    echo "$q"
}
expect_names() {
    local got
    got=$(names "$1")
    [ "$got" = "$2" ] || fail "$1: snapshots '$got', expected '$2'"
}
guest_write() {   # guest_write IMG PATTERN OFFSET LEN
    qio "$1" qcow2 <<EOF
write -P $2 $3 $4
EOF
}

# scenario NAME QEMU-IMG-CREATE-ARGS...: the interleaved life of one image.
scenario() {
    local name=$1; shift
    local img=$D/$name.qcow2 v3=1
    FAIL_CONTEXT="scenario $name, QEMU $QEMU_VER"
    case "$*" in *compat=0.10*) v3=0 ;; esac
    if [ "$name" = compressed ]; then
        qemu-img convert -c -f raw -O qcow2 "$@" "$D/src.raw" "$img" || fail "convert -c"
    else
        qemu-img create -q -f qcow2 "$@" "$img" "$SIZE" || fail "create $name"
        qio "$img" qcow2 <<EOF
write -P 0x11 0 1M
write -P 0x12 1500000 70000
write -z 2M 64k
write -P 0x13 3M 100
EOF
    fi
    raw_of "$img" "$D/e0.raw"

    snap -c s1 "$img"                                   # qublk creates
    qc "$img"
    expect_names "$img" "1:s1"
    guest_write "$img" 0x21 500000 600000
    raw_of "$img" "$D/e1.raw"
    qsnap -c s2 "$img"                                  # QEMU creates
    qc "$img"
    guest_write "$img" 0x22 100 3000000
    raw_of "$img" "$D/e2.raw"
    snap -c s3 "$img"
    qc "$img"
    expect_names "$img" "1:s1 2:s2 3:s3"
    same_snapshot "$img" s1 "$D/e0.raw"
    same_snapshot "$img" s2 "$D/e1.raw"
    same_snapshot "$img" s3 "$D/e2.raw"
    guest_write "$img" 0x23 0 4M

    snap -a s2 "$img"                                   # qublk applies QEMU's
    qc "$img"
    qcompare "$img" "$D/e1.raw"
    guest_write "$img" 0x24 1M 1M
    qsnap -a s1 "$img"                                  # QEMU applies qublk's
    qc "$img"
    qcompare "$img" "$D/e0.raw"
    snap -a 3 "$img"                                    # by id
    qc "$img"
    qcompare "$img" "$D/e2.raw"
    guest_write "$img" 0x25 2M 100000
    raw_of "$img" "$D/e3.raw"

    if [ "$v3" = 1 ]; then
        # The virtual size follows the snapshot's, both ways.
        qemu-img resize -q "$img" 6M || fail "resize"
        guest_write "$img" 0x26 5M 4096
        raw_of "$img" "$D/e4.raw"
        snap -c big "$img"
        qc "$img"
        snap -a s1 "$img"
        qc "$img"
        qcompare "$img" "$D/e0.raw"
        [ "$(stat -c %s "$D/e0.raw")" = 4194304 ] || fail "e0 size"
        snap -a big "$img"
        qc "$img"
        qcompare "$img" "$D/e4.raw"
        qemu-img resize -q --shrink "$img" 3M || fail "shrink"
        qsnap -a big "$img"
        qc "$img"
        qcompare "$img" "$D/e4.raw"
        snap -d big "$img"
        qc "$img"
        qemu-img resize -q --shrink "$img" 4M || fail "shrink back"
        qio "$img" qcow2 <<EOF
read -P 0x25 2M 100000
EOF
        raw_of "$img" "$D/e3.raw"
    fi

    snap -d s2 "$img"                                   # qublk deletes QEMU's
    qc "$img"
    expect_names "$img" "1:s1 3:s3"
    qsnap -d s1 "$img"                                  # QEMU deletes qublk's
    qc "$img"
    same_snapshot "$img" s3 "$D/e2.raw"
    snap -c s4 "$img"
    qc "$img"
    expect_names "$img" "3:s3 4:s4"                     # ids: one past the largest
    same_snapshot "$img" s4 "$D/e3.raw"
    snap -d 3 "$img"
    snap -d s4 "$img"
    qc "$img"
    expect_names "$img" ""
    qcompare "$img" "$D/e3.raw"
    echo "ok $name (QEMU $QEMU_VER)"
    rm -f "$img"
}

mkimg -f raw "$D/src.raw" "$SIZE"
qio "$D/src.raw" raw <<EOF
write -P 0x31 0 2M
write -P 0x32 3M 512k
EOF
dd if=/dev/urandom of="$D/src.raw" bs=64k seek=40 count=2 conv=notrunc status=none
head -c 3M "$D/src.raw" >"$D/base.raw"

for v in $(qemu_versions); do
    use_qemu "$v"
    scenario v3
    scenario v2-c512 -o compat=0.10,cluster_size=512
    scenario c2M-backing -o cluster_size=2M,backing_file="$D/base.raw",backing_fmt=raw
    scenario compressed
done
use_qemu 7

# Many snapshots with long names at 512 B clusters: the snapshot table
# spans many clusters and moves at every change; with 64-bit refcounts the
# refcount table (64 entries, 2 MiB of file per cluster) must grow too.
FAIL_CONTEXT="table growth"
img=$D/many.qcow2
mkimg -f qcow2 -o cluster_size=512,refcount_bits=64 "$img" 2M
qio "$img" qcow2 <<EOF
write -P 0x41 0 1980k
EOF
raw_of "$img" "$D/m0.raw"
rt0=$("$PYTHON" -c 'import struct,sys; print(struct.unpack(">I", open(sys.argv[1],"rb").read()[56:60])[0])' "$img")
long=$(printf 'n%.0s' $(seq 200))
want=""
for i in $(seq 1 24); do
    if [ $((i % 3)) = 0 ]; then
        qsnap -c "$long-$i" "$img"
    else
        snap -c "$long-$i" "$img"
    fi
    want="$want $i:$long-$i"
done
qcheck "$img"
expect_names "$img" "${want# }"
rt1=$("$PYTHON" -c 'import struct,sys; print(struct.unpack(">I", open(sys.argv[1],"rb").read()[56:60])[0])' "$img")
[ "$rt1" -gt "$rt0" ] || fail "the refcount table did not grow ($rt0 -> $rt1 clusters)"
guest_write "$img" 0x42 100k 50k
snap -d "$long-5" "$img"
qsnap -d "$long-6" "$img"
snap -d "$long-1" "$img"
qcheck "$img"
same_snapshot "$img" "$long-24" "$D/m0.raw"
snap -a "$long-7" "$img"
qcheck "$img"
qcompare "$img" "$D/m0.raw"
for v in $(qemu_versions); do
    use_qemu "$v"
    qc "$img"
    [ "$(qemu-img snapshot -l "$img" | grep -c "$long")" = 21 ] || fail "QEMU $v lists the wrong snapshots"
done
use_qemu 7
echo "ok table growth (refcount table $rt0 -> $rt1 clusters)"

# An image in use is refused; the command line.
FAIL_CONTEXT="locking and usage"
mkimg -f qcow2 "$D/busy.qcow2" 1M
qemu-io -f qcow2 -c 'sleep 20000' "$D/busy.qcow2" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 100); do
    grep -q ":$(stat -c %i "$D/busy.qcow2") " /proc/locks && break
    sleep 0.1
done
sum=$(md5sum <"$D/busy.qcow2")
rc=0
"$QUBLK" snapshot -c x "$D/busy.qcow2" 2>"$D/err" || rc=$?
[ "$rc" = 1 ] && grep -q 'lock' "$D/err" || fail "snapshot of a busy image: rc=$rc $(cat "$D/err")"
"$QUBLK" snapshot -l -U "$D/busy.qcow2" >/dev/null || fail "-l -U on a busy image"
kill "$pid"
wait "$pid" 2>/dev/null || true
[ "$(md5sum <"$D/busy.qcow2")" = "$sum" ] || fail "a refused snapshot changed the image"
rc=0; "$QUBLK" snapshot -c a -d b "$D/busy.qcow2" 2>/dev/null || rc=$?
[ "$rc" = 2 ] || fail "-c with -d: rc=$rc"
rc=0; "$QUBLK" snapshot -a nope "$D/busy.qcow2" 2>"$D/err" || rc=$?
[ "$rc" = 1 ] && grep -q "not found" "$D/err" || fail "-a of a missing snapshot: rc=$rc"
rc=0; "$QUBLK" snapshot -c x "$D/src.raw" 2>"$D/err" || rc=$?
[ "$rc" = 1 ] && grep -q "not a qcow2" "$D/err" || fail "snapshot of a raw file: rc=$rc"
[ "$("$QUBLK" snapshot -l "$D/busy.qcow2")" = "" ] || fail "-l of an image without snapshots prints"
# -l prints what qemu-img 7.2 prints.
[ "$("$QUBLK" snapshot -l "$img")" = "$(qemu-img snapshot -l "$img")" ] \
    || fail "snapshot -l differs from qemu-img's"

# Damaged images are refused before anything is written.
FAIL_CONTEXT="damaged images"
damaged() {   # damaged WHAT OFFSET-EXPR HEX: patch, then every operation refuses
    local img=$D/bad.qcow2 off sum rc op
    mkimg -f qcow2 "$img" 4M
    qio "$img" qcow2 <<EOF
write -P 0x51 0 256k
EOF
    qemu-img snapshot -c keep "$img" || fail "snapshot keep"
    off=$("$PYTHON" -c "
import struct, sys
d = open(sys.argv[1], 'rb').read()
l1 = struct.unpack('>Q', d[40:48])[0]
l2 = struct.unpack('>Q', d[l1:l1 + 8])[0] & 0x00fffffffffffe00
print($2)" "$img")
    "$PYTHON" -c '
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); f.write(bytes.fromhex(sys.argv[3]))' "$img" "$off" "$3"
    sum=$(md5sum <"$img")
    for op in "-c new" "-d keep" "-a keep"; do
        rc=0
        # shellcheck disable=SC2086  # $op: a flag and a name
        "$QUBLK" snapshot $op "$img" 2>"$D/err" || rc=$?
        [ "$rc" = 1 ] && grep -q "invalid" "$D/err" && ! grep -qE "Sanitizer|runtime error" "$D/err" \
            || fail "$1: snapshot $op: rc=$rc $(cat "$D/err")"
        [ "$(md5sum <"$img")" = "$sum" ] || fail "$1: snapshot $op changed a damaged image"
    done
    echo "ok damaged: $1"
}
damaged "L1 entry with reserved bits" 'l1' 0000000000050001
damaged "misaligned L2 entry" 'l2' 8000000000050200
echo "all passed"
