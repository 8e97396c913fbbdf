/* SPDX-License-Identifier: MIT */
/*
 * Private to the queue thread's two files: queue.c (the thread, the tags'
 * coroutines, one command per request) and batch.c (batched commands,
 * UBLK_F_BATCH_IO).  Everything here runs on the queue thread.
 */
#ifndef QUBLK_UBLK_QUEUE_INT_H
#define QUBLK_UBLK_QUEUE_INT_H

#include <stdbool.h>
#include <stdint.h>

#include "ublk/ublk.h"

struct ublk_io {
	struct ublk_queue *q;
	unsigned tag;
	struct coro *co;
	/* Batched commands: the tag waits for FETCH to hand it a request
	 * (waiting), which sets res (UBLK_IO_RES_OK, or why there are no
	 * more) before it wakes the tag. */
	bool waiting;
	int res;
};

/* The tag's own buffer (copies; zero copy's fallback). */
static inline uint8_t *ublk_tag_buf(const struct ublk_queue *q, unsigned tag)
{
	return q->bufs + (size_t)tag * q->dev->opts.max_io;
}

/* An I/O uring_cmd SQE names /dev/ublkcN by its index in the ring's file
 * table when the queue registered it there. */
static inline void ublk_queue_cdev_sqe(const struct ublk_queue *q, struct io_uring_sqe *sqe)
{
	if (q->cdev_fixed) {
		sqe->fd = 0;
		sqe->flags |= IOSQE_FIXED_FILE;
	}
}

/* batch.c.  setup: before the tags start (buffers, the FETCH buffer
 * ring, aio's submit hook), queueing a PREP of every tag; start: after
 * the first submit, PREP's result, then the FETCH.  next: hand the tag's
 * result back with the next COMMIT and wait for its next request
 * (UBLK_IO_RES_OK, or why none will come).  flush: send the gathered
 * results now (aio's submit hook; on exit).  free: after the ring. */
int ublk_batch_setup(struct ublk_queue *q);
int ublk_batch_start(struct ublk_queue *q);
int ublk_batch_next(struct ublk_io *io, bool commit, int result);
void ublk_batch_flush(void *q);
void ublk_batch_free(struct ublk_queue *q);

#endif
