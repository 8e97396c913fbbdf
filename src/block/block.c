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
#include "common/aio.h"
#include "common/coro.h"
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
	if (!len || ckd_add(&end, off, len) || end > __atomic_load_n(&bs->size, __ATOMIC_ACQUIRE))
		return -EINVAL;
	return 0;
}

static int check_iov(const struct iovec *iov, int iovcnt, uint64_t len)
{
	if (iovcnt <= 0 || iovcnt > BDRV_IOV_MAX || iov_size(iov, iovcnt) != len)
		return -EINVAL;
	return 0;
}

/* ---------------------------------------------------------- drained sections
 *
 * A request counts itself in bs->in_flight, then looks at bs->drained;
 * a drainer raises bs->drained, then looks at bs->in_flight (both
 * sequentially consistent): one of the two sees the other.  A request
 * that sees a section steps back out (waking the drainer if it was the
 * last) and waits on drain_held until the sections end.  Wake-ups happen
 * under drain_spin, so none is lost; a woken waiter looks again. */

static void req_begin(struct bdrv *bs)
{
	for (;;) {
		__atomic_add_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST);
		if (likely(!__atomic_load_n(&bs->drained, __ATOMIC_SEQ_CST)))
			return;
		spin_lock(&bs->drain_spin);
		if (__atomic_sub_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST) == 0)
			co_queue_wake_all(&bs->drain_waiters);
		if (__atomic_load_n(&bs->drained, __ATOMIC_SEQ_CST))
			co_queue_wait_spin(&bs->drain_held, &bs->drain_spin);
		else
			spin_unlock(&bs->drain_spin);
	}
}

static void req_end(struct bdrv *bs)
{
	if (__atomic_sub_fetch(&bs->in_flight, 1, __ATOMIC_SEQ_CST) == 0 &&
	    unlikely(__atomic_load_n(&bs->drained, __ATOMIC_SEQ_CST))) {
		spin_lock(&bs->drain_spin);
		co_queue_wake_all(&bs->drain_waiters);
		spin_unlock(&bs->drain_spin);
	}
}

void bdrv_drain_begin(struct bdrv *bs)
{
	spin_lock(&bs->drain_spin);
	__atomic_add_fetch(&bs->drained, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&bs->in_flight, __ATOMIC_SEQ_CST)) {
		co_queue_wait_spin(&bs->drain_waiters, &bs->drain_spin);
		spin_lock(&bs->drain_spin);
	}
	spin_unlock(&bs->drain_spin);
}

void bdrv_drain_end(struct bdrv *bs)
{
	spin_lock(&bs->drain_spin);
	if (__atomic_sub_fetch(&bs->drained, 1, __ATOMIC_SEQ_CST) == 0)
		co_queue_wake_all(&bs->drain_held);
	spin_unlock(&bs->drain_spin);
}

/* ---------------------------------------------------------- requests */

int bdrv_co_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		   const struct iovec *iov, int iovcnt)
{
	int ret = check_range(bs, off, len);
	if (!ret)
		ret = check_iov(iov, iovcnt, len);
	if (ret)
		return ret;
	req_begin(bs);
	ret = bs->drv->co_preadv(bs, off, len, iov, iovcnt);
	req_end(bs);
	return ret;
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
	if (ret)
		return ret;
	if (crash_flush(bs))
		flags |= BDRV_REQ_FUA;
	req_begin(bs);
	ret = bs->drv->co_pwritev(bs, off, len, iov, iovcnt, flags);
	req_end(bs);
	return ret;
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
	req_begin(bs);
	ret = bs->drv->co_pwritev_compressed(bs, off, len, iov, iovcnt);
	if (!ret && crash_flush(bs))
		ret = bs->drv->co_flush(bs);
	req_end(bs);
	return ret;
}

int bdrv_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags)
{
	if (bs->read_only)
		return -EROFS;
	int ret = check_range(bs, off, len);
	if (!ret && (flags & ~(BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK)))
		ret = -EINVAL;
	if (ret)
		return ret;
	if (bs->open_flags & BDRV_O_NO_UNMAP)
		flags &= ~BDRV_REQ_MAY_UNMAP;
	req_begin(bs);
	ret = bs->drv->co_pwrite_zeroes(bs, off, len, flags);
	if (!ret && ((flags & BDRV_REQ_FUA) || crash_flush(bs)))
		ret = bs->drv->co_flush(bs);
	req_end(bs);
	return ret;
}

int bdrv_co_discard(struct bdrv *bs, uint64_t off, uint64_t len)
{
	if (bs->read_only)
		return -EROFS;
	int ret = check_range(bs, off, len);
	if (ret || (bs->open_flags & BDRV_O_NO_UNMAP))
		return ret;
	req_begin(bs);
	ret = bs->drv->co_discard(bs, off, len);
	if (!ret && crash_flush(bs))
		ret = bs->drv->co_flush(bs);
	req_end(bs);
	return ret;
}

int bdrv_co_flush(struct bdrv *bs)
{
	int ret;

	if (bs->read_only)
		return 0;
	req_begin(bs);
	ret = bs->drv->co_flush(bs);
	req_end(bs);
	return ret;
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
	req_begin(bs);
	ret = bs->drv->co_block_status(bs, off, len, pnum, depth, host);
	req_end(bs);
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

/* ---------------------------------------------------------- truncate */

struct truncate_req {
	struct bdrv *bs;
	uint64_t size;
	unsigned flags;
	int ret;
};

/* A shrink drops the tail: refuse it if this image holds data there. */
static int tail_has_data(struct bdrv *bs, uint64_t from, uint64_t to)
{
	while (from < to) {
		uint64_t pnum;
		unsigned depth;
		int st = bdrv_co_block_status(bs, from, to - from, &pnum, &depth);
		if (st < 0)
			return st;
		if ((st & BDRV_BLOCK_DATA) && !(st & BDRV_BLOCK_ZERO) && depth == 1)
			return 1;
		from += pnum;
	}
	return 0;
}

static void co_truncate_entry(void *opaque)
{
	struct truncate_req *r = opaque;
	struct bdrv *bs = r->bs;
	uint64_t old = __atomic_load_n(&bs->size, __ATOMIC_ACQUIRE);
	int ret;

	if (r->size < old) {
		if (!(r->flags & BDRV_TRUNC_SHRINK)) {
			log_error("%s: %llu bytes is smaller than the image (%llu): shrinking "
				  "drops its end; use --shrink", bs->filename,
				  (unsigned long long)r->size, (unsigned long long)old);
			r->ret = -EPERM;
			return;
		}
		ret = tail_has_data(bs, r->size, old);
		if (ret != 0) {
			if (ret > 0)
				log_error("%s: the range [%llu, %llu) that a shrink to %llu bytes would "
					  "drop holds data: refused", bs->filename,
					  (unsigned long long)r->size, (unsigned long long)old,
					  (unsigned long long)r->size);
			else
				log_error("%s: block status of the tail: %s", bs->filename,
					  strerror(-ret));
			r->ret = ret > 0 ? -EPERM : ret;
			return;
		}
	}
	ret = bs->drv->co_truncate(bs, r->size);
	if (ret == 0)
		__atomic_store_n(&bs->size, r->size, __ATOMIC_RELEASE);
	r->ret = ret;
}

int bdrv_truncate(struct bdrv *bs, uint64_t size, unsigned flags)
{
	struct truncate_req r = { .bs = bs, .size = size, .flags = flags, .ret = 0 };
	int ret;

	if (bs->read_only) {
		log_error("%s: read-only: cannot resize", bs->filename);
		return -EROFS;
	}
	if (size == 0 || size % 512) {
		log_error("%s: %llu bytes: the size must be a positive multiple of 512",
			  bs->filename, (unsigned long long)size);
		return -EINVAL;
	}
	if (size == __atomic_load_n(&bs->size, __ATOMIC_ACQUIRE))
		return 0;
	if (!bs->drv->co_truncate) {
		log_error("%s: resizing %s images is not supported yet", bs->filename,
			  bs->drv->name);
		return -ENOTSUP;
	}
	if (coro_self()) {
		co_truncate_entry(&r);
		return r.ret;
	}
	ret = aio_run_coroutine(co_truncate_entry, &r);
	return ret < 0 ? ret : r.ret;
}

/* ---------------------------------------------------------- snapshots */

struct snapshot_req {
	struct bdrv *bs;
	enum bdrv_snapshot_op op;
	const char *name;
	struct qcow2_snapshot **list;   /* NULL: @op */
	uint32_t *n;
	char *err;
	size_t errlen;
	int ret;
};

static void co_snapshot_entry(void *opaque)
{
	struct snapshot_req *r = opaque;
	struct bdrv *bs = r->bs;

	if (r->list) {
		r->ret = bs->drv->co_snapshot_list(bs, r->list, r->n, r->err, r->errlen);
		return;
	}
	bdrv_drain_begin(bs);
	r->ret = bs->drv->co_snapshot(bs, r->op, r->name, r->err, r->errlen);
	bdrv_drain_end(bs);
}

static int run_snapshot(struct snapshot_req *r)
{
	int ret;

	if (coro_self()) {
		co_snapshot_entry(r);
		return r->ret;
	}
	ret = aio_run_coroutine(co_snapshot_entry, r);
	return ret < 0 ? ret : r->ret;
}

int bdrv_snapshot(struct bdrv *bs, enum bdrv_snapshot_op op, const char *name, char *err,
		  size_t errlen)
{
	struct snapshot_req r = { .bs = bs, .op = op, .name = name, .err = err, .errlen = errlen };
	int ret;

	if (errlen)
		err[0] = '\0';
	if (bs->read_only) {
		snprintf(err, errlen, "the image is open read-only");
		ret = -EROFS;
	} else if (!bs->drv->co_snapshot) {
		snprintf(err, errlen, "%s images have no internal snapshots", bs->drv->name);
		ret = -ENOTSUP;
	} else if (op != BDRV_SNAPSHOT_CREATE && op != BDRV_SNAPSHOT_DELETE) {
		snprintf(err, errlen, "unknown snapshot operation");
		ret = -EINVAL;
	} else {
		ret = run_snapshot(&r);
		if (ret < 0 && errlen && !err[0])
			snprintf(err, errlen, "%s", strerror(-ret));
	}
	if (ret < 0)
		log_error("%s: could not %s snapshot '%.64s': %s", bs->filename,
			  op == BDRV_SNAPSHOT_DELETE ? "delete" : "create", name,
			  errlen ? err : strerror(-ret));
	return ret;
}

int bdrv_snapshot_list(struct bdrv *bs, struct qcow2_snapshot **out, uint32_t *n, char *err,
		       size_t errlen)
{
	struct snapshot_req r = { .bs = bs, .list = out, .n = n, .err = err, .errlen = errlen };
	int ret;

	*out = NULL;
	*n = 0;
	if (errlen)
		err[0] = '\0';
	if (!bs->drv->co_snapshot_list)
		return 0;
	ret = run_snapshot(&r);
	if (ret < 0 && errlen && !err[0])
		snprintf(err, errlen, "%s", strerror(-ret));
	if (ret < 0)
		log_error("%s: could not list snapshots: %s", bs->filename,
			  errlen ? err : strerror(-ret));
	return ret;
}
