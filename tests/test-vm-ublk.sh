#!/bin/bash
# SPDX-License-Identifier: MIT
# The ublk acceptance tests against the real kernel driver, in the VM
# (tests/vm/): fio --verify over raw, qcow2 and qcow2-with-backing devices
# with 1 and 2 queues, whole-device reads vs qemu-img convert, qemu-img
# check after del, discard/write-zeroes vs qemu-io, read-only devices,
# ext4 across del/add with e2fsck and checksums, kill -9 under load,
# image locks held by the add daemon (qemu-io and a second add refused).
# Guest scripts: tests/vm/guest/ublk-*.sh (or those matching $QUBLK_VM_GUEST).
. "$(dirname "$0")/lib.sh"

require_vm
VM=$TESTS_DIR/vm

rc=0
for g in "$VM"/guest/ublk-${QUBLK_VM_GUEST:-*}.sh; do
    echo "== $g"
    r=0
    "$VM/run.sh" --qublk "$QUBLK" --timeout "${QUBLK_VM_TIMEOUT:-900}" "$g" || r=$?
    case $r in
        0) ;;
        77) skip "the VM cannot run here" ;;
        *) echo "guest script $g failed (run.sh exit $r)"; rc=1 ;;
    esac
done
[ $rc = 0 ] || fail "ublk guest tests failed"
