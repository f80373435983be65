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

#[test]
fn a_cancelled_failover_resumes_replication() {
    let t = TempDir::new("failover-cancel");
    let img = t.path("disk.img");
    mixed_image(&img, 8 << 20, 3);
    let data = t.path("mt");
    let mt = MasterTarget::start(&data);
    let (name, st, imgs) = ("cancel", t.s("st"), img.to_str().unwrap().to_string());
    scan_once(&imgs, name, &mt.addr, &st);
    let fo = t.path("fo.img");
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--point", "latest", "--out", fo.to_str().unwrap()]);
    assert_same(&img, &fo);
    change_blocks(&img, 0.1, 4);
    let refused = run(&["agent", "--disk", &imgs, "--name", name, "--target", &mt.addr, "--tracker", "scan", "--state", &st, "--once"]);
    assert!(!refused.status.success());
    run_ok(&["failover", "--data", &t.s("mt"), "--name", name, "--cancel"]);
    let s = scan_once(&imgs, name, &mt.addr, &st);
    assert_eq!(s["resync"].as_bool(), Some(false), "{s}");
    let rec = t.path("rec.img");
    recover_to(&t.s("mt"), name, "latest", rec.to_str().unwrap());
    assert_same(&img, &rec);
}
