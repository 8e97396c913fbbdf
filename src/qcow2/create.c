/* SPDX-License-Identifier: MIT */
/*
 * qcow2 image creation, compatible with `qemu-img create -f qcow2`.
 *
 * A tool path: plain blocking pwrite on a descriptor, then fsync.
 * Layout (cluster indexes): 0 header, then the refcount table, the
 * refcount blocks, the L1 table and, with preallocation, every L2 table
 * followed by every data cluster.  Everything used is contiguous from
 * cluster 0, so each refcount block just marks a prefix with refcount 1;
 * the number of refcount blocks (which count themselves) is found by
 * iterating to a fixed point.  With preallocation off this is exactly
 * QEMU's layout (header, reftable, one refblock, L1).
 *
 * The header is written last, so an interrupted create leaves a file
 * that no qcow2 reader accepts.
 */
#include <stddef.h>

#include "qcow2/format.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/io.h"
#include "common/util.h"

#define FEATURE_ENTRY_LEN 48
#define ZERO_CHUNK (1u << 20)

static int cfail(char *err, size_t errlen, int ret, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int cfail(char *err, size_t errlen, int ret, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return ret;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* A minimal io_file over our descriptor, so the header goes through the
 * same serialiser as the driver's header updates. */
static int cfile_pwritev(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	for (int i = 0; i < cnt; i++) {
		int ret = pwrite_full(f->fd, iov[i].iov_base, iov[i].iov_len, off);
		if (ret)
			return ret;
		off += iov[i].iov_len;
	}
	return 0;
}

static const struct io_file_ops cfile_ops = {
	.pwritev = cfile_pwritev,
};

/* Probe @path: format ("qcow2" if the magic matches, else "raw") and
 * virtual size.  Returns -errno with @err set. */
static int probe_backing(const char *path, const char *fmt, char *fmt_out, size_t fmt_len,
			 uint64_t *size, char *err, size_t errlen)
{
	struct io_file *f = NULL;
	uint64_t fsize;
	uint8_t magic[4] = { 0 };
	char why[256];
	int ret = io_file_open(path, IO_OPEN_RDONLY, &f);

	if (ret)
		return cfail(err, errlen, ret, "could not open backing file '%s': %s", path,
			     strerror(-ret));
	ret = io_get_size(f, &fsize);
	if (!ret && fsize >= 4)
		ret = io_pread(f, magic, 4, 0);
	if (ret) {
		cfail(err, errlen, ret, "reading backing file '%s': %s", path, strerror(-ret));
		goto out;
	}
	if (!fmt)
		fmt = get_be32(magic) == QCOW2_MAGIC ? "qcow2" : "raw";
	snprintf(fmt_out, fmt_len, "%s", fmt);
	if (!strcmp(fmt, "qcow2")) {
		struct qcow2_meta m;
		ret = qcow2_meta_read(f, fsize, &m, why, sizeof(why));
		if (ret) {
			cfail(err, errlen, ret, "backing file '%s': %s", path, why);
			goto out;
		}
		*size = m.h.size;
		qcow2_meta_free(&m);
	} else if (!strcmp(fmt, "raw")) {
		*size = fsize;
	} else {
		ret = cfail(err, errlen, -ENOTSUP, "unknown backing format '%s'", fmt);
	}
out:
	io_file_close(f);
	return ret;
}

/* Where @name (relative to the new image's directory) is on the host. */
static char *backing_host_path(const char *image, const char *name)
{
	char *copy, *dir, *out = NULL;

	if (name[0] == '/')
		return strdup(name);
	copy = strdup(image);
	if (!copy)
		return NULL;
	dir = dirname(copy);
	if (asprintf(&out, "%s/%s", dir, name) < 0)
		out = NULL;
	free(copy);
	return out;
}

/* QEMU's feature name table, so that qemu-img and other tools can name
 * the bits of images we create. */
static int feature_table_ext(struct qcow2_ext *e)
{
	static const struct { uint8_t type, bit; const char *name; } feats[] = {
		{ 0, 0, "dirty bit" }, { 0, 1, "corrupt bit" }, { 0, 2, "external data file" },
		{ 0, 3, "compression type" }, { 0, 4, "extended L2 entries" },
		{ 1, 0, "lazy refcounts" }, { 2, 0, "bitmaps" }, { 2, 1, "raw external data" },
	};

	e->type = QCOW2_EXT_FEATURE_TABLE;
	e->len = (uint32_t)(ARRAY_SIZE(feats) * FEATURE_ENTRY_LEN);
	e->data = calloc(1, e->len);
	if (!e->data)
		return -ENOMEM;
	for (size_t i = 0; i < ARRAY_SIZE(feats); i++) {
		uint8_t *p = e->data + i * FEATURE_ENTRY_LEN;
		p[0] = feats[i].type;
		p[1] = feats[i].bit;
		memcpy(p + 2, feats[i].name, strlen(feats[i].name));
	}
	return 0;
}

struct layout {
	uint32_t cs;
	unsigned order;
	uint64_t l1_entries, l1_clusters, l2_clusters, data_clusters;
	uint64_t rt_clusters, rb_count, total;
	uint64_t rt_start, rb_start, l1_start, l2_start, data_start;
};

static int plan(const struct qcow2_create_opts *o, uint64_t size, struct layout *L, char *err,
		size_t errlen)
{
	uint64_t cs = L->cs;
	uint64_t span = cs * (cs / 8);
	uint64_t rb_entries = cs * 8 / (1u << L->order);
	uint64_t rt_per_cluster = cs / 8;

	L->l1_entries = size / span + (size % span != 0);
	if (L->l1_entries > QCOW2_MAX_L1_SIZE / 8)
		return cfail(err, errlen, -EFBIG,
			     "the image size is too large for qcow2 with %llu-byte clusters "
			     "(try a larger cluster_size)", (unsigned long long)cs);
	L->l1_clusters = DIV_ROUND_UP(L->l1_entries * 8, cs);
	L->l2_clusters = 0;
	L->data_clusters = 0;
	if (o->prealloc != QCOW2_PREALLOC_OFF) {
		L->l2_clusters = L->l1_entries;
		L->data_clusters = size / cs + (size % cs != 0);
	}
	uint64_t fixed = 1 + L->l1_clusters + L->l2_clusters + L->data_clusters;
	uint64_t rt = 1, rb = 1;
	for (;;) {
		uint64_t total = fixed + rt + rb;
		uint64_t nrb = DIV_ROUND_UP(total, rb_entries);
		uint64_t nrt = DIV_ROUND_UP(nrb, rt_per_cluster);
		if (nrb == rb && nrt == rt)
			break;
		rb = MAX(rb, nrb);   /* monotone, so this terminates */
		rt = MAX(rt, nrt);
	}
	if (rt * cs > QCOW2_MAX_REFTABLE_SIZE || (fixed + rt + rb) > (QCOW2_MAX_HOST_OFFSET / cs))
		return cfail(err, errlen, -EFBIG,
			     "the image needs more refcount metadata than qcow2 allows "
			     "(try a larger cluster_size or refcount_bits)");
	L->rt_clusters = rt;
	L->rb_count = rb;
	L->total = fixed + rt + rb;
	L->rt_start = 1;
	L->rb_start = L->rt_start + rt;
	L->l1_start = L->rb_start + rb;
	L->l2_start = L->l1_start + L->l1_clusters;
	L->data_start = L->l2_start + L->l2_clusters;
	return 0;
}

static int write_zeros(int fd, uint64_t off, uint64_t len)
{
	uint8_t *z = calloc(1, ZERO_CHUNK);
	int ret = 0;

	if (!z)
		return -ENOMEM;
	while (len && !ret) {
		size_t n = (size_t)MIN(len, (uint64_t)ZERO_CHUNK);
		ret = pwrite_full(fd, z, n, off);
		off += n;
		len -= n;
	}
	free(z);
	return ret;
}

static int write_tables(int fd, const struct qcow2_create_opts *o, uint64_t size,
			const struct layout *L)
{
	uint64_t cs = L->cs;
	uint64_t rb_entries = cs * 8 / (1u << L->order);
	uint8_t *buf = calloc(1, cs);
	int ret = 0;

	if (!buf)
		return -ENOMEM;
	/* Refcount table */
	for (uint64_t c = 0; c < L->rt_clusters && !ret; c++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < cs / 8; i++) {
			uint64_t idx = c * (cs / 8) + i;
			if (idx < L->rb_count)
				put_be64(buf + 8 * i, (L->rb_start + idx) * cs);
		}
		ret = pwrite_full(fd, buf, cs, (L->rt_start + c) * cs);
	}
	/* Refcount blocks: clusters [0, total) have refcount 1. */
	for (uint64_t b = 0; b < L->rb_count && !ret; b++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < rb_entries; i++) {
			uint64_t idx = b * rb_entries + i;
			if (idx >= L->total)
				break;
			qcow2_rc_set(buf, i, L->order, 1);
		}
		ret = pwrite_full(fd, buf, cs, (L->rb_start + b) * cs);
	}
	/* L1 table: only its used bytes, like QEMU (the rest reads as 0). */
	for (uint64_t c = 0; c < L->l1_clusters && !ret; c++) {
		uint64_t first = c * (cs / 8);
		uint64_t n = MIN(cs / 8, L->l1_entries - first);
		memset(buf, 0, cs);
		if (L->l2_clusters)
			for (uint64_t i = 0; i < n; i++)
				put_be64(buf + 8 * i,
					 ((L->l2_start + first + i) * cs) | QCOW2_OFLAG_COPIED);
		ret = pwrite_full(fd, buf, n * 8, (L->l1_start + c) * cs);
	}
	/* L2 tables, each mapping its guest clusters to consecutive data
	 * clusters, as QEMU's metadata preallocation does. */
	for (uint64_t t = 0; t < L->l2_clusters && !ret; t++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < cs / 8; i++) {
			uint64_t g = t * (cs / 8) + i;
			if (g >= L->data_clusters)
				break;
			put_be64(buf + 8 * i, ((L->data_start + g) * cs) | QCOW2_OFLAG_COPIED);
		}
		ret = pwrite_full(fd, buf, cs, (L->l2_start + t) * cs);
	}
	free(buf);
	if (ret || !L->data_clusters)
		return ret;

	uint64_t data_off = L->data_start * cs, data_len = L->data_clusters * cs;
	switch (o->prealloc) {
	case QCOW2_PREALLOC_FALLOC:
		if (fallocate(fd, 0, (off_t)data_off, (off_t)data_len) < 0)
			return -errno;
		break;
	case QCOW2_PREALLOC_FULL:
		ret = write_zeros(fd, data_off, data_len);
		break;
	default:
		break;
	}
	if (!ret && ftruncate(fd, (off_t)(L->total * cs)) < 0)
		ret = -errno;
	(void)size;
	return ret;
}

int qcow2_create(const char *path, const struct qcow2_create_opts *o, char *err, size_t errlen)
{
	struct layout L = { 0 };
	struct qcow2_meta m = { 0 };
	struct qcow2_ext ft = { 0 };
	char probed_fmt[32] = "";
	uint64_t size = o->size;
	uint32_t cs = o->cluster_size ? o->cluster_size : 65536;
	uint32_t version = o->version ? o->version : 3;
	uint32_t rbits = o->refcount_bits ? o->refcount_bits : 16;
	const char *bfmt = o->backing_format;
	int fd = -1, ret;

	if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
		return cfail(err, errlen, -EINVAL,
			     "cluster size must be a power of two between 512 and 2M");
	if (version != 2 && version != 3)
		return cfail(err, errlen, -EINVAL, "unsupported qcow2 version %u", version);
	if (rbits > 64 || (rbits & (rbits - 1)))
		return cfail(err, errlen, -EINVAL,
			     "refcount_bits must be a power of two between 1 and 64");
	if (version == 2 && rbits != 16)
		return cfail(err, errlen, -EINVAL,
			     "refcount_bits other than 16 require compat=1.1");
	if (version == 2 && o->lazy_refcounts)
		return cfail(err, errlen, -EINVAL, "lazy refcounts require compat=1.1");
	if (o->compression_type > QCOW2_COMPRESSION_ZSTD)
		return cfail(err, errlen, -EINVAL, "unknown compression type %u", o->compression_type);
	if (version == 2 && o->compression_type != QCOW2_COMPRESSION_ZLIB)
		return cfail(err, errlen, -EINVAL, "compression_type=zstd requires compat=1.1");
	if (o->extended_l2)
		return cfail(err, errlen, -ENOTSUP, "extended_l2 is not supported yet");
	if (o->prealloc < QCOW2_PREALLOC_OFF || o->prealloc > QCOW2_PREALLOC_FULL)
		return cfail(err, errlen, -EINVAL, "unknown preallocation mode");
	if (o->backing_format && !o->backing_file)
		return cfail(err, errlen, -EINVAL, "a backing format needs a backing file");
	if (o->backing_file) {
		if (!o->backing_file[0] || strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME)
			return cfail(err, errlen, -EINVAL, "backing file name must be 1..%u bytes",
				     QCOW2_MAX_BACKING_NAME);
		if (o->prealloc != QCOW2_PREALLOC_OFF)
			return cfail(err, errlen, -EINVAL,
				     "backing file and preallocation cannot be used together");
		if (bfmt && strcmp(bfmt, "qcow2") && strcmp(bfmt, "raw"))
			return cfail(err, errlen, -EINVAL, "unknown backing format '%s'", bfmt);
		/* Open the backing file when we need something from it. */
		if (!bfmt || size == 0) {
			uint64_t bsize = 0;
			char *host = backing_host_path(path, o->backing_file);
			if (!host)
				return cfail(err, errlen, -ENOMEM, "out of memory");
			ret = probe_backing(host, bfmt, probed_fmt, sizeof(probed_fmt), &bsize, err,
					    errlen);
			free(host);
			if (ret)
				return ret;
			bfmt = probed_fmt;
			if (size == 0)
				size = bsize;
		}
	}
	size = ALIGN_UP(size, (uint64_t)512);
	if (size > (uint64_t)INT64_MAX)
		return cfail(err, errlen, -EFBIG, "image size too large");

	L.cs = cs;
	L.order = (unsigned)__builtin_ctz(rbits);
	ret = plan(o, size, &L, err, errlen);
	if (ret)
		return ret;

	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return cfail(err, errlen, -errno, "%s", strerror(errno));
	ret = write_tables(fd, o, size, &L);
	if (ret) {
		cfail(err, errlen, ret, "writing metadata: %s", strerror(-ret));
		goto out;
	}

	m.h.version = version;
	m.h.cluster_bits = (uint32_t)__builtin_ctz(cs);
	m.h.size = size;
	m.h.l1_size = (uint32_t)L.l1_entries;
	m.h.l1_offset = L.l1_entries ? L.l1_start * cs : 0;
	m.h.reftable_offset = L.rt_start * cs;
	m.h.reftable_clusters = (uint32_t)L.rt_clusters;
	m.h.refcount_order = L.order;
	m.h.compression_type = o->compression_type;
	if (o->compression_type != QCOW2_COMPRESSION_ZLIB)
		m.h.incompat |= QCOW2_INCOMPAT_COMPRESSION;
	if (o->lazy_refcounts)
		m.h.compat |= QCOW2_COMPAT_LAZY_REFCOUNTS;
	m.backing_file = (char *)o->backing_file;
	m.backing_format = (char *)bfmt;
	if (version == 3) {
		ret = feature_table_ext(&ft);
		if (ret) {
			cfail(err, errlen, ret, "out of memory");
			goto out;
		}
		m.exts = &ft;
		m.n_exts = 1;
	}
	struct io_file cf = { .ops = &cfile_ops, .fd = fd };
	ret = qcow2_meta_write(&cf, &m);
	if (ret) {
		if (ret == -EFBIG)
			cfail(err, errlen, ret, "header does not fit in one cluster");
		else
			cfail(err, errlen, ret, "writing the header: %s", strerror(-ret));
		goto out;
	}
	if (fsync(fd) < 0) {
		ret = -errno;
		cfail(err, errlen, ret, "fsync: %s", strerror(-ret));
	}
out:
	free(ft.data);
	if (close(fd) < 0 && !ret) {
		ret = -errno;
		cfail(err, errlen, ret, "close: %s", strerror(-ret));
	}
	return ret;
}
