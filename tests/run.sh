#!/bin/bash
# SPDX-License-Identifier: MIT
# Test runner (`make check`).  Runs every unit test binary ($B/tests/*) and
# every tests/test-*.sh, for the plain build (B=build) and for the
# ASan/UBSan build (B=build-asan, QUBLK=build-asan/qublk).  Each test runs
# under a timeout with its output in its own log file; one line per test
# as it ends (PASS/FAIL/SKIP and seconds), the last 40 lines of the log on
# failure.  Tests run $QUBLK_TEST_JOBS at a time, the VM tests alone (see
# "run.sh: alone" below) and first.
#
#   tests/run.sh [PATTERN]     only tests whose name matches the ERE PATTERN
#                              (names look like build/tests/coro or
#                              build-asan/test-diff-nbd)
# Environment:
#   QUBLK_IO_INLINE     io.c's inline I/O: 0 (default here: io_uring, as on
#                       a disk), 1, or empty (auto: files in memory)
#   QUBLK_BUILDS        build directories to test (default "build build-asan")
#   QUBLK_TEST_TIMEOUT  seconds per test (default 600; unit tests 120)
#   QUBLK_TEST_JOBS     tests run at once (default: the CPUs, at most 4;
#                       1 runs them one after another in the order above)
#   QUBLK_TEST_SERVER   qemu-nbd: run the NBD tests against qemu-nbd
#   CI=true             a skipped test is a failure unless listed in
#                       ALLOWED_SKIPS below (or in $QUBLK_ALLOWED_SKIPS)
# A test's output lines that start with "TIMING " (the VM tests' per-script
# times) are shown under its PASS line.
# Exit 77 from a test means "skipped".  A test script with the header line
# "# run.sh: plain build only" runs for the plain build alone.  The last line of output is exactly
# "N passed, N failed, N skipped"; the exit status is 1 if any test failed.
# A script's header line "# run.sh: timeout SECONDS" replaces
# QUBLK_TEST_TIMEOUT for it (the VM tests: one boot runs many scripts).
# A script's header line "# run.sh: alone" makes it run with no other test
# beside it (the VM tests: their guest's vCPUs want the host's CPUs, and
# their guest scripts wait with timeouts of their own); these run first.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
TOP=$(pwd)

# The io layer's inline I/O (src/common/io.c) would turn every small read
# and write of the tests' images in /dev/shm into a system call, so that
# concurrent requests never interleave around their data I/O: the host
# tests go through io_uring, as images on a disk do.  The VM tests (images
# in the guest's tmpfs) and test_core's io model cover inline I/O.
export QUBLK_IO_INLINE=${QUBLK_IO_INLINE-0}

# Tests allowed to skip in CI (space-separated names without the build
# prefix, e.g. "test-ublk").  Keep this short: CI installs every tool.
ALLOWED_SKIPS="${QUBLK_ALLOWED_SKIPS:-}"

PATTERN=${1:-}
BUILDS=${QUBLK_BUILDS:-build build-asan}
TIMEOUT=${QUBLK_TEST_TIMEOUT:-600}
UNIT_TIMEOUT=${QUBLK_UNIT_TIMEOUT:-120}
if [ -n "${QUBLK_TEST_JOBS:-}" ]; then
    JOBS=$QUBLK_TEST_JOBS
else
    JOBS=$(nproc 2>/dev/null || echo 1)
    [ "$JOBS" -le 4 ] || JOBS=4
fi
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "QUBLK_TEST_JOBS: not a positive number: $JOBS" >&2; exit 2; }
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/qublk-check.XXXXXX") || exit 1

passed=0 failed=0 skipped=0
failed_names=()

is_ci() { [ "${CI:-}" = true ]; }

skip_allowed() {
    local t
    for t in $ALLOWED_SKIPS; do
        [ "$t" = "$1" ] && return 0
    done
    return 1
}

# The tests to run, in order: J_NAME, J_SHORT, J_TMO, J_ALONE and J_CMD
# per test, J_ENV its environment (one string, entries separated by
# newlines: no value here holds one).
J_NAME=() J_SHORT=() J_TMO=() J_ALONE=() J_CMD=() J_ENV=()

# add_test NAME SHORTNAME TIMEOUT ALONE ENV... -- CMD
add_test() {
    local name=$1 short=$2 tmo=$3 alone=$4 env=
    shift 4
    while [ "$1" != -- ]; do env+="$1"$'\n'; shift; done
    shift
    if [ -n "$PATTERN" ] && ! [[ $name =~ $PATTERN ]]; then
        return
    fi
    J_NAME+=("$name") J_SHORT+=("$short") J_TMO+=("$tmo") J_ALONE+=("$alone")
    J_CMD+=("$1") J_ENV+=("$env")
}

log_of() { local n=${J_NAME[$1]}; echo "$LOGDIR/${n//\//_}.log"; }

# start_test I: in the background; its exit status goes to its log's .rc
# file.  timeout puts the test in its own process group and signals all
# of it, so NBD servers a test left in the background die with it.
declare -A RUNNING=() T0=()
start_test() {
    local i=$1 log
    local -a envs
    log=$(log_of "$i")
    mapfile -t envs <<<"${J_ENV[$i]%$'\n'}"
    (
        rc=0
        env "${envs[@]}" timeout -k 10 "${J_TMO[$i]}" "${J_CMD[$i]}" </dev/null >"$log" 2>&1 || rc=$?
        echo "$rc" >"$log.rc"
    ) &
    RUNNING[$!]=$i
    T0[$i]=$SECONDS
}

# report I RC: the test's verdict line (and its log's tail on failure).
report() {
    local i=$1 rc=$2 name=${J_NAME[$1]} short=${J_SHORT[$1]} tmo=${J_TMO[$1]} log verdict
    local dt=$((SECONDS - T0[$1]))
    log=$(log_of "$i")
    if [ "$rc" -eq 0 ]; then
        # A unit test that exits 0 but reports failures still failed.
        if tail -n 1 "$log" | grep -qE '^[0-9]+ passed, [1-9][0-9]* failed'; then
            verdict=FAIL rc=1
        else
            verdict=PASS
        fi
    elif [ "$rc" -eq 77 ]; then
        if is_ci && ! skip_allowed "$short"; then
            verdict=FAIL
        else
            verdict=SKIP
        fi
    else
        verdict=FAIL
    fi
    case $verdict in
        PASS) passed=$((passed + 1)); printf 'PASS %-40s %4d s\n' "$name" "$dt"
              grep '^TIMING ' "$log" | sed 's/^TIMING /     /' ;;
        SKIP) skipped=$((skipped + 1))
              printf 'SKIP %-40s %4d s  (%s)\n' "$name" "$dt" \
                  "$(grep -m1 -E 'SKIP' "$log" | cut -c1-100)" ;;
        FAIL) failed=$((failed + 1)); failed_names+=("$name")
              local why="exit $rc"
              [ "$rc" -eq 124 ] && why="timed out after $tmo s"
              [ "$rc" -gt 128 ] && [ "$rc" -ne 124 ] && why="killed by signal $((rc - 128))"
              [ "$rc" -eq 77 ] && why="skipped, which CI does not allow"
              printf 'FAIL %-40s %4d s  (%s, log %s)\n' "$name" "$dt" "$why" "$log"
              tail -n 40 "$log" | sed 's/^/    | /' ;;
    esac
}

# reap: wait for one running test to end and report it.
reap() {
    local pid i rc
    wait -n -p pid "${!RUNNING[@]}" || true
    i=${RUNNING[$pid]}
    unset "RUNNING[$pid]"
    rc=$(cat "$(log_of "$i").rc" 2>/dev/null) || rc=
    # No status written: the subshell itself was killed.
    [ -n "$rc" ] || rc=137
    report "$i" "$rc"
}

for b in $BUILDS; do
    if [ ! -x "$b/qublk" ] && [ "${QUBLK_TEST_SERVER:-}" != qemu-nbd ]; then
        # The whole build is missing: one line for it, not one per test.
        if [ -z "$PATTERN" ] || [[ $b =~ $PATTERN ]]; then
            if is_ci; then
                failed=$((failed + 1)); failed_names+=("$b")
                printf 'FAIL %-40s %4d s  (%s/qublk not built)\n' "$b" 0 "$b"
            else
                skipped=$((skipped + 1))
                printf 'SKIP %-40s %4d s  (%s/qublk not built)\n' "$b" 0 "$b"
            fi
        fi
        continue
    fi
    envs=("QUBLK=$TOP/$b/qublk")
    case $b in
        *asan*)
            envs+=("ASAN_OPTIONS=detect_leaks=1:abort_on_error=1"
                   "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1")
            tmo=$((TIMEOUT * 2)) utmo=$((UNIT_TIMEOUT * 2)) ;;
        *) tmo=$TIMEOUT utmo=$UNIT_TIMEOUT ;;
    esac
    for t in "$b"/tests/*; do
        if [ ! -f "$t" ] || [ ! -x "$t" ]; then continue; fi
        # The crash-state simulator runs two qemu-img per state, a
        # thousand states, and test_snapshot a qemu-img per step:
        # CPU-bound, so slow on a busy machine.
        case $(basename "$t") in
            test_powercut|test_snapshot|test_snapshot_live) ttmo=$((utmo * 3)) ;;
            *) ttmo=$utmo ;;
        esac
        add_test "$t" "$(basename "$t")" "$ttmo" 0 "${envs[@]}" -- "$t"
    done
    for t in tests/test-*.sh; do
        [ -f "$t" ] || continue
        short=$(basename "$t" .sh)
        hdr=$(head -n 20 "$t")
        # A script whose header says "run.sh: plain build only" is not run
        # for the sanitizer build (what it adds there is covered elsewhere;
        # its header says why).
        case $b in
            *asan*) if grep -q '^# run.sh: plain build only' <<<"$hdr"; then
                        continue
                    fi ;;
        esac
        # "# run.sh: timeout SECONDS": its own timeout for the plain build
        # (doubled for the sanitizer build, as every timeout is).
        stmo=$(sed -n 's/^# run.sh: timeout \([0-9][0-9]*\)$/\1/p' <<<"$hdr" | head -n 1)
        if [ -n "$stmo" ]; then
            case $b in *asan*) stmo=$((stmo * 2)) ;; esac
        else
            stmo=$tmo
        fi
        alone=0
        grep -q '^# run.sh: alone$' <<<"$hdr" && alone=1
        add_test "$b/$short" "$short" "$stmo" "$alone" "${envs[@]}" -- "$t"
    done
done

# The tests that run alone first, one after another; then the rest,
# $JOBS at a time, in the order above.
if [ "$JOBS" -eq 1 ]; then
    order=("${!J_NAME[@]}")
else
    order=()
    for i in "${!J_NAME[@]}"; do [ "${J_ALONE[$i]}" = 1 ] && order+=("$i"); done
    for i in "${!J_NAME[@]}"; do [ "${J_ALONE[$i]}" = 1 ] || order+=("$i"); done
fi
for i in "${order[@]}"; do
    if [ "${J_ALONE[$i]}" = 1 ]; then
        while [ "${#RUNNING[@]}" -gt 0 ]; do reap; done
        start_test "$i"
        reap
        continue
    fi
    while [ "${#RUNNING[@]}" -ge "$JOBS" ]; do reap; done
    start_test "$i"
done
while [ "${#RUNNING[@]}" -gt 0 ]; do reap; done

if [ "${#failed_names[@]}" -gt 0 ]; then
    echo "failed: ${failed_names[*]}"
fi
echo "logs in $LOGDIR"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
