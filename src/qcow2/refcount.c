/* SPDX-License-Identifier: MIT */
/*
 * Refcounts and the cluster allocator ("Host cluster management" in
 * qcow2.rst): the in-memory refcount table, refcount block updates
 * through the refcount cache, new refcount blocks, refcount table growth,
 * deferred frees, and the metadata flush.
 *
 * Crash-safety rules (everything else in the driver relies on them):
 *  1. Refcount increments reach the disk before any L2 entry that uses the
 *     cluster: the L2 cache writes the refcount cache and syncs before it
 *     writes a dirty slice (cache.c).
 *  2. A new L2 table is on disk (and its refcount) before the L1 entry
 *     pointing to it; L1 entry writes are synced (cluster.c).
 *  3. Guest data (COW included) is written before the L2 entry pointing to
 *     it is updated in the cache, and rule 1's sync covers it.
 *  4. Refcount decrements are deferred: freed ranges sit on s->pending
 *     (their refcount still >= 1, so the allocator cannot reuse them) and
 *     are applied only after the L2/L1 writes that dropped the references
 *     are durable, i.e. at the end of qcow2_flush_locked() (with
 *     write-through, only those whose L2 change is written: cache.c).  The
 *     applied decrements reach the disk with the next flush (close flushes
 *     twice).  A crash can leak clusters, never leave two users of one.
 *  5. Refcount table growth writes the new table and its refcount blocks,
 *     syncs, switches the header (synced), then frees the old table
 *     (deferred, rule 4).
 *  Lazy refcounts (compatible feature bit 0) relax rule 1: the image is
 *  marked dirty (header bit, synced) before the first L2 write, refcounts
 *  are written whenever, and a clean close clears the bit after a full
 *  flush.  A dirty image has its refcounts rebuilt from the L1/L2 tables
 *  when it is next opened read-write (driver.c).
 *
 * Thread model: every function here runs with s->lock held.
 */
#include <errno.h>
#include <linux/falloc.h>
#include <stdlib.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

int qcow2_read_reftable(struct qcow2_state *s, uint64_t **out, uint32_t *n)
{
	const char *fn = s->bs->filename;
	uint64_t bytes = (uint64_t)s->reftable_clusters << s->cluster_bits;
	uint32_t size;
	uint64_t *rt;
	uint8_t *buf;
	int ret;

	*out = NULL;
	*n = 0;
	if (bytes > QCOW2_MAX_REFTABLE_SIZE) {
		log_error("%s: refcount table too large (%llu bytes)", fn, (unsigned long long)bytes);
		return -EINVAL;
	}
	size = (uint32_t)(bytes / 8);
	rt = calloc(size ? size : 1, 8);
	buf = io_alloc(bytes ? bytes : 512);
	if (!rt || !buf) {
		free(rt);
		io_free(buf);
		return -ENOMEM;
	}
	ret = bytes ? io_pread(s->file, buf, bytes, s->reftable_offset) : 0;
	if (ret < 0) {
		log_error("%s: reading the refcount table: %s", fn, strerror(-ret));
		goto fail;
	}
	for (uint32_t i = 0; i < size; i++) {
		uint64_t e = get_be64(buf + 8 * (size_t)i);
		uint64_t off = e & QCOW2_REFT_OFFSET_MASK;
		if ((e & QCOW2_REFT_RESERVED_MASK) || !IS_ALIGNED(off, s->cluster_size) ||
		    off >= s->file_end || s->file_end - off < s->cluster_size) {
			log_error("%s: refcount table entry %u is invalid (%#llx)", fn, i,
				  (unsigned long long)e);
			ret = -EINVAL;
			goto fail;
		}
		rt[i] = off;
	}
	io_free(buf);
	*out = rt;
	*n = size;
	return 0;
fail:
	free(rt);
	io_free(buf);
	return ret;
}

int qcow2_refcount_open(struct qcow2_state *s)
{
	int ret = qcow2_read_reftable(s, &s->reftable, &s->reftable_size);

	s->free_hint = 0;
	return ret;
}

void qcow2_refcount_close(struct qcow2_state *s)
{
	free(s->reftable);
	s->reftable = NULL;
}

/* Locate refcount entry of @cluster: slice offset and index in it.
 * Returns 0 with *slice_off == 0 when no refcount block covers it. */
static void rc_locate(struct qcow2_state *s, uint64_t cluster, uint64_t *slice_off,
		      uint64_t *index)
{
	uint64_t rt = cluster >> s->rb_bits;
	uint64_t in_block = cluster & ((1ull << s->rb_bits) - 1);

	if (rt >= s->reftable_size || !s->reftable[rt]) {
		*slice_off = 0;
		return;
	}
	*slice_off = s->reftable[rt] + (in_block >> s->rb_slice_bits) * s->rbc.slice_size;
	*index = in_block & ((1ull << s->rb_slice_bits) - 1);
}

int qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster, uint64_t *rc)
{
	uint64_t soff, idx;
	void *data;
	int slot, ret;

	rc_locate(s, cluster, &soff, &idx);
	if (!soff) {
		*rc = 0;
		return 0;
	}
	ret = qcow2_cache_get(&s->rbc, soff, false, &slot, &data);
	if (ret < 0)
		return ret;
	*rc = qcow2_rc_get(data, idx, s->refcount_order);
	qcow2_cache_put(&s->rbc, slot);
	return 0;
}

/* The first reserved run starting at or after @cluster (UINT64_MAX if
 * none); with @cluster inside a run, *inside gets that run's end. */
static uint64_t next_reserved(const struct qcow2_state *s, uint64_t cluster, uint64_t *inside)
{
	uint64_t next = UINT64_MAX;

	*inside = 0;
	for (unsigned i = 0; i < s->nreserved; i++) {
		const struct qcow2_reserved *r = &s->reserved[i];
		if (cluster >= r->first && cluster - r->first < r->n)
			*inside = r->first + r->n;
		else if (r->first > cluster)
			next = MIN(next, r->first);
	}
	return next;
}

/* Find @n contiguous clusters with refcount 0 that no allocation in
 * progress has reserved, without taking them.  The search starts at the
 * hint and moves it past the run it returns, as QEMU does: holes too
 * small for this request stay behind it until a free lowers it again.
 * Refcounts are read a slice at a time. */
static int alloc_noref(struct qcow2_state *s, uint64_t n, uint64_t *first)
{
	uint64_t i = s->free_hint, start = i, run = 0;
	uint64_t limit = QCOW2_MAX_HOST_OFFSET >> s->cluster_bits;
	uint64_t slice_n = 1ull << s->rb_slice_bits;

	while (run < n) {
		uint64_t inside, stop, soff, idx;
		uint8_t *data;
		int slot, ret;

		if (i >= limit || limit - i < n - run) {
			log_error("%s: image file would exceed the qcow2 host offset limit",
				  s->bs->filename);
			return -EFBIG;
		}
		stop = next_reserved(s, i, &inside);
		if (inside) {
			i = start = inside;
			run = 0;
			continue;
		}
		rc_locate(s, i, &soff, &idx);
		/* Scan to the end of this refcount slice (or block range). */
		stop = MIN(stop, ALIGN_DOWN(i, slice_n) + slice_n);
		if (!soff) {
			/* No refcount block yet: all free. */
			uint64_t take = MIN(stop - i, n - run);
			i += take;
			run += take;
			continue;
		}
		ret = qcow2_cache_get(&s->rbc, soff, false, &slot, (void **)&data);
		if (ret < 0)
			return ret;
		for (; i < stop && run < n; i++, idx++) {
			if (qcow2_rc_get(data, idx, s->refcount_order)) {
				start = i + 1;
				run = 0;
			} else {
				run++;
			}
		}
		qcow2_cache_put(&s->rbc, slot);
	}
	*first = start;
	s->free_hint = start + n;
	return 0;
}

static int grow_reftable(struct qcow2_state *s, uint64_t need);

/* Write the 8-byte table entry @v (refcount table: @kind REFTABLE, L1:
 * ACTIVE_L1) at @off and sync. */
int qcow2_write_entry_sync(struct qcow2_state *s, enum qcow2_site site, uint64_t off, uint64_t v)
{
	uint8_t be[8];
	int ret;

	put_be64(be, v);
	ret = qcow2_pwrite_meta(s, site, be, 8, off);
	if (ret == 0)
		ret = qcow2_sync(s);
	return ret;
}

static int update_refcount(struct qcow2_state *s, uint64_t cluster, int addend);

/* Make sure a refcount block covers refcount table index @rt. */
static int ensure_refblock(struct qcow2_state *s, uint64_t rt)
{
	uint64_t b, boff;
	void *data;
	int slot, ret;

	if (rt >= s->reftable_size) {
		ret = grow_reftable(s, rt);
		if (ret < 0)
			return ret;
	}
	if (s->reftable[rt])
		return 0;

	ret = alloc_noref(s, 1, &b);
	if (ret < 0)
		return ret;
	boff = b << s->cluster_bits;
	if (rt >= s->reftable_size)
		return -EIO;
	ret = qcow2_reserve(s, b, 1);
	if (ret < 0)
		return ret;
	if ((b >> s->rb_bits) != rt) {
		/* The block lands outside its own range: count it there (this
		 * may add a block for that range, or grow the table). */
		ret = update_refcount(s, b, 1);
		if (ret < 0)
			goto out;
		if (s->reftable[rt]) {
			/* A nested allocation covered @rt already. */
			ret = qcow2_free_deferred(s, boff, s->cluster_size);
			goto out;
		}
	}
	ret = qcow2_check_write(s, QCOW2_OL_NEW, boff, s->cluster_size);
	if (ret == 0)
		ret = qcow2_meta_add(s, boff, s->cluster_size, QCOW2_OL_REFBLOCK);
	if (ret < 0)
		goto out;
	qcow2_cache_invalidate(&s->rbc, boff, s->cluster_size);
	ret = qcow2_zero_host(s, QCOW2_W_REFBLOCK_ALLOC, boff, s->cluster_size);
	if (ret < 0)
		goto out_meta;
	qcow2_set_file_end(s, boff + s->cluster_size);
	if ((b >> s->rb_bits) == rt) {
		/* Self-describing block: it holds its own refcount. */
		uint64_t in_block = b & ((1ull << s->rb_bits) - 1);
		uint64_t soff = boff + (in_block >> s->rb_slice_bits) * s->rbc.slice_size;
		ret = qcow2_cache_get(&s->rbc, soff, true, &slot, &data);
		if (ret < 0)
			goto out_meta;
		qcow2_rc_set(data, in_block & ((1ull << s->rb_slice_bits) - 1), s->refcount_order, 1);
		qcow2_cache_mark_dirty(&s->rbc, slot);
		qcow2_cache_put(&s->rbc, slot);
	}
	/* Block contents and refcounts durable before the table points at it. */
	ret = qcow2_cache_writeback(&s->rbc);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret == 0)
		ret = qcow2_write_entry_sync(s, QCOW2_W_REFTABLE_UPDATE, s->reftable_offset + rt * 8, boff);
	if (ret < 0) {
		log_error("%s: adding a refcount block: %s", s->bs->filename, strerror(-ret));
		goto out_meta;
	}
	s->reftable[rt] = boff;
	goto out;
out_meta:
	/* Never pointed at: an ordinary (leaked) cluster again. */
	qcow2_meta_del(s, boff, s->cluster_size, QCOW2_OL_REFBLOCK);
out:
	qcow2_unreserve(s, b);
	return ret;
}

static int update_refcount_v(struct qcow2_state *s, uint64_t cluster, int addend, uint64_t *newv);

static int update_refcount(struct qcow2_state *s, uint64_t cluster, int addend)
{
	uint64_t v;

	return update_refcount_v(s, cluster, addend, &v);
}

/* The same, with the new refcount in *newv. */
static int update_refcount_v(struct qcow2_state *s, uint64_t cluster, int addend, uint64_t *newv)
{
	uint64_t rt = cluster >> s->rb_bits, soff, idx, v;
	void *data;
	int slot, ret;

	if (addend > 0) {
		ret = ensure_refblock(s, rt);
		if (ret < 0)
			return ret;
	}
	rc_locate(s, cluster, &soff, &idx);
	if (!soff) {
		log_error("%s: refcount underflow at cluster %llu (no refcount block)",
			  s->bs->filename, (unsigned long long)cluster);
		return -EIO;
	}
	/* Decide before writing: the block must be nothing but a block. */
	ret = qcow2_check_write(s, QCOW2_OL_REFBLOCK, soff, s->rbc.slice_size);
	if (ret < 0)
		return ret;
	ret = qcow2_cache_get(&s->rbc, soff, false, &slot, &data);
	if (ret < 0)
		return ret;
	v = qcow2_rc_get(data, idx, s->refcount_order);
	if (addend < 0 && v == 0) {
		qcow2_cache_put(&s->rbc, slot);
		log_error("%s: refcount underflow at cluster %llu", s->bs->filename,
			  (unsigned long long)cluster);
		return -EIO;
	}
	if (addend > 0 && v >= s->refcount_max) {
		qcow2_cache_put(&s->rbc, slot);
		log_error("%s: refcount overflow at cluster %llu", s->bs->filename,
			  (unsigned long long)cluster);
		return -ERANGE;
	}
	v = addend > 0 ? v + 1 : v - 1;
	qcow2_rc_set(data, idx, s->refcount_order, v);
	qcow2_cache_mark_dirty(&s->rbc, slot);
	qcow2_cache_put(&s->rbc, slot);
	*newv = v;
	if (v == 0) {
		/* Free space now: whatever it held is gone. */
		qcow2_meta_del(s, cluster << s->cluster_bits, s->cluster_size, QCOW2_OL_ALL);
		if ((s->cbytes_next >> s->cluster_bits) == cluster)
			s->cbytes_next = 0;
		if (cluster < s->free_hint)
			s->free_hint = cluster;
	}
	return 0;
}

int qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n, uint64_t *off)
{
	uint64_t first, i;
	int ret;

	ret = alloc_noref(s, n, &first);
	if (ret < 0)
		return ret;
	/* Free clusters hold no metadata, unless refcounts lie. */
	ret = qcow2_check_write(s, QCOW2_OL_NEW, first << s->cluster_bits, n << s->cluster_bits);
	if (ret < 0)
		return ret;
	/* Nested allocations (refcount blocks, table growth) keep out. */
	ret = qcow2_reserve(s, first, n);
	if (ret < 0)
		return ret;
	for (i = 0; i < n; i++) {
		ret = update_refcount(s, first + i, 1);
		if (ret < 0)
			break;
	}
	qcow2_unreserve(s, first);
	if (ret < 0) {
		while (i--)
			update_refcount(s, first + i, -1);
		return ret;
	}
	*off = first << s->cluster_bits;
	qcow2_set_file_end(s, (first + n) << s->cluster_bits);
	return 0;
}

int qcow2_alloc_bytes(struct qcow2_state *s, uint64_t size, uint64_t *off)
{
	uint64_t cs = s->cluster_size, o = s->cbytes_next, in = o & (cs - 1);
	int ret;

	if (!size || size >= cs)
		return -EINVAL;
	if (o && in && in + size <= cs) {
		/* The cluster the previous compressed data ended in: one more
		 * reference to it. */
		ret = update_refcount(s, o >> s->cluster_bits, 1);
	} else {
		ret = qcow2_alloc_clusters(s, 1, &o);
	}
	if (ret < 0)
		return ret;
	*off = o;
	s->cbytes_next = o + size;
	return 0;
}

int qcow2_free_deferred(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	uint64_t first = off >> s->cluster_bits;
	uint64_t nb = ((off + len - 1) >> s->cluster_bits) - first + 1;
	struct qcow2_pending_free *last;
	int ret;

	if (!len)
		return 0;
	if (s->npending) {
		last = &s->pending[s->npending - 1];
		if (last->cluster + last->nb == first) {
			last->nb += nb;
			last->l2_seq = s->l2c.seq;
			return 0;
		}
	}
	if (s->npending == QCOW2_PENDING_MAX) {
		ret = qcow2_flush_locked(s);
		if (ret < 0)
			return ret;
	}
	if (s->npending == QCOW2_PENDING_MAX) {
		/* Every one waits for an L2 write in flight (write-through). */
		log_error("%s: too many deferred frees: %llu clusters at %#llx leak until "
			  "'qublk check -r leaks'", s->bs->filename, (unsigned long long)nb,
			  (unsigned long long)off);
		return 0;
	}
	s->pending[s->npending].cluster = first;
	s->pending[s->npending].nb = nb;
	s->pending[s->npending].l2_seq = s->l2c.seq;
	s->npending++;
	return 0;
}

int qcow2_free_l2_entry(struct qcow2_state *s, uint64_t l2e)
{
	enum qcow2_ctype t;
	uint64_t off, len;
	int ret = qcow2_l2_entry_type(s, l2e, &t);

	if (ret < 0)
		return ret;
	switch (t) {
	case QCOW2_NORMAL:
	case QCOW2_ZERO_ALLOC:
		/* Data file clusters have no refcounts. */
		if (s->data_file)
			return 0;
		return qcow2_free_deferred(s, l2e & QCOW2_L2E_OFFSET_MASK, s->cluster_size);
	case QCOW2_COMPRESSED:
		ret = qcow2_compressed_range(s, l2e, &off, &len);
		if (ret < 0)
			return ret;
		return qcow2_free_deferred(s, off, len);
	default:
		return 0;
	}
}

/* Clusters past the end of the file are written by writes that extend
 * it, which a file system may serialize and journal one by one (ext4
 * with O_DIRECT: the inode lock, an orphan entry and an i_size update per
 * write, ten times the cost of filling a hole in the VM benchmark).  So
 * the file grows ahead of the allocations, sparse, by an eighth of its
 * size (1 MiB to 64 MiB), and is cut back to them at close.  What lies
 * between reads as zeros, like what lies past the end of the file, so
 * clusters there are still fresh (rw.c); after a crash the next open
 * counts it in file_end: a hole at the tail, no leak. */
void qcow2_set_file_end(struct qcow2_state *s, uint64_t end)
{
	if (end <= s->file_end)
		return;
	s->file_end = end;
	if (end <= s->file_size || !s->grow_ahead)
		return;
	uint64_t step = MIN(MAX(end / 8, 1ull << 20), 64ull << 20);
	uint64_t size = ALIGN_UP(end + step, (uint64_t)s->cluster_size);
	int ret = io_truncate(s->file, size);
	if (ret == 0) {
		s->file_size = size;
		return;
	}
	log_debug("%s: growing the file ahead to %llu: %s", s->bs->filename,
		  (unsigned long long)size, strerror(-ret));
	s->grow_ahead = false;
}

int qcow2_trim_file(struct qcow2_state *s)
{
	if (s->file_size <= s->file_end)
		return 0;
	int ret = io_truncate(s->file, s->file_end);
	if (ret < 0) {
		log_warn("%s: cutting the file back to %llu bytes: %s (an unused tail stays)",
			 s->bs->filename, (unsigned long long)s->file_end, strerror(-ret));
		return 0;
	}
	s->file_size = s->file_end;
	return qcow2_sync(s);
}

/* Give host clusters [first, first+n), free now, back to the host file
 * system (thin provisioning): punch them out, or cut the file when they
 * are its tail.  Only clusters whose last reference is gone from the
 * disk get here (apply_pending), under the lock, so no allocation can
 * take them in between; a crash after it leaves a leak at most.  A file
 * system that cannot punch is left alone (the space stays allocated). */
static void give_back(struct qcow2_state *s, uint64_t first, uint64_t n)
{
	uint64_t off = first << s->cluster_bits, len = n << s->cluster_bits;
	int ret;

	if (!s->punch || !n)
		return;
	if (off + len >= s->file_end) {
		ret = io_truncate(s->file, off);
		if (ret == 0) {
			s->file_end = s->file_size = off;
			return;
		}
	}
	ret = io_fallocate(s->file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
	if (ret == -EOPNOTSUPP || ret == -ENOSYS || ret == -EINVAL) {
		log_info("%s: the file system cannot punch holes: freed clusters keep their space",
			 s->bs->filename);
		s->punch = false;
	} else if (ret < 0) {
		log_warn("%s: punching out freed clusters at %#llx: %s", s->bs->filename,
			 (unsigned long long)off, strerror(-ret));
	}
}

/* Apply the deferred decrements whose references are gone on disk: those
 * freed by L2 changes numbered below @below (all written and synced), and
 * give clusters that are free now back to the host file system.  The
 * others (write-through copies still in flight) wait for the next flush. */
static int apply_pending(struct qcow2_state *s, uint64_t below)
{
	uint64_t run = 0, nrun = 0, v;
	unsigned kept = 0;
	int ret = 0;

	if (!s->npending)
		return 0;
	/* Let data I/O that looked up the old mappings finish first. */
	qcow2_io_drain(s);
	/* Work on a stable count: a decrement cannot queue new frees. */
	for (unsigned i = 0; i < s->npending && ret == 0; i++) {
		if (s->pending[i].l2_seq >= below) {
			s->pending[kept++] = s->pending[i];
			continue;
		}
		for (uint64_t c = 0; c < s->pending[i].nb && ret == 0; c++) {
			uint64_t cl = s->pending[i].cluster + c;
			ret = update_refcount_v(s, cl, -1, &v);
			if (ret < 0 || v)
				continue;
			if (nrun && run + nrun == cl) {
				nrun++;
				continue;
			}
			give_back(s, run, nrun);
			run = cl;
			nrun = 1;
		}
	}
	give_back(s, run, nrun);
	s->npending = kept;
	if (ret < 0)
		log_error("%s: applying deferred refcount decrements: %s (clusters leak)",
			  s->bs->filename, strerror(-ret));
	return ret;
}

int qcow2_sync(struct qcow2_state *s)
{
	int ret = qcow2_inject(s, QCOW2_W_FLUSH);

	if (ret < 0)
		io_poison(s->file, ret);
	else
		ret = io_flush(s->file);

	qcow2_cache_synced(&s->rbc, ret == 0);
	qcow2_cache_synced(&s->l2c, ret == 0);
	return ret;
}

int qcow2_write_through(struct qcow2_state *s)
{
	if (!s->write_through)
		return 0;
	/* The L2 cache's barrier marks the image dirty first (lazy); the
	 * refcounts are rebuilt from the L2 tables if the daemon dies. */
	return qcow2_cache_write_through(&s->l2c);
}

int qcow2_mark_dirty(struct qcow2_state *s)
{
	int ret;

	if (s->meta.h.incompat & QCOW2_INCOMPAT_DIRTY)
		return 0;
	s->meta.h.incompat |= QCOW2_INCOMPAT_DIRTY;
	ret = qcow2_write_header(s);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0) {
		/* Not known to be on disk: nothing may depend on it. */
		s->meta.h.incompat &= ~QCOW2_INCOMPAT_DIRTY;
		log_error("%s: marking the image dirty: %s", s->bs->filename, strerror(-ret));
	}
	return ret;
}

int qcow2_mark_clean(struct qcow2_state *s)
{
	int ret;

	if (!(s->meta.h.incompat & QCOW2_INCOMPAT_DIRTY))
		return 0;
	/* Everything the refcounts describe is on disk (the caller flushed). */
	s->meta.h.incompat &= ~QCOW2_INCOMPAT_DIRTY;
	ret = qcow2_write_header(s);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0)
		s->meta.h.incompat |= QCOW2_INCOMPAT_DIRTY;
	return ret;
}

int qcow2_flush_locked(struct qcow2_state *s)
{
	uint64_t below;
	int ret;

	if (s->read_only)
		return 0;
	if (s->corrupt)
		return -EIO;
	/* Phase 1+2: refcounts, sync, L2 slices (cache.c orders them; with
	 * lazy refcounts the L2 slices do not wait for the refcounts). */
	ret = qcow2_cache_has_dirty(&s->l2c) ? qcow2_cache_writeback(&s->l2c) : 0;
	if (ret == 0)
		ret = qcow2_cache_writeback(&s->rbc);
	below = qcow2_cache_written_below(&s->l2c);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0)
		return ret;
	/* The references those pending frees drop are now gone on disk. */
	return apply_pending(s, below);
}

/*
 * Refcount table growth to cover index @need.  New refcount blocks for
 * the new area and the new table go to clusters past everything the old
 * table covers and past every reserved run (an allocation in progress
 * may be what needs the growth), laid out as [blocks][table]: all free.
 */
static int grow_reftable(struct qcow2_state *s, uint64_t need)
{
	const char *fn = s->bs->filename;
	uint64_t cs = s->cluster_size, E = 1ull << s->rb_bits;
	uint64_t A = MAX((uint64_t)s->reftable_size * E, qcow2_reserved_end(s));
	uint64_t N = MAX(need + 1, (uint64_t)s->reftable_size + s->reftable_size / 2 + 1);
	uint64_t rtc, nb, total, fb, lb, toff;
	uint64_t old_off = s->reftable_offset, old_clusters = s->reftable_clusters;
	uint8_t *tbl = NULL, *blk = NULL;
	uint64_t *newrt;
	int ret;

	for (;;) {
		rtc = DIV_ROUND_UP(N * 8, cs);
		nb = 0;
		for (;;) {
			total = nb + rtc;
			fb = A >> s->rb_bits;
			lb = (A + total - 1) >> s->rb_bits;
			if (lb - fb + 1 == nb)
				break;
			nb = lb - fb + 1;
		}
		if (lb < N)
			break;
		N = lb + 1;
	}
	N = rtc * cs / 8;
	if (N * 8 > QCOW2_MAX_REFTABLE_SIZE || ((A + total) << s->cluster_bits) >= QCOW2_MAX_HOST_OFFSET) {
		log_error("%s: refcount table cannot grow further", fn);
		return -EFBIG;
	}
	toff = (A + nb) << s->cluster_bits;
	ret = qcow2_check_write(s, QCOW2_OL_NEW, A << s->cluster_bits, total << s->cluster_bits);
	if (ret < 0)
		return ret;
	tbl = io_zalloc(rtc * cs);
	blk = io_alloc(cs);
	newrt = calloc(N, 8);
	if (!tbl || !blk || !newrt) {
		ret = -ENOMEM;
		goto out;
	}
	ret = qcow2_meta_add(s, A << s->cluster_bits, nb * cs, QCOW2_OL_REFBLOCK);
	if (ret == 0)
		ret = qcow2_meta_add(s, toff, rtc * cs, QCOW2_OL_REFTABLE);
	if (ret < 0)
		goto out_meta;
	for (uint64_t i = 0; i < s->reftable_size; i++) {
		newrt[i] = s->reftable[i];
		put_be64(tbl + 8 * i, s->reftable[i]);
	}
	for (uint64_t j = 0; j < nb; j++) {
		uint64_t bi = fb + j, boff = (A + j) << s->cluster_bits;
		memset(blk, 0, cs);
		for (uint64_t c = A; c < A + total; c++)
			if ((c >> s->rb_bits) == bi)
				qcow2_rc_set(blk, c & (E - 1), s->refcount_order, 1);
		ret = qcow2_pwrite_meta(s, QCOW2_W_REFTABLE_GROW_BLOCKS, blk, cs, boff);
		if (ret < 0)
			goto out_io;
		newrt[bi] = boff;
		put_be64(tbl + 8 * bi, boff);
	}
	ret = qcow2_pwrite_meta(s, QCOW2_W_REFTABLE_GROW, tbl, rtc * cs, toff);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0)
		goto out_io;
	s->meta.h.reftable_offset = toff;
	s->meta.h.reftable_clusters = (uint32_t)rtc;
	ret = qcow2_write_header(s);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0) {
		s->meta.h.reftable_offset = old_off;
		s->meta.h.reftable_clusters = (uint32_t)old_clusters;
		goto out_io;
	}
	qcow2_cache_invalidate(&s->rbc, A << s->cluster_bits, total << s->cluster_bits);
	qcow2_cache_invalidate(&s->l2c, A << s->cluster_bits, total << s->cluster_bits);
	free(s->reftable);
	s->reftable = newrt;
	newrt = NULL;
	s->reftable_size = (uint32_t)N;
	s->reftable_offset = toff;
	s->reftable_clusters = (uint32_t)rtc;
	qcow2_meta_del(s, old_off, old_clusters * cs, QCOW2_OL_REFTABLE);
	if (s->free_hint >= A)
		s->free_hint = A + total;
	qcow2_set_file_end(s, (A + total) << s->cluster_bits);
	ret = qcow2_free_deferred(s, old_off, old_clusters * cs);
	goto out;
out_io:
	log_error("%s: growing the refcount table: %s", fn, strerror(-ret));
out_meta:
	qcow2_meta_del(s, A << s->cluster_bits, total * cs, QCOW2_OL_REFBLOCK | QCOW2_OL_REFTABLE);
out:
	free(newrt);
	io_free(tbl);
	io_free(blk);
	return ret;
}
