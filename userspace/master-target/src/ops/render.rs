//! The CLI's text for each view of [`super`]: lines, without their ending
//! newline. Which stream a line goes to (stdout or stderr) is the caller's
//! choice, as `ferry` documents it.

use super::{DiskStatus, ExportView, FailoverView, FinishView, GroupPointsView, Outcome, PointsView, RecoverView, Report, RetentionView};
use crate::store::failover::Phase;
use crate::store::retention::{Pass, Policy};
use ferry_common::units::{human, rfc3339};
use std::time::Duration;

/// The failover state above `ferry points`' table (or on stderr with
/// `--json`, then after `NAME: `).
pub fn points_failover(v: &PointsView) -> Option<String> {
    let f = v.failover.as_ref()?;
    let state = if f.state == Phase::Committed { "committed" } else { "pending" };
    Some(format!("failed over to point {} ({state}) since {}", f.point, f.since))
}

/// `ferry points`' table.
pub fn points_table(v: &PointsView) -> Vec<String> {
    let mut out = vec![format!("{:>6}  {:<32}  {:<5}  {:>12}  {}", "ID", "TIME", "KIND", "SEQ", "KEPT")];
    for p in &v.points {
        let w = p.kept.map_or("expiring", |r| r.as_str());
        out.push(format!("{:>6}  {:<32}  {:<5}  {:>12}  {w}", p.id, p.time, p.kind.as_str(), p.seq));
    }
    out
}

/// `ferry group-points`: a line a cut, the disks in the order named.
pub fn group_points(v: &GroupPointsView) -> Vec<String> {
    v.rows
        .iter()
        .map(|r| {
            let parts: Vec<String> = v.names.iter().zip(&r.ids).map(|(n, id)| format!("{n}={id}")).collect();
            format!("{}  {}", rfc3339(r.time_ns), parts.join(" "))
        })
        .collect()
}

/// `ferry recover`'s line (stderr).
pub fn recovered(v: &RecoverView) -> String {
    format!(
        "recovered {} point {} ({}, {}) to {} ({})",
        v.name,
        v.point.id,
        v.point.kind.as_str(),
        v.point.time,
        v.out.display(),
        v.format.as_str()
    )
}

/// `ferry export`'s line once it listens (stderr).
pub fn exporting(v: &ExportView) -> String {
    let name = &v.name;
    format!(
        "serving {name} point {} ({}, {}) as NBD export {name:?} on nbd://{}/{name}{}",
        v.point.id,
        v.point.kind.as_str(),
        v.point.time,
        v.listen,
        if v.writable { " (writable: writes go to a scratch overlay, discarded at exit)" } else { " (read-only)" }
    )
}

/// `ferry retention`'s policy line (stdout).
pub fn retention(v: &RetentionView) -> String {
    format!("{}: {}{}", v.name, policy_text(&v.policy), if v.set { "" } else { " (the default for a disk with no policy set)" })
}

/// What applying the policy did (stderr): `None` when a master target
/// serves the disk.
pub fn retention_applied(name: &str, pass: Option<Pass>) -> String {
    match pass {
        Some(p) => format!("{name}: {} points dropped, {} kept", p.dropped, p.kept),
        None => format!("{name}: a master target is serving this disk; it applies the policy at the next point"),
    }
}

/// A retention policy as a sentence, e.g. "keep points for 3days: every
/// point for 1h, then one an hour up to 1day, then one a day; journal at
/// most 512.0 MiB after the oldest kept point".
pub fn policy_text(p: &Policy) -> String {
    let d = |ns: u64| humantime::format_duration(Duration::from_secs(ns / 1_000_000_000)).to_string();
    let limit = if p.keep_ns == 0 { u64::MAX } else { p.keep_ns };
    let mut tiers: Vec<String> = Vec::new();
    if p.all_ns >= limit {
        tiers.push("every point".into());
    } else {
        if p.all_ns > 0 {
            tiers.push(format!("every point for {}", d(p.all_ns)));
        }
        if p.hourly_ns > p.all_ns {
            tiers.push(if p.hourly_ns >= limit { "one an hour".into() } else { format!("one an hour up to {}", d(p.hourly_ns)) });
        }
        if p.hourly_ns < limit {
            tiers.push("one a day".into());
        }
    }
    let window = if p.keep_ns == 0 { "keep points forever".to_string() } else { format!("keep points for {}", d(p.keep_ns)) };
    let cap = if p.journal_cap == 0 {
        "no journal cap".to_string()
    } else {
        format!("journal at most {} after the oldest kept point", human(p.journal_cap))
    };
    format!("{window}: {}; {cap}; the newest point is always kept", tiers.join(", then "))
}

/// `ferry failover`'s explanation (stderr); the command line goes to stdout.
pub fn failed_over(v: &FailoverView) -> String {
    format!(
        "{}: failed over to point {} ({}, {}), written to {}; its stream is refused until \
         `ferry failover --commit` (final) or `--cancel` (a running agent waits, then resumes); \
         another --point may still be chosen",
        v.name,
        v.point.id,
        v.point.kind.as_str(),
        v.point.time,
        v.out.display()
    )
}

/// `ferry failover --commit|--cancel`'s line (stderr).
pub fn failover_finished(v: &FinishView) -> String {
    format!(
        "{}: {}",
        v.name,
        if v.committed {
            "failover committed: its stream is refused for good (a waiting agent stops); \
             to replicate this disk again, protect it under a new name"
        } else {
            "failover cancelled: its stream is accepted again; a running agent resumes by itself \
             within a few seconds (one that exited must be started again)"
        }
    )
}

/// `ferry repair`'s report (stdout).
pub fn repair(name: &str, rep: &Report) -> Vec<String> {
    let mut out: Vec<String> = rep.steps.iter().map(|s| format!("{name}: {s}")).collect();
    if let Some(a) = &rep.aside {
        out.push(format!("{name}: files given up are in {}", a.display()));
    }
    out
}

/// `ferry verify`'s report (stdout).
pub fn verify(name: &str, o: &Outcome) -> Vec<String> {
    let mut out = Vec::new();
    for d in &o.damage {
        let pts = if d.points.is_empty() { String::new() } else { format!("; points affected: {:?}", d.points) };
        out.push(format!("{name}: DAMAGE {} at byte {} (+{} bytes): {}{pts}", d.file, d.offset, d.len, d.what));
    }
    out.push(format!(
        "{name}: {} chunks of the replica and the journal checked in {:.1}s ({} read): {}",
        o.chunks_checked,
        o.seconds,
        human(o.bytes_read),
        if o.ok() { "no damage".to_string() } else { format!("{} damaged range(s)", o.damage.len()) }
    ));
    out
}

/// The error `ferry verify` ends with when it found damage (exit 1).
pub fn verify_failure(name: &str, o: &Outcome) -> Option<String> {
    (!o.ok()).then(|| format!("verify found {} damaged range(s) in disk {name} (listed above)", o.damage.len()))
}

/// `ferry status --data DIR --name NAME` (stdout).
pub fn disk_status(s: &DiskStatus) -> Vec<String> {
    let mut out = vec![
        format!("health     {}: {}", s.health, s.health_reason),
        format!("disk       {} ({}){}", s.name, human(s.size), if s.streaming { ", a stream is open" } else { "" }),
    ];
    match (s.newest_point, s.newest_point_age_seconds) {
        (Some(id), Some(age)) => out.push(format!("points     {} kept, newest {id} ({age:.0}s old)", s.points)),
        _ => out.push("points     none".to_string()),
    }
    out.push(format!(
        "journal    {} on disk{}",
        human(s.journal_bytes),
        s.durable_seq.map(|d| format!(", replica durable to seq {d}")).unwrap_or_default()
    ));
    if let (Some(f), Some(t)) = (s.free_bytes, s.fs_bytes) {
        out.push(format!("space      {} free of {}", human(f), human(t)));
    }
    match &s.last_verify {
        Some(v) => out.push(format!(
            "verify     {} at {}: {} chunks in {:.1}s",
            if v.ok() { "clean".to_string() } else { format!("{} damaged range(s)", v.damage.len()) },
            rfc3339(v.time_ns),
            v.chunks_checked,
            v.seconds
        )),
        None => out.push("verify     never run (ferry verify, or master-target --scrub-every)".to_string()),
    }
    if let Some(v) = &s.last_verify {
        for d in &v.damage {
            out.push(format!("DAMAGE     {} at byte {} (+{}): {}", d.file, d.offset, d.len, d.what));
        }
    }
    if let Some(d) = &s.damage {
        out.push(format!("DAMAGED    {d}"));
    }
    if let Some(f) = &s.failover {
        out.push(format!("failover   {f}"));
    }
    out
}
