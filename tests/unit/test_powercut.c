/* SPDX-License-Identifier: MIT */
/*
 * Power cuts at scale: a crash-state simulator for the qcow2 driver.
 *
 * Recording.  Each scenario prepares an image with qemu-img in /dev/shm,
 * opens it through bdrv_open() with the file on the io_fault backend in
 * recording mode (everything passes through to the file), and runs a
 * list of guest requests from NCORO coroutines at once, so requests
 * overlap in time (never on the same guest bytes: their result would
 * not be defined).  The log holds every write (with its data),
 * fallocate, truncate and flush the driver issued, each stamped with the
 * clock ticks of its start and completion; guest requests are stamped on
 * the same clock.  bdrv_close() is the last guest "flush".
 *
 * Crash states.  A crash point P cuts the log: the events with a tick
 * below P happened (half the points are drawn anywhere, half just before
 * an fdatasync completes).  Let F be the flush that completed before P
 * with the latest start; a flush guarantees exactly the writes that
 * completed before it started.  The state is the initial image, plus
 * every write that completed before F started (in completion order),
 * plus, of the writes issued before P and not so covered, a random
 * subset: each one absent, whole, or torn at 512-byte sectors (every
 * sector of it present or not independently); fallocate likewise,
 * truncate whole or absent.  Every state must pass:
 *   - `qemu-img check`: exit 0 or 3 (leaked clusters are allowed,
 *     corruption never);
 *   - `qemu-img convert -O raw`: let G be the guest flush that completed
 *     before P with the latest start; every guest byte written (or
 *     zeroed, or discarded as a whole cluster) by a request acknowledged
 *     before G started, and not touched by any request issued before P
 *     that is not so covered, reads back exactly (a byte model of the
 *     guest plus a mask of bytes whose content is unknown);
 *   - with an internal snapshot: it still reads back as it was made;
 *   - with a resize (growth) among the requests, running while others
 *     write: the image has the old or the new size, the new one if the
 *     resize was acknowledged before G started, the old one if it had not
 *     started by P; the grown range reads as zeros where no covered
 *     request wrote.
 * The whole log of a healthy run must rebuild the very file the driver
 * left (a check of the simulator itself), check with exit 0 and read
 * back every byte.
 *
 * sticky-*: the same, with io_fault failing exactly the Nth fdatasync
 * (once; the backend passes later ones through).  A request in flight
 * when it failed must fail, no flush that had not completed by then may
 * succeed, no fdatasync may reach the file after it, bdrv_close must
 * fail, and crash states cut after the failure must show no corruption.
 *
 * Speed: one recording serves up to ROUND_STATES crash points (more
 * states per scenario take more recordings with other seeds).  States
 * are built in crash-point order from an incrementally maintained image
 * of the guaranteed writes, and QUBLK_JOBS (default 2) states are
 * checked at once by qemu-img processes spawned directly.
 *
 * Usage: test_powercut [STATES]   total crash states (default 1000,
 *                                 300 in the ASan build), split evenly
 *                                 over the scenarios, plus one end state
 *                                 per recording
 * Environment: QUBLK_SEED=N (the seed, printed), QUBLK_ONLY=LABEL[:K]
 * (one recording, or one of its states), QUBLK_KEEP=1 (keep the scratch
 * directory and the failing states' images), QUBLK_JOBS=N.  Workloads
 * and crash choices follow the seed; the interleaving of I/O completions
 * comes from the kernel, so a replay may cut a slightly different log:
 * the kept image is the exact failing state.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/coro.h"
#include "common/io_fault.h"
#include "common/util.h"

#include "check.h"

extern char **environ;

#define NCORO 8
#define SECTOR 512u
#define MAX_JOBS 8
#define ROUND_STATES 500
#ifdef QUBLK_ASAN
#define DEFAULT_STATES 300
#else
#define DEFAULT_STATES 1000
#endif

static char dir[] = "/dev/shm/qublk-powercut-XXXXXX";
static const char *argv0;
static unsigned long total_states;
static uint64_t seed;
static bool keep_files, kept_failure;

/* ---- random numbers ------------------------------------------------------ */

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t rnd(uint64_t *s)
{
	*s += 0x9e3779b97f4a7c15ull;
	return mix(*s);
}

static uint64_t name_hash(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ull;

	while (*s)
		h = (h ^ (unsigned char)*s++) * 0x100000001b3ull;
	return h;
}

static void fill_random(uint64_t *s, unsigned char *p, size_t len)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = rnd(s);
		memcpy(p + i, &v, MIN((size_t)8, len - i));
	}
}

/* ---- helpers ------------------------------------------------------------- */

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int n, st;

	n = snprintf(cmd, sizeof(cmd), "cd %s && (", dir);
	va_start(ap, fmt);
	vsnprintf(cmd + n, sizeof(cmd) - n, fmt, ap);
	va_end(ap);
	strncat(cmd, ")", sizeof(cmd) - strlen(cmd) - 1);
	st = system(cmd);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}

/* Read a whole file into a new buffer of at least @min bytes (zero-padded). */
static unsigned char *slurp(const char *path, uint64_t min, uint64_t *size)
{
	struct stat st;
	unsigned char *p;
	int fd = open(path, O_RDONLY);

	if (fd < 0 || fstat(fd, &st)) {
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	*size = st.st_size;
	p = calloc(1, MAX(min, *size) + 1);
	if (p && pread(fd, p, *size, 0) != (ssize_t)*size) {
		free(p);
		p = NULL;
	}
	close(fd);
	return p;
}

static int read_exact(const char *path, unsigned char *buf, uint64_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = pread(fd, buf, len, 0);
	close(fd);
	return n == (ssize_t)len ? 0 : -EIO;
}

static bool same_file(const char *path, const unsigned char *buf, uint64_t len)
{
	uint64_t size;
	unsigned char *p = slurp(path, 0, &size);
	bool same = p && size == len && !memcmp(p, buf, len);

	free(p);
	return same;
}

/* Start @argv with stdout and stderr on /dev/null.  Returns the pid or -1. */
static pid_t spawn_quiet(char *const argv[])
{
	posix_spawn_file_actions_t fa;
	pid_t pid;
	int ret;

	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_adddup2(&fa, 1, 2);
	ret = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	return ret ? -1 : pid;
}

/* ---- the guest workload -------------------------------------------------- */

enum op_kind { OP_WRITE, OP_ZERO, OP_ZERO_UNMAP, OP_DISCARD, OP_FLUSH, OP_BARRIER, OP_CLOSE,
	       OP_RESIZE };

struct op {
	enum op_kind kind;
	uint64_t off, len;          /* OP_RESIZE: the new size in off */
	unsigned char *data;        /* OP_WRITE */
	uint64_t start, done;       /* log clock; IO_FAULT_NOT_DONE if it never ran */
	int result;
};

struct sim {
	const struct scenario *sc;
	uint64_t size;              /* virtual size (the grown one with a resize) */
	uint64_t old_size;          /* before the resize (= size without one) */
	unsigned cluster;
	uint64_t rng;
	struct op *ops;
	size_t nops, cap;
	/* Running: the next op to take, the ops in flight, the waiters. */
	size_t next;
	struct op *inflight[NCORO];
	unsigned busy, live;
	struct co_queue wait, done;
	struct bdrv *bs;
	struct io_fault_log log;
	int setup_err;
};

static struct op *add_op(struct sim *m, enum op_kind kind, uint64_t off, uint64_t len)
{
	struct op *op;

	if (m->nops == m->cap) {
		size_t cap = m->cap ? 2 * m->cap : 256;
		struct op *n = realloc(m->ops, cap * sizeof(*n));
		if (!n)
			abort();
		m->ops = n;
		m->cap = cap;
	}
	op = &m->ops[m->nops++];
	*op = (struct op){ .kind = kind, .off = off, .len = len, .start = IO_FAULT_NOT_DONE,
			   .done = IO_FAULT_NOT_DONE };
	if (kind == OP_WRITE) {
		op->data = malloc(len);
		if (!op->data)
			abort();
		fill_random(&m->rng, op->data, len);
	}
	return op;
}

static bool is_data(const struct op *op)
{
	return op->kind == OP_WRITE || op->kind == OP_ZERO || op->kind == OP_ZERO_UNMAP ||
	       op->kind == OP_DISCARD;
}

static bool is_flush(const struct op *op)
{
	return op->kind == OP_FLUSH || op->kind == OP_CLOSE;
}

/* A resize in flight owns the range it adds: nothing may go there before
 * it is done (the block layer refuses it until then). */
static bool conflicts(const struct sim *m, const struct op *op)
{
	if (!is_data(op))
		return false;
	for (unsigned i = 0; i < NCORO; i++) {
		const struct op *o = m->inflight[i];
		if (o && is_data(o) && o->off < op->off + op->len && op->off < o->off + o->len)
			return true;
		if (o && o->kind == OP_RESIZE && op->off + op->len > m->old_size)
			return true;
	}
	return false;
}

static int issue(struct sim *m, struct op *op)
{
	switch (op->kind) {
	case OP_WRITE:
		return bdrv_co_pwrite(m->bs, op->off, op->len, op->data, 0);
	case OP_ZERO:
		return bdrv_co_pwrite_zeroes(m->bs, op->off, op->len, 0);
	case OP_ZERO_UNMAP:
		return bdrv_co_pwrite_zeroes(m->bs, op->off, op->len, BDRV_REQ_MAY_UNMAP);
	case OP_DISCARD:
		return bdrv_co_discard(m->bs, op->off, op->len);
	case OP_FLUSH:
		return bdrv_co_flush(m->bs);
	case OP_RESIZE:
		return bdrv_truncate(m->bs, op->off, 0);
	default:
		return -EINVAL;
	}
}

/* One of NCORO workers: take ops in list order; an op waits while it
 * overlaps one in flight, a barrier until nothing is in flight. */
static void worker_fn(void *opaque)
{
	struct sim *m = opaque;

	for (;;) {
		struct op *op = NULL;
		unsigned slot = 0;

		while (m->next < m->nops) {
			op = &m->ops[m->next];
			if (op->kind == OP_BARRIER ? m->busy == 0 : !conflicts(m, op))
				break;
			co_queue_wait(&m->wait);
		}
		if (m->next >= m->nops)
			break;
		m->next++;
		if (op->kind == OP_BARRIER)
			continue;
		while (m->inflight[slot])
			slot++;
		m->inflight[slot] = op;
		m->busy++;
		op->start = io_fault_log_clock(&m->log);
		op->result = issue(m, op);
		op->done = io_fault_log_clock(&m->log);
		m->inflight[slot] = NULL;
		m->busy--;
		co_queue_wake_all(&m->wait);
	}
	if (--m->live == 0)
		co_queue_wake_all(&m->done);
}

static void run_fn(void *opaque)
{
	struct sim *m = opaque;
	struct coro *co[NCORO];

	m->live = NCORO;
	for (int i = 0; i < NCORO; i++) {
		co[i] = coro_new(worker_fn, m, 0);
		if (!co[i])
			abort();
		aio_schedule(co[i]);
	}
	while (m->live)
		co_queue_wait(&m->done);
	for (int i = 0; i < NCORO; i++)
		coro_free(co[i]);
}

/* ---- scenarios ----------------------------------------------------------- */

struct scenario {
	const char *name;
	/* Shell command run in the scratch directory: makes img.qcow2 (of
	 * @size bytes); seed.raw (@size bytes of mixed content) is there. */
	const char *create;
	uint64_t size;
	unsigned cluster;
	uint64_t l2_cache, rc_cache;        /* bytes, 0 = driver default */
	void (*gen)(struct sim *m);
	unsigned long fail_flush;           /* sticky: fail this fdatasync */
	bool snapshot;                      /* has snapshot s1 of the initial content */
	uint64_t grow_to;                   /* the workload resizes the image to this */
};

static uint64_t rnd_below(struct sim *m, uint64_t n) { return rnd(&m->rng) % n; }

/* A random range of 1..@max bytes; aligned to @align when nonzero. */
static void rnd_range(struct sim *m, uint64_t max, uint64_t align, uint64_t lo, uint64_t hi,
		      uint64_t *off, uint64_t *len)
{
	uint64_t l = 1 + rnd_below(m, max), o;

	if (align)
		l = ALIGN_UP(l, align);
	l = MIN(l, hi - lo);
	o = lo + rnd_below(m, hi - lo - l + 1);
	if (align)
		o = ALIGN_DOWN(o, align);
	*off = o;
	*len = l;
}

/* A mix in [0, @hi): writes (unaligned and cluster-aligned), write-zeroes
 * with and without unmap, discards, flushes.  Weights out of 100. */
static void gen_mix_below(struct sim *m, uint64_t hi, unsigned nops, uint64_t max_len,
			  unsigned w_zero, unsigned w_discard, unsigned w_flush)
{
	for (unsigned i = 0; i < nops; i++) {
		unsigned k = (unsigned)rnd_below(m, 100);
		uint64_t align = (rnd(&m->rng) & 1) ? m->cluster : 0;
		uint64_t off, len;

		rnd_range(m, max_len, align, 0, hi, &off, &len);
		if (k < w_flush)
			add_op(m, OP_FLUSH, 0, 0);
		else if (k < w_flush + w_zero)
			add_op(m, (rnd(&m->rng) & 1) ? OP_ZERO_UNMAP : OP_ZERO, off, len);
		else if (k < w_flush + w_zero + w_discard)
			add_op(m, OP_DISCARD, off, len);
		else
			add_op(m, OP_WRITE, off, len);
	}
}

static void gen_mix(struct sim *m, unsigned nops, uint64_t max_len, unsigned w_zero,
		    unsigned w_discard, unsigned w_flush)
{
	gen_mix_below(m, m->size, nops, max_len, w_zero, w_discard, w_flush);
	add_op(m, OP_FLUSH, 0, 0);
}

static void gen_alloc(struct sim *m) { gen_mix(m, 160, 150 << 10, 8, 4, 12); }
static void gen_new_l2(struct sim *m)
{
	/* 1 KiB clusters: an L2 table maps 128 KiB; spread small writes. */
	for (unsigned i = 0; i < 160; i++) {
		if (i % 10 == 9)
			add_op(m, OP_FLUSH, 0, 0);
		uint64_t off, len;
		rnd_range(m, 12 << 10, 0, 0, m->size, &off, &len);
		add_op(m, OP_WRITE, off, len);
	}
	add_op(m, OP_FLUSH, 0, 0);
}
static void gen_refblocks(struct sim *m) { gen_mix(m, 300, 12 << 10, 4, 2, 8); }
static void gen_cow(struct sim *m) { gen_mix(m, 140, 24 << 10, 12, 8, 12); }
static void gen_discard(struct sim *m) { gen_mix(m, 140, 200 << 10, 4, 40, 12); }
static void gen_zeroes(struct sim *m) { gen_mix(m, 140, 200 << 10, 45, 0, 12); }

/*
 * Refcount-table growth after frees: fill [0, @fill) with @chunk writes,
 * free @nfree scattered single clusters (write-zeroes + MAY_UNMAP), flush,
 * then write [@fill, @fill + @more): the file crosses the table's
 * coverage while the allocator has holes behind it.
 */
static void gen_growth(struct sim *m, uint64_t fill, uint64_t more, uint64_t chunk,
		       unsigned nfree)
{
	for (uint64_t off = 0; off < fill; off += chunk)
		add_op(m, OP_WRITE, off, MIN(chunk, fill - off));
	add_op(m, OP_FLUSH, 0, 0);
	add_op(m, OP_BARRIER, 0, 0);
	for (unsigned i = 0; i < nfree; i++)
		add_op(m, OP_ZERO_UNMAP, rnd_below(m, fill / m->cluster) * m->cluster, m->cluster);
	add_op(m, OP_FLUSH, 0, 0);
	add_op(m, OP_BARRIER, 0, 0);
	for (uint64_t off = fill; off < fill + more; off += chunk) {
		add_op(m, OP_WRITE, off, MIN(chunk, fill + more - off));
		if ((off / chunk) % 16 == 15)
			add_op(m, OP_FLUSH, 0, 0);
	}
	add_op(m, OP_FLUSH, 0, 0);
}

/* 512 B clusters, refcount_bits=64: a refcount block covers 32 KiB of
 * file and the one-cluster table 2 MiB. */
static void gen_growth_rc64(struct sim *m) { gen_growth(m, 1800 << 10, 1 << 20, 16 << 10, 60); }
/* The reported recipe: 512 B clusters, 16 MiB image, 7 MiB in 32 KiB
 * writes, 300 single clusters freed, flush, 2 MiB more. */
static void gen_growth_hole(struct sim *m) { gen_growth(m, 7 << 20, 2 << 20, 32 << 10, 300); }

/* Growth under writes: a mix in the old size, the resize (the L1 table
 * moves: 512 B clusters, 4 MiB -> 12 MiB is 2 -> 6 L1 clusters) with the
 * mix going on below the old size while it runs, then writes everywhere,
 * the grown range included. */
static void gen_resize(struct sim *m)
{
	gen_mix_below(m, m->old_size, 50, 24 << 10, 8, 6, 10);
	add_op(m, OP_RESIZE, m->size, 0);
	gen_mix_below(m, m->old_size, 40, 24 << 10, 8, 6, 10);
	gen_mix_below(m, m->size, 80, 48 << 10, 8, 6, 10);
	add_op(m, OP_FLUSH, 0, 0);
}

/* Allocating writes with frequent flushes, for the sticky-flush runs. */
static void gen_sticky(struct sim *m) { gen_mix(m, 120, 40 << 10, 8, 4, 20); }

#define CREATE_EMPTY(opts, size) "qemu-img create -q -f qcow2 -o " opts " img.qcow2 " #size
#define CREATE_DATA(opts) "qemu-img convert -q -f raw -O qcow2 -o " opts " seed.raw img.qcow2"

static const struct scenario scenarios[] = {
	{ .name = "alloc-empty", .size = 8 << 20, .cluster = 65536, .gen = gen_alloc,
	  .create = CREATE_EMPTY("cluster_size=65536", 8388608) },
	{ .name = "alloc-empty-v2", .size = 4 << 20, .cluster = 4096, .gen = gen_alloc,
	  .create = CREATE_EMPTY("cluster_size=4096,compat=0.10", 4194304) },
	{ .name = "new-l2", .size = 8 << 20, .cluster = 1024, .gen = gen_new_l2,
	  .create = CREATE_EMPTY("cluster_size=1024", 8388608) },
	/* 16-slice caches: L2 and refcount evictions too. */
	{ .name = "new-refblocks", .size = 8 << 20, .cluster = 512, .gen = gen_refblocks,
	  .l2_cache = 1, .rc_cache = 1,
	  .create = CREATE_EMPTY("cluster_size=512", 8388608) },
	{ .name = "reftable-growth", .size = 4 << 20, .cluster = 512, .gen = gen_growth_rc64,
	  .create = CREATE_EMPTY("cluster_size=512,refcount_bits=64", 4194304) },
	{ .name = "reftable-growth-hole", .size = 16 << 20, .cluster = 512, .gen = gen_growth_hole,
	  .create = CREATE_EMPTY("cluster_size=512", 16777216) },
	{ .name = "snapshot-cow", .size = 4 << 20, .cluster = 4096, .gen = gen_cow,
	  .snapshot = true,
	  .create = CREATE_DATA("cluster_size=4096") " && qemu-img snapshot -c s1 img.qcow2" },
	{ .name = "compressed-cow", .size = 4 << 20, .cluster = 65536, .gen = gen_cow,
	  .create = "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=65536 "
		    "seed.raw img.qcow2" },
	{ .name = "discard", .size = 4 << 20, .cluster = 65536, .gen = gen_discard,
	  .create = CREATE_DATA("cluster_size=65536") },
	{ .name = "write-zeroes", .size = 4 << 20, .cluster = 4096, .gen = gen_zeroes,
	  .create = CREATE_DATA("cluster_size=4096") },
	{ .name = "write-zeroes-v2", .size = 4 << 20, .cluster = 65536, .gen = gen_zeroes,
	  .create = CREATE_DATA("cluster_size=65536,compat=0.10") },
	{ .name = "resize", .size = 4 << 20, .grow_to = 12 << 20, .cluster = 512,
	  .gen = gen_resize, .create = CREATE_DATA("cluster_size=512") },
	/* Last: the sticky runs copy it with fail_flush set (see main). */
	{ .name = "sticky", .size = 8 << 20, .cluster = 4096, .gen = gen_sticky,
	  .create = CREATE_EMPTY("cluster_size=4096", 8388608) },
};

/* The fdatasync each sticky run fails (1-based). */
static const unsigned long sticky_fail[] = { 1, 3, 7, 14, 24, 36 };

/* seed.raw: 4 KiB chunks of zeros, of a repeated 16-byte motif
 * (compressible) and of random bytes. */
static int make_seed_raw(uint64_t size, uint64_t s)
{
	char path[256];
	unsigned char *p = malloc(size);
	FILE *f;
	size_t n;

	if (!p)
		return -ENOMEM;
	for (uint64_t c = 0; c < size; c += 4096) {
		unsigned k = (unsigned)(rnd(&s) % 4);
		if (k == 0) {
			memset(p + c, 0, 4096);
		} else if (k == 3) {
			fill_random(&s, p + c, 4096);
		} else {
			unsigned char motif[16];
			fill_random(&s, motif, sizeof(motif));
			for (unsigned i = 0; i < 4096; i += 16)
				memcpy(p + c + i, motif, 16);
		}
	}
	snprintf(path, sizeof(path), "%s/seed.raw", dir);
	f = fopen(path, "wb");
	n = f ? fwrite(p, 1, size, f) : 0;
	if (f && fclose(f))
		n = 0;
	free(p);
	return n == size ? 0 : -EIO;
}

/* ---- the recording ------------------------------------------------------- */

static int wrap_record(struct io_file *f, struct io_file **out, void *opaque)
{
	struct sim *m = opaque;
	struct io_fault_cfg c = { .log = &m->log, .fail_flush = m->sc->fail_flush };

	return io_fault_wrap(f, &c, out);
}

static void record(struct sim *m, const char *img)
{
	struct bdrv_opts o = { .format = "qcow2", .l2_cache_size = m->sc->l2_cache,
			       .refcount_cache_size = m->sc->rc_cache,
			       .wrap_file = wrap_record, .wrap_opaque = m };
	struct op *close_op;
	int ret;

	ret = bdrv_open(img, &o, &m->bs);
	CHECK(ret == 0, "%s: bdrv_open: %s", m->sc->name, strerror(-ret));
	if (ret < 0) {
		m->setup_err = ret;
		return;
	}
	ret = aio_run_coroutine(run_fn, m);
	CHECK(ret == 0, "%s: aio_run_coroutine: %s", m->sc->name, strerror(-ret));
	close_op = add_op(m, OP_CLOSE, 0, 0);
	close_op->start = io_fault_log_clock(&m->log);
	close_op->result = bdrv_close(m->bs);
	close_op->done = io_fault_log_clock(&m->log);
	m->bs = NULL;
	CHECK(m->log.error == 0, "%s: the log lost records: %s", m->sc->name,
	      strerror(-m->log.error));
}

/* ---- crash states -------------------------------------------------------- */

/* The image of the guaranteed writes, advanced in crash-point order. */
struct base {
	unsigned char *buf;
	uint64_t size, cap;
	size_t applied;             /* prefix of by_done[] applied */
	uint64_t fstart;            /* writes done before this tick are in */
};

/* The guest content acknowledged before a guest flush, likewise. */
struct model {
	unsigned char *content, *known;
	size_t applied;             /* prefix of ops_by_done[] applied */
	uint64_t acked_before;      /* requests done before this tick are in */
};

struct slot {
	bool busy;
	pid_t pid;
	int stage;                  /* STAGE_* */
	unsigned long k;            /* state index */
	uint64_t P, acked_before;   /* the crash point, its guest guarantee */
	char img[300], raw[300], snap[300];
	unsigned char *back, *touched;
};

enum { STAGE_CHECK, STAGE_CONVERT, STAGE_SNAPSHOT };

struct run {
	struct sim *m;
	const char *label;          /* scenario name, or sticky-N */
	unsigned char *init;        /* the initial image file */
	uint64_t init_size;
	unsigned char *guest0;      /* its guest content */
	unsigned char *final;       /* the image file after bdrv_close */
	uint64_t final_size;
	size_t *by_done;            /* log records (not flushes) by completion */
	size_t nby_done;
	size_t *ops_by_done;        /* data ops by completion */
	size_t nops_by_done;
	struct base base;
	struct model model;
	bool healthy;               /* no injected failure: the end must be clean */
	uint64_t pmin;              /* crash points from here on */
	/* Results. */
	unsigned long states, hist[256], data_bad;
	unsigned long at_old, at_new;       /* states at each size, with a resize */
};

static int rec_done_cmp(const void *a, const void *b, void *recs)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;
	uint64_t dx = ((const struct io_fault_rec *)recs)[x].done;
	uint64_t dy = ((const struct io_fault_rec *)recs)[y].done;

	if (dx != dy)
		return dx < dy ? -1 : 1;
	return x < y ? -1 : x > y;
}

static int op_done_cmp(const void *a, const void *b, void *ops)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;
	uint64_t dx = ((const struct op *)ops)[x].done, dy = ((const struct op *)ops)[y].done;

	if (dx != dy)
		return dx < dy ? -1 : 1;
	return x < y ? -1 : x > y;
}

static void ensure_cap(struct base *b, uint64_t end)
{
	if (end > b->cap) {
		fprintf(stderr, "internal: state extent %llu beyond %llu\n",
			(unsigned long long)end, (unsigned long long)b->cap);
		abort();
	}
}

/* A call the kernel refused before doing anything: tmpfs has no
 * FALLOC_FL_ZERO_RANGE, and the driver then writes zeros instead. */
static bool no_effect(const struct io_fault_rec *r)
{
	return r->kind == IO_FAULT_FALLOCATE &&
	       (r->result == -EOPNOTSUPP || r->result == -EINVAL || r->result == -ENOSYS);
}

/* Apply a whole record to the base image. */
static void base_apply(struct base *b, const struct io_fault_rec *r)
{
	switch (r->kind) {
	case IO_FAULT_WRITE:
		ensure_cap(b, r->off + r->len);
		memcpy(b->buf + r->off, r->data, r->len);
		b->size = MAX(b->size, r->off + r->len);
		break;
	case IO_FAULT_FALLOCATE: {
		uint64_t end = r->off + r->len;
		if (r->mode & FALLOC_FL_KEEP_SIZE)
			end = MIN(end, b->size);
		else
			b->size = MAX(b->size, end);
		ensure_cap(b, end);
		if ((r->mode & (FALLOC_FL_ZERO_RANGE | FALLOC_FL_PUNCH_HOLE)) && end > r->off)
			memset(b->buf + r->off, 0, end - r->off);
		break;
	}
	case IO_FAULT_TRUNCATE:
		ensure_cap(b, r->off);
		if (r->off < b->size)
			memset(b->buf + r->off, 0, b->size - r->off);
		b->size = r->off;
		break;
	default:
		break;
	}
}

/* The latest start of a flush that completed (successfully) before @P. */
static uint64_t flush_guarantee(const struct io_fault_log *log, uint64_t P)
{
	uint64_t best = 0;

	for (size_t i = 0; i < log->n && log->recs[i].start < P; i++) {
		const struct io_fault_rec *r = &log->recs[i];
		if (r->kind == IO_FAULT_FLUSH && r->result == 0 && r->done < P)
			best = MAX(best, r->start);
	}
	return best;
}

/* One past the latest start of a guest flush that completed before @P
 * (0: none did): requests with done < that are durable. */
static uint64_t guest_guarantee(const struct sim *m, uint64_t P)
{
	uint64_t best = 0;

	for (size_t i = 0; i < m->nops; i++) {
		const struct op *op = &m->ops[i];
		if (is_flush(op) && op->result == 0 && op->done != IO_FAULT_NOT_DONE &&
		    op->done <= P)
			best = MAX(best, op->start + 1);
	}
	return best;
}

static void base_advance(struct run *r, uint64_t fstart)
{
	const struct io_fault_log *log = &r->m->log;

	while (r->base.applied < r->nby_done &&
	       log->recs[r->by_done[r->base.applied]].done < fstart)
		base_apply(&r->base, &log->recs[r->by_done[r->base.applied++]]);
	r->base.fstart = fstart;
}

static void model_apply(struct run *r, const struct op *op)
{
	struct model *md = &r->model;
	uint64_t cl = r->m->cluster, s, e;

	switch (op->kind) {
	case OP_WRITE:
		memcpy(md->content + op->off, op->data, op->len);
		memset(md->known + op->off, 1, op->len);
		break;
	case OP_ZERO:
	case OP_ZERO_UNMAP:
		memset(md->content + op->off, 0, op->len);
		memset(md->known + op->off, 1, op->len);
		break;
	case OP_DISCARD:
		/* Whole clusters read as zeros afterwards (no backing file
		 * here); what the partial ones hold is not defined. */
		memset(md->known + op->off, 0, op->len);
		s = ALIGN_UP(op->off, cl);
		e = ALIGN_DOWN(op->off + op->len, cl);
		if (s < e) {
			memset(md->content + s, 0, e - s);
			memset(md->known + s, 1, e - s);
		}
		break;
	default:
		break;
	}
}

static void model_advance(struct run *r, uint64_t acked_before)
{
	while (r->model.applied < r->nops_by_done) {
		const struct op *op = &r->m->ops[r->ops_by_done[r->model.applied]];
		if (op->done >= acked_before)
			break;
		if (op->result == 0)
			model_apply(r, op);
		r->model.applied++;
	}
	r->model.acked_before = acked_before;
}

/* Write the piece [s, e) of record @rec into the state file. */
static int put_piece(int fd, const struct io_fault_rec *rec, uint64_t s, uint64_t e,
		     uint64_t *size)
{
	static const unsigned char zeros[SECTOR];
	const void *src;

	if (rec->kind == IO_FAULT_FALLOCATE) {
		if (rec->mode & FALLOC_FL_KEEP_SIZE)
			e = MIN(e, *size);
		if (s >= e)
			return 0;
		if (!(rec->mode & (FALLOC_FL_ZERO_RANGE | FALLOC_FL_PUNCH_HOLE))) {
			/* Plain allocation: only the size changes. */
			if (e > *size && ftruncate(fd, e))
				return -errno;
			*size = MAX(*size, e);
			return 0;
		}
		/* Zeroed or punched: zeros, a sector at a time. */
		for (uint64_t p = s; p < e; p += SECTOR) {
			size_t n = (size_t)MIN((uint64_t)SECTOR, e - p);
			if (pwrite(fd, zeros, n, p) != (ssize_t)n)
				return -EIO;
		}
		*size = MAX(*size, e);
		return 0;
	}
	src = rec->data + (s - rec->off);
	if (pwrite(fd, src, e - s, s) != (ssize_t)(e - s))
		return -EIO;
	*size = MAX(*size, e);
	return 0;
}

/* Build state @P into @path: the base plus a random subset of the writes
 * not covered by its flush, torn at sectors. */
static int build_state(struct run *r, uint64_t P, uint64_t *rs, const char *path,
		       unsigned long *noptional)
{
	const struct io_fault_log *log = &r->m->log;
	size_t *opt = NULL, nopt = 0;
	uint64_t size = r->base.size;
	int fd, ret = 0;

	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return -errno;
	if (size && write(fd, r->base.buf, size) != (ssize_t)size)
		ret = -EIO;
	opt = malloc(sizeof(*opt) * (log->n + 1));
	if (!opt)
		ret = -ENOMEM;
	for (size_t i = 0; !ret && i < log->n && log->recs[i].start < P; i++) {
		const struct io_fault_rec *rec = &log->recs[i];
		if (rec->kind != IO_FAULT_FLUSH && rec->done >= r->base.fstart && !no_effect(rec))
			opt[nopt++] = i;
	}
	/* Completion order; calls still in flight at P after them. */
	if (opt)
		qsort_r(opt, nopt, sizeof(*opt), rec_done_cmp, log->recs);
	for (size_t j = 0; !ret && j < nopt; j++) {
		const struct io_fault_rec *rec = &log->recs[opt[j]];
		unsigned how = (unsigned)(rnd(rs) % 3);   /* absent, whole, torn */

		if (how == 0)
			continue;
		if (rec->kind == IO_FAULT_TRUNCATE) {
			if (ftruncate(fd, rec->off))
				ret = -errno;
			size = rec->off;
			continue;
		}
		for (uint64_t s = rec->off; !ret && s < rec->off + rec->len;) {
			uint64_t e = MIN(ALIGN_DOWN(s, (uint64_t)SECTOR) + SECTOR,
					 rec->off + rec->len);
			uint64_t pe = e;
			if (how == 2) {
				/* Torn: each sector present or not. */
				if (!(rnd(rs) & 1)) {
					s = e;
					continue;
				}
			} else {
				pe = rec->off + rec->len;
			}
			ret = put_piece(fd, rec, s, pe, &size);
			s = pe;
		}
	}
	*noptional = nopt;
	free(opt);
	if (close(fd) && !ret)
		ret = -errno;
	return ret;
}

static void report_failure(struct run *r, struct slot *sl, const char *what)
{
	char cmd[1024];

	fprintf(stderr, "FAIL %s state %lu (crash point %llu of %llu): %s\n", r->label, sl->k,
		(unsigned long long)sl->P, (unsigned long long)r->m->log.clock, what);
	fprintf(stderr, "  replay: QUBLK_SEED=%llu QUBLK_ONLY=%s:%lu QUBLK_KEEP=1 %s %lu\n",
		(unsigned long long)seed, r->label, sl->k, argv0, total_states);
	if (keep_files) {
		snprintf(cmd, sizeof(cmd), "%s/fail-%s-%lu.qcow2", dir, r->label, sl->k);
		if (rename(sl->img, cmd) == 0) {
			fprintf(stderr, "  kept: %s\n", cmd);
			kept_failure = true;
		}
	}
}

/* qemu-img check failed: show what it found. */
static void show_check(const char *img)
{
	char cmd[600];

	snprintf(cmd, sizeof(cmd), "qemu-img check %s 2>&1 | head -25 >&2", img);
	if (system(cmd)) {}
}

/* The virtual size state @sl may have: a resize not yet started at P
 * left the old one, one acknowledged before the guest flush that covers
 * P made the new one durable; in between either.  Returns 0 or the
 * message in @what. */
static int check_size(struct run *r, struct slot *sl, uint64_t size, char *what, size_t len)
{
	struct sim *m = r->m;

	for (size_t i = 0; i < m->nops; i++) {
		const struct op *op = &m->ops[i];
		if (op->kind != OP_RESIZE)
			continue;
		if ((op->start == IO_FAULT_NOT_DONE || op->start >= sl->P) && size != m->old_size)
			snprintf(what, len, "size %llu before the resize started",
				 (unsigned long long)size);
		else if (op->result == 0 && op->done < sl->acked_before && size != m->size)
			snprintf(what, len, "size %llu after a flushed resize to %llu",
				 (unsigned long long)size, (unsigned long long)m->size);
		else if (size != m->old_size && size != m->size)
			snprintf(what, len, "size %llu (neither %llu nor %llu)",
				 (unsigned long long)size, (unsigned long long)m->old_size,
				 (unsigned long long)m->size);
		else
			return 0;
		return -1;
	}
	if (size == m->size)
		return 0;
	snprintf(what, len, "size %llu, expected %llu", (unsigned long long)size,
		 (unsigned long long)m->size);
	return -1;
}

static void compare_state(struct run *r, struct slot *sl)
{
	struct sim *m = r->m;
	uint64_t size = 0, bad = UINT64_MAX, nbad = 0;
	char what[256];
	struct stat st;

	if (stat(sl->raw, &st) == 0)
		size = (uint64_t)st.st_size;
	if (check_size(r, sl, size, what, sizeof(what)) < 0) {
		CHECK(0, "%s state %lu: %s", r->label, sl->k, what);
		report_failure(r, sl, what);
		return;
	}
	if (read_exact(sl->raw, sl->back, size) < 0) {
		CHECK(0, "%s state %lu: reading the converted image", r->label, sl->k);
		return;
	}
	if (m->old_size != m->size) {
		r->at_old += size == m->old_size;
		r->at_new += size == m->size;
	}
	/* Bytes of requests that were issued before P and are not covered
	 * by the guest flush: anything may be there. */
	memset(sl->touched, 0, size);
	for (size_t i = 0; i < m->nops; i++) {
		const struct op *op = &m->ops[i];
		if (!is_data(op) || op->start == IO_FAULT_NOT_DONE || op->start >= sl->P)
			continue;
		if (op->result == 0 && op->done < sl->acked_before)
			continue;
		if (op->off < size)
			memset(sl->touched + op->off, 1, MIN(op->len, size - op->off));
	}
	for (uint64_t c = 0; c < size; c += 4096) {
		uint64_t n = MIN((uint64_t)4096, size - c);
		if (!memcmp(sl->back + c, r->model.content + c, n))
			continue;
		for (uint64_t i = c; i < c + n; i++) {
			if (sl->back[i] != r->model.content[i] && r->model.known[i] &&
			    !sl->touched[i]) {
				if (bad == UINT64_MAX)
					bad = i;
				nbad++;
			}
		}
	}
	if (bad == UINT64_MAX) {
		CHECK(1);
		return;
	}
	r->data_bad++;
	snprintf(what, sizeof(what),
		 "%llu flushed guest bytes differ, first at %llu (read %#x, expected %#x)",
		 (unsigned long long)nbad, (unsigned long long)bad, sl->back[bad],
		 r->model.content[bad]);
	CHECK(0, "%s state %lu: %s", r->label, sl->k, what);
	report_failure(r, sl, what);
}

static int start_stage(struct slot *sl, int stage)
{
	char *check[] = { "qemu-img", "check", "-q", "-f", "qcow2", sl->img, NULL };
	char *convert[] = { "qemu-img", "convert", "-f", "qcow2", "-O", "raw", sl->img, sl->raw,
			    NULL };
	char *snap[] = { "qemu-img", "convert", "-l", "snapshot.name=s1", "-f", "qcow2", "-O",
			 "raw", sl->img, sl->snap, NULL };
	char **argv = stage == STAGE_CHECK ? check : stage == STAGE_CONVERT ? convert : snap;

	sl->stage = stage;
	sl->pid = spawn_quiet(argv);
	return sl->pid < 0 ? -EIO : 0;
}

/* The internal snapshot still holds the initial guest content. */
static void compare_snapshot(struct run *r, struct slot *sl)
{
	uint64_t size = r->m->size, i;
	char what[160];

	if (read_exact(sl->snap, sl->back, size) < 0) {
		CHECK(0, "%s state %lu: reading the converted snapshot", r->label, sl->k);
		return;
	}
	if (!memcmp(sl->back, r->guest0, size)) {
		CHECK(1);
		return;
	}
	for (i = 0; sl->back[i] == r->guest0[i]; i++)
		;
	r->data_bad++;
	snprintf(what, sizeof(what), "snapshot s1 changed at %llu (read %#x, expected %#x)",
		 (unsigned long long)i, sl->back[i], r->guest0[i]);
	CHECK(0, "%s state %lu: %s", r->label, sl->k, what);
	report_failure(r, sl, what);
}

static unsigned njobs = 2;
static struct slot slots[MAX_JOBS];

/* Wait for one qemu-img to finish and move its state on. */
static void reap_one(struct run *r)
{
	int st, rc;
	pid_t pid = waitpid(-1, &st, 0);
	struct slot *sl = NULL;
	bool final;
	int next;
	char what[128];

	for (unsigned i = 0; i < njobs; i++)
		if (slots[i].busy && slots[i].pid == pid)
			sl = &slots[i];
	if (!sl)
		return;
	rc = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
	final = sl->P == r->m->log.clock;
	if (sl->stage == STAGE_CHECK) {
		r->hist[rc & 255]++;
		/* Leaks are allowed after a crash, not after a clean close. */
		bool ok = rc == 0 || (rc == 3 && !(final && r->healthy));
		CHECK(ok, "%s state %lu: qemu-img check exit %d", r->label, sl->k, rc);
		if (!ok) {
			show_check(sl->img);
			snprintf(what, sizeof(what), "qemu-img check exit %d%s", rc,
				 rc == 3 ? " (leaks after a clean close)" : "");
			report_failure(r, sl, what);
			sl->busy = false;
			return;
		}
		next = STAGE_CONVERT;
	} else {
		CHECK(rc == 0, "%s state %lu: qemu-img convert exit %d", r->label, sl->k, rc);
		if (rc == 0 && sl->stage == STAGE_CONVERT)
			compare_state(r, sl);
		else if (rc == 0)
			compare_snapshot(r, sl);
		next = rc == 0 && sl->stage == STAGE_CONVERT && r->m->sc->snapshot ? STAGE_SNAPSHOT
										  : -1;
	}
	if (next >= 0 && start_stage(sl, next) < 0) {
		CHECK(0, "%s state %lu: spawning qemu-img", r->label, sl->k);
		next = -1;
	}
	if (next < 0)
		sl->busy = false;
}

static unsigned busy_slots(void)
{
	unsigned n = 0;

	for (unsigned i = 0; i < njobs; i++)
		n += slots[i].busy;
	return n;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Build and check @n crash states (plus the end of the log); only state
 * @only when it is not ULONG_MAX. */
static void crash_states(struct run *r, unsigned long n, unsigned long only)
{
	struct sim *m = r->m;
	uint64_t rs = seed ^ name_hash(r->label), *points;
	uint64_t span = m->log.clock >= r->pmin ? m->log.clock - r->pmin : 0;

	uint64_t *flushes = malloc(sizeof(*flushes) * (m->log.n + 1));
	size_t nflushes = 0;

	points = malloc(sizeof(*points) * (n + 1));
	if (!points || !flushes)
		abort();
	/* Half the points anywhere, half just before an fdatasync
	 * completes: everything since the previous one is then in doubt,
	 * metadata writes included. */
	for (size_t i = 0; i < m->log.n; i++)
		if (m->log.recs[i].kind == IO_FAULT_FLUSH && m->log.recs[i].done >= r->pmin &&
		    m->log.recs[i].done != IO_FAULT_NOT_DONE)
			flushes[nflushes++] = m->log.recs[i].done;
	for (unsigned long k = 0; k < n; k++) {
		if (nflushes && (rnd(&rs) & 1))
			points[k] = flushes[rnd(&rs) % nflushes];
		else
			points[k] = r->pmin + rnd(&rs) % (span + 1);
	}
	qsort(points, n, sizeof(*points), cmp_u64);
	points[n] = m->log.clock;           /* the end: a clean close */
	for (unsigned long k = 0; k <= n; k++) {
		uint64_t P = points[k], fstart, acked_before, srs;
		unsigned long nopt = 0;
		struct slot *sl = NULL;
		int ret;

		if (only != ULONG_MAX && k != only)
			continue;
		fstart = flush_guarantee(&m->log, P);
		acked_before = guest_guarantee(m, P);
		/* The model is shared: states of an older guest flush finish
		 * before it moves on. */
		if (acked_before != r->model.acked_before)
			while (busy_slots())
				reap_one(r);
		base_advance(r, fstart);
		model_advance(r, acked_before);
		while (busy_slots() == njobs)
			reap_one(r);
		for (unsigned i = 0; i < njobs && !sl; i++)
			if (!slots[i].busy)
				sl = &slots[i];
		sl->busy = true;
		sl->k = k;
		sl->P = P;
		sl->acked_before = acked_before;
		srs = mix(seed ^ name_hash(r->label) ^ mix(k + 1));
		ret = build_state(r, P, &srs, sl->img, &nopt);
		/* Self-check: the whole log of a healthy run rebuilds the file
		 * the driver left. */
		if (ret == 0 && k == n && r->healthy)
			CHECK(same_file(sl->img, r->final, r->final_size),
			      "%s: the end state (%lu optional records) differs from the file",
			      r->label, nopt);
		if (ret == 0)
			ret = start_stage(sl, STAGE_CHECK);
		if (ret < 0) {
			CHECK(0, "%s state %lu: building the state: %s", r->label, k,
			      strerror(-ret));
			sl->busy = false;
			continue;
		}
		r->states++;
	}
	while (busy_slots())
		reap_one(r);
	free(flushes);
	free(points);
}

/* ---- one recording and its states ---------------------------------------- */

/* Results per scenario (a sticky run is a scenario of its own). */
struct summary {
	char name[48];
	unsigned long recordings, states, hist[256], data_bad;
	uint64_t records;
};

static struct summary summaries[32];
static unsigned nsummaries;

static struct summary *summary_of(const char *name)
{
	unsigned i;

	for (i = 0; i < nsummaries; i++)
		if (!strcmp(summaries[i].name, name))
			return &summaries[i];
	if (i == ARRAY_SIZE(summaries))
		abort();
	snprintf(summaries[i].name, sizeof(summaries[i].name), "%s", name);
	nsummaries++;
	return &summaries[i];
}

static void free_sim(struct sim *m)
{
	for (size_t i = 0; i < m->nops; i++)
		free(m->ops[i].data);
	free(m->ops);
	io_fault_log_free(&m->log);
}

/* The sticky-flush rules (see the top of the file). */
static void check_sticky(struct run *r, unsigned long nth)
{
	struct sim *m = r->m;
	const struct io_fault_rec *fail = NULL;
	const struct op *close_op = &m->ops[m->nops - 1];
	bool hit = false;

	for (size_t i = 0; i < m->log.n && !fail; i++)
		if (m->log.recs[i].kind == IO_FAULT_FLUSH && m->log.recs[i].result < 0)
			fail = &m->log.recs[i];
	CHECK(fail, "%s: fdatasync #%lu never failed", r->label, nth);
	if (!fail)
		return;
	for (size_t i = 0; i < m->nops; i++) {
		const struct op *op = &m->ops[i];
		if (op->start == IO_FAULT_NOT_DONE)
			continue;
		/* The request during which it failed reports it. */
		if (op->start <= fail->start && op->done > fail->start && op->result < 0)
			hit = true;
		if (is_flush(op) && op->done > fail->start)
			CHECK(op->result < 0, "%s: flush op %zu (ticks %llu..%llu) succeeded after "
			      "fdatasync #%lu failed at tick %llu", r->label, i,
			      (unsigned long long)op->start, (unsigned long long)op->done, nth,
			      (unsigned long long)fail->start);
	}
	CHECK(hit, "%s: no request in flight at the failed fdatasync reported an error", r->label);
	CHECK(close_op->result < 0, "%s: bdrv_close returned %d after a failed fdatasync",
	      r->label, close_op->result);
	/* No fdatasync may reach the file after the failure. */
	for (size_t i = 0; i < m->log.n; i++) {
		const struct io_fault_rec *rec = &m->log.recs[i];
		CHECK(!(rec->kind == IO_FAULT_FLUSH && rec->start > fail->start),
		      "%s: an fdatasync was issued after the failed one", r->label);
	}
	r->pmin = fail->start + 1;
}

static int run_scenario(const struct scenario *sc, const char *group, const char *label,
			unsigned round, unsigned long nstates, unsigned long only)
{
	struct sim m = { .sc = sc, .size = MAX(sc->size, sc->grow_to), .old_size = sc->size,
			 .cluster = sc->cluster,
			 .wait = CO_QUEUE_INIT, .done = CO_QUEUE_INIT };
	struct run r = { .m = &m, .label = label, .healthy = !sc->fail_flush };
	char img[300], raw[300];
	uint64_t rawsize;
	struct summary *su;
	int ret = 0;

	m.rng = seed ^ name_hash(sc->name) ^ mix(round);
	if (sh("rm -f img.qcow2 seed.raw") || make_seed_raw(sc->size, m.rng) < 0 ||
	    sh("%s", sc->create) || sh("qemu-img convert -f qcow2 -O raw img.qcow2 guest0.raw")) {
		CHECK(0, "%s: preparing the image", label);
		return -EIO;
	}
	snprintf(img, sizeof(img), "%s/img.qcow2", dir);
	snprintf(raw, sizeof(raw), "%s/guest0.raw", dir);
	r.guest0 = slurp(raw, m.size, &rawsize);    /* zeros past the old size */
	r.init = slurp(img, 0, &r.init_size);
	if (!r.guest0 || !r.init || rawsize != sc->size) {
		CHECK(0, "%s: reading the initial image", label);
		ret = -EIO;
		goto out;
	}
	sc->gen(&m);
	record(&m, img);
	if (m.setup_err) {
		ret = m.setup_err;
		goto out;
	}
	r.final = slurp(img, 0, &r.final_size);
	if (!r.final) {
		CHECK(0, "%s: reading the image after close", label);
		ret = -EIO;
		goto out;
	}

	/* A resize ran while other requests were in flight. */
	for (size_t i = 0; i < m.nops; i++) {
		const struct op *rs = &m.ops[i];
		bool overlap = false;
		if (rs->kind != OP_RESIZE)
			continue;
		for (size_t j = 0; j < m.nops && !overlap; j++)
			overlap = is_data(&m.ops[j]) && m.ops[j].start < rs->done &&
				  m.ops[j].done > rs->start;
		CHECK(overlap, "%s: no request ran during the resize", label);
	}

	/* Every request succeeds on a healthy disk. */
	if (r.healthy) {
		for (size_t i = 0; i < m.nops; i++)
			if (m.ops[i].kind != OP_BARRIER)
				CHECK(m.ops[i].result == 0, "%s: op %zu (kind %d, %llu+%llu): %s",
				      label, i, m.ops[i].kind, (unsigned long long)m.ops[i].off,
				      (unsigned long long)m.ops[i].len, strerror(-m.ops[i].result));
	} else {
		check_sticky(&r, sc->fail_flush);
	}
	for (size_t i = 0; i < m.log.n; i++) {
		const struct io_fault_rec *rec = &m.log.recs[i];
		CHECK(rec->kind == IO_FAULT_FLUSH || rec->result == 0 || no_effect(rec),
		      "%s: a file write failed: %s", label, strerror(-rec->result));
	}

	/* Index the log and the ops by completion; size the state buffer. */
	uint64_t cap = r.init_size;
	r.by_done = malloc(sizeof(size_t) * (m.log.n + 1));
	r.ops_by_done = malloc(sizeof(size_t) * (m.nops + 1));
	if (!r.by_done || !r.ops_by_done)
		abort();
	for (size_t i = 0; i < m.log.n; i++) {
		const struct io_fault_rec *rec = &m.log.recs[i];
		cap = MAX(cap, rec->kind == IO_FAULT_TRUNCATE ? rec->off : rec->off + rec->len);
		if (rec->kind != IO_FAULT_FLUSH && rec->done != IO_FAULT_NOT_DONE &&
		    !no_effect(rec))
			r.by_done[r.nby_done++] = i;
	}
	qsort_r(r.by_done, r.nby_done, sizeof(size_t), rec_done_cmp, m.log.recs);
	for (size_t i = 0; i < m.nops; i++)
		if (is_data(&m.ops[i]) && m.ops[i].done != IO_FAULT_NOT_DONE)
			r.ops_by_done[r.nops_by_done++] = i;
	qsort_r(r.ops_by_done, r.nops_by_done, sizeof(size_t), op_done_cmp, m.ops);

	r.base.cap = cap;
	r.base.buf = calloc(1, cap + 1);
	r.model.content = malloc(m.size);
	r.model.known = malloc(m.size);
	if (!r.base.buf || !r.model.content || !r.model.known)
		abort();
	memcpy(r.base.buf, r.init, r.init_size);
	r.base.size = r.init_size;
	memcpy(r.model.content, r.guest0, m.size);
	memset(r.model.known, 1, m.size);
	for (unsigned i = 0; i < njobs; i++) {
		slots[i].back = malloc(m.size);
		slots[i].touched = malloc(m.size);
		if (!slots[i].back || !slots[i].touched)
			abort();
		snprintf(slots[i].img, sizeof(slots[i].img), "%s/state%u.qcow2", dir, i);
		snprintf(slots[i].raw, sizeof(slots[i].raw), "%s/state%u.raw", dir, i);
		snprintf(slots[i].snap, sizeof(slots[i].snap), "%s/state%u.s1.raw", dir, i);
	}
	crash_states(&r, nstates, only);
	if (m.old_size != m.size)
		printf("%s: %lu states at the old size, %lu at the new one\n", label, r.at_old,
		       r.at_new);
	for (unsigned i = 0; i < njobs; i++) {
		free(slots[i].back);
		free(slots[i].touched);
	}

	su = summary_of(group);
	su->recordings++;
	su->states += r.states;
	for (unsigned i = 0; i < 256; i++)
		su->hist[i] += r.hist[i];
	su->data_bad += r.data_bad;
	su->records += m.log.n;
	free(r.base.buf);
	free(r.model.content);
	free(r.model.known);
	free(r.by_done);
	free(r.ops_by_done);
out:
	free(r.final);
	free(r.guest0);
	free(r.init);
	free_sim(&m);
	return ret;
}

static double cpu_seconds(const struct rusage *u)
{
	return (double)u->ru_utime.tv_sec + u->ru_utime.tv_usec / 1e6 + (double)u->ru_stime.tv_sec +
	       u->ru_stime.tv_usec / 1e6;
}

/* QUBLK_ONLY=NAME[:K]: does it select @label, and which state? */
static bool selected(const char *label, unsigned long *only)
{
	const char *sel = getenv("QUBLK_ONLY");
	size_t n = strlen(label);

	*only = ULONG_MAX;
	if (!sel || !*sel)
		return true;
	if (strncmp(sel, label, n) || (sel[n] && sel[n] != ':'))
		return false;
	if (sel[n] == ':')
		*only = strtoul(sel + n + 1, NULL, 10);
	return true;
}

/* The recordings of one scenario: a log serves up to ROUND_STATES
 * crash points, more states take more recordings (seeds). */
static void run_group(const struct scenario *sc, const char *name, unsigned long per)
{
	unsigned long rounds = MAX(1ul, DIV_ROUND_UP(per, (unsigned long)ROUND_STATES)), only;

	for (unsigned long rd = 0; rd < rounds; rd++) {
		unsigned long n = per / rounds + (rd < per % rounds);
		char label[64];

		if (rd)
			snprintf(label, sizeof(label), "%s.%lu", name, rd);
		else
			snprintf(label, sizeof(label), "%s", name);
		if (selected(label, &only))
			run_scenario(sc, name, label, (unsigned)rd, n, only);
	}
}

int main(int argc, char **argv)
{
	const struct scenario *sticky = &scenarios[ARRAY_SIZE(scenarios) - 1];
	unsigned nrec = ARRAY_SIZE(scenarios) + ARRAY_SIZE(sticky_fail);
	struct summary total = { .name = "total" };
	unsigned long per;
	struct timespec t0, t1;
	struct rusage self, kids;
	const char *e;

	argv0 = argv[0];
	log_set_prog("test_powercut");
	total_states = argc > 1 ? strtoul(argv[1], NULL, 10) : DEFAULT_STATES;
	seed = (e = getenv("QUBLK_SEED")) && *e ? strtoull(e, NULL, 10)
						: (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
	keep_files = (e = getenv("QUBLK_KEEP")) && *e == '1';
	if ((e = getenv("QUBLK_JOBS")) && *e)
		njobs = (unsigned)MAX(1ul, MIN((unsigned long)MAX_JOBS, strtoul(e, NULL, 10)));
	if (system("qemu-img --version >/dev/null 2>&1")) {
		printf("SKIP: qemu-img missing\n");
		return 77;
	}
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	per = total_states / nrec + (total_states % nrec != 0);
	printf("seed %llu: %lu crash states per scenario, %u scenarios, %u at once, in %s\n",
	       (unsigned long long)seed, per, nrec, njobs, dir);
	fflush(stdout);
	clock_gettime(CLOCK_MONOTONIC, &t0);

	for (size_t i = 0; i < ARRAY_SIZE(scenarios); i++)
		run_group(&scenarios[i], scenarios[i].name, per);
	/* Sticky: each run fails one fdatasync, spread over the workload
	 * (the healthy "sticky" run issues about 50). */
	for (unsigned v = 0; v < ARRAY_SIZE(sticky_fail); v++) {
		struct scenario sc = *sticky;
		char name[48];

		sc.fail_flush = sticky_fail[v];
		snprintf(name, sizeof(name), "%s-%lu", sticky->name, sc.fail_flush);
		run_group(&sc, name, per);
	}

	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%-22s %5s %7s %8s %8s %6s %8s %9s\n", "scenario", "logs", "states", "check=0",
	       "check=3", "other", "data-bad", "records");
	for (unsigned i = 0; i <= nsummaries; i++) {
		struct summary *su = i < nsummaries ? &summaries[i] : &total;
		unsigned long other = su->states - su->hist[0] - su->hist[3];
		if (i < nsummaries) {
			total.recordings += su->recordings;
			total.states += su->states;
			total.data_bad += su->data_bad;
			total.records += su->records;
			for (unsigned c = 0; c < 256; c++)
				total.hist[c] += su->hist[c];
		}
		printf("%-22s %5lu %7lu %8lu %8lu %6lu %8lu %9llu\n", su->name, su->recordings,
		       su->states, su->hist[0], su->hist[3], other, su->data_bad,
		       (unsigned long long)su->records);
	}
	printf("qemu-img check exit codes:");
	for (unsigned c = 0; c < 256; c++)
		if (total.hist[c])
			printf(" %u: %lu", c, total.hist[c]);
	printf(" (0 clean, 3 leaked clusters only, 2 corruption, 1 check failed)\n");
	getrusage(RUSAGE_SELF, &self);
	getrusage(RUSAGE_CHILDREN, &kids);
	printf("%lu crash states in %.1f s (cpu: %.1f s here, %.1f s in qemu-img) (seed %llu)\n",
	       total.states, (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
	       cpu_seconds(&self), cpu_seconds(&kids), (unsigned long long)seed);
	if (!keep_files || (!failed && !kept_failure)) {
		char cmd[300];
		snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
		if (system(cmd)) {}
	} else {
		printf("kept %s\n", dir);
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
