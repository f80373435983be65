//! The record ring as a change source: `STATE/ring` filled by another
//! program (`--tracker ring`, tests and integrations). Positions are ring
//! indices; a release frees slots; an overflow of the ring, or a record
//! that does not parse, is a loss.

use crate::{Batch, Change, ChangeSource, Position, Quiet, SourceError, SourceStats};
use ferry_ring::{RecordKind, Ring};

/// `STATE/ring` read by the agent; another process produces.
pub struct RingSource {
    ring: Ring,
    /// Next index to hand out.
    cursor: u64,
    /// Overflows already reported as a loss.
    overflows_seen: u64,
    /// Discards read as zeroes on this disk: ship them unread.
    discard_zeroes: bool,
    stats: SourceStats,
}

/// What one ring record reports (`discard_zeroes`: the disk reads zeroes
/// after a discard, so a discard ships as zeroes, unread).
pub fn change_of(r: &ferry_ring::Record, discard_zeroes: bool) -> Option<Change> {
    Some(match r.kind {
        RecordKind::WriteZeroes => Change::Zero { offset: r.offset, len: u64::from(r.length) },
        RecordKind::Discard if discard_zeroes => Change::Zero { offset: r.offset, len: u64::from(r.length) },
        // Markers in a ring of extents mean nothing for a point: the
        // extents before one are read from the live disk after it, so the
        // state at the marker cannot be shipped (points here are quiet or
        // frozen cuts only, as docs/consistency.md says).
        RecordKind::Tag | RecordKind::Catchup => return None,
        RecordKind::Write | RecordKind::Discard => Change::Extent { offset: r.offset, len: u64::from(r.length) },
    })
}

/// What [`attach`] found.
pub struct RingAttach {
    pub ring: Ring,
    /// The ring file's (device, inode): which ring this is.
    pub id: (u64, u64),
    /// A protection that did not always have this ring cannot know what
    /// changed while it was missing: why a resync is needed.
    pub resync: Option<String>,
}

/// Open `STATE/ring` at `path`, or create it with `capacity` records.
/// `last_id`: the ring the state file last read; `same_tracker`: the
/// state file was written for this tracker; `protected_before`: the disk
/// was protected before this run.
pub fn attach(
    path: &std::path::Path,
    capacity: u64,
    last_id: Option<(u64, u64)>,
    same_tracker: bool,
    protected_before: bool,
) -> Result<RingAttach, SourceError> {
    use std::os::unix::fs::MetadataExt;
    let created = !path.exists();
    let ring = if created { Ring::create(path, capacity)? } else { Ring::open(path)? };
    let m = std::fs::metadata(path).map_err(|source| SourceError::Io { what: format!("ring {}", path.display()), source })?;
    let id = (m.dev(), m.ino());
    let resync = (protected_before && (created || !same_tracker || last_id != Some(id))).then(|| {
        if created {
            "the tracker ring was missing and was recreated".to_string()
        } else {
            "the tracker ring is not the one this agent last read".to_string()
        }
    });
    Ok(RingAttach { ring, id, resync })
}

impl RingSource {
    /// Read `ring`; `overflows_seen` is what the agent's state says was
    /// already covered by a resync.
    pub fn new(ring: Ring, overflows_seen: u64) -> RingSource {
        let cursor = ring.consumer();
        RingSource { ring, cursor, overflows_seen, discard_zeroes: false, stats: SourceStats::default() }
    }

    /// Ship discards unread, as zeroes (the disk reads zeroes after one).
    pub fn with_discard_zeroes(mut self, yes: bool) -> RingSource {
        self.discard_zeroes = yes;
        self
    }

    /// The next index to hand out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Hand out from `at` on (the ring was released up to it unshipped:
    /// a backlog folded into a bitmap).
    pub fn skip_to(&mut self, at: u64) {
        self.cursor = at;
    }

    /// Overflows reported so far (for the agent's state file).
    pub fn overflows_seen(&self) -> u64 {
        self.overflows_seen
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The ring back (the agent keeps it across connections).
    pub fn into_ring(self) -> Ring {
        self.ring
    }
}

impl ChangeSource for RingSource {
    fn kind(&self) -> &'static str {
        "ring"
    }

    fn resume(&mut self, durable: Position) -> Result<(), SourceError> {
        // A release the last run did not get to store: complete it.
        let cons = self.ring.consumer();
        if durable != cons && self.ring.in_window(durable) {
            self.ring.release(durable)?;
        }
        self.cursor = self.ring.consumer();
        Ok(())
    }

    fn next_batch(&mut self, max: usize) -> Result<Batch, SourceError> {
        let mut changes = Vec::new();
        let overflows = self.ring.overflows();
        if overflows > self.overflows_seen {
            changes.push(Change::Loss(format!("ring overflow: {} records lost", overflows - self.overflows_seen)));
            self.overflows_seen = overflows;
            self.stats.losses += 1;
        }
        let (recs, next) = self.ring.read_from(self.cursor, max)?;
        let oldest_ns = recs.iter().flatten().map(|r| r.time_ns).filter(|&t| t > 0).min();
        for r in recs {
            changes.push(match r {
                Ok(r) => match change_of(&r, self.discard_zeroes) {
                    Some(c) => c,
                    None => continue,
                },
                Err(e) => {
                    self.stats.losses += 1;
                    Change::Loss(format!("tracker sent an invalid record ({e})"))
                }
            });
        }
        self.stats.changes += changes.len() as u64;
        self.cursor = next;
        Ok(Batch { changes, end: next, oldest_ns })
    }

    fn release(&mut self, upto: Position) -> Result<(), SourceError> {
        Ok(self.ring.release(upto)?)
    }

    fn quiesce(&mut self) -> Result<Quiet, SourceError> {
        let quiet = self.ring.producer() == self.cursor && self.ring.overflows() == self.overflows_seen;
        Ok(if quiet { Quiet::Yes } else { Quiet::No })
    }

    fn stats(&self) -> SourceStats {
        SourceStats { backlog_bytes: self.ring.pending() * 4096, ..self.stats }
    }

    fn detach(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ring::Record;

    fn w(seq: u64, offset: u64) -> Record {
        Record { seq, offset, length: 4096, kind: RecordKind::Write, flush: false, data: false, group: false, time_ns: 1 }
    }

    #[test]
    fn records_become_extents_and_an_overflow_a_loss() {
        let ring = Ring::anonymous(4, 0);
        for i in 0..4 {
            assert!(ring.push(w(i, i * 4096)));
        }
        assert!(!ring.push(w(4, 0)), "full");
        let mut s = RingSource::new(ring, 0);
        s.resume(0).unwrap();
        let b = s.next_batch(10).unwrap();
        assert_eq!(b.changes[0], Change::Loss("ring overflow: 1 records lost".into()));
        assert_eq!(b.changes[1], Change::Extent { offset: 0, len: 4096 });
        assert_eq!(b.changes.len(), 5);
        assert_eq!(b.end, 4);
        assert_eq!(s.quiesce().unwrap(), Quiet::Yes);
        s.release(b.end).unwrap();
        assert_eq!(s.ring().pending(), 0);
        assert!(s.next_batch(10).unwrap().changes.is_empty(), "the loss is reported once");
    }
}
