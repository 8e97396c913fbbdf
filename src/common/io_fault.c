/* SPDX-License-Identifier: MIT */
/* The fault-injecting io backend (see io_fault.h).  Counters are plain
 * integers: the wrapper is used from one thread in tests. */
#include "common/io_fault.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

struct fault_file {
	struct io_file f;
	struct io_file *inner;
	struct io_fault_cfg cfg;
	struct io_fault_stats st;
	unsigned long mutations;     /* writes + flushes seen */
};

static struct fault_file *FF(struct io_file *f) { return (struct fault_file *)f; }

/* Decide the fate of a mutating call: 0 pass, 1 drop, -errno fail. */
static int judge(struct fault_file *ff)
{
	unsigned long n = ++ff->mutations;
	if (ff->cfg.drop_after && n >= ff->cfg.drop_after) {
		ff->st.dropped++;
		return 1;
	}
	if (ff->cfg.fail_after && n >= ff->cfg.fail_after) {
		ff->st.failed++;
		return -(ff->cfg.fail_errno ? ff->cfg.fail_errno : EIO);
	}
	return 0;
}

static int ff_preadv(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct fault_file *ff = FF(f);
	if (ff->cfg.read_fail_after && ++ff->st.reads >= ff->cfg.read_fail_after) {
		ff->st.failed++;
		return -(ff->cfg.fail_errno ? ff->cfg.fail_errno : EIO);
	}
	return io_preadv(ff->inner, iov, cnt, off);
}

static int ff_pwritev(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct fault_file *ff = FF(f);
	int v = judge(ff);
	ff->st.writes++;
	return v ? (v > 0 ? 0 : v) : io_pwritev(ff->inner, iov, cnt, off);
}

static int ff_flush(struct io_file *f)
{
	struct fault_file *ff = FF(f);
	int v = judge(ff);
	ff->st.flushes++;
	return v ? (v > 0 ? 0 : v) : io_flush(ff->inner);
}

static int ff_fallocate(struct io_file *f, int mode, uint64_t off, uint64_t len)
{
	struct fault_file *ff = FF(f);
	int v = judge(ff);
	ff->st.writes++;
	return v ? (v > 0 ? 0 : v) : io_fallocate(ff->inner, mode, off, len);
}

static int ff_truncate(struct io_file *f, uint64_t size)
{
	struct fault_file *ff = FF(f);
	int v = judge(ff);
	ff->st.writes++;
	return v ? (v > 0 ? 0 : v) : io_truncate(ff->inner, size);
}

static int ff_get_size(struct io_file *f, uint64_t *size)
{
	return io_get_size(FF(f)->inner, size);
}

static void ff_close(struct io_file *f)
{
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
		else if (!strcmp(tok, "errno")) cfg->fail_errno = (int)v;
		else return -EINVAL;
	}
	return 0;
}
