//! The checksum pass: compare the whole disk with the replica by sums and
//! hand over the pieces that differ, reading the disk through a
//! [`BlockReader`] (the same reader, many reads in flight, that ships a
//! tracker's extents).
//!
//! Two levels, as the scan tracker, the resync after a loss and
//! `--verify` always did: xxh3-128 of [`COARSE`] chunks first, then, for
//! the runs of coarse chunks that differ, of [`FINE`] pieces; only fine
//! pieces that differ move. The replica's coarse sums come from a chunk
//! map the agent trusts (no read on the master target) or from the master
//! target; its fine sums always from the master target. Both are asked for
//! through [`Replica`], which the agent implements over its session.
//!
//! Overlap, so that a pass costs about one read of the disk:
//! - the disk is read in [`crate::reader::PIECE`] pieces with
//!   [`crate::reader::IN_FLIGHT`] reads in flight; the sums are taken as
//!   the pieces come back, in disk order;
//! - coarse requests run [`COARSE_AHEAD`] spans ahead of the read;
//! - a fine request leaves as soon as its coarse run is found to differ,
//!   and its answer is awaited only when [`FINE_WINDOW`] bytes of
//!   differing runs wait for theirs (or at the end): the master target
//!   reads its cold replica for the fine sums while the disk is read on.
//!   Only the differing runs are kept (copied), not the pieces around them.
//!
//! The scan tracker is [`ScanSource`], a [`ChangeSource`] on the shipper:
//! the shipper hands it the sink's [`Replica`]
//! ([`ChangeSource::next_batch_with`]), and its passes send what differs
//! through it as they find it.

use crate::reader::{BlockReader, ReadError};
use crate::{Batch, ChangeSource, Position, Quiet, SourceError, SourceStats};
use std::collections::VecDeque;

/// First-level chunk (16 bytes of sum per 64 KiB: 0.025% of the disk); the
/// chunk map's unit.
pub const COARSE: u32 = 64 << 10;
/// Second-level chunk: what moves is a multiple of it.
pub const FINE: u32 = 4096;
/// Coarse sums asked of the master target per request.
pub const SPAN: u64 = 4 << 20;
/// Coarse requests in flight ahead of the read.
pub const COARSE_AHEAD: usize = 8;
/// Bytes of differing coarse runs held while their fine sums are awaited.
pub const FINE_WINDOW: usize = 64 << 20;
/// Differing runs this close (equal coarse chunks between them) share one
/// fine request: the master target reads the gap with them instead of
/// seeking to each, one read at a time.
pub const GAP: u64 = 3 * COARSE as u64;
/// Runs are merged only below this size: a request of 1 MiB or more makes
/// the master target read ahead as for a sequential scan.
const MERGED_MAX: u64 = 1 << 20;
/// The longest differing run handed over at once.
const MAX_RUN: usize = 1 << 20;

/// The replica's side of a pass: the master target's sums, asked for ahead
/// and received in any order, and where the differing pieces go.
pub trait Replica {
    type Error: From<ReadError>;
    /// Ask for the sums of `count` chunks of `chunk` bytes from `offset`;
    /// returns the request's id.
    fn request(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, Self::Error>;
    /// Send what was asked so far (requests may be buffered).
    fn flush(&mut self) -> Result<(), Self::Error>;
    /// The answer to request `req` (which asked for `count` sums at `offset`).
    fn receive(&mut self, req: u64, offset: u64, count: usize) -> Result<Vec<[u8; 16]>, Self::Error>;
    /// `data`, the disk at `offset`, differs from the replica.
    fn differs(&mut self, offset: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// The disk is read (and compared at coarse level) up to `upto`.
    fn progress(&mut self, upto: u64) -> Result<(), Self::Error>;
    /// A pass (`what`: "resync", "verify", …) begins ([`run_pass`]):
    /// the replica's coarse sums if they are known without asking (a
    /// trusted chunk map).
    fn pass_begin(&mut self, what: &str) -> Result<Option<Vec<[u8; 16]>>, Self::Error> {
        let _ = what;
        Ok(None)
    }
    /// The pass is done, what differed handed over: what it found.
    fn pass_end(&mut self, what: &str, pass: Pass) -> Result<(), Self::Error> {
        let _ = (what, pass);
        Ok(())
    }
}

/// What a pass found.
#[derive(Debug, Default)]
pub struct Pass {
    /// The disk's coarse sums, as read by the pass.
    pub sums: Vec<[u8; 16]>,
    /// Bytes that differed (handed to [`Replica::differs`]).
    pub differing: u64,
    /// Bytes read from the disk.
    pub read: u64,
}

/// A differing coarse run awaiting its fine sums.
struct Run {
    req: u64,
    offset: u64,
    data: Vec<u8>,
}

/// Compare the disk (through `reader`) with the replica, handing the
/// differing fine pieces to [`Replica::differs`] in disk order. `map`: the
/// replica's coarse sums, trusted (else they are asked for).
pub fn pass<R: BlockReader, Q: Replica + ?Sized>(reader: &R, replica: &mut Q, map: Option<&[[u8; 16]]>) -> Result<Pass, Q::Error> {
    let size = reader.size();
    let nchunks = size.div_ceil(u64::from(COARSE)) as usize;
    let mut out = Pass { sums: Vec::with_capacity(nchunks), ..Pass::default() };
    let spans: Vec<u64> = (0..size).step_by(SPAN as usize).collect();
    let per = (SPAN / u64::from(COARSE)) as u32;
    let count = |o: u64| ((size - o).min(SPAN)).div_ceil(u64::from(COARSE)) as usize;
    let mut coarse_reqs: VecDeque<(u64, u64)> = VecDeque::new();
    let mut requested = 0usize;
    // The replica's coarse sums of the span being compared, from `base`.
    let mut remote: Vec<[u8; 16]> = Vec::new();
    let mut base = 0u64;
    let mut runs: VecDeque<Run> = VecDeque::new();
    let mut held = 0usize;
    let mut open: Option<Open> = None;
    if map.is_none() {
        while requested < spans.len().min(COARSE_AHEAD) {
            coarse_reqs.push_back((replica.request(spans[requested], COARSE, per)?, spans[requested]));
            requested += 1;
        }
        replica.flush()?;
    }
    let t0 = std::time::Instant::now();
    let mut waited = std::time::Duration::ZERO;
    let mut hashing = std::time::Duration::ZERO;
    let hash = |data: &[u8]| {
        let t = std::time::Instant::now();
        let sums: Vec<[u8; 16]> = data.chunks(COARSE as usize).map(ferry_common::xxh128).collect();
        (sums, t.elapsed())
    };
    out.read = reader.read_extents_with(&[(0, size)], hash, |off, data, (local, took)| -> Result<(), Q::Error> {
        let first = (off / u64::from(COARSE)) as usize;
        hashing += took;
        let theirs: &[[u8; 16]] = match map {
            Some(m) => &m[first..first + local.len()],
            None => {
                if off >= base + remote.len() as u64 * u64::from(COARSE) || remote.is_empty() {
                    let (req, at) = coarse_reqs.pop_front().expect("a coarse request per span");
                    remote = replica.receive(req, at, count(at))?;
                    base = at;
                    if requested < spans.len() {
                        coarse_reqs.push_back((replica.request(spans[requested], COARSE, per)?, spans[requested]));
                        requested += 1;
                    }
                }
                let i = ((off - base) / u64::from(COARSE)) as usize;
                &remote[i..i + local.len()]
            }
        };
        let end = off + data.len() as u64;
        for (a, b) in diff_runs(&local, theirs, usize::MAX) {
            let (lo, hi) = (a * COARSE as usize, (b * COARSE as usize).min(data.len()));
            let (start, stop) = (off + lo as u64, off + hi as u64);
            if let Some(o) = open.as_mut() {
                if start - o.diff_end <= GAP && stop - o.offset < MERGED_MAX {
                    // One request for both runs and the equal chunks between.
                    let have = o.offset + o.data.len() as u64;
                    o.data.extend_from_slice(&data[(have - off) as usize..hi]);
                    o.diff_end = stop;
                    continue;
                }
                held += close(replica, open.take(), &mut runs)?;
            }
            open = Some(Open { offset: start, data: data[lo..hi].to_vec(), diff_end: stop });
        }
        // A run that may still merge with one in the next piece keeps the
        // rest of this piece.
        if let Some(o) = open.as_mut() {
            if end - o.diff_end <= GAP && end - o.offset < MERGED_MAX {
                let have = o.offset + o.data.len() as u64;
                o.data.extend_from_slice(&data[(have - off) as usize..]);
            } else {
                held += close(replica, open.take(), &mut runs)?;
            }
        }
        replica.flush()?;
        out.sums.extend_from_slice(&local);
        let tw = std::time::Instant::now();
        while held > FINE_WINDOW {
            let r = runs.pop_front().expect("held runs");
            held -= r.data.len();
            out.differing += refine(replica, r)?;
        }
        waited += tw.elapsed();
        replica.progress(off + data.len() as u64)
    })?;
    close(replica, open.take(), &mut runs)?;
    replica.flush()?;
    let read_done = t0.elapsed();
    let nruns = runs.len();
    while let Some(r) = runs.pop_front() {
        out.differing += refine(replica, r)?;
    }
    log::debug!(
        "checksum pass: read and compared in {:.3}s (hashing {:.3}s of CPU on the reader threads, waiting for fine sums {:.3}s), then {nruns} runs refined in {:.3}s",
        read_done.as_secs_f64(),
        hashing.as_secs_f64(),
        waited.as_secs_f64(),
        (t0.elapsed() - read_done).as_secs_f64()
    );
    Ok(out)
}

/// A differing run still growing: `data` holds the disk from `offset`
/// (possibly past `diff_end`, the end of its last differing chunk).
struct Open {
    offset: u64,
    data: Vec<u8>,
    diff_end: u64,
}

/// Ask for the fine sums of an open run (cut back to its last differing
/// chunk) and queue it; returns the bytes it holds.
fn close<Q: Replica + ?Sized>(replica: &mut Q, open: Option<Open>, runs: &mut VecDeque<Run>) -> Result<usize, Q::Error> {
    let Some(mut o) = open else { return Ok(0) };
    o.data.truncate((o.diff_end - o.offset) as usize);
    let n = o.data.len().div_ceil(FINE as usize) as u32;
    let req = replica.request(o.offset, FINE, n)?;
    let len = o.data.len();
    runs.push_back(Run { req, offset: o.offset, data: o.data });
    Ok(len)
}

/// Compare a held run with the replica's fine sums; hand over what differs.
fn refine<Q: Replica + ?Sized>(replica: &mut Q, r: Run) -> Result<u64, Q::Error> {
    let mine: Vec<[u8; 16]> = r.data.chunks(FINE as usize).map(ferry_common::xxh128).collect();
    let theirs = replica.receive(r.req, r.offset, mine.len())?;
    let mut n = 0u64;
    for (a, b) in diff_runs(&mine, &theirs, MAX_RUN / FINE as usize) {
        let lo = a * FINE as usize;
        let hi = (b * FINE as usize).min(r.data.len());
        replica.differs(r.offset + lo as u64, &r.data[lo..hi])?;
        n += (hi - lo) as u64;
    }
    Ok(n)
}

/// A whole pass named `what`, wrapped in the replica's hooks
/// ([`Replica::pass_begin`], [`Replica::pass_end`]); returns the bytes
/// that differed.
pub fn run_pass<R: BlockReader, Q: Replica + ?Sized>(reader: &R, replica: &mut Q, what: &str) -> Result<u64, Q::Error> {
    let map = replica.pass_begin(what)?;
    let p = pass(reader, replica, map.as_deref())?;
    let differing = p.differing;
    replica.pass_end(what, p)?;
    Ok(differing)
}

/// Checksum passes before a point give up after this many verify passes
/// that found differences.
pub const MAX_VERIFY_PASSES: u32 = 5;

/// The file's change stamp (mtime, ctime, size, inode: whatever the
/// caller takes), if it has one: a pass over an image whose stamp did not
/// move saw a state of it.
pub type Stamp = (i64, i64, i64, i64);

/// The scan tracker as a change source: each batch outside a freeze is a
/// round of checksum passes that leaves the replica equal to a state of
/// the disk, or says why not. Its differences go to the replica as the
/// passes find them (through the sink's [`Replica`], so memory stays
/// bounded by the pass's window), never into the batch: a batch holds no
/// changes, its position is the number of passes run.
///
/// A round, as the scan always did it: a "resync" pass (none in the first
/// round after an initial sync or a resync), then, unless the image's
/// stamp did not move during it, "verify" passes until one finds nothing
/// (at most [`MAX_VERIFY_PASSES`], then "the disk kept changing"). The
/// stream is at a prefix state ([`ChangeSource::quiesce`]) only after
/// such a round. With [`ScanSource::verify_under_freeze`], the verify
/// passes run inside the freeze instead (between
/// [`ChangeSource::freeze_begin`] and [`ChangeSource::freeze_end`]), at
/// least one, as many as it takes (the same limit): a point follows only
/// a pass under the freeze that found nothing.
pub struct ScanSource<R> {
    name: String,
    reader: R,
    stamp: Box<dyn FnMut() -> Option<Stamp>>,
    /// The first round follows a sync or resync: no resync pass; `Some(true)`
    /// when the image's stamp did not move during it.
    first: Option<bool>,
    under_freeze: bool,
    frozen: bool,
    /// The last round (or the passes under the freeze) left the replica
    /// equal to a state of the disk.
    clean: bool,
    /// Passes run: the position.
    passes: Position,
    stats: SourceStats,
}

impl<R: BlockReader> ScanSource<R> {
    /// A scan of the disk `reader` reads; `name` for messages.
    pub fn new(name: &str, reader: R) -> ScanSource<R> {
        ScanSource {
            name: name.into(),
            reader,
            stamp: Box::new(|| None),
            first: None,
            under_freeze: false,
            frozen: false,
            clean: false,
            passes: 0,
            stats: SourceStats::default(),
        }
    }

    /// The disk's change stamp, where it has one (an image file).
    pub fn with_stamp(mut self, stamp: impl FnMut() -> Option<Stamp> + 'static) -> Self {
        self.stamp = Box::new(stamp);
        self
    }

    /// The replica was just brought to the disk (an initial sync or a
    /// resync): the first round runs no resync pass; `verified`: the
    /// image's stamp did not move during it (no verify pass either).
    pub fn after_sync(mut self, verified: bool) -> Self {
        self.first = Some(verified);
        self
    }

    /// Points are cut under a freeze (`--freeze-cmd`): the verify passes
    /// run inside it.
    pub fn verify_under_freeze(mut self, yes: bool) -> Self {
        self.under_freeze = yes;
        self
    }

    fn pass<E: From<SourceError> + From<ReadError>>(&mut self, replica: &mut dyn Replica<Error = E>, what: &str) -> Result<u64, E> {
        self.passes += 1;
        let n = run_pass(&self.reader, replica, what)?;
        if n > 0 {
            self.stats.changes += 1;
        }
        Ok(n)
    }

    /// Verify passes until one finds nothing, at most [`MAX_VERIFY_PASSES`].
    fn verify<E: From<SourceError> + From<ReadError>>(&mut self, replica: &mut dyn Replica<Error = E>) -> Result<(), E> {
        for _ in 0..MAX_VERIFY_PASSES {
            if self.pass(replica, "verify")? == 0 {
                return Ok(());
            }
        }
        Err(SourceError::NoPoint(format!(
            "{}: the disk kept changing through {MAX_VERIFY_PASSES} checksum passes; no consistent point cut (use a tracker, or --freeze-cmd)",
            self.name
        ))
        .into())
    }
}

impl<R: BlockReader> ChangeSource for ScanSource<R> {
    fn kind(&self) -> &'static str {
        "scan"
    }

    fn resume(&mut self, durable: Position) -> Result<(), SourceError> {
        self.passes = durable;
        Ok(())
    }

    /// Without the replica there is nothing to compare with: nothing.
    fn next_batch(&mut self, _max: usize) -> Result<Batch, SourceError> {
        Ok(Batch { changes: Vec::new(), end: self.passes, oldest_ns: None })
    }

    fn next_batch_with<E: From<SourceError> + From<ReadError>>(
        &mut self,
        _max: usize,
        replica: &mut dyn Replica<Error = E>,
    ) -> Result<Batch, E> {
        self.clean = false;
        if self.frozen {
            // Under the freeze: at least one pass, whatever came before.
            self.verify(replica)?;
            self.clean = true;
        } else {
            let verified = match self.first.take() {
                Some(v) => v,
                None => {
                    let before = (self.stamp)();
                    self.pass(replica, "resync")?;
                    before.is_some() && before == (self.stamp)()
                }
            };
            if !self.under_freeze {
                if !verified {
                    self.verify(replica)?;
                }
                self.clean = true;
            }
        }
        Ok(Batch { changes: Vec::new(), end: self.passes, oldest_ns: None })
    }

    fn release(&mut self, _upto: Position) -> Result<(), SourceError> {
        Ok(())
    }

    /// At a prefix state after a round that settled it; before a freeze
    /// whose passes will settle it, the stream as handed out is whole
    /// (nothing held): the freeze may be tried.
    fn quiesce(&mut self) -> Result<Quiet, SourceError> {
        Ok(if self.clean || self.under_freeze && !self.frozen { Quiet::Yes } else { Quiet::No })
    }

    fn freeze_begin(&mut self) -> Result<(), SourceError> {
        self.frozen = true;
        self.clean = false;
        Ok(())
    }

    fn freeze_end(&mut self, _point: bool) -> Result<(), SourceError> {
        self.frozen = false;
        self.clean = false;
        Ok(())
    }

    fn knows_prefix_states(&self) -> bool {
        true
    }

    fn stats(&self) -> SourceStats {
        self.stats
    }

    fn detach(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

/// Runs `[a, b)` of indices where `x` and `y` differ, at most `max` long.
pub fn diff_runs(x: &[[u8; 16]], y: &[[u8; 16]], max: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < x.len() {
        if x[i] == y[i] {
            i += 1;
            continue;
        }
        let a = i;
        while i < x.len() && x[i] != y[i] && i - a < max {
            i += 1;
        }
        out.push((a, i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::LocalReader;
    use ferry_common::source::Source;
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::Arc;

    #[derive(Debug)]
    struct E;
    impl From<ReadError> for E {
        fn from(_: ReadError) -> E {
            E
        }
    }

    /// A replica in memory that answers requests out of order (all at the
    /// end of each flush, newest first) and records what it was sent.
    struct Mem {
        img: Vec<u8>,
        next: u64,
        asked: Vec<(u64, u64, u32, u32)>,
        answers: HashMap<u64, (u64, Vec<[u8; 16]>)>,
        got: Vec<(u64, Vec<u8>)>,
        coarse_asked: usize,
        fine_asked: usize,
    }
    impl Replica for Mem {
        type Error = E;
        fn request(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, E> {
            self.next += 1;
            self.asked.push((self.next, offset, chunk, count));
            if chunk == COARSE {
                self.coarse_asked += 1;
            } else {
                self.fine_asked += 1;
            }
            Ok(self.next)
        }
        fn flush(&mut self) -> Result<(), E> {
            for (req, offset, chunk, count) in self.asked.drain(..).rev() {
                let end = (offset + u64::from(chunk) * u64::from(count)).min(self.img.len() as u64);
                let sums = self.img[offset as usize..end as usize].chunks(chunk as usize).map(ferry_common::xxh128).collect();
                self.answers.insert(req, (offset, sums));
            }
            Ok(())
        }
        fn receive(&mut self, req: u64, offset: u64, count: usize) -> Result<Vec<[u8; 16]>, E> {
            let (o, s) = self.answers.remove(&req).expect("asked and flushed");
            assert_eq!((o, s.len()), (offset, count), "answer {req}");
            Ok(s)
        }
        fn differs(&mut self, offset: u64, data: &[u8]) -> Result<(), E> {
            self.got.push((offset, data.to_vec()));
            Ok(())
        }
        fn progress(&mut self, _upto: u64) -> Result<(), E> {
            Ok(())
        }
    }

    #[test]
    fn a_pass_finds_exactly_the_fine_pieces_that_differ_with_and_without_a_map() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        // 9 MiB and a bit: three coarse spans, the last one partial.
        let size = (9 << 20) + 12288;
        let disk: Vec<u8> = (0..size as u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        std::fs::File::create(&p).unwrap().write_all(&disk).unwrap();
        let mut img = disk.clone();
        // Differences: one 4 KiB piece, a run across a coarse boundary, a
        // run across a 1 MiB piece boundary, and the last partial piece.
        let changed = [(8192u64, 4096u64), ((64 << 10) - 4096, 8192), ((1 << 20) - 4096, 12288), (size as u64 - 4096, 4096)];
        for &(o, n) in &changed {
            img[o as usize..(o + n) as usize].fill(0xaa);
        }
        let r = LocalReader::new(Arc::new(Source::open(&p).unwrap()));
        let map: Vec<[u8; 16]> = img.chunks(COARSE as usize).map(ferry_common::xxh128).collect();
        for with_map in [false, true] {
            let mut m =
                Mem { img: img.clone(), next: 0, asked: vec![], answers: HashMap::new(), got: vec![], coarse_asked: 0, fine_asked: 0 };
            let out = pass(&r, &mut m, with_map.then_some(&map[..])).unwrap();
            let mut pieces: Vec<(u64, u64)> = m.got.iter().map(|(o, d)| (*o, *o + d.len() as u64)).collect();
            for (o, data) in &m.got {
                assert_eq!(&data[..], &disk[*o as usize..*o as usize + data.len()], "the disk's bytes at {o}");
            }
            pieces.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, b) in pieces {
                match merged.last_mut() {
                    Some((_, e)) if *e == a => *e = b,
                    _ => merged.push((a, b)),
                }
            }
            let want: Vec<(u64, u64)> = changed.iter().map(|&(o, n)| (o, o + n)).collect();
            assert_eq!(merged, want, "with_map={with_map}");
            assert_eq!(out.differing, changed.iter().map(|c| c.1).sum::<u64>());
            assert_eq!(out.read, size as u64);
            let local: Vec<[u8; 16]> = disk.chunks(COARSE as usize).map(ferry_common::xxh128).collect();
            assert_eq!(out.sums, local, "the disk's coarse sums");
            assert_eq!(m.coarse_asked, if with_map { 0 } else { 3 }, "a map spares the coarse requests");
            // Chunks 0 and 1 differ, then 15 and 16 (across the first 1 MiB
            // piece), then the last: near runs share a request, far ones not.
            assert_eq!(m.fine_asked, 3, "fine requests");
        }
    }
}
