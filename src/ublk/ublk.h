/* SPDX-License-Identifier: MIT */
/*
 * The ublk frontend: a qublk daemon serving one target (qcow2, raw or
 * null) as /dev/ublkbN through the kernel's ublk driver.
 *
 *   ctrl.c     /dev/ublk-control commands over an SQE128 io_uring
 *   features.c the driver's feature bits by name; what qublk asks for
 *   queue.c    one thread per hardware queue: FETCH/COMMIT uring_cmds and
 *              the target's backend I/O on one aio_ctx, a coroutine per tag
 *   dev.c      device lifecycle: add, params, start, signals, stop, del;
 *              daemonisation and the state files under the run directory
 *   targets.c  the target ops tables
 *
 * Thread model: the main thread owns the control ring, the target's open
 * and close, and the device lifecycle.  Queue threads own their aio_ctx,
 * iod mapping and tag coroutines, and touch nothing global: everything a
 * queue needs hangs off its struct ublk_queue and the read-only device.
 */
#ifndef QUBLK_UBLK_H
#define QUBLK_UBLK_H

#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/kbuf.h"
#include "ublk/uapi.h"

#define UBLK_CONTROL_PATH "/dev/ublk-control"
#define UBLK_DEF_QUEUES 1
#define UBLK_DEF_DEPTH 64
/* Per-tag buffer (and so max_sectors).  Every tag owns one, allocated and
 * locked before START_DEV: depth * this per queue. */
#define UBLK_DEF_MAX_IO (512u * 1024)
#define UBLK_MAX_QUEUES 64
#define UBLK_RUN_DIR_DEFAULT "/run/qublk"

/* ---------------------------------------------------------------- ctrl */

struct ublk_ctrl {
	int fd;                 /* /dev/ublk-control */
	struct io_uring ring;   /* SQE128: the control header is 32 bytes */
	int encode;             /* 1: UBLK_U_CMD_*, 0: legacy, -1: try both */
	uint64_t features;      /* GET_FEATURES, 0 if the kernel lacks it */
	bool have_features;
	/* The last device seen and whether it is unprivileged: commands on
	 * such a device carry the path of /dev/ublkcN before their payload. */
	int known_id;           /* -1: none */
	bool known_unpriv;
};

/* Open the control device and probe features.  Returns -errno (logged). */
int ublk_ctrl_open(struct ublk_ctrl *c);
void ublk_ctrl_close(struct ublk_ctrl *c);
/* All return 0 (or the kernel's non-negative result) or -errno.
 * -EOPNOTSUPP: the driver lacks the command (or the device the flag). */
int ublk_ctrl_add_dev(struct ublk_ctrl *c, struct ublksrv_ctrl_dev_info *info);
int ublk_ctrl_set_params(struct ublk_ctrl *c, unsigned dev_id, const struct ublk_params *p);
int ublk_ctrl_get_params(struct ublk_ctrl *c, unsigned dev_id, struct ublk_params *p);
int ublk_ctrl_start_dev(struct ublk_ctrl *c, unsigned dev_id, int pid);
int ublk_ctrl_stop_dev(struct ublk_ctrl *c, unsigned dev_id);
/* DEL_DEV_ASYNC where the driver has it, else DEL_DEV (which waits for
 * the last opener of /dev/ublkbN). */
int ublk_ctrl_del_dev(struct ublk_ctrl *c, unsigned dev_id);
int ublk_ctrl_get_info(struct ublk_ctrl *c, unsigned dev_id, struct ublksrv_ctrl_dev_info *info);
/* Recovery: START before the new daemon's FETCHes, END once they are in. */
int ublk_ctrl_start_recovery(struct ublk_ctrl *c, unsigned dev_id);
int ublk_ctrl_end_recovery(struct ublk_ctrl *c, unsigned dev_id, int pid);
/* UPDATE_SIZE: the disk's new capacity, in bytes (a multiple of 512). */
int ublk_ctrl_update_size(struct ublk_ctrl *c, unsigned dev_id, uint64_t bytes);
/* QUIESCE_DEV: wait up to @timeout_ms for the requests in flight, then
 * park the device (QUIESCED) and abort the daemon's FETCHes. */
int ublk_ctrl_quiesce(struct ublk_ctrl *c, unsigned dev_id, unsigned timeout_ms);
/* TRY_STOP_DEV: STOP_DEV unless the block device is open (-EBUSY). */
int ublk_ctrl_try_stop_dev(struct ublk_ctrl *c, unsigned dev_id);
/* GET_QUEUE_AFFINITY: the CPUs whose requests go to queue @q_id (the
 * block layer's map for the device's hardware queues). */
int ublk_ctrl_get_queue_affinity(struct ublk_ctrl *c, unsigned dev_id, unsigned q_id,
				 cpu_set_t *set);

/* Encoding helpers, exported for the unit test. */
unsigned ublk_ctrl_opcode(unsigned nr, bool encoded);
void ublk_ctrl_prep(struct io_uring_sqe *sqe, int fd, unsigned op,
		    const struct ublksrv_ctrl_cmd *cmd);
unsigned ublk_io_opcode(bool commit, bool encoded);
/* A 64-byte SQE for an I/O uring_cmd on @fd, @cmd (at most 16 bytes: the
 * SQE's cmd area) copied in; keeps the user_data aio_get_sqe set. */
void ublk_io_cmd_prep(struct io_uring_sqe *sqe, int fd, unsigned op, const void *cmd,
		      size_t len);
void ublk_io_prep(struct io_uring_sqe *sqe, int fd, unsigned op, unsigned q_id,
		  unsigned tag, int result, uint64_t addr);
const char *ublk_state_name(unsigned state);

/* ------------------------------------------------------------ features */

struct ublk_feature {
	uint64_t bit;           /* UBLK_F_* */
	const char *name;       /* "user_recovery" */
	const char *use;        /* what qublk does with it; NULL: unused */
};
const struct ublk_feature *ublk_feature_table(size_t *n);
const char *ublk_feature_name(uint64_t bit);   /* NULL: unknown bit */
uint64_t ublk_features_used(void);             /* every bit qublk may use */
/* Whether $QUBLK_USER_COPY asks for user copy alone (6.12). */
bool ublk_user_copy_alone(void);
/* The UBLK_F_* flags a new device asks for, given what the driver offers;
 * @zero_copy: AUTO_BUF_REG and USER_COPY where offered, or USER_COPY
 * alone where AUTO_BUF_REG is not and ublk_user_copy_alone() (never for
 * an unprivileged device). */
uint64_t ublk_dev_flags(uint64_t offered, bool unprivileged, bool zero_copy);

/* ------------------------------------------------------------- targets */

struct ublk_tgt;

struct ublk_tgt_opts {
	const char *file;       /* image (qcow2, raw); NULL for null */
	uint64_t size;          /* null: device size in bytes */
	bool read_only;
	bool force_share;       /* with read_only: open even if someone writes it */
	bool direct;            /* --cache none */
	unsigned nr_queues;
	bool crash_safe;        /* BDRV_O_CRASH_SAFE: a recoverable device's daemon
	                         * may die; what it acknowledged must be in the file */
	bool no_unmap;          /* --discard ignore: BDRV_O_NO_UNMAP */
	bool adopt;             /* adopt_fd is the image's descriptor, handed over */
	int adopt_fd;           /* by the previous daemon (owned by open from then on) */
};

/*
 * One const table per target.  open/close run on the main thread outside
 * request processing; the I/O ops run in a tag coroutine on a queue
 * thread (concurrently on several queue threads with -q > 1) and may
 * yield.  The queue has checked the request: the range lies inside the
 * device, len > 0, len <= max I/O for reads and writes, writes are not
 * sent to read-only devices.  I/O ops return 0 or -errno.
 */
struct ublk_tgt_ops {
	const char *name;
	/* Required.  Fill size, cluster_size, and can_multiqueue.  Errors are
	 * logged naming the file.  Returns -errno. */
	int (*open)(struct ublk_tgt *t, const struct ublk_tgt_opts *o);
	/* Required.  After every queue has stopped: write back, release. */
	void (*close)(struct ublk_tgt *t);
	/* Required.  As close, but the image's descriptor (and so its locks)
	 * survives in *fd (-1: no file) for the next daemon (opts.adopt_fd).
	 * Returns -errno if the write-back failed (*fd is then -1). */
	int (*release)(struct ublk_tgt *t, int *fd);
	/* Required. */
	int (*read)(struct ublk_tgt *t, void *buf, uint64_t off, uint32_t len);
	/* Required.  flags: BDRV_REQ_FUA. */
	int (*write)(struct ublk_tgt *t, const void *buf, uint64_t off, uint32_t len,
		     unsigned flags);
	/* Required. */
	int (*flush)(struct ublk_tgt *t);
	/* Optional (NULL: -EOPNOTSUPP and no discard parameters). */
	int (*discard)(struct ublk_tgt *t, uint64_t off, uint32_t len);
	/* Optional.  flags: BDRV_REQ_MAY_UNMAP. */
	int (*write_zeroes)(struct ublk_tgt *t, uint64_t off, uint32_t len, unsigned flags);
	/* Optional (NULL: the device cannot be resized).  Main thread, while
	 * the queues serve requests: grow the storage to @size bytes (larger
	 * than t->size, a multiple of 512).  The caller then publishes the
	 * new t->size and tells the kernel.  Returns -errno (logged). */
	int (*resize)(struct ublk_tgt *t, uint64_t size);
	/* Optional (NULL: the target has no internal snapshots).  Main
	 * thread, while the queues serve requests: create or delete (@op)
	 * the internal snapshot @name at a flush point (bdrv_snapshot: the
	 * requests in flight finish first, those that arrive meanwhile wait
	 * and go on afterwards).  Returns -errno with the reason in @err. */
	int (*snapshot)(struct ublk_tgt *t, enum bdrv_snapshot_op op, const char *name, char *err,
			size_t errlen);
	/* Optional (with snapshot).  Main thread, requests go on: the
	 * snapshot table, *n entries in *out for qcow2_snapshots_free().
	 * Returns -errno with the reason in @err. */
	int (*snapshot_list)(struct ublk_tgt *t, struct qcow2_snapshot **out, uint32_t *n,
			     char *err, size_t errlen);
};

struct ublk_tgt {
	const struct ublk_tgt_ops *ops;
	void *priv;
	uint64_t size;          /* bytes, multiple of 512; queue threads read it
	                         * while a resize changes it: atomic access */
	unsigned cluster_size;  /* allocation unit, 0 = none */
	bool read_only;
	bool can_multiqueue;    /* safe to call from several queue threads */
	uint32_t inline_max;    /* reads and writes up to this size reach the
	                         * image file as system calls on the calling
	                         * thread (an image in memory, io.h); 0: none */
	bool unmap;             /* set by the device, not the target: discard is
	                         * advertised and passed on (--discard unmap) */
};

const struct ublk_tgt_ops *ublk_tgt_find(const char *name);

/* -------------------------------------------------------------- device */

struct ublk_dev;

struct ublk_queue {
	const struct ublk_dev *dev;   /* read-only while queues run */
	unsigned q_id;
	unsigned depth;
	struct ublksrv_io_desc *iods; /* mmap of /dev/ublkcN, read-only */
	size_t iods_len;
	uint8_t *bufs;                /* depth * max_io bytes (zero copy: only for
	                               * requests the driver could not register
	                               * and small lone ones, queue.c) */
	/* Zero copy (the device has UBLK_F_AUTO_BUF_REG): the tags' kernel
	 * buffers, tag i at fixed-buffer index i of this queue's ring. */
	bool zero_copy;
	/* USER_COPY alone ($QUBLK_USER_COPY=1 on a driver without
	 * AUTO_BUF_REG, dev.c): the driver copies nothing; every read's and
	 * write's data is the daemon's to copy, by pread/pwrite of
	 * /dev/ublkcN (kbufs, a window with no ring). */
	bool user_copy;
	struct kbuf_window kbufs;
	struct ublk_io *ios;          /* per tag */
	/* Batched commands (UBLK_F_BATCH_IO), or NULL: per-tag FETCH and
	 * COMMIT_AND_FETCH (queue.c). */
	struct ublk_batch *batch;
	struct aio_ctx aio;
	bool ring_open;
	/* /dev/ublkcN is file 0 of the ring's file table: the uring_cmds
	 * name it by index (IOSQE_FIXED_FILE), no fd lookup per command. */
	bool cdev_fixed;
	/* Set by main before ublk_queue_stop for a hand-over: the thread
	 * exits leaving its ring open, ublk_queue_join closes it. */
	bool keep_ring;
	unsigned live_tags;           /* tag coroutines not yet finished */
	unsigned busy_tags;           /* tags inside a target op */
	/* The CPU the thread is pinned to, or -1 (shallow queues only: see
	 * queue_pin_cpu in dev.c). */
	int pin_cpu;
	pthread_t thread;
	bool thread_started;
	sem_t ready;                  /* posted once init_ret is set */
	int init_ret;
	int stop_efd;                 /* written by main: leave now */
	uint64_t stop_val;
	struct aio_req stop_req;
	bool stop_now;
	/* counters, read after the thread is joined */
	uint64_t nr_ios, nr_errors;
	uint64_t nr_copied;            /* zero copy: requests that went by user copy */
};

/* add --discard, as qublk nbd's (qemu-nbd's names).  AUTO: unmap for a
 * writable image (qcow2 frees clusters and punches them out of the file,
 * raw punches holes), ignore for read-only devices and the null target. */
enum ublk_discard {
	UBLK_DISCARD_AUTO,
	UBLK_DISCARD_UNMAP,     /* discard advertised; freed space goes back */
	UBLK_DISCARD_IGNORE,    /* no discard advertised; write-zeroes never
	                         * deallocates (BDRV_O_NO_UNMAP) */
};

enum ublk_run_mode {
	UBLK_RUN_ADD,           /* a new device */
	UBLK_RUN_RECOVER,       /* take over device dev_id whose daemon died */
	UBLK_RUN_HANDOVER,      /* take over device dev_id from its live daemon */
};

struct ublk_dev_opts {
	enum ublk_run_mode mode;
	const char *type;       /* "qcow2", "raw", "null" */
	const char *file;       /* absolute path or NULL (null) */
	int dev_id;             /* -1: let the kernel choose */
	unsigned nr_queues;
	unsigned depth;
	unsigned max_io;        /* bytes per tag buffer */
	bool read_only;
	bool force_share;       /* -U: with read_only only (BDRV_O_FORCE_SHARE) */
	bool direct;
	uint64_t size;          /* null target */
	bool no_recovery;       /* ADD: without UBLK_F_USER_RECOVERY */
	bool no_zero_copy;      /* ADD: without UBLK_F_AUTO_BUF_REG (copy the data) */
	bool no_batch;          /* ADD: without UBLK_F_BATCH_IO (per-tag commands) */
	bool unprivileged;      /* ADD: UBLK_F_UNPRIVILEGED_DEV */
	enum ublk_discard discard;
};

struct ublk_dev {
	struct ublk_dev_opts opts;
	struct ublk_tgt tgt;
	bool tgt_open;
	struct ublk_ctrl ctrl;
	bool ctrl_open;
	struct ublksrv_ctrl_dev_info info;   /* as returned by ADD_DEV */
	bool added;
	struct ublk_params params;
	int cdev_fd;
	bool encode_io;         /* UBLK_U_IO_* opcodes */
	struct ublk_queue *queues;
	unsigned nr_queues;
	int exit_efd;           /* queue threads write here when they exit */
	int listen_fd;          /* <run dir>/ublkN.sock: hand-over requests */
	bool started;           /* START_DEV / END_USER_RECOVERY done */
};

/* Queue thread lifecycle (queue.c).  start returns once the thread has
 * submitted its FETCH commands (or failed: -errno). */
int ublk_queue_start(struct ublk_queue *q);
/* Ask the thread to leave, any time: it starts no new request, finishes
 * those inside the target, commits them and exits.  Requests the kernel
 * hands it meanwhile stay unstarted: STOP_DEV has aborted them already,
 * or (hand-over) the kernel requeues them once the thread has exited. */
void ublk_queue_stop(struct ublk_queue *q);
/* Wait for the thread; then its ring, mappings and stacks are gone. */
void ublk_queue_join(struct ublk_queue *q);
/* Request boundary check, exported for the unit test.  Returns the op
 * (UBLK_IO_OP_*) with the byte range in *off and *len, or -EINVAL/-EOPNOTSUPP/-EROFS. */
int ublk_check_iod(const struct ublksrv_io_desc *iod, uint64_t dev_size,
		   uint32_t max_io, bool read_only, uint64_t *off, uint32_t *len);

/* Build the SET_PARAMS block for a target (dev.c; exported for tests):
 * discard only where t->unmap, write-zeroes wherever the target has it;
 * neither for a read-only device. */
void ublk_build_params(struct ublk_params *p, const struct ublk_tgt *t,
		       unsigned max_io, bool read_only);

/* Run a device to completion: open target, add (or recover, or take
 * over: o->mode), start, report "/dev/ublkbN\n" on @report_fd (-1:
 * stdout), serve until SIGTERM/SIGINT or until the kernel stops it, then
 * stop, close the image and delete the device; or, asked to hand over by
 * the next daemon, quiesce, close the image keeping its descriptor, pass
 * that on and leave the device to it.  Returns 0 or -errno (logged). */
int ublk_dev_run(const struct ublk_dev_opts *o, int report_fd);

/* State files under the run directory (QUBLK_RUN_DIR overrides): what
 * `list` shows and what `recover`/`upgrade` need to start a new daemon. */
struct ublk_state {
	int dev_id;
	int pid;
	char target[16];
	char image[4096];
	unsigned queues, depth;
	bool read_only;
	bool force_share;
	bool direct;
	uint64_t size;          /* null target */
	uint64_t flags;         /* UBLK_F_* the device was created with */
	enum ublk_discard discard;   /* as resolved at add (AUTO: an older file) */
};
const char *ublk_run_dir(void);
int ublk_state_write(const struct ublk_state *s);
int ublk_state_read(int dev_id, struct ublk_state *s);
void ublk_state_remove(int dev_id);

/* Stop and delete device @dev_id: SIGTERM its daemon and wait up to
 * @timeout_ms for it; if the device is still there (dead daemon), stop
 * and delete it here.  Unless @force, a device created with
 * UBLK_F_SAFE_STOP_DEV is first stopped with TRY_STOP_DEV, which fails
 * (-EBUSY, nothing done) while /dev/ublkbN is open or mounted; without
 * the feature (Linux < 6.19) the device is stopped whatever uses it.
 * Returns -errno (logged). */
int ublk_dev_delete(struct ublk_ctrl *c, int dev_id, int timeout_ms, bool force);

/* <run dir>/ublkN.sock, the daemon's socket (hand-over, resize,
 * snapshots). */
void ublk_sock_path(int dev_id, char *buf, size_t len);
/* Ask the daemon of device @dev_id to grow the image and the device to
 * @size bytes (UPDATE_SIZE).  Returns -errno (the reason logged). */
int ublk_dev_resize(int dev_id, uint64_t size);
/* Ask the daemon of device @dev_id to create or delete (@op) the internal
 * snapshot @name of its image, at a flush point.  Returns -errno (the
 * daemon's reason logged). */
int ublk_dev_snapshot(int dev_id, enum bdrv_snapshot_op op, const char *name);
/* ... for the snapshot list of its image: *n entries in *out, for
 * qcow2_snapshots_free().  Returns -errno (logged). */
int ublk_dev_snapshot_list(int dev_id, struct qcow2_snapshot **out, uint32_t *n);

#endif
