/* SPDX-License-Identifier: MIT */
/*
 * qcow2 request paths: read, write (in place or allocating with
 * copy-on-write), write_zeroes, discard, flush.
 *
 * Each request walks the guest range in runs of same-type clusters.  The
 * metadata lookup and updates run under s->lock; guest data I/O does not.
 *
 * Allocating writes (QEMU's handle_dependencies): after allocating host
 * clusters and before updating the L2 entries, a write is on s->allocs
 * with its guest cluster range.  Any other allocating write, zeroing or
 * discard touching that range waits on it (a write whose range only
 * overlaps later is shortened to stop before it), so a guest cluster is
 * never allocated twice and an old cluster is never freed twice.
 *
 * Data I/O that looked up a host cluster counts itself in the current
 * epoch (s->inflight) until done; deferred frees wait for the epoch to
 * drain (refcount.c), so a cluster freed by a racing discard is never
 * reused under an in-flight read or write.
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

static const uint8_t zero_page[65536] __attribute__((aligned(4096)));

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

static unsigned io_begin(struct qcow2_state *s)
{
	unsigned e;

	spin_lock(&s->spin);
	e = s->epoch;
	s->inflight[e]++;
	spin_unlock(&s->spin);
	return e;
}

static void io_end(struct qcow2_state *s, unsigned e)
{
	spin_lock(&s->spin);
	if (--s->inflight[e] == 0 && e != s->epoch)
		co_queue_wake_all(&s->drain_wait);
	spin_unlock(&s->spin);
}

int qcow2_zero_host(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	struct iovec v[16];
	int ret;

	if (!s->no_zero_range) {
		ret = io_fallocate(s->file, FALLOC_FL_ZERO_RANGE, off, len);
		if (ret == 0 || (ret != -EOPNOTSUPP && ret != -EINVAL && ret != -ENOSYS))
			return ret;
		s->no_zero_range = true;
	}
	while (len) {
		uint64_t chunk = 0;
		int n = 0;
		while (n < 16 && chunk < len) {
			v[n].iov_base = (void *)zero_page;
			v[n].iov_len = MIN(sizeof(zero_page), len - chunk);
			chunk += v[n].iov_len;
			n++;
		}
		ret = io_pwritev(s->file, v, n, off);
		if (ret < 0)
			return ret;
		off += chunk;
		len -= chunk;
	}
	return 0;
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
		iov_memset(iov, iovcnt, iov_off + in, 0, len - in);
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
		e = io_begin(s);
		co_mutex_unlock(&s->lock);
		if (ret < 0) {
			io_end(s, e);
			break;
		}
		switch (m.type) {
		case QCOW2_UNALLOCATED:
			ret = read_backing(s, off + done, m.bytes, iov, iovcnt, done);
			break;
		case QCOW2_ZERO_PLAIN:
		case QCOW2_ZERO_ALLOC:
			iov_memset(iov, iovcnt, done, 0, m.bytes);
			break;
		case QCOW2_NORMAL:
			n = iov_slice(iov, iovcnt, done, m.bytes, sl, BDRV_IOV_MAX);
			ret = n < 0 ? n : io_preadv(s->file, sl, n, m.host);
			break;
		case QCOW2_COMPRESSED:
			b = bounce_get(s);
			if (!b) {
				ret = -ENOMEM;
				break;
			}
			ret = read_compressed(s, m.l2e, b, b + 2 * (size_t)s->cluster_size);
			if (ret == 0)
				iov_from_buf(iov, iovcnt, done,
					     b + qcow2_offset_in_cluster(s, off + done), m.bytes);
			bounce_put(s, b);
			break;
		}
		io_end(s, e);
		done += m.bytes;
	}
	return ret;
}

/* ---- write ------------------------------------------------------------ */

/* Lock held.  Wait until no in-flight allocation overlaps the guest
 * clusters of [start, *end); with @shorten, an allocation starting after
 * the first cluster instead cuts *end before it. */
static void wait_dependencies(struct qcow2_state *s, uint64_t start, uint64_t *end, bool shorten)
{
	uint64_t cs = ALIGN_DOWN(start, s->cluster_size);
retry:
	for (struct qcow2_alloc *a = s->allocs; a; a = a->next) {
		uint64_t ce = ALIGN_UP(*end, (uint64_t)s->cluster_size);
		if (a->end <= cs || a->start >= ce)
			continue;
		if (shorten && a->start > cs) {
			*end = a->start;
			continue;
		}
		log_debug("%s: request at %llu waits for the allocation of [%llu, %llu)",
			  s->bs->filename, (unsigned long long)start,
			  (unsigned long long)a->start, (unsigned long long)a->end);
		co_queue_wait_unlock(&a->waiters, &s->lock);
		goto retry;
	}
}

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

	if (!len)
		return 0;
	switch (m->type) {
	case QCOW2_UNALLOCATED:
		return read_backing(s, cluster + in_off, len, &v, 1, 0);
	case QCOW2_ZERO_PLAIN:
	case QCOW2_ZERO_ALLOC:
		memset(img + in_off, 0, len);
		return 0;
	case QCOW2_NORMAL:
		return io_pread(s->file, img + in_off, len,
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
		ret = qcow2_zero_host(s, host, cend - c0);
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
	ret = io_pwritev(s->file, v, n, host + (guest - c0) - head);
out:
	if (b)
		bounce_put(s, b);
	return ret;
}

/* One run of the write: returns bytes consumed in *done_bytes. */
static int write_run(struct qcow2_state *s, uint64_t guest, uint64_t max,
		     const struct iovec *iov, int iovcnt, uint64_t iov_off, uint64_t *done_bytes)
{
	uint64_t cs = s->cluster_size, end = guest + max, host, c0, cend, nclusters;
	struct qcow2_map m, last;
	struct qcow2_alloc a;
	struct iovec sl[BDRV_IOV_MAX];
	uint64_t *ents;
	unsigned idx, e;
	bool reuse, fresh = false;
	int slot, n, ret;

	co_mutex_lock(&s->lock);
	wait_dependencies(s, guest, &end, true);
	ret = qcow2_get_mapping(s, guest, end - guest, &m);
	if (ret < 0)
		goto out_unlock;

	if (m.type == QCOW2_NORMAL && (m.l2e & QCOW2_OFLAG_COPIED)) {
		/* Our own cluster: overwrite in place, no metadata. */
		e = io_begin(s);
		co_mutex_unlock(&s->lock);
		n = iov_slice(iov, iovcnt, iov_off, m.bytes, sl, BDRV_IOV_MAX);
		ret = n < 0 ? n : io_pwritev(s->file, sl, n, m.host);
		io_end(s, e);
		*done_bytes = m.bytes;
		return ret;
	}

	/* Allocating write over the run's whole clusters. */
	c0 = ALIGN_DOWN(guest, cs);
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
	} else {
		uint64_t old_end = s->file_end;
		ret = qcow2_alloc_clusters(s, nclusters, &host);
		if (ret < 0)
			goto out_unlock;
		/* file_end only grows (allocations, never frees), so clusters
		 * at or past it were never written since the file began. */
		fresh = host >= old_end;
	}
	a.start = c0;
	a.end = cend;
	a.waiters = (struct co_queue)CO_QUEUE_INIT;
	a.next = s->allocs;
	s->allocs = &a;
	e = io_begin(s);
	co_mutex_unlock(&s->lock);

	ret = cow_write(s, &m, &last, host, guest, m.bytes, iov, iovcnt, iov_off, fresh);
	io_end(s, e);

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
		qcow2_free_deferred(s, host, nclusters * cs);
	}
	for (struct qcow2_alloc **pp = &s->allocs; *pp; pp = &(*pp)->next) {
		if (*pp == &a) {
			*pp = a.next;
			break;
		}
	}
	co_queue_wake_all(&a.waiters);
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
			v[n].iov_base = (void *)zero_page;
			v[n].iov_len = MIN(sizeof(zero_page), len - chunk);
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

/* Lock held.  Set the L2 entry of cluster @guest to @new_e, then drop the
 * old entry's reference (deferred) when @unmap. */
static int set_entry(struct qcow2_state *s, uint64_t guest, uint64_t new_e, bool unmap)
{
	uint64_t *ents, old;
	unsigned idx;
	int slot, ret;

	ret = qcow2_l2_slice_for_write(s, guest, &slot, &ents, &idx);
	if (ret < 0)
		return ret;
	old = be64toh(ents[idx]);
	ents[idx] = htobe64(new_e);
	qcow2_cache_mark_dirty(&s->l2c, slot);
	if (unmap)
		ret = qcow2_free_l2_entry(s, old);
	qcow2_cache_put(&s->l2c, slot);
	return ret;
}

enum zop { ZOP_DISCARD, ZOP_ZERO };

/* Whole clusters [off, off+len) (len may end at the unaligned image end):
 * QEMU's discard_in_l2_slice (full_discard=false) / zero_in_l2_slice. */
static int clusters_op(struct qcow2_state *s, uint64_t off, uint64_t len, enum zop op,
		       unsigned flags)
{
	uint64_t cs = s->cluster_size, end = off + len;
	int ret = 0;

	while (off < end && ret == 0) {
		/* One L2 slice per lock hold. */
		uint64_t slice_bytes = (uint64_t)cs << s->l2_slice_bits;
		uint64_t stop = MIN(end, ALIGN_DOWN(off, slice_bytes) + slice_bytes);

		co_mutex_lock(&s->lock);
		wait_dependencies(s, off, &stop, false);
		for (; off < stop && ret == 0; off += cs) {
			struct qcow2_map m;
			uint64_t new_e;
			bool unmap;

			ret = qcow2_get_mapping(s, off, cs, &m);
			if (ret < 0)
				break;
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
			ret = set_entry(s, off, new_e, unmap);
		}
		co_mutex_unlock(&s->lock);
	}
	return ret;
}

static int discard_clusters(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	return clusters_op(s, off, len, ZOP_DISCARD, 0);
}

/* QEMU's qcow2_subcluster_zeroize: -ENOTSUP means "write zeros". */
static int zeroize(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned flags)
{
	if (s->meta.h.version < 3)
		return s->backing ? -ENOTSUP : discard_clusters(s, off, len);
	return clusters_op(s, off, len, ZOP_ZERO, flags);
}

/* Does [off, off+len) of @s read as zeros according to metadata alone
 * (zero clusters, unallocated without data below)?  Lock taken here. */
static bool is_zero_range(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	struct qcow2_map m;
	bool zero = true;

	if (off >= s->bs->size)
		return true;
	len = MIN(len, s->bs->size - off);
	while (len && zero) {
		co_mutex_lock(&s->lock);
		int ret = qcow2_get_mapping(s, off, len, &m);
		co_mutex_unlock(&s->lock);
		if (ret < 0)
			return false;
		if (m.type == QCOW2_UNALLOCATED && s->backing && off < s->backing->size) {
			/* Zero below only if the backing chain says so (qcow2). */
			struct bdrv *b = s->backing;
			zero = b->drv == &bdrv_qcow2 &&
			       is_zero_range(b->opaque, off, MIN(m.bytes, b->size - off));
		} else {
			zero = region_reads_zero(s, &m, off, m.bytes);
		}
		off += m.bytes;
		len -= m.bytes;
	}
	return zero;
}

/* A write_zeroes piece inside one cluster (QEMU qcow2_co_pwrite_zeroes
 * with head/tail): whole cluster becomes zero if the rest already is. */
static int zero_partial(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned flags)
{
	uint64_t cs = s->cluster_size, c0 = ALIGN_DOWN(off, cs);
	uint64_t end = off + len, cend = end == s->bs->size ? end : ALIGN_UP(end, cs);
	struct qcow2_map m;
	int ret;

	if (!is_zero_range(s, c0, off - c0) || !is_zero_range(s, end, cend - end))
		return -ENOTSUP;
	co_mutex_lock(&s->lock);
	ret = qcow2_get_mapping(s, c0, cs, &m);
	co_mutex_unlock(&s->lock);
	if (ret < 0)
		return ret;
	if (is_allocated(m.type) && m.type != QCOW2_ZERO_ALLOC)
		return -ENOTSUP;
	return zeroize(s, c0, MIN(cs, s->bs->size - c0), flags);
}

int qcow2_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags)
{
	struct qcow2_state *s = bs->opaque;
	uint64_t cs = s->cluster_size, end = off + len;
	int ret;

	/* Split like QEMU's block layer: unaligned head and tail pieces are
	 * tried alone and fall back to explicit zeros. */
	while (off < end) {
		uint64_t piece_end;
		bool partial;

		if (!IS_ALIGNED(off, cs)) {
			piece_end = MIN(end, ALIGN_UP(off, cs));
			partial = true;
		} else if (end - off >= cs) {
			piece_end = ALIGN_DOWN(end, cs);
			partial = false;
		} else {
			piece_end = end;
			partial = end != bs->size;
		}
		if (partial)
			ret = zero_partial(s, off, piece_end - off, flags);
		else
			ret = zeroize(s, off, piece_end - off, flags);
		if (ret == -ENOTSUP)
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
	uint64_t end = off + len == bs->size ? bs->size : ALIGN_DOWN(off + len, (uint64_t)cs);

	/* v2 has no zero flag: deallocating would expose stale backing
	 * data, so QEMU refuses (ENOTSUP, which discard callers ignore). */
	if (s->meta.h.version < 3 && s->backing)
		return 0;
	/* Partial clusters are left alone, except a whole partial cluster at
	 * an unaligned image end. */
	if (start >= end)
		return 0;
	return discard_clusters(s, start, end - start);
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
