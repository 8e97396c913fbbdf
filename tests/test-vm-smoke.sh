#!/bin/bash
# SPDX-License-Identifier: MIT
# Smoke test of the ublk VM harness (tests/vm/): boots the Debian 6.12 kernel
# under QEMU TCG with the real ublk driver and runs tests/vm/smoke.guest.sh in
# the guest: /dev/ublk-control exists, $QUBLK --help runs, and (once qublk
# has `add`) null and raw devices come and go and a raw device passes
# fio --verify.  Skips (77) when qemu-system-x86_64 or the guest kernel
# cannot be had; tries tests/vm/setup.sh first when running as root.
. "$(dirname "$0")/lib.sh"

require_vm
VM=$TESTS_DIR/vm

rc=0
"$VM/run.sh" --qublk "$QUBLK" --timeout "${QUBLK_VM_TIMEOUT:-600}" \
    "$VM/smoke.guest.sh" || rc=$?
case $rc in
    0) ;;
    77) skip "the VM cannot run here" ;;
    *) fail "guest tests failed (run.sh exit $rc)" ;;
esac
