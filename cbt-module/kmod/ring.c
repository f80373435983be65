// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: the shared record ring, producer side.
 *
 * Layout and index rules: ../include/uapi/ferry_cbt.h. The module is the
 * single producer (its lock makes the many submitting CPUs one producer);
 * the agent is the consumer. Slots are filled, then `producer` is published
 * with smp_store_release(); `consumer` is loaded with smp_load_acquire() so
 * the consumer's reads of a slot happen before the producer refills it.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/mm.h>
#include <linux/timekeeping.h>
#include <linux/vmalloc.h>

#include "cbt.h"

int ferry_ring_init(struct ferry_ring *r, u64 capacity)
{
	struct ferry_cbt_ring_header *h;
	size_t bytes;

	BUILD_BUG_ON(sizeof(struct ferry_cbt_ring_header) != 4096);
	BUILD_BUG_ON(sizeof(struct ferry_cbt_record) != 32);
	BUILD_BUG_ON(offsetof(struct ferry_cbt_ring_header, producer) != 64);
	BUILD_BUG_ON(offsetof(struct ferry_cbt_ring_header, consumer) != 128);

	if (!capacity || capacity > FERRY_CBT_MAX_CAPACITY || (capacity & (capacity - 1)))
		return -EINVAL;
	bytes = PAGE_ALIGN(sizeof(*h) + capacity * sizeof(struct ferry_cbt_record));
	/* Zeroed, page-aligned, and marked for remap_vmalloc_range(). */
	h = vmalloc_user(bytes);
	if (!h)
		return -ENOMEM;

	h->size = sizeof(*h);
	h->magic = FERRY_CBT_RING_MAGIC;
	h->abi_version = FERRY_CBT_ABI_VERSION;
	h->record_size = sizeof(struct ferry_cbt_record);
	h->capacity = capacity;
	h->flags = 0;
	h->overflows = 0;
	h->producer = 0;
	h->consumer = 0;

	memset(r, 0, sizeof(*r));
	spin_lock_init(&r->lock);
	r->hdr = h;
	r->slots = (struct ferry_cbt_record *)((u8 *)h + sizeof(*h));
	r->map_bytes = bytes;
	r->capacity = capacity;
	return 0;
}

void ferry_ring_free(struct ferry_ring *r)
{
	vfree(r->hdr);
	r->hdr = NULL;
	r->slots = NULL;
}

/* A change the consumer will not find in the ring: flag, then count (the
 * order the agent's Rust producer uses too). Sticky until re-attach. */
static void ferry_ring_mark_loss_locked(struct ferry_ring *r)
{
	r->flags |= FERRY_RINGF_OVERFLOW;
	smp_store_release(&r->hdr->flags, r->flags);
	smp_store_release(&r->hdr->overflows, r->overflows + r->lost);
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
	/* Publishes the slot written above. */
	smp_store_release(&r->hdr->producer, r->prod);
	return seq;
}

/*
 * Queue one record. Atomic context: no sleeping, no allocation. Every change
 * takes a sequence number, queued or not, so a gap in `seq` also shows a
 * loss.
 */
void ferry_ring_push(struct ferry_ring *r, u64 offset, u32 length, u16 kind, u16 flags)
{
	unsigned long irqflags;
	u64 cons;

	spin_lock_irqsave(&r->lock, irqflags);
	r->bytes += length;
	cons = smp_load_acquire(&r->hdr->consumer);
	/*
	 * Full when prod - cons == capacity. A consumer index ahead of the
	 * producer wraps to a huge difference and is treated as full too: the
	 * change is not queued and the loss is flagged (the agent resyncs)
	 * rather than trusting an index the producer never handed out.
	 */
	if (r->prod - cons >= r->capacity) {
		r->seq++;
		r->overflows++;
		ferry_ring_mark_loss_locked(r);
		goto out;
	}
	ferry_ring_fill_locked(r, offset, length, kind, flags);
out:
	spin_unlock_irqrestore(&r->lock, irqflags);
}

/*
 * Queue a consistency marker at the current position (TAG ioctl). Returns
 * its sequence number through *seq, or -EAGAIN if the ring is full (no
 * sequence number is taken then: nothing was lost).
 */
int ferry_ring_push_tag(struct ferry_ring *r, u64 *seq)
{
	unsigned long irqflags;
	int ret = 0;

	spin_lock_irqsave(&r->lock, irqflags);
	if (r->prod - smp_load_acquire(&r->hdr->consumer) >= r->capacity) {
		ret = -EAGAIN;
		goto out;
	}
	*seq = ferry_ring_fill_locked(r, 0, 0, FERRY_REC_TAG, 0);
out:
	spin_unlock_irqrestore(&r->lock, irqflags);
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

void ferry_ring_status(struct ferry_ring *r, struct ferry_cbt_status *st)
{
	unsigned long irqflags;

	spin_lock_irqsave(&r->lock, irqflags);
	st->capacity = r->capacity;
	st->records = r->records;
	st->overflows = r->overflows;
	st->lost = r->lost;
	st->bytes = r->bytes;
	st->seq = r->seq;
	st->producer = r->prod;
	st->consumer = smp_load_acquire(&r->hdr->consumer);
	spin_unlock_irqrestore(&r->lock, irqflags);
}
