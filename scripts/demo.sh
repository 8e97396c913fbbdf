#!/bin/bash
# SPDX-License-Identifier: MIT
# The main job: build qublk, serve a fresh qcow2 image as a ublk block
# device, put ext4 on it, fill it, remove the device, and let QEMU check
# the image.  Where this kernel has ublk_drv (and we are root) it runs
# here; otherwise it boots the project's VM (tests/vm/) and runs there.
#   scripts/demo.sh            (as root on a fresh Debian: sudo .ci/setup first)
set -euo pipefail
cd "$(dirname "$0")/.."
make -j"$(nproc)" >/dev/null

if [ "$(id -u)" = 0 ] && { [ -e /dev/ublk-control ] || modprobe ublk_drv 2>/dev/null; }; then
    echo "== ublk_drv present: running on this host"
    export QUBLK=$PWD/build/qublk
    vmtest() { local n=$1; shift; echo "== $n"; "$@"; }
    fail() { echo "FAIL: $*" >&2; exit 1; }
    wait_for() { for _ in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.1; done; fail "no $1"; }
    # shellcheck source=../tests/vm/demo.guest.sh
    . tests/vm/demo.guest.sh
else
    echo "== no ublk_drv here: running in the VM (tests/vm/run.sh)"
    tests/vm/run.sh --qublk build/qublk --timeout 900 tests/vm/demo.guest.sh
fi
