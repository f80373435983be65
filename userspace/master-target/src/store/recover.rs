//! Reading a disk folder with no server: listing points and materializing one.
//!
//! Recovery copies the replica as it is now (sparse: only data extents), then
//! reads the journal from the point's position and applies, newest first,
//! every pre-image recorded after the point. It is safe while a master target
//! is writing the folder: the replica is read before the journal, and every
//! overwrite of the replica is preceded by its durable pre-image, so any
//! change the copy may have seen is undone (see journal.rs).

use super::catalog::{read_points, Point};
use super::folder::{read_meta, DiskError, Paths};
use super::journal::{JournalReader, RecordInfo, KIND_UNDO, KIND_UNDO_ZERO};
use super::lock::RecoveryLock;
use super::settle;
use super::sums::{self, Sums, SumsError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("cannot open {path} for writing: {source}")]
    OpenOut { path: String, source: io::Error },
    #[error("{0}: neither a regular file nor a block device; choose another --out")]
    NotFileOrDevice(String),
    #[error("{0}: not a file name")]
    NotAFileName(String),
    #[error("{source}; {path} now holds a partial image")]
    Partial { path: String, source: Box<RecoverError> },
    #[error(transparent)]
    Sums(#[from] SumsError),
    #[error("disk {0} has no recovery points yet (the first appears when the initial sync completes)")]
    NoPoints(String),
    #[error("no recovery point {sel} for disk {name} (see `ferry points`)")]
    NoSuchPoint { name: String, sel: String },
    #[error("bad point {0:?}: give a point id, `latest`, or an RFC 3339 time like 2026-11-27T10:00:00Z")]
    BadSelector(String),
    #[error("refusing to write the recovery into the disk's own folder ({0}); choose an --out outside it")]
    OverReplica(String),
    #[error("{0} exists: give --force to replace it, or choose another --out; nothing was written")]
    Exists(String),
    #[error("{0} is mounted or in use (a filesystem, device mapper, md or another program holds it): unmount it or stop its user first; nothing was written")]
    DeviceBusy(String),
    #[error("{path} holds {have} bytes, less than the disk's {need}: choose a device at least as large; nothing was written")]
    DeviceTooSmall { path: String, have: u64, need: u64 },
    #[error("{0} is a block device, which receives a raw image: drop --format qcow2, or write the qcow2 to a file")]
    DeviceQcow2(String),
    #[error("--out {path} names a {ext} image but --format {given} was given: drop --format, or change the extension")]
    FormatMismatch { path: String, ext: &'static str, given: &'static str },
    #[error("qemu-img failed converting to qcow2: {0}")]
    Convert(String),
    #[error("qemu-img failed converting to qcow2: cannot run qemu-img ({source}); install qemu-utils")]
    NoQemuImg { source: io::Error },
}

fn ioe(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> RecoverError {
    move |source| RecoverError::Io { what: what.to_string(), source }
}

/// Which point to recover.
#[derive(Clone, Debug)]
pub enum Selector {
    Latest,
    Id(u64),
    /// The newest point at or before this time (ns since the epoch).
    AtOrBefore(u64),
}

impl std::str::FromStr for Selector {
    type Err = RecoverError;
    fn from_str(s: &str) -> Result<Selector, RecoverError> {
        if s == "latest" {
            return Ok(Selector::Latest);
        }
        if let Ok(id) = s.parse::<u64>() {
            return Ok(Selector::Id(id));
        }
        let t = humantime::parse_rfc3339_weak(s).map_err(|_| RecoverError::BadSelector(s.into()))?;
        let ns = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| RecoverError::BadSelector(s.into()))?.as_nanos() as u64;
        Ok(Selector::AtOrBefore(ns))
    }
}

/// Output image formats (in views: "raw", "qcow2").
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

/// The recovery points of a disk, oldest first.
pub fn points(data: &Path, name: &str) -> Result<Vec<Point>, RecoverError> {
    read_meta(data, name)?;
    let p = Paths::new(data, name);
    Ok(read_points(&p.points).map_err(ioe(p.points.display()))?.0)
}

/// Pick the point `sel` names.
pub fn select(name: &str, pts: &[Point], sel: &Selector, text: &str) -> Result<Point, RecoverError> {
    if pts.is_empty() {
        return Err(RecoverError::NoPoints(name.into()));
    }
    let found = match sel {
        Selector::Latest => pts.last().copied(),
        Selector::Id(id) => pts.iter().find(|p| p.id == *id).copied(),
        Selector::AtOrBefore(t) => pts.iter().rev().find(|p| p.time_ns <= *t).copied(),
    };
    found.ok_or_else(|| RecoverError::NoSuchPoint { name: name.into(), sel: text.into() })
}

/// Format a point's time as RFC 3339 (UTC, nanoseconds).
pub use ferry_common::units::rfc3339;

/// Materialize `point` of disk `name` into `out` in `format`, replacing an
/// existing file (library callers and tests; `ferry recover` goes through
/// [`prepare`] and [`write`] with the operator's choices).
pub fn recover(data: &Path, name: &str, point: &Point, out: &Path, format: Format) -> Result<(), RecoverError> {
    write(data, name, point, prepare(data, name, out, Some(format), true)?)
}

impl Format {
    /// The format an output's extension names: `.qcow2`, or `.img`/`.raw`.
    pub fn from_extension(p: &Path) -> Option<Format> {
        match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "qcow2" => Some(Format::Qcow2),
            "img" | "raw" => Some(Format::Raw),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Where a recovery is written, checked and opened before anything is
/// written ([`prepare`]):
///
/// - a block device is opened exclusively (`O_EXCL`: refused while it is
///   mounted, or held by device mapper, md, or another exclusive opener)
///   and must hold the whole disk; it receives a raw image. A plain open
///   by another program is not seen.
/// - a file is written beside its final name (`.NAME.ferry-PID.tmp`) and
///   renamed into place once complete, so that a failure leaves no partial
///   image and an existing file is replaced only when the operator said so.
pub struct Output {
    path: PathBuf,
    format: Format,
    kind: OutKind,
    /// The raw image a qcow2 is converted from (removed at drop).
    raw_tmp: Option<PathBuf>,
}

enum OutKind {
    Device(File),
    File { tmp: Option<PathBuf>, file: File, replace: bool },
}

impl Output {
    pub fn format(&self) -> Format {
        self.format
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn is_device(&self) -> bool {
        matches!(self.kind, OutKind::Device(_))
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(t) = self.raw_tmp.take() {
            let _ = std::fs::remove_file(t);
        }
        // Not renamed into place: a failure; never a device.
        if let OutKind::File { tmp: Some(t), .. } = &mut self.kind {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// Check `out` for a recovery of disk `name` and open it (see [`Output`]).
/// The format is `explicit` or, for a file, the one its extension names
/// (raw otherwise); an explicit format the extension contradicts is
/// refused. An existing file is refused unless `replace`.
pub fn prepare(data: &Path, name: &str, out: &Path, explicit: Option<Format>, replace: bool) -> Result<Output, RecoverError> {
    let meta = read_meta(data, name)?;
    let p = Paths::new(data, name);
    let resolved = std::fs::canonicalize(out).ok().or_else(|| {
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(std::fs::canonicalize(dir).ok()?.join(out.file_name()?))
    });
    if let (Ok(a), Some(b)) = (std::fs::canonicalize(&p.dir), resolved) {
        if b.starts_with(&a) {
            return Err(RecoverError::OverReplica(out.display().to_string()));
        }
    }
    let shown = out.display().to_string();
    let existing = match std::fs::metadata(out) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(ioe(&shown)(ferry_common::root_hint(e))),
    };
    if existing.as_ref().is_some_and(|m| m.file_type().is_block_device()) {
        if explicit == Some(Format::Qcow2) {
            return Err(RecoverError::DeviceQcow2(shown));
        }
        let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(out).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => RecoverError::DeviceBusy(shown.clone()),
            _ => RecoverError::OpenOut { path: shown.clone(), source: ferry_common::root_hint(e) },
        })?;
        let have = ferry_common::source::size_of(&f).map_err(ioe(&shown))?;
        if have < meta.size {
            return Err(RecoverError::DeviceTooSmall { path: shown, have, need: meta.size });
        }
        return Ok(Output { path: out.to_path_buf(), format: Format::Raw, kind: OutKind::Device(f), raw_tmp: None });
    }
    let format = match (Format::from_extension(out), explicit) {
        (Some(e), Some(x)) if e != x => {
            return Err(RecoverError::FormatMismatch { path: shown, ext: e.as_str(), given: x.as_str() });
        }
        (e, x) => x.or(e).unwrap_or(Format::Raw),
    };
    if let Some(m) = &existing {
        if !m.file_type().is_file() {
            return Err(RecoverError::NotFileOrDevice(shown));
        }
        if !replace {
            return Err(RecoverError::Exists(shown));
        }
    }
    let tmp = sibling(out, "tmp")?;
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).map_err(ioe(&shown))?;
    Ok(Output { path: out.to_path_buf(), format, kind: OutKind::File { tmp: Some(tmp), file, replace: existing.is_some() }, raw_tmp: None })
}

/// `DIR/.NAME.ferry-PID.EXT` beside `out`.
fn sibling(out: &Path, ext: &str) -> Result<PathBuf, RecoverError> {
    let file = out.file_name().ok_or_else(|| RecoverError::NotAFileName(out.display().to_string()))?;
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(dir.join(format!(".{}.ferry-{}.{ext}", file.to_string_lossy(), std::process::id())))
}

/// Write `point` of disk `name` into `out` (from [`prepare`]) and put it
/// in place. On failure a file output leaves nothing behind; a device
/// holds whatever was written before the failure.
pub fn write(data: &Path, name: &str, point: &Point, mut out: Output) -> Result<(), RecoverError> {
    let r = write_inner(data, name, point, &mut out);
    match (&out.kind, r) {
        (_, Ok(())) => Ok(()),
        (OutKind::Device(_), Err(e)) => Err(RecoverError::Partial { path: out.path.display().to_string(), source: Box::new(e) }),
        (OutKind::File { .. }, Err(e)) => Err(e),
    }
}

fn write_inner(data: &Path, name: &str, point: &Point, out: &mut Output) -> Result<(), RecoverError> {
    let shown = out.path.display().to_string();
    match (&out.kind, out.format) {
        (OutKind::Device(f), _) => return write_raw(data, name, point, f, true, &shown),
        (OutKind::File { file, .. }, Format::Raw) => write_raw(data, name, point, file, false, &shown)?,
        (OutKind::File { tmp, .. }, Format::Qcow2) => {
            let raw = sibling(&out.path, "raw")?;
            let rf = OpenOptions::new().read(true).write(true).create_new(true).open(&raw).map_err(ioe(raw.display()))?;
            out.raw_tmp = Some(raw.clone());
            write_raw(data, name, point, &rf, false, &raw.display().to_string())?;
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(tmp.as_ref().expect("the temporary file is there until the rename"))
                .status()
                .map_err(|source| RecoverError::NoQemuImg { source })?;
            if !st.success() {
                return Err(RecoverError::Convert(format!("qemu-img exited with {st}")));
            }
            let _ = std::fs::remove_file(&raw);
            out.raw_tmp = None;
            File::open(tmp.as_ref().expect("as above")).and_then(|f| f.sync_all()).map_err(ioe(&shown))?;
        }
    }
    // Into place: replacing a file only when allowed (and checked) before.
    let OutKind::File { tmp, replace, .. } = &mut out.kind else { unreachable!("devices returned above") };
    let from = tmp.as_ref().expect("as above");
    if *replace {
        std::fs::rename(from, &out.path).map_err(ioe(&shown))?;
    } else {
        rename_noreplace(from, &out.path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => RecoverError::Exists(shown.clone()),
            _ => ioe(&shown)(e),
        })?;
    }
    *tmp = None;
    let dir = out.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(ioe(dir.display()))?;
    Ok(())
}

/// rename(2) that fails with `AlreadyExists` rather than replace `to`
/// (another process may have created it since [`prepare`] looked).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A filesystem without RENAME_NOREPLACE: a link fails if `to` exists.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(e),
    }
}

/// The raw image of `point` into `outf` (a fresh empty file, or a device).
fn write_raw(data: &Path, name: &str, point: &Point, outf: &File, is_dev: bool, shown: &str) -> Result<(), RecoverError> {
    let meta = read_meta(data, name)?;
    let p = Paths::new(data, name);
    // A folder left by a crash, with no master target to reconcile it, is
    // brought to its durable state first (not taken for damaged).
    settle::settle(data, name)?;
    // A master target starting up must not undo and cut journal records
    // between our copy of the replica and our read of the journal. On a
    // read-only copy of a folder there is no writer to exclude.
    let _guard = match RecoveryLock::shared(&p) {
        Ok(g) => Some(g),
        Err(e) => {
            log::warn!("recovering without the folder's recovery lock: {e}");
            None
        }
    };
    prove_inputs(data, name, point, false)?;
    let replica = File::open(&p.replica).map_err(ioe(p.replica.display()))?;
    if !is_dev {
        outf.set_len(meta.size).map_err(ioe(shown))?;
    }
    // On a filesystem that shares extents (XFS, btrfs), the copy is a
    // clone: instant and taking no space, so a recovery costs only the
    // journal after the point. Elsewhere, a sparse copy.
    // Every chunk the copy takes from the replica must match its sum: a
    // copy checks as it reads; a clone is read back.
    let sums = Sums::open(&p.sums, meta.size, false)?;
    let check = sums.as_ref().map(|s| Check { sums: s, replica: &replica, p: &p, name });
    if is_dev || !clone_file(&replica, outf) {
        copy_sparse(&replica, outf, meta.size, !is_dev, check.as_ref(), shown)?;
    } else if let Some(c) = &check {
        verify_copy(outf, &replica, c.sums, &p, name)?;
    }
    // Only now read the journal (see the module note).
    let j = JournalReader::open(&p.journal).map_err(DiskError::from)?;
    let recs = scan_checked(&j, &p, name, point.journal_pos)?;
    for r in recs.iter().rev() {
        if (r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO) && r.seq > point.seq {
            let d = j.data(r).map_err(ioe(p.journal.display()))?;
            outf.write_all_at(&d, r.offset).map_err(ioe(shown))?;
        }
    }
    outf.sync_all().map_err(ioe(shown))?;
    Ok(())
}

/// The journal's valid records from `from`, refusing a journal whose valid
/// part ends before a later committed record (damage, not a tail being
/// written). A record a running master target is still writing can look
/// torn for a moment: look twice before calling it damage.
fn scan_checked(j: &JournalReader, p: &Paths, name: &str, from: u64) -> Result<Vec<RecordInfo>, RecoverError> {
    let mut tries = 0;
    loop {
        let recs = j.scan(from).map_err(DiskError::from)?;
        let end = recs.last().map_or(from, |r| r.end);
        if !j.commit_after(end).map_err(DiskError::from)? {
            return Ok(recs);
        }
        tries += 1;
        if tries == 3 {
            return Err(journal_damage(p, name, end).into());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The refusal for a journal damaged at byte `at`: the file, the offset, and
/// which points it takes (those at or before it) and leaves (those after).
pub fn journal_damage(p: &Paths, name: &str, at: u64) -> DiskError {
    let pts = read_points(&p.points).map(|x| x.0).unwrap_or_default();
    let lost: Vec<u64> = pts.iter().filter(|q| q.journal_pos <= at).map(|q| q.id).collect();
    let kept: Vec<u64> = pts.iter().filter(|q| q.journal_pos > at).map(|q| q.id).collect();
    DiskError::Damaged {
        name: name.into(),
        why: format!(
            "{} has a bad record at byte {at} with committed records after it: points {} cannot be recovered{}",
            p.journal.display(),
            id_list(&lost),
            if kept.is_empty() { String::new() } else { format!(" (points {} still can)", id_list(&kept)) }
        ),
    }
}

fn id_list(ids: &[u64]) -> String {
    match ids {
        [] => "none".into(),
        [a] => a.to_string(),
        [a, .., b] if (b - a) as usize + 1 == ids.len() => format!("{a}-{b}"),
        _ => ids.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
    }
}

/// What every recovery, export and failover checks before it hands out a
/// point: the replica is there and has the disk's size, and the journal from
/// the point on is readable up to its last commit (`journal`: a recovery
/// checks that as it reads the journal anyway).
pub fn prove_inputs(data: &Path, name: &str, point: &Point, journal: bool) -> Result<(), RecoverError> {
    let meta = read_meta(data, name)?;
    let p = Paths::new(data, name);
    let len = std::fs::metadata(&p.replica).map_err(ioe(p.replica.display()))?.len();
    if len != meta.size {
        return Err(DiskError::Damaged {
            name: name.into(),
            why: format!("{} is {len} bytes but the disk is {}: no point can be recovered from it", p.replica.display(), meta.size),
        }
        .into());
    }
    settle::check_mark(&p, name, meta.size)?;
    if journal {
        let j = JournalReader::open(&p.journal).map_err(DiskError::from)?;
        scan_checked(&j, &p, name, point.journal_pos)?;
    }
    Ok(())
}

/// Check the copy of the replica in `out` chunk by chunk against the sums.
/// A chunk that differs is read again from the replica itself under the
/// folder's apply lock (a running master target may have rewritten it since
/// the copy: then its journal records, read next, undo that) and must match
/// its sum there; otherwise the replica is damaged.
pub fn verify_copy(out: &File, replica: &File, sums: &Sums, p: &Paths, name: &str) -> Result<(), RecoverError> {
    sums::compare((out, "the recovered copy"), sums.size, (sums, replica, &p.dir), |c| Err(replica_damage(p, name, c)), |_| {})?;
    Ok(())
}

/// Make `dst` a clone of `src` (FICLONE: shared extents, copy on write).
/// False where the filesystem cannot (ext4, different filesystems): the
/// caller copies instead.
fn clone_file(src: &File, dst: &File) -> bool {
    // _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are ours.
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } != 0 {
        return false;
    }
    small_cow_extents(dst);
    true
}

/// `struct fsxattr` (linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// XFS unshares a cloned file 32 blocks at a time by default (its copy on
/// write extent size hint): the scattered pre-images of a recovery would
/// each cost 128 KiB. Ask for one block. Best effort: other filesystems
/// refuse, and then nothing changes.
fn small_cow_extents(f: &File) {
    const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f; // _IOR('X', 31, struct fsxattr)
    const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820; // _IOW('X', 32, struct fsxattr)
    const FS_XFLAG_COWEXTSIZE: u32 = 0x0001_0000;
    let mut x = FsXattr::default();
    // SAFETY: the ioctls read/write one struct fsxattr (28 bytes, matching
    // the layout above) through the pointer; the fd is ours.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut x as *mut FsXattr) != 0 {
            return;
        }
        x.xflags |= FS_XFLAG_COWEXTSIZE;
        x.cowextsize = 4096;
        let _ = libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR as _, &x as *const FsXattr);
    }
}

/// What a copy checks its chunks against.
struct Check<'a> {
    sums: &'a Sums,
    replica: &'a File,
    p: &'a Paths,
    name: &'a str,
}

impl Check<'_> {
    /// Chunks `[c0, c0 + computed.len())` as read, against their sums.
    fn chunks(&self, c0: u64, computed: &[[u8; 16]]) -> Result<(), RecoverError> {
        let mut one = Vec::new();
        sums::check_computed(c0, computed, (self.sums, self.replica, &self.p.dir), &mut one, |c| Err(replica_damage(self.p, self.name, c)))
    }
}

fn replica_damage(p: &Paths, name: &str, c: u64) -> RecoverError {
    DiskError::Damaged {
        name: name.into(),
        why: format!(
            "{} does not match its checksum in the 64 KiB chunk at byte {}: every point reads it; `ferry verify` lists all \
             damaged ranges, and `ferry agent --verify --repair` re-sends them from the source",
            p.replica.display(),
            c * sums::CHUNK
        ),
    }
    .into()
}

/// Copy `size` bytes; with `holes`, skip the source's holes (the target is a
/// fresh sparse file that already reads as zero there). With `check`, every
/// 64 KiB chunk is checked against its sum as it is read (whole chunks are
/// read around each data extent; chunks wholly in holes must have the zero
/// sum).
fn copy_sparse(src: &File, dst: &File, size: u64, holes: bool, check: Option<&Check>, shown: &str) -> Result<(), RecoverError> {
    use sums::CHUNK;
    let rd = |e: io::Error| ioe("reading the replica")(e);
    let wr = |e: io::Error| ioe(shown)(e);
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    while pos < size {
        let (mut start, mut end) = if holes { next_data(src, pos, size).map_err(rd)? } else { (pos, size) };
        if check.is_some() {
            start = (start / CHUNK * CHUNK).max(pos);
            end = end.div_ceil(CHUNK).saturating_mul(CHUNK).min(size);
        }
        if let Some(c) = check {
            // Chunks wholly in the hole before this extent.
            let h1 = if start >= size { size.div_ceil(CHUNK) } else { start / CHUNK };
            let h0 = pos.div_ceil(CHUNK);
            let mut h = h0.min(h1);
            while h < h1 {
                let n = ((h1 - h) as usize).min(65536);
                c.chunks(h, &vec![[0u8; 16]; n])?;
                h += n as u64;
            }
        }
        if start >= size {
            break;
        }
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at).map_err(rd)?;
            if let Some(c) = check {
                let sums: Vec<[u8; 16]> = buf[..n].chunks(CHUNK as usize).map(|d| c.sums.sum_of(d)).collect();
                c.chunks(at / CHUNK, &sums)?;
            }
            if !(holes && ferry_common::is_zero(&buf[..n])) {
                dst.write_all_at(&buf[..n], at).map_err(wr)?;
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// The next data extent `[start, end)` at or after `pos` (SEEK_DATA/SEEK_HOLE).
fn next_data(f: &File, pos: u64, size: u64) -> io::Result<(u64, u64)> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an fd we own; no memory is passed.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok((size, size)),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((pos, size)),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 { size } else { (end as u64).min(size) };
    Ok((start as u64, end))
}
