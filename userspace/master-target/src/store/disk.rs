//! One protected disk open for a stream, and applying the stream to it
//! durably (the crash ordering of one batch is in the crate's note).
//!
//! The folder's files are described in folder.rs. A stream holds the
//! folder's [`WriterLock`] for as long as it is open; a second stream for
//! the same disk (from this or another process) is refused as busy.
//! Readers (`ferry points`, `ferry recover`) take no writer lock: the
//! journal's write-ahead order makes a replica read followed by a journal
//! read consistent (see journal.rs, recover.rs).

use super::catalog::{Catalog, Point};
use super::folder::{check_complete, ioe, read_meta, DiskError, Meta, Paths, MAX_DISK, META_KIND, META_VERSION};
use super::journal::Journal;
use super::lock::{ApplyLock, WriterLock};
use super::ranges::{is_hole, zero_range, RangeSet};
use super::{failover, reserve, retention, settle, sums};
use ferry_common::durable::{hex, read_state, write_state};
use ferry_proto::PointKind;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

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
    pub(super) paths: Paths,
    pub(super) replica: File,
    pub(super) journal: Journal,
    /// The batch journal: pre-images of ranges already journaled since the
    /// last point (copy on first write per interval), kept only until the
    /// batch commits, for its rollback.
    pub(super) batch: Journal,
    /// Ranges whose pre-image since the last point is in the journal.
    cofw: RangeSet,
    last_retention: Option<std::time::Instant>,
    last_space_check: Option<std::time::Instant>,
    /// Sums written since their mark was last made durable.
    sums_dirty: bool,
    sums_synced: std::time::Instant,
    /// The journal's end right after its last COMMIT (what the mark names).
    commit_end: u64,
    /// FERRY_NO_COFW=1 (benchmark only, ferry_common::testing): journal
    /// every overwrite, as before copy on first write per interval, to
    /// measure what it saves.
    no_cofw: bool,
    catalog: Catalog,
    /// Chunk sums of the replica, updated after every COMMIT.
    sums: Option<sums::Sums>,
    /// Held from a batch's first replica write until its sums are written.
    apply_lock: std::sync::Arc<ApplyLock>,
    pub durable_seq: u64,
    /// Metadata to write before the first batch (a new generation).
    new_meta: Option<Meta>,
    /// Reused read buffer for checksums.
    scratch: Vec<u8>,
    /// An apply failed part-way: the replica and journal are in an unknown
    /// state until the folder is reopened (and repaired).
    pub(super) failed: bool,
    _lock: WriterLock,
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
            return Err(DiskError::TooLarge { name: name.into(), size, max: MAX_DISK });
        }
        fs::create_dir_all(&paths.dir).map_err(ioe(paths.dir.display()))?;
        failover::refuse_if_failed_over(&paths, name)?;
        let lockf = WriterLock::take(&paths, name)?;
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
        let (durable_seq, sums) = settle::reconcile(&paths, name, size, &replica, &mut journal, &mut batch, &points)?;
        reserve::ensure(&paths.dir);
        let commit_end = journal.end();
        let apply_lock = ApplyLock::open(&paths.dir).map_err(ioe(paths.dir.join("apply.lock").display()))?;
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
            no_cofw: ferry_common::testing::get().no_cofw,
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

    /// Start reading, all at once and in order, what the batch is about to
    /// read from the replica one range at a time: the pre-images for the
    /// journals (the blocks the writes cover; the sums hash the written
    /// blocks afterwards, from the page cache). Cold, those synchronous
    /// reads one after another were most of a batch's time (the bpf
    /// tracker's `--once`); the kernel now has them in flight together
    /// (POSIX_FADV_WILLNEED queues the reads and does not wait). Pages
    /// already cached cost a lookup. Advice only: nothing about what is
    /// read or written changes.
    fn prefetch(&self, ops: &[Op]) {
        let chunk = sums::BLOCK;
        let mut want: Vec<(u64, u64)> = ops
            .iter()
            .filter(|op| matches!(op, Op::Write { .. }))
            .filter_map(Op::range)
            .map(|(a, b)| (a / chunk * chunk, b.div_ceil(chunk).saturating_mul(chunk).min(self.size)))
            .collect();
        if want.len() < 2 {
            return;
        }
        want.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(want.len());
        for (a, b) in want {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (a, b) in merged {
            // SAFETY: posix_fadvise on an fd we own; advice only, no memory passed.
            unsafe { libc::posix_fadvise(self.replica.as_raw_fd(), a as libc::off_t, (b - a) as libc::off_t, libc::POSIX_FADV_WILLNEED) };
        }
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
        failover::refuse_if_failed_over(&self.paths, &self.name)?;
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
        self.prefetch(ops);
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
            let p = reserve::retry(dir, || catalog.append(seq, t, k, pos), reserve::is_enospc);
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
            sums.set_mark(sums::Mark { durable_seq: self.durable_seq, journal_end: self.commit_end })?;
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
        if let Some((free, total)) = reserve::fs_space(&self.paths.dir) {
            if free < total / 10 || free < 1 << 30 {
                log::warn!(
                    "disk {}: the data folder's filesystem has {free} bytes free of {total}: when it is full this disk's replication \
                     stops (nothing is lost; the agent keeps its changes); tighten retention (ferry retention --journal-cap) or add space",
                    self.name
                );
            }
        }
    }

    /// Apply the disk's retention policy (retention.rs), at most once a
    /// second.
    pub fn retain(&mut self) -> Result<retention::Pass, DiskError> {
        if self.last_retention.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return Ok(Default::default());
        }
        self.last_retention = Some(std::time::Instant::now());
        // Punching the journal must not leave the sums' mark before the
        // punched part (open_sums reads the journal from the mark's interval).
        self.sync_sums()?;
        let (points, _) = super::catalog::read_points(&self.paths.points).map_err(ioe(self.paths.points.display()))?;
        let end = self.journal.end();
        let (catalog, path) = (&mut self.catalog, self.paths.points.clone());
        let pass = retention::apply(&self.paths, self.size, &points, end, |keep| catalog.rewrite(&path, keep))?;
        if pass.dropped > 0 {
            log::info!("disk {}: retention dropped {} points, {} kept", self.name, pass.dropped, pass.kept);
            reserve::ensure(&self.paths.dir);
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

/// `ferry retention` with no master target: take the disk's writer lock
/// (None if a stream holds it), settle the folder, and apply the policy.
pub fn retain_offline(data: &Path, name: &str) -> Result<Option<retention::Pass>, DiskError> {
    let meta = read_meta(data, name)?;
    let paths = Paths::new(data, name);
    let _lock = match WriterLock::take(&paths, name) {
        Ok(l) => l,
        Err(DiskError::Busy(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (points, _) = super::catalog::read_points(&paths.points).map_err(ioe(paths.points.display()))?;
    // The sums' mark must not be left before the part of the journal about
    // to be punched (settle.rs open_sums reads the journal from its interval).
    let size = read_meta(data, name)?.size;
    settle::settle_held(&paths, name, size)?;
    let end = std::fs::metadata(&paths.journal).map(|m| m.len()).unwrap_or(0);
    let (mut catalog, _) = Catalog::open(&paths.points).map_err(ioe(paths.points.display()))?;
    let points_path = paths.points.clone();
    retention::apply(&paths, meta.size, &points, end, |keep| catalog.rewrite(&points_path, keep)).map(Some)
}
