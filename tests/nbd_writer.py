#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""A minimal NBD client that writes under load until the server dies.

Usage: nbd_writer.py SOCKET SIZE SEED OUT

Fixed newstyle handshake (NBD_OPT_EXPORT_NAME), then rounds of 16
pipelined writes (4 KiB..128 KiB, random offsets, a byte pattern per
write) followed by a flush.  The writes of a round are on disjoint
ranges: requests in flight together have no order between them, so two
overlapping ones would leave either's bytes, and the content would have
no one right answer.  A write is durable once a flush sent after its
reply has been answered.  OUT.started appears after the first round.
When the connection drops (the server was
killed) it writes OUT (the durable image content) and OUT.mask (1 where
a byte was written since the last answered flush: its content is not
asserted).  Exit 0 after the connection dropped, 1 on a protocol error.
"""
import os
import random
import socket
import struct
import sys
import time

NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
CMD_WRITE, CMD_FLUSH = 1, 3


class Dropped(Exception):
    pass


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise Dropped()
        b += c
    return b


def main():
    path, size, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rnd = random.Random(seed)
    durable = bytearray(size)
    model = bytearray(size)
    mask = bytearray(size)
    s = socket.socket(socket.AF_UNIX)
    for i in range(100):
        try:
            s.connect(path)
            break
        except (ConnectionRefusedError, FileNotFoundError) as e:
            if i == 99:
                sys.exit("cannot connect to %s: %s" % (path, e))
            time.sleep(0.05)
    try:
        hello = recv_exact(s, 18)
        if hello[:16] != b"NBDMAGICIHAVEOPT":
            sys.exit("bad server greeting")
        s.sendall(struct.pack(">I", 3))            # FIXED_NEWSTYLE | NO_ZEROES
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))   # EXPORT_NAME ""
        esize, _flags = struct.unpack(">QH", recv_exact(s, 10))
        if esize != size:
            sys.exit("export size %d, expected %d" % (esize, size))
        handle = 0
        while True:
            pending = {}
            for _ in range(16):
                n = rnd.choice((4096, 65536, 131072, rnd.randrange(1, 64) * 512))
                while True:
                    off = rnd.randrange(0, size - n) // 512 * 512
                    if all(off + n <= o or o + m <= off for o, m, _p in pending.values()):
                        break
                pat = rnd.randrange(1, 256)
                handle += 1
                pending[handle] = (off, n, pat)
                s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, CMD_WRITE, handle, off, n)
                          + bytes([pat]) * n)
                model[off:off + n] = bytes([pat]) * n
                mask[off:off + n] = b"\1" * n
            while pending:
                magic, err, h = struct.unpack(">IIQ", recv_exact(s, 16))
                if magic != NBD_REPLY_MAGIC or err or h not in pending:
                    sys.exit("bad reply: magic %#x error %d handle %d" % (magic, err, h))
                del pending[h]
            handle += 1
            s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, CMD_FLUSH, handle, 0, 0))
            magic, err, h = struct.unpack(">IIQ", recv_exact(s, 16))
            if magic != NBD_REPLY_MAGIC or err or h != handle:
                sys.exit("bad flush reply")
            durable[:] = model
            mask = bytearray(size)
            if handle == 17:
                open(out + ".started", "w").close()
    except (Dropped, ConnectionResetError, BrokenPipeError):
        pass
    with open(out, "wb") as f:
        f.write(durable)
    with open(out + ".mask", "wb") as f:
        f.write(mask)


if __name__ == "__main__":
    main()
