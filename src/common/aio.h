/* SPDX-License-Identifier: MIT */
/*
 * Per-thread event loop: one io_uring shared by everything the thread does
 * (backend file I/O, sockets, ublk commands) plus a ready list of coroutines.
 *
 * Every SQE's user_data is a pointer to a struct aio_req; its complete()
 * runs on the loop with the CQE result.  This is the only place user_data
 * is encoded.  A coroutine waiting for one SQE uses aio_submit_wait().
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
};

/* Returns -errno. */
int aio_ctx_init(struct aio_ctx *ctx, unsigned entries);
void aio_ctx_deinit(struct aio_ctx *ctx);
void aio_ctx_set_current(struct aio_ctx *ctx);
struct aio_ctx *aio_ctx_current(void);

/* Never NULL: submits queued SQEs to make room when the SQ is full. */
struct io_uring_sqe *aio_get_sqe(struct aio_ctx *ctx, struct aio_req *req);
/* Coroutine context: prepare @sqe via aio_get_sqe(NULL req) then wait.
 * Returns the CQE result. */
int aio_co_wait_sqe(struct aio_ctx *ctx, struct io_uring_sqe *sqe);

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
