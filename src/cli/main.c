/* SPDX-License-Identifier: MIT */
/* qublk: the command dispatcher.  Each subcommand lives in its own file. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"

#define QUBLK_VERSION "0.1"

static const struct command {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
} commands[] = {
	{ "create", cmd_create, "create a qcow2 or raw image" },
	{ "info",   cmd_info,   "show an image's format, features, backing chain, snapshots" },
	{ "check",  cmd_check,  "check an image's consistency (qemu-img check), repair with -r" },
	{ "snapshot", cmd_snapshot, "list, create, apply or delete internal snapshots (also live)" },
	{ "add",    cmd_add,    "serve an image as the block device /dev/ublkbN (ublk)" },
	{ "list",   cmd_list,   "list ublk devices" },
	{ "del",    cmd_del,    "stop and remove ublk devices" },
	{ "recover", cmd_recover, "start a new daemon for a device whose daemon died" },
	{ "upgrade", cmd_upgrade, "hand a live device over to a new daemon (this binary)" },
	{ "resize", cmd_resize, "change an image's size, or grow a live device's (UPDATE_SIZE)" },
	{ "features", cmd_features, "what this kernel's ublk driver supports, and what qublk uses" },
	{ "nbd",    cmd_nbd,    "serve an image over NBD (unix socket or TCP)" },
	{ "bench",  cmd_bench,  "run I/O against an image through the engine, print IOPS" },
	{ "service", cmd_service, "the commands of the systemd unit qublk@NAME.service" },
	{ "udev-id", cmd_udev_id, "udev properties of a ublk device (the rules' IMPORT{program})" },
};

static void usage(FILE *out)
{
	fprintf(out, "Usage: qublk COMMAND [OPTIONS...]\n\n"
		     "qcow2 and raw images as block devices, on io_uring.\n\nCommands:\n");
	for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
		fprintf(out, "  %-8s %s\n", commands[i].name, commands[i].summary);
	fprintf(out, "\n'qublk COMMAND --help' describes a command.\n"
		     "Exit codes: 0 success, 1 failure, 2 usage error.\n");
}

int main(int argc, char **argv)
{
	log_set_prog("qublk");
	if (argc < 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return EXIT_OK;
	}
	if (!strcmp(argv[1], "--version")) {
		printf("qublk %s\n", QUBLK_VERSION);
		return EXIT_OK;
	}
	for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
		if (!strcmp(argv[1], commands[i].name)) {
			static char prefix[64];
			snprintf(prefix, sizeof(prefix), "qublk %s", commands[i].name);
			log_set_prog(prefix);
			return commands[i].fn(argc - 1, argv + 1);
		}
	}
	fprintf(stderr, "qublk: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return EXIT_USAGE;
}
