//! Quiescing filesystems for app-consistent cuts: find what is mounted from
//! the protected disk (or its partitions) and FIFREEZE / FITHAW it.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// `FIFREEZE` and `FITHAW` from <linux/fs.h>: _IOWR('X', 119/120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// "major:minor" of the disk at `disk` and of each of its partitions.
fn devices_of(disk: &Path) -> Vec<String> {
    let Ok(m) = std::fs::metadata(disk) else { return Vec::new() };
    if !m.file_type().is_block_device() {
        return Vec::new();
    }
    let dev = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
    let mut out = vec![dev.clone()];
    if let Ok(rd) = std::fs::read_dir(format!("/sys/dev/block/{dev}")) {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Ok(d) = std::fs::read_to_string(p.join("dev")) {
                    out.push(d.trim().to_string());
                }
            }
        }
    }
    out
}

/// Mount points of filesystems on the disk or its partitions, one per
/// filesystem (bind mounts of the same device are listed once).
/// Filesystems whose mountinfo device is not the disk (btrfs reports an
/// anonymous 0:N) are not found: the quiet check of every cut still
/// refuses a point if they write during the freeze.
pub fn mounts_of(disk: &Path) -> Vec<PathBuf> {
    let devs = devices_of(disk);
    if devs.is_empty() {
        return Vec::new();
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && devs.iter().any(|d| d == f[2]) && !seen.contains(&f[2]) {
            seen.push(f[2]);
            // Mount points escape spaces and such as \040 (octal).
            out.push(unescape(f[4]));
        }
    }
    out
}

fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Write back each filesystem's dirty data (syncfs) before a freeze, so the
/// freeze itself has little left to flush. Errors are only logged: this is
/// an optimisation, the freeze that follows is what guarantees consistency.
pub fn presync(mounts: &[PathBuf]) {
    for m in mounts {
        match File::open(m) {
            // SAFETY: syncfs on an fd we own.
            Ok(f) if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 => {}
            Ok(_) => log::warn!("syncfs {}: {}", m.display(), std::io::Error::last_os_error()),
            Err(e) => log::warn!("cannot open {} to sync it: {e}", m.display()),
        }
    }
}

/// Filesystems frozen by [`freeze`], thawed by [`Frozen::thaw`] (or on drop).
pub struct Frozen {
    files: Vec<(PathBuf, File)>,
    /// A freeze that failed (not merely unsupported): no point this round.
    pub failed: Option<String>,
}

/// Freeze each mount point. A filesystem that cannot be frozen at all
/// (EOPNOTSUPP, e.g. vfat) is skipped and makes the second value false (the
/// point is then not app-consistent); any other failure is reported in
/// `failed` with what was frozen left for the caller to thaw.
pub fn freeze(mounts: &[PathBuf]) -> (Frozen, bool) {
    let mut fr = Frozen { files: Vec::new(), failed: None };
    let mut all = true;
    for m in mounts {
        let f = match File::open(m) {
            Ok(f) => f,
            Err(e) => {
                fr.failed = Some(format!("cannot open {} to freeze it: {e}", m.display()));
                break;
            }
        };
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE takes an int pointer (unused); the fd is open.
        if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE, &mut arg) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                log::warn!("{} cannot be frozen (its filesystem does not support it); points are crash-consistent for it", m.display());
                all = false;
                continue;
            }
            fr.failed = Some(format!("FIFREEZE {}: {e}", m.display()));
            break;
        }
        fr.files.push((m.clone(), f));
    }
    (fr, all)
}

/// First wait after a freeze that failed (at most 2 attempts a second).
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// Longest wait between attempts while freezes keep failing.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(4);

/// Freezes that fail (a filesystem someone else froze answers EBUSY): when
/// to try again, growing from [`RETRY_FIRST`] to [`RETRY_MAX`], and the
/// error last reported, so that it is logged once per change, not per
/// attempt.
#[derive(Debug, Default)]
pub struct Retry {
    next: Option<std::time::Instant>,
    delay: std::time::Duration,
    error: Option<String>,
    since: Option<std::time::Instant>,
}

impl Retry {
    /// Whether a freeze may be attempted now.
    pub fn ready(&self) -> bool {
        self.next.is_none_or(|t| std::time::Instant::now() >= t)
    }

    /// A freeze failed with `error`: wait longer before the next attempt.
    /// Returns true when the error differs from the last one reported (the
    /// caller logs it then).
    pub fn failed(&mut self, error: &str) -> bool {
        self.delay = if self.delay.is_zero() { RETRY_FIRST } else { (self.delay * 2).min(RETRY_MAX) };
        let now = std::time::Instant::now();
        self.next = Some(now + self.delay);
        self.since.get_or_insert(now);
        let new = self.error.as_deref() != Some(error);
        if new {
            self.error = Some(error.to_string());
        }
        new
    }

    /// A freeze worked: attempts go back to their normal pace. Returns the
    /// error that had been reported, if any (the caller logs the recovery).
    pub fn succeeded(&mut self) -> Option<String> {
        self.next = None;
        self.delay = std::time::Duration::ZERO;
        self.since = None;
        self.error.take()
    }

    /// The wait before the next attempt.
    pub fn delay(&self) -> std::time::Duration {
        self.delay
    }

    /// How long freezes have been failing.
    pub fn failing_for(&self) -> Option<std::time::Duration> {
        self.since.map(|t| t.elapsed())
    }
}

/// A separate process that thaws the filesystems (and runs the thaw
/// command) if this one dies while they are frozen or overruns `deadline`.
/// `done()` tells it all went well.
pub struct Guard {
    child: Option<std::process::Child>,
}

impl Guard {
    pub fn start(mounts: &[PathBuf], deadline: std::time::Duration, thaw_cmd: Option<&str>) -> Guard {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                log::warn!("no freeze guard (cannot find this program: {e})");
                return Guard { child: None };
            }
        };
        let mut c = std::process::Command::new(exe);
        c.arg("freeze-guard").arg("--deadline-ms").arg(deadline.as_millis().to_string());
        if let Some(t) = thaw_cmd {
            c.arg("--thaw-cmd").arg(t);
        }
        c.args(mounts).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
        match c.spawn() {
            Ok(child) => Guard { child: Some(child) },
            Err(e) => {
                log::warn!("no freeze guard ({e})");
                Guard { child: None }
            }
        }
    }

    /// The freeze ended normally: the guard exits without doing anything.
    pub fn done(mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(mut stdin) = c.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(b"done\n");
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Dropped without done(): closing stdin makes the guard thaw now.
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

/// The guard process's side (`ferry freeze-guard`): wait for "done" on
/// stdin; on end of input without it, or at the deadline, thaw every mount
/// point given (a filesystem that is not frozen just refuses) and run the
/// thaw command.
pub fn run_guard(deadline: std::time::Duration, thaw_cmd: Option<&str>, mounts: &[PathBuf]) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(line.trim() == "done");
    });
    let ok = rx.recv_timeout(deadline).unwrap_or(false);
    if ok {
        return;
    }
    for m in mounts {
        if let Ok(f) = File::open(m) {
            let mut arg: libc::c_int = 0;
            // SAFETY: FITHAW takes an int pointer (unused); the fd is open.
            if unsafe { libc::ioctl(f.as_raw_fd(), FITHAW, &mut arg) } == 0 {
                eprintln!("ferry freeze-guard: thawed {} (the agent died or overran its freeze cap)", m.display());
            }
        }
    }
    if let Some(t) = thaw_cmd {
        let _ = std::process::Command::new("sh").arg("-c").arg(t).status();
    }
}

impl Frozen {
    /// Thaw everything (newest first). Returns the first error.
    pub fn thaw(mut self) -> Result<(), String> {
        self.thaw_all()
    }

    fn thaw_all(&mut self) -> Result<(), String> {
        let mut first = Ok(());
        while let Some((m, f)) = self.files.pop() {
            let mut arg: libc::c_int = 0;
            // SAFETY: FITHAW takes an int pointer (unused); the fd is open.
            if unsafe { libc::ioctl(f.as_raw_fd(), FITHAW, &mut arg) } != 0 && first.is_ok() {
                first = Err(format!("FITHAW {}: {}", m.display(), std::io::Error::last_os_error()));
            }
        }
        first
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_all() {
            log::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn failed_freezes_back_off_and_report_each_error_once() {
        let mut r = Retry::default();
        assert!(r.ready());
        assert!(r.failed("FIFREEZE /m: Device or resource busy"));
        assert!(!r.ready(), "no second attempt at once");
        assert_eq!(r.delay(), RETRY_FIRST);
        let mut delays = Vec::new();
        for _ in 0..6 {
            assert!(!r.failed("FIFREEZE /m: Device or resource busy"), "the same error is reported once");
            delays.push(r.delay());
        }
        assert!(delays.windows(2).all(|w| w[0] <= w[1]) && *delays.last().unwrap() == RETRY_MAX, "{delays:?}");
        assert!(r.failed("cannot open /m to freeze it: gone"), "a new error is reported");
        assert!(r.failing_for().is_some());
        assert_eq!(r.succeeded().as_deref(), Some("cannot open /m to freeze it: gone"));
        assert!(r.ready() && r.failing_for().is_none() && r.succeeded().is_none());
        assert!(r.failed("FIFREEZE /m: Device or resource busy"), "reported again after a success");
        assert_eq!(r.delay(), RETRY_FIRST);
    }

    #[test]
    fn an_image_file_has_no_mounts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        assert!(mounts_of(&p).is_empty());
        let _ = File::open(&p).unwrap().metadata().unwrap().dev();
    }
}
