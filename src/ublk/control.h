/* SPDX-License-Identifier: MIT */
/*
 * Inside the ublk daemon: its control socket (control.c), for dev.c.
 */
#ifndef QUBLK_UBLK_CONTROL_H
#define QUBLK_UBLK_CONTROL_H

#include "ublk/ublk.h"

/* Bind and listen on the device's socket (ublk_sock_path); sets
 * d->listen_fd.  Returns -errno. */
int ublk_control_listen(struct ublk_dev *d);
/* Close the socket and remove its path (no-op without one). */
void ublk_control_close(struct ublk_dev *d);
/* Answer one connection @cfd.  Returns 1 if the device was handed over
 * (the daemon exits without stopping it), 0 to go on serving, -errno if a
 * hand-over failed half-way (the device is left for 'qublk recover'). */
int ublk_control_serve(struct ublk_dev *d, int cfd);
/* The next daemon's side of a hand-over: ask the daemon of @dev_id for
 * the image; *@out_fd is its descriptor.  Returns -errno. */
int ublk_control_receive_handover(int dev_id, int *out_fd);

#endif
