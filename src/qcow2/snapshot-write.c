/* SPDX-License-Identifier: MIT */
/*
 * Internal snapshots: create, apply (revert to) and delete, with QEMU's
 * semantics (qcow2.rst "Snapshots"; block/qcow2-snapshot.c is the
 * reference behaviour), for `qublk snapshot` and for the driver of a
 * live image (snapshot-live.c): one implementation for both.
 *
 * Works on an image file through the io layer, like check.c, not through
 * the driver: nobody else may use the image meanwhile.  Offline, the
 * caller holds QEMU's write lock.  Live (QCOW2_SNAPSHOT_LIVE), the driver
 * that has the image open has stopped its requests, written everything
 * it held back and marked the image clean, and reloads what changed when
 * this returns; until then the file is ours.  The calls are the io
 * layer's: blocking outside a coroutine (one thread), yielding inside
 * one (the driver's).
 *
 * Refcounts are kept here: the refcount table, and every refcount block
 * touched, are loaded into memory; changes are made there and written
 * at the points below.  A data, L2 or compressed cluster's refcount is
 * the number of L1 tables (active and snapshots) through which it is
 * reached, as QEMU and qemu-img check count: a snapshot adds one to every
 * L2 table and data cluster the copied L1 table reaches.
 *
 * Crash ordering: every step is synced before the next one depends on it,
 * and decrements are written only after the references they drop are gone
 * from the disk.  A power cut therefore leaves leaked clusters, and one
 * more thing that no ordering can avoid: the OFLAG_COPIED flag of an
 * active L1/L2 entry and the refcount it reflects live in different
 * clusters, so while one is on disk and the other is not, the image has
 * entries with refcount 1 and no OFLAG_COPIED.  Only that direction is
 * ever exposed (a flag is cleared before the refcount rises and set after
 * it fell): such an entry only makes the next write copy the cluster, and
 * qemu-img check -r all (or qublk check -r all) sets the flag.  A flag
 * set on a shared cluster, which would let a write change a snapshot, is
 * never on disk.
 *
 *  create  1. the snapshot's L1 table (a copy of the active one, OFLAG_COPIED
 *             cleared) and the new snapshot table go to newly allocated
 *             clusters; refcount blocks written; sync
 *          2. OFLAG_COPIED cleared in the active L2 tables and L1; sync
 *          3. +1 for every L2 table and data cluster the active L1 reaches;
 *             refcount blocks written; sync
 *          4. the header switched to the new table (one sector); sync
 *          5. the old table freed; sync
 *  apply   1. OFLAG_COPIED cleared in the snapshot's L2 tables, +1 for its
 *             tree, a larger active L1 allocated if needed; written; sync
 *          2. the active L1 overwritten with the snapshot's (or the larger
 *             one written and the header switched, virtual size included);
 *             sync; the virtual size updated if it differs; sync
 *          3. -1 for the old active tree (and the old L1 if replaced); sync
 *          4. OFLAG_COPIED set where the active refcounts are now 1; sync
 *  delete  1. the new snapshot table (without the entry) to new clusters;
 *             sync; 2. header switched; sync; 3. -1 for the snapshot's tree,
 *             its L1 and the old table; sync; 4. OFLAG_COPIED as in apply
 *
 * Before anything is written, every tree involved is walked once with the
 * refcount changes applied in memory and dropped again: bad entries, a
 * refcount that would overflow the image's width or fall below zero stop
 * the operation with the image untouched.
 *
 * The refcount table grows as QEMU's does (rule 5 of the driver): the new
 * table and the refcount blocks that describe it are written past the
 * end of everything, synced, the header switched, the old table freed.
 */
#include <stddef.h>

#include "qcow2/format.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "common/io.h"
#include "common/util.h"

#define SNAP_EXTRA_LEN 24       /* vm_state_size_large, disk_size, icount */
#define MAX_SNAPSHOT_TABLE (1024ull * QCOW2_MAX_SNAPSHOTS)

struct refblock {
	uint8_t *buf;
	bool dirty;
	bool fresh;             /* new: its reftable entry is not on disk yet */
};

struct sw {
	struct io_file *f;
	struct qcow2_meta m;
	struct qcow2_snapshot *snaps;
	uint32_t nsnaps;
	uint64_t table_bytes;
	char *err;
	size_t errlen;

	uint32_t cb, cs, l2_entries;
	unsigned order;
	uint64_t rc_max;
	uint32_t rb_bits;       /* log2 refcount entries per block */
	uint32_t csize_shift;
	uint64_t csize_mask, coffset_mask;
	uint64_t file_size;

	uint64_t *rt;           /* refcount table, host order */
	uint32_t rt_size;       /* entries */
	struct refblock *rb;    /* per reftable entry */
	uint64_t hint;          /* allocation scan start (cluster) */
	uint64_t end;           /* clusters: past the file and every allocation */

	uint64_t *l1;           /* active L1, host order */
	uint8_t *l2;            /* one L2 table (cluster) */
};

static int fail(struct sw *w, int ret, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(struct sw *w, int ret, const char *fmt, ...)
{
	va_list ap;

	if (w->err && w->errlen && !w->err[0]) {
		va_start(ap, fmt);
		vsnprintf(w->err, w->errlen, fmt, ap);
		va_end(ap);
	}
	return ret;
}

static int io_fail(struct sw *w, int ret, const char *what)
{
	return fail(w, ret, "%s: %s", what, strerror(-ret));
}

static uint64_t cluster_of(const struct sw *w, uint64_t off)
{
	return off >> w->cb;
}

/* ---- refcounts ---------------------------------------------------------- */

static void rb_drop_all(struct sw *w)
{
	for (uint32_t i = 0; w->rb && i < w->rt_size; i++) {
		io_free(w->rb[i].buf);
		w->rb[i] = (struct refblock){ 0 };
	}
}

/* The refcount block of reftable entry @b, loaded; NULL in *out if it
 * does not exist. */
static int rb_get(struct sw *w, uint64_t b, struct refblock **out)
{
	*out = NULL;
	if (b >= w->rt_size)
		return 0;
	struct refblock *r = &w->rb[b];
	if (r->buf) {
		*out = r;
		return 0;
	}
	uint64_t off = w->rt[b] & QCOW2_REFT_OFFSET_MASK;
	if (!off)
		return 0;
	if ((w->rt[b] & QCOW2_REFT_RESERVED_MASK) || !IS_ALIGNED(off, w->cs) ||
	    off + w->cs > ALIGN_UP(w->file_size, (uint64_t)w->cs))
		return fail(w, -EIO, "refcount block %llu at 0x%llx is invalid; run 'qublk check'",
			    (unsigned long long)b, (unsigned long long)w->rt[b]);
	r->buf = io_alloc(w->cs);
	if (!r->buf)
		return fail(w, -ENOMEM, "out of memory");
	int ret = io_pread(w->f, r->buf, w->cs, off);
	if (ret) {
		io_free(r->buf);
		r->buf = NULL;
		return io_fail(w, ret, "reading a refcount block");
	}
	*out = r;
	return 0;
}

static int rc_get(struct sw *w, uint64_t k, uint64_t *v)
{
	struct refblock *r;
	int ret = rb_get(w, k >> w->rb_bits, &r);

	*v = 0;
	if (ret)
		return ret;
	if (r)
		*v = qcow2_rc_get(r->buf, k & ((1ull << w->rb_bits) - 1), w->order);
	return 0;
}

/* Add @delta (+1 or -1) to the refcount of cluster @k, which must be
 * described by an existing refcount block. */
static int rc_add(struct sw *w, uint64_t k, int delta)
{
	struct refblock *r;
	int ret = rb_get(w, k >> w->rb_bits, &r);

	if (ret)
		return ret;
	if (!r)
		return fail(w, -EIO, "cluster 0x%llx is referenced but has no refcount block; run "
			    "'qublk check'", (unsigned long long)(k << w->cb));
	uint64_t i = k & ((1ull << w->rb_bits) - 1);
	uint64_t v = qcow2_rc_get(r->buf, i, w->order);
	if (delta > 0 && v >= w->rc_max)
		return fail(w, -ERANGE, "the refcount of cluster 0x%llx would exceed %llu (refcount_bits "
			    "%u); too many snapshots for this image",
			    (unsigned long long)(k << w->cb), (unsigned long long)w->rc_max,
			    1u << w->order);
	if (delta < 0 && v == 0)
		return fail(w, -EIO, "cluster 0x%llx is referenced but has refcount 0; run 'qublk check'",
			    (unsigned long long)(k << w->cb));
	qcow2_rc_set(r->buf, i, w->order, delta > 0 ? v + 1 : v - 1);
	r->dirty = true;
	return 0;
}

/* Every cluster of host bytes [off, off+len). */
static int rc_add_range(struct sw *w, uint64_t off, uint64_t len, int delta)
{
	if (!len)
		return 0;
	for (uint64_t k = cluster_of(w, off); k <= cluster_of(w, off + len - 1); k++) {
		int ret = rc_add(w, k, delta);
		if (ret)
			return ret;
	}
	return 0;
}

/* Write every changed refcount block, sync, then point the refcount table
 * at the new ones (synced). */
static int rb_flush(struct sw *w)
{
	bool fresh = false;
	int ret;

	for (uint32_t b = 0; b < w->rt_size; b++) {
		struct refblock *r = &w->rb[b];
		if (!r->buf || !r->dirty)
			continue;
		ret = io_pwrite(w->f, r->buf, w->cs, w->rt[b] & QCOW2_REFT_OFFSET_MASK);
		if (ret)
			return io_fail(w, ret, "writing a refcount block");
		r->dirty = false;
		fresh |= r->fresh;
	}
	ret = io_flush(w->f);
	if (ret)
		return io_fail(w, ret, "sync");
	if (!fresh)
		return 0;
	for (uint32_t b = 0; b < w->rt_size; b++) {
		uint8_t e[8];
		if (!w->rb[b].fresh)
			continue;
		put_be64(e, w->rt[b]);
		ret = io_pwrite(w->f, e, 8, w->m.h.reftable_offset + 8ull * b);
		if (ret)
			return io_fail(w, ret, "writing a refcount table entry");
		w->rb[b].fresh = false;
	}
	ret = io_flush(w->f);
	return ret ? io_fail(w, ret, "sync") : 0;
}

static int sync_file(struct sw *w)
{
	int ret = io_flush(w->f);
	return ret ? io_fail(w, ret, "sync") : 0;
}

/* A new refcount block for entry @b at the first cluster it describes
 * (all free: no block described them).  In memory until rb_flush(). */
static int rb_create(struct sw *w, uint64_t b)
{
	struct refblock *r = &w->rb[b];
	uint64_t k = b << w->rb_bits;

	r->buf = io_zalloc(w->cs);
	if (!r->buf)
		return fail(w, -ENOMEM, "out of memory");
	if (k << w->cb >= QCOW2_MAX_HOST_OFFSET)
		return fail(w, -EFBIG, "the image file would grow past qcow2's limit");
	w->rt[b] = k << w->cb;
	r->dirty = r->fresh = true;
	qcow2_rc_set(r->buf, 0, w->order, 1);
	w->end = MAX(w->end, k + 1);
	return 0;
}

static int write_header_bytes(struct sw *w, uint64_t off, const void *p, size_t len)
{
	int ret = io_pwrite(w->f, p, len, off);
	if (!ret)
		ret = io_flush(w->f);
	return ret ? io_fail(w, ret, "writing the header") : 0;
}

/* Grow the refcount table to cover reftable entry @need (see the top). */
static int rt_grow(struct sw *w, uint64_t need)
{
	uint64_t per_rt_cluster = w->cs / 8;
	uint64_t n = MAX(need + 1, (uint64_t)w->rt_size) * 3 / 2 + 1;
	uint64_t start = w->end, t, nb;
	int ret;

	/* The table's clusters [start, start+t) and the blocks that describe
	 * them and themselves [start+t, start+t+nb): a fixed point. */
	for (nb = 0;;) {
		t = DIV_ROUND_UP(n, per_rt_cluster);
		uint64_t last = start + t + nb - 1;
		uint64_t want = 0;
		for (uint64_t b = start >> w->rb_bits; b <= last >> w->rb_bits; b++)
			if (b >= w->rt_size || !(w->rt[b] & QCOW2_REFT_OFFSET_MASK))
				want++;
		if ((last >> w->rb_bits) >= n) {
			n = (last >> w->rb_bits) + 1;
			continue;
		}
		if (want == nb)
			break;
		nb = want;
	}
	if (t * w->cs > QCOW2_MAX_REFTABLE_SIZE)
		return fail(w, -EFBIG, "the refcount table would exceed qcow2's limit");
	n = t * per_rt_cluster;
	uint64_t *nrt = calloc(n, 8);
	struct refblock *nrb = calloc(n, sizeof(*nrb));
	uint8_t *buf = io_zalloc(t * w->cs);
	if (!nrt || !nrb || !buf) {
		free(nrt);
		free(nrb);
		io_free(buf);
		return fail(w, -ENOMEM, "out of memory");
	}
	memcpy(nrt, w->rt, 8ull * w->rt_size);
	memcpy(nrb, w->rb, sizeof(*nrb) * w->rt_size);
	uint64_t old_off = w->m.h.reftable_offset, old_clusters = w->m.h.reftable_clusters;
	free(w->rt);
	free(w->rb);
	w->rt = nrt;
	w->rb = nrb;
	w->rt_size = (uint32_t)n;

	/* New blocks (not yet in any table: written with the table). */
	uint64_t next = start + t;
	for (uint64_t b = start >> w->rb_bits; b <= (start + t + nb - 1) >> w->rb_bits; b++) {
		if (w->rt[b] & QCOW2_REFT_OFFSET_MASK)
			continue;
		w->rb[b].buf = io_zalloc(w->cs);
		if (!w->rb[b].buf) {
			io_free(buf);
			return fail(w, -ENOMEM, "out of memory");
		}
		w->rt[b] = next++ << w->cb;
		w->rb[b].dirty = true;
	}
	w->end = start + t + nb;
	for (uint64_t k = start; k < start + t + nb; k++) {
		ret = rc_add(w, k, +1);
		if (ret) {
			io_free(buf);
			return ret;
		}
	}
	/* Blocks first (the new ones and pending changes), then the table. */
	for (uint64_t b = 0; b < w->rt_size; b++)
		w->rb[b].fresh = false;      /* all of them are in the new table */
	for (uint64_t i = 0; i < n; i++)
		put_be64(buf + 8 * i, w->rt[i]);
	ret = io_pwrite(w->f, buf, t * w->cs, start << w->cb);
	io_free(buf);
	if (ret)
		return io_fail(w, ret, "writing the new refcount table");
	ret = rb_flush(w);      /* writes the blocks, syncs */
	if (ret)
		return ret;
	uint8_t h[12];
	put_be64(h, start << w->cb);
	put_be32(h + 8, (uint32_t)t);
	ret = write_header_bytes(w, QCOW2_HDR_REFTABLE_OFFSET, h, sizeof(h));
	if (ret)
		return ret;
	w->m.h.reftable_offset = start << w->cb;
	w->m.h.reftable_clusters = (uint32_t)t;
	/* The old table is freed (written with the next flush). */
	return rc_add_range(w, old_off, old_clusters << w->cb, -1);
}

/* Allocate @n contiguous clusters (refcount 1, in memory).  Returns the
 * host offset in *off. */
static int alloc_clusters(struct sw *w, uint64_t n, uint64_t *off)
{
	int ret;

	for (;;) {
		uint64_t k = MAX(w->hint, 1), run = 0, first = k;
		while (run < n) {
			uint64_t v;
			ret = rc_get(w, k, &v);
			if (ret)
				return ret;
			if (v) {
				run = 0;
				first = k + 1;
			} else {
				run++;
			}
			k++;
		}
		/* Every block describing the run must exist. */
		bool again = false;
		for (uint64_t b = first >> w->rb_bits; b <= (first + n - 1) >> w->rb_bits; b++) {
			if (b >= w->rt_size) {
				ret = rt_grow(w, b);
				if (ret)
					return ret;
				again = true;
				break;
			}
			if (!(w->rt[b] & QCOW2_REFT_OFFSET_MASK)) {
				ret = rb_create(w, b);
				if (ret)
					return ret;
				again = true;
				break;
			}
		}
		if (again)
			continue;
		if ((first + n) << w->cb > QCOW2_MAX_HOST_OFFSET)
			return fail(w, -EFBIG, "the image file would grow past qcow2's limit");
		for (uint64_t c = first; c < first + n; c++) {
			ret = rc_add(w, c, +1);
			if (ret)
				return ret;
		}
		w->hint = first + n;
		w->end = MAX(w->end, first + n);
		*off = first << w->cb;
		return 0;
	}
}

/* ---- trees -------------------------------------------------------------- */

static int read_l1(struct sw *w, uint64_t off, uint32_t n, uint64_t **out)
{
	uint64_t *t = calloc(MAX(n, 1u), 8);

	*out = NULL;
	if (!t)
		return fail(w, -ENOMEM, "out of memory");
	int ret = n ? io_pread(w->f, t, 8ull * n, off) : 0;
	if (ret) {
		free(t);
		return io_fail(w, ret, "reading an L1 table");
	}
	for (uint32_t i = 0; i < n; i++) {
		t[i] = be64toh(t[i]);
		uint64_t l2 = t[i] & QCOW2_L1E_OFFSET_MASK;
		if ((t[i] & QCOW2_L1E_RESERVED_MASK) || !IS_ALIGNED(l2, w->cs) ||
		    (l2 && l2 + w->cs > ALIGN_UP(w->file_size, (uint64_t)w->cs))) {
			uint64_t e = t[i];
			free(t);
			return fail(w, -EIO, "L1 table at 0x%llx: entry %u (0x%llx) is invalid; run "
				    "'qublk check'", (unsigned long long)off, i, (unsigned long long)e);
		}
	}
	*out = t;
	return 0;
}

static int write_l1(struct sw *w, uint64_t off, const uint64_t *l1, uint32_t n)
{
	uint64_t *b = calloc(MAX(n, 1u), 8);

	if (!b)
		return fail(w, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < n; i++)
		b[i] = htobe64(l1[i]);
	int ret = n ? io_pwrite(w->f, b, 8ull * n, off) : 0;
	free(b);
	return ret ? io_fail(w, ret, "writing an L1 table") : 0;
}

enum {
	T_REFS = 1 << 0,        /* add @delta to every L2 table and data cluster */
	T_CLEAR = 1 << 1,       /* clear OFLAG_COPIED in L2 entries (written) */
	T_SET = 1 << 2,         /* OFLAG_COPIED = (refcount == 1) in L2 entries (written) */
};

/* The host clusters an L2 entry references: [*off, *off+*len), len 0: none. */
static int l2_entry_range(struct sw *w, uint64_t e, uint64_t l2_off, uint32_t j, uint64_t *off,
			  uint64_t *len)
{
	*len = 0;
	if (e & QCOW2_OFLAG_COMPRESSED) {
		uint64_t coff = e & w->coffset_mask;
		uint64_t nsec = ((e >> w->csize_shift) & w->csize_mask) + 1;
		*off = coff;
		*len = nsec * QCOW2_COMPRESSED_SECTOR_SIZE - (coff & (QCOW2_COMPRESSED_SECTOR_SIZE - 1));
		if (coff >= ALIGN_UP(w->file_size, (uint64_t)w->cs))
			goto bad;
		return 0;
	}
	if (e & QCOW2_L2E_RESERVED_MASK)
		goto bad;
	*off = e & QCOW2_L2E_OFFSET_MASK;
	if (!*off)
		return 0;
	if (!IS_ALIGNED(*off, w->cs) || *off + w->cs > ALIGN_UP(w->file_size, (uint64_t)w->cs))
		goto bad;
	*len = w->cs;
	return 0;
bad:
	return fail(w, -EIO, "L2 table at 0x%llx: entry %u (0x%llx) is invalid; run 'qublk check'",
		    (unsigned long long)l2_off, j, (unsigned long long)e);
}

/* Walk the tree of the L1 table @l1 (@n entries): with T_REFS add @delta
 * to the refcount of every L2 table and of every cluster its entries
 * reference; with T_CLEAR/T_SET update OFLAG_COPIED in the L2 entries
 * and write the tables that changed.  The L1 entries' flags are left to
 * the caller. */
static int walk(struct sw *w, const uint64_t *l1, uint32_t n, unsigned what, int delta)
{
	int ret;

	for (uint32_t i = 0; i < n; i++) {
		uint64_t l2_off = l1[i] & QCOW2_L1E_OFFSET_MASK;
		bool dirty = false;
		if (!l2_off)
			continue;
		ret = io_pread(w->f, w->l2, w->cs, l2_off);
		if (ret)
			return io_fail(w, ret, "reading an L2 table");
		for (uint32_t j = 0; j < w->l2_entries; j++) {
			uint64_t e = get_be64(w->l2 + 8ull * j), off = 0, len = 0, rc;
			if (!e)
				continue;
			ret = l2_entry_range(w, e, l2_off, j, &off, &len);
			if (ret)
				return ret;
			if ((what & T_REFS) && len) {
				ret = rc_add_range(w, off, len, delta);
				if (ret)
					return ret;
			}
			if (e & QCOW2_OFLAG_COMPRESSED || !len)
				continue;       /* never COPIED */
			uint64_t ne = e;
			if (what & T_CLEAR)
				ne &= ~QCOW2_OFLAG_COPIED;
			if (what & T_SET) {
				ret = rc_get(w, cluster_of(w, off), &rc);
				if (ret)
					return ret;
				ne = rc == 1 ? ne | QCOW2_OFLAG_COPIED : ne & ~QCOW2_OFLAG_COPIED;
			}
			if (ne != e) {
				put_be64(w->l2 + 8ull * j, ne);
				dirty = true;
			}
		}
		if (dirty) {
			ret = io_pwrite(w->f, w->l2, w->cs, l2_off);
			if (ret)
				return io_fail(w, ret, "writing an L2 table");
		}
		if (what & T_REFS) {
			ret = rc_add(w, cluster_of(w, l2_off), delta);
			if (ret)
				return ret;
		}
	}
	return 0;
}

/* OFLAG_COPIED of the active L1 entries = (refcount of the L2 table == 1);
 * @l1_off: where the active L1 is, written if it changed. */
static int l1_set_copied(struct sw *w, uint64_t *l1, uint32_t n, uint64_t l1_off)
{
	bool changed = false;

	for (uint32_t i = 0; i < n; i++) {
		uint64_t l2 = l1[i] & QCOW2_L1E_OFFSET_MASK, rc, ne;
		if (!l2)
			continue;
		int ret = rc_get(w, cluster_of(w, l2), &rc);
		if (ret)
			return ret;
		ne = rc == 1 ? l1[i] | QCOW2_OFLAG_COPIED : l1[i] & ~QCOW2_OFLAG_COPIED;
		changed |= ne != l1[i];
		l1[i] = ne;
	}
	return changed ? write_l1(w, l1_off, l1, n) : 0;
}

/* The flags pass that ends apply and delete: set OFLAG_COPIED where the
 * (now durable) refcounts of the active tree are 1. */
static int fix_active_copied(struct sw *w)
{
	int ret = walk(w, w->l1, w->m.h.l1_size, T_SET, 0);
	if (!ret)
		ret = l1_set_copied(w, w->l1, w->m.h.l1_size, w->m.h.l1_offset);
	return ret ? ret : sync_file(w);
}

/* ---- the snapshot table ------------------------------------------------- */

/* The table bytes with entry @skip (or none: UINT32_MAX) left out and
 * @add (an encoded entry, padded) appended.  Entries keep their bytes,
 * unknown extra data included. */
static int build_table(struct sw *w, uint32_t skip, const uint8_t *add, size_t add_len,
		       uint8_t **out, uint64_t *len)
{
	uint64_t old = ALIGN_UP(w->table_bytes, 8ull);
	uint8_t *t = malloc(old + add_len + 1), *raw = NULL;
	uint64_t n = 0;
	int ret;

	*out = NULL;
	if (!t)
		return fail(w, -ENOMEM, "out of memory");
	if (w->nsnaps) {
		raw = calloc(1, old);
		if (!raw) {
			free(t);
			return fail(w, -ENOMEM, "out of memory");
		}
		ret = io_pread(w->f, raw, w->table_bytes, w->m.h.snapshots_offset);
		if (ret) {
			free(t);
			free(raw);
			return io_fail(w, ret, "reading the snapshot table");
		}
	}
	for (uint32_t i = 0; i < w->nsnaps; i++) {
		const struct qcow2_snapshot *s = &w->snaps[i];
		uint64_t l = ALIGN_UP((uint64_t)s->entry_len, 8ull);
		if (i == skip)
			continue;
		memset(t + n, 0, l);
		memcpy(t + n, raw + s->entry_off, s->entry_len);
		n += l;
	}
	free(raw);
	if (add) {
		memcpy(t + n, add, add_len);
		n += add_len;
	}
	if (n > MAX_SNAPSHOT_TABLE) {
		free(t);
		return fail(w, -EFBIG, "the snapshot table would exceed qcow2's limit");
	}
	*out = t;
	*len = n;
	return 0;
}

/* Write the table @t (@len bytes, @nb entries) to new clusters, sync,
 * switch the header to it, sync, and free the old one (in memory). */
static int replace_table(struct sw *w, const uint8_t *t, uint64_t len, uint32_t nb)
{
	uint64_t off = 0, old_off = w->m.h.snapshots_offset;
	uint64_t old_len = w->nsnaps ? w->table_bytes : 0;
	int ret;

	if (nb) {
		ret = alloc_clusters(w, DIV_ROUND_UP(len, (uint64_t)w->cs), &off);
		if (ret)
			return ret;
		ret = io_pwrite(w->f, t, len, off);
		if (ret)
			return io_fail(w, ret, "writing the snapshot table");
	}
	ret = rb_flush(w);
	if (ret)
		return ret;
	uint8_t h[12];
	put_be32(h, nb);
	put_be64(h + 4, off);
	ret = write_header_bytes(w, QCOW2_HDR_NB_SNAPSHOTS, h, sizeof(h));
	if (ret)
		return ret;
	w->m.h.nb_snapshots = nb;
	w->m.h.snapshots_offset = off;
	return rc_add_range(w, old_off, old_len, -1);
}

/* The index of the snapshot called @name.  @id_first: an id match wins
 * (QEMU's apply), else a name match wins (qemu-img snapshot -d). */
static int find(struct sw *w, const char *name, bool id_first)
{
	for (int pass = 0; pass < 2; pass++) {
		bool by_id = (pass == 0) == id_first;
		for (uint32_t i = 0; i < w->nsnaps; i++)
			if (!strcmp(by_id ? w->snaps[i].id : w->snaps[i].name, name))
				return (int)i;
	}
	return fail(w, -ENOENT, "snapshot '%s' not found", name);
}

/* ---- open / close -------------------------------------------------------- */

static void sw_close(struct sw *w)
{
	rb_drop_all(w);
	free(w->rb);
	free(w->rt);
	free(w->l1);
	io_free(w->l2);
	qcow2_snapshots_free(w->snaps, w->nsnaps);
	qcow2_meta_free(&w->m);
}

static int sw_open(struct sw *w, struct io_file *f, bool write, unsigned flags, char *err,
		   size_t errlen)
{
	char why[256] = "";
	int ret;

	memset(w, 0, sizeof(*w));
	w->f = f;
	w->err = err;
	w->errlen = errlen;
	if (err && errlen)
		err[0] = '\0';
	ret = io_get_size(f, &w->file_size);
	if (ret)
		return io_fail(w, ret, "stat");
	ret = qcow2_meta_read(f, w->file_size, &w->m, why, sizeof(why));
	if (ret)
		return fail(w, ret, "%s", why[0] ? why : strerror(-ret));
	const struct qcow2_header *h = &w->m.h;
	if (h->incompat & ~QCOW2_INCOMPAT_KNOWN) {
		char names[256];
		qcow2_feature_names(&w->m, 0, h->incompat & ~QCOW2_INCOMPAT_KNOWN, names, sizeof(names));
		return fail(w, -ENOTSUP, "unsupported incompatible feature(s): %s", names);
	}
	if (h->incompat & QCOW2_INCOMPAT_EXTL2)
		return fail(w, -ENOTSUP, "images with extended L2 entries are not supported");
	if (h->incompat & QCOW2_INCOMPAT_DATA_FILE)
		return fail(w, -ENOTSUP, "internal snapshots are not supported with an external data file");
	if (write && (h->incompat & QCOW2_INCOMPAT_CORRUPT))
		return fail(w, -EIO, "the image is marked corrupt; run 'qublk check -r all'");
	if (write && (h->incompat & QCOW2_INCOMPAT_DIRTY) && (flags & QCOW2_SNAPSHOT_LIVE))
		return fail(w, -EIO, "the image is dirty (its refcounts were not written back)");
	if (write && (h->incompat & QCOW2_INCOMPAT_DIRTY)) {
		/* As a read-write open by QEMU: repair the refcounts first. */
		ret = qcow2_repair_dirty(f, f->path ? f->path : "image", &w->m, &w->file_size);
		if (ret)
			return fail(w, ret, "the image is dirty and could not be repaired");
		h = &w->m.h;
	}
	w->cb = h->cluster_bits;
	w->cs = 1u << w->cb;
	w->l2_entries = w->cs / 8;
	w->order = h->refcount_order;
	w->rc_max = w->order == 6 ? UINT64_MAX : (1ull << (1u << w->order)) - 1;
	w->rb_bits = w->cb + 3 - w->order;
	w->csize_shift = 62 - (w->cb - 8);
	w->csize_mask = (1ull << (w->cb - 8)) - 1;
	w->coffset_mask = (1ull << w->csize_shift) - 1;
	w->end = DIV_ROUND_UP(w->file_size, (uint64_t)w->cs);

	ret = qcow2_snapshots_read_flags(f, h, w->file_size, 0, &w->snaps, &w->table_bytes, why,
					 sizeof(why));
	if (ret)
		return fail(w, ret, "%s", why[0] ? why : strerror(-ret));
	w->nsnaps = h->nb_snapshots;
	if (!write)
		return 0;

	w->l2 = io_alloc(w->cs);
	if (!w->l2)
		return fail(w, -ENOMEM, "out of memory");
	w->rt_size = (uint32_t)(((uint64_t)h->reftable_clusters << w->cb) / 8);
	w->rt = calloc(MAX(w->rt_size, 1u), 8);
	w->rb = calloc(MAX(w->rt_size, 1u), sizeof(*w->rb));
	if (!w->rt || !w->rb)
		return fail(w, -ENOMEM, "out of memory");
	ret = io_pread(f, w->rt, 8ull * w->rt_size, h->reftable_offset);
	if (ret)
		return io_fail(w, ret, "reading the refcount table");
	for (uint32_t i = 0; i < w->rt_size; i++)
		w->rt[i] = be64toh(w->rt[i]);
	ret = read_l1(w, h->l1_offset, h->l1_size, &w->l1);
	if (ret)
		return ret;
	/* Autoclear features we do not maintain (bitmaps) are cleared, as a
	 * read-write open by the driver or QEMU does.  Live, the driver has
	 * cleared those it does not maintain and keeps the others (bitmaps
	 * it tracks): a snapshot changes no guest data, so they stay valid. */
	if (h->version >= 3 && h->autoclear && !(flags & QCOW2_SNAPSHOT_LIVE)) {
		uint8_t z[8] = { 0 };
		ret = write_header_bytes(w, QCOW2_HDR_AUTOCLEAR, z, sizeof(z));
		if (ret)
			return ret;
		w->m.h.autoclear = 0;
	}
	return 0;
}

/* ---- operations ----------------------------------------------------------- */

/* Apply the refcount changes of a whole operation in memory and drop
 * them: every entry valid, no refcount out of range.  Nothing written. */
static int dry_run(struct sw *w, const uint64_t *plus, uint32_t nplus, const uint64_t *minus,
		   uint32_t nminus)
{
	int ret = 0;

	if (plus)
		ret = walk(w, plus, nplus, T_REFS, +1);
	if (!ret && minus)
		ret = walk(w, minus, nminus, T_REFS, -1);
	rb_drop_all(w);
	return ret;
}

static size_t encode_entry(uint8_t *e, uint64_t l1_off, uint32_t l1_size, const char *id,
			   const char *name, uint64_t disk_size)
{
	struct timeval tv;
	size_t id_len = strlen(id), name_len = strlen(name);
	size_t len = QCOW2_SNAP_FIXED_LEN + SNAP_EXTRA_LEN + id_len + name_len;

	gettimeofday(&tv, NULL);
	memset(e, 0, ALIGN_UP(len, 8));
	put_be64(e + QCOW2_SNAP_L1_OFFSET, l1_off);
	put_be32(e + QCOW2_SNAP_L1_SIZE, l1_size);
	put_be16(e + QCOW2_SNAP_ID_SIZE, (uint16_t)id_len);
	put_be16(e + QCOW2_SNAP_NAME_SIZE, (uint16_t)name_len);
	put_be32(e + QCOW2_SNAP_DATE_SEC, (uint32_t)tv.tv_sec);
	put_be32(e + QCOW2_SNAP_DATE_NSEC, (uint32_t)tv.tv_usec * 1000);   /* as QEMU */
	/* vm_clock_nsec, vm_state_size: 0 (no VM state) */
	put_be32(e + QCOW2_SNAP_EXTRA_SIZE, SNAP_EXTRA_LEN);
	uint8_t *x = e + QCOW2_SNAP_FIXED_LEN;
	put_be64(x, 0);                 /* vm_state_size_large */
	put_be64(x + 8, disk_size);
	put_be64(x + 16, 0);            /* icount, as qemu-img writes it */
	memcpy(x + SNAP_EXTRA_LEN, id, id_len);
	memcpy(x + SNAP_EXTRA_LEN + id_len, name, name_len);
	return ALIGN_UP(len, 8);
}

int qcow2_snapshot_create(struct io_file *f, const char *name, unsigned flags, char *err,
			  size_t errlen)
{
	struct sw w;
	uint8_t *entry = NULL, *table = NULL;
	uint64_t *copy = NULL, table_len, l1_off = 0;
	char id[32];
	int ret;

	ret = sw_open(&w, f, true, flags, err, errlen);
	if (ret)
		goto out;
	if (!name[0] || strlen(name) > 65535) {
		ret = fail(&w, -EINVAL, "a snapshot name must be 1..65535 bytes");
		goto out;
	}
	if (w.nsnaps >= QCOW2_MAX_SNAPSHOTS) {
		ret = fail(&w, -EFBIG, "too many snapshots (the limit is %u)", QCOW2_MAX_SNAPSHOTS);
		goto out;
	}
	/* QEMU's id: one more than the largest numeric id. */
	unsigned long max_id = 0;
	for (uint32_t i = 0; i < w.nsnaps; i++) {
		unsigned long v = strtoul(w.snaps[i].id, NULL, 10);
		max_id = MAX(max_id, v);
	}
	snprintf(id, sizeof(id), "%lu", max_id + 1);

	uint32_t n = w.m.h.l1_size;
	ret = dry_run(&w, w.l1, n, NULL, 0);
	if (ret)
		goto out;

	/* 1. the snapshot's L1 table and the new snapshot table */
	copy = calloc(MAX(n, 1u), 8);
	entry = malloc(ALIGN_UP(QCOW2_SNAP_FIXED_LEN + SNAP_EXTRA_LEN + strlen(id) + strlen(name), 8));
	if (!copy || !entry) {
		ret = fail(&w, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < n; i++)
		copy[i] = w.l1[i] & ~QCOW2_OFLAG_COPIED;
	if (n) {
		ret = alloc_clusters(&w, DIV_ROUND_UP(8ull * n, (uint64_t)w.cs), &l1_off);
		if (ret)
			goto out;
		ret = write_l1(&w, l1_off, copy, n);
		if (ret)
			goto out;
	}
	size_t elen = encode_entry(entry, l1_off, n, id, name, w.m.h.size);
	ret = build_table(&w, UINT32_MAX, entry, elen, &table, &table_len);
	if (ret)
		goto out;
	uint64_t t_off = 0;
	ret = alloc_clusters(&w, DIV_ROUND_UP(table_len, (uint64_t)w.cs), &t_off);
	if (ret)
		goto out;
	ret = io_pwrite(w.f, table, table_len, t_off);
	if (ret) {
		ret = io_fail(&w, ret, "writing the snapshot table");
		goto out;
	}
	ret = rb_flush(&w);
	if (ret)
		goto out;
	/* 2. OFLAG_COPIED off in the active tree, before refcounts rise. */
	ret = walk(&w, w.l1, n, T_CLEAR, 0);
	if (!ret && memcmp(copy, w.l1, 8ull * n)) {
		memcpy(w.l1, copy, 8ull * n);
		ret = write_l1(&w, w.m.h.l1_offset, w.l1, n);
	}
	if (!ret)
		ret = sync_file(&w);
	if (ret)
		goto out;
	/* 3. +1 for the tree */
	ret = walk(&w, w.l1, n, T_REFS, +1);
	if (!ret)
		ret = rb_flush(&w);
	if (ret)
		goto out;
	/* 4. the header: nb_snapshots and the table, one write */
	uint8_t h[12];
	uint64_t old_off = w.m.h.snapshots_offset, old_len = w.nsnaps ? w.table_bytes : 0;
	put_be32(h, w.nsnaps + 1);
	put_be64(h + 4, t_off);
	ret = write_header_bytes(&w, QCOW2_HDR_NB_SNAPSHOTS, h, sizeof(h));
	if (ret)
		goto out;
	/* 5. the old table */
	ret = rc_add_range(&w, old_off, old_len, -1);
	if (!ret)
		ret = rb_flush(&w);
out:
	free(copy);
	free(entry);
	free(table);
	sw_close(&w);
	return ret;
}

int qcow2_snapshot_apply(struct io_file *f, const char *name, unsigned flags, char *err,
			 size_t errlen)
{
	struct sw w;
	uint64_t *sl1 = NULL, *nl1 = NULL, new_l1_off;
	int ret;

	ret = sw_open(&w, f, true, flags, err, errlen);
	if (ret)
		goto out;
	int idx = find(&w, name, true);
	if (idx < 0) {
		ret = idx;
		goto out;
	}
	const struct qcow2_snapshot *s = &w.snaps[idx];
	uint64_t span = (uint64_t)w.cs * w.l2_entries;
	uint64_t need = DIV_ROUND_UP(s->disk_size, span);
	if (need > QCOW2_MAX_L1_SIZE / 8 || s->l1_size > QCOW2_MAX_L1_SIZE / 8 ||
	    s->disk_size > (uint64_t)INT64_MAX) {
		ret = fail(&w, -EIO, "snapshot '%s' has an invalid disk size or L1 table", name);
		goto out;
	}
	ret = read_l1(&w, s->l1_offset, s->l1_size, &sl1);
	if (ret)
		goto out;
	uint32_t cur = w.m.h.l1_size;
	uint32_t nsize = (uint32_t)MAX(MAX((uint64_t)cur, (uint64_t)s->l1_size), need);
	ret = dry_run(&w, sl1, s->l1_size, w.l1, cur);
	if (ret)
		goto out;

	/* The new active L1: the snapshot's entries, OFLAG_COPIED off (every
	 * cluster is shared with the snapshot now), zeros past them. */
	nl1 = calloc(nsize, 8);
	if (!nl1) {
		ret = fail(&w, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < s->l1_size; i++)
		nl1[i] = sl1[i] & ~QCOW2_OFLAG_COPIED;

	/* 1. the snapshot's tree: flags off, +1; a larger L1 if needed */
	new_l1_off = w.m.h.l1_offset;
	if (nsize > cur) {
		ret = alloc_clusters(&w, DIV_ROUND_UP(8ull * nsize, (uint64_t)w.cs), &new_l1_off);
		if (ret)
			goto out;
	}
	ret = walk(&w, sl1, s->l1_size, T_CLEAR | T_REFS, +1);
	if (!ret)
		ret = rb_flush(&w);     /* syncs the L2 writes too */
	if (ret)
		goto out;
	/* 2. the active L1 */
	ret = write_l1(&w, new_l1_off, nl1, nsize);
	if (!ret)
		ret = sync_file(&w);
	if (ret)
		goto out;
	uint64_t old_l1_off = w.m.h.l1_offset;
	if (nsize > cur) {
		/* size, crypt_method (unchanged), l1_size, l1_offset: one write */
		uint8_t hb[24];
		put_be64(hb, s->disk_size);
		put_be32(hb + 8, w.m.h.crypt_method);
		put_be32(hb + 12, nsize);
		put_be64(hb + 16, new_l1_off);
		ret = write_header_bytes(&w, QCOW2_HDR_SIZE, hb, sizeof(hb));
		if (ret)
			goto out;
		w.m.h.l1_offset = new_l1_off;
		w.m.h.l1_size = nsize;
	} else if (s->disk_size != w.m.h.size) {
		uint8_t hb[8];
		put_be64(hb, s->disk_size);
		ret = write_header_bytes(&w, QCOW2_HDR_SIZE, hb, sizeof(hb));
		if (ret)
			goto out;
	}
	w.m.h.size = s->disk_size;
	/* 3. the old active tree (and the old L1 table if it was replaced) */
	ret = walk(&w, w.l1, cur, T_REFS, -1);
	if (!ret && nsize > cur)
		ret = rc_add_range(&w, old_l1_off, 8ull * cur, -1);
	if (!ret)
		ret = rb_flush(&w);
	if (ret)
		goto out;
	free(w.l1);
	w.l1 = nl1;
	nl1 = NULL;
	/* 4. OFLAG_COPIED where the refcounts are now 1 */
	ret = fix_active_copied(&w);
out:
	free(sl1);
	free(nl1);
	sw_close(&w);
	return ret;
}

int qcow2_snapshot_delete(struct io_file *f, const char *name, unsigned flags, char *err,
			  size_t errlen)
{
	struct sw w;
	uint64_t *sl1 = NULL, table_len;
	uint8_t *table = NULL;
	int ret;

	ret = sw_open(&w, f, true, flags, err, errlen);
	if (ret)
		goto out;
	int idx = find(&w, name, false);
	if (idx < 0) {
		ret = idx;
		goto out;
	}
	const struct qcow2_snapshot *s = &w.snaps[idx];
	if (s->l1_size > QCOW2_MAX_L1_SIZE / 8) {
		ret = fail(&w, -EIO, "snapshot '%s' has an invalid L1 table", name);
		goto out;
	}
	ret = read_l1(&w, s->l1_offset, s->l1_size, &sl1);
	if (ret)
		goto out;
	ret = dry_run(&w, NULL, 0, sl1, s->l1_size);
	if (ret)
		goto out;
	uint64_t sl1_off = s->l1_offset, sl1_size = s->l1_size;
	/* 1-2. the table without the entry, then the header */
	ret = build_table(&w, (uint32_t)idx, NULL, 0, &table, &table_len);
	if (!ret)
		ret = replace_table(&w, table, table_len, w.nsnaps - 1);
	if (ret)
		goto out;
	/* 3. the snapshot's tree and L1 table (the old table is pending) */
	ret = walk(&w, sl1, (uint32_t)sl1_size, T_REFS, -1);
	if (!ret)
		ret = rc_add_range(&w, sl1_off, 8 * sl1_size, -1);
	if (!ret)
		ret = rb_flush(&w);
	if (ret)
		goto out;
	/* 4. OFLAG_COPIED where the refcounts are now 1 */
	ret = fix_active_copied(&w);
out:
	free(sl1);
	free(table);
	sw_close(&w);
	return ret;
}

int qcow2_snapshot_list(struct io_file *f, struct qcow2_snapshot **out, uint32_t *n, char *err,
			size_t errlen)
{
	struct sw w;
	int ret = sw_open(&w, f, false, 0, err, errlen);

	*out = NULL;
	*n = 0;
	if (!ret) {
		*out = w.snaps;
		*n = w.nsnaps;
		w.snaps = NULL;
		w.nsnaps = 0;
	}
	sw_close(&w);
	return ret;
}
