//! A role under a configuration server (`--config-server ADDR`): its
//! heartbeat thread, and the master target's jobs (test failover through
//! `ferry export` children, failover, commit, cancel) and per-disk retention
//! from the policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use ferry_common::control::{HeartbeatReply, Job, Live};
use ferry_common::report::RoleReport;
use ferry_control::{Hooks, JobRunner, ReplyHook};
use ferry_target::ops;

/// Start reporting to `addr`; `cache` keeps the last policy.
pub fn start(
    addr: &str,
    identity: Option<&Path>,
    report: impl Fn() -> RoleReport + Send + Sync + 'static,
    live: Arc<Live>,
    cache: Option<PathBuf>,
    hooks: Hooks,
) -> Result<()> {
    let client = crate::control_cmd::role_client(addr, identity)?;
    log::info!("reporting to the configuration server at {addr}");
    ferry_control::spawn(client, Arc::new(report), live, cache, hooks);
    Ok(())
}

/// Where failover images of a master target's disks are written: a folder
/// whose name is no disk name.
fn failover_dir(data: &Path) -> PathBuf {
    data.join("@failover")
}

/// The master target's hooks: jobs, and each disk's retention from its policy.
pub fn master_target_hooks(data: PathBuf) -> Hooks {
    let exports: Arc<Mutex<HashMap<String, Child>>> = Arc::default();
    let d = data.clone();
    let jobs: JobRunner = Arc::new(move |j: &Job| run_job(&d, &exports, j));
    let applied: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    // The jobs given, kept beside the disks ('@' is in no disk name).
    let job_book = Some(data.join("@jobs.state"));
    let on_reply: ReplyHook = Arc::new(move |r: &HeartbeatReply| apply_retention(&data, &applied, r));
    Hooks { jobs: Some(jobs), on_reply: Some(on_reply), job_book }
}

/// The process server's hooks: each disk's bandwidth from its policy.
pub fn process_server_hooks(relay: Arc<ferry_relay::relay::Relay>) -> Hooks {
    let last: Arc<Mutex<HashMap<String, f64>>> = Arc::default();
    let on_reply: ReplyHook = Arc::new(move |r: &HeartbeatReply| {
        let mut rates = HashMap::new();
        for (disk, p) in &r.disk_policies {
            if p.bandwidth.is_empty() {
                continue;
            }
            match ferry_relay::limit::parse_rate(&p.bandwidth) {
                Ok(Some(v)) => {
                    rates.insert(disk.clone(), v);
                }
                Ok(None) => {}
                Err(e) => log::warn!("{disk}: the policy's bandwidth {:?}: {e}", p.bandwidth),
            }
        }
        let Ok(mut l) = last.lock() else { return };
        if *l != rates {
            log::info!("bandwidth from the policies: {}", if rates.is_empty() { "none".to_string() } else { format!("{rates:?} bytes/s") });
            relay.set_policy_rates(rates.clone());
            *l = rates;
        }
    });
    Hooks { jobs: None, on_reply: Some(on_reply), job_book: None }
}

fn apply_retention(data: &Path, applied: &Mutex<HashMap<String, String>>, r: &HeartbeatReply) {
    let Ok(mut done) = applied.lock() else { return };
    for (disk, p) in &r.disk_policies {
        if p.retention.is_empty() || done.get(disk) == Some(&p.retention) {
            continue;
        }
        let res = ops::RetentionEdit::from_flags(Some(&p.retention), None, None, None)
            .map_err(|e| e.to_string())
            .and_then(|e| ops::retention_set(data, disk, &e).map_err(|e| e.to_string()));
        match res {
            Ok(_) => {
                log::info!("{disk}: retention {} (policy)", p.retention);
                done.insert(disk.clone(), p.retention.clone());
            }
            Err(e) => {
                log::warn!("{disk}: the policy's retention {:?} was not applied: {e}", p.retention);
                // Not retried every heartbeat.
                done.insert(disk.clone(), p.retention.clone());
            }
        }
    }
}

/// This program, to start `ferry export` with: after a package upgrade
/// replaced the file, the new one at the same path.
fn ferry_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    if exe.exists() {
        return Ok(exe);
    }
    let s = exe.to_string_lossy();
    let p = PathBuf::from(s.trim_end_matches(" (deleted)"));
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} is gone (replaced while running?); restart the master target", p.display()))
    }
}

fn arg<'a>(j: &'a Job, k: &str) -> Result<&'a str, String> {
    j.args.get(k).and_then(|v| v.as_str()).ok_or_else(|| format!("job {} has no {k}", j.id))
}

/// `latest-app` is the newest app-consistent point; the rest `ferry export` reads.
fn point_arg(data: &Path, disk: &str, point: &str) -> Result<String, String> {
    if point != "latest-app" {
        return Ok(if point.is_empty() { "latest".into() } else { point.to_string() });
    }
    let v = ops::points(data, disk).map_err(|e| e.to_string())?;
    let json = serde_json::to_value(&v.points).map_err(|e| e.to_string())?;
    json.as_array()
        .and_then(|rows| rows.iter().rev().find(|r| r["kind"] == "app"))
        .and_then(|r| r["id"].as_u64())
        .map(|id| id.to_string())
        .ok_or_else(|| format!("{disk} has no app-consistent point"))
}

fn run_job(data: &Path, exports: &Mutex<HashMap<String, Child>>, j: &Job) -> Result<String, String> {
    let disk = arg(j, "disk")?;
    if !ferry_proto::valid_name(disk) {
        return Err(format!("{disk:?} is not a disk name"));
    }
    let run = j.args.get("run").and_then(|v| v.as_str()).unwrap_or("");
    if !run.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("malformed run id".into());
    }
    let key = format!("{run}/{disk}");
    match j.kind.as_str() {
        "test-failover" => {
            let point = point_arg(data, disk, arg(j, "point").unwrap_or("latest"))?;
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
            let exe = ferry_exe()?;
            let mut child = Command::new(exe)
                .args(["export", "--data"])
                .arg(data)
                .args(["--name", disk, "--point", &point, "--listen", &format!("127.0.0.1:{port}"), "--writable"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting ferry export: {e}"))?;
            // Ready once it accepts; a child that ends says why.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok() {
                    break;
                }
                if let Ok(Some(st)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    return Err(format!("ferry export ended ({st}): {}", err.lines().last().unwrap_or("")));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("ferry export did not listen within 30 s".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Its stderr is not read any more: let it go to a sink.
            drop(child.stderr.take());
            let mut ex = exports.lock().map_err(|_| "exports lock poisoned".to_string())?;
            if let Some(mut old) = ex.insert(key, child) {
                let _ = old.kill();
                let _ = old.wait();
            }
            Ok(format!("NBD export nbd://127.0.0.1:{port}/{disk} of point {point} (writable overlay; replication goes on)"))
        }
        "test-cleanup" => {
            let child = exports.lock().map_err(|_| "exports lock poisoned".to_string())?.remove(&key);
            match child {
                Some(mut c) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    Ok(format!("export of {disk} stopped, its overlay removed"))
                }
                None => Ok(format!("no export of {disk} for this run (already removed)")),
            }
        }
        "failover" => {
            let point = point_arg(data, disk, arg(j, "point").unwrap_or("latest"))?;
            let dir = failover_dir(data);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let out = dir.join(format!("{disk}-{run}.raw"));
            let v = ops::failover(data, disk, &point, &out, None, false).map_err(|e| e.to_string())?;
            Ok(format!("failed over to point {point}: image {} ({})", out.display(), v.command))
        }
        "failover-commit" | "failover-cancel" => {
            let commit = j.kind == "failover-commit";
            ops::failover_finish(data, disk, commit).map_err(|e| e.to_string())?;
            Ok(if commit { format!("{disk}: failover committed") } else { format!("{disk}: failover cancelled; replication resumes") })
        }
        k => Err(format!("a master target does not run {k} jobs")),
    }
}
