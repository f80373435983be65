//! The shipper: one loop over any [`ChangeSource`]. It coalesces extents,
//! reads them through a [`BlockReader`], sends them to a [`Sink`], waits
//! for durability, releases the source, decides when a point may be cut
//! and when the disk must be resynced. It keeps no state of any source:
//! only sequence numbers and the source's opaque positions.
//!
//! Rules it keeps (each has a unit test below, against a fake source):
//! - nothing is released before it is durable: a batch's end position is
//!   saved ([`Sink::save_position`]) and released only once every frame
//!   sent for it is acknowledged as durable;
//! - a loss anywhere in a batch leads to a full resync; the rest of that
//!   batch is covered by the resync (not shipped), its markers are not
//!   honoured, and no point is cut before the resync is durable and a
//!   later quiet moment confirms a prefix state;
//! - cuts only at consistent positions: never inside a catch-up (between
//!   [`Marker::CatchUpStart`] and [`Marker::CatchUpEnd`]), only after
//!   everything sent is durable and the source reports [`Quiet::Yes`];
//! - after a restart it resumes from the last durable position: the source
//!   hands out again what was not released.

use crate::reader::{BlockReader, ReadError};
use crate::{Change, ChangeSource, Marker, Position, Quiet, SourceError};
use std::collections::VecDeque;

/// Where a stream goes: the master target's session now, a process
/// server's spool next.
pub trait Sink {
    type Error: From<SourceError> + From<ReadError>;
    /// Send `data`, read from the disk at `offset`; returns the frame's
    /// sequence number.
    fn send_data(&mut self, offset: u64, data: &[u8]) -> Result<u64, Self::Error>;
    /// Send a range that reads as zeroes.
    fn send_zero(&mut self, offset: u64, len: u64) -> Result<u64, Self::Error>;
    /// The highest sequence number durable now (does not block).
    fn durable(&mut self) -> Result<u64, Self::Error>;
    /// Wait until `seq` is durable.
    fn wait_durable(&mut self, seq: u64) -> Result<(), Self::Error>;
    /// The last sequence number sent (0: none).
    fn last_sent(&self) -> u64;
    /// Cut a recovery point after everything sent; returns its id.
    fn cut(&mut self, time_ns: u64) -> Result<u64, Self::Error>;
    /// Bring the replica to the disk's content by checksum (a loss); done
    /// when it returns (durable).
    fn resync(&mut self, why: &str) -> Result<(), Self::Error>;
    /// Record (durably) that the source is durable up to `pos`; called
    /// before the source is released to it, so a restart resumes there.
    fn save_position(&mut self, pos: Position) -> Result<(), Self::Error>;
}

/// What one [`Shipper::step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Changes taken from the source.
    pub changes: usize,
    pub bytes_read: u64,
    /// A resync ran (why).
    pub resynced: Option<String>,
    /// Points cut (their ids).
    pub points: Vec<u64>,
    /// The last sequence number sent for the batch and when its oldest
    /// change completed (the source's [`crate::Batch::oldest_ns`]).
    pub timed: Option<(u64, u64)>,
}

/// The shipping loop's state: positions and sequence numbers only.
pub struct Shipper<S, K, R> {
    pub source: S,
    pub sink: K,
    pub reader: R,
    /// (last sequence number sent for a batch, the batch's end position),
    /// oldest first: released once that sequence number is durable.
    pending: VecDeque<(u64, Position)>,
    /// Between [`Marker::CatchUpStart`] and [`Marker::CatchUpEnd`].
    catchup_open: bool,
    /// After a resync, until a quiet moment confirms a prefix state.
    unverified: bool,
    /// Something was read from the live disk since the last quiet point:
    /// a marker's point would not be the state at the marker.
    read_since_cut: bool,
    /// Most changes taken per batch.
    pub batch: usize,
    /// The size of the disk (extents are clipped to it).
    size: u64,
}

/// The unit of the wire protocol's extents: ranges are widened to it.
const SECTOR: u64 = 512;

/// Widen `[start, end)` to whole sectors, clipped to `size`.
fn to_sectors((a, b): (u64, u64), size: u64) -> (u64, u64) {
    (a / SECTOR * SECTOR, b.div_ceil(SECTOR).saturating_mul(SECTOR).min(size))
}

/// Merge `[start, end)` ranges that overlap or touch, in disk order, each
/// widened to whole sectors (the protocol's unit, and O_DIRECT's).
pub fn coalesce(mut v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    v.retain_mut(|r| {
        *r = to_sectors(*r, size);
        r.0 < r.1
    });
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some((_, e)) if *e >= a => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

impl<S: ChangeSource, K: Sink, R: BlockReader> Shipper<S, K, R> {
    /// Start (or restart) shipping: the source hands out again everything
    /// after `durable`, the last position saved by [`Sink::save_position`].
    pub fn start(mut source: S, sink: K, reader: R, durable: Position) -> Result<Self, K::Error> {
        source.resume(durable)?;
        let size = reader.size();
        Ok(Shipper {
            source,
            sink,
            reader,
            pending: VecDeque::new(),
            catchup_open: false,
            unverified: false,
            read_since_cut: true,
            batch: 4096,
            size,
        })
    }

    /// Whether the stream is at a consistent position (no catch-up or
    /// resync under way).
    pub fn consistent(&self) -> bool {
        !self.catchup_open && !self.unverified
    }

    /// Send a run of extents, coalesced, read with many reads in flight.
    fn ship_run(&mut self, run: &mut Vec<(u64, u64)>) -> Result<u64, K::Error> {
        if run.is_empty() {
            return Ok(0);
        }
        let exts = coalesce(std::mem::take(run), self.size);
        let sink = &mut self.sink;
        self.reader.read_extents(&exts, |off, data| sink.send_data(off, data).map(|_| ()))
    }

    /// One round: take a batch, ship it, release what is durable, resync on
    /// a loss, and cut a point if `cut_due` (or a marker asks) and the
    /// stream is at a consistent, quiet position.
    pub fn step(&mut self, cut_due: bool) -> Result<Step, K::Error> {
        let mut out = Step::default();
        let b = self.source.next_batch(self.batch)?;
        out.changes = b.changes.len();
        let mut run = Vec::new();
        let mut loss = None;
        for c in b.changes {
            match c {
                Change::Extent { offset, len } => {
                    run.push((offset, offset.saturating_add(len)));
                    self.read_since_cut = true;
                }
                Change::Zero { offset, len } => {
                    out.bytes_read += self.ship_run(&mut run)?;
                    // Zeroing requests are whole sectors in the block layer.
                    let (a, end) = to_sectors((offset, offset.saturating_add(len)), self.size);
                    if end > a {
                        self.sink.send_zero(a, end - a)?;
                    }
                }
                Change::Payload { offset, data } => {
                    out.bytes_read += self.ship_run(&mut run)?;
                    self.sink.send_data(offset, &data)?;
                }
                Change::Marker(Marker::CatchUpStart) => {
                    out.bytes_read += self.ship_run(&mut run)?;
                    self.catchup_open = true;
                }
                Change::Marker(Marker::CatchUpEnd) => {
                    out.bytes_read += self.ship_run(&mut run)?;
                    self.catchup_open = false;
                }
                Change::Marker(Marker::CutRequest { time_ns, .. }) => {
                    // Everything before the marker, durable, then the point
                    // — only if nothing since the last point was read from
                    // the live disk (an extent read after the marker may
                    // hold a later write): payload sources, or a source
                    // whose reads see a frozen view.
                    out.bytes_read += self.ship_run(&mut run)?;
                    if self.consistent() && (!self.read_since_cut || self.source.reads_frozen_view()) {
                        let last = self.sink.last_sent();
                        self.sink.wait_durable(last)?;
                        out.points.push(self.sink.cut(time_ns)?);
                    }
                }
                Change::Loss(why) => {
                    // The resync reads the whole disk after this moment:
                    // it covers the rest of the batch too.
                    loss = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = loss {
            run.clear();
            self.unverified = true;
            // The resync supersedes a catch-up under way (its end marker
            // may have been in the rest of the batch).
            self.catchup_open = false;
            self.sink.resync(&why)?;
            let last = self.sink.last_sent();
            self.sink.wait_durable(last)?;
            out.resynced = Some(why);
        } else {
            out.bytes_read += self.ship_run(&mut run)?;
        }
        if out.changes > 0 {
            self.pending.push_back((self.sink.last_sent(), b.end));
            out.timed = b.oldest_ns.map(|t| (self.sink.last_sent(), t));
        }
        self.release_durable()?;
        if cut_due && out.changes == 0 && self.source.request_cut()? {
            if let Some(id) = self.quiet_cut()? {
                out.points.push(id);
            }
        }
        Ok(out)
    }

    /// Release the source up to the newest batch whose frames are all
    /// durable (its position saved first).
    pub fn release_durable(&mut self) -> Result<(), K::Error> {
        let durable = self.sink.durable()?;
        let mut upto = None;
        while let Some(&(seq, pos)) = self.pending.front() {
            if seq > durable {
                break;
            }
            upto = Some(pos);
            self.pending.pop_front();
        }
        if let Some(pos) = upto {
            self.sink.save_position(pos)?;
            self.source.release(pos)?;
        }
        Ok(())
    }

    /// Cut a point if everything sent is durable and nothing changed since
    /// the last batch; a stream not known consistent (after a resync)
    /// becomes so at such a quiet moment.
    fn quiet_cut(&mut self) -> Result<Option<u64>, K::Error> {
        let last = self.sink.last_sent();
        self.sink.wait_durable(last)?;
        self.release_durable()?;
        // A catch-up still open is not a prefix state, quiet or not: its
        // end marker is still to come.
        if self.catchup_open || self.source.quiesce()? != Quiet::Yes {
            return Ok(None);
        }
        // Quiet, and everything sent durable: the replica equals the disk
        // (after a resync too).
        self.unverified = false;
        self.read_since_cut = false;
        Ok(Some(self.sink.cut(now_ns())?))
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    //! The shipper against an in-memory disk, a fake tracker over it and a
    //! fake master target that makes frames durable when told to.
    use super::*;
    use crate::{Batch, SourceStats};
    use std::cell::RefCell;
    use std::rc::Rc;

    const SIZE: u64 = 64 << 10;

    /// Everything that happened, in order, across source and sink.
    type Events = Rc<RefCell<Vec<String>>>;

    #[derive(Debug)]
    enum E {
        Source,
        Read,
    }
    impl From<SourceError> for E {
        fn from(_: SourceError) -> E {
            E::Source
        }
    }
    impl From<ReadError> for E {
        fn from(_: ReadError) -> E {
            E::Read
        }
    }

    #[derive(Clone)]
    struct Disk(Rc<RefCell<Vec<u8>>>);
    impl Disk {
        fn write(&self, off: u64, byte: u8, len: u64) {
            self.0.borrow_mut()[off as usize..(off + len) as usize].fill(byte);
        }
    }
    impl BlockReader for Disk {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_extents<Er: From<ReadError>>(
            &self,
            exts: &[(u64, u64)],
            mut each: impl FnMut(u64, &[u8]) -> Result<(), Er>,
        ) -> Result<u64, Er> {
            let d = self.0.borrow().clone();
            let mut n = 0;
            for &(a, b) in exts {
                each(a, &d[a as usize..b as usize])?;
                n += b - a;
            }
            Ok(n)
        }
    }

    /// A tracker's log: change i at position i + 1; released below
    /// `released`; handed out below `cursor`.
    struct FakeSource {
        log: Rc<RefCell<Vec<Change>>>,
        released: Rc<RefCell<u64>>,
        cursor: u64,
        quiet: Rc<RefCell<bool>>,
        ev: Events,
    }
    impl ChangeSource for FakeSource {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn resume(&mut self, durable: Position) -> Result<(), SourceError> {
            let mut r = self.released.borrow_mut();
            *r = (*r).max(durable);
            self.cursor = *r;
            Ok(())
        }
        fn next_batch(&mut self, max: usize) -> Result<Batch, SourceError> {
            let log = self.log.borrow();
            let end = (self.cursor as usize + max).min(log.len());
            let changes = log[self.cursor as usize..end].to_vec();
            self.cursor = end as u64;
            Ok(Batch { changes, end: end as u64, oldest_ns: None })
        }
        fn release(&mut self, upto: Position) -> Result<(), SourceError> {
            assert!(upto <= self.cursor, "released {upto} before handing it out");
            self.ev.borrow_mut().push(format!("release {upto}"));
            *self.released.borrow_mut() = upto;
            Ok(())
        }
        fn quiesce(&mut self) -> Result<Quiet, SourceError> {
            let quiet = *self.quiet.borrow() && self.cursor as usize == self.log.borrow().len();
            Ok(if quiet { Quiet::Yes } else { Quiet::No })
        }
        fn stats(&self) -> SourceStats {
            SourceStats::default()
        }
        fn detach(&mut self) -> Result<(), SourceError> {
            Ok(())
        }
    }

    enum Frame {
        Data(u64, Vec<u8>),
        Zero(u64, u64),
        Tag,
        Whole(Vec<u8>),
    }

    /// The master target: frames in order, durable up to `durable` (the
    /// test moves it, or `auto` acknowledges at once); a crash keeps only
    /// durable frames.
    struct FakeSink {
        frames: Vec<Frame>,
        durable: u64,
        auto: bool,
        disk: Disk,
        saved: Rc<RefCell<u64>>,
        ev: Events,
        points: Vec<(u64, Vec<u8>)>,
    }
    impl FakeSink {
        fn replica(&self, upto: u64) -> Vec<u8> {
            let mut r = vec![0u8; SIZE as usize];
            for f in self.frames.iter().take(upto as usize) {
                match f {
                    Frame::Data(o, d) => r[*o as usize..*o as usize + d.len()].copy_from_slice(d),
                    Frame::Zero(o, n) => r[*o as usize..(*o + *n) as usize].fill(0),
                    Frame::Tag => {}
                    Frame::Whole(d) => r.copy_from_slice(d),
                }
            }
            r
        }
        fn push(&mut self, f: Frame) -> u64 {
            self.frames.push(f);
            let seq = self.frames.len() as u64;
            if self.auto {
                self.durable = seq;
            }
            seq
        }
    }
    impl Sink for FakeSink {
        type Error = E;
        fn send_data(&mut self, offset: u64, data: &[u8]) -> Result<u64, E> {
            Ok(self.push(Frame::Data(offset, data.to_vec())))
        }
        fn send_zero(&mut self, offset: u64, len: u64) -> Result<u64, E> {
            Ok(self.push(Frame::Zero(offset, len)))
        }
        fn durable(&mut self) -> Result<u64, E> {
            Ok(self.durable)
        }
        fn wait_durable(&mut self, seq: u64) -> Result<(), E> {
            self.durable = self.durable.max(seq); // the master target catches up
            Ok(())
        }
        fn last_sent(&self) -> u64 {
            self.frames.len() as u64
        }
        fn cut(&mut self, _t: u64) -> Result<u64, E> {
            let seq = self.push(Frame::Tag);
            self.durable = seq;
            let id = self.points.len() as u64 + 1;
            self.points.push((id, self.replica(seq)));
            self.ev.borrow_mut().push(format!("cut {id}"));
            Ok(id)
        }
        fn resync(&mut self, why: &str) -> Result<(), E> {
            self.ev.borrow_mut().push(format!("resync {why}"));
            let d = self.disk.0.borrow().clone();
            let seq = self.push(Frame::Whole(d));
            self.durable = seq;
            Ok(())
        }
        fn save_position(&mut self, pos: Position) -> Result<(), E> {
            assert!(self.durable >= 1, "a position saved with nothing durable");
            self.ev.borrow_mut().push(format!("save {pos}"));
            *self.saved.borrow_mut() = pos;
            Ok(())
        }
    }

    struct World {
        disk: Disk,
        log: Rc<RefCell<Vec<Change>>>,
        released: Rc<RefCell<u64>>,
        saved: Rc<RefCell<u64>>,
        quiet: Rc<RefCell<bool>>,
        ev: Events,
    }

    impl World {
        fn new() -> World {
            World {
                disk: Disk(Rc::new(RefCell::new(vec![0u8; SIZE as usize]))),
                log: Rc::default(),
                released: Rc::default(),
                saved: Rc::default(),
                quiet: Rc::new(RefCell::new(true)),
                ev: Rc::default(),
            }
        }
        /// A write the tracker sees.
        fn write(&self, off: u64, byte: u8, len: u64) {
            self.disk.write(off, byte, len);
            self.log.borrow_mut().push(Change::Extent { offset: off, len });
        }
        /// A write the tracker sees with its payload (as the kernel module
        /// in data mode gives it).
        fn write_payload(&self, off: u64, byte: u8, len: u64) {
            self.disk.write(off, byte, len);
            self.log.borrow_mut().push(Change::Payload { offset: off, data: vec![byte; len as usize] });
        }
        fn shipper(&self, auto: bool) -> Shipper<FakeSource, FakeSink, Disk> {
            let src = FakeSource {
                log: Rc::clone(&self.log),
                released: Rc::clone(&self.released),
                cursor: 0,
                quiet: Rc::clone(&self.quiet),
                ev: Rc::clone(&self.ev),
            };
            let sink = FakeSink {
                frames: Vec::new(),
                durable: 0,
                auto,
                disk: self.disk.clone(),
                saved: Rc::clone(&self.saved),
                ev: Rc::clone(&self.ev),
                points: Vec::new(),
            };
            let durable = *self.saved.borrow();
            Shipper::start(src, sink, self.disk.clone(), durable).unwrap()
        }
    }

    #[test]
    fn nothing_is_released_before_it_is_durable() {
        let w = World::new();
        let mut s = w.shipper(false);
        for i in 0..8 {
            w.write(i * 4096, i as u8 + 1, 4096);
        }
        let st = s.step(false).unwrap();
        assert_eq!(st.changes, 8);
        assert!(s.sink.last_sent() > 0, "frames sent");
        assert_eq!(*w.released.borrow(), 0, "nothing released while nothing is durable");
        // Partly durable: still not the batch.
        s.sink.durable = s.sink.last_sent() - 1;
        s.step(false).unwrap();
        assert_eq!(*w.released.borrow(), 0, "a batch is released only when all of it is durable");
        s.sink.durable = s.sink.last_sent();
        s.step(false).unwrap();
        assert_eq!(*w.released.borrow(), 8);
        // The position was saved before the source let go of it.
        let ev = w.ev.borrow();
        let save = ev.iter().position(|e| e == "save 8").expect("saved");
        let rel = ev.iter().position(|e| e == "release 8").expect("released");
        assert!(save < rel, "{ev:?}");
    }

    #[test]
    fn a_loss_in_the_middle_of_a_batch_resyncs_and_cuts_no_point_during_it() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.write(0, 1, 4096);
        // A change the tracker did not record, then a loss report, then
        // more changes and a cut request in the same batch.
        w.disk.write(8192, 7, 4096);
        w.log.borrow_mut().push(Change::Loss("test: lost records".into()));
        w.write(16384, 3, 4096);
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: None, time_ns: 1 }));
        w.write(20480, 4, 4096);
        let st = s.step(true).unwrap();
        assert_eq!(st.resynced.as_deref(), Some("test: lost records"));
        assert!(st.points.is_empty(), "no point during the resync: {st:?}");
        assert!(!s.consistent(), "not consistent until a quiet moment confirms it");
        {
            let ev = w.ev.borrow();
            assert!(!ev.iter().any(|e| e.starts_with("cut")), "{ev:?}");
            assert!(ev.iter().any(|e| e.starts_with("resync")), "{ev:?}");
        }
        assert_eq!(*w.released.borrow(), w.log.borrow().len() as u64, "the batch is released once the resync is durable");
        // Quiet now: a point, and it is the disk.
        let st = s.step(true).unwrap();
        assert_eq!(st.points, vec![1]);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow(), "the point holds every change, the unrecorded one too");
    }

    #[test]
    fn points_are_cut_only_at_consistent_quiet_positions() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.write(0, 1, 4096);
        w.log.borrow_mut().push(Change::Marker(Marker::CatchUpStart));
        w.write(4096, 2, 8192);
        // Inside a catch-up: due, quiet, everything durable, and no point.
        let st = s.step(true).unwrap();
        assert!(st.points.is_empty());
        let st = s.step(true).unwrap();
        assert!(st.points.is_empty(), "no point inside a catch-up");
        // A cut request inside the catch-up is not honoured either.
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(9), time_ns: 1 }));
        assert!(s.step(true).unwrap().points.is_empty());
        w.log.borrow_mut().push(Change::Marker(Marker::CatchUpEnd));
        s.step(true).unwrap();
        // Not quiet (the tracker holds something): no point.
        *w.quiet.borrow_mut() = false;
        assert!(s.step(true).unwrap().points.is_empty());
        *w.quiet.borrow_mut() = true;
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
        // A cut request after extents is not honoured: they are read from
        // the live disk after the marker, and a block rewritten since
        // would enter the point.
        w.write(0, 5, 4096);
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(10), time_ns: 2 }));
        w.write(0, 6, 4096);
        let st = s.step(false).unwrap();
        assert!(st.points.is_empty(), "no point at a marker that extents read later precede: {st:?}");
        // Quiet again: a point, the disk.
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1);
        assert_eq!(s.sink.points[1].1, *w.disk.0.borrow());
        // With payloads only since that point, a cut request is cut at its
        // marker, whatever comes after it.
        w.write_payload(0, 7, 4096);
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(11), time_ns: 3 }));
        let at_marker = w.disk.0.borrow().clone();
        w.write_payload(0, 8, 4096);
        let st = s.step(false).unwrap();
        assert_eq!(st.points.len(), 1);
        assert_eq!(s.sink.points[2].1, at_marker, "the point is the state at its marker");
    }

    #[test]
    fn a_restart_resumes_from_the_last_durable_position() {
        let w = World::new();
        let mut s = w.shipper(false);
        for i in 0..4 {
            w.write(i * 4096, 1, 4096);
        }
        s.step(false).unwrap();
        s.sink.durable = s.sink.last_sent();
        s.step(false).unwrap();
        assert_eq!(*w.saved.borrow(), 4);
        // More changes shipped but never acknowledged; then the agent dies
        // and the master target keeps only what was durable.
        for i in 4..8 {
            w.write(i * 4096, 2, 4096);
        }
        s.step(false).unwrap();
        let durable_frames: Vec<Frame> = s.sink.frames.drain(..).take(s.sink.durable as usize).collect();
        assert_eq!(*w.released.borrow(), 4, "the unacknowledged batch is still held by the source");
        drop(s);
        let mut s = w.shipper(true);
        s.sink.frames = durable_frames;
        s.sink.durable = s.sink.frames.len() as u64;
        s.step(false).unwrap();
        assert_eq!(*w.released.borrow(), 8);
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow(), "nothing lost across the restart");
    }

    #[test]
    fn coalesce_merges_and_clips() {
        assert_eq!(
            coalesce(vec![(4096, 8192), (0, 1000), (1024, 1536), (1500, 2000), (10000, 20000)], 15360),
            vec![(0, 2048), (4096, 8192), (9728, 15360)],
            "widened to sectors, merged where they touch, clipped to the disk"
        );
    }
}
