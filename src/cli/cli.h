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

struct qcow2_snapshot;
/* The snapshot table as qemu-img 7.2 prints it (src/cli/info.c). */
void print_snapshot_list(FILE *o, const struct qcow2_snapshot *snaps, uint32_t n);

#endif
