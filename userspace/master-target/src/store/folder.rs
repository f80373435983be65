//! One protected disk's folder on the master target: its files, its
//! metadata, and the error every datastore module speaks.
//!
//! ```text
//! DIR/NAME/disk.meta     name, size, generation (checksummed state file)
//! DIR/NAME/replica.img   sparse image, the newest durable state
//! DIR/NAME/journal.fj    undo journal (see journal.rs)
//! DIR/NAME/batch.fj      pre-images of the batch in progress (see disk.rs)
//! DIR/NAME/points.log    recovery point catalog (see catalog.rs)
//! DIR/NAME/replica.sums  chunk sums and the durable mark (see sums.rs)
//! DIR/NAME/lock, recover.lock, apply.lock   the folder's locks (see lock.rs)
//! ```

use super::journal::JournalError;
use ferry_common::durable::{read_state, unhex, StateError};
use std::fs;
use std::io;
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
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("disk {name}: {size} bytes is more than this master target supports ({max})")]
    TooLarge { name: String, size: u64, max: u64 },
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
    /// A sums file that cannot be used (sums.rs).
    #[error("{path}: {why}")]
    BadSums { path: String, why: String },
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

/// `DiskError::Io` naming `what` failed, keeping the `io::Error` as its source.
pub(crate) fn ioe(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Io { what: what.to_string(), source }
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
    let journal_used = fs::metadata(&p.journal).is_ok_and(|m| m.len() > super::journal::HEADER_LEN);
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

/// Parse a stored generation.
pub fn parse_generation(m: &Meta) -> Option<[u8; 16]> {
    unhex::<16>(&m.generation)
}
