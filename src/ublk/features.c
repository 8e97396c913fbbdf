/* SPDX-License-Identifier: MIT */
/*
 * The ublk driver's feature bits by name, and which of them qublk uses.
 *
 * GET_FEATURES (6.5+) returns the UBLK_F_* bits the driver knows; ADD_DEV
 * takes the subset a device is created with.  qublk asks for what it uses
 * and the driver offers, and never assumes a bit it did not see: the
 * daemon, `qublk features`, `list`, `recover`, `resize` and `del` all
 * decide from these bits.
 *
 * Pure data and pure functions: any thread.
 */
#include "ublk/ublk.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

/* Bit order; names are the UBLK_F_ suffixes in lower case. */
static const struct ublk_feature features[] = {
	{ UBLK_F_SUPPORT_ZERO_COPY, "zero_copy", NULL },
	{ UBLK_F_URING_CMD_COMP_IN_TASK, "uring_cmd_comp_in_task", NULL },
	{ UBLK_F_NEED_GET_DATA, "need_get_data", NULL },
	{ UBLK_F_USER_RECOVERY, "user_recovery",
	  "the device outlives its daemon: 'qublk recover', 'qublk upgrade'" },
	{ UBLK_F_USER_RECOVERY_REISSUE, "user_recovery_reissue",
	  "requests a dead daemon held are reissued to the next one, not failed" },
	{ UBLK_F_UNPRIVILEGED_DEV, "unprivileged_dev",
	  "'qublk add --unprivileged' (the default for non-root users)" },
	{ UBLK_F_CMD_IOCTL_ENCODE, "cmd_ioctl_encode", "ioctl-encoded command opcodes" },
	{ UBLK_F_USER_COPY, "user_copy",
	  "with auto_buf_reg: the few requests whose data qublk itself must touch; "
	  "alone (no auto_buf_reg) with QUBLK_USER_COPY=1: every request's data" },
	{ UBLK_F_ZONED, "zoned", NULL },
	{ UBLK_F_USER_RECOVERY_FAIL_IO, "user_recovery_fail_io", NULL },
	{ UBLK_F_UPDATE_SIZE, "update_size", "'qublk resize -n ID SIZE' on a live device" },
	{ UBLK_F_AUTO_BUF_REG, "auto_buf_reg",
	  "zero copy: image reads and writes use the request's own pages" },
	{ UBLK_F_QUIESCE, "quiesce",
	  "'qublk upgrade': the old daemon hands over without being killed" },
	{ UBLK_F_PER_IO_DAEMON, "per_io_daemon", NULL },
	{ UBLK_F_BUF_REG_OFF_DAEMON, "buf_reg_off_daemon", NULL },
	{ UBLK_F_BATCH_IO, "batch_io",
	  "each queue fetches and commits requests in batches (add --no-batch: not)" },
	{ UBLK_F_INTEGRITY, "integrity", NULL },
	{ UBLK_F_SAFE_STOP_DEV, "safe_stop_dev",
	  "'qublk del' refuses while the device is open or mounted" },
	{ UBLK_F_NO_AUTO_PART_SCAN, "no_auto_part_scan", NULL },
	{ UBLK_F_SHMEM_ZC, "shmem_zc", NULL },
	{ UBLK_F_IO_DESC_SIZE, "io_desc_size", NULL },
};

const struct ublk_feature *ublk_feature_table(size_t *n)
{
	*n = ARRAY_SIZE(features);
	return features;
}

const char *ublk_feature_name(uint64_t bit)
{
	for (size_t i = 0; i < ARRAY_SIZE(features); i++)
		if (features[i].bit == bit)
			return features[i].name;
	return NULL;
}

uint64_t ublk_features_used(void)
{
	uint64_t m = 0;

	for (size_t i = 0; i < ARRAY_SIZE(features); i++)
		if (features[i].use)
			m |= features[i].bit;
	return m;
}

bool ublk_user_copy_alone(void)
{
	const char *v = getenv("QUBLK_USER_COPY");

	return v && !strcmp(v, "1");
}

uint64_t ublk_dev_flags(uint64_t offered, bool unprivileged, bool zero_copy)
{
	const uint64_t zc = UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY;
	uint64_t f = UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_UPDATE_SIZE | UBLK_F_SAFE_STOP_DEV;

	if (unprivileged) {
		/* The driver refuses recovery for unprivileged devices (a
		 * user's daemon could hold the kernel's error handling). */
		f |= UBLK_F_UNPRIVILEGED_DEV;
	} else {
		f |= UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
		/* QUIESCE is only valid with recovery. */
		if (offered & UBLK_F_USER_RECOVERY)
			f |= UBLK_F_QUIESCE;
	}
	/* Zero copy: the driver registers each request's pages in the
	 * queue's ring (AUTO_BUF_REG); what the daemon must read or write
	 * itself, it copies (USER_COPY).  Both or neither; the driver
	 * refuses either for unprivileged devices. */
	if (zero_copy && !unprivileged && (offered & zc) == zc)
		f |= zc;
	/* User copy alone, where the driver has no zero copy (6.12), on
	 * request: one copy instead of two for requests whose image range
	 * is in memory and mapped (io_map.h), a system call more for the
	 * others (README, "User copy on 6.12").  A device recovered later
	 * keeps what its flags say, whatever the new daemon's environment. */
	else if (zero_copy && !unprivileged && !(offered & UBLK_F_AUTO_BUF_REG) &&
		 ublk_user_copy_alone())
		f |= UBLK_F_USER_COPY;
	/* Batched fetch and commit, with zero copy or without. */
	f |= UBLK_F_BATCH_IO;
	/* REISSUE implies RECOVERY: never ask for one without the other. */
	if (!(offered & UBLK_F_USER_RECOVERY))
		f &= ~(UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_QUIESCE);
	return f & offered;
}
