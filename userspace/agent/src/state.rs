//! The agent's durable state in `--state DIR`.
//!
//! `DIR/agent.state` (checksummed state file, docs/formats.md) records what
//! the master target has acknowledged, so a restarted agent resumes instead
//! of starting over; `DIR/ring` is the record ring a tracker fills.

use ferry_common::durable::{read_state, write_state, StateError};
use std::path::{Path, PathBuf};

pub const KIND: &str = "ferry-agent-state";
pub const VERSION: u32 = 1;

/// The last recovery point the master target confirmed.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LastPoint {
    pub id: u64,
    pub seq: u64,
    pub time_ns: u64,
    pub kind: String,
}

/// The tracker a protected disk uses, as its state records it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrackerKind {
    Kmod,
    Bpf,
    Scan,
    Ring,
}

/// What the agent is doing (the state file's `mode`), or, seen from
/// outside, that it is disconnected or stopped.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    InitialSync,
    Resync,
    Streaming,
    CatchUp,
    FailedOver,
    Stopped,
    Failed,
    Unprotected,
    /// Seen from outside: running without a connection.
    Disconnected,
}

/// The kernel module tracker's mode as last seen.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KmodMode {
    Data,
    Metadata,
    Bitmap,
    Unknown,
}

/// The names the state file (and the JSON) uses for each enum.
macro_rules! names {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<$t, String> {
                match s {
                    $($s => Ok(<$t>::$v),)*
                    _ => Err(format!("unknown {} {s:?}", stringify!($t))),
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(TrackerKind { Kmod => "kmod", Bpf => "bpf", Scan => "scan", Ring => "ring" });
names!(Mode {
    InitialSync => "initial-sync",
    Resync => "resync",
    Streaming => "streaming",
    CatchUp => "catch-up",
    FailedOver => "failed-over",
    Stopped => "stopped",
    Failed => "failed",
    Unprotected => "unprotected",
    Disconnected => "disconnected",
});
names!(KmodMode { Data => "data", Metadata => "metadata", Bitmap => "bitmap", Unknown => "unknown" });

/// Contents of `agent.state`.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct AgentState {
    pub name: String,
    pub disk: String,
    pub size: u64,
    /// Hex of the 16-byte generation id of this protection.
    pub generation: String,
    pub tracker: TrackerKind,
    pub target: String,
    /// Initial sync in progress: every byte below this offset is durable at
    /// the master target. `None` once the initial sync finished.
    pub sync_cursor: Option<u64>,
    /// Why a checksum resync is required, until one completes.
    pub resync_required: Option<String>,
    /// Highest sequence number the master target acknowledged as durable.
    pub acked_seq: u64,
    /// Highest sequence number any session may have used: what a next hop
    /// acknowledged, and each session's reservation (its first sequence
    /// number plus `SEQ_GAP`), saved before it sends; never lowered.
    #[serde(default)]
    pub seq_high: u64,
    /// The address of the last session's next hop (`--target` may list
    /// several). A session to another hop numbers its frames well above
    /// everything sent before, so that frames a former hop still holds can
    /// never be taken for this session's.
    #[serde(default)]
    pub hop: Option<String>,
    /// Ring overflows already covered by a resync.
    pub ring_overflows_seen: u64,
    /// (device, inode) of the ring this agent reads; another ring means
    /// changes may have gone unrecorded.
    #[serde(default)]
    pub ring_id: Option<(u64, u64)>,
    /// BPF tracker counters already handled (they live in pinned maps and
    /// outlast the agent).
    #[serde(default)]
    pub bpf_lost_seen: u64,
    #[serde(default)]
    pub bpf_recursion_seen: u64,
    /// (device bytes changed, tracker bytes seen) when counting started:
    /// at a cut, the device must not have completed more than the tracker
    /// saw since (a cross-check against changes the tracker missed).
    #[serde(default)]
    pub bpf_baseline: Option<(u64, u64)>,
    /// Records that fell back to the BPF bitmap, for `ferry status`.
    #[serde(default)]
    pub bpf_drops: u64,
    /// Completions the kernel did not run the tracker for, caught when
    /// their request was issued again (see ferry-bpf).
    #[serde(default)]
    pub bpf_recovered: u64,
    /// Writes the tracker could not guard (see ferry-bpf `Stats::unguarded`).
    #[serde(default)]
    pub bpf_unguarded: u64,
    /// Kernel module tracker: the sequence number after the last change
    /// consumed (the next attach after a module reload continues from it),
    /// its mode as last seen, and how often it caught up from bitmap mode.
    #[serde(default)]
    pub kmod_next_seq: u64,
    #[serde(default)]
    pub kmod_mode: Option<String>,
    #[serde(default)]
    pub kmod_catchups: u64,
    /// Set while a catch-up from the module's bitmap is not yet durable
    /// (the value, `u64::MAX` since the shipper runs the kmod source, only
    /// says "set"): the module no longer holds those ranges, so the next
    /// agent ships the hand-overs saved in `STATE/kmod.catchup` again.
    #[serde(default)]
    pub kmod_catchup_until: Option<u64>,
    /// Set (and saved) just before the module is asked to hand its bitmap
    /// over, cleared once what it handed over is written down in
    /// `STATE/kmod.catchup`: a start that finds it set cannot know what
    /// the module handed over, and resyncs.
    #[serde(default)]
    pub kmod_handover_open: bool,
    /// The module attachment this agent last read (its attach_id).
    #[serde(default)]
    pub kmod_attach_id: Option<u64>,
    /// The (record, data) indices of the kmod ring this agent released last,
    /// saved before they are stored in the ring: the two stores are not
    /// atomic, so a restart completes an interrupted release from here.
    #[serde(default)]
    pub kmod_released: Option<(u64, u64)>,
    /// Why consistent points are not being cut, while that lasts.
    #[serde(default)]
    pub cut_problem: Option<String>,
    /// Why the master target refuses the stream because the disk is failed
    /// over (mode "failed-over"), while that lasts.
    #[serde(default)]
    pub failover: Option<String>,
    /// The latest freeze durations in ms (at most 200).
    #[serde(default)]
    pub freeze_ms_recent: Vec<f64>,
    /// The latest replication lags in ms, write completion to durable on
    /// the master target (trackers that time their records).
    #[serde(default)]
    pub lag_ms_recent: Vec<f64>,
    pub last_point: Option<LastPoint>,
    /// Connected to the master target (as of the last save).
    #[serde(default)]
    pub connected: bool,
    /// Wall-clock ns since when the agent has not been connected.
    #[serde(default)]
    pub disconnected_since_ns: Option<u64>,
    /// The last error that broke or refused the connection.
    #[serde(default)]
    pub last_error: Option<String>,
    /// `--point-every` of the running agent, in seconds (what the RPO is
    /// judged against).
    #[serde(default)]
    pub point_every_s: f64,
    /// Wall-clock ns of the last acknowledgement.
    pub last_ack_ns: u64,
    /// What the agent does (never `disconnected`, which only `ferry
    /// status` says); written as its kebab-case name.
    pub mode: Mode,
    /// Set while an agent runs; a start that finds it set knows the last
    /// agent did not stop cleanly.
    pub running: bool,
    /// (mtime s, ns, ctime s, ns) of an image-file source when the initial
    /// sync began; equal at its end means the file did not change meanwhile.
    #[serde(default)]
    pub source_stamp: Option<(i64, i64, i64, i64)>,
    pub bytes_sent_total: u64,
    pub bytes_read_total: u64,
    /// Backlog: bytes of changes the tracker recorded that are not yet
    /// durable on the master target (queued in `STATE/ring`, or marked in
    /// the tracker's bitmap because shipping fell behind), as last seen.
    #[serde(default)]
    pub backlog_bytes: u64,
    /// Age in seconds of the oldest change in that backlog (0 when none).
    #[serde(default)]
    pub backlog_lag_s: f64,
    /// Wall-clock ns of the oldest change in that backlog, when the
    /// tracker timed it (its age keeps growing while the agent cannot ship).
    #[serde(default)]
    pub backlog_oldest_ns: Option<u64>,
    /// The part of the backlog held in the tracker's bitmap (bpf).
    #[serde(default)]
    pub backlog_in_bitmap: u64,
    /// Bytes of changes the tracker reported (or a checksum pass found),
    /// since the protection began: the disk's churn as tracked.
    #[serde(default)]
    pub churn_bytes_total: u64,
    /// Recovery points cut (confirmed by the master target) since the
    /// protection began.
    #[serde(default)]
    pub points_cut_total: u64,
    /// The newest app-consistent recovery point.
    #[serde(default)]
    pub last_app_point: Option<LastPoint>,
}

/// `STATE/kmod.catchup` (the kernel module source keeps it; see
/// ferry-sources `kmod::catchup`).
pub use ferry_sources::kmod::catchup::{Catchup, Handover, CATCHUP_KIND, CATCHUP_VERSION};

/// Paths inside the state folder.
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir { dir: dir.to_path_buf() }
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("agent.state")
    }
    pub fn chunk_map_file(&self) -> PathBuf {
        self.dir.join("chunks.map")
    }
    pub fn ring_file(&self) -> PathBuf {
        self.dir.join("ring")
    }
    /// Bitmap ranges the kernel module handed over that are not yet
    /// durable on the master target ([`Catchup`]).
    pub fn catchup_file(&self) -> PathBuf {
        self.dir.join("kmod.catchup")
    }
    /// The saved catch-up, if there is one and it is intact.
    pub fn load_catchup(&self) -> Result<Option<Catchup>, StateError> {
        read_state(&self.catchup_file(), CATCHUP_KIND, CATCHUP_VERSION)
    }
    pub fn save_catchup(&self, c: &Catchup) -> Result<(), StateError> {
        write_state(&self.catchup_file(), CATCHUP_KIND, CATCHUP_VERSION, c)
    }
    /// Forget the saved catch-up (made durable, or superseded by a resync).
    pub fn drop_catchup(&self) -> Result<(), StateError> {
        match std::fs::remove_file(self.catchup_file()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StateError::Io { path: self.catchup_file(), source: e }),
            _ => Ok(()),
        }
    }
    pub fn load(&self) -> Result<Option<AgentState>, StateError> {
        read_state(&self.state_file(), KIND, VERSION)
    }
    pub fn save(&self, s: &AgentState) -> Result<(), StateError> {
        write_state(&self.state_file(), KIND, VERSION, s)
    }
}
