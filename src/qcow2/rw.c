/* SPDX-License-Identifier: MIT */
/*
 * qcow2 request paths: read, write (in place or allocating with
 * copy-on-write), write_zeroes, discard, flush.
 *
 * Each request walks the guest range in runs of same-type clusters.  The
 * metadata lookup and updates run under s->lock; guest data I/O does not.
 *
 * Mapping changes are serialised per guest cluster (ranges.c, QEMU's
 * handle_dependencies made general): an allocating write (with its COW),
 * a write-zeroes and a discard each own the guest clusters whose L2
 * entries they change, from the decision to the L2 update.  Whoever had
 * to wait decides again afterwards.  A write whose range only overlaps an
 * owner further on is shortened to stop before it.  Writes into clusters
 * of our own (COPIED) change no mapping and own nothing.
 *
 * Every host range a request writes is checked under the lock by the
 * range authority before the write (qcow2_check_write): guest data never
 * lands on metadata, whatever the L2 entries say.
 *
 * Data I/O that looked up a host cluster counts itself in the current
 * host I/O epoch until done; deferred frees wait for the epoch to drain
 * (refcount.c), so a cluster freed by a racing discard is never reused
 * under an in-flight read or write.
 *
 * Crash ordering is described at the top of refcount.c: here it means data
 * and COW are written before the L2 entry changes in the cache, and freed
 * clusters go through qcow2_free_deferred().
 *
 * Hot path allocates nothing: bounce buffers (4 clusters: head and tail
 * COW images, compressed input) come from a bounded pool.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

/* ---- helpers ---------------------------------------------------------- */

int qcow2_bounce_init(struct qcow2_state *s)
{
	s->bounce_size = 4 * (size_t)s->cluster_size;
	s->bounce_max = (unsigned)MIN(16, MAX(2, (32u << 20) / s->bounce_size));
	s->bounce_free = calloc(s->bounce_max, sizeof(*s->bounce_free));
	if (!s->bounce_free)
		return -ENOMEM;
	for (unsigned i = 0; i < 2; i++) {
		uint8_t *b = io_alloc(s->bounce_size);
		if (!b)
			return -ENOMEM;
		s->bounce_free[s->nbounce_free++] = b;
		s->nbounce++;
	}
	return 0;
}

void qcow2_bounce_deinit(struct qcow2_state *s)
{
	if (!s->bounce_free)
		return;
	for (unsigned i = 0; i < s->nbounce_free; i++)
		io_free(s->bounce_free[i]);
	free(s->bounce_free);
	s->bounce_free = NULL;
	s->nbounce_free = s->nbounce = 0;
}

static uint8_t *bounce_get(struct qcow2_state *s)
{
	uint8_t *b;

	spin_lock(&s->spin);
	while (!s->nbounce_free) {
		if (s->nbounce < s->bounce_max) {
			s->nbounce++;
			spin_unlock(&s->spin);
			b = io_alloc(s->bounce_size);
			if (b)
				return b;
			spin_lock(&s->spin);
			s->nbounce--;
		}
		if (!coro_self()) {
			spin_unlock(&s->spin);
			return NULL;
		}
		co_queue_wait_spin(&s->bounce_wait, &s->spin);
		spin_lock(&s->spin);
	}
	b = s->bounce_free[--s->nbounce_free];
	spin_unlock(&s->spin);
	return b;
}

static void bounce_put(struct qcow2_state *s, uint8_t *b)
{
	spin_lock(&s->spin);
	s->bounce_free[s->nbounce_free++] = b;
	co_queue_wake_one(&s->bounce_wait);
	spin_unlock(&s->spin);
}

/* Bytes [guest, guest+len) from the backing file into @iov at @iov_off:
 * the part beyond the backing file's size (or all, without one) reads
 * as zeros. */
static int read_backing(struct qcow2_state *s, uint64_t guest, uint64_t len,
			const struct iovec *iov, int iovcnt, uint64_t iov_off)
{
	struct iovec sl[BDRV_IOV_MAX];
	uint64_t in = 0;
	int n, ret;

	if (s->backing && guest < s->backing->size)
		in = MIN(len, s->backing->size - guest);
	if (in) {
		n = iov_slice(iov, iovcnt, iov_off, in, sl, BDRV_IOV_MAX);
		if (n < 0)
			return n;
		ret = bdrv_co_preadv(s->backing, guest, in, sl, n);
		if (ret < 0)
			return ret;
	}
	if (len > in)
		return iov_memset(iov, iovcnt, iov_off + in, 0, len - in);
	return 0;
}

/* Decompress the cluster described by @l2e into @dst (one cluster);
 * @cbuf holds two clusters of compressed input. */
static int read_compressed(struct qcow2_state *s, uint64_t l2e, uint8_t *dst, uint8_t *cbuf)
{
	uint64_t coff, clen;
	int ret = qcow2_compressed_range(s, l2e, &coff, &clen);

	if (ret < 0)
		return ret;
	clen = MIN(clen, s->file_end - coff);
	if (clen > 2ull * s->cluster_size)
		return -EIO;
	ret = io_pread(s->file, cbuf, clen, coff);
	if (ret < 0)
		return ret;
	ret = qcow2_decompress(s->meta.h.compression_type, cbuf, clen, dst, s->cluster_size);
	if (ret < 0)
		log_error("%s: compressed cluster at %#llx does not decompress",
			  s->bs->filename, (unsigned long long)coff);
	return ret;
}

/* ---- read ------------------------------------------------------------- */

int qcow2_co_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		    const struct iovec *iov, int iovcnt)
{
	struct qcow2_state *s = bs->opaque;
	struct iovec sl[BDRV_IOV_MAX];
	struct qcow2_map m;
	uint64_t done = 0;
	uint8_t *b;
	unsigned e;
	int n, ret = 0;

	while (done < len && ret == 0) {
		co_mutex_lock(&s->lock);
		ret = qcow2_get_mapping(s, off + done, len - done, &m);
		e = qcow2_io_begin(s);
		co_mutex_unlock(&s->lock);
		if (ret < 0) {
			qcow2_io_end(s, e);
			break;
		}
		switch (m.type) {
		case QCOW2_UNALLOCATED:
			ret = read_backing(s, off + done, m.bytes, iov, iovcnt, done);
			break;
		case QCOW2_ZERO_PLAIN:
		case QCOW2_ZERO_ALLOC:
			ret = iov_memset(iov, iovcnt, done, 0, m.bytes);
			break;
		case QCOW2_NORMAL:
			n = iov_slice(iov, iovcnt, done, m.bytes, sl, BDRV_IOV_MAX);
			ret = n < 0 ? n : io_preadv(s->data, sl, n, m.host);
			break;
		case QCOW2_COMPRESSED:
			b = bounce_get(s);
			if (!b) {
				ret = -ENOMEM;
				break;
			}
			ret = read_compressed(s, m.l2e, b, b + 2 * (size_t)s->cluster_size);
			if (ret == 0)
				ret = iov_from_buf(iov, iovcnt, done,
						   b + qcow2_offset_in_cluster(s, off + done),
						   m.bytes);
			bounce_put(s, b);
			break;
		}
		qcow2_io_end(s, e);
		done += m.bytes;
	}
	return ret;
}

/* ---- write ------------------------------------------------------------ */

static bool region_reads_zero(struct qcow2_state *s, const struct qcow2_map *m,
			      uint64_t guest, uint64_t len)
{
	if (!len || m->type == QCOW2_ZERO_PLAIN || m->type == QCOW2_ZERO_ALLOC)
		return true;
	if (m->type == QCOW2_UNALLOCATED)
		return !s->backing || guest >= s->backing->size;
	return false;
}

/* Read bytes [in_off, in_off+len) of guest cluster @cluster (mapped by
 * @m) into @img + in_off, where @img is a cluster-sized image of it. */
static int read_cow_region(struct qcow2_state *s, const struct qcow2_map *m, uint64_t cluster,
			   uint64_t in_off, uint64_t len, uint8_t *img, uint8_t *cbuf)
{
	struct iovec v = { img + in_off, len };
	int ret;

	if (!len)
		return 0;
	ret = qcow2_inject(s, QCOW2_R_COW);
	if (ret < 0)
		return ret;
	switch (m->type) {
	case QCOW2_UNALLOCATED:
		return read_backing(s, cluster + in_off, len, &v, 1, 0);
	case QCOW2_ZERO_PLAIN:
	case QCOW2_ZERO_ALLOC:
		memset(img + in_off, 0, len);
		return 0;
	case QCOW2_NORMAL:
		return io_pread(s->data, img + in_off, len,
				(m->l2e & QCOW2_L2E_OFFSET_MASK) + in_off);
	case QCOW2_COMPRESSED:
		return read_compressed(s, m->l2e, img, cbuf);
	}
	return -EIO;
}

/* Write guest bytes [guest, guest+len) to new host clusters at @host
 * (covering the whole clusters), filling the head and tail of the range
 * from the old contents (@first, @last mappings). */
static int cow_write(struct qcow2_state *s, const struct qcow2_map *first,
		     const struct qcow2_map *last, uint64_t host, uint64_t guest, uint64_t len,
		     const struct iovec *iov, int iovcnt, uint64_t iov_off, bool fresh)
{
	uint64_t cs = s->cluster_size;
	uint64_t c0 = ALIGN_DOWN(guest, cs), cend = ALIGN_UP(guest + len, cs);
	uint64_t head = guest - c0, tail = cend - (guest + len);
	struct iovec v[BDRV_IOV_MAX + 2];
	uint8_t *b = NULL;
	int n = 0, k, ret;

	if ((head || tail) && fresh && region_reads_zero(s, first, c0, head) &&
	    region_reads_zero(s, last, cend - tail, tail)) {
		/* Clusters past everything ever allocated in the file are
		 * holes or beyond its end: they read as zeros already. */
		head = tail = 0;
	}
	if ((head || tail) && region_reads_zero(s, first, c0, head) &&
	    region_reads_zero(s, last, cend - tail, tail) && !s->no_zero_range) {
		/* Cheap zero fill of the whole range, then just the data. */
		ret = qcow2_zero_host(s, QCOW2_W_COW, host, cend - c0);
		if (ret < 0)
			return ret;
		if (!s->no_zero_range)
			head = tail = 0;
	}
	if (head || tail) {
		b = bounce_get(s);
		if (!b)
			return -ENOMEM;
		ret = read_cow_region(s, first, c0, 0, head, b, b + 2 * cs);
		if (ret == 0)
			ret = read_cow_region(s, last, cend - cs, cs - tail, tail, b + cs, b + 2 * cs);
		if (ret < 0)
			goto out;
	}
	if (head) {
		v[n].iov_base = b;
		v[n++].iov_len = head;
	}
	k = iov_slice(iov, iovcnt, iov_off, len, v + n, BDRV_IOV_MAX);
	if (k < 0) {
		ret = k;
		goto out;
	}
	n += k;
	if (tail) {
		v[n].iov_base = b + 2 * cs - tail;
		v[n++].iov_len = tail;
	}
	ret = qcow2_pwritev_data(s, QCOW2_W_COW, v, n, host + (guest - c0) - head);
out:
	if (b)
		bounce_put(s, b);
	return ret;
}

/* Lock held.  Host clusters for guest clusters [c0, c0 + n clusters): new
 * ones in the image file, or with an external data file the guest
 * clusters' own (guest cluster X is data file cluster X, no refcounts). */
static int alloc_data(struct qcow2_state *s, uint64_t c0, uint64_t n, uint64_t *host)
{
	if (s->data_file) {
		*host = c0;
		return 0;
	}
	return qcow2_alloc_clusters(s, n, host);
}

/* Lock held.  Undo alloc_data() after a failure. */
static void unalloc_data(struct qcow2_state *s, uint64_t host, uint64_t len)
{
	if (!s->data_file)
		qcow2_free_deferred(s, host, len);
}

/* Fill guest bytes [guest, guest+len) of @img (a cluster image starting
 * at guest offset @c0) with what a subcluster of type @t reads as:
 * the backing file or zeros. */
static int fill_unwritten(struct qcow2_state *s, enum qcow2_ctype t, uint64_t c0, uint64_t guest,
			  uint64_t len, uint8_t *img)
{
	struct iovec v = { img + (guest - c0), len };

	if (!len)
		return 0;
	if (t == QCOW2_UNALLOCATED)
		return read_backing(s, guest, len, &v, 1, 0);
	memset(v.iov_base, 0, len);
	return 0;
}

/*
 * Extended L2 ("Extended L2 Entries"): a write into one cluster that is
 * not a write into its allocated subclusters of ours (QEMU's handle_alloc
 * with subclusters).  By the cluster's entry:
 *  - OWN: a host cluster of ours (COPIED): the data goes into it and only
 *    the subclusters it touches become allocated;
 *  - FRESH: no host cluster: a new one, the same;
 *  - COPY: compressed or shared (no COPIED): a new host cluster with the
 *    old allocated subclusters (all of a compressed cluster) copied along.
 * A partly written subcluster is completed from what it reads as now (the
 * backing file or zeros).  Called with the lock held and @m looked up
 * under it at @guest; returns with it released.
 */
static int write_subclusters(struct qcow2_state *s, struct qcow2_map *m, uint64_t guest,
			     const struct iovec *iov, int iovcnt, uint64_t iov_off,
			     uint64_t *done_bytes)
{
	enum { OWN, FRESH, COPY } mode;
	uint64_t cs = s->cluster_size, c0 = ALIGN_DOWN(guest, cs);
	uint64_t bytes = MIN(m->bytes, c0 + cs - guest);
	uint64_t hc = m->l2e & QCOW2_L2E_OFFSET_MASK, host, wstart, wend, touched, *ents;
	unsigned sc0, sc1, idx, e;
	struct iovec v[BDRV_IOV_MAX + 2];
	struct qcow2_owner o;
	enum qcow2_ctype ct;
	uint8_t *b = NULL;
	int slot, n, k, ret;

	ret = qcow2_l2_entry_type(s, m->l2e, &ct);
	if (ret < 0) {
		co_mutex_unlock(&s->lock);
		return ret;
	}
	if (ct == QCOW2_COMPRESSED || (ct == QCOW2_NORMAL && !(m->l2e & QCOW2_OFLAG_COPIED)))
		mode = COPY;
	else
		mode = ct == QCOW2_NORMAL ? OWN : FRESH;
	if (mode == OWN) {
		host = hc;
		ret = qcow2_check_write(s, QCOW2_OL_DATA, host, cs);
	} else {
		ret = alloc_data(s, c0, 1, &host);
	}
	if (ret < 0) {
		co_mutex_unlock(&s->lock);
		return ret;
	}
	qcow2_add_owner(s, &o, c0, c0 + cs);
	e = qcow2_io_begin(s);
	co_mutex_unlock(&s->lock);

	/* The touched subclusters [sc0, sc1] and their guest bytes. */
	sc0 = (unsigned)((guest - c0) >> s->sc_bits);
	sc1 = (unsigned)((guest + bytes - 1 - c0) >> s->sc_bits);
	wstart = c0 + ((uint64_t)sc0 << s->sc_bits);
	wend = c0 + ((uint64_t)(sc1 + 1) << s->sc_bits);
	touched = qcow2_sc_alloc_range(sc0, sc1 + 1);

	b = bounce_get(s);
	if (!b) {
		ret = -ENOMEM;
		goto io_done;
	}
	if (mode == COPY) {
		/* The whole new cluster, from the old one and the new data. */
		ret = qcow2_inject(s, QCOW2_R_COW);
		if (ret == 0 && m->type == QCOW2_COMPRESSED)
			ret = read_compressed(s, m->l2e, b, b + 2 * cs);
		else if (ret == 0)
			ret = io_pread(s->data, b, cs, hc);
		/* A partial head or tail subcluster not allocated in the old
		 * cluster reads as the backing file or zeros. */
		if (ret == 0 && m->type != QCOW2_NORMAL && m->type != QCOW2_COMPRESSED) {
			ret = fill_unwritten(s, m->type, c0, wstart, guest - wstart, b);
			if (ret == 0)
				ret = fill_unwritten(s, m->type, c0, guest + bytes,
						     wend - (guest + bytes), b);
		}
		if (ret == 0)
			ret = iov_to_buf(iov, iovcnt, iov_off, b + (guest - c0), bytes);
		if (ret == 0) {
			v[0].iov_base = b;
			v[0].iov_len = cs;
			ret = qcow2_pwritev_data(s, QCOW2_W_COW, v, 1, host);
		}
	} else {
		/* Just the touched subclusters: head fill, data, tail fill. */
		n = 0;
		ret = fill_unwritten(s, m->type, c0, wstart, guest - wstart, b);
		if (ret == 0)
			ret = fill_unwritten(s, m->type, c0, guest + bytes, wend - (guest + bytes), b);
		if (ret < 0)
			goto io_done;
		if (guest > wstart) {
			v[n].iov_base = b + (wstart - c0);
			v[n++].iov_len = guest - wstart;
		}
		k = iov_slice(iov, iovcnt, iov_off, bytes, v + n, BDRV_IOV_MAX);
		if (k < 0) {
			ret = k;
			goto io_done;
		}
		n += k;
		if (wend > guest + bytes) {
			v[n].iov_base = b + (guest + bytes - c0);
			v[n++].iov_len = wend - (guest + bytes);
		}
		ret = qcow2_pwritev_data(s, QCOW2_W_COW, v, n, host + (wstart - c0));
	}
io_done:
	if (b)
		bounce_put(s, b);
	qcow2_io_end(s, e);

	co_mutex_lock(&s->lock);
	if (ret == 0)
		ret = qcow2_l2_slice_for_write(s, c0, &slot, &ents, &idx);
	if (ret == 0) {
		uint64_t old_e = qcow2_l2_get(s, ents, idx), old_b = qcow2_l2_bitmap(s, ents, idx);
		uint64_t new_b;

		if (mode == COPY && m->type == QCOW2_COMPRESSED)
			new_b = qcow2_sc_alloc_range(0, QCOW2_SUBCLUSTERS);
		else
			new_b = (old_b | touched) & ~(touched << 32);
		qcow2_l2_set(s, ents, idx, host | QCOW2_OFLAG_COPIED, new_b);
		qcow2_cache_mark_dirty(&s->l2c, slot);
		qcow2_cache_put(&s->l2c, slot);
		if (mode == COPY)
			ret = qcow2_free_l2_entry(s, old_e);
	} else if (mode != OWN) {
		unalloc_data(s, host, cs);
	}
	if (ret == 0)
		ret = qcow2_write_through(s);
	qcow2_disown_guest(s, &o);
	co_mutex_unlock(&s->lock);
	*done_bytes = bytes;
	return ret;
}

/* One run of the write: returns bytes consumed in *done_bytes. */
static int write_run(struct qcow2_state *s, uint64_t guest, uint64_t max,
		     const struct iovec *iov, int iovcnt, uint64_t iov_off, uint64_t *done_bytes)
{
	uint64_t cs = s->cluster_size, end = guest + max, host, c0, cend, nclusters;
	struct qcow2_map m, last;
	struct qcow2_owner o;
	struct iovec sl[BDRV_IOV_MAX];
	uint64_t *ents;
	unsigned idx, e;
	bool reuse, fresh = false;
	int slot, n, ret;

	co_mutex_lock(&s->lock);
	qcow2_wait_owners(s, guest, &end, true);
	ret = qcow2_get_mapping(s, guest, end - guest, &m);
	if (ret < 0)
		goto out_unlock;

	if (m.type == QCOW2_NORMAL && (m.l2e & QCOW2_OFLAG_COPIED)) {
		/* Our own cluster: overwrite in place, no metadata. */
		ret = qcow2_check_write(s, QCOW2_OL_DATA, m.host, m.bytes);
		if (ret < 0)
			goto out_unlock;
		e = qcow2_io_begin(s);
		co_mutex_unlock(&s->lock);
		n = iov_slice(iov, iovcnt, iov_off, m.bytes, sl, BDRV_IOV_MAX);
		ret = n < 0 ? n : qcow2_pwritev_data(s, QCOW2_W_DATA, sl, n, m.host);
		qcow2_io_end(s, e);
		*done_bytes = m.bytes;
		return ret;
	}

	/* Allocating write over the run's whole clusters.  Its L2 update
	 * must be possible before any cluster is taken or data written. */
	c0 = ALIGN_DOWN(guest, cs);
	ret = qcow2_l2_check_writable(s, c0);
	if (ret < 0)
		goto out_unlock;
	if (s->ext_l2)
		return write_subclusters(s, &m, guest, iov, iovcnt, iov_off, done_bytes);
	cend = ALIGN_UP(guest + m.bytes, cs);
	nclusters = (cend - c0) / cs;
	reuse = m.type == QCOW2_ZERO_ALLOC && (m.l2e & QCOW2_OFLAG_COPIED);
	if (reuse && nclusters > 1) {
		/* Reuse a zeroed cluster of ours, one at a time. */
		cend = c0 + cs;
		nclusters = 1;
		m.bytes = cend - guest;
	}
	last = m;
	if (nclusters > 1) {
		ret = qcow2_get_mapping(s, cend - cs, cs, &last);
		if (ret < 0)
			goto out_unlock;
	}
	if (reuse) {
		host = m.l2e & QCOW2_L2E_OFFSET_MASK;
		ret = qcow2_check_write(s, QCOW2_OL_DATA, host, cs);
		if (ret < 0)
			goto out_unlock;
	} else {
		uint64_t old_end = s->file_end;
		ret = alloc_data(s, c0, nclusters, &host);
		if (ret < 0)
			goto out_unlock;
		/* Clusters at or past the end of everything allocated in the
		 * image file were never written (freed ones at the tail are cut
		 * off): they read as zeros.  Not so in a data file. */
		fresh = !s->data_file && host >= old_end;
	}
	/* The allocation may have yielded with the lock held, but nobody
	 * registers an owner without the lock: ours is still the only one. */
	qcow2_add_owner(s, &o, c0, cend);
	e = qcow2_io_begin(s);
	co_mutex_unlock(&s->lock);

	ret = cow_write(s, &m, &last, host, guest, m.bytes, iov, iovcnt, iov_off, fresh);
	qcow2_io_end(s, e);

	co_mutex_lock(&s->lock);
	if (ret == 0)
		ret = qcow2_l2_slice_for_write(s, c0, &slot, &ents, &idx);
	if (ret == 0) {
		for (uint64_t i = 0; i < nclusters && ret == 0; i++) {
			uint64_t old = be64toh(ents[idx + i]);
			ents[idx + i] = htobe64((host + i * cs) | QCOW2_OFLAG_COPIED);
			qcow2_cache_mark_dirty(&s->l2c, slot);
			if (!reuse)
				ret = qcow2_free_l2_entry(s, old);
		}
		qcow2_cache_put(&s->l2c, slot);
	} else if (!reuse) {
		unalloc_data(s, host, nclusters * cs);
	}
	if (ret == 0)
		ret = qcow2_write_through(s);
	qcow2_disown_guest(s, &o);
	*done_bytes = m.bytes;
out_unlock:
	co_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_co_pwritev(struct bdrv *bs, uint64_t off, uint64_t len,
		     const struct iovec *iov, int iovcnt, unsigned flags)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t done = 0, n = 0;
	int ret = 0;

	if (s->corrupt)
		return -EIO;
	qcow2_bitmaps_dirty(s, off, len);
	while (done < len) {
		ret = write_run(s, off + done, len - done, iov, iovcnt, done, &n);
		if (ret < 0)
			return ret;
		done += n;
	}
	if (flags & BDRV_REQ_FUA)
		ret = qcow2_co_flush(bs);
	return ret;
}

/* Write explicit zeros through the normal write path. */
static int write_zero_buffers(struct bdrv *bs, uint64_t off, uint64_t len)
{
	struct iovec v[BDRV_IOV_MAX];
	int ret;

	while (len) {
		uint64_t chunk = 0;
		int n = 0;
		while (n < BDRV_IOV_MAX && chunk < len) {
			v[n].iov_base = (void *)qcow2_zero_page;
			v[n].iov_len = MIN(sizeof(qcow2_zero_page), len - chunk);
			chunk += v[n].iov_len;
			n++;
		}
		ret = qcow2_co_pwritev(bs, off, chunk, v, n, 0);
		if (ret < 0)
			return ret;
		off += chunk;
		len -= chunk;
	}
	return 0;
}

/* ---- discard and zeroing ---------------------------------------------- */

static bool is_allocated(enum qcow2_ctype t)
{
	return t == QCOW2_NORMAL || t == QCOW2_COMPRESSED || t == QCOW2_ZERO_ALLOC;
}

/* Lock held.  Set the L2 entry of cluster @guest to @new_e (and bitmap
 * @new_b with extended L2), then drop the old entry's reference
 * (deferred) when @unmap. */
static int set_entry(struct qcow2_state *s, uint64_t guest, uint64_t new_e, uint64_t new_b,
		     bool unmap)
{
	uint64_t *ents, old;
	unsigned idx;
	int slot, ret;

	ret = qcow2_l2_slice_for_write(s, guest, &slot, &ents, &idx);
	if (ret < 0)
		return ret;
	old = qcow2_l2_get(s, ents, idx);
	qcow2_l2_set(s, ents, idx, new_e, new_b);
	qcow2_cache_mark_dirty(&s->l2c, slot);
	if (unmap)
		ret = qcow2_free_l2_entry(s, old);
	qcow2_cache_put(&s->l2c, slot);
	return ret;
}

enum zop { ZOP_DISCARD, ZOP_ZERO };
/* With ZOP_DISCARD: it stands for a write-zeroes (v2 has no zero flag),
 * so it may not skip what it cannot do (clusters_op_owned). */
#define ZOP_MUST (1u << 31)

/* The virtual size, as other threads may change it (bdrv_truncate). */
static uint64_t image_end(struct qcow2_state *s)
{
	return __atomic_load_n(&s->bs->size, __ATOMIC_ACQUIRE);
}

/* Lock held.  With an external data file: the guest range [host,
 * host+len) of it was unmapped, or zeroed in a raw data file (whose bytes
 * must read as the guest's).  Give the space back when discards may, and
 * make a raw data file read zeros there either way. */
static int data_release(struct qcow2_state *s, uint64_t host, uint64_t len, bool unmap)
{
	int ret = -EOPNOTSUPP;

	if (!s->data_file || !(unmap || s->data_raw))
		return 0;
	if (s->punch && unmap)
		ret = io_fallocate(s->data, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, host, len);
	if (ret < 0 && s->data_raw)
		ret = qcow2_zero_host(s, QCOW2_W_DATA, host, len);
	return ret < 0 && !s->data_raw ? 0 : ret;
}

/* One whole cluster with extended L2: QEMU's discard_in_l2_slice
 * (full_discard=false) and zero_in_l2_slice with subclusters: every
 * subcluster reads as zeros, the host cluster dropped when unmapping. */
static int cluster_op_ext(struct qcow2_state *s, uint64_t off, uint64_t len,
			  const struct qcow2_map *m, enum zop op, unsigned flags)
{
	enum qcow2_ctype ct;
	uint64_t new_e;
	bool has, unmap;
	int ret = qcow2_l2_entry_type(s, m->l2e, &ct);

	if (ret < 0)
		return ret;
	has = ct != QCOW2_UNALLOCATED;
	if (op == ZOP_DISCARD) {
		if (!s->backing && !has)
			return 0;
		unmap = has;
	} else {
		unmap = ct == QCOW2_COMPRESSED || ((flags & BDRV_REQ_MAY_UNMAP) && has);
	}
	new_e = unmap ? 0 : m->l2e;
	if (new_e == m->l2e && m->bitmap == QCOW2_BITMAP_ALL_ZERO)
		return 0;
	ret = set_entry(s, off, new_e, QCOW2_BITMAP_ALL_ZERO, unmap);
	if (ret == 0 && has)
		ret = data_release(s, m->l2e & QCOW2_L2E_OFFSET_MASK, len, unmap);
	return ret;
}

/* Subclusters [off, end) inside one cluster read as zeros from now on
 * (QEMU's zero_l2_subclusters).  -ENOTSUP for a compressed cluster. */
static int subclusters_zero(struct qcow2_state *s, uint64_t off, uint64_t end,
			    const struct qcow2_map *m)
{
	uint64_t c0 = ALIGN_DOWN(off, (uint64_t)s->cluster_size);
	unsigned a = (unsigned)((off - c0) >> s->sc_bits);
	unsigned b = (unsigned)(DIV_ROUND_UP(end - c0, (uint64_t)s->sc_size));
	uint64_t new_b;

	if (m->l2e & QCOW2_OFLAG_COMPRESSED)
		return -ENOTSUP;
	new_b = (m->bitmap | qcow2_sc_zero_range(a, b)) & ~qcow2_sc_alloc_range(a, b);
	if (new_b == m->bitmap)
		return 0;
	int ret = set_entry(s, off, m->l2e, new_b, false);
	if (ret == 0 && (m->bitmap & qcow2_sc_alloc_range(a, b)))
		ret = data_release(s, (m->l2e & QCOW2_L2E_OFFSET_MASK) + (off - c0), end - off,
				   false);
	return ret;
}

/* Lock held; the caller owns the guest clusters of [off, end).  Whole
 * clusters (the last may end at the unaligned image end @img_end): QEMU's
 * discard_in_l2_slice (full_discard=false) / zero_in_l2_slice; with
 * extended L2, write-zeroes may also cover whole subclusters of a
 * cluster.
 *
 * @img_end is the virtual size read under the lock after the clusters
 * were owned (or the size a resize is establishing): a caller that
 * decided "this partial cluster is the last one" from bs->size before it
 * waited may be wrong by now, as a live resize grows the image under it.
 * A piece that is neither whole units (clusters; subclusters for
 * extended L2) nor ends at @img_end is skipped by a discard and makes a
 * write-zeroes (ZOP_ZERO, or ZOP_DISCARD with ZOP_MUST) return -ENOTSUP
 * (its caller then writes zeros): turning the whole unit into zeros would
 * also zero guest bytes past the old end that a write may already have
 * filled. */
static int clusters_op_owned(struct qcow2_state *s, uint64_t off, uint64_t end, enum zop op,
			     unsigned flags, uint64_t img_end)
{
	uint64_t cs = s->cluster_size;
	uint64_t unit = s->ext_l2 && op == ZOP_ZERO ? s->sc_size : cs;
	int ret = 0;

	while (off < end && ret == 0) {
		uint64_t piece_end = MIN(end, ALIGN_DOWN(off, cs) + cs);
		bool whole = IS_ALIGNED(off, cs) &&
			     (piece_end - off == cs || piece_end == img_end);
		struct qcow2_map m;
		uint64_t new_e;
		bool unmap;

		if (!IS_ALIGNED(piece_end, unit) && piece_end != img_end) {
			if (op == ZOP_ZERO || (flags & ZOP_MUST))
				return -ENOTSUP;
			off = piece_end;
			continue;
		}
		ret = qcow2_get_mapping(s, off, cs, &m);
		if (ret < 0)
			break;
		if (s->ext_l2) {
			ret = whole ? cluster_op_ext(s, off, piece_end - off, &m, op, flags)
				    : subclusters_zero(s, off, piece_end, &m);
			off = piece_end;
			continue;
		}
		off = piece_end;
		if (op == ZOP_DISCARD) {
			if (!s->backing && !is_allocated(m.type))
				continue;
			new_e = s->meta.h.version >= 3 ? QCOW2_OFLAG_ZERO : 0;
			unmap = is_allocated(m.type);
		} else {
			unmap = m.type == QCOW2_COMPRESSED ||
				((flags & BDRV_REQ_MAY_UNMAP) && is_allocated(m.type));
			new_e = (unmap ? 0 : m.l2e) | QCOW2_OFLAG_ZERO;
		}
		if (new_e == m.l2e)
			continue;
		ret = set_entry(s, ALIGN_DOWN(piece_end - 1, cs), new_e, 0, unmap);
		if (ret == 0 && (m.type == QCOW2_NORMAL || m.type == QCOW2_ZERO_ALLOC))
			ret = data_release(s, m.l2e & QCOW2_L2E_OFFSET_MASK,
					   piece_end - ALIGN_DOWN(piece_end - 1, cs), unmap);
	}
	return ret;
}

/* Whole clusters (with extended L2, subclusters for write-zeroes)
 * [off, off+len), one L2 slice per lock hold. */
static int clusters_op(struct qcow2_state *s, uint64_t off, uint64_t len, enum zop op,
		       unsigned flags)
{
	uint64_t cs = s->cluster_size, end = off + len;
	uint64_t slice_bytes = (uint64_t)cs << s->l2_slice_bits;
	struct qcow2_owner o;
	int ret = 0;

	while (off < end && ret == 0) {
		uint64_t stop = MIN(end, ALIGN_DOWN(off, slice_bytes) + slice_bytes);

		co_mutex_lock(&s->lock);
		qcow2_own_guest(s, &o, off, stop);
		ret = clusters_op_owned(s, off, stop, op, flags, image_end(s));
		if (ret == 0)
			ret = qcow2_write_through(s);
		qcow2_disown_guest(s, &o);
		co_mutex_unlock(&s->lock);
		off = stop;
	}
	return ret;
}

/* Lock held, clusters owned.  QEMU's qcow2_subcluster_zeroize: -ENOTSUP
 * means "write zeros". */
static int zeroize_owned(struct qcow2_state *s, uint64_t off, uint64_t end, unsigned flags)
{
	if (s->meta.h.version < 3)
		return s->backing ? -ENOTSUP
				  : clusters_op_owned(s, off, end, ZOP_DISCARD, ZOP_MUST,
						      image_end(s));
	return clusters_op_owned(s, off, end, ZOP_ZERO, flags, image_end(s));
}

int qcow2_zero_clusters_locked(struct qcow2_state *s, uint64_t off, uint64_t end,
			       uint64_t img_end)
{
	return clusters_op_owned(s, off, end, ZOP_ZERO, 0, img_end);
}

static int zeroize(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned flags)
{
	if (s->meta.h.version < 3)
		return s->backing ? -ENOTSUP : clusters_op(s, off, len, ZOP_DISCARD, ZOP_MUST);
	return clusters_op(s, off, len, ZOP_ZERO, flags);
}

/* Does [off, off+len) of @s read as zeros according to metadata alone
 * (zero clusters, unallocated without data below)?  Lock taken here. */
static bool is_zero_range(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	uint64_t size = image_end(s);
	struct qcow2_map m;
	bool zero = true;

	if (off >= size)
		return true;
	len = MIN(len, size - off);
	while (len && zero) {
		co_mutex_lock(&s->lock);
		int ret = qcow2_get_mapping(s, off, len, &m);
		co_mutex_unlock(&s->lock);
		if (ret < 0)
			return false;
		if (m.type == QCOW2_UNALLOCATED && s->backing && off < s->backing->size) {
			/* Zero below only if the backing chain says so, through
			 * the block layer (past its end it reads zeros). */
			uint64_t pos = off, end = off + MIN(m.bytes, s->backing->size - off);
			while (zero && pos < end) {
				uint64_t pnum = 0;
				unsigned depth;
				int st = bdrv_co_block_status(s->backing, pos, end - pos, &pnum,
							      &depth);
				zero = st >= 0 && (st & BDRV_BLOCK_ZERO) && pnum;
				pos += pnum;
			}
		} else {
			zero = region_reads_zero(s, &m, off, m.bytes);
		}
		off += m.bytes;
		len -= m.bytes;
	}
	return zero;
}

/* A write_zeroes piece inside one zeroing unit (a cluster; a subcluster
 * with extended L2), as QEMU's qcow2_co_pwrite_zeroes does with head and
 * tail: the whole unit becomes zero if the rest of it reads as zeros
 * already.  Its cluster is owned from before the decision until the L2
 * entry is changed, so no allocating write can slip in between (a write
 * in flight is waited for first, then the decision sees its data).
 * -ENOTSUP: write zeros instead (after the cluster is released: that
 * write may need to own it). */
static int zero_partial(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned flags)
{
	uint64_t u = s->sc_size, c0 = ALIGN_DOWN(off, u);
	uint64_t size = image_end(s);
	uint64_t end = off + len, cend = end == size ? end : ALIGN_UP(end, u);
	uint64_t unit_end = MIN(c0 + u, size);
	struct qcow2_owner o;
	struct qcow2_map m;
	int ret;

	co_mutex_lock(&s->lock);
	qcow2_own_guest(s, &o, c0, unit_end);
	co_mutex_unlock(&s->lock);

	if (!is_zero_range(s, c0, off - c0) || !is_zero_range(s, end, cend - end)) {
		ret = -ENOTSUP;
		co_mutex_lock(&s->lock);
	} else {
		co_mutex_lock(&s->lock);
		ret = qcow2_get_mapping(s, c0, u, &m);
		if (ret == 0 && is_allocated(m.type) && m.type != QCOW2_ZERO_ALLOC)
			ret = -ENOTSUP;
		if (ret == 0)
			ret = zeroize_owned(s, c0, unit_end, flags);
		if (ret == 0)
			ret = qcow2_write_through(s);
	}
	qcow2_disown_guest(s, &o);
	co_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t u = s->sc_size, end = off + len;
	int ret;

	if (s->corrupt)
		return -EIO;
	qcow2_bitmaps_dirty(s, off, len);
	/* Split like QEMU's block layer: unaligned head and tail pieces are
	 * tried alone and fall back to explicit zeros.  The unit is the
	 * cluster, or the subcluster with extended L2. */
	while (off < end) {
		uint64_t piece_end;
		bool partial;

		if (!IS_ALIGNED(off, u)) {
			piece_end = MIN(end, ALIGN_UP(off, u));
			partial = true;
		} else if (end - off >= u) {
			piece_end = ALIGN_DOWN(end, u);
			partial = false;
		} else {
			piece_end = end;
			partial = end != image_end(s);
		}
		if (partial)
			ret = zero_partial(s, off, piece_end - off, flags);
		else
			ret = zeroize(s, off, piece_end - off, flags);
		if (ret == -ENOTSUP && !(flags & BDRV_REQ_NO_FALLBACK))
			ret = write_zero_buffers(bs, off, piece_end - off);
		if (ret < 0)
			return ret;
		off = piece_end;
	}
	return 0;
}

int qcow2_co_discard(struct bdrv *bs, uint64_t off, uint64_t len)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t cs = s->cluster_size;
	uint64_t start = ALIGN_UP(off, cs);
	uint64_t size = image_end(s);
	uint64_t end = off + len == size ? size : ALIGN_DOWN(off + len, (uint64_t)cs);

	if (s->corrupt)
		return -EIO;
	qcow2_bitmaps_dirty(s, off, len);
	/* v2 has no zero flag: deallocating would expose stale backing
	 * data, so QEMU refuses (ENOTSUP, which discard callers ignore). */
	if (s->meta.h.version < 3 && s->backing)
		return 0;
	/* Partial clusters are left alone, except a whole partial cluster at
	 * an unaligned image end. */
	if (start >= end)
		return 0;
	return clusters_op(s, start, end - start, ZOP_DISCARD, 0);
}

/* ---- compressed writes ------------------------------------------------- */

int qcow2_co_pwritev_compressed(struct bdrv *bs, uint64_t off, uint64_t len,
				const struct iovec *iov, int iovcnt)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t cs = s->cluster_size, end = off + cs, coff = 0, nsec, *ents;
	struct qcow2_owner o;
	struct qcow2_map m;
	struct iovec v;
	ssize_t clen;
	uint8_t *b;
	unsigned idx, e;
	int slot, ret;

	if (s->corrupt)
		return -EIO;
	qcow2_bitmaps_dirty(s, off, len);
	/* No compressed clusters in an external data file. */
	if (s->data_file)
		return qcow2_co_pwritev(bs, off, len, iov, iovcnt, 0);
	b = bounce_get(s);
	if (!b)
		return -ENOMEM;
	/* A short last cluster is compressed whole, with a zero tail, as
	 * QEMU does.  Anything that does not shrink is written normally. */
	ret = iov_to_buf(iov, iovcnt, 0, b, len);
	if (ret < 0) {
		bounce_put(s, b);
		return ret;
	}
	memset(b + len, 0, cs - len);
	clen = qcow2_compress(s->meta.h.compression_type, b, cs, b + cs, cs - 1);
	if (clen == -ENOSPC)
		goto plain;
	if (clen < 0) {
		bounce_put(s, b);
		return (int)clen;
	}

	co_mutex_lock(&s->lock);
	qcow2_wait_owners(s, off, &end, false);
	ret = qcow2_get_mapping(s, off, cs, &m);
	if (ret == 0 && (m.l2e & (QCOW2_L2E_OFFSET_MASK | QCOW2_OFLAG_COMPRESSED))) {
		/* Compression writes only new clusters (as in QEMU). */
		co_mutex_unlock(&s->lock);
		goto plain;
	}
	if (ret == 0)
		ret = qcow2_l2_check_writable(s, off);
	if (ret == 0)
		ret = qcow2_alloc_bytes(s, (uint64_t)clen, &coff);
	if (ret == 0)
		ret = qcow2_check_write(s, QCOW2_OL_NEW, coff, (uint64_t)clen);
	if (ret < 0) {
		co_mutex_unlock(&s->lock);
		bounce_put(s, b);
		return ret;
	}
	qcow2_add_owner(s, &o, off, off + cs);
	e = qcow2_io_begin(s);
	co_mutex_unlock(&s->lock);

	v.iov_base = b + cs;
	v.iov_len = (size_t)clen;
	ret = qcow2_pwritev_data(s, QCOW2_W_COMPRESSED, &v, 1, coff);
	qcow2_io_end(s, e);
	bounce_put(s, b);

	co_mutex_lock(&s->lock);
	/* "Compressed Clusters Descriptor": the sectors after the first. */
	nsec = ((coff + (uint64_t)clen - 1) >> 9) - (coff >> 9);
	if (ret == 0 && nsec > s->csize_mask)
		ret = -EIO;
	if (ret == 0)
		ret = qcow2_l2_slice_for_write(s, off, &slot, &ents, &idx);
	if (ret == 0) {
		uint64_t old = qcow2_l2_get(s, ents, idx);
		qcow2_l2_set(s, ents, idx, QCOW2_OFLAG_COMPRESSED | (nsec << s->csize_shift) | coff, 0);
		qcow2_cache_mark_dirty(&s->l2c, slot);
		qcow2_cache_put(&s->l2c, slot);
		ret = qcow2_free_l2_entry(s, old);
	} else {
		qcow2_free_deferred(s, coff, (uint64_t)clen);
	}
	if (ret == 0)
		ret = qcow2_write_through(s);
	qcow2_disown_guest(s, &o);
	co_mutex_unlock(&s->lock);
	return ret;
plain:
	bounce_put(s, b);
	return qcow2_co_pwritev(bs, off, len, iov, iovcnt, 0);
}

int qcow2_co_flush(struct bdrv *bs)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	co_mutex_lock(&s->lock);
	ret = qcow2_flush_locked(s);
	co_mutex_unlock(&s->lock);
	return ret;
}
