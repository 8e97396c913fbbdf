/* SPDX-License-Identifier: MIT */
/*
 * qublk resize: change an image's virtual size, offline (FILE SIZE: the
 * image is opened and locked here, bdrv_truncate) or under a live ublk
 * device (-n ID SIZE: its daemon, which holds the image, grows it and
 * then the device with UPDATE_SIZE; src/ublk/dev.c handle_resize).
 *
 * SIZE as in qemu-img resize: absolute, or +N / -N relative to the
 * current size, with K/M/G/T suffixes.  A live device only grows.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "block/bdrv.h"
#include "cli/cli.h"
#include "common/util.h"
#include "ublk/ublk.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk resize [--shrink] [-f FMT] FILE [--] [+|-]SIZE\n"
		"       qublk resize -n ID [+]SIZE\n\n"
		"Change the virtual size of image FILE, or grow the image under the live\n"
		"ublk device ID and the device with it (UPDATE_SIZE: the kernel's ublk\n"
		"driver must offer update_size; then grow the file system, e.g. resize2fs).\n"
		"SIZE is the new size, or +N/-N relative to the current one (K/M/G/T\n"
		"suffixes); it must be a multiple of 512.  The new range reads as zeros.\n\n"
		"  -n, --number ID   the live device whose image to grow\n"
		"      --shrink      allow FILE to shrink; refused anyway if the dropped\n"
		"                    range holds data in FILE\n"
		"  -f, --format FMT  qcow2 or raw (default: probed)\n\n"
		"Exit codes: 0 success, 1 failure, 2 usage error.\n");
}

/* "[+|-]SIZE" against @cur.  Returns 0 or -EINVAL. */
static int new_size(const char *arg, uint64_t cur, uint64_t *out)
{
	char sign = (arg[0] == '+' || arg[0] == '-') ? arg[0] : 0;
	uint64_t v;

	if (parse_size(arg + (sign != 0), &v) < 0)
		return -EINVAL;
	if (sign == '+')
		return ckd_add(out, cur, v) ? -EINVAL : 0;
	if (sign == '-') {
		if (v >= cur)
			return -EINVAL;
		*out = cur - v;
		return 0;
	}
	*out = v;
	return 0;
}

static int resize_live(unsigned id, const char *arg)
{
	struct ublksrv_ctrl_dev_info info;
	struct ublk_params p;
	struct ublk_ctrl ctrl;
	uint64_t cur, size;
	int ret;

	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	ret = ublk_ctrl_get_info(&ctrl, id, &info);
	if (ret == 0)
		ret = ublk_ctrl_get_params(&ctrl, id, &p);
	ublk_ctrl_close(&ctrl);
	if (ret < 0) {
		log_error("ublk%u: %s", id, ret == -ENODEV ? "no such device" : strerror(-ret));
		return EXIT_FAIL;
	}
	if (!ctrl.have_features || !(ctrl.features & UBLK_F_UPDATE_SIZE)) {
		log_error("ublk%u: this kernel's ublk driver has no UPDATE_SIZE (update_size, "
			  "Linux 6.15+): a live device cannot change size; 'qublk del -n %u', "
			  "'qublk resize FILE SIZE', then 'qublk add' again", id, id);
		return EXIT_FAIL;
	}
	if (!(info.flags & UBLK_F_UPDATE_SIZE)) {
		log_error("ublk%u was created without update_size: it cannot change size while "
			  "live", id);
		return EXIT_FAIL;
	}
	if (info.state != UBLK_S_DEV_LIVE || info.ublksrv_pid <= 0 ||
	    (kill(info.ublksrv_pid, 0) < 0 && errno != EPERM)) {
		log_error("ublk%u has no running daemon (state %s): 'qublk recover -n %u' first",
			  id, ublk_state_name(info.state), id);
		return EXIT_FAIL;
	}
	cur = (uint64_t)p.basic.dev_sectors << 9;
	if (arg[0] == '-' || new_size(arg, cur, &size) < 0) {
		log_error("'%s': expected a size or +SIZE (a live device only grows)", arg);
		return EXIT_USAGE;
	}
	if (size % 512) {
		log_error("%llu bytes: the size must be a multiple of 512", (unsigned long long)size);
		return EXIT_FAIL;
	}
	if (size < cur) {
		log_error("ublk%u: %llu bytes is smaller than the device (%llu): a live device "
			  "cannot shrink; 'qublk del', 'qublk resize --shrink FILE SIZE', "
			  "'qublk add'", id, (unsigned long long)size, (unsigned long long)cur);
		return EXIT_FAIL;
	}
	if (ublk_dev_resize((int)id, size) < 0)
		return EXIT_FAIL;
	printf("/dev/ublkb%u: %llu bytes\n", id, (unsigned long long)size);
	return EXIT_OK;
}

static int resize_file(const char *file, const char *fmt, const char *arg, bool shrink)
{
	struct bdrv_opts bo = { .format = fmt };
	struct bdrv *bs;
	uint64_t size;
	int ret;

	if (bdrv_open(file, &bo, &bs) < 0)
		return EXIT_FAIL;
	if (new_size(arg, bs->size, &size) < 0) {
		log_error("'%s': expected a size, +SIZE or -SIZE (smaller than the image)", arg);
		bdrv_close(bs);
		return EXIT_USAGE;
	}
	ret = bdrv_truncate(bs, size, shrink ? BDRV_TRUNC_SHRINK : 0);
	if (bdrv_close(bs) < 0 && ret == 0)
		ret = -EIO;
	if (ret < 0)
		return EXIT_FAIL;
	printf("Image resized.\n");
	return EXIT_OK;
}

int cmd_resize(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "number", required_argument, NULL, 'n' },
		{ "shrink", no_argument, NULL, 'S' },
		{ "format", required_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmt = NULL;
	bool have_id = false, shrink = false;
	unsigned id = 0;
	int c;

	optind = 1;
	/* "+" stops at the first operand: "-1G" is a size, not an option. */
	while ((c = getopt_long(argc, argv, "+n:f:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'n':
			if (cli_parse_uint(optarg, 0, INT_MAX, &id) < 0) {
				log_error("--number '%s': expected a device number", optarg);
				return EXIT_USAGE;
			}
			have_id = true;
			break;
		case 'S':
			shrink = true;
			break;
		case 'f':
			if (strcmp(optarg, "qcow2") && strcmp(optarg, "raw")) {
				log_error("--format '%s': expected qcow2 or raw", optarg);
				return EXIT_USAGE;
			}
			fmt = optarg;
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (have_id) {
		if (argc - optind != 1 || shrink || fmt) {
			log_error("with -n ID: expected only SIZE (a live device only grows)");
			return EXIT_USAGE;
		}
		return resize_live(id, argv[optind]);
	}
	/* "FILE -- -1G", as qemu-img takes it: getopt stopped at FILE. */
	if (argc - optind == 3 && strcmp(argv[optind + 1], "--") == 0) {
		argv[optind + 1] = argv[optind];
		optind++;
	}
	if (argc - optind != 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	return resize_file(argv[optind], fmt, argv[optind + 1], shrink);
}
