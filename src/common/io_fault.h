/* SPDX-License-Identifier: MIT */
/*
 * A test backend for the io layer: wraps another io_file and records,
 * fails or drops its writes.  Used by crash and error-injection tests:
 *
 *  - fail_after: the Nth and later writes/flushes fail with fail_errno;
 *  - drop_after: the Nth and later writes and flushes are silently
 *    discarded (a power cut at that point: everything before the last
 *    completed flush is on disk, nothing after it);
 *  - reads can be made to fail with read_fail_after as well;
 *  - reorder: writes are held in memory (reads see them) until a flush
 *    makes them durable; when drop_after is reached, a random subset of
 *    the writes not yet flushed reaches the file (seeded), as a disk
 *    with a volatile cache may do at a power cut.  fallocate and
 *    truncate act as barriers (pending writes go out first).
 * Counters count calls of the kind (write = pwritev/fallocate/truncate).
 * 0 disables a rule.
 */
#ifndef QUBLK_IO_FAULT_H
#define QUBLK_IO_FAULT_H

#include "common/io.h"

struct io_fault_cfg {
	unsigned long fail_after;
	int fail_errno;             /* default EIO */
	unsigned long drop_after;
	unsigned long read_fail_after;
	bool reorder;
	unsigned long seed;
};

struct io_fault_stats {
	unsigned long writes, flushes, reads, dropped, failed;
};

/* Wrap @inner (owned by the wrapper from then on).  Returns -errno. */
int io_fault_wrap(struct io_file *inner, const struct io_fault_cfg *cfg, struct io_file **out);
void io_fault_get_stats(struct io_file *f, struct io_fault_stats *st);
/* True once drop_after has been reached (the simulated power cut). */
bool io_fault_crashed(struct io_file *f);
/* Parse "fail_after=N,drop_after=N,read_fail_after=N,errno=N,reorder=1,seed=N". */
int io_fault_parse(const char *spec, struct io_fault_cfg *cfg);

#endif
