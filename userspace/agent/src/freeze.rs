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

/// Mount points of filesystems on the disk or its partitions.
pub fn mounts_of(disk: &Path) -> Vec<PathBuf> {
    let devs = devices_of(disk);
    if devs.is_empty() {
        return Vec::new();
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut out = Vec::new();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && devs.iter().any(|d| d == f[2]) {
            // Mount points escape spaces and such as \040 (octal).
            let p = unescape(f[4]);
            if !out.contains(&p) {
                out.push(p);
            }
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
}

/// Freeze each mount point; on a failure, thaw what was frozen and say which.
pub fn freeze(mounts: &[PathBuf]) -> Result<Frozen, String> {
    let mut fr = Frozen { files: Vec::new() };
    for m in mounts {
        let f = File::open(m).map_err(|e| format!("cannot open {} to freeze it: {e}", m.display()))?;
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE takes an int pointer (unused); the fd is open.
        if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE, &mut arg) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("FIFREEZE {}: {e}", m.display()));
        }
        fr.files.push((m.clone(), f));
    }
    Ok(fr)
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
    fn an_image_file_has_no_mounts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        assert!(mounts_of(&p).is_empty());
        let _ = File::open(&p).unwrap().metadata().unwrap().dev();
    }
}
