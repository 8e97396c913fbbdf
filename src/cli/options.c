/* SPDX-License-Identifier: MIT */
/*
 * qemu-img's -o OPTIONS for a new image (qublk create, qublk convert):
 * a comma-separated key=value list applied to struct qcow2_create_opts.
 * Parsing only; the values are checked against each other where the
 * image is made (qcow2_create).  Single-threaded tool code.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"
#include "qcow2/format.h"

static int parse_bool(const char *v, bool *out)
{
	if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes"))
		*out = true;
	else if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no"))
		*out = false;
	else
		return -EINVAL;
	return 0;
}

/* Apply one key=value.  Returns 0 or -EINVAL with a message logged. */
static int apply_option(struct qcow2_create_opts *q, const char **raw_bad, char *kv)
{
	char *v = strchr(kv, '=');
	uint64_t n;

	if (!v) {
		log_error("option '%s' needs a value (key=value)", kv);
		return -EINVAL;
	}
	*v++ = '\0';
	if (strcmp(kv, "preallocation"))
		*raw_bad = kv;
	if (!strcmp(kv, "cluster_size")) {
		if (parse_size(v, &n) || n > UINT32_MAX)
			goto bad;
		q->cluster_size = (uint32_t)n;
	} else if (!strcmp(kv, "compat")) {
		if (!strcmp(v, "0.10") || !strcmp(v, "v2"))
			q->version = 2;
		else if (!strcmp(v, "1.1") || !strcmp(v, "v3"))
			q->version = 3;
		else
			goto bad;
	} else if (!strcmp(kv, "lazy_refcounts")) {
		if (parse_bool(v, &q->lazy_refcounts))
			goto bad;
	} else if (!strcmp(kv, "refcount_bits")) {
		char *end;
		errno = 0;
		unsigned long b = strtoul(v, &end, 10);
		if (errno || *end || end == v || b == 0 || b > 64 || (b & (b - 1)))
			goto bad;
		q->refcount_bits = (uint32_t)b;
	} else if (!strcmp(kv, "preallocation")) {
		if (!strcmp(v, "off"))
			q->prealloc = QCOW2_PREALLOC_OFF;
		else if (!strcmp(v, "metadata"))
			q->prealloc = QCOW2_PREALLOC_METADATA;
		else if (!strcmp(v, "falloc"))
			q->prealloc = QCOW2_PREALLOC_FALLOC;
		else if (!strcmp(v, "full"))
			q->prealloc = QCOW2_PREALLOC_FULL;
		else
			goto bad;
	} else if (!strcmp(kv, "compression_type")) {
		if (!strcmp(v, "zlib"))
			q->compression_type = QCOW2_COMPRESSION_ZLIB;
		else if (!strcmp(v, "zstd"))
			q->compression_type = QCOW2_COMPRESSION_ZSTD;
		else
			goto bad;
	} else if (!strcmp(kv, "backing_file")) {
		q->backing_file = v;
	} else if (!strcmp(kv, "backing_fmt")) {
		q->backing_format = v;
	} else if (!strcmp(kv, "extended_l2")) {
		if (parse_bool(v, &q->extended_l2))
			goto bad;
	} else if (!strcmp(kv, "data_file")) {
		q->data_file = v;
	} else if (!strcmp(kv, "data_file_raw")) {
		if (parse_bool(v, &q->data_file_raw))
			goto bad;
	} else {
		log_error("unknown option '%s'", kv);
		return -EINVAL;
	}
	return 0;
bad:
	log_error("invalid value '%s' for option '%s'", v, kv);
	return -EINVAL;
}

int cli_parse_create_options(char *list, struct qcow2_create_opts *q, const char **raw_bad)
{
	char *save = NULL;

	for (char *kv = strtok_r(list, ",", &save); kv; kv = strtok_r(NULL, ",", &save))
		if (apply_option(q, raw_bad, kv))
			return -EINVAL;
	return 0;
}
