//! Which state folder owns a disk's tracker, so that `ferry unprotect` of
//! one folder cannot detach the tracker another folder's agent follows, and
//! an agent does not silently take over another folder's tracker.
//!
//! An owner is the canonical path of a state folder plus the generation of
//! the protection in it (`agent.state`, 16 random bytes chosen when the
//! protection began). It is recorded beside the tracker:
//!
//! - bpf: a pinned, frozen one-entry array map `owner` in the pin folder
//!   (`/sys/fs/bpf/ferry/NAME/owner`) holding the binary record below; it
//!   goes with the pins (an unpin, a reboot).
//! - kmod: the module keeps no owner, so the agent writes the state file
//!   `/run/ferry/kmod/MAJOR-MINOR.owner` (kind `ferry-kmod-owner v1`) with
//!   the module's `attach_id` of the attachment it describes; a record
//!   whose `attach_id` is not the disk's current attachment is stale and
//!   ignored.
//!
//! The bpf record (4096 bytes, little-endian, docs/formats.md):
//!
//! ```text
//! OWNER = MAGIC:u64 = xxh3-64("ferry tracker owner v1") || VERSION:u32 = 1
//!         || PATH_LEN:u32 || GENERATION:[u8;16] || SINCE_NS:u64 || RESERVED:u64 = 0
//!         || PATH:[u8;PATH_LEN] || zero padding to byte 4080
//!         || XXH3_128(bytes 0..4080):16
//! ```
//!
//! Judging a record ([`judge`]): the same folder and generation is *mine*;
//! no record (no tracker, or one pinned by a ferry before owner records) is
//! *free*; a record whose folder no longer holds that protection (its
//! `agent.state` is gone, or holds another generation) is *stale*; any
//! other is *foreign*. An agent refuses a foreign tracker and
//! takes over a stale one (afresh, which costs a resync, unless it is the
//! same protection in a moved folder); `ferry unprotect` detaches only a
//! tracker that is mine or free, unless `--force`.
//!
//! Not checked: two agents starting at the same instant with different
//! folders for one name (both may see no tracker), and kmod ownership
//! across a reboot before the agent runs again (the record is in /run).

use crate::state::StateDir;
use crate::AgentError;
use ferry_common::durable::{hex, read_state, unhex, write_state};
use std::path::{Path, PathBuf};
use xxhash_rust::const_xxh3::xxh3_64 as const_xxh3_64;

/// Do not modify: identifies the record.
pub const MAGIC: u64 = const_xxh3_64(b"ferry tracker owner v1");
pub const VERSION: u32 = 1;
/// Size of the bpf owner record (the pinned map's value size).
pub const RECORD_BYTES: usize = 4096;
const HEADER: usize = 48;
const SUM_AT: usize = RECORD_BYTES - 16;
/// Longest state-folder path a record holds.
pub const MAX_PATH: usize = SUM_AT - HEADER;
const _: () = assert!(HEADER + MAX_PATH + 16 == RECORD_BYTES);

/// Where the kmod owner records live.
pub const KMOD_OWNER_DIR: &str = "/run/ferry/kmod";
const KMOD_KIND: &str = "ferry-kmod-owner";
const KMOD_VERSION: u32 = 1;

/// A state folder and the protection in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Canonical path of the state folder.
    pub state: PathBuf,
    pub generation: [u8; 16],
    pub since_ns: u64,
}

impl Owner {
    /// The owner for state folder `dir` (which must exist) and `generation`.
    pub fn new(dir: &Path, generation: [u8; 16]) -> Result<Owner, AgentError> {
        let state = std::fs::canonicalize(dir).map_err(AgentError::io(format!("state folder {}", dir.display())))?;
        Ok(Owner { state, generation, since_ns: ferry_common::now_ns() })
    }

    /// Same folder and protection (the time does not matter).
    pub fn same(&self, other: &Owner) -> bool {
        self.state == other.state && self.generation == other.generation
    }

    /// The binary record pinned beside the bpf tracker.
    pub fn pack(&self) -> Result<Vec<u8>, AgentError> {
        use std::os::unix::ffi::OsStrExt;
        let p = self.state.as_os_str().as_bytes();
        if p.len() > MAX_PATH {
            return Err(AgentError::Usage(format!(
                "state folder path {} is longer than {MAX_PATH} bytes: use a shorter --state",
                self.state.display()
            )));
        }
        let mut b = vec![0u8; RECORD_BYTES];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(p.len() as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.generation);
        b[32..40].copy_from_slice(&self.since_ns.to_le_bytes());
        b[HEADER..HEADER + p.len()].copy_from_slice(p);
        let sum = ferry_common::xxh128(&b[..SUM_AT]);
        b[SUM_AT..].copy_from_slice(&sum);
        Ok(b)
    }

    /// Parse and check a record read from the pins.
    pub fn unpack(b: &[u8]) -> Result<Owner, String> {
        use std::os::unix::ffi::OsStrExt;
        if b.len() != RECORD_BYTES {
            return Err(format!("{} bytes, not {RECORD_BYTES}", b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        if u64_at(0) != MAGIC {
            return Err("not a ferry owner record".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!("version {} (this ferry reads {VERSION})", u32_at(8)));
        }
        if b[SUM_AT..] != ferry_common::xxh128(&b[..SUM_AT]) {
            return Err("checksum mismatch".into());
        }
        let n = u32_at(12) as usize;
        if n == 0 || n > MAX_PATH || u64_at(40) != 0 || b[HEADER + n..SUM_AT].iter().any(|&x| x != 0) {
            return Err("malformed".into());
        }
        Ok(Owner {
            state: PathBuf::from(std::ffi::OsStr::from_bytes(&b[HEADER..HEADER + n])),
            generation: b[16..32].try_into().expect("16"),
            since_ns: u64_at(32),
        })
    }

    /// Whether this owner's folder still holds its protection. A folder
    /// whose state cannot be read counts as holding it (so nothing is taken
    /// from it by mistake).
    pub fn live(&self) -> bool {
        match StateDir::new(&self.state).load() {
            // (Not the mode: an unprotect removes the record with the pins,
            // and an agent starting again on an unprotected folder still
            // says "unprotected" until it connects.)
            Ok(Some(st)) => st.generation == hex(&self.generation),
            Ok(None) => false,
            Err(_) => true,
        }
    }
}

/// Whose a tracker is, from the point of view of one state folder.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Recorded for this folder and protection (the record, as it is).
    Mine(Owner),
    /// No tracker, or no owner record.
    Free,
    /// Recorded for a folder that no longer holds that protection.
    Stale(Owner),
    /// Recorded for another folder that holds it.
    Foreign(Owner),
    /// A record that cannot be read.
    Unreadable(String),
}

/// Judge `record` (None: none) for `me`; `live` tells whether an owner's
/// folder still holds its protection.
pub fn judge(record: Option<Result<Owner, String>>, me: &Owner, live: impl Fn(&Owner) -> bool) -> Claim {
    match record {
        None => Claim::Free,
        Some(Err(e)) => Claim::Unreadable(e),
        Some(Ok(o)) if o.same(me) => Claim::Mine(o),
        Some(Ok(o)) if live(&o) => Claim::Foreign(o),
        Some(Ok(o)) => Claim::Stale(o),
    }
}

/// The bpf tracker's owner record of disk `name`, judged for `me`.
pub fn bpf_claim(name: &str, me: &Owner) -> Result<Claim, AgentError> {
    let rec = ferry_bpf::read_owner(name)?.map(|b| Owner::unpack(&b));
    Ok(judge(rec, me, Owner::live))
}

/// The kmod owner record of a disk (`MAJOR-MINOR`), as the agent wrote it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KmodOwner {
    pub state: PathBuf,
    /// Hex of the generation.
    pub generation: String,
    pub name: String,
    pub disk: String,
    /// The module's id of the attachment this record is about.
    pub attach_id: u64,
    pub since_ns: u64,
}

fn kmod_owner_path(dir: &Path, dev: (u32, u32)) -> PathBuf {
    dir.join(format!("{}-{}.owner", dev.0, dev.1))
}

/// The kmod owner record of `dev` for attachment `attach_id`, judged for
/// `me` (a record of another attachment is stale: ignored, as free).
pub fn kmod_claim(dir: &Path, dev: (u32, u32), attach_id: u64, me: &Owner) -> Claim {
    let rec = match read_state::<KmodOwner>(&kmod_owner_path(dir, dev), KMOD_KIND, KMOD_VERSION) {
        Ok(None) => None,
        Ok(Some(r)) if r.attach_id != attach_id => None,
        Ok(Some(r)) => Some(
            unhex::<16>(&r.generation)
                .map(|generation| Owner { state: r.state, generation, since_ns: r.since_ns })
                .ok_or_else(|| "bad generation".to_string()),
        ),
        Err(e) => Some(Err(e.to_string())),
    };
    judge(rec, me, Owner::live)
}

/// Record `me` as the owner of `dev`'s attachment `attach_id`.
pub fn kmod_record(dir: &Path, dev: (u32, u32), attach_id: u64, me: &Owner, name: &str, disk: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
    let r = KmodOwner {
        state: me.state.clone(),
        generation: hex(&me.generation),
        name: name.into(),
        disk: disk.display().to_string(),
        attach_id,
        since_ns: me.since_ns,
    };
    Ok(write_state(&kmod_owner_path(dir, dev), KMOD_KIND, KMOD_VERSION, &r)?)
}

/// Forget `dev`'s owner record (after a detach).
pub fn kmod_forget(dir: &Path, dev: (u32, u32)) {
    let _ = std::fs::remove_file(kmod_owner_path(dir, dev));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(dir: &Path) -> Owner {
        Owner { state: dir.to_path_buf(), generation: [7; 16], since_ns: 42 }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let o = me(Path::new("/var/lib/ferry/agent/db 1"));
        let b = o.pack().unwrap();
        assert_eq!(b.len(), RECORD_BYTES);
        assert_eq!(Owner::unpack(&b).unwrap(), o);
        let mut bad = b.clone();
        bad[HEADER] ^= 1;
        assert!(Owner::unpack(&bad).unwrap_err().contains("checksum"));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(Owner::unpack(&bad).is_err());
        assert!(Owner::unpack(&b[..100]).is_err());
        let long = me(&PathBuf::from("/".repeat(MAX_PATH + 1)));
        assert!(long.pack().is_err());
        assert!(me(&PathBuf::from("/".repeat(MAX_PATH))).pack().is_ok());
    }

    #[test]
    fn judging_tells_mine_free_stale_foreign_and_unreadable_apart() {
        let a = me(Path::new("/st/a"));
        let mut b = me(Path::new("/st/b"));
        assert_eq!(judge(None, &a, |_| true), Claim::Free);
        let later = Owner { since_ns: 99, ..a.clone() };
        assert_eq!(judge(Some(Ok(later.clone())), &a, |_| true), Claim::Mine(later));
        assert_eq!(judge(Some(Ok(b.clone())), &a, |_| true), Claim::Foreign(b.clone()));
        assert_eq!(judge(Some(Ok(b.clone())), &a, |_| false), Claim::Stale(b.clone()));
        b.state = a.state.clone();
        b.generation = [8; 16];
        assert_eq!(judge(Some(Ok(b.clone())), &a, |_| false), Claim::Stale(b), "another protection in the same folder");
        assert!(matches!(judge(Some(Err("x".into())), &a, |_| true), Claim::Unreadable(_)));
    }

    #[test]
    fn an_owner_is_live_while_its_folder_holds_the_protection() {
        let d = tempfile::tempdir().unwrap();
        let o = Owner::new(d.path(), [3; 16]).unwrap();
        assert!(!o.live(), "no agent.state: gone");
        std::fs::write(d.path().join("agent.state"), "damaged").unwrap();
        assert!(o.live(), "unreadable counts as live");
    }

    #[test]
    fn kmod_records_are_judged_per_attachment() {
        let d = tempfile::tempdir().unwrap();
        let a = Owner::new(d.path(), [1; 16]).unwrap();
        let other = tempfile::tempdir().unwrap();
        let b = Owner::new(other.path(), [2; 16]).unwrap();
        let dev = (7, 3);
        assert_eq!(kmod_claim(d.path(), dev, 10, &a), Claim::Free);
        kmod_record(d.path(), dev, 10, &a, "vm", Path::new("/dev/loop3")).unwrap();
        assert_eq!(kmod_claim(d.path(), dev, 10, &a), Claim::Mine(a.clone()));
        assert_eq!(kmod_claim(d.path(), dev, 11, &b), Claim::Free, "a record of another attachment is ignored");
        // b's view: a's folder has no agent.state, so a's record is stale.
        assert_eq!(kmod_claim(d.path(), dev, 10, &b), Claim::Stale(a.clone()));
        kmod_forget(d.path(), dev);
        assert_eq!(kmod_claim(d.path(), dev, 10, &b), Claim::Free);
    }
}
