/* SPDX-License-Identifier: MIT */
/*
 * The io layer's default backend: a file descriptor driven through the
 * thread's io_uring when called from a coroutine, and through plain
 * syscalls otherwise.
 *
 * O_DIRECT: requests that are not aligned to the file's DIO alignment
 * (offset, length or buffer) go through an aligned bounce buffer; writes
 * are read-modify-write.  To keep a RMW from overwriting a neighbour's
 * concurrent change in the same block, every write and every fallocate
 * on a direct file registers its block-aligned range; a RMW waits for
 * every overlapping one, and a write or fallocate waits for overlapping
 * RMWs (with none in flight, which is the common case, nobody walks the
 * list).
 *
 * Thread model: one io_file may be used by the coroutines of several
 * threads at once (ublk queues share an image).  The range list is
 * guarded by a spinlock; a waiter sleeps on the range it waits for and is
 * woken on its own thread's loop (coro.h).
 */
#include "common/io.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <linux/stat.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "common/aio.h"
#include "common/coro.h"
#include "common/io_map.h"
#include "common/kbuf.h"
#include "common/util.h"

#define IO_IOV_MAX 64

struct io_range {
	uint64_t start, end;      /* block-aligned */
	bool rmw;
	struct co_queue waiters;
	struct io_range *prev, *next;
};

struct fd_file {
	struct io_file f;
	struct io_range *ranges;  /* in-flight direct writes, under spin */
	unsigned nrmw;            /* how many of them are RMWs */
	int spin;
	struct io_map *map;       /* an inline_io file's mapping, or NULL */
	uint64_t bounced;         /* kernel buffer ranges bounced (rw_kbuf_bounced), atomic */
};

void *io_alloc(size_t len)
{
	void *p;
	if (posix_memalign(&p, 4096, len ? ALIGN_UP(len, (size_t)4096) : 4096))
		return NULL;
	return p;
}

void *io_zalloc(size_t len)
{
	void *p = io_alloc(len);
	if (p)
		memset(p, 0, len);
	return p;
}

void io_free(void *buf) { free(buf); }

/*
 * Inline I/O.  io_uring issues a read or write at once, on the submitting
 * thread, only if the file can take it without blocking (RWF_NOWAIT);
 * tmpfs cannot, so every one goes to an io-wq worker thread: a wakeup and
 * two context switches around a copy of a few pages, and the result
 * comes back as task work.  A file in memory has nothing to wait for but
 * the copy, so its small reads and writes go as plain system calls on
 * the calling thread instead, even from a coroutine (the thread does
 * nothing else meanwhile: as long as the copy).  Large ones stay on the
 * ring, where the worker's copy overlaps the thread's other work
 * (measured in the VM, README: 4 KiB 1.3-1.6x, 64 KiB 0.83-0.95x).
 * $QUBLK_IO_INLINE=0 turns it off (the tests that want io_uring's
 * interleavings of concurrent requests), =1 on for any file.
 */
static bool io_inline_file(int fd, unsigned align)
{
	const char *env = getenv("QUBLK_IO_INLINE");
	struct statfs sf;
	struct iovec v;
	bool ret;

	if (env && *env)
		return strcmp(env, "0") != 0;
	if (fstatfs(fd, &sf) ||
	    (sf.f_type != (typeof(sf.f_type))TMPFS_MAGIC &&
	     sf.f_type != (typeof(sf.f_type))RAMFS_MAGIC))
		return false;
	/* Only where io_uring would punt: a tmpfs that learns RWF_NOWAIT
	 * gets io_uring's own inline issue, with its fallback. */
	v.iov_len = MAX(align, 4096u);
	v.iov_base = io_alloc(v.iov_len);
	if (!v.iov_base)
		return false;
	ret = preadv2(fd, &v, 1, 0, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP;
	io_free(v.iov_base);
	return ret;
}

static ssize_t do_rw(struct io_file *f, bool write, const struct iovec *iov, int cnt,
		     uint64_t off);

/* Name @f in @sqe (prepared with f->fd) by its index in the ring's file
 * table where the ring has one (aio_ctx_register_files). */
static void sqe_file(struct aio_ctx *ctx, struct io_uring_sqe *sqe, const struct io_file *f)
{
	int i = aio_file_index(ctx, f->id, f->fd);

	if (i >= 0) {
		sqe->fd = i;
		sqe->flags |= IOSQE_FIXED_FILE;
	}
}

/* A kernel buffer range (kbuf.h) through a bounce buffer and user copy:
 * where a fixed-buffer op cannot serve it (another thread's ring, no
 * ring, or an O_DIRECT file that refuses the request pages' layout).
 * The bounce buffer is the same range of the slot's own (the window's,
 * idle while its request uses the slot; pieces of one request are
 * disjoint ranges), unless the window has none or the range's offset
 * lacks the file's alignment (O_DIRECT's; 1 for other files). */
static ssize_t rw_kbuf_bounced(struct io_file *f, bool write, const struct kbuf_ref *kr,
			       size_t len, uint64_t off)
{
	const struct kbuf_window *w = kr->w;
	bool own = w->bounce && IS_ALIGNED(kr->off, (size_t)f->align);
	struct iovec v = { own ? w->bounce + (size_t)kr->index * w->stride + kr->off : io_alloc(len),
			   len };
	ssize_t ret;

	if (!v.iov_base)
		return -ENOMEM;
	__atomic_fetch_add(&((struct fd_file *)f)->bounced, 1, __ATOMIC_RELAXED);
	/* The copies fail the request, not the daemon: with user copy
	 * alone (6.12) this is a common path, and the request's pages can
	 * go away under us (an aborted queue). */
	ret = write ? kbuf_user_copy(kr, true, v.iov_base, len) : 0;
	if (ret == 0)
		ret = do_rw(f, write, &v, 1, off);
	if (!write && ret > 0) {
		int err = kbuf_user_copy(kr, false, v.iov_base, (size_t)ret);
		if (err < 0)
			ret = err;
	}
	if (!own)
		io_free(v.iov_base);
	return ret;
}

/* One read or write of a range in one kernel buffer: a fixed-buffer op on
 * the ring that holds the buffer, the address being the offset in it. */
static ssize_t rw_kbuf(struct io_file *f, bool write, const struct kbuf_ref *kr, size_t len,
		       uint64_t off)
{
	struct aio_ctx *ctx = aio_ctx_current();
	struct io_uring_sqe *sqe;
	ssize_t ret;

	if (!coro_self() || !ctx || kr->w->ctx != ctx)
		return rw_kbuf_bounced(f, write, kr, len, off);
	sqe = aio_get_sqe(ctx, NULL);
	if (write)
		io_uring_prep_write_fixed(sqe, f->fd, (void *)(uintptr_t)kr->off, len, off, kr->index);
	else
		io_uring_prep_read_fixed(sqe, f->fd, (void *)(uintptr_t)kr->off, len, off, kr->index);
	sqe_file(ctx, sqe, f);
	ret = aio_co_wait_sqe(ctx, sqe);
	/* O_DIRECT wants every page segment block-aligned; the request's
	 * pages need not be (a client's own direct I/O buffer). */
	if (ret == -EINVAL && f->direct)
		ret = rw_kbuf_bounced(f, write, kr, len, off);
	return ret;
}

/* One read or write of our own memory through io_uring (coroutine) or a
 * system call.  Returns bytes transferred or -errno. */
static ssize_t rw_mem(struct io_file *f, bool write, const struct iovec *iov, int cnt, uint64_t off)
{
	struct aio_ctx *ctx = aio_ctx_current();
	ssize_t ret;

	if (coro_self() && ctx && iov_size(iov, cnt) > io_inline_max(f)) {
		struct io_uring_sqe *sqe = aio_get_sqe(ctx, NULL);
		if (cnt == 1) {
			if (write)
				io_uring_prep_write(sqe, f->fd, iov[0].iov_base, iov[0].iov_len, off);
			else
				io_uring_prep_read(sqe, f->fd, iov[0].iov_base, iov[0].iov_len, off);
		} else {
			if (write)
				io_uring_prep_writev(sqe, f->fd, iov, cnt, off);
			else
				io_uring_prep_readv(sqe, f->fd, iov, cnt, off);
		}
		sqe_file(ctx, sqe, f);
		return aio_co_wait_sqe(ctx, sqe);
	}
	do {
		ret = write ? pwritev(f->fd, iov, cnt, off) : preadv(f->fd, iov, cnt, off);
	} while (ret < 0 && errno == EINTR);
	return ret < 0 ? -errno : ret;
}

/* One read or write: of a file in memory through its mapping where it can
 * (io_map.h), else by rw_mem or, for a kernel buffer (one range only:
 * rw_full splits), rw_kbuf.  Only a request too large to go inline counts
 * toward mapping a chunk: for a small one the system call is cheaper than
 * the chunk's asks and page faults, and in the VM counting 4 KiB requests
 * cost 20-25% at depth 128 (README, "Mapped I/O").  Returns bytes
 * transferred or -errno. */
static ssize_t do_rw(struct io_file *f, bool write, const struct iovec *iov, int cnt, uint64_t off)
{
	struct io_map *map = ((struct fd_file *)f)->map;
	struct kbuf_ref kr;
	ssize_t ret;

	if (cnt == 1 && kbuf_find(iov[0].iov_base, iov[0].iov_len, &kr)) {
		/* A kernel buffer with no ring (user copy alone): the one
		 * copy between the request's pages and the file's. */
		void *p = map && !kr.w->ctx ? io_map_range(map, write, off, iov[0].iov_len,
							    iov[0].iov_len > io_inline_max(f))
					    : NULL;
		if (p && kbuf_user_copy(&kr, write, p, iov[0].iov_len) == 0) {
			io_map_served_by_kernel(map);
			return (ssize_t)iov[0].iov_len;
		}
		ret = rw_kbuf(f, write, &kr, iov[0].iov_len, off);
	} else if (map && (ret = (ssize_t)io_map_rw(map, write, iov, cnt, off,
						  iov_size(iov, cnt) > io_inline_max(f))) > 0)
		return ret;
	else
		ret = rw_mem(f, write, iov, cnt, off);
	if (map && write && ret > 0)
		io_map_grown(map, off + (uint64_t)ret);
	return ret;
}

/* Full transfer: retry short transfers; reads past EOF give zeros. */
static int rw_full(struct io_file *f, bool write, const struct iovec *iov, int cnt, uint64_t off)
{
	struct iovec local[IO_IOV_MAX];
	size_t total = iov_size(iov, cnt);
	size_t done = 0;

	if (cnt > IO_IOV_MAX)
		return -EINVAL;
	if (cnt > 1 && kbuf_iov_any(iov, cnt)) {
		/* A kernel buffer mixed with memory of ours (copy-on-write
		 * head and tail around guest data): one op per entry. */
		for (int i = 0; i < cnt; i++) {
			int ret = rw_full(f, write, &iov[i], 1, off + done);
			if (ret < 0)
				return ret;
			done += iov[i].iov_len;
		}
		return 0;
	}
	while (done < total) {
		int n = iov_slice(iov, cnt, done, total - done, local, IO_IOV_MAX);
		if (n < 0)
			return n;
		ssize_t ret = do_rw(f, write, local, n, off + done);
		if (ret == -EINTR || ret == -EAGAIN)
			continue;
		if (ret < 0)
			return (int)ret;
		if (ret == 0) {
			if (write)
				return -EIO;
			return iov_memset(iov, cnt, done, 0, total - done);
		}
		done += ret;
	}
	return 0;
}

static bool iov_aligned(const struct iovec *iov, int cnt, unsigned align)
{
	for (int i = 0; i < cnt; i++)
		if (!IS_ALIGNED((uintptr_t)iov[i].iov_base, align) ||
		    !IS_ALIGNED(iov[i].iov_len, (size_t)align))
			return false;
	return true;
}

static bool req_aligned(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	return !f->direct ||
	       (IS_ALIGNED(off, (uint64_t)f->align) && iov_aligned(iov, cnt, f->align));
}

static int fd_preadv(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	if (req_aligned(f, iov, cnt, off))
		return rw_full(f, false, iov, cnt, off);

	size_t len = iov_size(iov, cnt);
	uint64_t start = ALIGN_DOWN(off, (uint64_t)f->align);
	uint64_t end = ALIGN_UP(off + len, (uint64_t)f->align);
	void *bounce = io_alloc(end - start);
	if (!bounce)
		return -ENOMEM;
	struct iovec v = { bounce, end - start };
	int ret = rw_full(f, false, &v, 1, start);
	if (!ret)
		ret = iov_from_buf(iov, cnt, 0, (char *)bounce + (off - start), len);
	io_free(bounce);
	return ret;
}

static bool ranges_conflict(const struct io_range *a, uint64_t start, uint64_t end, bool rmw)
{
	return a->start < end && start < a->end && (rmw || a->rmw);
}

static void range_lock(struct fd_file *ff, struct io_range *r)
{
	r->waiters = (struct co_queue)CO_QUEUE_INIT;
again:
	spin_lock(&ff->spin);
	/* Only RMWs conflict with anything: without one in flight (and
	 * unless we are one), there is nothing to wait for. */
	if (coro_self() && (r->rmw || ff->nrmw)) {
		for (struct io_range *o = ff->ranges; o; o = o->next) {
			if (ranges_conflict(o, r->start, r->end, r->rmw)) {
				co_queue_wait_spin(&o->waiters, &ff->spin);
				goto again;
			}
		}
	}
	r->prev = NULL;
	r->next = ff->ranges;
	if (ff->ranges)
		ff->ranges->prev = r;
	ff->ranges = r;
	ff->nrmw += r->rmw;
	spin_unlock(&ff->spin);
}

static void range_unlock(struct fd_file *ff, struct io_range *r)
{
	spin_lock(&ff->spin);
	if (r->prev)
		r->prev->next = r->next;
	else
		ff->ranges = r->next;
	if (r->next)
		r->next->prev = r->prev;
	ff->nrmw -= r->rmw;
	spin_unlock(&ff->spin);
	/* Nobody can queue on r any more: it is off the list. */
	co_queue_wake_all(&r->waiters);
}

static int fd_pwritev(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct fd_file *ff = (struct fd_file *)f;
	size_t len = iov_size(iov, cnt);
	int ret;

	if (f->read_only)
		return -EROFS;
	if (!f->direct)
		return rw_full(f, true, iov, cnt, off);

	struct io_range r = {
		.start = ALIGN_DOWN(off, (uint64_t)f->align),
		.end = ALIGN_UP(off + len, (uint64_t)f->align),
		.rmw = !req_aligned(f, iov, cnt, off),
	};
	range_lock(ff, &r);
	if (!r.rmw) {
		ret = rw_full(f, true, iov, cnt, off);
	} else {
		size_t blen = r.end - r.start;
		void *bounce = io_alloc(blen);
		struct iovec v = { bounce, f->align };
		ret = bounce ? 0 : -ENOMEM;
		/* Head and tail blocks keep their old bytes. */
		if (!ret && off != r.start)
			ret = rw_full(f, false, &v, 1, r.start);
		if (!ret && off + len != r.end &&
		    (r.end - f->align != r.start || off == r.start)) {
			v.iov_base = (char *)bounce + blen - f->align;
			ret = rw_full(f, false, &v, 1, r.end - f->align);
		}
		if (!ret)
			ret = iov_to_buf(iov, cnt, 0, (char *)bounce + (off - r.start), len);
		if (!ret) {
			v.iov_base = bounce;
			v.iov_len = blen;
			ret = rw_full(f, true, &v, 1, r.start);
		}
		io_free(bounce);
	}
	range_unlock(ff, &r);
	return ret;
}

static int fd_flush(struct io_file *f)
{
	struct aio_ctx *ctx = aio_ctx_current();

	if (f->read_only)
		return 0;
	if (coro_self() && ctx) {
		struct io_uring_sqe *sqe = aio_get_sqe(ctx, NULL);
		io_uring_prep_fsync(sqe, f->fd, IORING_FSYNC_DATASYNC);
		sqe_file(ctx, sqe, f);
		return aio_co_wait_sqe(ctx, sqe);
	}
	return fdatasync(f->fd) ? -errno : 0;
}

static int fd_fallocate(struct io_file *f, int mode, uint64_t off, uint64_t len)
{
	struct fd_file *ff = (struct fd_file *)f;
	struct aio_ctx *ctx = aio_ctx_current();
	struct io_range r;
	int ret;

	if (f->read_only)
		return -EROFS;
	/* Zeroing or punching part of a block changes it like a write: a
	 * neighbour's RMW of that block must not write stale bytes back. */
	if (f->direct) {
		r = (struct io_range){
			.start = ALIGN_DOWN(off, (uint64_t)f->align),
			.end = ALIGN_UP(off + len, (uint64_t)f->align),
		};
		range_lock(ff, &r);
	}
	if (ff->map && (mode & FALLOC_FL_PUNCH_HOLE))
		io_map_punch(ff->map, off, len);
	if (coro_self() && ctx) {
		struct io_uring_sqe *sqe = aio_get_sqe(ctx, NULL);
		io_uring_prep_fallocate(sqe, f->fd, mode, off, len);
		sqe_file(ctx, sqe, f);
		ret = aio_co_wait_sqe(ctx, sqe);
	} else {
		ret = fallocate(f->fd, mode, off, len) ? -errno : 0;
	}
	if (f->direct)
		range_unlock(ff, &r);
	/* Again once the holes are there: an ask made while the punch was
	 * in flight may have found the pages still resident, and a chunk it
	 * marked whole would map them back in, filling the holes. */
	if (ff->map && (mode & FALLOC_FL_PUNCH_HOLE))
		io_map_punch(ff->map, off, len);
	if (ff->map && ret == 0 && !(mode & FALLOC_FL_KEEP_SIZE))
		io_map_grown(ff->map, off + len);
	return ret;
}

static int fd_truncate(struct io_file *f, uint64_t size)
{
	struct fd_file *ff = (struct fd_file *)f;

	if (f->read_only)
		return -EROFS;
	if (ff->map)
		io_map_truncate(ff->map, size);
	return ftruncate(f->fd, size) ? -errno : 0;
}

static int fd_get_size(struct io_file *f, uint64_t *size)
{
	struct stat st;

	if (fstat(f->fd, &st))
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(f->fd, BLKGETSIZE64, size))
			return -errno;
		return 0;
	}
	*size = st.st_size;
	return 0;
}

static void fd_close(struct io_file *f)
{
	struct fd_file *ff = (struct fd_file *)f;
	struct io_map *map = ff->map;

	assert(!ff->ranges);
	if (ff->bounced)
		log_debug("%s: %llu reads and writes of kernel buffers through a bounce buffer",
			  f->path, (unsigned long long)ff->bounced);
	if (map)
		log_debug("%s: %llu reads and writes through its mapping (%llu copied by the kernel)",
			  f->path, (unsigned long long)io_map_copies(map),
			  (unsigned long long)io_map_kernel_copies(map));
	io_map_close(map);
	close(f->fd);
	free(f->path);
	free(f);
}

static const struct io_file_ops fd_ops = {
	.preadv = fd_preadv,
	.pwritev = fd_pwritev,
	.flush = fd_flush,
	.fallocate = fd_fallocate,
	.truncate = fd_truncate,
	.get_size = fd_get_size,
	.close = fd_close,
};

static unsigned dio_alignment(int fd)
{
	struct statx stx;
	unsigned align = 0;

#ifdef STATX_DIOALIGN
	if (!statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) &&
	    (stx.stx_mask & STATX_DIOALIGN))
		align = MAX(stx.stx_dio_mem_align, stx.stx_dio_offset_align);
#else
	(void)stx;
	(void)fd;
#endif
	if (!align || (align & (align - 1)))
		align = 4096;
	return MAX(align, 512u);
}

/* io_file.id: 1, 2, ... in the order files are opened. */
static uint64_t next_file_id;

static int fd_file_new(int fd, const char *path, bool read_only, bool direct,
		       struct io_file **out)
{
	struct fd_file *ff = calloc(1, sizeof(*ff));

	if (!ff || !(ff->f.path = strdup(path))) {
		free(ff);
		close(fd);
		return -ENOMEM;
	}
	ff->f.ops = &fd_ops;
	ff->f.fd = fd;
	ff->f.id = __atomic_add_fetch(&next_file_id, 1, __ATOMIC_RELAXED);
	ff->f.read_only = read_only;
	ff->f.direct = direct;
	ff->f.align = direct ? dio_alignment(fd) : 1;
	ff->f.inline_io = io_inline_file(fd, ff->f.align);
	if (ff->f.inline_io)
		ff->map = io_map_open(fd, read_only);
	*out = &ff->f;
	return 0;
}

int io_file_adopt(int fd, const char *path, struct io_file **out)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0) {
		int ret = -errno;
		close(fd);
		return ret;
	}
	return fd_file_new(fd, path, (fl & O_ACCMODE) == O_RDONLY, fl & O_DIRECT, out);
}

int io_file_open(const char *path, unsigned flags, struct io_file **out)
{
	int oflags = O_CLOEXEC | ((flags & IO_OPEN_RDONLY) ? O_RDONLY : O_RDWR);
	int fd = -1;
	bool direct = false;

	if (flags & IO_OPEN_CREATE)
		oflags |= O_CREAT | O_TRUNC;
	if (flags & IO_OPEN_DIRECT) {
		fd = open(path, oflags | O_DIRECT, 0644);
		if (fd >= 0)
			direct = true;
		else if (errno != EINVAL)
			return -errno;
	}
	if (fd < 0)
		fd = open(path, oflags, 0644);
	if (fd < 0)
		return -errno;
	return fd_file_new(fd, path, flags & IO_OPEN_RDONLY, direct, out);
}

uint64_t io_file_map_copies(const struct io_file *f)
{
	return f && f->ops == &fd_ops ? io_map_copies(((const struct fd_file *)f)->map) : 0;
}

void io_file_close(struct io_file *f)
{
	if (f)
		f->ops->close(f);
}
