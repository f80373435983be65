//! Whether an agent runs on a state folder, and why it stopped.
//!
//! - `STATE/agent.lock`: the running agent holds an exclusive `flock` on it
//!   for its whole life (and writes its pid into it). A second agent on the
//!   same folder is refused; `ferry status` and `ferry unprotect` test the
//!   lock. The kernel drops it when the process ends, however it ends, so
//!   "running" can never outlive the agent.
//! - `STATE/agent.stopped`: why the last agent ended (a signal, `--once`
//!   done, an error), written as it ends and removed when the next starts.
//!   An agent that ended without writing it was killed or crashed.
//! - SIGTERM, SIGINT and SIGHUP ask the agent to stop: the handler only sets
//!   a flag; the agent's loops check it between steps and end cleanly. A
//!   watcher thread makes sure the process ends within [`STOP_GRACE`] even
//!   if a step blocks.

use crate::AgentError;
use ferry_common::durable::{read_state, write_state};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// How long a stop request may take before the process ends anyway.
pub const STOP_GRACE: Duration = Duration::from_millis(1500);

const STOPPED_KIND: &str = "ferry-agent-stopped";
const STOPPED_VERSION: u32 = 1;

static STOP: AtomicI32 = AtomicI32::new(0);

fn lock_path(state: &Path) -> PathBuf {
    state.join("agent.lock")
}

fn stopped_path(state: &Path) -> PathBuf {
    state.join("agent.stopped")
}

/// The exclusive lock of a running agent; released when dropped (or when
/// the process ends).
pub struct Lock {
    _file: File,
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a file descriptor owned by `f`, valid for the call.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn open_lock(state: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(lock_path(state))
}

/// `STATE/agent.lock` opened and locked exclusively without waiting:
/// `Ok(Err(file))` (the file, not locked) when an agent holds it.
fn try_exclusive(state: &Path) -> Result<Result<File, File>, AgentError> {
    let p = lock_path(state);
    let f = open_lock(state).map_err(AgentError::io(format!("lock file {}", p.display())))?;
    match flock(&f, libc::LOCK_EX) {
        Ok(()) => Ok(Ok(f)),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(Err(f)),
        Err(e) => Err(AgentError::Io { what: format!("locking {}", p.display()), source: e }),
    }
}

/// Take the folder's lock for a moment's work that no agent may overlap
/// (`ferry unprotect`): refused while an agent runs. Held until the
/// returned file is closed; no pid is written.
pub fn lock_briefly(state: &Path) -> Result<File, AgentError> {
    try_exclusive(state)?.map_err(|_| AgentError::Usage(format!("an agent is running on {}: stop it first", state.display())))
}

/// Take the state folder for this agent, or say which agent has it.
pub fn lock(state: &Path) -> Result<Lock, AgentError> {
    let mut f = match try_exclusive(state)? {
        Ok(f) => f,
        Err(mut busy) => {
            let pid = read_pid(&mut busy).map(|p| format!(" (pid {p})")).unwrap_or_default();
            return Err(AgentError::Usage(format!(
                "state folder {} is in use by a running agent{pid}: stop it first, or give this one another --state",
                state.display()
            )));
        }
    };
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    let _ = std::fs::remove_file(stopped_path(state));
    Ok(Lock { _file: f })
}

fn read_pid(f: &mut File) -> Option<u32> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether an agent ever took the lock of `state` (it writes its pid there).
pub fn ever_started(state: &Path) -> bool {
    File::open(lock_path(state)).ok().and_then(|mut f| read_pid(&mut f)).is_some()
}

/// The pid of the agent running on `state`, if one is.
pub fn running(state: &Path) -> Option<u32> {
    let mut f = File::open(lock_path(state)).ok()?;
    match flock(&f, libc::LOCK_SH) {
        Ok(()) => None, // released with `f`
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Some(read_pid(&mut f).unwrap_or(0)),
        Err(_) => None,
    }
}

/// Why the last agent on a state folder ended (`STATE/agent.stopped`).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Stopped {
    /// Wall-clock ns.
    pub time_ns: u64,
    pub reason: String,
    /// An error (not a signal, not `--once` done).
    pub failed: bool,
}

/// Record why the agent ends.
pub fn record_stop(state: &Path, reason: &str, failed: bool) {
    let s = Stopped { time_ns: ferry_common::now_ns(), reason: reason.to_string(), failed };
    if let Err(e) = write_state(&stopped_path(state), STOPPED_KIND, STOPPED_VERSION, &s) {
        log::warn!("cannot record why the agent stopped: {e}");
    }
}

/// Why the last agent ended, if it said.
pub fn last_stop(state: &Path) -> Option<Stopped> {
    read_state(&stopped_path(state), STOPPED_KIND, STOPPED_VERSION).ok().flatten()
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(sig, Ordering::SeqCst);
}

/// Route SIGTERM, SIGINT and SIGHUP to the stop flag, and start the watcher
/// that ends the process if a stop takes longer than [`STOP_GRACE`]
/// (recording why in `state` first).
pub fn install_stop_handler(state: &Path) {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only performs an
        // atomic store (async-signal-safe); the struct outlives the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let state = state.to_path_buf();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(sig) = stop_requested() {
            std::thread::sleep(STOP_GRACE);
            let why = format!(
                "{} received; the agent did not finish its step within {:.1}s and ended",
                signal_name(sig),
                STOP_GRACE.as_secs_f64()
            );
            log::warn!("{why}");
            record_stop(&state, &format!("stopped by {}", signal_name(sig)), false);
            std::process::exit(0);
        }
    });
}

/// The signal that asked the agent to stop, if one did.
pub fn stop_requested() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Sleep `d`, or less if a stop is asked for meanwhile.
pub fn sleep_unless_stopped(d: Duration) {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until && stop_requested().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails with [`AgentError::Stopped`] once a stop was asked for.
pub fn check_stop() -> Result<(), AgentError> {
    match stop_requested() {
        Some(sig) => Err(AgentError::Stopped(signal_name(sig).to_string())),
        None => Ok(()),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_lock_refuses_a_second_holder() {
        let d = tempfile::tempdir().unwrap();
        let l = lock(d.path()).unwrap();
        let e = lock_briefly(d.path()).unwrap_err().to_string();
        assert!(e.contains("an agent is running on") && e.contains("stop it first"), "{e}");
        let e = lock(d.path()).err().unwrap().to_string();
        assert!(e.contains(&format!("in use by a running agent (pid {})", std::process::id())), "{e}");
        drop(l);
        let b = lock_briefly(d.path()).unwrap();
        drop(b);
        lock(d.path()).unwrap();
    }
}
