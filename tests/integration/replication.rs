//! Replication end to end: initial sync, checksum delta, loop devices.

use ferry_tests::*;

/// Acceptance: a 1 GiB mixed image replicates and recovers byte-identical;
/// then 1% of its 4 KiB blocks change and a scan pass sends under 3% of the
/// disk and makes the replica identical again.
#[test]
fn mixed_1gib_image_replicates_and_a_1pct_delta_sends_under_3pct() {
    let t = TempDir::new("mixed");
    let img = t.path("src.img");
    let size = 1u64 << 30;
    mixed_image(&img, size, 1);
    let mt = MasterTarget::start(&t.path("data"));
    let s = scan_once(&t.s("src.img"), "vm1", &mt.addr, &t.s("st"));
    assert_eq!(s["name"], "vm1");
    assert_eq!(s["tracker"], "scan");
    assert_eq!(s["initial_sync"], true);
    for k in ["point_id", "bytes_read", "bytes_sent", "seconds"] {
        assert!(s[k].is_number(), "summary lacks {k}: {s}");
    }
    assert!(s["bytes_sent"].as_u64().unwrap() < size * 3 / 4, "zeros, dedup and zstd should cut the wire bytes: {s}");
    recover_to(&t.s("data"), "vm1", "latest", &t.s("rec1.img"));
    assert_same(&img, &t.path("rec1.img"));
    std::fs::remove_file(t.path("rec1.img")).unwrap();

    let changed = change_blocks(&img, 0.01, 2);
    assert!(changed >= 2600, "1% of 262144 blocks");
    let s = scan_once(&t.s("src.img"), "vm1", &mt.addr, &t.s("st"));
    let sent = s["bytes_sent"].as_u64().unwrap() + s["bytes_received"].as_u64().unwrap();
    assert!(sent < size * 3 / 100, "delta moved {sent} bytes, over 3% of {size}");
    assert_eq!(s["initial_sync"], false, "no full resync: {s}");
    recover_to(&t.s("data"), "vm1", "latest", &t.s("rec2.img"));
    assert_same(&img, &t.path("rec2.img"));

    // The first point still recovers to the pre-delta image: check that the
    // catalog kept both and that they differ where the delta wrote.
    let pts: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", &t.s("data"), "--name", "vm1", "--json"])).unwrap();
    let pts = pts.as_array().unwrap();
    assert_eq!(pts.len(), 2);
    assert!(pts[0]["seq"].as_u64() < pts[1]["seq"].as_u64());
    for p in pts {
        assert!(p["kind"] == "crash" && p["time"].as_str().unwrap().ends_with('Z'), "{p}");
    }
}

/// Acceptance: a loop device as the source behaves like the file, including
/// a later delta written through the device.
#[test]
fn loop_device_source_replicates_like_a_file() {
    let t = TempDir::new("loop");
    let backing = t.path("backing.img");
    mixed_image(&backing, 64 << 20, 3);
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.display().to_string();
    let mt = MasterTarget::start(&t.path("data"));
    let args =
        ["agent", "--disk", &dev, "--name", "lo1", "--target", &mt.addr, "--tracker", "scan", "--state", &t.s("st"), "--once", "--json"];
    let s = summary(&run_ok(&args));
    assert!(s["bytes_read"].as_u64().unwrap() >= 64 << 20);
    recover_to(&t.s("data"), "lo1", "latest", &t.s("r1.img"));
    assert_same(&lo.dev, &t.path("r1.img"));
    // Write through the device (O_DIRECT so it reaches the disk now).
    change_blocks(&lo.dev, 0.02, 4);
    summary(&run_ok(&args));
    recover_to(&t.s("data"), "lo1", "latest", &t.s("r2.img"));
    assert_same(&lo.dev, &t.path("r2.img"));
    // And the older point is still the older content.
    recover_to(&t.s("data"), "lo1", "1", &t.s("r3.img"));
    assert_same(&t.path("r1.img"), &t.path("r3.img"));
}

/// The agent's chunk map is trusted only while the replica is exactly as the
/// agent left it: after another protection wrote the same disk name, the
/// agent compares against the replica itself and the replica ends up equal
/// to its source again.
#[test]
fn stale_chunk_map_is_not_trusted() {
    let t = TempDir::new("stalemap");
    mixed_image(&t.path("a.img"), 32 << 20, 31);
    mixed_image(&t.path("b.img"), 32 << 20, 32);
    let mt = MasterTarget::start(&t.path("data"));
    let agent = |img: &str, st: &str| scan_once(&t.s(img), "vm", &mt.addr, &t.s(st));
    agent("a.img", "sta");
    assert!(t.path("sta").join("chunks.map").exists());
    // Another protection (its own state, another source) takes the name over.
    let s = agent("b.img", "stb");
    assert_eq!(s["resync"], true, "an existing replica from another protection is resynced, not re-sent: {s}");
    recover_to(&t.s("data"), "vm", "latest", &t.s("rb.img"));
    assert_same(&t.path("b.img"), &t.path("rb.img"));
    // The first agent comes back: its map describes a replica that is gone.
    agent("a.img", "sta");
    recover_to(&t.s("data"), "vm", "latest", &t.s("ra.img"));
    assert_same(&t.path("a.img"), &t.path("ra.img"));
}

/// A point as qcow2 passes `qemu-img check` and equals the raw recovery;
/// a copy of the master target's folder recovers on its own (no server,
/// no database).
#[test]
fn qcow2_recovery_checks_clean_and_a_copied_folder_recovers() {
    let t = TempDir::new("qcow2");
    let img = t.path("disk.img");
    mixed_image(&img, 16 << 20, 31);
    let mt = MasterTarget::start(&t.path("data"));
    scan_once(img.to_str().unwrap(), "q", &mt.addr, &t.s("st"));
    change_blocks(&img, 0.05, 32);
    scan_once(img.to_str().unwrap(), "q", &mt.addr, &t.s("st"));
    drop(mt);
    run_ok(&["recover", "--data", &t.s("data"), "--name", "q", "--point", "1", "--out", &t.s("p1.qcow2"), "--format", "qcow2"]);
    recover_to(&t.s("data"), "q", "1", &t.s("p1.img"));
    let check = std::process::Command::new("qemu-img").args(["check", "-f", "qcow2", &t.s("p1.qcow2")]).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", &t.s("p1.img"), &t.s("p1.qcow2")])
        .output()
        .unwrap();
    assert!(cmp.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&cmp.stdout));
    // The folder, copied elsewhere, is all it takes.
    let st = std::process::Command::new("cp").args(["-a", &t.s("data"), &t.s("copy")]).status().unwrap();
    assert!(st.success());
    std::fs::remove_dir_all(t.path("data")).unwrap();
    let pts: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", &t.s("copy"), "--name", "q", "--json"])).unwrap();
    assert_eq!(pts.as_array().unwrap().len(), 2, "{pts}");
    recover_to(&t.s("copy"), "q", "latest", &t.s("latest.img"));
    assert_same(&img, &t.path("latest.img"));
    recover_to(&t.s("copy"), "q", "1", &t.s("p1-copy.img"));
    assert_same(&t.path("p1.img"), &t.path("p1-copy.img"));
}

/// Unmounts on drop (declared after the loop device it sits on, so it is
/// dropped first).
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn used_bytes(p: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a plain C struct of integers; all-zero is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills `s` from a valid NUL-terminated path.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

/// Recovery cost follows the journal after the point: on a filesystem that
/// shares extents (XFS with reflink here) a recovered point of a 1 GiB disk
/// takes about the space of the journal after it, not of the disk, and
/// equals the same point recovered by copying.
#[test]
fn on_a_reflink_filesystem_a_recovery_costs_the_journal_not_the_disk() {
    let t = TempDir::new("reflink");
    let fsimg = t.path("xfs.img");
    std::fs::File::create(&fsimg).unwrap().set_len(4 << 30).unwrap();
    let lo = LoopDev::attach(&fsimg);
    let st = std::process::Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&lo.dev).status().expect("mkfs.xfs");
    assert!(st.success());
    let mnt = t.path("xfs");
    std::fs::create_dir_all(&mnt).unwrap();
    assert!(std::process::Command::new("mount").arg(&lo.dev).arg(&mnt).status().unwrap().success());
    let _m = Mount(mnt.clone());
    let data = mnt.join("mt");
    let img = t.path("disk.img");
    mixed_image(&img, 1 << 30, 41);
    let mt = MasterTarget::start(&data);
    scan_once(img.to_str().unwrap(), "rl", &mt.addr, &t.s("st"));
    change_blocks(&img, 0.01, 42);
    scan_once(img.to_str().unwrap(), "rl", &mt.addr, &t.s("st"));
    drop(mt);
    // Written back first: XFS allocates the replica's blocks only then.
    assert!(std::process::Command::new("sync").arg("-f").arg(&mnt).status().unwrap().success());
    let before = used_bytes(&mnt);
    let out = mnt.join("p1.img");
    recover_to(data.to_str().unwrap(), "rl", "1", out.to_str().unwrap());
    assert!(std::process::Command::new("sync").arg("-f").arg(&mnt).status().unwrap().success());
    let grew = used_bytes(&mnt).saturating_sub(before);
    assert!(grew < 64 << 20, "recovering a point of a 1 GiB disk took {grew} bytes: copied, not cloned");
    // The same point recovered by copying (the data folder's own fs is ext4
    // here, the output's tmpfs-or-ext4), byte for byte.
    let copy = t.path("p1-copy.img");
    recover_to(data.to_str().unwrap(), "rl", "1", copy.to_str().unwrap());
    assert_same(&out, &copy);
    std::fs::remove_file(&out).unwrap();
}
