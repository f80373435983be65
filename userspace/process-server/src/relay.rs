//! The relay: agents' streams into per-disk spools (the link server with
//! [`SpoolSink`] as its sink), and one forwarder thread per disk that sends
//! the spool, in order, to the master target (the link client).
//!
//! ```text
//!  agent ──► link server ──► SpoolSink::apply ─► DiskSpool (append+fdatasync) ─► ACK to the agent
//!                                 ▲                      │
//!                 POINT, SUMS ────┘                      ▼
//!                                         forwarder thread: Client ──► master target
//!                                         (ACK: segments dropped; POINT: handed back)
//! ```
//!
//! What the agent is told means: ACK, durable in the spool (it may forget
//! the change); POINT, the master target made the point durable (the spool
//! never invents one); SUMS, the master target's checksums once every frame
//! spooled before the request has been sent to it.

use crate::spool::{gen_hex, Cursor, DiskSpool, DiskState};
use ferry_link::{AnyStream, Backoff, Client, ClientConfig, Fail, LinkError, Op, OpenInfo, Sink, Sinks};
use ferry_proto::{Codec, ErrorCode, Msg, OPEN_EXISTS, OPEN_SAME_GENERATION};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an agent's OPEN may wait for the master target's answer when
/// the spool must ask it (a disk new here, a new generation): less than
/// the agent's own 30 s deadline for OPEN_ACK.
pub const ADOPT_WAIT: Duration = Duration::from_secs(25);
/// How long a checksum request may wait for the frames before it to reach
/// the master target (the agent gives up after 60 s of silence).
pub const SUMS_WAIT: Duration = Duration::from_secs(45);
/// How long a batch may wait for room in a full spool before the agent is
/// told to come back later.
pub const FULL_WAIT: Duration = Duration::from_secs(20);
/// A forwarder with nothing to send and no agent connected lets go of the
/// disk at the master target after this (so the agent may reach it
/// directly).
const IDLE_CLOSE: Duration = Duration::from_secs(2);
/// Points kept for an agent that is not connected.
const POINTS_KEPT: usize = 1024;

/// The process server's settings.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub spool: PathBuf,
    pub spool_max: u64,
    /// Master targets (or process servers), tried in order.
    pub upstreams: Vec<String>,
    /// Bandwidth towards them.
    pub limits: crate::limit::Limits,
    /// Entries of each master target's dedup index (0: no dedup).
    pub dedup_entries: usize,
}

/// How the forwarders reach upstream: TLS with this identity, or plain TCP.
pub type UpstreamTls = Option<(Arc<rustls::ClientConfig>, Arc<ferry_link::Watch>)>;

/// One upstream state, for status.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Upstream {
    pub connected: bool,
    pub addr: Option<String>,
    pub error: Option<String>,
    /// Frames sent upstream (this process).
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Bytes of disk content forwarded (DATA, REF, XREF lengths)...
    pub data_bytes: u64,
    /// ...of which went as a reference to content the master target held.
    pub dedup_bytes: u64,
    /// zstd level DATA is recompressed at (0: as the agent sent it).
    pub level: i32,
}

struct Adopt {
    id: u64,
    size: u64,
    generation: [u8; 16],
    owner: Option<String>,
}

struct SumsJob {
    after: u64,
    offset: u64,
    chunk: u32,
    count: u32,
    reply: mpsc::Sender<Result<Vec<[u8; 16]>, Fail>>,
}

#[derive(Default)]
struct Inner {
    spool: Option<DiskSpool>,
    /// An agent's connection holds the disk.
    held: bool,
    points: VecDeque<(u64, u64)>,
    sums: VecDeque<SumsJob>,
    adopt: Option<Adopt>,
    adopted: Option<(u64, Result<(), Fail>)>,
    up: Upstream,
    /// The spool was cut under an open session (the master target lost
    /// what it had acknowledged): that session must end.
    reset: Option<String>,
    /// When the oldest unsent frame was spooled.
    /// (last sequence, when) of each batch spooled and not yet wholly
    /// acknowledged by the master target: the front is the oldest change
    /// still on its way.
    unsent: VecDeque<(u64, u64)>,
    /// Why the agent's batches wait (the spool is full), while they do.
    held_back: Option<String>,
    /// The forwarder waits for the bandwidth limit.
    throttled: bool,
    /// Raw bytes the agent's DATA frames carried, and their payload bytes
    /// as spooled (the agent's compression).
    raw_in: u64,
    payload_in: u64,
    /// Bytes of disk content the agent's frames covered (DATA, ZERO, REF):
    /// the disk's churn as this hop sees it.
    content_in: u64,
    /// (when, bytes sent upstream so far): the last few seconds, for the
    /// upstream rate.
    rate_log: VecDeque<(Instant, u64)>,
}

/// One disk of the relay.
pub struct Slot {
    name: String,
    dir: PathBuf,
    m: Mutex<Inner>,
    cv: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&'a self, g: MutexGuard<'a, Inner>, t: Duration) -> MutexGuard<'a, Inner> {
        self.cv.wait_timeout(g, t).unwrap_or_else(|p| p.into_inner()).0
    }
}

/// A disk's state for `ferry status --process-server`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskView {
    pub name: String,
    /// streaming, idle, throttled, spool full, upstream down.
    pub state: String,
    /// Why, when the disk waits.
    pub why: Option<String>,
    pub spool_bytes: u64,
    /// Bytes the master target has not acknowledged yet.
    pub pending_bytes: u64,
    /// Age of the oldest change not yet acknowledged by the master target.
    pub oldest_unsent_s: Option<f64>,
    pub durable_seq: u64,
    pub upstream_acked: u64,
    /// Bytes a second sent upstream over the last few seconds.
    pub upstream_rate: u64,
    /// Raw bytes over bytes spooled, for DATA (1.0: nothing saved).
    pub compression_ratio: f64,
    /// Content forwarded over content sent as data (references to what
    /// the master target held saved the rest; 1.0: nothing saved).
    pub dedup_ratio: f64,
    pub agent_connected: bool,
    pub upstream: Upstream,
}

/// The process server's state (`ferry status --process-server`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RelayView {
    pub role: String,
    pub version: String,
    pub spool: String,
    pub spool_bytes: u64,
    pub spool_max: u64,
    pub upstreams: Vec<String>,
    pub disks: Vec<DiskView>,
}

/// The process server's disks.
pub struct Relay {
    cfg: RelayConfig,
    tls: UpstreamTls,
    disks: Mutex<HashMap<String, Arc<Slot>>>,
    next_id: AtomicU64,
    limiter: crate::limit::Limiter,
    /// Per upstream address: content the master target holds.
    indexes: Mutex<HashMap<String, Arc<crate::dedup::Index>>>,
}

impl Relay {
    /// Open the spool folder: every disk in it is checked and repaired, and
    /// its forwarder started (what it holds goes on to the master target
    /// without waiting for its agent).
    pub fn open(cfg: RelayConfig, tls: UpstreamTls) -> Result<Arc<Relay>, crate::spool::SpoolError> {
        let root = cfg.spool.join("disks");
        std::fs::create_dir_all(&root).map_err(|source| crate::spool::SpoolError::Io { path: root.display().to_string(), source })?;
        let limiter = crate::limit::Limiter::new(cfg.limits.clone());
        let relay = Arc::new(Relay {
            cfg,
            tls,
            disks: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            limiter,
            indexes: Mutex::new(HashMap::new()),
        });
        let mut entries: Vec<_> = std::fs::read_dir(&root)
            .map_err(|source| crate::spool::SpoolError::Io { path: root.display().to_string(), source })?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if !ferry_proto::valid_name(&name) {
                continue;
            }
            let sp = DiskSpool::open(&e.path())?;
            if let Some(sp) = sp {
                log::info!(
                    "spool {name}: {} segment(s), {} bytes, durable to seq {}, master target acknowledged {}",
                    sp.segs.len(),
                    sp.bytes(),
                    sp.durable(),
                    sp.state.upstream_acked
                );
                let slot = relay.slot(&name);
                slot.lock().spool = Some(sp);
                slot.cv.notify_all();
            }
        }
        let weak = Arc::downgrade(&relay);
        let _ = std::thread::Builder::new().name("dedup-save".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_secs(30));
            match weak.upgrade() {
                Some(r) => r.save_indexes(),
                None => return,
            }
        });
        Ok(relay)
    }

    fn lock_disks(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk's slot, created (with its forwarder) on first use.
    fn slot(self: &Arc<Relay>, name: &str) -> Arc<Slot> {
        let mut d = self.lock_disks();
        if let Some(s) = d.get(name) {
            return Arc::clone(s);
        }
        let slot = Arc::new(Slot {
            name: name.into(),
            dir: self.cfg.spool.join("disks").join(name),
            m: Mutex::new(Inner::default()),
            cv: Condvar::new(),
        });
        d.insert(name.into(), Arc::clone(&slot));
        let (relay, s) = (Arc::clone(self), Arc::clone(&slot));
        let spawned = std::thread::Builder::new().name(format!("fwd-{name}")).spawn(move || loop {
            // A forwarder that fails on a bug must not leave its disk
            // silently stuck: it is started again (the spool is its state).
            let (r, s2) = (Arc::clone(&relay), Arc::clone(&s));
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(r, s2))).is_ok() {
                return;
            }
            log::error!("disk {}: the forwarder failed (a bug; see the message above); starting it again", s.name);
            std::thread::sleep(Duration::from_secs(1));
        });
        if let Err(e) = spawned {
            log::error!("disk {name}: cannot start its forwarder: {e}");
        }
        slot
    }

    /// Whether `slot`'s next batch must wait for room, and why. Past 90% of
    /// `--spool-max`, the disks holding more than an equal share of it wait
    /// (the ones filling it); at 100%, every disk waits.
    fn full_for(&self, slot: &Slot) -> Option<String> {
        let slots: Vec<Arc<Slot>> = self.lock_disks().values().cloned().collect();
        let mine_pending = slot.lock().spool.as_ref().map_or(0, |sp| sp.pending_bytes());
        let (mut used, mut with_data) = (0u64, 0u64);
        for s in &slots {
            if let Some(sp) = s.lock().spool.as_ref() {
                used += sp.bytes();
                with_data += u64::from(sp.pending_bytes() > 0);
            }
        }
        let max = self.cfg.spool_max;
        let share = max / with_data.max(1);
        if used >= max {
            Some(format!("the spool is full ({used} of {max} bytes, --spool-max): disk {} waits for the master target", slot.name))
        } else if used >= max / 10 * 9 && mine_pending > share {
            Some(format!(
                "the spool is {}% full and disk {} holds {mine_pending} bytes of it, more than its share: it waits for the master target",
                used * 100 / max,
                slot.name
            ))
        } else {
            None
        }
    }

    /// The dedup index for the master target at `addr` (`None` with
    /// `--dedup-entries 0`).
    fn index_for(&self, addr: &str) -> Option<Arc<crate::dedup::Index>> {
        if self.cfg.dedup_entries == 0 {
            return None;
        }
        let mut m = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        Some(Arc::clone(m.entry(addr.to_string()).or_insert_with(|| {
            let ix = Arc::new(crate::dedup::Index::new(self.cfg.dedup_entries));
            let n = ix.load(&self.index_path(addr));
            if n > 0 {
                log::info!("dedup index for {addr}: {n} entries from the last run");
            }
            ix
        })))
    }

    /// Where the index of the master target at `addr` is saved.
    fn index_path(&self, addr: &str) -> PathBuf {
        let safe: String = addr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        self.cfg.spool.join(format!("dedup-{safe}.idx"))
    }

    /// Save every index (every 30 s from a thread started at open), so a
    /// restart keeps what the master targets hold.
    fn save_indexes(&self) {
        let all: Vec<(String, Arc<crate::dedup::Index>)> =
            self.indexes.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(a, i)| (a.clone(), Arc::clone(i))).collect();
        for (addr, ix) in all {
            if let Err(e) = ix.save(&self.index_path(&addr)) {
                log::warn!("dedup index for {addr}: not saved: {e}");
            }
        }
    }

    /// Every disk's state.
    pub fn view(&self) -> RelayView {
        let mut slots: Vec<Arc<Slot>> = self.lock_disks().values().cloned().collect();
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        let now = ferry_common::now_ns();
        let disks: Vec<DiskView> = slots
            .iter()
            .filter_map(|s| {
                let g = s.lock();
                let sp = g.spool.as_ref()?;
                let pending = sp.durable() > sp.state.upstream_acked;
                let (state, why) = if let Some(w) = &g.held_back {
                    ("spool full", Some(w.clone()))
                } else if pending && !g.up.connected {
                    ("upstream down", g.up.error.clone())
                } else if g.throttled {
                    ("throttled", Some("waiting for the bandwidth limit".to_string()))
                } else if pending {
                    ("streaming", None)
                } else {
                    ("idle", None)
                };
                Some(DiskView {
                    name: s.name.clone(),
                    state: state.into(),
                    why,
                    spool_bytes: sp.bytes(),
                    pending_bytes: sp.pending_bytes(),
                    oldest_unsent_s: g.unsent.front().filter(|_| pending).map(|&(_, t)| now.saturating_sub(t) as f64 / 1e9),
                    durable_seq: sp.durable(),
                    upstream_acked: sp.state.upstream_acked,
                    upstream_rate: rate_of(&g.rate_log),
                    compression_ratio: if g.payload_in > 0 { g.raw_in as f64 / g.payload_in as f64 } else { 1.0 },
                    // (A disk sent wholly as references counts its one
                    // smallest unit as data, not a division by zero.)
                    dedup_ratio: if g.up.data_bytes > 0 {
                        g.up.data_bytes as f64 / (g.up.data_bytes - g.up.dedup_bytes).max(4096) as f64
                    } else {
                        1.0
                    },
                    agent_connected: g.held,
                    upstream: g.up.clone(),
                })
            })
            .collect();
        RelayView {
            role: "process-server".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            spool: self.cfg.spool.display().to_string(),
            spool_bytes: disks.iter().map(|d| d.spool_bytes).sum(),
            spool_max: self.cfg.spool_max,
            upstreams: self.cfg.upstreams.clone(),
            disks,
        }
    }

    /// The process server's [`RoleReport`] (its /metrics and heartbeat),
    /// from [`Relay::view`]: the spool's use and, per disk, its state, the
    /// bytes the master target has not acknowledged (backlog), the age of
    /// the oldest of them (lag; 0 with none), the bytes sent upstream and
    /// the disk content its agent's frames covered (churn), both since this process
    /// started. `name` is the host name; a caller with an identity puts
    /// its name (and `cert_expires_unix`).
    /// Per-disk bandwidth from the configuration server's policies.
    pub fn set_policy_rates(&self, rates: std::collections::HashMap<String, f64>) {
        self.limiter.set_policy_rates(rates);
    }

    pub fn report(&self) -> ferry_common::report::RoleReport {
        use ferry_common::report::{DiskReport, RoleReport};
        let v = self.view();
        // (The disks' lock is let go before a slot's is taken, as view() does.)
        let slots: Vec<Arc<Slot>> = self.lock_disks().values().cloned().collect();
        let raw: HashMap<String, u64> = slots.iter().map(|s| (s.name.clone(), s.lock().content_in)).collect();
        let mut r = RoleReport::new("process-server");
        r.spool_bytes = Some(v.spool_bytes);
        r.spool_max_bytes = Some(v.spool_max);
        r.disks = v
            .disks
            .into_iter()
            .map(|d| DiskReport {
                churn_bytes_total: raw.get(&d.name).copied().unwrap_or(0),
                name: d.name,
                state: d.state,
                reason: d.why,
                lag_ms: Some(d.oldest_unsent_s.map_or(0, |s| (s * 1000.0) as u64)),
                backlog_bytes: Some(d.pending_bytes),
                sent_bytes_total: d.upstream.bytes_sent,
                ..Default::default()
            })
            .collect();
        r
    }

    /// Connect to the first upstream that answers and open the disk there.
    fn connect_upstream(
        &self,
        name: &str,
        size: u64,
        generation: [u8; 16],
        owner: Option<&str>,
    ) -> Result<(Client<AnyStream>, String), (Fail, String)> {
        let mut last = (Fail::new(ErrorCode::Busy, "no upstream given"), String::new());
        for addr in &self.cfg.upstreams {
            match open_one(addr, &self.tls, name, size, generation, owner) {
                Ok(c) => return Ok((c, addr.clone())),
                Err(e) => {
                    let f = match e {
                        LinkError::Refused { code, msg } => Fail::new(code, format!("the master target at {addr}: {msg}")),
                        e => Fail::new(ErrorCode::Busy, format!("the master target at {addr}: {e}")),
                    };
                    let refused = f.code != ErrorCode::Busy;
                    last = (f, addr.clone());
                    if refused {
                        // A refusal is an answer, not an absence.
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

fn open_one(
    addr: &str,
    tls: &UpstreamTls,
    name: &str,
    size: u64,
    generation: [u8; 16],
    owner: Option<&str>,
) -> Result<Client<AnyStream>, LinkError> {
    let tcp = ferry_link::connect_tcp(addr, ferry_link::client::CONNECT_TIMEOUT)?;
    let sock = match tls {
        None => AnyStream::Tcp(tcp),
        Some((config, watch)) => {
            let t = ferry_link::TlsStream::connect(tcp, config.clone(), ferry_link::client::CONNECT_TIMEOUT)
                .map_err(|e| LinkError::Handshake { why: format!("{addr}: TLS handshake: {e}"), source: None })?;
            watch.add(&t);
            AnyStream::Tls(t)
        }
    };
    // The HELLO name carries whom the stream is for: a master target that
    // sees a process server's certificate binds the disk to that agent.
    let peer = match owner {
        Some(o) => format!("ferry-process-server {} for {o}", env!("CARGO_PKG_VERSION")),
        None => format!("ferry-process-server {}", env!("CARGO_PKG_VERSION")),
    };
    let mut cfg = ClientConfig::new(peer);
    // A relay keeps more in flight than an agent: its spool, not the
    // window, bounds what a broken connection costs (it is resent from
    // the spool), and a longer pipeline hides the master target's batch
    // latency.
    cfg.min_window = 32 << 20;
    cfg.server = format!("the master target at {addr}");
    Client::open(sock, cfg, name, size, generation)
}

/// Bytes a second over the samples (the last few seconds).
fn rate_of(log: &VecDeque<(Instant, u64)>) -> u64 {
    match (log.front(), log.back()) {
        (Some(_), Some(&(t1, _))) if t1.elapsed() > Duration::from_secs(5) => 0,
        (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => ((b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64()) as u64,
        _ => 0,
    }
}

fn info_of(flags: u32) -> OpenInfo {
    OpenInfo { existed: flags & OPEN_EXISTS != 0, same_generation: flags & OPEN_SAME_GENERATION != 0 }
}

/// The link server's view of the relay: opens a disk's spool for an agent.
pub struct Spools(pub Arc<Relay>);

impl Sinks for Spools {
    type Sink = SpoolSink;

    fn open(
        &self,
        peer: &str,
        who: Option<&ferry_identity::Identity>,
        name: &str,
        size: u64,
        generation: [u8; 16],
    ) -> Result<(SpoolSink, OpenInfo), Fail> {
        if !ferry_proto::valid_name(name) {
            return Err(Fail::new(ErrorCode::Refused, format!("disk name {name:?}: expected 1-64 of A-Z a-z 0-9 . _ -")));
        }
        if let Some(w) = who.filter(|w| !matches!(w.role, ferry_identity::Role::Agent | ferry_identity::Role::ProcessServer)) {
            return Err(Fail::new(ErrorCode::Refused, format!("{} may not write disks through this process server", w.label())));
        }
        let owner = who.map(|w| w.label());
        let relay = &self.0;
        let slot = relay.slot(name);
        let mut g = slot.lock();
        if g.held {
            return Err(Fail::new(ErrorCode::Busy, format!("disk {name} is open on another connection to this process server")));
        }
        if let (Some(sp), Some(w)) = (g.spool.as_ref(), owner.as_deref()) {
            if let Some(o) = sp.state.owner.as_deref().filter(|o| *o != w) {
                return Err(Fail::new(ErrorCode::Refused, format!("disk {name} belongs to {o} here, not to {w}")));
            }
        }
        let same = g.spool.as_ref().is_some_and(|sp| sp.generation() == generation);
        if let Some(sp) = g.spool.as_ref().filter(|_| same) {
            if sp.state.size != size {
                return Err(Fail::new(
                    ErrorCode::SizeChanged,
                    format!("disk {name} was {} bytes, now {size}: start a new protection", sp.state.size),
                ));
            }
        }
        // A disk new here, a new generation, or a spool whose forwarder is
        // not connected: ask the master target now (its durable sequence
        // may have moved past the spool while the agent went direct).
        if !same || !g.up.connected {
            let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
            g.adopt = Some(Adopt { id, size, generation, owner: owner.clone() });
            slot.cv.notify_all();
            let until = Instant::now() + ADOPT_WAIT;
            let answer = loop {
                if let Some((i, _)) = &g.adopted {
                    if *i == id {
                        break g.adopted.take().map(|(_, r)| r);
                    }
                }
                if Instant::now() >= until {
                    break None;
                }
                g = slot.wait(g, Duration::from_millis(100));
            };
            match answer {
                Some(Ok(())) => {}
                // Known here and the master target out of reach: the spool
                // answers for it (that is what it is for).
                Some(Err(f)) if same && f.code == ErrorCode::Busy => log::info!("disk {name}: {}; answering from the spool", f.msg),
                Some(Err(f)) => return Err(f),
                None if same => log::info!("disk {name}: the master target did not answer in time; answering from the spool"),
                None => {
                    g.adopt = None;
                    return Err(Fail::new(
                        ErrorCode::Busy,
                        format!("disk {name}: the master target did not answer within {}s", ADOPT_WAIT.as_secs()),
                    ));
                }
            }
        }
        let Some(sp) = g.spool.as_mut() else {
            return Err(Fail::new(ErrorCode::Busy, format!("disk {name}: not open at the master target yet")));
        };
        if sp.state.owner.is_none() && owner.is_some() {
            sp.state.owner = owner.clone();
            sp.save_state().map_err(|e| Fail::new(ErrorCode::Internal, e.to_string()))?;
        }
        // Once this generation holds anything beyond what the master target
        // had, the next hop (spool and master target) holds this generation.
        let flags = if sp.durable() > sp.state.base_seq { OPEN_EXISTS | OPEN_SAME_GENERATION } else { sp.state.flags };
        let durable = sp.durable();
        g.held = true;
        g.reset = None;
        drop(g);
        log::info!("disk {name}: stream opened by {peer}, {size} bytes, durable to seq {durable}");
        let xref_ok = who.is_some_and(|w| w.role == ferry_identity::Role::ProcessServer);
        Ok((SpoolSink { relay: Arc::clone(relay), slot, size, durable, xref_ok }, info_of(flags)))
    }

    fn status(&self, _who: Option<&ferry_identity::Identity>) -> Option<String> {
        serde_json::to_string(&self.0.view()).ok()
    }
}

/// One agent's stream into a disk's spool.
pub struct SpoolSink {
    relay: Arc<Relay>,
    slot: Arc<Slot>,
    size: u64,
    durable: u64,
    /// The peer is a process server (XREF is a relay's, never an agent's).
    xref_ok: bool,
}

impl Drop for SpoolSink {
    fn drop(&mut self) {
        self.slot.lock().held = false;
        self.slot.cv.notify_all();
    }
}

impl SpoolSink {
    fn check_reset(&self, g: &Inner) -> Result<(), Fail> {
        match &g.reset {
            Some(why) => Err(Fail::new(ErrorCode::Busy, format!("disk {}: {why}; reconnect", self.slot.name))),
            None => Ok(()),
        }
    }
}

impl Sink for SpoolSink {
    fn size(&self) -> u64 {
        self.size
    }

    fn durable_seq(&self) -> u64 {
        self.durable
    }

    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<(u64, u64)>, Fail> {
        let until = Instant::now() + FULL_WAIT;
        while let Some(why) = self.relay.full_for(&self.slot) {
            if Instant::now() >= until {
                self.slot.lock().held_back = None;
                return Err(Fail::new(ErrorCode::Busy, format!("{why}; retry later (nothing is lost: the agent keeps its changes)")));
            }
            {
                let mut g = self.slot.lock();
                if g.held_back.is_none() {
                    log::warn!("disk {}: {why}", self.slot.name);
                }
                g.held_back = Some(why);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (mut raw, mut payload) = (0u64, 0u64);
        let content: u64 = ops.iter().filter_map(Op::range).map(|(a, b)| b - a).sum();
        for op in &ops {
            if let Op::Data { len, payload: p, .. } = op {
                raw += u64::from(*len);
                payload += p.len() as u64;
            }
        }
        let mut g = self.slot.lock();
        g.held_back = None;
        self.check_reset(&g)?;
        let sp = g.spool.as_mut().ok_or_else(|| Fail::new(ErrorCode::Internal, "the spool is gone"))?;
        sp.append(ops).map_err(|e| Fail::new(ErrorCode::Internal, e.to_string()))?;
        self.durable = sp.durable();
        g.raw_in += raw;
        g.content_in += content;
        g.payload_in += payload;
        let d = self.durable;
        if g.unsent.len() >= 1 << 16 {
            // Bounded: merge into the newest entry (ages read a little young).
            g.unsent.pop_back();
        }
        g.unsent.push_back((d, ferry_common::now_ns()));
        drop(g);
        self.slot.cv.notify_all();
        Ok(Vec::new())
    }

    fn resolve_ref(&mut self, _src: u64, _len: u32, _digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail> {
        // keeps_frames: REF goes on to the master target, which checks it.
        Ok(None)
    }

    fn sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<Vec<[u8; 16]>, Fail> {
        let (tx, rx) = mpsc::channel();
        {
            let mut g = self.slot.lock();
            self.check_reset(&g)?;
            g.sums.push_back(SumsJob { after: self.durable, offset, chunk, count, reply: tx });
        }
        self.slot.cv.notify_all();
        match rx.recv_timeout(SUMS_WAIT) {
            Ok(r) => r,
            Err(_) => Err(Fail::new(
                ErrorCode::Busy,
                format!(
                    "disk {}: checksums wait for the spooled frames before them to reach the master target, which took over {}s; retry",
                    self.slot.name,
                    SUMS_WAIT.as_secs()
                ),
            )),
        }
    }

    fn tick(&self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }

    fn late_points(&mut self) -> Result<Vec<(u64, u64)>, Fail> {
        let mut g = self.slot.lock();
        self.check_reset(&g)?;
        Ok(g.points.drain(..).collect())
    }

    fn keeps_frames(&self) -> bool {
        true
    }

    fn accepts_xref(&self) -> bool {
        self.xref_ok
    }
}

/// One disk's forwarder: keeps a connection to the master target while
/// there is something to send or an agent connected, sends the spool in
/// order, drops what the master target acknowledged, passes points back,
/// answers checksum requests in order, and re-opens the disk upstream when
/// an agent brings a new generation.
fn forward(relay: Arc<Relay>, slot: Arc<Slot>) {
    let name = slot.name.clone();
    let mut client: Option<Client<AnyStream>> = None;
    let mut f = Fwd::new();
    let mut backoff = Backoff::default();
    loop {
        // An agent's OPEN asks for the disk at the master target.
        let adopt = slot.lock().adopt.take();
        if let Some(a) = adopt {
            if let Some(c) = client.take() {
                c.close();
                f.broken(&name, false);
            }
            let r = relay.connect_upstream(&name, a.size, a.generation, a.owner.as_deref());
            let mut g = slot.lock();
            match r {
                Ok((c, addr)) => {
                    let o = c.opened();
                    let same = g.spool.as_ref().is_some_and(|sp| sp.generation() == a.generation && sp.state.size == a.size);
                    if !same {
                        if let Some(old) = g.spool.as_ref() {
                            if old.pending_bytes() > 0 {
                                log::warn!(
                                    "disk {name}: a new protection (generation) replaces {} spooled bytes of the old one; its agent resyncs",
                                    old.pending_bytes()
                                );
                            }
                        }
                        let st = DiskState {
                            name: name.clone(),
                            size: a.size,
                            generation: gen_hex(&a.generation),
                            flags: o.flags,
                            base_seq: o.durable_seq,
                            upstream_acked: o.durable_seq,
                            owner: a.owner.clone(),
                        };
                        f.epoch += 1;
                        match DiskSpool::create(&slot.dir, st, f.epoch) {
                            Ok(sp) => g.spool = Some(sp),
                            Err(e) => {
                                g.adopted = Some((a.id, Err(Fail::new(ErrorCode::Internal, e.to_string()))));
                                slot.cv.notify_all();
                                continue;
                            }
                        }
                    }
                    let res = after_open(&name, &mut g, o.durable_seq, &mut f.cur);
                    g.up.connected = true;
                    g.up.error = None;
                    g.adopted = Some((a.id, res));
                    f.connected(&relay, &addr);
                    g.up.addr = Some(addr);
                    client = Some(c);
                    backoff.reset();
                }
                Err((fail, addr)) => {
                    g.up.connected = false;
                    g.up.addr = Some(addr);
                    g.up.error = Some(fail.msg.clone());
                    g.adopted = Some((a.id, Err(fail)));
                }
            }
            drop(g);
            slot.cv.notify_all();
            f.idle_since = Instant::now();
            continue;
        }
        let Some(c) = client.as_mut() else {
            // Not connected: connect when there is something to send, a
            // waiting checksum request, or an agent connected.
            let g = slot.lock();
            let want =
                g.spool.as_ref().map(|sp| (sp.state.size, sp.generation(), sp.state.owner.clone(), sp.durable() > sp.state.upstream_acked));
            let need = match &want {
                Some((_, _, _, pending)) => *pending || g.held || !g.sums.is_empty(),
                None => false,
            };
            if !need {
                drop(slot.wait(g, Duration::from_millis(500)));
                continue;
            }
            drop(g);
            let (size, generation, owner, _) = want.expect("checked");
            match relay.connect_upstream(&name, size, generation, owner.as_deref()) {
                Ok((c, addr)) => {
                    let o = c.opened();
                    let mut g = slot.lock();
                    if g.spool.as_ref().is_some_and(|sp| sp.generation() == generation) {
                        if let Err(e) = after_open(&name, &mut g, o.durable_seq, &mut f.cur) {
                            // Not forwarding from a position we could not settle.
                            log::error!("disk {name}: {}; reconnecting", e.msg);
                            g.up.error = Some(e.msg);
                            drop(g);
                            c.close();
                            std::thread::sleep(backoff.next_delay());
                            continue;
                        }
                    }
                    g.up.connected = true;
                    g.up.addr = Some(addr.clone());
                    g.up.error = None;
                    drop(g);
                    log::info!("disk {name}: forwarding to the master target at {addr} (durable there to seq {})", o.durable_seq);
                    f.connected(&relay, &addr);
                    client = Some(c);
                    backoff.reset();
                    f.idle_since = Instant::now();
                }
                Err((fail, addr)) => {
                    let delay = backoff.next_delay();
                    let mut g = slot.lock();
                    if g.up.error.as_deref() != Some(fail.msg.as_str()) {
                        log::warn!("disk {name}: {}; retrying", fail.msg);
                    }
                    g.up.connected = false;
                    g.up.addr = Some(addr);
                    g.up.error = Some(fail.msg);
                    // A checksum request cannot be answered now: say so at
                    // once rather than at its deadline.
                    for j in g.sums.drain(..) {
                        let _ = j
                            .reply
                            .send(Err(Fail::new(ErrorCode::Busy, format!("disk {name}: the master target is not reachable; retry"))));
                    }
                    drop(slot.wait(g, delay));
                }
            }
            continue;
        };
        match pump(&relay, &slot, c, &mut f) {
            Ok(true) => {}
            Ok(false) => {
                // Idle with no agent: let go of the disk upstream.
                if let Some(c) = client.take() {
                    c.close();
                    f.broken(&name, false);
                }
                slot.lock().up.connected = false;
            }
            Err(e) => {
                let msg = e.to_string();
                log::warn!("disk {name}: upstream: {msg}; reconnecting");
                f.broken(&name, matches!(e, LinkError::Refused { code: ErrorCode::RefMiss, .. }));
                if let Some(c) = client.take() {
                    c.close();
                }
                let mut g = slot.lock();
                g.up.connected = false;
                g.up.error = Some(msg);
                let delay = backoff.next_delay();
                drop(slot.wait(g, delay));
            }
        }
    }
}

/// A forwarder's own state between frames.
struct Fwd {
    cur: Cursor,
    epoch: u64,
    idle_since: Instant,
    /// The dedup index of the master target connected to.
    index: Option<Arc<crate::dedup::Index>>,
    /// (seq, digest) of references sent and not yet acknowledged.
    refs: VecDeque<(u64, [u8; 32])>,
    /// After a reference miss: no references up to this sequence.
    no_refs_until: u64,
    /// zstd level for DATA the agent compressed (0: as it came).
    level: i32,
    /// The master target is not on a loopback address.
    remote: bool,
    /// This second's time waiting on the link, and in all.
    busy: (Duration, Duration),
    since: Instant,
}

impl Fwd {
    fn new() -> Fwd {
        Fwd {
            cur: Cursor::default(),
            epoch: 0,
            idle_since: Instant::now(),
            index: None,
            refs: VecDeque::new(),
            no_refs_until: 0,
            level: 0,
            remote: false,
            busy: (Duration::ZERO, Duration::ZERO),
            since: Instant::now(),
        }
    }

    fn connected(&mut self, relay: &Relay, addr: &str) {
        self.index = relay.index_for(addr);
        self.remote = ferry_common::net::resolve("upstream", addr, false).map_or(true, |a| a.iter().any(|x| !x.ip().is_loopback()));
        self.refs.clear();
    }

    /// The stream broke: what was pending may not be there; after a
    /// reference miss the references in flight are wrong, and the frames
    /// up to them go as DATA.
    fn broken(&mut self, disk: &str, ref_miss: bool) {
        let digests: Vec<[u8; 32]> = if ref_miss { self.refs.iter().map(|&(_, d)| d).collect() } else { Vec::new() };
        if ref_miss {
            self.no_refs_until = self.refs.back().map_or(self.no_refs_until, |&(s, _)| s.max(self.no_refs_until));
            log::warn!("disk {disk}: the master target missed a reference: those frames go again as data");
        }
        if let Some(ix) = &self.index {
            ix.drop_pending(disk, &digests);
        }
        self.refs.clear();
    }

    fn note_time(&mut self, waiting: Duration, all: Duration) {
        self.busy.0 += waiting;
        self.busy.1 += all;
        if self.since.elapsed() < Duration::from_secs(1) {
            return;
        }
        let frac = if self.busy.1.is_zero() { 0.0 } else { self.busy.0.as_secs_f64() / self.busy.1.as_secs_f64() };
        // The link, not this machine, is the limit: squeeze harder.
        if frac > 0.5 {
            self.level = (self.level + 2).min(MAX_LEVEL);
        } else if frac < 0.1 {
            self.level = (self.level - 2).max(0);
        }
        self.busy = (Duration::ZERO, Duration::ZERO);
        self.since = Instant::now();
    }

    /// What to send for a spooled frame: a reference when the master target
    /// holds the content, else the frame (recompressed when the link is the
    /// limit). Returns (frame, content bytes, bytes sent as a reference).
    fn prepare(&mut self, disk: &str, m: Msg, xref: bool) -> (Msg, u64, u64) {
        use crate::dedup::{Hit, MIN_DEDUP};
        let Some(ix) = self.index.clone() else { return (m, 0, 0) };
        match m {
            Msg::Data { seq, offset, len, codec, payload } => {
                let raw = match codec {
                    Codec::Raw => None,
                    Codec::Zstd => match ferry_proto::decompress(codec, &payload, len) {
                        Ok(r) => Some(r),
                        // Checked when spooled; send it as it is.
                        Err(_) => return (Msg::Data { seq, offset, len, codec, payload }, u64::from(len), 0),
                    },
                };
                let bytes: &[u8] = raw.as_deref().unwrap_or(&payload);
                if len < MIN_DEDUP {
                    ix.forget_range(disk, offset, len);
                    return (Msg::Data { seq, offset, len, codec, payload }, u64::from(len), 0);
                }
                let digest = *blake3::hash(bytes).as_bytes();
                let hit = if seq <= self.no_refs_until { Hit::Miss } else { ix.lookup(disk, &digest) };
                match hit {
                    Hit::At(loc) if loc.disk == disk || xref => {
                        ix.forget_range(disk, offset, len);
                        self.refs.push_back((seq, digest));
                        let m = if loc.disk == disk {
                            Msg::Ref { seq, offset, len, src: loc.offset, digest }
                        } else {
                            Msg::XRef { seq, offset, len, src: loc.offset, digest, disk: loc.disk }
                        };
                        (m, u64::from(len), u64::from(len))
                    }
                    _ => {
                        ix.sent(disk, seq, offset, len, digest);
                        let m = match (raw, self.level) {
                            (Some(r), l) if l > 0 => match zstd::bulk::compress(&r, l) {
                                Ok(z) if z.len() < payload.len() => Msg::Data { seq, offset, len, codec: Codec::Zstd, payload: z },
                                _ => Msg::Data { seq, offset, len, codec, payload },
                            },
                            _ => Msg::Data { seq, offset, len, codec, payload },
                        };
                        (m, u64::from(len), 0)
                    }
                }
            }
            m @ (Msg::Zero { .. } | Msg::Discard { .. } | Msg::Ref { .. } | Msg::XRef { .. }) => {
                let (offset, len) = match &m {
                    Msg::Zero { offset, len, .. }
                    | Msg::Discard { offset, len, .. }
                    | Msg::Ref { offset, len, .. }
                    | Msg::XRef { offset, len, .. } => (*offset, *len),
                    _ => unreachable!("matched above"),
                };
                ix.forget_range(disk, offset, len);
                let d = if matches!(m, Msg::Ref { .. } | Msg::XRef { .. }) { u64::from(len) } else { 0 };
                (m, d, 0)
            }
            m => (m, 0, 0),
        }
    }
}

/// Highest zstd level the forwarders use when the link is the limit.
const MAX_LEVEL: i32 = 6;

/// The master target reported `durable` at OPEN: drop what it holds, and
/// start reading after it. If it holds less than it acknowledged before
/// (its folder was restored or lost), the spool cannot fill the hole: the
/// spool is emptied down to it, and the agent's open session ends so that
/// it reconnects, sees the lower durable sequence, and resyncs.
fn after_open(name: &str, g: &mut Inner, durable: u64, cur: &mut Cursor) -> Result<(), Fail> {
    // Whatever follows, this connection starts after what the master target
    // holds: never after what an earlier connection merely sent.
    *cur = Cursor { after: durable, at: None };
    let Some(sp) = g.spool.as_mut() else { return Ok(()) };
    if durable < sp.state.upstream_acked {
        let why = format!("the master target is durable only to seq {durable} but had acknowledged {}", sp.state.upstream_acked);
        log::error!("disk {name}: {why}: the spool restarts there and the agent resyncs");
        let mut st = sp.state.clone();
        st.base_seq = durable;
        st.upstream_acked = durable;
        let epoch = sp.epoch + 1;
        let dir = sp.dir.clone();
        let fresh = DiskSpool::create(&dir, st, epoch).map_err(|e| Fail::new(ErrorCode::Internal, e.to_string()))?;
        g.spool = Some(fresh);
        g.reset = Some(why);
    } else {
        sp.release(durable).map_err(|e| Fail::new(ErrorCode::Internal, e.to_string()))?;
    }
    Ok(())
}

/// Forward while connected: `Ok(false)` once idle with no agent for
/// [`IDLE_CLOSE`]; `Err` when the connection failed.
fn pump(relay: &Relay, slot: &Slot, c: &mut Client<AnyStream>, f: &mut Fwd) -> Result<bool, LinkError> {
    loop {
        let acked = c.acked();
        let points = c.take_points();
        if let Some(ix) = &f.index {
            ix.acked(&slot.name, acked);
        }
        while f.refs.front().is_some_and(|&(s, _)| s <= acked) {
            f.refs.pop_front();
        }
        let mut g = slot.lock();
        if g.adopt.is_some() {
            return Ok(true);
        }
        if !points.is_empty() {
            for p in points {
                if g.points.len() >= POINTS_KEPT {
                    g.points.pop_front();
                }
                g.points.push_back(p);
            }
            slot.cv.notify_all();
        }
        let Some(sp) = g.spool.as_mut() else { return Ok(true) };
        if sp.epoch != f.epoch {
            f.epoch = sp.epoch;
            f.cur = Cursor { after: sp.state.upstream_acked, at: None };
        }
        if acked > sp.state.upstream_acked {
            if let Err(e) = sp.release(acked) {
                log::error!("disk {}: {e}", slot.name);
            }
        }
        let (all_acked, up_acked) = (sp.durable() <= sp.state.upstream_acked, sp.state.upstream_acked);
        while g.unsent.front().is_some_and(|&(q, _)| q <= up_acked) {
            g.unsent.pop_front();
        }
        // A checksum request goes out once every frame spooled before it
        // has been sent.
        let job = match g.sums.front() {
            Some(j) if j.after <= f.cur.after || g.spool.as_ref().is_some_and(|sp| j.after <= sp.state.upstream_acked) => {
                g.sums.pop_front()
            }
            _ => None,
        };
        if let Some(j) = job {
            drop(g);
            let r = c.request_sums(j.offset, j.chunk, j.count).and_then(|req| c.recv_sums(req, j.offset, j.count as usize));
            match r {
                Ok(s) => {
                    let _ = j.reply.send(Ok(s));
                }
                Err(e) => {
                    let _ = j.reply.send(Err(Fail::new(ErrorCode::Busy, format!("the master target: {e}"))));
                    return Err(e);
                }
            }
            continue;
        }
        let sp = g.spool.as_ref().expect("checked");
        let plan = sp.plan_read(&f.cur);
        let floor = plan.as_ref().and_then(|p| sp.segs.iter().find(|s| s.path == p.0).map(|s| s.floor)).unwrap_or(0);
        let held = g.held;
        if plan.is_none() {
            relay.limiter.idle(&slot.name);
            if !held && all_acked && g.sums.is_empty() && f.idle_since.elapsed() >= IDLE_CLOSE {
                return Ok(false);
            }
            // Never a socket write under the slot's lock (a stalled master
            // target would stall the agent's connection and the status).
            drop(g);
            c.flush()?;
            c.check_alive()?;
            let g = slot.lock();
            if g.spool.as_ref().is_some_and(|sp| sp.plan_read(&f.cur).is_none()) && g.adopt.is_none() && g.sums.is_empty() {
                drop(slot.wait(g, Duration::from_millis(50)));
            }
            continue;
        }
        drop(g);
        f.idle_since = Instant::now();
        let msgs = crate::spool::read_planned(plan.expect("checked"), floor, &mut f.cur, 4 << 20)
            .map_err(|e| LinkError::Lost { why: format!("reading the spool: {e}"), source: None })?;
        let (mut n, before) = (0u64, c.bytes_sent());
        let (mut data, mut saved) = (0u64, 0u64);
        let xref = c.opened().version >= 3;
        for m in msgs {
            let t0 = Instant::now();
            let (m, d, sv) = f.prepare(&slot.name, m, xref);
            data += d;
            saved += sv;
            let waited = relay.limiter.take(&slot.name, crate::spool::frame_len(&m));
            let throttled = waited > Duration::from_millis(10);
            {
                let mut g = slot.lock();
                if g.throttled != throttled {
                    g.throttled = throttled;
                }
            }
            let t1 = Instant::now();
            c.send(&m)?;
            // Time waiting on the link (the limit; the window too when the
            // master target is not on this machine, where a full window
            // means a slow link rather than a busy CPU) against the time
            // spent here: what sets the compression level.
            let window = if f.remote { t1.elapsed() } else { Duration::ZERO };
            f.note_time(waited + window, t0.elapsed());
            n += 1;
        }
        let sent = c.bytes_sent() - before;
        let mut g = slot.lock();
        g.up.frames_sent += n;
        g.up.bytes_sent += sent;
        g.up.data_bytes += data;
        g.up.dedup_bytes += saved;
        g.up.level = f.level;
        let (now, total) = (Instant::now(), g.up.bytes_sent);
        g.rate_log.push_back((now, total));
        while g.rate_log.front().is_some_and(|&(t, _)| now.duration_since(t) > Duration::from_secs(5)) {
            g.rate_log.pop_front();
        }
    }
}
