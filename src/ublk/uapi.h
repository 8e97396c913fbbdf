/* SPDX-License-Identifier: MIT */
/*
 * Our own ublk uapi: the subset of linux/ublk_cmd.h (as of Linux 7.3)
 * that qublk uses.  Debian bookworm ships the 6.1 header, which lacks the
 * ioctl-encoded UBLK_U_* codes, GET_FEATURES, USER_COPY and the devt
 * parameters, while the kernels we run on (6.12 and 7.3 in the test VM)
 * have them; 7.3 adds UPDATE_SIZE, QUIESCE_DEV, TRY_STOP_DEV and the
 * feature bits up to IO_DESC_SIZE.
 *
 * Rules: the system header is included first when it exists, and every
 * macro here is #ifndef-guarded, so a newer system header wins.  Structs
 * that exist in every ublk header since 6.0 are defined only when there
 * is no system header at all.  struct ublk_params grows with each kernel
 * (and the kernel accepts any prefix of it, see params.len), so the
 * system's version is renamed away on include and ours (basic, discard,
 * devt, zoned: the 6.12 layout) is always the one used.  The same goes
 * for struct ublksrv_ctrl_cmd: 6.1 has data[2] where 6.5+ split the second
 * word into dev_path_len (unprivileged devices), so ours is the new one,
 * and for struct ublksrv_ctrl_dev_info (owner_uid/owner_gid, 6.5+).
 *
 * The layouts are ABI: checked below with _Static_assert against the
 * sizes documented in the kernel header.
 */
#ifndef QUBLK_UBLK_UAPI_H
#define QUBLK_UBLK_UAPI_H

#include <errno.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <stddef.h>

#if defined(__has_include)
#if __has_include(<linux/ublk_cmd.h>)
#define ublk_params qublk_sys_ublk_params
#define ublksrv_ctrl_cmd qublk_sys_ublksrv_ctrl_cmd
#define ublksrv_ctrl_dev_info qublk_sys_ublksrv_ctrl_dev_info
#include <linux/ublk_cmd.h>
#undef ublk_params
#undef ublksrv_ctrl_cmd
#undef ublksrv_ctrl_dev_info
#endif
#endif

/* Always ours: 6.1 has reserved0 where 6.5+ has owner_uid/owner_gid
 * (the owner of an unprivileged device). */
struct ublksrv_ctrl_dev_info {
	__u16 nr_hw_queues;
	__u16 queue_depth;
	__u16 state;       /* UBLK_S_DEV_* */
	__u16 pad0;
	__u32 max_io_buf_bytes;
	__u32 dev_id;
	__s32 ublksrv_pid;
	__u32 pad1;
	__u64 flags;       /* UBLK_F_* */
	__u64 ublksrv_flags; /* opaque to the driver */
	__u32 owner_uid;   /* reserved0 in 6.1 */
	__u32 owner_gid;
	__u64 reserved1;
	__u64 reserved2;
};

/* ---- structs present since the first ublk header (6.0) ---- */
#ifndef USER_BLK_DRV_CMD_INC_H
#define USER_BLK_DRV_CMD_INC_H

/* One per tag, in the read-only array mmap'd from /dev/ublkcN. */
struct ublksrv_io_desc {
	__u32 op_flags;    /* op: bits 0-7, UBLK_IO_F_*: bits 8-31 */
	__u32 nr_sectors;
	__u64 start_sector;
	__u64 addr;        /* our buffer for this tag */
};

/* I/O command, carried in the 16-byte cmd area of a 64-byte SQE. */
struct ublksrv_io_cmd {
	__u16 q_id;
	__u16 tag;
	__s32 result;      /* COMMIT: bytes done or -errno */
	__u64 addr;        /* buffer for this tag (FETCH/COMMIT) */
};

struct ublk_param_basic {
	__u32 attrs;       /* UBLK_ATTR_* */
	__u8 logical_bs_shift;
	__u8 physical_bs_shift;
	__u8 io_opt_shift;
	__u8 io_min_shift;
	__u32 max_sectors;
	__u32 chunk_sectors;
	__u64 dev_sectors;
	__u64 virt_boundary_mask;
};

struct ublk_param_discard {
	__u32 discard_alignment;
	__u32 discard_granularity;
	__u32 max_discard_sectors;
	__u32 max_write_zeroes_sectors;
	__u16 max_discard_segments;
	__u16 reserved0;
};
#endif /* no system header */

/* Always ours.  Control command, carried in the 80-byte cmd area of a
 * 128-byte SQE. */
struct ublksrv_ctrl_cmd {
	__u32 dev_id;      /* device the command is for (-1 on ADD_DEV: any) */
	__u16 queue_id;    /* -1 unless the command is per queue */
	__u16 len;         /* length of the buffer at addr (with the path) */
	__u64 addr;        /* command-specific IN or OUT buffer */
	__u64 data[1];     /* inline data (START_DEV: daemon pid) */
	/* Unprivileged devices (and GET_DEV_INFO2): addr starts with the
	 * path of /dev/ublkcN, this long (NUL included); the payload follows. */
	__u16 dev_path_len;
	__u16 pad;
	__u32 reserved;
};

/* ---- structs added after 6.1 ---- */
#ifndef UBLK_PARAM_TYPE_DEVT
struct ublk_param_devt {   /* read-only: returned by GET_PARAMS */
	__u32 char_major;
	__u32 char_minor;
	__u32 disk_major;
	__u32 disk_minor;
};
#endif
#ifndef UBLK_PARAM_TYPE_ZONED
struct ublk_param_zoned {
	__u32 max_open_zones;
	__u32 max_active_zones;
	__u32 max_zone_append_sectors;
	__u8 reserved[20];
};
#endif

/* Always ours (see the top comment).  SET_PARAMS sends the prefix up to
 * the last type it uses; the kernel zero-fills the rest. */
struct ublk_params {
	__u32 len;
	__u32 types;       /* UBLK_PARAM_TYPE_* present */
	struct ublk_param_basic basic;
	struct ublk_param_discard discard;
	struct ublk_param_devt devt;
	struct ublk_param_zoned zoned;
};

/* ---- control command codes ---- */
#ifndef UBLK_CMD_GET_QUEUE_AFFINITY
#define UBLK_CMD_GET_QUEUE_AFFINITY 0x01
#define UBLK_CMD_GET_DEV_INFO       0x02
#define UBLK_CMD_ADD_DEV            0x04
#define UBLK_CMD_DEL_DEV            0x05
#define UBLK_CMD_START_DEV          0x06
#define UBLK_CMD_STOP_DEV           0x07
#define UBLK_CMD_SET_PARAMS         0x08
#define UBLK_CMD_GET_PARAMS         0x09
#endif
#ifndef UBLK_CMD_START_USER_RECOVERY
#define UBLK_CMD_START_USER_RECOVERY 0x10
#define UBLK_CMD_END_USER_RECOVERY   0x11
#endif
#ifndef UBLK_CMD_GET_DEV_INFO2
#define UBLK_CMD_GET_DEV_INFO2      0x12
#endif
/* Not in any header as a legacy name; the numbers of the U_ codes. */
#define QUBLK_CMD_GET_FEATURES      0x13
#define QUBLK_CMD_DEL_DEV_ASYNC     0x14

#ifndef UBLK_U_CMD_ADD_DEV
#define UBLK_U_CMD_GET_QUEUE_AFFINITY _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO   _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV        _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV        _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV      _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV       _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS     _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS     _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO2  _IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_GET_FEATURES
#define UBLK_U_CMD_GET_FEATURES   _IOR('u', QUBLK_CMD_GET_FEATURES, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_DEL_DEV_ASYNC
#define UBLK_U_CMD_DEL_DEV_ASYNC  _IOR('u', QUBLK_CMD_DEL_DEV_ASYNC, struct ublksrv_ctrl_cmd)
#endif
/* 6.15+: data[0] = new size in sectors (needs UBLK_F_UPDATE_SIZE). */
#define QUBLK_CMD_UPDATE_SIZE       0x15
/* 6.16+: data[0] = timeout in ms (needs UBLK_F_QUIESCE). */
#define QUBLK_CMD_QUIESCE_DEV       0x16
/* 6.19+: stop only if the block device has no openers (UBLK_F_SAFE_STOP_DEV). */
#define QUBLK_CMD_TRY_STOP_DEV      0x17
#ifndef UBLK_U_CMD_UPDATE_SIZE
#define UBLK_U_CMD_UPDATE_SIZE    _IOWR('u', QUBLK_CMD_UPDATE_SIZE, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_QUIESCE_DEV
#define UBLK_U_CMD_QUIESCE_DEV    _IOWR('u', QUBLK_CMD_QUIESCE_DEV, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_TRY_STOP_DEV
#define UBLK_U_CMD_TRY_STOP_DEV   _IOWR('u', QUBLK_CMD_TRY_STOP_DEV, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_FEATURES_LEN
#define UBLK_FEATURES_LEN 8
#endif

/* ---- I/O command codes and results ---- */
#ifndef UBLK_IO_FETCH_REQ
#define UBLK_IO_FETCH_REQ            0x20
#define UBLK_IO_COMMIT_AND_FETCH_REQ 0x21
#define UBLK_IO_NEED_GET_DATA        0x22
#endif
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ          _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_NEED_GET_DATA      _IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd)
#endif
#ifndef UBLK_IO_RES_OK
#define UBLK_IO_RES_OK            0
#define UBLK_IO_RES_NEED_GET_DATA 1
#define UBLK_IO_RES_ABORT         (-ENODEV)
#endif

/* ---- UBLK_F_BATCH_IO (7.3): per-queue commands instead of per-tag ones.
 * PREP hands the driver every tag (their buffer index or address), FETCH
 * (multishot, with a provided buffer ring) delivers the tags of new
 * requests as arrays of __u16, COMMIT returns results for any number of
 * tags and makes them ready for their next request.  PREP and COMMIT
 * carry an array of elements at sqe->addr (sqe->len bytes): a header,
 * plus the buffer address with HAS_BUF_ADDR. ---- */
#ifndef UBLK_U_IO_PREP_IO_CMDS
struct ublk_elem_header {
	__u16 tag;
	__u16 buf_index;        /* AUTO_BUF_REG: where the next request's pages go */
	__s32 result;           /* COMMIT only */
};
struct ublk_batch_io {
	__u16 q_id;
	__u16 flags;
	__u16 nr_elem;
	__u8 elem_bytes;
	__u8 reserved;
	__u64 reserved2;
};
#define UBLK_BATCH_F_HAS_ZONE_LBA          (1 << 0)
#define UBLK_BATCH_F_HAS_BUF_ADDR          (1 << 1)
#define UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK (1 << 2)
#define UBLK_U_IO_PREP_IO_CMDS   _IOWR('u', 0x25, struct ublk_batch_io)
#define UBLK_U_IO_COMMIT_IO_CMDS _IOWR('u', 0x26, struct ublk_batch_io)
#define UBLK_U_IO_FETCH_IO_CMDS  _IOWR('u', 0x27, struct ublk_batch_io)
#endif
#ifndef IORING_URING_CMD_MULTISHOT
#define IORING_URING_CMD_MULTISHOT (1U << 1)
#endif

/* ---- mmap offsets ---- */
#ifndef UBLKSRV_CMD_BUF_OFFSET
#define UBLKSRV_CMD_BUF_OFFSET 0
#define UBLKSRV_IO_BUF_OFFSET  0x80000000
#endif
#ifndef UBLK_MAX_QUEUE_DEPTH
#define UBLK_MAX_QUEUE_DEPTH 4096
#endif
/* USER_COPY: pread/pwrite on /dev/ublkcN at
 * UBLKSRV_IO_BUF_OFFSET + (qid << UBLK_QID_OFF) + (tag << UBLK_TAG_OFF) + off */
#ifndef UBLK_IO_BUF_BITS
#define UBLK_IO_BUF_OFF       0
#define UBLK_IO_BUF_BITS      25
#define UBLK_IO_BUF_BITS_MASK ((1ULL << UBLK_IO_BUF_BITS) - 1)
#define UBLK_TAG_OFF          UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS         16
#define UBLK_TAG_BITS_MASK    ((1ULL << UBLK_TAG_BITS) - 1)
#define UBLK_QID_OFF          (UBLK_TAG_OFF + UBLK_TAG_BITS)
#define UBLK_QID_BITS         12
#define UBLK_QID_BITS_MASK    ((1ULL << UBLK_QID_BITS) - 1)
#define UBLK_MAX_NR_QUEUES    (1U << UBLK_QID_BITS)
#define UBLKSRV_IO_BUF_TOTAL_BITS (UBLK_QID_OFF + UBLK_QID_BITS)
#define UBLKSRV_IO_BUF_TOTAL_SIZE (1ULL << UBLKSRV_IO_BUF_TOTAL_BITS)
#endif

/* ---- feature bits (ADD_DEV dev_info.flags, GET_FEATURES) ---- */
#ifndef UBLK_F_SUPPORT_ZERO_COPY
#define UBLK_F_SUPPORT_ZERO_COPY      (1ULL << 0)
#define UBLK_F_URING_CMD_COMP_IN_TASK (1ULL << 1)
#define UBLK_F_NEED_GET_DATA          (1ULL << 2)
#define UBLK_F_USER_RECOVERY          (1ULL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE  (1ULL << 4)
#endif
#ifndef UBLK_F_UNPRIVILEGED_DEV
#define UBLK_F_UNPRIVILEGED_DEV       (1ULL << 5)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE       (1ULL << 6)
#endif
#ifndef UBLK_F_USER_COPY
#define UBLK_F_USER_COPY              (1ULL << 7)
#endif
#ifndef UBLK_F_ZONED
#define UBLK_F_ZONED                  (1ULL << 8)
#endif
#ifndef UBLK_F_USER_RECOVERY_FAIL_IO
#define UBLK_F_USER_RECOVERY_FAIL_IO  (1ULL << 9)
#endif
#ifndef UBLK_F_UPDATE_SIZE
#define UBLK_F_UPDATE_SIZE            (1ULL << 10)
#endif
#ifndef UBLK_F_AUTO_BUF_REG
#define UBLK_F_AUTO_BUF_REG           (1ULL << 11)
#endif
#ifndef UBLK_F_QUIESCE
#define UBLK_F_QUIESCE                (1ULL << 12)
#endif
#ifndef UBLK_F_PER_IO_DAEMON
#define UBLK_F_PER_IO_DAEMON          (1ULL << 13)
#endif
#ifndef UBLK_F_BUF_REG_OFF_DAEMON
#define UBLK_F_BUF_REG_OFF_DAEMON     (1ULL << 14)
#endif
#ifndef UBLK_F_BATCH_IO
#define UBLK_F_BATCH_IO               (1ULL << 15)
#endif
#ifndef UBLK_F_INTEGRITY
#define UBLK_F_INTEGRITY              (1ULL << 16)
#endif
#ifndef UBLK_F_SAFE_STOP_DEV
#define UBLK_F_SAFE_STOP_DEV          (1ULL << 17)
#endif
#ifndef UBLK_F_NO_AUTO_PART_SCAN
#define UBLK_F_NO_AUTO_PART_SCAN      (1ULL << 18)
#endif
#ifndef UBLK_F_SHMEM_ZC
#define UBLK_F_SHMEM_ZC               (1ULL << 19)
#endif
#ifndef UBLK_F_IO_DESC_SIZE
#define UBLK_F_IO_DESC_SIZE           (1ULL << 20)
#endif

/* ---- AUTO_BUF_REG: the buffer index a FETCH/COMMIT_AND_FETCH carries in
 * sqe->addr (bits 0-15; bits 16-23 flags; the rest zero) ---- */
#ifndef UBLK_AUTO_BUF_REG_FALLBACK
#define UBLK_AUTO_BUF_REG_FALLBACK (1 << 0)
#endif
#ifndef UBLK_IO_F_NEED_REG_BUF
/* The driver could not register the request's buffer (FALLBACK given):
 * the data moves by user copy. */
#define UBLK_IO_F_NEED_REG_BUF     (1U << 17)
#endif
static inline __u64 ublk_auto_buf_reg_addr(__u16 index, __u8 flags)
{
	return (__u64)index | (__u64)flags << 16;
}

/* ---- device states ---- */
#ifndef UBLK_S_DEV_DEAD
#define UBLK_S_DEV_DEAD     0
#define UBLK_S_DEV_LIVE     1
#define UBLK_S_DEV_QUIESCED 2
#endif
#ifndef UBLK_S_DEV_FAIL_IO
#define UBLK_S_DEV_FAIL_IO  3
#endif

/* ---- request ops and flags (ublksrv_io_desc.op_flags) ---- */
#ifndef UBLK_IO_OP_READ
#define UBLK_IO_OP_READ         0
#define UBLK_IO_OP_WRITE        1
#define UBLK_IO_OP_FLUSH        2
#define UBLK_IO_OP_DISCARD      3
#define UBLK_IO_OP_WRITE_SAME   4
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_F_FAILFAST_DEV       (1U << 8)
#define UBLK_IO_F_FAILFAST_TRANSPORT (1U << 9)
#define UBLK_IO_F_FAILFAST_DRIVER    (1U << 10)
#define UBLK_IO_F_META               (1U << 11)
#define UBLK_IO_F_FUA                (1U << 13)
#define UBLK_IO_F_NOUNMAP            (1U << 15)
#define UBLK_IO_F_SWAP               (1U << 16)
#endif

/* ---- parameters ---- */
#ifndef UBLK_ATTR_READ_ONLY
#define UBLK_ATTR_READ_ONLY      (1 << 0)
#define UBLK_ATTR_ROTATIONAL     (1 << 1)
#define UBLK_ATTR_VOLATILE_CACHE (1 << 2)
#define UBLK_ATTR_FUA            (1 << 3)
#endif
#ifndef UBLK_PARAM_TYPE_BASIC
#define UBLK_PARAM_TYPE_BASIC   (1 << 0)
#define UBLK_PARAM_TYPE_DISCARD (1 << 1)
#endif
#ifndef UBLK_PARAM_TYPE_DEVT
#define UBLK_PARAM_TYPE_DEVT    (1 << 2)
#endif
#ifndef UBLK_PARAM_TYPE_ZONED
#define UBLK_PARAM_TYPE_ZONED   (1 << 3)
#endif

/* ---- ABI checks (sizes and offsets from the kernel header) ---- */
_Static_assert(sizeof(struct ublksrv_ctrl_cmd) == 32, "ublksrv_ctrl_cmd");
_Static_assert(offsetof(struct ublksrv_ctrl_cmd, dev_path_len) == 24, "ctrl_cmd.dev_path_len");
_Static_assert(sizeof(struct ublksrv_ctrl_dev_info) == 64, "ublksrv_ctrl_dev_info");
_Static_assert(offsetof(struct ublksrv_ctrl_dev_info, flags) == 24, "dev_info.flags");
_Static_assert(offsetof(struct ublksrv_ctrl_dev_info, owner_uid) == 40, "dev_info.owner_uid");
_Static_assert(sizeof(struct ublksrv_io_desc) == 24, "ublksrv_io_desc");
_Static_assert(sizeof(struct ublksrv_io_cmd) == 16, "ublksrv_io_cmd");
_Static_assert(sizeof(struct ublk_param_basic) == 32, "ublk_param_basic");
_Static_assert(sizeof(struct ublk_param_discard) == 20, "ublk_param_discard");
_Static_assert(sizeof(struct ublk_param_devt) == 16, "ublk_param_devt");
_Static_assert(sizeof(struct ublk_param_zoned) == 32, "ublk_param_zoned");
_Static_assert(offsetof(struct ublk_params, basic) == 8, "ublk_params.basic");
_Static_assert(offsetof(struct ublk_params, discard) == 40, "ublk_params.discard");
_Static_assert(offsetof(struct ublk_params, devt) == 60, "ublk_params.devt");
_Static_assert(offsetof(struct ublk_params, zoned) == 76, "ublk_params.zoned");
_Static_assert(UBLK_U_CMD_ADD_DEV == 0xc0207504, "UBLK_U_CMD_ADD_DEV encoding");
_Static_assert(UBLK_U_CMD_GET_FEATURES == 0x80207513, "UBLK_U_CMD_GET_FEATURES encoding");
_Static_assert(UBLK_U_CMD_UPDATE_SIZE == 0xc0207515, "UBLK_U_CMD_UPDATE_SIZE encoding");
_Static_assert(UBLK_U_CMD_QUIESCE_DEV == 0xc0207516, "UBLK_U_CMD_QUIESCE_DEV encoding");
_Static_assert(UBLK_U_CMD_TRY_STOP_DEV == 0xc0207517, "UBLK_U_CMD_TRY_STOP_DEV encoding");
_Static_assert(UBLK_U_IO_FETCH_REQ == 0xc0107520, "UBLK_U_IO_FETCH_REQ encoding");
_Static_assert(UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xc0107521, "UBLK_U_IO_COMMIT_AND_FETCH_REQ encoding");
_Static_assert(sizeof(struct ublk_elem_header) == 8, "ublk_elem_header");
_Static_assert(sizeof(struct ublk_batch_io) == 16, "ublk_batch_io");
_Static_assert(UBLK_U_IO_PREP_IO_CMDS == 0xc0107525, "UBLK_U_IO_PREP_IO_CMDS encoding");
_Static_assert(UBLK_U_IO_FETCH_IO_CMDS == 0xc0107527, "UBLK_U_IO_FETCH_IO_CMDS encoding");

static inline __u8 ublk_iod_op(const struct ublksrv_io_desc *iod) { return iod->op_flags & 0xff; }

#endif
