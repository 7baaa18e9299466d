//! Pools in temporary directories for the unit tests of the filesystem.

use std::path::{Path, PathBuf};

use super::core::{Caller, Vfs, VfsOptions};
use crate::pool::{CreateOptions, Pool};

pub(crate) const ME: Caller = Caller { uid: 0, gid: 0 };

/// A pool of `n` members with extents of `esize` bytes.
pub(crate) fn setup(n: usize, esize: u64) -> (tempfile::TempDir, Vec<PathBuf>) {
    setup_with(
        n,
        CreateOptions {
            extent_size: esize,
            ..Default::default()
        },
    )
}

pub(crate) fn setup_with(n: usize, opts: CreateOptions) -> (tempfile::TempDir, Vec<PathBuf>) {
    let d = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..n)
        .map(|i| {
            let p = d.path().join(format!("m{i}"));
            std::fs::create_dir(&p).unwrap();
            p
        })
        .collect();
    Pool::create(&dirs, opts).unwrap();
    (d, dirs)
}

pub(crate) fn open(dir: &Path) -> Vfs {
    open_with(dir, VfsOptions::default())
}

pub(crate) fn open_with(dir: &Path, opts: VfsOptions) -> Vfs {
    Vfs::mount(Pool::open(dir).unwrap(), opts).unwrap()
}
