/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the image locks (src/block/lock.c) and their use by the
 * block layer.  OFD locks of two open file descriptions conflict even in
 * one process, so two opens of one file here stand for two processes:
 *  - the exact bytes QEMU 7.2 takes (read-write, read-only, force-share),
 *    seen through F_OFD_GETLK from a third descriptor;
 *  - which pairs conflict, in both orders, and that closing releases;
 *  - a second lock_take on one fd releases what it no longer holds;
 *  - lock_holders names this process (and not the asking fd);
 *  - a foreign exclusive lock on a lock byte refuses the open;
 *  - no OFD locks (fcntl fails with ENOLCK etc.: this file defines fcntl,
 *    which the statically linked library then calls): one warning, the
 *    open goes on; other errors fail it;
 *  - bdrv_open: two writers refused, force-share only read-only, backing
 *    files share-locked, and the lock is on the real fd under io_fault.
 * The shell test tests/test-locking.sh covers qublk against QEMU.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "block/lock.h"
#include "common/io_fault.h"
#include "common/util.h"
#include "qcow2/format.h"

#include "check.h"

static char tmpdir[] = "/dev/shm/qublk-test-lock-XXXXXX";
static char path[256];

/* Nonzero: F_OFD_* commands fail with this errno. */
static int ofd_errno;

int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (ofd_errno && (cmd == F_OFD_SETLK || cmd == F_OFD_GETLK || cmd == F_OFD_SETLKW)) {
		errno = ofd_errno;
		return -1;
	}
	return (int)syscall(SYS_fcntl, fd, cmd, arg);
}

static int open_img(void)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	CHECK(fd >= 0, " open %s: %s", path, strerror(errno));
	return fd;
}

enum mode { RW, RO, RO_SHARE };

static int take(int fd, enum mode m)
{
	unsigned perm, shared;

	lock_perms(m != RW, m == RO_SHARE, &perm, &shared);
	return lock_take(fd, path, perm, shared);
}

/* The lock bytes some other description holds, as a bitmap: bit i for
 * byte 100 + i, bit 4 + i for byte 200 + i. */
static unsigned held_bytes(void)
{
	int fd = open_img();
	unsigned map = 0;

	for (unsigned i = 0; i < 8; i++) {
		struct flock fl = {
			.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_len = 1,
			.l_start = (i < 4 ? 100 : 196) + i,
		};
		CHECK(fcntl(fd, F_OFD_GETLK, &fl) == 0);
		if (fl.l_type != F_UNLCK)
			map |= 1u << i;
	}
	close(fd);
	return map;
}

#define BYTES(p, s) ((p) | (s) << 4)

static void test_bytes(void)
{
	static const struct { enum mode m; unsigned bytes; } cases[] = {
		/* QEMU 7.2, /proc/locks: 100 101 103 201 203 */
		{ RW, BYTES(0x1 | 0x2 | 0x8, 0x2 | 0x8) },
		/* 100 201 203 */
		{ RO, BYTES(0x1, 0x2 | 0x8) },
		/* 100 */
		{ RO_SHARE, BYTES(0x1, 0) },
	};
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		int fd = open_img();
		CHECK(take(fd, cases[i].m) == 0);
		unsigned got = held_bytes();
		CHECK(got == cases[i].bytes, " mode %d: bytes %#x, want %#x", cases[i].m, got,
		      cases[i].bytes);
		close(fd);
		CHECK(held_bytes() == 0, " mode %d: locks outlive the fd", cases[i].m);
	}
	/* A second call moves the locks: rw -> read-only drops write/resize. */
	int fd = open_img();
	CHECK(take(fd, RW) == 0 && take(fd, RO) == 0);
	CHECK(held_bytes() == BYTES(0x1, 0x2 | 0x8));
	close(fd);
}

static void test_conflicts(void)
{
	/* [first][second]: may the second open while the first holds it? */
	static const bool ok[3][3] = {
		/* RW */       { false, false, true },
		/* RO */       { false, true,  true },
		/* RO_SHARE */ { true,  true,  true },
	};
	for (int a = RW; a <= RO_SHARE; a++) {
		for (int b = RW; b <= RO_SHARE; b++) {
			int fa = open_img(), fb = open_img();
			CHECK(take(fa, a) == 0);
			int ret = take(fb, b);
			CHECK(ok[a][b] ? ret == 0 : ret == -EAGAIN,
			      " holder %d, opener %d: %d", a, b, ret);
			close(fb);
			/* Once the holder is gone, anything goes. */
			close(fa);
			fb = open_img();
			CHECK(take(fb, RW) == 0, " holder %d gone", a);
			close(fb);
		}
	}
}

static void test_holders(void)
{
	int fa = open_img(), fb = open_img();
	char buf[256], want[64];

	CHECK(take(fa, RW) == 0);
	snprintf(want, sizeof(want), "pid %d (", (int)getpid());
	CHECK(lock_holders(fb, 201, buf, sizeof(buf)) == 1 && strstr(buf, want) == buf,
	      " holders of 201: '%s'", buf);
	/* The holder itself is not its own conflict; byte 202 is free. */
	CHECK(lock_holders(fa, 201, buf, sizeof(buf)) == 0 && !buf[0]);
	CHECK(lock_holders(fb, 202, buf, sizeof(buf)) == 0);
	CHECK(lock_holders(fb, 201, buf, 8) == 1 && strlen(buf) == 7);
	close(fa);
	CHECK(lock_holders(fb, 201, buf, sizeof(buf)) == 0);
	close(fb);
}

/* Someone else's exclusive lock on a byte we need to share-lock. */
static void test_foreign_write_lock(void)
{
	int fa = open_img(), fb = open_img();
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 1 };

	CHECK(fcntl(fa, F_OFD_SETLK, &fl) == 0);
	CHECK(take(fb, RO_SHARE) == -EAGAIN);
	close(fa);
	CHECK(take(fb, RO_SHARE) == 0);
	close(fb);
}

/* Returns how often @needle occurs in what fn() printed on stderr. */
static int stderr_count(int (*fn)(void), int *ret, const char *needle)
{
	char out[300], buf[4096] = "";
	int saved = dup(STDERR_FILENO), n = 0;
	FILE *f;

	snprintf(out, sizeof(out), "%s/stderr", tmpdir);
	f = fopen(out, "w+");
	CHECK(f && saved >= 0);
	if (!f || saved < 0)
		return -1;
	fflush(stderr);
	dup2(fileno(f), STDERR_FILENO);
	*ret = fn();
	fflush(stderr);
	dup2(saved, STDERR_FILENO);
	close(saved);
	rewind(f);
	buf[fread(buf, 1, sizeof(buf) - 1, f)] = 0;
	fclose(f);
	for (const char *p = buf; (p = strstr(p, needle)); p++)
		n++;
	return n;
}

static int two_rw_opens(void)
{
	int fa = open_img(), fb = open_img();
	int ret = take(fa, RW);

	if (!ret)
		ret = take(fb, RW);
	close(fa);
	close(fb);
	return ret;
}

static void test_unsupported(void)
{
	static const int errs[] = { ENOLCK, EINVAL, ENOTSUP, ENOSYS };
	int ret, warnings = 0;

	for (size_t i = 0; i < ARRAY_SIZE(errs); i++) {
		ofd_errno = errs[i];
		int n = stderr_count(two_rw_opens, &ret, "no OFD file locks");
		CHECK(ret == 0, " errno %d: %d", errs[i], ret);
		warnings += n;
	}
	CHECK(warnings == 1, " %d warnings, want one per process", warnings);
	ofd_errno = EBADF;
	CHECK(stderr_count(two_rw_opens, &ret, "F_OFD_SETLK on lock byte 100") == 1);
	CHECK(ret == -EBADF);
	ofd_errno = 0;
	/* The refusal names the lock and the holder. */
	char want[64];
	snprintf(want, sizeof(want), "Lock byte 201 is held by pid %d (", (int)getpid());
	CHECK(stderr_count(two_rw_opens, &ret, "Failed to get \"write\" lock") == 1);
	CHECK(ret == -EAGAIN);
	CHECK(stderr_count(two_rw_opens, &ret, want) == 1);
}

static int wrap_fault(struct io_file *f, struct io_file **out, void *opaque)
{
	struct io_fault_cfg c = { 0 };
	(void)opaque;
	return io_fault_wrap(f, &c, out);
}

static void test_bdrv(void)
{
	struct bdrv_opts rw = { .format = "raw" }, ro = { .format = "raw", .flags = BDRV_O_RDONLY };
	struct bdrv_opts rwu = { .format = "raw", .flags = BDRV_O_FORCE_SHARE };
	struct bdrv_opts rou = { .format = "raw", .flags = BDRV_O_RDONLY | BDRV_O_FORCE_SHARE };
	struct bdrv_opts wrapped = { .format = "raw", .wrap_file = wrap_fault };
	struct bdrv *a = NULL, *b = NULL;

	CHECK(bdrv_open(path, &rwu, &b) == -EINVAL, " force-share read-write accepted");
	CHECK(bdrv_open(path, &rw, &a) == 0);
	CHECK(bdrv_open(path, &rw, &b) == -EAGAIN);
	CHECK(bdrv_open(path, &ro, &b) == -EAGAIN);
	CHECK(bdrv_open(path, &rou, &b) == 0);
	bdrv_close(b);
	bdrv_close(a);
	CHECK(held_bytes() == 0);
	/* io_fault between the driver and the file: the real fd is locked. */
	CHECK(bdrv_open(path, &wrapped, &a) == 0);
	CHECK(held_bytes() == BYTES(0x1 | 0x2 | 0x8, 0x2 | 0x8));
	CHECK(bdrv_open(path, &rw, &b) == -EAGAIN);
	bdrv_close(a);

	/* A backing file is share-locked by each overlay: other overlays of
	 * it open, a writer on it does not; force-share reaches it too. */
	char top1[300], top2[300], err[256];
	struct qcow2_create_opts q = { .size = 1 << 20, .backing_file = path,
				       .backing_format = "raw" };
	struct bdrv_opts qo = { 0 }, qrou = { .flags = BDRV_O_RDONLY | BDRV_O_FORCE_SHARE };
	struct bdrv *t1 = NULL, *t2 = NULL;

	snprintf(top1, sizeof(top1), "%s/top1.qcow2", tmpdir);
	snprintf(top2, sizeof(top2), "%s/top2.qcow2", tmpdir);
	CHECK(qcow2_create(top1, &q, err, sizeof(err)) == 0, " %s", err);
	CHECK(qcow2_create(top2, &q, err, sizeof(err)) == 0, " %s", err);
	CHECK(bdrv_open(top1, &qo, &t1) == 0);
	CHECK(held_bytes() == BYTES(0x1, 0x2 | 0x8), " backing file: %#x", held_bytes());
	CHECK(bdrv_open(top2, &qo, &t2) == 0);
	CHECK(bdrv_open(path, &rw, &a) == -EAGAIN);
	CHECK(bdrv_open(path, &ro, &a) == 0);
	bdrv_close(a);
	bdrv_close(t2);
	bdrv_close(t1);
	CHECK(held_bytes() == 0);
	CHECK(bdrv_open(top1, &qrou, &t1) == 0);
	CHECK(held_bytes() == BYTES(0x1, 0), " force-share backing file: %#x", held_bytes());
	CHECK(bdrv_open(path, &rw, &a) == 0);
	bdrv_close(a);
	bdrv_close(t1);
}

int main(void)
{
	int fd;

	log_set_prog("test_lock");
	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 1;
	}
	snprintf(path, sizeof(path), "%s/img.raw", tmpdir);
	fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0644);
	CHECK(fd >= 0 && ftruncate(fd, 1 << 20) == 0);
	close(fd);

	test_bytes();
	test_conflicts();
	test_holders();
	test_foreign_write_lock();
	test_unsupported();
	test_bdrv();

	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd)) {}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
