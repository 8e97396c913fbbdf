/* SPDX-License-Identifier: MIT */
/*
 * QEMU-compatible image locks (the protocol is described in lock.h).
 *
 * Every lock is a one-byte OFD lock, set and tested through ofd_fcntl(),
 * the one place fcntl is called.  Finding who holds a conflicting lock
 * costs a walk over /proc, so it is done only to word a refusal.
 */
#include "block/lock.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "common/util.h"

#define LOCK_NR_PERMS 4

/* QEMU's names for the permissions, as its messages print them. */
static const char *const perm_names[LOCK_NR_PERMS] = {
	"consistent read", "write", "write unchanged", "resize",
};

static bool warned_unsupported;

/* Set (F_OFD_SETLK) or test (F_OFD_GETLK) a lock of @type on byte @byte.
 * For a test, *@type receives F_UNLCK or the type of a conflicting lock.
 * Returns 0 or -errno. */
static int ofd_fcntl(int fd, int cmd, short *type, unsigned byte)
{
	/* l_pid must be 0 for OFD commands. */
	struct flock fl = {
		.l_type = *type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
	};

	if (fcntl(fd, cmd, &fl) < 0)
		return -errno;
	*type = fl.l_type;
	return 0;
}

/* Errors that mean "this kernel or file system has no OFD locks". */
static bool unsupported(int err)
{
	return err == -EINVAL || err == -ENOTSUP || err == -ENOLCK || err == -ENOSYS;
}

void lock_perms(bool read_only, bool force_share, unsigned *perm, unsigned *shared)
{
	*perm = LOCK_PERM_CONSISTENT_READ;
	if (!read_only)
		*perm |= LOCK_PERM_WRITE | LOCK_PERM_RESIZE;
	*shared = force_share ? LOCK_PERM_ALL
			      : LOCK_PERM_CONSISTENT_READ | LOCK_PERM_WRITE_UNCHANGED;
}

/* ------------------------------------------------------------ holders */

/* Does the lock line of an fdinfo file ("lock:\t1: OFDLCK ADVISORY  READ
 * -1 00:1a:866 100 101") describe a held POSIX or OFD lock covering @byte
 * of inode @ino?  Sets *@dev to the device it names. */
static bool line_covers(const char *line, unsigned long ino, unsigned byte, dev_t *dev)
{
	char kind[16], end[24];
	unsigned maj, min;
	unsigned long lino;
	unsigned long long start;

	if (strncmp(line, "lock:", 5) || strstr(line, "->"))
		return false;   /* not a lock, or a waiter blocked on one */
	if (sscanf(line, "lock: %*d: %15s %*s %*s %*d %x:%x:%lu %llu %23s", kind, &maj, &min,
		   &lino, &start, end) != 6)
		return false;
	if (strcmp(kind, "OFDLCK") && strcmp(kind, "POSIX"))
		return false;   /* flock, leases: fcntl locks do not see them */
	if (lino != ino || start > byte)
		return false;
	if (strcmp(end, "EOF") && strtoull(end, NULL, 10) < byte)
		return false;
	*dev = makedev(maj, min);
	return true;
}

/* Does descriptor @fdn of @pid hold a lock on @byte of the file @st? */
static bool fd_holds(int pid, int fdn, const struct stat *st, unsigned byte)
{
	char path[64], line[256];
	struct stat fst;
	bool covers = false;
	dev_t dev = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/fdinfo/%d", pid, fdn);
	f = fopen(path, "re");
	if (!f)
		return false;
	while (!covers && fgets(line, sizeof(line), f))
		covers = line_covers(line, (unsigned long)st->st_ino, byte, &dev);
	fclose(f);
	if (!covers)
		return false;
	/* fdinfo names the superblock's device, which is not always st_dev
	 * (btrfs subvolumes): if it differs, ask the descriptor itself. */
	if (dev == st->st_dev)
		return true;
	snprintf(path, sizeof(path), "/proc/%d/fd/%d", pid, fdn);
	return stat(path, &fst) == 0 && fst.st_dev == st->st_dev && fst.st_ino == st->st_ino;
}

/* A non-negative decimal directory name, or -1. */
static int dec_name(const char *s)
{
	char *end;
	long v;

	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	return errno || *end || v > INT32_MAX ? -1 : (int)v;
}

static bool pid_holds(int pid, int skip_fd, const struct stat *st, unsigned byte)
{
	char path[48];
	struct dirent *de;
	bool held = false;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/fdinfo", pid);
	d = opendir(path);
	if (!d)
		return false;   /* gone, or another user's */
	while (!held && (de = readdir(d))) {
		int fdn = dec_name(de->d_name);
		if (fdn >= 0 && fdn != skip_fd)
			held = fd_holds(pid, fdn, st, byte);
	}
	closedir(d);
	return held;
}

static void comm_of(int pid, char *comm, size_t len)
{
	char path[48];
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/comm", pid);
	f = fopen(path, "re");
	if (!f || !fgets(comm, (int)len, f))
		snprintf(comm, len, "?");
	if (f)
		fclose(f);
	comm[strcspn(comm, "\n")] = 0;
}

int lock_holders(int fd, unsigned byte, char *buf, size_t len)
{
	int self = (int)getpid(), found = 0;
	size_t used = 0;
	struct dirent *de;
	struct stat st;
	DIR *proc;

	if (len)
		buf[0] = 0;
	if (fstat(fd, &st) < 0)
		return -errno;
	proc = opendir("/proc");
	if (!proc)
		return -errno;
	while ((de = readdir(proc))) {
		int pid = dec_name(de->d_name);
		char comm[32];
		int n;

		if (pid <= 0 || !pid_holds(pid, pid == self ? fd : -1, &st, byte))
			continue;
		comm_of(pid, comm, sizeof(comm));
		n = snprintf(buf + used, len - used, "%spid %d (%s)", found ? ", " : "", pid, comm);
		found++;
		if (n < 0 || (size_t)n >= len - used)
			break;      /* buf is full: enough names */
		used += (size_t)n;
	}
	closedir(proc);
	return found;
}

/* ---------------------------------------------------------------- take */

static int refuse(int fd, const char *name, unsigned byte, const char *what)
{
	char holders[256];

	log_error("%s: Failed to get %s", name, what);
	if (lock_holders(fd, byte, holders, sizeof(holders)) > 0)
		log_error("Is another process using the image [%s]? Lock byte %u is held by %s",
			  name, byte, holders);
	else
		log_error("Is another process using the image [%s]? (lock byte %u; /proc does not "
			  "show the holder)", name, byte);
	return -EAGAIN;
}

/* Returns 0 to go on without locks, or the error for the caller. */
static int lock_error(const char *name, const char *call, unsigned byte, int err)
{
	if (unsupported(err)) {
		if (!__atomic_exchange_n(&warned_unsupported, true, __ATOMIC_RELAXED))
			log_warn("%s: no OFD file locks here (%s: %s): opened without locks, so "
				 "nothing keeps another process from writing it", name, call,
				 strerror(-err));
		return 0;
	}
	log_error("%s: %s on lock byte %u: %s", name, call, byte, strerror(-err));
	return err;
}

int lock_take(int fd, const char *name, unsigned perm, unsigned shared)
{
	char what[40];
	int ret;

	/* Take ours, releasing bytes a previous call may have taken. */
	for (unsigned bit = 0; bit < LOCK_NR_PERMS; bit++) {
		unsigned m = 1u << bit;
		short type = perm & m ? F_RDLCK : F_UNLCK;
		unsigned byte = LOCK_PERM_BASE + bit;

		ret = ofd_fcntl(fd, F_OFD_SETLK, &type, byte);
		if (!ret) {
			type = shared & m ? F_UNLCK : F_RDLCK;
			byte = LOCK_SHARED_BASE + bit;
			ret = ofd_fcntl(fd, F_OFD_SETLK, &type, byte);
		}
		if (ret == -EAGAIN || ret == -EACCES) {
			/* Someone holds an exclusive lock there (not QEMU,
			 * which only takes shared ones). */
			snprintf(what, sizeof(what), "lock byte %u", byte);
			return refuse(fd, name, byte, what);
		}
		if (ret < 0)
			return lock_error(name, "F_OFD_SETLK", byte, ret);
	}
	/* Then look for users that conflict: first those that do not share
	 * what we hold, then those that hold what we do not share. */
	for (int pass = 0; pass < 2; pass++) {
		for (unsigned bit = 0; bit < LOCK_NR_PERMS; bit++) {
			unsigned m = 1u << bit;
			unsigned byte = (pass ? LOCK_PERM_BASE : LOCK_SHARED_BASE) + bit;
			short type = F_WRLCK;

			if (pass ? shared & m : !(perm & m))
				continue;
			ret = ofd_fcntl(fd, F_OFD_GETLK, &type, byte);
			if (ret < 0)
				return lock_error(name, "F_OFD_GETLK", byte, ret);
			if (type != F_UNLCK) {
				snprintf(what, sizeof(what), "%s\"%s\" lock", pass ? "shared " : "",
					 perm_names[bit]);
				return refuse(fd, name, byte, what);
			}
		}
	}
	return 0;
}
