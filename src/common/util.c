/* SPDX-License-Identifier: MIT */
/* Logging, size parsing and iovec helpers.  Stateless apart from the
 * program name used as the log prefix (set once at startup). */
#include "common/util.h"

#include "common/kbuf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char *prog = "qublk";
bool log_debug_enabled;

void log_set_prog(const char *name)
{
	prog = name;
	log_debug_enabled = getenv("QUBLK_DEBUG") != NULL;
}

static void vlog(const char *level, const char *fmt, va_list ap)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), "%s: %s", prog, level);
	if (n < 0 || (size_t)n >= sizeof(buf))
		n = 0;
	vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	/* One write per message so lines from threads do not interleave. */
	fprintf(stderr, "%s\n", buf);
}

#define DEFINE_LOG(name, level, cond)                      \
	void name(const char *fmt, ...)                    \
	{                                                  \
		va_list ap;                                \
		if (!(cond))                               \
			return;                            \
		va_start(ap, fmt);                         \
		vlog(level, fmt, ap);                      \
		va_end(ap);                                \
	}
DEFINE_LOG(log_error, "", true)
DEFINE_LOG(log_warn, "warning: ", true)
DEFINE_LOG(log_info, "", true)
DEFINE_LOG(log_debug, "debug: ", log_debug_enabled)

int path_absolute(const char *path, char *out, size_t outlen)
{
	char cwd[4096];
	int n;

	if (path[0] == '/') {
		n = snprintf(out, outlen, "%s", path);
	} else {
		if (!getcwd(cwd, sizeof(cwd)))
			return -errno;
		n = snprintf(out, outlen, "%s/%s", strcmp(cwd, "/") ? cwd : "", path);
	}
	return n < 0 || (size_t)n >= outlen ? -ENAMETOOLONG : 0;
}

int parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned shift = 0;

	if (!s || !*s || *s == '-')
		return -EINVAL;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	case 'p': case 'P': shift = 50; end++; break;
	case 'e': case 'E': shift = 60; end++; break;
	default: break;
	}
	if (shift && (end[0] == 'i' && end[1] == 'B'))
		end += 2;
	else if (*end == 'B' || (!shift && *end == 'b'))
		end++;
	if (*end)
		return -EINVAL;
	if (shift && v > (UINT64_MAX >> shift))
		return -ERANGE;
	*out = (uint64_t)v << shift;
	return 0;
}

size_t iov_size(const struct iovec *iov, int iovcnt)
{
	size_t n = 0;
	for (int i = 0; i < iovcnt; i++)
		n += iov[i].iov_len;
	return n;
}

int iov_slice(const struct iovec *src, int src_cnt, size_t off, size_t len,
	      struct iovec *dst, int dst_max)
{
	int n = 0;
	for (int i = 0; i < src_cnt && len; i++) {
		if (off >= src[i].iov_len) {
			off -= src[i].iov_len;
			continue;
		}
		if (n == dst_max)
			return -EINVAL;
		size_t take = MIN(src[i].iov_len - off, len);
		dst[n].iov_base = (char *)src[i].iov_base + off;
		dst[n].iov_len = take;
		n++;
		len -= take;
		off = 0;
	}
	return len ? -EINVAL : n;
}

/* Walk bytes [off, off+len) of an iovec, evaluating BODY (an int: 0 or
 * -errno) on each piece; the first error ends the walk in @err. */
#define IOV_WALK(iov, iovcnt, off, len, err, BODY)                            \
	do {                                                                  \
		size_t _off = (off), _len = (len), _done = 0;                 \
		for (int _i = 0; _i < (iovcnt) && _len && !(err); _i++) {     \
			if (_off >= (iov)[_i].iov_len) {                      \
				_off -= (iov)[_i].iov_len;                    \
				continue;                                     \
			}                                                     \
			size_t piece = MIN((iov)[_i].iov_len - _off, _len);   \
			char *base = (char *)(iov)[_i].iov_base + _off;       \
			size_t done = _done;                                  \
			(err) = (BODY);                                       \
			(void)done;                                           \
			_done += piece;                                       \
			_len -= piece;                                        \
			_off = 0;                                             \
		}                                                             \
	} while (0)

/* A piece in a kernel buffer window (kbuf.h) is copied by user copy. */
int iov_memset(const struct iovec *iov, int iovcnt, size_t off, int c, size_t len)
{
	struct kbuf_ref r;
	int err = 0;

	IOV_WALK(iov, iovcnt, off, len, err,
		 kbuf_find(base, piece, &r) ? kbuf_fill(&r, c, piece)
					    : (memset(base, c, piece), 0));
	return err;
}

int iov_to_buf(const struct iovec *iov, int iovcnt, size_t off, void *buf, size_t len)
{
	struct kbuf_ref r;
	int err = 0;

	IOV_WALK(iov, iovcnt, off, len, err,
		 kbuf_find(base, piece, &r) ? kbuf_user_copy(&r, true, (char *)buf + done, piece)
					    : (memcpy((char *)buf + done, base, piece), 0));
	return err;
}

int iov_from_buf(const struct iovec *iov, int iovcnt, size_t off, const void *buf, size_t len)
{
	struct kbuf_ref r;
	int err = 0;

	IOV_WALK(iov, iovcnt, off, len, err,
		 kbuf_find(base, piece, &r)
			 ? kbuf_user_copy(&r, false, (char *)buf + done, piece)
			 : (memcpy(base, (const char *)buf + done, piece), 0));
	return err;
}

bool buf_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	/* Check the first 16 bytes, then compare the buffer with itself
	 * shifted: memcmp is vectorised and this needs no zero page. */
	size_t head = MIN(len, (size_t)16);
	for (size_t i = 0; i < head; i++)
		if (p[i])
			return false;
	return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}
