//! Failover of one disk: stop its stream, hand over a chosen point as a
//! bootable image (and the QEMU command line that starts it), keep the
//! replica and the journal so that another point can still be chosen, until
//! the operator commits.
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

use crate::catalog::Point;
use crate::disk::{DiskError, Paths};
use crate::recover::{self, Format, RecoverError};
use ferry_common::durable::{read_state, write_state};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const KIND: &str = "ferry-failover";
const VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FailoverState {
    /// "active" (a point handed over; another may still be chosen) or
    /// "committed" (final).
    pub state: String,
    pub point: u64,
    pub out: String,
    pub since_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("{0}")]
    Recover(#[from] RecoverError),
    #[error("{0}")]
    State(#[from] ferry_common::durable::StateError),
    #[error(
        "disk {0}: the failover is committed; no other point can be chosen and replication cannot resume \
         (protect the disk under a new name to replicate it again)"
    )]
    Committed(String),
    #[error("disk {0} is not failed over")]
    NotFailedOver(String),
    #[error("disk {0}: its stream did not stop within 120 s (an agent that sends nothing keeps it open: stop the agent, or let it send); nothing was failed over")]
    StreamGoesOn(String),
}

fn state_path(paths: &Paths) -> PathBuf {
    paths.dir.join("failover.state")
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
        Ok(Some(s)) if s.state == "committed" => Err(DiskError::FailedOverCommitted {
            name: name.into(),
            why: format!("to point {} at {}", s.point, recover::rfc3339(s.since_ns)),
        }),
        Ok(Some(s)) => {
            Err(DiskError::FailedOver { name: name.into(), why: format!("to point {} since {}", s.point, recover::rfc3339(s.since_ns)) })
        }
        // Unreadable: refused as a failover still pending (the operator can
        // still cancel or commit it).
        Ok(None) | Err(_) => Err(DiskError::FailedOver { name: name.into(), why: format!("{} cannot be read", p.display()) }),
    }
}

/// Fail `name` over to `point`, written to `out` (checked first, with the
/// rules of `ferry recover`: see [`recover::prepare`]). The stream is
/// refused from now on; this waits (120 s at most) for a stream already
/// open to end before the image is written, so that nothing is applied
/// meanwhile.
///
/// An existing `out` is replaced only with `replace`, or when it is the
/// image the active failover of this disk wrote (choosing another point
/// rewrites it: that is what running failover again is for).
pub fn failover(
    data: &Path,
    name: &str,
    point: &Point,
    out: &Path,
    format: Option<Format>,
    replace: bool,
) -> Result<(FailoverState, Format), FailoverError> {
    crate::disk::read_meta(data, name)?;
    let paths = Paths::new(data, name);
    let prev = state(data, name)?;
    if prev.as_ref().is_some_and(|s| s.state == "committed") {
        return Err(FailoverError::Committed(name.into()));
    }
    let ours = prev.as_ref().is_some_and(|s| same_file(Path::new(&s.out), out));
    // Before anything changes: a refused output leaves the disk as it was.
    let output = recover::prepare(data, name, out, format, replace || ours)?;
    let was_active = prev.is_some();
    let shown = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let st = FailoverState { state: "active".into(), point: point.id, out: shown.display().to_string(), since_ns: ferry_common::now_ns() };
    write_state(&state_path(&paths), KIND, VERSION, &st)?;
    // Retention keeps the point while it is written out.
    let _pin = crate::retention::Pin::new(&paths, point.id).map_err(|e| DiskError::Io(format!("{}: {e}", paths.dir.display())))?;
    // The disk lock is held by an open stream: it ends at its next batch.
    let deadline = Instant::now() + Duration::from_secs(120);
    let _lock = loop {
        match crate::disk::lock(&paths, name) {
            Ok(l) => break l,
            Err(DiskError::Busy(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                // Nothing was handed over: a first failover leaves no state.
                if !was_active {
                    let _ = std::fs::remove_file(state_path(&paths));
                }
                return Err(match e {
                    DiskError::Busy(_) => FailoverError::StreamGoesOn(name.into()),
                    e => e.into(),
                });
            }
        }
    };
    let fmt = output.format();
    // Holding the writer lock: bring a folder left by a crash to its durable
    // state here (recover::write cannot take the lock we hold).
    let size = crate::disk::read_meta(data, name)?.size;
    if let Err(e) = crate::disk::settle_held(&paths, name, size) {
        if !was_active {
            let _ = std::fs::remove_file(state_path(&paths));
        }
        return Err(e.into());
    }
    if let Err(e) = recover::write(data, name, point, output) {
        if !was_active {
            let _ = std::fs::remove_file(state_path(&paths));
        }
        return Err(e.into());
    }
    Ok((st, fmt))
}

/// Whether two paths name the same file (both exist and resolve alike).
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// End the failover: `commit` makes it final, otherwise (cancel) the
/// stream is accepted again.
pub fn finish(data: &Path, name: &str, commit: bool) -> Result<Option<FailoverState>, FailoverError> {
    let paths = Paths::new(data, name);
    let Some(mut s) = state(data, name)? else {
        return Err(FailoverError::NotFailedOver(name.into()));
    };
    if s.state == "committed" {
        return Err(FailoverError::Committed(name.into()));
    }
    if commit {
        s.state = "committed".into();
        write_state(&state_path(&paths), KIND, VERSION, &s)?;
        Ok(Some(s))
    } else {
        std::fs::remove_file(state_path(&paths))
            .map_err(|e| FailoverError::Disk(DiskError::Io(format!("{}: {e}", state_path(&paths).display()))))?;
        Ok(None)
    }
}

/// The QEMU command line that boots an image handed over by a failover.
pub fn qemu_command(image: &Path, format: Format) -> String {
    let fmt = if format == Format::Qcow2 { "qcow2" } else { "raw" };
    format!(
        "qemu-system-x86_64 -machine accel=kvm:tcg -m 2048 -smp 2 -drive file={},format={fmt},if=virtio -nic user,model=virtio-net-pci -nographic",
        image.display()
    )
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
        let st = FailoverState { state: "active".into(), point: 7, out: "/x.img".into(), since_ns: 0 };
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
