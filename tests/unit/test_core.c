/* SPDX-License-Identifier: MIT */
/* Unit tests for the core: coroutines, wait queues, the event loop, the
 * io layer (buffered and O_DIRECT with unaligned read-modify-write),
 * the raw driver, kernel buffer windows, a file in memory through its
 * mapping and the small helpers. */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/coro.h"
#include "common/io.h"
#include "common/io_fault.h"
#include "common/io_map.h"
#include "common/kbuf.h"
#include "common/util.h"

#include "check.h"


static char tmpdir[] = "/dev/shm/qublk-test-core-XXXXXX";

/* --- coroutines --- */
static int trace[16], ntrace;
static void co_counter(void *opaque)
{
	int id = *(int *)opaque;
	trace[ntrace++] = id;
	coro_yield();
	trace[ntrace++] = id + 10;
}

static void test_coro_basic(void)
{
	int a = 1, b = 2;
	struct coro *ca = coro_new(co_counter, &a, 0), *cb = coro_new(co_counter, &b, 0);
	CHECK(ca && cb);
	ntrace = 0;
	coro_enter(ca);
	coro_enter(cb);
	CHECK(!coro_finished(ca));
	coro_enter(ca);
	coro_enter(cb);
	CHECK(coro_finished(ca) && coro_finished(cb));
	CHECK(ntrace == 4 && trace[0] == 1 && trace[1] == 2 && trace[2] == 11 && trace[3] == 12);
	/* Reuse a finished coroutine. */
	coro_reset(ca, co_counter, &b);
	ntrace = 0;
	coro_enter(ca);
	coro_enter(ca);
	CHECK(coro_finished(ca) && ntrace == 2 && trace[0] == 2 && trace[1] == 12);
	coro_free(ca);
	coro_free(cb);
}

/* --- mutex under the event loop --- */
static struct co_mutex mtx = CO_MUTEX_INIT;
static int in_section, max_in_section, done_workers;
static struct io_file *tf;

static void mutex_worker(void *opaque)
{
	for (int i = 0; i < 20; i++) {
		co_mutex_lock(&mtx);
		in_section++;
		if (in_section > max_in_section)
			max_in_section = in_section;
		char c;
		/* Yield inside the section through real I/O. */
		io_pread(tf, &c, 1, 0);
		in_section--;
		co_mutex_unlock(&mtx);
	}
	done_workers++;
}

static void test_mutex(void)
{
	struct aio_ctx ctx;
	char path[256];
	struct coro *co[8];

	snprintf(path, sizeof(path), "%s/m", tmpdir);
	CHECK(io_file_open(path, IO_OPEN_CREATE, &tf) == 0);
	CHECK(aio_ctx_init(&ctx, 64) == 0);
	aio_ctx_set_current(&ctx);
	for (int i = 0; i < 8; i++) {
		co[i] = coro_new(mutex_worker, NULL, 0);
		aio_schedule(co[i]);
	}
	while (done_workers < 8)
		CHECK(aio_run_once(&ctx, true) == 0);
	CHECK(max_in_section == 1);
	for (int i = 0; i < 8; i++)
		coro_free(co[i]);
	aio_ctx_deinit(&ctx);
	io_file_close(tf);
}

/* --- the mutex shared by two threads, each with its own loop --- */
static struct co_mutex xmtx = CO_MUTEX_INIT;
static long xcounter;
static int xin, xmax;
static struct io_file *xf;

static void xworker(void *opaque)
{
	int *done = opaque;
	for (int i = 0; i < 200; i++) {
		co_mutex_lock(&xmtx);
		if (++xin > xmax)
			xmax = xin;
		long v = xcounter;
		char c;
		if (i % 8 == 0)
			io_pread(xf, &c, 1, 0);   /* yield while holding it */
		xcounter = v + 1;
		xin--;
		co_mutex_unlock(&xmtx);
	}
	(*done)++;
}

static void *xthread(void *arg)
{
	struct aio_ctx ctx;
	struct coro *co[4];
	int done = 0;
	(void)arg;
	if (aio_ctx_init(&ctx, 32))
		return (void *)1;
	aio_ctx_set_current(&ctx);
	for (int i = 0; i < 4; i++) {
		co[i] = coro_new(xworker, &done, 0);
		aio_schedule(co[i]);
	}
	while (done < 4)
		if (aio_run_once(&ctx, true))
			return (void *)1;
	for (int i = 0; i < 4; i++)
		coro_free(co[i]);
	aio_ctx_deinit(&ctx);
	return NULL;
}

static void test_mutex_threads(void)
{
	char path[256];
	pthread_t t[2];
	void *r0 = (void *)1, *r1 = (void *)1;
	snprintf(path, sizeof(path), "%s/x", tmpdir);
	CHECK(io_file_open(path, IO_OPEN_CREATE, &xf) == 0);
	CHECK(pthread_create(&t[0], NULL, xthread, NULL) == 0);
	CHECK(pthread_create(&t[1], NULL, xthread, NULL) == 0);
	pthread_join(t[0], &r0);
	pthread_join(t[1], &r1);
	CHECK(r0 == NULL && r1 == NULL);
	CHECK(xcounter == 2 * 4 * 200);
	CHECK(xmax == 1);
	io_file_close(xf);
}

/* --- io layer: random unaligned concurrent writes vs a memory model --- */
#define FSZ (256 * 1024)
static unsigned char model[FSZ];
static struct io_file *iof;
static uint64_t rng = 88172645463325252ull;
static uint64_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static int io_errors;
static int io_done;

struct io_job { unsigned off, len; unsigned char pat; };

static void io_worker(void *opaque)
{
	struct io_job *j = opaque;
	unsigned char *buf = malloc(j->len + 1);
	memset(buf + 1, j->pat, j->len);
	if (!j->pat) {
		/* Zeroing part of a block races a neighbour's RMW of it. */
		if (io_fallocate(iof, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, j->off, j->len))
			io_errors++;
	} else if (io_pwrite(iof, buf + 1, j->len, j->off)) {
		/* Deliberately misaligned buffer. */
		io_errors++;
	}
	free(buf);
	io_done++;
}

/* @written: the file written (zeros) instead of sparse, so that an
 * inline file in memory goes through its mapping (io_map.h) until holes
 * are punched in it. */
static void run_io_model(unsigned flags, const char *name, bool written)
{
	static const unsigned char zeros[FSZ];
	struct aio_ctx ctx;
	char path[256];
	enum { NJOBS = 64 };
	struct io_job jobs[NJOBS];
	struct coro *co[NJOBS];

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0);
	CHECK(written ? pwrite(fd, zeros, FSZ, 0) == FSZ : ftruncate(fd, FSZ) == 0);
	close(fd);
	memset(model, 0, sizeof(model));
	CHECK(io_file_open(path, flags, &iof) == 0);
	CHECK(iof->inline_io == !strcmp(getenv("QUBLK_IO_INLINE"), "1"));
	CHECK(aio_ctx_init(&ctx, 32) == 0);
	aio_ctx_set_current(&ctx);
	/* A written file's chunk is mapped once it has been used a while by
	 * requests too large to go inline (those that count, io.c). */
	for (int i = 0; written && i < 8; i++)
		CHECK(io_pread(iof, model, 64 << 10, 0) == 0);
	for (int round = 0; round < 20; round++) {
		/* Non-overlapping jobs that may share DIO blocks. */
		unsigned pos = rnd() % 4096;
		int n = 0;
		io_done = 0;
		while (n < NJOBS) {
			unsigned len = 1 + rnd() % 3000;
			if (pos + len > FSZ)
				break;
			/* One job in four punches a hole instead of writing. */
			unsigned char pat = rnd() % 4 ? (unsigned char)(rnd() | 1) : 0;
			jobs[n] = (struct io_job){ pos, len, pat };
			memset(model + pos, jobs[n].pat, len);
			co[n] = coro_new(io_worker, &jobs[n], 0);
			aio_schedule(co[n]);
			n++;
			pos += len + rnd() % 700;
		}
		while (io_done < n)
			CHECK(aio_run_once(&ctx, true) == 0);
		for (int i = 0; i < n; i++)
			coro_free(co[i]);
	}
	CHECK(io_errors == 0);
	unsigned char *back = malloc(FSZ + 100);
	CHECK(io_pread(iof, back + 3, FSZ + 50, 0) == 0);   /* past EOF reads zeros */
	CHECK(memcmp(back + 3, model, FSZ) == 0);
	CHECK(buf_is_zero(back + 3 + FSZ, 50));
	/* A written file in memory went through its mapping, at least until
	 * the first hole was punched. */
	CHECK(written == (io_file_map_copies(iof) > 0));
	free(back);
	aio_ctx_deinit(&ctx);
	io_file_close(iof);
}

/* --- raw driver through bdrv --- */
static struct bdrv *rbs;
static int raw_result;
static void raw_fn(void *opaque)
{
	char buf[8192], back[8192];
	memset(buf, 0x5a, sizeof(buf));
	raw_result = bdrv_co_pwrite(rbs, 100, sizeof(buf), buf, BDRV_REQ_FUA);
	if (!raw_result)
		raw_result = bdrv_co_pread(rbs, 100, sizeof(back), back);
	if (!raw_result && memcmp(buf, back, sizeof(buf)))
		raw_result = -EIO;
	if (!raw_result)
		raw_result = bdrv_co_pwrite_zeroes(rbs, 4096, 4096, BDRV_REQ_MAY_UNMAP);
	if (!raw_result)
		raw_result = bdrv_co_pread(rbs, 4096, 4096, back);
	if (!raw_result && !buf_is_zero(back, 4096))
		raw_result = -EIO;
	/* Out of range is refused at the boundary. */
	if (!raw_result && bdrv_co_pread(rbs, rbs->size - 1, 2, back) != -EINVAL)
		raw_result = -EPROTO;
}

static void test_raw(void)
{
	char path[256];
	struct bdrv_opts o = { .format = "raw" };
	snprintf(path, sizeof(path), "%s/raw", tmpdir);
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0 && ftruncate(fd, 1 << 20) == 0);
	close(fd);
	CHECK(bdrv_open(path, &o, &rbs) == 0);
	CHECK(rbs->size == 1 << 20);
	CHECK(aio_run_coroutine(raw_fn, NULL) == 0);
	CHECK(raw_result == 0);
	bdrv_close(rbs);
}

static int wrap_failing(struct io_file *f, struct io_file **out, void *opaque)
{
	struct io_fault_cfg c = { .fail_after = 1 };
	(void)opaque;
	return io_fault_wrap(f, &c, out);
}

/* A write-back failure at close reaches the caller. */
static void test_close_error(void)
{
	char path[256];
	struct bdrv_opts o = { .format = "raw", .wrap_file = wrap_failing };
	snprintf(path, sizeof(path), "%s/raw", tmpdir);
	CHECK(bdrv_open(path, &o, &rbs) == 0);
	CHECK(bdrv_close(rbs) == -EIO);
}

/* --- kernel buffer windows ---
 * A plain file stands in for /dev/ublkcN: user copies land in it at
 * copy_off + (slot << copy_shift) + offset, which the test reads back. */
static struct kbuf_window kw;
static struct io_file *kbuf_img;
static int kbuf_result;

static void kbuf_fn(void *opaque)
{
	uint8_t *slot1 = kw.base + kw.stride;
	uint8_t head[512], tail[512];
	struct iovec v[3] = { { head, sizeof(head) }, { slot1 + 4096, 8192 }, { tail, sizeof(tail) } };

	(void)opaque;
	memset(head, 'h', sizeof(head));
	memset(tail, 't', sizeof(tail));
	/* From a coroutine on a ring that is not the window's: bounced; a
	 * mixed iovec goes one entry at a time. */
	kbuf_result = io_pwritev(kbuf_img, v, 3, 65536);
	if (!kbuf_result)
		kbuf_result = io_pread(kbuf_img, slot1 + 4096 + 8192, 4096, 65536);
}

static void test_kbuf(void)
{
	char path[256];
	uint8_t buf[16384], back[16384], plain[100];
	struct iovec v[2];
	struct kbuf_ref r;
	int fd;

	snprintf(path, sizeof(path), "%s/ublkc", tmpdir);
	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0);
	kw = (struct kbuf_window){ .stride = 65536, .n = 4, .copy_fd = fd, .copy_off = 1 << 20,
				   .copy_shift = 17 };
	CHECK(kbuf_window_add(&kw) == 0);
	CHECK(kbuf_find(kw.base + 2 * 65536 + 100, 50, &r) && r.index == 2 && r.off == 100 &&
	      r.w == &kw);
	CHECK(!kbuf_find(plain, sizeof(plain), &r));
	CHECK(!kbuf_find(kw.base + 4 * 65536, 1, &r));
	v[0] = (struct iovec){ plain, sizeof(plain) };
	v[1] = (struct iovec){ kw.base + 3 * 65536, 512 };
	CHECK(!kbuf_iov_any(v, 1) && kbuf_iov_any(v, 2));

	/* The iovec helpers copy a window piece by user copy, the rest by
	 * memcpy: plain[] gets the first 100 bytes, slot 3 the next 900. */
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i * 7 + 1);
	v[1].iov_len = 900;
	CHECK(iov_from_buf(v, 2, 0, buf, 1000) == 0);
	CHECK(!memcmp(plain, buf, 100));
	CHECK(pread(fd, back, 900, (1 << 20) + (3 << 17)) == 900 && !memcmp(back, buf + 100, 900));
	memset(back, 0, sizeof(back));
	CHECK(iov_to_buf(v, 2, 50, back, 950) == 0);
	CHECK(!memcmp(back, buf + 50, 950));
	CHECK(iov_memset(v, 2, 90, 0, 910) == 0);
	CHECK(pread(fd, back, 900, (1 << 20) + (3 << 17)) == 900 && buf_is_zero(back, 900));
	CHECK(plain[89] == buf[89] && plain[90] == 0);

	/* The io layer outside a coroutine: through a bounce buffer. */
	snprintf(path, sizeof(path), "%s/kbuf-img", tmpdir);
	CHECK(io_file_open(path, IO_OPEN_CREATE, &kbuf_img) == 0);
	CHECK(pwrite(fd, buf, sizeof(buf), (1 << 20) + (1 << 17) + 100) == sizeof(buf));
	CHECK(io_pwrite(kbuf_img, kw.base + 65536 + 100, sizeof(buf), 8192) == 0);
	CHECK(pread(kbuf_img->fd, back, sizeof(back), 8192) == sizeof(back) &&
	      !memcmp(back, buf, sizeof(buf)));
	/* ... and reading past the end of the file zero-fills the slot. */
	CHECK(io_pread(kbuf_img, kw.base + 2 * 65536, 4096, 8192 + sizeof(buf) - 1024) == 0);
	CHECK(pread(fd, back, 4096, (1 << 20) + (2 << 17)) == 4096 &&
	      !memcmp(back, buf + sizeof(buf) - 1024, 1024) && buf_is_zero(back + 1024, 3072));

	/* In a coroutine: a mixed iovec written, a slot read. */
	CHECK(aio_run_coroutine(kbuf_fn, NULL) == 0);
	CHECK(kbuf_result == 0);
	CHECK(pread(kbuf_img->fd, back, 512 + 8192 + 512, 65536) == 512 + 8192 + 512);
	CHECK(back[0] == 'h' && back[511] == 'h' && back[512 + 8192] == 't' &&
	      !memcmp(back + 512, buf + 4096 - 100, 8192));
	CHECK(pread(fd, buf, 4096, (1 << 20) + (1 << 17) + 4096 + 8192) == 4096 &&
	      !memcmp(buf, back, 4096));

	/* A copy the kernel refuses (here: a descriptor open for reading
	 * only) fails the call with its error, for the helpers and for the
	 * io layer's bounced reads and writes, with the window's own bounce
	 * buffer as with one allocated. */
	uint8_t img[4096];
	int rfd, wfd;

	snprintf(path, sizeof(path), "%s/ublkc", tmpdir);
	rfd = open(path, O_RDONLY);
	wfd = open(path, O_WRONLY);
	CHECK(rfd >= 0 && wfd >= 0);
	CHECK(pread(kbuf_img->fd, img, sizeof(img), 8192) == sizeof(img));
	kw.copy_fd = rfd;
	CHECK(iov_from_buf(v, 2, 0, buf, 1000) == -EBADF);
	CHECK(iov_memset(v, 2, 90, 0, 910) == -EBADF);
	CHECK(io_pread(kbuf_img, kw.base + 2 * 65536, 4096, 8192) == -EBADF);
	for (int own = 0; own < 2; own++) {
		uint8_t *bounce = own ? io_alloc(4 * 65536) : NULL;

		kw.bounce = bounce;
		kw.copy_fd = rfd;
		CHECK(io_pread(kbuf_img, kw.base + 2 * 65536 + 512, 4096, 8192) == -EBADF);
		kw.copy_fd = wfd;
		CHECK(io_pwrite(kbuf_img, kw.base + 2 * 65536 + 512, 4096, 8192) == -EBADF);
		CHECK(io_pread(kbuf_img, kw.base + 2 * 65536 + 512, 4096, 8192) == 0);
		CHECK(pread(fd, back, 4096, (1 << 20) + (2 << 17) + 512) == 4096 &&
		      !memcmp(back, img, 4096));
		CHECK(pwrite(fd, "x", 1, (1 << 20) + (2 << 17) + 512) == 1);
		kw.bounce = NULL;
		io_free(bounce);
	}
	kw.copy_fd = fd;
	close(rfd);
	close(wfd);

	io_file_close(kbuf_img);
	kbuf_window_del(&kw);
	CHECK(kw.base == NULL && !kbuf_maybe(back));
	close(fd);
}

/* --- ring file tables ---
 * The io layer names files by their index in a ring's table.  A table
 * slot keeps its own reference to the file it was given, so it must be
 * keyed by the io_file's id, never by the descriptor number: a file
 * closed and another opened in its place get the same number. */
static struct aio_ctx ft_ctx;
static char ft_dir[300];
static int ft_result;

static int ft_open(int i, struct io_file **f)
{
	char path[400];

	snprintf(path, sizeof(path), "%s/f%d", ft_dir, i);
	return io_file_open(path, IO_OPEN_CREATE, f);
}

/* @f's bytes at 0, read by path. */
static int ft_first(int i, char *c)
{
	char path[400];
	int fd, n;

	snprintf(path, sizeof(path), "%s/f%d", ft_dir, i);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	n = (int)pread(fd, c, 1, 0);
	close(fd);
	return n == 1 ? 0 : -EIO;
}

static void ft_fn(void *opaque)
{
	struct io_file *f[AIO_FILES + 2] = { NULL };
	struct io_file *a;
	int fd_a, idx, ret = 0, i;
	char c;

	(void)opaque;
	/* Installed on first use, after the owner's file (index 0). */
	if (ft_open(100, &a) || io_pwrite(a, "a", 1, 0)) {
		ft_result = -1;
		return;
	}
	idx = aio_file_index(&ft_ctx, a->id, a->fd);
	if (idx != 1)
		ret = -2;
	fd_a = a->fd;
	io_file_close(a);
	/* The same descriptor number, another file: a slot of its own. */
	if (!ret && (ft_open(101, &f[0]) || f[0]->fd != fd_a))
		ret = -3;
	if (!ret && io_pwrite(f[0], "b", 1, 0))
		ret = -4;
	if (!ret && aio_file_index(&ft_ctx, f[0]->id, f[0]->fd) != 2)
		ret = -5;
	if (!ret && (ft_first(100, &c) || c != 'a' || ft_first(101, &c) || c != 'b'))
		ret = -6;
	/* Fill the table: the files past it go by descriptor, as right. */
	for (i = 1; !ret && i < AIO_FILES + 2; i++) {
		if (ft_open(101 + i, &f[i]) || io_pwrite(f[i], &"0123456789"[i], 1, 0))
			ret = -7;
		else if ((aio_file_index(&ft_ctx, f[i]->id, f[i]->fd) < 0) != (i >= AIO_FILES - 1))
			ret = -8;
	}
	for (i = 1; !ret && i < AIO_FILES + 2; i++)
		if (ft_first(101 + i, &c) || c != "0123456789"[i])
			ret = -9;
	/* fdatasync and fallocate by index too. */
	if (!ret && (io_flush(f[0]) || io_fallocate(f[0], 0, 0, 8192)))
		ret = -10;
	for (i = 0; i < AIO_FILES + 2; i++)
		if (f[i])
			io_file_close(f[i]);
	ft_result = ret;
}

/* --- a file in memory through its mapping (io_map.h) --- */
static uint64_t blocks_of(int fd)
{
	struct stat st;
	return fstat(fd, &st) ? 0 : (uint64_t)st.st_blocks;
}

static size_t map_rw_counts(struct io_map *m, bool write, void *buf, size_t len, uint64_t off,
			    bool counts)
{
	struct iovec v = { buf, len };
	return io_map_rw(m, write, &v, 1, off, counts);
}

static size_t map_rw(struct io_map *m, bool write, void *buf, size_t len, uint64_t off)
{
	return map_rw_counts(m, write, buf, len, off, true);
}

/* How many times the mapping refuses the same access before it takes it
 * (200: never). */
static int refusals_counts(struct io_map *m, bool write, void *buf, size_t len, uint64_t off,
			   bool counts)
{
	int n = 0;

	while (n < 200 && map_rw_counts(m, write, buf, len, off, counts) != len)
		n++;
	return n;
}

static int refusals(struct io_map *m, bool write, void *buf, size_t len, uint64_t off)
{
	return refusals_counts(m, write, buf, len, off, true);
}

/* Has this process a mapping of @path?  (/proc/self/maps names it.) */
static bool path_mapped(const char *path)
{
	char line[512];
	bool found = false;
	FILE *f = fopen("/proc/self/maps", "r");

	CHECK(f != NULL);
	while (f && fgets(line, sizeof(line), f))
		if (strstr(line, path))
			found = true;
	if (f)
		fclose(f);
	return found;
}

static void test_io_map(void)
{
	enum { MB = 1 << 20 };
	char path[256], buf[4096], back[4096];
	struct io_map *m;
	uint64_t b;
	int fd;

	snprintf(path, sizeof(path), "%s/map", tmpdir);
	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0);
	/* Fallocate'd, never written: refused (a fault would clear pages
	 * that read() leaves alone), and reading leaves them so. */
	CHECK(fallocate(fd, 0, 0, 4 * MB) == 0);
	m = io_map_open(fd, false);
	CHECK(m != NULL);
	memset(buf, 0xa5, sizeof(buf));
	b = blocks_of(fd);
	CHECK(map_rw(m, false, back, sizeof(back), MB) == 0);
	/* Every page written: copied through once a chunk has been used 16
	 * times (then asked) and 32 more (chunk 0 was used once already). */
	memset(back, 0, sizeof(back));
	for (uint64_t off = 0; off < 4 * MB; off += sizeof(buf))
		CHECK(pwrite(fd, back, sizeof(back), off) == (ssize_t)sizeof(back));
	CHECK(blocks_of(fd) == b);
	/* Accesses that do not count (small ones, io.c) never map a chunk
	 * nor bring its mapping nearer... */
	CHECK(refusals_counts(m, false, back, sizeof(back), 3 * MB, false) == 200);
	/* ... and, until one that counts asks, leave the file unmapped. */
	CHECK(!path_mapped(path));
	CHECK(refusals(m, false, back, sizeof(back), 3 * MB) == 16 + 1 + 32);
	CHECK(path_mapped(path));
	CHECK(refusals(m, false, back, sizeof(back), MB) == 15 + 1 + 32);
	/* ... but use a chunk that is mapped. */
	CHECK(map_rw_counts(m, false, back, sizeof(back), 3 * MB + 4096, false) == sizeof(back));
	CHECK(map_rw(m, true, buf, sizeof(buf), MB + 512) == sizeof(buf));
	CHECK(pread(fd, back, sizeof(back), MB + 512) == (ssize_t)sizeof(back));
	CHECK(memcmp(buf, back, sizeof(buf)) == 0);
	CHECK(map_rw(m, false, back, sizeof(back), 3 * MB) == sizeof(back) &&
	      buf_is_zero(back, sizeof(back)));
	/* Past the known end: the caller's system call (and its growth). */
	CHECK(map_rw(m, true, buf, sizeof(buf), 4 * MB - 100) == 0);
	CHECK(pwrite(fd, buf, sizeof(buf), 4 * MB - 100) == (ssize_t)sizeof(buf));
	io_map_grown(m, 4 * MB - 100 + sizeof(buf));
	/* A hole punched: that chunk is unknown again and refused, and a
	 * read there leaves the file as it was (a fault would allocate a
	 * page); asked once used 16 times, it has holes until written. */
	io_map_punch(m, 2 * MB + 8192, 8192);
	CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * MB + 8192, 8192) == 0);
	b = blocks_of(fd);
	CHECK(map_rw(m, false, back, sizeof(back), 2 * MB + 8192) == 0);
	CHECK(map_rw(m, false, back, sizeof(back), 2 * MB) == 0);
	CHECK(blocks_of(fd) == b);
	/* The other chunks still go through. */
	CHECK(map_rw(m, false, back, sizeof(back), MB + 512) == sizeof(back) &&
	      memcmp(buf, back, sizeof(back)) == 0);
	/* Written whole again: taken once asked and used 32 more times. */
	CHECK(pwrite(fd, buf, sizeof(buf), 2 * MB + 8192) == (ssize_t)sizeof(buf) &&
	      pwrite(fd, buf, sizeof(buf), 2 * MB + 12288) == (ssize_t)sizeof(buf));
	CHECK(refusals(m, false, back, sizeof(back), 2 * MB) == 14 + 1 + 32);
	/* A 64 KiB access counts as its 16 pages: a chunk is asked at its
	 * second one and mapped after two more. */
	{
		static char big[64 << 10];
		io_map_punch(m, 2 * MB, 4096);
		CHECK(map_rw(m, false, big, sizeof(big), 2 * MB) == 0);
		CHECK(refusals(m, false, big, sizeof(big), 2 * MB) == 1 + 2);
	}
	/* Cut short behind its back: the copy faults (SIGBUS), is caught,
	 * and refused; the process lives on. */
	CHECK(ftruncate(fd, MB) == 0);
	CHECK(map_rw(m, false, back, sizeof(back), 3 * MB) == 0);
	CHECK(map_rw(m, true, buf, sizeof(buf), 3 * MB) == 0);
	CHECK(map_rw(m, false, back, sizeof(back), 512) == sizeof(back));
	/* Truncation told: nothing past the new end. */
	io_map_truncate(m, 8192);
	CHECK(ftruncate(fd, 8192) == 0);
	CHECK(map_rw(m, false, back, sizeof(back), 8192) == 0);
	io_map_close(m);
	close(fd);

	/* A sparse file: only chunks with no hole go through. */
	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0 && ftruncate(fd, 4 * MB) == 0);
	for (uint64_t off = 0; off < 2 * MB; off += sizeof(buf))
		CHECK(pwrite(fd, buf, sizeof(buf), off) == (ssize_t)sizeof(buf));
	m = io_map_open(fd, true);
	CHECK(m != NULL);
	b = blocks_of(fd);
	CHECK(map_rw(m, false, back, sizeof(back), 2 * MB + MB / 2) == 0);
	CHECK(refusals(m, false, back, sizeof(back), MB) == 16 + 1 + 32 &&
	      memcmp(buf, back, sizeof(back)) == 0);
	CHECK(refusals(m, false, back, sizeof(back), 2 * MB + MB / 2) == 200);
	CHECK(blocks_of(fd) == b);
	/* Read-only: no writes through it. */
	CHECK(map_rw(m, true, buf, sizeof(buf), MB) == 0);
	io_map_close(m);
	CHECK(!path_mapped(path));
	close(fd);
	unlink(path);
}

static void test_file_table(void)
{
	char owner[400], c = 0;
	int fd;

	snprintf(ft_dir, sizeof(ft_dir), "%s", tmpdir);
	snprintf(owner, sizeof(owner), "%s/owner", tmpdir);
	fd = open(owner, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0 && pwrite(fd, "o", 1, 0) == 1);
	CHECK(aio_ctx_init(&ft_ctx, 64) == 0);
	CHECK(aio_ctx_register_files(&ft_ctx, &fd, 1) == 0);
	aio_ctx_set_current(&ft_ctx);
	CHECK(aio_run_coroutine(ft_fn, NULL) == 0);
	CHECK(ft_result == 0, " step %d", ft_result);
	/* Nothing went to the owner's file at index 0. */
	CHECK(pread(fd, &c, 1, 0) == 1 && c == 'o');
	aio_ctx_deinit(&ft_ctx);
	close(fd);
}

/* --- aio_idle ---
 * A coroutine learns whether it is the loop's only work (ublk queues
 * choose a lone request's path by it, queue.c).  Two waits that end in
 * one reaped batch: the first resumed must see the second coming; the
 * second, with the driver asleep on a timeout, sees nothing else. */
static int idle_seen[2] = { -1, -1 };

static void idle_child(void *opaque)
{
	struct aio_ctx *ctx = aio_ctx_current();
	struct io_uring_sqe *sqe = aio_get_sqe(ctx, NULL);

	io_uring_prep_nop(sqe);
	aio_co_wait_sqe(ctx, sqe);
	idle_seen[(intptr_t)opaque] = aio_idle(ctx);
}

static void idle_fn(void *opaque)
{
	struct aio_ctx *ctx = aio_ctx_current();
	struct coro *c[2];
	int *ready_seen = opaque;

	for (intptr_t i = 0; i < 2; i++) {
		c[i] = coro_new(idle_child, (void *)i, 0);
		if (!c[i])
			return;
		aio_schedule(c[i]);
	}
	*ready_seen = aio_idle(ctx);   /* both children ready to run */
	aio_co_sleep_ms(ctx, 100);
	for (int i = 0; i < 2; i++) {
		if (!coro_finished(c[i]))
			idle_seen[i] = -2;
		coro_free(c[i]);
	}
}

static void test_aio_idle(void)
{
	struct aio_ctx ctx;
	int ready_seen = -1;

	CHECK(aio_ctx_init(&ctx, 64) == 0);
	aio_ctx_set_current(&ctx);
	CHECK(aio_run_coroutine(idle_fn, &ready_seen) == 0);
	CHECK(ready_seen == 0, " (%d)", ready_seen);
	CHECK(idle_seen[0] == 0 && idle_seen[1] == 1, " (%d %d)", idle_seen[0], idle_seen[1]);
	aio_ctx_deinit(&ctx);
}

static void test_helpers(void)
{
	uint64_t v;
	CHECK(parse_size("4k", &v) == 0 && v == 4096);
	CHECK(parse_size("2M", &v) == 0 && v == 2 << 20);
	CHECK(parse_size("1GiB", &v) == 0 && v == 1ull << 30);
	CHECK(parse_size("512", &v) == 0 && v == 512);
	CHECK(parse_size("x", &v) == -EINVAL);
	CHECK(parse_size("-1", &v) == -EINVAL);
	CHECK(parse_size("99999999999T", &v) == -ERANGE);
	char a[10], b[20];
	struct iovec src[2] = { { a, 10 }, { b, 20 } }, dst[2];
	CHECK(iov_slice(src, 2, 5, 10, dst, 2) == 2 && dst[0].iov_base == a + 5 &&
	      dst[0].iov_len == 5 && dst[1].iov_base == b && dst[1].iov_len == 5);
	CHECK(iov_slice(src, 2, 25, 10, dst, 2) == -EINVAL);
	static char z[4096];
	CHECK(buf_is_zero(z, sizeof(z)));
	z[4000] = 1;
	CHECK(!buf_is_zero(z, sizeof(z)));
}

int main(void)
{
	log_set_prog("test_core");
	/* The io layer through the ring (the tests that yield in I/O). */
	setenv("QUBLK_IO_INLINE", "0", 1);
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	test_helpers();
	test_kbuf();
	test_coro_basic();
	test_mutex();
	test_mutex_threads();
	run_io_model(0, "buffered", false);
	run_io_model(IO_OPEN_DIRECT, "direct", false);
	/* Inline I/O (io.c): the same, with no yield around the data I/O. */
	setenv("QUBLK_IO_INLINE", "1", 1);
	run_io_model(0, "buffered-inline", false);
	run_io_model(IO_OPEN_DIRECT, "direct-inline", false);
	run_io_model(0, "buffered-mapped", true);
	run_io_model(IO_OPEN_DIRECT, "direct-mapped", true);
	setenv("QUBLK_IO_INLINE", "0", 1);
	test_raw();
	test_close_error();
	test_file_table();
	test_aio_idle();
	test_io_map();
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd)) {}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
