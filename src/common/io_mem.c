/* SPDX-License-Identifier: MIT */
/* The in-memory io backend (see io_mem.h). */
#include "common/io_mem.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

static struct io_mem *M(struct io_file *f) { return (struct io_mem *)f; }

static int mem_preadv(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct io_mem *m = M(f);
	size_t done = 0, len = iov_size(iov, cnt);

	if (off < m->size) {
		done = MIN(len, m->size - off);
		int ret = iov_from_buf(iov, cnt, 0, m->data + off, done);
		if (ret < 0)
			return ret;
	}
	return iov_memset(iov, cnt, done, 0, len - done);
}

static int mem_pwritev(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct io_mem *m = M(f);
	size_t len = iov_size(iov, cnt);
	uint64_t end;

	if (ckd_add(&end, off, len) || end > SIZE_MAX / 2)
		return -EFBIG;
	if (end > m->size) {
		uint8_t *n = realloc(m->data, end);
		if (!n)
			return -ENOMEM;
		memset(n + m->size, 0, end - m->size);
		m->data = n;
		m->size = end;
	}
	return iov_to_buf(iov, cnt, 0, m->data + off, len);
}

static int mem_flush(struct io_file *f) { (void)f; return 0; }

static int mem_fallocate(struct io_file *f, int mode, uint64_t off, uint64_t len)
{
	(void)f; (void)mode; (void)off; (void)len;
	return -EOPNOTSUPP;
}

static int mem_truncate(struct io_file *f, uint64_t size)
{
	struct io_mem *m = M(f);
	uint8_t *n = realloc(m->data, size ? size : 1);

	if (!n)
		return -ENOMEM;
	if (size > m->size)
		memset(n + m->size, 0, size - m->size);
	m->data = n;
	m->size = size;
	return 0;
}

static int mem_get_size(struct io_file *f, uint64_t *size)
{
	*size = M(f)->size;
	return 0;
}

static void mem_close(struct io_file *f)
{
	io_mem_deinit(M(f));
}

static const struct io_file_ops mem_ops = {
	.preadv = mem_preadv,
	.pwritev = mem_pwritev,
	.flush = mem_flush,
	.fallocate = mem_fallocate,
	.truncate = mem_truncate,
	.get_size = mem_get_size,
	.close = mem_close,
};

int io_mem_init(struct io_mem *m, size_t size)
{
	memset(m, 0, sizeof(*m));
	m->f.ops = &mem_ops;
	m->f.fd = -1;
	m->f.align = 1;
	m->data = calloc(1, size ? size : 1);
	m->size = size;
	return m->data ? 0 : -ENOMEM;
}

int io_mem_init_copy(struct io_mem *m, const void *data, size_t size)
{
	int ret = io_mem_init(m, size);
	if (!ret && size)
		memcpy(m->data, data, size);
	return ret;
}

void io_mem_deinit(struct io_mem *m)
{
	free(m->data);
	m->data = NULL;
	m->size = 0;
}
