//! The catalog of recovery points: `DIR/NAME/points.log`.
//!
//! An append-only file of fixed 64-byte records, oldest first:
//!
//! ```text
//! record = MAGIC:u32 || VERSION:u16 (1) || KIND:u8 (1 crash, 2 app, 3 group)
//!          || PAD:u8 (0) || ID:u64 || SEQ:u64 || TIME_NS:u64
//!          || JOURNAL_POS:u64 || RESERVED:u64 (0)
//!          || XXH3_128(previous 48 bytes):16
//! ```
//!
//! A point is appended only after the journal COMMIT covering its SEQ is
//! durable, so every listed point is recoverable. JOURNAL_POS is where the
//! journal stood when the point's TAG was applied: every record with a larger
//! seq lies at or after it, so recovery reads only the journal after the
//! point. Each record is checked on its own: a record cut short at the very
//! end (or an all-zero last record) is a torn tail, which the master target
//! cuts off at start; any other invalid record is damage, reported, never
//! cut, and the valid records after it are still listed.

use ferry_proto::PointKind;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use xxhash_rust::const_xxh3::xxh3_64 as const_xxh3_64;

/// Record magic: low 32 bits of xxh3-64("ferry recovery point v1"). Do not modify.
pub const MAGIC: u32 = const_xxh3_64(b"ferry recovery point v1") as u32;
pub const VERSION: u16 = 1;
pub const RECORD: usize = 64;

/// One recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub id: u64,
    pub seq: u64,
    pub time_ns: u64,
    pub kind: PointKind,
    pub journal_pos: u64,
}

impl Point {
    fn pack(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.time_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.journal_pos.to_le_bytes());
        let s = ferry_common::xxh128(&b[..48]);
        b[48..64].copy_from_slice(&s);
        b
    }

    fn unpack(b: &[u8; RECORD]) -> Option<Point> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        if u32::from_le_bytes(b[0..4].try_into().ok()?) != MAGIC
            || u16::from_le_bytes(b[4..6].try_into().ok()?) != VERSION
            || b[7] != 0
            || u64_at(40) != 0
            || ferry_common::xxh128(&b[..48]) != b[48..64]
        {
            return None;
        }
        Some(Point { id: u64_at(8), seq: u64_at(16), time_ns: u64_at(24), kind: PointKind::from_u8(b[6])?, journal_pos: u64_at(32) })
    }
}

/// What a read of the catalog found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every valid record, in file order.
    pub points: Vec<Point>,
    /// Complete records that fail their checks: (byte offset, index). Such
    /// a record is damage, not a tail being written: the records after it
    /// are still read and listed, and nothing is cut.
    pub damaged: Vec<(u64, usize)>,
    /// Where a torn tail starts: a record cut short at the very end, or a
    /// last record that is all zeros (the file grew but the record never
    /// reached the disk). Only this is ever cut off.
    pub torn_from: Option<u64>,
    pub len: u64,
}

impl Scan {
    /// One line naming each damaged record, for logs and errors.
    pub fn damage_report(&self, path: &Path) -> Option<String> {
        if self.damaged.is_empty() {
            return None;
        }
        let list: Vec<String> = self.damaged.iter().map(|(off, i)| format!("record {} at byte {off}", i + 1)).collect();
        Some(format!(
            "{}: {} damaged ({} valid points still listed; the points those records held cannot be recovered)",
            path.display(),
            list.join(", "),
            self.points.len()
        ))
    }
}

/// Read the catalog, checking each record on its own.
pub fn scan(path: &Path) -> io::Result<Scan> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(e),
    };
    let mut out = Scan { len: data.len() as u64, ..Default::default() };
    let full = data.len() / RECORD;
    for (i, c) in data.chunks_exact(RECORD).enumerate() {
        match Point::unpack(c.try_into().expect("64")) {
            Some(p) => out.points.push(p),
            None if i + 1 == full && data.len() % RECORD == 0 && c.iter().all(|&b| b == 0) => out.torn_from = Some((i * RECORD) as u64),
            None => out.damaged.push(((i * RECORD) as u64, i)),
        }
    }
    if data.len() % RECORD != 0 && out.torn_from.is_none() {
        out.torn_from = Some((full * RECORD) as u64);
    }
    Ok(out)
}

/// Read every valid point; also returns the length the catalog keeps (all
/// of it but a torn tail). Damaged records are logged, once per call.
pub fn read_points(path: &Path) -> io::Result<(Vec<Point>, u64)> {
    let s = scan(path)?;
    if let Some(r) = s.damage_report(path) {
        log::warn!("{r}");
    }
    let keep = s.torn_from.unwrap_or(s.len);
    Ok((s.points, keep))
}

/// The appending side.
pub struct Catalog {
    file: File,
    len: u64,
    pub next_id: u64,
}

impl Catalog {
    /// Open (creating) the catalog, cutting off a torn tail.
    pub fn open(path: &Path) -> io::Result<(Catalog, Vec<Point>)> {
        let (points, valid) = read_points(path)?;
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        if file.metadata()?.len() != valid {
            log::warn!("{}: discarding a torn tail (a record cut short at the end) after {} points", path.display(), points.len());
            file.set_len(valid)?;
            file.sync_all()?;
        }
        let next_id = points.iter().map(|p| p.id + 1).max().unwrap_or(1);
        Ok((Catalog { file, len: valid, next_id }, points))
    }

    /// Append a point (not yet durable: call [`Catalog::sync`]).
    pub fn append(&mut self, seq: u64, time_ns: u64, kind: PointKind, journal_pos: u64) -> io::Result<Point> {
        let p = Point { id: self.next_id, seq, time_ns, kind, journal_pos };
        self.file.write_all_at(&p.pack(), self.len)?;
        self.len += RECORD as u64;
        self.next_id += 1;
        Ok(p)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Replace the catalog with `keep` (retention), atomically: a new file
    /// is written and made durable, then renamed over the old one. Ids are
    /// kept (the newest point is always among them, so the next id is too).
    pub fn rewrite(&mut self, path: &Path, keep: &[Point]) -> io::Result<()> {
        let tmp = path.with_extension("log.tmp");
        let mut data = Vec::with_capacity(keep.len() * RECORD);
        for p in keep {
            data.extend_from_slice(&p.pack());
        }
        {
            let f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all_at(&data, 0)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().read(true).write(true).open(path)?;
        self.len = data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_and_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("points.log");
        let (mut c, pts) = Catalog::open(&p).unwrap();
        assert!(pts.is_empty());
        c.append(5, 100, PointKind::Crash, 64).unwrap();
        c.append(9, 200, PointKind::App, 128).unwrap();
        c.sync().unwrap();
        drop(c);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[1, 2, 3], 128).unwrap(); // a torn third record
        let (c, pts) = Catalog::open(&p).unwrap();
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[1], Point { id: 2, seq: 9, time_ns: 200, kind: PointKind::App, journal_pos: 128 });
        assert_eq!(c.next_id, 3);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 128);
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_reported_never_cut() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("points.log");
        let (mut c, _) = Catalog::open(&p).unwrap();
        for i in 0..6 {
            c.append(10 * (i + 1), 100 + i, PointKind::Crash, 64 * (i + 1)).unwrap();
        }
        c.sync().unwrap();
        drop(c);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x5a], 64 + 20).unwrap(); // one byte of record 2
        let s = scan(&p).unwrap();
        assert_eq!(s.points.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 3, 4, 5, 6]);
        assert_eq!(s.damaged, vec![(64, 1)]);
        assert_eq!(s.torn_from, None);
        assert!(s.damage_report(&p).unwrap().contains("record 2 at byte 64"));
        // Opening for append keeps every byte, and numbering goes on.
        let (mut c, pts) = Catalog::open(&p).unwrap();
        assert_eq!(pts.len(), 5);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 6 * 64);
        assert_eq!(c.append(70, 107, PointKind::Crash, 512).unwrap().id, 7);
        // A zeroed last record is a torn tail, not damage.
        f.set_len(8 * 64).unwrap();
        let s = scan(&p).unwrap();
        assert_eq!(s.torn_from, Some(7 * 64));
        assert_eq!(s.damaged.len(), 1);
    }
}
