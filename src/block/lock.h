/* SPDX-License-Identifier: MIT */
/*
 * Image locking, compatible with QEMU's (block/file-posix.c since 2.10), so
 * that qublk and qemu-nbd/qemu-io/qemu-img exclude each other in both
 * directions: two writers on one qcow2 image would allocate the same
 * clusters and lose data.
 *
 * The protocol is QEMU's, byte for byte: on each open file, a shared
 * (F_RDLCK) OFD lock on byte 100 + bit for every permission held and on
 * byte 200 + bit for every permission NOT shared with other users; then a
 * test (F_OFD_GETLK, F_WRLCK) of byte 200 + bit for every permission held
 * (does someone refuse to share it?) and 100 + bit for every permission
 * not shared (does someone hold it?).  OFD locks belong to the open file
 * description: two opens of one file conflict even inside one process,
 * and the locks go away when its last descriptor is closed (descriptors
 * inherited over fork keep them: every fd here is O_CLOEXEC, and `qublk
 * add` opens the image in its daemon, after the fork).  Taking, then
 * testing, means two openers racing may both be refused, never both
 * admitted.
 *
 * Stateless apart from the warn-once flag; call from any thread.
 */
#ifndef QUBLK_LOCK_H
#define QUBLK_LOCK_H

#include <stdbool.h>
#include <stddef.h>

/* QEMU's BLK_PERM_* bits, as its lock bytes number them. */
enum {
	LOCK_PERM_CONSISTENT_READ = 1 << 0,
	LOCK_PERM_WRITE           = 1 << 1,
	LOCK_PERM_WRITE_UNCHANGED = 1 << 2,
	LOCK_PERM_RESIZE          = 1 << 3,
	LOCK_PERM_ALL             = (1 << 4) - 1,
};

#define LOCK_PERM_BASE   100   /* byte 100 + bit: permission held */
#define LOCK_SHARED_BASE 200   /* byte 200 + bit: permission not shared */

/* What an image opened this way holds and shares, as QEMU 7.2 takes it
 * for a qcow2 image it serves (measured in /proc/locks):
 *   read-write               holds consistent-read, write, resize;
 *                            shares consistent-read, write-unchanged
 *   read-only (and backing)  holds consistent-read; shares the same
 *   read-only, force-share   holds consistent-read; shares everything */
void lock_perms(bool read_only, bool force_share, unsigned *perm, unsigned *shared);

/* Lock @fd for @perm held and @shared with others (other lock bytes are
 * released), then test for conflicts.  @name names the file in messages.
 * Returns 0; -EAGAIN if another open file of the same file holds a
 * conflicting lock (logged as QEMU words it: 'Failed to get "write"
 * lock', with the pid and command of the holder when /proc shows it);
 * or -errno from fcntl (logged).  On a file system without OFD locks
 * (EINVAL, ENOTSUP, ENOLCK, ENOSYS) warns once per process and returns
 * 0.  On failure the locks already taken stay on @fd until it is closed. */
int lock_take(int fd, const char *name, unsigned perm, unsigned shared);

/* Describe, in @buf, the processes other than this descriptor that hold
 * a lock covering byte @byte of the file open as @fd: "pid 123 (qemu-nbd)"
 * joined with ", ".  Found by scanning /proc/PID/fdinfo/FD for the same
 * file (F_OFD_GETLK reports pid -1 for OFD locks).  Returns how many were
 * found (0: none visible, e.g. owned by another user) or -errno. */
int lock_holders(int fd, unsigned byte, char *buf, size_t len);

#endif
