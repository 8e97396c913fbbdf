/* SPDX-License-Identifier: MIT */
/*
 * NBD server lifecycle: open (listen), run (serve until stopped, then
 * drain every connection and flush the image), stop, close; and the
 * signal reader that turns SIGINT/SIGTERM into a stop.  The other
 * concerns live in the files listed in internal.h.
 *
 * Stopping: stop accepting (cancel the accept), cancel reads that wait for
 * a new request or option, drop connections in the middle of a message
 * (an option, a request header, a write payload: the rest may never
 * come), let in-flight requests reply, close each connection, flush the
 * image.  A connection still busy NBD_STOP_GRACE_MS after the stop (its
 * client does not read its replies, or negotiates no further) is
 * dropped, so a stop always ends.  A second signal drops every
 * connection at once.
 *
 * Thread model: one thread, one aio_ctx (internal.h).
 */
#include "nbd/server.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "block/bdrv.h"
#include "common/util.h"
#include "nbd/internal.h"

static void kick_complete(struct aio_req *req, int res) { (void)req; (void)res; }
static struct aio_req kick_req = { .complete = kick_complete };

/* The coroutine may be running from aio_run_once()'s ready list, after
 * which that call blocks for a completion: post a NOP so it returns. */
void nbd_loop_kick(struct nbd_server *srv)
{
	aio_post_nop(srv->ctx, &kick_req);
}

static void signal_main(void *opaque)
{
	struct nbd_server *srv = opaque;
	struct signalfd_siginfo si;

	while (!srv->sig_exit) {
		struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
		int res;

		io_uring_prep_read(sqe, srv->sig_fd, &si, sizeof(si), 0);
		res = aio_co_wait_sqe_as(srv->ctx, &srv->sig_op, sqe);
		if (srv->sig_exit || res == -ECANCELED)
			break;
		if (res != (int)sizeof(si))
			continue;
		if (!srv->stopping) {
			log_info("%s: finishing in-flight requests, then exiting",
				 strsignal(si.ssi_signo));
			nbd_server_stop(srv);
		} else if (!srv->forced) {
			log_warn("%s again: dropping every connection", strsignal(si.ssi_signo));
			srv->forced = true;
			for (struct nbd_conn *c = srv->conns; c; c = c->next)
				nbd_conn_kill(c);
		}
	}
}

/* After a stop: connections still busy when the grace period ends (a
 * client that does not read its replies, or that stalled in the middle
 * of negotiation) are dropped, so that nothing a client does can hold
 * the exit up.  Cancelled once every connection is gone. */
static void grace_main(void *opaque)
{
	struct nbd_server *srv = opaque;
	struct __kernel_timespec ts = {
		.tv_sec = NBD_STOP_GRACE_MS / 1000,
		.tv_nsec = (NBD_STOP_GRACE_MS % 1000) * 1000000L,
	};
	struct io_uring_sqe *sqe = aio_get_sqe(srv->ctx, NULL);
	unsigned n = 0;

	io_uring_prep_timeout(sqe, &ts, 0, 0);
	if (aio_co_wait_sqe_as(srv->ctx, &srv->grace_op, sqe) != -ECANCELED) {
		for (struct nbd_conn *c = srv->conns; c; c = c->next, n++)
			nbd_conn_kill(c);
		if (n)
			log_warn("%u connection(s) still busy %u ms after the stop: dropped",
				 n, NBD_STOP_GRACE_MS);
	}
	nbd_loop_kick(srv);
}

void nbd_server_stop(struct nbd_server *srv)
{
	if (srv->stopping)
		return;
	srv->stopping = true;
	aio_cancel(srv->ctx, &srv->accept_op);
	co_queue_wake_all(&srv->accept_wait);
	co_queue_wake_all(&srv->mem_wait);
	for (struct nbd_conn *c = srv->conns; c; c = c->next) {
		nbd_conn_unpark(c, false);
		if (c->idle)
			aio_cancel(srv->ctx, &c->idle_op);
		else if (aio_wait_pending(&c->data_op))
			nbd_conn_kill(c);   /* mid-message: the rest may never come */
		/* A reader waiting for a free slot or a buffer re-checks. */
		co_queue_wake_all(&c->waitq);
	}
	if (srv->grace_co)
		aio_schedule(srv->grace_co);
}

static void reap_dead(struct nbd_server *srv)
{
	struct nbd_conn **pp = &srv->dead;

	while (*pp) {
		struct nbd_conn *c = *pp;
		if (coro_finished(c->co)) {
			*pp = c->next;
			nbd_conn_free(c);
		} else {
			pp = &c->next;
		}
	}
}

struct flush_job {
	struct nbd_server *srv;
	struct bdrv *bs;
	int ret;
};

static void flush_main(void *opaque)
{
	struct flush_job *j = opaque;
	j->ret = bdrv_co_flush(j->bs);
	nbd_loop_kick(j->srv);
}

int nbd_server_run(struct nbd_server *srv)
{
	struct aio_ctx *ctx = srv->ctx;
	struct flush_job job = { .srv = srv, .bs = srv->bs, .ret = 0 };
	struct coro *flush_co = NULL;
	int ret = 0;

	srv->accept_co = coro_new(nbd_accept_main, srv, 0);
	srv->grace_co = coro_new(grace_main, srv, 0);
	if (srv->sig_fd >= 0)
		srv->sig_co = coro_new(signal_main, srv, 0);
	if (!srv->accept_co || !srv->grace_co || (srv->sig_fd >= 0 && !srv->sig_co)) {
		log_error("nbd server: cannot create coroutines: %s", strerror(errno));
		return -ENOMEM;
	}
	if (srv->sig_co)
		aio_schedule(srv->sig_co);
	aio_schedule(srv->accept_co);

	/* Serve, then drain: the acceptor and every connection finish. */
	while (!srv->stopping || !coro_finished(srv->accept_co) || srv->conns || srv->dead) {
		ret = aio_run_once(ctx, true);
		if (ret < 0) {
			log_error("nbd server: io_uring: %s", strerror(-ret));
			return ret;
		}
		reap_dead(srv);
	}
	aio_cancel(ctx, &srv->grace_op);
	while (!coro_finished(srv->grace_co)) {
		ret = aio_run_once(ctx, true);
		if (ret < 0)
			return ret;
	}

	/* Everything acknowledged so far reaches the disk. */
	flush_co = coro_new(flush_main, &job, 0);
	if (!flush_co) {
		job.ret = -ENOMEM;
	} else {
		aio_schedule(flush_co);
		while (!coro_finished(flush_co)) {
			ret = aio_run_once(ctx, true);
			if (ret < 0)
				break;
		}
		coro_free(flush_co);
	}
	if (job.ret < 0)
		log_error("%s: flush: %s", srv->bs->filename, strerror(-job.ret));
	else
		log_debug("every connection closed, image flushed");

	/* Retire the signal reader so no SQE of ours is left in the ring. */
	srv->sig_exit = true;
	if (srv->sig_co) {
		aio_cancel(srv->ctx, &srv->sig_op);
		while (!coro_finished(srv->sig_co) && ret >= 0)
			ret = aio_run_once(ctx, true);
	}
	while (ctx->inflight && ret >= 0)
		ret = aio_run_once(ctx, true);
	if (ret < 0)
		return ret;
	if (srv->error)
		return srv->error;
	return job.ret;
}

static int setup_signals(struct nbd_server *srv)
{
	sigset_t set;

	/* A client that disconnects mid-reply must not kill us; sends also
	 * pass MSG_NOSIGNAL. */
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	if (sigprocmask(SIG_BLOCK, &set, &srv->old_mask) < 0)
		return -errno;
	srv->mask_saved = true;
	srv->sig_fd = signalfd(-1, &set, SFD_CLOEXEC);
	if (srv->sig_fd < 0) {
		int err = -errno;
		log_error("signalfd: %s", strerror(-err));
		return err;
	}
	return 0;
}

int nbd_server_open(struct bdrv *bs, const struct nbd_server_opts *opts,
		    struct nbd_server **out)
{
	struct nbd_server *srv;
	char desc[600];
	int ret;

	if (!aio_ctx_current()) {
		log_error("nbd server: no current aio context");
		return -EINVAL;
	}
	srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	srv->ctx = aio_ctx_current();
	if (srv->ctx->spin_ns) {
		srv->ctx->idle_hook = nbd_sock_idle_hook;
		srv->ctx->idle_opaque = srv;
	}
	srv->bs = bs;
	srv->listen_fd = -1;
	srv->sig_fd = -1;
	srv->export_name = strdup(opts->export_name ? opts->export_name : "");
	if (!srv->export_name) {
		ret = -ENOMEM;
		goto fail;
	}
	if (strlen(srv->export_name) > NBD_MAX_STRING) {
		log_error("export name longer than %d bytes", NBD_MAX_STRING);
		ret = -EINVAL;
		goto fail;
	}
	srv->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
		      NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
	/* One image behind every connection on one thread, no cache of our
	 * own: a flush on any connection covers writes acknowledged on all
	 * of them, which is what multi-conn promises.  Advertised only when
	 * several connections may be open at once, or a multi-conn client
	 * would wait forever for its second connection. */
	srv->max_conns = opts->max_conns;
	if (srv->max_conns != 1)
		srv->tflags |= NBD_FLAG_CAN_MULTI_CONN;
	if (opts->read_only || bs->read_only)
		srv->tflags |= NBD_FLAG_READ_ONLY;
	srv->pref_block = 4096;
	if (bs->cluster_size > 4096 && bs->cluster_size <= NBD_MAX_PAYLOAD &&
	    !(bs->cluster_size & (bs->cluster_size - 1)))
		srv->pref_block = bs->cluster_size;

	ret = nbd_tls_init(srv, opts);
	if (ret < 0)
		goto fail;
	if (opts->handle_signals) {
		ret = setup_signals(srv);
		if (ret < 0)
			goto fail;
	}
	if (opts->socket_path)
		ret = nbd_listen_unix(srv, opts->socket_path, desc, sizeof(desc));
	else
		ret = nbd_listen_tcp(srv, opts->bind_addr ? opts->bind_addr : "127.0.0.1",
				 opts->port ? opts->port : "10809", desc, sizeof(desc));
	if (ret < 0)
		goto fail;
	fprintf(stderr, "serving %s on %s%s%s\n", bs->filename, desc,
		(srv->tflags & NBD_FLAG_READ_ONLY) ? " (read-only)" : "",
		srv->tls_mode == NBD_TLS_REQUIRE ? " (TLS required)" :
		srv->tls_mode == NBD_TLS_ON ? " (TLS offered)" : "");
	*out = srv;
	return 0;
fail:
	nbd_server_close(srv);
	return ret;
}

void nbd_server_close(struct nbd_server *srv)
{
	if (!srv)
		return;
	if (srv->ctx->idle_opaque == srv) {
		srv->ctx->idle_hook = NULL;
		srv->ctx->idle_opaque = NULL;
	}
	/* Normally empty after nbd_server_run; after a loop failure the
	 * coroutines may still be parked mid-I/O, so only free what ended. */
	reap_dead(srv);
	if (srv->accept_co && coro_finished(srv->accept_co))
		coro_free(srv->accept_co);
	if (srv->sig_co && coro_finished(srv->sig_co))
		coro_free(srv->sig_co);
	if (srv->grace_co && coro_finished(srv->grace_co))
		coro_free(srv->grace_co);
	if (srv->listen_fd >= 0)
		close(srv->listen_fd);
	if (srv->unlink_path) {
		unlink(srv->unlink_path);
		free(srv->unlink_path);
	}
	if (srv->sig_fd >= 0)
		close(srv->sig_fd);
	if (srv->mask_saved)
		sigprocmask(SIG_SETMASK, &srv->old_mask, NULL);
	nbd_pool_deinit(&srv->pool);
	nbd_tls_deinit(srv);
	free(srv->export_name);
	free(srv);
}
