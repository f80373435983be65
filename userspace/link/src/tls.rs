//! TLS as a [`Stream`]: the link's client and server run over it unchanged.
//!
//! One rustls connection serves two threads (the link reads on one and
//! writes on the other), so the socket is never read or written while the
//! connection's lock is held: a reader takes raw bytes from the socket
//! first and decrypts them under the lock; a writer encrypts under the lock
//! into a buffer and sends it after (under a second lock that keeps records
//! in order). Neither side can then block the other on a full socket.
//!
//! [`Watch`] re-checks every open connection's peer certificate every two
//! seconds against the current trust (revocation list, expiry) and cuts
//! those that no longer pass: a revocation takes effect on open streams
//! within seconds.

use crate::stream::Stream;
use ferry_identity::tls::{describe, Trust};
use ferry_identity::Identity;
use rustls::pki_types::CertificateDer;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

struct State {
    conn: rustls::Connection,
    /// Raw bytes read from the socket that rustls has not taken yet:
    /// `pending[pos..]`.
    pending: Vec<u8>,
    pos: usize,
}

impl State {
    /// Hand rustls what it takes of the raw bytes held (it takes about a
    /// record at a time); how many it took.
    fn take_pending(&mut self) -> io::Result<usize> {
        let mut s: &[u8] = &self.pending[self.pos..];
        let before = s.len();
        self.conn.read_tls(&mut s)?;
        let used = before - s.len();
        self.pos += used;
        if self.pos == self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        Ok(used)
    }
}

struct Inner {
    sock: TcpStream,
    state: Mutex<State>,
    /// Held while encrypted bytes go out, so records leave in order; the
    /// buffer they are encrypted into.
    wlock: Mutex<Vec<u8>>,
    /// Held by the one reader of the socket; the buffer it reads into.
    rlock: Mutex<Vec<u8>>,
    identity: Option<Identity>,
    chain: Vec<CertificateDer<'static>>,
    label: String,
}

/// A TLS connection over TCP whose handles share one session.
#[derive(Clone)]
pub struct TlsStream {
    inner: Arc<Inner>,
}

/// A TLS error as an io::Error: refusals of an identity (ours by the peer,
/// or the peer's by us) are `PermissionDenied`, so callers can tell "enroll
/// again" from a link that broke.
fn tls_io(e: rustls::Error) -> io::Error {
    use rustls::AlertDescription as A;
    let refusal = matches!(
        e,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(
                A::CertificateRevoked
                    | A::CertificateExpired
                    | A::BadCertificate
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::CertificateRequired
                    | A::CertificateUnknown
                    | A::UnsupportedCertificate
            )
    );
    let kind = if refusal { io::ErrorKind::PermissionDenied } else { io::ErrorKind::InvalidData };
    io::Error::new(kind, describe(&e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsStream {
    fn handshake(mut sock: TcpStream, mut conn: rustls::Connection) -> io::Result<TlsStream> {
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| match e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
                Some(t) => tls_io(t.clone()),
                None => e,
            })?;
        }
        // Send what the handshake left (a server's session tickets).
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        let chain: Vec<CertificateDer<'static>> =
            conn.peer_certificates().map(|c| c.iter().map(|d| d.clone().into_owned()).collect()).unwrap_or_default();
        let identity = chain.first().and_then(|c| ferry_identity::identity_of(c).ok());
        let addr = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let label = match &identity {
            Some(i) => format!("{} ({addr})", i.label()),
            None => addr,
        };
        Ok(TlsStream {
            inner: Arc::new(Inner {
                sock,
                state: Mutex::new(State { conn, pending: Vec::new(), pos: 0 }),
                wlock: Mutex::new(Vec::new()),
                rlock: Mutex::new(vec![0u8; 64 << 10]),
                identity,
                chain,
                label,
            }),
        })
    }

    /// The server's side: handshake on an accepted socket (its read
    /// deadline bounds the handshake).
    pub fn accept(sock: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_io)?;
        TlsStream::handshake(sock, conn.into())
    }

    /// The client's side: handshake on a connected socket within `deadline`.
    pub fn connect(sock: TcpStream, config: Arc<rustls::ClientConfig>, deadline: Duration) -> io::Result<TlsStream> {
        sock.set_read_timeout(Some(deadline))?;
        sock.set_write_timeout(Some(deadline))?;
        let conn = rustls::ClientConnection::new(config, ferry_identity::tls::server_name()).map_err(tls_io)?;
        TlsStream::handshake(sock, conn.into())
    }

    /// Who the peer's certificate names.
    pub fn identity(&self) -> Option<&Identity> {
        self.inner.identity.as_ref()
    }

    /// Send what rustls holds for the peer (alerts, key updates), unless a
    /// writer is sending now (it sends them with its own records).
    fn flush_pending(&self) -> io::Result<()> {
        let Ok(mut out) = self.inner.wlock.try_lock() else { return Ok(()) };
        out.clear();
        {
            let mut st = lock(&self.inner.state);
            while st.conn.wants_write() {
                st.conn.write_tls(&mut *out)?;
            }
        }
        (&self.inner.sock).write_all(&out)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut raw = lock(&self.inner.rlock);
        loop {
            {
                let mut st = lock(&self.inner.state);
                match st.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if st.pos < st.pending.len() {
                    st.take_pending()?;
                    let r = st.conn.process_new_packets();
                    drop(st);
                    if let Err(e) = r {
                        let _ = self.flush_pending();
                        return Err(tls_io(e));
                    }
                    self.flush_pending()?;
                    continue;
                }
            }
            let n = (&self.inner.sock).read(&mut raw[..])?;
            let mut st = lock(&self.inner.state);
            if n == 0 {
                let mut empty: &[u8] = &[];
                st.conn.read_tls(&mut empty)?;
                st.conn.process_new_packets().map_err(tls_io)?;
                // The socket's end is the stream's end, with or without a
                // close_notify, as on plain TCP: the framing above tells a
                // frame cut short.
                return match st.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof) => Ok(0),
                    Err(e) => Err(e),
                };
            }
            st.pending.extend_from_slice(&raw[..n]);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.inner.wlock);
        out.clear();
        let mut done = 0;
        while done < buf.len() {
            {
                let mut st = lock(&self.inner.state);
                let n = st.conn.writer().write(&buf[done..])?;
                while st.conn.wants_write() {
                    st.conn.write_tls(&mut *out)?;
                }
                if n == 0 && out.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS session cannot send"));
                }
                done += n;
            }
            (&self.inner.sock).write_all(&out)?;
            out.clear();
        }
        // What the reader queued meanwhile (an alert, a key update) could
        // not go out while this writer held the socket: send it now.
        loop {
            {
                let mut st = lock(&self.inner.state);
                while st.conn.wants_write() {
                    st.conn.write_tls(&mut *out)?;
                }
            }
            if out.is_empty() {
                break;
            }
            (&self.inner.sock).write_all(&out)?;
            out.clear();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for TlsStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.sock.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.sock.set_write_timeout(t)
    }
    fn shutdown(&self) -> io::Result<()> {
        self.inner.sock.shutdown(Shutdown::Both)
    }
    /// Plaintext decrypted and waiting, or (within `t`) the socket
    /// readable. Raw bytes already read are handed to rustls first, so a
    /// record cut short in them does not count as input.
    fn wait_input(&self, t: Duration) -> bool {
        {
            let mut st = lock(&self.inner.state);
            loop {
                // Processed as they are taken in, as `read` does: rustls
                // holds at most a record or so unprocessed.
                match st.conn.process_new_packets() {
                    Ok(io) if io.plaintext_bytes_to_read() > 0 => return true,
                    Ok(_) => {}
                    Err(_) => return true, // the read says what went wrong
                }
                if st.pos == st.pending.len() {
                    break;
                }
                match st.take_pending() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return true,
                }
            }
        }
        crate::stream::readable(self.inner.sock.as_raw_fd(), t)
    }
    fn peer(&self) -> String {
        self.inner.label.clone()
    }
    fn identity(&self) -> Option<Identity> {
        self.inner.identity.clone()
    }
}

/// Re-checks the peers of open TLS connections against the current trust.
pub struct Watch {
    trust: Arc<RwLock<Trust>>,
    open: Mutex<Vec<Weak<Inner>>>,
}

impl Watch {
    /// Start the watcher thread (it lives as long as the process).
    pub fn start(trust: Arc<RwLock<Trust>>) -> Arc<Watch> {
        let w = Arc::new(Watch { trust, open: Mutex::new(Vec::new()) });
        let w2 = Arc::downgrade(&w);
        let _ = std::thread::Builder::new().name("tls-watch".into()).spawn(move || {
            while let Some(w) = w2.upgrade() {
                w.sweep();
                drop(w);
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        w
    }

    pub fn add(&self, s: &TlsStream) {
        lock(&self.open).push(Arc::downgrade(&s.inner));
    }

    /// Cut every connection whose peer no longer passes.
    pub fn sweep(&self) {
        let mut open = lock(&self.open);
        open.retain(|w| w.strong_count() > 0);
        let Ok(trust) = self.trust.read() else { return };
        for w in open.iter() {
            if let Some(i) = w.upgrade() {
                if i.chain.is_empty() {
                    continue;
                }
                if let Err(why) = trust.still_valid(&i.chain) {
                    log::warn!("{}: {why}; connection cut", i.label);
                    let _ = i.sock.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// A plain or a TLS connection, chosen at run time (`--identity`).
pub enum AnyStream {
    Tcp(TcpStream),
    Tls(TlsStream),
}

impl Read for AnyStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            AnyStream::Tcp(s) => s.read(buf),
            AnyStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for AnyStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            AnyStream::Tcp(s) => s.write(buf),
            AnyStream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            AnyStream::Tcp(s) => s.flush(),
            AnyStream::Tls(s) => s.flush(),
        }
    }
}

impl Stream for AnyStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            AnyStream::Tcp(s) => AnyStream::Tcp(s.try_clone()?),
            AnyStream::Tls(s) => AnyStream::Tls(s.clone()),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            AnyStream::Tcp(s) => s.set_read_timeout(t),
            AnyStream::Tls(s) => Stream::set_read_timeout(s, t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            AnyStream::Tcp(s) => s.set_write_timeout(t),
            AnyStream::Tls(s) => Stream::set_write_timeout(s, t),
        }
    }
    fn shutdown(&self) -> io::Result<()> {
        match self {
            AnyStream::Tcp(s) => Stream::shutdown(s),
            AnyStream::Tls(s) => Stream::shutdown(s),
        }
    }
    fn wait_input(&self, t: Duration) -> bool {
        match self {
            AnyStream::Tcp(s) => s.wait_input(t),
            AnyStream::Tls(s) => s.wait_input(t),
        }
    }
    fn peer(&self) -> String {
        match self {
            AnyStream::Tcp(s) => Stream::peer(s),
            AnyStream::Tls(s) => Stream::peer(s),
        }
    }
    fn identity(&self) -> Option<Identity> {
        match self {
            AnyStream::Tcp(_) => None,
            AnyStream::Tls(s) => Stream::identity(s),
        }
    }
}
