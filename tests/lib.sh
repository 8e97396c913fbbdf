# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# Shared helpers for tests/test-*.sh.  Source it first:
#     . "$(dirname "$0")/lib.sh"
# It sets `set -euo pipefail`, makes a scratch directory $TMPD (under
# /dev/shm, removed on exit), and provides:
#   requires TOOL...          skip (exit 77) unless every TOOL is on $PATH
#   fail MSG...               print FAIL and exit 1
#   start_nbd_server FILE [--read-only] [--format F] [--cache C]
#                             serve FILE on a unix socket in the background;
#                             sets NBD_SOCK, NBD_URI, NBD_PID, NBD_LOG
#   stop_nbd_server           SIGTERM the server; fails the test unless it
#                             exits 0 with no sanitizer report in its log
#   qcheck IMG                qemu-img check: exit 0, no leaks, no corruption
#   qcompare A B              qemu-img compare (formats detected): identical
#   img_format FILE           prints qcow2 or raw (by magic)
#   qio FILE-OR-URI FMT [qemu-io args]   run a qemu-io script from stdin,
#                             fail on any failed command (aio ones included)
#   nbd_read_all OUT          copy the whole served export to raw file OUT
#   run_table FUNC PATTERN ROW...  run FUNC INDEX FIELDS... for each row of a
#                             case table whose name matches PATTERN
#   qemu_versions             the QEMU versions to use as oracles: 7 (the
#                             system's tools) and 10 (tests/setup-qemu10.sh;
#                             required with CI=true, else used when set up);
#                             for the ASan build only the newest
#   use_qemu V                from now on qemu-img, qemu-io and qemu-nbd (and
#                             the helpers here) are QEMU V's: 7 or 10
#   qemu10 TOOL ARGS...       run one QEMU 10 tool (QEMU10_BIN: its wrappers)
#   gen_ops ARGS...           tests/gen-ops.py ARGS, adapted to the server
# The server under test is $QUBLK (default build/qublk).  With
# QUBLK_TEST_SERVER=qemu-nbd the same tests run against qemu-nbd instead,
# which validates the tests themselves against QEMU's own implementation.
# One server at a time per test.

set -euo pipefail

TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP_DIR=$(cd "$TESTS_DIR/.." && pwd)
QUBLK=${QUBLK:-$TOP_DIR/build/qublk}
QUBLK_TEST_SERVER=${QUBLK_TEST_SERVER:-qublk}
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3
TEST_NAME=$(basename "$0" .sh)

NBD_PID=
NBD_SOCK=
NBD_URI=
NBD_LOG=
NBD_COUNT=0

# FAIL_CONTEXT (e.g. the seed and configuration) is printed with a failure
# so that it can be replayed.
FAIL_CONTEXT=
fail() {
    echo "FAIL: $TEST_NAME: $*" >&2
    [ -z "$FAIL_CONTEXT" ] || echo "  while: $FAIL_CONTEXT" >&2
    exit 1
}

skip() {
    echo "SKIP: $TEST_NAME: $*" >&2
    exit 77
}

requires() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || skip "'$t' not found"
    done
}

# The server under test must exist unless we run against the stand-in.
requires_server() {
    if [ "$QUBLK_TEST_SERVER" = qemu-nbd ]; then
        requires qemu-nbd
    else
        [ -x "$QUBLK" ] || skip "$QUBLK not built"
    fi
}

_cleanup() {
    local rc=$?
    if [ -n "$NBD_PID" ]; then
        kill -KILL "$NBD_PID" 2>/dev/null || true
        wait "$NBD_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ "${QUBLK_KEEP:-0}" = 1 ]; then
        echo "keeping $TMPD" >&2
    else
        rm -rf "$TMPD"
    fi
    exit "$rc"
}

TMPD=$(mktemp -d "${QUBLK_TMPDIR:-/dev/shm}/qublk-$TEST_NAME.XXXXXX")
trap _cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# True if a log holds a sanitizer or crash report.
_has_crash_report() {
    grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: (Address|Undefined|Leak)Sanitizer' "$1"
}

# State of a child process from /proc: a zombie has exited but is not yet
# reaped, and kill -0 still succeeds on it.
_alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

start_nbd_server() {
    local file=$1; shift
    local ro=0 fmt="" cache=writeback
    while [ $# -gt 0 ]; do
        case $1 in
            --read-only) ro=1 ;;
            --format) fmt=$2; shift ;;
            --cache) cache=$2; shift ;;
            *) fail "start_nbd_server: unknown option $1" ;;
        esac
        shift
    done
    [ -z "$NBD_PID" ] || fail "start_nbd_server: a server is already running"
    NBD_COUNT=$((NBD_COUNT + 1))
    NBD_SOCK=$TMPD/nbd.$NBD_COUNT.sock
    NBD_URI="nbd+unix:///?socket=$NBD_SOCK"
    NBD_LOG=$TMPD/server.$NBD_COUNT.log
    local -a cmd
    if [ "$QUBLK_TEST_SERVER" = qemu-nbd ]; then
        [ -n "$fmt" ] || fmt=$(img_format "$file")
        # --discard=unmap: TRIM does what the reference model expects;
        # --persistent/--shared: several clients one after another.
        # -A: serve qemu:allocation-depth too.
        cmd=(qemu-nbd -f "$fmt" --socket "$NBD_SOCK" --cache="$cache"
             --discard=unmap --persistent --shared=8 -A)
        [ "$ro" = 0 ] || cmd+=(--read-only)
    else
        cmd=("$QUBLK" nbd --socket "$NBD_SOCK" --cache "$cache" --shared 8)
        [ -z "$fmt" ] || cmd+=(--format "$fmt")
        [ "$ro" = 0 ] || cmd+=(--read-only)
    fi
    echo "+ ${cmd[*]} $file" >"$NBD_LOG"
    "${cmd[@]}" "$file" >>"$NBD_LOG" 2>&1 &
    NBD_PID=$!
    local n=0
    while [ "$n" -lt 200 ]; do
        n=$((n + 1))
        [ -S "$NBD_SOCK" ] && return 0
        if ! _alive "$NBD_PID"; then
            local rc=0
            wait "$NBD_PID" || rc=$?
            NBD_PID=
            cat "$NBD_LOG" >&2
            fail "NBD server exited with $rc before listening on $NBD_SOCK"
        fi
        sleep 0.05
    done
    cat "$NBD_LOG" >&2
    fail "NBD server did not create $NBD_SOCK within 10 s"
}

stop_nbd_server() {
    [ -n "$NBD_PID" ] || fail "stop_nbd_server: no server running"
    local pid=$NBD_PID rc=0 n=0
    kill -TERM "$pid" 2>/dev/null || true
    while _alive "$pid" && [ "$n" -lt 600 ]; do
        sleep 0.05
        n=$((n + 1))
    done
    if _alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        NBD_PID=
        cat "$NBD_LOG" >&2
        fail "NBD server did not exit within 30 s of SIGTERM"
    fi
    wait "$pid" || rc=$?
    NBD_PID=
    if [ "$rc" -ne 0 ] || _has_crash_report "$NBD_LOG"; then
        tail -n 60 "$NBD_LOG" >&2
        if [ "$rc" -ge 128 ]; then
            fail "NBD server killed by signal $((rc - 128))"
        fi
        fail "NBD server exited with status $rc"
    fi
    rm -f "$NBD_SOCK"
}

img_format() {
    if [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 514649fb ]; then
        echo qcow2
    else
        echo raw
    fi
}

qcheck() {
    local img=$1 out rc=0
    [ "$(img_format "$img")" = qcow2 ] || return 0
    out=$(qemu-img check --output=json "$img" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ]; then
        qemu-img check "$img" >&2 || true
        fail "qemu-img check $img exited with $rc"
    fi
    # Exit 0 already means no corruption and no leaks; parse the report too
    # so a qemu-img that changes its exit codes cannot hide either.
    echo "$out" | "$PYTHON" -c '
import json, sys
r = json.load(sys.stdin)
bad = {k: r.get(k, 0) for k in ("corruptions", "leaks", "check-errors",
                                "corruptions-fixed", "leaks-fixed")}
if any(bad.values()):
    sys.exit("qemu-img check: %s" % bad)
' || fail "qemu-img check $img is not clean: $out"
}

qcompare() {
    local a=$1 b=$2 out
    out=$(qemu-img compare -f "$(img_format "$a")" -F "$(img_format "$b")" \
        "$a" "$b" 2>&1) || fail "qemu-img compare $a $b: $out"
}

# qio TARGET FMT [args]: run the qemu-io script on stdin against TARGET.
# qemu-io's exit status covers synchronous commands only, so also look for
# "failed" (aio_write failed: ...) in its output.  (Its "qemu-io> " prompts
# are dropped, so that each message is a line of its own.)
qio() {
    local target=$1 fmt=$2; shift 2
    local out=$TMPD/qemu-io.out rc=0
    qemu-io -f "$fmt" "$@" "$target" 2>&1 | sed 's/qemu-io> //g' >"$out" || rc=$?
    if [ "$rc" -ne 0 ] || grep -qiE 'failed|error|mismatch' "$out"; then
        grep -iE -m 20 'failed|error|mismatch' "$out" >&2 || true
        fail "qemu-io on $target failed (exit $rc)"
    fi
}

# run_table FUNC PATTERN ROW...: FUNC INDEX FIELDS... for each row of a
# test's case table (fields split on blanks; INDEX counts from 1 in table
# order, so a case's seed is the same whatever PATTERN selects) whose
# first field, the case's name, matches the regex PATTERN (every row
# when empty); "ok NAME (N s)" after each; fails if no row matches.
run_table() {
    local func=$1 pattern=$2 row idx=0 n=0 t0
    local -a fields
    shift 2
    for row in "$@"; do
        idx=$((idx + 1))
        read -ra fields <<<"$row"
        if [ -n "$pattern" ] && ! [[ ${fields[0]} =~ $pattern ]]; then
            continue
        fi
        t0=$SECONDS
        "$func" "$idx" "${fields[@]}"
        echo "ok ${fields[0]} ($((SECONDS - t0)) s)"
        n=$((n + 1))
    done
    [ "$n" -gt 0 ] || fail "no case matches '$pattern'"
    echo "$n cases passed"
}

nbd_read_all() {
    qemu-img convert -f raw "$NBD_URI" -O raw "$1" \
        || fail "qemu-img convert from $NBD_URI failed"
}

# QEMU 10 next to the system's 7.2 (tests/setup-qemu10.sh unpacks it into a
# private tree; the wrappers in $QEMU10_BIN set its library path).
QEMU10_BIN=${QUBLK_QEMU10_CACHE:-$TESTS_DIR/.cache/qemu10}/bin
_QEMU_BASE_PATH=$PATH
_QEMU10_OK=

have_qemu10() {
    if [ -z "$_QEMU10_OK" ]; then
        _QEMU10_OK=no
        if [ -x "$QEMU10_BIN/qemu-img" ] && [ -x "$QEMU10_BIN/qemu-io" ] &&
           "$QEMU10_BIN/qemu-img" --version 2>/dev/null | grep -q ' 10\.[0-9]'; then
            _QEMU10_OK=yes
        fi
    fi
    [ "$_QEMU10_OK" = yes ]
}

qemu_versions() {
    # Under the sanitizers one oracle is enough: the second one checks
    # QEMU's behaviour, not qublk's memory (the plain build runs both).
    case ${QUBLK:-} in
        *asan*) if have_qemu10; then echo 10; else echo 7; fi
                return 0 ;;
    esac
    echo 7
    if have_qemu10; then
        echo 10
    elif [ "${CI:-}" = true ]; then
        fail "QEMU 10 is not set up ($QEMU10_BIN): run tests/setup-qemu10.sh"
    else
        echo "warning: QEMU 10 not set up (tests/setup-qemu10.sh): QEMU 7.2 only" >&2
    fi
}

use_qemu() {
    case $1 in
        7) PATH=$_QEMU_BASE_PATH ;;
        10) have_qemu10 || fail "use_qemu 10: QEMU 10 is not set up"
            PATH=$QEMU10_BIN:$_QEMU_BASE_PATH ;;
        *) fail "use_qemu: unknown version $1" ;;
    esac
    hash -r
    QEMU_VER=$1
}
QEMU_VER=7    # the oracle in use, for messages
export QEMU_VER

qemu10() {
    have_qemu10 || fail "qemu10: QEMU 10 is not set up"
    local t=$1; shift
    "$QEMU10_BIN/$t" "$@"
}

# gen_ops ARGS...: run tests/gen-ops.py.  Against qemu-nbd, write-zeroes
# never share a cluster with a concurrent write: QEMU 7.2 loses data or
# corrupts the image then (seen with test-concurrent-nbd.sh: pattern
# mismatches and `refcount=1 reference=2` / `refcount=0 reference=1` in
# qemu-img check), and every other shape passes.  qublk gets them all.
gen_ops() {
    local -a apart=()
    [ "$QUBLK_TEST_SERVER" != qemu-nbd ] || apart=(--zeroes-apart)
    "$PYTHON" "$TESTS_DIR/gen-ops.py" "${apart[@]}" "$@" || fail "gen-ops.py failed"
}

# qemu-img: quiet image creation that fails the test on error.
mkimg() {
    qemu-img create -q "$@" >/dev/null || fail "qemu-img create $*"
}

# lock_bytes PID FILE: the OFD lock bytes PID holds on FILE (from its
# fdinfo), sorted, space-separated.
lock_bytes() {
    local ino
    ino=$(stat -c %i "$2")
    cat /proc/"$1"/fdinfo/* 2>/dev/null | awk -v ino="$ino" '
        $1 == "lock:" {
            n = split($7, a, ":")
            if (a[n] != ino) next
            e = $9 == "EOF" ? $8 + 1000 : $9
            for (b = $8; b <= e && b < $8 + 1000; b++) print b
        }' | sort -n | uniq | tr '\n' ' ' | sed 's/ $//'
}

# wait_lock_byte PID FILE BYTE: until PID holds lock byte BYTE of FILE
# (a qemu-io holder is ready then: it prints nothing before its 'sleep').
# Returns 1, saying why on stderr, if PID exits first or 20 s pass.
# Asking with a second opener instead races the holder's own open: QEMU's
# protocol takes, then tests, so two openers at once may both be refused,
# and the holder then exits before the test uses it.
wait_lock_byte() {
    local n=0
    while ! [[ " $(lock_bytes "$1" "$2") " = *" $3 "* ]]; do
        _alive "$1" || { echo "pid $1 exited before locking byte $3 of $2" >&2; return 1; }
        n=$((n + 1))
        [ "$n" -lt 400 ] || { echo "pid $1: byte $3 of $2 not locked after 20 s" >&2; return 1; }
        sleep 0.05
    done
}

# require_vm: skip unless the ublk VM harness can run here (qublk built,
# qemu-system-x86_64 and the guest kernel present; as root, tries
# tests/vm/setup.sh first).
require_vm() {
    [ -x "$QUBLK" ] || skip "$QUBLK not built"
    local vm=$TESTS_DIR/vm
    local cache=${QUBLK_VM_CACHE:-$vm/.cache}
    if ! command -v qemu-system-x86_64 >/dev/null || [ ! -e "$cache/kernel/vmlinuz" ]; then
        if [ "$(id -u)" = 0 ]; then
            "$vm/setup.sh" || skip "tests/vm/setup.sh failed: no VM here"
        else
            skip "no qemu-system-x86_64 or guest kernel (run tests/vm/setup.sh)"
        fi
    fi
}
