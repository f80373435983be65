//! A role's link to the configuration server, and the API client `ferry ctl`
//! uses.
//!
//! [`Client`] speaks HTTPS to the configuration server (mutual TLS with the
//! role's identity, or only checking the server against the site's CA for a
//! person with an API token) or plain HTTP on loopback. Every request has a
//! deadline (5 s to connect, 15 s in all).
//!
//! [`spawn`] starts a role's heartbeat thread: it posts the role's
//! [`RoleReport`] every few seconds (the interval the server asks for),
//! applies the policy in the answer to the role's [`Live`] settings, keeps
//! that policy in a file (`policy.json` in the role's state folder, kind
//! "ferry-policy" v1, checksummed; docs/formats.md) so that a restart while
//! the server is away starts on the last policy, and runs the jobs in the
//! answer, posting each outcome back. When the server cannot be reached the
//! role goes on replicating on its last policy; the thread logs that once a
//! minute and tries again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_common::control::{truncate_utf8, HeartbeatReply, Job, JobReport, Live, Policy, JOB_REPORTS_MAX};
use ferry_common::report::RoleReport;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Setup(String),
    /// The server could not be reached or did not answer in time.
    #[error("configuration server {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// The server answered with an error.
    #[error("configuration server: {status} {msg}")]
    Refused { status: u16, msg: String },
}

/// How the client checks the server (and shows itself).
#[derive(Clone, Debug)]
pub enum Tls {
    /// Plain HTTP: loopback only.
    None,
    /// HTTPS with this machine's identity folder (a role: mutual TLS).
    Identity(PathBuf),
    /// HTTPS checking the server against this CA certificate (PEM) only.
    Ca(PathBuf),
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    addr: String,
    token: Option<String>,
}

fn setup(e: impl std::fmt::Display) -> ControlError {
    ControlError::Setup(e.to_string())
}

impl Client {
    /// A client of the configuration server at `addr` (HOST:PORT).
    pub fn new(addr: &str, tls: &Tls) -> Result<Client, ControlError> {
        use ferry_identity::{tls as itls, Role};
        let resolved = ferry_common::net::resolve("config-server", addr, false).map_err(setup)?;
        let mut b = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .redirects(0)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
        let scheme = match tls {
            Tls::None => {
                if !resolved.iter().all(|a| a.ip().is_loopback()) {
                    return Err(ControlError::Setup(format!(
                        "--config-server {addr}: plain HTTP is for loopback only; give --identity DIR (a role) or --ca PEM (ferry ctl)"
                    )));
                }
                "http"
            }
            Tls::Identity(dir) => {
                let held = ferry_identity::enroll::Held::load(dir).map_err(setup)?;
                let v = itls::PeerVerifier::new(held.trust.clone(), &[Role::ConfigServer], true);
                b = b.tls_config(itls::client_config(Some(held.creds.clone()), v).map_err(setup)?);
                "https"
            }
            Tls::Ca(pem) => {
                let text = std::fs::read_to_string(pem).map_err(|e| setup(format!("{}: {e}", pem.display())))?;
                let der = ferry_identity::pem_blocks(&text, "CERTIFICATE").map_err(setup)?;
                let ca = der.into_iter().next().ok_or_else(|| setup(format!("{}: no certificate in it", pem.display())))?;
                let trust = itls::Trust::new(ca, &[]).map_err(setup)?;
                let v = itls::PeerVerifier::new(Arc::new(RwLock::new(trust)), &[Role::ConfigServer], true);
                b = b.tls_config(itls::client_config(None, v).map_err(setup)?);
                "https"
            }
        };
        Ok(Client { agent: b.build(), base: format!("{scheme}://{addr}"), addr: addr.to_string(), token: None })
    }

    /// Send an API token with every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `method` `path` (e.g. "/api/v1/disks") with an optional JSON body;
    /// the answer's JSON.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ControlError> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| ControlError::Unreachable { addr: self.addr.clone(), why: e.to_string() })?;
                if text.is_empty() {
                    return Ok(Value::Null);
                }
                serde_json::from_str(&text).or(Ok(Value::String(text)))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                    .unwrap_or(text);
                Err(ControlError::Refused { status: code, msg })
            }
            Err(e) => Err(ControlError::Unreachable { addr: self.addr.clone(), why: e.to_string() }),
        }
    }

    /// A request made with a browser-style session (cookie and CSRF token):
    /// how `ferry ctl login` turns a password into an API token.
    pub fn call_with_session(&self, method: &str, path: &str, session: &str, csrf: &str, body: &Value) -> Result<Value, ControlError> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Cookie", &format!("ferry_session={session}"))
            .set("X-CSRF-Token", csrf);
        match req.send_json(body) {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| ControlError::Unreachable { addr: self.addr.clone(), why: e.to_string() })?;
                Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(code, resp)) => {
                Err(ControlError::Refused { status: code, msg: resp.into_string().unwrap_or_default() })
            }
            Err(e) => Err(ControlError::Unreachable { addr: self.addr.clone(), why: e.to_string() }),
        }
    }

    /// The body of a text endpoint (e.g. /metrics).
    pub fn text(&self, path: &str) -> Result<String, ControlError> {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => r.into_string().map_err(|e| ControlError::Unreachable { addr: self.addr.clone(), why: e.to_string() }),
            Err(ureq::Error::Status(code, r)) => Err(ControlError::Refused { status: code, msg: r.into_string().unwrap_or_default() }),
            Err(e) => Err(ControlError::Unreachable { addr: self.addr.clone(), why: e.to_string() }),
        }
    }

    /// One heartbeat.
    pub fn heartbeat(&self, r: &RoleReport) -> Result<HeartbeatReply, ControlError> {
        let body = serde_json::to_value(r).map_err(setup)?;
        let v = self.call("POST", "/api/v1/heartbeat", Some(&body))?;
        serde_json::from_value(v).map_err(|e| ControlError::Refused { status: 200, msg: format!("unreadable heartbeat answer: {e}") })
    }
}

/// What the heartbeat thread last heard.
#[derive(Clone, Debug, Default)]
pub struct Heard {
    pub reply: Option<HeartbeatReply>,
    pub last_ok: Option<Instant>,
    pub error: Option<String>,
}

/// A role's heartbeat thread's handle.
#[derive(Clone)]
pub struct Reporter {
    heard: Arc<Mutex<Heard>>,
}

impl Reporter {
    pub fn heard(&self) -> Heard {
        self.heard.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Runs one job: Ok(what was done) or Err(why not).
pub type JobRunner = Arc<dyn Fn(&Job) -> Result<String, String> + Send + Sync>;
/// Sees every heartbeat answer (a master target applies per-disk retention).
pub type ReplyHook = Arc<dyn Fn(&HeartbeatReply) + Send + Sync>;

/// What a role does with the answers beyond its own policy.
#[derive(Clone, Default)]
pub struct Hooks {
    pub jobs: Option<JobRunner>,
    pub on_reply: Option<ReplyHook>,
    /// Where to keep the jobs given (state file `ferry-jobs` v1); None: in
    /// memory (a restart may run a job again).
    pub job_book: Option<PathBuf>,
}
pub type ReportFn = Arc<dyn Fn() -> RoleReport + Send + Sync>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Cached {
    group: Option<String>,
    policy: Option<Policy>,
    policy_version: i64,
}

const CACHE_KIND: &str = "ferry-policy";

/// Start the heartbeat thread. `cache`: the file that keeps the last policy.
pub fn spawn(client: Client, report: ReportFn, live: Arc<Live>, cache: Option<PathBuf>, hooks: Hooks) -> Reporter {
    let jobs = hooks.jobs.clone();
    let heard = Arc::new(Mutex::new(Heard::default()));
    // The last policy first: the server may be away right now.
    let mut applied: Option<Cached> = None;
    if let Some(path) = &cache {
        match ferry_common::durable::read_state::<Cached>(path, CACHE_KIND, 1) {
            Ok(Some(c)) => {
                log::info!("applying the last policy the configuration server gave (group {:?}, version {})", c.group, c.policy_version);
                live.apply(c.policy.as_ref());
                applied = Some(c);
            }
            Ok(None) => {}
            Err(e) => log::warn!("{}: {e}; waiting for the configuration server's policy", path.display()),
        }
    }
    let h = heard.clone();
    let book = JobBook::open(hooks.job_book.clone());
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
        let mut every = Duration::from_secs(5);
        let mut warned: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let mut r = report();
            r.jobs = Some(book.reports());
            match client.heartbeat(&r) {
                Ok(reply) => {
                    if warned.take().is_some() {
                        log::info!("configuration server {} reached again", client.addr());
                    }
                    every = Duration::from_secs_f64(reply.interval_s.clamp(0.2, 300.0));
                    let now = Cached { group: reply.group.clone(), policy: reply.policy.clone(), policy_version: reply.policy_version };
                    if applied.as_ref() != Some(&now) {
                        match &now.group {
                            Some(g) => log::info!("policy of group {g} version {} applied", now.policy_version),
                            None => log::info!("in no protection group: the command line's settings apply"),
                        }
                        live.apply(now.policy.as_ref());
                        if let Some(path) = &cache {
                            if let Err(e) = ferry_common::durable::write_state(path, CACHE_KIND, 1, &now) {
                                log::warn!("{}: keeping the policy: {e}", path.display());
                            }
                        }
                        applied = Some(now);
                    }
                    if let Some(f) = &hooks.on_reply {
                        f(&reply);
                    }
                    // The server has the outcomes this report carried.
                    book.settle(r.jobs.iter().flatten().filter(|j| j.state != "running").map(|j| j.id.as_str()));
                    for job in reply.jobs.clone() {
                        if book.take(&job.id) {
                            run_job(&client, &jobs, &book, job);
                        } else {
                            log::info!("job {} not run: it was given before, or could not be recorded", job.id);
                        }
                    }
                    if let Ok(mut g) = h.lock() {
                        g.reply = Some(reply);
                        g.last_ok = Some(Instant::now());
                        g.error = None;
                    }
                }
                Err(e) => {
                    if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        log::warn!("{e}; replication goes on with the last policy");
                        warned = Some(Instant::now());
                    }
                    if let Ok(mut g) = h.lock() {
                        g.error = Some(e.to_string());
                    }
                }
            }
            std::thread::sleep(every.saturating_sub(started.elapsed()));
        }
    });
    Reporter { heard }
}

/// The jobs this role was given: each runs once however often it is handed
/// out, and each is reported in the heartbeats until the server has its
/// outcome. Kept in a file when the role has one, so that a restart neither
/// runs a job again nor leaves one the server waits for: a job that was
/// running when the role ended is reported failed ("interrupted").
#[derive(Clone, Default)]
struct JobBook {
    inner: Arc<Mutex<BookInner>>,
    path: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct BookInner {
    /// Jobs still to be reported, in the order they came.
    open: Vec<JobReport>,
    /// Every id taken, newest last (the most recent [`BOOK_IDS`]).
    seen: std::collections::VecDeque<String>,
}

const BOOK_KIND: &str = "ferry-jobs";
const BOOK_IDS: usize = 1024;
/// At most this many jobs in one heartbeat; the rest wait for a later one.
const REPORT_JOBS: usize = JOB_REPORTS_MAX;
/// An outcome longer than this is cut.
const RESULT_MAX: usize = 4 << 10;
/// Outcomes in one heartbeat, bytes at most (the rest wait): a heartbeat
/// stays far below the server's 2 MiB body limit however they escape.
const REPORT_BUDGET: usize = 128 << 10;

impl JobBook {
    /// The book kept at `path` (None: in memory only).
    fn open(path: Option<PathBuf>) -> JobBook {
        let mut inner = BookInner::default();
        if let Some(p) = &path {
            match ferry_common::durable::read_state::<BookInner>(p, BOOK_KIND, 1) {
                Ok(Some(mut b)) => {
                    for j in b.open.iter_mut().filter(|j| j.state == "running") {
                        log::warn!("job {}: interrupted by a restart of this role; reported failed", j.id);
                        j.state = "failed".into();
                        j.result =
                            Some("interrupted: the role restarted while the job ran; check its effect before running it again".into());
                    }
                    inner = b;
                }
                Ok(None) => {}
                Err(e) => log::warn!("{}: {e}; starting with no record of earlier jobs", p.display()),
            }
        }
        let book = JobBook { inner: Arc::new(Mutex::new(inner)), path };
        let _ = book.save();
        book
    }

    fn save(&self) -> Result<(), String> {
        let (Some(p), Ok(b)) = (&self.path, self.inner.lock()) else { return Ok(()) };
        ferry_common::durable::write_state(p, BOOK_KIND, 1, &*b).map_err(|e| {
            log::warn!("{}: keeping the jobs: {e}", p.display());
            e.to_string()
        })
    }

    /// True the first time `id` is given: run it. It is recorded before it
    /// runs; when that fails (a full disk), it is not run but reported
    /// failed, since a restart could not tell that it ran.
    fn take(&self, id: &str) -> bool {
        {
            let Ok(mut b) = self.inner.lock() else { return false };
            if b.seen.iter().any(|x| x == id) {
                return false;
            }
            if b.seen.len() >= BOOK_IDS {
                b.seen.pop_front();
            }
            b.seen.push_back(id.to_string());
            b.open.push(JobReport { id: id.to_string(), state: "running".into(), result: None });
        }
        if let Err(e) = self.save() {
            self.finished(id, false, &format!("not run: could not record it first ({e})"));
            return false;
        }
        true
    }

    fn finished(&self, id: &str, ok: bool, result: &str) {
        if let Ok(mut b) = self.inner.lock() {
            if let Some(j) = b.open.iter_mut().find(|j| j.id == id) {
                j.state = if ok { "done" } else { "failed" }.into();
                j.result = Some(truncate_utf8(result, RESULT_MAX).to_string());
            }
        }
        let _ = self.save();
    }

    /// The server has these outcomes: stop reporting them.
    fn settle<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        let changed = match self.inner.lock() {
            Ok(mut b) => {
                let n = b.open.len();
                for id in ids {
                    b.open.retain(|j| j.id != id || j.state == "running");
                }
                b.open.len() != n
            }
            Err(_) => false,
        };
        if changed {
            let _ = self.save();
        }
    }

    /// What the next heartbeat says: within [`REPORT_JOBS`] and [`REPORT_BUDGET`].
    fn reports(&self) -> Vec<JobReport> {
        let Ok(b) = self.inner.lock() else { return Vec::new() };
        let mut used = 0;
        let mut out = Vec::new();
        for j in &b.open {
            let len = j.result.as_ref().map_or(0, |r| r.len());
            if out.len() >= REPORT_JOBS || (used + len > REPORT_BUDGET && !out.is_empty()) {
                break;
            }
            used += len;
            out.push(j.clone());
        }
        out
    }
}

/// Run a job in a thread of its own and post its outcome (retried for a
/// minute if the server is away; the heartbeats carry it after that).
fn run_job(client: &Client, jobs: &Option<JobRunner>, book: &JobBook, job: Job) {
    let client = client.clone();
    let runner = jobs.clone();
    let book = book.clone();
    let _ = std::thread::Builder::new().name(format!("job-{}", &job.id[..job.id.len().min(8)])).spawn(move || {
        log::info!("job {} ({}) {}", job.id, job.kind, job.args);
        let out = match &runner {
            Some(f) => f(&job),
            None => Err(format!("this role does not run {} jobs", job.kind)),
        };
        match &out {
            Ok(s) => log::info!("job {} done: {s}", job.id),
            Err(e) => log::warn!("job {} failed: {e}", job.id),
        }
        let (ok, result) = match out {
            Ok(s) => (true, s),
            Err(e) => (false, e),
        };
        book.finished(&job.id, ok, &result);
        let body = serde_json::json!({ "ok": ok, "result": result });
        for _ in 0..12 {
            match client.call("POST", &format!("/api/v1/jobs/{}/result", job.id), Some(&body)) {
                Ok(_) => return book.settle(std::iter::once(job.id.as_str())),
                Err(ControlError::Refused { msg, .. }) => {
                    log::warn!("job {}: the outcome was refused: {msg}", job.id);
                    return book.settle(std::iter::once(job.id.as_str()));
                }
                Err(_) => std::thread::sleep(Duration::from_secs(5)),
            }
        }
        log::warn!("job {}: could not post its outcome; the heartbeats carry it", job.id);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job handed out twice (its first answer seemed lost) runs once; its
    /// outcome is reported until the server has it.
    #[test]
    fn a_job_runs_once_and_is_reported_until_settled() {
        let b = JobBook::open(None);
        assert!(b.take("j1"));
        assert!(!b.take("j1"), "a job handed out again must not run twice");
        assert_eq!(b.reports(), vec![JobReport { id: "j1".into(), state: "running".into(), result: None }]);
        // A running job is never settled by a heartbeat's answer.
        b.settle(std::iter::once("j1"));
        assert_eq!(b.reports().len(), 1);
        b.finished("j1", false, "no such disk");
        assert_eq!(b.reports()[0].state, "failed");
        assert_eq!(b.reports()[0].result.as_deref(), Some("no such disk"));
        b.settle(std::iter::once("j1"));
        assert!(b.reports().is_empty());
        assert!(!b.take("j1"), "a settled job handed out again must not run again");
    }

    /// What a heartbeat carries stays inside the server's limits.
    #[test]
    fn reports_stay_inside_the_server_s_limits() {
        let b = JobBook::open(None);
        for i in 0..REPORT_JOBS + 5 {
            assert!(b.take(&format!("j{i}")));
        }
        assert_eq!(b.reports().len(), REPORT_JOBS);
        b.finished("j0", false, &"é".repeat(RESULT_MAX));
        let r = b.reports()[0].result.clone().unwrap();
        assert!(r.len() <= RESULT_MAX && r.starts_with('é'), "{}", r.len());
        for i in 0..REPORT_JOBS {
            b.finished(&format!("j{i}"), true, &"x".repeat(RESULT_MAX));
        }
        let r = b.reports();
        let bytes: usize = r.iter().map(|j| j.result.as_ref().map_or(0, |x| x.len())).sum();
        assert!(!r.is_empty() && r.len() < REPORT_JOBS && bytes <= REPORT_BUDGET, "{} jobs, {bytes} bytes", r.len());
    }

    /// A job that cannot be recorded first is not run, and says why.
    #[test]
    fn a_job_that_cannot_be_recorded_is_not_run() {
        let b = JobBook::open(Some(PathBuf::from("/nonexistent-ferry-dir/jobs.state")));
        assert!(!b.take("j1"));
        let r = b.reports();
        assert!(r.len() == 1 && r[0].state == "failed" && r[0].result.as_deref().unwrap().starts_with("not run"), "{r:?}");
    }

    /// A restart neither runs a job again nor leaves one running for ever.
    #[test]
    fn a_restart_reports_the_interrupted_job_failed_and_runs_none_again() {
        let dir = std::env::temp_dir().join(format!("ferry-jobbook-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobs.state");
        let b = JobBook::open(Some(path.clone()));
        assert!(b.take("j1") && b.take("j2"));
        b.finished("j2", true, "exported");
        drop(b);
        let b = JobBook::open(Some(path.clone()));
        let r = b.reports();
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].id == "j1" && r[0].state == "failed" && r[0].result.as_deref().unwrap().starts_with("interrupted"), "{r:?}");
        assert_eq!((r[1].state.as_str(), r[1].result.as_deref()), ("done", Some("exported")));
        assert!(!b.take("j1") && !b.take("j2"), "a job given before the restart must not run again");
        b.settle(["j1", "j2"].into_iter());
        drop(b);
        assert!(JobBook::open(Some(path)).reports().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_book_remembers_a_bounded_number_of_ids() {
        let b = JobBook::open(None);
        for i in 0..BOOK_IDS + 10 {
            assert!(b.take(&format!("j{i}")));
            b.finished(&format!("j{i}"), true, "");
            b.settle(std::iter::once(format!("j{i}").as_str()));
        }
        let inner = b.inner.lock().unwrap();
        assert_eq!(inner.seen.len(), BOOK_IDS);
        assert!(inner.open.is_empty());
    }
}
