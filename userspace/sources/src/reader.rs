//! Reading the protected disk: the [`BlockReader`] trait, and
//! [`LocalReader`], which reads a local device or image file with many
//! reads in flight.
//!
//! A tracker reports changes as extents all over the disk; one synchronous
//! read at a time leaves a device that serves hundreds of thousands of IOPS
//! at queue depth 32 waiting on each 4 KiB read in turn. [`LocalReader`]
//! splits the extents into pieces of at most 1 MiB and keeps up to
//! [`IN_FLIGHT`] of them being read by a pool of threads, started once
//! and kept for the reader's life (`pread` on the
//! source, `O_DIRECT` where it allows), while the caller receives the
//! pieces in the order of the list, so what is sent keeps the tracker's
//! order. Read-ahead is bounded to twice [`IN_FLIGHT`] pieces.
//! [`BlockReader::read_extents_with`] runs a caller's work on each piece
//! where it was read (hashing for a checksum pass, units and compression
//! for the initial sync), in parallel on those threads.
//!
//! A VDDK reader (VixDiskLib_Read through an NBD/hotadd transport) or an
//! NBD reader of a QEMU export implements the same trait: the shipper does
//! not know which one it has.

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use ferry_common::buf::AlignedBuf;
use ferry_common::source::Source;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

/// Reads in flight at most.
pub const IN_FLIGHT: usize = 32;
/// The largest piece one read covers.
pub const PIECE: u64 = 1 << 20;

/// A read of the disk failed, or the readers stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the disk at {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The reader threads ended before every piece was read.
    #[error("the disk readers stopped early")]
    Stopped,
}

/// Reads extents of the protected disk, many at a time.
pub trait BlockReader {
    /// The disk's size in bytes.
    fn size(&self) -> u64;

    /// Read `exts` (`[start, end)`) and hand each piece (at most [`PIECE`]
    /// bytes) to `each(offset, bytes)` in the list's order. Stops at the
    /// first error, of a read or of `each`. Returns the bytes read.
    fn read_extents<E: From<ReadError>>(&self, exts: &[(u64, u64)], each: impl FnMut(u64, &[u8]) -> Result<(), E>) -> Result<u64, E>;

    /// [`BlockReader::read_extents`], with `work(bytes)` done on each piece
    /// where it was read (on the reader's threads, in parallel, when it has
    /// them: a checksum pass hashes there) and its result handed to `each`
    /// with the piece.
    fn read_extents_with<T: Send, E: From<ReadError>>(
        &self,
        exts: &[(u64, u64)],
        work: impl Fn(&[u8]) -> T + Sync,
        mut each: impl FnMut(u64, &[u8], T) -> Result<(), E>,
    ) -> Result<u64, E> {
        self.read_extents(exts, |off, data| each(off, data, work(data)))
    }
}

/// Split `exts` (`[start, end)`) into pieces of at most [`PIECE`] bytes.
pub fn pieces(exts: &[(u64, u64)]) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    for &(a, b) in exts {
        let mut off = a;
        while off < b {
            let n = (b - off).min(PIECE);
            out.push((off, n as usize));
            off += n;
        }
    }
    out
}

/// The room a piece of `n` bytes takes in a group's buffer: whole pages,
/// so that every piece starts aligned for `O_DIRECT`.
fn room(n: usize) -> usize {
    n.div_ceil(ferry_common::buf::ALIGN) * ferry_common::buf::ALIGN
}

/// The local disk (a block device or an image file) read with `pread`,
/// `O_DIRECT` where the source allows, [`IN_FLIGHT`] reads at a time.
///
/// The reader threads are started at the first call that needs them and
/// kept for the reader's life (its clones share them); they end when the
/// last clone is dropped. Starting ~33 threads for every batch of a few
/// hundred 4 KiB changes was a large part of the agent's CPU under random
/// writes.
#[derive(Clone)]
pub struct LocalReader {
    inner: Arc<Inner>,
}

struct Inner {
    src: Arc<Source>,
    pool: OnceLock<Pool>,
}

impl LocalReader {
    pub fn new(src: Arc<Source>) -> LocalReader {
        LocalReader { inner: Arc::new(Inner { src, pool: OnceLock::new() }) }
    }
}

/// One piece's read, with the work of the call it belongs to, run on a
/// reader thread. The call's borrows are erased to `'static`: see
/// [`Drain`] for why that is sound.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// [`IN_FLIGHT`] threads taking [`Job`]s from one channel.
struct Pool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new() -> Pool {
        let (tx, rx) = unbounded::<Job>();
        let mut threads = Vec::with_capacity(IN_FLIGHT);
        for _ in 0..IN_FLIGHT {
            let rx = rx.clone();
            match std::thread::Builder::new().name("ferry-read".into()).spawn(move || {
                for job in rx {
                    job();
                }
            }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Fewer threads read fewer pieces at a time; with none
                    // the caller reads one piece at a time itself.
                    log::warn!("starting a disk reader thread: {e}");
                    break;
                }
            }
        }
        Pool { jobs: Some(tx), threads }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The threads end once the channel is closed and empty.
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Why a piece came back without its bytes.
enum Failed {
    Io(std::io::Error),
    /// The call's work panicked on the reader thread: resumed in the caller.
    Panic(Box<dyn std::any::Any + Send>),
    /// The call had stopped before the piece was read.
    Cancelled,
}

/// A group's result: its index, and its buffer with each piece's work, or
/// the offset where it failed.
type Done<T> = (usize, Result<(AlignedBuf, Vec<T>), (u64, Failed)>);

/// Waits, when a call ends in any way (its result, an error, a panic of
/// `each`), for every job it dispatched to have sent its result: a job
/// borrows the call's `work`, source and cancel flag, so none may still run
/// once the call has returned. After its send a job only drops its own
/// clones of the call's channels (reference counted, and empty by then).
struct Drain<'r, T> {
    rx: &'r Receiver<Done<T>>,
    cancel: &'r AtomicBool,
    outstanding: usize,
}

impl<T> Drop for Drain<'_, T> {
    fn drop(&mut self) {
        // Pieces not yet started are skipped.
        self.cancel.store(true, Ordering::Relaxed);
        while self.outstanding > 0 {
            // The call keeps a sender, so this waits for the jobs' results
            // (a job always sends one: a read error or a panic included).
            if self.rx.recv().is_err() {
                break;
            }
            self.outstanding -= 1;
        }
    }
}

impl BlockReader for LocalReader {
    fn size(&self) -> u64 {
        self.inner.src.size()
    }

    fn read_extents<E: From<ReadError>>(&self, exts: &[(u64, u64)], mut each: impl FnMut(u64, &[u8]) -> Result<(), E>) -> Result<u64, E> {
        self.read_extents_with(exts, |_| (), |off, data, ()| each(off, data))
    }

    fn read_extents_with<T: Send, E: From<ReadError>>(
        &self,
        exts: &[(u64, u64)],
        work: impl Fn(&[u8]) -> T + Sync,
        mut each: impl FnMut(u64, &[u8], T) -> Result<(), E>,
    ) -> Result<u64, E> {
        let src = &*self.inner.src;
        let pieces = pieces(exts);
        let total: u64 = pieces.iter().map(|&(_, n)| n as u64).sum();
        let jobs = if pieces.len() <= 2 {
            None
        } else {
            let pool = self.inner.pool.get_or_init(Pool::new);
            pool.jobs.as_ref().filter(|_| !pool.threads.is_empty())
        };
        let Some(jobs) = jobs else {
            let mut buf = AlignedBuf::new(PIECE as usize);
            for &(off, n) in &pieces {
                let data = src.read_into(&mut buf, off, n).map_err(|source| ReadError::Read { offset: off, source })?;
                each(off, data, work(data))?;
            }
            return Ok(total);
        };
        // Small pieces (a tracker's scattered 4 KiB changes) go to the
        // threads in groups, read one after another into one buffer: one
        // hand-over per group, not per 4 KiB. Groups are sized so that a
        // batch still keeps every thread busy (IN_FLIGHT reads in flight).
        let per = (pieces.len() / (2 * IN_FLIGHT)).clamp(1, 64);
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let (mut g0, mut bytes) = (0usize, 0usize);
        for (i, &(_, n)) in pieces.iter().enumerate() {
            let need = room(n);
            if i > g0 && (i - g0 >= per || bytes + need > PIECE as usize) {
                groups.push((g0, i));
                (g0, bytes) = (i, 0);
            }
            bytes += need;
        }
        groups.push((g0, pieces.len()));
        let (done_tx, done_rx) = unbounded::<Done<T>>();
        // Buffers handed back by the caller are read into again: a
        // whole-disk pass does not fault in a fresh gigabyte.
        let (pool_tx, pool_rx) = bounded::<AlignedBuf>(3 * IN_FLIGHT);
        let cancel = AtomicBool::new(false);
        let (work, pieces_ref) = (&work, &pieces);
        // Declared after everything the jobs borrow: dropped first.
        let mut drain = Drain { rx: &done_rx, cancel: &cancel, outstanding: 0 };
        let mut sent = 0usize;
        let mut next = 0usize;
        let mut waiting: BTreeMap<usize, (AlignedBuf, Vec<T>)> = BTreeMap::new();
        while next < groups.len() {
            // Read-ahead is bounded: a group is dispatched only while fewer
            // than 2 * IN_FLIGHT are read and not yet taken by the caller.
            while sent < groups.len() && sent - next < 2 * IN_FLIGHT {
                let (gi, (a, b)) = (sent, groups[sent]);
                let (done, bufs, cancel) = (done_tx.clone(), pool_rx.clone(), &cancel);
                let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
                    let r = if cancel.load(Ordering::Relaxed) {
                        Err((pieces_ref[a].0, Failed::Cancelled))
                    } else {
                        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let need: usize = pieces_ref[a..b].iter().map(|&(_, n)| room(n)).sum();
                            let mut buf = match bufs.try_recv() {
                                Ok(b) if b.capacity() >= need => b,
                                _ => AlignedBuf::new(need),
                            };
                            let mut ts = Vec::with_capacity(b - a);
                            let mut at = 0usize;
                            let full = buf.full_mut();
                            for &(off, n) in &pieces_ref[a..b] {
                                let space = room(n);
                                match src.read_into_slice(&mut full[at..at + space], off, n) {
                                    Ok(data) => ts.push(work(data)),
                                    Err(e) => return Err((off, e)),
                                }
                                at += space;
                            }
                            Ok((buf, ts))
                        }));
                        match read {
                            Ok(Ok(x)) => Ok(x),
                            Ok(Err((off, e))) => Err((off, Failed::Io(e))),
                            Err(p) => Err((pieces_ref[a].0, Failed::Panic(p))),
                        }
                    };
                    let _ = done.send((gi, r));
                });
                // SAFETY: the job borrows `src`, `work`, `pieces` and
                // `cancel`, which outlive this call's `drain`; `drain`
                // (dropped before them, on every way out of this function,
                // unwinding included) waits until every dispatched job has
                // sent its result, and after that send a job touches none of
                // the borrows. Only the lifetime changes: the layout of the
                // box is the same.
                let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
                if jobs.send(job).is_err() {
                    // Not possible while the pool lives (it outlives `self`'s
                    // borrow); the job was not run.
                    return Err(ReadError::Stopped.into());
                }
                drain.outstanding += 1;
                sent += 1;
            }
            let Ok((gi, r)) = done_rx.recv() else {
                return Err(ReadError::Stopped.into());
            };
            drain.outstanding -= 1;
            match r {
                Ok(x) => {
                    waiting.insert(gi, x);
                }
                Err((offset, Failed::Io(source))) => return Err(ReadError::Read { offset, source }.into()),
                Err((_, Failed::Panic(p))) => std::panic::resume_unwind(p),
                Err((_, Failed::Cancelled)) => return Err(ReadError::Stopped.into()),
            }
            while let Some((buf, ts)) = waiting.remove(&next) {
                let (a, b) = groups[next];
                let mut at = 0usize;
                for (&(off, n), t) in pieces[a..b].iter().zip(ts) {
                    each(off, &buf.full()[at..at + n], t)?;
                    at += room(n);
                }
                let _ = pool_tx.try_send(buf);
                next += 1;
            }
        }
        drop(drain);
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Debug)]
    enum E {
        Read,
        Stop,
    }
    impl From<ReadError> for E {
        fn from(_: ReadError) -> E {
            E::Read
        }
    }

    /// A `mib` MiB image of known bytes in `dir`, and a reader over it.
    fn image(dir: &std::path::Path, mib: u32) -> (Vec<u8>, LocalReader) {
        let p = dir.join("img");
        let data: Vec<u8> = (0..(mib << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
        (data, LocalReader::new(Arc::new(Source::open(&p).unwrap())))
    }

    #[test]
    fn scattered_extents_come_back_in_order_and_whole() {
        let d = tempfile::tempdir().unwrap();
        let (data, r) = image(d.path(), 8);
        // Out of disk order on purpose, with a 3 MiB extent split in pieces.
        let exts: Vec<(u64, u64)> =
            (0..500u64).map(|i| (i * 7919 % 2000) * 4096).map(|o| (o, o + 4096)).chain([(1 << 20, 4 << 20)]).collect();
        let mut got = Vec::new();
        let n = r
            .read_extents(&exts, |off, b| -> Result<(), E> {
                assert_eq!(b, &data[off as usize..off as usize + b.len()], "piece at {off}");
                got.push(off);
                Ok(())
            })
            .unwrap();
        let want: Vec<u64> = pieces(&exts).iter().map(|&(o, _)| o).collect();
        assert_eq!(got, want, "pieces come back in the list's order");
        assert_eq!(n, 500 * 4096 + (3 << 20));
        // Work done where a piece is read comes back with that piece.
        let mut k = 0;
        r.read_extents_with(
            &exts,
            |b| (b.len(), ferry_common::xxh128(b)),
            |_, b, (len, sum)| -> Result<(), E> {
                assert_eq!((len, sum), (b.len(), ferry_common::xxh128(b)), "the work of piece {k}");
                k += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(k, want.len());
        // An error from the caller stops it without hanging.
        let mut k = 0;
        let res = r.read_extents(&exts, |_, _| {
            k += 1;
            if k == 10 {
                return Err(E::Stop);
            }
            Ok(())
        });
        assert!(matches!(res, Err(E::Stop)));
    }

    /// This thread's id in the kernel.
    fn tid() -> String {
        let l = std::fs::read_link("/proc/thread-self").unwrap();
        l.file_name().unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn reader_threads_are_started_once_and_end_with_the_reader() {
        let d = tempfile::tempdir().unwrap();
        let (data, r) = image(d.path(), 4);
        let exts: Vec<(u64, u64)> = (0..100u64).map(|i| (i * 13 % 1000) * 4096).map(|o| (o, o + 4096)).collect();
        let mut tids = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let n = r.read_extents_with(
                &exts,
                |_| tid(),
                |off, b, t| -> Result<(), E> {
                    assert_eq!(b, &data[off as usize..off as usize + b.len()]);
                    tids.insert(t);
                    Ok(())
                },
            );
            assert_eq!(n.unwrap(), 100 * 4096);
        }
        assert!(tids.len() <= IN_FLIGHT, "50 calls read on the same threads: {} of them", tids.len());
        assert!(!tids.contains(&tid()), "the work ran on the reader's threads");
        // A panic in the work on a reader thread reaches the caller, which
        // does not hang, and the reader still reads afterwards.
        let c = r.clone();
        let hit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = c.read_extents_with(&exts, |b| assert!(b.len() != 4096, "work panics"), |_, _, ()| -> Result<(), E> { Ok(()) });
        }));
        assert!(hit.is_err());
        let mut k = 0;
        c.read_extents(&exts, |_, _| -> Result<(), E> {
            k += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(k, 100);
        drop(r);
        assert!(tids.iter().all(|t| std::path::Path::new("/proc/self/task").join(t).exists()), "a clone keeps them");
        drop(c);
        let gone: Vec<_> = tids.iter().filter(|t| std::path::Path::new("/proc/self/task").join(t).exists()).collect();
        assert!(gone.is_empty(), "the threads end with the last clone of the reader: {gone:?} remain");
    }
}
