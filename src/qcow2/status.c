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
 * The backing file is asked through the block layer
 * (bdrv_co_block_status), never by reaching into its driver's state.
 *
 * Thread model: coroutine context on any request thread; s->lock is held
 * for the mapping lookup only (qcow2.h), and dropped before the backing
 * file is asked.
 */
#include <errno.h>

#include "common/util.h"
#include "qcow2/qcow2.h"

int qcow2_co_block_status(struct bdrv *bs, uint64_t off, uint64_t len,
			  uint64_t *pnum, unsigned *depth)
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
	case QCOW2_COMPRESSED:
		*depth = 1;
		return BDRV_BLOCK_DATA;
	case QCOW2_ZERO_PLAIN:
	case QCOW2_ZERO_ALLOC:
		*depth = 1;
		return BDRV_BLOCK_ZERO;
	case QCOW2_UNALLOCATED:
		break;
	}
	if (!backing) {
		*depth = 0;
		return BDRV_BLOCK_ZERO;
	}
	if (off >= backing->size) {
		/* Zeros past the end of a short backing file count as that
		 * layer's (QEMU's qemu:allocation-depth says so too). */
		*depth = 2;
		return BDRV_BLOCK_ZERO;
	}
	ret = bdrv_co_block_status(backing, off, MIN(m.bytes, backing->size - off), pnum, &d);
	if (ret < 0)
		return ret;
	*depth = d ? d + 1 : 0;
	return ret;
}
