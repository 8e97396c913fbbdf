#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""NBD extended headers (NBD_OPT_EXTENDED_HEADERS) with a raw client.

Usage: nbd_ext_proto.py SOCKET EXPORT-SIZE [zero5g]

The export must be at least 8 GiB and writable.  Without `zero5g`: the
checks below, on a fresh sparse image (they write in the first 256 KiB
and zero or trim from 2 GiB on).  With `zero5g`: only writes of a 64 KiB
pattern (bytes 0..255 repeated) at 1 GiB - 64 KiB, 1 GiB and 6 GiB, then
one write-zeroes of [1 GiB - 4 KiB, 6 GiB + 4 KiB): only extended headers
can say it; the caller compares the image with QEMU's result.

Checks: the option rules (a payload, a second request, structured replies
after extended headers, EXPORT_NAME after them), the 32-byte request and
reply headers (cookie and offset echoed, no simple reply ever), reads as
data/hole chunks, writes with and without NBD_CMD_FLAG_PAYLOAD_LEN,
payloads on other commands skipped and refused, 64-bit lengths (refused
past the maximum payload for reads, allowed for write-zeroes, trim and
block status), NBD_REPLY_TYPE_BLOCK_STATUS_EXT with 64-bit extents and
REQ_ONE, errors as error chunks; malformed clients dropped while the
server goes on serving.
"""
import socket
import struct
import sys

IHAVEOPT, REPMAGIC = 0x49484156454f5054, 0x0003e889045565a9
REQ, EXT_REQ = 0x25609513, 0x21e41c71
EXT_REPLY = 0x6e8a278c
ERR = 1 << 31
OPT_EXPORT_NAME, OPT_INFO, OPT_GO, OPT_SR, OPT_LIST_META, OPT_SET_META, OPT_EXT = \
    1, 6, 7, 8, 9, 10, 11
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32
T_NONE, T_DATA, T_HOLE, T_BS, T_BS_EXT, T_ERROR = 0, 1, 2, 5, 6, 0x8001
EINVAL, ENOSPC, ENOTSUP = 22, 28, 95
K, M, G = 1 << 10, 1 << 20, 1 << 30
MAX_PAYLOAD = 32 * M

path, size = sys.argv[1], int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "checks"


def die(msg):
    sys.exit("extended header check: " + msg)


class Closed(Exception):
    pass


def recvall(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            raise Closed()
        b += k
    return b


def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3))
    return s


def opt(s, o, data=b""):
    """Send an option, return its replies [(type, data)] to the last."""
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)
    reps = []
    while True:
        magic, ro, typ, ln = struct.unpack(">QIII", recvall(s, 20))
        if magic != REPMAGIC or ro != o:
            die("bad option reply %x to %d" % (magic, o))
        reps.append((typ, recvall(s, ln)))
        if typ == 1 or typ & ERR:
            return reps


def last(reps):
    return reps[-1][0]


def set_meta(s, names):
    d = struct.pack(">II", 0, len(names))
    for q in names:
        d += struct.pack(">I", len(q)) + q
    return {r[4:].decode(): struct.unpack(">I", r[:4])[0]
            for t, r in opt(s, OPT_SET_META, d) if t == 4}


def go(s):
    reps = opt(s, OPT_GO, struct.pack(">IH", 0, 0))
    if last(reps) != 1:
        die("GO refused: 0x%x" % last(reps))
    for t, d in reps:
        if t == 3 and struct.unpack(">H", d[:2])[0] == 0:
            return struct.unpack(">QH", d[2:12])


def ext_conn(meta=()):
    """Connected in extended mode; returns (socket, context ids)."""
    s = conn()
    if last(opt(s, OPT_EXT)) != 1:
        die("NBD_OPT_EXTENDED_HEADERS not acknowledged")
    ids = set_meta(s, list(meta)) if meta else {}
    esize, tflags = go(s)
    if esize != size:
        die("export size %d, want %d" % (esize, size))
    if not tflags & 128:
        die("transmission flags 0x%x lack SEND_DF (extended headers imply "
            "structured replies)" % tflags)
    return s, ids


cookie = 0x1000000000


def req(s, typ, off, ln, flags=0, payload=b""):
    global cookie
    cookie += 0x100000001    # both halves change: the whole cookie is echoed
    s.sendall(struct.pack(">IHHQQQ", EXT_REQ, flags, typ, cookie, off, ln) + payload)
    return cookie, off


def chunks(s, rq):
    """Every chunk of one reply, until DONE: [(type, payload)]."""
    ck, off = rq
    out = []
    while True:
        magic, flags, typ, c, o, ln = struct.unpack(">IHHQQQ", recvall(s, 32))
        if magic != EXT_REPLY:
            die("reply magic 0x%x, want the extended reply magic" % magic)
        if c != ck or o != off:
            die("chunk for cookie %x offset %d, want %x %d" % (c, o, ck, off))
        if ln > MAX_PAYLOAD + 64:
            die("chunk payload of %d bytes" % ln)
        out.append((typ, recvall(s, ln)))
        if flags & 1:
            return out


def status(s, rq):
    """0 for a lone NONE chunk, the errno of a lone error chunk."""
    r = chunks(s, rq)
    if len(r) != 1:
        die("%d chunks, want one: %r" % (len(r), [t for t, _ in r]))
    typ, p = r[0]
    if typ == T_NONE and not p:
        return 0
    if typ == T_ERROR and len(p) >= 6:
        return struct.unpack(">I", p[:4])[0]
    die("unexpected chunk type %d (%d bytes)" % (typ, len(p)))


def expect(s, typ, off, ln, err, flags=0, payload=b"", what=""):
    e = status(s, req(s, typ, off, ln, flags, payload))
    if e != err:
        die("%s: error %d, want %d" % (what, e, err))


def read(s, off, ln, flags=0):
    """A read reassembled from its chunks: (data or errno, chunk types)."""
    buf, seen, types = bytearray(min(ln, MAX_PAYLOAD)), 0, []
    for typ, p in chunks(s, req(s, READ, off, ln, flags)):
        types.append(typ)
        if typ == T_DATA:
            o = struct.unpack(">Q", p[:8])[0] - off
            buf[o:o + len(p) - 8] = p[8:]
            seen += len(p) - 8
        elif typ == T_HOLE:
            seen += struct.unpack(">QI", p)[1]
        elif typ == T_ERROR:
            return struct.unpack(">I", p[:4])[0], types
        else:
            die("chunk type %d in a read" % typ)
    if seen != ln:
        die("read chunks cover %d of %d bytes" % (seen, ln))
    return bytes(buf), types


def block_status(s, ids, off, ln, flags=0):
    """{context name: [(length, flags)]}, or the errno."""
    names = {v: k for k, v in ids.items()}
    r = chunks(s, req(s, BLOCK_STATUS, off, ln, flags))
    if len(r) == 1 and r[0][0] == T_ERROR:
        return struct.unpack(">I", r[0][1][:4])[0]
    out = {}
    for typ, p in r:
        if typ != T_BS_EXT:
            die("block status chunk type %d, want BLOCK_STATUS_EXT" % typ)
        ctx, count = struct.unpack(">II", p[:8])
        if (len(p) - 8) % 16 or len(p) == 8 or count not in (0, (len(p) - 8) // 16):
            die("block status chunk of %d bytes, count %d" % (len(p), count))
        descs = []
        for i in range(8, len(p), 16):
            n, pad, fl = struct.unpack(">QII", p[i:i + 16])
            if n == 0 or pad:
                die("descriptor (%d, pad %d)" % (n, pad))
            descs.append((n, fl))
        out[names[ctx]] = descs
    if set(out) != set(ids):
        die("block status for contexts %r, want %r" % (set(out), set(ids)))
    return out


def dropped(s, what):
    """The server closes @s (after whatever it still sends)."""
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        die("%s: the connection was not dropped" % what)
    s.close()


if size < 8 * G:
    die("the export must be at least 8 GiB")
pat = bytes(range(256)) * 256            # 64 KiB

if mode == "zero5g":
    s, _ = ext_conn()
    for off in (G - 64 * K, G, 6 * G):
        expect(s, WRITE, off, len(pat), 0, flags=PAYLOAD_LEN, payload=pat,
               what="write at %d" % off)
    expect(s, ZEROES, G - 4096, 5 * G + 8192, 0, what="write-zeroes of 5 GiB + 8 KiB")
    if read(s, G - 64 * K, 64 * K)[0] != pat[:-4096] + b"\0" * 4096:
        die("the write-zeroes did not start at 1 GiB - 4 KiB")
    if read(s, G, 64 * K)[0] != b"\0" * (64 * K):
        die("data at 1 GiB survived the write-zeroes")
    if read(s, 6 * G, 64 * K)[0] != b"\0" * 4096 + pat[4096:]:
        die("the write-zeroes did not end at 6 GiB + 4 KiB")
    expect(s, FLUSH, 0, 0, 0, what="flush")    # the caller reads the file's map
    s.close()
    print("write-zeroes of 5 GiB done")
    sys.exit(0)

# ---- options ----
s = conn()
if last(opt(s, OPT_EXT, b"x")) != ERR | 3:
    die("EXTENDED_HEADERS with a payload: not ERR_INVALID")
if last(opt(s, OPT_SR)) != 1:
    die("STRUCTURED_REPLY not acknowledged")
if last(opt(s, OPT_EXT)) != 1:       # after structured replies: allowed
    die("EXTENDED_HEADERS after STRUCTURED_REPLY not acknowledged")
if last(opt(s, OPT_EXT)) != ERR | 3:
    die("EXTENDED_HEADERS twice: not ERR_INVALID")
if last(opt(s, OPT_SR)) != ERR | 10:
    die("STRUCTURED_REPLY after EXTENDED_HEADERS: not ERR_EXT_HEADER_REQD")
reps = opt(s, OPT_INFO, struct.pack(">IH", 0, 0))
if last(reps) != 1:
    die("INFO after EXTENDED_HEADERS refused")
s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 0))
dropped(s, "EXPORT_NAME after EXTENDED_HEADERS")

# ---- requests ----
s, ids = ext_conn([b"base:allocation", b"qemu:allocation-depth"])
if set(ids) != {"base:allocation", "qemu:allocation-depth"}:
    die("contexts %r" % ids)
expect(s, WRITE, 0, len(pat), 0, flags=PAYLOAD_LEN | FUA, payload=pat,
       what="write with PAYLOAD_LEN")
expect(s, WRITE, 128 * K, 4096, 0, payload=pat[:4096],
       what="write without PAYLOAD_LEN (as QEMU's client sends them)")
d, t = read(s, 0, 256 * K)
want = pat + b"\0" * (64 * K) + pat[:4096] + b"\0" * (124 * K)
if d != want:
    die("read back differs")
d, t = read(s, 0, 256 * K, flags=DF)
if d != want or t != [T_DATA]:
    die("DF read: chunks %r" % t)
d, t = read(s, 2 * M, M)
if d != b"\0" * M or t != [T_HOLE]:
    die("read of a hole: chunks %r" % t)
expect(s, FLUSH, 0, 0, 0, what="flush")
expect(s, FLUSH, 0, 0, 0, flags=FUA, what="flush with FUA")

# Lengths: 64 bits are read whole (no truncation to 32 bits).
e, t = read(s, 0, (1 << 32) + 512)
if e != EINVAL or t != [T_ERROR]:
    die("read of 4 GiB + 512: %r %r" % (e, t))
e, t = read(s, 0, MAX_PAYLOAD + 1)
if e != EINVAL:
    die("read over the maximum payload: %r" % (e,))
e, t = read(s, 0, 0)
if e != EINVAL:
    die("zero-length read: %r" % (e,))
e, t = read(s, size - 512, 1024)
if e != EINVAL:
    die("read past the end: %r" % (e,))
expect(s, ZEROES, 2 ** 64 - 512, 1024, ENOSPC, what="write-zeroes with offset overflow")
expect(s, ZEROES, 0, 2 ** 63, ENOSPC, what="write-zeroes of 2^63 bytes")
expect(s, ZEROES, 0, 0, EINVAL, what="zero-length write-zeroes")
expect(s, TRIM, size - 4096, 1 << 32, ENOSPC, what="trim past the end")
expect(s, TRIM, 2 * G, 4 * G, 0, what="trim of 4 GiB (64-bit length)")
expect(s, ZEROES, 2 * G, 4 * G + 4096, 0, flags=NO_HOLE,
       what="write-zeroes of 4 GiB + 4 KiB")
expect(s, 42, 0, 512, EINVAL, what="unknown command")
expect(s, CACHE, 0, 4096, EINVAL, what="cache (not advertised)")
expect(s, ZEROES, 4096, 512, ENOTSUP, flags=FAST_ZERO,
       what="FAST_ZERO inside a data cluster (would write zeros)")
expect(s, ZEROES, 2 * G, 4 * G, 0, flags=FAST_ZERO, what="FAST_ZERO of 4 GiB, cluster aligned")

# Payloads: skipped and refused on anything but a write; the next request
# is read from the right place.
expect(s, FLUSH, 0, 100, EINVAL, flags=PAYLOAD_LEN, payload=b"\xee" * 100,
       what="flush with a payload")
e = status(s, req(s, READ, 0, 4096, PAYLOAD_LEN, b"\xee" * 4096))
if e != EINVAL:
    die("read with a payload: %d" % e)
expect(s, ZEROES, 0, 512, EINVAL, flags=PAYLOAD_LEN, payload=b"\0" * 512,
       what="write-zeroes with a payload")
expect(s, WRITE, 0, 0, EINVAL, flags=PAYLOAD_LEN, what="empty write")
expect(s, WRITE, size - 512, 4096, ENOSPC, flags=PAYLOAD_LEN, payload=pat[:4096],
       what="write past the end")
expect(s, WRITE, 0, 4096, EINVAL, flags=PAYLOAD_LEN | 0x100, payload=pat[:4096],
       what="write with an unknown flag")
if read(s, 0, 64 * K)[0] != pat:
    die("refused requests changed data")

# Block status: 64-bit extents over the whole image.
bs = block_status(s, ids, 0, size)
for name, descs in bs.items():
    if sum(n for n, _ in descs) > size:
        die("%s: extents past the end" % name)
alloc = bs["base:allocation"]
if alloc[0] != (64 * K, 0) or alloc[1][1] & 1 == 0:
    die("base:allocation starts with %r" % (alloc[:2],))
if not any(n >= 4 * G for n, _ in alloc):
    die("no extent of 4 GiB or more (64-bit lengths): %r" % alloc[:8])
if alloc[-1][1] & 2 == 0:
    die("the sparse end does not read as zeros: %r" % alloc[-4:])
one = block_status(s, ids, 512 * K, size - 512 * K, flags=REQ_ONE)
for name, descs in one.items():
    if len(descs) != 1 or descs[0][0] > size - 512 * K:
        die("REQ_ONE: %s: %r" % (name, descs))
one = block_status(s, ids, 4096, 8192, flags=REQ_ONE)
if one["base:allocation"] != [(8192, 0)] or one["qemu:allocation-depth"] != [(8192, 1)]:
    die("REQ_ONE inside data: %r" % one)
if block_status(s, ids, size, 512) != EINVAL:
    die("block status past the end: not EINVAL")
if block_status(s, ids, 0, 4096, flags=NO_HOLE) != EINVAL:
    die("block status with a bad flag: not EINVAL")

# Pipelined reads: every reply in extended form, in any order.
pending = {}
for i in range(64):
    ck, off = req(s, READ, (i % 4) * 4096, 4096, DF)
    pending[ck] = off
while pending:
    magic, flags, typ, c, o, ln = struct.unpack(">IHHQQQ", recvall(s, 32))
    if magic != EXT_REPLY or c not in pending or pending.pop(c) != o or typ != T_DATA:
        die("pipelined read: bad chunk %x %d %x %d" % (magic, typ, c, o))
    p = recvall(s, ln)
    if p[8:] != pat[o:o + 4096]:
        die("pipelined read: data differs")

s.sendall(struct.pack(">IHHQQQ", EXT_REQ, 0, DISC, 0, 0, 0))
if s.recv(1) != b"":
    die("no close after NBD_CMD_DISC")
s.close()

# One context: a single extent over the sparse rest of the image (the
# depth context would end it where the zeroed clusters begin).
s, ids = ext_conn([b"base:allocation"])
one = block_status(s, ids, 512 * K, size - 512 * K, flags=REQ_ONE)["base:allocation"]
if len(one) != 1 or one[0][0] <= 4 * G or one[0][0] > size - 512 * K or one[0][1] != 3:
    die("REQ_ONE over the sparse part: %r" % one)
s.close()

# ---- malformed clients: dropped, and the server goes on ----
s, _ = ext_conn()
s.sendall(struct.pack(">IHHQQI", REQ, 0, READ, 1, 0, 4096) * 2)  # compact headers
dropped(s, "a compact request after EXTENDED_HEADERS")
s = conn()
go(s)
s.sendall(struct.pack(">IHHQQQ", EXT_REQ, 0, READ, 1, 0, 4096))  # not negotiated
dropped(s, "an extended request without EXTENDED_HEADERS")
s, _ = ext_conn()
s.sendall(struct.pack(">IHHQQQ", EXT_REQ, PAYLOAD_LEN, WRITE, 1, 0, 1 << 40))
dropped(s, "a write announcing a 1 TiB payload")
s, _ = ext_conn()
s.sendall(struct.pack(">IHHQQQ", EXT_REQ, PAYLOAD_LEN, FLUSH, 1, 0, MAX_PAYLOAD + 1))
dropped(s, "a flush announcing a payload over the maximum")
s, _ = ext_conn()
s.sendall(struct.pack(">IHHQ", EXT_REQ, 0, READ, 1))               # half a header
s.close()
s, _ = ext_conn()
s.sendall(struct.pack(">IHHQQQ", EXT_REQ, PAYLOAD_LEN, WRITE, 1, 0, M) + b"\x55" * 1000)
s.close()                                                          # gone mid-payload
s, _ = ext_conn()
for i in range(64):
    req(s, READ, 0, M)
s.close()                                                          # gone with reads in flight

s, _ = ext_conn()
if read(s, 0, 64 * K)[0] != pat:
    die("read after the malformed clients")
expect(s, FLUSH, 0, 0, 0, what="flush after the malformed clients")
s.close()
print("extended header checks passed")
