/* SPDX-License-Identifier: MIT */
/*
 * qublk map: how an image's guest ranges map onto its backing chain, in
 * qemu-img map's words (start, length, depth, present, zero, data,
 * offset), as JSON or qemu-img's human table.  Read-only, one coroutine
 * on the thread's loop; never reads guest data.
 *
 * Everything comes from bdrv_co_block_status() on the top image (it
 * walks the chain), translated to qemu-img map's fields with the chain
 * read from the headers (chain.c):
 *
 *   engine (flags, depth d: 1 = top)     qemu-img map
 *   DATA at d                            depth d-1, present, data
 *   ZERO at d, inside layer d            depth d-1, present, zero
 *   ZERO at d >= 2, past the end of      depth d-2, not present, zero
 *     layer d (a short backing file)       (QEMU: zeros the layer above
 *                                          makes up, not allocated)
 *   ZERO at d = 0 (no layer has it)      depth of the last layer, not
 *                                          present, zero
 *
 * "offset" (and, in the table, the file) is where block status says the
 * range is stored (BDRV_BLOCK_OFFSET_VALID): the guest offset in a raw
 * layer; in a qcow2 layer the host offset of normal clusters and of zero
 * clusters that keep a host cluster, in the image or its external data
 * file; none for compressed clusters, for which the table is refused as
 * qemu-img refuses it.  Neighbours merge as qemu-img merges them (same
 * flags and depth, contiguous in the same file).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/bdrv.h"
#include "cli/cli.h"
#include "common/aio.h"
#include "common/util.h"

struct map_entry {
	uint64_t start, length;
	unsigned depth;
	bool present, zero, data;
	bool has_offset;
	uint64_t offset;
	const char *filename;     /* the layer's file */
};

struct map_job {
	struct bdrv *bs;
	const struct chain *chain;
	uint64_t start, end;
	bool json;
	int error;
};

/* The entry for @n bytes at @off that block status described as (@st, @d,
 * @host). */
static int to_entry(const struct chain *c, uint64_t off, uint64_t n, int st, unsigned d,
		    uint64_t host, struct map_entry *e)
{
	*e = (struct map_entry){ .start = off, .length = n };
	if (d > c->n)
		return -ESTALE;    /* the headers name a shorter chain than the engine opened */
	if (d == 0) {
		e->depth = c->n - 1;
		e->zero = true;
		if (st & BDRV_BLOCK_OFFSET_VALID) {
			/* A host cluster the last image keeps (block status). */
			e->has_offset = true;
			e->offset = host;
			e->filename = c->l[c->n - 1].data_path ? c->l[c->n - 1].data_path
							       : c->l[c->n - 1].path;
		}
		return 0;
	}
	const struct chain_layer *l = &c->l[d - 1];
	if (!(st & BDRV_BLOCK_DATA) && d >= 2 && off >= l->size) {
		e->depth = d - 2;
		e->zero = true;
		return 0;
	}
	e->depth = d - 1;
	e->present = true;
	e->data = st & BDRV_BLOCK_DATA;
	e->zero = st & BDRV_BLOCK_ZERO;
	if (st & BDRV_BLOCK_OFFSET_VALID) {
		/* As qemu-img: the file only with the offset into it. */
		e->has_offset = true;
		e->offset = host;
		e->filename = l->data_path ? l->data_path : l->path;
	}
	return 0;
}

/* qemu-img map's entry_mergeable(). */
static bool mergeable(const struct map_entry *a, const struct map_entry *b)
{
	if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
	    a->present != b->present || a->has_offset != b->has_offset)
		return false;
	if ((a->filename == NULL) != (b->filename == NULL) ||
	    (a->filename && strcmp(a->filename, b->filename)))
		return false;
	return !a->has_offset || a->offset + a->length == b->offset;
}

/* Returns -EINVAL when the table cannot show @e (logged). */
static int print_entry(const struct map_job *j, const struct map_entry *e, bool last)
{
	if (j->json) {
		printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u,"
		       " \"present\": %s, \"zero\": %s, \"data\": %s",
		       e->start, e->length, e->depth, e->present ? "true" : "false",
		       e->zero ? "true" : "false", e->data ? "true" : "false");
		if (e->has_offset)
			printf(", \"offset\": %" PRIu64, e->offset);
		fputs(last ? "}" : "},\n", stdout);
		return 0;
	}
	if (e->data && !e->has_offset) {
		/* qemu-img's words: the table has no way to show these. */
		log_error("File contains external, encrypted or compressed clusters.");
		return -EINVAL;
	}
	if (e->data && !e->zero)
		printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
		       e->offset, e->filename);
	return 0;
}

static void map_fn(void *opaque)
{
	struct map_job *j = opaque;
	struct map_entry cur = { .start = j->start }, next;
	uint64_t off = j->start;

	while (off < j->end) {
		uint64_t n = 0, host = 0;
		unsigned d = 0;
		int st = bdrv_co_block_status_host(j->bs, off, j->end - off, &n, &d, &host);
		if (st >= 0)
			st = to_entry(j->chain, off, n, st, d, host, &next) < 0 ? -ESTALE : st;
		if (st < 0) {
			log_error("%s: block status at offset %" PRIu64 ": %s", j->bs->filename,
				  off, st == -ESTALE ? "the backing chain changed under us"
						     : strerror(-st));
			j->error = st;
			return;
		}
		off += n;
		if (cur.length && mergeable(&cur, &next)) {
			cur.length += next.length;
			continue;
		}
		if (cur.length && print_entry(j, &cur, false) < 0) {
			j->error = -EINVAL;
			return;
		}
		cur = next;
	}
	/* An empty range prints one empty entry, as qemu-img does. */
	j->error = print_entry(j, &cur, true);
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk map [--output human|json] [-f FMT] [-U] [--start-offset OFF]\n"
		"                 [--max-length LEN] FILE\n"
		"\n"
		"Show how FILE's guest ranges map onto its backing chain, as qemu-img map:\n"
		"start, length, depth (0 = FILE, 1 = its backing file, ...), present (some\n"
		"layer has the range), zero (reads as zeros), data, offset (host offset).\n"
		"Metadata only: no guest data is read.\n"
		"\n"
		"  --output FMT        human (default: the mapped data ranges, qemu-img's\n"
		"                      table) or json (every range)\n"
		"  -f, --format FMT    qcow2 or raw (default: probe)\n"
		"  -U, --force-share   open even if another process writes the image\n"
		"  -s, --start-offset OFF   first byte to map (default 0)\n"
		"  -l, --max-length LEN     bytes to map (default: to the end)\n"
		"  -h, --help          show this help\n"
		"\n"

		"Exit status: 0 success, 1 failure, 2 usage error.\n");
}

int cmd_map(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256 };
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "format", required_argument, NULL, 'f' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "start-offset", required_argument, NULL, 's' },
		{ "max-length", required_argument, NULL, 'l' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct bdrv_opts opts = { .flags = BDRV_O_RDONLY };
	struct map_job j = { 0 };
	uint64_t start = 0, max_len = UINT64_MAX;
	struct chain chain;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "f:Us:l:h", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_OUTPUT:
			if (!strcmp(optarg, "json") || !strcmp(optarg, "human")) {
				j.json = !strcmp(optarg, "json");
				break;
			}
			log_error("--output must be human or json, not '%s'", optarg);
			return EXIT_USAGE;
		case 'f':
			if (strcmp(optarg, "qcow2") && strcmp(optarg, "raw")) {
				log_error("unknown format '%s' (qcow2 or raw)", optarg);
				return EXIT_USAGE;
			}
			opts.format = optarg;
			break;
		case 'U':
			opts.flags |= BDRV_O_FORCE_SHARE;
			break;
		case 's':
		case 'l':
			if (parse_size(optarg, c == 's' ? &start : &max_len) < 0) {
				log_error("invalid %s '%s'", c == 's' ? "offset" : "length", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 1) {
		log_error(argc - optind < 1 ? "missing FILE" : "too many arguments");
		usage(stderr);
		return EXIT_USAGE;
	}
	const char *path = argv[optind];

	if (bdrv_open(path, &opts, &j.bs) < 0)
		return EXIT_FAIL;
	if (chain_read(path, opts.format, &chain) < 0) {
		bdrv_close(j.bs);
		return EXIT_FAIL;
	}
	j.chain = &chain;
	j.start = MIN(start, j.bs->size);
	j.end = j.start + MIN(max_len, j.bs->size - j.start);

	if (!j.json)
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
	else
		putchar('[');
	ret = aio_run_coroutine(map_fn, &j);
	if (ret < 0) {
		log_error("cannot start the event loop: %s", strerror(-ret));
		j.error = ret;
	}
	if (j.json && !j.error)
		puts("]");
	chain_free(&chain);
	bdrv_close(j.bs);
	if (fflush(stdout) == EOF && !j.error) {
		log_error("writing the map: %s", strerror(errno));
		j.error = -EIO;
	}
	return j.error ? EXIT_FAIL : EXIT_OK;
}
