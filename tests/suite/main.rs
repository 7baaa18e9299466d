//! The integration tests, one test binary with a module per subject.
//!
//! One binary rather than a crate per file: the shared helpers (`common`,
//! about 3000 lines) were compiled and linked once per file, twenty times,
//! and each binary's slowest test ran alone at its end while the other core
//! waited. Run one subject with a filter: `cargo test --release --features
//! fault-injection --test suite sim::`. `tests/fuzz_parsers.rs` stays its
//! own binary: it installs a counting global allocator.

#[macro_use]
mod common;

mod clients;
mod crash_and_limits;
mod degraded;
mod export;
mod export_ceph;
mod faults;
mod formats;
mod hypervisor;
mod integrity;
mod members;
mod model;
mod ops;
mod posix;
mod security;
mod sim;
mod snapshot_model;
mod snapshots;
mod transfer;
mod units;
