#!/bin/bash
# SPDX-License-Identifier: MIT
# Smoke test of the ublk VM harness (tests/vm/): boots the Debian 6.12 kernel
# under QEMU TCG with the real ublk driver and runs tests/vm/smoke.guest.sh in
# the guest: /dev/ublk-control exists, $QUBLK --help runs, and (once qublk
# has `add`) null and raw devices come and go and a raw device passes
# fio --verify.  Skips (77) when qemu-system-x86_64 or the guest kernel
# cannot be had; tries tests/vm/setup.sh first when running as root.
. "$(dirname "$0")/lib.sh"

[ -x "$QUBLK" ] || skip "$QUBLK not built"
VM=$TESTS_DIR/vm
CACHE=${QUBLK_VM_CACHE:-$VM/.cache}
if ! command -v qemu-system-x86_64 >/dev/null || [ ! -e "$CACHE/kernel/vmlinuz" ]; then
    if [ "$(id -u)" = 0 ]; then
        "$VM/setup.sh" || skip "tests/vm/setup.sh failed: no VM here"
    else
        skip "no qemu-system-x86_64 or guest kernel (run tests/vm/setup.sh)"
    fi
fi

rc=0
"$VM/run.sh" --qublk "$QUBLK" --timeout "${QUBLK_VM_TIMEOUT:-600}" \
    "$VM/smoke.guest.sh" || rc=$?
case $rc in
    0) ;;
    77) skip "the VM cannot run here" ;;
    *) fail "guest tests failed (run.sh exit $rc)" ;;
esac
