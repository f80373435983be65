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
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Most unacknowledged frame bytes in flight...
pub const WINDOW: u64 = 64 << 20;
/// ...and least: the window follows the link, half of what was acknowledged
/// in the last second (enough to keep the link busy while the master target
/// acknowledges every 250 ms), so a slow link does not hold tens of MiB in
/// socket buffers that a broken connection throws away.
pub const MIN_WINDOW: u64 = 4 << 20;
/// Dedup cache entries (48 bytes each) before the cache is reset.
const DEDUP_MAX: usize = 1 << 20;
/// With protocol v2, a PING goes out when nothing was sent for this long,
/// so the master target can tell an idle agent from a dead one.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// Every wait on the master target ends after this long without a frame
/// from it (an ACK, a SUMS, a PONG...): the connection is then treated as
/// lost and the agent reconnects. A live master target answers a PING
/// within PING_EVERY plus one batch.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting, HELLO and OPEN must be done within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct SharedState {
    acked: u64,
    last_ack_ns: u64,
    points: Vec<(u64, u64)>,
    /// Set when the connection ended: the error code (if the peer sent one)
    /// and a message.
    closed: Option<(Option<ErrorCode>, String)>,
    bytes_received: u64,
    /// When the last frame from the master target arrived.
    last_rx: Option<Instant>,
    /// The oldest PING not yet followed by any frame from the master target.
    ping_unanswered: Option<Instant>,
}

struct Shared {
    st: Mutex<SharedState>,
    cv: Condvar,
}

/// The sending side, shared by the caller and the pinger thread.
struct Writer {
    w: BufWriter<TcpStream>,
    last_tx: Instant,
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
    w: Arc<Mutex<Writer>>,
    sock: TcpStream,
    shared: Arc<Shared>,
    sums_rx: Receiver<Msg>,
    inflight: VecDeque<(u64, u64)>,
    inflight_bytes: u64,
    /// (when, bytes) of frames found acknowledged in the last second.
    acked_log: VecDeque<(Instant, u64)>,
    acked_last_s: u64,
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
    /// The protocol version the master target chose.
    pub version: u16,
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
        ferry_common::net::keepalive(&sock);
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).ok();
        // A master target that stops reading makes a write fail, not hang.
        sock.set_write_timeout(Some(PEER_TIMEOUT)).ok();
        let mut r = BufReader::with_capacity(1 << 20, sock.try_clone().map_err(AgentError::io("socket"))?);
        let mut w = BufWriter::with_capacity(1 << 20, sock.try_clone().map_err(AgentError::io("socket"))?);
        let lost = |e: String| AgentError::Connect(format!("{target}: {e}"));
        let peer = format!("ferry-agent {}", env!("CARGO_PKG_VERSION"));
        ferry_proto::write_msg(&mut w, &Msg::Hello { min: VERSION_MIN, max: VERSION_MAX, peer }).map_err(|e| lost(e.to_string()))?;
        w.flush().map_err(|e| lost(e.to_string()))?;
        let version = match read_frame(&mut r).map_err(|e| lost(e.to_string()))? {
            Some(Msg::HelloAck { version, .. }) => version,
            Some(Msg::Error { code, msg }) => return Err(AgentError::Refused { code, msg }),
            other => return Err(lost(format!("unexpected answer to HELLO: {other:?}"))),
        };
        ferry_proto::write_msg(&mut w, &Msg::Open { name: name.into(), size, generation }).map_err(|e| lost(e.to_string()))?;
        w.flush().map_err(|e| lost(e.to_string()))?;
        let (durable, flags) = match read_frame(&mut r).map_err(|e| lost(e.to_string()))? {
            Some(Msg::OpenAck { durable_seq, flags, .. }) => (durable_seq, flags),
            Some(Msg::Error { code, msg }) => return Err(AgentError::Refused { code, msg }),
            other => return Err(lost(format!("unexpected answer to OPEN: {other:?}"))),
        };
        // From here the waits below have their own deadlines (PEER_TIMEOUT);
        // the receiver thread blocks until a frame or the end.
        sock.set_read_timeout(None).ok();
        let shared = Arc::new(Shared {
            st: Mutex::new(SharedState { acked: durable, last_rx: Some(Instant::now()), ..Default::default() }),
            cv: Condvar::new(),
        });
        let (tx, sums_rx) = unbounded();
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            let end = loop {
                let f = read_frame(&mut r);
                if let Ok(Some(_)) = &f {
                    let mut st = sh.st.lock().expect("poisoned");
                    st.last_rx = Some(Instant::now());
                    st.ping_unanswered = None;
                }
                match f {
                    Ok(Some(Msg::Pong { .. })) => sh.cv.notify_all(),
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
        let w = Arc::new(Mutex::new(Writer { w, last_tx: Instant::now() }));
        if version >= 2 {
            let (ww, sh) = (Arc::downgrade(&w), Arc::clone(&shared));
            std::thread::spawn(move || pinger(ww, sh));
        }
        Ok(Session {
            w,
            version,
            sock,
            shared,
            sums_rx,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            acked_log: VecDeque::new(),
            acked_last_s: 0,
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

    /// Fails when the connection ended, or when the master target has said
    /// nothing for [`PEER_TIMEOUT`] since `since` (the start of a wait) and
    /// since its last frame.
    fn check_deadline(st: &SharedState, since: Instant) -> Result<(), AgentError> {
        Self::check_closed(st)?;
        crate::live::check_stop()?;
        let quiet = st.last_rx.map_or(since.elapsed(), |t| t.elapsed()).min(since.elapsed());
        if quiet > PEER_TIMEOUT {
            return Err(AgentError::Lost(format!("no answer from the master target for {}s", quiet.as_secs())));
        }
        Ok(())
    }

    /// Wait on the shared state until `done` holds, with the deadline above.
    fn wait_for<T>(&self, mut done: impl FnMut(&SharedState) -> Option<T>) -> Result<T, AgentError> {
        let since = Instant::now();
        let mut st = self.shared.st.lock().expect("poisoned");
        loop {
            if let Some(v) = done(&st) {
                return Ok(v);
            }
            Self::check_deadline(&st, since)?;
            st = self.shared.cv.wait_timeout(st, Duration::from_millis(500)).expect("poisoned").0;
        }
    }

    /// Whether the connection still works: fails if it ended, or if a PING
    /// went unanswered for [`PEER_TIMEOUT`]. Idle loops call this, so a
    /// lost master target is noticed (and reported) without data to send.
    pub fn check_alive(&self) -> Result<(), AgentError> {
        let st = self.shared.st.lock().expect("poisoned");
        Self::check_closed(&st)?;
        if let Some(t) = st.ping_unanswered {
            if t.elapsed() > PEER_TIMEOUT {
                return Err(AgentError::Lost(format!("the master target has not answered a PING for {}s", t.elapsed().as_secs())));
            }
        }
        Ok(())
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
            let acked = self.shared.st.lock().expect("poisoned").acked;
            self.pop_acked(acked);
            if self.inflight_bytes + n > self.window() {
                self.flush()?;
                while let Some(&(front, _)) = self.inflight.front().filter(|_| self.inflight_bytes + n > self.window()) {
                    let acked = self.wait_for(|st| (st.acked >= front).then_some(st.acked))?;
                    self.pop_acked(acked);
                }
            }
            self.inflight.push_back((seq, n));
            self.inflight_bytes += n;
        } else {
            Self::check_closed(&self.shared.st.lock().expect("poisoned"))?;
        }
        let mut w = self.w.lock().expect("poisoned");
        w.w.write_all(&self.buf).map_err(|e| AgentError::Lost(e.to_string()))?;
        w.last_tx = Instant::now();
        self.bytes_sent += n;
        Ok(())
    }

    /// Drop frames up to `acked` from the in-flight list, noting how many
    /// bytes the link carried.
    fn pop_acked(&mut self, acked: u64) {
        let now = Instant::now();
        while let Some(&(s, b)) = self.inflight.front() {
            if s > acked {
                break;
            }
            self.inflight.pop_front();
            self.inflight_bytes -= b;
            self.acked_log.push_back((now, b));
            self.acked_last_s += b;
        }
        while let Some(&(t, b)) = self.acked_log.front() {
            if now.duration_since(t) <= Duration::from_secs(1) {
                break;
            }
            self.acked_log.pop_front();
            self.acked_last_s -= b;
        }
    }

    /// The send window now (see [`MIN_WINDOW`]).
    fn window(&self) -> u64 {
        (self.acked_last_s / 2).clamp(MIN_WINDOW, WINDOW)
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
        self.w.lock().expect("poisoned").w.flush().map_err(|e| AgentError::Lost(e.to_string()))
    }

    /// Block until everything up to `seq` is durable (or the deadline).
    pub fn wait_acked(&mut self, seq: u64) -> Result<(), AgentError> {
        self.flush()?;
        self.wait_for(|st| (st.acked >= seq).then_some(()))
    }

    /// Block until the master target reports the point for tag `seq`.
    pub fn wait_point(&mut self, seq: u64) -> Result<u64, AgentError> {
        self.flush()?;
        self.wait_for(|st| st.points.iter().find(|(s, _)| *s == seq).map(|&(_, id)| id))
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
        let since = Instant::now();
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
            match self.sums_rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Msg::Sums { req: r, offset: o, sums, .. }) => {
                    self.stash.insert(r, (o, sums));
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    Self::check_deadline(&self.shared.st.lock().expect("poisoned"), since)?;
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
        // A connection that already ended (or a dead link) is not flushed:
        // that could wait for the whole write timeout.
        let ended = self.shared.st.lock().expect("poisoned").closed.is_some();
        if ended {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            return;
        }
        let _ = self.flush();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// Sends a PING whenever the caller has sent nothing for [`PING_EVERY`]; ends
/// with the session (the writer is gone) or the connection.
fn pinger(w: Weak<Mutex<Writer>>, sh: Arc<Shared>) {
    let mut token = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Some(w) = w.upgrade() else { return };
        if sh.st.lock().expect("poisoned").closed.is_some() {
            return;
        }
        let mut g = w.lock().expect("poisoned");
        if g.last_tx.elapsed() < PING_EVERY {
            continue;
        }
        token += 1;
        let mut b = Vec::with_capacity(64);
        Msg::Ping { token }.encode(&mut b);
        if g.w.write_all(&b).and_then(|_| g.w.flush()).is_err() {
            return; // the receiver thread reports the end
        }
        g.last_tx = Instant::now();
        drop(g);
        let mut st = sh.st.lock().expect("poisoned");
        st.ping_unanswered.get_or_insert_with(Instant::now);
    }
}
