//! `ferry export`: a recovery point served over NBD, read by real clients
//! (qemu-img, nbdinfo, nbdcopy), while the agent keeps shipping into the
//! same disk; `--writable` keeps writes in a discarded overlay.

use ferry_tests::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running `ferry export`; killed on drop.
struct Export {
    proc: Proc,
    url: String,
}

impl Export {
    fn start(data: &str, name: &str, point: &str, writable: bool) -> Export {
        let port = free_port();
        let mut cmd = ferry();
        cmd.args(["export", "--data", data, "--name", name, "--point", point, "--listen", &format!("127.0.0.1:{port}")]);
        if writable {
            cmd.arg("--writable");
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn export");
        let mut rd = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            line.clear();
            if rd.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                panic!("ferry export did not start: {line}");
            }
            if line.contains("serving") {
                break;
            }
        }
        std::thread::spawn(move || for _ in rd.lines() {});
        Export { proc: Proc(child), url: format!("nbd://127.0.0.1:{port}/{name}") }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.proc.kill9();
    }
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_exported_point_reads_like_its_recovery_while_shipping_goes_on() {
    let t = TempDir::new("export");
    let data = t.path("mt");
    let mt = MasterTarget::start(&data);
    let (img, name, st) = (t.path("disk.img"), "exp", t.s("st"));
    mixed_image(&img, 48 << 20, 11);
    let p1 = scan_once(img.to_str().unwrap(), name, &mt.addr, &st)["point_id"].as_u64().unwrap();
    change_blocks(&img, 0.05, 12);
    scan_once(img.to_str().unwrap(), name, &mt.addr, &st);
    let want = t.path("p1.img");
    recover_to(t.s("mt").as_str(), name, &p1.to_string(), want.to_str().unwrap());

    let ex = Export::start(&t.s("mt"), name, &p1.to_string(), false);
    // nbdinfo sees the export, its size and that it is read-only.
    let info = tool("nbdinfo", &["--json", &ex.url]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(48 << 20), "{info}");
    assert_eq!(e["is_read_only"].as_bool(), Some(true), "{info}");
    // qemu-img compares the export with the recovered point.
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", want.to_str().unwrap(), &ex.url]);

    // The agent ships more changes into the same disk while clients read
    // the export (new points; the export's point must not move).
    let shipper = {
        let (img, addr, st) = (img.clone(), mt.addr.clone(), st.clone());
        std::thread::spawn(move || {
            for seed in [13, 14, 15] {
                change_blocks(&img, 0.1, seed);
                scan_once(img.to_str().unwrap(), name, &addr, &st);
            }
        })
    };
    let copy = t.path("copy.img");
    let mut reads = 0;
    while !shipper.is_finished() || reads < 2 {
        tool("nbdcopy", &[&ex.url, copy.to_str().unwrap()]);
        assert_same(&want, &copy);
        reads += 1;
    }
    shipper.join().expect("shipping thread");
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", want.to_str().unwrap(), &ex.url]);
    // A later point exported at the same time is the later state.
    let ex2 = Export::start(&t.s("mt"), name, "latest", false);
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", img.to_str().unwrap(), &ex2.url]);
    drop(ex);
    drop(ex2);
    drop(mt);
}

#[test]
fn writes_to_a_writable_export_stay_out_of_the_replica_and_the_journal() {
    let t = TempDir::new("export-rw");
    let data = t.path("mt");
    let mt = MasterTarget::start(&data);
    let (img, name, st) = (t.path("disk.img"), "exprw", t.s("st"));
    mixed_image(&img, 16 << 20, 21);
    let p1 = scan_once(img.to_str().unwrap(), name, &mt.addr, &st)["point_id"].as_u64().unwrap();
    drop(mt);
    let disk = data.join(name);
    let before: Vec<(String, u128)> =
        ["replica.img", "journal.fj", "points.log"].iter().map(|f| (f.to_string(), file_digest(&disk.join(f)))).collect();
    let ex = Export::start(&t.s("mt"), name, &p1.to_string(), true);
    // Write through the export with qemu-io, read it back through it.
    tool("qemu-io", &["-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -z 4M 128k", &ex.url]);
    let out = tool("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0xab 1M 64k", "-c", "read -P 0 4M 128k", &ex.url]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(ex);
    for (f, d) in before {
        assert_eq!(file_digest(&disk.join(&f)), d, "{f} changed by writes to an export");
    }
    // The point still recovers to the source as it was.
    let rec = t.path("rec.img");
    recover_to(t.s("mt").as_str(), name, &p1.to_string(), rec.to_str().unwrap());
    assert_same(&img, &rec);
    // A read-only export refuses writes.
    let ro = Export::start(&t.s("mt"), name, &p1.to_string(), false);
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xcd 0 4k", &ro.url]).output().expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() || text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"), "{text}");
}
