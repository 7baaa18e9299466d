//! Snapshots: point-in-time, read-only views of the whole pool, stored as full,
//! incremental or differential backups made of zstd-compressed block deltas.
//!
//! - [`delta`]: the delta file of one file in one snapshot (format and I/O).
//! - [`flatten`]: resolution of a block through a chain of deltas.
//! - [`ranges`]: sets of block ranges (pending blocks, changed intervals).
//! - [`record`]: a snapshot's record, its invariants, where its deltas live.
//! - [`store`]: the store of every snapshot: load, recovery, commits.
//! - [`capture`]: creation, the background capture, copy-before-write.
//! - [`compress`]: frames compressed with a zstd context kept per thread;
//!   frames whose sample does not shrink written as raw zstd blocks.
//! - [`read`]: reading through a cached chain index.
//! - [`merge`]: deletion, merging each child into its parent's parent.
//! - [`maintenance`]: placement of delta copies, scrub, check, prune list.
//! - [`prune`]: which snapshots the keep rules delete.
//! - [`send`]: a snapshot seen from outside: file runs, changed blocks,
//!   identity, the send stream.
//! - [`receive`]: a stream applied as a new snapshot.
pub mod capture;
pub mod compress;
pub mod delta;
pub mod flatten;
pub mod maintenance;
pub mod merge;
pub mod prune;
pub mod ranges;
pub mod read;
pub mod receive;
pub mod record;
pub mod send;
pub mod store;

pub use capture::*;
pub use prune::PrunePolicy;
pub use record::*;
pub use store::*;
