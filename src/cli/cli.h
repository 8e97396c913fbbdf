/* SPDX-License-Identifier: MIT */
/* Subcommands of the qublk binary.  Each cmd_* parses its own options
 * (getopt_long, --help prints usage to stdout and returns 0) and returns
 * the process exit code: */
#ifndef QUBLK_CLI_H
#define QUBLK_CLI_H

#include <stdint.h>
#include <stdio.h>

#define EXIT_OK     0   /* success */
#define EXIT_FAIL   1   /* the operation failed (message on stderr names file and reason) */
#define EXIT_USAGE  2   /* bad command line */

int cmd_create(int argc, char **argv);   /* src/cli/create.c */
int cmd_info(int argc, char **argv);     /* src/cli/info.c */
int cmd_check(int argc, char **argv);    /* src/cli/check.c: own exit codes, see there */
int cmd_snapshot(int argc, char **argv); /* src/cli/snapshot.c */
int cmd_bench(int argc, char **argv);    /* src/cli/bench.c */
int cmd_nbd(int argc, char **argv);      /* src/cli/nbd.c */
int cmd_add(int argc, char **argv);      /* src/cli/ublk.c */
int cmd_list(int argc, char **argv);     /* src/cli/ublk.c */
int cmd_del(int argc, char **argv);      /* src/cli/ublk.c */
int cmd_features(int argc, char **argv); /* src/cli/features.c */
int cmd_recover(int argc, char **argv);  /* src/cli/ublk.c */
int cmd_upgrade(int argc, char **argv);  /* src/cli/ublk.c */
int cmd_resize(int argc, char **argv);   /* src/cli/resize.c */
int cmd_map(int argc, char **argv);      /* src/cli/map.c */
int cmd_convert(int argc, char **argv);  /* src/cli/convert.c */
int cmd_service(int argc, char **argv);  /* src/cli/service.c: systemd unit qublk@.service */
int cmd_udev_id(int argc, char **argv);  /* src/cli/udev.c: udev rules' IMPORT{program} */

/* Helpers shared by the command files (src/cli/ublk.c). */
#include <stdio.h>
/* A decimal in [lo, hi].  Returns 0 or -EINVAL. */
int cli_parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out);
/* s as a JSON string literal, quotes included. */
void cli_json_string(FILE *out, const char *s);

/* Apply qemu-img's -o OPTIONS list for a new image (src/cli/options.c:
 * cluster_size, compat, lazy_refcounts, refcount_bits, preallocation,
 * compression_type, backing_file, backing_fmt, extended_l2) to @q.
 * @list is modified and must outlive @q (values point into it).
 * *@raw_bad is set to the last key given that the raw format does not
 * take (everything but preallocation) and left alone otherwise.  Returns
 * 0, or -EINVAL with a message logged. */
struct qcow2_create_opts;
int cli_parse_create_options(char *list, struct qcow2_create_opts *q, const char **raw_bad);

/* An image's backing chain as its headers name it (src/cli/chain.c), top
 * first: what each block-status depth (1 = l[0]) stands for. */
#include <stdint.h>
#include <sys/types.h>
struct chain_layer {
	char *path;               /* as bdrv_open_backing() resolves it */
	char *data_path;          /* its external data file (as bdrv_open_data_file()
				   * resolves it), or NULL */
	const char *format;       /* "qcow2" or "raw" */
	uint64_t size;            /* virtual size */
	dev_t dev;
	ino_t ino;
};
struct chain {
	struct chain_layer *l;
	unsigned n;
};
/* @format: the top image's, or NULL to probe.  Logs and returns -errno. */
int chain_read(const char *path, const char *format, struct chain *c);
void chain_free(struct chain *c);

/* src/cli/udev.c.  "ublkbN", "ublkbNpM", "ublkcN", optionally under
 * "/dev/": the device number.  Returns 0 or -EINVAL. */
int udev_parse_name(const char *name, unsigned *id);
/* An absolute @path without "//", "." and ".." (lexically, as
 * `realpath -s`).  Returns 0, -EINVAL (relative) or -ENAMETOOLONG. */
int udev_normalize_path(const char *path, char *out, size_t outlen);
/* The image ID of udev's by-id link: @image normalised and escaped as
 * `systemd-escape --path` does; "hash-<16 hex>" if that is over 200
 * bytes.  Returns 0, -EINVAL or -ENAMETOOLONG. */
int udev_image_id(const char *image, char *out, size_t outlen);

struct qcow2_snapshot;
/* The snapshot table as qemu-img 7.2 prints it (src/cli/info.c). */
void print_snapshot_list(FILE *o, const struct qcow2_snapshot *snaps, uint32_t n);

#endif
