/* SPDX-License-Identifier: MIT */
/*
 * qcow2 "Bitmaps" extension and "Bitmap directory": reading and
 * validating the persistent dirty bitmaps' directory, and writing an
 * entry's flags back.  Stateless; used by the driver (bitmap.c), the
 * checker and `qublk info`.
 *
 * Extension data: nb_bitmaps (u32), reserved (u32, 0), directory size
 * (u64), directory offset (u64).  Directory entry: bitmap table offset
 * (u64), table size in entries (u32), flags (u32), type (u8), granularity
 * bits (u8), name size (u16), extra data size (u32), extra data, name,
 * padding to 8 bytes.  Every field is checked: offsets cluster aligned
 * and inside the file, sizes within QEMU's limits, names non-empty.
 */
#include <stddef.h>

#include "qcow2/format.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/io.h"
#include "common/util.h"

/* QEMU's limits (block/qcow2-bitmap.c). */
#define MAX_BITMAPS             65535
#define MAX_DIR_SIZE            (1024ull * MAX_BITMAPS)
#define MAX_NAME                1023
#define MAX_TABLE_BYTES         (64ull << 20)
#define ENTRY_FIXED             24

int qcow2_bitmap_ext(const struct qcow2_meta *m, uint32_t *nb, uint64_t *dir_off,
		     uint64_t *dir_size)
{
	for (unsigned i = 0; i < m->n_exts; i++) {
		const struct qcow2_ext *e = &m->exts[i];
		if (e->type != QCOW2_EXT_BITMAPS)
			continue;
		if (e->len < 24)
			return -EINVAL;
		*nb = get_be32(e->data);
		*dir_size = get_be64(e->data + 8);
		*dir_off = get_be64(e->data + 16);
		return 1;
	}
	return 0;
}

void qcow2_bitmaps_free(struct qcow2_bitmap *b, uint32_t n)
{
	if (!b)
		return;
	for (uint32_t i = 0; i < n; i++)
		free(b[i].name);
	free(b);
}

int qcow2_bitmaps_read(struct io_file *f, const struct qcow2_meta *m, uint64_t file_size,
		       struct qcow2_bitmap **out, uint32_t *nout, char *err, size_t errlen)
{
	uint64_t cs = 1ull << m->h.cluster_bits, dir_off, dir_size, pos = 0, end;
	struct qcow2_bitmap *bms = NULL;
	uint8_t *dir = NULL;
	uint32_t nb = 0;
	int ret;

	*out = NULL;
	*nout = 0;
	ret = qcow2_bitmap_ext(m, &nb, &dir_off, &dir_size);
	if (ret <= 0) {
		if (ret < 0)
			snprintf(err, errlen, "bitmaps extension too short");
		return ret;
	}
	if (!nb)
		return 0;
	if (nb > MAX_BITMAPS || dir_size > MAX_DIR_SIZE || dir_size < (uint64_t)nb * ENTRY_FIXED ||
	    !IS_ALIGNED(dir_off, cs) || !dir_off || ckd_add(&end, dir_off, dir_size) ||
	    end > file_size) {
		snprintf(err, errlen, "bitmap directory (%u bitmaps, %llu bytes at 0x%llx) is invalid",
			 nb, (unsigned long long)dir_size, (unsigned long long)dir_off);
		return -EINVAL;
	}
	dir = malloc(dir_size);
	bms = calloc(nb, sizeof(*bms));
	if (!dir || !bms) {
		ret = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	ret = io_pread(f, dir, dir_size, dir_off);
	if (ret < 0) {
		snprintf(err, errlen, "reading the bitmap directory: %s", strerror(-ret));
		goto fail;
	}
	ret = -EINVAL;
	for (uint32_t i = 0; i < nb; i++) {
		struct qcow2_bitmap *b = &bms[i];
		const uint8_t *e = dir + pos;
		uint64_t len, tend;

		if (dir_size - pos < ENTRY_FIXED) {
			snprintf(err, errlen, "bitmap %u: entry past the directory's end", i);
			goto fail;
		}
		b->table_offset = get_be64(e);
		b->table_size = get_be32(e + 8);
		b->flags = get_be32(e + 12);
		b->type = e[16];
		b->granularity_bits = e[17];
		uint16_t name_size = get_be16(e + 18);
		uint32_t extra = get_be32(e + 20);
		len = ENTRY_FIXED + (uint64_t)extra + name_size;
		if (len > dir_size - pos || !name_size || name_size > MAX_NAME) {
			snprintf(err, errlen, "bitmap %u: bad entry size", i);
			goto fail;
		}
		if (!IS_ALIGNED(b->table_offset, cs) || !b->table_offset ||
		    (uint64_t)b->table_size * 8 > MAX_TABLE_BYTES ||
		    ckd_add(&tend, b->table_offset, (uint64_t)b->table_size * 8) ||
		    tend > file_size || b->granularity_bits > 63) {
			snprintf(err, errlen, "bitmap %u: bad table or granularity", i);
			goto fail;
		}
		b->name = malloc(name_size + 1u);
		if (!b->name) {
			snprintf(err, errlen, "out of memory");
			ret = -ENOMEM;
			goto fail;
		}
		memcpy(b->name, e + ENTRY_FIXED + extra, name_size);
		b->name[name_size] = '\0';
		b->extra_size = extra;
		b->entry_off = dir_off + pos;
		pos += ALIGN_UP(len, 8);
		if (pos > dir_size && i + 1 < nb) {
			snprintf(err, errlen, "bitmap %u: entry past the directory's end", i);
			goto fail;
		}
	}
	free(dir);
	*out = bms;
	*nout = nb;
	return 0;
fail:
	free(dir);
	qcow2_bitmaps_free(bms, nb);
	return ret;
}
