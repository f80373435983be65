// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: the shared record ring, producer side, and what backs it up.
 *
 * Layout and index rules: ../include/uapi/ferry_cbt.h. The module is the
 * single producer (its lock makes the many submitting CPUs one producer);
 * the agent is the consumer. Slots are filled, then `producer` is published
 * with smp_store_release(); `consumer` is loaded with smp_load_acquire() so
 * the consumer's reads of a slot happen before the producer refills it. The
 * data area works the same way with `data_producer` and `data_consumer`.
 *
 * Each change goes down the mode ladder (ferry_cbt_ioctl.h): a write's
 * payload into the data area (DATA), or its extent alone into the ring
 * (METADATA), or bits into the dirty bitmap (BITMAP). Every write is also
 * entered into the in-flight table until it completes, so that CATCHUP can
 * wait for the writes queued before it: the agent reads the disk only for
 * changes whose writes have completed.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bio.h>
#include <linux/bitmap.h>
#include <linux/hash.h>
#include <linux/mm.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>
#include <linux/vmalloc.h>

#include "cbt.h"

/* Bitmap granularity: 64 KiB, coarser for disks so big that the bitmap
 * would pass 2^27 bits (16 MiB). */
#define FERRY_BITMAP_MIN_SHIFT 16
#define FERRY_BITMAP_MAX_BITS (1ULL << 27)
/* Largest payload copied (with interrupts off); a larger bio is queued as
 * metadata and read back behind the barrier. */
#define FERRY_MAX_PAYLOAD (4U << 20)

int ferry_ring_init(struct ferry_ring *r, u64 capacity, u64 data_bytes, u64 disk_bytes)
{
	struct ferry_cbt_ring_header *h;
	size_t slots_end, bytes, longs;
	u32 i;

	BUILD_BUG_ON(sizeof(struct ferry_cbt_ring_header) != 4096);
	BUILD_BUG_ON(sizeof(struct ferry_cbt_record) != 32);
	BUILD_BUG_ON(offsetof(struct ferry_cbt_ring_header, producer) != 64);
	BUILD_BUG_ON(offsetof(struct ferry_cbt_ring_header, data_producer) != 72);
	BUILD_BUG_ON(offsetof(struct ferry_cbt_ring_header, consumer) != 128);
	BUILD_BUG_ON(offsetof(struct ferry_cbt_ring_header, data_consumer) != 136);
	BUILD_BUG_ON(FERRY_INFLIGHT_BUCKETS != 1 << 10);

	if (!capacity || capacity > FERRY_CBT_MAX_CAPACITY || (capacity & (capacity - 1)))
		return -EINVAL;
	if (data_bytes && (data_bytes < FERRY_CBT_MIN_DATA_BYTES || data_bytes > FERRY_CBT_MAX_DATA_BYTES ||
			   (data_bytes & (data_bytes - 1))))
		return -EINVAL;

	memset(r, 0, sizeof(*r));
	spin_lock_init(&r->lock);
	init_waitqueue_head(&r->drained);
	mutex_init(&r->catchup_lock);

	r->bitmap_shift = FERRY_BITMAP_MIN_SHIFT;
	while (DIV_ROUND_UP_ULL(disk_bytes, 1ULL << r->bitmap_shift) > FERRY_BITMAP_MAX_BITS)
		r->bitmap_shift++;
	r->bitmap_bits = max_t(u64, 1, DIV_ROUND_UP_ULL(disk_bytes, 1ULL << r->bitmap_shift));
	longs = BITS_TO_LONGS(r->bitmap_bits);
	r->bitmap = kvcalloc(longs, sizeof(long), GFP_KERNEL);
	r->spare = kvcalloc(longs, sizeof(long), GFP_KERNEL);
	r->nodes = kvcalloc(FERRY_INFLIGHT_NODES, sizeof(*r->nodes), GFP_KERNEL);
	r->buckets = kvcalloc(FERRY_INFLIGHT_BUCKETS, sizeof(*r->buckets), GFP_KERNEL);
	if (!r->bitmap || !r->spare || !r->nodes || !r->buckets)
		goto nomem;
	for (i = 0; i < FERRY_INFLIGHT_BUCKETS; i++)
		r->buckets[i] = FERRY_INFLIGHT_NONE;
	for (i = 0; i < FERRY_INFLIGHT_NODES; i++)
		r->nodes[i].next = i + 1 < FERRY_INFLIGHT_NODES ? i + 1 : FERRY_INFLIGHT_NONE;
	r->free_node = 0;

	slots_end = PAGE_ALIGN(sizeof(*h) + capacity * sizeof(struct ferry_cbt_record));
	bytes = slots_end + data_bytes;
	/* Zeroed, page-aligned, and marked for remap_vmalloc_range(). */
	h = vmalloc_user(bytes);
	if (!h)
		goto nomem;

	h->size = sizeof(*h);
	h->magic = FERRY_CBT_RING_MAGIC;
	h->abi_version = FERRY_CBT_ABI_VERSION;
	h->record_size = sizeof(struct ferry_cbt_record);
	h->capacity = capacity;
	h->data_capacity = data_bytes;
	h->data_offset = data_bytes ? slots_end : 0;
	r->mode = data_bytes ? FERRY_CBT_MODE_DATA : FERRY_CBT_MODE_METADATA;
	h->mode = r->mode;

	r->hdr = h;
	r->slots = (struct ferry_cbt_record *)((u8 *)h + sizeof(*h));
	r->map_bytes = bytes;
	r->capacity = capacity;
	r->data = data_bytes ? (u8 *)h + slots_end : NULL;
	r->data_capacity = data_bytes;
	r->data_offset = h->data_offset;
	r->data_cap = data_bytes;
	return 0;
nomem:
	ferry_ring_free(r);
	return -ENOMEM;
}

void ferry_ring_free(struct ferry_ring *r)
{
	vfree(r->hdr);
	kvfree(r->bitmap);
	kvfree(r->spare);
	kvfree(r->nodes);
	kvfree(r->buckets);
	r->hdr = NULL;
	r->slots = NULL;
	r->data = NULL;
	r->bitmap = NULL;
	r->spare = NULL;
	r->nodes = NULL;
	r->buckets = NULL;
}

/* A change the consumer will not find anywhere: flag, then count (the
 * order the agent's Rust producer uses too). Sticky until re-attach. */
static void ferry_ring_mark_loss_locked(struct ferry_ring *r)
{
	r->flags |= FERRY_RINGF_OVERFLOW;
	smp_store_release(&r->hdr->flags, r->flags);
	smp_store_release(&r->hdr->overflows, r->lost);
}

static void ferry_set_mode_locked(struct ferry_ring *r, u32 mode)
{
	if (r->mode == mode)
		return;
	r->mode = mode;
	r->mode_changes++;
	smp_store_release(&r->hdr->mode, mode);
}

/* Fill the next slot and publish it; the caller holds r->lock and has
 * checked there is room. Returns the record's sequence number. */
static u64 ferry_ring_fill_locked(struct ferry_ring *r, u64 offset, u32 length, u16 kind, u16 flags)
{
	struct ferry_cbt_record *slot = &r->slots[r->prod & (r->capacity - 1)];
	u64 seq = r->seq++;

	slot->seq = seq;
	slot->offset = offset;
	slot->length = length;
	slot->kind = kind;
	slot->flags = flags;
	/* Under the lock, so time_ns never goes backwards along seq. */
	slot->time_ns = ktime_get_ns();
	r->prod++;
	r->records++;
	/* Publishes the slot written above (and any payload before it). */
	smp_store_release(&r->hdr->producer, r->prod);
	return seq;
}

static bool ferry_ring_full_locked(struct ferry_ring *r)
{
	/*
	 * Full when prod - cons == capacity. A consumer index ahead of the
	 * producer wraps to a huge difference and is treated as full too:
	 * never trust an index the producer did not hand out.
	 */
	return r->prod - smp_load_acquire(&r->hdr->consumer) >= r->capacity;
}

/* Bytes of the data area not yet released (capacity + 1 if the consumer's
 * index is not one the producer handed out). */
static u64 ferry_data_used_locked(struct ferry_ring *r)
{
	u64 used = r->data_prod - smp_load_acquire(&r->hdr->data_consumer);

	return used > r->data_capacity ? r->data_capacity + 1 : used;
}

/*
 * Where a payload of `len` bytes goes, by the rule in ferry_cbt.h (a payload
 * never wraps), or false if it would pass the memory cap.
 */
static bool ferry_data_place_locked(struct ferry_ring *r, u32 len, u64 *pos)
{
	u64 cons = smp_load_acquire(&r->hdr->data_consumer);
	u64 p = r->data_prod;

	if (!len || len > FERRY_MAX_PAYLOAD || r->data_prod - cons > r->data_capacity)
		return false;
	if ((p & (r->data_capacity - 1)) + len > r->data_capacity)
		p = (p | (r->data_capacity - 1)) + 1;
	if (p + len - cons > r->data_cap)
		return false;
	*pos = p;
	return true;
}

static void ferry_copy_payload(u8 *dst, struct bio *bio)
{
	struct bvec_iter iter;
	struct bio_vec bv;

	/* Each segment mapped for the copy (kmap_local for highmem pages). */
	bio_for_each_segment(bv, bio, iter) {
		memcpy_from_bvec(dst, &bv);
		dst += bv.bv_len;
	}
}

static void ferry_bitmap_mark_locked(struct ferry_ring *r, u64 offset, u32 length)
{
	u64 first = offset >> r->bitmap_shift;
	u64 last = (offset + max_t(u32, length, 1) - 1) >> r->bitmap_shift;

	r->bitmap_changes++;
	if (last >= r->bitmap_bits) {
		/* Past the end the disk had at attach (it grew): no bit can
		 * say it. */
		r->lost++;
		ferry_ring_mark_loss_locked(r);
		if (first >= r->bitmap_bits)
			return;
		last = r->bitmap_bits - 1;
	}
	bitmap_set(r->bitmap, first, last - first + 1);
}

/* Enter a write into the in-flight table; false if it is full. */
static bool ferry_inflight_add_locked(struct ferry_ring *r, const struct bio *bio)
{
	u32 n = r->free_node, b;

	if (n == FERRY_INFLIGHT_NONE)
		return false;
	b = hash_ptr((void *)bio, 10);
	r->free_node = r->nodes[n].next;
	r->nodes[n].bio = bio;
	r->nodes[n].epoch = r->epoch & 1;
	r->nodes[n].next = r->buckets[b];
	r->buckets[b] = n;
	r->inflight[r->epoch & 1]++;
	return true;
}

/* Find a write in the table: the link that points at its node, or NULL. */
static u32 *ferry_inflight_find_locked(struct ferry_ring *r, const void *bio)
{
	u32 *link, n;

	for (link = &r->buckets[hash_ptr((void *)bio, 10)]; (n = *link) != FERRY_INFLIGHT_NONE; link = &r->nodes[n].next)
		if (r->nodes[n].bio == bio)
			return link;
	return NULL;
}

/* Take the write out of the table; true if a barrier may now be done. */
static bool ferry_inflight_del_locked(struct ferry_ring *r, const void *bio)
{
	u32 *link = ferry_inflight_find_locked(r, bio), n;

	if (!link)
		return false;
	n = *link;
	*link = r->nodes[n].next;
	r->nodes[n].bio = NULL;
	r->nodes[n].next = r->free_node;
	r->free_node = n;
	return --r->inflight[r->nodes[n].epoch] == 0;
}

/* A write to this disk completed (block_bio_complete). Bios the table does
 * not hold (writes queued before attach) are ignored. */
void ferry_ring_completed(struct ferry_ring *r, const struct bio *bio)
{
	unsigned long irqflags;
	bool wake;

	spin_lock_irqsave(&r->lock, irqflags);
	wake = ferry_inflight_del_locked(r, bio);
	spin_unlock_irqrestore(&r->lock, irqflags);
	if (wake)
		wake_up_all(&r->drained);
}

/* A request completed nr_bytes (block_rq_complete): the bios from `bio` on
 * that those bytes cover in full are done. */
void ferry_ring_rq_completed(struct ferry_ring *r, struct bio *bio, unsigned int nr_bytes)
{
	unsigned long irqflags;
	bool wake = false;

	spin_lock_irqsave(&r->lock, irqflags);
	for (; bio && nr_bytes >= bio->bi_iter.bi_size; bio = bio->bi_next) {
		nr_bytes -= bio->bi_iter.bi_size;
		wake |= ferry_inflight_del_locked(r, bio);
	}
	spin_unlock_irqrestore(&r->lock, irqflags);
	if (wake)
		wake_up_all(&r->drained);
}

/* `split` was cut off `parent` (block_split): it belongs to the parent's
 * barrier epoch. A parent not in the table (queued before attach) leaves
 * the split out too. */
void ferry_ring_split(struct ferry_ring *r, const struct bio *split, const void *parent)
{
	unsigned long irqflags;
	u32 *link, n, b;

	spin_lock_irqsave(&r->lock, irqflags);
	link = ferry_inflight_find_locked(r, parent);
	if (!link)
		goto out;
	n = r->free_node;
	if (n == FERRY_INFLIGHT_NONE) {
		r->untracked++;
		r->lost++;
		ferry_ring_mark_loss_locked(r);
		goto out;
	}
	b = hash_ptr((void *)split, 10);
	r->free_node = r->nodes[n].next;
	r->nodes[n].bio = split;
	r->nodes[n].epoch = r->nodes[*link].epoch;
	r->nodes[n].next = r->buckets[b];
	r->buckets[b] = n;
	r->inflight[r->nodes[n].epoch]++;
out:
	spin_unlock_irqrestore(&r->lock, irqflags);
}

/*
 * Queue one change. Atomic context: no sleeping, no allocation. Every change
 * takes a sequence number, whatever mode records it.
 */
void ferry_ring_push(struct ferry_ring *r, struct bio *bio, u64 offset, u32 length, u16 kind, u16 flags)
{
	unsigned long irqflags;
	u64 pos;

	spin_lock_irqsave(&r->lock, irqflags);
	r->bytes += length;
	if (!ferry_inflight_add_locked(r, bio)) {
		/* CATCHUP could not wait for this write: whatever records it,
		 * a read of its range might miss it. */
		r->untracked++;
		r->lost++;
		ferry_ring_mark_loss_locked(r);
	}
	if (r->mode == FERRY_CBT_MODE_BITMAP)
		goto bitmap;
	if (ferry_ring_full_locked(r)) {
		r->overflows++;
		ferry_set_mode_locked(r, FERRY_CBT_MODE_BITMAP);
		goto bitmap;
	}
	if (kind == FERRY_REC_WRITE && r->data_cap) {
		if (r->mode == FERRY_CBT_MODE_METADATA && ferry_data_used_locked(r) <= r->data_cap / 2)
			ferry_set_mode_locked(r, FERRY_CBT_MODE_DATA);
		if (r->mode == FERRY_CBT_MODE_DATA) {
			if (ferry_data_place_locked(r, length, &pos)) {
				ferry_copy_payload(r->data + (pos & (r->data_capacity - 1)), bio);
				r->data_prod = pos + length;
				smp_store_release(&r->hdr->data_producer, r->data_prod);
				r->data_records++;
				ferry_ring_fill_locked(r, offset, length, kind, flags | FERRY_RECF_DATA);
				goto out;
			}
			ferry_set_mode_locked(r, FERRY_CBT_MODE_METADATA);
		}
	}
	ferry_ring_fill_locked(r, offset, length, kind, flags);
	goto out;
bitmap:
	r->seq++;
	ferry_bitmap_mark_locked(r, offset, length);
out:
	spin_unlock_irqrestore(&r->lock, irqflags);
}

/*
 * Queue a consistency marker at the current position (TAG ioctl). Returns
 * its sequence number through *seq, or -EAGAIN if the ring is full (no
 * sequence number is taken then: nothing was lost). In BITMAP mode the
 * changes before it are in the bitmap, not the ring: the marker waits for
 * CATCHUP (-EAGAIN too).
 */
int ferry_ring_push_tag(struct ferry_ring *r, u64 *seq)
{
	unsigned long irqflags;
	int ret = 0;

	spin_lock_irqsave(&r->lock, irqflags);
	if (ferry_ring_full_locked(r) || r->mode == FERRY_CBT_MODE_BITMAP) {
		ret = -EAGAIN;
		goto out;
	}
	*seq = ferry_ring_fill_locked(r, 0, 0, FERRY_REC_TAG, 0);
out:
	spin_unlock_irqrestore(&r->lock, irqflags);
	return ret;
}

/*
 * GROUP_TAG: rings[] sorted by the caller (a fixed lock order), n <= 8
 * (lockdep subclasses). All locks are taken, each ring checked, then every
 * tag placed, then all released: no change to any of the disks falls
 * between two of the tags.
 */
int ferry_ring_group_tag(struct ferry_ring **rings, unsigned int n, u64 id, u64 *seqs)
{
	unsigned long irqflags;
	unsigned int i;
	int ret = 0;

	local_irq_save(irqflags);
	for (i = 0; i < n; i++)
		spin_lock_nested(&rings[i]->lock, i);
	for (i = 0; i < n; i++) {
		if (ferry_ring_full_locked(rings[i]) || rings[i]->mode == FERRY_CBT_MODE_BITMAP) {
			ret = -EAGAIN;
			goto out;
		}
	}
	for (i = 0; i < n; i++)
		seqs[i] = ferry_ring_fill_locked(rings[i], id, 0, FERRY_REC_TAG, FERRY_RECF_GROUP);
out:
	for (i = n; i-- > 0;)
		spin_unlock(&rings[i]->lock);
	local_irq_restore(irqflags);
	return ret;
}

/* A change no record can describe (see hook.c): the agent must resync. */
void ferry_ring_lost(struct ferry_ring *r, u64 bytes)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	r->bytes += bytes;
	r->seq++;
	r->lost++;
	ferry_ring_mark_loss_locked(r);
	spin_unlock_irqrestore(&r->lock, irqflags);
}

u64 ferry_ring_set_cap(struct ferry_ring *r, u64 cap)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	r->data_cap = min(cap, r->data_capacity);
	/* With no room at all, DATA mode cannot hold; METADATA returns to
	 * DATA by itself once there is room again. */
	if (!r->data_cap && r->mode == FERRY_CBT_MODE_DATA)
		ferry_set_mode_locked(r, FERRY_CBT_MODE_METADATA);
	cap = r->data_cap;
	spin_unlock_irqrestore(&r->lock, irqflags);
	return cap;
}

size_t ferry_ring_bitmap_bytes(const struct ferry_ring *r)
{
	return BITS_TO_LONGS(r->bitmap_bits) * sizeof(long);
}

/* After a successful ferry_ring_catchup(), until ferry_ring_clear_taken():
 * the bitmap it took. The caller holds catchup_lock throughout. */
const void *ferry_ring_taken_bitmap(const struct ferry_ring *r)
{
	return r->spare;
}

void ferry_ring_clear_taken(struct ferry_ring *r)
{
	bitmap_zero(r->spare, r->bitmap_bits);
}

/*
 * CATCHUP (ferry_cbt_ioctl.h), with r->catchup_lock held: swap the bitmap
 * for the empty spare, queue the marker and leave BITMAP mode if the ring
 * has room, then wait for
 * the writes queued before the marker. The taken bits stay in the spare
 * (ferry_ring_taken_bitmap) for the caller to copy out and clear.
 */
int ferry_ring_catchup(struct ferry_ring *r, struct ferry_cbt_catchup *c)
{
	unsigned long irqflags, *taken;
	u32 parity;
	long left;
	u64 t0;


	/* Writes of the older epoch first: normally none are left, but after
	 * a timeout the stuck ones are waited for again before the epoch can
	 * be reused. */
	t0 = ktime_get_ns();
	spin_lock_irqsave(&r->lock, irqflags);
	parity = (r->epoch & 1) ^ 1;
	spin_unlock_irqrestore(&r->lock, irqflags);
	left = wait_event_timeout(r->drained, READ_ONCE(r->inflight[parity]) == 0, 30 * HZ);
	if (!left) {
		c->wait_ns = ktime_get_ns() - t0;
		spin_lock_irqsave(&r->lock, irqflags);
		r->lost++;
		ferry_ring_mark_loss_locked(r);
		spin_unlock_irqrestore(&r->lock, irqflags);
		return -ETIMEDOUT;
	}

	spin_lock_irqsave(&r->lock, irqflags);
	taken = r->bitmap;
	r->bitmap = r->spare;
	r->spare = taken;
	r->catchups++;
	c->out_flags = 0;
	if (ferry_ring_full_locked(r)) {
		/* No room for the marker: everything in the ring precedes the
		 * hand-over, and changes go on into the new bitmap. */
		c->seq = r->seq;
	} else {
		c->seq = ferry_ring_fill_locked(r, 0, 0, FERRY_REC_CATCHUP, 0);
		c->out_flags = FERRY_CBT_CATCHUP_MARKED;
		if (r->mode == FERRY_CBT_MODE_BITMAP)
			ferry_set_mode_locked(r, r->data_cap ? FERRY_CBT_MODE_DATA : FERRY_CBT_MODE_METADATA);
	}
	/* Writes queued from here on count in the other parity (emptied
	 * above). */
	parity = r->epoch & 1;
	r->epoch++;
	spin_unlock_irqrestore(&r->lock, irqflags);

	left = wait_event_timeout(r->drained, READ_ONCE(r->inflight[parity]) == 0, 30 * HZ);
	c->wait_ns = ktime_get_ns() - t0;
	c->bitmap_bits = r->bitmap_bits;
	c->bitmap_block = 1ULL << r->bitmap_shift;
	c->bitmap_dirty = bitmap_weight(taken, r->bitmap_bits);
	if (!left) {
		spin_lock_irqsave(&r->lock, irqflags);
		r->lost++;
		ferry_ring_mark_loss_locked(r);
		spin_unlock_irqrestore(&r->lock, irqflags);
		return -ETIMEDOUT;
	}
	return 0;
}

/* After a drained queue: every write entered into the table has completed
 * (or its completion was missed): start the table over. */
void ferry_ring_forget_inflight(struct ferry_ring *r)
{
	unsigned long irqflags;
	u32 i;

	spin_lock_irqsave(&r->lock, irqflags);
	for (i = 0; i < FERRY_INFLIGHT_BUCKETS; i++)
		r->buckets[i] = FERRY_INFLIGHT_NONE;
	for (i = 0; i < FERRY_INFLIGHT_NODES; i++) {
		r->nodes[i].bio = NULL;
		r->nodes[i].next = i + 1 < FERRY_INFLIGHT_NODES ? i + 1 : FERRY_INFLIGHT_NONE;
	}
	r->free_node = 0;
	r->inflight[0] = 0;
	r->inflight[1] = 0;
	spin_unlock_irqrestore(&r->lock, irqflags);
	wake_up_all(&r->drained);
}

/* Give back bits CATCHUP took but could not hand over (the copy to the
 * caller failed): they go back into the bitmap, and BITMAP mode with them. */
void ferry_ring_untake(struct ferry_ring *r)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	bitmap_or(r->bitmap, r->bitmap, r->spare, r->bitmap_bits);
	ferry_set_mode_locked(r, FERRY_CBT_MODE_BITMAP);
	spin_unlock_irqrestore(&r->lock, irqflags);
	bitmap_zero(r->spare, r->bitmap_bits);
}

/*
 * A clean stop: `map` (zeroed, bitmap-sized) gets the bitmap and the range
 * of every record the consumer has not released, so that nothing the agent
 * has not made durable is forgotten.
 */
void ferry_ring_fold_pending(struct ferry_ring *r, unsigned long *map)
{
	unsigned long irqflags, *live;
	u64 cons, i;

	spin_lock_irqsave(&r->lock, irqflags);
	live = r->bitmap;
	bitmap_copy(map, live, r->bitmap_bits);
	cons = smp_load_acquire(&r->hdr->consumer);
	if (r->prod - cons > r->capacity)
		cons = r->prod - r->capacity; /* a bogus consumer index: all of them */
	r->bitmap = map;
	for (i = cons; i != r->prod; i++) {
		const struct ferry_cbt_record *rec = &r->slots[i & (r->capacity - 1)];

		if (rec->kind == FERRY_REC_WRITE || rec->kind == FERRY_REC_DISCARD || rec->kind == FERRY_REC_WRITE_ZEROES)
			ferry_bitmap_mark_locked(r, rec->offset, rec->length);
	}
	r->bitmap = live;
	spin_unlock_irqrestore(&r->lock, irqflags);
}

/* Module load, before the disk is published: the bitmap of a clean stop. */
void ferry_ring_restore(struct ferry_ring *r, const void *bitmap)
{
	bitmap_copy(r->bitmap, bitmap, r->bitmap_bits);
	if (!bitmap_empty(r->bitmap, r->bitmap_bits)) {
		r->mode = FERRY_CBT_MODE_BITMAP;
		r->hdr->mode = r->mode;
	}
}

void ferry_ring_status(struct ferry_ring *r, struct ferry_cbt_status *st)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	st->mode = r->mode;
	st->capacity = r->capacity;
	st->records = r->records;
	st->overflows = r->overflows;
	st->lost = r->lost;
	st->bytes = r->bytes;
	st->seq = r->seq;
	st->producer = r->prod;
	st->consumer = smp_load_acquire(&r->hdr->consumer);
	st->data_capacity = r->data_capacity;
	st->data_cap = r->data_cap;
	st->data_used = r->data_capacity ? min(ferry_data_used_locked(r), r->data_capacity) : 0;
	st->data_records = r->data_records;
	st->mode_changes = r->mode_changes;
	st->bitmap_changes = r->bitmap_changes;
	st->bitmap_bits = r->bitmap_bits;
	st->bitmap_block = 1ULL << r->bitmap_shift;
	st->catchups = r->catchups;
	st->inflight = r->inflight[0] + r->inflight[1];
	st->untracked = r->untracked;
	spin_unlock_irqrestore(&r->lock, irqflags);
	/* Outside the lock (up to 16 MiB to count): a snapshot, not exact
	 * under concurrent writes. */
	st->bitmap_dirty = bitmap_weight(r->bitmap, r->bitmap_bits);
}
