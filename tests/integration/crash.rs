//! Crashes: SIGKILL of the master target or the agent, and what survives.

use ferry_ring::Ring;
use ferry_tests::versioned::{self, Workload};
use ferry_tests::*;
use std::fs::OpenOptions;
use std::process::Stdio;
use std::time::Duration;

/// Acceptance: SIGKILL of the master target in the middle of the initial
/// sync, then a restart of both: the sync completes without starting over
/// (total bytes sent < 1.3 x disk size) and the replica is identical.
#[test]
fn master_target_killed_mid_initial_sync_resumes_without_starting_over() {
    let t = TempDir::new("mtkill");
    let img = t.path("src.img");
    let size = 1u64 << 30;
    mixed_image(&img, size, 11);
    let mut mt = MasterTarget::start(&t.path("data"));
    let agent_args = [
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        "vm",
        "--target",
        &mt.addr,
        "--tracker",
        "scan",
        "--state",
        &t.s("st"),
        "--once",
        "--json",
    ];
    let mut agent = Proc(ferry().args(agent_args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
    let st = t.path("st");
    wait_for("the initial sync to be between 30% and 80% durable", 120, || {
        let c = agent_state(&st).and_then(|s| s["sync_cursor"].as_u64()).unwrap_or(0);
        assert!(c < size, "initial sync finished before the kill");
        c >= size * 3 / 10 && c <= size * 8 / 10
    });
    mt.proc.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.alive(), "the agent retries rather than dying when the master target goes away");
    let first_run_bytes = agent.wchar();
    agent.kill9();
    let cursor = agent_state(&st).unwrap()["sync_cursor"].as_u64().unwrap();
    assert!(cursor > 0 && cursor < size);

    let mt2 = MasterTarget::start(&t.path("data"));
    let mut args = agent_args;
    args[6] = &mt2.addr;
    let s = summary(&run_ok(&args));
    let total = first_run_bytes + s["bytes_sent"].as_u64().unwrap();
    assert!(total * 10 < size * 13, "sent {total} bytes in all for a {size}-byte disk: the sync started over");
    assert!(s["bytes_read"].as_u64().unwrap() < size - cursor + (64 << 20) + size / 100, "second run re-read too much: {s}");
    recover_to(&t.s("data"), "vm", "latest", &t.s("rec.img"));
    assert_same(&img, &t.path("rec.img"));
}

/// Acceptance: SIGKILL of the agent in the middle of continuous shipping,
/// restart: nothing lost, identical; no full resync. Every point cut while
/// the workload ran is a prefix of its write log.
#[test]
fn agent_killed_during_continuous_shipping_loses_nothing() {
    let t = TempDir::new("agentkill");
    let blocks = 4096u64; // 16 MiB
    let img = t.path("src.img");
    std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
    let st = t.path("st");
    std::fs::create_dir_all(&st).unwrap();
    let ring = Ring::create(&st.join("ring"), 1 << 16).unwrap();
    let mt = MasterTarget::start(&t.path("data"));
    let args = [
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        "vm",
        "--target",
        &mt.addr,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--point-every",
        "0.2",
    ];
    let disk = OpenOptions::new().write(true).open(&img).unwrap();
    let mut w = Workload::new(blocks, 5);

    let mut agent = Proc(ferry().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let write_for = |w: &mut Workload, n: usize| {
        for k in 0..n {
            w.write(&disk, Some(&ring));
            if k % 16 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    write_for(&mut w, 1500);
    wait_for("the agent to finish its initial sync and ship", 60, || agent_state(&st).is_some_and(|s| s["sync_cursor"].is_null()));
    write_for(&mut w, 1500);
    agent.kill9();
    write_for(&mut w, 1500); // tracked while no agent runs
    let mut agent = Proc(ferry().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    write_for(&mut w, 1500);
    wait_for("the ring to drain", 60, || ring.consumer() == ring.producer());
    agent.kill9();

    let mut once = args.to_vec();
    once.extend(["--once", "--json"]);
    let s = summary(&run_ok(&once));
    assert_eq!(s["initial_sync"], false, "{s}");
    assert_eq!(s["resync"], false, "{s}");
    recover_to(&t.s("data"), "vm", "latest", &t.s("rec.img"));
    assert_same(&img, &t.path("rec.img"));
    assert_eq!(versioned::check(&t.path("rec.img"), &w.log, blocks), Ok(w.log.len() as u64));

    let n = point_ids(&t.s("data"), "vm").len();
    assert!(n >= 2, "points were cut while the workload ran: {n}");
    check_every_point(&t.s("data"), "vm", &w.log, blocks, &t.0, "after the agent was killed");
}

/// The checker itself: it must reject a state that is not a prefix.
#[test]
fn versioned_checker_rejects_a_state_that_is_not_a_prefix() {
    let t = TempDir::new("checker");
    let img = t.path("d.img");
    let blocks = 64;
    std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
    let disk = OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut w = Workload::new(blocks, 9);
    for _ in 0..200 {
        w.write(&disk, None);
    }
    assert_eq!(versioned::check(&img, &w.log, blocks), Ok(200));
    // Roll one block back to an older version that the newest write left
    // alone: no prefix of the log gives that state.
    use std::os::unix::fs::FileExt;
    let b = w.log[199];
    let (older, ob) = w.log.iter().enumerate().rev().map(|(i, &x)| (i as u64 + 1, x)).find(|&(_, x)| x != b).unwrap();
    let prev = w.log[..older as usize - 1].iter().rposition(|&x| x == ob);
    let content = match prev {
        Some(i) => versioned::stamp(i as u64 + 1, ob),
        None => vec![0u8; 4096],
    };
    disk.write_all_at(&content, ob * 4096).unwrap();
    assert!(versioned::check(&img, &w.log, blocks).is_err());
    // Foreign content is rejected too.
    disk.write_all_at(&[0xAB; 4096], 0).unwrap();
    assert!(versioned::check(&img, &w.log, blocks).unwrap_err().contains("no logged write"));
}

/// The checker for a workload with writes in flight together: the state
/// after the settled writes plus any of the last `depth` passes, a settled
/// write rolled back does not; the workload itself (threads, O_DIRECT)
/// leaves the disk in its log's final state.
#[test]
fn windowed_checker_accepts_writes_in_flight_and_rejects_a_lost_settled_one() {
    use std::os::unix::fs::FileExt;
    let t = TempDir::new("checkerwin");
    let blocks = 256u64;
    let dev = t.path("dev.img");
    std::fs::File::create(&dev).unwrap().set_len(blocks * 4096).unwrap();
    let rate = versioned::run_workload_rate(&dev, blocks, 5, &t.path("w.log"), 3000, 1_000_000, 8).expect("the workload runs");
    assert!(rate > 0.0);
    let log = versioned::read_log(&t.path("w.log"));
    assert_eq!(log.len(), 3000);
    assert_eq!(versioned::check_window(&dev, &log, blocks, 8), Ok(3000));
    assert_eq!(versioned::check(&dev, &log, blocks), Ok(3000), "each block ends with its last logged write");
    // A state the writers could leave at write 1000: every write up to 992,
    // then of 993..=1000 all but one.
    let build = |path: &std::path::Path, skip: &[u64]| {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(blocks * 4096).unwrap();
        for (n, &b) in log.iter().take(1000).enumerate() {
            let i = n as u64 + 1;
            if !skip.contains(&i) {
                f.write_all_at(&versioned::stamp(i, b), b * 4096).unwrap();
            }
        }
    };
    let img = t.path("win.img");
    // A skipped write shows only if no later write up to 1000 hit its block.
    let later = |i: u64| log[i as usize..1000].contains(&log[i as usize - 1]);
    let w = (993..1000u64).find(|&i| !later(i)).expect("a write of the window not overwritten before 1000");
    build(&img, &[w]);
    assert_eq!(versioned::check_window(&img, &log, blocks, 8), Ok(1000));
    assert!(versioned::check(&img, &log, blocks).is_err(), "one at a time, write {w} is missing");
    // A settled write (the newest to its block by 992, not overwritten
    // later up to 1000) missing: rejected.
    let settled = (1..=992u64).rev().find(|&i| !later(i)).unwrap();
    build(&img, &[settled]);
    let e = versioned::check_window(&img, &log, blocks, 8).unwrap_err();
    assert!(e.contains("completed before write 1000"), "{e}");
}

/// A ring that disappears (an operator removed a damaged one, say) loses
/// the records it held: the agent must resync by checksum, not trust the
/// new, empty ring.
#[test]
fn recreated_ring_forces_a_checksum_resync() {
    let t = TempDir::new("ringgone");
    let img = t.path("src.img");
    mixed_image(&img, 8 << 20, 41);
    let mt = MasterTarget::start(&t.path("data"));
    let args = [
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        "vm",
        "--target",
        &mt.addr,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--once",
        "--json",
    ];
    let s = summary(&run_ok(&args));
    assert_eq!(s["initial_sync"], true);
    // Writes the ring records, then the ring is lost with records in it.
    let ring = Ring::open(&t.path("st").join("ring")).unwrap();
    let disk = OpenOptions::new().write(true).open(&img).unwrap();
    let mut w = Workload::new(2048, 42);
    for _ in 0..50 {
        w.write(&disk, Some(&ring));
    }
    drop(ring);
    std::fs::remove_file(t.path("st").join("ring")).unwrap();
    let s = summary(&run_ok(&args));
    assert_eq!(s["resync"], true, "{s}");
    recover_to(&t.s("data"), "vm", "latest", &t.s("rec.img"));
    assert_same(&img, &t.path("rec.img"));
}

/// With --freeze-cmd the ring tracker cuts an app-consistent point between
/// the freeze and the thaw commands.
#[test]
fn freeze_and_thaw_commands_bracket_an_app_point() {
    let t = TempDir::new("freeze");
    mixed_image(&t.path("src.img"), 4 << 20, 43);
    let mt = MasterTarget::start(&t.path("data"));
    let freeze = format!("echo frozen >> {}", t.s("hooks.log"));
    let thaw = format!("echo thawed >> {}", t.s("hooks.log"));
    let s = summary(&run_ok(&[
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        "vm",
        "--target",
        &mt.addr,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--once",
        "--json",
        "--freeze-cmd",
        &freeze,
        "--thaw-cmd",
        &thaw,
    ]));
    assert_eq!(s["point_kind"], "app", "{s}");
    assert_eq!(std::fs::read_to_string(t.path("hooks.log")).unwrap(), "frozen\nthawed\n");
    let o = run(&[
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        "vm",
        "--target",
        &mt.addr,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--once",
        "--freeze-cmd",
        "exit 3",
        "--thaw-cmd",
        &thaw,
    ]);
    assert_eq!(o.status.code(), Some(1), "a failing freeze command cuts no point");
    assert!(String::from_utf8_lossy(&o.stderr).contains("freeze command"));
}

/// The scan tracker under --freeze-cmd: the verify pass runs between the
/// freeze and the thaw commands, each run once; a pass that outlasts
/// --freeze-cap thaws without labelling a point, and says why.
#[test]
fn scan_under_a_freeze_command_thaws_once_and_respects_the_cap() {
    let t = TempDir::new("scanfreeze");
    mixed_image(&t.path("src.img"), 16 << 20, 44);
    let mt = MasterTarget::start(&t.path("data"));
    let freeze = format!("echo frozen >> {}", t.s("hooks.log"));
    let thaw = format!("echo thawed >> {}", t.s("hooks.log"));
    let agent = |name: &str, cap: &str| {
        run(&[
            "agent",
            "--disk",
            &t.s("src.img"),
            "--name",
            name,
            "--target",
            &mt.addr,
            "--tracker",
            "scan",
            "--state",
            &t.s(name),
            "--once",
            "--json",
            "--freeze-cmd",
            &freeze,
            "--thaw-cmd",
            &thaw,
            "--freeze-cap",
            cap,
        ])
    };
    let o = agent("ok", "60");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(summary(&String::from_utf8_lossy(&o.stdout))["point_kind"], "app");
    assert_eq!(std::fs::read_to_string(t.path("hooks.log")).unwrap(), "frozen\nthawed\n", "thawed once, by the agent");
    std::fs::remove_file(t.path("hooks.log")).unwrap();
    // A 16 MiB verify pass takes longer than a microsecond.
    let o = agent("capped", "0.000001");
    assert_eq!(o.status.code(), Some(1), "no point when the pass outlasts the cap");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("longer than --freeze-cap"), "{err}");
    assert_eq!(std::fs::read_to_string(t.path("hooks.log")).unwrap(), "frozen\nthawed\n", "thawed once");
    let pts: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", &t.s("data"), "--name", "capped", "--json"])).unwrap();
    assert!(pts.as_array().unwrap().iter().all(|p| p["kind"] != "app"), "no app point was labelled: {pts}");
}

/// Acceptance (master target issue): SIGKILL of the master target during
/// journal writes, at many random moments, under a versioned workload on a
/// few hot blocks (so that batches mix first writes, journaled, and
/// rewrites, kept in the batch journal): each restart repairs the tail, and
/// at the end every listed point recovers to a prefix of the log and the
/// latest equals the source.
#[test]
fn master_target_killed_at_random_moments_keeps_every_point_recoverable() {
    let t = TempDir::new("mtkill-many");
    let blocks = 64u64; // 256 KiB: hot blocks
    let img = t.path("src.img");
    std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
    let st = t.path("st");
    std::fs::create_dir_all(&st).unwrap();
    let ring = Ring::create(&st.join("ring"), 1 << 16).unwrap();
    let data = t.path("data");
    let mut mt = MasterTarget::start(&data);
    let addr = mt.addr.clone();
    let args = [
        "agent",
        "--disk",
        &t.s("src.img"),
        "--name",
        "hot",
        "--target",
        &addr,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--point-every",
        "0.05",
    ];
    let disk = OpenOptions::new().write(true).open(&img).unwrap();
    let mut w = Workload::new(blocks, 17);
    let mut agent = Proc(ferry().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    // Every point kept: the default journal cap (the disk's 256 KiB) would
    // keep only the last few of these hot-block intervals.
    wait_for("the disk's folder", 30, || data.join("hot").join("disk.meta").exists());
    run_ok(&["retention", "--data", &t.s("data"), "--name", "hot", "--keep", "none", "--keep-all", "none", "--journal-cap", "none"]);
    let mut rng = Rng::new(99);
    let mut kills = 0;
    let points_now = || point_ids(&t.s("data"), "hot").len();
    // At least 25 kills, and on until there are 10 points to check (a busy
    // machine cuts fewer quiet points per run); 200 kills at most.
    while kills < 25 || (kills < 200 && points_now() < 10) {
        let until = std::time::Instant::now() + Duration::from_millis(100 + rng.below(400));
        while std::time::Instant::now() < until {
            for _ in 0..6 {
                w.write(&disk, Some(&ring));
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        mt.proc.kill9();
        kills += 1;
        mt = MasterTarget::start_at(&data, &addr);
    }
    wait_for("the ring to drain", 60, || ring.consumer() == ring.producer());
    agent.kill9();
    let mut once = args.to_vec();
    once.extend(["--once", "--json"]);
    let s = summary(&run_ok(&once));
    assert_eq!(s["resync"], false, "{s}");
    recover_to(&t.s("data"), "hot", "latest", &t.s("rec.img"));
    assert_same(&img, &t.path("rec.img"));
    let n = point_ids(&t.s("data"), "hot").len();
    eprintln!("{n} points over {kills} restarts");
    assert!(n >= 10, "{n} points over {kills} restarts");
    check_every_point(&t.s("data"), "hot", &w.log, blocks, &t.0, &format!("after {kills} kills"));
    let log = mt.log();
    // The replica's sums went through every kill too: verify finds nothing,
    // while the master target still serves the folder.
    let v = run(&["verify", "--data", &t.s("data"), "--name", "hot"]);
    assert!(v.status.success(), "verify after {kills} kills: {}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    drop(mt);
    eprintln!(
        "{kills} kills, {} repairs that rolled back or cut a journal tail, {} re-hashed a batch",
        log.matches("rolled back").count(),
        log.matches("hashing").count()
    );
    assert!(!log.contains("damaged"), "{log}");
}

/// The two-disk checker (consistency groups): it accepts both disks after
/// one prefix of the log, and rejects a pair cut at two different moments.
#[test]
fn two_disk_checker_rejects_disks_from_different_moments() {
    let t = TempDir::new("checker2");
    let blocks = 32u64;
    let (a, b, log) = (t.path("a.img"), t.path("b.img"), t.path("w.log"));
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(blocks * 4096).unwrap();
    }
    // Half the writes, copies of both disks (one instant), the rest.
    versioned::run_workload2([&a, &b], blocks, 3, &log, 150, Duration::ZERO).unwrap_or_else(|e| panic!("{e}"));
    let (a1, b1) = (t.path("a1.img"), t.path("b1.img"));
    std::fs::copy(&a, &a1).unwrap();
    std::fs::copy(&b, &b1).unwrap();
    let log_at_150 = std::fs::read_to_string(&log).unwrap();
    // (The workload restarts its numbering: continue it by hand instead.)
    let mut full = log_at_150.clone();
    let lines: Vec<(usize, u64)> = log_at_150
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            (it.next().unwrap().parse().unwrap(), it.next().unwrap().parse().unwrap())
        })
        .collect();
    let mut rng = Rng::new(4);
    let files = [OpenOptions::new().write(true).open(&a).unwrap(), OpenOptions::new().write(true).open(&b).unwrap()];
    use std::os::unix::fs::FileExt;
    for i in lines.len() as u64 + 1..=300 {
        let (d, blk) = (rng.below(2) as usize, rng.below(blocks));
        files[d].write_all_at(&versioned::stamp(i, blk), blk * 4096).unwrap();
        full.push_str(&format!("{d} {blk}\n"));
    }
    std::fs::write(&log, full).unwrap();
    assert_eq!(versioned::check2([&a, &b], &log, blocks), Ok(300));
    assert_eq!(versioned::check2([&a1, &b1], &log, blocks), Ok(150));
    // Disk A from the end, disk B from the middle: not one instant (as long
    // as B was written after write 150, which 150 random writes make sure).
    assert!(versioned::check2([&a, &b1], &log, blocks).is_err(), "a pair from two moments must be rejected");
}
