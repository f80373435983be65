//! A small NBD server (the fixed-newstyle protocol of
//! https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md) for
//! one export: a [`PointView`]. Enough for qemu-img, qemu-nbd clients,
//! nbdinfo/nbdcopy and the Linux nbd driver:
//!
//! - handshake: fixed newstyle, NO_ZEROES; options EXPORT_NAME, GO, INFO
//!   (with NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE), LIST, ABORT; any other
//!   option is answered NBD_REP_ERR_UNSUP (structured replies and metadata
//!   contexts included, so clients fall back to simple replies);
//! - transmission: READ, WRITE, WRITE_ZEROES and TRIM (into the overlay,
//!   with `--writable`; EPERM otherwise), FLUSH (nothing to make durable:
//!   the overlay is thrown away), DISC; anything else EINVAL.
//!
//! Requests above 32 MiB are refused with EINVAL (a WRITE that large ends
//! the connection, its payload being unreadable as a request stream). A
//! malformed request (bad magic) ends the connection. Connections come from
//! the link layer's accept loop (`ferry_link::accept`: at most 1024 at once,
//! a thread each, keepalive, the handshake within 30 s, every reply written
//! within 60 s); they share the view (and so the overlay) under a mutex.

use crate::store::view::PointView;
use ferry_link::accept::{self, Limits, Service};
use ferry_link::{AnyStream, TlsStream};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_TRIM: u16 = 32;
const TFLAG_SEND_WRITE_ZEROES: u16 = 64;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Largest request served.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Serve `view` as export `name` on `listener` until the process ends;
/// with `tls`, only over TLS (NBD's STARTTLS, as qemu and libnbd speak it
/// with x509 credentials) with a client certificate of the site's CA.
pub fn serve(listener: TcpListener, name: String, view: PointView, tls: Option<Tls>) -> io::Result<()> {
    accept::serve(listener, Limits::default(), Arc::new(Export { name, view: Mutex::new(view), tls }))
}

/// One export: its name and the point it serves.
struct Export {
    name: String,
    view: Mutex<PointView>,
    tls: Option<Tls>,
}

/// An export's TLS: the configuration, and the watch that cuts a reader
/// whose certificate is revoked.
pub type Tls = (Arc<rustls::ServerConfig>, Arc<ferry_link::Watch>);

impl Service for Export {
    fn serve(&self, conn: TcpStream) {
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        match session(conn, &self.name, &self.view, self.tls.as_ref()) {
            Ok(()) => log::info!("nbd client {peer} disconnected"),
            Err(e) => log::warn!("nbd client {peer}: {e}"),
        }
    }
    // Past the limit a client is closed before the greeting: NBD has no
    // way to say busy.
}

fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// The export name of an INFO/GO option's data, and its info requests.
fn parse_go(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = String::from_utf8(data.get(4..4 + n)?.to_vec()).ok()?;
    let k = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
    let reqs = data.get(6 + n..6 + n + 2 * k)?;
    if data.len() != 6 + n + 2 * k {
        return None;
    }
    Some((name, reqs.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

fn session(mut tcp: TcpStream, name: &str, view: &Mutex<PointView>, tls: Option<&Tls>) -> io::Result<()> {
    // Deadlines (set by the accept loop): the handshake within 30 s, every
    // reply written within 60 s; keepalive finds a client whose machine is
    // gone. Once transmission starts a client may be idle for as long as it
    // likes (a booted VM): the read deadline is lifted below.
    let (size, writable) = {
        let v = view.lock().map_err(|_| bad("view lock poisoned"))?;
        (v.size, v.writable())
    };
    let tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | if writable { TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES } else { TFLAG_READ_ONLY };
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    tcp.write_all(&hello)?;
    let cflags = rd_u32(&mut tcp)?;
    if cflags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(bad("client does not speak fixed newstyle"));
    }
    let no_zeroes = cflags & u32::from(FLAG_NO_ZEROES) != 0;
    let ours = |n: &str| n == name || n.is_empty();
    let mut s = AnyStream::Tcp(tcp);
    // Option haggling.
    loop {
        if rd_u64(&mut s)? != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let opt = rd_u32(&mut s)?;
        let len = rd_u32(&mut s)?;
        if len > 65536 {
            return Err(bad("option data too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let plain = matches!(s, AnyStream::Tcp(_));
        if tls.is_some() && plain && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            // TLS first: EXPORT_NAME has no error reply, so it ends the
            // connection; the others are told TLS is required.
            if opt == OPT_EXPORT_NAME {
                return Err(bad("plaintext EXPORT_NAME on a TLS-only export"));
            }
            opt_reply(&mut s, opt, REP_ERR_TLS_REQD, b"this export requires TLS (x509 credentials of the site's CA)")?;
            continue;
        }
        match opt {
            OPT_STARTTLS => {
                let Some((config, watch)) = tls else {
                    opt_reply(&mut s, opt, REP_ERR_UNSUP, b"this export runs without TLS")?;
                    continue;
                };
                if !plain || !data.is_empty() {
                    opt_reply(&mut s, opt, REP_ERR_INVALID, b"STARTTLS takes no data and comes once")?;
                    continue;
                }
                opt_reply(&mut s, opt, REP_ACK, &[])?;
                s = match s {
                    AnyStream::Tcp(tcp) => {
                        let t = TlsStream::accept(tcp, config.clone())?;
                        log::info!("nbd client {}: TLS", ferry_link::Stream::peer(&t));
                        watch.add(&t);
                        AnyStream::Tls(t)
                    }
                    tls => tls,
                };
            }
            OPT_EXPORT_NAME => {
                let n = String::from_utf8_lossy(&data);
                if !ours(&n) {
                    return Err(bad(format!("no export {n:?}")));
                }
                let mut b = Vec::new();
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                break;
            }
            OPT_ABORT => {
                let _ = opt_reply(&mut s, opt, REP_ACK, &[]);
                return Ok(());
            }
            OPT_LIST => {
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                opt_reply(&mut s, opt, REP_SERVER, &d)?;
                opt_reply(&mut s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((n, reqs)) = parse_go(&data) else {
                    opt_reply(&mut s, opt, REP_ERR_INVALID, b"malformed INFO/GO data")?;
                    continue;
                };
                if !ours(&n) {
                    opt_reply(&mut s, opt, REP_ERR_UNKNOWN, format!("no export {n:?}").as_bytes())?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                opt_reply(&mut s, opt, REP_INFO, &info)?;
                if reqs.contains(&INFO_BLOCK_SIZE) {
                    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&4096u32.to_be_bytes());
                    bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    opt_reply(&mut s, opt, REP_INFO, &bs)?;
                }
                opt_reply(&mut s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            _ => opt_reply(&mut s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    ferry_link::Stream::set_read_timeout(&s, None)?;
    transmission(s, view)
}

fn reply(s: &mut impl Write, handle: u64, err: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&err.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

fn transmission(mut s: AnyStream, view: &Mutex<PointView>) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        if rd_u32(&mut s)? != REQUEST_MAGIC {
            return Err(bad("bad request magic"));
        }
        let _flags = rd_u16(&mut s)?;
        let cmd = rd_u16(&mut s)?;
        let handle = rd_u64(&mut s)?;
        let offset = rd_u64(&mut s)?;
        let len = rd_u32(&mut s)?;
        if cmd == CMD_WRITE {
            if len > MAX_REQUEST {
                return Err(bad(format!("write of {len} bytes: above the {MAX_REQUEST}-byte limit")));
            }
            buf.resize(len as usize, 0);
            s.read_exact(&mut buf)?;
        }
        let mut v = view.lock().map_err(|_| bad("view lock poisoned"))?;
        let err_of = |e: &crate::store::view::ViewError| match e {
            crate::store::view::ViewError::Range { .. } => EINVAL,
            crate::store::view::ViewError::Io { source, .. } if source.raw_os_error() == Some(libc::EPERM) => EPERM,
            _ => EIO,
        };
        match cmd {
            CMD_READ => {
                if len > MAX_REQUEST {
                    reply(&mut s, handle, EINVAL, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match v.read(offset, &mut buf) {
                    Ok(()) => reply(&mut s, handle, 0, &buf)?,
                    Err(e) => {
                        log::warn!("nbd read at {offset}: {e}");
                        reply(&mut s, handle, err_of(&e), &[])?
                    }
                }
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
                let r = if !v.writable() {
                    Err(EPERM)
                } else if cmd == CMD_WRITE {
                    v.write(offset, u64::from(len), Some(&buf)).map_err(|e| err_of(&e))
                } else {
                    v.write(offset, u64::from(len), None).map_err(|e| err_of(&e))
                };
                reply(&mut s, handle, r.err().unwrap_or(0), &[])?;
            }
            CMD_FLUSH => reply(&mut s, handle, 0, &[])?,
            CMD_DISC => return Ok(()),
            _ => reply(&mut s, handle, EINVAL, &[])?,
        }
    }
}
