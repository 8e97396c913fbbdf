#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""A seeded random NBD client: malformed and well-formed sessions at once.

Usage: nbd_fuzz.py SOCKET EXPORT-SIZE SEED SESSIONS [WORKERS]

Each session (its own random stream: SEED and its number) is one of:
  junk     random bytes, before or after the greeting;
  options  the handshake, then random options (known and unknown ones,
           payloads shaped like the real ones with their inner lengths
           right or wrong, declared lengths right or wrong), following
           the server's replies while they make sense;
  transmit the handshake (structured replies, extended headers and meta
           contexts at random), then random requests: every command and
           some unknown ones, random flags, offsets and lengths at and
           past the export's end and the protocol's limits, writes with
           their payload (or a cut one), a second thread reading replies.
A session ends by NBD_CMD_DISC, by closing at once, or by cutting a
message short.  The script asserts nothing about the replies: it prints
how the sessions ended, and the caller checks the server (still serving
a good client, no sanitizer report, a clean exit, the image consistent;
tests/test-nbd-fuzz.sh).  Replay one session: the SEED and SESSIONS of
the run, WORKERS 1.
"""
import random
import socket
import struct
import sys
import threading

NBDMAGIC, IHAVEOPT, REPMAGIC = 0x4e42444d41474943, 0x49484156454f5054, 0x0003e889045565a9
REQ, EXT_REQ = 0x25609513, 0x21e41c71
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_SR, OPT_LIST_META, OPT_SET_META, OPT_EXT = 8, 9, 10, 11
KNOWN_OPTS = [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
PAYLOAD_LEN = 32
CONTEXTS = [b"base:allocation", b"qemu:dirty-bitmap:", b"qemu:allocation-depth",
            b"base:", b"qemu:", b"", b"x" * 300]
TIMEOUT = 20


class Done(Exception):
    """The session is over (the server closed, or we cut it)."""


def recvall(s, n):
    b = b""
    while len(b) < n:
        try:
            k = s.recv(n - len(b))
        except OSError as e:
            raise Done("recv: %s" % e)
        if not k:
            raise Done("closed by the server")
        b += k
    return b


def send(s, data):
    try:
        s.sendall(data)
    except OSError as e:
        raise Done("send: %s" % e)


class Session:
    def __init__(self, path, size, rnd):
        self.path, self.size, self.r = path, size, rnd
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(TIMEOUT)
        self.s.connect(path)
        self.sr = self.ext = False
        self.stuck = False

    # -- random values with the edges weighted in ----------------------
    def u32(self):
        r = self.r
        return r.choice([0, 1, 2, 3, 16, 255, 4096, 65536, 1 << 31, (1 << 32) - 1,
                         r.getrandbits(32), r.randrange(64)])

    def offset(self):
        r, size = self.r, self.size
        return r.choice([0, 512, r.randrange(size), size - 1, size - 512, size, size + 1,
                         size + r.randrange(1 << 20), 1 << 32, 1 << 63, (1 << 64) - 1,
                         r.getrandbits(64), r.randrange(size) & ~4095])

    def length(self):
        r = self.r
        choices = [0, 1, 511, 512, 4096, 65536, r.randrange(1 << 20), 1 << 20,
                   32 << 20, (32 << 20) + 1, self.size, (1 << 32) - 1, r.randrange(65536)]
        if self.ext:
            choices += [1 << 32, 1 << 40, (1 << 64) - 1, r.getrandbits(64)]
        return r.choice(choices)

    def blob(self, n):
        return bytes(self.r.getrandbits(8) for _ in range(n))

    # -- the handshake -------------------------------------------------
    def greeting(self):
        magic, ihave, _ = struct.unpack(">QQH", recvall(self.s, 18))
        if magic != NBDMAGIC or ihave != IHAVEOPT:
            sys.exit("fuzz: bad greeting %x %x" % (magic, ihave))
        r = self.r
        send(self.s, struct.pack(">I", r.choice([3, 3, 3, 1, 0, 2, r.getrandbits(32)])))

    def name_payload(self, with_infos):
        r = self.r
        name = r.choice([b"", b"", b"x", self.blob(r.randrange(8)), b"a" * 5000])
        nlen = len(name) if r.random() < 0.8 else self.u32()
        d = struct.pack(">I", nlen) + name
        if with_infos:
            infos = [r.choice([0, 1, 2, 3, r.getrandbits(16)]) for _ in range(r.randrange(5))]
            n = len(infos) if r.random() < 0.8 else r.getrandbits(16)
            d += struct.pack(">H", n) + b"".join(struct.pack(">H", i) for i in infos)
        return d

    def meta_payload(self):
        r = self.r
        d = self.name_payload(False)
        qs = [r.choice(CONTEXTS) + self.blob(r.randrange(3)) for _ in range(r.randrange(4))]
        n = len(qs) if r.random() < 0.8 else self.u32()
        d += struct.pack(">I", n)
        for q in qs:
            ql = len(q) if r.random() < 0.85 else self.u32()
            d += struct.pack(">I", ql) + q
        return d

    def option(self):
        """One random option; returns True once transmission began."""
        r = self.r
        o = r.choice(KNOWN_OPTS + [OPT_GO, OPT_SET_META, OPT_EXT, OPT_SR, 0, 12, 0xffff,
                                   r.getrandbits(32)])
        if o in (OPT_INFO, OPT_GO):
            data = self.name_payload(True)
        elif o == OPT_EXPORT_NAME:
            data = r.choice([b"", b"x", self.blob(r.randrange(64))])
        elif o in (OPT_LIST_META, OPT_SET_META):
            data = self.meta_payload()
        elif r.random() < 0.8:
            data = b""
        else:
            data = self.blob(r.randrange(32))
        ln = len(data)
        if r.random() < 0.1:
            ln = self.u32()
        magic = IHAVEOPT if r.random() < 0.97 else r.getrandbits(64)
        if magic == IHAVEOPT and ln == len(data) and o not in (OPT_ABORT, OPT_EXPORT_NAME):
            return self.send_option(o, data) == 1 and o == OPT_GO
        send(self.s, struct.pack(">QII", magic, o, ln) + data)
        if o == OPT_EXPORT_NAME and magic == IHAVEOPT and ln == len(data):
            # Success is the export's size and flags with no option
            # reply (and 124 bytes of zeros unless NO_ZEROES).
            recvall(self.s, 10)
            return True
        # Now the server has to find its own way out of it.
        if ln > len(data) and r.random() < 0.5:
            send(self.s, self.blob(r.randrange(64)))
        raise Done("malformed option")

    def send_option(self, o, data):
        """Send well-formed option @o and read its replies up to the
        final one; returns that one's type (1: ACK, bit 31: an error).
        The modes the server acknowledged are the session's."""
        send(self.s, struct.pack(">QII", IHAVEOPT, o, len(data)) + data)
        while True:
            magic, ro, typ, rl = struct.unpack(">QIII", recvall(self.s, 20))
            if magic != REPMAGIC or ro != o:
                sys.exit("fuzz: bad option reply %x to option %d" % (magic, o))
            if rl > 64 << 20:
                sys.exit("fuzz: option reply of %d bytes" % rl)
            recvall(self.s, rl)
            if typ == 1:    # ACK
                if o == OPT_SR:
                    self.sr = True
                elif o == OPT_EXT:
                    self.ext = self.sr = True
                return typ
            if typ & (1 << 31):
                return typ

    # -- transmission --------------------------------------------------
    def drain(self):
        """Read until the server closes (after our side was shut)."""
        try:
            while self.s.recv(1 << 16):
                pass
        except socket.timeout:
            self.stuck = True
        except OSError:
            pass

    def request(self):
        r = self.r
        typ = r.choice([READ, READ, WRITE, WRITE, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS,
                        BLOCK_STATUS, 8, 9, 0xffff])
        flags = r.choice([0, 0, 0, 1, 2, 4, 8, 16, PAYLOAD_LEN, r.getrandbits(16)])
        off, ln = self.offset(), self.length()
        cookie = r.getrandbits(64)
        if self.ext and r.random() < 0.97:
            hdr = struct.pack(">IHHQQQ", EXT_REQ, flags, typ, cookie, off, ln)
        else:
            magic = REQ if r.random() < 0.97 else r.choice([EXT_REQ, r.getrandbits(32)])
            hdr = struct.pack(">IHHQQI", magic, flags, typ, cookie, off, ln & 0xffffffff)
            ln &= 0xffffffff
        payload = b""
        if typ == WRITE or (self.ext and flags & PAYLOAD_LEN):
            n = min(ln, 1 << 20)
            payload = bytes([r.getrandbits(8)]) * n
        send(self.s, hdr + payload)
        if len(payload) < ln and typ == WRITE and ln <= 32 << 20:
            # The payload the header promised, cut short.
            raise Done("write payload cut")
        return typ

    def transmit(self):
        reader = threading.Thread(target=self.drain, daemon=True)
        reader.start()
        end = self.r.random()
        try:
            for _ in range(self.r.randrange(1, 40)):
                if self.request() == DISC:
                    break
            if end < 0.4:
                send(self.s, struct.pack(">IHHQQI", REQ, 0, DISC, 0, 0, 0))
        finally:
            # Our side ends (a DISC sent, or EOF, or a reset): the server
            # must close its side, whatever it still had to say.
            try:
                self.s.shutdown(socket.SHUT_RDWR if end > 0.8 else socket.SHUT_WR)
            except OSError:
                pass
            reader.join(2 * TIMEOUT)
            if reader.is_alive() or self.stuck:
                self.s.shutdown(socket.SHUT_RDWR)
                reader.join()
                self.stuck = True


def session(path, size, seed, i, counts, lock):
    r = random.Random(seed * 1000003 + i)
    kind = r.choice(["junk", "options", "transmit", "transmit", "transmit"])
    how = "ok"
    try:
        s = Session(path, size, r)
    except OSError as e:
        how = "connect: %s" % e
        s = None
    try:
        if s and kind == "junk":
            if r.random() < 0.5:
                recvall(s.s, 18)
            send(s.s, s.blob(r.randrange(1, 2048)))
            s.s.shutdown(socket.SHUT_WR)
            s.drain()
            how = "junk sent"
        elif s:
            s.greeting()
            started = False
            for _ in range(r.randrange(1, 12) if kind == "options" else 0):
                if s.option():
                    started = True
                    break
            if kind == "transmit" and not started:
                # A good handshake: the modes are the ones the server
                # acknowledged (send_option), not the ones asked for.
                if r.random() < 0.5:
                    s.send_option(OPT_EXT if r.random() < 0.5 else OPT_SR, b"")
                if r.random() < 0.5:
                    q = b"base:allocation"
                    s.send_option(OPT_SET_META,
                                  struct.pack(">III", 0, 1, len(q)) + q)
                started = s.send_option(OPT_GO, struct.pack(">IH", 0, 0)) == 1
            if started:
                s.transmit()
    except Done as e:
        how = str(e)
    finally:
        if s:
            s.s.close()
    if "timed out" in how or (s and s.stuck):
        # A reply we were owed, or the server's end of a session we
        # ended, did not come.
        how = "STUCK (%s)" % how
    else:
        how = how.split(":")[0]
    with lock:
        key = "%s: %s" % (kind, how)
        counts[key] = counts.get(key, 0) + 1
        if how.startswith("STUCK"):
            print("session %d (%s): the server did not answer in %d s" % (i, kind, TIMEOUT),
                  flush=True)


def main():
    path, size, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    counts, lock = {}, threading.Lock()

    def worker(w):
        for i in range(w, n, workers):
            session(path, size, seed, i, counts, lock)

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in sorted(counts):
        print("%5d %s" % (counts[k], k))
    stuck = sum(v for k, v in counts.items() if "STUCK" in k)
    if stuck:
        sys.exit("fuzz: %d sessions found the server stuck" % stuck)


if __name__ == "__main__":
    main()
