//! Backlog is not loss (issue 12, item 5): a disk written faster than the
//! agent ships it, under the eBPF tracker, on a tmpfs-backed 1 GiB loop
//! device. The agent's `STATE/ring` fills up; what does not fit goes to the
//! tracker's bitmap and ships from there, coalesced, with no checksum
//! resync, no point cut while the replica is not a prefix state, and the
//! replica identical soon after the writes stop.

use ferry_tests::versioned;
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// A file in /dev/shm (tmpfs), removed on drop.
struct ShmFile(PathBuf);

impl ShmFile {
    fn new(tag: &str, size: u64) -> ShmFile {
        let p = PathBuf::from(format!("/dev/shm/ferry-test-{}.img", unique_name(tag)));
        std::fs::File::create(&p).expect("create the tmpfs file").set_len(size).expect("size the tmpfs file");
        ShmFile(p)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn status(st: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok(&["status", "--state", &st.display().to_string(), "--json"])).expect("status JSON")
}

/// `ferry agent --tracker bpf` running in the background, its log in `log`.
fn start_agent(dev: &str, name: &str, mt: &MasterTarget, st: &Path, log: &Path, every: &str) -> Proc {
    start_agent_with(dev, name, mt, st, log, every, &[])
}

fn start_agent_with(dev: &str, name: &str, mt: &MasterTarget, st: &Path, log: &Path, every: &str, extra: &[&str]) -> Proc {
    let st = st.display().to_string();
    let args = ["agent", "--disk", dev, "--name", name, "--target", &mt.addr, "--tracker", "bpf", "--state", &st, "--point-every", every];
    let err = std::fs::File::create(log).unwrap();
    Proc(ferry().env("RUST_LOG", "info").args(args).args(extra).stdout(Stdio::null()).stderr(err).spawn().unwrap())
}

/// The newest point's time (wall-clock ns) as the agent's status shows it.
fn last_point_ns(st: &Path) -> u64 {
    agent_state(st).and_then(|s| s["last_point"]["time_ns"].as_u64()).unwrap_or(0)
}

/// Poll `ferry status` until `until` says stop: no status may ever show a
/// resync required. Returns how many showed a backlog.
fn watch_no_resync(st: &Path, mut until: impl FnMut() -> bool) -> usize {
    let mut backlog = 0;
    while !until() {
        let s = status(st);
        assert!(s["resync_required"].is_null(), "the agent treated a backlog as a loss: {s}");
        assert_eq!(s["running"], true, "the agent stopped: {s}");
        if s["health_reason"].as_str().is_some_and(|r| r.contains("backlog")) {
            backlog += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    backlog
}

/// Acceptance (issue 12): `fio` writes 4 KiB at random at 100 MB/s (25k
/// IOPS, direct) for 60 s on a tmpfs-backed 1 GiB loop device protected by
/// the eBPF tracker. No resync, ever (not in the log, not in any status);
/// within 30 s of the load stopping a point is cut and the replica it names
/// is the device. Then the versioned-block workload runs at the same rate
/// on a second such device, and every point of that disk passes the
/// checker (a point cut during a catch-up would not).
#[test]
fn writes_faster_than_shipping_are_a_backlog_not_a_resync() {
    let t = TempDir::new("backlog");
    let shm = ShmFile::new("backlog", GIB);
    let lo = LoopDev::attach(&shm.0);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("backlog");
    let st = t.path("st");
    let _guard = Unprotect(st.clone());
    let mut agent = start_agent(&dev, &name, &mt, &st, &t.path("agent.log"), "1");
    wait_for("the initial sync and a first point", 120, || last_point_ns(&st) > 0);

    let mut fio = Proc(
        Command::new("fio")
            .args(["--name=churn", "--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1"])
            .args(["--rate=100m", "--runtime=60", "--time_based", "--randrepeat=0", "--output-format=terse"])
            .arg(format!("--filename={dev}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run fio (scripts/install-deps installs it)"),
    );
    let backlog_seen = watch_no_resync(&st, || !fio.alive());
    let stopped = ferry_common::now_ns();
    let fio_status = fio.0.wait().unwrap();
    assert!(fio_status.success(), "fio failed: {fio_status}");
    eprintln!("status showed a backlog {backlog_seen} times during the load");

    // Within 30 s of the last write: a point cut after it.
    let t0 = Instant::now();
    watch_no_resync(&st, || last_point_ns(&st) > stopped || t0.elapsed() > Duration::from_secs(30));
    assert!(last_point_ns(&st) > stopped, "no point within 30 s of the load stopping: {}", status(&st));
    eprintln!("caught up {:.1}s after the load stopped", t0.elapsed().as_secs_f64());
    agent.kill9();
    let log = std::fs::read_to_string(t.path("agent.log")).unwrap();
    assert!(!log.contains("resync required"), "the agent resynced:\n{log}");
    recover_to(&t.s("data"), &name, "latest", &t.s("latest.img"));
    assert_same(&lo.dev, &t.path("latest.img"));
    std::fs::remove_file(t.path("latest.img")).unwrap();

    // The checker's workload at the same rate (25k 4 KiB writes a second),
    // 20 s of it, 16 in flight as fio's, on a zeroed disk: every point holds
    // every write settled before its newest one (versioned::check_window).
    let shm2 = ShmFile::new("backlog2", GIB);
    let lo2 = LoopDev::attach(&shm2.0);
    let dev2 = lo2.dev.display().to_string();
    let name2 = unique_name("backlog2");
    let st2 = t.path("st2");
    let _guard2 = Unprotect(st2.clone());
    let mut agent2 = start_agent(&dev2, &name2, &mt, &st2, &t.path("agent2.log"), "2");
    wait_for("the second disk's first point", 120, || last_point_ns(&st2) > 0);
    let blocks = GIB / 4096;
    let wlog = t.path("writes.log");
    let mut wl = Proc(
        Command::new(mkimage_bin())
            .args(["workload-rate", &dev2, &blocks.to_string(), "12", &wlog.display().to_string(), "500000", "25000", "16"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    watch_no_resync(&st2, || !wl.alive());
    let stopped = ferry_common::now_ns();
    let out = wl.0.wait_with_output_keep();
    eprintln!("versioned workload: {} writes a second", out.trim());
    let t0 = Instant::now();
    watch_no_resync(&st2, || last_point_ns(&st2) > stopped || t0.elapsed() > Duration::from_secs(30));
    assert!(last_point_ns(&st2) > stopped, "no point within 30 s of the workload stopping: {}", status(&st2));
    agent2.kill9();
    let log2 = std::fs::read_to_string(t.path("agent2.log")).unwrap();
    assert!(!log2.contains("resync required"), "the agent resynced:\n{log2}");
    let writes = versioned::read_log(&wlog);
    assert_eq!(writes.len(), 500_000, "the workload ran to its end");
    let n = check_every_point_window(&t.s("data"), &name2, &writes, blocks, 16, &t.0, "versioned workload at 100 MB/s");
    assert!(n >= 2, "points were cut: {n}");
    recover_to(&t.s("data"), &name2, "latest", &t.s("latest2.img"));
    assert_same(&lo2.dev, &t.path("latest2.img"));
}

/// Wait for a child whose stdout is piped and return that output.
trait WaitOutput {
    fn wait_with_output_keep(&mut self) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_keep(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut o) = self.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        let st = self.wait().unwrap();
        assert!(st.success(), "the versioned workload failed: {st}");
        s
    }
}

/// Crash safety of a catch-up: the agent is killed (SIGKILL) while it
/// ships a backlog from the tracker's bitmap under a 100 MB/s load (its
/// ring holds 4096 records, so it falls behind at once), and a
/// new agent started while the load goes on finishes the catch-up from
/// what the pinned bitmap and `STATE/ring` still hold: no resync, and the
/// replica equals the device once the load stops.
#[test]
fn an_agent_killed_during_a_catch_up_loses_nothing() {
    let t = TempDir::new("backlogkill");
    let shm = ShmFile::new("backlogkill", GIB);
    let lo = LoopDev::attach(&shm.0);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("backlogkill");
    let st = t.path("st");
    let _guard = Unprotect(st.clone());
    let small = ["--ring-capacity", "4096"];
    let mut agent = start_agent_with(&dev, &name, &mt, &st, &t.path("agent1.log"), "1", &small);
    wait_for("the initial sync and a first point", 120, || last_point_ns(&st) > 0);
    let mut fio = Proc(
        Command::new("fio")
            .args(["--name=churn", "--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1"])
            .args(["--rate=100m", "--runtime=25", "--time_based", "--randrepeat=0", "--output-format=terse"])
            .arg(format!("--filename={dev}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run fio (scripts/install-deps installs it)"),
    );
    // Kill it once it is catching up, then again a few seconds into the
    // next one.
    let t0 = Instant::now();
    let catching_up = |log: &str| std::fs::read_to_string(t.path(log)).unwrap_or_default().contains("catching up from the bpf tracker's");
    watch_no_resync(&st, || catching_up("agent1.log") || t0.elapsed() > Duration::from_secs(20));
    assert!(catching_up("agent1.log"), "the agent never fell behind a 4096-record ring at 25k writes a second");
    // The state file `ferry status` reads carries the backlog.
    let t1 = Instant::now();
    let mut backlog = 0u64;
    while t1.elapsed() < Duration::from_secs(2) {
        backlog = backlog.max(agent_state(&st).and_then(|s| s["backlog_bytes"].as_u64()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(backlog > 0, "no backlog recorded while catching up: {}", status(&st));
    agent.kill9();
    std::thread::sleep(Duration::from_secs(1)); // writes while no agent runs
    let mut agent = start_agent_with(&dev, &name, &mt, &st, &t.path("agent2.log"), "1", &small);
    std::thread::sleep(Duration::from_secs(4));
    agent.kill9();
    let mut agent = start_agent_with(&dev, &name, &mt, &st, &t.path("agent3.log"), "1", &small);
    wait_for("the third agent to start", 30, || status(&st)["running"] == true);
    watch_no_resync(&st, || !fio.alive());
    let stopped = ferry_common::now_ns();
    let t0 = Instant::now();
    watch_no_resync(&st, || last_point_ns(&st) > stopped || t0.elapsed() > Duration::from_secs(60));
    assert!(last_point_ns(&st) > stopped, "no point after the load stopped: {}", status(&st));
    agent.kill9();
    for l in ["agent1.log", "agent2.log", "agent3.log"] {
        let log = std::fs::read_to_string(t.path(l)).unwrap();
        assert!(!log.contains("resync required"), "{l}: the agent resynced:\n{log}");
    }
    recover_to(&t.s("data"), &name, "latest", &t.s("latest.img"));
    assert_same(&lo.dev, &t.path("latest.img"));
}
