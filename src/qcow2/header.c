/* SPDX-License-Identifier: MIT */
/*
 * qcow2 cluster 0: the fixed header, the header extensions and the
 * backing file name (qcow2.rst "Header", "Header extensions").
 *
 * Owns parsing and validating everything in cluster 0, serialising it
 * back, and naming feature bits.  No global state; called by the driver
 * at open and on every header update (under its metadata lock), and by
 * the image tools.
 *
 * Invariants after a successful qcow2_meta_read():
 *  - every offset in struct qcow2_header is cluster aligned and the table
 *    it points at lies inside the file, with all sizes overflow-checked
 *    (QCOW2_META_FOR_CHECK: the L1 and refcount tables may lie past EOF
 *    and the refcount table may be empty, for the checker to count);
 *  - l1_size covers the virtual size and is within QEMU's limit;
 *  - m->exts holds every extension in disk order, known ones included, so
 *    a rewrite keeps unknown ones byte for byte.
 * Feature bits are decoded, not judged: the caller refuses what it must.
 */
#include <stddef.h>

#include "qcow2/format.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/io.h"
#include "common/util.h"

/* "Feature name table": 48-byte entries: type, bit number, 46-byte name. */
#define FEATURE_ENTRY_LEN 48
#define FEATURE_NAME_LEN 46
/* QEMU keeps the backing format in a 16-byte buffer and refuses longer. */
#define MAX_BACKING_FORMAT_LEN 15

static int fail(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EINVAL;
}

/* A table of @len bytes at @off: aligned, not over the header (when
 * non-empty), inside the file.  Returns 0 or -EINVAL with @err set. */
static int check_table(const char *what, uint64_t off, uint64_t len, uint32_t cluster_size,
		       uint64_t file_size, char *err, size_t errlen)
{
	uint64_t end;

	if (!IS_ALIGNED(off, cluster_size))
		return fail(err, errlen, "%s offset 0x%llx is not cluster aligned", what,
			    (unsigned long long)off);
	if (len == 0)
		return 0;
	if (off == 0)
		return fail(err, errlen, "%s offset 0 overlaps the image header", what);
	if (ckd_add(&end, off, len) || end > file_size)
		return fail(err, errlen,
			    "%s at 0x%llx (%llu bytes) extends beyond the end of the file (%llu bytes)",
			    what, (unsigned long long)off, (unsigned long long)len,
			    (unsigned long long)file_size);
	return 0;
}

/* Copy @len bytes of untrusted name into a NUL-terminated string. */
static char *dup_name(const uint8_t *p, size_t len)
{
	char *s = malloc(len + 1);

	if (!s)
		return NULL;
	memcpy(s, p, len);
	s[len] = '\0';
	return s;
}

void qcow2_meta_free(struct qcow2_meta *m)
{
	if (!m)
		return;
	free(m->backing_file);
	free(m->backing_format);
	free(m->data_file);
	for (unsigned i = 0; i < m->n_exts; i++)
		free(m->exts[i].data);
	free(m->exts);
	free(m->unknown_hdr);
	memset(m, 0, sizeof(*m));
}

static int parse_fixed(const uint8_t *buf, uint64_t file_size, unsigned flags,
		       struct qcow2_header *h, char *err, size_t errlen)
{
	/* The checker counts tables past EOF as corruptions, as QEMU does. */
	uint64_t tables_end = (flags & QCOW2_META_FOR_CHECK) ? UINT64_MAX : file_size;
	uint32_t magic = get_be32(buf + QCOW2_HDR_MAGIC);

	memset(h, 0, sizeof(*h));
	if (magic != QCOW2_MAGIC)
		return fail(err, errlen, "not a qcow2 image (magic 0x%08x)", magic);
	h->version = get_be32(buf + QCOW2_HDR_VERSION);
	if (h->version != 2 && h->version != 3)
		return fail(err, errlen, "unsupported qcow2 version %u", h->version);
	h->backing_offset = get_be64(buf + QCOW2_HDR_BACKING_OFFSET);
	h->backing_size = get_be32(buf + QCOW2_HDR_BACKING_SIZE);
	h->cluster_bits = get_be32(buf + QCOW2_HDR_CLUSTER_BITS);
	h->size = get_be64(buf + QCOW2_HDR_SIZE);
	h->crypt_method = get_be32(buf + QCOW2_HDR_CRYPT_METHOD);
	h->l1_size = get_be32(buf + QCOW2_HDR_L1_SIZE);
	h->l1_offset = get_be64(buf + QCOW2_HDR_L1_OFFSET);
	h->reftable_offset = get_be64(buf + QCOW2_HDR_REFTABLE_OFFSET);
	h->reftable_clusters = get_be32(buf + QCOW2_HDR_REFTABLE_CLUSTERS);
	h->nb_snapshots = get_be32(buf + QCOW2_HDR_NB_SNAPSHOTS);
	h->snapshots_offset = get_be64(buf + QCOW2_HDR_SNAPSHOTS_OFFSET);

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return fail(err, errlen, "cluster_bits %u out of range (%u..%u)", h->cluster_bits,
			    QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
	uint32_t cs = 1u << h->cluster_bits;

	if (h->version == 2) {
		h->header_length = QCOW2_HDR_V2_LENGTH;
		h->refcount_order = 4;
		h->compression_type = QCOW2_COMPRESSION_ZLIB;
	} else {
		if (file_size < QCOW2_HDR_V3_LENGTH)
			return fail(err, errlen, "file too short for a qcow2 v3 header (%llu bytes)",
				    (unsigned long long)file_size);
		h->incompat = get_be64(buf + QCOW2_HDR_INCOMPAT);
		h->compat = get_be64(buf + QCOW2_HDR_COMPAT);
		h->autoclear = get_be64(buf + QCOW2_HDR_AUTOCLEAR);
		h->refcount_order = get_be32(buf + QCOW2_HDR_REFCOUNT_ORDER);
		h->header_length = get_be32(buf + QCOW2_HDR_HEADER_LENGTH);
		if (h->header_length < QCOW2_HDR_V3_LENGTH)
			return fail(err, errlen, "header_length %u is shorter than %u", h->header_length,
				    QCOW2_HDR_V3_LENGTH);
		if (h->header_length % 8)
			return fail(err, errlen, "header_length %u is not a multiple of 8",
				    h->header_length);
		if (h->header_length > cs)
			return fail(err, errlen, "header_length %u exceeds the cluster size %u",
				    h->header_length, cs);
		if (h->header_length > file_size)
			return fail(err, errlen, "header_length %u extends beyond the end of the file",
				    h->header_length);
		if (h->refcount_order > 6)
			return fail(err, errlen, "refcount_order %u out of range (0..6)",
				    h->refcount_order);
		h->compression_type = QCOW2_COMPRESSION_ZLIB;
		if (h->header_length > QCOW2_HDR_COMPRESSION_TYPE)
			h->compression_type = buf[QCOW2_HDR_COMPRESSION_TYPE];
		if (h->compression_type != QCOW2_COMPRESSION_ZLIB &&
		    h->compression_type != QCOW2_COMPRESSION_ZSTD)
			return fail(err, errlen, "unknown compression type %u", h->compression_type);
		bool bit = h->incompat & QCOW2_INCOMPAT_COMPRESSION;
		if (h->compression_type == QCOW2_COMPRESSION_ZLIB && bit)
			return fail(err, errlen,
				    "compression type incompatible bit set with zlib compression");
		if (h->compression_type != QCOW2_COMPRESSION_ZLIB && !bit)
			return fail(err, errlen,
				    "compression type incompatible bit not set for zstd compression");
	}

	/* "Header": crypt_method 0 none, 1 AES (legacy), 2 LUKS.  Only the
	 * tools that describe an image accept encryption. */
	if (h->crypt_method > QCOW2_CRYPT_LUKS)
		return fail(err, errlen, "unknown encryption method %u", h->crypt_method);
	if (h->crypt_method != 0 && !(flags & QCOW2_META_ALLOW_CRYPT))
		return fail(err, errlen,
			    "image is encrypted (%s); qublk cannot read or serve encrypted images",
			    h->crypt_method == QCOW2_CRYPT_LUKS ? "LUKS" : "legacy AES");

	/* "Cluster mapping": one L1 entry maps cs * (cs / 8) bytes. */
	uint64_t span = (uint64_t)cs * (cs / 8);
	uint64_t need = h->size / span + (h->size % span != 0);
	if (need > QCOW2_MAX_L1_SIZE / 8)
		return fail(err, errlen, "virtual size %llu is too large for cluster size %u",
			    (unsigned long long)h->size, cs);
	if (h->l1_size > QCOW2_MAX_L1_SIZE / 8)
		return fail(err, errlen, "l1_size %u exceeds the maximum of %u entries", h->l1_size,
			    QCOW2_MAX_L1_SIZE / 8);
	if (h->l1_size < need)
		return fail(err, errlen, "l1_size %u is too small for virtual size %llu (needs %llu)",
			    h->l1_size, (unsigned long long)h->size, (unsigned long long)need);
	int ret = check_table("l1_table", h->l1_offset, (uint64_t)h->l1_size * 8, cs, tables_end,
			      err, errlen);
	if (ret)
		return ret;

	if (h->reftable_clusters == 0 && !(flags & QCOW2_META_FOR_CHECK))
		return fail(err, errlen, "refcount_table_clusters is 0");
	if ((uint64_t)h->reftable_clusters * cs > QCOW2_MAX_REFTABLE_SIZE)
		return fail(err, errlen, "refcount table too large (%u clusters, maximum %u bytes)",
			    h->reftable_clusters, QCOW2_MAX_REFTABLE_SIZE);
	ret = check_table("refcount_table", h->reftable_offset, (uint64_t)h->reftable_clusters * cs,
			  cs, tables_end, err, errlen);
	if (ret)
		return ret;

	if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
		return fail(err, errlen, "too many snapshots (%u, maximum %u)", h->nb_snapshots,
			    QCOW2_MAX_SNAPSHOTS);
	ret = check_table("snapshot table", h->snapshots_offset,
			  (uint64_t)h->nb_snapshots * QCOW2_SNAP_FIXED_LEN, cs, file_size, err, errlen);
	if (ret)
		return ret;

	if (h->backing_offset == 0) {
		h->backing_size = 0;
	} else {
		uint64_t end;
		if (h->backing_size == 0 || h->backing_size > QCOW2_MAX_BACKING_NAME)
			return fail(err, errlen, "backing file name length %u out of range (1..%u)",
				    h->backing_size, QCOW2_MAX_BACKING_NAME);
		if (h->backing_offset < h->header_length)
			return fail(err, errlen, "backing file name offset 0x%llx overlaps the header",
				    (unsigned long long)h->backing_offset);
		if (ckd_add(&end, h->backing_offset, (uint64_t)h->backing_size) || end > cs)
			return fail(err, errlen, "backing file name at 0x%llx (%u bytes) is outside cluster 0",
				    (unsigned long long)h->backing_offset, h->backing_size);
		if (end > file_size)
			return fail(err, errlen, "backing file name extends beyond the end of the file");
	}
	return 0;
}

static int add_ext(struct qcow2_meta *m, uint32_t type, const uint8_t *data, uint32_t len)
{
	struct qcow2_ext *e = realloc(m->exts, (m->n_exts + 1) * sizeof(*e));

	if (!e)
		return -ENOMEM;
	m->exts = e;
	e = &m->exts[m->n_exts];
	e->type = type;
	e->len = len;
	e->data = malloc(len ? len : 1);
	if (!e->data)
		return -ENOMEM;
	memcpy(e->data, data, len);
	m->n_exts++;
	return 0;
}

/* "Header extensions": from the end of the header to the backing name
 * (or the end of cluster 0), each { be32 type, be32 len, data padded to 8 }. */
static int parse_exts(const uint8_t *buf, uint32_t cs, struct qcow2_meta *m, char *err,
		      size_t errlen)
{
	const struct qcow2_header *h = &m->h;
	uint64_t off = h->header_length;
	uint64_t end = h->backing_offset ? h->backing_offset : cs;

	while (off < end) {
		if (end - off < 8)
			return fail(err, errlen, "truncated header extension at offset 0x%llx",
				    (unsigned long long)off);
		uint32_t type = get_be32(buf + off);
		uint32_t len = get_be32(buf + off + 4);
		off += 8;
		if (type == QCOW2_EXT_END)
			return 0;
		if (len > end - off)
			return fail(err, errlen,
				    "header extension 0x%08x at offset 0x%llx: length %u exceeds cluster 0",
				    type, (unsigned long long)(off - 8), len);
		const uint8_t *data = buf + off;
		switch (type) {
		case QCOW2_EXT_BACKING_FORMAT:
			if (len > MAX_BACKING_FORMAT_LEN)
				return fail(err, errlen, "backing format extension too long (%u bytes)", len);
			free(m->backing_format);
			m->backing_format = dup_name(data, len);
			if (!m->backing_format)
				return -ENOMEM;
			break;
		case QCOW2_EXT_DATA_FILE:
			if (len == 0 || len > 4096)
				return fail(err, errlen, "external data file name length %u out of range", len);
			free(m->data_file);
			m->data_file = dup_name(data, len);
			if (!m->data_file)
				return -ENOMEM;
			break;
		default:
			break;
		}
		int ret = add_ext(m, type, data, len);
		if (ret)
			return ret;
		off += ALIGN_UP((uint64_t)len, 8);
	}
	return 0;
}

int qcow2_meta_read(struct io_file *f, uint64_t file_size, struct qcow2_meta *m,
		    char *err, size_t errlen)
{
	return qcow2_meta_read_flags(f, file_size, 0, m, err, errlen);
}

int qcow2_meta_read_flags(struct io_file *f, uint64_t file_size, unsigned flags,
			  struct qcow2_meta *m, char *err, size_t errlen)
{
	uint8_t small[QCOW2_HDR_V3_FULL_LENGTH];
	uint8_t *buf = NULL;
	int ret;

	memset(m, 0, sizeof(*m));
	if (err && errlen)
		err[0] = '\0';
	if (file_size < QCOW2_HDR_V2_LENGTH)
		return fail(err, errlen, "file too short for a qcow2 header (%llu bytes)",
			    (unsigned long long)file_size);
	ret = io_pread(f, small, sizeof(small), 0);
	if (ret) {
		snprintf(err, errlen, "reading the header: %s", strerror(-ret));
		return ret;
	}
	ret = parse_fixed(small, file_size, flags, &m->h, err, errlen);
	if (ret)
		return ret;

	uint32_t cs = 1u << m->h.cluster_bits;
	buf = io_alloc(cs);
	if (!buf)
		return -ENOMEM;
	/* Reads past end of file return zeros, so a short cluster 0 parses
	 * as if padded: extensions then end at the first zero type (END). */
	ret = io_pread(f, buf, cs, 0);
	if (ret) {
		snprintf(err, errlen, "reading cluster 0: %s", strerror(-ret));
		goto out;
	}
	/* Re-check against the full read: the file may have changed under us. */
	if (memcmp(buf, small, sizeof(small))) {
		ret = fail(err, errlen, "header changed while reading");
		goto out;
	}
	if (m->h.header_length > QCOW2_HDR_V3_FULL_LENGTH) {
		m->unknown_hdr_len = m->h.header_length - QCOW2_HDR_V3_FULL_LENGTH;
		m->unknown_hdr = malloc(m->unknown_hdr_len);
		if (!m->unknown_hdr) {
			ret = -ENOMEM;
			goto out;
		}
		memcpy(m->unknown_hdr, buf + QCOW2_HDR_V3_FULL_LENGTH, m->unknown_hdr_len);
	}
	ret = parse_exts(buf, cs, m, err, errlen);
	if (ret)
		goto out;
	if (m->h.backing_offset) {
		m->backing_file = dup_name(buf + m->h.backing_offset, m->h.backing_size);
		if (!m->backing_file) {
			ret = -ENOMEM;
			goto out;
		}
	}
	ret = 0;
out:
	io_free(buf);
	if (ret) {
		if (ret == -ENOMEM && err && errlen && !err[0])
			snprintf(err, errlen, "out of memory");
		qcow2_meta_free(m);
	}
	return ret;
}

static uint8_t *put_ext(uint8_t *p, uint32_t type, const void *data, uint32_t len)
{
	put_be32(p, type);
	put_be32(p + 4, len);
	memcpy(p + 8, data, len);
	memset(p + 8 + len, 0, ALIGN_UP(len, 8) - len);
	return p + 8 + ALIGN_UP(len, 8);
}

/* Bytes an extension takes on disk, header included. */
static uint64_t ext_space(uint64_t len)
{
	return 8 + ALIGN_UP(len, 8);
}

int qcow2_meta_write(struct io_file *f, const struct qcow2_meta *m)
{
	const struct qcow2_header *h = &m->h;
	uint32_t cs;
	uint64_t need, hdr_len;
	/* An empty name (a name cut at an embedded NUL) is no name. */
	const char *bformat = m->backing_format && *m->backing_format ? m->backing_format : NULL;
	const char *dfile = m->data_file && *m->data_file ? m->data_file : NULL;
	size_t bf_len = bformat ? strlen(bformat) : 0;
	size_t df_len = dfile ? strlen(dfile) : 0;
	size_t bn_len = m->backing_file ? strlen(m->backing_file) : 0;
	bool have_bf = false, have_df = false;
	int ret;

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS ||
	    (h->version != 2 && h->version != 3) || bn_len > QCOW2_MAX_BACKING_NAME ||
	    bf_len > MAX_BACKING_FORMAT_LEN)
		return -EINVAL;
	cs = 1u << h->cluster_bits;

	if (h->version == 2)
		hdr_len = QCOW2_HDR_V2_LENGTH;
	else
		hdr_len = QCOW2_HDR_V3_FULL_LENGTH + (m->unknown_hdr ? m->unknown_hdr_len : 0);
	need = hdr_len;
	for (unsigned i = 0; i < m->n_exts; i++) {
		const struct qcow2_ext *e = &m->exts[i];
		if (e->type == QCOW2_EXT_BACKING_FORMAT) {
			if (bformat && !have_bf)
				need += ext_space(bf_len);
			have_bf = true;
		} else if (e->type == QCOW2_EXT_DATA_FILE) {
			if (dfile && !have_df)
				need += ext_space(df_len);
			have_df = true;
		} else {
			need += ext_space(e->len);
		}
	}
	if (bformat && !have_bf)
		need += ext_space(bf_len);
	if (dfile && !have_df)
		need += ext_space(df_len);
	need += 8 + bn_len;        /* END, then the backing file name */
	if (need > cs || hdr_len % 8)
		return -EFBIG;

	uint8_t *buf = io_zalloc(cs);
	if (!buf)
		return -ENOMEM;
	put_be32(buf + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
	put_be32(buf + QCOW2_HDR_VERSION, h->version);
	put_be32(buf + QCOW2_HDR_CLUSTER_BITS, h->cluster_bits);
	put_be64(buf + QCOW2_HDR_SIZE, h->size);
	put_be32(buf + QCOW2_HDR_CRYPT_METHOD, h->crypt_method);
	put_be32(buf + QCOW2_HDR_L1_SIZE, h->l1_size);
	put_be64(buf + QCOW2_HDR_L1_OFFSET, h->l1_offset);
	put_be64(buf + QCOW2_HDR_REFTABLE_OFFSET, h->reftable_offset);
	put_be32(buf + QCOW2_HDR_REFTABLE_CLUSTERS, h->reftable_clusters);
	put_be32(buf + QCOW2_HDR_NB_SNAPSHOTS, h->nb_snapshots);
	put_be64(buf + QCOW2_HDR_SNAPSHOTS_OFFSET, h->snapshots_offset);
	if (h->version == 3) {
		put_be64(buf + QCOW2_HDR_INCOMPAT, h->incompat);
		put_be64(buf + QCOW2_HDR_COMPAT, h->compat);
		put_be64(buf + QCOW2_HDR_AUTOCLEAR, h->autoclear);
		put_be32(buf + QCOW2_HDR_REFCOUNT_ORDER, h->refcount_order);
		put_be32(buf + QCOW2_HDR_HEADER_LENGTH, (uint32_t)hdr_len);
		buf[QCOW2_HDR_COMPRESSION_TYPE] = h->compression_type;
		if (m->unknown_hdr && m->unknown_hdr_len)
			memcpy(buf + QCOW2_HDR_V3_FULL_LENGTH, m->unknown_hdr, m->unknown_hdr_len);
	}

	/* Extensions in their original order; the decoded backing format
	 * and data file name win over the stored bytes, as the caller may
	 * have changed them.  New ones go first, where QEMU puts them. */
	uint8_t *p = buf + hdr_len;
	have_bf = have_df = false;
	for (unsigned i = 0; i < m->n_exts; i++)
		if (m->exts[i].type == QCOW2_EXT_BACKING_FORMAT)
			have_bf = true;
		else if (m->exts[i].type == QCOW2_EXT_DATA_FILE)
			have_df = true;
	if (bformat && !have_bf)
		p = put_ext(p, QCOW2_EXT_BACKING_FORMAT, bformat, (uint32_t)bf_len);
	if (dfile && !have_df)
		p = put_ext(p, QCOW2_EXT_DATA_FILE, dfile, (uint32_t)df_len);
	have_bf = have_df = false;
	for (unsigned i = 0; i < m->n_exts; i++) {
		const struct qcow2_ext *e = &m->exts[i];
		if (e->type == QCOW2_EXT_BACKING_FORMAT) {
			if (bformat && !have_bf)
				p = put_ext(p, e->type, bformat, (uint32_t)bf_len);
			have_bf = true;
		} else if (e->type == QCOW2_EXT_DATA_FILE) {
			if (dfile && !have_df)
				p = put_ext(p, e->type, dfile, (uint32_t)df_len);
			have_df = true;
		} else {
			p = put_ext(p, e->type, e->data, e->len);
		}
	}
	p += 8;                    /* END: type 0, length 0 (already zero) */
	if (bn_len) {
		uint64_t off = (uint64_t)(p - buf);
		put_be64(buf + QCOW2_HDR_BACKING_OFFSET, off);
		put_be32(buf + QCOW2_HDR_BACKING_SIZE, (uint32_t)bn_len);
		memcpy(p, m->backing_file, bn_len);
	}
	ret = io_pwrite(f, buf, cs, 0);
	io_free(buf);
	return ret;
}

static const char *default_feature_name(int type, unsigned bit)
{
	static const char *const incompat[] = {
		"dirty", "corrupt", "external data file", "compression type", "extended L2 entries",
	};
	static const char *const autoclear[] = { "bitmaps", "raw external data" };

	if (type == 0 && bit < ARRAY_SIZE(incompat))
		return incompat[bit];
	if (type == 1 && bit == 0)
		return "lazy refcounts";
	if (type == 2 && bit < ARRAY_SIZE(autoclear))
		return autoclear[bit];
	return NULL;
}

/* Look @bit up in the image's feature name table; copy a printable name. */
static bool table_feature_name(const struct qcow2_meta *m, int type, unsigned bit, char *out,
			       size_t outlen)
{
	for (unsigned i = 0; i < m->n_exts; i++) {
		const struct qcow2_ext *e = &m->exts[i];
		if (e->type != QCOW2_EXT_FEATURE_TABLE)
			continue;
		for (uint32_t o = 0; o + FEATURE_ENTRY_LEN <= e->len; o += FEATURE_ENTRY_LEN) {
			const uint8_t *ent = e->data + o;
			if (ent[0] != type || ent[1] != bit)
				continue;
			size_t n = 0;
			for (size_t k = 0; k < FEATURE_NAME_LEN && ent[2 + k] && n + 1 < outlen; k++) {
				uint8_t c = ent[2 + k];
				out[n++] = (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') ? (char)c : '?';
			}
			if (n == 0)
				continue;
			out[n] = '\0';
			return true;
		}
	}
	return false;
}

void qcow2_feature_names(const struct qcow2_meta *m, int type, uint64_t bits, char *buf,
			 size_t buflen)
{
	size_t used = 0;

	if (!buflen)
		return;
	buf[0] = '\0';
	for (unsigned bit = 0; bit < 64; bit++) {
		char name[FEATURE_NAME_LEN + 1];
		if (!(bits & (1ull << bit)))
			continue;
		if (!m || !table_feature_name(m, type, bit, name, sizeof(name))) {
			const char *d = default_feature_name(type, bit);
			if (d)
				snprintf(name, sizeof(name), "%s", d);
			else
				snprintf(name, sizeof(name), "bit %u", bit);
		}
		int n = snprintf(buf + used, buflen - used, "%s%s", used ? ", " : "", name);
		if (n < 0 || (size_t)n >= buflen - used)
			return;     /* truncated, still NUL-terminated */
		used += (size_t)n;
	}
}
