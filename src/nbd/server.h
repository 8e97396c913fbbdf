/* SPDX-License-Identifier: MIT */
/*
 * The NBD server: serves one open image (struct bdrv) to any number of
 * clients over a unix socket or TCP: fixed newstyle negotiation, simple
 * and structured replies, block status, optional TLS.
 *
 * Thread model: everything runs on the calling thread's aio_ctx, which
 * must be current (aio_ctx_set_current) before nbd_server_open and stays
 * current until nbd_server_close.  Socket I/O, signal delivery and the
 * image's own I/O share that one io_uring.
 *
 * Lifetime: open (listens) -> run (serves until stopped, then drains every
 * connection and flushes the image) -> close (frees everything; the bdrv
 * stays the caller's to close).
 */
#ifndef QUBLK_NBD_SERVER_H
#define QUBLK_NBD_SERVER_H

#include <stdbool.h>

struct bdrv;
struct aio_ctx;
struct nbd_server;

enum nbd_tls_mode {
	NBD_TLS_OFF,               /* plaintext only; STARTTLS is unsupported */
	NBD_TLS_ON,                /* STARTTLS offered, plaintext allowed */
	NBD_TLS_REQUIRE,           /* every option but STARTTLS needs TLS first */
};

struct nbd_server_opts {
	const char *socket_path;   /* unix socket; NULL for TCP */
	const char *bind_addr;     /* TCP: host or address, NULL = 127.0.0.1 */
	const char *port;          /* TCP: service or number, NULL = 10809; "0" = any free port */
	const char *export_name;   /* NULL = ""; the empty name always matches too */
	bool read_only;            /* advertise READ_ONLY; writes fail with EPERM */
	/* Connections served at once (qemu-nbd's --shared); more wait in the
	 * listen backlog.  0 = no limit.  NBD_FLAG_CAN_MULTI_CONN is
	 * advertised only when more than one is allowed. */
	unsigned max_conns;
	/* Block SIGINT/SIGTERM and stop on them (read from a signalfd through
	 * the ring).  A second signal drops connections that do not drain. */
	bool handle_signals;
	/* TLS: with ON or REQUIRE, exactly one of the credentials. */
	enum nbd_tls_mode tls;
	const char *tls_creds_dir;  /* x509: ca-cert.pem, server-cert.pem, server-key.pem */
	const char *tls_psk_file;   /* psktool's keys file */
	bool tls_verify_peer;       /* x509: clients must present a certificate the CA signed */
};

/* Create the listening socket (a stale unix socket file is replaced, any
 * other file there is refused) and print "serving FILE on ADDRESS" on
 * stderr.  Returns -errno; errors are logged naming the address. */
int nbd_server_open(struct bdrv *bs, const struct nbd_server_opts *opts,
		    struct nbd_server **out);
/* Serve until nbd_server_stop() or a signal; then stop accepting, let
 * every connection finish its in-flight requests, and flush the image.
 * Returns 0, or -errno if the loop or the final flush failed. */
int nbd_server_run(struct nbd_server *srv);
/* Request a stop; callable from inside the loop (coroutines, callbacks). */
void nbd_server_stop(struct nbd_server *srv);
/* Close sockets (removing the unix socket file) and free.  NULL is a no-op. */
void nbd_server_close(struct nbd_server *srv);

#endif
