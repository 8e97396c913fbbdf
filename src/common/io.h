/* SPDX-License-Identifier: MIT */
/*
 * The io layer: files the drivers read and write.
 *
 * All calls work both inside a coroutine (async on the thread's io_uring,
 * the coroutine yields) and outside (plain blocking syscalls, for tools).
 * Small reads and writes of a file in memory are syscalls in a coroutine
 * too, which then does not yield (inline I/O, io.c); where the file's
 * pages are all written, reads and writes of any size are copies through
 * a mapping of it (io_map.h).
 * Reads are complete or fail: bytes past end of file read as zeros.
 * Writes are complete or fail.  With O_DIRECT, unaligned requests are
 * bounced and read-modify-written under a range lock, so callers may use
 * any offset, length and buffer.
 *
 * struct io_file carries an ops table so a test backend can sit between
 * a driver and the real file (record, fail or drop writes).
 *
 * All functions return 0 or -errno.
 */
#ifndef QUBLK_IO_H
#define QUBLK_IO_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

struct io_file;

struct io_file_ops {
	int (*preadv)(struct io_file *f, const struct iovec *iov, int iovcnt, uint64_t off);
	int (*pwritev)(struct io_file *f, const struct iovec *iov, int iovcnt, uint64_t off);
	int (*flush)(struct io_file *f);                       /* fdatasync */
	/* mode: FALLOC_FL_* (0, ZERO_RANGE, PUNCH_HOLE|KEEP_SIZE) */
	int (*fallocate)(struct io_file *f, int mode, uint64_t off, uint64_t len);
	int (*truncate)(struct io_file *f, uint64_t size);
	int (*get_size)(struct io_file *f, uint64_t *size);
	void (*close)(struct io_file *f);                      /* frees f */
};

struct io_file {
	const struct io_file_ops *ops;
	void *priv;
	int fd;                 /* -1 for files with no descriptor */
	uint64_t id;            /* unique per open (> 0; 0 with no descriptor):
	                         * names it in rings' file tables (aio.h) */
	bool read_only;
	bool direct;            /* opened with O_DIRECT */
	bool inline_io;         /* small reads and writes as system calls on
	                         * the calling thread, even in a coroutine
	                         * (a file in memory: io.c, io_inline_file) */
	unsigned align;         /* offset/length/buffer alignment of the fd */
	char *path;
	int sticky_err;         /* -errno once a flush failed (io_flush), else 0 */
};

/* The largest read or write of an inline_io file made inline (io.c). */
#define IO_INLINE_MAX (16 * 1024)
static inline size_t io_inline_max(const struct io_file *f)
{
	return f && f->inline_io ? IO_INLINE_MAX : 0;
}

enum {
	IO_OPEN_RDONLY = 1 << 0,
	IO_OPEN_DIRECT = 1 << 1,   /* try O_DIRECT, fall back to buffered */
	IO_OPEN_CREATE = 1 << 2,   /* O_CREAT | O_TRUNC */
};

int io_file_open(const char *path, unsigned flags, struct io_file **out);
/* Wrap @fd, an open descriptor of @path (opened by someone else, e.g.
 * received from another process), as io_file_open would have opened it:
 * O_DIRECT and read-only-ness are taken from the descriptor's flags.  The
 * io_file owns @fd from then on, even on failure.  Returns -errno. */
int io_file_adopt(int fd, const char *path, struct io_file **out);
void io_file_close(struct io_file *f);
/* Reads and writes of @f made through its mapping so far (io_map.h; 0
 * for a file that has none). */
uint64_t io_file_map_copies(const struct io_file *f);

static inline int io_preadv(struct io_file *f, const struct iovec *iov, int n, uint64_t off)
{ return f->ops->preadv(f, iov, n, off); }
static inline int io_pwritev(struct io_file *f, const struct iovec *iov, int n, uint64_t off)
{ return f->ops->pwritev(f, iov, n, off); }
static inline int io_pread(struct io_file *f, void *buf, size_t len, uint64_t off)
{ struct iovec v = { buf, len }; return f->ops->preadv(f, &v, 1, off); }
static inline int io_pwrite(struct io_file *f, const void *buf, size_t len, uint64_t off)
{ struct iovec v = { (void *)buf, len }; return f->ops->pwritev(f, &v, 1, off); }
/* fdatasync.  A failure is sticky: every later io_flush() of this file
 * fails with the same error until it is closed and reopened.  The kernel
 * reports a writeback error once and may already have dropped the dirty
 * pages, so a later fdatasync that succeeds proves nothing (PostgreSQL's
 * "fsyncgate"; QEMU's file-posix does the same).  Callers that lose
 * track of what is on disk in other ways poison the file themselves with
 * io_poison().  Safe from any thread. */
static inline int io_flush(struct io_file *f)
{
	int ret = __atomic_load_n(&f->sticky_err, __ATOMIC_ACQUIRE);

	if (ret)
		return ret;
	ret = f->ops->flush(f);
	if (ret < 0)
		__atomic_store_n(&f->sticky_err, ret, __ATOMIC_RELEASE);
	return ret;
}
/* Make every later io_flush() of @f fail with @err (< 0); the first error
 * wins. */
static inline void io_poison(struct io_file *f, int err)
{
	int zero = 0;

	__atomic_compare_exchange_n(&f->sticky_err, &zero, err, false, __ATOMIC_ACQ_REL,
				    __ATOMIC_ACQUIRE);
}
static inline int io_fallocate(struct io_file *f, int mode, uint64_t off, uint64_t len)
{ return f->ops->fallocate(f, mode, off, len); }
static inline int io_truncate(struct io_file *f, uint64_t size) { return f->ops->truncate(f, size); }
static inline int io_get_size(struct io_file *f, uint64_t *size) { return f->ops->get_size(f, size); }

/* Aligned buffer for the io layer (posix_memalign to 4096). NULL on ENOMEM. */
void *io_alloc(size_t len);
void *io_zalloc(size_t len);
void io_free(void *buf);

#endif
