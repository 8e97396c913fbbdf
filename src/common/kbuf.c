/* SPDX-License-Identifier: MIT */
/*
 * Kernel buffer windows (kbuf.h): the registry and the user copies.
 */
#include "common/kbuf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common/util.h"

#define KBUF_MAX_WINDOWS 64

uintptr_t kbuf_lo = UINTPTR_MAX, kbuf_hi;
static struct kbuf_window *windows[KBUF_MAX_WINDOWS];
static unsigned nwindows;

static void bounds(void)
{
	uintptr_t lo = UINTPTR_MAX, hi = 0;

	for (unsigned i = 0; i < nwindows; i++) {
		uintptr_t b = (uintptr_t)windows[i]->base;

		lo = MIN(lo, b);
		hi = MAX(hi, b + windows[i]->stride * windows[i]->n);
	}
	kbuf_lo = lo;
	kbuf_hi = hi;
}

int kbuf_window_add(struct kbuf_window *w)
{
	size_t len = w->stride * w->n;
	void *p;

	if (nwindows == KBUF_MAX_WINDOWS)
		return -ENOSPC;
	/* Address space only: never accessible, never backed. */
	p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return -errno;
	w->base = p;
	windows[nwindows++] = w;
	bounds();
	return 0;
}

void kbuf_window_del(struct kbuf_window *w)
{
	for (unsigned i = 0; i < nwindows; i++) {
		if (windows[i] != w)
			continue;
		windows[i] = windows[--nwindows];
		bounds();
		munmap(w->base, w->stride * w->n);
		w->base = NULL;
		return;
	}
}

bool kbuf_find(const void *p, size_t len, struct kbuf_ref *ref)
{
	uintptr_t a = (uintptr_t)p;

	if (!kbuf_maybe(p))
		return false;
	for (unsigned i = 0; i < nwindows; i++) {
		const struct kbuf_window *w = windows[i];
		uintptr_t b = (uintptr_t)w->base;

		if (a < b || a >= b + w->stride * w->n)
			continue;
		ref->w = w;
		ref->index = (unsigned)((a - b) / w->stride);
		ref->off = (a - b) % w->stride;
		if (len > w->stride - ref->off) {
			log_error("kernel buffer range %zu+%zu crosses its slot of %zu bytes",
				  ref->off, len, w->stride);
			abort();
		}
		return true;
	}
	return false;
}

bool kbuf_iov_any(const struct iovec *iov, int iovcnt)
{
	for (int i = 0; i < iovcnt; i++)
		if (kbuf_maybe(iov[i].iov_base))
			return true;
	return false;
}

int kbuf_user_copy(const struct kbuf_ref *r, bool out, void *buf, size_t len)
{
	const struct kbuf_window *w = r->w;
	uint64_t pos = w->copy_off + ((uint64_t)r->index << w->copy_shift) + r->off;
	size_t done = 0;

	while (done < len) {
		ssize_t n = out ? pread(w->copy_fd, (char *)buf + done, len - done, (off_t)(pos + done))
				: pwrite(w->copy_fd, (char *)buf + done, len - done,
					 (off_t)(pos + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	return 0;
}

int kbuf_fill(const struct kbuf_ref *r, int c, size_t len)
{
	static const uint8_t zeros[65536];
	uint8_t buf[4096];
	const uint8_t *src = zeros;
	size_t chunk = sizeof(zeros);

	if (c) {
		memset(buf, c, sizeof(buf));
		src = buf;
		chunk = sizeof(buf);
	}
	for (size_t at = 0; at < len; at += chunk) {
		struct kbuf_ref piece = *r;

		piece.off += at;
		int ret = kbuf_user_copy(&piece, false, (void *)src, MIN(chunk, len - at));
		if (ret < 0)
			return ret;
	}
	return 0;
}
