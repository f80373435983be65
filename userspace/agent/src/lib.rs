//! ferry agent: protects one disk by shipping it to a master target.
//!
//! What it does, in order, each time it (re)connects:
//!
//! 1. Reconciles with the master target: if the target is behind what it
//!    once acknowledged, or holds a replica from another protection, a
//!    checksum resync is required (only differing chunks move).
//! 2. Initial sync, resumable: the disk is read through the block reader
//!    (1 MiB pieces, 32 in flight, `O_DIRECT` where possible), whose threads
//!    split each piece into 64 KiB units (zero detection, BLAKE3 for dedup,
//!    zstd level 1 when it pays); they are sent in disk order;
//!    `sync_cursor` in the state file advances as the master target
//!    acknowledges, so a restart continues from it.
//! 3. Checksum resync when required ([`scan_pass`](Agent::scan_pass), over
//!    `ferry_sources::scan::pass` and the same reader): both sides hash
//!    fixed chunks with xxh3-128; only differing chunks move.
//! 4. Then the tracker's loop: `scan` re-checks by checksum and cuts a point;
//!    `ring` ships the extents a tracker queues in `STATE/ring`, coalesced,
//!    releasing ring slots only after the master target made them durable.
//!
//! Recovery points are labelled by what the agent can show (docs/consistency.md):
//! `app` when taken under `--freeze-cmd`; `crash` when a final pass found the
//! replica equal to the source with no change in between (the ring stayed
//! quiet, or the scan's verify pass found no difference).

pub mod chunkmap;
pub mod freeze;
/// The kernel module tracker's user-space side (now in ferry-sources).
pub use ferry_sources::kmod;
pub mod live;
pub mod owner;
pub mod session;
pub mod state;
pub mod status;

pub use status::{liveness, status, Health, Liveness, RingStatus};

use chunkmap::ChunkMap;
use ferry_common::buf::AlignedBuf;
use ferry_common::durable::{hex, unhex};
use ferry_common::source::Source;
use ferry_proto::{ErrorCode, PointKind};
use ferry_ring::{Record, Ring};
use ferry_sources::bpf::{BpfCounters, BpfRingSource, BpfSource};
use ferry_sources::kmod::{KmodAttach, KmodSource, KmodState, KmodStore};
use ferry_sources::reader::{BlockReader, LocalReader, ReadError};
use ferry_sources::ring::RingSource;
use ferry_sources::scan::{self, ScanSource};
use ferry_sources::shipper::{CutPlan, NoPoint, Shipper, Sink};
use ferry_sources::{ChangeSource, Position, SourceError};
use owner::{Claim, Owner};
use session::{prepare, Session, Unit};
use state::{AgentState, LastPoint, Mode, StateDir, TrackerKind};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Unit of dedup and framing in the initial sync.
const UNIT: usize = 64 << 10;
/// How long a cut through a process server waits for its point before the
/// stream goes on without it (it is recorded when it comes).
const RELAY_POINT_WAIT: Duration = Duration::from_secs(1);
/// Tags whose late points are still looked for, at most.
const LATE_TAGS_KEPT: usize = 4096;
/// How far a session to another next hop numbers above everything any
/// session reserved (each reserves this many above where it starts, saved
/// before it sends): more frames than can ever be in flight unacknowledged.
pub const SEQ_GAP: u64 = 1 << 24;
/// First-level checksum chunk of a scan pass (16 bytes of checksum per 64 KiB:
/// 0.025% of the disk).
pub const COARSE_CHUNK: u32 = scan::COARSE;
/// Second-level chunk, for the coarse chunks that differ: what moves is a
/// multiple of this.
pub const FINE_CHUNK: u32 = scan::FINE;
/// Default ring size (records) when the agent creates `STATE/ring`.
pub const DEFAULT_RING: u64 = 1 << 16;
/// `--once` gives up when freezing has failed for this long.
const FREEZE_GIVE_UP: Duration = Duration::from_secs(60);
/// How often an agent whose disk is failed over asks the master target again.
const FAILOVER_RETRY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("cannot reach the master target at {0}")]
    Connect(String),
    #[error("connection to the master target lost: {0}")]
    Lost(String),
    #[error("master target refused: {msg}")]
    Refused { code: ErrorCode, msg: String },
    #[error("{0}")]
    State(#[from] ferry_common::durable::StateError),
    #[error("{0}")]
    Ring(#[from] ferry_ring::RingError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NoConsistentPoint(String),
    /// The scan gave up on this round (the disk kept changing through its
    /// verify passes): no point now; a continuous run under a freeze
    /// command tries again at the next round. A failed freeze or thaw
    /// command is [`AgentError::NoConsistentPoint`] and stops the agent.
    #[error("{0}")]
    RoundGaveUp(String),
    #[error("bpf tracker: {0}")]
    Bpf(#[from] ferry_bpf::BpfError),
    #[error("{0}")]
    Tracker(String),
    #[error("stopped by {0}")]
    Stopped(String),
    #[error("{0}")]
    SourceChanged(String),
}

impl From<kmod::KmodError> for AgentError {
    fn from(e: kmod::KmodError) -> AgentError {
        match e {
            kmod::KmodError::Io { what, source } => AgentError::Io { what, source },
            kmod::KmodError::Tracker(m) => AgentError::Tracker(m),
            kmod::KmodError::Usage(m) => AgentError::Usage(m),
            kmod::KmodError::Ring(r) => AgentError::Ring(r),
        }
    }
}

impl From<SourceError> for AgentError {
    fn from(e: SourceError) -> AgentError {
        match e {
            SourceError::Io { what, source } => AgentError::Io { what, source },
            SourceError::Ring(r) => AgentError::Ring(r),
            SourceError::Bpf(b) => AgentError::Bpf(b),
            SourceError::Detached(m) => AgentError::NoConsistentPoint(m),
            SourceError::NoPoint(m) => AgentError::RoundGaveUp(m),
            SourceError::Other(m) => AgentError::Tracker(m),
        }
    }
}

impl From<ReadError> for AgentError {
    fn from(e: ReadError) -> AgentError {
        match e {
            ReadError::Read { offset, source } => AgentError::Io { what: format!("reading the disk at {offset}"), source },
            ReadError::Stopped => AgentError::Lost("the disk readers stopped early".into()),
        }
    }
}

impl AgentError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }

    /// Whether reconnecting may help.
    /// `Busy` is retried too: right after an agent dies, the master target
    /// may not yet have noticed its connection closing and still hold the
    /// disk; a second live agent for the same disk keeps being refused (and
    /// says so in its log) until `--connect-timeout` with `--once`.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            AgentError::Connect(_)
                | AgentError::Lost(_)
                | AgentError::Refused { code: ErrorCode::RefMiss | ErrorCode::Internal | ErrorCode::Busy, .. }
        )
    }
}

/// Which change tracker feeds the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracker {
    Auto,
    Kmod,
    Bpf,
    Scan,
    /// An external producer fills `STATE/ring` (tests, integrations).
    Ring,
}

impl Tracker {
    /// The kind a state file records. `Auto` is resolved before a state is
    /// written; it records as `scan`, the tracker it falls back to.
    pub fn kind(self) -> TrackerKind {
        match self {
            Tracker::Kmod => TrackerKind::Kmod,
            Tracker::Bpf => TrackerKind::Bpf,
            Tracker::Ring => TrackerKind::Ring,
            Tracker::Auto | Tracker::Scan => TrackerKind::Scan,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tracker::Auto => "auto",
            Tracker::Kmod => "kmod",
            Tracker::Bpf => "bpf",
            Tracker::Scan => "scan",
            Tracker::Ring => "ring",
        }
    }
}

/// Everything `ferry agent` accepts.
#[derive(Clone, Debug)]
pub struct Options {
    pub disk: PathBuf,
    pub name: String,
    pub target: String,
    pub tracker: Tracker,
    pub state: PathBuf,
    pub once: bool,
    pub point_every: Duration,
    /// What the configuration server's policy changes while the agent runs
    /// (its point interval overrides `point_every`).
    pub live: Arc<ferry_common::control::Live>,
    pub freeze_cmd: Option<String>,
    pub thaw_cmd: Option<String>,
    pub ring_capacity: u64,
    /// Give up after this long without reaching the master target (`--once`).
    pub connect_timeout: Duration,
    /// Longest a freeze may last; a cut that would take longer is abandoned.
    pub freeze_cap: Duration,
    /// Size of the BPF tracker's ring buffer in bytes.
    pub bpf_ring_bytes: u32,
    /// Bytes of the kernel module's data area (write payloads; 0: metadata
    /// mode only).
    pub kmod_data_bytes: u64,
    pub progress: bool,
    /// `--verify`: once a point is cut (as with `--once`), compare the whole
    /// source with the replica by checksum, shipping nothing; `--repair`
    /// (the bool) then sends exactly the ranges that differ.
    pub verify: Option<bool>,
}

/// What `--once` prints.
#[derive(serde::Serialize, Debug, Clone)]
pub struct Summary {
    pub name: String,
    pub tracker: String,
    pub point_id: u64,
    pub point_kind: String,
    pub seq: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub seconds: f64,
    pub initial_sync: bool,
    pub resync: bool,
    /// `--verify`: the ranges `[start, end)` where the replica differed from
    /// the source at the point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_differing: Option<Vec<(u64, u64)>>,
    /// `--verify --repair`: bytes re-sent, and the point cut after them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired_bytes: Option<u64>,
}

/// Modification stamp of a regular-file source (None for devices).
fn stamp(src: &Source) -> Option<(i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = src.file().metadata().ok()?;
    m.file_type().is_file().then(|| (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// CLOCK_MONOTONIC in ns, the clock tracker records carry.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn random_generation() -> [u8; 16] {
    let mut g = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut g);
    }
    let t = ferry_common::now_ns().to_le_bytes();
    for (i, b) in t.iter().enumerate() {
        g[i] ^= b;
    }
    g
}

fn run_hook(what: &str, cmd: &str) -> Result<(), AgentError> {
    let st = std::process::Command::new("sh").arg("-c").arg(cmd).status().map_err(AgentError::io(format!("{what} command")))?;
    if !st.success() {
        return Err(AgentError::NoConsistentPoint(format!("{what} command `{cmd}` failed ({st})")));
    }
    Ok(())
}

/// Writes a source's own part of the agent's state into it.
type StateOverlay = Box<dyn Fn(&mut AgentState)>;

/// A running agent for one disk.
pub struct Agent {
    opts: Options,
    sd: StateDir,
    st: AgentState,
    src: Arc<Source>,
    /// Reads tracker-reported extents, many in flight (ferry-sources).
    reader: LocalReader,
    generation: [u8; 16],
    tracker: Tracker,
    ring: Option<Ring>,
    bytes_read: u64,
    bytes_sent_prev: u64,
    bytes_received_prev: u64,
    last_save: Instant,
    did_initial: bool,
    did_resync: bool,
    /// A trusted chunk map for the next scan pass (see chunkmap.rs).
    map: Option<ChunkMap>,
    /// The pinned BPF tracker feeding `STATE/ring`, with its own state
    /// (bpf tracker only; ferry-sources).
    bpf: Option<BpfSource>,
    /// The bpf tracker's counters, also while the source is inside the
    /// shipper (saved in `agent.state`).
    bpf_counters: Option<Arc<Mutex<BpfCounters>>>,
    /// The kernel module tracker, a change source with its own state
    /// (kmod tracker only; ferry-sources).
    kmod: Option<KmodSource>,
    /// Copies the source's own part of `agent.state` (kept by the source)
    /// into the state before each save.
    source_overlay: Option<StateOverlay>,
    /// (last seq of a shipped batch, completion time of its oldest write).
    lag_pending: VecDeque<(u64, u64)>,
    /// When the backlog was last measured (for `ferry status`).
    last_backlog: Instant,
    /// Coarse sums of the last complete pass: the replica's content if no
    /// frame follows before the next point.
    pass_sums: Option<Vec<[u8; 16]>>,
    /// Between freeze and thaw: no writes to the state folder.
    frozen: bool,
    /// `acked_seq` as last saved: ring slots up to it may be released.
    saved_acked: u64,
    deferred_map: Option<ChunkMap>,
    /// Tags sent through a process server whose point has not come yet:
    /// (seq, time, kind).
    late_tags: Vec<(u64, u64, PointKind)>,
    /// The state folder's lock, held for the agent's life (live.rs).
    _lock: live::Lock,
    /// Initial sync: (last seq of a 64 KiB unit, end offset of the unit),
    /// for units sent and not yet known durable. Kept across reconnects: the
    /// master target's durable sequence at the next OPEN says which of them
    /// arrived, so a connection cut before its acknowledgement came still
    /// moves the cursor.
    sync_progress: VecDeque<(u64, u64)>,
    /// The state's byte counters when this agent started (this run's
    /// sessions add theirs).
    sent_base: u64,
    read_base: u64,
    last_size_check: Instant,
    /// The disk reads zeroes after a discard (discards ship unread).
    discard_zeroes: bool,
    /// During a `--verify` pass: the differing fine ranges, instead of
    /// shipping them.
    verify_found: Option<Vec<(u64, u64)>>,
    /// Back-off and log-once for freezes that fail.
    freeze_retry: freeze::Retry,
}

impl Agent {
    /// Open the disk and the state folder, and pick the tracker.
    pub fn new(opts: Options) -> Result<Agent, AgentError> {
        if !ferry_proto::valid_name(&opts.name) {
            return Err(AgentError::Usage(format!("--name {:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'", opts.name)));
        }
        let src = Source::open(&opts.disk)
            .map_err(|e| AgentError::io(format!("cannot open disk {}", opts.disk.display()))(ferry_common::root_hint(e)))?;
        let size = src.size();
        if size == 0 || size % ferry_proto::SECTOR != 0 {
            return Err(AgentError::Usage(format!(
                "disk {} is {size} bytes: ferry protects disks whose size is a positive multiple of 512",
                opts.disk.display()
            )));
        }
        std::fs::create_dir_all(&opts.state).map_err(AgentError::io(format!("state folder {}", opts.state.display())))?;
        // Before anything is attached: a second agent on this folder stops here.
        let lock = live::lock(&opts.state)?;
        let sd = StateDir::new(&opts.state);
        let mut tracker = match opts.tracker {
            Tracker::Auto if !src.is_block_device() => {
                log::info!("tracker auto: picked scan: {} is an image file, which only checksums can track", opts.disk.display());
                Tracker::Scan
            }
            Tracker::Auto if !ferry_bpf::kernel_has_btf() => {
                log::info!("tracker auto: picked scan: this kernel has no BTF (/sys/kernel/btf/vmlinux), which the bpf tracker needs");
                Tracker::Scan
            }
            Tracker::Auto => {
                log::info!("tracker auto: picked bpf: {} is a block device and the kernel has BTF", opts.disk.display());
                Tracker::Bpf
            }
            t => t,
        };
        let st = match sd.load()? {
            Some(st) => {
                if st.name != opts.name {
                    return Err(AgentError::Usage(format!(
                        "state folder {} protects disk {:?}, not {:?}: use another --state",
                        opts.state.display(),
                        st.name,
                        opts.name
                    )));
                }
                if st.size != size {
                    return Err(AgentError::Usage(format!(
                        "disk {} changed size from {} to {size} bytes: protect it under a new --name and --state",
                        opts.disk.display(),
                        st.size
                    )));
                }
                if st.running {
                    log::warn!("the previous agent for {} did not stop cleanly; resuming from its last acknowledged state", st.name);
                }
                st
            }
            None => AgentState {
                name: opts.name.clone(),
                disk: opts.disk.display().to_string(),
                size,
                generation: hex(&random_generation()),
                tracker: tracker.kind(),
                target: opts.target.clone(),
                sync_cursor: Some(0),
                resync_required: None,
                acked_seq: 0,
                seq_high: 0,
                hop: None,
                ring_overflows_seen: 0,
                ring_id: None,
                bpf_lost_seen: 0,
                bpf_recursion_seen: 0,
                bpf_baseline: None,
                bpf_drops: 0,
                bpf_recovered: 0,
                bpf_unguarded: 0,
                kmod_next_seq: 0,
                kmod_mode: None,
                kmod_catchups: 0,
                kmod_catchup_until: None,
                kmod_handover_open: false,
                kmod_attach_id: None,
                kmod_released: None,
                cut_problem: None,
                failover: None,
                freeze_ms_recent: Vec::new(),
                lag_ms_recent: Vec::new(),
                last_point: None,
                connected: false,
                disconnected_since_ns: None,
                last_error: None,
                point_every_s: 0.0,
                last_ack_ns: 0,
                mode: Mode::InitialSync,
                running: false,
                source_stamp: None,
                bytes_sent_total: 0,
                bytes_read_total: 0,
                backlog_bytes: 0,
                backlog_lag_s: 0.0,
                backlog_oldest_ns: None,
                backlog_in_bitmap: 0,
                churn_bytes_total: 0,
                points_cut_total: 0,
                last_app_point: None,
            },
        };
        let generation = unhex::<16>(&st.generation)
            .ok_or_else(|| AgentError::Usage(format!("{}: bad generation; move it aside", sd.state_file().display())))?;
        let me = Owner::new(&opts.state, generation)?;
        // The owner record to keep beside the bpf pins (ours as recorded).
        let bpf_owner = if tracker == Tracker::Bpf { claim_bpf(&opts.name, &opts.state, &me)?.pack()? } else { Vec::new() };
        let mut st = st;
        let ring = if tracker == Tracker::Ring || tracker == Tracker::Bpf {
            // A protection that did not always have this ring cannot know
            // what changed while it was missing (or before it existed).
            let protected_before = st.sync_cursor != Some(0) || st.acked_seq > 0;
            let same_tracker = st.tracker == tracker.kind();
            let a = ferry_sources::ring::attach(&sd.ring_file(), opts.ring_capacity, st.ring_id, same_tracker, protected_before)?;
            if a.resync.is_some() {
                st.resync_required = a.resync;
            }
            if st.ring_id != Some(a.id) {
                st.ring_overflows_seen = a.ring.overflows();
                st.ring_id = Some(a.id);
            }
            Some(a.ring)
        } else {
            None
        };
        let bpf = if tracker == Tracker::Bpf {
            let protected_before = st.sync_cursor != Some(0) || st.acked_seq > 0;
            let counters = BpfCounters {
                lost_seen: st.bpf_lost_seen,
                recursion_seen: st.bpf_recursion_seen,
                baseline: st.bpf_baseline,
                drops: st.bpf_drops,
                recovered: st.bpf_recovered,
                unguarded: st.bpf_unguarded,
            };
            let ring_file = sd.ring_file();
            match BpfSource::attach(&opts.name, &opts.disk, size, opts.bpf_ring_bytes, &ring_file, &bpf_owner, counters, protected_before) {
                Ok((b, resync)) => {
                    if resync.is_some() {
                        st.resync_required = resync;
                    }
                    let c = b.counters;
                    (st.bpf_lost_seen, st.bpf_recursion_seen, st.bpf_baseline) = (c.lost_seen, c.recursion_seen, c.baseline);
                    Some(b)
                }
                Err(e) if opts.tracker == Tracker::Auto => {
                    log::warn!("tracker auto: the bpf tracker cannot run here ({e}); using scan");
                    let _ = ferry_bpf::unpin(&opts.name);
                    tracker = Tracker::Scan;
                    None
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let (kmod, source_overlay) = if tracker == Tracker::Kmod {
            let attach = KmodAttach {
                disk: &opts.disk,
                size,
                capacity: opts.ring_capacity,
                data_bytes: opts.kmod_data_bytes,
                protected_before: st.sync_cursor != Some(0) || st.acked_seq > 0,
                same_tracker: st.tracker == tracker.kind(),
            };
            let store = Box::new(KmodStateStore { sd: StateDir::new(&opts.state) });
            let (k, resync) = KmodSource::attach(attach, kmod_state_of(&st), store, |id| claim_kmod(&opts, &me, id))?;
            if resync.is_some() {
                st.resync_required = resync;
            }
            let shared = k.shared_state();
            let overlay: StateOverlay = Box::new(move |st: &mut AgentState| {
                let k = shared.lock().unwrap_or_else(|p| p.into_inner());
                apply_kmod_state(&k, st);
                if k.catching_up && st.mode == Mode::Streaming {
                    st.mode = Mode::CatchUp;
                } else if !k.catching_up && st.mode == Mode::CatchUp {
                    st.mode = Mode::Streaming;
                }
            });
            overlay(&mut st);
            (Some(k), Some(overlay))
        } else {
            (None, None)
        };
        st.tracker = tracker.kind();
        st.target = opts.target.clone();
        st.point_every_s = opts.point_every.as_secs_f64();
        st.connected = false;
        let (sent_base, read_base) = (st.bytes_sent_total, st.bytes_read_total);
        let src = Arc::new(src);
        let bpf_counters = bpf.as_ref().map(|b| b.shared_counters());
        Ok(Agent {
            _lock: lock,
            sync_progress: VecDeque::new(),
            sent_base,
            read_base,
            last_size_check: Instant::now(),
            discard_zeroes: tracker == Tracker::Bpf && discard_reads_zeroes(&opts.disk),
            verify_found: None,
            opts,
            sd,
            st,
            reader: LocalReader::new(Arc::clone(&src)),
            src,
            generation,
            tracker,
            ring,
            bytes_read: 0,
            bytes_sent_prev: 0,
            bytes_received_prev: 0,
            last_save: Instant::now(),
            did_initial: false,
            did_resync: false,
            map: None,
            bpf,
            kmod,
            source_overlay,
            lag_pending: VecDeque::new(),
            last_backlog: Instant::now(),
            pass_sums: None,
            frozen: false,
            saved_acked: 0,
            deferred_map: None,
            late_tags: Vec::new(),
            freeze_retry: freeze::Retry::default(),
            bpf_counters,
        })
    }

    /// What stays attached when this agent stops (on purpose: the tracker
    /// goes on tracking, so the next run reads only what changed), and how
    /// to detach it; None for trackers that keep nothing attached.
    pub fn left_attached(&self) -> Option<String> {
        let st = self.opts.state.display();
        if self.bpf.is_some() {
            Some(format!(
                "the bpf tracker stays attached to {} (pinned in {}): `ferry unprotect --state {st}` detaches it",
                self.opts.disk.display(),
                ferry_bpf::pin_dir(&self.opts.name).display()
            ))
        } else if self.kmod.is_some() {
            Some(format!(
                "the kernel module tracker stays attached to {}: `ferry unprotect --state {st}` detaches it",
                self.opts.disk.display()
            ))
        } else {
            None
        }
    }

    /// The tracker in use (after `auto` was resolved).
    pub fn tracker(&self) -> Tracker {
        self.tracker
    }

    fn save(&mut self) -> Result<(), AgentError> {
        if self.frozen {
            return Ok(()); // caught up by thaw()
        }
        if let Some(f) = &self.source_overlay {
            f(&mut self.st);
        }
        if let Some(c) = self.bpf_counters.as_ref().and_then(|c| c.lock().ok().map(|g| *g)) {
            (self.st.bpf_lost_seen, self.st.bpf_recursion_seen, self.st.bpf_baseline) = (c.lost_seen, c.recursion_seen, c.baseline);
            (self.st.bpf_drops, self.st.bpf_recovered, self.st.bpf_unguarded) = (c.drops, c.recovered, c.unguarded);
        }
        self.sd.save(&self.st)?;
        self.last_save = Instant::now();
        self.saved_acked = self.st.acked_seq;
        Ok(())
    }

    fn note_ack(&mut self, sess: &Session) {
        if sess.relayed && !self.late_tags.is_empty() {
            for (seq, id) in sess.take_points() {
                if let Some(i) = self.late_tags.iter().position(|&(s, _, _)| s == seq) {
                    let (_, t, kind) = self.late_tags.remove(i);
                    log::info!("recovery point {id} ({}) at seq {seq} (reached the master target)", kind.as_str());
                    self.note_point(LastPoint { id, seq, time_ns: t, kind: kind.as_str().into() }, true);
                }
            }
        }
        self.st.acked_seq = self.st.acked_seq.max(sess.acked());
        self.st.seq_high = self.st.seq_high.max(self.st.acked_seq);
        let t = sess.last_ack_ns();
        if t > 0 {
            self.st.last_ack_ns = t;
        }
        // Counters move while streaming, not only when a session ends.
        self.st.bytes_sent_total = self.sent_base + self.bytes_sent_prev + sess.bytes_sent;
        self.st.bytes_read_total = self.read_base + self.bytes_read;
    }

    /// A point the master target confirmed: the newest one (and the newest
    /// app-consistent one) and the count, for `ferry status` and /metrics.
    /// A point that comes late (through a process server) is the newest
    /// only if no later one came first; one just cut always is.
    fn note_point(&mut self, p: LastPoint, late: bool) {
        self.st.points_cut_total += 1;
        let newer = |l: &Option<LastPoint>| !late || l.as_ref().is_none_or(|l| l.seq < p.seq);
        if p.kind == PointKind::App.as_str() && newer(&self.st.last_app_point) {
            self.st.last_app_point = Some(p.clone());
        }
        if newer(&self.st.last_point) {
            self.st.last_point = Some(p);
        }
    }

    /// Between steps of every loop: a stop asked for by a signal, a source
    /// that changed size, a connection that died while idle.
    fn checkpoint(&mut self, sess: &Session) -> Result<(), AgentError> {
        live::check_stop()?;
        sess.check_alive()?;
        if self.last_size_check.elapsed() >= Duration::from_secs(1) {
            self.last_size_check = Instant::now();
            if let Ok(now) = self.src.current_size() {
                if now != self.st.size {
                    return Err(AgentError::SourceChanged(format!(
                        "disk {} changed size from {} to {now} bytes while protected; the replica keeps the old size and its \
                         points stay recoverable: protect the disk again under a new --name and --state",
                        self.opts.disk.display(),
                        self.st.size
                    )));
                }
            }
        }
        Ok(())
    }

    /// Sleep `d` in short steps, stopping early for [`Agent::checkpoint`].
    fn pause(&mut self, sess: &Session, d: Duration) -> Result<(), AgentError> {
        let until = Instant::now() + d;
        loop {
            self.checkpoint(sess)?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(100)));
            self.note_ack(sess);
            self.save_if_due()?;
        }
    }

    fn save_if_due(&mut self) -> Result<(), AgentError> {
        if self.last_save.elapsed() >= Duration::from_millis(500) {
            self.save()?;
        }
        Ok(())
    }

    /// Run until `--once` is satisfied (or forever without it), or until a
    /// signal asks it to stop. Why it ended is recorded for `ferry status`.
    pub fn run(mut self) -> Result<Summary, AgentError> {
        let start = Instant::now();
        live::install_stop_handler(&self.opts.state);
        self.st.running = true;
        self.save()?;
        let mut unreachable_since: Option<Instant> = None;
        let mut backoff = ferry_link::Backoff::default();
        let result = loop {
            if let Err(e) = live::check_stop() {
                break Err(e);
            }
            let sess = self.connect_first();
            let r = sess.and_then(|(mut s, hop)| {
                unreachable_since = None;
                backoff.reset();
                self.failover_over();
                if !self.st.connected || self.st.hop.as_deref() != Some(hop.as_str()) {
                    log::info!("connected to {hop} (protocol v{})", s.version);
                }
                self.st.hop = Some(hop);
                // Reserve what this session may number, before it sends
                // anything (work() saves the state first): frames a hop
                // applied or spooled without the ACK reaching us are still
                // below the next hop's numbers.
                self.st.seq_high = self.st.seq_high.max(s.next_seq.saturating_sub(1) + SEQ_GAP);
                self.st.connected = true;
                self.st.disconnected_since_ns = None;
                self.st.last_error = None;
                let r = self.work(&mut s, start);
                let r = match (r, self.opts.verify) {
                    (Ok(sum), Some(repair)) => self.verify_against_replica(&mut s, start, sum, repair),
                    (r, _) => r,
                };
                self.note_ack(&s);
                self.bytes_sent_prev += s.bytes_sent;
                self.bytes_received_prev += s.bytes_received();
                s.close();
                r
            });
            match r {
                Ok(summary) => break Ok(summary),
                Err(AgentError::Refused { code: ErrorCode::FailedOver, msg }) if !self.opts.once => self.failover_wait(msg),
                Err(AgentError::Refused { code: code @ (ErrorCode::FailedOver | ErrorCode::Refused), msg }) => {
                    self.failover_stopped(&msg);
                    break Err(AgentError::Refused { code, msg });
                }
                Err(e) if e.retryable() => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if self.st.connected || self.st.disconnected_since_ns.is_none() {
                        self.st.disconnected_since_ns = Some(ferry_common::now_ns());
                    }
                    self.st.connected = false;
                    self.st.last_error = Some(e.to_string());
                    if self.opts.once && since.elapsed() > self.opts.connect_timeout {
                        break Err(e);
                    }
                    let delay = backoff.next_delay();
                    log::warn!("{e}; retrying in {:.1}s", delay.as_secs_f64());
                    let _ = self.save();
                    live::sleep_unless_stopped(delay);
                }
                Err(e) => break Err(e),
            }
        };
        self.st.running = false;
        self.st.connected = false;
        self.st.mode = match &result {
            Ok(_) | Err(AgentError::Stopped(_)) => Mode::Stopped,
            Err(_) if self.st.failover.is_some() => Mode::FailedOver,
            Err(_) => Mode::Failed,
        };
        self.st.bytes_read_total = self.read_base + self.bytes_read;
        let _ = self.save();
        match &result {
            Ok(s) => live::record_stop(&self.opts.state, &format!("--once finished: recovery point {}", s.point_id), false),
            Err(AgentError::Stopped(sig)) => {
                log::info!("{sig} received: stopped (tracking goes on where the tracker outlives the agent)");
                live::record_stop(&self.opts.state, &format!("stopped by {sig}"), false)
            }
            Err(e) => live::record_stop(&self.opts.state, &e.to_string(), true),
        }
        result
    }

    /// Open a session with the first next hop of `--target` that answers.
    /// To the same hop as last time, numbering continues above what it
    /// acknowledged; to another one it jumps [`SEQ_GAP`] above everything
    /// any hop acknowledged, so the two streams cannot interleave at a
    /// master target (a former process server may still forward what it
    /// spooled: the master target then drops it as already covered).
    fn connect_first(&mut self) -> Result<(Session, String), AgentError> {
        let targets: Vec<String> = self.opts.target.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
        let mut last = AgentError::Connect("no --target given".into());
        for (i, t) in targets.iter().enumerate() {
            // No hop recorded: a new protection, or a state file from before
            // --target took a list (one hop, then).
            let next = if self.st.hop.as_deref().is_none_or(|h| h == t.as_str()) {
                self.st.acked_seq + 1
            } else {
                self.st.seq_high.max(self.st.acked_seq) + 1 + SEQ_GAP
            };
            match Session::connect(t, &self.opts.name, self.st.size, self.generation, next) {
                Ok(s) => return Ok((s, t.clone())),
                Err(e) if e.retryable() && i + 1 < targets.len() => {
                    log::warn!("{e}; trying {}", targets[i + 1]);
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The master target refuses the stream because the disk is failed over
    /// (not committed): keep the tracker (it goes on tracking), say so once
    /// per refusal reason, record it, and try again in a few seconds, so
    /// that a `ferry failover --cancel` resumes shipping with no restart.
    fn failover_wait(&mut self, msg: String) {
        if self.st.failover.as_deref() != Some(msg.as_str()) {
            log::warn!(
                "disk failed over on the master target: waiting for `ferry failover --cancel` (retrying every {}s; \
                 tracking goes on): {msg}",
                FAILOVER_RETRY.as_secs()
            );
        }
        self.st.failover = Some(msg);
        self.st.mode = Mode::FailedOver;
        self.st.connected = false;
        let _ = self.save();
        live::sleep_unless_stopped(FAILOVER_RETRY);
    }

    /// A failover refusal the agent does not wait for (committed, ERROR 11,
    /// final; or any with `--once`): recorded for `ferry status`; the agent
    /// stops with the master target's message.
    fn failover_stopped(&mut self, msg: &str) {
        self.st.failover = Some(msg.into());
        self.st.mode = Mode::FailedOver;
    }

    /// Connected again after a failover refused the stream: it was cancelled.
    fn failover_over(&mut self) {
        if self.st.failover.take().is_some() {
            log::info!("the master target accepts the stream again (the failover was cancelled): resuming");
        }
    }

    fn work(&mut self, sess: &mut Session, start: Instant) -> Result<Summary, AgentError> {
        let exists = sess.open_flags & ferry_proto::OPEN_EXISTS != 0;
        let same_gen = sess.open_flags & ferry_proto::OPEN_SAME_GENERATION != 0;
        if !exists && self.st.sync_cursor.is_none() {
            log::warn!("the master target has no replica of {}: starting a full initial sync", self.st.name);
            self.st.sync_cursor = Some(0);
            self.st.resync_required = None;
        } else if exists && !same_gen {
            // A replica from another protection (lost agent state, or a new
            // agent for a known disk): only what differs needs to move.
            self.st.sync_cursor = None;
            self.st.resync_required = Some("the master target holds a replica from an earlier protection".into());
        } else if sess.durable_at_open < self.st.acked_seq {
            self.st.resync_required = Some(format!(
                "the master target is durable only to seq {} but had acknowledged {}",
                sess.durable_at_open, self.st.acked_seq
            ));
        }
        // From here on the master target's durable sequence is the truth:
        // chunks of an initial sync that reached it before the last
        // connection broke count, acknowledged or not; frames above it were
        // lost and their sequence numbers are used again.
        if exists && same_gen && self.st.sync_cursor.is_some() {
            let before = self.st.sync_cursor;
            self.advance_sync_cursor(sess.durable_at_open);
            if self.st.sync_cursor != before {
                log::info!("initial sync: the master target holds more than it acknowledged; resuming at {:?}", self.st.sync_cursor);
            }
        }
        self.sync_progress.clear();
        self.st.acked_seq = sess.durable_at_open;
        self.pass_sums = None;
        self.map = ChunkMap::load(&self.sd.chunk_map_file()).filter(|m| {
            same_gen
                && self.st.resync_required.is_none()
                && m.seq == sess.durable_at_open
                && m.generation == self.generation
                && m.size == self.st.size
                && m.chunk == COARSE_CHUNK
        });
        if let Some(r) = &self.st.resync_required {
            log::warn!("resync required: {r}");
        }
        self.save()?;

        let mut verified_by_stamp = false;
        if let Some(from) = self.st.sync_cursor {
            self.st.mode = Mode::InitialSync;
            if from == 0 {
                self.st.source_stamp = stamp(&self.src);
                self.save()?;
            }
            self.full_pass(sess, from)?;
            self.st.sync_cursor = None;
            self.did_initial = true;
            // An image file untouched since the sync began needs no verify pass.
            verified_by_stamp = self.st.source_stamp.is_some() && self.st.source_stamp == stamp(&self.src);
            self.save()?;
        }
        if self.st.resync_required.is_some() {
            self.resync(sess)?;
        }
        match self.tracker {
            // The ring, the bpf tracker and the kernel module run on the
            // shipper loop (ferry-sources), freezes included.
            Tracker::Ring | Tracker::Bpf => self.stream_shipper(sess, start),
            Tracker::Kmod => {
                let k = self.kmod.take().expect("kmod tracker is attached");
                self.stream_on(sess, start, k)
            }
            Tracker::Scan | Tracker::Auto => self.scan_stream(sess, start, verified_by_stamp),
        }
    }

    fn resync(&mut self, sess: &mut Session) -> Result<u64, AgentError> {
        self.st.mode = Mode::Resync;
        self.save()?;
        // A source held here (not streaming; the shipper calls these
        // itself) lets go of what the pass covers.
        if let Some(k) = self.kmod.as_mut() {
            k.resync_begin()?;
        }
        let n = self.scan_pass(sess, "resync")?;
        self.st.resync_required = None;
        if let Some(k) = self.kmod.as_mut() {
            k.resync_end()?;
        }
        self.did_resync = true;
        self.note_ack(sess);
        self.save()?;
        Ok(n)
    }

    fn summary(&self, sess: &Session, start: Instant, p: &LastPoint) -> Summary {
        Summary {
            name: self.st.name.clone(),
            tracker: self.tracker.as_str().into(),
            point_id: p.id,
            point_kind: p.kind.clone(),
            seq: p.seq,
            bytes_read: self.bytes_read,
            bytes_sent: self.bytes_sent_prev + sess.bytes_sent,
            bytes_received: self.bytes_received_prev + sess.bytes_received(),
            seconds: start.elapsed().as_secs_f64(),
            initial_sync: self.did_initial,
            resync: self.did_resync,
            verify_differing: None,
            repaired_bytes: None,
        }
    }

    /// `--verify`: with the point of `sum` just cut, compare every chunk of
    /// the source with the replica's (the master target hashes its replica
    /// as it is, not its stored sums, so damage there shows), shipping
    /// nothing; with `repair`, send exactly the ranges that differ and cut
    /// a point after them.
    fn verify_against_replica(&mut self, sess: &mut Session, start: Instant, sum: Summary, repair: bool) -> Result<Summary, AgentError> {
        self.map = None; // the agent's own map of the replica proves nothing here
        self.verify_found = Some(Vec::new());
        let r = self.scan_pass(sess, "verify against the replica");
        let mut found = self.verify_found.take().unwrap_or_default();
        r?;
        found.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in found {
            match merged.last_mut() {
                Some((_, e)) if *e >= a => *e = (*e).max(b),
                _ => merged.push((a, b)),
            }
        }
        let differing: u64 = merged.iter().map(|(a, b)| b - a).sum();
        if merged.is_empty() {
            log::info!("verify: the replica equals the source at point {}", sum.point_id);
        }
        for (a, b) in &merged {
            log::warn!("verify: the replica differs from the source in [{a}, {b}) ({} bytes)", b - a);
        }
        let mut out = Summary { verify_differing: Some(merged.clone()), ..sum };
        if repair && !merged.is_empty() {
            let mut buf = AlignedBuf::new(1 << 20);
            self.ship_extents(sess, &merged, &mut buf)?;
            let p = self.cut(sess, PointKind::Crash)?;
            log::info!("verify: {differing} bytes re-sent; recovery point {} after them", p.id);
            let s = self.summary(sess, start, &p);
            out = Summary { verify_differing: Some(merged), repaired_bytes: Some(differing), ..s };
        }
        Ok(out)
    }

    /// Send a tag, wait for its point, and remember it.
    fn cut(&mut self, sess: &mut Session, kind: PointKind) -> Result<LastPoint, AgentError> {
        self.cut_at(sess, kind, ferry_common::now_ns())
    }

    /// [`Agent::cut`] with the point's time given (a group's cut id).
    fn cut_at(&mut self, sess: &mut Session, kind: PointKind, t: u64) -> Result<LastPoint, AgentError> {
        let seq = sess.send_tag(kind, t)?;
        let id = if sess.relayed && !self.opts.once {
            // Through a process server a point exists once the master target
            // behind it made it durable: that may be long after the spool
            // acknowledged the tag (the master target away). The stream goes
            // on meanwhile; the point is recorded when it comes (note_ack).
            match sess.wait_point_for(seq, RELAY_POINT_WAIT)? {
                Some(id) => id,
                None => {
                    if self.late_tags.len() >= LATE_TAGS_KEPT {
                        self.late_tags.remove(0);
                    }
                    self.late_tags.push((seq, t, kind));
                    log::debug!("tag at seq {seq}: its point comes once the master target has it");
                    return Ok(LastPoint { id: 0, seq, time_ns: t, kind: kind.as_str().into() });
                }
            }
        } else {
            sess.wait_point(seq)?
        };
        let p = LastPoint { id, seq, time_ns: t, kind: kind.as_str().into() };
        log::info!("recovery point {id} ({}) at seq {seq}", kind.as_str());
        // The pass just before this tag left the replica equal to its sums,
        // and the tag is the newest durable frame: record the map.
        if let Some(sums) = self.pass_sums.take() {
            let m = ChunkMap { chunk: COARSE_CHUNK, size: self.st.size, seq, generation: self.generation, sums };
            if self.frozen {
                self.deferred_map = Some(m);
            } else if let Err(e) = m.save(&self.sd.chunk_map_file()) {
                log::warn!("cannot save the chunk map ({e}); the next pass reads the replica instead");
            }
        }
        self.note_point(p.clone(), false);
        self.note_ack(sess);
        self.st.mode = Mode::Streaming;
        self.save()?;
        Ok(p)
    }

    /// The time between points now: the configuration server's policy,
    /// else `--point-every` (a change is logged and shown in the status).
    fn point_interval(&mut self) -> Duration {
        let every = self.opts.live.point_every(self.opts.point_every);
        if (self.st.point_every_s - every.as_secs_f64()).abs() > 1e-6 {
            log::info!("{}: a recovery point every {:.1}s from now", self.st.name, every.as_secs_f64());
            self.st.point_every_s = every.as_secs_f64();
        }
        every
    }

    /// The scan tracker on the shipper loop: each step is a round of
    /// checksum passes ([`ScanSource`], through this agent's session as the
    /// sink's replica), then a point if the round settled (under
    /// `--freeze-cmd`, its verify passes run inside the freeze); a pause of
    /// `--point-every` between rounds.
    fn scan_stream(&mut self, sess: &mut Session, start: Instant, verified: bool) -> Result<Summary, AgentError> {
        let (once, frozen) = (self.opts.once, self.opts.freeze_cmd.is_some());
        let src = Arc::clone(&self.src);
        let mut source = ScanSource::new(&self.st.name, self.reader.clone()).with_stamp(move || stamp(&src)).verify_under_freeze(frozen);
        if self.did_initial || self.did_resync {
            // The replica was just brought to the disk: no resync pass first.
            source = source.after_sync(verified);
        }
        let reader = self.reader.clone();
        let mut sh = Shipper::start(source, AgentSink::new(self, sess), reader, 0)?;
        loop {
            let step = sh.step(true);
            let AgentSink { agent, sess, .. } = &mut sh.sink;
            match step {
                Ok(st) if !st.points.is_empty() => {
                    agent.st.cut_problem = None;
                    if once {
                        let p = agent.st.last_point.clone().expect("a point was cut");
                        return Ok(agent.summary(sess, start, &p));
                    }
                }
                // A round with no point and no error: the verify passes under
                // the freeze outlasted --freeze-cap (the sink said so).
                Ok(_) => {
                    let why = agent.st.cut_problem.clone().unwrap_or_else(|| format!("{}: no consistent point cut", agent.st.name));
                    if once {
                        return Err(AgentError::NoConsistentPoint(why));
                    }
                    log::warn!("{why}");
                    agent.save()?;
                }
                Err(AgentError::RoundGaveUp(why)) if frozen && !once => {
                    log::warn!("{why}");
                    agent.st.cut_problem = Some(why);
                    agent.save()?;
                }
                Err(e) => return Err(e),
            }
            let every = agent.point_interval();
            agent.pause(sess, every)?;
        }
    }

    /// Move the initial sync's cursor over every chunk durable up to `durable`.
    fn advance_sync_cursor(&mut self, durable: u64) {
        while let Some(&(seq, end)) = self.sync_progress.front() {
            if seq > durable {
                break;
            }
            self.st.sync_cursor = Some(end);
            self.sync_progress.pop_front();
        }
    }

    /// Ship all of `[from, size)`, read through the block reader: its
    /// threads read the pieces and cut them into units (zero detection,
    /// BLAKE3, zstd) and coarse sums in parallel; they are sent here in
    /// disk order.
    fn full_pass(&mut self, sess: &mut Session, from: u64) -> Result<(), AgentError> {
        let size = self.st.size;
        let pb = progress_bar(self.opts.progress, size, "initial sync");
        pb.set_position(from);
        log::info!("initial sync of {} ({} bytes) from offset {from}", self.st.name, size);
        let reader = self.reader.clone();
        self.sync_progress.clear();
        let mut all_sums = Vec::new();
        let work = |data: &[u8]| {
            // Offsets relative to the piece: `each` moves them.
            let mut units = Vec::with_capacity(data.len() / UNIT + 1);
            prepare(0, data, UNIT, &mut units);
            let sums: Vec<[u8; 16]> = data.chunks(COARSE_CHUNK as usize).map(ferry_common::xxh128).collect();
            (units, sums)
        };
        let r = reader.read_extents_with(&[(from, size)], work, |off, data, (units, sums)| -> Result<(), AgentError> {
            all_sums.extend(sums);
            for mut u in units {
                let end = match &mut u {
                    Unit::Zero { offset, len } | Unit::Data { offset, len, .. } => {
                        *offset += off;
                        *offset + u64::from(*len)
                    }
                };
                let seq = sess.send_unit(u)?;
                // Per unit, so that a connection cut mid-piece resumes
                // where the master target stopped.
                self.sync_progress.push_back((seq, end));
            }
            self.bytes_read += data.len() as u64;
            pb.set_position(off + data.len() as u64);
            let acked = sess.acked();
            self.advance_sync_cursor(acked);
            self.note_ack(sess);
            self.save_if_due()?;
            self.checkpoint(sess)
        });
        let r = r.and_then(|_| sess.wait_acked(sess.next_seq - 1));
        pb.finish_and_clear();
        r?;
        // Sums cover the whole disk only for a sync that started at 0.
        self.pass_sums = (from == 0).then_some(all_sums);
        self.st.sync_cursor = Some(size);
        self.note_ack(sess);
        Ok(())
    }

    /// One checksum pass over the whole disk, in two levels: xxh3-128 of
    /// [`COARSE_CHUNK`] chunks first, then of [`FINE_CHUNK`] pieces of the
    /// coarse chunks that differ; only differing fine pieces are sent.
    /// The disk is read through the block reader (ferry-sources'
    /// [`scan::pass`]). Returns the number of differing bytes.
    pub fn scan_pass(&mut self, sess: &mut Session, what: &str) -> Result<u64, AgentError> {
        let reader = self.reader.clone();
        scan::run_pass(&reader, &mut AgentSink::new(self, sess), what)
    }

    /// The ring and the bpf tracker on the shipper loop: [`RingSource`]
    /// (or [`BpfRingSource`], the tracker feeding `STATE/ring`) for the
    /// changes, [`AgentSink`] for the session, this agent's state and the
    /// freeze.
    fn stream_shipper(&mut self, sess: &mut Session, start: Instant) -> Result<Summary, AgentError> {
        let ring = self.ring.take().expect("ring tracker has a ring");
        let source = RingSource::new(ring, self.st.ring_overflows_seen).with_discard_zeroes(self.discard_zeroes);
        match self.bpf.take() {
            Some(b) => {
                let size = self.st.size;
                self.stream_on(sess, start, BpfRingSource::new(b, source, size))
            }
            None => self.stream_on(sess, start, source),
        }
    }

    /// The stream loop over a ring-fed source; the cut policy (when a
    /// point is due, what to say when none can be cut) is here.
    fn stream_on<S: RingFed>(&mut self, sess: &mut Session, start: Instant, source: S) -> Result<Summary, AgentError> {
        // Streaming from here, as `ferry status` shows at once.
        self.st.mode = Mode::Streaming;
        self.save()?;
        let durable = source.durable_position();
        let reader = self.reader.clone();
        let (once, name) = (self.opts.once, self.st.name.clone());
        let mut sh = Shipper::start(source, AgentSink::new(self, sess), reader, durable)?;
        let r = (|| -> Result<Summary, AgentError> {
            let mut last_cut = Instant::now();
            let mut quiet_tries = 0u32;
            let mut folds = sh.source.folds();
            loop {
                let AgentSink { agent, sess, .. } = &mut sh.sink;
                agent.checkpoint(sess)?;
                if agent.last_backlog.elapsed() >= Duration::from_millis(500) {
                    let in_bitmap = sh.source.bitmap_backlog(monotonic_ns());
                    agent.note_backlog(sh.source.backlog_ring(), in_bitmap)?;
                }
                if let Some(why) = agent.st.resync_required.clone() {
                    agent.save()?;
                    // The shipper's own state too (a catch-up under way).
                    sh.resync(&why)?;
                }
                let every = sh.sink.agent.point_interval();
                // A freeze that failed is tried again only after a back-off.
                let due = (once || last_cut.elapsed() >= every) && sh.sink.agent.freeze_retry.ready();
                let step = sh.step(due)?;
                let ov = sh.source.overflows_seen();
                let agent = &mut *sh.sink.agent;
                if let Some(ov) = ov {
                    agent.st.ring_overflows_seen = ov;
                }
                agent.bytes_read += step.bytes_read;
                agent.st.churn_bytes_total += step.churn_bytes;
                if sh.source.folds() != folds {
                    // Folded into the bitmap: what was shipped before is
                    // shipped again from there.
                    folds = sh.source.folds();
                    agent.lag_pending.clear();
                }
                if let Some(t) = step.timed {
                    agent.lag_pending.push_back(t);
                }
                if step.cut_placed {
                    // A cut request placed in the source's stream (a TAG
                    // under a freeze): the due point is handled, it is cut
                    // when the stream reaches the request.
                    last_cut = Instant::now();
                    quiet_tries = 0;
                }
                if !step.points.is_empty() {
                    last_cut = Instant::now();
                    quiet_tries = 0;
                    agent.st.cut_problem = None;
                    if once {
                        let p = agent.st.last_point.clone().expect("a point was cut");
                        let summary = agent.summary(sh.sink.sess, start, &p);
                        // Save the acknowledgement and release what it
                        // covers before stopping: saves are otherwise at most
                        // twice a second, and a short run would leave all it
                        // shipped in the ring for the next run to ship again.
                        sh.sink.agent.save()?;
                        sh.release_durable()?;
                        return Ok(summary);
                    }
                } else if step.cut_tried && !step.cut_placed {
                    // Steps that shipped changes are not failed tries: the
                    // stream is still draining.
                    if step.changes == 0 {
                        quiet_tries += 1;
                    }
                    let overdue = last_cut.elapsed();
                    if overdue > (every * 3).max(Duration::from_secs(10)) && agent.st.cut_problem.is_none() {
                        let why = format!(
                            "no consistent point for {:.0}s: writes do not pause (add --freeze-cmd) or a freeze cannot finish within {:.1}s",
                            overdue.as_secs_f64(),
                            agent.opts.freeze_cap.as_secs_f64()
                        );
                        log::warn!("{why}");
                        agent.st.cut_problem = Some(why);
                        agent.save()?;
                    }
                    if once && agent.freeze_retry.failing_for().is_some_and(|d| d > FREEZE_GIVE_UP) {
                        return Err(AgentError::NoConsistentPoint(format!(
                            "{name}: no consistent point: freezing has failed for {}s ({})",
                            FREEZE_GIVE_UP.as_secs(),
                            agent.st.cut_problem.as_deref().unwrap_or("no reason recorded")
                        )));
                    }
                    if once && quiet_tries > 2000 {
                        return Err(AgentError::NoConsistentPoint(format!(
                            "{name}: writes never paused long enough to cut a consistent point; use --freeze-cmd"
                        )));
                    }
                }
                if step.changes == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })();
        let Shipper { source, sink, .. } = sh;
        source.give_back(sink.agent);
        r
    }

    fn ship_extents(&mut self, sess: &mut Session, exts: &[(u64, u64)], _buf: &mut AlignedBuf) -> Result<(), AgentError> {
        // Shipped extents change the replica after the last pass.
        self.pass_sums = None;
        // Many reads in flight (ferry-sources' block reader); sent in the
        // extents' order.
        let mut units = Vec::new();
        let n = self.reader.read_extents(exts, |off, data| -> Result<(), AgentError> {
            units.clear();
            prepare(off, data, UNIT, &mut units);
            for u in units.drain(..) {
                sess.send_unit(u)?;
            }
            Ok(())
        })?;
        self.bytes_read += n;
        Ok(())
    }

    /// Measure the backlog for `ferry status`: the bytes of the records in
    /// `STATE/ring` not yet released (not yet durable on the master target)
    /// plus what the bpf tracker's bitmap holds, and the age of the oldest
    /// of them (a record's completion time; for the bitmap, since when it
    /// has not been empty).
    fn note_backlog(&mut self, ring: &Ring, in_bitmap: (u64, Option<u64>)) -> Result<(), AgentError> {
        self.last_backlog = Instant::now();
        let now = monotonic_ns();
        let mut bytes = 0u64;
        let mut oldest = u64::MAX;
        let mut at = ring.consumer();
        loop {
            let (recs, next) = ring.read_from(at, 4096)?;
            if recs.is_empty() {
                break;
            }
            for r in recs.iter().flatten() {
                bytes += u64::from(r.length);
                if r.time_ns > 0 {
                    oldest = oldest.min(r.time_ns);
                }
            }
            at = next;
        }
        let (in_bitmap, since) = in_bitmap;
        if let Some(t) = since {
            oldest = oldest.min(t);
        }
        self.st.backlog_bytes = (bytes + in_bitmap).min(self.st.size);
        self.st.backlog_in_bitmap = in_bitmap.min(self.st.size);
        self.st.backlog_lag_s = if oldest == u64::MAX { 0.0 } else { now.saturating_sub(oldest) as f64 / 1e9 };
        // The same moment on the wall clock, so that its age can be told
        // later (while the agent cannot ship, it keeps growing).
        self.st.backlog_oldest_ns = (oldest != u64::MAX).then(|| ferry_common::now_ns().saturating_sub(now.saturating_sub(oldest)));
        Ok(())
    }

    /// Replication lag: from a write's completion (tracker clock) to the
    /// acknowledgement that made it durable on the master target.
    fn note_lag(&mut self) {
        let now = monotonic_ns();
        while let Some(&(seq, t)) = self.lag_pending.front() {
            if seq > self.st.acked_seq {
                break;
            }
            self.lag_pending.pop_front();
            self.st.lag_ms_recent.push(now.saturating_sub(t) as f64 / 1e6);
        }
        let n = self.st.lag_ms_recent.len();
        if n > 2000 {
            self.st.lag_ms_recent.drain(..n - 1000);
        }
    }

    /// A freeze failed with `e` (nothing is frozen now): back off, and say
    /// so when the error is new.
    fn freeze_failed(&mut self, e: &str) {
        if self.freeze_retry.failed(e) {
            let hint =
                if e.contains("Device or resource busy") { " (frozen by someone else? `fsfreeze -u MOUNTPOINT` thaws it)" } else { "" };
            log::warn!(
                "cannot freeze for a consistent point: {e}{hint}; trying again in {:.1}s, then less often while it fails",
                self.freeze_retry.delay().as_secs_f64()
            );
        }
    }

    /// Run the thaw command (if any) and catch up on the state writes held
    /// back while frozen.
    fn thaw(&mut self) -> Result<(), AgentError> {
        let r = match &self.opts.thaw_cmd {
            Some(t) => run_hook("thaw", t),
            None => Ok(()),
        };
        self.frozen = false;
        if let Some(m) = self.deferred_map.take() {
            if let Err(e) = m.save(&self.sd.chunk_map_file()) {
                log::warn!("cannot save the chunk map ({e}); the next pass reads the replica instead");
            }
        }
        self.save()?;
        r
    }
}

/// The agent as the shipper's [`Sink`]: frames go to the master target's
/// session; durability is the acknowledged sequence *as saved* in
/// `agent.state` (so the source is released only behind a saved
/// acknowledgement, as the ring loop always did); a resync is the agent's
/// checksum pass; a point is the agent's cut. It is also the replica's
/// side of every checksum pass ([`scan::Replica`]).
struct AgentSink<'a> {
    agent: &'a mut Agent,
    sess: &'a mut Session,
    /// The mounted filesystems of the disk, as of the last cut plan.
    mounts: Vec<PathBuf>,
    /// The freeze under way.
    run: Option<FreezeRun>,
    /// The checksum pass under way.
    pass: Option<PassRun>,
}

impl<'a> AgentSink<'a> {
    fn new(agent: &'a mut Agent, sess: &'a mut Session) -> AgentSink<'a> {
        AgentSink { agent, sess, mounts: Vec::new(), run: None, pass: None }
    }
}

/// A checksum pass under way ([`scan::Replica::pass_begin`] to
/// [`scan::Replica::pass_end`]): its progress bar, cleared when it ends
/// (or fails).
struct PassRun {
    pb: indicatif::ProgressBar,
    /// Read up to here (for the byte counter).
    upto: u64,
    units: Vec<Unit>,
}

impl Drop for PassRun {
    fn drop(&mut self) {
        self.pb.finish_and_clear();
    }
}

/// A freeze under way ([`AgentSink::freeze`] to [`AgentSink::thaw`]).
struct FreezeRun {
    guard: freeze::Guard,
    t0: Instant,
    fs: freeze::Frozen,
    failed: Option<String>,
    /// Checksum passes run inside this freeze (the scan's verify passes).
    passes: u32,
}

/// What the agent's stream loop needs of a ring-fed source besides the
/// trait: the ring (backlog), where to resume, the overflows accounted for
/// (kept in `agent.state` by the agent, for the sources that do not keep
/// their own state), the bitmap's part of the backlog, folds, and handing
/// the parts back when the stream ends.
trait RingFed: ChangeSource {
    fn backlog_ring(&self) -> &Ring;
    /// The position the source resumes from (everything before it released).
    fn durable_position(&self) -> Position;
    fn overflows_seen(&self) -> Option<u64> {
        None
    }
    fn bitmap_backlog(&mut self, _now: u64) -> (u64, Option<u64>) {
        (0, None)
    }
    fn folds(&self) -> u64 {
        0
    }
    fn give_back(self, agent: &mut Agent);
}

impl RingFed for RingSource {
    fn backlog_ring(&self) -> &Ring {
        self.ring()
    }
    fn durable_position(&self) -> Position {
        // Releases happen only at acknowledged positions, so the consumer
        // index is the last durable position (resuming there releases
        // nothing, and cannot fail).
        self.ring().consumer()
    }
    fn overflows_seen(&self) -> Option<u64> {
        Some(RingSource::overflows_seen(self))
    }
    fn give_back(self, agent: &mut Agent) {
        agent.ring = Some(self.into_ring());
    }
}

impl RingFed for BpfRingSource {
    fn backlog_ring(&self) -> &Ring {
        self.ring().ring()
    }
    fn durable_position(&self) -> Position {
        self.ring().ring().consumer()
    }
    fn overflows_seen(&self) -> Option<u64> {
        Some(self.ring().overflows_seen())
    }
    fn bitmap_backlog(&mut self, now: u64) -> (u64, Option<u64>) {
        self.bpf_mut().bitmap_backlog(now)
    }
    fn folds(&self) -> u64 {
        BpfRingSource::folds(self)
    }
    fn give_back(self, agent: &mut Agent) {
        let (b, r) = self.into_parts();
        agent.bpf = Some(b);
        agent.ring = Some(r.into_ring());
    }
}

/// The kernel module keeps its ring indices, catch-up and counters itself
/// (written through [`KmodStateStore`]); it resumes from its own ring.
impl RingFed for KmodSource {
    fn backlog_ring(&self) -> &Ring {
        self.ring()
    }
    fn durable_position(&self) -> Position {
        0
    }
    fn give_back(self, agent: &mut Agent) {
        agent.kmod = Some(self);
    }
}

impl Sink for AgentSink<'_> {
    type Error = AgentError;

    fn send_data(&mut self, offset: u64, data: &[u8]) -> Result<u64, AgentError> {
        // Shipped extents change the replica after the last pass.
        self.agent.pass_sums = None;
        let mut units = Vec::new();
        prepare(offset, data, UNIT, &mut units);
        let mut seq = self.sess.next_seq.saturating_sub(1);
        for u in units {
            seq = self.sess.send_unit(u)?;
        }
        Ok(seq)
    }

    fn send_zero(&mut self, offset: u64, len: u64) -> Result<u64, AgentError> {
        self.agent.pass_sums = None;
        let (mut off, end) = (offset, offset + len);
        let mut seq = self.sess.next_seq.saturating_sub(1);
        while off < end {
            let n = (end - off).min(u64::from(ferry_proto::MAX_EXTENT));
            seq = self.sess.send_unit(Unit::Zero { offset: off, len: n as u32 })?;
            off += n;
        }
        Ok(seq)
    }

    fn durable(&mut self) -> Result<u64, AgentError> {
        self.sess.flush()?;
        self.agent.note_ack(self.sess);
        self.agent.note_lag();
        if self.agent.frozen {
            return Ok(self.agent.saved_acked.min(self.agent.st.acked_seq));
        }
        // Saves happen at most twice a second.
        if self.agent.st.acked_seq > self.agent.saved_acked {
            self.agent.save_if_due()?;
        }
        Ok(self.agent.saved_acked)
    }

    fn wait_durable(&mut self, seq: u64) -> Result<(), AgentError> {
        self.sess.wait_acked(seq)
    }

    fn last_sent(&self) -> u64 {
        self.sess.next_seq.saturating_sub(1)
    }

    fn cut(&mut self, time_ns: u64, app: bool) -> Result<u64, AgentError> {
        let kind = if app { PointKind::App } else { PointKind::Crash };
        Ok(self.agent.cut_at(self.sess, kind, time_ns)?.id)
    }

    /// A consistency group's point is named by the group's cut id, as its
    /// time, so that every disk of the group has a point with it.
    fn cut_requested(&mut self, group: Option<u64>, time_ns: u64, app: bool) -> Result<u64, AgentError> {
        let Some(id) = group else { return self.cut(time_ns, app) };
        let p = self.agent.cut_at(self.sess, PointKind::Group, id)?;
        log::info!("group point {} for cut {id}", p.id);
        Ok(p.id)
    }

    fn resync(&mut self, why: &str) -> Result<(), AgentError> {
        if why.starts_with("ring overflow") {
            log::warn!("resync required: ring overflow");
        }
        self.agent.st.resync_required = Some(why.to_string());
        self.agent.save()?;
        self.agent.resync(self.sess).map(|_| ())
    }

    fn save_position(&mut self, _pos: Position) -> Result<(), AgentError> {
        // The ring's consumer index is itself durable, and the
        // acknowledgement covering it was saved (see `durable`).
        Ok(())
    }

    /// Freeze when a filesystem of the disk is mounted or `--freeze-cmd`
    /// is given; pre-copy (flush the filesystems now, ship, then freeze)
    /// when there are filesystems.
    /// The scan freezes only with `--freeze-cmd` (its verify passes read
    /// the whole disk: too long to hold filesystems frozen).
    fn cut_plan(&mut self) -> CutPlan {
        self.mounts = match self.agent.tracker {
            Tracker::Scan => Vec::new(),
            _ => freeze::mounts_of(&self.agent.opts.disk),
        };
        if self.agent.opts.freeze_cmd.is_none() && self.mounts.is_empty() {
            return CutPlan::Quiet;
        }
        let precopy = !self.mounts.is_empty();
        if precopy {
            freeze::presync(&self.mounts);
        }
        CutPlan::Freeze { precopy }
    }

    fn freeze(&mut self) -> Result<Option<bool>, AgentError> {
        let agent = &mut *self.agent;
        let cap = agent.opts.freeze_cap;
        // A separate process thaws if this one dies or overruns the cap.
        let guard = freeze::Guard::start(&self.mounts, cap + Duration::from_secs(2), agent.opts.thaw_cmd.as_deref());
        let t0 = Instant::now();
        if let Some(f) = &agent.opts.freeze_cmd {
            if let Err(e) = run_hook("freeze", f) {
                drop(guard); // thaws and runs the thaw command
                return Err(e);
            }
        }
        agent.frozen = true;
        log::debug!("freeze attempt: {} filesystem(s)", self.mounts.len());
        let (fs, all_frozen) = freeze::freeze(&self.mounts);
        let failed = fs.failed.clone();
        if let Some(e) = &failed {
            agent.st.cut_problem = Some(e.clone());
        }
        let frozen = failed.is_none();
        self.run = Some(FreezeRun { guard, t0, fs, failed, passes: 0 });
        Ok(frozen.then_some(all_frozen))
    }

    fn freeze_over_cap(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.t0.elapsed() > self.agent.opts.freeze_cap)
    }

    fn thaw(&mut self, _point: bool) -> Result<(), AgentError> {
        let Some(run) = self.run.take() else { return Ok(()) };
        let agent = &mut *self.agent;
        let fs_thawed = run.fs.thaw();
        let hook_thawed = agent.thaw();
        run.guard.done();
        match &run.failed {
            // No freeze happened: the error is logged once per change, and
            // the next attempt waits (Retry).
            Some(e) => agent.freeze_failed(e),
            None => {
                if let Some(old) = agent.freeze_retry.succeeded() {
                    log::info!("filesystems freeze again (the last attempts failed: {old})");
                }
                let ms = run.t0.elapsed().as_secs_f64() * 1000.0;
                log::info!("freeze held {ms:.1} ms ({} filesystems)", self.mounts.len());
                agent.st.freeze_ms_recent.push(ms);
                let n = agent.st.freeze_ms_recent.len();
                if n > 200 {
                    agent.st.freeze_ms_recent.drain(..n - 200);
                }
            }
        }
        agent.save()?;
        if let Err(e) = fs_thawed {
            log::error!("{e}");
        }
        hook_thawed
    }

    fn no_point(&mut self, why: NoPoint) {
        let cap = self.agent.opts.freeze_cap.as_secs_f64();
        if self.agent.tracker == Tracker::Scan {
            // The scan's verify passes under --freeze-cmd: the scan loop
            // says it (or stops with it under --once).
            let took = self.run.as_ref().map_or(0.0, |r| r.t0.elapsed().as_secs_f64());
            let passes = self.run.as_ref().is_some_and(|r| r.passes > 0);
            self.agent.st.cut_problem = Some(if passes {
                format!(
                    "{}: the verify pass under --freeze-cmd took {took:.1}s, longer than --freeze-cap {cap:.1}s; thawed without a point \
                     (raise --freeze-cap, or use a tracker)",
                    self.agent.st.name
                )
            } else {
                format!(
                    "{}: the freeze command took {took:.1}s, longer than --freeze-cap {cap:.1}s; thawed with no verify pass and no \
                     point (raise --freeze-cap)",
                    self.agent.st.name
                )
            });
            return;
        }
        self.agent.st.cut_problem = Some(match why {
            NoPoint::FreezeCap => {
                log::warn!("freeze cap of {cap:.1}s reached; thawing without a point");
                format!("a freeze reached its {cap:.1}s cap with changes left to ship; thawed, will retry")
            }
            NoPoint::WrittenWhileFrozen => {
                "the disk was written during the freeze (something the freeze does not reach writes to it)".into()
            }
        });
    }

    fn replica(&mut self) -> Option<&mut dyn scan::Replica<Error = AgentError>> {
        Some(self)
    }
}

/// The agent's side of a checksum pass ([`scan::pass`]): the master
/// target's sums over the session, the differing pieces sent (or, during a
/// `--verify` pass, collected in `verify_found`), progress and the agent's
/// periodic duties between pieces.
impl scan::Replica for AgentSink<'_> {
    type Error = AgentError;

    fn request(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, AgentError> {
        self.sess.request_sums(offset, chunk, count)
    }

    fn flush(&mut self) -> Result<(), AgentError> {
        self.sess.flush()
    }

    fn receive(&mut self, req: u64, offset: u64, count: usize) -> Result<Vec<[u8; 16]>, AgentError> {
        self.sess.recv_sums_for(req, offset, count)
    }

    fn differs(&mut self, offset: u64, data: &[u8]) -> Result<(), AgentError> {
        if let Some(f) = self.agent.verify_found.as_mut() {
            f.push((offset, offset + data.len() as u64));
            return Ok(());
        }
        // What a pass finds changed is churn (the scan tracker finds all of
        // it this way; other trackers, what they lost).
        self.agent.st.churn_bytes_total += data.len() as u64;
        let mut units = self.pass.as_mut().map(|p| std::mem::take(&mut p.units)).unwrap_or_default();
        prepare(offset, data, UNIT, &mut units);
        for u in units.drain(..) {
            self.sess.send_unit(u)?;
        }
        if let Some(p) = self.pass.as_mut() {
            p.units = units;
        }
        Ok(())
    }

    fn progress(&mut self, upto: u64) -> Result<(), AgentError> {
        if let Some(p) = self.pass.as_mut() {
            self.agent.bytes_read += upto.saturating_sub(p.upto);
            p.upto = upto;
            p.pb.set_position(upto);
        }
        self.agent.note_ack(self.sess);
        self.agent.save_if_due()?;
        self.agent.checkpoint(self.sess)
    }

    /// The chunk map, if it still describes the replica (nothing was sent
    /// since it was checked against the master target's durable sequence);
    /// it is used once.
    fn pass_begin(&mut self, what: &str) -> Result<Option<Vec<[u8; 16]>>, AgentError> {
        if what == "resync" {
            self.agent.st.mode = Mode::Resync;
        }
        if let Some(r) = self.run.as_mut() {
            r.passes += 1;
        }
        let pb = progress_bar(self.agent.opts.progress, self.agent.st.size, what);
        self.pass = Some(PassRun { pb, upto: 0, units: Vec::new() });
        let map = self.agent.map.take().filter(|m| self.sess.next_seq == m.seq + 1);
        if map.is_some() {
            log::info!("{what} pass: using the chunk map; the master target reads only chunks that differ");
        }
        Ok(map.map(|m| m.sums))
    }

    /// Everything the pass sent acknowledged; its coarse sums are the
    /// replica's if no frame follows before the next point.
    fn pass_end(&mut self, what: &str, p: scan::Pass) -> Result<(), AgentError> {
        let run = self.pass.take();
        let r = self.sess.wait_acked(self.sess.next_seq - 1);
        drop(run);
        r?;
        if self.agent.verify_found.is_some() {
            return Ok(()); // a dry pass: nothing was sent
        }
        self.agent.pass_sums = Some(p.sums);
        self.agent.note_ack(self.sess);
        log::info!("{what} pass: {} bytes differed", p.differing);
        Ok(())
    }
}

/// Byte ranges `[start, end)`, in disk order.
pub type Ranges = Vec<(u64, u64)>;

/// The batch's ranges to read, and those it only zeroed (sent as zero
/// extents without a read): write-zeroes always read as zeroes; a discard
/// does where `discard_zeroes` (the device reads zeroes after one; the bpf
/// tracker records a discard that failed as a write). A range written
/// anywhere in the batch is read, whatever else touched it.
pub fn split_zeroed(recs: &[Record], size: u64, discard_zeroes: bool) -> (Ranges, Ranges) {
    use ferry_ring::RecordKind;
    let zeroing = |r: &&Record| r.kind == RecordKind::WriteZeroes || (discard_zeroes && r.kind == RecordKind::Discard);
    let written: Vec<Record> = recs.iter().filter(|r| !zeroing(r)).copied().collect();
    let zeroed: Vec<Record> = recs.iter().filter(zeroing).copied().collect();
    let read = coalesce(&written, size);
    let mut zero = Vec::new();
    for (a, b) in coalesce(&zeroed, size) {
        // Minus the ranges that are read.
        let mut at = a;
        for &(x, y) in read.iter().filter(|&&(x, y)| x < b && a < y) {
            if x > at {
                zero.push((at, x));
            }
            at = at.max(y);
        }
        if at < b {
            zero.push((at, b));
        }
    }
    (read, zero)
}

/// Whether `disk` reads zeroes after a discard: a loop device over a file,
/// with discards on (the loop driver punches a hole in the file). Other
/// devices are read back (docs/operating.md).
pub fn discard_reads_zeroes(disk: &Path) -> bool {
    let Some(name) = std::fs::canonicalize(disk).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())) else {
        return false;
    };
    let sys = format!("/sys/block/{name}");
    name.strip_prefix("loop").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && Path::new(&format!("{sys}/loop/backing_file")).exists()
        && std::fs::read_to_string(format!("{sys}/queue/discard_max_bytes")).ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
            > 0
}

/// Merge records into sorted, sector-aligned, non-overlapping extents
/// clipped to the disk (tags carry no extent).
pub fn coalesce(recs: &[Record], size: u64) -> Vec<(u64, u64)> {
    let s = ferry_proto::SECTOR;
    let mut v: Vec<(u64, u64)> = recs
        .iter()
        .filter(|r| !matches!(r.kind, ferry_ring::RecordKind::Tag | ferry_ring::RecordKind::Catchup) && r.offset < size)
        .map(|r| (r.offset / s * s, (r.offset + u64::from(r.length)).div_ceil(s).saturating_mul(s).min(size)))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn progress_bar(enabled: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Before attaching the bpf tracker of `name` for state folder `state`
/// (owner `me`): refuse one another folder owns, take over a stale one
/// (afresh: its history is another protection's), keep our own. Returns
/// the owner to record (our record as pinned, if there is one).
fn claim_bpf(name: &str, state: &Path, me: &Owner) -> Result<Owner, AgentError> {
    let pins = ferry_bpf::pin_dir(name);
    match owner::bpf_claim(name, me)? {
        Claim::Mine(o) => Ok(o),
        Claim::Free => Ok(me.clone()),
        Claim::Stale(o) if o.generation == me.generation => {
            log::warn!(
                "the bpf tracker of {name} was recorded for state folder {}, which no longer holds it; {} holds the same protection \
                 (a moved folder): adopting it",
                o.state.display(),
                me.state.display()
            );
            Ok(me.clone())
        }
        Claim::Stale(o) => {
            log::warn!(
                "the bpf tracker of {name} belonged to state folder {}, which no longer holds that protection: attaching afresh",
                o.state.display()
            );
            ferry_bpf::unpin(name)?;
            Ok(me.clone())
        }
        Claim::Foreign(o) => Err(AgentError::Usage(format!(
            "the bpf tracker of {name} (pinned in {}) belongs to state folder {}: stop protecting it there first \
             (`ferry unprotect --state {}`), or run this agent with --state {}",
            pins.display(),
            o.state.display(),
            o.state.display(),
            o.state.display()
        ))),
        Claim::Unreadable(e) => Err(AgentError::Usage(format!(
            "the bpf tracker of {name} (pinned in {}) has an unreadable owner record ({e}): \
             `ferry unprotect --state {} --force` detaches it",
            pins.display(),
            state.display()
        ))),
    }
}

/// After attaching (or finding) the kernel module's attachment `attach_id`:
/// refuse one another folder owns; record ours.
fn claim_kmod(opts: &Options, me: &Owner, attach_id: u64) -> Result<(), kmod::KmodError> {
    let dev = kmod::dev_numbers(&opts.disk)?;
    let dir = Path::new(owner::KMOD_OWNER_DIR);
    match owner::kmod_claim(dir, dev, attach_id, me) {
        Claim::Mine(_) => return Ok(()),
        Claim::Free => {}
        Claim::Foreign(o) => {
            return Err(kmod::KmodError::Usage(format!(
                "the kernel module's attachment of {} belongs to state folder {}: stop protecting it there first \
                 (`ferry unprotect --state {}`), or run this agent with --state {}",
                opts.disk.display(),
                o.state.display(),
                o.state.display(),
                o.state.display()
            )))
        }
        Claim::Stale(o) => log::warn!(
            "the kernel module's attachment of {} belonged to state folder {}, which no longer holds that protection: taking it over",
            opts.disk.display(),
            o.state.display()
        ),
        Claim::Unreadable(e) => {
            log::warn!("the owner record of {}'s kmod attachment is unreadable ({e}): replacing it", opts.disk.display())
        }
    }
    if let Err(e) = owner::kmod_record(dir, dev, attach_id, me, &opts.name, &opts.disk) {
        log::warn!("cannot record which state folder owns the kmod attachment of {} ({e})", opts.disk.display());
    }
    Ok(())
}

/// `ferry unprotect`: detach and unpin the tracker of the disk whose state
/// is in `state`; the replica and its points stay. Returns the disk's name.
/// Refused while an agent runs on `state` (it holds `STATE/agent.lock`),
/// and, unless `force`, when the tracker belongs to another state folder
/// (owner.rs): everything is checked before anything is detached.
pub fn unprotect(state: &Path, force: bool) -> Result<String, AgentError> {
    let sd = StateDir::new(state);
    let mut st = sd.load()?.ok_or_else(|| AgentError::Usage(format!("no agent state in {}", state.display())))?;
    let _lock = live::lock_briefly(state)?;
    let generation = unhex::<16>(&st.generation)
        .ok_or_else(|| AgentError::Usage(format!("{}: bad generation; move it aside", sd.state_file().display())))?;
    let me = Owner::new(state, generation)?;
    let name = st.name.clone();
    let foreign = |what: String, o: &Owner| {
        AgentError::Usage(format!(
            "{what} belongs to state folder {}, not {}: unprotect it there (`ferry unprotect --state {}`), \
             or add --force to detach it anyway (an agent following it stops and needs a resync)",
            o.state.display(),
            me.state.display(),
            o.state.display()
        ))
    };
    let pins = format!("the bpf tracker of {name} (pinned in {})", ferry_bpf::pin_dir(&name).display());
    let bpf_owner = match owner::bpf_claim(&name, &me)? {
        Claim::Mine(_) | Claim::Free => None,
        Claim::Stale(o) if o.generation == me.generation => None,
        Claim::Foreign(o) | Claim::Stale(o) if force => Some(o.state.display().to_string()),
        Claim::Foreign(o) => return Err(foreign(pins, &o)),
        Claim::Stale(o) => {
            return Err(AgentError::Usage(format!(
                "{pins} was attached for state folder {}, not {} (that folder no longer holds that protection): \
                 add --force to detach it",
                o.state.display(),
                me.state.display()
            )))
        }
        Claim::Unreadable(_) if force => Some("an unknown state folder".into()),
        Claim::Unreadable(e) => {
            return Err(AgentError::Usage(format!("{pins} has an unreadable owner record ({e}): add --force to detach it")))
        }
    };
    let disk = Path::new(&st.disk);
    let kmod_dev = if st.tracker == TrackerKind::Kmod {
        match kmod::attachment_id(disk)? {
            Some(id) => {
                let dev = kmod::dev_numbers(disk)?;
                let claim = owner::kmod_claim(Path::new(owner::KMOD_OWNER_DIR), dev, id, &me);
                let followed = st.kmod_attach_id == Some(id);
                match claim {
                    Claim::Foreign(o) if !force => {
                        return Err(foreign(format!("the kernel module's attachment of {}", st.disk), &o));
                    }
                    Claim::Stale(_) | Claim::Unreadable(_) if !force && !followed => {
                        return Err(AgentError::Usage(format!(
                            "the kernel module's attachment of {} is recorded for another state folder and is not the one \
                             {} followed: add --force to detach it",
                            st.disk,
                            me.state.display()
                        )));
                    }
                    _ => Some(dev),
                }
            }
            None => None,
        }
    } else {
        None
    };
    if ferry_bpf::unpin(&name)? {
        match bpf_owner {
            Some(o) => log::warn!("unpinned the bpf tracker of {name}, which belonged to {o} (--force)"),
            None => log::info!("unpinned the bpf tracker of {name}"),
        }
    }
    if kmod_dev.is_some() && kmod::detach_disk(disk)? {
        log::info!("detached {} from the kernel module tracker", st.disk);
    }
    if let Some(dev) = kmod_dev {
        owner::kmod_forget(Path::new(owner::KMOD_OWNER_DIR), dev);
    }
    st.mode = Mode::Unprotected;
    st.running = false;
    sd.save(&st)?;
    Ok(name)
}

/// The kernel module's part of the agent's state, as the source keeps it.
fn kmod_state_of(st: &AgentState) -> KmodState {
    KmodState {
        next_seq: st.kmod_next_seq,
        mode: st.kmod_mode.clone(),
        catchups: st.kmod_catchups,
        catchup_until: st.kmod_catchup_until,
        handover_open: st.kmod_handover_open,
        attach_id: st.kmod_attach_id,
        released: st.kmod_released,
        overflows_seen: st.ring_overflows_seen,
        catching_up: false,
    }
}

/// Write the kernel module source's state into the agent's (same fields,
/// same meaning: docs/formats.md).
fn apply_kmod_state(k: &KmodState, st: &mut AgentState) {
    st.kmod_next_seq = k.next_seq;
    st.kmod_mode = k.mode.clone();
    st.kmod_catchups = k.catchups;
    st.kmod_catchup_until = k.catchup_until;
    st.kmod_handover_open = k.handover_open;
    st.kmod_attach_id = k.attach_id;
    st.kmod_released = k.released;
    st.ring_overflows_seen = k.overflows_seen;
}

fn state_err(e: ferry_common::durable::StateError) -> SourceError {
    match e {
        ferry_common::durable::StateError::Io { path, source } => SourceError::Io { what: path.display().to_string(), source },
        e => SourceError::Other(e.to_string()),
    }
}

/// Where the kernel module source writes its state before it goes on
/// (a release, a hand-over of its bitmap): into `agent.state` as last
/// saved (the agent's own saves carry the same fields, see
/// `source_overlay`), and `STATE/kmod.catchup`.
struct KmodStateStore {
    sd: StateDir,
}

impl KmodStore for KmodStateStore {
    fn save(&mut self, k: &KmodState) -> Result<(), SourceError> {
        let mut st = self.sd.load().map_err(state_err)?.ok_or_else(|| {
            SourceError::Other(format!("kmod tracker: {} is missing; the agent saves it first", self.sd.state_file().display()))
        })?;
        apply_kmod_state(k, &mut st);
        self.sd.save(&st).map_err(state_err)
    }
    fn load_catchup(&self) -> Result<Option<state::Catchup>, SourceError> {
        self.sd.load_catchup().map_err(state_err)
    }
    fn save_catchup(&mut self, c: &state::Catchup) -> Result<(), SourceError> {
        self.sd.save_catchup(c).map_err(state_err)
    }
    fn drop_catchup(&mut self) -> Result<(), SourceError> {
        self.sd.drop_catchup().map_err(state_err)
    }
    fn catchup_path(&self) -> PathBuf {
        self.sd.catchup_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ring::RecordKind;
    use ferry_sources::scan::diff_runs;

    fn w(offset: u64, length: u32) -> Record {
        Record { seq: 0, offset, length, kind: RecordKind::Write, flush: false, data: false, group: false, time_ns: 0 }
    }

    #[test]
    fn diff_runs_split_at_equal_entries_and_at_the_limit() {
        let a = [[0u8; 16]; 8];
        let mut b = a;
        for i in [1, 2, 3, 6] {
            b[i][0] = 1;
        }
        assert_eq!(diff_runs(&a, &b, 100), vec![(1, 4), (6, 7)]);
        assert_eq!(diff_runs(&a, &b, 2), vec![(1, 3), (3, 4), (6, 7)]);
        assert!(diff_runs(&a, &a, 2).is_empty());
    }

    #[test]
    fn discards_are_zeroed_unread_only_where_nothing_wrote() {
        let r = |kind, offset, length| Record { seq: 0, offset, length, kind, flush: false, data: false, group: false, time_ns: 0 };
        let recs = [
            r(RecordKind::Discard, 0, 1 << 20),
            r(RecordKind::Write, 4096, 8192),
            r(RecordKind::WriteZeroes, 2 << 20, 4096),
            r(RecordKind::Discard, 3 << 20, 4096),
        ];
        let (read, zero) = split_zeroed(&recs, 8 << 20, true);
        assert_eq!(read, vec![(4096, 12288)]);
        assert_eq!(zero, vec![(0, 4096), (12288, 1 << 20), (2 << 20, (2 << 20) + 4096), (3 << 20, (3 << 20) + 4096)]);
        // A device that does not read zeroes after a discard: discards are read.
        let (read, zero) = split_zeroed(&recs, 8 << 20, false);
        assert_eq!(read, vec![(0, 1 << 20), (3 << 20, (3 << 20) + 4096)]);
        assert_eq!(zero, vec![(2 << 20, (2 << 20) + 4096)]);
    }

    #[test]
    fn coalesce_merges_overlaps_and_neighbours_and_clips() {
        let recs = [w(4096, 512), w(0, 512), w(512, 512), w(4096, 4096), w(100, 10), w(10_000, 100_000)];
        assert_eq!(coalesce(&recs, 16384), vec![(0, 1024), (4096, 8192), (9728, 16384)]);
    }
}
