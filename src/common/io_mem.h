/* SPDX-License-Identifier: MIT */
/* An io_file backed by memory: for parser tests and fuzzing, where a real
 * file would only slow things down.  Reads past the end give zeros; writes
 * past the end grow the buffer.  Single-threaded; never used by the
 * daemon. */
#ifndef QUBLK_IO_MEM_H
#define QUBLK_IO_MEM_H

#include <stddef.h>
#include <stdint.h>

#include "common/io.h"

struct io_mem {
	struct io_file f;
	uint8_t *data;          /* malloc'd; owned by the io_mem */
	size_t size;
};

/* Set up @m with @size zero bytes.  Returns -ENOMEM or 0. */
int io_mem_init(struct io_mem *m, size_t size);
/* Set up @m with a copy of @data. */
int io_mem_init_copy(struct io_mem *m, const void *data, size_t size);
void io_mem_deinit(struct io_mem *m);

#endif
