/* SPDX-License-Identifier: MIT */
/*
 * NBD server: fixed newstyle negotiation, simple replies, one export.
 *
 * Thread model: one thread, one aio_ctx.  Every socket operation (accept,
 * recv, sendmsg), the signalfd read and the image's I/O are SQEs on the same
 * ring, each awaited by a coroutine:
 *   - the acceptor coroutine loops on IORING_OP_ACCEPT;
 *   - the signal coroutine reads the signalfd (IORING_OP_READ);
 *   - one reader coroutine per connection negotiates, then reads request
 *     headers and write payloads and dispatches each request;
 *   - each request runs in its own coroutine from a pool of
 *     NBD_CONN_DEPTH made when the connection is accepted, so requests on
 *     one connection run concurrently.
 *
 * Replies are serialised per connection through a reply queue with one
 * sender at a time (in effect a mutex whose holder also carries the
 * replies queued behind it): a finished request queues its header (and
 * read data); if nobody is sending it becomes the sender, lets the rest of
 * the current completion batch queue up, and sends everything queued in
 * one SENDMSG (looped on short sends) until its own reply is out, then
 * hands the role to the owner of the next queued reply.  Under load one
 * SENDMSG carries many replies: fewer SQEs and fewer wakeups of the client.
 *
 * Invariants:
 *   - a connection is freed only from the main loop, after its reader has
 *     finished, which it does only once no request of it is in flight;
 *   - every dispatched request sends exactly one reply (or finds the
 *     socket dead) and then returns its slot;
 *   - requests are validated here, at the boundary, before the block layer
 *     sees them; a bad request gets an error reply, only a broken protocol
 *     (bad magic, unreadable stream) drops the connection.
 *
 * Memory: request buffers are per slot, allocated on first use and kept
 * (up to NBD_BUF_KEEP), so steady-state I/O allocates nothing.  Larger
 * requests (up to 32 MiB) get a buffer of their own, freed on completion,
 * and a connection holds at most NBD_BIG_BUDGET bytes of those at once
 * (the reader waits), which bounds memory per client.
 *
 * Stopping: stop accepting (cancel the accept), cancel reads that wait for
 * a new request or option, let in-flight requests reply, close each
 * connection, flush the image.  Only reads in an "idle" state (no byte of
 * the next message consumed) are ever cancelled, so a stop never cuts a
 * request in half.  A second signal shuts every socket down.
 */
#include "nbd/server.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/coro.h"
#include "common/io.h"
#include "common/util.h"
#include "nbd/proto.h"

#define NBD_CONN_DEPTH   64                  /* concurrent requests per connection */
#define NBD_RBUF_SIZE    (64 * 1024)         /* receive buffer for headers, small payloads */
#define NBD_BUF_MIN      (64 * 1024)         /* smallest per-slot buffer */
#define NBD_BUF_KEEP     (1024 * 1024)       /* per-slot buffers up to this are kept */
#define NBD_BIG_BUDGET   (128u * 1024 * 1024) /* temporary big buffers per connection */
#define NBD_OPT_MAX      (NBD_MAX_STRING + 1024) /* largest option payload we read */
#define NBD_LISTEN_BACKLOG 16
#define NBD_SEND_IOV     64                  /* iovecs in one reply SENDMSG */

#define container_of(ptr, type, member) \
	((type *)((char *)(ptr) - offsetof(type, member)))

/* One awaited SQE whose user_data is known, so it can be cancelled. */
struct nbd_op {
	struct aio_req req;
	struct coro *co;      /* waiting coroutine, NULL when not pending */
	int res;
	bool done;
};

struct nbd_conn;

struct nbd_req {
	struct nbd_conn *conn;
	struct coro *co;
	struct nbd_req *next_free;
	uint8_t cookie[8];         /* echoed verbatim */
	uint16_t flags, type;
	uint64_t off;
	uint32_t len;
	int error;                 /* errno found by the reader, 0 if none */
	/* reply state, see send_reply() */
	uint8_t rhdr[NBD_SIMPLE_REPLY_SIZE];
	bool has_data;             /* read data follows the header */
	bool reply_done;           /* sent (or failed: the socket is dead) */
	bool sender;               /* handed the sender role */
	struct nbd_req *reply_next;
	void *data;                /* payload for this request (buf or big) */
	void *buf;                 /* kept slot buffer */
	size_t buf_cap;
	void *big;                 /* temporary buffer > NBD_BUF_KEEP */
};

struct nbd_conn {
	struct nbd_server *srv;
	int fd;
	unsigned id;
	struct coro *co;                /* the reader */
	struct nbd_conn *next, *prev;   /* srv->conns or srv->dead */
	bool no_zeroes;
	bool dead;                      /* socket broken or shut down */
	bool idle;                      /* idle_op waits for a new message */
	unsigned inflight;              /* dispatched requests not yet done */
	uint64_t big_bytes;             /* bytes in big buffers */
	struct co_queue waitq;          /* the reader, waiting for a request to end */
	bool sending;                   /* a request holds the sender role */
	struct nbd_req *rq_head, *rq_tail;  /* replies waiting to be sent */
	struct iovec siov[NBD_SEND_IOV];    /* the sender's batch */
	struct nbd_op idle_op;          /* recv of a new message: cancellable */
	struct nbd_op data_op;          /* recv inside a message: never cancelled */
	uint8_t *rbuf;                  /* NBD_RBUF_SIZE */
	size_t rpos, rlen;
	uint8_t *optbuf;                /* NBD_OPT_MAX, negotiation only */
	struct nbd_req *free_reqs;
	struct nbd_req reqs[NBD_CONN_DEPTH];
};

struct nbd_server {
	struct aio_ctx *ctx;
	struct bdrv *bs;
	char *export_name;
	uint16_t tflags;               /* transmission flags */
	uint32_t pref_block;
	int listen_fd, sig_fd;
	char *unlink_path;             /* unix socket to remove on close */
	sigset_t old_mask;
	bool mask_saved;
	struct coro *accept_co, *sig_co;
	struct nbd_op accept_op, sig_op;
	bool stopping, forced, sig_exit;
	int error;                     /* fatal loop error */
	unsigned next_id;
	struct nbd_conn *conns;        /* live connections */
	struct nbd_conn *dead;         /* readers finished, to free from the loop */
};

/* ---- awaited SQEs ---- */

static void op_complete(struct aio_req *req, int res)
{
	struct nbd_op *op = container_of(req, struct nbd_op, req);

	op->res = res;
	op->done = true;
	if (op->co)
		coro_enter(op->co);
}

/* Coroutine context: wait for @sqe (from aio_get_sqe) as @op. */
static int op_wait(struct nbd_op *op, struct io_uring_sqe *sqe)
{
	op->req.complete = op_complete;
	op->done = false;
	op->co = coro_self();
	io_uring_sqe_set_data(sqe, &op->req);
	while (!op->done)
		coro_yield();
	op->co = NULL;
	return op->res;
}

/* Ask the kernel to cancel @op if it is pending; its waiter then sees
 * -ECANCELED (or its real result if it won the race). */
static void op_cancel(struct nbd_server *srv, struct nbd_op *op)
{
	struct io_uring_sqe *sqe;

	if (!op->co)
		return;
	sqe = aio_get_sqe(srv->ctx, NULL);
	io_uring_prep_cancel(sqe, &op->req, 0);
	io_uring_sqe_set_data(sqe, NULL);
}

static void kick_complete(struct aio_req *req, int res) { (void)req; (void)res; }
static struct aio_req kick_req = { .complete = kick_complete };

/* A coroutine that the main loop waits for is about to finish.  It may be
 * running from aio_run_once()'s ready list, after which that call blocks
 * for a completion: post a NOP so it returns and the loop re-checks. */
static void loop_kick(struct nbd_server *srv)
{
	struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, &kick_req);
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data(sqe, &kick_req);
}

static void co_sleep_ms(unsigned ms)
{
	struct __kernel_timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	struct aio_ctx *ctx = aio_ctx_current();
	struct io_uring_sqe *sqe = aio_get_sqe(ctx, NULL);

	io_uring_prep_timeout(sqe, &ts, 0, 0);
	aio_co_wait_sqe(ctx, sqe);
}

/* ---- socket I/O ---- */

/* Mark the connection broken and wake anything blocked on its socket.
 * In-flight requests still finish; their replies fail fast. */
static void conn_kill(struct nbd_conn *c)
{
	if (c->dead)
		return;
	c->dead = true;
	shutdown(c->fd, SHUT_RDWR);
}

/* Read exactly @n bytes.  @idle: this starts a new message, so a stop may
 * cancel it.  Returns 0, -ECONNRESET at end of stream, -ESHUTDOWN when
 * cancelled by a stop, or -errno. */
static int conn_read(struct nbd_conn *c, void *dst, size_t n, bool idle)
{
	struct nbd_server *srv = c->srv;
	uint8_t *p = dst;

	while (n) {
		if (c->rpos < c->rlen) {
			size_t k = MIN(n, c->rlen - c->rpos);
			memcpy(p, c->rbuf + c->rpos, k);
			c->rpos += k;
			p += k;
			n -= k;
			idle = false;
			continue;
		}
		if (c->dead)
			return -ECONNRESET;
		if (idle && srv->stopping)
			return -ESHUTDOWN;

		/* Large payloads go straight to their buffer; everything else
		 * is read ahead so several headers come in with one recv. */
		bool direct = n >= NBD_RBUF_SIZE / 2;
		void *buf = direct ? (void *)p : (void *)c->rbuf;
		size_t len = direct ? n : NBD_RBUF_SIZE;
		struct nbd_op *op = idle ? &c->idle_op : &c->data_op;
		struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
		int res;

		io_uring_prep_recv(sqe, c->fd, buf, len, 0);
		c->idle = idle;
		res = op_wait(op, sqe);
		c->idle = false;
		if (res == -EINTR || res == -EAGAIN)
			continue;
		if (res == -ECANCELED)
			return -ESHUTDOWN;
		if (res < 0)
			return res;
		if (res == 0)
			return -ECONNRESET;
		idle = false;
		if (direct) {
			p += res;
			n -= res;
		} else {
			c->rpos = 0;
			c->rlen = res;
		}
	}
	return 0;
}

/* Read and throw away @n bytes (a payload we refuse). */
static int conn_skip(struct nbd_conn *c, uint64_t n)
{
	uint8_t one;

	while (n) {
		size_t k;
		int ret;

		if (c->rpos < c->rlen) {
			k = MIN(n, (uint64_t)(c->rlen - c->rpos));
			c->rpos += k;
			n -= k;
			continue;
		}
		/* Refill rbuf through conn_read of one byte. */
		ret = conn_read(c, &one, 1, false);
		if (ret < 0)
			return ret;
		n--;
	}
	return 0;
}

/* Send every byte of @iov.  Callers serialise (the sender role, or
 * negotiation before any request exists).  Returns 0 or -errno. */
static int conn_send(struct nbd_conn *c, struct iovec *iov, int cnt)
{
	struct nbd_op op = { 0 };

	while (cnt) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = cnt };
		struct io_uring_sqe *sqe;
		int res;

		if (c->dead)
			return -EPIPE;
		sqe = aio_get_sqe(c->srv->ctx, NULL);
		io_uring_prep_sendmsg(sqe, c->fd, &msg, MSG_NOSIGNAL);
		res = op_wait(&op, sqe);
		if (res == -EINTR || res == -EAGAIN)
			continue;
		if (res < 0)
			return res;
		if (res == 0)
			return -EPIPE;
		size_t done = res;
		while (cnt && done >= iov->iov_len) {
			done -= iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt) {
			iov->iov_base = (char *)iov->iov_base + done;
			iov->iov_len -= done;
		}
	}
	return 0;
}

static int conn_send_buf(struct nbd_conn *c, const void *buf, size_t len)
{
	struct iovec iov = { (void *)buf, len };
	return conn_send(c, &iov, 1);
}

/* ---- negotiation ---- */

static bool export_matches(struct nbd_server *srv, const char *name, size_t len)
{
	return len == 0 ||
	       (strlen(srv->export_name) == len && !memcmp(srv->export_name, name, len));
}

static int send_opt_reply(struct nbd_conn *c, uint32_t opt, uint32_t type,
			  const void *data, uint32_t len)
{
	uint8_t hdr[NBD_REP_HDR_SIZE];
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)data, len } };

	put_be64(hdr, NBD_REP_MAGIC);
	put_be32(hdr + 8, opt);
	put_be32(hdr + 12, type);
	put_be32(hdr + 16, len);
	return conn_send(c, iov, len ? 2 : 1);
}

static int send_info_export(struct nbd_conn *c, uint32_t opt)
{
	struct nbd_server *srv = c->srv;
	uint8_t info[12];

	put_be16(info, NBD_INFO_EXPORT);
	put_be64(info + 2, srv->bs->size);
	put_be16(info + 10, srv->tflags);
	return send_opt_reply(c, opt, NBD_REP_INFO, info, sizeof(info));
}

/* NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 info
 * types.  Returns 1 to enter transmission (GO accepted), 0 to go on
 * negotiating, -errno to drop the connection. */
static int handle_info_go(struct nbd_conn *c, uint32_t opt, const uint8_t *d, uint32_t len)
{
	struct nbd_server *srv = c->srv;
	uint32_t namelen;
	uint16_t nreq;
	uint8_t bsz[14];
	int ret;

	if (len < 6)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	namelen = get_be32(d);
	if (namelen > NBD_MAX_STRING || (uint64_t)namelen + 6 > len)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	nreq = get_be16(d + 4 + namelen);
	if ((uint64_t)namelen + 6 + 2 * (uint64_t)nreq != len)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	if (!export_matches(srv, (const char *)d + 4, namelen))
		return send_opt_reply(c, opt, NBD_REP_ERR_UNKNOWN, NULL, 0);

	/* Requested info types need no answer beyond what we always send:
	 * the export (mandatory) and block sizes (a server may send these
	 * unasked; min 1 means clients need not align). */
	ret = send_info_export(c, opt);
	if (ret < 0)
		return ret;
	put_be16(bsz, NBD_INFO_BLOCK_SIZE);
	put_be32(bsz + 2, 1);
	put_be32(bsz + 6, srv->pref_block);
	put_be32(bsz + 10, NBD_MAX_PAYLOAD);
	ret = send_opt_reply(c, opt, NBD_REP_INFO, bsz, sizeof(bsz));
	if (ret < 0)
		return ret;
	ret = send_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
	if (ret < 0)
		return ret;
	return opt == NBD_OPT_GO ? 1 : 0;
}

/* Returns 0 when transmission starts, -errno to drop the connection. */
static int negotiate(struct nbd_conn *c)
{
	struct nbd_server *srv = c->srv;
	uint8_t greet[18], cflags[4], oh[NBD_OPT_HDR_SIZE];
	int ret;

	put_be64(greet, NBD_MAGIC);
	put_be64(greet + 8, NBD_OPTS_MAGIC);
	put_be16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	ret = conn_send_buf(c, greet, sizeof(greet));
	if (ret < 0)
		return ret;
	ret = conn_read(c, cflags, sizeof(cflags), true);
	if (ret < 0)
		return ret;
	uint32_t cf = get_be32(cflags);
	if (cf & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
		log_warn("connection %u: unknown client flags 0x%x, dropping", c->id, cf);
		return -EPROTO;
	}
	c->no_zeroes = cf & NBD_FLAG_C_NO_ZEROES;

	for (;;) {
		ret = conn_read(c, oh, sizeof(oh), true);
		if (ret < 0)
			return ret;
		if (get_be64(oh) != NBD_OPTS_MAGIC) {
			log_warn("connection %u: bad option magic, dropping", c->id);
			return -EPROTO;
		}
		uint32_t opt = get_be32(oh + 8), len = get_be32(oh + 12);

		if (opt == NBD_OPT_EXPORT_NAME) {
			/* No way to report an error: a bad name closes. */
			uint8_t tail[10 + 124] = { 0 };
			if (len > NBD_MAX_STRING)
				return -EPROTO;
			ret = conn_read(c, c->optbuf, len, false);
			if (ret < 0)
				return ret;
			if (!export_matches(srv, (const char *)c->optbuf, len)) {
				log_warn("connection %u: unknown export '%.*s'", c->id,
					 (int)len, (const char *)c->optbuf);
				return -ENOENT;
			}
			put_be64(tail, srv->bs->size);
			put_be16(tail + 8, srv->tflags);
			return conn_send_buf(c, tail, c->no_zeroes ? 10 : sizeof(tail));
		}
		if (len > NBD_OPT_MAX) {
			ret = conn_skip(c, len);
			if (!ret)
				ret = send_opt_reply(c, opt, NBD_REP_ERR_TOO_BIG, NULL, 0);
			if (ret < 0)
				return ret;
			continue;
		}
		ret = conn_read(c, c->optbuf, len, false);
		if (ret < 0)
			return ret;

		switch (opt) {
		case NBD_OPT_ABORT:
			/* The client may already be gone: ignore send errors. */
			send_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
			return -ECONNRESET;
		case NBD_OPT_LIST: {
			size_t nl = strlen(srv->export_name);
			uint8_t srvrep[4 + NBD_MAX_STRING];
			if (len) {
				ret = send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
				break;
			}
			put_be32(srvrep, nl);
			memcpy(srvrep + 4, srv->export_name, nl);
			ret = send_opt_reply(c, opt, NBD_REP_SERVER, srvrep, 4 + nl);
			if (!ret)
				ret = send_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
			break;
		}
		case NBD_OPT_INFO:
		case NBD_OPT_GO:
			ret = handle_info_go(c, opt, c->optbuf, len);
			if (ret == 1)
				return 0;
			break;
		default:
			/* STRUCTURED_REPLY, meta contexts, TLS, extended
			 * headers: we speak simple replies only. */
			ret = send_opt_reply(c, opt, NBD_REP_ERR_UNSUP, NULL, 0);
			break;
		}
		if (ret < 0)
			return ret;
	}
}

/* ---- transmission ---- */

static uint32_t errno_to_nbd(int err)
{
	switch (err) {
	case 0: return NBD_SUCCESS;
	case EPERM: case EROFS: case EACCES: return NBD_EPERM;
	case ENOMEM: return NBD_ENOMEM;
	case EINVAL: return NBD_EINVAL;
	case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
	case EOVERFLOW: return NBD_EOVERFLOW;
	case ENOTSUP: return NBD_ENOTSUP;
	case ESHUTDOWN: return NBD_ESHUTDOWN;
	default: return NBD_EIO;
	}
}

/* Give @r a buffer of @len bytes.  May wait (reader only) while the
 * connection's big buffers are over budget.  Returns 0 or -ENOMEM. */
static int req_get_buf(struct nbd_conn *c, struct nbd_req *r, uint32_t len)
{
	if (len <= r->buf_cap) {
		r->data = r->buf;
		return 0;
	}
	if (len <= NBD_BUF_KEEP) {
		size_t cap = NBD_BUF_MIN;
		while (cap < len)
			cap *= 2;
		io_free(r->buf);
		r->buf = io_alloc(cap);
		r->buf_cap = r->buf ? cap : 0;
		r->data = r->buf;
		return r->buf ? 0 : -ENOMEM;
	}
	while (c->big_bytes && c->big_bytes + len > NBD_BIG_BUDGET && !c->dead)
		co_queue_wait(&c->waitq);
	r->big = io_alloc(len);
	if (!r->big)
		return -ENOMEM;
	c->big_bytes += len;
	r->data = r->big;
	return 0;
}

static void req_put(struct nbd_conn *c, struct nbd_req *r)
{
	if (r->big) {
		io_free(r->big);
		c->big_bytes -= r->len;
		r->big = NULL;
	}
	r->data = NULL;
	r->next_free = c->free_reqs;
	c->free_reqs = r;
}

/* Range check at the boundary: EINVAL for reads, ENOSPC for writes past
 * the end (what a disk reports), EINVAL for an empty or oversized one. */
static int check_request(struct nbd_server *srv, const struct nbd_req *r, bool write)
{
	uint64_t end;

	/* TRIM and WRITE_ZEROES carry no payload: any length is fine. */
	if (r->len == 0 || (r->len > NBD_MAX_PAYLOAD && r->type != NBD_CMD_TRIM &&
			    r->type != NBD_CMD_WRITE_ZEROES))
		return EINVAL;
	if (ckd_add(&end, r->off, (uint64_t)r->len) || end > srv->bs->size)
		return write ? ENOSPC : EINVAL;
	return 0;
}

static int execute(struct nbd_server *srv, struct nbd_req *r)
{
	struct bdrv *bs = srv->bs;
	bool fua = r->flags & NBD_CMD_FLAG_FUA;
	int err, ret = 0;

	switch (r->type) {
	case NBD_CMD_READ:
		if (r->flags)
			return EINVAL;      /* DF needs structured replies */
		if ((err = check_request(srv, r, false)))
			return err;
		ret = bdrv_co_pread(bs, r->off, r->len, r->data);
		break;
	case NBD_CMD_WRITE:
		if (r->flags & ~NBD_CMD_FLAG_FUA)
			return EINVAL;
		if (bs->read_only)
			return EPERM;
		if ((err = check_request(srv, r, true)))
			return err;
		ret = bdrv_co_pwrite(bs, r->off, r->len, r->data, fua ? BDRV_REQ_FUA : 0);
		break;
	case NBD_CMD_FLUSH:
		if (r->flags)
			return EINVAL;
		ret = bdrv_co_flush(bs);
		break;
	case NBD_CMD_TRIM:
		if (r->flags & ~NBD_CMD_FLAG_FUA)
			return EINVAL;
		if (bs->read_only)
			return EPERM;
		if ((err = check_request(srv, r, true)))
			return err;
		ret = bdrv_co_discard(bs, r->off, r->len);
		if (!ret && fua)
			ret = bdrv_co_flush(bs);
		break;
	case NBD_CMD_WRITE_ZEROES: {
		unsigned fl = 0;
		if (r->flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE))
			return EINVAL;
		if (bs->read_only)
			return EPERM;
		if ((err = check_request(srv, r, true)))
			return err;
		if (!(r->flags & NBD_CMD_FLAG_NO_HOLE))
			fl |= BDRV_REQ_MAY_UNMAP;
		if (fua)
			fl |= BDRV_REQ_FUA;
		ret = bdrv_co_pwrite_zeroes(bs, r->off, r->len, fl);
		break;
	}
	default:
		return EINVAL;
	}
	if (ret < 0 && ret != -EINVAL)
		log_debug("connection %u: %s request at %llu+%u failed: %s", r->conn->id,
			  r->type == NBD_CMD_READ ? "read" : "write-side",
			  (unsigned long long)r->off, r->len, strerror(-ret));
	return ret < 0 ? -ret : 0;
}

/* With the sender role: send queued replies in batches until @self's is
 * out, then pass the role to the owner of the first reply still queued. */
static void send_batches(struct nbd_conn *c, struct nbd_req *self)
{
	while (!self->reply_done) {
		struct nbd_req *first = c->rq_head, *last = NULL, *r;
		int n = 0, ret;

		for (r = first; r && n + 1 + r->has_data <= NBD_SEND_IOV; r = r->reply_next) {
			c->siov[n++] = (struct iovec){ r->rhdr, sizeof(r->rhdr) };
			if (r->has_data)
				c->siov[n++] = (struct iovec){ r->data, r->len };
			last = r;
		}
		c->rq_head = r;
		if (!r)
			c->rq_tail = NULL;
		ret = conn_send(c, c->siov, n);
		if (ret < 0 && !c->dead) {
			log_debug("connection %u: send reply: %s", c->id, strerror(-ret));
			conn_kill(c);
		}
		for (r = first;; r = r->reply_next) {
			r->reply_done = true;
			if (r != self)
				aio_schedule(r->co);
			if (r == last)
				break;
		}
	}
	if (c->rq_head) {
		c->rq_head->sender = true;
		aio_schedule(c->rq_head->co);
	} else {
		c->sending = false;
	}
}

static void send_reply(struct nbd_conn *c, struct nbd_req *r, int err)
{
	put_be32(r->rhdr, NBD_SIMPLE_REPLY_MAGIC);
	put_be32(r->rhdr + 4, errno_to_nbd(err));
	memcpy(r->rhdr + 8, r->cookie, 8);
	r->has_data = r->type == NBD_CMD_READ && !err;
	r->reply_done = false;
	r->sender = false;
	r->reply_next = NULL;
	if (c->rq_tail)
		c->rq_tail->reply_next = r;
	else
		c->rq_head = r;
	c->rq_tail = r;

	if (!c->sending) {
		/* Take the role, and let the other requests completing in
		 * this loop iteration queue their replies behind ours. */
		c->sending = true;
		aio_schedule(r->co);
		coro_yield();
	} else {
		while (!r->reply_done && !r->sender)
			coro_yield();
		if (r->reply_done)
			return;
	}
	send_batches(c, r);
}

static void req_main(void *opaque)
{
	struct nbd_req *r = opaque;
	struct nbd_conn *c = r->conn;
	int err = r->error;

	if (!err)
		err = execute(c->srv, r);
	send_reply(c, r, err);
	req_put(c, r);
	c->inflight--;
	co_queue_wake_all(&c->waitq);
}

/* Read one request into @r.  Returns 1 to dispatch, 0 for DISC, -errno to
 * drop the connection. */
static int read_request(struct nbd_conn *c, struct nbd_req *r)
{
	uint8_t h[NBD_REQUEST_SIZE];
	int ret = conn_read(c, h, sizeof(h), true);

	if (ret < 0)
		return ret;
	if (get_be32(h) != NBD_REQUEST_MAGIC) {
		log_warn("connection %u: bad request magic 0x%08x, dropping", c->id, get_be32(h));
		return -EPROTO;
	}
	r->flags = get_be16(h + 4);
	r->type = get_be16(h + 6);
	memcpy(r->cookie, h + 8, 8);
	r->off = get_be64(h + 16);
	r->len = get_be32(h + 24);
	r->error = 0;
	r->data = NULL;

	switch (r->type) {
	case NBD_CMD_DISC:
		return 0;
	case NBD_CMD_WRITE:
		/* The payload follows whatever we think of the request. */
		if (r->len > NBD_MAX_PAYLOAD) {
			r->error = EINVAL;
			ret = conn_skip(c, r->len);
			return ret < 0 ? ret : 1;
		}
		if (r->len && req_get_buf(c, r, r->len) < 0) {
			r->error = ENOMEM;
			ret = conn_skip(c, r->len);
			return ret < 0 ? ret : 1;
		}
		ret = r->len ? conn_read(c, r->data, r->len, false) : 0;
		return ret < 0 ? ret : 1;
	case NBD_CMD_READ:
		/* Only a valid read gets a buffer; execute() reports the rest. */
		if (r->len && r->len <= NBD_MAX_PAYLOAD && req_get_buf(c, r, r->len) < 0)
			r->error = ENOMEM;
		return 1;
	default:
		return 1;
	}
}

static void conn_main(void *opaque)
{
	struct nbd_conn *c = opaque;
	struct nbd_server *srv = c->srv;
	int ret;

	ret = negotiate(c);
	while (ret >= 0) {
		struct nbd_req *r;

		while (!(r = c->free_reqs) && !c->dead && !srv->stopping)
			co_queue_wait(&c->waitq);
		if (!r || c->dead || srv->stopping)
			break;
		c->free_reqs = r->next_free;
		ret = read_request(c, r);
		if (ret <= 0) {
			req_put(c, r);
			break;
		}
		c->inflight++;
		coro_reset(r->co, req_main, r);
		aio_schedule(r->co);
	}
	if (ret < 0 && ret != -ECONNRESET && ret != -ESHUTDOWN && ret != -EPIPE)
		log_debug("connection %u: closing: %s", c->id, strerror(-ret));

	while (c->inflight)
		co_queue_wait(&c->waitq);
	log_debug("connection %u: closed", c->id);

	/* Hand ourselves to the main loop, which frees us once we return. */
	if (c->prev)
		c->prev->next = c->next;
	else
		srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = NULL;
	c->next = srv->dead;
	srv->dead = c;
	loop_kick(srv);
}

static void conn_free(struct nbd_conn *c)
{
	for (unsigned i = 0; i < NBD_CONN_DEPTH; i++) {
		coro_free(c->reqs[i].co);
		io_free(c->reqs[i].buf);
		io_free(c->reqs[i].big);
	}
	coro_free(c->co);
	if (c->fd >= 0)
		close(c->fd);
	io_free(c->rbuf);
	free(c->optbuf);
	free(c);
}

static int conn_new(struct nbd_server *srv, int fd)
{
	struct nbd_conn *c = calloc(1, sizeof(*c));
	int one = 1;

	if (!c)
		return -ENOMEM;
	c->srv = srv;
	c->fd = fd;
	c->id = ++srv->next_id;
	c->rbuf = io_alloc(NBD_RBUF_SIZE);
	c->optbuf = malloc(NBD_OPT_MAX);
	c->co = coro_new(conn_main, c, 0);
	if (!c->rbuf || !c->optbuf || !c->co)
		goto fail;
	for (unsigned i = 0; i < NBD_CONN_DEPTH; i++) {
		struct nbd_req *r = &c->reqs[i];
		r->conn = c;
		r->co = coro_new(req_main, r, 0);
		if (!r->co)
			goto fail;
		r->next_free = c->free_reqs;
		c->free_reqs = r;
	}
	/* Replies are small and latency-bound: do not let Nagle hold them.
	 * Fails harmlessly on unix sockets. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

	c->next = srv->conns;
	if (srv->conns)
		srv->conns->prev = c;
	srv->conns = c;
	log_debug("connection %u: accepted", c->id);
	aio_schedule(c->co);
	return 0;
fail:
	c->fd = -1;          /* the caller closes it */
	conn_free(c);
	return -ENOMEM;
}

/* ---- acceptor, signals, stop ---- */

static void accept_main(void *opaque)
{
	struct nbd_server *srv = opaque;

	while (!srv->stopping) {
		struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
		int fd;

		io_uring_prep_accept(sqe, srv->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		fd = op_wait(&srv->accept_op, sqe);
		if (fd >= 0) {
			if (srv->stopping || conn_new(srv, fd) < 0) {
				if (!srv->stopping)
					log_warn("out of memory for a new connection: refused");
				close(fd);
			}
			continue;
		}
		switch (fd) {
		case -ECANCELED:
		case -EINTR:
		case -EAGAIN:
		case -ECONNABORTED:
		case -EPROTO:
			break;
		case -EMFILE:
		case -ENFILE:
		case -ENOBUFS:
		case -ENOMEM:
			log_warn("accept: %s; retrying in 100 ms", strerror(-fd));
			co_sleep_ms(100);
			break;
		default:
			log_error("accept: %s", strerror(-fd));
			srv->error = fd;
			nbd_server_stop(srv);
			break;
		}
	}
	loop_kick(srv);
}

static void signal_main(void *opaque)
{
	struct nbd_server *srv = opaque;
	struct signalfd_siginfo si;

	while (!srv->sig_exit) {
		struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
		int res;

		io_uring_prep_read(sqe, srv->sig_fd, &si, sizeof(si), 0);
		res = op_wait(&srv->sig_op, sqe);
		if (srv->sig_exit || res == -ECANCELED)
			break;
		if (res != (int)sizeof(si))
			continue;
		if (!srv->stopping) {
			log_info("%s: finishing in-flight requests, then exiting",
				 strsignal(si.ssi_signo));
			nbd_server_stop(srv);
		} else if (!srv->forced) {
			log_warn("%s again: dropping every connection", strsignal(si.ssi_signo));
			srv->forced = true;
			for (struct nbd_conn *c = srv->conns; c; c = c->next) {
				conn_kill(c);
				co_queue_wake_all(&c->waitq);
			}
		}
	}
}

void nbd_server_stop(struct nbd_server *srv)
{
	if (srv->stopping)
		return;
	srv->stopping = true;
	op_cancel(srv, &srv->accept_op);
	for (struct nbd_conn *c = srv->conns; c; c = c->next) {
		if (c->idle)
			op_cancel(srv, &c->idle_op);
		/* A reader waiting for a free slot re-checks stopping. */
		co_queue_wake_all(&c->waitq);
	}
}

static void reap_dead(struct nbd_server *srv)
{
	struct nbd_conn **pp = &srv->dead;

	while (*pp) {
		struct nbd_conn *c = *pp;
		if (coro_finished(c->co)) {
			*pp = c->next;
			conn_free(c);
		} else {
			pp = &c->next;
		}
	}
}

struct flush_job {
	struct nbd_server *srv;
	struct bdrv *bs;
	int ret;
};

static void flush_main(void *opaque)
{
	struct flush_job *j = opaque;
	j->ret = bdrv_co_flush(j->bs);
	loop_kick(j->srv);
}

int nbd_server_run(struct nbd_server *srv)
{
	struct aio_ctx *ctx = srv->ctx;
	struct flush_job job = { .srv = srv, .bs = srv->bs, .ret = 0 };
	struct coro *flush_co = NULL;
	int ret = 0;

	srv->accept_co = coro_new(accept_main, srv, 0);
	if (srv->sig_fd >= 0)
		srv->sig_co = coro_new(signal_main, srv, 0);
	if (!srv->accept_co || (srv->sig_fd >= 0 && !srv->sig_co)) {
		log_error("nbd server: cannot create coroutines: %s", strerror(errno));
		return -ENOMEM;
	}
	if (srv->sig_co)
		aio_schedule(srv->sig_co);
	aio_schedule(srv->accept_co);

	/* Serve, then drain: the acceptor and every connection finish. */
	while (!srv->stopping || !coro_finished(srv->accept_co) || srv->conns || srv->dead) {
		ret = aio_run_once(ctx, true);
		if (ret < 0) {
			log_error("nbd server: io_uring: %s", strerror(-ret));
			return ret;
		}
		reap_dead(srv);
	}

	/* Everything acknowledged so far reaches the disk. */
	flush_co = coro_new(flush_main, &job, 0);
	if (!flush_co) {
		job.ret = -ENOMEM;
	} else {
		aio_schedule(flush_co);
		while (!coro_finished(flush_co)) {
			ret = aio_run_once(ctx, true);
			if (ret < 0)
				break;
		}
		coro_free(flush_co);
	}
	if (job.ret < 0)
		log_error("%s: flush: %s", srv->bs->filename, strerror(-job.ret));

	/* Retire the signal reader so no SQE of ours is left in the ring. */
	srv->sig_exit = true;
	if (srv->sig_co) {
		op_cancel(srv, &srv->sig_op);
		while (!coro_finished(srv->sig_co) && ret >= 0)
			ret = aio_run_once(ctx, true);
	}
	while (ctx->inflight && ret >= 0)
		ret = aio_run_once(ctx, true);
	if (ret < 0)
		return ret;
	if (srv->error)
		return srv->error;
	return job.ret;
}

/* ---- setup ---- */

static int listen_unix(struct nbd_server *srv, const char *path, char *desc, size_t desc_len)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, err;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		log_error("%s: socket path too long (max %zu bytes)", path, sizeof(sa.sun_path) - 1);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			log_error("%s: exists and is not a socket; refusing to replace it", path);
			return -EEXIST;
		}
		unlink(path);   /* stale socket from an earlier run */
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err = -errno;
		log_error("%s: socket: %s", path, strerror(-err));
		return err;
	}
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, NBD_LISTEN_BACKLOG) < 0) {
		err = -errno;
		log_error("%s: cannot listen: %s", path, strerror(-err));
		close(fd);
		return err;
	}
	srv->unlink_path = strdup(path);
	snprintf(desc, desc_len, "%s", path);
	srv->listen_fd = fd;
	return 0;
}

static int listen_tcp(struct nbd_server *srv, const char *host, const char *port,
		      char *desc, size_t desc_len)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *res, *ai;
	int fd = -1, err = -EADDRNOTAVAIL, one = 1, gai;

	gai = getaddrinfo(host, port, &hints, &res);
	if (gai) {
		log_error("%s:%s: cannot resolve: %s", host, port, gai_strerror(gai));
		return -EINVAL;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0) {
			err = -errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
		    listen(fd, NBD_LISTEN_BACKLOG) == 0)
			break;
		err = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0) {
		log_error("%s:%s: cannot listen: %s", host, port, strerror(-err));
		return err;
	}

	/* Describe the bound address (the real port when "0" was asked). */
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char h[NI_MAXHOST], p[NI_MAXSERV];
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
	    getnameinfo((struct sockaddr *)&ss, sl, h, sizeof(h), p, sizeof(p),
			NI_NUMERICHOST | NI_NUMERICSERV) == 0)
		snprintf(desc, desc_len, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", h, p);
	else
		snprintf(desc, desc_len, "%s:%s", host, port);
	srv->listen_fd = fd;
	return 0;
}

static int setup_signals(struct nbd_server *srv)
{
	sigset_t set;

	/* A client that disconnects mid-reply must not kill us; sends also
	 * pass MSG_NOSIGNAL. */
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	if (sigprocmask(SIG_BLOCK, &set, &srv->old_mask) < 0)
		return -errno;
	srv->mask_saved = true;
	srv->sig_fd = signalfd(-1, &set, SFD_CLOEXEC);
	if (srv->sig_fd < 0) {
		int err = -errno;
		log_error("signalfd: %s", strerror(-err));
		return err;
	}
	return 0;
}

int nbd_server_open(struct bdrv *bs, const struct nbd_server_opts *opts,
		    struct nbd_server **out)
{
	struct nbd_server *srv;
	char desc[600];
	int ret;

	if (!aio_ctx_current()) {
		log_error("nbd server: no current aio context");
		return -EINVAL;
	}
	srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	srv->ctx = aio_ctx_current();
	srv->bs = bs;
	srv->listen_fd = -1;
	srv->sig_fd = -1;
	srv->export_name = strdup(opts->export_name ? opts->export_name : "");
	if (!srv->export_name) {
		ret = -ENOMEM;
		goto fail;
	}
	if (strlen(srv->export_name) > NBD_MAX_STRING) {
		log_error("export name longer than %d bytes", NBD_MAX_STRING);
		ret = -EINVAL;
		goto fail;
	}
	/* One image behind every connection on one thread: a flush on any
	 * connection covers writes completed on all of them (multi-conn). */
	srv->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
		      NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
		      NBD_FLAG_CAN_MULTI_CONN;
	if (opts->read_only || bs->read_only)
		srv->tflags |= NBD_FLAG_READ_ONLY;
	srv->pref_block = 4096;
	if (bs->cluster_size > 4096 && bs->cluster_size <= NBD_MAX_PAYLOAD &&
	    !(bs->cluster_size & (bs->cluster_size - 1)))
		srv->pref_block = bs->cluster_size;

	if (opts->handle_signals) {
		ret = setup_signals(srv);
		if (ret < 0)
			goto fail;
	}
	if (opts->socket_path)
		ret = listen_unix(srv, opts->socket_path, desc, sizeof(desc));
	else
		ret = listen_tcp(srv, opts->bind_addr ? opts->bind_addr : "127.0.0.1",
				 opts->port ? opts->port : "10809", desc, sizeof(desc));
	if (ret < 0)
		goto fail;
	fprintf(stderr, "serving %s on %s%s\n", bs->filename, desc,
		(srv->tflags & NBD_FLAG_READ_ONLY) ? " (read-only)" : "");
	*out = srv;
	return 0;
fail:
	nbd_server_close(srv);
	return ret;
}

void nbd_server_close(struct nbd_server *srv)
{
	if (!srv)
		return;
	/* Normally empty after nbd_server_run; after a loop failure the
	 * coroutines may still be parked mid-I/O, so only free what ended. */
	reap_dead(srv);
	if (srv->accept_co && coro_finished(srv->accept_co))
		coro_free(srv->accept_co);
	if (srv->sig_co && coro_finished(srv->sig_co))
		coro_free(srv->sig_co);
	if (srv->listen_fd >= 0)
		close(srv->listen_fd);
	if (srv->unlink_path) {
		unlink(srv->unlink_path);
		free(srv->unlink_path);
	}
	if (srv->sig_fd >= 0)
		close(srv->sig_fd);
	if (srv->mask_saved)
		sigprocmask(SIG_SETMASK, &srv->old_mask, NULL);
	free(srv->export_name);
	free(srv);
}
