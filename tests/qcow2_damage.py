# SPDX-License-Identifier: MIT
"""Damage qcow2 images that QEMU wrote, one kind of damage at a time.

Used by tests/check-corpus.py (the `qublk check` oracle test).  Img reads
the structures QEMU laid out (header, L1, L2, refcount table and blocks,
snapshot table) through the spec's definitions (qcow2.rst) and pokes
them.  Every damage function takes an Img and returns the guest byte
range whose data the damage may legitimately change (None when no guest
data is at stake); it raises Skip when the base image lacks what the
damage needs (no snapshot with 1-bit refcounts, no unaligned offset at
512-byte clusters).
"""
import os
import struct

L1E_OFFSET = 0x00fffffffffffe00
L2E_OFFSET = 0x00fffffffffffe00
REFT_OFFSET = 0xfffffffffffffe00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1


class Skip(Exception):
    pass


class Img:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "r+b")
        h = self.read(0, 112)
        (self.magic, self.version, self.backing_off, self.backing_size,
         self.cluster_bits, self.size, self.crypt, self.l1_size, self.l1_off,
         self.rt_off, self.rt_clusters, self.nb_snap,
         self.snap_off) = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
        self.rc_order = 4
        if self.version >= 3:
            self.rc_order = struct.unpack(">I", h[96:100])[0]
        self.cs = 1 << self.cluster_bits
        self.rc_bits = 1 << self.rc_order
        self.rb_entries = self.cs * 8 // self.rc_bits
        self.l2_entries = self.cs // 8

    def close(self):
        self.f.close()

    # ---- raw access ----
    def read(self, off, n):
        self.f.seek(off)
        b = self.f.read(n)
        return b + bytes(n - len(b))

    def write(self, off, data):
        self.f.seek(off)
        self.f.write(data)

    def be64(self, off):
        return struct.unpack(">Q", self.read(off, 8))[0]

    def put64(self, off, v):
        self.write(off, struct.pack(">Q", v & (2**64 - 1)))

    def put32(self, off, v):
        self.write(off, struct.pack(">I", v & (2**32 - 1)))

    def file_size(self):
        return os.fstat(self.f.fileno()).st_size

    # ---- L1 / L2 ----
    def l1e_addr(self, i, l1_off=None):
        return (self.l1_off if l1_off is None else l1_off) + 8 * i

    def l1e(self, i, l1_off=None):
        return self.be64(self.l1e_addr(i, l1_off))

    def l2e_addr(self, guest, l1_off=None):
        i = guest // (self.cs * self.l2_entries)
        l2 = self.l1e(i, l1_off) & L1E_OFFSET
        if not l2:
            raise Skip("guest offset %#x has no L2 table" % guest)
        return l2 + 8 * ((guest // self.cs) % self.l2_entries)

    def l2e(self, guest, l1_off=None):
        return self.be64(self.l2e_addr(guest, l1_off))

    def l2_tables(self):
        return [(i, self.l1e(i) & L1E_OFFSET) for i in range(self.l1_size)
                if self.l1e(i) & L1E_OFFSET]

    # ---- refcounts ----
    def rt_entry_addr(self, idx):
        return self.rt_off + 8 * idx

    def refblock(self, cluster):
        return self.be64(self.rt_entry_addr(cluster // self.rb_entries)) & REFT_OFFSET

    def _rc_loc(self, cluster):
        rb = self.refblock(cluster)
        if not rb:
            raise Skip("cluster %d has no refcount block" % cluster)
        i = cluster % self.rb_entries
        if self.rc_bits >= 8:
            n = self.rc_bits // 8
            return rb + i * n, n, 0
        per = 8 // self.rc_bits
        return rb + i // per, 0, (i % per) * self.rc_bits

    def refcount(self, cluster):
        addr, n, sh = self._rc_loc(cluster)
        if n:
            return int.from_bytes(self.read(addr, n), "big")
        return (self.read(addr, 1)[0] >> sh) & ((1 << self.rc_bits) - 1)

    def set_refcount(self, cluster, v):
        addr, n, sh = self._rc_loc(cluster)
        v &= (1 << self.rc_bits) - 1
        if n:
            self.write(addr, v.to_bytes(n, "big"))
            return
        b = self.read(addr, 1)[0]
        mask = ((1 << self.rc_bits) - 1) << sh
        self.write(addr, bytes([(b & ~mask) | (v << sh)]))

    # ---- snapshots ----
    def snapshots(self):
        """[(entry offset, l1_offset, l1_size, extra_size, id_len, name_len)]"""
        out, off = [], self.snap_off
        for _ in range(self.nb_snap):
            l1o, l1s, idl, nl = struct.unpack(">QIHH", self.read(off, 16))
            extra = struct.unpack(">I", self.read(off + 36, 4))[0]
            out.append((off, l1o, l1s, extra, idl, nl))
            off += (40 + extra + idl + nl + 7) & ~7
        return out

    def cluster_of(self, off):
        return off // self.cs


# ---- landmarks of the base image (see check-corpus.py make_base) ----
# guest cluster 0: data (shared with the snapshot when there is one),
# guest cluster 1: data rewritten after the snapshot (COPIED, refcount 1),
# guest cluster 2: data, guest cluster 4: compressed, guest cluster 5:
# zero flag with its host cluster kept (v3), and data in a second L2 table
# at guest offset L2SPAN.

def g(img, n):
    return n * img.cs


def l2span(img):
    return img.cs * img.l2_entries


def data_host(img, guest):
    e = img.l2e(guest)
    if e & COMPRESSED or not e & L2E_OFFSET:
        raise Skip("guest %#x is not a plain data cluster" % guest)
    return e & L2E_OFFSET


def need_snapshot(img):
    if img.nb_snap == 0:
        raise Skip("no snapshot")
    return img.snapshots()[0]


def need_unaligned(img):
    if img.cs == 512:
        raise Skip("no unaligned offsets at 512-byte clusters")


def need_v3(img):
    if img.version < 3:
        raise Skip("v2")


def one_cluster(img, guest):
    return (guest, img.cs)


def snap_guest_clusters(img):
    return None


# ---- damage kinds ----

def rt_entry_zero(img):
    img.put64(img.rt_entry_addr(0), 0)


def rt_entry_reserved(img):
    a = img.rt_entry_addr(0)
    img.put64(a, img.be64(a) | 0x100)


def rt_entry_unaligned(img):
    need_unaligned(img)
    a = img.rt_entry_addr(0)
    img.put64(a, img.be64(a) + 512)


def rt_entry_past_eof(img):
    # A refcount table entry for a range with no refblock, far past EOF.
    idx = 1
    if img.rt_clusters * img.cs // 8 <= idx:
        raise Skip("refcount table too small")
    img.put64(img.rt_entry_addr(idx), (img.file_size() + 64 * img.cs) // img.cs * img.cs)


def rt_entry_on_l1(img):
    # Refcount block 1 pointing at the L1 table (overlap).
    img.put64(img.rt_entry_addr(1), img.l1_off)


def rb_data_zero(img):
    img.set_refcount(img.cluster_of(data_host(img, g(img, 2))), 0)


def rb_data_plus(img):
    c = img.cluster_of(data_host(img, g(img, 2)))
    img.set_refcount(c, img.refcount(c) + 1 if img.rc_bits > 1 else 1)
    if img.rc_bits == 1:
        raise Skip("1-bit refcount cannot grow")


def rb_l2_zero(img):
    img.set_refcount(img.cluster_of(img.l2_tables()[0][1]), 0)


def rb_l1_plus(img):
    if img.rc_bits == 1:
        raise Skip("1-bit refcount cannot grow")
    c = img.cluster_of(img.l1_off)
    img.set_refcount(c, img.refcount(c) + 1)


def rb_self_zero(img):
    rb = img.refblock(0)
    img.set_refcount(img.cluster_of(rb), 0)


def rb_reftable_zero(img):
    img.set_refcount(img.cluster_of(img.rt_off), 0)


def rb_header_zero(img):
    img.set_refcount(0, 0)


def leak_tail(img):
    # Three clusters past the last one, allocated in the refcounts only.
    end = (img.file_size() + img.cs - 1) // img.cs
    if end + 3 > img.rb_entries * (img.rt_clusters * img.cs // 8) or img.refblock(end + 2) == 0:
        raise Skip("tail not covered by a refcount block")
    for c in range(end, end + 3):
        img.set_refcount(c, 1)
    img.f.truncate((end + 3) * img.cs)


def leak_tail_no_extend(img):
    # Refcount 1 for clusters past EOF: QEMU only compares inside the file.
    end = (img.file_size() + img.cs - 1) // img.cs
    if img.refblock(end + 1) == 0:
        raise Skip("tail not covered by a refcount block")
    img.set_refcount(end + 1, 1)


def shared_rc_low(img):
    need_snapshot(img)
    c = img.cluster_of(data_host(img, g(img, 0)))
    img.set_refcount(c, 1)


def rb_data_two_copied(img):
    if img.rc_bits == 1:
        raise Skip("1-bit refcount cannot grow")
    c = img.cluster_of(data_host(img, g(img, 1)))
    img.set_refcount(c, 2)


def l1_reserved(img):
    a = img.l1e_addr(0)
    img.put64(a, img.be64(a) | 0x2)


def l1_unaligned(img):
    need_unaligned(img)
    a = img.l1e_addr(0)
    img.put64(a, img.be64(a) + 512)
    return (0, l2span(img))


def l1_past_eof(img):
    a = img.l1e_addr(0)
    e = img.be64(a)
    img.put64(a, (e & ~L1E_OFFSET) | ((img.file_size() + 16 * img.cs) // img.cs * img.cs))
    return (0, l2span(img))


def l1_copied_clear(img):
    a = img.l1e_addr(0)
    img.put64(a, img.be64(a) & ~COPIED)


def l1_copied_set_shared(img):
    need_snapshot(img)
    a = img.l1e_addr(l2_second_index(img))
    e = img.be64(a)
    if e & COPIED:
        raise Skip("L1 entry is not shared")
    img.put64(a, e | COPIED)


def l2_second_index(img):
    t = img.l2_tables()
    if len(t) < 2:
        raise Skip("one L2 table")
    return t[1][0]


def l1_dup(img):
    i = l2_second_index(img)
    img.put64(img.l1e_addr(i), img.l1e(0))
    return (i * l2span(img), l2span(img))


def l1_on_refblock(img):
    i = l2_second_index(img)
    img.put64(img.l1e_addr(i), COPIED | img.refblock(0))
    return (i * l2span(img), l2span(img))


def l1_on_header(img):
    # Offset 0 means "unallocated": point at cluster 1 of the header area
    # instead, i.e. whatever QEMU put right after cluster 0 (the refcount
    # table in images qemu-img created).
    i = l2_second_index(img)
    img.put64(img.l1e_addr(i), COPIED | img.rt_off)
    return (i * l2span(img), l2span(img))


def l1_zero(img):
    i = l2_second_index(img)
    img.put64(img.l1e_addr(i), 0)
    return (i * l2span(img), l2span(img))


def l2_reserved(img):
    a = img.l2e_addr(g(img, 2))
    img.put64(a, img.be64(a) | 0x2)


def l2_unaligned(img):
    need_unaligned(img)
    a = img.l2e_addr(g(img, 2))
    img.put64(a, img.be64(a) + 512)
    return one_cluster(img, g(img, 2))


def l2_past_eof(img):
    a = img.l2e_addr(g(img, 2))
    e = img.be64(a)
    img.put64(a, (e & ~L2E_OFFSET) | ((img.file_size() + 8 * img.cs) // img.cs * img.cs))
    return one_cluster(img, g(img, 2))


def l2_straddles_eof(img):
    # Data cluster whose first byte is the last cluster of the file +1
    # sector: inside the file but the cluster extends past EOF.
    a = img.l2e_addr(g(img, 2))
    e = img.be64(a)
    end = img.file_size() // img.cs * img.cs
    img.put64(a, (e & ~L2E_OFFSET) | end)
    return one_cluster(img, g(img, 2))


def l2_copied_clear(img):
    a = img.l2e_addr(g(img, 1))
    img.put64(a, img.be64(a) & ~COPIED)


def l2_copied_set_shared(img):
    need_snapshot(img)
    a = img.l2e_addr(g(img, 0))
    img.put64(a, img.be64(a) | COPIED)


def l2_dup(img):
    a = img.l2e_addr(g(img, 3))
    img.put64(a, img.l2e(g(img, 2)))
    return one_cluster(img, g(img, 3))


def l2_dup_other_table(img):
    i = l2_second_index(img)
    a = img.l2e_addr(i * l2span(img))
    img.put64(a, img.l2e(g(img, 2)))
    return one_cluster(img, i * l2span(img))


def l2_on_l1(img):
    a = img.l2e_addr(g(img, 2))
    img.put64(a, COPIED | img.l1_off)
    return one_cluster(img, g(img, 2))


def l2_on_l2(img):
    a = img.l2e_addr(g(img, 2))
    img.put64(a, COPIED | img.l2_tables()[0][1])
    return one_cluster(img, g(img, 2))


def l2_on_refblock(img):
    a = img.l2e_addr(g(img, 2))
    img.put64(a, COPIED | img.refblock(0))
    return one_cluster(img, g(img, 2))


def l2_on_reftable(img):
    a = img.l2e_addr(g(img, 2))
    img.put64(a, COPIED | img.rt_off)
    return one_cluster(img, g(img, 2))


def l2_zero_alloc_unaligned(img):
    need_v3(img)
    need_unaligned(img)
    a = img.l2e_addr(g(img, 5))
    e = img.be64(a)
    if not e & ZERO or not e & L2E_OFFSET:
        raise Skip("cluster 5 is not a preallocated zero cluster")
    img.put64(a, e + 512)


def l2_zero_unaligned_plain(img):
    # A zero-flagged entry whose offset is unaligned and would be data.
    need_unaligned(img)
    a = img.l2e_addr(g(img, 2))
    img.put64(a, (img.be64(a) + 512) & ~ZERO)
    return one_cluster(img, g(img, 2))


def l2_zero(img):
    a = img.l2e_addr(g(img, 2))
    img.put64(a, 0)
    return one_cluster(img, g(img, 2))


def l2_table_zero(img):
    l2 = img.l2_tables()[l2_index(img)][1]
    img.write(l2, bytes(img.cs))
    return (img.l2_tables()[0][0] * l2span(img), l2span(img)) if False else \
        (l2_second_index(img) * l2span(img), l2span(img))


def l2_index(img):
    l2_second_index(img)
    return 1


def l2_table_garbage(img):
    # Random bytes over the second L2 table (deterministic).
    i = l2_second_index(img)
    l2 = img.l1e(i) & L1E_OFFSET
    x, buf = 0x9E3779B97F4A7C15, bytearray()
    for _ in range(img.cs // 8):
        x ^= (x << 13) & (2**64 - 1)
        x ^= x >> 7
        x ^= (x << 17) & (2**64 - 1)
        buf += struct.pack(">Q", x)
    img.write(l2, bytes(buf))
    return (i * l2span(img), l2span(img))


def compressed_copied(img):
    a = img.l2e_addr(g(img, 4))
    e = img.be64(a)
    if not e & COMPRESSED:
        raise Skip("no compressed cluster")
    img.put64(a, e | COPIED)


def compressed_past_eof(img):
    a = img.l2e_addr(g(img, 4))
    e = img.be64(a)
    if not e & COMPRESSED:
        raise Skip("no compressed cluster")
    shift = 62 - (img.cluster_bits - 8)
    off_mask = (1 << shift) - 1
    img.put64(a, (e & ~off_mask) | (img.file_size() + 4 * img.cs))
    return one_cluster(img, g(img, 4))


def compressed_huge(img):
    # Largest sector count: the compressed range runs past EOF.
    a = img.l2e_addr(g(img, 4))
    e = img.be64(a)
    if not e & COMPRESSED:
        raise Skip("no compressed cluster")
    shift = 62 - (img.cluster_bits - 8)
    csize_mask = (1 << (img.cluster_bits - 8)) - 1
    img.put64(a, e | (csize_mask << shift))
    return one_cluster(img, g(img, 4))


def compressed_on_l1(img):
    a = img.l2e_addr(g(img, 4))
    e = img.be64(a)
    if not e & COMPRESSED:
        raise Skip("no compressed cluster")
    shift = 62 - (img.cluster_bits - 8)
    off_mask = (1 << shift) - 1
    img.put64(a, (e & ~off_mask & ~(((1 << (img.cluster_bits - 8)) - 1) << shift)) | img.l1_off)
    return one_cluster(img, g(img, 4))


def snap_l1_unaligned(img):
    need_unaligned(img)
    off = need_snapshot(img)[0]
    img.put64(off, img.be64(off) + 512)


def snap_l1_too_big(img):
    off = need_snapshot(img)[0]
    img.put32(off + 8, 0x400000 + 1)


def snap_l1_past_eof(img):
    off = need_snapshot(img)[0]
    img.put64(off, (img.file_size() + 32 * img.cs) // img.cs * img.cs)


def snap_l1_entry_bad(img):
    s = need_snapshot(img)
    a = img.l1e_addr(0, s[1])
    img.put64(a, img.be64(a) + 512 if img.cs > 512 else img.file_size() * 4)


def snap_l1_entry_zero(img):
    s = need_snapshot(img)
    img.put64(img.l1e_addr(0, s[1]), 0)


def snap_no_extra(img):
    need_v3(img)
    s = need_snapshot(img)
    img.put32(s[0] + 36, 0)
    # Move id and name up over the extra data.
    names = img.read(s[0] + 40 + s[3], s[4] + s[5])
    img.write(s[0] + 40, names + bytes(s[3]))


def snap_l2_data_copied(img):
    # A data entry of the snapshot's L2 table flagged COPIED (shared cluster).
    s = need_snapshot(img)
    l2 = img.l1e(0, s[1]) & L1E_OFFSET
    a = l2 + 8 * 0
    img.put64(a, img.be64(a) | COPIED)


def hdr_corrupt_bit(img):
    need_v3(img)
    img.put64(72, img.be64(72) | 2)


def hdr_corrupt_bit_and_leak(img):
    hdr_corrupt_bit(img)
    rb_data_plus(img)


def hdr_dirty_leak(img):
    need_v3(img)
    img.put64(72, img.be64(72) | 1)
    img.put64(80, img.be64(80) | 1)
    return l1_zero(img)


def hdr_l1_past_eof(img):
    img.put64(40, (img.file_size() + 8 * img.cs) // img.cs * img.cs)
    return (0, img.size)


def hdr_reftable_past_eof(img):
    img.put64(48, (img.file_size() + 8 * img.cs) // img.cs * img.cs)


def hdr_bad_magic(img):
    img.put32(0, 0x12345678)


def hdr_reftable_clusters_zero(img):
    img.put32(56, 0)


def hdr_l1_size_small(img):
    img.put32(36, 0)


def hdr_cluster_bits(img):
    img.put32(20, 40)


def two_damages(img):
    rb_data_zero(img)
    l2_copied_clear(img)


def many_leaks(img):
    # Every other data cluster of the first L2 table dropped from L2.
    for n in (0, 2, 3):
        img.put64(img.l2e_addr(g(img, n)), 0)
    return (0, 4 * img.cs)


KINDS = {k: v for k, v in globals().items()
         if callable(v) and v.__module__ == __name__ and k.split("_")[0] in
         ("rt", "rb", "leak", "shared", "l1", "l2", "compressed", "snap", "hdr", "two", "many")
         and k not in ("l2_second_index", "l2_index", "l2span")}
