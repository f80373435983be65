/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * ferry change-tracking kernel module: the control device /dev/ferry-cbt.
 * The records and the ring it fills are defined in ferry_cbt.h; this header
 * adds only the ioctls of cbt-module/kmod.
 *
 * Rules (as in ferry_cbt.h): fixed-width __u types only, explicit padding,
 * no pointers, no enums, no `long`, no kernel-version conditionals, a size
 * assertion per struct. Every argument struct starts with `size`, which the
 * caller sets to sizeof(the struct it was compiled with): the module accepts
 * a shorter struct it knows, down to the struct's first published size
 * (FERRY_CBT_*_SIZE_VER0; an older caller, whose missing fields read as
 * zero) and a longer one whose unknown
 * tail is all zeroes (a newer caller), and copies back at most `size` bytes
 * (the openat2/clone3 rule, copy_struct_from_user()). New fields are only
 * ever appended. The ioctl number encodes the current struct size but the
 * module matches on type and number only.
 *
 * Handles. ATTACH returns a handle naming one tracked whole disk. Tracking
 * belongs to the module, not to the file descriptor: it goes on after the
 * descriptor is closed (an agent restart loses nothing) until DETACH or
 * module unload. A handle is not reused by the next 2^25 attachments, so
 * a stale handle fails with ENOENT instead of naming another disk. Handles
 * are below 2^31. At most 64 disks are attached at once (ENOSPC).
 *
 * The ring. mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
 * mmap_offset) on any descriptor of /dev/ferry-cbt maps the disk's ring in
 * the ferry_cbt.h layout (header page, then the slots). The module is the
 * producer; the mapping's user is the consumer and writes only `consumer`.
 * MAP_SHARED is required. The mapping stays valid (frozen) after DETACH and
 * the memory is freed when the last mapping goes. 64-bit processes only
 * (the offset does not fit a 32-bit mmap2 page offset).
 *
 * Permissions: the device is root-only (0600) and ATTACH/DETACH/TAG/SET_CAP/
 * CATCHUP need CAP_SYS_ADMIN.
 *
 * Errors: EINVAL (size too small or above 4096, unknown flag, capacity not
 * a power of two in range, a partition instead of its whole disk, a bad
 * mmap offset/length or a non-shared mapping, a CATCHUP buffer too small),
 * EOPNOTSUPP (ATTACH: a bio-based disk; only blk-mq disks are tracked), E2BIG (non-zero bytes past
 * the struct the module knows), ENXIO (no such block device), EEXIST (the
 * disk is already attached), ENOSPC (64 disks attached), ENOMEM, EPERM,
 * ENOENT (unknown or detached handle), ENOTTY (unknown command), EAGAIN
 * (TAG: the ring is full, or the disk is in BITMAP mode), ETIMEDOUT
 * (CATCHUP). A freeze nests with one made by FIFREEZE.
 */
#ifndef _UAPI_FERRY_CBT_IOCTL_H
#define _UAPI_FERRY_CBT_IOCTL_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define FERRY_CBT_DEVICE "/dev/ferry-cbt"

/* Largest ring accepted, in records (the agent's limit too). */
#define FERRY_CBT_MAX_CAPACITY (1ULL << 24)

/* The mmap offset of a handle's ring (also returned by ATTACH). */
#define FERRY_CBT_MMAP_SHIFT 32
#define FERRY_CBT_MMAP_OFFSET(handle) ((__u64)(handle) << FERRY_CBT_MMAP_SHIFT)

/* Tracking modes reported by STATUS (the degradation ladder). */
/*
 * Tracking modes (STATUS, and the ring header's `mode`): the degradation
 * ladder. A disk attached with a data area starts in DATA mode: each write's
 * record carries its payload (FERRY_RECF_DATA), so every position of the
 * record stream is a crash-consistent state of the disk. A write whose
 * payload does not fit (the data area, or the memory cap set with SET_CAP,
 * is used up) is queued without it and the disk drops to METADATA mode; it
 * returns to DATA mode by itself once the agent has released the data area
 * down to half the cap. A change that finds the record ring full sets bits
 * in the dirty bitmap and the disk drops to BITMAP mode, where every change
 * goes to the bitmap, until the agent takes the bitmap (CATCHUP). No mode
 * loses a change: only FERRY_RINGF_OVERFLOW (zone ops, or more writes in
 * flight than the module can follow) means one was lost.
 */
#define FERRY_CBT_MODE_DATA 1     /* records with the write payload */
#define FERRY_CBT_MODE_METADATA 2 /* extent records only */
#define FERRY_CBT_MODE_BITMAP 3   /* dirty bitmap only */

/* Largest data area accepted (bytes), and the smallest non-zero one. */
#define FERRY_CBT_MAX_DATA_BYTES (1ULL << 30)
#define FERRY_CBT_MIN_DATA_BYTES (1ULL << 20)

/* ATTACH input flags. */
/* If the disk is already attached, return its existing handle (and set
 * FERRY_CBT_ATTACHED_EXISTING) instead of failing with EEXIST; the
 * requested capacity is then ignored. */
#define FERRY_CBT_ATTACH_F_EXISTING_OK 0x0001

/* ATTACH output flags. */
#define FERRY_CBT_ATTACHED_EXISTING 0x0001
/* The attachment was made when the module loaded, from the disk's state
 * file (module parameter `disks`), which a clean stop had written: its
 * bitmap holds every change not yet consumed before the stop, and sequence
 * numbers go on from there. */
#define FERRY_CBT_ATTACHED_RESTORED 0x0002
/* The same, but the state file was not from a clean stop (a crash, a reset,
 * a failed write at shutdown): changes may be missing, so the loss flag is
 * set (the agent resyncs). */
#define FERRY_CBT_ATTACHED_UNCLEAN 0x0004

struct ferry_cbt_attach {
	__u32 size;        /* in: sizeof(struct ferry_cbt_attach) */
	__u32 flags;       /* in: FERRY_CBT_ATTACH_F_* */
	__u32 major;       /* in: the whole disk's major */
	__u32 minor;       /* in: the whole disk's minor (not a partition) */
	__u64 capacity;    /* in: ring slots, a power of two, 1..FERRY_CBT_MAX_CAPACITY */
	__u32 handle;      /* out: names the attachment */
	__u32 out_flags;   /* out: FERRY_CBT_ATTACHED_* */
	__u64 mmap_offset; /* out: mmap offset of the ring */
	__u64 mmap_size;   /* out: bytes to map (header + slots, page-rounded) */
	/* Appended in version 1 (a 48-byte struct is version 0, still
	 * accepted: first_seq is then 0). */
	__u64 first_seq;   /* in: the sequence number of the first change (the
	                    * agent passes one past the last it consumed, so
	                    * sequence numbers stay monotonic across a module
	                    * reload or a re-attach); ignored for an existing
	                    * attachment */
	/* Appended in version 2 (ABI 2). */
	__u64 data_bytes;  /* in: bytes of the data area (data mode): 0 for
	                    * none (METADATA mode from the start), else a power
	                    * of two from FERRY_CBT_MIN_DATA_BYTES to
	                    * FERRY_CBT_MAX_DATA_BYTES; the memory cap starts
	                    * at this size. Ignored for an existing attachment */
	__u64 bitmap_block; /* out: bytes of disk per bitmap bit */
	/* Appended in version 3. */
	__u64 attach_id;    /* out: random, new for every attachment (also across
	                     * module reloads): a consumer that sees another id
	                     * knows the ring and its counters started over */
	/* Appended in version 4. */
	__u64 restored_seq; /* out: with ATTACHED_RESTORED or _UNCLEAN, the
	                     * next_seq of the state file it came from */
};
/*
 * GROUP_TAG places a TAG record (FERRY_RECF_GROUP, offset = `id`) in the
 * rings of `count` attached disks (2..FERRY_CBT_GROUP_MAX) at one instant:
 * with every ring's lock held at once, so that each change to any of the
 * disks is before the tags in all of them, or after in all. A consistency
 * group's shared recovery point. EAGAIN (nothing placed) if a ring is full
 * or a disk is in BITMAP mode; ENOENT for an unknown handle; EINVAL for a
 * repeated one.
 */
#define FERRY_CBT_GROUP_MAX 8
struct ferry_cbt_group_tag {
	__u32 size;       /* in: sizeof(struct ferry_cbt_group_tag) */
	__u32 count;      /* in: handles in `handles` */
	__u64 id;         /* in: the cut's id, stored in each TAG record's offset */
	__u32 handles[FERRY_CBT_GROUP_MAX]; /* in */
	__u64 seqs[FERRY_CBT_GROUP_MAX];    /* out: each TAG record's sequence number */
};

/* The first published size of each struct: the module accepts any size from
 * it up, zero-filling fields the caller does not know. */
#define FERRY_CBT_ATTACH_SIZE_VER0 48
#define FERRY_CBT_STATUS_SIZE_VER0 88

struct ferry_cbt_detach {
	__u32 size;   /* in: sizeof(struct ferry_cbt_detach) */
	__u32 handle; /* in */
};

struct ferry_cbt_status {
	__u32 size;      /* in: sizeof(struct ferry_cbt_status) */
	__u32 handle;    /* in */
	__u32 major;     /* out: the attached whole disk */
	__u32 minor;     /* out */
	__u32 mode;      /* out: FERRY_CBT_MODE_* */
	__u32 _pad0;
	__u64 capacity;  /* out: ring slots */
	__u64 records;   /* out: records queued into the ring since attach */
	__u64 overflows; /* out: times a change found the ring full (and the disk went to BITMAP mode) */
	__u64 lost;      /* out: changes no record can describe (e.g. zone ops) */
	__u64 bytes;     /* out: bytes of all changes seen (queued or not) */
	__u64 seq;       /* out: next sequence number (= changes seen) */
	__u64 producer;  /* out: the module's producer index */
	__u64 consumer;  /* out: the consumer index in the ring header, now */
	/* Appended in version 1 (ABI 2); an 88-byte struct is version 0. */
	__u64 data_capacity;  /* out: bytes in the data area */
	__u64 data_cap;       /* out: the memory cap (bytes of it the module may fill) */
	__u64 data_used;      /* out: data-area bytes not yet released */
	__u64 data_records;   /* out: records queued with their payload */
	__u64 mode_changes;   /* out: times the mode changed since attach */
	__u64 bitmap_changes; /* out: changes recorded in the bitmap since attach */
	__u64 bitmap_dirty;   /* out: bits set in the bitmap now */
	__u64 bitmap_bits;    /* out: bits in the bitmap (CATCHUP needs bitmap_bits/8 bytes, rounded up to 8) */
	__u64 bitmap_block;   /* out: bytes of disk per bit */
	__u64 catchups;       /* out: CATCHUP calls since attach */
	__u64 inflight;       /* out: writes queued and not yet completed */
	__u64 untracked;      /* out: writes whose completion could not be followed (counted in lost) */
};

/* TAG input flags. */
/* Freeze the filesystem mounted on the attached whole disk (the kernel's
 * FIFREEZE path) while the tag is queued, and thaw it after. Filesystems on
 * partitions are frozen by the caller (FIFREEZE on each mount point) around
 * a TAG without this flag. */
#define FERRY_CBT_TAG_F_FREEZE 0x0001

/*
 * TAG queues a consistency marker (a FERRY_REC_TAG record, length 0, offset
 * 0) at the ring's current position: every change queued before it is
 * before it in the ring, every change queued after it is after. It takes a
 * sequence number like a change. A full ring refuses it with EAGAIN (drain,
 * then retry); nothing is flagged then, since no change was lost.
 */
struct ferry_cbt_tag {
	__u32 size;      /* in: sizeof(struct ferry_cbt_tag) */
	__u32 handle;    /* in */
	__u32 flags;     /* in: FERRY_CBT_TAG_F_* */
	__u32 _pad0;     /* in: 0 */
	__u64 seq;       /* out: the tag record's sequence number */
	__u64 frozen_ns; /* out: how long the filesystem was frozen (0 without FREEZE) */
};

#ifdef __cplusplus
#define FERRY_IOCTL_STATIC_ASSERT static_assert
#else
#define FERRY_IOCTL_STATIC_ASSERT _Static_assert
#endif
/*
 * SET_CAP limits the bytes of the data area the module may fill (the memory
 * cap). Above data_capacity it is clamped; 0 keeps the disk out of DATA
 * mode. data_cap returns the cap in force.
 */
struct ferry_cbt_cap {
	__u32 size;     /* in: sizeof(struct ferry_cbt_cap) */
	__u32 handle;   /* in */
	__u64 data_cap; /* in: bytes; out: the cap in force */
};

/*
 * CATCHUP hands the dirty bitmap to the caller and marks where that
 * happened. Under the ring's lock it swaps the bitmap for an empty one and,
 * if the ring has room, queues a FERRY_REC_CATCHUP record and leaves BITMAP
 * mode (for DATA mode if the memory cap allows, else METADATA). With the
 * ring full there is no marker (FERRY_CBT_CATCHUP_MARKED is clear): every
 * record in the ring then precedes the hand-over, and new changes keep
 * going to the (new) bitmap until the agent drains the ring and calls
 * again. Then it waits until every write queued before the hand-over has
 * completed, so that reading the disk afterwards finds their data, and
 * copies the bitmap to `buf` (bit b, in little-endian 64-bit words, covers
 * bytes [b * bitmap_block, (b+1) * bitmap_block) of the disk). The agent
 * calls it also before reading the disk for records without payload: any
 * CATCHUP is a completion barrier for the writes queued before it.
 * ETIMEDOUT if writes queued before it did not complete within 30 s (the
 * loss is flagged: the agent must resync; a later CATCHUP first waits for
 * those writes again). Writes are followed from block_rq_complete (blk-mq)
 * and block_bio_complete (bio-based drivers); a disk whose bios are
 * re-targeted underneath (NVMe multipath) is not supported.
 */
#define FERRY_CBT_CATCHUP_MARKED 0x0001 /* out: a FERRY_REC_CATCHUP record was queued */
/* in: also wait (30 s at most: ETIMEDOUT) for every request in the disk's
 * queue (freeze and unfreeze it), covering writes the in-flight table could
 * not follow, then forget the table's entries (all completed); the agent
 * sets it before a resync that a loss made necessary */
#define FERRY_CBT_CATCHUP_F_DRAIN 0x0001

struct ferry_cbt_catchup {
	__u32 size;         /* in: sizeof(struct ferry_cbt_catchup) */
	__u32 handle;       /* in */
	__u64 buf;          /* in: user address of the bitmap buffer */
	__u64 buf_bytes;    /* in: its size: at least bitmap_bits/8 rounded up to 8 */
	__u64 seq;          /* out: the marker's sequence number, or (no marker)
	                     * the next one: changes before it are in the
	                     * bitmap handed over or in the ring */
	__u64 bitmap_bits;  /* out: bits copied */
	__u64 bitmap_dirty; /* out: of which set */
	__u64 bitmap_block; /* out: bytes of disk per bit */
	__u64 wait_ns;      /* out: time spent waiting for writes in flight */
	__u32 out_flags;    /* out: FERRY_CBT_CATCHUP_MARKED */
	__u32 flags;        /* in: FERRY_CBT_CATCHUP_F_* */
};

FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_attach) == 88, "attach is 88 bytes");
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_detach) == 8, "detach is 8 bytes");
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_status) == 184, "status is 184 bytes");
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_cap) == 16, "cap is 16 bytes");
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_catchup) == 72, "catchup is 72 bytes");
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_tag) == 32, "tag is 32 bytes");
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_group_tag) == 112, "group tag is 112 bytes");

/* 0xFC: not taken in Documentation/userspace-api/ioctl/ioctl-number.rst. */
/*
 * The state file of an attached disk: STATE_DIR/MAJOR-MINOR.state (module
 * parameter state_dir, default /var/lib/ferry/kmod; empty disables it).
 * Little-endian: this header, then bitmap_bytes of bitmap (as CATCHUP
 * hands it over). The module writes it when it attaches a disk (flags 0:
 * tracking active, so a crash leaves it unclean), and again with
 * FERRY_CBT_SAVED_CLEAN and the bitmap at a clean stop (module unload, or a
 * reboot notifier, which may find the filesystem read-only: then the file
 * stays unclean). The bitmap then holds every change not consumed (records
 * still in the ring are folded into it). checksum is xxh64 (seed 0) of the
 * header with checksum zero, then of the bitmap. A file that is short,
 * fails the checksum, or names another disk size counts as unclean.
 */
#define FERRY_CBT_SAVED_MAGIC "FCBTSAVE"
#define FERRY_CBT_SAVED_VERSION 1
#define FERRY_CBT_SAVED_CLEAN 0x0001

struct ferry_cbt_saved {
	__u8 magic[8];       /* FERRY_CBT_SAVED_MAGIC, no terminator */
	__u32 version;       /* FERRY_CBT_SAVED_VERSION */
	__u32 header_bytes;  /* sizeof(struct ferry_cbt_saved) */
	__u32 flags;         /* FERRY_CBT_SAVED_* */
	__u32 major;
	__u32 minor;
	__u32 bitmap_shift;  /* log2(bytes per bit) */
	__u64 disk_bytes;
	__u64 next_seq;      /* the next change's sequence number */
	__u64 capacity;      /* ring records of the attachment */
	__u64 data_bytes;    /* its data area */
	__u64 bitmap_bits;
	__u64 bitmap_bytes;  /* bytes following the header (0 unless clean) */
	__u64 saved_ns;      /* CLOCK_REALTIME when written */
	__u64 checksum;
};
FERRY_IOCTL_STATIC_ASSERT(sizeof(struct ferry_cbt_saved) == 96, "saved state header is 96 bytes");

#define FERRY_CBT_IOC_MAGIC 0xFC
#define FERRY_CBT_IOC_ATTACH _IOWR(FERRY_CBT_IOC_MAGIC, 0x01, struct ferry_cbt_attach)
#define FERRY_CBT_IOC_DETACH _IOW(FERRY_CBT_IOC_MAGIC, 0x02, struct ferry_cbt_detach)
#define FERRY_CBT_IOC_STATUS _IOWR(FERRY_CBT_IOC_MAGIC, 0x03, struct ferry_cbt_status)
#define FERRY_CBT_IOC_TAG _IOWR(FERRY_CBT_IOC_MAGIC, 0x04, struct ferry_cbt_tag)
#define FERRY_CBT_IOC_SET_CAP _IOWR(FERRY_CBT_IOC_MAGIC, 0x05, struct ferry_cbt_cap)
#define FERRY_CBT_IOC_CATCHUP _IOWR(FERRY_CBT_IOC_MAGIC, 0x06, struct ferry_cbt_catchup)
#define FERRY_CBT_IOC_GROUP_TAG _IOWR(FERRY_CBT_IOC_MAGIC, 0x07, struct ferry_cbt_group_tag)

#endif /* _UAPI_FERRY_CBT_IOCTL_H */
