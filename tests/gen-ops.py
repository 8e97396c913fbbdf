#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Random operation generator for the differential NBD tests.

Given a seed and an image geometry, writes qemu-io scripts into OUTDIR, for
segments N = 0 .. SEGMENTS-1:
  img.N.io    run against the qcow2 image served over NBD;
  ref.N.io    the same operations, one at a time, on a plain raw file;
  model.N.io  `read -P` of every run of the expected content after segment
              N, run against the reference: the generator's own model
              must agree with what qemu-io made of the raw file.
With --init, also init.io: pattern writes that give the image its starting
content (the test writes them to a backing file or to the raw source of a
compressed image, and to the reference); otherwise the image starts as
zeros, or with --no-reads as anything (the scripts then read nothing).  After every segment the export
and the reference must read back identical.  Same seed, same arguments ->
byte-identical scripts, so a failure replays with QUBLK_SEED.

The reference encodes what QEMU's own qcow2 driver does (checked against
qemu-nbd --discard=unmap serving a qcow2 image, which is the oracle):
  - write -P / write -z / write -z -u change exactly the bytes in the range;
  - discard (NBD TRIM) only acts on the whole clusters inside the range: they
    read as zeros afterwards (v3: zero flag; v2 with no backing file:
    unallocated; v2 with a backing file: QEMU refuses, nothing changes).
    Partial clusters at either end are left untouched, so the reference
    gets `write -z` of the cluster-aligned inner part only.  The image size
    is a multiple of the cluster size, so QEMU's special case for a partial
    last cluster never applies.

Concurrency.  Requests on disjoint byte ranges commute: whatever order a
server runs them in, the result is defined, so it can be checked.  Only
overlapping concurrent requests are undefined.  A batch is therefore a set
of requests of every kind -- aio_write -P (some with FUA), aio_write -z
with and without -u, discard, flush, and aio_read -P of ranges whose
expected content is a single byte value -- on disjoint byte ranges cut out
of a window of one to a few clusters, so that they share clusters:
sub-cluster neighbours, a write-zeroes next to a write in one cluster, a
discard of whole clusters next to a partial write.  They are issued in a
random order (discard and flush are synchronous in qemu-io, so they run
while the aio requests issued before them are in flight), then aio_flush,
then `read -P` of every run in the window checks the outcome at once.  The
reference applies the same writes, zeroes and discards one at a time.

QEMU 7.2 itself fails one of these shapes: served by qemu-nbd, a
write-zeroes that shares a cluster with a concurrent write loses data or
corrupts the image (qemu-img check: `refcount=1 reference=2`,
`refcount=0 reference=1`).  --zeroes-apart drops those write-zeroes; it
is only for checking the tests against qemu-nbd, qublk gets every shape.

Python 3 standard library only.
"""

import argparse
import bisect
import os
import random
import sys


def parse_size(s):
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("b").rstrip("i")
    num = s.rstrip("kmg")
    return int(num) * units[s[len(num):]]


class Content:
    """The expected content of the image as runs of one byte value.

    Run i covers [starts[i], starts[i+1]) (the last one runs to size) and
    holds vals[i]; neighbouring runs always differ."""

    def __init__(self, size):
        self.size = size
        self.starts = [0]
        self.vals = [0]

    def _split(self, x):
        """Make a run start at x; returns its index (len at the end)."""
        if x == self.size:
            return len(self.starts)
        i = bisect.bisect_right(self.starts, x) - 1
        if self.starts[i] != x:
            i += 1
            self.starts.insert(i, x)
            self.vals.insert(i, self.vals[i - 1])
        return i

    def set(self, off, n, val):
        i = self._split(off)
        j = self._split(off + n)
        self.starts[i:j] = [off]
        self.vals[i:j] = [val]
        if i + 1 < len(self.starts) and self.vals[i + 1] == val:
            del self.starts[i + 1], self.vals[i + 1]
        if i > 0 and self.vals[i - 1] == val:
            del self.starts[i], self.vals[i]

    def runs(self, off, n):
        """(start, length, value) of the runs covering [off, off+n),
        clipped to it."""
        out = []
        i = bisect.bisect_right(self.starts, off) - 1
        end = off + n
        while i < len(self.starts) and self.starts[i] < end:
            nxt = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            s, e = max(off, self.starts[i]), min(end, nxt)
            out.append((s, e - s, self.vals[i]))
            i += 1
        return out


class Gen:
    def __init__(self, args):
        self.rng = random.Random(args.seed)
        self.size = args.size
        self.cs = args.cluster_size
        # v2 with a backing file: QEMU refuses discards.
        self.discard_noop = args.compat == "0.10" and args.backing
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
        self.content = Content(self.size)
        self.zeroes_apart = args.zeroes_apart
        self.reads = not args.no_reads

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
        """The whole clusters inside an NBD TRIM's range, which read as
        zeros afterwards: (start, length) or None."""
        cs = self.cs
        start = -(-off // cs) * cs
        end = (off + length) // cs * cs
        if end > start and not self.discard_noop:
            return start, end - start
        return None

    def op(self, kind, off, n, aio):
        """One request of @kind on [off, off+n): updates the model and
        returns (image commands, reference commands).  Reads verify the
        model's value; the caller picks a range holding only one."""
        a = "aio_" if aio else ""
        if kind == "write":
            p = self.pattern()
            fua = "-f " if aio and self.rng.random() < 0.1 else ""
            self.content.set(off, n, p)
            c = "write -P %d %d %d" % (p, off, n)
            return ["%swrite -q %s-P %d %d %d" % (a, fua, p, off, n)], [c]
        if kind in ("zero", "zero-unmap"):
            self.content.set(off, n, 0)
            u = "-u " if kind == "zero-unmap" else ""
            return (["%swrite -q -z %s%d %d" % (a, u, off, n)],
                    ["write -z %d %d" % (off, n)])
        if kind == "discard":
            # qemu-io has no aio_discard: this one is synchronous.
            d = self.discard_ref(off, n)
            if d is None:
                return ["discard -q %d %d" % (off, n)], []
            self.content.set(d[0], d[1], 0)
            return (["discard -q %d %d" % (off, n)],
                    ["write -z %d %d" % d])
        if kind == "read":
            (s, m, v), = self.content.runs(off, n)
            return ["%sread -q -P %d %d %d" % (a, v, s, m)], []
        assert kind == "flush"
        return ["flush"], []

    def one_run(self, off, n):
        """The part of [off, off+n) in the run holding byte off."""
        return self.content.runs(off, n)[0][:2]

    def one(self):
        """One synchronous op: (image commands, reference commands)."""
        r = self.rng.random()
        n = self.length()
        off = self.offset(n)
        if r < 0.5:
            return self.op("write", off, n, False)
        if r < 0.6:
            return self.op("zero", off, n, False)
        if r < 0.7:
            return self.op("zero-unmap", off, n, False)
        if r < 0.85:
            return self.op("discard", off, n, False)
        if r < 0.95 and self.reads:
            return self.op("read", *self.one_run(off, n), False)
        return self.op("flush", 0, 0, False)

    def window(self):
        """A window for a batch, (start, length): one cluster (or a part
        of it), a few clusters, or a wider range of at most 4 MiB (bytes
        moved are what the test's time goes on)."""
        cs, rng = self.cs, self.rng
        r = rng.random()
        if r < 0.45:
            ncl = 1
        elif r < 0.85 or self.spread:
            ncl = rng.randint(2, 3)
        else:
            ncl = rng.randint(4, 16)
        # At least 4 KiB: 512 B clusters get multi-cluster windows.
        ncl = max(ncl, 4096 // cs)
        ncl = min(ncl, max(2, (4 << 20) // cs), self.size // cs)
        if rng.random() < 0.5 and not self.spread:
            c = rng.choice(self.hot)
        else:
            c = rng.randrange(self.size // cs)
        c = min(c, self.size // cs - ncl)
        start, length = c * cs, ncl * cs
        if ncl == 1 and rng.random() < (0.6 if cs > 256 << 10 else 0.3):
            # A part of one big cluster, so that pieces stay small.
            length = rng.randint(1, min(cs, 256 << 10) // 512) * 512
            start += rng.randrange(cs // 512 - length // 512 + 1) * 512
        return start, length

    def batch(self):
        """Concurrent requests on disjoint ranges that share clusters."""
        cs, rng = self.cs, self.rng
        wstart, wlen = self.window()
        wend = wstart + wlen
        cuts = set()
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.3:
                cuts.add(wstart + rng.randrange(0, wlen + 1, min(cs, wlen)))
            elif r < 0.7:
                cuts.add(wstart + rng.randrange(0, wlen + 1, 512))
            else:
                cuts.add(wstart + rng.randrange(wlen + 1))
        forced = {}
        if wlen >= 2 * cs and rng.random() < 0.4:
            # A discard of whole clusters that starts inside a cluster
            # shared with a write, and may end inside another one.
            c = wstart + rng.randrange(wlen // cs - 1) * cs
            x = c + rng.randrange(0, cs, 512)
            y = c + 2 * cs + rng.randrange(0, wend - c - 2 * cs + 1, 512)
            cuts = {p for p in cuts if not x < p < y} | {x, y}
            forced = {x: "discard", y: "write"}
            if x > wstart:
                forced[max(p for p in cuts | {wstart} if p < x)] = "write"
        points = sorted(cuts | {wstart, wend})
        # Discards mostly get pieces that hold whole clusters (which
        # become zero), sometimes pieces that do not (which must not
        # change at all).
        whole = ["write"] * 5 + ["zero"] * 3 + ["zero-unmap"] * 2 + \
            ["discard"] * 6 + ["read"] * 3 + ["skip"]
        part = ["write"] * 7 + ["zero"] * 3 + ["zero-unmap"] * 2 + \
            ["discard"] + ["read"] * 4 + ["skip"]
        # Choose every request against the content before the batch
        # (disjoint ranges: the order of the model updates is irrelevant).
        chosen = []
        for s, e in zip(points, points[1:]):
            kind = forced.get(s) or rng.choice(
                whole if self.discard_ref(s, e - s) else part)
            if kind == "read" and not self.reads:
                kind = "skip"
            if kind == "read":
                s, n = self.one_run(s, e - s)
                e = s + n
            if kind != "skip":
                chosen.append((kind, s, e - s))
        if self.zeroes_apart:
            chosen = self.apart(chosen)
        if rng.random() < 0.3:
            chosen.append(("flush", 0, 0))
        rng.shuffle(chosen)
        img, ref = [], []
        for kind, s, n in chosen:
            i, r = self.op(kind, s, n, True)
            img += i
            ref += r
        img.append("aio_flush")
        if self.reads:
            for s, n, v in self.content.runs(wstart, wlen):
                img.append("read -q -P %d %d %d" % (v, s, n))
        return img, ref

    def apart(self, chosen):
        """Drops the write-zeroes that share a cluster with a write."""
        cs = self.cs
        written = set()
        for kind, s, n in chosen:
            if kind == "write":
                written.update(range(s // cs, (s + n - 1) // cs + 1))
        return [(kind, s, n) for kind, s, n in chosen
                if kind not in ("zero", "zero-unmap")
                or written.isdisjoint(range(s // cs, (s + n - 1) // cs + 1))]

    def init(self):
        """Starting content: pattern runs over most of the image, some
        ending inside clusters, with zero gaps.  Returns qemu-io commands."""
        cs, rng = self.cs, self.rng
        lines, off = [], 0
        while off < self.size:
            n = rng.randint(1, 2 * cs)
            if rng.random() < 0.5:
                n = -(-n // 512) * 512
            n = min(n, self.size - off)
            if rng.random() < 0.7:
                p = self.pattern()
                self.content.set(off, n, p)
                lines.append("write -q -P %d %d %d" % (p, off, n))
            off += n
        return lines

    def model_check(self):
        return ["read -q -P %d %d %d" % (v, s, n)
                for s, n, v in self.content.runs(0, self.size)]


def write_script(outdir, name, lines):
    with open(os.path.join(outdir, name), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--size", type=parse_size, required=True)
    ap.add_argument("--cluster-size", type=parse_size, required=True)
    ap.add_argument("--compat", choices=["0.10", "1.1"], default="1.1")
    ap.add_argument("--backing", action="store_true",
                    help="the image has a backing file (v2: no discard)")
    ap.add_argument("--init", action="store_true",
                    help="write init.io: the image's starting content")
    ap.add_argument("--ops", type=int, default=300,
                    help="steps (single ops or batches) per segment")
    ap.add_argument("--batch-ratio", type=float, default=0.1,
                    help="fraction of steps that are concurrent batches")
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--max-len", type=parse_size, default=0,
                    help="cap on one request's length")
    ap.add_argument("--spread", action="store_true",
                    help="no hot clusters: spread writes over the image")
    ap.add_argument("--no-reads", action="store_true",
                    help="no reads: the image starts with content the "
                    "generator does not know")
    ap.add_argument("--zeroes-apart", action="store_true",
                    help="no write-zeroes shares a cluster with a write of "
                    "its batch (QEMU 7.2 gets that wrong)")
    ap.add_argument("outdir")
    args = ap.parse_args()
    if args.size % args.cluster_size or args.size < 4 * args.cluster_size:
        sys.exit("gen-ops: size must be a multiple of the cluster size "
                 "and at least 4 clusters")
    if args.cluster_size % 512:
        sys.exit("gen-ops: the cluster size must be a multiple of 512")
    g = Gen(args)
    if args.init:
        write_script(args.outdir, "init.io", g.init())
    for seg in range(args.segments):
        img, ref = [], []
        for _ in range(args.ops):
            if g.rng.random() < args.batch_ratio:
                i, r = g.batch()
            else:
                i, r = g.one()
            img += i
            ref += r
        img.append("flush")
        write_script(args.outdir, "img.%d.io" % seg, img)
        write_script(args.outdir, "ref.%d.io" % seg, ref)
        write_script(args.outdir, "model.%d.io" % seg, g.model_check())


if __name__ == "__main__":
    main()
