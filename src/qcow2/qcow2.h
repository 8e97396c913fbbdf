/* SPDX-License-Identifier: MIT */
/*
 * qcow2 driver internals: the per-open state and the API between the
 * driver's files.
 *
 *   driver.c   open/close, feature checks, the bdrv_qcow2 ops table
 *   snapshot-live.c  internal snapshots of the open image (the work is
 *              snapshot-write.c's, shared with the offline tool)
 *   ranges.c   the range authority: metadata map and overlap checks,
 *              allocation reservations, host I/O epochs, guest cluster
 *              owners, corruption signalling
 *   cache.c    L2 and refcount-block caches (slices, LRU, write-back)
 *   refcount.c allocator, refcount updates, deferred frees, table growth,
 *              metadata flush order (the crash-safety rules live there)
 *   cluster.c  guest offset -> host mapping, L2 entry checks, L2 tables
 *   rw.c       request paths: read, write with COW, zeroes, discard, flush
 *   status.c   block status (what a range reads as) from the mapping
 *   resize.c   changing the virtual size (L1 growth, shrinking)
 *
 * Thread model: one image may be driven by the coroutines of several
 * threads at once (one per ublk queue, each with its own io_uring).  All
 * metadata (L1, caches, refcounts, allocator, pending frees, metadata
 * map, reservations, guest cluster owners) is touched only with s->lock
 * held, a co_mutex that hands itself to waiters across threads; guest data
 * I/O runs without it.  The few fields data I/O touches without the lock
 * (epoch counters, bounce pool) are under the spinlock s->spin, never held
 * across a yield.  Functions marked "lock held" must be called with
 * s->lock.  A coroutine that yields with the lock held (metadata I/O)
 * keeps it: other coroutines wait on the lock, not on stale state.
 */
#ifndef QUBLK_QCOW2_H
#define QUBLK_QCOW2_H

#include <endian.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/bdrv.h"
#include "common/coro.h"
#include "qcow2/format.h"

/* ---- shared --------------------------------------------------------- */

/* Where a host write (or a COW read, or a sync) comes from.  It gives the
 * write's kind of metadata for the overlap check, and names the path for
 * error injection (QEMU's blkdebug events: tests fail each path in turn). */
enum qcow2_site {
	QCOW2_W_DATA,                   /* guest data into a cluster of ours */
	QCOW2_W_COW,                    /* an allocating write's data and COW */
	QCOW2_W_COMPRESSED,             /* compressed guest data */
	QCOW2_R_COW,                    /* reading old contents for COW */
	QCOW2_W_L2_UPDATE,              /* L2 slice write-back */
	QCOW2_W_L2_ALLOC,               /* a new (or copied) L2 table */
	QCOW2_W_L1_UPDATE,              /* an L1 entry */
	QCOW2_W_REFBLOCK_UPDATE,        /* refcount slice write-back */
	QCOW2_W_REFBLOCK_ALLOC,         /* a new refcount block */
	QCOW2_W_REFTABLE_UPDATE,        /* a refcount table entry */
	QCOW2_W_REFTABLE_GROW_BLOCKS,   /* growth: the new blocks */
	QCOW2_W_REFTABLE_GROW,          /* growth: the new table */
	QCOW2_W_HEADER,                 /* cluster 0 */
	QCOW2_W_FLUSH,                  /* fdatasync */
	QCOW2_W_BITMAP,                 /* dirty bitmap data and tables */
	QCOW2_W_BITMAP_DIR,             /* a bitmap directory entry's flags */
	QCOW2_W_L1_GROW_WRITE,          /* resize: the new, larger L1 table */
	QCOW2_W_L1_GROW_ACTIVATE,       /* resize: header l1_size + l1_table_offset */
	QCOW2_W_L1_SHRINK_WRITE,        /* resize: zeroing dropped L1 entries */
	QCOW2_NSITES
};

/* ---- cache.c ---------------------------------------------------------- */

struct qcow2_state;

struct qcow2_slice {
	uint64_t key;           /* host offset of the slice; UINT64_MAX = empty */
	int32_t hnext;          /* hash chain */
	int32_t prev, next;     /* LRU list, most recently used at the head */
	uint32_t ref;           /* pinned by callers; pinned slices never evicted */
	bool dirty;             /* changed since last written (or copied) */
	bool unsynced;          /* written, not yet covered by a successful sync */
	bool listed;            /* on the write-back list: dirty or in flight */
	bool inflight;          /* a copy is being written without the lock */
	int32_t wprev, wnext;   /* write-back list */
	uint64_t dirty_seq;     /* the cache's seq when it last became dirty */
	uint64_t inflight_seq;  /* dirty_seq of the copy in flight */
	struct co_queue wq;     /* waiting for the copy in flight */
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
	uint32_t nunsynced;
	bool is_l2;             /* writing a dirty slice needs refcounts on disk first */
	/* Write-through (qcow2_cache_write_through): every change is
	 * numbered (seq); slices dirty or in flight are on a list. */
	uint64_t seq;
	int32_t wb_head;
	uint32_t ninflight;
	uint8_t *shadow;        /* copies being written, n * slice_size, lazy */
	struct co_queue idle;   /* waiting for ninflight == 0 */
};

int qcow2_cache_init(struct qcow2_state *s, struct qcow2_cache *c, const char *name,
		     uint64_t bytes, uint32_t slice_size, bool is_l2);
void qcow2_cache_deinit(struct qcow2_cache *c);
/* Pin the slice at host offset @off (slice aligned).  @fresh: the slice
 * is new metadata, fill with zeros instead of reading.  Returns -errno. */
int qcow2_cache_get(struct qcow2_cache *c, uint64_t off, bool fresh, int *idx, void **data);
void qcow2_cache_put(struct qcow2_cache *c, int idx);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, int idx);
/* Write every dirty slice (no fdatasync), except those with a copy in
 * flight (qcow2_cache_write_through), which cannot be written again
 * before it lands.  For the L2 cache this first makes the refcount cache
 * durable.  Never drops the lock. */
int qcow2_cache_writeback(struct qcow2_cache *c);
/* Write every slice changed before the call (no fdatasync), waiting for
 * copies of them in flight: a copy is written with the lock dropped, so
 * requests on other slices write theirs at the same time, and one write
 * of a slice covers every change made to it before its copy (group
 * commit).  Drops and retakes the lock.  Returns -errno. */
int qcow2_cache_write_through(struct qcow2_cache *c);
/* The seq of the oldest change not yet written (UINT64_MAX: none): every
 * change numbered below it is in the file. */
uint64_t qcow2_cache_written_below(const struct qcow2_cache *c);
/* Wait (dropping the lock) until no copy is in flight: before work that
 * writes metadata behind the cache. */
void qcow2_cache_drain(struct qcow2_cache *c);
/* Forget clean, unpinned slices in [off, off+len) (clusters reused). */
void qcow2_cache_invalidate(struct qcow2_cache *c, uint64_t off, uint64_t len);
bool qcow2_cache_has_dirty(const struct qcow2_cache *c);
/* A sync covering every slice written so far ended: @ok, they are clean;
 * else dirty again.  Called by qcow2_sync(). */
void qcow2_cache_synced(struct qcow2_cache *c, bool ok);

/* ---- refcount.c ------------------------------------------------------- */

int qcow2_refcount_open(struct qcow2_state *s);
void qcow2_refcount_close(struct qcow2_state *s);
/* Read and validate the refcount table at s->reftable_offset
 * (s->reftable_clusters) into a new array: *n entries, host order.
 * Returns -errno (logged). */
int qcow2_read_reftable(struct qcow2_state *s, uint64_t **out, uint32_t *n);
/* Lock held.  Refcount of host cluster @cluster (0 if not covered). */
int qcow2_get_refcount(struct qcow2_state *s, uint64_t cluster, uint64_t *rc);
/* Lock held.  Allocations now reach @end (bytes); the file grows ahead of
 * them (sparse) so that their writes do not extend it one by one. */
void qcow2_set_file_end(struct qcow2_state *s, uint64_t end);
/* Lock held, everything flushed.  Cut the file back to the end of
 * allocations and sync (close); a file that cannot be cut stays long. */
int qcow2_trim_file(struct qcow2_state *s);
/* Lock held.  Allocate @n contiguous clusters (refcount 0 -> 1, in the
 * refcount cache).  Returns -errno, host byte offset in *off. */
int qcow2_alloc_clusters(struct qcow2_state *s, uint64_t n, uint64_t *off);
/* Lock held.  @size bytes (less than a cluster) for compressed data
 * (QEMU's qcow2_alloc_bytes): in the cluster the previous compressed data
 * ended in when they fit, else at the start of a new cluster; the cluster
 * gets one more reference.  Returns -errno, the byte offset in *off. */
int qcow2_alloc_bytes(struct qcow2_state *s, uint64_t size, uint64_t *off);
/* Lock held.  Drop one reference to [off, off+len) once the metadata that
 * dropped it is on disk (next flush).  Never fails: when the pending list
 * is full it is flushed first, and an error there is returned. */
int qcow2_free_deferred(struct qcow2_state *s, uint64_t off, uint64_t len);
/* Lock held.  Deferred free of whatever an L2 entry references. */
int qcow2_free_l2_entry(struct qcow2_state *s, uint64_t l2e);
/* Lock held.  Write the 8-byte table entry @v (a refcount table or L1
 * entry, by @site) at @off and sync. */
int qcow2_write_entry_sync(struct qcow2_state *s, enum qcow2_site site, uint64_t off, uint64_t v);
/* Lock held.  fdatasync the image file; written cache slices become clean
 * (or dirty again when it fails: see cache.c).  Returns -errno. */
int qcow2_sync(struct qcow2_state *s);
/* Lock held.  With write_through (BDRV_O_CRASH_SAFE), write every L2
 * slice changed so far to the file (no sync; refcounts are lazy): a
 * request that changed metadata calls it before it completes.  Drops
 * and retakes the lock (cache.c).  No-op otherwise.  Returns -errno. */
int qcow2_write_through(struct qcow2_state *s);
/* Lock held.  Lazy refcounts: set the dirty bit (header, synced) unless
 * set; clear it after a full flush.  Returns -errno. */
int qcow2_mark_dirty(struct qcow2_state *s);
int qcow2_mark_clean(struct qcow2_state *s);
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

/* Entry @i of an L2 slice (host order) and its subcluster bitmap (0
 * without extended L2). */
#define qcow2_l2_get(s, ents, i)    be64toh((ents)[(size_t)(i) << (s)->ext_l2])
#define qcow2_l2_bitmap(s, ents, i) \
	((s)->ext_l2 ? be64toh((ents)[((size_t)(i) << 1) + 1]) : 0)
static inline void qcow2_l2_set(const struct qcow2_state *s, uint64_t *ents, unsigned i,
				uint64_t e, uint64_t bitmap);

/* Classify and validate an L2 entry (at the cluster level: with extended
 * L2 a cluster with a host cluster is NORMAL, one without UNALLOCATED).
 * Returns -EIO (logged) if reserved bits are set or the offset is
 * misaligned or outside the file. */
int qcow2_l2_entry_type(struct qcow2_state *s, uint64_t l2e, enum qcow2_ctype *t);
/* Extended L2: validate entry @e with bitmap @b (and classify @e). */
int qcow2_l2_ext_check(struct qcow2_state *s, uint64_t e, uint64_t b, enum qcow2_ctype *ct);
/* Host byte range of a compressed cluster, validated. */
int qcow2_compressed_range(struct qcow2_state *s, uint64_t l2e, uint64_t *off, uint64_t *len);

struct qcow2_map {
	enum qcow2_ctype type;
	uint64_t host;          /* host offset of the guest offset (NORMAL) */
	uint64_t bytes;         /* length of the run starting at the guest offset */
	uint64_t l2e;           /* first cluster's L2 entry */
	uint64_t bitmap;        /* its subcluster bitmap (extended L2), else 0 */
};
/* Lock held.  Mapping of the run of same-type clusters (with extended L2:
 * subclusters) starting at @guest (NORMAL runs are host-contiguous,
 * COMPRESSED runs one cluster), at most @max bytes and never across an L2
 * slice.  With extended L2 the type is the subcluster's: NORMAL for an
 * allocated subcluster, ZERO_* for one that reads as zeros (ALLOC: the
 * cluster has a host cluster), UNALLOCATED for neither, whether or not
 * the cluster has a host cluster (see l2e). */
int qcow2_get_mapping(struct qcow2_state *s, uint64_t guest, uint64_t max, struct qcow2_map *m);
/* Lock held.  Pin the L2 slice holding @guest for modification: allocates
 * the L2 table, or copies it when it is shared (L1 entry without COPIED).
 * *entries points at the slice, *index is the entry of @guest in it. */
int qcow2_l2_slice_for_write(struct qcow2_state *s, uint64_t guest, int *slice,
			     uint64_t **entries, unsigned *index);
/* Lock held.  Would updating the L2 entry of @guest in its current table
 * overwrite other metadata?  0 or -EIO (image marked corrupt); decides
 * before any data is written for the update. */
int qcow2_l2_check_writable(struct qcow2_state *s, uint64_t guest);
/* Lock held.  Pin the L2 slice for reading; *slice = -1 when the L2
 * table is not allocated. */
int qcow2_l2_slice_for_read(struct qcow2_state *s, uint64_t guest, int *slice,
			    uint64_t **entries, unsigned *index);

/* ---- driver.c ---------------------------------------------------------- */

/* Read and validate the active L1 table (s->l1_offset, s->l1_size) into
 * a new array, host order.  Returns -errno (logged). */
int qcow2_read_l1(struct qcow2_state *s, uint64_t **out);

/* ---- snapshot-live.c --------------------------------------------------- */

/* The co_snapshot and co_snapshot_list ops (bdrv.h).  Coroutine
 * context; they take the lock. */
int qcow2_co_snapshot(struct bdrv *bs, enum bdrv_snapshot_op op, const char *name, char *err,
		      size_t errlen);
int qcow2_co_snapshot_list(struct bdrv *bs, struct qcow2_snapshot **out, uint32_t *n, char *err,
			   size_t errlen);

/* ---- status.c --------------------------------------------------------- */

/* The co_block_status op (bdrv.h).  Coroutine context; takes the lock. */
int qcow2_co_block_status(struct bdrv *bs, uint64_t off, uint64_t len,
			  uint64_t *pnum, unsigned *depth, uint64_t *host);

/* ---- rw.c ------------------------------------------------------------- */

int qcow2_co_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		    const struct iovec *iov, int iovcnt);
int qcow2_co_pwritev(struct bdrv *bs, uint64_t off, uint64_t len,
		     const struct iovec *iov, int iovcnt, unsigned flags);
int qcow2_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags);
int qcow2_co_discard(struct bdrv *bs, uint64_t off, uint64_t len);
int qcow2_co_flush(struct bdrv *bs);
int qcow2_co_pwritev_compressed(struct bdrv *bs, uint64_t off, uint64_t len,
				const struct iovec *iov, int iovcnt);
/* Lock held, the guest clusters of [off, end) owned.  Make them read as
 * zeros with zero clusters (v3; zero subclusters with extended L2), for
 * an image whose size is @img_end (a resize sets up its new range before
 * bs->size changes).  @off and @end are cluster (subcluster) aligned or
 * @end is @img_end.  Returns -errno. */
int qcow2_zero_clusters_locked(struct qcow2_state *s, uint64_t off, uint64_t end,
			       uint64_t img_end);
int qcow2_bounce_init(struct qcow2_state *s);
void qcow2_bounce_deinit(struct qcow2_state *s);

/* ---- resize.c ---------------------------------------------------------- */

/* The co_truncate op (bdrv.h).  Coroutine context, any thread; takes the
 * locks it needs. */
int qcow2_co_truncate(struct bdrv *bs, uint64_t size);

/* ---- bitmap.c ---------------------------------------------------------- */

/* A persistent dirty bitmap being tracked (see bitmap.c). */
struct qcow2_dbm {
	uint8_t *bits;                  /* bitmap data, on-disk layout, whole chunks */
	uint64_t nbits, nbytes;
	unsigned gran_bits;
	uint64_t *table;                /* bitmap table, host order */
	uint64_t table_offset;
	uint32_t table_size;
	uint64_t entry_off;             /* its directory entry */
	uint32_t flags;
};
/* Read-write open: load the enabled, consistent bitmaps and mark them in
 * use on disk.  Returns -errno (logged). */
int qcow2_bitmaps_open(struct qcow2_state *s);
/* Any thread, no lock: guest bytes [off, off+len) are about to change. */
void qcow2_bitmaps_dirty(struct qcow2_state *s, uint64_t off, uint64_t len);
/* Lock held, at a clean close after the last flush: write the bitmaps
 * back and mark them consistent.  Returns -errno. */
int qcow2_bitmaps_store(struct qcow2_state *s);
void qcow2_bitmaps_close(struct qcow2_state *s);

/* ---- ranges.c ---------------------------------------------------------- */

/* Kinds of metadata (QEMU's overlap-check categories), a bit mask. */
enum {
	QCOW2_OL_DATA        = 0,        /* guest data: may overlap no metadata */
	QCOW2_OL_HEADER      = 1 << 0,
	QCOW2_OL_ACTIVE_L1   = 1 << 1,
	QCOW2_OL_ACTIVE_L2   = 1 << 2,
	QCOW2_OL_REFTABLE    = 1 << 3,
	QCOW2_OL_REFBLOCK    = 1 << 4,
	QCOW2_OL_SNAPTABLE   = 1 << 5,
	QCOW2_OL_INACTIVE_L1 = 1 << 6,
	QCOW2_OL_INACTIVE_L2 = 1 << 7,
	QCOW2_OL_BITMAP_DIR  = 1 << 8,
	QCOW2_OL_ALL         = (1 << 9) - 1,
	/* Newly allocated clusters of the image file (not a kind: they may
	 * overlap none), also with an external data file. */
	QCOW2_OL_NEW         = 1 << 15,
};

/* Zeros, for writes that need a buffer of them. */
#define QCOW2_ZERO_PAGE 65536
extern const uint8_t qcow2_zero_page[QCOW2_ZERO_PAGE];

/* Error injection (tests): fail @count calls (0: every one) of the sites
 * in @sites (bit 1 << site) with -@err, after letting @skip through. */
struct qcow2_inject {
	uint32_t sites;
	int err;
	unsigned skip, count;
	bool armed;
};
/* Parse "SITE[,SITE...]:ERRNO[:skip=N][:count=N]", ERRNO a number or a
 * name (EIO, ENOSPC...), SITE a name as in `qublk` docs ("l2_update", ...)
 * or "all".  Returns -EINVAL. */
int qcow2_inject_parse(const char *spec, struct qcow2_inject *out);
/* 0, or the injected -errno for a call at @site. */
int qcow2_inject(struct qcow2_state *s, enum qcow2_site site);

/* Build the metadata map from the open image (read-write opens).
 * Returns -errno (logged). */
int qcow2_ranges_open(struct qcow2_state *s);
void qcow2_ranges_close(struct qcow2_state *s);
/* Lock held.  Mark host bytes [off, off+len) (whole clusters) as metadata
 * of @kind, or drop @kinds from them.  Returns -ENOMEM. */
int qcow2_meta_add(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned kind);
void qcow2_meta_del(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned kinds);
/* Lock held.  Kinds of host cluster @cluster (0: not metadata). */
unsigned qcow2_meta_kinds(struct qcow2_state *s, uint64_t cluster);
/* Lock held.  May bytes [off, off+len) be written as @kind?  0, or -EIO
 * after marking the image corrupt (also -EIO once it is corrupt). */
int qcow2_check_write(struct qcow2_state *s, unsigned kind, uint64_t off, uint64_t len);
/* Log a corruption, set the corrupt bit (v3) and refuse every later
 * write; only the first is reported. */
void qcow2_signal_corruption(struct qcow2_state *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Lock held.  Checked metadata writes from @site; a failure other than
 * running out of space poisons the file (every later flush fails).
 * Returns -errno. */
int qcow2_pwrite_meta(struct qcow2_state *s, enum qcow2_site site, const void *buf, size_t len,
		      uint64_t off);
/* qcow2_pwrite_meta in two steps: the range check (lock held), then the
 * write (the lock may be dropped meanwhile: cache.c's write-through). */
int qcow2_check_meta_write(struct qcow2_state *s, enum qcow2_site site, uint64_t off, size_t len);
int qcow2_pwrite_meta_checked(struct qcow2_state *s, enum qcow2_site site, const void *buf,
			      size_t len, uint64_t off);
int qcow2_write_header(struct qcow2_state *s);
/* Make host bytes [off, off+len) read as zeros (fallocate ZERO_RANGE, else
 * zero buffers).  Metadata sites are checked here (lock held); for data
 * the caller checked the range under the lock.  -errno. */
int qcow2_zero_host(struct qcow2_state *s, enum qcow2_site site, uint64_t off, uint64_t len);
/* Guest data (@site QCOW2_W_DATA or QCOW2_W_COW) to host bytes that
 * qcow2_check_write(QCOW2_OL_DATA) allowed under the lock, within the
 * current host I/O epoch.  No lock needed. */
int qcow2_pwritev_data(struct qcow2_state *s, enum qcow2_site site, const struct iovec *iov,
		       int iovcnt, uint64_t off);

/* Lock held.  Reserve host clusters [first, first+n) for an allocation in
 * progress, before their refcounts are set.  Returns -EIO if nested too
 * deeply. */
int qcow2_reserve(struct qcow2_state *s, uint64_t first, uint64_t n);
void qcow2_unreserve(struct qcow2_state *s, uint64_t first);
/* Is @cluster reserved?  *end: the first cluster after its run. */
bool qcow2_is_reserved(const struct qcow2_state *s, uint64_t cluster, uint64_t *end);
/* First cluster past every reservation (0 if none). */
uint64_t qcow2_reserved_end(const struct qcow2_state *s);

/* Host I/O epochs (no lock needed): data I/O on looked-up host clusters
 * runs between qcow2_io_begin() (under the lock, with the lookup) and
 * qcow2_io_end().  qcow2_io_drain() (lock held) waits until the I/O of the
 * current epoch is done and starts a new one. */
unsigned qcow2_io_begin(struct qcow2_state *s);
void qcow2_io_end(struct qcow2_state *s, unsigned e);
void qcow2_io_drain(struct qcow2_state *s);

/* A request that changes the mapping of guest clusters [start, end). */
struct qcow2_owner {
	uint64_t start, end;            /* guest bytes, cluster aligned */
	struct co_queue waiters;
	struct qcow2_owner *next;
};
/* Lock held.  Wait until no other owner holds a guest cluster of [start,
 * *end).  With @shorten, an owner that starts after the first cluster
 * cuts *end before it instead of being waited for.  May drop and retake
 * the lock: decide after it returns. */
void qcow2_wait_owners(struct qcow2_state *s, uint64_t start, uint64_t *end, bool shorten);
/* Lock held, after qcow2_wait_owners() with no yield since.  Register @o
 * as the owner of the guest clusters of [start, end). */
void qcow2_add_owner(struct qcow2_state *s, struct qcow2_owner *o, uint64_t start, uint64_t end);
/* Lock held.  Both: wait, then own [start, end).  May drop the lock. */
void qcow2_own_guest(struct qcow2_state *s, struct qcow2_owner *o, uint64_t start, uint64_t end);
/* Lock held.  Release and wake the waiters. */
void qcow2_disown_guest(struct qcow2_state *s, struct qcow2_owner *o);

/* ---- state ------------------------------------------------------------ */

struct qcow2_pending_free {
	uint64_t cluster;               /* first host cluster index */
	uint64_t nb;
	uint64_t l2_seq;                /* the L2 cache's seq when freed */
};

struct qcow2_metamap {
	uint64_t *slots;                /* (cluster + 1) << 16 | kinds, 0 = empty */
	uint64_t cap, count;
	unsigned bits;                  /* cap = 1 << bits */
};

struct qcow2_reserved {
	uint64_t first, n;              /* host clusters */
};

#define QCOW2_RESERVE_MAX 16

#define QCOW2_PENDING_MAX 1024

struct qcow2_state {
	struct bdrv *bs;
	struct io_file *file;
	struct bdrv *backing;
	struct qcow2_meta meta;
	/* Guest data lives in @data: the image file itself, or the external
	 * data file ("External data file name" extension), where guest
	 * cluster X is host cluster X and data clusters have no refcounts. */
	struct io_file *data;
	struct io_file *data_file;      /* NULL without one */
	bool data_raw;                  /* autoclear bit 1: it is a raw image too */
	bool read_only;
	bool lazy_refcounts;            /* compatible bit 0 (or write_through) */
	bool write_through;             /* BDRV_O_CRASH_SAFE: see qcow2_write_through */
	bool punch;                     /* give freed clusters back (discard=unmap) */

	uint32_t cluster_bits, cluster_size;
	unsigned ext_l2;                /* 1: extended L2 entries (16 bytes) */
	uint32_t sc_bits, sc_size;      /* subcluster size (= cluster without ext_l2) */
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
	uint64_t file_size;             /* the file's size, >= file_end when grown ahead */
	bool grow_ahead;                /* grow the file ahead of file_end (refcount.c) */
	uint64_t free_hint;             /* allocation search starts here (refcount.c) */
	uint64_t cbytes_next;           /* where compressed data may go on, 0: nowhere */

	struct qcow2_cache l2c, rbc;
	struct co_mutex lock;
	/* One resize at a time (resize.c); taken before s->lock. */
	struct co_mutex resize_lock;
	uint8_t *meta_buf;              /* one cluster, metadata scratch (lock held) */
	bool no_zero_range;             /* fallocate(ZERO_RANGE) unsupported */
	/* status.c, set once under the lock: does the image reference more
	 * clusters than its file holds (QEMU's metadata preallocation)? */
	bool prealloc_checked, prealloc;

	/* ranges.c */
	struct qcow2_metamap meta_map;
	struct qcow2_reserved reserved[QCOW2_RESERVE_MAX];
	unsigned nreserved;
	struct qcow2_owner *owners;     /* requests changing guest mappings */
	bool corrupt;                   /* overlap seen: no more writes */
	struct qcow2_inject inject;     /* tests */
	struct qcow2_dbm *dbms;         /* tracked dirty bitmaps (bitmap.c) */
	unsigned ndbms;

	struct qcow2_pending_free pending[QCOW2_PENDING_MAX];
	unsigned npending;

	/* Host I/O epochs (ranges.c): a pending free is applied only after
	 * the data I/O of the epoch it was queued in has drained. */
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

static inline void qcow2_l2_set(const struct qcow2_state *s, uint64_t *ents, unsigned i,
				uint64_t e, uint64_t bitmap)
{
	ents[(size_t)i << s->ext_l2] = htobe64(e);
	if (s->ext_l2)
		ents[((size_t)i << 1) + 1] = htobe64(bitmap);
}

static inline uint64_t qcow2_offset_in_cluster(const struct qcow2_state *s, uint64_t off)
{
	return off & (s->cluster_size - 1);
}

#endif
