//! The change-tracking ABI and the record ring.
//!
//! [`generated`] is bindgen's rendering of `cbt-module/include/uapi/ferry_cbt.h`
//! (regenerate with `scripts/bindgen.sh`; never edit by hand). [`Record`] is the
//! validated in-memory form of one ABI record, and [`Ring`] is the lock-free
//! single-producer / single-consumer ring of records in shared memory that the
//! kernel-side trackers fill and the agent drains.
//!
//! Ownership of the ring indices (see the header comment in the uapi file):
//!
//! | field      | written by | read by  | ordering                         |
//! |------------|------------|----------|----------------------------------|
//! | slots      | producer   | consumer | published by `producer` Release  |
//! | `producer` | producer   | both     | store Release / load Acquire     |
//! | `consumer` | consumer   | both     | store Release / load Acquire     |
//! | `overflows`, `flags` | producer | consumer | Relaxed counters        |
//!
//! The consumer never writes a producer-owned field: it notices overflow by
//! comparing `overflows` with the count it last handled.

#[allow(non_camel_case_types, dead_code, clippy::all)]
pub mod generated;
/// bindgen's rendering of `cbt-module/include/uapi/ferry_cbt_ioctl.h`, the
/// kernel module's control ioctls (see [`ioctl`] for the request numbers,
/// which bindgen cannot render from the `_IOWR` macros).
#[allow(non_camel_case_types, dead_code, clippy::all)]
pub mod generated_ioctl;
mod ring;

/// The request numbers of `/dev/ferry-cbt`'s ioctls, encoded as Linux's
/// `_IOW`/`_IOWR` do (direction << 30 | size << 16 | type << 8 | number);
/// `tests/ioctl_abi.rs` compares them with the C header's.
pub mod ioctl {
    use super::generated_ioctl as g;
    use std::mem::size_of;

    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | ((g::FERRY_CBT_IOC_MAGIC as u64) << 8) | nr
    }
    const WRITE: u64 = 1;
    const READ_WRITE: u64 = 3;
    pub const ATTACH: u64 = ioc(READ_WRITE, 0x01, size_of::<g::ferry_cbt_attach>());
    pub const DETACH: u64 = ioc(WRITE, 0x02, size_of::<g::ferry_cbt_detach>());
    pub const STATUS: u64 = ioc(READ_WRITE, 0x03, size_of::<g::ferry_cbt_status>());
    pub const TAG: u64 = ioc(READ_WRITE, 0x04, size_of::<g::ferry_cbt_tag>());
    pub const SET_CAP: u64 = ioc(READ_WRITE, 0x05, size_of::<g::ferry_cbt_cap>());
    pub const CATCHUP: u64 = ioc(READ_WRITE, 0x06, size_of::<g::ferry_cbt_catchup>());
    pub const GROUP_TAG: u64 = ioc(READ_WRITE, 0x07, size_of::<g::ferry_cbt_group_tag>());
}

const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_attach>() == 88);
const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_cap>() == 16);
const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_group_tag>() == 112);
const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_catchup>() == 72);
const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_detach>() == 8);
const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_status>() == 184);
const _: () = assert!(std::mem::size_of::<generated_ioctl::ferry_cbt_tag>() == 32);

pub use ring::{IndexMath, Ring, RingError};

use generated::ferry_cbt_record;

const _: () = assert!(std::mem::size_of::<generated::ferry_cbt_record>() == 32);
const _: () = assert!(std::mem::size_of::<generated::ferry_cbt_ring_header>() == 4096);

/// What a record says happened to its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Write,
    Discard,
    WriteZeroes,
    Tag,
    /// The kernel module left bitmap mode here (`FERRY_REC_CATCHUP`).
    Catchup,
}

/// One validated dirty-extent record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub offset: u64,
    pub length: u32,
    pub kind: RecordKind,
    /// The write carried a preflush or FUA.
    pub flush: bool,
    /// The payload is in the ring's data area (`FERRY_RECF_DATA`).
    pub data: bool,
    /// A consistency group's tag (`FERRY_RECF_GROUP`); `offset` is the cut id.
    pub group: bool,
    pub time_ns: u64,
}

/// A raw record that does not describe anything valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid tracker record (seq {seq}): {why}")]
pub struct BadRecord {
    pub seq: u64,
    pub why: &'static str,
}

impl TryFrom<ferry_cbt_record> for Record {
    type Error = BadRecord;
    fn try_from(r: ferry_cbt_record) -> Result<Self, BadRecord> {
        let bad = |why| BadRecord { seq: r.seq, why };
        let kind = match u32::from(r.kind) {
            generated::FERRY_REC_WRITE => RecordKind::Write,
            generated::FERRY_REC_DISCARD => RecordKind::Discard,
            generated::FERRY_REC_WRITE_ZEROES => RecordKind::WriteZeroes,
            generated::FERRY_REC_TAG => RecordKind::Tag,
            generated::FERRY_REC_CATCHUP => RecordKind::Catchup,
            _ => return Err(bad("unknown kind")),
        };
        let marker = matches!(kind, RecordKind::Tag | RecordKind::Catchup);
        if marker && r.length != 0 {
            return Err(bad("marker with a length"));
        }
        if !marker && r.length == 0 {
            return Err(bad("empty extent"));
        }
        let data = u32::from(r.flags) & generated::FERRY_RECF_DATA != 0;
        if data && kind != RecordKind::Write {
            return Err(bad("payload on a record that is not a write"));
        }
        let group = u32::from(r.flags) & generated::FERRY_RECF_GROUP != 0;
        if group && kind != RecordKind::Tag {
            return Err(bad("group flag on a record that is not a tag"));
        }
        if r.offset.checked_add(u64::from(r.length)).is_none() {
            return Err(bad("extent overflows"));
        }
        Ok(Record {
            seq: r.seq,
            offset: r.offset,
            length: r.length,
            kind,
            flush: u32::from(r.flags) & generated::FERRY_RECF_FLUSH != 0,
            data,
            group,
            time_ns: r.time_ns,
        })
    }
}

impl From<Record> for ferry_cbt_record {
    fn from(r: Record) -> Self {
        let kind = match r.kind {
            RecordKind::Write => generated::FERRY_REC_WRITE,
            RecordKind::Discard => generated::FERRY_REC_DISCARD,
            RecordKind::WriteZeroes => generated::FERRY_REC_WRITE_ZEROES,
            RecordKind::Tag => generated::FERRY_REC_TAG,
            RecordKind::Catchup => generated::FERRY_REC_CATCHUP,
        };
        let mut flags = if r.flush { generated::FERRY_RECF_FLUSH } else { 0 };
        if r.data {
            flags |= generated::FERRY_RECF_DATA;
        }
        if r.group {
            flags |= generated::FERRY_RECF_GROUP;
        }
        ferry_cbt_record { seq: r.seq, offset: r.offset, length: r.length, kind: kind as u16, flags: flags as u16, time_ns: r.time_ns }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_validation() {
        let ok = Record { seq: 1, offset: 4096, length: 512, kind: RecordKind::Write, flush: true, data: false, group: false, time_ns: 9 };
        assert_eq!(Record::try_from(ferry_cbt_record::from(ok)), Ok(ok));
        let mut raw = ferry_cbt_record::from(ok);
        raw.kind = 99;
        assert!(Record::try_from(raw).is_err());
        raw = ferry_cbt_record::from(ok);
        raw.length = 0;
        assert!(Record::try_from(raw).is_err());
        raw = ferry_cbt_record::from(ok);
        raw.offset = u64::MAX;
        assert!(Record::try_from(raw).is_err());
    }
}
