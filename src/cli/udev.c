/* SPDX-License-Identifier: MIT */
/*
 * qublk udev-id: the properties udev imports for a ublk device
 * (IMPORT{program} in udev/60-qublk.rules).
 *
 * The image ID (ID_SERIAL, the /dev/disk/by-id/ublk-qublk-ID link) comes
 * from the daemon's state file: the image's absolute path, lexically
 * normalised ("//", "." and ".." removed, symlinks kept: `realpath -s`)
 * and escaped as `systemd-escape --path` escapes it, so that a user can
 * compute it and it is one file name.  The ownership of an unprivileged
 * device comes from the driver (GET_DEV_INFO2 owner_uid/owner_gid): it
 * does not need a state file, which the daemon of an unprivileged device
 * may keep elsewhere.
 *
 * The first uevent of a device comes at START_DEV, before the daemon has
 * written its state file; a state file whose pid is not the device's
 * daemon is stale or from the previous daemon.  In both cases no ID is
 * printed: the daemon's "change" uevent once it is live
 * (src/ublk/notify.c) runs the rules again.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/util.h"
#include "ublk/ublk.h"

/* Room for the link "ublk-qublk-ID-partNNN" in one file name (255). */
#define UDEV_ID_MAX 200

static void udev_id_usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk udev-id DEVICE\n\n"
		"Print, as KEY=VALUE lines for udev's IMPORT{program}, what the udev rules\n"
		"need about ublk device DEVICE (ublkbN, ublkbNpM, ublkcN or a /dev path):\n"
		"  QUBLK_DEV_ID=N\n"
		"  ID_SERIAL=ID            the image's ID: its absolute path as the daemon\n"
		"                          has it (realpath -s), escaped as by\n"
		"                          'systemd-escape --path' (from the state file in\n"
		"                          %s; not printed before the daemon wrote it)\n"
		"  QUBLK_TARGET=qcow2|raw, QUBLK_READ_ONLY=0|1   (from the state file)\n"
		"  QUBLK_UNPRIVILEGED=1, QUBLK_OWNER_UID=U, QUBLK_OWNER_GID=G\n"
		"                          an unprivileged device's owner (from the driver)\n\n"
		"  -h, --help     show this help\n\n"
		"Exit codes: 0 success (what is known printed), 1 no such device, 2 usage error.\n",
		ublk_run_dir());
}

int udev_parse_name(const char *name, unsigned *id)
{
	unsigned long n;
	char *end;

	if (!strncmp(name, "/dev/", 5))
		name += 5;
	if (strncmp(name, "ublkb", 5) && strncmp(name, "ublkc", 5))
		return -EINVAL;
	if (name[5] < '0' || name[5] > '9')
		return -EINVAL;
	errno = 0;
	n = strtoul(name + 5, &end, 10);
	if (errno || n > INT_MAX)
		return -EINVAL;
	/* A partition of the disk: ublkbNpM. */
	if (name[4] == 'b' && end[0] == 'p' && end[1] >= '0' && end[1] <= '9') {
		strtoul(end + 1, &end, 10);
		if (errno)
			return -EINVAL;
	}
	if (*end)
		return -EINVAL;
	*id = (unsigned)n;
	return 0;
}

int udev_normalize_path(const char *path, char *out, size_t outlen)
{
	size_t o = 0;
	const char *p = path;

	if (path[0] != '/')
		return -EINVAL;
	while (*p) {
		const char *s;
		size_t n;

		while (*p == '/')
			p++;
		s = p;
		while (*p && *p != '/')
			p++;
		n = (size_t)(p - s);
		if (n == 0 || (n == 1 && s[0] == '.'))
			continue;
		if (n == 2 && s[0] == '.' && s[1] == '.') {
			while (o > 0 && out[o - 1] != '/')
				o--;
			if (o > 0)
				o--;   /* the slash; ".." of "/" is "/" */
			continue;
		}
		if (o + 1 + n + 1 > outlen)
			return -ENAMETOOLONG;
		out[o++] = '/';
		memcpy(out + o, s, n);
		o += n;
	}
	if (o == 0) {
		if (outlen < 2)
			return -ENAMETOOLONG;
		out[o++] = '/';
	}
	out[o] = 0;
	return 0;
}

/* systemd's unit name escaping (systemd.unit(5) "STRING ESCAPING"):
 * '/' -> '-'; ASCII letters, digits, ':', '_' and '.' (but a leading '.')
 * as they are; every other byte as "\xNN".  The path's leading and
 * trailing slashes are dropped first, and "/" alone is "-". */
static int escape_path(const char *norm, char *out, size_t outlen)
{
	static const char hex[] = "0123456789abcdef";
	const char *p = norm;
	size_t o = 0;

	while (*p == '/')
		p++;
	if (!*p) {
		if (outlen < 2)
			return -ENAMETOOLONG;
		strcpy(out, "-");
		return 0;
	}
	for (; *p; p++) {
		unsigned char c = (unsigned char)*p;
		bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			     (c >= '0' && c <= '9') || c == ':' || c == '_' || (c == '.' && o > 0);

		if (c == '/' && !p[1])
			break;   /* trailing slash */
		if (o + 5 > outlen)
			return -ENAMETOOLONG;
		if (c == '/') {
			out[o++] = '-';
		} else if (plain) {
			out[o++] = (char)c;
		} else {
			out[o++] = '\\';
			out[o++] = 'x';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		}
	}
	out[o] = 0;
	return 0;
}

int udev_image_id(const char *image, char *out, size_t outlen)
{
	char norm[PATH_MAX], esc[4 * PATH_MAX];
	uint64_t h = 0xcbf29ce484222325ull;   /* FNV-1a */
	int ret;

	ret = udev_normalize_path(image, norm, sizeof(norm));
	if (ret < 0)
		return ret;
	ret = escape_path(norm, esc, sizeof(esc));
	if (ret == 0 && strlen(esc) <= UDEV_ID_MAX) {
		if (strlen(esc) >= outlen)
			return -ENAMETOOLONG;
		strcpy(out, esc);
		return 0;
	}
	/* Too long for a link name: a hash of the normalised path. */
	for (const char *p = norm; *p; p++)
		h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
	if (snprintf(out, outlen, "hash-%016llx", (unsigned long long)h) >= (int)outlen)
		return -ENAMETOOLONG;
	return 0;
}

/* owner_uid/owner_gid (6.5+) follow ublksrv_flags; older headers, which
 * <linux/ublk_cmd.h> may be, call them reserved0. */
static void owner_ids(const struct ublksrv_ctrl_dev_info *info, uint32_t *uid, uint32_t *gid)
{
	uint32_t v[2];

	memcpy(v, (const char *)&info->ublksrv_flags + sizeof(info->ublksrv_flags), sizeof(v));
	*uid = v[0];
	*gid = v[1];
}

static bool plain_word(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9')))
			return false;
	return true;
}

int cmd_udev_id(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ublksrv_ctrl_dev_info info;
	struct ublk_state st;
	bool have_info = false, have_st;
	char id_str[UDEV_ID_MAX + 1];
	unsigned id;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "h", lopts, NULL)) != -1) {
		switch (c) {
		case 'h':
			udev_id_usage(stdout);
			return EXIT_OK;
		default:
			udev_id_usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 1) {
		log_error("expected one DEVICE");
		udev_id_usage(stderr);
		return EXIT_USAGE;
	}
	if (udev_parse_name(argv[optind], &id) < 0) {
		log_error("'%s' is not a ublk device name (ublkbN, ublkbNpM, ublkcN)", argv[optind]);
		return EXIT_USAGE;
	}
	/* Without the driver (a host that has none, a test) the state file
	 * is all there is. */
	if (access(UBLK_CONTROL_PATH, F_OK) == 0) {
		struct ublk_ctrl ctrl;
		int ret = ublk_ctrl_open(&ctrl);

		if (ret == 0) {
			ret = ublk_ctrl_get_info(&ctrl, id, &info);
			ublk_ctrl_close(&ctrl);
			if (ret == -ENODEV) {
				log_error("ublk%u: no such device", id);
				return EXIT_FAIL;
			}
			have_info = ret == 0;
		}
	}
	have_st = ublk_state_read((int)id, &st) == 0;
	if (!have_info && !have_st) {
		log_error("ublk%u: no such device (no driver answer, no state file in %s)", id,
			  ublk_run_dir());
		return EXIT_FAIL;
	}
	if (have_st && have_info && st.pid != info.ublksrv_pid) {
		log_debug("ublk%u: state file of pid %d, daemon %d: not (yet) this daemon's", id,
			  st.pid, info.ublksrv_pid);
		have_st = false;
	}
	printf("QUBLK_DEV_ID=%u\n", id);
	if (have_st && strcmp(st.image, "-")) {
		if (udev_image_id(st.image, id_str, sizeof(id_str)) == 0)
			printf("ID_SERIAL=%s\n", id_str);
		else
			log_warn("ublk%u: image path '%s' in the state file is not absolute", id,
				 st.image);
	}
	if (have_st) {
		if (plain_word(st.target))
			printf("QUBLK_TARGET=%s\n", st.target);
		printf("QUBLK_READ_ONLY=%d\n", st.read_only ? 1 : 0);
	}
	if (have_info && (info.flags & UBLK_F_UNPRIVILEGED_DEV)) {
		uint32_t uid, gid;

		owner_ids(&info, &uid, &gid);
		printf("QUBLK_UNPRIVILEGED=1\nQUBLK_OWNER_UID=%u\nQUBLK_OWNER_GID=%u\n", uid, gid);
	}
	return fflush(stdout) == 0 ? EXIT_OK : EXIT_FAIL;
}
