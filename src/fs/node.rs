//! The live inode table: a [`Node`] per inode, and the [`Namespace`] that
//! holds the nodes, the directory entries and what awaits the next commit.
//!
//! Invariants:
//! - Every directory has a `children` map (empty when empty); nothing else has one.
//! - A node is in `nodes` while it has a link or an open handle (`open > 0`);
//!   it is freed ([`Namespace::free`]) when the last of both goes, and then
//!   its extent files and bitmaps wait in `dead_extents`/`dead_cbt` for the
//!   commit that no longer references them (invariant 3 of `commit.rs`).
//! - Every change to an entry goes through [`Namespace::set_entry`], so
//!   `dirent_changes` holds exactly the entries the next commit must write.
//! - `Node::meta` is taken under `ns` or alone, never the other way round
//!   (the lock order is in `fs/mod.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::{FsError, FsResult};
use crate::pool::meta::{InodeRecord, NodeKind, Timestamp};
use crate::volume::{DeadExtent, Volume};

/// One inode's attributes, under [`Node::meta`].
pub(crate) struct NodeMeta {
    pub(crate) kind: NodeKind,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) nlink: u32,
    pub(crate) size: u64,
    pub(crate) atime: Timestamp,
    pub(crate) mtime: Timestamp,
    pub(crate) ctime: Timestamp,
    pub(crate) rdev: u32,
    /// The parent of a directory (0 for other kinds: they may have several).
    pub(crate) parent: u64,
    pub(crate) target: Vec<u8>,
    pub(crate) xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl NodeMeta {
    /// The attributes of a committed record.
    pub(crate) fn of_record(rec: &InodeRecord) -> NodeMeta {
        NodeMeta {
            kind: rec.kind,
            mode: rec.mode,
            uid: rec.uid,
            gid: rec.gid,
            nlink: rec.nlink,
            size: rec.size,
            atime: rec.atime,
            mtime: rec.mtime,
            ctime: rec.ctime,
            rdev: rec.rdev,
            parent: rec.parent,
            target: rec.target.clone(),
            xattrs: rec.xattrs.clone(),
        }
    }
}

/// What a new node is made of (`mode`: permission bits only).
pub(crate) struct NewNode {
    pub(crate) kind: NodeKind,
    pub(crate) mode: u32,
    pub(crate) rdev: u32,
    pub(crate) target: Vec<u8>,
}

pub(crate) struct Node {
    pub(crate) ino: u64,
    pub(crate) meta: Mutex<NodeMeta>,
    pub(crate) volume: Option<Arc<Volume>>,
    /// Changed since the last commit.
    pub(crate) dirty: AtomicBool,
    /// Size in the last durable commit (fdatasync needs no commit while it holds).
    pub(crate) committed_size: AtomicU64,
    /// Open handles (files and directories).
    pub(crate) open: AtomicU32,
}

impl Node {
    /// A node as the metadata has it, or a new one (`committed_size`
    /// `u64::MAX`: never committed).
    pub(crate) fn new(
        ino: u64,
        meta: NodeMeta,
        volume: Option<Arc<Volume>>,
        dirty: bool,
        committed_size: u64,
    ) -> Node {
        Node {
            ino,
            meta: Mutex::new(meta),
            volume,
            dirty: AtomicBool::new(dirty),
            committed_size: AtomicU64::new(committed_size),
            open: AtomicU32::new(0),
        }
    }

    pub(crate) fn record(&self) -> InodeRecord {
        let m = self.meta.lock();
        InodeRecord {
            kind: m.kind,
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            nlink: m.nlink,
            size: m.size,
            atime: m.atime,
            mtime: m.mtime,
            ctime: m.ctime,
            rdev: m.rdev,
            parent: m.parent,
            target: m.target.clone(),
            xattrs: m.xattrs.clone(),
            extents: self
                .volume
                .as_ref()
                .map(|v| v.records())
                .unwrap_or_default(),
        }
    }

    pub(crate) fn touch(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    pub(crate) fn kind(&self) -> NodeKind {
        self.meta.lock().kind
    }
}

#[derive(Default)]
pub(crate) struct Namespace {
    /// Ordered: every walk over the files (commit, recovery, scrub) does
    /// its member I/O in one order, which the simulator replays.
    pub(crate) nodes: BTreeMap<u64, Arc<Node>>,
    pub(crate) children: BTreeMap<u64, BTreeMap<Vec<u8>, u64>>,
    pub(crate) next_ino: u64,
    /// Directory entries changed since the last commit (`None`: removed).
    pub(crate) dirent_changes: BTreeMap<(u64, Vec<u8>), Option<u64>>,
    /// Inodes removed since the last commit.
    pub(crate) deleted: BTreeSet<u64>,
    /// Extent files to remove after the next durable commit.
    pub(crate) dead_extents: Vec<DeadExtent>,
    /// Changed-block bitmaps of removed files, deleted by the next commit.
    pub(crate) dead_cbt: Vec<(u64, u64)>,
}

impl Namespace {
    pub(crate) fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
        self.nodes.get(&ino).cloned().ok_or(FsError::NotFound)
    }

    pub(crate) fn dir(&self, ino: u64) -> FsResult<&BTreeMap<Vec<u8>, u64>> {
        match self.children.get(&ino) {
            Some(d) => Ok(d),
            None if self.nodes.contains_key(&ino) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    /// Entries, removed inodes or dead extent files await a commit.
    pub(crate) fn namespace_pending(&self) -> bool {
        !self.dirent_changes.is_empty()
            || !self.deleted.is_empty()
            || !self.dead_extents.is_empty()
            || !self.dead_cbt.is_empty()
    }

    pub(crate) fn set_entry(&mut self, parent: u64, name: &[u8], child: Option<u64>) {
        let dir = self.children.entry(parent).or_default();
        match child {
            Some(c) => {
                dir.insert(name.to_vec(), c);
            }
            None => {
                dir.remove(name);
            }
        }
        self.dirent_changes.insert((parent, name.to_vec()), child);
    }

    /// Frees a node that lost its last link, unless a handle still holds it
    /// open (its last release frees it): an open directory replaced by
    /// `rename` or removed still answers `fstat`, with no links.
    pub(crate) fn free_unless_open(&mut self, node: &Node) {
        if node.open.load(Ordering::Acquire) == 0 {
            self.free(node.ino);
        }
    }

    /// Drops a node whose last link and last handle are gone.
    pub(crate) fn free(&mut self, ino: u64) {
        if let Some(n) = self.nodes.remove(&ino) {
            if let Some(v) = &n.volume {
                self.dead_extents.extend(v.all_files());
                self.dead_cbt
                    .extend(v.cbt_indexes().into_iter().map(|i| (ino, i)));
            }
            self.children.remove(&ino);
            self.deleted.insert(ino);
        }
    }

    /// Whether `ino` is `ancestor` or lies below it.
    pub(crate) fn is_within(&self, mut ino: u64, ancestor: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == crate::pool::meta::ROOT_INO {
                return false;
            }
            match self.nodes.get(&ino) {
                Some(n) => ino = n.meta.lock().parent,
                None => return false,
            }
        }
    }
}
