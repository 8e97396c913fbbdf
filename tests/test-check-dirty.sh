#!/bin/bash
# SPDX-License-Identifier: MIT
# Images left behind by a server killed with SIGKILL under load, then
# reopened and repaired (host side, NBD; lazy refcounts on):
#  1. qublk nbd killed under load: the image is reopened by qublk nbd
#     (repaired at open if it was left dirty), then `qublk check -r all`
#     repairs what is left (leaked clusters); qemu-img check is clean and
#     every byte flushed before the kill reads back.
#  2. qemu-nbd killed under load: QEMU leaves the dirty bit set and its
#     refcounts stale.  A read-write open by qublk nbd must repair it (log
#     line), after which qemu-img check is clean and every flushed byte
#     reads back.
# The writer is tests/nbd_writer.py (16 writes in flight on disjoint
# ranges, flush per round).
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io qemu-nbd "$PYTHON"
[ -x "$QUBLK" ] || skip "$QUBLK not built"

SIZE=$((64 << 20))

# load_and_kill CMD...: serve $IMG with CMD on $SOCK, write under load,
# SIGKILL the server after a while; the writer leaves $TMPD/durable(.mask).
load_and_kill() {
    local sock=$TMPD/w.sock log=$TMPD/server.log
    rm -f "$sock"
    "$@" >"$log" 2>&1 &
    local pid=$! n=0
    while [ ! -S "$sock" ]; do
        n=$((n + 1))
        [ "$n" -lt 200 ] || { cat "$log" >&2; fail "server did not listen"; }
        sleep 0.05
    done
    "$PYTHON" "$TESTS_DIR/nbd_writer.py" "$sock" "$SIZE" "$SEED" "$TMPD/durable" &
    local wpid=$!
    n=0
    while [ ! -e "$TMPD/durable.started" ]; do
        n=$((n + 1))
        [ "$n" -lt 600 ] || fail "the writer did not start within 30 s"
        _alive "$wpid" || { wait "$wpid"; fail "the writer exited early"; }
        sleep 0.05
    done
    rm -f "$TMPD/durable.started"
    sleep "${QUBLK_KILL_DELAY:-1.5}"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    wait "$wpid" || fail "nbd_writer failed"
    ! _has_crash_report "$log" || { cat "$log" >&2; fail "server crashed"; }
}

# verify_durable: the image's content matches every flushed byte.
verify_durable() {
    qemu-img convert -f qcow2 -O raw "$IMG" "$TMPD/back.raw" || fail "convert"
    "$PYTHON" - "$TMPD/back.raw" "$TMPD/durable" <<'PY' || fail "flushed data lost"
import sys
back = open(sys.argv[1], "rb").read()
want = open(sys.argv[2], "rb").read()
mask = open(sys.argv[2] + ".mask", "rb").read()
bad = [i for i in range(0, len(want), 512)
       if back[i:i + 512] != want[i:i + 512] and not any(mask[i:i + 512])]
if bad:
    sys.exit("flushed data lost at %d sectors, first at byte %d" % (len(bad), bad[0]))
print("data: %d bytes flushed before the kill read back" % (len(want) - mask.count(1)))
PY
}

dirty_bit() { [ "$(od -An -tx1 -j79 -N1 "$IMG" | tr -d ' ')" = 01 ]; }

# ---- 1. qublk nbd killed ----
for SEED in 1 2; do
    FAIL_CONTEXT="qublk nbd, seed $SEED"
    IMG=$TMPD/q.qcow2
    "$QUBLK" create -o lazy_refcounts=on "$IMG" "$SIZE" >/dev/null || fail "create"
    load_and_kill "$QUBLK" nbd --socket "$TMPD/w.sock" "$IMG"
    was_dirty=no
    if dirty_bit; then was_dirty=yes; fi
    start_nbd_server "$IMG"
    stop_nbd_server
    if [ "$was_dirty" = yes ]; then
        grep -q "repairing" "$NBD_LOG" || fail "dirty image opened without a repair"
    fi
    dirty_bit && fail "still dirty after a read-write open"
    rc=0
    "$QUBLK" check -r all "$IMG" >"$TMPD/check.out" 2>&1 || rc=$?
    [ "$rc" = 0 ] || { cat "$TMPD/check.out" >&2; fail "qublk check -r all: exit $rc"; }
    qcheck "$IMG"
    verify_durable
    echo "ok: qublk nbd killed (seed $SEED, left dirty: $was_dirty)"
done

# ---- 2. qemu-nbd killed: dirty, repaired by qublk at open ----
for SEED in 3 4; do
    FAIL_CONTEXT="qemu-nbd, seed $SEED"
    IMG=$TMPD/e.qcow2
    qemu-img create -q -f qcow2 -o lazy_refcounts=on "$IMG" "$SIZE"
    load_and_kill qemu-nbd -f qcow2 --socket "$TMPD/w.sock" --cache=writeback "$IMG"
    dirty_bit || fail "qemu-nbd did not leave the image dirty"
    rc=0
    qemu-img check "$IMG" >/dev/null 2>&1 || rc=$?
    echo "qemu-img check of the dirty image: exit $rc"
    start_nbd_server "$IMG"
    stop_nbd_server
    grep -q "not closed cleanly.*repairing" "$NBD_LOG" || { cat "$NBD_LOG" >&2; fail "no repair logged"; }
    dirty_bit && fail "still dirty after qublk's read-write open"
    qcheck "$IMG"
    verify_durable
    echo "ok: qemu-nbd killed (seed $SEED), repaired by qublk at open"
done
echo "PASS: $TEST_NAME"
