//! Crash-safe small files.
//!
//! `write_atomic` replaces a file so that after a crash either the old or the
//! new content is there, never a mix: write a temp file in the same
//! directory, fsync it, rename over the target, fsync the directory.
//!
//! State files (agent state, master target `disk.meta`) use one checksummed
//! text format, documented in docs/formats.md:
//!
//! ```text
//! <kind> v<version>\n          e.g. "ferry-agent-state v1"
//! xxh3-128:<32 hex digits>\n   checksum of the body bytes that follow
//! <body>                       JSON
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a {kind} file (bad header); move it aside to start fresh")]
    BadHeader { path: PathBuf, kind: String },
    #[error("{path}: version {found} is not supported (this ferry reads v{supported}); upgrade ferry")]
    Version { path: PathBuf, found: String, supported: u32 },
    #[error("{path}: checksum mismatch, the file is damaged; move it aside to start fresh")]
    Checksum { path: PathBuf },
    #[error("{path}: unreadable body: {msg}")]
    Body { path: PathBuf, msg: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// fsync a directory so that a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` with `data` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Serialize `value` as a checksummed state file of `kind` and `version`.
pub fn write_state<T: Serialize>(path: &Path, kind: &str, version: u32, value: &T) -> Result<(), StateError> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| StateError::Body { path: path.into(), msg: e.to_string() })?;
    let mut out = format!("{kind} v{version}\nxxh3-128:{}\n", hex(&crate::xxh128(&body))).into_bytes();
    out.extend_from_slice(&body);
    write_atomic(path, &out).map_err(io_err(path))
}

/// Read a state file written by [`write_state`]. `Ok(None)` when absent.
pub fn read_state<T: DeserializeOwned>(path: &Path, kind: &str, version: u32) -> Result<Option<T>, StateError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let bad = || StateError::BadHeader { path: path.into(), kind: kind.into() };
    let mut lines = data.splitn(3, |&b| b == b'\n');
    let head = std::str::from_utf8(lines.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let sum = std::str::from_utf8(lines.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let body = lines.next().ok_or_else(bad)?;
    let ver = head.strip_prefix(kind).and_then(|r| r.strip_prefix(" v")).ok_or_else(bad)?;
    if ver != version.to_string() {
        return Err(StateError::Version { path: path.into(), found: ver.into(), supported: version });
    }
    let want = sum.strip_prefix("xxh3-128:").ok_or_else(bad)?;
    if want != hex(&crate::xxh128(body)) {
        return Err(StateError::Checksum { path: path.into() });
    }
    serde_json::from_slice(body).map(Some).map_err(|e| StateError::Body { path: path.into(), msg: e.to_string() })
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse lower- or upper-case hex into exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct S {
        a: u64,
        b: String,
    }

    #[test]
    fn state_roundtrip_and_damage_detection() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("st");
        assert!(read_state::<S>(&p, "k", 1).unwrap().is_none());
        let s = S { a: 7, b: "x".into() };
        write_state(&p, "k", 1, &s).unwrap();
        assert_eq!(read_state::<S>(&p, "k", 1).unwrap(), Some(s));
        assert!(matches!(read_state::<S>(&p, "k", 2), Err(StateError::Version { .. })));
        assert!(matches!(read_state::<S>(&p, "other", 1), Err(StateError::BadHeader { .. })));
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 3] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(matches!(read_state::<S>(&p, "k", 1), Err(StateError::Checksum { .. })));
    }

    #[test]
    fn hex_roundtrip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex::<4>(&hex(&b)), Some(b));
        assert_eq!(unhex::<4>("00"), None);
        assert_eq!(unhex::<1>("zz"), None);
    }
}
