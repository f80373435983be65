//! Space kept back for the master target's own metadata, and the free
//! space of a data folder's filesystem.
//!
//! Each disk folder holds `reserve`, an 8 MiB preallocated file. When a
//! metadata write (the catalog, `retention.state`, an export's pin) fails
//! with ENOSPC, the reserve is given up and the write tried again, so that
//! tightening retention on a full filesystem works and frees the journal's
//! space. The reserve is made again once space is back (at open, and after
//! a retention pass dropped points).

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const RESERVE: u64 = 8 << 20;

fn path(dir: &Path) -> PathBuf {
    dir.join("reserve")
}

/// Make the reserve if it is missing (best effort: on a full filesystem it
/// stays missing until space is back).
pub fn ensure(dir: &Path) {
    let p = path(dir);
    if std::fs::metadata(&p).is_ok_and(|m| m.len() >= RESERVE) {
        return;
    }
    let Ok(f) = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&p) else { return };
    // SAFETY: fallocate on an fd owned by `f`; no memory is passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, RESERVE as libc::off_t) };
    if rc != 0 {
        drop(f);
        let _ = std::fs::remove_file(&p);
    }
}

/// Whether `e` is "no space left on device" (or over quota).
pub fn is_enospc(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Run `f`; if it fails for lack of space, give up the reserve of `dir` and
/// run it once more.
pub fn retry<T, E>(dir: &Path, mut f: impl FnMut() -> Result<T, E>, enospc: impl Fn(&E) -> bool) -> Result<T, E> {
    match f() {
        Err(e) if enospc(&e) && path(dir).exists() => {
            log::warn!("{}: the filesystem is full; giving up the {} MiB reserve to write metadata", dir.display(), RESERVE >> 20);
            let _ = std::fs::remove_file(path(dir));
            f()
        }
        r => r,
    }
}

/// [`retry`] for state files.
pub fn state_enospc(e: &ferry_common::durable::StateError) -> bool {
    matches!(e, ferry_common::durable::StateError::Io { source, .. } if is_enospc(source))
}

/// Free and total bytes of the filesystem holding `path` (statvfs).
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; a zeroed value is valid to overwrite.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills `s` from a valid NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64 * s.f_frsize as u64, s.f_blocks as u64 * s.f_frsize as u64))
}
