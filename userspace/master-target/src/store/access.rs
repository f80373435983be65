//! Who may write which disk: `DATA/access.state` (state file
//! `ferry-access` v1, docs/formats.md) binds each disk name to the identity
//! (`ROLE/NAME` of a certificate) that created the disk over mutual TLS.
//! Another identity opening that disk is refused; so is any identity
//! opening a disk that exists but is bound to none (made before the master
//! target had an identity, or unbound with `ferry revoke`) until `ferry
//! grant` names its owner. Streams over plain loopback TCP (a master target
//! without `--identity`) are not checked: on one machine, root is the
//! authority.

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
    #[error("disk {disk} exists and belongs to no identity (written before this master target had one, or unbound); {who} may not write it until `ferry grant --data DIR --name {disk} --to ROLE/NAME` names its owner")]
    Unbound { disk: String, who: String },
}

/// What [`check`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// `who` owns the disk.
    Owner,
    /// No such disk yet: `who` creates it and is bound with [`bind_new`].
    New,
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

/// May `who` write `disk` (a valid disk name)? Changes nothing.
pub fn check(data: &Path, disk: &str, who: &str) -> Result<Admit, AccessError> {
    let a = load(data)?;
    match a.bindings.get(disk) {
        Some(owner) if owner == who => Ok(Admit::Owner),
        Some(owner) => Err(AccessError::Denied { disk: disk.into(), owner: owner.clone(), who: who.into() }),
        None if data.join(disk).exists() => Err(AccessError::Unbound { disk: disk.into(), who: who.into() }),
        None => Ok(Admit::New),
    }
}

/// Bind a disk `who` just created (under its writer lock, so no other
/// stream raced it); refuses if someone bound it meanwhile.
pub fn bind_new(data: &Path, disk: &str, who: &str) -> Result<(), AccessError> {
    let _l = lock(data)?;
    let mut a = load(data)?;
    match a.bindings.get(disk) {
        Some(owner) if owner == who => Ok(()),
        Some(owner) => Err(AccessError::Denied { disk: disk.into(), owner: owner.clone(), who: who.into() }),
        None => {
            a.bindings.insert(disk.into(), who.into());
            write_state(&path(data), KIND, VERSION, &a)?;
            Ok(())
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

/// `ferry revoke`: unbind `disk`; it then refuses every identity until
/// `ferry grant` names an owner.
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
    fn the_creator_owns_a_disk_until_granted_away_and_an_unbound_disk_refuses_all() {
        let d = std::env::temp_dir().join(format!("ferry-access-{}-{}", std::process::id(), ferry_common::now_ns()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(check(&d, "db", "agent/a").unwrap(), Admit::New);
        std::fs::create_dir(d.join("db")).unwrap(); // Disk::open made it
        bind_new(&d, "db", "agent/a").unwrap();
        assert_eq!(check(&d, "db", "agent/a").unwrap(), Admit::Owner);
        let e = check(&d, "db", "agent/b").unwrap_err().to_string();
        assert!(e.contains("belongs to agent/a") && e.contains("ferry grant"), "{e}");
        assert!(bind_new(&d, "db", "agent/b").is_err());
        assert_eq!(grant(&d, "db", "agent/b").unwrap().as_deref(), Some("agent/a"));
        assert!(check(&d, "db", "agent/a").is_err());
        assert_eq!(check(&d, "db", "agent/b").unwrap(), Admit::Owner);
        assert_eq!(revoke(&d, "db").unwrap().as_deref(), Some("agent/b"));
        let e = check(&d, "db", "agent/b").unwrap_err().to_string();
        assert!(e.contains("belongs to no identity"), "{e}");
        // A disk made before identities is unbound too.
        std::fs::create_dir(d.join("old")).unwrap();
        assert!(matches!(check(&d, "old", "agent/a"), Err(AccessError::Unbound { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
