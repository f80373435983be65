//! ferry master target: holds replicas of protected disks, with an undo
//! journal and a catalog of recovery points, and materializes any point.
//!
//! Two layers, and the operations on top:
//!
//! - [`store`], the datastore (no network): a disk folder's files, locks,
//!   journal, catalog, sums, retention, the failover state; the durable
//!   batch apply ([`store::disk`]); recovery, the in-place view of a point,
//!   verify, repair. Its own note has its layers. It imports nothing from
//!   the services.
//! - the services, over the store:
//!   - [`server`]: the replication server (wire protocol, docs/protocol.md);
//!   - [`nbd`]: `ferry export`, a point's view served over NBD;
//!   - [`failover`]: stop a disk's stream and hand over a point.
//! - [`ops`]: the operations behind the CLI (and a configuration server's
//!   API next), each returning a serializable view; [`ops::render`] is the
//!   text the CLI prints of each.
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
//! the next start (store/sums.rs); a crash between 4 and 5 loses only the point
//! records of that batch (their data is durable; the agent, seeing no POINT,
//! tags again).
//!
//! Formats: docs/formats.md.

pub mod store;

pub mod failover;
pub mod nbd;
pub mod server;

pub mod ops;
