//! The three locks of a disk folder, as typed guards: each is an `flock`
//! on a file in the folder, held for as long as its guard lives and
//! released when the guard drops (its file closes). All the folder's
//! `flock` calls are here.
//!
//! | lock | file | held by | excludes |
//! |------|------|---------|----------|
//! | [`WriterLock`] | `lock` | a stream (the master target), `ferry retention`/`repair`/`failover` with no stream; never waits | every other writer |
//! | [`RecoveryLock`] shared | `recover.lock` | a recovery, an export's read, `verify`'s journal pass | the exclusive holders |
//! | [`RecoveryLock`] exclusive | `recover.lock` | start-up roll-back and cut of the journal, `repair`; retention's punch (tried, never waited for) | every recovery |
//! | [`ApplyGuard`] exclusive | `apply.lock` | a batch, from its first replica write until its sums are written | checks of a chunk against its sum |
//! | [`ApplyGuard`] shared | `apply.lock` | a check of one chunk against its sum | a batch being applied |
//!
//! Order: the writer lock, then the recovery lock, then the apply lock.

use super::folder::{ioe, DiskError, Paths};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// `flock(op)` on `f`, retried when a signal interrupts it.
fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on an fd owned by `f`; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Open (creating) a lock file.
fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(false).open(path)
}

/// `flock(op | LOCK_NB)`: `Ok(false)` when another holder has it.
fn try_flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    match flock(f, op | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The folder's writer lock (`DIR/NAME/lock`, exclusive): one stream, or one
/// offline writer, at a time.
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Take it without waiting: [`DiskError::Busy`] when a stream (or
    /// another writer) holds it.
    pub fn take(paths: &Paths, name: &str) -> Result<WriterLock, DiskError> {
        let f = open(&paths.lock).map_err(ioe(paths.lock.display()))?;
        match try_flock(&f, libc::LOCK_EX) {
            Ok(true) => Ok(WriterLock { _file: f }),
            Ok(false) => Err(DiskError::Busy(name.into())),
            Err(e) => Err(ioe(paths.lock.display())(e)),
        }
    }
}

/// The folder's recovery lock (`DIR/NAME/recover.lock`): shared by
/// recoveries, exclusive for what rewrites the replica or cuts the journal
/// under them.
pub struct RecoveryLock {
    _file: File,
}

impl RecoveryLock {
    fn path(paths: &Paths) -> std::path::PathBuf {
        paths.dir.join("recover.lock")
    }

    fn take(paths: &Paths, op: libc::c_int) -> Result<RecoveryLock, DiskError> {
        let p = Self::path(paths);
        let f = open(&p).map_err(ioe(p.display()))?;
        flock(&f, op).map_err(ioe(p.display()))?;
        Ok(RecoveryLock { _file: f })
    }

    /// Shared (a recovery, an export's read, a verify): waits for an
    /// exclusive holder.
    pub fn shared(paths: &Paths) -> Result<RecoveryLock, DiskError> {
        Self::take(paths, libc::LOCK_SH)
    }

    /// Exclusive (start-up repair, `ferry repair`): waits for every
    /// recovery in progress.
    pub fn exclusive(paths: &Paths) -> Result<RecoveryLock, DiskError> {
        Self::take(paths, libc::LOCK_EX)
    }

    /// Exclusive without waiting (retention): `None` while a recovery holds it.
    pub fn try_exclusive(paths: &Paths) -> Result<Option<RecoveryLock>, DiskError> {
        let p = Self::path(paths);
        let f = open(&p).map_err(ioe(p.display()))?;
        match try_flock(&f, libc::LOCK_EX) {
            Ok(true) => Ok(Some(RecoveryLock { _file: f })),
            Ok(false) => Ok(None),
            Err(e) => Err(ioe(p.display())(e)),
        }
    }
}

/// The folder's apply lock file (`DIR/NAME/apply.lock`), opened once and
/// taken per batch (exclusive) or per chunk check (shared) through
/// [`ApplyGuard`]s.
pub struct ApplyLock(File);

impl ApplyLock {
    /// Open (creating) `DIR/NAME/apply.lock` of the folder `dir`.
    pub fn open(dir: &Path) -> io::Result<ApplyLock> {
        Ok(ApplyLock(open(&dir.join("apply.lock"))?))
    }

    /// Hold it exclusively until the guard drops (a batch being applied).
    pub fn exclusive(&self) -> io::Result<ApplyGuard<'_>> {
        flock(&self.0, libc::LOCK_EX)?;
        Ok(ApplyGuard(&self.0))
    }

    /// Hold it shared until the guard drops (a chunk checked against its sum).
    pub fn shared(&self) -> io::Result<ApplyGuard<'_>> {
        flock(&self.0, libc::LOCK_SH)?;
        Ok(ApplyGuard(&self.0))
    }

    /// Hold it exclusively until this lock drops (its file closes).
    pub fn into_exclusive(self) -> io::Result<ApplyLock> {
        flock(&self.0, libc::LOCK_EX)?;
        Ok(self)
    }
}

/// The apply lock held (shared or exclusive) until dropped.
pub struct ApplyGuard<'a>(&'a File);

impl Drop for ApplyGuard<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, libc::LOCK_UN);
    }
}

/// The recovery lock, then the apply lock, both exclusive (the order a
/// recovery takes them in, shared): no recovery copies, and no chunk is
/// checked against its sum, while a folder is brought to its durable state.
/// Released when dropped.
pub struct Settling {
    _recoveries: RecoveryLock,
    _applying: ApplyLock,
}

impl Settling {
    pub fn take(paths: &Paths) -> Result<Settling, DiskError> {
        let recoveries = RecoveryLock::exclusive(paths)?;
        let p = paths.dir.join("apply.lock");
        let applying = ApplyLock::open(&paths.dir).and_then(ApplyLock::into_exclusive).map_err(ioe(p.display()))?;
        Ok(Settling { _recoveries: recoveries, _applying: applying })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recovery (shared) holds off retention's punch (exclusive, tried),
    /// and one writer at a time holds the folder; each lock is free again
    /// once its guard drops.
    #[test]
    fn guards_exclude_what_the_table_says_until_they_drop() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path(), "d");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let reading = RecoveryLock::shared(&paths).unwrap();
        let second_reader = RecoveryLock::shared(&paths).unwrap();
        assert!(RecoveryLock::try_exclusive(&paths).unwrap().is_none(), "an exclusive taker must wait for recoveries");
        drop(reading);
        drop(second_reader);
        assert!(RecoveryLock::try_exclusive(&paths).unwrap().is_some());

        let w = WriterLock::take(&paths, "d").unwrap();
        assert!(matches!(WriterLock::take(&paths, "d"), Err(DiskError::Busy(n)) if n == "d"));
        drop(w);
        WriterLock::take(&paths, "d").unwrap();
    }
}
