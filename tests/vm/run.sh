#!/bin/bash
# SPDX-License-Identifier: MIT
# tests/vm/run.sh: run a guest test script inside a QEMU VM (TCG) on a
# Debian kernel (6.12 or 7.3), whose real ublk_drv is loaded at boot.
#
#   tests/vm/run.sh [options] GUEST_SCRIPT [FILES...]
#     --kernel 6.12|7.3  guest kernel (default $QUBLK_VM_KERNEL or 6.12)
#     --timeout SECS   kill the VM after SECS (default $QUBLK_VM_TIMEOUT or 600)
#     --qublk BIN      binary copied in as /usr/local/bin/qublk ($QUBLK in the
#                      guest); default $QUBLK, else build/qublk; "none" for none
#     --env NAME=VAL   set NAME in the guest (repeatable)
#     --mem SIZE       guest memory (default 2G)      --smp N  vCPUs (default 2)
#     --log FILE       keep the console log in FILE (default: a temp file,
#                      removed on success)
#     --append ARGS    extra kernel command line
#     --quiet          do not stream the console; print only the results
#     --export DIR     attach an export disk (/dev/vda in the guest): files
#                      the guest passed to vm_export are extracted into DIR
#                      after the VM exits (even when a test failed)
#     --export-size S  the export disk's size (sparse; default 4G)
# GUEST_SCRIPT and FILES are copied into the guest's /vmtest/ (ELF files
# with their libraries); see tests/vm/README.md for writing guest tests.
#
# The guest prints "VMTEST-START" when /init hands over to the script,
# "VMTEST NAME PASS|FAIL|SKIP" per test and "VMTEST-DONE rc=N" before
# powering off.  A boot that never reaches VMTEST-START (the 7.3 kernel
# oopses early in about 1 boot in 15 under TCG; a boot may also hang) is
# not a test result: the VM is booted again, up to $QUBLK_VM_BOOTS times
# (default 3) in all, each boot given $QUBLK_VM_BOOT_TIMEOUT s (default
# 180) to get there.  We stream the console, then print one line per
# test, each failed test's console section again, and a closing line
# "vm: N passed, N failed, N skipped".
# Exit: 0 all tests passed or skipped; 1 a test failed, the guest script
# failed, the VM timed out or died without VMTEST-DONE; 77 the VM cannot run
# here (no qemu-system-x86_64 or no kernel: run tests/vm/setup.sh); 2 usage.
set -uo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(cd "$VM_DIR/../.." && pwd)
CACHE=${QUBLK_VM_CACHE:-$VM_DIR/.cache}
export QUBLK_VM_CACHE=$CACHE

usage() { sed -n '4,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

TIMEOUT=${QUBLK_VM_TIMEOUT:-600}
KVER=${QUBLK_VM_KERNEL:-6.12}
BOOTS=${QUBLK_VM_BOOTS:-3}
BOOT_TIMEOUT=${QUBLK_VM_BOOT_TIMEOUT:-180}
QUBLK_BIN=${QUBLK:-$TOP/build/qublk}
MEM=2G SMP=2 LOG='' APPEND='' QUIET=0
ENVS=()
EXPORT_DIR='' EXPORT_SIZE=4G
while [ $# -gt 0 ]; do
    case $1 in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --kernel) KVER=$2; shift 2 ;;
        --qublk) QUBLK_BIN=$2; shift 2 ;;
        --env) ENVS+=(--env "$2"); shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --quiet) QUIET=1; shift ;;
        --export) EXPORT_DIR=$2; shift 2 ;;
        --export-size) EXPORT_SIZE=$2; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "run.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
SCRIPT=$1; shift

skip() { echo "SKIP: vm: $*"; exit 77; }
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not installed (run tests/vm/setup.sh)"
case $KVER in
    6.12|7.3) ;;
    *) echo "run.sh: --kernel $KVER: expected 6.12 or 7.3" >&2; usage ;;
esac
KDIR=$CACHE/kernel-$KVER
[ -e "$KDIR/vmlinuz" ] || [ "$KVER" != 6.12 ] || KDIR=$CACHE/kernel
[ -e "$KDIR/vmlinuz" ] || skip "no guest kernel $KVER in $CACHE (run tests/vm/setup.sh)"

WORK=$(mktemp -d "${QUBLK_VM_TMPDIR:-/dev/shm}/qublk-vm.XXXXXX") || exit 1
cleanup() {
    # qemu's own pid (not the pipeline's): a killed run.sh leaves no VM.
    local pid
    pid=$(cat "$WORK/qemu.pid" 2>/dev/null) && kill -KILL "$pid" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

t_start=$(date +%s.%N)
DISK_ARGS=()
if [ -n "$EXPORT_DIR" ]; then
    mkdir -p "$EXPORT_DIR" || exit 1
    truncate -s "$EXPORT_SIZE" "$WORK/export.img" || exit 1
    DISK_ARGS=(-drive "file=$WORK/export.img,format=raw,if=virtio,cache=unsafe")
    ENVS+=(--env VMTEST_EXPORT_DEV=/dev/vda)
fi
base=$("$VM_DIR/build-initramfs.sh" base) || { echo "FAIL: vm: building the base initramfs failed"; exit 1; }
mods=$("$VM_DIR/build-initramfs.sh" modules "$KVER") \
    || { echo "FAIL: vm: building the $KVER module archive failed"; exit 1; }
ENVS+=(--env "VMTEST_KERNEL=$KVER")
ov_args=("${ENVS[@]}")
if [ "$QUBLK_BIN" != none ]; then
    [ -x "$QUBLK_BIN" ] || { echo "FAIL: vm: $QUBLK_BIN not built"; exit 1; }
    ov_args+=(--qublk "$QUBLK_BIN")
fi
"$VM_DIR/build-initramfs.sh" overlay "$WORK/overlay.cpio" "${ov_args[@]}" -- "$SCRIPT" "$@" \
    || { echo "FAIL: vm: building the overlay initramfs failed"; exit 1; }
cat "$base" "$mods" "$WORK/overlay.cpio" >"$WORK/initrd.cpio"
t_built=$(date +%s.%N)

[ -n "$LOG" ] || LOG=$WORK/console.log
: >"$LOG"

# -nodefaults: no VGA, NIC or floppy to probe (faster under TCG, and no
# network).  Serial console on stdio; stdin is /dev/null so it never waits.
# -no-reboot turns the guest's panic=-1 reboot into a QEMU exit.
# The uncompressed vmlinux boots through PVH (no BIOS, no decompression).
# thread=multi: one host thread per vCPU (the 7.3 kernel is slow to boot
# on a single TCG thread).
KERNEL=$KDIR/vmlinux
[ -s "$KERNEL" ] || KERNEL=$KDIR/vmlinuz
# Boot time under TCG: lpj= skips the delay-loop calibration (~1 s), the
# crypto self-tests and the blacklisted initcalls (entropy, certificates,
# IPv6, BPF, keyboard) cost several seconds and nothing here needs them.
KCMD="console=ttyS0 quiet panic=-1 mitigations=off nokaslr lpj=8000000"
KCMD+=" cryptomgr.notests apparmor=0 audit=0"
KCMD+=" initcall_blacklist=jent_mod_init,crypto_kdf108_init,load_system_certificate_list,init_encrypted,bpf_dummy_struct_ops_init,bpf_tcp_ca_kfunc_init,inet6_init,i8042_init,init_kprobe_trace,depot_debugfs_init"
# shellcheck disable=SC2054 # (the commas are QEMU's)
QEMU=(qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM"
      -nodefaults -no-user-config -display none -serial stdio -no-reboot
      -pidfile "$WORK/qemu.pid"
      -kernel "$KERNEL" -initrd "$WORK/initrd.cpio"
      -append "$KCMD $APPEND" "${DISK_ARGS[@]}")

# boot_once: one VM run into $LOG.  Returns 0 if the guest reached its
# script (VMTEST-START), 1 if it did not (the VM died or hung first).
boot_once() {
    : >"$LOG"
    rm -f "$WORK/qemu.pid"
    if [ -n "$EXPORT_DIR" ]; then
        rm -f "$WORK/export.img"
        truncate -s "$EXPORT_SIZE" "$WORK/export.img" || return 1
    fi
    echo "vm: ${QEMU[*]}" >>"$LOG"
    # Strip the serial console's carriage returns (line-buffered, so the
    # stream stays live); tee shows it as it comes.
    local -a tr=(tr -d '\r')
    command -v stdbuf >/dev/null && tr=(stdbuf -oL tr -d '\r')
    if [ "$QUIET" = 1 ]; then
        timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | "${tr[@]}" >>"$LOG" &
    else
        timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | "${tr[@]}" | tee -a "$LOG" &
    fi
    local job=$! t0=$SECONDS started=0
    # Watch for the start marker while the VM runs; a boot that has not
    # reached it in BOOT_TIMEOUT seconds is stuck: kill it.
    while kill -0 "$job" 2>/dev/null; do
        if [ "$started" = 0 ]; then
            if grep -q '^VMTEST-START' "$LOG"; then
                started=1
            elif [ $((SECONDS - t0)) -ge "$BOOT_TIMEOUT" ]; then
                echo "vm: no VMTEST-START after $BOOT_TIMEOUT s: killing the VM" | tee -a "$LOG"
                kill -KILL "$(cat "$WORK/qemu.pid" 2>/dev/null)" 2>/dev/null
            fi
        fi
        sleep 1
    done
    wait "$job"
    grep -q '^VMTEST-START' "$LOG"
}

boot=1
while ! boot_once; do
    echo "vm: boot $boot of $BOOTS (kernel $KVER): the guest never reached its script"
    grep -v "^vm: qemu-system" "$LOG" | grep -E 'Oops|BUG:|panic|RIP:|Call Trace' | head -n 8 | sed 's/^/  | /'
    cp "$LOG" "$WORK/boot$boot.log"
    [ "$boot" -lt "$BOOTS" ] || break
    boot=$((boot + 1))
    t_built=$(date +%s.%N)
done
# The exit status of `timeout` is the first element of the pipeline; recover
# it from the log instead: VMTEST-DONE is the proof of a clean end.
t_end=$(date +%s.%N)

if [ -n "$EXPORT_DIR" ] && grep -q '^VMTEST-EXPORT ' "$LOG"; then
    tar -xf "$WORK/export.img" -C "$EXPORT_DIR" \
        || echo "vm: extracting the exported files into $EXPORT_DIR failed"
fi

# --- results -------------------------------------------------------------
echo
echo "==== vm results ($(basename "$SCRIPT")) ===="
passed=0 failed=0 skipped=0
declare -a failed_names=()
while read -r _ name verdict rest; do
    case $verdict in
        PASS) passed=$((passed + 1)) ;;
        SKIP) skipped=$((skipped + 1)) ;;
        *) failed=$((failed + 1)); failed_names+=("$name") ;;
    esac
    printf '%-4s %-40s %s\n' "$verdict" "$name" "$rest"
done < <(grep -E '^VMTEST [^ ]+ (PASS|FAIL|SKIP)' "$LOG")

done_line=$(grep -m1 '^VMTEST-DONE ' "$LOG" || true)
booted=$(sed -n 's/^VMTEST-BOOTED .*uptime=\([0-9.]*\).*/\1/p' "$LOG" | head -n 1)
problems=()
unfinished=0
if [ -z "$done_line" ]; then
    begun=$(grep '^VMTEST-BEGIN ' "$LOG" | tail -n 1 | cut -d' ' -f2)
    elapsed=$(awk -v a="$t_built" -v b="$t_end" 'BEGIN { printf "%d", b - a }')
    if [ "$elapsed" -ge "$TIMEOUT" ]; then
        problems+=("timed out after $TIMEOUT s${begun:+ (in test $begun)}")
    else
        problems+=("the VM stopped without VMTEST-DONE${begun:+ (in test $begun)}")
    fi
    grep -q '^VMTEST-START' "$LOG" \
        || problems+=("the guest never reached its script in $boot boot(s)${booted:+ (it reached /init)}")
    # A test that began but never reported is a failure too.
    if [ -n "$begun" ] && ! grep -qE "^VMTEST $begun (PASS|FAIL|SKIP)" "$LOG"; then
        failed=$((failed + 1)); failed_names+=("$begun")
        printf '%-4s %-40s %s\n' FAIL "$begun" "(did not finish)"
        unfinished=1
    fi
elif [ "${done_line#VMTEST-DONE rc=0 }" = "$done_line" ] && [ "$failed" -eq 0 ]; then
    problems+=("guest reported: $done_line")
fi
grep -E '^VMTEST-(ERROR|WARN)' "$LOG" | sed 's/^/vm: /'

# Each failed test's console section again, so that the end of this output
# (all a test runner shows of a failure) says what went wrong.
for name in "${failed_names[@]}"; do
    echo "---- console of failed test $name (last 60 lines) ----"
    awk -v n="$name" '
        $0 == "VMTEST-BEGIN " n { on = 1; buf = ""; cnt = 0 }
        on { line[cnt++ % 60] = $0 }
        on && $0 ~ ("^VMTEST " n " (PASS|FAIL|SKIP)") { on = 0; done = 1 }
        END { s = cnt > 60 ? cnt - 60 : 0; for (i = s; i < cnt; i++) print "  | " line[i % 60] }
    ' "$LOG"
done
if [ ${#problems[@]} -gt 0 ]; then
    # (An unfinished test's section above already runs to the end.)
    if [ "$unfinished" = 0 ]; then
        echo "---- end of console ----"
        grep -v "^vm: qemu-system" "$LOG" | tail -n 30 | sed 's/^/  | /'
    fi
    for p in "${problems[@]}"; do echo "vm: FAIL: $p"; done
fi

awk -v a="$t_start" -v b="$t_built" -v c="$t_end" -v boot="${booted:-?}" 'BEGIN {
    printf "vm: timing: initramfs %.1f s, VM %.1f s (kernel to /init %s s)\n", b - a, c - b, boot }'
echo "vm: $passed passed, $failed failed, $skipped skipped"
if [ "$failed" -gt 0 ] || [ ${#problems[@]} -gt 0 ]; then
    # Keep the log past our cleanup when it lives in the work directory.
    if [ "$LOG" = "$WORK/console.log" ]; then
        LOG=$(mktemp "${TMPDIR:-/tmp}/qublk-vm-console.XXXXXX")
        cp "$WORK/console.log" "$LOG"
    fi
    echo "vm: console log: $LOG"
    exit 1
fi
exit 0
