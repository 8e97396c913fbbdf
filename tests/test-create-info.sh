#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk create / info against the oracle, qemu-img (QEMU 7.2, and QEMU 10
# when tests/setup-qemu10.sh has unpacked it: each case runs against both):
#  - for a matrix of create options, `qublk create` and `qemu-img create`
#    must give the same `qemu-img info` properties, and `qemu-img check`
#    must find no errors and no leaks in ours;
#  - `qublk info` must agree with `qemu-img info` on images either made,
#    including internal snapshots made by `qemu-img snapshot -c`;
#  - malformed images (unknown incompatible bits, bad offsets, truncated
#    files, ...) make `qublk info` exit 1 with a message, never crash.
# Exit: 0 pass, 1 fail, 77 skip (a tool is missing).
# shellcheck disable=SC2015  # "check && ok || bad": ok cannot fail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
set +e +o pipefail       # this test counts its failures itself

requires qemu-img python3
[ -x "$QUBLK" ] || skip "$QUBLK not built"
QUBLK=$(realpath "$QUBLK")   # some steps run in another directory
# Sanitizer reports must not pass for the expected "exit 1" of bad images.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=99"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=98:halt_on_error=1"
T=$TMPD
VERSIONS=$(qemu_versions) || exit 1
# qimg V ARGS...: qemu-img of QEMU V.
qimg() {
	local v=$1; shift
	if [ "$v" = 10 ]; then qemu10 qemu-img "$@"; else command qemu-img "$@"; fi
}

pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }

# Print the properties we compare, one per line, from qemu-img info JSON.
props() {
	qemu-img info --output=json "$1" | python3 -c '
import json, sys
j = json.load(sys.stdin)
d = j.get("format-specific", {}).get("data", {})
for k in ("format", "virtual-size", "cluster-size", "backing-filename", "backing-filename-format"):
    print(k, j.get(k))
for k in ("compat", "lazy-refcounts", "refcount-bits", "compression-type", "extended-l2", "corrupt"):
    print(k, d.get(k))
'
}

# check_clean IMAGE: every QEMU's qemu-img check exits 0 and reports no
# leaks/errors.
check_clean() {
	local out rc v
	for v in $VERSIONS; do
		out=$(qimg "$v" check --output=json "$1" 2>&1)
		rc=$?
		if [ $rc -ne 0 ]; then
			echo "QEMU $v: $out"
			return 1
		fi
		echo "$out" | python3 -c '
import json, sys
j = json.load(sys.stdin)
bad = {k: j.get(k, 0) for k in ("leaks", "corruptions", "check-errors")}
sys.exit(1 if any(bad.values()) else 0)' || { echo "QEMU $v: $out"; return 1; }
	done
}

# Compare the properties that matter in four info reports and one check
# report: qemu-img on theirs and ours (must agree), qublk info on both
# (must agree with qemu-img), qemu-img check on ours (clean, no leaks).
COMPARE_PY='
import json, sys
q_theirs, q_ours, u_theirs, u_ours, chk = (json.load(open(f)) for f in sys.argv[1:6])
top = ("format", "virtual-size", "cluster-size", "backing-filename", "backing-filename-format")
spec = ("compat", "lazy-refcounts", "refcount-bits", "compression-type", "extended-l2", "corrupt")
def props(j):
    d = j.get("format-specific", {}).get("data", {})
    return {**{k: j.get(k) for k in top}, **{k: d.get(k) for k in spec}}
errs = []
for what, a, b in (("qemu-img info, qemu vs qublk image", q_theirs, q_ours),
                   ("qublk info vs qemu-img info, qemu image", q_theirs, u_theirs),
                   ("qublk info vs qemu-img info, qublk image", q_ours, u_ours)):
    pa, pb = props(a), props(b)
    for k in pa:
        if pa[k] != pb[k]:
            errs.append("%s: %s: %r != %r" % (what, k, pa[k], pb[k]))
for k in ("leaks", "corruptions", "check-errors"):
    if chk.get(k, 0):
        errs.append("qemu-img check: %s=%s" % (k, chk[k]))
print("\n".join(errs))
sys.exit(1 if errs else 0)
'

# compare NAME SIZE [create options...]: both tools, same options, with
# each QEMU version: its qemu-img creates "theirs" and judges both images.
compare() {
	local name=$1 size=$2
	shift 2
	local ours="$T/ours-$name.qcow2" theirs err t0=$SECONDS v
	if ! err=$("$QUBLK" create -f qcow2 "$@" "$ours" ${size:+"$size"} 2>&1); then
		bad "$name: qublk create failed: $err"
		return
	fi
	"$QUBLK" info --output json "$ours" >"$T/u2.json" || { bad "$name: qublk info failed"; return; }
	for v in $VERSIONS; do
		theirs="$T/qemu$v-$name.qcow2"
		if ! err=$(qimg "$v" create -q -f qcow2 "$@" "$theirs" ${size:+"$size"} 2>&1); then
			bad "$name: qemu-img $v create failed: $err"
			return
		fi
		qimg "$v" info --output=json "$theirs" >"$T/q1.json" &&
		qimg "$v" info --output=json "$ours" >"$T/q2.json" &&
		"$QUBLK" info --output json "$theirs" >"$T/u1.json" || { bad "$name: info failed (QEMU $v)"; return; }
		if ! qimg "$v" check --output=json "$ours" >"$T/check.json" 2>&1; then
			bad "$name: qemu-img $v check exit $?: $(cat "$T/check.json")"
			return
		fi
		if ! err=$(python3 -c "$COMPARE_PY" "$T/q1.json" "$T/q2.json" "$T/u1.json" "$T/u2.json" \
				"$T/check.json" 2>&1); then
			bad "$name (QEMU $v): $err"
			return
		fi
		rm -f "$theirs"
	done
	ok
	[ -n "${VERBOSE:-}" ] && echo "ok $name ($((SECONDS - t0))s)"
	rm -f "$ours"
}

# --- matrix: cluster sizes x compat, refcount widths, preallocation ---
for cs in 512 1024 4096 65536 2097152; do
	for compat in 0.10 1.1; do
		compare "cs$cs-$compat" 256M -o cluster_size=$cs,compat=$compat
	done
done
for rb in 1 2 4 8 16 32 64; do
	compare "rb$rb" 1G -o refcount_bits=$rb
	compare "rb$rb-cs512" 64M -o refcount_bits=$rb,cluster_size=512
done
for pre in off metadata falloc full; do
	compare "pre-$pre" 64M -o preallocation=$pre
	compare "pre-$pre-cs512-rb1" 8M -o preallocation=$pre,cluster_size=512,refcount_bits=1
	compare "pre-$pre-v2" 16M -o preallocation=$pre,compat=0.10
	compare "pre-$pre-cs2M" 20M -o preallocation=$pre,cluster_size=2M
done
compare "pre-metadata-cs4k-rb64" 300M -o preallocation=metadata,cluster_size=4096,refcount_bits=64
compare lazy 1G -o lazy_refcounts=on
compare zstd 1G -o compression_type=zstd
compare zstd-lazy-rb8 10G -o compression_type=zstd,lazy_refcounts=on,refcount_bits=8
compare odd-size 1000001
compare zero-size 0
compare big-cs512 30G -o cluster_size=512
compare huge 4T
compare huge-cs4k-rb1 2T -o cluster_size=4096,refcount_bits=1

# --- backing files ---
qemu-img create -q -f qcow2 "$T/base.qcow2" 3G
qemu-img create -q -f raw "$T/base.raw" 5M
compare backing-qcow2 "" -b "$T/base.qcow2" -F qcow2
compare backing-raw 10M -b "$T/base.raw" -F raw
compare backing-v2 "" -b "$T/base.qcow2" -F qcow2 -o compat=0.10
# --- extended L2 (subclusters) ---
compare xl2 1G -o extended_l2=on
compare xl2-cs16k 256M -o extended_l2=on,cluster_size=16k
compare xl2-cs2M-rb1 4G -o extended_l2=on,cluster_size=2M,refcount_bits=1
for pre in metadata falloc full; do
	compare "xl2-pre-$pre" 64M -o extended_l2=on,preallocation=$pre
done
compare xl2-pre-metadata-cs32k 300M -o extended_l2=on,preallocation=metadata,cluster_size=32k
compare xl2-backing "" -b "$T/base.qcow2" -F qcow2 -o extended_l2=on
# QEMU uses what we made: subcluster writes read back, check clean.
"$QUBLK" create -o extended_l2=on,preallocation=metadata "$T/xl2-io.qcow2" 8M &&
	qemu-io -f qcow2 -c 'write -P 7 4k 4k' -c 'write -z 64k 8k' -c 'read -P 7 4k 4k' \
		-c 'read -P 0 0 4k' -c 'read -P 0 8k 1M' "$T/xl2-io.qcow2" >"$T/out" 2>&1 &&
	! grep -qi 'fail\|mismatch' "$T/out" && check_clean "$T/xl2-io.qcow2" >/dev/null &&
	ok || bad "xl2 image used by qemu-io: $(cat "$T/out")"
# Refused as QEMU refuses them: version 2, clusters under 16 KiB.
for o in extended_l2=on,compat=0.10 extended_l2=on,cluster_size=8k; do
	for v in $VERSIONS; do
		qimg "$v" create -q -f qcow2 -o "$o" "$T/xl2-bad.qcow2" 1M >/dev/null 2>&1 &&
			bad "qemu-img $v accepted -o $o" || ok
		rm -f "$T/xl2-bad.qcow2"
	done
	"$QUBLK" create -o "$o" "$T/xl2-bad.qcow2" 1M >"$T/out" 2>&1
	rc=$?
	[ $rc -eq 1 ] && grep -q "Extended L2" "$T/out" && [ ! -e "$T/xl2-bad.qcow2" ] && ok ||
		bad "-o $o: rc=$rc $(cat "$T/out")"
done

(cd "$T" && "$QUBLK" create -b base.qcow2 -F qcow2 rel.qcow2) || bad "relative backing create"
p=$(props "$T/rel.qcow2")
if echo "$p" | grep -q "^backing-filename-format qcow2$" &&
   echo "$p" | grep -q "^virtual-size 3221225472$" &&
   echo "$p" | grep -q "^backing-filename base.qcow2$"; then ok
else bad "probed backing format/size: $p"; fi
# -b without -F is refused, as QEMU (7.2 and 10) refuse it, naming -F.
for v in $VERSIONS; do
	qimg "$v" create -q -f qcow2 -b base.raw "$T/rel-raw.qcow2" >/dev/null 2>&1 &&
		bad "qemu-img $v accepted -b without -F" || ok
done
rm -f "$T/rel-raw.qcow2"
(cd "$T" && "$QUBLK" create -b base.raw rel-raw.qcow2) >"$T/out" 2>&1
rc=$?
if [ $rc -eq 1 ] && grep -q -- "-F" "$T/out" && grep -q "backing format" "$T/out" &&
   [ ! -e "$T/rel-raw.qcow2" ]; then ok; else bad "-b without -F: rc=$rc $(cat "$T/out")"; fi
check_clean "$T/rel.qcow2" >/dev/null && ok || bad "check of image with backing"
# chain: rel.qcow2 -> base.qcow2, shown with --backing-chain, loops refused
out=$("$QUBLK" info --backing-chain --output json "$T/rel.qcow2")
if echo "$out" | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert len(j) == 2 and j[1]["virtual-size"] == 3221225472, j'; then ok; else bad "backing chain json: $out"; fi
out=$("$QUBLK" info --backing-chain "$T/rel.qcow2")
echo "$out" | grep -q "^image: .*base.qcow2$" && ok || bad "backing chain text"
qemu-img create -q -f qcow2 -u -b loop2.qcow2 -F qcow2 "$T/loop1.qcow2" 1M
qemu-img create -q -f qcow2 -u -b loop1.qcow2 -F qcow2 "$T/loop2.qcow2" 1M
"$QUBLK" info --backing-chain "$T/loop1.qcow2" >/dev/null 2>"$T/err"
rc=$?
if [ $rc -eq 1 ] && grep -q loop "$T/err"; then ok; else bad "loop: rc=$rc $(cat "$T/err")"; fi

# --- raw ---
for pre in off falloc full; do
	"$QUBLK" create -f raw -o preallocation=$pre "$T/r-$pre.raw" 3M || bad "raw $pre"
	[ "$(stat -c %s "$T/r-$pre.raw")" = 3145728 ] && ok || bad "raw $pre size"
done
[ "$(stat -c %b "$T/r-full.raw")" -gt 0 ] && ok || bad "raw full is not allocated"
"$QUBLK" info --output json "$T/r-off.raw" | python3 -m json.tool >/dev/null && ok || bad "raw info json"

# --- refused options, usage errors ---
expect_rc() {   # expect_rc RC DESCRIPTION cmd...
	local want=$1 what=$2 rc
	shift 2
	"$@" >"$T/out" 2>&1
	rc=$?
	if [ $rc -eq "$want" ]; then ok; else bad "$what: exit $rc, wanted $want: $(cat "$T/out")"; fi
}
expect_rc 1 "extended_l2 at 4 KiB" "$QUBLK" create -o extended_l2=on,cluster_size=4k "$T/x.qcow2" 1G
expect_rc 1 "v2 refcount_bits=8" "$QUBLK" create -o compat=0.10,refcount_bits=8 "$T/x.qcow2" 1G
expect_rc 1 "v2 lazy" "$QUBLK" create -o compat=0.10,lazy_refcounts=on "$T/x.qcow2" 1G
expect_rc 1 "v2 zstd" "$QUBLK" create -o compat=0.10,compression_type=zstd "$T/x.qcow2" 1G
expect_rc 1 "too big for 512 clusters" "$QUBLK" create -o cluster_size=512 "$T/x.qcow2" 4T
grep -q "x.qcow2: .*too large" "$T/out" && ok || bad "too-big message: $(cat "$T/out")"
expect_rc 2 "unknown -o key" "$QUBLK" create -o bogus=1 "$T/x.qcow2" 1G
expect_rc 2 "unknown flag" "$QUBLK" create --bogus "$T/x.qcow2" 1G
expect_rc 2 "bad size" "$QUBLK" create "$T/x.qcow2" 12Q
expect_rc 1 "bad cluster size" "$QUBLK" create -o cluster_size=3000 "$T/x.qcow2" 1G
expect_rc 1 "missing backing" "$QUBLK" create -b "$T/nonexistent" -F raw "$T/x.qcow2"
expect_rc 0 "create --help" "$QUBLK" create --help
expect_rc 0 "info --help" "$QUBLK" info --help
expect_rc 2 "info bad output" "$QUBLK" info --output xml "$T/rel.qcow2"

# --- small clusters with a backing file: QEMU leaves the feature name table
# out of cluster 0 at 4 KiB and less, so the backing name fits ---
qemu-img create -q -f raw "$T/base8.raw" 8M
for cs in 512 4096 8192; do
	compare "backing-raw-cs$cs" 8M -o cluster_size=$cs -b "$T/base8.raw" -F raw
	compare "backing-raw-cs$cs-v2" 8M -o cluster_size=$cs,compat=0.10 -b "$T/base8.raw" -F raw
done
exts() {   # exts FILE: the header extension types of a v3 image, in order
	python3 -c '
import struct, sys
d = open(sys.argv[1], "rb").read(65536)
o = struct.unpack(">I", d[100:104])[0]
while True:
    t, n = struct.unpack(">II", d[o:o + 8])
    if t == 0:
        break
    print("%08x" % t)
    o += 8 + (n + 7) // 8 * 8' "$1"
}
for cs in 512 4096 8192 65536; do
	"$QUBLK" create -o cluster_size=$cs -b base8.raw -F raw "$T/ext-ours.qcow2" 8M
	for v in $VERSIONS; do
		rm -f "$T/ext-theirs.qcow2"
		qimg "$v" create -q -f qcow2 -o cluster_size=$cs -b base8.raw -F raw \
			"$T/ext-theirs.qcow2" 8M
		[ "$(exts "$T/ext-ours.qcow2")" = "$(exts "$T/ext-theirs.qcow2")" ] && ok ||
			bad "cs $cs: extensions $(exts "$T/ext-ours.qcow2" | tr '\n' ' ') vs QEMU $v's $(exts "$T/ext-theirs.qcow2" | tr '\n' ' ')"
	done
done

# --- a create that fails leaves nothing behind; an image in use is not replaced ---
leftovers() { find "$T" -maxdepth 1 -name '.*qublk-*' | wc -l; }
# A file size limit makes the writes fail (EFBIG) part way through.
(trap '' XFSZ; ulimit -f 1024; "$QUBLK" create -o preallocation=full "$T/full.qcow2" 8M) \
	>"$T/out" 2>&1
rc=$?
if [ $rc -eq 1 ] && [ ! -e "$T/full.qcow2" ] && [ "$(leftovers)" = 0 ]; then ok
else bad "failed create: rc=$rc, left $(leftovers) temporary files: $(cat "$T/out")"; fi
(trap '' XFSZ; ulimit -f 1024; "$QUBLK" create -f raw -o preallocation=full "$T/full.raw" 8M) \
	>"$T/out" 2>&1
rc=$?
[ $rc -eq 1 ] && [ ! -e "$T/full.raw" ] && [ "$(leftovers)" = 0 ] && ok ||
	bad "failed raw create: rc=$rc: $(cat "$T/out")"
# An existing image survives a failed create unchanged.
"$QUBLK" create "$T/keep.qcow2" 1M
sum=$(md5sum <"$T/keep.qcow2")
(trap '' XFSZ; ulimit -f 1024; "$QUBLK" create -o preallocation=full "$T/keep.qcow2" 8M) \
	>/dev/null 2>&1
[ "$(md5sum <"$T/keep.qcow2")" = "$sum" ] && [ "$(leftovers)" = 0 ] && ok ||
	bad "a failed create changed the existing image"
# Replacing an unused image keeps its mode; through a symlink, the target is replaced.
chmod 600 "$T/keep.qcow2"
ln -s keep.qcow2 "$T/link.qcow2"
"$QUBLK" create "$T/link.qcow2" 2M || bad "create over a symlink"
[ -L "$T/link.qcow2" ] && [ "$(stat -c %a "$T/keep.qcow2")" = 600 ] &&
	[ "$(qemu-img info --output=json "$T/keep.qcow2" | python3 -c \
	'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = 2097152 ] && ok ||
	bad "create over a symlink: $(ls -l "$T/link.qcow2" "$T/keep.qcow2")"
# In use by each QEMU's qemu-io (reader and writer): refused, untouched.
sum=$(md5sum <"$T/keep.qcow2")
for v in $VERSIONS; do
	for mode in -r ""; do
		if [ "$v" = 10 ]; then io=("$QEMU10_BIN/qemu-io"); else io=(qemu-io); fi
		# shellcheck disable=SC2086  # $mode: empty or one flag
		"${io[@]}" $mode -f qcow2 -c 'sleep 20000' "$T/keep.qcow2" >/dev/null 2>&1 &
		pid=$!
		for _ in $(seq 100); do
			grep -q "$(stat -c %i "$T/keep.qcow2")" /proc/locks && break
			sleep 0.1
		done
		for fmt in qcow2 raw; do
			"$QUBLK" create -f $fmt "$T/keep.qcow2" 4M >"$T/out" 2>&1
			rc=$?
			[ $rc -eq 1 ] && grep -q "lock" "$T/out" && grep -q "in use" "$T/out" &&
				[ "$(md5sum <"$T/keep.qcow2")" = "$sum" ] && [ "$(leftovers)" = 0 ] && ok ||
				bad "create -f $fmt over an image qemu-io $v $mode holds: rc=$rc $(cat "$T/out")"
		done
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
done

# --- snapshots made by qemu-img ---
qemu-img create -q -f qcow2 "$T/snap.qcow2" 64M
qemu-img snapshot -c first "$T/snap.qcow2"
qemu-img snapshot -c "second one" "$T/snap.qcow2"
if "$QUBLK" info --output json "$T/snap.qcow2" | python3 -c '
import json, sys
j = json.load(sys.stdin)
names = [s["name"] for s in j["snapshots"]]
assert names == ["first", "second one"], names
assert [s["id"] for s in j["snapshots"]] == ["1", "2"]'; then ok; else bad "snapshots in json"; fi
out=$("$QUBLK" info "$T/snap.qcow2")
echo "$out" | grep -q "second one" && ok || bad "snapshots in text"
# ours with a snapshot taken by qemu-img
"$QUBLK" create -o compat=0.10 "$T/snap2.qcow2" 16M
qemu-img snapshot -c s "$T/snap2.qcow2"
out=$("$QUBLK" info --output json "$T/snap2.qcow2" | python3 -m json.tool)
echo "$out" | grep -q '"name": "s"' && ok || bad "snapshot on v2 image"

# --- malformed images: exit 1 with a message, never a crash ---
patch() {   # patch FILE OFFSET HEXBYTES
	python3 -c '
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    f.write(bytes.fromhex(sys.argv[3]))' "$@"
}
bad_image() {   # bad_image NAME EXPECTED-MESSAGE-REGEX
	local rc
	"$QUBLK" info "$T/$1" >/dev/null 2>"$T/err"
	rc=$?
	if [ $rc -eq 1 ] && grep -Eq "$2" "$T/err" && ! grep -Eq "Sanitizer|runtime error" "$T/err"; then
		ok
	else
		bad "bad image $1: exit $rc, message: $(cat "$T/err")"
	fi
	"$QUBLK" info --output json "$T/$1" >/dev/null 2>&1
	rc=$?
	[ $rc -lt 128 ] && ok || bad "bad image $1 (json): crashed with $rc"
}
mk() { qemu-img create -q -f qcow2 "$T/$1" 1G; }
mk unk-incompat.qcow2; patch "$T/unk-incompat.qcow2" 78 04          # incompat bit 10
bad_image unk-incompat.qcow2 "unsupported .*feature.*bit 10"
mk l1-unaligned.qcow2; patch "$T/l1-unaligned.qcow2" 40 0000000000030200
bad_image l1-unaligned.qcow2 "l1_table.*not cluster aligned"
mk l1-beyond.qcow2; patch "$T/l1-beyond.qcow2" 40 0000100000000000
bad_image l1-beyond.qcow2 "l1_table.*beyond the end"
mk l1-huge.qcow2; patch "$T/l1-huge.qcow2" 36 7fffffff
bad_image l1-huge.qcow2 "l1_size .*exceeds"
mk l1-small.qcow2; patch "$T/l1-small.qcow2" 36 00000001
bad_image l1-small.qcow2 "l1_size .*too small"
mk rt-beyond.qcow2; patch "$T/rt-beyond.qcow2" 48 ffffffffffff0000
bad_image rt-beyond.qcow2 "refcount_table.*beyond the end"
mk rt-huge.qcow2; patch "$T/rt-huge.qcow2" 56 00100000
bad_image rt-huge.qcow2 "refcount table too large"
mk snap-bad.qcow2; patch "$T/snap-bad.qcow2" 60 0000000500000000deadbe00
bad_image snap-bad.qcow2 "snapshot table.*not cluster aligned"
mk cbits.qcow2; patch "$T/cbits.qcow2" 20 0000001f
bad_image cbits.qcow2 "cluster_bits 31"
mk version.qcow2; patch "$T/version.qcow2" 4 00000007
bad_image version.qcow2 "version 7"
mk crypt.qcow2; patch "$T/crypt.qcow2" 32 00000003
bad_image crypt.qcow2 "unknown encryption method 3"
mk hlen.qcow2; patch "$T/hlen.qcow2" 100 00000069
bad_image hlen.qcow2 "header_length"
mk rorder.qcow2; patch "$T/rorder.qcow2" 96 00000007
bad_image rorder.qcow2 "refcount_order"
mk ctype.qcow2; patch "$T/ctype.qcow2" 104 01
bad_image ctype.qcow2 "compression type"
mk extlen.qcow2; patch "$T/extlen.qcow2" 116 00100000               # feature table length 1M
bad_image extlen.qcow2 "extension .*exceeds"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$T/bname.qcow2"
patch "$T/bname.qcow2" 16 00000800                                   # 2048-byte name
bad_image bname.qcow2 "backing file name length"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$T/boff.qcow2"
patch "$T/boff.qcow2" 8 000000000000fffe
bad_image boff.qcow2 "backing file name .*outside cluster 0"
mk trunc.qcow2; truncate -s 100000 "$T/trunc.qcow2"
bad_image trunc.qcow2 "beyond the end of the file"
mk short.qcow2; truncate -s 50 "$T/short.qcow2"
bad_image short.qcow2 "too short"
qemu-img create -q -f qcow2 "$T/snaptrunc.qcow2" 1M
qemu-img snapshot -c s "$T/snaptrunc.qcow2"
off=$(python3 -c 'import struct,sys; print(struct.unpack(">Q", open(sys.argv[1],"rb").read()[64:72])[0])' "$T/snaptrunc.qcow2")
patch "$T/snaptrunc.qcow2" $((off + 12)) ffff                        # id length 65535
bad_image snaptrunc.qcow2 "snapshot 0: entry extends"
# qublk's images must also carry a well-formed header for qemu-img
"$QUBLK" create -o lazy_refcounts=on "$T/lazy.qcow2" 1G
out=$("$QUBLK" info "$T/lazy.qcow2")
echo "$out" | grep -q "lazy refcounts: true" && ok || bad "lazy in text info"
expect_rc 1 "nonexistent file" "$QUBLK" info "$T/nope.qcow2"

# --- encrypted images: described as qemu-img info describes them (the
# LUKS header's cipher, slots and offsets; the payload is never opened);
# refused by nbd and add with a message that says why ---
for v in $VERSIONS; do
	# QEMU times its PBKDF at create and fails ("Unable to get accurate
	# CPU usage") when its thread's CPU clock did not advance over the
	# first timing (tick accounting, a loaded machine): ten tries.
	for _try in 1 2 3 4 5 6 7 8 9 10; do
		qimg "$v" create -q -f qcow2 -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
			--object secret,id=sec0,data=abc "$T/luks$v.qcow2" 16M && break
		rm -f "$T/luks$v.qcow2"
	done
	[ -f "$T/luks$v.qcow2" ] || { bad "qemu-img $v create luks"; continue; }
	qimg "$v" info --output=json "$T/luks$v.qcow2" >"$T/q.json"
	"$QUBLK" info --output json "$T/luks$v.qcow2" >"$T/u.json" || { bad "qublk info luks ($v)"; continue; }
	python3 -c '
import json, sys
q, u = (json.load(open(f)) for f in sys.argv[1:3])
qe = q["format-specific"]["data"]["encrypt"]
ue = u["format-specific"]["data"].get("encrypt", {})
bad = [k for k in qe if qe[k] != ue.get(k)]
assert qe["format"] == "luks" and len(qe["slots"]) == 8, qe
assert not bad and u.get("encrypted") is True, (bad, qe, ue)
' "$T/q.json" "$T/u.json" && ok || bad "LUKS info differs from QEMU $v's: $(cat "$T/u.json")"
	"$QUBLK" info "$T/luks$v.qcow2" >"$T/out" 2>&1
	grep -q "^encrypted: yes" "$T/out" && grep -q "format: luks" "$T/out" &&
		grep -q "cipher alg: aes-256" "$T/out" && ok || bad "LUKS text info: $(cat "$T/out")"
done
for _try in 1 2 3 4 5 6 7 8 9 10; do
	qemu-img create -q -f qcow2 -o encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256 \
		--object secret,id=s,data=x "$T/luks-cbc.qcow2" 4M && break
	rm -f "$T/luks-cbc.qcow2"
done
qemu-img info --output=json "$T/luks-cbc.qcow2" >"$T/q.json"
"$QUBLK" info --output json "$T/luks-cbc.qcow2" >"$T/u.json"
python3 -c '
import json, sys
q, u = (json.load(open(f)) for f in sys.argv[1:3])
qe = q["format-specific"]["data"]["encrypt"]
ue = u["format-specific"]["data"]["encrypt"]
assert qe["cipher-mode"] == "cbc" and qe["ivgen-hash-alg"] == "sha256", qe
assert all(qe[k] == ue.get(k) for k in qe), (qe, ue)
' "$T/q.json" "$T/u.json" && ok || bad "LUKS cbc-essiv info: $(cat "$T/u.json")"
# the legacy AES method (crypt_method 1): no header to show, as QEMU
mk aes.qcow2; patch "$T/aes.qcow2" 32 00000001
"$QUBLK" info --output json "$T/aes.qcow2" | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["encrypted"] is True and j["format-specific"]["data"]["encrypt"] == {"format": "aes"}, j
' && ok || bad "legacy AES info"
for img in luks-cbc.qcow2 aes.qcow2; do
	timeout 20 "$QUBLK" nbd --socket "$T/nbd.sock" "$T/$img" >"$T/out" 2>&1
	rc=$?
	[ $rc -eq 1 ] && grep -q "encrypted" "$T/out" && grep -q "cannot read or serve" "$T/out" && ok ||
		bad "nbd on encrypted $img: rc=$rc $(cat "$T/out")"
	timeout 20 "$QUBLK" add "$T/$img" >"$T/out" 2>&1
	rc=$?
	# Without ublk_drv, add fails on /dev/ublk-control before it opens
	# the image (the engine's refusal is the one nbd shows above).
	if [ -e /dev/ublk-control ]; then want=encrypted; else want=ublk-control; fi
	[ $rc -eq 1 ] && grep -q "$want" "$T/out" && ok || bad "add on encrypted $img: rc=$rc $(cat "$T/out")"
done

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
