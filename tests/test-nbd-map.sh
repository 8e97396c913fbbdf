#!/bin/bash
# SPDX-License-Identifier: MIT
# Structured replies and block status, with libnbd's and QEMU's clients:
#   1. `nbdinfo --map` (base:allocation) and `nbdinfo
#      --map=qemu:allocation-depth` of the export equal `qemu-img map
#      --output=json` of the image, and `qemu-img map` over the NBD URL
#      agrees on zero/data: qcow2 with data, zero clusters, discards,
#      compressed clusters and holes; a qcow2 -> qcow2 -> short raw chain
#      with zero clusters over backing data; a v2 image.
#   2. A 4 GiB image with 64 MiB allocated: nbdcopy, and qemu-img convert
#      to raw and to qcow2, write only the allocated data (allocated size
#      of the destination) and copy it exactly (qemu-img compare).
#   3. Protocol checks with a raw client: option rules, hole and data
#      chunks, DF, error chunks, REQ_ONE, block status limits.
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io nbdinfo nbdcopy "$PYTHON"
requires_server

# norm_qemu FILE KEY [SIZES]: qemu-img map JSON -> "start length value"
# lines, merged; KEY alloc (hole|zero bits) or depth (0 = nowhere, else
# the layer).  SIZES (depth only): virtual sizes down the chain, for
# QEMU's rule that zeros past the end of a short backing file belong to
# that backing file's layer.
norm_qemu() {
    "$PYTHON" - "$@" <<'PYEOF'
import json, sys
ext, key = json.load(open(sys.argv[1])), sys.argv[2]
sizes = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else []
pieces = []
for e in ext:
    s, n = e["start"], e["length"]
    if key == "alloc":
        pieces.append((s, n, (0 if e["data"] else 1) | (2 if e["zero"] else 0)))
    elif e["present"]:
        pieces.append((s, n, e["depth"] + 1))
    else:
        cuts = sorted({s, s + n} | {z for z in sizes if s < z < s + n})
        for a, b in zip(cuts, cuts[1:]):
            v = 0
            for layer in range(1, len(sizes)):
                if a >= sizes[layer]:
                    v = layer + 1
                    break
            pieces.append((a, b - a, v))
out = []
for s, n, v in pieces:
    if out and out[-1][2] == v and out[-1][0] + out[-1][1] == s:
        out[-1][1] += n
    else:
        out.append([s, n, v])
for o in out:
    print(*o)
PYEOF
}

# norm_nbdinfo FILE: nbdinfo --map --json -> the same form.
norm_nbdinfo() {
    "$PYTHON" - "$1" <<'PYEOF'
import json, sys
out = []
for e in json.load(open(sys.argv[1])):
    s, n, v = e["offset"], e["length"], e["type"]
    if out and out[-1][2] == v and out[-1][0] + out[-1][1] == s:
        out[-1][1] += n
    else:
        out.append([s, n, v])
for o in out:
    print(*o)
PYEOF
}

check_map() {   # IMAGE
    local img=$1 what sizes
    qemu-img map --output=json "$img" >"$TMPD/qmap.json" || fail "qemu-img map $img"
    sizes=$(qemu-img info --backing-chain --output=json "$img" \
        | "$PYTHON" -c 'import json,sys; print(",".join(str(i["virtual-size"]) for i in json.load(sys.stdin)))') \
        || fail "qemu-img info $img"
    start_nbd_server "$img" --read-only
    for what in alloc depth; do
        local ctx=base:allocation
        [ "$what" = alloc ] || ctx=qemu:allocation-depth
        nbdinfo --map="$ctx" --json "$NBD_URI" >"$TMPD/nmap.json" || fail "nbdinfo --map=$ctx"
        norm_qemu "$TMPD/qmap.json" "$what" "$sizes" >"$TMPD/want"
        norm_nbdinfo "$TMPD/nmap.json" >"$TMPD/got"
        diff -u "$TMPD/want" "$TMPD/got" >&2 || fail "nbdinfo --map=$ctx differs from qemu-img map of $img"
    done
    # qemu-img map through NBD sees the same zero/data layout.
    qemu-img map --output=json -f raw "$NBD_URI" >"$TMPD/qnmap.json" || fail "qemu-img map over NBD"
    norm_qemu "$TMPD/qmap.json" alloc | awk '{print $1, $2, $3 >= 2 ? ($3 == 3 ? "hole" : "zero-data") : "data"}' >"$TMPD/want"
    norm_qemu "$TMPD/qnmap.json" alloc | awk '{print $1, $2, $3 >= 2 ? ($3 == 3 ? "hole" : "zero-data") : "data"}' >"$TMPD/got"
    diff -u "$TMPD/want" "$TMPD/got" >&2 || fail "qemu-img map over NBD differs from the image's map ($img)"
    stop_nbd_server
}

# ---- 1. maps ----
M=$((1024 * 1024))
A=$TMPD/a.qcow2
mkimg -f qcow2 -o cluster_size=64k "$A" 64M
qemu-io -f qcow2 "$A" >/dev/null <<'EOF' || fail "qemu-io on $A"
write -P 1 0 1M
write -z 2M 1M
write -P 2 4M 1M
discard 4M 256k
write -c -P 3 8M 64k
write -c -P 4 8256k 64k
write -P 5 63M 1M
write -z -u 40M 128k
EOF
check_map "$A"

B=$TMPD/base.raw MID=$TMPD/mid.qcow2 TOP=$TMPD/top.qcow2
truncate -s 24M "$B"
qemu-io -f raw "$B" -c 'write -P 7 0 2M' -c 'write -P 8 12M 64k' >/dev/null || fail "qemu-io on $B"
mkimg -f qcow2 -b "$B" -F raw "$MID" 48M
qemu-io -f qcow2 "$MID" -c 'write -P 9 1M 2M' -c 'write -z 12M 64k' -c 'write -P 10 30M 1M' >/dev/null \
    || fail "qemu-io on $MID"
mkimg -f qcow2 -b "$MID" -F qcow2 "$TOP" 64M
qemu-io -f qcow2 "$TOP" -c 'write -P 11 1536k 64k' -c 'write -z 30M 512k' -c 'write -P 12 50M 1M' >/dev/null \
    || fail "qemu-io on $TOP"
check_map "$TOP"

V2=$TMPD/v2.qcow2
mkimg -f qcow2 -o compat=0.10 -b "$MID" -F qcow2 "$V2" 48M
qemu-io -f qcow2 "$V2" -c 'write -P 13 5M 1M' -c 'write -z 1M 64k' >/dev/null || fail "qemu-io on $V2"
check_map "$V2"

# ---- 2. sparse copies of a mostly empty 4 GiB image ----
BIG=$TMPD/big.qcow2
mkimg -f qcow2 "$BIG" 4G
{
    for i in $(seq 0 15); do echo "write -P $((i + 1)) $((i * 256 + 3))M 4M"; done
} | qemu-io -f qcow2 "$BIG" >/dev/null || fail "qemu-io on $BIG"
DATA=$((64 * M))
start_nbd_server "$BIG" --read-only
alloc_ok() {   # FILE WHAT: allocated size within DATA + 16 MiB
    local a
    a=$(du -B1 "$1" | cut -f1)
    [ "$a" -le $((DATA + 16 * M)) ] || fail "$2 allocated $a bytes for $DATA bytes of data"
    echo "  $2: $a bytes allocated"
}
t0=$SECONDS
nbdcopy "$NBD_URI" "$TMPD/copy.raw" || fail "nbdcopy"
alloc_ok "$TMPD/copy.raw" nbdcopy
qemu-img convert -f raw "$NBD_URI" -O raw "$TMPD/conv.raw" || fail "qemu-img convert to raw"
alloc_ok "$TMPD/conv.raw" "qemu-img convert -O raw"
qemu-img convert -f raw "$NBD_URI" -O qcow2 "$TMPD/conv.qcow2" || fail "qemu-img convert to qcow2"
alloc_ok "$TMPD/conv.qcow2" "qemu-img convert -O qcow2"
echo "  three copies in $((SECONDS - t0)) s"
# qemu-img map over NBD: exactly the allocated bytes are data.
qemu-img map --output=json -f raw "$NBD_URI" >"$TMPD/bigmap.json" || fail "qemu-img map over NBD"
got=$("$PYTHON" -c 'import json,sys; print(sum(e["length"] for e in json.load(open(sys.argv[1])) if e["data"]))' "$TMPD/bigmap.json")
[ "$got" = "$DATA" ] || fail "qemu-img map over NBD: $got bytes of data, want $DATA"
stop_nbd_server
for f in copy.raw conv.raw conv.qcow2; do
    qcompare "$TMPD/$f" "$BIG"
done
rm -f "$TMPD"/copy.raw "$TMPD"/conv.*

# ---- 3. protocol checks (qublk: qemu-nbd answers some differently) ----
cat >"$TMPD/structured.py" <<'PYEOF'
# Structured replies and block status with a raw client.
# The image: data (pattern 1) at [0, 1M), zeros elsewhere in [0, 4M).
import socket, struct, sys

IHAVEOPT, REPMAGIC = 0x49484156454f5054, 0x0003e889045565a9
REQ, SIMPLE, STRUCT = 0x25609513, 0x67446698, 0x668e33ef
ERR = 1 << 31
path, size = sys.argv[1], int(sys.argv[2])
M = 1 << 20


def die(msg):
    sys.exit("structured check: " + msg)


def recvall(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            die("server closed the connection")
        b += k
    return b


def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3))
    return s


def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)
    reps = []
    while True:
        magic, ro, typ, ln = struct.unpack(">QIII", recvall(s, 20))
        if magic != REPMAGIC or ro != o:
            die("bad option reply")
        d = recvall(s, ln)
        reps.append((typ, d))
        if typ == 1 or typ & ERR:
            return reps


def meta(o, queries, name=b""):
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q
    return o, d


def ctxs(reps):
    return {d[4:].decode(): struct.unpack(">I", d[:4])[0] for t, d in reps if t == 4}


def go(s):
    reps = opt(s, 7, struct.pack(">IH", 0, 0))
    if reps[-1][0] != 1:
        die("GO refused")
    for t, d in reps:
        if t == 3 and struct.unpack(">H", d[:2])[0] == 0:
            return struct.unpack(">QH", d[2:12])[1]


cookie = 0


def req(s, typ, off, ln, flags=0):
    global cookie
    cookie += 1
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, ln))
    return cookie


def chunks(s, ck):
    """Structured chunks of one reply until DONE: [(type, payload)]."""
    out = []
    while True:
        magic, = struct.unpack(">I", recvall(s, 4))
        if magic == SIMPLE:
            err, c = struct.unpack(">IQ", recvall(s, 12))
            if c != ck:
                die("simple reply for cookie %d, want %d" % (c, ck))
            return [("simple", err)]
        if magic != STRUCT:
            die("bad reply magic %x" % magic)
        flags, typ, c, ln = struct.unpack(">HHQI", recvall(s, 16))
        if c != ck:
            die("chunk for cookie %d, want %d" % (c, ck))
        out.append((typ, recvall(s, ln)))
        if flags & 1:
            return out


def read(s, off, ln, flags=0):
    """Reassemble a structured read; returns (data, chunk types)."""
    buf, seen, types = bytearray(ln), 0, []
    for typ, p in chunks(s, req(s, 0, off, ln, flags)):
        types.append(typ)
        if typ == 1:
            o = struct.unpack(">Q", p[:8])[0] - off
            buf[o:o + len(p) - 8] = p[8:]
            seen += len(p) - 8
        elif typ == 2:
            o, n = struct.unpack(">QI", p)
            seen += n
        elif typ & 0x8000:
            return struct.unpack(">I", p[:4])[0], types
        else:
            die("unexpected chunk type %d in a read" % typ)
    if seen != ln:
        die("read chunks cover %d bytes of %d" % (seen, ln))
    return bytes(buf), types


# Option rules.
s = conn()
if opt(s, *meta(10, [b"base:allocation"]))[-1][0] != ERR | 3:
    die("SET_META_CONTEXT before STRUCTURED_REPLY: not ERR_INVALID")
if opt(s, 8, b"x")[-1][0] != ERR | 3:
    die("STRUCTURED_REPLY with a payload: not ERR_INVALID")
if opt(s, 8)[-1][0] != 1:
    die("STRUCTURED_REPLY not acknowledged")
c = ctxs(opt(s, *meta(9, [])))
if set(c) != {"base:allocation", "qemu:allocation-depth"}:
    die("LIST_META_CONTEXT of all: %r" % c)
if set(ctxs(opt(s, *meta(9, [b"base:"])))) != {"base:allocation"}:
    die("LIST_META_CONTEXT base:")
if set(ctxs(opt(s, *meta(9, [b"qemu:"])))) != {"qemu:allocation-depth"}:
    die("LIST_META_CONTEXT qemu:")
if ctxs(opt(s, *meta(9, [b"nosuch:thing", b"base:allocationX"]))):
    die("LIST_META_CONTEXT matched an unknown context")
if opt(s, *meta(10, [b"base:allocation"], b"nosuch"))[-1][0] != ERR | 6:
    die("SET_META_CONTEXT for an unknown export: not ERR_UNKNOWN")
if opt(s, 10, struct.pack(">II", 0, 5))[-1][0] != ERR | 3:
    die("SET_META_CONTEXT with a truncated query list: not ERR_INVALID")
c = ctxs(opt(s, *meta(10, [b"base:allocation", b"nosuch:ctx"])))
if list(c) != ["base:allocation"] or c["base:allocation"] == 0:
    die("SET_META_CONTEXT: %r" % c)
ba = c["base:allocation"]
tflags = go(s)
if not tflags & 128:
    die("transmission flags 0x%x lack SEND_DF" % tflags)

# Reads: a hole is one hole chunk, data comes back exactly, DF is one
# data chunk, an error is an error chunk and the connection goes on.
d, t = read(s, 2 * M, M)
if t != [2] or d != b"\0" * M:
    die("read of a hole: chunks %r" % t)
pat = b"\x01" * M
d, t = read(s, M // 2, M)
if d != pat[:M // 2] + b"\0" * (M // 2) or t != [1, 2]:
    die("read across data and hole: chunks %r" % t)
d, t = read(s, M // 2, M, flags=4)
if d != pat[:M // 2] + b"\0" * (M // 2) or t != [1]:
    die("DF read: chunks %r" % t)
e, t = read(s, size - 512, 1024)
if e != 22 or t != [0x8001]:
    die("read past the end: %r %r" % (e, t))

# Block status: one chunk for the one context, extents within the range.
def block_status(off, ln, flags=0):
    r = chunks(s, req(s, 7, off, ln, flags))
    if r[0][0] == "simple":
        return r[0][1]
    if len(r) != 1 or r[0][0] != 5:
        die("block status: chunks %r" % [x[0] for x in r])
    p = r[0][1]
    if struct.unpack(">I", p[:4])[0] != ba:
        die("block status: wrong context id")
    return [struct.unpack(">II", p[i:i + 8]) for i in range(4, len(p), 8)]

ext = block_status(0, 4 * M)
if ext[0] != (M, 0) or ext[1][1] != 3 or sum(n for n, _ in ext) > 4 * M:
    die("block status: %r" % ext[:4])
ext = block_status(0, 4 * M, flags=8)
if ext != [(M, 0)]:
    die("block status with REQ_ONE: %r" % ext)
ext = block_status(M // 2, 4096)
if ext != [(4096, 0)]:
    die("block status of a small range: %r" % ext)
if block_status(size, 512) != 22 or block_status(0, 0) != 22:
    die("block status past the end / of nothing: not EINVAL")
s.close()

# Block status without a context, or without structured replies: EINVAL.
for structured in (False, True):
    s = conn()
    if structured:
        opt(s, 8)
    go(s)
    c = req(s, 7, 0, 4096)
    magic, err, ck = struct.unpack(">IIQ", recvall(s, 16))
    if magic != SIMPLE or err != 22:
        die("block status with no context: %x %d" % (magic, err))
    s.close()
print("structured reply checks passed")
PYEOF
if [ "$QUBLK_TEST_SERVER" = qublk ]; then
    S=$TMPD/s.qcow2
    mkimg -f qcow2 "$S" 16M
    qemu-io -f qcow2 "$S" -c 'write -P 1 0 1M' >/dev/null || fail "qemu-io on $S"
    start_nbd_server "$S"
    timeout 60 "$PYTHON" "$TMPD/structured.py" "$NBD_SOCK" $((16 * M)) || fail "structured reply checks"
    stop_nbd_server
    qcheck "$S"
fi

echo "PASS: $TEST_NAME"
