//! Retention: which recovery points a disk keeps, and reclaiming the
//! journal space the others held.
//!
//! Policy (`DIR/NAME/retention.state`, set with `ferry retention`; without
//! one, [`Policy::default_for`] the disk's size: keep 3 days, every point
//! for an hour, one an hour up to a day, one a day beyond, and a journal no
//! larger than the disk):
//!
//! - `keep_ns`: points older than this are dropped (the newest point is
//!   always kept, however old);
//! - thinning inside the window: every point younger than `all_ns`; one per
//!   hour (the first of each clock hour) up to `hourly_ns`; one per day (the
//!   first of each UTC day) beyond. The point kept for an hour is the one
//!   kept for its day when it ages, so kept points stay kept until they
//!   leave the window;
//! - `journal_cap`: if the journal after the oldest kept point is still
//!   larger than this, the oldest points go too (never the newest);
//! - points pinned by a running `ferry export` (`DIR/NAME/pins/PID.pin`)
//!   are kept whatever their age.
//!
//! Reclaim: recovering point S reads the journal only from S's position on,
//! so everything before the oldest kept point's position is dead. The
//! journal file keeps its length (positions are absolute) and the dead
//! part is punched out (`fallocate(PUNCH_HOLE)`), under the folder's
//! recovery lock, so no recovery is reading it meanwhile. Thinning alone
//! frees nothing: with copy on first write per interval, the pre-images
//! between two kept points are all first writes of some interval, and
//! merging intervals would need a compaction (not done).

use super::catalog::Point;
use super::folder::{ioe, DiskError, Paths};
use super::lock::RecoveryLock;
use super::reserve;
use ferry_common::durable::{read_state, write_state};
use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const KIND: &str = "ferry-retention";
const VERSION: u32 = 1;
const HOUR: u64 = 3_600_000_000_000;
const DAY: u64 = 24 * HOUR;

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Drop points older than this (ns); 0: no age limit.
    pub keep_ns: u64,
    /// Keep every point younger than this (ns).
    pub all_ns: u64,
    /// Keep one point per hour up to this age (ns); beyond, one per day.
    pub hourly_ns: u64,
    /// Journal bytes after the oldest kept point; 0: no limit.
    pub journal_cap: u64,
}

impl Policy {
    /// The policy of a disk of `disk_size` bytes that has none set
    /// (docs/operating.md, docs/decisions.md): three days of points, every
    /// point of the last hour, one an hour up to a day, one a day beyond;
    /// the journal after the oldest kept point at most the disk's size.
    pub fn default_for(disk_size: u64) -> Policy {
        Policy { keep_ns: 3 * DAY, all_ns: HOUR, hourly_ns: DAY, journal_cap: disk_size }
    }

    /// No limit: every point kept.
    pub fn keep_everything() -> Policy {
        Policy { keep_ns: 0, all_ns: u64::MAX, hourly_ns: u64::MAX, journal_cap: 0 }
    }
}

/// Why retention keeps a point (the first that applies, in this order).
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The newest point, kept however old.
    Newest,
    /// Pinned by a running `ferry export` (or a failover writing it).
    Pinned,
    /// Younger than the policy's "every point" age.
    Window,
    /// The first point of its clock hour, younger than the hourly age.
    Hourly,
    /// The first point of its UTC day.
    Daily,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Newest => "newest",
            Reason::Pinned => "pinned",
            Reason::Window => "window",
            Reason::Hourly => "hourly",
            Reason::Daily => "daily",
        }
    }
}

fn policy_path(paths: &Paths) -> PathBuf {
    paths.dir.join("retention.state")
}

/// The policy set for the disk, if any.
pub fn load(paths: &Paths) -> Result<Option<Policy>, ferry_common::durable::StateError> {
    read_state(&policy_path(paths), KIND, VERSION)
}

/// The policy in force: the one set, or the default for the disk's size
/// (then the flag is false).
pub fn effective(paths: &Paths, disk_size: u64) -> Result<(Policy, bool), ferry_common::durable::StateError> {
    Ok(match load(paths)? {
        Some(p) => (p, true),
        None => (Policy::default_for(disk_size), false),
    })
}

/// Why each of `points` is kept now by the disk's policy (`None`: the next
/// retention pass drops it). The same decision a pass makes ([`classify`]).
pub fn reasons(paths: &Paths, disk_size: u64, points: &[Point]) -> Result<Vec<Option<Reason>>, ferry_common::durable::StateError> {
    let (policy, _) = effective(paths, disk_size)?;
    let end = std::fs::metadata(&paths.journal).map(|m| m.len()).unwrap_or(0);
    Ok(classify(points, &policy, ferry_common::now_ns(), end, &pinned(paths)))
}

/// Write the policy; on a full filesystem the folder's reserve makes room.
pub fn store(paths: &Paths, p: &Policy) -> Result<(), ferry_common::durable::StateError> {
    reserve::retry(&paths.dir, || write_state(&policy_path(paths), KIND, VERSION, p), reserve::state_enospc)
}

/// Point ids pinned by running exports (stale pins, of dead processes,
/// are removed).
pub fn pinned(paths: &Paths) -> BTreeSet<u64> {
    let dir = paths.dir.join("pins");
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir(&dir) else { return out };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid: Option<i32> =
            name.strip_suffix(".pin").and_then(|p| p.parse::<u32>().ok()).filter(|&p| p > 0 && p <= i32::MAX as u32).map(|p| p as i32);
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
        if !alive {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        if let Some(id) = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse().ok()) {
            out.insert(id);
        }
    }
    out
}

/// A pin for the life of an export; removed on drop.
pub struct Pin(PathBuf);

impl Pin {
    pub fn new(paths: &Paths, point: u64) -> io::Result<Pin> {
        let dir = paths.dir.join("pins");
        std::fs::create_dir_all(&dir)?;
        let p = dir.join(format!("{}.pin", std::process::id()));
        // Whole or absent: a reader never sees an empty pin.
        let tmp = dir.join(format!(".{}.pin.tmp", std::process::id()));
        reserve::retry(&paths.dir, || std::fs::write(&tmp, point.to_string()), reserve::is_enospc)?;
        std::fs::rename(&tmp, &p)?;
        Ok(Pin(p))
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The points to keep (oldest first), by `policy` at time `now`; `journal_end`
/// is the journal's length (for the cap).
pub fn select(points: &[Point], policy: &Policy, now: u64, journal_end: u64, pins: &BTreeSet<u64>) -> Vec<Point> {
    classify(points, policy, now, journal_end, pins).iter().zip(points).filter(|(r, _)| r.is_some()).map(|(_, p)| *p).collect()
}

/// For each of `points` (oldest first), why `policy` keeps it at time `now`,
/// or `None` if it goes. [`select`] and `ferry points` both use this.
pub fn classify(points: &[Point], policy: &Policy, now: u64, journal_end: u64, pins: &BTreeSet<u64>) -> Vec<Option<Reason>> {
    let Some(newest) = points.last() else { return Vec::new() };
    // An hour or a day with a consistency group's point keeps that point
    // (the first such), so that every disk of the group keeps the same cut.
    let mut group_hours = BTreeSet::new();
    let mut group_days = BTreeSet::new();
    for p in points.iter().filter(|p| p.kind == ferry_proto::PointKind::Group) {
        group_hours.insert(p.time_ns / HOUR);
        group_days.insert(p.time_ns / DAY);
    }
    let mut hours = BTreeSet::new();
    let mut days = BTreeSet::new();
    let mut out: Vec<Option<Reason>> = Vec::with_capacity(points.len());
    for p in points {
        let age = now.saturating_sub(p.time_ns);
        let eligible = |groups: &BTreeSet<u64>, bucket: u64| p.kind == ferry_proto::PointKind::Group || !groups.contains(&bucket);
        let in_window = policy.keep_ns == 0 || age <= policy.keep_ns;
        let why = if p.id == newest.id {
            Some(Reason::Newest)
        } else if pins.contains(&p.id) {
            Some(Reason::Pinned)
        } else if !in_window {
            None
        } else if age <= policy.all_ns {
            Some(Reason::Window)
        } else if age <= policy.hourly_ns {
            (eligible(&group_hours, p.time_ns / HOUR) && hours.insert(p.time_ns / HOUR)).then_some(Reason::Hourly)
        } else {
            (eligible(&group_days, p.time_ns / DAY) && days.insert(p.time_ns / DAY)).then_some(Reason::Daily)
        };
        // A point in an hour (or day) already represented by an older kept
        // one is dropped; the first of each bucket is marked as it passes.
        if why.is_some() {
            hours.insert(p.time_ns / HOUR);
            days.insert(p.time_ns / DAY);
        }
        out.push(why);
    }
    if policy.journal_cap > 0 {
        // The oldest kept points go while the journal after them is over
        // the cap (never the newest, nor a pinned one).
        for (i, p) in points.iter().enumerate() {
            if out[i].is_none() {
                continue;
            }
            if p.id == newest.id || pins.contains(&p.id) || journal_end.saturating_sub(p.journal_pos) <= policy.journal_cap {
                break;
            }
            out[i] = None;
        }
    }
    out
}

/// Punch out the journal before `pos` (page-aligned, after the header's
/// page). Returns the bytes punched.
pub fn punch_before(journal: &Path, pos: u64) -> io::Result<u64> {
    let start = 4096u64;
    let end = pos / 4096 * 4096;
    if end <= start {
        return Ok(0);
    }
    let f = std::fs::OpenOptions::new().write(true).open(journal)?;
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start as libc::off_t,
            (end - start) as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end - start)
}

/// What a retention pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub dropped: usize,
    pub kept: usize,
}

/// Apply the disk's policy now. The caller holds the disk's writer lock (the
/// master target's session, or `ferry retention`); the catalog is rewritten
/// through `rewrite`, which returns once the new catalog is durable.
pub fn apply(
    paths: &Paths,
    disk_size: u64,
    points: &[Point],
    journal_end: u64,
    mut rewrite: impl FnMut(&[Point]) -> io::Result<()>,
) -> Result<Pass, DiskError> {
    let (policy, _) = effective(paths, disk_size)?;
    let now = ferry_common::now_ns();
    if select(points, &policy, now, journal_end, &pinned(paths)).len() == points.len() {
        return Ok(Pass { dropped: 0, kept: points.len() });
    }
    // No recovery may be reading the part of the journal about to go. A
    // recovery or export holding the lock shared makes this pass wait for
    // the next point rather than stall the stream.
    let _guard = match RecoveryLock::try_exclusive(paths) {
        Ok(Some(g)) => g,
        Ok(None) | Err(_) => return Ok(Pass { dropped: 0, kept: points.len() }),
    };
    // Pins read again under the lock: an export pins its point, then checks
    // the catalog under the shared lock, so one of the two sees the other.
    let keep = select(points, &policy, now, journal_end, &pinned(paths));
    if keep.len() == points.len() {
        return Ok(Pass { dropped: 0, kept: keep.len() });
    }
    reserve::retry(&paths.dir, || rewrite(&keep), reserve::is_enospc).map_err(ioe(paths.points.display()))?;
    if let Some(oldest) = keep.first() {
        punch_before(&paths.journal, oldest.journal_pos).map_err(ioe(paths.journal.display()))?;
    }
    Ok(Pass { dropped: points.len() - keep.len(), kept: keep.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::PointKind;

    fn pts(times: &[u64]) -> Vec<Point> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Point {
                id: i as u64 + 1,
                seq: i as u64 * 10,
                time_ns: t,
                kind: PointKind::Crash,
                journal_pos: 64 + i as u64 * 1000,
            })
            .collect()
    }

    #[test]
    fn thinning_keeps_all_then_hourly_then_daily_and_drops_the_old() {
        let now = 100 * DAY;
        let min = HOUR / 60;
        // Every 10 minutes for the last 4 days.
        let times: Vec<u64> = (0..(4 * 24 * 6)).map(|i| now - 4 * DAY + i * 10 * min).collect();
        let p = pts(&times);
        let pol = Policy { keep_ns: 3 * DAY, all_ns: 2 * HOUR, hourly_ns: DAY, journal_cap: 0 };
        let keep = select(&p, &pol, now, 1 << 40, &BTreeSet::new());
        let age = |k: &Point| now - k.time_ns;
        // Nothing older than the window.
        assert!(keep.iter().all(|k| age(k) <= 3 * DAY));
        // Everything in the last two hours.
        assert_eq!(keep.iter().filter(|k| age(k) <= 2 * HOUR).count(), p.iter().filter(|k| age(k) <= 2 * HOUR).count());
        // One per hour between 2 h and 1 day, one per day beyond.
        let hourly = keep.iter().filter(|k| age(k) > 2 * HOUR && age(k) <= DAY).count();
        assert!((21..=23).contains(&hourly), "{hourly} hourly points");
        let daily = keep.iter().filter(|k| age(k) > DAY).count();
        assert!((2..=3).contains(&daily), "{daily} daily points");
        // Stable: applying the policy again (later) keeps a subset.
        let later = select(&keep, &pol, now + HOUR, 1 << 40, &BTreeSet::new());
        assert!(later.iter().all(|k| keep.contains(k)));
    }

    /// Thinning keeps the group's cut in each bucket, on every disk of the
    /// group, whatever the disks' own points around it.
    #[test]
    fn thinning_keeps_the_same_group_cut_on_every_disk() {
        let now = 100 * DAY;
        let base = now - 10 * HOUR;
        let group_cut = base + HOUR / 2;
        let disk = |own: &[u64]| {
            let mut times: Vec<(u64, PointKind)> = own.iter().map(|&t| (t, PointKind::Crash)).collect();
            times.push((group_cut, PointKind::Group));
            times.sort_by_key(|&(t, _)| t);
            times
                .iter()
                .enumerate()
                .map(|(i, &(t, k))| Point { id: i as u64 + 1, seq: i as u64, time_ns: t, kind: k, journal_pos: 64 + i as u64 })
                .collect::<Vec<_>>()
        };
        let pol = Policy { keep_ns: 0, all_ns: HOUR, hourly_ns: DAY, journal_cap: 0 };
        // The disks' own points differ; each has a newer one later on (the
        // newest is always kept).
        for own in [vec![base + 60, base + 120, base + 5 * HOUR], vec![base + 30_000_000_000, base + HOUR - 1, base + 6 * HOUR]] {
            let keep = select(&disk(&own), &pol, now, 1 << 40, &BTreeSet::new());
            assert!(keep.iter().any(|p| p.time_ns == group_cut && p.kind == PointKind::Group), "{keep:?}");
            assert!(!keep.iter().any(|p| p.time_ns / HOUR == group_cut / HOUR && p.kind == PointKind::Crash), "{keep:?}");
        }
    }

    #[test]
    fn the_newest_and_pinned_points_stay_and_the_cap_drops_the_oldest() {
        let p = pts(&[1, 2, 3, 4, 5]);
        let pol = Policy { keep_ns: 1, all_ns: 0, hourly_ns: 0, journal_cap: 0 };
        let pins: BTreeSet<u64> = [2].into();
        let keep = select(&p, &pol, 1000 * DAY, 1 << 40, &pins);
        assert_eq!(keep.iter().map(|k| k.id).collect::<Vec<_>>(), [2, 5]);
        let cap = Policy { keep_ns: 0, all_ns: u64::MAX, hourly_ns: u64::MAX, journal_cap: 2500 };
        let keep = select(&p, &cap, 10, 64 + 5000, &BTreeSet::new());
        // Journal ends at 5064: only points whose position is within 2500 of it.
        assert_eq!(keep.iter().map(|k| k.id).collect::<Vec<_>>(), [4, 5]);
    }

    /// A disk with no policy set gets the default (its journal cap is the
    /// disk's size), and the reasons a listing shows are the decisions a
    /// pass makes.
    #[test]
    fn a_disk_without_a_policy_gets_the_default_and_each_kept_point_says_why() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path(), "d");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let (pol, set) = effective(&paths, 512 << 20).unwrap();
        assert!(!set);
        assert_eq!(pol, Policy { keep_ns: 3 * DAY, all_ns: HOUR, hourly_ns: DAY, journal_cap: 512 << 20 });
        store(&paths, &Policy::keep_everything()).unwrap();
        assert_eq!(effective(&paths, 512 << 20).unwrap(), (Policy::keep_everything(), true));

        let now = 100 * DAY;
        let min = HOUR / 60;
        // Points 4 days, 2 days (twice in one day), 3 h (twice in one hour),
        // 10 min and 1 min old; point 2 pinned.
        let p = pts(&[now - 4 * DAY, now - 2 * DAY - HOUR, now - 2 * DAY, now - 3 * HOUR, now - 3 * HOUR + min, now - 10 * min, now - min]);
        let pol = Policy::default_for(1 << 30);
        let pins: BTreeSet<u64> = [2].into();
        let why = classify(&p, &pol, now, 1 << 20, &pins);
        use Reason::*;
        assert_eq!(why, [None, Some(Pinned), Some(Daily), Some(Hourly), None, Some(Window), Some(Newest)]);
        let kept: Vec<u64> = select(&p, &pol, now, 1 << 20, &pins).iter().map(|k| k.id).collect();
        assert_eq!(kept, [2, 3, 4, 6, 7]);
        // The journal cap drops the oldest kept points that are not pinned:
        // the journal ends at 64 + 7000; a cap of 2500 keeps what starts at
        // or after 4564 (points 5 on), the pinned point, and the newest.
        let capped = Policy { journal_cap: 2500, ..pol };
        let why = classify(&p, &capped, now, 64 + 7000, &BTreeSet::new());
        assert_eq!(why, [None, None, None, None, None, Some(Window), Some(Newest)]);
        let why = classify(&p, &capped, now, 64 + 7000, &pins);
        assert_eq!(why[1], Some(Pinned));
    }
}
