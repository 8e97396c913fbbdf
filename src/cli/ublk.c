/* SPDX-License-Identifier: MIT */
/*
 * qublk add / list / del / recover / upgrade: the ublk frontend's commands.
 *
 * add forks a daemon (unless --foreground) and waits on a pipe for its
 * report: the device path once the device is live, or EOF if it failed
 * (its errors went to our stderr).  The daemon itself runs
 * ublk_dev_run() (src/ublk/dev.c).  The image is opened, and so locked
 * (src/block/lock.h), in the daemon after the fork: the daemon holds the
 * locks for the life of the device, and a refusal ("Failed to get
 * "write" lock") reaches the user's stderr before add exits 1.
 *
 * recover and upgrade start a daemon the same way for an existing device,
 * from its state file (<run dir>/ublkN): recover after its daemon died,
 * upgrade to take it over from its live daemon (src/ublk/dev.c, hand-over).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/cli.h"
#include "common/util.h"
#include "ublk/ublk.h"

/* ---------------------------------------------------------------- add */

static bool pid_alive(int pid)
{
	return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

static void add_usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk add [-t qcow2|raw|null] [-q QUEUES] [-d DEPTH] [--read-only [-U]]\n"
		"                 [-n ID] [--size SIZE] [--cache none|writeback] [--no-recovery]\n"
		"                 [--discard unmap|ignore] [--unprivileged] [--recover-on-restart]\n"
		"                 [--no-zero-copy] [--no-batch]\n"
		"                 [--foreground] [FILE]\n\n"
		"Serve FILE (or, with -t null, nothing) as the block device /dev/ublkbN.\n"
		"Prints the device path once the device is live; the daemon runs until\n"
		"'qublk del -n N' or SIGTERM.\n\n"
		"The image and its backing files are locked as QEMU locks them, so qublk\n"
		"and QEMU (qemu-nbd, qemu-io, qemu-img, VMs) exclude each other: add fails\n"
		"if another process writes the image or, without --read-only, has it open\n"
		"at all (readers with force-share, -U, excepted); while the device lives,\n"
		"they are refused alike.\n\n"
		"  -t, --type TYPE      qcow2, raw or null (default: probed from FILE)\n"
		"  -q, --queues N       hardware queues, one thread each (default %u)\n"
		"  -d, --depth N        requests in flight per queue (default %u, max %u;\n"
		"                       at most 4: a queue serving several CPUs has its\n"
		"                       thread pinned to the first of them)\n"
		"  -r, --read-only      refuse writes\n"
		"  -U, --force-share    with --read-only: serve the image even if another\n"
		"                       process writes it (reads may then be inconsistent)\n"
		"  -n, --number ID      device number (default: first free)\n"
		"  -s, --size SIZE      null target: device size (K/M/G/T suffixes)\n"
		"      --cache MODE     none (O_DIRECT, default) or writeback\n"
		"      --discard MODE   unmap: the device takes discards (fstrim, blkdiscard)\n"
		"                       and the space goes back to the host file system\n"
		"                       (default for writable images); ignore: the device\n"
		"                       offers no discard and write-zeroes never deallocate\n"
		"                       (default for read-only devices and the null target),\n"
		"                       as qublk nbd's and qemu-nbd's --discard\n"
		"      --no-recovery    without user_recovery: if the daemon dies, the device\n"
		"                       fails its I/O instead of waiting for 'qublk recover'\n"
		"      --no-zero-copy   copy each request's data through the daemon's buffers\n"
		"                       even where the driver offers zero copy (auto_buf_reg\n"
		"                       and user_copy, kernel 6.16+: 'qublk features'), in\n"
		"                       which reads and writes of the image use the\n"
		"                       request's own pages\n"
		"      --no-batch       one command per request to fetch it and one to\n"
		"                       commit it, even where the driver takes them in\n"
		"                       batches per queue (batch_io: 7.3 has it; never\n"
		"                       at depth 1)\n"
		"      --unprivileged   an unprivileged device (UBLK_F_UNPRIVILEGED_DEV), which\n"
		"                       only its owner can use: the default when not root.\n"
		"                       Needs qublk's udev rules (60-qublk.rules: members of\n"
		"                       group disk may create them); such a device has no\n"
		"                       recovery (the kernel's rule)\n"
		"      --recover-on-restart  with -n ID: if device ID is there already and its\n"
		"                       daemon died, take it over (as 'qublk recover') instead\n"
		"                       of failing, provided it serves this FILE: a service\n"
		"                       manager that runs the same command again after a crash\n"
		"                       gets the device back, its I/O and mounts intact\n"
		"  -f, --foreground     do not daemonise; print the path, run until SIGTERM\n\n"
		"Exit codes: 0 device live, 1 failure, 2 usage error.\n",
		UBLK_DEF_QUEUES, UBLK_DEF_DEPTH, UBLK_MAX_QUEUE_DEPTH);
}

int cli_parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -EINVAL;
	*out = (unsigned)v;
	return 0;
}

static const char *probe_type(const char *file)
{
	unsigned char magic[4];
	int fd = open(file, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return "raw";   /* the open error is reported by the daemon */
	n = read(fd, magic, sizeof(magic));
	close(fd);
	if (n == 4 && magic[0] == 'Q' && magic[1] == 'F' && magic[2] == 'I' && magic[3] == 0xfb)
		return "qcow2";
	return "raw";
}

/*
 * --recover-on-restart: device o->dev_id exists already.  If its daemon
 * died and it serves the same image (target, file, read-only), turn @o
 * into a recovery of it: returns 1.  Returns 0 if there is no such
 * device (add it), -1 on a refusal (logged).
 */
static int restart_check(struct ublk_dev_opts *o)
{
	struct ublksrv_ctrl_dev_info info;
	struct ublk_state st;
	struct ublk_ctrl ctrl;
	unsigned id = (unsigned)o->dev_id;
	int ret;

	if (ublk_ctrl_open(&ctrl) < 0)
		return -1;
	ret = ublk_ctrl_get_info(&ctrl, id, &info);
	ublk_ctrl_close(&ctrl);
	if (ret == -ENODEV)
		return 0;
	if (ret < 0) {
		log_error("ublk%u: GET_DEV_INFO: %s", id, strerror(-ret));
		return -1;
	}
	if (!(info.flags & UBLK_F_USER_RECOVERY)) {
		log_error("ublk%u exists and was created without user_recovery: it cannot be "
			  "taken back ('qublk del -n %u' first)", id, id);
		return -1;
	}
	if (pid_alive(info.ublksrv_pid) && info.state == UBLK_S_DEV_LIVE) {
		log_error("ublk%u exists and its daemon (pid %d) is running", id, info.ublksrv_pid);
		return -1;
	}
	ret = ublk_state_read((int)id, &st);
	if (ret < 0) {
		log_error("ublk%u: no state file in %s (%s): cannot tell what it serves", id,
			  ublk_run_dir(), strerror(-ret));
		return -1;
	}
	if (strcmp(st.target, o->type) || strcmp(st.image, o->file ? o->file : "-") ||
	    st.read_only != o->read_only) {
		log_error("ublk%u serves %s %s%s, not %s %s%s: not taking it over", id, st.target,
			  st.image, st.read_only ? " read-only" : "", o->type,
			  o->file ? o->file : "-", o->read_only ? " read-only" : "");
		return -1;
	}
	/* The device's geometry and options are what it was created with. */
	o->mode = UBLK_RUN_RECOVER;
	o->nr_queues = info.nr_hw_queues;
	o->depth = info.queue_depth;
	o->force_share = st.force_share;
	o->direct = st.direct;
	o->size = st.size;
	o->discard = st.discard;
	log_info("ublk%u: its daemon (pid %d) is gone: recovering it", id,
		 info.ublksrv_pid > 0 ? info.ublksrv_pid : st.pid);
	return 1;
}

/* Fork the daemon and wait for its report.  Returns the exit code. */
static int daemonise(const struct ublk_dev_opts *o)
{
	char buf[128];
	size_t got = 0;
	int pfd[2], status;
	pid_t pid;

	if (pipe2(pfd, O_CLOEXEC) < 0) {
		log_error("pipe: %s", strerror(errno));
		return EXIT_FAIL;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		log_error("fork: %s", strerror(errno));
		return EXIT_FAIL;
	}
	if (pid == 0) {
		close(pfd[0]);
		setsid();
		if (chdir("/") < 0)
			log_debug("chdir /: %s", strerror(errno));
		_exit(ublk_dev_run(o, pfd[1]) < 0 ? EXIT_FAIL : EXIT_OK);
	}
	close(pfd[1]);
	for (;;) {
		ssize_t n = read(pfd[0], buf + got, sizeof(buf) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
		if (got == sizeof(buf) - 1)
			break;
	}
	close(pfd[0]);
	buf[got] = 0;
	if (got && !strncmp(buf, "/dev/ublkb", 10)) {
		fputs(buf, stdout);
		return EXIT_OK;
	}
	/* The daemon failed before going live; its errors are on stderr. */
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (WIFSIGNALED(status))
		log_error("the daemon died with signal %d before the device was live",
			  WTERMSIG(status));
	return EXIT_FAIL;
}

int cmd_add(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "type", required_argument, NULL, 't' },
		{ "queues", required_argument, NULL, 'q' },
		{ "depth", required_argument, NULL, 'd' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "number", required_argument, NULL, 'n' },
		{ "size", required_argument, NULL, 's' },
		{ "cache", required_argument, NULL, 'c' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "no-recovery", no_argument, NULL, 'R' },
		{ "no-zero-copy", no_argument, NULL, 'Z' },
		{ "no-batch", no_argument, NULL, 'B' },
		{ "unprivileged", no_argument, NULL, 'u' },
		{ "recover-on-restart", no_argument, NULL, 'X' },
		{ "discard", required_argument, NULL, 'D' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ublk_dev_opts o = {
		.type = NULL, .dev_id = -1, .nr_queues = UBLK_DEF_QUEUES,
		.depth = UBLK_DEF_DEPTH, .max_io = UBLK_DEF_MAX_IO, .direct = true,
		/* Only root may create other devices. */
		.unprivileged = geteuid() != 0,
	};
	char abspath[PATH_MAX];
	bool foreground = false, have_size = false, restart = false;
	unsigned id;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "t:q:d:rUn:s:fh", lopts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (!ublk_tgt_find(optarg)) {
				log_error("unknown type '%s' (qcow2, raw, null)", optarg);
				return EXIT_USAGE;
			}
			o.type = optarg;
			break;
		case 'q':
			if (cli_parse_uint(optarg, 1, UBLK_MAX_QUEUES, &o.nr_queues) < 0) {
				log_error("--queues '%s': expected 1..%u", optarg, UBLK_MAX_QUEUES);
				return EXIT_USAGE;
			}
			break;
		case 'd':
			if (cli_parse_uint(optarg, 1, UBLK_MAX_QUEUE_DEPTH, &o.depth) < 0) {
				log_error("--depth '%s': expected 1..%u", optarg, UBLK_MAX_QUEUE_DEPTH);
				return EXIT_USAGE;
			}
			break;
		case 'r':
			o.read_only = true;
			break;
		case 'U':
			o.force_share = true;
			break;
		case 'n':
			if (cli_parse_uint(optarg, 0, INT_MAX, &id) < 0) {
				log_error("--number '%s': expected a device number", optarg);
				return EXIT_USAGE;
			}
			o.dev_id = (int)id;
			break;
		case 's':
			if (parse_size(optarg, &o.size) < 0 || o.size < 512) {
				log_error("--size '%s': expected a size of at least 512 bytes", optarg);
				return EXIT_USAGE;
			}
			have_size = true;
			break;
		case 'c':
			if (!strcmp(optarg, "none"))
				o.direct = true;
			else if (!strcmp(optarg, "writeback"))
				o.direct = false;
			else {
				log_error("--cache '%s': expected none or writeback", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'f':
			foreground = true;
			break;
		case 'R':
			o.no_recovery = true;
			break;
		case 'Z':
			o.no_zero_copy = true;
			break;
		case 'B':
			o.no_batch = true;
			break;
		case 'u':
			o.unprivileged = true;
			break;
		case 'X':
			restart = true;
			break;
		case 'D':
			if (!strcmp(optarg, "unmap")) {
				o.discard = UBLK_DISCARD_UNMAP;
			} else if (!strcmp(optarg, "ignore")) {
				o.discard = UBLK_DISCARD_IGNORE;
			} else {
				log_error("--discard '%s': expected unmap or ignore", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h':
			add_usage(stdout);
			return EXIT_OK;
		default:
			add_usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind > 1) {
		log_error("too many arguments");
		add_usage(stderr);
		return EXIT_USAGE;
	}
	if (o.force_share && !o.read_only) {
		log_error("--force-share is only allowed with --read-only");
		return EXIT_USAGE;
	}
	if (o.read_only && o.discard == UBLK_DISCARD_UNMAP) {
		log_error("--discard unmap: a read-only device cannot discard");
		return EXIT_USAGE;
	}
	if (optind < argc) {
		if (o.type && !strcmp(o.type, "null")) {
			log_error("the null target takes no FILE");
			return EXIT_USAGE;
		}
		/* The daemon changes directory; keep the name it was given
		 * meaningful (and absolute in 'qublk list').  Symlinks stay:
		 * relative backing names resolve next to the given path. */
		int err = path_absolute(argv[optind], abspath, sizeof(abspath));
		if (!err && access(abspath, F_OK))
			err = -errno;
		if (err) {
			log_error("%s: %s", argv[optind], strerror(-err));
			return EXIT_FAIL;
		}
		o.file = abspath;
		if (!o.type)
			o.type = probe_type(abspath);
	} else {
		if (!o.type)
			o.type = have_size ? "null" : NULL;
		if (!o.type || strcmp(o.type, "null")) {
			log_error("missing FILE");
			add_usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (!strcmp(o.type, "null") && !have_size) {
		log_error("the null target needs --size");
		return EXIT_USAGE;
	}
	if (strcmp(o.type, "null") && have_size) {
		log_error("--size is for the null target only");
		return EXIT_USAGE;
	}
	if (restart) {
		if (o.dev_id < 0) {
			log_error("--recover-on-restart needs -n ID (the device to take back)");
			return EXIT_USAGE;
		}
		if (restart_check(&o) < 0)
			return EXIT_FAIL;
	}
	if (foreground)
		return ublk_dev_run(&o, -1) < 0 ? EXIT_FAIL : EXIT_OK;
	return daemonise(&o);
}

/* ---------------------------------------------------- recover / upgrade */

static void takeover_usage(FILE *out, bool upgrade)
{
	if (upgrade)
		fprintf(out,
			"Usage: qublk upgrade -n ID [--foreground]\n\n"
			"Hand device ID over from its running daemon to a new one started from this\n"
			"qublk binary, without failing a request: the old daemon quiesces the device\n"
			"(QUIESCE_DEV where the kernel has it; otherwise it stops its queues and the\n"
			"kernel requeues what they held), writes the image back and passes it, still\n"
			"open and locked, to the new daemon, which takes the device over.  The image\n"
			"is never unlocked and never has two writers.\n\n");
	else
		fprintf(out,
			"Usage: qublk recover -n ID [--foreground]\n\n"
			"Start a new daemon for device ID whose daemon died (kill -9, crash, OOM):\n"
			"the kernel kept the device and queued its I/O; the new daemon reopens the\n"
			"image (what the crash left costs leaked clusters at most), takes the device\n"
			"over and serves the queued requests, those the dead daemon held included\n"
			"(user_recovery_reissue).  The device must have been created with\n"
			"user_recovery (the default of 'qublk add' where the kernel offers it).\n\n");
	fprintf(out, "The image and options come from the device's state file in %s.\n"
		"  -n, --number ID      the device\n"
		"  -f, --foreground     do not daemonise\n\n"
		"Prints the device path once the new daemon serves it.\n"
		"Exit codes: 0 success, 1 failure, 2 usage error.\n", ublk_run_dir());
}

static int takeover(int argc, char **argv, bool upgrade)
{
	static const struct option lopts[] = {
		{ "number", required_argument, NULL, 'n' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ublksrv_ctrl_dev_info info;
	struct ublk_dev_opts o = { .max_io = UBLK_DEF_MAX_IO };
	struct ublk_state st;
	struct ublk_ctrl ctrl;
	bool foreground = false, have_id = false, alive;
	unsigned id = 0;
	int c, ret;

	optind = 1;
	while ((c = getopt_long(argc, argv, "n:fh", lopts, NULL)) != -1) {
		switch (c) {
		case 'n':
			if (cli_parse_uint(optarg, 0, INT_MAX, &id) < 0) {
				log_error("--number '%s': expected a device number", optarg);
				return EXIT_USAGE;
			}
			have_id = true;
			break;
		case 'f':
			foreground = true;
			break;
		case 'h':
			takeover_usage(stdout, upgrade);
			return EXIT_OK;
		default:
			takeover_usage(stderr, upgrade);
			return EXIT_USAGE;
		}
	}
	if (optind != argc || !have_id) {
		log_error("expected -n ID and nothing else");
		return EXIT_USAGE;
	}
	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	ret = ublk_ctrl_get_info(&ctrl, id, &info);
	ublk_ctrl_close(&ctrl);
	if (ret < 0) {
		log_error("ublk%u: %s", id, ret == -ENODEV ? "no such device" : strerror(-ret));
		return EXIT_FAIL;
	}
	if (!(info.flags & UBLK_F_USER_RECOVERY)) {
		log_error("ublk%u was created without user_recovery (--no-recovery, an "
			  "unprivileged device, or a kernel without it): it cannot be %s", id,
			  upgrade ? "handed over" : "recovered");
		return EXIT_FAIL;
	}
	ret = ublk_state_read((int)id, &st);
	if (ret < 0) {
		log_error("ublk%u: no state file in %s (%s): cannot tell its image", id,
			  ublk_run_dir(), strerror(-ret));
		return EXIT_FAIL;
	}
	alive = pid_alive(info.ublksrv_pid) && info.state == UBLK_S_DEV_LIVE;
	if (upgrade && !alive) {
		log_error("ublk%u has no running daemon (state %s): use 'qublk recover -n %u'", id,
			  ublk_state_name(info.state), id);
		return EXIT_FAIL;
	}
	if (!upgrade && alive) {
		log_error("ublk%u: its daemon (pid %d) is running: use 'qublk upgrade -n %u' to "
			  "replace it", id, info.ublksrv_pid, id);
		return EXIT_FAIL;
	}
	o.mode = upgrade ? UBLK_RUN_HANDOVER : UBLK_RUN_RECOVER;
	o.type = ublk_tgt_find(st.target) ? st.target : NULL;
	if (!o.type) {
		log_error("ublk%u: unknown target '%s' in its state file", id, st.target);
		return EXIT_FAIL;
	}
	o.file = strcmp(st.image, "-") ? st.image : NULL;
	o.dev_id = (int)id;
	o.nr_queues = info.nr_hw_queues;
	o.depth = info.queue_depth;
	o.read_only = st.read_only;
	o.force_share = st.force_share;
	o.direct = st.direct;
	o.size = st.size;
	o.discard = st.discard;
	if (foreground)
		return ublk_dev_run(&o, -1) < 0 ? EXIT_FAIL : EXIT_OK;
	return daemonise(&o);
}

int cmd_recover(int argc, char **argv) { return takeover(argc, argv, false); }
int cmd_upgrade(int argc, char **argv) { return takeover(argc, argv, true); }

/* --------------------------------------------------------------- list */

/* Device numbers from /dev/ublkcN and from state files, deduplicated. */
static int collect_ids(int *ids, int max)
{
	const char *dirs[2] = { "/dev", ublk_run_dir() };
	int n = 0;

	for (int k = 0; k < 2; k++) {
		DIR *dir = opendir(dirs[k]);
		struct dirent *de;

		if (!dir)
			continue;
		while ((de = readdir(dir)) && n < max) {
			unsigned id;
			char tail;
			bool dup = false;

			if (k == 0 ? sscanf(de->d_name, "ublkc%u%c", &id, &tail) != 1
				   : sscanf(de->d_name, "ublk%u%c", &id, &tail) != 1)
				continue;
			if (id > INT_MAX)
				continue;
			for (int i = 0; i < n; i++)
				dup |= ids[i] == (int)id;
			if (!dup)
				ids[n++] = (int)id;
		}
		closedir(dir);
	}
	/* Sorted, for stable output. */
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && ids[j] < ids[j - 1]; j--) {
			int t = ids[j]; ids[j] = ids[j - 1]; ids[j - 1] = t;
		}
	return n;
}

void cli_json_string(FILE *out, const char *s)
{
	fputc('"', out);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			fprintf(out, "\\%c", ch);
		else if (ch < 0x20)
			fprintf(out, "\\u%04x", ch);
		else
			fputc(ch, out);
	}
	fputc('"', out);
}

int cmd_list(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ublk_ctrl ctrl;
	int ids[1024], n, c, shown = 0;
	bool json = false;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'o':
			if (!strcmp(optarg, "json"))
				json = true;
			else if (strcmp(optarg, "human")) {
				log_error("--output '%s': expected human or json", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h':
			printf("Usage: qublk list [--output human|json]\n\n"
			       "Show the ublk devices: id, state, target, queues, depth, daemon pid, image.\n"
			       "States: live; quiesced (no daemon: its daemon died or handed over, the\n"
			       "kernel queues the I/O until 'qublk recover -n ID' or 'qublk del'); recovering\n"
			       "(a new daemon is taking over); quiescing (the daemon died a moment ago);\n"
			       "fail-io; dead (not started).  A '!' after the pid: that daemon is gone.\n\n"
			       "  -o, --output FMT   human (a table, the default) or json\n\n"
			       "Exit codes: 0 success, 1 failure, 2 usage error.\n");
			return EXIT_OK;
		default:
			return EXIT_USAGE;
		}
	}
	if (optind != argc) {
		log_error("too many arguments");
		return EXIT_USAGE;
	}
	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	n = collect_ids(ids, (int)ARRAY_SIZE(ids));
	if (json)
		printf("[");
	else
		printf("%-4s %-10s %-6s %6s %5s %7s %-3s %s\n", "ID", "STATE", "TARGET", "QUEUES",
		       "DEPTH", "PID", "RO", "IMAGE");
	for (int i = 0; i < n; i++) {
		struct ublksrv_ctrl_dev_info info;
		struct ublk_state st;
		const char *state;
		bool have_st, alive;

		/* State files of devices that are gone are stale: skip. */
		if (ublk_ctrl_get_info(&ctrl, (unsigned)ids[i], &info) < 0)
			continue;
		have_st = ublk_state_read(ids[i], &st) == 0;
		if (!have_st) {
			memset(&st, 0, sizeof(st));
			snprintf(st.target, sizeof(st.target), "?");
			snprintf(st.image, sizeof(st.image), "?");
		}
		alive = pid_alive(info.ublksrv_pid);
		state = ublk_state_name(info.state);
		/* A daemon that started recovery and has not ended it yet. */
		if (!alive && have_st && st.pid != info.ublksrv_pid && pid_alive(st.pid))
			state = "recovering";
		else if (!alive && info.state == UBLK_S_DEV_LIVE && (info.flags & UBLK_F_USER_RECOVERY))
			state = "quiescing";
		if (json) {
			printf("%s\n  {\"id\": %d, \"state\": \"%s\", \"recoverable\": %s, "
			       "\"zero_copy\": %s, \"batch\": %s, \"flags\": %llu, \"target\": ",
			       shown ? "," : "", ids[i], state,
			       (info.flags & UBLK_F_USER_RECOVERY) ? "true" : "false",
			       (info.flags & UBLK_F_AUTO_BUF_REG) ? "true" : "false",
			       (info.flags & UBLK_F_BATCH_IO) ? "true" : "false",
			       (unsigned long long)info.flags);
			cli_json_string(stdout, st.target);
			printf(", \"image\": ");
			cli_json_string(stdout, st.image);
			printf(", \"queues\": %u, \"depth\": %u, \"pid\": %d, \"daemon_alive\": %s, "
			       "\"read_only\": %s, \"device\": \"/dev/ublkb%d\"}",
			       info.nr_hw_queues, info.queue_depth, info.ublksrv_pid,
			       alive ? "true" : "false", st.read_only ? "true" : "false", ids[i]);
		} else {
			printf("%-4d %-10s %-6s %6u %5u %7d%s %-3s %s\n", ids[i],
			       state, st.target, info.nr_hw_queues,
			       info.queue_depth, info.ublksrv_pid, alive ? " " : "!",
			       st.read_only ? "yes" : "no", st.image);
		}
		shown++;
	}
	if (json)
		printf("%s]\n", shown ? "\n" : "");
	ublk_ctrl_close(&ctrl);
	return EXIT_OK;
}

/* ---------------------------------------------------------------- del */

int cmd_del(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "number", required_argument, NULL, 'n' },
		{ "all", no_argument, NULL, 'a' },
		{ "timeout", required_argument, NULL, 'T' },
		{ "force", no_argument, NULL, 'F' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ublk_ctrl ctrl;
	unsigned id = 0, timeout_s = 120;
	bool all = false, have_id = false, force = false;
	int c, rc = EXIT_OK;

	optind = 1;
	while ((c = getopt_long(argc, argv, "n:ah", lopts, NULL)) != -1) {
		switch (c) {
		case 'n':
			if (cli_parse_uint(optarg, 0, INT_MAX, &id) < 0) {
				log_error("--number '%s': expected a device number", optarg);
				return EXIT_USAGE;
			}
			have_id = true;
			break;
		case 'a':
			all = true;
			break;
		case 'T':
			if (cli_parse_uint(optarg, 1, 86400, &timeout_s) < 0) {
				log_error("--timeout '%s': expected seconds", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'F':
			force = true;
			break;
		case 'h':
			printf("Usage: qublk del -n ID | --all [--force] [--timeout SECONDS]\n\n"
			       "Stop a ublk device, flush and close its image, and remove it.  A device\n"
			       "whose daemon died is stopped and removed directly.\n"
			       "Where the kernel offers safe_stop_dev (TRY_STOP_DEV, Linux 6.19+), a\n"
			       "device whose block device is open or mounted is left alone: del fails\n"
			       "naming it as busy.  Elsewhere, and with --force, it is stopped anyway\n"
			       "(its users then get I/O errors).\n"
			       "  -n, --number ID       the device\n"
			       "  -a, --all             every ublk device\n"
			       "      --force           stop the device even if it is open or mounted\n"
			       "      --timeout SECONDS how long to wait for the daemon (default 120)\n\n"
			       "Exit codes: 0 success, 1 failure (a busy device included), 2 usage error.\n");
			return EXIT_OK;
		default:
			return EXIT_USAGE;
		}
	}
	if (optind != argc || all == have_id) {
		log_error("expected exactly one of -n ID and --all");
		return EXIT_USAGE;
	}
	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	if (all) {
		int ids[1024];
		int n = collect_ids(ids, (int)ARRAY_SIZE(ids));
		for (int i = 0; i < n; i++) {
			struct ublksrv_ctrl_dev_info info;
			if (ublk_ctrl_get_info(&ctrl, (unsigned)ids[i], &info) < 0) {
				ublk_state_remove(ids[i]);   /* stale */
				continue;
			}
			if (ublk_dev_delete(&ctrl, ids[i], (int)timeout_s * 1000, force) < 0)
				rc = EXIT_FAIL;
		}
	} else if (ublk_dev_delete(&ctrl, (int)id, (int)timeout_s * 1000, force) < 0) {
		rc = EXIT_FAIL;
	}
	ublk_ctrl_close(&ctrl);
	return rc;
}
