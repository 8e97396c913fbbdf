#!/bin/bash
# SPDX-License-Identifier: MIT
# NBD extended headers (NBD_OPT_EXTENDED_HEADERS: 64-bit lengths), on an
# 8 GiB sparse qcow2 image:
#   1. Protocol checks with a raw client (tests/nbd_ext_proto.py): option
#      rules, 32-byte headers both ways, 64-bit lengths, BLOCK_STATUS_EXT,
#      REQ_ONE, payload rules, errors as chunks, malformed clients dropped.
#   2. QEMU 10's client negotiates extended headers (its trace shows
#      option 11 acknowledged; the server's debug log says so too): qemu-io
#      writes, zeroes and discards below and above 4 GiB, the export
#      compared with a reference image QEMU 10 wrote itself (qemu-img
#      compare over the extended connection), `qemu-img map` over NBD
#      equal to the image's own map, and the map's block status requests
#      longer than 4 GiB answered with BLOCK_STATUS_EXT chunks.
#      QEMU 10's fast zeroes (NBD_CMD_FLAG_FAST_ZERO) of 5 GiB go as one
#      request, compared the same way.
#   3. One write-zeroes of 5 GiB + 8 KiB, unaligned, without FAST_ZERO
#      (tests/nbd_ext_proto.py zero5g; QEMU's client splits those at
#      2 GiB) compared the same way.
#   4. Clients that do not ask for extended headers are served as before:
#      QEMU 7.2's qemu-io and qemu-img, and libnbd's nbdinfo.
# QEMU 10 is required (tests/setup-qemu10.sh).  With
# QUBLK_TEST_SERVER=qemu-nbd, parts 2-4 run against QEMU 10's qemu-nbd.
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
requires_server
if ! have_qemu10; then
    [ "${CI:-}" != true ] || fail "QEMU 10 is not set up: run tests/setup-qemu10.sh"
    skip "QEMU 10 not set up (tests/setup-qemu10.sh)"
fi
export QUBLK_DEBUG=1     # the server logs the header style of each connection

G=$((1024 * 1024 * 1024))
SIZE=$((8 * G))
is_qublk() { [ "$QUBLK_TEST_SERVER" = qublk ]; }

# The server's log names the header style of connection N.
log_says() {   # WHAT
    is_qublk || return 0
    grep -q "transmission with $1" "$NBD_LOG" \
        || { cat "$NBD_LOG" >&2; fail "server log: no connection with $1"; }
}

# map_norm FILE: qemu-img map JSON -> "start length KIND" lines, merged
# (what block status says, whatever the host offsets).
map_norm() {
    "$PYTHON" - "$1" <<'PYEOF'
import json, sys
out = []
for e in json.load(open(sys.argv[1])):
    v = ("zero-data" if e["zero"] else "data") if e["data"] else ("zero" if e["zero"] else "hole")
    if out and out[-1][2] == v and out[-1][0] + out[-1][1] == e["start"]:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"], v])
for o in out:
    print(*o)
PYEOF
}

# check_export IMAGE REFERENCE: over the served export (QEMU 10, so over
# extended headers with qublk): the data equals REFERENCE, and the map
# equals IMAGE's own.
check_export() {
    local img=$1 ref=$2 out
    out=$(qemu-img compare -f raw -F qcow2 "$NBD_URI" "$ref" 2>&1) \
        || fail "the export differs from the reference: $out"
    qemu-img map --output=json -f raw "$NBD_URI" >"$TMPD/nmap.json" || fail "qemu-img map over NBD"
    qemu-img map --output=json -U "$img" >"$TMPD/imap.json" || fail "qemu-img map $img"
    map_norm "$TMPD/imap.json" >"$TMPD/want"
    map_norm "$TMPD/nmap.json" >"$TMPD/got"
    diff -u "$TMPD/want" "$TMPD/got" >&2 || fail "qemu-img map over NBD differs from the image's"
}

# ---- 1. protocol checks ----
if is_qublk; then
    IMG=$TMPD/proto.qcow2
    mkimg -f qcow2 "$IMG" "$SIZE"
    start_nbd_server "$IMG"
    timeout 300 "$PYTHON" "$TESTS_DIR/nbd_ext_proto.py" "$NBD_SOCK" "$SIZE" \
        || fail "extended header protocol checks"
    log_says "extended headers"
    stop_nbd_server
    qcheck "$IMG"
    rm -f "$IMG"
fi

# ---- 2. QEMU 10 over extended headers ----
use_qemu 10
IMG=$TMPD/disk.qcow2 REF=$TMPD/ref.qcow2
mkimg -f qcow2 "$IMG" "$SIZE"
mkimg -f qcow2 "$REF" "$SIZE"
SCRIPT='
write -P 0x11 0 1M
write -P 0x22 4095M 2M
write -z 4095M 64k
write -P 0x33 5G 4M
write -z -u 5G 1M
discard 5122M 1M
write -P 0x44 7G 64k
aio_write -P 0x55 6G 128k
aio_write -P 0x56 4G 128k
aio_flush
write -z 2G 2047M
write -f -P 0x66 8191M 1M
flush
'
start_nbd_server "$IMG"
qemu-io -f raw --trace nbd_send_option_request --trace nbd_receive_option_reply \
    -c 'read -P 0 0 4k' "$NBD_URI" >"$TMPD/trace.out" 2>&1 || { cat "$TMPD/trace.out" >&2; fail "qemu-io 10"; }
grep -q "Received option reply 11 (extended headers), type 1 (ack)" "$TMPD/trace.out" \
    || { cat "$TMPD/trace.out" >&2; fail "QEMU 10 did not negotiate extended headers"; }
log_says "extended headers"
echo "$SCRIPT" | qio "$NBD_URI" raw -d unmap
echo "$SCRIPT" | qio "$REF" qcow2 -d unmap
check_export "$IMG" "$REF"
# QEMU sends a write-zeroes over 2 GiB only as a fast zero (-n), in one
# request: 5 GiB here, over data, cluster aligned.
qemu-io -f raw --trace nbd_send_request -c 'write -z -n -u 1G 5G' -c 'write -z -n 7G 1M' \
    "$NBD_URI" >"$TMPD/zerotrace.out" 2>&1 || { cat "$TMPD/zerotrace.out" >&2; fail "qemu-io write -z -n"; }
grep -q "\.len = 5368709120, [^}]*\.type = 6 (write zeroes)" "$TMPD/zerotrace.out" \
    || { cat "$TMPD/zerotrace.out" >&2; fail "no 5 GiB write-zeroes request from QEMU 10"; }
qio "$REF" qcow2 -d unmap <<'EOF'
write -z -n -u 1G 5G
write -z -n 7G 1M
EOF
check_export "$IMG" "$REF"
# The map's block status requests span more than 4 GiB: only extended
# headers can ask that, and they are answered with 64-bit extents.
qemu-img --trace nbd_send_request --trace nbd_receive_reply_chunk_header \
    map --output=json -f raw "$NBD_URI" >"$TMPD/maptrace.out" 2>&1 || { tail "$TMPD/maptrace.out" >&2; fail "qemu-img map --trace"; }
"$PYTHON" - "$TMPD/maptrace.out" <<'PYEOF' || fail "no block status request over 4 GiB answered with BLOCK_STATUS_EXT"
import re, sys
t = open(sys.argv[1]).read()
big = [int(n) for n in re.findall(r"\.len = (\d+), [^}]*\.type = 7 \(block status\)", t)
       if int(n) >= 1 << 32]
ext = len(re.findall(r"type = 6 \(block status \(64-bit\)\)", t))
print("  block status requests over 4 GiB: %d, BLOCK_STATUS_EXT chunks: %d" % (len(big), ext))
sys.exit(0 if big and ext else 1)
PYEOF
stop_nbd_server
qcheck "$IMG"

# ---- 3. one write-zeroes of 5 GiB ----
if is_qublk; then
    start_nbd_server "$IMG"
    timeout 300 "$PYTHON" "$TESTS_DIR/nbd_ext_proto.py" "$NBD_SOCK" "$SIZE" zero5g \
        || fail "write-zeroes of 5 GiB"
    # The same pattern as nbd_ext_proto.py's (bytes 0..255), then the same
    # zeroes in pieces qemu-io takes (2 GiB at most).
    "$PYTHON" - "$TMPD/pat" <<'PYEOF'
import sys
open(sys.argv[1], "wb").write(bytes(range(256)) * 256)
PYEOF
    for off in 1073676288 $G $((6 * G)); do
        qemu-io -f qcow2 -c "write -s $TMPD/pat $off 64k" "$REF" >/dev/null || fail "qemu-io -s on $REF"
    done
    {
        for i in 1 2 3 4 5; do echo "write -z -u $((i * G - 4096)) $G"; done
        echo "write -z -u $((6 * G - 4096)) 8192"
    } | qio "$REF" qcow2
    check_export "$IMG" "$REF"
    stop_nbd_server
    qcheck "$IMG"
fi

# ---- 4. clients without extended headers ----
use_qemu 7
start_nbd_server "$IMG"
qemu-io -f raw --trace nbd_send_option_request -c 'read 0 4k' "$NBD_URI" >"$TMPD/trace7.out" 2>&1 \
    || { cat "$TMPD/trace7.out" >&2; fail "qemu-io 7.2"; }
! grep -q "option request 11" "$TMPD/trace7.out" || fail "QEMU 7.2 asked for extended headers?"
log_says "structured replies"
SCRIPT7='
write -P 0x77 1M 1M
write -z 1536k 64k
discard 7G 64k
write -P 0x78 4G 64k
flush
'
echo "$SCRIPT7" | qio "$NBD_URI" raw -d unmap
echo "$SCRIPT7" | qemu10 qemu-io -f qcow2 -d unmap "$REF" >"$TMPD/ref7.out" 2>&1 \
    || { cat "$TMPD/ref7.out" >&2; fail "qemu-io 10 on $REF"; }
out=$(qemu-img compare -f raw -F qcow2 "$NBD_URI" "$REF" 2>&1) \
    || fail "the export differs from the reference (QEMU 7.2): $out"
if command -v nbdinfo >/dev/null; then
    nbdinfo --json "$NBD_URI" >"$TMPD/info.json" || fail "nbdinfo"
    "$PYTHON" - "$TMPD/info.json" "$SIZE" <<'PYEOF' || fail "nbdinfo: wrong answers"
import json, sys
j = json.load(open(sys.argv[1]))
e = j["exports"][0]
if (e.get("export-size") != int(sys.argv[2]) or j.get("protocol") != "newstyle-fixed"
        or j.get("structured") is not True or e.get("can_df") is not True):
    sys.exit("nbdinfo: %r" % {k: v for k, v in e.items() if k != "content"})
PYEOF
fi
stop_nbd_server
qcheck "$IMG"

echo "PASS: $TEST_NAME"
