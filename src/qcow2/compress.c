/* SPDX-License-Identifier: MIT */
/*
 * qcow2 "Compressed Clusters": decompression of zlib (raw deflate,
 * windowBits -12, as QEMU writes it) and zstd (one frame) clusters.
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

#include "common/util.h"

struct dctx {
	z_stream zs;
	bool zs_ready;
	ZSTD_DCtx *zstd;
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
	ZSTD_freeDCtx(c->zstd);
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
