//! `ferry ca …`, `ferry token create`, `ferry enroll`: parse, call
//! ferry-identity, print.

use super::{out_line, CaCmd, TokenCmd, Usage};
use anyhow::Result;
use ferry_identity::ca::Ca;
use ferry_identity::{parse_ttl, IdentityError};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Usage mistakes exit 2; everything else 1.
fn err(e: IdentityError) -> anyhow::Error {
    match e {
        IdentityError::Usage(m) => Usage(m).into(),
        e => e.into(),
    }
}

fn when(secs: i64) -> String {
    ferry_identity::when(secs)
}

pub fn ca(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            let ca = Ca::init(&dir).map_err(err)?;
            println!("CA created in {} (key readable by root only)", dir.display());
            println!("pin {}", ca.pin().map_err(err)?);
        }
        CaCmd::Serve { dir, listen, cert_ttl } => {
            let ttl = parse_ttl("--cert-ttl", &cert_ttl).map_err(err)?;
            let addr = ferry_common::net::resolve("--listen", &listen, true).map_err(Usage::from)?[0];
            let s = ferry_identity::enroll::CaServer::bind(&dir, addr, ttl).map_err(err)?;
            log::info!("ca serve: answering enrollments on {}", s.local_addr().unwrap_or(addr));
            s.run(Arc::new(AtomicBool::new(false))).map_err(err)?;
        }
        CaCmd::Issue { dir, role, name, identity, ttl, san } => {
            let ttl = parse_ttl("--ttl", &ttl).map_err(err)?;
            let ca = Ca::open(&dir).map_err(err)?;
            if identity.join("cert.pem").exists() {
                return Err(Usage(format!("{} already holds an identity; choose an empty folder", identity.display())).into());
            }
            let id = ca.issue_to(&identity, &name, role.into(), ttl, &san).map_err(err)?;
            println!("issued {} (serial {}, until {}) into {}", id.label(), id.serial, when(id.not_after), identity.display());
        }
        CaCmd::Revoke { dir, what } => {
            let ca = Ca::open(&dir).map_err(err)?;
            for r in ca.revoke(&what).map_err(err)? {
                println!("revoked {}/{} (serial {})", r.role, r.name, r.serial);
            }
            println!("the revocation list is updated; machines refresh it within seconds from `ferry ca serve`");
        }
        CaCmd::List { dir, json } => {
            let ca = Ca::open(&dir).map_err(err)?;
            let list = ca.list().map_err(err)?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!("{:<32}  {:<14}  {:<20}  {:<20}  STATE", "SERIAL", "ROLE", "NAME", "UNTIL");
                let now = ferry_identity::now_secs();
                for i in list {
                    let state = match i.revoked {
                        Some(t) => format!("revoked {}", when(t)),
                        None if i.not_after <= now => "expired".into(),
                        None => "valid".into(),
                    };
                    println!("{:<32}  {:<14}  {:<20}  {:<20}  {state}", i.serial, i.role.as_str(), i.name, when(i.not_after));
                }
            }
        }
    }
    Ok(())
}

pub fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { ca, role, name, ttl, san } => {
            let ttl = parse_ttl("--ttl", &ttl).map_err(err)?;
            let ca = Ca::open(&ca).map_err(err)?;
            let t = ca.create_token(role.into(), &name, ttl, &san).map_err(err)?;
            eprintln!("join token for {}/{name}, valid once for {}:", ferry_identity::Role::from(role), humantime::format_duration(ttl));
            println!("{}", t.render());
        }
    }
    Ok(())
}

pub fn enroll(server: &str, token: &str, identity: &Path) -> Result<()> {
    let id = ferry_identity::enroll::enroll(server, token, identity).map_err(err)?;
    println!("enrolled as {} (serial {}, until {}); identity in {}", id.label(), id.serial, when(id.not_after), identity.display());
    Ok(())
}

/// Load `--identity DIR` for a role: the certificate must name that role.
pub fn held(dir: Option<&Path>, role: ferry_identity::Role) -> Result<Option<ferry_identity::enroll::Held>> {
    let Some(dir) = dir else { return Ok(None) };
    let h = ferry_identity::enroll::Held::load(dir).map_err(err)?;
    let id = h.creds.identity();
    if id.role != role {
        return Err(Usage(format!(
            "--identity {}: the certificate names {}, but this command runs as {role}; give an identity enrolled with `ferry token create --role {role}`",
            dir.display(),
            id.label()
        ))
        .into());
    }
    Ok(Some(h))
}

fn data_dir(data: &Path) -> Result<()> {
    if !data.is_dir() {
        return Err(Usage(format!("--data {}: not a folder (the master target's data folder)", data.display())).into());
    }
    Ok(())
}

pub fn grant(data: &Path, name: &str, to: &str) -> Result<()> {
    data_dir(data)?;
    let ok = to.split_once('/').is_some_and(|(r, n)| r.parse::<ferry_identity::Role>().is_ok() && ferry_identity::valid_name(n));
    if !ok {
        return Err(Usage(format!("--to {to:?}: expected ROLE/NAME as a certificate names it, e.g. agent/db1")).into());
    }
    match ferry_target::store::access::grant(data, name, to)? {
        Some(old) if old != to => println!("disk {name}: {to} may write it now (was {old})"),
        _ => println!("disk {name}: {to} may write it now"),
    }
    Ok(())
}

pub fn revoke(data: &Path, name: &str) -> Result<()> {
    data_dir(data)?;
    match ferry_target::store::access::revoke(data, name)? {
        Some(old) => println!("disk {name}: no longer bound to {old}; it refuses every identity until `ferry grant` names an owner"),
        None => println!("disk {name}: was not bound to an identity"),
    }
    Ok(())
}

/// The TLS configuration of `ferry export --identity`: any certificate of
/// the site's CA may read a point (an operator's, a recovery host's); the
/// revocation list is kept fresh while the export runs.
pub fn export_tls(h: &ferry_identity::enroll::Held) -> Result<ferry_target::nbd::Tls> {
    use ferry_identity::tls;
    let v = tls::PeerVerifier::new(h.trust.clone(), &ferry_identity::Role::ALL, true);
    let c = tls::server_config(h.creds.clone(), v).map_err(err)?;
    h.keep_fresh(std::time::Duration::from_secs(5));
    Ok((c, ferry_link::Watch::start(h.trust.clone())))
}

/// `ferry status --identity DIR`.
pub fn status(dir: &Path, json: bool) -> Result<()> {
    let (key, chain) = ferry_identity::tls::read_identity(dir).map_err(err)?;
    let id = ferry_identity::tls::Credentials::from_pem(&key, &chain).map_err(err)?.identity();
    let server = ferry_identity::enroll::identity_file(dir).ok().and_then(|f| f.server);
    let now = ferry_identity::now_secs();
    let renew_at = id.not_before + (id.not_after - id.not_before) * 2 / 3;
    let warning = if id.not_after <= now {
        Some(format!(
            "the certificate expired at {}: connections are refused; enroll again (`ferry token create`, then `ferry enroll`)",
            when(id.not_after)
        ))
    } else if id.not_after - now < 7 * 86400 {
        Some(format!(
            "the certificate expires at {} and has not been renewed{}",
            when(id.not_after),
            if server.is_some() { " (is `ferry ca serve` reachable?)" } else { " (issued offline: issue a new one with `ferry ca issue`)" }
        ))
    } else {
        None
    };
    if json {
        let v = serde_json::json!({
            "name": id.name, "role": id.role, "serial": id.serial, "not_before": id.not_before, "not_after": id.not_after,
            "renew_at": renew_at, "ca_server": server, "warning": warning,
        });
        println!("{v}");
    } else {
        println!("identity   {}   serial {}", id.label(), id.serial);
        println!("valid      {} to {} (renews from {})", when(id.not_before), when(id.not_after), when(renew_at));
        println!("ca server  {}", server.as_deref().unwrap_or("none (issued offline)"));
        if let Some(w) = &warning {
            println!("WARNING    {w}");
        }
    }
    Ok(())
}
