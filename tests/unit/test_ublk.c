/* SPDX-License-Identifier: MIT */
/* Unit tests for the parts of the ublk frontend that need no kernel
 * driver: uapi layout and opcode encoding, control/IO SQE preparation,
 * the request boundary check, SET_PARAMS building, state files and the
 * target table.  The driver itself is exercised in the VM (tests/vm). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/util.h"
#include "ublk/ublk.h"

#include "check.h"


static void test_opcodes(void)
{
	CHECK(ublk_ctrl_opcode(UBLK_CMD_ADD_DEV, false) == 0x04);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_ADD_DEV, true) == 0xc0207504u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_GET_DEV_INFO, true) == 0x80207502u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_START_DEV, true) == 0xc0207506u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_STOP_DEV, true) == 0xc0207507u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_DEL_DEV, true) == 0xc0207505u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_SET_PARAMS, true) == 0xc0207508u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_GET_PARAMS, true) == 0x80207509u);
	CHECK(ublk_ctrl_opcode(QUBLK_CMD_GET_FEATURES, true) == 0x80207513u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_START_USER_RECOVERY, true) == 0xc0207510u);
	CHECK(ublk_ctrl_opcode(UBLK_CMD_END_USER_RECOVERY, true) == 0xc0207511u);
	CHECK(ublk_ctrl_opcode(QUBLK_CMD_UPDATE_SIZE, true) == 0xc0207515u);
	CHECK(ublk_ctrl_opcode(QUBLK_CMD_QUIESCE_DEV, true) == 0xc0207516u);
	CHECK(ublk_ctrl_opcode(QUBLK_CMD_TRY_STOP_DEV, true) == 0xc0207517u);
	CHECK(ublk_io_opcode(false, false) == 0x20);
	CHECK(ublk_io_opcode(true, false) == 0x21);
	CHECK(ublk_io_opcode(false, true) == 0xc0107520u);
	CHECK(ublk_io_opcode(true, true) == 0xc0107521u);
}

static void test_prep(void)
{
	struct io_uring_sqe sqe[2];
	struct ublksrv_ctrl_cmd cmd = { .dev_id = 7, .queue_id = 0xffff, .len = 64,
					.addr = 0x1234, .data = { 99 },
					.dev_path_len = 12 };
	struct ublksrv_io_cmd io;

	memset(sqe, 0xaa, sizeof(sqe));
	ublk_ctrl_prep(sqe, 5, UBLK_U_CMD_START_DEV, &cmd);
	CHECK(sqe[0].opcode == IORING_OP_URING_CMD);
	CHECK(sqe[0].fd == 5);
	CHECK(sqe[0].cmd_op == UBLK_U_CMD_START_DEV);
	CHECK(sqe[0].flags == 0 && sqe[0].user_data == 0);
	CHECK(memcmp(sqe[0].cmd, &cmd, sizeof(cmd)) == 0);
	/* cmd area starts at byte 48 and runs 80 bytes into the second half */
	CHECK((size_t)((uint8_t *)sqe[0].cmd - (uint8_t *)&sqe[0]) == 48);

	memset(sqe, 0xaa, sizeof(sqe));
	sqe[0].user_data = 0xdeadbeef;
	ublk_io_prep(sqe, 9, UBLK_U_IO_COMMIT_AND_FETCH_REQ, 1, 17, -EIO, 0x5000);
	CHECK(sqe[0].user_data == 0xdeadbeef);   /* aio's tag survives */
	CHECK(sqe[0].opcode == IORING_OP_URING_CMD && sqe[0].fd == 9);
	CHECK(sqe[0].cmd_op == UBLK_U_IO_COMMIT_AND_FETCH_REQ);
	memcpy(&io, sqe[0].cmd, sizeof(io));
	CHECK(io.q_id == 1 && io.tag == 17 && io.result == -EIO && io.addr == 0x5000);
	CHECK(sqe[0].flags == 0 && sqe[0].ioprio == 0);
}

static struct ublksrv_io_desc iod(unsigned op, unsigned flags, uint64_t sector, uint32_t nr)
{
	struct ublksrv_io_desc d = { .op_flags = op | flags, .nr_sectors = nr,
				     .start_sector = sector };
	return d;
}

static void test_check_iod(void)
{
	const uint64_t size = 1 << 20;   /* 2048 sectors */
	const uint32_t max_io = 512 * 1024;
	struct ublksrv_io_desc d;
	uint64_t off;
	uint32_t len;

	d = iod(UBLK_IO_OP_READ, 0, 8, 8);
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == UBLK_IO_OP_READ);
	CHECK(off == 4096 && len == 4096);
	d = iod(UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, 2040, 8);   /* ends exactly at the end */
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == UBLK_IO_OP_WRITE);
	d = iod(UBLK_IO_OP_WRITE, 0, 2041, 8);               /* one sector past */
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == -EINVAL);
	d = iod(UBLK_IO_OP_READ, 0, 0, 0);
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == -EINVAL);
	d = iod(UBLK_IO_OP_READ, 0, UINT64_MAX >> 9, 1);      /* offset overflow */
	CHECK(ublk_check_iod(&d, UINT64_MAX, max_io, false, &off, &len) == -EINVAL);
	d = iod(UBLK_IO_OP_READ, 0, UINT64_MAX, 1);
	CHECK(ublk_check_iod(&d, UINT64_MAX, max_io, false, &off, &len) == -EINVAL);
	d = iod(UBLK_IO_OP_READ, 0, 0, max_io / 512 + 1);     /* bigger than the buffer */
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == -EINVAL);
	d = iod(UBLK_IO_OP_DISCARD, 0, 0, 2048);             /* discard may exceed it */
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == UBLK_IO_OP_DISCARD);
	CHECK(len == size);
	d = iod(UBLK_IO_OP_FLUSH, 0, 0, 0);
	CHECK(ublk_check_iod(&d, size, max_io, true, &off, &len) == UBLK_IO_OP_FLUSH);
	d = iod(UBLK_IO_OP_WRITE_SAME, 0, 0, 8);
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == -EOPNOTSUPP);
	d = iod(0x77, 0, 0, 8);
	CHECK(ublk_check_iod(&d, size, max_io, false, &off, &len) == -EOPNOTSUPP);
	/* read-only: reads pass, everything that changes data is refused */
	d = iod(UBLK_IO_OP_READ, 0, 0, 8);
	CHECK(ublk_check_iod(&d, size, max_io, true, &off, &len) == UBLK_IO_OP_READ);
	d = iod(UBLK_IO_OP_WRITE, 0, 0, 8);
	CHECK(ublk_check_iod(&d, size, max_io, true, &off, &len) == -EROFS);
	d = iod(UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP, 0, 8);
	CHECK(ublk_check_iod(&d, size, max_io, true, &off, &len) == -EROFS);
	d = iod(UBLK_IO_OP_DISCARD, 0, 0, 8);
	CHECK(ublk_check_iod(&d, size, max_io, true, &off, &len) == -EROFS);
}

static void test_params(void)
{
	struct ublk_tgt t = { .ops = ublk_tgt_find("qcow2"), .size = 10ull << 30,
			      .cluster_size = 65536, .unmap = true };
	struct ublk_params p;

	CHECK(t.ops != NULL);
	ublk_build_params(&p, &t, 512 * 1024, false);
	CHECK(p.len == 60);
	CHECK(p.types == (UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD));
	CHECK(p.basic.attrs == (UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA));
	CHECK(p.basic.logical_bs_shift == 9 && p.basic.physical_bs_shift == 12);
	CHECK(p.basic.io_min_shift == 16 && p.basic.io_opt_shift == 16);
	CHECK(p.basic.max_sectors == 1024);
	CHECK(p.basic.dev_sectors == (10ull << 30) >> 9);
	CHECK(p.basic.chunk_sectors == 0);
	CHECK(p.discard.discard_granularity == 65536);
	CHECK(p.discard.max_discard_segments == 1);
	CHECK(p.discard.max_discard_sectors > 0 && p.discard.max_write_zeroes_sectors > 0);
	CHECK(p.discard.discard_alignment == 0);

	/* --discard ignore: write-zeroes only (fstrim: "not supported") */
	t.unmap = false;
	ublk_build_params(&p, &t, 512 * 1024, false);
	CHECK(p.types == (UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD));
	CHECK(p.discard.max_discard_sectors == 0 && p.discard.max_write_zeroes_sectors > 0);
	CHECK(p.discard.discard_granularity == 65536);
	t.unmap = true;

	/* small clusters: never below the physical block; read-only: no
	 * discard and no write-zeroes */
	t.cluster_size = 512;
	ublk_build_params(&p, &t, 1 << 20, true);
	CHECK(p.basic.io_min_shift == 12);
	CHECK(p.basic.attrs & UBLK_ATTR_READ_ONLY);
	CHECK(p.types == UBLK_PARAM_TYPE_BASIC);
	CHECK(p.discard.max_discard_sectors == 0 && p.discard.max_write_zeroes_sectors == 0);
	CHECK(p.basic.max_sectors == 2048);
	ublk_build_params(&p, &t, 1 << 20, false);
	CHECK(p.discard.discard_granularity == 4096);

	/* raw: no cluster size */
	t.ops = ublk_tgt_find("raw");
	t.cluster_size = 0;
	ublk_build_params(&p, &t, 512 * 1024, false);
	CHECK(p.basic.io_opt_shift == 12);
	CHECK(!(p.basic.attrs & UBLK_ATTR_READ_ONLY));
}

static void test_targets(void)
{
	struct ublk_tgt t = { 0 };
	struct ublk_tgt_opts o = { .size = (1 << 20) + 100 };

	CHECK(ublk_tgt_find("qcow2") && ublk_tgt_find("raw") && ublk_tgt_find("null"));
	CHECK(ublk_tgt_find("vmdk") == NULL);
	t.ops = ublk_tgt_find("null");
	CHECK(t.ops->open(&t, &o) == 0);
	CHECK(t.size == 1 << 20 && t.can_multiqueue);
	t.ops->close(&t);
	o.size = 100;
	CHECK(t.ops->open(&t, &o) == -EINVAL);
	/* an engine target without a file is refused, not crashed */
	t.ops = ublk_tgt_find("raw");
	o.file = NULL;
	CHECK(t.ops->open(&t, &o) == -EINVAL);
}

static void test_features(void)
{
	const struct ublk_feature *f;
	uint64_t seen = 0, all = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE |
		UBLK_F_UNPRIVILEGED_DEV | UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_UPDATE_SIZE |
		UBLK_F_QUIESCE | UBLK_F_SAFE_STOP_DEV | UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG |
		UBLK_F_BATCH_IO;
	size_t n;

	/* One entry per bit, in bit order, every name distinct. */
	f = ublk_feature_table(&n);
	CHECK(n == 21);
	for (size_t i = 0; i < n; i++) {
		CHECK(f[i].bit == 1ULL << i);
		CHECK(f[i].name && *f[i].name);
		for (size_t j = 0; j < i; j++)
			CHECK(strcmp(f[i].name, f[j].name) != 0);
		seen |= f[i].bit;
	}
	CHECK(seen == (1ULL << 21) - 1);
	CHECK(!strcmp(ublk_feature_name(UBLK_F_USER_RECOVERY_REISSUE), "user_recovery_reissue"));
	CHECK(!strcmp(ublk_feature_name(UBLK_F_SAFE_STOP_DEV), "safe_stop_dev"));
	CHECK(ublk_feature_name(1ULL << 40) == NULL);
	CHECK(ublk_features_used() == (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE |
				       UBLK_F_UNPRIVILEGED_DEV | UBLK_F_CMD_IOCTL_ENCODE |
				       UBLK_F_UPDATE_SIZE | UBLK_F_QUIESCE | UBLK_F_SAFE_STOP_DEV |
				       UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY | UBLK_F_BATCH_IO));
	/* 'qublk features' says "uses" for exactly the bits a device may be
	 * created with (each has its command: add, recover, upgrade,
	 * resize, del, add --unprivileged; zero copy for add). */
	CHECK(ublk_features_used() ==
	      (ublk_dev_flags(~0ULL, false, true) | ublk_dev_flags(~0ULL, true, true)));

	/* Device flags: only what is offered; recovery never for
	 * unprivileged devices; quiesce and reissue only with recovery;
	 * zero copy only when asked, privileged, and both bits offered;
	 * batched commands whenever offered. */
	CHECK(ublk_dev_flags(0, false, true) == 0);
	CHECK(ublk_dev_flags(all, false, false) ==
	      (all & ~(UBLK_F_UNPRIVILEGED_DEV | UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG)));
	CHECK(ublk_dev_flags(all, false, true) == (all & ~UBLK_F_UNPRIVILEGED_DEV));
	CHECK(ublk_dev_flags(all, true, true) == (UBLK_F_UNPRIVILEGED_DEV | UBLK_F_CMD_IOCTL_ENCODE |
						  UBLK_F_UPDATE_SIZE | UBLK_F_SAFE_STOP_DEV |
						  UBLK_F_BATCH_IO));
	CHECK(ublk_dev_flags(UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_QUIESCE, false, true) == 0);
	/* the 6.12 set: user copy alone is not zero copy, and is used only
	 * on request (QUBLK_USER_COPY=1), privileged, with zero copy allowed */
	const uint64_t v612 = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE |
			      UBLK_F_UNPRIVILEGED_DEV | UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_COPY;
	const uint64_t f612 = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE |
			      UBLK_F_CMD_IOCTL_ENCODE;
	unsetenv("QUBLK_USER_COPY");
	CHECK(!ublk_user_copy_alone());
	CHECK(ublk_dev_flags(v612, false, true) == f612);
	setenv("QUBLK_USER_COPY", "yes", 1);
	CHECK(!ublk_user_copy_alone());
	setenv("QUBLK_USER_COPY", "1", 1);
	CHECK(ublk_user_copy_alone());
	CHECK(ublk_dev_flags(v612, false, true) == (f612 | UBLK_F_USER_COPY));
	CHECK(ublk_dev_flags(v612, false, false) == f612);
	CHECK(ublk_dev_flags(v612, true, true) ==
	      (UBLK_F_UNPRIVILEGED_DEV | UBLK_F_CMD_IOCTL_ENCODE));
	/* with auto_buf_reg offered, the request changes nothing */
	CHECK(ublk_dev_flags(all, false, true) == (all & ~UBLK_F_UNPRIVILEGED_DEV));
	unsetenv("QUBLK_USER_COPY");
	CHECK(ublk_dev_flags(UBLK_F_AUTO_BUF_REG, false, true) == 0);
}

static void test_state(void)
{
	char dir[] = "/dev/shm/qublk-test-ublk-XXXXXX";
	struct ublk_state s = { .dev_id = 3, .pid = 4242, .queues = 2, .depth = 64,
				.read_only = true, .direct = true, .size = 1ULL << 40,
				.flags = UBLK_F_USER_RECOVERY | UBLK_F_QUIESCE,
				.discard = UBLK_DISCARD_IGNORE }, r;

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		failed++;
		return;
	}
	setenv("QUBLK_RUN_DIR", dir, 1);
	snprintf(s.target, sizeof(s.target), "raw");
	snprintf(s.image, sizeof(s.image), "/images/a b=c.img");
	CHECK(ublk_state_write(&s) == 0);
	CHECK(ublk_state_read(3, &r) == 0);
	CHECK(r.dev_id == 3 && r.pid == 4242 && r.queues == 2 && r.depth == 64 && r.read_only);
	CHECK(r.direct && !r.force_share && r.size == 1ULL << 40 &&
	      r.flags == (UBLK_F_USER_RECOVERY | UBLK_F_QUIESCE));
	CHECK(!strcmp(r.target, "raw") && !strcmp(r.image, "/images/a b=c.img"));
	CHECK(r.discard == UBLK_DISCARD_IGNORE);
	s.discard = UBLK_DISCARD_UNMAP;
	CHECK(ublk_state_write(&s) == 0 && ublk_state_read(3, &r) == 0);
	CHECK(r.discard == UBLK_DISCARD_UNMAP);
	/* a state file from before --discard: AUTO, resolved as add would */
	s.discard = UBLK_DISCARD_AUTO;
	CHECK(ublk_state_write(&s) == 0 && ublk_state_read(3, &r) == 0);
	CHECK(r.discard == UBLK_DISCARD_AUTO);
	ublk_state_remove(3);
	CHECK(ublk_state_read(3, &r) == -ENOENT);
	rmdir(dir);
	unsetenv("QUBLK_RUN_DIR");
}

int main(void)
{
	log_set_prog("test_ublk");
	test_opcodes();
	test_prep();
	test_check_iod();
	test_params();
	test_targets();
	test_features();
	test_state();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
