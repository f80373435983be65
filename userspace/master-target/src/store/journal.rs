//! The undo journal: pre-images of replica ranges, durable before the
//! overwrite, and commit markers that say how far the replica is durable.
//!
//! File `DIR/NAME/journal.fj`:
//!
//! ```text
//! file   = HEADER (64 bytes) || record*
//! HEADER = MAGIC:u64 || VERSION:u32 (1) || HEADER_LEN:u32 (64)
//!          || RESERVED:[u8;32] (0) || XXH3_128(previous 48 bytes):16
//! record = REC_MAGIC:u32 || KIND:u8 || PAD:[u8;3] (0) || SEQ:u64
//!          || OFFSET:u64 || LEN:u32 || DATA_LEN:u32 || DATA:[u8;DATA_LEN]
//!          || XXH3_128(record header || DATA):16
//! KIND   = 1 UNDO       DATA is the LEN bytes that stood at OFFSET before
//!                       frame SEQ overwrote them (DATA_LEN = LEN)
//!        | 2 UNDO_ZERO  those bytes were all zero (DATA_LEN = 0)
//!        | 3 COMMIT     every frame up to SEQ is durable in the replica
//! ```
//!
//! Crash ordering, per batch of frames: UNDO records appended and fdatasync'd,
//! then the replica written, replica fdatasync'd, then COMMIT appended and
//! fdatasync'd, then the ACK sent. On open, records after the last COMMIT are
//! undone in reverse order (the replica may hold part of that batch) and the
//! file is truncated after the COMMIT; a record that fails its checksum ends
//! the valid journal (a torn tail) and is discarded with everything after it.
//!
//! The same format serves the batch journal `batch.fj` (see
//! `Disk::apply`: pre-images of ranges already journaled since the last
//! point, kept only to roll back the batch in progress).
//!
//! Recovery to a point at SEQ S: take the replica as it is now, then apply,
//! newest first, every UNDO record with seq > S found after the point's
//! journal position. Each byte then holds its value from before the first
//! overwrite after S, which is its value at S.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use xxhash_rust::const_xxh3::xxh3_64 as const_xxh3_64;

/// File magic: xxh3-64("ferry undo journal v1"). Do not modify.
pub const MAGIC: u64 = const_xxh3_64(b"ferry undo journal v1");
/// Record magic: low 32 bits of xxh3-64("ferry undo record v1"). Do not modify.
pub const REC_MAGIC: u32 = const_xxh3_64(b"ferry undo record v1") as u32;
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
const REC_HEAD: usize = 32;
const REC_SUM: usize = 16;
/// Largest DATA_LEN a reader accepts (a pre-image is at most one extent).
const MAX_DATA: u32 = ferry_proto::MAX_EXTENT;

pub const KIND_UNDO: u8 = 1;
pub const KIND_UNDO_ZERO: u8 = 2;
pub const KIND_COMMIT: u8 = 3;

/// One validated record's header and where its data sits in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// File position of the record.
    pub pos: u64,
    pub kind: u8,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    /// File position of DATA (for UNDO).
    pub data_pos: u64,
    /// File position just after the record.
    pub end: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("journal {path}: {why}; the disk folder is damaged (restore it, or remove the disk folder to start over)")]
    BadHeader { path: String, why: String },
}

fn header_bytes() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    let s = ferry_common::xxh128(&h[..48]);
    h[48..64].copy_from_slice(&s);
    h
}

/// Read-side view of a journal file, usable with no writer present.
pub struct JournalReader {
    file: File,
    path: String,
}

impl JournalReader {
    pub fn open(path: &Path) -> Result<JournalReader, JournalError> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|source| JournalError::Io { path: p.clone(), source })?;
        let r = JournalReader { file, path: p };
        r.check_header()?;
        Ok(r)
    }

    fn check_header(&self) -> Result<(), JournalError> {
        let mut h = [0u8; HEADER_LEN as usize];
        self.file
            .read_exact_at(&mut h, 0)
            .map_err(|e| JournalError::BadHeader { path: self.path.clone(), why: format!("unreadable header: {e}") })?;
        let bad = |why: &str| JournalError::BadHeader { path: self.path.clone(), why: why.into() };
        if u64::from_le_bytes(h[0..8].try_into().expect("8")) != MAGIC {
            return Err(bad("not a ferry undo journal"));
        }
        if ferry_common::xxh128(&h[..48]) != h[48..64] {
            return Err(bad("header checksum mismatch"));
        }
        let v = u32::from_le_bytes(h[8..12].try_into().expect("4"));
        if v != VERSION {
            return Err(bad(&format!("version {v} unsupported (this ferry reads v{VERSION})")));
        }
        Ok(())
    }

    /// Validate the record at `pos`; `None` at the end or at a torn record.
    pub fn record_at(&self, pos: u64, file_len: u64) -> Option<RecordInfo> {
        if pos + (REC_HEAD + REC_SUM) as u64 > file_len {
            return None;
        }
        let mut h = [0u8; REC_HEAD];
        self.file.read_exact_at(&mut h, pos).ok()?;
        if u32::from_le_bytes(h[0..4].try_into().ok()?) != REC_MAGIC || h[5..8] != [0, 0, 0] {
            return None;
        }
        let kind = h[4];
        let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
        let offset = u64::from_le_bytes(h[16..24].try_into().ok()?);
        let len = u32::from_le_bytes(h[24..28].try_into().ok()?);
        let data_len = u32::from_le_bytes(h[28..32].try_into().ok()?);
        let ok_shape = match kind {
            KIND_UNDO => data_len == len && len > 0 && len <= MAX_DATA,
            KIND_UNDO_ZERO => data_len == 0 && len > 0 && len <= MAX_DATA,
            KIND_COMMIT => data_len == 0 && len == 0,
            _ => false,
        };
        let end = pos + (REC_HEAD + data_len as usize + REC_SUM) as u64;
        if !ok_shape || end > file_len {
            return None;
        }
        let mut rest = vec![0u8; data_len as usize + REC_SUM];
        self.file.read_exact_at(&mut rest, pos + REC_HEAD as u64).ok()?;
        let (data, sum) = rest.split_at(data_len as usize);
        let mut x = xxhash_rust::xxh3::Xxh3::new();
        x.update(&h);
        x.update(data);
        if x.digest128().to_le_bytes() != sum {
            return None;
        }
        Some(RecordInfo { pos, kind, seq, offset, len, data_pos: pos + REC_HEAD as u64, end })
    }

    /// Every valid record from `from` up to the first invalid one.
    pub fn scan(&self, from: u64) -> Result<Vec<RecordInfo>, JournalError> {
        let len = self.file_len()?;
        let mut out = Vec::new();
        let mut pos = from.max(HEADER_LEN);
        while let Some(r) = self.record_at(pos, len) {
            pos = r.end;
            out.push(r);
        }
        Ok(out)
    }

    /// Whether a valid COMMIT record starts anywhere in `(from, file_len)`.
    /// Used to tell a torn tail (nothing durable after it) from damage in
    /// the middle of the journal (a later COMMIT was made durable after it).
    pub fn commit_after(&self, from: u64) -> Result<bool, JournalError> {
        let len = self.file_len()?;
        if len <= from {
            return Ok(false);
        }
        // In pieces (the journal may be as large as the disk), overlapping
        // by the 5 bytes a match needs.
        const PIECE: u64 = 4 << 20;
        let magic = REC_MAGIC.to_le_bytes();
        let mut buf = vec![0u8; PIECE as usize + 4];
        let mut at = from;
        while at < len {
            let n = ((len - at).min(PIECE + 4)) as usize;
            self.file.read_exact_at(&mut buf[..n], at).map_err(|source| JournalError::Io { path: self.path.clone(), source })?;
            for (i, w) in buf[..n].windows(5).enumerate() {
                let pos = at + i as u64;
                if pos > from && w[..4] == magic && w[4] == KIND_COMMIT && self.record_at(pos, len).is_some_and(|r| r.kind == KIND_COMMIT) {
                    return Ok(true);
                }
            }
            at += PIECE;
        }
        Ok(false)
    }

    pub fn file_len(&self) -> Result<u64, JournalError> {
        self.file.metadata().map(|m| m.len()).map_err(|source| JournalError::Io { path: self.path.clone(), source })
    }

    /// The pre-image bytes of an UNDO record (zeroes for UNDO_ZERO).
    pub fn data(&self, r: &RecordInfo) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; r.len as usize];
        if r.kind == KIND_UNDO {
            self.file.read_exact_at(&mut v, r.data_pos)?;
        }
        Ok(v)
    }
}

/// The appending side, owned by the master target for one disk.
pub struct Journal {
    file: File,
    path: String,
    /// Logical end: file length plus what is buffered.
    end: u64,
    buf: Vec<u8>,
}

impl Journal {
    /// Open or create the journal at `path`. Does not repair: see
    /// [`crate::disk`] for the start-up repair that uses a [`JournalReader`].
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let p = path.display().to_string();
        let io = |source| JournalError::Io { path: p.clone(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        let mut len = file.metadata().map_err(io)?.len();
        if len == 0 {
            file.write_all_at(&header_bytes(), 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            len = HEADER_LEN;
        }
        Ok(Journal { file, path: p, end: len, buf: Vec::new() })
    }

    /// Logical end position (where the next record goes).
    pub fn end(&self) -> u64 {
        self.end
    }

    fn push(&mut self, kind: u8, seq: u64, offset: u64, len: u32, data: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&REC_MAGIC.to_le_bytes());
        self.buf.extend_from_slice(&[kind, 0, 0, 0]);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(data);
        let s = xxhash_rust::xxh3::xxh3_128(&self.buf[start..]).to_le_bytes();
        self.buf.extend_from_slice(&s);
        self.end += (self.buf.len() - start) as u64;
    }

    /// Buffer the pre-image of `[offset, offset+pre.len())` before frame `seq`.
    pub fn undo(&mut self, seq: u64, offset: u64, pre: &[u8]) {
        if ferry_common::is_zero(pre) {
            self.push(KIND_UNDO_ZERO, seq, offset, pre.len() as u32, &[]);
        } else {
            self.push(KIND_UNDO, seq, offset, pre.len() as u32, pre);
        }
    }

    /// Buffer the pre-image of a range known to be all zero.
    pub fn undo_zero(&mut self, seq: u64, offset: u64, len: u32) {
        self.push(KIND_UNDO_ZERO, seq, offset, len, &[]);
    }

    /// Buffer a commit marker for everything up to `seq`.
    pub fn commit(&mut self, seq: u64) {
        self.push(KIND_COMMIT, seq, 0, 0, &[]);
    }

    /// Write what is buffered and make it durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        if !self.buf.is_empty() {
            let at = self.end - self.buf.len() as u64;
            self.file.write_all_at(&self.buf, at).map_err(io)?;
            self.buf.clear();
        }
        self.file.sync_data().map_err(io)
    }

    /// Empty the journal down to its header without waiting for the disk
    /// (the batch journal, between batches: what it held is committed).
    pub fn reset(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        self.buf.clear();
        if self.end != HEADER_LEN {
            self.file.set_len(HEADER_LEN).map_err(io)?;
            self.end = HEADER_LEN;
        }
        Ok(())
    }

    /// Whether records are buffered (not yet written and synced).
    pub fn dirty(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Cut the file at `pos` (discarding a torn or rolled-back tail).
    pub fn truncate(&mut self, pos: u64) -> Result<(), JournalError> {
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        self.buf.clear();
        self.file.set_len(pos).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.end = pos;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_torn_tail_ends_the_scan() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        let mut j = Journal::open(&p).unwrap();
        j.undo(1, 0, &[7u8; 512]);
        j.undo(2, 512, &[0u8; 1024]);
        j.commit(2);
        j.sync().unwrap();
        let good_end = j.end();
        j.undo(3, 4096, &[9u8; 512]);
        j.sync().unwrap();
        let r = JournalReader::open(&p).unwrap();
        let recs = r.scan(0).unwrap();
        assert_eq!(recs.iter().map(|r| (r.kind, r.seq)).collect::<Vec<_>>(), vec![(1, 1), (2, 2), (3, 2), (1, 3)]);
        assert_eq!(r.data(&recs[0]).unwrap(), vec![7u8; 512]);
        assert_eq!(r.data(&recs[1]).unwrap(), vec![0u8; 1024]);
        // Tear the last record: the scan stops at the commit.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(j.end() - 5).unwrap();
        let recs = JournalReader::open(&p).unwrap().scan(0).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].end, good_end);
        // Flip a byte inside a record's data: it and all after are invalid.
        f.write_all_at(&[0xff], HEADER_LEN + 40).unwrap();
        assert!(JournalReader::open(&p).unwrap().scan(0).unwrap().is_empty());
    }

    #[test]
    fn foreign_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        std::fs::write(&p, vec![1u8; 128]).unwrap();
        assert!(matches!(JournalReader::open(&p), Err(JournalError::BadHeader { .. })));
    }
}
