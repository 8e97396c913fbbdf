/* SPDX-License-Identifier: MIT */
/*
 * TLS for NBD (NBD_OPT_STARTTLS), with GnuTLS over the connection's
 * io_uring socket I/O.
 *
 * Credentials are loaded once, when the server opens, so a bad file is
 * reported before anything listens:
 *   x509  a directory laid out as QEMU's tls-creds-x509: ca-cert.pem
 *         (needed to verify clients), optional ca-crl.pem, server-cert.pem
 *         and server-key.pem;
 *   PSK   a keys file as psktool writes it: "identity:hexkey" per line.
 *
 * GnuTLS never touches the socket: its pull and push functions are ours
 * and run on the coroutine that called into GnuTLS (the reader for the
 * handshake and gnutls_record_recv, the reply sender for
 * gnutls_record_send).  They queue a RECV or SENDMSG on the ring and yield,
 * so a TLS connection waits exactly as a plain one does, as the same
 * cancellable waits (sock.c): a stop can cancel an idle read, a kill every
 * wait.  The loop thread never blocks.
 *
 * One reader and one sender may be inside GnuTLS at once (as two threads
 * may be: GnuTLS keeps receive and send state apart).  Session tickets are
 * off, so the server sends nothing of its own after the handshake; what
 * GnuTLS may still send from the reader (an answer to an alert or a key
 * update) is serialised with the sender's pushes.
 *
 * Thread model: the server's thread (internal.h).
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"
#include "nbd/internal.h"

#define PRIO_X509 "NORMAL"
#define PRIO_PSK  "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"
#define PSK_KEY_MAX 512          /* bytes of one key */

struct psk_key {
	char *identity;
	uint8_t *key;
	size_t len;
};

struct nbd_tls {
	gnutls_certificate_credentials_t x509;
	gnutls_psk_server_credentials_t psk;
	gnutls_priority_t prio;
	bool verify_peer;
	struct psk_key *keys;
	size_t nkeys;
};

static int hexval(int ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/* Parse a psktool keys file into t->keys.  Returns -errno, logged with
 * the file and line. */
static int psk_load(struct nbd_tls *t, const char *path)
{
	FILE *f = fopen(path, "re");
	char line[2048];
	unsigned lineno = 0;
	int ret = 0;

	if (!f) {
		ret = -errno;
		log_error("%s: %s", path, strerror(-ret));
		return ret;
	}
	while (fgets(line, sizeof(line), f)) {
		size_t n = strlen(line);
		char *colon, *hex;
		struct psk_key *k;

		lineno++;
		if (n && line[n - 1] != '\n' && !feof(f)) {
			log_error("%s:%u: line too long", path, lineno);
			ret = -EINVAL;
			break;
		}
		while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
			line[--n] = 0;
		if (!n || line[0] == '#')
			continue;
		colon = strchr(line, ':');
		hex = colon ? colon + 1 : NULL;
		if (!colon || colon == line || !*hex || strlen(hex) % 2 ||
		    strlen(hex) / 2 > PSK_KEY_MAX) {
			log_error("%s:%u: not \"identity:hexkey\"", path, lineno);
			ret = -EINVAL;
			break;
		}
		*colon = 0;
		k = realloc(t->keys, (t->nkeys + 1) * sizeof(*k));
		if (!k) {
			ret = -ENOMEM;
			break;
		}
		t->keys = k;
		k = &t->keys[t->nkeys];
		k->len = strlen(hex) / 2;
		k->identity = strdup(line);
		k->key = malloc(k->len);
		if (!k->identity || !k->key) {
			free(k->identity);
			free(k->key);
			ret = -ENOMEM;
			break;
		}
		t->nkeys++;
		for (size_t i = 0; i < k->len; i++) {
			int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
			if (hi < 0 || lo < 0) {
				log_error("%s:%u: key is not hexadecimal", path, lineno);
				ret = -EINVAL;
				break;
			}
			k->key[i] = hi << 4 | lo;
		}
		if (ret < 0)
			break;
	}
	if (!ret && ferror(f))
		ret = -EIO;
	fclose(f);
	if (!ret && !t->nkeys) {
		log_error("%s: no key in the file", path);
		ret = -EINVAL;
	}
	return ret;
}

/* GnuTLS asks for the key of the identity the client offered. */
static int psk_lookup(gnutls_session_t s, const char *identity, gnutls_datum_t *key)
{
	struct nbd_conn *c = gnutls_session_get_ptr(s);
	struct nbd_tls *t = c->srv->tls;

	for (size_t i = 0; i < t->nkeys; i++) {
		if (strcmp(t->keys[i].identity, identity))
			continue;
		key->data = gnutls_malloc(t->keys[i].len);
		if (!key->data)
			return -1;
		memcpy(key->data, t->keys[i].key, t->keys[i].len);
		key->size = t->keys[i].len;
		return 0;
	}
	log_warn("connection %u: unknown PSK identity '%.64s'", c->id, identity);
	return -1;
}

static int x509_load(struct nbd_tls *t, const char *dir)
{
	char ca[PATH_MAX], crl[PATH_MAX], cert[PATH_MAX], key[PATH_MAX];
	int ret;

	if ((size_t)snprintf(ca, sizeof(ca), "%s/ca-cert.pem", dir) >= sizeof(ca) ||
	    (size_t)snprintf(crl, sizeof(crl), "%s/ca-crl.pem", dir) >= sizeof(crl) ||
	    (size_t)snprintf(cert, sizeof(cert), "%s/server-cert.pem", dir) >= sizeof(cert) ||
	    (size_t)snprintf(key, sizeof(key), "%s/server-key.pem", dir) >= sizeof(key)) {
		log_error("%s: path too long", dir);
		return -ENAMETOOLONG;
	}
	ret = gnutls_certificate_allocate_credentials(&t->x509);
	if (ret < 0)
		goto gnutls_fail;
	if (access(ca, R_OK) == 0) {
		ret = gnutls_certificate_set_x509_trust_file(t->x509, ca, GNUTLS_X509_FMT_PEM);
		if (ret < 0) {
			log_error("%s: %s", ca, gnutls_strerror(ret));
			return -EINVAL;
		}
	} else if (t->verify_peer) {
		log_error("%s: %s (needed to verify clients)", ca, strerror(errno));
		return -ENOENT;
	}
	if (access(crl, R_OK) == 0) {
		ret = gnutls_certificate_set_x509_crl_file(t->x509, crl, GNUTLS_X509_FMT_PEM);
		if (ret < 0) {
			log_error("%s: %s", crl, gnutls_strerror(ret));
			return -EINVAL;
		}
	}
	for (const char *f = cert; f; f = f == cert ? key : NULL) {
		if (access(f, R_OK) < 0) {
			ret = -errno;
			log_error("%s: %s", f, strerror(-ret));
			return ret;
		}
	}
	ret = gnutls_certificate_set_x509_key_file(t->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (ret < 0) {
		log_error("%s, %s: %s", cert, key, gnutls_strerror(ret));
		return -EINVAL;
	}
	return 0;
gnutls_fail:
	log_error("gnutls: %s", gnutls_strerror(ret));
	return -ENOMEM;
}

int nbd_tls_init(struct nbd_server *srv, const struct nbd_server_opts *opts)
{
	struct nbd_tls *t;
	const char *err_pos = NULL;
	int ret;

	if (opts->tls == NBD_TLS_OFF)
		return 0;
	if (!!opts->tls_creds_dir == !!opts->tls_psk_file) {
		log_error("TLS needs either x509 credentials or a PSK file");
		return -EINVAL;
	}
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	srv->tls = t;
	t->verify_peer = opts->tls_verify_peer;
	if (opts->tls_creds_dir) {
		ret = x509_load(t, opts->tls_creds_dir);
		if (ret < 0)
			return ret;
		ret = gnutls_priority_init(&t->prio, PRIO_X509, &err_pos);
	} else {
		ret = psk_load(t, opts->tls_psk_file);
		if (ret < 0)
			return ret;
		ret = gnutls_psk_allocate_server_credentials(&t->psk);
		if (ret < 0) {
			log_error("gnutls: %s", gnutls_strerror(ret));
			return -ENOMEM;
		}
		gnutls_psk_set_server_credentials_function(t->psk, psk_lookup);
		ret = gnutls_priority_init(&t->prio, PRIO_PSK, &err_pos);
	}
	if (ret < 0) {
		log_error("gnutls priority: %s", gnutls_strerror(ret));
		return -EINVAL;
	}
	srv->tls_mode = opts->tls;
	return 0;
}

void nbd_tls_deinit(struct nbd_server *srv)
{
	struct nbd_tls *t = srv->tls;

	if (!t)
		return;
	if (t->prio)
		gnutls_priority_deinit(t->prio);
	if (t->x509)
		gnutls_certificate_free_credentials(t->x509);
	if (t->psk)
		gnutls_psk_free_server_credentials(t->psk);
	for (size_t i = 0; i < t->nkeys; i++) {
		free(t->keys[i].identity);
		explicit_bzero(t->keys[i].key, t->keys[i].len);
		free(t->keys[i].key);
	}
	free(t->keys);
	free(t);
	srv->tls = NULL;
}

/* GnuTLS pull: one RECV, waited as c->tls_rop (the idle or the data wait
 * of sock.c).  A cancelled idle wait reports EAGAIN to GnuTLS, which then
 * returns GNUTLS_E_AGAIN with no byte consumed; c->tls_cancelled tells
 * nbd_tls_recv it was a stop. */
static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
	struct nbd_conn *c = p;
	struct aio_ctx *ctx = c->srv->ctx;

	for (;;) {
		struct io_uring_sqe *sqe;
		int res;

		if (c->dead) {
			gnutls_transport_set_errno(c->tls, ECONNRESET);
			return -1;
		}
		sqe = aio_get_sqe(ctx, NULL);
		io_uring_prep_recv(sqe, c->fd, buf, len, 0);
		res = aio_co_wait_sqe_as(ctx, c->tls_rop, sqe);
		if (res == -EINTR || (res == -EAGAIN && !c->dead))
			continue;
		if (res == -ECANCELED && !c->dead) {
			c->tls_cancelled = true;
			gnutls_transport_set_errno(c->tls, EAGAIN);
			return -1;
		}
		if (c->dead)
			res = -ECONNRESET;
		if (res < 0) {
			gnutls_transport_set_errno(c->tls, -res);
			return -1;
		}
		return res;
	}
}

/* GnuTLS push, gathered: every byte goes out (sock.c's plain send, as
 * c->send_op) before it returns.  Pushes are serialised: normally only
 * the sender pushes, but GnuTLS may answer a peer's message (an alert, a
 * key update) from inside the reader's gnutls_record_recv, and
 * c->send_op has room for one waiter. */
static ssize_t tls_vec_push(gnutls_transport_ptr_t p, const giovec_t *giov, int cnt)
{
	struct nbd_conn *c = p;
	struct iovec iov[NBD_SEND_IOV];
	ssize_t total = 0;
	int done = 0;

	while (c->tls_pushing && !c->dead)
		co_queue_wait(&c->tls_pushq);
	c->tls_pushing = true;
	while (done < cnt) {
		int n = MIN(cnt - done, NBD_SEND_IOV);
		size_t bytes = 0;
		int ret;

		for (int i = 0; i < n; i++) {
			iov[i].iov_base = giov[done + i].iov_base;
			iov[i].iov_len = giov[done + i].iov_len;
			bytes += iov[i].iov_len;
		}
		ret = nbd_sock_send(c, iov, n);
		if (ret < 0) {
			gnutls_transport_set_errno(c->tls, ret == -EAGAIN ? EPIPE : -ret);
			total = -1;
			break;
		}
		total += bytes;
		done += n;
	}
	c->tls_pushing = false;
	co_queue_wake_one(&c->tls_pushq);
	return total;
}

/* Without a handshake timeout GnuTLS does not call this; if it does, say
 * data is there: tls_pull waits for it. */
static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
	(void)p;
	(void)ms;
	return 1;
}

int nbd_tls_handshake(struct nbd_conn *c)
{
	struct nbd_tls *t = c->srv->tls;
	unsigned status;
	int ret;

	ret = gnutls_init(&c->tls, GNUTLS_SERVER | GNUTLS_NO_TICKETS);
	if (ret < 0) {
		c->tls = NULL;
		log_warn("connection %u: gnutls_init: %s", c->id, gnutls_strerror(ret));
		return -ENOMEM;
	}
	gnutls_session_set_ptr(c->tls, c);
	ret = gnutls_priority_set(c->tls, t->prio);
	if (!ret)
		ret = t->x509 ? gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, t->x509)
			      : gnutls_credentials_set(c->tls, GNUTLS_CRD_PSK, t->psk);
	if (ret < 0) {
		log_warn("connection %u: TLS setup: %s", c->id, gnutls_strerror(ret));
		return -EINVAL;
	}
	if (t->x509 && t->verify_peer)
		gnutls_certificate_server_set_request(c->tls, GNUTLS_CERT_REQUIRE);
	gnutls_transport_set_ptr(c->tls, c);
	gnutls_transport_set_pull_function(c->tls, tls_pull);
	gnutls_transport_set_vec_push_function(c->tls, tls_vec_push);
	gnutls_transport_set_pull_timeout_function(c->tls, tls_pull_timeout);
	gnutls_handshake_set_timeout(c->tls, 0);

	/* The handshake is inside a message: only a kill cancels it. */
	c->tls_rop = &c->data_op;
	do {
		ret = gnutls_handshake(c->tls);
	} while (ret < 0 && !gnutls_error_is_fatal(ret) && !c->dead);
	if (ret < 0) {
		log_warn("connection %u: TLS handshake failed: %s", c->id,
			 c->dead ? "connection dropped" : gnutls_strerror(ret));
		return -EPROTO;
	}
	if (t->x509 && t->verify_peer) {
		ret = gnutls_certificate_verify_peers2(c->tls, &status);
		if (ret < 0 || status) {
			gnutls_datum_t msg = { NULL, 0 };
			if (ret >= 0)
				gnutls_certificate_verification_status_print(
					status, GNUTLS_CRT_X509, &msg, 0);
			log_warn("connection %u: client certificate rejected: %s", c->id,
				 ret < 0 ? gnutls_strerror(ret) :
				 msg.data ? (char *)msg.data : "invalid");
			gnutls_free(msg.data);
			return -EACCES;
		}
	}
	log_debug("connection %u: TLS %s", c->id,
		  gnutls_protocol_get_name(gnutls_protocol_get_version(c->tls)));
	return 0;
}

void nbd_tls_conn_free(struct nbd_conn *c)
{
	if (c->tls)
		gnutls_deinit(c->tls);
	c->tls = NULL;
}

ssize_t nbd_tls_recv(struct nbd_conn *c, void *buf, size_t len, struct aio_wait *op)
{
	for (;;) {
		ssize_t r;

		c->tls_rop = op;
		c->tls_cancelled = false;
		r = gnutls_record_recv(c->tls, buf, len);
		if (r >= 0)
			return r;
		if (c->tls_cancelled || c->dead)
			return -ESHUTDOWN;
		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
			continue;
		if (r == GNUTLS_E_PREMATURE_TERMINATION)
			return 0;
		log_debug("connection %u: TLS receive: %s", c->id, gnutls_strerror((int)r));
		return -EPROTO;
	}
}

int nbd_tls_send(struct nbd_conn *c, const struct iovec *iov, int cnt)
{
	/* Small pieces (reply headers) are corked into shared records; a
	 * large one (read data) goes straight through GnuTLS, without a copy
	 * of it in the cork buffer. */
	gnutls_record_cork(c->tls);
	for (int i = 0; i < cnt; i++) {
		const uint8_t *p = iov[i].iov_base;
		size_t left = iov[i].iov_len;

		if (left > 16384 && gnutls_record_uncork(c->tls, GNUTLS_RECORD_WAIT) < 0)
			goto fail;
		while (left) {
			ssize_t r = gnutls_record_send(c->tls, p, left);
			if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
				continue;
			if (r < 0)
				goto fail;
			p += r;
			left -= r;
		}
		if (iov[i].iov_len > 16384)
			gnutls_record_cork(c->tls);
	}
	if (gnutls_record_uncork(c->tls, GNUTLS_RECORD_WAIT) < 0)
		goto fail;
	return 0;
fail:
	if (!c->dead)
		log_debug("connection %u: TLS send failed", c->id);
	return -EPIPE;
}
