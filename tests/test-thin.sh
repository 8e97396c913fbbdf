#!/bin/bash
# SPDX-License-Identifier: MIT
# Thin provisioning (issue 12): space freed by discards goes back to the
# host file system.  The same sequence of writes, discards and unmapping
# write-zeroes goes through `qublk nbd` and through `qemu-nbd
# --discard=unmap` (QEMU's qcow2 driver punches freed clusters out of the
# file) on two images; afterwards the images' allocated size (du) must be
# within 10% of each other (and far below what was written), the data
# identical (qemu-img compare) and both clean (qemu-img check).  Covered:
# plain and compressed clusters, a file tail cut off, 512 B and 64 KiB
# clusters, `--cache none`.  And the file grown ahead of its allocations
# while served, cut back at close, and by the repair of a dirty image.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io qemu-nbd du
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "compares qublk with qemu-nbd itself"
requires_server

# serve IMG SOCK QEMU|QUBLK [ARGS]: start a server, wait for its socket.
serve() {
    local img=$1 sock=$2 who=$3; shift 3
    if [ "$who" = qemu ]; then
        qemu-nbd -f qcow2 --discard="${DISCARD:-unmap}" --cache=writeback --persistent \
            -k "$sock" "$@" "$img" >"$TMPD/$who.log" 2>&1 &
    else
        "$QUBLK" nbd -k "$sock" "$@" "$img" >"$TMPD/$who.log" 2>&1 &
    fi
    SERVER_PID=$!
    local n=0
    while [ ! -S "$sock" ]; do
        n=$((n + 1))
        [ "$n" -lt 200 ] || { cat "$TMPD/$who.log" >&2; fail "$who did not listen"; }
        sleep 0.05
    done
}

stop() {
    local rc=0
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 143 ] || { cat "$TMPD"/*.log >&2; fail "server exit $rc"; }
    ! _has_crash_report "$TMPD/qublk.log" || { cat "$TMPD/qublk.log" >&2; fail "sanitizer report"; }
}

kib() { du -k "$1" | cut -f1; }

run_case() {
    local name=$1 opts=$2 size=$3 ops=$4; shift 4
    local who img sock u q
    FAIL_CONTEXT="case $name"
    for who in qublk qemu; do
        img=$TMPD/$who.qcow2
        sock=$TMPD/$who.sock
        rm -f "$img" "$sock"
        mkimg -f qcow2 -o "$opts" "$img" "$size"
        if [[ $name == compressed* ]]; then
            # Start from compressed data (QEMU wrote it).
            qemu-io -f qcow2 -c "write -c -P 0x33 0 16M" "$img" >/dev/null || fail "write -c"
        fi
        if [ "$who" = qublk ]; then serve "$img" "$sock" "$who" "$@"; else serve "$img" "$sock" "$who"; fi
        qio "nbd+unix:///?socket=$sock" raw <<<"$ops"
        stop
    done
    u=$(kib "$TMPD/qublk.qcow2")
    q=$(kib "$TMPD/qemu.qcow2")
    echo "$name: qublk $u KiB, qemu-nbd $q KiB allocated"
    "$PYTHON" -c "import sys; u, q = $u, $q; sys.exit(0 if abs(u - q) <= max(0.1 * q, 256) else 1)" ||
        fail "allocated sizes differ by more than 10%: qublk $u KiB, qemu-nbd $q KiB"
    qcompare "$TMPD/qublk.qcow2" "$TMPD/qemu.qcow2"
    qcheck "$TMPD/qublk.qcow2"
    qcheck "$TMPD/qemu.qcow2"
    FAIL_CONTEXT=
}

OPS=$'write -P 0x11 0 48M
flush
discard 0 40M
write -z -u 44M 2M
flush
write -P 0x22 8M 4M
discard 46M 2M
flush'
run_case c64k cluster_size=65536 64M "$OPS"
run_case c64k-direct cluster_size=65536 64M "$OPS" --cache none
run_case c512 cluster_size=512 64M "$OPS"
# The freed clusters are the file's tail: the file gets shorter.
run_case tail cluster_size=65536 64M $'write -P 0x11 0 16M\nflush\nwrite -P 0x12 16M 16M\nflush\ndiscard 16M 16M\nflush'
len=$(stat -c %s "$TMPD/qublk.qcow2")
[ "$len" -lt $((20 << 20)) ] || fail "the file was not cut back after freeing its tail ($len bytes)"
run_case compressed cluster_size=65536 64M $'discard 0 12M\nwrite -P 0x44 14M 1M\nflush'
# --discard ignore (qemu-nbd's default): nothing is freed, by either.
DISCARD=ignore run_case ignore cluster_size=65536 64M "$OPS" --discard ignore
[ "$(kib "$TMPD/qublk.qcow2")" -gt $((40 << 10)) ] || fail "--discard ignore freed space"

# The file grows ahead of its allocations while served (sparse: writes
# past its end would extend it one by one) and is cut back to them at
# close; a killed server leaves the grown tail, a hole that nothing
# references.  The oracle: qemu-img check's image-end-offset.
FAIL_CONTEXT="grow ahead"
end_offset() {
    qemu-img check -U --output=json "$1" 2>/dev/null |
        "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["image-end-offset"])'
}
img=$TMPD/grow.qcow2 sock=$TMPD/grow.sock
rm -f "$img" "$sock"
mkimg -f qcow2 -o cluster_size=65536 "$img" 256M
for step in 1 2; do
    serve "$img" "$sock" qublk --cache none
    qio "nbd+unix:///?socket=$sock" raw <<<"write -P 0x2$step $((step * 100))M 8M
flush"
    len=$(stat -c %s "$img") end=$(end_offset "$img")
    echo "served: file $len bytes, image end $end"
    [ "$len" -gt "$end" ] || fail "the file did not grow ahead of its allocations ($len <= $end)"
    if [ "$step" = 1 ]; then
        # Closed: cut back to the allocations.
        stop
        len=$(stat -c %s "$img") end=$(end_offset "$img")
        echo "closed: file $len bytes, image end $end"
        [ "$len" = "$end" ] || fail "the file was not cut back to its allocations at close ($len != $end)"
    else
        # Killed: the tail stays, the image is sound.
        kill -KILL "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
        rm -f "$sock"
        [ "$(stat -c %s "$img")" = "$len" ] || fail "the file changed size after kill -9"
    fi
    qcheck "$img"
done
# Its data is there, and the next server writes into the tail.
serve "$img" "$sock" qublk --cache none
qio "nbd+unix:///?socket=$sock" raw <<<$'write -P 0x23 0 1M\nflush'
stop
[ "$(stat -c %s "$img")" = "$len" ] || fail "the tail a killed server left did not take new clusters"
qcheck "$img"
qio "$img" qcow2 <<<$'read -P 0x21 100M 8M\nread -P 0x22 200M 8M\nread -P 0x23 0 1M'
# With lazy refcounts the killed server leaves the image dirty: the next
# open repairs it and, its refcounts whole, cuts the tail off.
img=$TMPD/grow-lazy.qcow2
rm -f "$img" "$sock"
mkimg -f qcow2 -o cluster_size=65536,lazy_refcounts=on "$img" 256M
serve "$img" "$sock" qublk --cache none
qio "nbd+unix:///?socket=$sock" raw <<<$'write -P 0x24 50M 8M\nflush'
[ "$(stat -c %s "$img")" -gt "$(end_offset "$img")" ] || fail "the lazy image did not grow ahead"
kill -KILL "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
rm -f "$sock"
serve "$img" "$sock" qublk --cache none
grep -q 'repaired' "$TMPD/qublk.log" || { cat "$TMPD/qublk.log" >&2; fail "the dirty image was not repaired at open"; }
len=$(stat -c %s "$img") end=$(end_offset "$img")
echo "repaired at open: file $len bytes, image end $end"
[ "$len" = "$end" ] || fail "the repair at open did not cut the grown tail ($len != $end)"
qio "nbd+unix:///?socket=$sock" raw <<<$'read -P 0x24 50M 8M'
stop
qcheck "$img"
FAIL_CONTEXT=
echo "all thin-provisioning cases passed"
