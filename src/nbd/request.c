/* SPDX-License-Identifier: MIT */
/*
 * NBD requests: reading one off the wire, its buffer, validation at the
 * boundary (a bad request gets an error reply; only a broken protocol
 * drops the connection), execution against the image, and the request
 * coroutine that ends in exactly one reply.
 *
 * Memory: a request takes its buffer from the server's pool when it is
 * read and gives it back after its reply (pool.c, which also holds the
 * per-connection and server-wide caps the reader waits on).
 *
 * Thread model: the connection's reader and its request coroutines
 * (internal.h).
 */
#include <errno.h>
#include <string.h>

#include "block/bdrv.h"
#include "common/io.h"
#include "common/util.h"
#include "nbd/internal.h"

/* Give @r a buffer of @len bytes from the pool, under the memory caps
 * (pool.c).  Reader only: may wait.  Returns 0, -ENOMEM, or -ESHUTDOWN
 * if the connection died or the server stopped meanwhile. */
static int req_get_buf(struct nbd_conn *c, struct nbd_req *r, size_t len)
{
	unsigned cls = nbd_pool_class(len);
	size_t size = nbd_pool_class_size(cls);
	int ret = nbd_mem_admit(c, size);

	if (ret < 0)
		return ret;
	r->data = nbd_pool_get(&c->srv->pool, cls);
	if (!r->data) {
		nbd_mem_release(c, size);
		return -ENOMEM;
	}
	r->data_cls = cls;
	return 0;
}

void nbd_req_put(struct nbd_conn *c, struct nbd_req *r)
{
	if (r->data) {
		nbd_pool_put(&c->srv->pool, r->data, r->data_cls);
		nbd_mem_release(c, nbd_pool_class_size(r->data_cls));
		r->data = NULL;
	}
	r->next_free = c->free_reqs;
	c->free_reqs = r;
}

/* Range check at the boundary: EINVAL for reads, ENOSPC for writes past
 * the end (what a disk reports), EINVAL for an empty or oversized one. */
static int check_request(struct nbd_server *srv, const struct nbd_req *r, bool write)
{
	uint64_t end;

	/* TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload: any length
	 * is fine (with extended headers, past 4 GiB too: the protocol lets
	 * such effect lengths exceed the maximum payload). */
	if (r->len == 0 || (r->len > NBD_MAX_PAYLOAD && (r->type == NBD_CMD_READ ||
							 r->type == NBD_CMD_WRITE)))
		return EINVAL;
	if (ckd_add(&end, r->off, r->len) || end > srv->bs->size)
		return write ? ENOSPC : EINVAL;
	return 0;
}

/* Structured read: split the range into data and hole segments from the
 * block status (no data is read for it), read the data unless the whole
 * range is a hole.  Past NBD_READ_CHUNKS segments the rest goes as data. */
static int read_sparse(struct bdrv *bs, struct nbd_req *r)
{
	uint64_t pos = r->off, end = r->off + r->len;
	unsigned n = 0;

	while (pos < end) {
		uint64_t pnum;
		unsigned depth;
		int st = bdrv_co_block_status(bs, pos, end - pos, &pnum, &depth);
		bool zero = st >= 0 && (st & BDRV_BLOCK_ZERO);

		if (st < 0 || (n == NBD_READ_CHUNKS && r->segs[n - 1].zero != zero)) {
			/* Unknown, or out of chunks: the rest is data. */
			if (n && !r->segs[n - 1].zero) {
				r->segs[n - 1].len += end - pos;
			} else if (n < NBD_READ_CHUNKS) {
				r->segs[n++] = (typeof(r->segs[0])){ (uint32_t)(end - pos), false };
			} else {
				r->segs[n - 1].len += end - pos;
				r->segs[n - 1].zero = false;
			}
			break;
		}
		if (n && r->segs[n - 1].zero == zero)
			r->segs[n - 1].len += pnum;
		else
			r->segs[n++] = (typeof(r->segs[0])){ (uint32_t)pnum, zero };
		pos += pnum;
	}
	r->nsegs = n;
	if (n == 1 && r->segs[0].zero)
		return 0;
	return bdrv_co_pread(bs, r->off, r->len, r->data);
}

/* Descriptor lengths in the wire format of the connection: 32 bits in
 * compact descriptors, where no request covers 4 GiB and so neither does
 * any sum; 64 bits (then 32 zero bits) with extended headers. */
static uint64_t bs_desc_len(const struct nbd_conn *c, const uint8_t *d)
{
	return c->extended ? get_be64(d) : get_be32(d);
}

static void bs_desc_put(const struct nbd_conn *c, uint8_t *d, uint64_t len, uint32_t flags)
{
	if (c->extended) {
		put_be64(d, len);
		put_be32(d + 8, 0);
		put_be32(d + 12, flags);
	} else {
		put_be32(d, (uint32_t)len);
		put_be32(d + 4, flags);
	}
}

/* NBD_CMD_BLOCK_STATUS: descriptors of every selected context, each list
 * merged on its own value and capped (one with REQ_ONE); the walk stops
 * where a list is full, or after NBD_BS_STEPS lookups (an extended
 * request may span the whole image: a shorter answer is allowed, and the
 * client asks again from where it ends). */
static int block_status(struct nbd_conn *c, struct bdrv *bs, struct nbd_req *r)
{
	uint64_t pos = r->off, end = r->off + r->len;
	unsigned max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_BS_EXTENTS;
	size_t dsz = nbd_bs_desc_size(c);
	uint32_t last[NBD_META_COUNT] = { 0 };

	memset(r->next, 0, sizeof(r->next));
	for (unsigned step = 0; pos < end && step < NBD_BS_STEPS; step++) {
		uint64_t pnum;
		unsigned depth;
		int st = bdrv_co_block_status(bs, pos, end - pos, &pnum, &depth);
		uint32_t v[NBD_META_COUNT];
		bool full = false;

		if (st < 0)
			return st;
		v[NBD_META_ALLOC] = ((st & BDRV_BLOCK_DATA) ? 0 : NBD_STATE_HOLE) |
				    ((st & BDRV_BLOCK_ZERO) ? NBD_STATE_ZERO : 0);
		v[NBD_META_DEPTH] = depth;
		for (unsigned i = 0; i < NBD_META_COUNT; i++)
			if (c->meta[i] && (!r->next[i] || last[i] != v[i]) && r->next[i] == max)
				full = true;
		if (full)
			break;
		for (unsigned i = 0; i < NBD_META_COUNT; i++) {
			uint8_t *d = (uint8_t *)r->data + i * NBD_BS_EXTENTS * dsz;

			if (!c->meta[i])
				continue;
			if (r->next[i] && last[i] == v[i]) {
				d += (r->next[i] - 1) * dsz;
				bs_desc_put(c, d, bs_desc_len(c, d) + pnum, v[i]);
			} else {
				d += r->next[i]++ * dsz;
				bs_desc_put(c, d, pnum, v[i]);
				last[i] = v[i];
			}
		}
		pos += pnum;
	}
	return 0;
}

static int execute(struct nbd_server *srv, struct nbd_req *r)
{
	struct nbd_conn *c = r->conn;
	struct bdrv *bs = srv->bs;
	bool fua = r->flags & NBD_CMD_FLAG_FUA;
	int err, ret = 0;

	switch (r->type) {
	case NBD_CMD_READ:
		/* FUA is accepted on every command (a read has nothing to
		 * persist); DF needs structured replies. */
		if (r->flags & ~(NBD_CMD_FLAG_FUA | (c->structured ? NBD_CMD_FLAG_DF : 0)))
			return EINVAL;
		if ((err = check_request(srv, r, false)))
			return err;
		/* Raw block status is an lseek(SEEK_DATA), whose cost the file
		 * system decides: ~100 ms on a fallocated 1 GiB tmpfs file,
		 * which walks every page.  Clients that want sparseness ask
		 * NBD_CMD_BLOCK_STATUS; a raw read just sends its data. */
		if (c->structured && !(r->flags & NBD_CMD_FLAG_DF) && bs->drv != &bdrv_raw) {
			ret = read_sparse(bs, r);
		} else {
			r->nsegs = 1;
			r->segs[0].len = r->len;
			r->segs[0].zero = false;
			ret = bdrv_co_pread(bs, r->off, r->len, r->data);
		}
		break;
	case NBD_CMD_BLOCK_STATUS:
		if (!c->structured || !memchr(c->meta, true, sizeof(c->meta)))
			return EINVAL;      /* no context negotiated */
		if (r->flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE))
			return EINVAL;
		if ((err = check_request(srv, r, false)))
			return err;
		ret = block_status(c, bs, r);
		break;
	case NBD_CMD_WRITE:
		if (r->flags & ~(NBD_CMD_FLAG_FUA | (c->extended ? NBD_CMD_FLAG_PAYLOAD_LEN : 0)))
			return EINVAL;
		if (bs->read_only)
			return EPERM;
		if ((err = check_request(srv, r, true)))
			return err;
		ret = bdrv_co_pwrite(bs, r->off, r->len, r->data, fua ? BDRV_REQ_FUA : 0);
		break;
	case NBD_CMD_FLUSH:
		if (r->flags & ~NBD_CMD_FLAG_FUA)
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
		if (r->flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO))
			return EINVAL;
		if (bs->read_only)
			return EPERM;
		if ((err = check_request(srv, r, true)))
			return err;
		if (!(r->flags & NBD_CMD_FLAG_NO_HOLE))
			fl |= BDRV_REQ_MAY_UNMAP;
		if (fua)
			fl |= BDRV_REQ_FUA;
		/* FAST_ZERO: ENOTSUP where zeroing would mean writing zeros
		 * (an unaligned qcow2 head or tail over data, a raw file system
		 * without fallocate), and the client writes them itself. */
		if (r->flags & NBD_CMD_FLAG_FAST_ZERO)
			fl |= BDRV_REQ_NO_FALLBACK;
		ret = bdrv_co_pwrite_zeroes(bs, r->off, r->len, fl);
		break;
	}
	default:
		return EINVAL;
	}
	if (ret < 0 && ret != -EINVAL)
		log_debug("connection %u: %s request at %llu+%llu failed: %s", r->conn->id,
			  r->type == NBD_CMD_READ ? "read" : "write-side",
			  (unsigned long long)r->off, (unsigned long long)r->len, strerror(-ret));
	return ret < 0 ? -ret : 0;
}


void nbd_req_main(void *opaque)
{
	struct nbd_req *r = opaque;
	struct nbd_conn *c = r->conn;
	int err = r->error;

	if (!err)
		err = execute(c->srv, r);
	nbd_send_reply(c, r, err);
	nbd_req_put(c, r);
	c->inflight--;
	co_queue_wake_all(&c->waitq);
}

/* Read the payload of a request that gets an error reply anyway (@err)
 * and throw it away: the next request follows it. */
static int req_skip_payload(struct nbd_conn *c, struct nbd_req *r, int err)
{
	int ret = nbd_conn_skip(c, r->len);

	r->error = err;
	return ret < 0 ? ret : 1;
}

/* Read one request into @r.  Returns 1 to dispatch, 0 for DISC, -errno to
 * drop the connection.
 *
 * Framing is all that is decided here: a request that is malformed but
 * whose end is known gets an error reply (execute() checks the rest), one
 * whose end is not known (a bad magic) drops the connection.  A write
 * carries a payload of its length.  With extended headers so does any
 * request with NBD_CMD_FLAG_PAYLOAD_LEN, which is skipped and refused on
 * a command other than a write; a payload over NBD_MAX_PAYLOAD drops the
 * connection, as the protocol recommends (there may be no end to skip:
 * the length has 64 bits).  The protocol wants the flag on every
 * extended write, but QEMU's client (8.2 to 10 at least) leaves it out,
 * and QEMU's server takes such writes as we do. */
int nbd_read_request(struct nbd_conn *c, struct nbd_req *r)
{
	uint8_t h[NBD_EXT_REQUEST_SIZE];
	size_t hlen = c->extended ? NBD_EXT_REQUEST_SIZE : NBD_REQUEST_SIZE;
	uint32_t magic = c->extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC;
	bool payload;
	int ret = nbd_conn_read(c, h, hlen, true);

	if (ret < 0)
		return ret;
	if (get_be32(h) != magic) {
		log_warn("connection %u: bad request magic 0x%08x (%s headers), dropping",
			 c->id, get_be32(h), c->extended ? "extended" : "compact");
		return -EPROTO;
	}
	r->flags = get_be16(h + 4);
	r->type = get_be16(h + 6);
	memcpy(r->cookie, h + 8, 8);
	r->off = get_be64(h + 16);
	r->len = c->extended ? get_be64(h + 24) : get_be32(h + 24);
	r->error = 0;
	r->data = NULL;

	if (r->type == NBD_CMD_DISC)
		return 0;
	payload = r->type == NBD_CMD_WRITE || (c->extended && (r->flags & NBD_CMD_FLAG_PAYLOAD_LEN));
	if (c->extended && payload && r->len > NBD_MAX_PAYLOAD) {
		log_warn("connection %u: request payload of %llu bytes over the maximum, "
			 "dropping", c->id, (unsigned long long)r->len);
		return -EPROTO;
	}

	if (payload) {
		/* The payload follows whatever we think of the request. */
		if (r->type != NBD_CMD_WRITE || r->len > NBD_MAX_PAYLOAD)
			return req_skip_payload(c, r, EINVAL);
		if (r->len && (ret = req_get_buf(c, r, r->len)) < 0) {
			if (ret == -ESHUTDOWN)
				return ret;     /* stopping mid-message: drop */
			return req_skip_payload(c, r, ENOMEM);
		}
		ret = r->len ? nbd_conn_read(c, r->data, r->len, false) : 0;
		return ret < 0 ? ret : 1;
	}

	switch (r->type) {
	case NBD_CMD_BLOCK_STATUS:
		if ((ret = req_get_buf(c, r, nbd_bs_buf_size(c))) < 0) {
			if (ret == -ESHUTDOWN)
				return ret;
			r->error = ENOMEM;
		}
		return 1;
	case NBD_CMD_READ:
		/* Only a valid read gets a buffer; execute() reports the rest. */
		if (r->len && r->len <= NBD_MAX_PAYLOAD && (ret = req_get_buf(c, r, r->len)) < 0) {
			if (ret == -ESHUTDOWN)
				return ret;
			r->error = ENOMEM;
		}
		return 1;
	default:
		return 1;
	}
}
