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
#include "common/io_mem.h"
#include "qcow2/format.h"

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
	struct io_mem m;
	struct qcow2_meta meta, again;
	struct qcow2_snapshot *snaps;
	char err[256], names[512];

	if (io_mem_init_copy(&m, data, size))
		return 0;
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
	io_mem_deinit(&m);
	return 0;
}
