/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the readiness notification (src/ublk/notify.c), the
 * sd_notify datagram protocol as systemd receives it: a SOCK_DGRAM unix
 * socket with SO_PASSCRED bound at the address $NOTIFY_SOCKET names,
 * abstract ("@name") and file system ("/path"); the datagram's bytes and
 * the sender's pid (what NotifyAccess=main checks) are read back.  Also
 * the address parsing (lengths, the NUL of abstract names, refusals), an
 * unset variable (nothing sent) and a socket nobody listens on (-errno).
 * The daemon's call at the point the device is live is exercised in the
 * VM (tests/test-install-vm.sh), with this program as the receiver:
 *   test_notify --recv NAME BOUNDFILE   bind NAME as above, create
 *   BOUNDFILE, wait up to 300 s for one datagram, print "pid=PID" and
 *   the datagram on stdout; exit 0, or 1 if none came.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/util.h"
#include "ublk/notify.h"

#include "check.h"

static void test_addr(void)
{
	struct sockaddr_un sa;
	socklen_t len = 0;
	char longname[200];
	size_t base = offsetof(struct sockaddr_un, sun_path);

	CHECK(notify_socket_addr("/run/systemd/notify", &sa, &len) == 0);
	CHECK(len == base + strlen("/run/systemd/notify") + 1);
	CHECK(!strcmp(sa.sun_path, "/run/systemd/notify") && sa.sun_family == AF_UNIX);

	CHECK(notify_socket_addr("@/org/freedesktop/systemd1/notify/1", &sa, &len) == 0);
	CHECK(len == base + strlen("@/org/freedesktop/systemd1/notify/1"), " len %u", len);
	CHECK(sa.sun_path[0] == 0 && !memcmp(sa.sun_path + 1, "/org/freedesktop", 16));

	CHECK(notify_socket_addr("vsock:2:1234", &sa, &len) == -EAFNOSUPPORT);
	CHECK(notify_socket_addr("", &sa, &len) == -EINVAL);
	CHECK(notify_socket_addr("@", &sa, &len) == -EINVAL);
	CHECK(notify_socket_addr("relative/sock", &sa, &len) == -EINVAL);

	/* sun_path is 108 bytes: a path needs its NUL inside, an abstract
	 * name does not. */
	memset(longname, 'x', sizeof(longname));
	longname[0] = '/';
	longname[107] = 0;
	CHECK(notify_socket_addr(longname, &sa, &len) == 0);
	longname[107] = 'x';
	longname[108] = 0;
	CHECK(notify_socket_addr(longname, &sa, &len) == -ENAMETOOLONG);
	longname[0] = '@';
	CHECK(notify_socket_addr(longname, &sa, &len) == 0 && len == base + 108);
	longname[108] = 'x';
	longname[109] = 0;
	CHECK(notify_socket_addr(longname, &sa, &len) == -ENAMETOOLONG);
}

/* A receiver as systemd's: SOCK_DGRAM, SO_PASSCRED, bound at @name. */
static int receiver(const char *name)
{
	struct sockaddr_un sa;
	socklen_t len;
	int one = 1, fd;

	if (notify_socket_addr(name, &sa, &len) < 0)
		return -1;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0 ||
	    bind(fd, (struct sockaddr *)&sa, len) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* One datagram from @fd into @buf (NUL-terminated); its sender's pid in
 * *pid.  Returns the length or -1 (nothing within a second). */
static ssize_t receive(int fd, char *buf, size_t size, pid_t *pid, int timeout_ms)
{
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(sizeof(struct ucred))];
	} ctl;
	struct iovec iov = { buf, size - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = &ctl, .msg_controllen = sizeof(ctl) };
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	ssize_t n;

	*pid = 0;
	if (poll(&pfd, 1, timeout_ms) != 1)
		return -1;
	n = recvmsg(fd, &mh, MSG_DONTWAIT);
	if (n < 0)
		return -1;
	buf[n] = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		struct ucred cr;
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
			memcpy(&cr, CMSG_DATA(c), sizeof(cr));
			*pid = cr.pid;
		}
	}
	return n;
}

static void test_send(const char *name)
{
	char buf[256];
	pid_t pid;
	int fd = receiver(name);

	CHECK(fd >= 0, " bind %s: %s", name, strerror(errno));
	if (fd < 0)
		return;
	setenv("NOTIFY_SOCKET", name, 1);
	CHECK(notify_send("READY=1\n") == 1);
	CHECK(receive(fd, buf, sizeof(buf), &pid, 1000) == 8 && !strcmp(buf, "READY=1\n"),
	      " %s: got '%s'", name, buf);
	CHECK(pid == getpid(), " sender pid %d, we are %d", (int)pid, (int)getpid());

	/* What the daemon sends once the device is live.  No such device:
	 * the uevent write fails quietly, the notification still goes. */
	ublk_notify_live(987654);
	CHECK(receive(fd, buf, sizeof(buf), &pid, 1000) > 0 &&
	      !strcmp(buf, "READY=1\nSTATUS=serving /dev/ublkb987654\n"), " got '%s'", buf);
	CHECK(pid == getpid());
	close(fd);

	/* Nobody listens any more. */
	CHECK(notify_send("READY=1\n") < 0);
	unsetenv("NOTIFY_SOCKET");
}

static int recv_one(const char *name, const char *boundfile)
{
	char buf[4096];
	pid_t pid;
	FILE *f;
	int fd = receiver(name);

	if (fd < 0) {
		fprintf(stderr, "bind %s: %s\n", name, strerror(errno));
		return 1;
	}
	f = fopen(boundfile, "w");
	if (!f || fclose(f) != 0) {
		fprintf(stderr, "%s: %s\n", boundfile, strerror(errno));
		return 1;
	}
	if (receive(fd, buf, sizeof(buf), &pid, 300000) < 0) {
		fprintf(stderr, "no notification on %s\n", name);
		return 1;
	}
	printf("pid=%d\n%s", (int)pid, buf);
	return fflush(stdout) ? 1 : 0;
}

int main(int argc, char **argv)
{
	char dir[] = "/dev/shm/qublk-test-notify-XXXXXX", name[128];

	if (argc == 4 && !strcmp(argv[1], "--recv"))
		return recv_one(argv[2], argv[3]);

	log_set_prog("test_notify");
	test_addr();

	unsetenv("NOTIFY_SOCKET");
	CHECK(notify_send("READY=1\n") == 0);
	setenv("NOTIFY_SOCKET", "vsock:2:1", 1);
	CHECK(notify_send("READY=1\n") == -EAFNOSUPPORT);

	snprintf(name, sizeof(name), "@qublk/test-notify/%d", (int)getpid());
	test_send(name);
	if (mkdtemp(dir)) {
		snprintf(name, sizeof(name), "%s/notify", dir);
		test_send(name);
		unlink(name);
		rmdir(dir);
	} else {
		CHECK(0, " mkdtemp: %s", strerror(errno));
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
