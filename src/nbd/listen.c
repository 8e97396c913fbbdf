/* SPDX-License-Identifier: MIT */
/*
 * Listening sockets (unix or TCP) and the acceptor coroutine, which loops
 * on IORING_OP_ACCEPT until the server stops (the stop cancels it).
 *
 * Thread model: the server's thread (internal.h).
 */
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/util.h"
#include "nbd/internal.h"

int nbd_listen_unix(struct nbd_server *srv, const char *path, char *desc, size_t desc_len)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, err;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		log_error("%s: socket path too long (max %zu bytes)", path, sizeof(sa.sun_path) - 1);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			log_error("%s: exists and is not a socket; refusing to replace it", path);
			return -EEXIST;
		}
		unlink(path);   /* stale socket from an earlier run */
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err = -errno;
		log_error("%s: socket: %s", path, strerror(-err));
		return err;
	}
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, NBD_LISTEN_BACKLOG) < 0) {
		err = -errno;
		log_error("%s: cannot listen: %s", path, strerror(-err));
		close(fd);
		return err;
	}
	srv->unlink_path = strdup(path);
	snprintf(desc, desc_len, "%s", path);
	srv->listen_fd = fd;
	return 0;
}

int nbd_listen_tcp(struct nbd_server *srv, const char *host, const char *port,
		   char *desc, size_t desc_len)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *res, *ai;
	int fd = -1, err = -EADDRNOTAVAIL, one = 1, gai;

	gai = getaddrinfo(host, port, &hints, &res);
	if (gai) {
		log_error("%s:%s: cannot resolve: %s", host, port, gai_strerror(gai));
		return -EINVAL;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0) {
			err = -errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
		    listen(fd, NBD_LISTEN_BACKLOG) == 0)
			break;
		err = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0) {
		log_error("%s:%s: cannot listen: %s", host, port, strerror(-err));
		return err;
	}

	/* Describe the bound address (the real port when "0" was asked). */
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char h[NI_MAXHOST], p[NI_MAXSERV];
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
	    getnameinfo((struct sockaddr *)&ss, sl, h, sizeof(h), p, sizeof(p),
			NI_NUMERICHOST | NI_NUMERICSERV) == 0)
		snprintf(desc, desc_len, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", h, p);
	else
		snprintf(desc, desc_len, "%s:%s", host, port);
	srv->listen_fd = fd;
	return 0;
}


void nbd_accept_main(void *opaque)
{
	struct nbd_server *srv = opaque;

	while (!srv->stopping) {
		struct io_uring_sqe *sqe;
		int fd;

		/* At the limit, leave new clients in the backlog. */
		if (srv->max_conns && srv->nconns >= srv->max_conns) {
			co_queue_wait(&srv->accept_wait);
			continue;
		}
		sqe = aio_get_sqe(srv->ctx, NULL);
		io_uring_prep_accept(sqe, srv->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		fd = aio_co_wait_sqe_as(srv->ctx, &srv->accept_op, sqe);
		if (fd >= 0) {
			if (srv->stopping || nbd_conn_new(srv, fd) < 0) {
				if (!srv->stopping)
					log_warn("out of memory for a new connection: refused");
				close(fd);
			}
			continue;
		}
		switch (fd) {
		case -ECANCELED:
		case -EINTR:
		case -EAGAIN:
		case -ECONNABORTED:
		case -EPROTO:
			break;
		case -EMFILE:
		case -ENFILE:
		case -ENOBUFS:
		case -ENOMEM:
			log_warn("accept: %s; retrying in 100 ms", strerror(-fd));
			aio_co_sleep_ms(srv->ctx, 100);
			break;
		default:
			log_error("accept: %s", strerror(-fd));
			srv->error = fd;
			nbd_server_stop(srv);
			break;
		}
	}
	nbd_loop_kick(srv);
}

