//! Bringing a disk folder to its durable state: what a master target does
//! when a stream opens, and what `ferry recover`, `verify`, `export`,
//! `retention` and `failover` do first on a folder no stream holds (one
//! left by a crash is settled, not taken for damaged).
//!
//! Roll back the uncommitted batch (from both journals), cut the journal
//! after its last COMMIT, check the replica's durable mark against the
//! journal, and hash again the chunks whose sums may not have reached the
//! disk (sums.rs). Done under [`Settling`] (the recovery and apply locks,
//! exclusive) whenever there is anything to do.

use super::catalog::Point;
use super::folder::{ioe, read_meta, DiskError, Paths};
use super::journal::{Journal, JournalReader, KIND_COMMIT, KIND_UNDO, KIND_UNDO_ZERO};
use super::lock::{Settling, WriterLock};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bring a folder whose writer lock the caller holds to its durable state:
/// check the replica's durable mark against the journal, roll back an
/// uncommitted batch, and hash again the chunks whose sums may not have
/// reached the disk. When there is anything to do, it is done under the
/// recovery lock (exclusive: no recovery copies meanwhile) and the apply lock
/// (exclusive: no check of a chunk against its sum meanwhile), taken in that
/// order (a recovery takes them in the same order). Returns the durable
/// sequence and the open sums.
pub(super) fn reconcile(
    paths: &Paths,
    name: &str,
    size: u64,
    replica: &File,
    journal: &mut Journal,
    batch: &mut Journal,
    points: &[Point],
) -> Result<(u64, Option<super::sums::Sums>), DiskError> {
    // Everything before the newest point's journal position is committed
    // (the point was recorded after its batch's COMMIT), so the repair reads
    // only the journal after it.
    let from = points.last().map_or(super::journal::HEADER_LEN, |p| p.journal_pos);
    // Before the repair touches anything: records missing at the end of the
    // journal would make it roll back committed data.
    check_mark(paths, name, size)?;
    // FERRY_NO_SUMS=1 (benchmark knob, ferry_common::testing): no sums kept
    // or checked at all.
    let no_sums = ferry_common::testing::get().no_sums;
    // Held from a repair that acts (or, with nothing to repair, for sums to
    // hash again) until the sums agree with the replica.
    let mut held = None;
    let durable_seq = repair(paths, replica, journal, batch, from, &mut held).map_err(|e| match e {
        DiskError::Damaged { why, .. } => DiskError::Damaged { name: name.into(), why },
        e => e,
    })?;
    let _held = match held {
        None if !no_sums && sums_stale(paths, size)? => Some(Settling::take(paths)?),
        held => held,
    };
    if no_sums {
        let _ = fs::remove_file(&paths.sums);
        return Ok((durable_seq, None));
    }
    let sums = open_sums(paths, name, replica, size, durable_seq, journal.end(), points)?;
    Ok((durable_seq, Some(sums)))
}

/// Whether the replica's sums may be behind the replica (no valid mark, or
/// a mark older than the journal's last COMMIT).
fn sums_stale(paths: &Paths, size: u64) -> Result<bool, DiskError> {
    let Ok(Some(s)) = super::sums::Sums::open(&paths.sums, size, false) else { return Ok(true) };
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
    let _writer = match WriterLock::take(&p, name) {
        Ok(l) => l,
        Err(DiskError::Busy(_)) => return Ok(()),
        Err(e @ DiskError::Io { .. }) => {
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
    let (points, _) = super::catalog::read_points(&p.points).map_err(ioe(p.points.display()))?;
    let mut journal = Journal::open(&p.journal)?;
    let mut batch = Journal::open(&p.batch)?;
    // Leaves the sums' mark at the durable state (open_sums).
    reconcile(p, name, size, &replica, &mut journal, &mut batch, &points)?;
    Ok(())
}

/// Start-up repair: undo what the last, uncommitted batch may have written,
/// and cut the journal after the last COMMIT. Returns the durable sequence.
/// When there is anything to undo or cut, it is done holding
/// [`Settling`], left in `held` for the caller.
fn repair(
    paths: &Paths,
    replica: &File,
    journal: &mut Journal,
    batch: &mut Journal,
    from: u64,
    held: &mut Option<Settling>,
) -> Result<u64, DiskError> {
    let reader = JournalReader::open(&paths.journal)?;
    let mut recs = reader.scan(from)?;
    if from > super::journal::HEADER_LEN && !recs.iter().any(|r| r.kind == KIND_COMMIT) {
        log::warn!("{}: no commit after the newest point's journal position; reading the whole journal", paths.dir.display());
        recs = reader.scan(0)?;
    }
    let file_len = reader.file_len()?;
    let valid_end = recs.last().map_or(from.max(super::journal::HEADER_LEN), |r| r.end);
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
        None => (0, super::journal::HEADER_LEN),
    };
    let tail = &recs[last_commit.map_or(0, |i| i + 1)..];
    // The uncommitted batch's pre-images are in both journals: undo them
    // together, newest frame first (each frame's parts are disjoint).
    let breader = JournalReader::open(&paths.batch)?;
    let brecs: Vec<_> = breader.scan(0)?.into_iter().filter(|r| r.seq > durable).collect();
    let mut undo: Vec<(u64, bool, super::journal::RecordInfo)> = tail
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
            *held = Some(Settling::take(paths)?);
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
        batch.truncate(super::journal::HEADER_LEN)?;
    }
    Ok(durable)
}

/// The journal must still hold the COMMIT the replica's durable mark names
/// (sums.rs): a journal cut short or replaced has lost the pre-images of
/// committed batches, and no point can be vouched for. O(1): one record.
pub fn check_mark(p: &Paths, name: &str, size: u64) -> Result<(), DiskError> {
    let Ok(Some(s)) = super::sums::Sums::open(&p.sums, size, false) else { return Ok(()) };
    let Ok(Some(m)) = s.mark() else { return Ok(()) };
    if m.journal_end <= super::journal::HEADER_LEN {
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
) -> Result<super::sums::Sums, DiskError> {
    use super::sums::{Mark, Sums};
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
        let from = points.iter().map(|q| q.journal_pos).filter(|&pos| pos <= m.journal_end).max().unwrap_or(super::journal::HEADER_LEN);
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
