//! What a running role says about itself: one serializable view, read by its
//! `/metrics` endpoint and sent as its heartbeat to the configuration server.
//!
//! A role fills a [`RoleReport`] from its own state (the agent from its
//! shipper, the process server from its relay, the master target from its
//! disks); nothing here knows how. Counters (`*_total`) only grow for the
//! life of the process; a restart starts them again at zero, which
//! Prometheus and the configuration server both treat as a counter reset.
//! JSON field names are part of the heartbeat API (docs/config-server.md):
//! add fields, never rename them.

use serde::{Deserialize, Serialize};

/// One role on one machine.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoleReport {
    /// "agent", "process-server" or "master-target".
    pub role: String,
    /// The machine's name: its identity's name, else the host name.
    pub name: String,
    /// ferry's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// When this report was made, Unix milliseconds.
    pub at_unix_ms: i64,
    /// When the role's certificate expires, Unix seconds (None without an identity).
    #[serde(default)]
    pub cert_expires_unix: Option<i64>,
    /// Spool use (process server): bytes held and the most allowed.
    #[serde(default)]
    pub spool_bytes: Option<u64>,
    #[serde(default)]
    pub spool_max_bytes: Option<u64>,
    #[serde(default)]
    pub disks: Vec<DiskReport>,
}

/// One disk as one role sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskReport {
    /// The disk's name (as on the master target).
    pub name: String,
    /// A short state word: "streaming", "idle", "syncing", "resync required",
    /// "throttled", "spool full", "upstream down", "disconnected", …
    pub state: String,
    /// Why, when the state is not a healthy one.
    #[serde(default)]
    pub reason: Option<String>,
    /// Agent: the tracker ("bpf", "kmod", "scan") and its mode ("ring", "bitmap", "data", "metadata").
    #[serde(default)]
    pub tracker: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    /// Milliseconds from the oldest change not yet durable at the next hop to now.
    #[serde(default)]
    pub lag_ms: Option<u64>,
    /// Bytes of changes not yet durable at the next hop.
    #[serde(default)]
    pub backlog_bytes: Option<u64>,
    /// Bytes written to the disk (agent: on the source; master target: applied), a counter.
    #[serde(default)]
    pub churn_bytes_total: u64,
    /// Bytes sent on to the next hop (after compression), a counter.
    #[serde(default)]
    pub sent_bytes_total: u64,
    /// Recovery points: how many there are (master target) or were cut (agent).
    #[serde(default)]
    pub points: Option<u64>,
    /// Source time of the newest recovery point, Unix milliseconds.
    #[serde(default)]
    pub last_point_unix_ms: Option<i64>,
    /// Source time of the newest app-consistent recovery point, Unix milliseconds.
    #[serde(default)]
    pub last_app_point_unix_ms: Option<i64>,
    /// Master target: journal bytes used and the most allowed.
    #[serde(default)]
    pub journal_bytes: Option<u64>,
    #[serde(default)]
    pub journal_max_bytes: Option<u64>,
    /// The disk needs a resync (changes were lost by the tracker).
    #[serde(default)]
    pub resync_required: bool,
    /// Master target: the newest recovery points (at most 50), oldest first.
    #[serde(default)]
    pub recent_points: Vec<PointInfo>,
}

/// One recovery point, as `ferry points` lists it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PointInfo {
    pub id: String,
    /// Source time, Unix milliseconds.
    pub time_unix_ms: i64,
    /// "crash", "app", … as `ferry points` says it.
    pub kind: String,
}

impl RoleReport {
    /// The report as Prometheus/OpenMetrics text (`# EOF` at the end).
    pub fn metrics_text(&self) -> String {
        let mut m = Metrics::default();
        let role = [("role", self.role.as_str()), ("name", self.name.as_str())];
        m.gauge("ferry_up", "1 while the role runs.", &role, 1.0);
        m.info("ferry_build", "ferry's version.", &[("version", self.version.as_str())]);
        if let Some(t) = self.cert_expires_unix {
            m.gauge("ferry_cert_expiry_timestamp_seconds", "When this role's certificate expires.", &[], t as f64);
        }
        if let Some(b) = self.spool_bytes {
            m.gauge("ferry_spool_bytes", "Bytes held in the process server's spool.", &[], b as f64);
        }
        if let Some(b) = self.spool_max_bytes {
            m.gauge("ferry_spool_max_bytes", "Most the spool may hold.", &[], b as f64);
        }
        for d in &self.disks {
            let l = [("disk", d.name.as_str())];
            m.state_set("ferry_disk_state", "The disk's state.", &l, &d.state);
            if let Some(v) = d.lag_ms {
                m.gauge("ferry_disk_lag_seconds", "Age of the oldest change not yet durable at the next hop.", &l, v as f64 / 1000.0);
            }
            if let Some(v) = d.backlog_bytes {
                m.gauge("ferry_disk_backlog_bytes", "Bytes of changes not yet durable at the next hop.", &l, v as f64);
            }
            m.counter("ferry_disk_churn_bytes", "Bytes written to the disk.", &l, d.churn_bytes_total as f64);
            m.counter("ferry_disk_sent_bytes", "Bytes sent on to the next hop.", &l, d.sent_bytes_total as f64);
            if let Some(v) = d.points {
                m.gauge("ferry_disk_points", "Recovery points.", &l, v as f64);
            }
            if let Some(v) = d.last_point_unix_ms {
                m.gauge("ferry_disk_last_point_timestamp_seconds", "Source time of the newest recovery point.", &l, v as f64 / 1000.0);
            }
            if let Some(v) = d.journal_bytes {
                m.gauge("ferry_disk_journal_bytes", "Journal bytes used.", &l, v as f64);
            }
            m.gauge("ferry_disk_resync_required", "1 when the disk needs a resync.", &l, if d.resync_required { 1.0 } else { 0.0 });
        }
        m.finish()
    }
}

/// An OpenMetrics text writer: each family's HELP and TYPE once, then its samples.
#[derive(Default)]
pub struct Metrics {
    families: Vec<(String, String, &'static str, Vec<String>)>,
}

/// A label value escaped for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
    format!("{{{}}}", parts.join(","))
}

impl Metrics {
    fn family(&mut self, name: &str, help: &str, kind: &'static str) -> &mut Vec<String> {
        let i = match self.families.iter().position(|f| f.0 == name) {
            Some(i) => i,
            None => {
                self.families.push((name.to_string(), help.to_string(), kind, Vec::new()));
                self.families.len() - 1
            }
        };
        &mut self.families[i].3
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        let line = format!("{name}{} {}", labels(l), num(v));
        self.family(name, help, "gauge").push(line);
    }

    /// A counter sample (`name` without `_total`; the sample gets it).
    pub fn counter(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        let line = format!("{name}_total{} {}", labels(l), num(v));
        self.family(name, help, "counter").push(line);
    }

    /// An info metric (`name` without `_info`).
    pub fn info(&mut self, name: &str, help: &str, l: &[(&str, &str)]) {
        let line = format!("{name}_info{} 1", labels(l));
        self.family(name, help, "info").push(line);
    }

    /// A state set: one sample per state seen, 1 for the current one.
    pub fn state_set(&mut self, name: &str, help: &str, l: &[(&str, &str)], state: &str) {
        let mut all: Vec<(&str, &str)> = l.to_vec();
        all.push((name, state));
        let line = format!("{name}{} 1", labels(&all));
        self.family(name, help, "stateset").push(line);
    }

    /// The text, ending with `# EOF`.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for (name, help, kind, samples) in self.families {
            out.push_str(&format!("# HELP {name} {}\n# TYPE {name} {kind}\n", esc(&help)));
            for s in samples {
                out.push_str(&s);
                out.push('\n');
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_said_once_and_labels_escaped() {
        let r = RoleReport {
            role: "agent".into(),
            name: "db\"1".into(),
            version: "0.1.0".into(),
            disks: vec![
                DiskReport { name: "a".into(), state: "streaming".into(), lag_ms: Some(1500), ..Default::default() },
                DiskReport { name: "b".into(), state: "idle".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let t = r.metrics_text();
        assert_eq!(t.matches("# TYPE ferry_disk_state stateset").count(), 1);
        assert!(t.contains("ferry_disk_lag_seconds{disk=\"a\"} 1.5\n"), "{t}");
        assert!(t.contains("name=\"db\\\"1\""), "{t}");
        assert!(t.ends_with("# EOF\n"));
    }
}
