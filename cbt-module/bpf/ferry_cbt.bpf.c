// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry's CO-RE change tracker: records every completed write, discard and
 * write-zeroes request of one protected disk.
 *
 * Hook: tp_btf/block_rq_complete. A record is made when the device reports
 * the bytes done, so an agent that reads the range after seeing the record
 * reads the new data (docs/consistency.md). Each completion of a blk-mq
 * request is traced once; the request's sector is on the whole disk, and a
 * protected partition is selected and rebased with part_start/part_sectors.
 *
 * Outputs:
 *  - `events`, a BPF ring buffer of struct ferry_cbt_record (the uapi
 *    header's record), drained by the agent;
 *  - `bitmap`, an mmap-able array of u64 words, one bit per 2^chunk_shift
 *    bytes: set only when a record cannot be reserved (the backstop), and
 *    cleared by the agent with an atomic exchange when it takes the bits;
 *  - `stats`: counters; `lost` counts changes neither output could hold
 *    (a range wider than the bitmap loop covers), which makes the agent
 *    resync by checksum.
 *
 * Missed completions. On some kernels a BPF program attached to
 * block_rq_complete is, rarely, not run for a completion that the
 * tracepoint does report (seen on the 6.18 host this project is developed
 * on: completions processed in softirq on behalf of one particular task,
 * for both tp_btf and classic tracepoint programs, with no recursion miss
 * counted; docs/decisions.md). So every protected write is also seen at
 * issue (tp_btf/block_rq_issue) and kept in `inflight`, a slot per driver
 * tag (hardware queue * tags per queue + tag), until its completion clears
 * it; a tag is reused only after its request completed:
 *  - an issue that finds its slot still taken means the earlier request
 *    with that tag completed unseen: its range goes to the bitmap and
 *    `recovered` counts it (the tag has been reused, so that write has
 *    completed: reading it now reads the new data);
 *  - entries that stay behind are read by the agent, which ships their
 *    ranges (at the latest when it cuts a point) and counts their bytes in
 *    its cross-check against the device's own statistics.
 *
 * test_skip_every (fault injection, tests only): pretend the kernel did not
 * run this program for every Nth protected completion.
 *
 * Configuration is read-only data set by the agent before load.
 *
 * Kernel structures are read directly (tp_btf arguments are BTF-typed
 * pointers: plain loads, relocated by CO-RE through the types in
 * core_fixes.bpf.h) rather than with BPF_CORE_READ, whose helper call per
 * field cost about a fifth of a loop device's 4 KiB write IOPS.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "core_fixes.bpf.h"
#include "../include/uapi/ferry_cbt.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u32 target_major = 0;
const volatile __u32 target_minor = 0;
/* A partition: its first sector on the whole disk and its length in
 * sectors. part_sectors == 0 protects the whole disk. */
const volatile __u64 part_start = 0;
const volatile __u64 part_sectors = 0;
const volatile __u32 chunk_shift = 16;
const volatile __u64 bitmap_words = 1;
/* Fault injection for tests: 0 = off. */
const volatile __u32 test_skip_every = 0;
/* `inflight` geometry: driver tags per hardware queue, and slots in all. */
const volatile __u32 slot_stride = 128;
const volatile __u32 slot_count = 128;
/* The disk's queue/max_discard_segments is above 1: a discard request may
 * hold ranges that are not contiguous. */
const volatile __u32 discard_multi = 0;

/* Most bitmap words one completion may touch (2^chunk_shift * 64 * 256). */
#define MAX_WORDS 256

/* Per-CPU counters (the agent sums them): no cache line shared between
 * CPUs on the write path. */
struct ferry_cbt_bpf_stats {
	__u64 unused;  /* was the record sequence: see `seqs` */
	__u64 records; /* records queued */
	__u64 drops;   /* records that fell back to the bitmap */
	__u64 lost;    /* changes recorded nowhere: resync required */
	__u64 bytes;   /* bytes of changes seen */
	__u64 recovered;       /* completions not seen, caught when their request was reused */
	__u64 recovered_bytes; /* their bytes (sent to the bitmap) */
	__u64 injected;        /* completions skipped by test_skip_every */
	__u64 unused2;
	__u64 unguarded;       /* issues with a tag outside `inflight` (not remembered) */
};

/* A protected write between issue and completion: one slot per driver tag.
 * `rq` (the request's address) is 0 when the slot is free. `gen` is a
 * sequence lock: odd while the program rewrites the slot, and the agent
 * keeps a read only if `gen` was even and unchanged around it. Only one
 * request holds a tag at a time, so a slot has one writer at a time. */
struct ferry_inflight {
	__u64 gen;
	__u64 rq;
	__u64 start; /* bytes, relative to the protected device */
	__u64 end;
};

#define FERRY_WRITE_ONCE(x, v) (*(volatile __u64 *)&(x) = (v))

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* set by the agent before load */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1); /* set by the agent before load */
} bitmap SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ferry_cbt_bpf_stats);
	__uint(max_entries, 1);
} stats SEC(".maps");

/* Shared by all CPUs: [0] the next record sequence number, [1] the
 * protected completions counted for test_skip_every. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} seqs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct ferry_inflight);
	__uint(max_entries, 1); /* slot_count, set by the agent before load */
} inflight SEC(".maps");

static __always_inline void mark_bitmap(struct ferry_cbt_bpf_stats *st, __u64 start, __u64 end);

/* The write a slot held completed without this program seeing it: its
 * range goes to the bitmap. Bits first, then the counters. */
static __always_inline void recover(struct ferry_cbt_bpf_stats *st, __u64 a, __u64 b)
{
	if (b > a) {
		mark_bitmap(st, a, b);
		__sync_fetch_and_add(&st->recovered_bytes, b - a);
	}
	__sync_fetch_and_add(&st->recovered, 1);
}

/* The slot of a request's driver tag, or NULL. */
static __always_inline struct ferry_inflight *slot_of(struct request *rq)
{
	int tag = rq->tag;
	__u32 q = rq->mq_hctx->queue_num;
	__u32 i;

	if (tag < 0 || (__u32)tag >= slot_stride)
		return NULL;
	i = q * slot_stride + (__u32)tag;
	if (i >= slot_count)
		return NULL;
	return bpf_map_lookup_elem(&inflight, &i);
}

static __always_inline void mark_bitmap(struct ferry_cbt_bpf_stats *st, __u64 start, __u64 end)
{
	__u64 first = start >> chunk_shift;
	__u64 last = (end - 1) >> chunk_shift;
	__u64 w0 = first >> 6, w1 = last >> 6;

	if (w1 >= bitmap_words || w1 - w0 >= MAX_WORDS) {
		__sync_fetch_and_add(&st->lost, 1);
		return;
	}
	for (int i = 0; i < MAX_WORDS; i++) {
		__u32 w = w0 + i;
		__u64 mask = ~0ULL;
		__u64 *word;

		if (w > w1)
			break;
		if (w == w0)
			mask &= ~0ULL << (first & 63);
		if (w == w1 && (last & 63) != 63)
			mask &= (1ULL << ((last & 63) + 1)) - 1;
		word = bpf_map_lookup_elem(&bitmap, &w);
		if (!word) {
			__sync_fetch_and_add(&st->lost, 1);
			return;
		}
		__sync_fetch_and_or(word, mask);
	}
}

/* Whether a discard request's bios follow each other with no gap. */
static __always_inline int discard_contiguous(struct request *rq)
{
	struct bio *b = rq->bio;
	__u64 next;

	if (!discard_multi || !b)
		return 1;
	next = b->bi_iter.bi_sector + (b->bi_iter.bi_size >> 9);
	b = b->bi_next;
	for (int i = 0; i < 256; i++) {
		if (!b)
			return 1;
		if (b->bi_iter.bi_sector != next)
			return 0;
		next += b->bi_iter.bi_size >> 9;
		b = b->bi_next;
	}
	return !b;
}

/*
 * The protected byte range [*start, *end) a request of nbytes at its current
 * sector changes, and its record kind. Returns 1 for a protected change,
 * 0 for anything else, -1 for a write whose effect is unknown (lost).
 */
static __always_inline int rq_range(struct request *rq, __u64 nbytes, __u64 *startp, __u64 *endp, __u16 *kindp)
{
	struct gendisk *disk;
	__u32 op;
	__u64 start, end;

	if (!nbytes)
		return 0;
	disk = rq->q->disk;
	if (!disk)
		return 0;
	if (disk->major != target_major || disk->first_minor != target_minor)
		return 0;
	op = rq->cmd_flags & FERRY_REQ_OP_MASK;
	/* Odd ops write (the kernel's op_is_write()); even ones (read, flush,
	 * driver-in) do not change the disk. */
	if (!(op & 1))
		return 0;
	switch (op) {
	case FERRY_REQ_OP_DISCARD:
	case FERRY_REQ_OP_SECURE_ERASE:
		/* Disks that take several discard ranges per command (NVMe,
		 * virtio-blk with max_discard_segments > 1) merge discards
		 * that are not contiguous into one request, whose sector and
		 * length then describe no single range. On such disks the
		 * bios are checked; a gap (or more than 257 bios) counts the
		 * request as lost (a checksum resync) rather than recording it
		 * wrongly. Other disks merge only contiguous discards. */
		if (!discard_contiguous(rq))
			return -1;
		*kindp = FERRY_REC_DISCARD;
		break;
	case FERRY_REQ_OP_WRITE_ZEROES:
		*kindp = FERRY_REC_WRITE_ZEROES;
		break;
	case FERRY_REQ_OP_DRV_OUT:
		return -1;
	default:
		/* WRITE, and any other writing op (write-same, zone append):
		 * its range changed. */
		*kindp = FERRY_REC_WRITE;
		break;
	}
	start = rq->__sector << 9;
	end = start + nbytes;
	if (part_sectors) {
		__u64 ps = part_start << 9, pe = (part_start + part_sectors) << 9;

		if (end <= ps || start >= pe)
			return 0;
		start = start < ps ? 0 : start - ps;
		end = (end > pe ? pe : end) - ps;
	}
	*startp = start;
	*endp = end;
	return 1;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(ferry_rq_issue, struct request *rq)
{
	struct ferry_cbt_bpf_stats *st;
	struct ferry_inflight *e, v = {};
	__u64 key = (__u64)rq;
	__u32 zero = 0;
	__u16 kind = 0;
	int r;

	r = rq_range(rq, rq->__data_len, &v.start, &v.end, &kind);
	if (!r)
		return 0;
	st = bpf_map_lookup_elem(&stats, &zero);
	if (!st)
		return 0;
	if (r < 0) {
		/* Counted here too, in case its completion is not seen. */
		__sync_fetch_and_add(&st->lost, 1);
		return 0;
	}
	e = slot_of(rq);
	if (!e) {
		__sync_fetch_and_add(&st->unguarded, 1);
		return 0;
	}
	/* A taken slot: the previous request with this tag completed without
	 * this program seeing it (the tag was free again) - unless it is the
	 * same request issued again after a requeue, or the same range
	 * rewritten on the same tag: then this request's own completion, or
	 * this slot, covers its data. */
	if (e->rq) {
		if (e->rq == key && e->start == v.start && e->end == v.end)
			/* Its data is covered; its bytes still count for the
			 * agent's cross-check (a requeue's bytes then count
			 * twice: a little slack, never a false alarm). */
			__sync_fetch_and_add(&st->recovered_bytes, v.end - v.start);
		else
			recover(st, e->start, e->end);
	}
	__sync_fetch_and_add(&e->gen, 1);
	FERRY_WRITE_ONCE(e->start, v.start);
	FERRY_WRITE_ONCE(e->end, v.end);
	FERRY_WRITE_ONCE(e->rq, key);
	__sync_fetch_and_add(&e->gen, 1);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(ferry_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	struct ferry_cbt_record *rec;
	struct ferry_cbt_bpf_stats *st;
	struct ferry_inflight *e;
	__u64 key = (__u64)rq;
	__u32 zero = 0;
	__u16 kind = 0;
	__u64 start = 0, end = 0;
	int r;

	r = rq_range(rq, nr_bytes, &start, &end, &kind);
	if (!r)
		return 0;
	st = bpf_map_lookup_elem(&stats, &zero);
	if (!st)
		return 0;
	if (r < 0) {
		__sync_fetch_and_add(&st->lost, 1);
		return 0;
	}
	if (test_skip_every) {
		__u32 one = 1;
		__u64 *c = bpf_map_lookup_elem(&seqs, &one);
		__u64 n = c ? __sync_fetch_and_add(c, 1) + 1 : 0;

		if (n && n % test_skip_every == 0) {
			__sync_fetch_and_add(&st->injected, 1);
			return 0;
		}
	}
	e = slot_of(rq);
	if (e && e->rq == key) {
		/* With no I/O scheduler every request on a tag has the same
		 * address: a slot that does not start where this completion
		 * does holds an earlier request whose completion (and this
		 * one's issue) was not seen. */
		if (e->start != start)
			recover(st, e->start, e->end);
		__sync_fetch_and_add(&e->gen, 1);
		if (end >= e->end)
			FERRY_WRITE_ONCE(e->rq, 0);
		else
			FERRY_WRITE_ONCE(e->start, end); /* a partial completion: the rest is pending */
		__sync_fetch_and_add(&e->gen, 1);
	}
	__sync_fetch_and_add(&st->bytes, end - start);
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (!rec) {
		/* Bits first, then the counter: an agent that sees the counter
		 * move and then takes the bits finds these bits among them. */
		mark_bitmap(st, start, end);
		__sync_fetch_and_add(&st->drops, 1);
		return 0;
	}
	{
		__u64 *sq = bpf_map_lookup_elem(&seqs, &zero);

		rec->seq = sq ? __sync_fetch_and_add(sq, 1) : 0;
	}
	rec->offset = start;
	rec->length = end - start;
	/* A discard that failed left the old bytes in place: the agent must
	 * read the range back rather than take it for zeroes. The error is an
	 * int in older kernels and a blk_status_t (u8) in 6.x: its low byte is
	 * non-zero exactly when the request failed. */
	if (kind == FERRY_REC_DISCARD && (__u8)error)
		kind = FERRY_REC_WRITE;
	rec->kind = kind;
	rec->flags = 0;
	rec->time_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(rec, 0);
	__sync_fetch_and_add(&st->records, 1);
	return 0;
}
