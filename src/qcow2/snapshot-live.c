/* SPDX-License-Identifier: MIT */
/*
 * Internal snapshots of the open image (the co_snapshot and
 * co_snapshot_list ops): `qublk snapshot -n ID -c|-d|-l` on a live ublk
 * device reaches them through its daemon (bdrv_snapshot).  The work on
 * the file is snapshot-write.c's, the code the offline tool runs; this
 * file brings the driver to a point where the file alone describes the
 * image, lets snapshot-write.c change it, then makes the driver's state
 * follow the file again:
 *
 *  1. The block layer has drained the image: no request is inside the
 *     driver and none enters (requests from every queue thread wait in
 *     the block layer, and go on afterwards).  So no guest data I/O is
 *     in flight (a write that decided to overwrite a cluster of its own
 *     cannot land in one the snapshot shares), no cluster has an owner,
 *     no run is reserved, no cache slice is pinned.
 *  2. With the lock: flush twice (the first applies the deferred frees,
 *     the second writes them) and, with lazy refcounts, mark the image
 *     clean.  The refcounts on disk are then exact, every cached slice
 *     is clean and nothing is pending: the state a clean close leaves.
 *  3. snapshot-write.c (QCOW2_SNAPSHOT_LIVE) changes the file in its own
 *     crash-safe order, the offline one: a crash before its header
 *     switch leaves leaks, after it the whole change.
 *  4. Whether it succeeded or not, reload what it may have changed: the
 *     header's snapshot and refcount table fields, the active L1 (whose
 *     entries lose or regain OFLAG_COPIED), every cached L2 and refcount
 *     slice (dropped: read again on use), the refcount table, the
 *     allocation hints, and the range authority's metadata map (rebuilt
 *     from the file: the snapshot's L1 table and the L2 tables it shares
 *     become inactive L1/L2 too, the new snapshot table replaces the old
 *     one).  With OFLAG_COPIED clear on every cluster a new snapshot
 *     shares, the next write to one copies it (rw.c, and cluster.c for
 *     the L2 tables), as for any image with snapshots.
 *  If the reload fails, memory no longer describes the file: writes are
 *  refused from then on (s->corrupt, in memory only: the file is sound)
 *  until the image is opened again.
 *
 * A crash (kill -9, power cut) therefore finds either the state of step
 * 2, a clean image, or one that snapshot-write.c's ordering allows.
 *
 * Thread model: a coroutine of whichever thread calls bdrv_snapshot (the
 * ublk daemon's main thread), s->lock held throughout, so nothing else
 * touches metadata even outside the drained section's requests.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/io.h"
#include "common/util.h"
#include "qcow2/qcow2.h"

/* Step 4 (see the top).  Returns -errno (logged). */
static int reload(struct qcow2_state *s)
{
	const char *fn = s->bs->filename;
	struct qcow2_meta m = { 0 };
	uint64_t size, *l1 = NULL, *rt = NULL;
	uint32_t rt_size = 0;
	char why[256] = "";
	int ret;

	/* Every slice is clean (step 2): nothing is lost. */
	qcow2_cache_invalidate(&s->l2c, 0, UINT64_MAX);
	qcow2_cache_invalidate(&s->rbc, 0, UINT64_MAX);
	ret = io_get_size(s->file, &size);
	if (ret == 0)
		ret = qcow2_meta_read(s->file, size, &m, why, sizeof(why));
	if (ret < 0) {
		log_error("%s: reading the header back: %s", fn, why[0] ? why : strerror(-ret));
		return ret;
	}
	/* Snapshots change the snapshot table and may move the refcount
	 * table; nothing else of the header. */
	if (m.h.l1_offset != s->l1_offset || m.h.l1_size != s->l1_size ||
	    m.h.size != s->meta.h.size || m.h.incompat != s->meta.h.incompat ||
	    m.h.autoclear != s->meta.h.autoclear) {
		log_error("%s: the header changed in unexpected places", fn);
		qcow2_meta_free(&m);
		return -EIO;
	}
	s->meta.h.nb_snapshots = m.h.nb_snapshots;
	s->meta.h.snapshots_offset = m.h.snapshots_offset;
	s->meta.h.reftable_offset = s->reftable_offset = m.h.reftable_offset;
	s->meta.h.reftable_clusters = s->reftable_clusters = m.h.reftable_clusters;
	qcow2_meta_free(&m);
	s->file_end = MAX(s->file_end, size);
	s->file_size = MAX(s->file_size, size);

	ret = qcow2_read_l1(s, &l1);
	if (ret == 0)
		ret = qcow2_read_reftable(s, &rt, &rt_size);
	if (ret < 0) {
		free(l1);
		return ret;
	}
	free(s->l1);
	s->l1 = l1;
	free(s->reftable);
	s->reftable = rt;
	s->reftable_size = rt_size;
	s->free_hint = 0;
	s->cbytes_next = 0;     /* its cluster may be shared now */
	qcow2_ranges_close(s);
	ret = qcow2_ranges_open(s);
	if (ret < 0)
		log_error("%s: rebuilding the metadata map: %s", fn, strerror(-ret));
	return ret;
}

int qcow2_co_snapshot(struct bdrv *bs, enum bdrv_snapshot_op op, const char *name, char *err,
		      size_t errlen)
{
	struct qcow2_state *s = bs->opaque;
	const char *fn = bs->filename;
	int ret, r;

	co_mutex_lock(&s->lock);
	if (s->corrupt) {
		snprintf(err, errlen, "the image is marked corrupt: it takes no more writes");
		ret = -EIO;
		goto out;
	}
	/* Step 2.  No L2 write may land behind the file-level work. */
	qcow2_cache_drain(&s->l2c);
	ret = qcow2_flush_locked(s);
	if (ret == 0)
		ret = qcow2_flush_locked(s);
	if (ret == 0)
		ret = qcow2_mark_clean(s);
	if (ret == 0 && (s->npending || qcow2_cache_has_dirty(&s->l2c) ||
			 qcow2_cache_has_dirty(&s->rbc))) {
		log_error("%s: metadata still dirty after a flush", fn);
		ret = -EIO;
	}
	if (ret < 0) {
		snprintf(err, errlen, "writing the image back: %s", strerror(-ret));
		goto out;
	}
	/* Step 3. */
	if (op == BDRV_SNAPSHOT_DELETE)
		ret = qcow2_snapshot_delete(s->file, name, QCOW2_SNAPSHOT_LIVE, err, errlen);
	else
		ret = qcow2_snapshot_create(s->file, name, QCOW2_SNAPSHOT_LIVE, err, errlen);
	/* Step 4, also after a failure: the file may have changed. */
	r = reload(s);
	if (r < 0) {
		s->corrupt = true;
		log_error("%s: after a snapshot operation the driver no longer follows the file: "
			  "no more writes until the image is opened again", fn);
		if (ret == 0) {
			snprintf(err, errlen, "reloading the image's tables: %s", strerror(-r));
			ret = r;
		}
	}
	if (ret == 0)
		log_info("%s: snapshot '%.64s' %s", fn, name,
			 op == BDRV_SNAPSHOT_DELETE ? "deleted" : "created");
out:
	co_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_co_snapshot_list(struct bdrv *bs, struct qcow2_snapshot **out, uint32_t *n, char *err,
			   size_t errlen)
{
	struct qcow2_state *s = bs->opaque;
	int ret;

	/* The table changes only under the lock (above). */
	co_mutex_lock(&s->lock);
	ret = qcow2_snapshot_list(s->file, out, n, err, errlen);
	co_mutex_unlock(&s->lock);
	return ret;
}
