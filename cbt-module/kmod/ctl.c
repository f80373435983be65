// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: the control path. The misc device /dev/ferry-cbt, its ioctls
 * (ATTACH, DETACH, STATUS, TAG, SET_CAP, CATCHUP:
 * ../include/uapi/ferry_cbt_ioctl.h), the table of
 * attached disks, and mmap of a disk's ring.
 *
 * Locking:
 *   ferry_lock (mutex) serializes every change to the table. It is never
 *   held across copy_{to,from}_user() (mmap runs under mmap_lock and takes
 *   ferry_lock; a fault under ferry_lock would invert that order).
 *   The hook reads the table under rcu_read_lock(). ATTACH publishes with
 *   rcu_assign_pointer() and then synchronize_rcu(), so every bio submitted
 *   after ATTACH returns is seen. DETACH unpublishes, then synchronize_rcu()
 *   (the probe stays registered, and its lookup is an RCU reader) before it
 *   closes the disk and drops the table's reference. Unload unregisters the
 *   probe and uses tracepoint_synchronize_unregister() (main.c).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/blk-mq.h>
#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/random.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "cbt.h"

static struct ferry_disk __rcu *ferry_table[FERRY_MAX_DISKS];
static DEFINE_MUTEX(ferry_lock);
/* One past the highest used table index (the hook scans up to it). */
static unsigned int ferry_table_end;
int ferry_nr_attached;
/* Next handle generation: handles are not reused for 2^25 attachments. */
static u32 ferry_next_gen = 1;
/* Disks unpublished by module unload, released after the probe is gone. */
static struct ferry_disk *ferry_dying[FERRY_MAX_DISKS];

/* ---- the table ---------------------------------------------------------- */

struct ferry_disk *ferry_find_disk_rcu(const struct gendisk *disk)
{
	unsigned int i, end = READ_ONCE(ferry_table_end);

	for (i = 0; i < end && i < FERRY_MAX_DISKS; i++) {
		struct ferry_disk *fd = rcu_dereference(ferry_table[i]);

		if (fd && fd->disk == disk)
			return fd;
	}
	return NULL;
}

static struct ferry_disk *ferry_slot_locked(unsigned int idx)
{
	return rcu_dereference_protected(ferry_table[idx], lockdep_is_held(&ferry_lock));
}

static struct ferry_disk *ferry_find_disk_locked(const struct gendisk *disk)
{
	unsigned int i;

	for (i = 0; i < FERRY_MAX_DISKS; i++) {
		struct ferry_disk *fd = ferry_slot_locked(i);

		if (fd && fd->disk == disk)
			return fd;
	}
	return NULL;
}

static struct ferry_disk *ferry_by_handle_locked(u32 handle)
{
	struct ferry_disk *fd = ferry_slot_locked(handle & (FERRY_MAX_DISKS - 1));

	return fd && fd->handle == handle ? fd : NULL;
}

static u32 ferry_make_handle(unsigned int idx)
{
	u32 gen = ferry_next_gen++;

	/* Handles stay below 2^31 so FERRY_CBT_MMAP_OFFSET() is a positive off_t. */
	if (ferry_next_gen >= (1U << (31 - FERRY_HANDLE_IDX_BITS)))
		ferry_next_gen = 1;
	return (gen << FERRY_HANDLE_IDX_BITS) | idx;
}

static void ferry_unpublish_locked(struct ferry_disk *fd)
{
	unsigned int end = ferry_table_end;

	RCU_INIT_POINTER(ferry_table[fd->handle & (FERRY_MAX_DISKS - 1)], NULL);
	while (end && !rcu_access_pointer(ferry_table[end - 1]))
		end--;
	WRITE_ONCE(ferry_table_end, end);
	WRITE_ONCE(ferry_nr_attached, ferry_nr_attached - 1);
}

/* ---- a tracked disk ------------------------------------------------------ */

static void ferry_disk_free(struct kref *ref)
{
	struct ferry_disk *fd = container_of(ref, struct ferry_disk, ref);

	ferry_ring_free(&fd->ring);
	kfree(fd);
}

static void ferry_disk_put(struct ferry_disk *fd)
{
	kref_put(&fd->ref, ferry_disk_free);
}

/*
 * Hold the whole disk open (read-only, shared) while attached: the gendisk
 * the hook compares against then cannot be freed and its address reused by
 * another disk.
 */
static void ferry_close_disk(struct ferry_disk *fd)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	if (fd->bdev_file)
		fput(fd->bdev_file);
	fd->bdev_file = NULL;
#else
	if (fd->bdev)
		blkdev_put(fd->bdev, FMODE_READ);
	fd->bdev = NULL;
#endif
}

static int ferry_open_disk(struct ferry_disk *fd, dev_t dev)
{
	struct block_device *bdev;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	struct file *f = bdev_file_open_by_dev(dev, BLK_OPEN_READ, NULL, NULL);

	if (IS_ERR(f))
		return PTR_ERR(f);
	fd->bdev_file = f;
	bdev = file_bdev(f);
#else
	bdev = blkdev_get_by_dev(dev, FMODE_READ, NULL);
	if (IS_ERR(bdev))
		return PTR_ERR(bdev);
	fd->bdev = bdev;
#endif
	if (bdev_is_partition(bdev)) {
		ferry_close_disk(fd);
		return -EINVAL; /* attach the whole disk */
	}
	fd->disk = bdev->bd_disk;
	return 0;
}

/* ---- ioctls ---------------------------------------------------------------- */

/*
 * Size-first argument structs (the openat2 rule): at least the struct's
 * first published size (an older caller: the fields it lacks read as zero),
 * at most a page; a longer struct's unknown tail must be zero.
 */
static int ferry_copy_in_min(void *karg, size_t ksize, size_t minsize, void __user *uarg, u32 *usize)
{
	u32 size;
	int ret;

	if (get_user(size, (u32 __user *)uarg))
		return -EFAULT;
	if (size < minsize || size > PAGE_SIZE)
		return -EINVAL;
	ret = copy_struct_from_user(karg, ksize, uarg, size);
	if (ret)
		return ret;
	*usize = size;
	return 0;
}

/* Structs that have not grown since they were published. */
static int ferry_copy_in(void *karg, size_t ksize, void __user *uarg, u32 *usize)
{
	return ferry_copy_in_min(karg, ksize, ksize, uarg, usize);
}

static int ferry_copy_out(void __user *uarg, const void *karg, size_t ksize, u32 usize)
{
	return copy_to_user(uarg, karg, min_t(size_t, ksize, usize)) ? -EFAULT : 0;
}

static void ferry_fill_attach(struct ferry_cbt_attach *a, const struct ferry_disk *fd)
{
	a->handle = fd->handle;
	a->mmap_offset = FERRY_CBT_MMAP_OFFSET(fd->handle);
	a->mmap_size = fd->ring.map_bytes;
	a->capacity = fd->ring.capacity;
	a->bitmap_block = 1ULL << fd->ring.bitmap_shift;
	a->attach_id = fd->attach_id;
	a->restored_seq = fd->restored_seq;
}

/*
 * Wait for the writes already in flight on the disk when it was attached:
 * they were queued before the probe could see them, so the agent's first
 * read of the disk must come after they complete. Freezing a blk-mq queue
 * waits for every request in it. (A bio between block_bio_queue and the
 * queue's entry when the freeze starts still slips by: the window is the
 * length of a function call, and only for bios submitted before ATTACH.)
 */
static int ferry_drain_queue(struct gendisk *disk)
{
	struct request_queue *q = disk->queue;
	int ret = 0;

	blk_freeze_queue_start(q);
	if (!blk_mq_freeze_queue_wait_timeout(q, 30 * HZ))
		ret = -ETIMEDOUT;
	blk_mq_unfreeze_queue(q);
	return ret;
}

/*
 * Attach major:minor (or, with existing_ok, find its attachment). With
 * `restore` (module load, from the disk's state file) the ring starts from
 * the saved sequence number and bitmap, or with the loss flagged if the
 * file was not clean. Fills *a (out fields). Sleeps.
 */
struct ferry_restore {
	const struct ferry_cbt_saved *saved;
	const void *bitmap; /* NULL: not clean */
};

static int ferry_attach(u32 major, u32 minor, u64 capacity, u64 data_bytes, u64 first_seq, bool existing_ok,
			const struct ferry_restore *restore, struct ferry_cbt_attach *a)
{
	struct ferry_disk *fd, *old;
	unsigned int idx;
	dev_t dev;
	int ret;

	if (!capacity || capacity > FERRY_CBT_MAX_CAPACITY || (capacity & (capacity - 1)))
		return -EINVAL;
	dev = MKDEV(major, minor);
	if (MAJOR(dev) != major || MINOR(dev) != minor)
		return -EINVAL;

	/* Open and allocate outside the lock; both may sleep for long. */
	fd = kzalloc(sizeof(*fd), GFP_KERNEL);
	if (!fd)
		return -ENOMEM;
	kref_init(&fd->ref);
	fd->major = major;
	fd->minor = minor;
	ret = ferry_open_disk(fd, dev);
	if (ret) {
		kfree(fd);
		return ret;
	}
	if (!queue_is_mq(fd->disk->queue)) {
		/* Completions of bio-based drivers cannot all be followed
		 * (see hook.c), and their queues cannot be drained. */
		ret = -EOPNOTSUPP;
		goto discard;
	}
	fd->disk_bytes = (u64)get_capacity(fd->disk) << SECTOR_SHIFT;
	ret = ferry_ring_init(&fd->ring, capacity, data_bytes, fd->disk_bytes);
	if (ret)
		goto discard;
	fd->ring.seq = first_seq;
	fd->attach_id = get_random_u64();
	if (restore) {
		fd->ring.seq = restore->saved->next_seq;
		fd->restored_seq = restore->saved->next_seq;
		if (restore->bitmap && restore->saved->bitmap_shift == fd->ring.bitmap_shift &&
		    restore->saved->bitmap_bits == fd->ring.bitmap_bits) {
			ferry_ring_restore(&fd->ring, restore->bitmap);
			fd->out_flags = FERRY_CBT_ATTACHED_RESTORED;
		} else {
			ferry_ring_lost(&fd->ring, 0);
			fd->out_flags = FERRY_CBT_ATTACHED_UNCLEAN;
		}
	}

	mutex_lock(&ferry_lock);
	old = ferry_find_disk_locked(fd->disk);
	if (old) {
		if (existing_ok) {
			ferry_fill_attach(a, old);
			a->out_flags = FERRY_CBT_ATTACHED_EXISTING | old->out_flags;
		} else {
			ret = -EEXIST;
		}
		mutex_unlock(&ferry_lock);
		goto discard;
	}
	for (idx = 0; idx < FERRY_MAX_DISKS; idx++)
		if (!ferry_slot_locked(idx))
			break;
	if (idx == FERRY_MAX_DISKS) {
		mutex_unlock(&ferry_lock);
		ret = -ENOSPC;
		goto discard;
	}
	fd->handle = ferry_make_handle(idx);
	rcu_assign_pointer(ferry_table[idx], fd);
	if (idx >= ferry_table_end)
		WRITE_ONCE(ferry_table_end, idx + 1);
	WRITE_ONCE(ferry_nr_attached, ferry_nr_attached + 1);
	ferry_fill_attach(a, fd);
	a->out_flags = fd->out_flags;
	pr_info("attached %s (%u:%u): handle %u, ring of %llu records, %llu bytes of data area%s\n",
		fd->disk->disk_name, fd->major, fd->minor, fd->handle, fd->ring.capacity, fd->ring.data_capacity,
		fd->out_flags & FERRY_CBT_ATTACHED_RESTORED ? ", restored from a clean stop" :
		fd->out_flags & FERRY_CBT_ATTACHED_UNCLEAN ? ", after an unclean stop (loss flagged)" : "");
	mutex_unlock(&ferry_lock);
	/* Every probe that starts from here on finds the disk. */
	synchronize_rcu();
	if (ferry_drain_queue(fd->disk))
		pr_warn("%u:%u: writes in flight at attach did not complete within 30 s\n", fd->major, fd->minor);
	/* Tracking is active: until a clean stop rewrites it, the state file
	 * says so (a crash leaves it unclean). If that cannot be written, the
	 * clean file a restore came from would be restored again after the
	 * next crash: then this attachment is not trusted either. */
	ret = ferry_persist_active(fd);
	if (restore && ret && (fd->out_flags & FERRY_CBT_ATTACHED_RESTORED)) {
		pr_warn("%u:%u: cannot mark its state file active (%d): treating the restore as unclean\n",
			fd->major, fd->minor, ret);
		/* The flag first (read under ferry_lock by EXISTING_OK), then
		 * the loss: an agent never sees the loss as RESTORED. */
		mutex_lock(&ferry_lock);
		fd->out_flags = FERRY_CBT_ATTACHED_UNCLEAN;
		mutex_unlock(&ferry_lock);
		ferry_ring_lost(&fd->ring, 0);
		a->out_flags = fd->out_flags;
	}
	return 0;

discard:
	ferry_close_disk(fd);
	ferry_disk_put(fd);
	return ret;
}

static long ferry_ioc_attach(void __user *uarg)
{
	struct ferry_cbt_attach a;
	u32 usize;
	int ret;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	ret = ferry_copy_in_min(&a, sizeof(a), FERRY_CBT_ATTACH_SIZE_VER0, uarg, &usize);
	if (ret)
		return ret;
	if (a.flags & ~FERRY_CBT_ATTACH_F_EXISTING_OK)
		return -EINVAL;
	ret = ferry_attach(a.major, a.minor, a.capacity, a.data_bytes, a.first_seq,
			   a.flags & FERRY_CBT_ATTACH_F_EXISTING_OK, NULL, &a);
	if (ret)
		return ret;
	/* On a fault the disk stays attached; EXISTING_OK recovers the handle. */
	return ferry_copy_out(uarg, &a, sizeof(a), usize);
}

/*
 * Module load: attach again each disk listed in the `disks` parameter
 * ("MAJOR:MINOR,..."), from its state file. A disk without a state file is
 * left alone (the agent attaches it); one whose file is not from a clean
 * stop is attached with the loss flagged.
 */
void ferry_ctl_restore(const char *list)
{
	struct ferry_cbt_attach a;
	struct ferry_cbt_saved h;
	struct ferry_restore r;
	const char *p = list;
	unsigned int major, minor;
	bool clean;
	void *map;
	int n, ret;

	while (p && *p) {
		if (sscanf(p, "%u:%u%n", &major, &minor, &n) != 2) {
			pr_warn("disks=%s: expected MAJOR:MINOR[,MAJOR:MINOR...]\n", list);
			return;
		}
		p += n;
		if (*p == ',')
			p++;
		{
			struct block_device *bdev;
			u64 bytes;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
			struct file *f = bdev_file_open_by_dev(MKDEV(major, minor), BLK_OPEN_READ, NULL, NULL);

			if (IS_ERR(f)) {
				pr_warn("disks: %u:%u cannot be opened (%ld): not restored\n", major, minor, PTR_ERR(f));
				continue;
			}
			bdev = file_bdev(f);
			bytes = bdev_nr_bytes(bdev);
			fput(f);
#else
			bdev = blkdev_get_by_dev(MKDEV(major, minor), FMODE_READ, NULL);
			if (IS_ERR(bdev)) {
				pr_warn("disks: %u:%u cannot be opened (%ld): not restored\n", major, minor, PTR_ERR(bdev));
				continue;
			}
			bytes = bdev_nr_bytes(bdev);
			blkdev_put(bdev, FMODE_READ);
#endif
			ret = ferry_persist_load(major, minor, bytes, &h, &clean, &map);
		}
		if (ret == -ENOENT) {
			pr_info("disks: %u:%u has no state file: not restored\n", major, minor);
			continue;
		}
		if (ret) {
			pr_warn("disks: %u:%u: reading its state file failed (%d): not restored\n", major, minor, ret);
			continue;
		}
		r.saved = &h;
		r.bitmap = clean ? map : NULL;
		memset(&a, 0, sizeof(a));
		ret = ferry_attach(major, minor, h.capacity ? h.capacity : 65536, h.data_bytes, 0, false, &r, &a);
		kvfree(map);
		if (ret)
			pr_warn("disks: %u:%u: attach failed (%d)\n", major, minor, ret);
	}
}

static long ferry_ioc_detach(void __user *uarg)
{
	struct ferry_cbt_detach d;
	struct ferry_disk *fd;
	u32 usize;
	int ret;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	ret = ferry_copy_in(&d, sizeof(d), uarg, &usize);
	if (ret)
		return ret;
	mutex_lock(&ferry_lock);
	fd = ferry_by_handle_locked(d.handle);
	if (fd) {
		ferry_unpublish_locked(fd);
		pr_info("detached %u:%u (handle %u)\n", fd->major, fd->minor, fd->handle);
	}
	mutex_unlock(&ferry_lock);
	if (!fd)
		return -ENOENT;
	/* No probe still uses fd once every RCU reader that could see it ends. */
	synchronize_rcu();
	ferry_close_disk(fd);
	ferry_disk_put(fd);
	return 0;
}

static long ferry_ioc_status(void __user *uarg)
{
	struct ferry_cbt_status st;
	struct ferry_disk *fd;
	u32 usize;
	int ret;

	ret = ferry_copy_in_min(&st, sizeof(st), FERRY_CBT_STATUS_SIZE_VER0, uarg, &usize);
	if (ret)
		return ret;
	mutex_lock(&ferry_lock);
	fd = ferry_by_handle_locked(st.handle);
	if (fd) {
		st.major = fd->major;
		st.minor = fd->minor;
		st._pad0 = 0;
		ferry_ring_status(&fd->ring, &st);
	}
	mutex_unlock(&ferry_lock);
	if (!fd)
		return -ENOENT;
	return ferry_copy_out(uarg, &st, sizeof(st), usize);
}

/*
 * Freeze/thaw the filesystem on a whole disk: freeze_bdev()/thaw_bdev()
 * until 6.7, bdev_freeze()/bdev_thaw() since 6.8 (commit 982c3b3058ba,
 * "bdev: rename freeze and thaw helpers").
 */
static struct block_device *ferry_bdev(struct ferry_disk *fd)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	return file_bdev(fd->bdev_file);
#else
	return fd->bdev;
#endif
}

static int ferry_freeze(struct block_device *bdev)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	return bdev_freeze(bdev);
#else
	return freeze_bdev(bdev);
#endif
}

static int ferry_thaw(struct block_device *bdev)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	return bdev_thaw(bdev);
#else
	return thaw_bdev(bdev);
#endif
}

static long ferry_ioc_tag(void __user *uarg)
{
	struct ferry_cbt_tag t;
	struct ferry_disk *fd;
	u64 t0 = 0;
	u32 usize;
	int ret, tret;

	ret = ferry_copy_in(&t, sizeof(t), uarg, &usize);
	if (ret)
		return ret;
	if (t.flags & ~FERRY_CBT_TAG_F_FREEZE || t._pad0)
		return -EINVAL;
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	/* Held throughout: DETACH cannot close the block device meanwhile. */
	mutex_lock(&ferry_lock);
	fd = ferry_by_handle_locked(t.handle);
	if (!fd) {
		ret = -ENOENT;
		goto out;
	}
	if (t.flags & FERRY_CBT_TAG_F_FREEZE) {
		t0 = ktime_get_ns();
		ret = ferry_freeze(ferry_bdev(fd));
		if (ret)
			goto out;
	}
	ret = ferry_ring_push_tag(&fd->ring, &t.seq);
	if (t.flags & FERRY_CBT_TAG_F_FREEZE) {
		tret = ferry_thaw(ferry_bdev(fd));
		t.frozen_ns = ktime_get_ns() - t0;
		if (tret)
			pr_warn("ferry_cbt: thawing %u:%u after a tag: %d\n", fd->major, fd->minor, tret);
		if (!ret)
			ret = tret;
	} else {
		t.frozen_ns = 0;
	}
out:
	mutex_unlock(&ferry_lock);
	if (ret)
		return ret;
	return ferry_copy_out(uarg, &t, sizeof(t), usize);
}

static long ferry_ioc_set_cap(void __user *uarg)
{
	struct ferry_cbt_cap c;
	struct ferry_disk *fd;
	u32 usize;
	int ret;

	ret = ferry_copy_in(&c, sizeof(c), uarg, &usize);
	if (ret)
		return ret;
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	mutex_lock(&ferry_lock);
	fd = ferry_by_handle_locked(c.handle);
	if (fd)
		c.data_cap = ferry_ring_set_cap(&fd->ring, c.data_cap);
	mutex_unlock(&ferry_lock);
	if (!fd)
		return -ENOENT;
	return ferry_copy_out(uarg, &c, sizeof(c), usize);
}

/*
 * DRAIN: a second open of the disk (not ferry_lock, which every ioctl
 * needs) keeps its gendisk alive while the queue is frozen; a queue that
 * does not drain in 30 s flags a loss. Once drained, every write entered
 * before has completed: the in-flight table starts over.
 */
static int ferry_catchup_drain(struct ferry_disk *fd)
{
	struct gendisk *disk;
	int ret;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	struct file *f = bdev_file_open_by_dev(MKDEV(fd->major, fd->minor), BLK_OPEN_READ, NULL, NULL);

	if (IS_ERR(f))
		return PTR_ERR(f);
	disk = file_bdev(f)->bd_disk;
#else
	struct block_device *bdev = blkdev_get_by_dev(MKDEV(fd->major, fd->minor), FMODE_READ, NULL);

	if (IS_ERR(bdev))
		return PTR_ERR(bdev);
	disk = bdev->bd_disk;
#endif
	if (disk != fd->disk) {
		ret = -ENOENT; /* the device number names another disk now */
		goto out;
	}
	ret = ferry_drain_queue(disk);
	if (ret)
		ferry_ring_lost(&fd->ring, 0);
	else
		ferry_ring_forget_inflight(&fd->ring);
out:
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	fput(f);
#else
	blkdev_put(bdev, FMODE_READ);
#endif
	return ret;
}

static long ferry_ioc_catchup(void __user *uarg)
{
	struct ferry_cbt_catchup c;
	struct ferry_disk *fd;
	u32 usize;
	int ret;

	ret = ferry_copy_in(&c, sizeof(c), uarg, &usize);
	if (ret)
		return ret;
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	/* A reference, not ferry_lock, across the wait and the copy: DETACH
	 * may go ahead meanwhile; the ring stays until the reference goes. */
	mutex_lock(&ferry_lock);
	fd = ferry_by_handle_locked(c.handle);
	if (fd)
		kref_get(&fd->ref);
	mutex_unlock(&ferry_lock);
	if (!fd)
		return -ENOENT;
	if (c.buf_bytes < ferry_ring_bitmap_bytes(&fd->ring) || (c.flags & ~FERRY_CBT_CATCHUP_F_DRAIN)) {
		ret = -EINVAL;
		goto put;
	}
	mutex_lock(&fd->ring.catchup_lock);
	if (c.flags & FERRY_CBT_CATCHUP_F_DRAIN) {
		ret = ferry_catchup_drain(fd);
		if (ret) {
			mutex_unlock(&fd->ring.catchup_lock);
			goto put;
		}
	}
	ret = ferry_ring_catchup(&fd->ring, &c);
	if (!ret || ret == -ETIMEDOUT) {
		/* Hand the taken bits over even after a timeout (the loss is
		 * flagged then): they are still changes to ship. */
		if (copy_to_user(u64_to_user_ptr(c.buf), ferry_ring_taken_bitmap(&fd->ring),
				 ferry_ring_bitmap_bytes(&fd->ring))) {
			ferry_ring_untake(&fd->ring);
			ret = -EFAULT;
		} else {
			ferry_ring_clear_taken(&fd->ring);
		}
	}
	mutex_unlock(&fd->ring.catchup_lock);
	if (!ret)
		ret = ferry_copy_out(uarg, &c, sizeof(c), usize);
put:
	ferry_disk_put(fd);
	return ret;
}

static long ferry_ioc_group_tag(void __user *uarg)
{
	struct ferry_cbt_group_tag g;
	struct ferry_disk *fds[FERRY_CBT_GROUP_MAX], *t;
	struct ferry_ring *rings[FERRY_CBT_GROUP_MAX];
	u64 seqs[FERRY_CBT_GROUP_MAX];
	unsigned int i, j;
	u32 usize;
	int ret;

	ret = ferry_copy_in(&g, sizeof(g), uarg, &usize);
	if (ret)
		return ret;
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	if (g.count < 2 || g.count > FERRY_CBT_GROUP_MAX)
		return -EINVAL;
	/* Held throughout: no disk of the group is detached meanwhile. */
	mutex_lock(&ferry_lock);
	for (i = 0; i < g.count; i++) {
		fds[i] = ferry_by_handle_locked(g.handles[i]);
		if (!fds[i]) {
			ret = -ENOENT;
			goto out;
		}
		for (j = 0; j < i; j++)
			if (fds[j] == fds[i]) {
				ret = -EINVAL;
				goto out;
			}
	}
	/* Lock order: table index. Sort a copy, keep the caller's order for
	 * the output. */
	for (i = 0; i < g.count; i++)
		rings[i] = &fds[i]->ring;
	for (i = 1; i < g.count; i++)
		for (j = i; j > 0 && (fds[j - 1]->handle & (FERRY_MAX_DISKS - 1)) > (fds[j]->handle & (FERRY_MAX_DISKS - 1)); j--) {
			struct ferry_ring *r = rings[j];

			t = fds[j];
			fds[j] = fds[j - 1];
			fds[j - 1] = t;
			rings[j] = rings[j - 1];
			rings[j - 1] = r;
		}
	ret = ferry_ring_group_tag(rings, g.count, g.id, seqs);
	if (!ret)
		for (i = 0; i < g.count; i++)
			for (j = 0; j < g.count; j++)
				if (fds[j]->handle == g.handles[i])
					g.seqs[i] = seqs[j];
out:
	mutex_unlock(&ferry_lock);
	if (ret)
		return ret;
	return ferry_copy_out(uarg, &g, sizeof(g), usize);
}

/* Commands match on type and number; the size lives in the struct. */
static long ferry_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	if (_IOC_TYPE(cmd) != FERRY_CBT_IOC_MAGIC)
		return -ENOTTY;
	switch (_IOC_NR(cmd)) {
	case _IOC_NR(FERRY_CBT_IOC_ATTACH):
		return ferry_ioc_attach(uarg);
	case _IOC_NR(FERRY_CBT_IOC_DETACH):
		return ferry_ioc_detach(uarg);
	case _IOC_NR(FERRY_CBT_IOC_STATUS):
		return ferry_ioc_status(uarg);
	case _IOC_NR(FERRY_CBT_IOC_TAG):
		return ferry_ioc_tag(uarg);
	case _IOC_NR(FERRY_CBT_IOC_SET_CAP):
		return ferry_ioc_set_cap(uarg);
	case _IOC_NR(FERRY_CBT_IOC_CATCHUP):
		return ferry_ioc_catchup(uarg);
	case _IOC_NR(FERRY_CBT_IOC_GROUP_TAG):
		return ferry_ioc_group_tag(uarg);
	default:
		return -ENOTTY;
	}
}

/* ---- mmap of a ring ---------------------------------------------------------- */

static void ferry_vm_open(struct vm_area_struct *vma)
{
	struct ferry_disk *fd = vma->vm_private_data;

	kref_get(&fd->ref); /* fork, split, mremap */
}

static void ferry_vm_close(struct vm_area_struct *vma)
{
	ferry_disk_put(vma->vm_private_data);
}

static const struct vm_operations_struct ferry_vm_ops = {
	.open = ferry_vm_open,
	.close = ferry_vm_close,
};

static int ferry_mmap(struct file *file, struct vm_area_struct *vma)
{
	u64 off = (u64)vma->vm_pgoff << PAGE_SHIFT;
	unsigned long len = vma->vm_end - vma->vm_start;
	struct ferry_disk *fd;
	int ret;

	if (off & ((1ULL << FERRY_CBT_MMAP_SHIFT) - 1) || (off >> FERRY_CBT_MMAP_SHIFT) > U32_MAX)
		return -EINVAL;
	/* A private writable mapping would copy the header on the consumer's
	 * first store, and the producer would never see `consumer` move. */
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	mutex_lock(&ferry_lock);
	fd = ferry_by_handle_locked(off >> FERRY_CBT_MMAP_SHIFT);
	if (fd)
		kref_get(&fd->ref);
	mutex_unlock(&ferry_lock);
	if (!fd)
		return -ENOENT;
	if (len > fd->ring.map_bytes) {
		ret = -EINVAL;
		goto put;
	}
	/* Sets VM_DONTEXPAND | VM_DONTDUMP; maps the pages from the start. */
	ret = remap_vmalloc_range(vma, fd->ring.hdr, 0);
	if (ret)
		goto put;
	vma->vm_private_data = fd;
	vma->vm_ops = &ferry_vm_ops;
	return 0;
put:
	ferry_disk_put(fd);
	return ret;
}

/* ---- the device ------------------------------------------------------------- */

static const struct file_operations ferry_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = ferry_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = ferry_mmap,
	.llseek = noop_llseek,
};

static struct miscdevice ferry_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "ferry-cbt",
	.fops = &ferry_fops,
	.mode = 0600,
};

int ferry_ctl_init(void)
{
	return misc_register(&ferry_misc);
}

void ferry_ctl_unregister(void)
{
	misc_deregister(&ferry_misc);
}

void ferry_ctl_unpublish_all(void)
{
	unsigned int i;

	mutex_lock(&ferry_lock);
	for (i = 0; i < FERRY_MAX_DISKS; i++) {
		ferry_dying[i] = ferry_slot_locked(i);
		RCU_INIT_POINTER(ferry_table[i], NULL);
	}
	WRITE_ONCE(ferry_table_end, 0);
	WRITE_ONCE(ferry_nr_attached, 0);
	mutex_unlock(&ferry_lock);
}

/* Whether `disk` is attached (or being detached at unload): a state file
 * on it would be written without being tracked. Lockless: the table under
 * RCU, and the unload list (only filled while nothing else runs). */
bool ferry_disk_tracked(const struct gendisk *disk)
{
	unsigned int i;
	bool found;

	rcu_read_lock();
	found = ferry_find_disk_rcu(disk) != NULL;
	rcu_read_unlock();
	for (i = 0; !found && i < FERRY_MAX_DISKS; i++)
		found = ferry_dying[i] && ferry_dying[i]->disk == disk;
	return found;
}

/* Reboot notifier (main.c): a clean stop of every attached disk, if the
 * state directory can still be written (often it is read-only by then, and
 * the files stay unclean: a resync after boot, never a silent loss... as
 * long as nothing writes to the disks after this). */
void ferry_ctl_save_all(void)
{
	unsigned int i;

	mutex_lock(&ferry_lock);
	for (i = 0; i < FERRY_MAX_DISKS; i++) {
		struct ferry_disk *fd = ferry_slot_locked(i);

		if (fd)
			ferry_persist_clean(fd);
	}
	mutex_unlock(&ferry_lock);
}

/* After the probe is unregistered and synchronized (main.c). */
void ferry_ctl_release_unpublished(void)
{
	unsigned int i;

	for (i = 0; i < FERRY_MAX_DISKS; i++) {
		if (!ferry_dying[i])
			continue;
		pr_info("detached %u:%u (handle %u) at unload\n",
			ferry_dying[i]->major, ferry_dying[i]->minor, ferry_dying[i]->handle);
		/* No probe runs any more: the state is final. */
		ferry_persist_clean(ferry_dying[i]);
		ferry_close_disk(ferry_dying[i]);
		ferry_disk_put(ferry_dying[i]);
		ferry_dying[i] = NULL;
	}
}
