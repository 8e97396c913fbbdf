/* SPDX-License-Identifier: MIT */
/* Small shared helpers: logging, endianness, checked arithmetic, sizes,
 * iovec slicing.  No state; safe from any thread. */
#ifndef QUBLK_UTIL_H
#define QUBLK_UTIL_H

#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
#define ALIGN_UP(n, a) (((n) + (a) - 1) & ~((__typeof__(n))(a) - 1))
#define ALIGN_DOWN(n, a) ((n) & ~((__typeof__(n))(a) - 1))
#define IS_ALIGNED(n, a) (((n) & ((a) - 1)) == 0)
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* A spin-wait loop's body: let the sibling hyperthread (or the host) run. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

/* A tiny spinlock for short critical sections shared between threads
 * (never held across a coroutine yield). */
static inline void spin_lock(int *l)
{
	while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(l, __ATOMIC_RELAXED))
			cpu_relax();
}
static inline void spin_unlock(int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

/* Logging to stderr, prefixed with the program name.  log_debug prints
 * only when QUBLK_DEBUG is set in the environment. */
void log_set_prog(const char *name);
void log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern bool log_debug_enabled;

/* Big-endian loads/stores for on-disk structures. */
static inline uint16_t get_be16(const void *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get_be32(const void *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get_be64(const void *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put_be16(void *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put_be32(void *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put_be64(void *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* Checked arithmetic: return true on overflow (like __builtin_*_overflow). */
#define ckd_add(r, a, b) __builtin_add_overflow((a), (b), (r))
#define ckd_mul(r, a, b) __builtin_mul_overflow((a), (b), (r))
#define ckd_sub(r, a, b) __builtin_sub_overflow((a), (b), (r))

/* @path made absolute by prefixing the working directory, symlinks kept:
 * a relative backing file name is then looked up next to the path the
 * user gave, as QEMU does.  Returns -errno (-ENAMETOOLONG). */
int path_absolute(const char *path, char *out, size_t outlen);

/* Parse "123", "4k", "64K", "1M", "2G", "1T" (binary units, optional
 * trailing 'B' or 'iB').  Returns -EINVAL / -ERANGE or 0. */
int parse_size(const char *s, uint64_t *out);

/* iovec helpers (no allocation). */
size_t iov_size(const struct iovec *iov, int iovcnt);
/* Describe bytes [off, off+len) of @src in @dst (at most @dst_max
 * entries).  Returns the number of entries or -EINVAL if it does not fit. */
int iov_slice(const struct iovec *src, int src_cnt, size_t off, size_t len,
	      struct iovec *dst, int dst_max);
__attribute__((warn_unused_result)) int iov_memset(const struct iovec *iov, int iovcnt, size_t off, int c, size_t len);
/* Copy between a flat buffer and bytes at @off of an iovec.  These three
 * return 0, or -errno where a piece in a kernel buffer window could not
 * be copied by user copy (kbuf.h): plain memory never fails. */
__attribute__((warn_unused_result)) int iov_to_buf(const struct iovec *iov, int iovcnt, size_t off, void *buf, size_t len);
__attribute__((warn_unused_result)) int iov_from_buf(const struct iovec *iov, int iovcnt, size_t off, const void *buf, size_t len);
bool buf_is_zero(const void *buf, size_t len);

#endif
