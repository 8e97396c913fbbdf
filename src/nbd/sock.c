/* SPDX-License-Identifier: MIT */
/*
 * Socket I/O of one NBD connection: exact reads through a read-ahead
 * buffer (several request headers come in with one recv), skipping a
 * refused payload, and full sends of an iovec.  Under TLS the same reads
 * and sends go through GnuTLS (tls.c), whose own socket I/O comes back
 * here (nbd_sock_send) or waits as the same operations.
 *
 * Only reads in an "idle" state (no byte of the next message consumed)
 * wait as c->idle_op, which a stop may cancel; a read inside a message
 * waits as c->data_op, and the send in progress as c->send_op: those
 * are cancelled only when the connection is killed (a stop kills a
 * connection mid-message at once, and any still busy after the grace
 * period).
 *
 * A reader waiting for a new message while the loop spins (--poll-us)
 * parks without a recv armed: an armed recv is a poll on the socket, and
 * then every send of the client runs our wakeup in its own system call
 * (a whole microsecond here, a tenth of what the client spends per
 * request at depth).  The loop polls the parked sockets with a zero
 * timeout while it spins, which registers nothing, and has every parked
 * reader arm its recv before it sleeps.
 *
 * Thread model: the server's thread (internal.h).  One reader (the
 * connection's reader coroutine) and one sender at a time.
 */
#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#include "common/util.h"
#include "nbd/internal.h"

#define NBD_PARK_MAX 16      /* polled per turn; more readers arm at once */

void nbd_conn_unpark(struct nbd_conn *c, bool arm)
{
	struct nbd_server *srv = c->srv;

	if (!c->parked)
		return;
	if (c->park_prev)
		c->park_prev->park_next = c->park_next;
	else
		srv->parked = c->park_next;
	if (c->park_next)
		c->park_next->park_prev = c->park_prev;
	srv->nparked--;
	c->parked = false;
	c->park_arm = arm;
	aio_schedule(c->co);
}

/* Wait, with no recv armed, until nbd_conn_unpark(). */
static void park(struct nbd_conn *c)
{
	struct nbd_server *srv = c->srv;

	assert(coro_self() == c->co);   /* only the reader parks */
	c->park_prev = NULL;
	c->park_next = srv->parked;
	if (srv->parked)
		srv->parked->park_prev = c;
	srv->parked = c;
	srv->nparked++;
	c->parked = true;
	while (c->parked)
		coro_yield();
}

bool nbd_sock_idle_hook(void *opaque, bool sleeping)
{
	struct nbd_server *srv = opaque;
	struct pollfd pfd[NBD_PARK_MAX];
	struct nbd_conn *cs[NBD_PARK_MAX], *c;
	unsigned n = 0;
	bool woke = false;

	if (!srv->parked)
		return false;
	if (sleeping) {
		while (srv->parked)
			nbd_conn_unpark(srv->parked, true);
		return true;
	}
	for (c = srv->parked; c && n < NBD_PARK_MAX; c = c->park_next) {
		pfd[n] = (struct pollfd){ .fd = c->fd, .events = POLLIN | POLLRDHUP };
		cs[n++] = c;
	}
	/* A zero timeout registers nothing on the sockets. */
	if (poll(pfd, n, 0) <= 0)
		return false;
	for (unsigned i = 0; i < n; i++) {
		if (pfd[i].revents) {
			nbd_conn_unpark(cs[i], false);
			woke = true;
		}
	}
	return woke;
}

void nbd_conn_kill(struct nbd_conn *c)
{
	if (c->dead)
		return;
	c->dead = true;
	nbd_conn_unpark(c, false);
	shutdown(c->fd, SHUT_RDWR);
	/* The shutdown wakes most waiters; a cancel makes sure of it. */
	aio_cancel(c->srv->ctx, &c->idle_op);
	aio_cancel(c->srv->ctx, &c->data_op);
	aio_cancel(c->srv->ctx, &c->send_op);
	co_queue_wake_all(&c->waitq);
	co_queue_wake_all(&c->srv->mem_wait);   /* its reader may wait there */
}

bool nbd_conn_hung_up(struct nbd_conn *c)
{
	struct pollfd pfd = { .fd = c->fd, .events = POLLRDHUP };

	if (c->dead)
		return true;
	/* A zero timeout: this never blocks the loop. */
	if (poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
		log_debug("connection %u: client hung up", c->id);
		nbd_conn_kill(c);
		return true;
	}
	return false;
}

int nbd_conn_read(struct nbd_conn *c, void *dst, size_t n, bool idle)
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
		struct aio_wait *op = idle ? &c->idle_op : &c->data_op;
		ssize_t res;

		c->idle = idle;
		if (c->tls) {
			res = nbd_tls_recv(c, buf, len, op);
		} else if (idle && srv->ctx->idle_hook && !c->park_arm &&
			   srv->nparked < NBD_PARK_MAX) {
			res = recv(c->fd, buf, len, MSG_DONTWAIT);
			res = res < 0 ? -errno : res;
			if (res == -EAGAIN) {
				park(c);
				c->idle = false;
				continue;       /* decided again: data, a stop, a kill */
			}
		} else {
			struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
			c->park_arm = false;
			io_uring_prep_recv(sqe, c->fd, buf, len, 0);
			res = aio_co_wait_sqe_as(srv->ctx, op, sqe);
		}
		c->idle = false;
		if (res == -EINTR || res == -EAGAIN)
			continue;
		if (res == -ECANCELED || res == -ESHUTDOWN || c->dead)
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

int nbd_conn_skip(struct nbd_conn *c, uint64_t n)
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
		/* Refill rbuf through a read of one byte. */
		ret = nbd_conn_read(c, &one, 1, false);
		if (ret < 0)
			return ret;
		n--;
	}
	return 0;
}

int nbd_conn_send(struct nbd_conn *c, struct iovec *iov, int cnt)
{
	if (c->tls)
		return c->dead ? -EPIPE : nbd_tls_send(c, iov, cnt);
	return nbd_sock_send(c, iov, cnt);
}

int nbd_sock_send(struct nbd_conn *c, struct iovec *iov, int cnt)
{
	while (cnt) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = cnt };
		struct io_uring_sqe *sqe;
		int res;

		if (c->dead)
			return -EPIPE;
		/* The socket buffer nearly always has room: send now, and go
		 * through the ring (which waits for room) only when it has
		 * not. */
		res = (int)sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (res < 0)
			res = -errno;
		if (res == -EAGAIN) {
			sqe = aio_get_sqe(c->srv->ctx, NULL);
			io_uring_prep_sendmsg(sqe, c->fd, &msg, MSG_NOSIGNAL);
			res = aio_co_wait_sqe_as(c->srv->ctx, &c->send_op, sqe);
		}
		if (c->dead)
			return -EPIPE;
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

int nbd_conn_send_buf(struct nbd_conn *c, const void *buf, size_t len)
{
	struct iovec iov = { (void *)buf, len };
	return nbd_conn_send(c, &iov, 1);
}
