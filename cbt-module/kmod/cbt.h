/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * ferry_cbt: internal declarations shared by the module's parts.
 *
 *   main.c  module init/exit; finds and attaches the tracepoint
 *   hook.c  the block_bio_queue probe (atomic context: classify, map, push)
 *   ring.c  the shared SPSC ring: allocation, the producer side, the data
 *           area (data mode), the dirty bitmap (bitmap mode) and the
 *           table of writes in flight (the completion barrier)
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
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/version.h>
#include <linux/wait.h>

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

/*
 * Writes in flight: one node per write queued and not yet completed, found
 * by bio address (a bio is not reused before it completes). Fixed size,
 * allocated at attach; a write that finds it full is counted as lost (the
 * completion barrier could not cover it).
 */
#define FERRY_INFLIGHT_NODES 4096
#define FERRY_INFLIGHT_BUCKETS 1024
#define FERRY_INFLIGHT_NONE 0xffffffffU

struct ferry_inflight_node {
	const struct bio *bio;
	u32 next;  /* next node in the bucket, or in the free list */
	u32 epoch; /* the barrier epoch's parity when it was queued */
};

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

	/* Data mode: the data area after the slots (inside the same
	 * allocation), its producer index, the memory cap. */
	u8 *data;
	u64 data_capacity;
	u64 data_offset;
	u64 data_prod;
	u64 data_cap;
	u64 data_records;
	u32 mode;          /* FERRY_CBT_MODE_* */
	u64 mode_changes;

	/* Bitmap mode: one bit per bitmap_block bytes of the disk. `spare` is
	 * the empty bitmap CATCHUP swaps in. */
	unsigned long *bitmap;
	unsigned long *spare;
	u64 bitmap_bits;
	u32 bitmap_shift;  /* log2(bitmap_block) */
	u64 bitmap_changes;
	u64 bitmap_dirty;
	u64 catchups;

	/* Writes in flight (see struct ferry_inflight_node). */
	struct ferry_inflight_node *nodes;
	u32 *buckets;
	u32 free_node;
	u32 epoch;
	u64 inflight[2];   /* per epoch parity */
	u64 untracked;
	wait_queue_head_t drained;
	/* Serializes CATCHUP calls (a barrier at a time). */
	struct mutex catchup_lock;
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
	u64 disk_bytes;    /* at attach */
	u64 attach_id;     /* random, per attachment */
	u32 out_flags;     /* FERRY_CBT_ATTACHED_RESTORED / _UNCLEAN, if restored */
	u64 restored_seq;  /* the state file's next_seq, if restored */
	struct ferry_ring ring;
};

/* ring.c */
int ferry_ring_init(struct ferry_ring *r, u64 capacity, u64 data_bytes, u64 disk_bytes);
void ferry_ring_free(struct ferry_ring *r);
void ferry_ring_push(struct ferry_ring *r, struct bio *bio, u64 offset, u32 length, u16 kind, u16 flags);
void ferry_ring_lost(struct ferry_ring *r, u64 bytes);
int ferry_ring_push_tag(struct ferry_ring *r, u64 *seq);
void ferry_ring_status(struct ferry_ring *r, struct ferry_cbt_status *st);
void ferry_ring_completed(struct ferry_ring *r, const struct bio *bio);
void ferry_ring_rq_completed(struct ferry_ring *r, struct bio *bio, unsigned int nr_bytes);
void ferry_ring_split(struct ferry_ring *r, const struct bio *split, const void *parent);
u64 ferry_ring_set_cap(struct ferry_ring *r, u64 cap);
int ferry_ring_catchup(struct ferry_ring *r, struct ferry_cbt_catchup *c);
size_t ferry_ring_bitmap_bytes(const struct ferry_ring *r);
const void *ferry_ring_taken_bitmap(const struct ferry_ring *r);
void ferry_ring_clear_taken(struct ferry_ring *r);
void ferry_ring_untake(struct ferry_ring *r);
void ferry_ring_forget_inflight(struct ferry_ring *r);
int ferry_ring_group_tag(struct ferry_ring **rings, unsigned int n, u64 id, u64 *seqs);
void ferry_ring_fold_pending(struct ferry_ring *r, unsigned long *map);
void ferry_ring_restore(struct ferry_ring *r, const void *bitmap);

/* persist.c */
extern char *ferry_state_dir;
int ferry_persist_active(struct ferry_disk *fd);
int ferry_persist_clean(struct ferry_disk *fd);
int ferry_persist_load(u32 major, u32 minor, u64 disk_bytes, struct ferry_cbt_saved *h, bool *clean, void **bitmap);

/* hook.c */
void ferry_hook_bio_queue(void *data, struct bio *bio);
void ferry_hook_bio_complete(void *data, struct request_queue *q, struct bio *bio);
void ferry_hook_rq_complete(void *data, struct request *rq, blk_status_t error, unsigned int nr_bytes);
void ferry_hook_split(void *data, struct bio *split, unsigned int new_sector);

/* ctl.c */
extern int ferry_nr_attached; /* READ_ONCE() by the hook: a fast "no" */
struct ferry_disk *ferry_find_disk_rcu(const struct gendisk *disk);
int ferry_ctl_init(void);
void ferry_ctl_unregister(void);
void ferry_ctl_unpublish_all(void);
void ferry_ctl_release_unpublished(void);
void ferry_ctl_restore(const char *list);
void ferry_ctl_save_all(void);
bool ferry_disk_tracked(const struct gendisk *disk);

#endif /* FERRY_CBT_INTERNAL_H */
