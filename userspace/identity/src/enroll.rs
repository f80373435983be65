//! Enrollment: a machine turns a one-time join token into its own
//! certificate, and renews it later with the certificate it holds.
//!
//! The exchange (docs/security.md), over TLS to `ferry ca serve`:
//! 1. The client connects without a certificate. It knows the CA only by
//!    the pin in its token (SHA-256 of the CA's public key), so it accepts
//!    the server only if the chain the server presents holds a CA
//!    certificate with that pin and the server's certificate chains to it
//!    (a `ferry ca serve` of another CA, or a man in the middle, fails here,
//!    before the token is sent).
//! 2. It makes its key locally (ECDSA P-256; the private key never leaves
//!    the machine) and sends one JSON line: the token's id and secret and a
//!    certificate request.
//! 3. The server redeems the token (once, before it expires) and answers
//!    with the certificate for the token's name and role, the CA
//!    certificate and the revocation list.
//!
//! Renewal is the same exchange with the current certificate as the TLS
//! client certificate instead of a token; `crl` fetches the revocation
//! list. Requests and answers are single JSON lines of at most 64 KiB,
//! each with `"v": 1`; every read and write has a 10 s deadline.

use crate::ca::{Ca, Token};
use crate::tls::{self, Credentials, PeerVerifier, Trust};
use crate::{ca_pin, now_secs, pem_blocks, write_file, Identity, IdentityError, Role};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub const PROTOCOL_VERSION: u32 = 1;
const MAX_LINE: usize = 64 * 1024;
const DEADLINE: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 64;

/// `identity.json` of an identity folder.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IdentityFile {
    pub name: String,
    pub role: Role,
    /// The CA server this identity enrolled at (renewals go there).
    pub server: Option<String>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Request {
    v: u32,
    op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    csr: Option<String>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Answer {
    v: u32,
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    cert: Option<String>,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    crl: Option<String>,
}

/// Write an identity folder (made 0700; the key 0600).
#[allow(clippy::too_many_arguments)]
pub fn store_identity(
    dir: &Path,
    key_pem: &str,
    cert_pem: &str,
    ca_pem: &str,
    crl_pem: Option<&str>,
    name: &str,
    role: Role,
    server: Option<&str>,
) -> Result<(), IdentityError> {
    crate::make_private_dir(dir)?;
    write_file(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    if let Some(c) = crl_pem {
        write_file(&dir.join("crl.pem"), c.as_bytes(), 0o644)?;
    }
    let f = IdentityFile { name: name.into(), role, server: server.map(String::from) };
    let json = serde_json::to_vec_pretty(&f).map_err(|e| IdentityError::Cert(e.to_string()))?;
    write_file(&dir.join("identity.json"), &json, 0o644)?;
    // The key first, the certificate last: a folder with cert.pem is whole.
    // On renewal the old key is kept as key.prev.pem until the new
    // certificate is in place, so a crash in between leaves a pair that
    // fits (tls::Credentials::load falls back to it).
    let key = dir.join("key.pem");
    if let Ok(old) = std::fs::read(&key) {
        write_file(&dir.join("key.prev.pem"), &old, 0o600)?;
    }
    write_file(&key, key_pem.as_bytes(), 0o600)?;
    write_file(&dir.join("cert.pem"), cert_pem.as_bytes(), 0o644)?;
    let _ = std::fs::remove_file(dir.join("key.prev.pem"));
    // The names qemu's and libnbd's x509 credentials look for, so the
    // folder serves `tls-creds-x509,dir=DIR` and `tls-certificates=DIR`.
    for (link, to) in [
        ("ca-cert.pem", "ca.pem"),
        ("client-cert.pem", "cert.pem"),
        ("client-key.pem", "key.pem"),
        ("server-cert.pem", "cert.pem"),
        ("server-key.pem", "key.pem"),
    ] {
        let l = dir.join(link);
        if std::fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink(to, &l).map_err(IdentityError::io(format!("cannot link {}", l.display())))?;
        }
    }
    Ok(())
}

/// Exclusive lock on `DIR/identity.lock` for as long as it lives.
struct DirLock {
    _file: std::fs::File,
}

fn lock_dir(dir: &Path) -> Result<DirLock, IdentityError> {
    use std::os::unix::io::AsRawFd;
    let p = dir.join("identity.lock");
    let io = |e| IdentityError::io(format!("cannot lock {}", p.display()))(e);
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(io)?;
    // SAFETY: flock on a descriptor owned here; no memory is shared.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(DirLock { _file: f })
}

/// Read `identity.json`.
pub fn identity_file(dir: &Path) -> Result<IdentityFile, IdentityError> {
    let p = dir.join("identity.json");
    let t = std::fs::read(&p).map_err(IdentityError::io(format!("cannot read {}", p.display())))?;
    serde_json::from_slice(&t).map_err(|e| IdentityError::Cert(format!("{}: {e}", p.display())))
}

/// Accepts a server only if its chain holds the pinned CA and chains to it.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    found: Mutex<Option<Vec<u8>>>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        for c in intermediates {
            if ca_pin(c).ok().as_deref() == Some(self.pin.as_str()) {
                let trust = Trust::new(c.to_vec(), &[]).map_err(|e| rustls::Error::General(e.to_string()))?;
                let id = trust.verify(end_entity, &[], now, webpki::KeyUsage::server_auth())?;
                // Only `ferry ca serve` holds this identity (the name is
                // reserved: no token or `ca issue` gives it), so another
                // enrolled machine cannot stand in the middle.
                if id.role != Role::ConfigServer || id.name != crate::ca::CA_SERVER_NAME {
                    return Err(rustls::Error::General(format!("the server is {}, not this CA's server; nothing was sent", id.label())));
                }
                if let Ok(mut f) = self.found.lock() {
                    *f = Some(c.to_vec());
                }
                return Ok(ServerCertVerified::assertion());
            }
        }
        Err(rustls::Error::General(
            "the server's CA does not match the token's pin: not the CA that made the token (or someone in between); nothing was sent"
                .into(),
        ))
    }
    tls::handshake_signatures!();
}

fn connect(server: &str) -> Result<TcpStream, IdentityError> {
    let addrs: Vec<SocketAddr> =
        server.to_socket_addrs().map_err(|e| IdentityError::Usage(format!("--server {server:?}: {e} (expected HOST:PORT)")))?.collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, DEADLINE) {
            Ok(s) => {
                s.set_read_timeout(Some(DEADLINE)).ok();
                s.set_write_timeout(Some(DEADLINE)).ok();
                s.set_nodelay(true).ok();
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(IdentityError::io(format!("cannot reach the CA server at {server}"))(
        last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    ))
}

fn exchange(server: &str, config: Arc<rustls::ClientConfig>, req: &Request) -> Result<Answer, IdentityError> {
    let tcp = connect(server)?;
    let conn = rustls::ClientConnection::new(config, tls::server_name()).map_err(|e| IdentityError::Refused(tls::describe(&e)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut line = serde_json::to_vec(req).map_err(|e| IdentityError::Cert(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).and_then(|_| s.flush()).map_err(|e| io_or_tls(server, e))?;
    let mut r = BufReader::new(s);
    let mut buf = Vec::new();
    read_line(&mut r, &mut buf).map_err(|e| io_or_tls(server, e))?;
    let a: Answer =
        serde_json::from_slice(&buf).map_err(|e| IdentityError::Refused(format!("the CA server at {server} answered garbage: {e}")))?;
    if a.v != PROTOCOL_VERSION {
        return Err(IdentityError::Refused(format!(
            "the CA server at {server} speaks enrollment v{}, this ferry v{PROTOCOL_VERSION}",
            a.v
        )));
    }
    if !a.ok {
        return Err(IdentityError::Refused(format!("the CA server refused: {}", a.error.unwrap_or_default())));
    }
    Ok(a)
}

/// A TLS failure hides inside an io::Error: say it as TLS.
fn io_or_tls(server: &str, e: std::io::Error) -> IdentityError {
    if let Some(t) = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
        return IdentityError::Refused(format!("{server}: {}", tls::describe(t)));
    }
    IdentityError::io(format!("talking to the CA server at {server}"))(e)
}

fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let n = r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    if buf.len() > MAX_LINE || buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long or cut short"));
    }
    Ok(())
}

fn new_key_and_csr(name: &str) -> Result<(rcgen::KeyPair, String), IdentityError> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Cert(format!("cannot make a key: {e}")))?;
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, name);
    p.distinguished_name = dn;
    let csr = p
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| IdentityError::Cert(format!("cannot make a certificate request: {e}")))?;
    Ok((key, csr))
}

/// Check that `cert_pem` certifies `key`'s public key and chains to `ca`.
fn check_issued(cert_pem: &str, key: &rcgen::KeyPair, ca_der: &[u8]) -> Result<Identity, IdentityError> {
    let der = pem_blocks(cert_pem, "CERTIFICATE")?
        .into_iter()
        .next()
        .ok_or_else(|| IdentityError::Refused("the CA server sent no certificate".into()))?;
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(&der)
        .map_err(|e| IdentityError::Refused(format!("the CA server sent an unreadable certificate: {e}")))?;
    if c.public_key().raw != key.public_key_der().as_slice() {
        return Err(IdentityError::Refused("the CA server certified another key".into()));
    }
    let trust = Trust::new(ca_der.to_vec(), &[])?;
    trust
        .verify(&CertificateDer::from(der.as_slice()), &[], UnixTime::now(), webpki::KeyUsage::client_auth())
        .map_err(|e| IdentityError::Refused(format!("the certificate from the CA server does not verify: {}", tls::describe(&e))))
}

/// `ferry enroll`: a key made here, a certificate from the CA server for
/// the token's name and role, stored in `dir`.
pub fn enroll(server: &str, token: &str, dir: &Path) -> Result<Identity, IdentityError> {
    let tok = Token::parse(token)?;
    if dir.join("cert.pem").exists() {
        return Err(IdentityError::Usage(format!("{} already holds an identity; enroll into an empty folder", dir.display())));
    }
    let pinned =
        Arc::new(PinnedCa { pin: tok.pin.clone(), found: Mutex::new(None), algs: tls::provider().signature_verification_algorithms });
    let config = tls::client_config(None, pinned.clone())?;
    let (key, csr) = new_key_and_csr("enrolling")?;
    let req = Request { v: PROTOCOL_VERSION, op: "enroll".into(), token_id: Some(tok.id), secret: Some(tok.secret), csr: Some(csr) };
    let a = exchange(server, config, &req)?;
    let ca_der = pinned.found.lock().ok().and_then(|f| f.clone()).ok_or_else(|| IdentityError::Refused("no CA seen".into()))?;
    let cert = a.cert.ok_or_else(|| IdentityError::Refused("the CA server sent no certificate".into()))?;
    let id = check_issued(&cert, &key, &ca_der)?;
    store_identity(
        dir,
        &key.serialize_pem(),
        &cert,
        &crate::to_pem("CERTIFICATE", &ca_der),
        a.crl.as_deref(),
        &id.name,
        id.role,
        Some(server),
    )?;
    Ok(id)
}

fn renew_config(dir: &Path, creds: Option<Arc<Credentials>>) -> Result<(IdentityFile, Arc<rustls::ClientConfig>, Trust), IdentityError> {
    let f = identity_file(dir)?;
    let trust = Trust::load(dir)?;
    let creds = match creds {
        Some(c) => c,
        None => Arc::new(Credentials::load(dir)?),
    };
    let v = PeerVerifier::new(Arc::new(RwLock::new(Trust::load(dir)?)), &[Role::ConfigServer], true);
    Ok((f, tls::client_config(Some(creds), v)?, trust))
}

/// Renew the identity in `dir` at its CA server: a new key and certificate
/// for the same name and role, stored in `dir` (and swapped into `creds`).
pub fn renew(dir: &Path, creds: Option<&Arc<Credentials>>) -> Result<Identity, IdentityError> {
    // One renewal of a folder at a time (a master target and an export may
    // share it); one that finds the folder renewed meanwhile adopts it.
    let _lock = lock_dir(dir)?;
    if let Some(c) = creds {
        if let Ok(on_disk) = Credentials::load(dir) {
            let (mine, theirs) = (c.identity(), on_disk.identity());
            if theirs.serial != mine.serial && theirs.not_before > mine.not_before {
                let (k, ch) = tls::read_identity(dir)?;
                c.replace(&k, &ch)?;
                return Ok(theirs);
            }
        }
    }
    let (f, config, trust) = renew_config(dir, creds.cloned())?;
    let server = f.server.clone().ok_or_else(|| {
        IdentityError::Usage(format!("{}: issued offline, no CA server to renew at; issue a new one with `ferry ca issue`", dir.display()))
    })?;
    let (key, csr) = new_key_and_csr(&f.name)?;
    let a = exchange(&server, config, &Request { v: PROTOCOL_VERSION, op: "renew".into(), csr: Some(csr), ..Default::default() })?;
    let cert = a.cert.ok_or_else(|| IdentityError::Refused("the CA server sent no certificate".into()))?;
    let id = check_issued(&cert, &key, trust.ca_der())?;
    if id.name != f.name || id.role != f.role {
        return Err(IdentityError::Refused(format!("the CA server renewed {} as {}", f.name, id.label())));
    }
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).map_err(IdentityError::io("cannot read ca.pem"))?;
    store_identity(dir, &key.serialize_pem(), &cert, &ca_pem, a.crl.as_deref(), &f.name, f.role, Some(&server))?;
    if let Some(c) = creds {
        c.replace(&key.serialize_pem(), &format!("{cert}{ca_pem}"))?;
    }
    Ok(id)
}

/// Fetch the CA server's revocation list into `dir/crl.pem`; returns it.
pub fn refresh_crl(dir: &Path, creds: Option<&Arc<Credentials>>) -> Result<String, IdentityError> {
    let (f, config, _) = renew_config(dir, creds.cloned())?;
    let Some(server) = f.server else { return Err(IdentityError::Usage("issued offline: no CA server".into())) };
    let a = exchange(&server, config, &Request { v: PROTOCOL_VERSION, op: "crl".into(), ..Default::default() })?;
    let crl = a.crl.ok_or_else(|| IdentityError::Refused("the CA server sent no revocation list".into()))?;
    Trust::new(Trust::load(dir)?.ca_der().to_vec(), &pem_blocks(&crl, "X509 CRL")?)?;
    write_file(&dir.join("crl.pem"), crl.as_bytes(), 0o644)?;
    Ok(crl)
}

/// `ferry ca serve`: answer enrollments, renewals and revocation-list
/// requests for the CA in `ca_dir` until `stop`.
pub struct CaServer {
    listener: TcpListener,
    ca: Arc<Ca>,
    config: Arc<rustls::ServerConfig>,
    cert_ttl: Duration,
    creds: Arc<Credentials>,
}

/// `ferry ca serve` signs the revocation list again when it is this old
/// (it says it is good for 7 days).
const CRL_MAX_AGE: Duration = Duration::from_secs(86400);

impl CaServer {
    pub fn bind(ca_dir: &Path, listen: SocketAddr, cert_ttl: Duration) -> Result<CaServer, IdentityError> {
        let ca = Arc::new(Ca::open(ca_dir)?);
        ca.refresh_crl(CRL_MAX_AGE)?;
        // Its own certificate, in memory only: made at start, made again
        // (in place) once two thirds of its life have passed.
        let (key, chain) = Self::own_certificate(&ca)?;
        let creds = Arc::new(Credentials::from_pem(&key, &chain)?);
        let trust = Arc::new(RwLock::new(Trust::new(ca.cert_der().to_vec(), &pem_blocks(&ca.crl_pem()?, "X509 CRL")?)?));
        let verifier = PeerVerifier::new(trust, &Role::ALL, false);
        let config = tls::server_config(creds.clone(), verifier)?;
        let listener = TcpListener::bind(listen).map_err(IdentityError::io(format!("cannot listen on {listen}")))?;
        Ok(CaServer { listener, ca, config, cert_ttl, creds })
    }

    fn own_certificate(ca: &Ca) -> Result<(String, String), IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Cert(e.to_string()))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Cert(e.to_string()))?;
        let (cert, _) = ca.issue_ca_server(&csr, crate::ca::DEFAULT_CERT_TTL)?;
        Ok((key.serialize_pem(), format!("{cert}{}", ca.cert_pem())))
    }

    /// Upkeep between accepts: its own certificate and the daily list.
    fn upkeep(&self) {
        let id = self.creds.identity();
        if now_secs() >= id.not_before + (id.not_after - id.not_before) * 2 / 3 {
            match Self::own_certificate(&self.ca).and_then(|(k, c)| self.creds.replace(&k, &c)) {
                Ok(()) => log::info!("ca serve: renewed its own certificate"),
                Err(e) => log::warn!("ca serve: cannot renew its own certificate: {e}"),
            }
        }
        if let Err(e) = self.ca.refresh_crl(CRL_MAX_AGE) {
            log::warn!("ca serve: cannot sign the revocation list again: {e}");
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serve until `stop` is set (checked every 200 ms).
    pub fn run(self, stop: Arc<AtomicBool>) -> Result<(), IdentityError> {
        self.listener.set_nonblocking(true).map_err(IdentityError::io("listener"))?;
        let live = Arc::new(AtomicUsize::new(0));
        let mut upkept = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if upkept.elapsed() > Duration::from_secs(60) {
                self.upkeep();
                upkept = std::time::Instant::now();
            }
            match self.listener.accept() {
                Ok((s, peer)) => {
                    if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                        log::warn!("ca serve: refusing {peer}: {MAX_CONNECTIONS} connections already");
                        continue;
                    }
                    live.fetch_add(1, Ordering::Relaxed);
                    let (ca, config, live, ttl) = (self.ca.clone(), self.config.clone(), live.clone(), self.cert_ttl);
                    std::thread::spawn(move || {
                        if let Err(e) = serve_one(&ca, config, s, ttl) {
                            log::warn!("ca serve: {peer}: {e}");
                        }
                        live.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => log::warn!("ca serve: accept: {e}"),
            }
        }
        Ok(())
    }
}

fn serve_one(ca: &Ca, config: Arc<rustls::ServerConfig>, tcp: TcpStream, ttl: Duration) -> Result<(), IdentityError> {
    tcp.set_nonblocking(false).ok();
    tcp.set_read_timeout(Some(DEADLINE)).ok();
    tcp.set_write_timeout(Some(DEADLINE)).ok();
    let conn = rustls::ServerConnection::new(config).map_err(|e| IdentityError::Refused(tls::describe(&e)))?;
    let mut r = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    let mut buf = Vec::new();
    read_line(&mut r, &mut buf).map_err(|e| io_or_tls("client", e))?;
    let s = r.get_mut();
    let peer = tls::peer_identity(&s.conn);
    let answer = match serde_json::from_slice::<Request>(&buf) {
        Ok(req) if req.v != PROTOCOL_VERSION => {
            Err(format!("enrollment v{} is not supported (this server speaks v{PROTOCOL_VERSION})", req.v))
        }
        Ok(req) => handle(ca, &req, peer.as_ref(), ttl),
        Err(e) => Err(format!("unreadable request: {e}")),
    };
    let a = match answer {
        Ok(a) => a,
        Err(e) => {
            log::warn!("ca serve: refused {}: {e}", peer.as_ref().map(|p| p.label()).unwrap_or_else(|| "a client".into()));
            Answer { v: PROTOCOL_VERSION, ok: false, error: Some(e), ..Default::default() }
        }
    };
    let mut line = serde_json::to_vec(&a).map_err(|e| IdentityError::Cert(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).and_then(|_| s.flush()).map_err(|e| io_or_tls("client", e))?;
    s.conn.send_close_notify();
    let _ = s.flush();
    Ok(())
}

fn handle(ca: &Ca, req: &Request, peer: Option<&Identity>, ttl: Duration) -> Result<Answer, String> {
    let ok = |cert: Option<String>| -> Result<Answer, String> {
        Ok(Answer {
            v: PROTOCOL_VERSION,
            ok: true,
            error: None,
            cert,
            ca: Some(ca.cert_pem()),
            crl: Some(ca.crl_pem().map_err(|e| e.to_string())?),
        })
    };
    match req.op.as_str() {
        "enroll" => {
            let (Some(id), Some(secret), Some(csr)) = (&req.token_id, &req.secret, &req.csr) else {
                return Err("enroll needs a token and a certificate request".into());
            };
            let (role, name, sans) = ca.redeem_token(id, secret).map_err(|e| e.to_string())?;
            let (cert, who) = ca.issue_csr(csr, &name, role, ttl, &sans).map_err(|e| e.to_string())?;
            log::info!("ca serve: enrolled {} (serial {}, until {})", who.label(), who.serial, crate::when(who.not_after));
            ok(Some(cert))
        }
        "renew" => {
            let p = peer.ok_or("renew needs the current certificate as the TLS client certificate")?;
            let csr = req.csr.as_deref().ok_or("renew needs a certificate request")?;
            let was = ca.renewable(&p.serial).map_err(|e| e.to_string())??;
            let (cert, who) = ca.issue_csr(csr, &p.name, p.role, ttl, &was.sans).map_err(|e| e.to_string())?;
            log::info!("ca serve: renewed {} (serial {} → {})", who.label(), p.serial, who.serial);
            ok(Some(cert))
        }
        "crl" => {
            peer.ok_or("the revocation list is for enrolled machines")?;
            ok(None)
        }
        op => Err(format!("unknown request {op:?}")),
    }
}

/// Where a role keeps its identity while it runs: the credentials it
/// presents, the trust it checks peers with, and the folder they come from.
#[derive(Clone, Debug)]
pub struct Held {
    pub dir: PathBuf,
    pub creds: Arc<Credentials>,
    pub trust: Arc<RwLock<Trust>>,
    /// When the revocation list was last refreshed from the CA server.
    crl_fresh: Arc<Mutex<std::time::Instant>>,
}

impl Held {
    pub fn load(dir: &Path) -> Result<Held, IdentityError> {
        let creds = Arc::new(Credentials::load(dir)?);
        let id = creds.identity();
        if id.not_after <= now_secs() {
            return Err(IdentityError::Cert(format!(
                "{}: the certificate of {} expired at {}; enroll again with a new token (`ferry token create`, then `ferry enroll`)",
                dir.display(),
                id.label(),
                crate::when(id.not_after)
            )));
        }
        Ok(Held {
            dir: dir.to_path_buf(),
            creds,
            trust: Arc::new(RwLock::new(Trust::load(dir)?)),
            crl_fresh: Arc::new(Mutex::new(std::time::Instant::now())),
        })
    }

    /// Once: renew if two thirds of the certificate's life have passed,
    /// refresh the revocation list. Returns a warning to log, if any.
    pub fn maintain(&self) -> Option<String> {
        let id = self.creds.identity();
        let now = now_secs();
        let mut warn = None;
        if now >= id.not_before + (id.not_after - id.not_before) * 2 / 3 {
            match renew(&self.dir, Some(&self.creds)) {
                Ok(n) => log::info!("renewed the certificate of {} (serial {}, until {})", n.label(), n.serial, crate::when(n.not_after)),
                Err(e) if id.not_after - now < 7 * 86400 => {
                    warn = Some(format!(
                        "the certificate of {} expires at {} and could not be renewed: {e}",
                        id.label(),
                        crate::when(id.not_after)
                    ))
                }
                Err(e) => log::debug!("renewal not done yet: {e}"),
            }
        }
        if identity_file(&self.dir).ok().and_then(|f| f.server).is_some() {
            match refresh_crl(&self.dir, Some(&self.creds)) {
                Ok(crl) => {
                    if let (Ok(t), Ok(mut g)) =
                        (pem_blocks(&crl, "X509 CRL").and_then(|c| Trust::new(self.trust_ca(), &c)), self.trust.write())
                    {
                        *g = t;
                    }
                    if let Ok(mut f) = self.crl_fresh.lock() {
                        *f = std::time::Instant::now();
                    }
                }
                Err(e) => {
                    let stale = self.crl_fresh.lock().map(|f| f.elapsed()).unwrap_or_default();
                    if stale > Duration::from_secs(3600) && warn.is_none() {
                        warn = Some(format!(
                            "the revocation list has not been refreshed for {} min: {e}; a machine revoked since is still let in",
                            stale.as_secs() / 60
                        ));
                    } else {
                        log::debug!("revocation list not refreshed: {e}");
                    }
                }
            }
        } else if let (Ok(t), Ok(mut g)) = (Trust::load(&self.dir), self.trust.write()) {
            *g = t;
        }
        warn
    }

    /// Run [`Held::maintain`] every `every` in a thread of its own for as
    /// long as the process lives; a warning is logged at most hourly.
    pub fn keep_fresh(&self, every: Duration) {
        let me = self.clone();
        let _ = std::thread::Builder::new().name("identity".into()).spawn(move || {
            let mut warned: Option<std::time::Instant> = None;
            loop {
                // A short-lived certificate is looked at more often.
                let id = me.creds.identity();
                let life = (id.not_after - id.not_before).max(10) as u64;
                std::thread::sleep(every.min(Duration::from_secs(life / 10)).max(Duration::from_secs(1)));
                if let Some(w) = me.maintain() {
                    if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                        log::warn!("{w}");
                        warned = Some(std::time::Instant::now());
                    }
                }
            }
        });
    }

    fn trust_ca(&self) -> Vec<u8> {
        self.trust.read().map(|t| t.ca_der().to_vec()).unwrap_or_default()
    }
}
