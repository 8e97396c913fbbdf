/* SPDX-License-Identifier: MIT */
/*
 * The raw driver: the image file (or block device) is the disk.
 * Discard punches holes; write-zeroes uses fallocate where the file
 * system can, else writes zeros from a shared zero buffer.  Resizing is
 * ftruncate (regular files only).  Block status
 * comes from the file system's holes (SEEK_DATA/SEEK_HOLE): a hole reads
 * as zeros, everything else is data.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/util.h"

#define RAW_ZERO_BUF (1024 * 1024)

struct raw_state {
	void *zeros;          /* RAW_ZERO_BUF of zeros, shared by requests */
	bool no_fallocate;    /* file system refused ZERO_RANGE */
	bool no_punch;        /* file system refused PUNCH_HOLE */
};

static int raw_open(struct bdrv *bs, const struct bdrv_opts *opts)
{
	struct raw_state *s = calloc(1, sizeof(*s));
	int ret;

	if (!s)
		return -ENOMEM;
	s->zeros = io_zalloc(RAW_ZERO_BUF);
	if (!s->zeros) {
		free(s);
		return -ENOMEM;
	}
	bs->opaque = s;
	ret = io_get_size(bs->file, &bs->size);
	if (ret < 0) {
		log_error("%s: cannot get size: %s", bs->filename, strerror(-ret));
		io_free(s->zeros);
		free(s);
		return ret;
	}
	bs->zeroes_read_zero = true;
	return 0;
}

static int raw_close(struct bdrv *bs)
{
	struct raw_state *s = bs->opaque;
	int ret = 0;

	if (!bs->read_only)
		ret = io_flush(bs->file);
	if (ret < 0)
		log_error("%s: flush on close: %s", bs->filename, strerror(-ret));
	io_free(s->zeros);
	free(s);
	return ret;
}

static int raw_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		      const struct iovec *iov, int iovcnt)
{
	return io_preadv(bs->file, iov, iovcnt, off);
}

static int raw_pwritev(struct bdrv *bs, uint64_t off, uint64_t len,
		       const struct iovec *iov, int iovcnt, unsigned flags)
{
	int ret = io_pwritev(bs->file, iov, iovcnt, off);
	if (!ret && (flags & BDRV_REQ_FUA))
		ret = io_flush(bs->file);
	return ret;
}

static int write_zero_buffers(struct bdrv *bs, uint64_t off, uint64_t len)
{
	struct raw_state *s = bs->opaque;

	while (len) {
		size_t n = MIN(len, (uint64_t)RAW_ZERO_BUF);
		int ret = io_pwrite(bs->file, s->zeros, n, off);
		if (ret < 0)
			return ret;
		off += n;
		len -= n;
	}
	return 0;
}

static int raw_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags)
{
	struct raw_state *s = bs->opaque;
	int ret;

	if ((flags & BDRV_REQ_MAY_UNMAP) && !s->no_punch) {
		ret = io_fallocate(bs->file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
		if (!ret)
			return 0;
		if (ret != -EOPNOTSUPP && ret != -EINVAL)
			return ret;
		s->no_punch = true;
	}
	if (!s->no_fallocate) {
		ret = io_fallocate(bs->file, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len);
		if (!ret)
			return 0;
		if (ret != -EOPNOTSUPP && ret != -EINVAL)
			return ret;
		s->no_fallocate = true;
	}
	if (flags & BDRV_REQ_NO_FALLBACK)
		return -ENOTSUP;
	return write_zero_buffers(bs, off, len);
}

static int raw_discard(struct bdrv *bs, uint64_t off, uint64_t len)
{
	struct raw_state *s = bs->opaque;
	int ret;

	/* Discard is advisory: where holes cannot be punched the data stays. */
	if (s->no_punch)
		return 0;
	ret = io_fallocate(bs->file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
	if (ret == -EOPNOTSUPP || ret == -EINVAL) {
		s->no_punch = true;
		return 0;
	}
	return ret;
}

static int raw_flush(struct bdrv *bs)
{
	return io_flush(bs->file);
}

static int raw_block_status(struct bdrv *bs, uint64_t off, uint64_t len,
			    uint64_t *pnum, unsigned *depth)
{
	int fd = bs->file->fd;
	off_t data, hole;

	*depth = 1;
	*pnum = len;
	if (fd < 0)
		return BDRV_BLOCK_DATA;
	/* lseek on the loop thread: the file system answers from its extent
	 * tree without I/O (QEMU's file-posix does the same). */
	data = lseek(fd, (off_t)off, SEEK_DATA);
	if (data < 0) {
		/* ENXIO: no data from here to the end of the file. */
		return errno == ENXIO ? BDRV_BLOCK_ZERO : BDRV_BLOCK_DATA;
	}
	if ((uint64_t)data > off) {
		*pnum = MIN(len, (uint64_t)data - off);
		return BDRV_BLOCK_ZERO;
	}
	hole = lseek(fd, (off_t)off, SEEK_HOLE);
	if (hole > (off_t)off)
		*pnum = MIN(len, (uint64_t)hole - off);
	return BDRV_BLOCK_DATA;
}

/* The file's size is the disk's: growing leaves a hole (zeros). */
static int raw_truncate(struct bdrv *bs, uint64_t size)
{
	struct stat st;
	int ret;

	if (bs->file->fd >= 0 && fstat(bs->file->fd, &st) == 0 && !S_ISREG(st.st_mode)) {
		log_error("%s: not a regular file: cannot resize", bs->filename);
		return -ENOTSUP;
	}
	ret = io_truncate(bs->file, size);
	if (ret < 0)
		log_error("%s: truncate to %llu bytes: %s", bs->filename,
			  (unsigned long long)size, strerror(-ret));
	return ret;
}

const struct bdrv_driver bdrv_raw = {
	.name = "raw",
	.process_crash_safe = true,   /* no metadata: writes go straight to the file */
	.probe = NULL,
	.open = raw_open,
	.close = raw_close,
	.co_preadv = raw_preadv,
	.co_pwritev = raw_pwritev,
	.co_pwrite_zeroes = raw_pwrite_zeroes,
	.co_discard = raw_discard,
	.co_flush = raw_flush,
	.co_block_status = raw_block_status,
	.co_truncate = raw_truncate,
};
