/* SPDX-License-Identifier: MIT */
/*
 * qublk check: check (and with -r repair) an image's consistency, with
 * qemu-img check's output and exit codes:
 *   0 clean, 1 the check could not be completed, 2 corruptions,
 *   3 leaks only, 63 the format does not support checks (raw).
 * After a repair that fixed anything the image is checked again and that
 * second result is what is shown and what sets the exit code, as
 * qemu-img does.  Per-problem lines go to stderr, the summary to stdout.
 * The work is in src/qcow2/check.c.  Single-threaded tool code.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"

#define EXIT_CHECK_CORRUPT   2
#define EXIT_CHECK_LEAKS     3
#define EXIT_CHECK_NOTSUP   63

struct ui {
	bool quiet;
	bool progress;          /* -p and stdout is a terminal */
	int last_pct;           /* hundredths of a percent last shown */
};

static void report_line(void *opaque, const char *line)
{
	struct ui *u = opaque;

	if (u->progress)
		fputs("\r\033[K", stdout);   /* clear the progress line first */
	fflush(stdout);
	fprintf(stderr, "%s\n", line);
}

static void show_progress(void *opaque, uint64_t done, uint64_t total)
{
	struct ui *u = opaque;
	int pct = (int)(done * 10000 / total);

	if (!u->progress || pct == u->last_pct)
		return;
	u->last_pct = pct;
	printf("    (%d.%02d/100%%)\r", pct / 100, pct % 100);
	fflush(stdout);
}

static void json_str(FILE *o, const char *s)
{
	fputc('"', o);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(o, "\\%c", *p);
		else if (*p < 0x20 || *p >= 0x7f)
			fprintf(o, "\\u%04x", *p);
		else
			fputc(*p, o);
	}
	fputc('"', o);
}

static void print_json(const char *filename, const char *format,
		       const struct qcow2_check_result *r)
{
	const struct { const char *name; uint64_t v; bool always; } f[] = {
		{ "image-end-offset", r->image_end_offset, false },
		{ "total-clusters", r->total_clusters, false },
		{ "check-errors", r->check_errors, true },
		{ "allocated-clusters", r->allocated_clusters, false },
		{ "fragmented-clusters", r->fragmented_clusters, false },
		{ "compressed-clusters", r->compressed_clusters, false },
		{ "corruptions", r->corruptions, false },
		{ "leaks", r->leaks, false },
		{ "corruptions-fixed", r->corruptions_fixed, false },
		{ "leaks-fixed", r->leaks_fixed, false },
	};

	printf("{\n    \"filename\": ");
	json_str(stdout, filename);
	printf(",\n    \"format\": \"%s\"", format);
	for (size_t i = 0; i < ARRAY_SIZE(f); i++)
		if (f[i].always || f[i].v)
			printf(",\n    \"%s\": %llu", f[i].name, (unsigned long long)f[i].v);
	printf("\n}\n");
}

static void print_human(const struct qcow2_check_result *r)
{
	if (!(r->corruptions || r->leaks || r->check_errors)) {
		printf("No errors were found on the image.\n");
	} else {
		if (r->corruptions)
			printf("\n%llu errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       (unsigned long long)r->corruptions);
		if (r->leaks)
			printf("\n%llu leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       (unsigned long long)r->leaks);
		if (r->check_errors)
			printf("\n%llu internal errors have occurred during the check.\n",
			       (unsigned long long)r->check_errors);
	}
	if (r->total_clusters && r->allocated_clusters)
		printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
		       (unsigned long long)r->allocated_clusters, (unsigned long long)r->total_clusters,
		       r->allocated_clusters * 100.0 / r->total_clusters,
		       r->fragmented_clusters * 100.0 / r->allocated_clusters,
		       r->compressed_clusters * 100.0 / r->allocated_clusters);
	if (r->image_end_offset)
		printf("Image end offset: %llu\n", (unsigned long long)r->image_end_offset);
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk check [-r leaks|all] [--output human|json] [-f FMT] [-U] [-p] [-q] FILE\n"
		"\n"
		"Check a qcow2 image's metadata the way qemu-img check does: refcounts\n"
		"against the references of the active and snapshot L1/L2 tables, L1/L2\n"
		"entries, OFLAG_COPIED, refcount table and blocks, snapshot table.\n"
		"\n"
		"  -r, --repair leaks  free leaked clusters (refcount above the references)\n"
		"  -r, --repair all    also repair corruptions: rebuild the refcount structure\n"
		"                      when it cannot be trusted, fix OFLAG_COPIED, drop entries\n"
		"                      that cannot be repaired (each is reported); clears the\n"
		"                      corrupt and dirty bits when the image is clean afterwards\n"
		"  --output FMT        human (default) or json (qemu-img's field names)\n"
		"  -f, --format FMT    qcow2 or raw (default: probe the magic)\n"
		"  -U, --force-share   accepted for qemu-img compatibility (qublk takes no lock)\n"
		"  -p                  show progress on a terminal\n"
		"  -q                  quiet: no summary\n"
		"  -h, --help          show this help\n"
		"\n"
		"Exit status: 0 no problems, 1 the check could not be completed,\n"
		"2 corruptions, 3 leaked clusters only, 63 the format does not support\n"
		"checks (raw); after a repair, the status of the check that follows it.\n"
		"Usage errors exit 1, as in qemu-img.\n");
}

static int run(struct io_file *f, unsigned fix, struct ui *u, struct qcow2_check_result *r,
	       const char *path)
{
	struct qcow2_check_opts o = {
		.fix = fix, .report = report_line, .progress = show_progress, .opaque = u,
	};
	char err[256];
	int ret = qcow2_check(f, &o, r, err, sizeof(err));

	if (u->progress) {
		printf("    (100.00/100%%)\n");
		u->last_pct = -1;
	}
	if (ret < 0)
		log_error("%s: %s", path, err);
	return ret;
}

int cmd_check(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256 };
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "repair", required_argument, NULL, 'r' },
		{ "format", required_argument, NULL, 'f' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ui u = { .last_pct = -1 };
	struct qcow2_check_result r;
	struct io_file *f = NULL;
	const char *fmt = NULL;
	bool json = false, want_progress = false;
	unsigned fix = 0;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "r:f:Upqh", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_OUTPUT:
			if (!strcmp(optarg, "json")) {
				json = true;
			} else if (!strcmp(optarg, "human")) {
				json = false;
			} else {
				log_error("--output must be used with human or json as argument.");
				return EXIT_FAIL;
			}
			break;
		case 'r':
			if (!strcmp(optarg, "leaks")) {
				fix = QCOW2_FIX_LEAKS;
			} else if (!strcmp(optarg, "all")) {
				fix = QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS;
			} else {
				log_error("Unknown option value for -r (expecting 'leaks' or 'all'): %s", optarg);
				return EXIT_FAIL;
			}
			break;
		case 'f':
			if (strcmp(optarg, "qcow2") && strcmp(optarg, "raw")) {
				log_error("unknown format '%s' (qcow2 or raw)", optarg);
				return EXIT_FAIL;
			}
			fmt = optarg;
			break;
		case 'U':
			break;
		case 'p':
			want_progress = true;
			break;
		case 'q':
			u.quiet = true;
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_FAIL;
		}
	}
	if (argc - optind != 1) {
		log_error(argc - optind < 1 ? "missing FILE" : "too many arguments");
		usage(stderr);
		return EXIT_FAIL;
	}
	const char *path = argv[optind];
	u.progress = want_progress && !u.quiet && !json && isatty(STDOUT_FILENO);

	ret = io_file_open(path, fix ? 0 : IO_OPEN_RDONLY, &f);
	if (ret < 0) {
		log_error("Could not open '%s': %s", path, strerror(-ret));
		return EXIT_FAIL;
	}
	if (!fmt) {
		uint8_t magic[4] = { 0 };
		ret = io_pread(f, magic, sizeof(magic), 0);
		if (ret < 0) {
			log_error("%s: reading: %s", path, strerror(-ret));
			io_file_close(f);
			return EXIT_FAIL;
		}
		fmt = get_be32(magic) == QCOW2_MAGIC ? "qcow2" : "raw";
	}
	if (!strcmp(fmt, "raw")) {
		log_error("This image format does not support checks");
		io_file_close(f);
		return EXIT_CHECK_NOTSUP;
	}

	ret = run(f, fix, &u, &r, path);
	if (ret == 0 && (r.corruptions_fixed || r.leaks_fixed)) {
		uint64_t cf = r.corruptions_fixed, lf = r.leaks_fixed;
		if (!json && !u.quiet)
			printf("The following inconsistencies were found and repaired:\n\n"
			       "    %llu leaked clusters\n    %llu corruptions\n\n"
			       "Double checking the fixed image now...\n",
			       (unsigned long long)lf, (unsigned long long)cf);
		ret = run(f, 0, &u, &r, path);
		r.corruptions_fixed = cf;
		r.leaks_fixed = lf;
	}
	io_file_close(f);
	if (ret == 0 && !u.quiet) {
		if (json)
			print_json(path, "qcow2", &r);
		else
			print_human(&r);
	}
	fflush(stdout);
	if (ret < 0 || r.check_errors) {
		log_error(ret < 0 ? "Check failed: %s" : "Check failed", strerror(-ret));
		return EXIT_FAIL;
	}
	if (r.corruptions)
		return EXIT_CHECK_CORRUPT;
	if (r.leaks)
		return EXIT_CHECK_LEAKS;
	return EXIT_OK;
}
