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
 * The image is written to a temporary file next to its final name and
 * renamed into place only when complete and synced (create_file_*): a
 * failed or interrupted create leaves the old file, or no file, behind,
 * never a partial image.  An existing image is locked as `qemu-img create`
 * locks it (QEMU's lock bytes, src/block/lock.h) before it is replaced,
 * so an image in use by qublk or QEMU is refused, never truncated.
 *
 * Like QEMU, the feature name table is written only with clusters of more
 * than 4 KiB, where cluster 0 has room to spare: at 512 B a header with a
 * backing file name would not fit.
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

#include "block/lock.h"
#include "common/io.h"
#include "common/util.h"

#define FEATURE_ENTRY_LEN 48
/* QEMU writes the feature name table only above this cluster size. */
#define FEATURE_TABLE_MIN_CLUSTER 8192
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

/* ---- the file: temporary name, lock, rename ---------------------------- */

void create_file_abort(struct create_file *cf)
{
	if (cf->fd >= 0)
		close(cf->fd);
	if (cf->tmp)
		unlink(cf->tmp);
	if (cf->lock_fd >= 0)
		close(cf->lock_fd);
	free(cf->tmp);
	free(cf->target);
	cf->fd = cf->lock_fd = -1;
	cf->tmp = cf->target = NULL;
}

int create_file_begin(const char *path, struct create_file *cf, char *err, size_t errlen)
{
	struct stat st;
	char *copy = NULL;
	int ret;

	memset(cf, 0, sizeof(*cf));
	cf->fd = cf->lock_fd = -1;
	cf->lock_fd = open(path, O_RDWR | O_CLOEXEC);
	if (cf->lock_fd < 0 && errno != ENOENT) {
		ret = -errno;
		return cfail(err, errlen, ret, "%s", strerror(-ret));
	}
	if (cf->lock_fd >= 0) {
		/* As qemu-img create: hold write and resize, share all but
		 * resize.  Anyone reading or writing the image conflicts. */
		if (fstat(cf->lock_fd, &st) < 0) {
			ret = -errno;
			cfail(err, errlen, ret, "stat: %s", strerror(-ret));
			goto fail;
		}
		if (!S_ISREG(st.st_mode)) {
			ret = cfail(err, errlen, -EINVAL, "not a regular file");
			goto fail;
		}
		ret = lock_take(cf->lock_fd, path, LOCK_PERM_WRITE | LOCK_PERM_RESIZE,
				LOCK_PERM_ALL & ~LOCK_PERM_RESIZE);
		if (ret) {
			cfail(err, errlen, ret, "%s",
			      ret == -EAGAIN ? "the image is in use; not replaced" : strerror(-ret));
			goto fail;
		}
		/* A symlink is followed: its target is what gets replaced. */
		cf->target = realpath(path, NULL);
		cf->existed = true;
		cf->mode = st.st_mode & 07777;
		cf->uid = st.st_uid;
		cf->gid = st.st_gid;
	} else {
		cf->target = strdup(path);
	}
	copy = cf->target ? strdup(cf->target) : NULL;
	if (!copy || asprintf(&cf->tmp, "%s/.%s.qublk-XXXXXX", dirname(copy),
			      basename(cf->target)) < 0) {
		cf->tmp = NULL;
		ret = cfail(err, errlen, -ENOMEM, "out of memory");
		goto fail;
	}
	cf->fd = mkostemp(cf->tmp, O_CLOEXEC);
	if (cf->fd < 0) {
		ret = -errno;
		free(cf->tmp);
		cf->tmp = NULL;
		cfail(err, errlen, ret, "creating a temporary file next to it: %s", strerror(-ret));
		goto fail;
	}
	/* The replacement keeps the old file's owner and mode; a new file
	 * gets 0644 like QEMU's (before the umask). */
	if (cf->existed) {
		if (fchown(cf->fd, cf->uid, cf->gid) < 0 && errno != EPERM) {
			ret = -errno;
			cfail(err, errlen, ret, "fchown: %s", strerror(-ret));
			goto fail;
		}
		if (fchmod(cf->fd, cf->mode) < 0) {
			ret = -errno;
			cfail(err, errlen, ret, "fchmod: %s", strerror(-ret));
			goto fail;
		}
	} else {
		mode_t um = umask(0);
		umask(um);
		if (fchmod(cf->fd, 0644 & ~um) < 0) {
			ret = -errno;
			cfail(err, errlen, ret, "fchmod: %s", strerror(-ret));
			goto fail;
		}
	}
	free(copy);
	return 0;
fail:
	free(copy);
	create_file_abort(cf);
	return ret;
}

int create_file_commit(struct create_file *cf, char *err, size_t errlen)
{
	char *copy = NULL;
	int ret = 0, dfd;

	if (fsync(cf->fd) < 0) {
		ret = -errno;
		cfail(err, errlen, ret, "fsync: %s", strerror(-ret));
		goto out;
	}
	if (close(cf->fd) < 0) {
		cf->fd = -1;
		ret = -errno;
		cfail(err, errlen, ret, "close: %s", strerror(-ret));
		goto out;
	}
	cf->fd = -1;
	if (cf->existed) {
		/* Still holding the old image's locks: nobody opened it since. */
		if (rename(cf->tmp, cf->target) < 0)
			ret = -errno;
	} else if (renameat2(AT_FDCWD, cf->tmp, AT_FDCWD, cf->target, RENAME_NOREPLACE) < 0) {
		ret = -errno;
		if (ret == -EINVAL || ret == -ENOSYS)     /* no RENAME_NOREPLACE here */
			ret = link(cf->tmp, cf->target) < 0 ? -errno : 0;
		if (ret == -EEXIST) {
			cfail(err, errlen, ret, "the file was created by someone else meanwhile");
			goto out;
		}
	}
	if (ret) {
		cfail(err, errlen, ret, "renaming the new image into place: %s", strerror(-ret));
		goto out;
	}
	if (!cf->existed)
		unlink(cf->tmp);        /* after link(); a no-op after a rename */
	free(cf->tmp);
	cf->tmp = NULL;
	/* Make the new name durable. */
	copy = strdup(cf->target);
	if (copy) {
		dfd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd >= 0) {
			if (fsync(dfd) < 0 && errno != EINVAL)
				ret = cfail(err, errlen, -errno, "fsync of the directory: %s",
					    strerror(errno));
			close(dfd);
		}
	}
out:
	free(copy);
	create_file_abort(cf);
	return ret;
}

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
	uint32_t cs, version;
	uint32_t l2e_size;      /* bytes per L2 entry: 8, or 16 with extended L2 */
	unsigned order;
	int prealloc;           /* QCOW2_PREALLOC_*: data_file_raw implies metadata */
	bool ext_data;          /* guest cluster X maps to data file cluster X */
	uint64_t l1_entries, l1_clusters, l2_clusters;
	uint64_t mapped;        /* guest clusters with an L2 entry (preallocation) */
	uint64_t data_clusters; /* of those, the ones in the image file */
	uint64_t rt_clusters, rb_count, total;
	uint64_t rt_start, rb_start, l1_start, l2_start, data_start;
};

static int plan(const struct qcow2_create_opts *o, uint64_t size, struct layout *L, char *err,
		size_t errlen)
{
	uint64_t cs = L->cs;
	uint64_t span = cs * (cs / L->l2e_size);
	uint64_t rb_entries = cs * 8 / (1u << L->order);
	uint64_t rt_per_cluster = cs / 8;

	L->l1_entries = size / span + (size % span != 0);
	if (L->l1_entries > QCOW2_MAX_L1_SIZE / 8)
		return cfail(err, errlen, -EFBIG,
			     "the image size is too large for qcow2 with %llu-byte clusters "
			     "(try a larger cluster_size)", (unsigned long long)cs);
	L->l1_clusters = DIV_ROUND_UP(L->l1_entries * 8, cs);
	L->l2_clusters = 0;
	L->mapped = L->data_clusters = 0;
	if (L->prealloc != QCOW2_PREALLOC_OFF) {
		L->l2_clusters = L->l1_entries;
		L->mapped = size / cs + (size % cs != 0);
		L->data_clusters = L->ext_data ? 0 : L->mapped;
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
	 * clusters, as QEMU's metadata preallocation does (in an external
	 * data file: guest cluster X to its cluster X).  With extended L2
	 * the subcluster bitmaps stay 0, as QEMU leaves them: the clusters
	 * are there, their subclusters unallocated (reading zeros). */
	for (uint64_t t = 0; t < L->l2_clusters && !ret; t++) {
		uint64_t per = cs / L->l2e_size;
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < per; i++) {
			uint64_t g = t * per + i;
			if (g >= L->mapped)
				break;
			uint64_t host = L->ext_data ? g * cs : (L->data_start + g) * cs;
			put_be64(buf + L->l2e_size * i, host | QCOW2_OFLAG_COPIED);
		}
		ret = pwrite_full(fd, buf, cs, (L->l2_start + t) * cs);
	}
	free(buf);
	if (ret || !L->data_clusters)
		return ret;

	uint64_t data_off = L->data_start * cs, data_len = L->data_clusters * cs;
	switch (L->prealloc) {
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

/* Check @o, find the virtual size (a backing file's when @o->size is 0)
 * and lay the image out in @L.  Nothing is written.  Returns -errno with
 * @err set. */
static int prepare(const char *path, const struct qcow2_create_opts *o, uint64_t *size_out,
		   struct layout *L, char *err, size_t errlen)
{
	char probed_fmt[32] = "";
	uint64_t size = o->size;
	uint32_t cs = o->cluster_size ? o->cluster_size : 65536;
	uint32_t version = o->version ? o->version : 3;
	uint32_t rbits = o->refcount_bits ? o->refcount_bits : 16;
	const char *bfmt = o->backing_format;
	int ret;

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
	/* QEMU's limits and words ("Extended L2 Entries"). */
	if (o->extended_l2 && version < 3)
		return cfail(err, errlen, -EINVAL,
			     "Extended L2 entries are only supported with compatibility level 1.1 "
			     "and above (use version=v3 or greater)");
	if (o->extended_l2 && cs < QCOW2_EXTL2_MIN_CLUSTER)
		return cfail(err, errlen, -EINVAL,
			     "Extended L2 entries are only supported with cluster sizes of at "
			     "least %u bytes", QCOW2_EXTL2_MIN_CLUSTER);
	if (o->prealloc < QCOW2_PREALLOC_OFF || o->prealloc > QCOW2_PREALLOC_FULL)
		return cfail(err, errlen, -EINVAL, "unknown preallocation mode");
	/* External data files: QEMU's rules and words. */
	if (o->data_file_raw && !o->data_file)
		return cfail(err, errlen, -EINVAL, "data-file-raw requires data-file");
	if (o->data_file && version < 3)
		return cfail(err, errlen, -EINVAL,
			     "External data files are only supported with compatibility level "
			     "1.1 and above (use version=v3 or greater)");
	if (o->data_file_raw && o->backing_file)
		return cfail(err, errlen, -EINVAL,
			     "Backing file and data-file-raw cannot be used at the same time");
	if (o->data_file && (!o->data_file[0] || strlen(o->data_file) > QCOW2_MAX_BACKING_NAME))
		return cfail(err, errlen, -EINVAL, "data file name must be 1..%u bytes",
			     QCOW2_MAX_BACKING_NAME);
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
		/* Open the backing file when we need something from it.  Its
		 * format is never probed into the image: QEMU refuses that
		 * (a raw backing file could be made to look like anything). */
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
			if (!bfmt)
				return cfail(err, errlen, -EINVAL,
					     "backing file specified without backing format (it looks "
					     "like %s)", probed_fmt);
			if (size == 0)
				size = bsize;
		}
	}
	size = ALIGN_UP(size, (uint64_t)512);
	if (size > (uint64_t)INT64_MAX)
		return cfail(err, errlen, -EFBIG, "image size too large");

	memset(L, 0, sizeof(*L));
	L->cs = cs;
	L->version = version;
	L->l2e_size = o->extended_l2 ? 16 : 8;
	L->order = (unsigned)__builtin_ctz(rbits);
	L->ext_data = o->data_file != NULL;
	/* A raw data file needs every guest cluster mapped (QEMU does the
	 * same): no cluster may read as unallocated or zero over its data. */
	L->prealloc = o->data_file_raw && o->prealloc == QCOW2_PREALLOC_OFF
			      ? QCOW2_PREALLOC_METADATA : o->prealloc;
	*size_out = size;
	return plan(o, size, L, err, errlen);
}

/* Write the image prepare() laid out into @fd, from offset 0. */
static int write_image(int fd, const struct qcow2_create_opts *o, uint64_t size,
		       const struct layout *L, char *err, size_t errlen)
{
	struct qcow2_meta m = { 0 };
	struct qcow2_ext ft = { 0 };
	uint32_t cs = L->cs;
	int ret = write_tables(fd, o, size, L);

	if (ret)
		return cfail(err, errlen, ret, "writing metadata: %s", strerror(-ret));
	m.h.version = L->version;
	m.h.cluster_bits = (uint32_t)__builtin_ctz(cs);
	m.h.size = size;
	m.h.l1_size = (uint32_t)L->l1_entries;
	m.h.l1_offset = L->l1_entries ? L->l1_start * cs : 0;
	m.h.reftable_offset = L->rt_start * cs;
	m.h.reftable_clusters = (uint32_t)L->rt_clusters;
	m.h.refcount_order = L->order;
	m.h.compression_type = o->compression_type;
	if (o->compression_type != QCOW2_COMPRESSION_ZLIB)
		m.h.incompat |= QCOW2_INCOMPAT_COMPRESSION;
	if (o->lazy_refcounts)
		m.h.compat |= QCOW2_COMPAT_LAZY_REFCOUNTS;
	if (o->extended_l2)
		m.h.incompat |= QCOW2_INCOMPAT_EXTL2;
	if (o->data_file) {
		m.h.incompat |= QCOW2_INCOMPAT_DATA_FILE;
		m.data_file = (char *)o->data_file;
	}
	if (o->data_file_raw)
		m.h.autoclear |= QCOW2_AUTOCLEAR_DATA_FILE_RAW;
	m.backing_file = (char *)o->backing_file;
	m.backing_format = (char *)o->backing_format;
	if (m.h.version == 3 && cs >= FEATURE_TABLE_MIN_CLUSTER) {
		ret = feature_table_ext(&ft);
		if (ret)
			return cfail(err, errlen, ret, "out of memory");
		m.exts = &ft;
		m.n_exts = 1;
	}
	struct io_file cfile = { .ops = &cfile_ops, .fd = fd };
	ret = qcow2_meta_write(&cfile, &m);
	if (ret) {
		if (ret == -EFBIG)
			cfail(err, errlen, ret, "header does not fit in one cluster");
		else
			cfail(err, errlen, ret, "writing the header: %s", strerror(-ret));
	}
	free(ft.data);
	return ret;
}

int create_raw_fill(int fd, uint64_t size, int prealloc)
{
	if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t)size) < 0)
		return -errno;
	if (prealloc == QCOW2_PREALLOC_FALLOC && size && fallocate(fd, 0, 0, (off_t)size) < 0)
		return -errno;
	if (prealloc == QCOW2_PREALLOC_FULL)
		return write_zeros(fd, 0, size);
	return 0;
}

/* Begin the external data file of a new image (as qemu-img create does:
 * an existing file is replaced, with its old contents gone): @size bytes,
 * preallocated with falloc or full.  Committed before the image. */
static int begin_data_file(const char *image, const struct qcow2_create_opts *o, uint64_t size,
			   const struct layout *L, struct create_file *df, char *err, size_t errlen)
{
	char *host = backing_host_path(image, o->data_file);
	char why[256] = "";
	int ret;

	if (!host)
		return cfail(err, errlen, -ENOMEM, "out of memory");
	ret = create_file_begin(host, df, why, sizeof(why));
	if (!ret) {
		ret = create_raw_fill(df->fd, size, L->prealloc);
		if (ret) {
			snprintf(why, sizeof(why), "%s", strerror(-ret));
			create_file_abort(df);
		}
	}
	if (ret)
		cfail(err, errlen, ret, "data file %s: %s", host, why);
	free(host);
	return ret;
}

int qcow2_create(const char *path, const struct qcow2_create_opts *o, char *err, size_t errlen)
{
	struct create_file file, data;
	struct layout L;
	uint64_t size;
	int ret = prepare(path, o, &size, &L, err, errlen);

	if (ret)
		return ret;
	if (o->data_file) {
		ret = begin_data_file(path, o, size, &L, &data, err, errlen);
		if (ret)
			return ret;
	}
	ret = create_file_begin(path, &file, err, errlen);
	if (ret) {
		if (o->data_file)
			create_file_abort(&data);
		return ret;
	}
	ret = write_image(file.fd, o, size, &L, err, errlen);
	/* The data file first: an image never names a file that is not
	 * there yet. */
	if (!ret && o->data_file)
		ret = create_file_commit(&data, err, errlen);
	else if (o->data_file)
		create_file_abort(&data);
	if (ret) {
		create_file_abort(&file);
		return ret;
	}
	return create_file_commit(&file, err, errlen);
}

int qcow2_create_into(struct create_file *cf, const char *path,
		      const struct qcow2_create_opts *o, char *err, size_t errlen)
{
	struct layout L;
	uint64_t size;
	int ret = prepare(path, o, &size, &L, err, errlen);

	if (ret)
		return ret;
	if (o->data_file)
		return cfail(err, errlen, -ENOTSUP, "an external data file cannot be made here");
	if (ftruncate(cf->fd, 0) < 0)
		return cfail(err, errlen, -errno, "truncating: %s", strerror(errno));
	return write_image(cf->fd, o, size, &L, err, errlen);
}
