#!/bin/bash
# SPDX-License-Identifier: MIT
# Extended L2 entries (subclusters) against QEMU: images with
# extended_l2=on over a backing file with data, at 32 KiB, 64 KiB and
# 2 MiB clusters.  The same random sequence of partial-subcluster writes,
# write-zeroes (with and without unmap) and discards (tests/gen-ops.py,
# sequential: QEMU is the oracle only where it is itself right) goes
# through `qublk nbd` on one copy and through qemu-io (QEMU's own qcow2
# driver) on another.  Then: `qemu-img compare` finds them identical,
# `qemu-img check` is clean on both, and `qemu-img map` describes them the
# same way (which ranges are allocated in the top image, zero or data,
# at subcluster granularity), host offsets aside: qublk allocates and
# copies exactly the subclusters QEMU does.
# Replay: QUBLK_SEED=N tests/test-xl2.sh
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
OPS=${QUBLK_XL2_OPS:-200}
echo "seed $SEED (replay: QUBLK_SEED=$SEED $0)"

# map FILE OUT: qemu-img map without host offsets, neighbours that only
# differed by them merged (and "zero" only for unallocated ranges).
map() {
    qemu-img map --output=json "$1" >"$2.json" || fail "qemu-img map $1"
    "$PYTHON" -c '
import json, sys
out = []
for r in json.load(open(sys.argv[1])):
    # Allocated data may read as zeros from a hole in the host file
    # (QEMU leaves holes where it would write zeros): not a mapping fact.
    key = (r["depth"], r["present"], r["zero"] and not r["data"], r["data"])
    if out and out[-1][1] == key and out[-1][0][1] == r["start"]:
        out[-1][0][1] = r["start"] + r["length"]
    else:
        out.append([[r["start"], r["start"] + r["length"]], key])
for (a, b), k in out:
    print(a, b, *k)' "$2.json" >"$2"
}

n=0
for cfg in "32k 33554432" "64k 67108864" "2M 134217728"; do
    read -r cs size <<<"$cfg"
    dir=$TMPD/c$cs
    mkdir -p "$dir"
    FAIL_CONTEXT="cluster_size=$cs seed $SEED"
    mkimg -f qcow2 -o cluster_size=64k "$dir/base.qcow2" "$size"
    qemu-io -f qcow2 -c "write -P 0x5a 0 $((size / 2))" -c "write -z $((size / 4)) 1M" \
        "$dir/base.qcow2" >/dev/null || fail "qemu-io base"
    mkimg -f qcow2 -o "cluster_size=$cs,extended_l2=on" -b base.qcow2 -F qcow2 "$dir/a.qcow2"
    cp "$dir/a.qcow2" "$dir/b.qcow2"
    "$PYTHON" "$TESTS_DIR/gen-ops.py" --seed "$((SEED + n))" --size "$size" \
        --cluster-size "$cs" --ops "$OPS" --segments 1 --no-reads "$dir" || fail "gen-ops.py"
    # Sequential: no aio (QEMU's qcow2 driver is the oracle).
    sed -e 's/^aio_write /write /' -e '/^aio_flush$/d' "$dir/img.0.io" >"$dir/ops.io"
    start_nbd_server "$dir/a.qcow2"
    qio "$NBD_URI" raw <"$dir/ops.io"
    stop_nbd_server
    qio "$dir/b.qcow2" qcow2 <"$dir/ops.io"
    qcompare "$dir/a.qcow2" "$dir/b.qcow2"
    qcheck "$dir/a.qcow2"
    qcheck "$dir/b.qcow2"
    map "$dir/a.qcow2" "$dir/a.map"
    map "$dir/b.qcow2" "$dir/b.map"
    diff -u "$dir/b.map" "$dir/a.map" >&2 ||
        fail "qemu-img map differs from QEMU's (- QEMU, + qublk)"
    echo "ok cluster_size=$cs ($(wc -l <"$dir/ops.io") ops)"
    rm -rf "$dir"
    n=$((n + 1))
done
FAIL_CONTEXT=
echo "$n configurations passed"
