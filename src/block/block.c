/* SPDX-License-Identifier: MIT */
/*
 * Generic block layer: opening images (format probing, backing files,
 * image locks) and the checked entry points every frontend calls.  The
 * request contract (see bdrv.h) is checked here once; drivers trust it.
 * Every file is locked here, on its real descriptor, before anything
 * reads it (block/lock.h); the lock lives as long as the descriptor.
 */
#include "block/bdrv.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/lock.h"
#include "common/util.h"

#define BDRV_MAX_BACKING_DEPTH 32

static const struct bdrv_driver *const drivers[] = {
	&bdrv_qcow2,
	&bdrv_raw,
};

const struct bdrv_driver *bdrv_find_driver(const char *name)
{
	for (size_t i = 0; i < ARRAY_SIZE(drivers); i++)
		if (!strcmp(drivers[i]->name, name))
			return drivers[i];
	return NULL;
}

static const struct bdrv_driver *probe(struct io_file *f)
{
	uint8_t buf[512];
	const struct bdrv_driver *best = &bdrv_raw;
	int best_score = 0;

	if (io_pread(f, buf, sizeof(buf), 0) < 0)
		return &bdrv_raw;
	for (size_t i = 0; i < ARRAY_SIZE(drivers); i++) {
		int score = drivers[i]->probe ? drivers[i]->probe(buf, sizeof(buf)) : 0;
		if (score > best_score) {
			best = drivers[i];
			best_score = score;
		}
	}
	return best;
}

static int open_common(const char *filename, const struct bdrv_opts *opts,
		       struct bdrv *parent, struct bdrv **out)
{
	const struct bdrv_driver *drv = NULL;
	struct bdrv *bs = NULL;
	struct stat st;
	unsigned ioflags = 0, perm, shared;
	bool force_share = opts->flags & BDRV_O_FORCE_SHARE;
	int ret;

	ret = 0;
	if (force_share && !(opts->flags & BDRV_O_RDONLY)) {
		log_error("%s: force-share (-U) is only allowed read-only", filename);
		ret = -EINVAL;
	} else if (opts->format && !(drv = bdrv_find_driver(opts->format))) {
		log_error("%s: unknown format '%s'", filename, opts->format);
		ret = -EINVAL;
	} else if (!(bs = calloc(1, sizeof(*bs))) || !(bs->filename = strdup(filename))) {
		free(bs);
		ret = -ENOMEM;
	}
	if (ret < 0) {
		if (opts->adopt && !parent)
			close(opts->adopt_fd);
		return ret;
	}
	bs->parent = parent;
	bs->open_flags = opts->flags;
	bs->read_only = opts->flags & BDRV_O_RDONLY;
	if (bs->read_only)
		ioflags |= IO_OPEN_RDONLY;
	if (opts->flags & BDRV_O_DIRECT)
		ioflags |= IO_OPEN_DIRECT;
	if (opts->adopt && !parent) {
		ret = io_file_adopt(opts->adopt_fd, filename, &bs->file);
		if (ret == 0 && bs->file->read_only != bs->read_only)
			ret = -EBADF;
	} else {
		ret = io_file_open(filename, ioflags, &bs->file);
	}
	if (ret < 0) {
		log_error("%s: cannot open: %s", filename, strerror(-ret));
		goto fail;
	}
	if (fstat(bs->file->fd, &st) == 0) {
		bs->dev = st.st_dev;
		bs->ino = st.st_ino;
	}
	for (struct bdrv *p = parent; p; p = p->parent) {
		if (p->dev == bs->dev && p->ino == bs->ino) {
			log_error("%s: backing file loop (it backs itself through %s)",
				  filename, parent->filename);
			ret = -ELOOP;
			goto fail;
		}
	}
	/* After the loop check: an image opened twice conflicts with itself. */
	lock_perms(bs->read_only, force_share, &perm, &shared);
	ret = lock_take(bs->file->fd, filename, perm, shared);
	if (ret < 0)
		goto fail;
	if (opts->wrap_file && !parent) {
		struct io_file *wrapped;
		ret = opts->wrap_file(bs->file, &wrapped, opts->wrap_opaque);
		if (ret < 0)
			goto fail;
		bs->file = wrapped;
	}
	if (!drv)
		drv = probe(bs->file);
	bs->drv = drv;
	ret = drv->open(bs, opts);
	if (ret < 0) {
		bs->drv = NULL;
		goto fail;
	}
	*out = bs;
	return 0;
fail:
	io_file_close(bs->file);
	free(bs->filename);
	free(bs);
	return ret;
}

int bdrv_open(const char *filename, const struct bdrv_opts *opts, struct bdrv **out)
{
	return open_common(filename, opts, NULL, out);
}

/* @name as a path: absolute, or relative to the directory of @parent's
 * file as the user named it (symlinks kept, as QEMU does). */
static int relative_to(const struct bdrv *parent, const char *name, char *path, size_t len)
{
	if (name[0] == '/' || !strchr(parent->filename, '/')) {
		if (snprintf(path, len, "%s", name) >= (int)len)
			return -ENAMETOOLONG;
	} else {
		char dir[PATH_MAX];
		snprintf(dir, sizeof(dir), "%s", parent->filename);
		if (snprintf(path, len, "%s/%s", dirname(dir), name) >= (int)len)
			return -ENAMETOOLONG;
	}
	return 0;
}

int bdrv_open_data_file(struct bdrv *parent, const char *name, struct io_file **out)
{
	unsigned ioflags = 0, perm, shared;
	char path[PATH_MAX];
	struct stat st;
	int ret;

	if (!name[0]) {
		log_error("%s: empty data file name", parent->filename);
		return -EINVAL;
	}
	ret = relative_to(parent, name, path, sizeof(path));
	if (ret < 0)
		return ret;
	if (parent->read_only)
		ioflags |= IO_OPEN_RDONLY;
	if (parent->open_flags & BDRV_O_DIRECT)
		ioflags |= IO_OPEN_DIRECT;
	ret = io_file_open(path, ioflags, out);
	if (ret < 0) {
		log_error("%s: cannot open data file %s: %s", parent->filename, path, strerror(-ret));
		return ret;
	}
	if (fstat((*out)->fd, &st) == 0 && st.st_dev == parent->dev && st.st_ino == parent->ino) {
		log_error("%s: the data file is the image itself", parent->filename);
		ret = -ELOOP;
	}
	/* The data file holds the guest data: locked like the image. */
	lock_perms(parent->read_only, parent->open_flags & BDRV_O_FORCE_SHARE, &perm, &shared);
	if (ret == 0)
		ret = lock_take((*out)->fd, path, perm, shared);
	if (ret < 0) {
		io_file_close(*out);
		*out = NULL;
	}
	return ret;
}

int bdrv_open_backing(struct bdrv *parent, const char *name, const char *format,
		      struct bdrv **out)
{
	struct bdrv_opts opts = {
		.flags = BDRV_O_RDONLY |
			 (parent->open_flags & (BDRV_O_DIRECT | BDRV_O_FORCE_SHARE)),
		.format = format,
		.backing_depth = 0,
	};
	char path[PATH_MAX];
	unsigned depth = 0;

	for (struct bdrv *p = parent; p; p = p->parent)
		depth++;
	if (depth > BDRV_MAX_BACKING_DEPTH) {
		log_error("%s: backing chain deeper than %d", parent->filename,
			  BDRV_MAX_BACKING_DEPTH);
		return -ELOOP;
	}
	if (!name[0]) {
		log_error("%s: empty backing file name", parent->filename);
		return -EINVAL;
	}
	int ret = relative_to(parent, name, path, sizeof(path));
	if (ret < 0)
		return ret;
	ret = open_common(path, &opts, parent, out);
	if (ret < 0)
		log_error("%s: cannot open backing file %s", parent->filename, path);
	return ret;
}

int bdrv_close_keep_fd(struct bdrv *bs, int *fd)
{
	int ret;

	*fd = -1;
	if (bs && bs->file && bs->file->fd >= 0) {
		*fd = fcntl(bs->file->fd, F_DUPFD_CLOEXEC, 0);
		if (*fd < 0) {
			ret = -errno;
			bdrv_close(bs);
			return ret;
		}
	}
	ret = bdrv_close(bs);
	if (ret < 0 && *fd >= 0) {
		close(*fd);
		*fd = -1;
	}
	return ret;
}

int bdrv_close(struct bdrv *bs)
{
	int ret = 0;

	if (!bs)
		return 0;
	if (bs->drv)
		ret = bs->drv->close(bs);
	io_file_close(bs->file);
	free(bs->filename);
	free(bs);
	return ret;
}

static inline int check_range(struct bdrv *bs, uint64_t off, uint64_t len)
{
	uint64_t end;
	if (!len || ckd_add(&end, off, len) || end > bs->size)
		return -EINVAL;
	return 0;
}

static int check_iov(const struct iovec *iov, int iovcnt, uint64_t len)
{
	if (iovcnt <= 0 || iovcnt > BDRV_IOV_MAX || iov_size(iov, iovcnt) != len)
		return -EINVAL;
	return 0;
}

int bdrv_co_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		   const struct iovec *iov, int iovcnt)
{
	int ret = check_range(bs, off, len);
	if (!ret)
		ret = check_iov(iov, iovcnt, len);
	return ret ? ret : bs->drv->co_preadv(bs, off, len, iov, iovcnt);
}

/* BDRV_O_CRASH_SAFE on a driver that caches metadata: flush after each
 * request that may change it. */
static bool crash_flush(const struct bdrv *bs)
{
	return (bs->open_flags & BDRV_O_CRASH_SAFE) && !bs->drv->process_crash_safe;
}

int bdrv_co_pwritev(struct bdrv *bs, uint64_t off, uint64_t len,
		    const struct iovec *iov, int iovcnt, unsigned flags)
{
	if (bs->read_only)
		return -EROFS;
	int ret = check_range(bs, off, len);
	if (!ret)
		ret = check_iov(iov, iovcnt, len);
	if (!ret && (flags & ~BDRV_REQ_FUA))
		ret = -EINVAL;
	if (crash_flush(bs))
		flags |= BDRV_REQ_FUA;
	return ret ? ret : bs->drv->co_pwritev(bs, off, len, iov, iovcnt, flags);
}

int bdrv_co_pwritev_compressed(struct bdrv *bs, uint64_t off, uint64_t len,
			       const struct iovec *iov, int iovcnt)
{
	uint64_t cs = bs->cluster_size;
	int ret;

	if (bs->read_only)
		return -EROFS;
	if (!bs->drv->co_pwritev_compressed || !cs)
		return -ENOTSUP;
	ret = check_range(bs, off, len);
	if (!ret)
		ret = check_iov(iov, iovcnt, len);
	if (!ret && (off % cs || (len != cs && off + len != bs->size) || len > cs))
		ret = -EINVAL;
	if (ret)
		return ret;
	ret = bs->drv->co_pwritev_compressed(bs, off, len, iov, iovcnt);
	if (!ret && crash_flush(bs))
		ret = bs->drv->co_flush(bs);
	return ret;
}

int bdrv_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags)
{
	if (bs->read_only)
		return -EROFS;
	int ret = check_range(bs, off, len);
	if (!ret && (flags & ~(BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP)))
		ret = -EINVAL;
	if (ret)
		return ret;
	if (bs->open_flags & BDRV_O_NO_UNMAP)
		flags &= ~BDRV_REQ_MAY_UNMAP;
	ret = bs->drv->co_pwrite_zeroes(bs, off, len, flags);
	if (!ret && ((flags & BDRV_REQ_FUA) || crash_flush(bs)))
		ret = bs->drv->co_flush(bs);
	return ret;
}

int bdrv_co_discard(struct bdrv *bs, uint64_t off, uint64_t len)
{
	if (bs->read_only)
		return -EROFS;
	int ret = check_range(bs, off, len);
	if (!ret && (bs->open_flags & BDRV_O_NO_UNMAP))
		return 0;
	if (!ret)
		ret = bs->drv->co_discard(bs, off, len);
	if (!ret && crash_flush(bs))
		ret = bs->drv->co_flush(bs);
	return ret;
}

int bdrv_co_flush(struct bdrv *bs)
{
	if (bs->read_only)
		return 0;
	return bs->drv->co_flush(bs);
}

int bdrv_co_block_status_host(struct bdrv *bs, uint64_t off, uint64_t len,
			      uint64_t *pnum, unsigned *depth, uint64_t *host)
{
	int ret = check_range(bs, off, len);

	if (ret)
		return ret;
	if (!bs->drv->co_block_status) {
		*pnum = len;
		*depth = 1;
		return BDRV_BLOCK_DATA;
	}
	ret = bs->drv->co_block_status(bs, off, len, pnum, depth, host);
	if (ret >= 0 && (*pnum == 0 || *pnum > len)) {
		log_error("%s: block status returned %llu bytes for a range of %llu",
			  bs->filename, (unsigned long long)*pnum, (unsigned long long)len);
		return -EIO;
	}
	if (ret >= 0 && (ret & BDRV_BLOCK_OFFSET_VALID) && !host) {
		log_error("%s: block status gave a host offset nobody asked for",
			  bs->filename);
		return -EIO;
	}
	return ret;
}
