//! The master target's network side: one thread per connection, one open
//! disk per connection, frames validated against the disk and applied in
//! durable batches (see `Disk::apply`), acknowledged after they are durable.

use crate::store::{Disk, DiskError, Op};
use ferry_proto::{decompress, read_frame, write_msg, ErrorCode, Msg, ProtoError, VERSION_MAX, VERSION_MIN};
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Apply a batch once it holds this many payload bytes...
const BATCH_BYTES: usize = 16 << 20;
/// ...or this many frames, or once its first frame is this old (so a slow
/// link still sees acknowledgements, and a connection cut every second or
/// two still moves the agent's cursor), or when no more input is waiting.
const BATCH_OPS: usize = 4096;
const BATCH_AGE: Duration = Duration::from_millis(250);
/// HELLO and OPEN must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A v2 stream silent this long (no frame, not even a PING) is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A reply that cannot be written for this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listening on {0} needs authentication, which this ferry does not have yet: listen on 127.0.0.1 or ::1")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("data folder {path}: {source}")]
    Data { path: String, source: io::Error },
}

/// Why a connection ended badly: sent to the peer as ERROR, then logged.
struct Fail {
    code: ErrorCode,
    msg: String,
}

impl Fail {
    fn new(code: ErrorCode, msg: impl Into<String>) -> Fail {
        Fail { code, msg: msg.into() }
    }
}

impl From<ProtoError> for Fail {
    fn from(e: ProtoError) -> Fail {
        Fail::new(e.code(), e.to_string())
    }
}

impl From<DiskError> for Fail {
    fn from(e: DiskError) -> Fail {
        let code = match e {
            DiskError::Busy(_) => ErrorCode::Busy,
            DiskError::SizeChanged { .. } => ErrorCode::SizeChanged,
            DiskError::FailedOver { .. } => ErrorCode::FailedOver,
            DiskError::FailedOverCommitted { .. } => ErrorCode::Refused,
            _ => ErrorCode::Internal,
        };
        Fail::new(code, e.to_string())
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail::new(ErrorCode::Internal, format!("connection: {e}"))
    }
}

/// Bind the listener (refusing non-loopback addresses for now).
pub fn bind(addr: SocketAddr, data: &Path) -> Result<TcpListener, ServeError> {
    if ferry_common::net::check_listen("listen", addr).is_err() {
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

/// Serve forever, with the default limits.
pub fn serve(listener: TcpListener, data: &Path) -> io::Result<()> {
    serve_with(listener, data, Limits::default())
}

/// Serve forever: one thread per connection, at most `limits.max_connections`.
pub fn serve_with(listener: TcpListener, data: &Path, limits: Limits) -> io::Result<()> {
    let data = Arc::new(data.to_path_buf());
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accept: {e}");
                continue;
            }
        };
        use std::sync::atomic::Ordering;
        if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            log::warn!(
                "{}: refused: {} connections already open (--max-connections)",
                conn.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                limits.max_connections
            );
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_msg(
                &mut conn,
                &Msg::Error { code: ErrorCode::Busy, msg: "the master target serves its maximum of connections; try again".into() },
            );
            continue;
        }
        let (data, open) = (Arc::clone(&data), Arc::clone(&open));
        std::thread::spawn(move || {
            handle(conn, &data, limits);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

fn handle(conn: TcpStream, data: &Path, limits: Limits) {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = conn.set_nodelay(true);
    // Every wait on the peer has a deadline: the handshake must come within
    // HANDSHAKE_TIMEOUT, a write that cannot go out for WRITE_TIMEOUT ends
    // the connection, and TCP keepalive finds a peer whose machine is gone.
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
    ferry_common::net::keepalive(&conn);
    let mut c = match Conn::new(conn) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("{peer}: {e}");
            return;
        }
    };
    let mut disk_name = String::from("-");
    let r = session(&mut c, data, &mut disk_name, limits);
    match r {
        Ok(()) => log::info!("{peer} disk {disk_name}: stream closed"),
        Err(f) => {
            log::warn!("{peer} disk {disk_name}: {}; connection closed", f.msg);
            let _ = write_msg(&mut c.w, &Msg::Error { code: f.code, msg: f.msg });
            let _ = c.w.flush();
        }
    }
}

struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    fd: i32,
}

impl Conn {
    fn new(s: TcpStream) -> io::Result<Conn> {
        let fd = s.as_raw_fd();
        Ok(Conn { r: BufReader::with_capacity(4 << 20, s.try_clone()?), w: BufWriter::with_capacity(1 << 16, s), fd })
    }

    fn recv(&mut self) -> Result<Option<Msg>, Fail> {
        match read_frame(&mut self.r) {
            Err(ProtoError::Io(e)) if ferry_common::net::is_timeout(&e) => {
                let t = self.r.get_ref().read_timeout().ok().flatten().unwrap_or_default();
                Err(Fail::new(ErrorCode::Internal, format!("no frame from the peer for {}s: a dead or stuck peer; closing", t.as_secs())))
            }
            r => Ok(r?),
        }
    }

    fn send(&mut self, m: &Msg) -> Result<(), Fail> {
        write_msg(&mut self.w, m)?;
        Ok(())
    }

    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.r.get_ref().set_read_timeout(t);
    }

    /// Whether more input is already waiting (buffered, or in the socket).
    fn more_waiting(&self) -> bool {
        if !self.r.buffer().is_empty() {
            return true;
        }
        let mut p = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, count 1, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0
    }
}

fn session(c: &mut Conn, data: &Path, disk_name: &mut String, limits: Limits) -> Result<(), Fail> {
    let Some(first) = c.recv()? else { return Ok(()) };
    let Msg::Hello { min, max, peer } = first else {
        return Err(Fail::new(ErrorCode::BadFrame, "expected HELLO first"));
    };
    if max < VERSION_MIN || min > VERSION_MAX {
        return Err(Fail::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "peer {peer} speaks protocol v{min}..v{max}, this master target v{VERSION_MIN}..v{VERSION_MAX}: upgrade the older side"
            ),
        ));
    }
    let version = max.min(VERSION_MAX);
    if version >= 2 {
        // A v2 client pings every PING_EVERY when it has nothing else to
        // say: a connection silent for longer is a dead or stuck peer, and
        // must not hold the disk.
        c.set_timeout(Some(limits.idle));
    }
    c.send(&Msg::HelloAck { version, peer: format!("ferry-master-target {}", env!("CARGO_PKG_VERSION")) })?;
    c.w.flush()?;
    let Some(Msg::Open { name, size, generation }) = c.recv()? else {
        return Err(Fail::new(ErrorCode::NotOpen, "expected OPEN after HELLO"));
    };
    if version < 2 {
        // v1 clients never ping: an idle v1 stream is legitimate.
        c.set_timeout(None);
    }
    *disk_name = name.clone();
    let (mut disk, info) = Disk::open(data, &name, size, generation)?;
    log::info!("disk {name}: stream opened by {peer}, {size} bytes, durable to seq {}", disk.durable_seq);
    let mut flags = 0;
    if info.existed {
        flags |= ferry_proto::OPEN_EXISTS;
    }
    if info.same_generation {
        flags |= ferry_proto::OPEN_SAME_GENERATION;
    }
    c.send(&Msg::OpenAck { durable_seq: disk.durable_seq, flags, generation })?;
    c.w.flush()?;
    stream(c, &mut disk, version)
}

fn stream(c: &mut Conn, disk: &mut Disk, version: u16) -> Result<(), Fail> {
    let mut batch: Vec<Op> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut last_seq = disk.durable_seq;
    let mut batch_started = Instant::now();
    let result = loop {
        let msg = match c.recv() {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(f) => break Err(f),
        };
        if let Some(seq) = msg.seq() {
            if seq <= last_seq {
                break Err(Fail::new(ErrorCode::BadSequence, format!("frame seq {seq} does not follow {last_seq}")));
            }
            last_seq = seq;
        }
        let in_disk = |off: u64, len: u32| -> Result<(), Fail> {
            if off + u64::from(len) > disk.size {
                return Err(Fail::new(ErrorCode::OutOfRange, format!("extent {off}+{len} is past the end of the {}-byte disk", disk.size)));
            }
            Ok(())
        };
        let op = match msg {
            Msg::Data { seq, offset, len, codec, payload } => {
                if let Err(f) = in_disk(offset, len) {
                    break Err(f);
                }
                let raw = match decompress(codec, &payload, len) {
                    Ok(r) => r,
                    Err(e) => break Err(e.into()),
                };
                Some(Op::Write { seq, offset, data: raw })
            }
            Msg::Ref { seq, offset, len, src, digest } => {
                if let Err(f) = in_disk(offset, len) {
                    break Err(f);
                }
                match disk.resolve_ref(src, len, &digest) {
                    Ok(Some(d)) => Some(Op::Write { seq, offset, data: d }),
                    Ok(None) => break Err(Fail::new(ErrorCode::RefMiss, format!("REF seq {seq}: content not held; resend it as DATA"))),
                    Err(e) => break Err(e.into()),
                }
            }
            Msg::Zero { seq, offset, len } | Msg::Discard { seq, offset, len } => {
                if let Err(f) = in_disk(offset, len) {
                    break Err(f);
                }
                Some(Op::Zero { seq, offset, len })
            }
            Msg::Tag { seq, time_ns, kind } => Some(Op::Tag { seq, time_ns, kind }),
            Msg::SumsReq { req, offset, chunk, count } => {
                if offset >= disk.size {
                    break Err(Fail::new(ErrorCode::OutOfRange, format!("checksum range at {offset} is past the end of the disk")));
                }
                // Checksums must see every earlier frame: apply the pending
                // batch first if it touches the range (a scan asks ahead of
                // the data it sends, so usually it does not).
                let end = offset + u64::from(chunk) * u64::from(count);
                if batch.iter().any(|op| op.range().is_some_and(|(a, b)| a < end && offset < b)) {
                    if let Err(f) = flush(c, disk, &mut batch, &mut batch_bytes) {
                        break Err(f);
                    }
                }
                match disk.sums(offset, chunk, count) {
                    Ok(sums) => {
                        if let Err(f) = c.send(&Msg::Sums { req, offset, chunk, sums }) {
                            break Err(f);
                        }
                    }
                    Err(e) => break Err(e.into()),
                }
                None
            }
            Msg::Ping { token } if version >= 2 => {
                // Answered once everything before it is durable; an idle
                // stream is the moment to make the replica's sums durable.
                if let Err(f) = flush(c, disk, &mut batch, &mut batch_bytes) {
                    break Err(f);
                }
                if let Err(e) = disk.sync_sums() {
                    break Err(e.into());
                }
                if let Err(f) = c.send(&Msg::Pong { token }) {
                    break Err(f);
                }
                None
            }
            other => {
                break Err(Fail::new(
                    ErrorCode::BadFrame,
                    format!("unexpected {other:?} in a stream").chars().take(200).collect::<String>(),
                ))
            }
        };
        if let Some(op) = op {
            if batch.is_empty() {
                batch_started = Instant::now();
            }
            batch_bytes += match &op {
                Op::Write { data, .. } => data.len(),
                _ => 64,
            };
            batch.push(op);
        }
        // One rule after every frame, whatever its type: a batch is applied
        // and acknowledged when it is large, old, or when nothing more is
        // waiting; answers (SUMS) go out when nothing more is waiting. A
        // frame the peer waits on is never left sitting here (a pending
        // batch behind a SUMS_REQ once was: both sides waited forever).
        let idle = !c.more_waiting();
        if !batch.is_empty() && (idle || batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_OPS || batch_started.elapsed() >= BATCH_AGE) {
            if let Err(f) = flush(c, disk, &mut batch, &mut batch_bytes) {
                break Err(f);
            }
        } else if idle {
            if let Err(e) = c.w.flush() {
                break Err(e.into());
            }
        }
    };
    // Whatever valid frames preceded the end (or the bad frame) are applied:
    // they were well-formed and in order, and the agent may rely on them.
    let tail = flush(c, disk, &mut batch, &mut batch_bytes);
    result.and(tail)
}

/// Apply the batch durably, then acknowledge it (and report its points).
fn flush(c: &mut Conn, disk: &mut Disk, batch: &mut Vec<Op>, bytes: &mut usize) -> Result<(), Fail> {
    if batch.is_empty() {
        return Ok(());
    }
    let points = disk.apply(batch)?;
    batch.clear();
    *bytes = 0;
    c.send(&Msg::Ack { durable_seq: disk.durable_seq })?;
    for p in points {
        log::info!("disk {}: recovery point {} ({}) at seq {}", disk.name, p.id, p.kind.as_str(), p.seq);
        c.send(&Msg::Point { seq: p.seq, id: p.id })?;
    }
    // Best effort: the peer may already be gone after a bad frame.
    if let Err(e) = c.w.flush() {
        return Err(e.into());
    }
    Ok(())
}
