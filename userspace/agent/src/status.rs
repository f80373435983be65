//! What `ferry status` shows of a protected disk: the agent's state file
//! read against the agent's lock (is it alive?) and the clock (how old is
//! the last recovery point?), as one serializable view ([`AgentStatus`],
//! what `--json` prints) and its text ([`render`]).

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

pub use ferry_common::health::Health;

pub use crate::state::{KmodMode, Mode, TrackerKind};

/// What is true of a protected disk now, as `ferry status` shows it: the
/// state file read against the agent's lock and the clock.
#[derive(serde::Serialize, Clone, Debug)]
pub struct Liveness {
    /// What the agent is doing: its own mode while it runs and is connected,
    /// `disconnected` while it runs without a connection, and `stopped`
    /// (or `failed`, `unprotected`) when it does not run.
    pub mode: Mode,
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
pub fn liveness(state: &Path, st: &AgentState, now_ns: u64) -> Result<Liveness, AgentError> {
    let own: Mode = st.mode;
    let kmod_mode: Option<KmodMode> = st
        .kmod_mode
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| AgentError::Usage(format!("agent state: {e} (written by a newer ferry?)")))?;
    let pid = live::running(state);
    let running = pid.is_some();
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
    let rpo = st.last_point.as_ref().map(|p| secs(p.time_ns));
    let connected = running && st.connected;
    let disconnected = if running && !st.connected { st.disconnected_since_ns.map(secs) } else { None };
    // An agent that took the lock but left no stop record was killed or
    // crashed (even before it first saved its state).
    // A stop record older than the last agent's taking of the lock (it
    // writes its pid into STATE/agent.lock, then removes the record) is
    // that of an agent before it: the last one left none.
    let lock_taken_ns = std::fs::metadata(state.join("agent.lock"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    let stopped_reason = (!running).then(|| match live::last_stop(state).filter(|s| lock_taken_ns.is_none_or(|l| s.time_ns >= l)) {
        Some(s) => s.reason,
        None if own == Mode::Unprotected => "unprotected".to_string(),
        // (The lock file is there: an agent took it, even one killed
        // before it wrote its pid.)
        None if st.running || live::ever_started(state) || lock_taken_ns.is_some() => {
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
    if kmod_mode == Some(KmodMode::Bitmap) {
        note(Health::Warn, "the kernel module tracker fell to bitmap mode (catching up)".into());
    }
    let health_reason = if why.is_empty() { format!("{own}, last recovery point {:.0}s ago", rpo.unwrap_or(0.0)) } else { why.join("; ") };
    let mode = match (running, connected) {
        (_, _) if own == Mode::FailedOver => own,
        (true, true) => own,
        (true, false) => Mode::Disconnected,
        (false, _) if matches!(own, Mode::Failed | Mode::Unprotected) => own,
        (false, _) => Mode::Stopped,
    };
    Ok(Liveness {
        mode,
        running,
        pid,
        connected,
        disconnected_seconds: disconnected,
        stopped_reason,
        rpo_seconds: rpo,
        health: worst,
        health_reason,
    })
}

/// The last recovery point, as `ferry status` shows it. Fields in the
/// JSON's key order.
#[derive(serde::Serialize, Clone, Debug)]
pub struct PointView {
    pub id: u64,
    pub kind: String,
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    #[serde(skip)]
    pub time_ns: u64,
}

/// `ferry status --state DIR`: everything it shows. Serialized fields are
/// in the JSON's key order (sorted, as the CLI has always printed them);
/// the skipped ones are for the text.
#[derive(serde::Serialize, Clone, Debug)]
pub struct AgentStatus {
    pub acked_seq: u64,
    /// Changes the tracker recorded that are not yet durable on the master
    /// target because shipping fell behind (held in the tracker's bitmap).
    pub backlog_bytes: u64,
    /// Age in seconds of the oldest change in that backlog (0 when none).
    pub backlog_lag_seconds: f64,
    pub bpf_drops: u64,
    pub bpf_recovered: u64,
    pub bpf_unguarded: u64,
    pub bytes_read_total: u64,
    pub bytes_sent_total: u64,
    pub connected: bool,
    pub cut_problem: Option<String>,
    pub disconnected_seconds: Option<f64>,
    pub disk: String,
    pub failover: Option<String>,
    pub freeze_ms_p50: Option<f64>,
    pub freeze_ms_p99: Option<f64>,
    pub health: Health,
    pub health_reason: String,
    pub initial_sync_cursor: Option<u64>,
    pub kmod_catchups: u64,
    pub kmod_mode: Option<KmodMode>,
    pub lag_ms_p50: Option<f64>,
    pub lag_ms_p99: Option<f64>,
    pub last_error: Option<String>,
    pub last_point: Option<PointView>,
    pub mode: Mode,
    pub name: String,
    pub pid: Option<u32>,
    pub point_every_seconds: f64,
    pub records_pending: u64,
    pub resync_required: Option<String>,
    pub ring_overflows: Option<u64>,
    pub rpo_seconds: Option<f64>,
    pub running: bool,
    /// Seconds since the last acknowledgement (`None` before the first).
    pub seconds_since_last_ack: Option<f64>,
    pub stopped_reason: Option<String>,
    pub target: String,
    pub tracker: TrackerKind,
    /// The disk's size.
    #[serde(skip)]
    pub size: u64,
    #[serde(skip)]
    pub ring: Option<RingStatus>,
    /// How many lag and freeze samples the percentiles are of.
    #[serde(skip)]
    pub lag_samples: usize,
    #[serde(skip)]
    pub freeze_samples: usize,
    /// For /metrics (not in `--json`, whose keys are fixed): the disk's
    /// churn as tracked, the points cut, the newest app-consistent point,
    /// the oldest change of the backlog (wall-clock ns) and the part of the
    /// backlog in the tracker's bitmap.
    #[serde(skip)]
    pub churn_bytes_total: u64,
    #[serde(skip)]
    pub points_cut_total: u64,
    #[serde(skip)]
    pub last_app_point: Option<PointView>,
    #[serde(skip)]
    pub backlog_oldest_ns: Option<u64>,
    #[serde(skip)]
    pub backlog_in_bitmap: u64,
}

/// The `q` quantile (nearest rank) of `v`.
fn pct(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i])
}

/// `ferry status --state DIR` at wall-clock `now_ns`.
pub fn agent_status(state: &Path, now_ns: u64) -> Result<AgentStatus, AgentError> {
    let (st, ring) = status(state)?;
    let live = liveness(state, &st, now_ns)?;
    let lag_s = (st.last_ack_ns > 0).then(|| now_ns.saturating_sub(st.last_ack_ns) as f64 / 1e9);
    Ok(AgentStatus {
        acked_seq: st.acked_seq,
        backlog_bytes: if live.running { st.backlog_bytes } else { 0 },
        backlog_lag_seconds: if live.running { st.backlog_lag_s } else { 0.0 },
        bpf_drops: st.bpf_drops,
        bpf_recovered: st.bpf_recovered,
        bpf_unguarded: st.bpf_unguarded,
        bytes_read_total: st.bytes_read_total,
        bytes_sent_total: st.bytes_sent_total,
        connected: live.connected,
        cut_problem: st.cut_problem.clone(),
        disconnected_seconds: live.disconnected_seconds,
        disk: st.disk.clone(),
        failover: st.failover.clone(),
        freeze_ms_p50: pct(&st.freeze_ms_recent, 0.5),
        freeze_ms_p99: pct(&st.freeze_ms_recent, 0.99),
        health: live.health,
        health_reason: live.health_reason,
        initial_sync_cursor: st.sync_cursor,
        kmod_catchups: st.kmod_catchups,
        kmod_mode: st
            .kmod_mode
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| AgentError::Usage(format!("agent state: {e} (written by a newer ferry?)")))?,
        lag_ms_p50: pct(&st.lag_ms_recent, 0.5),
        lag_ms_p99: pct(&st.lag_ms_recent, 0.99),
        last_error: st.last_error.clone(),
        last_point: st.last_point.as_ref().map(point_view),
        mode: live.mode,
        name: st.name.clone(),
        pid: live.pid,
        point_every_seconds: st.point_every_s,
        records_pending: ring.map(|r| r.pending).unwrap_or(0),
        resync_required: st.resync_required.clone(),
        ring_overflows: ring.map(|r| r.overflows),
        rpo_seconds: live.rpo_seconds,
        running: live.running,
        seconds_since_last_ack: lag_s.filter(|l| l.is_finite()),
        stopped_reason: live.stopped_reason,
        target: st.target.clone(),
        tracker: st.tracker,
        size: st.size,
        ring,
        lag_samples: st.lag_ms_recent.len(),
        freeze_samples: st.freeze_ms_recent.len(),
        churn_bytes_total: st.churn_bytes_total,
        points_cut_total: st.points_cut_total,
        last_app_point: st.last_app_point.as_ref().map(point_view),
        backlog_oldest_ns: st.backlog_oldest_ns,
        backlog_in_bitmap: st.backlog_in_bitmap,
    })
}

fn point_view(p: &crate::state::LastPoint) -> PointView {
    PointView { id: p.id, kind: p.kind.clone(), seq: p.seq, time: ferry_common::units::rfc3339(p.time_ns), time_ns: p.time_ns }
}

/// The agent's [`RoleReport`] (its /metrics and heartbeat) at wall-clock
/// `now_ns`, from the status view of `state` (the agent's --state folder):
/// one disk. `name` is this machine's host name; a caller with an identity
/// sets the identity's name (and `cert_expires_unix`).
///
/// The disk's `lag_ms` is the age of the oldest change not yet durable at
/// the next hop: 0 with no backlog; the age of the backlog's oldest change
/// where the tracker times its changes; else (the scan tracker, or changes
/// with no time) the age of the newest point, an upper bound (everything
/// before it is durable); none before the first point.
pub fn report(state: &Path, now_ns: u64) -> Result<ferry_common::report::RoleReport, AgentError> {
    use ferry_common::report::{unix_ms, DiskReport, RoleReport};
    let s = agent_status(state, now_ns)?;
    let mut r = RoleReport::new("agent");
    r.at_unix_ms = unix_ms(now_ns).unwrap_or(0);
    let since_point = s.last_point.as_ref().map(|p| now_ns.saturating_sub(p.time_ns) / 1_000_000);
    let lag_ms = match (s.tracker, s.backlog_bytes, s.backlog_oldest_ns) {
        (TrackerKind::Scan, _, _) => since_point,
        (_, 0, _) if s.running && s.initial_sync_cursor.is_none() => Some(0),
        (_, _, Some(t)) if s.running => Some(now_ns.saturating_sub(t) / 1_000_000),
        _ => since_point,
    };
    let mode = match (s.tracker, s.kmod_mode) {
        (TrackerKind::Kmod, Some(m)) => Some(m.as_str().to_string()),
        (TrackerKind::Bpf, _) if s.backlog_in_bitmap > 0 => Some("bitmap".into()),
        (TrackerKind::Bpf | TrackerKind::Ring, _) => Some("ring".into()),
        _ => None,
    };
    let state_word = match (&s.resync_required, s.mode) {
        (Some(_), m) if m != Mode::Resync => "resync required".to_string(),
        (_, m) => m.as_str().to_string(),
    };
    r.disks.push(DiskReport {
        name: s.name.clone(),
        state: state_word,
        reason: (s.health != Health::Ok).then(|| s.health_reason.clone()),
        tracker: Some(s.tracker.as_str().into()),
        mode,
        lag_ms,
        backlog_bytes: Some(s.backlog_bytes),
        churn_bytes_total: s.churn_bytes_total,
        sent_bytes_total: s.bytes_sent_total,
        points: Some(s.points_cut_total),
        last_point_unix_ms: s.last_point.as_ref().and_then(|p| unix_ms(p.time_ns)),
        last_app_point_unix_ms: s.last_app_point.as_ref().and_then(|p| unix_ms(p.time_ns)),
        journal_bytes: None,
        journal_max_bytes: None,
        resync_required: s.resync_required.is_some(),
        recent_points: Vec::new(),
    });
    Ok(r)
}

/// The CLI's text of the agent's views: lines without their newline.
pub mod render {
    use super::{AgentStatus, TrackerKind};
    use crate::Summary;
    use ferry_common::units::human;

    /// `ferry status --state DIR`.
    pub fn status(s: &AgentStatus) -> Vec<String> {
        let mut out = vec![
            format!("health     {}: {}", s.health.as_str(), s.health_reason),
            format!("disk       {} ({}, {})", s.name, s.disk, human(s.size)),
        ];
        let agent = match (s.running, s.pid) {
            (true, Some(p)) if p > 0 => format!("agent running (pid {p})"),
            (true, _) => "agent running".to_string(),
            (false, _) => format!("agent not running: {}", s.stopped_reason.as_deref().unwrap_or("-")),
        };
        out.push(format!("tracker    {}   mode {}   {agent}", s.tracker, s.mode));
        out.push(match (s.connected, s.disconnected_seconds) {
            (true, _) => format!("target     {} (connected)", s.target),
            (false, Some(d)) => {
                format!("target     {} (disconnected for {d:.0}s: {})", s.target, s.last_error.as_deref().unwrap_or("connecting"))
            }
            (false, None) => format!("target     {}", s.target),
        });
        if let Some(c) = s.initial_sync_cursor {
            out.push(format!("sync       {:.1}% of the initial sync durable", c as f64 * 100.0 / s.size as f64));
        }
        if let Some(r) = &s.resync_required {
            out.push(format!("RESYNC     required: {r}"));
        }
        match (&s.last_point, s.rpo_seconds) {
            (Some(p), Some(r)) => out.push(format!("last point {} ({}) at {}, {r:.1}s ago (RPO)", p.id, p.kind, p.time)),
            _ => out.push("last point none yet".to_string()),
        }
        out.push(format!(
            "acked      seq {}{}; sent {}, read {}",
            s.acked_seq,
            s.seconds_since_last_ack.map(|l| format!(", {l:.1}s ago")).unwrap_or_default(),
            human(s.bytes_sent_total),
            human(s.bytes_read_total)
        ));
        if let Some(r) = s.ring {
            out.push(format!("ring       {} of {} records pending, {} overflows", r.pending, r.capacity, r.overflows));
        }
        if s.backlog_bytes > 0 {
            out.push(format!(
                "backlog    {} not yet durable, oldest change {:.0}s old (catching up from the tracker's bitmap)",
                human(s.backlog_bytes),
                s.backlog_lag_seconds
            ));
        }
        if let Some(m) = s.kmod_mode {
            out.push(format!("kmod       {m} mode, {} catch-up(s) from bitmap mode", s.kmod_catchups));
        }
        if let Some(p) = &s.cut_problem {
            out.push(format!("POINTS     {p}"));
        }
        if let Some(f) = &s.failover {
            out.push(format!("FAILOVER   {f}"));
        }
        if let (Some(a), Some(b)) = (s.lag_ms_p50, s.lag_ms_p99) {
            out.push(format!("lag        p50 {a:.1} ms, p99 {b:.1} ms (write to durable, last {} batches)", s.lag_samples));
        }
        if let (Some(a), Some(b)) = (s.freeze_ms_p50, s.freeze_ms_p99) {
            out.push(format!("freeze     p50 {a:.1} ms, p99 {b:.1} ms over the last {} freezes", s.freeze_samples));
        }
        if s.tracker == TrackerKind::Bpf {
            out.push(format!("bpf        {} records fell back to the bitmap", s.bpf_drops));
            if s.bpf_recovered > 0 {
                out.push(format!(
                    "bpf        {} completions the kernel did not run the tracker for were caught at reissue",
                    s.bpf_recovered
                ));
            }
            if s.bpf_unguarded > 0 {
                out.push(format!(
                    "bpf        {} writes issued on tags outside the in-flight table (a missed completion of one needs a resync)",
                    s.bpf_unguarded
                ));
            }
        }
        out
    }

    /// The summary of `ferry agent --once` (and `--verify`).
    pub fn summary(s: &Summary) -> Vec<String> {
        let mut out = vec![format!(
            "{}: recovery point {} ({}) at seq {}; read {} sent {} in {:.1}s (tracker {})",
            s.name,
            s.point_id,
            s.point_kind,
            s.seq,
            human(s.bytes_read),
            human(s.bytes_sent),
            s.seconds,
            s.tracker
        )];
        if let Some(d) = &s.verify_differing {
            for (a, b) in d {
                out.push(format!("{}: the replica differed from the source in [{a}, {b}) ({} bytes)", s.name, b - a));
            }
            match s.repaired_bytes {
                Some(n) => out.push(format!("{}: {n} bytes re-sent; the replica equals the source at point {}", s.name, s.point_id)),
                None if d.is_empty() => out.push(format!("{}: verify: the replica equals the source", s.name)),
                None => {}
            }
        }
        out
    }

    /// The error `ferry agent --verify` ends with when the replica differs
    /// and nothing was repaired (exit 1).
    pub fn verify_failure(s: &Summary) -> Option<String> {
        match (&s.verify_differing, s.repaired_bytes) {
            (Some(d), None) if !d.is_empty() => Some(format!(
                "verify: the replica of {} differs from the source in {} range(s) ({} bytes); --repair re-sends them",
                s.name,
                d.len(),
                d.iter().map(|(a, b)| b - a).sum::<u64>()
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateDir;

    /// The names the state file holds read into the enums and back
    /// unchanged, and an unknown one is refused with what it is.
    #[test]
    fn state_names_round_trip_through_the_enums() {
        for m in ["initial-sync", "resync", "streaming", "catch-up", "failed-over", "stopped", "failed", "unprotected"] {
            let v: Mode = m.parse().unwrap();
            assert_eq!(v.as_str(), m);
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("{m:?}"));
        }
        for t in ["kmod", "bpf", "scan", "ring"] {
            let v: TrackerKind = t.parse().unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("{t:?}"));
        }
        assert_eq!(serde_json::to_string(&"bitmap".parse::<KmodMode>().unwrap()).unwrap(), "\"bitmap\"");
        let e = "warp".parse::<Mode>().unwrap_err().to_string();
        assert!(e.contains("\"warp\""), "{e}");
    }

    /// `ferry status --json` keeps the keys it always printed, in the same
    /// (sorted) order, and a state file from before (no optional fields)
    /// still reads.
    #[test]
    fn the_status_view_serializes_as_the_cli_always_printed_it() {
        let t = tempfile::tempdir().unwrap();
        let st: AgentState = serde_json::from_value(serde_json::json!({
            "name": "vm", "disk": "/dev/loop9", "size": 1u64 << 20, "generation": "00", "tracker": "bpf",
            "target": "127.0.0.1:7700", "acked_seq": 5, "ring_overflows_seen": 0,
            "last_point": {"id": 2, "seq": 5, "time_ns": 1_000_000_000u64, "kind": "crash"},
            "last_ack_ns": 1_000_000_000u64, "mode": "streaming", "running": false,
            "bytes_sent_total": 10, "bytes_read_total": 20
        }))
        .unwrap();
        StateDir::new(t.path()).save(&st).unwrap();
        let v = agent_status(t.path(), 3_000_000_000).unwrap();
        assert_eq!((v.tracker, v.mode), (TrackerKind::Bpf, Mode::Stopped));
        let json = serde_json::to_string(&v).unwrap();
        let keys: Vec<String> =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json).unwrap().keys().cloned().collect();
        let want = [
            "name",
            "disk",
            "tracker",
            "mode",
            "running",
            "pid",
            "connected",
            "disconnected_seconds",
            "last_error",
            "stopped_reason",
            "health",
            "health_reason",
            "rpo_seconds",
            "point_every_seconds",
            "target",
            "initial_sync_cursor",
            "resync_required",
            "acked_seq",
            "seconds_since_last_ack",
            "records_pending",
            "ring_overflows",
            "last_point",
            "bytes_sent_total",
            "bytes_read_total",
            "bpf_drops",
            "bpf_recovered",
            "bpf_unguarded",
            "kmod_mode",
            "kmod_catchups",
            "cut_problem",
            "failover",
            "lag_ms_p50",
            "lag_ms_p99",
            "freeze_ms_p50",
            "freeze_ms_p99",
            "backlog_bytes",
            "backlog_lag_seconds",
        ];
        let mut sorted: Vec<&str> = want.to_vec();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        // In the text's order too: the JSON is written as it was, keys sorted.
        let at = |k: &str| json.find(&format!("\"{k}\":")).unwrap();
        assert!(sorted.windows(2).all(|w| at(w[0]) < at(w[1])), "{json}");
        assert!(json.contains(r#""last_point":{"id":2,"kind":"crash","seq":5,"time":"1970-01-01T00:00:01.000000000Z"}"#), "{json}");
        assert!(json.contains(r#""tracker":"bpf""#) && json.contains(r#""seconds_since_last_ack":2.0"#), "{json}");
        assert!(
            render::status(&v).iter().any(|l| l.starts_with("bpf        0 records fell back")),
            "the bpf lines follow the tracker kind"
        );
    }

    /// The agent's report is its status view: one disk with its tracker,
    /// counters and points; the lag of a scan is the newest point's age.
    #[test]
    fn the_report_is_the_status_view() {
        let t = tempfile::tempdir().unwrap();
        let st: AgentState = serde_json::from_value(serde_json::json!({
            "name": "vm", "disk": "/dev/loop9", "size": 1u64 << 20, "generation": "00", "tracker": "scan",
            "target": "127.0.0.1:7700", "acked_seq": 5, "ring_overflows_seen": 0,
            "last_point": {"id": 2, "seq": 5, "time_ns": 1_000_000_000u64, "kind": "crash"},
            "last_app_point": {"id": 1, "seq": 3, "time_ns": 500_000_000u64, "kind": "app"},
            "last_ack_ns": 1_000_000_000u64, "mode": "streaming", "running": false,
            "bytes_sent_total": 10, "bytes_read_total": 20, "churn_bytes_total": 8192, "points_cut_total": 2,
            "resync_required": "ring overflow"
        }))
        .unwrap();
        StateDir::new(t.path()).save(&st).unwrap();
        let r = report(t.path(), 3_000_000_000).unwrap();
        assert_eq!((r.role.as_str(), r.disks.len()), ("agent", 1));
        let d = &r.disks[0];
        assert_eq!((d.name.as_str(), d.state.as_str(), d.tracker.as_deref()), ("vm", "resync required", Some("scan")));
        assert_eq!((d.churn_bytes_total, d.sent_bytes_total, d.points), (8192, 10, Some(2)));
        assert_eq!((d.last_point_unix_ms, d.last_app_point_unix_ms, d.lag_ms), (Some(1000), Some(500), Some(2000)));
        assert!(d.resync_required && d.reason.as_deref().is_some_and(|w| w.contains("not running")), "{d:?}");
        // A state file from before these counters reads as zero.
        let mut v = serde_json::to_value(&st).unwrap();
        for k in ["churn_bytes_total", "points_cut_total", "last_app_point"] {
            v.as_object_mut().unwrap().remove(k);
        }
        StateDir::new(t.path()).save(&serde_json::from_value(v).unwrap()).unwrap();
        let d = report(t.path(), 3_000_000_000).unwrap().disks.remove(0);
        assert_eq!((d.churn_bytes_total, d.points, d.last_app_point_unix_ms), (0, Some(0), None));
    }

    /// An agent killed right after it took the folder's lock, before it
    /// wrote its pid or cleared the last agent's stop record, is reported
    /// as ended without stopping cleanly, not with the older agent's
    /// reason (regression: operate::a_stopped_agent_is_reported_stopped_with_its_reason).
    #[test]
    fn a_stop_record_older_than_the_lock_is_not_the_last_agents() {
        let t = tempfile::tempdir().unwrap();
        let st: AgentState = serde_json::from_value(serde_json::json!({
            "name": "vm", "disk": "/dev/loop9", "size": 1u64 << 20, "generation": "00", "tracker": "scan",
            "target": "127.0.0.1:7700", "acked_seq": 0, "ring_overflows_seen": 0, "last_point": null,
            "last_ack_ns": 0, "mode": "stopped", "running": false, "bytes_sent_total": 0, "bytes_read_total": 0
        }))
        .unwrap();
        live::record_stop(t.path(), "stopped by SIGTERM", false);
        let now = ferry_common::now_ns();
        assert_eq!(liveness(t.path(), &st, now).unwrap().stopped_reason.as_deref(), Some("stopped by SIGTERM"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(t.path().join("agent.lock"), b"").unwrap(); // taken, truncated, killed
        let why = liveness(t.path(), &st, now).unwrap().stopped_reason.unwrap();
        assert!(why.contains("without stopping cleanly"), "{why}");
    }
}
