#!/bin/bash
# SPDX-License-Identifier: MIT
# run.sh: alone
# run.sh: timeout 2400
# The ublk acceptance tests against the real kernel driver, in the VM
# (tests/vm/), one boot per kernel (tests/vm/multi.guest.sh runs a
# kernel's scripts in it).  Every boot starts with the harness's smoke
# (tests/vm/smoke.guest.sh: the driver is there, qublk runs, a null
# device comes and goes; its fio run is left to the scripts after it).
# The plain build:
#   7.3   the full set, tests/vm/guest/ublk-*.sh: fio --verify over raw,
#         qcow2 and qcow2-with-backing devices with 1 and 2 queues,
#         whole-device reads vs qemu-img convert, qemu-img check after del,
#         discard/write-zeroes vs qemu-io, read-only devices, ext4 across
#         del/add, kill -9 under load, image locks, `qublk features`,
#         kill -9 + `qublk recover` under fio verify and ext4, add
#         --recover-on-restart, `qublk upgrade` under fio verify (with
#         QUIESCE_DEV), safe stop, online resize under ext4, unprivileged
#         devices, thin provisioning (fstrim vs QEMU, --discard ignore),
#         concurrent requests on disjoint ranges that share clusters
#         through two queues (ublk-race; QUBLK_SEED=N replays it), live
#         internal snapshots under fio --verify and kill -9 during one;
#         with trimmed fio sizes and recover's matrix cut to its corners
#         (QUBLK_VM_FULL=1: everything, full size);
#   6.12  a smoke of what differs on Debian 12's kernel: features, kill -9
#         without recovery (qcow2), recover (two cases, one kill each),
#         upgrade without QUIESCE_DEV, resize refused (no UPDATE_SIZE),
#         fio --verify through an image's mapping (copies, not zero copy).
# The ASan/UBSan build: a smoke of the daemon paths the sanitizers watch,
# on 7.3 --recover-on-restart after a kill under fio, a busy del and
# --force, one hand-over with 2 queues under fio, on 6.12 fio --verify
# through an image's mapping, copied and by user copy alone; the guest
# processes write sanitizer reports to a directory the harness checks
# after every test (tests/vm/guest-lib.sh).
# Prints each guest script's time (guest uptime) and each boot's wall
# time as TIMING lines (tests/run.sh shows them).  QUBLK_VM_KERNELS
# limits the kernels ("7.3", "6.12"); QUBLK_VM_GUEST limits the guest
# scripts (a glob: ublk-$QUBLK_VM_GUEST.sh; the smoke always runs).
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
VM=$TESTS_DIR/vm
read -r -a kernels <<<"${QUBLK_VM_KERNELS:-7.3 6.12}"
asan=0
[[ $(basename "$(dirname "$QUBLK")") != *asan* ]] || asan=1

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

rc=0 total=0
for k in "${kernels[@]}"; do
    envs=()
    if [ "$asan" = 1 ]; then
        case $k in
            7.3) set_=(ublk-recover.sh ublk-stop.sh ublk-upgrade.sh)
                 envs=(--env "RECOVER_ONLY=restart" --env "UPGRADE_ONLY=q2" --env UPGRADES=1) ;;
            # User copy alone (QUBLK_USER_COPY=1) and mapped I/O: the
            # paths only this kernel takes.
            6.12) set_=(ublk-data.sh)
                  envs=(--env DATA_ONLY=ublk-fio-mapped) ;;
            *) fail "unknown kernel $k" ;;
        esac
        envs+=(--env VMTEST_SAN_DIR=/tmp/vmtest-san
              --env "ASAN_OPTIONS=log_path=/tmp/vmtest-san/asan:detect_leaks=1"
              --env "UBSAN_OPTIONS=log_path=/tmp/vmtest-san/ubsan:print_stacktrace=1:halt_on_error=1")
    else
        case $k in
            7.3) set_=(); for g in "$VM"/guest/ublk-*.sh; do set_+=("${g##*/}"); done
                 # The CI budget: smaller fio runs, of recover's fio
                 # matrix (q1/q2 x backing) the corners (three kills at
                 # random moments in each, and in ext4: ten with the
                 # restart case), two hand-overs per upgrade run;
                 # QUBLK_VM_FULL=1 runs all of it at full size.
                 [ "${QUBLK_VM_FULL:-0}" = 1 ] ||
                     envs=(--env UBLK_TEST_FIO_SIZE=24M --env RECOVER_KILLS=3 --env UPGRADES=2
                           --env "RECOVER_ONLY=q1 q2-backing ext4 restart del") ;;
            # A smoke of what differs on this kernel.  A killed daemon's
            # requests wait for timeouts here: one kill case, one kill per
            # recover case.  ublk-race (minutes under TCG) checks the
            # daemon's request handling, which 7.3 runs in full.
            6.12) set_=(ublk-data.sh ublk-features.sh ublk-kill.sh ublk-recover.sh ublk-resize.sh
                        ublk-upgrade.sh)
                  envs=(--env DATA_ONLY=ublk-fio-mapped --env KILL_ONLY=qcow2
                        --env "RECOVER_ONLY=q2-backing ext4"
                        --env RECOVER_KILLS=1 --env UPGRADES=2 --env "UPGRADE_ONLY=q2 refusals") ;;
            *) fail "unknown kernel $k" ;;
        esac
    fi
    # The smoke's own fio run is left out: the scripts after it run fio.
    envs+=(--env SMOKE_QUICK=1)
    files=("$VM/smoke.guest.sh")
    for s in "${set_[@]}"; do
        # shellcheck disable=SC2053 # (a glob on purpose)
        [[ $s == ublk-${QUBLK_VM_GUEST:-*}.sh ]] || continue
        files+=("$VM/guest/$s")
        if [ "$s" = ublk-race.sh ]; then
            [ -d "$TMPD/files/race" ] || race_files "$TMPD/files"
            files+=("$TMPD/files/ublk-race" "$TMPD/files/race")
        fi
    done
    require_vm_kernel "$k"
    echo "== kernel $k: ${files[*]##*/}"
    t0=$SECONDS
    vm_run "$k" --timeout "${QUBLK_VM_TIMEOUT:-1800}" --log "$TMPD/console-$k.log" "${envs[@]}" \
        --env "QUBLK_SEED=$SEED" "$VM/multi.guest.sh" "${files[@]}" || { echo "guest tests failed on kernel $k"; rc=1; }
    sed -n 's/^VMTEST-SCRIPT-END \([^ ]*\) rc=\([0-9]*\) secs=\(.*\)/TIMING kernel '"$k"': \1: \3 s (rc \2)/p' \
        "$TMPD/console-$k.log"
    echo "TIMING kernel $k: $((SECONDS - t0)) s wall (boot, initramfs and all)"
    total=$((total + SECONDS - t0))
done
echo "TIMING VM total: $total s wall"
[ $rc = 0 ] || fail "ublk guest tests failed"
