// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: the interception hook, a probe on the block_bio_queue
 * tracepoint.
 *
 * Where it fires (block/blk-core.c, 6.1 and 6.12): submit_bio_noacct()
 * checks the bio and, for a bio addressed to a partition, calls
 * blk_partition_remap(), which adds the partition's bd_start_sect to
 * bi_iter.bi_sector and sets BIO_REMAPPED but leaves bi_bdev on the
 * partition. Then submit_bio_noacct_nocheck() fires trace_block_bio_queue()
 * once per bio (BIO_TRACE_COMPLETION marks it traced), before blk-mq splits
 * or merges it. So the probe sees each submitted bio once, whole, with a
 * whole-disk sector, and bi_bdev->bd_disk names the disk. Verified in the
 * 6.1 and 6.12 guests by tests/guest/kmod-test.sh (writes through a
 * partition are recorded at the partition start plus the offset).
 * Defensively, a partition bio that arrives without BIO_REMAPPED is rebased
 * here, and the first one is logged (it would mean a kernel that traces
 * before remapping).
 *
 * In data mode the probe copies the payload: at this point the bio holds
 * the data the device will be given (the submitter must not change pages
 * under a write in flight; where a filesystem does without stable pages, a
 * page changed during the write is written again, and that later write
 * carries the final content).
 *
 * Completions take each write out of the in-flight table that CATCHUP
 * waits on. Three more probes see them:
 *   - block_rq_complete, for blk-mq disks (virtio-blk, loop, NVMe, SCSI):
 *     blk_update_request() and blk_complete_request() fire it with the
 *     request's bios still linked from rq->bio, then clear each bio's
 *     BIO_TRACE_COMPLETION ("completion has already been traced"), so
 *     bio_endio() does not fire block_bio_complete for them. The probe
 *     walks the bios the nr_bytes completed cover.
 *   - block_bio_complete, for bio-based drivers: bio_endio() fires it for
 *     bios still marked BIO_TRACE_COMPLETION.
 *   - block_split: blk-mq splits a bio too big for one request after
 *     block_bio_queue saw it whole; the split-off front part (a new bio,
 *     chained to the original through bi_private) completes on its own, so
 *     it is entered into the table beside the original.
 *
 * Context: called with preemption disabled (tracepoint), possibly with
 * interrupts disabled. Nothing here sleeps or allocates.
 *
 * Not seen by this hook, by construction of the tracepoint: passthrough
 * commands (SG_IO, NVMe passthrough: no bio through submit_bio), and a bio
 * that a stacking driver re-targets and resubmits itself (md raid0/linear
 * call bio_set_dev() on the same bio; it was traced once, at the md device).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bio.h>
#include <linux/blk-mq.h>
#include <linux/blk_types.h>
#include <linux/rcupdate.h>

#include "cbt.h"

static u16 ferry_kind(enum req_op op)
{
	switch (op) {
	case REQ_OP_WRITE:
		return FERRY_REC_WRITE;
	case REQ_OP_DISCARD:
	case REQ_OP_SECURE_ERASE:
		return FERRY_REC_DISCARD;
	case REQ_OP_WRITE_ZEROES:
		return FERRY_REC_WRITE_ZEROES;
	default:
		/* Zone append (lands where the write pointer is, not at
		 * bi_sector), zone management, driver-private: no extent
		 * record describes them. */
		return 0;
	}
}

void ferry_hook_bio_queue(void *data, struct bio *bio)
{
	struct block_device *bdev = bio->bi_bdev;
	enum req_op op = bio_op(bio);
	u32 length = bio->bi_iter.bi_size;
	struct ferry_disk *fd;
	sector_t sector;
	u16 kind, flags;

	/* Reads, flushes and driver-in commands change nothing. */
	if (!op_is_write(op) || !bdev)
		return;

	rcu_read_lock();
	if (!READ_ONCE(ferry_nr_attached))
		goto out;
	fd = ferry_find_disk_rcu(bdev->bd_disk);
	if (!fd)
		goto out;
	kind = ferry_kind(op);
	if (!kind) {
		ferry_ring_lost(&fd->ring, length);
		goto out;
	}
	/* An empty write is a bare preflush: no data changes. */
	if (!length)
		goto out;
	sector = bio->bi_iter.bi_sector;
	if (bdev_is_partition(bdev) && !bio_flagged(bio, BIO_REMAPPED)) {
		pr_info_once("a partition bio reached block_bio_queue before its remap; %s\n",
			     "rebasing by the partition start");
		sector += bdev->bd_start_sect;
	}
	flags = (bio->bi_opf & (REQ_PREFLUSH | REQ_FUA)) ? FERRY_RECF_FLUSH : 0;
	ferry_ring_push(&fd->ring, bio, (u64)sector << SECTOR_SHIFT, length, kind, flags);
out:
	rcu_read_unlock();
}

void ferry_hook_bio_complete(void *data, struct request_queue *q, struct bio *bio)
{
	struct block_device *bdev = bio->bi_bdev;
	struct ferry_disk *fd;

	if (!op_is_write(bio_op(bio)) || !bdev)
		return;
	rcu_read_lock();
	if (READ_ONCE(ferry_nr_attached)) {
		fd = ferry_find_disk_rcu(bdev->bd_disk);
		if (fd)
			ferry_ring_completed(&fd->ring, bio);
	}
	rcu_read_unlock();
}

/* Called with the request's bios linked and not yet advanced. */
void ferry_hook_rq_complete(void *data, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct bio *bio = rq->bio;
	struct ferry_disk *fd;

	if (!bio || !op_is_write(req_op(rq)) || !bio->bi_bdev)
		return;
	rcu_read_lock();
	if (READ_ONCE(ferry_nr_attached)) {
		fd = ferry_find_disk_rcu(bio->bi_bdev->bd_disk);
		if (fd)
			ferry_ring_rq_completed(&fd->ring, bio, nr_bytes);
	}
	rcu_read_unlock();
}

/* `split` was cut off the front of the bio in its bi_private (bio_chain()
 * ran just before); that pointer is only compared, never followed. */
void ferry_hook_split(void *data, struct bio *split, unsigned int new_sector)
{
	struct block_device *bdev = split->bi_bdev;
	struct ferry_disk *fd;

	/* Only blk-mq splits complete on their own (block_rq_complete); a
	 * bio-based driver's split is chained to its original, whose own
	 * completion comes after it. */
	if (!op_is_write(bio_op(split)) || !bdev || !queue_is_mq(bdev_get_queue(bdev)))
		return;
	rcu_read_lock();
	if (READ_ONCE(ferry_nr_attached)) {
		fd = ferry_find_disk_rcu(bdev->bd_disk);
		if (fd)
			ferry_ring_split(&fd->ring, split, split->bi_private);
	}
	rcu_read_unlock();
}
