//! Identities for ferry's machines: an internal certificate authority
//! ([`ca`]), one-time join tokens and enrollment ([`enroll`]), and the
//! mutual-TLS configurations every link uses ([`tls`]).
//!
//! Every certificate names one machine and one role, in a URI subject
//! alternative name `ferry://ROLE/NAME` (docs/security.md). A peer is who
//! its certificate says once the chain leads to the site's CA and the
//! certificate is neither expired nor revoked; host names play no part.
//!
//! An identity folder (`--identity DIR`) holds:
//!
//! | file | what | mode |
//! |------|------|------|
//! | `key.pem` | the machine's private key (PKCS#8, ECDSA P-256); never leaves it | 0600 |
//! | `cert.pem` | its certificate | 0644 |
//! | `ca.pem` | the site's CA certificate | 0644 |
//! | `crl.pem` | the CA's latest revocation list (refreshed by the roles) | 0644 |
//! | `identity.json` | name, role, the CA server to renew at | 0644 |

pub mod ca;
pub mod enroll;
pub mod tls;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a machine does: each certificate names exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Agent,
    ProcessServer,
    MasterTarget,
    ConfigServer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::ProcessServer, Role::MasterTarget, Role::ConfigServer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
            Role::ConfigServer => "config-server",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Role, IdentityError> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            IdentityError::Usage(format!("unknown role {s:?}: expected agent, process-server, master-target or config-server"))
        })
    }
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// Validity, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl Identity {
    /// `ROLE/NAME`, as logs and errors show a peer.
    pub fn label(&self) -> String {
        format!("{}/{}", self.role, self.name)
    }
}

/// Errors of identities, tokens and TLS set-up: each one line saying what
/// failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    State(#[from] ferry_common::durable::StateError),
    /// A certificate, key or revocation list that cannot be used.
    #[error("{0}")]
    Cert(String),
    /// A join token refused (used, expired, unknown, malformed, pin mismatch).
    #[error("{0}")]
    Token(String),
    /// The peer refused us, or we refused the peer.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
}

impl IdentityError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> IdentityError {
        let what = what.into();
        move |source| IdentityError::Io { what, source }
    }
}

/// Seconds since the epoch now.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A time (seconds since the epoch) as RFC 3339 to the second, UTC.
pub fn when(secs: i64) -> String {
    ferry_common::units::rfc3339(secs.max(0) as u64 * 1_000_000_000).replace(".000000000Z", "Z")
}

/// A machine's name: 1-64 of `A-Z a-z 0-9 . _ -` (as disk names).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The URI subject alternative name a certificate for `role`/`name` carries.
pub fn identity_uri(role: Role, name: &str) -> String {
    format!("ferry://{}/{}", role.as_str(), name)
}

/// Who a DER certificate names (its `ferry://ROLE/NAME` URI), with its
/// serial and validity. Does not check the chain: see [`tls`].
pub fn identity_of(der: &[u8]) -> Result<Identity, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Cert(format!("unreadable certificate: {e}")))?;
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n {
                if let Some(rest) = u.strip_prefix("ferry://") {
                    if let Some((role, name)) = rest.split_once('/') {
                        if let (Ok(role), true) = (role.parse::<Role>(), valid_name(name)) {
                            if found.replace((role, name.to_string())).is_some() {
                                return Err(IdentityError::Cert("certificate names more than one ferry identity".into()));
                            }
                        }
                    }
                }
            }
        }
    }
    let (role, name) = found.ok_or_else(|| IdentityError::Cert("certificate names no ferry identity (no ferry://ROLE/NAME)".into()))?;
    Ok(Identity {
        name,
        role,
        serial: ferry_common::durable::hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The pin of a CA: SHA-256 of its certificate's SubjectPublicKeyInfo,
/// `sha256:` and 64 hex digits (as kubeadm's discovery hash).
pub fn ca_pin(ca_der: &[u8]) -> Result<String, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(ca_der).map_err(|e| IdentityError::Cert(format!("unreadable CA certificate: {e}")))?;
    let d = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Ok(format!("sha256:{}", ferry_common::durable::hex(d.as_ref())))
}

/// PEM blocks of one label in `text`, as DER.
pub fn pem_blocks(text: &str, label: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let p = p.map_err(|e| IdentityError::Cert(format!("bad PEM: {e}")))?;
        if p.label == label {
            out.push(p.contents);
        }
    }
    Ok(out)
}

/// PEM text of one DER block.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Random bytes from the system's generator.
pub fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// Write `data` to `path` atomically with `mode` (0600 for keys).
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    // A fresh temporary name, created exclusively: two processes renewing
    // the same folder never share one, and a planted file or symlink is
    // never followed or reused with its mode.
    let tmp: PathBuf = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        ferry_common::durable::hex(&random::<8>())
    ));
    let what = || format!("cannot write {}", path.display());
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(IdentityError::io(what()))?;
    let r = f.write_all(data).and_then(|_| f.sync_all()).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(IdentityError::io(what())(e));
    }
    ferry_common::durable::fsync_dir(dir).map_err(IdentityError::io(what()))
}

/// Create `dir` (and parents) readable by root only. A folder that exists
/// already is used as it is (never re-moded: it may be a shared one given
/// by mistake), unless others can write it.
pub fn make_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Ok(m) = std::fs::metadata(dir) {
        if !m.is_dir() {
            return Err(IdentityError::Usage(format!("{}: not a folder", dir.display())));
        }
        if m.permissions().mode() & 0o022 != 0 {
            return Err(IdentityError::Usage(format!(
                "{}: others can write this folder; give a folder only root can write (or a new one)",
                dir.display()
            )));
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(IdentityError::io(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(IdentityError::io(format!("cannot restrict {}", dir.display())))
}

/// Parse a duration such as `30d`, `12h`, `90s`.
pub fn parse_ttl(opt: &str, s: &str) -> Result<std::time::Duration, IdentityError> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| d.as_secs() >= 1)
        .ok_or_else(|| IdentityError::Usage(format!("{opt} {s:?}: expected a duration of at least 1s, e.g. 30d or 24h")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_names_are_checked() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("admin".parse::<Role>().is_err());
        assert!(valid_name("db-01.site_a"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn pem_round_trips() {
        for n in [0usize, 1, 2, 3, 47, 48, 49, 200] {
            let der: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            let pem = to_pem("CERTIFICATE", &der);
            assert_eq!(pem_blocks(&pem, "CERTIFICATE").unwrap(), vec![der]);
        }
    }
}

#[cfg(test)]
mod link_tests;
