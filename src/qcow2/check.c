/* SPDX-License-Identifier: MIT */
/*
 * qcow2 consistency check and repair: `qublk check` and the repair of
 * dirty (lazy refcounts) images at open.
 *
 * Works on the image file through the io layer, not through the driver:
 * header (header.c), snapshot table (snapshot.c), the active L1 table and
 * every snapshot's, all their L2 tables, the refcount table and blocks.
 * It classifies what it finds exactly as qemu-img check does, so that the
 * two agree on exit codes and on the numbers of corruptions and leaks:
 *
 *  - the expected refcount of every host cluster is rebuilt in memory
 *    ("refs": a packed array at the image's refcount width, one entry
 *    per cluster of the file, the same layout as refcount blocks so that
 *    a block is a slice of it) from the references: cluster 0, every L1
 *    table, L2 table and data or compressed cluster, the snapshot table,
 *    the refcount table and blocks.  A reference that would overflow the
 *    width, or lies a cluster or more past EOF, is a corruption;
 *  - the refcounts on disk are loaded into a second array ("disk") of the
 *    same layout and compared: lower than the references is a
 *    corruption, higher a leak; 0 where references exist, or a refcount
 *    block that is misplaced, means the structure must be rebuilt;
 *  - L1/L2 entries with reserved bits, misaligned offsets, COPIED on
 *    compressed clusters are corruptions, and so is OFLAG_COPIED not
 *    matching "refcount == 1" on the active L1 and its L2 tables;
 *  - v3 snapshot entries without the 16 bytes of extra data, and snapshot
 *    L1 tables that are misaligned or too large, are corruptions.
 *
 * Repair (QCOW2_FIX_ERRORS) goes further than QEMU where QEMU leaves an
 * image corrupt: entries that cannot be trusted are dropped (reported
 * one by one): L1/L2 entries pointing past EOF or misaligned, compressed
 * clusters past EOF, references that overflow the refcount width,
 * snapshots whose L1 table is unusable.  A dropped data cluster reads as
 * zeros (v3: zero flag; v2: unallocated).
 *
 * Crash safety of a repair: nothing that holds guest data or mappings is
 * overwritten except by its repaired value, and every step ends with a
 * sync before the next depends on it:
 *   1. a rewritten snapshot table goes to the end of the file, then the
 *      header is switched (one sector, synced);
 *   2. dropped or repaired L1/L2 entries are written, then synced;
 *   3. refcounts are fixed in place (only values change), or a new
 *      refcount structure is written into clusters no reference uses
 *      (the old structure stays counted, so it is not overwritten),
 *      synced, and only then the header points at it (synced); the old
 *      structure is then freed as leaks;
 *   4. OFLAG_COPIED is fixed from the final refcounts;
 *   5. the dirty and corrupt bits are cleared only if nothing is left.
 * A power cut between any two writes leaves references intact and
 * refcounts merely stale, which the next repair rebuilds.
 *
 * Thread model: one call runs in coroutines of the calling thread (L2
 * tables and refcount blocks are read several at a time); no other user
 * of the file may run meanwhile.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/aio.h"
#include "common/coro.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"

#define PREFETCH_BYTES (8u << 20)      /* L2 tables read ahead, in bytes */
#define PREFETCH_MAX 16

/* What a reference did to the expected refcounts (inc_range). */
enum { REF_OK, REF_PAST_EOF, REF_OVERFLOW };

struct prefetch {
	struct chk *c;
	struct coro *co;
	uint64_t off;
	uint8_t *buf;
	int ret;
};

struct chk {
	struct io_file *f;
	const struct qcow2_check_opts *o;
	struct qcow2_check_result *res;
	struct qcow2_meta m;
	struct qcow2_snapshot *snaps;
	uint32_t nb_snaps;
	uint64_t snap_table_bytes;
	unsigned fix;

	uint32_t cluster_bits, cs, l2_entries;
	unsigned ext;                   /* extended L2: 16-byte entries */
	bool data_file;                 /* guest data in an external data file */
	unsigned rc_order;
	uint64_t rc_max;
	uint32_t rb_bits;               /* log2 refcount entries per block */
	uint32_t csize_shift;
	uint64_t csize_mask, coffset_mask;
	uint64_t file_size;

	/* Expected refcounts: nb_clusters entries in use, cap allocated
	 * (a whole number of refcount blocks). */
	uint8_t *refs;
	uint64_t nb_clusters, cap;
	bool rebuild;

	/* On-disk refcounts of clusters [0, disk_cap) and the refcount table. */
	uint8_t *disk;
	uint64_t disk_cap;
	uint64_t *rt;
	uint32_t rt_size;
	bool *rb_bad;                   /* per reftable entry: misaligned block */
	bool signalled;

	/* Slow path for refcounts of clusters past disk_cap. */
	uint8_t *rb_slot;
	uint64_t rb_slot_off;

	struct prefetch pf[PREFETCH_MAX];
	unsigned npf;
	unsigned pf_pending;
	struct co_queue pf_wait;

	uint64_t work_done, work_total;
	int err;                        /* first I/O error of a repair write */
	char *errbuf;
	size_t errlen;
};

static void report(struct chk *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void report(struct chk *c, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	if (!c->o->report)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	c->o->report(c->o->opaque, line);
}

static void progress(struct chk *c, uint64_t n)
{
	c->work_done += n;
	if (c->o->progress && c->work_total)
		c->o->progress(c->o->opaque, MIN(c->work_done, c->work_total), c->work_total);
}

static uint64_t size_to_clusters(const struct chk *c, uint64_t bytes)
{
	return (bytes >> c->cluster_bits) + ((bytes & (c->cs - 1)) != 0);
}

/* Bytes of a packed refcount array of @n entries, whole blocks. */
static uint64_t rc_array_bytes(const struct chk *c, uint64_t n)
{
	uint64_t per_block = 1ull << c->rb_bits;
	return DIV_ROUND_UP(n, per_block) * c->cs;
}

static const char *fix_word(const struct chk *c)
{
	return (c->fix & QCOW2_FIX_ERRORS) ? "Repairing" : "ERROR";
}

/* ---- expected refcounts ------------------------------------------------ */

static int refs_reserve(struct chk *c, uint64_t n)
{
	if (n <= c->cap)
		return 0;
	uint64_t want = MAX(n, c->cap + c->cap / 2);
	uint64_t old_bytes = rc_array_bytes(c, c->cap), bytes = rc_array_bytes(c, want);
	if (bytes > SIZE_MAX)
		return -ENOMEM;
	uint8_t *p = realloc(c->refs, bytes);
	if (!p)
		return -ENOMEM;
	memset(p + old_bytes, 0, bytes - old_bytes);
	c->refs = p;
	c->cap = (bytes / c->cs) << c->rb_bits;
	return 0;
}

static uint64_t refs_get(const struct chk *c, uint64_t k)
{
	return k < c->nb_clusters ? qcow2_rc_get(c->refs, k, c->rc_order) : 0;
}

/* A region past EOF by a cluster or more cannot be counted (QEMU's rule:
 * the last cluster of an image may be partly allocated). */
static bool past_eof(const struct chk *c, uint64_t off, uint64_t size)
{
	uint64_t end;
	return ckd_add(&end, off, size) || end > c->file_size + c->cs - 1;
}

/* One more reference to every cluster of [off, off+size). */
static int inc_range(struct chk *c, uint64_t off, uint64_t size, int *what)
{
	*what = REF_OK;
	if (size == 0)
		return 0;
	if (past_eof(c, off, size)) {
		report(c, "ERROR: counting reference for region exceeding the end of the file by one "
			  "cluster or more: offset 0x%llx size 0x%llx",
		       (unsigned long long)off, (unsigned long long)size);
		c->res->corruptions++;
		*what = REF_PAST_EOF;
		return 0;
	}
	uint64_t first = off >> c->cluster_bits, last = (off + size - 1) >> c->cluster_bits;
	for (uint64_t k = first; k <= last; k++) {
		if (k >= c->nb_clusters) {
			int ret = refs_reserve(c, k + 1);
			if (ret < 0) {
				c->res->check_errors++;
				return ret;
			}
			c->nb_clusters = k + 1;
		}
		uint64_t rc = qcow2_rc_get(c->refs, k, c->rc_order);
		if (rc == c->rc_max) {
			report(c, "ERROR: overflow cluster offset=0x%llx",
			       (unsigned long long)(k << c->cluster_bits));
			c->res->corruptions++;
			*what = REF_OVERFLOW;
			continue;
		}
		qcow2_rc_set(c->refs, k, c->rc_order, rc + 1);
	}
	return 0;
}

/* ---- reads, several in flight ------------------------------------------ */

static void pf_main(void *opaque)
{
	struct prefetch *p = opaque;
	struct chk *c = p->c;

	p->ret = io_pread(c->f, p->buf, c->cs, p->off);
	if (--c->pf_pending == 0)
		co_queue_wake_all(&c->pf_wait);
}

static int pf_init(struct chk *c)
{
	c->npf = MAX(1u, MIN((unsigned)PREFETCH_MAX, PREFETCH_BYTES / c->cs));
	for (unsigned i = 0; i < c->npf; i++) {
		c->pf[i].c = c;
		c->pf[i].buf = io_alloc(c->cs);
		c->pf[i].co = coro_new(pf_main, &c->pf[i], 0);
		if (!c->pf[i].buf || !c->pf[i].co)
			return -ENOMEM;
	}
	return 0;
}

static void pf_deinit(struct chk *c)
{
	for (unsigned i = 0; i < PREFETCH_MAX; i++) {
		io_free(c->pf[i].buf);
		if (c->pf[i].co)
			coro_free(c->pf[i].co);
	}
}

/* Read one cluster at each of @offs[0..n) (n <= npf) into pf[i].buf. */
static void pf_read(struct chk *c, const uint64_t *offs, unsigned n)
{
	c->pf_pending = n;
	for (unsigned i = 0; i < n; i++) {
		c->pf[i].off = offs[i];
		coro_reset(c->pf[i].co, pf_main, &c->pf[i]);
		aio_schedule(c->pf[i].co);
	}
	while (c->pf_pending)
		co_queue_wait(&c->pf_wait);
}

/* ---- repair writes ----------------------------------------------------- */

static void write_failed(struct chk *c, const char *what, int ret)
{
	report(c, "ERROR: writing %s: %s", what, strerror(-ret));
	c->res->check_errors++;
	if (!c->err)
		c->err = ret;
}

static int write_be64(struct chk *c, uint64_t off, uint64_t v, const char *what)
{
	uint8_t b[8];

	put_be64(b, v);
	int ret = io_pwrite(c->f, b, 8, off);
	if (ret < 0)
		write_failed(c, what, ret);
	return ret;
}

static int sync_file(struct chk *c)
{
	int ret = io_flush(c->f);
	if (ret < 0)
		write_failed(c, "(sync)", ret);
	return ret;
}

/* L2 entry @i of table @t, and its subcluster bitmap (extended L2). */
#define L2E_AT(c, t, i) ((t) + ((size_t)(i) << (3 + (c)->ext)))
static uint64_t l2_bitmap(const struct chk *c, const uint8_t *t, uint32_t i)
{
	return c->ext ? get_be64(L2E_AT(c, t, i) + 8) : 0;
}

/* Replace entry @i's mapping with one that reads as zeros. */
static void drop_entry(const struct chk *c, uint8_t *t, uint32_t i)
{
	if (c->ext) {
		put_be64(L2E_AT(c, t, i), 0);
		put_be64(L2E_AT(c, t, i) + 8, QCOW2_BITMAP_ALL_ZERO);
		return;
	}
	put_be64(L2E_AT(c, t, i), c->m.h.version >= 3 ? QCOW2_OFLAG_ZERO : 0);
}

/* ---- L2 tables (qcow2.rst "Cluster mapping") --------------------------- */

enum { L2_ACTIVE = 1, L2_FRAG = 2 };

/* The zero flag ("Standard Cluster Descriptor" bit 0) means nothing
 * with extended L2. */
#define is_zero_flag(e) (!c->ext && ((e) & QCOW2_OFLAG_ZERO))

/* Account for one L2 table read into @t (at @l2_off).  With
 * QCOW2_FIX_ERRORS, bad entries are repaired in @t; *dirty says so. */
static int check_l2(struct chk *c, uint8_t *t, uint64_t l2_off, unsigned flags, bool *dirty)
{
	uint64_t next_contig = 0;
	bool fix = c->fix & QCOW2_FIX_ERRORS;
	int what, ret;

	*dirty = false;
	for (uint32_t i = 0; i < c->l2_entries; i++) {
		uint64_t e = get_be64(L2E_AT(c, t, i));
		uint64_t b = l2_bitmap(c, t, i);
		bool compressed = e & QCOW2_OFLAG_COMPRESSED;

		if (c->ext && !compressed && !(e & QCOW2_L2E_OFFSET_MASK) && (b & 0xffffffffull)) {
			/* "Extended L2 Entries": no allocated subcluster without a
			 * host cluster. */
			report(c, "%s: Unallocated cluster has non-zero subcluster allocation map",
			       fix ? "Repairing" : "ERROR");
			c->res->corruptions++;
			if (fix) {
				put_be64(L2E_AT(c, t, i) + 8, b & ~0xffffffffull);
				*dirty = true;
				c->res->corruptions--;
				c->res->corruptions_fixed++;
			}
		}
		if (c->ext && compressed && b) {
			report(c, "ERROR compressed cluster %u with non-zero subcluster allocation bitmap, "
				  "entry=0x%llx", i, (unsigned long long)e);
			c->res->corruptions++;
		}
		if (!e)
			continue;
		if (!compressed && (e & QCOW2_L2E_RESERVED_MASK)) {
			report(c, "%s found l2 entry with reserved bits set: %llx", fix ? "Repairing" : "ERROR",
			       (unsigned long long)e);
			c->res->corruptions++;
			if (fix) {
				e &= ~QCOW2_L2E_RESERVED_MASK;
				put_be64(L2E_AT(c, t, i), e);
				*dirty = true;
				c->res->corruptions--;
				c->res->corruptions_fixed++;
			}
		}
		if (compressed) {
			if (e & QCOW2_OFLAG_COPIED) {
				report(c, "%s: coffset=0x%llx: copied flag must never be set for compressed "
					  "clusters", fix ? "Repairing" : "ERROR",
				       (unsigned long long)(e & c->coffset_mask));
				e &= ~QCOW2_OFLAG_COPIED;
				c->res->corruptions++;
				if (fix) {
					put_be64(L2E_AT(c, t, i), e);
					*dirty = true;
					c->res->corruptions--;
					c->res->corruptions_fixed++;
				}
			}
			/* "Compressed Clusters Descriptor" */
			uint64_t coff = e & c->coffset_mask;
			uint64_t nsec = ((e >> c->csize_shift) & c->csize_mask) + 1;
			uint64_t csize = nsec * QCOW2_COMPRESSED_SECTOR_SIZE -
					 (coff & (QCOW2_COMPRESSED_SECTOR_SIZE - 1));
			uint64_t before = c->res->corruptions;
			ret = inc_range(c, coff, csize, &what);
			if (ret < 0)
				return ret;
			if (fix && what != REF_OK) {
				report(c, "Repairing: dropping compressed cluster entry %u of L2 table "
					  "0x%llx (0x%llx): %s", i, (unsigned long long)l2_off,
				       (unsigned long long)e,
				       what == REF_PAST_EOF ? "past the end of the file"
							    : "refcount overflow");
				drop_entry(c, t, i);
				*dirty = true;
				c->res->corruptions_fixed += c->res->corruptions - before;
				c->res->corruptions = before;
				continue;
			}
			if (flags & L2_FRAG) {
				c->res->allocated_clusters++;
				c->res->compressed_clusters++;
				c->res->fragmented_clusters++;
			}
			continue;
		}
		uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
		if (c->data_file) {
			/* Guest data is in the data file: nothing to count here
			 * (QEMU's check does not look at it either). */
			if ((flags & L2_FRAG) && (off || (e & QCOW2_OFLAG_COPIED)))
				c->res->allocated_clusters++;
			continue;
		}
		if (!off)
			continue;       /* unallocated or plain zero cluster */
		if (!IS_ALIGNED(off, c->cs)) {
			c->res->corruptions++;
			if (is_zero_flag(e)) {
				report(c, "%s offset=%llx: Preallocated cluster is not properly aligned; "
					  "L2 entry corrupted.", fix_word(c), (unsigned long long)off);
			} else {
				report(c, "%s offset=%llx: Data cluster is not properly aligned; L2 entry "
					  "corrupted.", fix ? "Repairing" : "ERROR", (unsigned long long)off);
			}
			if (fix) {
				if (!is_zero_flag(e))
					report(c, "Repairing: dropping data cluster entry %u of L2 table 0x%llx "
						  "(0x%llx): misaligned", i, (unsigned long long)l2_off,
					       (unsigned long long)e);
				if (is_zero_flag(e))
					put_be64(L2E_AT(c, t, i), QCOW2_OFLAG_ZERO);
				else
					drop_entry(c, t, i);
				*dirty = true;
				c->res->corruptions--;
				c->res->corruptions_fixed++;
				continue;
			}
		}
		if (fix && past_eof(c, off, c->cs)) {
			report(c, "Repairing: dropping data cluster entry %u of L2 table 0x%llx (0x%llx): "
				  "past the end of the file", i, (unsigned long long)l2_off,
			       (unsigned long long)e);
			drop_entry(c, t, i);
			*dirty = true;
			c->res->corruptions_fixed++;
			continue;
		}
		if (flags & L2_FRAG) {
			c->res->allocated_clusters++;
			if (next_contig && off != next_contig)
				c->res->fragmented_clusters++;
			next_contig = off + c->cs;
		}
		uint64_t before = c->res->corruptions;
		ret = inc_range(c, off, c->cs, &what);
		if (ret < 0)
			return ret;
		if (fix && what != REF_OK) {
			report(c, "Repairing: dropping data cluster entry %u of L2 table 0x%llx (0x%llx): "
				  "refcount overflow", i, (unsigned long long)l2_off, (unsigned long long)e);
			drop_entry(c, t, i);
			*dirty = true;
			c->res->corruptions_fixed += c->res->corruptions - before;
			c->res->corruptions = before;
		}
	}
	return 0;
}

/* ---- L1 tables --------------------------------------------------------- */

static uint64_t *read_table(struct chk *c, uint64_t off, uint32_t n, int *ret)
{
	uint64_t *t = malloc(n ? (size_t)n * 8 : 8);
	uint8_t *buf = io_alloc(n ? (size_t)n * 8 : 8);

	*ret = 0;
	if (!t || !buf) {
		*ret = -ENOMEM;
	} else if (n) {
		*ret = io_pread(c->f, buf, (size_t)n * 8, off);
		for (uint32_t i = 0; *ret == 0 && i < n; i++)
			t[i] = get_be64(buf + 8 * (size_t)i);
	}
	io_free(buf);
	if (*ret) {
		free(t);
		return NULL;
	}
	return t;
}

/* Account for the L1 table at @l1_off (@n entries) and everything it
 * maps.  @what names it in repair messages. */
static int check_l1(struct chk *c, uint64_t l1_off, uint32_t n, unsigned flags, const char *what)
{
	bool fix = c->fix & QCOW2_FIX_ERRORS;
	uint64_t offs[PREFETCH_MAX];
	uint32_t idx[PREFETCH_MAX];
	int ret, w;

	if (n == 0)
		return 0;
	ret = inc_range(c, l1_off, (uint64_t)n * 8, &w);
	if (ret < 0)
		return ret;
	uint64_t *l1 = read_table(c, l1_off, n, &ret);
	if (!l1) {
		report(c, "ERROR: I/O error reading the %s: %s", what, strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	for (uint32_t i = 0; i < n;) {
		/* Read the next L2 tables ahead, then account in L1 order. */
		unsigned k = 0;
		uint32_t j = i;
		for (; j < n && k < c->npf; j++) {
			if (!l1[j])
				continue;
			idx[k] = j;
			offs[k++] = l1[j] & QCOW2_L1E_OFFSET_MASK;
		}
		pf_read(c, offs, k);
		for (unsigned p = 0; p < k; p++) {
			uint32_t li = idx[p];
			uint64_t e = l1[li];
			uint64_t before = c->res->corruptions;

			if (e & QCOW2_L1E_RESERVED_MASK) {
				report(c, "%s found L1 entry with reserved bits set: %llx",
				       fix ? "Repairing" : "ERROR", (unsigned long long)e);
				c->res->corruptions++;
				if (fix) {
					e &= ~QCOW2_L1E_RESERVED_MASK;
					l1[li] = e;
					if (write_be64(c, l1_off + 8ull * li, e, what) == 0) {
						c->res->corruptions--;
						c->res->corruptions_fixed++;
					}
					before = c->res->corruptions;
					if (!e)
						continue;
				}
			}
			uint64_t l2_off = e & QCOW2_L1E_OFFSET_MASK;
			bool misaligned = !IS_ALIGNED(l2_off, c->cs);
			if (fix && (misaligned || past_eof(c, l2_off, c->cs))) {
				report(c, "Repairing: dropping entry %u of the %s (0x%llx): L2 table %s", li,
				       what, (unsigned long long)e,
				       misaligned ? "not cluster aligned" : "past the end of the file");
				l1[li] = 0;
				if (write_be64(c, l1_off + 8ull * li, 0, what) == 0)
					c->res->corruptions_fixed++;
				continue;
			}
			ret = inc_range(c, l2_off, c->cs, &w);
			if (ret < 0)
				goto out;
			if (fix && w == REF_OVERFLOW) {
				report(c, "Repairing: dropping entry %u of the %s (0x%llx): refcount overflow",
				       li, what, (unsigned long long)e);
				l1[li] = 0;
				if (write_be64(c, l1_off + 8ull * li, 0, what) == 0) {
					c->res->corruptions_fixed += c->res->corruptions - before;
					c->res->corruptions = before;
				}
				continue;
			}
			if (misaligned) {
				report(c, "ERROR l2_offset=%llx: Table is not cluster aligned; L1 entry corrupted",
				       (unsigned long long)l2_off);
				c->res->corruptions++;
			}
			if (c->pf[p].ret < 0) {
				report(c, "ERROR: I/O error in check_refcounts_l2");
				c->res->check_errors++;
				ret = c->pf[p].ret;
				goto out;
			}
			bool dirty;
			ret = check_l2(c, c->pf[p].buf, l2_off, flags, &dirty);
			if (ret < 0)
				goto out;
			if (dirty) {
				ret = io_pwrite(c->f, c->pf[p].buf, c->cs, l2_off);
				if (ret < 0) {
					write_failed(c, "an L2 table", ret);
					goto out;
				}
			}
		}
		progress(c, j - i);
		i = j;
	}
	ret = 0;
out:
	free(l1);
	return ret;
}

/* ---- refcount structure ------------------------------------------------ */

static int load_reftable(struct chk *c)
{
	const struct qcow2_header *h = &c->m.h;
	int ret;

	free(c->rt);
	free(c->rb_bad);
	c->rt_size = (uint32_t)(((uint64_t)h->reftable_clusters << c->cluster_bits) / 8);
	c->rt = read_table(c, h->reftable_offset, c->rt_size, &ret);
	c->rb_bad = calloc(c->rt_size ? c->rt_size : 1, sizeof(bool));
	if (!c->rt || !c->rb_bad)
		return ret ? ret : -ENOMEM;
	for (uint32_t i = 0; i < c->rt_size; i++)
		c->rb_bad[i] = !IS_ALIGNED(c->rt[i] & QCOW2_REFT_OFFSET_MASK, c->cs);
	return 0;
}

/* Load the refcount blocks covering clusters [0, nb_clusters) into c->disk. */
static int load_disk_refcounts(struct chk *c)
{
	uint64_t nblocks = DIV_ROUND_UP(c->nb_clusters, 1ull << c->rb_bits);
	uint64_t offs[PREFETCH_MAX];
	uint64_t bi[PREFETCH_MAX];

	nblocks = MIN(nblocks, (uint64_t)c->rt_size);
	free(c->disk);
	c->disk_cap = nblocks << c->rb_bits;
	c->disk = calloc(nblocks ? nblocks : 1, c->cs);
	if (!c->disk)
		return -ENOMEM;
	for (uint64_t i = 0; i < nblocks;) {
		unsigned k = 0;
		for (; i < nblocks && k < c->npf; i++) {
			uint64_t off = c->rt[i] & QCOW2_REFT_OFFSET_MASK;
			if (!off || c->rb_bad[i])
				continue;
			bi[k] = i;
			offs[k++] = off;
		}
		pf_read(c, offs, k);
		for (unsigned p = 0; p < k; p++) {
			if (c->pf[p].ret < 0) {
				report(c, "ERROR: reading refcount block %llu: %s", (unsigned long long)bi[p],
				       strerror(-c->pf[p].ret));
				c->res->check_errors++;
				return c->pf[p].ret;
			}
			memcpy(c->disk + bi[p] * c->cs, c->pf[p].buf, c->cs);
		}
	}
	return 0;
}

/* Refcount of cluster @k as the image says (QEMU's qcow2_get_refcount):
 * 0 when no block covers it, -EIO when its block is misaligned. */
static int disk_refcount(struct chk *c, uint64_t k, uint64_t *rc)
{
	uint64_t i = k >> c->rb_bits;

	*rc = 0;
	if (i >= c->rt_size)
		return 0;
	uint64_t off = c->rt[i] & QCOW2_REFT_OFFSET_MASK;
	if (!off)
		return 0;
	if (c->rb_bad[i]) {
		if (!c->signalled)
			report(c, "qcow2: Image is corrupt: Refblock offset %#llx unaligned (reftable "
				  "index: %#llx); further non-fatal corruption events will be suppressed",
			       (unsigned long long)off, (unsigned long long)i);
		c->signalled = true;
		return -EIO;
	}
	if (k < c->disk_cap) {
		*rc = qcow2_rc_get(c->disk, k, c->rc_order);
		return 0;
	}
	if (!c->rb_slot && !(c->rb_slot = io_alloc(c->cs)))
		return -ENOMEM;
	if (c->rb_slot_off != off) {
		int ret = io_pread(c->f, c->rb_slot, c->cs, off);
		if (ret < 0)
			return ret;
		c->rb_slot_off = off;
	}
	*rc = qcow2_rc_get(c->rb_slot, k & ((1ull << c->rb_bits) - 1), c->rc_order);
	return 0;
}

/* QEMU's check_refblocks: count every refcount block; a misplaced one
 * means the structure must be rebuilt. */
static int check_refblocks(struct chk *c)
{
	int what, ret;

	for (uint32_t i = 0; i < c->rt_size; i++) {
		uint64_t e = c->rt[i], off = e & QCOW2_REFT_OFFSET_MASK;
		uint64_t k = off >> c->cluster_bits;

		if (e & QCOW2_REFT_RESERVED_MASK) {
			report(c, "ERROR refcount table entry %u has reserved bits set", i);
			c->res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (c->rb_bad[i]) {
			report(c, "ERROR refcount block %u is not cluster aligned; refcount table entry "
				  "corrupted", i);
			c->res->corruptions++;
			c->rebuild = true;
			continue;
		}
		if (k >= c->nb_clusters) {
			report(c, "ERROR refcount block %u is outside image", i);
			c->res->corruptions++;
			if (c->fix & QCOW2_FIX_ERRORS)
				c->rebuild = true;
			continue;
		}
		if (off) {
			ret = inc_range(c, off, c->cs, &what);
			if (ret < 0)
				return ret;
			/* Counted already by something else (full at 1 bit):
			 * the block must move. */
			if (what == REF_OVERFLOW && (c->fix & QCOW2_FIX_ERRORS))
				c->rebuild = true;
			if (refs_get(c, k) != 1) {
				report(c, "ERROR refcount block %u refcount=%llu", i,
				       (unsigned long long)refs_get(c, k));
				c->res->corruptions++;
				c->rebuild = true;
			}
		}
	}
	return 0;
}

/* The persistent dirty bitmaps' clusters (directory, tables, data) are
 * referenced when the autoclear bit vouches for the extension, as QEMU's
 * check counts them. */
static int count_bitmaps(struct chk *c)
{
	struct qcow2_bitmap *bms = NULL;
	uint64_t dir_off, dir_size;
	uint32_t nb = 0, nb32;
	char err[256] = "";
	int ret, what;

	if (!(c->m.h.autoclear & QCOW2_AUTOCLEAR_BITMAPS) ||
	    qcow2_bitmap_ext(&c->m, &nb32, &dir_off, &dir_size) <= 0 || !nb32)
		return 0;
	ret = qcow2_bitmaps_read(c->f, &c->m, c->file_size, &bms, &nb, err, sizeof(err));
	if (ret < 0) {
		report(c, "ERROR bitmaps: %s", err);
		c->res->corruptions++;
		return 0;
	}
	ret = inc_range(c, dir_off, dir_size, &what);
	for (uint32_t i = 0; ret == 0 && i < nb; i++) {
		const struct qcow2_bitmap *b = &bms[i];
		uint64_t *t;

		ret = inc_range(c, b->table_offset, (uint64_t)b->table_size * 8, &what);
		if (ret < 0 || !b->table_size)
			continue;
		t = read_table(c, b->table_offset, b->table_size, &ret);
		for (uint32_t k = 0; t && ret == 0 && k < b->table_size; k++) {
			uint64_t off = t[k] & 0x00fffffffffffe00ull;
			if (off)
				ret = inc_range(c, off, c->cs, &what);
		}
		free(t);
	}
	qcow2_bitmaps_free(bms, nb);
	return ret;
}

/* QEMU's calculate_refcounts: the expected refcount of every cluster. */
static int calculate(struct chk *c)
{
	const struct qcow2_header *h = &c->m.h;
	int what, ret;

	c->nb_clusters = size_to_clusters(c, c->file_size);
	ret = refs_reserve(c, c->nb_clusters);
	if (ret < 0) {
		c->res->check_errors++;
		return ret;
	}
	memset(c->refs, 0, rc_array_bytes(c, c->cap));
	c->res->allocated_clusters = c->res->fragmented_clusters = c->res->compressed_clusters = 0;

	if ((c->fix & QCOW2_FIX_ERRORS) && h->l1_size &&
	    past_eof(c, h->l1_offset, (uint64_t)h->l1_size * 8)) {
		/* Its contents are gone: give it zeros (nothing mapped). */
		uint64_t end = ALIGN_UP(h->l1_offset + (uint64_t)h->l1_size * 8, (uint64_t)c->cs);
		report(c, "Repairing: the active L1 table lies past the end of the file; "
			  "extending the file with an empty one");
		ret = io_truncate(c->f, end);
		if (ret < 0) {
			write_failed(c, "(extending the file)", ret);
			return ret;
		}
		c->file_size = end;
		c->nb_clusters = size_to_clusters(c, end);
		ret = refs_reserve(c, c->nb_clusters);
		if (ret < 0)
			return ret;
		c->res->corruptions_fixed++;
	}
	ret = inc_range(c, 0, c->cs, &what);                      /* header */
	if (ret == 0)
		ret = check_l1(c, h->l1_offset, h->l1_size, L2_ACTIVE | L2_FRAG, "active L1 table");
	for (uint32_t i = 0; ret == 0 && i < c->nb_snaps; i++) {
		const struct qcow2_snapshot *s = &c->snaps[i];
		char what_s[64];
		if (!IS_ALIGNED(s->l1_offset, c->cs)) {
			report(c, "ERROR snapshot %s (%s) l1_offset=%#llx: L1 table is not cluster aligned; "
				  "snapshot table entry corrupted", s->id, s->name,
			       (unsigned long long)s->l1_offset);
			c->res->corruptions++;
			continue;
		}
		if (s->l1_size > QCOW2_MAX_L1_SIZE / 8) {
			report(c, "ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; snapshot "
				  "table entry corrupted", s->id, s->name, s->l1_size);
			c->res->corruptions++;
			continue;
		}
		snprintf(what_s, sizeof(what_s), "L1 table of snapshot %u", i);
		ret = check_l1(c, s->l1_offset, s->l1_size, 0, what_s);
	}
	if (ret == 0 && c->nb_snaps)
		ret = inc_range(c, h->snapshots_offset, c->snap_table_bytes, &what);
	if (ret == 0)
		ret = count_bitmaps(c);
	if (ret == 0)
		ret = inc_range(c, h->reftable_offset, (uint64_t)c->rt_size * 8, &what);
	if (ret == 0 && what == REF_OVERFLOW && (c->fix & QCOW2_FIX_ERRORS))
		c->rebuild = true;      /* the table must move */
	if (ret == 0)
		ret = check_refblocks(c);
	return ret;
}

/* Set the on-disk refcount of cluster @k to @v in c->disk (the caller
 * writes the block back). */
static void disk_set(struct chk *c, uint64_t k, uint64_t v)
{
	qcow2_rc_set(c->disk, k, c->rc_order, v);
}

/* QEMU's compare_refcounts, fixing in place what @fix allows.  Sets
 * c->rebuild when a referenced cluster has no refcount at all. */
static int compare(struct chk *c, unsigned fix, uint64_t *highest)
{
	uint64_t per_block = 1ull << c->rb_bits;

	*highest = 0;
	for (uint64_t b = 0; b * per_block < c->nb_clusters; b++) {
		uint64_t first = b * per_block, end = MIN(c->nb_clusters, first + per_block);
		bool covered = b < c->rt_size && (c->rt[b] & QCOW2_REFT_OFFSET_MASK) && !c->rb_bad[b];
		bool dirty = false;

		/* Fast path: the block matches the expectation byte for byte. */
		if (covered && end == first + per_block && b * per_block + per_block <= c->disk_cap &&
		    !memcmp(c->disk + b * c->cs, c->refs + b * c->cs, c->cs)) {
			for (uint64_t k = end; k-- > first;) {
				if (qcow2_rc_get(c->refs, k, c->rc_order)) {
					*highest = k;
					break;
				}
			}
			progress(c, 1);
			continue;
		}
		for (uint64_t k = first; k < end; k++) {
			uint64_t r1, r2 = qcow2_rc_get(c->refs, k, c->rc_order);
			int ret = disk_refcount(c, k, &r1);
			if (ret < 0) {
				report(c, "Can't get refcount for cluster %llu: %s", (unsigned long long)k,
				       strerror(-ret));
				c->res->check_errors++;
				continue;
			}
			if (r1 || r2)
				*highest = k;
			if (r1 == r2)
				continue;
			uint64_t *fixed = NULL;
			if (r1 == 0)
				c->rebuild = true;
			else if (r1 > r2 && (fix & QCOW2_FIX_LEAKS))
				fixed = &c->res->leaks_fixed;
			else if (r1 < r2 && (fix & QCOW2_FIX_ERRORS))
				fixed = &c->res->corruptions_fixed;
			report(c, "%s cluster %llu refcount=%llu reference=%llu",
			       fixed ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked", (unsigned long long)k,
			       (unsigned long long)r1, (unsigned long long)r2);
			if (fixed && k < c->disk_cap) {
				disk_set(c, k, r2);
				dirty = true;
				(*fixed)++;
				continue;
			}
			if (r1 < r2)
				c->res->corruptions++;
			else
				c->res->leaks++;
		}
		if (dirty) {
			int ret = io_pwrite(c->f, c->disk + b * c->cs, c->cs,
					    c->rt[b] & QCOW2_REFT_OFFSET_MASK);
			if (ret < 0) {
				write_failed(c, "a refcount block", ret);
				return ret;
			}
		}
		progress(c, 1);
	}
	return 0;
}

/* First run of @n clusters whose expected refcount is 0, from *@hint on
 * (no free cluster lies below it); marks them used (refcount 1), growing
 * the array past EOF as needed. */
static int alloc_run(struct chk *c, uint64_t n, uint64_t *hint, uint64_t *first)
{
	uint64_t start = *hint, k = *hint;

	for (;;) {
		if (k >= c->nb_clusters) {
			/* Everything from here on is free. */
			int ret = refs_reserve(c, start + n);
			if (ret < 0)
				return ret;
			c->nb_clusters = MAX(c->nb_clusters, start + n);
			break;
		}
		if (qcow2_rc_get(c->refs, k, c->rc_order)) {
			start = ++k;
			continue;
		}
		if (++k - start == n)
			break;
	}
	*first = start;
	if (start == *hint)
		*hint = start + n;
	for (uint64_t i = start; i < start + n; i++)
		qcow2_rc_set(c->refs, i, c->rc_order, 1);
	return 0;
}

static bool block_in_use(const struct chk *c, uint64_t b)
{
	const uint8_t *p = c->refs + b * c->cs;
	return !buf_is_zero(p, c->cs);
}

/* Write a new refcount structure made from c->refs into free clusters,
 * then point the header at it (qcow2.rst "Refcount table"; crash
 * safety step 3).  The old structure is left counted, i.e. leaked. */
static int rebuild(struct chk *c)
{
	uint64_t per_block = 1ull << c->rb_bits;
	uint64_t *nrt = NULL, nrt_n = 0, rt_first = 0, rt_clusters = 0, hint = 0;
	uint8_t *buf = NULL;
	int ret = 0;

	report(c, "Rebuilding refcount structure");
	for (bool changed = true; changed;) {
		changed = false;
		for (uint64_t b = 0; b * per_block < c->nb_clusters; b++) {
			if (b < nrt_n && nrt[b])
				continue;
			if (!block_in_use(c, b))
				continue;
			uint64_t k;
			ret = alloc_run(c, 1, &hint, &k);
			if (ret < 0)
				goto out;
			if (b >= nrt_n) {
				uint64_t n = MAX(b + 1, DIV_ROUND_UP(c->nb_clusters, per_block));
				uint64_t *p = realloc(nrt, n * 8);
				if (!p) {
					ret = -ENOMEM;
					goto out;
				}
				memset(p + nrt_n, 0, (n - nrt_n) * 8);
				nrt = p;
				nrt_n = n;
			}
			nrt[b] = k << c->cluster_bits;
			changed = true;
		}
		uint64_t need = DIV_ROUND_UP(nrt_n * 8, c->cs);
		if (need * c->cs > QCOW2_MAX_REFTABLE_SIZE) {
			ret = -EFBIG;
			goto out;
		}
		if (rt_clusters < need) {
			for (uint64_t k = rt_first; k < rt_first + rt_clusters; k++)
				qcow2_rc_set(c->refs, k, c->rc_order, 0);
			ret = alloc_run(c, need, &hint, &rt_first);
			if (ret < 0)
				goto out;
			rt_clusters = need;
			changed = true;
		}
	}

	for (uint64_t b = 0; b < nrt_n; b++) {
		if (!nrt[b])
			continue;
		ret = io_pwrite(c->f, c->refs + b * c->cs, c->cs, nrt[b]);
		if (ret < 0)
			goto out;
	}
	buf = io_zalloc(rt_clusters * c->cs);
	if (!buf) {
		ret = -ENOMEM;
		goto out;
	}
	for (uint64_t b = 0; b < nrt_n; b++)
		put_be64(buf + 8 * b, nrt[b]);
	ret = io_pwrite(c->f, buf, rt_clusters * c->cs, rt_first << c->cluster_bits);
	if (ret == 0)
		ret = io_flush(c->f);
	if (ret < 0)
		goto out;
	/* The switch: reftable offset and size, 12 bytes in the first sector. */
	uint8_t hdr[12];
	put_be64(hdr, rt_first << c->cluster_bits);
	put_be32(hdr + 8, (uint32_t)rt_clusters);
	ret = io_pwrite(c->f, hdr, sizeof(hdr), QCOW2_HDR_REFTABLE_OFFSET);
	if (ret == 0)
		ret = io_flush(c->f);
	if (ret < 0)
		goto out;
	c->m.h.reftable_offset = rt_first << c->cluster_bits;
	c->m.h.reftable_clusters = (uint32_t)rt_clusters;
out:
	if (ret < 0) {
		report(c, "ERROR rebuilding the refcount structure: %s", strerror(-ret));
		c->res->check_errors++;
		if (!c->err)
			c->err = ret;
	}
	io_free(buf);
	free(nrt);
	return ret;
}

/* QEMU's check_oflag_copied over the active L1 table and its L2 tables,
 * against the refcounts on disk. */
static int check_copied(struct chk *c)
{
	const struct qcow2_header *h = &c->m.h;
	bool repair;
	uint64_t offs[PREFETCH_MAX];
	uint32_t idx[PREFETCH_MAX];
	int ret;

	if (c->fix & QCOW2_FIX_ERRORS)
		repair = true;
	else if (c->fix & QCOW2_FIX_LEAKS)
		repair = !c->res->check_errors && !c->res->corruptions && !c->res->leaks;
	else
		repair = false;

	uint64_t *l1 = read_table(c, h->l1_offset, h->l1_size, &ret);
	if (!l1) {
		report(c, "ERROR: reading the L1 table: %s", strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	for (uint32_t i = 0; i < h->l1_size;) {
		unsigned k = 0;
		uint32_t j = i;
		for (; j < h->l1_size && k < c->npf; j++) {
			if (!(l1[j] & QCOW2_L1E_OFFSET_MASK))
				continue;
			idx[k] = j;
			offs[k++] = l1[j] & QCOW2_L1E_OFFSET_MASK;
		}
		pf_read(c, offs, k);
		for (unsigned p = 0; p < k; p++) {
			uint32_t li = idx[p];
			uint64_t e = l1[li], l2_off = e & QCOW2_L1E_OFFSET_MASK, rc;
			uint8_t *t = c->pf[p].buf;
			unsigned dirty = 0;

			if (disk_refcount(c, l2_off >> c->cluster_bits, &rc) == 0 &&
			    (rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
				c->res->corruptions++;
				report(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%llx refcount=%llu",
				       repair ? "Repairing" : "ERROR", li, (unsigned long long)e,
				       (unsigned long long)rc);
				if (repair) {
					e = rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
					ret = write_be64(c, h->l1_offset + 8ull * li, e, "the L1 table");
					if (ret < 0)
						goto out;
					l1[li] = e;
					c->res->corruptions--;
					c->res->corruptions_fixed++;
				}
			}
			if (c->pf[p].ret < 0) {
				report(c, "ERROR: Could not read L2 table: %s", strerror(-c->pf[p].ret));
				c->res->check_errors++;
				ret = c->pf[p].ret;
				goto out;
			}
			for (uint32_t n = 0; n < c->l2_entries; n++) {
				uint64_t d = get_be64(L2E_AT(c, t, n));
				uint64_t doff = d & QCOW2_L2E_OFFSET_MASK;
				if ((d & QCOW2_OFLAG_COMPRESSED) || !doff || c->data_file)
					continue;
				if (disk_refcount(c, doff >> c->cluster_bits, &rc) < 0)
					continue;
				if ((rc == 1) == !!(d & QCOW2_OFLAG_COPIED))
					continue;
				c->res->corruptions++;
				report(c, "%s OFLAG_COPIED data cluster: l2_entry=%llx refcount=%llu",
				       repair ? "Repairing" : "ERROR", (unsigned long long)d,
				       (unsigned long long)rc);
				if (repair) {
					d = rc == 1 ? d | QCOW2_OFLAG_COPIED : d & ~QCOW2_OFLAG_COPIED;
					put_be64(L2E_AT(c, t, n), d);
					dirty++;
				}
			}
			if (dirty) {
				ret = io_pwrite(c->f, t, c->cs, l2_off);
				if (ret < 0) {
					write_failed(c, "an L2 table", ret);
					goto out;
				}
				c->res->corruptions -= dirty;
				c->res->corruptions_fixed += dirty;
			}
		}
		i = j;
	}
	ret = 0;
out:
	free(l1);
	return ret;
}

/* QEMU's qcow2_check_refcounts, plus dropping what cannot be repaired. */
static int check_refcounts(struct chk *c)
{
	uint64_t highest = 0;
	int ret;

	c->res->total_clusters = size_to_clusters(c, c->m.h.size);
	ret = load_reftable(c);
	if (ret < 0) {
		report(c, "ERROR: reading the refcount table: %s", strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	c->rebuild = false;
	ret = calculate(c);
	if (ret < 0)
		return ret;
	if (c->fix & QCOW2_FIX_ERRORS) {
		/* Dropped entries must be on disk before their clusters can be
		 * reused for a new refcount structure. */
		ret = sync_file(c);
		if (ret < 0)
			return ret;
	}
	ret = load_disk_refcounts(c);
	if (ret < 0)
		return ret;

	struct qcow2_check_result pre = *c->res;
	ret = compare(c, 0, &highest);
	if (ret < 0)
		return ret;

	if (c->rebuild && (c->fix & QCOW2_FIX_ERRORS)) {
		struct qcow2_check_result old = *c->res;
		uint64_t fresh_leaks = 0;

		ret = rebuild(c);
		if (ret < 0)
			return ret;
		c->res->corruptions = c->res->leaks = 0;
		ret = io_get_size(c->f, &c->file_size);
		if (ret == 0)
			ret = load_reftable(c);
		if (ret < 0) {
			c->res->check_errors++;
			return ret;
		}
		c->rebuild = false;
		unsigned fix = c->fix;
		c->fix = 0;
		ret = calculate(c);
		c->fix = fix;
		if (ret == 0)
			ret = load_disk_refcounts(c);
		if (ret < 0)
			return ret;
		if (c->fix & QCOW2_FIX_LEAKS) {
			/* The old structure is now leaked: free it.  Leaks found
			 * here were made by the rebuild itself. */
			struct qcow2_check_result saved = *c->res;
			memset(c->res, 0, sizeof(*c->res));
			ret = compare(c, QCOW2_FIX_LEAKS, &highest);
			if (c->rebuild)
				report(c, "ERROR rebuilt refcount structure is still broken");
			fresh_leaks = c->res->leaks;
			*c->res = saved;
			if (ret < 0)
				return ret;
			ret = sync_file(c);
			if (ret < 0)
				return ret;
		}
		if (c->res->corruptions < old.corruptions)
			c->res->corruptions_fixed += old.corruptions - c->res->corruptions;
		if (c->res->leaks < old.leaks)
			c->res->leaks_fixed += old.leaks - c->res->leaks;
		c->res->leaks += fresh_leaks;
	} else if (c->fix) {
		if (c->rebuild) {
			report(c, "ERROR need to rebuild refcount structures");
			c->res->check_errors++;
			return -EIO;
		}
		if (c->res->leaks || c->res->corruptions) {
			*c->res = pre;
			ret = compare(c, c->fix, &highest);
			if (ret == 0)
				ret = sync_file(c);
			if (ret < 0)
				return ret;
		}
	}

	ret = check_copied(c);
	if (ret == 0 && c->fix)
		ret = sync_file(c);
	if (ret < 0)
		return ret;
	c->res->image_end_offset = (highest + 1) << c->cluster_bits;
	return 0;
}

/* ---- snapshot table (qcow2.rst "Snapshot table") ----------------------- */

static bool snapshot_unusable(const struct chk *c, const struct qcow2_snapshot *s)
{
	return !IS_ALIGNED(s->l1_offset, c->cs) || s->l1_size > QCOW2_MAX_L1_SIZE / 8 ||
	       past_eof(c, s->l1_offset, (uint64_t)s->l1_size * 8);
}

/* Write the kept snapshot entries, each with at least the 16 bytes of
 * extra data v3 requires, as a new table at the end of the file; then
 * switch the header to it (crash safety step 1). */
static int rewrite_snapshots(struct chk *c, const bool *keep)
{
	const struct qcow2_header *h = &c->m.h;
	uint64_t len = 0, off = ALIGN_UP(c->file_size, (uint64_t)c->cs);
	uint8_t *old = NULL, *t = NULL;
	uint32_t n = 0;
	int ret;

	old = malloc(c->snap_table_bytes ? c->snap_table_bytes : 1);
	if (!old)
		return -ENOMEM;
	ret = io_pread(c->f, old, c->snap_table_bytes, h->snapshots_offset);
	if (ret < 0)
		goto out;
	for (uint32_t i = 0; i < c->nb_snaps; i++)
		if (keep[i])
			len += ALIGN_UP((uint64_t)c->snaps[i].entry_len + 16, 8);
	t = io_zalloc(len ? ALIGN_UP(len, (uint64_t)c->cs) : c->cs);
	if (!t) {
		ret = -ENOMEM;
		goto out;
	}
	uint8_t *p = t;
	for (uint32_t i = 0; i < c->nb_snaps; i++) {
		const struct qcow2_snapshot *s = &c->snaps[i];
		const uint8_t *e = old + s->entry_off;
		uint32_t extra = s->extra_size, nx = extra;
		if (!keep[i])
			continue;
		if (h->version >= 3 && extra < 16)
			nx = 16;
		memcpy(p, e, QCOW2_SNAP_FIXED_LEN);
		put_be32(p + QCOW2_SNAP_EXTRA_SIZE, nx);
		memcpy(p + QCOW2_SNAP_FIXED_LEN, e + QCOW2_SNAP_FIXED_LEN, extra);
		if (nx > extra) {
			/* "Extra data": 64-bit VM state size, virtual disk size. */
			uint8_t x[16];
			put_be64(x, s->vm_state_size);
			put_be64(x + 8, s->disk_size);
			memcpy(p + QCOW2_SNAP_FIXED_LEN + extra, x + extra, nx - extra);
		}
		uint32_t names = s->entry_len - QCOW2_SNAP_FIXED_LEN - extra;
		memcpy(p + QCOW2_SNAP_FIXED_LEN + nx, e + QCOW2_SNAP_FIXED_LEN + extra, names);
		p += ALIGN_UP((uint64_t)QCOW2_SNAP_FIXED_LEN + nx + names, 8);
		n++;
	}
	len = (uint64_t)(p - t);
	if (len) {
		ret = io_pwrite(c->f, t, ALIGN_UP(len, (uint64_t)c->cs), off);
		if (ret == 0)
			ret = io_flush(c->f);
		if (ret < 0)
			goto out;
	}
	uint8_t hdr[12];
	put_be32(hdr, n);
	put_be64(hdr + 4, n ? off : 0);
	ret = io_pwrite(c->f, hdr, sizeof(hdr), QCOW2_HDR_NB_SNAPSHOTS);
	if (ret == 0)
		ret = io_flush(c->f);
out:
	if (ret < 0)
		write_failed(c, "the snapshot table", ret);
	io_free(t);
	free(old);
	return ret;
}

static int read_snapshots(struct chk *c)
{
	char err[256] = "";

	qcow2_snapshots_free(c->snaps, c->nb_snaps);
	c->snaps = NULL;
	c->nb_snaps = 0;
	int ret = qcow2_snapshots_read_flags(c->f, &c->m.h, c->file_size, QCOW2_SNAP_UNCHECKED_L1,
					     &c->snaps, &c->snap_table_bytes, err, sizeof(err));
	if (ret < 0) {
		report(c, "ERROR failed to read the snapshot table: %s", err[0] ? err : strerror(-ret));
		c->res->check_errors++;
		return ret;
	}
	c->nb_snaps = c->m.h.nb_snapshots;
	return 0;
}

/* QEMU's qcow2_check_read_snapshot_table, and with QCOW2_FIX_ERRORS the
 * repair: entries missing their extra data are completed, entries whose
 * L1 table is unusable are dropped (their clusters become leaks). */
static int check_snapshots(struct chk *c)
{
	const struct qcow2_header *h = &c->m.h;
	uint64_t bad = 0;
	bool drop = false;
	int ret = read_snapshots(c);

	if (ret < 0)
		return ret;
	bool *keep = calloc(c->nb_snaps ? c->nb_snaps : 1, sizeof(bool));
	if (!keep)
		return -ENOMEM;
	for (uint32_t i = 0; i < c->nb_snaps; i++) {
		const struct qcow2_snapshot *s = &c->snaps[i];
		keep[i] = true;
		if (h->version >= 3 && s->extra_size < 16) {
			report(c, "%s VM state size and disk size not set for snapshot %s (%s)", fix_word(c),
			       s->id, s->name);
			bad++;
		}
		if ((c->fix & QCOW2_FIX_ERRORS) && snapshot_unusable(c, s)) {
			report(c, "Repairing: dropping snapshot %s (%s): its L1 table (offset 0x%llx, %u "
				  "entries) is unusable", s->id, s->name, (unsigned long long)s->l1_offset,
			       s->l1_size);
			keep[i] = false;
			drop = true;
		}
	}
	if ((c->fix & QCOW2_FIX_ERRORS) && (bad || drop)) {
		uint32_t dropped = 0;
		for (uint32_t i = 0; i < c->nb_snaps; i++)
			dropped += !keep[i];
		ret = rewrite_snapshots(c, keep);
		if (ret == 0) {
			c->res->corruptions_fixed += bad + dropped;
			bad = 0;
			char err[256];
			qcow2_meta_free(&c->m);
			ret = io_get_size(c->f, &c->file_size);
			if (ret == 0)
				ret = qcow2_meta_read_flags(c->f, c->file_size, QCOW2_META_FOR_CHECK,
							    &c->m, err, sizeof(err));
			if (ret == 0)
				ret = read_snapshots(c);
		}
	}
	c->res->corruptions += bad;
	free(keep);
	return ret;
}

/* ---- the whole check ----------------------------------------------------- */

static int set_incompat(struct chk *c, uint64_t bits)
{
	uint8_t b[8];

	put_be64(b, bits);
	int ret = io_pwrite(c->f, b, 8, QCOW2_HDR_INCOMPAT);
	if (ret == 0)
		ret = io_flush(c->f);
	if (ret < 0)
		write_failed(c, "the header", ret);
	else
		c->m.h.incompat = bits;
	return ret;
}

static int setup(struct chk *c)
{
	const struct qcow2_header *h = &c->m.h;
	char err[256] = "";
	int ret;

	ret = io_get_size(c->f, &c->file_size);
	if (ret < 0) {
		snprintf(c->errbuf, c->errlen, "cannot get the file size: %s", strerror(-ret));
		return ret;
	}
	ret = qcow2_meta_read_flags(c->f, c->file_size, QCOW2_META_FOR_CHECK, &c->m, err, sizeof(err));
	if (ret < 0) {
		snprintf(c->errbuf, c->errlen, "%s", err[0] ? err : strerror(-ret));
		return ret;
	}
	if (h->incompat & ~QCOW2_INCOMPAT_KNOWN) {
		char names[256];
		qcow2_feature_names(&c->m, 0, h->incompat & ~QCOW2_INCOMPAT_KNOWN, names, sizeof(names));
		snprintf(c->errbuf, c->errlen, "unsupported qcow2 feature(s): %s", names);
		return -ENOTSUP;
	}
	/* External data file: its clusters have no refcounts in the image. */
	c->data_file = (h->incompat & QCOW2_INCOMPAT_DATA_FILE) != 0;
	if (c->fix && c->f->read_only) {
		snprintf(c->errbuf, c->errlen, "repairing needs the image open read-write");
		return -EROFS;
	}
	c->cluster_bits = h->cluster_bits;
	c->cs = 1u << c->cluster_bits;
	c->ext = (h->incompat & QCOW2_INCOMPAT_EXTL2) ? 1 : 0;
	c->l2_entries = c->cs / (8u << c->ext);
	c->rc_order = h->refcount_order;
	c->rc_max = c->rc_order == 6 ? UINT64_MAX : (1ull << (1u << c->rc_order)) - 1;
	c->rb_bits = c->cluster_bits + 3 - c->rc_order;
	c->csize_shift = 62 - (c->cluster_bits - 8);
	c->coffset_mask = (1ull << c->csize_shift) - 1;
	c->csize_mask = (1ull << (c->cluster_bits - 8)) - 1;
	return pf_init(c);
}

static int run_check(struct chk *c)
{
	int ret = setup(c);

	if (ret < 0)
		return ret;
	ret = check_snapshots(c);
	if (ret == 0) {
		/* Progress: L1 entries walked, then refcount blocks compared. */
		c->work_total = c->m.h.l1_size + DIV_ROUND_UP(size_to_clusters(c, c->file_size),
							      1ull << c->rb_bits);
		for (uint32_t i = 0; i < c->nb_snaps; i++)
			c->work_total += MIN(c->snaps[i].l1_size, QCOW2_MAX_L1_SIZE / 8);
		ret = check_refcounts(c);
	}
	if (ret < 0)
		return c->err ? c->err : ret;
	if (c->fix && !c->res->check_errors && !c->res->corruptions &&
	    (c->m.h.incompat & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT))) {
		ret = set_incompat(c, c->m.h.incompat & ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT));
		if (ret < 0)
			return ret;
	}
	return c->err;
}

struct run {
	struct chk *c;
	int ret;
};

static void run_main(void *opaque)
{
	struct run *r = opaque;
	r->ret = run_check(r->c);
}

int qcow2_check(struct io_file *f, const struct qcow2_check_opts *o,
		struct qcow2_check_result *res, char *err, size_t errlen)
{
	struct chk *c = calloc(1, sizeof(*c));
	struct run r = { c, 0 };
	int ret;

	memset(res, 0, sizeof(*res));
	if (err && errlen)
		err[0] = '\0';
	if (!c)
		return -ENOMEM;
	c->f = f;
	c->o = o;
	c->fix = o->fix;
	c->res = res;
	c->errbuf = err;
	c->errlen = errlen;
	c->pf_wait = (struct co_queue)CO_QUEUE_INIT;
	c->rb_slot_off = UINT64_MAX;
	if (coro_self()) {
		run_main(&r);
		ret = r.ret;
	} else {
		ret = aio_run_coroutine(run_main, &r);
		if (ret == 0)
			ret = r.ret;
	}
	if (ret < 0 && err && errlen && !err[0])
		snprintf(err, errlen, "%s", strerror(-ret));
	pf_deinit(c);
	qcow2_snapshots_free(c->snaps, c->nb_snaps);
	qcow2_meta_free(&c->m);
	free(c->refs);
	free(c->disk);
	free(c->rt);
	free(c->rb_bad);
	io_free(c->rb_slot);
	free(c);
	return ret;
}

static void log_line(void *opaque, const char *line)
{
	log_debug("%s: check: %s", (const char *)opaque, line);
}

int qcow2_repair_dirty(struct io_file *f, const char *name, struct qcow2_meta *m,
		       uint64_t *file_size)
{
	struct qcow2_check_opts o = {
		.fix = QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS,
		.report = log_line,
		.opaque = (void *)name,
	};
	struct qcow2_check_result r;
	char err[256];
	int ret;

	log_info("%s: image was not closed cleanly (lazy refcounts); repairing its refcounts", name);
	ret = qcow2_check(f, &o, &r, err, sizeof(err));
	if (ret < 0) {
		log_error("%s: could not repair the dirty image: %s", name, err);
		return ret;
	}
	log_info("%s: repaired: %llu leaked clusters and %llu corruptions fixed; %llu corruptions "
		 "and %llu leaks left", name, (unsigned long long)r.leaks_fixed,
		 (unsigned long long)r.corruptions_fixed, (unsigned long long)r.corruptions,
		 (unsigned long long)r.leaks);
	qcow2_meta_free(m);
	ret = io_get_size(f, file_size);
	/* A killed daemon leaves the file grown ahead of its allocations
	 * (refcount.c, qcow2_set_file_end): nothing past the last cluster in
	 * use is referenced once the refcounts are whole. */
	if (ret == 0 && !r.corruptions && !r.leaks && !r.check_errors &&
	    r.image_end_offset && *file_size > r.image_end_offset) {
		ret = io_truncate(f, r.image_end_offset);
		if (ret == 0)
			*file_size = r.image_end_offset;
	}
	if (ret == 0)
		ret = qcow2_meta_read(f, *file_size, m, err, sizeof(err));
	if (ret < 0) {
		log_error("%s: re-reading the header after the repair: %s", name, err);
		return ret;
	}
	if (r.check_errors || (m->h.incompat & QCOW2_INCOMPAT_DIRTY)) {
		log_error("%s: the dirty image could not be made clean (%llu corruptions, %llu internal "
			  "errors); see 'qublk check %s'", name, (unsigned long long)r.corruptions,
			  (unsigned long long)r.check_errors, name);
		return -EIO;
	}
	return 0;
}
