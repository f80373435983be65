//! A recovery point read in place, without materializing it: what `ferry
//! export` serves.
//!
//! A byte's value at point S is its value in the live replica, unless a
//! frame after S overwrote it; then it is the pre-image kept by the first
//! UNDO record after S that covers it (journal order). The view copies
//! those pre-images, as it finds them, into a private scratch file (sparse,
//! unlinked, the size of the disk), so that what it serves never depends on
//! journal bytes that a later repair may cut. Replication goes on meanwhile:
//! each read first reads the replica, then looks at the journal again. A
//! write to a range since S is journaled (its pre-image made durable)
//! before the replica is touched, so a replica byte read before that look
//! is either still the value at S or covered by a record the look finds.
//!
//! A master target starting up may roll back an uncommitted batch and cut
//! the journal's tail (under the folder's recovery lock, which each read
//! here takes shared). The pre-images already copied stay right: an UNDO
//! record holds the bytes from before its write, and for the first write
//! after S those are the bytes at S, rolled back or not. When the journal
//! no longer holds the record the view had read last, the view scans it
//! again from the point (copying only ranges it does not have yet).
//!
//! With `--writable`, writes go to a second scratch file (the overlay),
//! read before anything else, and discarded with the view: nothing of them
//! reaches the replica or the journal.

use super::catalog::{self, Point};
use super::folder::{read_meta, DiskError, Paths};
use super::journal::{JournalReader, RecordInfo, KIND_UNDO, KIND_UNDO_ZERO};
use super::lock::RecoveryLock;
use super::ranges::{zero_range, RangeSet};
use super::recover::{self, RecoverError};
use super::settle;
use super::sums::{self, Sums, SumsError};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("point {id}: {source}")]
    Point { id: u64, source: Box<RecoverError> },
    #[error("replica sums: {0}")]
    Sums(#[source] SumsError),
    #[error("read of {len} bytes at {offset} is outside the disk ({size} bytes)")]
    Range { offset: u64, len: u64, size: u64 },
}

fn ioe(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ViewError {
    let what = what.to_string();
    move |source| ViewError::Io { what, source }
}

/// One recovery point of one disk, readable (and with an overlay writable)
/// while the master target keeps applying frames to the disk.
pub struct PointView {
    paths: Paths,
    pub size: u64,
    pub point: Point,
    replica: File,
    /// Pre-images at the point, copied from the journal.
    scratch: File,
    have: RangeSet,
    /// Where the next journal scan starts, and the record read last.
    pos: u64,
    last: Option<RecordInfo>,
    /// Writes through the export (`--writable`).
    overlay: Option<(File, RangeSet)>,
    /// The replica's chunk sums, and the chunks already checked against them.
    sums: Option<Sums>,
    verified: RangeSet,
}

impl PointView {
    /// Open `point` of disk `name` in the data folder `data`; scratch files
    /// go to `scratch_dir` (unlinked at once).
    pub fn open(data: &Path, name: &str, point: Point, writable: bool, scratch_dir: &Path) -> Result<PointView, ViewError> {
        let meta = read_meta(data, name)?;
        settle::settle(data, name)?;
        recover::prove_inputs(data, name, &point, true).map_err(|e| match e {
            RecoverError::Disk(d) => ViewError::from(d),
            e => ViewError::Point { id: point.id, source: Box::new(e) },
        })?;
        let paths = Paths::new(data, name);
        let replica = File::open(&paths.replica).map_err(ioe(paths.replica.display()))?;
        let scratch_file = || -> Result<File, ViewError> {
            let f = tempfile::tempfile_in(scratch_dir).map_err(ioe(format!("scratch file in {}", scratch_dir.display())))?;
            f.set_len(meta.size).map_err(ioe("scratch file"))?;
            Ok(f)
        };
        let scratch = scratch_file()?;
        let overlay = if writable { Some((scratch_file()?, RangeSet::default())) } else { None };
        let pos = point.journal_pos;
        let sums = Sums::open(&paths.sums, meta.size, false).ok().flatten();
        let mut v = PointView {
            paths,
            size: meta.size,
            point,
            replica,
            scratch,
            have: RangeSet::default(),
            pos,
            last: None,
            overlay,
            sums,
            verified: RangeSet::default(),
        };
        v.refresh()?;
        Ok(v)
    }

    /// Adopt the journal's new records (under the folder's recovery lock,
    /// held by the caller).
    fn refresh(&mut self) -> Result<(), ViewError> {
        let j = JournalReader::open(&self.paths.journal).map_err(DiskError::from)?;
        let len = j.file_len().map_err(DiskError::from)?;
        let cut = match self.last {
            Some(r) => len < r.end || j.record_at(r.pos, len) != Some(r),
            None => len < self.pos,
        };
        if cut {
            // A repair cut the tail, or retention punched the journal: only
            // the former leaves the point listed.
            let (pts, _) = catalog::read_points(&self.paths.points).map_err(ioe(self.paths.points.display()))?;
            if !pts.iter().any(|p| p.id == self.point.id) {
                return Err(ViewError::Io {
                    what: format!("point {}", self.point.id),
                    source: io::Error::other("no longer in the catalog (dropped by retention)"),
                });
            }
            log::info!("{}: the journal was repaired; scanning it again from the point", self.paths.dir.display());
            self.pos = self.point.journal_pos;
            self.last = None;
        }
        let recs = j.scan(self.pos).map_err(DiskError::from)?;
        for r in &recs {
            if (r.kind == KIND_UNDO || r.kind == KIND_UNDO_ZERO) && r.seq > self.point.seq {
                let end = (r.offset + u64::from(r.len)).min(self.size);
                let gaps = self.have.uncovered(r.offset.min(end), end);
                if gaps.is_empty() {
                    continue;
                }
                let data = if r.kind == KIND_UNDO { Some(j.data(r).map_err(ioe(self.paths.journal.display()))?) } else { None };
                for (a, b) in gaps {
                    if let Some(d) = &data {
                        let from = (a - r.offset) as usize;
                        self.scratch.write_all_at(&d[from..from + (b - a) as usize], a).map_err(ioe("scratch file"))?;
                    } else {
                        zero_range(&self.scratch, a, b - a).map_err(ioe("scratch file"))?;
                    }
                    self.have.insert(a, b);
                }
            }
        }
        if let Some(r) = recs.last() {
            self.pos = r.end;
            self.last = Some(*r);
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` of the point (overlay first).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return Err(ViewError::Range { offset, len: buf.len() as u64, size: self.size });
        };
        {
            // No repair may cut the journal between the replica read and
            // the journal look that covers it. A read-only copy of a folder
            // has no writer to exclude.
            let _guard = RecoveryLock::shared(&self.paths).ok();
            self.verify_chunks(offset, end)?;
            self.replica.read_exact_at(buf, offset).map_err(ioe(self.paths.replica.display()))?;
            self.refresh()?;
        }
        for (a, b) in self.have.covered(offset, end) {
            let at = (a - offset) as usize;
            self.scratch.read_exact_at(&mut buf[at..at + (b - a) as usize], a).map_err(ioe("scratch file"))?;
        }
        if let Some((f, set)) = &self.overlay {
            for (a, b) in set.covered(offset, end) {
                let at = (a - offset) as usize;
                f.read_exact_at(&mut buf[at..at + (b - a) as usize], a).map_err(ioe("overlay"))?;
            }
        }
        Ok(())
    }

    /// Check each replica chunk a read touches against its sum, once (see
    /// recover::verify_copy: the check runs under the folder's apply lock).
    /// A damaged chunk fails the read.
    fn verify_chunks(&mut self, a: u64, b: u64) -> Result<(), ViewError> {
        use sums::CHUNK;
        if self.sums.is_none() {
            return Ok(());
        }
        let (c0, c1) = (a / CHUNK, b.div_ceil(CHUNK));
        for (x, y) in self.verified.uncovered(c0 * CHUNK, c1 * CHUNK) {
            let sums = self.sums.as_ref().expect("checked above");
            let mut one = vec![0u8; CHUNK as usize];
            for c in x / CHUNK..y.div_ceil(CHUNK) {
                let ok = sums::check_chunk_settled(&self.paths.dir, sums, &self.replica, c, &mut one).map_err(ViewError::Sums)?;
                if !ok {
                    log::error!(
                        "{}: the 64 KiB chunk at byte {} does not match its checksum: reads of it fail",
                        self.paths.replica.display(),
                        c * CHUNK
                    );
                    return Err(ViewError::Io {
                        what: format!("{} chunk at byte {}", self.paths.replica.display(), c * CHUNK),
                        source: io::Error::from_raw_os_error(libc::EIO),
                    });
                }
            }
            self.verified.insert(x, y.min(c1 * CHUNK));
        }
        Ok(())
    }

    /// Whether writes are accepted (into the overlay).
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// Write into the overlay (`None` data: zeroes).
    pub fn write(&mut self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), ViewError> {
        let size = self.size;
        let Some((f, set)) = &mut self.overlay else {
            return Err(ViewError::Io { what: "write".into(), source: io::Error::from_raw_os_error(libc::EPERM) });
        };
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(ViewError::Range { offset, len, size });
        }
        match data {
            Some(d) => f.write_all_at(d, offset).map_err(ioe("overlay"))?,
            None => zero_range(f, offset, len).map_err(ioe("overlay"))?,
        }
        set.insert(offset, offset + len);
        Ok(())
    }

    /// Bytes of pre-images copied, and of overlay written.
    pub fn scratch_bytes(&self) -> (u64, u64) {
        (self.have.bytes(), self.overlay.as_ref().map_or(0, |(_, s)| s.bytes()))
    }
}
