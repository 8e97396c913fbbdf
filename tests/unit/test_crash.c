/* SPDX-License-Identifier: MIT */
/*
 * Crash consistency of the qcow2 driver.  The image file sits on the
 * io_fault backend in reorder mode: writes stay volatile until a flush,
 * and at the Nth mutating call a random subset of the volatile writes
 * reaches the file and everything after is lost (a power cut on a disk
 * with a write cache).  After each simulated crash:
 *   - `qemu-img check` must find no corruption (leaked clusters allowed);
 *   - every byte that was written and flushed before the crash, and not
 *     rewritten since, reads back (checked through qemu-img convert).
 * The workload mixes allocating writes, rewrites, discards, write-zeroes
 * and flushes on images with 512 B, 4 KiB and 64 KiB clusters, v2 and v3.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/io_fault.h"
#include "common/util.h"

#include "check.h"


#define IMG_SIZE (8u << 20)
static char dir[] = "/dev/shm/qublk-crash-XXXXXX";
static unsigned char *model, *durable, *dirty;   /* dirty: byte written since last durable flush */
static struct bdrv *bs;
static uint64_t rng;
static unsigned cluster;

static uint64_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

struct crash_cfg { unsigned long drop_after; unsigned long seed; };

static int wrap(struct io_file *f, struct io_file **out, void *opaque)
{
	struct crash_cfg *c = opaque;
	struct io_fault_cfg fc = { .drop_after = c->drop_after, .reorder = true, .seed = c->seed };
	return io_fault_wrap(f, &fc, out);
}

static void mark(uint64_t off, uint64_t len, const void *data)
{
	if (data)
		memcpy(model + off, data, len);
	else
		memset(model + off, 0, len);
	memset(dirty + off, 1, len);
}

static void workload(void *opaque)
{
	(void)opaque;
	static unsigned char buf[3 * 65536 + 4096];
	for (int op = 0; op < 120; op++) {
		/* After the power cut the machine is gone: reads would see
		 * the lost writes missing, which no real system observes. */
		if (io_fault_crashed(bs->file))
			return;
		unsigned kind = rnd() % 10;
		uint64_t len = 1 + rnd() % (2 * cluster + 1000);
		uint64_t off = rnd() % (IMG_SIZE - len);
		int ret = 0;
		if (kind < 6) {
			memset(buf, (int)(rnd() | 1), len);
			ret = bdrv_co_pwrite(bs, off, len, buf, 0);
			if (!ret)
				mark(off, len, buf);
		} else if (kind == 6) {
			ret = bdrv_co_pwrite_zeroes(bs, off, len, (rnd() & 1) ? BDRV_REQ_MAY_UNMAP : 0);
			if (!ret)
				mark(off, len, NULL);
		} else if (kind == 7) {
			/* Discard leaves partial clusters alone, zeroes the
			 * rest; either way the range's content is not
			 * asserted afterwards unless rewritten. */
			ret = bdrv_co_discard(bs, off, len);
			if (!ret) {
				uint64_t s = ALIGN_UP(off, (uint64_t)cluster), e = ALIGN_DOWN(off + len, (uint64_t)cluster);
				memset(dirty + off, 1, len);
				if (s < e)
					memset(model + s, 0, e - s);
			}
		} else {
			ret = bdrv_co_flush(bs);
			if (!ret && !io_fault_crashed(bs->file)) {
				memcpy(durable, model, IMG_SIZE);
				memset(dirty, 0, IMG_SIZE);
			}
		}
		if (ret) {
			fprintf(stderr, "op %d kind %u failed: %s\n", op, kind, strerror(-ret));
			failed++;
			return;
		}
	}
}

static int run(const char *cmd)
{
	int r = system(cmd);
	return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

static void one(const char *opts, unsigned cl, unsigned long drop_after, unsigned long seed)
{
	char img[512], raw[512], cmd[2048];
	struct crash_cfg cc = { drop_after, seed };
	struct bdrv_opts o = { .format = "qcow2", .wrap_file = wrap, .wrap_opaque = &cc };

	cluster = cl;
	rng = seed * 2654435761u + drop_after;
	snprintf(img, sizeof(img), "%s/c.qcow2", dir);
	snprintf(raw, sizeof(raw), "%s/c.raw", dir);
	snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 -o cluster_size=%u,%s %s %u",
		 cl, opts, img, IMG_SIZE);
	if (run(cmd)) {
		CHECK(0, "qemu-img create failed");
		return;
	}
	memset(model, 0, IMG_SIZE);
	memset(durable, 0, IMG_SIZE);
	memset(dirty, 0, IMG_SIZE);
	if (bdrv_open(img, &o, &bs) < 0) {
		CHECK(0, "open failed");
		return;
	}
	aio_run_coroutine(workload, NULL);
	bdrv_close(bs);

	/* qemu-img check: exit 0 clean, 3 leaks only; 2 = corruption. */
	snprintf(cmd, sizeof(cmd), "qemu-img check -q %s >/dev/null 2>&1", img);
	int r = run(cmd);
	CHECK(r == 0 || r == 3, "%s cl=%u drop_after=%lu seed=%lu: qemu-img check exit %d",
	      opts, cl, drop_after, seed, r);
	if (r != 0 && r != 3) {
		snprintf(cmd, sizeof(cmd), "qemu-img check %s | head -20 >&2", img);
		run(cmd);
		return;
	}
	snprintf(cmd, sizeof(cmd), "qemu-img convert -f qcow2 -O raw %s %s", img, raw);
	if (run(cmd)) {
		CHECK(0, "qemu-img convert failed");
		return;
	}
	FILE *f = fopen(raw, "rb");
	unsigned char *back = malloc(IMG_SIZE);
	size_t n = f ? fread(back, 1, IMG_SIZE, f) : 0;
	if (f)
		fclose(f);
	CHECK(n == IMG_SIZE, "short raw");
	uint64_t bad = UINT64_MAX;
	for (uint64_t i = 0; i < IMG_SIZE && n == IMG_SIZE; i++) {
		if (!dirty[i] && back[i] != durable[i]) {
			bad = i;
			break;
		}
	}
	CHECK(bad == UINT64_MAX, "%s cl=%u drop_after=%lu seed=%lu: flushed data lost at %llu",
	      opts, cl, drop_after, seed, (unsigned long long)bad);
	free(back);
}

int main(int argc, char **argv)
{
	static const struct { const char *opts; unsigned cl; } cfgs[] = {
		{ "compat=1.1", 65536 },
		{ "compat=1.1,refcount_bits=1", 4096 },
		{ "compat=0.10", 512 },
		{ "compat=1.1,refcount_bits=64", 512 },
	};
	unsigned rounds = argc > 1 ? (unsigned)atoi(argv[1]) : 12;

	log_set_prog("test_crash");
	if (system("qemu-img --version >/dev/null 2>&1")) {
		printf("qemu-img missing: skip\n");
		return 77;
	}
	if (!mkdtemp(dir))
		return 1;
	model = malloc(IMG_SIZE);
	durable = malloc(IMG_SIZE);
	dirty = malloc(IMG_SIZE);
	for (size_t c = 0; c < ARRAY_SIZE(cfgs); c++)
		for (unsigned i = 0; i < rounds; i++)
			one(cfgs[c].opts, cfgs[c].cl, 5 + (i * 37) % 400, i + 1);
	/* No crash at all: the image must be clean and complete. */
	one("compat=1.1", 65536, 0, 99);
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd)) {}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
