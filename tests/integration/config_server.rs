//! The configuration server with real roles: enrollment through the CA it
//! hosts, heartbeats over mutual TLS, a policy the agent applies, points,
//! failover and test failover of a recovery plan through the master
//! target's jobs, alerts delivered to a signed webhook, two instances on
//! one PostgreSQL, and a server away for a minute.

use ferry_tests::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PASSWORD: &str = "correct horse battery staple";

/// A running `ferry config-server`, its log in `TAG.cs.log`.
struct Cs {
    proc: Proc,
    addr: String,
    log: PathBuf,
    /// The CA certificate to check it by (HTTPS), if it has an identity.
    ca_pem: Option<String>,
    token: String,
}

impl Cs {
    fn start(t: &TempDir, tag: &str, db: &str, extra: &[&str]) -> Cs {
        Self::start_at(t, tag, db, &format!("127.0.0.1:{}", free_port()), extra)
    }

    fn start_at(t: &TempDir, tag: &str, db: &str, addr: &str, extra: &[&str]) -> Cs {
        std::fs::write(t.path("admin.pw"), format!("{PASSWORD}\n")).unwrap();
        let log = t.path(&format!("{tag}.cs.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = ferry()
            .env("RUST_LOG", "info")
            .args(["config-server", "--listen", addr, "--db", db, "--admin-password-file", &t.s("admin.pw")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn config server");
        let ca_pem = extra.iter().position(|a| *a == "--ca").map(|i| format!("{}/ca.pem", extra[i + 1]));
        let mut cs = Cs { proc: Proc(child), addr: addr.to_string(), log, ca_pem, token: String::new() };
        wait_for("the configuration server to listen", 60, || {
            assert!(cs.proc.alive(), "the configuration server ended:\n{}", cs.log());
            cs.log().contains("listening on")
        });
        cs.token = cs.login("admin", PASSWORD);
        cs
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ferry ctl ARGS` against this server with the admin's token.
    fn ctl_as(&self, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = ferry();
        c.env("FERRY_CONFIG_SERVER", &self.addr).env("FERRY_TOKEN", token).arg("ctl");
        if let Some(ca) = &self.ca_pem {
            c.args(["--ca", ca]);
        }
        let mut p = c.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        p.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        p.wait_with_output().unwrap()
    }

    fn ctl(&self, args: &[&str]) -> Value {
        let o = self.ctl_as(&self.token, args, None);
        assert!(o.status.success(), "ferry ctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    fn login(&self, user: &str, pw: &str) -> String {
        let o = self.ctl_as("", &["login", "--user", user], Some(pw));
        assert!(o.status.success(), "login {user}: {}\n{}", String::from_utf8_lossy(&o.stderr), self.log());
        String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("").trim().to_string()
    }

    fn disk(&self, name: &str) -> Option<Value> {
        self.ctl(&["call", "GET", "/api/v1/disks"]).as_array()?.iter().find(|d| d["name"] == name).cloned()
    }
}

/// A webhook receiver on loopback: every POST with its signature checked.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl Hook {
    fn start(secret: &str) -> Hook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let got: Arc<Mutex<Vec<(Instant, Value)>>> = Arc::default();
        let (g, secret) = (got.clone(), secret.to_string());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let _ = Self::one(s, &secret, &g);
            }
        });
        Hook { url, got }
    }

    fn one(mut s: TcpStream, secret: &str, got: &Mutex<Vec<(Instant, Value)>>) -> std::io::Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut rd = BufReader::new(s.try_clone()?);
        let mut headers = HashMap::new();
        let mut line = String::new();
        rd.read_line(&mut line)?;
        loop {
            line.clear();
            rd.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let n: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; n];
        rd.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body).to_string();
        let ts = headers.get("x-ferry-timestamp").cloned().unwrap_or_default();
        let want = ferry_config::alerts::signature(secret, ts.parse().unwrap_or(0), &body);
        let sig_ok = headers.get("x-ferry-signature") == Some(&want);
        let mut v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["signature_ok"] = json!(sig_ok);
        v["header_delivery"] = json!(headers.get("x-ferry-delivery").cloned().unwrap_or_default());
        got.lock().unwrap().push((Instant::now(), v));
        s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")?;
        Ok(())
    }

    fn events(&self) -> Vec<(Instant, Value)> {
        self.got.lock().unwrap().clone()
    }

    /// The first event `event` ("raised"/"cleared") of `kind` on `subject`.
    fn find(&self, event: &str, kind: &str, subject: &str) -> Option<(Instant, Value)> {
        self.events().into_iter().find(|(_, v)| v["event"] == event && v["alert"]["kind"] == kind && v["alert"]["subject"] == subject)
    }
}

/// An agent on an image file, scanning, pointing every `every` seconds.
fn agent(t: &TempDir, name: &str, target: &str, cs: &str, extra: &[&str]) -> Proc {
    let img = t.path(&format!("{name}.img"));
    if !img.exists() {
        mixed_image(&img, 8 << 20, name.len() as u64);
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(t.path(&format!("{name}.agent.log"))).unwrap();
    Proc(
        ferry()
            .env("RUST_LOG", "info")
            .args(["agent", "--disk", &img.to_string_lossy(), "--name", name, "--target", target, "--tracker", "scan"])
            .args(["--state", &t.s(&format!("{name}.state")), "--point-every", "1", "--config-server", cs])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn agent_log(t: &TempDir, name: &str) -> String {
    std::fs::read_to_string(t.path(&format!("{name}.agent.log"))).unwrap_or_default()
}

fn wait_run(cs: &Cs, id: &str, states: &[&str], secs: u64) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("run {id} to reach {states:?}"), secs, || {
        last = cs.ctl(&["run-action", id]);
        let st = last["state"].as_str().unwrap_or("");
        assert!(st != "failed" && st != "interrupted", "run {id}: {}", last["log"].as_str().unwrap_or(""));
        states.contains(&st)
    });
    last
}

/// Enroll through the hosted CA, register, change a policy and see the
/// agent apply it, list points, run a test failover and clean it up, run a
/// failover and cancel it; all over mutual TLS.
fn api_scenario(db: &str, t: &TempDir) {
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "config-server", "--name", "cs1", "--identity", &t.s("id-cs")]);
    let enroll = format!("127.0.0.1:{}", free_port());
    let cs = Cs::start(
        t,
        "cs",
        db,
        &["--identity", &t.s("id-cs"), "--ca", &t.s("ca"), "--enroll-listen", &enroll, "--heartbeat-every", "500ms"],
    );
    // Enroll: join tokens from the API, redeemed at the hosted CA.
    for (role, name, dir) in [("master-target", "mt1", "id-mt"), ("agent", "web1", "id-ag")] {
        let o = cs.ctl_as(&cs.token, &["join-token", "--role", role, "--name", name], None);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(token.starts_with("ferry-join-1."), "{token}");
        run_ok(&["enroll", "--server", &enroll, "--token", &token, "--identity", &t.s(dir)]);
    }
    // A viewer may not make join tokens.
    cs.ctl(&["call", "POST", "/api/v1/users", "--data", &json!({"name": "vera", "role": "viewer", "password": PASSWORD}).to_string()]);
    let vt = cs.login("vera", PASSWORD);
    let o = cs.ctl_as(&vt, &["join-token", "--role", "agent", "--name", "x"], None);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("403"), "{o:?}");

    // Register: the roles report with their certificates.
    let mt = MasterTarget::start_args(
        &t.path("data"),
        &format!("127.0.0.1:{}", free_port()),
        &["--identity", &t.s("id-mt"), "--config-server", &cs.addr],
    );
    let _ag = agent(t, "web1", &mt.addr, &cs.addr, &["--identity", &t.s("id-ag")]);
    wait_for("the disk to be registered by its agent and its master target", 60, || {
        cs.disk("web1").is_some_and(|d| d["agent"] == "web1" && d["master_target"] == "mt1" && d["rpo_ms"].is_number())
    });
    let machines = cs.ctl(&["machines"]);
    let roles: Vec<String> =
        machines.as_array().unwrap().iter().map(|m| format!("{}/{}", m["role"].as_str().unwrap(), m["name"].as_str().unwrap())).collect();
    assert!(roles.contains(&"agent/web1".into()) && roles.contains(&"master-target/mt1".into()), "{roles:?}");
    let ag = machines.as_array().unwrap().iter().find(|m| m["role"] == "agent").unwrap();
    assert!(ag["report"]["cert_expires_unix"].as_i64().unwrap() > 0, "{ag}");

    // Change a policy: the agent applies it while it runs.
    cs.ctl(&["group", "web", "--rpo", "120", "--point-every", "2", "--retention", "6h"]);
    cs.ctl(&["assign", "agent/web1", "web"]);
    wait_for("the agent to apply the policy", 30, || {
        agent_state(&t.path("web1.state")).is_some_and(|s| s["point_every_s"].as_f64() == Some(2.0))
    });
    assert!(agent_log(t, "web1").contains("policy of group web version 1 applied"), "{}", agent_log(t, "web1"));
    wait_for("the master target to apply the group's retention", 30, || mt.log().contains("web1: retention 6h (policy)"));
    // Its last policy is kept for a restart without the server.
    assert!(t.path("web1.state/policy.state").exists());

    // Points: what the API lists is what the master target holds.
    wait_for("points", 60, || cs.ctl(&["points", "web1"]).as_array().is_some_and(|a| a.len() >= 2));
    let listed: Vec<u64> =
        cs.ctl(&["points", "web1"]).as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().parse().unwrap()).collect();
    let held = point_ids(&t.s("data"), "web1");
    assert!(listed.iter().all(|id| held.contains(id)), "{listed:?} vs {held:?}");

    // A recovery plan: test failover, then clean up.
    std::fs::write(t.path("plan.json"), json!({"steps": [{"name": "web", "machines": ["web1"], "pre": "echo ready-to-go"}]}).to_string())
        .unwrap();
    cs.ctl(&["plan", "site", "--file", &t.s("plan.json")]);
    let run = cs.ctl(&["run", "site", "--kind", "test-failover"]);
    let id = run["id"].as_str().unwrap().to_string();
    let r = wait_run(&cs, &id, &["ready"], 60);
    let log = r["log"].as_str().unwrap();
    assert!(log.contains("pre script done: ready-to-go"), "{log}");
    let url = log.split_whitespace().find(|w| w.starts_with("nbd://")).unwrap_or_else(|| panic!("no export in {log}")).to_string();
    let size = sh(&format!("nbdinfo --size {url}"));
    assert_eq!(size.trim(), (8u64 << 20).to_string(), "the export serves the disk");
    let before = point_ids(&t.s("data"), "web1").len();
    wait_for("replication to go on during the test failover", 30, || point_ids(&t.s("data"), "web1").len() > before);
    cs.ctl(&["run-action", &id, "cleanup"]);
    wait_run(&cs, &id, &["cleaned"], 60);
    assert!(
        std::process::Command::new("nbdinfo").args(["--size", &url]).output().map(|o| !o.status.success()).unwrap_or(true),
        "export removed"
    );

    // A failover, then cancel: the stream is refused, then resumes.
    let run = cs.ctl(&["run", "site", "--kind", "failover", "--point", "latest"]);
    let id = run["id"].as_str().unwrap().to_string();
    let r = wait_run(&cs, &id, &["failed-over"], 60);
    assert!(r["log"].as_str().unwrap().contains("failed over to point"), "{r}");
    let o = cs.ctl_as(&cs.token, &["run", "site", "--kind", "test-failover"], None);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("409"), "a second run of the plan is refused: {o:?}");
    // The answer that carries the cancel is lost: while the master target
    // is stopped, another client with its certificate takes that answer
    // and drops it. The job is handed out again and runs once.
    // SAFETY: kill(2) on the pid of a child this test owns.
    unsafe { libc::kill(mt.proc.pid(), libc::SIGSTOP) };
    cs.ctl(&["run-action", &id, "cancel"]);
    let thief = ferry_control::Client::new(&cs.addr, &ferry_control::Tls::Identity(t.path("id-mt"))).unwrap();
    let me =
        ferry_common::report::RoleReport { role: "master-target".into(), name: "mt1".into(), version: "test".into(), ..Default::default() };
    let t0 = std::time::Instant::now();
    let lost = loop {
        let reply = thief.heartbeat(&me).unwrap();
        if !reply.jobs.is_empty() {
            break reply.jobs;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the cancel job was never handed out");
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: as above.
    unsafe { libc::kill(mt.proc.pid(), libc::SIGCONT) };
    assert_eq!(lost.len(), 1, "{lost:?}");
    wait_run(&cs, &id, &["cancelled"], 60);
    let again: Vec<String> = cs.log().lines().filter(|l| l.contains("handed out again")).map(String::from).collect();
    assert!(again.len() == 1 && again[0].contains(&lost[0].id), "{again:?}");
    let n = point_ids(&t.s("data"), "web1").len();
    wait_for("replication to resume after the cancel", 60, || point_ids(&t.s("data"), "web1").len() > n);

    // Every job was acknowledged and ran once (the master target's log
    // says each once).
    let jobs = cs.ctl(&["call", "GET", "/api/v1/jobs"]);
    let jobs = jobs.as_array().unwrap();
    assert!(jobs.len() >= 4, "{jobs:?}");
    for j in jobs {
        assert!(j["state"] == "done" && j["acked_ms"].as_i64() >= j["created_ms"].as_i64(), "{j}");
        let id = j["id"].as_str().unwrap();
        assert_eq!(mt.log().matches(&format!("job {id} (")).count(), 1, "job {id} ran once: {}", mt.log());
    }
    // Every heartbeat so far was taken, and the charts have rates.
    let m = cs_metrics(&cs);
    assert!(m.contains("\nferry_cs_heartbeat_errors_total 0\n"), "{m}");
    let samples = cs.ctl(&["call", "GET", "/api/v1/disks/web1/samples"]);
    let s = samples.as_array().unwrap();
    assert!(s.len() >= 5 && s.iter().filter(|x| x["churn_bps"].is_number() && x["rpo_ms"].is_number()).count() >= 3, "{samples}");

    // A role's certificate is its name: the agent cannot report as the master target.
    let c = ferry_control::Client::new(&cs.addr, &ferry_control::Tls::Identity(t.path("id-ag"))).unwrap();
    let forged = ferry_common::report::RoleReport { role: "master-target".into(), name: "mt1".into(), ..Default::default() };
    match c.heartbeat(&forged) {
        Err(ferry_control::ControlError::Refused { status, msg }) => assert_eq!(status, 403, "{msg}"),
        r => panic!("a forged heartbeat was not refused: {r:?}"),
    }

    // The server's own metrics parse.
    promtool_ok(&cs_metrics(&cs));
    drop(cs);
}

fn cs_metrics(cs: &Cs) -> String {
    let c = ferry_control::Client::new(
        &cs.addr,
        &match &cs.ca_pem {
            Some(p) => ferry_control::Tls::Ca(p.into()),
            None => ferry_control::Tls::None,
        },
    )
    .unwrap();
    c.text("/metrics").unwrap()
}

fn promtool_ok(text: &str) {
    promtool_check("the configuration server", text);
    assert!(text.contains("ferry_cs_disk_rpo_seconds{disk=\""), "{text}");
}

#[test]
fn api_on_sqlite() {
    let t = TempDir::new("cs-api-sqlite");
    api_scenario(&format!("sqlite:{}", t.s("cs.db")), &t);
}

#[test]
fn api_on_postgresql() {
    let t = TempDir::new("cs-api-pg");
    let pg = Postgres::start().expect("a private PostgreSQL");
    api_scenario(&pg.url(), &t);
}

/// Stop an agent: "heartbeat lost" reaches the webhook within the
/// configured time. Throttle the link (the group's policy limits the disk
/// to a trickle at the process server while it changes): "rpo" is raised,
/// and cleared once the policy lifts the limit.
#[test]
fn alerts_reach_a_signed_webhook() {
    let t = TempDir::new("cs-alerts");
    let secret = "a-long-webhook-secret";
    let hook = Hook::start(secret);
    let cs = Cs::start(&t, "cs", &format!("sqlite:{}", t.s("cs.db")), &["--heartbeat-timeout", "4s", "--heartbeat-every", "500ms"]);
    cs.ctl(&["webhook", &hook.url, "--secret", secret]);
    let mt = MasterTarget::start_args(&t.path("data"), &format!("127.0.0.1:{}", free_port()), &["--config-server", &cs.addr]);
    let ps_addr = format!("127.0.0.1:{}", free_port());
    let ps = ProcessServer::start_args(&t.path("spool"), &ps_addr, &mt.addr, "1G", &["--config-server", &cs.addr]);
    cs.ctl(&["group", "g", "--rpo", "6", "--point-every", "1"]);
    let mut a1 = agent(&t, "a1", &ps_addr, &cs.addr, &[]);
    let _a2 = agent(&t, "a2", &mt.addr, &cs.addr, &[]);
    wait_for("both agents to register", 60, || cs.disk("a1").is_some() && cs.disk("a2").is_some());
    let machines = cs.ctl(&["machines"]);
    let host = machines.as_array().unwrap().iter().find(|m| m["role"] == "agent").unwrap()["name"].as_str().unwrap().to_string();
    cs.ctl(&["assign", &format!("agent/{host}"), "g"]);
    wait_for("a1's first points", 60, || cs.disk("a1").is_some_and(|d| d["rpo_ms"].is_number()));
    assert!(hook.find("raised", "rpo", "a1").is_none());

    // The throttled link: the group's policy gives a1's disk a trickle of
    // bandwidth at the process server; its changes queue, its RPO grows past 6 s.
    cs.ctl(&["group", "g", "--bandwidth", "20KB"]);
    wait_for("the process server to apply the policy's bandwidth", 30, || ps.log().contains("bandwidth from the policies"));
    let img = t.path("a1.img");
    let writer = {
        let img = img.clone();
        std::thread::spawn(move || {
            for i in 0..40u64 {
                change_blocks(&img, 0.05, 100 + i);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    wait_for("the RPO alert to reach the webhook", 90, || hook.find("raised", "rpo", "a1").is_some());
    let (_, raised) = hook.find("raised", "rpo", "a1").unwrap();
    assert_eq!(raised["signature_ok"], true, "{raised}");
    assert!(raised["alert"]["message"].as_str().unwrap().contains("threshold 6 s"), "{raised}");
    writer.join().unwrap();
    // The link freed: the policy without a bandwidth limit.
    cs.ctl(&["group", "g", "--bandwidth", ""]);
    wait_for("the RPO alert to clear", 120, || hook.find("cleared", "rpo", "a1").is_some());
    assert!(hook.find("raised", "rpo", "a2").is_none(), "the unthrottled disk kept its RPO");

    // Heartbeat lost: a1's agent stops; the webhook hears within the timeout (4 s) and a little.
    let subject = format!("agent/{host}");
    let before = hook.events().len();
    // Both agents run on this machine under one name: stop both.
    a1.kill9();
    drop(_a2);
    let stopped = Instant::now();
    wait_for("heartbeat lost at the webhook", 30, || hook.find("raised", "heartbeat", &subject).is_some());
    let (at, v) = hook.find("raised", "heartbeat", &subject).unwrap();
    let took = at.duration_since(stopped);
    assert!(took <= Duration::from_secs(4 + 6), "heartbeat lost took {took:?}");
    assert_eq!(v["signature_ok"], true);
    assert!(hook.events().len() > before);
    // Every delivery once.
    let ids: Vec<String> = hook.events().iter().map(|(_, v)| v["delivery"].as_str().unwrap().to_string()).collect();
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(ids.len(), uniq.len(), "{ids:?}");
    let alerts = cs.ctl(&["alerts"]);
    assert!(alerts.as_array().unwrap().iter().any(|a| a["kind"] == "heartbeat" && a["state"] == "raised"), "{alerts}");
    let _ = mt;
}

/// Two instances on one PostgreSQL: one is killed; the other serves the
/// website and the API, and every alert event reaches the webhook exactly once.
#[test]
fn two_instances_share_one_postgresql() {
    let t = TempDir::new("cs-ha");
    let pg = Postgres::start().expect("a private PostgreSQL");
    let secret = "another-long-secret";
    let hook = Hook::start(secret);
    let opts = ["--heartbeat-timeout", "3s", "--heartbeat-every", "500ms"];
    let mut a = Cs::start(&t, "a", &pg.url(), &opts);
    let b = Cs::start(&t, "b", &pg.url(), &opts);
    b.ctl(&["webhook", &hook.url, "--secret", secret]);
    // The master target reports to b, the agent to a (as a load balancer may spread them).
    let mt = MasterTarget::start_args(&t.path("data"), &format!("127.0.0.1:{}", free_port()), &["--config-server", &b.addr]);
    let mut ag = agent(&t, "d1", &mt.addr, &a.addr, &[]);
    wait_for("the disk on both instances", 60, || a.disk("d1").is_some() && b.disk("d1").is_some());
    // Both evaluate alerts: the agent stops, one heartbeat alert.
    ag.kill9();
    wait_for("heartbeat lost", 30, || hook.events().iter().any(|(_, v)| v["alert"]["kind"] == "heartbeat" && v["event"] == "raised"));
    // Instance a dies; b goes on, and the agent comes back to b.
    a.proc.kill9();
    let c = ferry_control::Client::new(&b.addr, &ferry_control::Tls::None).unwrap();
    assert!(c.text("/login").unwrap().contains("<form"), "b serves the website");
    assert!(b.disk("d1").is_some(), "b serves the API");
    let _ag = agent(&t, "d1", &mt.addr, &b.addr, &[]);
    wait_for("heartbeat cleared", 60, || hook.events().iter().any(|(_, v)| v["alert"]["kind"] == "heartbeat" && v["event"] == "cleared"));
    std::thread::sleep(Duration::from_secs(3));
    let ev = hook.events();
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for (_, v) in &ev {
        *per.entry((v["alert"]["id"].as_str().unwrap().to_string(), v["event"].as_str().unwrap().to_string())).or_default() += 1;
    }
    assert!(per.values().all(|n| *n == 1), "each alert event once: {per:?}");
    let hb: Vec<_> = ev.iter().filter(|(_, v)| v["alert"]["kind"] == "heartbeat").collect();
    assert_eq!(
        hb.len(),
        2 * hb.iter().filter(|(_, v)| v["event"] == "raised").count(),
        "every raised heartbeat alert was cleared, none lost: {hb:?}"
    );
    let _ = (mt, pg);
    a.log();
}

/// The configuration server killed for a minute: points go on, and the
/// charts afterwards show a gap, not invented samples.
#[test]
fn replication_goes_on_while_the_configuration_server_is_away() {
    let t = TempDir::new("cs-away");
    let db = format!("sqlite:{}", t.s("cs.db"));
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cs = Cs::start_at(&t, "cs", &db, &addr, &["--heartbeat-every", "500ms"]);
    let mt = MasterTarget::start_args(&t.path("data"), &format!("127.0.0.1:{}", free_port()), &["--config-server", &addr]);
    let _ag = agent(&t, "d1", &mt.addr, &addr, &[]);
    wait_for("samples", 60, || cs.ctl(&["call", "GET", "/api/v1/disks/d1/samples"]).as_array().is_some_and(|a| a.len() >= 3));
    cs.proc.kill9();
    let down = ferry_common::now_ns() / 1_000_000;
    let points_before = point_ids(&t.s("data"), "d1").len();
    std::thread::sleep(Duration::from_secs(60));
    let points_during = point_ids(&t.s("data"), "d1").len();
    assert!(points_during >= points_before + 20, "points went on: {points_before} -> {points_during}");
    let up = ferry_common::now_ns() / 1_000_000;
    drop(cs);
    let cs = Cs::start_at(&t, "cs2", &db, &addr, &["--heartbeat-every", "500ms"]);
    wait_for("samples after the restart", 30, || {
        cs.ctl(&["call", "GET", "/api/v1/disks/d1/samples"]).as_array().is_some_and(|a| a.iter().any(|s| s["at_ms"].as_u64() > Some(up)))
    });
    let s = cs.ctl(&["call", "GET", "/api/v1/disks/d1/samples"]);
    let during: Vec<&Value> =
        s.as_array().unwrap().iter().filter(|s| s["at_ms"].as_u64().is_some_and(|a| a > down + 1000 && a < up)).collect();
    assert!(during.is_empty(), "no sample was invented for the minute away: {during:?}");
    // The agent never stopped: it logged the server away, and came back.
    let log = agent_log(&t, "d1");
    assert!(log.contains("replication goes on with the last policy") && log.contains("reached again"), "{log}");
}
