#!/bin/bash
# SPDX-License-Identifier: MIT
# Smoke test of the ublk VM harness (tests/vm/): boots each guest kernel
# (Debian 6.12 and 7.3) under QEMU TCG with the real ublk driver and runs
# tests/vm/smoke.guest.sh in the guest: /dev/ublk-control exists, $QUBLK
# --help runs, null and raw devices come and go and (6.12 only: the ublk
# suite covers 7.3) a raw device passes fio --verify.  A 7.3 boot that
# oopses before the script is booted again by run.sh.  Skips (77) when
# qemu-system-x86_64 or the guest kernels cannot be had; tries
# tests/vm/setup.sh first when running as root.  The ASan build boots
# 7.3 only, with the fio run (the CI budget: tests/test-vm-ublk.sh).
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
require_vm_kernel 7.3
VM=$TESTS_DIR/vm
runs=("6.12 0" "7.3 1")
[[ $(basename "$(dirname "$QUBLK")") != *asan* ]] || runs=("7.3 0")

for r in "${runs[@]}"; do
    read -r k quick <<<"$r"
    t0=$SECONDS
    vm_run "$k" --timeout "${QUBLK_VM_TIMEOUT:-600}" --env "SMOKE_QUICK=$quick" \
        "$VM/smoke.guest.sh" || fail "guest tests failed on kernel $k"
    echo "== kernel $k: $((SECONDS - t0)) s wall"
done
