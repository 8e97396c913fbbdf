/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness for the untrusted-input parsers of cluster 0 and the
 * snapshot table: qcow2_meta_read(), qcow2_snapshots_read(), and a
 * qcow2_meta_write() round trip of whatever was accepted (a header we
 * accept must serialise and parse back).  The input is the image file,
 * served from memory.  Built by tests/fuzz/build.sh, not by make.
 */
#include <stddef.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/io.h"
#include "qcow2/format.h"

struct memfile {
	struct io_file f;
	uint8_t *data;
	size_t size;
};

static int mem_preadv(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct memfile *m = (struct memfile *)f;

	for (int i = 0; i < cnt; i++) {
		uint8_t *p = iov[i].iov_base;
		for (size_t k = 0; k < iov[i].iov_len; k++, off++)
			p[k] = off < m->size ? m->data[off] : 0;
	}
	return 0;
}

static int mem_pwritev(struct io_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
	struct memfile *m = (struct memfile *)f;

	for (int i = 0; i < cnt; i++) {
		size_t end = off + iov[i].iov_len;
		if (end > m->size) {
			uint8_t *n = realloc(m->data, end);
			if (!n)
				return -ENOMEM;
			memset(n + m->size, 0, end - m->size);
			m->data = n;
			m->size = end;
		}
		memcpy(m->data + off, iov[i].iov_base, iov[i].iov_len);
		off = end;
	}
	return 0;
}

static const struct io_file_ops mem_ops = { .preadv = mem_preadv, .pwritev = mem_pwritev };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Extensions kept byte for byte (the decoded ones may be merged). */
static unsigned count_opaque(const struct qcow2_meta *m)
{
	unsigned n = 0;

	for (unsigned i = 0; i < m->n_exts; i++)
		n += m->exts[i].type != QCOW2_EXT_BACKING_FORMAT && m->exts[i].type != QCOW2_EXT_DATA_FILE;
	return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct memfile m = { .f = { .ops = &mem_ops, .fd = -1 } };
	struct qcow2_meta meta, again;
	struct qcow2_snapshot *snaps;
	char err[256], names[512];

	m.data = malloc(size ? size : 1);
	if (!m.data)
		return 0;
	memcpy(m.data, data, size);
	m.size = size;
	if (qcow2_meta_read(&m.f, m.size, &meta, err, sizeof(err)) == 0) {
		for (int t = 0; t < 3; t++)
			qcow2_feature_names(&meta, t, ~0ull, names, sizeof(names));
		if (qcow2_snapshots_read(&m.f, &meta.h, m.size, &snaps, err, sizeof(err)) == 0)
			qcow2_snapshots_free(snaps, meta.h.nb_snapshots);
		/* Round trip: what we accepted must be written and read back. */
		if (qcow2_meta_write(&m.f, &meta) == 0) {
			if (qcow2_meta_read(&m.f, m.size, &again, err, sizeof(err)) != 0)
				abort();
			if (count_opaque(&again) != count_opaque(&meta) ||
			    again.h.size != meta.h.size || again.h.l1_offset != meta.h.l1_offset)
				abort();
			qcow2_meta_free(&again);
		}
		qcow2_meta_free(&meta);
	}
	free(m.data);
	return 0;
}
