/* SPDX-License-Identifier: MIT */
/*
 * Internal snapshots of a live image (bdrv_snapshot: the block layer's
 * drained section, src/qcow2/snapshot-live.c, snapshot-write.c), with
 * QEMU as the oracle.
 *
 * Under load: two threads, each with its own io_uring loop and eight
 * writer coroutines (what two ublk queues do), write 4 KiB blocks of the
 * first half of an image, each block stamped with its number and a
 * version; writer w owns every NW-th block and writes them round after
 * round, each round one version higher, with a flush now and then.
 * Meanwhile the main thread creates and deletes snapshots, as the ublk
 * daemon does.  Afterwards, with QEMU reading the image:
 *  - `qemu-img check` is clean, leaks included;
 *  - `qemu-img snapshot -l` lists what was created and not deleted, and
 *    the snapshot that was there before;
 *  - each new snapshot holds a state of the writes at one point: for
 *    every writer, exactly its first k writes, k between the number it
 *    had completed when the snapshot was asked for and the number it had
 *    started when it returned (no write lost, none torn, none from after);
 *  - the active layer holds every write; the second half of the image
 *    (compressed, zero and data clusters written by qemu-io, and a
 *    snapshot taken by qemu-img) reads the same in every snapshot;
 *  - no request failed (those that arrived during a snapshot waited).
 * Then the image is opened again, written again, a snapshot deleted and
 * another created under load: an older snapshot must be unchanged.
 * Configurations: 64 KiB clusters; 4 KiB clusters with BDRV_O_CRASH_SAFE
 * (lazy refcounts, the dirty bit cleared for the snapshot); a v2 image.
 *
 * Crash: a live create and a live delete, with the image written through
 * the driver just before (a discard and a flush leave refcount
 * decrements that only the snapshot's own flush writes), are cut at every
 * step by the io_fault backend: without reordering (kill -9: every write
 * that returned is in the file) and with (a power cut on a volatile disk
 * cache).  After each cut `qemu-img check` finds leaks at most (and, as
 * for offline snapshots, active entries with refcount 1 still lacking
 * OFLAG_COPIED, which no ordering avoids: see snapshot-write.c), is clean
 * after -r all, the snapshot list is the one before or the one after,
 * every listed snapshot holds its data and the active layer its own.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/io_fault.h"
#include "common/util.h"
#include "qcow2/format.h"

#include "check.h"

#define BLK 4096u
#define NBLK 2048u                      /* the writers' half: 8 MiB */
#define IMG_SIZE (2ull * NBLK * BLK)
#define NTHREADS 2
#define NCORO 8
#define NW (NTHREADS * NCORO)
#define PER_W (NBLK / NW)               /* blocks per writer */

static char dir[] = "/dev/shm/qublk-snaplive-XXXXXX";
static struct bdrv *bs;
static int req_errors;
static volatile int stop_writers;

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int r = system(cmd);
	return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

/* ---- the writers' model ----------------------------------------------- */

/* Writer w's write number k goes to block blk_of(w, k % PER_W) with
 * version k / PER_W + 1.  After its first k writes, the block at position
 * j of its order has version ver_after(k, j); version 0 reads as zeros. */
static unsigned blk_of(unsigned w, unsigned j)
{
	return w + NW * ((j * 37u) % PER_W);
}

static unsigned ver_after(uint64_t k, unsigned j)
{
	return k > j ? (unsigned)((k - 1 - j) / PER_W + 1) : 0;
}

static void stamp(uint8_t *b, unsigned blk, unsigned ver)
{
	for (unsigned i = 0; i < BLK; i += 8) {
		uint32_t v[2] = { blk * 2654435761u ^ i, ver };
		memcpy(b + i, v, 8);
	}
}

/* The version block @blk holds in @b, or -1 if it is no stamp of it. */
static int version_of(const uint8_t *b, unsigned blk)
{
	static const uint8_t zero[BLK];
	uint8_t want[BLK];
	uint32_t v;

	if (!memcmp(b, zero, BLK))
		return 0;
	memcpy(&v, b + 4, 4);
	stamp(want, blk, v);
	return v && !memcmp(b, want, BLK) ? (int)v : -1;
}

/* ---- slow writes ------------------------------------------------------ */

/* Every write of the writers' threads sleeps 0-15 ms on its ring before
 * it goes to the file: guest writes stay in flight long enough for a
 * snapshot (whose own writes do not sleep) to start and end meanwhile,
 * and finish out of order, as on a real disk.  Without the drained section a
 * write that decided to overwrite its cluster in place would then land
 * in a cluster the snapshot shares, after another request copied that
 * cluster for the active layer without it: the write would be lost. */
static __thread bool slow_thread;
static __thread unsigned slow_seed;

struct slow_file {
	struct io_file f;
	struct io_file *inner;
};

static struct io_file *inner_of(struct io_file *f)
{
	return ((struct slow_file *)f)->inner;
}

static int slow_preadv(struct io_file *f, const struct iovec *iov, int n, uint64_t off)
{
	return io_preadv(inner_of(f), iov, n, off);
}

static int slow_pwritev(struct io_file *f, const struct iovec *iov, int n, uint64_t off)
{
	if (slow_thread && coro_self())
		aio_co_sleep_ms(aio_ctx_current(), (slow_seed = slow_seed * 1103515245u + 12345u) >> 16 & 15);
	return io_pwritev(inner_of(f), iov, n, off);
}

static int slow_flush(struct io_file *f) { return io_flush(inner_of(f)); }
static int slow_fallocate(struct io_file *f, int mode, uint64_t off, uint64_t len)
{ return io_fallocate(inner_of(f), mode, off, len); }
static int slow_truncate(struct io_file *f, uint64_t size) { return io_truncate(inner_of(f), size); }
static int slow_get_size(struct io_file *f, uint64_t *size) { return io_get_size(inner_of(f), size); }

static void slow_close(struct io_file *f)
{
	io_file_close(inner_of(f));
	free(f);
}

static const struct io_file_ops slow_ops = {
	.preadv = slow_preadv,
	.pwritev = slow_pwritev,
	.flush = slow_flush,
	.fallocate = slow_fallocate,
	.truncate = slow_truncate,
	.get_size = slow_get_size,
	.close = slow_close,
};

static int slow_wrap(struct io_file *inner, struct io_file **out, void *opaque)
{
	struct slow_file *sf = calloc(1, sizeof(*sf));

	(void)opaque;
	if (!sf)
		return -ENOMEM;
	sf->f = *inner;
	sf->f.ops = &slow_ops;
	sf->f.priv = NULL;
	sf->inner = inner;
	*out = &sf->f;
	return 0;
}

struct writer {
	unsigned w;
	uint64_t k;             /* writes completed (all of them, in order) */
	uint64_t started;       /* writes issued */
	int *done;
};

static struct writer writers[NW];

static void writer_fn(void *opaque)
{
	struct writer *wr = opaque;
	uint8_t *b = io_alloc(BLK);

	while (b && !__atomic_load_n(&stop_writers, __ATOMIC_ACQUIRE)) {
		uint64_t k = wr->k;
		unsigned j = (unsigned)(k % PER_W);
		stamp(b, blk_of(wr->w, j), (unsigned)(k / PER_W + 1));
		__atomic_store_n(&wr->started, k + 1, __ATOMIC_RELEASE);
		int ret = bdrv_co_pwrite(bs, (uint64_t)blk_of(wr->w, j) * BLK, BLK, b,
					 k % 97 == 0 ? BDRV_REQ_FUA : 0);
		if (!ret && k % 61 == 0)
			ret = bdrv_co_flush(bs);
		if (ret) {
			fprintf(stderr, "writer %u: write %llu: %s\n", wr->w, (unsigned long long)k,
				strerror(-ret));
			__atomic_add_fetch(&req_errors, 1, __ATOMIC_RELAXED);
			break;
		}
		__atomic_store_n(&wr->k, k + 1, __ATOMIC_RELEASE);
	}
	io_free(b);
	(*wr->done)++;
}

static void *thread_fn(void *arg)
{
	int t = (int)(long)arg, done = 0;
	struct aio_ctx ctx;
	struct coro *co[NCORO];

	if (aio_ctx_init(&ctx, 64))
		return (void *)1;
	aio_ctx_set_current(&ctx);
	slow_thread = true;
	slow_seed = (unsigned)t + 1;
	for (int i = 0; i < NCORO; i++) {
		struct writer *wr = &writers[t * NCORO + i];
		wr->done = &done;
		co[i] = coro_new(writer_fn, wr, 0);
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

static uint64_t total_done(void)
{
	uint64_t n = 0;

	for (unsigned w = 0; w < NW; w++)
		n += __atomic_load_n(&writers[w].k, __ATOMIC_ACQUIRE);
	return n;
}

static void wait_writes(uint64_t more)
{
	uint64_t until = total_done() + more;

	while (total_done() < until && !__atomic_load_n(&req_errors, __ATOMIC_RELAXED))
		usleep(2000);
}

/* Per writer: at least lo[w], at most hi[w] writes in a snapshot. */
struct bounds {
	uint64_t lo[NW], hi[NW];
};

/* A live snapshot operation between the writers' counts. */
static int live_op(enum bdrv_snapshot_op op, const char *name, struct bounds *b)
{
	char err[256];
	int ret;

	for (unsigned w = 0; b && w < NW; w++)
		b->lo[w] = __atomic_load_n(&writers[w].k, __ATOMIC_ACQUIRE);
	ret = bdrv_snapshot(bs, op, name, err, sizeof(err));
	for (unsigned w = 0; b && w < NW; w++)
		b->hi[w] = __atomic_load_n(&writers[w].started, __ATOMIC_ACQUIRE);
	if (ret && ret != -ENOENT)
		fprintf(stderr, "snapshot %s: %s\n", name, err);
	return ret;
}

/* @raw (the image's contents, or a snapshot's) holds, for every writer,
 * exactly its first k writes with lo <= k <= hi, and the second half of
 * the image is @half's. */
static bool check_state(const char *what, const char *raw, const struct bounds *b,
			const char *half)
{
	uint8_t *img = malloc(IMG_SIZE), *ref = malloc(IMG_SIZE / 2);
	FILE *f = fopen(raw, "rb"), *h = fopen(half, "rb");
	bool ok = img && ref && f && h && fread(img, 1, IMG_SIZE, f) == IMG_SIZE &&
		  fread(ref, 1, IMG_SIZE / 2, h) == IMG_SIZE / 2;

	if (f)
		fclose(f);
	if (h)
		fclose(h);
	if (!ok) {
		fprintf(stderr, "%s: cannot read %s or %s\n", what, raw, half);
		goto out;
	}
	if (memcmp(img + IMG_SIZE / 2, ref, IMG_SIZE / 2)) {
		fprintf(stderr, "%s: the second half (qemu-io's clusters) changed\n", what);
		ok = false;
	}
	for (unsigned w = 0; w < NW && ok; w++) {
		uint64_t k = 0;
		int v[PER_W];
		for (unsigned j = 0; j < PER_W; j++) {
			unsigned blk = blk_of(w, j);
			v[j] = version_of(img + (size_t)blk * BLK, blk);
			if (v[j] < 0) {
				fprintf(stderr, "%s: block %u holds no version of it (torn?)\n", what,
					blk);
				ok = false;
				break;
			}
			k += (unsigned)v[j];    /* each write adds one version */
		}
		if (!ok)
			break;
		for (unsigned j = 0; j < PER_W && ok; j++) {
			if ((unsigned)v[j] != ver_after(k, j)) {
				fprintf(stderr, "%s: writer %u: block %u has version %d, not %u: not "
					"the first %llu writes\n", what, w, blk_of(w, j), v[j],
					ver_after(k, j), (unsigned long long)k);
				ok = false;
			}
		}
		if (ok && (k < b->lo[w] || k > b->hi[w])) {
			fprintf(stderr, "%s: writer %u: %llu writes, expected %llu..%llu\n", what, w,
				(unsigned long long)k, (unsigned long long)b->lo[w],
				(unsigned long long)b->hi[w]);
			ok = false;
		}
	}
out:
	free(img);
	free(ref);
	return ok;
}

/* The snapshot names of @img, space separated, into @out. */
static void list(const char *img, char *out, size_t len)
{
	char cmd[1024];

	out[0] = '\0';
	snprintf(cmd, sizeof(cmd), "qemu-img snapshot -l %s | awk 'NR > 2 { printf \"%%s \", $2 }'",
		 img);
	FILE *p = popen(cmd, "r");
	if (!p)
		return;
	if (!fgets(out, (int)len, p))
		out[0] = '\0';
	pclose(p);
}

static int run_writers(pthread_t *th)
{
	stop_writers = 0;
	for (long t = 0; t < NTHREADS; t++)
		if (pthread_create(&th[t], NULL, thread_fn, (void *)t))
			return -1;
	return 0;
}

static int join_writers(pthread_t *th)
{
	int bad = 0;

	__atomic_store_n(&stop_writers, 1, __ATOMIC_RELEASE);
	for (int t = 0; t < NTHREADS; t++) {
		void *r;
		pthread_join(th[t], &r);
		bad += r != NULL;
	}
	return bad;
}

/* The active layer after all the writes so far. */
static struct bounds final_bounds(void)
{
	struct bounds b;

	for (unsigned w = 0; w < NW; w++)
		b.lo[w] = b.hi[w] = writers[w].k;
	return b;
}

static void load_case(const char *name, const char *create_opts, unsigned flags, bool slow)
{
	char img[512], half[512], raw[512], names[256];
	struct bdrv_opts o = { .format = "qcow2", .flags = flags,
			       .wrap_file = slow ? slow_wrap : NULL };
	struct bounds b1, b2, b3, fin;
	struct qcow2_snapshot *sl = NULL;
	uint32_t nsl = 0;
	pthread_t th[NTHREADS];
	char err[256];
	double t0 = now_s();

	snprintf(img, sizeof(img), "%s/%s.qcow2", dir, name);
	snprintf(half, sizeof(half), "%s/half.raw", dir);
	snprintf(raw, sizeof(raw), "%s/out.raw", dir);
	memset(writers, 0, sizeof(writers));
	for (unsigned w = 0; w < NW; w++)
		writers[w].w = w;
	req_errors = 0;
	/* The second half: compressed, zero and data clusters, a snapshot
	 * taken by QEMU, and a write after it. */
	if (sh("qemu-img create -q -f qcow2 -o %s %s %llu && qemu-io -c 'write -c -P 0x33 8M 64k' "
	       "-c 'write -z 9M 1M' -c 'write -P 0x44 10M 2M' -c 'write -c -P 0x55 12M 128k' %s "
	       ">/dev/null && qemu-img snapshot -c s0 %s && qemu-io -c 'write -P 0x66 11M 64k' %s "
	       ">/dev/null && qemu-img convert -O raw -l snapshot.name=s0 %s %s/s0.raw && "
	       "qemu-img convert -O raw %s %s/all.raw && dd if=%s/all.raw of=%s bs=1M skip=8 "
	       "status=none", create_opts, img, (unsigned long long)IMG_SIZE, img, img, img, img, dir,
	       img, dir, dir, half)) {
		CHECK(0, "%s: making the image failed", name);
		return;
	}
	if (bdrv_open(img, &o, &bs)) {
		CHECK(0, "%s: bdrv_open failed", name);
		return;
	}
	CHECK(run_writers(th) == 0);
	wait_writes(800);
	CHECK(live_op(BDRV_SNAPSHOT_CREATE, "s1", &b1) == 0, "%s: creating s1", name);
	wait_writes(800);
	CHECK(live_op(BDRV_SNAPSHOT_CREATE, "s2", &b2) == 0, "%s: creating s2", name);
	wait_writes(300);
	CHECK(live_op(BDRV_SNAPSHOT_DELETE, "nonexistent", NULL) == -ENOENT,
	      "%s: deleting a snapshot that does not exist", name);
	CHECK(bdrv_snapshot_list(bs, &sl, &nsl, err, sizeof(err)) == 0 && nsl == 3 &&
	      !strcmp(sl[0].name, "s0") && !strcmp(sl[1].name, "s1") && !strcmp(sl[2].name, "s2") &&
	      !strcmp(sl[2].id, "3"), "%s: the live list: %u entries", name, nsl);
	qcow2_snapshots_free(sl, nsl);
	wait_writes(800);
	CHECK(join_writers(th) == 0);
	CHECK(bdrv_close(bs) == 0, "%s: close", name);
	CHECK(req_errors == 0, "%s: %d requests failed", name, req_errors);
	fin = final_bounds();

	CHECK(sh("qemu-img check -q %s", img) == 0, "%s: qemu-img check is not clean", name);
	list(img, names, sizeof(names));
	CHECK(!strcmp(names, "s0 s1 s2 "), "%s: snapshots '%s'", name, names);
	CHECK(sh("qemu-img convert -O raw -l snapshot.name=s0 %s %s && cmp -s %s %s/s0.raw", img, raw,
		 raw, dir) == 0, "%s: snapshot s0 (QEMU's) changed", name);
	CHECK(sh("qemu-img convert -O raw -l snapshot.name=s1 %s %s", img, raw) == 0);
	CHECK(check_state("s1", raw, &b1, half), "%s: snapshot s1", name);
	CHECK(sh("qemu-img convert -O raw -l snapshot.name=s2 %s %s/s2.raw", img, dir) == 0);
	snprintf(raw, sizeof(raw), "%s/s2.raw", dir);
	CHECK(check_state("s2", raw, &b2, half), "%s: snapshot s2", name);
	snprintf(raw, sizeof(raw), "%s/out.raw", dir);
	CHECK(sh("qemu-img convert -O raw %s %s", img, raw) == 0);
	CHECK(check_state("active", raw, &fin, half), "%s: the active layer", name);

	/* Again, from where the writers stopped: delete s1 and create s3
	 * under load; s2 must not change. */
	if (bdrv_open(img, &o, &bs)) {
		CHECK(0, "%s: bdrv_open (2) failed", name);
		return;
	}
	CHECK(run_writers(th) == 0);
	wait_writes(600);
	CHECK(live_op(BDRV_SNAPSHOT_DELETE, "s1", NULL) == 0, "%s: deleting s1", name);
	wait_writes(600);
	CHECK(live_op(BDRV_SNAPSHOT_CREATE, "s3", &b3) == 0, "%s: creating s3", name);
	wait_writes(600);
	CHECK(join_writers(th) == 0);
	CHECK(bdrv_close(bs) == 0, "%s: close (2)", name);
	CHECK(req_errors == 0, "%s: %d requests failed (2)", name, req_errors);
	fin = final_bounds();
	CHECK(sh("qemu-img check -q %s", img) == 0, "%s: qemu-img check is not clean (2)", name);
	list(img, names, sizeof(names));
	CHECK(!strcmp(names, "s0 s2 s3 "), "%s: snapshots '%s' (2)", name, names);
	CHECK(sh("qemu-img convert -O raw -l snapshot.name=s2 %s %s && cmp -s %s %s/s2.raw", img, raw,
		 raw, dir) == 0, "%s: snapshot s2 changed", name);
	CHECK(sh("qemu-img convert -O raw -l snapshot.name=s3 %s %s", img, raw) == 0);
	CHECK(check_state("s3", raw, &b3, half), "%s: snapshot s3", name);
	CHECK(sh("qemu-img convert -O raw %s %s", img, raw) == 0);
	CHECK(check_state("active", raw, &fin, half), "%s: the active layer (2)", name);
	printf("ok %s: s1 after about %llu writes, s2 %llu, s3 %llu, %llu in all (%.1f s)\n", name,
	       (unsigned long long)b1.lo[0] * NW, (unsigned long long)b2.lo[0] * NW,
	       (unsigned long long)b3.lo[0] * NW, (unsigned long long)total_done(), now_s() - t0);
	sh("rm -f %s %s/*.raw", img, dir);
}

/* ---- crash ------------------------------------------------------------ */

struct cut {
	struct io_fault_cfg cfg;
	struct io_file *w;
};

static int wrap(struct io_file *f, struct io_file **out, void *opaque)
{
	struct cut *c = opaque;
	int ret = io_fault_wrap(f, &c->cfg, out);

	c->w = ret ? NULL : *out;
	return ret;
}

static unsigned long mutations(struct io_file *w)
{
	struct io_fault_stats st = { 0 };

	io_fault_get_stats(w, &st);
	return st.writes + st.flushes;
}

struct crash_run {
	enum bdrv_snapshot_op op;
	const char *name;
	unsigned long before;   /* mutating calls before the snapshot */
	unsigned long during;   /* ... made by it */
	int ret;
};

/* Write through the driver, flush (the discard's decrements stay
 * unwritten), then the live operation. */
static void crash_fn(void *opaque)
{
	struct crash_run *r = opaque;
	uint8_t *b = io_alloc(65536);
	char err[256];

	memset(b, 0x77, 65536);
	r->ret = bdrv_co_pwrite(bs, 64 << 10, 65536, b, 0);
	if (!r->ret)
		r->ret = bdrv_co_pwrite(bs, 3 << 20, 4096, b, 0);
	if (!r->ret)
		r->ret = bdrv_co_discard(bs, 1 << 20, 128 << 10);
	if (!r->ret)
		r->ret = bdrv_co_flush(bs);
	io_free(b);
	if (r->ret)
		return;
	r->before = mutations(bs->file);
	r->ret = bdrv_snapshot(bs, r->op, r->name, err, sizeof(err));
	r->during = mutations(bs->file) - r->before;
}

/* One run on @img; @drop_after (0: none) counts from the snapshot's
 * first mutating call. */
static struct crash_run crash_once(const char *img, enum bdrv_snapshot_op op, const char *name,
				   unsigned long before, unsigned long drop_after, bool reorder,
				   unsigned long seed)
{
	struct cut c = { .cfg = { .drop_after = drop_after ? before + drop_after : 0,
				  .reorder = reorder, .seed = seed } };
	struct bdrv_opts o = { .format = "qcow2", .wrap_file = wrap, .wrap_opaque = &c };
	struct crash_run r = { .op = op, .name = name, .ret = -EIO };

	if (bdrv_open(img, &o, &bs))
		return r;
	aio_run_coroutine(crash_fn, &r);
	bdrv_close(bs);         /* after a cut, nothing more reaches the file */
	return r;
}

static bool same_raw(const char *img, const char *snap, const char *raw)
{
	if (!snap)
		return sh("qemu-img compare -q -f qcow2 -F raw %s %s", img, raw) == 0;
	return sh("qemu-img convert -f qcow2 -l snapshot.name=%s -O raw %s %s/sn.raw && "
		  "cmp -s %s/sn.raw %s", snap, img, dir, dir, raw) == 0;
}

static void crash_case(const char *name, const char *create_opts, enum bdrv_snapshot_op op,
		       const char *arg)
{
	static const char *const snaps[] = { "s1", "s2", "new" };
	char img[512], good[512], cut[512], before[256], after[256], now[256];
	const char *opname = op == BDRV_SNAPSHOT_CREATE ? "create" : "delete";
	double t0 = now_s();

	snprintf(img, sizeof(img), "%s/%s.qcow2", dir, name);
	snprintf(good, sizeof(good), "%s/%s-good.qcow2", dir, name);
	snprintf(cut, sizeof(cut), "%s/%s-cut.qcow2", dir, name);
	if (sh("qemu-img create -q -f qcow2 -o %s %s 4M && qemu-io -c 'write -P 1 0 2M' "
	       "-c 'write -c -P 2 2M 64k' -c 'write -z 2500k 100k' %s >/dev/null && "
	       "qemu-img snapshot -c s1 %s && qemu-io -c 'write -P 3 512k 1M' %s >/dev/null && "
	       "qemu-img snapshot -c s2 %s", create_opts, img, img, img, img, img)) {
		CHECK(0, "%s: making the image failed", name);
		return;
	}
	sh("qemu-img convert -f qcow2 -l snapshot.name=s1 -O raw %s %s/s1.raw", img, dir);
	sh("qemu-img convert -f qcow2 -l snapshot.name=s2 -O raw %s %s/s2.raw", img, dir);
	list(img, before, sizeof(before));

	/* Uncut: the reference run. */
	sh("cp %s %s", img, good);
	struct crash_run r = crash_once(good, op, arg, 0, 0, false, 0);
	CHECK(r.ret == 0, "%s: live %s failed: %s", name, opname, strerror(-r.ret));
	CHECK(sh("qemu-img check -q %s", good) == 0, "%s: not clean after the %s", name, opname);
	list(good, after, sizeof(after));
	CHECK(strcmp(before, after), "%s: the snapshot list did not change", name);
	sh("qemu-img convert -f qcow2 -O raw %s %s/active.raw && cp %s/active.raw %s/new.raw", good,
	   dir, dir, dir);

	unsigned long total = r.during, step = MAX(1ul, DIV_ROUND_UP(total, 5)), leaky = 0, flagless = 0, n;
	unsigned cuts = 0;
	for (n = 1; n <= total; n += step, cuts++) {
		bool reorder = cuts & 1;
		sh("cp %s %s", img, cut);
		crash_once(cut, op, arg, r.before, n, reorder, n * 7919 + 1);
		int rc = sh("qemu-img check %s >%s/chk.out 2>&1", cut, dir);
		int other = sh("grep -E '^(ERROR|Warning)' %s/chk.out | grep -vqE "
			       "'^ERROR OFLAG_COPIED (data|L2) cluster: .* refcount=1$'", dir);
		CHECK((rc == 0 || rc == 2 || rc == 3) && other != 0,
		      "%s: %s cut at %lu of %lu (%s): qemu-img check exit %d", name, opname, n, total,
		      reorder ? "power cut" : "kill -9", rc);
		if (other == 0 || (rc != 0 && rc != 2 && rc != 3))
			sh("head -8 %s/chk.out >&2", dir);
		leaky += sh("grep -q 'leaked clusters' %s/chk.out", dir) == 0;
		flagless += rc == 2;
		CHECK(rc == 0 || sh("qemu-img check -q -r all %s >/dev/null 2>&1; qemu-img check -q %s",
				    cut, cut) == 0,
		      "%s: cut at %lu: not clean after qemu-img check -r all", name, n);
		list(cut, now, sizeof(now));
		CHECK(!strcmp(now, before) || !strcmp(now, after),
		      "%s: cut at %lu: snapshots '%s', neither '%s' nor '%s'", name, n, now, before,
		      after);
		for (size_t i = 0; i < ARRAY_SIZE(snaps); i++) {
			char pat[64], raw[600];
			snprintf(pat, sizeof(pat), "%s ", snaps[i]);
			if (!strstr(now, pat))
				continue;
			snprintf(raw, sizeof(raw), "%s/%s.raw", dir, snaps[i]);
			CHECK(same_raw(cut, snaps[i], raw), "%s: cut at %lu: snapshot %s damaged", name,
			      n, snaps[i]);
		}
		snprintf(now, sizeof(now), "%s/active.raw", dir);
		CHECK(same_raw(cut, NULL, now), "%s: cut at %lu: the active layer changed", name, n);
	}
	printf("ok %s: live %s, %u cuts (kill -9 and power cut) over %lu writes and flushes; "
	       "with leaks: %lu, with refcount-1 entries lacking OFLAG_COPIED: %lu (%.1f s)\n", name,
	       opname, cuts, total, leaky, flagless, now_s() - t0);
	sh("rm -f %s %s %s %s/*.raw", img, good, cut, dir);
}

int main(void)
{
	log_set_prog("test_snapshot_live");
	if (sh("qemu-img --version >/dev/null 2>&1 && qemu-io --version >/dev/null 2>&1")) {
		printf("qemu-img/qemu-io missing: skip\n");
		return 77;
	}
	if (!mkdtemp(dir))
		return 1;

	load_case("load-64k", "cluster_size=65536", 0, true);
	/* Every request writes its metadata (and sleeps doing so, under the
	 * lock, if slow): fast writes only. */
	load_case("load-4k-crash-safe", "cluster_size=4096", BDRV_O_CRASH_SAFE, false);
	load_case("load-v2", "cluster_size=65536,compat=0.10", 0, true);

	crash_case("crash-create", "cluster_size=65536", BDRV_SNAPSHOT_CREATE, "new");
	crash_case("crash-delete", "cluster_size=65536", BDRV_SNAPSHOT_DELETE, "s1");
	crash_case("crash-create-512", "cluster_size=512,compat=0.10", BDRV_SNAPSHOT_CREATE, "new");

	sh("rm -rf %s", dir);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
