/* SPDX-License-Identifier: MIT */
/*
 * NBD replies: encoding, and the per-connection send queue.
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
 * Thread model: request coroutines of one connection (internal.h).
 */
#include <errno.h>
#include <string.h>

#include "common/util.h"
#include "nbd/internal.h"

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
		ret = nbd_conn_send(c, c->siov, n);
		if (ret < 0 && !c->dead) {
			log_debug("connection %u: send reply: %s", c->id, strerror(-ret));
			nbd_conn_kill(c);
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

void nbd_send_reply(struct nbd_conn *c, struct nbd_req *r, int err)
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
