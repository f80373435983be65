//! Who may write which disk: `DATA/access.state` (state file
//! `ferry-access` v1, docs/formats.md) binds each disk name to the identity
//! (`ROLE/NAME` of a certificate) that first opened it over mutual TLS.
//! Another identity opening that disk is refused; `ferry grant` and
//! `ferry revoke` change a binding. Streams over plain loopback TCP (a
//! master target without `--identity`) are not bound: on one machine,
//! root is the authority.

use ferry_common::durable::{read_state, write_state, StateError};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const KIND: &str = "ferry-access";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Access {
    /// Disk name → the identity allowed to write it (`agent/db1`).
    pub bindings: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("disk {disk} belongs to {owner}; {who} may not write it (the owner can be changed with `ferry grant --data DIR --name {disk} --to {who}`)")]
    Denied { disk: String, owner: String, who: String },
}

fn path(data: &Path) -> PathBuf {
    data.join("access.state")
}

/// Exclusive lock for a read-modify-write of the bindings.
struct Locked {
    _file: File,
}

fn lock(data: &Path) -> Result<Locked, AccessError> {
    let p = data.join("access.lock");
    let io = |source| AccessError::Io { what: format!("cannot lock {}", p.display()), source };
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(io)?;
    // SAFETY: flock on a descriptor owned here; no memory is shared.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(Locked { _file: f })
}

pub fn load(data: &Path) -> Result<Access, AccessError> {
    Ok(read_state(&path(data), KIND, VERSION)?.unwrap_or_default())
}

/// May `who` write `disk`? Binds an unbound disk to `who` (first use).
/// Returns whether it bound it now.
pub fn admit(data: &Path, disk: &str, who: &str) -> Result<bool, AccessError> {
    let _l = lock(data)?;
    let mut a = load(data)?;
    match a.bindings.get(disk) {
        Some(owner) if owner == who => Ok(false),
        Some(owner) => Err(AccessError::Denied { disk: disk.into(), owner: owner.clone(), who: who.into() }),
        None => {
            a.bindings.insert(disk.into(), who.into());
            write_state(&path(data), KIND, VERSION, &a)?;
            Ok(true)
        }
    }
}

/// `ferry grant`: `disk` belongs to `who` from now on; the previous owner.
pub fn grant(data: &Path, disk: &str, who: &str) -> Result<Option<String>, AccessError> {
    let _l = lock(data)?;
    let mut a = load(data)?;
    let old = a.bindings.insert(disk.into(), who.into());
    write_state(&path(data), KIND, VERSION, &a)?;
    Ok(old)
}

/// `ferry revoke`: unbind `disk` (the next identity to open it owns it).
pub fn revoke(data: &Path, disk: &str) -> Result<Option<String>, AccessError> {
    let _l = lock(data)?;
    let mut a = load(data)?;
    let old = a.bindings.remove(disk);
    write_state(&path(data), KIND, VERSION, &a)?;
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_identity_owns_a_disk_until_granted_away() {
        let d = std::env::temp_dir().join(format!("ferry-access-{}-{}", std::process::id(), ferry_common::now_ns()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(admit(&d, "db", "agent/a").unwrap());
        assert!(!admit(&d, "db", "agent/a").unwrap());
        let e = admit(&d, "db", "agent/b").unwrap_err().to_string();
        assert!(e.contains("belongs to agent/a") && e.contains("ferry grant"), "{e}");
        assert_eq!(grant(&d, "db", "agent/b").unwrap().as_deref(), Some("agent/a"));
        assert!(admit(&d, "db", "agent/a").is_err());
        assert!(!admit(&d, "db", "agent/b").unwrap());
        assert_eq!(revoke(&d, "db").unwrap().as_deref(), Some("agent/b"));
        assert!(admit(&d, "db", "agent/c").unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
