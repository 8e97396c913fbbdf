/* SPDX-License-Identifier: MIT */
/*
 * qublk info: describe an image (and optionally its backing chain) in
 * qemu-img's words, as text or JSON.  Read-only, single-threaded tool
 * code; never writes to any image.
 *
 * Everything shown comes from qcow2_meta_read()/qcow2_snapshots_read(),
 * which validate all offsets, so a malformed image is reported (exit 1),
 * never trusted.  Strings from the image are escaped on output.
 * The chain walk resolves relative backing names against the directory
 * of the image naming them and refuses loops (same device and inode
 * seen twice) and chains deeper than MAX_CHAIN.
 *
 * Encrypted images (qcow2.rst "Header": crypt_method; "Full disk
 * encryption header pointer") are described without opening their
 * payload: for LUKS, the LUKS1 header the crypto header extension points
 * at is read for its cipher, hash, key slots and offsets (cryptsetup's
 * LUKS1 on-disk format), as qemu-img info shows them.
 *
 * Each file is locked while it is read as QEMU's `qemu-img info -U`
 * (force-share) locks it: "consistent read" only, everything shared, so
 * info works on an image a VM or server writes (and may then show
 * metadata in mid-update, as qemu-img does).
 */
#include <stddef.h>

#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "block/lock.h"
#include "cli/cli.h"
#include "common/io.h"
#include "common/util.h"
#include "qcow2/format.h"

#define MAX_CHAIN 64

/* LUKS1 on-disk header (big-endian), the part qemu-img info shows. */
#define LUKS_HDR_LEN 592
#define LUKS_SLOTS 8
#define LUKS_SLOT_ACTIVE 0x00ac71f3u

struct luks_info {
	char cipher_alg[48], cipher_mode[32], ivgen_alg[32], ivgen_hash[32], hash_alg[32];
	char uuid[41];
	uint64_t payload_offset;
	uint32_t mk_iters;
	struct {
		bool active;
		uint32_t iters, stripes;
		uint64_t key_offset;
	} slot[LUKS_SLOTS];
};

struct layer {
	char *path;                 /* as opened */
	const char *format;         /* "qcow2" or "raw" */
	uint64_t virtual_size, file_size, disk_size;
	dev_t dev;
	ino_t ino;
	bool is_qcow2;
	struct qcow2_meta m;
	struct qcow2_snapshot *snaps;
	uint32_t n_snaps;
	struct qcow2_bitmap *bms;   /* persistent bitmaps (autoclear bit set) */
	uint32_t n_bms;
	char *backing_path;         /* host path of the backing file, or NULL */
	bool luks;                  /* crypt_method LUKS: @lk is filled */
	struct luks_info lk;
};

static void layer_free(struct layer *l)
{
	free(l->path);
	free(l->backing_path);
	qcow2_snapshots_free(l->snaps, l->n_snaps);
	qcow2_bitmaps_free(l->bms, l->n_bms);
	qcow2_meta_free(&l->m);
	memset(l, 0, sizeof(*l));
}

static char *resolve(const char *image, const char *name)
{
	char *copy, *out = NULL;

	if (name[0] == '/')
		return strdup(name);
	copy = strdup(image);
	if (!copy)
		return NULL;
	const char *dir = dirname(copy);
	if (!strcmp(dir, "."))
		out = strdup(name);     /* keep "b.qcow2" rather than "./b.qcow2" */
	else if (asprintf(&out, "%s/%s", dir, name) < 0)
		out = NULL;
	free(copy);
	return out;
}

/* Copy a NUL-padded string field of @len bytes, printable only. */
static void luks_str(char *out, size_t outlen, const uint8_t *p, size_t len)
{
	size_t n = 0;

	for (size_t i = 0; i < len && p[i] && n + 1 < outlen; i++)
		out[n++] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
	out[n] = '\0';
}

/* Read the LUKS1 header the crypto header extension of @m points at.
 * Returns -errno with @err set. */
static int luks_read(struct io_file *f, const struct qcow2_meta *m, uint64_t file_size,
		     struct luks_info *lk, char *err, size_t errlen)
{
	const struct qcow2_ext *e = NULL;
	uint8_t h[LUKS_HDR_LEN];
	uint64_t off, len, end;
	char name[32], mode[32];

	for (unsigned i = 0; i < m->n_exts; i++)
		if (m->exts[i].type == QCOW2_EXT_CRYPTO)
			e = &m->exts[i];
	if (!e || e->len < 16) {
		snprintf(err, errlen, "LUKS-encrypted image without a valid crypto header extension");
		return -EINVAL;
	}
	/* "Full disk encryption header pointer": offset, length (bytes) */
	off = get_be64(e->data);
	len = get_be64(e->data + 8);
	if (!IS_ALIGNED(off, 1ull << m->h.cluster_bits) || off == 0 || len < LUKS_HDR_LEN ||
	    ckd_add(&end, off, len) || end > file_size) {
		snprintf(err, errlen, "LUKS header at 0x%llx (%llu bytes) is invalid",
			 (unsigned long long)off, (unsigned long long)len);
		return -EINVAL;
	}
	int ret = io_pread(f, h, sizeof(h), off);
	if (ret) {
		snprintf(err, errlen, "reading the LUKS header: %s", strerror(-ret));
		return ret;
	}
	if (memcmp(h, "LUKS\xba\xbe", 6) || get_be16(h + 6) != 1) {
		snprintf(err, errlen, "no LUKS1 header at 0x%llx", (unsigned long long)off);
		return -EINVAL;
	}
	/* magic 6, version 2, cipher_name 32, cipher_mode 32, hash_spec 32,
	 * payload_offset 4 (sectors), key_bytes 4, mk_digest 20, salt 32,
	 * mk_digest_iter 4, uuid 40, then 8 slots of 48 bytes: active 4,
	 * iterations 4, salt 32, key_material_offset 4 (sectors), stripes 4. */
	luks_str(name, sizeof(name), h + 8, 32);
	luks_str(mode, sizeof(mode), h + 40, 32);
	luks_str(lk->hash_alg, sizeof(lk->hash_alg), h + 72, 32);
	lk->payload_offset = (uint64_t)get_be32(h + 104) * 512;
	uint32_t key_bytes = get_be32(h + 108);
	lk->mk_iters = get_be32(h + 164);
	luks_str(lk->uuid, sizeof(lk->uuid), h + 168, 40);
	for (unsigned i = 0; i < LUKS_SLOTS; i++) {
		const uint8_t *sl = h + 208 + 48 * i;
		lk->slot[i].active = get_be32(sl) == LUKS_SLOT_ACTIVE;
		lk->slot[i].iters = get_be32(sl + 4);
		lk->slot[i].key_offset = (uint64_t)get_be32(sl + 40) * 512;
		lk->slot[i].stripes = get_be32(sl + 44);
	}
	/* cipher_mode is "MODE-IVGEN[:HASH]"; XTS splits the key in two. */
	char *dash = strchr(mode, '-'), *colon;
	lk->ivgen_alg[0] = lk->ivgen_hash[0] = '\0';
	if (dash) {
		*dash = '\0';
		colon = strchr(dash + 1, ':');
		if (colon) {
			*colon = '\0';
			snprintf(lk->ivgen_hash, sizeof(lk->ivgen_hash), "%s", colon + 1);
		}
		snprintf(lk->ivgen_alg, sizeof(lk->ivgen_alg), "%s", dash + 1);
	}
	snprintf(lk->cipher_mode, sizeof(lk->cipher_mode), "%s", mode);
	uint32_t bits = key_bytes * 8 / (!strcmp(mode, "xts") ? 2 : 1);
	if (!strcmp(name, "sm4"))
		snprintf(lk->cipher_alg, sizeof(lk->cipher_alg), "sm4");
	else
		snprintf(lk->cipher_alg, sizeof(lk->cipher_alg), "%s-%u", name, bits);
	return 0;
}

/* Open and parse one image.  @fmt: "qcow2", "raw" or NULL to probe by
 * magic.  On failure prints "FILE: reason" and returns -errno. */
static int layer_open(const char *path, const char *fmt, struct layer *l)
{
	struct io_file *f = NULL;
	struct stat st;
	uint8_t magic[4] = { 0 };
	char err[512] = "";
	unsigned perm, shared;
	int ret;

	memset(l, 0, sizeof(*l));
	l->path = strdup(path);
	if (!l->path)
		return -ENOMEM;
	ret = io_file_open(path, IO_OPEN_RDONLY, &f);
	if (ret) {
		log_error("%s: %s", path, strerror(-ret));
		return ret;
	}
	lock_perms(true, true, &perm, &shared);
	ret = lock_take(f->fd, path, perm, shared);
	if (ret)
		goto out;           /* logged */
	if (fstat(f->fd, &st) < 0) {
		ret = -errno;
		log_error("%s: stat: %s", path, strerror(-ret));
		goto out;
	}
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	l->disk_size = (uint64_t)st.st_blocks * 512;
	ret = io_get_size(f, &l->file_size);
	if (!ret && l->file_size >= 4)
		ret = io_pread(f, magic, sizeof(magic), 0);
	if (ret) {
		log_error("%s: reading: %s", path, strerror(-ret));
		goto out;
	}
	if (!fmt)
		fmt = get_be32(magic) == QCOW2_MAGIC ? "qcow2" : "raw";
	if (!strcmp(fmt, "raw")) {
		l->format = "raw";
		l->virtual_size = l->file_size;
		goto out;
	}
	if (strcmp(fmt, "qcow2")) {
		log_error("%s: unknown format '%s'", path, fmt);
		ret = -ENOTSUP;
		goto out;
	}
	l->format = "qcow2";
	l->is_qcow2 = true;
	ret = qcow2_meta_read_flags(f, l->file_size, QCOW2_META_ALLOW_CRYPT, &l->m, err,
				    sizeof(err));
	if (ret) {
		log_error("%s: %s", path, err[0] ? err : strerror(-ret));
		goto out;
	}
	if (l->m.h.crypt_method == QCOW2_CRYPT_LUKS) {
		ret = luks_read(f, &l->m, l->file_size, &l->lk, err, sizeof(err));
		if (ret) {
			log_error("%s: %s", path, err);
			goto out;
		}
		l->luks = true;
	}
	uint64_t unknown = l->m.h.incompat & ~QCOW2_INCOMPAT_KNOWN;
	if (unknown) {
		char names[512];
		qcow2_feature_names(&l->m, 0, unknown, names, sizeof(names));
		log_error("%s: unsupported qcow2 incompatible feature(s): %s", path, names);
		ret = -ENOTSUP;
		goto out;
	}
	l->virtual_size = l->m.h.size;
	ret = qcow2_snapshots_read(f, &l->m.h, l->file_size, &l->snaps, err, sizeof(err));
	if (ret) {
		log_error("%s: %s", path, err[0] ? err : strerror(-ret));
		goto out;
	}
	l->n_snaps = l->m.h.nb_snapshots;
	/* As QEMU: the bitmaps extension counts only with its autoclear bit
	 * (another program may have changed the image without knowing it). */
	if (l->m.h.autoclear & QCOW2_AUTOCLEAR_BITMAPS) {
		ret = qcow2_bitmaps_read(f, &l->m, l->file_size, &l->bms, &l->n_bms, err,
					 sizeof(err));
		if (ret) {
			log_error("%s: %s", path, err[0] ? err : strerror(-ret));
			goto out;
		}
	}
	if (l->m.backing_file) {
		l->backing_path = resolve(path, l->m.backing_file);
		if (!l->backing_path)
			ret = -ENOMEM;
	}
out:
	io_file_close(f);
	return ret;
}

/* ---- output helpers ---- */

static void json_str(FILE *o, const char *s)
{
	fputc('"', o);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(o, "\\%c", *p);
		else if (*p < 0x20 || *p >= 0x7f)
			fprintf(o, "\\u%04x", *p);   /* bytes from the image: no UTF-8 trust */
		else
			fputc(*p, o);
	}
	fputc('"', o);
}

/* Printable copy for text output: control bytes become '?'. */
static void text_str(FILE *o, const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		fputc(*p < 0x20 || *p == 0x7f ? '?' : *p, o);
}

/* Printable, truncated copy of an image string for column output. */
static void sanitize(char *out, size_t len, const char *s)
{
	size_t n = 0;

	for (const unsigned char *p = (const unsigned char *)s; *p && n + 1 < len; p++)
		out[n++] = *p < 0x20 || *p == 0x7f ? '?' : (char)*p;
	out[n] = '\0';
}

static const char *human_size(uint64_t v, char *buf, size_t len)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	unsigned u = 0;
	double d = (double)v;

	while (d >= 1024 && u + 1 < ARRAY_SIZE(units)) {
		d /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%llu B", (unsigned long long)v);
	else if (d == (double)(uint64_t)d)
		snprintf(buf, len, "%llu %s", (unsigned long long)d, units[u]);
	else
		snprintf(buf, len, "%.3g %s", d, units[u]);
	return buf;
}

/* The snapshot table in qemu-img 7.2's columns (also `qublk snapshot -l`). */
void print_snapshot_list(FILE *o, const struct qcow2_snapshot *snaps, uint32_t n)
{
	char b1[64];

	fprintf(o, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
		"ICOUNT");
	for (uint32_t i = 0; i < n; i++) {
		const struct qcow2_snapshot *s = &snaps[i];
		char date[32] = "", icount[24] = "";
		time_t t = (time_t)s->date_sec;
		struct tm tm;
		if (localtime_r(&t, &tm))
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		uint64_t secs = s->vm_clock_nsec / 1000000000ull;
		char id[64], name[256];
		sanitize(id, sizeof(id), s->id);
		sanitize(name, sizeof(name), s->name);
		if (s->icount != UINT64_MAX)
			snprintf(icount, sizeof(icount), "%lld", (long long)s->icount);
		fprintf(o, "%-9s %-16s ", id, name);
		fprintf(o, "%8s %19s %02llu:%02llu:%02llu.%03llu %10s\n",
			human_size(s->vm_state_size, b1, sizeof(b1)), date,
			(unsigned long long)(secs / 3600), (unsigned long long)(secs / 60 % 60),
			(unsigned long long)(secs % 60),
			(unsigned long long)(s->vm_clock_nsec / 1000000 % 1000), icount);
	}
}

static const char *compat_str(const struct qcow2_header *h)
{
	return h->version == 2 ? "0.10" : "1.1";
}

static const char *compression_str(const struct qcow2_header *h)
{
	return h->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib";
}

/* A bitmap's flags as qemu-img info names them (the ones it knows). */
static const char *bitmap_flag(uint32_t flags, unsigned i)
{
	static const struct { uint32_t bit; const char *name; } names[] = {
		{ QCOW2_BME_IN_USE, "in-use" }, { QCOW2_BME_AUTO, "auto" },
	};
	unsigned n = 0;

	for (size_t k = 0; k < ARRAY_SIZE(names); k++)
		if ((flags & names[k].bit) && n++ == i)
			return names[k].name;
	return NULL;
}

static void print_bitmaps_text(FILE *o, const struct layer *l)
{
	const char *f;

	if (!l->n_bms)
		return;
	fprintf(o, "    bitmaps:\n");
	for (uint32_t i = 0; i < l->n_bms; i++) {
		const struct qcow2_bitmap *b = &l->bms[i];
		fprintf(o, "        [%u]:\n            flags:\n", i);
		for (unsigned k = 0; (f = bitmap_flag(b->flags, k)); k++)
			fprintf(o, "                [%u]: %s\n", k, f);
		fprintf(o, "            name: ");
		text_str(o, b->name);
		fprintf(o, "\n            granularity: %llu\n",
			(unsigned long long)(1ull << b->granularity_bits));
	}
}

static void print_bitmaps_json(FILE *o, const struct layer *l, const char *ind)
{
	const char *f;

	if (!l->n_bms)
		return;
	fprintf(o, "%s            \"bitmaps\": [", ind);
	for (uint32_t i = 0; i < l->n_bms; i++) {
		const struct qcow2_bitmap *b = &l->bms[i];
		fprintf(o, "%s\n%s                {\n%s                    \"flags\": [",
			i ? "," : "", ind, ind);
		for (unsigned k = 0; (f = bitmap_flag(b->flags, k)); k++)
			fprintf(o, "%s\n%s                        \"%s\"", k ? "," : "", ind, f);
		fprintf(o, "\n%s                    ],\n%s                    \"name\": ", ind, ind);
		json_str(o, b->name);
		fprintf(o, ",\n%s                    \"granularity\": %llu\n%s                }", ind,
			(unsigned long long)(1ull << b->granularity_bits), ind);
	}
	fprintf(o, "\n%s            ],\n", ind);
}

static void print_encrypt_text(FILE *o, const struct layer *l)
{
	const struct luks_info *k = &l->lk;

	fprintf(o, "    encrypt:\n");
	if (!l->luks) {
		fprintf(o, "        format: aes\n");
		return;
	}
	if (k->ivgen_alg[0])
		fprintf(o, "        ivgen alg: %s\n", k->ivgen_alg);
	if (k->ivgen_hash[0])
		fprintf(o, "        ivgen hash alg: %s\n", k->ivgen_hash);
	fprintf(o, "        hash alg: %s\n        cipher alg: %s\n        uuid: %s\n"
		   "        format: luks\n        cipher mode: %s\n        slots:\n",
		k->hash_alg, k->cipher_alg, k->uuid, k->cipher_mode);
	for (unsigned i = 0; i < LUKS_SLOTS; i++) {
		fprintf(o, "            [%u]:\n                active: %s\n", i,
			k->slot[i].active ? "true" : "false");
		if (k->slot[i].active)
			fprintf(o, "                iters: %u\n", k->slot[i].iters);
		fprintf(o, "                key offset: %llu\n",
			(unsigned long long)k->slot[i].key_offset);
		if (k->slot[i].active)
			fprintf(o, "                stripes: %u\n", k->slot[i].stripes);
	}
	fprintf(o, "        payload offset: %llu\n        master key iters: %u\n",
		(unsigned long long)k->payload_offset, k->mk_iters);
}

static void print_encrypt_json(FILE *o, const struct layer *l, const char *ind)
{
	const struct luks_info *k = &l->lk;

	fprintf(o, "%s            \"encrypt\": {\n", ind);
	if (!l->luks) {
		fprintf(o, "%s                \"format\": \"aes\"\n%s            },\n", ind, ind);
		return;
	}
	if (k->ivgen_alg[0]) {
		fprintf(o, "%s                \"ivgen-alg\": ", ind);
		json_str(o, k->ivgen_alg);
		fprintf(o, ",\n");
	}
	if (k->ivgen_hash[0]) {
		fprintf(o, "%s                \"ivgen-hash-alg\": ", ind);
		json_str(o, k->ivgen_hash);
		fprintf(o, ",\n");
	}
	fprintf(o, "%s                \"detached-header\": false,\n", ind);
	fprintf(o, "%s                \"hash-alg\": ", ind);
	json_str(o, k->hash_alg);
	fprintf(o, ",\n%s                \"cipher-alg\": ", ind);
	json_str(o, k->cipher_alg);
	fprintf(o, ",\n%s                \"uuid\": ", ind);
	json_str(o, k->uuid);
	fprintf(o, ",\n%s                \"format\": \"luks\",\n", ind);
	fprintf(o, "%s                \"cipher-mode\": ", ind);
	json_str(o, k->cipher_mode);
	fprintf(o, ",\n%s                \"slots\": [", ind);
	for (unsigned i = 0; i < LUKS_SLOTS; i++) {
		fprintf(o, "%s\n%s                    {\"active\": %s", i ? "," : "", ind,
			k->slot[i].active ? "true" : "false");
		if (k->slot[i].active)
			fprintf(o, ", \"iters\": %u", k->slot[i].iters);
		fprintf(o, ", \"key-offset\": %llu", (unsigned long long)k->slot[i].key_offset);
		if (k->slot[i].active)
			fprintf(o, ", \"stripes\": %u", k->slot[i].stripes);
		fprintf(o, "}");
	}
	fprintf(o, "\n%s                ],\n", ind);
	fprintf(o, "%s                \"payload-offset\": %llu,\n", ind,
		(unsigned long long)k->payload_offset);
	fprintf(o, "%s                \"master-key-iters\": %u\n%s            },\n", ind, k->mk_iters,
		ind);
}

static void print_text(FILE *o, const struct layer *l)
{
	char b1[64], names[512];
	const struct qcow2_header *h = &l->m.h;

	fprintf(o, "image: ");
	text_str(o, l->path);
	fprintf(o, "\nfile format: %s\n", l->format);
	fprintf(o, "virtual size: %s (%llu bytes)\n", human_size(l->virtual_size, b1, sizeof(b1)),
		(unsigned long long)l->virtual_size);
	fprintf(o, "disk size: %s\n", human_size(l->disk_size, b1, sizeof(b1)));
	if (!l->is_qcow2)
		return;
	if (h->crypt_method)
		fprintf(o, "encrypted: yes\n");
	fprintf(o, "cluster_size: %u\n", 1u << h->cluster_bits);
	if (l->m.backing_file) {
		fprintf(o, "backing file: ");
		text_str(o, l->m.backing_file);
		if (l->backing_path && strcmp(l->backing_path, l->m.backing_file)) {
			fprintf(o, " (actual path: ");
			text_str(o, l->backing_path);
			fprintf(o, ")");
		}
		fprintf(o, "\n");
		if (l->m.backing_format) {
			fprintf(o, "backing file format: ");
			text_str(o, l->m.backing_format);
			fprintf(o, "\n");
		}
	}
	if (l->n_snaps) {
		fprintf(o, "Snapshot list:\n");
		print_snapshot_list(o, l->snaps, l->n_snaps);
	}
	fprintf(o, "Format specific information:\n");
	fprintf(o, "    compat: %s\n", compat_str(h));
	fprintf(o, "    compression type: %s\n", compression_str(h));
	if (h->version >= 3)
		fprintf(o, "    lazy refcounts: %s\n",
			h->compat & QCOW2_COMPAT_LAZY_REFCOUNTS ? "true" : "false");
	print_bitmaps_text(o, l);
	fprintf(o, "    refcount bits: %u\n", 1u << h->refcount_order);
	if (h->crypt_method)
		print_encrypt_text(o, l);
	if (h->version >= 3) {
		fprintf(o, "    corrupt: %s\n", h->incompat & QCOW2_INCOMPAT_CORRUPT ? "true" : "false");
		fprintf(o, "    dirty: %s\n", h->incompat & QCOW2_INCOMPAT_DIRTY ? "true" : "false");
		fprintf(o, "    extended l2: %s\n", h->incompat & QCOW2_INCOMPAT_EXTL2 ? "true" : "false");
	}
	if (l->m.data_file) {
		fprintf(o, "    data file: ");
		text_str(o, l->m.data_file);
		fprintf(o, "\n    data file raw: %s\n",
			h->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW ? "true" : "false");
	}
	uint64_t uc = h->compat & ~QCOW2_COMPAT_LAZY_REFCOUNTS;
	uint64_t ua = h->autoclear & ~(QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW);
	if (uc) {
		qcow2_feature_names(&l->m, 1, uc, names, sizeof(names));
		fprintf(o, "    unknown compatible features: %s\n", names);
	}
	if (ua) {
		qcow2_feature_names(&l->m, 2, ua, names, sizeof(names));
		fprintf(o, "    unknown autoclear features: %s\n", names);
	}
}

static void print_json(FILE *o, const struct layer *l, const char *ind)
{
	const struct qcow2_header *h = &l->m.h;
	char names[512];

	fprintf(o, "%s{\n%s    \"filename\": ", ind, ind);
	json_str(o, l->path);
	fprintf(o, ",\n%s    \"format\": \"%s\",\n", ind, l->format);
	fprintf(o, "%s    \"virtual-size\": %llu,\n", ind, (unsigned long long)l->virtual_size);
	fprintf(o, "%s    \"actual-size\": %llu", ind, (unsigned long long)l->disk_size);
	if (!l->is_qcow2) {
		fprintf(o, "\n%s}", ind);
		return;
	}
	fprintf(o, ",\n%s    \"cluster-size\": %u,\n", ind, 1u << h->cluster_bits);
	if (h->crypt_method)
		fprintf(o, "%s    \"encrypted\": true,\n", ind);
	fprintf(o, "%s    \"dirty-flag\": %s", ind, h->incompat & QCOW2_INCOMPAT_DIRTY ? "true" : "false");
	if (l->m.backing_file) {
		fprintf(o, ",\n%s    \"backing-filename\": ", ind);
		json_str(o, l->m.backing_file);
		if (l->backing_path) {
			fprintf(o, ",\n%s    \"full-backing-filename\": ", ind);
			json_str(o, l->backing_path);
		}
		if (l->m.backing_format) {
			fprintf(o, ",\n%s    \"backing-filename-format\": ", ind);
			json_str(o, l->m.backing_format);
		}
	}
	if (l->n_snaps) {
		fprintf(o, ",\n%s    \"snapshots\": [", ind);
		for (uint32_t i = 0; i < l->n_snaps; i++) {
			const struct qcow2_snapshot *s = &l->snaps[i];
			fprintf(o, "%s\n%s        {\"id\": ", i ? "," : "", ind);
			json_str(o, s->id);
			fprintf(o, ", \"name\": ");
			json_str(o, s->name);
			fprintf(o, ", \"vm-state-size\": %llu, \"date-sec\": %u, \"date-nsec\": %u, "
				   "\"vm-clock-sec\": %llu, \"vm-clock-nsec\": %llu, \"disk-size\": %llu",
				(unsigned long long)s->vm_state_size, s->date_sec, s->date_nsec,
				(unsigned long long)(s->vm_clock_nsec / 1000000000ull),
				(unsigned long long)(s->vm_clock_nsec % 1000000000ull),
				(unsigned long long)s->disk_size);
			if (s->icount != UINT64_MAX)
				fprintf(o, ", \"icount\": %llu", (unsigned long long)s->icount);
			fprintf(o, "}");
		}
		fprintf(o, "\n%s    ]", ind);
	}
	fprintf(o, ",\n%s    \"format-specific\": {\n%s        \"type\": \"qcow2\",\n", ind, ind);
	fprintf(o, "%s        \"data\": {\n", ind);
	fprintf(o, "%s            \"compat\": \"%s\",\n", ind, compat_str(h));
	fprintf(o, "%s            \"compression-type\": \"%s\",\n", ind, compression_str(h));
	if (h->crypt_method)
		print_encrypt_json(o, l, ind);
	if (h->version >= 3) {
		fprintf(o, "%s            \"lazy-refcounts\": %s,\n", ind,
			h->compat & QCOW2_COMPAT_LAZY_REFCOUNTS ? "true" : "false");
		fprintf(o, "%s            \"corrupt\": %s,\n", ind,
			h->incompat & QCOW2_INCOMPAT_CORRUPT ? "true" : "false");
		fprintf(o, "%s            \"extended-l2\": %s,\n", ind,
			h->incompat & QCOW2_INCOMPAT_EXTL2 ? "true" : "false");
	}
	if (l->m.data_file) {
		fprintf(o, "%s            \"data-file\": ", ind);
		json_str(o, l->m.data_file);
		fprintf(o, ",\n%s            \"data-file-raw\": %s,\n", ind,
			h->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW ? "true" : "false");
	}
	uint64_t uc = h->compat & ~QCOW2_COMPAT_LAZY_REFCOUNTS;
	uint64_t ua = h->autoclear & ~(QCOW2_AUTOCLEAR_BITMAPS | QCOW2_AUTOCLEAR_DATA_FILE_RAW);
	if (uc) {
		qcow2_feature_names(&l->m, 1, uc, names, sizeof(names));
		fprintf(o, "%s            \"unknown-compatible-features\": ", ind);
		json_str(o, names);
		fprintf(o, ",\n");
	}
	if (ua) {
		qcow2_feature_names(&l->m, 2, ua, names, sizeof(names));
		fprintf(o, "%s            \"unknown-autoclear-features\": ", ind);
		json_str(o, names);
		fprintf(o, ",\n");
	}
	print_bitmaps_json(o, l, ind);
	fprintf(o, "%s            \"refcount-bits\": %u\n", ind, 1u << h->refcount_order);
	fprintf(o, "%s        }\n%s    }\n%s}", ind, ind, ind);
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: qublk info [--output human|json] [--backing-chain] [-f FMT] [-U] FILE\n"
		"\n"
		"Show FILE's format (qcow2 or raw, probed by magic unless -f is given),\n"
		"virtual and on-disk size and, for qcow2, cluster size, compat level,\n"
		"refcount width, compression type, feature flags, backing file and\n"
		"format, internal snapshots and persistent bitmaps.  The image is only\n"
		"read.\n"
		"\n"
		"info always reads with force-share semantics (qemu-img info -U): it\n"
		"works on an image another process (qublk, qemu-nbd, a VM) is writing,\n"
		"and then may show metadata in mid-update.\n"
		"\n"
		"  --output FMT     human (default) or json\n"
		"  --backing-chain  also show every image of the backing chain\n"
		"                   (relative names resolve against the directory of\n"
		"                   the image naming them; loops are refused)\n"
		"  -f FMT           do not probe: FILE is qcow2 or raw\n"
		"  -U, --force-share\n"
		"                   accepted for qemu-img compatibility (the default)\n"
		"  -h, --help       show this help\n"
		"\n"
		"Exit status: 0 success, 1 the image could not be read or is invalid,\n"
		"2 usage error.\n");
}

int cmd_info(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256, OPT_CHAIN };
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "backing-chain", no_argument, NULL, OPT_CHAIN },
		{ "force-share", no_argument, NULL, 'U' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct layer *chain = NULL;
	unsigned n = 0;
	bool json = false, want_chain = false;
	const char *fmt = NULL;
	int c, ret = EXIT_FAIL;

	optind = 1;
	while ((c = getopt_long(argc, argv, "f:Uh", longopts, NULL)) != -1) {
		switch (c) {
		case OPT_OUTPUT:
			if (!strcmp(optarg, "json")) {
				json = true;
			} else if (!strcmp(optarg, "human")) {
				json = false;
			} else {
				log_error("unknown output format '%s' (human or json)", optarg);
				return EXIT_USAGE;
			}
			break;
		case OPT_CHAIN:
			want_chain = true;
			break;
		case 'f':
			fmt = optarg;
			if (strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
				log_error("unknown format '%s' (qcow2 or raw)", fmt);
				return EXIT_USAGE;
			}
			break;
		case 'U':
			break;      /* always: see usage() */
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (argc - optind != 1) {
		log_error(argc - optind < 1 ? "missing FILE" : "too many arguments");
		usage(stderr);
		return EXIT_USAGE;
	}

	chain = calloc(MAX_CHAIN, sizeof(*chain));
	if (!chain) {
		log_error("out of memory");
		return EXIT_FAIL;
	}
	const char *path = argv[optind];
	for (;;) {
		if (n == MAX_CHAIN) {
			log_error("%s: backing chain longer than %d images", argv[optind], MAX_CHAIN);
			goto out;
		}
		if (layer_open(path, fmt, &chain[n]))
			goto out;
		for (unsigned i = 0; i < n; i++) {
			if (chain[i].dev == chain[n].dev && chain[i].ino == chain[n].ino) {
				log_error("%s: backing chain loop: %s is also layer %u", argv[optind],
					  chain[n].path, i);
				n++;
				goto out;
			}
		}
		n++;
		struct layer *l = &chain[n - 1];
		if (!want_chain || !l->backing_path)
			break;
		path = l->backing_path;
		fmt = l->m.backing_format;
		if (fmt && strcmp(fmt, "qcow2") && strcmp(fmt, "raw")) {
			log_error("%s: backing file %s has unsupported format '%s'", l->path,
				  l->backing_path, fmt);
			goto out;
		}
	}

	if (json && want_chain)
		printf("[\n");
	for (unsigned i = 0; i < n; i++) {
		if (json) {
			print_json(stdout, &chain[i], want_chain ? "    " : "");
			printf("%s\n", want_chain && i + 1 < n ? "," : "");
		} else {
			if (i)
				printf("\n");
			print_text(stdout, &chain[i]);
		}
	}
	if (json && want_chain)
		printf("]\n");
	ret = fflush(stdout) ? EXIT_FAIL : EXIT_OK;
out:
	for (unsigned i = 0; i < MAX_CHAIN; i++)
		layer_free(&chain[i]);
	free(chain);
	return ret;
}
