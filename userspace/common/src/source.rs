//! A protected disk as a readable source: a block device or an image file.
//!
//! Reads go through `O_DIRECT` when the source accepts it (block devices,
//! most filesystems), so an initial sync of a large disk does not evict the
//! machine's page cache; tmpfs and others refuse it, and then buffered reads
//! are used. Either way reads are positioned (`pread`), so several threads can
//! share one source.

use crate::buf::{AlignedBuf, ALIGN};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// An open source disk.
pub struct Source {
    file: File,
    size: u64,
    direct: bool,
    is_block_device: bool,
}

/// `BLKGETSIZE64` from <linux/fs.h>: _IOR(0x12, 114, size_t).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of an open file or block device.
pub fn size_of(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live, properly aligned u64.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

impl Source {
    /// Open `path` read-only, trying `O_DIRECT` first.
    pub fn open(path: &Path) -> io::Result<Source> {
        let is_block_device = std::fs::metadata(path)?.file_type().is_block_device();
        let (file, direct) = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => {
                // Some filesystems accept the flag at open and fail the read.
                let mut probe = AlignedBuf::new(ALIGN);
                match f.read_at(&mut probe, 0) {
                    Ok(_) => (f, true),
                    Err(_) => (OpenOptions::new().read(true).open(path)?, false),
                }
            }
            Err(_) => (OpenOptions::new().read(true).open(path)?, false),
        };
        let size = size_of(&file)?;
        Ok(Source { file, size, direct, is_block_device })
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The size as it is now (an image file may grow, a device be resized).
    pub fn current_size(&self) -> io::Result<u64> {
        size_of(&self.file)
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the source is a block device (rather than an image file).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The underlying file, for metadata checks.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read `len` bytes at `offset` into `buf` (which must hold at least
    /// `len` rounded up to [`ALIGN`]). `offset` must be a multiple of 512.
    /// Bytes past the end of the disk read as zero. Returns the filled slice.
    pub fn read_into<'a>(&self, buf: &'a mut AlignedBuf, offset: u64, len: usize) -> io::Result<&'a [u8]> {
        assert!(len <= buf.capacity(), "read of {len} bytes into a {} byte buffer", buf.capacity());
        self.read_into_slice(buf.full_mut(), offset, len)
    }

    /// [`Source::read_into`] into part of an [`AlignedBuf`]'s allocation:
    /// `full` must start at a multiple of [`ALIGN`] from the buffer's start
    /// and hold `len` rounded up to [`ALIGN`].
    pub fn read_into_slice<'a>(&self, full: &'a mut [u8], offset: u64, len: usize) -> io::Result<&'a [u8]> {
        let want = if self.direct { len.div_ceil(ALIGN) * ALIGN } else { len };
        assert!(
            want <= full.len() && (full.as_ptr() as usize).is_multiple_of(ALIGN),
            "read of {len} bytes into a misaligned or short buffer"
        );
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            if pos >= self.size {
                break;
            }
            match self.file.read_at(&mut full[done..want], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        full[done.min(want)..want].fill(0);
        Ok(&full[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_file_with_tail_zeroed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let mut f = File::create(&p).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        drop(f);
        let s = Source::open(&p).unwrap();
        assert_eq!(s.size(), 10_000);
        let mut b = AlignedBuf::new(8192);
        assert_eq!(s.read_into(&mut b, 4096, 4096).unwrap(), &data[4096..8192]);
        let tail = s.read_into(&mut b, 8192, 4096).unwrap().to_vec();
        assert_eq!(&tail[..1808], &data[8192..]);
        assert!(tail[1808..].iter().all(|&x| x == 0));
    }
}
