/* SPDX-License-Identifier: MIT */
/*
 * A file in memory (tmpfs, ramfs) read and written through a shared
 * mapping of it: a copy with no system call, where a read or write would
 * be a system call on the calling thread (inline I/O, io.c) or a hop to
 * an io-wq worker.  Only ranges the mapping can serve without changing
 * the file go through it: below the known end of file, in 2 MiB chunks
 * that hold no hole (a fault on a hole would allocate a page where a
 * read leaves none).  Everything else is the caller's system call, as
 * before, and the io layer tells the map what changes the file's shape
 * (growth, holes punched, truncation).  A fault the map did not foresee
 * (the file cut short by someone else) is caught and the caller falls
 * back to its system call.  Thread-safe.
 */
#ifndef QUBLK_IO_MAP_H
#define QUBLK_IO_MAP_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct io_map;

/* A map of @fd (a regular file on tmpfs or ramfs), read-only or
 * read-write; NULL if it cannot have one or $QUBLK_IO_MAP is 0.  The
 * mapping itself is made when a chunk is first asked (io_map.c): @fd
 * must stay open until io_map_close. */
struct io_map *io_map_open(int fd, bool read_only);
void io_map_close(struct io_map *m);

/* Copy file bytes [off, off + iov's size) to (@write: from) @iov through
 * the mapping.  Returns the size copied, or 0 when the mapping cannot
 * serve the range: the caller then makes its system call.  @counts: the
 * access counts toward mapping the chunks it touches (pass it where the
 * caller's system call is dear, an io-wq hop; an access that does not
 * count uses only chunks already mapped). */
size_t io_map_rw(struct io_map *m, bool write, const struct iovec *iov, int cnt, uint64_t off,
		 bool counts);

/* The mapping's address of file bytes [off, off + len), where io_map_rw
 * would copy them (the same checks, @counts as there), or NULL.  A copy
 * to or from it made by the kernel (a system call given the address)
 * fails with EFAULT where io_map_rw's memcpy would take SIGBUS; the
 * caller reports a copy made with io_map_served_by_kernel. */
void *io_map_range(struct io_map *m, bool write, uint64_t off, size_t len, bool counts);
void io_map_served_by_kernel(struct io_map *m);

/* How many reads and writes the mapping served (0 for NULL), and how
 * many of them the kernel copied (io_map_served_by_kernel). */
uint64_t io_map_copies(const struct io_map *m);
uint64_t io_map_kernel_copies(const struct io_map *m);

/* The file now extends to at least @end (a write or fallocate past its
 * end succeeded). */
void io_map_grown(struct io_map *m, uint64_t end);
/* Before holes are punched in [off, off + len), and again after (an ask
 * that raced the punch is forgotten). */
void io_map_punch(struct io_map *m, uint64_t off, uint64_t len);
/* Before the file is truncated to @size (shrunk or grown). */
void io_map_truncate(struct io_map *m, uint64_t size);

#endif
