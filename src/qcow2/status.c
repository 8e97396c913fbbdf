/* SPDX-License-Identifier: MIT */
/*
 * qcow2 block status: what a guest range reads as, answered from the L2
 * tables ("Cluster mapping" in qcow2.rst) without reading guest data.
 *
 *   normal, compressed cluster        data, this layer (depth 1)
 *   zero cluster (with or without a   zeros, this layer
 *   host cluster kept)
 *   unallocated, inside the backing   whatever the backing file says,
 *   file                              one layer deeper
 *   unallocated, past the end of a    zeros, the backing file's layer
 *   short backing file
 *   unallocated, no backing file      zeros, no layer (depth 0)
 *
 * Asked for the host offset (map), it is given for normal clusters (in
 * the external data file if there is one) and for zero clusters that keep
 * a host cluster, as QEMU gives it (and, in the last image of a chain,
 * for unallocated subclusters of a cluster that has one); never for
 * compressed ones.  Then, as
 * QEMU, an image that references clearly more clusters than its file has
 * allocated (metadata preallocation, or sparse big clusters) also has its
 * normal clusters checked against the file's holes: a run over a hole
 * reads as zeros (DATA and ZERO).  The I/O paths do not ask and pay
 * nothing for either.
 *
 * The backing file is asked through the block layer
 * (bdrv_co_block_status), never by reaching into its driver's state.
 *
 * Thread model: coroutine context on any request thread; s->lock is held
 * for the mapping lookup only (qcow2.h), and dropped before the backing
 * file is asked.
 */
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

/* QEMU's qcow2_detect_metadata_preallocation(): do at least
 * max(allocated * 10/9, allocated + 2) clusters of the file (by its size)
 * have a refcount, where "allocated" counts the clusters the file system
 * holds for it?  Lock held.  Returns 1, 0 or -errno. */
static int refs_over_holes(struct qcow2_state *s)
{
	uint64_t real, threshold, end, count = 0;
	struct stat st;

	if (s->file->fd < 0 || fstat(s->file->fd, &st) < 0)
		return 0;
	real = (uint64_t)st.st_blocks * 512 / s->cluster_size;
	threshold = MAX(real * 10 / 9, real + 2);
	end = DIV_ROUND_UP((uint64_t)st.st_size, s->cluster_size);
	for (uint64_t i = 0; i < end && count < threshold; i++) {
		uint64_t rc;
		int ret = qcow2_get_refcount(s, i, &rc);
		if (ret < 0)
			return ret;
		count += rc != 0;
	}
	return count >= threshold;
}

/* The run of normal clusters stored at @host, *pnum bytes: BDRV_BLOCK_ZERO
 * if it starts over a hole of the data's file (*pnum cut to the hole) or
 * past its end, 0 if over data (*pnum cut to it); 0 as well for an image
 * that refs_over_holes() does not pick, as QEMU asks the file only then.
 * Errors only cost the extra information, as in QEMU. */
static int over_hole(struct qcow2_state *s, uint64_t host, uint64_t *pnum)
{
	int fd = s->data->fd;
	off_t data, hole;

	bool prealloc;

	co_mutex_lock(&s->lock);
	if (!s->prealloc_checked) {
		s->prealloc = refs_over_holes(s) == 1;
		s->prealloc_checked = true;
	}
	prealloc = s->prealloc;
	co_mutex_unlock(&s->lock);
	if (!prealloc || fd < 0 || host > (uint64_t)INT64_MAX)
		return 0;
	data = lseek(fd, (off_t)host, SEEK_DATA);
	if (data < 0)
		return errno == ENXIO ? BDRV_BLOCK_ZERO : 0;   /* ENXIO: past the data */
	if ((uint64_t)data > host) {
		*pnum = MIN(*pnum, (uint64_t)data - host);
		return BDRV_BLOCK_ZERO;
	}
	hole = lseek(fd, (off_t)host, SEEK_HOLE);
	if (hole > (off_t)host)
		*pnum = MIN(*pnum, (uint64_t)hole - host);
	return 0;
}

int qcow2_co_block_status(struct bdrv *bs, uint64_t off, uint64_t len,
			  uint64_t *pnum, unsigned *depth, uint64_t *host)
{
	struct qcow2_state *s = bs->opaque;
	struct bdrv *backing = s->backing;
	struct qcow2_map m;
	unsigned d;
	int ret;

	co_mutex_lock(&s->lock);
	ret = qcow2_get_mapping(s, off, len, &m);
	co_mutex_unlock(&s->lock);
	if (ret < 0)
		return ret;
	*pnum = m.bytes;
	switch (m.type) {
	case QCOW2_NORMAL:
		*depth = 1;
		if (!host)
			return BDRV_BLOCK_DATA;
		*host = m.host;         /* NORMAL runs are host-contiguous */
		return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID | over_hole(s, m.host, pnum);
	case QCOW2_COMPRESSED:
		*depth = 1;
		return BDRV_BLOCK_DATA;
	case QCOW2_ZERO_ALLOC:
		*depth = 1;
		if (!host)
			return BDRV_BLOCK_ZERO;
		/* The host cluster kept, as QEMU reports it.  Runs of these are
		 * not checked for contiguity (qcow2_get_mapping): one cluster. */
		*host = (m.l2e & QCOW2_L2E_OFFSET_MASK) + qcow2_offset_in_cluster(s, off);
		*pnum = MIN(m.bytes, s->cluster_size - qcow2_offset_in_cluster(s, off));
		return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID;
	case QCOW2_ZERO_PLAIN:
		*depth = 1;
		return BDRV_BLOCK_ZERO;
	case QCOW2_UNALLOCATED:
		break;
	}
	if (!backing) {
		*depth = 0;
		/* Unallocated subclusters of a cluster that has a host cluster
		 * (extended L2, e.g. preallocated): QEMU gives that offset. */
		if (host && s->ext_l2 && ((m.l2e & QCOW2_L2E_OFFSET_MASK) ||
					  (s->data_file && (m.l2e & QCOW2_OFLAG_COPIED)))) {
			*host = (m.l2e & QCOW2_L2E_OFFSET_MASK) + qcow2_offset_in_cluster(s, off);
			*pnum = MIN(m.bytes, s->cluster_size - qcow2_offset_in_cluster(s, off));
			return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID;
		}
		return BDRV_BLOCK_ZERO;
	}
	if (off >= backing->size) {
		/* Zeros past the end of a short backing file count as that
		 * layer's (QEMU's qemu:allocation-depth says so too). */
		*depth = 2;
		return BDRV_BLOCK_ZERO;
	}
	ret = bdrv_co_block_status_host(backing, off, MIN(m.bytes, backing->size - off), pnum,
					&d, host);
	if (ret < 0)
		return ret;
	*depth = d ? d + 1 : 0;
	return ret;
}
