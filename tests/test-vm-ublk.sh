#!/bin/bash
# SPDX-License-Identifier: MIT
# The ublk acceptance tests against the real kernel driver, in the VM
# (tests/vm/), each kernel's set in one boot (tests/vm/multi.guest.sh):
#   7.3   the full set, tests/vm/guest/ublk-*.sh: fio --verify over raw,
#         qcow2 and qcow2-with-backing devices with 1 and 2 queues,
#         whole-device reads vs qemu-img convert, qemu-img check after del,
#         discard/write-zeroes vs qemu-io, read-only devices, ext4 across
#         del/add, kill -9 under load, image locks, `qublk features`,
#         kill -9 + `qublk recover` under fio verify and ext4, add
#         --recover-on-restart, `qublk upgrade` under fio verify (with
#         QUIESCE_DEV), safe stop, online resize under ext4, unprivileged
#         devices, live internal snapshots under fio --verify and kill -9
#         during one;
#   6.12  what differs on Debian 12's kernel: features, kill -9 without
#         recovery, recover (fewer cases and kills), upgrade without
#         QUIESCE_DEV, resize refused (no UPDATE_SIZE).
# That is for the plain build.  The ASan build gets a short smoke on 7.3
# only (one hand-over, a crash and --recover-on-restart, a busy del):
# the daemon paths the sanitizers watch, in a fraction of the time.
# On 7.3 the CI run trims fio sizes and recover's matrix (QUBLK_VM_FULL=1:
# everything, full size).  Prints each guest script's time (guest
# uptime) and the kernel's wall time.  QUBLK_VM_KERNELS limits the
# kernels ("7.3", "6.12");
# QUBLK_VM_GUEST limits the guest scripts (a glob: ublk-$QUBLK_VM_GUEST.sh).
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
VM=$TESTS_DIR/vm
read -r -a kernels <<<"${QUBLK_VM_KERNELS:-7.3 6.12}"
asan=0
[[ $(basename "$(dirname "$QUBLK")") != *asan* ]] || asan=1

rc=0 total=0
for k in "${kernels[@]}"; do
    envs=()
    if [ "$asan" = 1 ]; then
        [ "$k" = 7.3 ] || { echo "== kernel $k: not for the ASan build (7.3 smoke only)"; continue; }
        set_=(ublk-recover.sh ublk-stop.sh ublk-upgrade.sh)
        envs=(--env "RECOVER_ONLY=restart" --env "UPGRADE_ONLY=q2" --env UPGRADES=1)
    else
        case $k in
            7.3) set_=(); for g in "$VM"/guest/ublk-*.sh; do set_+=("${g##*/}"); done
                 # The CI budget: smaller fio runs, and of recover's fio
                 # matrix (q1/q2 x backing) the corners; QUBLK_VM_FULL=1
                 # runs all of it at full size.
                 [ "${QUBLK_VM_FULL:-0}" = 1 ] ||
                     envs=(--env UBLK_TEST_FIO_SIZE=24M --env RECOVER_KILLS=2
                           --env "RECOVER_ONLY=q1 q2-backing ext4 restart del") ;;
            6.12) set_=(ublk-features.sh ublk-kill.sh ublk-recover.sh ublk-resize.sh ublk-upgrade.sh)
                  envs=(--env "RECOVER_ONLY=q2-backing ext4" --env RECOVER_KILLS=2
                        --env "UPGRADE_ONLY=q2 refusals") ;;
            *) fail "unknown kernel $k" ;;
        esac
    fi
    files=()
    for s in "${set_[@]}"; do
        # shellcheck disable=SC2053 # (a glob on purpose)
        [[ $s == ublk-${QUBLK_VM_GUEST:-*}.sh ]] && files+=("$VM/guest/$s")
    done
    [ ${#files[@]} -gt 0 ] || continue
    require_vm_kernel "$k"
    echo "== kernel $k: ${files[*]##*/}"
    t0=$SECONDS
    vm_run "$k" --timeout "${QUBLK_VM_TIMEOUT:-1800}" --log "$TMPD/console-$k.log" "${envs[@]}" \
        "$VM/multi.guest.sh" "${files[@]}" || { echo "guest tests failed on kernel $k"; rc=1; }
    sed -n 's/^VMTEST-SCRIPT-END \([^ ]*\) rc=\([0-9]*\) secs=\(.*\)/== kernel '"$k"': \1: \3 s (rc \2)/p' \
        "$TMPD/console-$k.log"
    echo "== kernel $k: $((SECONDS - t0)) s wall"
    total=$((total + SECONDS - t0))
done
echo "== VM total: $total s wall"
[ $rc = 0 ] || fail "ublk guest tests failed"
