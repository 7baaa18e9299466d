//! Reference-model test of the storage core (no mount).
//!
//! Random sequences of operations run against the filesystem core and
//! against a plain in-memory model (`common::model`, which says what is
//! compared and when):
//! - file data: writes, truncates, punches, zero-ranges, copy_file_range;
//! - names: create, unlink, mkdir, rmdir, rename of files and directories
//!   (over files, over empty and non-empty directories, into
//!   subdirectories, into themselves), hard links; every directory's listing
//!   and every node's link count are compared;
//! - attributes: chmod, setxattr (plain, create, replace), removexattr;
//! - durability: fsync, fdatasync, commits, clean remounts, and unclean stops
//!   (the `Vfs` dropped without a commit, the pool mounted again from a
//!   member directory: what the last commit or a later fdatasync covered is
//!   there, the rest is the committed namespace);
//! - members: device add of a spare directory, device remove of a member
//!   (refused when fewer than `copies` would remain), in the middle of the
//!   sequence, with every file compared after.
//!
//! Each run ends with a remount, the online check and the offline check.
//! Shrunk failures are kept below as `regression_*` tests.
//! `PROPTEST_CASES=n` runs `n` cases instead of the default,
//! `VPOOL_MODEL_STEPS=n` sequences of up to `n` operations (default 40).

use crate::common;

use common::model::{FileOp, Harness, any_file_op, cases, noise, steps};
use proptest::prelude::*;

fn run(copies: u32, ops: &[FileOp]) {
    let mut h = Harness::new(copies, 4096);
    for op in ops {
        h.apply(op);
    }
    h.apply(&FileOp::Remount { member: 1 });
    h.close_and_check();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]
    #[test]
    fn core_matches_model(copies in 1..=2u32, ops in proptest::collection::vec(any_file_op(), 1..steps(40))) {
        run(copies, &ops);
    }
}

#[test]
fn regression_truncate_then_extend_reads_zeros() {
    run(
        1,
        &[
            FileOp::Write {
                p: 0,
                off: 0,
                len: 40_000,
                byte: 7,
            },
            FileOp::Truncate { p: 0, size: 10_000 },
            FileOp::Truncate { p: 0, size: 60_000 },
            FileOp::Remount { member: 0 },
        ],
    );
}

// ----- targeted tests -----

/// An unclean stop after a commit loses the later namespace changes,
/// modes and xattrs (the harness checks the bytes), and brings back the
/// committed state.
#[test]
fn unclean_stop_brings_back_the_committed_state() {
    let mut h = Harness::new(1, 4096);
    h.write("a", 0, &noise(1, 50_000));
    h.mkdir("c");
    h.write("c/a", 10_000, &noise(2, 30_000));
    h.link("c/a", "b");
    h.setxattr("c", "user.a", b"kept", 0);
    h.commit();
    let committed = h.model.paths();
    h.rename("a", "c/b", 0);
    h.write("c/a", 0, &noise(3, 60_000));
    h.unlink("b");
    h.mkdir("d");
    h.chmod("c/a", 0o600);
    h.setxattr("c", "user.a", b"lost", 0);
    h.verify_all();
    h.crash(1);
    assert_eq!(h.model.paths(), committed);
    assert_eq!(
        h.model.nodes[&h.model.resolve("c").unwrap()].xattrs.len(),
        1
    );
    h.close_and_check();
}

/// What fdatasync covered survives an unclean stop, whether it committed
/// (a size changed) or only flushed data (overwrites of committed extents).
#[test]
fn fdatasync_then_unclean_stop() {
    for grow in [false, true] {
        let mut h = Harness::new(2, 4096);
        h.write("a", 0, &noise(4, 80_000));
        h.write("b", 0, &noise(5, 20_000));
        h.commit();
        let new = noise(6, 30_000);
        let off = if grow { 70_000 } else { 1_000 };
        h.write("a", off, &new);
        h.fsync("a", true);
        h.crash(0);
        let a = h.model.file("a").unwrap();
        assert_eq!(a.len(), if grow { 100_000 } else { 80_000 });
        assert!(
            a[off as usize..][..new.len()] == new[..],
            "fdatasync'd bytes lost"
        );
        h.close_and_check();
    }
}

/// fsync commits every pending change of the pool, names included.
#[test]
fn fsync_then_unclean_stop_keeps_every_change() {
    let mut h = Harness::new(1, 4096);
    h.mkdir("c");
    h.write("c/a", 0, &noise(7, 40_000));
    h.write("a", 0, &noise(8, 10_000));
    h.chmod("c", 0o700);
    h.fsync("a", false);
    let synced = h.model.paths();
    h.crash(1);
    assert_eq!(h.model.paths(), synced);
    h.close_and_check();
}
