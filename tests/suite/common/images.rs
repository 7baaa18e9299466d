//! The image the export tests write and change: scattered data, allocated
//! zeros and holes, then rewrites, discards, new data and growth.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{KIB, MIB, fallocate, pattern};

/// Where the tests put the image in the pool.
pub const IMG: &str = "vm/disk.img";

/// Writes the first image: scattered data (one block, runs across cluster
/// and extent boundaries, the last block), allocated zeros, holes elsewhere.
pub fn write_first(p: &Path) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = File::create(p).unwrap();
    f.set_len(24 * MIB).unwrap();
    let parts: [(u64, usize); 7] = [
        (0, 4096),
        (60 * KIB, 8192),
        (MIB, 300 * 1024),
        (5 * MIB + 12 * KIB, 4096),
        (7 * MIB + 512 * KIB, 2 * MIB as usize),
        (20 * MIB + 64 * KIB, 64 * 1024),
        (24 * MIB - 4096, 4096),
    ];
    for (i, (off, len)) in parts.iter().enumerate() {
        f.write_all_at(&pattern(100 + i as u64, *len), *off)
            .unwrap();
    }
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 15 * MIB, 256 * KIB).unwrap();
    f.sync_all().unwrap();
}

/// Changes it: rewrites, discards (whole clusters and part of one), new data
/// in a hole, and growth.
pub fn change(p: &Path) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&pattern(200, 4096), MIB + 100 * KIB)
        .unwrap();
    f.write_all_at(&pattern(201, 4096), 64 * KIB).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(&f, punch, 7 * MIB + 576 * KIB, 256 * KIB).unwrap();
    fallocate(&f, punch, MIB + 200 * KIB, 8 * KIB).unwrap();
    fallocate(&f, punch, 0, 4096).unwrap();
    f.write_all_at(&pattern(202, 100 * 1024), 12 * MIB).unwrap();
    f.write_all_at(&pattern(203, 4096), 26 * MIB).unwrap();
    f.sync_all().unwrap();
}

/// A second change: a large discard and rewrites in it and elsewhere.
pub fn change_again(p: &Path) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(&f, punch, 6 * MIB, 4 * MIB).unwrap();
    f.write_all_at(&pattern(300, 8192), 8 * MIB).unwrap();
    f.write_all_at(&pattern(301, 4096), 20 * MIB + 64 * KIB)
        .unwrap();
    f.sync_all().unwrap();
}
