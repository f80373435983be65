//! `ferry verify` (a scrub): checks a disk folder end to end while the master
//! target may be serving it, at a rate limit, and records the result in
//! `DIR/NAME/verify.state` for `ferry status --data`.
//!
//! What it checks, in order: the folder is complete and `disk.meta` reads;
//! the replica has the disk's size; every catalog record; the journal from
//! the oldest point on (record checksums, commits in increasing order, no
//! bad record followed by a commit) and its end against the replica's
//! durable mark; then every 64 KiB chunk of the replica against its sum. A
//! chunk that differs is read again under the folder's apply lock (a running
//! master target may be rewriting it) before it is called damage.

use crate::catalog;
use crate::disk::{check_mark, read_meta, DiskError, Paths};
use crate::journal::{JournalReader, HEADER_LEN, KIND_COMMIT};
use crate::sums::{Sums, CHUNK};
use ferry_common::durable::{read_state, write_state};
use std::path::Path;
use std::time::{Duration, Instant};

pub const STATE_KIND: &str = "ferry-verify";

pub const STATE_VERSION: u32 = 1;

/// One damaged place.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The file, relative to the disk folder.
    pub file: String,
    pub offset: u64,
    pub len: u64,
    pub what: String,
    /// Ids of the points it takes (all of them for the replica).
    pub points: Vec<u64>,
}

/// The result of a verify, as stored in `verify.state`.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Outcome {
    pub name: String,
    /// Wall-clock ns when it finished.
    pub time_ns: u64,
    pub seconds: f64,
    pub chunks_checked: u64,
    pub bytes_read: u64,
    pub damage: Vec<Damage>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Verify disk `name` under `data`, reading at most `rate` bytes a second
/// (0: no limit).
pub fn verify(data: &Path, name: &str, rate: u64) -> Result<Outcome, DiskError> {
    let t0 = Instant::now();
    let p = Paths::new(data, name);
    // (read_meta refuses an incomplete folder.)
    let meta = read_meta(data, name)?;
    // A folder left by a crash is brought to its durable state first (when
    // no master target serves it; one that does reconciled it at open).
    crate::disk::settle(data, name)?;
    // The catalog and the journal from the oldest point on (before it,
    // retention punched it), under the recovery lock: retention does not
    // drop points or punch meanwhile.
    let _reading = crate::disk::lock_recoveries(&p, libc::LOCK_SH).ok();
    let mut damage = Vec::new();
    let cat = catalog::scan(&p.points).map_err(|e| DiskError::Io(format!("{}: {e}", p.points.display())))?;
    let all: Vec<u64> = cat.points.iter().map(|q| q.id).collect();
    for (off, i) in &cat.damaged {
        damage.push(Damage {
            file: "points.log".into(),
            offset: *off,
            len: catalog::RECORD as u64,
            what: format!("catalog record {} fails its checksum (its point is lost; the others are listed)", i + 1),
            points: Vec::new(),
        });
    }
    let len = std::fs::metadata(&p.replica).map_err(|e| DiskError::Io(format!("{}: {e}", p.replica.display())))?.len();
    if len != meta.size {
        damage.push(Damage {
            file: "replica.img".into(),
            offset: len.min(meta.size),
            len: len.abs_diff(meta.size),
            what: format!("the replica is {len} bytes, the disk {}", meta.size),
            points: all.clone(),
        });
    }
    let j = JournalReader::open(&p.journal)?;
    let from = cat.points.iter().map(|q| q.journal_pos).min().unwrap_or(HEADER_LEN);
    let recs = j.scan(from)?;
    let end = recs.last().map_or(from, |r| r.end);
    let mut bytes_read = end - from;
    if end < j.file_len()? && j.commit_after(end)? {
        damage.push(Damage {
            file: "journal.fj".into(),
            offset: end,
            len: 0,
            what: "a bad journal record with committed records after it".into(),
            points: cat.points.iter().filter(|q| q.journal_pos <= end).map(|q| q.id).collect(),
        });
    }
    let mut last = 0;
    for r in recs.iter().filter(|r| r.kind == KIND_COMMIT) {
        if r.seq < last {
            damage.push(Damage {
                file: "journal.fj".into(),
                offset: r.pos,
                len: r.end - r.pos,
                what: format!("commit of seq {} after one of seq {last}", r.seq),
                points: cat.points.iter().filter(|q| q.journal_pos <= r.pos).map(|q| q.id).collect(),
            });
        }
        last = r.seq;
    }
    if let Err(DiskError::Damaged { why, .. }) = check_mark(&p, name, meta.size) {
        damage.push(Damage { file: "journal.fj".into(), offset: j.file_len()?, len: 0, what: why, points: all.clone() });
    }
    drop(_reading);
    // The replica against its sums.
    let mut chunks_checked = 0u64;
    if let Some(sums) = Sums::open(&p.sums, meta.size, false)? {
        let replica = std::fs::File::open(&p.replica).map_err(|e| DiskError::Io(format!("{}: {e}", p.replica.display())))?;
        let size = meta.size.min(len);
        let mut bad: Vec<(u64, u64)> = Vec::new();
        chunks_checked = crate::sums::compare(
            (&replica, &p.replica.display().to_string()),
            size,
            (&sums, &replica, &p.dir),
            |c| -> Result<(), DiskError> {
                match bad.last_mut() {
                    Some((_, e)) if *e == c * CHUNK => *e += CHUNK,
                    _ => bad.push((c * CHUNK, (c + 1) * CHUNK)),
                }
                Ok(())
            },
            |n| {
                bytes_read += n;
                if rate > 0 {
                    let due = Duration::from_secs_f64(bytes_read as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            },
        )?;
        for (a, b) in bad {
            damage.push(Damage {
                file: "replica.img".into(),
                offset: a,
                len: b.min(meta.size) - a,
                what: "replica chunks that do not match their checksums".into(),
                points: all.clone(),
            });
        }
    } else {
        damage.push(Damage {
            file: "replica.sums".into(),
            offset: 0,
            len: 0,
            what: "no replica sums yet (the master target builds them when it next opens the disk): the replica was not checked".into(),
            points: Vec::new(),
        });
    }
    let out = Outcome {
        name: name.into(),
        time_ns: ferry_common::now_ns(),
        seconds: t0.elapsed().as_secs_f64(),
        chunks_checked,
        bytes_read,
        damage,
    };
    if let Err(e) = write_state(&p.dir.join("verify.state"), STATE_KIND, STATE_VERSION, &out) {
        log::warn!("disk {name}: cannot record the verify result: {e}");
    }
    Ok(out)
}

/// The last verify's result, if one ran.
pub fn last(data: &Path, name: &str) -> Option<Outcome> {
    read_state(&Paths::new(data, name).dir.join("verify.state"), STATE_KIND, STATE_VERSION).ok().flatten()
}

/// `--scrub-every`: verify every disk under `data` every `every`, at `rate`.
pub fn scrub_loop(data: &Path, every: Duration, rate: u64) {
    loop {
        std::thread::sleep(every);
        let Ok(rd) = std::fs::read_dir(data) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !e.path().join("disk.meta").exists() {
                continue;
            }
            match verify(data, &name, rate) {
                Ok(o) if o.ok() => log::info!("disk {name}: scrub: {} chunks checked in {:.1}s, no damage", o.chunks_checked, o.seconds),
                Ok(o) => {
                    for d in &o.damage {
                        log::warn!("disk {name}: scrub: {} at byte {} (+{}): {}; points {:?}", d.file, d.offset, d.len, d.what, d.points);
                    }
                }
                Err(e) => log::warn!("disk {name}: scrub: {e}"),
            }
        }
    }
}

/// Free and total bytes of the filesystem holding `path` (statvfs).
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; a zeroed value is valid to overwrite.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills `s` from a valid NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64 * s.f_frsize as u64, s.f_blocks as u64 * s.f_frsize as u64))
}

/// The master target's view of one disk, for `ferry status --data`.
#[derive(serde::Serialize, Clone, Debug)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    /// A stream holds the disk now (an agent is connected to a master target).
    pub streaming: bool,
    pub points: usize,
    pub newest_point: Option<u64>,
    pub newest_point_age_seconds: Option<f64>,
    /// Bytes the journal takes on disk (punched space excluded).
    pub journal_bytes: u64,
    pub durable_seq: Option<u64>,
    pub free_bytes: Option<u64>,
    pub fs_bytes: Option<u64>,
    pub last_verify: Option<Outcome>,
    pub damage: Option<String>,
    pub failover: Option<String>,
    pub health: &'static str,
    pub health_reason: String,
}

/// What `ferry status --data DIR --name NAME` shows.
pub fn disk_status(data: &Path, name: &str) -> Result<DiskStatus, DiskError> {
    use std::os::unix::fs::MetadataExt;
    let p = Paths::new(data, name);
    let (meta, damage) = match read_meta(data, name) {
        Ok(m) => (Some(m), None),
        Err(DiskError::Damaged { why, .. }) => (None, Some(why)),
        Err(e) => return Err(e),
    };
    let cat = catalog::scan(&p.points).unwrap_or_default();
    let now = ferry_common::now_ns();
    let newest = cat.points.last().copied();
    // The stream's writer lock is held (tried without waiting, released at once).
    let streaming = p.lock.exists() && matches!(crate::disk::lock(&p, name), Err(DiskError::Busy(_)));
    let journal_bytes = std::fs::metadata(&p.journal).map(|m| m.blocks() * 512).unwrap_or(0);
    let durable_seq = meta
        .as_ref()
        .and_then(|m| Sums::open(&p.sums, m.size, false).ok().flatten())
        .and_then(|s| s.mark().ok().flatten())
        .map(|m| m.durable_seq);
    let space = fs_space(&p.dir);
    let last_verify = last(data, name);
    let failover = crate::failover::refuse_if_failed_over(&p, name).err().map(|e| match e {
        DiskError::FailedOver { why, .. } => why,
        e => e.to_string(),
    });
    let mut health = "OK";
    let mut why: Vec<String> = Vec::new();
    if let Some(d) = &damage {
        health = "CRIT";
        why.push(format!("damaged: {d}"));
    }
    if let Some(v) = &last_verify {
        if !v.ok() {
            health = "CRIT";
            why.push(format!("the last verify found {} damaged range(s)", v.damage.len()));
        }
    }
    if let Some((free, total)) = space {
        if free < total / 100 || free < (64 << 20) {
            health = "CRIT";
            why.push(format!("{} bytes free of {total}: the journal cannot grow; tighten retention (ferry retention --journal-cap)", free));
        } else if free < total / 10 {
            if health == "OK" {
                health = "WARN";
            }
            why.push(format!("only {free} bytes free of {total}"));
        }
    }
    if let Some(f) = &failover {
        if health == "OK" {
            health = "WARN";
        }
        why.push(format!("failed over: {f}"));
    }
    let health_reason = if why.is_empty() {
        format!(
            "{} points, newest {}",
            cat.points.len(),
            newest.map_or("none".into(), |q| format!("{}s old", now.saturating_sub(q.time_ns) / 1_000_000_000))
        )
    } else {
        why.join("; ")
    };
    Ok(DiskStatus {
        name: name.into(),
        size: meta.as_ref().map_or(0, |m| m.size),
        streaming,
        points: cat.points.len(),
        newest_point: newest.map(|q| q.id),
        newest_point_age_seconds: newest.map(|q| now.saturating_sub(q.time_ns) as f64 / 1e9),
        journal_bytes,
        durable_seq,
        free_bytes: space.map(|s| s.0),
        fs_bytes: space.map(|s| s.1),
        last_verify,
        damage,
        failover,
        health,
        health_reason,
    })
}
