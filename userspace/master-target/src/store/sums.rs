//! Replica sums: `DIR/NAME/replica.sums`, an xxh3-128 of every 64 KiB chunk
//! of the replica, made of an xxh3-128 of every 4 KiB block, and the
//! replica's durable mark.
//!
//! ```text
//! file   = HEADER (64) || MARK (64) || zero padding to 4096
//!          || SUM:[u8;16] * chunks || zero padding to a multiple of 4096
//!          || FINE:[u8;16] * blocks
//! HEADER = MAGIC:u64 = xxh3-64("ferry replica sums v2") || VERSION:u32 = 2
//!          || CHUNK:u32 = 65536 || SIZE:u64 (the disk's) || BLOCK:u32 = 4096
//!          || RESERVED:[u8;20] = 0 || XXH3_128(first 48 bytes):16
//! MARK   = MARK_MAGIC:u32 = low 32 bits of xxh3-64("ferry replica mark v1")
//!          || PAD:u32 = 0 || DURABLE_SEQ:u64 || JOURNAL_END:u64
//!          || RESERVED:[u8;24] = 0 || XXH3_128(first 48 bytes):16
//! FINE   = xxh3-128 of the 4 KiB block (the last one: of its part inside
//!          the disk), or 16 zero bytes for a block that is all zeros
//! SUM    = xxh3-128 of the chunk's FINE sums in order (16 of them; the
//!          last chunk: as many as it has blocks), or 16 zero bytes for a
//!          chunk that is all zeros (so a new replica's sums file is one hole)
//! ```
//!
//! Why two levels (v2): a batch of scattered 4 KiB writes hashes each
//! written block once, from the page cache it was just written to, and
//! each chunk's sum from its 16 block sums (256 bytes), instead of reading
//! and hashing the whole 64 KiB chunk around every write (v1: 16 times the
//! bytes written, and cold reads of the rest of each chunk). Checks still
//! work on chunks: read 64 KiB, hash its blocks, hash those sums, compare
//! with SUM. A v1 file is rebuilt from the replica at the master target's
//! next open (settle.rs), as a missing one is; until then, readers check
//! against it as v1 defined its sums ([`Sums::sum_of`]).
//!
//! Crash ordering: after a batch's COMMIT is durable in the journal, the
//! sums of every chunk it touched are written (not yet made durable). At
//! most once a second, on the agent's idle PING, before retention punches
//! the journal, and when the stream ends, the sums are made durable and then
//! the MARK is written and made durable: the durable sequence and the
//! journal's end at that moment. So, at open:
//! - MARK older than the journal's last COMMIT: batches after it may have
//!   sums that never reached the disk. Every range written since the start
//!   of the interval (between two points) that holds the mark has a record
//!   in `journal.fj` from that interval's start on (copy on first write keeps
//!   the first overwrite of each range there), and the batch in progress the
//!   rest in `batch.fj`: those ranges are hashed again.
//! - MARK naming a COMMIT the journal does not hold (it was cut short or
//!   replaced): records are missing at the end of the journal: damage; no
//!   point can be vouched for. A cut within the last second of a running
//!   master target's writes can go unseen; a folder at rest is checked to
//!   its end.
//! - A batch rolled back at open never reached the sums.
//!
//! The mark is 64 bytes inside one sector: it is written whole or not.

use super::folder::DiskError;
use super::lock::ApplyLock;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use xxhash_rust::const_xxh3::xxh3_64 as const_xxh3_64;

pub const MAGIC: u64 = const_xxh3_64(b"ferry replica sums v2");
/// The first format: chunk sums only (rebuilt when found).
pub const MAGIC_V1: u64 = const_xxh3_64(b"ferry replica sums v1");
pub const MARK_MAGIC: u32 = const_xxh3_64(b"ferry replica mark v1") as u32;
pub const VERSION: u32 = 2;
pub const CHUNK: u64 = 64 << 10;
/// The fine level: one sum per block.
pub const BLOCK: u64 = 4096;
const BODY: u64 = 4096;

/// Where the block sums start in a sums file for a disk of `size` bytes.
fn fine_start(size: u64) -> u64 {
    (BODY + size.div_ceil(CHUNK) * 16).div_ceil(4096) * 4096
}

/// The length of a sums file for a disk of `size` bytes.
fn file_len(size: u64) -> u64 {
    fine_start(size) + size.div_ceil(BLOCK) * 16
}

/// The replica's durable mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mark {
    pub durable_seq: u64,
    pub journal_end: u64,
}

/// The sum stored for a block (at most [`BLOCK`] bytes).
pub fn block_sum(data: &[u8]) -> [u8; 16] {
    if ferry_common::is_zero(data) {
        [0; 16]
    } else {
        ferry_common::xxh128(data)
    }
}

/// A chunk's sum from its blocks' sums, in order.
fn combine(fine: &[u8]) -> [u8; 16] {
    if fine.iter().all(|&b| b == 0) {
        [0; 16]
    } else {
        ferry_common::xxh128(fine)
    }
}

/// The sum stored for a chunk (at most [`CHUNK`] bytes of it).
pub fn chunk_sum(data: &[u8]) -> [u8; 16] {
    let mut fine = [0u8; (CHUNK / BLOCK) as usize * 16];
    let mut n = 0;
    for b in data.chunks(BLOCK as usize) {
        fine[n..n + 16].copy_from_slice(&block_sum(b));
        n += 16;
    }
    combine(&fine[..n])
}

fn header(size: u64) -> [u8; 64] {
    header_of(MAGIC, VERSION, size, BLOCK as u32)
}

/// The header of a first-format file (chunk sums only, no BLOCK field).
fn header_v1(size: u64) -> [u8; 64] {
    header_of(MAGIC_V1, 1, size, 0)
}

fn header_of(magic: u64, version: u32, size: u64, block: u32) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(&magic.to_le_bytes());
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&(CHUNK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..28].copy_from_slice(&block.to_le_bytes());
    let s = ferry_common::xxh128(&h[..48]);
    h[48..64].copy_from_slice(&s);
    h
}

fn mark_bytes(m: Mark) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..4].copy_from_slice(&MARK_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&m.durable_seq.to_le_bytes());
    b[16..24].copy_from_slice(&m.journal_end.to_le_bytes());
    let s = ferry_common::xxh128(&b[..48]);
    b[48..64].copy_from_slice(&s);
    b
}

/// Why a sums file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SumsError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
}

impl From<SumsError> for DiskError {
    fn from(e: SumsError) -> DiskError {
        match e {
            SumsError::Io { path, source } => DiskError::Io { what: path, source },
            SumsError::Bad { path, why } => DiskError::BadSums { path, why },
        }
    }
}

/// An open sums file.
pub struct Sums {
    file: File,
    path: String,
    pub size: u64,
    /// 2, or 1 for a file of the first format opened to read (checks only:
    /// the master target rebuilds it before it writes).
    version: u32,
}

impl Sums {
    fn io(&self) -> impl FnOnce(io::Error) -> SumsError + '_ {
        move |source| SumsError::Io { path: self.path.clone(), source }
    }

    /// Open an existing sums file for a disk of `size` bytes (`None`: no file).
    pub fn open(path: &Path, size: u64, write: bool) -> Result<Option<Sums>, SumsError> {
        let p = path.display().to_string();
        let file = match OpenOptions::new().read(true).write(write).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SumsError::Io { path: p, source }),
        };
        let mut s = Sums { file, path: p, size, version: VERSION };
        let mut h = [0u8; 64];
        s.file.read_exact_at(&mut h, 0).map_err(|e| SumsError::Bad { path: s.path.clone(), why: format!("unreadable header: {e}") })?;
        if h == header_v1(size) && !write {
            s.version = 1;
        } else if h != header(size) {
            let why = if h[0..8] == MAGIC_V1.to_le_bytes() {
                "in the first format (chunk sums only), which this ferry rebuilds".to_string()
            } else {
                format!("not the sums of a {size}-byte disk (bad header)")
            };
            return Err(SumsError::Bad { path: s.path.clone(), why });
        }
        Ok(Some(s))
    }

    /// The sum this file stores for a chunk holding `data` ([`chunk_sum`];
    /// a first-format file: the chunk's own xxh3-128).
    pub fn sum_of(&self, data: &[u8]) -> [u8; 16] {
        if self.version == 1 {
            block_sum(data)
        } else {
            chunk_sum(data)
        }
    }

    /// Create a sums file for the replica as it is (every chunk read and
    /// hashed), with mark `m`. Written to a temporary name and renamed.
    pub fn build(path: &Path, replica: &File, size: u64, m: Mark) -> Result<Sums, SumsError> {
        let tmp = path.with_extension("sums.tmp");
        let p = tmp.display().to_string();
        let io = |source| SumsError::Io { path: p.clone(), source };
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(io)?;
        f.write_all_at(&header(size), 0).map_err(io)?;
        f.write_all_at(&mark_bytes(m), 64).map_err(io)?;
        f.set_len(file_len(size)).map_err(io)?;
        // Allocated now (16 bytes per 4 KiB and per 64 KiB: 0.4% of the
        // disk), so that updating a sum never fails for lack of space after
        // a COMMIT.
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: fallocate on an fd owned by `f`; no memory is passed.
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, file_len(size) as libc::off_t) };
            if rc != 0 {
                return Err(SumsError::Io { path: p.clone(), source: io::Error::last_os_error() });
            }
        }
        let mut buf = vec![0u8; 4 << 20];
        let (mut out, mut fine) = (Vec::with_capacity(1 << 16), Vec::with_capacity(1 << 16));
        // Only the replica's data extents are read: a hole's chunks are zero,
        // which the sparse sums file already says.
        let mut pos = 0u64;
        while pos < size {
            let (a, b) = data_extent(replica, pos, size);
            if a >= size {
                break;
            }
            let (a, b) = (a / CHUNK * CHUNK, b.div_ceil(CHUNK).saturating_mul(CHUNK).min(size));
            let mut at = a.max(pos);
            while at < b {
                let n = ((b - at) as usize).min(buf.len());
                replica.read_exact_at(&mut buf[..n], at).map_err(|source| SumsError::Io { path: "replica".into(), source })?;
                out.clear();
                fine.clear();
                for c in buf[..n].chunks(CHUNK as usize) {
                    let from = fine.len();
                    for blk in c.chunks(BLOCK as usize) {
                        fine.extend_from_slice(&block_sum(blk));
                    }
                    out.extend_from_slice(&combine(&fine[from..]));
                }
                if out.iter().any(|&x| x != 0) {
                    f.write_all_at(&out, BODY + at / CHUNK * 16).map_err(io)?;
                    f.write_all_at(&fine, fine_start(size) + at / BLOCK * 16).map_err(io)?;
                }
                at += n as u64;
            }
            pos = b.max(pos + 1);
        }
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(d) = path.parent() {
            let _ = ferry_common::durable::fsync_dir(d);
        }
        Ok(Sums { file: f, path: path.display().to_string(), size, version: VERSION })
    }

    /// The mark, if it reads.
    pub fn mark(&self) -> Result<Option<Mark>, SumsError> {
        let mut b = [0u8; 64];
        self.file.read_exact_at(&mut b, 64).map_err(self.io())?;
        if u32::from_le_bytes(b[0..4].try_into().expect("4")) != MARK_MAGIC || ferry_common::xxh128(&b[..48]) != b[48..64] {
            return Ok(None);
        }
        let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        Ok(Some(Mark { durable_seq: u(8), journal_end: u(16) }))
    }

    /// Stored sums of chunks `[first, first + n)`.
    pub fn get(&self, first: u64, n: usize) -> Result<Vec<[u8; 16]>, SumsError> {
        let mut b = vec![0u8; n * 16];
        self.file.read_exact_at(&mut b, BODY + first * 16).map_err(self.io())?;
        Ok(b.chunks_exact(16).map(|c| c.try_into().expect("16")).collect())
    }

    /// Hash again, from `replica`, every block that `ranges` touch, then
    /// the sums of their chunks from their blocks' sums.
    pub fn update(&self, replica: &File, ranges: &[(u64, u64)]) -> Result<(), SumsError> {
        let nblocks = self.size.div_ceil(BLOCK);
        let mut blocks: Vec<u64> = Vec::new();
        for &(a, b) in ranges {
            if b > a {
                blocks.extend(a / BLOCK..b.div_ceil(BLOCK).min(nblocks));
            }
        }
        blocks.sort_unstable();
        blocks.dedup();
        let rio = |source| SumsError::Io { path: "replica".into(), source };
        // Runs of neighbouring blocks (up to 4 MiB) in one read and one write.
        let fine0 = fine_start(self.size);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for run in runs(&blocks, 1024) {
            let (first, count) = (run[0], run.len() as u64);
            let n = ((first + count) * BLOCK).min(self.size) - first * BLOCK;
            buf.resize(n as usize, 0);
            replica.read_exact_at(&mut buf, first * BLOCK).map_err(rio)?;
            out.clear();
            for blk in buf.chunks(BLOCK as usize) {
                out.extend_from_slice(&block_sum(blk));
            }
            self.file.write_all_at(&out, fine0 + first * 16).map_err(self.io())?;
        }
        // Then each touched chunk from its blocks' sums (256 bytes).
        let mut chunks: Vec<u64> = blocks.iter().map(|b| b * BLOCK / CHUNK).collect();
        chunks.dedup();
        let per = CHUNK / BLOCK;
        for run in runs(&chunks, 64) {
            let (first, count) = (run[0], run.len() as u64);
            let (b0, b1) = (first * per, ((first + count) * per).min(nblocks));
            buf.resize(((b1 - b0) * 16) as usize, 0);
            self.file.read_exact_at(&mut buf, fine0 + b0 * 16).map_err(self.io())?;
            out.clear();
            for fine in buf.chunks((per * 16) as usize) {
                out.extend_from_slice(&combine(fine));
            }
            self.file.write_all_at(&out, BODY + first * 16).map_err(self.io())?;
        }
        Ok(())
    }

    /// Write the mark (durable with [`Sums::sync`]).
    pub fn set_mark(&self, m: Mark) -> Result<(), SumsError> {
        self.file.write_all_at(&mark_bytes(m), 64).map_err(self.io())
    }

    pub fn sync(&self) -> Result<(), SumsError> {
        self.file.sync_data().map_err(self.io())
    }
}

/// `sorted` (increasing, distinct) cut into runs of consecutive values, at
/// most `max` long.
fn runs(sorted: &[u64], max: usize) -> impl Iterator<Item = &[u64]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= sorted.len() {
            return None;
        }
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 && j - i < max {
            j += 1;
        }
        let r = &sorted[i..j];
        i = j;
        Some(r)
    })
}

/// The next data extent `[start, end)` at or after `pos` (SEEK_DATA and
/// SEEK_HOLE; the whole rest where the filesystem cannot tell).
fn data_extent(f: &File, pos: u64, size: u64) -> (u64, u64) {
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an fd owned by `f`; no memory is passed.
    let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => (size, size),
            _ => (pos, size),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    (start as u64, if end < 0 { size } else { (end as u64).min(size) })
}

/// [`check_chunk`] under the folder's apply lock (shared), so a master
/// target applying a batch cannot be caught between a chunk's content and
/// its sum: a mismatch is damage. A folder whose lock file cannot be made
/// (a read-only copy) has no writer: the check runs without it.
pub fn check_chunk_settled(dir: &Path, sums: &Sums, replica: &File, c: u64, buf: &mut [u8]) -> Result<bool, SumsError> {
    let lock = ApplyLock::open(dir).ok();
    let _shared = match &lock {
        Some(l) => Some(l.shared().map_err(|source| SumsError::Io { path: dir.join("apply.lock").display().to_string(), source })?),
        None => None,
    };
    check_chunk(sums, replica, c, buf)
}

/// Read `file` (a copy of the replica, or the replica itself) chunk by chunk
/// up to `size` and check each chunk against its sum; a chunk that differs
/// is checked again on the replica under the apply lock
/// ([`check_chunk_settled`]), and if it still differs, `bad(chunk index)`
/// decides (stop with an error, or note it and go on). `after_read(bytes)`
/// runs after each 4 MiB read (a rate limit). Returns the chunks checked.
pub fn compare<E: From<SumsError>>(
    (file, what): (&File, &str),
    size: u64,
    (sums, replica, dir): (&Sums, &File, &Path),
    mut bad: impl FnMut(u64) -> Result<(), E>,
    mut after_read: impl FnMut(u64),
) -> Result<u64, E> {
    const PER: usize = 64; // chunks per read (4 MiB)
    let mut buf = vec![0u8; PER * CHUNK as usize];
    let mut one = vec![0u8; CHUNK as usize];
    let mut c0 = 0u64;
    let mut checked = 0u64;
    while c0 * CHUNK < size {
        let n = ((size - c0 * CHUNK).min(PER as u64 * CHUNK)) as usize;
        file.read_exact_at(&mut buf[..n], c0 * CHUNK).map_err(|source| SumsError::Io { path: what.into(), source })?;
        let computed: Vec<[u8; 16]> = buf[..n].chunks(CHUNK as usize).map(|c| sums.sum_of(c)).collect();
        checked += computed.len() as u64;
        check_computed(c0, &computed, (sums, replica, dir), &mut one, &mut bad)?;
        after_read(n as u64);
        c0 += PER as u64;
    }
    Ok(checked)
}

/// Sums `computed` of chunks `[c0, c0 + computed.len())` as read, against
/// the stored ones; a chunk that differs is checked again on the replica
/// under the apply lock ([`check_chunk_settled`]), and if it still differs,
/// `bad(chunk index)` decides. `one` is a buffer for that re-read.
pub fn check_computed<E: From<SumsError>>(
    c0: u64,
    computed: &[[u8; 16]],
    (sums, replica, dir): (&Sums, &File, &Path),
    one: &mut Vec<u8>,
    mut bad: impl FnMut(u64) -> Result<(), E>,
) -> Result<(), E> {
    let stored = sums.get(c0, computed.len())?;
    for (i, (a, b)) in computed.iter().zip(&stored).enumerate() {
        if a == b {
            continue;
        }
        one.resize(CHUNK as usize, 0);
        if !check_chunk_settled(dir, sums, replica, c0 + i as u64, one)? {
            bad(c0 + i as u64)?;
        }
    }
    Ok(())
}

/// Check one chunk of `replica` against `sums`: `Ok(true)` when it matches.
pub fn check_chunk(sums: &Sums, replica: &File, c: u64, buf: &mut [u8]) -> Result<bool, SumsError> {
    let off = c * CHUNK;
    let n = (sums.size - off).min(CHUNK) as usize;
    replica.read_exact_at(&mut buf[..n], off).map_err(|source| SumsError::Io { path: "replica".into(), source })?;
    Ok(sums.get(c, 1)?[0] == sums.sum_of(&buf[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_update_mark_and_check() {
        let d = tempfile::tempdir().unwrap();
        let rp = d.path().join("replica.img");
        let size = 5 * CHUNK + 4096;
        let r = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&rp).unwrap();
        r.set_len(size).unwrap();
        r.write_all_at(&[7u8; 100], CHUNK + 10).unwrap();
        let sp = d.path().join("replica.sums");
        let s = Sums::build(&sp, &r, size, Mark { durable_seq: 3, journal_end: 64 }).unwrap();
        assert_eq!(s.mark().unwrap(), Some(Mark { durable_seq: 3, journal_end: 64 }));
        let mut buf = vec![0u8; CHUNK as usize];
        for c in 0..6 {
            assert!(check_chunk(&s, &r, c, &mut buf).unwrap(), "chunk {c}");
        }
        assert_eq!(s.get(0, 1).unwrap()[0], [0; 16], "a zero chunk is stored as zeros");
        r.write_all_at(&[9u8; 10], 5 * CHUNK + 100).unwrap();
        assert!(!check_chunk(&s, &r, 5, &mut buf).unwrap());
        s.update(&r, &[(5 * CHUNK + 100, 5 * CHUNK + 110)]).unwrap();
        assert!(check_chunk(&s, &r, 5, &mut buf).unwrap());
        s.set_mark(Mark { durable_seq: 9, journal_end: 999 }).unwrap();
        drop(s);
        let s = Sums::open(&sp, size, false).unwrap().unwrap();
        assert_eq!(s.mark().unwrap(), Some(Mark { durable_seq: 9, journal_end: 999 }));
        assert!(Sums::open(&sp, size + 512, false).is_err(), "sums of another size are refused");
    }

    /// Updating the sums of scattered blocks (and of unaligned ranges, and
    /// the short last block) gives exactly the file a build from the
    /// replica gives; a v1 file is refused as such.
    #[test]
    fn updates_give_what_a_build_gives() {
        let d = tempfile::tempdir().unwrap();
        let rp = d.path().join("replica.img");
        let size = 40 * CHUNK + 3 * BLOCK + 512;
        let r = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&rp).unwrap();
        r.set_len(size).unwrap();
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let off = next() % (size - 100);
            r.write_all_at(&[next() as u8 | 1; 100], off).unwrap();
        }
        let sp = d.path().join("replica.sums");
        let m = Mark { durable_seq: 1, journal_end: 64 };
        let s = Sums::build(&sp, &r, size, m).unwrap();
        let mut ranges = Vec::new();
        for i in 0..300u64 {
            let (off, len) = match i % 3 {
                0 => (next() % (size / BLOCK) * BLOCK, BLOCK),
                1 => (next() % (size - 9000), 1 + next() % 9000),
                _ => (size - 200, 200),
            };
            let byte = if i % 5 == 0 { 0 } else { next() as u8 | 1 };
            r.write_all_at(&vec![byte; len as usize], off).unwrap();
            ranges.push((off, off + len));
        }
        s.update(&r, &ranges).unwrap();
        let mut buf = vec![0u8; CHUNK as usize];
        for c in 0..size.div_ceil(CHUNK) {
            assert!(check_chunk(&s, &r, c, &mut buf).unwrap(), "chunk {c}");
        }
        let updated = std::fs::read(&sp).unwrap();
        drop(s);
        let rebuilt = d.path().join("rebuilt.sums");
        Sums::build(&rebuilt, &r, size, m).unwrap();
        assert!(updated == std::fs::read(&rebuilt).unwrap(), "updated sums differ from rebuilt ones");
        // A file of the first format (chunk sums of the data itself): read
        // for checks, refused for writing (the master target rebuilds it).
        let f = OpenOptions::new().write(true).truncate(true).open(&sp).unwrap();
        f.write_all_at(&header_v1(size), 0).unwrap();
        let mut v1 = Vec::new();
        for c in 0..size.div_ceil(CHUNK) {
            let n = (size - c * CHUNK).min(CHUNK) as usize;
            r.read_exact_at(&mut buf[..n], c * CHUNK).unwrap();
            v1.extend_from_slice(&block_sum(&buf[..n]));
        }
        f.write_all_at(&v1, BODY).unwrap();
        let old = Sums::open(&sp, size, false).unwrap().unwrap();
        for c in 0..size.div_ceil(CHUNK) {
            assert!(check_chunk(&old, &r, c, &mut buf).unwrap(), "v1 chunk {c}");
        }
        r.write_all_at(&[0xee], 3 * CHUNK + 7).unwrap();
        assert!(!check_chunk(&old, &r, 3, &mut buf).unwrap(), "v1 checks still find a change");
        let e = Sums::open(&sp, size, true).err().expect("a v1 file is refused for writing").to_string();
        assert!(e.contains("first format"), "{e}");
    }
}
