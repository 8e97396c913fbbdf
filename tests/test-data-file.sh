#!/bin/bash
# SPDX-License-Identifier: MIT
# External data files (qcow2 "External data file name", incompatible bit
# 2; data_file_raw, autoclear bit 1) against QEMU: images made by qemu-img
# with -o data_file=..., a random sequence of writes, write-zeroes (with
# and without unmap) and discards (tests/gen-ops.py, sequential) through
# `qublk nbd` on one copy and through qemu-io on another.  Then: `qemu-img
# compare` finds them identical, `qemu-img check` is clean on both, the
# qcow2 file holds no guest data (it stays small), and with data_file_raw
# the data file itself reads as the guest disk (QEMU's promise for it).
# Also: the data file is locked with the image.
# Replay: QUBLK_SEED=N tests/test-data-file.sh
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "qublk-specific"
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
echo "seed $SEED (replay: QUBLK_SEED=$SEED $0)"
SIZE=$((32 << 20))

n=0
for cfg in "64k raw" "64k noraw" "4k raw" "64k raw-xl2"; do
    read -r cs mode <<<"$cfg"
    name=c$cs-$mode
    FAIL_CONTEXT="$name seed $SEED"
    a=$TMPD/$name/a b=$TMPD/$name/b
    mkdir -p "$a" "$b"
    opts="cluster_size=$cs"
    case $mode in
        raw) opts+=",data_file_raw=on" ;;
        raw-xl2) opts+=",data_file_raw=on,extended_l2=on" ;;
    esac
    # Absolute names: QEMU 7.2 opens a relative one from its working
    # directory (qublk: from the image's directory, like backing files).
    for d in "$a" "$b"; do
        mkimg -f qcow2 -o "$opts,data_file=$d/data.raw" "$d/img.qcow2" "$SIZE"
        # Some data QEMU wrote first.
        qemu-io -f qcow2 -c 'write -P 0x5a 1M 3M' "$d/img.qcow2" >/dev/null || fail "qemu-io"
    done
    "$PYTHON" "$TESTS_DIR/gen-ops.py" --seed "$((SEED + n))" --size "$SIZE" \
        --cluster-size "$cs" --ops 200 --segments 1 --no-reads "$TMPD/$name" || fail "gen-ops.py"
    sed -e 's/^aio_write /write /' -e '/^aio_flush$/d' "$TMPD/$name/img.0.io" >"$TMPD/$name/ops.io"

    start_nbd_server "$a/img.qcow2"
    # The data file is locked with the image: QEMU cannot write it.
    if qemu-io -f raw -c 'write 0 512' "$a/data.raw" >"$TMPD/lock.out" 2>&1; then
        fail "the data file was not locked"
    fi
    grep -q 'Failed to get "write" lock' "$TMPD/lock.out" || { cat "$TMPD/lock.out" >&2; fail "lock message"; }
    qio "$NBD_URI" raw <"$TMPD/$name/ops.io"
    stop_nbd_server
    qio "$b/img.qcow2" qcow2 <"$TMPD/$name/ops.io"

    qcompare "$a/img.qcow2" "$b/img.qcow2"
    qcheck "$a/img.qcow2"
    qcheck "$b/img.qcow2"
    # Metadata only in the qcow2 file.
    [ "$(stat -c %s "$a/img.qcow2")" -lt $((2 << 20)) ] || fail "guest data in the qcow2 file"
    if [[ $mode == raw* ]]; then
        qemu-img convert -f qcow2 -O raw "$a/img.qcow2" "$TMPD/guest.raw"
        qemu-img compare -f raw -F raw "$a/data.raw" "$TMPD/guest.raw" >/dev/null ||
            fail "the raw data file does not read as the guest disk"
    fi
    rm -rf "${TMPD:?}/$name" "$TMPD/guest.raw"
    echo "ok $name"
    n=$((n + 1))
done
FAIL_CONTEXT=
echo "$n configurations passed"

# qublk create -o data_file=...: made by qublk and by each QEMU with the
# same options, side by side (relative data file names with the image's
# directory as working directory, where QEMU's reading and qublk's agree):
# the same `qemu-img info` and `map`, check clean, the data file of the
# same size and allocation; then the same writes by that QEMU's qemu-io
# into both read back equal (and, raw, the data file reads as the guest).
mkimg -f qcow2 "$TMPD/base.qcow2" 8M
m=0
for v in $(qemu_versions); do
    use_qemu "$v"
    for opts in "" "data_file_raw=on" "preallocation=metadata" "preallocation=falloc" \
        "preallocation=full,data_file_raw=on" "cluster_size=4k,data_file_raw=on" \
        "extended_l2=on" "extended_l2=on,data_file_raw=on,preallocation=falloc" "backing"; do
        FAIL_CONTEXT="create -o data_file=data.raw${opts:+,$opts} (QEMU $v)"
        args=(-f qcow2 -o "data_file=data.raw${opts:+,$opts}")
        size=8M
        if [ "$opts" = backing ]; then
            args=(-f qcow2 -o data_file=data.raw -b ../base.qcow2 -F qcow2)
            size=
        fi
        rm -rf "$TMPD/q" "$TMPD/e"
        mkdir -p "$TMPD/q" "$TMPD/e"
        (cd "$TMPD/q" && "$QUBLK" create "${args[@]}" img.qcow2 $size) || fail "qublk create"
        (cd "$TMPD/e" && qemu-img create -q "${args[@]}" img.qcow2 $size) || fail "qemu-img create"
        for d in q e; do
            (cd "$TMPD/$d" && qemu-img info --output=json img.qcow2 |
                "$PYTHON" -c 'import json, sys; j = json.load(sys.stdin)
print(j["virtual-size"], json.dumps(j["format-specific"], sort_keys=True), j.get("backing-filename"))') \
                >"$TMPD/$d.info" || fail "qemu-img info ($d)"
            (cd "$TMPD/$d" && qemu-img map --output=json img.qcow2) >"$TMPD/$d.map" || fail "map ($d)"
            (cd "$TMPD/$d" && qcheck img.qcow2)
            stat -c '%s %b' "$TMPD/$d/data.raw" >"$TMPD/$d.stat"
        done
        cmp -s "$TMPD/q.info" "$TMPD/e.info" ||
            fail "info differs: qublk $(cat "$TMPD/q.info"), QEMU $(cat "$TMPD/e.info")"
        cmp -s "$TMPD/q.map" "$TMPD/e.map" ||
            fail "map differs: qublk $(cat "$TMPD/q.map"), QEMU $(cat "$TMPD/e.map")"
        # size equal; allocation within 64 KiB (st_blocks: 512-byte units)
        read -r qs qb <"$TMPD/q.stat"; read -r es eb <"$TMPD/e.stat"
        [ "$qs" = "$es" ] && [ $((qb - eb)) -le 128 ] && [ $((eb - qb)) -le 128 ] ||
            fail "data file: qublk $qs bytes/$qb blocks, QEMU $es/$eb"
        # (QEMU opens a relative data file name from its working directory:
        # one image per directory, each read into a raw file.)
        for d in q e; do
            (cd "$TMPD/$d" && qio img.qcow2 qcow2 -c 'write -P 0x3c 60k 200k' -c 'write -z 1M 64k' \
                -c 'write -P 0x11 7M 1M' && qcheck img.qcow2 &&
                qemu-img convert -f qcow2 -O raw img.qcow2 ../$d.raw) || fail "write/read ($d)"
        done
        qcompare "$TMPD/q.raw" "$TMPD/e.raw"
        if [[ $opts == *data_file_raw=on* ]]; then
            (cd "$TMPD/q" && qemu-img compare -f qcow2 -F raw img.qcow2 data.raw >/dev/null) ||
                fail "the raw data file does not read as the guest disk"
        fi
        m=$((m + 1))
    done
done
use_qemu 7
FAIL_CONTEXT=create

# What QEMU refuses, refused in its words, and nothing left behind.
mkdir -p "$TMPD/r"
cd "$TMPD/r" || fail "cd"
for c in "compat=0.10,data_file=d.raw|External data files are only supported with compatibility level 1.1" \
    "data_file_raw=on|data-file-raw requires data-file" \
    "data_file=d.raw,data_file_raw=on,backing_file=../base.qcow2,backing_fmt=qcow2|Backing file and data-file-raw cannot be used at the same time"; do
    o=${c%%|*} want=${c#*|}
    "$QUBLK" create -o "$o" img.qcow2 8M >"$TMPD/out" 2>&1 && fail "create -o $o succeeded"
    grep -qF "$want" "$TMPD/out" || fail "create -o $o: $(cat "$TMPD/out")"
    [ -z "$(ls -A)" ] || fail "create -o $o left files: $(ls -A)"
done
rc=0
"$QUBLK" convert -O qcow2 -o data_file=d.raw "$TMPD/base.qcow2" img.qcow2 >"$TMPD/out" 2>&1 || rc=$?
[ $rc -eq 2 ] && grep -q "external data files" "$TMPD/out" || fail "convert -o data_file: $(cat "$TMPD/out")"
[ -z "$(ls -A)" ] || fail "convert -o data_file left files: $(ls -A)"
# A data file in use (served, so locked) is not replaced: the create
# fails and the served image's data is intact.
"$QUBLK" create -o data_file=d.raw,data_file_raw=on img.qcow2 8M || fail "create"
qemu-io -f qcow2 -c 'write -P 0x77 0 1M' img.qcow2 >/dev/null || fail "qemu-io"
start_nbd_server "$TMPD/r/img.qcow2"
"$QUBLK" create -o data_file=d.raw other.qcow2 8M >"$TMPD/out" 2>&1 && fail "create over a data file in use"
grep -q "in use" "$TMPD/out" || fail "create over a data file in use: $(cat "$TMPD/out")"
stop_nbd_server
[ ! -e other.qcow2 ] || fail "other.qcow2 made"
qemu-io -f qcow2 -c 'read -P 0x77 0 1M' img.qcow2 | grep -q '^read' || fail "the data file changed"
cd "$TMPD" || fail "cd"
FAIL_CONTEXT=
echo "$m created images equal QEMU's"
