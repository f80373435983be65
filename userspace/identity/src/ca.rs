//! The site's certificate authority: a folder (`ferry ca init --dir DIR`)
//! with the CA's key and certificate, what it issued and revoked, and the
//! join tokens it handed out.
//!
//! | file | what | mode |
//! |------|------|------|
//! | `ca.key` | the CA's private key (PKCS#8, ECDSA P-256) | 0600, folder 0700 |
//! | `ca.pem` | the CA's certificate (10 years) | 0644 |
//! | `ca.state` | state file `ferry-ca` v1 (docs/formats.md): issued certificates, revocations, tokens | 0600 |
//! | `crl.pem` | the signed revocation list, rewritten at each revocation | 0644 |
//! | `ca.lock` | serialises changes between `ferry ca serve` and the commands | |
//!
//! A token's secret is kept only as its BLAKE3 hash.

use crate::{identity_uri, now_secs, pem_blocks, random, valid_name, write_file, Identity, IdentityError, Role};
use ferry_common::durable::{hex, read_state, write_state};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

pub const STATE_KIND: &str = "ferry-ca";
pub const STATE_VERSION: u32 = 1;
/// Default lifetime of a machine certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(30 * 86400);
/// The name of `ferry ca serve`'s own certificate (role config-server):
/// reserved, so only the holder of the CA key presents it, and the
/// enrollment pin check accepts no other.
pub const CA_SERVER_NAME: &str = "ca";
/// Default lifetime of a join token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(86400);
const CA_TTL_SECS: i64 = 10 * 365 * 86400;
/// Issued certificates start this long before now (clocks differ a little),
/// at most a tenth of their life.
const BACKDATE_SECS: i64 = 300;

/// One certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    pub serial: String,
    pub name: String,
    pub role: Role,
    pub not_before: i64,
    pub not_after: i64,
    /// When it was revoked (seconds since the epoch).
    pub revoked: Option<i64>,
    /// Host names and addresses it also names (for NBD clients that check
    /// them: qemu-img, nbdinfo); kept on renewal.
    #[serde(default)]
    pub sans: Vec<String>,
}

/// One join token.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct TokenRec {
    id: String,
    /// BLAKE3 of the secret, hex.
    secret_hash: String,
    role: Role,
    name: String,
    expires: i64,
    /// When it was redeemed.
    used: Option<i64>,
    #[serde(default)]
    sans: Vec<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct CaState {
    crl_number: u64,
    issued: Vec<Issued>,
    tokens: Vec<TokenRec>,
}

/// An open CA folder.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    /// The CA certificate as rcgen signs with it (same name and key as `der`).
    signer: rcgen::Certificate,
    der: Vec<u8>,
}

/// A join token, parsed: `ferry-join-1.ID.SECRET.PIN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
    /// `sha256:HEX` of the CA's public key.
    pub pin: String,
}

const TOKEN_PREFIX: &str = "ferry-join-1";

impl Token {
    pub fn parse(s: &str) -> Result<Token, IdentityError> {
        let bad =
            || IdentityError::Token("malformed join token: expected ferry-join-1.ID.SECRET.PIN as printed by `ferry token create`".into());
        let mut it = s.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(id), Some(secret), Some(pin), None) = (it.next(), it.next(), it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        let hexok = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !hexok(id, 12) || !hexok(secret, 32) || !hexok(pin, 64) {
            return Err(bad());
        }
        Ok(Token { id: id.into(), secret: secret.into(), pin: format!("sha256:{pin}") })
    }

    pub fn render(&self) -> String {
        format!("{TOKEN_PREFIX}.{}.{}.{}", self.id, self.secret, self.pin.trim_start_matches("sha256:"))
    }
}

fn odt(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn rc(what: &str) -> impl FnOnce(rcgen::Error) -> IdentityError + '_ {
    move |e| IdentityError::Cert(format!("{what}: {e}"))
}

/// Exclusive lock on `ca.lock` for a read-modify-write of the state.
struct Locked {
    _file: File,
}

impl Locked {
    fn take(dir: &Path) -> Result<Locked, IdentityError> {
        let p = dir.join("ca.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(IdentityError::io(format!("cannot open {}", p.display())))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(IdentityError::io(format!("cannot lock {}", p.display()))(std::io::Error::last_os_error()));
        }
        Ok(Locked { _file: f })
    }
}

impl Ca {
    /// Create a new CA in `dir` (made 0700); refuses a folder that holds one.
    pub fn init(dir: &Path) -> Result<Ca, IdentityError> {
        if dir.join("ca.key").exists() || dir.join("ca.state").exists() {
            return Err(IdentityError::Usage(format!("{} already holds a CA; choose an empty folder", dir.display())));
        }
        crate::make_private_dir(dir)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("cannot make the CA key"))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("ferry CA {}", &hex(&random::<4>())));
        dn.push(DnType::OrganizationName, "ferry");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = now_secs();
        p.not_before = odt(now - BACKDATE_SECS);
        p.not_after = odt(now + CA_TTL_SECS);
        p.serial_number = Some(SerialNumber::from_slice(&serial()));
        p.key_identifier_method = KeyIdMethod::Sha256;
        let cert = p.self_signed(&key).map_err(rc("cannot make the CA certificate"))?;
        write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&dir.join("ca.pem"), cert.pem().as_bytes(), 0o644)?;
        let ca = Ca { dir: dir.to_path_buf(), key, der: cert.der().to_vec(), signer: cert };
        let st = CaState { crl_number: 1, ..CaState::default() };
        ca.save(&st)?;
        ca.write_crl(&st)?;
        Ok(ca)
    }

    /// Open the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Ca, IdentityError> {
        let kp = dir.join("ca.key");
        let key_pem = std::fs::read_to_string(&kp).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                IdentityError::Usage(format!("{} holds no CA; create one with `ferry ca init --dir {}`", dir.display(), dir.display()))
            } else {
                IdentityError::io(format!("cannot read {}", kp.display()))(e)
            }
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(rc("unreadable CA key"))?;
        let pp = dir.join("ca.pem");
        let pem = std::fs::read_to_string(&pp).map_err(IdentityError::io(format!("cannot read {}", pp.display())))?;
        let der = pem_blocks(&pem, "CERTIFICATE")?
            .into_iter()
            .next()
            .ok_or_else(|| IdentityError::Cert(format!("{}: no certificate", pp.display())))?;
        let params = CertificateParams::from_ca_cert_pem(&pem).map_err(rc("unreadable CA certificate"))?;
        let signer = params.self_signed(&key).map_err(rc("the CA key does not fit its certificate"))?;
        Ok(Ca { dir: dir.to_path_buf(), key, signer, der })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.der
    }

    pub fn cert_pem(&self) -> String {
        crate::to_pem("CERTIFICATE", &self.der)
    }

    /// `sha256:HEX` of the CA's public key: what tokens pin.
    pub fn pin(&self) -> Result<String, IdentityError> {
        crate::ca_pin(&self.der)
    }

    fn load(&self) -> Result<CaState, IdentityError> {
        Ok(read_state(&self.dir.join("ca.state"), STATE_KIND, STATE_VERSION)?.unwrap_or_default())
    }

    fn save(&self, st: &CaState) -> Result<(), IdentityError> {
        let p = self.dir.join("ca.state");
        write_state(&p, STATE_KIND, STATE_VERSION, st)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            .map_err(IdentityError::io(format!("cannot restrict {}", p.display())))
    }

    fn leaf_params(
        name: &str,
        role: Role,
        ttl: Duration,
        sans: &[String],
    ) -> Result<(CertificateParams, Vec<u8>, i64, i64), IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::Usage(format!("machine name {name:?}: expected 1-64 of A-Z a-z 0-9 . _ -")));
        }
        reserved(role, name)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(identity_uri(role, name).try_into().map_err(rc("bad identity"))?)];
        for h in check_sans(sans)? {
            p.subject_alt_names.push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into().map_err(rc("bad host name"))?),
            });
        }
        // keyEncipherment too: qemu's x509 credentials insist on it.
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let now = now_secs();
        let ttl = ttl.as_secs().min(CA_TTL_SECS as u64) as i64;
        let (nb, na) = (now - BACKDATE_SECS.min(ttl / 10), now + ttl);
        p.not_before = odt(nb);
        p.not_after = odt(na);
        let s = serial();
        p.serial_number = Some(SerialNumber::from_slice(&s));
        Ok((p, s.to_vec(), nb, na))
    }

    fn record(&self, name: &str, role: Role, serial: &[u8], nb: i64, na: i64, sans: &[String]) -> Result<Identity, IdentityError> {
        let _l = Locked::take(&self.dir)?;
        let mut st = self.load()?;
        st.issued.push(Issued {
            serial: hex(serial),
            name: name.into(),
            role,
            not_before: nb,
            not_after: na,
            revoked: None,
            sans: sans.to_vec(),
        });
        self.save(&st)?;
        Ok(Identity { name: name.into(), role, serial: hex(serial), not_before: nb, not_after: na })
    }

    /// Sign a certificate for `name`/`role` over the public key of a CSR
    /// (PEM); what the CSR asks for besides its key is ignored. Returns the
    /// certificate's PEM.
    pub fn issue_csr(
        &self,
        csr_pem: &str,
        name: &str,
        role: Role,
        ttl: Duration,
        sans: &[String],
    ) -> Result<(String, Identity), IdentityError> {
        let (p, s, nb, na) = Self::leaf_params(name, role, ttl, sans)?;
        self.sign_csr(csr_pem, p, &s, nb, na, name, role, sans)
    }

    /// `ferry ca serve`'s own certificate: the reserved name, which no token
    /// or `ca issue` can give.
    pub(crate) fn issue_ca_server(&self, csr_pem: &str, ttl: Duration) -> Result<(String, Identity), IdentityError> {
        let (p, s, nb, na) = Self::leaf_params("ca-server-pending", Role::ConfigServer, ttl, &[])?;
        let mut p = p;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_SERVER_NAME);
        dn.push(DnType::OrganizationalUnitName, Role::ConfigServer.as_str());
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::URI(identity_uri(Role::ConfigServer, CA_SERVER_NAME).try_into().map_err(rc("bad identity"))?)];
        self.sign_csr(csr_pem, p, &s, nb, na, CA_SERVER_NAME, Role::ConfigServer, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_csr(
        &self,
        csr_pem: &str,
        p: CertificateParams,
        s: &[u8],
        nb: i64,
        na: i64,
        name: &str,
        role: Role,
        sans: &[String],
    ) -> Result<(String, Identity), IdentityError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(rc("unreadable certificate request"))?;
        csr.params = p;
        let cert = csr.signed_by(&self.signer, &self.key).map_err(rc("cannot sign the certificate"))?;
        let id = self.record(name, role, s, nb, na, sans)?;
        Ok((cert.pem(), id))
    }

    /// Offline issue (`ferry ca issue`): make a key and a certificate into
    /// an identity folder on this machine.
    pub fn issue_to(&self, ident: &Path, name: &str, role: Role, ttl: Duration, sans: &[String]) -> Result<Identity, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("cannot make a key"))?;
        let (p, s, nb, na) = Self::leaf_params(name, role, ttl, sans)?;
        let cert = p.signed_by(&key, &self.signer, &self.key).map_err(rc("cannot sign the certificate"))?;
        let id = self.record(name, role, &s, nb, na, sans)?;
        let crl = std::fs::read_to_string(self.dir.join("crl.pem")).ok();
        crate::enroll::store_identity(ident, &key.serialize_pem(), &cert.pem(), &self.cert_pem(), crl.as_deref(), name, role, None)?;
        Ok(id)
    }

    /// Everything issued, oldest first.
    pub fn list(&self) -> Result<Vec<Issued>, IdentityError> {
        Ok(self.load()?.issued)
    }

    /// Revoke by serial (hex), or every unrevoked certificate of a machine
    /// (`NAME` or `ROLE/NAME`). Returns what was revoked; the revocation
    /// list is rewritten.
    pub fn revoke(&self, what: &str) -> Result<Vec<Issued>, IdentityError> {
        let _l = Locked::take(&self.dir)?;
        let mut st = self.load()?;
        let (role, name) = match what.split_once('/') {
            Some((r, n)) => (Some(r.parse::<Role>()?), n),
            None => (None, what),
        };
        let now = now_secs();
        // A serial also takes the older certificates of the same machine
        // with it (renewal superseded them; a stolen old key must not
        // outlive the revocation of the current one).
        let by_serial = st.issued.iter().find(|i| i.serial == what.to_ascii_lowercase()).map(|i| (i.role, i.name.clone(), i.not_before));
        let mut done = Vec::new();
        for i in st.issued.iter_mut() {
            let hit = match &by_serial {
                Some((r, n, nb)) => i.role == *r && i.name == *n && i.not_before <= *nb,
                None => i.name == name && role.is_none_or(|r| r == i.role),
            };
            if hit && i.revoked.is_none() {
                i.revoked = Some(now);
                done.push(i.clone());
            }
        }
        if done.is_empty() {
            return Err(IdentityError::Usage(format!(
                "nothing to revoke for {what:?}: no unrevoked certificate has that serial or machine name (see `ferry ca list`)"
            )));
        }
        // The state first: a list that failed to be written is rebuilt
        // from it (with this revocation) next time.
        st.crl_number += 1;
        self.save(&st)?;
        self.write_crl(&st)?;
        Ok(done)
    }

    /// Sign and write the revocation list of `st` (its `crl_number`).
    fn write_crl(&self, st: &CaState) -> Result<(), IdentityError> {
        let now = now_secs();
        let revoked = st
            .issued
            .iter()
            .filter_map(|i| {
                let t = i.revoked?;
                let s = ferry_common::durable::unhex::<16>(&i.serial)?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&s),
                    revocation_time: odt(t),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let p = CertificateRevocationListParams {
            this_update: odt(now - BACKDATE_SECS),
            next_update: odt(now + 7 * 86400),
            crl_number: SerialNumber::from(st.crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = p.signed_by(&self.signer, &self.key).map_err(rc("cannot sign the revocation list"))?;
        write_file(&self.dir.join("crl.pem"), crl.pem().map_err(rc("cannot encode the revocation list"))?.as_bytes(), 0o644)
    }

    /// Sign the revocation list again if it is older than `max_age` (it
    /// says it is good for 7 days; `ferry ca serve` renews it daily).
    pub fn refresh_crl(&self, max_age: Duration) -> Result<bool, IdentityError> {
        let p = self.dir.join("crl.pem");
        let age = std::fs::metadata(&p).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a < max_age) {
            return Ok(false);
        }
        let _l = Locked::take(&self.dir)?;
        let mut st = self.load()?;
        st.crl_number += 1;
        self.save(&st)?;
        self.write_crl(&st)?;
        Ok(true)
    }

    /// Whether `serial` may renew: issued here, not revoked, and the newest
    /// certificate of its machine (a superseded one may not).
    pub fn renewable(&self, serial: &str) -> Result<Result<Issued, String>, IdentityError> {
        let st = self.load()?;
        let Some(me) = st.issued.iter().find(|i| i.serial == serial) else {
            return Ok(Err("the certificate was not issued by this CA".into()));
        };
        if me.revoked.is_some() {
            return Ok(Err(format!("{}/{} (serial {serial}) is revoked", me.role, me.name)));
        }
        if st.issued.iter().any(|i| i.role == me.role && i.name == me.name && i.not_before > me.not_before) {
            return Ok(Err(format!(
                "{}/{} (serial {serial}) was superseded by a renewal; renew with the newest certificate",
                me.role, me.name
            )));
        }
        Ok(Ok(me.clone()))
    }

    /// The current revocation list, PEM.
    pub fn crl_pem(&self) -> Result<String, IdentityError> {
        let p = self.dir.join("crl.pem");
        std::fs::read_to_string(&p).map_err(IdentityError::io(format!("cannot read {}", p.display())))
    }

    /// A one-time join token for `name`/`role`, valid for `ttl`.
    pub fn create_token(&self, role: Role, name: &str, ttl: Duration, sans: &[String]) -> Result<Token, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::Usage(format!("machine name {name:?}: expected 1-64 of A-Z a-z 0-9 . _ -")));
        }
        reserved(role, name)?;
        check_sans(sans)?;
        let tok = Token { id: hex(&random::<6>()), secret: hex(&random::<16>()), pin: self.pin()? };
        let _l = Locked::take(&self.dir)?;
        let mut st = self.load()?;
        let now = now_secs();
        // Forget tokens that ended more than a week ago.
        st.tokens.retain(|t| t.expires.max(t.used.unwrap_or(0)) + 7 * 86400 > now);
        st.tokens.push(TokenRec {
            id: tok.id.clone(),
            secret_hash: blake3::hash(tok.secret.as_bytes()).to_hex().to_string(),
            role,
            name: name.into(),
            expires: now + ttl.as_secs() as i64,
            used: None,
            sans: sans.to_vec(),
        });
        self.save(&st)?;
        Ok(tok)
    }

    /// Redeem a token once: the role, name and host names it was made for.
    pub fn redeem_token(&self, id: &str, secret: &str) -> Result<(Role, String, Vec<String>), IdentityError> {
        let _l = Locked::take(&self.dir)?;
        let mut st = self.load()?;
        let now = now_secs();
        let hash = blake3::hash(secret.as_bytes()).to_hex().to_string();
        let t =
            st.tokens.iter_mut().find(|t| t.id == id && constant_eq(t.secret_hash.as_bytes(), hash.as_bytes())).ok_or_else(|| {
                IdentityError::Token("join token refused: unknown to this CA (create one with `ferry token create`)".into())
            })?;
        if let Some(u) = t.used {
            return Err(IdentityError::Token(format!(
                "join token refused: already used at {} (a token works once; create a new one)",
                crate::when(u)
            )));
        }
        if t.expires <= now {
            return Err(IdentityError::Token(format!("join token refused: expired at {} (create a new one)", crate::when(t.expires))));
        }
        t.used = Some(now);
        let out = (t.role, t.name.clone(), t.sans.clone());
        self.save(&st)?;
        Ok(out)
    }

    /// Whether a serial (hex) is revoked, and whether this CA issued it.
    pub fn status_of(&self, serial: &str) -> Result<Option<Issued>, IdentityError> {
        Ok(self.load()?.issued.into_iter().find(|i| i.serial == serial))
    }
}

/// Host names and addresses a certificate may also name: at most 16, each
/// an IP address or a DNS name.
fn check_sans(sans: &[String]) -> Result<&[String], IdentityError> {
    if sans.len() > 16 {
        return Err(IdentityError::Usage("--san: at most 16 host names or addresses".into()));
    }
    for h in sans {
        let dns = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if h.parse::<std::net::IpAddr>().is_err() && !dns {
            return Err(IdentityError::Usage(format!("--san {h:?}: expected an IP address or a DNS name")));
        }
    }
    Ok(sans)
}

/// The reserved identity is refused to tokens and `ca issue`.
fn reserved(role: Role, name: &str) -> Result<(), IdentityError> {
    if role == Role::ConfigServer && name == CA_SERVER_NAME {
        return Err(IdentityError::Usage(format!("{role}/{name} is reserved for `ferry ca serve`; choose another name")));
    }
    Ok(())
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A positive 16-byte serial with no leading zero byte (so its hex is the
/// same wherever it is read).
fn serial() -> [u8; 16] {
    let mut s = random::<16>();
    s[0] = (s[0] & 0x7f) | 0x01;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_work_once_and_expire() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(&d.path().join("ca")).unwrap();
        let t = ca.create_token(Role::Agent, "db1", Duration::from_secs(600), &[]).unwrap();
        assert_eq!(Token::parse(&t.render()).unwrap(), t);
        assert_eq!(t.pin, ca.pin().unwrap());
        assert!(ca.redeem_token(&t.id, "0".repeat(32).as_str()).is_err(), "a wrong secret is refused");
        assert_eq!(ca.redeem_token(&t.id, &t.secret).unwrap(), (Role::Agent, "db1".to_string(), vec![]));
        let e = ca.redeem_token(&t.id, &t.secret).unwrap_err().to_string();
        assert!(e.contains("already used"), "{e}");
        let t2 = ca.create_token(Role::Agent, "db2", Duration::from_secs(0), &[]).unwrap();
        let e = ca.redeem_token(&t2.id, &t2.secret).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        assert!(Token::parse("ferry-join-1.abc.def.012").is_err());
        // The CA server's own name is reserved.
        assert!(ca.create_token(Role::ConfigServer, CA_SERVER_NAME, Duration::from_secs(60), &[]).is_err());
        assert!(ca.create_token(Role::ConfigServer, "cfg1", Duration::from_secs(60), &[]).is_ok());
    }

    #[test]
    fn a_folder_with_a_ca_is_not_overwritten_and_reopens_with_the_same_pin() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ca");
        let ca = Ca::init(&dir).unwrap();
        let pin = ca.pin().unwrap();
        assert!(Ca::init(&dir).is_err());
        assert_eq!(Ca::open(&dir).unwrap().pin().unwrap(), pin);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn issued_certificates_name_one_identity_and_revocation_is_listed() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::init(&d.path().join("ca")).unwrap();
        let id = ca
            .issue_to(&d.path().join("id"), "mt1", Role::MasterTarget, DEFAULT_CERT_TTL, &["127.0.0.1".into(), "mt1.example".into()])
            .unwrap();
        let pem = std::fs::read_to_string(d.path().join("id/cert.pem")).unwrap();
        let der = pem_blocks(&pem, "CERTIFICATE").unwrap().remove(0);
        let seen = crate::identity_of(&der).unwrap();
        assert_eq!(seen, id);
        assert!((seen.not_after - now_secs() - 30 * 86400).abs() < 10);
        let r = ca.revoke("master-target/mt1").unwrap();
        assert_eq!(r[0].serial, id.serial);
        assert!(ca.revoke(&id.serial).is_err(), "already revoked");
        assert!(ca.list().unwrap()[0].revoked.is_some());
    }
}
