/* SPDX-License-Identifier: MIT */
/*
 * Batched commands (the device has UBLK_F_BATCH_IO, 7.3): instead of one
 * uring_cmd per tag per request, the queue has one multishot FETCH whose
 * CQEs carry the tags of new requests (as __u16 arrays in buffers of a
 * provided-buffer ring), and one COMMIT per loop turn carrying the
 * results of every request that ended in that turn (the submit hook
 * gathers them).  The tags' coroutines are the same; only the point
 * where a tag hands its result back and waits for its next request
 * differs (ublk_batch_next against the per-tag uring_cmd in tag_main,
 * queue.c).
 *
 * Ownership: the queue thread alone.  A commit buffer is filled while
 * current, handed to the kernel at the next submit and reused once its
 * CQE is seen; a fetch buffer is the kernel's until its CQE, then read
 * and given straight back.
 */
#include "ublk/queue-int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/coro.h"
#include "common/util.h"

#define BATCH_FETCH_BUFS 8      /* power of two (a buffer ring) */
#define BATCH_COMMIT_BUFS 4

struct batch_commit {
	struct aio_req req;
	struct ublk_queue *q;
	uint8_t *elems;
	unsigned n;             /* elements filled (while current) or sent */
	bool busy;              /* sent, CQE not seen */
};

struct ublk_batch {
	struct ublk_queue *q;
	unsigned elem_bytes;    /* 8, or 16 with the buffer address */
	uint16_t flags;         /* UBLK_BATCH_F_* of PREP and COMMIT */
	struct batch_commit commits[BATCH_COMMIT_BUFS];
	unsigned cur;           /* the commit buffer being filled; never busy */
	struct io_uring_buf_ring *br;
	size_t br_len;
	uint8_t *fetch_bufs;    /* BATCH_FETCH_BUFS * fetch_len bytes */
	unsigned fetch_len;
	struct aio_req fetch_req;
	/* 0 while FETCH lives; then the result that ended it (ABORT when
	 * the device stops): every waiting tag gets it and leaves. */
	int fetch_end;
	struct aio_req prep_req;
	int prep_res;
	bool prep_done;
};

static void batch_prep_sqe(struct io_uring_sqe *sqe, const struct ublk_queue *q, unsigned op,
			   unsigned nr_elem, unsigned elem_bytes, unsigned flags)
{
	struct ublk_batch_io cmd = {
		.q_id = (__u16)q->q_id,
		.flags = (__u16)flags,
		.nr_elem = (__u16)nr_elem,
		.elem_bytes = (__u8)elem_bytes,
	};

	ublk_io_cmd_prep(sqe, q->dev->cdev_fd, op, &cmd, sizeof(cmd));
	ublk_queue_cdev_sqe(q, sqe);
}

/* Element @i of @elems: tag @tag ready for its next request (its buffer
 * index, or address, in the same place as the last), with @result. */
static void batch_elem(const struct ublk_queue *q, uint8_t *elems, unsigned i, unsigned tag,
		       int result)
{
	const struct ublk_batch *b = q->batch;
	struct ublk_elem_header e = { .tag = (__u16)tag, .buf_index = (__u16)tag, .result = result };
	uint8_t *p = elems + (size_t)i * b->elem_bytes;

	memcpy(p, &e, sizeof(e));
	if (b->flags & UBLK_BATCH_F_HAS_BUF_ADDR) {
		uint64_t addr = (uint64_t)(uintptr_t)ublk_tag_buf(q, tag);
		memcpy(p + sizeof(e), &addr, sizeof(addr));
	}
}

static void batch_commit_done(struct aio_req *req, int res)
{
	struct batch_commit *c = (struct batch_commit *)req;
	struct ublk_queue *q = c->q;
	long want = (long)c->n * q->batch->elem_bytes;

	/* The driver returns the bytes it took; the rest stay ours, with
	 * requests the kernel still waits for: that is a bug, here or there. */
	if (res != want) {
		if (q->stop_now || q->batch->fetch_end)
			log_debug("queue %u: COMMIT_IO_CMDS of %u: %d", q->q_id, c->n, res);
		else
			log_error("queue %u: COMMIT_IO_CMDS took %d of %ld bytes%s%s", q->q_id, res,
				  want, res < 0 ? ": " : "", res < 0 ? strerror(-res) : "");
	}
	c->n = 0;
	c->busy = false;
}

/* Submit hook: send what the current commit buffer gathered, then fill
 * a free one.  With none free (the CQEs of earlier COMMITs not yet
 * reaped) it waits for the next turn: those CQEs wake the loop. */
void ublk_batch_flush(void *opaque)
{
	struct ublk_queue *q = opaque;
	struct ublk_batch *b = q->batch;
	struct batch_commit *c = &b->commits[b->cur];
	struct io_uring_sqe *sqe;
	unsigned next;

	if (!c->n)
		return;
	for (next = 0; next < BATCH_COMMIT_BUFS; next++)
		if (next != b->cur && !b->commits[next].busy)
			break;
	if (next == BATCH_COMMIT_BUFS)
		return;
	sqe = aio_get_sqe(&q->aio, &c->req);
	batch_prep_sqe(sqe, q, UBLK_U_IO_COMMIT_IO_CMDS, c->n, b->elem_bytes, b->flags);
	sqe->addr = (uint64_t)(uintptr_t)c->elems;
	sqe->len = c->n * b->elem_bytes;
	c->busy = true;
	b->cur = next;
}

static void batch_wake(struct ublk_io *io, int res)
{
	io->waiting = false;
	io->res = res;
	aio_schedule(io->co);
}

static void batch_arm_fetch(struct ublk_queue *q)
{
	struct ublk_batch *b = q->batch;
	struct io_uring_sqe *sqe = aio_get_sqe(&q->aio, &b->fetch_req);

	batch_prep_sqe(sqe, q, UBLK_U_IO_FETCH_IO_CMDS, b->fetch_len / 2, 2, 0);
	sqe->uring_cmd_flags = IORING_URING_CMD_MULTISHOT;
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = 0;
}

static void batch_fetch_done(struct aio_req *req, int res)
{
	struct ublk_batch *b = (struct ublk_batch *)((char *)req - offsetof(struct ublk_batch, fetch_req));
	struct ublk_queue *q = b->q;
	unsigned flags = q->aio.cqe_flags;

	if (flags & IORING_CQE_F_BUFFER) {
		unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
		uint8_t *buf = b->fetch_bufs + (size_t)bid * b->fetch_len;

		if (bid >= BATCH_FETCH_BUFS) {
			log_error("queue %u: FETCH_IO_CMDS in buffer %u of %u", q->q_id, bid,
				  BATCH_FETCH_BUFS);
			abort();
		}
		for (int i = 0; res > 0 && i + 2 <= res && (unsigned)i + 2 <= b->fetch_len; i += 2) {
			uint16_t tag;

			memcpy(&tag, buf + i, sizeof(tag));
			if (tag >= q->depth || !q->ios[tag].waiting) {
				/* Never from a sound driver: the tag is busy or
				 * unknown; starting it would run two requests on
				 * one buffer. */
				log_error("queue %u: FETCH_IO_CMDS gave tag %u, %s", q->q_id, tag,
					  tag >= q->depth ? "out of range" : "not waiting");
				continue;
			}
			batch_wake(&q->ios[tag], UBLK_IO_RES_OK);
		}
		/* Read: the buffer goes back to the ring at once. */
		io_uring_buf_ring_add(b->br, buf, b->fetch_len, (unsigned short)bid,
				      io_uring_buf_ring_mask(BATCH_FETCH_BUFS), 0);
		io_uring_buf_ring_advance(b->br, 1);
	}
	if (flags & IORING_CQE_F_MORE)
		return;
	/* The multishot ended.  Out of buffers (-ENOBUFS: CQEs we had not
	 * reaped held them all) or a success: the tags it had not delivered
	 * wait in the driver, and a new FETCH picks them up. */
	if ((res >= 0 || res == -ENOBUFS) && !q->stop_now) {
		batch_arm_fetch(q);
		return;
	}
	b->fetch_end = res < 0 ? res : UBLK_IO_RES_ABORT;
	if (res != UBLK_IO_RES_ABORT && !q->stop_now)
		log_error("queue %u: FETCH_IO_CMDS: %s", q->q_id, strerror(-res));
	for (unsigned i = 0; i < q->depth; i++)
		if (q->ios[i].waiting)
			batch_wake(&q->ios[i], b->fetch_end);
}

int ublk_batch_next(struct ublk_io *io, bool commit, int result)
{
	struct ublk_queue *q = io->q;
	struct ublk_batch *b = q->batch;

	if (commit) {
		struct batch_commit *c = &b->commits[b->cur];

		batch_elem(q, c->elems, c->n++, io->tag, result);
	}
	if (b->fetch_end)
		return b->fetch_end;
	io->waiting = true;
	coro_yield();
	return io->res;
}

static void batch_prep_done(struct aio_req *req, int res)
{
	struct ublk_batch *b = (struct ublk_batch *)((char *)req - offsetof(struct ublk_batch, prep_req));

	b->prep_res = res;
	b->prep_done = true;
	b->commits[BATCH_COMMIT_BUFS - 1].busy = false;
}

void ublk_batch_free(struct ublk_queue *q)
{
	struct ublk_batch *b = q->batch;

	if (!b)
		return;
	for (unsigned i = 0; i < BATCH_COMMIT_BUFS; i++)
		free(b->commits[i].elems);
	free(b->fetch_bufs);
	if (b->br)
		munmap(b->br, b->br_len);
	free(b);
	q->batch = NULL;
}

/* Buffers, the FETCH buffer ring, the submit hook, and a PREP of every
 * tag queued (ublk_batch_start sees its result). */
int ublk_batch_setup(struct ublk_queue *q)
{
	struct io_uring_buf_reg reg = { .ring_entries = BATCH_FETCH_BUFS, .bgid = 0 };
	struct batch_commit *prep;
	struct io_uring_sqe *sqe;
	struct ublk_batch *b;
	int ret;

	b = q->batch = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->q = q;
	/* Zero copy: each element names the tag's slot in the ring's buffer
	 * table (the tag itself); copies: the tag's buffer address. */
	if (q->zero_copy) {
		b->elem_bytes = sizeof(struct ublk_elem_header);
		b->flags = UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK;
	} else {
		b->elem_bytes = sizeof(struct ublk_elem_header) + sizeof(uint64_t);
		b->flags = UBLK_BATCH_F_HAS_BUF_ADDR;
	}
	for (unsigned i = 0; i < BATCH_COMMIT_BUFS; i++) {
		b->commits[i].q = q;
		b->commits[i].req.complete = batch_commit_done;
		b->commits[i].elems = calloc(q->depth, b->elem_bytes);
		if (!b->commits[i].elems)
			return -ENOMEM;
	}
	b->fetch_len = 2 * q->depth;
	b->fetch_bufs = calloc(BATCH_FETCH_BUFS, b->fetch_len);
	if (!b->fetch_bufs)
		return -ENOMEM;
	b->br_len = ALIGN_UP(BATCH_FETCH_BUFS * sizeof(struct io_uring_buf),
			     (size_t)sysconf(_SC_PAGESIZE));
	b->br = mmap(NULL, b->br_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (b->br == MAP_FAILED) {
		b->br = NULL;
		return -errno;
	}
	io_uring_buf_ring_init(b->br);
	reg.ring_addr = (uint64_t)(uintptr_t)b->br;
	ret = io_uring_register_buf_ring(&q->aio.ring, &reg, 0);
	if (ret < 0) {
		log_error("queue %u: io_uring buffer ring: %s", q->q_id, strerror(-ret));
		return ret;
	}
	for (unsigned i = 0; i < BATCH_FETCH_BUFS; i++)
		io_uring_buf_ring_add(b->br, b->fetch_bufs + (size_t)i * b->fetch_len, b->fetch_len,
				      (unsigned short)i, io_uring_buf_ring_mask(BATCH_FETCH_BUFS),
				      (int)i);
	io_uring_buf_ring_advance(b->br, BATCH_FETCH_BUFS);
	b->fetch_req.complete = batch_fetch_done;
	q->aio.submit_hook = ublk_batch_flush;
	q->aio.submit_opaque = q;

	/* PREP: every tag, from the last commit buffer (busy until its CQE;
	 * the first is current). */
	prep = &b->commits[BATCH_COMMIT_BUFS - 1];
	for (unsigned i = 0; i < q->depth; i++)
		batch_elem(q, prep->elems, i, i, 0);
	prep->busy = true;
	b->prep_req.complete = batch_prep_done;
	sqe = aio_get_sqe(&q->aio, &b->prep_req);
	batch_prep_sqe(sqe, q, UBLK_U_IO_PREP_IO_CMDS, q->depth, b->elem_bytes, b->flags);
	sqe->addr = (uint64_t)(uintptr_t)prep->elems;
	sqe->len = q->depth * b->elem_bytes;
	return 0;
}

/* After the PREP went in: its result, then the FETCH. */
int ublk_batch_start(struct ublk_queue *q)
{
	struct ublk_batch *b = q->batch;
	int ret;

	for (int tries = 0; !b->prep_done && tries < 100; tries++) {
		ret = aio_run_once(&q->aio, true);
		if (ret < 0)
			return ret;
	}
	if (!b->prep_done || b->prep_res != 0) {
		log_error("queue %u: the driver refused PREP_IO_CMDS: %s", q->q_id,
			  b->prep_done ? strerror(-b->prep_res) : "no answer");
		return b->prep_done && b->prep_res < 0 ? b->prep_res : -EIO;
	}
	batch_arm_fetch(q);
	return aio_run_once(&q->aio, false);
}
