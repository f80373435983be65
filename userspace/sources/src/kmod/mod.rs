//! The kernel module tracker's control device, `/dev/ferry-cbt`
//! (cbt-module/kmod; the ioctls in cbt-module/include/uapi/ferry_cbt_ioctl.h).
//!
//! The module owns the tracking: it goes on with no agent running, and the
//! agent finds its disk's attachment again with `ATTACH_F_EXISTING_OK`. The
//! ring (records, and in data mode their payloads) is mapped with
//! [`Ring::map_device`].
//!
//! Moved here from the agent (issue 12): the module's user-space side is a
//! change source's, not the shipper's. Errors keep the agent's messages
//! (`From<KmodError> for KmodError` maps each kind to the same variant).
//! [`catchup`] is the persisted catch-up (`STATE/kmod.catchup`).

pub mod catchup;
mod source;

pub use source::{KmodAttach, KmodSource, KmodState, KmodStore};

/// Errors of the kernel module tracker.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The module refused or is missing.
    #[error("{0}")]
    Tracker(String),
    /// A request that cannot work (not a block device, a bad group).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Ring(#[from] ferry_ring::RingError),
}

impl KmodError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KmodError {
        let what = what.into();
        move |source| KmodError::Io { what, source }
    }
}
use ferry_ring::generated_ioctl as g;
use ferry_ring::generated_ioctl::{FERRY_CBT_MODE_BITMAP, FERRY_CBT_MODE_DATA, FERRY_CBT_MODE_METADATA};
use ferry_ring::{ioctl, Ring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The control device (FERRY_CBT_DEVICE in the uapi header).
pub const DEVICE: &str = "/dev/ferry-cbt";
const _: () = assert!(g::FERRY_CBT_DEVICE.len() == DEVICE.len() + 1);

/// One attached disk.
pub struct Kmod {
    ctl: File,
    handle: u32,
    pub ring: Ring,
    /// The attachment was made by this agent (not found already there):
    /// changes before it were not tracked.
    pub fresh: bool,
    pub bitmap_block: u64,
    /// New for every attachment, also across module reloads.
    pub attach_id: u64,
    /// Attached again at module load from a clean stop's state file.
    pub restored: bool,
    /// Attached again at module load from a state file that was not
    /// from a clean stop: changes may be missing.
    pub unclean: bool,
    /// With `restored`/`unclean`: the state file's next sequence number.
    pub restored_seq: u64,
}

/// What CATCHUP handed over.
pub struct Catchup {
    /// The FERRY_REC_CATCHUP record's sequence number.
    pub seq: u64,
    /// Dirty byte ranges of the disk (coalesced bitmap runs), clipped to `size`.
    pub ranges: Vec<(u64, u64)>,
    pub wait_ns: u64,
}

/// The module's status of one attachment (the fields ferry uses).
#[derive(Clone, Copy, Debug)]
pub struct Status {
    pub mode: u32,
    pub seq: u64,
    pub lost: u64,
    pub overflows: u64,
    pub data_records: u64,
    pub bitmap_changes: u64,
    pub mode_changes: u64,
    pub catchups: u64,
    pub data_capacity: u64,
    pub data_cap: u64,
    pub bitmap_bits: u64,
}

pub fn mode_name(mode: u32) -> &'static str {
    match mode {
        FERRY_CBT_MODE_DATA => "data",
        FERRY_CBT_MODE_METADATA => "metadata",
        FERRY_CBT_MODE_BITMAP => "bitmap",
        _ => "unknown",
    }
}

fn errno_msg(what: &str, e: std::io::Error) -> KmodError {
    let hint = match e.raw_os_error() {
        Some(libc::ENOENT) => " (the attachment is gone: the module was reloaded or the disk detached)",
        Some(libc::EPERM) => " (needs CAP_SYS_ADMIN)",
        Some(libc::EINVAL) => " (refused: a partition instead of its whole disk, or a size out of range)",
        _ => "",
    };
    KmodError::Tracker(format!("kmod tracker: {what}: {e}{hint}"))
}

/// Issue one of the module's size-first ioctls on `arg`.
fn ioc<T>(ctl: &File, req: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed struct of the type the
    // request encodes (its `size` field set by the caller); the module
    // reads and writes at most `size` bytes of it.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The whole disk's (major, minor) of a block device path.
pub fn dev_numbers(disk: &Path) -> Result<(u32, u32), KmodError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(disk).map_err(KmodError::io(format!("disk {}", disk.display())))?;
    if !m.file_type().is_block_device() {
        return Err(KmodError::Usage(format!("--tracker kmod: {} is not a block device", disk.display())));
    }
    let rdev = m.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

impl Kmod {
    /// Attach `disk` (or find its attachment): a ring of `capacity` records
    /// and `data_bytes` of data area; sequence numbers start at `first_seq`.
    pub fn attach(disk: &Path, capacity: u64, data_bytes: u64, first_seq: u64) -> Result<Kmod, KmodError> {
        let dev = DEVICE;
        let ctl = std::fs::OpenOptions::new().read(true).write(true).open(dev).map_err(|e| {
            KmodError::Tracker(format!(
                "kmod tracker: cannot open {dev}: {e} (load the module: modprobe ferry_cbt, or insmod ferry_cbt.ko)"
            ))
        })?;
        let mut a = attach_request(disk, capacity)?;
        a.first_seq = first_seq;
        a.data_bytes = data_bytes;
        ioc(&ctl, ioctl::ATTACH, &mut a).map_err(|e| errno_msg(&format!("attach {}", disk.display()), e))?;
        let fresh = a.out_flags & g::FERRY_CBT_ATTACHED_EXISTING == 0;
        let ring = Ring::map_device(&ctl, a.mmap_offset, a.mmap_size as usize, &format!("{DEVICE} (handle {})", a.handle))?;
        Ok(Kmod {
            ctl,
            handle: a.handle,
            ring,
            fresh,
            bitmap_block: a.bitmap_block,
            attach_id: a.attach_id,
            restored: a.out_flags & g::FERRY_CBT_ATTACHED_RESTORED != 0,
            unclean: a.out_flags & g::FERRY_CBT_ATTACHED_UNCLEAN != 0,
            restored_seq: a.restored_seq,
        })
    }

    pub fn status(&self) -> Result<Status, KmodError> {
        // SAFETY: as in attach_request.
        let mut s: g::ferry_cbt_status = unsafe { std::mem::zeroed() };
        s.size = std::mem::size_of::<g::ferry_cbt_status>() as u32;
        s.handle = self.handle;
        ioc(&self.ctl, ioctl::STATUS, &mut s).map_err(|e| errno_msg("status", e))?;
        Ok(Status {
            mode: s.mode,
            seq: s.seq,
            lost: s.lost,
            overflows: s.overflows,
            data_records: s.data_records,
            bitmap_changes: s.bitmap_changes,
            mode_changes: s.mode_changes,
            catchups: s.catchups,
            data_capacity: s.data_capacity,
            data_cap: s.data_cap,
            bitmap_bits: s.bitmap_bits,
        })
    }

    /// CATCHUP: take the bitmap and wait for every write queued so far to
    /// complete; with `drain`, also for every request in the disk's queue.
    pub fn catchup(&self, size: u64, drain: bool) -> Result<Catchup, KmodError> {
        let bits = self.status()?.bitmap_bits.max(size.div_ceil(self.bitmap_block.max(1)));
        let mut buf = vec![0u64; bits.div_ceil(64) as usize + 1];
        // SAFETY: as in attach_request.
        let mut c: g::ferry_cbt_catchup = unsafe { std::mem::zeroed() };
        c.size = std::mem::size_of::<g::ferry_cbt_catchup>() as u32;
        c.handle = self.handle;
        c.buf = buf.as_mut_ptr() as u64;
        c.buf_bytes = (buf.len() * 8) as u64;
        c.flags = if drain { g::FERRY_CBT_CATCHUP_F_DRAIN } else { 0 };
        ioc(&self.ctl, ioctl::CATCHUP, &mut c).map_err(|e| errno_msg("catch-up", e))?;
        let block = c.bitmap_block.max(1);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for b in 0..c.bitmap_bits.min(buf.len() as u64 * 64) {
            if buf[(b / 64) as usize] >> (b % 64) & 1 == 0 {
                continue;
            }
            let (a, e) = (b * block, ((b + 1) * block).min(size));
            if a >= e {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.1 == a => last.1 = e,
                _ => ranges.push((a, e)),
            }
        }
        Ok(Catchup { seq: c.seq, ranges, wait_ns: c.wait_ns })
    }

    /// Queue a consistency marker; with `freeze`, around a freeze of the
    /// filesystem on the whole disk. `Ok(None)` if the ring is full or the
    /// disk is in bitmap mode.
    pub fn tag(&self, freeze: bool) -> Result<Option<u64>, KmodError> {
        // SAFETY: as in attach_request.
        let mut t: g::ferry_cbt_tag = unsafe { std::mem::zeroed() };
        t.size = std::mem::size_of::<g::ferry_cbt_tag>() as u32;
        t.handle = self.handle;
        t.flags = if freeze { g::FERRY_CBT_TAG_F_FREEZE } else { 0 };
        match ioc(&self.ctl, ioctl::TAG, &mut t) {
            Ok(()) => Ok(Some(t.seq)),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(None),
            Err(e) => Err(errno_msg("tag", e)),
        }
    }

    /// Set the memory cap (bytes of data area the module may fill); returns
    /// the cap in force.
    pub fn set_cap(&self, bytes: u64) -> Result<u64, KmodError> {
        // SAFETY: as in attach_request.
        let mut c: g::ferry_cbt_cap = unsafe { std::mem::zeroed() };
        c.size = std::mem::size_of::<g::ferry_cbt_cap>() as u32;
        c.handle = self.handle;
        c.data_cap = bytes;
        ioc(&self.ctl, ioctl::SET_CAP, &mut c).map_err(|e| errno_msg("set the memory cap", e))?;
        Ok(c.data_cap)
    }
}

/// An ATTACH argument for `disk` (whole disk by device number) with
/// `capacity` records, finding an existing attachment rather than failing.
fn attach_request(disk: &Path, capacity: u64) -> Result<g::ferry_cbt_attach, KmodError> {
    let (major, minor) = dev_numbers(disk)?;
    // SAFETY: a plain C struct of integers; all-zero is a valid value.
    let mut a: g::ferry_cbt_attach = unsafe { std::mem::zeroed() };
    a.size = std::mem::size_of::<g::ferry_cbt_attach>() as u32;
    a.flags = g::FERRY_CBT_ATTACH_F_EXISTING_OK;
    a.major = major;
    a.minor = minor;
    a.capacity = capacity;
    Ok(a)
}

/// The handle of `disk`'s attachment, if the module tracks it. (ATTACH with
/// EXISTING_OK would attach a disk it does not track: that attachment is
/// undone at once.)
fn find_handle(ctl: &File, disk: &Path) -> Result<Option<u32>, KmodError> {
    let mut a = attach_request(disk, 1)?;
    ioc(ctl, ioctl::ATTACH, &mut a).map_err(|e| errno_msg(&format!("find {}", disk.display()), e))?;
    if a.out_flags & g::FERRY_CBT_ATTACHED_EXISTING != 0 {
        return Ok(Some(a.handle));
    }
    detach(ctl, a.handle)?;
    Ok(None)
}

fn detach(ctl: &File, handle: u32) -> Result<(), KmodError> {
    // SAFETY: as in attach_request.
    let mut d: g::ferry_cbt_detach = unsafe { std::mem::zeroed() };
    d.size = std::mem::size_of::<g::ferry_cbt_detach>() as u32;
    d.handle = handle;
    ioc(ctl, ioctl::DETACH, &mut d).map_err(|e| errno_msg("detach", e))
}

/// The attach_id of `disk`'s attachment, if the module is loaded and
/// tracks it (to judge an owner record, see owner.rs).
pub fn attachment_id(disk: &Path) -> Result<Option<u64>, KmodError> {
    let Ok(ctl) = std::fs::OpenOptions::new().read(true).write(true).open(DEVICE) else {
        return Ok(None);
    };
    let mut a = attach_request(disk, 1)?;
    ioc(&ctl, ioctl::ATTACH, &mut a).map_err(|e| errno_msg(&format!("find {}", disk.display()), e))?;
    if a.out_flags & g::FERRY_CBT_ATTACHED_EXISTING != 0 {
        return Ok(Some(a.attach_id));
    }
    detach(&ctl, a.handle)?;
    Ok(None)
}

/// Detach `disk` if the module tracks it (`ferry unprotect`).
pub fn detach_disk(disk: &Path) -> Result<bool, KmodError> {
    let Ok(ctl) = std::fs::OpenOptions::new().read(true).write(true).open(DEVICE) else {
        return Ok(false);
    };
    match find_handle(&ctl, disk)? {
        Some(h) => {
            detach(&ctl, h)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// GROUP_TAG: a consistency group's shared point, placed at one instant in
/// the rings of every disk in `disks` (each attached already, by its agent),
/// with the wall-clock time of the attempt that succeeds (ns) as the cut's
/// id, which it returns. Retries a busy moment (a full ring, bitmap mode)
/// for up to 5 s.
pub fn group_tag(disks: &[std::path::PathBuf]) -> Result<u64, KmodError> {
    if disks.len() < 2 || disks.len() > g::FERRY_CBT_GROUP_MAX as usize {
        return Err(KmodError::Usage(format!("a consistency group has 2 to {} disks", g::FERRY_CBT_GROUP_MAX)));
    }
    let ctl = std::fs::OpenOptions::new().read(true).write(true).open(DEVICE).map_err(|e| errno_msg(&format!("open {DEVICE}"), e))?;
    // SAFETY: as in attach_request.
    let mut gt: g::ferry_cbt_group_tag = unsafe { std::mem::zeroed() };
    gt.size = std::mem::size_of::<g::ferry_cbt_group_tag>() as u32;
    gt.count = disks.len() as u32;
    for (i, d) in disks.iter().enumerate() {
        gt.handles[i] = find_handle(&ctl, d)?
            .ok_or_else(|| KmodError::Usage(format!("{} is not protected with --tracker kmod: start its agent first", d.display())))?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        gt.id = ferry_common::now_ns();
        match ioc(&ctl, ioctl::GROUP_TAG, &mut gt) {
            Ok(()) => return Ok(gt.id),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => return Err(errno_msg("group tag", e)),
        }
    }
}
