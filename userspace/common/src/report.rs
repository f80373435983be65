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
    /// The configuration server's jobs this role holds (heartbeats only;
    /// not in `/metrics`, not kept by the server). Some (even empty) says
    /// the role acknowledges jobs: only then is an unacknowledged job
    /// handed out again (a role of before that would run it twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<crate::control::JobReport>>,
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
    /// A report of `role` made now: this machine's host name as its name
    /// (a caller with an identity puts the identity's name instead), this
    /// ferry's version, no disks yet.
    pub fn new(role: &str) -> RoleReport {
        RoleReport {
            role: role.into(),
            name: host_name(),
            version: env!("CARGO_PKG_VERSION").into(),
            at_unix_ms: (crate::now_ns() / 1_000_000) as i64,
            ..Default::default()
        }
    }
}

/// This machine's host name (`localhost` if it cannot be read).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Wall-clock ns as Unix milliseconds (None for 0, "never").
pub fn unix_ms(ns: u64) -> Option<i64> {
    (ns > 0).then_some((ns / 1_000_000) as i64)
}

/// The two text formats a scraper may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`): what
    /// a scraper gets unless it asks for OpenMetrics, and what `promtool
    /// check metrics` reads. State sets and info metrics are gauges in it.
    Prometheus,
    /// OpenMetrics 1.0 text (`application/openmetrics-text`), ending in `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The HTTP `Content-Type` of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl RoleReport {
    /// The report as OpenMetrics text (`# EOF` at the end).
    pub fn metrics_text(&self) -> String {
        self.metrics(Format::OpenMetrics)
    }

    /// The report in `format`. Every family is listed in docs/operating.md
    /// ("Metrics").
    pub fn metrics(&self, format: Format) -> String {
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
            if d.tracker.is_some() || d.mode.is_some() {
                let t =
                    [("disk", d.name.as_str()), ("tracker", d.tracker.as_deref().unwrap_or("")), ("mode", d.mode.as_deref().unwrap_or(""))];
                m.info("ferry_disk_tracker", "The agent's tracker and its mode.", &t);
            }
            if let Some(v) = d.lag_ms {
                m.gauge("ferry_disk_lag_seconds", "Age of the oldest change not yet durable at the next hop.", &l, v as f64 / 1000.0);
            }
            if let Some(v) = d.backlog_bytes {
                m.gauge("ferry_disk_backlog_bytes", "Bytes of changes not yet durable at the next hop.", &l, v as f64);
            }
            m.counter("ferry_disk_churn_bytes", "Bytes written to the disk.", &l, d.churn_bytes_total as f64);
            // A master target has no next hop.
            if self.role != "master-target" {
                m.counter("ferry_disk_sent_bytes", "Bytes sent on to the next hop.", &l, d.sent_bytes_total as f64);
            }
            if let Some(v) = d.points {
                m.gauge("ferry_disk_points", "Recovery points (master target: held; agent: cut).", &l, v as f64);
            }
            if let Some(v) = d.last_point_unix_ms {
                m.gauge("ferry_disk_last_point_timestamp_seconds", "Source time of the newest recovery point.", &l, v as f64 / 1000.0);
            }
            if let Some(v) = d.last_app_point_unix_ms {
                m.gauge(
                    "ferry_disk_last_app_point_timestamp_seconds",
                    "Source time of the newest app-consistent recovery point.",
                    &l,
                    v as f64 / 1000.0,
                );
            }
            if let Some(v) = d.journal_bytes {
                m.gauge("ferry_disk_journal_bytes", "Journal bytes used.", &l, v as f64);
            }
            if let Some(v) = d.journal_max_bytes {
                m.gauge("ferry_disk_journal_max_bytes", "Most journal retention keeps (0: no limit).", &l, v as f64);
            }
            m.gauge("ferry_disk_resync_required", "1 when the disk needs a resync.", &l, if d.resync_required { 1.0 } else { 0.0 });
        }
        m.finish_as(format)
    }
}

/// An OpenMetrics (or Prometheus) text writer: each family's HELP and TYPE
/// once, then its samples.
#[derive(Default)]
pub struct Metrics {
    families: Vec<Family>,
}

struct Family {
    name: String,
    help: String,
    kind: &'static str,
    /// (suffix of the sample name, labels, value).
    samples: Vec<(&'static str, String, String)>,
}

/// A label value escaped for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// HELP text escaped (no quotes to escape there).
fn esc_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
    format!("{{{}}}", parts.join(","))
}

impl Metrics {
    fn push(&mut self, name: &str, help: &str, kind: &'static str, suffix: &'static str, l: &[(&str, &str)], v: f64) {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family { name: name.to_string(), help: help.to_string(), kind, samples: Vec::new() });
                self.families.len() - 1
            }
        };
        self.families[i].samples.push((suffix, labels(l), num(v)));
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.push(name, help, "gauge", "", l, v);
    }

    /// A counter sample (`name` without `_total`; the sample gets it).
    pub fn counter(&mut self, name: &str, help: &str, l: &[(&str, &str)], v: f64) {
        self.push(name, help, "counter", "_total", l, v);
    }

    /// An info metric (`name` without `_info`).
    pub fn info(&mut self, name: &str, help: &str, l: &[(&str, &str)]) {
        self.push(name, help, "info", "_info", l, 1.0);
    }

    /// A state set: one sample, 1, for the current state (the state is a
    /// label named as the family).
    pub fn state_set(&mut self, name: &str, help: &str, l: &[(&str, &str)], state: &str) {
        let mut all: Vec<(&str, &str)> = l.to_vec();
        all.push((name, state));
        self.push(name, help, "stateset", "", &all, 1.0);
    }

    /// The OpenMetrics text, ending with `# EOF`.
    pub fn finish(self) -> String {
        self.finish_as(Format::OpenMetrics)
    }

    /// The text in `format`. In the Prometheus format a counter's family is
    /// named with its `_total`, an info metric's with its `_info`, and state
    /// sets and info metrics are gauges (the format has no such types).
    pub fn finish_as(self, format: Format) -> String {
        let mut out = String::new();
        for f in self.families {
            let (family, kind) = match (format, f.kind) {
                (Format::OpenMetrics, k) => (f.name.clone(), k),
                (Format::Prometheus, "counter") => (format!("{}_total", f.name), "counter"),
                (Format::Prometheus, "info") => (format!("{}_info", f.name), "gauge"),
                (Format::Prometheus, "stateset") => (f.name.clone(), "gauge"),
                (Format::Prometheus, k) => (f.name.clone(), k),
            };
            out.push_str(&format!("# HELP {family} {}\n# TYPE {family} {kind}\n", esc_help(&f.help)));
            for (suffix, l, v) in f.samples {
                out.push_str(&format!("{}{suffix}{l} {v}\n", f.name));
            }
        }
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
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

    /// The Prometheus text format names counter families with `_total`,
    /// has no state sets or info metrics (gauges instead) and no `# EOF`.
    #[test]
    fn the_prometheus_format_has_only_its_own_types() {
        let r = RoleReport {
            role: "agent".into(),
            name: "db1".into(),
            version: "0.1.0".into(),
            disks: vec![DiskReport {
                name: "a".into(),
                state: "resync required".into(),
                tracker: Some("bpf".into()),
                mode: Some("ring".into()),
                churn_bytes_total: 8192,
                last_app_point_unix_ms: Some(1_500),
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = r.metrics(Format::Prometheus);
        assert!(!t.contains("# EOF") && !t.contains("stateset") && !t.contains(" info\n"), "{t}");
        assert!(t.contains("# TYPE ferry_disk_churn_bytes_total counter\nferry_disk_churn_bytes_total{disk=\"a\"} 8192\n"), "{t}");
        assert!(t.contains("# TYPE ferry_build_info gauge\nferry_build_info{version=\"0.1.0\"} 1\n"), "{t}");
        assert!(t.contains("ferry_disk_state{disk=\"a\",ferry_disk_state=\"resync required\"} 1\n"), "{t}");
        assert!(t.contains("ferry_disk_tracker_info{disk=\"a\",tracker=\"bpf\",mode=\"ring\"} 1\n"), "{t}");
        assert!(t.contains("ferry_disk_last_app_point_timestamp_seconds{disk=\"a\"} 1.5\n"), "{t}");
        let om = r.metrics(Format::OpenMetrics);
        assert!(om.contains("# TYPE ferry_disk_churn_bytes counter\nferry_disk_churn_bytes_total{disk=\"a\"} 8192\n"), "{om}");
        assert!(om.contains("# TYPE ferry_disk_tracker info\n"), "{om}");
    }
}
