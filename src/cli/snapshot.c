/* SPDX-License-Identifier: MIT */
/*
 * qublk snapshot: list, create, apply or delete the internal snapshots of
 * a qcow2 image that nobody uses (offline), as `qemu-img snapshot` does.
 * Parsing and locking only; the work is src/qcow2/snapshot-write.c.
 * Single-threaded tool code.
 *
 * The image is locked as qemu-img locks it: -l takes a reader's lock
 * (none with -U), the others a writer's, so an image served by qublk,
 * qemu-nbd or a VM is refused, never changed under them.
 */
#include <stddef.h>

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/lock.h"
#include "cli/cli.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk snapshot [-l | -c NAME | -a NAME | -d NAME] [-U] [-q] FILE\n"
		"\n"
		"Internal snapshots of the qcow2 image FILE, which must not be in use\n"
		"(like qemu-img snapshot; a snapshot of a served image is not supported).\n"
		"\n"
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
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	char op = 0, err[512] = "";
	const char *name = NULL;
	bool force_share = false;
	struct io_file *f = NULL;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "lc:a:d:f:Uqh", longopts, NULL)) != -1) {
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
	if (argc - optind != 1) {
		log_error(argc - optind < 1 ? "missing FILE" : "too many arguments");
		usage(stderr);
		return EXIT_USAGE;
	}
	if (!op)
		op = 'l';
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
		ret = qcow2_snapshot_create(f, name, err, sizeof(err));
		break;
	case 'a':
		ret = qcow2_snapshot_apply(f, name, err, sizeof(err));
		break;
	default:
		ret = qcow2_snapshot_delete(f, name, err, sizeof(err));
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
