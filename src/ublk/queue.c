/* SPDX-License-Identifier: MIT */
/*
 * One ublk hardware queue: a thread with its own aio_ctx (one io_uring
 * carrying this queue's FETCH/COMMIT_AND_FETCH uring_cmds and the
 * target's backend I/O, submitted together) and one coroutine per tag.
 *
 * A tag's coroutine loops: hand the tag's buffer to the kernel with a
 * FETCH (first time) or COMMIT_AND_FETCH (carrying the previous result),
 * wait for the next request, check its descriptor at this boundary, run
 * the target op, repeat.  So every request the kernel gives us ends in
 * exactly one COMMIT, error paths included (the result is then -errno).
 * The loop ends when the kernel answers UBLK_IO_RES_ABORT (device
 * stopped) or any other error.
 *
 * Thread model: everything here runs on the queue thread except
 * ublk_queue_start/stop/join (main thread).  The device is read-only
 * while queues run; the per-queue state lives in struct ublk_queue, so
 * several queue threads share nothing but the target.
 *
 * Memory: iods are mapped, buffers (allocated by dev.c) and coroutine
 * stacks are allocated before the first FETCH; the request path
 * allocates nothing.
 *
 * Zero copy (the device has UBLK_F_AUTO_BUF_REG): each FETCH and COMMIT
 * carries the tag as a buffer index instead of a buffer address; before
 * the driver hands us a read or write, it registers the request's pages
 * at that index in this ring's buffer table (and drops them at the
 * COMMIT).  The target gets the tag's slot of a kernel buffer window
 * (common/kbuf.h) as the buffer, so its file reads and writes go straight
 * between the request's pages and the image.  If the driver could not
 * register them (UBLK_IO_F_NEED_REG_BUF), that request goes through the
 * tag's own buffer and user copy instead; so does a small read or write
 * that is the queue's only work, when the image file takes it inline
 * (handle_request).
 *
 * User copy alone (the device has UBLK_F_USER_COPY without AUTO_BUF_REG:
 * 6.12 with $QUBLK_USER_COPY=1): the commands carry no buffer address
 * and the driver copies nothing; handle_request copies each read's and
 * write's data by pread/pwrite of /dev/ublkcN, through the tag's buffer
 * or, for requests over the inline size, between the request's pages
 * and the image's mapping (io.c, do_rw).
 *
 * Batched commands (the device has UBLK_F_BATCH_IO): the same coroutines,
 * but a tag hands its result back and waits for its next request through
 * the queue's batches (batch.c) instead of its own uring_cmd.
 */
#include "ublk/queue-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/coro.h"
#include "common/util.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

int ublk_check_iod(const struct ublksrv_io_desc *iod, uint64_t dev_size,
		   uint32_t max_io, bool read_only, uint64_t *off, uint32_t *len)
{
	unsigned op = ublk_iod_op(iod);
	uint64_t end;

	*off = 0;
	*len = 0;
	switch (op) {
	case UBLK_IO_OP_FLUSH:
		return op;
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		break;
	default:
		return -EOPNOTSUPP;
	}
	if (iod->nr_sectors == 0 || iod->nr_sectors > (UINT32_MAX >> 9) ||
	    iod->start_sector > (UINT64_MAX >> 9))
		return -EINVAL;
	*off = iod->start_sector << 9;
	*len = iod->nr_sectors << 9;
	if (ckd_add(&end, *off, (uint64_t)*len) || end > dev_size)
		return -EINVAL;
	if ((op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE) && *len > max_io)
		return -EINVAL;
	if (op != UBLK_IO_OP_READ && read_only)
		return -EROFS;
	return op;
}

/* Whether the request a tag starts (busy_tags counts it) is all the
 * queue has to do: no other tag inside a target op, nothing reaped or
 * ready to run that could start one. */
static bool lone_request(struct ublk_queue *q)
{
	return q->busy_tags == 1 && aio_idle(&q->aio);
}

/* Run one request; returns the COMMIT result (bytes or -errno).  @buf is
 * the tag's buffer; @kbuf its kernel buffer slot (zero copy, user copy)
 * or NULL. */
static int handle_request(struct ublk_queue *q, unsigned tag, void *buf, void *kbuf)
{
	const struct ublk_dev *d = q->dev;
	const struct ublk_tgt *t = &d->tgt;
	const struct kbuf_ref whole = { .w = &q->kbufs, .index = tag };
	struct ublksrv_io_desc iod;
	bool by_copy, rw;
	uint64_t off;
	uint32_t len;
	int op, ret;

	/* Read the shared descriptor once: checks and use see one copy. */
	memcpy(&iod, (const void *)&q->iods[tag], sizeof(iod));
	op = ublk_check_iod(&iod, __atomic_load_n(&t->size, __ATOMIC_ACQUIRE), d->opts.max_io,
			    t->read_only, &off, &len);
	if (op < 0) {
		log_debug("queue %u tag %u: refused op 0x%x sector %llu+%u: %s",
			  q->q_id, tag, iod.op_flags, (unsigned long long)iod.start_sector,
			  iod.nr_sectors, strerror(-op));
		return op;
	}
	/* Zero copy: the tag's slot (@whole), unless the driver could not
	 * register the pages; then the tag's buffer, filled or emptied by
	 * user copy.  The same for a small read or write the image file
	 * takes inline when it is the queue's only work: a fixed-buffer op
	 * on a file in memory goes to an io-wq worker, and a lone request
	 * waits for that hand-over; copied, it never leaves this thread.
	 * Under load the hand-over overlaps other requests and zero copy is
	 * the cheaper (README, "Zero copy for a lone request").  User copy
	 * alone (6.12, on request): a small read or write through the tag's
	 * buffer, a larger one as the slot, which the io layer copies
	 * straight to or from the image's mapping where it has one, else
	 * through a bounce buffer (io.c, rw_kbuf). */
	rw = op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE;
	by_copy = kbuf && ((iod.op_flags & UBLK_IO_F_NEED_REG_BUF) ||
			   (rw && q->user_copy && len <= t->inline_max) ||
			   (rw && q->zero_copy && len <= t->inline_max && lone_request(q)));
	if (by_copy)
		q->nr_copied++;

	if (kbuf && !by_copy)
		buf = kbuf;
	if (by_copy && op == UBLK_IO_OP_WRITE && (ret = kbuf_user_copy(&whole, true, buf, len)) < 0) {
		log_error("queue %u tag %u: user copy of the write's data: %s", q->q_id, tag,
			  strerror(-ret));
		return ret;
	}
	switch (op) {
	case UBLK_IO_OP_READ:
		ret = t->ops->read((struct ublk_tgt *)t, buf, off, len);
		if (ret == 0 && by_copy && (ret = kbuf_user_copy(&whole, false, buf, len)) < 0)
			log_error("queue %u tag %u: user copy of the read's data: %s", q->q_id,
				  tag, strerror(-ret));
		return ret < 0 ? ret : (int)len;
	case UBLK_IO_OP_WRITE:
		ret = t->ops->write((struct ublk_tgt *)t, buf, off, len,
				    (iod.op_flags & UBLK_IO_F_FUA) ? BDRV_REQ_FUA : 0);
		return ret < 0 ? ret : (int)len;
	case UBLK_IO_OP_FLUSH:
		return t->ops->flush((struct ublk_tgt *)t);
	case UBLK_IO_OP_DISCARD:
		if (!t->ops->discard)
			return -EOPNOTSUPP;
		return t->ops->discard((struct ublk_tgt *)t, off, len);
	case UBLK_IO_OP_WRITE_ZEROES:
		if (!t->ops->write_zeroes)
			return -EOPNOTSUPP;
		return t->ops->write_zeroes((struct ublk_tgt *)t, off, len,
					    (iod.op_flags & UBLK_IO_F_NOUNMAP) ? 0 : BDRV_REQ_MAY_UNMAP);
	}
	return -EOPNOTSUPP;
}

static void tag_main(void *opaque)
{
	struct ublk_io *io = opaque;
	struct ublk_queue *q = io->q;
	const struct ublk_dev *d = q->dev;
	uint8_t *buf = ublk_tag_buf(q, io->tag);
	uint8_t *kbuf = q->zero_copy || q->user_copy
				? q->kbufs.base + (size_t)io->tag * q->kbufs.stride
				: NULL;
	/* Zero copy: the command carries no buffer address; the SQE's own
	 * addr field names the index the driver registers the pages at
	 * (FALLBACK: if it cannot, it says so instead of failing the
	 * request). */
	uint64_t addr = kbuf ? 0 : (uint64_t)(uintptr_t)buf;
	bool commit = false;
	int result = 0;

	for (;;) {
		int res;

		if (q->batch) {
			res = ublk_batch_next(io, commit, result);
			if (res != UBLK_IO_RES_OK)
				break;
		} else {
			struct io_uring_sqe *sqe = aio_get_sqe(&q->aio, NULL);

			ublk_io_prep(sqe, d->cdev_fd, ublk_io_opcode(commit, d->encode_io),
				     q->q_id, io->tag, result, addr);
			if (q->zero_copy)
				sqe->addr = ublk_auto_buf_reg_addr((__u16)io->tag,
								   UBLK_AUTO_BUF_REG_FALLBACK);
			ublk_queue_cdev_sqe(q, sqe);
			res = aio_co_wait_sqe(&q->aio, sqe);
			if (res != UBLK_IO_RES_OK) {
				if (res != UBLK_IO_RES_ABORT)
					log_error("queue %u tag %u: %s: %s", q->q_id, io->tag,
						  commit ? "COMMIT_AND_FETCH_REQ" : "FETCH_REQ",
						  strerror(-res));
				break;
			}
		}
		/* Asked to leave: a request that comes now is not started
		 * (the target may already be going).  The kernel requeues it
		 * when this thread exits (see ublk_queue_stop). */
		if (q->stop_now)
			break;
		q->busy_tags++;
		result = handle_request(q, io->tag, buf, kbuf);
		q->busy_tags--;
		q->nr_ios++;
		if (result < 0)
			q->nr_errors++;
		commit = true;
	}
	q->live_tags--;
}

static void stop_complete(struct aio_req *req, int res)
{
	struct ublk_queue *q = (struct ublk_queue *)((char *)req - offsetof(struct ublk_queue, stop_req));

	(void)res;
	q->stop_now = true;
}

static unsigned ring_entries(unsigned depth)
{
	unsigned n = 64;

	/* One uring_cmd per tag plus room for the target's own SQEs. */
	while (n < 2 * depth && n < 4096)
		n <<= 1;
	return n;
}

static int queue_setup(struct ublk_queue *q)
{
	const struct ublk_dev *d = q->dev;
	long page = sysconf(_SC_PAGESIZE);
	size_t stride = ALIGN_UP((size_t)UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc),
				 (size_t)page);
	struct io_uring_sqe *sqe;
	int ret;

	ret = aio_ctx_init(&q->aio, ring_entries(q->depth));
	if (ret < 0) {
		log_error("queue %u: io_uring_queue_init: %s", q->q_id, strerror(-ret));
		return ret;
	}
	q->ring_open = true;
	aio_ctx_set_current(&q->aio);
	/* Without it each command looks the descriptor up (and, in a
	 * threaded process, takes a reference to the file) as it is issued.
	 * The io layer names the image files by index too: the ring closes
	 * before the target's files (queue_teardown, ublk_queue_join). */
	ret = aio_ctx_register_files(&q->aio, &d->cdev_fd, 1);
	if (ret < 0)
		log_debug("queue %u: io_uring file table: %s", q->q_id, strerror(-ret));
	q->cdev_fixed = ret == 0;
	if (q->zero_copy) {
		/* Empty slots, one per tag, for the driver to fill.  Tests:
		 * $QUBLK_TEST_ZC_SLOTS fewer, so that the driver cannot
		 * register the higher tags' pages and those requests take
		 * the fallback (UBLK_IO_F_NEED_REG_BUF). */
		const char *t = getenv("QUBLK_TEST_ZC_SLOTS");
		unsigned long slots = t ? strtoul(t, NULL, 10) : 0;

		if (slots == 0 || slots > q->depth)
			slots = q->depth;
		ret = io_uring_register_buffers_sparse(&q->aio.ring, (unsigned)slots);
		if (ret < 0) {
			log_error("queue %u: io_uring buffer table: %s", q->q_id, strerror(-ret));
			return ret;
		}
	}

	/* The kernel places queue i's descriptors at i * stride. */
	q->iods_len = ALIGN_UP(q->depth * sizeof(struct ublksrv_io_desc), (size_t)page);
	q->iods = mmap(NULL, q->iods_len, PROT_READ, MAP_SHARED | MAP_POPULATE, d->cdev_fd,
		       UBLKSRV_CMD_BUF_OFFSET + (off_t)q->q_id * (off_t)stride);
	if (q->iods == MAP_FAILED) {
		ret = -errno;
		q->iods = NULL;
		log_error("/dev/ublkc%u: mmap of queue %u descriptors: %s", d->info.dev_id,
			  q->q_id, strerror(errno));
		return ret;
	}

	if (d->info.flags & UBLK_F_BATCH_IO) {
		ret = ublk_batch_setup(q);
		if (ret < 0)
			return ret;
	}

	q->ios = calloc(q->depth, sizeof(*q->ios));
	if (!q->ios)
		return -ENOMEM;
	for (unsigned i = 0; i < q->depth; i++) {
		q->ios[i].q = q;
		q->ios[i].tag = i;
		q->ios[i].co = coro_new(tag_main, &q->ios[i], 0);
		if (!q->ios[i].co) {
			ret = -errno;
			log_error("queue %u: coroutine stacks: %s", q->q_id, strerror(errno));
			return ret;
		}
	}

	/* The main thread's way to make us leave without the kernel. */
	q->stop_req.complete = stop_complete;
	sqe = aio_get_sqe(&q->aio, &q->stop_req);
	io_uring_prep_read(sqe, q->stop_efd, &q->stop_val, sizeof(q->stop_val), 0);

	for (unsigned i = 0; i < q->depth; i++) {
		q->live_tags++;
		aio_schedule(q->ios[i].co);
	}
	/* Run the tags to their first FETCH and submit them all; a FETCH the
	 * driver refuses fails inline, so a second round reaps it. */
	ret = aio_run_once(&q->aio, false);
	if (ret == 0 && q->batch)
		ret = ublk_batch_start(q);
	if (ret == 0)
		ret = aio_run_once(&q->aio, false);
	if (ret < 0) {
		log_error("queue %u: io_uring_submit: %s", q->q_id, strerror(-ret));
		return ret;
	}
	if (q->live_tags != q->depth) {
		log_error("queue %u: the driver refused %s", q->q_id,
			  q->batch ? "FETCH_IO_CMDS" : "FETCH_REQ");
		return -EIO;
	}
	return 0;
}

static void queue_teardown(struct ublk_queue *q)
{
	if (q->ios) {
		for (unsigned i = 0; i < q->depth; i++)
			if (q->ios[i].co)
				coro_free(q->ios[i].co);
		free(q->ios);
		q->ios = NULL;
	}
	/* Closing the ring cancels any uring_cmd still queued. */
	if (q->ring_open) {
		aio_ctx_deinit(&q->aio);
		q->ring_open = false;
	}
	if (q->iods) {
		munmap(q->iods, q->iods_len);
		q->iods = NULL;
	}
	/* After the ring: the kernel no longer reads the buffers. */
	ublk_batch_free(q);
}

/* The ring failed with requests inside the target.  Their coroutines
 * may hold the image's metadata lock or sit in wait lists that other
 * queues walk, and the I/O they wait for will never complete: freeing
 * their stacks would corrupt memory, and waiting would hang every queue.
 * End the daemon as a crash would (the image is crash-safe: leaks at
 * most); the kernel then fails or, with recovery, requeues the device's
 * requests. */
static void __attribute__((noreturn)) queue_die(struct ublk_queue *q)
{
	log_error("queue %u: %u requests in flight cannot complete; aborting", q->q_id,
		  q->busy_tags);
	abort();
}

/*
 * Submit what the last completions queued before the ring goes.  Those
 * completions ran tag coroutines to their end (aio_run_once reaps after
 * it submits), and a request that ends queues its COMMIT and, when it
 * releases a lock or a cluster another queue's request waits for, the
 * MSG_RING that wakes that request on its own thread.  Dropped with the
 * ring, the wake-up never comes: the other queue keeps a request inside
 * the target forever and never leaves (a hand-over, or del, then hangs).
 * Only submit: reaping could start new requests.
 */
static void flush_sqes(struct ublk_queue *q)
{
	if (q->batch)
		ublk_batch_flush(q);
	for (int tries = 0; io_uring_sq_ready(&q->aio.ring) && tries < 100; tries++) {
		int ret = io_uring_submit(&q->aio.ring);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			log_error("queue %u: io_uring_submit on exit: %s", q->q_id, strerror(-ret));
			return;
		}
		if (ret <= 0)
			usleep(1000);
	}
}

static void *queue_thread(void *opaque)
{
	struct ublk_queue *q = opaque;
	const struct ublk_dev *d = q->dev;
	uint64_t one = 1;
	unsigned nomem = 0;
	char name[16];
	int ret;

	snprintf(name, sizeof(name), "qublk-q%u", q->q_id);
	pthread_setname_np(pthread_self(), name);
	/* The flag is per task: every thread doing the device's I/O. */
	if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0)
		log_debug("queue %u: PR_SET_IO_FLUSHER: %s", q->q_id, strerror(errno));

	if (q->pin_cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(q->pin_cpu, &set);
		ret = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
		if (ret)
			log_debug("queue %u: pinning to CPU %d: %s", q->q_id, q->pin_cpu,
				  strerror(ret));
	}
	ret = queue_setup(q);
	q->init_ret = ret;
	sem_post(&q->ready);
	if (ret < 0) {
		queue_teardown(q);
		goto out;
	}

	/* After a stop request, leave once no tag is inside a target op:
	 * their buffers must outlive any backend I/O in flight. */
	while (q->live_tags && !(q->stop_now && !q->busy_tags)) {
		ret = aio_run_once(&q->aio, true);
		if (ret == -ENOMEM && ++nomem < 1000) {
			/* The kernel is short of memory: retry for ~10 s. */
			usleep(10000);
			continue;
		}
		nomem = 0;
		if (ret < 0) {
			log_error("queue %u: io_uring_submit_and_wait: %s", q->q_id, strerror(-ret));
			if (q->busy_tags)
				queue_die(q);
			break;
		}
	}
	flush_sqes(q);
	log_debug("queue %u: exit after %llu requests (%llu errors, %llu by user copy)", q->q_id,
		  (unsigned long long)q->nr_ios, (unsigned long long)q->nr_errors,
		  (unsigned long long)q->nr_copied);
	/* Hand-over: the ring outlives this thread (ublk_queue_join closes
	 * it), so the kernel cancels our commands as it does for a thread
	 * that dies, and requeues what reaches us from here on. */
	if (!q->keep_ring)
		queue_teardown(q);
out:
	if (write(d->exit_efd, &one, sizeof(one)) < 0)
		log_debug("queue %u: eventfd write: %s", q->q_id, strerror(errno));
	return NULL;
}

int ublk_queue_start(struct ublk_queue *q)
{
	pthread_attr_t attr;
	int ret;

	q->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (q->stop_efd < 0)
		return -errno;
	if (sem_init(&q->ready, 0, 0) < 0)
		return -errno;
	pthread_attr_init(&attr);
	/* Requests run on coroutine stacks; this one only runs the loop.
	 * Small, so that mlockall does not pin megabytes per queue. */
	pthread_attr_setstacksize(&attr, 256 * 1024);
	ret = -pthread_create(&q->thread, &attr, queue_thread, q);
	pthread_attr_destroy(&attr);
	if (ret < 0) {
		log_error("queue %u: pthread_create: %s", q->q_id, strerror(-ret));
		return ret;
	}
	q->thread_started = true;
	while (sem_wait(&q->ready) < 0 && errno == EINTR)
		;
	return q->init_ret;
}

void ublk_queue_stop(struct ublk_queue *q)
{
	uint64_t one = 1;

	if (q->stop_efd >= 0 && write(q->stop_efd, &one, sizeof(one)) < 0)
		log_debug("queue %u: eventfd write: %s", q->q_id, strerror(errno));
}

void ublk_queue_join(struct ublk_queue *q)
{
	if (q->thread_started) {
		pthread_join(q->thread, NULL);
		q->thread_started = false;
		sem_destroy(&q->ready);
		if (q->keep_ring)
			queue_teardown(q);
	}
	if (q->stop_efd >= 0) {
		close(q->stop_efd);
		q->stop_efd = -1;
	}
}
