/* SPDX-License-Identifier: MIT */
/*
 * Request buffers: one pool for the whole server, and the memory caps.
 *
 * Buffers come in power-of-two classes from NBD_POOL_MIN to
 * NBD_MAX_PAYLOAD.  A request takes one for its payload and gives it back
 * when its reply is out; given-back buffers stay in the pool while the
 * idle ones total at most NBD_POOL_IDLE_MAX, and go back to the kernel
 * beyond that (large classes are mmap'd, so munmap really returns them:
 * malloc's dynamic mmap threshold would keep freed 32 MiB buffers in the
 * heap).  Steady-state I/O therefore allocates nothing, and a burst of
 * large requests does not leave its memory behind.
 *
 * Caps, checked before a buffer is taken (nbd_mem_admit):
 *   - a connection holds at most NBD_CONN_MEM_MAX bytes of buffers (one
 *     buffer is always allowed, so a maximum-size request never waits
 *     for itself);
 *   - beyond the first NBD_CONN_MEM_FLOOR bytes of each connection, the
 *     buffers of all connections total at most NBD_SRV_MEM_MAX.  The
 *     floor lets every connection make progress with small requests
 *     even while stalled clients hold the rest.
 * So buffer memory is bounded by NBD_SRV_MEM_MAX + connections *
 * NBD_CONN_MEM_FLOOR + NBD_POOL_IDLE_MAX, whatever the clients do.  A
 * connection over a cap stops reading requests (its reader waits), which
 * is the back-pressure a client that does not read its replies gets;
 * after such a wait, a client that hung up meanwhile is dropped before
 * anything more of it runs.
 *
 * Thread model: the server's thread (internal.h).
 */
#include <errno.h>
#include <sys/mman.h>

#include "common/io.h"
#include "common/util.h"
#include "nbd/internal.h"

#if defined(QUBLK_ASAN)
#include <sanitizer/asan_interface.h>
/* Idle buffers are poisoned (but for their link), so a request that
 * touches its buffer after giving it back is caught. */
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* Classes at or above this size are mmap'd. */
#define NBD_POOL_MMAP_MIN (128 * 1024)

struct pool_buf {
	struct pool_buf *next;
};

unsigned nbd_pool_class(size_t len)
{
	unsigned cls = 0;

	while (((size_t)NBD_POOL_MIN << cls) < len)
		cls++;
	return cls;
}

size_t nbd_pool_class_size(unsigned cls)
{
	return (size_t)NBD_POOL_MIN << cls;
}

static void *buf_alloc(size_t size)
{
	void *p;

	if (size < NBD_POOL_MMAP_MIN)
		return io_alloc(size);
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void buf_free(void *p, size_t size)
{
	if (size < NBD_POOL_MMAP_MIN)
		io_free(p);
	else
		munmap(p, size);
}

void *nbd_pool_get(struct nbd_pool *pool, unsigned cls)
{
	size_t size = nbd_pool_class_size(cls);
	struct pool_buf *b = pool->idle[cls];

	if (b) {
		pool->idle[cls] = b->next;
		pool->idle_bytes -= size;
		UNPOISON(b, size);
		return b;
	}
	return buf_alloc(size);
}

void nbd_pool_put(struct nbd_pool *pool, void *buf, unsigned cls)
{
	size_t size = nbd_pool_class_size(cls);
	struct pool_buf *b = buf;

	if (pool->idle_bytes + size > NBD_POOL_IDLE_MAX) {
		buf_free(buf, size);
		return;
	}
	b->next = pool->idle[cls];
	pool->idle[cls] = b;
	pool->idle_bytes += size;
	POISON((char *)b + sizeof(*b), size - sizeof(*b));
}

void nbd_pool_deinit(struct nbd_pool *pool)
{
	for (unsigned cls = 0; cls < NBD_POOL_CLASSES; cls++) {
		while (pool->idle[cls]) {
			struct pool_buf *b = pool->idle[cls];
			pool->idle[cls] = b->next;
			UNPOISON(b, nbd_pool_class_size(cls));
			buf_free(b, nbd_pool_class_size(cls));
		}
	}
	pool->idle_bytes = 0;
}

/* Bytes of a connection holding @held that count against the server cap. */
static uint64_t over_floor(uint64_t held)
{
	return held > NBD_CONN_MEM_FLOOR ? held - NBD_CONN_MEM_FLOOR : 0;
}

int nbd_mem_admit(struct nbd_conn *c, size_t size)
{
	struct nbd_server *srv = c->srv;
	bool waited = false;

	for (;;) {
		uint64_t delta = over_floor(c->mem + size) - over_floor(c->mem);

		/* After a wait, a client that left meanwhile gets nothing
		 * more executed: its queued requests would only burn
		 * memory and time for replies nobody reads. */
		if (c->dead || srv->stopping || (waited && nbd_conn_hung_up(c)))
			return -ESHUTDOWN;
		if (c->mem && c->mem + size > NBD_CONN_MEM_MAX) {
			co_queue_wait(&c->waitq);
			waited = true;
			continue;
		}
		if (delta && srv->mem_charged && srv->mem_charged + delta > NBD_SRV_MEM_MAX) {
			co_queue_wait(&srv->mem_wait);
			waited = true;
			continue;
		}
		c->mem += size;
		srv->mem_charged += delta;
		return 0;
	}
}

void nbd_mem_release(struct nbd_conn *c, size_t size)
{
	struct nbd_server *srv = c->srv;
	uint64_t delta = over_floor(c->mem) - over_floor(c->mem - size);

	c->mem -= size;
	srv->mem_charged -= delta;
	if (delta)
		co_queue_wake_all(&srv->mem_wait);
	/* The connection's own reader is woken by the request's end. */
}
