//! The spool of one disk: what an agent sent and the process server
//! acknowledged, kept on disk until the master target made it durable.
//!
//! Layout (docs/formats.md, "Process server spool"):
//!
//! ```text
//! SPOOL/disks/NAME/disk.state              ferry-spool-disk v1 (checksummed JSON)
//! SPOOL/disks/NAME/seg-<floor:020>.fsp     segments, oldest first
//! ```
//!
//! A segment is a 64-byte header (magic, version, the sequence floor every
//! frame in it lies above, the disk's generation, a checksum) followed by
//! data-path frames exactly as the wire carries them (docs/protocol.md,
//! "Framing": each has its own xxh3-128), in strictly increasing sequence
//! order. Appends are `write` + `fdatasync` per batch, so what was
//! acknowledged is on disk; a crash can leave only a torn frame at the end
//! of the last segment, which [`DiskSpool::open`] cuts off. Damage anywhere
//! else (a frame that fails its checksum in an older segment) cuts the spool
//! at that frame too: what follows cannot be forwarded in order, and the
//! lower durable sequence the agent is then told makes it resync by
//! checksum, so nothing is silently lost.

use ferry_common::durable::{fsync_dir, hex, read_state, unhex, write_state, StateError};
use ferry_link::Op;
use ferry_proto::{Codec, Msg, ProtoError};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const SEG_MAGIC: [u8; 8] = *b"FERRYSPL";
pub const SEG_VERSION: u32 = 1;
pub const SEG_HEADER: u64 = 64;
/// A new segment is started once the current one holds this much.
pub const SEG_MAX: u64 = 64 << 20;
const STATE_KIND: &str = "ferry-spool-disk";
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("spool {path}: {why}")]
    Bad { path: String, why: String },
}

fn ioe(p: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: p.display().to_string(), source }
}

/// `disk.state`: what the master target said when this generation of the
/// disk was first opened through the spool, and how far it is durable.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskState {
    pub name: String,
    pub size: u64,
    /// The agent's generation, hex.
    pub generation: String,
    /// OPEN_ACK flags the master target gave for this generation.
    pub flags: u32,
    /// The master target's durable sequence then.
    pub base_seq: u64,
    /// Highest sequence the master target acknowledged since (saved when
    /// segments are dropped, so the durable sequence survives an empty
    /// spool).
    pub upstream_acked: u64,
    /// The identity that owns the disk here (`agent/NAME`), with TLS.
    #[serde(default)]
    pub owner: Option<String>,
}

/// One segment: frames with sequence numbers above `floor`, up to `last`.
#[derive(Clone, Debug)]
pub struct Seg {
    pub floor: u64,
    pub last: u64,
    pub len: u64,
    pub path: PathBuf,
}

/// The spool of one disk (not thread-safe: the relay holds it under a lock).
pub struct DiskSpool {
    pub dir: PathBuf,
    pub state: DiskState,
    pub segs: Vec<Seg>,
    writer: Option<File>,
    /// Bumped whenever the spool is wiped, so a reader's position is known
    /// to be stale.
    pub epoch: u64,
}

fn seg_name(floor: u64) -> String {
    format!("seg-{floor:020}.fsp")
}

fn header(floor: u64, generation: &[u8; 16]) -> [u8; SEG_HEADER as usize] {
    let mut h = [0u8; SEG_HEADER as usize];
    h[0..8].copy_from_slice(&SEG_MAGIC);
    h[8..12].copy_from_slice(&SEG_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEG_HEADER as u32).to_le_bytes());
    h[16..24].copy_from_slice(&floor.to_le_bytes());
    h[24..40].copy_from_slice(generation);
    h[40..48].copy_from_slice(&ferry_common::now_ns().to_le_bytes());
    let sum = ferry_common::xxh128(&h[0..48]);
    h[48..64].copy_from_slice(&sum);
    h
}

/// Check a segment header: `Ok((floor, generation))`, or why not.
fn parse_header(h: &[u8]) -> Result<(u64, [u8; 16]), String> {
    if h.len() < SEG_HEADER as usize {
        return Err("shorter than its header".into());
    }
    if h[0..8] != SEG_MAGIC {
        return Err("not a ferry spool segment (bad magic)".into());
    }
    if ferry_common::xxh128(&h[0..48])[..] != h[48..64] {
        return Err("header checksum mismatch".into());
    }
    let v = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if v != SEG_VERSION {
        return Err(format!("segment format v{v}, this process server reads v{SEG_VERSION}"));
    }
    let floor = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    let mut g = [0u8; 16];
    g.copy_from_slice(&h[24..40]);
    Ok((floor, g))
}

/// Counts what a reader consumed, to know where each frame ends.
struct Counting<R> {
    r: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.r.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// The wire frame an op is stored as.
pub fn op_msg(op: Op) -> Msg {
    match op {
        Op::Data { seq, offset, len, codec, payload } => Msg::Data { seq, offset, len, codec, payload },
        Op::Write { seq, offset, data } => Msg::Data { seq, offset, len: data.len() as u32, codec: Codec::Raw, payload: data },
        Op::Ref { seq, offset, len, src, digest } => Msg::Ref { seq, offset, len, src, digest },
        Op::XRef { seq, offset, len, src, digest, disk } => Msg::XRef { seq, offset, len, src, digest, disk },
        Op::Zero { seq, offset, len } => Msg::Zero { seq, offset, len },
        Op::Tag { seq, time_ns, kind } => Msg::Tag { seq, time_ns, kind },
    }
}

/// Bytes a frame takes on the wire.
pub fn frame_len(m: &Msg) -> u64 {
    let body = match m {
        Msg::Data { payload, .. } => 24 + payload.len() as u64,
        Msg::Ref { .. } => 64,
        _ => 24,
    };
    (ferry_proto::HEADER_LEN + ferry_proto::TRAILER_LEN) as u64 + body
}

/// What reading a segment found.
struct Scan {
    /// Frames read (when asked for) and the end of each.
    frames: Vec<(Msg, u64)>,
    /// End of the last good frame.
    good_end: u64,
    last_seq: u64,
    /// Why reading stopped before the end of the file, if it did.
    stop: Option<String>,
}

/// Read the frames of a segment from byte `pos` (after the header) to
/// `limit`, keeping at most `max_bytes` of them when `keep`.
fn scan_seg(path: &Path, pos: u64, limit: u64, mut last_seq: u64, keep: Option<u64>) -> io::Result<Scan> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(pos))?;
    let mut r = Counting { r: BufReader::with_capacity(1 << 20, f.take(limit.saturating_sub(pos))), n: pos };
    let mut out = Scan { frames: Vec::new(), good_end: pos, last_seq, stop: None };
    let mut kept = 0u64;
    loop {
        if keep.is_some_and(|k| kept >= k) {
            break;
        }
        match ferry_proto::read_frame(&mut r) {
            Ok(None) => break,
            Ok(Some(m)) => {
                let Some(seq) = m.seq() else {
                    out.stop = Some(format!("a frame without a sequence number at byte {}", out.good_end));
                    break;
                };
                if seq <= last_seq {
                    out.stop = Some(format!("seq {seq} after {last_seq} at byte {}", out.good_end));
                    break;
                }
                last_seq = seq;
                let size = r.n - out.good_end;
                out.good_end = r.n;
                out.last_seq = seq;
                if keep.is_some() {
                    kept += size;
                    out.frames.push((m, r.n));
                }
            }
            Err(ProtoError::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => return Err(e),
            Err(e) => {
                out.stop = Some(format!("{e} at byte {}", out.good_end));
                break;
            }
        }
    }
    Ok(out)
}

impl DiskSpool {
    fn state_path(dir: &Path) -> PathBuf {
        dir.join("disk.state")
    }

    /// Start a spool for a disk (a new one, or a new generation: whatever
    /// was there is removed).
    pub fn create(dir: &Path, state: DiskState, epoch: u64) -> Result<DiskSpool, SpoolError> {
        fs::create_dir_all(dir).map_err(ioe(dir))?;
        for e in fs::read_dir(dir).map_err(ioe(dir))?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".fsp") {
                fs::remove_file(e.path()).map_err(ioe(&e.path()))?;
            }
        }
        write_state(&Self::state_path(dir), STATE_KIND, STATE_VERSION, &state)?;
        Ok(DiskSpool { dir: dir.into(), state, segs: Vec::new(), writer: None, epoch })
    }

    /// Open a disk's spool after a start or a crash: check every segment,
    /// cut a torn or damaged tail (logged). Segments the master target
    /// holds go once the forwarder learns its durable sequence.
    /// `Ok(None)`: no spool here (no state file).
    pub fn open(dir: &Path) -> Result<Option<DiskSpool>, SpoolError> {
        let Some(state) = read_state::<DiskState>(&Self::state_path(dir), STATE_KIND, STATE_VERSION)? else {
            return Ok(None);
        };
        let generation = unhex::<16>(&state.generation)
            .ok_or_else(|| SpoolError::Bad { path: dir.display().to_string(), why: "bad generation in disk.state".into() })?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir).map_err(ioe(dir))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(floor) = n.strip_prefix("seg-").and_then(|s| s.strip_suffix(".fsp")).and_then(|s| s.parse::<u64>().ok()) {
                names.push((floor, e.path()));
            }
        }
        names.sort();
        let mut segs: Vec<Seg> = Vec::new();
        let mut cut: Option<String> = None;
        let count = names.len();
        for (i, (floor, path)) in names.into_iter().enumerate() {
            if cut.is_some() {
                log::error!("spool {}: {} dropped: it follows damage", dir.display(), path.display());
                fs::remove_file(&path).map_err(ioe(&path))?;
                continue;
            }
            let mut h = Vec::with_capacity(SEG_HEADER as usize);
            File::open(&path).and_then(|f| f.take(SEG_HEADER).read_to_end(&mut h)).map_err(ioe(&path))?;
            let checked = parse_header(&h).and_then(|(fl, g)| {
                if fl != floor {
                    Err(format!("header floor {fl} but named {floor}"))
                } else if g != generation {
                    Err("another generation's segment".into())
                } else {
                    Ok(())
                }
            });
            if let Err(why) = checked {
                let torn = i + 1 == count && h.len() < SEG_HEADER as usize;
                if !torn {
                    log::error!("spool {}: {}: {why}; cut here", dir.display(), path.display());
                    cut = Some(why);
                }
                fs::remove_file(&path).map_err(ioe(&path))?;
                continue;
            }
            let len = fs::metadata(&path).map_err(ioe(&path))?.len();
            let s = scan_seg(&path, SEG_HEADER, len, floor, None).map_err(ioe(&path))?;
            if s.good_end < len {
                let why = s.stop.clone().unwrap_or_else(|| "a torn frame".into());
                if i + 1 == count {
                    log::warn!("spool {}: {}: torn tail cut ({} bytes: {why})", dir.display(), path.display(), len - s.good_end);
                } else {
                    log::error!("spool {}: {}: damaged ({why}); the spool is cut here", dir.display(), path.display());
                    cut = Some(why);
                }
                let f = OpenOptions::new().write(true).open(&path).map_err(ioe(&path))?;
                f.set_len(s.good_end).map_err(ioe(&path))?;
                f.sync_all().map_err(ioe(&path))?;
            }
            if s.good_end == SEG_HEADER && i + 1 < count && cut.is_none() {
                // An empty older segment: nothing to keep.
                fs::remove_file(&path).map_err(ioe(&path))?;
                continue;
            }
            segs.push(Seg { floor, last: s.last_seq.max(floor), len: s.good_end, path });
        }
        fsync_dir(dir).map_err(ioe(dir))?;
        Ok(Some(DiskSpool { dir: dir.into(), state, segs, writer: None, epoch: 0 }))
    }

    pub fn generation(&self) -> [u8; 16] {
        unhex::<16>(&self.state.generation).unwrap_or_default()
    }

    /// The highest sequence durable here or upstream.
    pub fn durable(&self) -> u64 {
        let spooled = self.segs.iter().map(|s| s.last).max().unwrap_or(0);
        spooled.max(self.state.base_seq).max(self.state.upstream_acked)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }

    /// Bytes of frames the master target has not acknowledged (an
    /// estimate by whole segments above the acknowledged sequence).
    pub fn pending_bytes(&self) -> u64 {
        self.segs.iter().filter(|s| s.last > self.state.upstream_acked).map(|s| s.len - SEG_HEADER).sum()
    }

    /// Append `ops` (sequence numbers above [`DiskSpool::durable`]) and make
    /// them durable before returning.
    pub fn append(&mut self, ops: Vec<Op>) -> Result<(), SpoolError> {
        let mut buf =
            Vec::with_capacity(ops.iter().map(|o| o.range().map_or(64, |(a, b)| (b - a) as usize + 64)).sum::<usize>().min(32 << 20));
        let mut last = self.durable();
        for op in ops {
            let m = op_msg(op);
            let seq = m.seq().unwrap_or(0);
            if seq <= last {
                return Err(SpoolError::Bad { path: self.dir.display().to_string(), why: format!("seq {seq} does not follow {last}") });
            }
            last = seq;
            m.encode(&mut buf);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let need_new = match self.segs.last() {
            None => true,
            Some(s) => s.len >= SEG_MAX,
        };
        if need_new {
            self.start_segment()?;
        }
        if self.writer.is_none() {
            let s = self.segs.last().expect("a segment");
            let f = OpenOptions::new().append(true).open(&s.path).map_err(ioe(&s.path))?;
            self.writer = Some(f);
        }
        let seg = self.segs.last_mut().expect("a segment");
        let w = self.writer.as_mut().expect("a writer");
        let r = w.write_all(&buf).and_then(|_| w.sync_data());
        if let Err(e) = r {
            // What may have reached the file is cut off again, so the
            // segment ends on a whole frame.
            self.writer = None;
            if let Ok(f) = OpenOptions::new().write(true).open(&seg.path) {
                let _ = f.set_len(seg.len);
            }
            return Err(ioe(&seg.path)(e));
        }
        seg.len += buf.len() as u64;
        seg.last = last;
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        let floor = self.durable();
        let path = self.dir.join(seg_name(floor));
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&path).map_err(ioe(&path))?;
        f.write_all(&header(floor, &self.generation())).and_then(|_| f.sync_all()).map_err(ioe(&path))?;
        fsync_dir(&self.dir).map_err(ioe(&self.dir))?;
        drop(f);
        self.writer = None;
        self.segs.push(Seg { floor, last: floor, len: SEG_HEADER, path });
        Ok(())
    }

    /// Read frames above `after`, starting the search at segment index
    /// hint `from` (use [`Cursor`]); at most about `max_bytes`.
    pub fn plan_read(&self, cur: &Cursor) -> Option<(PathBuf, u64, u64, u64)> {
        // (path, start pos, limit, last seq before pos)
        let i = self.segs.iter().position(|s| s.last > cur.after)?;
        let s = &self.segs[i];
        let (pos, before) = match cur.at {
            Some((floor, pos, before)) if floor == s.floor && pos <= s.len => (pos, before),
            _ => (SEG_HEADER, s.floor),
        };
        if pos >= s.len {
            return None;
        }
        Some((s.path.clone(), pos, s.len, before))
    }

    /// The master target holds everything up to `acked`: remember it, and
    /// drop the segments it covers (the one being written too when all of
    /// it is covered: the next append starts a new one).
    pub fn release(&mut self, acked: u64) -> Result<(), SpoolError> {
        if acked <= self.state.upstream_acked {
            return Ok(());
        }
        self.state.upstream_acked = acked;
        let n = self.segs.len();
        let drop: Vec<usize> = (0..n).filter(|&i| self.segs[i].last <= acked && (i + 1 < n || self.segs[i].len > SEG_HEADER)).collect();
        if n > 0 && drop.last() == Some(&(n - 1)) {
            self.writer = None;
        }
        if drop.is_empty() {
            return Ok(());
        }
        // The durable sequence must survive the segments that carried it.
        write_state(&Self::state_path(&self.dir), STATE_KIND, STATE_VERSION, &self.state)?;
        for &i in drop.iter().rev() {
            let s = self.segs.remove(i);
            fs::remove_file(&s.path).map_err(ioe(&s.path))?;
        }
        Ok(())
    }

    /// Save the state file (an owner bound, or the acknowledged sequence).
    pub fn save_state(&self) -> Result<(), SpoolError> {
        write_state(&Self::state_path(&self.dir), STATE_KIND, STATE_VERSION, &self.state)?;
        Ok(())
    }
}

/// A forwarder's position: everything up to `after` was sent; `at` is
/// where reading stopped (segment floor, byte, seq before that byte).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    pub after: u64,
    pub at: Option<(u64, u64, u64)>,
}

/// Read the frames `plan` names (from [`DiskSpool::plan_read`]) up to about
/// `max_bytes`, outside the spool's lock; advances `cur`.
pub fn read_planned(plan: (PathBuf, u64, u64, u64), floor_of: u64, cur: &mut Cursor, max_bytes: u64) -> io::Result<Vec<Msg>> {
    let (path, pos, limit, before) = plan;
    let s = scan_seg(&path, pos, limit, before, Some(max_bytes))?;
    if let Some(why) = &s.stop {
        // Checked at start and written whole since: damage under our feet.
        return Err(io::Error::other(format!("{}: {why}", path.display())));
    }
    let mut out = Vec::with_capacity(s.frames.len());
    for (m, _) in s.frames {
        if m.seq().is_some_and(|q| q > cur.after) {
            out.push(m);
        }
    }
    cur.at = Some((floor_of, s.good_end, s.last_seq));
    if let Some(q) = out.last().and_then(|m| m.seq()) {
        cur.after = q;
    }
    Ok(out)
}

/// Hex of a generation, as the state file keeps it.
pub fn gen_hex(g: &[u8; 16]) -> String {
    hex(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::PointKind;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn state() -> DiskState {
        DiskState {
            name: "d".into(),
            size: 1 << 20,
            generation: gen_hex(&[7; 16]),
            flags: 0,
            base_seq: 10,
            upstream_acked: 10,
            owner: None,
        }
    }

    fn w(seq: u64, b: u8) -> Op {
        Op::Write { seq, offset: 4096 * (seq % 8), data: vec![b; 4096] }
    }

    fn read_all(sp: &DiskSpool, after: u64) -> Vec<Msg> {
        let mut cur = Cursor { after, at: None };
        let mut out = Vec::new();
        while let Some(p) = sp.plan_read(&cur) {
            let floor = sp.segs.iter().find(|s| s.path == p.0).map(|s| s.floor).unwrap();
            let got = read_planned(p, floor, &mut cur, 1 << 20).unwrap();
            out.extend(got);
        }
        out
    }

    #[test]
    fn appended_frames_read_back_in_order_after_a_reopen() {
        let d = tmp("rt");
        let mut sp = DiskSpool::create(&d, state(), 0).unwrap();
        sp.append(vec![w(11, 1), w(12, 2)]).unwrap();
        sp.append(vec![Op::Zero { seq: 13, offset: 0, len: 512 }, Op::Tag { seq: 14, time_ns: 5, kind: PointKind::Crash }]).unwrap();
        assert_eq!(sp.durable(), 14);
        assert!(sp.append(vec![w(14, 3)]).is_err(), "a sequence that does not follow is refused");
        drop(sp);
        let sp = DiskSpool::open(&d).unwrap().unwrap();
        assert_eq!(sp.durable(), 14);
        let got: Vec<u64> = read_all(&sp, 10).iter().filter_map(|m| m.seq()).collect();
        assert_eq!(got, vec![11, 12, 13, 14]);
        let got: Vec<u64> = read_all(&sp, 12).iter().filter_map(|m| m.seq()).collect();
        assert_eq!(got, vec![13, 14]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_cuts_the_spool_there() {
        let d = tmp("torn");
        let mut sp = DiskSpool::create(&d, state(), 0).unwrap();
        sp.append(vec![w(11, 1), w(12, 2)]).unwrap();
        let path = sp.segs[0].path.clone();
        let good = sp.segs[0].len;
        drop(sp);
        // A crash in the middle of an append: half a frame at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut b = Vec::new();
        op_msg(w(13, 3)).encode(&mut b);
        f.write_all(&b[..b.len() / 2]).unwrap();
        drop(f);
        let mut sp = DiskSpool::open(&d).unwrap().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), good);
        assert_eq!(sp.durable(), 12);
        sp.append(vec![w(13, 3)]).unwrap();
        assert_eq!(read_all(&sp, 10).len(), 3);
        drop(sp);
        // A flipped byte inside the second frame: the spool ends before it.
        let mut data = fs::read(&path).unwrap();
        let second = SEG_HEADER as usize + b.len() + 100;
        data[second] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let sp = DiskSpool::open(&d).unwrap().unwrap();
        assert_eq!(sp.durable(), 11, "everything from the damaged frame on is cut");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn released_segments_are_dropped_and_the_durable_sequence_survives() {
        let d = tmp("rel");
        let mut sp = DiskSpool::create(&d, state(), 0).unwrap();
        let mut seq = 10;
        // Enough to fill more than one segment.
        let big = vec![9u8; 4 << 20];
        for _ in 0..20 {
            seq += 1;
            sp.append(vec![Op::Write { seq, offset: 0, data: big.clone() }]).unwrap();
        }
        assert!(sp.segs.len() >= 2, "segments roll over at SEG_MAX");
        sp.release(seq).unwrap();
        assert!(sp.segs.is_empty(), "every segment the master target holds is gone");
        drop(sp);
        let sp = DiskSpool::open(&d).unwrap().unwrap();
        assert_eq!(sp.durable(), seq);
        assert!(read_all(&sp, seq).is_empty());
        let _ = fs::remove_dir_all(&d);
    }
}
