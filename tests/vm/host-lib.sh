# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/host-lib.sh: helpers for the host halves of the VM tests
# (tests/test-vm-*.sh), sourced after tests/lib.sh.
#   require_vm_kernel V   skip unless guest kernel V (6.12, 7.3) is in the
#                         cache; as root, tries tests/vm/setup.sh V first
#   vm_run V ARGS...      tests/vm/run.sh --kernel V --qublk $QUBLK ARGS...;
#                         returns its exit status, skips the test on 77

require_vm_kernel() {
    local k=$1 cache=${QUBLK_VM_CACHE:-$TESTS_DIR/vm/.cache}
    [ -e "$cache/kernel-$k/vmlinuz" ] && return 0
    [ "$k" = 6.12 ] && [ -e "$cache/kernel/vmlinuz" ] && return 0
    if [ "$(id -u)" = 0 ]; then
        "$TESTS_DIR/vm/setup.sh" "$k" || skip "tests/vm/setup.sh $k failed: no $k guest kernel"
    else
        skip "no $k guest kernel (run tests/vm/setup.sh)"
    fi
}

vm_run() {
    local k=$1 rc=0; shift
    "$TESTS_DIR/vm/run.sh" --kernel "$k" --qublk "$QUBLK" "$@" || rc=$?
    [ "$rc" != 77 ] || skip "the VM cannot run here"
    return "$rc"
}
