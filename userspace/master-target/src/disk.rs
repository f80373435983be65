//! One protected disk's folder on the master target, and applying a stream
//! to it.
//!
//! ```text
//! DIR/NAME/disk.meta     name, size, generation (checksummed state file)
//! DIR/NAME/replica.img   sparse image, the newest durable state
//! DIR/NAME/journal.fj    undo journal (see journal.rs)
//! DIR/NAME/points.log    recovery point catalog (see catalog.rs)
//! DIR/NAME/lock          flock: one writer (master target) at a time
//! ```
//!
//! Locking: the master target holds an exclusive `flock` on `lock` for as long
//! as a stream for the disk is open; a second stream for the same disk (from
//! this or another process) is refused as busy. Readers (`ferry points`,
//! `ferry recover`) take no lock: the journal's write-ahead order makes a
//! replica read followed by a journal read consistent (see journal.rs).

use crate::catalog::{Catalog, Point};
use crate::journal::{Journal, JournalError, JournalReader, KIND_COMMIT, KIND_UNDO, KIND_UNDO_ZERO};
use ferry_common::durable::{hex, read_state, unhex, write_state, StateError};
use ferry_proto::PointKind;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const META_KIND: &str = "ferry-disk-meta";
pub const META_VERSION: u32 = 1;

/// `disk.meta` contents.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Meta {
    pub name: String,
    pub size: u64,
    /// Hex of the 16-byte generation id of the agent stream last opened.
    pub generation: String,
    pub created_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0}")]
    Io(String),
    #[error("disk {0} is being written by another stream (another agent, or another master target on this folder)")]
    Busy(String),
    #[error("disk {name} was {was} bytes and is now {now}: a resized disk needs a new name (or remove its folder)")]
    SizeChanged { name: String, was: u64, now: u64 },
    #[error("no disk named {name} under {data}")]
    NotFound { name: String, data: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("disk {name}: {why}; the folder is damaged: restore it from a copy, or move it aside to start this disk over")]
    Damaged { name: String, why: String },
    #[error("disk {0}: an earlier write to the replica failed; the stream was closed and the next one repairs the folder")]
    Failed(String),
    /// Failed over, not yet committed: the agent waits (ERROR 12).
    #[error(
        "disk {name} is failed over ({why}): its stream is refused until `ferry failover --cancel` \
         (replication resumes; a running agent waits for it) or `ferry failover --commit` (final)"
    )]
    FailedOver { name: String, why: String },
    /// The failover is committed: refused for good (ERROR 11).
    #[error(
        "disk {name} was failed over ({why}) and the failover is committed: its stream is refused for good; \
         to replicate this disk again, protect it under a new name (a new --name and --state)"
    )]
    FailedOverCommitted { name: String, why: String },
}

fn ioe(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> DiskError {
    move |e| DiskError::Io(format!("{what}: {e}"))
}

/// Paths of a disk folder.
pub struct Paths {
    pub dir: PathBuf,
    pub meta: PathBuf,
    pub replica: PathBuf,
    pub journal: PathBuf,
    /// Pre-images needed only to roll back the batch in progress (see
    /// `Disk::apply`).
    pub batch: PathBuf,
    pub points: PathBuf,
    pub lock: PathBuf,
    /// Checksums of the replica's chunks and its durable mark (sums.rs).
    pub sums: PathBuf,
}

impl Paths {
    pub fn new(data: &Path, name: &str) -> Paths {
        let dir = data.join(name);
        Paths {
            meta: dir.join("disk.meta"),
            replica: dir.join("replica.img"),
            journal: dir.join("journal.fj"),
            batch: dir.join("batch.fj"),
            points: dir.join("points.log"),
            lock: dir.join("lock"),
            sums: dir.join("replica.sums"),
            dir,
        }
    }
}

/// Read a disk's metadata, for readers. A folder that holds a replica, a
/// journal or a catalog but no `disk.meta` is damaged, not absent.
pub fn read_meta(data: &Path, name: &str) -> Result<Meta, DiskError> {
    let p = Paths::new(data, name);
    match read_state(&p.meta, META_KIND, META_VERSION)? {
        Some(m) => {
            check_complete(&p, name, true)?;
            Ok(m)
        }
        None => {
            check_complete(&p, name, false)?;
            Err(DiskError::NotFound { name: name.into(), data: data.display().to_string() })
        }
    }
}

/// The largest disk a master target takes (2^56 bytes, 64 PiB): beyond any
/// real disk, and well inside what a sparse file and the journal's offsets hold.
pub const MAX_DISK: u64 = 1 << 56;

/// A folder missing one of its files is damaged, never new: refuse it with
/// what is missing and how to repair it. `has_meta`: `disk.meta` is there.
pub fn check_complete(p: &Paths, name: &str, has_meta: bool) -> Result<(), DiskError> {
    let journal_used = fs::metadata(&p.journal).is_ok_and(|m| m.len() > crate::journal::HEADER_LEN);
    let present: Vec<&str> = [
        ("replica.img", p.replica.exists()),
        ("journal.fj", p.journal.exists()),
        ("points.log", fs::metadata(&p.points).is_ok_and(|m| m.len() > 0)),
    ]
    .iter()
    .filter(|(_, e)| *e)
    .map(|(n, _)| *n)
    .collect();
    let damaged = |why: String| {
        Err(DiskError::Damaged {
            name: name.into(),
            why: format!(
                "{why} (in {}); `ferry repair --data {} --name {name}` rebuilds what it can",
                p.dir.display(),
                p.dir.parent().map_or(String::from("."), |d| d.display().to_string())
            ),
        })
    };
    if !has_meta {
        if !present.is_empty() {
            return damaged(format!("disk.meta is missing but the folder holds {}", present.join(", ")));
        }
        return Ok(());
    }
    if !p.replica.exists() {
        return damaged("replica.img is missing".into());
    }
    if journal_used && !p.points.exists() {
        return damaged("points.log is missing but the undo journal holds records".into());
    }
    Ok(())
}

/// One change to apply, already validated against the disk's size.
pub enum Op {
    Write { seq: u64, offset: u64, data: Vec<u8> },
    Zero { seq: u64, offset: u64, len: u32 },
    Tag { seq: u64, time_ns: u64, kind: PointKind },
}

impl Op {
    fn seq(&self) -> u64 {
        match self {
            Op::Write { seq, .. } | Op::Zero { seq, .. } | Op::Tag { seq, .. } => *seq,
        }
    }
    /// The byte range the op writes, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data, .. } => Some((*offset, *offset + data.len() as u64)),
            Op::Zero { offset, len, .. } => Some((*offset, *offset + u64::from(*len))),
            Op::Tag { .. } => None,
        }
    }
}

/// What `Disk::open` found.
pub struct OpenInfo {
    pub existed: bool,
    pub same_generation: bool,
}

/// An open disk with its writer lock.
pub struct Disk {
    pub name: String,
    pub size: u64,
    paths: Paths,
    replica: File,
    journal: Journal,
    /// The batch journal: pre-images of ranges already journaled since the
    /// last point (copy on first write per interval), kept only until the
    /// batch commits, for its rollback.
    batch: Journal,
    /// Ranges whose pre-image since the last point is in the journal.
    cofw: crate::view::RangeSet,
    last_retention: Option<std::time::Instant>,
    last_space_check: Option<std::time::Instant>,
    /// Sums written since their mark was last made durable.
    sums_dirty: bool,
    sums_synced: std::time::Instant,
    /// The journal's end right after its last COMMIT (what the mark names).
    commit_end: u64,
    /// FERRY_NO_COFW=1 (benchmark only): journal every overwrite, as before
    /// copy on first write per interval, to measure what it saves.
    no_cofw: bool,
    catalog: Catalog,
    /// Chunk sums of the replica, updated after every COMMIT.
    sums: Option<crate::sums::Sums>,
    /// Held from a batch's first replica write until its sums are written.
    apply_lock: std::sync::Arc<crate::sums::ApplyLock>,
    pub durable_seq: u64,
    /// Metadata to write before the first batch (a new generation).
    new_meta: Option<Meta>,
    /// Reused read buffer for checksums.
    scratch: Vec<u8>,
    /// An apply failed part-way: the replica and journal are in an unknown
    /// state until the folder is reopened (and repaired).
    failed: bool,
    _lock: File,
}

impl Drop for Disk {
    fn drop(&mut self) {
        if !self.failed {
            if let Err(e) = self.sync_sums() {
                log::warn!("disk {}: {e}", self.name);
            }
        }
    }
}

/// Take the folder's writer lock without blocking.
pub(crate) fn lock(paths: &Paths, name: &str) -> Result<File, DiskError> {
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(&paths.lock).map_err(ioe(paths.lock.display()))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Err(DiskError::Busy(name.into()))
        } else {
            Err(ioe(paths.lock.display())(e))
        };
    }
    Ok(f)
}

impl Disk {
    /// Open (or create) the folder for `name`, take its lock, and repair the
    /// journal tail. `size` and `generation` are what the agent offers.
    pub fn open(data: &Path, name: &str, size: u64, generation: [u8; 16]) -> Result<(Disk, OpenInfo), DiskError> {
        let paths = Paths::new(data, name);
        let created = !paths.dir.exists();
        let r = Self::open_in(data, name, size, generation);
        if created && matches!(&r, Err(e) if !matches!(e, DiskError::Busy(_))) {
            // A stream refused at its first OPEN (an impossible size, a full
            // disk) leaves nothing behind.
            let _ = fs::remove_dir_all(&paths.dir);
        }
        r
    }

    fn open_in(data: &Path, name: &str, size: u64, generation: [u8; 16]) -> Result<(Disk, OpenInfo), DiskError> {
        let paths = Paths::new(data, name);
        if size > MAX_DISK {
            return Err(DiskError::Io(format!("disk {name}: {size} bytes is more than this master target supports ({MAX_DISK})")));
        }
        fs::create_dir_all(&paths.dir).map_err(ioe(paths.dir.display()))?;
        crate::failover::refuse_if_failed_over(&paths, name)?;
        let lockf = lock(&paths, name)?;
        let meta: Option<Meta> = read_state(&paths.meta, META_KIND, META_VERSION)?;
        check_complete(&paths, name, meta.is_some())?;
        let gen_hex = hex(&generation);
        let info = match &meta {
            Some(m) if m.size != size => return Err(DiskError::SizeChanged { name: name.into(), was: m.size, now: size }),
            Some(m) => OpenInfo { existed: true, same_generation: m.generation == gen_hex },
            None => OpenInfo { existed: false, same_generation: false },
        };
        if meta.is_none() {
            let r =
                OpenOptions::new().write(true).create(true).truncate(true).open(&paths.replica).map_err(ioe(paths.replica.display()))?;
            r.set_len(size).map_err(ioe(paths.replica.display()))?;
            r.sync_all().map_err(ioe(paths.replica.display()))?;
            let _ = fs::remove_file(&paths.journal);
            let _ = fs::remove_file(&paths.batch);
            let _ = fs::remove_file(&paths.points);
            let _ = fs::remove_file(&paths.sums);
        }
        // A new disk's meta is written now (it marks the folder complete); a
        // new generation for an existing disk only once its stream writes,
        // so that a stream that sends nothing changes nothing.
        let mut new_meta = None;
        if !info.same_generation {
            let m = Meta {
                name: name.into(),
                size,
                generation: gen_hex,
                created_ns: meta.as_ref().map_or_else(ferry_common::now_ns, |m| m.created_ns),
            };
            if meta.is_none() {
                write_state(&paths.meta, META_KIND, META_VERSION, &m)?;
            } else {
                new_meta = Some(m);
            }
        }
        let replica = OpenOptions::new().read(true).write(true).open(&paths.replica).map_err(ioe(paths.replica.display()))?;
        let (catalog, points) = Catalog::open(&paths.points).map_err(ioe(paths.points.display()))?;
        if !points.is_empty() && !paths.journal.exists() {
            return Err(DiskError::Damaged { name: name.into(), why: "the undo journal is missing but recovery points exist".into() });
        }
        let mut journal = Journal::open(&paths.journal)?;
        let mut batch = Journal::open(&paths.batch)?;
        let (durable_seq, sums) = reconcile(&paths, name, size, &replica, &mut journal, &mut batch, &points)?;
        crate::reserve::ensure(&paths.dir);
        let commit_end = journal.end();
        let apply_lock = crate::sums::ApplyLock::open(&paths.dir).map_err(ioe(paths.dir.join("apply.lock").display()))?;
        let mut disk = Disk {
            sums,
            apply_lock: std::sync::Arc::new(apply_lock),
            name: name.into(),
            size,
            paths,
            replica,
            journal,
            batch,
            cofw: Default::default(),
            last_retention: None,
            last_space_check: None,
            sums_dirty: false,
            sums_synced: std::time::Instant::now(),
            commit_end,
            no_cofw: std::env::var_os("FERRY_NO_COFW").is_some_and(|v| v == "1"),
            catalog,
            durable_seq,
            new_meta,
            scratch: Vec::new(),
            failed: false,
            _lock: lockf,
        };
        // A policy tightened while the filesystem was full (or while no
        // stream ran) frees its space before the first batch needs it.
        if let Err(e) = disk.retain() {
            log::warn!("disk {name}: retention: {e}");
        }
        Ok((disk, info))
    }

    /// The folder of this disk.
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    fn read_replica(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let mut v = vec![0u8; len];
        self.replica.read_exact_at(&mut v, offset).map_err(ioe(self.paths.replica.display()))?;
        Ok(v)
    }

    fn write_pending(&mut self, ops: &[Op], pending: &mut Vec<usize>) -> Result<(), DiskError> {
        if pending.is_empty() {
            return Ok(());
        }
        self.journal.sync()?; // undo before overwrite
        if self.batch.dirty() {
            self.batch.sync()?;
        }
        for &i in pending.iter() {
            match &ops[i] {
                Op::Write { offset, data, .. } => self.replica.write_all_at(data, *offset).map_err(ioe(self.paths.replica.display()))?,
                Op::Zero { offset, len, .. } => {
                    zero_range(&self.replica, *offset, u64::from(*len)).map_err(ioe(self.paths.replica.display()))?
                }
                Op::Tag { .. } => {}
            }
        }
        pending.clear();
        Ok(())
    }

    /// Apply a batch durably, in order. Returns the points recorded for the
    /// batch's tags. Sequence numbers must be increasing (the caller checks).
    pub fn apply(&mut self, ops: &[Op]) -> Result<Vec<Point>, DiskError> {
        if self.failed {
            return Err(DiskError::Failed(self.name.clone()));
        }
        // A failover ends the stream at the next batch.
        crate::failover::refuse_if_failed_over(&self.paths, &self.name)?;
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        // Cleared only when the whole batch, its commit and its points are
        // durable: a failure anywhere leaves the disk refusing more work.
        self.failed = true;
        if let Some(m) = self.new_meta.take() {
            write_state(&self.paths.meta, META_KIND, META_VERSION, &m)?;
        }
        // What the batch journal held is committed (every record in it is
        // at or below durable_seq): start it over.
        self.batch.reset()?;
        // Checks of the replica against its sums wait for this batch's sums.
        let apply_lock = std::sync::Arc::clone(&self.apply_lock);
        let _applying = apply_lock.exclusive().map_err(ioe("apply.lock"))?;
        let mut pending = Vec::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut tags = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match op.range() {
                Some((a, b)) => {
                    // A range overlapping one still pending must see that
                    // write in its pre-image: write the pending ones first.
                    if ranges.iter().any(|&(x, y)| a < y && x < b) {
                        self.write_pending(ops, &mut pending)?;
                        ranges.clear();
                    }
                    // Copy on first write per interval: a range overwritten
                    // before since the last point already has, in the
                    // journal, the pre-image every point needs; this one
                    // goes to the batch journal, for a rollback only.
                    let first = if self.no_cofw { vec![(a, b)] } else { self.cofw.uncovered(a, b) };
                    let mut at = a;
                    let mut parts: Vec<(u64, u64, bool)> = Vec::new();
                    for (x, y) in first {
                        if x > at {
                            parts.push((at, x, false));
                        }
                        parts.push((x, y, true));
                        at = y;
                    }
                    if at < b {
                        parts.push((at, b, false));
                    }
                    for (x, y, keep) in parts {
                        let j = if keep { &mut self.journal } else { &mut self.batch };
                        if is_hole(&self.replica, x, y) {
                            j.undo_zero(op.seq(), x, (y - x) as u32);
                        } else {
                            let mut pre = vec![0u8; (y - x) as usize];
                            self.replica.read_exact_at(&mut pre, x).map_err(ioe(self.paths.replica.display()))?;
                            j.undo(op.seq(), x, &pre);
                        }
                    }
                    self.cofw.insert(a, b);
                    pending.push(i);
                    ranges.push((a, b));
                }
                None => {
                    if let Op::Tag { seq, time_ns, kind } = op {
                        tags.push((*seq, *time_ns, *kind, self.journal.end()));
                        // A new interval: the first write of each range
                        // after this point needs its pre-image kept.
                        self.cofw = Default::default();
                    }
                }
            }
        }
        self.write_pending(ops, &mut pending)?;
        self.replica.sync_data().map_err(ioe(self.paths.replica.display()))?;
        let last = ops.last().map_or(self.durable_seq, Op::seq);
        self.journal.commit(last);
        self.journal.sync()?;
        self.durable_seq = last;
        self.commit_end = self.journal.end();
        // The sums of the chunks the batch touched; the mark follows at most
        // once a second (sums.rs).
        if let Some(sums) = &self.sums {
            let ranges: Vec<(u64, u64)> = ops.iter().filter_map(Op::range).collect();
            sums.update(&self.replica, &ranges)?;
            self.sums_dirty = true;
            if self.sums_synced.elapsed() >= std::time::Duration::from_secs(1) {
                self.sync_sums()?;
            }
        }
        let mut points = Vec::new();
        for (seq, t, k, pos) in tags {
            let (catalog, dir) = (&mut self.catalog, &self.paths.dir);
            let p = crate::reserve::retry(dir, || catalog.append(seq, t, k, pos), crate::reserve::is_enospc);
            points.push(p.map_err(ioe(self.paths.points.display()))?);
        }
        if !points.is_empty() {
            self.catalog.sync().map_err(ioe(self.paths.points.display()))?;
        }
        self.warn_if_space_low();
        self.failed = false;
        if !points.is_empty() {
            // The batch is durable and acknowledged from here on: retention
            // failing must not fail it (it would be applied again).
            if let Err(e) = self.retain() {
                log::warn!("disk {}: retention: {e}", self.name);
            }
        }
        Ok(points)
    }

    /// Make the replica's sums durable and move their mark to the durable
    /// state (sums.rs). At most once a second while batches come, on the
    /// agent's idle PING, before retention punches the journal, and when the
    /// stream ends.
    pub fn sync_sums(&mut self) -> Result<(), DiskError> {
        if !self.sums_dirty {
            return Ok(());
        }
        if let Some(sums) = &self.sums {
            sums.sync()?;
            sums.set_mark(crate::sums::Mark { durable_seq: self.durable_seq, journal_end: self.commit_end })?;
            sums.sync()?;
        }
        self.sums_dirty = false;
        self.sums_synced = std::time::Instant::now();
        Ok(())
    }

    /// Warn (at most once a minute) when the data folder's filesystem has
    /// less than a tenth, or less than 1 GiB, free: the journal stops
    /// growing when it is full, and replication with it.
    fn warn_if_space_low(&mut self) {
        if self.last_space_check.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60)) {
            return;
        }
        self.last_space_check = Some(std::time::Instant::now());
        if let Some((free, total)) = crate::verify::fs_space(&self.paths.dir) {
            if free < total / 10 || free < 1 << 30 {
                log::warn!(
                    "disk {}: the data folder's filesystem has {free} bytes free of {total}: when it is full this disk's replication \
                     stops (nothing is lost; the agent keeps its changes); tighten retention (ferry retention --journal-cap) or add space",
                    self.name
                );
            }
        }
    }

    /// Apply the disk's retention policy (crate::retention), at most once a
    /// second.
    pub fn retain(&mut self) -> Result<crate::retention::Pass, DiskError> {
        if self.last_retention.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return Ok(Default::default());
        }
        self.last_retention = Some(std::time::Instant::now());
        // Punching the journal must not leave the sums' mark before the
        // punched part (open_sums reads the journal from the mark's interval).
        self.sync_sums()?;
        let (points, _) = crate::catalog::read_points(&self.paths.points).map_err(ioe(self.paths.points.display()))?;
        let end = self.journal.end();
        let (catalog, path) = (&mut self.catalog, self.paths.points.clone());
        let pass = crate::retention::apply(&self.paths, self.size, &points, end, |keep| catalog.rewrite(&path, keep))?;
        if pass.dropped > 0 {
            log::info!("disk {}: retention dropped {} points, {} kept", self.name, pass.dropped, pass.kept);
            crate::reserve::ensure(&self.paths.dir);
        }
        Ok(pass)
    }

    /// Content for a REF frame: the `len` bytes at `src` in the replica, if
    /// their BLAKE3 is `digest` (the range may have been overwritten since
    /// the agent sent it; then `None`).
    pub fn resolve_ref(&self, src: u64, len: u32, digest: &[u8; 32]) -> Result<Option<Vec<u8>>, DiskError> {
        if src + u64::from(len) > self.size {
            return Ok(None);
        }
        let data = self.read_replica(src, len as usize)?;
        Ok((blake3::hash(&data).as_bytes() == digest).then_some(data))
    }

    /// xxh3-128 of `count` chunks of `chunk` bytes from `offset`; a chunk
    /// that reaches past the end of the disk hashes only the part inside.
    pub fn sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<Vec<[u8; 16]>, DiskError> {
        let step = (4usize << 20).max(chunk as usize) / chunk as usize * chunk as usize;
        if self.scratch.len() < step {
            self.scratch.resize(step, 0);
        }
        let end = self.size.min(offset + u64::from(chunk) * u64::from(count));
        let mut out = Vec::with_capacity(count as usize);
        let mut pos = offset;
        while pos < end {
            let n = ((end - pos) as usize).min(step);
            self.replica.read_exact_at(&mut self.scratch[..n], pos).map_err(ioe(self.paths.replica.display()))?;
            out.extend(self.scratch[..n].chunks(chunk as usize).map(ferry_common::xxh128));
            pos += n as u64;
        }
        // A scan walks the disk in order: ask the kernel to read ahead.
        if end < self.size && end - offset >= 1 << 20 {
            // SAFETY: posix_fadvise on an fd we own; advice only, no memory passed.
            unsafe { libc::posix_fadvise(self.replica.as_raw_fd(), end as libc::off_t, 16 << 20, libc::POSIX_FADV_WILLNEED) };
        }
        Ok(out)
    }
}

/// Whether `[a, b)` of `f` lies entirely in a hole (so reads as zero without
/// being read). Errors answer "no": the caller then reads the range.
fn is_hole(f: &File, a: u64, b: u64) -> bool {
    // SAFETY: lseek on an fd we own; no memory is passed.
    let d = unsafe { libc::lseek(f.as_raw_fd(), a as libc::off_t, libc::SEEK_DATA) };
    if d < 0 {
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    d as u64 >= b
}

/// Make `[offset, offset+len)` read as zero, as a hole where possible.
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(f.as_raw_fd(), flags, offset as i64, len as i64).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(4 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Bring a folder whose writer lock the caller holds to its durable state:
/// check the replica's durable mark against the journal, roll back an
/// uncommitted batch, and hash again the chunks whose sums may not have
/// reached the disk. When there is anything to do, it is done under the
/// recovery lock (exclusive: no recovery copies meanwhile) and the apply lock
/// (exclusive: no check of a chunk against its sum meanwhile), taken in that
/// order (a recovery takes them in the same order). Returns the durable
/// sequence and the open sums.
fn reconcile(
    paths: &Paths,
    name: &str,
    size: u64,
    replica: &File,
    journal: &mut Journal,
    batch: &mut Journal,
    points: &[Point],
) -> Result<(u64, Option<crate::sums::Sums>), DiskError> {
    // Everything before the newest point's journal position is committed
    // (the point was recorded after its batch's COMMIT), so the repair reads
    // only the journal after it.
    let from = points.last().map_or(crate::journal::HEADER_LEN, |p| p.journal_pos);
    // Before the repair touches anything: records missing at the end of the
    // journal would make it roll back committed data.
    check_mark(paths, name, size)?;
    // FERRY_NO_SUMS=1 (benchmark knob): no sums kept or checked at all.
    let no_sums = std::env::var_os("FERRY_NO_SUMS").is_some_and(|v| v == "1");
    // Held from a repair that acts (or, with nothing to repair, for sums to
    // hash again) until the sums agree with the replica.
    let mut held = None;
    let durable_seq = repair(paths, replica, journal, batch, from, &mut held).map_err(|e| match e {
        DiskError::Damaged { why, .. } => DiskError::Damaged { name: name.into(), why },
        e => e,
    })?;
    let _held = match held {
        None if !no_sums && sums_stale(paths, size)? => Some(lock_exclusive(paths)?),
        held => held,
    };
    if no_sums {
        let _ = fs::remove_file(&paths.sums);
        return Ok((durable_seq, None));
    }
    let sums = open_sums(paths, name, replica, size, durable_seq, journal.end(), points)?;
    Ok((durable_seq, Some(sums)))
}

/// The recovery lock, then the apply lock, both exclusive (the order a
/// recovery takes them in, shared): no recovery copies, and no chunk is
/// checked against its sum, while the folder is brought to its durable
/// state. Released when dropped (the files close).
struct Exclusive {
    _recoveries: File,
    _applying: crate::sums::ApplyLock,
}

fn lock_exclusive(paths: &Paths) -> Result<Exclusive, DiskError> {
    let recoveries = lock_recoveries(paths, libc::LOCK_EX)?;
    let applying = crate::sums::ApplyLock::open(&paths.dir).map_err(ioe(paths.dir.join("apply.lock").display()))?;
    applying.lock_exclusive().map_err(ioe("apply.lock"))?;
    Ok(Exclusive { _recoveries: recoveries, _applying: applying })
}

/// Whether the replica's sums may be behind the replica (no valid mark, or
/// a mark older than the journal's last COMMIT).
fn sums_stale(paths: &Paths, size: u64) -> Result<bool, DiskError> {
    let Ok(Some(s)) = crate::sums::Sums::open(&paths.sums, size, false) else { return Ok(true) };
    let Ok(Some(m)) = s.mark() else { return Ok(true) };
    let r = JournalReader::open(&paths.journal)?;
    let len = r.file_len()?;
    // The mark's COMMIT is in the journal (check_mark); stale when another
    // valid COMMIT follows it.
    Ok(len > m.journal_end && r.scan(m.journal_end)?.iter().any(|x| x.kind == KIND_COMMIT))
}

/// `ferry recover`, `verify`, `export` and `retention` with no master target
/// serving the disk: bring the folder to its durable state first (what a
/// master target does when a stream opens), so that a folder left by a crash
/// is not taken for damaged. Does nothing when a master target holds the
/// disk (it reconciled it when the stream opened), or when the folder cannot
/// be written (a read-only copy: then its checks report what they find).
pub fn settle(data: &Path, name: &str) -> Result<(), DiskError> {
    let p = Paths::new(data, name);
    let meta = read_meta(data, name)?;
    let _writer = match lock(&p, name) {
        Ok(l) => l,
        Err(DiskError::Busy(_)) => return Ok(()),
        Err(DiskError::Io(e)) => {
            log::debug!("disk {name}: not settled (cannot take its writer lock: {e})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    settle_held(&p, name, meta.size)
}

/// [`settle`] for a caller that holds the disk's writer lock.
pub fn settle_held(p: &Paths, name: &str, size: u64) -> Result<(), DiskError> {
    let replica = match OpenOptions::new().read(true).write(true).open(&p.replica) {
        Ok(f) => f,
        Err(e) => {
            log::debug!("disk {name}: not settled ({}: {e})", p.replica.display());
            return Ok(());
        }
    };
    let (points, _) = crate::catalog::read_points(&p.points).map_err(ioe(p.points.display()))?;
    let mut journal = Journal::open(&p.journal)?;
    let mut batch = Journal::open(&p.batch)?;
    // Leaves the sums' mark at the durable state (open_sums).
    reconcile(p, name, size, &replica, &mut journal, &mut batch, &points)?;
    Ok(())
}

/// Start-up repair: undo what the last, uncommitted batch may have written,
/// and cut the journal after the last COMMIT. Returns the durable sequence.
/// When there is anything to undo or cut, it is done holding
/// [`lock_exclusive`], left in `held` for the caller.
fn repair(
    paths: &Paths,
    replica: &File,
    journal: &mut Journal,
    batch: &mut Journal,
    from: u64,
    held: &mut Option<Exclusive>,
) -> Result<u64, DiskError> {
    let reader = JournalReader::open(&paths.journal)?;
    let mut recs = reader.scan(from)?;
    if from > crate::journal::HEADER_LEN && !recs.iter().any(|r| r.kind == KIND_COMMIT) {
        log::warn!("{}: no commit after the newest point's journal position; reading the whole journal", paths.dir.display());
        recs = reader.scan(0)?;
    }
    let file_len = reader.file_len()?;
    let valid_end = recs.last().map_or(from.max(crate::journal::HEADER_LEN), |r| r.end);
    if valid_end < file_len {
        // Only the part written after the last fdatasync can be torn, and a
        // batch is at most 16 MiB of pre-images: a longer invalid tail, or a
        // valid COMMIT after the invalid record, means damage, not a crash.
        let damaged = |why: String| DiskError::Damaged { name: String::new(), why };
        if file_len - valid_end > 64 << 20 {
            return Err(damaged(format!("the undo journal is unreadable at byte {valid_end} of {file_len}")));
        }
        if reader.commit_after(valid_end)? {
            return Err(damaged(format!("the undo journal has a bad record at byte {valid_end} followed by committed records")));
        }
    }
    if from > valid_end {
        return Err(DiskError::Damaged {
            name: String::new(),
            why: format!("the newest recovery point refers to journal byte {from}, past its end"),
        });
    }
    let last_commit = recs.iter().rposition(|r| r.kind == KIND_COMMIT);
    let (durable, cut) = match last_commit {
        Some(i) => (recs[i].seq, recs[i].end),
        None => (0, crate::journal::HEADER_LEN),
    };
    let tail = &recs[last_commit.map_or(0, |i| i + 1)..];
    // The uncommitted batch's pre-images are in both journals: undo them
    // together, newest frame first (each frame's parts are disjoint).
    let breader = JournalReader::open(&paths.batch)?;
    let brecs: Vec<_> = breader.scan(0)?.into_iter().filter(|r| r.seq > durable).collect();
    let mut undo: Vec<(u64, bool, crate::journal::RecordInfo)> = tail
        .iter()
        .filter(|r| r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO)
        .map(|r| (r.seq, false, *r))
        .chain(brecs.iter().filter(|r| r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO).map(|r| (r.seq, true, *r)))
        .collect();
    undo.sort_by_key(|u| std::cmp::Reverse(u.0));
    if !undo.is_empty() || !tail.is_empty() || file_len != cut {
        // Recoveries in progress copy the replica expecting the journal as
        // it is: wait for them before undoing and cutting (see recover.rs).
        if held.is_none() {
            *held = Some(lock_exclusive(paths)?);
        }
        for (_, in_batch, r) in &undo {
            let data = if *in_batch { breader.data(r) } else { reader.data(r) }.map_err(ioe(paths.journal.display()))?;
            replica.write_all_at(&data, r.offset).map_err(ioe(paths.replica.display()))?;
        }
        log::warn!(
            "{}: rolled back {} uncommitted journal records ({} of them in the batch journal) and cut {} bytes of journal tail; \
             durable up to seq {durable}",
            paths.dir.display(),
            undo.len(),
            brecs.len(),
            file_len - cut
        );
        replica.sync_data().map_err(ioe(paths.replica.display()))?;
        journal.truncate(cut)?;
        batch.truncate(crate::journal::HEADER_LEN)?;
    }
    Ok(durable)
}

/// The journal must still hold the COMMIT the replica's durable mark names
/// (sums.rs): a journal cut short or replaced has lost the pre-images of
/// committed batches, and no point can be vouched for. O(1): one record.
pub fn check_mark(p: &Paths, name: &str, size: u64) -> Result<(), DiskError> {
    let Ok(Some(s)) = crate::sums::Sums::open(&p.sums, size, false) else { return Ok(()) };
    let Ok(Some(m)) = s.mark() else { return Ok(()) };
    if m.journal_end <= crate::journal::HEADER_LEN {
        return Ok(());
    }
    let j = JournalReader::open(&p.journal)?;
    let len = j.file_len()?;
    let at = m.journal_end.saturating_sub(48);
    match j.record_at(at, len) {
        Some(r) if r.kind == KIND_COMMIT && r.seq == m.durable_seq && r.end == m.journal_end => Ok(()),
        _ => Err(DiskError::Damaged {
            name: name.into(),
            why: format!(
                "{} has {len} bytes and no commit of seq {} at byte {at}, where the replica's durable mark puts it: records \
                 are missing at the end of the journal, so no recovery point can be vouched for",
                p.journal.display(),
                m.durable_seq
            ),
        }),
    }
}

impl From<crate::sums::SumsError> for DiskError {
    fn from(e: crate::sums::SumsError) -> DiskError {
        DiskError::Io(e.to_string())
    }
}

/// Open the replica's sums at start and bring them to the durable state:
/// built from the replica when missing or unreadable; the one batch that
/// committed without its sums hashed again; a mark past the journal's end
/// is damage (records missing at the end of the journal).
fn open_sums(
    p: &Paths,
    name: &str,
    replica: &File,
    size: u64,
    durable: u64,
    journal_end: u64,
    points: &[Point],
) -> Result<crate::sums::Sums, DiskError> {
    use crate::sums::{Mark, Sums};
    let now = Mark { durable_seq: durable, journal_end };
    let s = match Sums::open(&p.sums, size, true) {
        Ok(Some(s)) => s,
        Ok(None) => {
            log::info!("disk {name}: building replica.sums from the replica (a folder from an older ferry, or a new one)");
            return Ok(Sums::build(&p.sums, replica, size, now)?);
        }
        Err(e) => {
            log::warn!("disk {name}: {e}; building replica.sums again from the replica");
            return Ok(Sums::build(&p.sums, replica, size, now)?);
        }
    };
    let m = match s.mark()? {
        Some(m) => m,
        None => {
            log::warn!("disk {name}: replica.sums has no valid mark; building it again from the replica");
            return Ok(Sums::build(&p.sums, replica, size, now)?);
        }
    };
    if m.durable_seq > durable || m.journal_end > journal_end {
        return Err(DiskError::Damaged {
            name: name.into(),
            why: format!(
                "{} ends at byte {journal_end} (durable to seq {durable}) but the replica is durable to seq {} at journal byte {}: \
                 records are missing at the end of the journal, so no recovery point can be vouched for",
                p.journal.display(),
                m.durable_seq,
                m.journal_end
            ),
        });
    }
    if m.durable_seq < durable {
        // Batches committed after the mark may have sums that never reached
        // the disk. Every range written since the interval (between two
        // points) that holds the mark has a record in journal.fj from that
        // interval's start on (copy on first write keeps the first overwrite
        // of each range there), and the batch in progress has the rest in
        // batch.fj: hash all of those again.
        let from = points.iter().map(|q| q.journal_pos).filter(|&pos| pos <= m.journal_end).max().unwrap_or(crate::journal::HEADER_LEN);
        let mut ranges = Vec::new();
        for r in JournalReader::open(&p.journal)?.scan(from)? {
            if r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO {
                ranges.push((r.offset, r.offset + u64::from(r.len)));
            }
        }
        if p.batch.exists() {
            for r in JournalReader::open(&p.batch)?.scan(0)? {
                if r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO {
                    ranges.push((r.offset, r.offset + u64::from(r.len)));
                }
            }
        }
        log::info!(
            "disk {name}: hashing again {} ranges written after the replica sums' last mark (seq {} to {durable})",
            ranges.len(),
            m.durable_seq
        );
        s.update(replica, &ranges)?;
    }
    if m != now {
        s.set_mark(now)?;
        s.sync()?;
    }
    Ok(s)
}

/// Take the folder's recovery lock (`LOCK_SH` for a recovery, `LOCK_EX` for
/// a repair that rewrites the replica and cuts the journal). Blocks.
pub fn lock_recoveries(paths: &Paths, how: i32) -> Result<File, DiskError> {
    let p = paths.dir.join("recover.lock");
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(&p).map_err(ioe(p.display()))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
        return Err(ioe(p.display())(io::Error::last_os_error()));
    }
    Ok(f)
}

/// Parse a stored generation.
pub fn parse_generation(m: &Meta) -> Option<[u8; 16]> {
    unhex::<16>(&m.generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that keeps every point: these tests cut points at times near
    /// the epoch, which the default retention would drop as too old.
    pub(super) fn open(d: &Path) -> Disk {
        let disk = Disk::open(d, "d", 1 << 20, [1; 16]).unwrap().0;
        crate::retention::store(&disk.paths, &crate::retention::Policy::keep_everything()).unwrap();
        disk
    }

    pub(super) fn replica(d: &Path) -> Vec<u8> {
        fs::read(d.join("d").join("replica.img")).unwrap()
    }

    /// Invariant 4: a batch cut short after its pre-images were journaled and
    /// part of the replica was overwritten is rolled back at the next open.
    #[test]
    fn uncommitted_batch_is_rolled_back_on_open() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 8192] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        let committed = replica(t.path());
        // Simulate a crash mid-batch: pre-images durable, replica partly
        // written, no COMMIT.
        disk.journal.undo(3, 4096, &committed[4096..12288]);
        disk.journal.sync().unwrap();
        disk.replica.write_all_at(&[9; 4096], 4096).unwrap();
        drop(disk);
        let disk = open(t.path());
        assert_eq!(disk.durable_seq, 2);
        assert_eq!(replica(t.path()), committed);
        // The journal now ends at the last COMMIT: no seq-3 record is left.
        let recs = JournalReader::open(&disk.paths.journal).unwrap().scan(0).unwrap();
        assert!(recs.iter().all(|r| r.seq <= 2), "{recs:?}");
    }

    /// Copy on first write per interval: a block overwritten many times
    /// between two points costs one pre-image in the journal, and every
    /// point still recovers exactly.
    #[test]
    fn hot_blocks_keep_one_pre_image_per_interval() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        let mut seqs = 1u64..;
        let mut want = Vec::new();
        for round in 0..4u8 {
            // 200 rewrites of the same two blocks, in batches of 10.
            for b in 0..20u8 {
                let ops: Vec<Op> = (0..10u8)
                    .map(|i| Op::Write { seq: seqs.next().unwrap(), offset: u64::from(i % 2) * 4096, data: vec![round * 50 + b + i; 4096] })
                    .collect();
                disk.apply(&ops).unwrap();
            }
            want.push(replica(t.path()));
            disk.apply(&[Op::Tag { seq: seqs.next().unwrap(), time_ns: u64::from(round), kind: PointKind::Crash }]).unwrap();
        }
        let undo: Vec<_> = JournalReader::open(&disk.paths.journal)
            .unwrap()
            .scan(0)
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO)
            .collect();
        // Two blocks, one pre-image each per interval (4 intervals), not 800.
        assert_eq!(undo.len(), 8, "{} pre-images journaled", undo.len());
        let pts = crate::catalog::read_points(&disk.paths.points).unwrap().0;
        let out = t.path().join("out.img");
        for (p, w) in pts.iter().zip(&want) {
            crate::recover::recover(t.path(), "d", p, &out, crate::recover::Format::Raw).unwrap();
            assert!(fs::read(&out).unwrap() == *w, "point {} differs", p.id);
        }
    }

    /// A batch cut short whose pre-images went partly to the batch journal
    /// (ranges already written since the last point) is rolled back from
    /// both journals.
    #[test]
    fn a_torn_batch_rolls_back_from_both_journals() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 8192] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        disk.apply(&[Op::Write { seq: 3, offset: 0, data: vec![2; 8192] }]).unwrap();
        let committed = replica(t.path());
        // Crash mid-batch: seq 4 rewrites [0, 8192) (in the interval's set:
        // its pre-image goes to the batch journal) and [8192, 12288) (a
        // first write: the journal); both durable, the replica written, no
        // COMMIT.
        disk.batch.reset().unwrap();
        disk.batch.undo(4, 0, &committed[0..8192]);
        disk.batch.sync().unwrap();
        disk.journal.undo(4, 8192, &committed[8192..12288]);
        disk.journal.sync().unwrap();
        disk.replica.write_all_at(&[9; 12288], 0).unwrap();
        drop(disk);
        let disk = open(t.path());
        assert_eq!(disk.durable_seq, 3);
        assert_eq!(replica(t.path()), committed);
        let b = JournalReader::open(&disk.paths.batch).unwrap().scan(0).unwrap();
        assert!(b.is_empty(), "the batch journal is emptied by the repair: {b:?}");
    }

    #[test]
    fn overlapping_ops_in_one_batch_keep_each_pre_image() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = open(t.path());
        disk.apply(&[
            Op::Write { seq: 1, offset: 0, data: vec![1; 4096] },
            Op::Tag { seq: 2, time_ns: 1, kind: PointKind::Crash },
            Op::Write { seq: 3, offset: 0, data: vec![2; 4096] },
            Op::Tag { seq: 4, time_ns: 2, kind: PointKind::Crash },
            Op::Write { seq: 5, offset: 0, data: vec![3; 4096] },
        ])
        .unwrap();
        let pts = crate::catalog::read_points(&disk.paths.points).unwrap().0;
        assert_eq!(pts.len(), 2);
        let out = t.path().join("out.img");
        for (p, want) in pts.iter().zip([1u8, 2]) {
            crate::recover::recover(t.path(), "d", p, &out, crate::recover::Format::Raw).unwrap();
            let got = fs::read(&out).unwrap();
            assert!(got[..4096].iter().all(|&b| b == want), "point {} should hold {want}", p.id);
        }
    }
}

#[cfg(test)]
mod damage_tests {
    use super::*;

    fn two_batches(d: &Path) -> PathBuf {
        let (mut disk, _) = Disk::open(d, "d", 1 << 20, [1; 16]).unwrap();
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 4096] }]).unwrap();
        disk.apply(&[Op::Write { seq: 2, offset: 0, data: vec![2; 4096] }, Op::Tag { seq: 3, time_ns: 1, kind: PointKind::Crash }])
            .unwrap();
        disk.apply(&[Op::Write { seq: 4, offset: 0, data: vec![4; 4096] }]).unwrap();
        disk.paths.journal.clone()
    }

    /// File position of the first record with `seq`.
    fn pos_of(j: &Path, seq: u64) -> u64 {
        JournalReader::open(j).unwrap().scan(0).unwrap().iter().find(|r| r.seq == seq).unwrap().pos
    }

    #[test]
    fn damage_before_a_commit_is_refused_not_truncated() {
        let t = tempfile::tempdir().unwrap();
        let j = two_batches(t.path());
        let len = fs::metadata(&j).unwrap().len();
        // Flip a byte in the UNDO record of seq 4, after the newest point
        // and before the COMMIT of seq 4.
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.write_all_at(&[0xee], pos_of(&j, 4) + 9).unwrap();
        let err = Disk::open(t.path(), "d", 1 << 20, [1; 16]).err().expect("must refuse");
        assert!(matches!(err, DiskError::Damaged { .. }), "{err}");
        assert_eq!(fs::metadata(&j).unwrap().len(), len, "nothing was cut");
        // Recovery of the point, which needs that record, refuses too.
        let pts = crate::catalog::read_points(&t.path().join("d").join("points.log")).unwrap().0;
        let r = crate::recover::recover(t.path(), "d", &pts[0], &t.path().join("out"), crate::recover::Format::Raw);
        assert!(matches!(r, Err(crate::recover::RecoverError::Disk(DiskError::Damaged { .. }))), "{r:?}");
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_disk_opens() {
        let t = tempfile::tempdir().unwrap();
        let j = two_batches(t.path());
        let len = fs::metadata(&j).unwrap().len();
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.write_all_at(&[0x55; 40], len).unwrap(); // half a record after the last COMMIT
        let (disk, _) = Disk::open(t.path(), "d", 1 << 20, [1; 16]).unwrap();
        assert_eq!(disk.durable_seq, 4);
        assert_eq!(fs::metadata(&j).unwrap().len(), len);
    }

    #[test]
    fn a_missing_journal_with_points_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let j = two_batches(t.path());
        fs::remove_file(j).unwrap();
        assert!(matches!(Disk::open(t.path(), "d", 1 << 20, [1; 16]), Err(DiskError::Damaged { .. })));
    }

    /// A master target killed mid-batch, and no stream ever opens the disk
    /// again (the source site is gone): `ferry verify` (and every recovery)
    /// settles the folder first, rolling back the torn batch, instead of
    /// calling the chunks it had overwritten damaged.
    #[test]
    fn a_folder_left_mid_batch_settles_instead_of_reading_as_damaged() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = super::tests::open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 8192] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        disk.sync_sums().unwrap();
        let committed = super::tests::replica(t.path());
        disk.journal.undo(3, 0, &committed[0..4096]);
        disk.journal.sync().unwrap();
        disk.replica.write_all_at(&[9; 4096], 0).unwrap();
        disk.failed = true; // a crash: nothing more is made durable
        drop(disk);
        let o = crate::verify::verify(t.path(), "d", 0).unwrap();
        assert!(o.ok(), "{:?}", o.damage);
        assert_eq!(super::tests::replica(t.path()), committed, "the torn batch was rolled back");
    }

    /// Sums written after the last mark that never reached the disk (a
    /// power cut): settling hashes again every range of the mark's interval,
    /// so verify finds nothing wrong with a healthy replica.
    #[test]
    fn sums_lost_after_the_mark_are_hashed_again() {
        let t = tempfile::tempdir().unwrap();
        let mut disk = super::tests::open(t.path());
        disk.apply(&[Op::Write { seq: 1, offset: 0, data: vec![1; 4096] }, Op::Tag { seq: 2, time_ns: 5, kind: PointKind::Crash }])
            .unwrap();
        disk.sync_sums().unwrap();
        // Two more batches, the second rewriting a range of the first (its
        // pre-image goes to the batch journal), sums not made durable.
        disk.apply(&[Op::Write { seq: 3, offset: 200 << 10, data: vec![3; 4096] }]).unwrap();
        disk.apply(&[Op::Write { seq: 4, offset: 200 << 10, data: vec![4; 4096] }, Op::Write { seq: 5, offset: 0, data: vec![5; 4096] }])
            .unwrap();
        let sums_path = disk.paths.sums.clone();
        disk.failed = true;
        drop(disk);
        // The power cut: the sums of chunks 0 and 3 are as they were before.
        let f = OpenOptions::new().write(true).open(&sums_path).unwrap();
        f.write_all_at(&[0u8; 16], 4096 + 3 * 16).unwrap();
        f.write_all_at(&crate::sums::chunk_sum(&[1u8; 4096].iter().copied().chain([0u8; 61440]).collect::<Vec<_>>()), 4096).unwrap();
        let o = crate::verify::verify(t.path(), "d", 0).unwrap();
        assert!(o.ok(), "{:?}", o.damage);
        // And a flipped replica byte is still found after all that.
        let r = OpenOptions::new().write(true).open(t.path().join("d").join("replica.img")).unwrap();
        r.write_all_at(&[0xee], 100 << 10).unwrap();
        let o = crate::verify::verify(t.path(), "d", 0).unwrap();
        assert_eq!(o.damage.len(), 1, "{:?}", o.damage);
        assert_eq!(o.damage[0].offset, 64 << 10);
    }
}
