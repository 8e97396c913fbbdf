/* SPDX-License-Identifier: MIT */
/*
 * Per-thread event loop: one io_uring and a ready list of coroutines.
 *
 * user_data of every SQE is a struct aio_req * (or 0 for fire-and-forget
 * SQEs whose completion nobody waits for); this file is the only place
 * that encodes or decodes it.  Completions are copied out of the CQ ring
 * before their callbacks run, so a callback may submit new SQEs freely.
 */
#include "common/aio.h"

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h"

static __thread struct aio_ctx *cur_ctx;

static void remote_complete(struct aio_req *req, int res);

/*
 * Ring setup flags, best first.  A kernel that does not know one of them
 * refuses the set with EINVAL, and the next set is tried.
 *   SINGLE_ISSUER (6.0): only the thread that made the ring submits to it
 *     (every aio_ctx is made on the thread that runs it).
 * With AIO_CTX_DEFER_TASKRUN (the NBD server's loop, for now):
 *   DEFER_TASKRUN (6.1): completions that reach us as task work (a polled
 *     socket that became readable, I/O punted to io-wq, MSG_RING wakeups)
 *     are neither signalled to this thread nor run at its other system
 *     calls: they wait until it asks for completions in io_uring_enter,
 *     and then run as one batch.  The thread that makes the socket
 *     readable (the NBD client) then pays no interrupt to wake us, and a
 *     loop that spins before sleeping (aio_ctx.spin_ns) sees the work
 *     in the ring's flags and takes it without ever being woken.  That
 *     suits a loop that only ever sleeps in io_uring_enter; a loop thread
 *     inside another system call holds back its own completions until
 *     that call returns.  Not for the ublk queues: A/B runs in the VM
 *     (bench/vm-ublk.sh --ab; 6.12 with copies, 7.3 with zero copy)
 *     found no gain beyond the spread between rounds.
 * Every ring (the deferred sets' fallback):
 *   COOP_TASKRUN (5.19): the same completions run at the thread's next
 *     system call instead of interrupting it in user space.  Without it,
 *     each ublk request that reaches a queue thread while it runs costs a
 *     rescheduling IPI to kick it (0.20-0.31 per request in the VM on
 *     6.12, against 0.02 with it, as for ublksrv, which sets it:
 *     bench/vm-ublk.sh --events).
 *   TASKRUN_FLAG (5.19): the kernel marks pending task work in the SQ
 *     ring's flags, so liburing enters for it when the loop only peeks.
 *     (The first version of this loop set COOP_TASKRUN without it and saw
 *     cross-thread wakeups stall for seconds; the cause was not found,
 *     and today's loop stalls with neither: README, What the code taught
 *     us.)
 */
static const unsigned deferred_flag_sets[] = {
	IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	0,
};
static const unsigned default_flag_sets[] = {
	IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	0,
};

int aio_ctx_init_flags(struct aio_ctx *ctx, unsigned entries, unsigned flags)
{
	const unsigned *sets = (flags & AIO_CTX_DEFER_TASKRUN) ? deferred_flag_sets
							       : default_flag_sets;
	struct io_uring_params p;
	int ret;

	memset(ctx, 0, sizeof(*ctx));
	ctx->remote_req.complete = remote_complete;
	ctx->files_base = -1;
	/* Each list ends with 0: its EINVAL is the caller's. */
	for (size_t i = 0;; i++) {
		memset(&p, 0, sizeof(p));
		p.flags = sets[i] | IORING_SETUP_CQSIZE;
		p.cq_entries = entries * 4;
		ret = io_uring_queue_init_params(entries, &ctx->ring, &p);
		if (ret != -EINVAL || !sets[i])
			break;
	}
	/* io_uring_enter then finds the ring by index instead of a
	 * descriptor lookup and file reference per call.  Per thread, like
	 * the ring (SINGLE_ISSUER); a kernel without it (before 5.18) keeps
	 * the descriptor. */
	if (ret == 0)
		io_uring_register_ring_fd(&ctx->ring);
	return ret;
}

int aio_ctx_init(struct aio_ctx *ctx, unsigned entries)
{
	return aio_ctx_init_flags(ctx, entries, 0);
}

void aio_ctx_deinit(struct aio_ctx *ctx)
{
	io_uring_queue_exit(&ctx->ring);
	if (cur_ctx == ctx)
		cur_ctx = NULL;
}

/* The io layer's slots come after the owner's (at most 4) files. */
int aio_ctx_register_files(struct aio_ctx *ctx, const int *fds, unsigned n)
{
	int table[4 + AIO_FILES];
	int ret;

	if (n > 4)
		return -EINVAL;
	for (unsigned i = 0; i < n + AIO_FILES; i++)
		table[i] = i < n ? fds[i] : -1;
	ret = io_uring_register_files(&ctx->ring, table, n + AIO_FILES);
	if (ret == 0) {
		ctx->files_base = (int)n;
		memset(ctx->file_ids, 0, sizeof(ctx->file_ids));
	}
	return ret;
}

int aio_file_index(struct aio_ctx *ctx, uint64_t id, int fd)
{
	unsigned slot = AIO_FILES;
	int ret;

	if (ctx->files_base < 0 || fd < 0)
		return -1;
	for (unsigned i = 0; i < AIO_FILES; i++) {
		if (ctx->file_ids[i] == id)
			return ctx->files_base + (int)i;
		if (!ctx->file_ids[i] && slot == AIO_FILES)
			slot = i;
	}
	/* A full table is not recycled: a long backing chain read in turn
	 * would cost a system call per operation.  Descriptors then. */
	if (slot == AIO_FILES)
		return -1;
	ret = io_uring_register_files_update(&ctx->ring, (unsigned)ctx->files_base + slot, &fd, 1);
	if (ret != 1) {
		/* Not again on every operation: descriptors from now on. */
		log_debug("io_uring file table update: %s", strerror(ret < 0 ? -ret : EIO));
		ctx->files_base = -1;
		return -1;
	}
	ctx->file_ids[slot] = id;
	return ctx->files_base + (int)slot;
}

void aio_ctx_set_current(struct aio_ctx *ctx) { cur_ctx = ctx; }
struct aio_ctx *aio_ctx_current(void) { return cur_ctx; }

struct io_uring_sqe *aio_get_sqe(struct aio_ctx *ctx, struct aio_req *req)
{
	struct io_uring_sqe *sqe;

	while (!(sqe = io_uring_get_sqe(&ctx->ring))) {
		int ret = io_uring_submit(&ctx->ring);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			log_error("io_uring_submit: %s", strerror(-ret));
			abort();
		}
		if (ret <= 0) {
			/* CQ pressure: reap without running callbacks is not
			 * possible here, so wait for the kernel to drain. */
			io_uring_submit_and_wait(&ctx->ring, 0);
		}
	}
	io_uring_sqe_set_data(sqe, req);
	ctx->inflight++;
	return sqe;
}

static void wait_complete(struct aio_req *req, int res)
{
	struct aio_wait *w = (struct aio_wait *)((char *)req - offsetof(struct aio_wait, req));

	w->res = res;
	w->done = true;
	if (w->co)
		coro_enter(w->co);
}

int aio_co_wait_sqe_as(struct aio_ctx *ctx, struct aio_wait *w, struct io_uring_sqe *sqe)
{
	(void)ctx;
	w->req.complete = wait_complete;
	w->done = false;
	w->co = coro_self();
	assert(w->co);
	io_uring_sqe_set_data(sqe, &w->req);
	while (!w->done)
		coro_yield();
	w->co = NULL;
	return w->res;
}

int aio_co_wait_sqe(struct aio_ctx *ctx, struct io_uring_sqe *sqe)
{
	struct aio_wait w = { .co = NULL };

	return aio_co_wait_sqe_as(ctx, &w, sqe);
}

void aio_cancel(struct aio_ctx *ctx, struct aio_wait *w)
{
	struct io_uring_sqe *sqe;

	if (!w->co)
		return;
	sqe = aio_get_sqe(ctx, NULL);
	io_uring_prep_cancel(sqe, &w->req, 0);
}

void aio_post_nop(struct aio_ctx *ctx, struct aio_req *req)
{
	struct io_uring_sqe *sqe = aio_get_sqe(ctx, req);

	io_uring_prep_nop(sqe);
}

void aio_co_sleep_ms(struct aio_ctx *ctx, unsigned ms)
{
	struct __kernel_timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	struct io_uring_sqe *sqe = aio_get_sqe(ctx, NULL);

	io_uring_prep_timeout(sqe, &ts, 0, 0);
	aio_co_wait_sqe(ctx, sqe);
}

/* Runs on the home loop when another thread posted to us. */
static void remote_complete(struct aio_req *req, int res)
{
	struct aio_ctx *ctx = (struct aio_ctx *)((char *)req - offsetof(struct aio_ctx, remote_req));
	struct coro *co;

	(void)res;
	spin_lock(&ctx->remote_spin);
	co = ctx->remote_head;
	ctx->remote_head = ctx->remote_tail = NULL;
	ctx->remote_signalled = false;
	spin_unlock(&ctx->remote_spin);
	while (co) {
		struct coro *next = coro_next(co);
		aio_schedule(co);
		co = next;
	}
}

static void schedule_remote(struct aio_ctx *home, struct coro *co)
{
	bool signal;

	spin_lock(&home->remote_spin);
	coro_set_next(co, NULL);
	if (home->remote_tail)
		coro_set_next(home->remote_tail, co);
	else
		home->remote_head = co;
	home->remote_tail = co;
	signal = !home->remote_signalled;
	home->remote_signalled = true;
	spin_unlock(&home->remote_spin);
	if (signal) {
		/* Post a CQE to the home ring; submitted with our next batch
		 * (or now, when we are not inside a loop). */
		struct io_uring_sqe *sqe = aio_get_sqe(cur_ctx, NULL);
		io_uring_prep_msg_ring(sqe, home->ring.ring_fd, 0,
				       (uint64_t)(uintptr_t)&home->remote_req, 0);
		if (!coro_self())
			io_uring_submit(&cur_ctx->ring);
	}
}

void aio_schedule(struct coro *co)
{
	struct aio_ctx *ctx = cur_ctx, *home = coro_home(co);

	assert(ctx);
	if (home && home != ctx) {
		schedule_remote(home, co);
		return;
	}
	coro_set_next(co, NULL);
	if (ctx->ready_tail)
		coro_set_next(ctx->ready_tail, co);
	else
		ctx->ready_head = co;
	ctx->ready_tail = co;
}

/* Submit what is queued, then watch for up to ctx->spin_ns for a CQE, for
 * task work the kernel holds for us (IORING_SQ_TASKRUN: a socket became
 * readable under a polled recv) or for what ctx->idle_hook finds.  True
 * if there is work: the caller then enters without sleeping. */
static bool spin_for_work(struct aio_ctx *ctx)
{
	struct io_uring *ring = &ctx->ring;
	uint64_t deadline = 0;

	io_uring_submit(ring);
	for (unsigned i = 0;; i++) {
		/* The hook first: a ring that always has work (task work
		 * flagged over and over) must not starve what it watches. */
		if ((i & 63) == 0 && ctx->idle_hook && ctx->idle_hook(ctx->idle_opaque, false))
			return true;
		if (io_uring_cq_ready(ring) ||
		    (IO_URING_READ_ONCE(*ring->sq.kflags) & IORING_SQ_TASKRUN))
			return true;
		if ((i & 63) == 0) {
			struct timespec ts;
			clock_gettime(CLOCK_MONOTONIC, &ts);
			uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
			if (!deadline)
				deadline = now + ctx->spin_ns;
			else if (now >= deadline)
				return ctx->idle_hook && ctx->idle_hook(ctx->idle_opaque, true);
		}
		cpu_relax();
	}
}

static unsigned run_ready(struct aio_ctx *ctx)
{
	unsigned ran = 0;
	/* Drain the list, including coroutines woken while it runs: a lock
	 * handed to a waiter must not stay parked until the next loop
	 * iteration, or every later arrival queues behind it (a convoy
	 * costing one io_uring_enter per request). */
	struct coro *co;

	while ((co = ctx->ready_head)) {
		ctx->ready_head = coro_next(co);
		if (!ctx->ready_head)
			ctx->ready_tail = NULL;
		coro_set_next(co, NULL);
		coro_enter(co);
		ran++;
	}
	return ran;
}

#define AIO_REAP_BATCH 64

int aio_run_once(struct aio_ctx *ctx, bool block)
{
	struct io_uring_cqe *cqes[AIO_REAP_BATCH];
	struct { struct aio_req *req; int res; unsigned flags; } done[AIO_REAP_BATCH];
	unsigned n, i;
	int ret;

	unsigned ran = run_ready(ctx);
	/* Block even with nothing in flight (a coroutine parked on a lock
	 * held by another thread is woken by a MSG_RING CQE), but not after
	 * running coroutines: the caller's exit condition may now hold. */
	unsigned wait = (block && !ran && !ctx->ready_head) ? 1 : 0;
	if (wait && ctx->spin_ns && spin_for_work(ctx))
		wait = 0;
	else if (!wait && ctx->idle_hook)
		ctx->idle_hook(ctx->idle_opaque, false);    /* a busy loop looks too */
	if (ctx->submit_hook)
		ctx->submit_hook(ctx->submit_opaque);
	ret = io_uring_submit_and_wait(&ctx->ring, wait);
	if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY && ret != -ETIME)
		return ret;
	do {
		n = io_uring_peek_batch_cqe(&ctx->ring, cqes, AIO_REAP_BATCH);
		for (i = 0; i < n; i++) {
			done[i].req = io_uring_cqe_get_data(cqes[i]);
			done[i].res = cqes[i]->res;
			done[i].flags = cqes[i]->flags;
			/* Posted by another ring: not one of our SQEs.  A
			 * multishot SQE is in flight until its last CQE. */
			if (done[i].req != &ctx->remote_req && !(done[i].flags & IORING_CQE_F_MORE))
				ctx->inflight--;
		}
		io_uring_cq_advance(&ctx->ring, n);
		for (i = 0; i < n; i++) {
			if (!done[i].req)
				continue;
			ctx->cqe_flags = done[i].flags;
			ctx->reaped_left = n - i - 1;
			done[i].req->complete(done[i].req, done[i].res);
		}
		ctx->reaped_left = 0;
	} while (n == AIO_REAP_BATCH);
	return 0;
}

struct run_co {
	coro_fn fn;
	void *opaque;
};

int aio_run_coroutine(coro_fn fn, void *opaque)
{
	struct aio_ctx tmp, *ctx = cur_ctx;
	struct coro *co;
	int ret = 0;

	if (!ctx) {
		ret = aio_ctx_init(&tmp, 128);
		if (ret < 0) {
			log_error("io_uring_queue_init: %s", strerror(-ret));
			return ret;
		}
		ctx = &tmp;
		aio_ctx_set_current(ctx);
	}
	co = coro_new(fn, opaque, 0);
	if (!co) {
		ret = -errno;
		goto out;
	}
	aio_schedule(co);
	while (!coro_finished(co) || ctx->inflight || ctx->ready_head) {
		ret = aio_run_once(ctx, true);
		if (ret < 0) {
			log_error("io_uring_submit_and_wait: %s", strerror(-ret));
			break;
		}
	}
	coro_free(co);
out:
	if (ctx == &tmp)
		aio_ctx_deinit(&tmp);
	return ret;
}
