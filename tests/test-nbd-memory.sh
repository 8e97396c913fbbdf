#!/bin/bash
# SPDX-License-Identifier: MIT
# Bounded server memory: 50 clients each send four 32 MiB reads of
# allocated data and never read the replies.  Without caps that is 6.4 GiB
# of read buffers; `qublk nbd` must stay under its documented bound
# (README, src/nbd/pool.c):
#     NBD_SRV_MEM_MAX (256 MiB) + 1 MiB per connection + the 32 MiB pool
# above its idle RSS (plus a little per connection for its structures),
# while actually reaching the server cap (so the test can fail).  While
# they stall, a new client's small reads are still served (the per-
# connection floor), and once they leave, the buffers go back to the
# kernel (RSS falls back near idle).  Then the limits advertised in
# NBD_INFO_BLOCK_SIZE are enforced: 32 MiB reads and writes succeed,
# one byte more fails with EINVAL and the connection goes on.
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "qublk's own memory bound"
requires_server

MIB=$((1024 * 1024))
NCONN=50
IMG=$TMPD/disk.qcow2
mkimg -f qcow2 "$IMG" 256M
echo 'write -P 0x6b 0 32M' | qio "$IMG" qcow2

SOCK=$TMPD/mem.sock
# ASan's quarantine would hold freed small buffers; the bound is about ours.
ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=8" \
    "$QUBLK" nbd --socket "$SOCK" --shared 0 "$IMG" >"$TMPD/server.log" 2>&1 &
NBD_PID=$! NBD_LOG=$TMPD/server.log
for _ in $(seq 1 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
[ -S "$SOCK" ] || { cat "$NBD_LOG" >&2; fail "server did not listen"; }
URI="nbd+unix:///?socket=$SOCK"

kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }

# Warm up (one client, a few reads) so idle RSS includes the loop's own.
echo 'read -P 0x6b 0 1M' | qio "$URI" raw
idle=$(kib "$NBD_PID" VmRSS)
fds=$(find "/proc/$NBD_PID/fd" -mindepth 1 | wc -l)
echo "idle RSS: $((idle / 1024)) MiB"

cat >"$TMPD/hog.py" <<'PYEOF'
# N connections; each asks for READS reads of LEN bytes at offset 0 and
# never reads a reply.  Prints "ready", then holds the sockets until
# stdin closes.
import socket, struct, sys
path, n, reads, ln = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def recvall(s, k):
    b = b""
    while len(b) < k:
        x = s.recv(k - len(b))
        if not x:
            sys.exit("server closed")
        b += x
    return b

socks = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454f5054, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, typ, l = struct.unpack(">QIII", recvall(s, 20))
        recvall(s, l)
        if typ == 1:
            break
        if typ & (1 << 31):
            sys.exit("GO refused")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for j in range(reads):
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, j, 0, ln))
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
PYEOF

# The hog keeps its sockets while its stdin (a FIFO we hold) stays open.
mkfifo "$TMPD/hold"
"$PYTHON" "$TMPD/hog.py" "$SOCK" "$NCONN" 4 $((32 * MIB)) <"$TMPD/hold" >"$TMPD/hog.out" 2>&1 &
hog=$!
exec 9>"$TMPD/hold"
for _ in $(seq 1 400); do
    grep -q ready "$TMPD/hog.out" && break
    _alive "$hog" || { cat "$TMPD/hog.out" >&2; fail "hog client died"; }
    sleep 0.05
done
grep -q ready "$TMPD/hog.out" || fail "hog client not ready"

# Let the server fill what it may: RSS stops growing.
prev=0
for _ in $(seq 1 40); do
    sleep 0.25
    cur=$(kib "$NBD_PID" VmRSS)
    [ "$cur" -gt $((prev + 1024)) ] || break
    prev=$cur
done

# A new client is still served (small reads fit in its floor).
echo 'read -P 0x6b 4M 64k' | timeout 20 qemu-io -f raw "$URI" >"$TMPD/small.out" 2>&1 ||
    { cat "$TMPD/small.out" >&2; fail "a small read while 50 clients stall"; }
grep -q "read 65536/65536" "$TMPD/small.out" || { cat "$TMPD/small.out" >&2; fail "small read failed"; }

peak=$(kib "$NBD_PID" VmHWM)
used=$(((peak - idle) / 1024))
bound=$((256 + NCONN * 1 + 32 + NCONN / 2 + 16))
echo "peak RSS: $((peak / 1024)) MiB, $used MiB over idle (bound $bound MiB over idle)"
[ "$used" -le "$bound" ] || fail "RSS grew by $used MiB under $NCONN stalled clients (bound $bound MiB)"
[ "$used" -ge 200 ] || fail "RSS grew by only $used MiB: the stalled reads did not reach the server cap"

# They leave: their queued requests are not executed (the server sees the
# hang-up after waiting for memory), every connection closes within a few
# seconds, and buffers beyond the pool's 32 MiB go back to the kernel.
exec 9>&-
wait "$hog" || true
t0=$SECONDS
while [ "$(find "/proc/$NBD_PID/fd" -mindepth 1 | wc -l)" -gt "$fds" ]; do
    [ $((SECONDS - t0)) -lt 20 ] || fail "connections of the departed clients still open after 20 s"
    sleep 0.1
done
after=$(kib "$NBD_PID" VmRSS)
echo "closed after $((SECONDS - t0)) s; RSS then: $((after / 1024)) MiB"
[ $(((after - idle) / 1024)) -le $((32 + 16)) ] ||
    fail "RSS still $(((after - idle) / 1024)) MiB over idle after the clients left"

# Limits from NBD_INFO_BLOCK_SIZE: max 32 MiB enforced, connection kept.
cat >"$TMPD/limits.py" <<'PYEOF'
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
def recvall(k):
    b = bytearray(k)
    v, got = memoryview(b), 0
    while got < k:
        x = s.recv_into(v[got:], k - got)
        if not x:
            sys.exit("server closed")
        got += x
    return bytes(b)
recvall(18)
s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454f5054, 7, 8) + struct.pack(">IHH", 0, 1, 3))
bmax = None
while True:
    _, _, typ, l = struct.unpack(">QIII", recvall(20))
    d = recvall(l)
    if typ == 3 and struct.unpack(">H", d[:2])[0] == 3:
        bmin, bpref, bmax = struct.unpack(">III", d[2:])
    if typ == 1:
        break
if bmax != 32 << 20:
    sys.exit("NBD_INFO_BLOCK_SIZE maximum %r, want 32 MiB" % bmax)
def req(typ, ln, payload=b""):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, typ, 9, 0, ln))
    if payload:
        s.sendall(payload)
    magic, err, _ = struct.unpack(">IIQ", recvall(16))
    if typ == 0 and err == 0:
        return err, recvall(ln)
    return err, None
err, data = req(1, bmax, b"\x71" * bmax)
if err:
    sys.exit("32 MiB write: error %d" % err)
err, data = req(0, bmax)
if err or data != b"\x71" * bmax:
    sys.exit("32 MiB read: error %d or wrong data" % err)
for typ, name in ((0, "read"), (1, "write")):
    err, _ = req(typ, bmax + 1, b"\x72" * (bmax + 1) if typ == 1 else b"")
    if err != 22:
        sys.exit("%s of max+1 bytes: error %d, want EINVAL" % (name, err))
err, data = req(0, 4096)
if err or data != b"\x71" * 4096:
    sys.exit("connection unusable after refused requests")
print("limits enforced")
PYEOF
"$PYTHON" "$TMPD/limits.py" "$SOCK" || fail "block size limits"
stop_nbd_server
qcheck "$IMG"
echo "PASS: $TEST_NAME"
