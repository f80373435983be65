//! The shared-memory SPSC record ring (layout in the uapi header).

use crate::generated::{ferry_cbt_record, ferry_cbt_ring_header, FERRY_CBT_ABI_VERSION, FERRY_CBT_RING_MAGIC, FERRY_RINGF_OVERFLOW};
use crate::Record;
use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const HEADER: usize = size_of::<ferry_cbt_ring_header>();
const REC: usize = size_of::<ferry_cbt_record>();
/// Largest ring accepted: 2^24 records (512 MiB of slots).
pub const MAX_CAPACITY: u64 = 1 << 24;

/// Errors opening or reading a ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("ring {path}: {why}; remove it and restart the agent to recreate it")]
    BadHeader { path: String, why: String },
    #[error("ring indices are inconsistent (producer {producer}, consumer {consumer}, capacity {capacity}): resync required")]
    Corrupt { producer: u64, consumer: u64, capacity: u64 },
}

/// Index arithmetic of a ring with a power-of-two capacity and free-running
/// `u64` indices. Kept apart from the memory so it can be model-tested.
#[derive(Clone, Copy, Debug)]
pub struct IndexMath {
    cap: u64,
}

impl IndexMath {
    /// `None` unless `cap` is a power of two in `1..=MAX_CAPACITY`.
    pub fn new(cap: u64) -> Option<IndexMath> {
        (cap.is_power_of_two() && cap <= MAX_CAPACITY).then_some(IndexMath { cap })
    }
    pub fn capacity(self) -> u64 {
        self.cap
    }
    /// Slot that index `idx` lives in.
    pub fn slot(self, idx: u64) -> usize {
        (idx & (self.cap - 1)) as usize
    }
    /// Records queued, or `None` when the indices cannot both be right.
    pub fn used(self, producer: u64, consumer: u64) -> Option<u64> {
        let n = producer.wrapping_sub(consumer);
        (n <= self.cap).then_some(n)
    }
    /// Whether one more record fits.
    pub fn has_room(self, producer: u64, consumer: u64) -> bool {
        self.used(producer, consumer).is_some_and(|n| n < self.cap)
    }
    /// Whether `idx` lies in the readable window `[consumer, producer]`.
    pub fn in_window(self, idx: u64, producer: u64, consumer: u64) -> bool {
        match (self.used(producer, consumer), self.used(idx, consumer)) {
            (Some(total), Some(before)) => before <= total,
            _ => false,
        }
    }
}

/// A ring mapped into this process. One process produces, one consumes;
/// within a process `push` must not be called from two threads at once, nor
/// `release` (the ring does not check; the owner of each index is one thread).
pub struct Ring {
    map: MmapMut,
    math: IndexMath,
    path: String,
}

impl Ring {
    /// Create (or truncate) a ring file with `capacity` slots.
    pub fn create(path: &Path, capacity: u64) -> Result<Ring, RingError> {
        let p = path.display().to_string();
        let math = IndexMath::new(capacity).ok_or_else(|| RingError::BadHeader {
            path: p.clone(),
            why: format!("capacity {capacity} is not a power of two up to {MAX_CAPACITY}"),
        })?;
        let io = |source| RingError::Io { path: p.clone(), source };
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(io)?;
        f.set_len((HEADER + capacity as usize * REC) as u64).map_err(io)?;
        // SAFETY: the file was just sized to hold the header and all slots;
        // every access goes through the atomics or volatile slot copies below,
        // so concurrent modification by the peer process is well-defined.
        let map = unsafe { MmapMut::map_mut(&f) }.map_err(io)?;
        let ring = Ring { map, math, path: p };
        ring.init(0);
        ring.map.flush().map_err(|source| RingError::Io { path: ring.path.clone(), source })?;
        Ok(ring)
    }

    /// A ring in anonymous memory whose indices start at `start` (tests and
    /// the model check use a start near `u64::MAX` to cross the wrap).
    pub fn anonymous(capacity: u64, start: u64) -> Ring {
        let math = IndexMath::new(capacity).expect("capacity must be a power of two");
        let map = MmapMut::map_anon(HEADER + capacity as usize * REC).expect("anonymous mapping");
        let ring = Ring { map, math, path: "(anonymous)".into() };
        ring.init(start);
        ring
    }

    /// Open an existing ring file and check its header.
    pub fn open(path: &Path) -> Result<Ring, RingError> {
        let p = path.display().to_string();
        let io = |source| RingError::Io { path: p.clone(), source };
        let f = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let bad = |why: String| RingError::BadHeader { path: p.clone(), why };
        if len < HEADER as u64 {
            return Err(bad(format!("file is {len} bytes, shorter than the header")));
        }
        // SAFETY: as in `create`; the length was checked to cover the header
        // and is checked below to cover every slot before any slot access.
        let map = unsafe { MmapMut::map_mut(&f) }.map_err(io)?;
        Ring::checked(map, p)
    }

    /// Map the ring of the kernel module's attachment: `len` bytes at
    /// `offset` of the control device `dev` (ATTACH's mmap_offset and
    /// mmap_size), data area included.
    pub fn map_device(dev: &std::fs::File, offset: u64, len: usize, what: &str) -> Result<Ring, RingError> {
        let p = what.to_string();
        if len < HEADER {
            return Err(RingError::BadHeader { path: p, why: format!("mapping of {len} bytes is shorter than the header") });
        }
        // SAFETY: MAP_SHARED of the module's vmalloc'ed ring, which stays
        // allocated while mapped; every access goes through the atomics,
        // volatile slot copies or the data-area copies below, so concurrent
        // writes by the module are well-defined; the header is checked to
        // fit the mapping before any slot or data access.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map_mut(dev) }
            .map_err(|source| RingError::Io { path: p.clone(), source })?;
        Ring::checked(map, p)
    }

    fn checked(map: MmapMut, p: String) -> Result<Ring, RingError> {
        let bad = |why: String| RingError::BadHeader { path: p.clone(), why };
        let len = map.len() as u64;
        let word = |off: usize| u32::from_le_bytes(map[off..off + 4].try_into().expect("4 bytes"));
        let dword = |off: usize| u64::from_le_bytes(map[off..off + 8].try_into().expect("8 bytes"));
        let (size, magic, abi, rsize) = (word(0), word(4), word(8), word(12));
        if magic != FERRY_CBT_RING_MAGIC {
            return Err(bad(format!("bad magic {magic:#x}")));
        }
        if size as usize != HEADER || abi != FERRY_CBT_ABI_VERSION || rsize as usize != REC {
            return Err(bad(format!("ABI mismatch: header {size} bytes, abi v{abi}, record {rsize} bytes")));
        }
        let cap = dword(16);
        let math = IndexMath::new(cap).ok_or_else(|| bad(format!("capacity {cap} is invalid")))?;
        if len < (HEADER as u64) + cap * REC as u64 {
            return Err(bad(format!("file is {len} bytes, too short for {cap} slots")));
        }
        let (dcap, doff) = (dword(offset_of!(ferry_cbt_ring_header, data_capacity)), dword(offset_of!(ferry_cbt_ring_header, data_offset)));
        if dcap != 0
            && (!dcap.is_power_of_two() || doff < (HEADER as u64) + cap * REC as u64 || doff.checked_add(dcap).is_none_or(|end| end > len))
        {
            return Err(bad(format!("data area of {dcap} bytes at {doff} does not fit a {len}-byte mapping")));
        }
        Ok(Ring { map, math, path: p })
    }

    fn init(&self, start: u64) {
        let h = self.map.as_ptr() as *mut ferry_cbt_ring_header;
        let head = ferry_cbt_ring_header {
            size: HEADER as u32,
            magic: FERRY_CBT_RING_MAGIC,
            abi_version: FERRY_CBT_ABI_VERSION,
            record_size: REC as u32,
            capacity: self.math.capacity(),
            flags: 0,
            overflows: 0,
            data_capacity: 0,
            data_offset: 0,
            mode: 0,
            _pad0: 0,
            producer: start,
            data_producer: 0,
            _pad1: [0; 48],
            consumer: start,
            data_consumer: 0,
            _pad2: [0; 3952],
        };
        // SAFETY: the mapping is at least HEADER bytes and page-aligned, and
        // no peer has the ring yet (it is being created).
        unsafe { std::ptr::write_volatile(h, head) };
    }

    fn atomic(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the header's u64 field offsets (8-aligned in
        // a page-aligned mapping), the mapping lives as long as &self, and the
        // field is only ever accessed atomically by both processes.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }
    fn producer_idx(&self) -> &AtomicU64 {
        self.atomic(offset_of!(ferry_cbt_ring_header, producer))
    }
    fn consumer_idx(&self) -> &AtomicU64 {
        self.atomic(offset_of!(ferry_cbt_ring_header, consumer))
    }
    fn overflow_ctr(&self) -> &AtomicU64 {
        self.atomic(offset_of!(ferry_cbt_ring_header, overflows))
    }
    fn flags_word(&self) -> &AtomicU64 {
        self.atomic(offset_of!(ferry_cbt_ring_header, flags))
    }
    fn slot_ptr(&self, idx: u64) -> *mut ferry_cbt_record {
        let off = HEADER + self.math.slot(idx) * REC;
        // SAFETY: slot() < capacity and the mapping holds capacity slots
        // (checked at open / sized at create); slots are 32-byte aligned.
        unsafe { self.map.as_ptr().add(off) as *mut ferry_cbt_record }
    }

    pub fn capacity(&self) -> u64 {
        self.math.capacity()
    }

    fn header_u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.map[off..off + 8].try_into().expect("8 bytes"))
    }
    /// Bytes in the data area (0: none). Fixed at creation.
    pub fn data_capacity(&self) -> u64 {
        self.header_u64(offset_of!(ferry_cbt_ring_header, data_capacity))
    }
    /// The tracking mode the producer is in (`FERRY_CBT_MODE_*`; 0 for a
    /// ring without modes).
    pub fn mode(&self) -> u32 {
        // SAFETY: 4-aligned u32 inside the header page, written atomically
        // by the producer.
        let a = unsafe { &*(self.map.as_ptr().add(offset_of!(ferry_cbt_ring_header, mode)) as *const std::sync::atomic::AtomicU32) };
        a.load(Ordering::Acquire)
    }
    /// Data-area bytes released by the consumer (Acquire).
    pub fn data_consumer(&self) -> u64 {
        self.atomic(offset_of!(ferry_cbt_ring_header, data_consumer)).load(Ordering::Acquire)
    }
    /// Data-area bytes produced (Acquire).
    pub fn data_producer(&self) -> u64 {
        self.atomic(offset_of!(ferry_cbt_ring_header, data_producer)).load(Ordering::Acquire)
    }

    /// The data cursor after a payload of `len` bytes placed from `cursor`
    /// by the rule in the uapi header (without reading it).
    pub fn skip_payload(&self, cursor: u64, len: u32) -> u64 {
        let dcap = self.data_capacity();
        if dcap == 0 {
            return cursor;
        }
        let mut p = cursor;
        if (p & (dcap - 1)) + u64::from(len) > dcap {
            p = (p | (dcap - 1)).wrapping_add(1);
        }
        p.wrapping_add(u64::from(len))
    }

    /// Consumer side: copy the payload of the next FERRY_RECF_DATA record of
    /// `len` bytes, the data cursor being `*cursor` (the placement rule in
    /// the uapi header); advances the cursor. None if the payload is not in
    /// the produced part of the data area (a corrupt ring).
    pub fn take_payload(&self, cursor: &mut u64, len: u32) -> Option<Vec<u8>> {
        let dcap = self.data_capacity();
        if dcap == 0 || u64::from(len) > dcap {
            return None;
        }
        let mut p = *cursor;
        if (p & (dcap - 1)) + u64::from(len) > dcap {
            p = (p | (dcap - 1)).wrapping_add(1);
        }
        let (prod, cons) = (self.data_producer(), self.data_consumer());
        let end = p.wrapping_add(u64::from(len));
        if end.wrapping_sub(cons) > prod.wrapping_sub(cons) || p.wrapping_sub(cons) > dcap {
            return None;
        }
        let doff = self.header_u64(offset_of!(ferry_cbt_ring_header, data_offset)) as usize;
        let at = doff + (p & (dcap - 1)) as usize;
        let mut out = vec![0u8; len as usize];
        // SAFETY: [at, at+len) lies inside the data area (checked at map
        // time to fit the mapping; the payload never wraps), published by
        // the producer's Release store of data_producer that we loaded with
        // Acquire, and not reused by the producer before we release it.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(at), out.as_mut_ptr(), len as usize) };
        *cursor = end;
        Some(out)
    }

    /// Consumer side: free the data area before byte index `upto`.
    pub fn release_data(&self, upto: u64) {
        self.atomic(offset_of!(ferry_cbt_ring_header, data_consumer)).store(upto, Ordering::Release);
    }
    /// Producer index (Acquire).
    pub fn producer(&self) -> u64 {
        self.producer_idx().load(Ordering::Acquire)
    }
    /// Consumer index (Acquire).
    pub fn consumer(&self) -> u64 {
        self.consumer_idx().load(Ordering::Acquire)
    }
    /// Records the producer could not queue, since the ring was created.
    pub fn overflows(&self) -> u64 {
        self.overflow_ctr().load(Ordering::Acquire)
    }
    /// Whether the producer has flagged a lost record.
    pub fn overflowed(&self) -> bool {
        self.flags_word().load(Ordering::Acquire) & u64::from(FERRY_RINGF_OVERFLOW) != 0
    }

    /// Producer side: queue `rec`. When the ring is full the record is not
    /// queued, the overflow counter and flag are raised, and `false` returned;
    /// the consumer must then treat the disk as needing a resync.
    pub fn push(&self, rec: Record) -> bool {
        let prod = self.producer_idx().load(Ordering::Relaxed); // we own it
        let cons = self.consumer_idx().load(Ordering::Acquire);
        if !self.math.has_room(prod, cons) {
            self.flags_word().fetch_or(u64::from(FERRY_RINGF_OVERFLOW), Ordering::Release);
            self.overflow_ctr().fetch_add(1, Ordering::Release);
            return false;
        }
        // SAFETY: the slot is outside [consumer, producer), so the consumer
        // does not read it until the Release store below publishes it.
        unsafe { std::ptr::write_volatile(self.slot_ptr(prod), rec.into()) };
        self.producer_idx().store(prod.wrapping_add(1), Ordering::Release);
        true
    }

    /// Producer side: queue `rec` if one more record fits, else leave the
    /// ring (and its overflow counter) untouched and return `false`: for a
    /// producer that keeps what does not fit somewhere else (the bpf
    /// tracker's dirty bitmap), so a full ring is backlog, not loss.
    pub fn try_push(&self, rec: Record) -> bool {
        let prod = self.producer_idx().load(Ordering::Relaxed); // we own it
        let cons = self.consumer_idx().load(Ordering::Acquire);
        if !self.math.has_room(prod, cons) {
            return false;
        }
        // SAFETY: as in `push`: the slot is outside [consumer, producer) and
        // is published only by the Release store below.
        unsafe { std::ptr::write_volatile(self.slot_ptr(prod), rec.into()) };
        self.producer_idx().store(prod.wrapping_add(1), Ordering::Release);
        true
    }

    /// Records queued and not yet released (producer - consumer).
    pub fn pending(&self) -> u64 {
        self.producer().wrapping_sub(self.consumer())
    }

    /// Consumer side: read up to `max` records starting at index `from`
    /// (which must lie in `[consumer, producer]`), without releasing them.
    /// Returns the records (each validated) and the index after the last.
    pub fn read_from(&self, from: u64, max: usize) -> Result<(Vec<Result<Record, crate::BadRecord>>, u64), RingError> {
        let prod = self.producer();
        let cons = self.consumer();
        if self.math.used(prod, cons).is_none() || !self.math.in_window(from, prod, cons) {
            return Err(RingError::Corrupt { producer: prod, consumer: cons, capacity: self.capacity() });
        }
        let n = prod.wrapping_sub(from).min(max as u64);
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let idx = from.wrapping_add(i);
            // SAFETY: idx is in [consumer, producer), published by the
            // producer's Release store that our Acquire load observed, and the
            // producer will not reuse the slot before we release it.
            let raw = unsafe { std::ptr::read_volatile(self.slot_ptr(idx)) };
            out.push(Record::try_from(raw));
        }
        Ok((out, from.wrapping_add(n)))
    }

    /// Whether `idx` lies in `[consumer, producer]` now.
    pub fn in_window(&self, idx: u64) -> bool {
        self.math.in_window(idx, self.producer(), self.consumer())
    }

    /// Consumer side: free every slot before index `upto`.
    pub fn release(&self, upto: u64) -> Result<(), RingError> {
        let prod = self.producer();
        let cons = self.consumer();
        if !self.math.in_window(upto, prod, cons) {
            return Err(RingError::Corrupt { producer: prod, consumer: cons, capacity: self.capacity() });
        }
        self.consumer_idx().store(upto, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RecordKind;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn rec(seq: u64) -> Record {
        Record { seq, offset: seq * 512, length: 512, kind: RecordKind::Write, flush: false, data: false, group: false, time_ns: seq }
    }

    /// A producer of the kernel module's data area, written from the uapi
    /// rule (not from `take_payload`): payloads in order, never wrapping.
    struct DataProducer {
        ring: Ring,
        dprod: u64,
        seq: u64,
    }

    impl DataProducer {
        fn new(capacity: u64, data: u64) -> DataProducer {
            let slots = HEADER + capacity as usize * REC;
            let mut map = MmapMut::map_anon(slots + data as usize).expect("anonymous mapping");
            map[0..4].copy_from_slice(&(HEADER as u32).to_le_bytes());
            map[4..8].copy_from_slice(&FERRY_CBT_RING_MAGIC.to_le_bytes());
            map[8..12].copy_from_slice(&FERRY_CBT_ABI_VERSION.to_le_bytes());
            map[12..16].copy_from_slice(&(REC as u32).to_le_bytes());
            map[16..24].copy_from_slice(&capacity.to_le_bytes());
            map[40..48].copy_from_slice(&data.to_le_bytes());
            map[48..56].copy_from_slice(&(slots as u64).to_le_bytes());
            DataProducer { ring: Ring::checked(map, "test".into()).expect("valid header"), dprod: 0, seq: 0 }
        }

        /// Queue a write of `len` bytes of `byte`; false if it does not fit.
        fn write(&mut self, len: u32, byte: u8) -> bool {
            let dcap = self.ring.data_capacity();
            let cons = self.ring.data_consumer();
            let mut p = self.dprod;
            if p % dcap + u64::from(len) > dcap {
                p = (p / dcap + 1) * dcap;
            }
            if p + u64::from(len) - cons > dcap || !self.ring.math.has_room(self.ring.producer(), self.ring.consumer()) {
                return false;
            }
            let at = self.ring.header_u64(48) as usize + (p % dcap) as usize;
            // SAFETY: inside the data area (checked above), not yet published.
            unsafe { std::ptr::write_bytes(self.ring.map.as_ptr().add(at) as *mut u8, byte, len as usize) };
            self.dprod = p + u64::from(len);
            self.ring.atomic(offset_of!(ferry_cbt_ring_header, data_producer)).store(self.dprod, Ordering::Release);
            self.seq += 1;
            let r = Record {
                seq: self.seq,
                offset: 0,
                length: len,
                kind: RecordKind::Write,
                flush: false,
                data: true,
                group: false,
                time_ns: 1,
            };
            assert!(self.ring.push(r));
            true
        }
    }

    #[test]
    fn payloads_follow_the_placement_rule_across_wraps() {
        let mut p = DataProducer::new(64, 1 << 16);
        let ring = &p.ring as *const Ring;
        let (mut cursor, mut dcur, mut n) = (0u64, 0u64, 0u32);
        let mut want_bytes: VecDeque<(u32, u8)> = VecDeque::new();
        // Lengths that do not divide the area: payloads must jump to the
        // next lap instead of wrapping.
        for round in 0..200u32 {
            let len = 512 * (1 + (round * 7) % 40);
            let byte = (round % 251) as u8;
            if p.write(len, byte) {
                want_bytes.push_back((len, byte));
            } else {
                // Consume everything, checking each payload, then retry.
                // SAFETY: the same ring, read through a second reference as
                // the consumer process would.
                let ring = unsafe { &*ring };
                let (recs, next) = ring.read_from(cursor, 64).unwrap();
                let mut skip = dcur;
                for r in recs.into_iter().map(Result::unwrap) {
                    let want = ring.skip_payload(skip, r.length);
                    let data = ring.take_payload(&mut dcur, r.length).expect("payload in the produced area");
                    assert_eq!(dcur, want, "skip_payload and take_payload agree");
                    skip = want;
                    let (wl, wb) = want_bytes.pop_front().expect("a write for each record");
                    assert_eq!(data.len(), wl as usize);
                    assert!(data.iter().all(|&b| b == wb), "the payload of write {n}");
                    n += 1;
                }
                ring.release(next).unwrap();
                ring.release_data(dcur);
                cursor = next;
                assert!(p.write(len, byte), "room after release");
                want_bytes.push_back((len, byte));
            }
        }
        assert!(n > 100, "{n} payloads checked");
        assert!(dcur > 4 << 16, "the data area wrapped several times");
        // A payload beyond what was produced is refused.
        let mut c = p.ring.data_producer();
        assert!(p.ring.take_payload(&mut c, 512).is_none());
    }

    #[test]
    fn file_ring_shared_between_two_mappings() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ring");
        let prod = Ring::create(&p, 8).unwrap();
        let cons = Ring::open(&p).unwrap();
        for s in 0..8 {
            assert!(prod.push(rec(s)));
        }
        assert!(!prod.push(rec(8)), "ninth record must not fit");
        assert_eq!(cons.overflows(), 1);
        assert!(cons.overflowed());
        let (got, next) = cons.read_from(cons.consumer(), 100).unwrap();
        assert_eq!(got.len(), 8);
        assert_eq!(got[3], Ok(rec(3)));
        cons.release(next).unwrap();
        assert!(prod.push(rec(9)));
    }

    #[test]
    fn try_push_on_a_full_ring_counts_no_overflow() {
        let ring = Ring::anonymous(4, 0);
        for s in 0..4 {
            assert!(ring.try_push(rec(s)));
        }
        assert!(!ring.try_push(rec(4)), "a fifth record does not fit");
        assert_eq!(ring.overflows(), 0, "a refused try_push is not a loss");
        assert!(!ring.overflowed());
        assert_eq!(ring.pending(), 4);
        let (got, next) = ring.read_from(ring.consumer(), 2).unwrap();
        assert_eq!(got, vec![Ok(rec(0)), Ok(rec(1))]);
        ring.release(next).unwrap();
        assert!(ring.try_push(rec(4)));
        assert_eq!(ring.pending(), 3);
    }

    #[test]
    fn open_rejects_garbage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ring");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert!(matches!(Ring::open(&p), Err(RingError::BadHeader { .. })));
        std::fs::write(&p, b"short").unwrap();
        assert!(matches!(Ring::open(&p), Err(RingError::BadHeader { .. })));
    }

    #[test]
    fn release_outside_window_is_refused() {
        let r = Ring::anonymous(4, 10);
        assert!(r.push(rec(1)));
        assert!(r.release(12).is_err());
        assert!(r.release(9).is_err());
        r.release(11).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        Read(usize),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![Just(Op::Push), (0usize..10).prop_map(Op::Read), (0usize..10).prop_map(Op::Release)]
    }

    proptest! {
        /// Model check of the index arithmetic: against a VecDeque with the
        /// same capacity, across the u64 wrap of the free-running indices.
        #[test]
        fn ring_matches_a_bounded_queue(
            cap_log in 0u32..5,
            start in prop_oneof![Just(0u64), Just(u64::MAX - 3), any::<u64>()],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let cap = 1u64 << cap_log;
            let ring = Ring::anonymous(cap, start);
            // Model: queued-but-unreleased records, and how many of them the
            // consumer has read ahead.
            let mut model: VecDeque<Record> = VecDeque::new();
            let mut read_ahead = 0usize;
            let mut cursor = start;
            let mut next_seq = 0u64;
            let mut lost = 0u64;
            for op in ops {
                match op {
                    Op::Push => {
                        let fits = (model.len() as u64) < cap;
                        prop_assert_eq!(ring.push(rec(next_seq)), fits);
                        if fits { model.push_back(rec(next_seq)); } else { lost += 1; }
                        next_seq += 1;
                    }
                    Op::Read(n) => {
                        let (got, next) = ring.read_from(cursor, n).unwrap();
                        let expect: Vec<_> = model.iter().skip(read_ahead).take(n).copied().map(Ok).collect();
                        prop_assert_eq!(&got, &expect);
                        read_ahead += got.len();
                        cursor = next;
                    }
                    Op::Release(n) => {
                        let n = n.min(read_ahead);
                        let upto = ring.consumer().wrapping_add(n as u64);
                        ring.release(upto).unwrap();
                        model.drain(..n);
                        read_ahead -= n;
                    }
                }
                prop_assert_eq!(ring.producer().wrapping_sub(ring.consumer()), model.len() as u64);
                prop_assert_eq!(ring.overflows(), lost);
            }
        }
    }
}
