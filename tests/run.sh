#!/bin/bash
# SPDX-License-Identifier: MIT
# Test runner (`make check`).  Runs every unit test binary ($B/tests/*) and
# every tests/test-*.sh, first for the plain build (B=build) and then for the
# ASan/UBSan build (B=build-asan, QUBLK=build-asan/qublk).  Each test runs
# under a timeout with its output in its own log file; one line per test
# (PASS/FAIL/SKIP and seconds), the last 40 lines of the log on failure.
#
#   tests/run.sh [PATTERN]     only tests whose name matches the ERE PATTERN
#                              (names look like build/tests/coro or
#                              build-asan/test-diff-nbd)
# Environment:
#   QUBLK_IO_INLINE     io.c's inline I/O: 0 (default here: io_uring, as on
#                       a disk), 1, or empty (auto: files in memory)
#   QUBLK_BUILDS        build directories to test (default "build build-asan")
#   QUBLK_TEST_TIMEOUT  seconds per test (default 600; unit tests 120)
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

# run_one NAME SHORTNAME TIMEOUT ENV... -- CMD...
run_one() {
    local name=$1 short=$2 tmo=$3; shift 3
    local -a envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    if [ -n "$PATTERN" ] && ! [[ $name =~ $PATTERN ]]; then
        return
    fi
    local log="$LOGDIR/${name//\//_}.log" rc=0 t0=$SECONDS
    # timeout puts the test in its own process group and signals all of it,
    # so NBD servers a test left in the background die with it.
    env "${envs[@]}" timeout -k 10 "$tmo" "$@" </dev/null >"$log" 2>&1 || rc=$?
    local dt=$((SECONDS - t0)) verdict
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
        run_one "$t" "$(basename "$t")" "$ttmo" "${envs[@]}" -- "$t"
    done
    for t in tests/test-*.sh; do
        [ -f "$t" ] || continue
        short=$(basename "$t" .sh)
        # A script whose header says "run.sh: plain build only" is not run
        # for the sanitizer build (what it adds there is covered elsewhere;
        # its header says why).
        case $b in
            *asan*) if head -n 20 "$t" | grep -q '^# run.sh: plain build only'; then
                        continue
                    fi ;;
        esac
        # "# run.sh: timeout SECONDS": its own timeout for the plain build
        # (doubled for the sanitizer build, as every timeout is).
        stmo=$(head -n 20 "$t" | sed -n 's/^# run.sh: timeout \([0-9][0-9]*\)$/\1/p' | head -n 1)
        if [ -n "$stmo" ]; then
            case $b in *asan*) stmo=$((stmo * 2)) ;; esac
        else
            stmo=$tmo
        fi
        run_one "$b/$short" "$short" "$stmo" "${envs[@]}" -- "$t"
    done
done

if [ "${#failed_names[@]}" -gt 0 ]; then
    echo "failed: ${failed_names[*]}"
fi
echo "logs in $LOGDIR"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
