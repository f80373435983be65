//! Reading the protected disk: the [`BlockReader`] trait, and
//! [`LocalReader`], which reads a local device or image file with many
//! reads in flight.
//!
//! A tracker reports changes as extents all over the disk; one synchronous
//! read at a time leaves a device that serves hundreds of thousands of IOPS
//! at queue depth 32 waiting on each 4 KiB read in turn. [`LocalReader`]
//! splits the extents into pieces of at most 1 MiB and keeps up to
//! [`IN_FLIGHT`] of them being read by a pool of threads (`pread` on the
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

use crossbeam_channel::{bounded, unbounded};
use ferry_common::buf::AlignedBuf;
use ferry_common::source::Source;
use std::collections::BTreeMap;
use std::sync::Arc;

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

/// The local disk (a block device or an image file) read with `pread`,
/// `O_DIRECT` where the source allows, [`IN_FLIGHT`] reads at a time.
#[derive(Clone)]
pub struct LocalReader {
    src: Arc<Source>,
}

impl LocalReader {
    pub fn new(src: Arc<Source>) -> LocalReader {
        LocalReader { src }
    }
}

impl BlockReader for LocalReader {
    fn size(&self) -> u64 {
        self.src.size()
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
        let src = &*self.src;
        let pieces = pieces(exts);
        let total: u64 = pieces.iter().map(|&(_, n)| n as u64).sum();
        if pieces.len() <= 2 {
            let mut buf = AlignedBuf::new(PIECE as usize);
            for &(off, n) in &pieces {
                let data = src.read_into(&mut buf, off, n).map_err(|source| ReadError::Read { offset: off, source })?;
                each(off, data, work(data))?;
            }
            return Ok(total);
        }
        std::thread::scope(|s| -> Result<u64, E> {
            type Done<T> = (usize, u64, usize, std::io::Result<(AlignedBuf, T)>);
            let (work_tx, work_rx) = bounded::<(usize, u64, usize)>(IN_FLIGHT);
            let (done_tx, done_rx) = unbounded::<Done<T>>();
            // Read-ahead tokens: a piece is dispatched only with one, and
            // its token comes back once the caller has taken it.
            let (token_tx, token_rx) = bounded::<()>(2 * IN_FLIGHT);
            for _ in 0..2 * IN_FLIGHT {
                token_tx.send(()).expect("the channel has room");
            }
            let pieces = &pieces;
            s.spawn(move || {
                for (i, &(off, n)) in pieces.iter().enumerate() {
                    if token_rx.recv().is_err() || work_tx.send((i, off, n)).is_err() {
                        return; // the caller stopped
                    }
                }
            });
            let work = &work;
            // Buffers handed back by the caller are read into again: a
            // whole-disk pass does not fault in a fresh gigabyte.
            let (pool_tx, pool_rx) = bounded::<AlignedBuf>(3 * IN_FLIGHT);
            for _ in 0..IN_FLIGHT.min(pieces.len()) {
                let (work_rx, done_tx, pool_rx) = (work_rx.clone(), done_tx.clone(), pool_rx.clone());
                s.spawn(move || {
                    for (i, off, n) in work_rx {
                        let need = n.div_ceil(4096) * 4096;
                        let mut buf = match pool_rx.try_recv() {
                            Ok(b) if b.capacity() >= need => b,
                            _ => AlignedBuf::new(need),
                        };
                        let r = src.read_into(&mut buf, off, n).map(work);
                        if done_tx.send((i, off, n, r.map(|t| (buf, t)))).is_err() {
                            return;
                        }
                    }
                });
            }
            drop((work_rx, done_tx));
            let mut next = 0usize;
            let mut waiting: BTreeMap<usize, (u64, usize, AlignedBuf, T)> = BTreeMap::new();
            let r = (|| {
                while next < pieces.len() {
                    let Ok((i, off, n, r)) = done_rx.recv() else {
                        return Err(ReadError::Stopped.into());
                    };
                    let (buf, t) = r.map_err(|source| ReadError::Read { offset: off, source })?;
                    waiting.insert(i, (off, n, buf, t));
                    while let Some((off, n, buf, t)) = waiting.remove(&next) {
                        each(off, &buf[..n], t)?;
                        let _ = pool_tx.try_send(buf);
                        next += 1;
                        let _ = token_tx.send(());
                    }
                }
                Ok(total)
            })();
            // On an error the feeder and the readers end on their own: the
            // tokens and the results have no one left to take them.
            drop(token_tx);
            drop(done_rx);
            r
        })
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

    #[test]
    fn scattered_extents_come_back_in_order_and_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
        let r = LocalReader::new(Arc::new(Source::open(&p).unwrap()));
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
}
