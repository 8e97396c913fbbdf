/* SPDX-License-Identifier: MIT */
/*
 * Per-thread event loop: one io_uring shared by everything the thread does
 * (backend file I/O, sockets, ublk commands) plus a ready list of coroutines.
 *
 * Every SQE's user_data is a pointer to a struct aio_req; its complete()
 * runs on the loop with the CQE result.  This is the only place user_data
 * is encoded.  A multishot SQE completes its req once per CQE; the CQE's
 * flags (IORING_CQE_F_MORE: more to come; a provided buffer's id) are
 * aio_ctx.cqe_flags while complete() runs.  A coroutine waiting for one
 * SQE uses aio_co_wait_sqe(), or aio_co_wait_sqe_as() with a struct
 * aio_wait that another coroutine may cancel (aio_cancel()).
 *
 * Thread model: an aio_ctx is used only by the thread that made it current.
 */
#ifndef QUBLK_AIO_H
#define QUBLK_AIO_H

#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>

#include "coro.h"

struct aio_req {
	void (*complete)(struct aio_req *req, int res);
};

/* Slots of a ring's file table for the files the io layer reads and
 * writes (besides the owner's own, e.g. /dev/ublkcN). */
#define AIO_FILES 8

struct aio_ctx {
	struct io_uring ring;
	unsigned inflight;        /* SQEs handed out, CQEs not yet seen */
	struct coro *ready_head, *ready_tail;
	bool stop;
	/* Coroutines of this loop woken by other threads: pushed under
	 * remote_spin, announced with an IORING_OP_MSG_RING CQE whose
	 * user_data is &remote_req. */
	int remote_spin;
	bool remote_signalled;
	struct coro *remote_head, *remote_tail;
	struct aio_req remote_req;
	/* Before sleeping for completions, spin this long watching the
	 * rings for them (0: never).  A loop fed by a peer at a high rate
	 * (an NBD client) then takes most requests without being woken:
	 * the wakeup is what the peer pays for, in its own system call. */
	uint64_t spin_ns;
	/* Optional, with spin_ns: work the loop can look for while it spins
	 * that no SQE announces (sockets polled without arming a poll on
	 * them, so their peer pays no wakeup).  Called now and then during
	 * the spin (@sleeping false) and once more before sleeping (@sleeping
	 * true: the owner must then turn every such wait into an SQE).
	 * Returns true if it made a coroutine ready: the loop does not sleep. */
	bool (*idle_hook)(void *opaque, bool sleeping);
	void *idle_opaque;
	/* Optional: called before each submit, to queue the SQEs that carry
	 * what the coroutines just run left behind, gathered into one (the
	 * ublk queue's batched COMMIT). */
	void (*submit_hook)(void *opaque);
	void *submit_opaque;
	/* The flags of the CQE whose complete() runs (see above). */
	unsigned cqe_flags;
	/* CQEs reaped with it whose complete() has not run yet. */
	unsigned reaped_left;
	/* The ring's file table (aio_ctx_register_files): the owner's files
	 * at 0..files_base-1, then AIO_FILES slots the io layer fills as it
	 * uses files (aio_file_index); file_ids[i] names the io file in
	 * slot files_base + i (0: none).  files_base -1: no table. */
	int files_base;
	uint64_t file_ids[AIO_FILES];
};

/* Returns -errno. */
int aio_ctx_init(struct aio_ctx *ctx, unsigned entries);
/* With AIO_CTX_DEFER_TASKRUN: the ring defers task work to this thread's
 * waits (aio.c, ring setup flags), best with spin_ns set. */
#define AIO_CTX_DEFER_TASKRUN 1u
int aio_ctx_init_flags(struct aio_ctx *ctx, unsigned entries, unsigned flags);
void aio_ctx_deinit(struct aio_ctx *ctx);
/* Give the ring a file table: @fds (@n <= 4) at indexes 0..@n-1, then AIO_FILES
 * empty slots that aio_file_index() fills.  An SQE naming a file by its
 * index (IOSQE_FIXED_FILE) saves the kernel a descriptor lookup and a
 * file reference per operation.  The table holds its own reference to
 * each file until the slot is reused or the ring is closed: give a ring
 * a table only if it is closed before the files it serves (the ublk
 * queues: their rings close before the target does).  Returns -errno. */
int aio_ctx_register_files(struct aio_ctx *ctx, const int *fds, unsigned n);
/* Whether the loop has nothing else to run right now: no coroutine
 * ready, no completion reaped or posted that has not run.  Called from a
 * coroutine of the loop, it says that coroutine is all the work there is
 * (an SQE it or others wait for may still be in flight). */
static inline bool aio_idle(struct aio_ctx *ctx)
{
	return !ctx->ready_head && !ctx->reaped_left && !io_uring_cq_ready(&ctx->ring);
}
/* The table index of the file with io-layer @id (unique per open, never
 * reused) and descriptor @fd on @ctx's ring, putting it in a free slot
 * if it is not there; -1 where the ring has no table, the table is full
 * or the kernel refuses (the caller then names the descriptor).  @ctx's
 * thread only. */
int aio_file_index(struct aio_ctx *ctx, uint64_t id, int fd);
void aio_ctx_set_current(struct aio_ctx *ctx);
struct aio_ctx *aio_ctx_current(void);

/* Never NULL: submits queued SQEs to make room when the SQ is full. */
struct io_uring_sqe *aio_get_sqe(struct aio_ctx *ctx, struct aio_req *req);
/* Coroutine context: prepare @sqe via aio_get_sqe(NULL req) then wait.
 * Returns the CQE result. */
int aio_co_wait_sqe(struct aio_ctx *ctx, struct io_uring_sqe *sqe);

/* One awaited SQE that others can see and cancel: its waiter is known
 * while it is pending (co != NULL).  Zero-initialise before first use. */
struct aio_wait {
	struct aio_req req;
	struct coro *co;       /* waiting coroutine, NULL when not pending */
	int res;
	bool done;
};
/* Coroutine context: like aio_co_wait_sqe(), waiting as @w. */
int aio_co_wait_sqe_as(struct aio_ctx *ctx, struct aio_wait *w, struct io_uring_sqe *sqe);
/* True while a coroutine waits in aio_co_wait_sqe_as(@w). */
static inline bool aio_wait_pending(const struct aio_wait *w) { return w->co != NULL; }
/* Ask the kernel to cancel @w's SQE if it is pending; its waiter then
 * sees -ECANCELED, or the real result if the operation won the race.
 * Any context on @ctx's thread; a no-op when nothing is pending. */
void aio_cancel(struct aio_ctx *ctx, struct aio_wait *w);
/* Post a NOP completing as @req (whose complete() may do nothing): makes
 * a loop blocked in aio_run_once() return and re-check its condition. */
void aio_post_nop(struct aio_ctx *ctx, struct aio_req *req);
/* Coroutine context: sleep @ms milliseconds on the ring. */
void aio_co_sleep_ms(struct aio_ctx *ctx, unsigned ms);

/* Put @co on its home loop's ready list (waking that thread if it is not
 * this one); it runs from the loop. */
void aio_schedule(struct coro *co);
/* Submit, reap completions, run ready coroutines.  With @block, waits
 * for at least one completion if nothing is ready (call it only when
 * something is pending: I/O in flight or a coroutine that another thread
 * will wake).  Returns -errno. */
int aio_run_once(struct aio_ctx *ctx, bool block);
/* Run @fn in a new coroutine on the current thread and drive the loop
 * until it finishes (tools and tests).  Creates a temporary aio_ctx if the
 * thread has none.  Returns -errno on setup failure, else 0. */
int aio_run_coroutine(coro_fn fn, void *opaque);

#endif
