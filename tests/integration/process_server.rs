//! The process server: agents → spool → master target, SIGKILL of the
//! process server, and agents falling back to the next address.

use ferry_ring::Ring;
use ferry_tests::versioned::Workload;
use ferry_tests::*;
use std::fs::OpenOptions;
use std::process::Stdio;
use std::time::Duration;

struct Setup {
    t: TempDir,
    blocks: u64,
    ring: Ring,
    mt: MasterTarget,
}

fn setup(tag: &str, blocks: u64) -> Setup {
    let t = TempDir::new(tag);
    let img = t.path("src.img");
    std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
    std::fs::create_dir_all(t.path("st")).unwrap();
    let ring = Ring::create(&t.path("st").join("ring"), 1 << 16).unwrap();
    let mt = MasterTarget::start(&t.path("data"));
    Setup { t, blocks, ring, mt }
}

fn agent_args(t: &TempDir, name: &str, target: &str) -> Vec<String> {
    [
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        name,
        "--target",
        target,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--point-every",
        "0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn spawn(args: &[String]) -> Proc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(format!("{}.agent.log", args[2])).unwrap();
    Proc(ferry().args(args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// The end of every test: a `--once` run (through `target`) cuts a last
/// point; it needed no resync, the latest point equals the source, and
/// every point recovers to a prefix of the write log.
fn finish(s: &Setup, name: &str, target: &str, w: &Workload, what: &str, expect_resync: bool) {
    let mut once = agent_args(&s.t, name, target);
    once.extend(["--once".into(), "--json".into()]);
    let args: Vec<&str> = once.iter().map(|s| s.as_str()).collect();
    let sum = summary(&run_ok(&args));
    if !expect_resync {
        assert_eq!(sum["resync"], false, "{what}: {sum}");
        assert_eq!(sum["initial_sync"], false, "{what}: {sum}");
    }
    recover_to(&s.t.s("data"), name, "latest", &s.t.s("rec.img"));
    assert_same(&s.t.path("src.img"), &s.t.path("rec.img"));
    let n = check_every_point(&s.t.s("data"), name, &w.log, s.blocks, &s.t.0, what);
    assert!(n >= 2, "{what}: {n} points");
}

/// Acceptance: an agent ships through a process server; points come from
/// the master target (its catalog lists them), every point passes the
/// checker, the replica equals the source, and the spool empties once the
/// master target holds everything.
#[test]
fn an_agent_ships_through_a_process_server_and_points_come_from_the_master_target() {
    let s = setup("ps-basic", 2048);
    let ps = ProcessServer::start(&s.t.path("spool"), &s.mt.addr, "1G");
    let disk = OpenOptions::new().write(true).open(s.t.path("src.img")).unwrap();
    let mut w = Workload::new(s.blocks, 3);
    for _ in 0..500 {
        w.write(&disk, Some(&s.ring));
    }
    let mut agent = spawn(&agent_args(&s.t, "vm", &ps.addr));
    for k in 0..3000 {
        w.write(&disk, Some(&s.ring));
        if k % 32 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    wait_for("the ring to drain into the spool", 60, || s.ring.consumer() == s.ring.producer());
    wait_for("points at the master target", 60, || point_ids(&s.t.s("data"), "vm").len() >= 2);
    agent.kill9();
    finish(&s, "vm", &ps.addr, &w, "through a process server", false);
    let st = agent_state(&s.t.path("st")).unwrap();
    assert_eq!(st["hop"], ps.addr.as_str());
    // Everything is at the master target: the spool lets go of it (all but
    // the segment being written, which holds nothing unacknowledged).
    let spool = s.t.path("spool").join("disks").join("vm");
    wait_for("the spool to drop what the master target holds", 30, || {
        std::fs::read_dir(&spool).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".fsp")).count() <= 1
    });
    let log = ps.log();
    assert!(log.contains("forwarding to the master target") || log.contains("stream opened"), "{log}");
    assert!(!log.contains("damaged"), "{log}");
}

/// Acceptance: SIGKILL of the process server at 20 random moments while it
/// spools and forwards: every point still passes the checker, the disk
/// needs no resync, and the replica equals the source.
#[test]
fn process_server_killed_at_random_moments_loses_nothing() {
    let s = setup("ps-kill", 256);
    let spool = s.t.path("spool");
    let mut ps = ProcessServer::start(&spool, &s.mt.addr, "1G");
    let addr = ps.addr.clone();
    let disk = OpenOptions::new().write(true).open(s.t.path("src.img")).unwrap();
    let mut w = Workload::new(s.blocks, 21);
    let mut agent = spawn(&agent_args(&s.t, "hot", &addr));
    wait_for("the disk at the master target", 30, || s.t.path("data").join("hot").join("disk.meta").exists());
    // Every point kept, to check them all.
    run_ok(&["retention", "--data", &s.t.s("data"), "--name", "hot", "--keep", "none", "--keep-all", "none", "--journal-cap", "none"]);
    let mut rng = Rng::new(7);
    for _ in 0..20 {
        let until = std::time::Instant::now() + Duration::from_millis(100 + rng.below(400));
        while std::time::Instant::now() < until {
            for _ in 0..6 {
                w.write(&disk, Some(&s.ring));
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        ps.proc.kill9();
        ps = ProcessServer::start_at(&spool, &addr, &s.mt.addr, "1G");
    }
    wait_for("the ring to drain into the spool", 60, || s.ring.consumer() == s.ring.producer());
    agent.kill9();
    let log = ps.log();
    finish(&s, "hot", &addr, &w, "after 20 kills of the process server", false);
    eprintln!("PSLOG\n{}\nMTLOG\n{}", ps.log(), s.mt.log());
    assert!(!log.contains("damaged"), "{log}");
    let st = agent_state(&s.t.path("st")).unwrap();
    assert!(st["resync_required"].is_null(), "{st}");
}

/// Acceptance: the process server stopped, an agent listing the master
/// target second switches to it and loses nothing; with the process server
/// back, a restarted agent returns to it, and nothing is lost either way.
#[test]
fn an_agent_falls_back_to_the_next_address_and_returns() {
    let s = setup("ps-fallback", 1024);
    let spool = s.t.path("spool");
    let mut ps = ProcessServer::start(&spool, &s.mt.addr, "1G");
    let addr = ps.addr.clone();
    let both = format!("{},{}", addr, s.mt.addr);
    let disk = OpenOptions::new().write(true).open(s.t.path("src.img")).unwrap();
    let mut w = Workload::new(s.blocks, 9);
    let write_for = |w: &mut Workload, n: usize| {
        for k in 0..n {
            w.write(&disk, Some(&s.ring));
            if k % 16 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let mut agent = spawn(&agent_args(&s.t, "fb", &both));
    write_for(&mut w, 1500);
    wait_for("shipping through the process server", 60, || {
        agent_state(&s.t.path("st")).is_some_and(|st| st["hop"] == addr.as_str() && st["sync_cursor"].is_null())
    });
    ps.proc.kill9();
    write_for(&mut w, 1500);
    wait_for("the agent on the master target directly", 60, || {
        agent_state(&s.t.path("st")).is_some_and(|st| st["hop"] == s.mt.addr.as_str() && st["connected"] == true)
    });
    write_for(&mut w, 1000);
    wait_for("the ring to drain to the master target", 60, || s.ring.consumer() == s.ring.producer());
    agent.kill9();
    // Back: the process server restarts with what it spooled; the agent,
    // restarted, takes the first address again.
    ps = ProcessServer::start_at(&spool, &addr, &s.mt.addr, "1G");
    let mut agent = spawn(&agent_args(&s.t, "fb", &both));
    write_for(&mut w, 1000);
    wait_for("the agent back on the process server", 60, || {
        agent_state(&s.t.path("st")).is_some_and(|st| st["hop"] == addr.as_str() && st["connected"] == true)
    });
    wait_for("the ring to drain", 60, || s.ring.consumer() == s.ring.producer());
    agent.kill9();
    // A switch may need a checksum resync (what the dead process server
    // held), never a loss.
    finish(&s, "fb", &both, &w, "after falling back and returning", true);
    drop(ps);
}

/// A process server that dies holding changes it acknowledged but never
/// sent: the agent goes to the master target directly and loses nothing
/// (the lower durable sequence there makes it resync by checksum); when
/// the process server comes back with its stale spool, it never replays
/// those old frames over the newer ones.
#[test]
fn a_dead_process_server_s_unsent_changes_are_never_replayed_over_newer_ones() {
    let mut s = setup("ps-stale", 1024);
    let spool = s.t.path("spool");
    let mt_addr = s.mt.addr.clone();
    let mut ps = ProcessServer::start(&spool, &mt_addr, "1G");
    let addr = ps.addr.clone();
    let both = format!("{addr},{mt_addr}");
    let disk = OpenOptions::new().write(true).open(s.t.path("src.img")).unwrap();
    let mut w = Workload::new(s.blocks, 19);
    let write_for = |w: &mut Workload, n: usize| {
        for k in 0..n {
            w.write(&disk, Some(&s.ring));
            if k % 16 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let mut agent = spawn(&agent_args(&s.t, "st", &both));
    write_for(&mut w, 500);
    wait_for("shipping through the process server", 60, || {
        agent_state(&s.t.path("st")).is_some_and(|st| st["hop"] == addr.as_str() && st["sync_cursor"].is_null())
    });
    wait_for("a point", 60, || s.t.path("data").join("st").join("disk.meta").exists() && !point_ids(&s.t.s("data"), "st").is_empty());
    // The master target goes away: the spool takes (and acknowledges) what
    // it cannot send.
    s.mt.proc.kill9();
    write_for(&mut w, 1500);
    wait_for("the ring to drain into the spool", 60, || s.ring.consumer() == s.ring.producer());
    let st = ps_status(&addr);
    assert!(st["disks"][0]["pending_bytes"].as_u64().unwrap() > 0, "{st}");
    // Then the process server dies with it; the master target returns.
    ps.proc.kill9();
    s.mt = MasterTarget::start_at(&s.t.path("data"), &mt_addr);
    write_for(&mut w, 1000);
    wait_for("the agent on the master target directly", 60, || {
        agent_state(&s.t.path("st")).is_some_and(|st| st["hop"] == mt_addr.as_str() && st["connected"] == true)
    });
    wait_for("the ring to drain to the master target", 60, || s.ring.consumer() == s.ring.producer());
    agent.kill9();
    // The process server returns with its stale spool while no agent is
    // connected: its forwarder finds the master target past it.
    ps = ProcessServer::start_at(&spool, &addr, &mt_addr, "1G");
    wait_for("the stale spool settled", 30, || ps_status(&addr)["disks"][0]["pending_bytes"] == 0);
    finish(&s, "st", &mt_addr, &w, "after a stale process server came back", true);
    drop(ps);
}

fn ps_status(addr: &str) -> serde_json::Value {
    let out = run_ok(&["status", "--process-server", addr, "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Acceptance: a spool too small for the backlog holds the agent back
/// (nothing lost), `ferry status --process-server` names the waiting disk
/// and why, and once the limit is raised and the master target is back,
/// replication catches up without a resync.
#[test]
fn a_full_spool_holds_the_agent_back_and_catches_up_once_the_limit_is_raised() {
    let mut s = setup("ps-full", 8192); // 32 MiB
    let spool = s.t.path("spool");
    let mut ps = ProcessServer::start(&spool, &s.mt.addr, "4M");
    let addr = ps.addr.clone();
    let disk = OpenOptions::new().write(true).open(s.t.path("src.img")).unwrap();
    let mut w = Workload::new(s.blocks, 33);
    let mut agent = spawn(&agent_args(&s.t, "full", &addr));
    wait_for("the initial sync", 60, || agent_state(&s.t.path("st")).is_some_and(|st| st["sync_cursor"].is_null()));
    wait_for("a point", 60, || !point_ids(&s.t.s("data"), "full").is_empty());
    // The master target goes away: the spool fills.
    let mt_addr = s.mt.addr.clone();
    s.mt.proc.kill9();
    for _ in 0..4000 {
        w.write(&disk, Some(&s.ring));
    }
    wait_for("the disk to be held back", 60, || {
        let v = ps_status(&addr);
        v["disks"][0]["state"] == "spool full"
    });
    let v = ps_status(&addr);
    let d = &v["disks"][0];
    assert_eq!(d["name"], "full", "{v}");
    assert!(d["why"].as_str().unwrap().contains("spool"), "{v}");
    assert!(v["spool_bytes"].as_u64().unwrap() >= 4 << 20, "{v}");
    let human = run_ok(&["status", "--process-server", &addr]);
    assert!(human.contains("full") && human.contains("spool full"), "{human}");
    // Held back: the agent keeps what the spool could not take.
    assert!(s.ring.consumer() < s.ring.producer(), "the ring holds the rest");
    // The limit raised, the master target back: everything arrives.
    ps.proc.kill9();
    s.mt = MasterTarget::start_at(&s.t.path("data"), &mt_addr);
    ps = ProcessServer::start_at(&spool, &addr, &mt_addr, "1G");
    wait_for("the ring to drain", 120, || s.ring.consumer() == s.ring.producer());
    wait_for("the spool to empty", 120, || ps_status(&addr)["disks"][0]["pending_bytes"] == 0);
    agent.kill9();
    finish(&s, "full", &addr, &w, "after the spool was full", false);
    let st = agent_state(&s.t.path("st")).unwrap();
    assert!(st["resync_required"].is_null(), "{st}");
    drop(ps);
}

/// Acceptance: a 5 MB/s limit (MiB, as ferry's sizes) holds within ±10%
/// over 30 s, and two disks with a backlog under it get equal shares.
#[test]
fn a_bandwidth_limit_holds_and_two_busy_disks_share_it_equally() {
    let t = TempDir::new("ps-limit");
    let mt = MasterTarget::start(&t.path("data"));
    let ps = ProcessServer::start_args(&t.path("spool"), &format!("127.0.0.1:{}", free_port()), &mt.addr, "2G", &["--limit", "5MB"]);
    let mut agents = Vec::new();
    for (i, name) in ["la", "lb"].iter().enumerate() {
        // Incompressible content: what is measured is what crosses the link.
        let img = t.path(&format!("{name}.img"));
        let mut buf = vec![0u8; 128 << 20];
        Rng::new(40 + i as u64).fill(&mut buf);
        std::fs::write(&img, &buf).unwrap();
        let args = [
            "agent",
            "--disk",
            &t.s(&format!("{name}.img")),
            "--name",
            name,
            "--target",
            &ps.addr,
            "--tracker",
            "scan",
            "--state",
            &t.s(&format!("st-{name}")),
        ];
        agents.push(Proc(ferry().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()));
    }
    let sent = |v: &serde_json::Value, name: &str| -> u64 {
        v["disks"].as_array().unwrap().iter().find(|d| d["name"] == name).map_or(0, |d| d["upstream"]["bytes_sent"].as_u64().unwrap_or(0))
    };
    // Both disks have a backlog in the spool (their agents spool far faster
    // than 5 MB/s), and both are being forwarded.
    wait_for("both disks backlogged and forwarding", 60, || {
        let v = ps_status(&ps.addr);
        ["la", "lb"].iter().all(|n| sent(&v, n) > 0)
            && v["disks"].as_array().unwrap().iter().all(|d| d["pending_bytes"].as_u64().unwrap_or(0) > 40 << 20)
    });
    std::thread::sleep(Duration::from_secs(2));
    let v0 = ps_status(&ps.addr);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    let v1 = ps_status(&ps.addr);
    let secs = t0.elapsed().as_secs_f64();
    let (a, b) = (sent(&v1, "la") - sent(&v0, "la"), sent(&v1, "lb") - sent(&v0, "lb"));
    let rate = (a + b) as f64 / secs;
    let want = 5.0 * 1048576.0;
    eprintln!("over {secs:.1}s: {rate:.0} B/s (la {a}, lb {b})");
    assert!((rate - want).abs() <= 0.10 * want, "rate {rate:.0} B/s, limit {want} B/s");
    let share = a as f64 / (a + b) as f64;
    assert!((share - 0.5).abs() <= 0.05, "shares: la {a}, lb {b}");
    assert!([&v0, &v1].iter().any(|v| v["disks"].as_array().unwrap().iter().any(|d| d["state"] == "throttled")), "{v1}");
    drop(agents);
}

/// Acceptance: two machines protecting disks that hold the same 256 MiB
/// filesystem image: what the process server sends on to the master
/// target is at most 1.15 times one copy (the second travels as
/// references the master target checks), and both replicas are exact.
#[test]
fn the_same_image_from_two_machines_crosses_the_link_about_once() {
    let t = TempDir::new("ps-dedup");
    let img = t.path("a.img");
    let o = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", "/usr/lib/python3.11"])
        .arg(&img)
        .arg("256M")
        .output()
        .unwrap();
    assert!(o.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::copy(&img, t.path("b.img")).unwrap();
    let mt = MasterTarget::start(&t.path("data"));
    let ps = ProcessServer::start(&t.path("spool"), &mt.addr, "2G");
    let mut agents = Vec::new();
    for name in ["da", "db"] {
        let args = [
            "agent",
            "--disk",
            &t.s(&format!("{}.img", &name[1..])),
            "--name",
            name,
            "--target",
            &ps.addr,
            "--tracker",
            "scan",
            "--state",
            &t.s(&format!("st-{name}")),
        ];
        agents.push(Proc(ferry().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()));
    }
    wait_for("a point of each disk at the master target", 300, || {
        ["da", "db"].iter().all(|n| t.path("data").join(n).join("disk.meta").exists() && !point_ids(&t.s("data"), n).is_empty())
    });
    drop(agents);
    let v = ps_status(&ps.addr);
    let up: u64 = v["disks"].as_array().unwrap().iter().map(|d| d["upstream"]["bytes_sent"].as_u64().unwrap()).sum();
    let one = |n: &str| agent_state(&t.path(&format!("st-{n}"))).unwrap()["bytes_sent_total"].as_u64().unwrap();
    let copy = one("da").min(one("db"));
    eprintln!(
        "one copy {copy} bytes (agents sent {} and {}), upstream {up} bytes: {:.3}x; {v}",
        one("da"),
        one("db"),
        up as f64 / copy as f64
    );
    assert!((up as f64) <= 1.15 * copy as f64, "upstream {up} bytes for one copy of {copy}");
    // One of the two went (almost) wholly as references.
    assert!(
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["upstream"]["dedup_bytes"].as_u64().unwrap() * 10 >= d["upstream"]["data_bytes"].as_u64().unwrap() * 9),
        "{v}"
    );
    for n in ["da", "db"] {
        recover_to(&t.s("data"), n, "latest", &t.s("rec.img"));
        assert_same(&img, &t.path("rec.img"));
    }
}

/// Network namespaces for the four-machine test: `m0..m3` (the protected
/// machines), `ps` and `mt`, each machine joined to `ps` by its own veth
/// pair, `ps` joined to `mt` by one shaped to `rate`; everything is deleted
/// on drop.
struct Net {
    ns: Vec<String>,
    /// (machine side, process server side) addresses of each machine link.
    links: Vec<(String, String)>,
    mt_ip: String,
}

impl Net {
    fn new(machines: usize, rate: &str) -> Net {
        let pid = std::process::id();
        let tag = format!("fp{}", pid % 100_000);
        let mut ns: Vec<String> = (0..machines).map(|i| format!("{tag}m{i}")).collect();
        ns.push(format!("{tag}ps"));
        ns.push(format!("{tag}mt"));
        for n in &ns {
            sh(&format!("ip netns add {n} && ip -n {n} link set lo up"));
        }
        let (o2, o3) = ((pid >> 6) & 0xff, (pid & 0x3f) * 4);
        let ip = |k: usize, n: u32| format!("10.{}.{o2}.{}", 110 + k, o3 + n);
        let ps = &ns[machines];
        let mut links = Vec::new();
        for (k, m) in ns[..machines].iter().enumerate() {
            sh(&format!(
                "ip link add {m}v type veth peer name {tag}p{k} && ip link set {m}v netns {m} && ip link set {tag}p{k} netns {ps} && \
                 ip -n {m} addr add {}/30 dev {m}v && ip -n {ps} addr add {}/30 dev {tag}p{k} && \
                 ip -n {m} link set {m}v up && ip -n {ps} link set {tag}p{k} up",
                ip(k, 1),
                ip(k, 2)
            ));
            links.push((ip(k, 1), ip(k, 2)));
        }
        let mt = &ns[machines + 1];
        let k = machines;
        sh(&format!(
            "ip link add {tag}u type veth peer name {tag}d && ip link set {tag}u netns {ps} && ip link set {tag}d netns {mt} && \
             ip -n {ps} addr add {}/30 dev {tag}u && ip -n {mt} addr add {}/30 dev {tag}d && \
             ip -n {ps} link set {tag}u up && ip -n {mt} link set {tag}d up && \
             ip netns exec {ps} tc qdisc add dev {tag}u root tbf rate {rate} burst 256kb latency 100ms && \
             ip netns exec {mt} tc qdisc add dev {tag}d root tbf rate {rate} burst 256kb latency 100ms",
            ip(k, 1),
            ip(k, 2)
        ));
        Net { ns, links, mt_ip: ip(k, 2) }
    }

    fn ferry(&self, ns: &str, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", ns]).arg(ferry_bin()).args(args);
        c.env("RUST_LOG", "info").stdin(Stdio::null());
        c
    }

    fn start(&self, ns: &str, args: &[&str], log: &std::path::Path, ready: &str) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let p = Proc(self.ferry(ns, args).stdout(Stdio::null()).stderr(f).spawn().expect("spawn ferry in a namespace"));
        wait_for(&format!("{ready} in {}", log.display()), 15, || std::fs::read_to_string(log).unwrap_or_default().contains(ready));
        p
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = std::process::Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Acceptance: four protected machines (each a network namespace with its
/// own identity), two disks each, ship through one process server to one
/// master target over a link shaped to 100 Mbit, all over mutual TLS,
/// under the versioned-block workload: every listed point of every disk
/// passes the checker, and every replica equals its source at the end.
#[test]
fn four_machines_ship_through_one_process_server_over_a_shaped_link() {
    let t = TempDir::new("ps-four");
    let net = Net::new(4, "100mbit");
    run_ok(&["ca", "init", "--dir", &t.s("ca")]);
    let ca_addr = format!("127.0.0.1:{}", free_port());
    let _ca = {
        let f = std::fs::File::create(t.path("ca.log")).unwrap();
        let p = Proc(
            ferry()
                .env("RUST_LOG", "info")
                .args(["ca", "serve", "--dir", &t.s("ca"), "--listen", &ca_addr])
                .stdout(Stdio::null())
                .stderr(f)
                .spawn()
                .unwrap(),
        );
        wait_for("the CA", 15, || std::fs::read_to_string(t.path("ca.log")).unwrap_or_default().contains("answering enrollments"));
        p
    };
    let enroll = |role: &str, name: &str, dir: &str| {
        let o = run_ok(&["token", "create", "--ca", &t.s("ca"), "--role", role, "--name", name]);
        let tok = o.lines().last().unwrap().to_string();
        run_ok(&["enroll", "--server", &ca_addr, "--token", &tok, "--identity", &t.s(dir)]);
    };
    enroll("master-target", "mt", "id-mt");
    enroll("process-server", "ps", "id-ps");
    for m in 0..4 {
        enroll("agent", &format!("m{m}"), &format!("id-m{m}"));
    }
    let (ps_ns, mt_ns) = (net.ns[4].clone(), net.ns[5].clone());
    let mt_addr = format!("{}:7700", net.mt_ip);
    let _mt = net.start(
        &mt_ns,
        &["master-target", "--listen", &mt_addr, "--data", &t.s("data"), "--identity", &t.s("id-mt")],
        &t.path("mt.log"),
        "listening on",
    );
    let _ps = net.start(
        &ps_ns,
        &[
            "process-server",
            "--listen",
            "0.0.0.0:7710",
            "--spool",
            &t.s("spool"),
            "--spool-max",
            "1G",
            "--upstream",
            &mt_addr,
            "--identity",
            &t.s("id-ps"),
        ],
        &t.path("ps.log"),
        "listening on",
    );
    let blocks = 1024u64; // 4 MiB a disk
    struct D {
        name: String,
        ns: String,
        args: Vec<String>,
        ring: Ring,
        w: Workload,
        file: std::fs::File,
    }
    let mut disks = Vec::new();
    for m in 0..4 {
        for k in 0..2 {
            let name = format!("m{m}-d{k}");
            let img = t.path(&format!("{name}.img"));
            std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
            let st = t.path(&format!("st-{name}"));
            std::fs::create_dir_all(&st).unwrap();
            let ring = Ring::create(&st.join("ring"), 1 << 16).unwrap();
            let target = format!("{}:7710", net.links[m].1);
            let args: Vec<String> = [
                "agent",
                "--disk",
                &img.display().to_string(),
                "--name",
                &name,
                "--target",
                &target,
                "--tracker",
                "ring",
                "--state",
                &st.display().to_string(),
                "--identity",
                &t.s(&format!("id-m{m}")),
                "--point-every",
                "0.2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let file = OpenOptions::new().write(true).open(&img).unwrap();
            disks.push(D { name, ns: net.ns[m].clone(), args, ring, w: Workload::new(blocks, 100 + (m * 2 + k) as u64), file });
        }
    }
    let mut agents: Vec<Proc> = disks
        .iter()
        .map(|d| {
            let a: Vec<&str> = d.args.iter().map(|s| s.as_str()).collect();
            Proc(
                net.ferry(&d.ns, &a)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(t.path(&format!("{}.log", d.name))).unwrap())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for round in 0..300 {
        for d in disks.iter_mut() {
            for _ in 0..4 {
                d.w.write(&d.file, Some(&d.ring));
            }
        }
        if round % 10 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for d in &disks {
        wait_for(&format!("{}'s ring to drain", d.name), 120, || d.ring.consumer() == d.ring.producer());
    }
    for a in agents.iter_mut() {
        a.kill9();
    }
    let ps_log = std::fs::read_to_string(t.path("ps.log")).unwrap_or_default();
    let mt_log = std::fs::read_to_string(t.path("mt.log")).unwrap_or_default();
    for d in &disks {
        let mut a: Vec<&str> = d.args.iter().map(|s| s.as_str()).collect();
        a.extend(["--once", "--json"]);
        let o = net.ferry(&d.ns, &a).output().unwrap();
        assert!(
            o.status.success(),
            "{}: {}{}\nps: {ps_log}\nmt: {mt_log}",
            d.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let sum = summary(&String::from_utf8_lossy(&o.stdout));
        assert_eq!(sum["resync"], false, "{}: {sum}", d.name);
        recover_to(&t.s("data"), &d.name, "latest", &t.s("rec.img"));
        assert_same(&t.path(&format!("{}.img", d.name)), &t.path("rec.img"));
        let n = check_every_point(&t.s("data"), &d.name, &d.w.log, blocks, &t.0, &d.name);
        assert!(n >= 2, "{}: {n} points", d.name);
    }
    // Each machine's disks belong to that machine's identity, at the
    // master target too (the process server names whom it relays for).
    assert!(mt_log.contains("created by agent/m0") && mt_log.contains("created by agent/m3"), "{mt_log}");
}
