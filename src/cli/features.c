/* SPDX-License-Identifier: MIT */
/*
 * qublk features: what this kernel's ublk driver supports (GET_FEATURES),
 * by name, and which of those qublk uses (src/ublk/features.c).
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>

#include "cli/cli.h"
#include "common/util.h"
#include "ublk/ublk.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk features [--output human|json]\n\n"
		"Show what this kernel's ublk driver supports (UBLK_U_CMD_GET_FEATURES), by\n"
		"name, and which of those features qublk uses and for what.  Devices are\n"
		"created with the features qublk uses that the driver offers.\n\n"
		"  -o, --output FMT   human (default) or json\n\n"
		"Exit codes: 0 success, 1 no ublk driver (or it cannot be asked), 2 usage error.\n");
}

int cmd_features(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const struct ublk_feature *f;
	struct ublk_ctrl ctrl;
	struct utsname u;
	uint64_t have, known = 0, used;
	bool json = false;
	size_t n;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'o':
			if (!strcmp(optarg, "json"))
				json = true;
			else if (strcmp(optarg, "human")) {
				log_error("--output '%s': expected human or json", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind != argc) {
		log_error("too many arguments");
		return EXIT_USAGE;
	}
	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	if (!ctrl.have_features) {
		log_error("this ublk driver has no GET_FEATURES (Linux < 6.5): none of the "
			  "features below 'cmd_ioctl_encode' can be relied on");
		ublk_ctrl_close(&ctrl);
		return EXIT_FAIL;
	}
	have = ctrl.features;
	ublk_ctrl_close(&ctrl);
	/* What devices made here get: user_copy only with auto_buf_reg
	 * or on request (QUBLK_USER_COPY=1), unprivileged_dev only on
	 * request. */
	used = ublk_dev_flags(have, false, true) | ublk_dev_flags(have, true, true);
	if (uname(&u) < 0)
		snprintf(u.release, sizeof(u.release), "?");

	f = ublk_feature_table(&n);
	for (size_t i = 0; i < n; i++)
		known |= f[i].bit;
	if (json) {
		printf("{\"kernel\": ");
		cli_json_string(stdout, u.release);
		printf(", \"features_bits\": %llu, \"features\": [", (unsigned long long)have);
		for (size_t i = 0; i < n; i++) {
			printf("%s\n  {\"name\": \"%s\", \"bit\": %d, \"supported\": %s, "
			       "\"used\": %s", i ? "," : "", f[i].name, __builtin_ctzll(f[i].bit),
			       (have & f[i].bit) ? "true" : "false",
			       (used & f[i].bit) ? "true" : "false");
			if (f[i].use) {
				printf(", \"use\": ");
				cli_json_string(stdout, f[i].use);
			}
			printf("}");
		}
		printf("\n], \"unknown_bits\": [");
		for (int b = 0, k = 0; b < 64; b++)
			if (have & ~known & (1ULL << b))
				printf("%s%d", k++ ? ", " : "", b);
		printf("]}\n");
		return EXIT_OK;
	}
	printf("ublk driver of Linux %s: features 0x%llx\n\n", u.release,
	       (unsigned long long)have);
	printf("%-24s %-6s %-6s %s\n", "FEATURE", "DRIVER", "QUBLK", "WHAT QUBLK DOES WITH IT");
	for (size_t i = 0; i < n; i++) {
		bool has = have & f[i].bit;
		printf("%-24s %-6s %-6s %s\n", f[i].name, has ? "yes" : "no",
		       !f[i].use ? "-" : (used & f[i].bit) ? "uses" : "no", f[i].use ? f[i].use : "");
	}
	for (int b = 0; b < 64; b++)
		if (have & ~known & (1ULL << b))
			printf("%-24s%-3d %-6s %-6s\n", "unknown bit ", b, "yes", "-");
	return EXIT_OK;
}
