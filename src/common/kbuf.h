/* SPDX-License-Identifier: MIT */
/*
 * Kernel buffer windows: addresses that stand for buffers the daemon
 * cannot touch.
 *
 * With ublk zero copy (UBLK_F_AUTO_BUF_REG) a request's data stays in the
 * kernel's pages: the driver registers them in the queue's io_uring buffer
 * table at the tag's index before it hands us the request, and the
 * daemon moves the data only with fixed-buffer reads and writes on that
 * ring (IORING_OP_READ_FIXED/WRITE_FIXED, the address being the offset in
 * the request) or by user copy (pread/pwrite of /dev/ublkcN at the
 * request's offset).  The engine above knows buffers only as iovecs.  So a
 * queue reserves a window of address space (PROT_NONE: no access, no
 * memory), one slot per tag, and gives the target the tag's slot as the
 * request's buffer.  Two places know windows:
 *   - the io layer (io.c) turns a file read or write of one slot range
 *     into a fixed-buffer op on the window's ring;
 *   - the iovec helpers (util.c: iov_memset, iov_to_buf, iov_from_buf)
 *     copy to and from a slot by user copy (a zero fill, a decompressed
 *     cluster, guest data merged into a copy-on-write cluster).
 * Any other access to a slot faults at once instead of reading or
 * writing some other memory.
 *
 * Thread model: a window is added before the thread that uses it starts
 * and deleted after it is joined (thread creation and join order the
 * accesses); lookups are lock-free.  A slot's fixed buffer exists only on
 * the window's ring: io.c uses it only on that ring's thread.
 */
#ifndef QUBLK_KBUF_H
#define QUBLK_KBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct aio_ctx;

struct kbuf_window {
	uint8_t *base;          /* n slots of stride bytes, PROT_NONE */
	size_t stride;
	unsigned n;
	struct aio_ctx *ctx;    /* the ring whose buffer table holds slot i at index i */
	int copy_fd;            /* user copy: /dev/ublkcN */
	uint64_t copy_off;      /* its file offset for slot 0 */
	unsigned copy_shift;    /* slot i at copy_off + ((uint64_t)i << copy_shift) */
	uint8_t *bounce;        /* slot i's bounce buffer at bounce + i * stride, owned by
				 * whoever owns the slot's request; NULL: none */
};

/* A range inside one slot. */
struct kbuf_ref {
	const struct kbuf_window *w;
	unsigned index;         /* the slot: fixed-buffer index */
	size_t off;             /* offset in the slot */
};

/* Reserve @w->n slots of @w->stride bytes (sets w->base) and publish the
 * window.  Returns -errno (-ENOSPC: too many windows). */
int kbuf_window_add(struct kbuf_window *w);
/* Unpublish and unmap (no-op if never added). */
void kbuf_window_del(struct kbuf_window *w);

/* Lowest and highest address of any window, for a cheap first test. */
extern uintptr_t kbuf_lo, kbuf_hi;
static inline bool kbuf_maybe(const void *p)
{
	return (uintptr_t)p >= kbuf_lo && (uintptr_t)p < kbuf_hi;
}
/* Whether [p, p+len) lies in one slot of a window; if so, *ref says where.
 * A range that starts in a window but does not fit its slot aborts: the
 * engine split a request's buffer wrongly. */
bool kbuf_find(const void *p, size_t len, struct kbuf_ref *ref);
/* Whether any byte of the iovec lies in a window. */
struct iovec;
bool kbuf_iov_any(const struct iovec *iov, int iovcnt);

/* User copy of @len bytes between @buf and the range @r: from it (@out:
 * pread of /dev/ublkcN) or into it.  Returns 0 or -errno (-EIO: short). */
int kbuf_user_copy(const struct kbuf_ref *r, bool out, void *buf, size_t len);
/* Fill @len bytes of the range @r with @c, by user copy.  Returns 0 or
 * -errno.  A copy cannot fail for a request the daemon owns unless the
 * kernel took it back (its queue aborted); the request then fails with
 * that error and the daemon goes on. */
int kbuf_fill(const struct kbuf_ref *r, int c, size_t len);

#endif
