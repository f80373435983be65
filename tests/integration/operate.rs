//! Safe to operate (issue 10): a re-protect never hangs, data sent before a
//! checksum request is acknowledged, status tells the truth about a stopped
//! agent and a lost master target, a flaky link still makes progress, and a
//! source that changes size is noticed.

use ferry_proto::{read_frame, write_msg, Codec, Msg, VERSION_MAX};
use ferry_tests::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn status_json(st: &std::path::Path) -> serde_json::Value {
    let o = run(&["status", "--state", &st.display().to_string(), "--json"]);
    if String::from_utf8_lossy(&o.stderr).contains("no agent state") {
        return serde_json::Value::Null; // the agent has not written it yet
    }
    assert!(o.status.success(), "status failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

/// Spawn a streaming agent (no --once).
fn spawn_agent(disk: &str, name: &str, target: &str, state: &str, tracker: &str, extra: &[&str]) -> Proc {
    // stderr is a pipe read at the end: keep the log small.
    let mut c = ferry();
    c.args(["agent", "--disk", disk, "--name", name, "--target", target, "--tracker", tracker, "--state", state, "--point-every", "1"]);
    c.args(extra);
    Proc(c.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn agent"))
}

/// Run `ferry` with a deadline: the output, or a panic naming the hang.
fn run_within(args: &[&str], secs: u64) -> std::process::Output {
    let mut child = ferry().args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ferry");
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!("ferry {args:?} still running after {secs}s: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The standstill of a SUMS_REQ behind unacknowledged data, at the protocol
/// level: DATA, then a checksum request for another range, then nothing.
/// The master target must apply and acknowledge the DATA, not wait for more.
#[test]
fn data_sent_just_before_a_checksum_request_is_acknowledged() {
    let t = TempDir::new("sumsack");
    let mt = MasterTarget::start(&t.path("data"));
    let mut s = TcpStream::connect(&mt.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_msg(&mut s, &Msg::Hello { min: 1, max: VERSION_MAX, peer: "test".into() }).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Some(Msg::HelloAck { .. })));
    write_msg(&mut s, &Msg::Open { name: "sums".into(), size: 1 << 20, generation: [3; 16] }).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Some(Msg::OpenAck { .. })));
    // Both frames in one write, so the request is waiting when the DATA is read.
    let mut b = Vec::new();
    Msg::Data { seq: 1, offset: 0, len: 4096, codec: Codec::Raw, payload: vec![7; 4096] }.encode(&mut b);
    Msg::SumsReq { req: 1, offset: 512 << 10, chunk: 4096, count: 4 }.encode(&mut b);
    s.write_all(&b).unwrap();
    let (mut acked, mut sums) = (0, false);
    while acked < 1 || !sums {
        match read_frame(&mut s) {
            Ok(Some(Msg::Ack { durable_seq })) => acked = durable_seq,
            Ok(Some(Msg::Sums { req: 1, .. })) => sums = true,
            other => panic!("expected ACK 1 and SUMS, got {other:?} (acked {acked}, sums {sums})"),
        }
    }
    // A PING (v2) is answered once everything before it is durable.
    write_msg(&mut s, &Msg::Data { seq: 2, offset: 4096, len: 4096, codec: Codec::Raw, payload: vec![8; 4096] }).unwrap();
    write_msg(&mut s, &Msg::Ping { token: 9 }).unwrap();
    let mut got_ack = false;
    loop {
        match read_frame(&mut s) {
            Ok(Some(Msg::Ack { durable_seq: 2 })) => got_ack = true,
            Ok(Some(Msg::Pong { token: 9 })) => break,
            other => panic!("expected ACK 2 then PONG, got {other:?}"),
        }
    }
    assert!(got_ack, "PONG came before the ACK of the DATA sent before the PING");
}

/// Acceptance: twenty cycles of unprotect → write → `--once` with the bpf
/// tracker, each finishing (well within 10 s), the replica identical each
/// time.
#[test]
fn twenty_reprotect_cycles_each_finish_with_the_replica_identical() {
    let t = TempDir::new("reprotect");
    let backing = t.path("back.img");
    mixed_image(&backing, 64 << 20, 5);
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("reprot");
    let st = t.s("st");
    let _guard = Unprotect(t.path("st"));
    let once = |secs| {
        let o = run_within(
            &["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", &st, "--once", "--json"],
            secs,
        );
        assert!(o.status.success(), "--once failed: {}", String::from_utf8_lossy(&o.stderr));
        summary(&String::from_utf8_lossy(&o.stdout))
    };
    once(120);
    let f = std::fs::OpenOptions::new().write(true).open(&lo.dev).unwrap();
    let mut rng = Rng::new(11);
    for cycle in 0..20 {
        run_ok(&["unprotect", "--state", &st]);
        let mut blk = vec![0u8; 4096];
        for _ in 0..10 {
            rng.fill(&mut blk);
            f.write_all_at(&blk, rng.below((64 << 20) / 4096) * 4096).unwrap();
        }
        f.sync_all().unwrap();
        let t0 = Instant::now();
        let s = once(10);
        assert_eq!(s["resync"], true, "cycle {cycle}: a re-protect resyncs by checksum: {s}");
        let replica = t.path("data").join(&name).join("replica.img");
        assert_eq!(file_digest(&replica), file_digest(&lo.dev), "cycle {cycle}: replica differs after {:?}", t0.elapsed());
    }
}

/// Successive `--once` runs with the bpf tracker each ship only what
/// changed since the last: what a run made durable is released before it
/// stops (a short run once left it all in the ring for the next one).
#[test]
fn each_bpf_once_ships_only_what_changed_since_the_last() {
    let t = TempDir::new("once-release");
    let backing = t.path("back.img");
    mixed_image(&backing, 64 << 20, 6);
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("oncerel");
    let st = t.s("st");
    let _guard = Unprotect(t.path("st"));
    let once = || {
        let o = run_within(
            &["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", &st, "--once", "--json"],
            120,
        );
        assert!(o.status.success(), "--once failed: {}", String::from_utf8_lossy(&o.stderr));
        summary(&String::from_utf8_lossy(&o.stdout))
    };
    once();
    let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&lo.dev).unwrap();
    let mut rng = Rng::new(12);
    let mut blk = AlignedBlock([0u8; 4096]);
    for round in 0..4 {
        for _ in 0..200 {
            rng.fill(&mut blk.0);
            f.write_all_at(&blk.0, rng.below((64 << 20) / 4096) * 4096).unwrap();
        }
        let s = once();
        let read = s["bytes_read"].as_u64().unwrap();
        assert!(read <= 2 * 200 * 4096, "round {round}: read {read} bytes for 200 changed blocks: earlier rounds shipped again: {s}");
        let replica = t.path("data").join(&name).join("replica.img");
        assert_eq!(file_digest(&replica), file_digest(&lo.dev), "round {round}: replica differs");
    }
}

/// A 4 KiB block aligned for O_DIRECT.
#[repr(C, align(4096))]
struct AlignedBlock([u8; 4096]);

/// Acceptance: SIGTERM of a streaming agent shows as stopped, with the
/// reason, within 2 s; a second agent on its busy state folder is refused;
/// byte counters move while streaming.
#[test]
fn a_stopped_agent_is_reported_stopped_with_its_reason() {
    let t = TempDir::new("sigterm");
    let img = t.path("a.img");
    mixed_image(&img, 16 << 20, 3);
    let mt = MasterTarget::start(&t.path("data"));
    let st = t.path("st");
    let mut agent = spawn_agent(&t.s("a.img"), "sig", &mt.addr, &t.s("st"), "scan", &[]);
    wait_for("a first recovery point", 60, || status_json(&st)["last_point"].is_object());
    let s = status_json(&st);
    assert_eq!(s["running"], true, "{s}");
    assert_eq!(s["connected"], true, "{s}");
    assert_eq!(s["health"], "OK", "{s}");
    assert_eq!(s["mode"], "streaming", "{s}");

    // A second agent on the same state folder is refused before it attaches anything.
    let o = run(&[
        "agent",
        "--disk",
        &t.s("a.img"),
        "--name",
        "sig",
        "--target",
        &mt.addr,
        "--tracker",
        "scan",
        "--state",
        &t.s("st"),
        "--once",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by a running agent"), "{err}");
    assert!(agent.alive(), "the running agent was disturbed");

    // Counters move while it streams (not only when a session ends).
    let sent0 = status_json(&st)["bytes_sent_total"].as_u64().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut rng = Rng::new(4);
    let mut blk = vec![0u8; 1 << 20];
    rng.fill(&mut blk);
    f.write_all_at(&blk, 4 << 20).unwrap();
    wait_for("bytes_sent_total to grow while streaming", 30, || {
        status_json(&st)["bytes_sent_total"].as_u64().unwrap() > sent0 + (512 << 10)
    });

    // SIGTERM: stopped, with the reason, within 2 s.
    // SAFETY: kill(2) on the pid of a child this test owns.
    unsafe { libc::kill(agent.pid(), libc::SIGTERM) };
    let t0 = Instant::now();
    wait_for("status to say stopped", 2, || {
        let s = status_json(&st);
        s["running"] == false && s["mode"] == "stopped" && s["stopped_reason"].as_str().is_some_and(|r| r.contains("SIGTERM"))
    });
    let s = status_json(&st);
    assert_eq!(s["health"], "CRIT", "an unprotected disk is critical: {s}");
    let human = run_ok(&["status", "--state", &t.s("st")]);
    assert!(human.contains("agent not running: stopped by SIGTERM"), "{human}");
    assert!(!human.contains("(agent running)"), "{human}");
    wait_for("the agent to exit", 5, || !agent.alive());
    let code = agent.0.wait().unwrap();
    assert!(code.success(), "a SIGTERM stop exits 0: {code}");
    let mut log = String::new();
    agent.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("SIGTERM"), "the agent logs the signal: {log}");
    eprintln!("stopped in {:?}", t0.elapsed());

    // SIGKILL leaves no "running" behind either.
    let mut agent = spawn_agent(&t.s("a.img"), "sig", &mt.addr, &t.s("st"), "scan", &[]);
    wait_for("the agent to run again", 30, || status_json(&st)["running"] == true);
    agent.kill9();
    let s = status_json(&st);
    assert_eq!(s["running"], false, "{s}");
    assert!(s["stopped_reason"].as_str().unwrap().contains("without stopping cleanly"), "{s}");
}

/// Acceptance: with the master target killed, status says disconnected and
/// WARN within 5 s and the RPO figure grows; restarted, OK again.
#[test]
fn a_lost_master_target_shows_as_disconnected_and_the_rpo_grows() {
    let t = TempDir::new("mtloss");
    mixed_image(&t.path("a.img"), 8 << 20, 8);
    let data = t.path("data");
    let mut mt = MasterTarget::start(&data);
    let addr = mt.addr.clone();
    let st = t.path("st");
    let _agent = spawn_agent(&t.s("a.img"), "loss", &addr, &t.s("st"), "scan", &[]);
    wait_for("a first recovery point", 60, || status_json(&st)["last_point"].is_object());
    wait_for("health OK", 10, || status_json(&st)["health"] == "OK");
    mt.proc.kill9();
    wait_for("status to say disconnected and WARN", 5, || {
        let s = status_json(&st);
        s["connected"] == false && s["mode"] == "disconnected" && s["health"] == "WARN" && s["running"] == true
    });
    let r1 = status_json(&st)["rpo_seconds"].as_f64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s = status_json(&st);
    let r2 = s["rpo_seconds"].as_f64().unwrap();
    assert!(r2 >= r1 + 1.0, "the RPO must grow while disconnected: {r1} then {r2}");
    assert!(s["health_reason"].as_str().unwrap().contains("disconnected"), "{s}");
    let human = run_ok(&["status", "--state", &t.s("st")]);
    assert!(human.starts_with("health     WARN"), "{human}");
    assert!(human.contains("disconnected for"), "{human}");

    let _mt2 = MasterTarget::start_at(&data, &addr);
    wait_for("health OK after the master target is back", 30, || {
        let s = status_json(&st);
        s["health"] == "OK" && s["connected"] == true && s["rpo_seconds"].as_f64().is_some_and(|r| r < r2)
    });
}

/// A TCP proxy to `upstream` that forwards the client's bytes at
/// `rate` bytes/s and cuts every connection after `life`. Counts
/// connections and bytes forwarded upstream.
struct FlakyProxy {
    addr: String,
    conns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FlakyProxy {
    fn start(upstream: String, rate: u64, life: Duration) -> FlakyProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        l.set_nonblocking(true).unwrap();
        let conns = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (Arc::clone(&conns), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(&upstream) else { continue };
                c2.fetch_add(1, Ordering::SeqCst);
                let born = Instant::now();
                let done = Arc::new(Mutex::new(false));
                // upstream → agent: unshaped.
                let (mut u2, mut d2) = (up.try_clone().unwrap(), down.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut d2);
                    let _ = d2.shutdown(Shutdown::Both);
                });
                // agent → upstream: token bucket at `rate`, cut at `life`.
                let (mut d, mut u) = (down, up);
                let _ = d.set_read_timeout(Some(Duration::from_millis(50)));
                let _d = done;
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    let mut sent = 0u64;
                    while born.elapsed() < life {
                        let allowed = (born.elapsed().as_secs_f64() * rate as f64) as u64;
                        if sent >= allowed {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        let want = ((allowed - sent) as usize).min(buf.len());
                        match d.read(&mut buf[..want]) {
                            Ok(0) => break,
                            Ok(n) => {
                                if u.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                sent += n as u64;
                            }
                            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                            Err(_) => break,
                        }
                    }
                    let _ = d.shutdown(Shutdown::Both);
                    let _ = u.shutdown(Shutdown::Both);
                });
            }
        });
        FlakyProxy { addr, conns, stop }
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Acceptance: an initial sync through a link of 10 MB/s cut every 1.5 s:
/// the durable cursor advances with every connection, and the sync
/// completes sending less than 1.5× the disk.
#[test]
fn an_initial_sync_over_a_link_cut_every_1_5_s_progresses_with_every_connection() {
    let t = TempDir::new("flaky");
    let size: u64 = 48 << 20;
    // Incompressible content: what is sent is what the link carries.
    {
        let f = std::fs::File::create(t.path("a.img")).unwrap();
        let mut rng = Rng::new(99);
        let mut b = vec![0u8; 1 << 20];
        for i in 0..(size >> 20) {
            rng.fill(&mut b);
            f.write_all_at(&b, i << 20).unwrap();
        }
    }
    let mt = MasterTarget::start(&t.path("data"));
    let proxy = FlakyProxy::start(mt.addr.clone(), 10_000_000, Duration::from_millis(1500));
    let st = t.path("st");
    let mut agent = spawn_agent(&t.s("a.img"), "flaky", &proxy.addr, &t.s("st"), "scan", &["--once", "--json"]);
    // Sample the durable cursor at every new connection.
    let mut cursors: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent.alive() {
        assert!(Instant::now() < deadline, "the sync did not finish in 120 s; cursors {cursors:?}");
        let c = proxy.conns.load(Ordering::SeqCst);
        if cursors.last().is_none_or(|&(n, _)| n != c) {
            let cur = agent_state(&st).and_then(|s| s["sync_cursor"].as_u64()).unwrap_or(0);
            cursors.push((c, cur));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let code = agent.0.wait().unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    agent.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    agent.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(code.success(), "agent failed: {err}");
    let s = summary(&out);
    let sent = s["bytes_sent"].as_u64().unwrap();
    let n = proxy.conns.load(Ordering::SeqCst);
    eprintln!("{n} connections, {sent} bytes sent for {size}, cursors at each new connection: {cursors:?}");
    eprintln!("{err}");
    assert!(n >= 3, "the link was cut only {n} times: the test did not test anything");
    assert!((sent as f64) < 1.5 * size as f64, "sent {sent} bytes for a {size}-byte disk over {n} connections");
    // The cursor seen at each new connection grows, connection after connection.
    let during: Vec<u64> = cursors.iter().filter(|&&(n, c)| n >= 1 && c < size).map(|&(_, c)| c).collect();
    for w in during.windows(2) {
        assert!(w[1] > w[0], "a connection made no durable progress: cursors {cursors:?}");
    }
    recover_to(&t.s("data"), "flaky", "latest", &t.s("r.img"));
    assert_same(&t.path("a.img"), &t.path("r.img"));
}

/// Acceptance: an image grown under a running agent is reported within 5 s,
/// and the agent stops with that reason (the replica keeps its size and
/// points).
#[test]
fn a_source_that_grows_while_protected_stops_the_agent_with_the_reason() {
    let t = TempDir::new("grow");
    mixed_image(&t.path("a.img"), 16 << 20, 6);
    let mt = MasterTarget::start(&t.path("data"));
    let st = t.path("st");
    let mut agent = spawn_agent(&t.s("a.img"), "grow", &mt.addr, &t.s("st"), "scan", &[]);
    wait_for("a first recovery point", 60, || status_json(&st)["last_point"].is_object());
    std::fs::OpenOptions::new().write(true).open(t.path("a.img")).unwrap().set_len(20 << 20).unwrap();
    wait_for("status to report the new size", 5, || {
        let s = status_json(&st);
        s["running"] == false && s["stopped_reason"].as_str().is_some_and(|r| r.contains("changed size from 16777216 to 20971520"))
    });
    let code = agent.0.wait().unwrap();
    assert_eq!(code.code(), Some(1), "the agent stops with an error");
    let s = status_json(&st);
    assert_eq!(s["health"], "CRIT", "{s}");
    // The points taken before the change still recover, at the old size.
    recover_to(&t.s("data"), "grow", "latest", &t.s("r.img"));
    assert_eq!(std::fs::metadata(t.path("r.img")).unwrap().len(), 16 << 20);
}

/// Acceptance: a resync that starts while data frames are still
/// unacknowledged finishes. A producer records a burst of random writes
/// in a tiny agent ring (64 records), so the ring overflows mid-stream: the
/// agent resyncs by checksum behind the data it had just sent, and once the
/// writes stop it reaches a point where the replica equals the disk.
/// (Issue 12 item 5: the bpf tracker no longer overflows its agent ring —
/// a full ring goes to its bitmap, a backlog, not a loss (backlog.rs) — so
/// the overflow comes from `--tracker ring`'s external producer.)
#[test]
fn a_resync_under_load_finishes_once_the_writes_stop() {
    let t = TempDir::new("resyncload");
    let img = t.path("back.img");
    mixed_image(&img, 128 << 20, 12);
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("rsload");
    let st = t.path("st");
    std::fs::create_dir_all(&st).unwrap();
    let ring = ferry_ring::Ring::create(&st.join("ring"), 64).unwrap();
    let mut agent = spawn_agent(&img.display().to_string(), &name, &mt.addr, &t.s("st"), "ring", &[]);
    wait_for("a first recovery point", 120, || status_json(&st)["last_point"].is_object());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut rng = Rng::new(21);
    let mut blk = vec![0u8; 4096];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(4) {
        for _ in 0..256 {
            rng.fill(&mut blk);
            let off = rng.below((128 << 20) / 4096) * 4096;
            f.write_all_at(&blk, off).unwrap();
            ring.push(ferry_ring::Record {
                seq: n,
                offset: off,
                length: 4096,
                kind: ferry_ring::RecordKind::Write,
                flush: false,
                data: false,
                group: false,
                time_ns: 0,
            });
            n += 1;
        }
        f.sync_data().unwrap();
    }
    let stopped_at = ferry_common::now_ns();
    wait_for("a resync to have happened", 60, || {
        let s = status_json(&st);
        s["ring_overflows"].as_u64().unwrap_or(0) > 0
    });
    // A point cut after the writes stopped, with the replica equal to the disk.
    let replica = t.path("data").join(&name).join("replica.img");
    wait_for("a point after the writes, with the replica identical", 60, || {
        let s = status_json(&st);
        let newer = s["last_point"]["time"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 > stopped_at);
        newer && s["resync_required"].is_null() && file_digest(&replica) == file_digest(&img)
    });
    assert!(agent.alive(), "the agent ended");
    eprintln!("{n} writes; caught up in {:?} after they stopped", Duration::from_nanos(ferry_common::now_ns() - stopped_at));
}

/// Issue 12 (link limits): a peer that opens a disk and then neither sends
/// nor reads, keeping its TCP connection open, loses the disk within the
/// idle timeout (`--idle-timeout 3s` here; 60 s by default), so an agent
/// can open it; 200 connections that never say HELLO do not stop a real
/// agent from being served; past `--max-connections`, a connection is
/// refused as busy at once.
#[test]
fn a_silent_peer_loses_the_disk_and_idle_connections_starve_nobody() {
    let t = TempDir::new("silentpeer");
    mixed_image(&t.path("a.img"), 4 << 20, 9);
    let data = t.path("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let _mt = Proc(
        ferry()
            .args(["master-target", "--listen", &addr, "--data", &data.display().to_string(), "--idle-timeout", "3s"])
            .args(["--max-connections", "260"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the master target to listen", 10, || TcpStream::connect(&addr).is_ok());
    // 200 connections that never say anything.
    let idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // A v2 peer opens the disk, then goes silent with the connection open.
    let mut s = TcpStream::connect(&addr).unwrap();
    write_msg(&mut s, &Msg::Hello { min: 1, max: VERSION_MAX, peer: "silent".into() }).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Some(Msg::HelloAck { .. })));
    write_msg(&mut s, &Msg::Open { name: "vm".into(), size: 4 << 20, generation: [5; 16] }).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Some(Msg::OpenAck { .. })));
    // The limit: 200 idle + the silent peer + these 59 fill it; the next
    // is refused at once.
    let more: Vec<TcpStream> = (0..59).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut over = TcpStream::connect(&addr).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match read_frame(&mut over) {
        Ok(Some(Msg::Error { code: ferry_proto::ErrorCode::Busy, msg })) => assert!(msg.contains("maximum of connections"), "{msg}"),
        other => panic!("expected a busy refusal past the limit, got {other:?}"),
    }
    drop(more);
    let t0 = Instant::now();
    // The real agent gets the disk once the silent peer is dropped, and
    // ships it whole, the 200 idle connections still open.
    let o = run_within(
        &[
            "agent",
            "--disk",
            &t.s("a.img"),
            "--name",
            "vm",
            "--target",
            &addr,
            "--tracker",
            "scan",
            "--state",
            &t.s("st"),
            "--once",
            "--json",
        ],
        60,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("the agent was served {:?} after the silent peer opened the disk", t0.elapsed());
    recover_to(&data.display().to_string(), "vm", "latest", &t.s("r.img"));
    assert_same(&t.path("a.img"), &t.path("r.img"));
    drop(idle);
}
