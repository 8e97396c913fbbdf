#!/bin/bash
# SPDX-License-Identifier: MIT
# The NBD export end to end, with QEMU's and libnbd's clients:
#   1. raw image on a unix socket: qemu-io patterns (plain, FUA, zeroes,
#      discard, aio) checked with read -P and against a reference file
#      (qemu-img compare); nbdinfo size and flags; nbdcopy copy-out; raw
#      protocol checks (every bad request gets an error reply, broken
#      clients are dropped, the server stays up); two clients at once
#      (qemu-io and fio with two jobs); fio randwrite depth 32 with
#      crc32c verify; SIGTERM exits 0.
#   2. TCP (--port 0, address read from the "serving" line), read-only:
#      data reads back, writes/trims/zeroes fail with EPERM.
#   3. qcow2 (cache writeback and none): patterns and compare; SIGTERM
#      in the middle of fio load exits 0 and qemu-img check is clean;
#      the data written before the load reads back after a restart.
#      QUBLK_NBD_TEST_QCOW2=0 leaves this part out (before the qcow2
#      driver exists).
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
requires_server

SIZE=$((64 * 1024 * 1024))
HAVE_FIO=0
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    HAVE_FIO=1
else
    echo "note: fio with the nbd engine not found: fio checks left out" >&2
fi

# Raw protocol client (python3 standard library only).
cat >"$TMPD/nbdproto.py" <<'PYEOF'
# NBD protocol checks against a running server, with a raw client:
# negotiation options, request validation (errors are replies, the
# connection survives), pipelining, and broken clients.
# Usage: nbdproto.py SOCKET|tcp:HOST:PORT EXPORT-SIZE rw|ro
import socket, struct, sys

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454f5054
REPMAGIC = 0x0003e889045565a9
REQMAGIC = 0x25609513
SIMPLE = 0x67446698
ERR = 1 << 31
sock_path, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ro = mode == "ro"


def die(msg):
    sys.exit("nbd protocol check: " + msg)


def conn():
    if sock_path.startswith("tcp:"):
        host, port = sock_path[4:].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=20)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(sock_path)
    return s


def recvall(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            die("server closed the connection (wanted %d more bytes)" % (n - len(b)))
        b += k
    return b


def greet(s, cflags=3):
    magic, opt, hflags = struct.unpack(">QQH", recvall(s, 18))
    if magic != NBDMAGIC or opt != IHAVEOPT or hflags != 3:
        die("bad greeting %x %x %x" % (magic, opt, hflags))
    s.sendall(struct.pack(">I", cflags))


def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)


def rep(s, o):
    magic, ro_, typ, ln = struct.unpack(">QIII", recvall(s, 20))
    if magic != REPMAGIC or ro_ != o:
        die("bad option reply %x %d" % (magic, ro_))
    return typ, recvall(s, ln)


def go(s, name=b"", o=7, reqs=()):
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs))
    data += b"".join(struct.pack(">H", r) for r in reqs)
    opt(s, o, data)
    infos = {}
    while True:
        typ, d = rep(s, o)
        if typ == 3:
            infos[struct.unpack(">H", d[:2])[0]] = d[2:]
        elif typ == 1:
            return infos
        else:
            return typ


cookie = 0


def req(s, typ, off, ln, flags=0, payload=b""):
    global cookie
    cookie += 1
    s.sendall(struct.pack(">IHHQQI", REQMAGIC, flags, typ, cookie, off, ln) + payload)
    return cookie


def reply(s, want_cookie, data_len=0):
    magic, err, ck = struct.unpack(">IIQ", recvall(s, 16))
    if magic != SIMPLE or ck != want_cookie:
        die("bad reply magic %x cookie %d (want %d)" % (magic, ck, want_cookie))
    data = recvall(s, data_len) if err == 0 and data_len else b""
    return err, data


def expect(s, typ, off, ln, err, flags=0, payload=b"", what=""):
    c = req(s, typ, off, ln, flags, payload)
    e, d = reply(s, c, ln if typ == 0 else 0)
    if e != err:
        die("%s: got error %d, want %d" % (what, e, err))
    return d


# Options: LIST, INFO, unknown, structured replies, bad export name.
s = conn()
greet(s)
opt(s, 3)
typ, d = rep(s, 3)
if typ != 2 or d != struct.pack(">I", 0):
    die("NBD_OPT_LIST: reply %x %r" % (typ, d))
if rep(s, 3)[0] != 1:
    die("NBD_OPT_LIST: no ACK")
opt(s, 3, b"junk")
if rep(s, 3)[0] != ERR | 3:
    die("NBD_OPT_LIST with data: not ERR_INVALID")
opt(s, 8, b"x")   # structured replies take no payload (test-nbd-map.sh covers them)
if rep(s, 8)[0] != ERR | 3:
    die("NBD_OPT_STRUCTURED_REPLY with a payload: not ERR_INVALID")
opt(s, 1000, b"x" * 10)
if rep(s, 1000)[0] != ERR | 1:
    die("unknown option: not ERR_UNSUP")
opt(s, 6, struct.pack(">I", 3) + b"abc")    # truncated: no request count
if rep(s, 6)[0] != ERR | 3:
    die("malformed NBD_OPT_INFO: not ERR_INVALID")
if go(s, b"nosuch", 6) != ERR | 6:
    die("NBD_OPT_INFO for an unknown export: not ERR_UNKNOWN")
infos = go(s, b"", 6, (3,))
if not isinstance(infos, dict) or 0 not in infos or 3 not in infos:
    die("NBD_OPT_INFO: missing NBD_INFO_EXPORT/BLOCK_SIZE: %r" % (infos,))
esize, tflags = struct.unpack(">QH", infos[0])
bmin, bpref, bmax = struct.unpack(">III", infos[3])
if esize != size or bmin != 1 or bmax != 32 << 20 or bpref < 4096:
    die("NBD_OPT_INFO: size %d flags %x block sizes %d/%d/%d" % (esize, tflags, bmin, bpref, bmax))
want = 1 | 4 | 8 | 32 | 64 | 256 | 2048 | (2 if ro else 0)
if tflags != want:
    die("transmission flags 0x%x, want 0x%x" % (tflags, want))
if not isinstance(go(s), dict):
    die("NBD_OPT_GO failed")

# Requests: each error is a reply, and the connection survives it.
expect(s, 0, size - 512, 512, 0, what="read of the last sector")
expect(s, 0, size - 512, 1024, 22, what="read past the end")
expect(s, 0, 2 ** 64 - 512, 1024, 22, what="read with offset overflow")
expect(s, 0, 0, 0, 22, what="zero-length read")
expect(s, 0, 0, (32 << 20) + 1, 22, what="read over 32 MiB")
expect(s, 0, 0, 512, 22, flags=4, what="read with DF (not negotiated)")
expect(s, 0, 0, 512, 0, flags=1, what="read with FUA")
expect(s, 3, 0, 0, 0, flags=1, what="flush with FUA")
expect(s, 42, 0, 512, 22, what="unknown command")
expect(s, 7, 0, 512, 22, what="block status (not negotiated)")
expect(s, 3, 0, 0, 0, what="flush")
pattern = bytes(range(256)) * 16
if ro:
    expect(s, 1, 0, 4096, 1, payload=pattern, what="write on read-only export")
    expect(s, 4, 0, 4096, 1, what="trim on read-only export")
    expect(s, 6, 0, 4096, 1, what="write-zeroes on read-only export")
else:
    W = 13 << 20   # a range the shell part of the test leaves alone
    expect(s, 1, W, 4096, 0, flags=1, payload=pattern, what="FUA write")
    if expect(s, 0, W, 4096, 0, what="read back") != pattern:
        die("read back after write differs")
    expect(s, 1, size - 2048, 4096, 28, payload=pattern, what="write past the end")
    expect(s, 1, 0, 4096, 22, flags=0x80, payload=pattern, what="write with unknown flag")
    expect(s, 6, W, 1024, 0, flags=2, what="write-zeroes NO_HOLE")
    expect(s, 4, size, 4096, 28, what="trim past the end")
    expect(s, 6, 0, 1 << 30, 28 if size < (1 << 30) else 0, what="big write-zeroes")
    if expect(s, 0, W, 4096, 0, what="read back") != b"\0" * 1024 + pattern[1024:]:
        die("write-zeroes did not zero exactly its range")
    # An oversized write: the server must skip the payload and go on.
    big = (32 << 20) + 4096
    c = req(s, 1, 0, big)
    s.sendall(b"\xee" * big)
    if reply(s, c)[0] != 22:
        die("write over 32 MiB: not EINVAL")
    if expect(s, 0, W + 1024, 1024, 0, what="read after oversized write") != pattern[1024:2048]:
        die("oversized write changed data")
    # Pipelined: many requests in flight, replies in any order.
    cookies = {req(s, 0, i * 4096, 4096): i for i in range(100)}
    for _ in range(100):
        magic, err, ck = struct.unpack(">IIQ", recvall(s, 16))
        if magic != SIMPLE or err or ck not in cookies:
            die("pipelined read: bad reply %x %d %d" % (magic, err, ck))
        cookies.pop(ck)
        recvall(s, 4096)
req(s, 2, 0, 0)   # NBD_CMD_DISC
if s.recv(1) != b"":
    die("server did not close after NBD_CMD_DISC")
s.close()

# Old-style NBD_OPT_EXPORT_NAME, with and without NO_ZEROES.
for cflags, tail in ((3, 10), (1, 134)):
    s = conn()
    greet(s, cflags)
    opt(s, 1, b"")
    d = recvall(s, tail)
    if struct.unpack(">Q", d[:8])[0] != size or any(d[10:]):
        die("NBD_OPT_EXPORT_NAME reply %r" % d[:10])
    expect(s, 3, 0, 0, 0, what="flush after EXPORT_NAME")
    s.close()

# NBD_OPT_ABORT is acknowledged.
s = conn()
greet(s)
opt(s, 2)
if rep(s, 2)[0] != 1:
    die("NBD_OPT_ABORT not acknowledged")
s.close()

# Broken clients: the server drops them and stays up.
s = conn(); greet(s); s.sendall(struct.pack(">QII", 0x1234, 7, 0)); s.close()   # bad option magic
s = conn(); greet(s); go(s); s.sendall(b"\x00" * 28); s.close()                  # bad request magic
s = conn(); s.close()                                                            # gone before greeting
s = conn(); greet(s); go(s)                                                      # gone mid-payload
req(s, 1, 0, 1 << 20); s.sendall(b"\x55" * 1000); s.close()
s = conn(); greet(s); go(s)                                                      # gone with reads in flight
for i in range(64):
    req(s, 0, 0, 1 << 20)
s.close()
s = conn(); greet(s); go(s)                                                      # gone mid-header
s.sendall(struct.pack(">IHH", REQMAGIC, 0, 0)); s.close()

# ...and still serves.
s = conn()
greet(s)
go(s)
expect(s, 0, 0, 4096, 0, what="read after broken clients")
req(s, 2, 0, 0)
s.close()
print("nbd protocol checks passed")
PYEOF

proto_checks() {   # TARGET SIZE rw|ro
    [ "$QUBLK_TEST_SERVER" = qublk ] || return 0   # qemu-nbd answers differently
    timeout 120 "$PYTHON" "$TMPD/nbdproto.py" "$@" || fail "protocol checks on $1 ($3)"
}

# qemu-io script applied both to the export and to a reference raw file.
PATTERN_SCRIPT='
write -P 0x11 0 1M
write -P 0x22 1M 64k
write -f -P 0x33 3M 4k
write -P 0x44 5000 3000
write -z 1M 4k
aio_write -P 0x55 8M 128k
aio_write -P 0x56 9M 128k
aio_write -P 0x57 10M 2M
aio_flush
write -P 0x66 60M 4M
discard 62M 1M
write -P 0x77 63M 512
flush
'
VERIFY_SCRIPT='
read -P 0x11 0 5000
read -P 0x44 5000 3000
read -P 0x11 8000 1040576
read -P 0 1M 4k
read -P 0x22 1052672 61440
read -P 0x33 3M 4k
read -P 0x55 8M 128k
read -P 0x56 9M 128k
read -P 0x57 10M 2M
read -P 0x66 60M 2M
read -P 0x77 63M 512
'
apply_patterns() {  # TARGET FMT REFERENCE
    # -d unmap: discard reaches the server (NBD_CMD_TRIM) and the reference.
    echo "$PATTERN_SCRIPT" | qio "$1" "$2" -d unmap
    echo "$PATTERN_SCRIPT" | qio "$3" raw -d unmap
    echo "$VERIFY_SCRIPT" | qio "$1" "$2"
}

fio_verify() {      # URI OFFSET SIZE [extra fio args]
    local uri=$1 off=$2 size=$3; shift 3
    [ "$HAVE_FIO" = 1 ] || return 0
    fio --name=verify --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
        --iodepth=32 --offset="$off" --size="$size" --verify=crc32c \
        --do_verify=1 --verify_fatal=1 "$@" >"$TMPD/fio.out" 2>&1 \
        || { tail -n 30 "$TMPD/fio.out" >&2; fail "fio verify on $uri"; }
}

# ---- 1. raw over a unix socket ----
IMG=$TMPD/disk.raw REF=$TMPD/ref.raw
truncate -s "$SIZE" "$IMG" "$REF"
start_nbd_server "$IMG" --format raw
grep -q "^serving $IMG on $NBD_SOCK" "$NBD_LOG" || [ "$QUBLK_TEST_SERVER" != qublk ] \
    || fail "no 'serving FILE on SOCKET' line in the server log"

apply_patterns "$NBD_URI" raw "$REF"
out=$(qemu-img compare -f raw -F raw "$NBD_URI" "$REF" 2>&1) \
    || fail "export differs from the reference: $out"

if command -v nbdinfo >/dev/null; then
    nbdinfo --json "$NBD_URI" >"$TMPD/info.json" || fail "nbdinfo $NBD_URI"
    "$PYTHON" - "$TMPD/info.json" "$SIZE" <<'PYEOF' || fail "nbdinfo: wrong size or flags"
import json, sys
e = json.load(open(sys.argv[1]))["exports"][0]
want = {"export-size": int(sys.argv[2]), "is_read_only": False, "can_flush": True,
        "can_fua": True, "can_trim": True, "can_zero": True, "can_multi_conn": True}
bad = {k: e.get(k) for k in want if e.get(k) != want[k]}
if bad:
    sys.exit("nbdinfo: %s" % bad)
PYEOF
fi
if command -v nbdcopy >/dev/null; then
    nbdcopy "$NBD_URI" "$TMPD/copy.raw" || fail "nbdcopy from $NBD_URI"
    cmp "$TMPD/copy.raw" "$REF" || fail "nbdcopy output differs from the reference"
    rm -f "$TMPD/copy.raw"
fi

proto_checks "$NBD_SOCK" "$SIZE" rw
# The protocol checks wrote at 13 MiB: bring the reference along.
cp "$IMG" "$REF"

# Two clients at once: two qemu-io writers on separate ranges, then two fio
# jobs (one connection each) with verify, while a third client stays open.
printf 'aio_write -P 0xa1 %dM 64k\n' $(seq 16 23) >"$TMPD/a.io"
printf 'aio_write -P 0xb2 %dM 64k\n' $(seq 24 31) >"$TMPD/b.io"
qemu-io -f raw "$NBD_URI" <"$TMPD/a.io" >"$TMPD/a.out" 2>&1 &
pa=$!
qemu-io -f raw "$NBD_URI" <"$TMPD/b.io" >"$TMPD/b.out" 2>&1 &
pb=$!
wait "$pa" || fail "concurrent client A"
wait "$pb" || fail "concurrent client B"
! grep -qiE 'fail|error' "$TMPD/a.out" "$TMPD/b.out" || fail "concurrent qemu-io clients reported errors"
for i in $(seq 16 23); do echo "read -P 0xa1 ${i}M 64k"; done | qio "$NBD_URI" raw
for i in $(seq 24 31); do echo "read -P 0xb2 ${i}M 64k"; done | qio "$NBD_URI" raw

{ echo "read -P 0x11 0 4k"; sleep 3; echo "read -P 0x11 0 4k"; } \
    | qemu-io -f raw "$NBD_URI" >"$TMPD/idle.out" 2>&1 &
pidle=$!
fio_verify "$NBD_URI" 32M 8M --numjobs=2 --offset_increment=8M
fio_verify "$NBD_URI" 48M 8M --bs=64k --rw=randrw
wait "$pidle" || fail "long-lived client"
! grep -qiE 'fail|error|mismatch' "$TMPD/idle.out" || fail "long-lived client saw errors"
stop_nbd_server

# ---- 2. TCP, read-only ----
cp "$REF" "$IMG"
if [ "$QUBLK_TEST_SERVER" = qublk ]; then
    NBD_LOG=$TMPD/server-tcp.log
    NBD_SOCK=$TMPD/none.sock
    "$QUBLK" nbd --port 0 --read-only --format raw --shared 8 "$IMG" >"$NBD_LOG" 2>&1 &
    NBD_PID=$!
    addr=
    for _ in $(seq 1 200); do
        addr=$(sed -n 's/^serving .* on \(127\.0\.0\.1:[0-9]*\).*/\1/p' "$NBD_LOG")
        [ -n "$addr" ] && break
        _alive "$NBD_PID" || { cat "$NBD_LOG" >&2; fail "TCP server exited early"; }
        sleep 0.05
    done
    [ -n "$addr" ] || fail "TCP server did not print its address"
    echo "$VERIFY_SCRIPT" | qio "nbd://$addr" raw -r
    out=$(qemu-img compare -f raw -F raw "nbd://$addr" "$REF" 2>&1) \
        || fail "TCP export differs from the reference: $out"
    proto_checks "tcp:$addr" "$SIZE" ro
    stop_nbd_server
    cmp "$IMG" "$REF" || fail "read-only export changed the image"
fi

# ---- 3. qcow2 ----
if [ "${QUBLK_NBD_TEST_QCOW2:-1}" != 0 ]; then
    for cache in writeback none; do
        FAIL_CONTEXT="qcow2, cache=$cache"
        Q=$TMPD/disk-$cache.qcow2 QREF=$TMPD/qref-$cache.raw
        mkimg -f qcow2 -o cluster_size=64k "$Q" "$SIZE"
        truncate -s "$SIZE" "$QREF"
        start_nbd_server "$Q" --format qcow2 --cache "$cache"
        apply_patterns "$NBD_URI" raw "$QREF"
        out=$(qemu-img compare -f raw -F raw "$NBD_URI" "$QREF" 2>&1) \
            || fail "qcow2 export differs from the reference: $out"
        proto_checks "$NBD_SOCK" "$SIZE" rw
        stop_nbd_server
        qcheck "$Q"

        # SIGTERM under load (writes beyond the patterns) exits 0, clean.
        start_nbd_server "$Q" --format qcow2 --cache "$cache"
        if [ "$HAVE_FIO" = 1 ]; then
            fio --name=load --ioengine=nbd --uri="$NBD_URI" --rw=randwrite --bs=4k \
                --iodepth=32 --offset=16M --size=32M --time_based --runtime=30 \
                >"$TMPD/load.out" 2>&1 &
        else
            printf 'aio_write -P 0xcc %dM 1M\n' $(seq 16 47) \
                | qemu-io -f raw "$NBD_URI" >"$TMPD/load.out" 2>&1 &
        fi
        pload=$!
        sleep 2
        stop_nbd_server
        wait "$pload" || true     # the client loses its server: errors expected
        qcheck "$Q"
        start_nbd_server "$Q" --format qcow2 --cache "$cache"
        echo "$VERIFY_SCRIPT" | qio "$NBD_URI" raw
        stop_nbd_server
        qcheck "$Q"
    done
    FAIL_CONTEXT=
    export FAIL_CONTEXT
fi

echo "PASS: $TEST_NAME"
