//! Safe to operate (issue 10): recovery that refuses to destroy what it
//! would overwrite, one listening policy with addresses checked before
//! anything starts, output that survives a closed pipe, errors said once
//! with a hint to run as root, and a default retention that bounds the
//! journal. Real loop devices, mounts and ferry processes, as root.

use ferry_tests::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Exit `code` with exactly one non-empty line on stderr containing `needle`.
fn one_line(o: &Output, code: i32, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("ferry: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A loop device over a new file of `size` bytes filled with a pattern.
fn patterned_dev(t: &TempDir, file: &str, size: u64, seed: u64) -> LoopDev {
    let p = t.path(file);
    let mut b = vec![0u8; size as usize];
    Rng::new(seed).fill(&mut b);
    std::fs::write(&p, b).unwrap();
    LoopDev::attach(&p)
}

/// Files in `dir` whose name has `.ferry-` (a recovery's temporary files).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ferry-"))
        .collect()
}

/// A protected 8 MiB disk with one point: (master target, source image).
fn one_point(t: &TempDir, name: &str) -> (MasterTarget, std::path::PathBuf) {
    let img = t.path(&format!("{name}.img"));
    mixed_image(&img, 8 << 20, 11);
    let mt = MasterTarget::start(&t.path("data"));
    scan_once(img.to_str().unwrap(), name, &mt.addr, &t.s(&format!("st-{name}")));
    (mt, img)
}

/// Acceptance (item 2): `recover` onto a mounted loop device, onto a device
/// too small for the disk and onto an existing file is refused and writes
/// nothing; with `--force` the file is replaced by the right image.
#[test]
fn recover_refuses_a_mounted_device_a_small_device_and_an_existing_file() {
    let t = TempDir::new("safe-recover");
    let (_mt, img) = one_point(&t, "vm");
    let data = t.s("data");
    let rec = |out: &str, extra: &[&str]| {
        let mut a = vec!["recover", "--data", &data, "--name", "vm", "--point", "latest", "--out", out];
        a.extend_from_slice(extra);
        run(&a)
    };

    // A mounted ext4 on a 16 MiB loop device (large enough: only the mount
    // stands in the way).
    let fs_dev = patterned_dev(&t, "fs.img", 16 << 20, 1);
    sh(&format!("mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard {}", fs_dev.dev.display()));
    let mnt = Mount::new(&fs_dev.dev, &t.path("mnt"), "noatime");
    std::fs::write(t.path("mnt").join("keep.txt"), "still here\n").unwrap();
    sh(&format!("sync -f {}", t.path("mnt").display()));
    let (before, w0) = (file_digest(&fs_dev.dev), dev_bytes_changed(&fs_dev.dev).0);
    one_line(&rec(&fs_dev.dev.display().to_string(), &[]), 1, "mounted or in use");
    one_line(&rec(&fs_dev.dev.display().to_string(), &["--force"]), 1, "mounted or in use");
    assert_eq!(dev_bytes_changed(&fs_dev.dev).0, w0, "bytes were written to the mounted device");
    assert_eq!(file_digest(&fs_dev.dev), before, "the mounted device changed");
    assert_eq!(std::fs::read_to_string(t.path("mnt").join("keep.txt")).unwrap(), "still here\n");
    mnt.umount();
    // Unmounted, the same device receives the recovery.
    run_ok(&["recover", "--data", &t.s("data"), "--name", "vm", "--point", "latest", "--out", &fs_dev.dev.display().to_string()]);
    let mut got = vec![0u8; 8 << 20];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&fs_dev.dev).unwrap().read_exact_at(&mut got, 0).unwrap();
    assert!(got == std::fs::read(&img).unwrap(), "the recovered device differs from the source");

    // A 4 MiB device for an 8 MiB disk.
    let small = patterned_dev(&t, "small.img", 4 << 20, 2);
    let (before, w0) = (file_digest(&small.dev), dev_bytes_changed(&small.dev).0);
    let err = one_line(&rec(&small.dev.display().to_string(), &[]), 1, "less than the disk");
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(dev_bytes_changed(&small.dev).0, w0, "bytes were written to the small device");
    assert_eq!(file_digest(&small.dev), before);

    // An existing file: refused, untouched; replaced with --force.
    let out = t.path("out.img");
    std::fs::write(&out, b"an operator's precious file\n").unwrap();
    one_line(&rec(out.to_str().unwrap(), &[]), 1, "give --force");
    assert_eq!(std::fs::read(&out).unwrap(), b"an operator's precious file\n");
    assert!(leftovers(&t.0).is_empty(), "{:?}", leftovers(&t.0));
    run_ok(&["recover", "--data", &t.s("data"), "--name", "vm", "--point", "latest", "--out", out.to_str().unwrap(), "--force"]);
    assert_same(&img, &out);
    assert!(leftovers(&t.0).is_empty(), "{:?}", leftovers(&t.0));
}

/// Item 2: the format follows the extension, a contradicting --format is
/// refused, and a recovery that fails part way (a full filesystem) leaves
/// no file behind.
#[test]
fn recover_takes_the_format_from_the_extension_and_leaves_nothing_when_it_fails() {
    let t = TempDir::new("safe-format");
    let (_mt, img) = one_point(&t, "vm");
    let d = t.s("data");
    let q = t.path("p.qcow2");
    run_ok(&["recover", "--data", &d, "--name", "vm", "--point", "latest", "--out", q.to_str().unwrap()]);
    let info = sh(&format!("qemu-img info --output=json {}", q.display()));
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    let back = t.path("back.img");
    sh(&format!("qemu-img convert -f qcow2 -O raw {} {}", q.display(), back.display()));
    assert_same(&img, &back);
    one_line(
        &run(&["recover", "--data", &d, "--name", "vm", "--point", "latest", "--out", &t.s("x.img"), "--format", "qcow2"]),
        1,
        "--format qcow2",
    );
    one_line(
        &run(&["recover", "--data", &d, "--name", "vm", "--point", "latest", "--out", &t.s("x.qcow2"), "--format", "raw"]),
        1,
        "--format raw",
    );
    assert!(!t.path("x.img").exists() && !t.path("x.qcow2").exists());

    // A 1 MiB tmpfs cannot hold the 6 MiB of data of the image.
    let full = t.path("full");
    std::fs::create_dir_all(&full).unwrap();
    sh(&format!("mount -t tmpfs -o size=1m ferry-test {}", full.display()));
    let _m = Mount(full.clone());
    let o = run(&["recover", "--data", &d, "--name", "vm", "--point", "latest", "--out", &full.join("r.img").display().to_string()]);
    one_line(&o, 1, "No space left on device");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 0, "a failed recovery left files: {:?}", leftovers(&full));
}

/// Item 2 for failover: a refused output changes nothing (the stream is
/// still accepted); the image a failover wrote may be rewritten by the next
/// choice of point, another existing file only with --force.
#[test]
fn failover_checks_its_output_before_it_stops_the_stream() {
    let t = TempDir::new("safe-failover");
    let (mt, img) = one_point(&t, "fo");
    let d = t.s("data");
    let taken = t.path("taken.img");
    std::fs::write(&taken, b"not ours\n").unwrap();
    one_line(&run(&["failover", "--data", &d, "--name", "fo", "--point", "latest", "--out", taken.to_str().unwrap()]), 1, "give --force");
    assert_eq!(std::fs::read(&taken).unwrap(), b"not ours\n");
    assert!(!t.path("data").join("fo").join("failover.state").exists(), "a refused failover left its state");
    // The stream is still accepted.
    scan_once(img.to_str().unwrap(), "fo", &mt.addr, &t.s("st-fo"));
    let fo = t.path("failover.img");
    run_ok(&["failover", "--data", &d, "--name", "fo", "--point", "1", "--out", fo.to_str().unwrap()]);
    run_ok(&["failover", "--data", &d, "--name", "fo", "--point", "latest", "--out", fo.to_str().unwrap()]);
    assert_same(&img, &fo);
    one_line(&run(&["failover", "--data", &d, "--name", "fo", "--point", "1", "--out", taken.to_str().unwrap()]), 1, "give --force");
    run_ok(&["failover", "--data", &d, "--name", "fo", "--point", "latest", "--out", taken.to_str().unwrap(), "--force"]);
    assert_same(&img, &taken);
    run_ok(&["failover", "--data", &d, "--name", "fo", "--cancel"]);
}

/// Acceptance (item 5): every listener takes loopback addresses only, host
/// names included; a refused address is bad usage, said in one line.
#[test]
fn every_listener_is_loopback_only_and_takes_host_names() {
    let t = TempDir::new("safe-listen");
    let (_mt, _) = one_point(&t, "ex");
    let port = free_port().to_string();
    for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        one_line(
            &run(&["export", "--data", &t.s("data"), "--name", "ex", "--point", "latest", "--listen", &addr]),
            2,
            "not a loopback address",
        );
        one_line(&run(&["master-target", "--listen", &addr, "--data", &t.s("other")]), 2, "not a loopback address");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err(), "something listens on {port}");
    one_line(&run(&["export", "--data", &t.s("data"), "--name", "ex", "--point", "latest", "--listen", "127.0.0.1"]), 2, "no port");
    // Host names resolve, to loopback here.
    let _mt2 = MasterTarget::start_at(&t.path("other"), &format!("localhost:{}", free_port()));
    let p = free_port();
    let _export = Proc(
        ferry()
            .args(["export", "--data", &t.s("data"), "--name", "ex", "--point", "latest", "--listen", &format!("localhost:{p}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the export to listen on localhost", 20, || std::net::TcpStream::connect(("localhost", p)).is_ok());
}

/// Acceptance (item 5): `--target` without a port is bad usage (exit 2, one
/// line), found before the bpf tracker is attached or anything is created.
#[test]
fn a_target_without_a_port_exits_2_with_nothing_attached() {
    let t = TempDir::new("safe-target");
    let back = t.path("back.img");
    std::fs::File::create(&back).unwrap().set_len(16 << 20).unwrap();
    let lo = LoopDev::attach(&back);
    let name = unique_name("noport");
    let _guard = Unprotect(t.path("st"));
    for target in ["127.0.0.1", "localhost", "127.0.0.1:0", "127.0.0.1:x", "[::1]"] {
        let o = run(&[
            "agent",
            "--disk",
            &lo.dev.display().to_string(),
            "--name",
            &name,
            "--target",
            target,
            "--tracker",
            "bpf",
            "--state",
            &t.s("st"),
            // Without the check, a bounded failure rather than a minute of retries.
            "--once",
            "--connect-timeout",
            "2",
        ]);
        one_line(&o, 2, "--target");
        assert!(!Path::new("/sys/fs/bpf/ferry").join(&name).exists(), "--target {target}: the tracker was pinned");
        assert!(!t.path("st").exists(), "--target {target}: the state folder was created");
    }
}

/// Acceptance (item 8): output into a pipe whose reader is gone ends with
/// status 0 and no panic text, for `status` and `points`.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let t = TempDir::new("safe-pipe");
    let (_mt, _) = one_point(&t, "pp");
    let status = ["status", "--state", &t.s("st-pp")];
    let points = ["points", "--data", &t.s("data"), "--name", "pp"];
    for args in [&status[..], &points[..]] {
        // A pipe closed before ferry writes: its first write fails with EPIPE.
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        let o = ferry().args(args).stdin(Stdio::null()).stdout(w).stderr(Stdio::piped()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "ferry {args:?} into a closed pipe: {}: {err}", o.status);
        assert!(err.is_empty(), "ferry {args:?}: {err}");
        // And as an operator types it, with the pipeline's status kept.
        let cmd = format!("'{}' {} | head -1", ferry_bin().display(), args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" "));
        let o = Command::new("bash").args(["-o", "pipefail", "-c", &cmd]).env("RUST_LOG", "warn").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{cmd}: {}: {err}", o.status);
        assert!(!err.contains("panic") && !err.contains("Broken pipe"), "{cmd}: {err}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    }
}

/// Acceptance (item 8): opening a block device without the rights says to
/// run as root, once, and the OS error once (ferry run as nobody).
#[test]
fn a_permission_error_on_a_device_says_run_as_root_once() {
    let t = TempDir::new("safe-root");
    let (_mt, _) = one_point(&t, "pr");
    let back = t.path("back.img");
    std::fs::File::create(&back).unwrap().set_len(16 << 20).unwrap();
    let lo = LoopDev::attach(&back);
    let dev = lo.dev.display().to_string();
    let st = t.path("nobody-st");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(ferry_bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("setpriv")
    };
    let agent = as_nobody(&[
        "agent",
        "--disk",
        &dev,
        "--name",
        "pr",
        "--target",
        "127.0.0.1:1",
        "--tracker",
        "scan",
        "--state",
        st.to_str().unwrap(),
    ]);
    let recover = as_nobody(&["recover", "--data", &t.s("data"), "--name", "pr", "--point", "latest", "--out", &dev]);
    for (what, o) in [("agent", agent), ("recover", recover)] {
        let err = one_line(&o, 1, &dev);
        assert_eq!(err.matches("run as root").count(), 1, "{what}: {err}");
        assert_eq!(err.matches("Permission denied").count(), 1, "{what}: {err}");
        assert_eq!(err.matches("os error 13").count(), 1, "{what}: {err}");
    }
}

/// Item 9: a disk with no policy gets the default, shown as such; the
/// default's journal cap (the disk's size) bounds the journal where a disk
/// without a cap grows; `ferry points` says why each point is kept.
#[test]
fn the_default_retention_bounds_the_journal_and_points_say_why_they_are_kept() {
    let t = TempDir::new("safe-default-retention");
    let mt = MasterTarget::start(&t.path("data"));
    let d = t.s("data");
    let size = 8u64 << 20;
    for n in ["dflt", "nocap"] {
        mixed_image(&t.path(&format!("{n}.img")), size, 5);
        scan_once(&t.s(&format!("{n}.img")), n, &mt.addr, &t.s(&format!("st-{n}")));
    }
    let shown = run_ok(&["retention", "--data", &d, "--name", "dflt"]);
    assert!(shown.contains("(the default for a disk with no policy set)"), "{shown}");
    assert!(shown.contains("keep points for 3days: every point for 1h, then one an hour up to 1day, then one a day"), "{shown}");
    assert!(shown.contains("journal at most 8.0 MiB"), "{shown}");
    let shown = run_ok(&["retention", "--data", &d, "--name", "nocap", "--journal-cap", "none"]);
    assert!(shown.contains("no journal cap") && !shown.contains("default"), "{shown}");

    // Rewrite both disks entirely, eight times, a point after each round.
    for round in 0..8 {
        for n in ["dflt", "nocap"] {
            change_blocks(&t.path(&format!("{n}.img")), 1.0, 100 + round);
            scan_once(&t.s(&format!("{n}.img")), n, &mt.addr, &t.s(&format!("st-{n}")));
        }
    }
    let allocated = |n: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(t.path("data").join(n).join("journal.fj")).unwrap().blocks() * 512
    };
    let (capped, uncapped) = (allocated("dflt"), allocated("nocap"));
    // The cap bounds the journal after the oldest kept point; the newest
    // point's interval may add up to one round (a little under the disk).
    assert!(capped <= 2 * size, "journal of the default policy: {capped} bytes for an {size}-byte disk");
    assert!(uncapped > 3 * size, "without a cap the journal should have grown: {uncapped} bytes");

    // The master target applies retention at most once a second, so the
    // last point's pass may still be due: `ferry points` would list the
    // point it drops as expiring. Apply it now (no master target serving).
    drop(mt);
    run_ok(&["retention", "--data", &d, "--name", "dflt"]);
    let pts: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", &d, "--name", "dflt", "--json"])).unwrap();
    let pts = pts.as_array().unwrap();
    assert!(pts.len() >= 2 && pts.len() < 9, "{} points kept", pts.len());
    assert!(pts.first().unwrap()["id"].as_u64().unwrap() > 1, "the oldest points went to the cap");
    for (i, p) in pts.iter().enumerate() {
        for f in ["id", "time", "kind", "seq"] {
            assert!(!p[f].is_null(), "{p}");
        }
        let want = if i + 1 == pts.len() { "newest" } else { "window" };
        assert_eq!(p["kept"], want, "{p}");
    }
    let human = run_ok(&["points", "--data", &d, "--name", "dflt"]);
    assert!(human.lines().next().unwrap().ends_with("KEPT"), "{human}");
    assert!(human.lines().last().unwrap().ends_with("newest"), "{human}");
}
