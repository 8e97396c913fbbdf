#!/bin/bash
# SPDX-License-Identifier: MIT
# Corrupt and hostile qcow2 images must be refused cleanly, never crash.
# Each case starts from a good image made by qemu-img/qemu-io and pokes one
# field.  Expectations:
#   refuse   `qublk nbd` and `qublk info` exit 1 (not a signal, not a hang)
#            with a message matching the case's pattern;
#   eio      the server starts; reads of the damaged cluster fail with an
#            I/O error while reads elsewhere return the right data; the
#            server exits 0 on SIGTERM and the file does not grow;
#   corrupt  (corrupt bit) read-write open refused, read-only served.
# Any exit status >= 128 or a sanitizer report is a failure.
# With QUBLK_TEST_SERVER=qemu-nbd the pokes are checked against QEMU: cases
# QEMU refuses must be refused by qemu-nbd/qemu-img info too; messages and
# the cases where QEMU is lenient (it reads past the end of the file as
# zeros) are only checked for crashes.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
requires_server

D=$TMPD
GOOD=$D/good.qcow2
CS=65536
ncases=0

# poke_be FILE OFFSET BYTES VALUE: big-endian integer of BYTES bytes.
poke_be() {
    "$PYTHON" - "$@" <<'EOF' || fail "poke $*"
import sys
f, off, n, val = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]), int(sys.argv[4], 0)
with open(f, "r+b") as fh:
    fh.seek(off)
    fh.write(val.to_bytes(n, "big"))
EOF
}

# Bash arithmetic is signed 64-bit: pass values with bit 63 set as hex.
hex() { printf '0x%x' "$1"; }

# peek_be FILE OFFSET BYTES
peek_be() {
    "$PYTHON" - "$@" <<'EOF'
import sys
f, off, n = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3])
with open(f, "rb") as fh:
    fh.seek(off)
    print(int.from_bytes(fh.read(n), "big"))
EOF
}

L2_OFFSET_MASK=0x00fffffffffffe00

# A 1 GiB v3 image, 64 KiB clusters: data in clusters 0 and 2 (first L2
# table) and at 600 MiB (second L2 table).
qemu-img create -q -f qcow2 "$GOOD" 1G || fail "qemu-img create"
qio "$GOOD" qcow2 <<EOF
write -P 0x5a 0 64k
write -P 0x6b 128k 64k
write -P 0x7c 600M 64k
EOF
L1_OFF=$(peek_be "$GOOD" 40 8)
RT_OFF=$(peek_be "$GOOD" 48 8)
L2_OFF=$(( $(peek_be "$GOOD" "$L1_OFF" 8) & L2_OFFSET_MASK ))
[ "$L2_OFF" -gt 0 ] || fail "could not find the first L2 table"

new_case() {
    ncases=$((ncases + 1))
    CASE=$1
    IMG=$D/$CASE.qcow2
    cp "$GOOD" "$IMG"
    FAIL_CONTEXT="case $CASE"
}

# run_server_fg [--read-only] IMG: start the server in the foreground for a
# bad image; it must exit by itself.  Sets RC and OUT.
run_server_fg() {
    local -a ro=() cmd
    if [ "$1" = --read-only ]; then ro=(--read-only); shift; fi
    local sock=$D/fg.sock
    rm -f "$sock"
    if [ "$QUBLK_TEST_SERVER" = qemu-nbd ]; then
        cmd=(qemu-nbd -f qcow2 --socket "$sock")
        [ "${#ro[@]}" = 0 ] || cmd+=(--read-only)
    else
        cmd=("$QUBLK" nbd --socket "$sock" "${ro[@]}")
    fi
    RC=0
    OUT=$(timeout -k 5 "${FG_TIMEOUT:-10}" "${cmd[@]}" "$1" 2>&1 </dev/null) || RC=$?
    rm -f "$sock"
}

run_info() {
    RC=0
    if [ "$QUBLK_TEST_SERVER" = qemu-nbd ]; then
        OUT=$(timeout -k 5 10 qemu-img info "$1" 2>&1) || RC=$?
    else
        OUT=$(timeout -k 5 10 "$QUBLK" info "$1" 2>&1) || RC=$?
    fi
}

# no_crash WHAT [may-serve]
no_crash() {
    local what=$1
    if [ -n "${2:-}" ] && [ "$RC" -eq 124 ]; then
        return 0
    fi
    if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
        echo "$OUT" | tail -n 20 >&2
        fail "$what: did not exit within 10 s (served the bad image?)"
    fi
    if [ "$RC" -ge 128 ] || echo "$OUT" | grep -qE 'AddressSanitizer|runtime error:|LeakSanitizer'; then
        echo "$OUT" | tail -n 40 >&2
        fail "$what: crashed (exit $RC)"
    fi
}

# expect_refuse ERE [lenient]: both nbd (read-write and read-only) and info
# must refuse.  "lenient": QEMU accepts this image, so against qemu-nbd only
# check for crashes.
expect_refuse() {
    local ere=$1 lenient=${2:-}
    local -a modes=("" --read-only)
    local m
    local may_serve=
    [ "$QUBLK_TEST_SERVER" = qemu-nbd ] && [ -n "$lenient" ] && may_serve=1
    for m in "${modes[@]}" info; do
        if [ "$m" = info ]; then
            run_info "$IMG"
        else
            # shellcheck disable=SC2086 # empty mode means no argument
            FG_TIMEOUT=${may_serve:+2} run_server_fg $m "$IMG"
        fi
        no_crash "$CASE ${m:-read-write}" "$may_serve"
        if [ "$QUBLK_TEST_SERVER" = qemu-nbd ]; then
            if [ -n "$lenient" ]; then
                echo "  QEMU ${m:-read-write}: exit $RC $(echo "$OUT" | head -n 1)"
                continue
            fi
            [ "$RC" -ne 0 ] || fail "$CASE ${m:-read-write}: QEMU accepted the image (the poke is wrong)"
            continue
        fi
        [ "$RC" -ne 0 ] || fail "$CASE ${m:-read-write}: accepted a bad image"
        [ "$RC" -eq 1 ] || fail "$CASE ${m:-read-write}: exit $RC, expected 1: $OUT"
        echo "$OUT" | grep -qiE "$ere" \
            || fail "$CASE ${m:-read-write}: message does not name the problem (/$ere/): $OUT"
    done
    if [ -n "$may_serve" ]; then
        echo "ok $CASE (QEMU accepts this image; only checked for crashes)"
    else
        echo "ok $CASE refused: $(echo "$OUT" | head -n 1)"
    fi
}

# expect_eio BAD-OFFSET GOOD-READ...: damaged cluster at BAD-OFFSET.
expect_eio() {
    local bad=$1; shift
    local size0 out rc
    size0=$(stat -c %s "$IMG")
    start_nbd_server "$IMG"
    rc=0
    out=$(qemu-io -f raw -c "read $bad 4096" "$NBD_URI" 2>&1) || rc=$?
    if [ "$QUBLK_TEST_SERVER" != qemu-nbd ]; then
        echo "$out" | grep -qi 'input/output error' \
            || fail "$CASE: read of the damaged cluster did not fail with EIO: $out"
    fi
    local r
    if [ "$QUBLK_TEST_SERVER" = qemu-nbd ]; then
        # QEMU marks some of these images corrupt on the first bad read
        # and then fails every request: nothing more to check there.
        stop_nbd_server
        echo "ok $CASE (QEMU: $(echo "$out" | head -n 1))"
        return 0
    fi
    for r in "$@"; do
        qio "$NBD_URI" raw -c "$r" </dev/null
    done
    # Writes elsewhere still work (and must not touch the bad entry).
    qio "$NBD_URI" raw -c "write -P 0x99 300M 4096" </dev/null
    qio "$NBD_URI" raw -c "read -P 0x99 300M 4096" </dev/null
    stop_nbd_server
    local size1
    size1=$(stat -c %s "$IMG")
    [ "$size1" -le $((size0 + 16 * CS)) ] \
        || fail "$CASE: image grew from $size0 to $size1 bytes"
    echo "ok $CASE: damaged cluster fails, the rest works"
}

# --- header fields -------------------------------------------------------
new_case unknown-incompat
poke_be "$IMG" 72 8 $((1 << 20))
expect_refuse 'incompatible|feature|unsupported|unknown'

new_case version4
poke_be "$IMG" 4 4 4
expect_refuse 'version'

new_case cluster-bits-8
poke_be "$IMG" 20 4 8
expect_refuse 'cluster'

new_case cluster-bits-30
poke_be "$IMG" 20 4 30
expect_refuse 'cluster'

new_case l1-offset-past-eof
poke_be "$IMG" 40 8 $((1 << 40))
expect_refuse 'l1' lenient

new_case l1-offset-unaligned
poke_be "$IMG" 40 8 $((L1_OFF + 512))
expect_refuse 'l1|align'

new_case l1-size-huge
poke_be "$IMG" 36 4 0x7fffffff
expect_refuse 'l1'

new_case reftable-offset-past-eof
poke_be "$IMG" 48 8 $((1 << 50))
expect_refuse 'refcount' lenient

new_case reftable-clusters-huge
poke_be "$IMG" 56 4 0x00ffffff
expect_refuse 'refcount'

new_case refcount-order-7
poke_be "$IMG" 96 4 7
expect_refuse 'refcount'

new_case header-length-huge
poke_be "$IMG" 100 4 $((1 << 20))
expect_refuse 'header'

new_case snapshots-past-eof
poke_be "$IMG" 60 4 1
poke_be "$IMG" 64 8 $((1 << 40))
expect_refuse 'snapshot' lenient

new_case backing-name-past-eof
poke_be "$IMG" 8 8 $((CS - 16))
poke_be "$IMG" 16 4 1000
expect_refuse 'backing'

# --- file cut short ------------------------------------------------------
new_case truncated-l1
truncate -s $((L1_OFF + 4)) "$IMG"
expect_refuse 'l1|end of|short|truncat' lenient

new_case truncated-reftable
truncate -s $((RT_OFF + 4)) "$IMG"
expect_refuse 'refcount|l1|end of|short|truncat' lenient

# --- corrupt bit: read-only allowed --------------------------------------
new_case corrupt-bit
poke_be "$IMG" 72 8 2
run_server_fg "$IMG"
no_crash "$CASE read-write"
[ "$RC" -ne 0 ] || fail "$CASE: read-write open of an image marked corrupt was allowed"
[ "$QUBLK_TEST_SERVER" = qemu-nbd ] || echo "$OUT" | grep -qi corrupt \
    || fail "$CASE: message does not say the image is corrupt: $OUT"
start_nbd_server "$IMG" --read-only
qio "$NBD_URI" raw -r -c "read -P 0x5a 0 64k" </dev/null
qio "$NBD_URI" raw -r -c "read -P 0x7c 600M 64k" </dev/null
stop_nbd_server
run_info "$IMG"
no_crash "$CASE info"
[ "$RC" -eq 0 ] || fail "$CASE: info refused an image marked corrupt: $OUT"
echo "ok $CASE: read-write refused, read-only served"

# --- bad table entries: EIO for that cluster only -------------------------
new_case l2-entry-past-eof
poke_be "$IMG" "$L2_OFF" 8 "$(hex $(( (1 << 63) | (1 << 40) )))"
expect_eio 0 "read -P 0x6b 128k 64k" "read -P 0x7c 600M 64k"

new_case l2-entry-unaligned
poke_be "$IMG" "$L2_OFF" 8 \
    "$(hex $(( (1 << 63) | ($(peek_be "$GOOD" "$L2_OFF" 8) & L2_OFFSET_MASK) + 512 )))"
expect_eio 0 "read -P 0x6b 128k 64k" "read -P 0x7c 600M 64k"

new_case l2-compressed-past-eof
# Compressed entry (bit 62): host offset 1 TiB, 1 sector of data.
poke_be "$IMG" "$L2_OFF" 8 $(( (1 << 62) | (1 << 40) ))
expect_eio 0 "read -P 0x6b 128k 64k" "read -P 0x7c 600M 64k"

# A bad L1 entry may also be refused at open (the whole table is small and
# read up front), as long as the message names it.
new_case l1-entry-past-eof
poke_be "$IMG" "$L1_OFF" 8 "$(hex $(( (1 << 63) | (1 << 40) )))"
FG_TIMEOUT=3 run_server_fg "$IMG"
no_crash "$CASE open" may-serve
if [ "$RC" -eq 124 ]; then
    expect_eio 0 "read -P 0x7c 600M 64k"
else
    [ "$RC" -eq 1 ] || fail "$CASE: exit $RC, expected 1 or serving: $OUT"
    echo "$OUT" | grep -qi 'l1' || fail "$CASE: message does not name the L1 entry: $OUT"
    echo "ok $CASE refused: $(echo "$OUT" | head -n 1)"
fi

echo "$ncases cases passed"
