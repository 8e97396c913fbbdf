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
# QUBLK_VM_KERNELS limits the kernels ("7.3", "6.12"); QUBLK_VM_GUEST limits
# the guest scripts (a glob: ublk-$QUBLK_VM_GUEST.sh).
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
VM=$TESTS_DIR/vm
read -r -a kernels <<<"${QUBLK_VM_KERNELS:-7.3 6.12}"

rc=0
for k in "${kernels[@]}"; do
    require_vm_kernel "$k"
    envs=()
    case $k in
        7.3) set_=(); for g in "$VM"/guest/ublk-*.sh; do set_+=("${g##*/}"); done ;;
        6.12) set_=(ublk-features.sh ublk-kill.sh ublk-recover.sh ublk-upgrade.sh)
              envs=(--env "RECOVER_ONLY=q2-backing ext4" --env RECOVER_KILLS=2) ;;
        *) fail "unknown kernel $k" ;;
    esac
    for s in "${set_[@]}"; do
        g=$VM/guest/$s
        # shellcheck disable=SC2053 # (a glob on purpose)
        [[ ${g##*/} == ublk-${QUBLK_VM_GUEST:-*}.sh ]] || continue
        echo "== kernel $k: $g"
        t0=$SECONDS
        vm_run "$k" --timeout "${QUBLK_VM_TIMEOUT:-1500}" "${envs[@]}" "$g" || {
            echo "guest script $g failed on kernel $k"; rc=1; }
        echo "== kernel $k: ${g##*/}: $((SECONDS - t0)) s"
    done
done
[ $rc = 0 ] || fail "ublk guest tests failed"
