/* SPDX-License-Identifier: MIT */
/*
 * The daemon's control socket: the requests a running device's daemon
 * takes from qublk commands (hand-over to the next daemon, resize,
 * snapshots), and the client side that sends them.
 *
 * Thread model: the daemon serves the socket on its main thread, from
 * dev.c's serve loop between signals, while the queue threads run
 * requests; a hand-over stops and joins them before the image is given
 * away.  The client side runs in the qublk command's only thread.
 */
#include "ublk/control.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/util.h"
#include "qcow2/format.h"

/*
 * The daemon's socket, <run dir>/ublkN.sock (SOCK_SEQPACKET, mode 0600,
 * peers of our uid or root only): one request per connection, one reply
 * ("ok" or "error: REASON"), served on the main thread between signals.
 *
 * "resize BYTES" (qublk resize -n): see handle_resize.
 *
 * "snapshot-create NAME", "snapshot-delete NAME", "snapshot-list" (qublk
 * snapshot -n): see handle_snapshot.  "snapshot-apply NAME" is refused.
 *
 * "handover" (qublk upgrade, from the next daemon): we quiesce the device
 * (QUIESCE_DEV where the device has UBLK_F_QUIESCE: the requests in
 * flight complete, the FETCHes are aborted), stop the queue threads once
 * no request is inside the target (the kernel requeues what they had not
 * started when they exit: stop_queues), close /dev/ublkcN, write the
 * image back and close it keeping one descriptor (and so the image
 * locks), and send that descriptor with "ok".  From then on the next
 * daemon owns the image and recovers the device; we exit without
 * stopping it.  Never two writers (we closed the image before sending),
 * never an unlocked moment (the descriptor holds the locks throughout).
 */
#define HANDOVER_REQ "handover"
#define RESIZE_REQ "resize"
#define SNAPSHOT_REQ "snapshot-"
/* The longest request: a snapshot name of 65535 bytes (qcow2's limit). */
#define REQ_MAX (64 + 65535)
/* A peer that neither sends nor reads stops holding the main thread. */
#define PEER_TIMEOUT_S 10

void ublk_sock_path(int dev_id, char *buf, size_t len)
{
	snprintf(buf, len, "%s/ublk%d.sock", ublk_run_dir(), dev_id);
}

int ublk_control_listen(struct ublk_dev *d)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	mode_t old;
	int fd, ret;

	ublk_sock_path((int)d->info.dev_id, sa.sun_path, sizeof(sa.sun_path));
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	unlink(sa.sun_path);
	old = umask(0077);
	ret = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 2) < 0 ? -errno : 0;
	umask(old);
	if (ret < 0) {
		close(fd);
		return ret;
	}
	d->listen_fd = fd;
	return 0;
}

void ublk_control_close(struct ublk_dev *d)
{
	char path[PATH_MAX];

	if (d->listen_fd < 0)
		return;
	close(d->listen_fd);
	d->listen_fd = -1;
	ublk_sock_path((int)d->info.dev_id, path, sizeof(path));
	unlink(path);
}

static int send_reply(int cfd, const char *msg, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { (void *)msg, strlen(msg) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

	if (fd >= 0) {
		struct cmsghdr *cm;
		memset(cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	}
	return sendmsg(cfd, &mh, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

/* Stop the queue threads for a hand-over: each leaves once no request
 * is inside the target, before its ring is closed (keep_ring).  The
 * kernel then cancels their commands and requeues what they had not
 * started as it does when a daemon dies (REISSUE), the path recovery
 * relies on.  A ring closed by a thread that still runs races with the
 * kernel's delivery of a request to it: on 6.12 such a request was lost
 * to both daemons and the device never quiesced. */
static void stop_queues(struct ublk_dev *d)
{
	for (unsigned i = 0; i < d->nr_queues; i++) {
		d->queues[i].keep_ring = true;
		ublk_queue_stop(&d->queues[i]);
	}
	for (unsigned i = 0; i < d->nr_queues; i++)
		ublk_queue_join(&d->queues[i]);
}

/* Returns 1 if the device was handed over (exit without stopping it),
 * 0 if the request was refused and we go on serving, -errno if the hand-
 * over failed half-way (the device is left quiesced for 'qublk recover'). */
static int handover(struct ublk_dev *d, int cfd)
{
	unsigned id = d->info.dev_id;
	int fd = -1, ret;

	if (!(d->info.flags & UBLK_F_USER_RECOVERY)) {
		send_reply(cfd, "error: the device was created without user_recovery", -1);
		return 0;
	}
	/* Not with batched commands: there (7.3) QUIESCE_DEV waits for no
	 * request and cancels the FETCHes as STOP_DEV does, marking the
	 * queues aborted, so that every request arriving until the next
	 * daemon recovers the device fails with EIO.  Closing our rings,
	 * as without QUIESCE_DEV, makes the kernel requeue them instead. */
	if ((d->info.flags & UBLK_F_QUIESCE) && !(d->info.flags & UBLK_F_BATCH_IO)) {
		/* Requests in flight complete here, on the queue threads. */
		ret = ublk_ctrl_quiesce(&d->ctrl, id, 30000);
		if (ret < 0) {
			char msg[128];
			log_warn("ublk%u: QUIESCE_DEV: %s; not handing over", id, strerror(-ret));
			snprintf(msg, sizeof(msg), "error: QUIESCE_DEV: %s", strerror(-ret));
			send_reply(cfd, msg, -1);
			return 0;
		}
		log_info("ublk%u: quiesced for hand-over", id);
	} else {
		log_info("ublk%u: stopping the queues for hand-over (%s: requests the queues "
			 "hold are requeued)", id,
			 (d->info.flags & UBLK_F_QUIESCE) ? "batched commands" : "no QUIESCE_DEV here");
	}
	stop_queues(d);
	if (d->cdev_fd >= 0) {
		close(d->cdev_fd);
		d->cdev_fd = -1;
	}
	/* The next daemon binds the same path. */
	ublk_control_close(d);
	ret = d->tgt.ops->release(&d->tgt, &fd);
	d->tgt_open = false;
	if (ret < 0) {
		log_error("ublk%u: writing the image back for hand-over: %s; the device stays "
			  "quiesced for 'qublk recover'", id, strerror(-ret));
		send_reply(cfd, "error: writing the image back failed", -1);
		return ret;
	}
	ret = send_reply(cfd, "ok", fd);
	if (fd >= 0)
		close(fd);
	if (ret < 0) {
		log_error("ublk%u: sending the image to the next daemon: %s; the device stays "
			  "quiesced for 'qublk recover'", id, strerror(-ret));
		return ret;
	}
	log_info("ublk%u: handed over", id);
	return 1;
}

/* "resize BYTES": grow the image, publish the size to the queues, then
 * the kernel's (UPDATE_SIZE).  A failed UPDATE_SIZE leaves the image
 * larger than the device: harmless, and a retry completes it (the image
 * is already that size).  Replies "ok" or "error: REASON". */
static void handle_resize(struct ublk_dev *d, int cfd, const char *arg)
{
	unsigned id = d->info.dev_id;
	uint64_t old = d->tgt.size, size;
	char msg[256], *end;
	int ret;

	errno = 0;
	size = strtoull(arg, &end, 10);
	if (errno || end == arg || *end || size == 0 || size % 512) {
		send_reply(cfd, "error: the size must be a positive multiple of 512 bytes", -1);
		return;
	}
	if (!(d->info.flags & UBLK_F_UPDATE_SIZE)) {
		send_reply(cfd, "error: the device was created without update_size (UPDATE_SIZE)", -1);
		return;
	}
	if (d->tgt.read_only) {
		send_reply(cfd, "error: the device is read-only", -1);
		return;
	}
	if (size < old) {
		send_reply(cfd, "error: a live device cannot shrink (its users may have data "
			   "there): 'qublk del', 'qublk resize --shrink FILE SIZE', 'qublk add'", -1);
		return;
	}
	if (size > old) {
		if (!d->tgt.ops->resize) {
			snprintf(msg, sizeof(msg), "error: the %s target cannot be resized", d->tgt.ops->name);
			send_reply(cfd, msg, -1);
			return;
		}
		ret = d->tgt.ops->resize(&d->tgt, size);
		if (ret < 0) {
			snprintf(msg, sizeof(msg), "error: growing the image: %s%s (%s/ublk%u.log)",
				 strerror(-ret), ret == -ENOTSUP ? ": its format cannot be resized yet" : "",
				 ublk_run_dir(), id);
			send_reply(cfd, msg, -1);
			return;
		}
		/* Requests up to the new size pass the queues' check from here. */
		__atomic_store_n(&d->tgt.size, size, __ATOMIC_RELEASE);
	}
	ret = ublk_ctrl_update_size(&d->ctrl, id, size);
	if (ret < 0) {
		log_error("ublk%u: UPDATE_SIZE to %llu bytes: %s (the image has the new size, the "
			  "device not)", id, (unsigned long long)size, strerror(-ret));
		snprintf(msg, sizeof(msg), "error: UPDATE_SIZE: %s", strerror(-ret));
		send_reply(cfd, msg, -1);
		return;
	}
	d->params.basic.dev_sectors = size >> 9;
	log_info("ublk%u: resized from %llu to %llu bytes", id, (unsigned long long)old,
		 (unsigned long long)size);
	send_reply(cfd, "ok", -1);
}

#define APPLY_REFUSED \
	"reverting a live device to a snapshot is refused: its data would change under its " \
	"users (a mounted file system, a VM); stop them, 'qublk del' the device, then " \
	"'qublk snapshot -a NAME FILE'"

/* "snapshot-list": "ok N", then one message per snapshot: its numbers,
 * the length of its id, a newline, the id and the name (ublk_dev_snapshot_list
 * reads them). */
static void snapshot_list_reply(struct ublk_dev *d, int cfd)
{
	struct qcow2_snapshot *sn = NULL;
	uint32_t n = 0;
	char msg[600], err[512] = "";
	int ret;

	ret = d->tgt.ops->snapshot_list(&d->tgt, &sn, &n, err, sizeof(err));
	if (ret < 0) {
		snprintf(msg, sizeof(msg), "error: %s", err[0] ? err : strerror(-ret));
		send_reply(cfd, msg, -1);
		return;
	}
	snprintf(msg, sizeof(msg), "ok %u", n);
	ret = send_reply(cfd, msg, -1);
	for (uint32_t i = 0; i < n && ret == 0; i++) {
		const struct qcow2_snapshot *e = &sn[i];
		size_t il = strlen(e->id), nl = strlen(e->name), hl;
		char *m = malloc(128 + il + nl);
		if (!m)
			break;          /* the peer sees the list end early */
		hl = (size_t)snprintf(m, 128, "%u %u %llu %llu %llu %llu %zu\n", e->date_sec,
				      e->date_nsec, (unsigned long long)e->vm_clock_nsec,
				      (unsigned long long)e->vm_state_size,
				      (unsigned long long)e->icount,
				      (unsigned long long)e->disk_size, il);
		memcpy(m + hl, e->id, il);
		memcpy(m + hl + il, e->name, nl);
		ret = send(cfd, m, hl + il + nl, MSG_NOSIGNAL) < 0 ? -errno : 0;
		free(m);
	}
	qcow2_snapshots_free(sn, n);
}

/* "snapshot-create|delete NAME": at a flush point (the target's snapshot
 * op: requests in flight finish, new ones wait meanwhile).  Replies "ok"
 * or "error: REASON". */
static void handle_snapshot(struct ublk_dev *d, int cfd, const char *req)
{
	enum bdrv_snapshot_op op = BDRV_SNAPSHOT_CREATE;
	char msg[600], err[512] = "";
	const char *name = NULL;
	int ret;

	if (!strncmp(req, "create ", 7)) {
		name = req + 7;
	} else if (!strncmp(req, "delete ", 7)) {
		op = BDRV_SNAPSHOT_DELETE;
		name = req + 7;
	} else if (!strncmp(req, "apply ", 6)) {
		send_reply(cfd, "error: " APPLY_REFUSED, -1);
		return;
	} else if (strcmp(req, "list")) {
		send_reply(cfd, "error: unknown request", -1);
		return;
	}
	if (!d->tgt.ops->snapshot || !d->tgt.ops->snapshot_list) {
		snprintf(msg, sizeof(msg), "error: the %s target has no internal snapshots",
			 d->tgt.ops->name);
		send_reply(cfd, msg, -1);
		return;
	}
	if (!name) {
		snapshot_list_reply(d, cfd);
		return;
	}
	if (d->tgt.read_only) {
		send_reply(cfd, "error: the device is read-only", -1);
		return;
	}
	if (!name[0]) {
		send_reply(cfd, "error: a snapshot name must not be empty", -1);
		return;
	}
	ret = d->tgt.ops->snapshot(&d->tgt, op, name, err, sizeof(err));
	if (ret < 0) {
		snprintf(msg, sizeof(msg), "error: %s", err[0] ? err : strerror(-ret));
		send_reply(cfd, msg, -1);
		return;
	}
	send_reply(cfd, "ok", -1);
}

/* One request from a peer on the socket.  Returns as handover does. */
int ublk_control_serve(struct ublk_dev *d, int cfd)
{
	struct timeval tv = { .tv_sec = PEER_TIMEOUT_S };
	struct ucred cr;
	socklen_t len = sizeof(cr);
	char *req;
	ssize_t n;
	int ret = 0;

	if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0 ||
	    (cr.uid != 0 && cr.uid != geteuid())) {
		log_warn("ublk%u: request from uid %u refused", d->info.dev_id, (unsigned)cr.uid);
		return 0;
	}
	setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	req = malloc(REQ_MAX + 1);
	if (!req)
		return 0;
	do
		n = recv(cfd, req, REQ_MAX + 1, MSG_TRUNC);
	while (n < 0 && errno == EINTR);
	if (n <= 0)
		goto out;
	if (n > REQ_MAX) {
		send_reply(cfd, "error: request too long", -1);
		goto out;
	}
	req[n] = 0;
	if (!strcmp(req, HANDOVER_REQ)) {
		log_info("ublk%u: hand-over requested by pid %d", d->info.dev_id, (int)cr.pid);
		ret = handover(d, cfd);
	} else if (!strncmp(req, RESIZE_REQ " ", strlen(RESIZE_REQ) + 1)) {
		log_info("ublk%u: resize to %.32s bytes requested by pid %d", d->info.dev_id,
			 req + strlen(RESIZE_REQ) + 1, (int)cr.pid);
		handle_resize(d, cfd, req + strlen(RESIZE_REQ) + 1);
	} else if (!strncmp(req, SNAPSHOT_REQ, strlen(SNAPSHOT_REQ))) {
		log_info("ublk%u: %.80s requested by pid %d", d->info.dev_id, req, (int)cr.pid);
		handle_snapshot(d, cfd, req + strlen(SNAPSHOT_REQ));
	} else {
		send_reply(cfd, "error: unknown request", -1);
	}
out:
	free(req);
	return ret;
}

/* Connect to the daemon of @dev_id, send @req and set a receive timeout
 * of @timeout_s.  Returns the socket or -errno (logged). */
static int sock_connect(int dev_id, const char *req, int timeout_s)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = timeout_s };
	int fd, ret;

	ublk_sock_path(dev_id, sa.sun_path, sizeof(sa.sun_path));
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    send(fd, req, strlen(req), MSG_NOSIGNAL) < 0) {
		ret = -errno;
		log_error("ublk%d: %s: %s (is its daemon a running qublk?)", dev_id, sa.sun_path,
			  strerror(errno));
		close(fd);
		return ret;
	}
	return fd;
}

/* One answer on @fd into @buf (NUL-terminated).  Returns its length, or
 * -errno (logged; -EPIPE: the daemon closed the connection). */
static int sock_answer(int fd, int dev_id, struct msghdr *mh)
{
	ssize_t n;

	do
		n = recvmsg(fd, mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		int ret = n < 0 ? -errno : -EPIPE;
		log_error("ublk%d: no answer from the daemon%s: %s", dev_id,
			  ret == -EAGAIN || ret == -EWOULDBLOCK ? " within the time" : "",
			  n < 0 ? strerror(-ret) : "it closed the connection");
		return ret;
	}
	((char *)mh->msg_iov[0].iov_base)[n] = 0;
	return (int)n;
}

/* Send @req to the daemon of @dev_id and wait up to @timeout_s for its
 * answer: the text in @buf, a descriptor passed with it in *@out_fd (-1:
 * none; NULL: closed).  Returns the answer's length or -errno (logged). */
static int sock_request(int dev_id, const char *req, char *buf, size_t buflen, int *out_fd,
			int timeout_s)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { buf, buflen - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	int fd, rfd = -1, n;

	if (out_fd)
		*out_fd = -1;
	fd = sock_connect(dev_id, req, timeout_s);
	if (fd < 0)
		return fd;
	n = sock_answer(fd, dev_id, &mh);
	close(fd);
	if (n < 0)
		return n;
	for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
		    cm->cmsg_len == CMSG_LEN(sizeof(int)))
			memcpy(&rfd, CMSG_DATA(cm), sizeof(int));
	if (out_fd)
		*out_fd = rfd;
	else if (rfd >= 0)
		close(rfd);
	return n;
}

/* The next daemon's side: ask the daemon of @dev_id for the image.
 * *out_fd: the descriptor, or -1 with no file (null target).  Returns
 * -errno (logged). */
int ublk_control_receive_handover(int dev_id, int *out_fd)
{
	char buf[256];
	int ret = sock_request(dev_id, HANDOVER_REQ, buf, sizeof(buf), out_fd, 120);

	if (ret < 0)
		return ret;
	if (strcmp(buf, "ok")) {
		if (*out_fd >= 0)
			close(*out_fd);
		*out_fd = -1;
		log_error("ublk%d: the daemon refused to hand over: %s", dev_id, buf);
		return -EBUSY;
	}
	return 0;
}

/* Send @req and wait up to @timeout_s for "ok" (0) or "error: REASON"
 * (logged, -EIO). */
static int ok_request(int dev_id, const char *req, int timeout_s)
{
	char buf[1024];
	int ret = sock_request(dev_id, req, buf, sizeof(buf), NULL, timeout_s);

	if (ret < 0)
		return ret;
	if (strcmp(buf, "ok")) {
		log_error("ublk%d: %s", dev_id, strncmp(buf, "error: ", 7) ? buf : buf + 7);
		return -EIO;
	}
	return 0;
}

int ublk_dev_resize(int dev_id, uint64_t size)
{
	char req[64];

	snprintf(req, sizeof(req), RESIZE_REQ " %llu", (unsigned long long)size);
	return ok_request(dev_id, req, 120);
}

int ublk_dev_snapshot(int dev_id, enum bdrv_snapshot_op op, const char *name)
{
	size_t len = strlen(name) + 32;
	char *req = malloc(len);
	int ret;

	if (!req)
		return -ENOMEM;
	snprintf(req, len, SNAPSHOT_REQ "%s %s", op == BDRV_SNAPSHOT_DELETE ? "delete" : "create",
		 name);
	/* A snapshot walks every L2 table of the image: allow a big one. */
	ret = ok_request(dev_id, req, 600);
	free(req);
	return ret;
}

/* One message of the list (see snapshot_list_reply) into @e. */
static int parse_snapshot(const char *m, size_t len, struct qcow2_snapshot *e)
{
	unsigned long long clock, vmsize, icount, disk;
	size_t il;
	int hl = -1;

	if (sscanf(m, "%u %u %llu %llu %llu %llu %zu\n%n", &e->date_sec, &e->date_nsec, &clock,
		   &vmsize, &icount, &disk, &il, &hl) != 7 || hl < 0 || il > len - (size_t)hl)
		return -EPROTO;
	e->vm_clock_nsec = clock;
	e->vm_state_size = vmsize;
	e->icount = icount;
	e->disk_size = disk;
	e->id = strndup(m + hl, il);
	e->name = strndup(m + hl + il, len - (size_t)hl - il);
	return e->id && e->name ? 0 : -ENOMEM;
}

int ublk_dev_snapshot_list(int dev_id, struct qcow2_snapshot **out, uint32_t *nout)
{
	/* An entry: its numbers, an id and a name of up to 64 KiB each. */
	size_t max = 256 + 2 * 65536;
	char *buf = malloc(max + 1);
	struct iovec iov = { buf, max };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct qcow2_snapshot *sn = NULL;
	unsigned n = 0;
	int fd, len, ret;

	*out = NULL;
	*nout = 0;
	if (!buf)
		return -ENOMEM;
	fd = sock_connect(dev_id, SNAPSHOT_REQ "list", 120);
	if (fd < 0) {
		free(buf);
		return fd;
	}
	len = sock_answer(fd, dev_id, &mh);
	ret = len < 0 ? len : 0;
	if (ret == 0 && strncmp(buf, "ok ", 3)) {
		log_error("ublk%d: %s", dev_id, strncmp(buf, "error: ", 7) ? buf : buf + 7);
		ret = -EIO;
	} else if (ret == 0 && (sscanf(buf + 3, "%u", &n) != 1 || n > QCOW2_MAX_SNAPSHOTS)) {
		log_error("ublk%d: a bad answer from the daemon: %.40s", dev_id, buf);
		ret = -EPROTO;
	}
	if (ret == 0 && n && !(sn = calloc(n, sizeof(*sn))))
		ret = -ENOMEM;
	for (unsigned i = 0; i < n && ret == 0; i++) {
		len = sock_answer(fd, dev_id, &mh);
		ret = len < 0 ? len : parse_snapshot(buf, (size_t)len, &sn[i]);
		if (ret == -EPROTO)
			log_error("ublk%d: a bad snapshot entry from the daemon", dev_id);
	}
	close(fd);
	free(buf);
	if (ret < 0) {
		qcow2_snapshots_free(sn, n);
		return ret;
	}
	*out = sn;
	*nout = n;
	return 0;
}
