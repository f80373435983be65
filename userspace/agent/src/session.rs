//! One connection to the next hop (master target or process server):
//! handshake, windowed sending, acknowledgements, checksums and points.
//!
//! Threads: the caller sends; a receiver thread reads ACK / POINT / SUMS /
//! ERROR frames and publishes them through `Shared` (a mutex and condvar) and
//! a channel for SUMS. The caller never has more than [`WINDOW`] bytes
//! unacknowledged on the wire.

use crate::AgentError;
use crossbeam_channel::{unbounded, Receiver};
use ferry_proto::{read_frame, Codec, ErrorCode, Msg, PointKind, VERSION_MAX, VERSION_MIN};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Most unacknowledged frame bytes in flight.
pub const WINDOW: u64 = 64 << 20;
/// Dedup cache entries (48 bytes each) before the cache is reset.
const DEDUP_MAX: usize = 1 << 20;

#[derive(Default)]
struct SharedState {
    acked: u64,
    last_ack_ns: u64,
    points: Vec<(u64, u64)>,
    /// Set when the connection ended: the error code (if the peer sent one)
    /// and a message.
    closed: Option<(Option<ErrorCode>, String)>,
    bytes_received: u64,
}

struct Shared {
    st: Mutex<SharedState>,
    cv: Condvar,
}

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

pub struct Session {
    w: BufWriter<TcpStream>,
    sock: TcpStream,
    shared: Arc<Shared>,
    sums_rx: Receiver<Msg>,
    inflight: VecDeque<(u64, u64)>,
    inflight_bytes: u64,
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
    next_req: u64,
    /// SUMS answers received ahead of the one being waited for.
    stash: HashMap<u64, (u64, Vec<[u8; 16]>)>,
    buf: Vec<u8>,
}

impl Session {
    /// Connect, negotiate the version and open disk `name`.
    pub fn connect(target: &str, name: &str, size: u64, generation: [u8; 16], next_seq: u64) -> Result<Session, AgentError> {
        let addrs: Vec<_> = target.to_socket_addrs().map_err(|e| AgentError::Connect(format!("{target}: {e}")))?.collect();
        let mut last = None;
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let sock = sock.ok_or_else(|| AgentError::Connect(format!("{target}: {}", last.map_or("no address".into(), |e| e.to_string()))))?;
        sock.set_nodelay(true).ok();
        let mut r = BufReader::with_capacity(1 << 20, sock.try_clone().map_err(AgentError::io("socket"))?);
        let mut w = BufWriter::with_capacity(1 << 20, sock.try_clone().map_err(AgentError::io("socket"))?);
        let lost = |e: String| AgentError::Connect(format!("{target}: {e}"));
        let peer = format!("ferry-agent {}", env!("CARGO_PKG_VERSION"));
        ferry_proto::write_msg(&mut w, &Msg::Hello { min: VERSION_MIN, max: VERSION_MAX, peer }).map_err(|e| lost(e.to_string()))?;
        w.flush().map_err(|e| lost(e.to_string()))?;
        match read_frame(&mut r).map_err(|e| lost(e.to_string()))? {
            Some(Msg::HelloAck { .. }) => {}
            Some(Msg::Error { code, msg }) => return Err(AgentError::Refused { code, msg }),
            other => return Err(lost(format!("unexpected answer to HELLO: {other:?}"))),
        }
        ferry_proto::write_msg(&mut w, &Msg::Open { name: name.into(), size, generation }).map_err(|e| lost(e.to_string()))?;
        w.flush().map_err(|e| lost(e.to_string()))?;
        let (durable, flags) = match read_frame(&mut r).map_err(|e| lost(e.to_string()))? {
            Some(Msg::OpenAck { durable_seq, flags, .. }) => (durable_seq, flags),
            Some(Msg::Error { code, msg }) => return Err(AgentError::Refused { code, msg }),
            other => return Err(lost(format!("unexpected answer to OPEN: {other:?}"))),
        };
        let shared = Arc::new(Shared { st: Mutex::new(SharedState { acked: durable, ..Default::default() }), cv: Condvar::new() });
        let (tx, sums_rx) = unbounded();
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            let end = loop {
                match read_frame(&mut r) {
                    Ok(Some(Msg::Ack { durable_seq })) => {
                        let mut st = sh.st.lock().expect("poisoned");
                        st.acked = st.acked.max(durable_seq);
                        st.last_ack_ns = ferry_common::now_ns();
                        sh.cv.notify_all();
                    }
                    Ok(Some(Msg::Point { seq, id })) => {
                        sh.st.lock().expect("poisoned").points.push((seq, id));
                        sh.cv.notify_all();
                    }
                    Ok(Some(m @ Msg::Sums { .. })) => {
                        if let Msg::Sums { sums, .. } = &m {
                            sh.st.lock().expect("poisoned").bytes_received += 40 + 16 * sums.len() as u64;
                        }
                        if tx.send(m).is_err() {
                            break (None, "session dropped".to_string());
                        }
                    }
                    Ok(Some(Msg::Error { code, msg })) => break (Some(code), msg),
                    Ok(Some(other)) => break (None, format!("unexpected frame from master target: {other:?}")),
                    Ok(None) => break (None, "master target closed the connection".into()),
                    Err(e) => break (None, e.to_string()),
                }
            };
            let mut st = sh.st.lock().expect("poisoned");
            st.closed = Some(end);
            sh.cv.notify_all();
            // Dropping tx wakes a caller blocked on SUMS.
        });
        Ok(Session {
            w,
            sock,
            shared,
            sums_rx,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            next_seq: next_seq.max(durable + 1),
            durable_at_open: durable,
            open_flags: flags,
            bytes_sent: 0,
            dedup: HashMap::new(),
            dedup_at: BTreeMap::new(),
            next_req: 1,
            stash: HashMap::new(),
            buf: Vec::with_capacity(ferry_proto::MAX_BODY as usize + 64),
        })
    }

    fn check_closed(st: &SharedState) -> Result<(), AgentError> {
        match &st.closed {
            None => Ok(()),
            Some((Some(code), msg)) => Err(AgentError::Refused { code: *code, msg: msg.clone() }),
            Some((None, msg)) => Err(AgentError::Lost(msg.clone())),
        }
    }

    /// Highest durable sequence acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.st.lock().expect("poisoned").acked
    }

    pub fn last_ack_ns(&self) -> u64 {
        self.shared.st.lock().expect("poisoned").last_ack_ns
    }

    pub fn bytes_received(&self) -> u64 {
        self.shared.st.lock().expect("poisoned").bytes_received
    }

    fn write_frame(&mut self, m: &Msg) -> Result<(), AgentError> {
        self.buf.clear();
        m.encode(&mut self.buf);
        let n = self.buf.len() as u64;
        if let Some(seq) = m.seq() {
            // Respect the window: wait for acknowledgements first.
            if self.inflight_bytes + n > WINDOW {
                self.w.flush().map_err(|e| AgentError::Lost(e.to_string()))?;
                let mut st = self.shared.st.lock().expect("poisoned");
                loop {
                    while let Some(&(s, b)) = self.inflight.front() {
                        if s > st.acked {
                            break;
                        }
                        self.inflight.pop_front();
                        self.inflight_bytes -= b;
                    }
                    if self.inflight_bytes + n <= WINDOW || self.inflight.is_empty() {
                        break;
                    }
                    Self::check_closed(&st)?;
                    st = self.shared.cv.wait(st).expect("poisoned");
                }
            }
            self.inflight.push_back((seq, n));
            self.inflight_bytes += n;
        } else {
            Self::check_closed(&self.shared.st.lock().expect("poisoned"))?;
        }
        self.w.write_all(&self.buf).map_err(|e| AgentError::Lost(e.to_string()))?;
        self.bytes_sent += n;
        Ok(())
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
        self.w.flush().map_err(|e| AgentError::Lost(e.to_string()))
    }

    /// Block until everything up to `seq` is durable.
    pub fn wait_acked(&mut self, seq: u64) -> Result<(), AgentError> {
        self.flush()?;
        let mut st = self.shared.st.lock().expect("poisoned");
        while st.acked < seq {
            Self::check_closed(&st)?;
            st = self.shared.cv.wait(st).expect("poisoned");
        }
        Ok(())
    }

    /// Block until the master target reports the point for tag `seq`.
    pub fn wait_point(&mut self, seq: u64) -> Result<u64, AgentError> {
        self.flush()?;
        let mut st = self.shared.st.lock().expect("poisoned");
        loop {
            if let Some(&(_, id)) = st.points.iter().find(|(s, _)| *s == seq) {
                return Ok(id);
            }
            Self::check_closed(&st)?;
            st = self.shared.cv.wait(st).expect("poisoned");
        }
    }

    /// Ask for the replica's checksums of `count` chunks from `offset`.
    pub fn request_sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, AgentError> {
        let req = self.next_req;
        self.next_req += 1;
        self.write_frame(&Msg::SumsReq { req, offset, chunk, count })?;
        Ok(req)
    }

    /// The answer to SUMS request `req`, which must cover `count` chunks
    /// from `offset`. Answers come in request order; any that arrive first
    /// for other requests are kept for their own call.
    pub fn recv_sums_for(&mut self, req: u64, offset: u64, count: usize) -> Result<Vec<[u8; 16]>, AgentError> {
        self.flush()?;
        loop {
            if let Some((roff, sums)) = self.stash.remove(&req) {
                if roff != offset || sums.len() != count {
                    return Err(AgentError::Lost(format!(
                        "checksum answer {req} covers {} chunks at {roff}, asked {count} at {offset}",
                        sums.len()
                    )));
                }
                return Ok(sums);
            }
            match self.sums_rx.recv() {
                Ok(Msg::Sums { req: r, offset: o, sums, .. }) => {
                    self.stash.insert(r, (o, sums));
                }
                _ => {
                    let st = self.shared.st.lock().expect("poisoned");
                    Self::check_closed(&st)?;
                    return Err(AgentError::Lost("connection ended while waiting for checksums".into()));
                }
            }
        }
    }

    /// Close the connection.
    pub fn close(mut self) {
        let _ = self.w.flush();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
