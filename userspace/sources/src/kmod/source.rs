//! [`KmodSource`]: the kernel module tracker as a [`ChangeSource`].
//!
//! The module numbers every change (its sequence number); the agent
//! follows its ring of records (and, in data mode, their payloads). How
//! the module's stream maps onto the trait (docs/architecture.md, "The kernel module tracker as a change source"):
//!
//! - a record with its payload is a [`Change::Payload`]; one without (metadata
//!   mode) is an [`Change::Extent`], read from the disk after a CATCHUP
//!   barrier (every write queued so far completed); discards and
//!   write-zeroes are [`Change::Zero`];
//! - a TAG record is a [`Marker::CutRequest`]: a consistency group's (its
//!   cut id as `group` and time) or one this source placed under a freeze
//!   (`app`, [`ChangeSource::place_cut_request`]);
//! - the bitmap the module falls back to is handed over by CATCHUP, saved
//!   (`STATE/kmod.catchup`, through a [`KmodStore`]) before any of it is
//!   shipped, and shipped between [`Marker::CatchUpStart`] and
//!   [`Marker::CatchUpEnd`] once the stream reaches the hand-over;
//! - ring overflows, invalid records and an unclean stop are a
//!   [`Change::Loss`] (or, found at attach, a resync the constructor
//!   returns).
//!
//! Consistency: after an extent was read from the live disk, the stream is
//! a prefix state again only once it reaches the module sequence number
//! taken after the read (`consistent_from`). The shipper reads every batch
//! before it calls the source again, so the source takes that number at
//! its next call. [`ChangeSource::quiesce`] answers [`Quiet::Yes`] at any
//! record boundary past it (payload records are the disk's states), and
//! only such cut requests are handed out
//! ([`ChangeSource::knows_prefix_states`]): so a point may be cut after any
//! batch, writes going on or not, as the module's own loop did.

use super::catchup::{Catchup, Handover};
use super::{Kmod, KmodError};
use crate::{Batch, Change, ChangeSource, Marker, Position, Quiet, SourceError, SourceStats};
use ferry_ring::generated_ioctl::FERRY_CBT_MODE_BITMAP;
use ferry_ring::{RecordKind, Ring};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The kernel module's part of the agent's state (`agent.state`, fields
/// `kmod_*` and `ring_overflows_seen`; docs/formats.md): kept by the
/// source, written by its [`KmodStore`] and by the agent's own saves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KmodState {
    /// The module sequence number the stream has reached (the first one a
    /// new attachment numbers from).
    pub next_seq: u64,
    /// The mode last seen ("data", "metadata", "bitmap").
    pub mode: Option<String>,
    /// Catch-ups shipped from the module's bitmap.
    pub catchups: u64,
    /// Some while a hand-over of the module's bitmap is not known durable
    /// (saved in `STATE/kmod.catchup`); this source writes `u64::MAX`
    /// (older agents wrote the protocol sequence number after it).
    pub catchup_until: Option<u64>,
    /// Set while the module may have handed over ranges not yet saved.
    pub handover_open: bool,
    pub attach_id: Option<u64>,
    /// The (record, data) ring indices of the release under way.
    pub released: Option<(u64, u64)>,
    /// The ring's overflow counter as last accounted for.
    pub overflows_seen: u64,
    /// Shipping a catch-up now (not persisted: the agent's mode).
    pub catching_up: bool,
}

/// Where the source writes its state, durably, before it goes on (the
/// agent's state folder).
pub trait KmodStore {
    /// Write `st` into the agent's state file now.
    fn save(&mut self, st: &KmodState) -> Result<(), SourceError>;
    fn load_catchup(&self) -> Result<Option<Catchup>, SourceError>;
    fn save_catchup(&mut self, c: &Catchup) -> Result<(), SourceError>;
    fn drop_catchup(&mut self) -> Result<(), SourceError>;
    /// Where `STATE/kmod.catchup` is (for messages).
    fn catchup_path(&self) -> PathBuf;
}

/// How to attach ([`KmodSource::attach`]).
pub struct KmodAttach<'a> {
    pub disk: &'a Path,
    pub size: u64,
    pub capacity: u64,
    pub data_bytes: u64,
    /// The disk was protected (synced) before this agent.
    pub protected_before: bool,
    /// The last agent on this state folder used the kernel module too.
    pub same_tracker: bool,
}

/// The kernel module tracker of one disk.
pub struct KmodSource {
    k: Kmod,
    disk: PathBuf,
    size: u64,
    state: Arc<Mutex<KmodState>>,
    store: Box<dyn KmodStore>,
    /// Ring and data indices handed out up to.
    cursor: u64,
    dcur: u64,
    /// The position of the last batch handed out.
    pos: Position,
    /// (batch position, ring index, data index) handed out, not released.
    handed: VecDeque<(Position, u64, u64)>,
    /// Hand-overs to ship when the stream reaches their sequence number.
    deferred: VecDeque<Handover>,
    /// The batch that handed out the last saved hand-over: once released,
    /// `STATE/kmod.catchup` is durable and goes.
    catchup_done_at: Option<Position>,
    /// Inside [`Marker::CatchUpStart`] .. [`Marker::CatchUpEnd`].
    catchup_open: bool,
    /// The module sequence number the stream has reached.
    stream_seq: u64,
    /// From this module sequence number on the stream is a prefix state.
    consistent_from: u64,
    /// Extents were handed out: `consistent_from` moves past the read at
    /// the next call.
    reread: bool,
    /// A loss handed out; the resync has not ended yet.
    loss_out: bool,
    /// A loss found at [`ChangeSource::resume`] (a hand-over not saved, a
    /// saved catch-up missing): handed out in the first batch.
    resume_loss: Option<String>,
    /// The module sequence number of a TAG placed and not yet reached by
    /// the stream: no other is placed meanwhile.
    tag_out: Option<u64>,
    /// The ring's overflow counter when the resync under way began (before
    /// it dropped the ring): overflows after that are not covered by it.
    resync_overflows: Option<u64>,
    stats: SourceStats,
}

fn tracker_err(e: KmodError) -> SourceError {
    match e {
        KmodError::Io { what, source } => SourceError::Io { what, source },
        KmodError::Ring(r) => SourceError::Ring(r),
        KmodError::Tracker(m) | KmodError::Usage(m) => SourceError::Other(m),
    }
}

impl KmodSource {
    /// Attach the disk (or find its attachment, which outlives agents),
    /// `claim` it for this state folder (the owner record, see the
    /// agent's owner.rs), and judge from what the module says and from
    /// `st` (the state the last agent saved) whether changes may be
    /// missing: then the returned reason asks for a resync.
    pub fn attach(
        a: KmodAttach<'_>,
        mut st: KmodState,
        store: Box<dyn KmodStore>,
        claim: impl FnOnce(u64) -> Result<(), KmodError>,
    ) -> Result<(KmodSource, Option<String>), KmodError> {
        let k = Kmod::attach(a.disk, a.capacity, a.data_bytes, st.next_seq)?;
        claim(k.attach_id)?;
        let disk = a.disk.display();
        let mut resync = None;
        let same = st.attach_id == Some(k.attach_id);
        if st.catchup_until.is_some() {
            let saved = if st.handover_open {
                Err("it stopped while the module handed its bitmap over".to_string())
            } else {
                match store.load_catchup() {
                    Ok(Some(c)) => Ok(c),
                    Ok(None) => Err(format!("{} is missing", store.catchup_path().display())),
                    Err(e) => Err(e.to_string()),
                }
            };
            match saved {
                Ok(c) => log::info!(
                    "the last agent stopped while shipping a catch-up from the module's bitmap: shipping its {} saved range(s) again",
                    c.handovers.iter().map(|h| h.ranges.len()).sum::<usize>()
                ),
                Err(why) => {
                    resync = Some(format!("the last agent stopped while shipping a catch-up from the module's bitmap ({why})"));
                    st.catchup_until = None;
                    st.handover_open = false;
                }
            }
        }
        if !same {
            // Another attachment: its ring and counters start over.
            st.overflows_seen = k.ring.overflows();
            st.released = None;
        }
        let protected_before = a.protected_before;
        if k.fresh {
            log::info!(
                "kernel module tracker attached to {disk} ({} records, {} bytes of data area)",
                k.ring.capacity(),
                k.ring.data_capacity()
            );
            if protected_before {
                resync = Some("tracking was not active (a reboot, a module reload, or a first attach after another tracker)".into());
            }
        } else if same {
            log::info!("kernel module tracker found {disk} already attached");
        } else if k.unclean {
            log::warn!("the kernel module attached {disk} again after an unclean stop: changes may be missing");
            if protected_before {
                resync = Some("the kernel module was stopped uncleanly (a crash or a reset)".into());
            }
        } else if k.restored && protected_before && a.same_tracker && k.restored_seq < st.next_seq {
            log::warn!("the kernel module restored {disk} from an older state file than this agent followed");
            resync = Some("the kernel module's state file is older than the changes already shipped".into());
        } else if k.restored && protected_before && a.same_tracker {
            log::info!("the kernel module attached {disk} again from a clean stop: catching up from its bitmap");
        } else if protected_before {
            resync = Some("the disk is attached, but not by the attachment this agent followed".into());
        }
        st.attach_id = Some(k.attach_id);
        let src = KmodSource {
            cursor: k.ring.consumer(),
            dcur: k.ring.data_consumer(),
            k,
            disk: a.disk.to_path_buf(),
            size: a.size,
            state: Arc::new(Mutex::new(st)),
            store,
            pos: 0,
            handed: VecDeque::new(),
            deferred: VecDeque::new(),
            catchup_done_at: None,
            catchup_open: false,
            stream_seq: 0,
            consistent_from: 0,
            reread: false,
            loss_out: false,
            resume_loss: None,
            tag_out: None,
            resync_overflows: None,
            stats: SourceStats::default(),
        };
        Ok((src, resync))
    }

    /// The state the agent writes with its own saves (shared, current).
    pub fn shared_state(&self) -> Arc<Mutex<KmodState>> {
        Arc::clone(&self.state)
    }

    /// The module's ring (for the backlog in `ferry status`).
    pub fn ring(&self) -> &Ring {
        &self.k.ring
    }

    fn st(&self) -> std::sync::MutexGuard<'_, KmodState> {
        // A panic while holding it cannot leave it half-written: the
        // fields are plain values.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&mut self) -> Result<(), SourceError> {
        let st = self.st().clone();
        self.store.save(&st)
    }

    /// Finish a release of the ring interrupted between its two index
    /// stores, from the pair saved before it.
    fn complete_release(&self) -> Result<(), SourceError> {
        let saved = self.st().released;
        if let Some((i, d)) = saved {
            let ring = &self.k.ring;
            if ring.consumer() != i && ring.in_window(i) {
                ring.release(i)?;
            }
            if ring.consumer() == i {
                ring.release_data(d);
            }
        }
        Ok(())
    }

    /// The extents handed out before this call are read by now: the
    /// stream is consistent again from the module's sequence number now.
    fn absorb_read(&mut self) -> Result<(), SourceError> {
        if self.reread {
            self.consistent_from = self.k.status().map_err(tracker_err)?.seq;
            self.reread = false;
        }
        Ok(())
    }

    fn consistent_here(&self) -> bool {
        self.stream_seq >= self.consistent_from && self.deferred.is_empty() && !self.reread
    }

    /// A loss the ring shows (overflow into nothing), once.
    fn ring_loss(&self) -> Option<String> {
        let ring = &self.k.ring;
        let seen = self.st().overflows_seen;
        let lost = ring.overflows();
        (lost > seen || ring.overflowed() && lost == 0 && seen == 0)
            .then(|| format!("the kernel module lost track of {} change(s)", lost.saturating_sub(seen).max(1)))
    }

    /// CATCHUP: a completion barrier for every write queued so far, and the
    /// module's bitmap handed over. Its ranges are shipped when the stream
    /// reaches the hand-over: records before it are older than the changes
    /// the bitmap holds. Written down before the module lets go of its
    /// bitmap (an agent that stops before they are saved leaves a
    /// resync), then saved in `STATE/kmod.catchup` before any of it is
    /// shipped, so that a later agent ships it again.
    fn barrier(&mut self) -> Result<(), SourceError> {
        let before = {
            let mut st = self.st();
            let before = st.catchup_until;
            st.catchup_until = Some(u64::MAX);
            st.handover_open = true;
            before
        };
        self.persist()?;
        let c = self.k.catchup(self.size, false).map_err(tracker_err)?;
        log::debug!("kmod tracker: barrier at seq {} (waited {:.1} ms)", c.seq, c.wait_ns as f64 / 1e6);
        if !c.ranges.is_empty() {
            let mut saved = match before {
                Some(_) => self.store.load_catchup()?.unwrap_or_default(),
                None => Catchup::default(),
            };
            saved.handovers.push(Handover { seq: c.seq, ranges: c.ranges.clone() });
            self.store.save_catchup(&saved)?;
            self.deferred.push_back(Handover { seq: c.seq, ranges: c.ranges });
            self.catchup_done_at = None;
        } else if self.deferred.is_empty() && self.catchup_done_at.is_none() {
            self.st().catchup_until = before;
        }
        self.st().handover_open = false;
        self.persist()
    }

    /// Hand out the ranges of the next hand-over, inside a catch-up.
    fn push_handover(&mut self, h: Handover, out: &mut Vec<Change>) {
        let bytes: u64 = h.ranges.iter().map(|r| r.1 - r.0).sum();
        log::info!("kmod tracker: catching up {bytes} bytes from the bitmap");
        {
            let mut st = self.st();
            st.catchups += 1;
            st.catching_up = true;
        }
        self.stats.catchups += 1;
        if !self.catchup_open {
            out.push(Change::Marker(Marker::CatchUpStart));
            self.catchup_open = true;
        }
        for (a, b) in h.ranges {
            out.push(Change::Extent { offset: a, len: b - a });
        }
        // The read may hold any change up to the moment it is made.
        self.reread = true;
        if self.deferred.is_empty() {
            self.catchup_done_at = Some(self.pos + 1);
        }
    }

    /// Close the catch-up once the stream is a prefix state again.
    fn maybe_end_catchup(&mut self, out: &mut Vec<Change>) {
        if self.catchup_open && self.consistent_here() {
            out.push(Change::Marker(Marker::CatchUpEnd));
            self.catchup_open = false;
            self.st().catching_up = false;
        }
    }

    fn batch(&mut self, max: usize) -> Result<Batch, SourceError> {
        self.absorb_read()?;
        let mut changes = Vec::new();
        if let Some(why) = self.resume_loss.take() {
            changes.push(self.loss(why));
            return Ok(self.seal(changes, self.cursor, self.dcur, None));
        }
        if !self.loss_out {
            if let Some(why) = self.ring_loss() {
                log::warn!("resync required: {why}");
                self.loss_out = true;
                self.stats.losses += 1;
                changes.push(Change::Loss(why));
                return Ok(self.seal(changes, self.cursor, self.dcur, None));
            }
        }
        // Status before the ring: a change it counts is in the ring by the
        // time the ring is read (records are published under the same
        // lock), or in the bitmap (then the mode says so).
        let status = self.k.status().map_err(tracker_err)?;
        let mode = super::mode_name(status.mode);
        if self.st().mode.as_deref() != Some(mode) {
            log::info!("kmod tracker: {mode} mode");
            self.st().mode = Some(mode.into());
        }
        let (recs, next) = self.k.ring.read_from(self.cursor, max.clamp(1, 1024))?;
        if recs.is_empty() {
            // Every record before a hand-over is applied: its ranges go now.
            while let Some(h) = self.deferred.pop_front() {
                self.push_handover(h, &mut changes);
            }
            if changes.is_empty() && status.mode == FERRY_CBT_MODE_BITMAP && self.k.ring.consumer() == self.cursor {
                // The ring is empty and released: CATCHUP finds room for
                // its marker, and the disk leaves bitmap mode. Its ranges
                // go at the next batch.
                self.barrier()?;
            }
            if status.mode != FERRY_CBT_MODE_BITMAP {
                self.stream_seq = self.stream_seq.max(status.seq);
            }
            self.maybe_end_catchup(&mut changes);
            self.note_next_seq();
            return Ok(self.seal(changes, self.cursor, self.dcur, None));
        }
        let oldest = recs.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.time_ns).filter(|&t| t > 0).min();
        let mut dcur = self.dcur;
        let mut barrier = false;
        let mut next = next;
        for (i, r) in recs.into_iter().enumerate() {
            let rec = match r {
                Ok(rec) => rec,
                Err(e) => {
                    changes.push(self.loss(format!("the kernel module tracker sent an invalid record ({e})")));
                    break;
                }
            };
            // Hand-overs at or before this record's place: every older
            // record is applied by now.
            while self.deferred.front().is_some_and(|d| d.seq <= rec.seq) {
                let h = self.deferred.pop_front().expect("front exists");
                self.push_handover(h, &mut changes);
            }
            if rec.kind == RecordKind::Tag && self.reread {
                // Extents read from the live disk (records, or a hand-over
                // just pushed) come before this tag in the batch: end the
                // batch here, so that they are read
                // before the tag is judged (at the next call, with the
                // module's sequence number after the read), as the read
                // of each extent in place did.
                next = self.cursor.wrapping_add(i as u64);
                break;
            }
            if self.tag_out.is_some_and(|t| rec.seq >= t) {
                // The placed TAG is reached (cut or dropped here).
                self.tag_out = None;
            }
            let end = (rec.offset + u64::from(rec.length)).min(self.size);
            match rec.kind {
                RecordKind::Write if rec.data => {
                    let Some(payload) = self.k.ring.take_payload(&mut dcur, rec.length) else {
                        changes.push(self.loss(format!(
                            "the kernel module tracker sent an invalid record (record {} names a payload outside the data area)",
                            rec.seq
                        )));
                        break;
                    };
                    if rec.offset < end {
                        let mut data = payload;
                        data.truncate((end - rec.offset) as usize);
                        changes.push(Change::Payload { offset: rec.offset, data });
                    }
                }
                RecordKind::Write => {
                    if !barrier {
                        // Every record read so far precedes this barrier:
                        // their writes have completed.
                        self.barrier()?;
                        barrier = true;
                    }
                    if rec.offset < end {
                        changes.push(Change::Extent { offset: rec.offset, len: end - rec.offset });
                        self.reread = true;
                    }
                }
                RecordKind::Discard | RecordKind::WriteZeroes => {
                    if rec.offset < end {
                        changes.push(Change::Zero { offset: rec.offset, len: end - rec.offset });
                    }
                }
                RecordKind::Tag => {
                    self.stream_seq = rec.seq + 1;
                    self.maybe_end_catchup(&mut changes);
                    let consistent = self.consistent_here() && !self.catchup_open;
                    if rec.group {
                        // A consistency group's shared point (GROUP_TAG):
                        // named by the group's cut id as its time, so that
                        // every disk of the group has a point with it.
                        if consistent {
                            changes.push(Change::Marker(Marker::CutRequest { group: Some(rec.offset), time_ns: rec.offset, app: false }));
                        } else {
                            log::warn!("group cut {} not recorded: the disk is catching up", rec.offset);
                        }
                    } else if consistent {
                        // One placed under a freeze (place_cut_request).
                        changes.push(Change::Marker(Marker::CutRequest { group: None, time_ns: ferry_common::now_ns(), app: true }));
                    }
                }
                RecordKind::Catchup => {}
            }
            self.stream_seq = rec.seq + 1;
            self.maybe_end_catchup(&mut changes);
        }
        self.note_next_seq();
        Ok(self.seal(changes, next, dcur, oldest))
    }

    /// The module sequence number reached, for `kmod_next_seq` (the first
    /// one a new attachment numbers from, and what a restored module's
    /// state is checked against): never lowered, so a batch before the
    /// stream saw any record (`stream_seq` still 0, or behind what an
    /// earlier agent reached) cannot write it back.
    fn note_next_seq(&mut self) {
        let reached = self.stream_seq;
        let mut st = self.st();
        st.next_seq = st.next_seq.max(reached);
    }

    fn loss(&mut self, why: String) -> Change {
        log::warn!("resync required: {why}");
        self.loss_out = true;
        self.stats.losses += 1;
        Change::Loss(why)
    }

    /// A batch of `changes` ending at ring index `next`, data index `dcur`.
    fn seal(&mut self, changes: Vec<Change>, next: u64, dcur: u64, oldest_ns: Option<u64>) -> Batch {
        if changes.is_empty() && next == self.cursor {
            return Batch { changes, end: self.pos, oldest_ns: None };
        }
        self.pos += 1;
        self.cursor = next;
        self.dcur = dcur;
        self.handed.push_back((self.pos, next, dcur));
        self.stats.changes += changes.len() as u64;
        Batch { changes, end: self.pos, oldest_ns }
    }
}

impl ChangeSource for KmodSource {
    fn kind(&self) -> &'static str {
        "kmod"
    }

    /// Everything not released is handed out again, and every hand-over
    /// saved in `STATE/kmod.catchup` (not known durable) shipped again at
    /// its place. Whatever the replica holds now came from a sync, a
    /// resync or an earlier agent: consistent only once the changes queued
    /// so far are applied.
    fn resume(&mut self, durable: Position) -> Result<(), SourceError> {
        self.complete_release()?;
        self.cursor = self.k.ring.consumer();
        self.dcur = self.k.ring.data_consumer();
        self.pos = durable;
        self.handed.clear();
        self.deferred.clear();
        self.catchup_done_at = None;
        self.catchup_open = false;
        self.reread = false;
        self.loss_out = false;
        self.tag_out = None;
        self.resume_loss = None;
        let (until, open) = {
            let st = self.st();
            (st.catchup_until, st.handover_open)
        };
        if open {
            // The module may have handed ranges over that were never saved.
            self.resume_loss = Some("the last agent stopped while the kernel module handed its bitmap over".into());
        } else if until.is_some() {
            match self.store.load_catchup()? {
                Some(saved) => self.deferred.extend(saved.handovers),
                None => {
                    self.resume_loss = Some(format!(
                        "the catch-up from the kernel module's bitmap is not shipped and {} is missing",
                        self.store.catchup_path().display()
                    ))
                }
            }
        }
        if self.resume_loss.is_some() {
            // The resync the loss leads to covers any catch-up; until it
            // ends (resync_end), the state keeps asking for one.
            let mut st = self.st();
            st.catchup_until = Some(u64::MAX);
            st.handover_open = true;
        } else if until.is_some() {
            self.st().catchup_until = if self.deferred.is_empty() { None } else { Some(u64::MAX) };
        }
        self.st().catching_up = false;
        self.consistent_from = self.k.status().map_err(tracker_err)?.seq;
        self.persist()
    }

    fn next_batch(&mut self, max: usize) -> Result<Batch, SourceError> {
        self.batch(max)
    }

    /// Release the ring up to the batch `upto` (the index pair saved first:
    /// the two index stores are not one atomic step); a catch-up all of
    /// whose hand-overs are released is durable: `STATE/kmod.catchup` goes.
    fn release(&mut self, upto: Position) -> Result<(), SourceError> {
        let mut last = None;
        while self.handed.front().is_some_and(|&(p, _, _)| p <= upto) {
            last = self.handed.pop_front();
        }
        let ended = self.catchup_done_at.is_some_and(|p| p <= upto) && self.deferred.is_empty();
        let Some((_, idx, didx)) = last else { return Ok(()) };
        {
            let mut st = self.st();
            st.released = Some((idx, didx));
            if ended {
                st.catchup_until = None;
            }
        }
        self.persist()?;
        if ended {
            self.catchup_done_at = None;
            self.store.drop_catchup()?;
        }
        let ring = &self.k.ring;
        if ring.consumer() != idx {
            ring.release(idx)?;
        }
        ring.release_data(didx);
        Ok(())
    }

    /// Yes at a prefix state: the stream past the last read from the live
    /// disk, no hand-over pending, no loss in the ring, not in bitmap mode.
    fn quiesce(&mut self) -> Result<Quiet, SourceError> {
        self.absorb_read()?;
        let bitmap = self.k.status().map_err(tracker_err)?.mode == FERRY_CBT_MODE_BITMAP;
        let ok = self.consistent_here() && !self.catchup_open && !self.loss_out && !bitmap && self.ring_loss().is_none();
        Ok(if ok { Quiet::Yes } else { Quiet::No })
    }

    fn knows_prefix_states(&self) -> bool {
        true
    }

    /// A TAG record queued in the module's ring now (the writers frozen by
    /// the sink meanwhile): an app-consistent point when the stream
    /// reaches it. `Ok(false)`: not now (a full ring, bitmap mode).
    fn place_cut_request(&mut self) -> Result<bool, SourceError> {
        let seq = self.k.tag(false).map_err(tracker_err)?;
        if let Some(seq) = seq {
            self.tag_out = Some(seq);
        }
        Ok(seq.is_some())
    }

    /// Not while a TAG placed earlier is not yet reached by the stream
    /// (its point, or its judgement, is still to come).
    fn request_cut(&mut self) -> Result<bool, SourceError> {
        Ok(self.tag_out.is_none())
    }

    fn places_cut_requests(&self) -> bool {
        true
    }

    /// Before a checksum resync: the pass supersedes every change queued
    /// so far, so drop them from the ring (the data index found by walking
    /// the records, as the two indices cannot be read together), and wait
    /// for their writes, and every request in the queue, to complete
    /// before the pass reads the disk. Any bitmap handed over is covered
    /// by the pass; until it ends, the state says a hand-over is open, so
    /// an agent that stops meanwhile leaves a resync.
    fn resync_begin(&mut self) -> Result<(), SourceError> {
        self.resync_overflows = Some(self.k.ring.overflows());
        self.complete_release()?;
        let ring = &self.k.ring;
        let (c, p) = (ring.consumer(), ring.producer());
        let mut d = ring.data_consumer();
        let (recs, next) = ring.read_from(c, p.wrapping_sub(c) as usize)?;
        for r in &recs {
            match r {
                Ok(r) if r.data => d = ring.skip_payload(d, r.length),
                Ok(_) => {}
                Err(e) => {
                    return Err(SourceError::Other(format!(
                        "kmod tracker: the ring holds an invalid record ({e}), so where its payloads end is unknown; \
                         detach and attach the disk again (`ferry unprotect`, then protect it anew)"
                    )))
                }
            }
        }
        {
            let mut st = self.st();
            st.released = Some((next, d));
            st.catchup_until = Some(u64::MAX);
            st.handover_open = true;
        }
        self.persist()?;
        let ring = &self.k.ring;
        ring.release(next)?;
        ring.release_data(d);
        self.k.catchup(self.size, true).map_err(tracker_err)?;
        self.cursor = next;
        self.dcur = d;
        self.handed.clear();
        self.deferred.clear();
        self.catchup_done_at = None;
        self.catchup_open = false;
        self.reread = false;
        self.tag_out = None;
        Ok(())
    }

    /// The resync is durable: no catch-up is left, and the stream is
    /// consistent once the changes queued from now are applied.
    fn resync_end(&mut self) -> Result<(), SourceError> {
        // Overflows from before the drain are covered by the resync; any
        // later one is a loss again.
        let overflows = self.resync_overflows.take().unwrap_or_else(|| self.k.ring.overflows());
        {
            let mut st = self.st();
            st.catchup_until = None;
            st.handover_open = false;
            st.catching_up = false;
            st.overflows_seen = overflows;
        }
        self.persist()?;
        self.store.drop_catchup()?;
        self.loss_out = false;
        self.consistent_from = self.k.status().map_err(tracker_err)?.seq;
        Ok(())
    }

    fn stats(&self) -> SourceStats {
        SourceStats { backlog_bytes: 0, ..self.stats }
    }

    fn detach(&mut self) -> Result<(), SourceError> {
        super::detach_disk(&self.disk).map(|_| ()).map_err(tracker_err)
    }
}
