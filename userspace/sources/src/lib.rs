//! Change sources: what every change tracker does, behind one trait, and
//! the one shipper loop over it.
//!
//! A [`ChangeSource`] reports what changed on a protected disk as a stream
//! of [`Change`]s in [`Batch`]es, each batch ending at a [`Position`] of
//! the source's own (a ring index, a module sequence number, a bitmap
//! round). The [`shipper::Shipper`] coalesces the extents, reads them
//! through a [`reader::BlockReader`], sends them to a [`shipper::Sink`],
//! and releases the source up to a position only once the sink made every
//! frame before it durable. A source that lost track of changes says so
//! with [`Change::Loss`]; the shipper then resyncs the whole disk by
//! checksum and cuts no point until that resync is durable.
//!
//! Each source keeps its own typed state (ring indices, bitmap handles,
//! the kernel module's attachment); the shipper keeps only positions and
//! sequence numbers. Sources written here or planned
//! (docs/architecture.md, "The agent"):
//!
//! | source | positions | catch-up | loss |
//! |--------|-----------|----------|------|
//! | test ring ([`ring::RingSource`]) | ring index | — | ring overflow, invalid record |
//! | eBPF tracker ([`bpf::BpfRingSource`]) | `STATE/ring` index | pinned bitmap, disk order | `lost`, recursion miss, device cross-check |
//! | kernel module ([`kmod::KmodSource`]) | batch number (ring indices kept inside) | module bitmap hand-over (`STATE/kmod.catchup`) | module overflow, invalid record, unclean stop |
//! | scan ([`scan::ScanSource`]) | pass number | (every round is a whole-disk checksum pass, sent through the sink's replica) | — |
//! | VDDK (CBT) | change id | `QueryChangedDiskAreas` | change id reset |
//! | QEMU dirty bitmap | bitmap generation | NBD `qemu:dirty-bitmap` | bitmap lost or disabled |

pub mod bpf;
pub mod kmod;
pub mod reader;
pub mod ring;
pub mod scan;
pub mod shipper;

/// Where a source stands in its own stream: increasing, opaque to the
/// shipper except for order.
pub type Position = u64;

/// Errors of a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Ring(#[from] ferry_ring::RingError),
    #[error("bpf tracker: {0}")]
    Bpf(#[from] ferry_bpf::BpfError),
    /// The tracker is gone (detached by someone else, unloaded): stop.
    #[error("{0}")]
    Detached(String),
    /// No consistent point can be cut (the scan: the disk kept changing
    /// through every pass allowed).
    #[error("{0}")]
    NoPoint(String),
    #[error("{0}")]
    Other(String),
}

/// A marker in the stream: something that happened at this place of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// A point asked for here (an application's tag, a consistency group's
    /// cut with its id); cut if the stream is consistent here. `app`: the
    /// request was placed with every writer frozen
    /// ([`ChangeSource::place_cut_request`]), so its point is
    /// app-consistent.
    CutRequest { group: Option<u64>, time_ns: u64, app: bool },
    /// From here the source ships from a bitmap: not a prefix state until
    /// [`Marker::CatchUpEnd`].
    CatchUpStart,
    /// The catch-up is shipped: consistent again from here.
    CatchUpEnd,
}

/// One change a source reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `[offset, offset + len)` changed: read it from the disk.
    Extent {
        offset: u64,
        len: u64,
    },
    /// `[offset, offset + len)` reads as zeroes now (write-zeroes, or a
    /// discard on a device that zeroes): ship without reading.
    Zero {
        offset: u64,
        len: u64,
    },
    /// The bytes written at `offset`, captured by the tracker (no read).
    Payload {
        offset: u64,
        data: Vec<u8>,
    },
    Marker(Marker),
    /// The source lost track of changes (why): only a full resync can
    /// bring the replica back.
    Loss(String),
}

/// What [`ChangeSource::next_batch`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub changes: Vec<Change>,
    /// The position after the last change of the batch (the one to release
    /// once the batch is durable).
    pub end: Position,
    /// When the oldest change of the batch completed (CLOCK_MONOTONIC ns),
    /// where the tracker times its records: for the replication lag.
    pub oldest_ns: Option<u64>,
}

/// Whether a cut may be taken now, as the source sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Nothing changed since the end of the last batch handed out, and
    /// nothing is held elsewhere (a bitmap, an in-flight table).
    Yes,
    /// Something changed or is still pending: no point now.
    No,
}

/// Counters a source keeps for `ferry status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Changes reported.
    pub changes: u64,
    /// Bytes of changes recorded and not yet released (the backlog).
    pub backlog_bytes: u64,
    /// Times the source fell back to a bitmap.
    pub catchups: u64,
    /// Losses reported.
    pub losses: u64,
}

/// What every change tracker does.
///
/// Order of calls: [`ChangeSource::resume`] once after attaching (the
/// constructor of each source attaches, or re-attaches to what outlived
/// the last agent), then any number of [`ChangeSource::next_batch`],
/// [`ChangeSource::release`], and, for a cut, [`ChangeSource::barrier`],
/// [`ChangeSource::in_flight`], [`ChangeSource::quiesce`] (inside
/// [`ChangeSource::freeze_begin`] / [`ChangeSource::freeze_end`] for an
/// app-consistent point), and finally
/// [`ChangeSource::detach`] (only when protection ends: an agent that
/// stops leaves a tracker that outlives it attached).
pub trait ChangeSource {
    /// Short name for logs and status ("ring", "bpf", "kmod", "scan").
    fn kind(&self) -> &'static str;

    /// Start after a restart: `durable` is the last position the shipper
    /// saw made durable. The source hands out again everything after it.
    fn resume(&mut self, durable: Position) -> Result<(), SourceError>;

    /// Up to about `max` changes after the last batch (may be empty).
    fn next_batch(&mut self, max: usize) -> Result<Batch, SourceError>;

    /// [`ChangeSource::next_batch`], with the replica at hand (the sink's,
    /// [`shipper::Sink::replica`]): a source that compares the disk with
    /// the replica itself (the scan) runs its passes here and sends what
    /// differs through `replica` as it finds it. The default ignores it.
    fn next_batch_with<E: From<SourceError> + From<reader::ReadError>>(
        &mut self,
        max: usize,
        replica: &mut dyn scan::Replica<Error = E>,
    ) -> Result<Batch, E> {
        let _ = replica;
        Ok(self.next_batch(max)?)
    }

    /// Everything up to `upto` is durable at the master target: the source
    /// may forget it. Never called with a position not yet handed out.
    fn release(&mut self, upto: Position) -> Result<(), SourceError>;

    /// Whether the block reader reads a frozen view of the disk as of the
    /// source's last `CutRequest` (a VMware snapshot, a QEMU point-in-time
    /// export): then extents before a cut request are read as they were at
    /// the marker, and the shipper cuts there. Live-disk sources (the
    /// default) get points at cut requests only when payloads alone came
    /// since the last point.
    fn reads_frozen_view(&self) -> bool {
        false
    }

    /// A barrier before a cut: flush what the tracker holds (in-flight
    /// writes, bitmap bits) into the stream, and say whether nothing
    /// changed since the last batch.
    fn quiesce(&mut self) -> Result<Quiet, SourceError>;

    /// A barrier before a cut, once everything handed out is durable:
    /// from here until [`ChangeSource::quiesce`], any change the disk
    /// completes must show there (the eBPF tracker records the device's
    /// completed-write counter now and compares it then).
    fn barrier(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// What the tracker holds outside its stream that belongs in a point
    /// cut now: writes issued whose completion it has not seen, as
    /// `[start, end)` ranges. The shipper reads and ships them as the disk
    /// holds them now, right before [`ChangeSource::quiesce`]. A write that
    /// is truly still in flight is not part of the point, so reading it
    /// early or late is harmless.
    fn in_flight(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        Ok(Vec::new())
    }

    /// The disk's writers are about to be frozen for an app-consistent
    /// point: hold new changes in memory from here (the source's own state
    /// may live on a filesystem being frozen); [`ChangeSource::next_batch`]
    /// hands them out as usual.
    fn freeze_begin(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Thawed. What was held and handed out is handed back to the durable
    /// stream unless `point` (a point now covers it); re-shipping is
    /// harmless.
    fn freeze_end(&mut self, point: bool) -> Result<(), SourceError> {
        let _ = point;
        Ok(())
    }

    /// A point is wanted (`--point-every` fell due): a source that can only
    /// cut at its own markers (a consistency group) asks its tracker for
    /// one and returns false; true means the shipper may cut at a quiet
    /// moment itself.
    fn request_cut(&mut self) -> Result<bool, SourceError> {
        Ok(true)
    }

    /// Whether the source places its own cut requests in its stream
    /// ([`ChangeSource::place_cut_request`]): then a frozen cut freezes the
    /// writers only around placing one (the kernel module's TAG), and the
    /// point is cut when the stream reaches it.
    fn places_cut_requests(&self) -> bool {
        false
    }

    /// With the writers frozen: queue a [`Marker::CutRequest`] (with `app`)
    /// in the stream now. `Ok(false)`: none could be placed now.
    fn place_cut_request(&mut self) -> Result<bool, SourceError> {
        Ok(false)
    }

    /// Whether the source itself tracks where its stream is a prefix state
    /// of the disk's changes (it knows what was read from the live disk,
    /// and payloads are the disk's states): it hands out a
    /// [`Marker::CutRequest`] only at one, and [`ChangeSource::quiesce`]
    /// answers for the stream as handed out, not for the disk being idle.
    /// The shipper then cuts at every cut request outside a catch-up, and
    /// tries a due cut after any batch, changes or not.
    fn knows_prefix_states(&self) -> bool {
        false
    }

    /// A full resync is about to read the whole disk (a loss): drop what
    /// the source holds (the resync covers it) and let writes queued so far
    /// complete first. The sink has not yet recorded the resync: a source
    /// that lets go of changes here records that itself.
    fn resync_begin(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// The resync is durable.
    fn resync_end(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    fn stats(&self) -> SourceStats;

    /// Stop tracking for good (`ferry unprotect`).
    fn detach(&mut self) -> Result<(), SourceError>;
}
