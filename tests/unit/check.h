/* SPDX-License-Identifier: MIT */
/* The unit tests' assertion: CHECK(cond) or CHECK(cond, "fmt", args...)
 * counts a pass or prints the failing condition (and the message) and
 * counts a failure.  check_summary() prints the runner's closing line
 * "N passed, N failed" and returns the exit status. */
#ifndef QUBLK_TEST_CHECK_H
#define QUBLK_TEST_CHECK_H

#include <stdarg.h>
#include <stdio.h>

static int passed, failed;

static inline __attribute__((format(printf, 1, 2))) void check_msg(const char *fmt, ...)
{
	va_list ap;

	/* fmt is " " followed by the caller's format (see CHECK). */
	if (fmt[1]) {
		fputc(':', stderr);
		va_start(ap, fmt);
		vfprintf(stderr, fmt, ap);
		va_end(ap);
	}
	fputc('\n', stderr);
}

/* The message, when given, must start with a string literal. */
#define CHECK(cond, ...)                                                     \
	do {                                                                 \
		if (cond) {                                                  \
			passed++;                                            \
		} else {                                                     \
			failed++;                                            \
			fprintf(stderr, "FAIL %s:%d: %s", __FILE__, __LINE__, #cond); \
			check_msg(" " __VA_ARGS__);                           \
		}                                                            \
	} while (0)

#endif
