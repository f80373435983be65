//! Who is asking: users with roles (admin, operator, viewer), passwords
//! hashed with argon2id, browser sessions with a CSRF token, API tokens.
//!
//! A session cookie (`ferry_session`, HttpOnly, SameSite=Strict, Secure over
//! TLS) carries a random secret; the database keeps only its BLAKE3 hash,
//! as it does for API tokens (`ferry-api-1.ID.SECRET`, sent as
//! `Authorization: Bearer …`). A state-changing request made with a session
//! must carry the session's CSRF token (form field `csrf` or header
//! `X-CSRF-Token`); one made with an API token needs none (a browser never
//! sends it on its own).

use std::path::Path;

use anyhow::{bail, Context, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::HeaderMap;

use crate::db::{now_ms, Db, User};

/// How long a login lasts.
pub const SESSION_MS: i64 = 12 * 3600 * 1000;
pub const COOKIE: &str = "ferry_session";

/// What a user may do, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Sees everything, changes nothing.
    Viewer,
    /// Protects disks, edits policies, acknowledges alerts, runs test
    /// failovers, failovers and plans.
    Operator,
    /// Also manages users, API tokens of others, webhooks and join tokens.
    Admin,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "viewer" => Some(Level::Viewer),
            "operator" => Some(Level::Operator),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }
}

/// How a request proved who it is.
#[derive(Clone, Debug)]
pub enum Via {
    Session { csrf: String, id_hash: String },
    Token,
}

#[derive(Clone, Debug)]
pub struct Caller {
    pub user: User,
    pub via: Via,
}

impl Caller {
    pub fn level(&self) -> Level {
        Level::parse(&self.user.role).unwrap_or(Level::Viewer)
    }
    pub fn can(&self, need: Level) -> bool {
        self.level() >= need
    }
    /// A state-changing request's CSRF check (sessions only).
    pub fn csrf_ok(&self, given: Option<&str>) -> bool {
        match &self.via {
            Via::Token => true,
            Via::Session { csrf, .. } => given.is_some_and(|g| same(g.as_bytes(), csrf.as_bytes())),
        }
    }
    pub fn csrf(&self) -> String {
        match &self.via {
            Via::Session { csrf, .. } => csrf.clone(),
            Via::Token => String::new(),
        }
    }
}

/// Equal in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hash_secret(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex().to_string()
}

fn random_secret(n: usize) -> String {
    const ALPHA: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    (0..n).map(|_| ALPHA[rand::random::<usize>() % ALPHA.len()] as char).collect()
}

pub fn hash_password(pw: &str) -> Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(Argon2::default().hash_password(pw.as_bytes(), &salt).map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?.to_string())
}

pub fn check_password(pw: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

/// A user name: 1-64 of A-Z a-z 0-9 . _ - @.
pub fn valid_user(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

pub fn check_new_password(pw: &str) -> Result<()> {
    if pw.chars().count() < 10 {
        bail!("a password needs at least 10 characters");
    }
    if pw.len() > 1024 {
        bail!("a password may have at most 1024 bytes");
    }
    Ok(())
}

/// With no user yet, make `admin`: its password from `file`, else a random
/// one said once in the log.
pub async fn first_admin(db: &Db, file: Option<&Path>) -> Result<()> {
    if db.user_count().await? > 0 {
        return Ok(());
    }
    let (pw, said) = match file {
        Some(f) => {
            let pw = std::fs::read_to_string(f).with_context(|| format!("reading the admin password from {}", f.display()))?;
            let pw = pw.trim_end_matches(['\n', '\r']).to_string();
            check_new_password(&pw).with_context(|| format!("{}", f.display()))?;
            (pw, false)
        }
        None => (random_secret(20), true),
    };
    if db.create_user("admin", "admin", &hash_password(&pw)?).await? {
        if said {
            log::warn!("created user admin with password {pw} (log in and change it, or start with --admin-password-file)");
        } else {
            log::info!("created user admin (password from the file)");
        }
    }
    Ok(())
}

/// Log in: a new session (cookie secret, CSRF token), or None.
pub async fn login(db: &Db, name: &str, pw: &str) -> Result<Option<(String, String)>> {
    let Some(u) = db.user(name).await? else {
        // The same work as a real check, so that timing does not say which names exist.
        let _ = check_password(pw, "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0V2J3lXyjY1q5a0mG8dE0mT6o2x9b0b3dYk5oF1pQmA");
        return Ok(None);
    };
    let pw = pw.to_string();
    let hash = u.pw_hash.clone();
    // argon2 takes tens of milliseconds: off the async workers.
    let ok = tokio::task::spawn_blocking(move || check_password(&pw, &hash)).await.unwrap_or(false);
    if !ok {
        return Ok(None);
    }
    let secret = random_secret(40);
    let csrf = random_secret(32);
    db.create_session(&hash_secret(&secret), &u.name, &csrf, now_ms() + SESSION_MS).await?;
    Ok(Some((secret, csrf)))
}

pub async fn logout(db: &Db, c: &Caller) -> Result<()> {
    if let Via::Session { id_hash, .. } = &c.via {
        db.delete_session(id_hash).await?;
    }
    Ok(())
}

/// A new API token for `user`: the token itself is shown once.
pub async fn new_token(db: &Db, user: &str, label: &str) -> Result<(String, String)> {
    let id = crate::db::new_id()[..12].to_string();
    let token = format!("ferry-api-1.{id}.{}", random_secret(40));
    db.create_token(&id, &hash_secret(&token), user, label).await?;
    Ok((id, token))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    for v in headers.get_all(axum::http::header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=') {
                if k == name {
                    return Some(val.to_string());
                }
            }
        }
    }
    None
}

/// Who sent these headers, if anyone we know.
pub async fn caller(db: &Db, headers: &HeaderMap) -> Result<Option<Caller>> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Ok(db.token_user(&hash_secret(t.trim())).await?.map(|user| Caller { user, via: Via::Token }));
        }
    }
    if let Some(s) = cookie(headers, COOKIE) {
        let id_hash = hash_secret(&s);
        return Ok(db.session(&id_hash).await?.map(|s| Caller { user: s.user, via: Via::Session { csrf: s.csrf, id_hash } }));
    }
    Ok(None)
}

/// The Set-Cookie value of a new session (or of its removal, with "").
pub fn session_cookie(secret: &str, secure: bool) -> String {
    let max_age = if secret.is_empty() { 0 } else { SESSION_MS / 1000 };
    format!("{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}", if secure { "; Secure" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_check() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(check_password("correct horse battery", &h));
        assert!(!check_password("correct horse batterz", &h));
        assert!(!check_password("x", "not a hash"));
    }

    #[test]
    fn levels_order() {
        assert!(Level::Admin > Level::Operator && Level::Operator > Level::Viewer);
        assert_eq!(Level::parse("root"), None);
    }
}
