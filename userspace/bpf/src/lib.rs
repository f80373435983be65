//! ferry's CO-RE eBPF change tracker (cbt-module/bpf/ferry_cbt.bpf.c):
//! load it for one disk, pin it so tracking survives the agent, and move its
//! records into the agent's durable record ring.
//!
//! Pins, under `/sys/fs/bpf/ferry/NAME/`:
//!
//! | pin      | what |
//! |----------|------|
//! | `link`   | the attachment to `tp_btf/block_rq_complete`: tracking runs while it exists |
//! | `issue`  | the attachment to `tp_btf/block_rq_issue` (fills `inflight`) |
//! | `prog`   | the program (for its recursion-miss counter) |
//! | `inflight` | mmap-able slots, one per driver tag: protected writes issued and not yet seen completing |
//! | `events` | BPF ring buffer of `struct ferry_cbt_record` |
//! | `bitmap` | mmap-able u64 words, one bit per 2^chunk_shift bytes: the backstop |
//! | `stats`  | per-CPU counters: records, drops (to the bitmap), lost, bytes, recovered... |
//! | `owner`  | which state folder owns these pins: a frozen one-entry array holding the agent's owner record (ferry-agent `owner.rs`) |
//!
//! Record path and why nothing is lost: the program reserves a ring-buffer
//! record for each completed write; [`Tracker::collect`] copies records into
//! `STATE/ring` inside libbpf's consume callback, and libbpf advances the
//! consumer position only after the callback returns, so an agent crash
//! between the two repeats a record, never drops one. A reservation that
//! fails sets bitmap bits and then bumps `drops`; `collect` takes the bits
//! with an atomic exchange once it sees `drops` move, and queues them as
//! chunk records. `lost` (a range too wide for the bitmap loop), a recursion
//! miss, or a record the agent cannot parse each make the agent resync by
//! checksum.
//!
//! Backlog is not loss: when `STATE/ring` is full (the agent ships slower
//! than the disk is written), a record is not dropped but marked in the
//! same pinned bitmap, inside the consume callback, so before libbpf moves
//! past it; [`Tracker::collect`] then queues bitmap chunks as the ring
//! frees room. Taking bits is ordered the same way: a word's bits are
//! cleared only after the records covering them are in `STATE/ring`
//! (`fetch_and` of exactly those bits, so a bit the program sets meanwhile
//! stays). A change thus always sits in the BPF ring buffer, the pinned
//! bitmap or `STATE/ring` (which the agent releases only once the master
//! target made it durable), and an agent that dies anywhere in between
//! ships it again rather than losing it. While the bitmap holds anything,
//! the stream is not a prefix of the disk's writes: no point is cut until
//! it is empty and the ring is drained (docs/consistency.md).
//!
//! Completions the kernel does not run the program for (a rare kernel
//! behaviour, docs/decisions.md) are caught through `inflight`: a tag
//! issued again while its slot is taken had its completion missed, and the
//! program puts that range in the bitmap (`recovered`); slots that stay
//! taken are swept by [`Tracker::sweep_inflight`] and shipped. The agent's
//! cross-check with the device's statistics covers the rest.

use ferry_ring::generated::ferry_cbt_record;
use ferry_ring::{Record, RecordKind, Ring};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[allow(clippy::all, clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn, dead_code, missing_docs)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/ferry_cbt.skel.rs"));
}

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Most bitmap bits: 2^25 (a 4 MiB bitmap); the chunk grows with the disk.
const MAX_BITS_LOG2: u32 = 25;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {msg}")]
    Libbpf { what: String, msg: String },
    #[error("{0}")]
    Unsupported(String),
}

fn lib(what: &str) -> impl FnOnce(libbpf_rs::Error) -> BpfError + '_ {
    move |e| BpfError::Libbpf { what: what.to_string(), msg: e.to_string() }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BpfError {
    let what = what.into();
    move |source| BpfError::Io { what, source }
}

/// The device a protected path lives on, as the program filters it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Whole-disk major:minor (what requests carry).
    pub major: u32,
    pub minor: u32,
    /// For a partition: its first sector and length in sectors (else 0, 0).
    pub part_start: u64,
    pub part_sectors: u64,
}

fn read_sys(p: &Path) -> Result<String, BpfError> {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).map_err(io(p.display().to_string()))
}

/// Resolve a block device path to the disk the program must watch. Only
/// request-based (blk-mq) disks complete requests the program sees; others
/// (device-mapper, md, zram, an NVMe multipath head) are refused, so that
/// `auto` picks another tracker rather than watch a disk that never reports.
pub fn target_of(disk: &Path) -> Result<Target, BpfError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(disk).map_err(io(disk.display().to_string()))?;
    if !m.file_type().is_block_device() {
        return Err(BpfError::Unsupported(format!("{} is not a block device: the bpf tracker watches block devices", disk.display())));
    }
    let (maj, min) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if sys.join("partition").exists() {
        let start: u64 = read_sys(&sys.join("start"))?.parse().map_err(|_| BpfError::Unsupported("bad partition start in sysfs".into()))?;
        let size: u64 = read_sys(&sys.join("size"))?.parse().map_err(|_| BpfError::Unsupported("bad partition size in sysfs".into()))?;
        let parent = read_sys(&sys.join("../dev"))?;
        let (a, b) = parent.split_once(':').ok_or_else(|| BpfError::Unsupported(format!("bad parent device {parent:?}")))?;
        let p = |s: &str| s.parse::<u32>().map_err(|_| BpfError::Unsupported(format!("bad parent device {parent:?}")));
        require_mq(&sys.join(".."), disk)?;
        Ok(Target { major: p(a)?, minor: p(b)?, part_start: start, part_sectors: size })
    } else {
        require_mq(&sys, disk)?;
        Ok(Target { major: maj, minor: min, part_start: 0, part_sectors: 0 })
    }
}

/// Bytes the kernel has completed as writes, write-zeroes and discards on
/// the protected device (whole disk or partition), from its block-layer
/// statistics: the independent count the tracker's `bytes` is checked
/// against. `None` where the statistics cannot be read.
pub fn device_bytes_changed(disk: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(disk).ok()?;
    let s = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/stat", libc::major(m.rdev()), libc::minor(m.rdev()))).ok()?;
    let f: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // Fields: ... [6] write sectors ... [13] discard sectors (Documentation/block/stat.rst).
    Some((f.get(6)? + f.get(13).copied().unwrap_or(0)) * 512)
}

/// The sysfs folder of the whole disk a block device path is on (its
/// parent's, for a partition): where the queue's settings live.
fn whole_disk_sysfs(disk: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(disk).ok()?;
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(m.rdev()), libc::minor(m.rdev())));
    Some(if sys.join("partition").exists() { sys.join("..") } else { sys })
}

/// Whether the disk keeps the block-layer statistics that
/// [`device_bytes_changed`] reads (`queue/iostats`; true if unknown).
pub fn device_iostats_on(disk: &Path) -> bool {
    let Some(sys) = whole_disk_sysfs(disk) else { return true };
    std::fs::read_to_string(sys.join("queue/iostats")).map(|v| v.trim() != "0").unwrap_or(true)
}

fn require_mq(sys_disk: &Path, disk: &Path) -> Result<(), BpfError> {
    if sys_disk.join("mq").is_dir() {
        return Ok(());
    }
    Err(BpfError::Unsupported(format!(
        "{} is not a request-based (blk-mq) disk (device-mapper, md, zram...): the bpf tracker cannot see its writes; \
         protect the disks beneath it, or use --tracker scan",
        disk.display()
    )))
}

/// Most `inflight` slots (32 bytes each): 2^18, 8 MiB.
const MAX_SLOTS: u32 = 1 << 18;

/// The `inflight` geometry of a disk: driver tags per hardware queue and
/// slots in all, from blk-mq's sysfs (`mq/N/nr_tags`). Tags beyond it are
/// not remembered (counted as `unguarded`).
pub fn slot_geometry(disk: &Path) -> (u32, u32) {
    let Some(sys) = whole_disk_sysfs(disk) else { return (128, 128) };
    let (mut queues, mut stride) = (0u32, 0u32);
    if let Ok(rd) = std::fs::read_dir(sys.join("mq")) {
        for e in rd.flatten() {
            queues += 1;
            let n = std::fs::read_to_string(e.path().join("nr_tags")).ok().and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(0);
            stride = stride.max(n);
        }
    }
    let stride = if stride == 0 { 128 } else { stride.min(MAX_SLOTS) };
    (stride, stride.saturating_mul(queues.max(1)).min(MAX_SLOTS))
}

/// Whether a disk can merge discards that are not contiguous into one
/// request (`queue/max_discard_segments` above 1: NVMe, some virtio-blk).
pub fn discard_multi(disk: &Path) -> bool {
    let Some(sys) = whole_disk_sysfs(disk) else { return true };
    // A test setting: check every discard request (docs/testing.md).
    if ferry_common::testing::get().bpf_discard_multi {
        return true;
    }
    // Unknown: assume it can (the program then checks each request).
    std::fs::read_to_string(sys.join("queue/max_discard_segments")).ok().and_then(|v| v.trim().parse::<u32>().ok()).is_none_or(|n| n > 1)
}

/// Bitmap granularity for a disk: at least 4 KiB, at most 2^25 bits.
pub fn chunk_shift_for(size: u64) -> u32 {
    let bits_needed = 64 - size.saturating_sub(1).leading_zeros(); // log2 ceil
    bits_needed.saturating_sub(MAX_BITS_LOG2).max(12)
}

/// Whether this kernel can run the tracker at all (BTF present).
pub fn kernel_has_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// Mount bpffs at /sys/fs/bpf if it is not there.
pub fn ensure_bpffs() -> Result<(), BpfError> {
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    let path = std::ffi::CString::new(BPFFS).expect("no NUL");
    // SAFETY: path is a valid C string and st points at writable memory of
    // the right type for statfs to fill.
    let rc = unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) };
    // f_type is i64 on x86_64 and narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    // SAFETY: st was zero-initialised (all-zero is a valid statfs) and
    // statfs only writes whole fields into it.
    let f_type = i64::from(unsafe { st.assume_init() }.f_type);
    if rc == 0 && f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(io(BPFFS))?;
    let fs = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: all pointers are valid C strings; data may be null.
    let rc = unsafe { libc::mount(fs.as_ptr(), path.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io(format!("mounting bpffs on {BPFFS}"))(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The pin folder of a protected disk. bpffs refuses names with '.'
/// (reserved by the kernel), which disk names may contain, so '_' and '.'
/// are escaped as "_u" and "_d" (an injective mapping).
pub fn pin_dir(name: &str) -> PathBuf {
    let mut esc = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '_' => esc.push_str("_u"),
            '.' => esc.push_str("_d"),
            c => esc.push(c),
        }
    }
    Path::new(BPFFS).join("ferry").join(esc)
}

/// Remove every pin of a disk: detaches the program once nothing else holds
/// it. Returns whether anything was pinned.
pub fn unpin(name: &str) -> Result<bool, BpfError> {
    let dir = pin_dir(name);
    if !dir.exists() {
        return Ok(false);
    }
    // The link first (tracking stops), the owner record last (a partial
    // unpin still says whose the rest is).
    for p in ["link", "issue", "prog", "issue_prog", "events", "bitmap", "stats", "inflight", "config", "owner"] {
        match std::fs::remove_file(dir.join(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(dir.join(p).display().to_string())(e)),
        }
    }
    std::fs::remove_dir(&dir).map_err(io(dir.display().to_string()))?;
    Ok(true)
}

/// The owner record pinned beside a disk's tracker (`owner`), if any
/// (none: no tracker, or one pinned by a ferry without owner records).
pub fn read_owner(name: &str) -> Result<Option<Vec<u8>>, BpfError> {
    let p = pin_dir(name).join("owner");
    if !p.exists() {
        return Ok(None);
    }
    let m = MapHandle::from_pinned_path(&p).map_err(lib("owner record"))?;
    m.lookup(&0u32.to_ne_bytes(), MapFlags::ANY).map_err(lib("owner record"))
}

/// Pin `record` as the owner record of disk `name` (replacing any): a
/// one-entry array map, frozen (read-only from user space) once written.
pub fn pin_owner(name: &str, record: &[u8]) -> Result<(), BpfError> {
    let dir = pin_dir(name);
    std::fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
    let p = dir.join("owner");
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(p.display().to_string())(e)),
    }
    use libbpf_rs::libbpf_sys::bpf_map_create_opts;
    let opts = bpf_map_create_opts { sz: std::mem::size_of::<bpf_map_create_opts>() as _, ..Default::default() };
    let mut m = MapHandle::create(libbpf_rs::MapType::Array, Some("ferry_owner"), 4, record.len() as u32, 1, &opts)
        .map_err(lib("creating the owner record"))?;
    m.update(&0u32.to_ne_bytes(), record, MapFlags::ANY).map_err(lib("writing the owner record"))?;
    m.freeze().map_err(lib("freezing the owner record"))?;
    m.pin(&p).map_err(lib("pinning the owner record"))
}

/// The bitmap as the ring-buffer callback sees it (a raw view: the mapping
/// is owned by the [`Tracker`], which drops the callback first).
#[derive(Clone, Copy)]
struct BitmapRef {
    base: usize,
    words: usize,
    shift: u32,
}

impl BitmapRef {
    /// Set the bits of every chunk `[off, off+len)` touches.
    fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (off >> self.shift, (off + len - 1) >> self.shift);
        for chunk in first..=last {
            let w = (chunk / 64) as usize;
            if w >= self.words {
                break;
            }
            // SAFETY: w < words; the mapping (owned by the Tracker, dropped
            // after the ring buffer that calls this) holds `words` aligned
            // u64s, updated atomically by the kernel and by us.
            unsafe { AtomicU64::from_ptr((self.base as *mut u64).add(w)) }.fetch_or(1 << (chunk % 64), Ordering::AcqRel);
        }
    }
}

/// Counters the program keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    pub drops: u64,
    pub lost: u64,
    pub bytes: u64,
    /// Completions the program did not see, caught when their request was
    /// issued again (their ranges went to the bitmap).
    pub recovered: u64,
    pub recovered_bytes: u64,
    /// Completions skipped on purpose (FERRY_BPF_TEST_SKIP_EVERY).
    pub injected: u64,
    /// Writes issued on a tag outside the `inflight` slots (not guarded: a
    /// missed completion of one is caught only by the agent's cross-check).
    pub unguarded: u64,
}

/// What one [`Tracker::collect`] moved.
#[derive(Clone, Copy, Debug, Default)]
pub struct Collected {
    pub records: u64,
    pub bitmap_extents: u64,
    /// Records the agent could not parse (each means: resync).
    pub invalid: u64,
    /// Records that found `STATE/ring` full and went to the bitmap.
    pub spilled: u64,
}

struct Pins {
    events: MapHandle,
    bitmap: MapHandle,
    stats: MapHandle,
    inflight: MapHandle,
    config: MapHandle,
    prog_id: u32,
    issue_prog_id: u32,
}

/// Bytes of one `inflight` slot (struct ferry_inflight: gen, rq, start,
/// end).
const SLOT_BYTES: usize = 32;

/// A protected write issued and not (yet) seen completing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    pub offset: u64,
    pub len: u64,
    /// Its slot and the slot's sequence count: together they name this
    /// entry (a slot's count moves whenever the program rewrites it).
    pub slot: usize,
    pub gen: u64,
}

impl Inflight {
    /// Its range, up to `size`, as write records of at most 1 MiB.
    pub fn records(&self, size: u64) -> impl Iterator<Item = Record> {
        let end = self.offset.saturating_add(self.len).min(size);
        (self.offset..end).step_by(1 << 20).map(move |off| Record {
            seq: 0,
            offset: off,
            length: (end - off).min(1 << 20) as u32,
            kind: RecordKind::Write,
            flush: false,
            data: false,
            group: false,
            time_ns: 0,
        })
    }
}

/// How long an in-flight entry may stay unchanged before it is shipped
/// without waiting for a cut: its completion was almost surely missed.
const STALE: std::time::Duration = std::time::Duration::from_millis(500);

/// What a pinned program watches, read back from its read-only data.
fn pinned_config(config: &MapHandle) -> Option<(Target, u32, u64)> {
    let v = config.lookup(&0u32.to_ne_bytes(), MapFlags::ANY).ok()??;
    let u32_at = |o: usize| v.get(o..o + 4).map(|b| u32::from_ne_bytes(b.try_into().expect("4")));
    let u64_at = |o: usize| v.get(o..o + 8).map(|b| u64::from_ne_bytes(b.try_into().expect("8")));
    // Layout of `types::rodata` in the skeleton (checked in a test below).
    let t = Target { major: u32_at(0)?, minor: u32_at(4)?, part_start: u64_at(8)?, part_sectors: u64_at(16)? };
    Some((t, u32_at(24)?, u64_at(32)?))
}

/// An attached (pinned) tracker for one disk.
pub struct Tracker {
    /// While Some, records are kept here instead of the sink ring (whose
    /// file may sit on a filesystem being frozen: see [`Tracker::hold`]).
    held: Arc<std::sync::Mutex<Option<Vec<Record>>>>,
    pins: Pins,
    /// Declared before `bitmap`: it is dropped first (its callback marks
    /// the bitmap).
    rb: libbpf_rs::RingBuffer<'static>,
    counts: Arc<std::sync::Mutex<Collected>>,
    sink: Arc<Ring>,
    bitmap: memmap2::MmapMut,
    /// The `inflight` slots (read only here).
    slots: memmap2::MmapMut,
    nslots: usize,
    words: usize,
    chunk_shift: u32,
    size: u64,
    drops_seen: u64,
    /// Set when something was put in the bitmap by this process (a record
    /// that found the ring full) or a take stopped at a full ring: the
    /// next collect takes the bitmap whatever the program's counters say.
    bitmap_pending: Arc<std::sync::atomic::AtomicBool>,
    /// Catch-up ([`Tracker::set_spill`]): every record goes to the bitmap.
    spill: Arc<std::sync::atomic::AtomicBool>,
    /// The word the next bounded take starts from (takes go round the
    /// bitmap, so a region written again and again cannot starve the rest).
    take_from: usize,
    /// Bounded takes: words looked at in the current round of the bitmap,
    /// and when (monotonic) the current and the previous round began. A
    /// bit still set was set after the previous round began (that round
    /// would have taken it), which bounds the age of the oldest change the
    /// bitmap holds.
    round: (usize, std::time::Instant, Option<std::time::Instant>),
    /// In-flight entries (slot, sequence count) first seen when, and
    /// whether already shipped.
    seen: std::collections::HashMap<(usize, u64), (std::time::Instant, bool)>,
}

fn open_pins(dir: &Path) -> Result<Pins, BpfError> {
    let m = |n: &str| MapHandle::from_pinned_path(dir.join(n)).map_err(lib(n));
    let prog = libbpf_rs::ProgramHandle::from_pinned_path(dir.join("prog")).map_err(lib("prog"))?;
    let issue_prog = libbpf_rs::ProgramHandle::from_pinned_path(dir.join("issue_prog")).map_err(lib("issue_prog"))?;
    if !dir.join("issue").exists() {
        return Err(BpfError::Unsupported("the pinned tracker has no issue hook (made by an older ferry)".into()));
    }
    Ok(Pins {
        events: m("events")?,
        bitmap: m("bitmap")?,
        stats: m("stats")?,
        inflight: m("inflight")?,
        config: m("config")?,
        prog_id: prog.id(),
        issue_prog_id: issue_prog.id(),
    })
}

impl Tracker {
    /// Attach the tracker for disk `name` at `disk_path` (`size` bytes),
    /// or re-open the pinned one. Records go to `sink` (the agent's
    /// `STATE/ring`, opened again here: this tracker is its only producer).
    /// `owner` is the owner record to pin beside the others (before them, on
    /// a fresh attach); the caller has checked that these pins are its own
    /// to take.
    /// Returns the tracker and whether it was attached now (a fresh attach
    /// means nothing tracked the disk before this moment).
    pub fn attach(
        name: &str,
        disk_path: &Path,
        size: u64,
        ring_bytes: u32,
        sink: &Path,
        owner: &[u8],
    ) -> Result<(Tracker, bool), BpfError> {
        ensure_bpffs()?;
        let dir = pin_dir(name);
        let target = target_of(disk_path)?;
        let shift = chunk_shift_for(size);
        let words = (size.div_ceil(1u64 << shift)).div_ceil(64).max(1) as usize;
        let mut fresh = !dir.join("link").exists();
        if !fresh {
            // The pins may watch another device (a loop device set up
            // again, a disk renumbered): then start over, as a fresh attach.
            let same = open_pins(&dir).ok().and_then(|p| pinned_config(&p.config)) == Some((target, shift, words as u64));
            if !same {
                log::warn!("the pinned tracker of {name} watches another device or size; attaching afresh");
                fresh = true;
            }
        }
        if fresh {
            // A partial pin folder (an interrupted attach) is cleared first.
            unpin(name)?;
            std::fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
            if let Err(e) = pin_owner(name, owner) {
                let _ = unpin(name);
                return Err(e);
            }
            let r = load_and_pin(&dir, target, shift, words as u64, ring_bytes, slot_geometry(disk_path), discard_multi(disk_path));
            if let Err(e) = r {
                let _ = unpin(name);
                return Err(e);
            }
        }
        if read_owner(name)?.as_deref() != Some(owner) {
            pin_owner(name, owner)?;
        }
        let pins = open_pins(&dir)?;
        let bitmap_len = pins.bitmap.info().map_err(lib("bitmap info"))?.info.max_entries as usize;
        if bitmap_len != words {
            return Err(BpfError::Unsupported(format!(
                "the pinned tracker of {name} was set up for another disk size; run `ferry unprotect` first"
            )));
        }
        let map_len = (words * 8).div_ceil(4096) * 4096;
        // SAFETY: the bitmap map was created with BPF_F_MMAPABLE and holds
        // `words` u64 values; we map exactly its (page-rounded) size. All
        // access goes through atomics (the program updates it concurrently).
        let bitmap = unsafe { memmap2::MmapOptions::new().len(map_len).map_mut(pins.bitmap.as_fd().as_raw_fd()) }
            .map_err(io("mapping the tracker bitmap"))?;
        let nslots = pins.inflight.info().map_err(lib("inflight info"))?.info.max_entries as usize;
        let slots_len = (nslots * SLOT_BYTES).div_ceil(4096) * 4096;
        // SAFETY: `inflight` was created with BPF_F_MMAPABLE and holds
        // `nslots` values of SLOT_BYTES; we map exactly its page-rounded
        // size and only read it, through atomics (the program writes it).
        let slots = unsafe { memmap2::MmapOptions::new().len(slots_len).map_mut(pins.inflight.as_fd().as_raw_fd()) }
            .map_err(io("mapping the tracker's in-flight slots"))?;
        let sink = Arc::new(Ring::open(sink).map_err(|e| BpfError::Unsupported(e.to_string()))?);
        let counts = Arc::new(std::sync::Mutex::new(Collected::default()));
        let mut b = libbpf_rs::RingBufferBuilder::new();
        let held: Arc<std::sync::Mutex<Option<Vec<Record>>>> = Arc::new(std::sync::Mutex::new(None));
        let (s2, c2, h2) = (Arc::clone(&sink), Arc::clone(&counts), Arc::clone(&held));
        // Take the bitmap at the first collect whatever the counter says: a
        // previous agent may have left marks there.
        let bitmap_pending = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let p2 = Arc::clone(&bitmap_pending);
        let spill = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sp2 = Arc::clone(&spill);
        let marks = BitmapRef { base: bitmap.as_ptr() as usize, words, shift };
        b.add(&pins.events, move |data: &[u8]| {
            let mut c = c2.lock().expect("poisoned");
            match parse(data) {
                Some(r) => {
                    match h2.lock().expect("poisoned").as_mut() {
                        Some(v) => {
                            // Held records live in this process only: mark
                            // them in the pinned bitmap too, which outlives
                            // it (taken at the next start, or after the cut).
                            marks.mark(r.offset, u64::from(r.length));
                            v.push(r);
                        }
                        // A full ring is backlog: the change goes to the
                        // pinned bitmap before libbpf moves past it.
                        None => {
                            if sp2.load(Ordering::Acquire) || !s2.try_push(r) {
                                marks.mark(r.offset, u64::from(r.length));
                                p2.store(true, Ordering::Release);
                                c.spilled += 1;
                            }
                        }
                    }
                    c.records += 1;
                }
                None => c.invalid += 1,
            }
            0
        })
        .map_err(lib("ring buffer"))?;
        let rb = b.build().map_err(lib("ring buffer"))?;
        let drops_seen = u64::MAX;
        let t = Tracker {
            held,
            pins,
            rb,
            counts,
            sink,
            bitmap,
            slots,
            nslots,
            words,
            chunk_shift: shift,
            size,
            drops_seen,
            bitmap_pending,
            spill,
            take_from: 0,
            round: (0, std::time::Instant::now(), None),
            seen: Default::default(),
        };
        Ok((t, fresh))
    }

    /// From now on keep collected records in memory instead of writing them
    /// to the sink ring: during a filesystem freeze the ring's file may be
    /// on the frozen filesystem, and a write to its mapping would block
    /// until a thaw only this process can do. The caller ships what
    /// [`Tracker::unhold`] returns, or hands it back to the ring.
    pub fn hold(&self) {
        *self.held.lock().expect("poisoned") = Some(Vec::new());
    }

    /// Records collected since the last call, while holding.
    pub fn take_held(&self) -> Vec<Record> {
        self.held.lock().expect("poisoned").as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Stop holding; returns what was held and not yet taken.
    pub fn unhold(&self) -> Vec<Record> {
        self.held.lock().expect("poisoned").take().unwrap_or_default()
    }

    /// Bitmap granularity in bytes.
    pub fn chunk(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// The program's counters.
    pub fn stats(&self) -> Result<Stats, BpfError> {
        // Per-CPU counters: each field is the sum over CPUs.
        let cpus = self.pins.stats.lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY).map_err(lib("stats"))?.unwrap_or_default();
        let f = |i: usize| -> u64 {
            cpus.iter()
                .map(|v| v.get(i * 8..i * 8 + 8).map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8"))))
                .fold(0, u64::wrapping_add)
        };
        Ok(Stats {
            records: f(1),
            drops: f(2),
            lost: f(3),
            bytes: f(4),
            recovered: f(5),
            recovered_bytes: f(6),
            injected: f(7),
            unguarded: f(9),
        })
    }

    /// Times the kernel skipped the program because it was already running
    /// on that CPU (each is a change not recorded).
    /// `None` if the program is gone.
    pub fn recursion_misses(&self) -> Option<u64> {
        // Both programs: a skipped issue run is an unguarded write.
        let (mut n, mut found) = (0, 0);
        for p in libbpf_rs::query::ProgInfoIter::default() {
            if p.id == self.pins.prog_id || p.id == self.pins.issue_prog_id {
                n += p.recursion_misses;
                found += 1;
            }
        }
        (found == 2).then_some(n)
    }

    /// Move queued records, and bitmap bits if any record fell back to the
    /// bitmap, into the sink ring.
    pub fn collect(&mut self) -> Result<Collected, BpfError> {
        self.rb.consume().map_err(lib("draining the ring buffer"))?;
        let mut out = std::mem::take(&mut *self.counts.lock().expect("poisoned"));
        // Bits come from ring overflows and from recovered completions.
        let s = self.stats()?;
        let drops = s.drops.wrapping_add(s.recovered);
        if self.spill.load(Ordering::Acquire) {
            // Catch-up: the agent takes the bitmap at its own pace.
            self.drops_seen = drops;
        } else if drops != self.drops_seen || self.bitmap_pending.swap(false, Ordering::AcqRel) {
            self.drops_seen = drops;
            out.bitmap_extents = self.take_bitmap();
        }
        Ok(out)
    }

    /// Catch-up on or off. On: every record the program reports goes to the
    /// bitmap (which coalesces a change written again and again, and ships
    /// in disk order) instead of `STATE/ring`, and [`Tracker::collect`]
    /// leaves the bitmap to [`Tracker::take_bitmap_upto`]. Off: back to
    /// the ring, in completion order.
    pub fn set_spill(&self, on: bool) {
        self.spill.store(on, Ordering::Release);
        if !on {
            self.bitmap_pending.store(true, Ordering::Release);
        }
    }

    /// Mark `[off, off+len)` in the pinned bitmap (to be queued by a later
    /// take): how the agent folds records out of `STATE/ring` before it
    /// releases them unshipped.
    pub fn mark(&self, off: u64, len: u64) {
        let marks = BitmapRef { base: self.bitmap.as_ptr() as usize, words: self.words, shift: self.chunk_shift };
        marks.mark(off, len);
        self.bitmap_pending.store(true, Ordering::Release);
    }

    /// Queue `r` to the sink ring, or, if the ring is full, mark it in the
    /// bitmap (to be queued by a later collect). While holding, into the
    /// held list (and the bitmap, like every held record).
    pub fn requeue(&self, r: Record) {
        let marks = BitmapRef { base: self.bitmap.as_ptr() as usize, words: self.words, shift: self.chunk_shift };
        match self.held.lock().expect("poisoned").as_mut() {
            Some(v) => {
                marks.mark(r.offset, u64::from(r.length));
                v.push(r);
            }
            None => {
                if !self.sink.try_push(r) {
                    marks.mark(r.offset, u64::from(r.length));
                    self.bitmap_pending.store(true, Ordering::Release);
                }
            }
        }
    }

    /// How long ago, at most, the oldest change the bitmap holds was made,
    /// as far as the rounds of bounded takes tell (None before one round
    /// was completed).
    pub fn bitmap_age_bound(&self) -> Option<std::time::Duration> {
        self.round.2.map(|t| t.elapsed())
    }

    /// Bytes the bitmap marks as changed and not yet queued (chunks ×
    /// chunk size, clipped to the disk): the part of the backlog held in
    /// the kernel.
    pub fn bitmap_dirty_bytes(&self) -> u64 {
        let base = self.bitmap.as_ptr() as *mut u64;
        let mut bits = 0u64;
        for i in 0..self.words {
            // SAFETY: i < words and the mapping holds `words` aligned u64s,
            // updated atomically by the kernel and by us.
            bits += u64::from(unsafe { AtomicU64::from_ptr(base.add(i)) }.load(Ordering::Acquire).count_ones());
        }
        (bits << self.chunk_shift).min(self.size)
    }

    /// Protected writes issued and not seen completing: in flight now, or
    /// completed without the program running (see the module notes).
    pub fn inflight(&self) -> Vec<Inflight> {
        let base = self.slots.as_ptr() as *mut u64;
        let word = |i: usize| {
            // SAFETY: callers pass i < nslots * 4; the mapping holds nslots
            // slots of four aligned u64s, written by the program.
            unsafe { AtomicU64::from_ptr(base.add(i)) }.load(Ordering::Acquire)
        };
        let mut out = Vec::new();
        for s in 0..self.nslots {
            // Slot: gen, rq, start, end. A read counts only if gen was even
            // (no rewrite under way) and unchanged around it; a slot being
            // rewritten is in use, not left behind.
            let g = word(s * 4);
            if g & 1 == 1 || word(s * 4 + 1) == 0 {
                continue;
            }
            let (a, b) = (word(s * 4 + 2), word(s * 4 + 3));
            if word(s * 4) != g || b <= a {
                continue;
            }
            out.push(Inflight { offset: a, len: b - a, slot: s, gen: g });
        }
        out
    }

    /// Queue (to the sink, or the held list) the ranges of in-flight
    /// entries unchanged for half a second and not queued before. Returns
    /// the number queued. (Before a point is cut the agent ships every
    /// entry again, whatever this did.)
    pub fn sweep_inflight(&mut self) -> u64 {
        let now = std::time::Instant::now();
        let mut n = 0;
        let mut live = std::collections::HashSet::new();
        for e in self.inflight() {
            let id = (e.slot, e.gen);
            live.insert(id);
            let (first, shipped) = *self.seen.entry(id).or_insert((now, false));
            if shipped || now.duration_since(first) < STALE {
                continue;
            }
            for r in e.records(self.size) {
                self.requeue(r);
            }
            self.seen.insert(id, (first, true));
            n += 1;
        }
        self.seen.retain(|id, _| live.contains(id));
        n
    }

    /// Queue the chunks the bitmap marks (to the sink, or to the held list
    /// while holding), a word at a time: a word's bits are cleared only
    /// after the records covering them are queued, and only those bits (so
    /// one the program sets meanwhile stays). While holding, nothing is
    /// cleared: what was taken lives only in this process until the cut, so
    /// an agent that dies before the thaw leaves the bits to the next one.
    /// Stops at a full sink ring (the rest stays for a later collect).
    /// Returns the number of extents queued.
    pub fn take_bitmap(&mut self) -> u64 {
        self.take_bitmap_upto(u64::MAX).0
    }

    /// [`Tracker::take_bitmap`], queuing at most about `max` records (it
    /// stops after the word that reaches `max`), starting where the last
    /// bounded take stopped. Returns the records queued and whether the
    /// whole bitmap was gone through (every bit seen was queued): then it
    /// was empty but for bits set during the take.
    pub fn take_bitmap_upto(&mut self, max: u64) -> (u64, bool) {
        let base = self.bitmap.as_ptr() as *mut u64;
        let chunk = 1u64 << self.chunk_shift;
        let mut n = 0;
        let mut complete = true;
        let start = if max == u64::MAX { 0 } else { self.take_from % self.words };
        let mut held = self.held.lock().expect("poisoned");
        for i in (start..self.words).chain(0..start) {
            if n >= max {
                self.take_from = i;
                complete = false;
                break;
            }
            self.round.0 += 1;
            if self.round.0 >= self.words {
                self.round = (0, std::time::Instant::now(), Some(self.round.1));
            }
            // SAFETY: i < words and the mapping holds `words` aligned u64s;
            // the kernel updates them atomically, so we do too.
            let word = unsafe { AtomicU64::from_ptr(base.add(i)) };
            let w = word.load(Ordering::Acquire);
            if w == 0 {
                continue;
            }
            // Runs of set bits within this word (at most 64 chunks each).
            let mut queued = 0u64;
            let mut bit = 0u32;
            let mut full = false;
            while bit < 64 {
                if w & (1 << bit) == 0 {
                    bit += 1;
                    continue;
                }
                let first = bit;
                while bit < 64 && w & (1 << bit) != 0 {
                    bit += 1;
                }
                let mask = if bit - first == 64 { u64::MAX } else { ((1u64 << (bit - first)) - 1) << first };
                let a = ((i as u64) * 64 + u64::from(first)) * chunk;
                let end = (((i as u64) * 64 + u64::from(bit)) * chunk).min(self.size);
                if end <= a {
                    queued |= mask; // beyond the disk: nothing to ship
                    continue;
                }
                // At most 1 MiB per record (a chunk may be larger).
                let mut off = a;
                let mut all = true;
                while off < end {
                    let len = (end - off).min(1 << 20);
                    let r = Record {
                        seq: 0,
                        offset: off,
                        length: len as u32,
                        kind: RecordKind::Write,
                        flush: false,
                        data: false,
                        group: false,
                        time_ns: 0,
                    };
                    match held.as_mut() {
                        Some(v) => v.push(r),
                        None if self.sink.try_push(r) => {}
                        None => {
                            all = false;
                            break;
                        }
                    }
                    n += 1;
                    off += len;
                }
                if !all {
                    // Part of this run is queued: re-queuing it later is
                    // harmless, losing the rest is not; keep its bits.
                    full = true;
                    break;
                }
                queued |= mask;
            }
            if held.is_none() && queued != 0 {
                word.fetch_and(!queued, Ordering::AcqRel);
            }
            if full {
                self.bitmap_pending.store(true, Ordering::Release);
                self.take_from = i;
                complete = false;
                break;
            }
        }
        (n, complete)
    }
}

fn load_and_pin(
    dir: &Path,
    t: Target,
    shift: u32,
    words: u64,
    ring_bytes: u32,
    slots: (u32, u32),
    multi_discard: bool,
) -> Result<(), BpfError> {
    let mut obj = MaybeUninit::uninit();
    let mut open = skel::FerryCbtSkelBuilder::default().open(&mut obj).map_err(lib("opening the BPF object"))?;
    let ro = open.maps.rodata_data.as_deref_mut().ok_or_else(|| BpfError::Unsupported("BPF object has no rodata".into()))?;
    ro.target_major = t.major;
    ro.target_minor = t.minor;
    ro.part_start = t.part_start;
    ro.part_sectors = t.part_sectors;
    ro.chunk_shift = shift;
    ro.bitmap_words = words;
    // Fault injection for tests (docs/testing.md): skip every Nth completion.
    if let Some(n) = ferry_common::testing::get().bpf_skip_every {
        log::warn!("FERRY_BPF_TEST_SKIP_EVERY={n}: the tracker will ignore every {n}th completion (a test setting)");
        ro.test_skip_every = n;
    }
    let (stride, nslots) = slots;
    ro.slot_stride = stride;
    ro.slot_count = nslots;
    ro.discard_multi = u32::from(multi_discard);
    let ring_bytes = ring_bytes.clamp(4096, 1 << 30).next_power_of_two();
    open.maps.events.set_max_entries(ring_bytes).map_err(lib("events size"))?;
    open.maps.bitmap.set_max_entries(words as u32).map_err(lib("bitmap size"))?;
    open.maps.inflight.set_max_entries(nslots).map_err(lib("inflight size"))?;
    let mut skel = open.load().map_err(lib("loading the BPF program (a kernel with BTF and tp_btf is needed)"))?;
    // Issue first: a write issued before the completion hook is attached is
    // then either seen completing or left in `inflight`.
    let mut issue = skel.progs.ferry_rq_issue.attach().map_err(lib("attaching to block_rq_issue"))?;
    issue.pin(dir.join("issue")).map_err(lib("pinning the issue link"))?;
    let mut link = skel.progs.ferry_rq_complete.attach().map_err(lib("attaching to block_rq_complete"))?;
    skel.maps.events.pin(dir.join("events")).map_err(lib("pinning events"))?;
    skel.maps.bitmap.pin(dir.join("bitmap")).map_err(lib("pinning bitmap"))?;
    skel.maps.stats.pin(dir.join("stats")).map_err(lib("pinning stats"))?;
    skel.maps.inflight.pin(dir.join("inflight")).map_err(lib("pinning inflight"))?;
    skel.progs.ferry_rq_complete.pin(dir.join("prog")).map_err(lib("pinning prog"))?;
    skel.progs.ferry_rq_issue.pin(dir.join("issue_prog")).map_err(lib("pinning the issue prog"))?;
    skel.maps.rodata.pin(dir.join("config")).map_err(lib("pinning config"))?;
    // The link last: its pin is what says "tracking is on".
    link.pin(dir.join("link")).map_err(lib("pinning link"))?;
    Ok(())
}

/// Parse one ring-buffer sample into a validated record.
fn parse(data: &[u8]) -> Option<Record> {
    if data.len() < 32 {
        return None;
    }
    let u64_at = |o: usize| u64::from_ne_bytes(data[o..o + 8].try_into().expect("8"));
    let raw = ferry_cbt_record {
        seq: u64_at(0),
        offset: u64_at(8),
        length: u32::from_ne_bytes(data[16..20].try_into().expect("4")),
        kind: u16::from_ne_bytes(data[20..22].try_into().expect("2")),
        flags: u16::from_ne_bytes(data[22..24].try_into().expect("2")),
        time_ns: u64_at(24),
    };
    Record::try_from(raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rodata_layout_matches_pinned_config_parsing() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(skel::types::rodata, target_major), 0);
        assert_eq!(offset_of!(skel::types::rodata, target_minor), 4);
        assert_eq!(offset_of!(skel::types::rodata, part_start), 8);
        assert_eq!(offset_of!(skel::types::rodata, part_sectors), 16);
        assert_eq!(offset_of!(skel::types::rodata, chunk_shift), 24);
        assert_eq!(offset_of!(skel::types::rodata, bitmap_words), 32);
    }

    #[test]
    fn inflight_records_split_at_1_mib_and_stop_at_the_disk_end() {
        let e = Inflight { offset: 4096, len: (5 << 19) as u64, slot: 0, gen: 2 };
        let r: Vec<(u64, u32)> = e.records(u64::MAX).map(|r| (r.offset, r.length)).collect();
        assert_eq!(r, vec![(4096, 1 << 20), (4096 + (1 << 20), 1 << 20), (4096 + (2 << 20), 1 << 19)]);
        let r: Vec<(u64, u32)> = e.records(4096 + 8192).map(|r| (r.offset, r.length)).collect();
        assert_eq!(r, vec![(4096, 8192)]);
        assert_eq!(e.records(4096).count(), 0);
    }

    #[test]
    fn pin_names_avoid_dots_and_stay_distinct() {
        let a = pin_dir("db-1.disk0");
        assert!(!a.file_name().unwrap().to_string_lossy().contains('.'));
        assert_ne!(pin_dir("a.b"), pin_dir("a_b"));
        assert_ne!(pin_dir("a_d"), pin_dir("a."));
    }

    #[test]
    fn chunk_grows_with_the_disk() {
        assert_eq!(chunk_shift_for(1 << 20), 12);
        assert_eq!(chunk_shift_for(1 << 30), 12);
        assert_eq!(chunk_shift_for(1 << 37), 12);
        assert_eq!(chunk_shift_for(1 << 40), 15);
        assert_eq!(chunk_shift_for((1 << 40) + 1), 16);
    }

    #[test]
    fn parse_rejects_short_and_invalid_samples() {
        assert!(parse(&[0u8; 16]).is_none());
        let mut b = [0u8; 32];
        b[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        b[20..22].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(parse(&b).map(|r| r.length), Some(4096));
        b[20..22].copy_from_slice(&77u16.to_ne_bytes());
        assert!(parse(&b).is_none());
    }
}
