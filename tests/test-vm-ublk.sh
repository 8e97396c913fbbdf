#!/bin/bash
# SPDX-License-Identifier: MIT
# The ublk acceptance tests against the real kernel driver, in the VM
# (tests/vm/), on both guest kernels:
#   7.3   the full set, tests/vm/guest/ublk-*.sh: fio --verify over raw,
#         qcow2 and qcow2-with-backing devices with 1 and 2 queues,
#         whole-device reads vs qemu-img convert, qemu-img check after del,
#         discard/write-zeroes vs qemu-io, read-only devices, ext4 across
#         del/add, kill -9 under load, image locks, `qublk features`,
#         kill -9 + `qublk recover` at random moments under fio verify and
#         ext4, `qublk upgrade` under fio verify;
#   6.12  what differs between the kernels (Debian 12's): features,
#         kill -9 without recovery, recover (fewer kills), upgrade without
#         QUIESCE_DEV.
# Both: concurrent requests on disjoint ranges that share clusters through
# two queues (ublk-race).  QUBLK_SEED=N replays the random parts.
# QUBLK_VM_KERNELS limits the kernels ("7.3", "6.12"); QUBLK_VM_GUEST limits
# the guest scripts (a glob: ublk-$QUBLK_VM_GUEST.sh).
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
VM=$TESTS_DIR/vm
read -r -a kernels <<<"${QUBLK_VM_KERNELS:-7.3 6.12}"

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
for k in "${kernels[@]}"; do
    require_vm_kernel "$k"
    envs=()
    case $k in
        7.3) set_=(); for g in "$VM"/guest/ublk-*.sh; do set_+=("${g##*/}"); done ;;
        6.12) set_=(ublk-features.sh ublk-kill.sh ublk-recover.sh ublk-upgrade.sh ublk-race.sh)
              envs=(--env "RECOVER_ONLY=q2-backing ext4" --env RECOVER_KILLS=2) ;;
        *) fail "unknown kernel $k" ;;
    esac
    for s in "${set_[@]}"; do
        g=$VM/guest/$s
        # shellcheck disable=SC2053 # (a glob on purpose)
        [[ ${g##*/} == ublk-${QUBLK_VM_GUEST:-*}.sh ]] || continue
        echo "== kernel $k: $g"
        files=()
        case $g in
            */ublk-race.sh)
                [ -d "$TMPD/files/race" ] || race_files "$TMPD/files"
                files=("$TMPD/files/ublk-race" "$TMPD/files/race") ;;
        esac
        t0=$SECONDS
        vm_run "$k" --timeout "${QUBLK_VM_TIMEOUT:-1500}" "${envs[@]}" \
            --env "QUBLK_SEED=$SEED" "$g" "${files[@]}" || {
            echo "guest script $g failed on kernel $k"; rc=1; }
        echo "== kernel $k: ${g##*/}: $((SECONDS - t0)) s"
    done
done
[ $rc = 0 ] || fail "ublk guest tests failed"
