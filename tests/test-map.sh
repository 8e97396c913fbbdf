#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk map against qemu-img map, on images QEMU wrote:
#   1. --output=json equals qemu-img map --output=json on qcow2 images with
#      holes, data, zero clusters (with and without a host cluster),
#      discards and zlib/zstd compressed clusters, at 512 B, 64 KiB and
#      2 MiB clusters, v2 and v3; extended L2 (subclusters) over a backing
#      file; a qcow2 -> qcow2 -> short raw chain (zeros past the end of the
#      short file: "present": false); raw images with holes.
#      Normalised: qublk does not report the host offset of ranges in a
#      qcow2 layer yet (the engine's block status does not return it), so
#      "offset" is dropped from QEMU's entries in qcow2 layers and the
#      neighbours that then differ by nothing are merged (QEMU splits at
#      host-offset jumps).  Entries in raw layers keep their offsets and
#      must match exactly; qublk's own output must need no merging.
#   2. --start-offset/--max-length; the human table (qcow2 host offsets
#      shown as '-', compared on the rest; a raw chain exactly).
#   3. Locks (a writer makes map fail unless -U), usage errors (exit 2),
#      missing and malformed files (exit 1), no sanitizer reports.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
QUBLK=$(realpath "$QUBLK")   # one check runs in another directory
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=99"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=98:halt_on_error=1"

# norm JSON FORMATS [--strict]: qemu-img map JSON without the offsets of
# entries in qcow2 layers (FORMATS: the chain's formats, top first),
# merged by qemu-img's rule; --strict fails if anything needed merging or
# dropping (qublk's own output must already be in this form).
norm() {
    "$PYTHON" - "$@" <<'PYEOF'
import json, sys
ext, fmts = json.load(open(sys.argv[1])), sys.argv[2].split(",")
strict = len(sys.argv) > 3
out = []
for e in ext:
    if "offset" in e and e["present"] and fmts[e["depth"]] == "qcow2":
        if strict:
            sys.exit("offset given for a qcow2 layer: %s" % e)
        del e["offset"]
    if out:
        p = out[-1]
        same = all(p[k] == e[k] for k in ("depth", "present", "zero", "data"))
        same = same and ("offset" in p) == ("offset" in e)
        if same and "offset" in p:
            same = p["offset"] + p["length"] == e["offset"]
        if same and p["start"] + p["length"] == e["start"]:
            if strict:
                sys.exit("entries not merged: %s %s" % (p, e))
            p["length"] += e["length"]
            continue
    out.append(e)
for e in out:
    print(json.dumps(e, sort_keys=True))
PYEOF
}

chain_formats() {
    qemu-img info --backing-chain --output=json "$1" \
        | "$PYTHON" -c 'import json,sys; print(",".join(i["format"] for i in json.load(sys.stdin)))' \
        || fail "qemu-img info $1"
}

# check_json IMAGE [map options]
check_json() {
    local img=$1 fmts; shift
    fmts=$(chain_formats "$img")
    qemu-img map --output=json "$@" "$img" >"$TMPD/q.json" || fail "qemu-img map $img"
    "$QUBLK" map --output=json "$@" "$img" >"$TMPD/u.json" || fail "qublk map $* $img"
    norm "$TMPD/q.json" "$fmts" >"$TMPD/want"
    norm "$TMPD/u.json" "$fmts" --strict >"$TMPD/got" || fail "qublk map $* $img: not in final form"
    diff -u "$TMPD/want" "$TMPD/got" >&2 || fail "qublk map --output=json $* $img differs from qemu-img map"
    echo "  json ok: $(basename "$img") $* ($(wc -l <"$TMPD/want") entries)"
}

# check_human IMAGE: the table with qcow2 host offsets as '-' on both sides.
check_human() {
    local img=$1 fmts
    fmts=$(chain_formats "$img")
    "$QUBLK" map "$img" >"$TMPD/u.txt" || fail "qublk map $img"
    # qemu-img's table stops at compressed clusters: build it from the JSON.
    qemu-img map --output=json "$img" >"$TMPD/q.json" || fail "qemu-img map $img"
    qemu-img info --backing-chain --output=json "$img" >"$TMPD/chain.json"
    "$PYTHON" - "$TMPD/q.json" "$TMPD/chain.json" "$fmts" >"$TMPD/want" <<'PYEOF' || fail "table"
import json, sys
ext, chain = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
fmts = sys.argv[3].split(",")
print("%-16s%-16s%-16s%s" % ("Offset", "Length", "Mapped to", "File"))
def hx(v):
    return "%#x" % v if v else "0"
rows = []
for e in ext:
    if not e["data"] or e["zero"]:
        continue
    off = "-" if fmts[e["depth"]] == "qcow2" else hx(e["offset"])
    f = chain[e["depth"]]["filename"]
    if rows and rows[-1][2] == "-" and off == "-" and rows[-1][3] == f \
            and rows[-1][0] + rows[-1][1] == e["start"]:
        rows[-1][1] += e["length"]
        continue
    rows.append([e["start"], e["length"], off, f])
for s, n, off, f in rows:
    print("%-16s%-16s%-16s%s" % (hx(s), hx(n), off, f))
PYEOF
    diff -u "$TMPD/want" "$TMPD/u.txt" >&2 || fail "qublk map $img (human) differs"
    echo "  human ok: $(basename "$img")"
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
EOF
    check_json "$img"
done
img=$TMPD/a-64k-1.1.qcow2
check_json "$img" --start-offset 5M --max-length 9M
check_json "$img" --start-offset 63M
check_human "$img"

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
# A raw image that holds only raw layers: the table equals qemu-img's.
qemu-img map "$B" >"$TMPD/want" || fail "qemu-img map $B"
"$QUBLK" map "$B" >"$TMPD/got" || fail "qublk map $B"
diff -u "$TMPD/want" "$TMPD/got" >&2 || fail "qublk map $B (human) differs from qemu-img map"
# An empty image: one empty entry, as qemu-img prints.
mkimg -f qcow2 "$TMPD/empty.qcow2" 0
check_json "$TMPD/empty.qcow2"

# ---- 3. locks, usage, bad input ----
sleep_pid=
qemu-io -f qcow2 "$TOP" -c 'sleep 3000' >/dev/null 2>&1 &
sleep_pid=$!
for _ in $(seq 100); do
    "$QUBLK" map "$TOP" >/dev/null 2>&1 || break
    sleep 0.05
done
rc=0
"$QUBLK" map "$TOP" >/dev/null 2>"$TMPD/err" || rc=$?
[ "$rc" = 1 ] || fail "map of an image qemu-io writes: exit $rc, want 1"
grep -q 'Failed to get' "$TMPD/err" || fail "map of a locked image: $(cat "$TMPD/err")"
"$QUBLK" map -U --output=json "$TOP" >/dev/null || fail "map -U of an image qemu-io writes"
wait "$sleep_pid" || fail "qemu-io sleep"

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
