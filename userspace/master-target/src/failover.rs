//! Failover of one disk, the service side: stop its stream, hand over a
//! chosen point as a bootable image (and the QEMU command line that starts
//! it), keep the replica and the journal so that another point can still be
//! chosen, until the operator commits. The state file and ending a failover
//! are the data side (store::failover).

use crate::store::catalog::Point;
use crate::store::failover::{self as state, FailoverState, Phase};
use crate::store::folder::{ioe, read_meta, DiskError, Paths};
use crate::store::lock::WriterLock;
use crate::store::recover::{self, Format, RecoverError};
use crate::store::{retention, settle};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(transparent)]
    State(#[from] state::FailoverError),
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("{0}")]
    Recover(#[from] RecoverError),
    #[error("disk {0}: its stream did not stop within 120 s (an agent that sends nothing keeps it open: stop the agent, or let it send); nothing was failed over")]
    StreamGoesOn(String),
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
    read_meta(data, name)?;
    let paths = Paths::new(data, name);
    let prev = state::state(data, name)?;
    if prev.as_ref().is_some_and(|s| s.state == Phase::Committed) {
        return Err(state::FailoverError::Committed(name.into()).into());
    }
    let ours = prev.as_ref().is_some_and(|s| same_file(Path::new(&s.out), out));
    // Before anything changes: a refused output leaves the disk as it was.
    let output = recover::prepare(data, name, out, format, replace || ours)?;
    let was_active = prev.is_some();
    let shown = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let st = FailoverState { state: Phase::Active, point: point.id, out: shown.display().to_string(), since_ns: ferry_common::now_ns() };
    state::record(&paths, &st)?;
    // Retention keeps the point while it is written out.
    let _pin = retention::Pin::new(&paths, point.id).map_err(ioe(paths.dir.display()))?;
    // The disk lock is held by an open stream: it ends at its next batch.
    let deadline = Instant::now() + Duration::from_secs(120);
    let _lock = loop {
        match WriterLock::take(&paths, name) {
            Ok(l) => break l,
            Err(DiskError::Busy(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                // Nothing was handed over: a first failover leaves no state.
                if !was_active {
                    state::forget(&paths);
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
    let size = read_meta(data, name)?.size;
    if let Err(e) = settle::settle_held(&paths, name, size) {
        if !was_active {
            state::forget(&paths);
        }
        return Err(e.into());
    }
    if let Err(e) = recover::write(data, name, point, output) {
        if !was_active {
            state::forget(&paths);
        }
        return Err(e.into());
    }
    Ok((st, fmt))
}

/// Whether two paths name the same file (both exist and resolve alike).
fn same_file(a: &Path, b: &Path) -> bool {
    matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// The QEMU command line that boots an image handed over by a failover.
pub fn qemu_command(image: &Path, format: Format) -> String {
    let fmt = if format == Format::Qcow2 { "qcow2" } else { "raw" };
    format!(
        "qemu-system-x86_64 -machine accel=kvm:tcg -m 2048 -smp 2 -drive file={},format={fmt},if=virtio -nic user,model=virtio-net-pci -nographic",
        image.display()
    )
}
