/* SPDX-License-Identifier: MIT */
/*
 * ublk targets, one const ops table each:
 *   qcow2, raw  the block engine (src/block/bdrv.h) with that format
 *   null        no storage: reads leave the buffer as it is, writes are
 *               dropped; the framework's ceiling for benchmarks
 *
 * Thread model: open/close on the daemon's main thread; the I/O ops in
 * tag coroutines on queue threads.  The engine's entry points check the
 * request contract again (cheaply); the queue has already checked it.
 */
#include "ublk/ublk.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/util.h"

/* ------------------------------------------------------------- engine */

static int engine_open(struct ublk_tgt *t, const struct ublk_tgt_opts *o, const char *fmt)
{
	struct bdrv_opts bo = { .format = fmt };
	struct bdrv *bs;
	int ret;

	if (!o->file) {
		log_error("target %s needs an image file", fmt);
		if (o->adopt)
			close(o->adopt_fd);
		return -EINVAL;
	}
	if (o->read_only)
		bo.flags |= BDRV_O_RDONLY;
	if (o->force_share)
		bo.flags |= BDRV_O_FORCE_SHARE;
	if (o->direct)
		bo.flags |= BDRV_O_DIRECT;
	if (o->crash_safe)
		bo.flags |= BDRV_O_CRASH_SAFE;
	if (o->no_unmap)
		bo.flags |= BDRV_O_NO_UNMAP;
	bo.adopt = o->adopt;
	bo.adopt_fd = o->adopt_fd;
	ret = bdrv_open(o->file, &bo, &bs);
	if (ret < 0)
		return ret;   /* logged by bdrv_open, naming the file */
	if (bs->size < 512) {
		log_error("%s: image is smaller than one 512-byte sector", o->file);
		bdrv_close(bs);
		return -EINVAL;
	}
	if (bs->size & 511)
		log_warn("%s: size %llu is not a multiple of 512; the last %u bytes are not exposed",
			 o->file, (unsigned long long)bs->size, (unsigned)(bs->size & 511));
	t->priv = bs;
	t->size = ALIGN_DOWN(bs->size, (uint64_t)512);
	t->cluster_size = bs->cluster_size;
	t->read_only = bs->read_only;
	/* The engine's metadata lock is a cross-thread co_mutex (test_mt). */
	t->can_multiqueue = true;
	t->inline_max = (uint32_t)io_inline_max(bs->file);
	return 0;
}

static int qcow2_open(struct ublk_tgt *t, const struct ublk_tgt_opts *o)
{
	return engine_open(t, o, "qcow2");
}

static int raw_open(struct ublk_tgt *t, const struct ublk_tgt_opts *o)
{
	return engine_open(t, o, "raw");
}

static void engine_close(struct ublk_tgt *t)
{
	if (t->priv)
		bdrv_close(t->priv);   /* writes everything back */
	t->priv = NULL;
}

static int engine_release(struct ublk_tgt *t, int *fd)
{
	int ret = bdrv_close_keep_fd(t->priv, fd);

	t->priv = NULL;
	return ret;
}

static int engine_read(struct ublk_tgt *t, void *buf, uint64_t off, uint32_t len)
{
	return bdrv_co_pread(t->priv, off, len, buf);
}

static int engine_write(struct ublk_tgt *t, const void *buf, uint64_t off, uint32_t len,
			unsigned flags)
{
	return bdrv_co_pwrite(t->priv, off, len, buf, flags);
}

static int engine_flush(struct ublk_tgt *t)
{
	return bdrv_co_flush(t->priv);
}

static int engine_discard(struct ublk_tgt *t, uint64_t off, uint32_t len)
{
	return bdrv_co_discard(t->priv, off, len);
}

static int engine_write_zeroes(struct ublk_tgt *t, uint64_t off, uint32_t len, unsigned flags)
{
	return bdrv_co_pwrite_zeroes(t->priv, off, len, flags);
}

static int engine_resize(struct ublk_tgt *t, uint64_t size)
{
	return bdrv_truncate(t->priv, size, 0);
}

static int engine_snapshot(struct ublk_tgt *t, enum bdrv_snapshot_op op, const char *name,
			   char *err, size_t errlen)
{
	return bdrv_snapshot(t->priv, op, name, err, errlen);
}

static int engine_snapshot_list(struct ublk_tgt *t, struct qcow2_snapshot **out, uint32_t *n,
				char *err, size_t errlen)
{
	return bdrv_snapshot_list(t->priv, out, n, err, errlen);
}

static const struct ublk_tgt_ops tgt_qcow2 = {
	.name = "qcow2",
	.open = qcow2_open,
	.close = engine_close,
	.release = engine_release,
	.read = engine_read,
	.write = engine_write,
	.flush = engine_flush,
	.discard = engine_discard,
	.write_zeroes = engine_write_zeroes,
	.resize = engine_resize,
	.snapshot = engine_snapshot,
	.snapshot_list = engine_snapshot_list,
};

static const struct ublk_tgt_ops tgt_raw = {
	.name = "raw",
	.open = raw_open,
	.close = engine_close,
	.release = engine_release,
	.read = engine_read,
	.write = engine_write,
	.flush = engine_flush,
	.discard = engine_discard,
	.write_zeroes = engine_write_zeroes,
	.resize = engine_resize,
};

/* --------------------------------------------------------------- null */

static int null_open(struct ublk_tgt *t, const struct ublk_tgt_opts *o)
{
	if (o->size < 512) {
		log_error("null target: --size must be at least 512 bytes");
		return -EINVAL;
	}
	t->size = ALIGN_DOWN(o->size, (uint64_t)512);
	t->cluster_size = 0;
	t->read_only = o->read_only;
	t->can_multiqueue = true;
	return 0;
}

static void null_close(struct ublk_tgt *t) { (void)t; }
static int null_release(struct ublk_tgt *t, int *fd) { *fd = -1; return 0; }
static int null_read(struct ublk_tgt *t, void *buf, uint64_t off, uint32_t len) { return 0; }
static int null_write(struct ublk_tgt *t, const void *buf, uint64_t off, uint32_t len,
		      unsigned flags) { return 0; }
static int null_flush(struct ublk_tgt *t) { return 0; }
static int null_discard(struct ublk_tgt *t, uint64_t off, uint32_t len) { return 0; }
static int null_write_zeroes(struct ublk_tgt *t, uint64_t off, uint32_t len, unsigned flags)
{ return 0; }
static int null_resize(struct ublk_tgt *t, uint64_t size) { return 0; }

static const struct ublk_tgt_ops tgt_null = {
	.name = "null",
	.open = null_open,
	.close = null_close,
	.release = null_release,
	.read = null_read,
	.write = null_write,
	.flush = null_flush,
	.discard = null_discard,
	.write_zeroes = null_write_zeroes,
	.resize = null_resize,
};

static const struct ublk_tgt_ops *const targets[] = { &tgt_qcow2, &tgt_raw, &tgt_null };

const struct ublk_tgt_ops *ublk_tgt_find(const char *name)
{
	for (size_t i = 0; i < ARRAY_SIZE(targets); i++)
		if (!strcmp(targets[i]->name, name))
			return targets[i];
	return NULL;
}
