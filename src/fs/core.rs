//! What a mounted filesystem is: [`Vfs`], the state both views and the
//! commands share, and the types its operations speak ([`Attr`], [`SetAttr`],
//! [`DirEntry`], ...). It knows nothing of FUSE: the adapter calls the
//! operations (`route.rs`) and maps [`crate::error::FsError`] to errnos.
//!
//! The live tree is served by `Live`, a view of the `Vfs` whose methods
//! (`namespace.rs`, `handles.rs`, `data.rs`) see live inodes and handles only:
//! the route sends everything else to the snapshot view (`snapview.rs`).
//! Every field below is taken in the lock order of `fs/mod.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::{Mutex, RwLock};

use super::handles::Handle;
use super::node::Namespace;
use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::meta::{NodeKind, Timestamp};
use crate::snapshot::SnapshotStore;

/// Largest file size: keeps every offset arithmetic far from overflow.
pub const MAX_FILE_SIZE: u64 = 1 << 60;
pub const NAME_MAX: usize = 255;
pub(crate) const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Extended attributes of one inode, at most: their count, and the bytes of
/// their names and values together. They live in the inode's metadata record,
/// rewritten on every change to the inode and held in memory while mounted;
/// like ext4 (whose limit is a block, 4 KiB, without `ea_inode`) the space is
/// bounded, only more generously. Past either, `setxattr` fails with ENOSPC.
pub const XATTR_MAX_COUNT: usize = 256;
pub const XATTR_MAX_BYTES: usize = 256 * 1024;

/// Attributes as the adapter reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// 512-byte blocks really allocated.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct VfsOptions {
    pub read_only: bool,
    /// List `.snapshots` in the root directory (it is always reachable by name).
    pub snapdir_visible: bool,
}

/// Who is asking (for ownership of new nodes).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: Vec<u8>,
}

/// The kernel's caches of a mounted filesystem, for changes the daemon makes
/// on its own (restore, clone) that the kernel did not see pass.
pub trait KernelCache: Send + Sync {
    fn inval_inode(&self, ino: u64);
    /// Drops the kernel's cached attributes of `ino` (not its pages): for
    /// attributes the daemon changed while serving a request that does not
    /// return them (set-id bits a write cleared, the allocation an fsync
    /// made visible). Safe from a thread serving a request.
    fn inval_attr(&self, ino: u64);
    /// Makes the kernel write back (and drop) its cached pages of `ino` from
    /// byte `from` on. Must not be called from a thread serving a request.
    fn write_back(&self, ino: u64, from: u64);
    fn inval_entry(&self, parent: u64, name: &[u8]);
}

/// A mounted pool's filesystem: both views, the commit and the commands.
pub struct Vfs {
    pub pool: Arc<Pool>,
    pub(crate) kernel: std::sync::OnceLock<Box<dyn KernelCache>>,
    pub(crate) opts: VfsOptions,
    /// The live namespace and inode table (`node.rs`).
    pub(crate) ns: RwLock<Namespace>,
    /// Taken for reading around every change to file data or size, for writing
    /// by a commit (to move the intent tag and take the changed-block bitmaps at
    /// one instant) and by a snapshot's freeze.
    pub(crate) gate: RwLock<()>,
    pub snaps: Arc<SnapshotStore>,
    /// Open files and directories of the live view (`handles.rs`).
    pub(crate) handles: RwLock<HashMap<u64, Arc<Handle>>>,
    pub(crate) next_fh: AtomicU64,
    /// Open files and directories of the snapshot view (`snapview.rs`).
    pub(crate) snap_handles: super::snapview::SnapHandles,
    /// One commit at a time (`commit.rs`).
    pub(crate) commit_lock: Mutex<()>,
    /// Members whose data directory gained entries (extent or sum files)
    /// that no directory sync has covered yet: a commit that failed after
    /// creating files leaves them to the next one (invariant 1).
    pub(crate) dirs_unsynced: Mutex<HashSet<u32>>,
    /// Generation of the last commit tried.
    pub(crate) generation: AtomicU64,
    /// Commits that removed extent files (space freed): a writer that met
    /// ENOSPC retries once another writer's commit freed space meanwhile.
    pub(crate) freed: AtomicU64,
    /// Long jobs running (see jobs.rs).
    pub jobs: super::jobs::Jobs,
}

/// The live tree of a [`Vfs`]: the operations on live inodes and handles.
/// It dereferences to the `Vfs`, whose state it works on.
#[derive(Clone, Copy)]
pub(crate) struct Live<'a>(&'a Vfs);

impl std::ops::Deref for Live<'_> {
    type Target = Vfs;

    fn deref(&self) -> &Vfs {
        self.0
    }
}

impl Vfs {
    /// The live view (only the route and the commands need to name it).
    pub(crate) fn live(&self) -> Live<'_> {
        Live(self)
    }

    /// See [`KernelCache::write_back`].
    pub fn write_back_kernel(&self, ino: u64, from: u64) {
        if let Some(k) = self.kernel.get() {
            k.write_back(ino, from);
        }
    }

    /// See [`KernelCache::inval_attr`].
    pub fn inval_kernel_attr(&self, ino: u64) {
        if let Some(k) = self.kernel.get() {
            k.inval_attr(ino);
        }
    }

    /// Connects the kernel's caches (the FUSE adapter does, once mounted).
    pub fn set_kernel_cache(&self, k: Box<dyn KernelCache>) {
        let _ = self.kernel.set(k);
    }

    pub(crate) fn writable(&self) -> FsResult<()> {
        if self.opts.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The time for timestamps (the storage's clock: the simulator's is
    /// virtual, so that a seed replays byte for byte).
    pub(crate) fn now(&self) -> Timestamp {
        Timestamp::at(self.pool.storage().now())
    }
}
