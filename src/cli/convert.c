/* SPDX-License-Identifier: MIT */
/*
 * qublk convert: copy an image (or a backing chain, read through its top)
 * into a new raw or qcow2 image, sparse, optionally compressed, optionally
 * over a backing file.
 *
 * Streaming: the source is cut into chunks (CHUNK bytes, a multiple of
 * the output's unit: 4 KiB for raw, the cluster for qcow2, which is
 * allocated whole or not at all) that worker coroutines claim in turn,
 * -m of them in flight.  For its chunk a worker asks block status (no
 * data read) and classifies each unit:
 *   - the source reads zeros and so does the output: skipped;
 *   - with -B, both read the same bytes of the same file (the source's
 *     chain and the new backing file share it): skipped, not even read;
 *   - the source reads zeros, the output (its backing file) does not:
 *     zeros written (zero clusters in v3);
 *   - otherwise the unit is read (with -B, what the output reads there
 *     too) and written only if it differs: an all-zero unit is not
 *     written (or written as zeros over a backing file that differs);
 *     the rest is written, neighbours in one request, or each cluster
 *     compressed with -c.
 * A new output without a backing file reads zeros wherever nothing is
 * written.  With -B, that is exactly "what differs from BACKING": the
 * output reads as the source whatever BACKING holds (qemu-img convert -B
 * instead writes what the source has above its own backing file and
 * trusts BACKING to read like it).  Which file a block-status depth
 * stands for comes from the chains' headers (chain.c).
 *
 * The output never appears half written: it is created under a
 * temporary name in the destination's directory and renamed into place
 * once it is complete and flushed; on failure (or SIGINT/SIGTERM) the
 * temporary file is removed (create_file_*, shared with qublk create).
 * An existing destination is first locked as qemu-img convert locks it
 * (create's locks: write and resize held, resize not shared): if another
 * process (qublk, qemu-nbd, a VM, this convert's own source) uses it,
 * convert refuses before writing anything, and the lock is held until
 * the rename replaced the file.  The source is locked as QEMU locks a
 * read-only image (-U: sharing everything), the temporary file as a
 * read-write one (block/lock.h), the same bytes qemu-img convert holds.
 *
 * Threads: --threads of them (default one per CPU, at most 4), each
 * with its io_uring and its share of the workers; compression runs in
 * the writing coroutine, so this is what spreads it over the CPUs.  The
 * drivers serialise their own metadata across threads (bdrv.h); chunks
 * are claimed, errors and progress kept with atomics; the last worker
 * to finish, on whichever thread, writes the tail and flushes.
 * Exit codes: 0 done, 1 failed (nothing left behind), 2 bad command line.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "cli/cli.h"
#include "common/aio.h"
#include "common/coro.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"

#define CHUNK       (2u << 20)     /* bytes a worker claims */
#define RAW_UNIT    4096u          /* sparse granularity of a raw output (qemu-img's -S) */
#define MAX_WORKERS 64
#define MAX_THREADS 64
#define DEFAULT_MAX_THREADS 4      /* default: one per CPU, at most this */

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

struct conv {
	struct bdrv *src, *dst;
	uint64_t size;             /* bytes to convert: the source's size */
	uint64_t unit;             /* the output's allocation unit */
	bool compress;             /* -c: write data clusters compressed */
	/* -B: the output reads its backing file where nothing is written, so
	 * it is compared with the source; these name the files behind each
	 * block-status depth (chain.c). */
	bool backed;
	struct chain src_chain, dst_chain;
	/* Shared by the threads (atomics). */
	uint64_t next;             /* next chunk to claim */
	uint64_t done;             /* bytes finished, for the progress line */
	unsigned running;          /* workers not finished */
	int error;                 /* first error, -errno */
	int last_pct;              /* progress shown, hundredths of a percent */
	bool progress;
};

/* A run of the output's block status (-B), up to @end. */
struct drun {
	uint64_t end;
	bool zero;
	unsigned depth;
};

struct thread;

struct worker {
	struct conv *cv;
	struct thread *thr;
	uint8_t *buf;              /* CHUNK bytes: the source's data */
	uint8_t *cmp;              /* -B: CHUNK bytes, what the output reads now */
	uint8_t *seen;             /* per unit of the chunk: SEEN_* bits */
	struct drun *druns;        /* -B: the output's runs over the chunk */
	size_t ndruns, cap;
	struct coro *co;
};

/* A thread: its loop runs its workers. */
struct thread {
	struct conv *cv;
	struct worker *w;
	unsigned n;                /* workers */
	unsigned running;          /* of them, not finished (this thread only) */
	pthread_t tid;
};

/* What block status says of the pieces of a unit: source and output
 * read zeros (SAME_Z), or the same bytes of the same file (SAME_D); the
 * source reads zeros, the output not (ZERO); anything else (DATA). */
enum { SEEN_SAME_Z = 1, SEEN_SAME_D = 2, SEEN_ZERO = 4, SEEN_DATA = 8 };
/* What a unit needs: nothing, zeros written, its data compared and
 * written where it differs. */
enum { UNIT_SKIP, UNIT_ZERO, UNIT_DATA };

static int unit_class(uint8_t seen)
{
	if ((seen & SEEN_DATA) || ((seen & SEEN_ZERO) && (seen & SEEN_SAME_D)))
		return UNIT_DATA;
	return seen & SEEN_ZERO ? UNIT_ZERO : UNIT_SKIP;
}

/* The first error wins, from any thread; later ones are not logged. */
static void set_error(struct conv *cv, int err, const char *what, uint64_t off)
{
	int none = 0;

	if (!__atomic_compare_exchange_n(&cv->error, &none, err, false, __ATOMIC_ACQ_REL,
					 __ATOMIC_ACQUIRE))
		return;
	if (err != -EINTR)
		log_error("%s at offset %" PRIu64 ": %s", what, off, strerror(-err));
}

static bool failed(struct conv *cv)
{
	return __atomic_load_n(&cv->error, __ATOMIC_ACQUIRE) != 0;
}

/* qemu-img's progress line; any thread, each percentage shown once. */
static void show_progress(struct conv *cv)
{
	int pct, last;

	if (!cv->progress)
		return;
	pct = cv->size ? (int)(__atomic_load_n(&cv->done, __ATOMIC_RELAXED) * 10000 / cv->size)
		       : 10000;
	last = __atomic_load_n(&cv->last_pct, __ATOMIC_RELAXED);
	if (pct <= last || !__atomic_compare_exchange_n(&cv->last_pct, &last, pct, false,
							__ATOMIC_RELAXED, __ATOMIC_RELAXED))
		return;
	printf("    (%d.%02d/100%%)\r", pct / 100, pct % 100);
	fflush(stdout);
}

/* The output's block status over [a, b) into w->druns.  Without -B the
 * output is new and reads zeros everywhere. */
static int output_runs(struct worker *w, uint64_t a, uint64_t b)
{
	struct conv *cv = w->cv;
	uint64_t pos = a, n;
	unsigned depth;

	w->ndruns = 0;
	while (pos < b) {
		int st = 0;
		depth = 0;
		n = b - pos;
		if (cv->backed)
			st = bdrv_co_block_status(cv->dst, pos, b - pos, &n, &depth);
		if (st < 0) {
			set_error(cv, st, "block status of the output", pos);
			return st;
		}
		if (w->ndruns == w->cap) {
			size_t cap = w->cap ? 2 * w->cap : 64;
			struct drun *r = realloc(w->druns, cap * sizeof(*r));
			if (!r) {
				set_error(cv, -ENOMEM, "block status of the output", pos);
				return -ENOMEM;
			}
			w->druns = r;
			w->cap = cap;
		}
		pos += n;
		w->druns[w->ndruns++] = (struct drun){ pos, !(st & BDRV_BLOCK_DATA), depth };
	}
	return 0;
}

/* Do source depth @d and output depth @e stand for the same file (read
 * the same way)?  The output's own layer (1) is new: never. */
static bool same_layer(const struct conv *cv, unsigned d, unsigned e)
{
	const struct chain_layer *s, *t;

	if (d < 1 || d > cv->src_chain.n || e < 2 || e > cv->dst_chain.n)
		return false;
	s = &cv->src_chain.l[d - 1];
	t = &cv->dst_chain.l[e - 1];
	return s->dev == t->dev && s->ino == t->ino && !strcmp(s->format, t->format);
}

/* Mark the units of the chunk at @a that [p, q) touches with @bit. */
static void mark(struct worker *w, uint64_t a, uint64_t p, uint64_t q, uint8_t bit)
{
	uint64_t unit = w->cv->unit;

	for (uint64_t u = (p - a) / unit; u <= (q - 1 - a) / unit; u++)
		w->seen[u] |= bit;
}

/* Classify the units of [a, b) from block status alone: the source's,
 * against the output's. */
static int classify(struct worker *w, uint64_t a, uint64_t b)
{
	struct conv *cv = w->cv;
	uint64_t pos = a, n, start = a;
	size_t r = 0;
	unsigned depth;
	int ret = output_runs(w, a, b);

	if (ret < 0)
		return ret;
	memset(w->seen, 0, DIV_ROUND_UP(b - a, cv->unit));
	while (pos < b) {
		int st = bdrv_co_block_status(cv->src, pos, b - pos, &n, &depth);
		if (st < 0) {
			set_error(cv, st, "block status of the source", pos);
			return st;
		}
		bool zs = !(st & BDRV_BLOCK_DATA);
		/* Each piece where one source run meets one output run. */
		for (uint64_t p = pos; p < pos + n; p = MIN(pos + n, w->druns[r].end)) {
			while (w->druns[r].end <= p)
				r++;
			const struct drun *d = &w->druns[r];
			uint64_t q = MIN(pos + n, d->end);
			uint8_t bit;
			if (zs && d->zero)
				bit = SEEN_SAME_Z;
			else if (!zs && !d->zero && same_layer(cv, depth, d->depth))
				bit = SEEN_SAME_D;
			else
				bit = zs ? SEEN_ZERO : SEEN_DATA;
			mark(w, start, p, q, bit);
		}
		pos += n;
	}
	return 0;
}

/* Write one unit (a whole cluster) at @u compressed.  The last cluster
 * of the output may reach past the source's end (qcow2 rounds the size
 * up to 512 bytes): that tail reads as zeros. */
static int write_compressed(struct worker *w, uint64_t base, uint64_t u, uint64_t b)
{
	struct conv *cv = w->cv;
	uint64_t len = MIN(cv->unit, cv->dst->size - u);
	struct iovec v = { w->buf + (u - base), len };
	int ret;

	if (u + len > b)
		memset(w->buf + (b - base), 0, u + len - b);
	ret = bdrv_co_pwritev_compressed(cv->dst, u, len, &v, 1);
	if (ret < 0)
		set_error(cv, ret, "writing the output (compressed)", u);
	return ret;
}

/* Write what the output needs over [a, b), the units the source's data
 * was read for (into w->buf at a - @base; with -B what the output reads
 * now is in w->cmp): a unit equal to what the output reads is skipped,
 * an all-zero one becomes zeros (-B: the output reads something else
 * there), the rest is written, neighbours together or each compressed. */
static int write_data(struct worker *w, uint64_t base, uint64_t a, uint64_t b)
{
	struct conv *cv = w->cv;
	uint64_t u = a, run = a;
	int ret = 0, run_kind = UNIT_SKIP;

	while (u <= b) {
		uint64_t ue = MIN(u + cv->unit, b);
		int kind = UNIT_SKIP;
		if (u < b) {
			const uint8_t *p = w->buf + (u - base);
			bool zero = buf_is_zero(p, ue - u);
			if (cv->backed && memcmp(p, w->cmp + (u - base), ue - u))
				kind = zero ? UNIT_ZERO : UNIT_DATA;
			else if (!cv->backed && !zero)
				kind = UNIT_DATA;
		}
		/* Flush the run of one kind that ends here. */
		if (run < u && (kind != run_kind || u == b || (cv->compress && run_kind == UNIT_DATA))) {
			if (run_kind == UNIT_ZERO) {
				ret = bdrv_co_pwrite_zeroes(cv->dst, run, u - run, 0);
				if (ret < 0)
					set_error(cv, ret, "writing zeros to the output", run);
			} else if (run_kind == UNIT_DATA && cv->compress) {
				ret = write_compressed(w, base, run, b);
			} else if (run_kind == UNIT_DATA) {
				ret = bdrv_co_pwrite(cv->dst, run, u - run, w->buf + (run - base), 0);
				if (ret < 0)
					set_error(cv, ret, "writing the output", run);
			}
			if (ret < 0)
				return ret;
			run = u;
		}
		if (u == b)
			break;
		if (run == u)
			run_kind = kind;
		u = ue;
	}
	return 0;
}

static int convert_chunk(struct worker *w, uint64_t a, uint64_t b)
{
	struct conv *cv = w->cv;
	uint64_t unit = cv->unit, g0 = a;
	int ret = classify(w, a, b);

	while (!ret && g0 < b) {
		/* A group of units of one class. */
		int c = unit_class(w->seen[(g0 - a) / unit]);
		uint64_t g1 = MIN(g0 + unit, b);
		while (g1 < b && unit_class(w->seen[(g1 - a) / unit]) == c)
			g1 = MIN(g1 + unit, b);
		if (c == UNIT_ZERO) {
			ret = bdrv_co_pwrite_zeroes(cv->dst, g0, g1 - g0, 0);
			if (ret < 0)
				set_error(cv, ret, "writing zeros to the output", g0);
		} else if (c == UNIT_DATA) {
			ret = bdrv_co_pread(cv->src, g0, g1 - g0, w->buf + (g0 - a));
			if (ret < 0)
				set_error(cv, ret, "reading the source", g0);
			if (!ret && cv->backed) {
				ret = bdrv_co_pread(cv->dst, g0, g1 - g0, w->cmp + (g0 - a));
				if (ret < 0)
					set_error(cv, ret, "reading the output", g0);
			}
			if (!ret)
				ret = write_data(w, a, g0, g1);
		}
		g0 = g1;
	}
	return ret;
}

/* A qcow2 output is a multiple of 512 bytes: past the end of a source
 * that is not, it must read zeros, which over a backing file (-B) it
 * may not do yet.  After every chunk is written (the tail shares their
 * last cluster). */
static int zero_tail(struct conv *cv)
{
	uint64_t end = cv->dst->size, n;
	unsigned depth;
	int st;

	if (!cv->backed || cv->size >= end)
		return 0;
	st = bdrv_co_block_status(cv->dst, cv->size, end - cv->size, &n, &depth);
	if (st >= 0 && (st & BDRV_BLOCK_ZERO) && n == end - cv->size)
		return 0;
	st = bdrv_co_pwrite_zeroes(cv->dst, cv->size, end - cv->size, 0);
	if (st < 0)
		set_error(cv, st, "writing zeros to the output", cv->size);
	return st;
}

static void worker_fn(void *opaque)
{
	struct worker *w = opaque;
	struct conv *cv = w->cv;

	while (!failed(cv)) {
		uint64_t a = __atomic_fetch_add(&cv->next, CHUNK, __ATOMIC_RELAXED);
		if (a >= cv->size)
			break;
		uint64_t b = MIN(a + CHUNK, cv->size);
		if (interrupted) {
			set_error(cv, -EINTR, "interrupted", a);
			break;
		}
		if (convert_chunk(w, a, b) < 0)
			break;
		__atomic_add_fetch(&cv->done, b - a, __ATOMIC_RELAXED);
		show_progress(cv);
	}
	w->thr->running--;
	/* The last worker of all, on whichever thread: every chunk is in. */
	if (__atomic_sub_fetch(&cv->running, 1, __ATOMIC_ACQ_REL) == 0 && !failed(cv)) {
		int ret = zero_tail(cv);
		if (ret == 0)
			ret = bdrv_co_flush(cv->dst);
		if (ret < 0)
			set_error(cv, ret, "flushing the output", 0);
	}
}

/* One thread's workers on its own loop (thread 0 is the caller's). */
static void *thread_main(void *opaque)
{
	struct thread *t = opaque;
	struct conv *cv = t->cv;
	struct worker *w = t->w;
	struct aio_ctx ctx;
	int ret;

	ret = aio_ctx_init(&ctx, 2 * t->n < 64 ? 64 : 2 * t->n);
	if (ret < 0) {
		log_error("io_uring_queue_init: %s", strerror(-ret));
		set_error(cv, ret, "starting", 0);
		__atomic_sub_fetch(&cv->running, t->n, __ATOMIC_ACQ_REL);
		return NULL;
	}
	aio_ctx_set_current(&ctx);
	for (unsigned i = 0; i < t->n && !ret; i++) {
		w[i].cv = cv;
		w[i].thr = t;
		w[i].buf = io_alloc(CHUNK);
		w[i].seen = malloc(CHUNK / 512);
		w[i].cmp = cv->backed ? io_alloc(CHUNK) : NULL;
		w[i].co = coro_new(worker_fn, &w[i], 0);
		if (!w[i].buf || !w[i].seen || (cv->backed && !w[i].cmp) || !w[i].co)
			ret = -ENOMEM;
	}
	if (ret == 0) {
		t->running = t->n;
		for (unsigned i = 0; i < t->n; i++)
			aio_schedule(w[i].co);
		while (t->running || ctx.inflight || ctx.ready_head) {
			ret = aio_run_once(&ctx, true);
			if (ret < 0) {
				log_error("io_uring: %s", strerror(-ret));
				set_error(cv, ret, "io_uring", 0);
				break;
			}
		}
	} else {
		set_error(cv, ret, "starting", 0);
		__atomic_sub_fetch(&cv->running, t->n, __ATOMIC_ACQ_REL);
	}
	for (unsigned i = 0; i < t->n; i++) {
		if (w[i].co)
			coro_free(w[i].co);
		io_free(w[i].buf);
		io_free(w[i].cmp);
		free(w[i].seen);
		free(w[i].druns);
	}
	aio_ctx_set_current(NULL);
	aio_ctx_deinit(&ctx);
	return NULL;
}

/* @nworkers coroutines spread over @nthreads threads.  Returns -errno. */
static int run(struct conv *cv, unsigned nworkers, unsigned nthreads)
{
	struct worker *w = calloc(nworkers, sizeof(*w));
	struct thread *t = calloc(nthreads, sizeof(*t));
	unsigned started = 1, first = 0;
	int ret = 0;

	if (!w || !t) {
		free(w);
		free(t);
		log_error("out of memory");
		return -ENOMEM;
	}
	cv->running = nworkers;
	for (unsigned i = 0; i < nthreads; i++) {
		t[i].cv = cv;
		t[i].w = w + first;
		t[i].n = nworkers / nthreads + (i < nworkers % nthreads);
		first += t[i].n;
	}
	for (; started < nthreads; started++) {
		ret = -pthread_create(&t[started].tid, NULL, thread_main, &t[started]);
		if (ret < 0) {
			log_error("pthread_create: %s", strerror(-ret));
			set_error(cv, ret, "starting", 0);
			for (unsigned i = started; i < nthreads; i++)
				__atomic_sub_fetch(&cv->running, t[i].n, __ATOMIC_ACQ_REL);
			break;
		}
	}
	thread_main(&t[0]);
	for (unsigned i = 1; i < started; i++)
		pthread_join(t[i].tid, NULL);
	free(w);
	free(t);
	return cv->error;
}

/* ---- the output file ---------------------------------------------------- */

/* Make the output image for @size bytes of source in @cf (its temporary
 * file; create_file_begin()), for the destination @dst.  Returns -errno
 * (logged, naming @dst). */
static int create_output(struct create_file *cf, const char *dst, const char *fmt,
			 struct qcow2_create_opts *q, uint64_t size)
{
	char err[512] = "";
	int ret;

	if (!strcmp(fmt, "raw")) {
		ret = create_raw_fill(cf->fd, size, q->prealloc);
	} else {
		q->size = size;
		ret = qcow2_create_into(cf, dst, q, err, sizeof(err));
	}
	if (ret < 0)
		log_error("%s: %s", dst, err[0] ? err : strerror(-ret));
	return ret;
}

static bool same_file(const struct chain_layer *l, const struct bdrv *bs)
{
	return l->dev == bs->dev && l->ino == bs->ino;
}

/* -B: read the chains behind the source's and the output's block-status
 * depths.  The output must not be its own backing file.  Returns -errno
 * (logged). */
static int backing_chains(struct conv *cv, const struct create_file *o, const char *src,
			  const char *src_fmt)
{
	struct stat st;
	int ret;

	ret = chain_read(src, src_fmt, &cv->src_chain);
	if (ret == 0)
		ret = chain_read(o->tmp, "qcow2", &cv->dst_chain);
	if (ret < 0)
		return ret;
	if (!same_file(&cv->src_chain.l[0], cv->src)) {
		log_error("%s: changed while it was opened", src);
		return -ESTALE;
	}
	if (o->lock_fd >= 0 && fstat(o->lock_fd, &st) == 0)
		for (unsigned i = 1; i < cv->dst_chain.n; i++)
			if (cv->dst_chain.l[i].dev == st.st_dev && cv->dst_chain.l[i].ino == st.st_ino) {
				log_error("%s: cannot be its own backing file", o->target);
				return -EINVAL;
			}
	return 0;
}

/* ---- command line ------------------------------------------------------- */

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk convert [-f FMT] [-O raw|qcow2] [-B BACKING -F FMT] [-c]\n"
		"                     [-o OPTIONS] [-U] [-p] [-q] [-m N] [--threads N] SRC DST\n"
		"\n"
		"Copy the image SRC (read through its backing chain) into DST, a new\n"
		"image.  Sparse: ranges SRC reads as zeros are not written (found from\n"
		"its metadata, and in the data it reads, by 4 KiB units for raw, by\n"
		"cluster for qcow2).  DST appears only once complete; an existing DST is\n"
		"replaced, unless it is in use.\n"
		"\n"
		"  -f FMT         SRC's format: qcow2 or raw (default: probe)\n"
		"  -O FMT         DST's format: raw (default) or qcow2\n"
		"  -B BACKING     DST (qcow2) gets the backing file BACKING (stored as given:\n"
		"                 relative to DST's directory) and holds only what differs\n"
		"                 from it\n"
		"  -F FMT         BACKING's format: qcow2 or raw (required with -B)\n"
		"  -c             compress DST's data clusters (qcow2; -o compression_type=\n"
		"                 zlib (default) or zstd); a cluster that does not shrink is\n"
		"                 written plainly\n"
		"  -o OPTIONS     DST's creation options, as for 'qublk create' (raw:\n"
		"                 preallocation only)\n"
		"  -U, --force-share  read SRC even if another process writes it\n"
		"  -p             show progress on a terminal\n"
		"  -q             quiet (no progress)\n"
		"  -m N           requests in flight (1..%d, default 8)\n"
		"  --threads N    threads the requests are spread over, each with its\n"
		"                 io_uring (default: one per CPU, at most %d)\n"
		"  -h, --help     show this help\n"
		"\n"
		"Exit status: 0 success, 1 failure (DST is left as it was), 2 usage error.\n",
		MAX_WORKERS, DEFAULT_MAX_THREADS);
}

int cmd_convert(int argc, char **argv)
{
	enum { OPT_THREADS = 256 };
	static const struct option longopts[] = {
		{ "force-share", no_argument, NULL, 'U' },
		{ "threads", required_argument, NULL, OPT_THREADS },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct bdrv_opts sopts = { .flags = BDRV_O_RDONLY }, dopts = { 0 };
	const char *out_fmt = "raw", *raw_bad = NULL;
	struct qcow2_create_opts q = { 0 };
	struct conv cv = { .last_pct = -1, .unit = RAW_UNIT };
	struct create_file out = { .fd = -1, .lock_fd = -1 };
	char err[512] = "";
	bool progress = false, quiet = false;
	unsigned nworkers = 8, nthreads = 0;
	struct sigaction sa = { .sa_handler = on_signal }, old_int, old_term;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "f:O:o:cB:F:Upqm:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			if (strcmp(optarg, "qcow2") && strcmp(optarg, "raw")) {
				log_error("unknown format '%s' (qcow2 or raw)", optarg);
				return EXIT_USAGE;
			}
			sopts.format = optarg;
			break;
		case 'O':
			if (strcmp(optarg, "raw") && strcmp(optarg, "qcow2")) {
				log_error("unknown output format '%s' (raw or qcow2)", optarg);
				return EXIT_USAGE;
			}
			out_fmt = optarg;
			break;
		case 'o':
			if (cli_parse_create_options(optarg, &q, &raw_bad) < 0)
				return EXIT_USAGE;
			break;
		case 'c':
			cv.compress = true;
			break;
		case 'B':
			q.backing_file = optarg;
			raw_bad = "-B";
			break;
		case 'F':
			q.backing_format = optarg;
			raw_bad = "-F";
			break;
		case 'U':
			sopts.flags |= BDRV_O_FORCE_SHARE;
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'm':
			if (cli_parse_uint(optarg, 1, MAX_WORKERS, &nworkers) < 0) {
				log_error("-m must be 1..%d", MAX_WORKERS);
				return EXIT_USAGE;
			}
			break;
		case OPT_THREADS:
			if (cli_parse_uint(optarg, 1, MAX_THREADS, &nthreads) < 0) {
				log_error("--threads must be 1..%d", MAX_THREADS);
				return EXIT_USAGE;
			}
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 2) {
		log_error(argc - optind < 2 ? "missing SRC or DST" : "too many arguments");
		usage(stderr);
		return EXIT_USAGE;
	}
	const char *src = argv[optind], *dst = argv[optind + 1];
	if (!strcmp(out_fmt, "raw") && (raw_bad || q.prealloc == QCOW2_PREALLOC_METADATA)) {
		log_error("option '%s' is not valid for the raw format",
			  raw_bad ? raw_bad : "preallocation=metadata");
		return EXIT_USAGE;
	}
	if (q.data_file || q.data_file_raw) {
		log_error("convert does not make external data files (create the image with "
			  "qublk create -o data_file=..., then copy into it)");
		return EXIT_USAGE;
	}
	if (cv.compress && strcmp(out_fmt, "qcow2")) {
		log_error("compression (-c) needs the qcow2 output format");
		return EXIT_USAGE;
	}
	if (q.backing_format && !q.backing_file) {
		log_error("a backing format (-F) needs a backing file (-B)");
		return EXIT_USAGE;
	}
	if (q.backing_file && !q.backing_format) {
		/* As qemu-img: a format is never probed into an image. */
		log_error("a backing file (-B) needs its format: -F qcow2 or -F raw");
		return EXIT_USAGE;
	}
	cv.backed = q.backing_file != NULL;
	if (!nthreads) {
		long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
		nthreads = ncpu < 1 ? 1 : (unsigned)MIN(ncpu, (long)DEFAULT_MAX_THREADS);
	}
	nthreads = MIN(nthreads, nworkers);
	cv.progress = progress && !quiet && isatty(STDOUT_FILENO);

	if (bdrv_open(src, &sopts, &cv.src) < 0)
		return EXIT_FAIL;
	cv.size = cv.src->size;
	/* Before the temporary file exists: a signal must not leave it. */
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	ret = create_file_begin(dst, &out, err, sizeof(err));
	if (ret < 0) {
		log_error("%s: %s", dst, err);
		goto out_sig;
	}
	ret = create_output(&out, dst, out_fmt, &q, cv.size);
	if (ret < 0)
		goto out_sig;
	if (cv.backed) {
		ret = backing_chains(&cv, &out, src, sopts.format);
		if (ret < 0)
			goto out_sig;
	}
	dopts.format = out_fmt;
	ret = bdrv_open(out.tmp, &dopts, &cv.dst);
	if (ret < 0)
		goto out_sig;
	if (cv.backed && !same_file(&cv.dst_chain.l[0], cv.dst)) {
		log_error("%s: changed while it was opened", out.tmp);
		ret = -ESTALE;
		goto out_sig;
	}
	if (cv.dst->cluster_size && !strcmp(out_fmt, "qcow2"))
		cv.unit = cv.dst->cluster_size;
	show_progress(&cv);
	ret = run(&cv, nworkers, nthreads);
	if (bdrv_close(cv.dst) < 0 && !ret)
		ret = -EIO;
	cv.dst = NULL;
	if (!ret && interrupted)
		ret = -EINTR;
	if (!ret) {
		ret = create_file_commit(&out, err, sizeof(err));
		if (ret < 0)
			log_error("%s: %s", dst, err);
	}
	if (cv.progress) {
		if (!ret)
			printf("    (100.00/100%%)\n");
		else
			putchar('\n');
	}
out_sig:
	bdrv_close(cv.dst);
	create_file_abort(&out);
	chain_free(&cv.src_chain);
	chain_free(&cv.dst_chain);
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	bdrv_close(cv.src);
	if (ret == -EINTR)
		log_error("interrupted: %s left as it was", dst);
	return ret < 0 ? EXIT_FAIL : EXIT_OK;
}
