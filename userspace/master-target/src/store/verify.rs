//! `ferry verify` (a scrub): checks a disk folder end to end while the master
//! target may be serving it, at a rate limit, and records the result in
//! `DIR/NAME/verify.state` for `ferry status --data` (ops.rs).
//!
//! What it checks, in order: the folder is complete and `disk.meta` reads;
//! the replica has the disk's size; every catalog record; the journal from
//! the oldest point on (record checksums, commits in increasing order, no
//! bad record followed by a commit) and its end against the replica's
//! durable mark; then every 64 KiB chunk of the replica against its sum. A
//! chunk that differs is read again under the folder's apply lock (a running
//! master target may be rewriting it) before it is called damage.

use super::catalog;
use super::folder::{ioe, read_meta, DiskError, Paths};
use super::journal::{JournalReader, HEADER_LEN, KIND_COMMIT};
use super::lock::RecoveryLock;
use super::settle::{self, check_mark};
use super::sums::{self, Sums, CHUNK};
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
    settle::settle(data, name)?;
    // The catalog and the journal from the oldest point on (before it,
    // retention punched it), under the recovery lock: retention does not
    // drop points or punch meanwhile.
    let _reading = RecoveryLock::shared(&p).ok();
    let mut damage = Vec::new();
    let cat = catalog::scan(&p.points).map_err(ioe(p.points.display()))?;
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
    let len = std::fs::metadata(&p.replica).map_err(ioe(p.replica.display()))?.len();
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
        let replica = std::fs::File::open(&p.replica).map_err(ioe(p.replica.display()))?;
        let size = meta.size.min(len);
        let mut bad: Vec<(u64, u64)> = Vec::new();
        chunks_checked = sums::compare(
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
