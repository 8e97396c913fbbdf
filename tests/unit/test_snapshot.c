/* SPDX-License-Identifier: MIT */
/*
 * Crash safety of `qublk snapshot` (src/qcow2/snapshot-write.c).  An image
 * with data, zero and compressed clusters and two snapshots (made by
 * qemu-img and qemu-io; at 64 KiB and 512 B clusters, v3 and v2, and one
 * whose refcount table must grow during the create) gets a snapshot
 * created, deleted or applied through the io_fault
 * backend in reorder mode: writes stay volatile until a flush, and at the
 * Nth mutating call a random subset of the volatile writes reaches the
 * file and everything after is lost (a power cut on a disk with a write
 * cache).  After each cut:
 *  - qemu-img check may find leaked clusters and nothing else, except
 *    what no ordering can avoid (see snapshot-write.c): active entries
 *    whose refcount is 1 and whose OFLAG_COPIED is not set yet.  Every
 *    other corruption, a refcount below its references or OFLAG_COPIED
 *    on a shared cluster above all, fails the test;
 *  - after qemu-img check -r all the image is clean;
 *  - the snapshot list is the one before the operation or the one after,
 *    every snapshot in it holds its data, and the active layer holds the
 *    data from before or after the operation.
 */
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/io.h"
#include "common/io_fault.h"
#include "common/util.h"
#include "qcow2/format.h"

#include "check.h"

static char dir[] = "/dev/shm/qublk-snapshot-XXXXXX";

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int r = system(cmd);
	return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

enum op { OP_CREATE, OP_DELETE, OP_APPLY };
static const char *const op_name[] = { "create", "delete", "apply" };

/* Run @op on @path; with @drop_after, through io_fault cutting power
 * there.  Returns the number of mutating calls it made. */
static unsigned long run(enum op op, const char *path, const char *arg, unsigned long drop_after,
			 unsigned long seed, int *ret)
{
	struct io_file *f, *w = NULL;
	struct io_fault_cfg cfg = { .drop_after = drop_after, .reorder = true, .seed = seed };
	struct io_fault_stats st = { 0 };
	char err[256] = "";

	*ret = io_file_open(path, 0, &f);
	if (*ret < 0)
		return 0;
	*ret = io_fault_wrap(f, &cfg, &w);
	if (*ret < 0) {
		io_file_close(f);
		return 0;
	}
	switch (op) {
	case OP_CREATE: *ret = qcow2_snapshot_create(w, arg, 0, err, sizeof(err)); break;
	case OP_DELETE: *ret = qcow2_snapshot_delete(w, arg, 0, err, sizeof(err)); break;
	case OP_APPLY: *ret = qcow2_snapshot_apply(w, arg, 0, err, sizeof(err)); break;
	}
	if (*ret && !drop_after)
		fprintf(stderr, "%s %s: %s\n", op_name[op], arg, err);
	io_fault_get_stats(w, &st);
	io_file_close(w);
	return st.writes + st.flushes;
}

/* The snapshot names of @img, space separated, into @out. */
static void list(const char *img, char *out, size_t len)
{
	char cmd[1024];

	out[0] = '\0';
	snprintf(cmd, sizeof(cmd), "qemu-img snapshot -l %s | awk 'NR > 2 { printf \"%%s \", $2 }'",
		 img);
	FILE *p = popen(cmd, "r");
	if (!p)
		return;
	if (!fgets(out, (int)len, p))
		out[0] = '\0';
	pclose(p);
}

/* Is @img's content (snapshot @snap, or the active layer if NULL) that of
 * the raw file @raw? */
static bool same(const char *img, const char *snap, const char *raw)
{
	if (!snap)
		return sh("qemu-img compare -q -f qcow2 -F raw %s %s", img, raw) == 0;
	return sh("qemu-img convert -f qcow2 -l snapshot.name=%s -O raw %s %s/sn.raw && "
		  "cmp -s %s/sn.raw %s", snap, img, dir, dir, raw) == 0;
}

/* Snapshots of the images (their contents saved as DIR/<name>.raw). */
static const char *const all_snaps[] = { "s1", "s2", "new" };

static void scenario(const char *name, const char *setup, enum op op, const char *arg)
{
	char img[512], good[512], cut[512], before[256], after[256], now[256];
	int ret;

	snprintf(img, sizeof(img), "%s/%s.qcow2", dir, name);
	snprintf(good, sizeof(good), "%s/%s-good.qcow2", dir, name);
	snprintf(cut, sizeof(cut), "%s/%s-cut.qcow2", dir, name);
	if (sh("cd %s && rm -f i.qcow2 *.raw && (%s) >/dev/null && mv i.qcow2 %s", dir, setup, img)) {
		CHECK(0, "%s: making the image failed", name);
		return;
	}
	/* Reference contents: the active layer before, every snapshot. */
	sh("qemu-img convert -f qcow2 -O raw %s %s/active0.raw", img, dir);
	for (size_t i = 0; i < ARRAY_SIZE(all_snaps); i++)
		sh("qemu-img convert -f qcow2 -l snapshot.name=%s -O raw %s %s/%s.raw 2>/dev/null",
		   all_snaps[i], img, dir, all_snaps[i]);
	list(img, before, sizeof(before));

	sh("cp %s %s", img, good);
	unsigned long total = run(op, good, arg, 0, 0, &ret);
	CHECK(ret == 0, "%s: %s failed: %s", name, op_name[op], strerror(-ret));
	CHECK(sh("qemu-img check -q %s", good) == 0, "%s: not clean after %s", name, op_name[op]);
	list(good, after, sizeof(after));
	CHECK(op == OP_APPLY || strcmp(before, after), "%s: the snapshot list did not change", name);
	sh("qemu-img convert -f qcow2 -O raw %s %s/active1.raw", good, dir);
	if (op == OP_CREATE)
		sh("cp %s/active0.raw %s/new.raw", dir, dir);

	unsigned long step = MAX(1ul, total / 16), leaky = 0, flagless = 0;
	for (unsigned long n = 1; n <= total; n += step) {
		sh("cp %s %s", img, cut);
		run(op, cut, arg, n, n * 7919 + 1, &ret);     /* the result of a dead machine */
		/* Leaks and refcount-1 entries without OFLAG_COPIED only. */
		int rc = sh("qemu-img check %s >%s/chk.out 2>&1", cut, dir);
		int other = sh("grep -E '^(ERROR|Warning)' %s/chk.out | grep -vqE "
			       "'^ERROR OFLAG_COPIED (data|L2) cluster: .* refcount=1$'", dir);
		CHECK((rc == 0 || rc == 2 || rc == 3) && other != 0,
		      "%s: %s cut at %lu of %lu: qemu-img check exit %d:", name, op_name[op], n,
		      total, rc);
		if (other == 0 || (rc != 0 && rc != 2 && rc != 3))
			sh("head -8 %s/chk.out >&2", dir);
		leaky += sh("grep -q 'leaked clusters' %s/chk.out", dir) == 0;
		flagless += rc == 2;
		CHECK(sh("qemu-img check -q -r all %s >/dev/null 2>&1; qemu-img check -q %s", cut,
			 cut) == 0, "%s: cut at %lu: not clean after qemu-img check -r all", name, n);
		list(cut, now, sizeof(now));
		bool was = !strcmp(now, before), done = !strcmp(now, after);
		CHECK(was || done, "%s: cut at %lu: snapshots '%s', neither '%s' nor '%s'", name, n,
		      now, before, after);
		for (size_t i = 0; i < ARRAY_SIZE(all_snaps); i++) {
			char pat[64];
			snprintf(pat, sizeof(pat), "%s ", all_snaps[i]);
			if (!strstr(now, pat))
				continue;       /* absent (deleted, or not created yet) */
			char raw[600];
			snprintf(raw, sizeof(raw), "%s/%s.raw", dir, all_snaps[i]);
			CHECK(same(cut, all_snaps[i], raw), "%s: cut at %lu: snapshot %s damaged", name,
			      n, all_snaps[i]);
		}
		char a0[600], a1[600];
		snprintf(a0, sizeof(a0), "%s/active0.raw", dir);
		snprintf(a1, sizeof(a1), "%s/active1.raw", dir);
		CHECK(same(cut, NULL, a0) || same(cut, NULL, a1),
		      "%s: cut at %lu: the active layer is neither the old nor the new", name, n);
	}
	printf("ok %s: %s, %lu power cuts over %lu writes; states with leaks: %lu, with "
	       "refcount-1 entries lacking OFLAG_COPIED: %lu\n", name, op_name[op], (total + step - 1) / step, total, leaky, flagless);
}

int main(void)
{
	/* Data, zero clusters, a compressed cluster, a snapshot, more data,
	 * a second snapshot and writes over both. */
	const char *base = "qemu-img create -q -f qcow2 -o cluster_size=%u%s i.qcow2 4M && "
			   "qemu-io -c 'write -P 1 0 1M' -c 'write -c -P 2 2M 64k' "
			   "-c 'write -z 1500k 100k' i.qcow2 && qemu-img snapshot -c s1 i.qcow2 && "
			   "qemu-io -c 'write -P 3 512k 1M' i.qcow2 && qemu-img snapshot -c s2 i.qcow2 && "
			   "qemu-io -c 'write -P 4 0 300k' -c 'write -P 5 3M 4k' i.qcow2";
	char setup[2048];

	log_set_prog("test_snapshot");
	if (sh("qemu-img --version >/dev/null 2>&1")) {
		printf("qemu-img missing: skip\n");
		return 77;
	}
	if (!mkdtemp(dir))
		return 1;

	snprintf(setup, sizeof(setup), base, 65536, "");
	scenario("create", setup, OP_CREATE, "new");
	scenario("delete", setup, OP_DELETE, "s1");
	scenario("apply", setup, OP_APPLY, "s1");
	/* 512 B clusters, v2: many L2 tables, the snapshot table spans
	 * clusters. */
	snprintf(setup, sizeof(setup), base, 512, ",compat=0.10");
	scenario("create-512", setup, OP_CREATE, "new");
	scenario("delete-512", setup, OP_DELETE, "s2");

	/* The refcount table must grow during the create: 64-bit refcounts
	 * at 512 B clusters cover 2 MiB of file per table cluster, and the
	 * file is a few clusters short of that with a 32-cluster L1 table. */
	scenario("create-grow", "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "
		 "i.qcow2 64M && qemu-io -c 'write -P 1 0 1960k' i.qcow2", OP_CREATE, "new");

	sh("rm -rf %s", dir);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
