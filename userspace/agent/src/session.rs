//! The agent's connection to the next hop (master target or process
//! server): a thin wrapper over the link layer's client
//! (`ferry_link::Client`, which owns the handshake, the window, the
//! acknowledgements, PING and every deadline) that adds what is the
//! agent's own: sequence numbering, content dedup (REF to content the
//! server acknowledged), the preparation of disk bytes into frames, and
//! `AgentError`.
//!
//! Threads: the caller sends and waits; the link client runs a receiver
//! thread and (protocol v2) a pinger. The caller never has more than
//! [`WINDOW`] bytes unacknowledged on the wire.

use crate::AgentError;
use ferry_identity::enroll::Held;
use ferry_identity::tls::PeerVerifier;
use ferry_identity::Role;
use ferry_link::AnyStream;
use ferry_link::{Client, ClientConfig, LinkError};
use ferry_proto::{Codec, Msg, PointKind};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

pub use ferry_link::client::{MIN_WINDOW, PEER_TIMEOUT, PING_EVERY, WINDOW};

/// Dedup cache entries (48 bytes each) before the cache is reset.
const DEDUP_MAX: usize = 1 << 20;

/// A prepared piece of disk content, ready to send.
pub enum Unit {
    Zero { offset: u64, len: u32 },
    Data { offset: u64, len: u32, digest: [u8; 32], codec: Codec, payload: Vec<u8> },
}

/// Turn raw disk bytes at `offset` into units of at most `unit` bytes:
/// zero runs become Zero, the rest Data (BLAKE3 digest, zstd when it pays).
pub fn prepare(offset: u64, raw: &[u8], unit: usize, out: &mut Vec<Unit>) {
    for (i, c) in raw.chunks(unit).enumerate() {
        let off = offset + (i * unit) as u64;
        if ferry_common::is_zero(c) {
            match out.last_mut() {
                Some(Unit::Zero { offset: zo, len })
                    if *zo + u64::from(*len) == off && (*len as usize + c.len()) <= ferry_proto::MAX_EXTENT as usize =>
                {
                    *len += c.len() as u32
                }
                _ => out.push(Unit::Zero { offset: off, len: c.len() as u32 }),
            }
        } else {
            let digest = *blake3::hash(c).as_bytes();
            let (codec, payload) = ferry_proto::compress(c);
            out.push(Unit::Data { offset: off, len: c.len() as u32, digest, codec, payload });
        }
    }
}

/// This agent's identity (`--identity`) and the TLS configuration every
/// connection to the next hop uses; unset: plain TCP (loopback only).
static IDENTITY: OnceLock<(Held, Arc<rustls::ClientConfig>, Arc<ferry_link::Watch>)> = OnceLock::new();

/// Use `held` for every connection from now on (mutual TLS; the peer must
/// be a master target or a process server of the same CA). Starts the
/// identity's upkeep: renewal at two thirds of its life, the revocation list.
pub fn use_identity(held: Held) -> Result<(), AgentError> {
    let v = PeerVerifier::new(held.trust.clone(), &[Role::MasterTarget, Role::ProcessServer], true);
    let config = ferry_identity::tls::client_config(Some(held.creds.clone()), v).map_err(|e| AgentError::Connect(e.to_string()))?;
    // Every 10 s: renewal when due, and the revocation list, against which
    // the watch re-checks the next hop of an open stream every 2 s.
    held.keep_fresh(std::time::Duration::from_secs(10));
    let watch = ferry_link::Watch::start(held.trust.clone());
    let _ = IDENTITY.set((held, config, watch));
    Ok(())
}

pub struct Session {
    link: Client<AnyStream>,
    pub next_seq: u64,
    /// Durable sequence the master target reported at OPEN.
    pub durable_at_open: u64,
    pub open_flags: u32,
    pub bytes_sent: u64,
    /// BLAKE3 digest -> (offset, seq) of the DATA frame that carried it.
    dedup: HashMap<[u8; 32], (u64, u64)>,
    /// The same entries by offset -> (digest, len), to forget an entry when
    /// its range is overwritten.
    dedup_at: BTreeMap<u64, ([u8; 32], u32)>,
    /// The protocol version the master target chose.
    pub version: u16,
    /// The next hop is a process server: a point comes once the master
    /// target behind it made it durable, which may be much later.
    pub relayed: bool,
}

/// An `AgentError` for a link error; `target` names the next hop.
fn agent_error(target: &str, e: LinkError) -> AgentError {
    match e {
        LinkError::Connect { .. } => AgentError::Connect(e.to_string()),
        // The peer refused our identity (revoked, expired, another CA, the
        // wrong role): retrying cannot help; stop and say why.
        LinkError::Handshake { why, source: Some(ferry_proto::ProtoError::Io(e)) } if e.kind() == std::io::ErrorKind::PermissionDenied => {
            AgentError::Refused { code: ferry_proto::ErrorCode::Refused, msg: format!("{target}: {why}") }
        }
        LinkError::Handshake { why, .. } => AgentError::Connect(format!("{target}: {why}")),
        LinkError::Refused { code, msg } => AgentError::Refused { code, msg },
        LinkError::Lost { why, .. } => AgentError::Lost(why),
        LinkError::Interrupted => crate::live::check_stop().err().unwrap_or_else(|| AgentError::Stopped("a signal".into())),
    }
}

fn lost(e: LinkError) -> AgentError {
    agent_error("the master target", e)
}

impl Session {
    /// Connect, negotiate the version and open disk `name`.
    pub fn connect(target: &str, name: &str, size: u64, generation: [u8; 16], next_seq: u64) -> Result<Session, AgentError> {
        let fail = |e| agent_error(target, e);
        let tcp = ferry_link::connect_tcp(target, ferry_link::client::CONNECT_TIMEOUT).map_err(fail)?;
        let sock = match IDENTITY.get() {
            None => AnyStream::Tcp(tcp),
            Some((_, config, watch)) => {
                let t = ferry_link::TlsStream::connect(tcp, config.clone(), ferry_link::client::CONNECT_TIMEOUT).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        AgentError::Refused { code: ferry_proto::ErrorCode::Refused, msg: format!("{target}: {e}") }
                    } else {
                        AgentError::Connect(format!("{target}: TLS handshake: {e}"))
                    }
                })?;
                log::debug!("TLS to {}", ferry_link::Stream::peer(&t));
                watch.add(&t);
                AnyStream::Tls(t)
            }
        };
        let mut cfg = ClientConfig::new(format!("ferry-agent {}", env!("CARGO_PKG_VERSION")));
        cfg.server = "the master target".into();
        let mut link = Client::open(sock, cfg, name, size, generation).map_err(fail)?;
        // Every wait also ends when a signal asks the agent to stop.
        link.set_interrupt(Box::new(|| crate::live::check_stop().is_err()));
        let o = link.opened();
        let relayed = link.server_peer().starts_with("ferry-process-server");
        Ok(Session {
            relayed,
            link,
            version: o.version,
            next_seq: next_seq.max(o.durable_seq + 1),
            durable_at_open: o.durable_seq,
            open_flags: o.flags,
            bytes_sent: 0,
            dedup: HashMap::new(),
            dedup_at: BTreeMap::new(),
        })
    }

    /// Whether the connection still works: fails if it ended, or if a PING
    /// went unanswered for [`PEER_TIMEOUT`]. Idle loops call this, so a
    /// lost master target is noticed (and reported) without data to send.
    pub fn check_alive(&self) -> Result<(), AgentError> {
        self.link.check_alive().map_err(lost)
    }

    /// Highest durable sequence acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.link.acked()
    }

    pub fn last_ack_ns(&self) -> u64 {
        self.link.last_ack_ns()
    }

    pub fn bytes_received(&self) -> u64 {
        self.link.bytes_received()
    }

    /// Send one frame; a data-path frame waits for room in the window.
    fn write_frame(&mut self, m: &Msg) -> Result<(), AgentError> {
        let r = self.link.send(m).map_err(lost);
        self.bytes_sent = self.link.bytes_sent();
        r
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Forget dedup entries whose source range overlaps `[a, b)`.
    fn forget_overlapping(&mut self, a: u64, b: u64) {
        let from = a.saturating_sub(u64::from(ferry_proto::MAX_EXTENT));
        let hit: Vec<u64> = self.dedup_at.range(from..b).filter(|(&o, &(_, l))| o + u64::from(l) > a).map(|(&o, _)| o).collect();
        for o in hit {
            if let Some((d, _)) = self.dedup_at.remove(&o) {
                if self.dedup.get(&d).is_some_and(|&(src, _)| src == o) {
                    self.dedup.remove(&d);
                }
            }
        }
    }

    /// Send one prepared unit; returns its sequence number.
    pub fn send_unit(&mut self, u: Unit) -> Result<u64, AgentError> {
        let (a, b) = match &u {
            Unit::Zero { offset, len } | Unit::Data { offset, len, .. } => (*offset, *offset + u64::from(*len)),
        };
        self.forget_overlapping(a, b);
        let seq = self.take_seq();
        let m = match u {
            Unit::Zero { offset, len } => Msg::Zero { seq, offset, len },
            Unit::Data { offset, len, digest, codec, payload } => {
                let acked = self.acked();
                match self.dedup.get(&digest) {
                    Some(&(src, s)) if s <= acked => Msg::Ref { seq, offset, len, src, digest },
                    _ => {
                        if self.dedup.len() >= DEDUP_MAX {
                            self.dedup.clear();
                            self.dedup_at.clear();
                        }
                        if let std::collections::hash_map::Entry::Vacant(e) = self.dedup.entry(digest) {
                            e.insert((offset, seq));
                            self.dedup_at.insert(offset, (digest, len));
                        }
                        Msg::Data { seq, offset, len, codec, payload }
                    }
                }
            }
        };
        self.write_frame(&m)?;
        Ok(seq)
    }

    /// Send a consistency tag; returns its sequence number.
    pub fn send_tag(&mut self, kind: PointKind, time_ns: u64) -> Result<u64, AgentError> {
        let seq = self.take_seq();
        self.write_frame(&Msg::Tag { seq, time_ns, kind })?;
        Ok(seq)
    }

    pub fn flush(&mut self) -> Result<(), AgentError> {
        self.link.flush().map_err(lost)
    }

    /// Block until everything up to `seq` is durable (or the deadline).
    pub fn wait_acked(&mut self, seq: u64) -> Result<(), AgentError> {
        self.link.wait_acked(seq).map_err(lost)
    }

    /// Block until the master target reports the point for tag `seq`.
    pub fn wait_point(&mut self, seq: u64) -> Result<u64, AgentError> {
        self.link.wait_point(seq).map_err(lost)
    }

    /// Wait at most `d` for the point of tag `seq`.
    pub fn wait_point_for(&mut self, seq: u64, d: std::time::Duration) -> Result<Option<u64>, AgentError> {
        self.link.wait_point_for(seq, d).map_err(lost)
    }

    /// Points reported since the last call (a relayed session's late ones).
    pub fn take_points(&self) -> Vec<(u64, u64)> {
        self.link.take_points()
    }

    /// Ask for the replica's checksums of `count` chunks from `offset`.
    pub fn request_sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, AgentError> {
        let r = self.link.request_sums(offset, chunk, count).map_err(lost);
        self.bytes_sent = self.link.bytes_sent();
        r
    }

    /// The answer to SUMS request `req`, which must cover `count` chunks
    /// from `offset`. Answers come in request order; any that arrive first
    /// for other requests are kept for their own call.
    pub fn recv_sums_for(&mut self, req: u64, offset: u64, count: usize) -> Result<Vec<[u8; 16]>, AgentError> {
        self.link.recv_sums(req, offset, count).map_err(lost)
    }

    /// Close the connection.
    pub fn close(self) {
        self.link.close();
    }
}
