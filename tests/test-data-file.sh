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
