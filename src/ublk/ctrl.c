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
 * Thread model: a struct ublk_ctrl is used by one thread (the daemon's
 * main thread, or the CLI).
 */
#include "ublk/ublk.h"

#include <errno.h>
#include <fcntl.h>
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

void ublk_io_prep(struct io_uring_sqe *sqe, int fd, unsigned op, unsigned q_id,
		  unsigned tag, int result, uint64_t addr)
{
	/* A 64-byte SQE: the 16-byte io command fits its cmd area. */
	struct ublksrv_io_cmd cmd = {
		.q_id = q_id, .tag = tag, .result = result, .addr = addr,
	};
	__u64 user_data = sqe->user_data;   /* set by aio_get_sqe */

	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = fd;
	sqe->cmd_op = op;
	memcpy(sqe->cmd, &cmd, sizeof(cmd));
	sqe->user_data = user_data;
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
	c->fd = open(UBLK_CONTROL_PATH, O_RDWR | O_CLOEXEC);
	if (c->fd < 0) {
		ret = -errno;
		log_error("%s: cannot open: %s%s", UBLK_CONTROL_PATH, strerror(errno),
			  errno == ENOENT ? " (is the ublk_drv module loaded?)" : "");
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
	/* The header's dev_id must match info->dev_id (-1: any free id). */
	struct ublksrv_ctrl_cmd cmd = mk_cmd(info->dev_id, info, sizeof(*info));

	return ctrl_cmd(c, UBLK_CMD_ADD_DEV, &cmd);
}

int ublk_ctrl_set_params(struct ublk_ctrl *c, unsigned dev_id, const struct ublk_params *p)
{
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, (void *)p, p->len);

	return ctrl_cmd(c, UBLK_CMD_SET_PARAMS, &cmd);
}

int ublk_ctrl_get_params(struct ublk_ctrl *c, unsigned dev_id, struct ublk_params *p)
{
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, p, sizeof(*p));

	memset(p, 0, sizeof(*p));
	p->len = sizeof(*p);
	p->types = UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD | UBLK_PARAM_TYPE_DEVT;
	return ctrl_cmd(c, UBLK_CMD_GET_PARAMS, &cmd);
}

int ublk_ctrl_start_dev(struct ublk_ctrl *c, unsigned dev_id, int pid)
{
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, NULL, 0);

	cmd.data[0] = (__u64)pid;
	return ctrl_cmd(c, UBLK_CMD_START_DEV, &cmd);
}

int ublk_ctrl_stop_dev(struct ublk_ctrl *c, unsigned dev_id)
{
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, NULL, 0);

	return ctrl_cmd(c, UBLK_CMD_STOP_DEV, &cmd);
}

int ublk_ctrl_del_dev(struct ublk_ctrl *c, unsigned dev_id)
{
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, NULL, 0);

	return ctrl_cmd(c, UBLK_CMD_DEL_DEV, &cmd);
}

int ublk_ctrl_get_info(struct ublk_ctrl *c, unsigned dev_id, struct ublksrv_ctrl_dev_info *info)
{
	struct ublksrv_ctrl_cmd cmd = mk_cmd(dev_id, info, sizeof(*info));

	memset(info, 0, sizeof(*info));
	return ctrl_cmd(c, UBLK_CMD_GET_DEV_INFO, &cmd);
}
