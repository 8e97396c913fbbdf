#!/bin/bash
# SPDX-License-Identifier: MIT
# Persistent dirty bitmaps (qcow2 "Bitmaps" extension) against QEMU: an
# image with enabled bitmaps (64 KiB and 512 B granularity), a disabled
# one and one left "in use" by a crash, made by qemu-img.  The same writes,
# write-zeroes and discards go through `qublk nbd` on one copy and through
# qemu-io (which keeps bitmaps too) on the other.  Then, for each bitmap,
# the dirty extents that qemu-nbd exports (`nbdinfo
# --map=qemu:dirty-bitmap:NAME`, what an incremental backup reads) are the
# same for both copies; `qemu-img info` shows the same flags (enabled
# ones consistent again after a clean close, the disabled one untouched
# and empty, the inconsistent one still in use); `qemu-img check` is clean
# with no leaks; `qublk check` agrees.  A kill -9 of the server leaves the
# tracked bitmaps in use (inconsistent), never silently stale.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io qemu-nbd nbdinfo
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "qublk-specific"
requires_server

mkbm() {
    local img=$1
    mkimg -f qcow2 "$img" 64M
    qemu-io -f qcow2 -c 'write -P 1 0 1M' "$img" >/dev/null || fail "qemu-io"
    qemu-img bitmap --add "$img" b64k || fail "bitmap"
    qemu-img bitmap --add --granularity 512 "$img" b512 || fail "bitmap"
    qemu-img bitmap --add "$img" off || fail "bitmap"
    qemu-img bitmap --disable "$img" off || fail "bitmap"
}

# maps IMG OUT: the dirty extents of every bitmap, as qemu-nbd exports them.
maps() {
    local img=$1 out=$2 bm sock=$TMPD/map.sock
    : >"$out"
    for bm in b64k b512 off; do
        rm -f "$sock"
        qemu-nbd -r -f qcow2 -B "$bm" -k "$sock" "$img" >"$TMPD/qnbd.log" 2>&1 &
        local pid=$! n=0
        while [ ! -S "$sock" ]; do
            n=$((n + 1)); [ "$n" -lt 200 ] || { cat "$TMPD/qnbd.log" >&2; fail "qemu-nbd"; }
            sleep 0.05
        done
        echo "== $bm" >>"$out"
        nbdinfo --map="qemu:dirty-bitmap:$bm" "nbd+unix:///?socket=$sock" >>"$out" ||
            fail "nbdinfo --map $bm"
        wait "$pid" || true
    done
}

flags() { qemu-img info --output=json "$1" | "$PYTHON" -c '
import json, sys
for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", []):
    print(b["name"], b["granularity"], ",".join(b["flags"]))'; }

OPS=$'write -P 0x22 100k 4k
write -P 0x23 3M 1M
write -z 10M 64k
write -z -u 20M 200k
discard 30M 2M
write -P 0x24 63M 1M
write -P 0x25 40000 1000'

mkbm "$TMPD/a.qcow2"
cp "$TMPD/a.qcow2" "$TMPD/b.qcow2"
start_nbd_server "$TMPD/a.qcow2"
qio "$NBD_URI" raw <<<"$OPS"
stop_nbd_server
qio "$TMPD/b.qcow2" qcow2 <<<"$OPS"
qcheck "$TMPD/a.qcow2"
"$QUBLK" check "$TMPD/a.qcow2" >/dev/null || fail "qublk check disagrees"
qcompare "$TMPD/a.qcow2" "$TMPD/b.qcow2"
flags "$TMPD/a.qcow2" >"$TMPD/a.flags"
flags "$TMPD/b.qcow2" >"$TMPD/b.flags"
diff -u "$TMPD/b.flags" "$TMPD/a.flags" >&2 || fail "bitmap flags differ from QEMU's"
grep -q '^b64k 65536 auto$' "$TMPD/a.flags" || { cat "$TMPD/a.flags" >&2; fail "b64k not consistent"; }
maps "$TMPD/a.qcow2" "$TMPD/a.map"
maps "$TMPD/b.qcow2" "$TMPD/b.map"
diff -u "$TMPD/b.map" "$TMPD/a.map" >&2 || fail "dirty extents differ from QEMU's (- QEMU, + qublk)"
grep -q dirty "$TMPD/a.map" || fail "no dirty extents at all: the test is blind"
echo "ok: same dirty extents and flags as QEMU"

# A second session adds to the same bitmaps.
start_nbd_server "$TMPD/a.qcow2"
qio "$NBD_URI" raw <<<'write -P 0x26 50M 64k'
stop_nbd_server
qio "$TMPD/b.qcow2" qcow2 <<<'write -P 0x26 50M 64k'
maps "$TMPD/a.qcow2" "$TMPD/a.map"
maps "$TMPD/b.qcow2" "$TMPD/b.map"
diff -u "$TMPD/b.map" "$TMPD/a.map" >&2 || fail "second session: dirty extents differ"
echo "ok: a second session"

# kill -9: the tracked bitmaps stay in use (inconsistent), not stale.
start_nbd_server "$TMPD/a.qcow2"
qio "$NBD_URI" raw <<<'write -P 0x27 60M 4k'
kill -KILL "$NBD_PID"
wait "$NBD_PID" 2>/dev/null || true
NBD_PID=
flags "$TMPD/a.qcow2" >"$TMPD/a.flags"
grep -q '^b64k 65536 in-use,auto$' "$TMPD/a.flags" || { cat "$TMPD/a.flags" >&2; fail "b64k not in use after a crash"; }
grep -q '^off 65536 $' "$TMPD/a.flags" || { cat "$TMPD/a.flags" >&2; fail "the disabled bitmap changed"; }
echo "ok: in use after kill -9"
