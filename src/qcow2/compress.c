/* SPDX-License-Identifier: MIT */
/*
 * qcow2 "Compressed Clusters": compression and decompression of zlib
 * (raw deflate, windowBits -12, as QEMU writes it) and zstd (one frame)
 * clusters.
 *
 * Threads: any.  Each thread keeps its own inflate stream and zstd
 * context, created on first use and reset per call, so decompression
 * allocates nothing after the first call on a thread; they are freed by
 * a thread-exit destructor.
 *
 * Compressed data is known only to 512-byte sector precision, so the
 * input may carry trailing garbage: decoding stops once the output
 * cluster is full, and the stream must be complete (or need no more
 * input) at that point.
 */
#include <stddef.h>

#include "qcow2/format.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "common/util.h"

struct dctx {
	z_stream zs;
	bool zs_ready;
	ZSTD_DCtx *zstd;
	z_stream czs;               /* compression */
	bool czs_ready;
	ZSTD_CCtx *czstd;
};

static __thread struct dctx *tls_ctx;
static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;
static bool key_ok;

static void ctx_destroy(void *p)
{
	struct dctx *c = p;

	if (!c)
		return;
	if (c->zs_ready)
		inflateEnd(&c->zs);
	if (c->czs_ready)
		deflateEnd(&c->czs);
	ZSTD_freeDCtx(c->zstd);
	ZSTD_freeCCtx(c->czstd);
	free(c);
}

static void key_init(void)
{
	key_ok = pthread_key_create(&ctx_key, ctx_destroy) == 0;
}

static struct dctx *get_ctx(void)
{
	if (likely(tls_ctx))
		return tls_ctx;
	pthread_once(&ctx_once, key_init);
	if (!key_ok)
		return NULL;
	struct dctx *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	if (pthread_setspecific(ctx_key, c)) {
		free(c);
		return NULL;
	}
	tls_ctx = c;
	return c;
}

static int zlib_decompress(struct dctx *c, const void *src, size_t src_len, void *dst,
			   size_t dst_len)
{
	z_stream *zs = &c->zs;
	int ret;

	if (src_len > UINT_MAX || dst_len > UINT_MAX)
		return -EIO;
	if (!c->zs_ready) {
		memset(zs, 0, sizeof(*zs));
		if (inflateInit2(zs, -12) != Z_OK)
			return -ENOMEM;
		c->zs_ready = true;
	} else if (inflateReset(zs) != Z_OK) {
		return -EIO;
	}
	zs->next_in = (Bytef *)src;
	zs->avail_in = (uInt)src_len;
	zs->next_out = dst;
	zs->avail_out = (uInt)dst_len;
	ret = inflate(zs, Z_FINISH);
	/* Z_BUF_ERROR with a full output: the stream's end marker lies past
	 * what we had room for (or in the sector padding); the cluster is
	 * complete, which is all that matters. */
	if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && zs->avail_out == 0)
		return 0;
	return -EIO;
}

static int zstd_decompress(struct dctx *c, const void *src, size_t src_len, void *dst,
			   size_t dst_len)
{
	ZSTD_inBuffer in = { src, src_len, 0 };
	ZSTD_outBuffer out = { dst, dst_len, 0 };
	size_t r = 1;

	if (!c->zstd) {
		c->zstd = ZSTD_createDCtx();
		if (!c->zstd)
			return -ENOMEM;
	}
	if (ZSTD_isError(ZSTD_DCtx_reset(c->zstd, ZSTD_reset_session_only)))
		return -EIO;
	/* Decode until the cluster is full and the frame has ended.  A call
	 * that makes no progress means truncated or bad input. */
	while (out.pos < out.size || r != 0) {
		size_t in_pos = in.pos, out_pos = out.pos;
		r = ZSTD_decompressStream(c->zstd, &out, &in);
		if (ZSTD_isError(r))
			return -EIO;
		if (r == 0)
			break;          /* frame complete */
		if (in.pos == in_pos && out.pos == out_pos)
			return -EIO;
	}
	return out.pos == out.size ? 0 : -EIO;
}

int qcow2_decompress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_len)
{
	struct dctx *c = get_ctx();

	if (!c)
		return -ENOMEM;
	switch (type) {
	case QCOW2_COMPRESSION_ZLIB:
		return zlib_decompress(c, src, src_len, dst, dst_len);
	case QCOW2_COMPRESSION_ZSTD:
		return zstd_decompress(c, src, src_len, dst, dst_len);
	default:
		return -EIO;
	}
}

static ssize_t zlib_compress(struct dctx *c, const void *src, size_t src_len, void *dst,
			     size_t dst_cap)
{
	z_stream *zs = &c->czs;
	int ret;

	if (src_len > UINT_MAX || dst_cap > UINT_MAX)
		return -EINVAL;
	if (!c->czs_ready) {
		memset(zs, 0, sizeof(*zs));
		if (deflateInit2(zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
				 Z_DEFAULT_STRATEGY) != Z_OK)
			return -ENOMEM;
		c->czs_ready = true;
	} else if (deflateReset(zs) != Z_OK) {
		return -EIO;
	}
	zs->next_in = (Bytef *)src;
	zs->avail_in = (uInt)src_len;
	zs->next_out = dst;
	zs->avail_out = (uInt)dst_cap;
	ret = deflate(zs, Z_FINISH);
	if (ret != Z_STREAM_END)
		return ret == Z_OK || ret == Z_BUF_ERROR ? -ENOSPC : -EIO;
	return (ssize_t)(dst_cap - zs->avail_out);
}

static ssize_t zstd_compress(struct dctx *c, const void *src, size_t src_len, void *dst,
			     size_t dst_cap)
{
	size_t r;

	if (!c->czstd) {
		c->czstd = ZSTD_createCCtx();
		if (!c->czstd)
			return -ENOMEM;
	}
	r = ZSTD_compressCCtx(c->czstd, dst, dst_cap, src, src_len, ZSTD_CLEVEL_DEFAULT);
	if (ZSTD_isError(r))
		return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? -ENOSPC : -EIO;
	return (ssize_t)r;
}

ssize_t qcow2_compress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_cap)
{
	struct dctx *c = get_ctx();

	if (!c)
		return -ENOMEM;
	switch (type) {
	case QCOW2_COMPRESSION_ZLIB:
		return zlib_compress(c, src, src_len, dst, dst_cap);
	case QCOW2_COMPRESSION_ZSTD:
		return zstd_compress(c, src, src_len, dst, dst_cap);
	default:
		return -EINVAL;
	}
}
