//! The configuration server's website (`ferry config-server`, pages in
//! userspace/config-server/src/web.rs): logins, roles and CSRF over plain
//! HTTP against the real binary, and the browser acceptance test
//! (tests/web/config_server.py, Playwright with Debian's chromium) against
//! a master target and two agents reporting with `--config-server`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_common::report::{DiskReport, PointInfo, RoleReport};
use ferry_ring::Ring;
use ferry_tests::versioned::Workload;
use ferry_tests::*;

const ADMIN_PW: &str = "admin-password-1";

/// A running `ferry config-server` on SQLite, its log in DIR/cs.log.
struct ConfigServer {
    _proc: Proc,
    addr: String,
    log: std::path::PathBuf,
}

impl ConfigServer {
    fn start(dir: &Path, extra: &[&str]) -> ConfigServer {
        let pw = dir.join("admin.pw");
        std::fs::write(&pw, format!("{ADMIN_PW}\n")).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("cs.log");
        let f = OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let p = Proc(
            ferry()
                .env("RUST_LOG", "info")
                .args(["config-server", "--listen", &addr, "--db", &format!("sqlite:{}", dir.join("cs.db").display())])
                .arg("--admin-password-file")
                .arg(&pw)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(f)
                .spawn()
                .expect("spawn config server"),
        );
        let cs = ConfigServer { _proc: p, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(&cs.addr).is_ok() && http(&cs.addr, "GET", "/healthz", &[], None).status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "the config server did not start:\n{}", cs.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        cs
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 request (connection closed after), `body` as (content type, bytes).
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<(&str, &str)>) -> Resp {
    let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let b = body.map(|(t, b)| {
        req.push_str(&format!("Content-Type: {t}\r\n"));
        b
    });
    req.push_str(&format!("Content-Length: {}\r\n\r\n", b.map_or(0, str::len)));
    req.push_str(b.unwrap_or(""));
    c.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).to_string();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head: {out:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status of {head:?}"));
    Resp { status, head: head.to_string(), body: body.to_string() }
}

/// application/x-www-form-urlencoded.
fn form(fields: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    fields.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

/// A browser's session: its cookie and its CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

fn login(addr: &str, user: &str, pw: &str) -> Session {
    let r = http(addr, "POST", "/login", &[], Some(("application/x-www-form-urlencoded", &form(&[("user", user), ("password", pw)]))));
    assert_eq!(r.status, 303, "login of {user}: {}\n{}", r.head, r.body);
    assert_eq!(r.header("location").as_deref(), Some("/"));
    let set = r.header("set-cookie").expect("a session cookie");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let who = http(addr, "GET", "/api/v1/whoami", &[("Cookie", &cookie)], None);
    assert_eq!(who.status, 200, "{}", who.body);
    let v: serde_json::Value = serde_json::from_str(&who.body).unwrap();
    Session { cookie, csrf: v["csrf"].as_str().unwrap().to_string() }
}

impl Session {
    fn get(&self, addr: &str, path: &str) -> Resp {
        http(addr, "GET", path, &[("Cookie", &self.cookie)], None)
    }
    fn post(&self, addr: &str, path: &str, fields: &[(&str, &str)]) -> Resp {
        http(addr, "POST", path, &[("Cookie", &self.cookie)], Some(("application/x-www-form-urlencoded", &form(fields))))
    }
    /// A form post carrying the session's CSRF token.
    fn submit(&self, addr: &str, path: &str, fields: &[(&str, &str)]) -> Resp {
        let mut f = vec![("csrf", self.csrf.as_str())];
        f.extend_from_slice(fields);
        self.post(addr, path, &f)
    }
    fn api(&self, addr: &str, method: &str, path: &str, json: &serde_json::Value) -> Resp {
        http(addr, method, path, &[("Cookie", &self.cookie), ("X-CSRF-Token", &self.csrf)], Some(("application/json", &json.to_string())))
    }
}

fn heartbeat(addr: &str, r: &RoleReport) {
    let resp = http(addr, "POST", "/api/v1/heartbeat", &[], Some(("application/json", &serde_json::to_string(r).unwrap())));
    assert_eq!(resp.status, 200, "heartbeat: {}", resp.body);
}

fn now_ms() -> i64 {
    (ferry_common::now_ns() / 1_000_000) as i64
}

/// An agent's and a master target's reports of `disks`, the newest point `age_ms` old.
fn fake_reports(tag: &str, disks: &[&str], age_ms: i64, state: &str) -> (RoleReport, RoleReport) {
    let now = now_ms();
    let disk = |n: &str| DiskReport {
        name: n.into(),
        state: state.into(),
        lag_ms: Some(120),
        backlog_bytes: Some(4096),
        last_point_unix_ms: Some(now - age_ms),
        ..Default::default()
    };
    let agent = RoleReport {
        role: "agent".into(),
        name: format!("{tag}-agent"),
        version: "test".into(),
        at_unix_ms: now,
        disks: disks.iter().map(|n| disk(n)).collect(),
        ..Default::default()
    };
    let mt = RoleReport {
        role: "master-target".into(),
        name: format!("{tag}-mt"),
        version: "test".into(),
        at_unix_ms: now,
        disks: disks
            .iter()
            .map(|n| DiskReport {
                points: Some(2),
                recent_points: vec![
                    PointInfo { id: "1".into(), time_unix_ms: now - age_ms - 1000, kind: "crash".into() },
                    PointInfo { id: "2".into(), time_unix_ms: now - age_ms, kind: "app".into() },
                ],
                ..disk(n)
            })
            .collect(),
        ..Default::default()
    };
    (agent, mt)
}

/// Every page needs a login; a viewer sees but cannot change; a form
/// without the session's CSRF token is refused; what roles report is
/// escaped; every page carries the security headers.
#[test]
fn pages_need_a_login_a_role_and_the_csrf_token() {
    let t = TempDir::new("cs-web");
    let cs = ConfigServer::start(&t.0, &["--heartbeat-every", "1s"]);
    let a = cs.addr.as_str();

    // Not logged in: every page sends to /login; a form post changes nothing.
    for p in ["/", "/disks/x", "/machines", "/groups", "/alerts", "/plans", "/runs/x", "/users", "/account"] {
        let r = http(a, "GET", p, &[], None);
        assert_eq!((r.status, r.header("location").as_deref()), (303, Some("/login")), "{p}: {}", r.head);
    }
    let r = http(a, "POST", "/groups", &[], Some(("application/x-www-form-urlencoded", "name=g&rpo_threshold_s=1")));
    assert_eq!((r.status, r.header("location").as_deref()), (303, Some("/login")), "{}", r.head);
    let r = http(a, "GET", "/login", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("id=\"login-form\""), "{}", r.body);
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{}", r.head);
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    let r = http(
        a,
        "POST",
        "/login",
        &[],
        Some(("application/x-www-form-urlencoded", &form(&[("user", "admin"), ("password", "wrong-password")]))),
    );
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none() && r.body.contains("wrong user name or password"), "{}", r.body);

    // Two disks as an agent and a master target report them (one with markup in its state).
    let (ag, mt) = fake_reports("web", &["web-d1", "web-d2"], 3000, "streaming <script>alert(1)</script>");
    heartbeat(a, &ag);
    heartbeat(a, &mt);

    let admin = login(a, "admin", ADMIN_PW);
    let r = admin.get(a, "/");
    assert_eq!(r.status, 200, "{}", r.body);
    for d in ["web-d1", "web-d2"] {
        assert!(r.body.contains(&format!("<tr data-disk=\"{d}\">")), "{d} listed:\n{}", r.body);
        assert!(r.body.contains(&format!("id=\"rpo-{d}\"")), "{}", r.body);
    }
    assert!(r.body.contains("web-agent"), "{}", r.body);
    assert!(!r.body.contains("<script>alert") && r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "escaped:\n{}", r.body);
    // Scripts come from files only.
    for s in r.body.split("<script").skip(1) {
        assert!(s.trim_start().starts_with("src=\"/static/"), "an inline script: <script{s}");
    }
    assert!(r.header("content-security-policy").unwrap_or_default().contains("script-src 'self'"), "{}", r.head);
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"), "{}", r.head);
    let js = http(a, "GET", "/static/app.js", &[], None);
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").unwrap_or_default().starts_with("text/javascript") && js.body.contains("/api/v1/disks"));

    // A disk's page: its charts with the recovery points, its points table.
    let r = admin.get(a, "/disks/web-d1");
    assert_eq!(r.status, 200, "{}", r.body);
    for c in ["chart-lag", "chart-rpo", "chart-churn"] {
        assert!(r.body.contains(&format!("<svg id=\"{c}\"")), "{c}:\n{}", r.body);
    }
    assert!(r.body.matches("class=\"point\"").count() >= 3, "a point per chart:\n{}", r.body);
    assert!(r.body.contains("class=\"point-row\""), "{}", r.body);
    assert_eq!(admin.get(a, "/disks/nothing").status, 404);

    // A form without the CSRF token (or with another) is refused, nothing changed.
    let policy = [("name", "gold"), ("rpo_threshold_s", "60"), ("point_every_s", "10"), ("app_point_every_s", "0")];
    let r = admin.post(a, "/groups", &policy);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("CSRF"), "{}", r.body);
    let mut forged = vec![("csrf", "not-the-token")];
    forged.extend_from_slice(&policy);
    assert_eq!(admin.post(a, "/groups", &forged).status, 403);
    assert!(!admin.get(a, "/api/v1/groups").body.contains("gold"));
    // With it: done.
    let r = admin.submit(a, "/groups", &policy);
    assert_eq!((r.status, r.header("location").as_deref()), (303, Some("/groups")), "{}", r.body);
    assert!(admin.get(a, "/groups").body.contains("data-group=\"gold\""));
    // A bad policy says why.
    let r = admin.submit(a, "/groups", &[("name", "bad"), ("rpo_threshold_s", "0"), ("point_every_s", "10"), ("app_point_every_s", "0")]);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("rpo_threshold_s must be at least 1"), "{}", r.body);
    // Machines into the group, from the machines page.
    let r = admin.submit(a, "/machines/agent/web-agent/group", &[("group", "gold")]);
    assert_eq!(r.status, 303, "{}", r.body);
    let machines = admin.get(a, "/api/v1/machines").body;
    assert!(machines.contains("\"group\":\"gold\""), "{machines}");
    // The threshold on the dashboard follows the group.
    assert!(admin.get(a, "/").body.contains("data-s=\"60\""));

    // A plan, from the form (validated).
    let plan = r#"{"steps":[{"name":"all","disks":["web-d1","web-d2"]}]}"#;
    assert_eq!(admin.submit(a, "/plans", &[("name", "web-plan"), ("plan", plan)]).status, 303);
    let r = admin.submit(a, "/plans", &[("name", "empty"), ("plan", r#"{"steps":[]}"#)]);
    assert_eq!(r.status, 400, "{}", r.body);
    let r = admin.get(a, "/plans");
    assert!(r.body.contains("data-plan=\"web-plan\"") && r.body.contains("id=\"test-failover-web-plan\""), "{}", r.body);

    // A viewer: sees everything, no operator form, and a forged post is refused.
    assert_eq!(
        admin.api(a, "POST", "/api/v1/users", &serde_json::json!({"name": "vera", "role": "viewer", "password": "viewer-password"})).status,
        200
    );
    let r = admin.submit(a, "/users", &[("name", "otto"), ("role", "operator"), ("password", "operator-password")]);
    assert_eq!(r.status, 303, "{}", r.body);
    let viewer = login(a, "vera", "viewer-password");
    let p = viewer.get(a, "/plans");
    assert_eq!(p.status, 200);
    assert!(p.body.contains("data-plan=\"web-plan\""), "{}", p.body);
    assert!(!p.body.contains("test-failover") && !p.body.contains("id=\"new-plan\""), "no operator form for a viewer:\n{}", p.body);
    let g = viewer.get(a, "/groups").body;
    assert!(g.contains("data-group=\"gold\"") && !g.contains("id=\"new-group\""), "{g}");
    assert!(!viewer.get(a, "/machines").body.contains("set-group"));
    let runs_before = admin.get(a, "/api/v1/runs").body;
    for (path, fields) in [
        ("/plans/web-plan/run", vec![("kind", "test-failover"), ("point", "latest")]),
        ("/groups", policy.to_vec()),
        ("/plans", vec![("name", "x"), ("plan", plan)]),
        ("/machines/agent/web-agent/group", vec![("group", "")]),
        ("/users", vec![("name", "eve"), ("role", "admin"), ("password", "eve-password-1")]),
    ] {
        let r = viewer.submit(a, path, &fields);
        assert_eq!(r.status, 403, "viewer POST {path}: {}", r.body);
    }
    assert_eq!(admin.get(a, "/api/v1/runs").body, runs_before, "no run started");
    assert!(admin.get(a, "/api/v1/machines").body.contains("\"group\":\"gold\""));
    assert_eq!(viewer.get(a, "/users").status, 403);
    // Anyone makes a token of their own (shown once), and it works.
    let r = viewer.submit(a, "/account/token", &[("label", "script")]);
    assert_eq!(r.status, 200, "{}", r.body);
    let tok = r.body.split("id=\"new-token\" class=\"token\">").nth(1).and_then(|s| s.split('<').next()).expect("the token").to_string();
    assert!(tok.starts_with("ferry-api-1."), "{tok}");
    let who = http(a, "GET", "/api/v1/whoami", &[("Authorization", &format!("Bearer {tok}"))], None);
    assert!(who.body.contains("\"vera\""), "{}", who.body);
    // An admin makes one for another user.
    let r = admin.submit(a, "/users/otto/token", &[("label", "ci")]);
    assert!(r.status == 200 && r.body.contains("ferry-api-1."), "{}", r.body);

    // An alert acknowledged from the alerts page (the RPO of 3 s is over a 1 s threshold).
    let one = [("name", "gold"), ("rpo_threshold_s", "1"), ("point_every_s", "10"), ("app_point_every_s", "0")];
    assert_eq!(admin.submit(a, "/groups", &one).status, 303);
    let mut id = String::new();
    wait_for("an rpo alert", 20, || {
        let (ag, _) = fake_reports("web", &["web-d1", "web-d2"], 3000, "streaming");
        heartbeat(a, &ag);
        let v: serde_json::Value = serde_json::from_str(&admin.get(a, "/api/v1/alerts").body).unwrap_or_default();
        match v.as_array().and_then(|l| l.iter().find(|x| x["kind"] == "rpo" && x["state"] == "raised")) {
            Some(x) => {
                id = x["id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    let page = admin.get(a, "/alerts").body;
    assert!(page.contains(&format!("action=\"/alerts/{id}/ack\"")), "{page}");
    assert!(!viewer.get(a, "/alerts").body.contains("/ack\""), "no acknowledge button for a viewer");
    assert_eq!(viewer.submit(a, &format!("/alerts/{id}/ack"), &[]).status, 403);
    assert_eq!(admin.submit(a, &format!("/alerts/{id}/ack"), &[]).status, 303);
    assert!(admin.get(a, "/alerts").body.contains("by admin"));
    assert!(admin.get(a, "/").body.contains("id=\"open-alerts\""));

    // Log out: the session is gone.
    assert_eq!(viewer.post(a, "/logout", &[]).status, 403, "logout needs the CSRF token too");
    let r = viewer.submit(a, "/logout", &[]);
    assert_eq!((r.status, r.header("location").as_deref()), (303, Some("/login")));
    assert_eq!(viewer.get(a, "/").status, 303);
    assert!(!cs.log().contains("panicked"), "{}", cs.log());
}

/// The acceptance test in a browser: a master target and two agents
/// reporting to the configuration server; the admin sees both disks with
/// their RPO changing live, a disk's chart with its recovery points, runs a
/// test failover of a plan from the website (the master target's job runner
/// brings up the exports) and cleans it up; a viewer has no button and a
/// forged POST gets 403. Runs tests/web/config_server.py.
#[test]
fn browser_dashboard_charts_and_a_test_failover() {
    let t = TempDir::new("cs-browser");
    let cs = ConfigServer::start(&t.0, &["--heartbeat-every", "1s"]);
    let mt = MasterTarget::start_args(&t.path("data"), &format!("127.0.0.1:{}", free_port()), &["--config-server", &cs.addr]);
    let tag = std::process::id();
    let names = [format!("web{tag}-a"), format!("web{tag}-b")];
    let blocks = 512u64;
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    let mut writers = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let img = t.path(&format!("{n}.img"));
        std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
        let st = t.path(&format!("{n}.st"));
        std::fs::create_dir_all(&st).unwrap();
        let ring = Ring::create(&st.join("ring"), 1 << 14).unwrap();
        let log = OpenOptions::new().create(true).append(true).open(t.path(&format!("{n}.log"))).unwrap();
        agents.push(Proc(
            ferry()
                .args(["agent", "--disk"])
                .arg(&img)
                .args(["--name", n, "--target", &mt.addr, "--tracker", "ring", "--state"])
                .arg(&st)
                .args(["--point-every", "0.5", "--config-server", &cs.addr])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
        // A slow writer on each disk: points keep coming.
        let (stop, img) = (stop.clone(), img.clone());
        writers.push(std::thread::spawn(move || {
            let disk = OpenOptions::new().write(true).open(&img).unwrap();
            let mut w = Workload::new(blocks, 11 + i as u64);
            while !stop.load(Ordering::Relaxed) {
                w.write(&disk, Some(&ring));
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    let admin = login(&cs.addr, "admin", ADMIN_PW);
    assert_eq!(
        admin
            .api(
                &cs.addr,
                "POST",
                "/api/v1/users",
                &serde_json::json!({"name": "viewer1", "role": "viewer", "password": "viewer1-password"})
            )
            .status,
        200
    );
    // Both disks with a point at the master target, reported to the server.
    wait_for("both disks reported with points and a master target", 90, || {
        let v: serde_json::Value = serde_json::from_str(&admin.get(&cs.addr, "/api/v1/disks").body).unwrap_or_default();
        names.iter().all(|n| {
            v.as_array().is_some_and(|l| {
                l.iter()
                    .any(|d| d["name"] == n.as_str() && d["master_target"].is_string() && d["agent"].is_string() && d["rpo_ms"].is_i64())
            })
        })
    });

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let out = std::process::Command::new(script.join("run"))
        .arg(script.join("config_server.py"))
        .env("FERRY_WEB_URL", cs.url())
        .env("FERRY_WEB_ADMIN", "admin")
        .env("FERRY_WEB_ADMIN_PASSWORD", ADMIN_PW)
        .env("FERRY_WEB_VIEWER", "viewer1")
        .env("FERRY_WEB_VIEWER_PASSWORD", "viewer1-password")
        .env("FERRY_WEB_DISKS", names.join(","))
        .env("FERRY_WEB_PLAN", format!("web{tag}-plan"))
        .stdin(Stdio::null())
        .output()
        .expect("run tests/web/run");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "tests/web/config_server.py failed ({}):\n{stdout}\n{stderr}\n--- config server log:\n{}\n--- master target log:\n{}",
        out.status,
        cs.log(),
        mt.log()
    );
    assert!(stdout.contains("PASS test failover ready") && stdout.contains("PASS cleaned up"), "{stdout}");
    // The master target really ran the jobs: its exports came and went.
    let jobs = admin.get(&cs.addr, "/api/v1/jobs").body;
    assert!(jobs.contains("NBD export nbd://127.0.0.1:") && jobs.contains("overlay removed"), "{jobs}");
    drop(agents);
}
