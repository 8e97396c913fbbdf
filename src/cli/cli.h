/* SPDX-License-Identifier: MIT */
/* Subcommands of the qublk binary.  Each cmd_* parses its own options
 * (getopt_long, --help prints usage to stdout and returns 0) and returns
 * the process exit code: */
#ifndef QUBLK_CLI_H
#define QUBLK_CLI_H

#define EXIT_OK     0   /* success */
#define EXIT_FAIL   1   /* the operation failed (message on stderr names file and reason) */
#define EXIT_USAGE  2   /* bad command line */

int cmd_create(int argc, char **argv);   /* src/cli/create.c */
int cmd_info(int argc, char **argv);     /* src/cli/info.c */
int cmd_check(int argc, char **argv);    /* src/cli/check.c: own exit codes, see there */
int cmd_bench(int argc, char **argv);    /* src/cli/bench.c */
int cmd_nbd(int argc, char **argv);      /* src/cli/nbd.c */
int cmd_add(int argc, char **argv);      /* src/cli/ublk.c */
int cmd_list(int argc, char **argv);     /* src/cli/ublk.c */
int cmd_del(int argc, char **argv);      /* src/cli/ublk.c */
int cmd_features(int argc, char **argv); /* src/cli/features.c */
int cmd_recover(int argc, char **argv);  /* src/cli/ublk.c */
int cmd_upgrade(int argc, char **argv);  /* src/cli/ublk.c */
int cmd_resize(int argc, char **argv);   /* src/cli/resize.c */
int cmd_udev(int argc, char **argv);     /* src/cli/udev.c */

/* Helpers shared by the command files (src/cli/ublk.c). */
#include <stdio.h>
/* A decimal in [lo, hi].  Returns 0 or -EINVAL. */
int cli_parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out);
/* s as a JSON string literal, quotes included. */
void cli_json_string(FILE *out, const char *s);

#endif
