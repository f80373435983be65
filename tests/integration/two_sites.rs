//! Issue 13: two sites in two network namespaces joined by a veth pair
//! shaped with `tc tbf`; machines enroll through `ferry ca serve` and
//! replicate over mutual TLS.

use ferry_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// Two network namespaces joined by a veth pair (site A: .1, site B: .2,
/// a /30 of 10/8 unique to this process and `idx`), the link shaped to
/// `rate`; both namespaces (and the pair) are deleted on drop.
struct Sites {
    a: String,
    b: String,
    ip_a: String,
    ip_b: String,
}

impl Sites {
    fn new(idx: u32, rate: &str) -> Sites {
        let pid = std::process::id();
        let tag = format!("fy{}x{idx}", pid % 100_000);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        let o2 = (pid >> 6) & 0xff;
        let o3 = (pid & 0x3f) * 4;
        let net = format!("10.{}.{o2}.{o3}", 100 + idx);
        let base: Vec<u32> = net.split('.').map(|x| x.parse().unwrap()).collect();
        let ip = |n: u32| format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + n);
        let s = Sites { a: a.clone(), b: b.clone(), ip_a: ip(1), ip_b: ip(2) };
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        sh(&format!(
            "ip link add {a}v type veth peer name {b}v && ip link set {a}v netns {a} && ip link set {b}v netns {b} && \
             ip -n {a} addr add {}/30 dev {a}v && ip -n {b} addr add {}/30 dev {b}v && \
             ip -n {a} link set {a}v up && ip -n {b} link set {b}v up && ip -n {a} link set lo up && ip -n {b} link set lo up && \
             ip netns exec {a} tc qdisc add dev {a}v root tbf rate {rate} burst 256kb latency 100ms && \
             ip netns exec {b} tc qdisc add dev {b}v root tbf rate {rate} burst 256kb latency 100ms",
            s.ip_a, s.ip_b
        ));
        s
    }

    /// `ferry ARGS` inside namespace `ns`.
    fn ferry(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(ferry_bin()).args(args);
        c.env("RUST_LOG", std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()));
        c.stdin(Stdio::null());
        c
    }

    /// Start a long-running ferry in `ns`, its log in `log`; wait until the
    /// log says `ready`.
    fn start(&self, ns: &str, args: &[&str], log: &Path, ready: &str) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = self.ferry(ns, args).stdout(Stdio::null()).stderr(f).spawn().expect("spawn ferry in a namespace");
        let p = Proc(child);
        wait_for(&format!("{ready} in {}", log.display()), 15, || std::fs::read_to_string(log).unwrap_or_default().contains(ready));
        p
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Acceptance: enrollment of an agent and a master target through
/// `ferry ca serve` across the shaped link, a 256 MiB disk replicated with
/// mutual TLS, recovery equal to the source; plaintext off the machine and
/// an identity of the wrong role are refused with one line.
#[test]
fn two_sites_enroll_and_replicate_over_mutual_tls() {
    let t = TempDir::new("two-sites");
    let sites = Sites::new(1, "200mbit");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    let ca_addr = format!("{}:7800", sites.ip_b);
    let _ca =
        sites.start(&sites.b, &["ca", "serve", "--dir", &t.s("ca"), "--listen", &ca_addr], &t.path("ca.log"), "answering enrollments");
    let token = |role: &str, name: &str| {
        let o = run_ok(&["token", "create", "--ca", &t.s("ca"), "--role", role, "--name", name]);
        o.lines().last().unwrap().to_string()
    };
    // The master target at site B, the agent at site A (across the link).
    let o = sites
        .ferry(&sites.b, &["enroll", "--server", &ca_addr, "--token", &token("master-target", "mt-b"), "--identity", &t.s("id-mt")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let tok_a = token("agent", "db-a");
    let o = sites.ferry(&sites.a, &["enroll", "--server", &ca_addr, "--token", &tok_a, "--identity", &t.s("id-ag")]).output().unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("enrolled as agent/db-a"), "{}", out(&o));
    // The token works once.
    let o = sites.ferry(&sites.a, &["enroll", "--server", &ca_addr, "--token", &tok_a, "--identity", &t.s("id-ag2")]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("already used"), "{}", out(&o));
    assert!(!t.path("id-ag2").join("cert.pem").exists());

    let mt_addr = format!("{}:7700", sites.ip_b);
    let _mt = sites.start(
        &sites.b,
        &["master-target", "--listen", &mt_addr, "--data", &t.s("data"), "--identity", &t.s("id-mt")],
        &t.path("mt.log"),
        "listening on",
    );
    mixed_image(&t.path("disk.img"), 256 << 20, 13);
    let agent = |identity: Option<&str>, state: &str| {
        let disk = t.s("disk.img");
        let mut args = vec!["agent", "--disk", &disk, "--name", "db", "--target", &mt_addr, "--tracker", "scan", "--once", "--json"];
        let st = t.s(state);
        args.extend(["--state", &st, "--connect-timeout", "30"]);
        if let Some(i) = identity {
            args.extend(["--identity", i]);
        }
        sites.ferry(&sites.a, &args).output().unwrap()
    };
    // Plaintext off the machine is refused before anything is sent.
    let o = agent(None, "st-plain");
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(out(&o).contains("not a loopback address") && out(&o).contains("--identity"), "{}", out(&o));
    // An agent's identity cannot serve as a master target.
    let o = run(&["master-target", "--listen", "127.0.0.1:0", "--data", &t.s("d2"), "--identity", &t.s("id-ag")]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(out(&o).contains("agent/db-a") && out(&o).contains("master-target"), "{}", out(&o));

    let ag_id = t.s("id-ag");
    let o = agent(Some(&ag_id), "st");
    assert!(o.status.success(), "{}\nmaster target: {}", out(&o), std::fs::read_to_string(t.path("mt.log")).unwrap_or_default());
    let mt_log = std::fs::read_to_string(t.path("mt.log")).unwrap();
    assert!(mt_log.contains("agent/db-a"), "the master target names its peer by identity: {mt_log}");
    recover_to(&t.s("data"), "db", "latest", &t.s("r.img"));
    assert_same(&t.path("disk.img"), &t.path("r.img"));

    // The disk is bound to agent/db-a: another agent identity is refused,
    // and nothing is written.
    let o = sites
        .ferry(&sites.a, &["enroll", "--server", &ca_addr, "--token", &token("agent", "db-x"), "--identity", &t.s("id-x")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let points = point_ids(&t.s("data"), "db");
    let x_id = t.s("id-x");
    let o = agent(Some(&x_id), "st-x");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("belongs to agent/db-a"), "{}", out(&o));
    assert_eq!(point_ids(&t.s("data"), "db"), points);
    // Granted to db-x, the disk refuses its first owner.
    run_ok(&["grant", "--data", &t.s("data"), "--name", "db", "--to", "agent/db-x"]);
    let o = agent(Some(&ag_id), "st");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("belongs to agent/db-x"), "{}", out(&o));
}

/// A long-running ferry on loopback, its log in `log`; waits for `ready`.
fn start_local(args: &[&str], log: &Path, ready: &str) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    let child =
        ferry().env("RUST_LOG", "info").args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(f).spawn().expect("spawn ferry");
    let p = Proc(child);
    wait_for(&format!("{ready} in {}", log.display()), 15, || std::fs::read_to_string(log).unwrap_or_default().contains(ready));
    p
}

fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

/// Acceptance: `ferry export` with TLS read by `qemu-img compare` and by
/// libnbd (`nbdinfo`, `nbdcopy`) with x509 credentials equals `ferry
/// recover`; a client of another CA and a plaintext client get nothing.
#[test]
fn an_export_over_tls_reads_equal_to_its_recovery_with_x509_clients() {
    let t = TempDir::new("tls-export");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    run_ok(&[
        "ca",
        "issue",
        "--dir",
        &t.s("ca"),
        "--role",
        "master-target",
        "--name",
        "mt1",
        "--identity",
        &t.s("mt"),
        "--san",
        "127.0.0.1",
    ]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "agent", "--name", "db1", "--identity", &t.s("ag")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "agent", "--name", "operator", "--identity", &t.s("op")]);
    run_ok(&["ca", "init", "--dir", &t.s("ca2")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca2"), "--role", "agent", "--name", "operator", "--identity", &t.s("stranger")]);
    // The stranger trusts this site's CA, so it is the server that must
    // refuse its certificate.
    for f in ["ca.pem", "crl.pem"] {
        std::fs::copy(t.path("op").join(f), t.path("stranger").join(f)).unwrap();
    }

    // Replicate over mutual TLS on loopback.
    let mt_addr = format!("127.0.0.1:{}", free_port());
    let mut mt = start_local(
        &["master-target", "--listen", &mt_addr, "--data", &t.s("data"), "--identity", &t.s("mt")],
        &t.path("mt.log"),
        "listening on",
    );
    mixed_image(&t.path("disk.img"), 64 << 20, 5);
    run_ok(&[
        "agent",
        "--disk",
        &t.s("disk.img"),
        "--name",
        "db",
        "--target",
        &mt_addr,
        "--tracker",
        "scan",
        "--once",
        "--state",
        &t.s("st"),
        "--identity",
        &t.s("ag"),
    ]);
    // Refused, each with one line, nothing written: a certificate of
    // another CA, and a plaintext agent (told in its own protocol).
    let points = run_ok(&["points", "--data", &t.s("data"), "--name", "db", "--json"]);
    let (stranger, disk) = (t.s("stranger"), t.s("disk.img"));
    for (extra, want) in
        [(vec!["--identity", &stranger[..]], "refused our certificate: not from its CA"), (vec![], "takes mutual TLS only")]
    {
        let mut args = vec!["agent", "--disk", &disk[..], "--name", "db", "--target", &mt_addr, "--tracker", "scan", "--once"];
        let st = t.s("st-refused");
        args.extend(["--state", &st, "--connect-timeout", "5"]);
        args.extend(extra);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{}", out(&o));
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(e.lines().last().is_some_and(|l| l.contains(want)), "{want}: {e}");
    }
    assert_eq!(run_ok(&["points", "--data", &t.s("data"), "--name", "db", "--json"]), points, "nothing written");
    mt.kill9();
    recover_to(&t.s("data"), "db", "latest", &t.s("r.img"));
    assert_same(&t.path("disk.img"), &t.path("r.img"));

    let port = free_port();
    let _ex = start_local(
        &[
            "export",
            "--data",
            &t.s("data"),
            "--name",
            "db",
            "--point",
            "latest",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--identity",
            &t.s("mt"),
        ],
        &t.path("ex.log"),
        "serving",
    );
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", t.s("op"));
    let nbd = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=db,tls-creds=tls0");
    let o = tool("qemu-img", &["compare", "--object", &creds, "--image-opts", &nbd, &format!("driver=raw,file.filename={}", t.s("r.img"))]);
    assert!(o.status.success(), "qemu-img compare over TLS: {}", out(&o));
    let url = |dir: &str| format!("nbds://127.0.0.1:{port}/db?tls-certificates={dir}");
    let o = tool("nbdinfo", &["--size", &url(&t.s("op"))]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), (64u64 << 20).to_string());
    let o = tool("nbdcopy", &[&url(&t.s("op")), &t.s("copy.img")]);
    assert!(o.status.success(), "{}", out(&o));
    assert_same(&t.path("r.img"), &t.path("copy.img"));
    // Another CA's certificate, and plaintext, read nothing.
    let o = tool("nbdinfo", &["--size", &url(&t.s("stranger"))]);
    assert!(!o.status.success(), "a certificate of another CA was served: {}", out(&o));
    let o = tool("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}/db")]);
    assert!(!o.status.success() && out(&o).contains("TLS"), "plaintext was served: {}", out(&o));
    let log = std::fs::read_to_string(t.path("ex.log")).unwrap();
    assert!(log.contains("agent/operator"), "{log}");
    assert!(log.contains("not from this site's CA"), "the export refused the stranger itself: {log}");
}

/// Acceptance: fuzzed and truncated TLS records (a byte-flipping proxy in
/// front of a master target): each such connection fails cleanly, and the
/// master target goes on serving other disks.
#[test]
fn flipped_and_truncated_tls_bytes_fail_one_connection_and_the_master_target_serves_on() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let t = TempDir::new("tls-fuzz");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "master-target", "--name", "mt1", "--identity", &t.s("mt")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "agent", "--name", "db1", "--identity", &t.s("ag")]);
    let mt_addr = format!("127.0.0.1:{}", free_port());
    let mut mt = start_local(
        &["master-target", "--listen", &mt_addr, "--data", &t.s("data"), "--identity", &t.s("mt")],
        &t.path("mt.log"),
        "listening on",
    );
    mixed_image(&t.path("disk.img"), 8 << 20, 9);

    // A proxy that flips one byte (or cuts the stream) after `after` bytes
    // of the client's side, one connection per case.
    let proxy = |after: usize, cut: bool| -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let upstream = mt_addr.clone();
        std::thread::spawn(move || {
            let Ok((c, _)) = l.accept() else { return };
            let Ok(u) = TcpStream::connect(&upstream) else { return };
            let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let (mut c, mut u) = (c, u);
            let mut seen = 0usize;
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = &mut buf[..n];
                if seen <= after && after < seen + n {
                    if cut {
                        let _ = u.write_all(&chunk[..after - seen]);
                        break;
                    }
                    chunk[after - seen] ^= 0x5a;
                }
                seen += n;
                if u.write_all(chunk).is_err() {
                    break;
                }
            }
            let _ = u.shutdown(std::net::Shutdown::Both);
        });
        addr
    };
    let agent = |target: &str, name: &str, state: &str| {
        ferry()
            .args(["agent", "--disk", &t.s("disk.img"), "--name", name, "--target", target, "--tracker", "scan", "--once"])
            .args(["--state", &t.s(state), "--identity", &t.s("ag"), "--connect-timeout", "3"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // In the ClientHello, in the handshake's later records, in the
    // encrypted stream; and cut short at the same places.
    for (i, (after, cut)) in [(3, false), (60, false), (700, false), (5000, false), (40_000, false), (5, true), (900, true), (30_000, true)]
        .into_iter()
        .enumerate()
    {
        let p = proxy(after, cut);
        let o = agent(&p, "fz", &format!("st-fz{i}"));
        assert!(!o.status.success(), "a damaged stream at byte {after} (cut: {cut}) succeeded: {}", out(&o));
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(e.lines().last().is_some_and(|l| l.starts_with("ferry: ")), "one clean line: {e}");
        assert!(!e.contains("panicked") && !e.contains("internal error"), "{e}");
        assert!(mt.alive(), "the master target died at case {i}");
    }
    // The master target serves another disk, whole.
    let o = agent(&mt_addr, "good", "st-good");
    assert!(o.status.success(), "{}", out(&o));
    recover_to(&t.s("data"), "good", "latest", &t.s("g.img"));
    assert_same(&t.path("disk.img"), &t.path("g.img"));
    let log = std::fs::read_to_string(t.path("mt.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

/// Acceptance: a certificate renewed while a stream is running: the
/// stream continues on its connection, points keep coming, no resync.
/// (`ca serve --cert-ttl 12s` makes the agent renew every ~8 s.)
#[test]
fn a_certificate_renewed_mid_stream_keeps_the_stream_and_needs_no_resync() {
    let t = TempDir::new("tls-renew");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    let ca_addr = format!("127.0.0.1:{}", free_port());
    let _ca = start_local(&["ca", "serve", "--dir", &t.s("ca"), "--listen", &ca_addr, "--cert-ttl", "12s"], &t.path("ca.log"), "answering");
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "master-target", "--name", "mt1", "--identity", &t.s("mt")]);
    let tok = run_ok(&["token", "create", "--ca", &t.s("ca"), "--role", "agent", "--name", "db1"]);
    run_ok(&["enroll", "--server", &ca_addr, "--token", tok.lines().last().unwrap(), "--identity", &t.s("ag")]);
    let serial0 = std::fs::read_to_string(t.path("ag/cert.pem")).unwrap();
    let mt_addr = format!("127.0.0.1:{}", free_port());
    let _mt = start_local(
        &["master-target", "--listen", &mt_addr, "--data", &t.s("data"), "--identity", &t.s("mt")],
        &t.path("mt.log"),
        "listening on",
    );

    std::fs::write(t.path("disk.img"), vec![0u8; 32 << 20]).unwrap();
    let dev = LoopDev::attach(&t.path("disk.img"));
    let name = unique_name("renew");
    let _unprotect = Unprotect(t.path("st"));
    let log = t.path("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    let dev_s = dev.dev.display().to_string();
    let mut agent = Proc(
        ferry()
            .env("RUST_LOG", "info")
            .args(["agent", "--disk", &dev_s, "--name", &name, "--target", &mt_addr, "--tracker", "bpf", "--state", &t.s("st")])
            .args(["--point-every", "0.5", "--identity", &t.s("ag")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap(),
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let points = || {
        let o = run(&["points", "--data", &t.s("data"), "--name", &name, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok().and_then(|v| v.as_array().map(|a| a.len())).unwrap_or(0)
    };
    wait_for("the first point", 60, || points() > 0);
    // Writes go on while the certificate is renewed (twice), and past the
    // first certificate's expiry.
    let mut rng = Rng::new(3);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(20) {
        let block = rng.below(8192);
        sh(&format!("dd if=/dev/urandom of={dev_s} bs=4096 count=1 seek={block} oflag=direct conv=notrunc status=none"));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let renewed = text().matches("renewed the certificate").count();
    assert!(renewed >= 2, "expected renewals in 20 s of a 12 s certificate: {}", text());
    assert_ne!(std::fs::read_to_string(t.path("ag/cert.pem")).unwrap(), serial0, "the identity folder holds the new certificate");
    let before = points();
    wait_for("points after the renewals", 30, || points() > before + 2);
    // SIGTERM: the agent stops; the latest point equals the device.
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(agent.pid(), libc::SIGTERM) };
    wait_for("the agent to stop", 20, || !agent.alive());
    let a = text();
    assert_eq!(a.matches("] connected to ").count(), 1, "one connection for the whole stream: {a}");
    assert!(!a.contains("resync"), "no resync: {a}");
    assert!(!std::fs::read_to_string(t.path("mt.log")).unwrap().contains("connection cut"));
    recover_to(&t.s("data"), &name, "latest", &t.s("r.img"));
    assert_same(&dev.dev, &t.path("r.img"));
}

/// Item 5: `ferry status --identity` warns within 7 days of an expiry it
/// could not renew; an expired certificate is a clear error, never a
/// silent stop.
#[test]
fn status_warns_before_expiry_and_an_expired_identity_is_refused_with_one_line() {
    let t = TempDir::new("tls-expiry");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    let issue = |name: &str, ttl: &str| {
        run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "master-target", "--name", name, "--identity", &t.s(name), "--ttl", ttl])
    };
    issue("fresh", "30d");
    issue("soon", "3d");
    issue("gone", "1s");
    assert!(!run_ok(&["status", "--identity", &t.s("fresh")]).contains("WARNING"));
    let s = run_ok(&["status", "--identity", &t.s("soon")]);
    assert!(s.contains("WARNING") && s.contains("has not been renewed"), "{s}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let s = run_ok(&["status", "--identity", &t.s("gone"), "--json"]);
    assert!(s.contains("expired"), "{s}");
    let o = run(&["master-target", "--listen", &format!("127.0.0.1:{}", free_port()), "--data", &t.s("d"), "--identity", &t.s("gone")]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("expired") && e.contains("ferry enroll"), "{e}");
}

/// Acceptance: a revoked certificate, including an open stream, which is
/// cut within seconds; the agent then stops with the reason.
#[test]
fn a_revoked_agent_is_cut_mid_stream_and_refused_after() {
    let t = TempDir::new("tls-revoke");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "master-target", "--name", "mt1", "--identity", &t.s("mt")]);
    run_ok(&["ca", "issue", "--dir", &t.s("ca"), "--role", "agent", "--name", "db1", "--identity", &t.s("ag")]);
    let mt_addr = format!("127.0.0.1:{}", free_port());
    let _mt = start_local(
        &["master-target", "--listen", &mt_addr, "--data", &t.s("data"), "--identity", &t.s("mt")],
        &t.path("mt.log"),
        "listening on",
    );
    mixed_image(&t.path("disk.img"), 16 << 20, 7);
    let log = t.path("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut agent = Proc(
        ferry()
            .env("RUST_LOG", "info")
            .args(["agent", "--disk", &t.s("disk.img"), "--name", "db", "--target", &mt_addr, "--tracker", "scan", "--state", &t.s("st")])
            .args(["--point-every", "1", "--identity", &t.s("ag")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap(),
    );
    wait_for("the first point", 60, || std::fs::read_to_string(&log).unwrap_or_default().contains("recovery point 1"));
    // Revoked at the CA; the master target (issued offline) reads the new
    // list from its identity folder within 5 s and cuts the stream.
    run_ok(&["ca", "revoke", "--dir", &t.s("ca"), "agent/db1"]);
    std::fs::copy(t.path("ca/crl.pem"), t.path("mt/crl.pem")).unwrap();
    let t0 = std::time::Instant::now();
    wait_for("the agent to stop", 30, || !agent.alive());
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t0.elapsed());
    let a = std::fs::read_to_string(&log).unwrap();
    let last = a.lines().last().unwrap_or_default();
    assert!(last.starts_with("ferry: ") && last.contains("revoked"), "the agent says why it stopped: {a}");
    let m = std::fs::read_to_string(t.path("mt.log")).unwrap();
    assert!(m.contains("revoked; connection cut"), "{m}");
}
