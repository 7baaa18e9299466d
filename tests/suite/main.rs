//! The integration tests, one test binary with a module per subject.
//!
//! One binary rather than a crate per file: the shared helpers (`common`,
//! about 3000 lines) are built and linked once instead of twenty times, and
//! the long tests (the simulation, fsx) run beside the others instead of
//! alone at the end of their own binary (the test step of a clean CI run:
//! 792 s before, 767 s after; the dependencies are most of the build). Run
//! one subject with a filter: `cargo test --profile ci --features
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
