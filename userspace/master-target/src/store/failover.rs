//! The data side of a failover: its state file, which makes the master
//! target refuse the disk's stream, and ending it (commit or cancel). The
//! service side (stopping the stream, handing over a point as a bootable
//! image) is the crate's `failover` module.
//!
//! State: `DIR/NAME/failover.state` (a durable state file, docs/formats.md):
//! `{"state": "active"|"committed", "point": ID, "out": PATH, "since_ns"}`.
//! While it exists the master target refuses the disk's stream (at OPEN,
//! and at the next batch of a stream already open): with ERROR 12 while it
//! is `active` (a running agent waits and retries), with ERROR 11 once
//! `committed` (the agent stops). `--cancel` removes it (replication
//! resumes where it stopped: the replica was never changed, and a waiting
//! agent reconnects by itself); `--commit` makes it final: the stream stays
//! refused and no other point can be chosen (the folder is kept for the
//! record; remove it to reclaim its space).

use super::folder::{ioe, DiskError, Paths};
use ferry_common::durable::{read_state, write_state};
use ferry_common::units::rfc3339;
use std::path::{Path, PathBuf};

const KIND: &str = "ferry-failover";
const VERSION: u32 = 1;

/// Where a failover stands (stored as "active" or "committed").
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// A point handed over; another may still be chosen.
    Active,
    /// Final.
    Committed,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FailoverState {
    pub state: Phase,
    pub point: u64,
    pub out: String,
    pub since_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("{0}")]
    State(#[from] ferry_common::durable::StateError),
    #[error(
        "disk {0}: the failover is committed; no other point can be chosen and replication cannot resume \
         (protect the disk under a new name to replicate it again)"
    )]
    Committed(String),
    #[error("disk {0} is not failed over")]
    NotFailedOver(String),
}

fn state_path(paths: &Paths) -> PathBuf {
    paths.dir.join("failover.state")
}

/// Record `st` as the disk's failover state (durably).
pub fn record(paths: &Paths, st: &FailoverState) -> Result<(), FailoverError> {
    Ok(write_state(&state_path(paths), KIND, VERSION, st)?)
}

/// Remove a failover state that [`record`] wrote (best effort: a first
/// failover that handed nothing over leaves no state).
pub fn forget(paths: &Paths) {
    let _ = std::fs::remove_file(state_path(paths));
}

/// The disk's failover state, if any.
pub fn state(data: &Path, name: &str) -> Result<Option<FailoverState>, FailoverError> {
    Ok(read_state(&state_path(&Paths::new(data, name)), KIND, VERSION)?)
}

/// Refuse the stream of a disk that is failed over (master target).
pub fn refuse_if_failed_over(paths: &Paths, name: &str) -> Result<(), DiskError> {
    let p = state_path(paths);
    if !p.exists() {
        return Ok(());
    }
    match read_state::<FailoverState>(&p, KIND, VERSION) {
        Ok(Some(s)) if s.state == Phase::Committed => {
            Err(DiskError::FailedOverCommitted { name: name.into(), why: format!("to point {} at {}", s.point, rfc3339(s.since_ns)) })
        }
        Ok(Some(s)) => Err(DiskError::FailedOver { name: name.into(), why: format!("to point {} since {}", s.point, rfc3339(s.since_ns)) }),
        // Unreadable: refused as a failover still pending (the operator can
        // still cancel or commit it).
        Ok(None) | Err(_) => Err(DiskError::FailedOver { name: name.into(), why: format!("{} cannot be read", p.display()) }),
    }
}

/// End the failover: `commit` makes it final, otherwise (cancel) the
/// stream is accepted again.
pub fn finish(data: &Path, name: &str, commit: bool) -> Result<Option<FailoverState>, FailoverError> {
    let paths = Paths::new(data, name);
    let Some(mut s) = state(data, name)? else {
        return Err(FailoverError::NotFailedOver(name.into()));
    };
    if s.state == Phase::Committed {
        return Err(FailoverError::Committed(name.into()));
    }
    if commit {
        s.state = Phase::Committed;
        write_state(&state_path(&paths), KIND, VERSION, &s)?;
        Ok(Some(s))
    } else {
        std::fs::remove_file(state_path(&paths)).map_err(|e| FailoverError::Disk(ioe(state_path(&paths).display())(e)))?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_failover_asks_to_wait_and_a_committed_one_is_final() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path(), "vm");
        std::fs::create_dir_all(&paths.dir).unwrap();
        assert!(refuse_if_failed_over(&paths, "vm").is_ok());
        let st = FailoverState { state: Phase::Active, point: 7, out: "/x.img".into(), since_ns: 0 };
        write_state(&state_path(&paths), KIND, VERSION, &st).unwrap();
        let e = refuse_if_failed_over(&paths, "vm").unwrap_err();
        assert!(matches!(e, DiskError::FailedOver { .. }), "{e}");
        let m = e.to_string();
        assert!(m.contains("point 7") && m.contains("ferry failover --cancel"), "{m}");
        finish(d.path(), "vm", true).unwrap();
        let e = refuse_if_failed_over(&paths, "vm").unwrap_err();
        assert!(matches!(e, DiskError::FailedOverCommitted { .. }), "{e}");
        let m = e.to_string();
        assert!(m.contains("committed") && m.contains("new name") && !m.contains("--cancel"), "{m}");
        let e = finish(d.path(), "vm", false).unwrap_err().to_string();
        assert!(e.contains("committed") && e.contains("new name"), "{e}");
    }
}
