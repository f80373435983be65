/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * ferry_cbt: internal declarations shared by the module's parts.
 *
 *   main.c  module init/exit; finds and attaches the tracepoint
 *   hook.c  the block_bio_queue probe (atomic context: classify, map, push)
 *   ring.c  the shared SPSC ring: allocation and the producer side
 *   ctl.c   the control path: /dev/ferry-cbt, the attach table, mmap
 *
 * Lifetime of a tracked disk (struct ferry_disk):
 *   - published in the attach table with rcu_assign_pointer() by ATTACH;
 *   - the hook looks it up under rcu_read_lock() and touches only ->disk
 *     (compared, never dereferenced) and ->ring (under ring.lock);
 *   - DETACH (or unload) unpublishes it, waits for every running probe with
 *     synchronize_rcu(), closes the block device, then drops the table's
 *     reference;
 *   - each mapping of the ring holds a reference (vm_ops open/close), so the
 *     ring memory outlives DETACH until the last munmap.
 */
#ifndef FERRY_CBT_INTERNAL_H
#define FERRY_CBT_INTERNAL_H

#include <linux/blkdev.h>
#include <linux/kref.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/version.h>

#include "ferry_cbt.h"
#include "ferry_cbt_ioctl.h"

/*
 * Kernels this module is built and tested against: Debian 12's 6.1 and
 * 6.12. The block-device open API changed in between (blkdev_get_by_dev()
 * took a blk_mode_t and holder ops in 6.5, bdev_open_by_dev() returned a
 * bdev_handle in 6.7, bdev_file_open_by_dev() returns a struct file since
 * 6.9); only the 6.1 form and the 6.9+ form are written and compiled here.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0)
#error "ferry_cbt needs Linux 6.1 or later"
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0) && LINUX_VERSION_CODE < KERNEL_VERSION(6, 9, 0)
#error "ferry_cbt: Linux 6.5 to 6.8 are not supported yet (block device open API)"
#endif

/* Attach table size; the low bits of a handle are the table index. */
#define FERRY_MAX_DISKS 64
#define FERRY_HANDLE_IDX_BITS 6

/* The ring of one disk: shared memory plus the producer's private state. */
struct ferry_ring {
	/* vmalloc_user() memory, mapped by the consumer: header page, slots. */
	struct ferry_cbt_ring_header *hdr;
	struct ferry_cbt_record *slots;
	size_t map_bytes; /* page-aligned size of the allocation */
	u64 capacity;     /* power of two */

	/*
	 * Serializes the producer side: bios for one disk are submitted on
	 * many CPUs at once, while the ring has a single producer. Taken with
	 * interrupts off (a bio may be submitted from any context).
	 *
	 * Everything below is the producer's own copy. The shared header is
	 * written from it and never read back (except `consumer`), so a
	 * consumer that scribbles over the mapping cannot steer the producer.
	 */
	spinlock_t lock;
	u64 prod;          /* next index to fill */
	u64 seq;           /* next sequence number: every change seen */
	u64 flags;         /* FERRY_RINGF_* */
	u64 overflows;     /* changes that found the ring full */
	u64 lost;          /* changes no record can describe */
	u64 records;       /* records queued */
	u64 bytes;         /* bytes of every change seen */
};

struct ferry_disk {
	struct kref ref;
	/* The attached whole disk: only compared by the hook. Kept alive by
	 * the open block device below until DETACH. */
	struct gendisk *disk;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	struct file *bdev_file;
#else
	struct block_device *bdev;
#endif
	u32 handle;
	u32 major;
	u32 minor;
	struct ferry_ring ring;
};

/* ring.c */
int ferry_ring_init(struct ferry_ring *r, u64 capacity);
void ferry_ring_free(struct ferry_ring *r);
void ferry_ring_push(struct ferry_ring *r, u64 offset, u32 length, u16 kind, u16 flags);
void ferry_ring_lost(struct ferry_ring *r, u64 bytes);
int ferry_ring_push_tag(struct ferry_ring *r, u64 *seq);
void ferry_ring_status(struct ferry_ring *r, struct ferry_cbt_status *st);

/* hook.c */
void ferry_hook_bio_queue(void *data, struct bio *bio);

/* ctl.c */
extern int ferry_nr_attached; /* READ_ONCE() by the hook: a fast "no" */
struct ferry_disk *ferry_find_disk_rcu(const struct gendisk *disk);
int ferry_ctl_init(void);
void ferry_ctl_unregister(void);
void ferry_ctl_unpublish_all(void);
void ferry_ctl_release_unpublished(void);

#endif /* FERRY_CBT_INTERNAL_H */
