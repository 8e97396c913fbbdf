/* SPDX-License-Identifier: MIT */
/*
 * One NBD connection: created by the acceptor, driven by its reader
 * coroutine (negotiation, then a loop that reads each request and
 * dispatches it to a request coroutine from the connection's pool), freed
 * by the main loop once the reader has finished.
 *
 * Invariants:
 *   - a connection is freed only from the main loop, after its reader has
 *     finished, which it does only once no request of it is in flight;
 *   - every dispatched request sends exactly one reply (or finds the
 *     socket dead) and then returns its slot.
 *
 * Thread model: the server's thread (internal.h).
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/io.h"
#include "common/util.h"
#include "nbd/internal.h"

static void conn_main(void *opaque)
{
	struct nbd_conn *c = opaque;
	struct nbd_server *srv = c->srv;
	int ret;

	ret = nbd_negotiate(c);
	while (ret >= 0) {
		struct nbd_req *r;

		while (!(r = c->free_reqs) && !c->dead && !srv->stopping)
			co_queue_wait(&c->waitq);
		if (!r || c->dead || srv->stopping)
			break;
		c->free_reqs = r->next_free;
		ret = nbd_read_request(c, r);
		if (ret <= 0) {
			nbd_req_put(c, r);
			break;
		}
		c->inflight++;
		coro_reset(r->co, nbd_req_main, r);
		aio_schedule(r->co);
	}
	if (ret < 0 && ret != -ECONNRESET && ret != -ESHUTDOWN && ret != -EPIPE)
		log_debug("connection %u: closing: %s", c->id, strerror(-ret));

	while (c->inflight)
		co_queue_wait(&c->waitq);
	log_debug("connection %u: closed", c->id);
	srv->nconns--;
	co_queue_wake_all(&srv->accept_wait);

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
	nbd_loop_kick(srv);
}

void nbd_conn_free(struct nbd_conn *c)
{
	for (unsigned i = 0; i < NBD_CONN_DEPTH; i++) {
		coro_free(c->reqs[i].co);
	}
	coro_free(c->co);
	nbd_tls_conn_free(c);
	if (c->fd >= 0)
		close(c->fd);
	io_free(c->rbuf);
	free(c->optbuf);
	free(c);
}

int nbd_conn_new(struct nbd_server *srv, int fd)
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
	c->co = coro_new(conn_main, c, srv->tls ? NBD_READER_STACK : 0);
	if (!c->rbuf || !c->optbuf || !c->co)
		goto fail;
	for (unsigned i = 0; i < NBD_CONN_DEPTH; i++) {
		struct nbd_req *r = &c->reqs[i];
		r->conn = c;
		r->co = coro_new(nbd_req_main, r, 0);
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
	srv->nconns++;
	log_debug("connection %u: accepted", c->id);
	aio_schedule(c->co);
	return 0;
fail:
	c->fd = -1;          /* the caller closes it */
	nbd_conn_free(c);
	return -ENOMEM;
}

