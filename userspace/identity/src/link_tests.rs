//! End-to-end over loopback: `ca serve`, enrollment, and mutual TLS between
//! two enrolled machines, with every refusal the issue names.

use crate::ca::{Ca, Token, DEFAULT_CERT_TTL};
use crate::enroll::{enroll, renew, CaServer, Held};
use crate::tls::{self, PeerVerifier};
use crate::Role;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Served {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(ca_dir: &Path) -> Served {
    let s = CaServer::bind(ca_dir, "127.0.0.1:0".parse().unwrap(), DEFAULT_CERT_TTL).unwrap();
    let addr = s.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    std::thread::spawn(move || s.run(st));
    Served { addr, stop }
}

/// One mutual-TLS exchange: the server (accepting `accept`) echoes a line.
fn talk(server: &Held, accept: &[Role], client: &Held, expect_server: &[Role]) -> Result<String, String> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sconf = tls::server_config(server.creds.clone(), PeerVerifier::new(server.trust.clone(), accept, true)).unwrap();
    let h = std::thread::spawn(move || -> Result<String, String> {
        let (tcp, _) = l.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(sconf).unwrap(), tcp);
        let mut b = [0u8; 5];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        let who = tls::peer_identity(&s.conn).map(|i| i.label()).unwrap_or_default();
        s.write_all(&b).map_err(|e| e.to_string())?;
        s.flush().map_err(|e| e.to_string())?;
        Ok(who)
    });
    let cconf = tls::client_config(Some(client.creds.clone()), PeerVerifier::new(client.trust.clone(), expect_server, true)).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = rustls::StreamOwned::new(rustls::ClientConnection::new(cconf, tls::server_name()).unwrap(), tcp);
    let r = c.write_all(b"hello").and_then(|_| c.flush()).and_then(|_| {
        let mut b = [0u8; 5];
        c.read_exact(&mut b).map(|_| b)
    });
    drop(c);
    let srv = h.join().unwrap();
    match (r, srv) {
        (Ok(b), Ok(who)) if &b == b"hello" => Ok(who),
        (Ok(_), Err(e)) | (Err(_), Err(e)) => Err(format!("server: {e}")),
        (Err(e), Ok(_)) => Err(format!("client: {e}")),
        (Ok(_), Ok(_)) => Err("garbled".into()),
    }
}

#[test]
fn enrolled_machines_talk_over_mutual_tls_and_every_refusal_holds() {
    let d = tempfile::tempdir().unwrap();
    let ca_dir = d.path().join("ca");
    let ca = Ca::init(&ca_dir).unwrap();
    let srv = serve(&ca_dir);

    let t_mt = ca.create_token(Role::MasterTarget, "mt1", Duration::from_secs(600), &[]).unwrap().render();
    let t_ag = ca.create_token(Role::Agent, "db1", Duration::from_secs(600), &[]).unwrap().render();
    let mt = enroll(&srv.addr, &t_mt, &d.path().join("mt")).unwrap();
    assert_eq!((mt.role, mt.name.as_str()), (Role::MasterTarget, "mt1"));
    let ag = enroll(&srv.addr, &t_ag, &d.path().join("ag")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(d.path().join("ag/key.pem")).unwrap().permissions().mode() & 0o777, 0o600);

    // A token works once.
    let e = enroll(&srv.addr, &t_ag, &d.path().join("ag2")).unwrap_err().to_string();
    assert!(e.contains("already used"), "{e}");
    assert!(!d.path().join("ag2/cert.pem").exists());
    // An expired token.
    let t_old = ca.create_token(Role::Agent, "db9", Duration::from_secs(0), &[]).unwrap().render();
    let e = enroll(&srv.addr, &t_old, &d.path().join("ag3")).unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
    // A token whose pin is another CA's: the server is not trusted, the
    // token never leaves.
    let other = Ca::init(&d.path().join("other")).unwrap();
    let t_pin = ca.create_token(Role::Agent, "db4", Duration::from_secs(600), &[]).unwrap();
    let forged = Token { pin: other.pin().unwrap(), ..t_pin.clone() }.render();
    let e = enroll(&srv.addr, &forged, &d.path().join("ag4")).unwrap_err().to_string();
    assert!(e.contains("pin"), "{e}");
    // ...and the real token still works (it was never sent).
    enroll(&srv.addr, &t_pin.render(), &d.path().join("ag4")).unwrap();

    let hmt = Held::load(&d.path().join("mt")).unwrap();
    let hag = Held::load(&d.path().join("ag")).unwrap();
    assert_eq!(talk(&hmt, &[Role::Agent], &hag, &[Role::MasterTarget]).unwrap(), ag.label());

    // An agent identity cannot act as a master target.
    let e = talk(&hag, &[Role::Agent], &hag, &[Role::MasterTarget]).unwrap_err();
    assert!(e.contains("AccessDenied") || e.contains("role"), "{e}");
    // A certificate from another CA is refused.
    // (It trusts this site's CA, so it is the master target that must
    // refuse it.)
    other.issue_to(&d.path().join("stranger"), "db1", Role::Agent, DEFAULT_CERT_TTL, &[]).unwrap();
    for f in ["ca.pem", "crl.pem"] {
        std::fs::copy(d.path().join("mt").join(f), d.path().join("stranger").join(f)).unwrap();
    }
    let hs = Held::load(&d.path().join("stranger")).unwrap();
    let e = talk(&hmt, &[Role::Agent], &hs, &[Role::MasterTarget]).unwrap_err();
    assert!(e.starts_with("server:") && e.contains("UnknownIssuer"), "{e}");
    // An expired certificate is refused.
    ca.issue_to(&d.path().join("short"), "db5", Role::Agent, Duration::from_secs(1), &[]).unwrap();
    let hshort = Held::load(&d.path().join("short")).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let e = talk(&hmt, &[Role::Agent], &hshort, &[Role::MasterTarget]).unwrap_err();
    assert!(e.contains("xpired") || e.contains("refused"), "{e}");
    assert!(Held::load(&d.path().join("short")).unwrap_err().to_string().contains("expired"));

    // Renewal: a new certificate, same identity, swapped in place.
    let before = hag.creds.identity();
    let after = renew(&d.path().join("ag"), Some(&hag.creds)).unwrap();
    assert_eq!((after.name.as_str(), after.role), ("db1", Role::Agent));
    assert_ne!(after.serial, before.serial);
    assert_eq!(hag.creds.identity().serial, after.serial);
    talk(&hmt, &[Role::Agent], &hag, &[Role::MasterTarget]).unwrap();

    // Revocation: once the master target refreshed its list, refused.
    ca.revoke("agent/db1").unwrap();
    assert!(hmt.maintain().is_none());
    let e = talk(&hmt, &[Role::Agent], &hag, &[Role::MasterTarget]).unwrap_err();
    assert!(e.starts_with("server:") && e.contains("Revoked"), "{e}");
    let chain = vec![hag.creds.certified().cert[0].clone()];
    assert!(hmt.trust.read().unwrap().still_valid(&chain).unwrap_err().contains("revoked"));
    // A revoked identity cannot renew.
    assert!(renew(&d.path().join("ag"), Some(&hag.creds)).is_err());
}
