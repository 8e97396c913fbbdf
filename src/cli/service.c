/* SPDX-License-Identifier: MIT */
/*
 * qublk service start|stop|show NAME: the commands of the systemd unit
 * qublk@NAME.service (systemd/qublk@.service.in), which serves the image
 * that /etc/qublk/NAME.conf describes (format: man/qublk.conf.5.scd).
 *
 * start is the unit's ExecStart (Type=notify): it runs the daemon in the
 * foreground in this very process, so that it is the unit's main process
 * and its sd_notify READY=1 (src/ublk/notify.c) is accepted.  A daemon
 * that crashed left its device quiesced with the I/O queued
 * (user_recovery); the unit restarts us (Restart=on-failure), and start
 * then recovers that device, found by its state file naming the same
 * image, instead of adding a new one.
 *
 * stop is the unit's ExecStop, which systemd runs both when asked to stop
 * and after the main process died on its own.  It tells the two apart by
 * $MAINPID, which systemd sets only while the main process lives: a
 * clean `del` of that daemon's device in the first case; in the second
 * the device is left for the restart to recover.
 *
 * Both reuse cmd_add/cmd_recover (src/cli/ublk.c) with a command line
 * built from the configuration, so that an option means the same in a
 * .conf file as on the command line.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/util.h"
#include "ublk/ublk.h"

#define SERVICE_CONF_DIR "/etc/qublk"
#define SERVICE_DEL_TIMEOUT_MS 120000   /* the unit's TimeoutStopSec is longer */

struct svc_conf {
	char image[PATH_MAX];
	const char *target;     /* NULL: probed by add */
	unsigned queues, depth, number;
	bool have_queues, have_depth, have_number;
	bool read_only;
	const char *cache;      /* NULL: add's default */
};

static void service_usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk service start|stop|show [-C DIR] NAME\n\n"
		"The commands of the systemd unit qublk@NAME.service, which serves the image\n"
		"described by %s/NAME.conf (image=, target=, queues=, depth=,\n"
		"read-only=, cache=, number=; see qublk.conf(5)) as /dev/ublkbN.\n\n"
		"  start    serve it in the foreground (ExecStart): if a device of this image\n"
		"           is waiting for a new daemon (its daemon died), recover it;\n"
		"           otherwise add a device.  Sends READY=1 to $NOTIFY_SOCKET once\n"
		"           the device is live; runs until SIGTERM or 'qublk del'.\n"
		"  stop     (ExecStop) with $MAINPID set: delete that daemon's device\n"
		"           cleanly, as 'qublk del'.  Without it (the daemon died) leave the\n"
		"           device to the restart, which recovers it.\n"
		"  show     print the 'qublk add' command line the configuration amounts to\n\n"
		"  -C, --conf-dir DIR   where NAME.conf is (default %s)\n"
		"  -h, --help           show this help\n\n"
		"Exit codes: 0 success (start: the device was deleted, cleanly), 1 failure,\n"
		"2 usage error or bad configuration (the unit does not restart on it).\n",
		SERVICE_CONF_DIR, SERVICE_CONF_DIR);
}

static char *trim(char *s)
{
	char *e;

	while (isspace((unsigned char)*s))
		s++;
	e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = 0;
	return s;
}

static int parse_bool(const char *v, bool *out)
{
	static const char *yes[] = { "yes", "true", "on", "1" }, *no[] = { "no", "false", "off", "0" };

	for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
		if (!strcmp(v, yes[i]) || !strcmp(v, no[i])) {
			*out = !strcmp(v, yes[i]);
			return 0;
		}
	}
	return -EINVAL;
}

/* Parse one "key = value" of @file:@line into @c.  Returns -EINVAL (logged). */
static int conf_set(struct svc_conf *c, const char *file, int line, const char *key,
		    const char *v, unsigned *seen)
{
	static const char *keys[] = { "image", "target", "queues", "depth", "read-only", "cache",
				      "number" };
	size_t k;

	for (k = 0; k < ARRAY_SIZE(keys); k++)
		if (!strcmp(key, keys[k]))
			break;
	if (k == ARRAY_SIZE(keys)) {
		log_error("%s:%d: unknown key '%s' (image, target, queues, depth, read-only, "
			  "cache, number)", file, line, key);
		return -EINVAL;
	}
	if (*seen & (1u << k)) {
		log_error("%s:%d: '%s' given twice", file, line, key);
		return -EINVAL;
	}
	*seen |= 1u << k;
	switch (k) {
	case 0:
		if (v[0] != '/' || strlen(v) >= sizeof(c->image)) {
			log_error("%s:%d: image '%s': expected an absolute path", file, line, v);
			return -EINVAL;
		}
		strcpy(c->image, v);
		return 0;
	case 1:
		if (strcmp(v, "qcow2") && strcmp(v, "raw")) {
			log_error("%s:%d: target '%s': expected qcow2 or raw", file, line, v);
			return -EINVAL;
		}
		c->target = !strcmp(v, "qcow2") ? "qcow2" : "raw";
		return 0;
	case 2:
		if (cli_parse_uint(v, 1, UBLK_MAX_QUEUES, &c->queues) < 0) {
			log_error("%s:%d: queues '%s': expected 1..%u", file, line, v, UBLK_MAX_QUEUES);
			return -EINVAL;
		}
		c->have_queues = true;
		return 0;
	case 3:
		if (cli_parse_uint(v, 1, UBLK_MAX_QUEUE_DEPTH, &c->depth) < 0) {
			log_error("%s:%d: depth '%s': expected 1..%u", file, line, v,
				  UBLK_MAX_QUEUE_DEPTH);
			return -EINVAL;
		}
		c->have_depth = true;
		return 0;
	case 4:
		if (parse_bool(v, &c->read_only) < 0) {
			log_error("%s:%d: read-only '%s': expected yes or no", file, line, v);
			return -EINVAL;
		}
		return 0;
	case 5:
		if (strcmp(v, "none") && strcmp(v, "writeback")) {
			log_error("%s:%d: cache '%s': expected none or writeback", file, line, v);
			return -EINVAL;
		}
		c->cache = !strcmp(v, "none") ? "none" : "writeback";
		return 0;
	default:
		if (cli_parse_uint(v, 0, INT_MAX, &c->number) < 0) {
			log_error("%s:%d: number '%s': expected a device number", file, line, v);
			return -EINVAL;
		}
		c->have_number = true;
		return 0;
	}
}

/* Read @path.  Returns 0, -EINVAL (bad content) or -errno (logged). */
static int conf_read(const char *path, struct svc_conf *c)
{
	char buf[PATH_MAX + 64];
	unsigned seen = 0;
	int line = 0, ret = 0;
	FILE *f;

	memset(c, 0, sizeof(*c));
	f = fopen(path, "re");
	if (!f) {
		ret = -errno;
		log_error("%s: %s", path, strerror(errno));
		return ret;
	}
	while (fgets(buf, sizeof(buf), f)) {
		char *s, *eq;

		line++;
		if (!strchr(buf, '\n') && !feof(f)) {
			log_error("%s:%d: line too long", path, line);
			ret = -EINVAL;
			break;
		}
		s = trim(buf);
		if (!*s || *s == '#')
			continue;
		eq = strchr(s, '=');
		if (!eq) {
			log_error("%s:%d: expected key = value", path, line);
			ret = -EINVAL;
			break;
		}
		*eq = 0;
		ret = conf_set(c, path, line, trim(s), trim(eq + 1), &seen);
		if (ret < 0)
			break;
	}
	if (!ret && ferror(f)) {
		ret = -EIO;
		log_error("%s: read error", path);
	}
	fclose(f);
	if (!ret && !(seen & 1)) {
		log_error("%s: no image = PATH", path);
		ret = -EINVAL;
	}
	return ret;
}

/* The 'qublk add' command line for @c: argv[0] is "add". */
struct add_argv {
	char *argv[20];
	int argc;
	char q[16], d[16], n[16];
};

static void add_argv_build(const struct svc_conf *c, struct add_argv *a)
{
	a->argc = 0;
	a->argv[a->argc++] = "add";
	a->argv[a->argc++] = "--foreground";
	if (c->target) {
		a->argv[a->argc++] = "-t";
		a->argv[a->argc++] = (char *)c->target;
	}
	if (c->have_queues) {
		snprintf(a->q, sizeof(a->q), "%u", c->queues);
		a->argv[a->argc++] = "-q";
		a->argv[a->argc++] = a->q;
	}
	if (c->have_depth) {
		snprintf(a->d, sizeof(a->d), "%u", c->depth);
		a->argv[a->argc++] = "-d";
		a->argv[a->argc++] = a->d;
	}
	if (c->have_number) {
		snprintf(a->n, sizeof(a->n), "%u", c->number);
		a->argv[a->argc++] = "-n";
		a->argv[a->argc++] = a->n;
	}
	if (c->read_only)
		a->argv[a->argc++] = "--read-only";
	if (c->cache) {
		a->argv[a->argc++] = "--cache";
		a->argv[a->argc++] = (char *)c->cache;
	}
	a->argv[a->argc++] = (char *)c->image;
	a->argv[a->argc] = NULL;
}

/* Print @s for a POSIX shell. */
static void put_shell_word(const char *s)
{
	bool plain = *s != 0;

	for (const char *p = s; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("/._-+:=,@%", *p))
			plain = false;
	if (plain) {
		fputs(s, stdout);
		return;
	}
	putchar('\'');
	for (; *s; s++) {
		if (*s == '\'')
			fputs("'\\''", stdout);
		else
			putchar(*s);
	}
	putchar('\'');
}

static bool pid_alive(int pid)
{
	return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

/* Device numbers with a state file, ascending; at most @max. */
static int state_ids(int *ids, int max)
{
	DIR *dir = opendir(ublk_run_dir());
	struct dirent *de;
	int n = 0;

	if (!dir)
		return 0;
	while ((de = readdir(dir)) && n < max) {
		unsigned id;
		char tail;

		if (sscanf(de->d_name, "ublk%u%c", &id, &tail) == 1 && id <= INT_MAX)
			ids[n++] = (int)id;
	}
	closedir(dir);
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && ids[j] < ids[j - 1]; j--) {
			int t = ids[j]; ids[j] = ids[j - 1]; ids[j - 1] = t;
		}
	return n;
}

/* The device left by a dead daemon of this configuration's image: its
 * number, or -1.  A live daemon's device is not ours to take (add then
 * meets its image lock, or shares a read-only image). */
static int find_orphan(const struct svc_conf *c, struct ublk_ctrl *ctrl, bool *recoverable)
{
	char want[PATH_MAX], have[PATH_MAX];
	int ids[1024], n;

	if (udev_normalize_path(c->image, want, sizeof(want)) < 0)
		return -1;
	n = state_ids(ids, (int)ARRAY_SIZE(ids));
	for (int i = 0; i < n; i++) {
		struct ublksrv_ctrl_dev_info info;
		struct ublk_state st;

		if (c->have_number && ids[i] != (int)c->number)
			continue;
		if (ublk_state_read(ids[i], &st) < 0 ||
		    udev_normalize_path(st.image, have, sizeof(have)) < 0 || strcmp(want, have))
			continue;
		if (ublk_ctrl_get_info(ctrl, (unsigned)ids[i], &info) < 0)
			continue;   /* stale state file */
		if (pid_alive(info.ublksrv_pid) && info.state == UBLK_S_DEV_LIVE)
			continue;
		/* A recovering device whose new daemon still runs. */
		if (st.pid != info.ublksrv_pid && pid_alive(st.pid))
			continue;
		*recoverable = info.flags & UBLK_F_USER_RECOVERY;
		return ids[i];
	}
	return -1;
}

static int service_start(const struct svc_conf *c)
{
	struct add_argv a;
	struct ublk_ctrl ctrl;
	bool recoverable = false;
	int id = -1;

	if (ublk_ctrl_open(&ctrl) < 0)
		return EXIT_FAIL;
	id = find_orphan(c, &ctrl, &recoverable);
	if (id >= 0 && !recoverable) {
		/* Created without user_recovery: its I/O fails; start afresh. */
		log_info("ublk%d: %s was served by a daemon that died, without recovery: "
			 "deleting it", id, c->image);
		if (ublk_dev_delete(&ctrl, id, SERVICE_DEL_TIMEOUT_MS) < 0) {
			ublk_ctrl_close(&ctrl);
			return EXIT_FAIL;
		}
		id = -1;
	}
	ublk_ctrl_close(&ctrl);
	if (id >= 0) {
		char num[16], *argv[] = { "recover", "-n", num, "--foreground", NULL };

		snprintf(num, sizeof(num), "%d", id);
		log_info("ublk%d: %s: its daemon died; recovering the device", id, c->image);
		return cmd_recover(4, argv);
	}
	add_argv_build(c, &a);
	return cmd_add(a.argc, a.argv);
}

static int service_stop(const char *name)
{
	const char *mp = getenv("MAINPID"), *result = getenv("SERVICE_RESULT");
	struct ublk_ctrl ctrl;
	int ids[1024], n, ret;
	unsigned pid;

	if (!mp || !*mp) {
		if (result && !strcmp(result, "success"))
			log_info("%s: the daemon has exited: nothing to stop", name);
		else
			log_info("%s: the daemon is gone (%s): its device, if any, is left to "
				 "the restart to recover, or to 'qublk del'", name,
				 result ? result : "no $SERVICE_RESULT");
		return EXIT_OK;
	}
	if (cli_parse_uint(mp, 1, INT_MAX, &pid) < 0) {
		log_error("MAINPID '%s': expected a pid", mp);
		return EXIT_USAGE;
	}
	n = state_ids(ids, (int)ARRAY_SIZE(ids));
	for (int i = 0; i < n; i++) {
		struct ublk_state st;

		if (ublk_state_read(ids[i], &st) < 0 || st.pid != (int)pid)
			continue;
		if (ublk_ctrl_open(&ctrl) < 0)
			return EXIT_FAIL;
		ret = ublk_dev_delete(&ctrl, ids[i], SERVICE_DEL_TIMEOUT_MS);
		ublk_ctrl_close(&ctrl);
		return ret < 0 ? EXIT_FAIL : EXIT_OK;
	}
	/* Not live yet (no state file): SIGTERM stops it as cleanly. */
	log_warn("%s: daemon %u has no device in %s: sending it SIGTERM", name, pid,
		 ublk_run_dir());
	if (kill((pid_t)pid, SIGTERM) < 0 && errno != ESRCH) {
		log_error("kill %u: %s", pid, strerror(errno));
		return EXIT_FAIL;
	}
	return EXIT_OK;
}

int cmd_service(int argc, char **argv)
{
	static const struct option lopts[] = {
		{ "conf-dir", required_argument, NULL, 'C' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *dir = SERVICE_CONF_DIR, *verb, *name;
	char path[PATH_MAX];
	struct svc_conf conf;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "C:h", lopts, NULL)) != -1) {
		switch (c) {
		case 'C':
			dir = optarg;
			break;
		case 'h':
			service_usage(stdout);
			return EXIT_OK;
		default:
			service_usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 2) {
		log_error("expected start, stop or show and a NAME");
		service_usage(stderr);
		return EXIT_USAGE;
	}
	verb = argv[optind];
	name = argv[optind + 1];
	/* The unit's instance name becomes a file name in DIR. */
	if (!*name || name[0] == '.' || strchr(name, '/')) {
		log_error("'%s': not a service name (no '/', no leading '.')", name);
		return EXIT_USAGE;
	}
	if (strcmp(verb, "start") && strcmp(verb, "stop") && strcmp(verb, "show")) {
		log_error("'%s': expected start, stop or show", verb);
		return EXIT_USAGE;
	}
	if (!strcmp(verb, "stop"))
		return service_stop(name);
	if ((size_t)snprintf(path, sizeof(path), "%s/%s.conf", dir, name) >= sizeof(path)) {
		log_error("%s/%s.conf: %s", dir, name, strerror(ENAMETOOLONG));
		return EXIT_USAGE;
	}
	if (conf_read(path, &conf) < 0)
		return EXIT_USAGE;
	if (!strcmp(verb, "show")) {
		struct add_argv a;

		add_argv_build(&conf, &a);
		fputs("qublk", stdout);
		for (int i = 0; i < a.argc; i++) {
			putchar(' ');
			put_shell_word(a.argv[i]);
		}
		putchar('\n');
		return EXIT_OK;
	}
	return service_start(&conf);
}
