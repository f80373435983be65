/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The kernel types ferry_cbt.bpf.c reads, reduced to the fields it uses and
 * marked preserve_access_index, so libbpf relocates every access against
 * the running kernel's BTF (CO-RE): no vmlinux.h, no kernel headers.
 *
 * Kernel drift this file depends on, one line per shim:
 * - request_queue->disk (the gendisk behind a queue): present in every
 *   kernel ferry tests (6.1, 6.12 and the host's 6.18). A kernel without it
 *   fails the CO-RE relocation at load time; the agent reports that and
 *   `--tracker auto` falls back to scan.
 * - request->cmd_flags: `unsigned int` in older kernels, `blk_opf_t` (a
 *   32-bit __bitwise type) in 6.x: the same 32 bits, one definition serves.
 * - The block_rq_complete tracepoint's error argument changed type over
 *   time (int, then blk_status_t): the program reads only its low byte,
 *   non-zero for a failed request in both (a failed discard is recorded
 *   as a write, to be read back).
 * - block_rq_issue takes only the request since 5.11 ("block: remove the
 *   request_queue argument to request based tracepoints", a54895fa057c);
 *   older kernels fail to load the program and `auto` falls back to scan.
 * - request->__data_len: the bytes a request still has to transfer, read
 *   at issue (the whole request then).
 * - request->bio, bio->bi_next, bio->bi_iter.{bi_sector,bi_size}: a
 *   request's bios, walked for discards (stable since 3.14's bvec_iter).
 * - request->tag (the driver tag: assigned before issue, released after the
 *   completion is traced, or on a requeue) and request->mq_hctx->queue_num:
 *   in every blk-mq kernel (4.x on); they index the `inflight` slots.
 * - REQ_OP_* values are those of include/linux/blk_types.h in 4.10 and
 *   later (the low 8 bits of cmd_flags).
 */
#ifndef FERRY_CORE_FIXES_BPF_H
#define FERRY_CORE_FIXES_BPF_H

struct gendisk {
	int major;
	int first_minor;
} __attribute__((preserve_access_index));

struct request_queue {
	struct gendisk *disk;
} __attribute__((preserve_access_index));

struct bvec_iter {
	unsigned long long bi_sector;
	unsigned int bi_size;
} __attribute__((preserve_access_index));

struct bio {
	struct bio *bi_next;
	struct bvec_iter bi_iter;
} __attribute__((preserve_access_index));

struct blk_mq_hw_ctx {
	unsigned int queue_num;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	struct bio *bio;
	struct blk_mq_hw_ctx *mq_hctx;
	int tag;
	unsigned int cmd_flags;
	unsigned int __data_len;
	unsigned long long __sector;
} __attribute__((preserve_access_index));

#define FERRY_REQ_OP_MASK 0xff
#define FERRY_REQ_OP_WRITE 1
#define FERRY_REQ_OP_DISCARD 3
#define FERRY_REQ_OP_SECURE_ERASE 5
#define FERRY_REQ_OP_WRITE_ZEROES 9
/* Driver-private passthrough writes (ioctl'd commands): their effect on the
 * disk is unknown, so they count as lost. 35 since REQ_OP_DRV_OUT was
 * renumbered in 4.10's op table; odd ops are writes (op_is_write()). */
#define FERRY_REQ_OP_DRV_OUT 35

#endif
