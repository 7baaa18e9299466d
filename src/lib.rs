//! vpool: pool several directories (or disks) into one FUSE filesystem whose
//! regular files are block-mapped volume images striped in extents across the
//! members.
//!
//! Layers, each only looking down:
//! - [`cli`]: the command line; talks to the library or to a running daemon.
//! - [`control`]: the admin socket between the CLI and a mounted daemon.
//! - [`fs`]: the POSIX view (namespace, handles) and the thin `fuser` adapter.
//! - [`volume`]: a file's extent map and its read/write/punch/seek path.
//! - [`pool`]: members, their labels, the metadata store, placement, space.
//! - [`snapshot`]: snapshot records, delta files, capture, chain reads, merge.
//!
//! The storage core ([`pool`], [`volume`], [`fs::core`]) never imports `fuser`
//! or `clap`.

pub mod bytes;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod hooks;
pub mod pool;
pub mod snapshot;
pub mod storage;
pub mod util;
pub mod volume;

pub use error::{Error, Result};
