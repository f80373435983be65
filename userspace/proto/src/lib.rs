//! ferry wire protocol, version 1 (specified in docs/protocol.md).
//!
//! The same protocol is spoken agent → process server → master target. It
//! runs over one TCP (later TLS) connection per disk. Every message is one
//! frame:
//!
//! ```text
//! frame  = MAGIC:u32 || TYPE:u8 || FLAGS:u8 (0) || RESERVED:u16 (0)
//!          || BODY_LEN:u32 || BODY || XXH3_128(header || BODY):16
//! ```
//!
//! All integers are little-endian. `BODY_LEN` is at most [`MAX_BODY`]; a
//! decoder rejects anything longer *before* allocating, rejects a frame whose
//! checksum does not match, and validates every field of the body (lengths,
//! offsets that overflow, unknown codecs or kinds) in [`Msg::decode_body`], so
//! that a [`Msg`] value is always well-formed. Bounds that depend on the disk
//! (an extent past its end) are checked by the receiver, which knows the size.
//!
//! Flow (client = agent or process server, server = master target):
//!
//! ```text
//! C: HELLO(min,max,peer)          S: HELLO_ACK(version,peer) | ERROR
//! C: OPEN(name,size,generation)   S: OPEN_ACK(durable_seq,flags,generation) | ERROR
//! C: DATA/ZERO/DISCARD/REF/TAG (seq strictly increasing), SUMS_REQ ...
//! S: ACK(durable_seq) after the frames up to it are durable,
//!    POINT(seq,id) when a TAG became a recovery point,
//!    SUMS(...) answering SUMS_REQ in stream order, ERROR then close.
//! ```
//!
//! The client keeps at most a window of unacknowledged bytes in flight and
//! drops nothing before it is acknowledged; after a reconnect it resumes from
//! the server's `durable_seq`.
//!
//! This crate is the frames only; the two state machines that speak them
//! (handshake, window, acknowledgements, PING, deadlines) are `ferry-link`.

use std::io::{self, Read, Write};
use xxhash_rust::const_xxh3::xxh3_64 as const_xxh3_64;

/// Protocol versions this build speaks.
pub const VERSION_MIN: u16 = 1;
pub const VERSION_MAX: u16 = 3;

/// Frame magic: low 32 bits of xxh3-64("ferry wire frame v1"). Do not modify.
pub const MAGIC: u32 = const_xxh3_64(b"ferry wire frame v1") as u32;
/// Fixed frame header size.
pub const HEADER_LEN: usize = 12;
/// Trailing checksum size.
pub const TRAILER_LEN: usize = 16;
/// Largest extent carried by one DATA/ZERO/DISCARD/REF frame (4 MiB).
pub const MAX_EXTENT: u32 = 4 << 20;
/// Largest body accepted: a DATA frame of MAX_EXTENT raw bytes plus room.
pub const MAX_BODY: u32 = MAX_EXTENT + 4096;
/// Most checksums in one SUMS frame.
pub const MAX_SUMS: u32 = 65_536;
/// Extents must be aligned to and multiples of this (one sector).
pub const SECTOR: u64 = 512;
/// Longest name or message string.
pub const MAX_STR: usize = 1024;

/// Payload encodings of a DATA frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// Recovery point kinds, as carried by TAG and stored in the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointKind {
    /// Equals the source at one instant.
    Crash = 1,
    /// Equals the source at a freeze of its filesystems or applications.
    App = 2,
    /// A consistency group's shared point: crash-consistent, at the same
    /// instant as the points of the same time on the group's other disks.
    Group = 3,
}

impl PointKind {
    pub fn from_u8(v: u8) -> Option<PointKind> {
        match v {
            1 => Some(PointKind::Crash),
            2 => Some(PointKind::App),
            3 => Some(PointKind::Group),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
            PointKind::Group => "group",
        }
    }
}

/// OPEN_ACK flag: the server already holds a replica of this disk.
pub const OPEN_EXISTS: u32 = 1;
/// OPEN_ACK flag: the server's replica belongs to the generation offered.
pub const OPEN_SAME_GENERATION: u32 = 2;

/// ERROR codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    UnsupportedVersion = 1,
    BadFrame = 2,
    Checksum = 3,
    OutOfRange = 4,
    SizeChanged = 5,
    Busy = 6,
    RefMiss = 7,
    Internal = 8,
    BadSequence = 9,
    NotOpen = 10,
    /// Refused for good (today: the disk's failover is committed).
    Refused = 11,
    /// The disk is failed over on the server, not yet committed: refused
    /// until the failover is cancelled (retry later) or committed (then 11).
    FailedOver = 12,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            1 => UnsupportedVersion,
            2 => BadFrame,
            3 => Checksum,
            4 => OutOfRange,
            5 => SizeChanged,
            6 => Busy,
            7 => RefMiss,
            8 => Internal,
            9 => BadSequence,
            10 => NotOpen,
            11 => Refused,
            12 => FailedOver,
            _ => return None,
        })
    }
}

/// One protocol message, always well-formed once decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello {
        min: u16,
        max: u16,
        peer: String,
    },
    HelloAck {
        version: u16,
        peer: String,
    },
    Open {
        name: String,
        size: u64,
        generation: [u8; 16],
    },
    OpenAck {
        durable_seq: u64,
        flags: u32,
        generation: [u8; 16],
    },
    /// Bytes at `offset`; `payload` is `len` raw bytes or their zstd frame.
    Data {
        seq: u64,
        offset: u64,
        len: u32,
        codec: Codec,
        payload: Vec<u8>,
    },
    /// `[offset, offset+len)` reads as zero (write-zeroes, or zero data).
    Zero {
        seq: u64,
        offset: u64,
        len: u32,
    },
    /// `[offset, offset+len)` was discarded; the replica stores zeroes.
    Discard {
        seq: u64,
        offset: u64,
        len: u32,
    },
    /// Bytes at `offset` equal the `len` bytes already sent to `src`, whose
    /// BLAKE3 is `digest`. The receiver verifies the digest against what it
    /// holds at `src` and answers ERROR RefMiss if they differ.
    Ref {
        seq: u64,
        offset: u64,
        len: u32,
        src: u64,
        digest: [u8; 32],
    },
    /// v3, from a process server: bytes at `offset` equal the `len` bytes
    /// at `src` of another disk, `disk`, on the same server, whose BLAKE3
    /// is `digest` (cross-machine dedup). Verified like REF.
    XRef {
        seq: u64,
        offset: u64,
        len: u32,
        src: u64,
        digest: [u8; 32],
        disk: String,
    },
    /// Consistency marker: the stream up to `seq` is a recovery point.
    Tag {
        seq: u64,
        time_ns: u64,
        kind: PointKind,
    },
    Ack {
        durable_seq: u64,
    },
    SumsReq {
        req: u64,
        offset: u64,
        chunk: u32,
        count: u32,
    },
    Sums {
        req: u64,
        offset: u64,
        chunk: u32,
        sums: Vec<[u8; 16]>,
    },
    Point {
        seq: u64,
        id: u64,
    },
    Error {
        code: ErrorCode,
        msg: String,
    },
    /// v2: the client is alive and idle; the server answers PONG with the
    /// same token once every earlier frame is applied and acknowledged.
    Ping {
        token: u64,
    },
    Pong {
        token: u64,
    },
    /// v3: instead of OPEN, ask the server for its state (`ferry status`
    /// of a process server); answered by STATUS, then the server closes.
    StatusReq,
    /// v3: the server's state as JSON (UTF-8, at most `MAX_BODY - 4`).
    Status {
        json: String,
    },
}

/// Why a frame was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame magic {0:#010x} (not a ferry peer, or a ferry too old or new)")]
    Magic(u32),
    #[error("frame body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLarge(u32),
    #[error("frame checksum mismatch (corrupted in transit)")]
    Checksum,
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
}

impl ProtoError {
    /// The ERROR code a receiver should answer this with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::Checksum => ErrorCode::Checksum,
            ProtoError::Io(_) => ErrorCode::Internal,
            _ => ErrorCode::BadFrame,
        }
    }
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const OPEN: u8 = 0x03;
    pub const OPEN_ACK: u8 = 0x04;
    pub const DATA: u8 = 0x10;
    pub const ZERO: u8 = 0x11;
    pub const DISCARD: u8 = 0x12;
    pub const REF: u8 = 0x13;
    pub const TAG: u8 = 0x14;
    pub const XREF: u8 = 0x15;
    pub const ACK: u8 = 0x20;
    pub const SUMS_REQ: u8 = 0x21;
    pub const SUMS: u8 = 0x22;
    pub const POINT: u8 = 0x23;
    pub const ERROR: u8 = 0x30;
    pub const PING: u8 = 0x24;
    pub const PONG: u8 = 0x25;
    pub const STATUS_REQ: u8 = 0x40;
    pub const STATUS: u8 = 0x41;
}

/// Little-endian body cursor that turns every short read into an error.
struct Rd<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn bad(&self, why: impl Into<String>) -> ProtoError {
        ProtoError::Malformed { what: self.what, why: why.into() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(self.bad(format!("truncated: wanted {n} more bytes, have {}", self.b.len())));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        Ok(self.take(N)?.try_into().expect("N"))
    }
    fn zeros(&mut self, n: usize) -> Result<(), ProtoError> {
        if self.take(n)?.iter().any(|&b| b != 0) {
            return Err(self.bad("reserved bytes are not zero"));
        }
        Ok(())
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return Err(self.bad(format!("string of {n} bytes exceeds {MAX_STR}")));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), ProtoError> {
        if !self.b.is_empty() {
            return Err(self.bad(format!("{} trailing bytes", self.b.len())));
        }
        Ok(())
    }
    /// An extent: aligned to SECTOR, 1..=MAX_EXTENT bytes, not overflowing.
    fn extent(&mut self) -> Result<(u64, u64, u32), ProtoError> {
        let seq = self.u64()?;
        let offset = self.u64()?;
        let len = self.u32()?;
        if len == 0 || len > MAX_EXTENT {
            return Err(self.bad(format!("extent length {len} not in 1..={MAX_EXTENT}")));
        }
        if offset % SECTOR != 0 || u64::from(len) % SECTOR != 0 {
            return Err(self.bad(format!("extent {offset}+{len} not aligned to {SECTOR} bytes")));
        }
        if offset.checked_add(u64::from(len)).is_none() {
            return Err(self.bad("extent end overflows"));
        }
        Ok((seq, offset, len))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_STR)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

impl Msg {
    fn type_byte(&self) -> u8 {
        match self {
            Msg::Hello { .. } => ty::HELLO,
            Msg::HelloAck { .. } => ty::HELLO_ACK,
            Msg::Open { .. } => ty::OPEN,
            Msg::OpenAck { .. } => ty::OPEN_ACK,
            Msg::Data { .. } => ty::DATA,
            Msg::Zero { .. } => ty::ZERO,
            Msg::Discard { .. } => ty::DISCARD,
            Msg::Ref { .. } => ty::REF,
            Msg::Tag { .. } => ty::TAG,
            Msg::XRef { .. } => ty::XREF,
            Msg::Ack { .. } => ty::ACK,
            Msg::SumsReq { .. } => ty::SUMS_REQ,
            Msg::Sums { .. } => ty::SUMS,
            Msg::Point { .. } => ty::POINT,
            Msg::Error { .. } => ty::ERROR,
            Msg::Ping { .. } => ty::PING,
            Msg::Pong { .. } => ty::PONG,
            Msg::StatusReq => ty::STATUS_REQ,
            Msg::Status { .. } => ty::STATUS,
        }
    }

    /// The stream sequence number of a data-path frame.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Msg::Data { seq, .. }
            | Msg::Zero { seq, .. }
            | Msg::Discard { seq, .. }
            | Msg::Ref { seq, .. }
            | Msg::XRef { seq, .. }
            | Msg::Tag { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    fn encode_body(&self, o: &mut Vec<u8>) {
        let ext = |o: &mut Vec<u8>, seq: u64, offset: u64, len: u32| {
            o.extend_from_slice(&seq.to_le_bytes());
            o.extend_from_slice(&offset.to_le_bytes());
            o.extend_from_slice(&len.to_le_bytes());
        };
        match self {
            Msg::Hello { min, max, peer } => {
                o.extend_from_slice(&min.to_le_bytes());
                o.extend_from_slice(&max.to_le_bytes());
                put_str(o, peer);
            }
            Msg::HelloAck { version, peer } => {
                o.extend_from_slice(&version.to_le_bytes());
                put_str(o, peer);
            }
            Msg::Open { name, size, generation } => {
                o.extend_from_slice(&size.to_le_bytes());
                o.extend_from_slice(generation);
                put_str(o, name);
            }
            Msg::OpenAck { durable_seq, flags, generation } => {
                o.extend_from_slice(&durable_seq.to_le_bytes());
                o.extend_from_slice(&flags.to_le_bytes());
                o.extend_from_slice(&[0; 4]);
                o.extend_from_slice(generation);
            }
            Msg::Data { seq, offset, len, codec, payload } => {
                ext(o, *seq, *offset, *len);
                o.push(*codec as u8);
                o.extend_from_slice(&[0; 3]);
                o.extend_from_slice(payload);
            }
            Msg::Zero { seq, offset, len } | Msg::Discard { seq, offset, len } => {
                ext(o, *seq, *offset, *len);
                o.extend_from_slice(&[0; 4]);
            }
            Msg::Ref { seq, offset, len, src, digest } => {
                ext(o, *seq, *offset, *len);
                o.extend_from_slice(&[0; 4]);
                o.extend_from_slice(&src.to_le_bytes());
                o.extend_from_slice(digest);
            }
            Msg::XRef { seq, offset, len, src, digest, disk } => {
                ext(o, *seq, *offset, *len);
                o.extend_from_slice(&[0; 4]);
                o.extend_from_slice(&src.to_le_bytes());
                o.extend_from_slice(digest);
                put_str(o, disk);
            }
            Msg::Tag { seq, time_ns, kind } => {
                o.extend_from_slice(&seq.to_le_bytes());
                o.extend_from_slice(&time_ns.to_le_bytes());
                o.push(*kind as u8);
                o.extend_from_slice(&[0; 7]);
            }
            Msg::Ack { durable_seq } => o.extend_from_slice(&durable_seq.to_le_bytes()),
            Msg::SumsReq { req, offset, chunk, count } => {
                o.extend_from_slice(&req.to_le_bytes());
                o.extend_from_slice(&offset.to_le_bytes());
                o.extend_from_slice(&chunk.to_le_bytes());
                o.extend_from_slice(&count.to_le_bytes());
            }
            Msg::Sums { req, offset, chunk, sums } => {
                o.extend_from_slice(&req.to_le_bytes());
                o.extend_from_slice(&offset.to_le_bytes());
                o.extend_from_slice(&chunk.to_le_bytes());
                o.extend_from_slice(&(sums.len() as u32).to_le_bytes());
                for s in sums {
                    o.extend_from_slice(s);
                }
            }
            Msg::Point { seq, id } => {
                o.extend_from_slice(&seq.to_le_bytes());
                o.extend_from_slice(&id.to_le_bytes());
            }
            Msg::Error { code, msg } => {
                o.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str(o, msg);
            }
            Msg::Ping { token } | Msg::Pong { token } => o.extend_from_slice(&token.to_le_bytes()),
            Msg::StatusReq => {}
            Msg::Status { json } => {
                let b = &json.as_bytes()[..json.len().min(MAX_BODY as usize - 4)];
                o.extend_from_slice(&(b.len() as u32).to_le_bytes());
                o.extend_from_slice(b);
            }
        }
    }

    /// Append this message as one complete frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(self.type_byte());
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&[0; 4]); // length, patched below
        self.encode_body(out);
        let body_len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 8..start + 12].copy_from_slice(&body_len.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_128(&out[start..]).to_le_bytes();
        out.extend_from_slice(&sum);
    }

    /// Decode and validate a body of frame type `t`.
    pub fn decode_body(t: u8, body: &[u8]) -> Result<Msg, ProtoError> {
        let what = match t {
            ty::HELLO => "HELLO",
            ty::HELLO_ACK => "HELLO_ACK",
            ty::OPEN => "OPEN",
            ty::OPEN_ACK => "OPEN_ACK",
            ty::DATA => "DATA",
            ty::ZERO => "ZERO",
            ty::DISCARD => "DISCARD",
            ty::REF => "REF",
            ty::TAG => "TAG",
            ty::XREF => "XREF",
            ty::ACK => "ACK",
            ty::SUMS_REQ => "SUMS_REQ",
            ty::SUMS => "SUMS",
            ty::POINT => "POINT",
            ty::ERROR => "ERROR",
            ty::PING => "PING",
            ty::PONG => "PONG",
            ty::STATUS_REQ => "STATUS_REQ",
            ty::STATUS => "STATUS",
            other => return Err(ProtoError::UnknownType(other)),
        };
        let mut r = Rd { b: body, what };
        let m = match t {
            ty::HELLO => {
                let (min, max) = (r.u16()?, r.u16()?);
                if min > max {
                    return Err(r.bad(format!("version range {min}..{max} is empty")));
                }
                Msg::Hello { min, max, peer: r.string()? }
            }
            ty::HELLO_ACK => Msg::HelloAck { version: r.u16()?, peer: r.string()? },
            ty::OPEN => {
                let size = r.u64()?;
                let generation = r.arr()?;
                let name = r.string()?;
                if size == 0 || size % SECTOR != 0 {
                    return Err(r.bad(format!("disk size {size} is not a positive multiple of {SECTOR}")));
                }
                if !valid_name(&name) {
                    return Err(r.bad(format!("disk name {name:?} must be 1-64 of [A-Za-z0-9._-], not starting with '.'")));
                }
                Msg::Open { name, size, generation }
            }
            ty::OPEN_ACK => {
                let durable_seq = r.u64()?;
                let flags = r.u32()?;
                r.zeros(4)?;
                Msg::OpenAck { durable_seq, flags, generation: r.arr()? }
            }
            ty::DATA => {
                let (seq, offset, len) = r.extent()?;
                let codec = match r.u8()? {
                    0 => Codec::Raw,
                    1 => Codec::Zstd,
                    c => return Err(r.bad(format!("unknown codec {c}"))),
                };
                r.zeros(3)?;
                let payload = r.rest().to_vec();
                if codec == Codec::Raw && payload.len() != len as usize {
                    return Err(r.bad(format!("raw payload of {} bytes for a {len}-byte extent", payload.len())));
                }
                if payload.is_empty() {
                    return Err(r.bad("empty payload"));
                }
                Msg::Data { seq, offset, len, codec, payload }
            }
            ty::ZERO | ty::DISCARD => {
                let (seq, offset, len) = r.extent()?;
                r.zeros(4)?;
                if t == ty::ZERO {
                    Msg::Zero { seq, offset, len }
                } else {
                    Msg::Discard { seq, offset, len }
                }
            }
            ty::REF => {
                let (seq, offset, len) = r.extent()?;
                r.zeros(4)?;
                let src = r.u64()?;
                if src % SECTOR != 0 || src.checked_add(u64::from(len)).is_none() {
                    return Err(r.bad(format!("source {src} is not a sector-aligned extent start")));
                }
                Msg::Ref { seq, offset, len, src, digest: r.arr()? }
            }
            ty::XREF => {
                let (seq, offset, len) = r.extent()?;
                r.zeros(4)?;
                let src = r.u64()?;
                if src % SECTOR != 0 || src.checked_add(u64::from(len)).is_none() {
                    return Err(r.bad(format!("source {src} is not a sector-aligned extent start")));
                }
                let digest = r.arr()?;
                let disk = r.string()?;
                if !valid_name(&disk) {
                    return Err(r.bad(format!("source disk name {disk:?} must be 1-64 of [A-Za-z0-9._-], not starting with '.'")));
                }
                Msg::XRef { seq, offset, len, src, digest, disk }
            }
            ty::TAG => {
                let seq = r.u64()?;
                let time_ns = r.u64()?;
                let k = r.u8()?;
                let kind = PointKind::from_u8(k).ok_or_else(|| r.bad(format!("unknown point kind {k}")))?;
                r.zeros(7)?;
                Msg::Tag { seq, time_ns, kind }
            }
            ty::ACK => Msg::Ack { durable_seq: r.u64()? },
            ty::SUMS_REQ => {
                let (req, offset, chunk, count) = (r.u64()?, r.u64()?, r.u32()?, r.u32()?);
                check_sums_shape(&r, offset, chunk, count)?;
                Msg::SumsReq { req, offset, chunk, count }
            }
            ty::SUMS => {
                let (req, offset, chunk, count) = (r.u64()?, r.u64()?, r.u32()?, r.u32()?);
                check_sums_shape(&r, offset, chunk, count)?;
                if r.b.len() != count as usize * 16 {
                    return Err(r.bad(format!("{} bytes of sums for count {count}", r.b.len())));
                }
                let sums = r.rest().chunks_exact(16).map(|c| c.try_into().expect("16")).collect();
                Msg::Sums { req, offset, chunk, sums }
            }
            ty::POINT => Msg::Point { seq: r.u64()?, id: r.u64()? },
            ty::PING => Msg::Ping { token: r.u64()? },
            ty::PONG => Msg::Pong { token: r.u64()? },
            ty::STATUS_REQ => Msg::StatusReq,
            ty::STATUS => {
                let n = r.u32()? as usize;
                let b = r.take(n)?;
                Msg::Status { json: String::from_utf8(b.to_vec()).map_err(|_| r.bad("status is not UTF-8"))? }
            }
            ty::ERROR => {
                let c = r.u16()?;
                let code = ErrorCode::from_u16(c).ok_or_else(|| r.bad(format!("unknown error code {c}")))?;
                Msg::Error { code, msg: r.string()? }
            }
            _ => unreachable!("type checked above"),
        };
        r.end()?;
        Ok(m)
    }
}

fn check_sums_shape(r: &Rd<'_>, offset: u64, chunk: u32, count: u32) -> Result<(), ProtoError> {
    if !(SECTOR as u32..=MAX_EXTENT).contains(&chunk) || !chunk.is_multiple_of(SECTOR as u32) || !offset.is_multiple_of(SECTOR) {
        return Err(r.bad(format!("chunk {chunk} at {offset} is not a sector-aligned size up to {MAX_EXTENT}")));
    }
    if count == 0 || count > MAX_SUMS {
        return Err(r.bad(format!("count {count} not in 1..={MAX_SUMS}")));
    }
    if offset.checked_add(u64::from(chunk) * u64::from(count)).is_none() {
        return Err(r.bad("range overflows"));
    }
    Ok(())
}

/// A disk name: 1–64 bytes of `[A-Za-z0-9._-]`, not starting with `.`
/// (it names a folder on the master target).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Read one frame from `r`. `Ok(None)` on a clean end of stream before a frame.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Msg>, ProtoError> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-frame").into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    decode_after_header(&head, r).map(Some)
}

fn decode_after_header(head: &[u8; HEADER_LEN], r: &mut impl Read) -> Result<Msg, ProtoError> {
    let magic = u32::from_le_bytes(head[0..4].try_into().expect("4"));
    if magic != MAGIC {
        return Err(ProtoError::Magic(magic));
    }
    let t = head[4];
    if head[5..8] != [0, 0, 0] {
        return Err(ProtoError::Malformed { what: "frame header", why: "flags or reserved bytes are not zero".into() });
    }
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4"));
    if len > MAX_BODY {
        return Err(ProtoError::TooLarge(len));
    }
    let mut rest = vec![0u8; len as usize + TRAILER_LEN];
    r.read_exact(&mut rest)?;
    let (body, sum) = rest.split_at(len as usize);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(head);
    h.update(body);
    if h.digest128().to_le_bytes() != sum {
        return Err(ProtoError::Checksum);
    }
    Msg::decode_body(t, body)
}

/// Decode exactly one frame from a byte slice (for fuzzing and tests).
/// Returns the message and the bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<(Msg, usize), ProtoError> {
    let mut cur = io::Cursor::new(buf);
    match read_frame(&mut cur)? {
        Some(m) => Ok((m, cur.position() as usize)),
        None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty input").into()),
    }
}

/// The trailing checksum of a frame whose header and body are `b`.
pub fn frame_checksum(b: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(b).to_le_bytes()
}

/// Write one message as a frame.
pub fn write_msg(w: &mut impl Write, m: &Msg) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64);
    m.encode(&mut buf);
    w.write_all(&buf)
}

/// Compress `raw` with zstd level 1 when that saves at least 1/8; otherwise
/// return it raw. Returns the codec and the payload to send.
///
/// Payloads whose bytes look random (see [`looks_random`]), or whose byte
/// distribution leaves too little for entropy coding to save 1/8 (see
/// [`unpromising`]: fio's buffers, encrypted or already compressed data),
/// are rarely worth compressing, and zstd spends nearly as long failing on
/// them as compressing: after such a payload does not compress, the next
/// such ones of this thread are sent raw without trying, 1, 2, 4, ... up to
/// [`MAX_SKIP`] of them, until one compresses again. Other payloads (text,
/// zeros, anything with a clearly uneven byte distribution) are always
/// tried.
pub fn compress(raw: &[u8]) -> (Codec, Vec<u8>) {
    thread_local! {
        /// Unpromising payloads still to send without trying, and the
        /// length of the next skip.
        static BACKOFF: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
    }
    let random = looks_random(raw) || unpromising(raw);
    if random {
        let (left, next) = BACKOFF.get();
        if left > 0 {
            BACKOFF.set((left - 1, next));
            return (Codec::Raw, raw.to_vec());
        }
    }
    let (codec, payload) = compress_always(raw);
    if random {
        let (_, next) = BACKOFF.get();
        BACKOFF.set(match codec {
            Codec::Raw => (next.max(1), (next.max(1) * 2).min(MAX_SKIP)),
            Codec::Zstd => (0, 0),
        });
    }
    (codec, payload)
}

/// The most random-looking payloads of a thread sent raw without trying
/// zstd in a row (one in `MAX_SKIP + 1` is still tried).
pub const MAX_SKIP: u32 = 32;

/// The length of the pieces [`byte_counts`] samples.
const SAMPLE_PIECE: usize = 64;

/// How often each byte value occurs in `raw` (all of it when it is at most
/// `pieces` × 64 bytes, else `pieces` pieces of 64 bytes spread over it),
/// and how many bytes were counted. Four histograms are kept while
/// counting, so that neighbouring bytes do not wait on one another's count.
fn byte_counts(raw: &[u8], pieces: usize) -> ([u32; 256], usize) {
    let mut h = [[0u32; 256]; 4];
    let mut count = |b: &[u8]| {
        let mut q = b.chunks_exact(4);
        for c in &mut q {
            h[0][c[0] as usize] += 1;
            h[1][c[1] as usize] += 1;
            h[2][c[2] as usize] += 1;
            h[3][c[3] as usize] += 1;
        }
        for &x in q.remainder() {
            h[0][x as usize] += 1;
        }
    };
    let n = if raw.len() <= pieces * SAMPLE_PIECE {
        count(raw);
        raw.len()
    } else {
        let stride = (raw.len() - SAMPLE_PIECE) / (pieces - 1);
        for k in 0..pieces {
            count(&raw[k * stride..k * stride + SAMPLE_PIECE]);
        }
        pieces * SAMPLE_PIECE
    };
    let mut all = [0u32; 256];
    for (v, a) in all.iter_mut().enumerate() {
        *a = h[0][v] + h[1][v] + h[2][v] + h[3][v];
    }
    (all, n)
}

/// Whether the bytes of `raw` are about as evenly spread over the 256
/// values as random bytes (order 0: repeats are not seen). Counts 512
/// bytes of it, in 64-byte pieces spread over it (a fraction of what zstd
/// costs: about 0.3 us, zstd ~4 us on 4 KiB; 512 samples put random bytes
/// and the threshold ~20 standard deviations apart); a flatter distribution
/// than that of 128 equally likely values counts as random: zstd's entropy
/// coding could not save 1/8 of it.
pub fn looks_random(raw: &[u8]) -> bool {
    if raw.len() < 512 {
        return false; // small: just try
    }
    let (h, n) = byte_counts(raw, 8);
    let n = n as u64;
    // Collisions: sum c^2 - n is n(n-1)/256 expected for random bytes,
    // n(n-1)/128 for 128 equally likely values.
    let sq: u64 = h.iter().map(|&c| u64::from(c).pow(2)).sum();
    (sq - n) * 128 < n * (n - 1)
}

/// Whether the order-0 entropy of `raw`'s bytes (counted over up to 4 KiB:
/// all of a 4 KiB unit, 64 pieces of 64 bytes spread over a larger one) is
/// at least 7 bits a byte: entropy coding alone could not save 1/8. fio's
/// default buffers (about a tenth zero bytes, the rest even: about 7.6
/// bits; zstd saves 9%) are; text (about 4.5) and zeros are not. Repeats
/// are not seen: what zstd would find in them is found when the back-off
/// tries one ([`compress`]).
pub fn unpromising(raw: &[u8]) -> bool {
    const MAX: usize = 64 * SAMPLE_PIECE;
    /// `c * log2(c)` for every count up to [`MAX`].
    static CLOGC: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    if raw.len() < 512 {
        return false; // small: just try
    }
    let (h, n) = byte_counts(raw, 64);
    let t = CLOGC.get_or_init(|| (0..=MAX).map(|c| if c == 0 { 0.0 } else { c as f32 * (c as f32).log2() }).collect());
    // H = log2(n) - sum(c log2 c) / n
    let sum: f32 = h.iter().map(|&c| t[c as usize]).sum();
    (n as f32).log2() - sum / n as f32 >= 7.0
}

thread_local! {
    /// zstd compressions this thread ran (its tests count them).
    static ZSTD_TRIES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Compress `raw` with zstd level 1 when that saves at least 1/8, trying
/// whatever it looks like.
fn compress_always(raw: &[u8]) -> (Codec, Vec<u8>) {
    ZSTD_TRIES.set(ZSTD_TRIES.get() + 1);
    // One zstd context per thread, reused: making one per call (what
    // zstd::bulk::compress does) was the agent's largest CPU cost under
    // 4 KiB writes (ZSTD_createCCtx, ~8% of a loaded 2-core machine at
    // 25k writes a second). The output is the same.
    thread_local! {
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let c = CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(1).ok();
        }
        match c.as_mut() {
            Some(z) => z.compress(raw),
            None => zstd::bulk::compress(raw, 1),
        }
    });
    match c {
        Ok(c) if c.len() < raw.len() - raw.len() / 8 => (Codec::Zstd, c),
        _ => (Codec::Raw, raw.to_vec()),
    }
}

/// Recover the `len` raw bytes of a DATA payload, rejecting a payload that
/// does not decode to exactly `len` bytes.
pub fn decompress(codec: Codec, payload: &[u8], len: u32) -> Result<Vec<u8>, ProtoError> {
    let bad = |why: String| ProtoError::Malformed { what: "DATA", why };
    match codec {
        Codec::Raw => Ok(payload.to_vec()),
        Codec::Zstd => {
            // One context per thread, reused (as in compress).
            thread_local! {
                static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
            }
            let out = DCTX
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = zstd::bulk::Decompressor::new().ok();
                    }
                    match d.as_mut() {
                        Some(z) => z.decompress(payload, len as usize),
                        None => zstd::bulk::decompress(payload, len as usize),
                    }
                })
                .map_err(|e| bad(format!("zstd payload does not decode: {e}")))?;
            if out.len() != len as usize {
                return Err(bad(format!("zstd payload decodes to {} bytes, extent is {len}", out.len())));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_kinds() -> Vec<Msg> {
        vec![
            Msg::Hello { min: 1, max: 1, peer: "agent".into() },
            Msg::HelloAck { version: 1, peer: "mt".into() },
            Msg::Open { name: "db-1.disk0".into(), size: 1 << 30, generation: [7; 16] },
            Msg::OpenAck { durable_seq: 9, flags: OPEN_EXISTS, generation: [1; 16] },
            Msg::Data { seq: 1, offset: 4096, len: 512, codec: Codec::Raw, payload: vec![3; 512] },
            Msg::Zero { seq: 2, offset: 0, len: 4096 },
            Msg::Discard { seq: 3, offset: 512, len: 512 },
            Msg::Ref { seq: 4, offset: 8192, len: 4096, src: 0, digest: [9; 32] },
            Msg::Tag { seq: 5, time_ns: 123, kind: PointKind::App },
            Msg::Ack { durable_seq: 5 },
            Msg::SumsReq { req: 1, offset: 0, chunk: 4096, count: 3 },
            Msg::Sums { req: 1, offset: 0, chunk: 4096, sums: vec![[1; 16], [2; 16]] },
            Msg::Point { seq: 5, id: 2 },
            Msg::Error { code: ErrorCode::OutOfRange, msg: "past the end".into() },
            Msg::Ping { token: 77 },
            Msg::Pong { token: 77 },
            Msg::StatusReq,
            Msg::XRef { seq: 9, offset: 4096, len: 65536, src: 8192, digest: [3; 32], disk: "other-disk".into() },
            Msg::Status { json: "{\"disks\": []}".into() },
        ]
    }

    #[test]
    fn every_message_roundtrips() {
        for m in all_kinds() {
            let mut b = Vec::new();
            m.encode(&mut b);
            let (d, used) = decode_frame(&b).unwrap();
            assert_eq!(d, m);
            assert_eq!(used, b.len());
        }
    }

    #[test]
    fn flipped_bit_is_a_checksum_error() {
        let mut b = Vec::new();
        Msg::Zero { seq: 2, offset: 0, len: 4096 }.encode(&mut b);
        b[14] ^= 0x10;
        assert!(matches!(decode_frame(&b), Err(ProtoError::Checksum)));
    }

    #[test]
    fn oversize_length_is_rejected_before_reading_the_body() {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[ty::DATA, 0, 0, 0]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_frame(&b), Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn wrong_magic_and_unknown_type() {
        let mut b = Vec::new();
        Msg::Ack { durable_seq: 1 }.encode(&mut b);
        let mut m = b.clone();
        m[0] ^= 1;
        assert!(matches!(decode_frame(&m), Err(ProtoError::Magic(_))));
        // Unknown type with a valid checksum.
        let mut u = b[..HEADER_LEN + 8].to_vec();
        u[4] = 0x7f;
        let s = xxhash_rust::xxh3::xxh3_128(&u).to_le_bytes();
        u.extend_from_slice(&s);
        assert!(matches!(decode_frame(&u), Err(ProtoError::UnknownType(0x7f))));
    }

    fn frame_of(t: u8, body: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&[t, 0, 0, 0]);
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(body);
        let s = xxhash_rust::xxh3::xxh3_128(&b).to_le_bytes();
        b.extend_from_slice(&s);
        b
    }

    #[test]
    fn invalid_extents_are_rejected() {
        let ext = |off: u64, len: u32| {
            let mut b = 1u64.to_le_bytes().to_vec();
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            frame_of(ty::ZERO, &b)
        };
        assert!(decode_frame(&ext(0, 4096)).is_ok());
        for (off, len) in [(0, 0), (1, 512), (0, 513), (u64::MAX - 511, 512), (0, MAX_EXTENT + 512)] {
            assert!(matches!(decode_frame(&ext(off, len)), Err(ProtoError::Malformed { .. })), "{off}+{len}");
        }
    }

    #[test]
    fn raw_payload_must_match_length_and_zstd_must_decode_exactly() {
        let mut b = Vec::new();
        Msg::Data { seq: 1, offset: 0, len: 1024, codec: Codec::Raw, payload: vec![0; 512] }.encode(&mut b);
        assert!(decode_frame(&b).is_err());
        let (c, p) = compress(&[5u8; 4096]);
        assert_eq!(c, Codec::Zstd);
        assert_eq!(decompress(c, &p, 4096).unwrap(), vec![5u8; 4096]);
        assert!(decompress(c, &p, 8192).is_err());
        assert!(decompress(c, &p, 512).is_err());
        assert!(decompress(Codec::Zstd, b"not zstd", 512).is_err());
    }

    #[test]
    fn names_are_restricted() {
        assert!(valid_name("web-01.sda"));
        for n in ["", ".hidden", "a/b", "..", &"x".repeat(65), "sp ace"] {
            assert!(!valid_name(n), "{n:?}");
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_bodies_with_valid_checksums(t in 0u8..0x40, body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_frame(&frame_of(t, &body));
        }
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn random_payloads_back_off_and_compressible_ones_are_always_compressed() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog, 0123456789\n".iter().cycle().take(4096).copied().collect();
        assert!(looks_random(&noise(4096, 1)) && looks_random(&noise(1 << 20, 2)));
        assert!(!looks_random(&text) && !looks_random(&[0u8; 4096]) && !looks_random(&vec![7u8; 1 << 20]));
        for k in 0..200 {
            assert_eq!(compress(&noise(4096, k + 10)).0, Codec::Raw);
            // Between random payloads, text and zeros are still compressed.
            if k % 10 == 0 {
                let (c, p) = compress(&text);
                assert_eq!(c, Codec::Zstd);
                assert_eq!(decompress(c, &p, 4096).unwrap(), text);
                assert_eq!(compress(&[0u8; 4096]).0, Codec::Zstd);
            }
        }
        // Random-looking but repeating (zstd finds the repeat): compressed
        // again within a backoff, then every time.
        let half = noise(2048, 99);
        let rep: Vec<u8> = half.iter().chain(&half).copied().collect();
        assert!(looks_random(&rep));
        let codecs: Vec<Codec> = (0..=MAX_SKIP + 5).map(|_| compress(&rep).0).collect();
        let first = codecs.iter().position(|&c| c == Codec::Zstd).expect("tried within a backoff");
        assert!(first <= MAX_SKIP as usize);
        assert!(codecs[first..].iter().all(|&c| c == Codec::Zstd), "{codecs:?}");
        let (c, p) = compress(&rep);
        assert_eq!(decompress(c, &p, 4096).unwrap(), rep);
    }

    /// fio's default buffer content (a tenth zero bytes, the rest even):
    /// not random by [`looks_random`], but no saving of 1/8 either; such
    /// payloads back off as random ones do, and text in between is still
    /// compressed.
    #[test]
    fn payloads_that_cannot_save_an_eighth_back_off_too() {
        let fio_like = |seed: u64| -> Vec<u8> {
            let mut v = noise(4096, seed);
            for (i, b) in v.iter_mut().enumerate() {
                if i % 10 == 0 {
                    *b = 0;
                }
            }
            v
        };
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog, 0123456789\n".iter().cycle().take(4096).copied().collect();
        assert!(!looks_random(&fio_like(1)) && unpromising(&fio_like(1)));
        assert!(!unpromising(&text) && !unpromising(&[0u8; 4096]) && !unpromising(&vec![7u8; 1 << 20]));
        assert!(unpromising(&noise(1 << 20, 3)), "a large random payload, sampled");
        assert_eq!(compress_always(&fio_like(2)).0, Codec::Raw, "zstd saves less than 1/8 of it");
        let before = ZSTD_TRIES.get();
        for k in 0..200 {
            let raw = fio_like(k + 100);
            let (c, p) = compress(&raw);
            assert_eq!(decompress(c, &p, 4096).unwrap(), raw);
            if k % 10 == 0 {
                assert_eq!(compress(&text).0, Codec::Zstd, "text between them is still compressed");
            }
        }
        // 20 texts, and the fio-like payloads only at the back-off's ends
        // (1, 2, 4, ... 32 skipped between tries): about 10 of 200.
        let tries = ZSTD_TRIES.get() - before;
        assert!(tries <= 20 + 20, "zstd was tried {tries} times for 200 fio-like payloads and 20 texts");
    }
}
