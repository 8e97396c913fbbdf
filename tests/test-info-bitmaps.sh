#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk info's persistent bitmaps and disk size against qemu-img info
# (QEMU 7.2, and 10 when set up), on images QEMU made:
#   - bitmaps added with qemu-img bitmap (default and 512 B / 2 MiB
#     granularity, a disabled one, a name with spaces), one left "in-use"
#     by a qemu-io killed while it had the image open read-write: the JSON
#     "bitmaps" list and the text block ("bitmaps:" with flags, name,
#     granularity) equal qemu-img info's; "actual-size" equal too;
#   - --backing-chain over an image whose backing file has the bitmaps;
#   - the bitmaps extension without its autoclear bit (another program
#     wrote the image): no list, as QEMU;
#   - a bitmap directory that points past the end of the file: refused
#     (exit 1), as qemu-img info refuses it.
. "$(dirname "$0")/lib.sh"
requires qemu-img qemu-io "$PYTHON"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
VERSIONS=$(qemu_versions)
D=$TMPD

# compare IMG [info options]: qublk info vs each QEMU's qemu-img info.
compare() {
    local img=$1 v; shift
    "$QUBLK" info --output json "$@" "$img" >"$D/u.json" || fail "qublk info --output json $* $img"
    "$QUBLK" info "$@" "$img" >"$D/u.txt" || fail "qublk info $* $img"
    for v in $VERSIONS; do
        use_qemu "$v"
        # (stderr: QEMU warns about bitmaps it will not trust)
        qemu-img info --output json "$@" "$img" >"$D/q.json" 2>"$D/q.err" \
            || fail "QEMU $v: qemu-img info $img: $(cat "$D/q.err")"
        qemu-img info "$@" "$img" >"$D/q.txt" 2>"$D/q.err" \
            || fail "QEMU $v: qemu-img info $img: $(cat "$D/q.err")"
        "$PYTHON" - "$D/q.json" "$D/u.json" <<'PYEOF' || fail "QEMU $v: $img: JSON differs"
import json, sys
q, u = (json.load(open(f)) for f in sys.argv[1:3])
if isinstance(q, dict):
    q, u = [q], [u]
assert len(q) == len(u), (len(q), len(u))
for a, b in zip(q, u):
    da = a.get("format-specific", {}).get("data", {})
    db = b.get("format-specific", {}).get("data", {})
    for k in ("bitmaps",):
        assert da.get(k) == db.get(k), (k, da.get(k), db.get(k))
    assert a["actual-size"] == b["actual-size"], ("actual-size", a["actual-size"], b["actual-size"])
PYEOF
        # The text: each image's "bitmaps:" block and "disk size:" line.
        for f in q u; do
            awk '/^image: |^disk size: / { print; next }
                 /^    bitmaps:$/ { on = 1; print; next }
                 on && /^        / { print; next }
                 { on = 0 }' "$D/$f.txt" >"$D/$f.blocks"
        done
        diff -u "$D/q.blocks" "$D/u.blocks" >&2 || fail "QEMU $v: $img: the text differs"
    done
    use_qemu 7
    echo "  ok: $(basename "$img") $* ($(grep -c '"name"' "$D/u.json") bitmaps)"
}

qemu-img create -q -f qcow2 "$D/base.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 1 0 1M' "$D/base.qcow2" >/dev/null
qemu-img bitmap --add "$D/base.qcow2" b0
qemu-img bitmap --add -g 512 "$D/base.qcow2" "with spaces"
qemu-img bitmap --add -g 2M "$D/base.qcow2" off
qemu-img bitmap --disable "$D/base.qcow2" off
compare "$D/base.qcow2"

# In use: a writer that died with the image open.
qemu-io -f qcow2 -c 'write -P 2 1M 64k' -c 'sleep 60000' "$D/base.qcow2" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 1200); do      # until qemu-io marked the bitmaps in use
    "$PYTHON" - "$D/base.qcow2" <<'PYEOF' && break
import struct, sys
with open(sys.argv[1], "rb") as f:
    d = f.read()
# Find the bitmap directory through the header extensions.
pos = 72 if struct.unpack(">I", d[4:8])[0] == 2 else struct.unpack(">I", d[100:104])[0]
while pos + 8 <= len(d):
    t, n = struct.unpack(">II", d[pos:pos + 8])
    if t == 0:
        break
    if t == 0x23852875:
        nb, _, size, off = struct.unpack(">IIQQ", d[pos + 8:pos + 32])
        flags = struct.unpack(">I", d[off + 12:off + 16])[0]
        sys.exit(0 if flags & 1 else 1)
    pos += 8 + (n + 7) // 8 * 8
sys.exit(1)
PYEOF
    sleep 0.05
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
grep -q in-use <(qemu-img info -U "$D/base.qcow2") || fail "qemu-io left no bitmap in use"
compare "$D/base.qcow2"

qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$D/top.qcow2"
qemu-img bitmap --add "$D/top.qcow2" top
compare "$D/top.qcow2" --backing-chain

# The extension without the autoclear bit: ignored, as QEMU ignores it.
cp "$D/top.qcow2" "$D/noauto.qcow2"
"$PYTHON" - "$D/noauto.qcow2" <<'PYEOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(88)
    a = struct.unpack(">Q", f.read(8))[0]
    f.seek(88)
    f.write(struct.pack(">Q", a & ~1))
PYEOF
compare "$D/noauto.qcow2"
"$QUBLK" info "$D/noauto.qcow2" | grep -q "^    bitmaps:" && fail "bitmaps shown without the autoclear bit"

# A directory past the end of the file: both refuse the image.
cp "$D/top.qcow2" "$D/bad.qcow2"
"$PYTHON" - "$D/bad.qcow2" <<'PYEOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    d = f.read()
    pos = struct.unpack(">I", d[100:104])[0]
    while True:
        t, n = struct.unpack(">II", d[pos:pos + 8])
        if t == 0x23852875:
            f.seek(pos + 8 + 16)
            f.write(struct.pack(">Q", (len(d) // 65536 + 16) * 65536))
            break
        pos += 8 + (n + 7) // 8 * 8
PYEOF
for v in $VERSIONS; do
    use_qemu "$v"
    ! qemu-img info "$D/bad.qcow2" >/dev/null 2>&1 || fail "QEMU $v: qemu-img info read bad.qcow2"
done
use_qemu 7
rc=0
"$QUBLK" info "$D/bad.qcow2" >/dev/null 2>"$D/err" || rc=$?
[ "$rc" = 1 ] || fail "qublk info of a bad bitmap directory: exit $rc, want 1"
grep -q 'bitmap directory' "$D/err" || fail "qublk info bad.qcow2: $(cat "$D/err")"
echo PASS
