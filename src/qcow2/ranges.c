/* SPDX-License-Identifier: MIT */
/*
 * The range authority: the one place in the qcow2 driver that knows which
 * host and guest ranges are in use, and by what.  Nothing in the driver
 * writes a host byte without asking it.
 *
 *  - Metadata map: every host cluster that holds metadata, with its kinds
 *    (header, active and snapshot L1 tables, active and snapshot L2
 *    tables, refcount table and blocks, snapshot table, bitmap
 *    directory: QEMU's overlap-check categories).  Built at open from the
 *    image, kept current by the code that allocates or drops metadata; a
 *    cluster leaves the map when its refcount drops to zero.  Every host
 *    write is checked against it (qcow2_check_write): a write of kind K
 *    may only touch clusters whose kinds are K or none.  A violation is
 *    corruption: the request fails with -EIO, the image is marked corrupt
 *    (as QEMU does: "Preventing invalid write on metadata") and no further
 *    write reaches the file, while reads go on being served.
 *  - Reservations: the run an allocation is about to take, before its
 *    refcounts are set.  Nested allocations (a refcount block for the
 *    run, a refcount table growth) never land inside a reserved run.
 *  - Host I/O epochs: data I/O that looked up a host cluster counts itself
 *    in the current epoch until done; freed clusters are released (their
 *    refcount decremented) only once the epoch they were freed in has
 *    drained, so a cluster is never reused under an in-flight read or
 *    write (refcount.c apply_pending).
 *  - Guest cluster owners: every request that changes a guest cluster's
 *    mapping (allocating write and COW, write-zeroes, discard) owns the
 *    guest clusters it changes from its decision to its L2 update.  A
 *    request that had to wait for another owner decides again afterwards:
 *    qcow2_own_guest() may drop the metadata lock, so nothing checked
 *    before it holds after it.
 *
 * Thread model: the metadata map, the reservations and the owner list are
 * touched only with s->lock held (ublk queue threads share one image); the
 * epoch counters are under s->spin, since data I/O ends without the lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

const uint8_t qcow2_zero_page[QCOW2_ZERO_PAGE] __attribute__((aligned(4096)));

/* ---- metadata map ------------------------------------------------------
 * Open addressing with linear probing.  A slot is 0 (empty) or
 * (cluster + 1) << 16 | kinds; clusters are below 2^47 (host offsets
 * below 2^56, clusters at least 512 bytes), so the key fits. */

#define SLOT_KINDS(v) ((unsigned)((v) & 0xffff))
#define SLOT_CLUSTER(v) (((v) >> 16) - 1)
#define MAP_MIN_CAP 1024

static uint64_t map_hash(const struct qcow2_metamap *m, uint64_t cluster)
{
	return (cluster * 0x9e3779b97f4a7c15ull) >> (64 - m->bits);
}

static uint64_t *map_find(const struct qcow2_metamap *m, uint64_t cluster)
{
	uint64_t mask = m->cap - 1;

	if (!m->slots)
		return NULL;
	for (uint64_t i = map_hash(m, cluster);; i = (i + 1) & mask) {
		uint64_t v = m->slots[i];
		if (!v)
			return NULL;
		if (SLOT_CLUSTER(v) == cluster)
			return &m->slots[i];
	}
}

static void map_insert_slot(struct qcow2_metamap *m, uint64_t v)
{
	uint64_t mask = m->cap - 1;
	uint64_t i = map_hash(m, SLOT_CLUSTER(v));

	while (m->slots[i])
		i = (i + 1) & mask;
	m->slots[i] = v;
}

static int map_grow(struct qcow2_metamap *m)
{
	struct qcow2_metamap n = { .bits = m->slots ? m->bits + 1 : 10 };
	uint64_t *old = m->slots;

	n.cap = 1ull << n.bits;
	n.slots = calloc(n.cap, sizeof(*n.slots));
	if (!n.slots)
		return -ENOMEM;
	n.count = m->count;
	for (uint64_t i = 0; old && i < m->cap; i++)
		if (old[i])
			map_insert_slot(&n, old[i]);
	free(old);
	*m = n;
	return 0;
}

/* Remove the entry at @slot, shifting later members of its probe run back
 * so that lookups never stop early (no tombstones). */
static void map_remove_at(struct qcow2_metamap *m, uint64_t *slot)
{
	uint64_t mask = m->cap - 1;
	uint64_t i = (uint64_t)(slot - m->slots), j = i;

	m->slots[i] = 0;
	m->count--;
	for (;;) {
		j = (j + 1) & mask;
		uint64_t v = m->slots[j];
		if (!v)
			return;
		uint64_t home = map_hash(m, SLOT_CLUSTER(v));
		/* Move v back to i unless its home lies cyclically in (i, j]. */
		bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
		if (stays)
			continue;
		m->slots[i] = v;
		m->slots[j] = 0;
		i = j;
	}
}

unsigned qcow2_meta_kinds(struct qcow2_state *s, uint64_t cluster)
{
	uint64_t *p = map_find(&s->meta_map, cluster);

	return p ? SLOT_KINDS(*p) : 0;
}

int qcow2_meta_add(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned kind)
{
	struct qcow2_metamap *m = &s->meta_map;
	uint64_t c0 = off >> s->cluster_bits;
	uint64_t c1 = len ? (off + len - 1) >> s->cluster_bits : c0;
	int ret;

	if (!len)
		return 0;
	for (uint64_t c = c0; c <= c1; c++) {
		uint64_t *p = map_find(m, c);
		if (p) {
			*p |= kind;
			continue;
		}
		if (!m->slots || (m->count + 1) * 2 > m->cap) {
			ret = map_grow(m);
			if (ret < 0) {
				log_error("%s: metadata map: %s", s->bs->filename, strerror(-ret));
				return ret;
			}
		}
		map_insert_slot(m, ((c + 1) << 16) | kind);
		m->count++;
	}
	return 0;
}

void qcow2_meta_del(struct qcow2_state *s, uint64_t off, uint64_t len, unsigned kinds)
{
	struct qcow2_metamap *m = &s->meta_map;
	uint64_t c0 = off >> s->cluster_bits;

	if (!len)
		return;
	for (uint64_t c = c0; c <= (off + len - 1) >> s->cluster_bits; c++) {
		uint64_t *p = map_find(m, c);
		if (!p)
			continue;
		*p &= ~(uint64_t)kinds;
		if (!SLOT_KINDS(*p))
			map_remove_at(m, p);
	}
}

static const char *kind_name(unsigned kinds)
{
	static const char *const names[] = {
		"qcow2_header", "active L1 table", "active L2 table", "refcount table",
		"refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
		"bitmap directory",
	};

	for (unsigned i = 0; i < ARRAY_SIZE(names); i++)
		if (kinds & (1u << i))
			return names[i];
	return "metadata";
}

void qcow2_signal_corruption(struct qcow2_state *s, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	int ret;

	if (s->corrupt)
		return;
	s->corrupt = true;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	log_error("%s: Marking image as corrupt: %s; further corruption events will be suppressed",
		  s->bs->filename, msg);
	/* v2 has no feature bits: the state then lives in memory only. */
	if (s->meta.h.version < 3 || s->read_only)
		return;
	s->meta.h.incompat |= QCOW2_INCOMPAT_CORRUPT;
	ret = qcow2_meta_write(s->file, &s->meta);
	if (ret == 0)
		ret = io_flush(s->file);
	if (ret < 0)
		log_error("%s: setting the corrupt bit: %s", s->bs->filename, strerror(-ret));
}

int qcow2_check_write(struct qcow2_state *s, unsigned kind, uint64_t off, uint64_t len)
{
	uint64_t c0, c1;

	if (s->corrupt)
		return -EIO;
	/* Guest data in an external data file cannot hit metadata. */
	if (!len || (kind == QCOW2_OL_DATA && s->data_file))
		return 0;
	c0 = off >> s->cluster_bits;
	c1 = (off + len - 1) >> s->cluster_bits;
	if (!s->meta_map.count)
		return 0;
	for (uint64_t c = c0; c <= c1; c++) {
		unsigned k = qcow2_meta_kinds(s, c) & ~kind;
		if (!k)
			continue;
		qcow2_signal_corruption(s, "Preventing invalid write on metadata (overlaps with %s) "
					"at host offset %#llx", kind_name(k),
					(unsigned long long)(c << s->cluster_bits));
		return -EIO;
	}
	return 0;
}

/* ---- write sites and error injection ---------------------------------- */

/* @poison: a failed write there leaves the disk in a state nobody knows
 * (a pointer to a structure may or may not have switched), so no later
 * flush may claim durability: the file is poisoned (io_poison).  Other
 * failed writes leave their structure dirty or abandoned, never pointed
 * at: the next flush writes it again and may then succeed. */
static const struct {
	const char *name;
	unsigned kind;
	bool poison;
} sites[QCOW2_NSITES] = {
	[QCOW2_W_DATA] = { "write_aio", QCOW2_OL_DATA, false },
	[QCOW2_W_COW] = { "cow_write", QCOW2_OL_DATA, false },
	[QCOW2_W_COMPRESSED] = { "write_compressed", QCOW2_OL_DATA, false },
	[QCOW2_R_COW] = { "cow_read", QCOW2_OL_DATA, false },
	[QCOW2_W_L2_UPDATE] = { "l2_update", QCOW2_OL_ACTIVE_L2, false },
	[QCOW2_W_L2_ALLOC] = { "l2_alloc_write", QCOW2_OL_ACTIVE_L2, false },
	[QCOW2_W_L1_UPDATE] = { "l1_update", QCOW2_OL_ACTIVE_L1, true },
	[QCOW2_W_REFBLOCK_UPDATE] = { "refblock_update", QCOW2_OL_REFBLOCK, false },
	[QCOW2_W_REFBLOCK_ALLOC] = { "refblock_alloc", QCOW2_OL_REFBLOCK, false },
	[QCOW2_W_REFTABLE_UPDATE] = { "reftable_update", QCOW2_OL_REFTABLE, true },
	[QCOW2_W_REFTABLE_GROW_BLOCKS] = { "reftable_grow_blocks", QCOW2_OL_REFBLOCK, false },
	[QCOW2_W_REFTABLE_GROW] = { "reftable_grow", QCOW2_OL_REFTABLE, false },
	[QCOW2_W_HEADER] = { "header_update", QCOW2_OL_HEADER, true },
	[QCOW2_W_FLUSH] = { "flush", QCOW2_OL_DATA, true },
	[QCOW2_W_BITMAP] = { "bitmap_write", QCOW2_OL_NEW, false },
	[QCOW2_W_BITMAP_DIR] = { "bitmap_dir_update", QCOW2_OL_BITMAP_DIR, false },
	/* QEMU's blkdebug names.  The new table is not pointed at until the
	 * header switches; a torn header switch or L1 entry zeroing is. */
	[QCOW2_W_L1_GROW_WRITE] = { "l1_grow_write_table", QCOW2_OL_ACTIVE_L1, false },
	[QCOW2_W_L1_GROW_ACTIVATE] = { "l1_grow_activate_table", QCOW2_OL_HEADER, true },
	[QCOW2_W_L1_SHRINK_WRITE] = { "l1_shrink_write_table", QCOW2_OL_ACTIVE_L1, true },
};

static const struct { const char *name; int err; } errnos[] = {
	{ "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EDQUOT", EDQUOT }, { "ENOMEM", ENOMEM },
	{ "EROFS", EROFS },
};

int qcow2_inject_parse(const char *spec, struct qcow2_inject *out)
{
	char buf[512], *save = NULL, *tok, *site_list;
	struct qcow2_inject in = { .count = 1, .armed = true };

	if (strlen(spec) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, spec);
	site_list = strtok_r(buf, ":", &save);
	if (!site_list)
		return -EINVAL;
	while ((tok = strtok_r(NULL, ":", &save))) {
		char *end;
		if (!strncmp(tok, "skip=", 5)) {
			in.skip = (unsigned)strtoul(tok + 5, &end, 10);
		} else if (!strncmp(tok, "count=", 6)) {
			in.count = (unsigned)strtoul(tok + 6, &end, 10);
		} else if (!in.err) {
			in.err = (int)strtol(tok, &end, 10);
			for (size_t i = 0; i < ARRAY_SIZE(errnos) && *end; i++)
				if (!strcmp(tok, errnos[i].name)) {
					in.err = errnos[i].err;
					end = tok + strlen(tok);
				}
		} else {
			return -EINVAL;
		}
		if (*end)
			return -EINVAL;
	}
	if (in.err <= 0)
		return -EINVAL;
	for (tok = strtok_r(site_list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		size_t i;
		if (!strcmp(tok, "all")) {
			in.sites = (1u << QCOW2_NSITES) - 1;
			continue;
		}
		for (i = 0; i < QCOW2_NSITES; i++)
			if (!strcmp(tok, sites[i].name))
				break;
		if (i == QCOW2_NSITES)
			return -EINVAL;
		in.sites |= 1u << i;
	}
	*out = in;
	return 0;
}

int qcow2_inject(struct qcow2_state *s, enum qcow2_site site)
{
	struct qcow2_inject *in = &s->inject;
	int err = 0;

	if (likely(!in->armed))
		return 0;
	spin_lock(&s->spin);
	if ((in->sites & (1u << site)) && in->armed) {
		if (in->skip) {
			in->skip--;
		} else {
			err = -in->err;
			if (in->count && --in->count == 0)
				in->armed = false;
		}
	}
	spin_unlock(&s->spin);
	if (err)
		log_info("%s: injected %s at %s", s->bs->filename, strerror(-err), sites[site].name);
	return err;
}

/* A metadata write from @site failed with @ret.  Running out of space
 * writes nothing, so only other errors leave the disk unknown. */
static int write_failed(struct qcow2_state *s, enum qcow2_site site, int ret)
{
	if (sites[site].poison && ret != -ENOSPC && ret != -EDQUOT)
		io_poison(s->file, ret);
	return ret;
}

int qcow2_check_meta_write(struct qcow2_state *s, enum qcow2_site site, uint64_t off, size_t len)
{
	return qcow2_check_write(s, sites[site].kind, off, len);
}

int qcow2_pwrite_meta_checked(struct qcow2_state *s, enum qcow2_site site, const void *buf,
			      size_t len, uint64_t off)
{
	int ret = qcow2_inject(s, site);

	if (ret == 0)
		ret = io_pwrite(s->file, buf, len, off);
	return ret < 0 ? write_failed(s, site, ret) : 0;
}

int qcow2_pwrite_meta(struct qcow2_state *s, enum qcow2_site site, const void *buf, size_t len,
		      uint64_t off)
{
	int ret = qcow2_check_meta_write(s, site, off, len);

	return ret < 0 ? ret : qcow2_pwrite_meta_checked(s, site, buf, len, off);
}

int qcow2_write_header(struct qcow2_state *s)
{
	int ret = qcow2_check_write(s, QCOW2_OL_HEADER, 0, s->cluster_size);

	if (ret < 0)
		return ret;
	ret = qcow2_inject(s, QCOW2_W_HEADER);
	if (ret == 0)
		ret = qcow2_meta_write(s->file, &s->meta);
	return ret < 0 ? write_failed(s, QCOW2_W_HEADER, ret) : 0;
}

int qcow2_pwritev_data(struct qcow2_state *s, enum qcow2_site site, const struct iovec *iov,
		       int iovcnt, uint64_t off)
{
	int ret = qcow2_inject(s, site);

	return ret ? ret : io_pwritev(s->data, iov, iovcnt, off);
}

int qcow2_zero_host(struct qcow2_state *s, enum qcow2_site site, uint64_t off, uint64_t len)
{
	unsigned kind = sites[site].kind;
	/* Guest data lives in the data file, when there is one. */
	struct io_file *f = kind == QCOW2_OL_DATA ? s->data : s->file;
	struct iovec v[16];
	int ret;

	if (kind != QCOW2_OL_DATA) {
		ret = qcow2_check_write(s, kind, off, len);
		if (ret < 0)
			return ret;
	}
	ret = qcow2_inject(s, site);
	if (ret < 0)
		return write_failed(s, site, ret);
	if (!s->no_zero_range) {
		ret = io_fallocate(f, FALLOC_FL_ZERO_RANGE, off, len);
		if (ret == 0)
			return 0;
		if (ret != -EOPNOTSUPP && ret != -EINVAL && ret != -ENOSYS)
			return write_failed(s, site, ret);
		s->no_zero_range = true;
	}
	while (len) {
		uint64_t chunk = 0;
		int n = 0;
		while (n < 16 && chunk < len) {
			v[n].iov_base = (void *)qcow2_zero_page;
			v[n].iov_len = MIN(sizeof(qcow2_zero_page), len - chunk);
			chunk += v[n].iov_len;
			n++;
		}
		ret = io_pwritev(f, v, n, off);
		if (ret < 0)
			return write_failed(s, site, ret);
		off += chunk;
		len -= chunk;
	}
	return 0;
}

/* Every table the image has, as found on disk.  Entries that fail the
 * checks the request paths make anyway (reserved bits, alignment, past
 * the end of the file) are left out: they are never written through. */
static int add_l1_tables(struct qcow2_state *s, const uint64_t *l1, uint32_t n, unsigned kind)
{
	int ret = 0;

	for (uint32_t i = 0; i < n && ret == 0; i++) {
		uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK;
		if (off && IS_ALIGNED(off, s->cluster_size) && off < s->file_end)
			ret = qcow2_meta_add(s, off, s->cluster_size, kind);
	}
	return ret;
}

static int add_snapshots(struct qcow2_state *s)
{
	const struct qcow2_header *h = &s->meta.h;
	struct qcow2_snapshot *snaps = NULL;
	uint64_t table_len = 0;
	uint64_t *l1 = NULL;
	char err[256];
	int ret;

	if (!h->nb_snapshots)
		return 0;
	ret = qcow2_snapshots_read_flags(s->file, h, s->file_end, 0, &snaps, &table_len, err,
					 sizeof(err));
	if (ret < 0) {
		log_error("%s: %s", s->bs->filename, err[0] ? err : strerror(-ret));
		return ret;
	}
	for (uint32_t i = 0; i < h->nb_snapshots && ret == 0; i++) {
		const struct qcow2_snapshot *sn = &snaps[i];
		uint64_t bytes = (uint64_t)sn->l1_size * 8;

		if (!bytes)
			continue;
		ret = qcow2_meta_add(s, sn->l1_offset, bytes, QCOW2_OL_INACTIVE_L1);
		if (ret < 0)
			break;
		l1 = malloc(bytes);
		if (!l1) {
			ret = -ENOMEM;
			break;
		}
		ret = io_pread(s->file, l1, bytes, sn->l1_offset);
		if (ret == 0) {
			for (uint32_t j = 0; j < sn->l1_size; j++)
				l1[j] = be64toh(l1[j]);
			ret = add_l1_tables(s, l1, sn->l1_size, QCOW2_OL_INACTIVE_L2);
		}
		free(l1);
		l1 = NULL;
	}
	if (ret == 0)
		ret = qcow2_meta_add(s, h->snapshots_offset, table_len, QCOW2_OL_SNAPTABLE);
	qcow2_snapshots_free(snaps, h->nb_snapshots);
	if (ret < 0)
		log_error("%s: reading the snapshots' tables: %s", s->bs->filename, strerror(-ret));
	return ret;
}

/* "Bitmaps extension": nb_bitmaps, reserved, directory size, offset. */
static int add_bitmap_directory(struct qcow2_state *s)
{
	for (unsigned i = 0; i < s->meta.n_exts; i++) {
		const struct qcow2_ext *e = &s->meta.exts[i];
		uint64_t size, off, end;

		if (e->type != QCOW2_EXT_BITMAPS || e->len < 24)
			continue;
		size = get_be64(e->data + 8);
		off = get_be64(e->data + 16);
		if (!size || !IS_ALIGNED(off, s->cluster_size) || ckd_add(&end, off, size) ||
		    end > s->file_end)
			continue;
		return qcow2_meta_add(s, off, size, QCOW2_OL_BITMAP_DIR);
	}
	return 0;
}

int qcow2_ranges_open(struct qcow2_state *s)
{
	const struct qcow2_header *h = &s->meta.h;
	int ret;

	ret = qcow2_meta_add(s, 0, s->cluster_size, QCOW2_OL_HEADER);
	if (ret == 0)
		ret = qcow2_meta_add(s, s->l1_offset, (uint64_t)s->l1_size * 8, QCOW2_OL_ACTIVE_L1);
	if (ret == 0)
		ret = add_l1_tables(s, s->l1, s->l1_size, QCOW2_OL_ACTIVE_L2);
	if (ret == 0)
		ret = qcow2_meta_add(s, s->reftable_offset,
				     (uint64_t)s->reftable_clusters << s->cluster_bits,
				     QCOW2_OL_REFTABLE);
	for (uint32_t i = 0; i < s->reftable_size && ret == 0; i++)
		if (s->reftable[i])
			ret = qcow2_meta_add(s, s->reftable[i], s->cluster_size, QCOW2_OL_REFBLOCK);
	if (ret == 0)
		ret = add_snapshots(s);
	if (ret == 0)
		ret = add_bitmap_directory(s);
	(void)h;
	return ret;
}

void qcow2_ranges_close(struct qcow2_state *s)
{
	free(s->meta_map.slots);
	s->meta_map = (struct qcow2_metamap){ 0 };
}

/* ---- reservations ----------------------------------------------------- */

int qcow2_reserve(struct qcow2_state *s, uint64_t first, uint64_t n)
{
	if (s->nreserved == QCOW2_RESERVE_MAX) {
		log_error("%s: allocations nested too deeply", s->bs->filename);
		return -EIO;
	}
	s->reserved[s->nreserved].first = first;
	s->reserved[s->nreserved].n = n;
	s->nreserved++;
	return 0;
}

void qcow2_unreserve(struct qcow2_state *s, uint64_t first)
{
	for (unsigned i = s->nreserved; i-- > 0;) {
		if (s->reserved[i].first != first)
			continue;
		s->reserved[i] = s->reserved[--s->nreserved];
		return;
	}
}

bool qcow2_is_reserved(const struct qcow2_state *s, uint64_t cluster, uint64_t *end)
{
	for (unsigned i = 0; i < s->nreserved; i++) {
		const struct qcow2_reserved *r = &s->reserved[i];
		if (cluster >= r->first && cluster - r->first < r->n) {
			*end = r->first + r->n;
			return true;
		}
	}
	return false;
}

uint64_t qcow2_reserved_end(const struct qcow2_state *s)
{
	uint64_t end = 0;

	for (unsigned i = 0; i < s->nreserved; i++)
		end = MAX(end, s->reserved[i].first + s->reserved[i].n);
	return end;
}

/* ---- host I/O epochs -------------------------------------------------- */

unsigned qcow2_io_begin(struct qcow2_state *s)
{
	unsigned e;

	spin_lock(&s->spin);
	e = s->epoch;
	s->inflight[e]++;
	spin_unlock(&s->spin);
	return e;
}

void qcow2_io_end(struct qcow2_state *s, unsigned e)
{
	spin_lock(&s->spin);
	if (--s->inflight[e] == 0 && e != s->epoch)
		co_queue_wake_all(&s->drain_wait);
	spin_unlock(&s->spin);
}

void qcow2_io_drain(struct qcow2_state *s)
{
	unsigned e;

	spin_lock(&s->spin);
	e = s->epoch;
	s->epoch ^= 1;
	while (s->inflight[e] && coro_self()) {
		co_queue_wait_spin(&s->drain_wait, &s->spin);
		spin_lock(&s->spin);
	}
	spin_unlock(&s->spin);
}

/* ---- guest cluster owners --------------------------------------------- */

void qcow2_wait_owners(struct qcow2_state *s, uint64_t start, uint64_t *end, bool shorten)
{
	uint64_t cs = s->cluster_size;
	uint64_t c0 = ALIGN_DOWN(start, cs);
retry:
	for (struct qcow2_owner *a = s->owners; a; a = a->next) {
		uint64_t c1 = ALIGN_UP(*end, cs);
		if (a->end <= c0 || a->start >= c1)
			continue;
		if (shorten && a->start > c0) {
			*end = a->start;
			continue;
		}
		log_debug("%s: request at %llu waits for the owner of [%llu, %llu)",
			  s->bs->filename, (unsigned long long)start,
			  (unsigned long long)a->start, (unsigned long long)a->end);
		co_queue_wait_unlock(&a->waiters, &s->lock);
		goto retry;
	}
}

void qcow2_add_owner(struct qcow2_state *s, struct qcow2_owner *o, uint64_t start, uint64_t end)
{
	o->start = ALIGN_DOWN(start, (uint64_t)s->cluster_size);
	o->end = ALIGN_UP(end, (uint64_t)s->cluster_size);
	o->waiters = (struct co_queue)CO_QUEUE_INIT;
	o->next = s->owners;
	s->owners = o;
}

void qcow2_own_guest(struct qcow2_state *s, struct qcow2_owner *o, uint64_t start, uint64_t end)
{
	qcow2_wait_owners(s, start, &end, false);
	qcow2_add_owner(s, o, start, end);
}

void qcow2_disown_guest(struct qcow2_state *s, struct qcow2_owner *o)
{
	for (struct qcow2_owner **pp = &s->owners; *pp; pp = &(*pp)->next) {
		if (*pp == o) {
			*pp = o->next;
			break;
		}
	}
	co_queue_wake_all(&o->waiters);
}
