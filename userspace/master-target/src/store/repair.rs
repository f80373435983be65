//! `ferry repair`: the only way a damaged disk folder starts over, keeping
//! what it can.
//!
//! The master target never re-initialises a folder that holds a replica, a
//! journal or a catalog (disk.rs `check_complete`), and recovery refuses what
//! it cannot vouch for. An operator who cannot restore the folder from a copy
//! runs `ferry repair`, which:
//!
//! - moves every file it gives up into `DIR/NAME/damaged-<time>/` (nothing
//!   is deleted), and says what each step cost;
//! - `disk.meta` missing, replica there: writes a new one from the replica's
//!   size with a new generation. The journal and catalog stay, so every point
//!   stays recoverable; the agent's next stream resyncs by checksum.
//! - `replica.img` missing, or shorter or longer than the disk: no point can
//!   be recovered from it. The journal and catalog are moved aside; a replica
//!   of the right size (holding what was left) and a new generation make the
//!   agent resync by checksum.
//! - `points.log` missing while the journal holds records: the points are
//!   lost; the journal is moved aside.
//! - `journal.fj` missing while points exist: the points are lost (they need
//!   it); the catalog is moved aside.
//! - catalog records damaged: the catalog is rewritten with the valid ones
//!   (the original moved aside).
//! - records missing at the end of the journal (cut short: the replica's
//!   durable mark names a COMMIT it does not hold): no point can be vouched
//!   for; journal, catalog and sums are moved aside, the replica kept, and
//!   the agent resyncs by checksum.
//! - the journal damaged at byte X (a bad record with committed records
//!   after it): the points at or before X need the records past it and are
//!   dropped; points after X stay recoverable; the journal is left as it is
//!   (nothing reads before the oldest kept point).

use super::catalog::{self, Catalog, Point};
use super::folder::{ioe, DiskError, Meta, Paths, META_KIND, META_VERSION};
use super::journal::{JournalReader, HEADER_LEN};
use super::lock::{RecoveryLock, WriterLock};
use super::settle;
use ferry_common::durable::{hex, read_state, write_state};
use std::fs;
use std::path::{Path, PathBuf};

/// What a repair did, one line a step.
#[derive(Debug, Default)]
pub struct Report {
    pub steps: Vec<String>,
    pub aside: Option<PathBuf>,
}

struct Aside {
    dir: PathBuf,
    made: bool,
}

impl Aside {
    /// The folder, made on first use.
    fn dir(&mut self) -> Result<&Path, DiskError> {
        if !self.made {
            fs::create_dir_all(&self.dir).map_err(ioe(self.dir.display()))?;
            self.made = true;
        }
        Ok(&self.dir)
    }
    /// Move `file` aside.
    fn put(&mut self, file: &Path) -> Result<PathBuf, DiskError> {
        let to = self.dir()?.join(file.file_name().unwrap_or_default());
        fs::rename(file, &to).map_err(ioe(file.display()))?;
        Ok(to)
    }
    /// Keep a copy of `file` aside.
    fn copy(&mut self, file: &Path) -> Result<PathBuf, DiskError> {
        let to = self.dir()?.join(file.file_name().unwrap_or_default());
        fs::copy(file, &to).map_err(ioe(file.display()))?;
        Ok(to)
    }
}

fn new_generation() -> String {
    let mut g = [0u8; 16];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut g);
    }
    let t = ferry_common::now_ns().to_le_bytes();
    for (i, b) in t.iter().enumerate() {
        g[i] ^= b;
    }
    hex(&g)
}

/// Where the journal is damaged: the first invalid record that has a valid
/// COMMIT after it (a torn tail is not damage; the master target cuts it).
pub fn journal_damage(paths: &Paths) -> Result<Option<u64>, DiskError> {
    if !paths.journal.exists() {
        return Ok(None);
    }
    let r = JournalReader::open(&paths.journal)?;
    let recs = r.scan(HEADER_LEN)?;
    let end = recs.last().map_or(HEADER_LEN, |x| x.end);
    Ok((end < r.file_len()? && r.commit_after(end)?).then_some(end))
}

/// Repair the folder of disk `name` under `data` (see the module note).
pub fn repair(data: &Path, name: &str) -> Result<Report, DiskError> {
    let p = Paths::new(data, name);
    if !p.dir.is_dir() {
        return Err(DiskError::NotFound { name: name.into(), data: data.display().to_string() });
    }
    let _writer = WriterLock::take(&p, name)?; // no stream may write meanwhile
    let _readers = RecoveryLock::exclusive(&p)?;
    let mut aside = Aside { dir: p.dir.join(format!("damaged-{}", ferry_common::now_ns() / 1_000_000_000)), made: false };
    let mut rep = Report::default();
    let meta: Option<Meta> = match read_state(&p.meta, META_KIND, META_VERSION) {
        Ok(m) => m,
        Err(e) => {
            let to = aside.put(&p.meta)?;
            rep.steps.push(format!("disk.meta is unreadable ({e}): moved to {}", to.display()));
            None
        }
    };
    let replica_len = fs::metadata(&p.replica).ok().map(|m| m.len());
    let journal_used = fs::metadata(&p.journal).is_ok_and(|m| m.len() > HEADER_LEN);
    let catalog_there = p.points.exists();
    let cat = catalog::scan(&p.points).map_err(ioe(p.points.display()))?;

    // The size the disk has: from disk.meta, else from the replica.
    let size = match (&meta, replica_len) {
        (Some(m), _) => m.size,
        (None, Some(l)) if l > 0 && l % ferry_proto::SECTOR == 0 => l,
        (None, _) => {
            // Nothing says what the disk was: start over.
            for f in [&p.replica, &p.journal, &p.batch, &p.points, &p.sums] {
                if f.exists() {
                    aside.put(f)?;
                }
            }
            rep.steps.push("disk.meta is missing and no usable replica says the disk's size: the folder starts over (the agent's next stream runs an initial sync)".into());
            rep.aside = aside.made.then(|| aside.dir.clone());
            return Ok(rep);
        }
    };
    let mut new_generation_needed = meta.is_none();
    if meta.is_none() {
        rep.steps.push(format!("disk.meta was missing: rebuilt from replica.img ({size} bytes) with a new generation"));
    }
    let journal_cut = replica_len == Some(size) && settle::check_mark(&p, name, size).is_err();
    // The replica: missing or of the wrong size, no point is recoverable.
    if journal_cut {
        for f in [&p.journal, &p.batch, &p.points, &p.sums] {
            if f.exists() {
                aside.put(f)?;
            }
        }
        new_generation_needed = true;
        rep.steps.push(
            "journal.fj is missing records at its end (the replica is durable past it): no recovery point can be vouched for; \
             the journal, catalog and sums were moved aside and the replica kept: the agent's next stream resyncs by checksum"
                .into(),
        );
    } else if replica_len != Some(size) {
        let what = match replica_len {
            None => "replica.img is missing".to_string(),
            Some(l) => format!("replica.img is {l} bytes, the disk {size}"),
        };
        for f in [&p.journal, &p.batch, &p.points, &p.sums] {
            if f.exists() {
                aside.put(f)?;
            }
        }
        let r = fs::OpenOptions::new().write(true).create(true).truncate(false).open(&p.replica).map_err(ioe(p.replica.display()))?;
        r.set_len(size).map_err(ioe(p.replica.display()))?;
        r.sync_all().map_err(ioe(p.replica.display()))?;
        new_generation_needed = true;
        rep.steps.push(format!(
            "{what}: no recovery point can be vouched for; the journal and catalog were moved aside and the replica set to {size} bytes: \
             the agent's next stream resyncs it by checksum"
        ));
    } else if journal_used && !catalog_there {
        let to = aside.put(&p.journal)?;
        if p.batch.exists() {
            aside.put(&p.batch)?;
        }
        rep.steps.push(format!("points.log was missing: its points are lost; the journal was moved to {}", to.display()));
    } else if !p.journal.exists() && !cat.points.is_empty() {
        let to = aside.put(&p.points)?;
        rep.steps.push(format!(
            "journal.fj was missing: the {} points it served are lost; the catalog was moved to {}",
            cat.points.len(),
            to.display()
        ));
    } else {
        // Catalog damage, journal damage: keep the points that are still right.
        let mut keep: Vec<Point> = cat.points.clone();
        let mut why = Vec::new();
        if !cat.damaged.is_empty() {
            why.push(format!("{} damaged catalog record(s) dropped", cat.damaged.len()));
        }
        if let Some(x) = journal_damage(&p)? {
            let before = keep.len();
            keep.retain(|pt| pt.journal_pos > x);
            why.push(format!(
                "the journal is damaged at byte {x}: {} point(s) at or before it dropped, {} after it kept",
                before - keep.len(),
                keep.len()
            ));
        }
        let damaged_after_all = journal_damage(&p)?.is_some() && keep.is_empty();
        if damaged_after_all {
            // No point lies after the damage: the master target, which reads
            // the journal from the newest point, would still meet it. The
            // journal goes aside; the replica stays; the agent resyncs.
            for f in [&p.journal, &p.batch, &p.sums, &p.points] {
                if f.exists() {
                    aside.put(f)?;
                }
            }
            new_generation_needed = true;
            rep.steps.push(format!(
                "{}; no point is left after the damage: the journal, catalog and sums were moved aside and the replica kept \
                 (the agent's next stream resyncs by checksum)",
                why.join("; ")
            ));
        } else if !why.is_empty() {
            let to = aside.copy(&p.points)?;
            let (mut c, _) = Catalog::open(&p.points).map_err(ioe(p.points.display()))?;
            c.rewrite(&p.points, &keep).map_err(ioe(p.points.display()))?;
            rep.steps.push(format!("{} (the old catalog is in {})", why.join("; "), to.display()));
        }
    }
    if new_generation_needed {
        let m = Meta {
            name: name.into(),
            size,
            generation: new_generation(),
            created_ns: meta.as_ref().map_or_else(ferry_common::now_ns, |m| m.created_ns),
        };
        write_state(&p.meta, META_KIND, META_VERSION, &m)?;
    }
    if rep.steps.is_empty() {
        rep.steps.push("nothing to repair: every file is there and reads".into());
    }
    rep.aside = aside.made.then(|| aside.dir.clone());
    Ok(rep)
}
