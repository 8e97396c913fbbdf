/* SPDX-License-Identifier: MIT */
/*
 * Stackful coroutines for request code that reads top to bottom.
 *
 * Thread model: a coroutine belongs to the thread that created it and is
 * only ever entered on that thread.  coro_enter() switches into a
 * coroutine and returns when it yields or finishes; coro_yield() switches
 * back to whoever entered it.  Stacks are allocated once (coro_new) and
 * reused (coro_reset), so the I/O path allocates nothing.
 *
 * A coroutine's home is the aio_ctx current when it was created (or first
 * entered); it is only ever resumed by its home thread's loop.
 *
 * co_mutex works across threads (ublk queues share one qcow2 image): the
 * lock is handed directly to the first waiter, which is woken on its home
 * thread.  co_queue is NOT locked itself: use it under a co_mutex (and
 * wait with co_queue_wait_unlock) or from a single thread.  A woken
 * coroutine is scheduled on its home aio context, never entered from
 * inside the waker.
 */
#ifndef QUBLK_CORO_H
#define QUBLK_CORO_H

#include <stdbool.h>
#include <stddef.h>

struct coro;
typedef void (*coro_fn)(void *opaque);

#define CORO_STACK_DEFAULT (128 * 1024)

/* Returns NULL with errno set on failure. */
struct coro *coro_new(coro_fn fn, void *opaque, size_t stack_size);
void coro_free(struct coro *co);
/* Rearm a finished (or never-entered) coroutine with a new function. */
void coro_reset(struct coro *co, coro_fn fn, void *opaque);
/* Switch into @co; returns when it yields or finishes. */
void coro_enter(struct coro *co);
/* Must be called from inside a coroutine. */
void coro_yield(void);
/* The running coroutine, or NULL on the thread's main stack. */
struct coro *coro_self(void);
bool coro_finished(const struct coro *co);

/* Intrusive link used by wait queues and the scheduler's ready list. */
struct coro *coro_next(struct coro *co);
void coro_set_next(struct coro *co, struct coro *next);

struct co_queue {
	struct coro *head, *tail;
};
#define CO_QUEUE_INIT { NULL, NULL }
static inline bool co_queue_empty(const struct co_queue *q) { return !q->head; }
/* Yield until woken by co_queue_wake_*(). Coroutine context only. */
void co_queue_wait(struct co_queue *q);
/* Schedule the first / every waiter. Returns true if one was woken. */
bool co_queue_wake_one(struct co_queue *q);
void co_queue_wake_all(struct co_queue *q);

struct co_mutex {
	bool locked;
	struct co_queue waiters;
	int spin;                 /* guards locked and waiters */
};
#define CO_MUTEX_INIT { false, CO_QUEUE_INIT, 0 }
/* Outside a coroutine the mutex must be free (tools run single-threaded). */
void co_mutex_lock(struct co_mutex *m);
void co_mutex_unlock(struct co_mutex *m);
/* With @m held: queue on @q, release @m, sleep until woken, retake @m.
 * No wakeup can be lost between the release and the sleep. */
void co_queue_wait_unlock(struct co_queue *q, struct co_mutex *m);

/* With spinlock *@spin held: queue on @q, release it, sleep until woken.
 * For wait lists guarded by a spinlock instead of a co_mutex. */
void co_queue_wait_spin(struct co_queue *q, int *spin);

struct aio_ctx;
struct aio_ctx *coro_home(struct coro *co);

#endif
