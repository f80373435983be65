//! The server side of the wire protocol (master target now, a process
//! server next): HELLO/OPEN, frames validated and batched into a [`Sink`],
//! acknowledged once the sink made them durable, checksum answers, PONG,
//! and ERROR then close on anything wrong.
//!
//! One thread per connection runs [`serve`] to the end of the stream; it
//! both reads and writes (a reader and a writer handle of the same
//! [`Stream`]). What receives the stream is the [`Sink`] an [`Sinks`]
//! opened for the disk named in OPEN: the server knows the protocol, the
//! sink knows the disk.

use crate::{Fail, Stream};
use ferry_proto::{decompress, read_frame, write_msg, ErrorCode, Msg, PointKind, ProtoError, VERSION_MAX, VERSION_MIN};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant};

/// Apply a batch once it holds this many payload bytes...
pub const BATCH_BYTES: usize = 16 << 20;
/// ...or this many frames, or once its first frame is this old (so a slow
/// link still sees acknowledgements, and a connection cut every second or
/// two still moves the client's cursor), or when no more input is waiting.
pub const BATCH_OPS: usize = 4096;
pub const BATCH_AGE: Duration = Duration::from_millis(250);
/// HELLO (and a v1 client's OPEN) must arrive within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A v2 stream silent this long (no frame, not even a PING) is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A reply that cannot be written for this long ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The server's settings; the defaults are the master target's.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Sent in HELLO_ACK, e.g. `ferry-master-target 0.1.0`.
    pub peer: String,
    /// What this side is called in messages ("this master target").
    pub role: String,
    /// Protocol versions served.
    pub versions: (u16, u16),
    pub handshake_timeout: Duration,
    /// From HELLO_ACK on, a v2 stream silent this long is dropped and its
    /// sink released (clients ping after 10 s of silence). A v1 stream has
    /// no idle deadline once open: v1 clients never ping.
    pub idle: Duration,
    pub write_timeout: Duration,
}

impl ServerConfig {
    pub fn new(peer: impl Into<String>) -> ServerConfig {
        ServerConfig {
            peer: peer.into(),
            role: "this server".into(),
            versions: (VERSION_MIN, VERSION_MAX),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle: IDLE_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

/// One change handed to a sink, already checked against its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Raw bytes at `offset` (DATA decompressed, or REF resolved).
    Write { seq: u64, offset: u64, data: Vec<u8> },
    /// `[offset, offset+len)` reads as zeroes (ZERO, DISCARD).
    Zero { seq: u64, offset: u64, len: u32 },
    /// The stream up to `seq` is a recovery point.
    Tag { seq: u64, time_ns: u64, kind: PointKind },
    /// DATA as it came, payload still in its codec: only for a sink that
    /// [keeps frames](Sink::keeps_frames) (a spool that forwards it).
    Data { seq: u64, offset: u64, len: u32, codec: ferry_proto::Codec, payload: Vec<u8> },
    /// REF as it came, unresolved: only for a sink that keeps frames; the
    /// next hop resolves (and verifies) it.
    Ref { seq: u64, offset: u64, len: u32, src: u64, digest: [u8; 32] },
    /// XREF (v3) as it came, unresolved: only for a sink that keeps frames.
    XRef { seq: u64, offset: u64, len: u32, src: u64, digest: [u8; 32], disk: String },
}

impl Op {
    /// The byte range the op writes, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data, .. } => Some((*offset, *offset + data.len() as u64)),
            Op::Zero { offset, len, .. } | Op::Data { offset, len, .. } | Op::Ref { offset, len, .. } | Op::XRef { offset, len, .. } => {
                Some((*offset, *offset + u64::from(*len)))
            }
            Op::Tag { .. } => None,
        }
    }
}

/// What opening a sink found, reported to the client in OPEN_ACK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenInfo {
    /// The sink already held this disk.
    pub existed: bool,
    /// ...from the generation the client offered.
    pub same_generation: bool,
}

/// What receives one disk's stream: the master target's disk (replica,
/// journal, catalog) now, a process server's spool next. Calls come from
/// the connection's thread, in stream order.
pub trait Sink {
    /// The disk's size in bytes: every extent must lie inside it.
    fn size(&self) -> u64;
    /// The highest sequence number made durable (reported in OPEN_ACK and
    /// ACK).
    fn durable_seq(&self) -> u64;
    /// Apply `ops` (increasing sequence numbers, above `durable_seq`)
    /// durably and in order; afterwards `durable_seq` is the last op's.
    /// Returns `(seq, id)` of each recovery point made for the batch's tags.
    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<(u64, u64)>, Fail>;
    /// The `len` bytes at `src` when their BLAKE3 is `digest`, else `None`
    /// (a REF to content the sink does not hold).
    fn resolve_ref(&mut self, src: u64, len: u32, digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail>;
    /// The `len` bytes at `src` of another disk of this server, `disk`,
    /// when their BLAKE3 is `digest` (an XREF from a process server), else
    /// `None`. Default: never (a reference miss).
    fn resolve_xref(&mut self, _disk: &str, _src: u64, _len: u32, _digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail> {
        Ok(None)
    }
    /// xxh3-128 of `count` chunks of `chunk` bytes from `offset` (< size),
    /// as applied so far; a chunk past the end is hashed over its part
    /// inside, so there may be fewer sums.
    fn sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<Vec<[u8; 16]>, Fail>;
    /// The stream is idle (a PING, everything before it applied): a moment
    /// for housekeeping such as making checksums durable.
    fn idle(&mut self) -> Result<(), Fail> {
        Ok(())
    }
    /// For a sink that learns of points after `apply` returned (a spool:
    /// a point exists once the next hop made it durable): how often the
    /// server asks [`Sink::late_points`] while it waits for the next frame.
    /// `None` (the default): every point comes from `apply`, and the server
    /// simply blocks on the next frame.
    fn tick(&self) -> Option<Duration> {
        None
    }
    /// `(seq, id)` of points made since the last call for tags applied
    /// earlier; sent to the client as POINT at once.
    fn late_points(&mut self) -> Result<Vec<(u64, u64)>, Fail> {
        Ok(Vec::new())
    }
    /// `true` for a sink that stores frames to send them on (a spool): DATA
    /// reaches it as [`Op::Data`] (checked to decode, kept compressed) and
    /// REF as [`Op::Ref`] (not resolved here). Default `false`: DATA is
    /// decompressed and REF resolved into [`Op::Write`].
    fn keeps_frames(&self) -> bool {
        false
    }
    /// Whether this stream may carry XREF (another disk's content): a
    /// sink that keeps frames says no unless its peer is a process server.
    fn accepts_xref(&self) -> bool {
        true
    }
}

/// Opens the sink for the disk a client names in OPEN. Shared by every
/// connection of a listener.
pub trait Sinks: Send + Sync {
    type Sink: Sink;
    /// Open (or create) disk `name` of `size` bytes for the client `peer`
    /// (its HELLO name) proven to be `who` (its TLS certificate, if the
    /// link runs TLS), or refuse with the code the client is told.
    fn open(
        &self,
        peer: &str,
        who: Option<&ferry_identity::Identity>,
        name: &str,
        size: u64,
        generation: [u8; 16],
    ) -> Result<(Self::Sink, OpenInfo), Fail>;
    /// The listener's state as JSON, for a STATUS_REQ (v3) from `who`;
    /// `None`: this server does not report one.
    fn status(&self, _who: Option<&ferry_identity::Identity>) -> Option<String> {
        None
    }
}

/// A frame's bytes may come no slower than this once its deadline is
/// near: each byte read extends the deadline by 1/MIN_RATE s, so a slow
/// link still delivers a large frame while a peer that trickles a byte now
/// and then cannot hold a disk.
const MIN_RATE: u64 = 16 << 10;

/// The server's read side, with a deadline for a whole frame (the wait for
/// it included): the stream's limit (the handshake's, then the idle
/// timeout) from the moment the frame is asked for, plus 1 s per 16 KiB
/// read. A socket read timeout alone restarts with every byte.
struct Paced<S: Stream> {
    s: S,
    limit: Option<Duration>,
    until: Option<Instant>,
}

impl<S: Stream> Read for Paced<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(u) = self.until {
            let left = u.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the frame's deadline passed"));
            }
            self.s.set_read_timeout(Some(left))?;
        }
        let n = self.s.read(buf)?;
        if let Some(u) = self.until.as_mut() {
            *u += Duration::from_micros(n as u64 * 1_000_000 / MIN_RATE);
        }
        Ok(n)
    }
}

/// The two handles of a served connection.
struct Conn<S: Stream> {
    r: BufReader<Paced<S>>,
    w: BufWriter<S>,
}

impl<S: Stream> Conn<S> {
    fn recv(&mut self) -> Result<Option<Msg>, Fail> {
        let limit = self.r.get_ref().limit;
        self.r.get_mut().until = limit.map(|l| Instant::now() + l);
        let r = read_frame(&mut self.r);
        self.r.get_mut().until = None;
        match r {
            Err(ProtoError::Io(e)) if ferry_common::net::is_timeout(&e) => {
                let t = limit.unwrap_or_default();
                Err(Fail::new(ErrorCode::Internal, format!("no frame from the peer for {}s: a dead or stuck peer; closing", t.as_secs())))
            }
            r => Ok(r?),
        }
    }

    fn send(&mut self, m: &Msg) -> Result<(), Fail> {
        write_msg(&mut self.w, m)?;
        Ok(())
    }

    fn set_timeout(&mut self, t: Option<Duration>) {
        let p = self.r.get_mut();
        p.limit = t;
        let _ = p.s.set_read_timeout(t);
    }

    /// Whether more input is already waiting (buffered, or in the stream).
    fn more_waiting(&self) -> bool {
        !self.r.buffer().is_empty() || self.r.get_ref().s.input_waiting()
    }
}

/// Serve one connection to its end: the handshake, then the stream into the
/// sink that `sinks` opens. Anything wrong is sent to the peer as ERROR,
/// logged with the peer and the disk, and returned; the connection is then
/// closed (dropped) and the sink released.
pub fn serve<S: Stream, K: Sinks>(stream: S, sinks: &K, cfg: &ServerConfig) -> Result<(), Fail> {
    let peer = stream.peer();
    // Every wait on the peer has a deadline: the handshake must come within
    // handshake_timeout, and a write that cannot go out for write_timeout
    // ends the connection.
    let _ = stream.set_read_timeout(Some(cfg.handshake_timeout));
    let _ = stream.set_write_timeout(Some(cfg.write_timeout));
    let mut c = match stream.try_clone() {
        Ok(r) => Conn {
            // 256 KiB: std zeroes a BufReader's whole buffer at its first fill, so
            // this is what each connection costs even idle; larger frames are
            // read past it straight into their own buffers.
            r: BufReader::with_capacity(256 << 10, Paced { s: r, limit: Some(cfg.handshake_timeout), until: None }),
            w: BufWriter::with_capacity(1 << 16, stream),
        },
        Err(e) => {
            log::warn!("{peer}: {e}");
            return Err(e.into());
        }
    };
    let mut disk_name = String::from("-");
    let r = session(&mut c, sinks, cfg, &mut disk_name);
    match &r {
        Ok(()) => log::info!("{peer} disk {disk_name}: stream closed"),
        Err(f) => {
            log::warn!("{peer} disk {disk_name}: {}; connection closed", f.msg);
            let _ = write_msg(&mut c.w, &Msg::Error { code: f.code, msg: f.msg.clone() });
            let _ = c.w.flush();
        }
    }
    r
}

fn session<S: Stream, K: Sinks>(c: &mut Conn<S>, sinks: &K, cfg: &ServerConfig, disk_name: &mut String) -> Result<(), Fail> {
    let Some(first) = c.recv()? else { return Ok(()) };
    let Msg::Hello { min, max, peer } = first else {
        return Err(Fail::new(ErrorCode::BadFrame, "expected HELLO first"));
    };
    let (vmin, vmax) = cfg.versions;
    if max < vmin || min > vmax {
        return Err(Fail::new(
            ErrorCode::UnsupportedVersion,
            format!("peer {peer} speaks protocol v{min}..v{max}, {} v{vmin}..v{vmax}: upgrade the older side", cfg.role),
        ));
    }
    let version = max.min(vmax);
    if version >= 2 {
        // A v2 client pings every 10 s when it has nothing else to say: a
        // connection silent for longer is a dead or stuck peer, and must not
        // hold the disk. This deadline already covers OPEN.
        c.set_timeout(Some(cfg.idle));
    }
    c.send(&Msg::HelloAck { version, peer: cfg.peer.clone() })?;
    c.w.flush()?;
    let (name, size, generation) = match c.recv()? {
        Some(Msg::Open { name, size, generation }) => (name, size, generation),
        Some(Msg::StatusReq) if version >= 3 => {
            *disk_name = "(status)".into();
            let who = c.w.get_ref().identity();
            let json =
                sinks.status(who.as_ref()).ok_or_else(|| Fail::new(ErrorCode::BadFrame, format!("{} does not report status", cfg.role)))?;
            c.send(&Msg::Status { json })?;
            c.w.flush()?;
            return Ok(());
        }
        _ => return Err(Fail::new(ErrorCode::NotOpen, "expected OPEN after HELLO")),
    };
    if version < 2 {
        // v1 clients never ping: an idle v1 stream is legitimate.
        c.set_timeout(None);
    }
    *disk_name = name.clone();
    let who = c.w.get_ref().identity();
    let (mut sink, info) = sinks.open(&peer, who.as_ref(), &name, size, generation)?;
    let mut flags = 0;
    if info.existed {
        flags |= ferry_proto::OPEN_EXISTS;
    }
    if info.same_generation {
        flags |= ferry_proto::OPEN_SAME_GENERATION;
    }
    c.send(&Msg::OpenAck { durable_seq: sink.durable_seq(), flags, generation })?;
    c.w.flush()?;
    stream(c, &mut sink, version)
}

/// The pending batch: ops not yet applied, and their payload bytes.
struct Batch {
    ops: Vec<Op>,
    bytes: usize,
    started: Instant,
}

fn stream<S: Stream, K: Sink>(c: &mut Conn<S>, sink: &mut K, version: u16) -> Result<(), Fail> {
    let mut b = Batch { ops: Vec::new(), bytes: 0, started: Instant::now() };
    let mut last_seq = sink.durable_seq();
    let size = sink.size();
    let tick = sink.tick();
    let mut last_frame = Instant::now();
    let result = loop {
        if let Some(tick) = tick {
            if let Err(f) = quiet_wait(c, sink, tick, last_frame) {
                break Err(f);
            }
        }
        let msg = match c.recv() {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(f) => break Err(f),
        };
        last_frame = Instant::now();
        if let Err(f) = frame(c, sink, &mut b, &mut last_seq, size, version, msg) {
            break Err(f);
        }
        // One rule after every frame, whatever its type: a batch is applied
        // and acknowledged when it is large, old, or when nothing more is
        // waiting; answers (SUMS) go out when nothing more is waiting. A
        // frame the peer waits on is never left sitting here (a pending
        // batch behind a SUMS_REQ once was: both sides waited forever).
        let idle = !c.more_waiting();
        if !b.ops.is_empty() && (idle || b.bytes >= BATCH_BYTES || b.ops.len() >= BATCH_OPS || b.started.elapsed() >= BATCH_AGE) {
            if let Err(f) = flush(c, sink, &mut b) {
                break Err(f);
            }
        } else if idle {
            if let Err(e) = c.w.flush() {
                break Err(e.into());
            }
        }
    };
    // Whatever valid frames preceded the end (or the bad frame) are applied:
    // they were well-formed and in order, and the client may rely on them.
    let tail = flush(c, sink, &mut b);
    result.and(tail)
}

/// For a sink with late points: wait until input is waiting, sending late
/// points every `tick` meanwhile, within the same deadline as a blocking
/// read (the stream's read timeout, counted from the last frame).
fn quiet_wait<S: Stream, K: Sink>(c: &mut Conn<S>, sink: &mut K, tick: Duration, last_frame: Instant) -> Result<(), Fail> {
    let limit = c.r.get_ref().limit;
    loop {
        let late = sink.late_points()?;
        if !late.is_empty() {
            for (seq, id) in late {
                c.send(&Msg::Point { seq, id })?;
            }
            c.w.flush()?;
        }
        if c.more_waiting() {
            return Ok(());
        }
        if let Some(l) = limit.filter(|&l| last_frame.elapsed() >= l) {
            return Err(Fail::new(
                ErrorCode::Internal,
                format!("no frame from the peer for {}s: a dead or stuck peer; closing", l.as_secs()),
            ));
        }
        c.r.get_ref().s.wait_input(tick);
    }
}

/// Handle one frame of an open stream.
fn frame<S: Stream, K: Sink>(
    c: &mut Conn<S>,
    sink: &mut K,
    b: &mut Batch,
    last_seq: &mut u64,
    size: u64,
    version: u16,
    msg: Msg,
) -> Result<(), Fail> {
    if let Some(seq) = msg.seq() {
        if seq <= *last_seq {
            return Err(Fail::new(ErrorCode::BadSequence, format!("frame seq {seq} does not follow {last_seq}")));
        }
        *last_seq = seq;
    }
    let in_disk = |off: u64, len: u32| -> Result<(), Fail> {
        if off + u64::from(len) > size {
            return Err(Fail::new(ErrorCode::OutOfRange, format!("extent {off}+{len} is past the end of the {size}-byte disk")));
        }
        Ok(())
    };
    // A reference resolved here reads the replica: what the pending batch
    // writes into its source must be applied first.
    if let (Msg::Ref { src, len, .. }, false) = (&msg, sink.keeps_frames()) {
        let (a, z) = (*src, *src + u64::from(*len));
        if b.ops.iter().any(|op| op.range().is_some_and(|(x, y)| x < z && a < y)) {
            flush(c, sink, b)?;
        }
    }
    let op = match msg {
        Msg::Data { seq, offset, len, codec, payload } if sink.keeps_frames() => {
            in_disk(offset, len)?;
            if codec != ferry_proto::Codec::Raw {
                // A payload that does not decode is refused here, not after
                // it was acknowledged and stored.
                decompress(codec, &payload, len)?;
            } else if payload.len() != len as usize {
                return Err(Fail::new(
                    ErrorCode::BadFrame,
                    format!("DATA seq {seq}: {} payload bytes for a {len}-byte extent", payload.len()),
                ));
            }
            Op::Data { seq, offset, len, codec, payload }
        }
        Msg::Data { seq, offset, len, codec, payload } => {
            in_disk(offset, len)?;
            Op::Write { seq, offset, data: decompress(codec, &payload, len)? }
        }
        Msg::Ref { seq, offset, len, src, digest } if sink.keeps_frames() => {
            in_disk(offset, len)?;
            in_disk(src, len)?;
            Op::Ref { seq, offset, len, src, digest }
        }
        Msg::Ref { seq, offset, len, src, digest } => {
            in_disk(offset, len)?;
            match sink.resolve_ref(src, len, &digest)? {
                Some(data) => Op::Write { seq, offset, data },
                None => return Err(Fail::new(ErrorCode::RefMiss, format!("REF seq {seq}: content not held; resend it as DATA"))),
            }
        }
        Msg::XRef { seq, .. } if version < 3 || !sink.accepts_xref() => {
            return Err(Fail::new(ErrorCode::BadFrame, format!("XREF seq {seq}: not accepted on this stream (v{version})")))
        }
        Msg::XRef { seq, offset, len, src, digest, disk } if sink.keeps_frames() => {
            in_disk(offset, len)?;
            Op::XRef { seq, offset, len, src, digest, disk }
        }
        Msg::XRef { seq, offset, len, src, digest, disk } => {
            in_disk(offset, len)?;
            match sink.resolve_xref(&disk, src, len, &digest)? {
                Some(data) => Op::Write { seq, offset, data },
                None => {
                    return Err(Fail::new(
                        ErrorCode::RefMiss,
                        format!("XREF seq {seq}: content of disk {disk} not held; resend it as DATA"),
                    ))
                }
            }
        }
        Msg::Zero { seq, offset, len } | Msg::Discard { seq, offset, len } => {
            in_disk(offset, len)?;
            Op::Zero { seq, offset, len }
        }
        Msg::Tag { seq, time_ns, kind } => Op::Tag { seq, time_ns, kind },
        Msg::SumsReq { req, offset, chunk, count } => {
            if offset >= size {
                return Err(Fail::new(ErrorCode::OutOfRange, format!("checksum range at {offset} is past the end of the disk")));
            }
            // Checksums must see every earlier frame: apply the pending
            // batch first if it touches the range (a scan asks ahead of the
            // data it sends, so usually it does not).
            let end = offset + u64::from(chunk) * u64::from(count);
            if b.ops.iter().any(|op| op.range().is_some_and(|(a, z)| a < end && offset < z)) {
                flush(c, sink, b)?;
            }
            let sums = sink.sums(offset, chunk, count)?;
            return c.send(&Msg::Sums { req, offset, chunk, sums });
        }
        Msg::Ping { token } if version >= 2 => {
            // Answered once everything before it is durable; an idle stream
            // is the moment for the sink's housekeeping.
            flush(c, sink, b)?;
            sink.idle()?;
            return c.send(&Msg::Pong { token });
        }
        other => {
            return Err(Fail::new(ErrorCode::BadFrame, format!("unexpected {other:?} in a stream").chars().take(200).collect::<String>()))
        }
    };
    if b.ops.is_empty() {
        b.started = Instant::now();
    }
    b.bytes += match &op {
        Op::Write { data, .. } => data.len(),
        Op::Data { payload, .. } => payload.len(),
        _ => 64,
    };
    b.ops.push(op);
    Ok(())
}

/// Apply the batch durably, then acknowledge it (and report its points).
fn flush<S: Stream, K: Sink>(c: &mut Conn<S>, sink: &mut K, b: &mut Batch) -> Result<(), Fail> {
    if b.ops.is_empty() {
        return Ok(());
    }
    let points = sink.apply(std::mem::take(&mut b.ops))?;
    b.bytes = 0;
    c.send(&Msg::Ack { durable_seq: sink.durable_seq() })?;
    for (seq, id) in points {
        c.send(&Msg::Point { seq, id })?;
    }
    c.w.flush()?;
    Ok(())
}
