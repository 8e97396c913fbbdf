#!/bin/bash
# SPDX-License-Identifier: MIT
# Image locking against QEMU's (src/block/lock.h): qublk and QEMU 7.2's
# qemu-nbd/qemu-io/qemu-img keep each other out of an image, both ways.
#   1. The lock bytes qublk nbd holds on an overlay and on its backing
#      file (from /proc/PID/fdinfo) are the ones qemu-io holds in the same
#      mode: read-write, read-only, read-only with force-share (-U).
#   2. qublk nbd serving top.qcow2 read-write: qemu-io, qemu-nbd, and
#      qemu-img info (without -U) are refused with QEMU's messages;
#      qemu-io -r -U reads the data written through the server, qemu-img
#      info -U and qublk info work; a second qublk nbd is refused read-
#      write and read-only, naming the lock and the holder (pid, "qublk"),
#      and works with -r -U; the backing file: a writer is refused, a
#      reader is not, and a second qublk writer on another overlay of the
#      same base works.  Once the server exits, qemu-io writes the image.
#   3. The reverse: qemu-nbd serving it read-write, then qemu-io holding
#      it (read-write, then read-only) with 'sleep': qublk nbd is refused
#      (read-write, and read-only where QEMU writes), naming the lock and
#      the holder; -r -U works and reads what qemu-nbd wrote; after the
#      holder exits, qublk nbd opens it read-write.
#   4. Raw files are locked too, both ways.
#   5. -U without --read-only is a usage error (nbd, add).
# Exit codes are checked along with the messages.  QUBLK_TEST_SERVER is
# ignored: the point is qublk against QEMU.
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io qemu-nbd
# shellcheck disable=SC2034  # read by lib.sh
QUBLK_TEST_SERVER=qublk
requires_server

# ------------------------------------------------------------ helpers

BG_PIDS=()
BG_N=0
# Kill what we started, then lib.sh's cleanup with our exit status in $?
# (set +e: the status is usually not 0).
_locking_cleanup() {
    local rc=$? p
    set +e
    for p in "${BG_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    (exit "$rc")
    _cleanup
}
trap _locking_cleanup EXIT

# bg_start LOG CMD...: run CMD in the background; sets BG_PID, BG_LOG.
bg_start() {
    BG_N=$((BG_N + 1))
    BG_LOG=$TMPD/bg.$BG_N.log
    echo "+ $*" >"$BG_LOG"
    "$@" >>"$BG_LOG" 2>&1 </dev/null &
    BG_PID=$!
    BG_PIDS+=("$BG_PID")
}

# bg_wait_sock SOCK: until BG_PID listens on SOCK.
bg_wait_sock() {
    local n=0
    while [ ! -S "$1" ]; do
        if ! _alive "$BG_PID"; then
            cat "$BG_LOG" >&2
            fail "background server exited before listening on $1"
        fi
        n=$((n + 1))
        [ "$n" -lt 400 ] || { cat "$BG_LOG" >&2; fail "no $1 after 20 s"; }
        sleep 0.05
    done
}

# bg_wait_lock FILE BYTE: until BG_PID holds lock byte BYTE of FILE.
bg_wait_lock() {
    wait_lock_byte "$BG_PID" "$1" "$2" || { cat "$BG_LOG" >&2; fail "holder did not lock byte $2 of $1"; }
}

# bg_stop PID LOG [RC]: SIGTERM; it must exit with RC (default 0), and
# without a sanitizer report.
bg_stop() {
    local pid=$1 log=$2 want=${3:-0} rc=0
    kill -TERM "$pid"
    wait "$pid" || rc=$?
    if [ "$rc" -ne "$want" ] || _has_crash_report "$log"; then
        cat "$log" >&2
        fail "$(head -n 1 "$log" | cut -c3-): exit $rc after SIGTERM, want $want"
    fi
}

# refused RC PATTERN... -- CMD...: CMD must fail with exit status RC and
# print every PATTERN (fixed strings).  A CMD that wrongly succeeds and
# serves is stopped by timeout (exit 124).
refused() {
    local want=$1 out=$TMPD/refused.out rc=0 p
    local -a pats=()
    shift
    while [ "$1" != -- ]; do pats+=("$1"); shift; done
    shift
    timeout 20 "$@" >"$out" 2>&1 </dev/null || rc=$?
    if [ "$rc" -ne "$want" ]; then
        cat "$out" >&2
        fail "'$*' exited with $rc, want $want"
    fi
    for p in "${pats[@]}"; do
        grep -qF -- "$p" "$out" || { cat "$out" >&2; fail "'$*': no '$p' in its output"; }
    done
    ! _has_crash_report "$out" || { cat "$out" >&2; fail "'$*': sanitizer report"; }
}

# works CMD...: CMD must exit 0; its output is in $TMPD/works.out.
works() {
    local rc=0
    timeout 60 "$@" >"$TMPD/works.out" 2>&1 </dev/null || rc=$?
    if [ "$rc" -ne 0 ] || _has_crash_report "$TMPD/works.out"; then
        cat "$TMPD/works.out" >&2
        fail "'$*' exited with $rc, want 0"
    fi
}

WLOCK='Failed to get "write" lock'
SLOCK='Failed to get shared "write" lock'
INUSE='Is another process using the image'

TOP=$TMPD/top.qcow2
BASE=$TMPD/base.qcow2
mkimg -f qcow2 "$BASE" 16M
qio "$BASE" qcow2 -c 'write -P 0xa1 0 1M'
mkimg -f qcow2 -b base.qcow2 -F qcow2 "$TOP" 16M
mkimg -f qcow2 -b base.qcow2 -F qcow2 "$TMPD/top2.qcow2" 16M

# ---------------------------------------- 1. the bytes, against qemu-io

for mode in rw ro ro-U; do
    case $mode in
        rw) qargs=() uargs=() ;;
        ro) qargs=(-r) uargs=(--read-only) ;;
        ro-U) qargs=(-r -U) uargs=(--read-only --force-share) ;;
    esac
    bg_start qemu-io "${qargs[@]}" -c 'sleep 600000' "$TOP"
    bg_wait_lock "$TOP" 100
    bg_wait_lock "$BASE" 100
    want_top=$(lock_bytes "$BG_PID" "$TOP")
    want_base=$(lock_bytes "$BG_PID" "$BASE")
    bg_stop "$BG_PID" "$BG_LOG" 143
    bg_start "$QUBLK" nbd "${uargs[@]}" --socket "$TMPD/b.sock" "$TOP"
    bg_wait_sock "$TMPD/b.sock"
    got_top=$(lock_bytes "$BG_PID" "$TOP")
    got_base=$(lock_bytes "$BG_PID" "$BASE")
    bg_stop "$BG_PID" "$BG_LOG"
    [ "$got_top" = "$want_top" ] ||
        fail "$mode: qublk locks bytes '$got_top' of the image, qemu-io '$want_top'"
    [ "$got_base" = "$want_base" ] ||
        fail "$mode: qublk locks bytes '$got_base' of the backing file, qemu-io '$want_base'"
    echo "$mode: image $got_top, backing file $got_base: as qemu-io"
done
# What QEMU 7.2 does, so that a QEMU that changes shows up here.
[ "$got_top" = 100 ] || fail "qemu-io -r -U holds '$got_top', not 100"

# ------------------------------ 2. qublk nbd holds top.qcow2 read-write

start_nbd_server "$TOP"
HOLDER="held by pid $NBD_PID (qublk)"
qio "$NBD_URI" raw -c 'write -P 0x5c 1M 1M' -c flush

refused 1 "$WLOCK" "$INUSE [$TOP]" -- qemu-io -c 'read 0 512' "$TOP"
refused 1 "$WLOCK" "$INUSE [$TOP]" -- qemu-nbd --socket "$TMPD/refused.sock" "$TOP"
refused 1 "$SLOCK" "$INUSE [$TOP]" -- qemu-io -r -c 'read 0 512' "$TOP"
refused 1 "$SLOCK" "$INUSE [$TOP]" -- qemu-img info "$TOP"
qio "$TOP" qcow2 -r -U -c 'read -P 0x5c 1M 1M' -c 'read -P 0xa1 0 1M'
works qemu-img info -U "$TOP"
grep -q "backing file: base.qcow2" "$TMPD/works.out" || fail "qemu-img info -U: $(cat "$TMPD/works.out")"
works "$QUBLK" info "$TOP"
grep -q "base.qcow2" "$TMPD/works.out" || fail "qublk info: $(cat "$TMPD/works.out")"
works "$QUBLK" info -U --output json "$TOP"
grep -q '"backing-filename": "base.qcow2"' "$TMPD/works.out" ||
    fail "qublk info -U: $(cat "$TMPD/works.out")"
works "$QUBLK" info --backing-chain "$TOP"
# The image tools lock as qemu-img's do: check shares with readers only
# (-U: with anyone), a repair or a snapshot change needs the image alone.
refused 1 "$TOP: $SLOCK" "Lock byte 101 is $HOLDER" -- "$QUBLK" check "$TOP"
refused 1 "$TOP: $WLOCK" "Lock byte 201 is $HOLDER" -- "$QUBLK" check -r all "$TOP"
refused 1 "cannot be used with -r" -- "$QUBLK" check -U -r leaks "$TOP"
works "$QUBLK" check -U "$TOP"
refused 1 "$TOP: $WLOCK" "Lock byte 201 is $HOLDER" -- "$QUBLK" snapshot -c s1 "$TOP"
works "$QUBLK" snapshot -l -U "$TOP"

# A second qublk: refused read-write and read-only, with the holder.
refused 1 "$TOP: $WLOCK" "$INUSE [$TOP]" "Lock byte 201 is $HOLDER" -- \
    "$QUBLK" nbd --socket "$TMPD/b.sock" "$TOP"
refused 1 "$TOP: $SLOCK" "Lock byte 101 is $HOLDER" -- \
    "$QUBLK" nbd --read-only --socket "$TMPD/b.sock" "$TOP"
[ ! -e "$TMPD/b.sock" ] || fail "a refused qublk nbd left its socket behind"
bg_start "$QUBLK" nbd -r -U --socket "$TMPD/b.sock" "$TOP"
bg_wait_sock "$TMPD/b.sock"
qio "nbd+unix:///?socket=$TMPD/b.sock" raw -r -c 'read -P 0x5c 1M 1M' -c 'read -P 0xa1 0 1M'
bg_stop "$BG_PID" "$BG_LOG"
rm -f "$TMPD/b.sock"

# The backing file is share-locked: readers and other overlays only.
refused 1 "$WLOCK" "$INUSE [$BASE]" -- qemu-io -c 'read 0 512' "$BASE"
refused 1 "$BASE: $WLOCK" "Lock byte 201 is $HOLDER" -- \
    "$QUBLK" nbd --socket "$TMPD/b.sock" "$BASE"
qio "$BASE" qcow2 -r -c 'read -P 0xa1 0 1M'
bg_start "$QUBLK" nbd --socket "$TMPD/b.sock" "$TMPD/top2.qcow2"
bg_wait_sock "$TMPD/b.sock"
qio "nbd+unix:///?socket=$TMPD/b.sock" raw -c 'write -P 0x7e 0 64k' -c 'read -P 0xa1 64k 64k'
bg_stop "$BG_PID" "$BG_LOG"
rm -f "$TMPD/b.sock"
qcheck "$TMPD/top2.qcow2"

# Gone with the holder.
stop_nbd_server
qio "$TOP" qcow2 -c 'read -P 0x5c 1M 1M' -c 'write -P 0x5d 3M 64k'
qio "$BASE" qcow2 -c 'read -P 0xa1 0 1M'
qcheck "$TOP"

# -------------------------------------------- 3. QEMU holds, qublk opens

bg_start qemu-nbd --persistent --socket "$TMPD/q.sock" "$TOP"
bg_wait_sock "$TMPD/q.sock"
QPID=$BG_PID QLOG=$BG_LOG
qio "nbd+unix:///?socket=$TMPD/q.sock" raw -c 'write -P 0x6d 2M 1M' -c flush
refused 1 "$TOP: $WLOCK" "$INUSE [$TOP]" "Lock byte 201 is held by pid $QPID (qemu-nbd)" -- \
    "$QUBLK" nbd --socket "$TMPD/b.sock" "$TOP"
refused 1 "$TOP: $SLOCK" "Lock byte 101 is held by pid $QPID (qemu-nbd)" -- \
    "$QUBLK" nbd -r --socket "$TMPD/b.sock" "$TOP"
refused 1 "$BASE: $WLOCK" "held by pid $QPID (qemu-nbd)" -- \
    "$QUBLK" nbd --socket "$TMPD/b.sock" "$BASE"
works "$QUBLK" info "$TOP"
bg_start "$QUBLK" nbd -r -U --socket "$TMPD/b.sock" "$TOP"
bg_wait_sock "$TMPD/b.sock"
qio "nbd+unix:///?socket=$TMPD/b.sock" raw -r -c 'read -P 0x6d 2M 1M' -c 'read -P 0x5d 3M 64k'
bg_stop "$BG_PID" "$BG_LOG"
rm -f "$TMPD/b.sock"
bg_stop "$QPID" "$QLOG"

# qemu-io holding it read-write, then read-only ('sleep' keeps it open).
bg_start qemu-io -c 'sleep 600000' "$TOP"
bg_wait_lock "$TOP" 201
refused 1 "$TOP: $WLOCK" "Lock byte 201 is held by pid $BG_PID (qemu-io)" -- \
    "$QUBLK" nbd --socket "$TMPD/b.sock" "$TOP"
refused 1 "$TOP: $SLOCK" "held by pid $BG_PID (qemu-io)" -- \
    "$QUBLK" nbd -r --socket "$TMPD/b.sock" "$TOP"
bg_stop "$BG_PID" "$BG_LOG" 143
bg_start qemu-io -r -c 'sleep 600000' "$TOP"
bg_wait_lock "$TOP" 201
refused 1 "$TOP: $WLOCK" "Lock byte 201 is held by pid $BG_PID (qemu-io)" -- \
    "$QUBLK" nbd --socket "$TMPD/b.sock" "$TOP"
QIO_PID=$BG_PID QIO_LOG=$BG_LOG
bg_start "$QUBLK" nbd -r --socket "$TMPD/b.sock" "$TOP"
bg_wait_sock "$TMPD/b.sock"
bg_stop "$BG_PID" "$BG_LOG"
rm -f "$TMPD/b.sock"
bg_stop "$QIO_PID" "$QIO_LOG" 143
# The holder is gone: read-write again.
start_nbd_server "$TOP"
qio "$NBD_URI" raw -c 'read -P 0x6d 2M 1M' -c 'write -P 0x5e 4M 64k'
stop_nbd_server
qcheck "$TOP"

# ------------------------------------------------------------- 4. raw

truncate -s 4M "$TMPD/disk.raw"
start_nbd_server "$TMPD/disk.raw" --format raw
refused 1 "$WLOCK" "$INUSE [$TMPD/disk.raw]" -- qemu-io -f raw -c 'read 0 512' "$TMPD/disk.raw"
stop_nbd_server
bg_start qemu-io -f raw -c 'sleep 600000' "$TMPD/disk.raw"
bg_wait_lock "$TMPD/disk.raw" 101
refused 1 "$SLOCK" "held by pid $BG_PID (qemu-io)" -- \
    "$QUBLK" nbd -f raw --socket "$TMPD/b.sock" "$TMPD/disk.raw"
bg_stop "$BG_PID" "$BG_LOG" 143

# ------------------------------------------------------------ 5. usage

refused 2 "--force-share is only allowed with --read-only" -- \
    "$QUBLK" nbd -U --socket "$TMPD/b.sock" "$TOP"
refused 2 "--force-share is only allowed with --read-only" -- "$QUBLK" add -U "$TOP"

echo "PASS: $TEST_NAME"
