/* SPDX-License-Identifier: MIT */
/*
 * Telling the system that a device is live (src/ublk/notify.c): the
 * service manager through the sd_notify datagram protocol, and udev
 * through a "change" uevent once the state file the rules read is there.
 * No libsystemd.  Main thread of the daemon only.
 */
#ifndef QUBLK_UBLK_NOTIFY_H
#define QUBLK_UBLK_NOTIFY_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

/* Device @dev_id is live and its state file written: send the service
 * manager "READY=1" (and a STATUS line naming the device) if
 * $NOTIFY_SOCKET is set, and ask udev to look at /dev/ublkbN again.
 * Failures are logged (warnings: the device serves regardless). */
void ublk_notify_live(int dev_id);

/* The address of the notification socket named @name, as systemd writes
 * it into $NOTIFY_SOCKET: "/absolute/path" or "@abstract" (the '@'
 * becomes a NUL byte).  Returns 0 and fills @sa/@len, or -EAFNOSUPPORT
 * (another scheme, e.g. "vsock:"), -EINVAL (empty, relative) or
 * -ENAMETOOLONG. */
int notify_socket_addr(const char *name, struct sockaddr_un *sa, socklen_t *len);

/* Send @msg ("READY=1\nSTATUS=...") in one datagram to $NOTIFY_SOCKET.
 * Returns 1 if sent, 0 if $NOTIFY_SOCKET is not set, -errno. */
int notify_send(const char *msg);

#endif
