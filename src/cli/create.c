/* SPDX-License-Identifier: MIT */
/*
 * qublk create: make a new qcow2 or raw image, with qemu-img's option
 * names.  Parsing only; the qcow2 layout lives in src/qcow2/create.c.
 * Single-threaded tool code.
 */
#include <stddef.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/util.h"
#include "qcow2/format.h"

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk create [-f qcow2|raw] [-o OPTIONS] [-b BACKING [-F FMT]] FILE [SIZE]\n"
		"\n"
		"Create FILE, a new image of SIZE bytes (suffixes K, M, G, T: binary units;\n"
		"rounded up to a multiple of 512).  SIZE may be left out when a backing\n"
		"file is given: the new image then takes the backing image's size.\n"
		"The image is written under a temporary name in FILE's directory and\n"
		"renamed into place when complete; an existing FILE is replaced only if\n"
		"no one uses it (the image locks of qemu-img create).\n"
		"\n"
		"  -f FMT         image format: qcow2 (default) or raw\n"
		"  -b BACKING     backing file name, stored as given; a relative name is\n"
		"                 relative to FILE's directory (qcow2 only)\n"
		"  -F FMT         backing file format, qcow2 or raw (required with -b)\n"
		"  -o OPTIONS     comma-separated key=value list:\n"
		"     cluster_size=SIZE           512 to 2M, a power of two (default 64K)\n"
		"     compat=0.10|1.1             qcow2 version 2 or 3 (also v2, v3; default 1.1)\n"
		"     lazy_refcounts=on|off       (compat=1.1 only; default off)\n"
		"     refcount_bits=N             1, 2, 4, 8, 16, 32 or 64 (default 16; 0.10: 16 only)\n"
		"     preallocation=MODE          off, metadata, falloc or full (raw: off, falloc, full)\n"
		"     compression_type=zlib|zstd  (zstd needs compat=1.1; default zlib)\n"
		"     backing_file=NAME           same as -b\n"
		"     backing_fmt=FMT             same as -F\n"
		"     extended_l2=on|off          32 subclusters per cluster (compat=1.1,\n"
		"                                 cluster_size 16K or more; default off)\n"
		"     data_file=NAME              guest data in an external raw file, stored\n"
		"                                 as given; created (an existing file replaced,\n"
		"                                 its contents lost) relative to FILE's\n"
		"                                 directory (QEMU opens a relative name from\n"
		"                                 its working directory)\n"
		"     data_file_raw=on|off        keep the data file a raw image of the guest\n"
		"                                 (implies preallocation=metadata; no backing)\n"
		"  -h, --help     show this help\n"
		"\n"
		"Exit status: 0 success, 1 failure, 2 usage error.\n");
}

struct create_args {
	const char *fmt;
	struct qcow2_create_opts q;
	bool raw_conflict;           /* an option that raw does not take */
	const char *raw_bad;
};

static int create_raw(const char *path, uint64_t size, int prealloc, char *err, size_t errlen)
{
	struct create_file cf;
	int ret = create_file_begin(path, &cf, err, errlen);

	if (ret)
		return ret;
	ret = create_raw_fill(cf.fd, size, prealloc);
	if (ret) {
		snprintf(err, errlen, "%s", strerror(-ret));
		create_file_abort(&cf);
		return ret;
	}
	return create_file_commit(&cf, err, errlen);
}

int cmd_create(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct create_args a = { .fmt = "qcow2" };
	char err[512] = "";
	uint64_t size = 0;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "f:o:b:F:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			a.fmt = optarg;
			break;
		case 'o':
			if (cli_parse_create_options(optarg, &a.q, &a.raw_bad))
				return EXIT_USAGE;
			a.raw_conflict |= a.raw_bad != NULL;
			break;
		case 'b':
			a.q.backing_file = optarg;
			a.raw_conflict = true;
			a.raw_bad = "-b";
			break;
		case 'F':
			a.q.backing_format = optarg;
			a.raw_conflict = true;
			a.raw_bad = "-F";
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	int nargs = argc - optind;
	if (nargs < 1 || nargs > 2 || (nargs == 1 && !a.q.backing_file)) {
		log_error(nargs < 1 ? "missing FILE" : nargs > 2 ? "too many arguments"
								 : "missing SIZE");
		usage(stderr);
		return EXIT_USAGE;
	}
	const char *path = argv[optind];
	if (nargs == 2) {
		ret = parse_size(argv[optind + 1], &size);
		if (ret) {
			log_error("invalid size '%s'", argv[optind + 1]);
			return EXIT_USAGE;
		}
		if (size > (uint64_t)INT64_MAX - 511) {
			log_error("%s: size %s is too large", path, argv[optind + 1]);
			return EXIT_FAIL;
		}
	}

	if (!strcmp(a.fmt, "raw")) {
		if (a.raw_conflict) {
			log_error("option '%s' is not valid for the raw format", a.raw_bad);
			return EXIT_USAGE;
		}
		if (a.q.prealloc == QCOW2_PREALLOC_METADATA) {
			log_error("preallocation=metadata is not valid for the raw format");
			return EXIT_USAGE;
		}
		if (nargs < 2) {
			log_error("missing SIZE");
			return EXIT_USAGE;
		}
		ret = create_raw(path, size, a.q.prealloc, err, sizeof(err));
	} else if (!strcmp(a.fmt, "qcow2")) {
		a.q.size = size;
		ret = qcow2_create(path, &a.q, err, sizeof(err));
	} else {
		log_error("unknown format '%s' (qcow2 or raw)", a.fmt);
		return EXIT_USAGE;
	}
	if (ret) {
		log_error("%s: %s%s", path, err[0] ? err : strerror(-ret),
			  a.q.backing_file && !a.q.backing_format
				  ? "; give the backing file's format with -F (qcow2 or raw)" : "");
		return EXIT_FAIL;
	}
	return EXIT_OK;
}
