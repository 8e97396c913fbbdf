/* SPDX-License-Identifier: MIT */
/*
 * The qcow2 block driver: open (header checks, feature policy, L1 and
 * refcount tables, caches, backing file), close (write everything back)
 * and the bdrv_qcow2 ops table.  The request paths are in rw.c.
 *
 * Feature policy on open:
 *  - unknown incompatible bits, encryption: refused (named); extended L2
 *    with clusters under 16 KiB too;
 *  - external data file (incompatible bit 2): opened next to the image
 *    (a relative name resolves against the image's directory, like a
 *    backing file's; QEMU 7.2 uses its working directory), locked like
 *    it; guest cluster X is data file cluster X; data_file_raw is kept;
 *  - corrupt bit: read-only opens only;
 *  - dirty bit (lazy refcounts): a read-write open repairs the refcounts
 *    first (check.c), as QEMU does;
 *  - read-write opens clear the autoclear bits we do not maintain (the
 *    bitmaps') and rewrite the header, which keeps unknown compatible
 *    bits and unknown extensions.
 *
 * Thread model: open and close run outside request processing (in or out
 * of a coroutine); no request may be in flight at close.  Requests may
 * come from several threads at once (see qcow2.h).
 */
#include <errno.h>
#include <stdlib.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

#define L2_CACHE_DEFAULT_MAX (32ull << 20)   /* 256 GiB at 64 KiB clusters */
#define CACHE_MAX (1ull << 30)

static int qcow2_probe(const uint8_t *buf, size_t len)
{
	/* The magic alone decides: a qcow2 file that fails to open must be
	 * refused, never served as raw (clients would write over its
	 * header). */
	if (len < 4 || get_be32(buf) != QCOW2_MAGIC)
		return 0;
	return 100;
}

static unsigned ilog2(uint64_t v)
{
	return 63 - (unsigned)__builtin_clzll(v);
}

static void state_free(struct qcow2_state *s)
{
	if (!s)
		return;
	qcow2_bounce_deinit(s);
	qcow2_cache_deinit(&s->l2c);
	qcow2_cache_deinit(&s->rbc);
	qcow2_refcount_close(s);
	qcow2_ranges_close(s);
	qcow2_bitmaps_close(s);
	io_free(s->meta_buf);
	free(s->l1);
	bdrv_close(s->backing);
	io_file_close(s->data_file);
	qcow2_meta_free(&s->meta);
	free(s);
}

static int check_features(struct qcow2_state *s, bool ro)
{
	const struct qcow2_header *h = &s->meta.h;
	const char *fn = s->bs->filename;
	char names[256];

	if (h->incompat & ~QCOW2_INCOMPAT_KNOWN) {
		qcow2_feature_names(&s->meta, 0, h->incompat & ~QCOW2_INCOMPAT_KNOWN,
				    names, sizeof(names));
		log_error("%s: unsupported qcow2 feature(s): %s", fn, names);
		return -ENOTSUP;
	}
	if (h->crypt_method) {
		log_error("%s: encrypted images are not supported", fn);
		return -ENOTSUP;
	}
	if ((h->incompat & QCOW2_INCOMPAT_EXTL2) && h->cluster_bits < 14) {
		/* 32 subclusters of at least 512 bytes, as QEMU creates them. */
		log_error("%s: extended L2 entries need clusters of at least 16 KiB", fn);
		return -ENOTSUP;
	}
	if ((h->incompat & QCOW2_INCOMPAT_DATA_FILE) && !s->meta.data_file) {
		/* "External data file name": required with the feature bit. */
		log_error("%s: the image has an external data file but does not name it", fn);
		return -EINVAL;
	}
	if (h->compression_type != QCOW2_COMPRESSION_ZLIB &&
	    h->compression_type != QCOW2_COMPRESSION_ZSTD) {
		log_error("%s: unknown compression type %u", fn, h->compression_type);
		return -ENOTSUP;
	}
	if (ro)
		return 0;
	if (h->incompat & QCOW2_INCOMPAT_CORRUPT) {
		log_error("%s: image is marked corrupt; it can only be opened read-only "
			  "(repair it with 'qemu-img check -r all %s')", fn, fn);
		return -EACCES;
	}
	return 0;
}

int qcow2_read_l1(struct qcow2_state *s, uint64_t **out)
{
	const char *fn = s->bs->filename;
	uint64_t per_l1 = (uint64_t)s->cluster_size << s->l2_bits;
	uint64_t need = DIV_ROUND_UP(s->meta.h.size, per_l1);
	uint64_t bytes = (uint64_t)s->l1_size * 8;
	uint64_t *l1;
	uint8_t *buf;
	int ret;

	*out = NULL;
	if (s->l1_size < need) {
		log_error("%s: L1 table too small (%u entries) for the virtual size", fn, s->l1_size);
		return -EINVAL;
	}
	if (bytes > QCOW2_MAX_L1_SIZE) {
		log_error("%s: L1 table too large", fn);
		return -EINVAL;
	}
	l1 = calloc(s->l1_size ? s->l1_size : 1, 8);
	buf = io_alloc(bytes ? bytes : 512);
	if (!l1 || !buf) {
		free(l1);
		io_free(buf);
		return -ENOMEM;
	}
	ret = bytes ? io_pread(s->file, buf, bytes, s->l1_offset) : 0;
	if (ret < 0) {
		log_error("%s: reading the L1 table: %s", fn, strerror(-ret));
		goto fail;
	}
	for (uint32_t i = 0; i < s->l1_size; i++) {
		uint64_t e = get_be64(buf + 8 * (size_t)i);
		uint64_t off = e & QCOW2_L1E_OFFSET_MASK;
		if ((e & QCOW2_L1E_RESERVED_MASK) ||
		    (off && (!IS_ALIGNED(off, s->cluster_size) || off >= s->file_end ||
			     s->file_end - off < s->cluster_size))) {
			log_error("%s: L1 entry %u is invalid (%#llx)", fn, i, (unsigned long long)e);
			ret = -EINVAL;
			goto fail;
		}
		l1[i] = e;
	}
	io_free(buf);
	*out = l1;
	return 0;
fail:
	free(l1);
	io_free(buf);
	return ret;
}

static int qcow2_open(struct bdrv *bs, const struct bdrv_opts *opts)
{
	struct qcow2_state *s = calloc(1, sizeof(*s));
	const char *fn = bs->filename;
	bool ro = bs->read_only || (opts->flags & BDRV_O_RDONLY);
	struct qcow2_header *h;
	uint64_t file_size, l2_bytes, rc_bytes, coverage;
	uint32_t slice;
	char err[256] = "";
	int ret;

	if (!s)
		return -ENOMEM;
	s->bs = bs;
	s->file = bs->file;
	s->read_only = ro;
	s->lock = (struct co_mutex)CO_MUTEX_INIT;
	s->resize_lock = (struct co_mutex)CO_MUTEX_INIT;
	ret = io_get_size(s->file, &file_size);
	if (ret < 0) {
		log_error("%s: cannot get the file size: %s", fn, strerror(-ret));
		goto fail;
	}
	ret = qcow2_meta_read(s->file, file_size, &s->meta, err, sizeof(err));
	if (ret < 0) {
		log_error("%s: %s", fn, err[0] ? err : strerror(-ret));
		goto fail;
	}
	h = &s->meta.h;
	ret = check_features(s, ro);
	if (ret < 0)
		goto fail;
	if (!ro && (h->incompat & QCOW2_INCOMPAT_DIRTY)) {
		ret = qcow2_repair_dirty(s->file, fn, &s->meta, &file_size);
		if (ret < 0)
			goto fail;
	}

	/* Geometry ("Header" and "Host cluster management" sections). */
	s->file_end = s->file_size = file_size;
	s->cluster_bits = h->cluster_bits;
	s->cluster_size = 1u << h->cluster_bits;
	if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS ||
	    h->refcount_order > 6) {
		log_error("%s: unsupported cluster size or refcount width", fn);
		ret = -EINVAL;
		goto fail;
	}
	s->ext_l2 = !!(h->incompat & QCOW2_INCOMPAT_EXTL2);
	s->sc_bits = s->cluster_bits - (s->ext_l2 ? 5 : 0);
	s->sc_size = 1u << s->sc_bits;
	s->l2_bits = s->cluster_bits - 3 - s->ext_l2;
	slice = MIN(4096u, s->cluster_size);
	s->l2_slice_bits = ilog2(slice) - 3 - s->ext_l2;
	s->refcount_order = h->refcount_order;
	s->refcount_max = s->refcount_order == 6 ? UINT64_MAX
						 : (1ull << (1u << s->refcount_order)) - 1;
	s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
	s->rb_slice_bits = ilog2(slice) + 3 - s->refcount_order;
	s->csize_shift = 62 - (s->cluster_bits - 8);
	s->coffset_mask = (1ull << s->csize_shift) - 1;
	s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
	s->l1_size = h->l1_size;
	s->l1_offset = h->l1_offset;
	s->reftable_offset = h->reftable_offset;
	s->reftable_clusters = h->reftable_clusters;

	ret = qcow2_read_l1(s, &s->l1);
	if (ret < 0)
		goto fail;
	ret = qcow2_refcount_open(s);
	if (ret < 0)
		goto fail;

	/* Caches: by default enough L2 to map the whole image, up to 32 MiB
	 * (256 GiB at 64 KiB clusters, 8 TiB at 2 MiB, 2 GiB at 512 B);
	 * refcounts a quarter of that.  Memory is reserved now, touched on
	 * first use. */
	coverage = DIV_ROUND_UP(h->size, s->cluster_size) * 8;
	l2_bytes = opts->l2_cache_size ? opts->l2_cache_size : MIN(coverage, L2_CACHE_DEFAULT_MAX);
	l2_bytes = MIN(l2_bytes, CACHE_MAX);
	rc_bytes = opts->refcount_cache_size ? opts->refcount_cache_size
					     : MAX(64ull << 10, l2_bytes / 4);
	rc_bytes = MIN(rc_bytes, CACHE_MAX);
	ret = qcow2_cache_init(s, &s->l2c, "L2", l2_bytes, slice, true);
	if (ret == 0)
		ret = qcow2_cache_init(s, &s->rbc, "refcount", rc_bytes, slice, false);
	if (ret == 0)
		ret = qcow2_bounce_init(s);
	if (ret == 0 && !(s->meta_buf = io_alloc(s->cluster_size)))
		ret = -ENOMEM;
	if (ret < 0) {
		log_error("%s: allocating caches: %s", fn, strerror(-ret));
		goto fail;
	}

	/* Read-write: every metadata range, for the overlap checks. */
	if (!ro) {
		ret = qcow2_ranges_open(s);
		if (ret < 0)
			goto fail;
	}

	if (s->meta.backing_file && !(opts->flags & BDRV_O_NO_BACKING)) {
		ret = bdrv_open_backing(bs, s->meta.backing_file, s->meta.backing_format,
					&s->backing);
		if (ret < 0)
			goto fail;
	}
	/* Guest data: the image file, or the external data file (the name
	 * counts only with the feature bit, as for QEMU). */
	s->data = s->file;
	if (h->incompat & QCOW2_INCOMPAT_DATA_FILE) {
		ret = bdrv_open_data_file(bs, s->meta.data_file, &s->data_file);
		if (ret < 0)
			goto fail;
		s->data = s->data_file;
		s->data_raw = h->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
	}

	/* Dirty bitmaps: tracked from the first write (bitmap.c). */
	if (!ro) {
		ret = qcow2_bitmaps_open(s);
		if (ret < 0)
			goto fail;
	}

	/* Read-write opens clear the autoclear bits we do not maintain. */
	uint64_t keep = QCOW2_AUTOCLEAR_BITMAPS |
			(s->data_file ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0);
	if (!ro && (h->autoclear & ~keep)) {
		char names[256];
		qcow2_feature_names(&s->meta, 2, h->autoclear & ~keep, names, sizeof(names));
		log_debug("%s: clearing autoclear feature(s): %s", fn, names);
		h->autoclear &= keep;
		ret = qcow2_write_header(s);
		if (ret == 0)
			ret = io_flush(s->file);
		if (ret < 0) {
			log_error("%s: rewriting the header: %s", fn, strerror(-ret));
			goto fail;
		}
	}

	if (!ro) {
		const char *spec = opts->inject ? opts->inject
				   : bs->parent ? NULL : getenv("QUBLK_INJECT");
		if (spec && *spec && qcow2_inject_parse(spec, &s->inject) < 0) {
			log_error("%s: bad error injection spec '%s'", fn, spec);
			ret = -EINVAL;
			goto fail;
		}
		if (spec && *spec)
			log_info("%s: error injection armed: %s", fn, spec);
	}

	/* A daemon that may be taken over (BDRV_O_CRASH_SAFE) writes the
	 * metadata each request changes to the file before the request
	 * completes, and runs with lazy refcounts so that it needs no sync
	 * for it: a crash leaves a dirty image, repaired at the next open. */
	s->write_through = !ro && (bs->open_flags & BDRV_O_CRASH_SAFE);
	s->grow_ahead = !ro;
	s->punch = !ro && !(bs->open_flags & BDRV_O_NO_UNMAP);
	s->lazy_refcounts = !ro && ((h->compat & QCOW2_COMPAT_LAZY_REFCOUNTS) || s->write_through);

	bs->opaque = s;
	bs->size = h->size;
	bs->cluster_size = s->cluster_size;
	/* Discarded whole clusters read as zeros unless v2 falls through to
	 * a backing file. */
	bs->zeroes_read_zero = h->version >= 3 || !s->backing;
	return 0;
fail:
	state_free(s);
	bs->opaque = NULL;
	return ret;
}

static int qcow2_close(struct bdrv *bs)
{
	struct qcow2_state *s = bs->opaque;
	int ret = 0;

	if (!s)
		return 0;
	if (s->corrupt) {
		/* Nothing more reaches the file (ranges.c). */
		ret = -EIO;
	} else if (!s->read_only) {
		co_mutex_lock(&s->lock);
		qcow2_cache_drain(&s->l2c);
		/* First flush applies the deferred decrements to the cache,
		 * the second writes them. */
		ret = qcow2_flush_locked(s);
		if (ret == 0)
			ret = qcow2_flush_locked(s);
		if (ret == 0 && s->ndbms) {
			ret = qcow2_bitmaps_store(s);
			if (ret == 0)
				ret = qcow2_flush_locked(s);
		}
		if (ret == 0)
			ret = qcow2_trim_file(s);
		if (ret == 0)
			ret = qcow2_mark_clean(s);
		co_mutex_unlock(&s->lock);
		if (ret < 0)
			log_error("%s: writing metadata back on close: %s", bs->filename,
				  strerror(-ret));
	}
	state_free(s);
	bs->opaque = NULL;
	return ret;
}

const struct bdrv_driver bdrv_qcow2 = {
	.name = "qcow2",
	.process_crash_safe = true,     /* write_through, see qcow2_open */
	.probe = qcow2_probe,
	.open = qcow2_open,
	.close = qcow2_close,
	.co_preadv = qcow2_co_preadv,
	.co_pwritev = qcow2_co_pwritev,
	.co_pwrite_zeroes = qcow2_co_pwrite_zeroes,
	.co_discard = qcow2_co_discard,
	.co_flush = qcow2_co_flush,
	.co_pwritev_compressed = qcow2_co_pwritev_compressed,
	.co_block_status = qcow2_co_block_status,
	.co_truncate = qcow2_co_truncate,
	.co_snapshot = qcow2_co_snapshot,
	.co_snapshot_list = qcow2_co_snapshot_list,
};
