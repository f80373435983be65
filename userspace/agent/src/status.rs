//! What `ferry status` shows of a protected disk: the agent's state file
//! read against the agent's lock (is it alive?) and the clock (how old is
//! the last recovery point?).

use crate::live;
use crate::state::{AgentState, StateDir};
use crate::AgentError;
use ferry_ring::Ring;
use std::path::Path;

/// The ring as `ferry status` shows it.
#[derive(Clone, Copy, Debug)]
pub struct RingStatus {
    pub pending: u64,
    pub overflows: u64,
    pub capacity: u64,
}

/// Read the agent's state for `ferry status`.
pub fn status(state: &Path) -> Result<(AgentState, Option<RingStatus>), AgentError> {
    let sd = StateDir::new(state);
    let st = sd.load()?.ok_or_else(|| AgentError::Usage(format!("no agent state in {}", state.display())))?;
    let ring = if sd.ring_file().exists() {
        let r = Ring::open(&sd.ring_file())?;
        Some(RingStatus { pending: r.producer().wrapping_sub(r.consumer()), overflows: r.overflows(), capacity: r.capacity() })
    } else {
        None
    };
    Ok((st, ring))
}

/// How an operator should feel about a disk, worst first.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "CRIT")]
    Crit,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warn => "WARN",
            Health::Crit => "CRIT",
        }
    }
}

/// What is true of a protected disk now, as `ferry status` shows it: the
/// state file read against the agent's lock and the clock.
#[derive(serde::Serialize, Clone, Debug)]
pub struct Liveness {
    /// What the agent is doing: its own mode while it runs and is connected,
    /// `disconnected` while it runs without a connection, and `stopped`
    /// (or `failed`, `unprotected`) when it does not run.
    pub mode: String,
    /// The agent holds the state folder's lock (it is alive).
    pub running: bool,
    pub pid: Option<u32>,
    /// Connected to the master target (only while running).
    pub connected: bool,
    /// Seconds since the agent lost (or could not make) its connection.
    pub disconnected_seconds: Option<f64>,
    /// Why the agent is not running, when it is not.
    pub stopped_reason: Option<String>,
    /// Seconds since the last recovery point was cut: the recovery point
    /// objective actually met right now.
    pub rpo_seconds: Option<f64>,
    pub health: Health,
    /// Why the health is not OK (or what is OK), in a line.
    pub health_reason: String,
}

/// The live view of `state` (see [`Liveness`]) at wall-clock `now_ns`.
pub fn liveness(state: &Path, st: &AgentState, now_ns: u64) -> Liveness {
    let pid = live::running(state);
    let running = pid.is_some();
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
    let rpo = st.last_point.as_ref().map(|p| secs(p.time_ns));
    let connected = running && st.connected;
    let disconnected = if running && !st.connected { st.disconnected_since_ns.map(secs) } else { None };
    // An agent that took the lock but left no stop record was killed or
    // crashed (even before it first saved its state).
    let stopped_reason = (!running).then(|| match live::last_stop(state) {
        Some(s) => s.reason,
        None if st.mode == "unprotected" => "unprotected".to_string(),
        None if st.running || live::ever_started(state) => {
            "the agent ended without stopping cleanly (killed, crashed, or the machine restarted)".to_string()
        }
        None => "not started".to_string(),
    });
    let mut worst = Health::Ok;
    let mut why: Vec<String> = Vec::new();
    let mut note = |h: Health, w: String| {
        worst = worst.max(h);
        why.push(w);
    };
    let every = if st.point_every_s > 0.0 { st.point_every_s } else { 60.0 };
    match &stopped_reason {
        // A scheduled `--once` run that finished is not a fault: the age of
        // its point (against --point-every, set to the schedule) says whether
        // the schedule keeps up.
        Some(r) if r.starts_with("--once finished") => {}
        Some(r) => note(Health::Crit, format!("agent not running: {r}")),
        None => {}
    }
    if let Some(f) = &st.failover {
        note(Health::Warn, format!("failed over on the master target: {f}"));
    }
    if let (Some(d), None) = (disconnected, &st.failover) {
        let e = st.last_error.as_deref().unwrap_or("connecting");
        note(if d > 300.0 { Health::Crit } else { Health::Warn }, format!("disconnected from the master target for {d:.0}s ({e})"));
    }
    if let Some(r) = &st.resync_required {
        note(Health::Warn, format!("resync required: {r}"));
    }
    match (rpo, st.sync_cursor) {
        (None, Some(c)) => {
            note(Health::Warn, format!("no recovery point yet (initial sync {:.0}% durable)", c as f64 * 100.0 / st.size.max(1) as f64))
        }
        (None, None) => note(Health::Warn, "no recovery point yet".into()),
        (Some(r), _) if r > 10.0 * every + 300.0 => {
            note(Health::Crit, format!("last recovery point {r:.0}s ago (point every {every:.0}s)"))
        }
        (Some(r), _) if r > 2.0 * every + 30.0 => note(Health::Warn, format!("last recovery point {r:.0}s ago (point every {every:.0}s)")),
        _ => {}
    }
    if let Some(p) = &st.cut_problem {
        note(Health::Warn, p.clone());
    }
    if running && st.backlog_bytes > 0 && st.backlog_lag_s >= 5.0 {
        let (b, l) = (st.backlog_bytes as f64 / 1048576.0, st.backlog_lag_s);
        note(if l > 60.0 { Health::Warn } else { Health::Ok }, format!("backlog {b:.1} MiB not yet durable, lag {l:.0}s"));
    }
    if st.kmod_mode.as_deref() == Some("bitmap") {
        note(Health::Warn, "the kernel module tracker fell to bitmap mode (catching up)".into());
    }
    let health_reason =
        if why.is_empty() { format!("{}, last recovery point {:.0}s ago", st.mode, rpo.unwrap_or(0.0)) } else { why.join("; ") };
    let mode = match (running, connected) {
        (_, _) if st.mode == "failed-over" => st.mode.clone(),
        (true, true) => st.mode.clone(),
        (true, false) => "disconnected".into(),
        (false, _) if matches!(st.mode.as_str(), "failed" | "unprotected") => st.mode.clone(),
        (false, _) => "stopped".into(),
    };
    Liveness {
        mode,
        running,
        pid,
        connected,
        disconnected_seconds: disconnected,
        stopped_reason,
        rpo_seconds: rpo,
        health: worst,
        health_reason,
    }
}
