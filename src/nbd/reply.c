/* SPDX-License-Identifier: MIT */
/*
 * NBD replies: encoding, and the per-connection send queue.
 *
 * Without structured replies every reply is a simple one (header, then
 * the data of a read).  With them, a read answers with data and hole
 * chunks (request.c split the range; holes cost no bytes on the wire) or
 * an error chunk, and block status with one chunk per selected context;
 * other commands keep simple replies, as the protocol allows.  Extended
 * headers allow no simple reply: every chunk has the 32-byte extended
 * header (which repeats the request's offset), other commands answer
 * with a lone NBD_REPLY_TYPE_NONE or error chunk, and block status with
 * NBD_REPLY_TYPE_BLOCK_STATUS_EXT (64-bit extent lengths).
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

		for (r = first; r && n + r->riovcnt <= NBD_SEND_IOV; r = r->reply_next) {
			memcpy(c->siov + n, r->riov, r->riovcnt * sizeof(struct iovec));
			n += r->riovcnt;
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

/* Append chunk header @i of @r: @len bytes of payload follow the header
 * (20 bytes, 32 with extended headers), of which @fixed are in rhdr[i]
 * after it (returned for filling). */
static uint8_t *chunk(struct nbd_req *r, unsigned i, uint16_t flags, uint16_t type,
		      uint64_t len, size_t fixed)
{
	uint8_t *h = r->rhdr[i];
	size_t hlen;

	put_be16(h + 4, flags);
	put_be16(h + 6, type);
	memcpy(h + 8, r->cookie, 8);
	if (r->conn->extended) {
		put_be32(h, NBD_EXTENDED_REPLY_MAGIC);
		put_be64(h + 16, r->off);
		put_be64(h + 24, len);
		hlen = NBD_EXT_CHUNK_HDR_SIZE;
	} else {
		put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
		put_be32(h + 16, (uint32_t)len);
		hlen = NBD_CHUNK_HDR_SIZE;
	}
	r->riov[r->riovcnt++] = (struct iovec){ h, hlen + fixed };
	return h + hlen;
}

static void build_error(struct nbd_req *r, int err)
{
	uint8_t *p = chunk(r, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6, 6);

	put_be32(p, errno_to_nbd(err));
	put_be16(p + 4, 0);
}

static void build_simple(struct nbd_req *r, int err)
{
	uint8_t *h = r->rhdr[0];

	put_be32(h, NBD_SIMPLE_REPLY_MAGIC);
	put_be32(h + 4, errno_to_nbd(err));
	memcpy(h + 8, r->cookie, 8);
	r->riov[r->riovcnt++] = (struct iovec){ h, NBD_SIMPLE_REPLY_SIZE };
	if (r->type == NBD_CMD_READ && !err)
		r->riov[r->riovcnt++] = (struct iovec){ r->data, r->len };
}

static void build_read(struct nbd_req *r)
{
	uint64_t off = r->off;
	uint32_t pos = 0;

	for (unsigned i = 0; i < r->nsegs; i++) {
		uint16_t fl = i + 1 == r->nsegs ? NBD_REPLY_FLAG_DONE : 0;
		uint32_t len = r->segs[i].len;
		uint8_t *p;

		if (r->segs[i].zero) {
			p = chunk(r, i, fl, NBD_REPLY_TYPE_OFFSET_HOLE, 12, 12);
			put_be64(p, off);
			put_be32(p + 8, len);
		} else {
			p = chunk(r, i, fl, NBD_REPLY_TYPE_OFFSET_DATA, 8 + len, 8);
			put_be64(p, off);
			r->riov[r->riovcnt++] = (struct iovec){ (uint8_t *)r->data + pos, len };
		}
		off += len;
		pos += len;
	}
}

/* One status chunk per selected context: a context id, then (extended)
 * the descriptor count, then the descriptors request.c wrote in the
 * connection's format. */
static void build_block_status(struct nbd_conn *c, struct nbd_req *r)
{
	size_t dsz = nbd_bs_desc_size(c), fixed = c->extended ? 8 : 4;
	uint16_t type = c->extended ? NBD_REPLY_TYPE_BLOCK_STATUS_EXT : NBD_REPLY_TYPE_BLOCK_STATUS;
	unsigned last = 0, n = 0;

	for (unsigned i = 0; i < NBD_META_COUNT; i++)
		if (c->meta[i])
			last = i;
	for (unsigned i = 0; i < NBD_META_COUNT; i++) {
		size_t bytes = r->next[i] * dsz;
		uint8_t *p;

		if (!c->meta[i])
			continue;
		p = chunk(r, n++, i == last ? NBD_REPLY_FLAG_DONE : 0, type, fixed + bytes, fixed);
		put_be32(p, i + 1);
		if (c->extended)
			put_be32(p + 4, r->next[i]);
		r->riov[r->riovcnt++] = (struct iovec){
			(uint8_t *)r->data + i * NBD_BS_EXTENTS * dsz, bytes };
	}
}

void nbd_send_reply(struct nbd_conn *c, struct nbd_req *r, int err)
{
	r->riovcnt = 0;
	if (err && (c->extended || (c->structured && r->type == NBD_CMD_READ)))
		build_error(r, err);
	else if (c->structured && r->type == NBD_CMD_READ)
		build_read(r);
	else if (c->structured && r->type == NBD_CMD_BLOCK_STATUS && !err)
		build_block_status(c, r);
	else if (c->extended)
		chunk(r, 0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0, 0);
	else
		build_simple(r, err);
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
