//! The datastore: disk folders on a filesystem, with no network. Everything
//! a master target keeps of a disk, and everything that reads it back
//! (`ferry points`, `recover`, `export`'s view, `verify`, `repair`,
//! `retention`) works here, with or without a master target running.
//!
//! Layers, each using only the ones above it (no module imports one below
//! it, so there is no import circle):
//!
//! | layer | modules | what |
//! |-------|---------|------|
//! | formats | [`journal`], [`catalog`], [`ranges`], [`reserve`] | the undo journal, the point catalog, byte-range sets and holes, space kept back |
//! | folder | [`folder`], [`lock`], [`sums`] | a folder's paths, metadata and errors; its locks as typed guards; the replica's chunk sums |
//! | policy | [`failover`], [`retention`] | the failover state file (which refuses the stream); which points are kept, pins |
//! | durable state | [`settle`] | bringing a folder to its durable state (roll back, cut, re-hash) |
//! | writer | [`disk`] | a disk open for a stream: the durable batch apply |
//! | readers | [`recover`], [`view`], [`verify`], [`repair`] | materializing a point, reading one in place, scrubbing, rebuilding a damaged folder |
//!
//! Locks (lock.rs has the table of what excludes what): the writer lock
//! ([`lock::WriterLock`]), the recovery lock ([`lock::RecoveryLock`],
//! shared or exclusive) and the apply lock ([`lock::ApplyLock`]); taken in
//! that order.

pub mod access;
pub mod catalog;
pub mod journal;
pub mod ranges;
pub mod reserve;

pub mod folder;
pub mod lock;
pub mod sums;

pub mod failover;
pub mod retention;

pub mod settle;

pub mod disk;

pub mod recover;
pub mod repair;
pub mod verify;
pub mod view;

pub use disk::{Disk, Op, OpenInfo};
pub use folder::{DiskError, Meta, Paths};

#[cfg(test)]
mod tests;

/// The store's modules, each allowed to use only the ones before it (the
/// layers above; docs/architecture-mt.md).
#[cfg(test)]
const ORDER: &[(&str, &str)] = &[
    ("journal", include_str!("journal.rs")),
    ("catalog", include_str!("catalog.rs")),
    ("ranges", include_str!("ranges.rs")),
    ("reserve", include_str!("reserve.rs")),
    ("folder", include_str!("folder.rs")),
    ("lock", include_str!("lock.rs")),
    ("sums", include_str!("sums.rs")),
    ("failover", include_str!("failover.rs")),
    ("retention", include_str!("retention.rs")),
    ("settle", include_str!("settle.rs")),
    ("disk", include_str!("disk.rs")),
    ("recover", include_str!("recover.rs")),
    ("repair", include_str!("repair.rs")),
    ("verify", include_str!("verify.rs")),
    ("view", include_str!("view.rs")),
];

#[cfg(test)]
mod layering {
    /// The sibling modules `src` names (`super::x`, `super::{x, y}`), and
    /// `crate` for any path from the crate's root.
    fn refs(src: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in src.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            if line.contains("crate::") {
                out.push("crate".to_string());
            }
            let mut rest = line;
            while let Some(i) = rest.find("super::") {
                rest = &rest[i + "super::".len()..];
                if let Some(inner) = rest.strip_prefix('{') {
                    let end = inner.find('}').unwrap_or(inner.len());
                    out.extend(inner[..end].split(',').map(|p| p.trim().split("::").next().unwrap_or("").to_string()));
                } else {
                    out.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
                }
            }
        }
        out.retain(|r| !r.is_empty());
        out
    }

    /// No import circle, and nothing from outside the store: every module
    /// of the store uses only modules before it in `ORDER`.
    #[test]
    fn each_store_module_uses_only_the_layers_below_it() {
        let names: Vec<&str> = super::ORDER.iter().map(|(n, _)| *n).collect();
        // The reading sees grouped and nested imports.
        let disk = refs(super::ORDER[names.iter().position(|n| *n == "disk").expect("listed")].1);
        assert!(["folder", "settle", "retention", "ranges"].iter().all(|m| disk.iter().any(|r| r == m)), "{disk:?}");
        for (i, (name, src)) in super::ORDER.iter().enumerate() {
            for r in refs(src) {
                assert_ne!(r, "crate", "store::{name} uses a path from the crate's root (services or ops)");
                let j = names.iter().position(|n| *n == r).unwrap_or_else(|| panic!("store::{name} uses super::{r}, not a store module"));
                assert!(j < i, "store::{name} uses store::{r}, a layer above it: an import circle");
            }
        }
    }
}
