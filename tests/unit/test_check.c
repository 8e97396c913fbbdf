/* SPDX-License-Identifier: MIT */
/*
 * Crash safety of `qublk check -r all` (src/qcow2/check.c).  A damaged
 * image (made by qemu-img/qemu-io, damaged by tests/qcow2_damage.py) is
 * repaired through the io_fault backend in reorder mode: writes stay
 * volatile until a flush, and at the Nth mutating call a random subset of
 * the volatile writes reaches the file and everything after is lost (a
 * power cut on a disk with a write cache).  After each cut a second
 * repair, without faults, must leave an image that qemu-img check finds
 * clean, with the same guest data as an image repaired without a cut.
 * The damages cover every repair path: a rebuilt refcount structure, a
 * snapshot table rewritten, entries dropped, leaks freed, OFLAG_COPIED.
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

static char dir[] = "/dev/shm/qublk-check-XXXXXX";
static char tests_dir[4096];

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

/* Repair @path; with @drop_after, through io_fault cutting power there.
 * Returns the number of mutating calls (writes + flushes) it made. */
static unsigned long repair(const char *path, unsigned long drop_after, unsigned long seed,
			    int *ret)
{
	struct io_file *f, *w = NULL;
	struct qcow2_check_opts o = { .fix = QCOW2_FIX_LEAKS | QCOW2_FIX_ERRORS };
	struct qcow2_check_result r;
	struct io_fault_cfg cfg = { .drop_after = drop_after, .reorder = true, .seed = seed };
	struct io_fault_stats st = { 0 };
	char err[256];

	*ret = io_file_open(path, 0, &f);
	if (*ret < 0)
		return 0;
	*ret = io_fault_wrap(f, &cfg, &w);
	if (*ret < 0) {
		io_file_close(f);
		return 0;
	}
	*ret = qcow2_check(w, &o, &r, err, sizeof(err));
	io_fault_get_stats(w, &st);
	io_file_close(w);
	return st.writes + st.flushes;
}

static void scenario(const char *name, const char *setup, const char *kinds)
{
	char img[512], good[512];
	int ret;

	snprintf(img, sizeof(img), "%s/%s.qcow2", dir, name);
	snprintf(good, sizeof(good), "%s/%s-good.qcow2", dir, name);
	if (sh("cd %s && rm -f i.qcow2 && (%s) >/dev/null && mv i.qcow2 %s && python3 -c 'import sys; sys.path.insert(0, sys.argv[1])\n"
	       "import qcow2_damage as D\ni = D.Img(sys.argv[2])\n"
	       "for k in sys.argv[3].split(): D.KINDS[k](i)\ni.close()' %s %s '%s'",
	       dir, setup, img, tests_dir, img, kinds)) {
		CHECK(0, "%s: making the damaged image failed", name);
		return;
	}
	CHECK(sh("qemu-img check -q %s >/dev/null 2>&1", img) != 0, "%s: damage not seen", name);
	sh("cp %s %s", img, good);
	unsigned long total = repair(good, 0, 0, &ret);
	CHECK(ret == 0, "%s: repair failed: %s", name, strerror(-ret));
	CHECK(sh("qemu-img check -q %s >/dev/null 2>&1", good) == 0, "%s: not clean after a repair",
	      name);
	CHECK(total > 2, "%s: the repair wrote nothing", name);

	/* Cut power at up to 24 points spread over the repair's writes. */
	unsigned long step = MAX(1ul, total / 24);
	for (unsigned long n = 1; n <= total; n += step) {
		char cut[600];
		snprintf(cut, sizeof(cut), "%s/%s-cut.qcow2", dir, name);
		sh("cp %s %s", img, cut);
		repair(cut, n, n * 7919, &ret);      /* its result is that of a dead machine */
		repair(cut, 0, 0, &ret);
		CHECK(ret == 0, "%s: cut at %lu: second repair failed: %s", name, n, strerror(-ret));
		int rc = sh("qemu-img check -q %s >/dev/null 2>&1", cut);
		CHECK(rc == 0, "%s: cut at %lu of %lu: qemu-img check exit %d after the second repair",
		      name, n, total, rc);
		if (rc) {
			sh("qemu-img check %s 2>&1 | head -5 >&2", cut);
			continue;
		}
		CHECK(sh("qemu-img compare -q %s %s", good, cut) == 0,
		      "%s: cut at %lu: guest data differs from a repair without a cut", name, n);
	}
}

int main(void)
{
	const char *base = "qemu-img create -q -f qcow2 -o cluster_size=%u%s i.qcow2 64M && "
			   "qemu-io -c 'write -P 1 0 256k' -c 'write -c -P 2 1M 64k' "
			   "-c 'write -P 3 40M 128k' i.qcow2";
	char setup[2048], *p;

	log_set_prog("test_check");
	if (sh("qemu-img --version >/dev/null 2>&1 && python3 --version >/dev/null 2>&1")) {
		printf("qemu-img or python3 missing: skip\n");
		return 77;
	}
	snprintf(tests_dir, sizeof(tests_dir), "%s", __FILE__);
	p = dirname(tests_dir);                 /* tests/unit */
	memmove(tests_dir, p, strlen(p) + 1);
	p = dirname(tests_dir);                 /* tests */
	memmove(tests_dir, p, strlen(p) + 1);
	if (tests_dir[0] != '/') {
		char cwd[2048];
		if (!getcwd(cwd, sizeof(cwd)))
			return 1;
		char abs[8192];
		snprintf(abs, sizeof(abs), "%s/%s", cwd, tests_dir);
		if (strlen(abs) >= sizeof(tests_dir))
			return 1;
		memcpy(tests_dir, abs, strlen(abs) + 1);
	}
	if (!mkdtemp(dir))
		return 1;

	/* Refcount block lost: a new refcount structure is written. */
	snprintf(setup, sizeof(setup), base, 65536, "");
	scenario("rebuild", setup, "rt_entry_zero");
	/* Entries dropped, leaks freed, OFLAG_COPIED fixed, at 512 B clusters. */
	snprintf(setup, sizeof(setup), base, 512, ",refcount_bits=64");
	scenario("drop", setup, "l2_past_eof rb_l1_plus l1_copied_clear l2_reserved");
	/* Snapshot table rewritten (v3 extra data) with a shared cluster's
	 * refcount too low. */
	{
		char tmp[1024];
		snprintf(tmp, sizeof(tmp), base, 65536, "");
		snprintf(setup, sizeof(setup), "%s && qemu-img snapshot -c s1 i.qcow2 && "
			 "qemu-io -c 'write -P 4 64k 64k' i.qcow2", tmp);
	}
	scenario("snapshot", setup, "snap_no_extra shared_rc_low");
	/* The refcount table must grow: it is gone altogether. */
	snprintf(setup, sizeof(setup), base, 4096, ",refcount_bits=16");
	scenario("grow", setup, "hdr_reftable_clusters_zero");

	sh("rm -rf %s", dir);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
