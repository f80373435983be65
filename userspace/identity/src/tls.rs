//! Mutual TLS for every link: who may connect is decided by the site's CA,
//! the revocation list and the peer's role, never by host names.
//!
//! - [`Trust`]: the CA certificate and the latest revocation list, shared
//!   behind a lock so a refreshed list applies to the next handshake (and
//!   [`Trust::still_valid`] lets a service cut open connections).
//! - [`PeerVerifier`]: the verifier both sides use: chain to the CA, not
//!   expired, not revoked, and a role the caller accepts.
//! - [`Credentials`]: this machine's key and certificate, swappable while
//!   running (renewal without a restart or a dropped stream).
//! - [`server_config`] / [`client_config`]: rustls configurations (TLS 1.3
//!   and 1.2, ring's cipher suites: AES-GCM and ChaCha20-Poly1305).

use crate::{identity_of, pem_blocks, Identity, IdentityError, Role};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DistinguishedName, SignatureScheme};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// The handshake-signature checks every ferry verifier shares (rustls's,
/// with the verifier's `algs`).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures;

/// The crypto provider every ferry link uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

static ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] =
    &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ECDSA_P256_SHA384, webpki::ring::ECDSA_P384_SHA384, webpki::ring::ED25519];

/// The CA and its revocation list.
#[derive(Debug)]
pub struct Trust {
    ca: CertificateDer<'static>,
    crls: Vec<webpki::CertRevocationList<'static>>,
}

impl Trust {
    pub fn new(ca_der: Vec<u8>, crl_ders: &[Vec<u8>]) -> Result<Trust, IdentityError> {
        webpki::anchor_from_trusted_cert(&CertificateDer::from(ca_der.as_slice()))
            .map_err(|e| IdentityError::Cert(format!("unusable CA certificate: {e}")))?;
        let mut crls = Vec::new();
        for d in crl_ders {
            let c = webpki::OwnedCertRevocationList::from_der(d)
                .map_err(|e| IdentityError::Cert(format!("unreadable revocation list: {e}")))?;
            crls.push(webpki::CertRevocationList::from(c));
        }
        Ok(Trust { ca: CertificateDer::from(ca_der), crls })
    }

    /// From an identity folder's `ca.pem` and `crl.pem` (if any).
    pub fn load(dir: &Path) -> Result<Trust, IdentityError> {
        let ca = read_pem(&dir.join("ca.pem"), "CERTIFICATE")?
            .into_iter()
            .next()
            .ok_or_else(|| IdentityError::Cert(format!("{}: no certificate", dir.join("ca.pem").display())))?;
        // No list, no trust: without one a revoked peer would pass.
        let crl = dir.join("crl.pem");
        if !crl.exists() {
            return Err(IdentityError::Cert(format!(
                "{}: missing; the revocation list comes with enrollment (copy the CA's crl.pem there, or enroll again)",
                crl.display()
            )));
        }
        let crls = read_pem(&crl, "X509 CRL")?;
        if crls.is_empty() {
            return Err(IdentityError::Cert(format!("{}: holds no revocation list", crl.display())));
        }
        Trust::new(ca, &crls)
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca
    }

    /// Check a peer's chain at `now` for `usage`: the identity it names.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, rustls::Error> {
        let anchor = webpki::anchor_from_trusted_cert(&self.ca).map_err(|e| rustls::Error::General(format!("CA: {e}")))?;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(cert_err)?;
        let refs: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        let rev = if refs.is_empty() {
            None
        } else {
            webpki::RevocationOptionsBuilder::new(&refs).ok().map(|b| {
                b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                    // Every machine certificate comes from the one CA whose
                    // list this is: a certificate the list cannot speak for
                    // (another issuer's list) is refused.
                    .with_status_policy(webpki::UnknownStatusPolicy::Deny)
                    .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                    .build()
            })
        };
        ee.verify_for_usage(ALGS, &[anchor], intermediates, now, usage, rev, None).map_err(cert_err)?;
        identity_of(end_entity).map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e)))))
    }

    /// Whether the certificate an open connection was accepted with still
    /// holds: not revoked since. Services call this every few seconds for
    /// each open connection and cut those that fail. Expiry is checked at
    /// each handshake, not here: a peer renews its certificate while its
    /// stream runs (TLS cannot swap it mid-connection), and the stream must
    /// not drop for that.
    pub fn still_valid(&self, chain: &[CertificateDer<'static>]) -> Result<Identity, String> {
        let (ee, rest) = chain.split_first().ok_or("no certificate")?;
        let id = identity_of(ee).map_err(|e| e.to_string())?;
        let now = crate::now_secs().min(id.not_after - 1).max(id.not_before + 1).max(0) as u64;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
        self.verify(ee, rest, at, webpki::KeyUsage::client_auth())
            .or_else(|_| self.verify(ee, rest, at, webpki::KeyUsage::server_auth()))
            .map_err(|e| describe(&e))
    }
}

fn cert_err(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    rustls::Error::InvalidCertificate(match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::CertRevoked => CertificateError::Revoked,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        e => CertificateError::Other(rustls::OtherError(Arc::new(e))),
    })
}

/// One line for a TLS failure, as the operator should read it.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Expired) => "the peer's certificate has expired".into(),
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "the peer's certificate is revoked".into(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => "the peer's certificate is not from this site's CA".into(),
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet) => {
            "the peer's certificate is not valid yet (check the clocks)".into()
        }
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate (enroll it: `ferry enroll`)".into(),
        rustls::Error::AlertReceived(A::CertificateExpired) => {
            "the peer refused our certificate: it has expired (renew: `ferry enroll` with a new token)".into()
        }
        rustls::Error::AlertReceived(A::CertificateRevoked) => "the peer refused our certificate: it is revoked".into(),
        rustls::Error::AlertReceived(A::UnknownCA) => "the peer refused our certificate: not from its CA".into(),
        rustls::Error::AlertReceived(A::BadCertificate) | rustls::Error::AlertReceived(A::CertificateUnknown) => {
            "the peer refused our certificate".into()
        }
        rustls::Error::AlertReceived(A::AccessDenied) => "the peer refused our identity for this (wrong role)".into(),
        rustls::Error::AlertReceived(A::CertificateRequired) => {
            "the peer requires a certificate: give --identity DIR (enroll first)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "the peer's certificate is of a role not accepted here".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => format!("the peer's certificate is unusable: {o}"),
        rustls::Error::InvalidCertificate(c) => format!("the peer's certificate is refused: {c:?}"),
        rustls::Error::General(m) => m.clone(),
        e => format!("TLS: {e}"),
    }
}

/// Verifies peers on both ends of a link.
#[derive(Debug)]
pub struct PeerVerifier {
    trust: Arc<RwLock<Trust>>,
    /// Roles accepted at the other end.
    accept: Vec<Role>,
    /// A client must present a certificate (false only for `ferry ca serve`,
    /// which also answers enrollments).
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
    hints: Vec<DistinguishedName>,
}

impl PeerVerifier {
    pub fn new(trust: Arc<RwLock<Trust>>, accept: &[Role], mandatory: bool) -> Arc<PeerVerifier> {
        Arc::new(PeerVerifier {
            trust,
            accept: accept.to_vec(),
            mandatory,
            algs: provider().signature_verification_algorithms,
            hints: Vec::new(),
        })
    }

    fn check(
        &self,
        ee: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, rustls::Error> {
        let trust = self.trust.read().map_err(|_| rustls::Error::General("trust lock poisoned".into()))?;
        let id = trust.verify(ee, rest, now, usage)?;
        if !self.accept.contains(&id.role) {
            log::warn!("refused {}: role {} is not accepted here", id.label(), id.role);
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(id)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, webpki::KeyUsage::server_auth()).map(|_| ServerCertVerified::assertion())
    }
    handshake_signatures!();
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now, webpki::KeyUsage::client_auth()).map(|_| ClientCertVerified::assertion())
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    handshake_signatures!();
}

/// This machine's certificate and key, replaced in place on renewal:
/// handshakes after the swap present the new certificate, streams already
/// running are not touched.
#[derive(Debug)]
pub struct Credentials {
    current: RwLock<(Arc<CertifiedKey>, Identity)>,
}

impl Credentials {
    pub fn from_pem(key_pem: &str, chain_pem: &str) -> Result<Credentials, IdentityError> {
        Ok(Credentials { current: RwLock::new(certified(key_pem, chain_pem)?) })
    }

    /// From an identity folder (`key.pem`, `cert.pem`, `ca.pem`); if the
    /// key does not fit the certificate (a renewal cut short between the
    /// two), the previous key kept beside it.
    pub fn load(dir: &Path) -> Result<Credentials, IdentityError> {
        let (k, c) = read_identity(dir)?;
        Credentials::from_pem(&k, &c).or_else(|e| match std::fs::read_to_string(dir.join("key.prev.pem")) {
            Ok(prev) => Credentials::from_pem(&prev, &c).map_err(|_| e),
            Err(_) => Err(e),
        })
    }

    pub fn identity(&self) -> Identity {
        self.current.read().map(|g| g.1.clone()).unwrap_or_else(|p| p.into_inner().1.clone())
    }

    pub fn certified(&self) -> Arc<CertifiedKey> {
        self.current.read().map(|g| g.0.clone()).unwrap_or_else(|p| p.into_inner().0.clone())
    }

    /// Swap in a renewed certificate (and key).
    pub fn replace(&self, key_pem: &str, chain_pem: &str) -> Result<(), IdentityError> {
        let new = certified(key_pem, chain_pem)?;
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(())
    }
}

/// The key and the chain (leaf, then CA) of an identity folder, as PEM.
pub fn read_identity(dir: &Path) -> Result<(String, String), IdentityError> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                IdentityError::Usage(format!(
                    "{}: missing; enroll this machine first (`ferry enroll --server ADDR --token TOKEN --identity {}`)",
                    p.display(),
                    dir.display()
                ))
            } else {
                IdentityError::io(format!("cannot read {}", p.display()))(e)
            }
        })
    };
    let key = read("key.pem")?;
    let chain = read("cert.pem")? + &read("ca.pem")?;
    Ok((key, chain))
}

fn certified(key_pem: &str, chain_pem: &str) -> Result<(Arc<CertifiedKey>, Identity), IdentityError> {
    let chain: Vec<CertificateDer<'static>> = pem_blocks(chain_pem, "CERTIFICATE")?.into_iter().map(CertificateDer::from).collect();
    let leaf = chain.first().ok_or_else(|| IdentityError::Cert("no certificate in the identity".into()))?;
    let id = identity_of(leaf)?;
    let key = pem_blocks(key_pem, "PRIVATE KEY")?
        .into_iter()
        .next()
        .ok_or_else(|| IdentityError::Cert("no PKCS#8 private key in key.pem".into()))?;
    let key = PrivateKeyDer::try_from(key).map_err(|e| IdentityError::Cert(format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| IdentityError::Cert(format!("the key does not fit the certificate: {e}")))?;
    Ok((Arc::new(ck), id))
}

fn read_pem(path: &Path, label: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let t = std::fs::read_to_string(path).map_err(IdentityError::io(format!("cannot read {}", path.display())))?;
    pem_blocks(&t, label)
}

#[derive(Debug)]
struct Resolver(Arc<Credentials>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn tls_err(e: rustls::Error) -> IdentityError {
    IdentityError::Cert(format!("TLS set-up: {e}"))
}

/// A server's configuration: present `creds`, require a client certificate
/// of one of `accept` (unless `verifier` says it is optional).
pub fn server_config(creds: Arc<Credentials>, verifier: Arc<PeerVerifier>) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(creds)));
    // No session resumption: a resumed session skips the client
    // certificate's verification, so a revoked peer would get back in.
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// A client's configuration: present `creds` (if any), accept a server of
/// one of the verifier's roles.
pub fn client_config(
    creds: Option<Arc<Credentials>>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut c = match creds {
        Some(c) => b.with_client_cert_resolver(Arc::new(Resolver(c))),
        None => b.with_no_client_auth(),
    };
    // Every connection is verified in full (see server_config).
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// The identity a finished handshake's peer presented.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(|c| identity_of(c).ok())
}

/// The server name every ferry client sends (identities, not host names,
/// are checked).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("ferry.invalid").expect("a valid DNS name")
}
