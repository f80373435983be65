//! Alerts: conditions read from the roles' reports, raised and cleared in
//! the database, delivered to webhooks.
//!
//! Every instance evaluates every condition every two seconds; raising is an
//! insert that a unique index lets succeed once per open alert, clearing a
//! conditional update, so two instances never raise or clear the same alert
//! twice. The instance that wins queues one delivery per webhook in the same
//! transaction (the outbox), and any instance sends it: claimed with a
//! 30-second lease, retried with backoff (2 s doubling to 5 min, 20 tries),
//! signed with HMAC-SHA256 of `TIMESTAMP.BODY` under the webhook's secret:
//!
//! ```text
//! POST <url>
//! Content-Type: application/json
//! X-Ferry-Delivery: <id>           the same on every retry: receivers drop repeats
//! X-Ferry-Timestamp: <unix seconds>
//! X-Ferry-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
//! ```
//!
//! A delivery is sent at least once; it is sent twice only if an instance
//! dies between the receiver's answer and recording it (the id tells).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::db::{now_ms, Policy};
use crate::App;

/// Every kind of alert.
pub const KINDS: &[&str] = &["heartbeat", "rpo", "resync", "spool", "journal", "certificate", "bitmap", "point"];

const LEASE_MS: i64 = 30_000;
const MAX_ATTEMPTS: i64 = 20;

/// One condition's verdict for one subject.
struct Verdict {
    kind: &'static str,
    subject: String,
    firing: bool,
    message: String,
}

/// Look at everything once; raise what fires, clear what stopped.
pub async fn evaluate(app: &App) -> Result<()> {
    let now = now_ms();
    let hb_ms = app.cfg.heartbeat_timeout.as_millis() as i64;
    // Right after a start (this instance's, or the database's first
    // contact in a while) silence says nothing yet: wait a full timeout.
    let settled = app.started.elapsed() >= app.cfg.heartbeat_timeout;
    let machines = app.db.machines().await?;
    let groups = app.db.groups().await?;
    let mut v: Vec<Verdict> = Vec::new();
    for m in &machines {
        let subject = format!("{}/{}", m.role, m.name);
        let silent = now - m.last_seen_ms;
        if settled || silent <= hb_ms {
            v.push(Verdict {
                kind: "heartbeat",
                subject: subject.clone(),
                firing: silent > hb_ms,
                message: if silent > hb_ms {
                    format!("no heartbeat from {subject} for {} s (last at {})", silent / 1000, stamp(m.last_seen_ms))
                } else {
                    format!("{subject} reports again")
                },
            });
        }
        if let Some(exp) = m.report.cert_expires_unix {
            let left = exp - now / 1000;
            v.push(Verdict {
                kind: "certificate",
                subject: subject.clone(),
                firing: left < 7 * 86400,
                message: format!("the certificate of {subject} expires at {} ({} h left)", stamp(exp * 1000), left / 3600),
            });
        }
        if let (Some(b), Some(max)) = (m.report.spool_bytes, m.report.spool_max_bytes) {
            if max > 0 {
                let pct = b as f64 * 100.0 / max as f64;
                v.push(Verdict {
                    kind: "spool",
                    subject: subject.clone(),
                    firing: pct >= 90.0,
                    message: format!("the spool of {subject} is {pct:.0}% full ({b} of {max} bytes)"),
                });
            }
        }
    }
    let views = crate::disk_views(app).await?;
    let rows = app.db.disk_rows().await?;
    for d in &views {
        let policy = d.group.as_ref().and_then(|g| groups.iter().find(|x| &x.name == g)).map(|g| g.policy.clone());
        let threshold = policy.as_ref().map(|p| p.rpo_threshold_s).unwrap_or(Policy::default().rpo_threshold_s) as i64 * 1000;
        if let Some(rpo) = d.rpo_ms {
            v.push(Verdict {
                kind: "rpo",
                subject: d.name.clone(),
                firing: rpo > threshold,
                message: format!("RPO of {} is {} s (threshold {} s)", d.name, rpo / 1000, threshold / 1000),
            });
        }
        v.push(Verdict {
            kind: "resync",
            subject: d.name.clone(),
            firing: d.resync_required,
            message: if d.resync_required {
                format!("{} needs a resync: {}", d.name, d.reason.clone().unwrap_or_else(|| "changes were lost".into()))
            } else {
                format!("{} no longer needs a resync", d.name)
            },
        });
        if d.agent.is_some() {
            let bitmap = d.mode.as_deref() == Some("bitmap");
            v.push(Verdict {
                kind: "bitmap",
                subject: d.name.clone(),
                firing: bitmap,
                message: if bitmap {
                    format!("the tracker of {} fell back to bitmap mode (changes are re-read, not streamed)", d.name)
                } else {
                    format!("the tracker of {} streams again", d.name)
                },
            });
        }
        if let (Some(p), Some(last)) = (&policy, d.last_point_unix_ms) {
            let late = (p.point_every_s * 3000.0) as i64;
            let age = now - last;
            v.push(Verdict {
                kind: "point",
                subject: d.name.clone(),
                firing: age > late.max(30_000),
                message: format!(
                    "the newest point of {} is {} s old; the policy asks for one every {} s",
                    d.name,
                    age / 1000,
                    p.point_every_s
                ),
            });
        }
        for r in rows.iter().filter(|r| r.disk == d.name && r.role == "master-target") {
            if let (Some(b), Some(max)) = (r.report.journal_bytes, r.report.journal_max_bytes) {
                if max > 0 {
                    let pct = b as f64 * 100.0 / max as f64;
                    v.push(Verdict {
                        kind: "journal",
                        subject: d.name.clone(),
                        firing: pct >= 90.0,
                        message: format!("the journal of {} on {} is {pct:.0}% full", d.name, r.machine),
                    });
                }
            }
        }
    }
    // Only what changes touches the database: a firing condition with its
    // alert open, or a quiet one with none, needs nothing.
    let open: std::collections::HashSet<(String, String)> =
        app.db.alerts(true, 1_000_000).await?.into_iter().map(|a| (a.kind, a.subject)).collect();
    for x in v {
        if x.firing == open.contains(&(x.kind.to_string(), x.subject.clone())) {
            continue;
        }
        if x.firing {
            if let Some(a) = app.db.raise(x.kind, &x.subject, &x.message).await? {
                log::warn!("alert raised: {} {}: {}", a.kind, a.subject, a.message);
            }
        } else if let Some(a) = app.db.clear(x.kind, &x.subject, &x.message).await? {
            log::info!("alert cleared: {} {}: {}", a.kind, a.subject, a.message);
        }
    }
    Ok(())
}

fn stamp(ms: i64) -> String {
    crate::db::stamp(ms)
}

pub async fn evaluate_loop(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_secs(2).min(app.cfg.heartbeat_timeout / 2).max(Duration::from_millis(200));
    let mut pruned = std::time::Instant::now();
    loop {
        if let Err(e) = evaluate(&app).await {
            log::warn!("evaluating alerts: {e:#}");
        }
        if pruned.elapsed() > Duration::from_secs(600) {
            pruned = std::time::Instant::now();
            let before = now_ms() - app.cfg.keep_samples.as_millis() as i64;
            match app.db.prune_samples(before).await {
                Ok(n) if n > 0 => log::info!("dropped {n} chart samples older than {}", stamp(before)),
                Ok(_) => {}
                Err(e) => log::warn!("dropping old chart samples: {e:#}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The signature header's value for `body` sent at `ts`.
pub fn signature(secret: &str, ts: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{ts}.{body}").as_bytes());
    let out = mac.finalize().into_bytes();
    format!("sha256={}", out.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Send what is due; returns how many were handled.
pub async fn deliver_due(app: &App) -> Result<usize> {
    let mut n = 0;
    while let Some((d, w)) = app.db.claim_delivery(&app.instance, LEASE_MS).await? {
        n += 1;
        let ts = now_ms() / 1000;
        let sig = signature(&w.secret, ts, &d.body);
        let (url, body, id) = (w.url.clone(), d.body.clone(), d.id.clone());
        let sent = tokio::task::spawn_blocking(move || {
            let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).redirects(0).build();
            agent
                .post(&url)
                .set("Content-Type", "application/json")
                .set("X-Ferry-Delivery", &id)
                .set("X-Ferry-Timestamp", &ts.to_string())
                .set("X-Ferry-Signature", &sig)
                .send_string(&body)
                .map(|_| ())
                .map_err(|e| match e {
                    ureq::Error::Status(code, _) => format!("the receiver answered {code}"),
                    e => e.to_string(),
                })
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match sent {
            Ok(()) => {
                app.counters.deliveries_sent.fetch_add(1, Ordering::Relaxed);
                app.db.delivered(&d.id, &app.instance, None, None).await?;
            }
            Err(e) => {
                app.counters.deliveries_failed.fetch_add(1, Ordering::Relaxed);
                let tries = d.attempts + 1;
                let retry = (tries < MAX_ATTEMPTS).then(|| now_ms() + (2_000i64 << tries.min(8)).min(300_000));
                log::warn!(
                    "webhook {} delivery {} (try {tries}): {e}{}",
                    w.url,
                    d.id,
                    if retry.is_some() { "; will retry" } else { "; given up" }
                );
                app.db.delivered(&d.id, &app.instance, Some(&e), retry).await?;
            }
        }
    }
    Ok(n)
}

pub async fn deliver_loop(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Err(e) = deliver_due(&app).await {
            log::warn!("delivering webhooks: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe", but over "ts.body".
        let s = super::signature("Jefe", 0, "what do ya want for nothing?");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert_ne!(s, super::signature("Jefe", 1, "what do ya want for nothing?"));
    }
}
