//! Page-aligned, zero-initialised byte buffers, as `O_DIRECT` requires.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: one page, enough for any block device.
pub const ALIGN: usize = 4096;

/// A heap buffer whose start is aligned to [`ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a multiple of [`ALIGN`]
    /// for the allocation; `len` is what the slice shows).
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows a Layout");
        // SAFETY: layout has non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(&self) -> Layout {
        let cap = self.len.max(1).div_ceil(ALIGN) * ALIGN;
        Layout::from_size_align(cap, ALIGN).expect("layout was valid at allocation")
    }

    /// Length of the full allocation, a multiple of [`ALIGN`].
    pub fn capacity(&self) -> usize {
        self.layout().size()
    }

    /// The whole allocation, including the tail past `len`.
    pub fn full(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity() bytes, zero-initialised at
        // allocation; shared access only.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity()) }
    }

    /// The whole allocation, including the tail past `len`.
    pub fn full_mut(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        // SAFETY: ptr is valid for cap bytes, zero-initialised at allocation,
        // and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), cap) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialised for at least len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated by alloc_zeroed with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 10_000);
        assert_eq!(b.capacity(), 12_288);
        assert!(b.iter().all(|&x| x == 0));
        b[9_999] = 7;
        assert_eq!(b.full_mut()[9_999], 7);
    }
}
