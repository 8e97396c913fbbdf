/* SPDX-License-Identifier: MIT */
/*
 * qublk snapshot: list, create, apply or delete the internal snapshots of
 * a qcow2 image that nobody uses (offline), as `qemu-img snapshot` does;
 * or list, create and delete those of the image under a live ublk device
 * (-n ID), through its daemon, which holds the image: the snapshot is
 * taken at a flush point while the device serves (src/ublk/dev.c
 * handle_snapshot, bdrv_snapshot).  Parsing and locking only; the work is
 * src/qcow2/snapshot-write.c either way.  Single-threaded tool code.
 *
 * Offline, the image is locked as qemu-img locks it: -l takes a reader's
 * lock (none with -U), the others a writer's, so an image served by
 * qublk, qemu-nbd or a VM is refused, never changed under them.  Live,
 * -a is refused: reverting would change the disk under its users.
 */
#include <stddef.h>

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/lock.h"
#include "cli/cli.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"
#include "ublk/ublk.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk snapshot [-l | -c NAME | -a NAME | -d NAME] [-U] [-q] FILE\n"
		"       qublk snapshot -n ID [-l | -c NAME | -d NAME] [-q]\n"
		"\n"
		"Internal snapshots of the qcow2 image FILE, which must not be in use\n"
		"(like qemu-img snapshot), or of the image under the live ublk device ID,\n"
		"through its daemon: taken at a flush point (the writes completed before\n"
		"are in the snapshot; requests wait meanwhile), while the device serves.\n"
		"\n"
		"  -n, --number ID\n"
		"                 the live device whose image to work on (not with -a:\n"
		"                 reverting a disk in use is refused)\n"
		"  -l             list the snapshots (the default)\n"
		"  -c NAME        create a snapshot called NAME of the current contents\n"
		"                 (ids are numbered as QEMU numbers them; names may repeat)\n"
		"  -a NAME        apply (revert to) the snapshot whose id, or else name, is\n"
		"                 NAME: contents and virtual size become the snapshot's\n"
		"  -d NAME        delete the snapshot whose name, or else id, is NAME\n"
		"  -f qcow2       accepted for qemu-img compatibility\n"
		"  -U, --force-share\n"
		"                 -l only: read an image that someone else is using\n"
		"  -q             quiet (accepted for qemu-img compatibility)\n"
		"  -h, --help     show this help\n"
		"\n"
		"Exit status: 0 success, 1 failure, 2 usage error.\n");
}

/* -n ID: the daemon of device @id does the work. */
static int snapshot_live(unsigned id, char op, const char *name)
{
	int ret;

	switch (op) {
	case 'l': {
		struct qcow2_snapshot *snaps = NULL;
		uint32_t n = 0;
		ret = ublk_dev_snapshot_list((int)id, &snaps, &n);
		if (!ret && n) {
			printf("Snapshot list:\n");
			print_snapshot_list(stdout, snaps, n);
		}
		qcow2_snapshots_free(snaps, n);
		if (!ret && fflush(stdout))
			ret = -EIO;
		break;
	}
	case 'c':
		ret = ublk_dev_snapshot((int)id, BDRV_SNAPSHOT_CREATE, name);
		break;
	default:
		ret = ublk_dev_snapshot((int)id, BDRV_SNAPSHOT_DELETE, name);
		break;
	}
	return ret ? EXIT_FAIL : EXIT_OK;       /* logged */
}

static int open_locked(const char *path, bool write, bool force_share, struct io_file **f)
{
	unsigned perm, shared;
	int ret = io_file_open(path, write ? 0 : IO_OPEN_RDONLY, f);

	if (ret) {
		log_error("%s: %s", path, strerror(-ret));
		return ret;
	}
	lock_perms(!write, force_share, &perm, &shared);
	ret = lock_take((*f)->fd, path, perm, shared);
	if (ret == -EAGAIN && write)
		log_error("%s: if a qublk ublk device serves it, 'qublk snapshot -n ID' works on "
			  "it live ('qublk list' shows ID)", path);
	if (ret) {
		io_file_close(*f);
		*f = NULL;
		return ret;     /* logged */
	}
	uint8_t magic[4] = { 0 };
	uint64_t size = 0;
	ret = io_get_size(*f, &size);
	if (!ret && size >= 4)
		ret = io_pread(*f, magic, 4, 0);
	if (ret || get_be32(magic) != QCOW2_MAGIC) {
		log_error("%s: %s", path, ret ? strerror(-ret)
					      : "not a qcow2 image (snapshots need qcow2)");
		io_file_close(*f);
		*f = NULL;
		return ret ? ret : -ENOTSUP;
	}
	return 0;
}

int cmd_snapshot(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "force-share", no_argument, NULL, 'U' },
		{ "number", required_argument, NULL, 'n' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	char op = 0, err[512] = "";
	const char *name = NULL;
	bool force_share = false, live = false;
	struct io_file *f = NULL;
	unsigned id = 0;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "lc:a:d:f:n:Uqh", longopts, NULL)) != -1) {
		switch (c) {
		case 'l':
		case 'c':
		case 'a':
		case 'd':
			if (op) {
				log_error("cannot mix '-l', '-a', '-c', '-d'");
				return EXIT_USAGE;
			}
			op = (char)c;
			name = optarg;
			break;
		case 'f':
			if (strcmp(optarg, "qcow2")) {
				log_error("snapshots need the qcow2 format, not '%s'", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'U':
			force_share = true;
			break;
		case 'n':
			if (cli_parse_uint(optarg, 0, INT_MAX, &id) < 0) {
				log_error("-n: '%s' is not a device number", optarg);
				return EXIT_USAGE;
			}
			live = true;
			break;
		case 'q':
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (!op)
		op = 'l';
	if (live) {
		if (argc - optind != 0) {
			log_error("-n ID names the device: no FILE with it");
			return EXIT_USAGE;
		}
		if (force_share) {
			log_error("-U is for FILE: the daemon of a live device reads its own image");
			return EXIT_USAGE;
		}
		if (op == 'a') {
			log_error("ublk%u: reverting a live device to a snapshot is refused: its data "
				  "would change under its users (a mounted file system, a VM); stop "
				  "them, 'qublk del -n %u', then 'qublk snapshot -a NAME FILE'", id, id);
			return EXIT_FAIL;
		}
		return snapshot_live(id, op, name);
	}
	if (argc - optind != 1) {
		log_error(argc - optind < 1 ? "missing FILE" : "too many arguments");
		usage(stderr);
		return EXIT_USAGE;
	}
	if (force_share && op != 'l') {
		log_error("-U is only valid with -l: a snapshot is never changed under a user");
		return EXIT_USAGE;
	}
	const char *path = argv[optind];
	if (open_locked(path, op != 'l', force_share, &f))
		return EXIT_FAIL;

	switch (op) {
	case 'l': {
		struct qcow2_snapshot *snaps = NULL;
		uint32_t n = 0;
		ret = qcow2_snapshot_list(f, &snaps, &n, err, sizeof(err));
		if (!ret && n) {
			printf("Snapshot list:\n");
			print_snapshot_list(stdout, snaps, n);
		}
		qcow2_snapshots_free(snaps, n);
		if (!ret && fflush(stdout))
			ret = -EIO;
		break;
	}
	case 'c':
		ret = qcow2_snapshot_create(f, name, 0, err, sizeof(err));
		break;
	case 'a':
		ret = qcow2_snapshot_apply(f, name, 0, err, sizeof(err));
		break;
	default:
		ret = qcow2_snapshot_delete(f, name, 0, err, sizeof(err));
		break;
	}
	io_file_close(f);
	if (ret) {
		static const char *const what[] = { ['l'] = "list snapshots", ['c'] = "create snapshot",
						    ['a'] = "apply snapshot", ['d'] = "delete snapshot" };
		if (op == 'l')
			log_error("%s: could not %s: %s", path, what[(int)op],
				  err[0] ? err : strerror(-ret));
		else
			log_error("%s: could not %s '%s': %s", path, what[(int)op], name,
				  err[0] ? err : strerror(-ret));
		return EXIT_FAIL;
	}
	return EXIT_OK;
}
