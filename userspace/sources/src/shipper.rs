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
//!   hands out again what was not released;
//! - a batch that moved the source's position is released once durable,
//!   whether it held changes or not;
//! - a source's resync hooks wrap the sink's resync
//!   ([`ChangeSource::resync_begin`] before, [`ChangeSource::resync_end`]
//!   once it is durable);
//! - a source that knows its prefix states
//!   ([`ChangeSource::knows_prefix_states`]) gets a point at each of its
//!   cut requests outside a catch-up, reads from the live disk or not (a
//!   group's named by its id, one placed under a freeze app-consistent),
//!   and a due cut is tried after any batch, not only an empty one;
//! - a source that knows its prefix states is asked first
//!   ([`ChangeSource::quiesce`]) whether the stream is at one: no cut plan
//!   (a filesystem sync), freeze or durability wait when it is not;
//! - a source that places its own cut requests
//!   ([`ChangeSource::places_cut_requests`]) is frozen only around placing
//!   one, at a moment it calls quiet; if not every writer froze, a
//!   crash-consistent point is cut at once instead; a request placed
//!   handles the due cut ([`Step::cut_placed`]);
//! - a sink that can answer a checksum pass ([`Sink::replica`]) hands its
//!   replica to the source with every batch
//!   ([`ChangeSource::next_batch_with`]): the scan's passes send what
//!   differs through it, in the sink's stream, before the batch ends;
//! - a cut waits for the source's barrier: [`ChangeSource::barrier`], the
//!   writes it holds in flight shipped, then [`ChangeSource::quiesce`];
//! - an app-consistent cut ([`CutPlan::Freeze`]) ships what the writers
//!   hold (pre-copy), freezes them ([`Sink::freeze`]), ships what came
//!   before the freeze under the sink's cap, cuts only if nothing was
//!   written meanwhile, and always thaws; a freeze that fails or overruns
//!   gives no point this time, a partial one a crash-consistent point.

use crate::reader::{BlockReader, ReadError};
use crate::scan::Replica;
use crate::{Batch, Change, ChangeSource, Marker, Position, Quiet, SourceError};
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
    /// Cut a recovery point after everything sent (`app`: taken under a
    /// freeze of every writer, else crash-consistent); returns its id.
    fn cut(&mut self, time_ns: u64, app: bool) -> Result<u64, Self::Error>;
    /// Cut a point at a source's [`Marker::CutRequest`]: a consistency
    /// group's (`group`: its cut id), or one placed under a freeze (`app`).
    fn cut_requested(&mut self, group: Option<u64>, time_ns: u64, app: bool) -> Result<u64, Self::Error> {
        let _ = group;
        self.cut(time_ns, app)
    }
    /// Bring the replica to the disk's content by checksum (a loss); done
    /// when it returns (durable).
    fn resync(&mut self, why: &str) -> Result<(), Self::Error>;
    /// Record (durably) that the source is durable up to `pos`; called
    /// before the source is released to it, so a restart resumes there.
    fn save_position(&mut self, pos: Position) -> Result<(), Self::Error>;

    /// How a point that fell due is taken now (asked at every due cut;
    /// the sink flushes the writers' caches itself when it answers
    /// [`CutPlan::Freeze`] with `precopy`).
    fn cut_plan(&mut self) -> CutPlan {
        CutPlan::Quiet
    }
    /// Freeze the disk's writers (filesystems, a freeze command), under a
    /// guard that thaws if the agent dies. `Ok(Some(app))`: frozen, `app`
    /// when every writer froze; `Ok(None)`: the freeze failed (the sink
    /// records why and backs off). Unless it returns an error (then it has
    /// thawed already), [`Sink::thaw`] follows.
    fn freeze(&mut self) -> Result<Option<bool>, Self::Error> {
        Ok(None)
    }
    /// The freeze has lasted longer than its cap.
    fn freeze_over_cap(&self) -> bool {
        false
    }
    /// Thaw after [`Sink::freeze`]; `point`: whether a point was cut.
    fn thaw(&mut self, point: bool) -> Result<(), Self::Error> {
        let _ = point;
        Ok(())
    }
    /// A due point could not be cut, and why (for status).
    fn no_point(&mut self, why: NoPoint) {
        let _ = why;
    }
    /// The replica's side of a checksum pass, over this sink's connection
    /// to the master target, for a source that compares the disk with the
    /// replica itself ([`ChangeSource::next_batch_with`], the scan); what
    /// differs is sent in the sink's stream. `None`: this sink cannot.
    fn replica(&mut self) -> Option<&mut dyn Replica<Error = Self::Error>> {
        None
    }
}

/// How a due point is taken ([`Sink::cut_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutPlan {
    /// At a quiet moment (crash-consistent).
    Quiet,
    /// Under a freeze of the writers; `precopy`: ship what the writers
    /// just flushed before freezing, so the freeze is short.
    Freeze { precopy: bool },
}

/// Why a frozen cut gave no point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoPoint {
    /// The freeze reached its cap with changes left to ship.
    FreezeCap,
    /// The disk was written while frozen (a writer the freeze does not
    /// reach), or the source lost track meanwhile.
    WrittenWhileFrozen,
}

/// What one [`Shipper::step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Changes taken from the source.
    pub changes: usize,
    pub bytes_read: u64,
    /// Bytes the changes taken cover (extents, zeroed ranges, payloads),
    /// as the source reported them: the disk's churn as tracked.
    pub churn_bytes: u64,
    /// A resync ran (why).
    pub resynced: Option<String>,
    /// Points cut (their ids).
    pub points: Vec<u64>,
    /// A due cut was tried (the batch was empty); with no point in
    /// `points`, it failed (unless `cut_placed`).
    pub cut_tried: bool,
    /// The due cut placed a cut request in the source's stream
    /// ([`ChangeSource::place_cut_request`]): it is handled, its point
    /// comes when the stream reaches the request.
    pub cut_placed: bool,
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
    /// A loss reported while frozen: resynced at the next step, after the
    /// thaw.
    deferred_loss: Option<String>,
    /// The end position of the last batch handed out.
    handed_end: Position,
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
            deferred_loss: None,
            handed_end: durable,
            batch: 4096,
            size,
        })
    }

    /// The source's next batch, the sink's replica at hand
    /// ([`ChangeSource::next_batch_with`]) where the sink has one.
    fn next(&mut self) -> Result<Batch, K::Error> {
        match self.sink.replica() {
            Some(r) => self.source.next_batch_with(self.batch, r),
            None => Ok(self.source.next_batch(self.batch)?),
        }
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
        let mut b = self.next()?;
        if let Some(why) = self.deferred_loss.take() {
            b.changes.insert(0, Change::Loss(why));
        }
        self.ingest(b, &mut out, false)?;
        self.release_durable()?;
        let vouched = self.source.knows_prefix_states();
        out.cut_tried = cut_due && (out.changes == 0 || vouched);
        // A source that knows its prefix states says first whether the
        // stream is at one: no sync, freeze or wait for durability when
        // it is not (steps under steady writes would pay for them).
        let at_prefix = !out.cut_tried || !vouched || !self.catchup_open && self.source.quiesce()? == Quiet::Yes;
        if out.cut_tried && at_prefix && self.source.request_cut()? {
            let cut = match self.sink.cut_plan() {
                CutPlan::Quiet => self.quiet_cut(&mut out)?,
                CutPlan::Freeze { .. } if self.source.places_cut_requests() => self.tagged_cut(&mut out)?,
                CutPlan::Freeze { precopy } => self.frozen_cut(precopy, &mut out)?,
            };
            out.points.extend(cut);
        }
        Ok(out)
    }

    /// Ship one batch: runs of extents coalesced and read, zeroes, payloads
    /// and markers in order; a loss resyncs (or, `frozen`, waits for the
    /// thaw: no point then). Returns whether a loss came.
    fn ingest(&mut self, b: crate::Batch, out: &mut Step, frozen: bool) -> Result<bool, K::Error> {
        let n = b.changes.len();
        out.changes += n;
        let mut run = Vec::new();
        let mut loss = None;
        for c in b.changes {
            match &c {
                Change::Extent { len, .. } | Change::Zero { len, .. } => out.churn_bytes += len,
                Change::Payload { data, .. } => out.churn_bytes += data.len() as u64,
                Change::Marker(_) | Change::Loss(_) => {}
            }
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
                Change::Marker(Marker::CutRequest { group, time_ns, app }) => {
                    // Everything before the marker, durable, then the point
                    // (under a freeze the freeze's own point follows) — only
                    // if nothing since the last point was read from the live
                    // disk (an extent read after the marker may hold a later
                    // write): payload sources, or a source whose reads see a
                    // frozen view; or a source that hands out cut requests
                    // only at prefix states (it tracks its reads itself).
                    out.bytes_read += self.ship_run(&mut run)?;
                    let vouched = self.source.knows_prefix_states();
                    let prefix = vouched || !self.unverified && (!self.read_since_cut || self.source.reads_frozen_view());
                    if !self.catchup_open && !frozen && prefix {
                        let last = self.sink.last_sent();
                        self.sink.wait_durable(last)?;
                        out.points.push(self.sink.cut_requested(group, time_ns, app)?);
                        if vouched {
                            self.unverified = false;
                            self.read_since_cut = false;
                        }
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
        let lost = loss.is_some();
        match loss {
            Some(why) if frozen => {
                // Not under a freeze: after the thaw, at the next step.
                self.deferred_loss = Some(why);
            }
            Some(why) => {
                run.clear();
                self.resync(&why)?;
                out.resynced = Some(why);
            }
            None => out.bytes_read += self.ship_run(&mut run)?,
        }
        // A batch with no changes that moved the source's position (records
        // that carry nothing to ship) is released like any other.
        if n > 0 || b.end != self.handed_end {
            self.handed_end = b.end;
            self.pending.push_back((self.sink.last_sent(), b.end));
            if let Some(t) = b.oldest_ns {
                out.timed = Some((self.sink.last_sent(), t));
            }
        }
        Ok(lost)
    }

    /// A full resync (a loss, or one the agent was asked for), wrapped in
    /// the source's hooks; no point is cut at a cut request before a quiet
    /// moment (or a vouched request) confirms a prefix state again.
    pub fn resync(&mut self, why: &str) -> Result<(), K::Error> {
        self.unverified = true;
        // The resync supersedes a catch-up under way (its end marker may
        // have been in the rest of the batch, or dropped with the source's
        // queue).
        self.catchup_open = false;
        self.source.resync_begin()?;
        self.sink.resync(why)?;
        let last = self.sink.last_sent();
        self.sink.wait_durable(last)?;
        self.source.resync_end()?;
        Ok(())
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

    /// Part of the barrier before a cut: the writes the source holds in
    /// flight, shipped as the disk holds them now.
    fn ship_in_flight(&mut self, out: &mut Step) -> Result<(), K::Error> {
        let mut inflight = self.source.in_flight()?;
        out.bytes_read += self.ship_run(&mut inflight)?;
        Ok(())
    }

    /// Cut a point if everything sent is durable and nothing changed since
    /// the last batch (through the source's barrier); a stream not known
    /// consistent (after a resync) becomes so at such a quiet moment.
    fn quiet_cut(&mut self, out: &mut Step) -> Result<Option<u64>, K::Error> {
        let last = self.sink.last_sent();
        self.sink.wait_durable(last)?;
        self.release_durable()?;
        // A catch-up still open is not a prefix state, quiet or not: its
        // end marker is still to come.
        if self.catchup_open {
            return Ok(None);
        }
        self.source.barrier()?;
        self.ship_in_flight(out)?;
        if self.source.quiesce()? != Quiet::Yes {
            return Ok(None);
        }
        // Quiet, and everything sent durable: the replica equals the disk
        // (after a resync too).
        self.unverified = false;
        self.read_since_cut = false;
        Ok(Some(self.sink.cut(now_ns(), false)?))
    }

    /// For a source that places its own cut requests: at a prefix state,
    /// freeze the writers only around placing one (the point is cut when
    /// the stream reaches it); if not every writer froze, a crash-consistent
    /// point now instead. Thaws always.
    fn tagged_cut(&mut self, out: &mut Step) -> Result<Option<u64>, K::Error> {
        if self.catchup_open || self.source.quiesce()? != Quiet::Yes {
            return Ok(None);
        }
        let placed = match self.sink.freeze()? {
            Some(true) => self.source.place_cut_request().map(Some),
            _ => Ok(None),
        };
        let thawed = self.sink.thaw(false);
        let placed = placed?;
        thawed?;
        match placed {
            Some(placed) => {
                out.cut_placed = placed;
                Ok(None)
            }
            None => self.quiet_cut(out),
        }
    }

    /// Pre-copy, freeze, ship what came before the freeze, cut if nothing
    /// was written meanwhile, thaw (always, whatever happened).
    fn frozen_cut(&mut self, precopy: bool, out: &mut Step) -> Result<Option<u64>, K::Error> {
        if self.catchup_open {
            return Ok(None);
        }
        if precopy {
            loop {
                let b = self.next()?;
                if b.changes.is_empty() {
                    break;
                }
                if self.ingest(b, out, false)? {
                    return Ok(None); // resynced: a point next time
                }
            }
            self.release_durable()?;
            // The pre-copy may have started a catch-up: no point then.
            if self.catchup_open || !self.source.request_cut()? {
                return Ok(None);
            }
        }
        self.source.freeze_begin()?;
        let frozen = match self.sink.freeze() {
            Ok(f) => f,
            Err(e) => {
                let _ = self.source.freeze_end(false);
                return Err(e);
            }
        };
        let r = match frozen {
            Some(app) => self.while_frozen(app, out),
            None => Ok(None),
        };
        let point = matches!(r, Ok(Some(_)));
        let thawed = self.sink.thaw(point);
        let ended = self.source.freeze_end(point);
        let p = r?;
        thawed?;
        ended?;
        Ok(p)
    }

    fn while_frozen(&mut self, app: bool, out: &mut Step) -> Result<Option<u64>, K::Error> {
        self.source.barrier()?;
        loop {
            if self.sink.freeze_over_cap() {
                self.sink.no_point(NoPoint::FreezeCap);
                return Ok(None);
            }
            // (A scan's verify passes under the freeze run here, all in
            // one batch, as many as it takes.)
            let b = self.next()?;
            if b.changes.is_empty() {
                break;
            }
            if self.ingest(b, out, true)? {
                return Ok(None); // a loss: resynced after the thaw, no point
            }
        }
        self.ship_in_flight(out)?;
        let last = self.sink.last_sent();
        self.sink.wait_durable(last)?;
        if self.source.quiesce()? != Quiet::Yes {
            self.sink.no_point(NoPoint::WrittenWhileFrozen);
            return Ok(None);
        }
        if self.sink.freeze_over_cap() {
            self.sink.no_point(NoPoint::FreezeCap);
            return Ok(None);
        }
        self.unverified = false;
        self.read_since_cut = false;
        Ok(Some(self.sink.cut(now_ns(), app)?))
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
    use crate::scan::ScanSource;
    use crate::SourceStats;
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
        disk: Disk,
        /// Writes issued and not seen completing (the disk has them).
        inflight: Rc<RefCell<Vec<(u64, u64)>>>,
        /// Changes that arrive at the next `in_flight` call (a writer the
        /// barrier must catch), or at the freeze (queued before it).
        sneak: Rc<RefCell<Vec<(u64, u8)>>>,
        at_freeze: Rc<RefCell<Vec<Change>>>,
        /// Hands out cut requests only at prefix states (as the kernel
        /// module's source does).
        vouch: bool,
        /// Places its own cut requests under a freeze.
        tags: bool,
    }
    /// A record that carries nothing to ship (the fake hands out no change
    /// for it; its position moves all the same).
    const BLANK: Change = Change::Zero { offset: u64::MAX, len: 0 };
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
            let changes = log[self.cursor as usize..end].iter().filter(|c| **c != BLANK).cloned().collect();
            self.cursor = end as u64;
            Ok(Batch { changes, end: end as u64, oldest_ns: None })
        }
        fn release(&mut self, upto: Position) -> Result<(), SourceError> {
            assert!(upto <= self.cursor, "released {upto} before handing it out");
            self.ev.borrow_mut().push(format!("release {upto}"));
            *self.released.borrow_mut() = upto;
            Ok(())
        }
        fn barrier(&mut self) -> Result<(), SourceError> {
            self.ev.borrow_mut().push("barrier".into());
            Ok(())
        }
        fn in_flight(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
            self.ev.borrow_mut().push("in_flight".into());
            for (off, byte) in self.sneak.borrow_mut().drain(..) {
                self.disk.write(off, byte, 4096);
                self.log.borrow_mut().push(Change::Extent { offset: off, len: 4096 });
            }
            Ok(self.inflight.borrow_mut().drain(..).collect())
        }
        fn freeze_begin(&mut self) -> Result<(), SourceError> {
            self.ev.borrow_mut().push("freeze_begin".into());
            self.log.borrow_mut().extend(self.at_freeze.borrow_mut().drain(..));
            Ok(())
        }
        fn freeze_end(&mut self, point: bool) -> Result<(), SourceError> {
            self.ev.borrow_mut().push(format!("freeze_end {point}"));
            Ok(())
        }
        fn quiesce(&mut self) -> Result<Quiet, SourceError> {
            let quiet = *self.quiet.borrow() && self.cursor as usize == self.log.borrow().len();
            Ok(if quiet { Quiet::Yes } else { Quiet::No })
        }
        fn places_cut_requests(&self) -> bool {
            self.tags
        }
        fn place_cut_request(&mut self) -> Result<bool, SourceError> {
            self.ev.borrow_mut().push("place".into());
            self.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: None, time_ns: 42, app: true }));
            Ok(true)
        }
        fn knows_prefix_states(&self) -> bool {
            self.vouch
        }
        fn resync_begin(&mut self) -> Result<(), SourceError> {
            self.ev.borrow_mut().push("resync_begin".into());
            Ok(())
        }
        fn resync_end(&mut self) -> Result<(), SourceError> {
            self.ev.borrow_mut().push("resync_end".into());
            Ok(())
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
        /// Whether each point was app-consistent.
        app: Vec<bool>,
        /// None: quiet cuts; Some(r): freeze, answering r.
        freeze: Option<Option<bool>>,
        frozen: bool,
        thaws: u32,
        problems: Vec<NoPoint>,
        /// Times a cut plan was asked for (each a filesystem sync).
        plans: u32,
        /// A frozen cut pre-copies.
        precopy: bool,
        /// Sums asked for by a checksum pass, by request id.
        sums: std::collections::HashMap<u64, Vec<[u8; 16]>>,
    }
    impl FakeSink {
        /// The replica after the first `upto` frames.
        fn image(&self, upto: u64) -> Vec<u8> {
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
        fn cut(&mut self, _t: u64, app: bool) -> Result<u64, E> {
            self.app.push(app);
            let seq = self.push(Frame::Tag);
            self.durable = seq;
            let id = self.points.len() as u64 + 1;
            self.points.push((id, self.image(seq)));
            self.ev.borrow_mut().push(format!("cut {id}"));
            Ok(id)
        }
        fn cut_requested(&mut self, group: Option<u64>, time_ns: u64, app: bool) -> Result<u64, E> {
            if let Some(g) = group {
                self.ev.borrow_mut().push(format!("group {g}"));
            }
            self.cut(time_ns, app)
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
        fn cut_plan(&mut self) -> CutPlan {
            self.plans += 1;
            match self.freeze {
                None => CutPlan::Quiet,
                Some(_) => CutPlan::Freeze { precopy: self.precopy },
            }
        }
        fn freeze(&mut self) -> Result<Option<bool>, E> {
            self.ev.borrow_mut().push("freeze".into());
            self.frozen = true;
            Ok(self.freeze.expect("asked to freeze"))
        }
        fn thaw(&mut self, point: bool) -> Result<(), E> {
            assert!(self.frozen, "thawed without a freeze");
            self.frozen = false;
            self.thaws += 1;
            self.ev.borrow_mut().push(format!("thaw {point}"));
            Ok(())
        }
        fn no_point(&mut self, why: NoPoint) {
            self.problems.push(why);
        }
        fn replica(&mut self) -> Option<&mut dyn Replica<Error = E>> {
            Some(self)
        }
    }

    /// The master target's side of a checksum pass: sums of the replica as
    /// every frame sent so far leaves it.
    impl Replica for FakeSink {
        type Error = E;
        fn request(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, E> {
            let img = self.image(self.frames.len() as u64);
            let end = (offset + u64::from(chunk) * u64::from(count)).min(SIZE) as usize;
            let id = self.sums.len() as u64 + 1;
            self.sums.insert(id, img[offset as usize..end].chunks(chunk as usize).map(ferry_common::xxh128).collect());
            Ok(id)
        }
        fn flush(&mut self) -> Result<(), E> {
            Ok(())
        }
        fn receive(&mut self, req: u64, _offset: u64, count: usize) -> Result<Vec<[u8; 16]>, E> {
            let s = self.sums.get(&req).cloned().expect("asked for");
            assert_eq!(s.len(), count);
            Ok(s)
        }
        fn differs(&mut self, offset: u64, data: &[u8]) -> Result<(), E> {
            self.send_data(offset, data).map(|_| ())
        }
        fn progress(&mut self, _upto: u64) -> Result<(), E> {
            Ok(())
        }
        fn pass_begin(&mut self, what: &str) -> Result<Option<Vec<[u8; 16]>>, E> {
            self.ev.borrow_mut().push(format!("pass {what}"));
            Ok(None)
        }
    }

    struct World {
        disk: Disk,
        log: Rc<RefCell<Vec<Change>>>,
        released: Rc<RefCell<u64>>,
        saved: Rc<RefCell<u64>>,
        quiet: Rc<RefCell<bool>>,
        ev: Events,
        inflight: Rc<RefCell<Vec<(u64, u64)>>>,
        sneak: Rc<RefCell<Vec<(u64, u8)>>>,
        at_freeze: Rc<RefCell<Vec<Change>>>,
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
                inflight: Rc::default(),
                sneak: Rc::default(),
                at_freeze: Rc::default(),
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
        fn sink(&self, auto: bool) -> FakeSink {
            FakeSink {
                frames: Vec::new(),
                durable: 0,
                auto,
                disk: self.disk.clone(),
                saved: Rc::clone(&self.saved),
                ev: Rc::clone(&self.ev),
                points: Vec::new(),
                app: Vec::new(),
                freeze: None,
                frozen: false,
                thaws: 0,
                problems: Vec::new(),
                plans: 0,
                precopy: true,
                sums: Default::default(),
            }
        }
        fn shipper(&self, auto: bool) -> Shipper<FakeSource, FakeSink, Disk> {
            let src = FakeSource {
                log: Rc::clone(&self.log),
                released: Rc::clone(&self.released),
                cursor: 0,
                quiet: Rc::clone(&self.quiet),
                ev: Rc::clone(&self.ev),
                disk: self.disk.clone(),
                inflight: Rc::clone(&self.inflight),
                sneak: Rc::clone(&self.sneak),
                at_freeze: Rc::clone(&self.at_freeze),
                vouch: false,
                tags: false,
            };
            let sink = self.sink(auto);
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
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: None, time_ns: 1, app: false }));
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
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(9), time_ns: 1, app: false }));
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
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(10), time_ns: 2, app: false }));
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
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(11), time_ns: 3, app: false }));
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

    fn pos(ev: &[String], what: &str) -> usize {
        ev.iter().position(|e| e == what).unwrap_or_else(|| panic!("no {what:?} in {ev:?}"))
    }

    #[test]
    fn a_cut_waits_for_the_barrier_and_ships_what_is_in_flight() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.write(0, 1, 4096);
        // A write the tracker saw issued, not completing: only the disk
        // and the in-flight table have it.
        w.disk.write(8192, 9, 4096);
        w.inflight.borrow_mut().push((8192, 12288));
        assert!(s.step(true).unwrap().points.is_empty(), "no cut in a step that shipped changes");
        // A writer the barrier catches: a change between the barrier and
        // the quiet check stops the cut.
        w.sneak.borrow_mut().push((16384, 5));
        let st = s.step(true).unwrap();
        assert!(st.cut_tried);
        assert!(st.points.is_empty(), "a change after the barrier: no point");
        {
            let ev = w.ev.borrow();
            assert!(pos(&ev, "barrier") < pos(&ev, "in_flight"), "{ev:?}");
        }
        // It ships, and the next quiet moment is a point holding all of it.
        s.step(true).unwrap();
        w.inflight.borrow_mut().push((8192, 12288));
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow(), "the point holds the in-flight write");
        assert_eq!(s.sink.app, vec![false]);
    }

    #[test]
    fn a_freeze_gives_an_app_point_and_always_thaws() {
        let w = World::new();
        let mut s = w.shipper(true);
        s.sink.freeze = Some(Some(true));
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        // Changes queued right before the freeze are shipped under it.
        w.disk.write(4096, 2, 4096);
        w.at_freeze.borrow_mut().push(Change::Extent { offset: 4096, len: 4096 });
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.app, vec![true], "every writer froze: app-consistent");
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
        assert_eq!(s.sink.thaws, 1);
        let ev = w.ev.borrow();
        assert!(pos(&ev, "freeze_begin") < pos(&ev, "freeze"), "the source holds before the writers freeze: {ev:?}");
        assert!(pos(&ev, "cut 1") < pos(&ev, "thaw true"), "{ev:?}");
        assert!(pos(&ev, "thaw true") < pos(&ev, "freeze_end true"), "handed back after the thaw: {ev:?}");
    }

    #[test]
    fn a_partial_freeze_gives_a_crash_point_and_a_failed_one_none() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        // Not every filesystem froze: a crash-consistent point.
        s.sink.freeze = Some(Some(false));
        assert_eq!(s.step(true).unwrap().points.len(), 1);
        assert_eq!(s.sink.app, vec![false]);
        // The freeze failed: no point, thawed all the same, held changes
        // handed back.
        s.sink.freeze = Some(None);
        w.write(4096, 2, 4096);
        s.step(false).unwrap();
        let st = s.step(true).unwrap();
        assert!(st.cut_tried && st.points.is_empty(), "{st:?}");
        assert_eq!(s.sink.thaws, 2);
        assert_eq!(w.ev.borrow().last().map(String::as_str), Some("freeze_end false"));
    }

    #[test]
    fn a_write_or_a_loss_while_frozen_gives_no_point() {
        let w = World::new();
        let mut s = w.shipper(true);
        s.sink.freeze = Some(Some(true));
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        // Something the freeze does not reach writes to the disk.
        w.sneak.borrow_mut().push((8192, 3));
        let st = s.step(true).unwrap();
        assert!(st.points.is_empty());
        assert_eq!(s.sink.problems, vec![NoPoint::WrittenWhileFrozen]);
        assert_eq!(s.sink.thaws, 1);
        s.step(false).unwrap(); // the stray write ships
                                // A loss reported under the freeze: no point, no resync while
                                // frozen; the resync comes after the thaw.
        w.at_freeze.borrow_mut().push(Change::Loss("test: lost while frozen".into()));
        let st = s.step(true).unwrap();
        assert!(st.points.is_empty());
        assert!(st.resynced.is_none(), "no resync under a freeze");
        assert_eq!(s.sink.thaws, 2);
        let st = s.step(false).unwrap();
        assert_eq!(st.resynced.as_deref(), Some("test: lost while frozen"));
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
    }

    #[test]
    fn a_resync_is_wrapped_in_the_source_hooks() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.write(0, 1, 4096);
        w.log.borrow_mut().push(Change::Loss("test: lost".into()));
        let st = s.step(false).unwrap();
        assert_eq!(st.resynced.as_deref(), Some("test: lost"));
        let ev = w.ev.borrow();
        assert!(pos(&ev, "resync_begin") < pos(&ev, "resync test: lost"), "{ev:?}");
        assert!(pos(&ev, "resync test: lost") < pos(&ev, "resync_end"), "the end hook once the resync is durable: {ev:?}");
    }

    #[test]
    fn a_resync_asked_for_outside_a_batch_ends_a_catch_up_and_confirms_at_a_quiet_moment() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.log.borrow_mut().push(Change::Marker(Marker::CatchUpStart));
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        assert!(!s.consistent());
        // A change nobody recorded, then a resync the agent was asked for.
        w.disk.write(8192, 5, 4096);
        s.resync("test: asked").unwrap();
        {
            let ev = w.ev.borrow();
            assert!(pos(&ev, "resync_begin") < pos(&ev, "resync test: asked"), "{ev:?}");
            assert!(pos(&ev, "resync test: asked") < pos(&ev, "resync_end"), "{ev:?}");
        }
        assert!(!s.consistent(), "not consistent until a quiet moment confirms it");
        // The catch-up under way is superseded: a quiet moment gives a
        // point, and it is the disk.
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
        assert!(s.consistent());
    }

    #[test]
    fn a_vouched_cut_request_is_cut_after_extents_and_names_its_group() {
        let w = World::new();
        let mut s = w.shipper(true);
        s.source.vouch = true;
        // After extents read from the live disk, and after a resync (not
        // yet confirmed by a quiet moment): the source vouches for it.
        w.write(0, 1, 4096);
        w.log.borrow_mut().push(Change::Loss("test: lost".into()));
        s.step(false).unwrap();
        w.write(4096, 2, 4096);
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(7), time_ns: 7, app: false }));
        let st = s.step(false).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
        assert!(w.ev.borrow().iter().any(|e| e == "group 7"), "a group's point is named by its id");
        assert!(s.consistent(), "a vouched point confirms a prefix state");
        // A due cut after a batch with changes: tried (the source answers
        // for the stream as handed out), and cut.
        w.write(8192, 4, 4096);
        let st = s.step(true).unwrap();
        assert_eq!((st.changes, st.cut_tried, st.points.len()), (1, true, 1), "{st:?}");
        assert_eq!(s.sink.points[1].1, *w.disk.0.borrow());
        // Not inside a catch-up, vouched or not.
        w.log.borrow_mut().push(Change::Marker(Marker::CatchUpStart));
        w.write(0, 3, 4096);
        w.log.borrow_mut().push(Change::Marker(Marker::CutRequest { group: Some(8), time_ns: 8, app: false }));
        assert!(s.step(false).unwrap().points.is_empty());
        assert!(!w.ev.borrow().iter().any(|e| e == "group 8"));
    }

    #[test]
    fn a_source_that_places_cut_requests_is_frozen_only_to_place_one() {
        let w = World::new();
        let mut s = w.shipper(true);
        s.source.tags = true;
        s.source.vouch = true;
        s.sink.freeze = Some(Some(true));
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        // Due: frozen around placing the request, no shipping under it; the
        // point comes when the stream reaches the request, app-consistent.
        let st = s.step(true).unwrap();
        assert!(st.points.is_empty(), "{st:?}");
        assert_eq!(s.sink.thaws, 1);
        {
            let ev = w.ev.borrow();
            assert!(pos(&ev, "freeze") < pos(&ev, "place") && pos(&ev, "place") < pos(&ev, "thaw false"), "{ev:?}");
            assert!(!ev.iter().any(|e| e == "freeze_begin"), "nothing held in memory: {ev:?}");
        }
        let st = s.step(false).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.app, vec![true]);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
        // Not every writer froze: a crash-consistent point at once, no request.
        s.sink.freeze = Some(Some(false));
        w.write(0, 2, 4096);
        s.step(false).unwrap();
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.app, vec![true, false]);
        assert_eq!(w.ev.borrow().iter().filter(|e| *e == "place").count(), 1);
        assert_eq!(s.sink.thaws, 2);
        // Not quiet: no freeze at all.
        *w.quiet.borrow_mut() = false;
        assert!(s.step(true).unwrap().points.is_empty());
        assert_eq!(s.sink.thaws, 2);
    }

    #[test]
    fn a_placed_cut_request_handles_the_due_cut() {
        let w = World::new();
        let mut s = w.shipper(true);
        s.source.tags = true;
        s.source.vouch = true;
        s.sink.freeze = Some(Some(true));
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        let st = s.step(true).unwrap();
        assert!(st.cut_placed && st.points.is_empty(), "placed: the due cut is handled, its point to come: {st:?}");
        let st = s.step(false).unwrap();
        assert!(!st.cut_placed);
        assert_eq!(st.points.len(), 1, "{st:?}");
        // Not every writer froze: a point now, nothing placed.
        s.sink.freeze = Some(Some(false));
        let st = s.step(true).unwrap();
        assert!(!st.cut_placed && st.points.len() == 1, "{st:?}");
        // The freeze failed: nothing placed, a crash-consistent point.
        s.sink.freeze = Some(None);
        let st = s.step(true).unwrap();
        assert!(!st.cut_placed && st.points.len() == 1, "{st:?}");
        assert_eq!(s.sink.app, vec![true, false, false]);
        assert_eq!(w.ev.borrow().iter().filter(|e| *e == "place").count(), 1);
    }

    #[test]
    fn a_source_not_at_a_prefix_state_is_asked_before_any_cut_plan() {
        let w = World::new();
        let mut s = w.shipper(false);
        s.source.vouch = true;
        s.sink.freeze = Some(Some(true));
        // Writes going on, the stream not at a prefix state: due cuts after
        // batches with changes and after empty ones sync nothing, freeze
        // nothing, wait for nothing.
        *w.quiet.borrow_mut() = false;
        w.write(0, 1, 4096);
        let st = s.step(true).unwrap();
        assert!(st.cut_tried && st.points.is_empty(), "{st:?}");
        let st = s.step(true).unwrap();
        assert!(st.cut_tried && st.points.is_empty(), "{st:?}");
        assert_eq!(s.sink.plans, 0, "no cut plan (a filesystem sync) away from a prefix state");
        assert_eq!(s.sink.durable, 0, "no wait for durability either");
        assert!(!w.ev.borrow().iter().any(|e| e == "barrier" || e == "freeze"), "{:?}", w.ev.borrow());
        // At a prefix state: planned, frozen, cut.
        *w.quiet.borrow_mut() = true;
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.plans, 1);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
    }

    #[test]
    fn a_batch_without_changes_that_moves_the_position_is_released() {
        let w = World::new();
        let mut s = w.shipper(true);
        w.write(0, 1, 4096);
        s.step(false).unwrap();
        s.step(false).unwrap();
        assert_eq!(*w.released.borrow(), 1);
        w.log.borrow_mut().push(BLANK);
        w.log.borrow_mut().push(BLANK);
        let st = s.step(false).unwrap();
        assert_eq!(st.changes, 0);
        s.step(false).unwrap();
        assert_eq!(*w.released.borrow(), 3, "records with nothing to ship are released too");
    }

    /// The disk as a pass reads it: before each whole read, the next of
    /// `writes` lands (a writer busy while the passes run).
    #[derive(Clone)]
    struct Busy {
        disk: Disk,
        writes: Rc<RefCell<VecDeque<(u64, u8)>>>,
    }
    impl BlockReader for Busy {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_extents<Er: From<ReadError>>(
            &self,
            exts: &[(u64, u64)],
            each: impl FnMut(u64, &[u8]) -> Result<(), Er>,
        ) -> Result<u64, Er> {
            if let Some((off, byte)) = self.writes.borrow_mut().pop_front() {
                self.disk.write(off, byte, 4096);
            }
            self.disk.read_extents(exts, each)
        }
    }

    fn scan_shipper(w: &World, writes: &[(u64, u8)], under_freeze: bool) -> Shipper<ScanSource<Busy>, FakeSink, Disk> {
        let busy = Busy { disk: w.disk.clone(), writes: Rc::new(RefCell::new(writes.iter().copied().collect())) };
        let src = ScanSource::new("t", busy).verify_under_freeze(under_freeze);
        let mut sink = w.sink(true);
        sink.precopy = false;
        Shipper::start(src, sink, w.disk.clone(), 0).unwrap()
    }

    #[test]
    fn the_scan_cuts_only_after_a_pass_that_found_nothing() {
        let w = World::new();
        w.disk.write(0, 1, 8192);
        // The resync pass finds the first write and one more lands; the
        // first verify pass finds that one, and another lands; the second
        // finds it; the third finds nothing: then the point.
        let mut s = scan_shipper(&w, &[(0, 1), (16384, 2), (32768, 3)], false);
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.app, vec![false]);
        let passes: Vec<String> = w.ev.borrow().iter().filter(|e| e.starts_with("pass")).cloned().collect();
        assert_eq!(passes, ["pass resync", "pass verify", "pass verify", "pass verify"]);
        assert_eq!(s.handed_end, 4, "the position is the number of passes");
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow(), "the replica ends equal to the disk");
        assert!(s.sink.frames.iter().filter(|f| matches!(f, Frame::Data(..))).count() >= 3, "what differed was sent");
        // Quiet disk: the next round's resync pass finds nothing, one
        // verify pass confirms it.
        w.ev.borrow_mut().clear();
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(w.ev.borrow().iter().filter(|e| e.starts_with("pass")).count(), 2);
    }

    #[test]
    fn the_scan_gives_up_on_a_disk_that_keeps_changing() {
        let w = World::new();
        let writes: Vec<(u64, u8)> = (0..8).map(|i| (i * 4096, i as u8 + 1)).collect();
        let mut s = scan_shipper(&w, &writes, false);
        assert!(matches!(s.step(true), Err(E::Source)), "no point: the disk kept changing");
        assert!(s.sink.points.is_empty());
        // Resync pass plus five verify passes, each finding a change.
        assert_eq!(w.ev.borrow().iter().filter(|e| e.starts_with("pass")).count(), 6);
    }

    #[test]
    fn the_scan_under_a_freeze_verifies_inside_it_and_cuts_an_app_point() {
        let w = World::new();
        w.disk.write(0, 1, 8192);
        // The first pass under the freeze finds what the freeze flushed (a
        // write that lands as it reads), the second nothing.
        let mut s = scan_shipper(&w, &[(0, 1), (16384, 2)], true);
        s.sink.freeze = Some(Some(true));
        let st = s.step(true).unwrap();
        assert_eq!(st.points.len(), 1, "{st:?}");
        assert_eq!(s.sink.app, vec![true]);
        assert_eq!(s.sink.thaws, 1);
        assert_eq!(s.sink.points[0].1, *w.disk.0.borrow());
        let ev = w.ev.borrow();
        let evs: Vec<&str> =
            ev.iter().map(String::as_str).filter(|e| e.starts_with("pass") || e.starts_with("freeze") || e.starts_with("thaw")).collect();
        assert_eq!(
            evs,
            ["pass resync", "freeze", "pass verify", "pass verify", "thaw true"],
            "verify passes under the freeze, until one finds nothing"
        );
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
