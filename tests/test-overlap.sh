#!/bin/bash
# SPDX-License-Identifier: MIT
# Metadata overlap checks (issue 6, item 4): hostile images whose L1, L2
# or refcount-table entries point at other metadata.  A write through
# `qublk nbd` that would land on metadata must fail with EIO, the image
# must be marked corrupt (v3: `qemu-img info` says "corrupt: true"), the
# file must be otherwise unchanged byte for byte (nothing else written,
# not even the dirty caches), reads must go on being served on the same
# connection, and later writes must fail too.
#
# The images are written by QEMU (data, an internal snapshot, then a
# copy-on-write so the active and the snapshot L2 tables differ) and then
# one 8-byte entry is patched.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "qublk-specific (corrupt-bit handling)"
requires_server

PATCH=$TMPD/patch.py
cat >"$PATCH" <<'EOF'
# patch.py IMG WHAT TARGET: point one entry of IMG at the metadata TARGET.
#   WHAT: l2 (guest cluster 0's L2 entry, COPIED set), l1 (L1 entry 0,
#         COPIED set), reftable (refcount table entry 0)
#   TARGET: reftable, l1, refblock, l2 (the active L2 table), snaptable,
#           snapl1, snapl2
import struct, sys
img, what, target = sys.argv[1:4]
f = open(img, "r+b")
hdr = f.read(104)
cb = struct.unpack(">I", hdr[20:24])[0]
l1_off = struct.unpack(">Q", hdr[40:48])[0]
rt_off = struct.unpack(">Q", hdr[48:56])[0]
snap_off = struct.unpack(">Q", hdr[64:72])[0]
M = 0x00fffffffffffe00
def be64(off):
    f.seek(off)
    return struct.unpack(">Q", f.read(8))[0]
l2_off = be64(l1_off) & M
offs = {"reftable": rt_off, "l1": l1_off, "refblock": be64(rt_off) & M,
        "l2": l2_off, "snaptable": snap_off}
if snap_off:
    f.seek(snap_off)
    snap_l1 = struct.unpack(">Q", f.read(8))[0]
    offs["snapl1"] = snap_l1
    offs["snapl2"] = be64(snap_l1) & M
t = offs[target]
assert t and t % (1 << cb) == 0, (target, t)
COPIED = 1 << 63
if what == "l2":
    f.seek(l2_off)
    f.write(struct.pack(">Q", t | COPIED))
elif what == "l1":
    f.seek(l1_off)
    f.write(struct.pack(">Q", t | COPIED))
elif what == "reftable":
    f.seek(rt_off)
    f.write(struct.pack(">Q", t))
print(t)
EOF

# make_image IMG COMPAT: data in guest clusters 0-1, snapshot s1, then a
# rewrite of cluster 0 (its own L2 table and data cluster again).
make_image() {
    local img=$1 compat=$2
    mkimg -f qcow2 -o "cluster_size=65536,compat=$compat" "$img" 16M
    qemu-io -f qcow2 -c 'write -P 0x11 0 128k' "$img" >/dev/null || fail "qemu-io"
    qemu-img snapshot -c s1 "$img" || fail "qemu-img snapshot"
    qemu-io -f qcow2 -c 'write -P 0x22 0 64k' "$img" >/dev/null || fail "qemu-io"
    qcheck "$img"
}

# same_except_incompat A B: byte-identical (length included) but for the
# header's incompatible-features field (bytes 72-79).
same_except_incompat() {
    [ "$(stat -c %s "$1")" = "$(stat -c %s "$2")" ] &&
        cmp <(head -c 72 "$1") <(head -c 72 "$2") >/dev/null &&
        cmp <(tail -c +81 "$1") <(tail -c +81 "$2") >/dev/null
}

# case NAME COMPAT WHAT TARGET WRITE-CMD
run_case() {
    local name=$1 compat=$2 what=$3 target=$4 wcmd=$5
    local img=$TMPD/$name.qcow2 out=$TMPD/$name.out
    FAIL_CONTEXT="case $name ($what entry -> $target, $wcmd)"
    make_image "$img" "$compat"
    "$PYTHON" "$PATCH" "$img" "$what" "$target" >/dev/null || fail "patch failed"
    cp "$img" "$TMPD/before.qcow2"
    start_nbd_server "$img"
    # The bad write, then reads of an intact cluster on the same
    # connection, then a write elsewhere.
    qemu-io -f raw -c "$wcmd" -c 'read -P 0x11 64k 64k' -c 'write -P 0x44 1M 4k' \
        "$NBD_URI" >"$out" 2>&1 || true
    # A corrupt image cannot be closed cleanly: the server says so (exit 1).
    local rc=0
    kill -TERM "$NBD_PID"
    wait "$NBD_PID" || rc=$?
    NBD_PID=
    ! _has_crash_report "$NBD_LOG" || { cat "$NBD_LOG" >&2; fail "sanitizer report"; }
    [ "$rc" = 1 ] || { cat "$NBD_LOG" >&2; fail "server exit status $rc, expected 1"; }
    grep -q "^${wcmd%% *} failed: Input/output error" "$out" ||
        { cat "$out" >&2; fail "the write over metadata did not fail with EIO"; }
    grep -q '^read 65536/65536 bytes at offset 65536' "$out" ||
        { cat "$out" >&2; fail "reads stopped after the corruption"; }
    grep -q '^write failed: Input/output error' "$out" ||
        { cat "$out" >&2; fail "a later write was not refused"; }
    grep -q 'Marking image as corrupt: Preventing invalid write on metadata' "$NBD_LOG" ||
        { cat "$NBD_LOG" >&2; fail "no corruption message in the server log"; }
    if [ "$compat" = 1.1 ]; then
        qemu-img info "$img" | grep -q 'corrupt: true' ||
            { qemu-img info "$img" >&2; fail "the corrupt bit is not set"; }
        same_except_incompat "$img" "$TMPD/before.qcow2" ||
            fail "the image changed beyond the corrupt bit"
        # Read-write opens are refused from now on.
        if "$QUBLK" nbd --socket "$TMPD/x.sock" "$img" >"$out" 2>&1; then
            fail "a corrupt image was opened read-write"
        fi
        grep -q 'marked corrupt' "$out" || { cat "$out" >&2; fail "no corrupt refusal"; }
    else
        cmp "$img" "$TMPD/before.qcow2" || fail "the v2 image changed"
    fi
    rm -f "$img" "$TMPD/before.qcow2"
    echo "ok $name"
    FAIL_CONTEXT=
}

# A guest write into its own (COPIED) cluster whose L2 entry points at
# each kind of metadata.
for t in reftable l1 refblock l2 snaptable snapl1 snapl2; do
    run_case "l2-to-$t" 1.1 l2 "$t" 'write -P 0x33 0 4k'
done
# The same on a v2 image (no corrupt bit: the state lives in memory).
run_case v2-l2-to-reftable 0.10 l2 reftable 'write -P 0x33 0 4k'
# An L1 entry pointing at the refcount table: updating "its L2 table"
# would write over the refcount table.
run_case l1-to-reftable 1.1 l1 reftable 'write -P 0x33 8k 4k'
# A refcount table entry pointing at the L1 table: a refcount update would
# write over the L1 table.
run_case reftable-to-l1 1.1 reftable l1 'write -P 0x33 4M 4k'
# Write-zeroes and discard are mapping changes through the same checks.
run_case zero-l1-to-reftable 1.1 l1 reftable 'write -z 64k 64k'
echo "all overlap cases passed"
