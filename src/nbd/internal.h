/* SPDX-License-Identifier: MIT */
/*
 * NBD server internals: the state shared by the server's files.
 *
 *   server.c     lifecycle: open, run (serve, drain, flush), stop, close,
 *                signals
 *   listen.c     listening sockets and the acceptor coroutine
 *   conn.c       a connection: creation, its reader coroutine (negotiate,
 *                then read and dispatch requests), teardown
 *   sock.c       socket I/O of a connection: buffered exact reads,
 *                skipping, full sends
 *   negotiate.c  fixed newstyle option haggling
 *   request.c    a request: buffers, validation at the boundary, execution
 *   reply.c      replies: encoding and the per-connection send queue
 *   pool.c       request buffers (a server-wide pool) and the memory caps
 *   tls.c        TLS (STARTTLS) with GnuTLS over the connection's socket I/O
 *
 * Thread model: one thread, one aio_ctx (srv->ctx).  Every socket
 * operation, the signalfd read and the image's I/O are SQEs on that ring,
 * each awaited by a coroutine: the acceptor, the signal reader, one reader
 * per connection, and one coroutine per request in flight (a pool of
 * NBD_CONN_DEPTH per connection).  Nothing here is touched by another
 * thread.
 */
#ifndef QUBLK_NBD_INTERNAL_H
#define QUBLK_NBD_INTERNAL_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <gnutls/gnutls.h>

#include "common/aio.h"
#include "common/coro.h"
#include "nbd/proto.h"
#include "nbd/server.h"

#define NBD_CONN_DEPTH   64                  /* concurrent requests per connection */
#define NBD_RBUF_SIZE    (64 * 1024)         /* receive buffer for headers, small payloads */
/* Request buffers and memory caps (pool.c): buffer memory stays under
 * NBD_SRV_MEM_MAX + connections * NBD_CONN_MEM_FLOOR + NBD_POOL_IDLE_MAX. */
#define NBD_POOL_MIN       4096                    /* smallest buffer class */
#define NBD_POOL_CLASSES   14                      /* 4 KiB .. 32 MiB (NBD_MAX_PAYLOAD) */
#define NBD_POOL_IDLE_MAX  (32u * 1024 * 1024)     /* idle buffers kept for reuse */
#define NBD_CONN_MEM_MAX   (64u * 1024 * 1024)     /* buffers one connection holds */
#define NBD_CONN_MEM_FLOOR (1024u * 1024)          /* per connection, outside the server cap */
#define NBD_SRV_MEM_MAX    (256u * 1024 * 1024)    /* the rest, all connections together */
#define NBD_OPT_MAX      (NBD_MAX_STRING + 1024) /* largest option payload we read */
#define NBD_LISTEN_BACKLOG SOMAXCONN       /* bursts of clients queue, not fail */
#define NBD_SEND_IOV     64                  /* iovecs in one reply SENDMSG */
#define NBD_READ_CHUNKS  16                  /* data/hole chunks in one read reply */
#define NBD_CHUNK_HDR_MAX 48                 /* a chunk header (extended: 32) and its fixed fields */
#define NBD_BS_EXTENTS   1024                /* descriptors per block status chunk */
#define NBD_BS_DESC      8                   /* a descriptor: u32 length, u32 flags */
#define NBD_BS_DESC_EXT  16                  /* extended: u64 length, u32 0, u32 flags */
#define NBD_BS_STEPS     65536               /* block status lookups per request */
#define NBD_STOP_GRACE_MS 1000               /* after a stop, busy connections get this long */
#define NBD_READER_STACK (256 * 1024)        /* the reader runs GnuTLS handshakes */

#define container_of(ptr, type, member) \
	((type *)((char *)(ptr) - offsetof(type, member)))

struct nbd_conn;

/* Idle request buffers by class (pool.c). */
struct nbd_pool {
	struct pool_buf *idle[NBD_POOL_CLASSES];
	size_t idle_bytes;
};

/* Meta contexts we serve; a context's id on the wire is its index + 1. */
enum { NBD_META_ALLOC, NBD_META_DEPTH, NBD_META_COUNT };
extern const char *const nbd_meta_names[NBD_META_COUNT];

struct nbd_req {
	struct nbd_conn *conn;
	struct coro *co;
	struct nbd_req *next_free;
	uint8_t cookie[8];         /* echoed verbatim */
	uint16_t flags, type;
	uint64_t off;
	uint64_t len;              /* 32 bits on the wire unless c->extended */
	int error;                 /* errno found by the reader, 0 if none */
	/* structured read: the range as data and hole segments */
	unsigned nsegs;
	struct { uint32_t len; bool zero; } segs[NBD_READ_CHUNKS];
	/* block status: descriptors per context, in data (nbd_bs_buf_size()) */
	unsigned next[NBD_META_COUNT];
	/* reply state, see reply.c */
	uint8_t rhdr[NBD_READ_CHUNKS][NBD_CHUNK_HDR_MAX];
	struct iovec riov[2 * NBD_READ_CHUNKS];
	int riovcnt;
	bool reply_done;           /* sent (or failed: the socket is dead) */
	bool sender;               /* handed the sender role */
	struct nbd_req *reply_next;
	void *data;                /* payload buffer from the pool, or NULL */
	unsigned data_cls;         /* its pool class */
};

struct nbd_conn {
	struct nbd_server *srv;
	int fd;
	unsigned id;
	struct coro *co;                /* the reader */
	struct nbd_conn *next, *prev;   /* srv->conns or srv->dead */
	bool no_zeroes;
	bool structured;                /* structured replies: NBD_OPT_STRUCTURED_REPLY,
					 * or implied by extended headers */
	bool extended;                  /* NBD_OPT_EXTENDED_HEADERS negotiated */
	bool meta[NBD_META_COUNT];      /* contexts selected (SET_META_CONTEXT) */
	bool dead;                      /* socket broken or shut down */
	bool idle;                      /* idle_op waits for a new message */
	unsigned inflight;              /* dispatched requests not yet done */
	uint64_t mem;                   /* bytes of request buffers held (pool.c) */
	struct co_queue waitq;          /* the reader, waiting for a request to end */
	bool sending;                   /* a request holds the sender role */
	struct nbd_req *rq_head, *rq_tail;  /* replies waiting to be sent */
	struct iovec siov[NBD_SEND_IOV];    /* the sender's batch */
	struct aio_wait idle_op;        /* recv of a new message: cancellable */
	bool parked;                    /* on srv->parked (sock.c) */
	bool park_arm;                  /* woken to arm its recv: the loop sleeps */
	struct nbd_conn *park_next, *park_prev;
	struct aio_wait data_op;        /* recv inside a message: cancelled only by a kill */
	struct aio_wait send_op;        /* the one send in progress */
	uint8_t *rbuf;                  /* NBD_RBUF_SIZE */
	size_t rpos, rlen;
	uint8_t *optbuf;                /* NBD_OPT_MAX, negotiation only */
	gnutls_session_t tls;           /* after STARTTLS, else NULL (tls.c) */
	struct aio_wait *tls_rop;       /* the wait GnuTLS's pull uses now */
	bool tls_cancelled;             /* that wait was cancelled by a stop */
	bool tls_pushing;               /* a coroutine is in GnuTLS's push */
	struct co_queue tls_pushq;      /* others waiting to push */
	struct nbd_req *free_reqs;
	struct nbd_req reqs[NBD_CONN_DEPTH];
};

struct nbd_server {
	struct aio_ctx *ctx;
	struct bdrv *bs;
	char *export_name;
	uint16_t tflags;               /* transmission flags */
	enum nbd_tls_mode tls_mode;
	struct nbd_tls *tls;           /* credentials (tls.c), NULL without TLS */
	uint32_t pref_block;
	int listen_fd, sig_fd;
	char *unlink_path;             /* unix socket to remove on close */
	sigset_t old_mask;
	bool mask_saved;
	struct coro *accept_co, *sig_co, *grace_co;
	struct aio_wait accept_op, sig_op, grace_op;
	bool stopping, forced, sig_exit;
	int error;                     /* fatal loop error */
	unsigned next_id;
	unsigned max_conns, nconns;    /* limit (0: none), live connections */
	struct co_queue accept_wait;   /* the acceptor, at the limit */
	struct nbd_conn *conns;        /* live connections */
	struct nbd_conn *dead;         /* readers finished, to free from the loop */
	struct nbd_pool pool;          /* request buffers */
	uint64_t mem_charged;          /* buffer bytes against NBD_SRV_MEM_MAX */
	struct co_queue mem_wait;      /* readers waiting for NBD_SRV_MEM_MAX room */
	struct nbd_conn *parked;       /* readers waiting unarmed (sock.c) */
	unsigned nparked;
};

/* server.c */
/* A coroutine the main loop waits for is about to finish: make the loop
 * re-check (it may be blocked waiting for a completion). */
void nbd_loop_kick(struct nbd_server *srv);

/* listen.c: fill srv->listen_fd and @desc (the address, for the log).
 * Return -errno, logged. */
int nbd_listen_unix(struct nbd_server *srv, const char *path, char *desc, size_t desc_len);
int nbd_listen_tcp(struct nbd_server *srv, const char *host, const char *port,
		   char *desc, size_t desc_len);
/* The acceptor coroutine (opaque: the server). */
void nbd_accept_main(void *opaque);

/* conn.c */
/* Take @fd as a new connection and start its reader.  Returns -ENOMEM
 * (@fd is then still the caller's). */
int nbd_conn_new(struct nbd_server *srv, int fd);
void nbd_conn_free(struct nbd_conn *c);

/* sock.c */
/* Mark the connection broken and wake anything blocked on its socket
 * (shut it down, cancel its pending recv and send).  In-flight requests
 * still finish; their replies fail fast. */
void nbd_conn_kill(struct nbd_conn *c);
/* True (and the connection killed) if the client has closed or shut
 * down its side: checked after a long wait, so that requests still
 * queued in the socket of a client that left are not executed.  NBD
 * ends with NBD_CMD_DISC, never with a half-close. */
bool nbd_conn_hung_up(struct nbd_conn *c);
/* Read exactly @n bytes.  @idle: this starts a new message, so a stop may
 * cancel it.  Returns 0, -ECONNRESET at end of stream, -ESHUTDOWN when
 * cancelled by a stop, or -errno. */
int nbd_conn_read(struct nbd_conn *c, void *dst, size_t n, bool idle);
/* The loop's idle hook (aio_ctx.idle_hook, opaque: the server), set when
 * the loop spins before sleeping: wakes the readers parked without a recv
 * armed whose sockets have data, or (@sleeping) all of them, to arm. */
bool nbd_sock_idle_hook(void *opaque, bool sleeping);
/* Wake @c's reader if it is parked (a kill or a stop). */
void nbd_conn_unpark(struct nbd_conn *c, bool arm);
/* Read and throw away @n bytes (a payload we refuse). */
int nbd_conn_skip(struct nbd_conn *c, uint64_t n);
/* Send every byte of @iov (which is consumed).  Callers serialise (the
 * sender role, or negotiation before any request exists).  Returns 0 or
 * -errno. */
int nbd_conn_send(struct nbd_conn *c, struct iovec *iov, int cnt);
/* The same on the bare socket, under TLS too (GnuTLS's push). */
int nbd_sock_send(struct nbd_conn *c, struct iovec *iov, int cnt);
int nbd_conn_send_buf(struct nbd_conn *c, const void *buf, size_t len);

/* negotiate.c: returns 0 when transmission starts, -errno to drop the
 * connection. */
int nbd_negotiate(struct nbd_conn *c);

/* request.c */
/* Read one request into @r.  Returns 1 to dispatch, 0 for DISC, -errno to
 * drop the connection. */
int nbd_read_request(struct nbd_conn *c, struct nbd_req *r);
/* The coroutine of a dispatched request (opaque: the nbd_req). */
void nbd_req_main(void *opaque);
/* Return @r's temporary buffer and its slot. */
void nbd_req_put(struct nbd_conn *c, struct nbd_req *r);

/* pool.c */
/* The class of a buffer of @len bytes (len <= NBD_MAX_PAYLOAD), and its size. */
unsigned nbd_pool_class(size_t len);
size_t nbd_pool_class_size(unsigned cls);
/* A buffer of class @cls, or NULL when out of memory. */
void *nbd_pool_get(struct nbd_pool *pool, unsigned cls);
void nbd_pool_put(struct nbd_pool *pool, void *buf, unsigned cls);
/* Free the idle buffers. */
void nbd_pool_deinit(struct nbd_pool *pool);
/* Reader only: wait until @c may hold @size more bytes of buffers under
 * both caps, and count them.  Returns 0, or -ESHUTDOWN if the connection
 * died or the server stopped meanwhile. */
int nbd_mem_admit(struct nbd_conn *c, size_t size);
/* Give back what nbd_mem_admit() counted; wakes readers waiting for the
 * server cap. */
void nbd_mem_release(struct nbd_conn *c, size_t size);

/* tls.c */
/* Load the credentials @opts name (nothing when TLS is off).  Returns
 * -errno, logged naming the file. */
int nbd_tls_init(struct nbd_server *srv, const struct nbd_server_opts *opts);
void nbd_tls_deinit(struct nbd_server *srv);
/* Reader: the server side of the handshake after STARTTLS was acked, and
 * the client certificate check.  Returns 0, or -errno to drop. */
int nbd_tls_handshake(struct nbd_conn *c);
void nbd_tls_conn_free(struct nbd_conn *c);
/* Plaintext in, waiting as @op: bytes, 0 at end of stream, -ESHUTDOWN
 * if a stop cancelled @op or the connection died, -EPROTO. */
ssize_t nbd_tls_recv(struct nbd_conn *c, void *buf, size_t len, struct aio_wait *op);
/* Sender: every byte of @iov, encrypted.  Returns 0 or -EPIPE. */
int nbd_tls_send(struct nbd_conn *c, const struct iovec *iov, int cnt);

/* The size of a block status descriptor on @c's wire, and of the buffer
 * that holds every context's descriptors. */
static inline size_t nbd_bs_desc_size(const struct nbd_conn *c)
{
	return c->extended ? NBD_BS_DESC_EXT : NBD_BS_DESC;
}
static inline size_t nbd_bs_buf_size(const struct nbd_conn *c)
{
	return NBD_META_COUNT * NBD_BS_EXTENTS * nbd_bs_desc_size(c);
}

/* reply.c */
/* Send @r's reply (error @err, a positive errno, or 0 with read data).
 * Returns when it is on the wire or the socket is dead. */
void nbd_send_reply(struct nbd_conn *c, struct nbd_req *r, int err);

#endif
