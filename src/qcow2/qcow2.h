/* SPDX-License-Identifier: MIT */
/*
 * qcow2 driver internals: the per-open state and the API between the
 * driver's files.
 *
 *   driver.c   open/close, feature checks, the bdrv_qcow2 ops table
 *   cache.c    L2 and refcount-block caches (slices, LRU, write-back)
 *   refcount.c allocator, refcount updates, deferred frees, table growth,
 *              metadata flush order (the crash-safety rules live there)
 *   cluster.c  guest offset -> host mapping, L2 entry checks, L2 tables
 *   rw.c       request paths: read, write with COW, zeroes, discard, flush
 *
 * Thread model: one bdrv is driven by the coroutines of one thread.  All
 * metadata (L1, caches, refcounts, allocator, pending frees, in-flight
 * allocation list) is touched only with s->lock held; guest data I/O runs
 * without it.  Functions marked "lock held" must be called with s->lock.
 */
#ifndef QUBLK_QCOW2_H
#define QUBLK_QCOW2_H

#include <stdbool.h>
#include <stdint.h>

#include "block/bdrv.h"
#include "common/coro.h"
#include "qcow2/format.h"

/* ---- cache.c ---------------------------------------------------------- */

struct qcow2_state;

struct qcow2_slice {
	uint64_t key;           /* host offset of the slice; UINT64_MAX = empty */
	int32_t hnext;          /* hash chain */
	int32_t prev, next;     /* LRU list, most recently used at the head */
	uint32_t ref;           /* pinned by callers; pinned slices never evicted */
	bool dirty;
};

struct qcow2_cache {
	struct qcow2_state *s;
	const char *name;
	uint8_t *mem;           /* n * slice_size, mmap'd at open, touched lazily */
	size_t mem_len;
	struct qcow2_slice *sl;
	int32_t *buckets;
	uint32_t nbuckets;      /* power of two */
	uint32_t n;             /* capacity in slices */
	uint32_t used;          /* slots handed out so far (lazy growth) */
	uint32_t slice_size;
	int32_t lru_head, lru_tail;
	uint32_t ndirty;
	bool is_l2;             /* writing a dirty slice needs refcounts on disk first */
};

int qcow2_cache_init(struct qcow2_state *s, struct qcow2_cache *c, const char *name,
		     uint64_t bytes, uint32_t slice_size, bool is_l2);
void qcow2_cache_deinit(struct qcow2_cache *c);
/* Pin the slice at host offset @off (slice aligned).  @fresh: the slice
 * is new metadata, fill with zeros instead of reading.  Returns -errno. */
int qcow2_cache_get(struct qcow2_cache *c, uint64_t off, bool fresh, int *idx, void **data);
void qcow2_cache_put(struct qcow2_cache *c, int idx);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, int idx);
/* Write every dirty slice (no fdatasync).  For the L2 cache this first
 * makes the refcount cache durable. */
int qcow2_cache_writeback(struct qcow2_cache *c);
/* Forget clean, unpinned slices in [off, off+len) (clusters reused). */
void qcow2_cache_invalidate(struct qcow2_cache *c, uint64_t off, uint64_t len);
bool qcow2_cache_has_dirty(const struct qcow2_cache *c);

/* ---- refcount.c ------------------------------------------------------- */

int qcow2_refcount_open(struct qcow2_state *s);
void qcow2_refcount_close(struct qcow2_state *s);
/* Lock held.  Refcount of host cluster @cluster (0 if not covered). */
int qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster, uint64_t *rc);
/* Lock held.  Allocate @n contiguous clusters (refcount 0 -> 1, in the
 * refcount cache).  Returns -errno, host byte offset in *off. */
int qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n, uint64_t *off);
/* Lock held.  Drop one reference to [off, off+len) once the metadata that
 * dropped it is on disk (next flush).  Never fails: when the pending list
 * is full it is flushed first, and an error there is returned. */
int qcow2_free_deferred(struct qcow2_state *s, uint64_t off, uint64_t len);
/* Lock held.  Deferred free of whatever an L2 entry references. */
int qcow2_free_l2_entry(struct qcow2_state *s, uint64_t l2e);
/* Lock held.  The two-phase metadata flush, then pending decrements. */
int qcow2_flush_locked(struct qcow2_state *s);

/* ---- cluster.c -------------------------------------------------------- */

enum qcow2_ctype {
	QCOW2_UNALLOCATED,      /* read from backing (or zeros) */
	QCOW2_ZERO_PLAIN,       /* zero flag, no host cluster */
	QCOW2_ZERO_ALLOC,       /* zero flag, host cluster kept */
	QCOW2_NORMAL,
	QCOW2_COMPRESSED,
};

/* Classify and validate an L2 entry.  Returns -EIO (logged) if reserved
 * bits are set or the offset is misaligned or outside the file. */
int qcow2_l2_entry_type(struct qcow2_state *s, uint64_t l2e, enum qcow2_ctype *t);
/* Host byte range of a compressed cluster, validated. */
int qcow2_compressed_range(struct qcow2_state *s, uint64_t l2e, uint64_t *off, uint64_t *len);

struct qcow2_map {
	enum qcow2_ctype type;
	uint64_t host;          /* host offset of the guest offset (NORMAL) */
	uint64_t bytes;         /* length of the run starting at the guest offset */
	uint64_t l2e;           /* first cluster's L2 entry */
};
/* Lock held.  Mapping of the run of same-type clusters starting at
 * @guest (NORMAL runs are host-contiguous, COMPRESSED runs one cluster),
 * at most @max bytes and never across an L2 slice. */
int qcow2_get_mapping(struct qcow2_state *s, uint64_t guest, uint64_t max, struct qcow2_map *m);
/* Lock held.  Pin the L2 slice holding @guest for modification: allocates
 * the L2 table, or copies it when it is shared (L1 entry without COPIED).
 * *entries points at the slice, *index is the entry of @guest in it. */
int qcow2_l2_slice_for_write(struct qcow2_state *s, uint64_t guest, int *slice,
			     uint64_t **entries, unsigned *index);
/* Lock held.  Pin the L2 slice for reading; *slice = -1 when the L2
 * table is not allocated. */
int qcow2_l2_slice_for_read(struct qcow2_state *s, uint64_t guest, int *slice,
			    uint64_t **entries, unsigned *index);

/* ---- rw.c ------------------------------------------------------------- */

int qcow2_co_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		    const struct iovec *iov, int iovcnt);
int qcow2_co_pwritev(struct bdrv *bs, uint64_t off, uint64_t len,
		     const struct iovec *iov, int iovcnt, unsigned flags);
int qcow2_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags);
int qcow2_co_discard(struct bdrv *bs, uint64_t off, uint64_t len);
int qcow2_co_flush(struct bdrv *bs);
int qcow2_bounce_init(struct qcow2_state *s);
/* Make host bytes [off, off+len) read as zeros: fallocate(ZERO_RANGE),
 * else writing zeros.  Returns -errno. */
int qcow2_zero_host(struct qcow2_state *s, uint64_t off, uint64_t len);
void qcow2_bounce_deinit(struct qcow2_state *s);

/* ---- state ------------------------------------------------------------ */

/* An allocating write between "clusters allocated" and "L2 updated". */
struct qcow2_alloc {
	uint64_t start, end;            /* guest bytes, cluster aligned */
	struct co_queue waiters;
	struct qcow2_alloc *next;
};

struct qcow2_pending_free {
	uint64_t cluster;               /* first host cluster index */
	uint64_t nb;
};

#define QCOW2_PENDING_MAX 1024

struct qcow2_state {
	struct bdrv *bs;
	struct io_file *file;
	struct bdrv *backing;
	struct qcow2_meta meta;
	bool read_only;

	uint32_t cluster_bits, cluster_size;
	uint32_t l2_bits;               /* log2 entries per L2 table */
	uint32_t l2_slice_bits;         /* log2 entries per L2 slice */
	uint32_t refcount_order;
	uint64_t refcount_max;
	uint32_t rb_bits;               /* log2 entries per refcount block */
	uint32_t rb_slice_bits;         /* log2 entries per refcount slice */
	uint32_t csize_shift;           /* compressed descriptor split */
	uint64_t csize_mask, coffset_mask;

	uint64_t *l1;                   /* host order */
	uint32_t l1_size;
	uint64_t l1_offset;

	uint64_t *reftable;             /* host order */
	uint32_t reftable_size;         /* entries */
	uint64_t reftable_offset;
	uint32_t reftable_clusters;

	uint64_t file_end;              /* bytes: file size at open or end of allocations */
	uint64_t free_hint;             /* no free cluster below this index */

	struct qcow2_cache l2c, rbc;
	struct co_mutex lock;
	uint8_t *meta_buf;              /* one cluster, metadata scratch (lock held) */
	bool no_zero_range;             /* fallocate(ZERO_RANGE) unsupported */

	struct qcow2_alloc *allocs;     /* in-flight allocating writes */

	struct qcow2_pending_free pending[QCOW2_PENDING_MAX];
	unsigned npending;

	/* Data I/O that may touch clusters a pending free will release: a
	 * free is applied only after the I/O of the epoch it was queued in
	 * has drained (a racing discard never lets a freed cluster be reused
	 * under an in-flight read or write). */
	unsigned epoch;
	unsigned inflight[2];
	struct co_queue drain_wait;
	/* Guards epoch/inflight/drain_wait and the bounce pool, which are
	 * touched without the metadata lock by queue threads. */
	int spin;

	/* Bounce buffers of 4 clusters: head, tail, compressed input (2). */
	uint8_t **bounce_free;
	unsigned nbounce_free, nbounce, bounce_max;
	size_t bounce_size;
	struct co_queue bounce_wait;
};

static inline uint64_t qcow2_offset_in_cluster(const struct qcow2_state *s, uint64_t off)
{
	return off & (s->cluster_size - 1);
}

#endif
