// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: the state file of an attached disk (format in
 * ../include/uapi/ferry_cbt_ioctl.h, struct ferry_cbt_saved).
 *
 * Written from process context only (ATTACH, module load and unload, the
 * reboot notifier) with filp_open()/kernel_write()/vfs_fsync(). A clean
 * stop writes the bitmap of every change the agent has not consumed, and
 * the next sequence number; loading the module with the disk in its `disks`
 * parameter attaches it again from that file before anything else can
 * write to it unseen (load the module early: from the initramfs, or
 * modules-load.d before the disk's filesystems are mounted). Writes to the
 * disk while the module is not loaded are not seen: that is the window a
 * clean stop cannot cover, and it is documented.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/fs.h>
#include <linux/major.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>
#include <linux/xxhash.h>

#include "cbt.h"

char *ferry_state_dir = "/var/lib/ferry/kmod";

static int ferry_state_path(char *buf, size_t n, u32 major, u32 minor)
{
	if (!ferry_state_dir || !ferry_state_dir[0])
		return -ENOENT;
	return snprintf(buf, n, "%s/%u-%u.state", ferry_state_dir, major, minor) >= n ? -ENAMETOOLONG : 0;
}

/*
 * Whether a clean state file may be written to this filesystem: one with
 * no block device (tmpfs, NFS), or on a blk-mq disk that is not tracked and
 * not a loop device. A filesystem on a stacked device (dm, md: bio-based)
 * or a loop device might land on a tracked disk underneath, which this
 * cannot see: no clean state there.
 */
static bool ferry_state_fs_ok(struct super_block *sb)
{
	struct gendisk *disk;

	if (!sb->s_bdev)
		return true;
	disk = sb->s_bdev->bd_disk;
	return queue_is_mq(disk->queue) && disk->major != LOOP_MAJOR && !ferry_disk_tracked(disk);
}

static u64 ferry_saved_sum(const struct ferry_cbt_saved *h, const void *bitmap, size_t bytes)
{
	struct ferry_cbt_saved tmp = *h;
	struct xxh64_state st;

	tmp.checksum = 0;
	xxh64_reset(&st, 0);
	xxh64_update(&st, &tmp, sizeof(tmp));
	if (bytes)
		xxh64_update(&st, bitmap, bytes);
	return xxh64_digest(&st);
}

/*
 * Write the state of `fd`: unclean (tracking active) or clean, with the
 * bitmap of every change not consumed (`bitmap`, `bytes`, built by the
 * caller). Returns 0 or a negative errno (the file then keeps what it had).
 */
static int ferry_write_state(struct ferry_disk *fd, bool clean, const void *bitmap, size_t bytes)
{
	struct ferry_cbt_saved h;
	struct file *f;
	char *path;
	loff_t pos = 0;
	ssize_t n;
	int ret;

	path = kmalloc(PATH_MAX, GFP_KERNEL);
	if (!path)
		return -ENOMEM;
	ret = ferry_state_path(path, PATH_MAX, fd->major, fd->minor);
	if (ret)
		goto out;
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, FERRY_CBT_SAVED_MAGIC, sizeof(h.magic));
	h.version = FERRY_CBT_SAVED_VERSION;
	h.header_bytes = sizeof(h);
	h.flags = clean ? FERRY_CBT_SAVED_CLEAN : 0;
	h.major = fd->major;
	h.minor = fd->minor;
	h.bitmap_shift = fd->ring.bitmap_shift;
	h.disk_bytes = fd->disk_bytes;
	h.next_seq = READ_ONCE(fd->ring.seq);
	h.capacity = fd->ring.capacity;
	h.data_bytes = fd->ring.data_capacity;
	h.bitmap_bits = fd->ring.bitmap_bits;
	h.bitmap_bytes = clean ? bytes : 0;
	h.saved_ns = ktime_get_real_ns();
	h.checksum = ferry_saved_sum(&h, bitmap, h.bitmap_bytes);

	f = filp_open(path, O_WRONLY | O_CREAT | O_TRUNC | O_LARGEFILE, 0600);
	if (IS_ERR(f)) {
		ret = PTR_ERR(f);
		goto out;
	}
	if (clean && !ferry_state_fs_ok(file_inode(f)->i_sb)) {
		/* Writing the file may change a tracked disk after its last
		 * record: a clean state would hide that. Leave it unclean. */
		pr_warn("%s is on a tracked, stacked or loop disk: its state stays unclean (put state_dir on a plain untracked disk)\n",
			path);
		h.flags = 0;
		h.bitmap_bytes = 0;
		h.checksum = ferry_saved_sum(&h, NULL, 0);
		ret = -EXDEV;
	}
	n = kernel_write(f, &h, sizeof(h), &pos);
	if (n == sizeof(h) && h.bitmap_bytes)
		n = kernel_write(f, bitmap, h.bitmap_bytes, &pos);
	if (!ret)
		ret = n < 0 ? n : (pos != sizeof(h) + h.bitmap_bytes ? -EIO : 0);
	if (!ret)
		ret = vfs_fsync(f, 0);
	else
		vfs_fsync(f, 0);
	filp_close(f, NULL);
out:
	if (ret && ret != -ENOENT)
		pr_warn("cannot write the state of %u:%u to %s: %d\n", fd->major, fd->minor, path, ret);
	kfree(path);
	return ret;
}

int ferry_persist_active(struct ferry_disk *fd)
{
	return ferry_write_state(fd, false, NULL, 0);
}

/*
 * A clean stop of `fd`, its probes no longer running for it: fold the
 * records the agent has not released into a copy of the bitmap and write
 * it. Sleeps (allocation, file I/O).
 */
int ferry_persist_clean(struct ferry_disk *fd)
{
	size_t bytes = ferry_ring_bitmap_bytes(&fd->ring);
	unsigned long *map;
	int ret;

	map = kvzalloc(bytes, GFP_KERNEL);
	if (!map)
		return -ENOMEM;
	ferry_ring_fold_pending(&fd->ring, map);
	ret = ferry_write_state(fd, true, map, bytes);
	kvfree(map);
	if (!ret)
		pr_info("saved the state of %u:%u (next seq %llu) at a clean stop\n", fd->major, fd->minor,
			fd->ring.seq);
	return ret;
}

/*
 * Read the state file of major:minor. Returns 0 with *clean set and, if
 * clean, the bitmap in *bitmap (kvmalloc'ed, *bytes long); -ENOENT if there
 * is none; another negative errno if it cannot be read (treated as unclean
 * by the caller only when it exists).
 */
int ferry_persist_load(u32 major, u32 minor, u64 disk_bytes, struct ferry_cbt_saved *h, bool *clean, void **bitmap)
{
	struct file *f;
	char *path;
	loff_t pos = 0;
	void *map = NULL;
	ssize_t n;
	int ret;

	*clean = false;
	*bitmap = NULL;
	path = kmalloc(PATH_MAX, GFP_KERNEL);
	if (!path)
		return -ENOMEM;
	ret = ferry_state_path(path, PATH_MAX, major, minor);
	if (ret)
		goto out;
	f = filp_open(path, O_RDONLY | O_LARGEFILE, 0);
	if (IS_ERR(f)) {
		ret = PTR_ERR(f);
		goto out;
	}
	memset(h, 0, sizeof(*h));
	n = kernel_read(f, h, sizeof(*h), &pos);
	ret = 0;
	if (n != sizeof(*h) || memcmp(h->magic, FERRY_CBT_SAVED_MAGIC, sizeof(h->magic)) ||
	    h->version != FERRY_CBT_SAVED_VERSION || h->header_bytes != sizeof(*h) || h->major != major ||
	    h->minor != minor || h->disk_bytes != disk_bytes) {
		pr_warn("state file %s is not a valid state of this disk: treated as unclean\n", path);
		goto close;
	}
	if (!(h->flags & FERRY_CBT_SAVED_CLEAN))
		goto close;
	if (h->bitmap_bytes != BITS_TO_LONGS(h->bitmap_bits) * sizeof(long) || h->bitmap_bytes > (64ULL << 20)) {
		pr_warn("state file %s: bad bitmap size: treated as unclean\n", path);
		goto close;
	}
	map = kvzalloc(h->bitmap_bytes, GFP_KERNEL);
	if (!map) {
		ret = -ENOMEM;
		goto close;
	}
	n = kernel_read(f, map, h->bitmap_bytes, &pos);
	if (n != h->bitmap_bytes || ferry_saved_sum(h, map, h->bitmap_bytes) != h->checksum) {
		pr_warn("state file %s is torn or corrupt: treated as unclean\n", path);
		kvfree(map);
		map = NULL;
		goto close;
	}
	*clean = true;
	*bitmap = map;
close:
	filp_close(f, NULL);
out:
	kfree(path);
	return ret;
}
