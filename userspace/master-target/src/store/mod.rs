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

#[cfg(test)]
mod tests;

pub use disk::{Disk, Op, OpenInfo};
pub use folder::{DiskError, Meta, Paths};
