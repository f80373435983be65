//! Retention under a continuous versioned-block workload: more than a
//! hundred points cut over time, those outside the window dropped and their
//! journal space given back, every kept point still recovering to a prefix
//! of the write log.

use ferry_ring::Ring;
use ferry_tests::versioned::{self, Workload};
use ferry_tests::*;
use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn points_outside_the_window_go_and_their_journal_space_is_reclaimed() {
    let t = TempDir::new("retention");
    let blocks = 2048u64; // 8 MiB
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
        "ret",
        "--target",
        &mt.addr,
        "--tracker",
        "ring",
        "--state",
        &t.s("st"),
        "--point-every",
        "0.02",
    ];
    let disk = OpenOptions::new().write(true).open(&img).unwrap();
    let mut w = Workload::new(blocks, 9);
    let mut agent = Proc(ferry().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_for("the initial sync", 60, || agent_state(&st).is_some_and(|s| s["sync_cursor"].is_null()));
    let window = 3.0;
    run_ok(&["retention", "--data", &t.s("data"), "--name", "ret", "--keep", "3s", "--keep-all", "3s"]);
    // Writes with pauses (the ring tracker cuts a point when writes pause)
    // for at least three windows, and until 100 points were cut and those
    // of the last five seconds are under a third of all, so that the
    // points a window keeps are well under half even with the ones cut
    // below (a loaded machine cuts fewer a second, and unevenly; at most
    // two minutes).
    let start = Instant::now();
    let last_id = || agent_state(&st).and_then(|s| s["last_point"]["id"].as_u64()).unwrap_or(0);
    let mut seen: std::collections::VecDeque<(Instant, u64)> = std::collections::VecDeque::new();
    let recent = Duration::from_secs_f64(window + 2.0);
    loop {
        let id = last_id();
        seen.push_back((Instant::now(), id));
        while seen.front().is_some_and(|&(t, _)| t.elapsed() > recent) {
            seen.pop_front();
        }
        let in_window = id - seen.front().map_or(0, |&(_, i)| i);
        let enough = start.elapsed() >= Duration::from_secs_f64(window * 3.0) && id >= 100 && in_window * 3 < id;
        if enough || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        for _ in 0..8 {
            w.write(&disk, Some(&ring));
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    wait_for("the ring to drain", 60, || ring.consumer() == ring.producer());
    std::thread::sleep(Duration::from_millis(1200)); // one more point and retention pass
    for _ in 0..8 {
        w.write(&disk, Some(&ring));
    }
    wait_for("the ring to drain", 60, || ring.consumer() == ring.producer());
    std::thread::sleep(Duration::from_millis(300));
    agent.kill9();

    let pts: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", &t.s("data"), "--name", "ret", "--json"])).unwrap();
    let pts = pts.as_array().unwrap();
    let ids: Vec<u64> = pts.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    let newest = *ids.last().unwrap();
    assert!(newest >= 100, "only {newest} points were cut over {:.0} s", start.elapsed().as_secs_f64());
    assert!(ids.len() < newest as usize / 2, "{} of {newest} points kept: the window did not drop the old ones", ids.len());
    // Nothing older than the window (plus the once-a-second pass, and the
    // time since the last pass).
    let now = humantime::parse_rfc3339_weak(&humantime::format_rfc3339(std::time::SystemTime::now()).to_string()).unwrap();
    for p in pts {
        let t = humantime::parse_rfc3339_weak(p["time"].as_str().unwrap()).unwrap();
        let age = now.duration_since(t).unwrap_or_default().as_secs_f64();
        assert!(age < window + 3.0, "point {} is {age:.1} s old", p["id"]);
    }
    let gone = run(&["recover", "--data", &t.s("data"), "--name", "ret", "--point", "1", "--out", &t.s("gone.img")]);
    assert!(!gone.status.success(), "a dropped point must not recover");
    // Journal space before the oldest kept point is given back.
    let j = t.path("data").join("ret").join("journal.fj");
    let m = std::fs::metadata(&j).unwrap();
    let allocated = m.blocks() * 512;
    assert!(allocated < m.len() / 2, "journal: {} bytes long, {allocated} allocated", m.len());
    // Every kept point recovers to a prefix of the log.
    for id in &ids {
        let out = t.path(&format!("p{id}.img"));
        recover_to(&t.s("data"), "ret", &id.to_string(), &out.display().to_string());
        if let Err(e) = versioned::check(&out, &w.log, blocks) {
            panic!("point {id} is not consistent: {e}");
        }
        std::fs::remove_file(out).unwrap();
    }
}
