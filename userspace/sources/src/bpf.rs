//! The eBPF tracker as a change source: the pinned [`ferry_bpf::Tracker`]
//! feeding `STATE/ring`, its counters (what the agent already handled of
//! the program's `lost`, recursion misses, the device cross-check), and
//! the backlog catch-up from its pinned bitmap (docs/consistency.md).
//!
//! Moved out of the agent (issue 12): the agent keeps none of this state.
//! [`BpfRingSource`] is the tracker over `STATE/ring` as a
//! [`ChangeSource`] for the shipper: [`BpfSource::feed`] and
//! [`BpfSource::steer`] before each batch, [`BpfSource::check_now`] and
//! the device counter around a cut; the agent reads [`BpfCounters`]
//! through [`BpfSource::shared_counters`] when it saves its state file.

use crate::ring::{change_of, RingSource};
use crate::{Batch, Change, ChangeSource, Position, Quiet, SourceError, SourceStats};
use ferry_ring::{Record, Ring};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The counters the agent's state file keeps for the bpf tracker (they
/// live in pinned maps and outlast the agent): the same fields, under
/// their `agent.state` names `bpf_*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BpfCounters {
    pub lost_seen: u64,
    pub recursion_seen: u64,
    /// (device bytes changed, tracker bytes seen) when counting started.
    pub baseline: Option<(u64, u64)>,
    pub drops: u64,
    pub recovered: u64,
    pub unguarded: u64,
}

/// CLOCK_MONOTONIC in ns, the clock tracker records carry.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The attached eBPF tracker of one disk, with its typed state.
pub struct BpfSource {
    tracker: ferry_bpf::Tracker,
    disk: PathBuf,
    name: String,
    /// For log lines: the `STATE/ring` path.
    ring_file: String,
    pub counters: BpfCounters,
    /// A copy of `counters` as of the last feed or check, for the agent's
    /// state file while the source is inside the shipper.
    shared: Arc<Mutex<BpfCounters>>,
    last_recursion_check: Instant,
    last_sweep: Instant,
    /// What went through the bitmap since the last log line about it.
    spill_log: (Instant, u64, u64),
    /// A record found `STATE/ring` full since the last look.
    spilled: bool,
    /// Catching up from the bitmap: not a prefix state, no point.
    catchup: bool,
    /// Since when (monotonic ns) the bitmap has held changes.
    bitmap_since_ns: Option<u64>,
}

/// What [`BpfSource::steer`] did to the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Nothing the caller must know.
    Nothing,
    /// The ring's records were folded into the bitmap and released up to
    /// this index unshipped: the caller forgets what it read (its cursor
    /// is moved here) and what it waited to release.
    Folded(u64),
}

impl BpfSource {
    pub fn new(tracker: ferry_bpf::Tracker, disk: PathBuf, name: String, ring_file: String, counters: BpfCounters) -> BpfSource {
        BpfSource {
            tracker,
            disk,
            name,
            ring_file,
            counters,
            shared: Arc::new(Mutex::new(counters)),
            last_recursion_check: Instant::now(),
            last_sweep: Instant::now(),
            spill_log: (Instant::now(), 0, 0),
            spilled: false,
            catchup: false,
            bitmap_since_ns: None,
        }
    }

    /// Attach the tracker of disk `name` (at `disk`, `size` bytes) feeding
    /// `ring_file`, or re-attach to the pins that outlived the last agent.
    /// `counters` are what the state file says was handled; on a fresh
    /// attach they restart from the tracker's own counters now. A fresh
    /// attach of a disk `protected_before` cannot know what changed while
    /// nothing tracked it: the second value says why a resync is needed.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        name: &str,
        disk: &Path,
        size: u64,
        ring_bytes: u32,
        ring_file: &Path,
        owner: &[u8],
        mut counters: BpfCounters,
        protected_before: bool,
    ) -> Result<(BpfSource, Option<String>), ferry_bpf::BpfError> {
        let (t, fresh) = ferry_bpf::Tracker::attach(name, disk, size, ring_bytes, ring_file, owner)?;
        let mut resync = None;
        if fresh {
            log::info!(
                "bpf tracker attached to {} ({}-byte bitmap chunks), pinned in {}",
                disk.display(),
                t.chunk(),
                ferry_bpf::pin_dir(name).display()
            );
            if protected_before {
                resync = Some("tracking was not active (a reboot, an unprotect, or a first attach after another tracker)".into());
            }
            let s = t.stats()?;
            counters.lost_seen = s.lost;
            counters.recursion_seen = t.recursion_misses().unwrap_or(0);
            counters.baseline = ferry_bpf::device_bytes_changed(disk).map(|d| (d, s.bytes + s.recovered_bytes));
        } else {
            log::info!("bpf tracker re-attached from {}", ferry_bpf::pin_dir(name).display());
        }
        if !ferry_bpf::device_iostats_on(disk) {
            log::warn!(
                "{}: the disk's I/O statistics are off (queue/iostats = 0), so the agent cannot check the tracker against \
                 the device's own count of completed writes; turn them on with `echo 1 > /sys/block/<disk>/queue/iostats`",
                disk.display()
            );
        }
        let src = BpfSource::new(t, disk.to_path_buf(), name.to_string(), ring_file.display().to_string(), counters);
        Ok((src, resync))
    }

    pub fn tracker(&self) -> &ferry_bpf::Tracker {
        &self.tracker
    }

    pub fn tracker_mut(&mut self) -> &mut ferry_bpf::Tracker {
        &mut self.tracker
    }

    /// The counters as of the last feed or check, readable while the
    /// source is owned by the shipper.
    pub fn shared_counters(&self) -> Arc<Mutex<BpfCounters>> {
        Arc::clone(&self.shared)
    }

    fn publish(&self) {
        if let Ok(mut c) = self.shared.lock() {
            *c = self.counters;
        }
    }

    /// The device's count of bytes of completed changes (None where the
    /// kernel does not show it).
    pub fn device_bytes(&self) -> Option<u64> {
        ferry_bpf::device_bytes_changed(&self.disk)
    }

    /// Catching up from the bitmap (no point may be cut).
    pub fn catching_up(&self) -> bool {
        self.catchup
    }

    /// Checks that must hold right before a point is cut: the tracker is
    /// still attached and has not missed a run. A miss sets `resync`.
    pub fn check_now(&mut self, resync: &mut Option<String>) -> Result<(), SourceError> {
        let t = &self.tracker;
        // The device's own count of completed changes against the tracker's:
        // if the kernel completed more than the program saw, something was
        // missed, however that happened.
        // Read in this order: the device counts a completion after the
        // tracepoint fires, so what it counted is by now seen, recovered, or
        // still in `inflight` (issued, its completion not seen).
        let dev = ferry_bpf::device_bytes_changed(&self.disk);
        let pending: u64 = t.inflight().iter().map(|e| e.len).sum();
        let s = t.stats()?;
        let seen = s.bytes + s.recovered_bytes;
        match (dev, self.counters.baseline) {
            (Some(d), Some((d0, s0))) if d.saturating_sub(d0) > seen.saturating_sub(s0) + pending => {
                let missed = d.saturating_sub(d0) - seen.saturating_sub(s0) - pending;
                log::warn!("the disk completed {missed} bytes of changes the bpf tracker did not see; resync required");
                *resync = Some(format!("the bpf tracker missed {missed} bytes of completed changes"));
                self.counters.baseline = Some((d, seen));
            }
            (Some(d), None) => self.counters.baseline = Some((d, seen)),
            _ => {}
        }
        if !ferry_bpf::pin_dir(&self.name).join("link").exists() {
            return Err(SourceError::Detached(format!("{}: the bpf tracker was detached (ferry unprotect?); stopping", self.name)));
        }
        match t.recursion_misses() {
            Some(m) if m > self.counters.recursion_seen => {
                *resync = Some(format!("the bpf tracker missed {} runs (recursion)", m - self.counters.recursion_seen));
                self.counters.recursion_seen = m;
            }
            Some(_) => {}
            None => *resync = Some("the bpf tracker's program is gone".into()),
        }
        self.publish();
        Ok(())
    }

    /// Move what the tracker recorded into `STATE/ring`, and turn any loss
    /// it reports into `resync`.
    pub fn feed(&mut self, resync: &mut Option<String>) -> Result<(), SourceError> {
        let t = &mut self.tracker;
        let c = t.collect()?;
        if c.invalid > 0 {
            *resync = Some(format!("the bpf tracker produced {} unreadable records", c.invalid));
        }
        self.spilled |= c.spilled > 0 && !self.catchup;
        self.spill_log.1 += c.spilled;
        self.spill_log.2 += c.bitmap_extents;
        if (self.spill_log.1 > 0 || self.spill_log.2 > 0) && self.spill_log.0.elapsed() >= Duration::from_secs(10) {
            log::info!(
                "bpf tracker: {} records went to the bitmap (ring buffer or STATE/ring full), {} extents taken from it, in {:.0}s",
                self.spill_log.1,
                self.spill_log.2,
                self.spill_log.0.elapsed().as_secs_f64()
            );
            self.spill_log = (Instant::now(), 0, 0);
        }
        if c.spilled > 0 || c.bitmap_extents > 0 {
            self.bitmap_since_ns.get_or_insert_with(monotonic_ns);
        }
        if self.last_sweep.elapsed() >= Duration::from_millis(250) {
            self.last_sweep = Instant::now();
            let n = t.sweep_inflight();
            if n > 0 {
                log::info!("bpf tracker: {n} writes issued over 0.5 s ago and not seen completing; shipping their ranges");
            }
        }
        let s = t.stats()?;
        self.counters.drops = s.drops;
        if s.unguarded > self.counters.unguarded {
            log::warn!(
                "bpf tracker: {} writes were issued on a tag outside its in-flight table (the disk's queues changed?); \
                 a missed completion of one is caught only by the device cross-check (a resync)",
                s.unguarded - self.counters.unguarded
            );
            self.counters.unguarded = s.unguarded;
        }
        if s.recovered > self.counters.recovered {
            log::info!(
                "bpf tracker: {} completions the kernel did not show it were caught at reissue",
                s.recovered - self.counters.recovered
            );
            self.counters.recovered = s.recovered;
        }
        if s.lost > self.counters.lost_seen {
            *resync = Some(format!("the bpf tracker could not record {} changes", s.lost - self.counters.lost_seen));
            self.counters.lost_seen = s.lost;
        }
        if self.last_recursion_check.elapsed() >= Duration::from_secs(1) {
            self.last_recursion_check = Instant::now();
            self.check_now(resync)?;
        }
        self.publish();
        Ok(())
    }

    /// Keep a backlog accounted for and cheap to ship. When shipping falls
    /// behind (three quarters of `STATE/ring` unread from `cursor`, or a
    /// record found it full), switch to catch-up: the tracker puts every
    /// new change in its pinned bitmap, and the records queued in the ring
    /// are folded into that bitmap too (marked there first, then released
    /// unshipped; the pinned bitmap outlives the agent, so nothing is ever
    /// only in memory). The bitmap coalesces a block written many times
    /// into one, and is queued back into the ring in disk order, a bounded
    /// slice at a time, as the master target makes the last slice durable.
    /// Once a take finds the bitmap empty, records go to the ring again in
    /// completion order. During catch-up the replica is not a prefix
    /// state: no point is cut. A record that does not parse sets `resync`.
    pub fn steer(&mut self, ring: &Ring, cursor: u64, resync: &mut Option<String>) -> Result<Steer, SourceError> {
        let cap = ring.capacity();
        let unread = ring.producer().wrapping_sub(cursor);
        let mut out = Steer::Nothing;
        // (A refill leaves at most half the ring queued, so leaving a
        // catch-up never re-enters one by itself.)
        if !self.catchup && (self.spilled || unread > cap / 4 * 3) {
            let t = &self.tracker;
            t.set_spill(true);
            // Fold: everything not yet released goes to the bitmap, then the
            // ring is released (what was sent and not yet acknowledged is
            // sent again: harmless).
            let mut at = ring.consumer();
            let mut folded = 0u64;
            loop {
                let (recs, next) = ring.read_from(at, 4096)?;
                if recs.is_empty() {
                    break;
                }
                for r in recs {
                    match r {
                        Ok(rec) => t.mark(rec.offset, u64::from(rec.length)),
                        Err(e) => *resync = Some(format!("tracker sent an invalid record ({e})")),
                    }
                    folded += 1;
                }
                at = next;
            }
            ring.release(at)?;
            out = Steer::Folded(at);
            self.catchup = true;
            self.spilled = false;
            self.bitmap_since_ns.get_or_insert_with(monotonic_ns);
            log::info!(
                "shipping fell behind the disk's writes ({unread} records unread in {}): catching up from the bpf tracker's \
                 bitmap ({folded} queued records folded into it); backlog, not loss: no resync, and no point until it is shipped",
                self.ring_file
            );
        }
        if self.catchup {
            let used = ring.pending();
            let want = (cap / 2).max(1);
            if used < want / 2 {
                let (_, complete) = self.tracker.take_bitmap_upto(want - used);
                if complete {
                    self.tracker.set_spill(false);
                    self.catchup = false;
                    self.spilled = false;
                    log::info!("caught up: the bpf tracker's bitmap is shipped or queued; changes go to the ring in write order again");
                }
            }
        }
        Ok(out)
    }

    /// The part of the backlog the bitmap holds: its bytes, and (if any) a
    /// bound on when its oldest change was made (monotonic ns): since the
    /// bitmap was last empty, or, if later, since the previous round of
    /// takes began (it took anything older).
    pub fn bitmap_backlog(&mut self, now: u64) -> (u64, Option<u64>) {
        let in_bitmap = self.tracker.bitmap_dirty_bytes();
        if in_bitmap == 0 {
            self.bitmap_since_ns = None;
            return (0, None);
        }
        let since = *self.bitmap_since_ns.get_or_insert(now);
        let round = self.tracker.bitmap_age_bound().map(|d| now.saturating_sub(d.as_nanos() as u64));
        (in_bitmap, Some(round.map_or(since, |r| r.max(since))))
    }
}

/// The eBPF tracker's stream as a [`ChangeSource`]: the tracker
/// ([`BpfSource`]) feeds `STATE/ring`, read through a [`RingSource`]
/// (positions are ring indices). Each batch first moves what the tracker
/// recorded into the ring and steers a backlog into the pinned bitmap;
/// a loss the tracker reports leads the next batch. The barrier before a
/// cut records the device's completed-write counter; `in_flight` is the
/// tracker's in-flight table; `quiesce` reads the tracker again, queues
/// the bitmap, checks the tracker and compares the device counter. Under a
/// freeze the tracker holds new records in memory (the ring's file may be
/// on a frozen filesystem) and hands them back after the thaw.
pub struct BpfRingSource {
    bpf: BpfSource,
    ring: RingSource,
    /// The disk's size (in-flight writes are clipped to it).
    size: u64,
    /// A loss found between batches, for the head of the next one.
    loss: Option<String>,
    /// Between `freeze_begin` and `freeze_end`.
    frozen: bool,
    /// Records held while frozen and handed out.
    taken: Vec<Record>,
    /// The device's counter at the barrier.
    dev0: Option<u64>,
    /// Backlogs folded into the bitmap so far.
    folds: u64,
}

impl BpfRingSource {
    pub fn new(bpf: BpfSource, ring: RingSource, size: u64) -> BpfRingSource {
        BpfRingSource { bpf, ring, size, loss: None, frozen: false, taken: Vec::new(), dev0: None, folds: 0 }
    }

    /// The parts back (the agent keeps them across connections).
    pub fn into_parts(self) -> (BpfSource, RingSource) {
        (self.bpf, self.ring)
    }

    pub fn bpf_mut(&mut self) -> &mut BpfSource {
        &mut self.bpf
    }

    pub fn ring(&self) -> &RingSource {
        &self.ring
    }

    /// Both parts at once (the ring to read, the tracker to measure).
    pub fn parts_mut(&mut self) -> (&RingSource, &mut BpfSource) {
        (&self.ring, &mut self.bpf)
    }

    /// How many times a backlog was folded into the bitmap (what was
    /// shipped and not yet released then is forgotten).
    pub fn folds(&self) -> u64 {
        self.folds
    }

    fn note(&mut self, resync: Option<String>) {
        if let Some(why) = resync {
            self.loss = Some(why);
        }
    }
}

impl ChangeSource for BpfRingSource {
    fn kind(&self) -> &'static str {
        "bpf"
    }

    fn resume(&mut self, durable: Position) -> Result<(), SourceError> {
        self.ring.resume(durable)
    }

    fn next_batch(&mut self, max: usize) -> Result<Batch, SourceError> {
        let mut resync = None;
        self.bpf.feed(&mut resync)?;
        let mut held = Vec::new();
        if self.frozen {
            held = self.bpf.tracker().take_held();
        } else if let Steer::Folded(at) = self.bpf.steer(self.ring.ring(), self.ring.cursor(), &mut resync)? {
            self.ring.skip_to(at);
            self.folds += 1;
        }
        self.note(resync);
        let mut b = self.ring.next_batch(max)?;
        b.changes.extend(held.iter().filter_map(|r| change_of(r, false)));
        self.taken.extend(held);
        if let Some(why) = self.loss.take() {
            b.changes.insert(0, Change::Loss(why));
        }
        Ok(b)
    }

    fn release(&mut self, upto: Position) -> Result<(), SourceError> {
        // A fold released the ring past what was shipped before it.
        if !self.ring.ring().in_window(upto) {
            return Ok(());
        }
        self.ring.release(upto)
    }

    fn barrier(&mut self) -> Result<(), SourceError> {
        let mut resync = None;
        self.bpf.feed(&mut resync)?;
        self.note(resync);
        // Any change the device completes from here on must stop the cut:
        // one the tracker sees moves the producer; one it does not run
        // for (and whose tag is not reused meanwhile) shows only here.
        self.dev0 = self.bpf.device_bytes();
        Ok(())
    }

    fn in_flight(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        let recs: Vec<Record> = self.bpf.tracker().inflight().iter().flat_map(|e| e.records(self.size)).collect();
        if !recs.is_empty() {
            log::info!("bpf tracker: {} in-flight writes shipped before the cut", recs.len());
        }
        Ok(recs.iter().map(|r| (r.offset, r.offset + u64::from(r.length))).collect())
    }

    fn quiesce(&mut self) -> Result<Quiet, SourceError> {
        let mut resync = None;
        // Anything that completed meanwhile is in the tracker's buffer; a
        // write moved to the bitmap (a completion caught at reissue) moves
        // the producer once the bitmap is queued, and no point.
        self.bpf.feed(&mut resync)?;
        let mut late = false;
        if self.frozen {
            let held = self.bpf.tracker().take_held();
            late = !held.is_empty();
            self.taken.extend(held);
        } else {
            self.bpf.tracker_mut().take_bitmap();
        }
        self.bpf.check_now(&mut resync)?;
        self.note(resync);
        let still = self.dev0.is_none() || self.bpf.device_bytes() == self.dev0;
        let quiet = still && !late && self.loss.is_none() && !self.bpf.catching_up() && self.ring.quiesce()? == Quiet::Yes;
        Ok(if quiet { Quiet::Yes } else { Quiet::No })
    }

    fn freeze_begin(&mut self) -> Result<(), SourceError> {
        self.frozen = true;
        self.taken.clear();
        self.bpf.tracker().hold();
        Ok(())
    }

    fn freeze_end(&mut self, point: bool) -> Result<(), SourceError> {
        self.frozen = false;
        // Hand back to the durable ring what was collected while frozen and
        // is not covered by a point (re-shipping is harmless). Held records
        // were also marked in the tracker's bitmap (so an agent that died
        // frozen loses nothing); take those marks now, too.
        let rest = self.bpf.tracker().unhold();
        let taken = std::mem::take(&mut self.taken);
        for rec in rest.into_iter().chain(if point { Vec::new() } else { taken }) {
            self.bpf.tracker().requeue(rec);
        }
        self.bpf.tracker_mut().take_bitmap();
        Ok(())
    }

    fn request_cut(&mut self) -> Result<bool, SourceError> {
        // Not a prefix state until the bitmap is shipped.
        Ok(!self.bpf.catching_up())
    }

    fn stats(&self) -> SourceStats {
        self.ring.stats()
    }

    fn detach(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}
