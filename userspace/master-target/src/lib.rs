//! ferry master target: holds replicas of protected disks, with an undo
//! journal and a catalog of recovery points, and materializes any point.
//!
//! - [`server`]: the network side (wire protocol v1, docs/protocol.md).
//! - [`disk`]: one disk folder and the durable batch apply.
//! - [`journal`]: the undo journal format and its crash repair.
//! - [`catalog`]: the recovery point catalog.
//! - [`recover`]: listing and materializing points with no server running.
//! - [`view`]: a point read in place while replication goes on.
//! - [`nbd`]: `ferry export`, a point served over NBD.
//! - [`failover`]: `ferry failover`: stop the stream, hand over a point.
//! - [`retention`]: which points a disk keeps; journal space reclaimed.
//! - [`sums`]: chunk checksums of the replica and its durable mark.
//! - [`verify`]: `ferry verify` (scrub) and the master target's view of a disk.
//! - [`reserve`]: space kept back so metadata writes work on a full filesystem.
//! - [`repair`]: `ferry repair`, a damaged folder rebuilt keeping what it can.
//!
//! Crash ordering of one batch (the invariant "undo before overwrite"):
//!
//! | step | what                                    | durable by         |
//! |------|-----------------------------------------|--------------------|
//! | 1    | pre-images appended to the journal (first overwrite since the last point) or the batch journal (later ones) | journal (+ batch) fdatasync |
//! | 2    | replica ranges overwritten              | replica fdatasync  |
//! | 3    | COMMIT(seq) appended                    | journal fdatasync  |
//! | 4    | sums of the touched chunks, then the mark (seq, journal end) | sums fdatasync |
//! | 5    | points for the batch's TAGs appended    | catalog fdatasync  |
//! | 6    | ACK(seq) sent                           | —                  |
//!
//! A crash before 3 is rolled back at the next start from the journal; a
//! crash between 3 and 4 leaves that batch's chunks to be hashed again at
//! the next start (sums.rs); a crash between 4 and 5 loses only the point
//! records of that batch (their data is durable; the agent, seeing no POINT,
//! tags again).
//!
//! Formats: docs/formats.md.

pub mod catalog;
pub mod disk;
pub mod failover;
pub mod journal;
pub mod nbd;
pub mod recover;
pub mod repair;
pub mod reserve;
pub mod retention;
pub mod server;
pub mod sums;
pub mod verify;
pub mod view;
