/* SPDX-License-Identifier: MIT */
/*
 * The backing chain of an image as its headers name it, for the tools
 * that must know which file a block-status depth stands for (map: the
 * layer sizes and file names; convert -B: is that layer the new backing
 * file).
 *
 * A stopgap: bdrv_open() opens exactly this chain but keeps the backing
 * bdrv private to the driver.  The walk follows the engine's rules
 * (bdrv_open_backing: a relative name resolves against the directory of
 * the image that names it; the header's backing format, else the qcow2
 * magic) and reads headers through qcow2_meta_read(), which validates
 * them.  It takes no lock: the caller holds the chain open through the
 * engine, whose locks cover these files.  Once struct bdrv exposes its
 * backing file this file can go.
 *
 * Single-threaded tool code.
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"

#define CHAIN_MAX 64

/* The path bdrv_open_backing() (or bdrv_open_data_file()) opens for @name
 * named by @parent. */
static char *backing_path(const char *parent, const char *name)
{
	char dir[PATH_MAX], *out;

	if (name[0] == '/' || !strchr(parent, '/'))
		return strdup(name);
	snprintf(dir, sizeof(dir), "%s", parent);
	if (asprintf(&out, "%s/%s", dirname(dir), name) < 0)
		return NULL;
	return out;
}

/* Fill @l for the file at @l->path (its data file's path too); *@next
 * gets the backing file's name and format (NULL if none). */
static int layer_read(struct chain_layer *l, const char *format, char **next, char **next_fmt)
{
	struct io_file *f = NULL;
	struct qcow2_meta m = { 0 };
	uint8_t magic[4] = { 0 };
	uint64_t fsize = 0;
	struct stat st;
	char err[256] = "";
	int ret;

	*next = *next_fmt = NULL;
	ret = io_file_open(l->path, IO_OPEN_RDONLY, &f);
	if (ret < 0) {
		log_error("%s: cannot open: %s", l->path, strerror(-ret));
		return ret;
	}
	if (fstat(f->fd, &st) < 0) {
		ret = -errno;
		goto out;
	}
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	ret = io_get_size(f, &fsize);
	if (!ret && !format && fsize >= sizeof(magic))
		ret = io_pread(f, magic, sizeof(magic), 0);
	if (ret < 0)
		goto out;
	if (!format)
		format = get_be32(magic) == QCOW2_MAGIC ? "qcow2" : "raw";
	if (!strcmp(format, "raw")) {
		l->format = "raw";
		l->size = fsize;
	} else if (!strcmp(format, "qcow2")) {
		l->format = "qcow2";
		ret = qcow2_meta_read(f, fsize, &m, err, sizeof(err));
		if (ret < 0)
			goto out;
		l->size = m.h.size;
		if (m.data_file && !(l->data_path = backing_path(l->path, m.data_file)))
			ret = -ENOMEM;
		if (!ret && m.backing_file && !(*next = strdup(m.backing_file)))
			ret = -ENOMEM;
		if (!ret && m.backing_format && !(*next_fmt = strdup(m.backing_format)))
			ret = -ENOMEM;
		qcow2_meta_free(&m);
	} else {
		snprintf(err, sizeof(err), "unknown format '%s'", format);
		ret = -EINVAL;
	}
out:
	if (ret < 0)
		log_error("%s: %s", l->path, err[0] ? err : strerror(-ret));
	io_file_close(f);
	return ret;
}

int chain_read(const char *path, const char *format, struct chain *c)
{
	char *fmt = NULL;
	int ret = 0;

	memset(c, 0, sizeof(*c));
	c->l = calloc(CHAIN_MAX, sizeof(*c->l));
	if (!c->l || !(c->l[0].path = strdup(path)))
		ret = -ENOMEM;
	if (!ret && format && !(fmt = strdup(format)))
		ret = -ENOMEM;
	while (!ret) {
		struct chain_layer *l = &c->l[c->n++];
		char *next, *next_fmt;

		ret = layer_read(l, fmt, &next, &next_fmt);
		free(fmt);
		fmt = NULL;
		if (ret < 0 || !next)
			break;
		for (unsigned i = 0; i + 1 < c->n; i++)
			if (c->l[i].dev == l->dev && c->l[i].ino == l->ino)
				ret = -ELOOP;
		if (!ret && c->n == CHAIN_MAX)
			ret = -ELOOP;
		if (!ret && !(c->l[c->n].path = backing_path(l->path, next)))
			ret = -ENOMEM;
		free(next);
		fmt = next_fmt;
		if (ret == -ELOOP)
			log_error("%s: backing chain loops or is deeper than %d", path, CHAIN_MAX);
	}
	free(fmt);
	if (ret < 0)
		chain_free(c);
	return ret;
}

void chain_free(struct chain *c)
{
	if (c->l)
		for (unsigned i = 0; i < CHAIN_MAX; i++) {
			free(c->l[i].path);
			free(c->l[i].data_path);
		}
	free(c->l);
	memset(c, 0, sizeof(*c));
}
