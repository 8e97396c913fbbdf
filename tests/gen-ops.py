#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Random operation generator for the differential NBD test.

Given a seed and an image geometry, writes pairs of qemu-io scripts into
OUTDIR: img.N.io is run against the qcow2 image served over NBD, ref.N.io
against a plain raw file, for segments N = 0 .. SEGMENTS-1.  After every
segment the two must read back identical.  Same seed, same arguments ->
byte-identical scripts, so a failure replays with QUBLK_SEED.

The reference script encodes what QEMU's own qcow2 driver does (checked
against qemu-nbd --discard=unmap serving a qcow2 image, which is the oracle):
  - write -P / write -z / write -z -u change exactly the bytes in the range;
  - discard (NBD TRIM) only acts on the whole clusters inside the range: they
    read as zeros afterwards (v3: zero flag; v2 with no backing file:
    unallocated).  Partial clusters at either end are left untouched, so the
    reference gets `write -z` of the cluster-aligned inner part only.
    The image size is a multiple of the cluster size, so QEMU's special case
    for a partial last cluster never applies.
Concurrency: a batch of aio_write commands is issued before one aio_flush.
Requests in a batch never overlap byte-wise (the result would be undefined)
but often share clusters, which is what exercises allocation and COW
serialisation in the server.  The reference applies them as plain writes.

Python 3 standard library only.
"""

import argparse
import os
import random
import sys


def parse_size(s):
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("b").rstrip("i")
    num = s.rstrip("kmg")
    return int(num) * units[s[len(num):]]


class Gen:
    def __init__(self, args):
        self.rng = random.Random(args.seed)
        self.size = args.size
        self.cs = args.cluster_size
        self.compat = args.compat
        self.spread = args.spread
        # Longest request: a few clusters, at least 64 KiB so that small
        # cluster sizes still see multi-L2-entry requests.
        self.max_len = min(max(4 * self.cs, 64 << 10), self.size // 4,
                           args.max_len or (1 << 62))
        nclusters = self.size // self.cs
        # A handful of "hot" clusters take many overlapping writes, so
        # overwrite, COW of partially written clusters and
        # zero/discard-then-write paths are hit often.
        self.hot = [self.rng.randrange(nclusters) for _ in range(8)]
        self.pat = 0

    def pattern(self):
        # 1..255: never 0, so a lost write cannot hide behind zeros.
        self.pat = self.pat % 255 + 1
        return self.pat

    def offset(self, length):
        r = self.rng.random()
        cs = self.cs
        if r < 0.4 and not self.spread:
            base = self.rng.choice(self.hot) * cs
            off = base + self.rng.choice([0, 0, self.rng.randrange(cs),
                                          cs - 1, cs // 2, 512 % cs])
        elif r < 0.55:
            off = self.rng.randrange(self.size // cs) * cs
        elif r < 0.7:
            off = self.rng.randrange(self.size // 512) * 512
        else:
            off = self.rng.randrange(self.size)
        return max(0, min(off, self.size - length))

    def length(self):
        r = self.rng.random()
        cs = self.cs
        if r < 0.15:
            n = self.rng.randint(1, 16)
        elif r < 0.35:
            n = self.rng.randint(1, min(cs, self.max_len))
        elif r < 0.55:
            n = min(cs, self.max_len)
        elif r < 0.7:
            n = self.rng.randint(1, self.max_len // 512) * 512
        else:
            n = self.rng.randint(1, self.max_len)
        return n

    def discard_ref(self, off, length):
        """Reference for an NBD TRIM: whole clusters inside the range."""
        cs = self.cs
        start = -(-off // cs) * cs
        end = (off + length) // cs * cs
        if end > start:
            return ["write -z %d %d" % (start, end - start)]
        return []

    def one(self):
        """One synchronous op: (image command, [reference commands])."""
        r = self.rng.random()
        n = self.length()
        off = self.offset(n)
        if r < 0.55:
            p = self.pattern()
            c = "write -P %d %d %d" % (p, off, n)
            return [c], [c]
        if r < 0.67:
            c = "write -z %d %d" % (off, n)
            return [c], [c]
        if r < 0.77:
            return (["write -z -u %d %d" % (off, n)],
                    ["write -z %d %d" % (off, n)])
        if r < 0.93:
            return ["discard %d %d" % (off, n)], self.discard_ref(off, n)
        return ["flush"], []

    def aio_batch(self):
        """Non-overlapping concurrent writes, often inside one cluster."""
        count = self.rng.randint(2, 8)
        cs = self.cs
        if self.rng.random() < 0.5:
            # Pack the batch into a small window so requests share clusters.
            win = min(self.size, max(2 * cs, 4096))
            wstart = self.offset(win)
        else:
            win, wstart = self.size, 0
        ranges = []
        for _ in range(count * 4):
            if len(ranges) == count:
                break
            n = self.rng.randint(1, max(1, min(win // 2, self.max_len)))
            off = wstart + self.rng.randrange(max(1, win - n + 1))
            if off + n > self.size:
                continue
            if any(off < e and s < off + n for s, e, _ in ranges):
                continue
            # A write-zeroes sharing a cluster with another request of the
            # batch corrupts the image in QEMU 7.2 itself (refcount=1
            # reference=2: write -P 157 23265279 188928; write -z 23200256
            # 244582; aio_write -P 111 23313067 15049; aio_write -z -u
            # 23284165 919 on 64k clusters), so the oracle is only trusted
            # for zeroes on clusters of their own.
            zero = self.rng.random() < 0.2
            c0, c1 = off // cs, (off + n - 1) // cs
            if any(c0 <= (e - 1) // cs and s // cs <= c1 and (zero or z)
                   for s, e, z in ranges):
                continue
            ranges.append((off, off + n, zero))
        img, ref = [], []
        for s, e, zero in ranges:
            if not zero:
                p = self.pattern()
                img.append("aio_write -P %d %d %d" % (p, s, e - s))
                ref.append("write -P %d %d %d" % (p, s, e - s))
            else:
                u = "-u " if self.rng.random() < 0.5 else ""
                img.append("aio_write -z %s%d %d" % (u, s, e - s))
                ref.append("write -z %d %d" % (s, e - s))
        img.append("aio_flush")
        return img, ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--size", type=parse_size, required=True)
    ap.add_argument("--cluster-size", type=parse_size, required=True)
    ap.add_argument("--compat", choices=["0.10", "1.1"], default="1.1")
    ap.add_argument("--ops", type=int, default=300, help="ops per segment")
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--max-len", type=parse_size, default=0,
                    help="cap on one request's length")
    ap.add_argument("--spread", action="store_true",
                    help="no hot clusters: spread writes over the image")
    ap.add_argument("outdir")
    args = ap.parse_args()
    if args.size % args.cluster_size or args.size < 4 * args.cluster_size:
        sys.exit("gen-ops: size must be a multiple of the cluster size "
                 "and at least 4 clusters")
    g = Gen(args)
    for seg in range(args.segments):
        img, ref = [], []
        for _ in range(args.ops):
            if g.rng.random() < 0.1:
                i, r = g.aio_batch()
            else:
                i, r = g.one()
            img += i
            ref += r
        img.append("flush")
        for name, lines in (("img", img), ("ref", ref)):
            path = os.path.join(args.outdir, "%s.%d.io" % (name, seg))
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
