/* SPDX-License-Identifier: MIT */
/* The fault-injecting io backend (see io_fault.h).  Counters and the log
 * are plain data: the wrapper is used from one thread in tests (its
 * coroutines may interleave: calls wait on the inner file). */
#include "common/io_fault.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

struct pending_write {
	uint64_t off;
	size_t len;
	struct pending_write *next;
	unsigned char data[];
};

struct fault_file {
	struct io_file f;
	struct pending_write *head, *tail;   /* reorder: not yet flushed */
	bool crashed;
	struct io_file *inner;
	struct io_fault_cfg cfg;
	struct io_fault_stats st;
	unsigned long mutations;     /* writes + flushes seen */
};

static struct fault_file *FF(struct io_file *f) { return (struct fault_file *)f; }

static uint64_t next_rand(struct fault_file *ff)
{
	uint64_t x = ff->cfg.seed ? ff->cfg.seed : 0x2545f4914f6cdd1dull;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	ff->cfg.seed = x;
	return x;
}

/* Write pending writes to the file; with @subset, each with p = 1/2. */
static int apply_pending(struct fault_file *ff, bool subset)
{
	int ret = 0;
	while (ff->head) {
		struct pending_write *w = ff->head;
		ff->head = w->next;
		if (!ret && (!subset || (next_rand(ff) & 1)))
			ret = io_pwrite(ff->inner, w->data, w->len, w->off);
		free(w);
	}
	ff->tail = NULL;
	return ret;
}

static int injected_err(struct fault_file *ff)
{
	return -(ff->cfg.fail_errno ? ff->cfg.fail_errno : EIO);
}

/* Decide the fate of a mutating call: 0 pass, 1 drop, -errno fail. */
static int judge(struct fault_file *ff)
{
	unsigned long n = ++ff->mutations;
	if (ff->cfg.drop_after && n >= ff->cfg.drop_after) {
		if (!ff->crashed) {
			ff->crashed = true;
			apply_pending(ff, true);
		}
		ff->st.dropped++;
		return 1;
	}
	if (ff->cfg.fail_after && n >= ff->cfg.fail_after) {
		ff->st.failed++;
		return injected_err(ff);
	}
	return 0;
}

static int ff_preadv(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct fault_file *ff = FF(f);
	if (ff->cfg.read_fail_after && ++ff->st.reads >= ff->cfg.read_fail_after) {
		ff->st.failed++;
		return injected_err(ff);
	}
	int ret = io_preadv(ff->inner, iov, cnt, off);
	if (ret < 0)
		return ret;
	/* Overlay writes not yet flushed, oldest first. */
	size_t len = iov_size(iov, cnt);
	for (struct pending_write *w = ff->head; w; w = w->next) {
		uint64_t s = MAX(off, w->off), e = MIN(off + len, w->off + w->len);
		if (s < e && (ret = iov_from_buf(iov, cnt, s - off, w->data + (s - w->off), e - s)))
			return ret;
	}
	return 0;
}

/* Log the start of a call; returns its record's index, or SIZE_MAX when
 * not recording (or out of memory: log->error says so). */
static size_t rec_begin(struct fault_file *ff, enum io_fault_kind kind, int mode, uint64_t off,
			uint64_t len, const struct iovec *iov, int cnt)
{
	struct io_fault_log *log = ff->cfg.log;
	struct io_fault_rec *r;

	if (!log || log->error)
		return SIZE_MAX;
	if (log->n == log->cap) {
		size_t cap = log->cap ? 2 * log->cap : 256;
		struct io_fault_rec *nr = realloc(log->recs, cap * sizeof(*nr));
		if (!nr) {
			log->error = -ENOMEM;
			return SIZE_MAX;
		}
		log->recs = nr;
		log->cap = cap;
	}
	r = &log->recs[log->n];
	*r = (struct io_fault_rec){ .kind = kind, .mode = mode, .off = off, .len = len,
				    .start = log->clock++, .done = IO_FAULT_NOT_DONE };
	if (iov) {
		r->data = malloc(len ? len : 1);
		if (!r->data) {
			log->error = -ENOMEM;
			return SIZE_MAX;
		}
		if ((log->error = iov_to_buf(iov, cnt, 0, r->data, len)))
			return SIZE_MAX;
	}
	return log->n++;
}

/* Stamp the completion of record @i (the array may have moved since
 * rec_begin: other coroutines log while this call waits). */
static void rec_end(struct fault_file *ff, size_t i, int result)
{
	struct io_fault_log *log = ff->cfg.log;

	if (i == SIZE_MAX || log->error)
		return;
	log->recs[i].result = result;
	log->recs[i].done = log->clock++;
}

static int do_pwritev(struct fault_file *ff, const struct iovec *iov, int cnt, uint64_t off)
{
	int v = judge(ff);
	ff->st.writes++;
	if (v)
		return v > 0 ? 0 : v;
	if (!ff->cfg.reorder)
		return io_pwritev(ff->inner, iov, cnt, off);
	size_t len = iov_size(iov, cnt);
	struct pending_write *w = malloc(sizeof(*w) + len);
	if (!w)
		return -ENOMEM;
	w->off = off;
	w->len = len;
	w->next = NULL;
	int ret = iov_to_buf(iov, cnt, 0, w->data, len);
	if (ret < 0) {
		free(w);
		return ret;
	}
	if (ff->tail)
		ff->tail->next = w;
	else
		ff->head = w;
	ff->tail = w;
	return 0;
}

static int ff_pwritev(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct fault_file *ff = FF(f);
	size_t r = rec_begin(ff, IO_FAULT_WRITE, 0, off, iov_size(iov, cnt), iov, cnt);
	int ret = do_pwritev(ff, iov, cnt, off);

	rec_end(ff, r, ret);
	return ret;
}

/* A flush, fallocate or truncate: judged like a write, and a barrier for
 * the writes held back in reorder mode.  Returns 1 to go ahead with the
 * call, else its result (0 when dropped, -errno when failed). */
static int barrier(struct fault_file *ff, unsigned long *counter)
{
	int v = judge(ff), ret;

	(*counter)++;
	if (v)
		return v > 0 ? 0 : v;
	ret = apply_pending(ff, false);
	return ret ? ret : 1;
}

static int ff_flush(struct io_file *f)
{
	struct fault_file *ff = FF(f);
	size_t r = rec_begin(ff, IO_FAULT_FLUSH, 0, 0, 0, NULL, 0);
	int ret;

	if (ff->cfg.fail_flush && ff->st.flushes + 1 == ff->cfg.fail_flush) {
		ff->st.flushes++;
		ff->st.failed++;
		ret = injected_err(ff);
	} else {
		ret = barrier(ff, &ff->st.flushes);
		if (ret == 1)
			ret = io_flush(ff->inner);
	}
	rec_end(ff, r, ret);
	return ret;
}

static int ff_fallocate(struct io_file *f, int mode, uint64_t off, uint64_t len)
{
	struct fault_file *ff = FF(f);
	size_t r = rec_begin(ff, IO_FAULT_FALLOCATE, mode, off, len, NULL, 0);
	int ret = barrier(ff, &ff->st.writes);

	if (ret == 1)
		ret = io_fallocate(ff->inner, mode, off, len);
	rec_end(ff, r, ret);
	return ret;
}

static int ff_truncate(struct io_file *f, uint64_t size)
{
	struct fault_file *ff = FF(f);
	size_t r = rec_begin(ff, IO_FAULT_TRUNCATE, 0, size, 0, NULL, 0);
	int ret = barrier(ff, &ff->st.writes);

	if (ret == 1)
		ret = io_truncate(ff->inner, size);
	rec_end(ff, r, ret);
	return ret;
}

static int ff_get_size(struct io_file *f, uint64_t *size)
{
	return io_get_size(FF(f)->inner, size);
}

static void ff_close(struct io_file *f)
{
	/* Closing without a crash: what a clean shutdown would leave. */
	if (!FF(f)->crashed)
		apply_pending(FF(f), false);
	else
		apply_pending(FF(f), true);
	io_file_close(FF(f)->inner);
	free(f);
}

static const struct io_file_ops fault_ops = {
	.preadv = ff_preadv,
	.pwritev = ff_pwritev,
	.flush = ff_flush,
	.fallocate = ff_fallocate,
	.truncate = ff_truncate,
	.get_size = ff_get_size,
	.close = ff_close,
};

int io_fault_wrap(struct io_file *inner, const struct io_fault_cfg *cfg, struct io_file **out)
{
	struct fault_file *ff = calloc(1, sizeof(*ff));
	if (!ff)
		return -ENOMEM;
	ff->f = *inner;          /* fd, alignment, flags, path for callers */
	ff->f.ops = &fault_ops;
	ff->f.priv = NULL;
	ff->inner = inner;
	ff->cfg = *cfg;
	*out = &ff->f;
	return 0;
}

void io_fault_get_stats(struct io_file *f, struct io_fault_stats *st)
{
	*st = FF(f)->st;
}

bool io_fault_crashed(struct io_file *f)
{
	return FF(f)->crashed;
}

int io_fault_parse(const char *spec, struct io_fault_cfg *cfg)
{
	char buf[256], *save = NULL;
	memset(cfg, 0, sizeof(*cfg));
	if (strlen(spec) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, spec);
	for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		char *end;
		if (!eq)
			return -EINVAL;
		*eq = 0;
		unsigned long v = strtoul(eq + 1, &end, 10);
		if (*end || end == eq + 1)
			return -EINVAL;
		if (!strcmp(tok, "fail_after")) cfg->fail_after = v;
		else if (!strcmp(tok, "drop_after")) cfg->drop_after = v;
		else if (!strcmp(tok, "read_fail_after")) cfg->read_fail_after = v;
		else if (!strcmp(tok, "fail_flush")) cfg->fail_flush = v;
		else if (!strcmp(tok, "errno")) cfg->fail_errno = (int)v;
		else if (!strcmp(tok, "reorder")) cfg->reorder = v != 0;
		else if (!strcmp(tok, "seed")) cfg->seed = v;
		else return -EINVAL;
	}
	return 0;
}

void io_fault_log_free(struct io_fault_log *log)
{
	for (size_t i = 0; i < log->n; i++)
		free(log->recs[i].data);
	free(log->recs);
	*log = (struct io_fault_log){ 0 };
}
