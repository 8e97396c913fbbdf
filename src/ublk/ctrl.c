/* SPDX-License-Identifier: MIT */
/*
 * The ublk control device: each command is one IORING_OP_URING_CMD on a
 * small SQE128 ring over /dev/ublk-control, submitted and waited for
 * synchronously (control commands are rare and may block in the kernel:
 * START_DEV waits for every queue's FETCH commands).
 *
 * Opcode encoding: kernels since 6.3 take ioctl-encoded opcodes
 * (UBLK_U_CMD_*); some builds refuse the legacy numbers.  GET_FEATURES
 * (6.5+) tells us which to use; without it we try the encoded opcode and
 * fall back to the legacy one on -EINVAL/-EOPNOTSUPP.
 *
 * Unprivileged devices (UBLK_F_UNPRIVILEGED_DEV): the driver checks every
 * command on such a device against the caller's access to /dev/ublkcN,
 * whose path must lead the command's buffer (dev_path_len bytes, then the
 * payload).  GET_DEV_INFO2 always takes the path.  dev_cmd() learns with
 * GET_DEV_INFO2 whether a device needs it and adds it.
 *
 * Thread model: a struct ublk_ctrl is used by one thread (the daemon's
 * main thread, or the CLI).
 */
#include "ublk/ublk.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

unsigned ublk_ctrl_opcode(unsigned nr, bool encoded)
{
	if (!encoded)
		return nr;
	switch (nr) {
	case UBLK_CMD_GET_QUEUE_AFFINITY: return UBLK_U_CMD_GET_QUEUE_AFFINITY;
	case UBLK_CMD_GET_DEV_INFO: return UBLK_U_CMD_GET_DEV_INFO;
	case UBLK_CMD_ADD_DEV: return UBLK_U_CMD_ADD_DEV;
	case UBLK_CMD_DEL_DEV: return UBLK_U_CMD_DEL_DEV;
	case UBLK_CMD_START_DEV: return UBLK_U_CMD_START_DEV;
	case UBLK_CMD_STOP_DEV: return UBLK_U_CMD_STOP_DEV;
	case UBLK_CMD_SET_PARAMS: return UBLK_U_CMD_SET_PARAMS;
	case UBLK_CMD_GET_PARAMS: return UBLK_U_CMD_GET_PARAMS;
	case UBLK_CMD_GET_DEV_INFO2: return UBLK_U_CMD_GET_DEV_INFO2;
	case QUBLK_CMD_GET_FEATURES: return UBLK_U_CMD_GET_FEATURES;
	case QUBLK_CMD_DEL_DEV_ASYNC: return UBLK_U_CMD_DEL_DEV_ASYNC;
	case UBLK_CMD_START_USER_RECOVERY: return UBLK_U_CMD_START_USER_RECOVERY;
	case UBLK_CMD_END_USER_RECOVERY: return UBLK_U_CMD_END_USER_RECOVERY;
	case QUBLK_CMD_UPDATE_SIZE: return UBLK_U_CMD_UPDATE_SIZE;
	case QUBLK_CMD_QUIESCE_DEV: return UBLK_U_CMD_QUIESCE_DEV;
	case QUBLK_CMD_TRY_STOP_DEV: return UBLK_U_CMD_TRY_STOP_DEV;
	}
	return nr;
}

void ublk_ctrl_prep(struct io_uring_sqe *sqe, int fd, unsigned op,
		    const struct ublksrv_ctrl_cmd *cmd)
{
	/* A 128-byte SQE: the header goes into the 80-byte cmd area. */
	memset(sqe, 0, 2 * sizeof(*sqe));
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = fd;
	sqe->cmd_op = op;
	memcpy(sqe->cmd, cmd, sizeof(*cmd));
}

unsigned ublk_io_opcode(bool commit, bool encoded)
{
	if (encoded)
		return commit ? UBLK_U_IO_COMMIT_AND_FETCH_REQ : UBLK_U_IO_FETCH_REQ;
	return commit ? UBLK_IO_COMMIT_AND_FETCH_REQ : UBLK_IO_FETCH_REQ;
}

void ublk_io_cmd_prep(struct io_uring_sqe *sqe, int fd, unsigned op, const void *cmd,
		      size_t len)
{
	__u64 user_data = sqe->user_data;   /* set by aio_get_sqe */

	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = fd;
	sqe->cmd_op = op;
	memcpy(sqe->cmd, cmd, len);
	sqe->user_data = user_data;
}

void ublk_io_prep(struct io_uring_sqe *sqe, int fd, unsigned op, unsigned q_id,
		  unsigned tag, int result, uint64_t addr)
{
	struct ublksrv_io_cmd cmd = {
		.q_id = q_id, .tag = tag, .result = result, .addr = addr,
	};

	ublk_io_cmd_prep(sqe, fd, op, &cmd, sizeof(cmd));
}

const char *ublk_state_name(unsigned state)
{
	switch (state) {
	case UBLK_S_DEV_DEAD: return "dead";
	case UBLK_S_DEV_LIVE: return "live";
	case UBLK_S_DEV_QUIESCED: return "quiesced";
	case UBLK_S_DEV_FAIL_IO: return "fail-io";
	}
	return "unknown";
}

static int submit_one(struct ublk_ctrl *c, unsigned op, const struct ublksrv_ctrl_cmd *cmd)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
	struct io_uring_cqe *cqe;
	int ret;

	if (!sqe)
		return -EBUSY;   /* cannot happen: one command at a time */
	ublk_ctrl_prep(sqe, c->fd, op, cmd);
	ret = io_uring_submit(&c->ring);
	if (ret < 0)
		return ret;
	do
		ret = io_uring_wait_cqe(&c->ring, &cqe);
	while (ret == -EINTR);
	if (ret < 0)
		return ret;
	ret = cqe->res;
	io_uring_cqe_seen(&c->ring, cqe);
	return ret;
}

static int ctrl_cmd(struct ublk_ctrl *c, unsigned nr, const struct ublksrv_ctrl_cmd *cmd)
{
	int ret;

	if (c->encode >= 0)
		return submit_one(c, ublk_ctrl_opcode(nr, c->encode), cmd);
	ret = submit_one(c, ublk_ctrl_opcode(nr, true), cmd);
	if (ret == -EINVAL || ret == -EOPNOTSUPP) {
		int legacy = submit_one(c, nr, cmd);
		/* A genuine -EINVAL comes back from both; keep the first. */
		if (legacy != -EINVAL && legacy != -EOPNOTSUPP)
			return legacy;
	}
	return ret;
}

static struct ublksrv_ctrl_cmd mk_cmd(unsigned dev_id, void *buf, size_t len)
{
	struct ublksrv_ctrl_cmd cmd = {
		.dev_id = dev_id,
		.queue_id = (__u16)-1,
		.len = (__u16)len,
		.addr = (__u64)(uintptr_t)buf,
	};
	return cmd;
}

/* GET_DEV_INFO2: the path leads the buffer whatever the device's kind. */
static int get_info2(struct ublk_ctrl *c, unsigned dev_id, struct ublksrv_ctrl_dev_info *info)
{
	struct {
		char path[32];
		struct ublksrv_ctrl_dev_info info;
	} buf;
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, &buf, sizeof(buf));
	int ret;

	memset(&buf, 0, sizeof(buf));
	snprintf(buf.path, sizeof(buf.path), "/dev/ublkc%u", dev_id);
	cmd.dev_path_len = sizeof(buf.path);
	ret = submit_one(c, UBLK_U_CMD_GET_DEV_INFO2, &cmd);
	if (ret >= 0)
		*info = buf.info;
	return ret;
}

static bool dev_is_unpriv(struct ublk_ctrl *c, unsigned dev_id)
{
	struct ublksrv_ctrl_dev_info info;

	if (c->known_id == (int)dev_id)
		return c->known_unpriv;
	/* Before GET_DEV_INFO2 (6.5) there were no unprivileged devices. */
	if (!c->have_features || get_info2(c, dev_id, &info) < 0)
		return false;
	c->known_id = (int)dev_id;
	c->known_unpriv = info.flags & UBLK_F_UNPRIVILEGED_DEV;
	return c->known_unpriv;
}

/* A command on device @dev_id with an IN/OUT buffer (may be NULL) and
 * inline data; the device path goes first where the driver wants it. */
static int dev_cmd(struct ublk_ctrl *c, unsigned nr, unsigned dev_id, void *buf, size_t len,
		   uint64_t data)
{
	char path[32];
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, buf, len);
	uint8_t *tmp;
	size_t plen;
	int ret;

	cmd.data[0] = data;
	if (!dev_is_unpriv(c, dev_id))
		return ctrl_cmd(c, nr, &cmd);
	snprintf(path, sizeof(path), "/dev/ublkc%u", dev_id);
	plen = strlen(path) + 1;
	tmp = malloc(plen + len);
	if (!tmp)
		return -ENOMEM;
	memcpy(tmp, path, plen);
	if (len)
		memcpy(tmp + plen, buf, len);
	cmd.addr = (uint64_t)(uintptr_t)tmp;
	cmd.len = (uint16_t)(plen + len);
	cmd.dev_path_len = (uint16_t)plen;
	ret = ctrl_cmd(c, nr, &cmd);
	if (ret >= 0 && len)
		memcpy(buf, tmp + plen, len);
	free(tmp);
	return ret;
}

static int probe_features(struct ublk_ctrl *c)
{
	uint64_t f = 0;
	struct ublksrv_ctrl_cmd cmd = mk_cmd((unsigned)-1, &f, sizeof(f));
	int ret;

	ret = submit_one(c, UBLK_U_CMD_GET_FEATURES, &cmd);
	if (ret == -EINVAL || ret == -EOPNOTSUPP)
		ret = submit_one(c, QUBLK_CMD_GET_FEATURES, &cmd);
	if (ret < 0) {
		/* Before 6.5: no probe; ctrl_cmd tries both encodings. */
		log_debug("ublk: GET_FEATURES: %s; assuming an old driver", strerror(-ret));
		c->encode = -1;
		return 0;
	}
	c->features = f;
	c->have_features = true;
	c->encode = (f & UBLK_F_CMD_IOCTL_ENCODE) ? 1 : 0;
	log_debug("ublk: driver features 0x%llx", (unsigned long long)f);
	return 0;
}

int ublk_ctrl_open(struct ublk_ctrl *c)
{
	int ret;

	memset(c, 0, sizeof(*c));
	c->encode = -1;
	c->known_id = -1;
	c->fd = open(UBLK_CONTROL_PATH, O_RDWR | O_CLOEXEC);
	if (c->fd < 0) {
		ret = -errno;
		log_error("%s: cannot open: %s%s", UBLK_CONTROL_PATH, strerror(errno),
			  errno == ENOENT ? " (is the ublk_drv module loaded?)" :
			  errno == EACCES ? " (qublk's udev rules, 60-qublk.rules, let group disk use it)" : "");
		return ret;
	}
	ret = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
	if (ret < 0) {
		log_error("%s: io_uring with 128-byte SQEs: %s", UBLK_CONTROL_PATH, strerror(-ret));
		close(c->fd);
		c->fd = -1;
		return ret;
	}
	return probe_features(c);
}

void ublk_ctrl_close(struct ublk_ctrl *c)
{
	if (c->fd < 0)
		return;
	io_uring_queue_exit(&c->ring);
	close(c->fd);
	c->fd = -1;
}

int ublk_ctrl_add_dev(struct ublk_ctrl *c, struct ublksrv_ctrl_dev_info *info)
{
	/* The header's dev_id must match info->dev_id (-1: any free id).
	 * No path: there is no device yet. */
	struct ublksrv_ctrl_cmd cmd = mk_cmd(info->dev_id, info, sizeof(*info));
	int ret = ctrl_cmd(c, UBLK_CMD_ADD_DEV, &cmd);

	if (ret >= 0) {
		c->known_id = (int)info->dev_id;
		c->known_unpriv = info->flags & UBLK_F_UNPRIVILEGED_DEV;
	}
	return ret;
}

int ublk_ctrl_set_params(struct ublk_ctrl *c, unsigned dev_id, const struct ublk_params *p)
{
	struct ublk_params tmp = *p;

	return dev_cmd(c, UBLK_CMD_SET_PARAMS, dev_id, &tmp, p->len, 0);
}

int ublk_ctrl_get_params(struct ublk_ctrl *c, unsigned dev_id, struct ublk_params *p)
{
	memset(p, 0, sizeof(*p));
	p->len = sizeof(*p);
	p->types = UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD | UBLK_PARAM_TYPE_DEVT;
	return dev_cmd(c, UBLK_CMD_GET_PARAMS, dev_id, p, sizeof(*p), 0);
}

int ublk_ctrl_start_dev(struct ublk_ctrl *c, unsigned dev_id, int pid)
{
	return dev_cmd(c, UBLK_CMD_START_DEV, dev_id, NULL, 0, (uint64_t)pid);
}

int ublk_ctrl_stop_dev(struct ublk_ctrl *c, unsigned dev_id)
{
	return dev_cmd(c, UBLK_CMD_STOP_DEV, dev_id, NULL, 0, 0);
}

int ublk_ctrl_del_dev(struct ublk_ctrl *c, unsigned dev_id)
{
	int ret = -EOPNOTSUPP;

	/* DEL_DEV waits for the last opener of /dev/ublkbN: a device stopped
	 * under a mounted file system (del --force, a dead daemon) would hang
	 * us until the unmount.  DEL_DEV_ASYNC (6.9+, encoded only) removes
	 * it and lets the kernel free it then; with no opener left the two
	 * are the same (the number is free on return). */
	if (c->have_features)
		ret = dev_cmd(c, QUBLK_CMD_DEL_DEV_ASYNC, dev_id, NULL, 0, 0);
	if (ret == -EOPNOTSUPP || ret == -EINVAL)
		ret = dev_cmd(c, UBLK_CMD_DEL_DEV, dev_id, NULL, 0, 0);

	if (ret >= 0 && c->known_id == (int)dev_id)
		c->known_id = -1;
	return ret;
}

int ublk_ctrl_get_info(struct ublk_ctrl *c, unsigned dev_id, struct ublksrv_ctrl_dev_info *info)
{
	memset(info, 0, sizeof(*info));
	/* GET_DEV_INFO2 answers for both kinds of device (6.5+). */
	if (c->have_features) {
		int ret = get_info2(c, dev_id, info);
		if (ret >= 0) {
			c->known_id = (int)dev_id;
			c->known_unpriv = info->flags & UBLK_F_UNPRIVILEGED_DEV;
		}
		if (ret != -EINVAL && ret != -EOPNOTSUPP)
			return ret;
	}
	return dev_cmd(c, UBLK_CMD_GET_DEV_INFO, dev_id, info, sizeof(*info), 0);
}

int ublk_ctrl_start_recovery(struct ublk_ctrl *c, unsigned dev_id)
{
	return dev_cmd(c, UBLK_CMD_START_USER_RECOVERY, dev_id, NULL, 0, 0);
}

int ublk_ctrl_end_recovery(struct ublk_ctrl *c, unsigned dev_id, int pid)
{
	return dev_cmd(c, UBLK_CMD_END_USER_RECOVERY, dev_id, NULL, 0, (uint64_t)pid);
}

/* Commands that only exist ioctl-encoded (6.15+): a driver without them
 * answers -EOPNOTSUPP (or -EINVAL from older dispatchers). */
static int new_cmd(struct ublk_ctrl *c, unsigned nr, uint64_t feature, unsigned dev_id,
		   uint64_t data)
{
	int ret;

	if (c->have_features && !(c->features & feature))
		return -EOPNOTSUPP;
	ret = dev_cmd(c, nr, dev_id, NULL, 0, data);
	return ret == -EINVAL && !c->have_features ? -EOPNOTSUPP : ret;
}

int ublk_ctrl_update_size(struct ublk_ctrl *c, unsigned dev_id, uint64_t bytes)
{
	return new_cmd(c, QUBLK_CMD_UPDATE_SIZE, UBLK_F_UPDATE_SIZE, dev_id, bytes >> 9);
}

int ublk_ctrl_quiesce(struct ublk_ctrl *c, unsigned dev_id, unsigned timeout_ms)
{
	return new_cmd(c, QUBLK_CMD_QUIESCE_DEV, UBLK_F_QUIESCE, dev_id, timeout_ms);
}

int ublk_ctrl_try_stop_dev(struct ublk_ctrl *c, unsigned dev_id)
{
	return new_cmd(c, QUBLK_CMD_TRY_STOP_DEV, UBLK_F_SAFE_STOP_DEV, dev_id, 0);
}

int ublk_ctrl_get_queue_affinity(struct ublk_ctrl *c, unsigned dev_id, unsigned q_id,
				 cpu_set_t *set)
{
	CPU_ZERO(set);
	return dev_cmd(c, UBLK_CMD_GET_QUEUE_AFFINITY, dev_id, set, sizeof(*set), q_id);
}
