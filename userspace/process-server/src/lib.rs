//! ferry process server (`ferry process-server`): a store-and-forward hop
//! on the primary site. Agents stream to it exactly as to a master target
//! (the same protocol, docs/protocol.md); it acknowledges a batch once the
//! batch is durable in its spool, and forwards each disk's spool, in order,
//! to the master target. A recovery point exists only once the master
//! target made it durable: the POINT an agent receives is the master
//! target's, passed back.
//!
//! - [`spool`]: the on-disk spool of one disk (docs/formats.md).
//! - [`relay`]: the link server's sink (the spool) and the forwarders.
//!
//! Threads: the accept loop's thread per agent connection (link server),
//! one forwarder per disk (link client, with its receiver and pinger).

pub mod dedup;
pub mod limit;
pub mod relay;
pub mod spool;

use ferry_identity::enroll::Held;
use ferry_identity::tls::{self, PeerVerifier};
use ferry_identity::Role;
use ferry_link::accept::{self, Service};
use ferry_link::server::{ServerConfig, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, WRITE_TIMEOUT};
use ferry_proto::{write_msg, ErrorCode, Msg};
use relay::{Relay, RelayConfig, Spools};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Serve agents on `listener` forever, spooling into `cfg.spool` and
/// forwarding to `cfg.upstreams`. With an identity, agents must come over
/// mutual TLS and the forwarders use it towards the master target.
pub fn serve(listener: TcpListener, cfg: RelayConfig, identity: Option<Held>) -> io::Result<()> {
    ProcessServer::open(cfg, identity)?.serve(listener)
}

/// A process server opened (its spool checked, its forwarders started)
/// and not yet serving agents: [`ProcessServer::relay`] is the handle its
/// status and /metrics read ([`Relay::report`]).
pub struct ProcessServer {
    relay: Arc<Relay>,
    front: Front,
}

impl ProcessServer {
    /// Open the spool and start forwarding what it holds.
    pub fn open(cfg: RelayConfig, identity: Option<Held>) -> io::Result<ProcessServer> {
        let (server_tls, client_tls) = match identity {
            Some(held) => {
                // Any role of the site's CA may ask for status; only agents and
                // process servers may open a disk (Spools::open checks).
                let v = PeerVerifier::new(held.trust.clone(), &Role::ALL, true);
                let sconf = tls::server_config(held.creds.clone(), v).map_err(io::Error::other)?;
                let up = PeerVerifier::new(held.trust.clone(), &[Role::MasterTarget, Role::ProcessServer], true);
                let cconf = tls::client_config(Some(held.creds.clone()), up).map_err(io::Error::other)?;
                let watch = ferry_link::Watch::start(held.trust.clone());
                held.keep_fresh(Duration::from_secs(10));
                (Some((sconf, Arc::clone(&watch))), Some((cconf, watch)))
            }
            None => (None, None),
        };
        let relay = Relay::open(cfg, client_tls).map_err(io::Error::other)?;
        let mut scfg = ServerConfig::new(format!("ferry-process-server {}", env!("CARGO_PKG_VERSION")));
        scfg.role = "this process server".into();
        scfg.idle = IDLE_TIMEOUT;
        let front = Front { spools: Spools(Arc::clone(&relay)), cfg: scfg, tls: server_tls };
        Ok(ProcessServer { relay, front })
    }

    /// The relay: its view, its report.
    pub fn relay(&self) -> Arc<Relay> {
        Arc::clone(&self.relay)
    }

    /// Serve agents on `listener` forever.
    pub fn serve(self, listener: TcpListener) -> io::Result<()> {
        let limits = accept::Limits { max_connections: 1024, handshake: HANDSHAKE_TIMEOUT, write: WRITE_TIMEOUT };
        accept::serve(listener, limits, Arc::new(self.front))
    }
}

/// The agent-facing port.
struct Front {
    spools: Spools,
    cfg: ServerConfig,
    tls: Option<(Arc<rustls::ServerConfig>, Arc<ferry_link::Watch>)>,
}

impl Service for Front {
    fn serve(&self, conn: TcpStream) {
        match &self.tls {
            None => {
                let _ = ferry_link::server::serve(conn, &self.spools, &self.cfg);
            }
            Some((config, watch)) => {
                let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let mut first = [0u8; 1];
                if matches!(conn.peek(&mut first), Ok(1)) && first[0] != 0x16 {
                    log::warn!("{peer}: refused: plaintext on a mutual-TLS listener");
                    let mut conn = conn;
                    let _ = write_msg(
                        &mut conn,
                        &Msg::Error {
                            code: ErrorCode::Refused,
                            msg: "this process server takes mutual TLS only: give the agent --identity DIR".into(),
                        },
                    );
                    return;
                }
                match ferry_link::TlsStream::accept(conn, config.clone()) {
                    Ok(t) => {
                        watch.add(&t);
                        let _ = ferry_link::server::serve(t, &self.spools, &self.cfg);
                    }
                    Err(e) => log::warn!("{peer}: refused: {e}"),
                }
            }
        }
    }

    fn busy(&self, conn: &mut TcpStream) {
        let _ = write_msg(
            conn,
            &Msg::Error { code: ErrorCode::Busy, msg: "the process server serves its maximum of connections; try again".into() },
        );
    }
}
