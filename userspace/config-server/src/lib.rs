//! ferry's configuration server: the management plane.
//!
//! It knows every role that reports to it (agents, process servers, master
//! targets send a [`RoleReport`] as their heartbeat), holds the protection
//! groups' policies and hands them out in the heartbeat's answer, turns the
//! reports into alerts (delivered to signed webhooks) and chart samples,
//! drives recovery plans through jobs the master targets pick up, and serves
//! all of it as a REST API (`/api/v1/…`, described at `/api/openapi.json`),
//! a server-rendered website (`/`) and Prometheus text (`/metrics`).
//!
//! Nothing in the data path waits for it: a role that cannot reach it keeps
//! replicating on its last policy, and recovery needs no control plane.
//!
//! | module | what |
//! |---|---|
//! | [`db`] | storage over SQLite or PostgreSQL, migrations |
//! | [`auth`] | users (argon2), sessions, CSRF, API tokens, roles |
//! | [`api`] | the REST API and the heartbeat endpoint |
//! | [`web`] | the website's pages (askama templates) |
//! | [`alerts`] | evaluation of alert conditions, webhook delivery |
//! | [`plans`] | recovery plans, run step by step |
//!
//! Several instances may share one PostgreSQL database behind a load
//! balancer: they hold no state of their own beyond caches, and every
//! once-only decision is a conditional statement in the database (db.rs).
//!
//! Locking: none in this crate beyond the database's; handlers are
//! stateless apart from [`App`], which is read-only after start.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod db;
pub mod plans;
pub mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use ferry_common::report::RoleReport;
use ferry_identity::Identity;
use tokio::sync::Semaphore;

pub use db::Db;
pub use ferry_common::control::HeartbeatReply;

/// How the server is started (`ferry config-server …`).
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://…`.
    pub db: String,
    /// Its own identity (role config-server): HTTPS, and roles' heartbeats
    /// authenticated by their certificates.
    pub identity: Option<PathBuf>,
    /// A CA folder to host: join tokens from the API, enrollments at `enroll_listen`.
    pub ca: Option<PathBuf>,
    pub enroll_listen: Option<SocketAddr>,
    /// A role silent this long raises "heartbeat lost".
    pub heartbeat_timeout: Duration,
    /// What roles are told to report at.
    pub heartbeat_every: Duration,
    /// The first admin's password, read at start when there is no user yet.
    pub admin_password_file: Option<PathBuf>,
    /// Chart samples older than this are dropped.
    pub keep_samples: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// What every handler shares.
pub struct App {
    pub db: Db,
    pub cfg: Config,
    /// This instance's id (for leases in the database and logs).
    pub instance: String,
    pub started: Instant,
    /// Served over TLS (cookies are then Secure).
    pub tls: bool,
    pub counters: Counters,
}

#[derive(Default)]
pub struct Counters {
    pub heartbeats: std::sync::atomic::AtomicU64,
    pub heartbeat_errors: std::sync::atomic::AtomicU64,
    pub deliveries_sent: std::sync::atomic::AtomicU64,
    pub deliveries_failed: std::sync::atomic::AtomicU64,
}

/// The peer's identity, from its TLS client certificate (None: a browser,
/// `ferry ctl`, or a plaintext connection).
#[derive(Clone, Debug)]
pub struct Peer(pub Option<Identity>);

/// A started server: its address, and a switch to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Running {
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Run the server until SIGINT or SIGTERM.
pub fn run(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("config-server").build()?;
    rt.block_on(async move {
        let r = start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        log::info!("stopping");
        r.stop();
        Ok(())
    })
}

/// Open the database, make the first admin if needed, bind, and serve in
/// the background of the current runtime.
pub async fn start(cfg: Config) -> Result<Running> {
    if cfg.identity.is_none() && !cfg.listen.ip().is_loopback() {
        ferry_common::net::check_listen("listen", cfg.listen)?;
    }
    let db = Db::open(&cfg.db).await?;
    auth::first_admin(&db, cfg.admin_password_file.as_deref()).await?;
    let tls = match &cfg.identity {
        Some(dir) => Some(tls_acceptor(dir)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let app = Arc::new(App {
        db,
        instance: db::new_id()[..12].to_string(),
        started: Instant::now(),
        tls: tls.is_some(),
        cfg,
        counters: Counters::default(),
    });
    if let (Some(ca), Some(at)) = (&app.cfg.ca, app.cfg.enroll_listen) {
        let srv = ferry_identity::enroll::CaServer::bind(ca, at, Duration::from_secs(30 * 86400))
            .map_err(|e| anyhow::anyhow!("hosting the CA at {at}: {e}"))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::Builder::new().name("ca".into()).spawn(move || {
            if let Err(e) = srv.run(stop) {
                log::error!("the CA server stopped: {e}");
            }
        })?;
        log::info!("enrollments answered at {at}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = router(app.clone());
    tokio::spawn(alerts::evaluate_loop(app.clone(), stop_rx.clone()));
    tokio::spawn(alerts::deliver_loop(app.clone(), stop_rx.clone()));
    tokio::spawn(plans::resume_loop(app.clone(), stop_rx.clone()));
    tokio::spawn(accept_loop(listener, tls, router, app.cfg.max_connections, stop_rx));
    log::info!(
        "configuration server {} listening on {addr} ({}), database {} (schema {})",
        app.instance,
        if app.tls { "https" } else { "http" },
        db::redact(&app.cfg.db),
        app.db.schema_version().await.unwrap_or(0)
    );
    Ok(Running { addr, app, stop: stop_tx })
}

/// Every route: the API, the website, the metrics.
pub fn router(app: Arc<App>) -> Router {
    api::routes().merge(web::routes()).with_state(app)
}

fn tls_acceptor(dir: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    use ferry_identity::{tls, Role};
    let held = ferry_identity::enroll::Held::load(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if held.creds.identity().role != Role::ConfigServer {
        anyhow::bail!(
            "{}: the identity is {}, not a config-server one; enroll with a token made with --role config-server",
            dir.display(),
            held.creds.identity().label()
        );
    }
    held.keep_fresh(Duration::from_secs(3600));
    // Client certificates are optional: browsers and scripts log in instead.
    let verifier = tls::PeerVerifier::new(held.trust.clone(), &[Role::Agent, Role::ProcessServer, Role::MasterTarget], false);
    let mut cfg = (*tls::server_config(held.creds.clone(), verifier).map_err(|e| anyhow::anyhow!("{e}"))?).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    max: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    loop {
        let (tcp, _remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Past the limit a connection waits for a slot (the kernel's
        // backlog holds the rest): bounded, never unbounded tasks.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            match tls {
                Some(acc) => {
                    let s = match tokio::time::timeout(Duration::from_secs(10), acc.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            log::debug!("TLS handshake: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                    let peer = ferry_identity::tls::peer_identity(s.get_ref().1);
                    serve_conn(s, router, Peer(peer)).await
                }
                None => serve_conn(tcp, router, Peer(None)).await,
            }
        });
    }
}

async fn serve_conn<S>(s: S, router: Router, peer: Peer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
    // An idle keep-alive connection is closed after two minutes.
    let _ = tokio::time::timeout(Duration::from_secs(120), conn).await;
}

/// The disks the server knows, each merged from every role's report.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskView {
    pub name: String,
    pub agent: Option<String>,
    pub process_server: Option<String>,
    pub master_target: Option<String>,
    pub group: Option<String>,
    /// The agent's state word, else the master target's.
    pub state: String,
    pub reason: Option<String>,
    pub tracker: Option<String>,
    pub mode: Option<String>,
    pub lag_ms: Option<u64>,
    pub backlog_bytes: Option<u64>,
    /// Milliseconds from the newest recovery point's source time to now.
    pub rpo_ms: Option<i64>,
    pub rpo_threshold_s: u64,
    pub last_point_unix_ms: Option<i64>,
    pub points: Option<u64>,
    pub resync_required: bool,
    /// When a role last reported this disk.
    pub seen_ms: i64,
    /// Open alerts on this disk.
    pub alerts: Vec<String>,
}

/// Build the merged disk views (also used by the dashboard and /metrics).
pub async fn disk_views(app: &App) -> Result<Vec<DiskView>> {
    let now = db::now_ms();
    let rows = app.db.disk_rows().await?;
    let machines = app.db.machines().await?;
    let groups = app.db.groups().await?;
    let open = app.db.alerts(true, 10_000).await?;
    let mut out: Vec<DiskView> = Vec::new();
    for r in rows {
        let i = match out.iter().position(|d| d.name == r.disk) {
            Some(i) => i,
            None => {
                out.push(DiskView {
                    name: r.disk.clone(),
                    agent: None,
                    process_server: None,
                    master_target: None,
                    group: None,
                    state: String::new(),
                    reason: None,
                    tracker: None,
                    mode: None,
                    lag_ms: None,
                    backlog_bytes: None,
                    rpo_ms: None,
                    rpo_threshold_s: db::Policy::default().rpo_threshold_s,
                    last_point_unix_ms: None,
                    points: None,
                    resync_required: false,
                    seen_ms: 0,
                    alerts: Vec::new(),
                });
                out.len() - 1
            }
        };
        let d = &mut out[i];
        let rep = &r.report;
        d.seen_ms = d.seen_ms.max(r.seen_ms);
        d.resync_required |= rep.resync_required;
        d.last_point_unix_ms = d.last_point_unix_ms.max(rep.last_point_unix_ms);
        match r.role.as_str() {
            "agent" => {
                d.agent = Some(r.machine.clone());
                d.state = rep.state.clone();
                d.reason = rep.reason.clone();
                d.tracker = rep.tracker.clone();
                d.mode = rep.mode.clone();
                d.lag_ms = rep.lag_ms;
                d.backlog_bytes = rep.backlog_bytes;
                d.group = machines.iter().find(|m| m.role == "agent" && m.name == r.machine).and_then(|m| m.group.clone());
            }
            "process-server" => d.process_server = Some(r.machine.clone()),
            "master-target" => {
                d.master_target = Some(r.machine.clone());
                d.points = rep.points;
                if d.state.is_empty() {
                    d.state = rep.state.clone();
                }
            }
            _ => {}
        }
    }
    for d in &mut out {
        d.rpo_ms = d.last_point_unix_ms.map(|p| (now - p).max(0));
        if let Some(g) = d.group.as_ref().and_then(|g| groups.iter().find(|x| &x.name == g)) {
            d.rpo_threshold_s = g.policy.rpo_threshold_s;
        }
        let agent_subject = d.agent.as_ref().map(|a| format!("agent/{a}"));
        d.alerts =
            open.iter().filter(|a| a.subject == d.name || Some(&a.subject) == agent_subject.as_ref()).map(|a| a.kind.clone()).collect();
    }
    Ok(out)
}

/// Check a heartbeat's claimed identity against the peer's certificate.
pub fn authorize_report(app: &App, peer: &Peer, r: &RoleReport) -> std::result::Result<(), String> {
    if !matches!(r.role.as_str(), "agent" | "process-server" | "master-target") {
        return Err(format!("unknown role {:?}", r.role));
    }
    if !ferry_identity::valid_name(&r.name) {
        return Err(format!("invalid machine name {:?}", r.name));
    }
    match (&peer.0, app.tls) {
        (Some(id), _) if id.role.as_str() == r.role && id.name == r.name => Ok(()),
        (Some(id), _) => Err(format!("{} may not report as {}/{}", id.label(), r.role, r.name)),
        (None, true) => Err("a heartbeat needs the role's client certificate".into()),
        // Plaintext is loopback only (checked at start).
        (None, false) => Ok(()),
    }
}
