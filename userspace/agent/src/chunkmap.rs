//! The chunk map: the agent's record of the replica's content, so that a
//! checksum pass need not read the whole replica on the master target.
//!
//! `STATE/chunks.map`, written after a recovery point when the pass before
//! it left the replica equal to the source as read:
//!
//! ```text
//! HEADER = MAGIC:u64 || VERSION:u32 (1) || CHUNK:u32 (65536) || DISK_SIZE:u64
//!          || SEQ:u64 || GENERATION:[u8;16] || COUNT:u64 || RESERVED:u64 (0)
//! file   = HEADER (64 bytes) || SUM:[u8;16] * COUNT || XXH3_128(all before):16
//! ```
//!
//! SUM i is the xxh3-128 of the replica's chunk i (the last chunk may be
//! short) in the state the master target made durable at SEQ. The map is
//! trusted only when the master target reports exactly SEQ as durable for
//! the same generation and disk size: any frame applied since would have
//! moved the durable sequence, so the replica cannot have changed under it.
//! Anything else (a damaged file, another version) means "no map", and the
//! pass asks the master target for checksums as usual.

use std::path::Path;
use xxhash_rust::const_xxh3::xxh3_64 as const_xxh3_64;

/// xxh3-64("ferry chunk map v1"). Do not modify.
pub const MAGIC: u64 = const_xxh3_64(b"ferry chunk map v1");
pub const VERSION: u32 = 1;
const HEADER: usize = 64;

/// A loaded or to-be-saved chunk map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMap {
    pub chunk: u32,
    pub size: u64,
    pub seq: u64,
    pub generation: [u8; 16],
    pub sums: Vec<[u8; 16]>,
}

impl ChunkMap {
    fn pack(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.sums.len() * 16 + 16);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.chunk.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.generation);
        b.extend_from_slice(&(self.sums.len() as u64).to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        for s in &self.sums {
            b.extend_from_slice(s);
        }
        let sum = ferry_common::xxh128(&b);
        b.extend_from_slice(&sum);
        b
    }

    fn unpack(b: &[u8]) -> Option<ChunkMap> {
        if b.len() < HEADER + 16 {
            return None;
        }
        let (body, sum) = b.split_at(b.len() - 16);
        if ferry_common::xxh128(body) != sum {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8"));
        let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().expect("4"));
        if u64_at(0) != MAGIC || u32_at(8) != VERSION || u64_at(56) != 0 {
            return None;
        }
        let chunk = u32_at(12);
        let size = u64_at(16);
        let count = u64_at(48);
        if chunk == 0 || count != size.div_ceil(u64::from(chunk)) || body.len() != HEADER + count as usize * 16 {
            return None;
        }
        let sums = body[HEADER..].chunks_exact(16).map(|c| c.try_into().expect("16")).collect();
        Some(ChunkMap { chunk, size, seq: u64_at(24), generation: body[32..48].try_into().expect("16"), sums })
    }

    /// Load the map; `None` if absent or not valid.
    pub fn load(path: &Path) -> Option<ChunkMap> {
        let b = std::fs::read(path).ok()?;
        let m = ChunkMap::unpack(&b);
        if m.is_none() {
            log::warn!("{}: damaged or foreign chunk map ignored", path.display());
        }
        m
    }

    /// Save atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        ferry_common::durable::write_atomic(path, &self.pack())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        let m = ChunkMap { chunk: 65536, size: 65536 * 2 + 512, seq: 9, generation: [4; 16], sums: vec![[1; 16], [2; 16], [3; 16]] };
        m.save(&p).unwrap();
        assert_eq!(ChunkMap::load(&p), Some(m.clone()));
        let mut raw = std::fs::read(&p).unwrap();
        raw[70] ^= 1;
        std::fs::write(&p, &raw).unwrap();
        assert_eq!(ChunkMap::load(&p), None);
        let bad = ChunkMap { sums: vec![[1; 16]], ..m };
        std::fs::write(&p, bad.pack()).unwrap();
        assert_eq!(ChunkMap::load(&p), None, "count must match the disk size");
    }
}
