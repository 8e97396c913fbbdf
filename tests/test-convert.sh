#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk convert against QEMU:
#   1. Every kind of source QEMU writes (qcow2 v2 and v3 at 512 B, 64 KiB
#      and 2 MiB clusters with data, zero clusters, discards, zeros
#      written as data and zlib/zstd compressed clusters; extended L2
#      over a backing file; a qcow2 -> qcow2 -> short raw chain; raw files
#      with holes) converted to raw and to qcow2 (and with qcow2 output
#      options: cluster sizes, v2, refcount widths, lazy refcounts,
#      metadata preallocation, extended L2): `qemu-img compare` finds the output equal
#      to the source, `qemu-img check` clean, and its allocated size (du)
#      is within 5% (plus 64 KiB for tiny images) of what `qemu-img
#      convert` allocates for the same job.
#      Compressed (-c, zlib and zstd, 512 B to 2 MiB clusters, v2): the
#      same, and the same clusters compressed as by `qemu-img convert -c`
#      (those that shrink); QEMU's -c output converted back by qublk
#      equals the source.
#      -B BACKING (v2, v3, compressed; BACKING the source's own backing
#      file, a deeper one, or one unrelated to it): the output names
#      BACKING, reads equal to the source (`qemu-img compare`), checks
#      clean and allocates no more than `qemu-img convert -B`; what the
#      source and BACKING take from the same file is not read.
#   2. The destination: an existing one is replaced, one in use (qemu-io
#      holds it, or it is the source itself) is refused and left as it
#      was; a convert that fails (unreadable source, SIGINT) leaves no
#      destination and no temporary file; -p prints progress on a
#      terminal only; usage errors exit 2.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
QUBLK=$(realpath "$QUBLK")
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=99"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=98:halt_on_error=1"

S=$TMPD/src O=$TMPD/out
mkdir -p "$S" "$O"
K=1024

alloc() { du -B1 "$1" | cut -f1; }

# near A B WHAT: allocated sizes A (ours) and B (QEMU's) within 5% + 64 KiB.
near() {
    local a=$1 b=$2
    [ $((a > b ? a - b : b - a)) -le $((b / 20 + 64 * K)) ] \
        || fail "$3: qublk allocated $a bytes, qemu-img $b"
}

# ---- the sources ----
# qemu-io script shared by the one-layer qcow2 sources (64 MiB).
LAYOUT='write -P 1 0 3M
write -z 4M 2M
write -P 2 8M 4M
write -z 9M 1M
discard 11M 1M
write -P 0 14M 2M
write -c -P 3 16M 2M
write -c -P 0 20M 2M
write -P 4 30M 100k
write -P 5 63M 1M
write -z -u 40M 4M'
src_qcow2() {   # NAME CREATE-OPTIONS
    mkimg -f qcow2 -o "$2" "$S/$1.qcow2" 64M
    qemu-io -f qcow2 "$S/$1.qcow2" <<<"$LAYOUT" >/dev/null || fail "qemu-io on $1"
}
src_qcow2 v3-64k cluster_size=64k
src_qcow2 v2-64k cluster_size=64k,compat=0.10
src_qcow2 v3-512 cluster_size=512
src_qcow2 v3-2M cluster_size=2M
src_qcow2 zstd cluster_size=64k,compression_type=zstd

# extended L2 over a qcow2 backing file.
mkimg -f qcow2 "$S/xl2-base.qcow2" 16M
qemu-io -f qcow2 -c 'write -P 7 0 8M' "$S/xl2-base.qcow2" >/dev/null || fail "qemu-io xl2-base"
mkimg -f qcow2 -o cluster_size=64k,extended_l2=on -b xl2-base.qcow2 -F qcow2 "$S/xl2.qcow2"
qemu-io -f qcow2 "$S/xl2.qcow2" >/dev/null <<'EOF' || fail "qemu-io xl2"
write -P 8 4k 8k
write -z 64k 6k
write -z 4M 64k
write -P 9 9M 2k
discard 9M 2k
write -P 10 12M 40k
EOF

# A qcow2 -> qcow2 -> short raw chain.
truncate -s 24M "$S/base.raw"
qemu-io -f raw "$S/base.raw" -c 'write -P 7 0 2M' -c 'write -P 8 12M 64k' \
    -c 'write -P 0 20M 1M' >/dev/null || fail "qemu-io base.raw"
mkimg -f qcow2 -b base.raw -F raw "$S/mid.qcow2" 48M
qemu-io -f qcow2 "$S/mid.qcow2" -c 'write -P 9 1M 2M' -c 'write -z 12M 64k' \
    -c 'write -P 10 30M 1M' -c 'write -c -P 11 32M 64k' >/dev/null || fail "qemu-io mid"
mkimg -f qcow2 -b mid.qcow2 -F qcow2 "$S/top.qcow2" 64M
qemu-io -f qcow2 "$S/top.qcow2" -c 'write -P 11 1536k 64k' -c 'write -z 30M 512k' \
    -c 'write -P 12 50M 1M' >/dev/null || fail "qemu-io top"

# Raw: random, text-like and zero data, and holes (size not a multiple of 4 KiB).
"$PYTHON" - "$S/mixed.raw" <<'PYEOF'
import os, random, sys
r = random.Random(7)
words = [b"qcow2", b"cluster", b"refcount", b"the", b"of", b"ublk", b"io_uring", b"\n"]
with open(sys.argv[1], "wb") as f:
    for i in range(24):
        kind = i % 4
        if kind == 0:
            f.write(os.urandom(512 * 1024))
        elif kind == 1:
            f.write(b" ".join(r.choice(words) for _ in range(100000))[:512 * 1024])
        elif kind == 2:
            f.write(bytes(512 * 1024))          # zeros written as data
        else:
            f.seek(512 * 1024, 1)               # a hole
    f.write(b"tail")
    f.truncate(f.tell() + 3 * 512)
PYEOF

SOURCES="v3-64k.qcow2 v2-64k.qcow2 v3-512.qcow2 v3-2M.qcow2 zstd.qcow2 xl2.qcow2 top.qcow2 mid.qcow2 base.raw mixed.raw"

# ---- 1. every source to raw ----
# (Requests spread over 1, 2 or 3 threads, 1 to 16 of them in flight.)
i=0
for s in $SOURCES; do
    i=$((i + 1))
    FAIL_CONTEXT="convert -O raw --threads $((i % 3 + 1)) -m $((i * 3 % 16 + 1)) $s"
    "$QUBLK" convert -O raw --threads $((i % 3 + 1)) -m $((i * 3 % 16 + 1)) "$S/$s" "$O/u.raw" \
        || fail "qublk convert -O raw $s"
    qemu-img convert -O raw "$S/$s" "$O/ref-$s.raw" || fail "qemu-img convert -O raw $s"
    qcompare "$S/$s" "$O/u.raw"
    near "$(alloc "$O/u.raw")" "$(alloc "$O/ref-$s.raw")" "$s to raw"
    echo "  raw ok: $s ($(alloc "$O/u.raw") bytes allocated, qemu-img $(alloc "$O/ref-$s.raw"))"
done

# ---- every source to qcow2, and qcow2 output options ----
# to_qcow2 SRC OPTIONS: convert with both tools, compare, check, sizes.
to_qcow2() {
    local s=$1 opts=$2
    FAIL_CONTEXT="convert -O qcow2 -o $opts $s"
    "$QUBLK" convert -O qcow2 -o "$opts" "$S/$s" "$O/u.qcow2" || fail "qublk convert"
    qemu-img convert -O qcow2 -o "$opts" "$S/$s" "$O/q.qcow2" || fail "qemu-img convert"
    qcompare "$S/$s" "$O/u.qcow2"
    qcheck "$O/u.qcow2"
    near "$(alloc "$O/u.qcow2")" "$(alloc "$O/q.qcow2")" "$s to qcow2 ($opts)"
    echo "  qcow2 ok: $s -o $opts ($(alloc "$O/u.qcow2") bytes allocated, qemu-img $(alloc "$O/q.qcow2"))"
}
for s in $SOURCES; do
    to_qcow2 "$s" cluster_size=64k
done
to_qcow2 v3-64k.qcow2 cluster_size=512,refcount_bits=1
to_qcow2 top.qcow2 cluster_size=2M,lazy_refcounts=on
to_qcow2 mixed.raw compat=0.10,cluster_size=4k
to_qcow2 v3-2M.qcow2 cluster_size=4k,refcount_bits=64
to_qcow2 xl2.qcow2 preallocation=metadata
to_qcow2 mixed.raw extended_l2=on
to_qcow2 top.qcow2 extended_l2=on,cluster_size=32k
# The created image's properties are what -o asked for.
"$QUBLK" convert -O qcow2 -o compat=0.10,cluster_size=128k "$S/v3-64k.qcow2" "$O/u.qcow2" \
    || fail "convert -o compat=0.10"
qemu-img info "$O/u.qcow2" | grep -q 'compat: 0.10' || fail "-o compat=0.10 not applied"
qemu-img info "$O/u.qcow2" | grep -q 'cluster_size: 131072' || fail "-o cluster_size not applied"
"$QUBLK" convert -O raw -o preallocation=falloc "$S/top.qcow2" "$O/u.raw" || fail "convert -O raw -o prealloc"
qcompare "$S/top.qcow2" "$O/u.raw"
[ "$(alloc "$O/u.raw")" -ge $((64 * 1024 * K)) ] || fail "preallocation=falloc: not allocated"

# ---- compressed output ----
# compressed-clusters as qemu-img check counts them.
ncompressed() {
    qemu-img check --output=json "$1" \
        | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin).get("compressed-clusters", 0))'
}
# to_compressed SRC OPTIONS: qublk convert -c is read by QEMU equal to the
# source, checks clean, compresses the same clusters as qemu-img convert
# -c (the ones that shrink) into about as much space; QEMU's convert -c
# is read by qublk (convert to raw) equal to the source.
to_compressed() {
    local s=$1 opts=$2 nu nq
    FAIL_CONTEXT="convert -c -O qcow2 -o $opts $s"
    "$QUBLK" convert -c -O qcow2 --threads 3 -o "$opts" "$S/$s" "$O/u.qcow2" || fail "qublk convert -c"
    qemu-img convert -c -O qcow2 -o "$opts" "$S/$s" "$O/q.qcow2" || fail "qemu-img convert -c"
    qcompare "$S/$s" "$O/u.qcow2"
    qcheck "$O/u.qcow2"
    nu=$(ncompressed "$O/u.qcow2") nq=$(ncompressed "$O/q.qcow2")
    [ "$nu" = "$nq" ] || fail "$nu clusters compressed, qemu-img compressed $nq"
    [ "$nu" -gt 0 ] || fail "nothing compressed"
    near "$(alloc "$O/u.qcow2")" "$(alloc "$O/q.qcow2")" "$s to qcow2 -c ($opts)"
    # (The reference: qemu-img convert -O raw of the source, from part 1.)
    "$QUBLK" convert -O raw "$O/q.qcow2" "$O/u.raw" || fail "qublk convert of qemu-img's -c output"
    cmp -n "$(stat -c %s "$O/ref-$s.raw")" "$O/ref-$s.raw" "$O/u.raw" \
        || fail "qemu-img's convert -c output read by qublk differs from the source"
    echo "  -c ok: $s -o $opts ($nu compressed clusters; $(alloc "$O/u.qcow2") bytes allocated, qemu-img $(alloc "$O/q.qcow2"))"
}
to_compressed mixed.raw compression_type=zlib
to_compressed mixed.raw compression_type=zstd
to_compressed v3-64k.qcow2 compression_type=zstd
to_compressed zstd.qcow2 compat=0.10
to_compressed top.qcow2 compression_type=zlib,cluster_size=4k
to_compressed v3-512.qcow2 cluster_size=512
to_compressed mixed.raw cluster_size=2M,compression_type=zstd
to_compressed v3-64k.qcow2 extended_l2=on

# ---- -B: a new backing file ----
# backed SRC BACKING OPTIONS: qublk's output with BACKING reads as SRC,
# checks clean, and allocates no more than qemu-img convert -B (QEMU
# writes what the source has above its own backing file and assumes the
# new one reads the same; qublk writes only what differs from BACKING),
# or where QEMU's output is then not a copy of the source, no more than a
# copy without a backing file.
backed() {
    local s=$1 bk=$2 opts=$3
    FAIL_CONTEXT="convert -O qcow2 -B $bk -o $opts $s"
    "$QUBLK" convert -O qcow2 -B "$bk" -F "$(img_format "$S/$bk")" -o "$opts" "$S/$s" "$S/new.qcow2" \
        || fail "qublk convert -B"
    [ "$(qemu-img info --output=json "$S/new.qcow2" | "$PYTHON" -c \
        'import json,sys; print(json.load(sys.stdin)["backing-filename"])')" = "$bk" ] \
        || fail "backing file not $bk"
    qcompare "$S/$s" "$S/new.qcow2"
    qcheck "$S/new.qcow2"
    qemu-img convert -O qcow2 -B "$bk" -F "$(img_format "$S/$bk")" -o "$opts" "$S/$s" "$S/qnew.qcow2" \
        || fail "qemu-img convert -B"
    local u q note=""
    u=$(alloc "$S/new.qcow2") q=$(alloc "$S/qnew.qcow2")
    if ! qemu-img compare "$S/$s" "$S/qnew.qcow2" >/dev/null 2>&1; then
        # QEMU's is not a copy: bound ours by a copy without a backing file.
        note=", QEMU's output differs from the source"
        qemu-img convert -O qcow2 -o "$opts" "$S/$s" "$S/qnew.qcow2" || fail "qemu-img convert"
        q=$(alloc "$S/qnew.qcow2")
    fi
    [ "$u" -le $((q + q / 20 + 64 * K)) ] || fail "-B: qublk allocated $u bytes, qemu-img $q$note"
    echo "  -B ok: $s -B $bk -o $opts ($u bytes allocated, qemu-img $q$note)"
}
# Rebasing onto the source's own backing file (or its backing's).
backed top.qcow2 mid.qcow2 compat=1.1
backed top.qcow2 mid.qcow2 compat=0.10
backed top.qcow2 base.raw compression_type=zstd
# Onto a backing file that is not the source's: still equal (QEMU's is not).
backed top.qcow2 v3-64k.qcow2 cluster_size=4k
backed v3-64k.qcow2 zstd.qcow2 compat=1.1
backed mixed.raw base.raw cluster_size=64k
# Compressed, over a backing file.
"$QUBLK" convert -c -O qcow2 -B mid.qcow2 -F qcow2 "$S/top.qcow2" "$S/new.qcow2" || fail "convert -c -B"
qcompare "$S/top.qcow2" "$S/new.qcow2"
qcheck "$S/new.qcow2"
[ "$(ncompressed "$S/new.qcow2")" -gt 0 ] || fail "convert -c -B compressed nothing"
# What both chains take from the same file is not read: a backing file
# whose compressed cluster is damaged (block status fine, reads EIO)
# converts with -B itself, but not without.
mkimg -f qcow2 "$S/cb.qcow2" 4M
qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -c -P 2 1M 64k' "$S/cb.qcow2" >/dev/null || fail "qemu-io cb"
"$PYTHON" - "$S/cb.qcow2" <<'PYEOF'
import os, sys
size = os.path.getsize(sys.argv[1])
start = (size - 1) // 65536 * 65536     # the compressed data, at the end
with open(sys.argv[1], "r+b") as f:
    f.seek(start)
    f.write(b"\xff" * (size - start))
PYEOF
mkimg -f qcow2 -b cb.qcow2 -F qcow2 "$S/ct.qcow2"
qemu-io -f qcow2 -c 'write -P 3 2M 64k' "$S/ct.qcow2" >/dev/null || fail "qemu-io ct"
! "$QUBLK" convert "$S/ct.qcow2" "$O/ct.raw" 2>/dev/null || fail "the damaged cluster reads"
"$QUBLK" convert -O qcow2 -B cb.qcow2 -F qcow2 "$S/ct.qcow2" "$S/new.qcow2" || fail "convert -B read the shared backing"
qemu-io -f qcow2 -c 'read -P 3 2M 64k' -c 'read -P 1 0 1M' -c 'read -P 0 3M 1M' "$S/new.qcow2" \
    >"$TMPD/io.out" || fail "convert -B: wrong data"
! grep -q -i 'fail\|mismatch' "$TMPD/io.out" || fail "convert -B: $(cat "$TMPD/io.out")"
[ "$(qemu-img map --output=json "$S/new.qcow2" | grep -c '"depth": 0')" = 1 ] \
    || fail "convert -B wrote more than the source's own cluster"
FAIL_CONTEXT=

# ---- 2. the destination ----
leftovers() {   # no temporary files in the output directory
    local t
    t=$(find "$O" -name '.*qublk-*')
    [ -z "$t" ] || fail "temporary files left behind: $t"
}
# An existing destination is replaced.
"$QUBLK" convert "$S/v3-64k.qcow2" "$O/u.raw" || fail "convert over an existing file"
qcompare "$S/v3-64k.qcow2" "$O/u.raw"
# In use by qemu-io: refused, left as it was.
cp "$S/v3-64k.qcow2" "$O/held.qcow2"
sum0=$(md5sum <"$O/held.qcow2")
# (It holds it until killed: a timed sleep could end first on a loaded machine.)
qemu-io -f qcow2 "$O/held.qcow2" -c 'sleep 600000' >/dev/null 2>&1 &
holder=$!
# Ready once it holds the write permission's lock byte (101).
wait_lock_byte "$holder" "$O/held.qcow2" 101 || fail "qemu-io never took $O/held.qcow2"
rc=0
"$QUBLK" convert "$S/top.qcow2" "$O/held.qcow2" 2>"$TMPD/err" || rc=$?
kill "$holder"
wait "$holder" 2>/dev/null || true
[ "$rc" = 1 ] || fail "convert onto an image qemu-io holds: exit $rc, want 1"
grep -q 'Failed to get .*"write" lock' "$TMPD/err" || fail "no lock message: $(cat "$TMPD/err")"
[ "$(md5sum <"$O/held.qcow2")" = "$sum0" ] || fail "the image in use was changed"
leftovers
# Onto its own source: refused.
cp "$S/v3-64k.qcow2" "$O/self.qcow2"
sum0=$(md5sum <"$O/self.qcow2")
rc=0
"$QUBLK" convert "$O/self.qcow2" "$O/self.qcow2" 2>"$TMPD/err" || rc=$?
[ "$rc" = 1 ] || fail "convert onto its own source: exit $rc, want 1"
[ "$(md5sum <"$O/self.qcow2")" = "$sum0" ] || fail "the source was changed"
leftovers
# A source that cannot be read to the end: no destination, no temporary.
mkimg -f qcow2 "$S/cut.qcow2" 16M
qemu-io -f qcow2 -c 'write -P 1 0 16M' "$S/cut.qcow2" >/dev/null || fail "qemu-io cut"
truncate -s 8M "$S/cut.qcow2"
rc=0
"$QUBLK" convert "$S/cut.qcow2" "$O/cut.raw" 2>"$TMPD/err" || rc=$?
[ "$rc" = 1 ] || fail "convert of a truncated image: exit $rc, want 1"
[ ! -e "$O/cut.raw" ] || fail "a failed convert left its destination"
leftovers
# Interrupted: a 64 GiB image whose clusters are all mapped (metadata
# preallocation, reads zeros) keeps convert busy for seconds.
mkimg -f qcow2 -o preallocation=metadata "$S/big.qcow2" 64G
"$QUBLK" convert "$S/big.qcow2" "$O/big.raw" 2>"$TMPD/err" &
pid=$!
for _ in $(seq 200); do     # its temporary file exists: it is converting
    [ -z "$(find "$O" -name '.big.raw.qublk-*')" ] || break
    sleep 0.05
done
sleep 0.2
kill -INT "$pid"
rc=0
wait "$pid" || rc=$?
[ "$rc" = 1 ] || fail "interrupted convert: exit $rc, want 1"
[ ! -e "$O/big.raw" ] || fail "an interrupted convert left its destination"
leftovers
# Progress: nothing on a pipe; on a terminal, qemu-img's progress line.
out=$("$QUBLK" convert -p "$S/v3-64k.qcow2" "$O/p.raw") || fail "convert -p"
[ -z "$out" ] || fail "convert -p printed to a pipe: $out"
if command -v script >/dev/null; then
    script -qec "$QUBLK convert -p $S/v3-64k.qcow2 $O/p.raw" /dev/null >"$TMPD/tty" \
        || fail "convert -p on a terminal"
    grep -q '(100.00/100%)' "$TMPD/tty" || fail "no progress on a terminal: $(cat -v "$TMPD/tty")"
fi
# Usage errors.
expect_rc() {   # RC ARGS...
    local want=$1 rc=0; shift
    "$QUBLK" convert "$@" >"$TMPD/rc.out" 2>&1 || rc=$?
    [ "$rc" = "$want" ] || { cat "$TMPD/rc.out" >&2; fail "qublk convert $*: exit $rc, want $want"; }
}
expect_rc 2 "$S/v3-64k.qcow2"
expect_rc 2 -O vmdk "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 -f vmdk "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 -m 0 "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 --threads 0 "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 -O raw -o cluster_size=4k "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 -c -O raw "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 -B "$S/mid.qcow2" "$S/top.qcow2" "$O/x"
expect_rc 2 -O qcow2 -F raw "$S/top.qcow2" "$O/x"
# -B without -F: refused, as qemu-img refuses it (a format is never probed
# into an image).
! qemu-img convert -O qcow2 -B mid.qcow2 "$S/top.qcow2" "$O/x" 2>/dev/null \
    || fail "qemu-img convert -B without -F succeeded"
rm -f "$O/x"
expect_rc 2 -O qcow2 -B mid.qcow2 "$S/top.qcow2" "$O/x"
expect_rc 1 -O qcow2 -B missing.qcow2 -F qcow2 "$S/top.qcow2" "$O/x"
# DST cannot become its own backing file.
cp "$S/mid.qcow2" "$S/own.qcow2"
expect_rc 1 -O qcow2 -B own.qcow2 -F qcow2 "$S/top.qcow2" "$S/own.qcow2"
cmp "$S/mid.qcow2" "$S/own.qcow2" || fail "DST changed"
expect_rc 2 -O qcow2 -o bogus=1 "$S/v3-64k.qcow2" "$O/x"
expect_rc 1 -O qcow2 -o cluster_size=3k "$S/v3-64k.qcow2" "$O/x"
expect_rc 2 --bogus "$S/v3-64k.qcow2" "$O/x"
expect_rc 0 --help
expect_rc 1 "$S/missing.qcow2" "$O/x"
[ ! -e "$O/x" ] || fail "a failed convert left its destination"
leftovers
echo PASS
