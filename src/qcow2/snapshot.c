/* SPDX-License-Identifier: MIT */
/*
 * qcow2 "Snapshot table": reading and validating the internal snapshot
 * list.  Stateless; called at open by the driver and by the tools.
 *
 * Entry layout: 40 fixed bytes, extra data (extra_data_size), the id
 * string, the name, then padding to 8 bytes.  Extra data holds a 64-bit
 * VM state size (offset 0) and the virtual disk size (offset 8) when long
 * enough, and the instruction count (offset 16) as QEMU 5.0 and later
 * write it.  Every entry is checked to lie inside the table, and every
 * snapshot L1 table to be aligned, of legal size and inside the file
 * (unless the checker asks for QCOW2_SNAP_UNCHECKED_L1: it counts bad L1
 * tables as corruptions, as qemu-img check does, instead of refusing).
 */
#include <stddef.h>

#include "qcow2/format.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/io.h"
#include "common/util.h"

/* QEMU's limits (block/qcow2.h): extra data per entry, table size. */
#define MAX_SNAPSHOT_EXTRA      1024
#define MAX_SNAPSHOT_TABLE      (1024ull * QCOW2_MAX_SNAPSHOTS)

void qcow2_snapshots_free(struct qcow2_snapshot *s, uint32_t n)
{
	if (!s)
		return;
	for (uint32_t i = 0; i < n; i++) {
		free(s[i].id);
		free(s[i].name);
	}
	free(s);
}

static char *dup_str(const uint8_t *p, size_t len)
{
	char *s = malloc(len + 1);

	if (s) {
		memcpy(s, p, len);
		s[len] = '\0';
	}
	return s;
}

/* Make bytes [0, min(@want, @max)) of the table available in *@buf. */
static int ensure(struct io_file *f, uint64_t base, uint64_t max, uint8_t **buf, uint64_t *have,
		  uint64_t want)
{
	want = MIN(want, max);
	if (want <= *have)
		return 0;
	want = MIN(MAX(want, *have * 2), max);
	uint8_t *nb = realloc(*buf, want);
	if (!nb)
		return -ENOMEM;
	*buf = nb;
	int ret = io_pread(f, nb + *have, want - *have, base + *have);
	if (ret)
		return ret;
	*have = want;
	return 0;
}

int qcow2_snapshots_read(struct io_file *f, const struct qcow2_header *h, uint64_t file_size,
			 struct qcow2_snapshot **out, char *err, size_t errlen)
{
	return qcow2_snapshots_read_flags(f, h, file_size, 0, out, NULL, err, errlen);
}

int qcow2_snapshots_read_flags(struct io_file *f, const struct qcow2_header *h,
			       uint64_t file_size, unsigned flags, struct qcow2_snapshot **out,
			       uint64_t *table_bytes, char *err, size_t errlen)
{
	struct qcow2_snapshot *snaps = NULL;
	uint8_t *buf = NULL;
	uint64_t cs = 1ull << h->cluster_bits;
	uint64_t off = 0, table_len, end, have = 0;
	uint32_t n = h->nb_snapshots, done = 0;
	int ret = -EINVAL;

	*out = NULL;
	if (table_bytes)
		*table_bytes = 0;
	if (err && errlen)
		err[0] = '\0';
	if (n == 0)
		return 0;
	if (n > QCOW2_MAX_SNAPSHOTS) {
		snprintf(err, errlen, "too many snapshots (%u)", n);
		return -EINVAL;
	}
	if (!IS_ALIGNED(h->snapshots_offset, cs) || h->snapshots_offset == 0 ||
	    h->snapshots_offset >= file_size) {
		snprintf(err, errlen, "snapshot table offset 0x%llx is invalid",
			 (unsigned long long)h->snapshots_offset);
		return -EINVAL;
	}
	/* The table's length is only known by walking it: it may span up to
	 * QEMU's table size limit, bounded by the file.  Read it in growing
	 * pieces so that a small table costs a small read. */
	table_len = MIN(file_size - h->snapshots_offset, MAX_SNAPSHOT_TABLE);
	snaps = calloc(n, sizeof(*snaps));
	if (!snaps) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	for (done = 0; done < n; done++) {
		struct qcow2_snapshot *s = &snaps[done];
		const uint8_t *e;

		/* Largest possible entry: fixed part, extra, two 16-bit strings. */
		ret = ensure(f, h->snapshots_offset, table_len, &buf, &have,
			     off + QCOW2_SNAP_FIXED_LEN + MAX_SNAPSHOT_EXTRA + 2 * 65535ull);
		if (ret) {
			snprintf(err, errlen, "reading the snapshot table: %s", strerror(-ret));
			goto fail;
		}
		ret = -EINVAL;
		e = buf + off;
		if (table_len - off < QCOW2_SNAP_FIXED_LEN) {
			snprintf(err, errlen, "snapshot %u: entry extends beyond the snapshot table", done);
			goto fail;
		}
		s->l1_offset = get_be64(e + QCOW2_SNAP_L1_OFFSET);
		s->l1_size = get_be32(e + QCOW2_SNAP_L1_SIZE);
		uint16_t id_len = get_be16(e + QCOW2_SNAP_ID_SIZE);
		uint16_t name_len = get_be16(e + QCOW2_SNAP_NAME_SIZE);
		s->date_sec = get_be32(e + QCOW2_SNAP_DATE_SEC);
		s->date_nsec = get_be32(e + QCOW2_SNAP_DATE_NSEC);
		s->vm_clock_nsec = get_be64(e + QCOW2_SNAP_VM_CLOCK_NSEC);
		s->vm_state_size = get_be32(e + QCOW2_SNAP_VM_STATE_SIZE);
		uint32_t extra = get_be32(e + QCOW2_SNAP_EXTRA_SIZE);
		s->disk_size = h->size;
		s->icount = UINT64_MAX;
		s->extra_size = extra;
		s->entry_off = off;

		if (extra > MAX_SNAPSHOT_EXTRA) {
			snprintf(err, errlen, "snapshot %u: too much extra data (%u bytes)", done, extra);
			goto fail;
		}
		uint64_t len = (uint64_t)QCOW2_SNAP_FIXED_LEN + extra + id_len + name_len;
		if (len > table_len - off) {
			snprintf(err, errlen, "snapshot %u: entry extends beyond the snapshot table", done);
			goto fail;
		}
		const uint8_t *x = e + QCOW2_SNAP_FIXED_LEN;
		if (extra >= 8)
			s->vm_state_size = get_be64(x);
		if (extra >= 16)
			s->disk_size = get_be64(x + 8);
		if (extra >= 24)
			s->icount = get_be64(x + 16);
		s->id = dup_str(x + extra, id_len);
		s->name = dup_str(x + extra + id_len, name_len);
		if (!s->id || !s->name) {
			snprintf(err, errlen, "out of memory");
			ret = -ENOMEM;
			goto fail;
		}
		s->entry_len = (uint32_t)len;
		if (flags & QCOW2_SNAP_UNCHECKED_L1) {
			/* The checker judges the L1 table itself. */
		} else if (s->l1_size > QCOW2_MAX_L1_SIZE / 8) {
			snprintf(err, errlen, "snapshot %u: L1 table too large (%u entries)", done,
				 s->l1_size);
			goto fail;
		} else if (!IS_ALIGNED(s->l1_offset, cs) || (s->l1_size && s->l1_offset == 0) ||
			   ckd_add(&end, s->l1_offset, (uint64_t)s->l1_size * 8) || end > file_size) {
			snprintf(err, errlen, "snapshot %u: L1 table offset 0x%llx is invalid", done,
				 (unsigned long long)s->l1_offset);
			goto fail;
		}
		if (table_bytes)
			*table_bytes = off + len;
		off += ALIGN_UP(len, 8);
		if (off > table_len)
			off = table_len;   /* padding of the last entry may pass EOF */
	}
	free(buf);
	*out = snaps;
	return 0;
fail:
	free(buf);
	qcow2_snapshots_free(snaps, snaps ? n : 0);   /* calloc'd: unset names are NULL */
	return ret;
}
