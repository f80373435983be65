//! Integrity (issue 11, first part): a damaged master target folder never
//! yields a wrong image. Six points from the versioned workload; each
//! damage is made on a copy of the folder, and every recovery that succeeds
//! is checked by the workload's checker.

use ferry_proto::{read_frame, write_msg, Msg, VERSION_MAX};
use ferry_tests::versioned::{self, Workload};
use ferry_tests::*;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BLOCKS: u64 = 1024; // 4 MiB disk

/// A folder with six points, and the write log each point is a prefix of.
struct Six {
    t: TempDir,
    log: Vec<u64>,
    /// log length at each point (id 1..=6).
    at: Vec<usize>,
}

fn six_points() -> Six {
    let t = TempDir::new("damage");
    let img = t.path("a.img");
    std::fs::File::create(&img).unwrap().set_len(BLOCKS * 4096).unwrap();
    let disk = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mt = MasterTarget::start(&t.path("data"));
    let mut w = Workload::new(BLOCKS, 77);
    let mut at = Vec::new();
    for _ in 0..6 {
        for _ in 0..400 {
            w.write(&disk, None);
        }
        disk.sync_all().unwrap();
        scan_once(&t.s("a.img"), "vm", &mt.addr, &t.s("st"));
        if at.is_empty() {
            // Every point kept: the default journal cap (the disk's size)
            // would drop the oldest of these.
            run_ok(&["retention", "--data", &t.s("data"), "--name", "vm", "--keep", "none", "--keep-all", "none", "--journal-cap", "none"]);
        }
        at.push(w.log.len());
    }
    drop(mt);
    Six { t, log: w.log, at }
}

impl Six {
    /// A copy of the folder, damaged by `f`.
    fn copy(&self, tag: &str, f: impl FnOnce(&Path)) -> PathBuf {
        let d = self.t.path(&format!("copy-{tag}"));
        sh(&format!("cp -a {} {}", self.t.path("data").display(), d.display()));
        f(&d.join("vm"));
        d
    }
    /// Recover point `id` from `data`: Ok(()) when it passes the checker
    /// at exactly its prefix; Err(stderr) when refused. A wrong image that
    /// came out with exit 0 panics.
    fn recover(&self, data: &Path, id: u64) -> Result<(), String> {
        let out = data.with_extension(format!("p{id}.img"));
        let o = run(&[
            "recover",
            "--data",
            &data.display().to_string(),
            "--name",
            "vm",
            "--point",
            &id.to_string(),
            "--out",
            &out.display().to_string(),
            "--force",
        ]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() {
            assert!(!err.contains("panicked"), "{err}");
            let _ = std::fs::remove_file(&out);
            return Err(err);
        }
        let want = self.at[id as usize - 1];
        match versioned::check(&out, &self.log[..want], BLOCKS) {
            Ok(n) if n as usize == want => {}
            other => panic!("point {id} recovered with exit 0 but is wrong: {other:?} (want a prefix of {want} writes)"),
        }
        let _ = std::fs::remove_file(&out);
        Ok(())
    }
    fn listed(&self, data: &Path) -> (Vec<u64>, String) {
        let o = run(&["points", "--data", &data.display().to_string(), "--name", "vm", "--json"]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() {
            return (Vec::new(), err);
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v.as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect(), err)
    }
}

/// `ferry verify` on `data` must exit 1 and name `needle` on stdout/stderr.
fn verify_finds(data: &Path, needle: &str) {
    let o = run(&["verify", "--data", &data.display().to_string(), "--name", "vm"]);
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "verify missed the damage: {all}");
    assert!(all.contains(needle), "{needle:?} not in: {all}");
    assert!(!all.contains("panicked"), "{all}");
}

/// Run a master target on `data` and an agent `--once` against it: the
/// agent must be refused with `needle`, and the folder's files unchanged.
fn stream_is_refused(six: &Six, data: &Path, needle: &str) {
    let before = tree_digest(&data.join("vm"));
    let mt = MasterTarget::start(data);
    let o = run(&[
        "agent",
        "--disk",
        &six.t.s("a.img"),
        "--name",
        "vm",
        "--target",
        &mt.addr,
        "--tracker",
        "scan",
        "--state",
        &six.t.s("st"),
        "--once",
        "--connect-timeout",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the agent's stream was accepted into a damaged folder");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
    drop(mt);
    let _ = std::fs::remove_file(data.with_extension("mt.log"));
    assert_eq!(tree_digest(&data.join("vm")), before, "the master target changed a damaged folder");
}

#[test]
fn a_damaged_folder_never_yields_a_wrong_image() {
    let six = six_points();
    let data = six.t.path("data");
    let (ids, _) = six.listed(&data);
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
    for id in 1..=6 {
        six.recover(&data, id).unwrap_or_else(|e| panic!("undamaged point {id}: {e}"));
    }
    let v = run(&["verify", "--data", &data.display().to_string(), "--name", "vm"]);
    assert!(v.status.success(), "verify of an undamaged folder: {}", String::from_utf8_lossy(&v.stdout));

    // One byte flipped in catalog record 2: the other five are listed and
    // recover; the damage is named; nothing is trimmed.
    let d = six.copy("cat", |f| {
        let p = f.join("points.log");
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        file.write_all_at(&[0xa5], 64 + 17).unwrap();
    });
    let (ids, err) = six.listed(&d);
    assert_eq!(ids, vec![1, 3, 4, 5, 6], "{err}");
    assert!(err.contains("points.log") && err.contains("record 2 at byte 64"), "{err}");
    for id in [1, 3, 4, 5, 6] {
        six.recover(&d, id).unwrap_or_else(|e| panic!("point {id}: {e}"));
    }
    assert!(six.recover(&d, 2).is_err());
    verify_finds(&d, "catalog record 2");
    {
        // A master target and an agent's stream: the records are not trimmed.
        let mt = MasterTarget::start(&d);
        scan_once(&six.t.s("a.img"), "vm", &mt.addr, &six.t.s("st-cat"));
    }
    let (ids, _) = six.listed(&d);
    assert_eq!(&ids[..5], &[1, 3, 4, 5, 6], "valid records after the damaged one were trimmed");
    assert_eq!(std::fs::metadata(d.join("vm/points.log")).unwrap().len() % 64, 0);

    // disk.meta deleted: damaged, not absent; the stream is refused and the
    // folder untouched; `ferry repair` rebuilds it and every point recovers.
    let d = six.copy("meta", |f| std::fs::remove_file(f.join("disk.meta")).unwrap());
    let (_, err) = six.listed(&d);
    assert!(err.contains("disk.meta is missing") && err.contains("ferry repair"), "{err}");
    stream_is_refused(&six, &d, "disk.meta is missing");
    verify_finds(&d, "disk.meta is missing");
    let out = run_ok(&["repair", "--data", &d.display().to_string(), "--name", "vm"]);
    assert!(out.contains("rebuilt"), "{out}");
    for id in 1..=6 {
        six.recover(&d, id).unwrap_or_else(|e| panic!("point {id} after repair: {e}"));
    }

    // The catalog deleted: damaged, refused.
    let d = six.copy("nocat", |f| std::fs::remove_file(f.join("points.log")).unwrap());
    let (_, err) = six.listed(&d);
    assert!(err.contains("points.log is missing"), "{err}");
    stream_is_refused(&six, &d, "points.log is missing");
    verify_finds(&d, "points.log is missing");

    // The replica truncated to half: every recovery refused, naming the file.
    let d = six.copy("half", |f| {
        std::fs::OpenOptions::new().write(true).open(f.join("replica.img")).unwrap().set_len(BLOCKS * 4096 / 2).unwrap();
    });
    for id in 1..=6 {
        let e = six.recover(&d, id).expect_err("a half replica must be refused");
        assert!(e.contains("replica.img") && e.contains("bytes but the disk is"), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    verify_finds(&d, "the replica is 2097152 bytes, the disk 4194304");

    // The journal cut short, by half or by 1,000 bytes: every point refused,
    // naming the file; the stream refused and the folder untouched (the
    // master target must not roll back committed data); repair starts the
    // points over and keeps the replica.
    for (tag, cut) in [("jhalf", 0.5f64), ("j1000", -1000.0)] {
        let d = six.copy(tag, |f| {
            let p = f.join("journal.fj");
            let len = std::fs::metadata(&p).unwrap().len();
            let to = if cut > 0.0 { (len as f64 * cut) as u64 } else { len - 1000 };
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(to).unwrap();
        });
        for id in 1..=6 {
            let e = six.recover(&d, id).expect_err("a journal cut short must be refused");
            assert!(e.contains("journal.fj") && e.contains("missing at the end"), "{e}");
        }
        stream_is_refused(&six, &d, "missing at the end");
        verify_finds(&d, "missing at the end");
        let out = run_ok(&["repair", "--data", &d.display().to_string(), "--name", "vm"]);
        assert!(out.contains("missing records at its end"), "{out}");
        assert!(six.listed(&d).0.is_empty());
        let replica = std::fs::read(d.join("vm/replica.img")).unwrap();
        assert_eq!(replica, std::fs::read(six.t.path("a.img")).unwrap(), "repair kept the replica");
    }

    // A byte flipped in the replica: every recovery refused, naming the
    // replica and the chunk.
    let d = six.copy("rflip", |f| {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(f.join("replica.img")).unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 1_000_000).unwrap();
        file.write_all_at(&[b[0] ^ 1], 1_000_000).unwrap();
    });
    for id in 1..=6 {
        let e = six.recover(&d, id).expect_err("a flipped replica byte must be refused");
        assert!(e.contains("replica.img") && e.contains("chunk at byte 983040"), "{e}");
    }
    verify_finds(&d, "DAMAGE replica.img at byte 983040 (+65536 bytes)");

    // A byte flipped in the journal in the middle: the points before it are
    // refused, naming the file, the offset and the points; later ones recover.
    let d = six.copy("jflip", |f| {
        let p = f.join("journal.fj");
        let len = std::fs::metadata(&p).unwrap().len();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, len / 2).unwrap();
        file.write_all_at(&[b[0] ^ 0x40], len / 2).unwrap();
    });
    let mut refused = 0;
    for id in 1..=6 {
        match six.recover(&d, id) {
            Ok(()) => {}
            Err(e) => {
                refused += 1;
                assert!(e.contains("journal.fj") && e.contains("bad record at byte") && e.contains("cannot be recovered"), "{e}");
            }
        }
    }
    assert!(refused >= 1, "a flipped journal byte went unnoticed");
    assert!(six.recover(&d, 6).is_ok(), "the newest point does not need the damaged middle");
    verify_finds(&d, "a bad journal record with committed records after it");
    // `ferry repair` drops exactly the points the damage takes.
    let out = run_ok(&["repair", "--data", &d.display().to_string(), "--name", "vm"]);
    assert!(out.contains("damaged at byte"), "{out}");
    let (ids, _) = six.listed(&d);
    assert_eq!(ids.len(), 6 - refused, "{out}");
    for id in ids {
        six.recover(&d, id).unwrap();
    }
}

/// An OPEN with an impossible size is refused and leaves no folder behind.
#[test]
fn an_impossible_disk_size_leaves_no_folder() {
    let t = TempDir::new("hugeopen");
    let mt = MasterTarget::start(&t.path("data"));
    let mut s = TcpStream::connect(&mt.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_msg(&mut s, &Msg::Hello { min: 1, max: VERSION_MAX, peer: "test".into() }).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Some(Msg::HelloAck { .. })));
    write_msg(&mut s, &Msg::Open { name: "huge".into(), size: 1 << 62, generation: [1; 16] }).unwrap();
    match read_frame(&mut s) {
        Ok(Some(Msg::Error { msg, .. })) => assert!(msg.contains("more than this master target supports"), "{msg}"),
        other => panic!("expected an ERROR, got {other:?}"),
    }
    assert!(!t.path("data").join("huge").exists(), "a refused OPEN left a folder behind");
}

/// Acceptance: a byte flipped in the replica is found by `ferry verify` and
/// by `ferry agent --verify`; `--repair` re-sends only the damaged piece,
/// and the recovery is right again.
#[test]
fn a_flipped_replica_byte_is_found_online_and_repaired_alone() {
    let t = TempDir::new("onlineverify");
    mixed_image(&t.path("a.img"), 8 << 20, 31);
    let mt = MasterTarget::start(&t.path("data"));
    scan_once(&t.s("a.img"), "ov", &mt.addr, &t.s("st"));
    let replica = t.path("data").join("ov").join("replica.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&replica).unwrap();
    let at = 3 * (1 << 20) + 12345;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    f.sync_all().unwrap();

    let v = run(&["verify", "--data", &t.s("data"), "--name", "ov"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(1), "{out}");
    assert!(out.contains(&format!("DAMAGE replica.img at byte {} (+65536 bytes)", at / 65536 * 65536)), "{out}");

    let (img, st) = (t.s("a.img"), t.s("st"));
    let agent = |extra: &[&str]| {
        let mut a =
            vec!["agent", "--disk", &img, "--name", "ov", "--target", &mt.addr, "--tracker", "scan", "--state", &st, "--json", "--verify"];
        a.extend_from_slice(extra);
        run(&a)
    };
    let o = agent(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("differs from the source in 1 range(s) (4096 bytes)"), "{err}");
    let s = summary(&String::from_utf8_lossy(&o.stdout));
    let piece = at / 4096 * 4096;
    assert_eq!(s["verify_differing"], serde_json::json!([[piece, piece + 4096]]), "{s}");

    let o = agent(&["--repair"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = summary(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(s["repaired_bytes"], 4096, "{s}");
    assert!(s["bytes_sent"].as_u64().unwrap() < 64 << 10, "the repair sent more than the damaged piece: {s}");
    let v = run(&["verify", "--data", &t.s("data"), "--name", "ov"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    recover_to(&t.s("data"), "ov", "latest", &t.s("r.img"));
    assert_same(&t.path("a.img"), &t.path("r.img"));
}

/// Acceptance: a master target folder on a small filesystem filled to
/// ENOSPC: `ferry retention` still tightens the policy, space comes back,
/// and replication resumes without a resync.
#[test]
fn a_full_filesystem_frees_space_by_retention_and_replication_resumes() {
    let t = TempDir::new("enospc");
    let back = t.path("fs.img");
    std::fs::File::create(&back).unwrap().set_len(48 << 20).unwrap();
    sh(&format!("mkfs.ext4 -q -F -m 0 {}", back.display()));
    let lo = LoopDev::attach(&back);
    let mnt = Mount::new(&lo.dev, &t.path("mnt"), "rw");
    let data = t.path("mnt").join("data");
    let size: u64 = 8 << 20;
    let img = t.path("a.img");
    let mut rng = Rng::new(5);
    let mut buf = vec![0u8; size as usize];
    rng.fill(&mut buf);
    std::fs::write(&img, &buf).unwrap();
    let mt = MasterTarget::start(&data);
    scan_once(&t.s("a.img"), "full", &mt.addr, &t.s("st"));
    // No limits at all: the journal grows until the filesystem is full.
    run_ok(&["retention", "--data", &data.display().to_string(), "--name", "full", "--keep", "none", "--journal-cap", "none"]);
    let mut agent = Proc(
        ferry()
            .args(["agent", "--disk", &t.s("a.img"), "--name", "full", "--target", &mt.addr, "--tracker", "scan", "--state", &t.s("st")])
            .args(["--point-every", "0.2"])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(t.path("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // Rewrite the whole image again and again: every round costs its size
    // in pre-images.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut rounds = 0;
    while !mt.log().contains("No space left on device") {
        assert!(rounds < 40, "the filesystem never filled: {}", mt.log());
        rng.fill(&mut buf);
        f.write_all_at(&buf, 0).unwrap();
        f.sync_all().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        rounds += 1;
    }
    // The final content, written while the folder is full.
    rng.fill(&mut buf);
    f.write_all_at(&buf, 0).unwrap();
    f.sync_all().unwrap();
    let points_before = point_ids(&data.display().to_string(), "full").len();
    let o = run(&["retention", "--data", &data.display().to_string(), "--name", "full", "--journal-cap", "1M"]);
    assert!(o.status.success(), "retention on a full filesystem: {}", String::from_utf8_lossy(&o.stderr));
    // Space comes back and replication resumes: a point with the final content.
    wait_for("the final content to be replicated", 90, || {
        let st = agent_state(&t.path("st")).unwrap_or_default();
        if st["last_point"].is_null() {
            return false;
        }
        let r = t.path("r.img");
        let ok = run(&[
            "recover",
            "--data",
            &data.display().to_string(),
            "--name",
            "full",
            "--point",
            "latest",
            "--out",
            &r.display().to_string(),
        ])
        .status
        .success()
            && std::fs::read(&r).unwrap() == buf;
        let _ = std::fs::remove_file(&r);
        ok
    });
    assert!(agent.alive(), "the agent gave up");
    let st = agent_state(&t.path("st")).unwrap();
    assert!(st["resync_required"].is_null(), "{st}");
    let alog = std::fs::read_to_string(t.path("agent.log")).unwrap();
    assert!(!alog.contains("resync required"), "{alog}");
    assert!(alog.contains("No space left on device"), "the agent never saw the full filesystem: {alog}");
    assert!(point_ids(&data.display().to_string(), "full").len() < points_before + 20, "retention did not drop points");
    let (free, _) = fs_free(&t.path("mnt"));
    assert!(free > 4 << 20, "no space came back: {free} bytes free");
    agent.kill9();
    drop(mt);
    mnt.umount();
}

fn fs_free(p: &Path) -> (u64, u64) {
    let o = sh(&format!("df -B1 --output=avail,size {} | tail -1", p.display()));
    let v: Vec<u64> = o.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1])
}

/// A master target killed mid-batch with no agent coming back (the source
/// site is gone: the day failover is needed): `ferry verify` and every
/// recovery settle the folder (roll back the torn batch, hash again what
/// the sums may have missed) instead of calling it damaged; every point
/// passes the checker. Five kills at random moments, each on its own.
#[test]
fn a_folder_left_by_a_killed_master_target_recovers_with_no_agent_back() {
    use ferry_ring::Ring;
    let t = TempDir::new("mtgone");
    let blocks = 256u64;
    let mut rng = Rng::new(4242);
    for round in 0..5 {
        let img = t.path(&format!("src{round}.img"));
        std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
        let st = t.path(&format!("st{round}"));
        std::fs::create_dir_all(&st).unwrap();
        let ring = Ring::create(&st.join("ring"), 1 << 16).unwrap();
        let data = t.path(&format!("data{round}"));
        let mut mt = MasterTarget::start(&data);
        let disk = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut w = Workload::new(blocks, round + 1);
        let mut agent = Proc(
            ferry()
                .args(["agent", "--disk", &img.display().to_string(), "--name", "gone", "--target", &mt.addr, "--tracker", "ring"])
                .args(["--state", &st.display().to_string(), "--point-every", "0.05"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let until = std::time::Instant::now() + Duration::from_millis(600 + rng.below(900));
        while std::time::Instant::now() < until {
            for _ in 0..8 {
                w.write(&disk, Some(&ring));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        mt.proc.kill9();
        agent.kill9();
        let d = data.display().to_string();
        let v = run(&["verify", "--data", &d, "--name", "gone"]);
        assert!(
            v.status.success(),
            "round {round}: verify of a folder left by a kill: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        check_every_point(&d, "gone", &w.log, blocks, &t.0, &format!("round {round}"));
    }
}

/// `master-target --scrub-every` verifies every disk on its own and the
/// result shows in `ferry status --data`: clean, then the damage a flipped
/// replica byte makes (CRIT, with the range).
#[test]
fn the_scrub_runs_on_a_schedule_and_shows_in_status() {
    let t = TempDir::new("scrub");
    mixed_image(&t.path("a.img"), 4 << 20, 8);
    let data = t.path("data");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _mt = Proc(
        ferry()
            .args(["master-target", "--listen", &addr, "--data", &data.display().to_string(), "--scrub-every", "1s", "--scrub-rate", "0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the master target to listen", 10, || std::net::TcpStream::connect(&addr).is_ok());
    scan_once(&t.s("a.img"), "sc", &addr, &t.s("st"));
    let status = || -> serde_json::Value {
        serde_json::from_str(&run_ok(&["status", "--data", &data.display().to_string(), "--name", "sc", "--json"])).unwrap()
    };
    wait_for("a clean scrub in status", 20, || status()["last_verify"]["damage"].as_array().is_some_and(|d| d.is_empty()));
    assert_eq!(status()["health"], "OK", "{}", status());
    let f = std::fs::OpenOptions::new().read(true).write(true).open(data.join("sc").join("replica.img")).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 200_000).unwrap();
    f.write_all_at(&[b[0] ^ 0x80], 200_000).unwrap();
    f.sync_all().unwrap();
    wait_for("the scrub to find the flipped byte", 20, || {
        let s = status();
        s["health"] == "CRIT" && s["last_verify"]["damage"].as_array().is_some_and(|d| d.iter().any(|x| x["offset"] == 196_608))
    });
    let human = run_ok(&["status", "--data", &data.display().to_string(), "--name", "sc"]);
    assert!(human.contains("DAMAGE     replica.img at byte 196608"), "{human}");
}
