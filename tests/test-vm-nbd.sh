#!/bin/bash
# SPDX-License-Identifier: MIT
# run.sh: alone
# The kernel's NBD client in the VM (tests/vm/guest/nbd-kernel.sh): ext4 on
# /dev/nbd0 over 4 connections to `qublk nbd` running in the guest,
# blkdiscard, checksums across a reconnect, e2fsck -fn, qemu-img check.
# run.sh: plain build only
# (the ASan build adds nothing the host NBD tests do not already cover,
# and would double a slow TCG run: CI time).
. "$(dirname "$0")/lib.sh"
. "$TESTS_DIR/vm/host-lib.sh"

case $QUBLK in
    *build-asan*) skip "the VM NBD test runs on the plain build only" ;;
esac
require_vm
require_vm_kernel 6.12
t0=$SECONDS
vm_run 6.12 --timeout "${QUBLK_VM_TIMEOUT:-600}" "$TESTS_DIR/vm/guest/nbd-kernel.sh" ||
    fail "guest nbd-kernel.sh failed"
echo "VM wall time: $((SECONDS - t0)) s"
echo "PASS: $TEST_NAME"
