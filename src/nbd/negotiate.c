/* SPDX-License-Identifier: MIT */
/*
 * NBD negotiation: fixed newstyle option haggling until NBD_OPT_GO (or
 * the old NBD_OPT_EXPORT_NAME) starts transmission.  Every option's
 * payload is read whole (up to NBD_OPT_MAX; a longer one is skipped and
 * refused with ERR_TOO_BIG) before it is parsed, and every length inside
 * it is checked against what was read.
 *
 * TLS: NBD_OPT_STARTTLS starts the handshake (tls.c).  With --tls=require
 * every other option before it gets NBD_REP_ERR_TLS_REQD (its payload read
 * and dropped), and NBD_OPT_EXPORT_NAME, which cannot be refused, closes.
 *
 * Extended headers (NBD_OPT_EXTENDED_HEADERS) imply structured replies and
 * take precedence over them: NBD_OPT_STRUCTURED_REPLY afterwards gets
 * NBD_REP_ERR_EXT_HEADER_REQD (no way back to compact headers), a second
 * NBD_OPT_EXTENDED_HEADERS NBD_REP_ERR_INVALID, and NBD_OPT_EXPORT_NAME,
 * which a client that asked for them must not send, closes.  STARTTLS
 * forgets them like every other option state.
 *
 * Thread model: the connection's reader coroutine (internal.h).
 */
#include <errno.h>
#include <string.h>

#include "block/bdrv.h"
#include "common/util.h"
#include "nbd/internal.h"

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
	return nbd_conn_send(c, iov, len ? 2 : 1);
}

/* Transmission flags for this connection: DF only with structured
 * replies. */
static uint16_t conn_tflags(struct nbd_conn *c)
{
	return c->srv->tflags | (c->structured ? NBD_FLAG_SEND_DF : 0);
}

static int send_info_export(struct nbd_conn *c, uint32_t opt)
{
	struct nbd_server *srv = c->srv;
	uint8_t info[12];

	put_be16(info, NBD_INFO_EXPORT);
	put_be64(info + 2, srv->bs->size);
	put_be16(info + 10, conn_tflags(c));
	return send_opt_reply(c, opt, NBD_REP_INFO, info, sizeof(info));
}

const char *const nbd_meta_names[NBD_META_COUNT] = {
	[NBD_META_ALLOC] = NBD_META_BASE_ALLOCATION,
	[NBD_META_DEPTH] = NBD_META_QEMU_ALLOC_DEPTH,
};

/* Which of our contexts a query names: exact names, and for LIST the
 * namespace wildcards "base:" and "qemu:".  Sets bits in *@sel. */
static void meta_match(const char *q, uint32_t qlen, bool list, bool sel[NBD_META_COUNT])
{
	for (unsigned i = 0; i < NBD_META_COUNT; i++) {
		const char *name = nbd_meta_names[i];
		const char *colon = strchr(name, ':');
		size_t ns = colon - name + 1;

		if ((strlen(name) == qlen && !memcmp(name, q, qlen)) ||
		    (list && qlen == ns && !memcmp(name, q, ns)))
			sel[i] = true;
	}
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: u32 name length,
 * name, u32 query count, queries (u32 length, string).  SET replaces the
 * selection; LIST with no query lists every context.  Returns -errno
 * only when the connection must drop. */
static int handle_meta(struct nbd_conn *c, uint32_t opt, const uint8_t *d, uint32_t len)
{
	bool set = opt == NBD_OPT_SET_META_CONTEXT;
	bool sel[NBD_META_COUNT] = { false };
	uint32_t namelen, nq, pos;
	int ret;

	if (set && !c->structured)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	if (len < 8)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	namelen = get_be32(d);
	if (namelen > NBD_MAX_STRING || (uint64_t)namelen + 8 > len)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	nq = get_be32(d + 4 + namelen);
	pos = 8 + namelen;
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t ql;

		if (len - pos < 4)
			return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
		ql = get_be32(d + pos);
		pos += 4;
		if (ql > NBD_MAX_STRING || ql > len - pos)
			return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
		meta_match((const char *)d + pos, ql, !set, sel);
		pos += ql;
	}
	if (pos != len)
		return send_opt_reply(c, opt, NBD_REP_ERR_INVALID, NULL, 0);
	if (!export_matches(c->srv, (const char *)d + 4, namelen))
		return send_opt_reply(c, opt, NBD_REP_ERR_UNKNOWN, NULL, 0);
	if (!set && nq == 0)
		memset(sel, true, sizeof(sel));
	if (set)
		memcpy(c->meta, sel, sizeof(sel));
	for (unsigned i = 0; i < NBD_META_COUNT; i++) {
		uint8_t rep[4 + 64];
		size_t nl = strlen(nbd_meta_names[i]);

		if (!sel[i])
			continue;
		/* Ids mean nothing in a LIST reply: 0 there. */
		put_be32(rep, set ? i + 1 : 0);
		memcpy(rep + 4, nbd_meta_names[i], nl);
		ret = send_opt_reply(c, opt, NBD_REP_META_CONTEXT, rep, 4 + nl);
		if (ret < 0)
			return ret;
	}
	return send_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
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

/* Under --tls=require, nothing but STARTTLS and ABORT before TLS. */
static bool tls_ok(struct nbd_conn *c)
{
	return c->tls || c->srv->tls_mode != NBD_TLS_REQUIRE;
}

/* NBD_OPT_STARTTLS: ack, then the handshake; what was negotiated before
 * it is forgotten (the protocol says so: a man in the middle could have
 * chosen it).  Returns -errno to drop the connection. */
static int starttls(struct nbd_conn *c, uint32_t len)
{
	int ret;

	if (c->srv->tls_mode == NBD_TLS_OFF)
		return send_opt_reply(c, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP, NULL, 0);
	if (len || c->tls)
		return send_opt_reply(c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, NULL, 0);
	/* Bytes read ahead past the option would be TLS records we took as
	 * plaintext: a client must wait for the ack. */
	if (c->rpos < c->rlen) {
		log_warn("connection %u: data after NBD_OPT_STARTTLS before its reply", c->id);
		return -EPROTO;
	}
	ret = send_opt_reply(c, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0);
	if (ret < 0)
		return ret;
	ret = nbd_tls_handshake(c);
	if (ret < 0)
		return ret;
	c->structured = false;
	c->extended = false;
	memset(c->meta, 0, sizeof(c->meta));
	return 0;
}

/* NBD_OPT_STRUCTURED_REPLY and NBD_OPT_EXTENDED_HEADERS: no payload. */
static int handle_reply_mode(struct nbd_conn *c, uint32_t opt, uint32_t len)
{
	uint32_t err = 0;

	if (len)
		err = NBD_REP_ERR_INVALID;
	else if (c->extended)
		err = opt == NBD_OPT_STRUCTURED_REPLY ? NBD_REP_ERR_EXT_HEADER_REQD
						      : NBD_REP_ERR_INVALID;
	if (err)
		return send_opt_reply(c, opt, err, NULL, 0);
	c->structured = true;
	c->extended = opt == NBD_OPT_EXTENDED_HEADERS;
	return send_opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
}

static void log_transmission(const struct nbd_conn *c)
{
	log_debug("connection %u: transmission with %s", c->id,
		  c->extended ? "extended headers" :
		  c->structured ? "structured replies" : "simple replies");
}

int nbd_negotiate(struct nbd_conn *c)
{
	struct nbd_server *srv = c->srv;
	uint8_t greet[18], cflags[4], oh[NBD_OPT_HDR_SIZE];
	int ret;

	put_be64(greet, NBD_MAGIC);
	put_be64(greet + 8, NBD_OPTS_MAGIC);
	put_be16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	ret = nbd_conn_send_buf(c, greet, sizeof(greet));
	if (ret < 0)
		return ret;
	ret = nbd_conn_read(c, cflags, sizeof(cflags), true);
	if (ret < 0)
		return ret;
	uint32_t cf = get_be32(cflags);
	if (cf & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
		log_warn("connection %u: unknown client flags 0x%x, dropping", c->id, cf);
		return -EPROTO;
	}
	c->no_zeroes = cf & NBD_FLAG_C_NO_ZEROES;

	for (;;) {
		ret = nbd_conn_read(c, oh, sizeof(oh), true);
		if (ret < 0)
			return ret;
		if (get_be64(oh) != NBD_OPTS_MAGIC) {
			log_warn("connection %u: bad option magic, dropping", c->id);
			return -EPROTO;
		}
		uint32_t opt = get_be32(oh + 8), len = get_be32(oh + 12);

		if (opt == NBD_OPT_EXPORT_NAME) {
			/* No way to report an error: a bad name closes. */
			if (!tls_ok(c)) {
				log_warn("connection %u: NBD_OPT_EXPORT_NAME without TLS: dropping",
					 c->id);
				return -EACCES;
			}
			if (c->extended) {
				log_warn("connection %u: NBD_OPT_EXPORT_NAME after extended "
					 "headers: dropping", c->id);
				return -EPROTO;
			}
			uint8_t tail[10 + 124] = { 0 };
			if (len > NBD_MAX_STRING)
				return -EPROTO;
			ret = nbd_conn_read(c, c->optbuf, len, false);
			if (ret < 0)
				return ret;
			if (!export_matches(srv, (const char *)c->optbuf, len)) {
				log_warn("connection %u: unknown export '%.*s'", c->id,
					 (int)len, (const char *)c->optbuf);
				return -ENOENT;
			}
			put_be64(tail, srv->bs->size);
			put_be16(tail + 8, conn_tflags(c));
			log_transmission(c);
			return nbd_conn_send_buf(c, tail, c->no_zeroes ? 10 : sizeof(tail));
		}
		if (len > NBD_OPT_MAX) {
			ret = nbd_conn_skip(c, len);
			if (!ret)
				ret = send_opt_reply(c, opt, NBD_REP_ERR_TOO_BIG, NULL, 0);
			if (ret < 0)
				return ret;
			continue;
		}
		ret = nbd_conn_read(c, c->optbuf, len, false);
		if (ret < 0)
			return ret;

		if (!tls_ok(c) && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
			ret = send_opt_reply(c, opt, NBD_REP_ERR_TLS_REQD, NULL, 0);
			if (ret < 0)
				return ret;
			continue;
		}
		switch (opt) {
		case NBD_OPT_STARTTLS:
			ret = starttls(c, len);
			break;
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
			if (ret == 1) {
				log_transmission(c);
				return 0;
			}
			break;
		case NBD_OPT_STRUCTURED_REPLY:
		case NBD_OPT_EXTENDED_HEADERS:
			ret = handle_reply_mode(c, opt, len);
			break;
		case NBD_OPT_LIST_META_CONTEXT:
		case NBD_OPT_SET_META_CONTEXT:
			ret = handle_meta(c, opt, c->optbuf, len);
			break;
		default:
			ret = send_opt_reply(c, opt, NBD_REP_ERR_UNSUP, NULL, 0);
			break;
		}
		if (ret < 0)
			return ret;
	}
}

