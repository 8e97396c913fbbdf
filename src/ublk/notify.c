/* SPDX-License-Identifier: MIT */
/*
 * Readiness notification (see notify.h).
 *
 * sd_notify protocol (systemd's sd_notify(3) and "Type=notify" in
 * systemd.service(5)): the service manager passes the name of a unix
 * datagram socket in $NOTIFY_SOCKET; a service sends newline-separated
 * "KEY=VALUE" assignments in one datagram to it.  A name starting with
 * '/' is a file system socket, one starting with '@' an abstract socket
 * (the '@' stands for the leading NUL byte; the address length then
 * counts exactly the name's bytes, no terminating NUL).  The manager
 * learns the sender's pid from the kernel (SCM_CREDENTIALS), so the
 * message must come from the service's main process: the foreground
 * daemon, which is where ublk_dev_run calls ublk_notify_live.
 *
 * udev: the device's uevent ("add") fires at START_DEV, before the
 * daemon writes its state file, so the rules (udev/60-qublk.rules, which
 * run `qublk udev-id`) cannot name the image yet.  Writing "change" to
 * /sys/block/ublkbN/uevent once the state file is there makes udev run
 * them again.
 */
#include "ublk/notify.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

int notify_socket_addr(const char *name, struct sockaddr_un *sa, socklen_t *len)
{
	size_t n = strlen(name);

	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (name[0] != '/' && name[0] != '@')
		return strchr(name, ':') ? -EAFNOSUPPORT : -EINVAL;
	if (n < 2)
		return -EINVAL;
	if (name[0] == '/') {
		/* A path needs its NUL inside sun_path. */
		if (n >= sizeof(sa->sun_path))
			return -ENAMETOOLONG;
		memcpy(sa->sun_path, name, n + 1);
		*len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
	} else {
		if (n > sizeof(sa->sun_path))
			return -ENAMETOOLONG;
		memcpy(sa->sun_path, name, n);
		sa->sun_path[0] = 0;
		*len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
	}
	return 0;
}

int notify_send(const char *msg)
{
	const char *name = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa;
	socklen_t salen;
	ssize_t n;
	int fd, ret;

	if (!name || !*name)
		return 0;
	ret = notify_socket_addr(name, &sa, &salen);
	if (ret < 0)
		return ret;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	do
		n = sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
	while (n < 0 && errno == EINTR);
	ret = n < 0 ? -errno : (size_t)n == strlen(msg) ? 1 : -EMSGSIZE;
	close(fd);
	return ret;
}

/* Ask udev to run the rules for /dev/ublkbN again. */
static int uevent_change(int dev_id)
{
	char path[64];
	ssize_t n;
	int fd, ret = 0;

	snprintf(path, sizeof(path), "/sys/block/ublkb%d/uevent", dev_id);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	do
		n = write(fd, "change", 6);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		ret = -errno;
	close(fd);
	return ret;
}

void ublk_notify_live(int dev_id)
{
	char msg[96];
	int ret;

	ret = uevent_change(dev_id);
	/* Unprivileged daemons may not write sysfs; udev then names the
	 * image only from the next event. */
	if (ret < 0)
		log_debug("ublkb%d: uevent change: %s", dev_id, strerror(-ret));
	snprintf(msg, sizeof(msg), "READY=1\nSTATUS=serving /dev/ublkb%d\n", dev_id);
	ret = notify_send(msg);
	if (ret < 0)
		log_warn("sd_notify to %s: %s", getenv("NOTIFY_SOCKET"), strerror(-ret));
	else if (ret > 0)
		log_debug("sd_notify: READY=1 sent to %s", getenv("NOTIFY_SOCKET"));
}
