/* SPDX-License-Identifier: MIT */
/*
 * qublk udev NAME: what udev/70-qublk.rules runs (as root) when a ublk
 * device node appears.  An unprivileged device (UBLK_F_UNPRIVILEGED_DEV,
 * 'qublk add --unprivileged') belongs to the user who created it: the
 * driver checks every control command on it against the caller's access
 * to /dev/ublkcN, and lets only that user (uid and gid) open /dev/ublkbN.
 * Nothing else gives the user those nodes: this hands them over (owner
 * and group from GET_DEV_INFO2, mode 0600).  Nodes of devices root
 * created are left as they are.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/util.h"
#include "ublk/ublk.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk udev NAME\n\n"
		"Run by qublk's udev rule (udev/70-qublk.rules) as root for each new ublk\n"
		"device node NAME (ublkcN, ublkbN, ublkbNpM, with or without /dev/): if the\n"
		"device is unprivileged, give its node to the user who created it (mode\n"
		"0600), as the driver expects.  Devices root created are left alone.\n\n"
		"Exit codes: 0 success (or nothing to do), 1 failure, 2 usage error.\n");
}

/* "ublkc3", "ublkb3", "ublkb3p1" -> 3 and whether it is the char device.
 * Returns 0 or -EINVAL. */
static int parse_name(const char *name, unsigned *id, bool *chr)
{
	const char *p;
	char *end;
	unsigned long v;

	if (strncmp(name, "ublkc", 5) && strncmp(name, "ublkb", 5))
		return -EINVAL;
	*chr = name[4] == 'c';
	p = name + 5;
	if (*p < '0' || *p > '9')
		return -EINVAL;
	errno = 0;
	v = strtoul(p, &end, 10);
	if (errno || v > 0x7fffffff)
		return -EINVAL;
	if (*end == 'p' && !*chr && end[1] >= '0' && end[1] <= '9') {
		strtoul(end + 1, &end, 10);   /* a partition of the disk */
	}
	if (*end)
		return -EINVAL;
	*id = (unsigned)v;
	return 0;
}

int cmd_udev(int argc, char **argv)
{
	struct ublksrv_ctrl_dev_info info;
	struct ublk_ctrl ctrl;
	char path[64];
	const char *name;
	struct stat st;
	unsigned id;
	bool chr;
	int ret;

	if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
		usage(stdout);
		return EXIT_OK;
	}
	if (argc != 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	name = argv[1];
	if (!strncmp(name, "/dev/", 5))
		name += 5;
	if (parse_name(name, &id, &chr) < 0) {
		log_error("'%s': not a ublk device node name (ublkcN, ublkbN, ublkbNpM)", argv[1]);
		return EXIT_USAGE;
	}
	snprintf(path, sizeof(path), "/dev/%s", name);
	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	ret = ublk_ctrl_get_info(&ctrl, id, &info);
	ublk_ctrl_close(&ctrl);
	if (ret == -ENODEV)
		return EXIT_OK;   /* gone again already */
	if (ret < 0) {
		log_error("ublk%u: GET_DEV_INFO: %s", id, strerror(-ret));
		return EXIT_FAIL;
	}
	if (!(info.flags & UBLK_F_UNPRIVILEGED_DEV))
		return EXIT_OK;
	/* Only the node the kernel made: a device node of the right kind. */
	if (lstat(path, &st) < 0) {
		log_error("%s: %s", path, strerror(errno));
		return EXIT_FAIL;
	}
	if (chr ? !S_ISCHR(st.st_mode) : !S_ISBLK(st.st_mode)) {
		log_error("%s: not a %s device node: left alone", path, chr ? "character" : "block");
		return EXIT_FAIL;
	}
	if (fchownat(AT_FDCWD, path, info.owner_uid, info.owner_gid, AT_SYMLINK_NOFOLLOW) < 0 ||
	    fchmodat(AT_FDCWD, path, 0600, 0) < 0) {
		log_error("%s: giving it to uid %u gid %u: %s", path, info.owner_uid,
			  info.owner_gid, strerror(errno));
		return EXIT_FAIL;
	}
	return EXIT_OK;
}
