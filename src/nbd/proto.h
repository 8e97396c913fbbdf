/* SPDX-License-Identifier: MIT */
/*
 * NBD wire protocol constants, written from the protocol description
 * (NetworkBlockDevice/nbd doc/proto.md).  Every integer on the wire is
 * big-endian (get_be32() and friends in common/util.h).  Only the subset the
 * server speaks is named here: fixed newstyle negotiation, simple and
 * structured replies, extended headers (64-bit lengths), meta contexts and
 * block status, TLS.
 */
#ifndef QUBLK_NBD_PROTO_H
#define QUBLK_NBD_PROTO_H

#define NBD_DEFAULT_PORT 10809

/* Handshake ("Fixed newstyle negotiation") */
#define NBD_MAGIC          0x4e42444d41474943ULL   /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC     0x49484156454f5054ULL   /* "IHAVEOPT" */
#define NBD_REP_MAGIC      0x0003e889045565a9ULL   /* option replies */

/* Server handshake flags (16 bits) */
#define NBD_FLAG_FIXED_NEWSTYLE   (1u << 0)
#define NBD_FLAG_NO_ZEROES        (1u << 1)
/* Client flags (32 bits) */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Transmission flags (16 bits) */
#define NBD_FLAG_HAS_FLAGS          (1u << 0)
#define NBD_FLAG_READ_ONLY          (1u << 1)
#define NBD_FLAG_SEND_FLUSH         (1u << 2)
#define NBD_FLAG_SEND_FUA           (1u << 3)
#define NBD_FLAG_ROTATIONAL         (1u << 4)
#define NBD_FLAG_SEND_TRIM          (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1u << 6)
#define NBD_FLAG_SEND_DF            (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN     (1u << 8)
#define NBD_FLAG_SEND_CACHE         (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO     (1u << 11)

/* Options */
#define NBD_OPT_EXPORT_NAME       1
#define NBD_OPT_ABORT             2
#define NBD_OPT_LIST              3
#define NBD_OPT_STARTTLS          5
#define NBD_OPT_INFO              6
#define NBD_OPT_GO                7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10
#define NBD_OPT_EXTENDED_HEADERS  11

/* Option reply types; errors have bit 31 set */
#define NBD_REP_ACK               1u
#define NBD_REP_SERVER            2u
#define NBD_REP_INFO              3u
#define NBD_REP_META_CONTEXT      4u
#define NBD_REP_FLAG_ERROR        (1u << 31)
#define NBD_REP_ERR_UNSUP         (NBD_REP_FLAG_ERROR | 1)
#define NBD_REP_ERR_POLICY        (NBD_REP_FLAG_ERROR | 2)
#define NBD_REP_ERR_INVALID       (NBD_REP_FLAG_ERROR | 3)
#define NBD_REP_ERR_PLATFORM      (NBD_REP_FLAG_ERROR | 4)
#define NBD_REP_ERR_TLS_REQD      (NBD_REP_FLAG_ERROR | 5)
#define NBD_REP_ERR_UNKNOWN       (NBD_REP_FLAG_ERROR | 6)
#define NBD_REP_ERR_SHUTDOWN      (NBD_REP_FLAG_ERROR | 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR | 8)
#define NBD_REP_ERR_TOO_BIG       (NBD_REP_FLAG_ERROR | 9)
#define NBD_REP_ERR_EXT_HEADER_REQD (NBD_REP_FLAG_ERROR | 10)

/* NBD_REP_INFO payload types (16 bits) */
#define NBD_INFO_EXPORT       0   /* u64 size, u16 transmission flags */
#define NBD_INFO_NAME         1
#define NBD_INFO_DESCRIPTION  2
#define NBD_INFO_BLOCK_SIZE   3   /* u32 minimum, preferred, maximum */

/* Transmission phase */
#define NBD_REQUEST_MAGIC      0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_REQUEST_SIZE       28   /* magic32 flags16 type16 cookie64 offset64 length32 */
#define NBD_SIMPLE_REPLY_SIZE  16   /* magic32 error32 cookie64 */
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu
#define NBD_CHUNK_HDR_SIZE     20   /* magic32 flags16 type16 cookie64 length32 */
#define NBD_OPT_HDR_SIZE       16   /* magic64 option32 length32 */
/* With NBD_OPT_EXTENDED_HEADERS every request and every reply chunk has a
 * 32-byte header; there are no simple replies. */
#define NBD_EXTENDED_REQUEST_MAGIC 0x21e41c71u
#define NBD_EXTENDED_REPLY_MAGIC   0x6e8a278cu
#define NBD_EXT_REQUEST_SIZE   32   /* magic32 flags16 type16 cookie64 offset64 length64 */
#define NBD_EXT_CHUNK_HDR_SIZE 32   /* magic32 flags16 type16 cookie64 offset64 length64 */
#define NBD_REP_HDR_SIZE       20   /* magic64 option32 type32 length32 */

/* Commands */
#define NBD_CMD_READ          0
#define NBD_CMD_WRITE         1
#define NBD_CMD_DISC          2
#define NBD_CMD_FLUSH         3
#define NBD_CMD_TRIM          4
#define NBD_CMD_CACHE         5
#define NBD_CMD_WRITE_ZEROES  6
#define NBD_CMD_BLOCK_STATUS  7

/* Command flags (16 bits) */
#define NBD_CMD_FLAG_FUA        (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE    (1u << 1)
#define NBD_CMD_FLAG_DF         (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE    (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO  (1u << 4)
/* Extended headers only: the length is that of a payload following the
 * header (set on every write), not the length of the range acted on. */
#define NBD_CMD_FLAG_PAYLOAD_LEN (1u << 5)

/* Structured reply chunks */
#define NBD_REPLY_FLAG_DONE          (1u << 0)
#define NBD_REPLY_TYPE_NONE          0
#define NBD_REPLY_TYPE_OFFSET_DATA   1      /* u64 offset, data */
#define NBD_REPLY_TYPE_OFFSET_HOLE   2      /* u64 offset, u32 length */
#define NBD_REPLY_TYPE_BLOCK_STATUS  5      /* u32 context id, {u32 length, u32 flags}... */
/* Extended headers only: u32 context id, u32 descriptor count (0: not
 * given), {u64 length, u32 zero, u32 flags}... */
#define NBD_REPLY_TYPE_BLOCK_STATUS_EXT 6
#define NBD_REPLY_TYPE_ERROR         ((1u << 15) + 1)   /* u32 error, u16 msglen, msg */

/* Meta contexts and their status flags */
#define NBD_META_BASE_ALLOCATION   "base:allocation"
#define NBD_META_QEMU_ALLOC_DEPTH  "qemu:allocation-depth"
#define NBD_STATE_HOLE   (1u << 0)
#define NBD_STATE_ZERO   (1u << 1)

/* Error values in replies (fixed by the protocol, not the host's errno) */
#define NBD_SUCCESS    0
#define NBD_EPERM      1
#define NBD_EIO        5
#define NBD_ENOMEM     12
#define NBD_EINVAL     22
#define NBD_ENOSPC     28
#define NBD_EOVERFLOW  75
#define NBD_ENOTSUP    95
#define NBD_ESHUTDOWN  108

/* Limits this server advertises and enforces */
#define NBD_MAX_PAYLOAD   (32u * 1024 * 1024)  /* NBD_INFO_BLOCK_SIZE maximum */
#define NBD_MAX_STRING    4096                 /* export names, messages */

#endif
