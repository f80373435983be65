//! Support for ferry's integration tests: the `ferry` binary, master target
//! processes, sample images, loop devices. Every resource is released by a
//! guard's `Drop`, so a failing test leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod postgres;
pub use postgres::Postgres;

/// Path of the built `ferry` binary (`FERRY_BIN`, or next to the test binary).
pub fn ferry_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("ferry");
    assert!(p.exists(), "{} not built: run `cargo build --workspace` first", p.display());
    p
}

/// A `ferry` command with a quiet log.
pub fn ferry() -> Command {
    let mut c = Command::new(ferry_bin());
    c.env("RUST_LOG", std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "warn".into()));
    c
}

/// Run ferry to completion, capturing output.
pub fn run(args: &[&str]) -> Output {
    ferry().args(args).stdin(Stdio::null()).output().expect("run ferry")
}

/// Run ferry and require success; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "ferry {args:?} failed: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).expect("utf8")
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::var("FERRY_TEST_TMP").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
        let p = base.join(format!("ferry-test-{tag}-{}-{}", std::process::id(), ferry_common::now_ns()));
        std::fs::create_dir_all(&p).expect("mkdir temp");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // FERRY_TEST_KEEP=1 keeps a failed test's folder for inspection.
        if std::thread::panicking() && std::env::var_os("FERRY_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
    /// Bytes this process has written through write(2)-family calls
    /// (sockets included), from /proc/PID/io.
    pub fn wchar(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap_or_default();
        s.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A running master target.
pub struct MasterTarget {
    pub proc: Proc,
    pub addr: String,
    pub data: PathBuf,
}

impl MasterTarget {
    pub fn start(data: &Path) -> MasterTarget {
        Self::start_at(data, &format!("127.0.0.1:{}", free_port()))
    }

    pub fn start_at(data: &Path, addr: &str) -> MasterTarget {
        Self::start_args(data, addr, &[])
    }

    /// With more flags (`--metrics` …).
    pub fn start_args(data: &Path, addr: &str, extra: &[&str]) -> MasterTarget {
        let mut child = ferry()
            .env("RUST_LOG", "info")
            .args(["master-target", "--listen", addr, "--data"])
            .arg(data)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn master target");
        // Wait for the listening line, then keep draining the log to a file.
        let err = child.stderr.take().expect("stderr");
        let mut rd = BufReader::new(err);
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            line.clear();
            if rd.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                panic!("master target did not start: {line}");
            }
            if line.contains("listening on") {
                break;
            }
        }
        let log = data.with_extension("mt.log");
        std::thread::spawn(move || {
            let mut f = OpenOptions::new().create(true).append(true).open(log).ok();
            for l in rd.lines().map_while(Result::ok) {
                if let Some(f) = f.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
            }
        });
        MasterTarget { proc: Proc(child), addr: addr.to_string(), data: data.to_path_buf() }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("mt.log")).unwrap_or_default()
    }
}

/// A running process server (`ferry process-server`), its log in
/// `SPOOL.ps.log`.
pub struct ProcessServer {
    pub proc: Proc,
    pub addr: String,
    pub spool: PathBuf,
}

impl ProcessServer {
    pub fn start(spool: &Path, upstream: &str, spool_max: &str) -> ProcessServer {
        Self::start_at(spool, &format!("127.0.0.1:{}", free_port()), upstream, spool_max)
    }

    pub fn start_at(spool: &Path, addr: &str, upstream: &str, spool_max: &str) -> ProcessServer {
        Self::start_args(spool, addr, upstream, spool_max, &[])
    }

    /// With more flags (`--limit`, `--identity` …).
    pub fn start_args(spool: &Path, addr: &str, upstream: &str, spool_max: &str, extra: &[&str]) -> ProcessServer {
        let mut child = ferry()
            .env("RUST_LOG", "info")
            .args(["process-server", "--listen", addr, "--upstream", upstream, "--spool-max", spool_max, "--spool"])
            .arg(spool)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn process server");
        let err = child.stderr.take().expect("stderr");
        let mut rd = BufReader::new(err);
        let mut line = String::new();
        let log = spool.with_extension("ps.log");
        let mut f = OpenOptions::new().create(true).append(true).open(&log).ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            line.clear();
            if rd.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                panic!("process server did not start: {line}");
            }
            if let Some(f) = f.as_mut() {
                let _ = write!(f, "{line}");
            }
            if line.contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || {
            for l in rd.lines().map_while(Result::ok) {
                if let Some(f) = f.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
            }
        });
        ProcessServer { proc: Proc(child), addr: addr.to_string(), spool: spool.to_path_buf() }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.spool.with_extension("ps.log")).unwrap_or_default()
    }
}

/// Small, fast, deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write a sample image of `size` bytes (a multiple of 256 KiB) with mixed
/// content: a quarter zeros, a quarter text-like, a quarter random, a quarter
/// drawn from 32 distinct 64 KiB blocks.
pub fn mixed_image(path: &Path, size: u64, seed: u64) {
    assert_eq!(size % (256 << 10), 0);
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut rng = Rng::new(seed);
    let q = size / 4;
    let words: Vec<&[u8]> =
        vec![b"replica ", b"journal ", b"the ", b"point ", b"of ", b"recovery\n", b"disk ", b"0x1f3a ", b"ERROR ", b"write "];
    let blocks: Vec<Vec<u8>> = (0..32)
        .map(|_| {
            let mut b = vec![0u8; 65536];
            rng.fill(&mut b);
            b
        })
        .collect();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = q; // first quarter stays a hole (zeros)
    while off < size {
        let n = (buf.len() as u64).min(q - off % q) as usize;
        let buf = &mut buf[..n];
        if off < 2 * q {
            let mut i = 0;
            while i < buf.len() {
                let w = words[rng.below(words.len() as u64) as usize];
                let n = w.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        } else if off < 3 * q {
            rng.fill(buf);
        } else {
            for c in buf.chunks_mut(65536) {
                c.copy_from_slice(&blocks[rng.below(32) as usize]);
            }
        }
        f.write_all_at(buf, off).expect("write image");
        off += n as u64;
    }
    f.sync_all().expect("sync image");
}

/// Overwrite `fraction` of the image's 4 KiB blocks with random bytes.
/// Returns the number of blocks changed.
pub fn change_blocks(path: &Path, fraction: f64, seed: u64) -> u64 {
    let f = OpenOptions::new().write(true).open(path).expect("open image");
    let size = f.metadata().expect("meta").len();
    let blocks = size / 4096;
    let n = (blocks as f64 * fraction) as u64;
    let mut rng = Rng::new(seed);
    let mut b = vec![0u8; 4096];
    for _ in 0..n {
        rng.fill(&mut b);
        f.write_all_at(&b, rng.below(blocks) * 4096).expect("write block");
    }
    f.sync_all().expect("sync");
    n
}

/// xxh3-128 of a whole file or device (for equality checks of large images).
pub fn file_digest(path: &Path) -> u128 {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.digest128()
}

/// Assert two images are byte-identical; on a mismatch, name the first
/// differing 4 KiB block.
pub fn assert_same(a: &Path, b: &Path) {
    if file_digest(a) == file_digest(b) {
        return;
    }
    let (fa, fb) = (File::open(a).expect("open"), File::open(b).expect("open"));
    let (mut ba, mut bb) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut off = 0u64;
    loop {
        let na = fa.read_at(&mut ba, off).expect("read");
        let nb = fb.read_at(&mut bb, off).expect("read");
        if na != nb || ba[..na] != bb[..nb] {
            panic!("{} and {} differ in the 4 KiB block at offset {off} (lengths read {na}/{nb})", a.display(), b.display());
        }
        if na == 0 {
            panic!("digests differ but no differing block found");
        }
        off += na as u64;
    }
}

/// Parse the `--json` summary of `ferry agent --once`.
pub fn summary(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("agent summary is not JSON ({e}): {stdout}"))
}

/// Read the agent's state JSON (skipping the two header lines).
pub fn agent_state(state_dir: &Path) -> Option<serde_json::Value> {
    let s = std::fs::read_to_string(state_dir.join("agent.state")).ok()?;
    let body: String = s.splitn(3, '\n').nth(2)?.to_string();
    serde_json::from_str(&body).ok()
}

/// Wait until `f` holds, polling; panics with `what` after `secs`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let o = Command::new("losetup").args(["--find", "--show", "--direct-io=off"]).arg(file).output().expect("run losetup");
        assert!(o.status.success(), "losetup failed: {}", String::from_utf8_lossy(&o.stderr));
        LoopDev { dev: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()) }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The versioned-block workload and its checker.
///
/// Every write puts one 4 KiB block stamped with its write number (1-based),
/// its block index, a pattern derived from both, and an xxh3-128 of the rest;
/// writes happen one at a time and are logged. A disk image is *consistent*
/// when it equals the state after some prefix of the log: the checker takes
/// the newest stamp it finds as that prefix's end and demands every block
/// hold exactly what the log says it held then.
pub mod versioned {
    use super::Rng;
    use ferry_ring::{Record, RecordKind, Ring};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    pub const BLOCK: usize = 4096;

    /// The content of block `b` written by write number `i`.
    pub fn stamp(i: u64, b: u64) -> Vec<u8> {
        let mut v = vec![0u8; BLOCK];
        v[0..8].copy_from_slice(&i.to_le_bytes());
        v[8..16].copy_from_slice(&b.to_le_bytes());
        Rng::new(i ^ (b << 32)).fill(&mut v[16..BLOCK - 16]);
        let s = xxhash_rust::xxh3::xxh3_128(&v[..BLOCK - 16]).to_le_bytes();
        v[BLOCK - 16..].copy_from_slice(&s);
        v
    }

    /// A workload over a zeroed disk of `blocks` blocks.
    pub struct Workload {
        pub log: Vec<u64>,
        blocks: u64,
        rng: Rng,
    }

    impl Workload {
        pub fn new(blocks: u64, seed: u64) -> Workload {
            Workload { log: Vec::new(), blocks, rng: Rng::new(seed) }
        }

        /// One write, then its record on `ring`: an observing tracker reports
        /// a write when it completes, so that the agent, reading the range
        /// after seeing the record, reads the new data.
        pub fn write(&mut self, disk: &File, ring: Option<&Ring>) {
            let b = self.rng.below(self.blocks);
            let i = self.log.len() as u64 + 1;
            disk.write_all_at(&stamp(i, b), b * BLOCK as u64).expect("workload write");
            self.log.push(b);
            if let Some(r) = ring {
                r.push(Record {
                    seq: i,
                    offset: b * BLOCK as u64,
                    length: BLOCK as u32,
                    kind: RecordKind::Write,
                    flush: false,
                    data: false,
                    group: false,
                    time_ns: 0,
                });
            }
        }
    }

    /// The versioned workload as a process of its own: O_DIRECT|O_DSYNC
    /// writes, one at a time, each logged (and the log written through)
    /// once it completed; `pause` between writes.
    pub fn run_workload(dev: &Path, blocks: u64, seed: u64, log: &Path, count: u64, pause: std::time::Duration) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let disk = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(dev)?;
        let mut logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut rng = Rng::new(seed);
        let mut buf = ferry_common::buf::AlignedBuf::new(BLOCK);
        for i in 1..=count {
            let b = rng.below(blocks);
            buf.copy_from_slice(&stamp(i, b));
            disk.write_all_at(&buf, b * BLOCK as u64)?;
            writeln!(logf, "{b}")?;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        Ok(())
    }

    /// [`run_workload`] at a steady rate, with up to `depth` writes in
    /// flight (one thread each): `count` writes at about `iops` writes a
    /// second (a writer sleeps whenever it is ahead of that schedule).
    ///
    /// Writes are numbered in the order they are issued, and write `i` is
    /// issued only once every write up to `i - depth` has completed; no two
    /// writes to one block are in flight at once. With `depth` 1 this is
    /// the one-at-a-time workload. The log (write numbers in order, one
    /// block index per line) is written when all writes completed: run it
    /// to completion. Check its images with [`check_window`] and the same
    /// `depth`. Returns the rate achieved.
    pub fn run_workload_rate(dev: &Path, blocks: u64, seed: u64, log: &Path, count: u64, iops: u64, depth: u64) -> std::io::Result<f64> {
        use std::collections::{BTreeSet, HashSet};
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        use std::sync::{Condvar, Mutex};
        struct Sched {
            next: u64,
            low: u64,
            done: BTreeSet<u64>,
            busy: HashSet<u64>,
            rng: Rng,
            log: Vec<u64>,
            failed: Option<std::io::Error>,
        }
        let disk = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(dev)?;
        let depth = depth.max(1);
        let sched = Mutex::new(Sched {
            next: 1,
            low: 0,
            done: BTreeSet::new(),
            busy: HashSet::new(),
            rng: Rng::new(seed),
            log: vec![0; count as usize],
            failed: None,
        });
        let cv = Condvar::new();
        let t0 = std::time::Instant::now();
        std::thread::scope(|s| {
            for _ in 0..depth {
                s.spawn(|| {
                    let mut buf = ferry_common::buf::AlignedBuf::new(BLOCK);
                    loop {
                        let mut g = sched.lock().unwrap();
                        while g.failed.is_none() && g.next <= count && g.next > g.low + depth {
                            g = cv.wait(g).unwrap();
                        }
                        if g.failed.is_some() || g.next > count {
                            return;
                        }
                        let i = g.next;
                        g.next += 1;
                        let b = loop {
                            let b = g.rng.below(blocks);
                            if !g.busy.contains(&b) {
                                break b;
                            }
                        };
                        g.busy.insert(b);
                        g.log[i as usize - 1] = b;
                        drop(g);
                        let due = std::time::Duration::from_secs_f64(i as f64 / iops.max(1) as f64);
                        let el = t0.elapsed();
                        if due > el + std::time::Duration::from_millis(1) {
                            std::thread::sleep(due - el);
                        }
                        buf.copy_from_slice(&stamp(i, b));
                        let r = disk.write_all_at(&buf, b * BLOCK as u64);
                        let mut g = sched.lock().unwrap();
                        if let Err(e) = r {
                            g.failed = Some(e);
                        }
                        g.busy.remove(&b);
                        g.done.insert(i);
                        while g.done.first() == Some(&(g.low + 1)) {
                            g.done.pop_first();
                            g.low += 1;
                        }
                        cv.notify_all();
                    }
                });
            }
        });
        let sched = sched.into_inner().unwrap();
        if let Some(e) = sched.failed {
            return Err(e);
        }
        let rate = count as f64 / t0.elapsed().as_secs_f64();
        let mut logf = std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(log)?);
        for b in &sched.log {
            writeln!(logf, "{b}")?;
        }
        logf.flush()?;
        Ok(rate)
    }

    /// The versioned workload over two disks (a consistency group): each
    /// write goes to one of them, one at a time, logged as `DISK BLOCK`
    /// (DISK 0 or 1) once it completed.
    pub fn run_workload2(
        devs: [&Path; 2],
        blocks: u64,
        seed: u64,
        log: &Path,
        count: u64,
        pause: std::time::Duration,
    ) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let open = |p: &Path| std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(p);
        let disks = [open(devs[0])?, open(devs[1])?];
        let mut logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut rng = Rng::new(seed);
        let mut buf = ferry_common::buf::AlignedBuf::new(BLOCK);
        for i in 1..=count {
            let d = rng.below(2) as usize;
            let b = rng.below(blocks);
            buf.copy_from_slice(&stamp(i, b));
            disks[d].write_all_at(&buf, b * BLOCK as u64)?;
            writeln!(logf, "{d} {b}")?;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        Ok(())
    }

    /// Check two images against a [`run_workload2`] log: together they must
    /// be the two disks after one prefix of it. Returns the prefix length.
    pub fn check2(images: [&Path; 2], log: &Path, blocks: u64) -> Result<u64, String> {
        let s = std::fs::read_to_string(log).map_err(|e| e.to_string())?;
        let complete = if s.ends_with('\n') { &s[..] } else { &s[..s.rfind('\n').map_or(0, |i| i + 1)] };
        let log: Vec<(usize, u64)> = complete
            .lines()
            .map(|l| {
                let mut it = l.split_whitespace();
                (it.next().and_then(|d| d.parse().ok()).unwrap_or(9), it.next().and_then(|b| b.parse().ok()).unwrap_or(u64::MAX))
            })
            .collect();
        let mut seen = vec![vec![0u64; blocks as usize]; 2];
        let mut buf = vec![0u8; BLOCK];
        for (d, img) in images.iter().enumerate() {
            let f = File::open(img).map_err(|e| e.to_string())?;
            for b in 0..blocks {
                f.read_exact_at(&mut buf, b * BLOCK as u64).map_err(|e| e.to_string())?;
                if buf.iter().all(|&x| x == 0) {
                    continue;
                }
                let i = u64::from_le_bytes(buf[0..8].try_into().unwrap());
                if i == 0 || i > log.len() as u64 || buf != stamp(i, b) || log[i as usize - 1] != (d, b) {
                    return Err(format!("disk {d} block {b} holds content no logged write put there"));
                }
                seen[d][b as usize] = i;
            }
        }
        let k = seen.iter().flatten().copied().max().unwrap_or(0);
        let mut want = vec![vec![0u64; blocks as usize]; 2];
        for (n, &(d, b)) in log.iter().take(k as usize).enumerate() {
            want[d][b as usize] = n as u64 + 1;
        }
        for d in 0..2 {
            for b in 0..blocks as usize {
                if seen[d][b] != want[d][b] {
                    return Err(format!(
                        "not a prefix of the log: disk {d} block {b} holds write {} but after write {k} it held write {}",
                        seen[d][b], want[d][b]
                    ));
                }
            }
        }
        Ok(k)
    }

    /// Read a log written by [`run_workload`] (a torn last line is dropped).
    pub fn read_log(log: &Path) -> Vec<u64> {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        let complete = if s.ends_with('\n') { &s[..] } else { &s[..s.rfind('\n').map_or(0, |i| i + 1)] };
        complete.lines().map(|l| l.parse().expect("log line")).collect()
    }

    /// Check `image` against `log`; returns the prefix length it matches.
    pub fn check(image: &Path, log: &[u64], blocks: u64) -> Result<u64, String> {
        check_window(image, log, blocks, 1)
    }

    /// Check `image` against the log of a workload that kept up to `depth`
    /// writes in flight ([`run_workload_rate`]): with `k` the newest write
    /// the image holds, every write up to `k - depth` completed before `k`
    /// was issued, so the image must hold the disk's state after those
    /// writes, plus any of the writes in `(k - depth, k]` (each block the
    /// newest write to it up to `k - depth`, or a later one up to `k`).
    /// With `depth` 1 that is exactly the state after write `k`. Returns
    /// `k`.
    pub fn check_window(image: &Path, log: &[u64], blocks: u64, depth: u64) -> Result<u64, String> {
        let f = File::open(image).map_err(|e| e.to_string())?;
        let mut seen = vec![0u64; blocks as usize];
        let mut buf = vec![0u8; BLOCK];
        for b in 0..blocks {
            f.read_exact_at(&mut buf, b * BLOCK as u64).map_err(|e| e.to_string())?;
            if buf.iter().all(|&x| x == 0) {
                continue;
            }
            let i = u64::from_le_bytes(buf[0..8].try_into().unwrap());
            if i == 0 || i > log.len() as u64 || log[i as usize - 1] != b || buf != stamp(i, b) {
                return Err(format!("block {b} holds content no logged write put there"));
            }
            seen[b as usize] = i;
        }
        let k = seen.iter().copied().max().unwrap_or(0);
        let settled = k.saturating_sub(depth.max(1));
        let mut want = vec![0u64; blocks as usize];
        for (n, &b) in log.iter().take(settled as usize).enumerate() {
            want[b as usize] = n as u64 + 1;
        }
        for b in 0..blocks as usize {
            // `seen[b]` is a write to `b` no newer than `k` (checked above);
            // anything newer than the settled state is inside the window.
            if seen[b] < want[b] {
                return Err(format!(
                    "not a prefix of the log: block {b} holds write {} but write {} to it completed before write {k} was issued \
                     ({depth} in flight)",
                    seen[b], want[b]
                ));
            }
        }
        Ok(k)
    }
}

/// `ferry agent --tracker scan --once --json` for `disk` as `name`; returns
/// the summary. Panics (with ferry's stderr) if the agent fails.
pub fn scan_once(disk: &str, name: &str, target: &str, state: &str) -> serde_json::Value {
    summary(&run_ok(&[
        "agent",
        "--disk",
        disk,
        "--name",
        name,
        "--target",
        target,
        "--tracker",
        "scan",
        "--state",
        state,
        "--once",
        "--json",
    ]))
}

/// The ids `ferry points --json` lists for disk `name` (the command must
/// succeed).
pub fn point_ids(data: &str, name: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(&run_ok(&["points", "--data", data, "--name", name, "--json"])).expect("points JSON");
    v.as_array().expect("an array").iter().map(|p| p["id"].as_u64().expect("an id")).collect()
}

/// Recover every point of disk `name` (into `scratch`, one at a time) and
/// require each to pass the versioned workload's checker against `log`;
/// `what` names the case in a failure. Returns how many were checked.
pub fn check_every_point(data: &str, name: &str, log: &[u64], blocks: u64, scratch: &Path, what: &str) -> usize {
    check_every_point_window(data, name, log, blocks, 1, scratch, what)
}

/// [`check_every_point`] for a workload that kept up to `depth` writes in
/// flight ([`versioned::check_window`]).
pub fn check_every_point_window(data: &str, name: &str, log: &[u64], blocks: u64, depth: u64, scratch: &Path, what: &str) -> usize {
    let ids = point_ids(data, name);
    for id in &ids {
        let out = scratch.join(format!("{name}-p{id}.img"));
        recover_to(data, name, &id.to_string(), &out.display().to_string());
        if let Err(e) = versioned::check_window(&out, log, blocks, depth) {
            panic!("{what}: point {id} is not consistent: {e}");
        }
        std::fs::remove_file(out).unwrap();
    }
    ids.len()
}

/// `ferry recover --data DATA --name NAME --point POINT --out OUT --force`
/// (raw; tests recover into the same file again).
pub fn recover_to(data: &str, name: &str, point: &str, out: &str) {
    run_ok(&["recover", "--data", data, "--name", name, "--point", point, "--out", out, "--force"]);
}

/// A unique disk name for tests that pin BPF objects (pins are global).
pub fn unique_name(tag: &str) -> String {
    format!("t{}-{tag}-{}", std::process::id(), ferry_common::now_ns() % 1_000_000_000)
}

/// Runs `ferry unprotect --state DIR` on drop, so a test's BPF pins go away
/// even when it fails.
pub struct Unprotect(pub PathBuf);

impl Drop for Unprotect {
    fn drop(&mut self) {
        let _ = ferry().arg("unprotect").arg("--state").arg(&self.0).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// A mounted filesystem, lazily unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn new(dev: &Path, at: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(at).expect("mkdir mount point");
        let st = Command::new("mount").args(["-o", opts]).arg(dev).arg(at).status().expect("run mount");
        assert!(st.success(), "mount {} failed", dev.display());
        Mount(at.to_path_buf())
    }
    pub fn umount(self) {
        let st = Command::new("umount").arg(&self.0).status().expect("run umount");
        assert!(st.success(), "umount {} failed", self.0.display());
        std::mem::forget(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Run a command and require success.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("run sh");
    assert!(o.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Bytes written and bytes discarded on a block device so far
/// (/sys/block/NAME/stat: write sectors, discard sectors).
pub fn dev_bytes_changed(dev: &Path) -> (u64, u64) {
    let name = dev.file_name().expect("device name").to_string_lossy().to_string();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/stat")).expect("device stat");
    let f: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    (f.get(6).copied().unwrap_or(0) * 512, f.get(13).copied().unwrap_or(0) * 512)
}

/// `sha256sum` of every regular file under `dir`, sorted by path.
pub fn tree_digest(dir: &Path) -> String {
    sh(&format!("cd '{}' && find . -type f -print0 | sort -z | xargs -0 -r sha256sum", dir.display()))
}

/// Path of the sample-image tool built next to ferry.
pub fn mkimage_bin() -> PathBuf {
    ferry_bin().with_file_name("ferry-mkimage")
}

/// `promtool check metrics` reads the text from stdin: it must pass.
pub fn promtool_check(what: &str, text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (scripts/install-deps installs it: Debian package prometheus)"));
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what}: promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
