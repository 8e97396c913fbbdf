/* SPDX-License-Identifier: MIT */
/*
 * ublk-race: concurrent requests on disjoint ranges that share clusters,
 * against a block device (a qublk ublk device in the VM), checked against
 * an in-memory model of its content.
 *
 *   ublk-race [-s SEED] [-c CLUSTER] [-b BATCHES] [-i INIT.raw] DEV MODEL.raw
 *
 * Requests on disjoint byte ranges commute: whatever order the device runs
 * them in, the result is defined.  Each batch cuts a window of one cluster
 * (or a part of one), or of a few clusters, at 512-byte-aligned points
 * into disjoint pieces and gives each piece a request: a write of random
 * bytes, FALLOC_FL_ZERO_RANGE (write-zeroes without unmap),
 * FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE (write-zeroes that may unmap),
 * BLKDISCARD of the whole clusters inside the piece (the kernel may split
 * a discard, so only whole cluster-aligned clusters are discarded, and
 * those must read as zeros), a read checked against the model, or none;
 * some batches add an fsync.  A share of the multi-cluster batches
 * discards whole clusters next to writes into the clusters around them.  The requests are dealt at random to two
 * threads pinned to CPU 0 and CPU 1, so that both ublk queues see them
 * (blk-mq maps each CPU to a queue).  Both threads start together; each
 * submits its reads, writes, fallocates and fsync through its own io_uring
 * in one go, issues its discards (a synchronous ioctl) while those are in
 * flight, then reaps.  After the batch the whole window is read back and
 * compared with the model; at the end the whole device is, and the model
 * is written to MODEL.raw for `qemu-img compare` after `qublk del`.
 *
 * INIT.raw, if given, is the device's starting content (same size).
 * Threads: the main thread generates a batch and updates the model before
 * the workers start; workers only read the model (to check reads).
 * Exit: 0 all matched; 1 a mismatch or a failed request (details on
 * stderr, with the seed to replay); 2 usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 2
#define MAX_REQS 16
#define SECTOR 512u

enum kind { K_WRITE, K_ZERO, K_PUNCH, K_DISCARD, K_READ, K_FSYNC, K_NKINDS };
static const char *const kind_name[K_NKINDS] = {
	"write", "zero-range", "punch-hole", "discard", "read", "fsync",
};

struct req {
	enum kind kind;
	uint64_t off, len;
	int thread;
	int res;             /* bytes done or -errno, set by the worker */
	bool bad_data;       /* a read that did not match the model */
};

struct batch {
	uint64_t wstart, wlen;
	int n;
	struct req r[MAX_REQS];
};

static int dev_fd;
static uint64_t dev_size, cluster;
static uint8_t *model;          /* expected content of the whole device */
static uint8_t *arena;          /* I/O buffers: window offset -> arena offset */
static struct batch cur;
static bool stopping;
static pthread_barrier_t start_bar, done_bar;
static uint64_t rng_state;
static unsigned long kind_count[K_NKINDS], thread_count[NTHREADS];
static int thread_cpu[NTHREADS];

static uint64_t rnd(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

/* Uniform in [0, n). */
static uint64_t rnd_below(uint64_t n)
{
	return n ? rnd() % n : 0;
}

static bool chance(unsigned percent)
{
	return rnd_below(100) < percent;
}

static void fill_random(uint8_t *p, uint64_t len)
{
	for (uint64_t i = 0; i < len; i += 8) {
		uint64_t v = rnd();
		memcpy(p + i, &v, len - i < 8 ? len - i : 8);
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* ---- batch generation (main thread) ------------------------------------ */

static uint64_t window_unit(void)
{
	/* 512 B clusters: windows of at least 4 KiB (8 clusters). */
	return cluster < 4096 ? 4096 : cluster;
}

/* A window: one cluster (or a part of it) or 2-3 clusters, at most 4 MiB;
 * big clusters mostly get one (under TCG, bytes moved are what the time
 * goes on). */
static void pick_window(struct batch *b, const uint64_t *hot, int nhot)
{
	bool big = cluster > (256u << 10);
	uint64_t unit = window_unit(), nunits = dev_size / unit, u;
	uint64_t n = chance(big ? 70 : 45) ? 1 : 2 + rnd_below(2);
	uint64_t nmax = (4u << 20) / unit < 2 ? 2 : (4u << 20) / unit;

	if (n > nmax)
		n = nmax;
	if (n > nunits)
		n = nunits;
	u = chance(50) ? hot[rnd_below(nhot)] : rnd_below(nunits);
	if (u > nunits - n)
		u = nunits - n;
	b->wstart = u * unit;
	b->wlen = n * unit;
	if (n == 1 && cluster > 4096 && chance(big ? 60 : 30)) {
		/* A part of one big cluster, so that pieces stay small. */
		uint64_t secs = cluster / SECTOR, max = (256u << 10) / SECTOR;
		uint64_t len = 1 + rnd_below(secs < max ? secs : max);
		b->wstart += rnd_below(secs - len + 1) * SECTOR;
		b->wlen = len * SECTOR;
	}
}

static void add_req(struct batch *b, enum kind k, uint64_t off, uint64_t len)
{
	struct req *r = &b->r[b->n++];

	*r = (struct req){ .kind = k, .off = off, .len = len,
			   .thread = (int)rnd_below(NTHREADS) };
	switch (k) {
	case K_WRITE:
		fill_random(arena + (off - b->wstart), len);
		memcpy(model + off, arena + (off - b->wstart), len);
		break;
	case K_ZERO:
	case K_PUNCH:
	case K_DISCARD:
		memset(model + off, 0, len);
		break;
	case K_READ:
	case K_FSYNC:
	case K_NKINDS:
		break;
	}
	kind_count[k]++;
	thread_count[r->thread]++;
}

static enum kind pick_kind(bool whole_cluster)
{
	/* Discards mostly get pieces that hold a whole cluster. */
	static const unsigned w_whole[K_NKINDS + 1] = {
		[K_WRITE] = 5, [K_ZERO] = 3, [K_PUNCH] = 2, [K_DISCARD] = 6,
		[K_READ] = 3, [K_FSYNC] = 0, [K_NKINDS] = 1,
	};
	static const unsigned w_part[K_NKINDS + 1] = {
		[K_WRITE] = 7, [K_ZERO] = 3, [K_PUNCH] = 2, [K_DISCARD] = 1,
		[K_READ] = 4, [K_FSYNC] = 0, [K_NKINDS] = 1,
	};
	const unsigned *w = whole_cluster ? w_whole : w_part;
	unsigned total = 0, x;
	int k;

	for (k = 0; k <= K_NKINDS; k++)
		total += w[k];
	x = (unsigned)rnd_below(total);
	for (k = 0; x >= w[k]; k++)
		x -= w[k];
	return (enum kind)k;           /* K_NKINDS: no request */
}

static void gen_batch(struct batch *b, const uint64_t *hot, int nhot)
{
	uint64_t cuts[16], d0 = 0, d1 = 0;
	int ncuts = 0, nrand = 1 + (int)rnd_below(8);

	b->n = 0;
	pick_window(b, hot, nhot);
	if (b->wlen >= 2 * cluster && chance(40)) {
		/* Whole clusters [d0, d1) discarded, next to pieces of the
		 * clusters around them (written, most likely). */
		uint64_t ncl = b->wlen / cluster;
		uint64_t first = 1 + rnd_below(ncl - 1);
		d0 = b->wstart + first * cluster;
		d1 = d0 + (1 + rnd_below(ncl - first)) * cluster;
		cuts[ncuts++] = d0;
		cuts[ncuts++] = d1;
	}
	cuts[ncuts++] = b->wstart;
	cuts[ncuts++] = b->wstart + b->wlen;
	for (int i = 0; i < nrand; i++) {
		uint64_t step = chance(30) && b->wlen >= cluster ? cluster : SECTOR;
		uint64_t x = b->wstart + rnd_below(b->wlen / step + 1) * step;
		if (!(d0 < x && x < d1))
			cuts[ncuts++] = x;
	}
	qsort(cuts, ncuts, sizeof(cuts[0]), cmp_u64);
	for (int i = 0; i + 1 < ncuts; i++) {
		uint64_t s = cuts[i], e = cuts[i + 1];
		uint64_t cs = (s + cluster - 1) / cluster * cluster;
		uint64_t ce = e / cluster * cluster;
		enum kind k;

		if (s == e)
			continue;
		if (s == d0 && d1)
			k = K_DISCARD;
		else if (d1 && (e == d0 || s == d1))
			k = K_WRITE;
		else
			k = pick_kind(ce > cs);
		if (k == K_DISCARD) {
			/* Only the whole clusters inside the piece (the kernel may
			 * split a discard; whole clusters must read as zeros). */
			if (ce <= cs) {
				k = K_WRITE;
			} else {
				s = cs;
				e = ce;
			}
		}
		if (k != K_NKINDS)
			add_req(b, k, s, e - s);
	}
	if (chance(30))
		add_req(b, K_FSYNC, 0, 0);
	/* Shuffle: the submission order within a thread varies too. */
	for (int i = b->n - 1; i > 0; i--) {
		int j = (int)rnd_below(i + 1);
		struct req t = b->r[i];
		b->r[i] = b->r[j];
		b->r[j] = t;
	}
}

/* ---- workers ------------------------------------------------------------ */

static void run_part(struct io_uring *ring, int self)
{
	struct batch *b = &cur;
	int inflight = 0;

	for (int i = 0; i < b->n; i++) {
		struct req *r = &b->r[i];
		struct io_uring_sqe *sqe;
		uint8_t *buf = arena + (r->off - b->wstart);

		if (r->thread != self || r->kind == K_DISCARD)
			continue;
		sqe = io_uring_get_sqe(ring);
		switch (r->kind) {
		case K_WRITE:
			io_uring_prep_write(sqe, dev_fd, buf, r->len, r->off);
			break;
		case K_READ:
			io_uring_prep_read(sqe, dev_fd, buf, r->len, r->off);
			break;
		case K_ZERO:
			io_uring_prep_fallocate(sqe, dev_fd, FALLOC_FL_ZERO_RANGE,
						r->off, r->len);
			break;
		case K_PUNCH:
			io_uring_prep_fallocate(sqe, dev_fd,
						FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
						r->off, r->len);
			break;
		case K_FSYNC:
			io_uring_prep_fsync(sqe, dev_fd, 0);
			break;
		case K_DISCARD:
		case K_NKINDS:
			break;
		}
		io_uring_sqe_set_data(sqe, r);
		inflight++;
	}
	if (inflight) {
		int ret = io_uring_submit(ring);
		if (ret != inflight) {
			fprintf(stderr, "ublk-race: io_uring_submit: %s\n",
				strerror(ret < 0 ? -ret : EIO));
			exit(1);
		}
	}
	/* Discards are synchronous: they run while the above are in flight. */
	for (int i = 0; i < b->n; i++) {
		struct req *r = &b->r[i];
		uint64_t range[2] = { r->off, r->len };

		if (r->thread != self || r->kind != K_DISCARD)
			continue;
		r->res = ioctl(dev_fd, BLKDISCARD, range) ? -errno : (int)r->len;
	}
	while (inflight) {
		struct io_uring_cqe *cqe;
		struct req *r;
		int ret = io_uring_wait_cqe(ring, &cqe);

		if (ret < 0) {
			fprintf(stderr, "ublk-race: io_uring_wait_cqe: %s\n", strerror(-ret));
			exit(1);
		}
		r = io_uring_cqe_get_data(cqe);
		r->res = cqe->res;
		/* fallocate and fsync return 0 on success */
		if (r->res == 0 && (r->kind == K_ZERO || r->kind == K_PUNCH ||
				    r->kind == K_FSYNC))
			r->res = (int)r->len;
		if (r->kind == K_READ && r->res == (int)r->len)
			r->bad_data = memcmp(arena + (r->off - b->wstart),
					     model + r->off, r->len) != 0;
		io_uring_cqe_seen(ring, cqe);
		inflight--;
	}
}

static void *worker(void *arg)
{
	int self = (int)(intptr_t)arg, ret;
	struct io_uring ring;
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(self, &set);
	ret = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
	if (ret)
		fprintf(stderr, "ublk-race: warning: pinning thread %d to CPU %d: %s\n",
			self, self, strerror(ret));
	ret = io_uring_queue_init(2 * MAX_REQS, &ring, 0);
	if (ret < 0) {
		fprintf(stderr, "ublk-race: io_uring_queue_init: %s\n", strerror(-ret));
		exit(1);
	}
	for (;;) {
		pthread_barrier_wait(&start_bar);
		if (stopping)
			break;
		thread_cpu[self] = sched_getcpu();
		run_part(&ring, self);
		pthread_barrier_wait(&done_bar);
	}
	io_uring_queue_exit(&ring);
	return NULL;
}

/* ---- checking (main thread) --------------------------------------------- */

static void dump_batch(const struct batch *b, int index)
{
	fprintf(stderr, "  batch %d: window [%" PRIu64 ", %" PRIu64 ")\n",
		index, b->wstart, b->wstart + b->wlen);
	for (int i = 0; i < b->n; i++) {
		const struct req *r = &b->r[i];
		fprintf(stderr, "    thread %d %-10s %" PRIu64 " +%" PRIu64 " -> %d%s\n",
			r->thread, kind_name[r->kind], r->off, r->len, r->res,
			r->bad_data ? " (data differs from the model)" : "");
	}
}

/* Compares @got with the model at @off; reports the first difference. */
static bool same_as_model(const uint8_t *got, uint64_t off, uint64_t len, const char *what)
{
	uint64_t i, j;

	if (!memcmp(got, model + off, len))
		return true;
	for (i = 0; i < len && got[i] == model[off + i]; i++)
		;
	for (j = i; j < len && got[j] != model[off + j]; j++)
		;
	fprintf(stderr, "ublk-race: %s: byte %" PRIu64 " is 0x%02x, expected 0x%02x "
		"(%" PRIu64 " differing bytes from there; cluster %" PRIu64 ")\n",
		what, off + i, got[i], model[off + i], j - i, (off + i) / cluster);
	return false;
}

static int pread_full(uint8_t *buf, uint64_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pread(dev_fd, buf, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		buf += n;
		len -= (uint64_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static bool check_batch(int index, uint8_t *check)
{
	const struct batch *b = &cur;
	bool ok = true;
	int ret;

	for (int i = 0; i < b->n; i++) {
		if (b->r[i].res != (int)b->r[i].len || b->r[i].bad_data)
			ok = false;
	}
	if (!ok) {
		fprintf(stderr, "ublk-race: batch %d: a request failed or read wrong data\n", index);
	} else if ((ret = pread_full(check, b->wlen, b->wstart)) < 0) {
		fprintf(stderr, "ublk-race: reading back the window: %s\n", strerror(-ret));
		ok = false;
	} else {
		ok = same_as_model(check, b->wstart, b->wlen, "window after the batch");
	}
	if (!ok)
		dump_batch(b, index);
	return ok;
}

static int load_file(const char *path, uint8_t *buf, uint64_t len)
{
	int fd = open(path, O_RDONLY);
	uint64_t done = 0;

	if (fd < 0)
		return -errno;
	while (done < len) {
		ssize_t n = read(fd, buf + done, len - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int err = n < 0 ? -errno : -EINVAL;   /* short: wrong size */
			close(fd);
			return err;
		}
		done += (uint64_t)n;
	}
	close(fd);
	return 0;
}

static int save_file(const char *path, const uint8_t *buf, uint64_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	uint64_t done = 0;

	if (fd < 0)
		return -errno;
	while (done < len) {
		ssize_t n = write(fd, buf + done, len - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int err = -errno;
			close(fd);
			return err;
		}
		done += (uint64_t)n;
	}
	if (close(fd))
		return -errno;
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: ublk-race [-s SEED] [-c CLUSTER] [-b BATCHES] "
		"[-i INIT.raw] DEV MODEL.raw\n");
	exit(2);
}

int main(int argc, char **argv)
{
	uint64_t seed = 1, hot[8];
	const char *init = NULL;
	long batches = 200, done = 0;
	pthread_t th[NTHREADS];
	uint8_t *check;
	int opt, ret;
	bool ok = true;
	struct timespec t0, t1;

	cluster = 65536;
	while ((opt = getopt(argc, argv, "s:c:b:i:")) != -1) {
		switch (opt) {
		case 's': seed = strtoull(optarg, NULL, 0); break;
		case 'c': cluster = strtoull(optarg, NULL, 0); break;
		case 'b': batches = strtol(optarg, NULL, 0); break;
		case 'i': init = optarg; break;
		default: usage();
		}
	}
	if (argc - optind != 2 || cluster < SECTOR || cluster % SECTOR ||
	    cluster > (64u << 20) || batches < 0)
		usage();
	rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;

	dev_fd = open(argv[optind], O_RDWR | O_DIRECT);
	if (dev_fd < 0) {
		fprintf(stderr, "ublk-race: open %s: %s\n", argv[optind], strerror(errno));
		return 1;
	}
	if (ioctl(dev_fd, BLKGETSIZE64, &dev_size)) {
		fprintf(stderr, "ublk-race: BLKGETSIZE64 %s: %s\n", argv[optind], strerror(errno));
		return 1;
	}
	if (dev_size % cluster || dev_size < 4 * window_unit()) {
		fprintf(stderr, "ublk-race: device size %" PRIu64 " is not a multiple of "
			"the cluster size or too small\n", dev_size);
		return 1;
	}
	model = calloc(1, dev_size);
	if (posix_memalign((void **)&arena, 4096, 3 * window_unit()) ||
	    posix_memalign((void **)&check, 4096, 3 * window_unit()) || !model) {
		fprintf(stderr, "ublk-race: out of memory\n");
		return 1;
	}
	if (init && (ret = load_file(init, model, dev_size)) < 0) {
		fprintf(stderr, "ublk-race: reading %s (%" PRIu64 " bytes): %s\n",
			init, dev_size, strerror(-ret));
		return 1;
	}
	for (unsigned i = 0; i < 8; i++)
		hot[i] = rnd_below(dev_size / window_unit());

	clock_gettime(CLOCK_MONOTONIC, &t0);
	pthread_barrier_init(&start_bar, NULL, NTHREADS + 1);
	pthread_barrier_init(&done_bar, NULL, NTHREADS + 1);
	for (int t = 0; t < NTHREADS; t++) {
		ret = pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
		if (ret) {
			fprintf(stderr, "ublk-race: pthread_create: %s\n", strerror(ret));
			return 1;
		}
	}
	for (; done < batches && ok; done++) {
		gen_batch(&cur, hot, 8);
		pthread_barrier_wait(&start_bar);
		pthread_barrier_wait(&done_bar);
		ok = check_batch((int)done, check);
	}
	stopping = true;
	pthread_barrier_wait(&start_bar);
	for (int t = 0; t < NTHREADS; t++)
		pthread_join(th[t], NULL);

	/* The whole device: nothing outside the windows may have changed. */
	for (uint64_t off = 0; ok && off < dev_size; off += 3 * window_unit()) {
		uint64_t len = dev_size - off < 3 * window_unit() ? dev_size - off : 3 * window_unit();
		ret = pread_full(check, len, off);
		if (ret < 0) {
			fprintf(stderr, "ublk-race: reading the device: %s\n", strerror(-ret));
			ok = false;
		} else {
			ok = same_as_model(check, off, len, "final read of the device");
		}
	}
	ret = save_file(argv[optind + 1], model, dev_size);
	if (ret < 0) {
		fprintf(stderr, "ublk-race: writing %s: %s\n", argv[optind + 1], strerror(-ret));
		ok = false;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("ublk-race: seed %" PRIu64 ", cluster %" PRIu64 ", %" PRIu64 " bytes, "
	       "%ld batches in %.1f s: ", seed, cluster, dev_size, done,
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	for (int k = 0; k < K_NKINDS; k++)
		printf("%s%lu %s", k ? ", " : "", kind_count[k], kind_name[k]);
	printf("; thread 0 (cpu %d) %lu, thread 1 (cpu %d) %lu requests: %s\n",
	       thread_cpu[0], thread_count[0], thread_cpu[1], thread_count[1],
	       ok ? "ok" : "FAILED");
	if (!ok)
		fprintf(stderr, "ublk-race: replay with -s %" PRIu64 " -c %" PRIu64 " -b %ld\n",
			seed, cluster, batches);
	close(dev_fd);
	free(model);
	free(arena);
	free(check);
	return ok ? 0 : 1;
}
