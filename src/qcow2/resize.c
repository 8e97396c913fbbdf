/* SPDX-License-Identifier: MIT */
/*
 * Changing the virtual size of a qcow2 image: the co_truncate op, as
 * QEMU's qcow2_co_truncate does it without preallocation ("Header" size
 * and l1_size, "Cluster mapping" in qcow2.rst).
 *
 * Grow:
 *  1. L1 growth, when the new size needs more L1 entries (one per L2
 *     table's worth of guest bytes): a table of exactly that many entries
 *     in newly allocated contiguous clusters (refcount-table growth may
 *     happen there, refcount.c), their refcounts written and synced; the
 *     entries copied, the rest zeros, written and synced; then the
 *     header's l1_size and l1_table_offset switched in one 12-byte write
 *     of the adjacent fields, synced; then the old table freed (deferred,
 *     rule 4 of refcount.c).  A crash leaks the new table (before the
 *     switch) or the old one (after), nothing else.
 *  2. An external data file is resized with the image; a raw one
 *     (data_file_raw) also gets L2 entries that map the new clusters to
 *     themselves, as QEMU preallocates them.
 *  3. A backing file reaching past the old size would show through the
 *     new range (bdrv.h: it reads as zeros): the rest of the old last
 *     (sub)cluster is written with zeros, then the range the backing
 *     file covers gets zero clusters, as QEMU's BDRV_REQ_ZERO_WRITE
 *     does.  v2 has no zero clusters: refused before anything changes
 *     (QEMU fails half-way, "Failed to zero out new clusters").
 *  4. The metadata of 2-3 flushed, then the header's size field (8
 *     bytes), synced.  Until then the image keeps its old size and the
 *     new tables and entries lie past its end, harmless.
 * Shrink (v2 and v3, as QEMU; the block layer checked that the dropped
 * range holds no data in this image, so it reads as zeros and holds at
 * most zero clusters, L2 tables and clusters a snapshot shares):
 *  1. Every L2 entry of the dropped whole clusters becomes 0 (QEMU's full
 *     discard; a table shared with a snapshot is copied first) and what
 *     it referenced is freed (deferred); then flushed: the entries are on
 *     disk before the decrements are applied.
 *  2. The L1 entries past the new end zeroed on disk, synced; their
 *     (emptied) L2 tables freed.  The L1 table keeps its size and place,
 *     as in QEMU: the header's l1_size does not change.
 *  3. The data file cut; the header's size field, synced.
 * A crash leaves the old size (with some dropped entries already
 * cleared: over a backing file those clusters then read the backing
 * file's data) or the new one, and leaked clusters at worst.
 *
 * Refused with -ENOTSUP, logged: v2 images with internal snapshots (as
 * QEMU: "Can't resize a v2 image which has snapshots"); images with
 * persistent dirty bitmaps (QEMU resizes the bitmaps it could load; the
 * bitmap code here does not resize them).
 *
 * Errors: every step leaves a valid image.  A failed write or sync of a
 * switch poisons the file (ranges.c, refcount.c: no later flush
 * succeeds); the state in memory follows what was written.
 *
 * Thread model: a coroutine of any thread, while requests inside the old
 * size run on others (a live ublk device grows under I/O).  s->resize_lock
 * makes resizes one at a time.  s->lock owns the L1 table, on disk and
 * in memory: every reader of s->l1 holds it, and each step holds it from
 * its decision to its last write, so the table is replaced between two
 * holders and nobody sees it half-switched.  Requests reach a new range
 * only once bs->size has changed, which the block layer does after this
 * returns.  A shrink owns the dropped range (ranges.c) while it empties
 * it, so requests in flight there finish first; one that reached it
 * after, before bs->size changed, could map clusters there again, past
 * the new end (leaked, never corrupt).  Only offline resizes shrink
 * (a live device refuses to: src/ublk/dev.c), so none does.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

/* L1 entries needed for @size guest bytes. */
static uint64_t l1_entries(const struct qcow2_state *s, uint64_t size)
{
	return DIV_ROUND_UP(size, (uint64_t)s->cluster_size << s->l2_bits);
}

/* Lock held.  Write the header bytes [off, off+len) from @site and sync.
 * *@written: the write itself succeeded (what the file now says). */
static int header_write_sync(struct qcow2_state *s, enum qcow2_site site, const void *buf,
			     size_t len, uint64_t off, bool *written)
{
	int ret = qcow2_pwrite_meta(s, site, buf, len, off);

	*written = ret == 0;
	if (ret == 0)
		ret = qcow2_sync(s);
	return ret;
}

/* Lock held.  Step 1 of growing: move the L1 table to @n entries. */
static int grow_l1(struct qcow2_state *s, uint64_t n)
{
	const char *fn = s->bs->filename;
	uint64_t cs = s->cluster_size, bytes = n * 8, nc = DIV_ROUND_UP(bytes, cs);
	uint64_t old_off = s->l1_offset, old_bytes = (uint64_t)s->l1_size * 8, off = 0;
	uint8_t *buf = NULL, hdr[12];
	uint64_t *l1 = NULL;
	bool written;
	int ret;

	if (bytes > QCOW2_MAX_L1_SIZE) {
		log_error("%s: the size needs %llu L1 entries, more than qcow2 allows (%u)", fn,
			  (unsigned long long)n, QCOW2_MAX_L1_SIZE / 8);
		return -EFBIG;
	}
	/* Everything that can fail without I/O first. */
	l1 = calloc(n, 8);
	buf = io_zalloc(nc * cs);
	if (!l1 || !buf) {
		ret = -ENOMEM;
		goto out_log;
	}
	ret = qcow2_alloc_clusters(s, nc, &off);
	if (ret < 0)
		goto out_log;
	ret = qcow2_meta_add(s, off, nc * cs, QCOW2_OL_ACTIVE_L1);
	if (ret < 0)
		goto out_free;
	/* The allocation may have yielded, with the lock held: the entries
	 * are still those of s->l1, and stay so until the switch. */
	memcpy(l1, s->l1, old_bytes);
	for (uint32_t i = 0; i < s->l1_size; i++)
		put_be64(buf + 8 * (size_t)i, s->l1[i]);
	/* Its refcounts, then the table itself, on disk before the header
	 * points at it. */
	ret = qcow2_cache_writeback(&s->rbc);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret == 0)
		ret = qcow2_pwrite_meta(s, QCOW2_W_L1_GROW_WRITE, buf, nc * cs, off);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0)
		goto out_meta;
	/* "l1_size" (4 bytes) and "l1_table_offset" (8) are adjacent: one
	 * write switches both, inside one sector. */
	put_be32(hdr, (uint32_t)n);
	put_be64(hdr + 4, off);
	ret = header_write_sync(s, QCOW2_W_L1_GROW_ACTIVATE, hdr, sizeof(hdr), QCOW2_HDR_L1_SIZE,
				&written);
	if (!written)
		goto out_meta;
	/* The file says so now (a failed sync has poisoned it): switch. */
	s->meta.h.l1_size = (uint32_t)n;
	s->meta.h.l1_offset = off;
	free(s->l1);
	s->l1 = l1;
	l1 = NULL;
	s->l1_size = (uint32_t)n;
	s->l1_offset = off;
	qcow2_meta_del(s, old_off, old_bytes, QCOW2_OL_ACTIVE_L1);
	if (ret == 0)
		ret = qcow2_free_deferred(s, old_off, old_bytes);
	if (ret < 0)
		log_error("%s: switching to the larger L1 table: %s", fn, strerror(-ret));
	goto out;
out_meta:
	qcow2_meta_del(s, off, nc * cs, QCOW2_OL_ACTIVE_L1);
out_free:
	/* Never pointed at: leaked on disk at worst, free again here. */
	qcow2_free_deferred(s, off, nc * cs);
out_log:
	log_error("%s: growing the L1 table to %llu entries: %s", fn, (unsigned long long)n,
		  strerror(-ret));
out:
	free(l1);
	io_free(buf);
	return ret;
}

/* Lock held.  Map guest clusters [start, end) of a raw external data
 * file to themselves (QEMU's metadata preallocation for data_file_raw):
 * the data file holds the guest's bytes there already.  With extended
 * L2 the subclusters stay unallocated, as QEMU's preallocation leaves
 * them (they read as zeros, and so does the data file there). */
static int map_raw(struct qcow2_state *s, uint64_t start, uint64_t end)
{
	uint64_t cs = s->cluster_size;
	int ret = 0;

	for (uint64_t off = ALIGN_UP(start, cs); off < end && ret == 0;) {
		uint64_t slice_end = ALIGN_DOWN(off, cs << s->l2_slice_bits) +
				     (cs << s->l2_slice_bits);
		uint64_t *ents;
		unsigned idx;
		int slot;

		ret = qcow2_l2_slice_for_write(s, off, &slot, &ents, &idx);
		if (ret < 0)
			break;
		for (; off < end && off < slice_end; off += cs, idx++)
			if (!qcow2_l2_get(s, ents, idx))
				qcow2_l2_set(s, ents, idx, off | QCOW2_OFLAG_COPIED, 0);
		qcow2_cache_mark_dirty(&s->l2c, slot);
		qcow2_cache_put(&s->l2c, slot);
	}
	return ret;
}

/* Lock held.  The external data file follows the virtual size, as QEMU
 * resizes it.  One that is not a regular file (a block device) cannot:
 * it must be large enough already. */
static int resize_data_file(struct qcow2_state *s, uint64_t size)
{
	struct stat st;
	uint64_t cur;
	int ret;

	if (s->data_file->fd >= 0 && fstat(s->data_file->fd, &st) == 0 && !S_ISREG(st.st_mode)) {
		ret = io_get_size(s->data_file, &cur);
		if (ret == 0 && cur < size)
			ret = -ENOSPC;
	} else {
		ret = io_truncate(s->data_file, size);
	}
	if (ret < 0)
		log_error("%s: resizing the external data file to %llu bytes: %s",
			  s->bs->filename, (unsigned long long)size, strerror(-ret));
	return ret;
}

/* Lock held.  The last step: the header's size field, synced. */
static int set_size(struct qcow2_state *s, uint64_t size)
{
	uint8_t be[8];
	bool written;
	int ret;

	put_be64(be, size);
	ret = header_write_sync(s, QCOW2_W_HEADER, be, sizeof(be), QCOW2_HDR_SIZE, &written);
	if (written)
		s->meta.h.size = size;
	if (ret < 0)
		log_error("%s: writing the new size into the header: %s", s->bs->filename,
			  strerror(-ret));
	return ret;
}

/* Write zeros to guest bytes [off, off+len) through the normal write
 * path (lock not held). */
static int write_zeros(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	struct iovec v[BDRV_IOV_MAX];
	int ret = 0;

	while (len && ret == 0) {
		uint64_t chunk = 0;
		int n = 0;

		while (n < BDRV_IOV_MAX && chunk < len) {
			v[n].iov_base = (void *)qcow2_zero_page;
			v[n].iov_len = MIN((uint64_t)QCOW2_ZERO_PAGE, len - chunk);
			chunk += v[n++].iov_len;
		}
		ret = qcow2_co_pwritev(s->bs, off, chunk, v, n, 0);
		off += chunk;
		len -= chunk;
	}
	return ret;
}

static int grow(struct qcow2_state *s, uint64_t old, uint64_t size)
{
	const char *fn = s->bs->filename;
	uint64_t n = l1_entries(s, size), sc = s->sc_size, zstart, zend = 0;
	bool meta_changed = false;
	struct qcow2_owner o;
	int ret = 0;

	/* The range a backing file would show through. */
	if (s->backing && s->backing->size > old) {
		if (s->meta.h.version < 3) {
			log_error("%s: growing would show the backing file's data in the new range, "
				  "and a v2 image has no zero clusters to hide it: not supported "
				  "(upgrade it with 'qemu-img amend -o compat=1.1')", fn);
			return -ENOTSUP;
		}
		zend = MIN(size, ALIGN_UP(s->backing->size, (uint64_t)s->cluster_size));
	}

	co_mutex_lock(&s->lock);
	if (n > s->l1_size)
		ret = grow_l1(s, n);
	if (ret == 0 && s->data_file)
		ret = resize_data_file(s, size);
	if (ret == 0 && s->data_raw) {
		ret = map_raw(s, old, size);
		meta_changed = true;
		if (ret < 0)
			log_error("%s: mapping the new range to the raw data file: %s", fn,
				  strerror(-ret));
	}
	co_mutex_unlock(&s->lock);
	if (ret < 0)
		return ret;

	if (zend > old) {
		/* The rest of the old last subcluster (cluster without extended
		 * L2), then zero clusters up to @zend. */
		zstart = MIN(ALIGN_UP(old, sc), zend);
		if (zstart > old)
			ret = write_zeros(s, old, zstart - old);
		co_mutex_lock(&s->lock);
		if (ret == 0 && zend > zstart) {
			qcow2_own_guest(s, &o, zstart, zend);
			ret = qcow2_zero_clusters_locked(s, zstart, zend, size);
			qcow2_disown_guest(s, &o);
			meta_changed = true;
		}
		co_mutex_unlock(&s->lock);
		if (ret < 0) {
			log_error("%s: zeroing the new range over the backing file: %s", fn,
				  strerror(-ret));
			return ret;
		}
	}

	co_mutex_lock(&s->lock);
	/* What maps the new range, on disk before the size that exposes it. */
	if (meta_changed) {
		ret = qcow2_flush_locked(s);
		if (ret < 0)
			log_error("%s: flushing the new range's metadata: %s", fn, strerror(-ret));
	}
	if (ret == 0)
		ret = set_size(s, size);
	co_mutex_unlock(&s->lock);
	return ret;
}

/* Lock held, [start, end) owned.  Step 1 of shrinking: every L2 entry
 * of the whole clusters from @start (cluster aligned) to @end (the old
 * size) becomes 0, what it referenced freed (deferred).  Slices with
 * nothing to clear are left alone (no copy of a shared table). */
static int drop_entries(struct qcow2_state *s, uint64_t start, uint64_t end)
{
	uint64_t cs = s->cluster_size, slice_bytes = cs << s->l2_slice_bits;
	int ret = 0;

	for (uint64_t off = start; off < end && ret == 0;) {
		uint64_t stop = MIN(end, ALIGN_DOWN(off, slice_bytes) + slice_bytes);
		unsigned n = (unsigned)DIV_ROUND_UP(stop - off, cs), idx;
		bool any = false;
		uint64_t *ents;
		int slot;

		ret = qcow2_l2_slice_for_read(s, off, &slot, &ents, &idx);
		if (ret < 0 || slot < 0) {
			off = stop;
			continue;
		}
		for (unsigned i = 0; i < n && !any; i++)
			any = qcow2_l2_get(s, ents, idx + i) || qcow2_l2_bitmap(s, ents, idx + i);
		qcow2_cache_put(&s->l2c, slot);
		if (any)
			ret = qcow2_l2_slice_for_write(s, off, &slot, &ents, &idx);
		if (!any || ret < 0) {
			off = stop;
			continue;
		}
		/* Dirty before the first free: a free may flush (a full pending
		 * list), and the decrements it applies need the cleared entries
		 * written first.  Each entry is validated (a bad one fails, and
		 * stays) and its free queued before it is cleared. */
		qcow2_cache_mark_dirty(&s->l2c, slot);
		for (unsigned i = 0; i < n && ret == 0; i++) {
			ret = qcow2_free_l2_entry(s, qcow2_l2_get(s, ents, idx + i));
			if (ret == 0)
				qcow2_l2_set(s, ents, idx + i, 0, 0);
		}
		qcow2_cache_mark_dirty(&s->l2c, slot);
		qcow2_cache_put(&s->l2c, slot);
		off = stop;
	}
	return ret;
}

/* Lock held.  Step 2 of shrinking: L1 entries from @n on are zeroed on
 * disk (synced), then their tables, emptied and written by step 1,
 * freed.  QEMU's qcow2_shrink_l1_table. */
static int shrink_l1(struct qcow2_state *s, uint64_t n)
{
	uint64_t cs = s->cluster_size, off = s->l1_offset + n * 8;
	uint64_t len = ((uint64_t)s->l1_size - n) * 8;
	bool any = false;
	int ret = 0;

	for (uint64_t i = n; i < s->l1_size && !any; i++)
		any = s->l1[i] != 0;
	if (!any)
		return 0;
	while (len && ret == 0) {
		uint64_t chunk = MIN(len, (uint64_t)QCOW2_ZERO_PAGE);
		ret = qcow2_pwrite_meta(s, QCOW2_W_L1_SHRINK_WRITE, qcow2_zero_page, chunk, off);
		off += chunk;
		len -= chunk;
	}
	if (ret == 0)
		ret = qcow2_sync(s);
	/* Zeroed in memory whatever happened, as QEMU does: after a failed
	 * write the disk may hold either, and both map the same (nothing;
	 * the tables are empty).  The tables are freed only once no entry on
	 * disk can point at them any more. */
	for (uint64_t i = n; i < s->l1_size; i++) {
		uint64_t t = s->l1[i] & QCOW2_L1E_OFFSET_MASK;

		s->l1[i] = 0;
		if (!t || ret < 0)
			continue;
		/* A table a snapshot still uses stays its inactive L2. */
		qcow2_meta_del(s, t, cs, QCOW2_OL_ACTIVE_L2);
		qcow2_cache_invalidate(&s->l2c, t, cs);
		ret = qcow2_free_deferred(s, t, cs);
	}
	return ret;
}

static int shrink(struct qcow2_state *s, uint64_t old, uint64_t size)
{
	const char *fn = s->bs->filename;
	uint64_t cs = s->cluster_size, start = ALIGN_UP(size, cs);
	struct qcow2_owner o;
	int ret = 0;

	co_mutex_lock(&s->lock);
	/* Nobody changes the dropped mappings meanwhile (requests there
	 * still pass the block layer's check until bs->size changes). */
	qcow2_own_guest(s, &o, ALIGN_DOWN(size, cs), ALIGN_UP(old, cs));
	if (start < old) {
		ret = drop_entries(s, start, old);
		/* Entries on disk, then the decrements they allow. */
		if (ret == 0)
			ret = qcow2_flush_locked(s);
		if (ret < 0)
			log_error("%s: discarding the clusters past %llu bytes: %s", fn,
				  (unsigned long long)size, strerror(-ret));
	}
	if (ret == 0) {
		ret = shrink_l1(s, l1_entries(s, size));
		if (ret < 0)
			log_error("%s: dropping the L2 tables past %llu bytes: %s", fn,
				  (unsigned long long)size, strerror(-ret));
	}
	if (ret == 0 && s->data_file)
		ret = resize_data_file(s, size);
	if (ret == 0)
		ret = set_size(s, size);
	qcow2_disown_guest(s, &o);
	co_mutex_unlock(&s->lock);
	return ret;
}

/* What QEMU refuses too (or would fail half-way on), before anything
 * changes.  Returns 0 or -ENOTSUP (logged). */
static int refuse(struct qcow2_state *s)
{
	const struct qcow2_header *h = &s->meta.h;
	const char *fn = s->bs->filename;
	uint64_t dir_off, dir_size;
	uint32_t nb = 0;

	if (h->nb_snapshots && h->version < 3) {
		/* A v2 snapshot need not record its disk size. */
		log_error("%s: Can't resize a v2 image which has snapshots", fn);
		return -ENOTSUP;
	}
	if (s->ndbms || ((h->autoclear & QCOW2_AUTOCLEAR_BITMAPS) &&
			 qcow2_bitmap_ext(&s->meta, &nb, &dir_off, &dir_size) > 0 && nb)) {
		log_error("%s: the image has persistent dirty bitmaps, which qublk cannot resize "
			  "with it: resize it with 'qemu-img resize', or remove them first "
			  "('qemu-img bitmap --remove')", fn);
		return -ENOTSUP;
	}
	return 0;
}

int qcow2_co_truncate(struct bdrv *bs, uint64_t size)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t old;
	int ret;

	co_mutex_lock(&s->resize_lock);
	co_mutex_lock(&s->lock);
	/* After the wait: the size as the file has it now. */
	old = s->meta.h.size;
	if (s->corrupt) {
		log_error("%s: the image is marked corrupt: not resized", bs->filename);
		ret = -EIO;
	} else {
		ret = refuse(s);
	}
	co_mutex_unlock(&s->lock);
	if (ret == 0 && size > old)
		ret = grow(s, old, size);
	else if (ret == 0 && size < old)
		ret = shrink(s, old, size);
	if (ret == 0) {
		co_mutex_lock(&s->lock);
		ret = qcow2_write_through(s);
		co_mutex_unlock(&s->lock);
	}
	co_mutex_unlock(&s->resize_lock);
	if (ret == 0)
		log_debug("%s: resized from %llu to %llu bytes", bs->filename,
			  (unsigned long long)old, (unsigned long long)size);
	return ret;
}
