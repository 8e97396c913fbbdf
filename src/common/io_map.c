/* SPDX-License-Identifier: MIT */
/*
 * A file in memory through a shared mapping (io_map.h).
 *
 * Why: on tmpfs a 4 KiB read or write is a system call (inline I/O) or an
 * io-wq hop, a 512 KiB one an io-wq hop and a copy serialized with every
 * other write to the file (the inode lock); through a mapping each is a
 * memcpy on the calling thread (Benchmarks in the README).
 *
 * What may go through it.  A fault on a page the file does not have
 * allocates one (tmpfs maps no shared zero page), where read() would
 * have returned zeros and left the file as it was: reading a sparse file
 * through the mapping would fill the file system.  A fault on a page
 * that was fallocate'd and never written clears it, where read() returns
 * zeros for nothing and a whole-page write() just fills it.  So the file
 * is cut in 2 MiB chunks, and only a chunk whose every page is written
 * (resident and up to date, says mincore) is copied through the mapping.
 * Mapping costs too: a fault per page, or one madvise (MADV_POPULATE_*)
 * per chunk, costs more than the system call it saves unless the page is
 * used again, and a fresh daemon over a big file uses most pages once;
 * asking costs too (mincore looks up each of a chunk's 512 pages).  So a
 * chunk is asked once ASK_AFTER pages' worth of I/O that counts went to
 * it by system call, and mapped, in one madvise, after WARM_ACCESSES
 * more: a chunk in use.  What counts is the caller's choice: io.c counts
 * the requests that would hop to an io-wq worker, not the small ones it
 * serves inline (a system call on its own thread, cheaper than their
 * share of the asks and faults), which use only chunks already mapped.
 * The file is mmap'ed at the first ask, not at open, so that one only
 * ever given small requests has no mapping at all.
 * Any other access is the caller's system call, which is what it was
 * before; a chunk found incomplete is asked again after 16 more pages,
 * then 32, 64 ... (the system calls' writes fill it).
 *
 * What changes the shape: growth (a chunk past the old end is unknown
 * again), punched holes and truncation (the chunks they touch are unknown
 * again, before the change).  Each chunk's word carries a generation,
 * bumped by every such reset, so that a check made before a reset cannot
 * mark the chunk whole after it.
 *
 * A fault nobody foresaw (someone else truncated the file) raises SIGBUS
 * inside our memcpy: the handler jumps back and the caller falls back to
 * its system call, which fails or reads short as it would have.
 */
#include "common/io_map.h"

#include <errno.h>
#include <linux/magic.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#include "common/util.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#define MADV_POPULATE_WRITE 23
#endif

#define CHUNK_SHIFT 21
#define CHUNK_SIZE (1ull << CHUNK_SHIFT)
#define PAGE 4096u

/* A chunk's word: generation << 16 | tries << 12 | kind << 10 | count.
 * The generation changes with every reset; tries counts the asks that
 * found holes since the last reset (each one waits twice as long). */
#define COUNT_MASK 0x3ffu
#define KIND_SHIFT 10
#define KIND_MASK (3u << KIND_SHIFT)
#define TRY_SHIFT 12
#define TRY_MASK (0xfu << TRY_SHIFT)
#define LOW_MASK (TRY_MASK | KIND_MASK | COUNT_MASK)
#define GEN_ONE (1u << 16)
enum {
	CH_UNKNOWN,             /* not asked yet (or reset): ask after count pages */
	CH_WHOLE,               /* every page written, mapped as touched */
	CH_SPARSE,              /* had holes: ask again after count pages */
	CH_WARM,                /* every page written: map after count pages */
};
/* Counts are of pages accessed (a 4 KiB request counts 1, a 512 KiB one
 * 128): what mapping a chunk costs grows with its pages, what it saves
 * with the pages copied through it. */
enum {
	ASK_AFTER = 16,         /* pages accessed in a chunk before it is first asked */
	SPARSE_FIRST = 16,      /* pages before the first ask again */
	WARM_ACCESSES = 32,     /* pages accessed by system call before mapping */
};

static uint32_t word(uint32_t gen, unsigned tries, unsigned kind, unsigned count)
{
	return gen | tries << TRY_SHIFT | kind << KIND_SHIFT | MIN(count, COUNT_MASK);
}

struct io_map {
	uint8_t *base;          /* NULL until the first ask (atomic; under lock) */
	int fd;                 /* the io_file's: open while the map is */
	bool map_failed;        /* mmap failed: nothing goes through the map */
	pthread_mutex_t lock;   /* maps the file */
	uint64_t len;           /* address space to map: accesses past it are syscalls */
	uint64_t size;          /* the file's known size (atomic) */
	uint32_t *chunk;        /* len >> CHUNK_SHIFT words (atomic) */
	uint64_t copies;        /* reads and writes served (atomic) */
	uint64_t kernel_copies; /* of which copied by the kernel (atomic) */
	bool read_only;
};

static __thread sigjmp_buf *map_fault;
static struct sigaction old_sigbus;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	(void)si;
	(void)uc;
	if (map_fault)
		siglongjmp(*map_fault, 1);
	/* Not a copy of ours: whoever handled it before (the default
	 * action, or a sanitizer's report) takes the fault again once this
	 * returns. */
	sigaction(sig, &old_sigbus, NULL);
}

static void install_handler(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	/* NODEFER: we leave by siglongjmp without restoring the mask. */
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &old_sigbus);
}

struct io_map *io_map_open(int fd, bool read_only)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	const char *env = getenv("QUBLK_IO_MAP");
	struct io_map *m;
	struct statfs sf;
	struct stat st;
	uint64_t size, whole;

	if ((env && !strcmp(env, "0")) || fstat(fd, &st) || !S_ISREG(st.st_mode) ||
	    fstatfs(fd, &sf) ||
	    (sf.f_type != (typeof(sf.f_type))TMPFS_MAGIC &&
	     sf.f_type != (typeof(sf.f_type))RAMFS_MAGIC))
		return NULL;
	size = (uint64_t)st.st_size;
	/* Room to grow for a file we write (qcow2 allocates at its end). */
	whole = read_only ? size : MAX(2 * size, 64ull << 30);
	whole = MIN(ALIGN_UP(MAX(whole, 1), CHUNK_SIZE), 16ull << 40);
	m = calloc(1, sizeof(*m));
	if (m)
		m->chunk = calloc(whole >> CHUNK_SHIFT, sizeof(*m->chunk));
	if (!m || !m->chunk) {
		free(m);
		return NULL;
	}
	pthread_mutex_init(&m->lock, NULL);
	m->fd = fd;
	m->len = whole;
	m->size = MIN(size, whole);
	m->read_only = read_only;
	for (uint64_t c = 0; c < whole >> CHUNK_SHIFT; c++)
		m->chunk[c] = word(0, 0, CH_UNKNOWN, ASK_AFTER);
	pthread_once(&once, install_handler);
	return m;
}

void io_map_close(struct io_map *m)
{
	if (!m)
		return;
	if (m->base)
		munmap(m->base, m->len);
	pthread_mutex_destroy(&m->lock);
	free(m->chunk);
	free(m);
}

/* The mapping, made at the first ask rather than at open: a file only
 * ever given small requests (which never ask) has none.  NULL if mmap
 * failed (then nothing goes through the map). */
static uint8_t *map_base(struct io_map *m)
{
	uint8_t *base = __atomic_load_n(&m->base, __ATOMIC_ACQUIRE);
	void *p;

	if (base || __atomic_load_n(&m->map_failed, __ATOMIC_RELAXED))
		return base;
	pthread_mutex_lock(&m->lock);
	base = m->base;
	if (!base && !m->map_failed) {
		p = mmap(NULL, m->len, PROT_READ | (m->read_only ? 0 : PROT_WRITE),
			 MAP_SHARED | MAP_NORESERVE, m->fd, 0);
		if (p == MAP_FAILED) {
			__atomic_store_n(&m->map_failed, true, __ATOMIC_RELAXED);
		} else {
			madvise(p, m->len, MADV_DONTFORK);
			base = p;
			__atomic_store_n(&m->base, base, __ATOMIC_RELEASE);
		}
	}
	pthread_mutex_unlock(&m->lock);
	return base;
}

/* Is every page of [start, end) (within one chunk) in the page cache
 * and up to date?  (A page fallocate'd and never written is not: a fault
 * on it would clear it, where read() returns zeros for nothing.) */
static bool chunk_resident(struct io_map *m, uint64_t start, uint64_t end)
{
	unsigned char vec[CHUNK_SIZE / PAGE];
	uint8_t *base = map_base(m);

	if (!base || end <= start || mincore(base + start, end - start, vec))
		return false;
	for (uint64_t i = 0; i < (end - start) / PAGE; i++)
		if (!(vec[i] & 1))
			return false;
	return true;
}

/* May chunk @c be copied through the mapping, for an access of @pages
 * pages of it?  With @counts, the access counts toward mapping the chunk
 * and asks mincore when that is due; without, only a chunk already
 * mapped serves it. */
static bool chunk_ready(struct io_map *m, uint64_t c, unsigned pages, bool counts)
{
	uint32_t *w = &m->chunk[c];
	uint32_t v = __atomic_load_n(w, __ATOMIC_ACQUIRE), gen = v & ~LOW_MASK;
	unsigned kind = (v & KIND_MASK) >> KIND_SHIFT, count = v & COUNT_MASK;
	unsigned tries = (v & TRY_MASK) >> TRY_SHIFT;
	uint64_t start = c << CHUNK_SHIFT, end;
	uint32_t nv;

	if (kind == CH_WHOLE)
		return true;
	if (!counts)
		return false;
	if (count) {
		__atomic_compare_exchange_n(w, &v, v - MIN(count, pages), false,
					    __ATOMIC_RELAXED, __ATOMIC_RELAXED);
		return false;
	}
	/* The chunk's pages within the file's known size. */
	end = MIN(start + CHUNK_SIZE,
		  ALIGN_UP(__atomic_load_n(&m->size, __ATOMIC_ACQUIRE), (uint64_t)PAGE));
	if (kind == CH_WARM) {
		/* Used enough to be worth its page faults (or one madvise):
		 * mapping a chunk at its first access cost 0.6x at depth 1,
		 * where few requests touch a chunk (README, "Mapped I/O"). */
		if (end > start)
			madvise(__atomic_load_n(&m->base, __ATOMIC_ACQUIRE) + start, end - start,
				m->read_only ? MADV_POPULATE_READ : MADV_POPULATE_WRITE);
		nv = word(gen, 0, CH_WHOLE, 0);
	} else if (chunk_resident(m, start, end)) {
		nv = word(gen, 0, CH_WARM, WARM_ACCESSES);
	} else {
		nv = word(gen, MIN(tries + 1, 15u), CH_SPARSE, (unsigned)SPARSE_FIRST << tries);
	}
	if (__atomic_compare_exchange_n(w, &v, nv, false, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE))
		return (nv & KIND_MASK) >> KIND_SHIFT == CH_WHOLE;
	return (v & KIND_MASK) >> KIND_SHIFT == CH_WHOLE;
}

/* Chunks over [off, end) are unknown again, in a new generation; with
 * @keep_sparse, one known to have holes stays so (the file grew: the
 * new part cannot fill the old holes, and asking mincore on every
 * growth of a file written at its end would cost more than it saves). */
static void reset(struct io_map *m, uint64_t off, uint64_t end, bool keep_sparse)
{
	end = MIN(end, m->len);
	if (end <= off)
		return;
	for (uint64_t c = off >> CHUNK_SHIFT; c <= (end - 1) >> CHUNK_SHIFT; c++) {
		uint32_t v = __atomic_load_n(&m->chunk[c], __ATOMIC_RELAXED), nv;
		do {
			uint32_t low = v & LOW_MASK;
			bool sparse = (low & KIND_MASK) >> KIND_SHIFT == CH_SPARSE;
			nv = ((v & ~LOW_MASK) + GEN_ONE) |
			     (keep_sparse && sparse ? low : word(0, 0, CH_UNKNOWN, ASK_AFTER));
		} while (!__atomic_compare_exchange_n(&m->chunk[c], &v, nv, false,
						      __ATOMIC_RELEASE, __ATOMIC_RELAXED));
	}
}

void *io_map_range(struct io_map *m, bool write, uint64_t off, size_t len, bool counts)
{
	uint64_t end = off + len;

	if (!len || end < off || end > m->len || (write && m->read_only) ||
	    end > __atomic_load_n(&m->size, __ATOMIC_ACQUIRE))
		return NULL;
	for (uint64_t c = off >> CHUNK_SHIFT; c <= (end - 1) >> CHUNK_SHIFT; c++) {
		uint64_t a = MAX(off, c << CHUNK_SHIFT), b = MIN(end, (c + 1) << CHUNK_SHIFT);
		if (!chunk_ready(m, c, (unsigned)DIV_ROUND_UP(b - a, PAGE), counts))
			return NULL;
	}
	return __atomic_load_n(&m->base, __ATOMIC_ACQUIRE) + off;
}

void io_map_served_by_kernel(struct io_map *m)
{
	__atomic_add_fetch(&m->copies, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&m->kernel_copies, 1, __ATOMIC_RELAXED);
}

size_t io_map_rw(struct io_map *m, bool write, const struct iovec *iov, int cnt, uint64_t off,
		 bool counts)
{
	size_t len = iov_size(iov, cnt);
	sigjmp_buf jb;
	uint8_t *p = io_map_range(m, write, off, len, counts);

	if (!p)
		return 0;
	if (sigsetjmp(jb, 0)) {
		map_fault = NULL;
		return 0;
	}
	map_fault = &jb;
	for (int i = 0; i < cnt; i++) {
		if (write)
			memcpy(p, iov[i].iov_base, iov[i].iov_len);
		else
			memcpy(iov[i].iov_base, p, iov[i].iov_len);
		p += iov[i].iov_len;
	}
	map_fault = NULL;
	__atomic_add_fetch(&m->copies, 1, __ATOMIC_RELAXED);
	return len;
}

uint64_t io_map_copies(const struct io_map *m)
{
	return m ? __atomic_load_n(&m->copies, __ATOMIC_RELAXED) : 0;
}

uint64_t io_map_kernel_copies(const struct io_map *m)
{
	return m ? __atomic_load_n(&m->kernel_copies, __ATOMIC_RELAXED) : 0;
}

void io_map_grown(struct io_map *m, uint64_t end)
{
	uint64_t cur = __atomic_load_n(&m->size, __ATOMIC_ACQUIRE);

	end = MIN(end, m->len);
	while (cur < end) {
		/* The pages past the old end may be holes. */
		reset(m, cur, end, true);
		if (__atomic_compare_exchange_n(&m->size, &cur, end, false, __ATOMIC_RELEASE,
						__ATOMIC_ACQUIRE))
			break;
	}
}

void io_map_punch(struct io_map *m, uint64_t off, uint64_t len)
{
	reset(m, off, off + len < off ? UINT64_MAX : off + len, false);
}

void io_map_truncate(struct io_map *m, uint64_t size)
{
	uint64_t cur = __atomic_load_n(&m->size, __ATOMIC_ACQUIRE);

	size = MIN(size, m->len);
	if (size < cur) {
		/* Nobody copies past the new end from here on. */
		__atomic_store_n(&m->size, size, __ATOMIC_RELEASE);
		reset(m, size, cur, false);
	} else {
		io_map_grown(m, size);
	}
}
