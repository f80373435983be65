//! Byte ranges: a set of them (what a view or a batch has seen), and
//! ranges of a file that read as zero (holes).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Non-overlapping byte ranges `[start, end)`, keyed by start.
#[derive(Default, Debug, Clone)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The parts of `[a, b)` the set holds, in order.
    pub fn covered(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        // A range starting before `a` may reach into it.
        if let Some((_, &e)) = self.map.range(..a).next_back() {
            if e > a {
                out.push((a, e.min(b)));
            }
        }
        for (&s, &e) in self.map.range(a..b) {
            out.push((s, e.min(b)));
        }
        out
    }

    /// The parts of `[a, b)` the set does not hold, in order.
    pub fn uncovered(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = a;
        for (s, e) in self.covered(a, b) {
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < b {
            out.push((at, b));
        }
        out
    }

    /// Add `[a, b)`, merging with neighbours.
    pub fn insert(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut a, mut b) = (a, b);
        if let Some((&s, &e)) = self.map.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
            }
        }
        let inside: Vec<u64> = self.map.range(a..=b).map(|(&s, _)| s).collect();
        for s in inside {
            let e = self.map.remove(&s).expect("key just listed");
            b = b.max(e);
        }
        self.map.insert(a, b);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }
}

/// Whether `[a, b)` of `f` lies entirely in a hole (so reads as zero without
/// being read). Errors answer "no": the caller then reads the range.
pub fn is_hole(f: &File, a: u64, b: u64) -> bool {
    // SAFETY: lseek on an fd we own; no memory is passed.
    let d = unsafe { libc::lseek(f.as_raw_fd(), a as libc::off_t, libc::SEEK_DATA) };
    if d < 0 {
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    d as u64 >= b
}

/// Make `[offset, offset+len)` read as zero, as a hole where possible.
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(f.as_raw_fd(), flags, offset as i64, len as i64).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(4 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// RangeSet against a byte map: covered and uncovered partition any
        /// query, and inserts merge.
        #[test]
        fn range_set_matches_a_byte_map(ops in proptest::collection::vec((0u64..200, 0u64..40), 1..40), q in (0u64..200, 0u64..60)) {
            let mut set = RangeSet::default();
            let mut bytes = vec![false; 260];
            for (a, l) in ops {
                set.insert(a, a + l);
                for b in &mut bytes[a as usize..(a + l) as usize] {
                    *b = true;
                }
            }
            let (a, b) = (q.0, q.0 + q.1);
            let mut got = vec![None; 260];
            for (s, e) in set.covered(a, b) {
                for x in s..e { prop_assert!(got[x as usize].is_none()); got[x as usize] = Some(true); }
            }
            for (s, e) in set.uncovered(a, b) {
                for x in s..e { prop_assert!(got[x as usize].is_none()); got[x as usize] = Some(false); }
            }
            for x in a..b {
                prop_assert_eq!(got[x as usize], Some(bytes[x as usize]), "byte {}", x);
            }
            prop_assert_eq!(set.bytes(), bytes.iter().filter(|&&b| b).count() as u64);
            let mut prev = None;
            for (&s, &e) in &set.map {
                prop_assert!(s < e);
                if let Some(p) = prev { prop_assert!(s > p, "ranges touch or overlap: not merged"); }
                prev = Some(e);
            }
        }
    }
}
