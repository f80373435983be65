// SPDX-License-Identifier: GPL-2.0-only
/*
 * kmod-probe: the guest-side test program for ferry_cbt.ko
 * (cbt-module/kmod), run by tests/guest/kmod-test.sh inside a busybox
 * guest. Statically linked:
 *
 *   gcc -static -O2 -Wall -Wextra -o kmod-probe tests/guest/kmod-probe.c
 *
 * It speaks the ioctls of cbt-module/include/uapi/ferry_cbt_ioctl.h, maps
 * a disk's ring and plays the consumer (acquire load of `producer`, release
 * store of `consumer`), does O_DIRECT writes, discards and zero-outs of
 * known sizes at known offsets and checks the records that come back.
 *
 * Every test saves the disk ranges it changes and writes them back after
 * detaching, so a guest disk compared against a replica afterwards (the
 * BPF test in the same boot) is unchanged.
 *
 * Usage: kmod-probe TEST ARGS...; exit status 0 = pass. Tests:
 *   abi DISK [PART]          argument checking, errors, handle rules
 *   records DISK             writes/discard/zeroout -> exact records
 *   partition DISK PART      I/O through PART lands at whole-disk offsets
 *   bitmap DISK              a full ring: bitmap mode, CATCHUP hands it over
 *   data DISK                data mode payloads, the memory cap, back to data mode
 *   tag DISK                 consistency markers: position, seq, freeze, full ring
 *   seq DISK                 version-0 attach struct; first_seq continues numbering
 *   isolation DISK1 DISK2    each ring sees only its own disk
 *   persist DISK             tracking outlives the descriptor
 *   stress DISK CHURNDISK    concurrent writers + consumer + attach/detach churn
 *   leave-attached DISK      attach and exit (rmmod must detach it)
 *   setcap DISK BYTES        set the memory cap of DISK's attachment
 *   hold DISK CAP DATA SECS DRAIN   attach for SECS seconds (benchmark)
 *   mkloop FILE              MBR + one partition in FILE, attach a loop
 *                            device with partition scan; prints /dev/loopN
 *   rmloop /dev/loopN
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../cbt-module/include/uapi/ferry_cbt.h"
#include "../../cbt-module/include/uapi/ferry_cbt_ioctl.h"

#define MiB (1024ULL * 1024)
#define KiB 1024ULL

static int failures;

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("  FAILED: ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	fflush(stdout);
	failures++;
}

__attribute__((format(printf, 1, 2))) static void note(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("  ");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	fflush(stdout);
}

__attribute__((format(printf, 1, 2))) static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("  FATAL: ");
	vprintf(fmt, ap);
	printf(" (errno %d: %s)\n", errno, strerror(errno));
	va_end(ap);
	fflush(stdout);
	exit(1);
}

/* The failed condition and its line, then the message with its arguments. */
#define CHECK(cond, ...)                                                        \
	do {                                                                    \
		if (!(cond)) {                                                  \
			printf("  at line %d: %s\n", __LINE__, #cond);         \
			fail(__VA_ARGS__);                                      \
		}                                                               \
	} while (0)

/* ---- device facts ------------------------------------------------------- */

struct disk {
	const char *path;
	unsigned int major, minor;
	char sysdir[PATH_MAX]; /* /sys/dev/block/M:m (resolved) */
	int fd;                /* O_RDWR | O_DIRECT */
	unsigned int lbs;      /* logical block size */
	uint64_t size;
};

static int read_sys_u64(const char *dir, const char *file, uint64_t *v)
{
	char p[PATH_MAX + 64], buf[64];
	FILE *f;

	snprintf(p, sizeof(p), "%s/%s", dir, file);
	f = fopen(p, "r");
	if (!f)
		return -1;
	if (!fgets(buf, sizeof(buf), f)) {
		fclose(f);
		return -1;
	}
	fclose(f);
	*v = strtoull(buf, NULL, 10);
	return 0;
}

static int read_sys_str(const char *dir, const char *file, char *buf, size_t n)
{
	char p[PATH_MAX + 64];
	FILE *f;

	snprintf(p, sizeof(p), "%s/%s", dir, file);
	f = fopen(p, "r");
	if (!f)
		return -1;
	if (!fgets(buf, n, f)) {
		fclose(f);
		return -1;
	}
	fclose(f);
	buf[strcspn(buf, "\n")] = 0;
	return 0;
}

static void disk_open(struct disk *d, const char *path)
{
	char link[64];
	struct stat st;

	memset(d, 0, sizeof(*d));
	d->path = path;
	if (stat(path, &st) || !S_ISBLK(st.st_mode))
		die("%s is not a block device", path);
	d->major = major(st.st_rdev);
	d->minor = minor(st.st_rdev);
	snprintf(link, sizeof(link), "/sys/dev/block/%u:%u", d->major, d->minor);
	if (!realpath(link, d->sysdir))
		die("realpath %s", link);
	d->fd = open(path, O_RDWR | O_DIRECT);
	if (d->fd < 0)
		die("open %s", path);
	if (ioctl(d->fd, BLKSSZGET, &d->lbs))
		die("BLKSSZGET %s", path);
	if (ioctl(d->fd, BLKGETSIZE64, &d->size))
		die("BLKGETSIZE64 %s", path);
}

static void disk_close(struct disk *d)
{
	close(d->fd);
}

/* The whole disk's queue directory (a partition's parent holds it). */
static void queue_dir(const struct disk *d, char *out, size_t n)
{
	char p[PATH_MAX + 16];

	snprintf(p, sizeof(p), "%s/queue", d->sysdir);
	if (access(p, F_OK) == 0)
		snprintf(out, n, "%s", p);
	else
		snprintf(out, n, "%s/../queue", d->sysdir);
}

static uint64_t queue_u64(const struct disk *d, const char *file)
{
	char q[PATH_MAX + 16];
	uint64_t v = 0;

	queue_dir(d, q, sizeof(q));
	read_sys_u64(q, file, &v);
	return v;
}

static int write_cache_on(const struct disk *d)
{
	char q[PATH_MAX + 16], buf[32] = "";

	queue_dir(d, q, sizeof(q));
	read_sys_str(q, "write_cache", buf, sizeof(buf));
	return strcmp(buf, "write back") == 0;
}

/* ---- I/O ------------------------------------------------------------------ */

static void *abuf(size_t len)
{
	void *p;

	if (posix_memalign(&p, 4096, len ? len : 4096))
		die("posix_memalign");
	return p;
}

static void dwrite(const struct disk *d, uint64_t off, size_t len, int pattern)
{
	void *b = abuf(len);
	ssize_t n;

	memset(b, pattern, len);
	n = pwrite(d->fd, b, len, off);
	if (n != (ssize_t)len)
		die("pwrite %s off %llu len %zu -> %zd", d->path, (unsigned long long)off, len, n);
	free(b);
}

static void dwrite_dsync(const struct disk *d, uint64_t off, size_t len, int pattern)
{
	int fd = open(d->path, O_RDWR | O_DIRECT | O_DSYNC);
	void *b = abuf(len);

	if (fd < 0)
		die("open O_DSYNC %s", d->path);
	memset(b, pattern, len);
	if (pwrite(fd, b, len, off) != (ssize_t)len)
		die("pwrite O_DSYNC %s", d->path);
	close(fd);
	free(b);
}

/* Saved contents of the ranges a test changes, written back at the end. */
struct saved {
	uint64_t off;
	size_t len;
	void *data;
};
static struct saved saves[32];
static int nsaves;

static void save_range(const struct disk *d, uint64_t off, size_t len)
{
	struct saved *s = &saves[nsaves++];

	if (nsaves > 32)
		die("too many saved ranges");
	s->off = off;
	s->len = len;
	s->data = abuf(len);
	if (pread(d->fd, s->data, len, off) != (ssize_t)len)
		die("pread %s off %llu", d->path, (unsigned long long)off);
}

static void restore_ranges(const struct disk *d)
{
	int i;

	for (i = nsaves - 1; i >= 0; i--) {
		if (pwrite(d->fd, saves[i].data, saves[i].len, saves[i].off) != (ssize_t)saves[i].len)
			die("restore pwrite %s", d->path);
		free(saves[i].data);
	}
	nsaves = 0;
	fsync(d->fd);
}

/* ---- the control device and the ring --------------------------------------- */

static int ctl_open(void)
{
	int fd = open(FERRY_CBT_DEVICE, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open %s", FERRY_CBT_DEVICE);
	return fd;
}

static int do_attach(int ctl, const struct disk *d, uint64_t cap, uint32_t flags, struct ferry_cbt_attach *a)
{
	memset(a, 0, sizeof(*a));
	a->size = sizeof(*a);
	a->flags = flags;
	a->major = d->major;
	a->minor = d->minor;
	a->capacity = cap;
	return ioctl(ctl, FERRY_CBT_IOC_ATTACH, a) ? -errno : 0;
}

static int do_detach(int ctl, uint32_t handle)
{
	struct ferry_cbt_detach dt = { .size = sizeof(dt), .handle = handle };

	return ioctl(ctl, FERRY_CBT_IOC_DETACH, &dt) ? -errno : 0;
}

static int do_status(int ctl, uint32_t handle, struct ferry_cbt_status *st)
{
	memset(st, 0, sizeof(*st));
	st->size = sizeof(*st);
	st->handle = handle;
	return ioctl(ctl, FERRY_CBT_IOC_STATUS, st) ? -errno : 0;
}

struct ring {
	struct ferry_cbt_ring_header *h;
	struct ferry_cbt_record *slots;
	size_t size;
	uint64_t cap;
};

static void ring_map(int ctl, const struct ferry_cbt_attach *a, struct ring *r)
{
	void *p = mmap(NULL, a->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, ctl, a->mmap_offset);

	if (p == MAP_FAILED)
		die("mmap ring (handle %u)", a->handle);
	r->h = p;
	r->slots = (struct ferry_cbt_record *)((char *)p + sizeof(*r->h));
	r->size = a->mmap_size;
	r->cap = a->capacity;
}

static void ring_unmap(struct ring *r)
{
	munmap(r->h, r->size);
}

static uint64_t ring_producer(const struct ring *r)
{
	return __atomic_load_n(&r->h->producer, __ATOMIC_ACQUIRE);
}

/* Read every queued record (up to max) and release them. */
static size_t ring_drain(struct ring *r, struct ferry_cbt_record *out, size_t max)
{
	uint64_t cons = r->h->consumer; /* ours */
	uint64_t prod = ring_producer(r);
	size_t n = 0;

	if (prod - cons > r->cap) {
		fail("ring indices inconsistent: producer %llu consumer %llu", (unsigned long long)prod,
		     (unsigned long long)cons);
		return 0;
	}
	while (cons != prod && n < max) {
		out[n++] = r->slots[cons & (r->cap - 1)];
		cons++;
	}
	__atomic_store_n(&r->h->consumer, cons, __ATOMIC_RELEASE);
	return n;
}

static void check_header(const struct ring *r, uint64_t cap)
{
	CHECK(r->h->magic == FERRY_CBT_RING_MAGIC, "magic %#x", r->h->magic);
	CHECK(r->h->size == sizeof(struct ferry_cbt_ring_header), "size %u", r->h->size);
	CHECK(r->h->abi_version == FERRY_CBT_ABI_VERSION, "abi %u", r->h->abi_version);
	CHECK(r->h->record_size == sizeof(struct ferry_cbt_record), "record_size %u", r->h->record_size);
	CHECK(r->h->capacity == cap, "capacity %llu", (unsigned long long)r->h->capacity);
	CHECK(r->h->flags == 0 && r->h->overflows == 0, "flags %llu overflows %llu",
	      (unsigned long long)r->h->flags, (unsigned long long)r->h->overflows);
}

/* An expected BLKZEROOUT: recorded as write-zeroes, as writes (zero pages),
 * or both (write-zeroes refused by the device, then the kernel's fallback). */
#define ZEROOUT 0x100

static const char *kind_name(unsigned int k)
{
	switch (k) {
	case FERRY_REC_WRITE:
		return "write";
	case FERRY_REC_DISCARD:
		return "discard";
	case FERRY_REC_WRITE_ZEROES:
		return "write-zeroes";
	case FERRY_REC_TAG:
		return "tag";
	case ZEROOUT:
		return "zero-out";
	default:
		return "?";
	}
}

static void print_rec(const char *pfx, const struct ferry_cbt_record *r)
{
	note("%s seq %llu %s off %llu len %u flags %#x t %llu", pfx, (unsigned long long)r->seq,
	     kind_name(r->kind), (unsigned long long)r->offset, r->length, r->flags,
	     (unsigned long long)r->time_ns);
}

/* What a test expects: one extent per operation. flush: 0 no, 1 yes, -1 any.
 * kind ZEROOUT: see above. */
struct want {
	uint64_t off;
	uint64_t len;
	unsigned int kind;
	int flush;
};

/*
 * Compare records with expectations. Records of one kind that continue each
 * other are merged first (the kernel may build several bios for one
 * discard or zero-out); expectations are never adjacent to each other.
 * Also checks seq runs +1 from the first and time_ns never goes back.
 */
static void check_records(const struct ferry_cbt_record *recs, size_t n, const struct want *w, size_t nw)
{
	struct want got[256];
	size_t ng = 0, i, j;

	for (i = 0; i < n; i++) {
		if (i) {
			CHECK(recs[i].seq == recs[i - 1].seq + 1, "seq %llu after %llu",
			      (unsigned long long)recs[i].seq, (unsigned long long)recs[i - 1].seq);
			CHECK(recs[i].time_ns >= recs[i - 1].time_ns, "time went back at seq %llu",
			      (unsigned long long)recs[i].seq);
		}
		CHECK(recs[i].time_ns != 0, "time_ns 0");
		CHECK(recs[i].length != 0, "empty record");
		if (ng && got[ng - 1].kind == recs[i].kind && got[ng - 1].off + got[ng - 1].len == recs[i].offset &&
		    got[ng - 1].flush == !!(recs[i].flags & FERRY_RECF_FLUSH)) {
			got[ng - 1].len += recs[i].length;
			continue;
		}
		if (ng == 256)
			break;
		got[ng].off = recs[i].offset;
		got[ng].len = recs[i].length;
		got[ng].kind = recs[i].kind;
		got[ng].flush = !!(recs[i].flags & FERRY_RECF_FLUSH);
		ng++;
	}
	for (i = 0, j = 0; i < nw && j < ng; i++, j++) {
		int ok = got[j].off == w[i].off && got[j].len == w[i].len &&
			 (got[j].kind == w[i].kind ||
			  (w[i].kind == ZEROOUT && (got[j].kind == FERRY_REC_WRITE_ZEROES || got[j].kind == FERRY_REC_WRITE))) &&
			 (w[i].flush < 0 || got[j].flush == w[i].flush);

		if (!ok) {
			fail("extent %zu: got %s off %llu len %llu flush %d; want %s off %llu len %llu flush %d", j,
			     kind_name(got[j].kind), (unsigned long long)got[j].off, (unsigned long long)got[j].len,
			     got[j].flush, kind_name(w[i].kind), (unsigned long long)w[i].off,
			     (unsigned long long)w[i].len, w[i].flush);
			continue;
		}
		/* A device that refuses write-zeroes: the kernel retried with
		 * zero-filled writes, and both attempts were seen. */
		if (w[i].kind == ZEROOUT && got[j].kind == FERRY_REC_WRITE_ZEROES && j + 1 < ng &&
		    got[j + 1].kind == FERRY_REC_WRITE && got[j + 1].off == w[i].off && got[j + 1].len == w[i].len) {
			note("zero-out at %llu: write-zeroes, then the kernel's zero-page fallback",
			     (unsigned long long)w[i].off);
			j++;
		}
	}
	if (i != nw || j != ng)
		fail("%zu extents recorded (%zu records), %zu expected", ng, n, nw);
	if (failures)
		for (i = 0; i < n; i++)
			print_rec("record", &recs[i]);
}

static int blk_range_ioctl(const struct disk *d, unsigned long req, uint64_t off, uint64_t len)
{
	uint64_t range[2] = { off, len };

	return ioctl(d->fd, req, range) ? -errno : 0;
}

/* ---- tests ------------------------------------------------------------------ */

static int t_abi(const char *diskp, const char *partp)
{
	struct ferry_cbt_attach a, a2;
	struct ferry_cbt_status st;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret;
	void *p;

	disk_open(&d, diskp);
	CHECK(do_attach(ctl, &d, 3, 0, &a) == -EINVAL, "capacity 3 must be refused");
	CHECK(do_attach(ctl, &d, 0, 0, &a) == -EINVAL, "capacity 0 must be refused");
	CHECK(do_attach(ctl, &d, FERRY_CBT_MAX_CAPACITY * 2, 0, &a) == -EINVAL, "capacity above max");
	CHECK(do_attach(ctl, &d, 16, 0x80, &a) == -EINVAL, "unknown flag must be refused");
	memset(&a, 0, sizeof(a));
	a.size = 8; /* shorter than any known version */
	a.major = d.major;
	a.minor = d.minor;
	a.capacity = 16;
	CHECK(ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) == -1 && errno == EINVAL, "short struct");
	{
		/* a longer struct from a "newer" caller: zero tail accepted, non-zero refused */
		struct {
			struct ferry_cbt_attach a;
			uint64_t extra;
		} big;

		memset(&big, 0, sizeof(big));
		big.a.size = sizeof(big);
		big.a.major = d.major;
		big.a.minor = d.minor;
		big.a.capacity = 16;
		big.extra = 1;
		CHECK(ioctl(ctl, FERRY_CBT_IOC_ATTACH, &big) == -1 && errno == E2BIG, "non-zero tail must be E2BIG");
		big.extra = 0;
		ret = ioctl(ctl, FERRY_CBT_IOC_ATTACH, &big);
		CHECK(ret == 0, "zero tail accepted (errno %d)", errno);
		if (ret == 0)
			CHECK(do_detach(ctl, big.a.handle) == 0, "detach");
	}
	{
		struct disk nd = d;

		nd.major = 4095;
		nd.minor = 1048575;
		ret = do_attach(ctl, &nd, 16, 0, &a);
		CHECK(ret == -ENXIO || ret == -ENODEV, "nonexistent device: %d", ret);
		note("attach of a nonexistent device: %s", strerror(-ret));
	}
	if (partp) {
		struct disk pd;

		disk_open(&pd, partp);
		CHECK(do_attach(ctl, &pd, 16, 0, &a) == -EINVAL, "a partition must be refused");
		disk_close(&pd);
	}
	CHECK(do_status(ctl, 12345, &st) == -ENOENT, "status of unknown handle");
	CHECK(do_detach(ctl, 12345) == -ENOENT, "detach of unknown handle");
	p = mmap(NULL, 8192, PROT_READ, MAP_SHARED, ctl, FERRY_CBT_MMAP_OFFSET(12345));
	CHECK(p == MAP_FAILED, "mmap of unknown handle");

	ret = do_attach(ctl, &d, 16, 0, &a);
	CHECK(ret == 0, "attach %s: %d", diskp, ret);
	if (ret)
		return 1;
	note("attach: handle %u mmap_offset %#llx mmap_size %llu", a.handle, (unsigned long long)a.mmap_offset,
	     (unsigned long long)a.mmap_size);
	CHECK(a.mmap_offset == FERRY_CBT_MMAP_OFFSET(a.handle), "mmap_offset");
	CHECK(a.mmap_size == 8192, "16 slots: 4096 + 512 rounded to 8192, got %llu",
	      (unsigned long long)a.mmap_size);
	CHECK(do_attach(ctl, &d, 16, 0, &a2) == -EEXIST, "second attach must be EEXIST");
	CHECK(do_attach(ctl, &d, 64, FERRY_CBT_ATTACH_F_EXISTING_OK, &a2) == 0, "EXISTING_OK");
	CHECK(a2.handle == a.handle && (a2.out_flags & FERRY_CBT_ATTACHED_EXISTING) && a2.capacity == 16,
	      "EXISTING_OK returns the same handle (%u vs %u), flag, capacity 16", a2.handle, a.handle);
	p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, ctl, a.mmap_offset);
	CHECK(p == MAP_FAILED && errno == EINVAL, "MAP_PRIVATE must be refused");
	p = mmap(NULL, 3 * 4096, PROT_READ, MAP_SHARED, ctl, a.mmap_offset);
	CHECK(p == MAP_FAILED, "mapping beyond the ring must be refused");
	p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ctl, a.mmap_offset + 4096);
	CHECK(p == MAP_FAILED, "an offset inside a ring must be refused");
	CHECK(do_status(ctl, a.handle, &st) == 0, "status");
	CHECK(st.major == d.major && st.minor == d.minor && st.mode == FERRY_CBT_MODE_METADATA && st.capacity == 16,
	      "status: %u:%u mode %u capacity %llu", st.major, st.minor, st.mode, (unsigned long long)st.capacity);
	ring_map(ctl, &a, &r);
	check_header(&r, 16);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	CHECK(do_detach(ctl, a.handle) == -ENOENT, "second detach must be ENOENT");
	CHECK(do_status(ctl, a.handle, &st) == -ENOENT, "status after detach must be ENOENT");
	/* The mapping outlives the attachment. */
	CHECK(r.h->magic == FERRY_CBT_RING_MAGIC, "ring still mapped after detach");
	ring_unmap(&r);
	/* A new attachment never reuses the old handle. */
	CHECK(do_attach(ctl, &d, 16, 0, &a2) == 0, "re-attach");
	CHECK(a2.handle != a.handle, "handle reused: %u", a2.handle);
	CHECK(do_detach(ctl, a2.handle) == 0, "detach");
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

static int t_records(const char *diskp)
{
	struct ferry_cbt_record recs[256];
	struct ferry_cbt_attach a;
	struct ferry_cbt_status st;
	struct want w[16];
	size_t nw = 0, n;
	uint64_t bytes = 0, dmax, zmax;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret, wc;

	disk_open(&d, diskp);
	if (d.size < 8 * MiB)
		die("%s is too small (%llu bytes)", diskp, (unsigned long long)d.size);
	dmax = queue_u64(&d, "discard_max_bytes");
	zmax = queue_u64(&d, "write_zeroes_max_bytes");
	wc = write_cache_on(&d);
	note("%s: %u:%u lbs %u size %llu discard_max %llu write_zeroes_max %llu write_cache %s", diskp, d.major,
	     d.minor, d.lbs, (unsigned long long)d.size, (unsigned long long)dmax, (unsigned long long)zmax,
	     wc ? "back" : "through");
	save_range(&d, 1 * MiB, 5 * MiB);

	ret = do_attach(ctl, &d, 256, 0, &a);
	if (ret) {
		errno = -ret;
		die("attach %s", diskp);
	}
	ring_map(ctl, &a, &r);
	check_header(&r, 256);

	dwrite(&d, 1 * MiB, 4096, 0xa1);
	w[nw++] = (struct want){ 1 * MiB, 4096, FERRY_REC_WRITE, 0 };
	dwrite(&d, 2 * MiB + 4096, 64 * KiB, 0xa2);
	w[nw++] = (struct want){ 2 * MiB + 4096, 64 * KiB, FERRY_REC_WRITE, 0 };
	if (d.lbs == 512) {
		dwrite(&d, 3 * MiB + 512, 512, 0xa3);
		w[nw++] = (struct want){ 3 * MiB + 512, 512, FERRY_REC_WRITE, 0 };
	}
	/* O_DSYNC direct writes carry REQ_FUA, kept only with a write-back cache. */
	dwrite_dsync(&d, 3 * MiB + 64 * KiB, 8192, 0xa4);
	w[nw++] = (struct want){ 3 * MiB + 64 * KiB, 8192, FERRY_REC_WRITE, wc ? 1 : 0 };
	if (dmax) {
		ret = blk_range_ioctl(&d, BLKDISCARD, 4 * MiB, 1 * MiB);
		CHECK(ret == 0, "BLKDISCARD: %d", ret);
		w[nw++] = (struct want){ 4 * MiB, 1 * MiB, FERRY_REC_DISCARD, 0 };
	} else {
		note("no discard support: discard not exercised");
	}
	ret = blk_range_ioctl(&d, BLKZEROOUT, 5 * MiB + 128 * KiB, 192 * KiB);
	CHECK(ret == 0, "BLKZEROOUT: %d", ret);
	w[nw++] = (struct want){ 5 * MiB + 128 * KiB, 192 * KiB, zmax ? ZEROOUT : FERRY_REC_WRITE, -1 };

	n = ring_drain(&r, recs, 256);
	note("%zu records", n);
	check_records(recs, n, w, nw);
	if (n)
		CHECK(recs[0].seq == 0, "first seq %llu", (unsigned long long)recs[0].seq);
	for (size_t i = 0; i < n; i++)
		bytes += recs[i].length;
	CHECK(do_status(ctl, a.handle, &st) == 0, "status");
	CHECK(st.records == n && st.seq == n && st.producer == n && st.consumer == n,
	      "status records %llu seq %llu producer %llu consumer %llu, %zu read",
	      (unsigned long long)st.records, (unsigned long long)st.seq, (unsigned long long)st.producer,
	      (unsigned long long)st.consumer, n);
	CHECK(st.bytes == bytes, "status bytes %llu, records sum %llu", (unsigned long long)st.bytes,
	      (unsigned long long)bytes);
	CHECK(st.overflows == 0 && st.lost == 0 && r.h->flags == 0, "no overflow");
	/* Reads are not recorded. */
	{
		void *b = abuf(4096);

		CHECK(pread(d.fd, b, 4096, 1 * MiB) == 4096, "pread");
		free(b);
		CHECK(ring_producer(&r) == n, "a read made a record");
	}
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

static int t_partition(const char *diskp, const char *partp)
{
	struct ferry_cbt_record recs[64];
	struct ferry_cbt_attach a;
	struct want w[8];
	size_t nw = 0, n;
	struct disk d, p;
	uint64_t start, base, dmax, zmax;
	struct ring r;
	int ctl = ctl_open(), ret;

	disk_open(&d, diskp);
	disk_open(&p, partp);
	if (read_sys_u64(p.sysdir, "start", &start))
		die("no partition start for %s", partp);
	base = start * 512;
	dmax = queue_u64(&p, "discard_max_bytes");
	zmax = queue_u64(&p, "write_zeroes_max_bytes");
	note("%s starts at sector %llu (byte %llu) of %s", partp, (unsigned long long)start,
	     (unsigned long long)base, diskp);
	if (p.size < 2 * MiB)
		die("%s too small", partp);
	save_range(&p, 0, 2 * MiB);

	ret = do_attach(ctl, &d, 64, 0, &a);
	if (ret) {
		errno = -ret;
		die("attach %s", diskp);
	}
	ring_map(ctl, &a, &r);
	dwrite(&p, 192 * KiB, 8192, 0xb1);
	w[nw++] = (struct want){ base + 192 * KiB, 8192, FERRY_REC_WRITE, 0 };
	dwrite(&p, 1 * MiB, 4096, 0xb2);
	w[nw++] = (struct want){ base + 1 * MiB, 4096, FERRY_REC_WRITE, 0 };
	if (dmax) {
		CHECK(blk_range_ioctl(&p, BLKDISCARD, 512 * KiB, 256 * KiB) == 0, "BLKDISCARD on partition");
		w[nw++] = (struct want){ base + 512 * KiB, 256 * KiB, FERRY_REC_DISCARD, 0 };
	}
	CHECK(blk_range_ioctl(&p, BLKZEROOUT, 1536 * KiB, 64 * KiB) == 0, "BLKZEROOUT on partition");
	w[nw++] = (struct want){ base + 1536 * KiB, 64 * KiB, zmax ? ZEROOUT : FERRY_REC_WRITE, -1 };
	/* And the whole disk directly, for contrast. */
	save_range(&d, base + 1792 * KiB, 4096);
	dwrite(&d, base + 1792 * KiB, 4096, 0xb3);
	w[nw++] = (struct want){ base + 1792 * KiB, 4096, FERRY_REC_WRITE, 0 };

	n = ring_drain(&r, recs, 64);
	check_records(recs, n, w, nw);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	/* restore: whole-disk range first (saved last), then the partition's */
	{
		struct saved last = saves[--nsaves];

		if (pwrite(d.fd, last.data, last.len, last.off) != (ssize_t)last.len)
			die("restore");
		free(last.data);
	}
	restore_ranges(&p);
	disk_close(&p);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

static int do_tag(int ctl, uint32_t handle, uint32_t flags, struct ferry_cbt_tag *t);

static int do_catchup(int ctl, uint32_t handle, void *buf, uint64_t bytes, struct ferry_cbt_catchup *c)
{
	memset(c, 0, sizeof(*c));
	c->size = sizeof(*c);
	c->handle = handle;
	c->buf = (uint64_t)(uintptr_t)buf;
	c->buf_bytes = bytes;
	return ioctl(ctl, FERRY_CBT_IOC_CATCHUP, c) ? -errno : 0;
}

static int do_set_cap(int ctl, uint32_t handle, uint64_t cap, uint64_t *in_force)
{
	struct ferry_cbt_cap c = { .size = sizeof(c), .handle = handle, .data_cap = cap };

	if (ioctl(ctl, FERRY_CBT_IOC_SET_CAP, &c))
		return -errno;
	*in_force = c.data_cap;
	return 0;
}

static unsigned int mode_of(const struct ring *r)
{
	return __atomic_load_n(&r->h->mode, __ATOMIC_ACQUIRE);
}

/*
 * A full ring: the changes that do not fit go to the dirty bitmap (BITMAP
 * mode, sticky), nothing is flagged lost; CATCHUP hands over exactly the
 * blocks written, queues its marker, and the disk is back to records.
 */
static int t_bitmap(const char *diskp)
{
	struct ferry_cbt_record recs[16];
	struct ferry_cbt_attach a;
	struct ferry_cbt_status st;
	struct ferry_cbt_catchup c;
	struct ferry_cbt_tag t;
	uint64_t *bits, nbytes, blk;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret, i;
	size_t n;

	disk_open(&d, diskp);
	save_range(&d, 12 * MiB, 64 * KiB);
	save_range(&d, 15 * MiB, 4096);
	ret = do_attach(ctl, &d, 4, 0, &a);
	if (ret) {
		errno = -ret;
		die("attach %s", diskp);
	}
	ring_map(ctl, &a, &r);
	CHECK(a.mmap_size == 8192, "4 slots map 8192 bytes, got %llu", (unsigned long long)a.mmap_size);
	CHECK(a.bitmap_block == 64 * KiB, "bitmap block %llu", (unsigned long long)a.bitmap_block);
	CHECK(mode_of(&r) == FERRY_CBT_MODE_METADATA, "no data area: metadata mode, got %u", mode_of(&r));
	for (i = 0; i < 6; i++)
		dwrite(&d, 12 * MiB + i * 8192, 4096, 0xc0 + i);
	CHECK(ring_producer(&r) == 4, "producer %llu", (unsigned long long)ring_producer(&r));
	CHECK(mode_of(&r) == FERRY_CBT_MODE_BITMAP, "full ring: bitmap mode, got %u", mode_of(&r));
	CHECK(__atomic_load_n(&r.h->overflows, __ATOMIC_ACQUIRE) == 0 &&
	      !(__atomic_load_n(&r.h->flags, __ATOMIC_ACQUIRE) & FERRY_RINGF_OVERFLOW), "bitmap mode is not a loss");
	CHECK(do_status(ctl, a.handle, &st) == 0, "status");
	CHECK(st.mode == FERRY_CBT_MODE_BITMAP && st.overflows == 1 && st.records == 4 && st.seq == 6 && st.lost == 0 &&
	      st.bytes == 6 * 4096 && st.bitmap_changes == 2 && st.bitmap_dirty == 1 && st.mode_changes == 1,
	      "status mode %u overflows %llu records %llu seq %llu bytes %llu bitmap changes %llu dirty %llu", st.mode,
	      (unsigned long long)st.overflows, (unsigned long long)st.records, (unsigned long long)st.seq,
	      (unsigned long long)st.bytes, (unsigned long long)st.bitmap_changes, (unsigned long long)st.bitmap_dirty);
	CHECK(st.inflight == 0, "every write completed: %llu in flight", (unsigned long long)st.inflight);
	n = ring_drain(&r, recs, 16);
	CHECK(n == 4, "%zu records", n);
	/* Sticky: with room again, changes still go to the bitmap until
	 * CATCHUP, and a tag cannot be placed. */
	dwrite(&d, 15 * MiB, 4096, 0xcf);
	CHECK(ring_producer(&r) == 4, "bitmap mode is sticky: producer %llu", (unsigned long long)ring_producer(&r));
	CHECK(do_tag(ctl, a.handle, 0, &t) == -EAGAIN, "no tag in bitmap mode");
	nbytes = (st.bitmap_bits + 63) / 64 * 8;
	bits = calloc(1, nbytes);
	CHECK(do_catchup(ctl, a.handle, bits, nbytes - 8, &c) == -EINVAL || nbytes < 8, "a short buffer is refused");
	ret = do_catchup(ctl, a.handle, bits, nbytes, &c);
	CHECK(ret == 0, "catchup: %d", ret);
	CHECK(c.out_flags == FERRY_CBT_CATCHUP_MARKED, "marked: %u", c.out_flags);
	CHECK(c.seq == 7 && c.bitmap_dirty == 2 && c.bitmap_bits == st.bitmap_bits && c.bitmap_block == 64 * KiB,
	      "catchup seq %llu dirty %llu bits %llu", (unsigned long long)c.seq, (unsigned long long)c.bitmap_dirty,
	      (unsigned long long)c.bitmap_bits);
	for (blk = 0; blk < c.bitmap_bits; blk++) {
		int set = (bits[blk / 64] >> (blk % 64)) & 1;
		int want = blk == 12 * MiB / (64 * KiB) || blk == 15 * MiB / (64 * KiB);

		if (set != want)
			fail("bitmap block %llu: %d, want %d", (unsigned long long)blk, set, want);
	}
	CHECK(mode_of(&r) == FERRY_CBT_MODE_METADATA, "after catchup: metadata mode, got %u", mode_of(&r));
	dwrite(&d, 12 * MiB + 48 * KiB, 4096, 0xce);
	n = ring_drain(&r, recs, 16);
	CHECK(n == 2 && recs[0].kind == FERRY_REC_CATCHUP && recs[0].seq == c.seq && recs[0].length == 0 &&
	      recs[1].kind == FERRY_REC_WRITE && recs[1].seq == c.seq + 1 && recs[1].offset == 12 * MiB + 48 * KiB,
	      "catchup marker then the write: %zu records", n);
	CHECK(do_status(ctl, a.handle, &st) == 0 && st.bitmap_dirty == 0 && st.catchups == 1, "bitmap empty after catchup");
	/* DRAIN: the queue is frozen and unfrozen, the in-flight table starts
	 * over; an unknown flag is refused. */
	memset(&c, 0, sizeof(c));
	c.size = sizeof(c);
	c.handle = a.handle;
	c.buf = (uint64_t)(uintptr_t)bits;
	c.buf_bytes = nbytes;
	c.flags = 0x80;
	CHECK(ioctl(ctl, FERRY_CBT_IOC_CATCHUP, &c) == -1 && errno == EINVAL, "unknown catchup flag refused");
	c.flags = FERRY_CBT_CATCHUP_F_DRAIN;
	CHECK(ioctl(ctl, FERRY_CBT_IOC_CATCHUP, &c) == 0, "catchup with drain: %s", strerror(errno));
	CHECK(do_status(ctl, a.handle, &st) == 0 && st.inflight == 0 && st.lost == 0 && st.catchups == 2,
	      "after drain: in flight %llu lost %llu", (unsigned long long)st.inflight, (unsigned long long)st.lost);
	n = ring_drain(&r, recs, 16);
	CHECK(n == 1 && recs[0].kind == FERRY_REC_CATCHUP, "the drain's marker");
	/* A consumer index the producer never handed out is treated as a
	 * full ring: bitmap mode, never a slot overwritten. */
	__atomic_store_n(&r.h->consumer, r.h->consumer + 100, __ATOMIC_RELEASE);
	dwrite(&d, 12 * MiB + 56 * KiB, 4096, 0xcd);
	CHECK(ring_producer(&r) == 7 && mode_of(&r) == FERRY_CBT_MODE_BITMAP, "bogus consumer: producer %llu mode %u",
	      (unsigned long long)ring_producer(&r), mode_of(&r));
	/* CATCHUP on a full ring: the bitmap is handed over without a marker,
	 * and the disk stays in bitmap mode. */
	memset(bits, 0, nbytes);
	ret = do_catchup(ctl, a.handle, bits, nbytes, &c);
	CHECK(ret == 0 && !(c.out_flags & FERRY_CBT_CATCHUP_MARKED) && c.seq == 11 && c.bitmap_dirty == 1 &&
	      (bits[(12 * MiB / (64 * KiB)) / 64] >> ((12 * MiB / (64 * KiB)) % 64) & 1) &&
	      mode_of(&r) == FERRY_CBT_MODE_BITMAP && ring_producer(&r) == 7,
	      "catchup on a full ring: %d flags %u seq %llu dirty %llu mode %u", ret, c.out_flags,
	      (unsigned long long)c.seq, (unsigned long long)c.bitmap_dirty, mode_of(&r));
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	free(bits);
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

/* The consumer's side of the data area (the rule in ferry_cbt.h). */
static const uint8_t *data_next(const struct ring *r, uint64_t *cursor, uint32_t len)
{
	uint64_t dc = r->h->data_capacity, p = *cursor;

	if ((p & (dc - 1)) + len > dc)
		p = (p | (dc - 1)) + 1;
	*cursor = p + len;
	return (const uint8_t *)r->h + r->h->data_offset + (p & (dc - 1));
}

static int all_bytes(const uint8_t *p, size_t n, int v)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != (uint8_t)v)
			return 0;
	return 1;
}

/*
 * Data mode: each write's record carries its payload, in order, wrapping
 * the data area by the rule; a memory cap too small for a write drops the
 * disk to metadata mode (the record says so: no FERRY_RECF_DATA), and it
 * returns to data mode once the consumer releases the data area.
 */
static int t_data(const char *diskp)
{
	struct ferry_cbt_record recs[64];
	struct ferry_cbt_attach a;
	struct ferry_cbt_status st;
	uint64_t cur, cap;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret, i, round;
	size_t n;

	disk_open(&d, diskp);
	save_range(&d, 8 * MiB, 1 * MiB);
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.major = d.major;
	a.minor = d.minor;
	a.capacity = 64;
	a.data_bytes = 3 * MiB;
	CHECK(ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) == -1 && errno == EINVAL, "a data area not a power of two is refused");
	a.data_bytes = 1 * MiB;
	ret = ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) ? -errno : 0;
	if (ret) {
		errno = -ret;
		die("attach %s with a data area", diskp);
	}
	ring_map(ctl, &a, &r);
	CHECK(r.h->data_capacity == 1 * MiB && r.h->data_offset == 4096 + 4096 && a.mmap_size == 8192 + 1 * MiB,
	      "data area %llu at %llu, map %llu", (unsigned long long)r.h->data_capacity,
	      (unsigned long long)r.h->data_offset, (unsigned long long)a.mmap_size);
	CHECK(mode_of(&r) == FERRY_CBT_MODE_DATA, "data mode, got %u", mode_of(&r));
	/* Five rounds of 300 KiB writes: the data area (1 MiB) wraps. */
	cur = r.h->data_consumer;
	for (round = 0; round < 5; round++) {
		for (i = 0; i < 3; i++)
			dwrite(&d, 8 * MiB + i * 320 * KiB, 300 * KiB, 0x10 + round * 3 + i);
		n = ring_drain(&r, recs, 64);
		/* The kernel may split a write into several bios; each carries
		 * its part. Check the bytes, in order. */
		uint64_t want_off = 8 * MiB;
		int w = 0;
		size_t got = 0;
		for (size_t k = 0; k < n; k++) {
			CHECK(recs[k].kind == FERRY_REC_WRITE && (recs[k].flags & FERRY_RECF_DATA), "round %d record %zu: data",
			      round, k);
			const uint8_t *p = data_next(&r, &cur, recs[k].length);
			CHECK(recs[k].offset == want_off + got, "round %d record %zu at %llu", round, k,
			      (unsigned long long)recs[k].offset);
			CHECK(all_bytes(p, recs[k].length, 0x10 + round * 3 + w), "round %d record %zu: payload", round, k);
			got += recs[k].length;
			if (got == 300 * KiB) {
				w++;
				got = 0;
				want_off = 8 * MiB + w * 320 * KiB;
			}
		}
		CHECK(w == 3 && got == 0, "round %d: %d writes' payloads", round, w);
		__atomic_store_n(&r.h->data_consumer, cur, __ATOMIC_RELEASE);
	}
	CHECK(cur > 1 * MiB, "the data area wrapped (%llu bytes)", (unsigned long long)cur);
	/* A 16 KiB cap: a 12 KiB write fits, a 16 KiB one after it does not. */
	CHECK(do_set_cap(ctl, a.handle, 16 * KiB, &cap) == 0 && cap == 16 * KiB, "set cap");
	dwrite(&d, 8 * MiB, 12 * KiB, 0x41);
	dwrite(&d, 8 * MiB + 64 * KiB, 16 * KiB, 0x42);
	CHECK(mode_of(&r) == FERRY_CBT_MODE_METADATA, "over the cap: metadata mode, got %u", mode_of(&r));
	/* Still metadata while the data area holds more than half the cap. */
	dwrite(&d, 8 * MiB + 128 * KiB, 4 * KiB, 0x43);
	n = ring_drain(&r, recs, 64);
	CHECK(n == 3, "%zu records", n);
	if (n == 3) {
		CHECK(recs[0].flags & FERRY_RECF_DATA, "the write under the cap has its payload");
		CHECK(all_bytes(data_next(&r, &cur, recs[0].length), 12 * KiB, 0x41), "its payload");
		CHECK(!(recs[1].flags & FERRY_RECF_DATA) && recs[1].length == 16 * KiB, "the write over the cap has none");
		CHECK(!(recs[2].flags & FERRY_RECF_DATA), "nor the next, the data area being over half full");
	}
	__atomic_store_n(&r.h->data_consumer, cur, __ATOMIC_RELEASE);
	dwrite(&d, 8 * MiB + 192 * KiB, 4 * KiB, 0x44);
	n = ring_drain(&r, recs, 64);
	CHECK(n == 1 && (recs[0].flags & FERRY_RECF_DATA) && mode_of(&r) == FERRY_CBT_MODE_DATA,
	      "released: back to data mode (%zu records, mode %u)", n, mode_of(&r));
	if (n == 1)
		CHECK(all_bytes(data_next(&r, &cur, 4 * KiB), 4 * KiB, 0x44), "payload after the return");
	CHECK(do_status(ctl, a.handle, &st) == 0, "status");
	CHECK(st.mode_changes == 2 && st.data_cap == 16 * KiB && st.data_capacity == 1 * MiB && st.inflight == 0 &&
	      st.lost == 0 && st.untracked == 0, "status: mode changes %llu cap %llu in flight %llu lost %llu",
	      (unsigned long long)st.mode_changes, (unsigned long long)st.data_cap, (unsigned long long)st.inflight,
	      (unsigned long long)st.lost);
	/* Cap 0: no payloads at all; above the area: clamped. */
	CHECK(do_set_cap(ctl, a.handle, 0, &cap) == 0 && cap == 0 && mode_of(&r) == FERRY_CBT_MODE_METADATA, "cap 0");
	CHECK(do_set_cap(ctl, a.handle, 1ULL << 40, &cap) == 0 && cap == 1 * MiB, "cap clamped to %llu",
	      (unsigned long long)cap);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

static int do_tag(int ctl, uint32_t handle, uint32_t flags, struct ferry_cbt_tag *t)
{
	memset(t, 0, sizeof(*t));
	t->size = sizeof(*t);
	t->handle = handle;
	t->flags = flags;
	return ioctl(ctl, FERRY_CBT_IOC_TAG, t) ? -errno : 0;
}

/*
 * TAG: the marker sits exactly between the changes queued before and after
 * it, takes a sequence number, works with FREEZE on a disk with no
 * filesystem (nothing to freeze: a no-op freeze), is refused with EAGAIN on
 * a full ring without flagging a loss, and refuses bad flags and handles.
 */
static int t_tag(const char *diskp)
{
	struct ferry_cbt_record recs[16];
	struct ferry_cbt_attach a;
	struct ferry_cbt_tag t1, t2, t;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret;
	size_t n;

	disk_open(&d, diskp);
	save_range(&d, 20 * MiB, 64 * KiB);
	ret = do_attach(ctl, &d, 8, 0, &a);
	if (ret) {
		errno = -ret;
		die("attach %s", diskp);
	}
	ring_map(ctl, &a, &r);
	dwrite(&d, 20 * MiB, 4096, 0xa1);
	CHECK(do_tag(ctl, a.handle, 0, &t1) == 0, "tag: %s", strerror(errno));
	dwrite(&d, 20 * MiB + 8192, 4096, 0xa2);
	CHECK(do_tag(ctl, a.handle, FERRY_CBT_TAG_F_FREEZE, &t2) == 0, "tag with freeze: %s", strerror(errno));
	dwrite(&d, 20 * MiB + 16384, 4096, 0xa3);
	n = ring_drain(&r, recs, 16);
	CHECK(n == 5, "%zu records, want write tag write tag write", n);
	if (n == 5) {
		CHECK(recs[0].kind == FERRY_REC_WRITE && recs[0].offset == 20 * MiB, "record 0");
		CHECK(recs[1].kind == FERRY_REC_TAG && recs[1].length == 0 && recs[1].seq == t1.seq, "record 1: tag seq %llu",
		      (unsigned long long)t1.seq);
		CHECK(recs[2].kind == FERRY_REC_WRITE && recs[2].offset == 20 * MiB + 8192, "record 2");
		CHECK(recs[3].kind == FERRY_REC_TAG && recs[3].seq == t2.seq, "record 3: tag seq %llu", (unsigned long long)t2.seq);
		CHECK(recs[4].kind == FERRY_REC_WRITE && recs[4].offset == 20 * MiB + 16384, "record 4");
		for (size_t i = 1; i < n; i++)
			CHECK(recs[i].seq == recs[i - 1].seq + 1, "seq runs on at record %zu", i);
	}
	CHECK(t1.frozen_ns == 0, "no freeze, no frozen time");
	CHECK(t2.frozen_ns > 0, "frozen time reported");
	/* A full ring: EAGAIN, no loss flagged, no sequence number taken. */
	for (int i = 0; i < 8; i++)
		dwrite(&d, 20 * MiB + i * 8192, 4096, 0xb0 + i);
	ret = do_tag(ctl, a.handle, 0, &t);
	CHECK(ret == -EAGAIN, "tag on a full ring: %d, want EAGAIN", ret);
	CHECK(!(__atomic_load_n(&r.h->flags, __ATOMIC_ACQUIRE) & FERRY_RINGF_OVERFLOW), "a refused tag is not a loss");
	n = ring_drain(&r, recs, 16);
	CHECK(do_tag(ctl, a.handle, 0, &t) == 0 && t.seq == recs[n - 1].seq + 1, "after draining, the tag follows seq %llu",
	      n ? (unsigned long long)recs[n - 1].seq : 0ULL);
	CHECK(do_tag(ctl, a.handle, 0x8, &t) == -EINVAL, "unknown flag refused");
	CHECK(do_tag(ctl, a.handle ^ 0x40, 0, &t) == -ENOENT, "unknown handle refused");
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	CHECK(do_tag(ctl, a.handle, 0, &t) == -ENOENT, "detached handle refused");
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

/*
 * Sequence numbers across attachments: a version-0 caller (the 48-byte
 * attach struct) is still accepted and its numbering starts at 0, whatever
 * lies past its declared size; a caller passing first_seq continues from
 * there (how an agent keeps them monotonic across a reload); a struct
 * shorter than version 0 is refused.
 */
static int t_seq(const char *diskp)
{
	struct ferry_cbt_record recs[8];
	struct ferry_cbt_attach a;
	struct ferry_cbt_status st;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret;
	size_t n;

	disk_open(&d, diskp);
	save_range(&d, 24 * MiB, 64 * KiB);
	memset(&a, 0, sizeof(a));
	a.size = FERRY_CBT_ATTACH_SIZE_VER0 - 1;
	a.major = d.major;
	a.minor = d.minor;
	a.capacity = 16;
	CHECK(ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) == -1 && errno == EINVAL, "a struct shorter than version 0 is refused");
	a.size = FERRY_CBT_ATTACH_SIZE_VER0;
	a.first_seq = 777; /* past the declared size: not read */
	ret = ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) ? -errno : 0;
	CHECK(ret == 0, "version-0 attach: %d", ret);
	if (ret)
		return 1;
	ring_map(ctl, &a, &r);
	dwrite(&d, 24 * MiB, 4096, 0xd1);
	n = ring_drain(&r, recs, 8);
	CHECK(n == 1 && recs[0].seq == 0, "version 0: %zu records, first seq %llu", n, n ? (unsigned long long)recs[0].seq : 0ULL);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.major = d.major;
	a.minor = d.minor;
	a.capacity = 16;
	a.first_seq = 1000;
	ret = ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) ? -errno : 0;
	CHECK(ret == 0, "attach with first_seq: %d", ret);
	if (ret)
		return 1;
	ring_map(ctl, &a, &r);
	dwrite(&d, 24 * MiB, 4096, 0xd2);
	dwrite(&d, 24 * MiB + 8192, 4096, 0xd3);
	n = ring_drain(&r, recs, 8);
	CHECK(n == 2 && recs[0].seq == 1000 && recs[1].seq == 1001, "first_seq 1000: %zu records, seq %llu", n,
	      n ? (unsigned long long)recs[0].seq : 0ULL);
	CHECK(do_status(ctl, a.handle, &st) == 0 && st.seq == 1002, "status seq %llu", (unsigned long long)st.seq);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

static int t_isolation(const char *p1, const char *p2)
{
	struct ferry_cbt_record recs[16];
	struct ferry_cbt_attach a1, a2;
	struct disk d1, d2;
	struct ring r1, r2;
	struct want w1, w2;
	int ctl = ctl_open();
	size_t n;

	disk_open(&d1, p1);
	disk_open(&d2, p2);
	save_range(&d1, 13 * MiB, 4096);
	CHECK(do_attach(ctl, &d1, 16, 0, &a1) == 0, "attach %s", p1);
	CHECK(do_attach(ctl, &d2, 16, 0, &a2) == 0, "attach %s", p2);
	CHECK(a1.handle != a2.handle, "distinct handles");
	ring_map(ctl, &a1, &r1);
	ring_map(ctl, &a2, &r2);
	dwrite(&d1, 13 * MiB, 4096, 0xd1);
	dwrite(&d2, 256 * KiB, 8192, 0xd2);
	w1 = (struct want){ 13 * MiB, 4096, FERRY_REC_WRITE, 0 };
	w2 = (struct want){ 256 * KiB, 8192, FERRY_REC_WRITE, 0 };
	n = ring_drain(&r1, recs, 16);
	check_records(recs, n, &w1, 1);
	n = ring_drain(&r2, recs, 16);
	check_records(recs, n, &w2, 1);
	/* Detaching one leaves the other tracking. */
	CHECK(do_detach(ctl, a1.handle) == 0, "detach 1");
	dwrite(&d1, 13 * MiB, 4096, 0xd3);
	dwrite(&d2, 512 * KiB, 4096, 0xd4);
	w2 = (struct want){ 512 * KiB, 4096, FERRY_REC_WRITE, 0 };
	CHECK(ring_producer(&r1) == 1, "detached ring moved");
	n = ring_drain(&r2, recs, 16);
	check_records(recs, n, &w2, 1);
	CHECK(do_detach(ctl, a2.handle) == 0, "detach 2");
	ring_unmap(&r1);
	ring_unmap(&r2);
	restore_ranges(&d1);
	disk_close(&d1);
	disk_close(&d2);
	close(ctl);
	return failures != 0;
}

static int t_persist(const char *diskp)
{
	struct ferry_cbt_record recs[16];
	struct ferry_cbt_attach a, a2;
	struct disk d;
	struct ring r;
	struct want w = { 14 * MiB, 4096, FERRY_REC_WRITE, 0 };
	int ctl = ctl_open();
	size_t n;

	disk_open(&d, diskp);
	save_range(&d, 14 * MiB, 4096);
	CHECK(do_attach(ctl, &d, 16, 0, &a) == 0, "attach");
	close(ctl);
	/* No descriptor open: tracking goes on. */
	dwrite(&d, 14 * MiB, 4096, 0xe1);
	ctl = ctl_open();
	CHECK(do_attach(ctl, &d, 16, FERRY_CBT_ATTACH_F_EXISTING_OK, &a2) == 0, "re-find");
	CHECK(a2.handle == a.handle && (a2.out_flags & FERRY_CBT_ATTACHED_EXISTING), "same handle");
	ring_map(ctl, &a2, &r);
	n = ring_drain(&r, recs, 16);
	check_records(recs, n, &w, 1);
	/* The mapping keeps the ring (and the module) after the fd is closed. */
	close(ctl);
	dwrite(&d, 14 * MiB, 4096, 0xe2);
	CHECK(ring_producer(&r) == 2, "producer %llu", (unsigned long long)ring_producer(&r));
	ctl = ctl_open();
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

#define STRESS_WRITERS 2
#define STRESS_N 300

static int t_stress(const char *diskp, const char *churnp)
{
	static struct ferry_cbt_record recs[4096];
	static unsigned char seen[STRESS_WRITERS][STRESS_N];
	struct ferry_cbt_attach a;
	struct ferry_cbt_status st;
	pid_t kids[STRESS_WRITERS + 2];
	int nkids = 0, i, status, ctl = ctl_open();
	struct disk d;
	struct ring r;
	size_t total = 0;
	time_t deadline;
	const uint64_t base = 8 * MiB, stride = 2 * MiB;

	disk_open(&d, diskp);
	save_range(&d, base, STRESS_WRITERS * stride);
	CHECK(do_attach(ctl, &d, 1024, 0, &a) == 0, "attach");
	ring_map(ctl, &a, &r);

	for (i = 0; i < STRESS_WRITERS; i++) {
		pid_t pid = fork();

		if (pid == 0) {
			for (int j = 0; j < STRESS_N; j++)
				dwrite(&d, base + i * stride + (uint64_t)j * 4096, 4096, j & 0xff);
			_exit(0);
		}
		kids[nkids++] = pid;
	}
	if (churnp) {
		/* Attach/detach another disk over and over while a writer hits it. */
		pid_t pid = fork();

		if (pid == 0) {
			struct disk c;
			struct ferry_cbt_attach ca;
			uint32_t last = 0;
			int bad = 0, cctl = ctl_open();

			disk_open(&c, churnp);
			for (int j = 0; j < 100; j++) {
				if (do_attach(cctl, &c, 8, 0, &ca)) {
					bad++;
					continue;
				}
				if (ca.handle == last)
					bad++;
				last = ca.handle;
				if (do_detach(cctl, ca.handle))
					bad++;
			}
			_exit(bad ? 1 : 0);
		}
		kids[nkids++] = pid;
		pid = fork();
		if (pid == 0) {
			struct disk c;

			disk_open(&c, churnp);
			for (int j = 0; j < 400; j++)
				dwrite(&c, 2 * MiB + (uint64_t)(j % 64) * 4096, 4096, j & 0xff);
			_exit(0);
		}
		kids[nkids++] = pid;
	}
	deadline = time(NULL) + 300;
	while (total < STRESS_WRITERS * STRESS_N && time(NULL) < deadline) {
		size_t n = ring_drain(&r, recs + total, 4096 - total);

		total += n;
		if (!n)
			usleep(1000);
	}
	for (i = 0; i < nkids; i++) {
		if (waitpid(kids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
			fail("child %d failed (status %#x)", i, status);
	}
	total += ring_drain(&r, recs + total, 4096 - total);
	CHECK(total == STRESS_WRITERS * STRESS_N, "%zu records, want %d", total, STRESS_WRITERS * STRESS_N);
	for (size_t k = 0; k < total; k++) {
		uint64_t off = recs[k].offset - base;
		unsigned int wi = off / stride, j = (off % stride) / 4096;

		if (k)
			CHECK(recs[k].seq == recs[k - 1].seq + 1, "seq gap at %zu", k);
		if (recs[k].kind != FERRY_REC_WRITE || recs[k].length != 4096 || recs[k].offset < base ||
		    wi >= STRESS_WRITERS || j >= STRESS_N || off % 4096) {
			fail("unexpected record");
			print_rec("record", &recs[k]);
			continue;
		}
		if (seen[wi][j]++)
			fail("writer %u block %u recorded twice", wi, j);
	}
	CHECK(do_status(ctl, a.handle, &st) == 0 && st.overflows == 0 && st.lost == 0, "no overflow");
	note("stress: %zu records; status records %llu seq %llu", total, (unsigned long long)st.records,
	     (unsigned long long)st.seq);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	restore_ranges(&d);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

/*
 * Benchmark helper: attach DISK with a ring of CAP records and DATA bytes of
 * data area for SECONDS; with DRAIN, release everything every 100 us (an
 * agent that keeps up, costing no I/O); without, nothing (the disk ends in
 * bitmap mode). Prints the mode and counters at the end.
 */
static int t_hold(const char *diskp, const char *capp, const char *datap, const char *secp, const char *drainp)
{
	struct ferry_cbt_attach a;
	struct ferry_cbt_status st;
	struct disk d;
	struct ring r;
	int ctl = ctl_open(), ret, drain = atoi(drainp);
	time_t end = time(NULL) + atoi(secp);

	disk_open(&d, diskp);
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.major = d.major;
	a.minor = d.minor;
	a.capacity = strtoull(capp, NULL, 0);
	a.data_bytes = strtoull(datap, NULL, 0);
	ret = ioctl(ctl, FERRY_CBT_IOC_ATTACH, &a) ? -errno : 0;
	if (ret) {
		errno = -ret;
		die("attach %s", diskp);
	}
	ring_map(ctl, &a, &r);
	while (time(NULL) < end) {
		if (drain) {
			__atomic_store_n(&r.h->consumer, __atomic_load_n(&r.h->producer, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
			__atomic_store_n(&r.h->data_consumer, __atomic_load_n(&r.h->data_producer, __ATOMIC_ACQUIRE),
					 __ATOMIC_RELEASE);
		}
		usleep(drain ? 100 : 100000);
	}
	CHECK(do_status(ctl, a.handle, &st) == 0, "status");
	note("hold: mode %u records %llu data records %llu bitmap changes %llu lost %llu", st.mode,
	     (unsigned long long)st.records, (unsigned long long)st.data_records, (unsigned long long)st.bitmap_changes,
	     (unsigned long long)st.lost);
	CHECK(do_detach(ctl, a.handle) == 0, "detach");
	ring_unmap(&r);
	disk_close(&d);
	close(ctl);
	return failures != 0;
}

/* Set the memory cap of DISK's existing attachment (made by the agent). */
static int t_setcap(const char *diskp, const char *bytes)
{
	struct ferry_cbt_attach a;
	struct disk d;
	uint64_t cap;
	int ctl = ctl_open(), ret;

	disk_open(&d, diskp);
	ret = do_attach(ctl, &d, 16, FERRY_CBT_ATTACH_F_EXISTING_OK, &a);
	if (ret || !(a.out_flags & FERRY_CBT_ATTACHED_EXISTING))
		die("%s is not attached", diskp);
	ret = do_set_cap(ctl, a.handle, strtoull(bytes, NULL, 0), &cap);
	if (ret) {
		errno = -ret;
		die("set cap");
	}
	note("memory cap of %s: %llu bytes", diskp, (unsigned long long)cap);
	disk_close(&d);
	close(ctl);
	return 0;
}

static int t_leave_attached(const char *diskp)
{
	struct ferry_cbt_attach a;
	struct disk d;
	int ctl = ctl_open();

	disk_open(&d, diskp);
	CHECK(do_attach(ctl, &d, 16, 0, &a) == 0, "attach");
	note("left %s attached as handle %u", diskp, a.handle);
	return failures != 0;
}

/* A file with an MBR holding one partition (2048 sectors in, 16 MiB long),
 * attached to a free loop device with partition scanning. */
static int t_mkloop(const char *file)
{
	unsigned char mbr[512] = { 0 };
	struct loop_info64 li;
	char dev[32];
	int ctlfd, ffd, lfd, n;
	uint32_t start = 2048, count = 32768;

	ffd = open(file, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (ffd < 0 || ftruncate(ffd, 32 * MiB))
		die("create %s", file);
	mbr[446 + 4] = 0x83;
	memcpy(&mbr[446 + 8], &start, 4);
	memcpy(&mbr[446 + 12], &count, 4);
	mbr[510] = 0x55;
	mbr[511] = 0xaa;
	if (pwrite(ffd, mbr, 512, 0) != 512)
		die("write MBR");
	ctlfd = open("/dev/loop-control", O_RDWR);
	if (ctlfd < 0)
		die("open /dev/loop-control");
	n = ioctl(ctlfd, LOOP_CTL_GET_FREE);
	if (n < 0)
		die("LOOP_CTL_GET_FREE");
	snprintf(dev, sizeof(dev), "/dev/loop%d", n);
	for (int i = 0; i < 50 && access(dev, F_OK); i++)
		usleep(100000);
	lfd = open(dev, O_RDWR);
	if (lfd < 0)
		die("open %s", dev);
	if (ioctl(lfd, LOOP_SET_FD, ffd))
		die("LOOP_SET_FD");
	memset(&li, 0, sizeof(li));
	li.lo_flags = LO_FLAGS_PARTSCAN;
	if (ioctl(lfd, LOOP_SET_STATUS64, &li))
		die("LOOP_SET_STATUS64");
	{
		char part[48];

		snprintf(part, sizeof(part), "%sp1", dev);
		for (int i = 0; i < 50 && access(part, F_OK); i++)
			usleep(100000);
		if (access(part, F_OK))
			die("%s did not appear", part);
	}
	printf("%s\n", dev);
	return 0;
}

static int t_rmloop(const char *dev)
{
	int fd = open(dev, O_RDWR);

	if (fd < 0 || ioctl(fd, LOOP_CLR_FD))
		die("LOOP_CLR_FD %s", dev);
	return 0;
}

int main(int argc, char **argv)
{
	const char *t = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(t, "abi") && argc >= 3)
		return t_abi(argv[2], argc > 3 ? argv[3] : NULL);
	if (!strcmp(t, "records") && argc == 3)
		return t_records(argv[2]);
	if (!strcmp(t, "partition") && argc == 4)
		return t_partition(argv[2], argv[3]);
	if (!strcmp(t, "bitmap") && argc == 3)
		return t_bitmap(argv[2]);
	if (!strcmp(t, "data") && argc == 3)
		return t_data(argv[2]);
	if (!strcmp(t, "seq") && argc == 3)
		return t_seq(argv[2]);
	if (!strcmp(t, "tag") && argc == 3)
		return t_tag(argv[2]);
	if (!strcmp(t, "isolation") && argc == 4)
		return t_isolation(argv[2], argv[3]);
	if (!strcmp(t, "persist") && argc == 3)
		return t_persist(argv[2]);
	if (!strcmp(t, "stress") && argc >= 3)
		return t_stress(argv[2], argc > 3 ? argv[3] : NULL);
	if (!strcmp(t, "hold") && argc == 7)
		return t_hold(argv[2], argv[3], argv[4], argv[5], argv[6]);
	if (!strcmp(t, "setcap") && argc == 4)
		return t_setcap(argv[2], argv[3]);
	if (!strcmp(t, "leave-attached") && argc == 3)
		return t_leave_attached(argv[2]);
	if (!strcmp(t, "mkloop") && argc == 3)
		return t_mkloop(argv[2]);
	if (!strcmp(t, "rmloop") && argc == 3)
		return t_rmloop(argv[2]);
	fprintf(stderr, "usage: see the comment at the top of kmod-probe.c\n");
	return 2;
}
