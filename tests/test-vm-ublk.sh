#!/bin/bash
# SPDX-License-Identifier: MIT
# The ublk acceptance tests against the real kernel driver, in the VM
# (tests/vm/): fio --verify over raw, qcow2 and qcow2-with-backing devices
# with 1 and 2 queues, whole-device reads vs qemu-img convert, qemu-img
# check after del, discard/write-zeroes vs qemu-io, read-only devices,
# ext4 across del/add with e2fsck and checksums, kill -9 under load,
# concurrent requests on disjoint ranges that share clusters through two
# queues (ublk-race).
# Guest scripts: tests/vm/guest/ublk-*.sh (or those matching $QUBLK_VM_GUEST).
# QUBLK_SEED=N replays the random parts (printed at the start).
. "$(dirname "$0")/lib.sh"

require_vm
VM=$TESTS_DIR/vm

requires qemu-img qemu-io

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
echo "seed $SEED (replay: QUBLK_SEED=$SEED ${QUBLK_VM_GUEST:+QUBLK_VM_GUEST=$QUBLK_VM_GUEST }$0)"

# race_files DIR: what guest/ublk-race.sh needs besides the script:
# ublk-race from the same build as $QUBLK, and per cluster size the
# starting content of the compressed and backing-file cases (init-CS.raw,
# patterned data from gen-ops.py --init) and its compressed image
# (compressed-CS.qcow2).  Made here because qemu-img convert -c takes
# minutes under TCG.  Sizes match img_size in the guest script.
race_files() {
    local dir=$1 cs size
    local race
    race=$(dirname "$QUBLK")/ublk-race
    [ -x "$race" ] || fail "$race not built (make)"
    mkdir -p "$dir/race"
    cp "$race" "$dir/ublk-race"
    for cs in 512:2M 4k:4M 64k:8M 2M:16M; do
        size=${cs#*:} cs=${cs%:*}
        gen_ops --seed "$SEED" --size "$size" --cluster-size "$cs" --init \
            --segments 0 "$dir/race"
        mkimg -f raw "$dir/race/init-$cs.raw" "$size"
        qio "$dir/race/init-$cs.raw" raw <"$dir/race/init.io"
        qemu-img convert -c -f raw -O qcow2 -o "cluster_size=$cs" \
            "$dir/race/init-$cs.raw" "$dir/race/compressed-$cs.qcow2" \
            || fail "qemu-img convert -c failed"
    done
    rm -f "$dir/race/init.io"
}

rc=0
for g in "$VM"/guest/ublk-${QUBLK_VM_GUEST:-*}.sh; do
    echo "== $g"
    files=()
    case $g in
        */ublk-race.sh)
            race_files "$TMPD/files"
            files=("$TMPD/files/ublk-race" "$TMPD/files/race") ;;
    esac
    r=0
    "$VM/run.sh" --qublk "$QUBLK" --timeout "${QUBLK_VM_TIMEOUT:-900}" \
        --env "QUBLK_SEED=$SEED" "$g" "${files[@]}" || r=$?
    case $r in
        0) ;;
        77) skip "the VM cannot run here" ;;
        *) echo "guest script $g failed (run.sh exit $r)"; rc=1 ;;
    esac
done
[ $rc = 0 ] || fail "ublk guest tests failed"
