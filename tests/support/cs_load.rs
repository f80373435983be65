//! `ferry-cs-load`: the configuration server's benchmark load (scripts/bench-cs).
//!
//! ```text
//! ferry-cs-load run --server HOST:PORT --password-file FILE [--user admin]
//!     [--agents N] [--conns C] [--rate HB_PER_S] [--secs S] [--disks D] [--label L]
//!   N simulated agents (machines bench-agent-0000…, one disk each, realistic
//!   reports: advancing byte counters, lag, backlog, a point every 5 s) post
//!   heartbeats over C keep-alive connections (threads; agents i with
//!   i % C == thread), as fast as they are answered, or together at about
//!   HB_PER_S a second, for S seconds. Meanwhile one more connection times
//!   GET /api/v1/disks and GET /api/v1/alerts (bearer token) back to back.
//!   Then, with the load stopped, the dashboard: D disks registered (agents
//!   beyond N send one heartbeat each; master targets bench-mt-NN report
//!   every disk with their newest 50 points), and GET / (session cookie)
//!   and GET /api/v1/disks timed to the last byte, median of 5.
//!   Prints one JSON object (the figures) on stdout.
//! ferry-cs-load postgres --url-file FILE [--dir-file FILE]
//!   A private PostgreSQL (tests/support/postgres.rs) until SIGTERM or
//!   SIGINT: its URL written to FILE (its temporary folder to --dir-file),
//!   then stopped and removed.
//! ```

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_common::report::{DiskReport, PointInfo, RoleReport};
use serde_json::{json, Value};

type Res<T> = Result<T, String>;

fn usage() -> ! {
    eprintln!(
        "usage: ferry-cs-load run --server HOST:PORT --password-file FILE [--user U] [--agents N] [--conns C] \
         [--rate HB_PER_S] [--secs S] [--disks D] [--label L]\n       ferry-cs-load postgres --url-file FILE [--dir-file FILE]"
    );
    std::process::exit(2)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let r = match a.first().map(String::as_str) {
        Some("run") => run(&a[1..]),
        Some("postgres") => postgres(&a[1..]),
        _ => usage(),
    };
    if let Err(e) = r {
        eprintln!("ferry-cs-load: {e}");
        std::process::exit(1);
    }
}

/// `--name VALUE` pairs.
fn opts(a: &[String]) -> Res<std::collections::HashMap<String, String>> {
    let mut m = std::collections::HashMap::new();
    let mut it = a.iter();
    while let Some(k) = it.next() {
        let Some(k) = k.strip_prefix("--") else { return Err(format!("unexpected argument {k:?}")) };
        let v = it.next().ok_or_else(|| format!("--{k} needs a value"))?;
        m.insert(k.to_string(), v.clone());
    }
    Ok(m)
}

fn num<T: std::str::FromStr>(m: &std::collections::HashMap<String, String>, k: &str, default: T) -> Res<T> {
    match m.get(k) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("--{k} {v:?}: not a number")),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn postgres(a: &[String]) -> Res<()> {
    let m = opts(a)?;
    let url_file = m.get("url-file").ok_or("--url-file is needed")?;
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let pg = ferry_tests::Postgres::start().map_err(|e| format!("starting PostgreSQL: {e}"))?;
    if let Some(f) = m.get("dir-file") {
        std::fs::write(f, format!("{}\n", pg.dir().display())).map_err(|e| format!("{f}: {e}"))?;
    }
    // The URL last: the script waits for this file.
    std::fs::write(url_file, format!("{}\n", pg.url())).map_err(|e| format!("{url_file}: {e}"))?;
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(pg);
    Ok(())
}

fn now_ms() -> i64 {
    (ferry_common::now_ns() / 1_000_000) as i64
}

/// One simulated agent's state between heartbeats.
struct Sim {
    name: String,
    disk: String,
    churn: u64,
    sent: u64,
    points: u64,
    last_point: i64,
    seq: u64,
}

impl Sim {
    fn new(i: usize) -> Sim {
        Sim {
            name: format!("bench-agent-{i:04}"),
            disk: format!("bench-disk-{i:04}"),
            churn: 0,
            sent: 0,
            points: 0,
            last_point: now_ms() - 3000,
            seq: i as u64,
        }
    }

    /// The next report: counters advanced, a new point every 5 s.
    fn report(&mut self) -> RoleReport {
        let now = now_ms();
        self.seq = self.seq.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = self.seq >> 33;
        let churn = 1_000_000 + r % 4_000_000;
        self.churn += churn;
        self.sent += churn / 3;
        if now - self.last_point >= 5000 {
            self.last_point = now;
            self.points += 1;
        }
        RoleReport {
            role: "agent".into(),
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            at_unix_ms: now,
            cert_expires_unix: None,
            spool_bytes: None,
            spool_max_bytes: None,
            jobs: None,
            disks: vec![DiskReport {
                name: self.disk.clone(),
                state: "streaming".into(),
                reason: None,
                tracker: Some("bpf".into()),
                mode: Some("ring".into()),
                lag_ms: Some(20 + r % 400),
                backlog_bytes: Some(r % 8_000_000),
                churn_bytes_total: self.churn,
                sent_bytes_total: self.sent,
                points: Some(self.points),
                last_point_unix_ms: Some(self.last_point),
                last_app_point_unix_ms: None,
                journal_bytes: None,
                journal_max_bytes: None,
                resync_required: false,
                recent_points: Vec::new(),
            }],
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).max_idle_connections_per_host(1).build()
}

/// POST a JSON body; the answer's body (status 2xx) or an error.
fn post(a: &ureq::Agent, url: &str, body: &str, headers: &[(&str, &str)]) -> Res<String> {
    let mut req = a.post(url).set("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    answer(req.send_string(body))
}

fn get(a: &ureq::Agent, url: &str, headers: &[(&str, &str)]) -> Res<(u16, usize)> {
    let mut req = a.get(url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    match req.call() {
        Ok(r) => {
            let st = r.status();
            let mut b = Vec::new();
            r.into_reader().read_to_end(&mut b).map_err(|e| format!("GET {url}: {e}"))?;
            Ok((st, b.len()))
        }
        Err(ureq::Error::Status(st, r)) => {
            let mut b = Vec::new();
            let _ = r.into_reader().read_to_end(&mut b);
            Ok((st, b.len()))
        }
        Err(e) => Err(format!("GET {url}: {e}")),
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> Res<String> {
    match r {
        Ok(r) => r.into_string().map_err(|e| e.to_string()),
        Err(ureq::Error::Status(st, r)) => Err(format!("HTTP {st}: {}", r.into_string().unwrap_or_default().trim())),
        Err(e) => Err(e.to_string()),
    }
}

fn field(body: &str, k: &str) -> Res<String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    v.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| format!("no {k:?} in {body}"))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(a: &[String]) -> Res<()> {
    let m = opts(a)?;
    let server = m.get("server").ok_or("--server is needed")?.clone();
    let base = format!("http://{server}");
    let user = m.get("user").cloned().unwrap_or_else(|| "admin".into());
    let pwf = m.get("password-file").ok_or("--password-file is needed")?;
    let password = std::fs::read_to_string(pwf).map_err(|e| format!("{pwf}: {e}"))?.trim_end().to_string();
    let agents: usize = num(&m, "agents", 1000)?;
    let conns: usize = num(&m, "conns", agents.min(32))?;
    let rate: f64 = num(&m, "rate", 0.0)?;
    let secs: f64 = num(&m, "secs", 20.0)?;
    let disks: usize = num(&m, "disks", 1000)?;
    let label = m.get("label").cloned().unwrap_or_default();
    if agents == 0 || conns == 0 || conns > agents {
        return Err("--agents and --conns must be at least 1, --conns at most --agents".into());
    }

    // A session (for the dashboard) and an API token (for the API).
    let c = agent();
    let login = post(&c, &format!("{base}/api/v1/login"), &json!({"user": user, "password": password}).to_string(), &[])
        .map_err(|e| format!("login: {e}"))?;
    let session = field(&login, "session")?;
    let csrf = field(&login, "csrf")?;
    let cookie = format!("ferry_session={session}");
    let tok = post(&c, &format!("{base}/api/v1/tokens"), r#"{"label":"bench"}"#, &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)])
        .map_err(|e| format!("making an API token: {e}"))?;
    let bearer = format!("Bearer {}", field(&tok, "token")?);

    // Every agent once before the clock starts: its rows exist, so the
    // timed part is the steady state (updates), as in a running fleet.
    let sims: Vec<Sim> = (0..agents).map(Sim::new).collect();
    let sims = Arc::new(sims.into_iter().map(Mutex::new).collect::<Vec<_>>());
    let hb_url = format!("{base}/api/v1/heartbeat");
    warm(&sims, conns, &hb_url)?;

    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let hb_lat = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut threads = Vec::new();
    for t in 0..conns {
        let (sims, ok, errors, first_error, hb_lat, stop, url) =
            (sims.clone(), ok.clone(), errors.clone(), first_error.clone(), hb_lat.clone(), stop.clone(), hb_url.clone());
        // With a rate: this connection's share, evenly spaced.
        let every = (rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / rate));
        threads.push(std::thread::spawn(move || {
            let c = agent();
            let mine: Vec<usize> = (t..sims.len()).step_by(conns).collect();
            let mut lat = Vec::new();
            let mut k = 0usize;
            let mut next = Instant::now() + every.map(|e| e.mul_f64(t as f64 / conns as f64)).unwrap_or_default();
            while !stop.load(Ordering::Relaxed) {
                if let Some(e) = every {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep((next - now).min(Duration::from_millis(100)));
                        continue;
                    }
                    next += e;
                }
                let i = mine[k % mine.len()];
                k += 1;
                let body = match sims[i].lock() {
                    Ok(mut s) => serde_json::to_string(&s.report()).unwrap_or_default(),
                    Err(_) => return,
                };
                let t0 = Instant::now();
                match post(&c, &url, &body, &[]) {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        lat.push(ms(t0.elapsed()));
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
            }
            if let Ok(mut all) = hb_lat.lock() {
                all.extend_from_slice(&lat);
            }
        }));
    }
    // The API, timed under the load.
    let (mut disks_lat, mut alerts_lat, mut api_errors) = (Vec::new(), Vec::new(), 0u64);
    {
        let c = agent();
        let auth = [("Authorization", bearer.as_str())];
        while start.elapsed().as_secs_f64() < secs {
            for (path, v) in [("/api/v1/disks", &mut disks_lat), ("/api/v1/alerts", &mut alerts_lat)] {
                let t0 = Instant::now();
                match get(&c, &format!("{base}{path}"), &auth) {
                    Ok((200, _)) => v.push(ms(t0.elapsed())),
                    _ => api_errors += 1,
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let hb_ok = ok.load(Ordering::Relaxed);
    let mut hb_lat = hb_lat.lock().map(|v| v.clone()).unwrap_or_default();
    let mut api_all: Vec<f64> = disks_lat.iter().chain(alerts_lat.iter()).copied().collect();
    let registered_disks = count(&c, &format!("{base}/api/v1/disks"), &bearer)?;

    // The dashboard with `disks` disks, no load.
    fill(&base, agents, disks)?;
    let mut page = Vec::new();
    let mut page_status = 0;
    let mut page_bytes = 0;
    let mut api_disks = Vec::new();
    let mut api_bytes = 0;
    let dc = agent();
    for _ in 0..5 {
        let t0 = Instant::now();
        let (st, n) = get(&dc, &format!("{base}/"), &[("Cookie", &cookie)])?;
        page.push(ms(t0.elapsed()));
        (page_status, page_bytes) = (st, n);
        let t0 = Instant::now();
        let (st, n) = get(&dc, &format!("{base}/api/v1/disks"), &[("Authorization", &bearer)])?;
        if st != 200 {
            return Err(format!("GET /api/v1/disks: HTTP {st}"));
        }
        api_disks.push(ms(t0.elapsed()));
        api_bytes = n;
    }
    let dashboard_disks = count(&dc, &format!("{base}/api/v1/disks"), &bearer)?;

    let out = json!({
        "label": label,
        "agents": agents,
        "connections": conns,
        "rate_asked": rate,
        "seconds": elapsed,
        "heartbeats": hb_ok,
        "heartbeats_per_s": hb_ok as f64 / elapsed,
        "heartbeat_errors": errors.load(Ordering::Relaxed),
        "first_error": first_error.lock().ok().and_then(|f| f.clone()),
        "heartbeat_ms_p50": pct(&mut hb_lat, 0.5),
        "heartbeat_ms_p99": pct(&mut hb_lat, 0.99),
        "disks_during_load": registered_disks,
        "api_requests": api_all.len(),
        "api_errors": api_errors,
        "api_ms_p50": pct(&mut api_all, 0.5),
        "api_ms_p99": pct(&mut api_all, 0.99),
        "api_disks_ms_p50": pct(&mut disks_lat, 0.5),
        "api_disks_ms_p99": pct(&mut disks_lat, 0.99),
        "api_alerts_ms_p50": pct(&mut alerts_lat, 0.5),
        "api_alerts_ms_p99": pct(&mut alerts_lat, 0.99),
        "dashboard_disks": dashboard_disks,
        "dashboard_status": page_status,
        "dashboard_bytes": page_bytes,
        "dashboard_ms_median": pct(&mut page, 0.5),
        "dashboard_api_disks_ms_median": pct(&mut api_disks, 0.5),
        "dashboard_api_disks_bytes": api_bytes,
    });
    println!("{out}");
    Ok(())
}

/// How many disks GET /api/v1/disks lists.
fn count(c: &ureq::Agent, url: &str, bearer: &str) -> Res<usize> {
    let body = answer(c.get(url).set("Authorization", bearer).call())?;
    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(v.as_array().map(Vec::len).unwrap_or(0))
}

/// One heartbeat from every simulated agent, over `conns` connections.
fn warm(sims: &Arc<Vec<Mutex<Sim>>>, conns: usize, url: &str) -> Res<()> {
    let threads: Vec<_> = (0..conns)
        .map(|t| {
            let (sims, url) = (sims.clone(), url.to_string());
            std::thread::spawn(move || -> Res<()> {
                let c = agent();
                for i in (t..sims.len()).step_by(conns) {
                    let body = serde_json::to_string(&sims[i].lock().map_err(|_| "poisoned")?.report()).unwrap_or_default();
                    post(&c, &url, &body, &[]).map_err(|e| format!("first heartbeat of agent {i}: {e}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a thread panicked")??;
    }
    Ok(())
}

/// `disks` disks known to the server: agents `have..disks` send one
/// heartbeat each, and master targets (100 disks each) report every disk
/// with points, as a protected fleet looks.
fn fill(base: &str, have: usize, disks: usize) -> Res<()> {
    let url = format!("{base}/api/v1/heartbeat");
    let extra: Vec<Sim> = (have..disks).map(Sim::new).collect();
    if !extra.is_empty() {
        let sims = Arc::new(extra.into_iter().map(Mutex::new).collect::<Vec<_>>());
        warm(&sims, 8.min(sims.len()), &url)?;
    }
    let c = agent();
    let now = now_ms();
    for (mt, chunk) in (0..disks).collect::<Vec<_>>().chunks(100).enumerate() {
        let r = RoleReport {
            role: "master-target".into(),
            name: format!("bench-mt-{mt:02}"),
            version: env!("CARGO_PKG_VERSION").into(),
            at_unix_ms: now,
            disks: chunk
                .iter()
                .map(|&i| DiskReport {
                    name: format!("bench-disk-{i:04}"),
                    state: "streaming".into(),
                    churn_bytes_total: 1 << 30,
                    points: Some(50),
                    last_point_unix_ms: Some(now - 3000),
                    journal_bytes: Some(3 << 30),
                    journal_max_bytes: Some(10 << 30),
                    recent_points: (0..50)
                        .map(|p| PointInfo {
                            id: format!("{:016x}", (i as u64) << 20 | p),
                            time_unix_ms: now - 3000 - (49 - p as i64) * 60_000,
                            kind: if p % 10 == 0 { "app".into() } else { "crash".into() },
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let body = serde_json::to_string(&r).map_err(|e| e.to_string())?;
        post(&c, &url, &body, &[]).map_err(|e| format!("master target heartbeat: {e}"))?;
    }
    Ok(())
}
