//! Recovery plans: ordered steps of machines and disks, with scripts and
//! waits, run as a test failover (NBD exports on the master targets while
//! replication goes on, removed by `cleanup`) or a failover (images written
//! from a chosen point, then `commit` or `cancel`).
//!
//! The configuration server does no disk work itself: each disk's step is a
//! job for the master target that holds it, handed out in that master
//! target's heartbeat answer and reported back (api.rs `job_result`). A run
//! is driven by the instance that started it and logged step by step in the
//! database; its lease is renewed as it goes. If that instance dies, another
//! one marks the run interrupted (a run is never driven twice), and the
//! operator cleans up or cancels it, which works from any instance.
//!
//! Scripts (`pre`, `post`) run on the configuration server's machine with
//! `sh -c`, the plan's name, the run's id and its kind in `FERRY_PLAN`,
//! `FERRY_RUN`, `FERRY_RUN_KIND`, ten minutes at most; a script that fails
//! fails the run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::{bad, not_found, ApiError, ApiResult, RunBody};
use crate::db::{now_ms, PlanRun};
use crate::App;

const LEASE_MS: i64 = 60_000;
/// How long a master target has for one job.
/// How long a run waits for its jobs (a job older than this is never handed out).
const JOB_DEADLINE: Duration = Duration::from_millis(crate::db::JOB_MAX_AGE_MS as u64);
const SCRIPT_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Step {
    /// What the log calls it.
    pub name: String,
    /// Agents whose reported disks this step brings up.
    pub machines: Vec<String>,
    /// Further disks, by name.
    pub disks: Vec<String>,
    /// A shell command before the step's disks, and one after.
    pub pre: Option<String>,
    pub post: Option<String>,
    /// Seconds to wait after the step (e.g. for a database to start).
    pub wait_s: f64,
}

impl Plan {
    pub fn check(&self) -> Result<()> {
        if self.steps.is_empty() || self.steps.len() > 100 {
            bail!("a plan has 1 to 100 steps");
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.machines.is_empty() && s.disks.is_empty() && s.pre.is_none() && s.post.is_none() {
                bail!("step {} does nothing: give it machines, disks or a script", i + 1);
            }
            for n in s.machines.iter().chain(&s.disks) {
                if !ferry_identity::valid_name(n) {
                    bail!("step {}: {n:?} is not a machine or disk name", i + 1);
                }
            }
            if !(0.0..=3600.0).contains(&s.wait_s) {
                bail!("step {}: wait_s is between 0 and 3600", i + 1);
            }
        }
        Ok(())
    }
}

fn check_point(p: &str) -> ApiResult<()> {
    if p == "latest" || p == "latest-app" || humantime::parse_rfc3339_weak(p).is_ok() {
        Ok(())
    } else {
        Err(bad(format!("point {p:?}: latest, latest-app or an RFC 3339 time")))
    }
}

/// Start a run of plan `name`.
pub async fn start(app: &Arc<App>, name: &str, b: &RunBody, user: &str) -> ApiResult<PlanRun> {
    if b.kind != "test-failover" && b.kind != "failover" {
        return Err(bad(format!("kind {:?}: test-failover or failover", b.kind)));
    }
    let point = b.point.clone().unwrap_or_else(|| "latest".into());
    check_point(&point)?;
    let plan = app.db.plans().await?.into_iter().find(|(n, _)| n == name).map(|(_, p)| p);
    let plan: Plan =
        serde_json::from_value(plan.ok_or_else(|| not_found(format!("no plan {name}")))?).map_err(|e| bad(format!("plan {name}: {e}")))?;
    for r in app.db.runs(1000).await? {
        if r.plan == name && matches!(r.state.as_str(), "running" | "ready" | "failed-over") {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("plan {name} has run {} in state {}: clean it up, commit or cancel it first", r.id, r.state),
            ));
        }
    }
    let Some(run) = app.db.start_run(name, &b.kind, &app.instance, LEASE_MS).await? else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("plan {name} has a run that is not finished: clean it up, commit or cancel it first"),
        ));
    };
    app.db
        .run_log(
            &run.id,
            &app.instance,
            &format!("{} of plan {name} to point {point} started by {user}", b.kind),
            None,
            now_ms() + LEASE_MS,
        )
        .await?;
    let (app2, id, kind) = (app.clone(), run.id.clone(), b.kind.clone());
    let plan_name = name.to_string();
    tokio::spawn(async move {
        let end = match drive(&app2, &id, &plan_name, &plan, &kind, &point).await {
            Ok(()) => (if kind == "test-failover" { "ready" } else { "failed-over" }, "every step done".to_string()),
            Err(e) => ("failed", format!("failed: {e:#}")),
        };
        let _ = app2.db.run_log(&id, &app2.instance, &end.1, Some(end.0), now_ms() + LEASE_MS).await;
    });
    Ok(app.db.run(&run.id).await?.unwrap_or(run))
}

/// The disks a step brings up, each with the master target holding it.
async fn step_disks(app: &App, s: &Step) -> Result<Vec<(String, String)>> {
    let views = crate::disk_views(app).await?;
    let mut out = Vec::new();
    for d in &views {
        let by_machine = d.agent.as_ref().is_some_and(|a| s.machines.contains(a));
        if by_machine || s.disks.contains(&d.name) {
            let Some(mt) = d.master_target.clone() else {
                bail!("disk {} has no master target reporting it", d.name);
            };
            out.push((d.name.clone(), mt));
        }
    }
    for n in &s.disks {
        if !out.iter().any(|(d, _)| d == n) {
            bail!("disk {n} has not been reported by any role");
        }
    }
    for m in &s.machines {
        if !views.iter().any(|d| d.agent.as_ref() == Some(m)) {
            bail!("machine {m} has reported no disk");
        }
    }
    Ok(out)
}

async fn drive(app: &App, id: &str, plan_name: &str, plan: &Plan, kind: &str, point: &str) -> Result<()> {
    let lease = || now_ms() + LEASE_MS;
    for (i, s) in plan.steps.iter().enumerate() {
        let label = if s.name.is_empty() { format!("step {}", i + 1) } else { format!("step {} ({})", i + 1, s.name) };
        if let Some(cmd) = &s.pre {
            app.db.run_log(id, &app.instance, &format!("{label}: pre script: {cmd}"), None, lease()).await?;
            let out = script(cmd, plan_name, id, kind).await?;
            app.db.run_log(id, &app.instance, &format!("{label}: pre script done{out}"), None, lease()).await?;
        }
        let disks = step_disks(app, s).await?;
        let job_kind = if kind == "test-failover" { "test-failover" } else { "failover" };
        let jobs = run_jobs(app, id, &label, &disks, job_kind, point).await?;
        if jobs.iter().any(|ok| !ok) {
            bail!("{label}: a disk failed (see above)");
        }
        if let Some(cmd) = &s.post {
            app.db.run_log(id, &app.instance, &format!("{label}: post script: {cmd}"), None, lease()).await?;
            let out = script(cmd, plan_name, id, kind).await?;
            app.db.run_log(id, &app.instance, &format!("{label}: post script done{out}"), None, lease()).await?;
        }
        if s.wait_s > 0.0 {
            app.db.run_log(id, &app.instance, &format!("{label}: waiting {} s", s.wait_s), None, lease()).await?;
            tokio::time::sleep(Duration::from_secs_f64(s.wait_s)).await;
        }
        app.db.run_log(id, &app.instance, &format!("{label}: done"), None, lease()).await?;
    }
    Ok(())
}

/// Give each disk's master target its job, wait for every outcome, log each.
/// However it ends, the jobs no master target took are expired: none is
/// handed out after the run stopped waiting for it.
async fn run_jobs(app: &App, run: &str, label: &str, disks: &[(String, String)], kind: &str, point: &str) -> Result<Vec<bool>> {
    let r = run_jobs_waiting(app, run, label, disks, kind, point).await;
    if r.is_err() {
        if let Err(e) = app.db.expire_run_jobs(run, "expired: no master target took it before its run stopped waiting").await {
            log::warn!("run {run}: expiring its jobs: {e:#}");
        }
    }
    r
}

async fn run_jobs_waiting(app: &App, run: &str, label: &str, disks: &[(String, String)], kind: &str, point: &str) -> Result<Vec<bool>> {
    let mut ids = Vec::new();
    for (disk, mt) in disks {
        let j = app.db.add_job("master-target", mt, kind, &json!({ "disk": disk, "point": point, "run": run })).await?;
        app.db
            .run_log(
                run,
                &app.instance,
                &format!("{label}: {kind} of {disk} asked of master-target/{mt} (job {})", j.id),
                None,
                now_ms() + LEASE_MS,
            )
            .await?;
        ids.push((disk.clone(), j.id));
    }
    let deadline = tokio::time::Instant::now() + JOB_DEADLINE;
    let mut out = vec![None; ids.len()];
    while out.iter().any(|o| o.is_none()) {
        for (i, (disk, jid)) in ids.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(j) = app.db.job(jid).await? {
                if j.state == "done" || j.state == "failed" {
                    let ok = j.state == "done";
                    app.db
                        .run_log(
                            run,
                            &app.instance,
                            &format!("{label}: {disk}: {} {}", if ok { "done:" } else { "FAILED:" }, j.result.unwrap_or_default()),
                            None,
                            now_ms() + LEASE_MS,
                        )
                        .await?;
                    out[i] = Some(ok);
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{label}: master targets did not answer within {} s", JOB_DEADLINE.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Keep the lease while waiting.
        app.db.run_log(run, &app.instance, "", None, now_ms() + LEASE_MS).await.ok();
    }
    Ok(out.into_iter().map(|o| o.unwrap_or(false)).collect())
}

async fn script(cmd: &str, plan: &str, run: &str, kind: &str) -> Result<String> {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .env_remove("FERRY_CS_DB")
        .env("FERRY_PLAN", plan)
        .env("FERRY_RUN", run)
        .env("FERRY_RUN_KIND", kind)
        .kill_on_drop(true);
    let out = match tokio::time::timeout(SCRIPT_DEADLINE, c.output()).await {
        Ok(r) => r?,
        Err(_) => bail!("the script ran over {} s and was killed", SCRIPT_DEADLINE.as_secs()),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let first: String = text.lines().take(5).collect::<Vec<_>>().join(" | ");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("the script failed ({}): {}", out.status, err.lines().next().unwrap_or(""));
    }
    Ok(if first.is_empty() { String::new() } else { format!(": {first}") })
}

/// `cleanup` a test failover; `commit` or `cancel` a failover.
pub async fn act(app: &Arc<App>, id: &str, action: &str, user: &str) -> ApiResult<PlanRun> {
    let r = app.db.run(id).await?.ok_or_else(|| not_found(format!("no run {id}")))?;
    let (job_kind, next) = match (r.kind.as_str(), action) {
        ("test-failover", "cleanup") => ("test-cleanup", "cleaned"),
        ("failover", "commit") => ("failover-commit", "committed"),
        ("failover", "cancel") => ("failover-cancel", "cancelled"),
        (k, a) => return Err(bad(format!("a {k} run has no action {a:?} (test-failover: cleanup; failover: commit, cancel)"))),
    };
    let allowed = match action {
        // A test failover is cleaned up whatever state it reached.
        "cleanup" => matches!(r.state.as_str(), "ready" | "failed" | "interrupted" | "running"),
        _ => r.state == "failed-over" || (action == "cancel" && matches!(r.state.as_str(), "failed" | "interrupted")),
    };
    if !allowed {
        return Err(ApiError(StatusCode::CONFLICT, format!("run {id} is {}: {action} does not apply", r.state)));
    }
    // Every disk any job of this run touched.
    let mut disks: Vec<(String, String)> = Vec::new();
    for j in app.db.jobs(100_000).await? {
        if j.args.get("run").and_then(|v| v.as_str()) == Some(id) && (j.kind == "test-failover" || j.kind == "failover") {
            if let Some(d) = j.args.get("disk").and_then(|v| v.as_str()) {
                if !disks.iter().any(|(x, _)| x == d) {
                    disks.push((d.to_string(), j.machine.clone()));
                }
            }
        }
    }
    let from: &[&str] = if action == "cleanup" {
        &["ready", "failed", "interrupted", "running"]
    } else if action == "commit" {
        &["failed-over"]
    } else {
        &["failed-over", "failed", "interrupted"]
    };
    if !app.db.take_run(id, &app.instance, from, &format!("{action} started by {user}"), now_ms() + LEASE_MS).await? {
        return Err(ApiError(StatusCode::CONFLICT, format!("run {id} changed state meanwhile: {action} does not apply")));
    }
    // What the run asked before and no master target took is never handed
    // out next to (or after) this action's jobs.
    app.db.expire_run_jobs(id, &format!("expired: {action} was started before a master target took it")).await?;
    let (app2, id2) = (app.clone(), id.to_string());
    let action = action.to_string();
    tokio::spawn(async move {
        let res = run_jobs(&app2, &id2, &action, &disks, job_kind, "").await;
        let (state, line) = match res {
            Ok(v) if v.iter().all(|ok| *ok) => (next, format!("{action}: every disk done")),
            Ok(_) => ("failed", format!("{action}: a disk failed (see above); run {action} again")),
            Err(e) => ("failed", format!("{action} failed: {e:#}")),
        };
        let _ = app2.db.run_log(&id2, &app2.instance, &line, Some(state), now_ms() + LEASE_MS).await;
    });
    Ok(app.db.run(id).await?.unwrap_or(r))
}

/// Runs whose driving instance went away are marked interrupted; jobs no
/// role took in time are marked expired.
pub async fn resume_loop(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Ok(runs) = app.db.runs(1000).await {
            for r in runs.iter().filter(|r| r.state == "running") {
                if let Ok(true) = app.db.interrupt_run(&r.id, now_ms()).await {
                    log::warn!("run {} of plan {} lost the instance driving it: marked interrupted", r.id, r.plan);
                }
            }
        }
        if let Err(e) = app.db.expire_old_jobs(now_ms()).await {
            log::warn!("expiring old jobs: {e:#}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
    }
}
