/* SPDX-License-Identifier: MIT */
/*
 * Metadata caches for L2 tables and refcount blocks, in slices (4 KiB, or
 * the cluster size when smaller) so a cache miss reads 4 KiB, not a whole
 * 2 MiB table.
 *
 * Memory: the slice array and the data area are reserved at open (data
 * with mmap(MAP_NORESERVE), so a 32 MiB default costs nothing until slices
 * are first used); the request path never allocates.  Lookup is a hash on
 * the slice's host offset, replacement is LRU over unpinned slices.
 *
 * Ordering: a dirty L2 slice may only reach the disk after the refcount
 * increments for the clusters it references (and the guest data written
 * there) are durable, so writing one first writes the refcount cache and
 * syncs (see the rules at the top of refcount.c).
 *
 * Durability: a written slice is "unsynced" until the next successful
 * qcow2_sync(); only then is it clean.  If that sync fails, it is dirty
 * again (and the file is poisoned: every later flush fails, io.h).  An
 * unsynced slice may be evicted: what it held is then the disk's, and
 * the only claim anyone makes about it is the next flush's, which fails
 * if any sync since was lost.  Every write is checked by the range
 * authority (ranges.c) as the cache's kind of metadata.
 *
 * Write-through (a daemon that may be taken over, refcount.c): a request
 * that changed a slice writes it before it completes, as a copy, with the
 * lock dropped, so requests on other slices do theirs at the same time.
 * A slice has at most one copy in flight (two could land in either
 * order), pinned meanwhile; a request whose change is in that copy waits
 * for it, one whose change came after waits and then writes the next, so
 * one write covers every change queued behind it.  Changes are numbered
 * (seq): a request waits only for changes made before it asked, and a
 * deferred free is applied only once the change that dropped its
 * reference is written (qcow2_cache_written_below).  Other writers never
 * drop the lock and skip slices in flight.
 *
 * Thread model: called with the owning qcow2_state's lock held.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

#define EMPTY UINT64_MAX

static uint32_t hash_key(const struct qcow2_cache *c, uint64_t key)
{
	uint64_t h = (key / c->slice_size) * 0x9e3779b97f4a7c15ull;
	return (uint32_t)(h >> 32) & (c->nbuckets - 1);
}

static uint8_t *slice_data(const struct qcow2_cache *c, int i)
{
	return c->mem + (size_t)i * c->slice_size;
}

int qcow2_cache_init(struct qcow2_state *s, struct qcow2_cache *c, const char *name,
		     uint64_t bytes, uint32_t slice_size, bool is_l2)
{
	uint64_t n = bytes / slice_size;

	if (n < 16)
		n = 16;                 /* several pinned slices at once + room */
	if (n > (1u << 24))
		n = 1u << 24;
	c->s = s;
	c->name = name;
	c->slice_size = slice_size;
	c->is_l2 = is_l2;
	c->n = (uint32_t)n;
	c->used = 0;
	c->ndirty = 0;
	c->nunsynced = 0;
	c->seq = 0;
	c->wb_head = -1;
	c->ninflight = 0;
	c->shadow = NULL;
	c->idle = (struct co_queue)CO_QUEUE_INIT;
	c->nbuckets = 1;
	while (c->nbuckets < c->n)
		c->nbuckets <<= 1;
	c->mem_len = (size_t)n * slice_size;
	c->mem = mmap(NULL, c->mem_len, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (c->mem == MAP_FAILED) {
		c->mem = NULL;
		return -ENOMEM;
	}
	c->sl = calloc(n, sizeof(*c->sl));
	c->buckets = malloc(sizeof(*c->buckets) * c->nbuckets);
	if (!c->sl || !c->buckets) {
		qcow2_cache_deinit(c);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < c->nbuckets; i++)
		c->buckets[i] = -1;
	c->lru_head = c->lru_tail = -1;
	return 0;
}

void qcow2_cache_deinit(struct qcow2_cache *c)
{
	if (c->mem)
		munmap(c->mem, c->mem_len);
	c->mem = NULL;
	if (c->shadow)
		munmap(c->shadow, c->mem_len);
	c->shadow = NULL;
	free(c->sl);
	c->sl = NULL;
	free(c->buckets);
	c->buckets = NULL;
}

static void lru_unlink(struct qcow2_cache *c, int i)
{
	struct qcow2_slice *e = &c->sl[i];

	if (e->prev >= 0)
		c->sl[e->prev].next = e->next;
	else
		c->lru_head = e->next;
	if (e->next >= 0)
		c->sl[e->next].prev = e->prev;
	else
		c->lru_tail = e->prev;
	e->prev = e->next = -1;
}

static void lru_push_head(struct qcow2_cache *c, int i)
{
	struct qcow2_slice *e = &c->sl[i];

	e->prev = -1;
	e->next = c->lru_head;
	if (c->lru_head >= 0)
		c->sl[c->lru_head].prev = i;
	c->lru_head = i;
	if (c->lru_tail < 0)
		c->lru_tail = i;
}

static void hash_remove(struct qcow2_cache *c, int i)
{
	int32_t *pp = &c->buckets[hash_key(c, c->sl[i].key)];

	while (*pp >= 0) {
		if (*pp == i) {
			*pp = c->sl[i].hnext;
			break;
		}
		pp = &c->sl[*pp].hnext;
	}
	c->sl[i].hnext = -1;
	c->sl[i].key = EMPTY;
}

static void hash_insert(struct qcow2_cache *c, int i, uint64_t key)
{
	uint32_t b = hash_key(c, key);

	c->sl[i].key = key;
	c->sl[i].hnext = c->buckets[b];
	c->buckets[b] = i;
}

static int lookup(const struct qcow2_cache *c, uint64_t key)
{
	for (int32_t i = c->buckets[hash_key(c, key)]; i >= 0; i = c->sl[i].hnext)
		if (c->sl[i].key == key)
			return i;
	return -1;
}

/* The write-back list holds the slices that are dirty or in flight. */
static void wb_add(struct qcow2_cache *c, int i)
{
	struct qcow2_slice *e = &c->sl[i];

	if (e->listed)
		return;
	e->listed = true;
	e->wprev = -1;
	e->wnext = c->wb_head;
	if (c->wb_head >= 0)
		c->sl[c->wb_head].wprev = i;
	c->wb_head = i;
}

static void wb_del_if_done(struct qcow2_cache *c, int i)
{
	struct qcow2_slice *e = &c->sl[i];

	if (!e->listed || e->dirty || e->inflight)
		return;
	if (e->wprev >= 0)
		c->sl[e->wprev].wnext = e->wnext;
	else
		c->wb_head = e->wnext;
	if (e->wnext >= 0)
		c->sl[e->wnext].wprev = e->wprev;
	e->listed = false;
}

static void set_dirty(struct qcow2_cache *c, int i, uint64_t seq)
{
	struct qcow2_slice *e = &c->sl[i];

	if (e->dirty) {
		e->dirty_seq = MIN(e->dirty_seq, seq);
		return;
	}
	e->dirty = true;
	e->dirty_seq = seq;
	c->ndirty++;
	wb_add(c, i);
}

/* Make the refcount cache durable before any L2 slice is written.  With
 * lazy refcounts the image is marked dirty instead (once): its refcounts
 * are rebuilt at the next open if it is not closed cleanly. */
static int l2_write_barrier(struct qcow2_state *s)
{
	int ret;

	if (s->lazy_refcounts)
		return qcow2_mark_dirty(s);
	ret = qcow2_cache_writeback(&s->rbc);
	if (ret < 0)
		return ret;
	return qcow2_sync(s);
}

static enum qcow2_site slice_site(const struct qcow2_cache *c)
{
	return c->is_l2 ? QCOW2_W_L2_UPDATE : QCOW2_W_REFBLOCK_UPDATE;
}

/* A write of slice @i ended with @ret: logged if it failed, else the
 * slice waits for the next sync (write_slice and write_copy). */
static void slice_written(struct qcow2_cache *c, int i, int ret)
{
	struct qcow2_slice *e = &c->sl[i];

	if (ret < 0) {
		log_error("%s: writing %s slice at %#llx: %s", c->s->bs->filename, c->name,
			  (unsigned long long)e->key, strerror(-ret));
	} else if (!e->unsynced) {
		e->unsynced = true;
		c->nunsynced++;
	}
}

static int write_slice(struct qcow2_cache *c, int i)
{
	int ret = qcow2_pwrite_meta(c->s, slice_site(c), slice_data(c, i), c->slice_size,
				    c->sl[i].key);

	slice_written(c, i, ret);
	if (ret < 0)
		return ret;
	c->sl[i].dirty = false;
	c->ndirty--;
	wb_del_if_done(c, i);
	return 0;
}

void qcow2_cache_synced(struct qcow2_cache *c, bool ok)
{
	for (uint32_t i = 0; i < c->used && c->nunsynced; i++) {
		struct qcow2_slice *e = &c->sl[i];
		if (!e->unsynced)
			continue;
		e->unsynced = false;
		c->nunsynced--;
		if (!ok && e->key != EMPTY)
			set_dirty(c, (int)i, ++c->seq);
	}
}

/* Find a slot for a new slice: a never-used one, else the least recently
 * used unpinned slice (written back first if dirty). */
static int get_slot(struct qcow2_cache *c)
{
	int ret;

	if (c->used < c->n) {
		int i = (int)c->used++;
		c->sl[i].key = EMPTY;
		c->sl[i].hnext = -1;
		c->sl[i].ref = 0;
		c->sl[i].dirty = false;
		c->sl[i].unsynced = false;
		lru_push_head(c, i);
		return i;
	}
	for (int32_t i = c->lru_tail; i >= 0; i = c->sl[i].prev) {
		if (c->sl[i].ref)
			continue;
		if (c->sl[i].dirty) {
			if (c->is_l2) {
				ret = l2_write_barrier(c->s);
				if (ret < 0)
					return ret;
			}
			/* The barrier may have yielded; the slot may be taken. */
			if (c->sl[i].ref)
				continue;
			if (c->sl[i].dirty) {
				ret = write_slice(c, i);
				if (ret < 0)
					return ret;
			}
			if (c->sl[i].ref || c->sl[i].dirty)
				continue;
		}
		if (c->sl[i].key != EMPTY)
			hash_remove(c, i);
		if (c->sl[i].unsynced) {
			c->sl[i].unsynced = false;
			c->nunsynced--;
		}
		lru_unlink(c, i);
		lru_push_head(c, i);
		return i;
	}
	log_error("%s: %s cache: every slice is pinned", c->s->bs->filename, c->name);
	return -ENOMEM;
}

int qcow2_cache_get(struct qcow2_cache *c, uint64_t off, bool fresh, int *idx, void **data)
{
	int i = lookup(c, off);
	int ret;

	if (i >= 0) {
		if (fresh)
			memset(slice_data(c, i), 0, c->slice_size);
		goto hit;
	}
	i = get_slot(c);
	if (i < 0)
		return i;
	if (fresh) {
		memset(slice_data(c, i), 0, c->slice_size);
	} else {
		/* Pin while reading so the slot is not handed out twice. */
		c->sl[i].ref++;
		ret = io_pread(c->s->file, slice_data(c, i), c->slice_size, off);
		c->sl[i].ref--;
		if (ret < 0) {
			log_error("%s: reading %s slice at %#llx: %s", c->s->bs->filename,
				  c->name, (unsigned long long)off, strerror(-ret));
			return ret;
		}
	}
	hash_insert(c, i, off);
hit:
	c->sl[i].ref++;
	lru_unlink(c, i);
	lru_push_head(c, i);
	*idx = i;
	*data = slice_data(c, i);
	return 0;
}

void qcow2_cache_put(struct qcow2_cache *c, int idx)
{
	if (idx >= 0 && c->sl[idx].ref)
		c->sl[idx].ref--;
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, int idx)
{
	set_dirty(c, idx, ++c->seq);
}

bool qcow2_cache_has_dirty(const struct qcow2_cache *c)
{
	return c->ndirty != 0;
}

int qcow2_cache_writeback(struct qcow2_cache *c)
{
	int ret;

	if (!qcow2_cache_has_dirty(c))
		return 0;
	if (c->is_l2) {
		ret = l2_write_barrier(c->s);
		if (ret < 0)
			return ret;
	}
	/* The lock stays held: only this loop changes the list. */
	for (int32_t i = c->wb_head, next; i >= 0; i = next) {
		next = c->sl[i].wnext;
		if (!c->sl[i].dirty || c->sl[i].inflight)
			continue;
		ret = write_slice(c, i);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Write slice @i (dirty, not in flight; the L2 barrier passed) as a copy
 * with the lock dropped (see the top). */
static int write_copy(struct qcow2_cache *c, int i)
{
	struct qcow2_state *s = c->s;
	enum qcow2_site site = slice_site(c);
	struct qcow2_slice *e = &c->sl[i];
	uint8_t *copy;
	int ret;

	if (!c->shadow) {
		void *p = mmap(NULL, c->mem_len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED)
			return -ENOMEM;
		c->shadow = p;
	}
	ret = qcow2_check_meta_write(s, site, e->key, c->slice_size);
	if (ret < 0)
		return ret;
	copy = c->shadow + (size_t)i * c->slice_size;
	memcpy(copy, slice_data(c, i), c->slice_size);
	e->inflight = true;
	e->inflight_seq = e->dirty_seq;
	e->ref++;
	c->ninflight++;
	e->dirty = false;
	c->ndirty--;

	co_mutex_unlock(&s->lock);
	ret = qcow2_pwrite_meta_checked(s, site, copy, c->slice_size, e->key);
	co_mutex_lock(&s->lock);

	e->inflight = false;
	e->ref--;
	c->ninflight--;
	slice_written(c, i, ret);
	if (ret < 0)
		set_dirty(c, i, e->inflight_seq);
	wb_del_if_done(c, i);
	co_queue_wake_all(&e->wq);
	if (!c->ninflight)
		co_queue_wake_all(&c->idle);
	return ret;
}

int qcow2_cache_write_through(struct qcow2_cache *c)
{
	uint64_t asked = c->seq;
	int32_t i;
	int ret;

	for (;;) {
		/* Decided afresh after every wait and write: the list changed. */
		for (i = c->wb_head; i >= 0; i = c->sl[i].wnext) {
			const struct qcow2_slice *e = &c->sl[i];
			if ((e->inflight && e->inflight_seq <= asked) ||
			    (e->dirty && e->dirty_seq <= asked))
				break;
		}
		if (i < 0)
			return 0;
		if (c->sl[i].inflight) {
			co_queue_wait_unlock(&c->sl[i].wq, &c->s->lock);
			continue;
		}
		/* Yields with the lock held: slice i stays as it is. */
		ret = c->is_l2 ? l2_write_barrier(c->s) : 0;
		/* Copies in flight pin their slices: half the cache at most,
		 * the rest is for lookups; past that this one is written with
		 * the lock held, as other writers do. */
		if (ret == 0)
			ret = c->ninflight < c->n / 2 ? write_copy(c, i) : write_slice(c, i);
		if (ret < 0)
			return ret;
	}
}

uint64_t qcow2_cache_written_below(const struct qcow2_cache *c)
{
	uint64_t below = UINT64_MAX;

	for (int32_t i = c->wb_head; i >= 0; i = c->sl[i].wnext) {
		const struct qcow2_slice *e = &c->sl[i];
		if (e->dirty)
			below = MIN(below, e->dirty_seq);
		if (e->inflight)
			below = MIN(below, e->inflight_seq);
	}
	return below;
}

void qcow2_cache_drain(struct qcow2_cache *c)
{
	while (c->ninflight)
		co_queue_wait_unlock(&c->idle, &c->s->lock);
}

void qcow2_cache_invalidate(struct qcow2_cache *c, uint64_t off, uint64_t len)
{
	uint64_t nslices = len / c->slice_size;

	if (nslices < c->used) {
		/* Few slices: look each one up. */
		for (uint64_t k = 0; k < nslices; k++) {
			int i = lookup(c, off + k * c->slice_size);
			if (i >= 0 && !c->sl[i].ref && !c->sl[i].dirty)
				hash_remove(c, i);
		}
		return;
	}
	for (uint32_t i = 0; i < c->used; i++) {
		struct qcow2_slice *e = &c->sl[i];
		if (e->key == EMPTY || e->key < off || e->key - off >= len)
			continue;
		if (e->ref || e->dirty)
			continue;
		hash_remove(c, (int)i);
	}
}
