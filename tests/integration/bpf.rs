//! The eBPF tracker on real loop devices, as root: ext4 with a live
//! workload and fstrim, the versioned-block workload with freeze hooks, an
//! agent killed mid-workload, and the bitmap backstop.

use ferry_tests::versioned;
use ferry_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn once(dev: &str, name: &str, mt: &MasterTarget, st: &str, extra: &[&str]) -> serde_json::Value {
    let mut a = vec!["agent", "--disk", dev, "--name", name, "--target", &mt.addr, "--tracker", "bpf", "--state", st, "--once", "--json"];
    a.extend_from_slice(extra);
    summary(&run_ok(&a))
}

/// Acceptance: ext4 on a loop device, protected while a workload creates,
/// overwrites and deletes files and runs fstrim. The point cut under
/// FIFREEZE mounts and passes fsck; after unmounting, the latest point is
/// byte-identical to the device. After the initial sync the agent reads at
/// most twice what the workload changed on the device (written plus
/// discarded: a discarded range is read back to learn what it now holds).
#[test]
fn ext4_with_a_live_workload_and_fstrim() {
    let t = TempDir::new("bpfext4");
    let backing = t.path("back.img");
    std::fs::File::create(&backing).unwrap().set_len(128 << 20).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    sh(&format!("mkfs.ext4 -q -F -E nodiscard {dev}"));
    let mnt = Mount::new(&lo.dev, &t.path("mnt"), "discard");
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("ext4");
    let _guard = Unprotect(t.path("st"));
    let s = once(&dev, &name, &mt, &t.s("st"), &[]);
    assert_eq!(s["tracker"], "bpf");
    assert_eq!(s["point_kind"], "app", "a mounted filesystem is frozen for the cut: {s}");

    // The workload runs with no agent: the pinned tracker keeps recording.
    let (w0, d0) = dev_bytes_changed(&lo.dev);
    let m = t.path("mnt");
    let mut rng = Rng::new(7);
    for i in 0..40 {
        let mut b = vec![0u8; (rng.below(512) as usize + 1) * 1024];
        rng.fill(&mut b);
        std::fs::write(m.join(format!("f{i}")), &b).unwrap();
    }
    sh(&format!("sync -f {}", m.display()));
    for i in (0..40).step_by(3) {
        let mut b = vec![0u8; 64 << 10];
        rng.fill(&mut b);
        std::fs::write(m.join(format!("f{i}")), &b).unwrap(); // overwrite (truncate + write)
    }
    for i in (1..40).step_by(4) {
        std::fs::remove_file(m.join(format!("f{i}"))).unwrap();
    }
    sh(&format!("sync -f {} && fstrim {}", m.display(), m.display()));
    let (w1, d1) = dev_bytes_changed(&lo.dev);
    let written = (w1 - w0) + (d1 - d0);

    let s = once(&dev, &name, &mt, &t.s("st"), &[]);
    assert_eq!(s["point_kind"], "app");
    assert_eq!(s["resync"], false, "{s}");
    let read = s["bytes_read"].as_u64().unwrap();
    assert!(read <= 2 * written + (1 << 20), "read {read} bytes for {written} written or discarded: a rescan?");
    recover_to(&t.s("data"), &name, "latest", &t.s("app.img"));
    sh(&format!("fsck.ext4 -n -f {}", t.s("app.img")));
    let rec = LoopDev::attach(&t.path("app.img"));
    let rm = Mount::new(&rec.dev, &t.path("rmnt"), "ro,noload");
    assert_eq!(tree_digest(&t.path("rmnt")), tree_digest(&m), "recovered files differ from the live ones");
    drop(rm);
    drop(rec);

    mnt.umount();
    once(&dev, &name, &mt, &t.s("st"), &[]);
    recover_to(&t.s("data"), &name, "latest", &t.s("last.img"));
    assert_same(&lo.dev, &t.path("last.img"));
    sh(&format!("fsck.ext4 -n -f {}", t.s("last.img")));
}

/// Acceptance: the versioned-block workload writes to the raw device while
/// the agent cuts points through --freeze-cmd / --thaw-cmd (stopping and
/// continuing the workload); the agent is killed and restarted midway. Every
/// point is a prefix of the write log, each app point is the state at its
/// freeze, and at the end the replica equals the device with no resync.
#[test]
fn versioned_workload_with_freeze_hooks_and_an_agent_restart() {
    let t = TempDir::new("bpfver");
    let blocks = 4096u64;
    let backing = t.path("back.img");
    std::fs::File::create(&backing).unwrap().set_len(blocks * 4096).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("ver");
    let _guard = Unprotect(t.path("st"));
    once(&dev, &name, &mt, &t.s("st"), &[]);

    let log = t.path("writes.log");
    let mut wl = Proc(
        Command::new(mkimage_bin())
            .args(["workload", &dev, &blocks.to_string(), "3", &log.display().to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = wl.pid();
    let freezes = t.path("freezes");
    let freeze = format!("kill -STOP {pid}; wc -l < {} >> {}", log.display(), freezes.display());
    let thaw = format!("kill -CONT {pid}");
    let args = |st: &str| -> Vec<String> {
        ["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", st, "--point-every", "0.2"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--freeze-cmd".into(), freeze.clone(), "--thaw-cmd".into(), thaw.clone()])
            .collect()
    };
    let points = || -> usize {
        let o = run(&["points", "--data", &t.s("data"), "--name", &name, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).map(|v| v.as_array().map_or(0, |a| a.len())).unwrap_or(0)
    };
    let log_to = |n: &str| std::fs::File::create(t.path(n)).unwrap();
    let mut agent =
        Proc(ferry().env("RUST_LOG", "info").args(args(&t.s("st"))).stdout(Stdio::null()).stderr(log_to("agent1.log")).spawn().unwrap());
    wait_for("six points", 120, || points() >= 6);
    agent.kill9();
    sh(&format!("kill -CONT {pid}")); // in case the kill came mid-freeze
    std::thread::sleep(Duration::from_millis(300)); // writes while no agent runs
    let mut agent =
        Proc(ferry().env("RUST_LOG", "info").args(args(&t.s("st"))).stdout(Stdio::null()).stderr(log_to("agent2.log")).spawn().unwrap());
    wait_for("twelve points", 120, || points() >= 12);
    agent.kill9();
    sh(&format!("kill -CONT {pid}"));
    wl.kill9();
    let log_entries = versioned::read_log(&log);
    assert!(log_entries.len() > 100, "the workload ran: {} writes", log_entries.len());

    let s = once(&dev, &name, &mt, &t.s("st"), &[]);
    assert_eq!(s["resync"], false, "restarting the agent needs no resync: {s}");
    assert_eq!(s["initial_sync"], false);
    recover_to(&t.s("data"), &name, "latest", &t.s("last.img"));
    assert_same(&lo.dev, &t.path("last.img"));

    // The log may lack the write the workload was doing when it was killed.
    let log_entries = read_log_plus_one(&log_entries, &lo.dev, blocks);
    let disk_state = versioned::check(&lo.dev, &log_entries, blocks);
    assert!(disk_state.is_ok(), "{disk_state:?}");
    let freeze_marks: Vec<u64> = std::fs::read_to_string(&freezes).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    let pts: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", &t.s("data"), "--name", &name, "--json"])).unwrap();
    let mut app = 0;
    for p in pts.as_array().unwrap() {
        let id = p["id"].to_string();
        let out = t.path("p.img");
        recover_to(&t.s("data"), &name, &id, &out.display().to_string());
        let k = versioned::check(&out, &log_entries, blocks).unwrap_or_else(|e| panic!("point {p} is not a prefix of the write log: {e}"));
        if p["kind"] == "app" {
            app += 1;
            assert!(
                freeze_marks.iter().any(|&f| k == f || k == f + 1),
                "app point {id} holds {k} writes, but no freeze saw that many (freezes at {freeze_marks:?})"
            );
        }
    }
    assert!(app >= 10, "at least ten app points were cut: {app}");
}

/// The checker's log for the device: the logged writes, plus the one write
/// that may have completed without being logged before the kill.
fn read_log_plus_one(log: &[u64], dev: &std::path::Path, blocks: u64) -> Vec<u64> {
    let mut l = log.to_vec();
    if versioned::check(dev, &l, blocks).is_err() {
        // Find the block holding write len+1 and append it.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(dev).unwrap();
        let mut b = vec![0u8; 4096];
        for blk in 0..blocks {
            f.read_exact_at(&mut b, blk * 4096).unwrap();
            if u64::from_le_bytes(b[0..8].try_into().unwrap()) == l.len() as u64 + 1 {
                l.push(blk);
                break;
            }
        }
    }
    l
}

/// Acceptance: with a tiny BPF ring buffer, a burst of writes overflows it;
/// the bitmap catches every change, no checksum resync is needed, and the
/// replica is identical. `--tracker auto` picks bpf for a block device.
#[test]
fn a_tiny_bpf_ring_overflows_into_the_bitmap_and_loses_nothing() {
    let t = TempDir::new("bpfbitmap");
    let backing = t.path("back.img");
    mixed_image(&backing, 32 << 20, 51);
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("bitmap");
    let _guard = Unprotect(t.path("st"));
    let s = summary(&run_ok(&[
        "agent",
        "--disk",
        &dev,
        "--name",
        &name,
        "--target",
        &mt.addr,
        "--tracker",
        "auto",
        "--state",
        &t.s("st"),
        "--once",
        "--json",
        "--bpf-ring-bytes",
        "4096",
    ]));
    assert_eq!(s["tracker"], "bpf", "auto picks bpf for a block device on a BTF kernel");
    // 3000 scattered writes with no agent draining: far more than 4 KiB of records.
    sh(&format!("{} workload {dev} 8192 9 {} 3000", mkimage_bin().display(), t.s("w.log")));
    let s = once(&dev, &name, &mt, &t.s("st"), &[]);
    assert_eq!(s["resync"], false, "the bitmap, not a checksum pass, covered the overflow: {s}");
    let st: serde_json::Value = serde_json::from_str(&run_ok(&["status", "--state", &t.s("st"), "--json"])).unwrap();
    assert!(st["bpf_drops"].as_u64().unwrap() > 0, "the ring buffer did overflow: {st}");
    recover_to(&t.s("data"), &name, "latest", &t.s("rec.img"));
    assert_same(&lo.dev, &t.path("rec.img"));
    // Unprotect detaches: the pins are gone.
    run_ok(&["unprotect", "--state", &t.s("st")]);
    assert!(!std::path::Path::new("/sys/fs/bpf/ferry").join(&name).exists());
}

/// The freeze guard: a filesystem frozen for a cut is thawed (and the thaw
/// command run) when the agent dies or overruns its deadline, and left
/// alone when the agent reports the freeze done.
#[test]
fn the_freeze_guard_thaws_when_the_agent_dies_or_overruns() {
    let t = TempDir::new("guard");
    let backing = t.path("back.img");
    std::fs::File::create(&backing).unwrap().set_len(32 << 20).unwrap();
    let lo = LoopDev::attach(&backing);
    sh(&format!("mkfs.ext4 -q -F {}", lo.dev.display()));
    let _m = Mount::new(&lo.dev, &t.path("mnt"), "rw");
    let mnt = t.s("mnt");
    // A write to a frozen filesystem blocks (uninterruptibly) until the
    // thaw, so probe from a child and never wait on it for long.
    let mut stuck = Vec::new();
    let mut writable = || {
        let mut c = Command::new("touch").arg(t.path("mnt").join("probe")).spawn().unwrap();
        for _ in 0..150 {
            if let Some(st) = c.try_wait().unwrap() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        stuck.push(c);
        false
    };
    let guard = |deadline: &str| {
        ferry()
            .args(["freeze-guard", "--deadline-ms", deadline, "--thaw-cmd", &format!("echo thawed >> {}", t.s("hook"))])
            .arg(&mnt)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The agent dies: its end of the pipe closes.
    sh(&format!("fsfreeze -f {mnt}"));
    let mut g = guard("60000");
    drop(g.stdin.take());
    assert!(g.wait().unwrap().success());
    assert!(writable(), "thawed after the agent died");
    assert_eq!(std::fs::read_to_string(t.path("hook")).unwrap(), "thawed\n");
    // The agent overruns the deadline.
    sh(&format!("fsfreeze -f {mnt}"));
    let mut g = guard("300");
    assert!(g.wait().unwrap().success());
    assert!(writable(), "thawed at the deadline");
    // The agent finished its freeze: the guard does nothing.
    sh(&format!("fsfreeze -f {mnt}"));
    let mut g = guard("60000");
    use std::io::Write;
    g.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert!(g.wait().unwrap().success());
    let frozen = !writable();
    sh(&format!("fsfreeze -u {mnt}"));
    for mut c in stuck {
        let _ = c.wait();
    }
    assert!(frozen, "a finished freeze is the agent's to thaw");
    assert_eq!(std::fs::read_to_string(t.path("hook")).unwrap(), "thawed\nthawed\n");
}

/// A write the freeze cannot stop (here: a freeze command that does not
/// stop the writer on the raw disk) means no point is labelled, and
/// `ferry status` says why; once the writer stops, points come again.
/// (The host's loop driver has no partitions, so "a raw partition beside a
/// frozen filesystem" is modelled by a freeze that misses the writer.)
#[test]
fn writes_during_a_freeze_cut_no_point() {
    let t = TempDir::new("leaky");
    let backing = t.path("back.img");
    std::fs::File::create(&backing).unwrap().set_len(16 << 20).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("leaky");
    let _guard = Unprotect(t.path("st"));
    once(&dev, &name, &mt, &t.s("st"), &[]);
    let mut wl =
        Proc(Command::new(mkimage_bin()).args(["workload", &dev, "4096", "5", &t.s("w.log")]).stdout(Stdio::null()).spawn().unwrap());
    let count = || -> usize {
        let o = run(&["points", "--data", &t.s("data"), "--name", &name, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).map(|v| v.as_array().map_or(0, |a| a.len())).unwrap_or(0)
    };
    let n0 = count();
    let mut agent = Proc(
        ferry()
            .args(["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", &t.s("st")])
            .args(["--point-every", "0.1", "--freeze-cmd", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the agent to report that no point can be cut", 60, || {
        agent_state(&t.path("st")).is_some_and(|s| s["cut_problem"].as_str().is_some_and(|p| p.contains("written during the freeze")))
    });
    assert_eq!(count(), n0, "no point was labelled while the writer ran through the freezes");
    wl.kill9();
    wait_for("points to resume", 60, || count() > n0);
    agent.kill9();
    let log = versioned::read_log(&t.path("w.log"));
    let log = read_log_plus_one(&log, &lo.dev, 4096);
    recover_to(&t.s("data"), &name, "latest", &t.s("p.img"));
    versioned::check(&t.path("p.img"), &log, 4096).expect("the point after the writer stopped is a prefix");
}

/// A completion the kernel does not run the program for (seen, rarely, on
/// the 6.18 host: docs/decisions.md) loses nothing and needs no resync: the
/// write was seen at issue, so either its request's reuse puts its range in
/// the bitmap, or the agent ships the still-pending entry before it cuts a
/// point. The miss is injected (every 7th, and separately the 1000th,
/// 2000th and 3000th completion ignored by the program), so both ways are
/// exercised every run.
#[test]
fn completions_the_program_does_not_see_are_recovered_without_a_resync() {
    for (every, label) in [(7u32, "skip7"), (1000, "skip1000")] {
        let t = TempDir::new(label);
        let backing = t.path("back.img");
        mixed_image(&backing, 32 << 20, 52);
        let lo = LoopDev::attach(&backing);
        let dev = lo.dev.display().to_string();
        let mt = MasterTarget::start(&t.path("data"));
        let name = unique_name(label);
        let _guard = Unprotect(t.path("st"));
        let args =
            ["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", &t.s("st"), "--once", "--json"];
        let o = ferry().args(args).env("FERRY_BPF_TEST_SKIP_EVERY", every.to_string()).stdin(Stdio::null()).output().expect("run ferry");
        assert!(o.status.success(), "first agent run failed: {}", String::from_utf8_lossy(&o.stderr));
        sh(&format!("{} workload {dev} 8192 9 {} 3000", mkimage_bin().display(), t.s("w.log")));
        let s = once(&dev, &name, &mt, &t.s("st"), &[]);
        assert_eq!(s["resync"], false, "missed completions were recovered, not resynced (every {every}): {s}");
        let stats = bpf_stats(&name);
        // At least 2: a completion the kernel itself does not run the
        // program for (the behaviour this guards against) shifts the count.
        let want = if every == 1000 { 2 } else { 3000 / u64::from(every) - 10 };
        assert!(stats["injected"].as_u64().unwrap() >= want, "the program ignored completions as asked (every {every}): {stats}");
        recover_to(&t.s("data"), &name, "latest", &t.s("rec.img"));
        assert_same(&lo.dev, &t.path("rec.img"));
    }
}

/// The program's counters, read from its pinned per-CPU stats map with
/// bpftool and summed over CPUs.
fn bpf_stats(name: &str) -> serde_json::Value {
    let pin = ferry_bpf_pin(name).join("stats");
    let out = sh(&format!("bpftool map dump pinned {} -j", pin.display()));
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool JSON");
    let e = &v[0];
    let mut sum = serde_json::Map::new();
    for cpu in e.get("formatted").unwrap_or(e)["values"].as_array().expect("per-CPU values") {
        for (k, x) in cpu["value"].as_object().expect("counters") {
            let t = sum.get(k).and_then(|y| y.as_u64()).unwrap_or(0) + x.as_u64().unwrap_or(0);
            sum.insert(k.clone(), t.into());
        }
    }
    serde_json::Value::Object(sum)
}

/// The pin folder of a disk named by `unique_name` (no '.' or '_', so no
/// escaping: ferry_bpf::pin_dir).
fn ferry_bpf_pin(name: &str) -> std::path::PathBuf {
    assert!(!name.contains(['.', '_']));
    std::path::Path::new("/sys/fs/bpf/ferry").join(name)
}

/// Thaws a filesystem frozen by the test, on drop: a frozen filesystem left
/// behind hangs whatever touches it next.
struct Thaw(String);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).stderr(Stdio::null()).status();
    }
}

/// Acceptance (issue 10, item 6): a filesystem frozen by hand (`fsfreeze
/// -f`) for 10 s while the bpf agent runs: the agent tries at most twice a
/// second (backing off), logs the real error once, never logs a freeze that
/// did not happen, and cuts an app-consistent point once it is thawed.
#[test]
fn a_filesystem_frozen_by_someone_else_is_retried_slowly_and_reported_once() {
    let t = TempDir::new("frozen");
    let backing = t.path("back.img");
    std::fs::File::create(&backing).unwrap().set_len(64 << 20).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    sh(&format!("mkfs.ext4 -q -F {dev}"));
    let _m = Mount::new(&lo.dev, &t.path("mnt"), "rw");
    let mnt = t.s("mnt");
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("frozen");
    let _guard = Unprotect(t.path("st"));
    let log = t.path("agent.log");
    let mut agent = Proc(
        ferry()
            .env("RUST_LOG", "info,ferry_agent=debug")
            .args(["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", &t.s("st")])
            .args(["--point-every", "0.2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let last_app = || {
        agent_state(&t.path("st"))
            .and_then(|s| if s["last_point"]["kind"] == "app" { s["last_point"]["id"].as_u64() } else { None })
            .unwrap_or(0)
    };
    wait_for("a first app point", 60, || last_app() > 0);
    std::fs::write(t.path("mnt").join("before"), b"written before the freeze").unwrap();
    let log_len = || std::fs::metadata(&log).unwrap().len() as usize;

    // Frozen by hand. The agent's own freezes are short; retry until ours
    // is the one that holds.
    let from = log_len();
    let thaw = Thaw(mnt.clone());
    wait_for("fsfreeze -f to succeed", 30, || {
        Command::new("fsfreeze").args(["-f", &mnt]).stderr(Stdio::null()).status().unwrap().success()
    });
    // A freeze of the agent's that ended just before ours may still log.
    std::thread::sleep(Duration::from_millis(300));
    let frozen_from = log_len();
    std::thread::sleep(Duration::from_secs(10));
    let frozen_to = log_len();
    let problem = agent_state(&t.path("st")).map(|s| s["cut_problem"].to_string()).unwrap_or_default();
    let before = last_app();
    drop(thaw);
    wait_for("an app point after the thaw", 30, || last_app() > before);
    assert!(agent.alive());
    agent.kill9();

    let text = std::fs::read_to_string(&log).unwrap();
    let during = &text[from..frozen_to];
    let attempts = text[frozen_from..frozen_to].matches("freeze attempt").count();
    assert!((1..=20).contains(&attempts), "{attempts} freeze attempts in 10 s frozen (at most 2 a second):\n{during}");
    let errors: Vec<&str> = during.lines().filter(|l| l.contains("Device or resource busy")).collect();
    assert_eq!(errors.len(), 1, "the real error, logged once:\n{during}");
    assert!(errors[0].contains("FIFREEZE"), "{}", errors[0]);
    assert!(!text[frozen_from..frozen_to].contains("freeze held"), "no freeze was held while frozen by hand:\n{during}");
    assert!(problem.contains("Device or resource busy"), "status names the error: {problem}");
}

/// Acceptance (issue 10, item 4): the bpf tracker belongs to one state
/// folder. A failed `--once` says what it left attached; an agent on
/// another folder of the same name does not take it over; while agent A
/// streams with folder SA, `ferry unprotect --state SB` (a folder left by
/// an earlier `--once` of the same name) and an agent on SB are refused,
/// naming SA, and A goes on shipping untouched: no resync, and the replica
/// equals the device after a point. Unprotect also refuses while an agent
/// runs on the folder it names.
#[test]
fn unprotect_of_another_state_folder_is_refused_and_the_running_agent_is_untouched() {
    use std::os::fd::AsRawFd;
    let t = TempDir::new("owner");
    let backing = t.path("back.img");
    mixed_image(&backing, 32 << 20, 61);
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("owner");
    let (sa, sb) = (t.s("sa"), t.s("sb"));
    let _ga = Unprotect(t.path("sa"));
    let _gb = Unprotect(t.path("sb"));
    let pins = ferry_bpf_pin(&name);
    let agent = |st: &str, target: &str| -> Vec<String> {
        ["agent", "--disk", &dev, "--name", &name, "--target", target, "--tracker", "bpf", "--state", st]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let last_error = |o: &std::process::Output| -> String {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "expected a failure: {err}");
        err.lines().rfind(|l| l.starts_with("ferry: ")).unwrap_or_default().to_string()
    };

    // A failed --once (nothing listens there) says what it left attached.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut args = agent(&sb, &dead);
    args.extend(["--once", "--connect-timeout", "1"].map(String::from));
    let err = last_error(&ferry().args(&args).stdin(Stdio::null()).output().unwrap());
    assert!(
        err.contains(&format!("the bpf tracker stays attached to {dev} (pinned in {})", pins.display()))
            && err.contains(&format!("`ferry unprotect --state {sb}` detaches it")),
        "{err}"
    );
    assert!(pins.join("link").exists());
    let owner_map = || -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&sh(&format!("bpftool map show pinned {} -j", pins.join("owner").display())))
            .expect("bpftool JSON")["id"]
            .clone()
    };
    let owner_id = owner_map();

    // An earlier --once with SB: the tracker stays pinned, owned by SB (the
    // record is kept as it is), and an agent on SA does not adopt it
    // silently.
    once(&dev, &name, &mt, &sb, &[]);
    assert_eq!(owner_map(), owner_id, "the owner record is not rewritten by its own folder");
    let sb_canon = std::fs::canonicalize(&sb).unwrap().display().to_string();
    let mut args = agent(&sa, &mt.addr);
    args.push("--once".into());
    let err = last_error(&ferry().args(&args).stdin(Stdio::null()).output().unwrap());
    assert!(err.contains(&format!("belongs to state folder {sb_canon}")) && err.contains("ferry unprotect --state"), "{err}");
    run_ok(&["unprotect", "--state", &sb]);
    assert!(!pins.exists(), "SB's unprotect detached its own tracker");

    // Agent A streams with SA.
    let log = t.path("a.log");
    let mut args = agent(&sa, &mt.addr);
    args.extend(["--point-every", "0.3"].map(String::from));
    let mut a = Proc(
        ferry()
            .env("RUST_LOG", "info")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let point = || agent_state(&t.path("sa")).and_then(|s| s["last_point"]["id"].as_u64()).unwrap_or(0);
    wait_for("agent A's first point", 60, || point() > 0);
    // (A's start resynced: the replica was SB's protection.)
    let from = std::fs::metadata(&log).unwrap().len() as usize;
    let sa_canon = std::fs::canonicalize(&sa).unwrap().display().to_string();

    // SB, the old folder of the same name, can neither unprotect A's
    // tracker nor start an agent on it.
    let o = run(&["unprotect", "--state", &sb]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("belongs to state folder {sa_canon}, not {sb_canon}")) && err.contains("--force"), "{err}");
    assert!(pins.join("link").exists(), "A's tracker stays attached");
    let mut args = agent(&sb, &mt.addr);
    args.push("--once".into());
    let err = last_error(&ferry().args(&args).stdin(Stdio::null()).output().unwrap());
    assert!(err.contains(&format!("belongs to state folder {sa_canon}")), "{err}");

    // Unprotect of SA is refused while an agent runs on it (the agent holds
    // SA/agent.lock; it is taken here as well, for an agent that does not).
    let lockf =
        std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(t.path("sa").join("agent.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns; failing (the agent
    // holds the lock already) is fine.
    unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    let err = last_error(&run(&["unprotect", "--state", &sa]));
    assert!(err.contains(&format!("an agent is running on {sa}: stop it first")), "{err}");
    drop(lockf);
    assert!(pins.join("link").exists());

    // A is untouched: it ships new writes without a resync.
    sh(&format!("{} workload {dev} 8192 9 {} 500", mkimage_bin().display(), t.s("w.log")));
    let p = point();
    // p + 1 may have been under way during the writes; p + 2 was cut after.
    wait_for("two points after the writes", 60, || point() >= p + 2);
    assert!(a.alive(), "agent A still runs");
    let st: serde_json::Value = serde_json::from_str(&run_ok(&["status", "--state", &sa, "--json"])).unwrap();
    assert!(st["resync_required"].is_null() && st["mode"] == "streaming", "{st}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text[from..].contains("resync") && !text.contains("detached"), "agent A was disturbed:\n{text}");
    recover_to(&t.s("data"), &name, "latest", &t.s("rec.img"));
    assert_same(&lo.dev, &t.path("rec.img"));

    a.kill9();
    run_ok(&["unprotect", "--state", &sa]);
    assert!(!pins.exists(), "SA's unprotect detached its own tracker");
}

/// Ownership edge cases on real pins: a tracker whose owner folder is gone
/// is taken over (attached afresh); a foreign one is detached only with
/// `unprotect --force`, after which its own folder's next run resyncs; an
/// owner record that cannot be read stops the agent until `--force`.
#[test]
fn a_stale_owner_is_taken_over_and_force_detaches_a_foreign_tracker() {
    let t = TempDir::new("owner2");
    let backing = t.path("back.img");
    mixed_image(&backing, 16 << 20, 62);
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("owner2");
    let (sa, sb, sc) = (t.s("sa"), t.s("sb"), t.s("sc"));
    let _ga = Unprotect(t.path("sa"));
    let _gc = Unprotect(t.path("sc"));
    let pins = ferry_bpf_pin(&name);
    let once_out = |st: &str| {
        ferry()
            .env("RUST_LOG", "info")
            .args(["agent", "--disk", &dev, "--name", &name, "--target", &mt.addr, "--tracker", "bpf", "--state", st, "--once", "--json"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // SB's folder is removed: its tracker is nobody's; SA takes it over.
    once(&dev, &name, &mt, &sb, &[]);
    std::fs::remove_dir_all(&sb).unwrap();
    let o = once_out(&sa);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("attaching afresh"), "{}", String::from_utf8_lossy(&o.stderr));

    // SC cannot; unprotect --force from SC detaches SA's tracker, and SA's
    // next run attaches again and resyncs.
    let o = once_out(&sc);
    assert!(!o.status.success());
    let err = run(&["unprotect", "--state", &sc]);
    assert!(!err.status.success(), "SC never ran: no agent state to unprotect from");
    std::fs::create_dir_all(&sc).unwrap();
    std::fs::copy(t.path("sa").join("agent.state"), t.path("sc").join("agent.state")).unwrap();
    let err = String::from_utf8_lossy(&run(&["unprotect", "--state", &sc]).stderr).to_string();
    assert!(err.contains("belongs to state folder") && err.contains("--force"), "{err}");
    assert!(pins.join("link").exists());
    let o = run(&["unprotect", "--state", &sc, "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!pins.exists(), "--force detached it");
    let s = once(&dev, &name, &mt, &sa, &[]);
    assert_eq!(s["resync"], true, "tracking stopped in between: {s}");
    recover_to(&t.s("data"), &name, "latest", &t.s("rec.img"));
    assert_same(&lo.dev, &t.path("rec.img"));

    // An owner record that cannot be read: refused until --force.
    run_ok(&["unprotect", "--state", &sa]);
    std::fs::create_dir_all(&pins).unwrap();
    sh(&format!("bpftool map create {} type array key 4 value 4096 entries 1 name ferry_owner", pins.join("owner").display()));
    let o = once_out(&sa);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unreadable owner record") && err.contains("--force"), "{err}");
    let err = String::from_utf8_lossy(&run(&["unprotect", "--state", &sa]).stderr).to_string();
    assert!(err.contains("unreadable owner record"), "{err}");
    run_ok(&["unprotect", "--state", &sa, "--force"]);
    assert!(!pins.exists());
}

/// Issue 12 (item 6): on a loop device over a file, a discard reads back as
/// zeroes, so the agent ships it as a zero extent without reading it. An
/// ext4 with 40 MiB of new files and `fstrim` of the rest: the agent reads
/// at most the bytes written plus 8 MiB, not the trimmed free space, and
/// the replica is identical.
#[test]
fn fstrim_on_a_loop_device_is_shipped_without_reading_the_free_space() {
    let t = TempDir::new("bpftrim");
    let backing = t.path("back.img");
    std::fs::File::create(&backing).unwrap().set_len(256 << 20).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    sh(&format!("mkfs.ext4 -q -F -E nodiscard {dev}"));
    let mnt = Mount::new(&lo.dev, &t.path("mnt"), "nodiscard");
    let mt = MasterTarget::start(&t.path("data"));
    let name = unique_name("trim");
    let _guard = Unprotect(t.path("st"));
    once(&dev, &name, &mt, &t.s("st"), &[]);
    let (w0, d0) = dev_bytes_changed(&lo.dev);
    let mut rng = Rng::new(12);
    let mut b = vec![0u8; 4 << 20];
    for i in 0..10 {
        rng.fill(&mut b);
        std::fs::write(t.path("mnt").join(format!("f{i}")), &b).unwrap();
    }
    sh(&format!("sync -f {m} && fstrim {m}", m = t.path("mnt").display()));
    let (w1, d1) = dev_bytes_changed(&lo.dev);
    let (written, discarded) = (w1 - w0, d1 - d0);
    assert!(discarded > 100 << 20, "fstrim discarded only {discarded} bytes: the test tests nothing");
    let s = once(&dev, &name, &mt, &t.s("st"), &[]);
    let read = s["bytes_read"].as_u64().unwrap();
    eprintln!("written {written}, discarded {discarded}, read {read}");
    assert!(read <= written + (8 << 20), "read {read} bytes for {written} written (and {discarded} discarded)");
    mnt.umount();
    once(&dev, &name, &mt, &t.s("st"), &[]);
    recover_to(&t.s("data"), &name, "latest", &t.s("last.img"));
    assert_same(&lo.dev, &t.path("last.img"));
}
