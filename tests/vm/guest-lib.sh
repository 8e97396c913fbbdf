# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest-lib.sh: helpers for guest test scripts (bash, inside the VM).
# /init sources this file and calls vmtest_main SCRIPT, which sources SCRIPT.
# A guest script defines test functions and runs each with `vmtest`:
#
#     t_control() { [ -c /dev/ublk-control ]; }
#     vmtest ublk-control t_control
#
# vmtest NAME FUNC [ARGS...]
#     Runs FUNC in a subshell with `set -eE -o pipefail` and xtrace, its
#     output going straight to the console between the markers
#         VMTEST-BEGIN NAME
#         VMTEST NAME PASS|FAIL|SKIP [reason]
#     Exit 0 passes, 77 (see `skip`) skips, anything else fails.  A test also
#     fails if the kernel logged a WARNING/BUG/Oops/hung task while it ran,
#     or if a sanitizer wrote a report into $VMTEST_SAN_DIR meanwhile (the
#     host passes ASAN_OPTIONS/UBSAN_OPTIONS with log_path there for a
#     sanitizer build: daemons' reports would otherwise sit in their logs),
#     or if it left a /dev/ublk* that is not a device node: a program that
#     opened a device path after the device was gone created a regular
#     file there (in devtmpfs), wrote to it instead, and would shadow the
#     next device of that name; such files are removed.
#     The host (tests/vm/run.sh) reprints a failed test's section at the end.
#     Output is not piped, so a daemon a test leaves behind cannot hold the
#     harness open.
# skip MSG / fail MSG        end the current test (skip: exit 77)
# need CMD...                skip unless every CMD is on $PATH
# wait_for PATH [SECS]       wait (default 20 s) until PATH exists
# kmsg_since N               kernel log lines after line N (see kmsg_mark)
# vm_export FILE [NAME]      hand FILE back to the host: with run.sh
#                            --export DIR it appears as DIR/NAME (default: its
#                            base name) after the VM exits.  The file is
#                            hard-linked (or copied) now and written out when
#                            the script ends, so export it in its final state.
# ublk_has FEATURE           the ublk driver offers FEATURE (a name from
#                            `qublk features`, e.g. safe_stop_dev)
# ublk_dump ID [PID...]      what a stuck ublk daemon is doing: its log
#                            (<run dir>/ublkID.log), the kernel stacks and
#                            wait channels of every thread of each PID,
#                            `qublk list` and the kernel log's tail
# Environment in the guest: QUBLK (the binary under test, also on $PATH as
# qublk), VMTEST_SCRIPT, VMTEST_DIR=/vmtest (script and extra files), and
# whatever the host passed with run.sh --env.  Scratch space: /tmp (tmpfs,
# shares the VM's 2 GiB with everything else).

VMTEST_DIR=/vmtest
VMTEST_RESULTS=/tmp/.vmtest-results
VMTEST_XTRACE=${VMTEST_XTRACE:-1}
export VMTEST_DIR

skip() {
    echo "SKIP: $*"
    exit 77
}

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# Helpers turn xtrace off for their own lines (`local -` restores it).
need() {
    { local -; set +x; } 2>/dev/null
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || skip "'$c' not in the guest"
    done
}

wait_for() {
    { local -; set +x; } 2>/dev/null
    local path=$1 secs=${2:-20} i
    for ((i = 0; i < secs * 10; i++)); do
        [ -e "$path" ] && return 0
        sleep 0.1
    done
    echo "wait_for: $path did not appear within $secs s" >&2
    return 1
}

VMTEST_EXPORT_STAGE=/tmp/.vmtest-export
vm_export() {
    local src=$1 name=${2:-${1##*/}}
    [ -n "${VMTEST_EXPORT_DEV:-}" ] || { echo "vm_export: run.sh has no --export DIR; $src not exported" >&2; return 0; }
    mkdir -p "$VMTEST_EXPORT_STAGE"
    ln -f "$src" "$VMTEST_EXPORT_STAGE/$name" 2>/dev/null || cp "$src" "$VMTEST_EXPORT_STAGE/$name"
}

# Write the staged files as a tar archive onto the export disk.
_vmtest_export_flush() {
    [ -n "${VMTEST_EXPORT_DEV:-}" ] && [ -d "$VMTEST_EXPORT_STAGE" ] || return 0
    if ! tar -cf "$VMTEST_EXPORT_DEV" -C "$VMTEST_EXPORT_STAGE" .; then
        echo "VMTEST-ERROR writing the exported files to $VMTEST_EXPORT_DEV failed"
        return 1
    fi
    sync
    echo "VMTEST-EXPORT $(find "$VMTEST_EXPORT_STAGE" -type f | wc -l) files"
}

ublk_has() {
    { local -; set +x; } 2>/dev/null
    qublk features --output json | grep -q "{\"name\": \"$1\", \"bit\": [0-9]*, \"supported\": true"
}

ublk_dump() {
    { local -; set +x; } 2>/dev/null
    local id=$1 pid t; shift
    echo "---- ublk_dump ublk$id ----"
    qublk list 2>&1 || true
    for pid in "$@"; do
        [ -d "/proc/$pid" ] || { echo "pid $pid: gone"; continue; }
        for t in /proc/"$pid"/task/*; do
            echo "pid $pid thread ${t##*/} ($(cat "$t/comm" 2>/dev/null)):" \
                "state $(awk '{print $3}' "$t/stat" 2>/dev/null) wchan $(cat "$t/wchan" 2>/dev/null)"
            sed 's/^/    /' "$t/stack" 2>/dev/null || true
        done
    done
    echo "---- /run/qublk/ublk$id.log ----"
    cat "/run/qublk/ublk$id.log" 2>&1 || true
    echo "---- dmesg (tail) ----"
    dmesg | tail -n 30
    echo "---- end of ublk_dump ----"
}

kmsg_mark() { dmesg | wc -l; }
kmsg_since() { dmesg | tail -n +"$(($1 + 1))"; }

_vmtest_uptime() { cut -d' ' -f1 /proc/uptime; }

# /dev/ublk* entries that are not device nodes.
_vmtest_dev_impostors() {
    local f
    for f in /dev/ublk*; do
        [ -e "$f" ] || [ -L "$f" ] || continue
        [ -b "$f" ] || [ -c "$f" ] || echo "$f"
    done
}

# Sanitizer reports (files log_path.PID) in $VMTEST_SAN_DIR, if set.
_vmtest_san_reports() {
    [ -n "${VMTEST_SAN_DIR:-}" ] || return 0
    find "$VMTEST_SAN_DIR" -type f 2>/dev/null | sort
}

vmtest() {
    local name=$1; shift
    [ $# -ge 1 ] || { echo "vmtest $name: no test function" >&2; return 1; }
    local rc=0 t0 t1 mark bad verdict reason='' errexit=0 san0 san f
    mark=$(kmsg_mark)
    san0=$(_vmtest_san_reports)
    t0=$(_vmtest_uptime)
    echo "VMTEST-BEGIN $name"
    # The subshell must not run in a conditional context (`( ) || rc=$?`),
    # or bash ignores its `set -e`; so drop the caller's -e for the moment.
    [[ $- == *e* ]] && errexit=1
    set +e
    (
        set -eE -o pipefail
        trap '{ set +x; } 2>/dev/null; echo "VMTEST-ERR ${BASH_SOURCE[0]##*/}:$LINENO: \`$BASH_COMMAND\` exited with status $?" >&2' ERR
        if [ "$VMTEST_XTRACE" = 1 ]; then
            PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '
            set -x
        fi
        "$@"
    ) </dev/null 2>&1
    rc=$?
    [ "$errexit" = 0 ] || set -e
    t1=$(_vmtest_uptime)
    bad=$(kmsg_since "$mark" | grep -E 'WARNING:|BUG:|Oops|general protection|INFO: task .* blocked|Call Trace:|UBSAN:|KASAN:' || true)
    # The one warning emulation itself causes: 7.3's deadline-server timer
    # (dl_task_timer -> hrtimer_forward, in a timer interrupt) when a
    # loaded TCG host stalls a vCPU.  Ignored only if it is the only
    # warning and no frame of ublk, io_uring or the block layer is in it.
    if [ -n "$bad" ] && [ "$(echo "$bad" | grep -c 'WARNING:')" = 1 ] &&
       echo "$bad" | grep -q 'WARNING: kernel/time/hrtimer.c:.* hrtimer_forward' &&
       kmsg_since "$mark" | grep -q 'dl_task_timer' &&
       ! kmsg_since "$mark" | grep -v -e 'Modules linked in' -e ' Comm: ' -e 'WARNING:' |
           grep -Eq 'ublk|io_uring|blk_|BUG:|Oops|blocked|UBSAN:|KASAN:'; then
        echo "kernel log during $name: hrtimer_forward warning from dl_task_timer (vCPU stall under TCG), ignored"
        bad=
    fi
    if [ -n "$bad" ]; then
        echo "kernel log during $name:"
        kmsg_since "$mark" | tail -n 80
        if [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ]; then rc=1; fi
        reason="(kernel warning)"
    fi
    bad=$(_vmtest_dev_impostors)
    if [ -n "$bad" ]; then
        echo "not device nodes, removed:" $bad
        ls -l $bad
        rm -f $bad
        if [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ]; then rc=1; fi
        reason="(a file in place of a device node)"
    fi
    san=$(_vmtest_san_reports | grep -vxF -f <(echo "$san0") | grep . || true)
    if [ -n "$san" ]; then
        for f in $san; do echo "sanitizer report $f:"; cat "$f"; done
        if [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ]; then rc=1; fi
        reason="(sanitizer report)"
    fi
    case $rc in
        0) verdict=PASS ;;
        77) verdict=SKIP ;;
        *) verdict=FAIL; [ -n "$reason" ] || reason="(exit $rc)" ;;
    esac
    echo "$verdict $name" >>"$VMTEST_RESULTS"
    echo "VMTEST $name $verdict ${reason:+$reason }[$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f s", b - a }')]"
    return 0
}

vmtest_main() {
    local script=$1 rc=0 p f s
    : >"$VMTEST_RESULTS"
    if [ -n "${VMTEST_SAN_DIR:-}" ]; then
        mkdir -p "$VMTEST_SAN_DIR"
        chmod 1777 "$VMTEST_SAN_DIR"   # reports of users' processes too
    fi
    if [ -n "${QUBLK:-}" ]; then
        export QUBLK
    fi
    # The script runs in a subshell: its own `set -e` or `exit` ends the
    # script, not the harness.
    set +e
    # shellcheck disable=SC1090
    (. "$script")
    rc=$?
    p=$(grep -c '^PASS ' "$VMTEST_RESULTS" || true)
    f=$(grep -c '^FAIL ' "$VMTEST_RESULTS" || true)
    s=$(grep -c '^SKIP ' "$VMTEST_RESULTS" || true)
    echo "VMTEST-SUMMARY $p passed, $f failed, $s skipped (script exit $rc)"
    _vmtest_export_flush || rc=1
    if [ "$rc" -ne 0 ]; then
        echo "VMTEST-ERROR guest script $script exited with status $rc outside a test"
        return 1
    fi
    [ "$f" -eq 0 ]
}
