/* SPDX-License-Identifier: MIT */
/*
 * qcow2 on-disk format: constants and the parsed header.
 * Spec: qemu docs/interop/qcow2.rst.  Everything on disk is big-endian.
 * Shared by the driver (the src/qcow2 sources) and the image tools.
 */
#ifndef QUBLK_QCOW2_FORMAT_H
#define QUBLK_QCOW2_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define QCOW2_MAGIC 0x514649fbu              /* "QFI\xfb" */

/* "Header" section: field offsets of the fixed header. */
#define QCOW2_HDR_MAGIC                 0
#define QCOW2_HDR_VERSION               4
#define QCOW2_HDR_BACKING_OFFSET        8
#define QCOW2_HDR_BACKING_SIZE         16
#define QCOW2_HDR_CLUSTER_BITS         20
#define QCOW2_HDR_SIZE                 24
#define QCOW2_HDR_CRYPT_METHOD         32
#define QCOW2_HDR_L1_SIZE              36
#define QCOW2_HDR_L1_OFFSET            40
#define QCOW2_HDR_REFTABLE_OFFSET      48
#define QCOW2_HDR_REFTABLE_CLUSTERS    56
#define QCOW2_HDR_NB_SNAPSHOTS         60
#define QCOW2_HDR_SNAPSHOTS_OFFSET     64
#define QCOW2_HDR_V2_LENGTH            72
#define QCOW2_HDR_INCOMPAT             72   /* v3 fields from here */
#define QCOW2_HDR_COMPAT               80
#define QCOW2_HDR_AUTOCLEAR            88
#define QCOW2_HDR_REFCOUNT_ORDER       96
#define QCOW2_HDR_HEADER_LENGTH       100
#define QCOW2_HDR_COMPRESSION_TYPE    104
#define QCOW2_HDR_V3_LENGTH           104   /* minimum v3 header_length */
#define QCOW2_HDR_V3_FULL_LENGTH      112   /* with compression type, padded */

/* Incompatible feature bits */
#define QCOW2_INCOMPAT_DIRTY            (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT          (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE        (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION      (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2            (1ull << 4)
#define QCOW2_EXTL2_MIN_CLUSTER         16384u   /* QEMU's lower limit */
#define QCOW2_INCOMPAT_KNOWN            0x1full
/* Compatible feature bits */
#define QCOW2_COMPAT_LAZY_REFCOUNTS     (1ull << 0)
/* Autoclear feature bits */
#define QCOW2_AUTOCLEAR_BITMAPS         (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW   (1ull << 1)

/* crypt_method */
#define QCOW2_CRYPT_NONE                0
#define QCOW2_CRYPT_AES                 1
#define QCOW2_CRYPT_LUKS                2

#define QCOW2_COMPRESSION_ZLIB          0
#define QCOW2_COMPRESSION_ZSTD          1

/* "Header extensions" */
#define QCOW2_EXT_END                   0x00000000u
#define QCOW2_EXT_BACKING_FORMAT        0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE         0x6803f857u
#define QCOW2_EXT_BITMAPS               0x23852875u
#define QCOW2_EXT_CRYPTO                0x0537be77u
#define QCOW2_EXT_DATA_FILE             0x44415441u

/* "Cluster mapping": L1 / L2 entries (standard, non-extended L2) */
#define QCOW2_L1E_OFFSET_MASK           0x00fffffffffffe00ull
#define QCOW2_L1E_RESERVED_MASK         0x7f000000000001ffull
#define QCOW2_L2E_OFFSET_MASK           0x00fffffffffffe00ull
#define QCOW2_L2E_RESERVED_MASK         0x3f000000000001feull
#define QCOW2_OFLAG_COPIED              (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED          (1ull << 62)
#define QCOW2_OFLAG_ZERO                (1ull << 0)   /* v3 only */
/* "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8);
 * bits 0..x-1 host offset, bits x..61 additional 512-byte sectors. */
#define QCOW2_COMPRESSED_SECTOR_SIZE    512

/* "Extended L2 Entries": 32 subclusters per cluster; the bitmap has an
 * allocation bit (0-31) and a reads-as-zero bit (32-63) per subcluster. */
#define QCOW2_SUBCLUSTERS       32
#define QCOW2_SC_ALLOC(sc)      (1ull << (sc))
#define QCOW2_SC_ZERO(sc)       (1ull << (32 + (sc)))
/* Bits of subclusters [a, b) (b <= 32). */
static inline uint64_t qcow2_sc_alloc_range(unsigned a, unsigned b)
{
	return (b >= 32 ? ~0ull >> 32 : (1ull << b) - 1) & ~((1ull << a) - 1);
}
static inline uint64_t qcow2_sc_zero_range(unsigned a, unsigned b)
{
	return qcow2_sc_alloc_range(a, b) << 32;
}
#define QCOW2_BITMAP_ALL_ZERO   (0xffffffffull << 32)

/* "Refcount table": entries are refcount block offsets. */
#define QCOW2_REFT_OFFSET_MASK          0xfffffffffffffe00ull
#define QCOW2_REFT_RESERVED_MASK        0x00000000000001ffull

/* "Refcount blocks": entry @i of a refcount block buffer at width
 * 1 << @order bits.  Sub-byte widths are packed from the least
 * significant bit of each byte; wider ones are big-endian.  The one
 * definition of the packing, for the driver, create and check. */
static inline uint64_t qcow2_rc_get(const uint8_t *p, uint64_t i, unsigned order)
{
	switch (order) {
	case 0: return (p[i / 8] >> (i % 8)) & 1;
	case 1: return (p[i / 4] >> (2 * (i % 4))) & 3;
	case 2: return (p[i / 2] >> (4 * (i % 2))) & 15;
	case 3: return p[i];
	case 4: return ((uint64_t)p[2 * i] << 8) | p[2 * i + 1];
	case 5: return ((uint64_t)p[4 * i] << 24) | ((uint64_t)p[4 * i + 1] << 16) |
		       ((uint64_t)p[4 * i + 2] << 8) | p[4 * i + 3];
	default: {
		uint64_t v = 0;
		for (unsigned k = 0; k < 8; k++)
			v = (v << 8) | p[8 * i + k];
		return v;
	}
	}
}

static inline void qcow2_rc_set(uint8_t *p, uint64_t i, unsigned order, uint64_t v)
{
	unsigned bits = 1u << order, nbytes;

	if (order < 3) {
		unsigned per = 8 / bits, sh = (unsigned)(i % per) * bits;
		uint8_t mask = (uint8_t)(((1u << bits) - 1) << sh);
		p[i / per] = (uint8_t)((p[i / per] & ~mask) | ((v << sh) & mask));
		return;
	}
	nbytes = bits / 8;
	for (unsigned k = 0; k < nbytes; k++)
		p[nbytes * i + k] = (uint8_t)(v >> (8 * (nbytes - 1 - k)));
}

#define QCOW2_MIN_CLUSTER_BITS          9
#define QCOW2_MAX_CLUSTER_BITS          21
/* QEMU's limits (block/qcow2.h), enforced for interoperability. */
#define QCOW2_MAX_L1_SIZE               (32u * 1024 * 1024)   /* bytes */
#define QCOW2_MAX_REFTABLE_SIZE         (8u * 1024 * 1024)    /* bytes */
#define QCOW2_MAX_SNAPSHOTS             65536
#define QCOW2_MAX_BACKING_NAME          1023
#define QCOW2_MAX_HOST_OFFSET           (1ull << 56)           /* bits 9-55 */

/* "Snapshot table" entry, fixed part */
#define QCOW2_SNAP_L1_OFFSET            0
#define QCOW2_SNAP_L1_SIZE              8
#define QCOW2_SNAP_ID_SIZE             12
#define QCOW2_SNAP_NAME_SIZE           14
#define QCOW2_SNAP_DATE_SEC            16
#define QCOW2_SNAP_DATE_NSEC           20
#define QCOW2_SNAP_VM_CLOCK_NSEC       24
#define QCOW2_SNAP_VM_STATE_SIZE       32
#define QCOW2_SNAP_EXTRA_SIZE          36
#define QCOW2_SNAP_FIXED_LEN           40

/* The header as parsed and validated (header.c). */
struct qcow2_header {
	uint32_t version;               /* 2 or 3 */
	uint32_t cluster_bits;
	uint64_t size;                  /* virtual size */
	uint64_t backing_offset;
	uint32_t backing_size;
	uint32_t crypt_method;
	uint32_t l1_size;               /* entries */
	uint64_t l1_offset;
	uint64_t reftable_offset;
	uint32_t reftable_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompat;
	uint64_t compat;
	uint64_t autoclear;
	uint32_t refcount_order;        /* refcount_bits = 1 << refcount_order */
	uint32_t header_length;
	uint8_t compression_type;
};


/* Header extensions as found on disk, in order (END excluded).  Known
 * ones are also decoded into struct qcow2_meta; all are kept so that a
 * header rewrite preserves unknown extensions byte for byte. */
struct qcow2_ext {
	uint32_t type;
	uint32_t len;
	uint8_t *data;
};

/* Everything in cluster 0, parsed (header.c). */
struct qcow2_meta {
	struct qcow2_header h;
	char *backing_file;       /* NULL if none */
	char *backing_format;     /* NULL if no backing format extension */
	char *data_file;          /* NULL if no external data file extension */
	struct qcow2_ext *exts;
	unsigned n_exts;
	uint8_t *unknown_hdr;     /* bytes of header_length past what we know (v3) */
	uint32_t unknown_hdr_len;
};

struct io_file;

/* Read cluster 0 of @f and validate every field against @file_size (and
 * QEMU's limits): cluster_bits, version, header_length, table offsets
 * aligned and inside the file, sizes overflow-free, extensions well formed,
 * backing name length.  Does not refuse on feature bits: the caller
 * decides.  On failure writes a one-line reason to @err.  Returns -errno
 * (-EINVAL for a malformed header). */
int qcow2_meta_read(struct io_file *f, uint64_t file_size, struct qcow2_meta *m,
		    char *err, size_t errlen);
/* The same with @flags: QCOW2_META_FOR_CHECK accepts what qemu-img check
 * opens and counts as corruption (L1/refcount tables past EOF, an empty
 * refcount table). */
#define QCOW2_META_FOR_CHECK (1u << 0)
/* ... and QCOW2_META_ALLOW_CRYPT accepts encrypted images (crypt_method
 * 1 or 2), which are otherwise refused: for tools that only describe. */
#define QCOW2_META_ALLOW_CRYPT (1u << 1)
int qcow2_meta_read_flags(struct io_file *f, uint64_t file_size, unsigned flags,
			  struct qcow2_meta *m, char *err, size_t errlen);
/* Serialise @m (fixed header, extensions, backing name) into cluster 0
 * and write it.  Returns -EFBIG if it does not fit in one cluster. */
int qcow2_meta_write(struct io_file *f, const struct qcow2_meta *m);
void qcow2_meta_free(struct qcow2_meta *m);
/* Names of set bits from the feature name table if present, else the
 * spec's names ("dirty", "corrupt", "external data file", ...), else
 * "bit N".  Writes a comma-separated list to @buf. */
void qcow2_feature_names(const struct qcow2_meta *m, int type /* 0 incompat, 1 compat, 2 autoclear */,
			 uint64_t bits, char *buf, size_t buflen);

/* "Snapshot table" (snapshot.c) */
struct qcow2_snapshot {
	uint64_t l1_offset;
	uint32_t l1_size;
	char *id;
	char *name;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t vm_state_size;
	uint64_t disk_size;       /* virtual size at snapshot time (extra data) or header size */
	uint64_t icount;          /* instruction count (extra data), UINT64_MAX if none */
	uint32_t extra_size;      /* extra_data_size as on disk */
	uint64_t entry_off;       /* byte offset of the entry in the table */
	uint32_t entry_len;       /* bytes of the entry, padding excluded */
};
/* Read and validate the snapshot table (offsets, sizes, L1 tables inside
 * the file).  Returns -errno; *out is an array of h->nb_snapshots. */
int qcow2_snapshots_read(struct io_file *f, const struct qcow2_header *h, uint64_t file_size,
			 struct qcow2_snapshot **out, char *err, size_t errlen);
/* The same with @flags; *@table_bytes (if not NULL) receives the table's
 * length up to the end of its last entry (padding excluded). */
#define QCOW2_SNAP_UNCHECKED_L1 (1u << 0)   /* return bad snapshot L1 tables as they are */
int qcow2_snapshots_read_flags(struct io_file *f, const struct qcow2_header *h,
			       uint64_t file_size, unsigned flags, struct qcow2_snapshot **out,
			       uint64_t *table_bytes, char *err, size_t errlen);
void qcow2_snapshots_free(struct qcow2_snapshot *s, uint32_t n);

/* "Bitmap directory" (bitmap-dir.c): persistent dirty bitmaps. */
#define QCOW2_BME_IN_USE                (1u << 0)
#define QCOW2_BME_AUTO                  (1u << 1)
#define QCOW2_BME_EXTRA_DATA_COMPATIBLE (1u << 2)
#define QCOW2_BME_TYPE_DIRTY            1
struct qcow2_bitmap {
	uint64_t table_offset;
	uint32_t table_size;      /* entries (cluster offsets) */
	uint32_t flags;           /* QCOW2_BME_* */
	uint8_t type, granularity_bits;
	uint32_t extra_size;
	char *name;
	uint64_t entry_off;       /* file offset of the directory entry */
};
/* The bitmaps extension of @m: 1 (and its fields), 0 if none, -EINVAL if
 * malformed. */
int qcow2_bitmap_ext(const struct qcow2_meta *m, uint32_t *nb, uint64_t *dir_off,
		     uint64_t *dir_size);
/* Read and validate the bitmap directory.  Returns 0 (none: *nout 0),
 * -errno with @err set; *out is an array of *nout. */
int qcow2_bitmaps_read(struct io_file *f, const struct qcow2_meta *m, uint64_t file_size,
		       struct qcow2_bitmap **out, uint32_t *nout, char *err, size_t errlen);
void qcow2_bitmaps_free(struct qcow2_bitmap *b, uint32_t n);
/* Internal snapshots (snapshot-write.c), with QEMU's semantics: @f is
 * the image file, open read-write, used by no one else (offline: the
 * caller holds the image's write lock; live: see QCOW2_SNAPSHOT_LIVE).
 * create adds a snapshot called @name of the current guest contents (no
 * VM state; ids as QEMU assigns them: one more than the largest); apply
 * reverts the guest contents (and virtual size) to the snapshot whose
 * id, or else name, is @name; delete drops the snapshot whose name, or
 * else id, is @name (qemu-img's lookups).  A power cut leaves leaked
 * clusters at most, and possibly active entries with refcount 1 still
 * lacking OFLAG_COPIED (see the file).  Returns -errno with @err set
 * (-ENOENT: no such snapshot). */
/* In @flags: the image is open in the driver (snapshot-live.c), which
 * has stopped its requests, written back everything and marked the image
 * clean, and reloads its state afterwards.  The autoclear bits are left
 * as they are (the driver maintains them); a dirty image is refused. */
#define QCOW2_SNAPSHOT_LIVE (1u << 0)
int qcow2_snapshot_create(struct io_file *f, const char *name, unsigned flags, char *err,
			  size_t errlen);
int qcow2_snapshot_apply(struct io_file *f, const char *name, unsigned flags, char *err,
			 size_t errlen);
int qcow2_snapshot_delete(struct io_file *f, const char *name, unsigned flags, char *err,
			  size_t errlen);
/* The snapshot list of the image in @f (header and table validated).
 * *out: *n entries, for qcow2_snapshots_free(). */
int qcow2_snapshot_list(struct io_file *f, struct qcow2_snapshot **out, uint32_t *n, char *err,
			size_t errlen);

/* "Compressed Clusters" (compress.c): inflate raw deflate (zlib, no
 * header, windowBits -12) or a zstd frame from @src into exactly
 * @dst_len bytes.  Returns -EIO on malformed data. */
int qcow2_decompress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_len);
/* Compress @src_len bytes into at most @dst_cap bytes of @dst, in the
 * format qcow2_decompress() reads (and QEMU writes).  Returns the
 * compressed size, -ENOSPC if it does not fit, or -errno. */
ssize_t qcow2_compress(uint8_t type, const void *src, size_t src_len, void *dst, size_t dst_cap);

/* Consistency check and repair (check.c), with qemu-img check's
 * classification, counting and exit-code semantics. */
enum {
	QCOW2_FIX_LEAKS  = 1 << 0,   /* free clusters whose refcount exceeds their references */
	QCOW2_FIX_ERRORS = 1 << 1,   /* also repair corruptions */
};
struct qcow2_check_result {
	uint64_t corruptions, leaks, check_errors;
	uint64_t corruptions_fixed, leaks_fixed;
	uint64_t image_end_offset;
	uint64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters;
};
struct qcow2_check_opts {
	unsigned fix;                              /* QCOW2_FIX_* */
	/* Optional: one line per problem found or repaired (no newline). */
	void (*report)(void *opaque, const char *line);
	/* Optional: called now and then with work done out of @total. */
	void (*progress)(void *opaque, uint64_t done, uint64_t total);
	void *opaque;
};
/* Check (and with @o->fix, repair) the qcow2 image in @f, which must be
 * open read-write when fixing.  Runs in a coroutine of the current
 * thread's loop (made for the call if needed).  Fills @res; returns
 * -errno when the check could not be completed (the image could not be
 * read or parsed: @err says why), 0 otherwise whatever it found. */
int qcow2_check(struct io_file *f, const struct qcow2_check_opts *o,
		struct qcow2_check_result *res, char *err, size_t errlen);
/* Repair an image whose dirty bit is set (lazy refcounts) before a
 * read-write open, as QEMU does; then re-read its header into @m and
 * its size into @file_size.  Logs what it did under @name.  Returns
 * -errno if the image could not be made clean. */
int qcow2_repair_dirty(struct io_file *f, const char *name, struct qcow2_meta *m,
		       uint64_t *file_size);

/* Image creation (create.c).  Writes a new image at @path: into a
 * temporary file renamed over @path when complete, after locking an
 * existing @path as qemu-img create does (-EAGAIN: in use, refused).
 * A backing file needs its format (-EINVAL otherwise, as QEMU 10). */
struct qcow2_create_opts {
	uint64_t size;
	uint32_t cluster_size;        /* default 65536 */
	uint32_t version;             /* 2 (compat=0.10) or 3 (compat=1.1, default) */
	uint32_t refcount_bits;       /* default 16 */
	bool lazy_refcounts;
	int prealloc;                 /* QCOW2_PREALLOC_* */
	const char *backing_file;
	const char *backing_format;
	uint8_t compression_type;
	bool extended_l2;             /* 32 subclusters per cluster; v3, clusters >= 16 KiB */
	/* An external data file (v3): the name stored as given; a relative
	 * name is relative to the image's directory, where it is created (or
	 * replaced) with the virtual size.  data_file_raw: guest offsets map
	 * 1:1 and the file stays a valid raw image (implies metadata
	 * preallocation; no backing file). */
	const char *data_file;
	bool data_file_raw;
};
enum { QCOW2_PREALLOC_OFF, QCOW2_PREALLOC_METADATA, QCOW2_PREALLOC_FALLOC, QCOW2_PREALLOC_FULL };
int qcow2_create(const char *path, const struct qcow2_create_opts *o, char *err, size_t errlen);
/* A new raw image of @size bytes in @fd (truncated first), preallocated
 * as @prealloc (QCOW2_PREALLOC_*: metadata counts as off) says, as
 * qemu-img create -f raw makes it.  Returns -errno. */
int create_raw_fill(int fd, uint64_t size, int prealloc);

/* The file of a new image (create.c), for every format: begin opens a
 * temporary file next to @path (fd) after locking an existing @path as
 * qemu-img create does; commit syncs it and renames it over @path (an
 * existing file keeps its owner and mode; a symlink's target is
 * replaced); abort removes it.  commit and begin clean up on failure;
 * abort is safe to call twice.  Returns -errno with @err set. */
struct create_file {
	int fd;                 /* the new image: write here */
	int lock_fd;            /* the old image, locked, or -1 */
	char *tmp, *target;
	bool existed;
	mode_t mode;
	uid_t uid;
	gid_t gid;
};
int create_file_begin(const char *path, struct create_file *cf, char *err, size_t errlen);
int create_file_commit(struct create_file *cf, char *err, size_t errlen);
void create_file_abort(struct create_file *cf);
/* qcow2_create() without its file handling: the image for @path (whose
 * directory a relative backing name is resolved against) written into
 * @cf->fd, which is truncated first; the caller commits or aborts @cf.
 * For tools that fill the image before it appears (qublk convert); an
 * external data file is refused (-ENOTSUP).  Returns -errno with @err set. */
int qcow2_create_into(struct create_file *cf, const char *path,
		      const struct qcow2_create_opts *o, char *err, size_t errlen);

#endif
