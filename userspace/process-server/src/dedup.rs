//! Content the master target already holds, by BLAKE3: a forwarder about
//! to send a DATA frame whose content is already at the master target (in
//! any disk, from any machine) sends a reference instead (REF for the same
//! disk, XREF for another). The master target verifies every reference
//! against its own copy; a miss costs a reconnect and the frame goes again
//! as DATA, so the index may be stale but never makes a replica wrong.
//!
//! An entry is *pending* from the moment its DATA frame is sent until the
//! master target acknowledges it, then *held*. A frame whose twin is
//! pending for another disk waits briefly for it (two machines syncing the
//! same image at once), rather than sending the bytes twice. Writing a
//! range forgets what the index said was there. Bounded: past `max`
//! entries the oldest are forgotten. One index per upstream address.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Frames smaller than this are sent as they are.
pub const MIN_DEDUP: u32 = 4096;
/// How long a frame waits for its twin's acknowledgement.
pub const PENDING_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub disk: String,
    pub offset: u64,
    pub len: u32,
}

#[derive(Clone, Debug)]
struct Entry {
    loc: Loc,
    /// `Some(seq)`: sent in that disk's stream, not yet acknowledged.
    pending: Option<u64>,
}

#[derive(Default)]
struct Idx {
    by_digest: HashMap<[u8; 32], Entry>,
    /// Per disk: offset -> (digest, len) of the entries there.
    by_loc: HashMap<String, BTreeMap<u64, ([u8; 32], u32)>>,
    order: VecDeque<[u8; 32]>,
    /// Per disk: (seq, digest) of entries still pending, in stream order.
    pending: HashMap<String, VecDeque<(u64, [u8; 32])>>,
    /// After a wait for a twin ran out (its stream is stalled), no frame
    /// waits again until then: a stalled disk must not slow the others to
    /// one frame per wait.
    no_wait_until: Option<Instant>,
}

pub struct Index {
    max: usize,
    m: Mutex<Idx>,
    cv: Condvar,
}

/// What to send for a DATA frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hit {
    /// The same content is held at `loc`.
    At(Loc),
    /// Send the data.
    Miss,
}

impl Index {
    pub fn new(max: usize) -> Index {
        Index { max, m: Mutex::new(Idx::default()), cv: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idx> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget whatever the index says lies in `[offset, offset+len)` of
    /// `disk` (a frame is about to overwrite it).
    pub fn forget_range(&self, disk: &str, offset: u64, len: u32) {
        let mut g = self.lock();
        forget_range(&mut g, disk, offset, len);
    }

    /// Look `digest` up for a frame of `disk`: a held copy
    /// elsewhere (waiting up to [`PENDING_WAIT`] for one that is pending in
    /// another disk's stream), or a miss.
    pub fn lookup(&self, disk: &str, digest: &[u8; 32]) -> Hit {
        let until = Instant::now() + PENDING_WAIT;
        let mut g = self.lock();
        loop {
            let waiting_allowed = g.no_wait_until.is_none_or(|t| Instant::now() >= t);
            match g.by_digest.get(digest) {
                // Held; or pending in this very stream, which the master
                // target applies in order.
                Some(e) if e.pending.is_none() || e.loc.disk == disk => return Hit::At(e.loc.clone()),
                Some(_) if waiting_allowed && Instant::now() < until => {}
                Some(_) if waiting_allowed => {
                    g.no_wait_until = Some(Instant::now() + 5 * PENDING_WAIT);
                    return Hit::Miss;
                }
                _ => return Hit::Miss,
            }
            g = self.cv.wait_timeout(g, Duration::from_millis(20)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// A DATA frame with this content went out in `disk`'s stream as `seq`.
    pub fn sent(&self, disk: &str, seq: u64, offset: u64, len: u32, digest: [u8; 32]) {
        let mut g = self.lock();
        forget_range(&mut g, disk, offset, len);
        if g.by_digest.contains_key(&digest) {
            return;
        }
        while g.by_digest.len() >= self.max.max(1) {
            let Some(old) = g.order.pop_front() else { break };
            if let Some(e) = g.by_digest.remove(&old) {
                if let Some(m) = g.by_loc.get_mut(&e.loc.disk) {
                    m.remove(&e.loc.offset);
                }
            }
        }
        let loc = Loc { disk: disk.into(), offset, len };
        g.by_loc.entry(disk.into()).or_default().insert(offset, (digest, len));
        g.by_digest.insert(digest, Entry { loc, pending: Some(seq) });
        g.order.push_back(digest);
        g.pending.entry(disk.into()).or_default().push_back((seq, digest));
    }

    /// `disk`'s stream is acknowledged up to `acked`: its pending entries
    /// up to there are held now.
    pub fn acked(&self, disk: &str, acked: u64) {
        let mut g = self.lock();
        let mut done = Vec::new();
        if let Some(q) = g.pending.get_mut(disk) {
            while q.front().is_some_and(|&(s, _)| s <= acked) {
                done.extend(q.pop_front());
            }
        }
        if done.is_empty() {
            return;
        }
        for (s, d) in done {
            if let Some(e) = g.by_digest.get_mut(&d) {
                if e.loc.disk == disk && e.pending == Some(s) {
                    e.pending = None;
                }
            }
        }
        self.cv.notify_all();
    }

    /// `disk`'s stream broke: what it had sent but not had acknowledged may
    /// not be there; and after a reference miss, `digests` are wrong.
    pub fn drop_pending(&self, disk: &str, digests: &[[u8; 32]]) {
        let mut g = self.lock();
        let mut gone: Vec<[u8; 32]> = g.pending.remove(disk).map(|q| q.into_iter().map(|(_, d)| d).collect()).unwrap_or_default();
        gone.extend_from_slice(digests);
        for d in gone {
            if let Some(e) = g.by_digest.remove(&d) {
                if let Some(m) = g.by_loc.get_mut(&e.loc.disk) {
                    m.remove(&e.loc.offset);
                }
            }
        }
        self.cv.notify_all();
    }

    pub fn len(&self) -> usize {
        self.lock().by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn forget_range(g: &mut Idx, disk: &str, offset: u64, len: u32) {
    let end = offset + u64::from(len);
    let Some(m) = g.by_loc.get_mut(disk) else { return };
    let from = offset.saturating_sub(u64::from(ferry_proto::MAX_EXTENT));
    let hit: Vec<(u64, [u8; 32])> =
        m.range(from..end).filter(|(&o, &(_, l))| o + u64::from(l) > offset).map(|(&o, &(d, _))| (o, d)).collect();
    for (o, d) in hit {
        m.remove(&o);
        if g.by_digest.get(&d).is_some_and(|e| e.loc.disk == disk && e.loc.offset == o) {
            g.by_digest.remove(&d);
        }
    }
}

/// Index file: magic, version, then per held entry
/// `DIGEST:[u8;32] OFFSET:u64 LEN:u32 NAME_LEN:u8 NAME`, then xxh3-128 of
/// everything before it (docs/formats.md, "Dedup index").
const IDX_MAGIC: &[u8; 8] = b"FERRYDDX";
const IDX_VERSION: u32 = 1;

impl Index {
    /// The held entries, in a file `path` (replaced atomically).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<usize> {
        let mut out = Vec::new();
        out.extend_from_slice(IDX_MAGIC);
        out.extend_from_slice(&IDX_VERSION.to_le_bytes());
        let mut n = 0usize;
        {
            let g = self.lock();
            for d in &g.order {
                let Some(e) = g.by_digest.get(d).filter(|e| e.pending.is_none()) else { continue };
                out.extend_from_slice(d);
                out.extend_from_slice(&e.loc.offset.to_le_bytes());
                out.extend_from_slice(&e.loc.len.to_le_bytes());
                out.push(e.loc.disk.len() as u8);
                out.extend_from_slice(e.loc.disk.as_bytes());
                n += 1;
            }
        }
        let sum = ferry_common::xxh128(&out);
        out.extend_from_slice(&sum);
        ferry_common::durable::write_atomic(path, &out)?;
        Ok(n)
    }

    /// Load entries saved by [`Index::save`] (as held: the master target
    /// checks each one when it is used). A missing file is an empty index;
    /// a damaged one is ignored (logged), never trusted in part.
    pub fn load(&self, path: &std::path::Path) -> usize {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(_) => return 0,
        };
        let parsed = (|| -> Option<Vec<([u8; 32], Loc)>> {
            if data.len() < 12 + 16 || &data[..8] != IDX_MAGIC {
                return None;
            }
            let (body, sum) = data.split_at(data.len() - 16);
            if ferry_common::xxh128(body)[..] != *sum || u32::from_le_bytes(body[8..12].try_into().ok()?) != IDX_VERSION {
                return None;
            }
            let mut v = Vec::new();
            let mut p = &body[12..];
            while !p.is_empty() {
                if p.len() < 45 {
                    return None;
                }
                let d: [u8; 32] = p[..32].try_into().ok()?;
                let offset = u64::from_le_bytes(p[32..40].try_into().ok()?);
                let len = u32::from_le_bytes(p[40..44].try_into().ok()?);
                let nl = p[44] as usize;
                let name = std::str::from_utf8(p.get(45..45 + nl)?).ok()?.to_string();
                if !ferry_proto::valid_name(&name) {
                    return None;
                }
                v.push((d, Loc { disk: name, offset, len }));
                p = &p[45 + nl..];
            }
            Some(v)
        })();
        let Some(v) = parsed else {
            log::warn!("dedup index {}: damaged, not used (it fills again as data is sent)", path.display());
            return 0;
        };
        let n = v.len();
        let mut g = self.lock();
        for (d, loc) in v.into_iter().rev().take(self.max).rev() {
            if g.by_digest.contains_key(&d) {
                continue;
            }
            g.by_loc.entry(loc.disk.clone()).or_default().insert(loc.offset, (d, loc.len));
            g.by_digest.insert(d, Entry { loc, pending: None });
            g.order.push_back(d);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_content_is_found_pending_content_waits_and_overwrites_forget() {
        let ix = Index::new(100);
        let d = [1u8; 32];
        assert_eq!(ix.lookup("a", &d), Hit::Miss);
        ix.sent("a", 5, 65536, 65536, d);
        // Pending in disk a's own stream: usable there at once.
        assert_eq!(ix.lookup("a", &d), Hit::At(Loc { disk: "a".into(), offset: 65536, len: 65536 }));
        ix.acked("a", 5);
        assert_eq!(ix.lookup("b", &d), Hit::At(Loc { disk: "a".into(), offset: 65536, len: 65536 }));
        // Overwritten in a: gone.
        ix.forget_range("a", 100_000, 4096);
        assert_eq!(ix.lookup("b", &d), Hit::Miss);
        // A twin pending in another stream: the lookup waits for its ack.
        let ix = std::sync::Arc::new(Index::new(100));
        ix.sent("a", 9, 0, 65536, d);
        let ix2 = std::sync::Arc::clone(&ix);
        let t = std::thread::spawn(move || ix2.lookup("b", &d));
        std::thread::sleep(Duration::from_millis(100));
        ix.acked("a", 9);
        assert_eq!(t.join().unwrap(), Hit::At(Loc { disk: "a".into(), offset: 0, len: 65536 }));
        // A broken stream drops what it had pending; the index stays bounded.
        ix.sent("a", 10, 1 << 20, 4096, [2; 32]);
        ix.drop_pending("a", &[]);
        assert_eq!(ix.lookup("b", &[2; 32]), Hit::Miss);
        // Saved and loaded: the held entries come back; a damaged file is
        // not used at all.
        let f = std::env::temp_dir().join(format!("ferry-ddx-{}", std::process::id()));
        let ix = Index::new(100);
        ix.sent("a", 1, 0, 65536, [5; 32]);
        ix.acked("a", 1);
        ix.sent("b", 1, 4096, 4096, [6; 32]);
        assert_eq!(ix.save(&f).unwrap(), 1, "only held entries are saved");
        let back = Index::new(100);
        assert_eq!(back.load(&f), 1);
        assert_eq!(back.lookup("c", &[5; 32]), Hit::At(Loc { disk: "a".into(), offset: 0, len: 65536 }));
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(Index::new(100).load(&f), 0);
        let _ = std::fs::remove_file(&f);
        let small = Index::new(3);
        for i in 0..10u8 {
            small.sent("a", u64::from(i), u64::from(i) * 4096, 4096, [i; 32]);
        }
        assert_eq!(small.len(), 3);
    }
}
