//! vpool: pool several directories (or disks) into one FUSE filesystem whose
//! regular files are block-mapped volume images striped in extents across the
//! members.
//!
//! Layers, top to bottom; each looks only down:
//! - [`cli`]: the command line; talks to the library or to a running daemon.
//! - [`check`]: `vpool check`, the offline check of a whole pool (the pool's
//!   checks, then the snapshots').
//! - [`daemon`], [`control`], [`hooks`], [`kernel`]: the mounted daemon,
//!   its admin socket, its event hooks, and the request size and readahead
//!   it asks of the kernel.
//! - [`fs`]: the POSIX view (namespace, handles, `.snapshots`, long jobs) and
//!   the thin `fuser` adapter (`fs::fuse`, the only user of `fuser` with
//!   `daemon`).
//! - [`snapshot`]: snapshot records, delta files, capture, chain reads,
//!   merge, prune rules.
//! - [`volume`]: a file's extent map and its read/write/punch/seek path.
//! - [`pool`]: members, their labels, the metadata store, placement, space,
//!   the operational record.
//! - [`stream`]: the send stream's format, and restoring or checking
//!   streams without a pool (below [`snapshot`], which writes and reads it).
//! - [`storage`]: the seam every member file goes through (the host
//!   filesystem, or the simulated disk in tests).
//! - [`error`], [`bytes`], [`util`]: errors and their errno table, bounded
//!   decoding, small helpers; used by all.
//!
//! The storage core ([`pool`], [`volume`], [`snapshot`], [`fs::core`]) never
//! imports `fuser` or `clap`.

pub mod bytes;
pub mod check;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod error;
pub mod export;
pub mod fs;
pub mod hooks;
pub mod kernel;
pub mod pool;
pub mod snapshot;
pub mod storage;
pub mod stream;
pub mod util;
pub mod volume;

pub use error::{Error, Result};
