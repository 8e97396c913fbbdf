# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/multi.guest.sh: run several guest scripts in one boot (a boot
# costs 10-20 s under TCG; tests/test-vm-ublk.sh runs a kernel's whole set
# in one).  The scripts are the *.sh FILES given to run.sh (in /vmtest),
# run in name order, each sourced in its own subshell as vmtest_main
# would; around each one the console gets
#     VMTEST-SCRIPT-BEGIN NAME
#     VMTEST-SCRIPT-END NAME rc=N secs=S
# (S from the guest's uptime), which the host turns into per-script
# times.  A script that fails outside a test fails the run, as alone.
#
# Scripts run alone assume a fresh guest; here the next one inherits what
# the last left behind.  So after each script: file systems still mounted
# from ublk devices are unmounted, devices still there are deleted (del
# --all --force), and its scratch directory (/tmp/ublk-*, the guest's
# RAM) is removed.  Leftovers are reported as VMTEST-WARN lines (run.sh
# prints them), not failures: the scripts' own tests check their cleanup.

# _multi_tidy NAME: undo what script NAME left behind (see above).
_multi_tidy() {
    local name=$1 m left=''
    # Mount points from /proc/mounts whose source is a ublk block device.
    for m in $(awk '$1 ~ /^\/dev\/ublkb/ { print $2 }' /proc/mounts); do
        left+=" mount:$m"
        umount -l "$m" 2>/dev/null || true
    done
    if ls /dev/ublkc* >/dev/null 2>&1; then
        left+=" devices:$(cd /dev && echo ublkc*)"
        qublk del --all --force >/dev/null 2>&1 || true
    fi
    [ -z "$left" ] || echo "VMTEST-WARN $name left behind:$left (removed)"
    rm -rf /tmp/ublk-*
}

_multi_rc=0
for _multi_s in /vmtest/*.sh; do
    case ${_multi_s##*/} in guest-lib.sh|multi.guest.sh) continue ;; esac
    _multi_t0=$(_vmtest_uptime)
    echo "VMTEST-SCRIPT-BEGIN ${_multi_s##*/}"
    # shellcheck disable=SC1090
    (. "$_multi_s")
    _multi_r=$?
    echo "VMTEST-SCRIPT-END ${_multi_s##*/} rc=$_multi_r secs=$(awk -v a="$_multi_t0" -v b="$(_vmtest_uptime)" 'BEGIN { printf "%.1f", b - a }')"
    [ "$_multi_r" = 0 ] || _multi_rc=1
    _multi_tidy "${_multi_s##*/}"
done
exit "$_multi_rc"
