#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk resize FILE SIZE (offline) against qemu-img as the oracle: every
# resize qublk does is done by `qemu-img resize` on a copy, and the two
# must compare equal (qemu-img compare) with the same virtual size
# (qemu-img info); old data reads back, the new range reads as zeros.
# Raw: grow (absolute, +N), shrink refused without --shrink, refused with
# it while the tail holds data, allowed over holes; sizes that are not a
# multiple of 512 refused; the image lock is honoured (qemu-nbd holds it).
# qcow2 (resize.c): every case again against qemu-img resize on a copy,
# then `qemu-img check` clean (no leaks), data written past the old end
# with qemu-io reads back, and the image still checks clean:
#   grow without new L1 entries, within the first L1 cluster, and with
#   512 B clusters past many L1 clusters (the table moves; new refcount
#   blocks for it, and a larger refcount table); v2; extended L2; an
#   internal snapshot (v3: still intact after grow and shrink, and
#   `qublk snapshot -a` goes back to its size as qemu-img does); external
#   data files, plain and raw (with and without extended L2); shrink of a
#   tail written then discarded or zeroed; a backing file larger than the
#   image (its data must not show through the grown range);
#   refusals as qemu-img's: v2 with snapshots, shrinking without
#   --shrink; and ours: shrinking over data, v2 over a larger backing file
#   (qemu-img fails half-way there), persistent bitmaps (qemu-img resizes
#   them; we cannot) -- the image left as it was;
#   injected faults (EIO, ENOSPC) at each write of an L1 growth and at the
#   header update: the resize fails, the image checks with no corruption
#   and its old size, and a retry does the resize.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
requires qemu-img qemu-io qemu-nbd
[ -x "$QUBLK" ] || skip "$QUBLK not built"

size_of() { qemu-img info -U --output json "$1" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p'; }

# expect_size FILE BYTES
expect_size() {
    local got
    got=$(size_of "$1")
    [ "$got" = "$2" ] || fail "$1: virtual size $got, expected $2"
}

# refused EXIT PATTERN ARGS...: qublk resize ARGS exits EXIT saying PATTERN.
refused() {
    local want=$1 pat=$2 rc=0
    shift 2
    "$QUBLK" resize "$@" >"$TMPD/out" 2>&1 || rc=$?
    [ "$rc" = "$want" ] || { cat "$TMPD/out"; fail "qublk resize $*: exit $rc, expected $want"; }
    grep -q -- "$pat" "$TMPD/out" || { cat "$TMPD/out"; fail "qublk resize $*: no '$pat'"; }
}

# both FMT FILE SIZE: resize FILE with qublk and a copy with qemu-img;
# they must compare equal and have the same size.
both() {
    local fmt=$1 f=$2 sz=$3
    cp "$f" "$TMPD/ref"
    qemu-img resize -q -f "$fmt" "$TMPD/ref" "$sz"
    "$QUBLK" resize "$f" "$sz" | grep -qx 'Image resized.'
    expect_size "$f" "$(size_of "$TMPD/ref")"
    qemu-img compare -q -f "$fmt" -F "$fmt" "$f" "$TMPD/ref" || fail "$f differs from qemu-img's resize to $sz"
    rm -f "$TMPD/ref"
}

# ---- raw
R=$TMPD/r.raw
truncate -s 1M "$R"
qemu-io -f raw -c 'write -P 0xab 0 1M' "$R" >/dev/null
both raw "$R" 3M
expect_size "$R" $((3 << 20))
both raw "$R" +1M
expect_size "$R" $((4 << 20))
qemu-io -f raw -c 'read -P 0xab 0 1M' -c 'read -P 0 1M 3M' "$R" | grep -q 'read 3145728' \
    || fail "raw: data or zeros wrong after growing"
refused 1 'use --shrink' "$R" 2M
expect_size "$R" $((4 << 20))
qemu-io -f raw -c 'write -P 0xcd 3M 512k' "$R" >/dev/null
refused 1 'holds data' --shrink "$R" 2M
expect_size "$R" $((4 << 20))
qemu-io -f raw -c 'discard 3M 1M' "$R" >/dev/null
"$QUBLK" resize --shrink "$R" 2M | grep -qx 'Image resized.'
expect_size "$R" $((2 << 20))
qemu-io -f raw -c 'read -P 0xab 0 1M' -c 'read -P 0 1M 1M' "$R" >/dev/null
"$QUBLK" resize --shrink "$R" -1M >/dev/null
expect_size "$R" $((1 << 20))
# "FILE -- SIZE", as qemu-img takes it.
"$QUBLK" resize "$R" -- +512K >/dev/null
expect_size "$R" $((1536 << 10))
"$QUBLK" resize --shrink "$R" -- -512K >/dev/null
expect_size "$R" $((1 << 20))
refused 1 'multiple of 512' "$R" 1000000
refused 2 'expected a size' "$R" 12XB
refused 2 'expected a size' "$R" -1M
refused 2 'expected only SIZE' -n 0 --shrink 2M
expect_size "$R" $((1 << 20))
# Someone else has the image: refused, as QEMU would be.
qemu-nbd -f raw -k "$TMPD/nbd.sock" "$R" &
nbd_pid=$!
for _ in $(seq 1 100); do [ -S "$TMPD/nbd.sock" ] && break; sleep 0.05; done
refused 1 'Failed to get "' "$R" 2M
kill "$nbd_pid"
wait "$nbd_pid" || true
expect_size "$R" $((1 << 20))

# ---- qcow2

# qboth IMG SIZE [--shrink]: resize IMG with qublk and a copy with
# qemu-img (images without external files); equal afterwards, same size,
# and IMG checks clean.
qboth() {
    local f=$1 sz=$2
    shift 2
    cp "$f" "$TMPD/ref.qcow2"
    qemu-img resize -q -f qcow2 "$@" "$TMPD/ref.qcow2" "$sz"
    "$QUBLK" resize "$@" "$f" "$sz" >"$TMPD/out" 2>&1 || { cat "$TMPD/out"; fail "qublk resize $* $f $sz"; }
    grep -qx 'Image resized.' "$TMPD/out" || { cat "$TMPD/out"; fail "qublk resize $f $sz: no 'Image resized.'"; }
    expect_size "$f" "$(size_of "$TMPD/ref.qcow2")"
    qemu-img compare -q -f qcow2 -F qcow2 "$f" "$TMPD/ref.qcow2" ||
        fail "$f differs from qemu-img's resize to $sz"
    qcheck "$f"
    rm -f "$TMPD/ref.qcow2"
}

# grown IMG OLD NEW: after growing from OLD bytes, the new range reads as
# zeros (its ends here: qboth compared all of it with qemu-img's) and
# takes data (written and read back by qemu-io); still clean.
grown() {
    local f=$1 old=$2 new=$3 w
    w=$((new - old < 4 << 20 ? new - old : 4 << 20))
    qemu-io -f qcow2 -c "read -P 0 $old $w" -c "read -P 0 $((new - w)) $w" "$f" |
        grep -c "^read $w/" | grep -qx 2 ||
        fail "$f: the range grown from $old to $new does not read as zeros"
    qemu-io -f qcow2 -c "write -P 0x77 $((new - 65536)) 65536" -c "write -P 0x78 $old 4096" \
        "$f" >/dev/null
    qemu-io -f qcow2 -c "read -P 0x77 $((new - 65536)) 65536" -c "read -P 0x78 $old 4096" "$f" |
        grep -c '^read ' | grep -qx 2 || fail "$f: data written past the old end does not read back"
    qcheck "$f"
}

# unchanged IMG COPY: a refused resize left IMG as it was.
unchanged() {
    cmp -s "$1" "$2" || fail "$1: a refused resize changed the image"
}

# l1 IMG: the header's l1_size and l1_table_offset.
l1() {
    "$PYTHON" -c 'import struct,sys; d=open(sys.argv[1],"rb").read(48); print(struct.unpack(">I",d[36:40])[0], struct.unpack(">Q",d[40:48])[0])' "$1"
}

Q=$TMPD/q.qcow2
qemu-img create -q -f qcow2 "$Q" 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 512k' "$Q" >/dev/null
# 64 KiB clusters: an L1 entry maps 512 MiB; no new entry needed.
qboth "$Q" 3M
qboth "$Q" +5M
grown "$Q" $((3 << 20)) $((8 << 20))
qemu-io -f qcow2 -c 'read -P 0xab 0 512k' "$Q" | grep -q '^read 524288/' || fail "old data lost"
refused 1 'use --shrink' "$Q" 1M
qemu-io -f qcow2 -c 'write -P 0xcd 7M 64k' "$Q" >/dev/null
cp "$Q" "$TMPD/before.qcow2"
refused 1 'holds data' --shrink "$Q" 2M
unchanged "$Q" "$TMPD/before.qcow2"
expect_size "$Q" $((8 << 20))
qcheck "$Q"
# More L1 entries inside the table's first cluster: the table moves all
# the same (qemu-img does it so); past QEMU's table size limit: refused.
qboth "$Q" 3G
grown "$Q" $((8 << 20)) $((3 << 30))
refused 1 'more than qcow2 allows' "$Q" 3P
expect_size "$Q" $((3 << 30))
# Shrink into the middle of a cluster (the kept part of it holds no
# data), and grow back over it: the rest of that cluster reads as zeros.
qemu-io -f qcow2 -c 'discard 5M 2000M' -c 'discard 2005M 1067M' "$Q" >/dev/null
qboth "$Q" $((5 * 1048576 + 1536)) --shrink
qboth "$Q" 6M
grown "$Q" $((5 * 1048576 + 1536)) $((6 << 20))

# 512 B clusters: an L1 entry maps 32 KiB, an L1 cluster 2 MiB.  From 4
# MiB (two L1 clusters) to 64 MiB (32) and 128 MiB (64): the table moves
# twice, its refcounts need new refcount blocks and a larger refcount
# table.  Data before, tail data written then discarded or zeroed, and a
# shrink back down.
S=$TMPD/s.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 "$S" 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x12 3M 1M' "$S" >/dev/null
read -r l1n l1o < <(l1 "$S")
qboth "$S" 64M
read -r l1n2 l1o2 < <(l1 "$S")
if [ "$l1n2" != 2048 ] || [ "$l1o2" = "$l1o" ]; then
    fail "L1 not moved: $l1n/$l1o -> $l1n2/$l1o2"
fi
grown "$S" $((4 << 20)) $((64 << 20))
qboth "$S" 128M
grown "$S" $((64 << 20)) $((128 << 20))
qemu-io -f qcow2 -c 'read -P 0x11 0 1M' -c 'read -P 0x12 3M 1M' "$S" | grep -c '^read ' |
    grep -qx 2 || fail "old data lost after L1 growth"
# (grown wrote at 4M, 64M - 64k, 64M and 128M - 64k.)
qemu-io -f qcow2 -c 'write -P 0x13 100M 2M' -c 'write -P 0x14 40M 1M' -c 'discard 100M 2M' \
    -c 'write -z -u 40M 1M' -c 'write -z 90M 64k' -c 'discard 4M 4k' -c 'discard 64M 4k' \
    -c 'write -z 65472k 64k' -c 'discard 131008k 64k' "$S" >/dev/null
qboth "$S" 32M --shrink
qemu-io -f qcow2 -c 'read -P 0x11 0 1M' -c 'read -P 0x12 3M 1M' -c 'read -P 0 4M 28M' "$S" |
    grep -c '^read ' | grep -qx 3 || fail "data lost after shrinking"
[ "$(l1 "$S" | cut -d' ' -f1)" = 4096 ] || fail "the L1 table changed size on shrink (qemu-img keeps it)"
qboth "$S" 100M
grown "$S" $((32 << 20)) $((100 << 20))
# A shrink to a size that is not a multiple of the cluster size.
qemu-io -f qcow2 -c 'discard 99M 1M' "$S" >/dev/null
qboth "$S" $((99 * 1048576 + 1536)) --shrink

# The new L1 table alone outgrows what the refcount table covers (8 MiB of
# file at 512 B clusters per table cluster): allocating it grows the
# refcount table.
R=$TMPD/rt.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 "$R" 4M
qemu-io -f qcow2 -c 'write -P 0x15 0 4M' "$R" >/dev/null
rt() { "$PYTHON" -c 'import struct,sys; d=open(sys.argv[1],"rb").read(60); print(struct.unpack(">I",d[56:60])[0])' "$1"; }
[ "$(rt "$R")" = 1 ] || fail "rt.qcow2: expected a one-cluster refcount table to start with"
qboth "$R" 32G
[ "$(rt "$R")" -gt 1 ] || fail "rt.qcow2: the refcount table did not grow"
grown "$R" $((4 << 20)) $((32 << 30))
rm -f "$R"

# v2 (compat 0.10): grows and shrinks too.
V=$TMPD/v2.qcow2
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 "$V" 2M
qemu-io -f qcow2 -c 'write -P 0x21 0 2M' "$V" >/dev/null
qboth "$V" 40M
grown "$V" $((2 << 20)) $((40 << 20))
qemu-io -f qcow2 -c 'discard 10M 30M' "$V" >/dev/null
qboth "$V" 10M --shrink

# Extended L2 entries.
X=$TMPD/xl2.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k "$X" 8M
qemu-io -f qcow2 -c 'write -P 0x31 0 1M' -c 'write -P 0x32 7M 3k' "$X" >/dev/null
qboth "$X" 5G
grown "$X" $((8 << 20)) $((5 << 30))
qemu-io -f qcow2 -c 'discard 4G 1G' -c 'write -z 7M 1M' -c 'write -z 8M 1M' "$X" >/dev/null
qboth "$X" 7M --shrink

# Internal snapshots: v3 resizes (qemu-img too), the snapshot stays as it
# was; `snapshot -a` takes the image back to the snapshot's size.
N=$TMPD/snap.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4k "$N" 8M
qemu-io -f qcow2 -c 'write -P 0x41 0 8M' "$N" >/dev/null
qemu-img snapshot -c s1 "$N"
qemu-io -f qcow2 -c 'write -z 6M 2M' "$N" >/dev/null
qboth "$N" 6M --shrink
qboth "$N" 20M
grown "$N" $((6 << 20)) $((20 << 20))
qemu-img convert -l snapshot.name=s1 -f qcow2 -O raw "$N" "$TMPD/s1.raw"
qemu-io -f raw -c 'read -P 0x41 0 8M' "$TMPD/s1.raw" | grep -q '^read 8388608/' ||
    fail "the snapshot changed with the resizes"
cp "$N" "$TMPD/ref.qcow2"
"$QUBLK" snapshot -a s1 "$N"
qemu-img snapshot -a s1 "$TMPD/ref.qcow2"
expect_size "$N" $((8 << 20))
qemu-img compare -q "$N" "$TMPD/ref.qcow2" || fail "snapshot -a after resize differs from qemu-img's"
qcheck "$N"
# The dropped range's L2 table shared with the snapshot (zero clusters
# only): the active side's copy goes, the snapshot keeps the table.
N=$TMPD/snap2.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4k "$N" 8M
qemu-io -f qcow2 -c 'write -P 0x42 0 6M' -c 'write -z 6M 2M' "$N" >/dev/null
qemu-img snapshot -c s1 "$N"
cp "$N" "$TMPD/ref2.qcow2"
qemu-img resize -q --shrink "$TMPD/ref2.qcow2" 6M
qboth "$N" 6M --shrink
# (qemu-img 7.2 converts a snapshot at the active layer's size.)
qemu-img convert -l snapshot.name=s1 -f qcow2 -O raw "$N" "$TMPD/s1.raw"
qemu-io -f raw -c 'read -P 0x42 0 6M' "$TMPD/s1.raw" | grep -q '^read 6291456/' ||
    fail "the snapshot changed with the shrink"
"$QUBLK" snapshot -a s1 "$N"
qemu-img snapshot -a s1 "$TMPD/ref2.qcow2"
expect_size "$N" $((8 << 20))
qemu-img compare -q "$N" "$TMPD/ref2.qcow2" || fail "snapshot -a after a shrink differs from qemu-img's"
qemu-io -f qcow2 -c 'read -P 0x42 0 6M' -c 'read -P 0 6M 2M' "$N" | grep -c '^read ' |
    grep -qx 2 || fail "the snapshot did not come back whole"
qcheck "$N"
rm -f "$TMPD/ref2.qcow2" "$TMPD/s1.raw"

# v2 with a snapshot: refused, as qemu-img does.
qemu-img create -q -f qcow2 -o compat=0.10 "$TMPD/v2s.qcow2" 8M
qemu-img snapshot -c s1 "$TMPD/v2s.qcow2"
cp "$TMPD/v2s.qcow2" "$TMPD/before.qcow2"
! qemu-img resize -q "$TMPD/ref.qcow2" 16M 2>/dev/null -f qcow2 "$TMPD/v2s.qcow2" 16M ||
    fail "qemu-img resized a v2 image with snapshots: the oracle changed"
cp "$TMPD/before.qcow2" "$TMPD/v2s.qcow2"
refused 1 "Can't resize a v2 image which has snapshots" "$TMPD/v2s.qcow2" 16M
unchanged "$TMPD/v2s.qcow2" "$TMPD/before.qcow2"

# Persistent dirty bitmaps: qemu-img resizes them with the image; we
# cannot, and say so.
M=$TMPD/bm.qcow2
qemu-img create -q -f qcow2 "$M" 8M
qemu-img bitmap --add "$M" b0
cp "$M" "$TMPD/before.qcow2"
refused 1 'persistent dirty bitmaps' "$M" 16M
qemu-img compare -q "$M" "$TMPD/before.qcow2" && expect_size "$M" $((8 << 20))
qcheck "$M"

# External data files, plain and raw (the raw one gets its new clusters
# mapped, as QEMU preallocates them).  Absolute names: QEMU 7.2 opens a
# relative one from its working directory.
for mode in plain raw raw-xl2; do
    for side in a b; do
        d=$TMPD/df-$mode-$side
        mkdir -p "$d"
        o="data_file=$d/data.raw"
        case $mode in
            raw) o+=",data_file_raw=on" ;;
            raw-xl2) o+=",data_file_raw=on,extended_l2=on" ;;
        esac
        qemu-img create -q -f qcow2 -o "$o" "$d/img.qcow2" 4M
        qemu-io -f qcow2 -c 'write -P 0x51 0 1M' -c 'write -P 0x52 3M 64k' -c 'discard 3M 1M' \
            "$d/img.qcow2" >/dev/null
    done
    a=$TMPD/df-$mode-a b=$TMPD/df-$mode-b
    steps=("12M" "5M --shrink" "9M")
    # data_file_raw: every cluster is mapped to the data file, so the
    # range a shrink drops holds data: refused (qemu-img drops it).  Not
    # with extended L2, where QEMU maps them with unallocated subclusters.
    [ "$mode" != raw ] || steps=("12M" "16M")
    for step in "${steps[@]}"; do
        read -r sz flag <<<"$step"
        # shellcheck disable=SC2086
        qemu-img resize -q -f qcow2 $flag "$b/img.qcow2" "$sz"
        # shellcheck disable=SC2086
        "$QUBLK" resize $flag "$a/img.qcow2" "$sz" | grep -qx 'Image resized.' ||
            fail "data file ($mode): resize to $sz"
        expect_size "$a/img.qcow2" "$(size_of "$b/img.qcow2")"
        [ "$(stat -c %s "$a/data.raw")" = "$(stat -c %s "$b/data.raw")" ] ||
            fail "data file ($mode): $(stat -c %s "$a/data.raw") bytes, qemu-img's $(stat -c %s "$b/data.raw")"
        qemu-img compare -q "$a/img.qcow2" "$b/img.qcow2" || fail "data file ($mode): differs after $sz"
        # Guest cluster X is data file cluster X: the maps agree exactly.
        cmp -s <(qemu-img map --output=json "$a/img.qcow2") <(qemu-img map --output=json "$b/img.qcow2") ||
            fail "data file ($mode): qemu-img map differs after $sz"
        qcheck "$a/img.qcow2"
    done
    if [ "$mode" = raw ]; then
        cp "$a/img.qcow2" "$TMPD/before.qcow2"
        refused 1 'holds data' --shrink "$a/img.qcow2" 5M
        unchanged "$a/img.qcow2" "$TMPD/before.qcow2"
        grown "$a/img.qcow2" $((12 << 20)) $((16 << 20))
    else
        grown "$a/img.qcow2" $((5 << 20)) $((9 << 20))
    fi
    if [ "$mode" != plain ]; then
        qemu-img compare -q -f raw -F qcow2 "$a/data.raw" "$a/img.qcow2" ||
            fail "data_file_raw: the data file does not read as the disk"
    fi
done

# A backing file larger than the image: the grown range reads as zeros,
# not as the backing file's data there (v3: zero clusters; and the rest
# of the old last cluster written with zeros).
B=$TMPD/base.qcow2 O=$TMPD/top.qcow2
qemu-img create -q -f qcow2 "$B" 4M
qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' "$B" >/dev/null
for o in "cluster_size=65536 2M" "cluster_size=65536 1000K" "extended_l2=on,cluster_size=64k 1000K"; do
    read -r opts sz <<<"$o"
    qemu-img create -q -f qcow2 -o "$opts" -b "$B" -F qcow2 "$O" "$sz"
    osz=$(size_of "$O")
    qboth "$O" 6M
    qemu-io -f qcow2 -c "read -P 0x5a 0 $osz" -c "read -P 0 $osz $((6291456 - osz))" "$O" |
        grep -c '^read ' | grep -qx 2 ||
        fail "qcow2 ($opts) over a larger backing file: the grown range does not read as zeros"
done
qemu-io -f qcow2 -c 'read -P 0x5a 0 4M' "$B" >/dev/null || fail "the backing file changed"
# v2 cannot hide the backing file: refused before anything changes
# (qemu-img fails half-way, "Failed to zero out new clusters").
qemu-img create -q -f qcow2 -o compat=0.10 -b "$B" -F qcow2 "$O" 1M
cp "$O" "$TMPD/before.qcow2"
refused 1 'no zero clusters' "$O" 3M
unchanged "$O" "$TMPD/before.qcow2"
# ... unless the backing file ends before the old size.
qemu-img create -q -f qcow2 -o compat=0.10 -b "$B" -F qcow2 "$O" 5M
qboth "$O" 7M

# Injected faults during an L1 growth (512 B clusters, 2 MiB -> 64 MiB):
# the resize fails, the image has no corruption and its old size; a retry
# does it (it may expose clusters the failed attempt leaked past the end
# of the file, where qemu-img check does not look: leaks, repaired).
# Write sites fail their first call; flush fails its first or third sync.
F=$TMPD/inj.qcow2 F0=$TMPD/inj0.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 "$F0" 2M
qemu-io -f qcow2 -c 'write -P 0x61 0 2M' "$F0" >/dev/null
cp "$F0" "$TMPD/ref.qcow2"
qemu-img resize -q "$TMPD/ref.qcow2" 64M
for inj in l1_grow_write_table l1_grow_activate_table header_update flush flush:skip=2; do
    site=${inj%%:*} opt=
    [ "$inj" = "$site" ] || opt=:${inj#*:}
    for err in EIO ENOSPC; do
        cp "$F0" "$F"
        rc=0
        QUBLK_INJECT="$site:$err$opt" "$QUBLK" resize "$F" 64M >"$TMPD/out" 2>&1 || rc=$?
        if [ "$rc" != 1 ] || ! grep -q "injected" "$TMPD/out"; then
            cat "$TMPD/out"; fail "$inj:$err: resize exit $rc"
        fi
        rc=0
        qemu-img check "$F" >"$TMPD/chk" 2>&1 || rc=$?
        [ "$rc" = 0 ] || [ "$rc" = 3 ] || { cat "$TMPD/chk"; fail "$inj:$err: check exit $rc"; }
        expect_size "$F" $((2 << 20))
        qemu-io -f qcow2 -c 'read -P 0x61 0 2M' "$F" | grep -q '^read 2097152/' ||
            fail "$inj:$err: data lost"
        "$QUBLK" resize "$F" 64M | grep -qx 'Image resized.' || fail "$inj:$err: the retry failed"
        expect_size "$F" $((64 << 20))
        qemu-img compare -q "$F" "$TMPD/ref.qcow2" || fail "$inj:$err: differs after the retry"
        rc=0
        qemu-img check -r leaks "$F" >"$TMPD/chk" 2>&1 || rc=$?
        [ "$rc" = 0 ] || { cat "$TMPD/chk"; fail "$inj:$err: check -r leaks exit $rc"; }
        qcheck "$F"
        grown "$F" $((2 << 20)) $((64 << 20))
    done
done
echo PASS
