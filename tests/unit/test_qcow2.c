/* SPDX-License-Identifier: MIT */
/*
 * qcow2 engine tests.  Each scenario prepares an image with qemu-img
 * (in /dev/shm), copies it, applies the same qemu-io style operations to
 * one copy through our driver (bdrv_open + bdrv_co_* inside
 * aio_run_coroutine) and to the other with qemu-io, then requires:
 * qemu-img check clean (no errors, no leaks) on ours, qemu-img compare
 * equal, and the same qemu-img map (host offsets ignored).
 * Needs qemu-img and qemu-io; skips (77) without them.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/aio.h"
#include "common/coro.h"
#include "common/util.h"

#include "check.h"

static char dir[200] = "/dev/shm/qublk-test-qcow2-XXXXXX";


static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	int n, st;

	n = snprintf(cmd, sizeof(cmd), "cd %s && (", dir);
	va_start(ap, fmt);
	vsnprintf(cmd + n, sizeof(cmd) - n, fmt, ap);
	va_end(ap);
	strncat(cmd, ")", sizeof(cmd) - strlen(cmd) - 1);
	st = system(cmd);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}

/* ---- running operations through the driver ----------------------------- */

#define MAXBUF (8u << 20)
static uint8_t *buf;

struct job {
	const char *path;
	const char *const *ops;
	int ret;
	unsigned open_flags;
};

/* "write [-P pat] [-z [-u]] [-c] off len", "discard off len",
 * "read -P pat off len", "flush": the qemu-io subset we need. */
static int run_op(struct bdrv *bs, const char *op)
{
	char cmd[16], a[5][32];
	int pat = 0xcd, n, ntok;
	bool zero = false, unmap = false, fua = false, compress = false;
	uint64_t off = 0, len = 0;
	int i = 0;

	ntok = sscanf(op, "%15s %31s %31s %31s %31s %31s", cmd, a[0], a[1], a[2], a[3], a[4]);
	if (ntok < 1)
		return -EINVAL;
	if (!strcmp(cmd, "flush"))
		return bdrv_co_flush(bs);
	n = ntok - 1;
	while (i < n && a[i][0] == '-') {
		if (!strcmp(a[i], "-P"))
			pat = (int)strtol(a[++i], NULL, 0);
		else if (!strcmp(a[i], "-z"))
			zero = true;
		else if (!strcmp(a[i], "-u"))
			unmap = true;
		else if (!strcmp(a[i], "-f"))
			fua = true;
		else if (!strcmp(a[i], "-c"))
			compress = true;
		i++;
	}
	if (i + 2 != n || parse_size(a[i], &off) || parse_size(a[i + 1], &len) || len > MAXBUF)
		return -EINVAL;
	if (!strcmp(cmd, "write")) {
		if (zero)
			return bdrv_co_pwrite_zeroes(bs, off, len, unmap ? BDRV_REQ_MAY_UNMAP : 0);
		memset(buf, pat, len);
		if (compress) {
			/* One cluster at a time, as qemu-io's write -c. */
			for (uint64_t d = 0; d < len; d += bs->cluster_size) {
				uint64_t chunk = MIN(bs->cluster_size, len - d);
				struct iovec v = { buf + d, chunk };
				int ret = bdrv_co_pwritev_compressed(bs, off + d, chunk, &v, 1);
				if (ret < 0)
					return ret;
			}
			return 0;
		}
		return bdrv_co_pwrite(bs, off, len, buf, fua ? BDRV_REQ_FUA : 0);
	}
	if (!strcmp(cmd, "discard"))
		return bdrv_co_discard(bs, off, len);
	if (!strcmp(cmd, "read")) {
		int ret = bdrv_co_pread(bs, off, len, buf);
		if (ret < 0)
			return ret;
		for (uint64_t k = 0; k < len; k++)
			if (buf[k] != (uint8_t)pat)
				return -EILSEQ;
		return 0;
	}
	return -EINVAL;
}

/* Cache sizes for the next opens (0 = driver default). */
static uint64_t l2_cache, rc_cache;

static void job_fn(void *opaque)
{
	struct job *j = opaque;
	struct bdrv_opts o = { .flags = j->open_flags, .l2_cache_size = l2_cache,
			       .refcount_cache_size = rc_cache };
	struct bdrv *bs;

	j->ret = bdrv_open(j->path, &o, &bs);
	if (j->ret < 0)
		return;
	for (const char *const *op = j->ops; *op && j->ret == 0; op++) {
		j->ret = run_op(bs, *op);
		if (j->ret < 0)
			fprintf(stderr, "op '%s' failed: %s\n", *op, strerror(-j->ret));
	}
	bdrv_close(bs);
}

static int run_ops(const char *path, const char *const *ops)
{
	char full[512];
	struct job j = { .path = full, .ops = ops };
	int ret;

	snprintf(full, sizeof(full), "%s/%s", dir, path);
	ret = aio_run_coroutine(job_fn, &j);
	return ret < 0 ? ret : j.ret;
}

static int qemu_io_ops(const char *path, const char *const *ops)
{
	char cmd[8192] = "";
	size_t n = 0;

	for (const char *const *op = ops; *op; op++) {
		if (!strcmp(*op, "flush"))
			continue;
		n += snprintf(cmd + n, sizeof(cmd) - n, " -c '%s'", *op);
	}
	return sh("qemu-io -f qcow2%s %s >/dev/null", cmd, path);
}

/* qemu-img map as text with host offsets dropped and equal neighbours
 * merged (our host layout may differ from QEMU's). */
static int norm_map(const char *img, char *out, size_t outlen)
{
	char cmd[512], line[512];
	long long ps = -1, pl = 0;
	char pk[64] = "";
	size_t n = 0;
	FILE *f;

	snprintf(cmd, sizeof(cmd), "qemu-img map --output=json %s/%s", dir, img);
	f = popen(cmd, "r");
	if (!f)
		return -1;
	out[0] = 0;
	while (fgets(line, sizeof(line), f)) {
		long long st, len;
		int depth;
		char k[64];
		const char *p = strstr(line, "\"start\"");
		if (!p || sscanf(p, "\"start\": %lld, \"length\": %lld, \"depth\": %d",
				 &st, &len, &depth) != 3)
			continue;
		/* On allocated data, "zero" only says the host file has a
		 * hole there: that depends on how the host range was zeroed
		 * (explicit zeros, ZERO_RANGE, never-written tail of a fresh
		 * cluster), not on the image, so it is not compared. */
		bool data = strstr(line, "\"data\": true") != NULL;
		snprintf(k, sizeof(k), "d%d%s%s%s", depth,
			 strstr(line, "\"present\": true") ? "P" : "-",
			 !data && strstr(line, "\"zero\": true") ? "Z" : "-",
			 data ? "D" : "-");
		if (ps >= 0 && !strcmp(k, pk) && ps + pl == st) {
			pl += len;
			continue;
		}
		if (ps >= 0)
			n += snprintf(out + n, outlen - n, "%lld+%lld:%s\n", ps, pl, pk);
		ps = st;
		pl = len;
		snprintf(pk, sizeof(pk), "%s", k);
		if (n >= outlen)
			break;
	}
	if (ps >= 0 && n < outlen)
		snprintf(out + n, outlen - n, "%lld+%lld:%s\n", ps, pl, pk);
	return pclose(f) == 0 ? 0 : -1;
}

static void verify(const char *name, const char *ours, const char *ref)
{
	static char m1[16384], m2[16384];
	int r1, r2;

	CHECK(sh("qemu-img check -q %s >check.out 2>&1 || { cat check.out >&2; false; }", ours) == 0,
	      "%s: qemu-img check %s", name, ours);
	CHECK(sh("qemu-img compare -q %s %s", ours, ref) == 0, "%s: compare", name);
	r1 = norm_map(ours, m1, sizeof(m1));
	r2 = norm_map(ref, m2, sizeof(m2));
	CHECK(r1 == 0 && r2 == 0 && !strcmp(m1, m2), "%s: map differs\nours:\n%sqemu:\n%s",
	      name, m1, m2);
}

/* Prepare img.qcow2 with @prep (shell), copy to ref.qcow2, apply @ops
 * through us and through qemu-io, verify. */
static void scenario(const char *name, const char *prep, const char *const *ops)
{
	int ret;

	sh("rm -f *.qcow2 *.raw");
	if (sh("%s >prep.out 2>&1 || { cat prep.out >&2; false; }", prep) != 0) {
		CHECK(0, "%s: prep failed", name);
		return;
	}
	sh("cp img.qcow2 ref.qcow2");
	ret = run_ops("img.qcow2", ops);
	CHECK(ret == 0, "%s: ops through qublk: %s", name, strerror(-ret));
	CHECK(qemu_io_ops("ref.qcow2", ops) == 0, "%s: qemu-io", name);
	verify(name, "img.qcow2", "ref.qcow2");
	fprintf(stderr, "scenario %s done\n", name);
}

/* ---- scenarios ------------------------------------------------------ */

static const char *const basic_ops[] = {
	"write -P 0x11 0 4k",           /* partial cluster: COW from zeros */
	"write -P 0x22 1k 1k",          /* in place */
	"write -P 0x33 60k 200k",       /* spans clusters, unaligned */
	"write -P 0x44 1m 1m",
	"flush",
	"write -z 1m 64k",              /* zero, keep allocation */
	"write -z -u 1088k 64k",        /* zero, unmap */
	"write -z 1200k 10k",           /* partial on data: explicit zeros */
	"write -z 3m 100k",             /* on unallocated: zero clusters */
	"discard 1280k 128k",
	"discard 1500k 10k",            /* partial: untouched */
	"write -P 0x55 1m 4k",          /* write into a zeroed allocated cluster */
	"write -P 0x56 3m 512",         /* write into a zero cluster */
	"write -P 0x66 3900k 104k",     /* up to the unaligned end */
	"read -P 0x66 3900k 104k",
	"discard 3968k 36k",            /* whole partial last cluster */
	"write -z 3800k 36k",
	"write -P 0x77 -f 8k 8k",
	NULL,
};

static void matrix(void)
{
	static const struct {
		const char *opts;
	} m[] = {
		{ "cluster_size=65536" },
		{ "cluster_size=512" },
		{ "cluster_size=2097152" },
		{ "cluster_size=4096,compat=0.10" },
		{ "cluster_size=65536,compat=0.10" },
		{ "cluster_size=65536,refcount_bits=1" },
		{ "cluster_size=4096,refcount_bits=64" },
		{ "cluster_size=1024,refcount_bits=8" },
	};
	char prep[512], name[128];

	for (size_t i = 0; i < ARRAY_SIZE(m); i++) {
		snprintf(prep, sizeof(prep), "qemu-img create -q -f qcow2 -o %s img.qcow2 4100096",
			 m[i].opts);
		snprintf(name, sizeof(name), "basic[%s]", m[i].opts);
		scenario(name, prep, basic_ops);
	}
}

static void backing(void)
{
	static const char *const ops[] = {
		"write -P 0x11 4k 4k",          /* COW from backing */
		"write -P 0x12 100k 1k",
		"write -z 200k 64k",
		"write -z -u 300k 1k",
		"discard 384k 128k",
		"write -P 0x13 1m 8k",          /* beyond the backing file's size */
		"write -z 1050k 4k",
		NULL,
	};
	static const char *const v2ops[] = {
		"write -P 0x11 4k 4k",
		"write -z 128k 64k",            /* v2 with backing: real zeros */
		"write -z 300k 10k",
		"discard 384k 128k",            /* v2: falls through to backing */
		NULL,
	};
	scenario("backing-v3",
		 "qemu-img create -q -f qcow2 base.qcow2 1M && "
		 "qemu-io -f qcow2 -c 'write -P 0xaa 0 1M' base.qcow2 >/dev/null && "
		 "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 2M", ops);
	scenario("backing-raw-v3",
		 "truncate -s 1M base.raw && qemu-io -f raw -c 'write -P 0xab 0 600k' base.raw >/dev/null && "
		 "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 2M", ops);
	scenario("backing-v2",
		 "qemu-img create -q -f qcow2 -o compat=0.10 base.qcow2 1M && "
		 "qemu-io -f qcow2 -c 'write -P 0xaa 0 1M' base.qcow2 >/dev/null && "
		 "qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 img.qcow2 1M", v2ops);
	scenario("backing-chain3",
		 "qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 1M && "
		 "qemu-io -f qcow2 -c 'write -P 0xa1 0 512k' base.qcow2 >/dev/null && "
		 "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 1M && "
		 "qemu-io -f qcow2 -c 'write -P 0xa2 256k 512k' mid.qcow2 >/dev/null && "
		 "qemu-img create -q -f qcow2 -o cluster_size=16384 -b mid.qcow2 -F qcow2 img.qcow2 2M",
		 ops);
}

static void compressed(void)
{
	static const char *const ops[] = {
		"read -P 0x5c 0 64k",
		"write -P 0x11 4k 4k",          /* COW from a compressed cluster */
		"write -P 0x12 64k 64k",        /* whole compressed cluster replaced */
		"write -z 128k 64k",            /* compressed -> zero (always unmapped) */
		"discard 192k 64k",
		"write -P 0x13 300k 100",
		NULL,
	};
	const char *types[] = { "zlib", "zstd" };
	char prep[1024], name[64];

	for (int i = 0; i < 2; i++) {
		snprintf(prep, sizeof(prep),
			 "qemu-img create -q -f qcow2 src.qcow2 1M && "
			 "qemu-io -f qcow2 -c 'write -P 0x5c 0 512k' -c 'write -P 0x5d 512k 100k' src.qcow2 >/dev/null && "
			 "qemu-img convert -c -O qcow2 -o compression_type=%s src.qcow2 img.qcow2 && "
			 "qemu-img convert -c -O qcow2 -o compression_type=%s,cluster_size=4096 src.qcow2 small.qcow2",
			 types[i], types[i]);
		snprintf(name, sizeof(name), "compressed-%s", types[i]);
		scenario(name, prep, ops);
		/* Full read of a 4 KiB-cluster compressed image vs qemu. */
		snprintf(name, sizeof(name), "compressed-read-%s", types[i]);
		sh("cp small.qcow2 img.qcow2 && cp small.qcow2 ref.qcow2");
		static const char *const rd[] = { "read -P 0x5c 0 512k", "read -P 0x5d 512k 100k",
						  "read -P 0 612k 412k", NULL };
		CHECK(run_ops("img.qcow2", rd) == 0, "%s", name);
		verify(name, "img.qcow2", "ref.qcow2");
		/* Compressed writes by qublk, packed several to a host
		 * cluster, then read, overwritten, zeroed, discarded. */
		static const char *const cw[] = {
			"write -c -P 0x21 0 64k", "write -c -P 0x22 64k 64k",
			"write -c -P 0x23 128k 192k", "write -P 0x24 200k 4k",
			"read -P 0x21 0 64k", "write -z 64k 64k", "discard 256k 64k",
			"write -c -P 0x25 960k 64k", "flush", "write -c -P 0x26 320k 64k",
			NULL,
		};
		snprintf(prep, sizeof(prep),
			 "qemu-img create -q -f qcow2 -o compression_type=%s img.qcow2 1M", types[i]);
		snprintf(name, sizeof(name), "compressed-write-%s", types[i]);
		scenario(name, prep, cw);
		CHECK(sh("qemu-img check img.qcow2 | grep -q ' [1-9][0-9.]*%% compressed'") == 0,
		      "%s: no compressed clusters in the image", name);
		CHECK(sh("qemu-img info img.qcow2 | grep -q 'compression type: %s'", types[i]) == 0,
		      "%s: compression type", name);
		snprintf(prep, sizeof(prep), "qemu-img create -q -f qcow2 -o compression_type=%s,"
			 "cluster_size=4096 img.qcow2 1048064", types[i]);
		static const char *const cw4k[] = {
			"write -c -P 0x31 0 64k", "write -c -P 0x32 1044480 3584",
			"write -P 0x33 2k 1k", "read -P 0x32 1044480 3584", NULL,
		};
		snprintf(name, sizeof(name), "compressed-write-4k-%s", types[i]);
		scenario(name, prep, cw4k);
	}
}

static void snapshots(void)
{
	static const char *const ops[] = {
		"write -P 0x21 0 4k",           /* shared data + shared L2 table: COW both */
		"write -P 0x22 64k 64k",
		"write -z 128k 64k",
		"write -z -u 192k 64k",
		"discard 256k 64k",
		"write -P 0x23 2m 64k",
		NULL,
	};
	scenario("snapshot",
		 "qemu-img create -q -f qcow2 img.qcow2 4M && "
		 "qemu-io -f qcow2 -c 'write -P 0x10 0 1M' img.qcow2 >/dev/null && "
		 "qemu-img snapshot -c s1 img.qcow2", ops);
	/* The snapshot itself must be untouched. */
	CHECK(sh("qemu-img snapshot -a s1 img.qcow2 && qemu-img snapshot -a s1 ref.qcow2 && "
		 "qemu-img compare -q img.qcow2 ref.qcow2 && qemu-img check -q img.qcow2") == 0,
	      "snapshot contents after writes");
}

static void big_and_small_caches(void)
{
	static const char *const big[] = {
		"write -P 0x41 30m 4m",         /* crosses an L2 slice boundary */
		"write -P 0x42 31m 2m",
		"write -z 29m 6m",
		"discard 32m 1m",
		NULL,
	};
	static const char *const big2m[] = {
		"write -P 0x43 1022m 4m",       /* crosses the 1 GiB slice of 2 MiB clusters */
		"discard 1024m 2m",
		NULL,
	};
	scenario("slice-crossing-64k", "qemu-img create -q -f qcow2 img.qcow2 64M", big);
	scenario("slice-crossing-2m",
		 "qemu-img create -q -f qcow2 -o cluster_size=2M img.qcow2 2G", big2m);
	/* Minimal caches: constant eviction, dirty L2 write-back ordering. */
	l2_cache = rc_cache = 1;
	scenario("tiny-cache-512", "qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 4100096",
		 basic_ops);
	scenario("tiny-cache-4k-rc2",
		 "qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=2 img.qcow2 64M", big);
	l2_cache = rc_cache = 0;
}

static void reftable_growth(void)
{
	static const char *const ops[] = {
		"write -P 0x31 0 3m",
		"write -P 0x32 5m 2m",
		"discard 1m 1m",
		"write -P 0x33 7m 1m",
		NULL,
	};
	scenario("reftable-growth-512-rc64",
		 "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 8M", ops);
	scenario("reftable-growth-512-rc1",
		 "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 img.qcow2 8M", ops);
}

/* Several coroutines writing into the same unallocated cluster. */
struct cw {
	struct bdrv *bs;
	int id, ret;
	unsigned *left;
	struct co_queue *done;
	uint64_t off, len;
	uint8_t data[8192];
};

static void cw_fn(void *opaque)
{
	struct cw *w = opaque;

	memset(w->data, 0x40 + w->id, sizeof(w->data));
	w->ret = bdrv_co_pwrite(w->bs, w->off, w->len, w->data, 0);
	if (--*w->left == 0)
		co_queue_wake_all(w->done);
}

#define NCW 16
static struct cw cws[NCW];
static int conc_ret;

static void conc_fn(void *opaque)
{
	struct bdrv_opts o = { 0 };
	struct co_queue done = CO_QUEUE_INIT;
	struct coro *co[NCW];
	struct bdrv *bs;
	unsigned left = NCW;

	conc_ret = bdrv_open(opaque, &o, &bs);
	if (conc_ret < 0)
		return;
	for (int i = 0; i < NCW; i++) {
		/* 8 writers inside one 64 KiB cluster, 8 writing 6 KiB pieces
		 * straddling a cluster boundary: disjoint bytes, shared
		 * clusters, so the result does not depend on the order. */
		cws[i] = (struct cw){ .bs = bs, .id = i, .left = &left, .done = &done,
				      .off = i < 8 ? 65536 + (uint64_t)i * 4096 : 180 * 1024 + (uint64_t)(i - 8) * 6144,
				      .len = i < 8 ? 4096 : 6144 };
		co[i] = coro_new(cw_fn, &cws[i], 0);
		aio_schedule(co[i]);
	}
	while (left)
		co_queue_wait(&done);
	for (int i = 0; i < NCW; i++) {
		if (cws[i].ret < 0)
			conc_ret = cws[i].ret;
		coro_free(co[i]);
	}
	bdrv_close(bs);
}

static void concurrency(void)
{
	char path[512], ops[NCW][64];
	const char *opv[NCW + 1];

	sh("rm -f *.qcow2 && qemu-img create -q -f qcow2 img.qcow2 1M && cp img.qcow2 ref.qcow2");
	snprintf(path, sizeof(path), "%s/img.qcow2", dir);
	CHECK(aio_run_coroutine(conc_fn, path) == 0 && conc_ret == 0, "concurrent writes: %d", conc_ret);
	for (int i = 0; i < NCW; i++) {
		snprintf(ops[i], sizeof(ops[i]), "write -P 0x%x %llu %llu", 0x40 + i,
			 (unsigned long long)cws[i].off, (unsigned long long)cws[i].len);
		opv[i] = ops[i];
	}
	opv[NCW] = NULL;
	CHECK(qemu_io_ops("ref.qcow2", opv) == 0, "qemu-io");
	verify("concurrency", "img.qcow2", "ref.qcow2");
}

static void refusals(void)
{
	struct bdrv_opts o = { 0 };
	struct bdrv *bs = NULL;
	char path[512];

	snprintf(path, sizeof(path), "%s/img.qcow2", dir);
	/* Corrupt bit (incompatible bit 1 at offset 72+7): read-only only. */
	sh("rm -f *.qcow2 && qemu-img create -q -f qcow2 img.qcow2 1M && "
	   "printf '\\002' | dd of=img.qcow2 bs=1 seek=79 conv=notrunc status=none");
	CHECK(bdrv_open(path, &o, &bs) < 0, "corrupt image opened read-write");
	o.flags = BDRV_O_RDONLY;
	CHECK(bdrv_open(path, &o, &bs) == 0, "corrupt image refused read-only");
	bdrv_close(bs);
	bs = NULL;
	/* Unknown incompatible bit 20. */
	o.flags = 0;
	sh("rm -f *.qcow2 && qemu-img create -q -f qcow2 img.qcow2 1M && "
	   "printf '\\020' | dd of=img.qcow2 bs=1 seek=77 conv=notrunc status=none");
	CHECK(bdrv_open(path, &o, &bs) < 0, "unknown incompatible bit accepted");
	/* Dirty (lazy refcounts): read-only serves it as it is; read-write
	 * repairs it first (here: the refcount of a data cluster was never
	 * written), clears the bit and leaves it clean. */
	sh("rm -f *.qcow2 && qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 1M && "
	   "qemu-io -c 'write -P 7 0 64k' img.qcow2 >/dev/null && "
	   "printf '\\000\\000' | dd of=img.qcow2 bs=1 seek=$((0x20000+10)) conv=notrunc status=none && "
	   "printf '\\001' | dd of=img.qcow2 bs=1 seek=79 conv=notrunc status=none");
	o.flags = BDRV_O_RDONLY;
	CHECK(bdrv_open(path, &o, &bs) == 0, "dirty image refused read-only");
	bdrv_close(bs);
	bs = NULL;
	CHECK(sh("test \"$(od -An -tx1 -j79 -N1 img.qcow2)\" = ' 01'") == 0,
	      "read-only open changed the dirty bit");
	o.flags = 0;
	CHECK(bdrv_open(path, &o, &bs) == 0, "dirty image not repaired at a read-write open");
	bdrv_close(bs);
	bs = NULL;
	CHECK(sh("qemu-img check -q img.qcow2 && "
		 "test \"$(od -An -tx1 -j79 -N1 img.qcow2)\" = ' 00' && "
		 "qemu-io -c 'read -P 7 0 64k' img.qcow2 >/dev/null") == 0,
	      "dirty image not clean after the repair at open");
	/* An external data file that is missing: refused, named. */
	sh("rm -f *.qcow2 data.raw && qemu-img create -q -f qcow2 -o data_file=data.raw img.qcow2 1M "
	   "&& rm data.raw");
	CHECK(bdrv_open(path, &o, &bs) == -ENOENT, "missing data file accepted");
	/* Bitmaps are kept (autoclear bit 0 stays set) and tracked: the
	 * write marks them, the image checks clean (test-bitmaps.sh
	 * compares the bits with QEMU's). */
	sh("rm -f *.qcow2 && qemu-img create -q -f qcow2 img.qcow2 1M && "
	   "qemu-img bitmap --add img.qcow2 b0");
	static const char *const wr[] = { "write -P 1 0 4k", NULL };
	CHECK(run_ops("img.qcow2", wr) == 0, "write to image with bitmap");
	CHECK(sh("qemu-img check -q img.qcow2 && "
		 "test \"$(od -An -tx1 -j95 -N1 img.qcow2)\" = ' 01'") == 0,
	      "bitmap autoclear bit not kept or image not clean");
	/* A bad L2 entry fails the read with EIO. */
	sh("rm -f *.qcow2 && qemu-img create -q -f qcow2 img.qcow2 1M && "
	   "qemu-io -c 'write 0 4k' img.qcow2 >/dev/null && "
	   "printf '\\002' | dd of=img.qcow2 bs=1 seek=$((0x40000+7)) conv=notrunc status=none");
	static const char *const rd[] = { "read -P 0 0 4k", NULL };
	CHECK(run_ops("img.qcow2", rd) == -EIO, "bad L2 entry not -EIO");
}

int main(void)
{
	log_set_prog("test_qcow2");
	if (system("qemu-img --version >/dev/null 2>&1 && qemu-io --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "SKIP: needs qemu-img and qemu-io\n");
		return 77;
	}
	/* TEST_DIR=/some/ext4/dir exercises fallocate(ZERO_RANGE) (tmpfs
	 * lacks it and takes the write-zeros fallback). */
	if (getenv("TEST_DIR"))
		snprintf(dir, sizeof(dir), "%s/qublk-test-qcow2-XXXXXX", getenv("TEST_DIR"));
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	buf = malloc(MAXBUF);
	if (!buf)
		return 1;

	matrix();
	backing();
	compressed();
	snapshots();
	reftable_growth();
	big_and_small_caches();
	concurrency();
	refusals();

	if (!failed)
		sh("rm -rf %s", dir);
	free(buf);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
