//! Plumbing shared by every ferry role.
//!
//! - [`durable`]: crash-safe file replacement (temp + fsync + rename + fsync of
//!   the directory) and the checksummed state-file format used by the agent's
//!   `--state DIR` and the master target's `disk.meta`.
//! - [`source`]: opening a protected disk (block device or image file), its
//!   size, and positioned reads with `O_DIRECT` where the source allows it.
//! - [`buf`]: page-aligned buffers for direct I/O.
//! - [`net`]: command-line addresses and the listening policy.
//! - [`control`]: the configuration server's heartbeat answer (policy, jobs).
//! - [`report`]: what a running role says of itself (its `/metrics` and heartbeat).
//! - [`metrics_http`]: the `/metrics` endpoint (`--metrics ADDR`).
//! - [`health`]: OK, WARN or CRIT, as status views say it.
//! - [`units`]: sizes and times as people read them (output), and sizes as
//!   they write them (flags).
//! - [`testing`]: the test and benchmark switches (environment variables),
//!   read once, apart from the production configuration.
//!
//! All `unsafe` in this crate lives in `buf`, `source` and `net`, each block
//! with a `SAFETY:` note.

pub mod buf;
pub mod control;
pub mod durable;
pub mod health;
pub mod metrics_http;
pub mod net;
pub mod report;
pub mod source;
pub mod testing;
pub mod units;

/// `e` with "(run as root)" after its text when it is a permission error
/// (EACCES, EPERM): opening a block device or a tracker needs root. Other
/// errors are returned as they are.
pub fn root_hint(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        std::io::Error::new(e.kind(), format!("{e} (run as root)"))
    } else {
        e
    }
}

/// xxh3-128 of `data`, as the 16 little-endian bytes used on disk and on the wire.
pub fn xxh128(data: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// True when every byte of `data` is zero (fast path on 16-byte words).
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the slice, leaving unaligned bytes to the ends.
        unsafe { data.align_to::<u128>() }
    };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

/// Current wall-clock time in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 1, 15, 16, 2048, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&v[3..]));
    }
}
