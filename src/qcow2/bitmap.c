/* SPDX-License-Identifier: MIT */
/*
 * Persistent dirty bitmaps, kept up to date ("Dirty tracking bitmaps" in
 * qcow2.rst), as QEMU keeps them:
 *  - a read-write open loads every enabled ("auto") bitmap that is
 *    consistent (not "in_use") and marks it in use on disk (synced);
 *  - every write, write-zeroes and discard sets the bits of its range in
 *    each of them (atomically: requests come from any thread);
 *  - a clean close stores the bits into the bitmap's own clusters (a
 *    data cluster is allocated where the bitmap had none), writes the
 *    bitmap table, syncs, then clears "in_use" (synced).
 * A crash leaves the bitmaps in use: QEMU (and qublk) then treat them as
 * inconsistent, so the next incremental backup must be a full one; they
 * are never wrong silently.  Disabled and inconsistent bitmaps are left
 * as they are.  Only images whose autoclear bit 0 vouches for the
 * extension are tracked (others are QEMU's to repair).
 *
 * In memory a bitmap has its on-disk layout ("Bitmap data"): bit n is
 * bit n % 8 of byte n / 8, one bit per granularity bytes of the disk.
 *
 * Thread model: open and close under the metadata lock or before any
 * request; qcow2_bitmaps_dirty() from any request thread, lock-free.
 */
#include <errno.h>
#include <stdlib.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

/* "Bitmap table" entry: bits 9-55 the cluster; bit 0 with offset 0:
 * the cluster reads as all ones. */
#define BT_OFFSET_MASK 0x00fffffffffffe00ull
#define BT_RESERVED    0xff000000000001feull

static void dbm_free(struct qcow2_dbm *d)
{
	free(d->bits);
	free(d->table);
}

/* Load bitmap @b into @d.  Returns 0, 1 if it cannot be tracked (left
 * alone, logged), or -errno. */
static int load(struct qcow2_state *s, const struct qcow2_bitmap *b, struct qcow2_dbm *d)
{
	uint64_t cs = s->cluster_size, nbits, nbytes, nchunks;
	uint8_t *buf;
	int ret = 0;

	if (b->granularity_bits < 9 || b->granularity_bits > 31 || b->extra_size) {
		log_warn("%s: bitmap '%s': granularity or extra data not supported: left as it is",
			 s->bs->filename, b->name);
		return 1;
	}
	nbits = DIV_ROUND_UP(s->meta.h.size, 1ull << b->granularity_bits);
	nbytes = DIV_ROUND_UP(nbits, 8);
	nchunks = DIV_ROUND_UP(nbytes, cs);
	if (b->table_size != nchunks) {
		log_warn("%s: bitmap '%s': table size %u does not match the disk size: left as it is",
			 s->bs->filename, b->name, b->table_size);
		return 1;
	}
	d->gran_bits = b->granularity_bits;
	d->nbits = nbits;
	d->nbytes = nbytes;
	d->table_offset = b->table_offset;
	d->table_size = b->table_size;
	d->entry_off = b->entry_off;
	d->flags = b->flags;
	d->bits = calloc(nchunks ? nchunks * cs : 1, 1);
	d->table = malloc(nchunks ? nchunks * 8 : 8);
	buf = io_alloc(cs);
	if (!d->bits || !d->table || !buf) {
		io_free(buf);
		return -ENOMEM;
	}
	ret = nchunks ? io_pread(s->file, d->table, nchunks * 8, b->table_offset) : 0;
	for (uint64_t i = 0; ret == 0 && i < nchunks; i++) {
		uint64_t e = be64toh(d->table[i]), off = e & BT_OFFSET_MASK;
		d->table[i] = e;
		if ((e & BT_RESERVED) || (off && (e & 1)) || (off && off + cs > s->file_end)) {
			log_warn("%s: bitmap '%s': bad table entry %#llx: left as it is",
				 s->bs->filename, b->name, (unsigned long long)e);
			io_free(buf);
			return 1;
		}
		if (off)
			ret = io_pread(s->file, d->bits + i * cs, cs, off);
		else if (e & 1)
			memset(d->bits + i * cs, 0xff, cs);
	}
	io_free(buf);
	/* Bits past the end of the disk stay zero (the format says so). */
	if (ret == 0 && nbits % 8)
		d->bits[nbytes - 1] &= (uint8_t)((1u << (nbits % 8)) - 1);
	if (ret == 0)
		memset(d->bits + nbytes, 0, nchunks * cs - nbytes);
	return ret;
}

/* Write the flags of tracked bitmap @d into its directory entry. */
static int write_flags(struct qcow2_state *s, const struct qcow2_dbm *d)
{
	uint8_t be[4];

	put_be32(be, d->flags);
	return qcow2_pwrite_meta(s, QCOW2_W_BITMAP_DIR, be, 4, d->entry_off + 12);
}

int qcow2_bitmaps_open(struct qcow2_state *s)
{
	struct qcow2_bitmap *bms = NULL;
	uint32_t nb = 0;
	char err[256] = "";
	int ret;

	if (!(s->meta.h.autoclear & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	ret = qcow2_bitmaps_read(s->file, &s->meta, s->file_end, &bms, &nb, err, sizeof(err));
	if (ret < 0) {
		log_error("%s: %s", s->bs->filename, err[0] ? err : strerror(-ret));
		return ret;
	}
	if (!nb)
		return 0;
	s->dbms = calloc(nb, sizeof(*s->dbms));
	if (!s->dbms) {
		qcow2_bitmaps_free(bms, nb);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < nb && ret == 0; i++) {
		const struct qcow2_bitmap *b = &bms[i];
		struct qcow2_dbm *d = &s->dbms[s->ndbms];

		if (b->type != QCOW2_BME_TYPE_DIRTY || !(b->flags & QCOW2_BME_AUTO) ||
		    (b->flags & QCOW2_BME_IN_USE))
			continue;       /* disabled or inconsistent: untouched */
		ret = load(s, b, d);
		if (ret == 0) {
			s->ndbms++;
			continue;
		}
		dbm_free(d);
		memset(d, 0, sizeof(*d));
		if (ret > 0) {
			/* Enabled but not ours to track: say it is inconsistent
			 * rather than let it miss our writes. */
			uint8_t be[4];
			put_be32(be, b->flags | QCOW2_BME_IN_USE);
			ret = qcow2_pwrite_meta(s, QCOW2_W_BITMAP_DIR, be, 4, b->entry_off + 12);
		}
	}
	qcow2_bitmaps_free(bms, nb);
	/* In use from now on, before the first write can change the disk. */
	for (unsigned i = 0; i < s->ndbms && ret == 0; i++) {
		s->dbms[i].flags |= QCOW2_BME_IN_USE;
		ret = write_flags(s, &s->dbms[i]);
	}
	if (ret == 0 && s->ndbms)
		ret = qcow2_sync(s);
	if (ret < 0)
		log_error("%s: loading the dirty bitmaps: %s", s->bs->filename, strerror(-ret));
	return ret;
}

void qcow2_bitmaps_dirty(struct qcow2_state *s, uint64_t off, uint64_t len)
{
	for (unsigned i = 0; i < s->ndbms && len; i++) {
		struct qcow2_dbm *d = &s->dbms[i];
		uint64_t first = off >> d->gran_bits, last = (off + len - 1) >> d->gran_bits;

		last = MIN(last, d->nbits - 1);
		for (uint64_t n = first; n <= last;) {
			if (!(n % 8) && last - n >= 7) {
				/* Whole bytes: nothing else writes them but ones. */
				__atomic_store_n(&d->bits[n / 8], 0xff, __ATOMIC_RELAXED);
				n += 8;
				continue;
			}
			__atomic_fetch_or(&d->bits[n / 8], (uint8_t)(1u << (n % 8)), __ATOMIC_RELAXED);
			n++;
		}
	}
}

int qcow2_bitmaps_store(struct qcow2_state *s)
{
	uint64_t cs = s->cluster_size;
	int ret = 0;

	if (!s->ndbms || s->read_only)
		return 0;
	for (unsigned i = 0; i < s->ndbms && ret == 0; i++) {
		struct qcow2_dbm *d = &s->dbms[i];
		for (uint32_t k = 0; k < d->table_size && ret == 0; k++) {
			uint8_t *chunk = d->bits + (uint64_t)k * cs;
			uint64_t off = d->table[k] & BT_OFFSET_MASK;

			if (!off && buf_is_zero(chunk, cs)) {
				d->table[k] = 0;
				continue;
			}
			if (!off) {
				ret = qcow2_alloc_clusters(s, 1, &off);
				if (ret < 0)
					break;
				d->table[k] = off;
			}
			/* The bitmap is in use on disk: a torn rewrite is harmless. */
			ret = qcow2_pwrite_meta(s, QCOW2_W_BITMAP, chunk, cs, off);
		}
		if (ret == 0 && d->table_size) {
			uint64_t *be = malloc((size_t)d->table_size * 8);
			if (!be) {
				ret = -ENOMEM;
				break;
			}
			for (uint32_t k = 0; k < d->table_size; k++)
				be[k] = htobe64(d->table[k]);
			ret = qcow2_pwrite_meta(s, QCOW2_W_BITMAP, be, (size_t)d->table_size * 8,
						d->table_offset);
			free(be);
		}
	}
	/* Bits, tables and the refcounts of new clusters durable, then the
	 * bitmaps are consistent again. */
	if (ret == 0)
		ret = qcow2_flush_locked(s);
	for (unsigned i = 0; i < s->ndbms && ret == 0; i++) {
		s->dbms[i].flags &= ~QCOW2_BME_IN_USE;
		ret = write_flags(s, &s->dbms[i]);
	}
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret < 0)
		log_error("%s: storing the dirty bitmaps: %s (they stay in use: inconsistent)",
			  s->bs->filename, strerror(-ret));
	return ret;
}

void qcow2_bitmaps_close(struct qcow2_state *s)
{
	for (unsigned i = 0; i < s->ndbms; i++)
		dbm_free(&s->dbms[i]);
	free(s->dbms);
	s->dbms = NULL;
	s->ndbms = 0;
}
