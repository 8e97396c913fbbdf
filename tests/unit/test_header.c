/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the qcow2 format layer: header validation (header.c),
 * header rewrite round trips, feature names, the snapshot table
 * (snapshot.c), decompression (compress.c) and creation (create.c).
 * Images are built in memory and served through an in-memory io_file.
 * Last line: "N passed, N failed"; exit status non-zero on failure.
 */
#include <stddef.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "common/io.h"
#include "common/io_mem.h"
#include "common/util.h"
#include "qcow2/format.h"

#include "check.h"



/* ---- a valid image: 4 KiB clusters, 1 GiB, v3 ---- */

#define CS 4096u

static void build_good(struct io_mem *m)
{
	io_mem_init(m, 4 * CS);
	uint8_t *b = m->data;
	put_be32(b + QCOW2_HDR_MAGIC, QCOW2_MAGIC);
	put_be32(b + QCOW2_HDR_VERSION, 3);
	put_be32(b + QCOW2_HDR_CLUSTER_BITS, 12);
	put_be64(b + QCOW2_HDR_SIZE, 1ull << 30);
	put_be32(b + QCOW2_HDR_L1_SIZE, 512);           /* 1 GiB / (4 KiB * 512) */
	put_be64(b + QCOW2_HDR_L1_OFFSET, 3 * CS);
	put_be64(b + QCOW2_HDR_REFTABLE_OFFSET, CS);
	put_be32(b + QCOW2_HDR_REFTABLE_CLUSTERS, 1);
	put_be32(b + QCOW2_HDR_REFCOUNT_ORDER, 4);
	put_be32(b + QCOW2_HDR_HEADER_LENGTH, 112);
	put_be64(b + CS, 2 * CS);
	for (int i = 0; i < 4; i++)
		put_be16(b + 2 * CS + 2 * i, 1);
}

static int read_meta(struct io_mem *m, struct qcow2_meta *meta, char *err, size_t errlen)
{
	return qcow2_meta_read(&m->f, m->size, meta, err, errlen);
}

/* Expect a refusal whose message contains @needle. */
static void expect_bad(struct io_mem *m, const char *needle, const char *what)
{
	struct qcow2_meta meta;
	char err[256] = "";
	int ret = read_meta(m, &meta, err, sizeof(err));

	CHECK(ret == -EINVAL && strstr(err, needle), "%s: ret %d, err '%s' (want '%s')", what, ret,
	      err, needle);
	if (!ret)
		qcow2_meta_free(&meta);
	free(m->data);
}

static void test_good(void)
{
	struct io_mem m;
	struct qcow2_meta meta;
	char err[256] = "";

	build_good(&m);
	int ret = read_meta(&m, &meta, err, sizeof(err));
	CHECK(ret == 0, "good image refused: %s", err);
	if (!ret) {
		CHECK(meta.h.version == 3 && meta.h.cluster_bits == 12 && meta.h.l1_size == 512,
		      "fields");
		CHECK(meta.h.header_length == 112 && meta.n_exts == 0 && !meta.backing_file,
		      "exts/backing");
		qcow2_meta_free(&meta);
		qcow2_meta_free(&meta);   /* safe twice */
	}
	free(m.data);

	/* v2: fixed 72-byte header, refcount order 4 */
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_VERSION, 2);
	memset(m.data + 72, 0, 40);
	ret = read_meta(&m, &meta, err, sizeof(err));
	CHECK(ret == 0 && meta.h.header_length == 72 && meta.h.refcount_order == 4, "v2: %s", err);
	if (!ret)
		qcow2_meta_free(&meta);
	free(m.data);

	/* zero-size image: no L1 at all, offset 0 */
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_SIZE, 0);
	put_be32(m.data + QCOW2_HDR_L1_SIZE, 0);
	put_be64(m.data + QCOW2_HDR_L1_OFFSET, 0);
	ret = read_meta(&m, &meta, err, sizeof(err));
	CHECK(ret == 0, "zero size: %s", err);
	if (!ret)
		qcow2_meta_free(&meta);
	free(m.data);
}

static void test_bad(void)
{
	struct io_mem m;

	build_good(&m);
	m.size = 71;
	expect_bad(&m, "too short", "truncated to 71");
	build_good(&m);
	m.size = 100;
	expect_bad(&m, "too short", "v3 truncated to 100");
	build_good(&m);
	m.size = 3 * CS + 100;   /* L1 runs past EOF */
	expect_bad(&m, "l1_table at", "truncated L1");
	build_good(&m);
	put_be32(m.data, 0x12345678);
	expect_bad(&m, "magic", "magic");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_VERSION, 4);
	expect_bad(&m, "version 4", "version");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_CLUSTER_BITS, 8);
	expect_bad(&m, "cluster_bits 8", "cluster_bits low");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_CLUSTER_BITS, 22);
	expect_bad(&m, "cluster_bits 22", "cluster_bits high");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_HEADER_LENGTH, 100);
	expect_bad(&m, "header_length 100", "header_length short");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_HEADER_LENGTH, 113);
	expect_bad(&m, "multiple of 8", "header_length odd");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_HEADER_LENGTH, 2 * CS);
	expect_bad(&m, "exceeds the cluster size", "header_length huge");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_CRYPT_METHOD, 2);
	expect_bad(&m, "encrypted", "crypt");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_REFCOUNT_ORDER, 7);
	expect_bad(&m, "refcount_order 7", "refcount order");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_L1_OFFSET, 3 * CS + 512);
	expect_bad(&m, "l1_table offset 0x3200 is not cluster aligned", "l1 unaligned");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_L1_OFFSET, 0xfffffffffffff000ull);
	expect_bad(&m, "beyond the end", "l1 overflow");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_L1_OFFSET, 0);
	expect_bad(&m, "overlaps the image header", "l1 at 0");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_L1_SIZE, 0xffffffffu);
	expect_bad(&m, "exceeds the maximum", "huge l1_size");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_L1_SIZE, 511);
	expect_bad(&m, "too small", "small l1_size");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_SIZE, UINT64_MAX);
	expect_bad(&m, "too large", "huge virtual size");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_REFTABLE_OFFSET, 7 * CS);
	expect_bad(&m, "refcount_table at", "reftable beyond EOF");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_REFTABLE_CLUSTERS, 0x100000);
	expect_bad(&m, "refcount table too large", "reftable huge");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_REFTABLE_CLUSTERS, 0);
	expect_bad(&m, "refcount_table_clusters is 0", "reftable empty");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_NB_SNAPSHOTS, 70000);
	expect_bad(&m, "too many snapshots", "nb_snapshots");
	build_good(&m);
	put_be32(m.data + QCOW2_HDR_NB_SNAPSHOTS, 1);
	put_be64(m.data + QCOW2_HDR_SNAPSHOTS_OFFSET, 100);
	expect_bad(&m, "snapshot table offset 0x64", "snapshots unaligned");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_BACKING_OFFSET, 200);
	put_be32(m.data + QCOW2_HDR_BACKING_SIZE, 1024);
	expect_bad(&m, "backing file name length 1024", "overlong backing name");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_BACKING_OFFSET, CS - 4);
	put_be32(m.data + QCOW2_HDR_BACKING_SIZE, 10);
	expect_bad(&m, "outside cluster 0", "backing name past cluster 0");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_BACKING_OFFSET, 0xffffffffffffff00ull);
	put_be32(m.data + QCOW2_HDR_BACKING_SIZE, 0x200);
	expect_bad(&m, "outside cluster 0", "backing offset overflow");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_BACKING_OFFSET, 50);
	put_be32(m.data + QCOW2_HDR_BACKING_SIZE, 5);
	expect_bad(&m, "overlaps the header", "backing name in header");
	build_good(&m);
	put_be32(m.data + 112, 0x11223344);
	put_be32(m.data + 116, CS);
	expect_bad(&m, "exceeds cluster 0", "extension too long");
	build_good(&m);
	put_be32(m.data + 112, QCOW2_EXT_BACKING_FORMAT);
	put_be32(m.data + 116, 40);
	expect_bad(&m, "backing format extension too long", "backing format too long");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_BACKING_OFFSET, 200);
	put_be32(m.data + QCOW2_HDR_BACKING_SIZE, 4);
	put_be32(m.data + 112, 0x11223344);
	put_be32(m.data + 116, 81);       /* 8 + 81 > 200 - 112 */
	expect_bad(&m, "exceeds cluster 0", "extension over the backing name");
	build_good(&m);
	m.data[QCOW2_HDR_COMPRESSION_TYPE] = 1;
	expect_bad(&m, "not set for zstd", "zstd without bit");
	build_good(&m);
	put_be64(m.data + QCOW2_HDR_INCOMPAT, QCOW2_INCOMPAT_COMPRESSION);
	expect_bad(&m, "set with zlib", "bit with zlib");
	build_good(&m);
	m.data[QCOW2_HDR_COMPRESSION_TYPE] = 9;
	expect_bad(&m, "unknown compression type 9", "compression type 9");
}

static void test_roundtrip(void)
{
	struct io_mem m;
	struct qcow2_meta a, b;
	char err[256] = "";
	static const uint8_t unk[5] = { 1, 2, 3, 4, 5 };
	static const uint8_t unk2[16] = { 9, 8, 7, 6, 5, 4, 3, 2, 1 };

	build_good(&m);
	uint8_t *h = m.data;
	/* header_length 120: 8 unknown header bytes; compat bit 5 unknown */
	put_be32(h + QCOW2_HDR_HEADER_LENGTH, 120);
	memcpy(h + 112, "UNKNOWN!", 8);
	put_be64(h + QCOW2_HDR_COMPAT, (1ull << 5) | QCOW2_COMPAT_LAZY_REFCOUNTS);
	put_be64(h + QCOW2_HDR_INCOMPAT, (1ull << 10) | QCOW2_INCOMPAT_DIRTY);
	uint8_t *p = h + 120;
	put_be32(p, 0xdeadbeef); put_be32(p + 4, 5); memcpy(p + 8, unk, 5); p += 16;
	put_be32(p, QCOW2_EXT_BACKING_FORMAT); put_be32(p + 4, 5); memcpy(p + 8, "qcow2", 5); p += 16;
	put_be32(p, QCOW2_EXT_FEATURE_TABLE); put_be32(p + 4, 48);
	p[8] = 0; p[9] = 10; memcpy(p + 10, "future thing", 12); p += 56;
	put_be32(p, 0xcafe0001); put_be32(p + 4, 16); memcpy(p + 8, unk2, 16); p += 24;
	p += 8; /* END */
	put_be64(h + QCOW2_HDR_BACKING_OFFSET, (uint64_t)(p - h));
	put_be32(h + QCOW2_HDR_BACKING_SIZE, 8);
	memcpy(p, "base.img", 8);

	int ret = read_meta(&m, &a, err, sizeof(err));
	CHECK(ret == 0, "roundtrip source refused: %s", err);
	if (ret) {
		free(m.data);
		return;
	}
	CHECK(a.n_exts == 4 && a.exts[0].type == 0xdeadbeef && a.exts[3].type == 0xcafe0001,
	      "exts kept in order (n=%u)", a.n_exts);
	CHECK(a.backing_file && !strcmp(a.backing_file, "base.img"), "backing name");
	CHECK(a.backing_format && !strcmp(a.backing_format, "qcow2"), "backing format");
	CHECK(a.unknown_hdr_len == 8 && !memcmp(a.unknown_hdr, "UNKNOWN!", 8), "unknown header");

	char names[256];
	qcow2_feature_names(&a, 0, a.h.incompat, names, sizeof(names));
	CHECK(!strcmp(names, "dirty, future thing"), "incompat names '%s'", names);
	qcow2_feature_names(&a, 1, a.h.compat, names, sizeof(names));
	CHECK(!strcmp(names, "lazy refcounts, bit 5"), "compat names '%s'", names);
	qcow2_feature_names(NULL, 2, 3, names, sizeof(names));
	CHECK(!strcmp(names, "bitmaps, raw external data"), "autoclear names '%s'", names);
	qcow2_feature_names(NULL, 0, 1ull << 63, names, 6);
	CHECK(strlen(names) < 6, "truncated names");

	/* Rewrite into a fresh file, changing the backing name. */
	struct io_mem out;
	io_mem_init(&out, 4 * CS);
	memcpy(out.data + CS, m.data + CS, 3 * CS);
	free(a.backing_file);
	a.backing_file = strdup("a/much/longer/backing/name.qcow2");
	ret = qcow2_meta_write(&out.f, &a);
	CHECK(ret == 0, "meta_write %d", ret);
	ret = read_meta(&out, &b, err, sizeof(err));
	CHECK(ret == 0, "rewritten header refused: %s", err);
	if (!ret) {
		CHECK(b.h.header_length == 120 && b.unknown_hdr_len == 8 &&
		      !memcmp(b.unknown_hdr, "UNKNOWN!", 8), "unknown header kept");
		CHECK(b.n_exts == a.n_exts, "ext count %u vs %u", b.n_exts, a.n_exts);
		for (unsigned i = 0; i < a.n_exts && i < b.n_exts; i++)
			CHECK(a.exts[i].type == b.exts[i].type && a.exts[i].len == b.exts[i].len &&
			      !memcmp(a.exts[i].data, b.exts[i].data, a.exts[i].len), "ext %u", i);
		CHECK(!strcmp(b.backing_file, "a/much/longer/backing/name.qcow2"), "new backing");
		CHECK(!strcmp(b.backing_format, "qcow2"), "backing format kept");
		CHECK(b.h.compat == a.h.compat && b.h.incompat == a.h.incompat &&
		      b.h.l1_offset == a.h.l1_offset && b.h.size == a.h.size, "fixed fields");
		qcow2_meta_free(&b);
	}

	/* Dropping the backing file removes name and format. */
	free(a.backing_file);
	free(a.backing_format);
	a.backing_file = a.backing_format = NULL;
	ret = qcow2_meta_write(&out.f, &a);
	ret = ret ? ret : read_meta(&out, &b, err, sizeof(err));
	CHECK(ret == 0 && !b.backing_file && !b.backing_format && b.n_exts == 3,
	      "no backing: %d %s", ret, err);
	if (!ret)
		qcow2_meta_free(&b);

	/* Too much for one cluster: -EFBIG. */
	struct qcow2_ext big = { 0x77, CS, calloc(1, CS) };
	struct qcow2_ext *saved = a.exts;
	unsigned saved_n = a.n_exts;
	a.exts = &big;
	a.n_exts = 1;
	CHECK(qcow2_meta_write(&out.f, &a) == -EFBIG, "oversized header");
	a.exts = saved;
	a.n_exts = saved_n;
	free(big.data);

	/* v2 round trip keeps extensions too. */
	a.h.version = 2;
	a.h.incompat = a.h.compat = 0;
	free(a.unknown_hdr);
	a.unknown_hdr = NULL;
	a.unknown_hdr_len = 0;
	ret = qcow2_meta_write(&out.f, &a);
	ret = ret ? ret : read_meta(&out, &b, err, sizeof(err));
	CHECK(ret == 0 && b.h.version == 2 && b.n_exts == 3, "v2 rewrite: %d %s", ret, err);
	if (!ret)
		qcow2_meta_free(&b);

	qcow2_meta_free(&a);
	free(out.data);
	free(m.data);
}

static void put_snapshot(uint8_t *p, uint64_t l1, uint32_t l1n, const char *id, const char *name,
			 uint32_t extra, uint64_t disk_size, size_t *len)
{
	memset(p, 0, 64);
	put_be64(p + QCOW2_SNAP_L1_OFFSET, l1);
	put_be32(p + QCOW2_SNAP_L1_SIZE, l1n);
	put_be16(p + QCOW2_SNAP_ID_SIZE, (uint16_t)strlen(id));
	put_be16(p + QCOW2_SNAP_NAME_SIZE, (uint16_t)strlen(name));
	put_be32(p + QCOW2_SNAP_DATE_SEC, 1700000000);
	put_be64(p + QCOW2_SNAP_VM_CLOCK_NSEC, 1234567890);
	put_be32(p + QCOW2_SNAP_VM_STATE_SIZE, 77);
	put_be32(p + QCOW2_SNAP_EXTRA_SIZE, extra);
	uint8_t *x = p + QCOW2_SNAP_FIXED_LEN;
	memset(x, 0, extra);
	if (extra >= 16) {
		put_be64(x, 1ull << 33);
		put_be64(x + 8, disk_size);
	}
	memcpy(x + extra, id, strlen(id));
	memcpy(x + extra + strlen(id), name, strlen(name));
	*len = ALIGN_UP(QCOW2_SNAP_FIXED_LEN + extra + strlen(id) + strlen(name), 8);
}

static void test_snapshots(void)
{
	struct io_mem m;
	struct qcow2_meta meta;
	struct qcow2_snapshot *s;
	char err[256] = "";
	size_t l1, l2;

	build_good(&m);
	uint8_t *more = realloc(m.data, 6 * CS);
	memset(more + 4 * CS, 0, 2 * CS);
	m.data = more;
	m.size = 6 * CS;
	put_be32(m.data + QCOW2_HDR_NB_SNAPSHOTS, 2);
	put_be64(m.data + QCOW2_HDR_SNAPSHOTS_OFFSET, 4 * CS);
	put_snapshot(m.data + 4 * CS, 5 * CS, 512, "1", "first", 16, 1ull << 29, &l1);
	put_snapshot(m.data + 4 * CS + l1, 3 * CS, 512, "2", "second", 0, 0, &l2);
	int ret = read_meta(&m, &meta, err, sizeof(err));
	CHECK(ret == 0, "snapshot image: %s", err);
	if (ret)
		goto out;
	ret = qcow2_snapshots_read(&m.f, &meta.h, m.size, &s, err, sizeof(err));
	CHECK(ret == 0, "snapshots_read: %s", err);
	if (!ret) {
		CHECK(!strcmp(s[0].name, "first") && !strcmp(s[1].id, "2") &&
		      !strcmp(s[1].name, "second"), "names");
		CHECK(s[0].vm_state_size == (1ull << 33) && s[1].vm_state_size == 77, "vm state");
		CHECK(s[0].disk_size == (1ull << 29) && s[1].disk_size == (1ull << 30), "disk size");
		CHECK(s[0].vm_clock_nsec == 1234567890 && s[0].date_sec == 1700000000, "clock");
		qcow2_snapshots_free(s, 2);
	}
	/* L1 of a snapshot not aligned */
	put_be64(m.data + 4 * CS, 5 * CS + 8);
	ret = qcow2_snapshots_read(&m.f, &meta.h, m.size, &s, err, sizeof(err));
	CHECK(ret == -EINVAL && strstr(err, "snapshot 0: L1"), "unaligned snapshot L1: %s", err);
	put_be64(m.data + 4 * CS, 5 * CS);
	/* L1 of a snapshot past EOF */
	put_be32(m.data + 4 * CS + 8, 4096);
	ret = qcow2_snapshots_read(&m.f, &meta.h, m.size, &s, err, sizeof(err));
	CHECK(ret == -EINVAL && strstr(err, "snapshot 0: L1"), "snapshot L1 past EOF: %s", err);
	put_be32(m.data + 4 * CS + 8, 512);
	/* second entry's name runs out of the file */
	put_be16(m.data + 4 * CS + l1 + QCOW2_SNAP_NAME_SIZE, 60000);
	ret = qcow2_snapshots_read(&m.f, &meta.h, m.size, &s, err, sizeof(err));
	CHECK(ret == -EINVAL && strstr(err, "snapshot 1: entry extends"), "entry past EOF: %s", err);
	/* too much extra data */
	put_be16(m.data + 4 * CS + l1 + QCOW2_SNAP_NAME_SIZE, 6);
	put_be32(m.data + 4 * CS + QCOW2_SNAP_EXTRA_SIZE, 5000);
	ret = qcow2_snapshots_read(&m.f, &meta.h, m.size, &s, err, sizeof(err));
	CHECK(ret == -EINVAL && strstr(err, "extra data"), "extra: %s", err);
	qcow2_meta_free(&meta);
out:
	free(m.data);
}

static void test_decompress(void)
{
	enum { N = 65536 };
	uint8_t *src = malloc(N), *comp = malloc(2 * N), *dst = malloc(2 * N);
	z_stream zs;

	for (int i = 0; i < N; i++)
		src[i] = (uint8_t)((i * 7) ^ (i >> 9));
	/* zlib: raw deflate, windowBits -12, padded with garbage */
	memset(&zs, 0, sizeof(zs));
	deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY);
	zs.next_in = src;
	zs.avail_in = N;
	zs.next_out = comp;
	zs.avail_out = 2 * N;
	CHECK(deflate(&zs, Z_FINISH) == Z_STREAM_END, "deflate");
	size_t clen = zs.total_out;
	deflateEnd(&zs);
	memset(comp + clen, 0xa5, 512);
	for (int round = 0; round < 3; round++) {   /* context reuse */
		memset(dst, 0, N);
		CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, clen + 300, dst, N) == 0 &&
		      !memcmp(dst, src, N), "zlib round %d", round);
	}
	CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, clen / 2, dst, N) == -EIO,
	      "zlib truncated");
	CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, clen, dst, N + 100) == -EIO,
	      "zlib short output");
	memset(comp, 0xff, 64);
	CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZLIB, comp, clen, dst, N) == -EIO, "zlib garbage");

	/* zstd: one frame, padded */
	clen = ZSTD_compress(comp, 2 * N, src, N, 3);
	CHECK(!ZSTD_isError(clen), "zstd compress");
	memset(comp + clen, 0x5a, 512);
	for (int round = 0; round < 3; round++) {
		memset(dst, 0, N);
		CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp, clen + 511, dst, N) == 0 &&
		      !memcmp(dst, src, N), "zstd round %d", round);
	}
	CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp, clen - 10, dst, N) == -EIO,
	      "zstd truncated");
	CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp, clen, dst, N + 4096) == -EIO,
	      "zstd short output");
	CHECK(qcow2_decompress(QCOW2_COMPRESSION_ZSTD, comp, clen, dst, N - 4096) == -EIO,
	      "zstd long output");
	CHECK(qcow2_decompress(7, comp, clen, dst, N) == -EIO, "unknown type");
	free(src);
	free(comp);
	free(dst);
}

/* Created images must pass our own validation. */
static void test_create(void)
{
	char path[] = "/tmp/qublk-test-header-XXXXXX";
	int fd = mkstemp(path);
	char err[256] = "";

	CHECK(fd >= 0, "mkstemp");
	if (fd < 0)
		return;
	close(fd);
	static const struct { uint32_t cs, ver, rb; int pre; uint64_t size; } cases[] = {
		{ 65536, 3, 16, QCOW2_PREALLOC_OFF, 1ull << 30 },
		{ 512, 3, 1, QCOW2_PREALLOC_METADATA, 4 << 20 },
		{ 512, 2, 16, QCOW2_PREALLOC_OFF, 100ull << 30 },
		{ 2 << 20, 3, 64, QCOW2_PREALLOC_METADATA, 64 << 20 },
		{ 4096, 3, 2, QCOW2_PREALLOC_OFF, 0 },
	};
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct qcow2_create_opts o = {
			.size = cases[i].size, .cluster_size = cases[i].cs, .version = cases[i].ver,
			.refcount_bits = cases[i].rb, .prealloc = cases[i].pre,
		};
		int ret = qcow2_create(path, &o, err, sizeof(err));
		CHECK(ret == 0, "create case %zu: %s", i, err);
		struct io_file *f;
		uint64_t size;
		if (ret || io_file_open(path, IO_OPEN_RDONLY, &f))
			continue;
		struct qcow2_meta meta;
		io_get_size(f, &size);
		ret = qcow2_meta_read(f, size, &meta, err, sizeof(err));
		CHECK(ret == 0 && meta.h.size == cases[i].size &&
		      meta.h.refcount_order == (uint32_t)__builtin_ctz(cases[i].rb),
		      "created case %zu reads back: %s", i, err);
		if (!ret)
			qcow2_meta_free(&meta);
		io_file_close(f);
	}
	struct qcow2_create_opts o = { .size = 4ull << 40, .cluster_size = 512 };
	CHECK(qcow2_create(path, &o, err, sizeof(err)) == -EFBIG && strstr(err, "too large"),
	      "4T at 512: %s", err);
	/* Extended L2: the incompatible bit is set and the entries are 16 bytes;
	 * v2 and clusters below 16 KiB cannot carry it. */
	o = (struct qcow2_create_opts){ .size = 1 << 20, .extended_l2 = true };
	int ret = qcow2_create(path, &o, err, sizeof(err));
	CHECK(ret == 0, "extended_l2: %s", err);
	struct io_file *f;
	uint64_t size;
	if (!ret && !io_file_open(path, IO_OPEN_RDONLY, &f)) {
		struct qcow2_meta meta;
		io_get_size(f, &size);
		ret = qcow2_meta_read(f, size, &meta, err, sizeof(err));
		CHECK(ret == 0 && (meta.h.incompat & QCOW2_INCOMPAT_EXTL2),
		      "extended_l2 reads back with the bit: %s", err);
		if (!ret)
			qcow2_meta_free(&meta);
		io_file_close(f);
	}
	o = (struct qcow2_create_opts){ .size = 1 << 20, .extended_l2 = true, .version = 2 };
	CHECK(qcow2_create(path, &o, err, sizeof(err)) < 0, "extended_l2 on v2");
	o = (struct qcow2_create_opts){ .size = 1 << 20, .extended_l2 = true, .cluster_size = 4096 };
	CHECK(qcow2_create(path, &o, err, sizeof(err)) < 0, "extended_l2 at 4k clusters");
	o = (struct qcow2_create_opts){ .size = 1 << 20, .version = 2, .refcount_bits = 8 };
	CHECK(qcow2_create(path, &o, err, sizeof(err)) == -EINVAL, "v2 refcount_bits 8");
	unlink(path);
}

int main(void)
{
	test_good();
	test_bad();
	test_roundtrip();
	test_snapshots();
	test_decompress();
	test_create();
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
