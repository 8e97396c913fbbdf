/* SPDX-License-Identifier: MIT */
/*
 * ublk device lifecycle, on the daemon's main thread:
 *
 *   open target -> ADD_DEV -> SET_PARAMS -> open /dev/ublkcN -> queue
 *   threads (buffers, stacks, FETCH) -> START_DEV -> state file, report
 *   -> wait for SIGTERM/SIGINT/SIGHUP or a queue thread leaving ->
 *   STOP_DEV (the kernel drains and flushes through us, then aborts the
 *   FETCHes) -> join queues -> close target (writes back) -> close
 *   /dev/ublkcN -> DEL_DEV -> remove state file.
 *
 * DEL_DEV waits for the last reference to the device, so /dev/ublkcN and
 * every queue ring must be closed before it (DEL_DEV_ASYNC, used where
 * the driver has it, does not wait: a device stopped under a mounted file
 * system goes when it is unmounted).  A daemon killed with -9
 * leaves a device whose queues the kernel has cancelled; ublk_dev_delete
 * (qublk del) stops and deletes it.
 *
 * Memory: mlockall(MCL_ONFAULT) and PR_SET_IO_FLUSHER where permitted;
 * tag buffers are faulted in before START_DEV.
 *
 * State files: <run dir>/ublkN, "key=value" lines, written atomically
 * (rename) once the device is live, removed by whoever deletes it.
 *
 * The daemon's socket (hand-over to the next daemon, resize, snapshots)
 * is control.c's; dev.c listens on it and hands it each connection.
 */
#include "ublk/control.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/util.h"
#include "ublk/notify.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif
#ifndef MCL_ONFAULT
#define MCL_ONFAULT 4
#endif

#define UBLK_MAX_DISCARD_SECTORS (64u << 11)   /* 64 MiB per request */
/* How long an unprivileged device's daemon waits for udev to hand it
 * the device's nodes. */
#define UBLK_UDEV_TIMEOUT_MS 20000

/* ------------------------------------------------------------ params */

void ublk_build_params(struct ublk_params *p, const struct ublk_tgt *t,
		       unsigned max_io, bool read_only)
{
	unsigned shift = 12;

	memset(p, 0, sizeof(*p));
	/* io_min/io_opt: the allocation unit, never below the 4 KiB
	 * physical block (file systems align to it). */
	if (t->cluster_size && (t->cluster_size & (t->cluster_size - 1)) == 0)
		shift = MAX(12, __builtin_ctz(t->cluster_size));
	p->types = UBLK_PARAM_TYPE_BASIC;
	/* VOLATILE_CACHE and FUA: without them the kernel never sends FLUSH
	 * and the guest's fsync persists nothing. */
	p->basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
	if (read_only)
		p->basic.attrs |= UBLK_ATTR_READ_ONLY;
	p->basic.logical_bs_shift = 9;
	p->basic.physical_bs_shift = 12;
	p->basic.io_min_shift = shift;
	p->basic.io_opt_shift = shift;
	p->basic.max_sectors = max_io >> 9;
	p->basic.chunk_sectors = 0;
	p->basic.dev_sectors = t->size >> 9;
	/* Discard as the user chose (t->unmap: --discard unmap); without it
	 * the kernel says "not supported" to fstrim and blkdiscard.
	 * Write-zeroes either way (with ignore it never deallocates). */
	bool discard = !read_only && t->unmap && t->ops->discard;
	bool zeroes = !read_only && t->ops->write_zeroes;
	if (discard || zeroes) {
		p->types |= UBLK_PARAM_TYPE_DISCARD;
		p->discard.discard_granularity = 1u << shift;
		p->discard.max_discard_sectors = discard ? UBLK_MAX_DISCARD_SECTORS : 0;
		p->discard.max_write_zeroes_sectors = zeroes ? UBLK_MAX_DISCARD_SECTORS : 0;
		p->discard.max_discard_segments = 1;
	}
	/* Send only what we set: older kernels have a shorter struct. */
	p->len = offsetof(struct ublk_params, devt);
}

/* -------------------------------------------------------- state files */

const char *ublk_run_dir(void)
{
	static char dir[PATH_MAX];
	const char *d = getenv("QUBLK_RUN_DIR"), *x;

	if (d && *d)
		return d;
	if (geteuid() == 0)
		return UBLK_RUN_DIR_DEFAULT;
	/* A user's devices: their own directory (a shared one would let one
	 * user's state files pose as another's). */
	if (!dir[0]) {
		x = getenv("XDG_RUNTIME_DIR");
		if (x && x[0] == '/')
			snprintf(dir, sizeof(dir), "%s/qublk", x);
		else
			snprintf(dir, sizeof(dir), "/tmp/qublk-%u", (unsigned)geteuid());
	}
	return dir;
}

/* Create the run directory if needed; it must be ours and writable by
 * nobody else (under /tmp anyone could have made it first). */
static int ensure_run_dir(void)
{
	const char *dir = ublk_run_dir();
	struct stat st;

	if (mkdir(dir, geteuid() == 0 ? 0755 : 0700) < 0 && errno != EEXIST) {
		int ret = -errno;
		log_error("%s: mkdir: %s", dir, strerror(errno));
		return ret;
	}
	if (lstat(dir, &st) < 0) {
		int ret = -errno;
		log_error("%s: %s", dir, strerror(errno));
		return ret;
	}
	if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 022)) {
		log_error("%s: not a directory of uid %u writable only by it: not keeping state "
			  "there (set QUBLK_RUN_DIR)", dir, (unsigned)geteuid());
		return -EPERM;
	}
	return 0;
}

static void state_path(int dev_id, char *buf, size_t len)
{
	snprintf(buf, len, "%s/ublk%d", ublk_run_dir(), dev_id);
}

int ublk_state_write(const struct ublk_state *s)
{
	char path[PATH_MAX], tmp[PATH_MAX + 8];
	FILE *f;
	int ret = 0;

	ret = ensure_run_dir();
	if (ret < 0)
		return ret;
	state_path(s->dev_id, path, sizeof(path));
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f) {
		ret = -errno;
		log_error("%s: %s", tmp, strerror(errno));
		return ret;
	}
	fprintf(f, "id=%d\npid=%d\ntarget=%s\nqueues=%u\ndepth=%u\nread_only=%d\n"
		"force_share=%d\ndirect=%d\nsize=%llu\nflags=%llu\n",
		s->dev_id, s->pid, s->target, s->queues, s->depth, s->read_only, s->force_share,
		s->direct, (unsigned long long)s->size, (unsigned long long)s->flags);
	if (s->discard != UBLK_DISCARD_AUTO)
		fprintf(f, "discard=%s\n", s->discard == UBLK_DISCARD_UNMAP ? "unmap" : "ignore");
	fprintf(f, "image=%s\n", s->image);
	if (fclose(f) != 0 || rename(tmp, path) < 0) {
		ret = -errno;
		log_error("%s: %s", path, strerror(errno));
		unlink(tmp);
	}
	return ret;
}

int ublk_state_read(int dev_id, struct ublk_state *s)
{
	char path[PATH_MAX], line[4200];
	FILE *f;

	memset(s, 0, sizeof(*s));
	s->dev_id = dev_id;
	state_path(dev_id, path, sizeof(path));
	f = fopen(path, "r");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		char *v = strchr(line, '=');
		size_t n;

		if (!v)
			continue;
		*v++ = 0;
		n = strlen(v);
		if (n && v[n - 1] == '\n')
			v[--n] = 0;
		if (!strcmp(line, "pid"))
			s->pid = atoi(v);
		else if (!strcmp(line, "target"))
			snprintf(s->target, sizeof(s->target), "%s", v);
		else if (!strcmp(line, "queues"))
			s->queues = (unsigned)atoi(v);
		else if (!strcmp(line, "depth"))
			s->depth = (unsigned)atoi(v);
		else if (!strcmp(line, "read_only"))
			s->read_only = atoi(v) != 0;
		else if (!strcmp(line, "force_share"))
			s->force_share = atoi(v) != 0;
		else if (!strcmp(line, "direct"))
			s->direct = atoi(v) != 0;
		else if (!strcmp(line, "size"))
			s->size = strtoull(v, NULL, 10);
		else if (!strcmp(line, "flags"))
			s->flags = strtoull(v, NULL, 10);
		else if (!strcmp(line, "discard"))
			s->discard = !strcmp(v, "unmap") ? UBLK_DISCARD_UNMAP :
				     !strcmp(v, "ignore") ? UBLK_DISCARD_IGNORE : UBLK_DISCARD_AUTO;
		else if (!strcmp(line, "image"))
			snprintf(s->image, sizeof(s->image), "%s", v);
	}
	fclose(f);
	return 0;
}

void ublk_state_remove(int dev_id)
{
	char path[PATH_MAX];

	state_path(dev_id, path, sizeof(path));
	unlink(path);
}

/* ------------------------------------------------------------ helpers */

static int wait_for_path(const char *path, int timeout_ms)
{
	struct stat st;

	for (int waited = 0; ; waited += 10) {
		if (stat(path, &st) == 0)
			return 0;
		if (errno != ENOENT || waited >= timeout_ms)
			return -errno;
		usleep(10 * 1000);
	}
}

/* Wait until we may open @path with @mode (R_OK|W_OK): for an
 * unprivileged device, until udev (udev/60-qublk.rules) has given its
 * node to us.  Returns 0 or -errno (-ETIMEDOUT). */
static int wait_for_access(const char *path, int mode, int timeout_ms)
{
	for (int waited = 0; ; waited += 10) {
		if (faccessat(AT_FDCWD, path, mode, AT_EACCESS) == 0)
			return 0;
		if (errno != ENOENT && errno != EACCES && errno != EPERM)
			return -errno;
		if (waited >= timeout_ms)
			return -ETIMEDOUT;
		usleep(10 * 1000);
	}
}

static void lock_memory(void)
{
	/* A user's RLIMIT_MEMLOCK (8 MiB) is far below the tag buffers, and
	 * MCL_FUTURE would then make every later mmap fail. */
	if (geteuid() != 0) {
		log_debug("not root: memory not locked");
		return;
	}
	/* ONFAULT: lock what we touch (buffers are touched up front) without
	 * populating every reserved mapping. */
	if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) < 0 &&
	    (errno != EINVAL || mlockall(MCL_CURRENT | MCL_FUTURE) < 0))
		log_debug("mlockall: %s (continuing unlocked)", strerror(errno));
	if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0)
		log_debug("PR_SET_IO_FLUSHER: %s", strerror(errno));
}

/* A recovering daemon appends: the log then tells the whole story. */
static void redirect_stdio(unsigned dev_id, bool append)
{
	char log_path[PATH_MAX];
	int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	int log_fd;

	snprintf(log_path, sizeof(log_path), "%s/ublk%u.log", ublk_run_dir(), dev_id);
	log_fd = open(log_path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC),
		      0644);
	if (null_fd >= 0) {
		dup2(null_fd, STDIN_FILENO);
		dup2(null_fd, STDOUT_FILENO);
	}
	dup2(log_fd >= 0 ? log_fd : null_fd, STDERR_FILENO);
	if (null_fd >= 0)
		close(null_fd);
	if (log_fd >= 0)
		close(log_fd);
}

/* ------------------------------------------------------------- daemon */

/* Queues at most this deep may be pinned to one CPU. */
#define QUEUE_PIN_MAX_DEPTH 4

/*
 * The CPU a queue's thread is pinned to, or -1 to let it float.  A
 * shallow queue's thread sleeps between requests, and every wakeup lets
 * the scheduler move it: measured at depth 1 and 4 with one queue
 * (bench/vm-ublk.sh --qdepth N, README), a thread kept on the first CPU
 * of its queue's map (the CPUs whose requests reach it, as kublk pins)
 * serves up to 1.65x the requests of a floating one.  Only when that map
 * spans more than one CPU: a queue of its own CPU's requests pinned there
 * shares that CPU with every submitter (two queues on two CPUs, one fio
 * job: 0.65-0.82x at depth 4, as at 128).  A deep queue's thread stays
 * busy and floats (one queue at depth 128: 0.85x to 1.22x pinned).
 */
static int queue_pin_cpu(struct ublk_dev *d, unsigned q_id)
{
	cpu_set_t set, allowed;
	int ret;

	if (d->info.queue_depth > QUEUE_PIN_MAX_DEPTH)
		return -1;
	ret = ublk_ctrl_get_queue_affinity(&d->ctrl, d->info.dev_id, q_id, &set);
	if (ret < 0) {
		log_debug("queue %u: GET_QUEUE_AFFINITY: %s", q_id, strerror(-ret));
		return -1;
	}
	/* Only where the daemon may run (a cpuset, systemd's CPUAffinity=). */
	if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0)
		CPU_AND(&set, &set, &allowed);
	if (CPU_COUNT(&set) < 2)
		return -1;
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
		if (CPU_ISSET(cpu, &set))
			return cpu;
	return -1;
}

static int setup_queues(struct ublk_dev *d)
{
	size_t per_q = (size_t)d->info.queue_depth * d->opts.max_io;
	int ret;

	d->queues = calloc(d->info.nr_hw_queues, sizeof(*d->queues));
	if (!d->queues)
		return -ENOMEM;
	d->nr_queues = d->info.nr_hw_queues;
	for (unsigned i = 0; i < d->nr_queues; i++) {
		d->queues[i].stop_efd = -1;
		d->queues[i].dev = d;
		d->queues[i].q_id = i;
		d->queues[i].depth = d->info.queue_depth;
		d->queues[i].pin_cpu = queue_pin_cpu(d, i);
	}
	for (unsigned i = 0; i < d->nr_queues; i++) {
		struct ublk_queue *q = &d->queues[i];

		/* Zero copy: the buffers serve only requests the driver could
		 * not register and small lone ones (queue.c), so they are not
		 * touched up front. */
		q->zero_copy = d->info.flags & UBLK_F_AUTO_BUF_REG;
		q->user_copy = !q->zero_copy && (d->info.flags & UBLK_F_USER_COPY);
		q->bufs = mmap(NULL, per_q, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | (q->zero_copy ? 0 : MAP_POPULATE), -1, 0);
		if (q->bufs == MAP_FAILED) {
			ret = -errno;
			q->bufs = NULL;
			log_error("queue %u: %zu bytes of I/O buffers: %s", i, per_q, strerror(errno));
			return ret;
		}
		if (q->zero_copy || q->user_copy) {
			q->kbufs = (struct kbuf_window){
				.stride = d->opts.max_io,
				.n = q->depth,
				.ctx = q->zero_copy ? &q->aio : NULL,
				.copy_fd = d->cdev_fd,
				.copy_off = UBLKSRV_IO_BUF_OFFSET + ((uint64_t)i << UBLK_QID_OFF),
				.copy_shift = UBLK_TAG_OFF,
				/* A request given the slot leaves its tag's
				 * buffer idle: the io layer's bounce buffer. */
				.bounce = q->bufs,
			};
			ret = kbuf_window_add(&q->kbufs);
			if (ret < 0) {
				log_error("queue %u: kernel buffer window: %s", i, strerror(-ret));
				return ret;
			}
		}
		ret = ublk_queue_start(q);
		if (ret < 0)
			return ret;
	}
	return 0;
}

static int open_cdev(struct ublk_dev *d)
{
	char path[64];
	int ret;

	snprintf(path, sizeof(path), "/dev/ublkc%u", d->info.dev_id);
	ret = wait_for_path(path, 5000);
	if (ret == 0) {
		d->cdev_fd = open(path, O_RDWR | O_CLOEXEC);
		ret = d->cdev_fd < 0 ? -errno : 0;
	}
	if (ret < 0)
		log_error("%s: %s", path, strerror(-ret));
	return ret;
}

/* Stop everything that was started, in the order DEL_DEV needs. */
static void teardown(struct ublk_dev *d, bool started)
{
	int ret;

	if (started) {
		ret = ublk_ctrl_stop_dev(&d->ctrl, d->info.dev_id);
		if (ret < 0 && ret != -ENODEV)
			log_warn("ublk%u: STOP_DEV: %s", d->info.dev_id, strerror(-ret));
	}
	/* After STOP_DEV the queues are idle and the kernel has aborted
	 * their FETCHes; the stop request covers every other case. */
	for (unsigned i = 0; i < d->nr_queues; i++)
		ublk_queue_stop(&d->queues[i]);
	for (unsigned i = 0; i < d->nr_queues; i++)
		ublk_queue_join(&d->queues[i]);
	if (d->tgt_open) {
		d->tgt.ops->close(&d->tgt);
		d->tgt_open = false;
	}
	for (unsigned i = 0; i < d->nr_queues; i++) {
		if (d->queues[i].bufs)
			munmap(d->queues[i].bufs, (size_t)d->queues[i].depth * d->opts.max_io);
		kbuf_window_del(&d->queues[i].kbufs);
	}
	free(d->queues);
	d->queues = NULL;
	if (d->cdev_fd >= 0) {
		close(d->cdev_fd);
		d->cdev_fd = -1;
	}
	if (d->added) {
		ret = ublk_ctrl_del_dev(&d->ctrl, d->info.dev_id);
		if (ret < 0 && ret != -ENODEV)
			log_error("ublk%u: DEL_DEV: %s", d->info.dev_id, strerror(-ret));
		d->added = false;
	}
	if (d->ctrl_open) {
		ublk_ctrl_close(&d->ctrl);
		d->ctrl_open = false;
	}
	if (d->exit_efd >= 0) {
		close(d->exit_efd);
		d->exit_efd = -1;
	}
}

static int report(int report_fd, const char *msg)
{
	size_t len = strlen(msg);

	if (report_fd < 0) {
		fputs(msg, stdout);
		fflush(stdout);
		return 0;
	}
	while (len) {
		ssize_t n = write(report_fd, msg, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		msg += n;
		len -= (size_t)n;
	}
	return 0;
}

/* ------------------------------------------------------------- serving */

enum { SERVE_STOP, SERVE_HANDED_OVER, SERVE_ABANDON };

/* Wait until a signal asks us to stop, a queue thread leaves, or the
 * next daemon takes the device over. */
static int serve(struct ublk_dev *d, int sfd)
{
	struct pollfd pfd[3] = {
		{ .fd = sfd, .events = POLLIN },
		{ .fd = d->exit_efd, .events = POLLIN },
		{ .fd = d->listen_fd, .events = POLLIN },
	};

	for (;;) {
		pfd[2].fd = d->listen_fd;
		if (poll(pfd, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			log_error("poll: %s", strerror(errno));
			return SERVE_STOP;
		}
		if (pfd[0].revents) {
			struct signalfd_siginfo si;
			if (read(sfd, &si, sizeof(si)) == sizeof(si))
				log_info("ublk%u: signal %u: stopping", d->info.dev_id, si.ssi_signo);
			return SERVE_STOP;
		}
		if (pfd[1].revents) {
			log_info("ublk%u: a queue stopped (device stopped by the kernel?): shutting down",
				 d->info.dev_id);
			return SERVE_STOP;
		}
		if (pfd[2].revents) {
			int cfd = accept4(d->listen_fd, NULL, NULL, SOCK_CLOEXEC), r;
			if (cfd < 0)
				continue;
			r = ublk_control_serve(d, cfd);
			close(cfd);
			if (r > 0)
				return SERVE_HANDED_OVER;
			if (r < 0)
				return SERVE_ABANDON;
		}
	}
}

/* ------------------------------------------------------------- daemon */

/* ADD_DEV, SET_PARAMS, queues, START_DEV. */
static int dev_create(struct ublk_dev *d)
{
	const struct ublk_dev_opts *o = &d->opts;
	int ret;

	d->info.nr_hw_queues = o->nr_queues;
	d->info.queue_depth = o->depth;
	d->info.max_io_buf_bytes = o->max_io;
	d->info.dev_id = o->dev_id < 0 ? (__u32)-1 : (__u32)o->dev_id;
	d->info.ublksrv_pid = getpid();
	d->info.flags = ublk_dev_flags(d->ctrl.features, o->unprivileged, !o->no_zero_copy);
	if ((d->info.flags & UBLK_F_USER_COPY) && !(d->info.flags & UBLK_F_AUTO_BUF_REG))
		log_debug("user copy alone: the daemon copies every request's data");
	if (o->no_recovery)
		d->info.flags &= ~(UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE |
				   UBLK_F_QUIESCE);
	/* A queue of depth 1 is refused batches: the 7.3 driver sizes each
	 * queue's event FIFO by its depth, and a FIFO of one entry fails
	 * ADD_DEV with EINVAL. */
	if (o->no_batch || o->depth < 2)
		d->info.flags &= ~UBLK_F_BATCH_IO;
	if (o->unprivileged && !(d->info.flags & UBLK_F_UNPRIVILEGED_DEV)) {
		log_error("this ublk driver offers no unprivileged devices");
		return -EOPNOTSUPP;
	}
	ret = ublk_ctrl_add_dev(&d->ctrl, &d->info);
	if (ret < 0) {
		if (o->dev_id >= 0 && ret == -EEXIST)
			log_error("ublk%d already exists", o->dev_id);
		else if (ret == -EPERM)
			log_error("%s: ADD_DEV: %s (not root: try --unprivileged)",
				  UBLK_CONTROL_PATH, strerror(-ret));
		else
			log_error("%s: ADD_DEV: %s", UBLK_CONTROL_PATH, strerror(-ret));
		return ret;
	}
	d->added = true;
	log_debug("ublk%u: flags 0x%llx", d->info.dev_id, (unsigned long long)d->info.flags);
	if (d->info.flags & UBLK_F_UNPRIVILEGED_DEV) {
		/* The driver checks each command on the device against our
		 * access to /dev/ublkcN, which udev hands to us. */
		char cpath[64];
		snprintf(cpath, sizeof(cpath), "/dev/ublkc%u", d->info.dev_id);
		ret = wait_for_access(cpath, R_OK | W_OK, UBLK_UDEV_TIMEOUT_MS);
		if (ret < 0) {
			log_error("%s: %s: are qublk's udev rules installed (60-qublk.rules)? "
				  "They give an unprivileged device's nodes to its owner", cpath,
				  ret == -ETIMEDOUT ? "still not ours after a while" : strerror(-ret));
			return ret;
		}
	}
	if (d->info.nr_hw_queues != o->nr_queues)
		log_warn("ublk%u: the driver gave %u queues (asked %u)", d->info.dev_id,
			 d->info.nr_hw_queues, o->nr_queues);
	if (d->info.max_io_buf_bytes < o->max_io)
		d->opts.max_io = d->info.max_io_buf_bytes;
	if (d->opts.max_io < 4096 || d->info.queue_depth == 0 || d->info.nr_hw_queues == 0) {
		log_error("ublk%u: unusable device geometry from the driver", d->info.dev_id);
		return -EINVAL;
	}

	ublk_build_params(&d->params, &d->tgt, d->opts.max_io, d->tgt.read_only);
	ret = ublk_ctrl_set_params(&d->ctrl, d->info.dev_id, &d->params);
	if (ret < 0) {
		log_error("ublk%u: SET_PARAMS: %s", d->info.dev_id, strerror(-ret));
		return ret;
	}
	ret = open_cdev(d);
	if (ret < 0)
		return ret;
	ret = setup_queues(d);
	if (ret < 0)
		return ret;
	ret = ublk_ctrl_start_dev(&d->ctrl, d->info.dev_id, getpid());
	if (ret < 0) {
		log_error("ublk%u: START_DEV: %s", d->info.dev_id, strerror(-ret));
		return ret;
	}
	d->started = true;
	return 0;
}

/* Take over device opts.dev_id: START_USER_RECOVERY (once the kernel has
 * quiesced it and the old daemon has let go of /dev/ublkcN), queues with
 * the device's geometry, END_USER_RECOVERY.  Requests the kernel queued
 * meanwhile (and, with REISSUE, those the old daemon held) come to us. */
static int dev_recover(struct ublk_dev *d)
{
	unsigned id = (unsigned)d->opts.dev_id;
	struct ublk_params p;
	int ret;

	ret = ublk_ctrl_get_info(&d->ctrl, id, &d->info);
	if (ret < 0) {
		log_error("ublk%u: %s", id, ret == -ENODEV ? "no such device" : strerror(-ret));
		return ret;
	}
	if (!(d->info.flags & UBLK_F_USER_RECOVERY)) {
		log_error("ublk%u was created without user_recovery: it cannot be recovered "
			  "('qublk del -n %u' and add it again)", id, id);
		return -EOPNOTSUPP;
	}
	ret = ublk_ctrl_get_params(&d->ctrl, id, &p);
	if (ret < 0) {
		log_error("ublk%u: GET_PARAMS: %s", id, strerror(-ret));
		return ret;
	}
	if (d->tgt.size < (p.basic.dev_sectors << 9)) {
		log_error("ublk%u: the image (%llu bytes) is smaller than the device (%llu)", id,
			  (unsigned long long)d->tgt.size,
			  (unsigned long long)p.basic.dev_sectors << 9);
		return -EINVAL;
	}
	/* The device keeps its size; a larger image shows after a resize. */
	d->tgt.size = p.basic.dev_sectors << 9;
	d->params = p;
	d->opts.max_io = MIN(d->info.max_io_buf_bytes, p.basic.max_sectors << 9);
	if (d->opts.max_io < 4096 || d->info.queue_depth == 0 || d->info.nr_hw_queues == 0) {
		log_error("ublk%u: unusable device geometry from the driver", id);
		return -EINVAL;
	}
	if (d->tgt.read_only != !!(p.basic.attrs & UBLK_ATTR_READ_ONLY)) {
		log_error("ublk%u: the device is %s but the image was opened %s", id,
			  d->tgt.read_only ? "writable" : "read-only",
			  d->tgt.read_only ? "read-only" : "writable");
		return -EINVAL;
	}
	/* The kernel refuses (-EBUSY) until the old daemon's /dev/ublkcN is
	 * closed and the device quiesced; that takes a moment after a kill. */
	for (int waited = 0; ; waited += 100) {
		ret = ublk_ctrl_start_recovery(&d->ctrl, id);
		if (ret != -EBUSY || waited >= 60000)
			break;
		usleep(100 * 1000);
	}
	if (ret < 0) {
		log_error("ublk%u: START_USER_RECOVERY: %s%s", id, strerror(-ret),
			  ret == -EBUSY ? " (is its daemon still running?)" : "");
		return ret;
	}
	ret = open_cdev(d);
	if (ret < 0)
		return ret;
	ret = setup_queues(d);
	if (ret < 0)
		return ret;
	ret = ublk_ctrl_end_recovery(&d->ctrl, id, getpid());
	if (ret < 0) {
		log_error("ublk%u: END_USER_RECOVERY: %s", id, strerror(-ret));
		return ret;
	}
	d->started = true;
	return 0;
}

int ublk_dev_run(const struct ublk_dev_opts *o, int report_fd)
{
	struct ublk_dev dev = { .cdev_fd = -1, .exit_efd = -1, .listen_fd = -1 }, *d = &dev;
	struct ublk_tgt_opts to = {
		.file = o->file, .size = o->size, .read_only = o->read_only,
		.force_share = o->force_share, .direct = o->direct, .nr_queues = o->nr_queues,
	};
	struct ublk_state st = { 0 };
	enum ublk_discard discard = o->discard;
	char path[64];
	sigset_t mask;
	int sfd = -1, ret, how = SERVE_STOP;

	d->opts = *o;
	/* A device that can give space back does, unless told to ignore
	 * discards; a recovered one keeps what it was created with (its
	 * parameters are the kernel's), or this for an older state file. */
	if (discard == UBLK_DISCARD_AUTO)
		discard = o->file && !o->read_only ? UBLK_DISCARD_UNMAP : UBLK_DISCARD_IGNORE;
	to.no_unmap = discard == UBLK_DISCARD_IGNORE;
	/* Signals are taken through a signalfd; block them before any queue
	 * thread exists so that all threads inherit the mask. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);
	sfd = signalfd(-1, &mask, SFD_CLOEXEC);
	d->exit_efd = eventfd(0, EFD_CLOEXEC);
	if (sfd < 0 || d->exit_efd < 0) {
		ret = -errno;
		log_error("signalfd/eventfd: %s", strerror(errno));
		goto out;
	}
	lock_memory();

	d->tgt.ops = ublk_tgt_find(o->type);
	if (!d->tgt.ops) {
		log_error("unknown target '%s' (qcow2, raw, null)", o->type);
		ret = -EINVAL;
		goto out;
	}
	ret = ublk_ctrl_open(&d->ctrl);
	if (ret < 0)
		goto out;
	d->ctrl_open = true;
	d->encode_io = d->ctrl.encode == 1;
	/* A daemon whose device outlives it must not lose what it has
	 * acknowledged when it dies (the next one reissues only what was
	 * still in flight). */
	to.crash_safe = o->mode != UBLK_RUN_ADD ||
		(!o->no_recovery &&
		 (ublk_dev_flags(d->ctrl.features, o->unprivileged, false) & UBLK_F_USER_RECOVERY));
	if (o->mode == UBLK_RUN_HANDOVER) {
		/* From here until the image is open, the descriptor we hold
		 * keeps the image locked: nobody else can open it. */
		ret = ublk_control_receive_handover(o->dev_id, &to.adopt_fd);
		if (ret < 0)
			goto out;
		to.adopt = to.adopt_fd >= 0;
	}
	ret = d->tgt.ops->open(&d->tgt, &to);
	if (ret < 0)
		goto out;
	d->tgt_open = true;
	d->tgt.unmap = discard == UBLK_DISCARD_UNMAP && !d->tgt.read_only;
	if (o->nr_queues > 1 && !d->tgt.can_multiqueue) {
		log_error("--queues > 1 with %s: not yet", o->type);
		ret = -EINVAL;
		goto out;
	}

	ret = o->mode == UBLK_RUN_ADD ? dev_create(d) : dev_recover(d);
	if (ret < 0)
		goto out;

	snprintf(path, sizeof(path), "/dev/ublkb%u", d->info.dev_id);
	if (wait_for_path(path, 5000) < 0)
		log_warn("%s did not appear (no devtmpfs or udev?)", path);
	else if ((d->info.flags & UBLK_F_UNPRIVILEGED_DEV) &&
		 wait_for_access(path, d->tgt.read_only ? R_OK : R_OK | W_OK,
				 UBLK_UDEV_TIMEOUT_MS) < 0)
		log_warn("%s is not ours (is qublk's udev rule installed?): only root can open it",
			 path);

	st.dev_id = (int)d->info.dev_id;
	st.pid = getpid();
	snprintf(st.target, sizeof(st.target), "%s", o->type);
	snprintf(st.image, sizeof(st.image), "%s", o->file ? o->file : "-");
	st.queues = d->nr_queues;
	st.depth = d->info.queue_depth;
	st.read_only = d->tgt.read_only;
	st.force_share = o->force_share;
	st.direct = o->direct;
	st.size = o->size;
	st.flags = d->info.flags;
	st.discard = discard;
	if (ublk_state_write(&st) < 0)
		log_warn("ublk%u: no state file: 'qublk list' will not show the image",
			 d->info.dev_id);
	if (ublk_control_listen(d) < 0)
		log_warn("ublk%u: no hand-over socket: 'qublk upgrade' will not work: %s",
			 d->info.dev_id, strerror(errno));

	/* From here on a daemon logs to <run dir>/ublkN.log: the parent's
	 * stdout and stderr must not stay open behind it. */
	if (report_fd >= 0)
		redirect_stdio(d->info.dev_id, o->mode != UBLK_RUN_ADD);
	log_info("%s: %s, %s %s, %u queue(s) of depth %u, %llu bytes%s, discard %s, flags 0x%llx",
		 path, o->mode == UBLK_RUN_ADD ? "live" : o->mode == UBLK_RUN_RECOVER ? "recovered"
		 : "taken over", o->type, st.image, d->nr_queues, d->info.queue_depth,
		 (unsigned long long)d->tgt.size, d->tgt.read_only ? ", read-only" : "",
		 d->tgt.unmap ? "unmap" : "ignore", (unsigned long long)d->info.flags);
	{
		char msg[80];
		snprintf(msg, sizeof(msg), "%s\n", path);
		if (report(report_fd, msg) < 0)
			log_warn("cannot report to the parent: %s", strerror(errno));
		if (report_fd >= 0) {
			close(report_fd);
			report_fd = -1;
		}
	}
	ublk_notify_live((int)d->info.dev_id);   /* systemd READY=1, udev change */

	how = serve(d, sfd);
	ret = 0;
out:
	if (how != SERVE_STOP) {
		/* The device is the next daemon's (or left quiesced for
		 * 'qublk recover'): neither stop nor delete it. */
		d->started = false;
		d->added = false;
		if (how == SERVE_ABANDON)
			ret = -EIO;
	} else if (d->started || d->added) {
		log_debug("ublk%u: tearing down", d->info.dev_id);
		/* Recovery failed half-way: leave the device to the next try. */
		if (o->mode != UBLK_RUN_ADD && !d->started)
			d->added = false;
		else
			d->added = true;
	}
	ublk_control_close(d);
	teardown(d, d->started);
	if (how == SERVE_STOP && d->started) {
		ublk_state_remove((int)d->info.dev_id);
		log_info("ublk%u: deleted", d->info.dev_id);
	}
	if (sfd >= 0)
		close(sfd);
	return ret;
}

/* ------------------------------------------------------------- delete */

static bool is_qublk(int pid)
{
	char path[64], comm[64] = "";
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/comm", pid);
	f = fopen(path, "r");
	if (!f)
		return false;
	if (!fgets(comm, sizeof(comm), f))
		comm[0] = 0;
	fclose(f);
	return !strncmp(comm, "qublk", 5);
}

static int wait_pid_exit(int pid, int timeout_ms)
{
#ifdef SYS_pidfd_open
	int pfd = (int)syscall(SYS_pidfd_open, pid, 0);

	if (pfd >= 0) {
		struct pollfd p = { .fd = pfd, .events = POLLIN };
		int ret;
		do
			ret = poll(&p, 1, timeout_ms);
		while (ret < 0 && errno == EINTR);
		close(pfd);
		return ret > 0 ? 0 : -ETIMEDOUT;
	}
#endif
	for (int waited = 0; waited < timeout_ms; waited += 20) {
		if (kill(pid, 0) < 0 && errno == ESRCH)
			return 0;
		usleep(20 * 1000);
	}
	return -ETIMEDOUT;
}

int ublk_dev_delete(struct ublk_ctrl *c, int dev_id, int timeout_ms, bool force)
{
	struct ublksrv_ctrl_dev_info info;
	struct ublk_state st;
	int pid, ret;

	ret = ublk_ctrl_get_info(c, (unsigned)dev_id, &info);
	if (ret < 0) {
		ublk_state_remove(dev_id);
		if (ret == -ENODEV)
			log_error("ublk%d: no such device", dev_id);
		else
			log_error("ublk%d: GET_DEV_INFO: %s", dev_id, strerror(-ret));
		return ret;
	}
	/* Safe stop: the kernel stops the device only if nobody has the
	 * block device open (a mount counts), atomically with the check.
	 * The daemon then sees its queues aborted and shuts down as after
	 * STOP_DEV; the SIGTERM below finds it leaving. */
	if (!force && (info.flags & UBLK_F_SAFE_STOP_DEV)) {
		ret = ublk_ctrl_try_stop_dev(c, (unsigned)dev_id);
		if (ret == -EBUSY) {
			log_error("ublk%d is busy: /dev/ublkb%d is open or mounted (unmount it and "
				  "close it, or 'qublk del --force' to stop it anyway)", dev_id, dev_id);
			return ret;
		}
		if (ret < 0 && ret != -ENODEV) {
			log_error("ublk%d: TRY_STOP_DEV: %s (not stopped; 'qublk del --force' stops it "
				  "whether or not it is in use)", dev_id, strerror(-ret));
			return ret;
		}
	}
	pid = info.ublksrv_pid;
	if (pid <= 0 && ublk_state_read(dev_id, &st) == 0)
		pid = st.pid;
	if (pid > 0 && pid != getpid() && is_qublk(pid)) {
		/* The daemon stops, flushes, closes the image and deletes. */
		if (kill(pid, SIGTERM) == 0) {
			ret = wait_pid_exit(pid, timeout_ms);
			if (ret < 0) {
				log_error("ublk%d: daemon %d did not exit within %d ms", dev_id, pid,
					  timeout_ms);
				return ret;
			}
		}
	}
	/* Dead daemon (or it failed to delete): clean up here. */
	ret = ublk_ctrl_get_info(c, (unsigned)dev_id, &info);
	if (ret == 0) {
		log_debug("ublk%d: daemon gone, state %s: deleting here", dev_id,
			  ublk_state_name(info.state));
		ret = ublk_ctrl_stop_dev(c, (unsigned)dev_id);
		if (ret < 0)
			log_debug("ublk%d: STOP_DEV: %s", dev_id, strerror(-ret));
		ret = ublk_ctrl_del_dev(c, (unsigned)dev_id);
		if (ret < 0 && ret != -ENODEV) {
			log_error("ublk%d: DEL_DEV: %s", dev_id, strerror(-ret));
			return ret;
		}
	}
	ublk_state_remove(dev_id);
	return 0;
}
