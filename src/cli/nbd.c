/* SPDX-License-Identifier: MIT */
/*
 * qublk nbd: serve one image over NBD until SIGINT or SIGTERM.  Parses the
 * command line, opens the image and hands it to src/nbd/server.c, which
 * runs everything on this thread's io_uring.  On a signal the server stops
 * accepting, finishes in-flight requests and flushes; we then close the
 * image (writing back its metadata) and exit 0.  The image is locked
 * (bdrv_open, src/block/lock.h) until then.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "block/bdrv.h"
#include "cli/cli.h"
#include "common/aio.h"
#include "common/util.h"
#include "nbd/proto.h"
#include "nbd/server.h"

#define NBD_RING_ENTRIES 512
/* --poll-us: long enough to catch a client's next request at queue depth
 * (measured: 20-200 us all reach qemu-nbd's rate on fio's empty-image
 * randread, 0 is 0.5-0.75x of it), short enough to cost little CPU when
 * requests are rare (at most this much per wakeup). */
#define NBD_POLL_US 50

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk nbd [OPTIONS] FILE\n\n"
		"Serve FILE (qcow2 or raw) over NBD until SIGINT or SIGTERM, then finish\n"
		"in-flight requests, flush, close the image cleanly and exit 0.\n"
		"Several clients may connect at once and one after another.\n\n"
		"The image and its backing files are locked as QEMU locks them, so qublk\n"
		"and QEMU (qemu-nbd, qemu-io, qemu-img, VMs) exclude each other: serving\n"
		"fails if another process writes the image or, without --read-only, has\n"
		"it open at all (readers with force-share, -U, excepted); while we serve\n"
		"it, they are refused alike.\n\n"
		"  -k, --socket PATH       listen on a unix socket at PATH\n"
		"  -p, --port N            listen on TCP port N (0: any free port)\n"
		"  -b, --bind ADDR         TCP address to bind (default 127.0.0.1)\n"
		"                          Without --socket, TCP is used on %s:%d\n"
		"                          unless --port or --bind say otherwise.\n"
		"  -r, --read-only         export read-only (writes fail with EPERM)\n"
		"  -U, --force-share       with --read-only: serve the image even if another\n"
		"                          process writes it (reads may be inconsistent)\n"
		"  -f, --format FMT        qcow2 or raw (default: probe the file)\n"
		"      --cache MODE        none (O_DIRECT) or writeback (default)\n"
		"      --discard MODE      unmap (default: discards free clusters and the\n"
		"                          space goes back to the host file system) or\n"
		"                          ignore (discards do nothing), as qemu-nbd's\n"
		"  -x, --export-name NAME  export name (default \"\"; \"\" always matches)\n"
		"      --allow-empty       serve an image of size 0 (refused by default)\n"
		"  -e, --shared N          serve N clients at once (default 1, as qemu-nbd;\n"
		"                          0 = no limit); more wait to be accepted.  N > 1\n"
		"                          advertises multi-conn\n"
		"      --tls-creds DIR     TLS with x509 certificates from DIR (QEMU's\n"
		"                          tls-creds-x509 layout: ca-cert.pem, server-cert.pem,\n"
		"                          server-key.pem; ca-crl.pem optional)\n"
		"      --tls-psk FILE      TLS with pre-shared keys from FILE (psktool's\n"
		"                          \"identity:hexkey\" lines)\n"
		"      --tls-verify-peer   with --tls-creds: clients must present a certificate\n"
		"                          signed by ca-cert.pem\n"
		"      --tls MODE          require (the default with credentials: plaintext\n"
		"                          clients are refused), on (TLS offered, plaintext\n"
		"                          allowed) or off\n"
		"      --poll-us N         before sleeping for work, watch for it N us\n"
		"                          (default %u; 0: sleep at once).  A client at\n"
		"                          queue depth then rarely has to wake the server,\n"
		"                          at the cost of up to N us of CPU per wakeup\n"
		"  -h, --help              show this help\n\n"
		"The line \"serving FILE on ADDRESS\" is printed on stderr once listening.\n"
		"Exit status: 0 success, 1 failure, 2 usage error.\n",
		"127.0.0.1", NBD_DEFAULT_PORT, NBD_POLL_US);
}

int cmd_nbd(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "socket", required_argument, NULL, 'k' },
		{ "port", required_argument, NULL, 'p' },
		{ "bind", required_argument, NULL, 'b' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "format", required_argument, NULL, 'f' },
		{ "cache", required_argument, NULL, 'C' },
		{ "discard", required_argument, NULL, 'D' },
		{ "export-name", required_argument, NULL, 'x' },
		{ "allow-empty", no_argument, NULL, 'E' },
		{ "shared", required_argument, NULL, 'e' },
		{ "tls", required_argument, NULL, 'T' },
		{ "tls-creds", required_argument, NULL, 'X' },
		{ "tls-psk", required_argument, NULL, 'P' },
		{ "tls-verify-peer", no_argument, NULL, 'V' },
		{ "poll-us", required_argument, NULL, 'L' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct nbd_server_opts sopts = { .handle_signals = true, .max_conns = 1 };
	struct bdrv_opts bopts = { 0 };
	struct nbd_server *srv = NULL;
	struct bdrv *bs = NULL;
	struct aio_ctx ctx;
	struct stat st;
	bool allow_empty = false, tls_given = false;
	unsigned poll_us = NBD_POLL_US;
	int c, ret, rc = EXIT_FAIL;

	optind = 1;
	while ((c = getopt_long(argc, argv, "k:p:b:rUf:x:e:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'k':
			sopts.socket_path = optarg;
			break;
		case 'p': {
			char *end;
			errno = 0;
			unsigned long port = strtoul(optarg, &end, 10);
			if (errno || end == optarg || *end || port > 65535) {
				fprintf(stderr, "qublk nbd: --port: '%s' is not a port number\n", optarg);
				return EXIT_USAGE;
			}
			sopts.port = optarg;
			break;
		}
		case 'b':
			sopts.bind_addr = optarg;
			break;
		case 'r':
			sopts.read_only = true;
			bopts.flags |= BDRV_O_RDONLY;
			break;
		case 'U':
			bopts.flags |= BDRV_O_FORCE_SHARE;
			break;
		case 'f':
			if (strcmp(optarg, "qcow2") && strcmp(optarg, "raw")) {
				fprintf(stderr, "qublk nbd: --format: '%s' is not qcow2 or raw\n", optarg);
				return EXIT_USAGE;
			}
			bopts.format = optarg;
			break;
		case 'C':
			if (!strcmp(optarg, "none")) {
				bopts.flags |= BDRV_O_DIRECT;
			} else if (strcmp(optarg, "writeback")) {
				fprintf(stderr, "qublk nbd: --cache: '%s' is not none or writeback\n", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'D':
			if (!strcmp(optarg, "ignore")) {
				bopts.flags |= BDRV_O_NO_UNMAP;
			} else if (strcmp(optarg, "unmap")) {
				fprintf(stderr, "qublk nbd: --discard: '%s' is not ignore or unmap\n",
					optarg);
				return EXIT_USAGE;
			}
			break;
		case 'x':
			sopts.export_name = optarg;
			break;
		case 'L':
			if (cli_parse_uint(optarg, 0, 10000, &poll_us) < 0) {
				fprintf(stderr, "qublk nbd: --poll-us: '%s' is not 0..10000\n", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'E':
			allow_empty = true;
			break;
		case 'e': {
			char *end;
			errno = 0;
			unsigned long n = strtoul(optarg, &end, 10);
			if (errno || end == optarg || *end || n > 65536) {
				fprintf(stderr, "qublk nbd: --shared: '%s' is not a number of clients\n", optarg);
				return EXIT_USAGE;
			}
			sopts.max_conns = n;
			break;
		}
		case 'T':
			tls_given = true;
			if (!strcmp(optarg, "require")) {
				sopts.tls = NBD_TLS_REQUIRE;
			} else if (!strcmp(optarg, "on")) {
				sopts.tls = NBD_TLS_ON;
			} else if (!strcmp(optarg, "off")) {
				sopts.tls = NBD_TLS_OFF;
			} else {
				fprintf(stderr, "qublk nbd: --tls: '%s' is not require, on or off\n", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'X':
			sopts.tls_creds_dir = optarg;
			break;
		case 'P':
			sopts.tls_psk_file = optarg;
			break;
		case 'V':
			sopts.tls_verify_peer = true;
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind != argc - 1) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if ((bopts.flags & BDRV_O_FORCE_SHARE) && !(bopts.flags & BDRV_O_RDONLY)) {
		fprintf(stderr, "qublk nbd: --force-share is only allowed with --read-only\n");
		return EXIT_USAGE;
	}
	if (sopts.tls_creds_dir && sopts.tls_psk_file) {
		fprintf(stderr, "qublk nbd: --tls-creds and --tls-psk exclude each other\n");
		return EXIT_USAGE;
	}
	if (sopts.tls_verify_peer && !sopts.tls_creds_dir) {
		fprintf(stderr, "qublk nbd: --tls-verify-peer needs --tls-creds\n");
		return EXIT_USAGE;
	}
	if (!tls_given && (sopts.tls_creds_dir || sopts.tls_psk_file))
		sopts.tls = NBD_TLS_REQUIRE;     /* as qemu-nbd --tls-creds */
	if (sopts.tls != NBD_TLS_OFF && !sopts.tls_creds_dir && !sopts.tls_psk_file) {
		fprintf(stderr, "qublk nbd: --tls=%s needs --tls-creds or --tls-psk\n",
			sopts.tls == NBD_TLS_ON ? "on" : "require");
		return EXIT_USAGE;
	}
	if (sopts.socket_path && (sopts.port || sopts.bind_addr)) {
		fprintf(stderr, "qublk nbd: --socket cannot be combined with --port or --bind\n");
		return EXIT_USAGE;
	}

	/* Only regular files and block devices are disks: a FIFO or a
	 * character device would serve a stream as a 0-byte export (and
	 * opening a FIFO blocks until a writer appears). */
	if (stat(argv[optind], &st) < 0) {
		log_error("%s: %s", argv[optind], strerror(errno));
		return EXIT_FAIL;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		log_error("%s: not a regular file or block device: refusing to serve it",
			  argv[optind]);
		return EXIT_FAIL;
	}

	ret = aio_ctx_init_flags(&ctx, NBD_RING_ENTRIES, AIO_CTX_DEFER_TASKRUN);
	if (ret < 0) {
		log_error("io_uring_queue_init: %s", strerror(-ret));
		return EXIT_FAIL;
	}
	aio_ctx_set_current(&ctx);
	ctx.spin_ns = (uint64_t)poll_us * 1000;

	ret = bdrv_open(argv[optind], &bopts, &bs);
	if (ret < 0)
		goto out;           /* bdrv_open logged the file and reason */
	if (bs->size == 0 && !allow_empty) {
		log_error("%s: image has size 0: refusing to serve it (--allow-empty to force)",
			  argv[optind]);
		goto out;
	}
	ret = nbd_server_open(bs, &sopts, &srv);
	if (ret < 0)
		goto out;
	ret = nbd_server_run(srv);
	if (ret == 0)
		rc = EXIT_OK;
out:
	nbd_server_close(srv);
	if (bdrv_close(bs) < 0)
		rc = EXIT_FAIL;    /* logged: metadata write-back failed */
	aio_ctx_deinit(&ctx);
	return rc;
}
