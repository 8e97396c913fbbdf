/* SPDX-License-Identifier: MIT */
/*
 * One qcow2 image shared by several threads, each with its own io_uring
 * loop and coroutines (what ublk queues do).  Threads write interleaved
 * 4 KiB blocks, so they race to allocate the same clusters and L2
 * tables.  Afterwards `qemu-img check` must be clean (no double
 * allocation, no leak) and QEMU must read back exactly what was written.
 *
 * Growing: the same, on an image that starts at 4 MiB and is grown to
 * 32 MiB in seven steps by another thread (bdrv_truncate, as a live
 * ublk resize does) while the writers run; every step needs more L1
 * entries, so the L1 table moves each time under allocating writes.  A
 * block past the current size waits until a resize covers it.
 *
 * Every seventh block is zeroed again after it is written (may unmap:
 * whole clusters are freed while others allocate).  With
 * BDRV_O_CRASH_SAFE (a recoverable ublk daemon's write-through), the
 * image file is also copied once every request has completed and before
 * anything is flushed or closed, as a kill -9 would leave it: after QEMU
 * repairs the copy (`qemu-img check -r all`: lazy refcounts) it must
 * read back every write.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/util.h"

#define NTHREADS 3
#define NCORO 12
#define BLK 4096u
#define NBLK 8192u                 /* 32 MiB image */

#define GROW_FROM (4u << 20)
#define GROW_STEP (4u << 20)

static struct bdrv *bs;
static uint64_t l2_cache;       /* bytes, 0: the driver's default */
static int errors;
static bool growing;
static int resizing;            /* a bdrv_truncate is running */
static unsigned long overlapped; /* writes that completed during one */

struct worker {
	int thread, idx;
	unsigned next;
	int *done;
};

static void fill(unsigned char *b, unsigned blk)
{
	for (unsigned i = 0; i < BLK; i += 4) {
		uint32_t v = blk * 2654435761u + i;
		memcpy(b + i, &v, 4);
	}
}

static bool zeroed(unsigned blk)
{
	return blk % 7 == 3;
}

/* Does the raw image @raw hold what the writers left?  Returns 0 if so. */
static int compare_raw(const char *what, const char *raw)
{
	FILE *f = fopen(raw, "rb");
	unsigned char *got = malloc(BLK), *want = malloc(BLK);
	int bad = !f;

	for (unsigned blk = 0; f && blk < NBLK; blk++) {
		if (zeroed(blk))
			memset(want, 0, BLK);
		else
			fill(want, blk);
		if (fread(got, 1, BLK, f) != BLK || memcmp(got, want, BLK)) {
			fprintf(stderr, "%s: block %u differs\n", what, blk);
			bad++;
			break;
		}
	}
	if (f)
		fclose(f);
	free(got);
	free(want);
	return bad;
}

static void worker_fn(void *opaque)
{
	struct worker *w = opaque;
	unsigned char *b = io_alloc(BLK);
	/* Block k belongs to thread k % NTHREADS; coroutine idx takes every
	 * NCORO-th of those, in a shuffled order. */
	for (unsigned k = w->thread + NTHREADS * w->idx; k < NBLK; k += NTHREADS * NCORO) {
		unsigned blk = (k * 7919u) % NBLK;
		/* Not there yet: wait for the resize that brings it. */
		while (growing && (uint64_t)(blk + 1) * BLK > __atomic_load_n(&bs->size,
									     __ATOMIC_ACQUIRE))
			aio_co_sleep_ms(aio_ctx_current(), 1);
		fill(b, blk);
		if (bdrv_co_pwrite(bs, (uint64_t)blk * BLK, BLK, b, 0))
			__atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
		if (zeroed(blk) && bdrv_co_pwrite_zeroes(bs, (uint64_t)blk * BLK, BLK,
							 BDRV_REQ_MAY_UNMAP))
			__atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
		if (__atomic_load_n(&resizing, __ATOMIC_RELAXED))
			__atomic_add_fetch(&overlapped, 1, __ATOMIC_RELAXED);
	}
	io_free(b);
	(*w->done)++;
}

static void *thread_fn(void *arg)
{
	int t = (int)(long)arg, done = 0;
	struct aio_ctx ctx;
	struct worker w[NCORO];
	struct coro *co[NCORO];

	if (aio_ctx_init(&ctx, 64))
		return (void *)1;
	aio_ctx_set_current(&ctx);
	for (int i = 0; i < NCORO; i++) {
		w[i] = (struct worker){ .thread = t, .idx = i, .done = &done };
		co[i] = coro_new(worker_fn, &w[i], 0);
		aio_schedule(co[i]);
	}
	while (done < NCORO || ctx.inflight || ctx.ready_head)
		if (aio_run_once(&ctx, true))
			return (void *)1;
	for (int i = 0; i < NCORO; i++)
		coro_free(co[i]);
	aio_ctx_deinit(&ctx);
	return NULL;
}

/* The resizer: GROW_FROM to the full size in GROW_STEP steps, a flush
 * after every other one. */
static void grow_fn(void *opaque)
{
	int *done = opaque;

	for (uint64_t size = GROW_FROM + GROW_STEP, i = 0; size <= (uint64_t)NBLK * BLK;
	     size += GROW_STEP, i++) {
		aio_co_sleep_ms(aio_ctx_current(), 3);
		__atomic_store_n(&resizing, 1, __ATOMIC_RELAXED);
		if (bdrv_truncate(bs, size, 0) < 0)
			__atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
		__atomic_store_n(&resizing, 0, __ATOMIC_RELAXED);
		if (i % 2 && bdrv_co_flush(bs) < 0)
			__atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
	}
	*done = 1;
}

static void *grow_thread_fn(void *arg)
{
	struct aio_ctx ctx;
	struct coro *co;
	int done = 0;

	(void)arg;
	if (aio_ctx_init(&ctx, 64))
		return (void *)1;
	aio_ctx_set_current(&ctx);
	co = coro_new(grow_fn, &done, 0);
	aio_schedule(co);
	while (!done || ctx.inflight || ctx.ready_head)
		if (aio_run_once(&ctx, true))
			return (void *)1;
	coro_free(co);
	aio_ctx_deinit(&ctx);
	return NULL;
}

static void flush_fn(void *opaque)
{
	(void)opaque;
	if (bdrv_co_flush(bs))
		errors++;
}

static int run_cfg(const char *opts, unsigned flags, bool grow)
{
	char dir[] = "/dev/shm/qublk-mt-XXXXXX", cmd[2048], img[256], raw[256];
	struct bdrv_opts o = { .format = "qcow2", .flags = flags, .l2_cache_size = l2_cache };
	pthread_t th[NTHREADS], gt;
	int bad = 0;

	if (!mkdtemp(dir))
		return 1;
	snprintf(img, sizeof(img), "%s/i.qcow2", dir);
	snprintf(raw, sizeof(raw), "%s/i.raw", dir);
	snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 -o %s %s %u", opts, img,
		 grow ? GROW_FROM : NBLK * BLK);
	if (system(cmd) || bdrv_open(img, &o, &bs))
		return 1;
	growing = grow;
	if (grow)
		pthread_create(&gt, NULL, grow_thread_fn, NULL);
	for (long t = 0; t < NTHREADS; t++)
		pthread_create(&th[t], NULL, thread_fn, (void *)t);
	for (int t = 0; t < NTHREADS; t++) {
		void *r;
		pthread_join(th[t], &r);
		bad += r != NULL;
	}
	if (grow) {
		void *r;
		pthread_join(gt, &r);
		bad += r != NULL;
		if (bs->size != (uint64_t)NBLK * BLK) {
			fprintf(stderr, "%s: grown to %llu bytes\n", opts, (unsigned long long)bs->size);
			bad++;
		}
	}
	if (flags & BDRV_O_CRASH_SAFE) {
		/* What a kill -9 now would leave: nothing flushed, nothing
		 * closed, every completed request in the file. */
		snprintf(cmd, sizeof(cmd),
			 "cp %s %s.kill && qemu-img check -q -r all %s.kill >/dev/null 2>&1 && "
			 "qemu-img check -q %s.kill && qemu-img convert -f qcow2 -O raw %s.kill %s",
			 img, img, img, img, img, raw);
		if (system(cmd) || compare_raw("killed", raw)) {
			fprintf(stderr, "%s: the image as a kill leaves it lost writes\n", opts);
			bad++;
		}
	}
	aio_run_coroutine(flush_fn, NULL);
	bdrv_close(bs);
	snprintf(cmd, sizeof(cmd), "qemu-img check -q %s", img);
	int chk = system(cmd);
	snprintf(cmd, sizeof(cmd), "qemu-img convert -f qcow2 -O raw %s %s", img, raw);
	if (system(cmd))
		bad++;
	bad += compare_raw(opts, raw);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd)) {}
	if (chk)
		fprintf(stderr, "%s: qemu-img check failed\n", opts);
	if (errors)
		fprintf(stderr, "%s: %d request errors\n", opts, errors);
	return bad || chk || errors;
}

int main(void)
{
	static const char *cfgs[] = {
		"cluster_size=65536",
		"cluster_size=4096,refcount_bits=1",
		"cluster_size=512,compat=0.10",
		"cluster_size=2M",
	};
	static const char *grow_cfgs[] = {
		"cluster_size=512",
		"cluster_size=4096",
		"cluster_size=512,compat=0.10",
		"cluster_size=4096,refcount_bits=1",
	};
	int passed = 0, failed = 0;

	log_set_prog("test_mt");
	if (system("qemu-img --version >/dev/null 2>&1"))
		return 77;
	for (size_t i = 0; i < ARRAY_SIZE(cfgs); i++) {
		for (unsigned mode = 0; mode < 4; mode++) {
			unsigned flags = (mode & 1 ? BDRV_O_DIRECT : 0) |
					 (mode & 2 ? BDRV_O_CRASH_SAFE : 0);
			errors = 0;
			if (run_cfg(cfgs[i], flags, false)) {
				failed++;
				fprintf(stderr, "FAIL %s direct=%u crash_safe=%u\n", cfgs[i],
					mode & 1, mode >> 1);
			} else {
				passed++;
			}
		}
	}
	/* Write-through with an L2 cache of 16 slices (8 KiB at 512 B
	 * clusters) and 36 writers on as many slices: copies in flight pin
	 * their slices, and must not take every slot from the others. */
	l2_cache = 8192;
	errors = 0;
	if (run_cfg("cluster_size=512", BDRV_O_CRASH_SAFE, false)) {
		failed++;
		fprintf(stderr, "FAIL cluster_size=512 crash_safe=1 l2_cache_size=8192\n");
	} else {
		passed++;
	}
	l2_cache = 0;
	/* Growing: an L1 entry maps 32 KiB (512 B clusters) or 2 MiB (4 KiB
	 * clusters): every 4 MiB step moves the L1 table. */
	for (size_t i = 0; i < ARRAY_SIZE(grow_cfgs); i++) {
		errors = 0;
		overlapped = 0;
		if (run_cfg(grow_cfgs[i], (i % 2 ? BDRV_O_DIRECT : 0) | (i < 2 ? BDRV_O_CRASH_SAFE : 0),
			    true)) {
			failed++;
			fprintf(stderr, "FAIL growing %s\n", grow_cfgs[i]);
		} else {
			passed++;
		}
		printf("growing %s: %lu writes completed during a resize\n", grow_cfgs[i],
		       overlapped);
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
