/* SPDX-License-Identifier: MIT */
/*
 * Guest offset -> host mapping ("Cluster mapping" in qcow2.rst): L2 entry
 * validation and classification, compressed cluster descriptors, runs of
 * same-type clusters for the request paths, and L2 table allocation and
 * copy-on-write for tables shared with internal snapshots.
 *
 * Every L2 entry is checked before use: reserved bits clear, host offset
 * cluster aligned and inside the file.  A bad entry fails the request
 * with -EIO; it is never followed.
 *
 * Thread model: every function here runs with s->lock held.
 */
#include <errno.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

static int bad_entry(struct qcow2_state *s, const char *what, uint64_t e)
{
	log_error("%s: corrupt %s entry %#llx", s->bs->filename, what, (unsigned long long)e);
	return -EIO;
}

int qcow2_compressed_range(struct qcow2_state *s, uint64_t l2e, uint64_t *off, uint64_t *len)
{
	uint64_t coff = l2e & s->coffset_mask;
	uint64_t nsec = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
	uint64_t clen = nsec * QCOW2_COMPRESSED_SECTOR_SIZE - (coff & (QCOW2_COMPRESSED_SECTOR_SIZE - 1));

	/* "Compressed Clusters Descriptor": the range must start inside the
	 * file; it may run a little past the end (last sector partial). */
	if (coff < s->cluster_size || coff >= s->file_end || coff + clen < coff)
		return bad_entry(s, "compressed L2", l2e);
	*off = coff;
	*len = clen;
	return 0;
}

int qcow2_l2_entry_type(struct qcow2_state *s, uint64_t e, enum qcow2_ctype *t)
{
	uint64_t off, len;
	bool has;

	if (e & QCOW2_OFLAG_COMPRESSED) {
		/* Never with an external data file. */
		if (s->data_file)
			return bad_entry(s, "compressed L2", e);
		*t = QCOW2_COMPRESSED;
		return qcow2_compressed_range(s, e, &off, &len);
	}
	if (e & QCOW2_L2E_RESERVED_MASK)
		return bad_entry(s, "L2", e);
	off = e & QCOW2_L2E_OFFSET_MASK;
	if (off && (!IS_ALIGNED(off, s->cluster_size) || (!s->data_file && off >= s->file_end)))
		return bad_entry(s, "L2", e);
	/* Is there a host cluster?  In a data file, host cluster 0 is one
	 * too ("Standard Cluster Descriptor": offset 0 with bit 63 set). */
	has = off || (s->data_file && (e & QCOW2_OFLAG_COPIED));
	/* "Standard Cluster Descriptor" bit 0 means nothing with extended
	 * L2 (the bitmap says what reads as zeros): ignored, as by QEMU. */
	if ((e & QCOW2_OFLAG_ZERO) && !s->ext_l2)
		*t = has ? QCOW2_ZERO_ALLOC : QCOW2_ZERO_PLAIN;
	else
		*t = has ? QCOW2_NORMAL : QCOW2_UNALLOCATED;
	if (*t == QCOW2_UNALLOCATED && (e & QCOW2_OFLAG_COPIED))
		return bad_entry(s, "L2", e);
	return 0;
}

/* Where the L2 entry of @guest lives. */
static void l2_position(struct qcow2_state *s, uint64_t guest, uint64_t *l1_idx,
			uint64_t *l2_idx)
{
	*l1_idx = guest >> (s->l2_bits + s->cluster_bits);
	*l2_idx = (guest >> s->cluster_bits) & ((1ull << s->l2_bits) - 1);
}

static int pin_slice(struct qcow2_state *s, uint64_t table, uint64_t l2_idx, int *slot,
		     uint64_t **entries, unsigned *index)
{
	void *data;
	uint64_t soff = table + (l2_idx >> s->l2_slice_bits) * s->l2c.slice_size;
	int ret = qcow2_cache_get(&s->l2c, soff, false, slot, &data);

	if (ret < 0)
		return ret;
	*entries = data;
	*index = (unsigned)(l2_idx & ((1ull << s->l2_slice_bits) - 1));
	return 0;
}

int qcow2_l2_slice_for_read(struct qcow2_state *s, uint64_t guest, int *slot,
			    uint64_t **entries, unsigned *index)
{
	uint64_t l1_idx, l2_idx, table;

	l2_position(s, guest, &l1_idx, &l2_idx);
	if (l1_idx >= s->l1_size)
		return -EIO;
	table = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
	if (!table) {
		*slot = -1;
		*entries = NULL;
		*index = (unsigned)(l2_idx & ((1ull << s->l2_slice_bits) - 1));
		return 0;
	}
	return pin_slice(s, table, l2_idx, slot, entries, index);
}

/* Subcluster @sc of a cluster with entry @e (cluster type @ct) and
 * bitmap @b, as a mapping type ("Subcluster Allocation Bitmap"). */
static enum qcow2_ctype sc_type(uint64_t e, enum qcow2_ctype ct, uint64_t b, unsigned sc)
{
	(void)e;
	if (ct == QCOW2_COMPRESSED)
		return QCOW2_COMPRESSED;
	if (b & QCOW2_SC_ALLOC(sc))
		return QCOW2_NORMAL;
	if (b & QCOW2_SC_ZERO(sc))
		return ct == QCOW2_NORMAL ? QCOW2_ZERO_ALLOC : QCOW2_ZERO_PLAIN;
	return QCOW2_UNALLOCATED;
}

int qcow2_l2_ext_check(struct qcow2_state *s, uint64_t e, uint64_t b, enum qcow2_ctype *ct)
{
	int ret = qcow2_l2_entry_type(s, e, ct);

	if (ret < 0)
		return ret;
	/* Compressed clusters have no subclusters; a subcluster is never
	 * both allocated and zero; allocated ones need a host cluster. */
	if ((*ct == QCOW2_COMPRESSED && b) || ((b >> 32) & b & 0xffffffffull) ||
	    ((b & 0xffffffffull) && *ct != QCOW2_NORMAL)) {
		log_error("%s: corrupt subcluster bitmap %#llx of L2 entry %#llx", s->bs->filename,
			  (unsigned long long)b, (unsigned long long)e);
		return -EIO;
	}
	return 0;
}

/* Subclusters of the same type as @sc from @sc on, up to 32. */
static unsigned sc_run(uint64_t e, enum qcow2_ctype ct, uint64_t b, unsigned sc,
		       enum qcow2_ctype t)
{
	unsigned n = 0;

	while (sc + n < QCOW2_SUBCLUSTERS && sc_type(e, ct, b, sc + n) == t)
		n++;
	return n;
}

static int get_mapping_ext(struct qcow2_state *s, uint64_t guest, uint64_t max,
			   struct qcow2_map *m, uint64_t *ents, unsigned idx)
{
	uint64_t in_cluster = qcow2_offset_in_cluster(s, guest);
	unsigned slice_n = 1u << s->l2_slice_bits;
	unsigned sc = (unsigned)(in_cluster >> s->sc_bits), n;
	uint64_t e = qcow2_l2_get(s, ents, idx), b = qcow2_l2_bitmap(s, ents, idx);
	uint64_t host0 = e & QCOW2_L2E_OFFSET_MASK, bytes;
	enum qcow2_ctype ct;
	int ret;

	ret = qcow2_l2_ext_check(s, e, b, &ct);
	if (ret < 0)
		return ret;
	m->l2e = e;
	m->bitmap = b;
	m->type = sc_type(e, ct, b, sc);
	m->host = m->type == QCOW2_NORMAL ? host0 + in_cluster : 0;
	if (m->type == QCOW2_COMPRESSED) {
		m->bytes = MIN(max, s->cluster_size - in_cluster);
		return 0;
	}
	n = sc_run(e, ct, b, sc, m->type);
	bytes = ((uint64_t)(sc + n) << s->sc_bits) - in_cluster;
	/* A run that fills the cluster may go on into the next ones. */
	for (unsigned k = 1; sc + n == QCOW2_SUBCLUSTERS && bytes < max && idx + k < slice_n; k++) {
		uint64_t en = qcow2_l2_get(s, ents, idx + k), bn = qcow2_l2_bitmap(s, ents, idx + k);
		enum qcow2_ctype cn;

		if (qcow2_l2_ext_check(s, en, bn, &cn) < 0 || sc_type(en, cn, bn, 0) != m->type)
			break;
		if (m->type == QCOW2_NORMAL &&
		    ((en & QCOW2_L2E_OFFSET_MASK) != host0 + ((uint64_t)k << s->cluster_bits) ||
		     ((en ^ e) & QCOW2_OFLAG_COPIED)))
			break;
		sc = 0;
		n = sc_run(en, cn, bn, 0, m->type);
		bytes += (uint64_t)n << s->sc_bits;
	}
	m->bytes = MIN(max, bytes);
	return 0;
}

int qcow2_get_mapping(struct qcow2_state *s, uint64_t guest, uint64_t max, struct qcow2_map *m)
{
	uint64_t in_cluster = qcow2_offset_in_cluster(s, guest);
	uint64_t *ents;
	unsigned idx, slice_n = 1u << s->l2_slice_bits;
	uint64_t n, e, host0;
	int slot, ret;

	ret = qcow2_l2_slice_for_read(s, guest, &slot, &ents, &idx);
	if (ret < 0)
		return ret;
	m->bitmap = 0;
	if (slot < 0) {
		/* Stop at the slice end too: writers update one slice per run. */
		uint64_t left = ((uint64_t)(slice_n - idx) << s->cluster_bits) - in_cluster;
		m->type = QCOW2_UNALLOCATED;
		m->host = 0;
		m->l2e = 0;
		m->bytes = MIN(max, left);
		return 0;
	}
	if (s->ext_l2) {
		ret = get_mapping_ext(s, guest, max, m, ents, idx);
		goto out;
	}
	e = be64toh(ents[idx]);
	ret = qcow2_l2_entry_type(s, e, &m->type);
	if (ret < 0)
		goto out;
	m->l2e = e;
	host0 = e & QCOW2_L2E_OFFSET_MASK;
	m->host = m->type == QCOW2_NORMAL ? host0 + in_cluster : 0;
	n = 1;
	if (m->type != QCOW2_COMPRESSED) {
		uint64_t want = DIV_ROUND_UP(in_cluster + max, s->cluster_size);
		while (n < want && idx + n < slice_n) {
			enum qcow2_ctype t;
			uint64_t en = be64toh(ents[idx + n]);
			if (qcow2_l2_entry_type(s, en, &t) < 0 || t != m->type)
				break;
			if (t == QCOW2_NORMAL &&
			    ((en & QCOW2_L2E_OFFSET_MASK) != host0 + (n << s->cluster_bits) ||
			     ((en ^ e) & QCOW2_OFLAG_COPIED)))
				break;
			n++;
		}
	}
	m->bytes = MIN(max, (n << s->cluster_bits) - in_cluster);
out:
	qcow2_cache_put(&s->l2c, slot);
	return ret;
}

/* Give L1 entry @l1_idx a table of its own: a new zeroed one, or a copy
 * of the shared one it points to.  Rules 1-2 of refcount.c: the table
 * and its refcount are durable before the synced L1 entry write. */
static int l2_table_cow(struct qcow2_state *s, uint64_t l1_idx)
{
	uint64_t old = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK, new_off;
	int ret;

	ret = qcow2_alloc_clusters(s, 1, &new_off);
	if (ret < 0)
		return ret;
	ret = qcow2_meta_add(s, new_off, s->cluster_size, QCOW2_OL_ACTIVE_L2);
	if (ret < 0)
		goto fail;
	qcow2_cache_invalidate(&s->l2c, new_off, s->cluster_size);
	if (old) {
		/* Shared tables are never dirty in the cache: disk is current. */
		ret = io_pread(s->file, s->meta_buf, s->cluster_size, old);
		if (ret == 0)
			ret = qcow2_pwrite_meta(s, QCOW2_W_L2_ALLOC, s->meta_buf, s->cluster_size,
						new_off);
	} else {
		ret = qcow2_zero_host(s, QCOW2_W_L2_ALLOC, new_off, s->cluster_size);
	}
	if (ret == 0)
		ret = qcow2_cache_writeback(&s->rbc);
	if (ret == 0)
		ret = qcow2_sync(s);
	if (ret == 0)
		ret = qcow2_write_entry_sync(s, QCOW2_W_L1_UPDATE, s->l1_offset + l1_idx * 8,
					     new_off | QCOW2_OFLAG_COPIED);
	if (ret < 0)
		goto fail;
	s->l1[l1_idx] = new_off | QCOW2_OFLAG_COPIED;
	if (old) {
		/* A snapshot may still use it (then it stays inactive L2). */
		qcow2_meta_del(s, old, s->cluster_size, QCOW2_OL_ACTIVE_L2);
		return qcow2_free_deferred(s, old, s->cluster_size);
	}
	return 0;
fail:
	log_error("%s: allocating an L2 table: %s", s->bs->filename, strerror(-ret));
	/* The new cluster leaks (its refcount may be on disk); it is no
	 * table: data may never be written over it by mistake either way. */
	qcow2_meta_del(s, new_off, s->cluster_size, QCOW2_OL_ACTIVE_L2);
	return ret;
}

int qcow2_l2_check_writable(struct qcow2_state *s, uint64_t guest)
{
	uint64_t l1_idx, l2_idx, l1e;

	l2_position(s, guest, &l1_idx, &l2_idx);
	if (l1_idx >= s->l1_size)
		return -EIO;
	l1e = s->l1[l1_idx];
	if (!(l1e & QCOW2_OFLAG_COPIED) || !(l1e & QCOW2_L1E_OFFSET_MASK))
		return 0;       /* a new table will be made */
	return qcow2_check_write(s, QCOW2_OL_ACTIVE_L2, l1e & QCOW2_L1E_OFFSET_MASK,
				 s->cluster_size);
}

int qcow2_l2_slice_for_write(struct qcow2_state *s, uint64_t guest, int *slot,
			     uint64_t **entries, unsigned *index)
{
	uint64_t l1_idx, l2_idx, l1e;
	int ret;

	l2_position(s, guest, &l1_idx, &l2_idx);
	if (l1_idx >= s->l1_size)
		return -EIO;
	l1e = s->l1[l1_idx];
	if (!(l1e & QCOW2_L1E_OFFSET_MASK) || !(l1e & QCOW2_OFLAG_COPIED)) {
		ret = l2_table_cow(s, l1_idx);
		if (ret < 0)
			return ret;
	}
	/* Decide before writing: our table must be nothing but our table. */
	ret = qcow2_check_write(s, QCOW2_OL_ACTIVE_L2, s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK,
				s->cluster_size);
	if (ret < 0)
		return ret;
	return pin_slice(s, s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK, l2_idx, slot, entries, index);
}
