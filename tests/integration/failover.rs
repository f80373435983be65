//! Test failover and failover of a bootable disk: a point is booted in QEMU
//! (from `ferry export`, and from the image `ferry failover` writes) and
//! shows the marker written before it, not the ones after; replication goes
//! on during the test failover and keeps nothing of it.

use ferry_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};

fn debugfs(img: &Path, req: &str) -> String {
    let out = Command::new("debugfs").args(["-w", "-R", req]).arg(img).output().expect("debugfs");
    assert!(out.status.success(), "debugfs {req}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn put_marker(img: &Path, t: &TempDir, name: &str) {
    let f = t.path(name);
    std::fs::write(&f, format!("{name} was written\n")).unwrap();
    debugfs(img, &format!("write {} /{name}", f.display()));
}

/// Boot `drive` (a QEMU -drive file=...) under TCG; the serial output.
fn boot(drive: &str) -> String {
    let out = Command::new("timeout")
        .args(["180", "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-drive"])
        .arg(format!("file={drive},format=raw,if=virtio"))
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64");
    let s = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        s.contains("FERRY-BOOTED"),
        "the disk did not boot and mount itself:\n{}",
        s.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    s
}

fn markers(serial: &str) -> Vec<String> {
    let mut m: Vec<String> =
        serial.lines().filter_map(|l| l.strip_prefix("FERRY-MARKER ")).map(|l| l.split(' ').next().unwrap_or("").to_string()).collect();
    m.sort();
    m
}

#[test]
fn test_failover_and_failover_boot_the_chosen_point() {
    let t = TempDir::new("failover");
    let img = t.path("boot.img");
    let mk = Command::new("bash").arg(concat!(env!("CARGO_MANIFEST_DIR"), "/guest/mkboot.sh")).arg(&img).output().expect("mkboot.sh");
    assert!(mk.status.success(), "mkboot.sh: {}", String::from_utf8_lossy(&mk.stderr));
    let data = t.path("mt");
    let mt = MasterTarget::start(&data);
    let (name, st, imgs) = ("bootdisk", t.s("st"), img.to_str().unwrap().to_string());
    put_marker(&img, &t, "marker-1");
    let p1 = scan_once(&imgs, name, &mt.addr, &st)["point_id"].as_u64().unwrap();
    put_marker(&img, &t, "marker-2");
    let p2 = scan_once(&imgs, name, &mt.addr, &st)["point_id"].as_u64().unwrap();

    // Test failover of point 1: boot it from a writable export while the
    // agent ships a third marker into the same disk.
    let port = free_port();
    let mut export = Proc(
        ferry()
            .args(["export", "--data", &t.s("mt"), "--name", name, "--point", &p1.to_string(), "--writable", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ferry export"),
    );
    wait_for("the export to listen", 20, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let shipper = {
        let (img, addr, st, t3) = (img.clone(), mt.addr.clone(), st.clone(), t.path("marker-3"));
        std::thread::spawn(move || {
            std::fs::write(&t3, "marker-3 was written\n").unwrap();
            debugfs(&img, &format!("write {} /marker-3", t3.display()));
            scan_once(img.to_str().unwrap(), name, &addr, &st)["point_id"].as_u64().unwrap()
        })
    };
    let serial = boot(&format!("nbd://127.0.0.1:{port}/{name}"));
    let p3 = shipper.join().expect("shipping during the test failover");
    export.kill9();
    assert_eq!(markers(&serial), ["marker-1"], "test failover of point {p1}:\n{serial}");
    // Nothing of the test remains: the latest point has marker-3 and not the
    // file the booted system wrote.
    let latest = t.path("latest.img");
    recover_to(&t.s("mt"), name, "latest", latest.to_str().unwrap());
    let ls = debugfs(&latest, "ls -l /");
    assert!(ls.contains("marker-3") && !ls.contains("booted"), "latest point after the test failover:\n{ls}");

    // Failover to point 2: the stream is refused from now on.
    let fo = t.path("failover.img");
    let out = run(&["failover", "--data", &t.s("mt"), "--name", name, "--point", &p2.to_string(), "--out", fo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cmdline = String::from_utf8_lossy(&out.stdout);
    assert!(cmdline.contains("qemu-system-x86_64") && cmdline.contains(fo.to_str().unwrap()), "{cmdline}");
    assert_eq!(markers(&boot(fo.to_str().unwrap())), ["marker-1", "marker-2"]);
    let refused =
        run(&["agent", "--disk", &imgs, "--name", name, "--target", &mt.addr, "--tracker", "scan", "--state", &st, "--once", "--json"]);
    assert!(!refused.status.success(), "the agent's stream must be refused after a failover");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("failed over"), "{}", String::from_utf8_lossy(&refused.stderr));
    // Another point can still be chosen, until the commit.
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--point", &p3.to_string(), "--out", fo.to_str().unwrap()]);
    assert_eq!(markers(&boot(fo.to_str().unwrap())), ["marker-1", "marker-2", "marker-3"]);
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--commit"]);
    let again = run(&["failover", "--data", &t.s("mt"), "--name", name, "--point", &p1.to_string(), "--out", fo.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("committed"));
    drop(mt);
}

/// Acceptance (issue 10, item 7): a running agent whose disk is failed over
/// waits and keeps tracking, says so once, shows it in `ferry status` and
/// `ferry points`, and after `ferry failover --cancel` resumes shipping by
/// itself: the same process cuts new points, with no resync, and the
/// replica holds what was written meanwhile. After `--commit` it stops
/// with exit 1 and the master target's final word (no `--cancel` advice).
#[test]
fn a_cancelled_failover_resumes_replication() {
    use ferry_ring::Ring;
    use ferry_tests::versioned::{self, Workload};
    let t = TempDir::new("failover-cancel");
    let blocks = 2048u64; // 8 MiB
    let img = t.path("disk.img");
    std::fs::File::create(&img).unwrap().set_len(blocks * 4096).unwrap();
    let st = t.path("st");
    std::fs::create_dir_all(&st).unwrap();
    let ring = Ring::create(&st.join("ring"), 1 << 16).unwrap();
    let mt = MasterTarget::start(&t.path("mt"));
    let name = "cancel";
    let disk = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut w = Workload::new(blocks, 11);
    let log = t.path("agent.log");
    let mut agent = Proc(
        ferry()
            .env("RUST_LOG", "info")
            .args(["agent", "--disk", &t.s("disk.img"), "--name", name, "--target", &mt.addr, "--tracker", "ring"])
            .args(["--state", &t.s("st"), "--point-every", "0.3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("ferry agent"),
    );
    let last_point = || agent_state(&st).and_then(|s| s["last_point"]["id"].as_u64()).unwrap_or(0);
    let mode = || agent_state(&st).map(|s| s["mode"].as_str().unwrap_or("").to_string()).unwrap_or_default();
    for _ in 0..200 {
        w.write(&disk, Some(&ring));
    }
    wait_for("a first point", 60, || last_point() > 0);

    let fo = t.path("fo.img");
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--point", "latest", "--out", fo.to_str().unwrap()]);
    wait_for("the agent to wait for the failover to end", 30, || mode() == "failed-over");
    let at = last_point();
    // Written while failed over: tracked, and shipped after the cancel.
    for _ in 0..300 {
        w.write(&disk, Some(&ring));
    }
    let v: serde_json::Value = serde_json::from_str(&run_ok(&["status", "--state", &t.s("st"), "--json"])).unwrap();
    assert_eq!(v["mode"], "failed-over", "{v}");
    assert!(v["failover"].as_str().is_some_and(|f| f.contains("ferry failover --cancel")), "{v}");
    let human = run_ok(&["points", "--data", &t.s("mt"), "--name", name]);
    assert!(human.lines().next().is_some_and(|l| l.starts_with("failed over to point ") && l.contains("(pending)")), "{human}");
    let json = run(&["points", "--data", &t.s("mt"), "--name", name, "--json"]);
    assert!(serde_json::from_slice::<serde_json::Value>(&json.stdout).unwrap().is_array(), "points --json stays an array");
    assert!(String::from_utf8_lossy(&json.stderr).contains("(pending)"));
    // A few retries go by (every 3 s) before the cancel.
    std::thread::sleep(std::time::Duration::from_secs(7));
    assert!(agent.alive(), "the agent waits instead of exiting");
    assert_eq!(last_point(), at, "no point while failed over");

    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--cancel"]);
    wait_for("a new point by the same agent after the cancel", 60, || last_point() > at);
    assert!(agent.alive(), "the same agent process resumed");
    wait_for("the ring to drain", 60, || ring.consumer() == ring.producer());
    let p = last_point();
    wait_for("a point after the ring drained", 60, || last_point() > p);
    let s = agent_state(&st).unwrap();
    assert!(s["resync_required"].is_null() && s["failover"].is_null(), "{s}");
    recover_to(&t.s("mt"), name, "latest", &t.s("rec.img"));
    assert_same(&img, &t.path("rec.img"));
    assert_eq!(versioned::check(&t.path("rec.img"), &w.log, blocks), Ok(w.log.len() as u64));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("waiting for `ferry failover --cancel`").count(), 1, "said once:\n{text}");
    assert!(!text.contains("resync required"), "no resync after the cancel:\n{text}");

    // Committed: final. The waiting agent stops and says what to do. (The
    // cancelled failover's image is no longer the active one's: replacing
    // it takes --force.)
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--point", "latest", "--out", fo.to_str().unwrap(), "--force"]);
    wait_for("the agent to wait again", 30, || mode() == "failed-over");
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--commit"]);
    wait_for("the agent to stop after the commit", 30, || !agent.alive());
    let code = agent.0.try_wait().unwrap().and_then(|s| s.code());
    assert_eq!(code, Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let last = text.lines().rfind(|l| l.starts_with("ferry: ")).unwrap_or_default().to_string();
    assert!(last.contains("committed") && last.contains("new name") && !last.contains("--cancel"), "{last}");
    let v: serde_json::Value = serde_json::from_str(&run_ok(&["status", "--state", &t.s("st"), "--json"])).unwrap();
    assert!(v["failover"].as_str().is_some_and(|f| f.contains("committed")), "{v}");
    let human = run_ok(&["points", "--data", &t.s("mt"), "--name", name]);
    assert!(human.starts_with("failed over to point ") && human.lines().next().unwrap().contains("(committed)"), "{human}");
}
