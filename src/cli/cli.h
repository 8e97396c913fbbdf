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
int cmd_service(int argc, char **argv);  /* src/cli/service.c: systemd unit qublk@.service */
int cmd_udev_id(int argc, char **argv);  /* src/cli/udev.c: udev rules' IMPORT{program} */

/* Helpers shared by the command files (src/cli/ublk.c). */
#include <stdio.h>
/* A decimal in [lo, hi].  Returns 0 or -EINVAL. */
int cli_parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out);
/* s as a JSON string literal, quotes included. */
void cli_json_string(FILE *out, const char *s);

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
