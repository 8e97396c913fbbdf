/* SPDX-License-Identifier: MIT */
/*
 * Stackful coroutines.  On x86_64 a context switch is a few instructions
 * (callee-saved registers pushed on the old stack, stack pointer swapped);
 * elsewhere ucontext is used.  Stacks are mmap'd with a guard page below.
 *
 * Thread model: each thread has its own "current" coroutine; a coroutine
 * is entered only on the thread that created it.  Under AddressSanitizer
 * every switch is announced with __sanitizer_{start,finish}_switch_fiber.
 */
#include "common/coro.h"

#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/aio.h"
#include "common/util.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#define CORO_UCONTEXT 1
#endif

#if defined(QUBLK_ASAN)
#include <sanitizer/asan_interface.h>
#define ASAN_START(save, bottom, size) __sanitizer_start_switch_fiber((save), (bottom), (size))
#define ASAN_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber((save), (bottom), (size))
#else
#define ASAN_START(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define ASAN_FINISH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#endif

struct coro {
#ifdef CORO_UCONTEXT
	ucontext_t ctx, caller_ctx;
#else
	void *sp;               /* saved stack pointer while switched out */
	void *caller_sp;        /* where coro_yield() returns to */
#endif
	void *map;              /* mmap'd region incl. guard page */
	size_t map_size;
	void *stack;            /* usable stack base (lowest address) */
	size_t stack_size;
	coro_fn fn;
	void *opaque;
	struct coro *caller;    /* coroutine that entered us, or NULL */
	struct coro *next;      /* wait-queue / ready-list link */
	struct aio_ctx *home;   /* the loop that resumes us */
	bool finished;
	bool fresh;             /* not yet started since the last reset */
	void *asan_fake;        /* ASan fake stack of the side switched away */
	const void *caller_bottom;
	size_t caller_size;
};

static __thread struct coro *current;

#ifndef CORO_UCONTEXT
/* qublk_switch(save, to): push callee-saved registers, store rsp in
 * *save, load @to, pop and return on the other stack. */
void qublk_switch(void **save, void *to);
__asm__(".text\n"
	".globl qublk_switch\n"
	".type qublk_switch,@function\n"
	"qublk_switch:\n"
	"\tpushq %rbp\n"
	"\tpushq %rbx\n"
	"\tpushq %r12\n"
	"\tpushq %r13\n"
	"\tpushq %r14\n"
	"\tpushq %r15\n"
	"\tmovq %rsp, (%rdi)\n"
	"\tmovq %rsi, %rsp\n"
	"\tpopq %r15\n"
	"\tpopq %r14\n"
	"\tpopq %r13\n"
	"\tpopq %r12\n"
	"\tpopq %rbx\n"
	"\tpopq %rbp\n"
	"\tret\n"
	".size qublk_switch, .-qublk_switch\n"
	".section .note.GNU-stack,\"\",@progbits\n"
	".text\n");
#endif

static void coro_finish_switch_in(struct coro *co)
{
	ASAN_FINISH(co->asan_fake, &co->caller_bottom, &co->caller_size);
}

static __attribute__((noreturn)) void coro_main(void)
{
	struct coro *co = current;

	coro_finish_switch_in(co);
	for (;;) {
		co->fn(co->opaque);
		co->finished = true;
		co->asan_fake = NULL;
		/* NULL save: this fiber's fake stack may be freed. */
		ASAN_START(NULL, co->caller_bottom, co->caller_size);
#ifdef CORO_UCONTEXT
		swapcontext(&co->ctx, &co->caller_ctx);
#else
		qublk_switch(&co->sp, co->caller_sp);
#endif
		/* Re-entered after coro_reset(). */
		coro_finish_switch_in(co);
	}
}

#ifdef CORO_UCONTEXT
static void coro_uc_entry(void) { coro_main(); }
#endif

static void coro_prepare(struct coro *co)
{
#ifdef CORO_UCONTEXT
	getcontext(&co->ctx);
	co->ctx.uc_stack.ss_sp = co->stack;
	co->ctx.uc_stack.ss_size = co->stack_size;
	co->ctx.uc_link = NULL;
	makecontext(&co->ctx, coro_uc_entry, 0);
#else
	/* Initial frame popped by qublk_switch: six registers then the
	 * return address.  After the ret, rsp % 16 == 8 as on a call. */
	uintptr_t top = ((uintptr_t)co->stack + co->stack_size) & ~(uintptr_t)15;
	void **sp = (void **)(top - 8);
	*--sp = (void *)coro_main;    /* return address */
	for (int i = 0; i < 6; i++)
		*--sp = NULL;          /* rbp rbx r12 r13 r14 r15 */
	co->sp = sp;
#endif
	co->fresh = true;
	co->finished = false;
}

struct coro *coro_new(coro_fn fn, void *opaque, size_t stack_size)
{
	long page = sysconf(_SC_PAGESIZE);
	struct coro *co = calloc(1, sizeof(*co));
	if (!co)
		return NULL;
	if (!stack_size)
		stack_size = CORO_STACK_DEFAULT;
	stack_size = ALIGN_UP(stack_size, (size_t)page);
	co->map_size = stack_size + page;
	co->map = mmap(NULL, co->map_size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (co->map == MAP_FAILED) {
		free(co);
		return NULL;
	}
	/* Guard page below the stack catches overflows. */
	if (mprotect(co->map, page, PROT_NONE)) {
		munmap(co->map, co->map_size);
		free(co);
		return NULL;
	}
	co->stack = (char *)co->map + page;
	co->stack_size = stack_size;
	co->fn = fn;
	co->opaque = opaque;
	co->home = aio_ctx_current();
	coro_prepare(co);
	return co;
}

void coro_free(struct coro *co)
{
	if (!co)
		return;
	assert(co != current);
	munmap(co->map, co->map_size);
	free(co);
}

void coro_reset(struct coro *co, coro_fn fn, void *opaque)
{
	assert(co->finished || co->fresh);
	co->fn = fn;
	co->opaque = opaque;
	if (co->finished) {
#ifdef CORO_UCONTEXT
		coro_prepare(co);
#else
		/* The finished coroutine is parked inside coro_main's loop:
		 * resuming it runs the new function. */
		co->finished = false;
		co->fresh = true;
#endif
	}
}

void coro_enter(struct coro *co)
{
	struct coro *prev = current;
	void *fake = NULL;

	assert(!co->finished && co != prev);
	if (!co->home)
		co->home = aio_ctx_current();
	co->caller = prev;
	co->fresh = false;
	current = co;
	ASAN_START(&fake, co->stack, co->stack_size);
#ifdef CORO_UCONTEXT
	swapcontext(&co->caller_ctx, &co->ctx);
#else
	qublk_switch(&co->caller_sp, co->sp);
#endif
	ASAN_FINISH(fake, NULL, NULL);
	current = prev;
}

void coro_yield(void)
{
	struct coro *co = current;

	assert(co);
	ASAN_START(&co->asan_fake, co->caller_bottom, co->caller_size);
#ifdef CORO_UCONTEXT
	swapcontext(&co->ctx, &co->caller_ctx);
#else
	qublk_switch(&co->sp, co->caller_sp);
#endif
	coro_finish_switch_in(co);
}

struct coro *coro_self(void) { return current; }
struct aio_ctx *coro_home(struct coro *co) { return co->home; }
bool coro_finished(const struct coro *co) { return co->finished; }
struct coro *coro_next(struct coro *co) { return co->next; }
void coro_set_next(struct coro *co, struct coro *next) { co->next = next; }

static void enqueue(struct co_queue *q, struct coro *co);
static struct coro *dequeue(struct co_queue *q);

void co_queue_wait(struct co_queue *q)
{
	struct coro *co = current;

	assert(co);
	enqueue(q, co);
	coro_yield();
}

bool co_queue_wake_one(struct co_queue *q)
{
	struct coro *co = dequeue(q);

	if (!co)
		return false;
	aio_schedule(co);
	return true;
}

void co_queue_wake_all(struct co_queue *q)
{
	while (co_queue_wake_one(q))
		;
}


static void enqueue(struct co_queue *q, struct coro *co)
{
	co->next = NULL;
	if (q->tail)
		q->tail->next = co;
	else
		q->head = co;
	q->tail = co;
}

static struct coro *dequeue(struct co_queue *q)
{
	struct coro *co = q->head;
	if (co) {
		q->head = co->next;
		if (!q->head)
			q->tail = NULL;
		co->next = NULL;
	}
	return co;
}

void co_mutex_lock(struct co_mutex *m)
{
	spin_lock(&m->spin);
	if (!m->locked) {
		m->locked = true;
		spin_unlock(&m->spin);
		return;
	}
	/* Tools outside coroutines are single-threaded: nobody can hold it. */
	assert(current);
	enqueue(&m->waiters, current);
	spin_unlock(&m->spin);
	/* Woken by unlock with the lock handed to us.  Our home loop cannot
	 * resume us before we have yielded: it runs on this thread. */
	coro_yield();
}

void co_mutex_unlock(struct co_mutex *m)
{
	struct coro *next;

	spin_lock(&m->spin);
	assert(m->locked);
	next = dequeue(&m->waiters);
	if (!next)
		m->locked = false;
	spin_unlock(&m->spin);
	if (next)
		aio_schedule(next);
}

void co_queue_wait_unlock(struct co_queue *q, struct co_mutex *m)
{
	assert(current);
	enqueue(q, current);
	co_mutex_unlock(m);
	coro_yield();
	co_mutex_lock(m);
}

void co_queue_wait_spin(struct co_queue *q, int *spin)
{
	assert(current);
	enqueue(q, current);
	spin_unlock(spin);
	coro_yield();
}
