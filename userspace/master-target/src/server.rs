//! The master target's replication service: the link layer's accept loop
//! and server state machine (`ferry_link`: handshake, batching,
//! acknowledgements, deadlines) with the master target's disk as the sink.
//! This module holds only what is the master target's own: the listening
//! policy, its limits, and [`DiskSink`], the `Sink` that applies a stream to
//! a disk folder (`Disk::apply`: durable batches, then ACK).

use crate::store::disk::{self, Disk};
use crate::store::DiskError;
use ferry_identity::enroll::Held;
use ferry_identity::tls::{self, PeerVerifier};
use ferry_identity::Role;
use ferry_link::accept::{self, Service};
use ferry_link::server::{ServerConfig, HANDSHAKE_TIMEOUT, WRITE_TIMEOUT};
use ferry_link::{Fail, Op, OpenInfo, Sink, Sinks};
use ferry_proto::{write_msg, ErrorCode, Msg};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use ferry_link::server::IDLE_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listening on {0} needs authentication: give --identity DIR (enroll first: `ferry enroll --server ADDR --token TOKEN --identity DIR`), or listen on 127.0.0.1 or ::1")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("data folder {path}: {source}")]
    Data { path: String, source: io::Error },
}

/// The code a client is told for a disk error.
fn fail(e: DiskError) -> Fail {
    let code = match e {
        DiskError::Busy(_) => ErrorCode::Busy,
        DiskError::SizeChanged { .. } => ErrorCode::SizeChanged,
        DiskError::FailedOver { .. } => ErrorCode::FailedOver,
        DiskError::FailedOverCommitted { .. } => ErrorCode::Refused,
        _ => ErrorCode::Internal,
    };
    Fail::new(code, e.to_string())
}

/// Bind the listener; a non-loopback address only with authentication
/// (`authenticated`: the service runs mutual TLS).
pub fn bind(addr: SocketAddr, data: &Path, authenticated: bool) -> Result<TcpListener, ServeError> {
    if !authenticated && ferry_common::net::check_listen("listen", addr).is_err() {
        return Err(ServeError::NotLoopback(addr));
    }
    std::fs::create_dir_all(data).map_err(|source| ServeError::Data { path: data.display().to_string(), source })?;
    TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })
}

/// The listener's limits (`master-target --idle-timeout`, `--max-connections`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A v2 stream silent this long (no frame, not even a PING) is dropped
    /// and its disk released. Agents ping after 10 s of silence.
    pub idle: Duration,
    /// Connections served at once; more are refused (busy) at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { idle: IDLE_TIMEOUT, max_connections: 1024 }
    }
}

/// What the running server knows of its disks beyond their folders: the
/// streams open on each and the bytes applied since it started (for
/// [`crate::ops::report`]).
#[derive(Default)]
pub struct Live {
    disks: Mutex<HashMap<String, LiveDisk>>,
}

/// One disk in [`Live`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveDisk {
    /// Streams writing it now (0 or 1: the writer lock).
    pub streams: u32,
    /// Bytes of the disk written by applied batches (writes and zeroed
    /// ranges), since this process started: the disk's churn as applied.
    pub applied_bytes: u64,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, LiveDisk>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk as the server sees it (all zero for one it has not served).
    pub fn disk(&self, name: &str) -> LiveDisk {
        self.lock().get(name).copied().unwrap_or_default()
    }
}

/// Serve forever, with the default limits.
pub fn serve(listener: TcpListener, data: &Path) -> io::Result<()> {
    serve_with(listener, data, Limits::default(), None)
}

/// Serve forever: one thread per connection, at most `limits.max_connections`;
/// with an identity, every connection is mutual TLS from an agent or a
/// process server of the same CA (docs/security.md).
pub fn serve_with(listener: TcpListener, data: &Path, limits: Limits, identity: Option<Held>) -> io::Result<()> {
    serve_live(listener, data, limits, identity, Arc::new(Live::default()))
}

/// [`serve_with`], keeping what it serves in `live` (the handle its
/// /metrics reads: [`crate::ops::report`]).
pub fn serve_live(listener: TcpListener, data: &Path, limits: Limits, identity: Option<Held>, live: Arc<Live>) -> io::Result<()> {
    let mut cfg = ServerConfig::new(format!("ferry-master-target {}", env!("CARGO_PKG_VERSION")));
    cfg.role = "this master target".into();
    cfg.idle = limits.idle;
    let tls = match identity {
        Some(held) => {
            let v = PeerVerifier::new(held.trust.clone(), &[Role::Agent, Role::ProcessServer], true);
            let config = tls::server_config(held.creds.clone(), v).map_err(io::Error::other)?;
            let watch = ferry_link::Watch::start(held.trust.clone());
            held.keep_fresh(Duration::from_secs(5));
            Some((config, watch))
        }
        None => None,
    };
    let require_identity = tls.is_some();
    let service = Replication { disks: Disks { data: data.to_path_buf(), require_identity, live }, cfg, tls };
    let limits = accept::Limits { max_connections: limits.max_connections, handshake: HANDSHAKE_TIMEOUT, write: WRITE_TIMEOUT };
    accept::serve(listener, limits, Arc::new(service))
}

/// The replication port's service: each connection is the link's server
/// state machine into a disk of the data folder.
struct Replication {
    disks: Disks,
    cfg: ServerConfig,
    tls: Option<(Arc<rustls::ServerConfig>, Arc<ferry_link::Watch>)>,
}

impl Service for Replication {
    fn serve(&self, conn: TcpStream) {
        // The outcome is logged (and told to the peer) by the link.
        match &self.tls {
            None => {
                let _ = ferry_link::server::serve(conn, &self.disks, &self.cfg);
            }
            Some((config, watch)) => {
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                // A TLS handshake starts with a handshake record (0x16); a
                // plaintext ferry peer is told in its own protocol why not.
                let mut first = [0u8; 1];
                if matches!(conn.peek(&mut first), Ok(1)) && first[0] != 0x16 {
                    log::warn!("{peer}: refused: plaintext on a mutual-TLS listener");
                    let mut conn = conn;
                    let _ = write_msg(
                        &mut conn,
                        &Msg::Error {
                            code: ErrorCode::Refused,
                            msg: "this master target takes mutual TLS only: give the agent --identity DIR \
                                  (enroll it first: `ferry enroll --server ADDR --token TOKEN --identity DIR`)"
                                .into(),
                        },
                    );
                    return;
                }
                match ferry_link::TlsStream::accept(conn, config.clone()) {
                    Ok(t) => {
                        watch.add(&t);
                        let _ = ferry_link::server::serve(t, &self.disks, &self.cfg);
                    }
                    Err(e) => log::warn!("{peer}: refused: {e}"),
                }
            }
        }
    }

    fn busy(&self, conn: &mut TcpStream) {
        let _ = write_msg(
            conn,
            &Msg::Error { code: ErrorCode::Busy, msg: "the master target serves its maximum of connections; try again".into() },
        );
    }
}

/// The disks of one data folder, opened by name for a stream.
struct Disks {
    data: PathBuf,
    /// Every stream comes over mutual TLS and must name its identity.
    require_identity: bool,
    live: Arc<Live>,
}

impl Sinks for Disks {
    type Sink = DiskSink;

    fn open(
        &self,
        peer: &str,
        who: Option<&ferry_identity::Identity>,
        name: &str,
        size: u64,
        generation: [u8; 16],
    ) -> Result<(DiskSink, OpenInfo), Fail> {
        use crate::store::access::{self, AccessError, Admit};
        let who_role = who.map(|w| w.role);
        let who = match (who, self.require_identity) {
            // A process server relays for an agent and names it in HELLO
            // ("… for agent/NAME"): the disk belongs to that agent, so the
            // agent may also come here directly.
            (Some(w), _) if w.role == Role::ProcessServer => match peer.rsplit_once(" for ") {
                Some((_, a)) if a.starts_with("agent/") => Some(a.to_string()),
                _ => Some(w.label()),
            },
            (Some(w), _) => Some(w.label()),
            (None, false) => None,
            // Cannot happen with TLS required; refuse rather than let an
            // unnamed peer write.
            (None, true) => return Err(Fail::new(ErrorCode::Refused, "this master target takes identified peers only")),
        };
        let mut bind = false;
        if let Some(who) = &who {
            if !ferry_proto::valid_name(name) {
                return Err(Fail::new(ErrorCode::Refused, format!("disk name {name:?}: expected 1-64 of A-Z a-z 0-9 . _ -")));
            }
            // Checked before the folder is touched: a refused identity
            // changes nothing.
            match access::check(&self.data, name, who) {
                Ok(Admit::Owner) => {}
                Ok(Admit::New) => bind = true,
                Err(e @ (AccessError::Denied { .. } | AccessError::Unbound { .. })) => {
                    return Err(Fail::new(ErrorCode::Refused, e.to_string()))
                }
                Err(e) => return Err(Fail::new(ErrorCode::Internal, e.to_string())),
            }
        }
        let (disk, info) = Disk::open(&self.data, name, size, generation).map_err(fail)?;
        if let (true, Some(who)) = (bind, &who) {
            access::bind_new(&self.data, name, who).map_err(|e| Fail::new(ErrorCode::Refused, e.to_string()))?;
            log::info!("disk {name}: created by {who}, bound to it");
        }
        log::info!("disk {name}: stream opened by {peer}, {size} bytes, durable to seq {}", disk.durable_seq);
        // Cross-disk references come from process servers (deduplicating
        // between machines) and from loopback peers; agents cannot name
        // another disk's content.
        let xref = who_role.is_none_or(|r| r == Role::ProcessServer);
        self.live.lock().entry(name.to_string()).or_default().streams += 1;
        let live = Arc::clone(&self.live);
        Ok((
            DiskSink { disk, data: self.data.clone(), xref, live },
            OpenInfo { existed: info.existed, same_generation: info.same_generation },
        ))
    }
}

/// A disk folder receiving a stream (its writer lock held while it lives).
pub struct DiskSink {
    disk: Disk,
    /// The data folder, for cross-disk references.
    data: PathBuf,
    /// Whether this peer may send cross-disk references (XREF).
    xref: bool,
    live: Arc<Live>,
}

impl Drop for DiskSink {
    fn drop(&mut self) {
        if let Some(d) = self.live.lock().get_mut(&self.disk.name) {
            d.streams = d.streams.saturating_sub(1);
        }
    }
}

impl Sink for DiskSink {
    fn size(&self) -> u64 {
        self.disk.size
    }

    fn durable_seq(&self) -> u64 {
        self.disk.durable_seq
    }

    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<(u64, u64)>, Fail> {
        let ops: Vec<disk::Op> = ops
            .into_iter()
            .map(|op| match op {
                Op::Write { seq, offset, data } => Ok(disk::Op::Write { seq, offset, data }),
                Op::Zero { seq, offset, len } => Ok(disk::Op::Zero { seq, offset, len }),
                Op::Tag { seq, time_ns, kind } => Ok(disk::Op::Tag { seq, time_ns, kind }),
                // Only a sink that keeps frames is handed these.
                Op::Data { seq, .. } | Op::Ref { seq, .. } | Op::XRef { seq, .. } => {
                    Err(Fail::new(ErrorCode::Internal, format!("seq {seq}: an unresolved frame")))
                }
            })
            .collect::<Result<_, Fail>>()?;
        let bytes: u64 = ops
            .iter()
            .map(|op| match op {
                disk::Op::Write { data, .. } => data.len() as u64,
                disk::Op::Zero { len, .. } => u64::from(*len),
                disk::Op::Tag { .. } => 0,
            })
            .sum();
        let points = self.disk.apply(&ops).map_err(fail)?;
        self.live.lock().entry(self.disk.name.clone()).or_default().applied_bytes += bytes;
        Ok(points
            .into_iter()
            .map(|p| {
                log::info!("disk {}: recovery point {} ({}) at seq {}", self.disk.name, p.id, p.kind.as_str(), p.seq);
                (p.seq, p.id)
            })
            .collect())
    }

    fn resolve_ref(&mut self, src: u64, len: u32, digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail> {
        self.disk.resolve_ref(src, len, digest).map_err(fail)
    }

    fn sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<Vec<[u8; 16]>, Fail> {
        self.disk.sums(offset, chunk, count).map_err(fail)
    }

    /// Read the other disk's replica and check the digest: whatever was
    /// there when the process server indexed it may have been overwritten
    /// since (then the answer is a miss, and it sends the data).
    fn resolve_xref(&mut self, disk: &str, src: u64, len: u32, digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail> {
        if !self.xref || !ferry_proto::valid_name(disk) {
            return Ok(None);
        }
        if disk == self.disk.name {
            return self.disk.resolve_ref(src, len, digest).map_err(fail);
        }
        let paths = crate::store::folder::Paths::new(&self.data, disk);
        if !paths.meta.exists() {
            return Ok(None);
        }
        let Ok(f) = std::fs::File::open(&paths.replica) else { return Ok(None) };
        let mut buf = vec![0u8; len as usize];
        use std::os::unix::fs::FileExt;
        if f.read_exact_at(&mut buf, src).is_err() {
            return Ok(None);
        }
        Ok((blake3::hash(&buf).as_bytes() == digest).then_some(buf))
    }

    /// An idle stream is the moment to make the replica's sums durable.
    fn idle(&mut self) -> Result<(), Fail> {
        self.disk.sync_sums().map_err(fail)
    }
}
