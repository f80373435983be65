//! What the configuration server and the roles say to each other: the
//! heartbeat's answer (a policy, jobs). The report itself is [`crate::report`].
//! Field names are part of the heartbeat API (docs/config-server.md): add
//! fields, never rename them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a running role's policy may change without a restart: set by its
/// heartbeat thread, read by its loops.
#[derive(Debug, Default)]
pub struct Live {
    /// Milliseconds between recovery points; 0: as started.
    point_every_ms: AtomicU64,
}

impl Live {
    /// The point interval: the policy's, else `started`.
    pub fn point_every(&self, started: Duration) -> Duration {
        match self.point_every_ms.load(Ordering::Relaxed) {
            0 => started,
            ms => Duration::from_millis(ms),
        }
    }

    /// Apply a policy (None: back to the command line's settings).
    pub fn apply(&self, p: Option<&Policy>) {
        let ms = p.map(|p| (p.point_every_s * 1000.0) as u64).unwrap_or(0);
        self.point_every_ms.store(ms, Ordering::Relaxed);
    }
}

/// A protection group's policy. Every field has a default, so an operator
/// sets only what differs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Alert when the newest recovery point is older than this, seconds.
    pub rpo_threshold_s: u64,
    /// Crash-consistent points, every this many seconds.
    pub point_every_s: f64,
    /// App-consistent points (freeze), every this many seconds; 0 for none.
    pub app_point_every_s: f64,
    /// Retention on the master target, e.g. "72h" (empty: the master target's own).
    pub retention: String,
    /// Bandwidth limit for the group's disks at the process server, e.g. "100Mbit" (empty: none).
    pub bandwidth: String,
    /// The process server (HOST:PORT) and master target the agents ship to (empty: as started).
    pub process_server: String,
    pub master_target: String,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            rpo_threshold_s: 300,
            point_every_s: 60.0,
            app_point_every_s: 0.0,
            retention: String::new(),
            bandwidth: String::new(),
            process_server: String::new(),
            master_target: String::new(),
        }
    }
}

impl Policy {
    pub fn check(&self) -> Result<(), String> {
        if self.rpo_threshold_s == 0 {
            return Err("rpo_threshold_s must be at least 1".to_string());
        }
        if !(self.point_every_s >= 1.0 && self.point_every_s <= 86400.0) {
            return Err("point_every_s must be between 1 and 86400".to_string());
        }
        if !(self.app_point_every_s == 0.0 || (self.app_point_every_s >= 1.0 && self.app_point_every_s <= 7.0 * 86400.0)) {
            return Err("app_point_every_s must be 0 (none) or between 1 and 604800".to_string());
        }
        for (what, a) in [("process_server", &self.process_server), ("master_target", &self.master_target)] {
            let ok = a.is_empty()
                || a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && !h.contains(',') && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(format!("{what} {a:?}: expected HOST:PORT"));
            }
        }
        Ok(())
    }
}

/// The heartbeat's answer: the policy to apply and work to do.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeartbeatReply {
    /// Report again after this many seconds.
    pub interval_s: f64,
    /// The machine's protection group and its policy (None: in no group,
    /// keep what the command line says).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub policy_version: i64,
    /// Jobs for this role to run (a master target's test failovers …).
    #[serde(default)]
    pub jobs: Vec<Job>,
    /// Process servers and master targets: the policy of each disk they
    /// reported whose agent is in a group (retention, bandwidth).
    #[serde(default)]
    pub disk_policies: std::collections::BTreeMap<String, Policy>,
}

/// Work for one role: `kind` with `args`, its outcome posted back to
/// `/api/v1/jobs/ID/result`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub role: String,
    pub machine: String,
    /// test-failover | test-cleanup | failover | failover-commit | failover-cancel
    pub kind: String,
    pub args: serde_json::Value,
    pub state: String,
    #[serde(default)]
    pub result: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// When a heartbeat of the role first listed it (it has the job).
    #[serde(default)]
    pub acked_ms: Option<i64>,
}

/// A job as the role that holds it sees it. Every heartbeat carries the jobs
/// the role is running and the outcomes the server has not confirmed: the
/// server marks a job it handed out as received ("acknowledged") when it
/// first sees it here, hands it out again when it never does (the answer
/// that carried it was lost), and records an outcome that came this way
/// when the role could not post it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobReport {
    pub id: String,
    /// running | done | failed
    pub state: String,
    #[serde(default)]
    pub result: Option<String>,
}

/// The most jobs the server reads from one heartbeat (a role sends at most
/// this many; the rest wait for a later one).
pub const JOB_REPORTS_MAX: usize = 256;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod truncate_tests {
    #[test]
    fn cuts_at_a_character_boundary() {
        assert_eq!(super::truncate_utf8("abc", 10), "abc");
        assert_eq!(super::truncate_utf8("abc", 2), "ab");
        assert_eq!(super::truncate_utf8("éé", 3), "é");
        assert_eq!(super::truncate_utf8("é", 1), "");
    }
}
