/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * ferry change-tracking ABI: the one definition of the records and the ring
 * shared by the kernel module (cbt-module/kmod), the BPF program
 * (cbt-module/bpf) and userspace (userspace/ring, bound with bindgen by
 * scripts/bindgen.sh into userspace/ring/src/generated.rs).
 *
 * Rules: fixed-width __u types only, explicit padding, no pointers, no enums,
 * no `long`, no kernel-version conditionals. Every struct carries its size
 * assertion below. Changing a layout means bumping FERRY_CBT_ABI_VERSION.
 *
 * Ring layout in shared memory (one page of header, then the slots):
 *
 *   offset 0            struct ferry_cbt_ring_header (4096 bytes)
 *   offset 4096         struct ferry_cbt_record slots[capacity] (capacity = 2^k)
 *   offset data_offset  the data area: data_capacity bytes (2^k, or 0), where
 *                       the kernel module's data mode puts write payloads
 *
 * Single producer (the tracker) and single consumer (the agent). Indices are
 * free-running __u64 counters; slot = index & (capacity - 1). The producer
 * owns `producer` and publishes it with release ordering after writing the
 * slot; the consumer owns `consumer` and publishes it with release ordering
 * after it no longer needs the slots below it. Each side loads the other's
 * index with acquire ordering. Empty when producer == consumer; full when
 * producer - consumer == capacity.
 *
 * The data area (ABI 2; only the kernel module fills it) is a byte ring with
 * free-running indices `data_producer` (producer-owned) and `data_consumer`
 * (consumer-owned), published and loaded like the record indices. A record
 * with FERRY_RECF_DATA carries its `length` bytes of payload in the data
 * area, in record order, with no gaps and no headers. Where the payloads of
 * the records are is implied by that order: the consumer keeps a data
 * cursor D, starting at data_consumer; for each FERRY_RECF_DATA record in
 * turn, if (D mod data_capacity) + length > data_capacity, D first moves to
 * the next multiple of data_capacity (a payload never wraps); the payload is
 * then the bytes at data_offset + (D mod data_capacity), and D advances by
 * `length`. The consumer sets data_consumer to D once it no longer needs the
 * payloads before D, and releases the records before releasing their data.
 */
#ifndef _UAPI_FERRY_CBT_H
#define _UAPI_FERRY_CBT_H

#include <linux/types.h>

#define FERRY_CBT_ABI_VERSION 2

/* "FCBT" little-endian: the ring header's magic. Do not modify. */
#define FERRY_CBT_RING_MAGIC 0x54424346U

/* Record kinds. */
#define FERRY_REC_WRITE 1        /* data written at [offset, offset+length) */
#define FERRY_REC_DISCARD 2      /* range discarded (trim / unmap) */
#define FERRY_REC_WRITE_ZEROES 3 /* range set to zeroes */
#define FERRY_REC_TAG 4          /* consistency marker, length 0 */
/* The kernel module's bitmap mode ended here: changes the bitmap held (all
 * with lower sequence numbers) were handed to the agent at this position,
 * and their writes had completed when it got them. length 0. */
#define FERRY_REC_CATCHUP 5

/* Record flags. */
#define FERRY_RECF_FLUSH 0x0001 /* the bio carried a preflush or FUA */
#define FERRY_RECF_DATA 0x0002  /* the payload is in the data area (data mode) */
#define FERRY_RECF_GROUP 0x0004 /* a TAG placed by GROUP_TAG in several disks at
                                 * once; `offset` holds the caller's cut id */

/* Ring header flags (set by the producer, sticky until the agent resyncs). */
#define FERRY_RINGF_OVERFLOW 0x0001 /* a change was lost: the consumer must resync */

/*
 * One dirty-extent record: 32 bytes, naturally aligned.
 * Offsets and lengths are in bytes from the start of the whole disk.
 */
struct ferry_cbt_record {
	__u64 seq;      /* tracker sequence number, strictly increasing */
	__u64 offset;   /* byte offset on the disk */
	__u32 length;   /* bytes; 0 for FERRY_REC_TAG */
	__u16 kind;     /* FERRY_REC_* */
	__u16 flags;    /* FERRY_RECF_* */
	__u64 time_ns;  /* CLOCK_MONOTONIC ns when the change was seen (0: unknown) */
};

/*
 * Ring header: first page of the shared mapping. The two indices sit on
 * separate cache lines so producer and consumer do not false-share.
 */
struct ferry_cbt_ring_header {
	__u32 size;          /* sizeof(struct ferry_cbt_ring_header) */
	__u32 magic;         /* FERRY_CBT_RING_MAGIC */
	__u32 abi_version;   /* FERRY_CBT_ABI_VERSION */
	__u32 record_size;   /* sizeof(struct ferry_cbt_record) */
	__u64 capacity;      /* slots, a power of two */
	__u64 flags;         /* FERRY_RINGF_*, producer-owned */
	__u64 overflows;     /* changes lost (FERRY_RINGF_OVERFLOW), producer-owned */
	__u64 data_capacity; /* bytes in the data area, 2^k (0: no data area) */
	__u64 data_offset;   /* byte offset of the data area in the mapping */
	__u32 mode;          /* FERRY_CBT_MODE_* (ferry_cbt_ioctl.h), producer-owned */
	__u32 _pad0;
	__u64 producer;      /* offset 64: next slot the producer writes */
	__u64 data_producer; /* offset 72: data-area bytes produced */
	__u8 _pad1[48];
	__u64 consumer;      /* offset 128: next slot the consumer reads */
	__u64 data_consumer; /* offset 136: data-area bytes released */
	__u8 _pad2[3952];
};

#ifdef __cplusplus
#define FERRY_STATIC_ASSERT static_assert
#else
#define FERRY_STATIC_ASSERT _Static_assert
#endif
FERRY_STATIC_ASSERT(sizeof(struct ferry_cbt_record) == 32, "record is 32 bytes");
FERRY_STATIC_ASSERT(sizeof(struct ferry_cbt_ring_header) == 4096, "header is one page");

#endif /* _UAPI_FERRY_CBT_H */
