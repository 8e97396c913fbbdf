/* SPDX-License-Identifier: MIT */
/*
 * The block driver interface: what frontends (NBD, ublk, bench) call and
 * what image formats (raw, qcow2) implement.
 *
 * Thread model: a bdrv is opened and closed outside request processing;
 * the co_* entry points run inside a request coroutine on a thread with a
 * current aio_ctx (see aio.h), and may yield.  Drivers serialise their
 * own metadata (co_mutex); frontends may issue any number of requests
 * concurrently.  The block layer counts the requests inside the driver
 * and can hold new ones back until none is left (a drained section, as
 * QEMU's bdrv_drained_begin): what a live snapshot needs.
 *
 * Contract, checked once in block.c before a driver is called: the range
 * lies inside the virtual size, len > 0 (flush excepted), the iovec sums
 * to len and has at most BDRV_IOV_MAX entries, writes are refused with
 * -EROFS on read-only devices.  Drivers trust these.
 *
 * All functions return 0 or -errno.
 */
#ifndef QUBLK_BDRV_H
#define QUBLK_BDRV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "common/coro.h"
#include "common/io.h"

#define BDRV_IOV_MAX 16

enum {
	BDRV_O_RDONLY     = 1 << 0,
	BDRV_O_DIRECT     = 1 << 1,  /* cache=none: O_DIRECT on every file */
	BDRV_O_NO_BACKING = 1 << 2,  /* do not open backing files */
	/* With BDRV_O_RDONLY only (bdrv_open refuses it otherwise): open even
	 * if another process writes the image (QEMU's -U / force-share).  The
	 * image and its backing files then only take the "consistent read"
	 * lock, so the reads may see metadata in mid-update. */
	BDRV_O_FORCE_SHARE = 1 << 3,
	/* A crash of this process must not lose a write it completed: when a
	 * write, write-zeroes or discard returns, everything it changed is in
	 * the file (not necessarily on the disk: that is what flush is for).
	 * A daemon that another one may take over needs it (ublk recovery).
	 * Drivers that keep metadata in memory and do not say they honour it
	 * (bdrv_driver.process_crash_safe) get a flush after each such request
	 * from the block layer: correct, but an fdatasync per request. */
	BDRV_O_CRASH_SAFE = 1 << 4,
	/* discard=ignore (qemu-nbd's name): discards do nothing and
	 * write-zeroes never deallocates.  Without it (discard=unmap),
	 * discards free clusters and the space goes back to the host file
	 * system (qcow2 punches freed clusters out of the file). */
	BDRV_O_NO_UNMAP = 1 << 5,
};

/* Block status (bdrv_co_block_status): what reads of a range return. */
enum {
	BDRV_BLOCK_DATA = 1 << 0,     /* data stored in some layer (may be zeros) */
	BDRV_BLOCK_ZERO = 1 << 1,     /* reads return zeros, known without reading */
	BDRV_BLOCK_OFFSET_VALID = 1 << 2, /* *host is set (only if asked for) */
};

/* Request flags */
enum {
	BDRV_REQ_FUA       = 1 << 0,  /* write: data and metadata durable on return */
	BDRV_REQ_MAY_UNMAP = 1 << 1,  /* write_zeroes: may deallocate */
	/* write_zeroes: fail with -ENOTSUP (perhaps after zeroing part of the
	 * range) rather than write zeros, where the driver cannot zero
	 * without writing them (NBD's NBD_CMD_FLAG_FAST_ZERO) */
	BDRV_REQ_NO_FALLBACK = 1 << 2,
};

struct bdrv_opts {
	unsigned flags;                 /* BDRV_O_* */
	const char *format;             /* "qcow2", "raw" or NULL to probe */
	uint64_t l2_cache_size;         /* bytes; 0 = driver default */
	uint64_t refcount_cache_size;   /* bytes; 0 = driver default */
	unsigned backing_depth;         /* internal: loop/depth guard */
	/* Tests: qcow2 error injection, "SITE[,SITE]:ERRNO[:skip=N][:count=N]"
	 * (src/qcow2/qcow2.h); NULL: $QUBLK_INJECT for the top image. */
	const char *inject;
	/* Tests: slot a backend (e.g. io_fault) under the driver.  Called
	 * with the opened top-level file; returns -errno. */
	int (*wrap_file)(struct io_file *f, struct io_file **out, void *opaque);
	void *wrap_opaque;
	/* With adopt: the top image is @adopt_fd, an open descriptor of the
	 * file (taken over from another process with its open file
	 * description, and so with the image locks it holds: a hand-over
	 * leaves no moment in which the image is unlocked).  bdrv_open owns
	 * the descriptor from then on, even if it fails.  The locks are taken
	 * again on it (a no-op for locks the description already holds). */
	bool adopt;
	int adopt_fd;
};

struct bdrv;
struct qcow2_snapshot;

/* Operations on the internal snapshots of a live image.  Reverting one
 * (qemu-img snapshot -a) is not among them: it would change the data
 * under the image's users, which QEMU, too, only does with the VM
 * stopped. */
enum bdrv_snapshot_op {
	BDRV_SNAPSHOT_CREATE,
	BDRV_SNAPSHOT_DELETE,
};

struct bdrv_driver {
	const char *name;
	/* Completed requests are in the file already (no metadata cached
	 * dirty in memory), so BDRV_O_CRASH_SAFE costs nothing. */
	bool process_crash_safe;
	/* Optional: score how well the first bytes of a file match (0 = no). */
	int (*probe)(const uint8_t *buf, size_t len);
	/* Required.  Called outside a coroutine or inside one; @file is owned
	 * by bs from then on (closed by bdrv_close even if open fails). */
	int (*open)(struct bdrv *bs, const struct bdrv_opts *opts);
	/* Required.  Write back everything, release driver state (always,
	 * even on error).  Returns -errno if the write-back failed. */
	int (*close)(struct bdrv *bs);
	/* Required.  Coroutine context. */
	int (*co_preadv)(struct bdrv *bs, uint64_t off, uint64_t len,
			 const struct iovec *iov, int iovcnt);
	int (*co_pwritev)(struct bdrv *bs, uint64_t off, uint64_t len,
			  const struct iovec *iov, int iovcnt, unsigned flags);
	int (*co_pwrite_zeroes)(struct bdrv *bs, uint64_t off, uint64_t len,
				unsigned flags);
	int (*co_discard)(struct bdrv *bs, uint64_t off, uint64_t len);
	int (*co_flush)(struct bdrv *bs);
	/* Optional (without it: everything is data of this image).  Coroutine
	 * context, any thread that issues requests; reads metadata only,
	 * never guest data.  Describe the run starting at @off, at most @len
	 * bytes, whose status is uniform: set *pnum (0 < *pnum <= @len) and
	 * *depth, the layer of the chain that decides its contents (1 = this
	 * image, 2 = its backing file, ...; 0 = no layer: reads are zeros),
	 * and return BDRV_BLOCK_* flags, or -errno.  A driver with a backing
	 * file asks it (through bdrv_co_block_status) for what it leaves
	 * unallocated, and never reaches into the backing driver's state.
	 * @host is NULL (the I/O paths: nothing more to find) or asks where
	 * the run is stored, as QEMU's block status *map: the driver may then
	 * set *host and return BDRV_BLOCK_OFFSET_VALID, meaning the *pnum
	 * bytes lie contiguously at *host in the file of layer *depth (its
	 * image file, or a qcow2 image's external data file; with *depth 0,
	 * of the chain's last image, which keeps a host cluster for a range
	 * that reads zeros, as QEMU reports it).  Given for
	 * what is stored plainly (raw files, holes too; qcow2 normal clusters
	 * and zero clusters that keep a host cluster, where with
	 * BDRV_BLOCK_ZERO the bytes there need not be zeros), never for
	 * compressed clusters.  Never set when @host is NULL. */
	int (*co_block_status)(struct bdrv *bs, uint64_t off, uint64_t len,
			       uint64_t *pnum, unsigned *depth, uint64_t *host);
	/* Optional (NULL: bdrv_truncate fails with -ENOTSUP, naming the
	 * format).  Change the virtual size to @size.  Coroutine context,
	 * on any thread that issues requests, while requests inside the old
	 * size may run on other threads (a live device grows under I/O).
	 * The block layer has checked: the image is writable, @size is a
	 * multiple of 512 and differs from bs->size, and a shrink was asked
	 * for (BDRV_TRUNC_SHRINK) over a tail with no data in this image.
	 * Growing: [old size, @size) reads as zeros afterwards, whatever a
	 * backing file holds there.  A driver may refuse a shrink (or a
	 * resize it cannot do, e.g. with internal snapshots) with -ENOTSUP,
	 * logged with the reason.  On return the new size and the metadata
	 * that maps it are in the file (a flush makes them durable); a crash
	 * at any point leaves an image of the old or the new size in which
	 * `qemu-img check` finds no corruption (leaks allowed).  On failure
	 * the virtual size is unchanged.  The driver updates its own state;
	 * the block layer sets bs->size once the call succeeded, so no
	 * request reaches the new range before.  Returns -errno, logged
	 * naming the file. */
	int (*co_truncate)(struct bdrv *bs, uint64_t size);
	/* Optional (without it bdrv_co_pwritev_compressed returns -ENOTSUP).
	 * Coroutine context.  Write one whole cluster (@off cluster aligned,
	 * @len the cluster size, or less for the last cluster of an image
	 * whose size is not a multiple) in compressed form where that saves
	 * space; as a normal write otherwise. */
	int (*co_pwritev_compressed)(struct bdrv *bs, uint64_t off, uint64_t len,
				     const struct iovec *iov, int iovcnt);
	/* Optional (NULL: bdrv_snapshot fails with -ENOTSUP, naming the
	 * format).  Create the internal snapshot @name of the guest contents,
	 * or delete the one whose name, or else id, is @name (@op), as
	 * qemu-img snapshot -c/-d do.  Coroutine context, inside a drained
	 * section (block layer): no request of this image is in the driver
	 * and none enters until it returns, on any thread.  The snapshot
	 * holds every write completed before the section began.  The image
	 * is writable (checked).  On return the change is durable and the
	 * driver's state follows the file, whether it succeeded or not; a
	 * crash at any point leaves the image with or without the change,
	 * `qemu-img check` finding leaks at most (and active entries whose
	 * refcount is 1 but OFLAG_COPIED not yet set: see snapshot-write.c).
	 * Returns -errno with the reason in @err (-ENOENT: no such
	 * snapshot). */
	int (*co_snapshot)(struct bdrv *bs, enum bdrv_snapshot_op op, const char *name, char *err,
			   size_t errlen);
	/* Optional (NULL: an empty list).  Coroutine context, any thread,
	 * requests may run.  The snapshot table: *n entries in *out, for
	 * qcow2_snapshots_free().  Returns -errno with the reason in @err. */
	int (*co_snapshot_list)(struct bdrv *bs, struct qcow2_snapshot **out, uint32_t *n,
				char *err, size_t errlen);
};

struct bdrv {
	const struct bdrv_driver *drv;
	void *opaque;              /* driver state */
	struct io_file *file;      /* the image file */
	char *filename;            /* as opened */
	uint64_t size;             /* virtual size in bytes (bdrv_truncate changes it
	                            * while other threads read it: atomic access) */
	bool read_only;
	unsigned open_flags;       /* BDRV_O_* */
	unsigned cluster_size;     /* allocation unit for io_min/io_opt, 0 = none */
	bool zeroes_read_zero;     /* discard makes reads return zeros */
	struct bdrv *parent;       /* image whose backing file this is, or NULL */
	uint64_t dev, ino;         /* identity of the file, for loop detection */
	/* Drained sections (block.c): requests inside the driver, and
	 * sections open (both atomic); under drain_spin, the requests held
	 * back and the drainers waiting for in_flight to reach 0. */
	unsigned in_flight;
	unsigned drained;
	int drain_spin;
	struct co_queue drain_held, drain_waiters;
};

/* Open @filename as an image.  Errors are logged naming the file.
 * Every file opened (the image and each backing file) is locked the way
 * QEMU locks it (block/lock.h): a read-write open fails with -EAGAIN if
 * another process, qublk or QEMU, uses the image, a read-only open if
 * someone writes it (unless BDRV_O_FORCE_SHARE).  The locks last until
 * bdrv_close(). */
int bdrv_open(const char *filename, const struct bdrv_opts *opts, struct bdrv **out);
/* Open a backing file @name for @parent: relative names resolve against
 * the directory of @parent's file; depth-limited (loops refused). */
int bdrv_open_backing(struct bdrv *parent, const char *name, const char *format,
		      struct bdrv **out);
/* Open the external data file @name of @parent (qcow2 "External data
 * file name"): relative to @parent's directory, read-only and O_DIRECT as
 * @parent, locked like it.  Returns -errno (logged). */
int bdrv_open_data_file(struct bdrv *parent, const char *name, struct io_file **out);
/* Returns -errno if writing the image back failed (it is closed anyway). */
int bdrv_close(struct bdrv *bs);
/* Write the image back and close it like bdrv_close, but first duplicate
 * the top image's descriptor into *@fd (-1 if it has none): its open file
 * description, and so its image locks, outlive the close.  For handing
 * the image to another process (bdrv_opts.adopt).  Returns -errno (then
 * *@fd is -1 and the image is closed all the same). */
int bdrv_close_keep_fd(struct bdrv *bs, int *fd);
const struct bdrv_driver *bdrv_find_driver(const char *name);

/* Checked entry points (coroutine context). */
int bdrv_co_preadv(struct bdrv *bs, uint64_t off, uint64_t len,
		   const struct iovec *iov, int iovcnt);
int bdrv_co_pwritev(struct bdrv *bs, uint64_t off, uint64_t len,
		    const struct iovec *iov, int iovcnt, unsigned flags);
/* A whole cluster, compressed (see bdrv_driver.co_pwritev_compressed):
 * -EINVAL unless @off is cluster aligned and @len a whole cluster (or the
 * image's last, short one), -ENOTSUP if the format cannot compress. */
int bdrv_co_pwritev_compressed(struct bdrv *bs, uint64_t off, uint64_t len,
			       const struct iovec *iov, int iovcnt);
int bdrv_co_pwrite_zeroes(struct bdrv *bs, uint64_t off, uint64_t len, unsigned flags);
int bdrv_co_discard(struct bdrv *bs, uint64_t off, uint64_t len);
int bdrv_co_flush(struct bdrv *bs);
/* Change the virtual size of @bs to @size bytes (a multiple of 512).
 * Growing: the new range reads as zeros.  Shrinking needs
 * BDRV_TRUNC_SHRINK and a tail [@size, old size) that holds no data in
 * this image (qemu-img's --shrink, minus its data loss).  In a coroutine
 * or outside one (then it runs one on this thread).  Errors are logged
 * naming the file: -EROFS, -EINVAL (size), -EPERM (a shrink not asked
 * for, or over data), -ENOTSUP (the format cannot resize).  bs->size is
 * read by other threads' requests: it changes only once the driver is
 * done.  Returns -errno. */
enum { BDRV_TRUNC_SHRINK = 1 << 0 };
int bdrv_truncate(struct bdrv *bs, uint64_t size, unsigned flags);
/* A drained section: from bdrv_drain_begin()'s return to
 * bdrv_drain_end(), no request of @bs is inside its driver; requests
 * that arrive meanwhile, from any thread, wait (they are not failed) and
 * go on afterwards.  Coroutine context, never inside a request of @bs
 * (it would wait for itself).  Sections may nest. */
void bdrv_drain_begin(struct bdrv *bs);
void bdrv_drain_end(struct bdrv *bs);
/* Internal snapshots of an open, writable image while requests run (see
 * bdrv_driver.co_snapshot): the requests in flight finish, new ones wait
 * (a drained section) while the driver writes everything back and
 * changes the snapshot table.  In a coroutine or outside one (then it
 * runs one on this thread).  Errors are logged naming the file, with
 * the reason in @err too: -EROFS, -ENOTSUP (the format has no internal
 * snapshots), -ENOENT (delete: no such snapshot), the driver's.
 * Returns -errno. */
int bdrv_snapshot(struct bdrv *bs, enum bdrv_snapshot_op op, const char *name, char *err,
		  size_t errlen);
/* The internal snapshots of @bs (requests go on): *n entries in *out,
 * for qcow2_snapshots_free().  Same context and errors.  Returns -errno. */
int bdrv_snapshot_list(struct bdrv *bs, struct qcow2_snapshot **out, uint32_t *n, char *err,
		       size_t errlen);
/* Status of the run at @off (see bdrv_driver.co_block_status): flags >= 0
 * with *pnum and *depth set, or -errno.  @host may be NULL; if not, and
 * the result has BDRV_BLOCK_OFFSET_VALID, *host is set. */
int bdrv_co_block_status_host(struct bdrv *bs, uint64_t off, uint64_t len,
			      uint64_t *pnum, unsigned *depth, uint64_t *host);
/* The same without the host offset (the I/O paths). */
static inline int bdrv_co_block_status(struct bdrv *bs, uint64_t off, uint64_t len,
				       uint64_t *pnum, unsigned *depth)
{ return bdrv_co_block_status_host(bs, off, len, pnum, depth, NULL); }
static inline int bdrv_co_pread(struct bdrv *bs, uint64_t off, uint64_t len, void *buf)
{ struct iovec v = { buf, len }; return bdrv_co_preadv(bs, off, len, &v, 1); }
static inline int bdrv_co_pwrite(struct bdrv *bs, uint64_t off, uint64_t len, const void *buf, unsigned fl)
{ struct iovec v = { (void *)buf, len }; return bdrv_co_pwritev(bs, off, len, &v, 1, fl); }

extern const struct bdrv_driver bdrv_raw;
extern const struct bdrv_driver bdrv_qcow2;

#endif
