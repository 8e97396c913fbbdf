#!/bin/bash
# SPDX-License-Identifier: MIT
# Smoke test of the ublk VM harness (tests/vm/): boots each guest kernel
# (Debian 6.12 and 7.3) under QEMU TCG with the real ublk driver and runs
# tests/vm/smoke.guest.sh in the guest: /dev/ublk-control exists, $QUBLK
# --help runs, null and raw devices come and go and (6.12 only: the ublk
# suite covers 7.3) a raw device passes fio --verify.  A 7.3 boot that
# oopses before the script is booted again by run.sh.  Skips (77) when
# qemu-system-x86_64 or the guest kernels cannot be had; tries
# tests/vm/setup.sh first when running as root.
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

require_vm
require_vm_kernel 7.3
VM=$TESTS_DIR/vm

for k in 6.12 7.3; do
    quick=0
    [ "$k" = 6.12 ] || quick=1
    vm_run "$k" --timeout "${QUBLK_VM_TIMEOUT:-600}" --env "SMOKE_QUICK=$quick" \
        "$VM/smoke.guest.sh" || fail "guest tests failed on kernel $k"
done
