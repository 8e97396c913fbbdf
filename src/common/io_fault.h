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
 *  - fail_flush: exactly the Nth flush fails with fail_errno and does not
 *    reach the inner file; earlier and later flushes pass through (any
 *    stickiness a test then sees is the io layer's or the driver's);
 *  - log: every mutating call is appended to a caller-owned log, in the
 *    order the calls were made, with its data, and its completion is
 *    stamped when it returns (see struct io_fault_log).  Recording
 *    changes nothing else: with no other rule everything passes through
 *    to the inner file.  Crash-state simulators rebuild possible on-disk
 *    states from the log (tests/unit/test_powercut.c).
 * Counters count calls of the kind (write = pwritev/fallocate/truncate).
 * 0 (NULL) disables a rule.
 */
#ifndef QUBLK_IO_FAULT_H
#define QUBLK_IO_FAULT_H

#include "common/io.h"

enum io_fault_kind {
	IO_FAULT_WRITE,
	IO_FAULT_FALLOCATE,
	IO_FAULT_TRUNCATE,
	IO_FAULT_FLUSH,
};

#define IO_FAULT_NOT_DONE UINT64_MAX

/*
 * One mutating call.  The log's clock ticks once when a call starts and
 * once when it returns, so @start and @done order every call against
 * every other: a flush guarantees exactly the writes whose @done is
 * below its @start (writes still in flight when it started are not
 * covered).  Callers may read the clock (io_fault_log_clock) to stamp
 * events of their own on the same time line.
 */
struct io_fault_rec {
	enum io_fault_kind kind;
	int mode;                   /* fallocate: FALLOC_FL_* */
	int result;                 /* 0 or -errno, once done */
	uint64_t off, len;          /* truncate: off = the new size, len = 0 */
	uint64_t start, done;       /* clock ticks; done = IO_FAULT_NOT_DONE while in flight */
	unsigned char *data;        /* write: a copy of the bytes (len), else NULL */
};

struct io_fault_log {
	struct io_fault_rec *recs;  /* in order of @start */
	size_t n, cap;
	uint64_t clock;
	int error;                  /* -ENOMEM once a record could not be kept */
};

struct io_fault_cfg {
	unsigned long fail_after;
	int fail_errno;             /* default EIO */
	unsigned long drop_after;
	unsigned long read_fail_after;
	unsigned long fail_flush;
	bool reorder;
	unsigned long seed;
	struct io_fault_log *log;   /* not owned; must outlive the file */
};

struct io_fault_stats {
	unsigned long writes, flushes, reads, dropped, failed;
};

/* Wrap @inner (owned by the wrapper from then on).  Returns -errno. */
int io_fault_wrap(struct io_file *inner, const struct io_fault_cfg *cfg, struct io_file **out);
void io_fault_get_stats(struct io_file *f, struct io_fault_stats *st);
/* True once drop_after has been reached (the simulated power cut). */
bool io_fault_crashed(struct io_file *f);
/* Parse "fail_after=N,drop_after=N,read_fail_after=N,fail_flush=N,errno=N,
 * reorder=1,seed=N" (no log: it needs a caller's struct). */
int io_fault_parse(const char *spec, struct io_fault_cfg *cfg);
static inline uint64_t io_fault_log_clock(const struct io_fault_log *log) { return log->clock; }
/* Free the records' data and the array; the log is empty afterwards. */
void io_fault_log_free(struct io_fault_log *log);

#endif
