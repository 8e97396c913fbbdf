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
 * Thread model: the server's thread (internal.h).  One reader (the
 * connection's reader coroutine) and one sender at a time.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#include "common/util.h"
#include "nbd/internal.h"

void nbd_conn_kill(struct nbd_conn *c)
{
	if (c->dead)
		return;
	c->dead = true;
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
		} else {
			struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
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
