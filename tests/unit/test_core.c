/* SPDX-License-Identifier: MIT */
/* Unit tests for the core: coroutines, wait queues, the event loop, the
 * io layer (buffered and O_DIRECT with unaligned read-modify-write),
 * the raw driver and the small helpers. */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/coro.h"
#include "common/io.h"
#include "common/io_fault.h"
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

static void run_io_model(unsigned flags, const char *name)
{
	struct aio_ctx ctx;
	char path[256];
	enum { NJOBS = 64 };
	struct io_job jobs[NJOBS];
	struct coro *co[NJOBS];

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	CHECK(fd >= 0 && ftruncate(fd, FSZ) == 0);
	close(fd);
	memset(model, 0, sizeof(model));
	CHECK(io_file_open(path, flags, &iof) == 0);
	CHECK(aio_ctx_init(&ctx, 32) == 0);
	aio_ctx_set_current(&ctx);
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
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	test_helpers();
	test_coro_basic();
	test_mutex();
	test_mutex_threads();
	run_io_model(0, "buffered");
	run_io_model(IO_OPEN_DIRECT, "direct");
	test_raw();
	test_close_error();
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd)) {}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
