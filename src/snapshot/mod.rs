//! Snapshots: point-in-time, read-only views of the whole pool, stored as full,
//! incremental or differential backups made of zstd-compressed block deltas.
//!
//! - [`delta`]: the delta file of one file in one snapshot (format and I/O).
//! - [`flatten`]: resolution of a block through a chain of deltas.
//! - [`ranges`]: sets of block ranges (pending blocks, changed intervals).
//! - [`store`]: snapshot records, creation with copy-before-write, the
//!   background capture, reading through a cached chain index, deletion with
//!   merge or fold.
//! - [`prune`]: which snapshots the keep rules delete.
pub mod capture;
pub mod delta;
pub mod flatten;
pub mod maintenance;
pub mod merge;
pub mod prune;
pub mod ranges;
pub mod read;
pub mod record;
pub mod store;

pub use capture::*;
pub use prune::PrunePolicy;
pub use record::*;
pub use store::*;
