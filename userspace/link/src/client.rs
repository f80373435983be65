//! The client side of the wire protocol (agent → next hop, and a process
//! server → master target): HELLO/OPEN, a send window that follows the
//! link, acknowledgements, points, checksum answers, PING when idle, and a
//! deadline on every wait.
//!
//! Threads: the caller sends and waits; a receiver thread reads ACK / POINT /
//! SUMS / PONG / ERROR frames and publishes them through `Shared` (a mutex
//! and a condvar); with protocol v2 a pinger thread sends PING when the
//! caller has sent nothing for [`ClientConfig::ping_every`]. Both threads end
//! with the connection ([`Client::close`], or drop).

use crate::{LinkError, Stream};
use ferry_proto::{read_frame, ErrorCode, Msg, VERSION_MAX, VERSION_MIN};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Write};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Most unacknowledged frame bytes in flight (the default
/// [`ClientConfig::max_window`])...
pub const WINDOW: u64 = 64 << 20;
/// ...and least: the window follows the link, half of what was acknowledged
/// in the last second (enough to keep the link busy while the master target
/// acknowledges every 250 ms), so a slow link does not hold tens of MiB in
/// socket buffers that a broken connection throws away.
pub const MIN_WINDOW: u64 = 4 << 20;
/// With protocol v2, a PING goes out when nothing was sent for this long,
/// so the server can tell an idle client from a dead one.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// Every wait on the server ends after this long without a frame from it
/// (an ACK, a SUMS, a PONG...): the connection is then treated as lost. A
/// live server answers a PING within PING_EVERY plus one batch. Also the
/// write timeout: a server that stops reading makes a write fail, not hang.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// HELLO_ACK and OPEN_ACK must arrive within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP connect, per address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait wakes to check its deadline and the interrupt hook.
const STEP: Duration = Duration::from_millis(500);

/// The client's settings; the defaults are the agent's (docs/protocol.md,
/// "Deadlines").
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Sent in HELLO, e.g. `ferry-agent 0.1.0`.
    pub peer: String,
    /// What the server is called in messages ("the master target").
    pub server: String,
    /// Protocol versions offered.
    pub versions: (u16, u16),
    pub handshake_timeout: Duration,
    pub peer_timeout: Duration,
    pub ping_every: Duration,
    pub min_window: u64,
    pub max_window: u64,
}

impl ClientConfig {
    pub fn new(peer: impl Into<String>) -> ClientConfig {
        ClientConfig {
            peer: peer.into(),
            server: "the server".into(),
            versions: (VERSION_MIN, VERSION_MAX),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            peer_timeout: PEER_TIMEOUT,
            ping_every: PING_EVERY,
            min_window: MIN_WINDOW,
            max_window: WINDOW,
        }
    }
}

/// What the server said at OPEN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The protocol version the server chose.
    pub version: u16,
    /// The highest sequence number the server holds durable for the disk.
    pub durable_seq: u64,
    /// `OPEN_EXISTS`, `OPEN_SAME_GENERATION`.
    pub flags: u32,
}

#[derive(Default)]
struct State {
    acked: u64,
    last_ack_ns: u64,
    points: Vec<(u64, u64)>,
    /// Set when the connection ended: the error code (if the peer sent one)
    /// and a message.
    closed: Option<(Option<ErrorCode>, String)>,
    bytes_received: u64,
    /// When the last frame from the server arrived.
    last_rx: Option<Instant>,
    /// The oldest PING not yet followed by any frame from the server.
    ping_unanswered: Option<Instant>,
}

struct Shared {
    st: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side, shared by the caller and the pinger thread.
struct Writer<S: Stream> {
    w: BufWriter<S>,
    last_tx: Instant,
}

/// Ask a server (protocol v3) for its state instead of opening a disk: the
/// JSON of its STATUS answer. Every read and write has `cfg`'s handshake
/// deadline.
pub fn status<S: Stream>(stream: S, cfg: &ClientConfig) -> Result<String, LinkError> {
    let hs_io = |e: std::io::Error| LinkError::Handshake { why: e.to_string(), source: Some(e.into()) };
    let hs_proto = |e: ferry_proto::ProtoError| LinkError::Handshake { why: e.to_string(), source: Some(e) };
    stream.set_read_timeout(Some(cfg.handshake_timeout)).map_err(hs_io)?;
    stream.set_write_timeout(Some(cfg.handshake_timeout)).map_err(hs_io)?;
    let mut r = BufReader::new(stream.try_clone().map_err(hs_io)?);
    let mut w = BufWriter::new(stream);
    let (min, max) = (3u16.max(cfg.versions.0), cfg.versions.1);
    ferry_proto::write_msg(&mut w, &Msg::Hello { min, max, peer: cfg.peer.clone() }).map_err(hs_io)?;
    w.flush().map_err(hs_io)?;
    match read_frame(&mut r).map_err(hs_proto)? {
        Some(Msg::HelloAck { version, .. }) if (min..=max).contains(&version) => {}
        Some(Msg::Error { code, msg }) => return Err(LinkError::Refused { code, msg }),
        other => return Err(LinkError::Handshake { why: format!("unexpected answer to HELLO: {other:?}"), source: None }),
    }
    ferry_proto::write_msg(&mut w, &Msg::StatusReq).map_err(hs_io)?;
    w.flush().map_err(hs_io)?;
    match read_frame(&mut r).map_err(hs_proto)? {
        Some(Msg::Status { json }) => Ok(json),
        Some(Msg::Error { code, msg }) => Err(LinkError::Refused { code, msg }),
        other => Err(LinkError::Handshake { why: format!("unexpected answer to STATUS_REQ: {other:?}"), source: None }),
    }
}

/// One open stream to the next hop.
pub struct Client<S: Stream> {
    cfg: ClientConfig,
    /// The server's name from HELLO_ACK (`ferry-master-target 0.1.0`).
    server_peer: String,
    opened: Opened,
    w: Arc<Mutex<Writer<S>>>,
    /// A handle to shut the connection down with.
    ctl: S,
    shared: Arc<Shared>,
    sums_rx: Receiver<Msg>,
    /// (seq, bytes) of data-path frames not yet acknowledged.
    inflight: VecDeque<(u64, u64)>,
    inflight_bytes: u64,
    /// (when, bytes) of frames found acknowledged in the last second.
    acked_log: VecDeque<(Instant, u64)>,
    acked_last_s: u64,
    bytes_sent: u64,
    next_req: u64,
    /// SUMS answers received ahead of the one being waited for.
    stash: HashMap<u64, (u64, Vec<[u8; 16]>)>,
    buf: Vec<u8>,
    interrupt: Option<Box<dyn Fn() -> bool + Send>>,
}

fn lock<S: Stream>(w: &Mutex<Writer<S>>) -> std::sync::MutexGuard<'_, Writer<S>> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Stream> Client<S> {
    /// Say HELLO and OPEN disk `name` on `stream`; on success the receiver
    /// (and, with v2, the pinger) thread runs.
    pub fn open(stream: S, cfg: ClientConfig, name: &str, size: u64, generation: [u8; 16]) -> Result<Client<S>, LinkError> {
        let hs = |why: String| LinkError::Handshake { why, source: None };
        let hs_io = |e: std::io::Error| LinkError::Handshake { why: e.to_string(), source: Some(e.into()) };
        let hs_proto = |e: ferry_proto::ProtoError| LinkError::Handshake { why: e.to_string(), source: Some(e) };
        stream.set_read_timeout(Some(cfg.handshake_timeout)).map_err(hs_io)?;
        stream.set_write_timeout(Some(cfg.peer_timeout)).map_err(hs_io)?;
        let mut r = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(hs_io)?);
        let mut w = BufWriter::with_capacity(1 << 20, stream.try_clone().map_err(hs_io)?);
        let (min, max) = cfg.versions;
        ferry_proto::write_msg(&mut w, &Msg::Hello { min, max, peer: cfg.peer.clone() }).map_err(hs_io)?;
        w.flush().map_err(hs_io)?;
        let (version, server_peer) = match read_frame(&mut r).map_err(hs_proto)? {
            Some(Msg::HelloAck { version, peer }) if (min..=max).contains(&version) => (version, peer),
            Some(Msg::HelloAck { version, peer }) => {
                return Err(LinkError::Refused {
                    code: ErrorCode::UnsupportedVersion,
                    msg: format!("{peer} chose protocol v{version}, this side speaks v{min}..v{max}: upgrade the older side"),
                })
            }
            Some(Msg::Error { code, msg }) => return Err(LinkError::Refused { code, msg }),
            other => return Err(hs(format!("unexpected answer to HELLO: {other:?}"))),
        };
        ferry_proto::write_msg(&mut w, &Msg::Open { name: name.into(), size, generation }).map_err(hs_io)?;
        w.flush().map_err(hs_io)?;
        let (durable_seq, flags) = match read_frame(&mut r).map_err(hs_proto)? {
            Some(Msg::OpenAck { durable_seq, flags, .. }) => (durable_seq, flags),
            Some(Msg::Error { code, msg }) => return Err(LinkError::Refused { code, msg }),
            other => return Err(hs(format!("unexpected answer to OPEN: {other:?}"))),
        };
        // From here every wait has its own deadline (peer_timeout); the
        // receiver thread blocks until a frame or the end.
        stream.set_read_timeout(None).map_err(hs_io)?;
        let shared = Arc::new(Shared {
            st: Mutex::new(State { acked: durable_seq, last_rx: Some(Instant::now()), ..Default::default() }),
            cv: Condvar::new(),
        });
        let (tx, sums_rx) = channel();
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("link-rx".into())
            .spawn({
                let server = cfg.server.clone();
                move || receiver(r, sh, tx, server)
            })
            .map_err(|e| LinkError::Lost { why: format!("cannot start the receiver thread: {e}"), source: Some(e) })?;
        let w = Arc::new(Mutex::new(Writer { w, last_tx: Instant::now() }));
        if version >= 2 {
            let (ww, sh, every) = (Arc::downgrade(&w), Arc::clone(&shared), cfg.ping_every);
            std::thread::Builder::new()
                .name("link-ping".into())
                .spawn(move || pinger(ww, sh, every))
                .map_err(|e| LinkError::Lost { why: format!("cannot start the pinger thread: {e}"), source: Some(e) })?;
        }
        Ok(Client {
            cfg,
            server_peer,
            opened: Opened { version, durable_seq, flags },
            w,
            ctl: stream,
            shared,
            sums_rx,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            acked_log: VecDeque::new(),
            acked_last_s: 0,
            bytes_sent: 0,
            next_req: 1,
            stash: HashMap::new(),
            buf: Vec::with_capacity(ferry_proto::MAX_BODY as usize + 64),
            interrupt: None,
        })
    }

    /// Every wait also ends (with [`LinkError::Interrupted`]) once `f`
    /// returns true; it is asked every half second (a stop signal).
    pub fn set_interrupt(&mut self, f: Box<dyn Fn() -> bool + Send>) {
        self.interrupt = Some(f);
    }

    /// What the server said at OPEN.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    /// Highest durable sequence acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.lock().acked
    }

    /// When the last ACK arrived (ns since the epoch; 0 before the first).
    pub fn last_ack_ns(&self) -> u64 {
        self.shared.lock().last_ack_ns
    }

    /// Frame bytes written so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Checksum bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.shared.lock().bytes_received
    }

    fn check_closed(st: &State) -> Result<(), LinkError> {
        match &st.closed {
            None => Ok(()),
            Some((Some(code), msg)) => Err(LinkError::Refused { code: *code, msg: msg.clone() }),
            Some((None, msg)) => Err(LinkError::Lost { why: msg.clone(), source: None }),
        }
    }

    /// Fails when the connection ended, when the interrupt hook says so, or
    /// when the server has said nothing for `peer_timeout` since `since`
    /// (the start of a wait) and since its last frame.
    fn check_deadline(&self, st: &State, since: Instant) -> Result<(), LinkError> {
        Self::check_closed(st)?;
        if self.interrupt.as_ref().is_some_and(|f| f()) {
            return Err(LinkError::Interrupted);
        }
        let quiet = st.last_rx.map_or(since.elapsed(), |t| t.elapsed()).min(since.elapsed());
        if quiet > self.cfg.peer_timeout {
            return Err(LinkError::Lost { why: format!("no answer from {} for {}s", self.cfg.server, quiet.as_secs()), source: None });
        }
        Ok(())
    }

    /// Wait on the shared state until `done` holds, with the deadline above.
    fn wait_for<T>(&self, mut done: impl FnMut(&State) -> Option<T>) -> Result<T, LinkError> {
        let since = Instant::now();
        let mut st = self.shared.lock();
        loop {
            if let Some(v) = done(&st) {
                return Ok(v);
            }
            self.check_deadline(&st, since)?;
            st = self.shared.cv.wait_timeout(st, STEP).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Whether the connection still works: fails if it ended, or if a PING
    /// went unanswered for `peer_timeout`. Idle loops call this, so a lost
    /// server is noticed without data to send.
    pub fn check_alive(&self) -> Result<(), LinkError> {
        let st = self.shared.lock();
        Self::check_closed(&st)?;
        if let Some(t) = st.ping_unanswered {
            if t.elapsed() > self.cfg.peer_timeout {
                return Err(LinkError::Lost {
                    why: format!("{} has not answered a PING for {}s", self.cfg.server, t.elapsed().as_secs()),
                    source: None,
                });
            }
        }
        Ok(())
    }

    /// Send one frame. A data-path frame (one with a sequence number, which
    /// must be above every earlier one) first waits, with the deadline,
    /// until the window has room for it; other frames go at once.
    pub fn send(&mut self, m: &Msg) -> Result<(), LinkError> {
        self.buf.clear();
        m.encode(&mut self.buf);
        let n = self.buf.len() as u64;
        if let Some(seq) = m.seq() {
            let acked = self.acked();
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
            Self::check_closed(&self.shared.lock())?;
        }
        let mut w = lock(&self.w);
        w.w.write_all(&self.buf).map_err(lost)?;
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
    pub fn window(&self) -> u64 {
        (self.acked_last_s / 2).clamp(self.cfg.min_window, self.cfg.max_window)
    }

    /// Push buffered frames to the stream.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        lock(&self.w).w.flush().map_err(lost)
    }

    /// Block until everything up to `seq` is durable (or the deadline).
    pub fn wait_acked(&mut self, seq: u64) -> Result<(), LinkError> {
        self.flush()?;
        self.wait_for(|st| (st.acked >= seq).then_some(()))
    }

    /// Block until the server reports the point for tag `seq`; its id.
    pub fn wait_point(&mut self, seq: u64) -> Result<u64, LinkError> {
        self.flush()?;
        self.wait_for(|st| st.points.iter().find(|(s, _)| *s == seq).map(|&(_, id)| id))
    }

    /// The server's name from HELLO_ACK, e.g. `ferry-process-server 0.1.0`.
    pub fn server_peer(&self) -> &str {
        &self.server_peer
    }

    /// Wait at most `d` for the point of tag `seq`: `None` if it did not
    /// come by then (a relay's point waits for the master target).
    pub fn wait_point_for(&mut self, seq: u64, d: Duration) -> Result<Option<u64>, LinkError> {
        self.flush()?;
        let until = Instant::now() + d;
        self.wait_for(|st| match st.points.iter().find(|(s, _)| *s == seq) {
            Some(&(_, id)) => Some(Some(id)),
            None if Instant::now() >= until => Some(None),
            None => None,
        })
    }

    /// The points reported since the last call, `(seq, id)` in arrival
    /// order, without waiting (a relay that passes them on). A point taken
    /// here is no longer seen by [`Client::wait_point`].
    pub fn take_points(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.shared.lock().points)
    }

    /// Ask for the replica's checksums of `count` chunks from `offset`;
    /// returns the request number for [`Client::recv_sums`].
    pub fn request_sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<u64, LinkError> {
        let req = self.next_req;
        self.next_req += 1;
        self.send(&Msg::SumsReq { req, offset, chunk, count })?;
        Ok(req)
    }

    /// The answer to SUMS request `req`, which must cover `count` chunks
    /// from `offset`. Answers come in request order; any that arrive first
    /// for other requests are kept for their own call.
    pub fn recv_sums(&mut self, req: u64, offset: u64, count: usize) -> Result<Vec<[u8; 16]>, LinkError> {
        self.flush()?;
        let since = Instant::now();
        loop {
            if let Some((roff, sums)) = self.stash.remove(&req) {
                if roff != offset || sums.len() != count {
                    return Err(LinkError::Lost {
                        why: format!("checksum answer {req} covers {} chunks at {roff}, asked {count} at {offset}", sums.len()),
                        source: None,
                    });
                }
                return Ok(sums);
            }
            match self.sums_rx.recv_timeout(STEP) {
                Ok(Msg::Sums { req: r, offset: o, sums, .. }) => {
                    self.stash.insert(r, (o, sums));
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => self.check_deadline(&self.shared.lock(), since)?,
                Err(RecvTimeoutError::Disconnected) => {
                    Self::check_closed(&self.shared.lock())?;
                    return Err(LinkError::Lost { why: "connection ended while waiting for checksums".into(), source: None });
                }
            }
        }
    }

    /// Whether the connection has ended (the peer closed it, sent ERROR, or
    /// a read failed).
    pub fn ended(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Close the connection, pushing out what is buffered unless it already
    /// ended (flushing a dead link could wait for the whole write timeout).
    pub fn close(mut self) {
        if !self.ended() {
            let _ = self.flush();
        }
        // Drop shuts the connection down.
    }
}

impl<S: Stream> Drop for Client<S> {
    /// The receiver thread sees the end and stops; the pinger stops with the
    /// writer.
    fn drop(&mut self) {
        let _ = self.ctl.shutdown();
    }
}

fn lost(e: std::io::Error) -> LinkError {
    LinkError::Lost { why: e.to_string(), source: Some(e) }
}

/// Reads every frame from the server and publishes it; ends with the
/// connection, recording why.
fn receiver<S: Stream>(mut r: BufReader<S>, sh: Arc<Shared>, tx: std::sync::mpsc::Sender<Msg>, server: String) {
    let end = loop {
        let f = read_frame(&mut r);
        if let Ok(Some(_)) = &f {
            let mut st = sh.lock();
            st.last_rx = Some(Instant::now());
            st.ping_unanswered = None;
        }
        match f {
            Ok(Some(Msg::Pong { .. })) => sh.cv.notify_all(),
            Ok(Some(Msg::Ack { durable_seq })) => {
                let mut st = sh.lock();
                st.acked = st.acked.max(durable_seq);
                st.last_ack_ns = ferry_common::now_ns();
                sh.cv.notify_all();
            }
            Ok(Some(Msg::Point { seq, id })) => {
                sh.lock().points.push((seq, id));
                sh.cv.notify_all();
            }
            Ok(Some(m @ Msg::Sums { .. })) => {
                if let Msg::Sums { sums, .. } = &m {
                    sh.lock().bytes_received += 40 + 16 * sums.len() as u64;
                }
                if tx.send(m).is_err() {
                    break (None, "session dropped".to_string());
                }
            }
            Ok(Some(Msg::Error { code, msg })) => break (Some(code), msg),
            Ok(Some(other)) => break (None, format!("unexpected frame from {server}: {other:?}")),
            Ok(None) => break (None, format!("{server} closed the connection")),
            Err(e) => break (None, e.to_string()),
        }
    };
    let mut st = sh.lock();
    st.closed = Some(end);
    sh.cv.notify_all();
    // Dropping tx wakes a caller blocked on SUMS.
}

/// Sends a PING whenever the caller has sent nothing for `every`; ends with
/// the client (the writer is gone) or the connection.
fn pinger<S: Stream>(w: Weak<Mutex<Writer<S>>>, sh: Arc<Shared>, every: Duration) {
    let mut token = 0u64;
    let tick = (every / 4).clamp(Duration::from_millis(10), STEP);
    loop {
        std::thread::sleep(tick);
        let Some(w) = w.upgrade() else { return };
        if sh.lock().closed.is_some() {
            return;
        }
        let mut g = lock(&w);
        if g.last_tx.elapsed() < every {
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
        sh.lock().ping_unanswered.get_or_insert_with(Instant::now);
    }
}
