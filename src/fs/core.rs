//! The filesystem core: namespace, inode table, open handles and the commit of
//! metadata, on top of the pool and the volumes. It knows nothing of FUSE: the
//! adapter calls these methods and maps [`FsError`] to errnos.
//!
//! Concurrency: the namespace (`ns`) is one `RwLock`, taken for writing by
//! namespace changes and briefly by the committer; the data path never takes it
//! (a handle holds its `Arc<Node>`). Lock order: `commit_lock` -> `ns` ->
//! `Node::meta` -> volume map.
//!
//! Durability (the ordering invariants, also in docs/design.md):
//! 1. Data of dirty extents is fdatasynced, and the data directories that gained
//!    extent files are fsynced, before the metadata commit that references them.
//! 2. The metadata commit is one redb transaction per member, durable
//!    (`Durability::Immediate`) on every member before `fsync` returns.
//! 3. Extent files dropped by truncate, unlink, rename over a file or rmdir are removed only after a
//!    durable commit no longer references them.
//!
//! Commits happen on `fsync`/`fsyncdir`, every few seconds from the flusher
//! thread, and at unmount.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::snapview::{SNAPDIR_INO, SNAPDIR_NAME, is_snap};
use crate::error::{FsError, FsResult, Result};
use crate::pool::meta::{
    Batch, InodeRecord, NodeKind, ROOT_INO, Timestamp, check_blob, encode_blob, encode_record,
};
use crate::pool::{Pool, PoolSpace, PoolStatus};
use crate::snapshot::SnapshotStore;
use crate::volume::{DeadExtent, Volume};

/// Largest file size: keeps every offset arithmetic far from overflow.
pub const MAX_FILE_SIZE: u64 = 1 << 60;
pub const NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Extended attributes of one inode, at most: their count, and the bytes of
/// their names and values together. They live in the inode's metadata record,
/// rewritten on every change to the inode and held in memory while mounted;
/// like ext4 (whose limit is a block, 4 KiB, without `ea_inode`) the space is
/// bounded, only more generously. Past either, `setxattr` fails with ENOSPC.
pub const XATTR_MAX_COUNT: usize = 256;
pub const XATTR_MAX_BYTES: usize = 256 * 1024;
/// Extents changed this recently get intent records logged ahead by each
/// commit (see `prelog_hot_extents`). After a crash they are resynchronised
/// and counted changed, so longer means more work at mount, shorter more
/// writers waiting for an intent fdatasync.
const HOT_WINDOW_MS: u64 = 15_000;

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

struct NodeMeta {
    kind: NodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    atime: Timestamp,
    mtime: Timestamp,
    ctime: Timestamp,
    rdev: u32,
    parent: u64,
    target: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What a new node is made of (`mode`: permission bits only).
pub(crate) struct NewNode {
    pub(crate) kind: NodeKind,
    pub(crate) mode: u32,
    pub(crate) rdev: u32,
    pub(crate) target: Vec<u8>,
}

pub struct Node {
    pub ino: u64,
    meta: Mutex<NodeMeta>,
    pub(crate) volume: Option<Arc<Volume>>,
    /// Changed since the last commit.
    dirty: AtomicBool,
    /// Size in the last durable commit (fdatasync needs no commit while it holds).
    committed_size: AtomicU64,
    open: AtomicU32,
}

impl Node {
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

    pub fn kind(&self) -> NodeKind {
        self.meta.lock().kind
    }
}

#[derive(Default)]
pub(crate) struct Namespace {
    /// Ordered: every walk over the files (commit, recovery, scrub) does
    /// its member I/O in one order, which the simulator replays.
    pub(crate) nodes: BTreeMap<u64, Arc<Node>>,
    pub(crate) children: BTreeMap<u64, BTreeMap<Vec<u8>, u64>>,
    next_ino: u64,
    /// Directory entries changed since the last commit (`None`: removed).
    dirent_changes: BTreeMap<(u64, Vec<u8>), Option<u64>>,
    /// Inodes removed since the last commit.
    deleted: std::collections::BTreeSet<u64>,
    /// Extent files to remove after the next durable commit.
    pub(crate) dead_extents: Vec<DeadExtent>,
    /// Changed-block bitmaps of removed files, deleted by the next commit.
    dead_cbt: Vec<(u64, u64)>,
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
    fn namespace_pending(&self) -> bool {
        !self.dirent_changes.is_empty()
            || !self.deleted.is_empty()
            || !self.dead_extents.is_empty()
            || !self.dead_cbt.is_empty()
    }

    fn set_entry(&mut self, parent: u64, name: &[u8], child: Option<u64>) {
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

    /// Drops a node whose last link and last handle are gone.
    /// Frees a node that lost its last link, unless a handle still holds it
    /// open (its last release frees it): an open directory replaced by
    /// `rename` or removed still answers `fstat`, with no links.
    fn free_unless_open(&mut self, node: &Node) {
        if node.open.load(Ordering::Acquire) == 0 {
            self.free(node.ino);
        }
    }

    fn free(&mut self, ino: u64) {
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
}

pub(crate) enum Handle {
    File {
        node: Arc<Node>,
    },
    Dir {
        entries: Mutex<Vec<DirEntry>>,
        /// The directory (none for `.snapshots` views), kept while open.
        node: Option<Arc<Node>>,
    },
    /// A file of a snapshot (read-only).
    SnapFile {
        snap: u64,
        ino: u64,
    },
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
    /// Makes the kernel write back (and drop) its cached pages of `ino` from
    /// byte `from` on. Must not be called from a thread serving a request.
    fn write_back(&self, ino: u64, from: u64);
    fn inval_entry(&self, parent: u64, name: &[u8]);
}

pub struct Vfs {
    pub pool: Arc<Pool>,
    pub(crate) kernel: std::sync::OnceLock<Box<dyn KernelCache>>,
    pub(crate) opts: VfsOptions,
    pub(crate) ns: RwLock<Namespace>,
    /// Taken for reading around every change to file data or size, for writing
    /// by a commit (to move the intent tag and take the changed-block bitmaps at
    /// one instant) and by a snapshot's freeze. Lock order: `commit_lock` ->
    /// `gate` -> `ns` -> `Node::meta` -> volume map.
    pub(crate) gate: RwLock<()>,
    pub snaps: Arc<SnapshotStore>,
    pub(crate) handles: RwLock<HashMap<u64, Arc<Handle>>>,
    pub(crate) next_fh: AtomicU64,
    commit_lock: Mutex<()>,
    generation: AtomicU64,
    /// Commits that removed extent files (space freed): a writer that met
    /// ENOSPC retries once another writer's commit freed space meanwhile.
    freed: AtomicU64,
    /// Long jobs running (see jobs.rs).
    pub jobs: super::jobs::Jobs,
}

/// A changed-block bitmap as the metadata store keeps it.
fn encode_words(w: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(w.len() * 8);
    for x in w {
        b.extend_from_slice(&x.to_le_bytes());
    }
    encode_blob(&b)
}

/// Changes inside `.snapshots` are refused.
pub(crate) fn refuse_snap(inos: &[u64]) -> FsResult<()> {
    if inos.iter().any(|i| super::snapview::is_snap(*i)) {
        return Err(FsError::ReadOnly);
    }
    Ok(())
}

/// What a new entry's name may be. Besides `/` and NUL (which the kernel
/// never sends, but the admin socket could), control characters are refused:
/// a name with a newline or a terminal escape breaks listings and scripts of
/// every other user of a shared mount. Existing names are still found.
fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name
            .iter()
            .any(|b| *b == b'/' || crate::util::is_control(*b))
    {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Vfs {
    /// Loads the pool's metadata, removes what a crash left behind (orphan extent
    /// files, unlinked inodes), and returns the filesystem ready to serve.
    pub fn mount(mut pool: Pool, opts: VfsOptions) -> Result<Vfs> {
        let img = pool.load_metadata(!opts.read_only)?;
        let esize = pool.config().extent_size;
        let bs = pool.config().block_size as u64;
        let words = (esize / bs).div_ceil(64) as usize;
        let mut cbt: HashMap<u64, Vec<(u64, Vec<u64>)>> = HashMap::new();
        for ((ino, index), blob) in &img.cbt {
            let bits = match check_blob(blob) {
                Ok(p) if p.len() == words * 8 => p
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect(),
                _ => {
                    // A damaged bitmap over-reports: the whole extent counts as changed.
                    tracing::warn!(
                        ino,
                        index,
                        "changed-block bitmap damaged; marking the extent changed"
                    );
                    vec![u64::MAX; words]
                }
            };
            cbt.entry(*ino).or_default().push((*index, bits));
        }
        // Extents being changed at an unclean stop may differ from what the last
        // commit knows: they count as wholly changed.
        pool.intent_tag.store(img.generation + 1, Ordering::SeqCst);
        let suspects = pool.pending_intents(img.generation)?;
        if !suspects.is_empty() {
            tracing::info!(
                extents = suspects.len(),
                "extents were being written at an unclean stop"
            );
        }
        let mut ns = Namespace {
            next_ino: img.next_ino.max(ROOT_INO + 1),
            ..Default::default()
        };
        for (ino, rec) in &img.inodes {
            let volume = (rec.kind == NodeKind::File).then(|| {
                let v = Volume::new(
                    *ino,
                    esize,
                    bs,
                    &rec.extents,
                    cbt.remove(ino).unwrap_or_default(),
                );
                let per = esize / bs;
                for (_, index) in suspects.range((*ino, 0)..=(*ino, u64::MAX)) {
                    v.mark_blocks(index * per, (index + 1) * per);
                }
                Arc::new(v)
            });
            let node = Node {
                ino: *ino,
                meta: Mutex::new(NodeMeta {
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
                }),
                volume,
                dirty: AtomicBool::new(false),
                committed_size: AtomicU64::new(rec.size),
                open: AtomicU32::new(0),
            };
            if rec.kind == NodeKind::Dir {
                ns.children.insert(*ino, BTreeMap::new());
            }
            ns.nodes.insert(*ino, Arc::new(node));
            ns.next_ino = ns.next_ino.max(ino + 1);
        }
        for ((parent, name), child) in &img.dirents {
            ns.children
                .entry(*parent)
                .or_default()
                .insert(name.clone(), *child);
        }
        if !ns.nodes.contains_key(&ROOT_INO) {
            return Err(crate::Error::CorruptMetadata {
                path: pool.members()[0].dir.clone(),
                reason: "the root directory is missing".into(),
            });
        }
        let pool = Arc::new(pool);
        let (snaps, bad) = SnapshotStore::load(pool.clone(), &img.snapshots, img.next_snap_id);
        for (id, why) in bad {
            tracing::error!(snapshot = id, reason = %why, "snapshot record unreadable; it is left out (see vpool check)");
        }
        let vfs = Vfs {
            pool,
            kernel: std::sync::OnceLock::new(),
            opts,
            ns: RwLock::new(ns),
            gate: RwLock::new(()),
            snaps: Arc::new(snaps),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            commit_lock: Mutex::new(()),
            generation: AtomicU64::new(img.generation),
            freed: AtomicU64::new(0),
            jobs: Default::default(),
        };
        if !opts.read_only {
            vfs.recover(&suspects)?;
        }
        Ok(vfs)
    }

    /// Cleans up after an unclean stop: inodes left with no links (unlinked while
    /// open) are freed, and extent files no committed inode references are removed.
    fn recover(&self, suspects: &std::collections::BTreeSet<(u64, u64)>) -> Result<()> {
        let mut referenced: HashSet<(u32, String)> = HashSet::new();
        {
            let mut ns = self.ns.write();
            let orphans: Vec<u64> = ns
                .nodes
                .iter()
                .filter(|(ino, n)| **ino != ROOT_INO && n.meta.lock().nlink == 0)
                .map(|(ino, _)| *ino)
                .collect();
            for ino in orphans {
                tracing::info!(ino, "freeing inode unlinked before an unclean stop");
                ns.free(ino);
            }
            // A snapshot left pending is failed; its changes go back to the files.
            self.snaps.recover(|ino, s, e| {
                if let Some(v) = ns.nodes.get(&ino).and_then(|n| n.volume.as_ref()) {
                    v.mark_blocks(s, e);
                }
            });
            // Extents being written at the stop: make their copies agree and
            // their checksums match the data (the commit below writes them), before
            // anything reads them verified (the trim below does).
            let mut resynced = 0u64;
            for (ino, index) in suspects {
                if let Some(v) = ns.nodes.get(ino).and_then(|n| n.volume.as_ref()) {
                    match v.resync(&self.pool, *index) {
                        Ok(n) => resynced += n,
                        Err(e) => {
                            tracing::error!(ino, extent = index, error = %e, "cannot resynchronise an extent written at the stop")
                        }
                    }
                }
            }
            if !suspects.is_empty() {
                tracing::info!(
                    extents = suspects.len(),
                    blocks_copied = resynced,
                    "extents written at the unclean stop resynchronised"
                );
            }
            // Data written past the committed size before a crash must not show up
            // when the file is later extended: trim every file to its size.
            let mut trimmed = Vec::new();
            for n in ns.nodes.values() {
                if let Some(v) = &n.volume {
                    let size = n.meta.lock().size;
                    let dead = match v.truncate(&self.pool, size) {
                        Ok(d) => d,
                        Err(e) => {
                            // A copy that cannot be opened is reported by check and
                            // scrub; the mount goes on with the copies that can.
                            tracing::warn!(ino = n.ino, error = %e, "cannot trim data past the file size");
                            Vec::new()
                        }
                    };
                    if !dead.is_empty() {
                        n.touch();
                    }
                    trimmed.extend(dead);
                }
            }
            ns.dead_extents.extend(trimmed);
            // Live extents, and the files of freed inodes and trimmed extents (dead
            // extents, removed only after the commit below), are not orphans.
            let live = ns
                .nodes
                .values()
                .filter_map(|n| n.volume.as_ref())
                .flat_map(|v| v.all_files());
            for (m, ino, idx, fid) in live.chain(ns.dead_extents.iter().copied()) {
                referenced.insert((m, crate::pool::extent_file_name(ino, idx, fid)));
            }
        }
        let mut orphan_files = Vec::new();
        let mut present: HashSet<(u32, String)> = HashSet::new();
        for m in self.pool.members().iter() {
            let list = self
                .pool
                .list_extent_files(m)
                .map_err(|e| crate::Error::io(&m.data_dir, e))?;
            for f in list {
                if !f.sum {
                    present.insert((m.entry.id, f.name.clone()));
                }
                // A sum file goes with its extent file.
                if let Some((ino, idx, fid)) = f.parsed
                    && !referenced
                        .contains(&(m.entry.id, crate::pool::extent_file_name(ino, idx, fid)))
                    && !orphan_files.contains(&(m.entry.id, ino, idx, fid))
                {
                    orphan_files.push((m.entry.id, ino, idx, fid));
                }
            }
        }
        if !orphan_files.is_empty() {
            tracing::info!(
                count = orphan_files.len(),
                "removing extent files no inode references"
            );
        }
        let refill = self.drop_missing_copies(&present);
        self.commit()
            .map_err(|e| crate::Error::Other(format!("recovery commit failed: {e}")))?;
        // On a member that took commits of its own (opened with --force), an
        // unreferenced file may be the other side's only copy of some data.
        let diverged = self.pool.diverged_members();
        let (keep, remove): (Vec<_>, Vec<_>) = orphan_files
            .into_iter()
            .partition(|(m, ..)| diverged.contains(m));
        self.pool.quarantine_extent_files(&keep);
        self.pool.remove_extent_files(&remove);
        // After the orphans are gone: a rebuilt copy takes the name of its
        // extent on its new member, which an orphan there may have had.
        if !refill.is_empty() {
            match self.fill_copies_of(refill, &mut |_, _| true) {
                Ok((n, bytes)) => {
                    tracing::warn!(
                        copies = n,
                        bytes,
                        "missing extent copies rebuilt from good copies"
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild missing extent copies; `vpool scrub` or `vpool set copies` retries")
                }
            }
        }
        Ok(())
    }

    /// Extent copies the metadata lists on a present member whose file is not
    /// there (created while the member was failing, its directory entry never
    /// made durable before a crash) are dropped from their extents when a
    /// copy that is there remains; those extents are returned, to get their
    /// copies back from the good ones. A missing only copy stays listed
    /// (`check` reports it: its data is lost).
    fn drop_missing_copies(&self, present: &HashSet<(u32, String)>) -> Vec<super::members::Item> {
        let mut out = Vec::new();
        let members: HashSet<u32> = self.pool.members().iter().map(|m| m.entry.id).collect();
        let ns = self.ns.read();
        for n in ns.nodes.values() {
            let Some(v) = &n.volume else { continue };
            for (m, ino, idx, fid) in v.all_files() {
                let name = crate::pool::extent_file_name(ino, idx, fid);
                if !members.contains(&m) || present.contains(&(m, name.clone())) {
                    continue;
                }
                let others_there = v
                    .copy_members(idx)
                    .iter()
                    .any(|o| *o != m && present.contains(&(*o, name.clone())));
                if !others_there {
                    tracing::error!(
                        member = m,
                        ino,
                        extent = idx,
                        "extent file missing and no other copy is there"
                    );
                    continue;
                }
                if v.drop_copy(idx, m).is_some() {
                    tracing::warn!(
                        member = m,
                        ino,
                        extent = idx,
                        "extent copy missing (its member failed before it was durable); rebuilding it from another copy"
                    );
                    n.touch();
                    out.push(super::members::Item {
                        node: n.clone(),
                        vol: v.clone(),
                        index: idx,
                    });
                }
            }
        }
        out
    }

    /// Dead extent files whose name no extent copy has taken again. Files are
    /// named by (ino, index, file_id) on their member, so a copy moved back
    /// onto a member before the old copy's file there was removed (a removal
    /// deferred for a snapshot capture, say) has the same name: removing by
    /// name would delete the live copy.
    fn without_live(&self, dead: Vec<DeadExtent>) -> Vec<DeadExtent> {
        if dead.is_empty() {
            return dead;
        }
        let ns = self.ns.read();
        dead.into_iter()
            .filter(|(m, ino, idx, fid)| {
                let live = ns
                    .nodes
                    .get(ino)
                    .and_then(|n| n.volume.as_ref())
                    .is_some_and(|v| v.copy_is_live(*idx, *fid, *m));
                if live {
                    tracing::info!(
                        member = m,
                        ino,
                        index = idx,
                        "a dead extent file's name is live again; kept"
                    );
                }
                !live
            })
            .collect()
    }

    /// See [`KernelCache::write_back`].
    pub fn write_back_kernel(&self, ino: u64, from: u64) {
        if let Some(k) = self.kernel.get() {
            k.write_back(ino, from);
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

    pub(crate) fn attr_of(&self, node: &Node) -> Attr {
        let blocks = node.volume.as_ref().map(|v| v.blocks(&self.pool));
        let m = node.meta.lock();
        let (size, blocks) = match m.kind {
            NodeKind::Dir => (4096, 8),
            NodeKind::Symlink => (m.target.len() as u64, 0),
            NodeKind::File => (m.size, blocks.unwrap_or(0)),
            _ => (0, 0),
        };
        Attr {
            ino: node.ino,
            kind: m.kind,
            size,
            blocks,
            atime: m.atime,
            mtime: m.mtime,
            ctime: m.ctime,
            mode: m.mode,
            nlink: m.nlink,
            uid: m.uid,
            gid: m.gid,
            rdev: m.rdev,
            blksize: self.pool.config().block_size.max(4096),
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        if parent == ROOT_INO && name == SNAPDIR_NAME {
            return Ok(self.snapdir_attr());
        }
        if is_snap(parent) {
            return self.snap_lookup(parent, name);
        }
        let node = {
            let ns = self.ns.read();
            let dir = ns.dir(parent)?;
            let ino = match name {
                b"." => parent,
                b".." => ns.node(parent)?.meta.lock().parent,
                _ => *dir.get(name).ok_or(FsError::NotFound)?,
            };
            ns.node(ino)?
        };
        Ok(self.attr_of(&node))
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if is_snap(ino) {
            return self.snap_getattr(ino);
        }
        let node = self.ns.read().node(ino)?;
        Ok(self.attr_of(&node))
    }

    pub fn setattr(&self, ino: u64, s: SetAttr) -> FsResult<Attr> {
        self.writable()?;
        refuse_snap(&[ino])?;
        let _g = self.gate.read();
        let node = self.ns.read().node(ino)?;
        let now = self.now();
        if let Some(size) = s.size {
            let vol = match &node.volume {
                Some(v) => v,
                None if node.kind() == NodeKind::Dir => return Err(FsError::IsDir),
                None => return Err(FsError::Invalid),
            };
            if size > MAX_FILE_SIZE {
                return Err(FsError::FileTooLarge);
            }
            let dead = {
                let mut m = node.meta.lock();
                let dead = if size < m.size {
                    self.snaps.preserve_from(ino, size);
                    let bs = vol.block_size();
                    vol.mark_mapped_blocks(size / bs, m.size.div_ceil(bs));
                    vol.truncate(&self.pool, size)?
                } else {
                    Vec::new()
                };
                m.size = size;
                m.mtime = now;
                m.ctime = now;
                dead
            };
            if !dead.is_empty() {
                self.ns.write().dead_extents.extend(dead);
            }
        }
        {
            let mut m = node.meta.lock();
            if let Some(mode) = s.mode {
                m.mode = mode & 0o7777;
            }
            if let Some(uid) = s.uid {
                m.uid = uid;
            }
            if let Some(gid) = s.gid {
                m.gid = gid;
            }
            if (s.uid.is_some() || s.gid.is_some()) && s.mode.is_none() && m.kind != NodeKind::Dir {
                // chown clears set-id bits of non-directories, as the kernel does.
                m.mode &= !(libc::S_ISUID | libc::S_ISGID);
            }
            let resolve = |t: TimeSet| match t {
                TimeSet::Now => now,
                TimeSet::At(ts) => ts,
            };
            if let Some(t) = s.atime {
                m.atime = resolve(t);
            }
            if let Some(t) = s.mtime {
                m.mtime = resolve(t);
            }
            m.ctime = s.ctime.unwrap_or(now);
        }
        node.touch();
        Ok(self.attr_of(&node))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        if is_snap(ino) {
            return self.snap_readlink(ino);
        }
        let node = self.ns.read().node(ino)?;
        let m = node.meta.lock();
        if m.kind != NodeKind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(m.target.clone())
    }

    /// Creates a node under `parent`.
    pub(crate) fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        new: NewNode,
        caller: Caller,
    ) -> FsResult<Arc<Node>> {
        let NewNode {
            kind,
            mode,
            rdev,
            target,
        } = new;
        self.writable()?;
        refuse_snap(&[parent])?;
        check_name(name)?;
        if parent == ROOT_INO && name == SNAPDIR_NAME {
            return Err(FsError::Exists);
        }
        let mut ns = self.ns.write();
        let pnode = ns.node(parent)?;
        if pnode.meta.lock().nlink == 0 {
            // A removed directory still open: nothing is created in it.
            return Err(FsError::NotFound);
        }
        if ns.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let now = self.now();
        let (pgid, psetgid) = {
            let pm = pnode.meta.lock();
            (pm.gid, pm.mode & libc::S_ISGID != 0)
        };
        let mut mode = mode & 0o7777;
        // BSD group semantics of set-group-id directories.
        let gid = if psetgid { pgid } else { caller.gid };
        if psetgid && kind == NodeKind::Dir {
            mode |= libc::S_ISGID;
        }
        let ino = ns.next_ino;
        ns.next_ino += 1;
        let node = Arc::new(Node {
            ino,
            meta: Mutex::new(NodeMeta {
                kind,
                mode,
                uid: caller.uid,
                gid,
                nlink: if kind == NodeKind::Dir { 2 } else { 1 },
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                rdev,
                parent: if kind == NodeKind::Dir { parent } else { 0 },
                target,
                xattrs: BTreeMap::new(),
            }),
            volume: (kind == NodeKind::File).then(|| {
                Arc::new(Volume::new(
                    ino,
                    self.pool.config().extent_size,
                    self.pool.config().block_size as u64,
                    &[],
                    [],
                ))
            }),
            dirty: AtomicBool::new(true),
            committed_size: AtomicU64::new(u64::MAX),
            open: AtomicU32::new(0),
        });
        ns.nodes.insert(ino, node.clone());
        if kind == NodeKind::Dir {
            ns.children.insert(ino, BTreeMap::new());
        }
        ns.set_entry(parent, name, Some(ino));
        {
            let mut pm = pnode.meta.lock();
            if kind == NodeKind::Dir {
                pm.nlink += 1;
            }
            pm.mtime = now;
            pm.ctime = now;
        }
        pnode.touch();
        Ok(node)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NodeKind::File,
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::CharDev,
            libc::S_IFBLK => NodeKind::BlockDev,
            libc::S_IFDIR => NodeKind::Dir,
            _ => return Err(FsError::Invalid),
        };
        let node = self.make_node(
            parent,
            name,
            NewNode {
                kind,
                mode: mode & !umask,
                rdev,
                target: Vec::new(),
            },
            caller,
        )?;
        Ok(self.attr_of(&node))
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        if parent == SNAPDIR_INO {
            return self.snap_mkdir(name);
        }
        let node = self.make_node(
            parent,
            name,
            NewNode {
                kind: NodeKind::Dir,
                mode: mode & !umask,
                rdev: 0,
                target: Vec::new(),
            },
            caller,
        )?;
        Ok(self.attr_of(&node))
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        if target.len() > 4096 {
            return Err(FsError::NameTooLong);
        }
        let node = self.make_node(
            parent,
            name,
            NewNode {
                kind: NodeKind::Symlink,
                mode: 0o777,
                rdev: 0,
                target: target.to_vec(),
            },
            caller,
        )?;
        Ok(self.attr_of(&node))
    }

    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        let node = self.make_node(
            parent,
            name,
            NewNode {
                kind: NodeKind::File,
                mode: mode & !umask,
                rdev: 0,
                target: Vec::new(),
            },
            caller,
        )?;
        let fh = self.new_file_handle(node.clone());
        Ok((self.attr_of(&node), fh))
    }

    /// Removes one link of a non-directory; the node lives on while it is open.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        refuse_snap(&[parent])?;
        let mut ns = self.ns.write();
        let ino = *ns.dir(parent)?.get(name).ok_or(FsError::NotFound)?;
        let node = ns.node(ino)?;
        if node.kind() == NodeKind::Dir {
            return Err(FsError::IsDir);
        }
        ns.set_entry(parent, name, None);
        self.drop_link(&mut ns, &node);
        self.touch_dir(&ns, parent);
        Ok(())
    }

    fn drop_link(&self, ns: &mut Namespace, node: &Arc<Node>) {
        let gone = {
            let mut m = node.meta.lock();
            m.nlink = m.nlink.saturating_sub(1);
            m.ctime = self.now();
            m.nlink == 0
        };
        node.touch();
        if gone && node.open.load(Ordering::Acquire) == 0 {
            ns.free(node.ino);
        }
    }

    fn touch_dir(&self, ns: &Namespace, dir: u64) {
        if let Ok(n) = ns.node(dir) {
            let now = self.now();
            let mut m = n.meta.lock();
            m.mtime = now;
            m.ctime = now;
            drop(m);
            n.touch();
        }
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        if parent == SNAPDIR_INO {
            return self.snap_rmdir(name);
        }
        refuse_snap(&[parent])?;
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let mut ns = self.ns.write();
        let ino = *ns.dir(parent)?.get(name).ok_or(FsError::NotFound)?;
        let node = ns.node(ino)?;
        if node.kind() != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        if !ns.dir(ino)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        ns.set_entry(parent, name, None);
        node.meta.lock().nlink = 0;
        ns.free_unless_open(&node);
        if let Ok(p) = ns.node(parent) {
            let mut pm = p.meta.lock();
            pm.nlink = pm.nlink.saturating_sub(1);
        }
        self.touch_dir(&ns, parent);
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        self.writable()?;
        refuse_snap(&[ino, newparent])?;
        check_name(newname)?;
        if newparent == ROOT_INO && newname == SNAPDIR_NAME {
            return Err(FsError::Exists);
        }
        let node = {
            let mut ns = self.ns.write();
            let node = ns.node(ino)?;
            if node.kind() == NodeKind::Dir {
                return Err(FsError::NotPermitted);
            }
            if ns.dir(newparent)?.contains_key(newname) {
                return Err(FsError::Exists);
            }
            {
                let mut m = node.meta.lock();
                if m.nlink >= u32::MAX - 1 {
                    return Err(FsError::TooManyLinks);
                }
                m.nlink += 1;
                m.ctime = self.now();
            }
            node.touch();
            ns.set_entry(newparent, newname, Some(ino));
            self.touch_dir(&ns, newparent);
            node
        };
        Ok(self.attr_of(&node))
    }

    /// Whether `ino` is `ancestor` or lies below it.
    fn is_within(ns: &Namespace, mut ino: u64, ancestor: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            match ns.nodes.get(&ino) {
                Some(n) => ino = n.meta.lock().parent,
                None => return false,
            }
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.writable()?;
        refuse_snap(&[parent, newparent])?;
        check_name(newname)?;
        if newparent == ROOT_INO && newname == SNAPDIR_NAME {
            return Err(FsError::Exists);
        }
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(FsError::Invalid);
        }
        let mut ns = self.ns.write();
        let src_ino = *ns.dir(parent)?.get(name).ok_or(FsError::NotFound)?;
        let dst_ino = ns.dir(newparent)?.get(newname).copied();
        let src = ns.node(src_ino)?;
        let src_is_dir = src.kind() == NodeKind::Dir;
        if src_is_dir && newparent != parent && Self::is_within(&ns, newparent, src_ino) {
            return Err(FsError::Invalid);
        }
        let now = self.now();
        if exchange {
            let dst_ino = dst_ino.ok_or(FsError::NotFound)?;
            let dst = ns.node(dst_ino)?;
            let dst_is_dir = dst.kind() == NodeKind::Dir;
            if dst_is_dir && newparent != parent && Self::is_within(&ns, parent, dst_ino) {
                return Err(FsError::Invalid);
            }
            ns.set_entry(parent, name, Some(dst_ino));
            ns.set_entry(newparent, newname, Some(src_ino));
            if parent != newparent {
                if src_is_dir {
                    src.meta.lock().parent = newparent;
                }
                if dst_is_dir {
                    dst.meta.lock().parent = parent;
                }
                if src_is_dir != dst_is_dir {
                    let (gain, lose) = if src_is_dir {
                        (newparent, parent)
                    } else {
                        (parent, newparent)
                    };
                    if let Ok(n) = ns.node(gain) {
                        n.meta.lock().nlink += 1;
                    }
                    if let Ok(n) = ns.node(lose) {
                        let mut m = n.meta.lock();
                        m.nlink = m.nlink.saturating_sub(1);
                    }
                }
            }
            for n in [&src, &dst] {
                n.meta.lock().ctime = now;
                n.touch();
            }
            self.touch_dir(&ns, parent);
            self.touch_dir(&ns, newparent);
            return Ok(());
        }
        if let Some(dst_ino) = dst_ino {
            if noreplace {
                return Err(FsError::Exists);
            }
            if dst_ino == src_ino {
                return Ok(());
            }
            let dst = ns.node(dst_ino)?;
            let dst_is_dir = dst.kind() == NodeKind::Dir;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    if !ns.dir(dst_ino)?.is_empty() {
                        return Err(FsError::NotEmpty);
                    }
                    dst.meta.lock().nlink = 0;
                    ns.free_unless_open(&dst);
                    if let Ok(n) = ns.node(newparent) {
                        let mut m = n.meta.lock();
                        m.nlink = m.nlink.saturating_sub(1);
                    }
                }
                (false, false) => self.drop_link(&mut ns, &dst),
            }
        }
        ns.set_entry(parent, name, None);
        ns.set_entry(newparent, newname, Some(src_ino));
        if src_is_dir && parent != newparent {
            src.meta.lock().parent = newparent;
            if let Ok(n) = ns.node(parent) {
                let mut m = n.meta.lock();
                m.nlink = m.nlink.saturating_sub(1);
            }
            if let Ok(n) = ns.node(newparent) {
                n.meta.lock().nlink += 1;
            }
        }
        src.meta.lock().ctime = now;
        src.touch();
        self.touch_dir(&ns, parent);
        self.touch_dir(&ns, newparent);
        Ok(())
    }

    pub(crate) fn new_file_handle(&self, node: Arc<Node>) -> u64 {
        node.open.fetch_add(1, Ordering::AcqRel);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .insert(fh, Arc::new(Handle::File { node }));
        fh
    }

    pub(crate) fn file_node(&self, fh: u64) -> FsResult<Arc<Node>> {
        match self.handles.read().get(&fh).map(|h| h.as_ref()) {
            Some(Handle::File { node }) => Ok(node.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        if is_snap(ino) {
            return self.snap_open(ino, write);
        }
        if write {
            self.writable()?;
        }
        let node = self.ns.read().node(ino)?;
        match node.kind() {
            NodeKind::Dir => return Err(FsError::IsDir),
            NodeKind::File => {}
            _ => return Err(FsError::Invalid),
        }
        Ok(self.new_file_handle(node))
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.write().remove(&fh).ok_or(FsError::BadHandle)?;
        if let Handle::File { node } = h.as_ref()
            && node.open.fetch_sub(1, Ordering::AcqRel) == 1
        {
            if node.meta.lock().nlink == 0 {
                let mut ns = self.ns.write();
                // Re-check under the namespace lock: a link() may have raced.
                if node.meta.lock().nlink == 0 && node.open.load(Ordering::Acquire) == 0 {
                    ns.free(node.ino);
                }
            } else if let Some(v) = &node.volume {
                v.close_files(&self.pool);
            }
        }
        Ok(())
    }

    pub fn read(&self, fh: u64, off: u64, len: u32) -> FsResult<Vec<u8>> {
        if let Some((snap, ino)) = self.snap_handle(fh) {
            return self.snaps.read(snap, ino, off, len as u64);
        }
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        vol.read(&self.pool, off, len as usize, size)
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        self.writable()?;
        let freed = self.freed.load(Ordering::Acquire);
        let r = {
            let _g = self.gate.read();
            self.write_locked(fh, off, data)
        };
        match r {
            // The commit that frees space takes the gate itself: retry without it held.
            Err(FsError::NoSpace) if self.reclaim_space(freed) => {
                let _g = self.gate.read();
                self.write_locked(fh, off, data)
            }
            r => r,
        }
    }

    /// `write` with the gate held by the caller.
    pub(crate) fn write_locked(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(FsError::FileTooLarge)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooLarge);
        }
        self.snaps.preserve(node.ino, off, data.len() as u64);
        if let Err(e) = vol.write(&self.pool, off, data) {
            // Pieces before the failure are written, maybe into new extents:
            // the next commit must record the map as it is now (the data
            // shows, and a commit that says it is durable must make it so).
            // What landed past the end of the file is taken back: a later
            // extension must read zeros there.
            self.clear_past_end(&node, vol, off, end);
            node.touch();
            return Err(e);
        }
        let now = self.now();
        {
            let mut m = node.meta.lock();
            if end > m.size {
                m.size = end;
            }
            m.mtime = now;
            m.ctime = now;
        }
        node.touch();
        Ok(data.len() as u32)
    }

    /// After a failed write or allocation of `[off, end)`: punches the part
    /// past the file's size (best effort: what stays there is also cut at
    /// the next mount).
    fn clear_past_end(&self, node: &Node, vol: &Volume, off: u64, end: u64) {
        let size = node.meta.lock().size;
        let from = off.max(size);
        if end <= from {
            return;
        }
        // Whole blocks first: they need no read (a block the failed write
        // tore does not verify), and all of them lie past the end.
        let bs = vol.block_size();
        let (ws, we) = (from.next_multiple_of(bs), end.next_multiple_of(bs));
        let mut r = Ok(());
        if we > ws {
            r = vol.punch(&self.pool, ws, we - ws);
        }
        if r.is_ok() && ws > from {
            // The block holding `from`: a punch when it verifies (the piece
            // there was written whole), else what a torn write left past the
            // end is zeroed on the copies whose bytes before still verify.
            r = vol
                .punch(&self.pool, from, ws.min(end) - from)
                .or_else(|_| vol.zero_block_tail(&self.pool, from).map(|_| ()));
        }
        if let Err(e) = r {
            tracing::warn!(ino = node.ino, error = %e, "cannot punch what a failed write left past the end of the file");
        }
    }

    /// fallocate: plain allocation (extends the size unless KEEP_SIZE), PUNCH_HOLE
    /// (with KEEP_SIZE) and ZERO_RANGE.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        self.writable()?;
        let _g = self.gate.read();
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let end = off.checked_add(len).ok_or(FsError::FileTooLarge)?;
        if len == 0 {
            return Err(FsError::Invalid);
        }
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooLarge);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = node.meta.lock().size;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(FsError::NotSupported);
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0
            && (!keep || mode & libc::FALLOC_FL_ZERO_RANGE != 0)
        {
            return Err(FsError::NotSupported);
        }
        self.snaps.preserve(node.ino, off, len);
        let r = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if off < size {
                vol.punch(&self.pool, off, end.min(size) - off)
            } else {
                Ok(())
            }
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            let zend = if keep { end.min(size) } else { end };
            if zend > off {
                vol.zero_range(&self.pool, off, zend - off)
            } else {
                Ok(())
            }
        } else {
            vol.allocate(&self.pool, off, len)
        };
        if let Err(e) = r {
            // As in `write_locked`: what was done before the failure is
            // recorded by the next commit, and nothing stays past the end.
            self.clear_past_end(&node, vol, off, end);
            node.touch();
            return Err(e);
        }
        let now = self.now();
        {
            let mut m = node.meta.lock();
            if !keep && end > m.size {
                m.size = end;
            }
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                m.mtime = now;
            }
            m.ctime = now;
        }
        node.touch();
        Ok(())
    }

    pub fn lseek(&self, fh: u64, off: u64, whence: i32) -> FsResult<u64> {
        if let Some((snap, ino)) = self.snap_handle(fh) {
            return self.snap_lseek(snap, ino, off, whence);
        }
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        let r = match whence {
            libc::SEEK_DATA => vol.seek_data(&self.pool, off, size)?,
            libc::SEEK_HOLE => vol.seek_hole(&self.pool, off, size)?,
            libc::SEEK_SET => Some(off),
            libc::SEEK_END => Some(size.saturating_add(off)),
            _ => return Err(FsError::Invalid),
        };
        r.ok_or(FsError::NoData)
    }

    /// Copies through the core in 1 MiB pieces; holes in the source stay holes
    /// (skipped in one step each, whatever their length). The gate is taken per
    /// piece: a commit waits for one piece, not for a copy of gigabytes.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        self.writable()?;
        let size = self.handle_size(fh_in)?;
        if off_in >= size {
            return Ok(0);
        }
        let len = len.min(size - off_in);
        let mut done = 0u64;
        const CHUNK: u64 = 1 << 20;
        while done < len {
            let _g = self.gate.read();
            let pos = off_in + done;
            let data_at = match self.lseek(fh_in, pos, libc::SEEK_DATA) {
                Ok(d) => Some(d),
                Err(FsError::NoData) => None,
                Err(e) => return Err(e),
            };
            let hole = match data_at {
                Some(d) if d > pos => (d - pos).min(len - done),
                None => len - done,
                _ => 0,
            };
            if hole > 0 {
                // The destination must read zeros there too, so deallocate what
                // it holds (past its end it reads zeros).
                self.punch_within_size(fh_out, off_out + done, hole)?;
                done += hole;
                continue;
            }
            let n = (len - done).min(CHUNK);
            let buf = self.read(fh_in, pos, n as u32)?;
            if buf.is_empty() {
                break;
            }
            self.write_locked(fh_out, off_out + done, &buf)?;
            done += buf.len() as u64;
        }
        let _g = self.gate.read();
        let dst = self.file_node(fh_out)?;
        {
            let mut m = dst.meta.lock();
            if off_out + done > m.size {
                m.size = off_out + done;
            }
        }
        dst.touch();
        Ok(done)
    }

    /// Deallocates `[off, off+len)` of an open file, clipped to its size.
    pub(crate) fn punch_within_size(&self, fh: u64, off: u64, len: u64) -> FsResult<()> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        if off < size {
            self.snaps.preserve(node.ino, off, len.min(size - off));
            vol.punch(&self.pool, off, len.min(size - off))?;
        }
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.list_any(ino)?;
        let node = if is_snap(ino) {
            None
        } else {
            let n = self.ns.read().node(ino)?;
            n.open.fetch_add(1, Ordering::AcqRel);
            Some(n)
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(
            fh,
            Arc::new(Handle::Dir {
                entries: Mutex::new(entries),
                node,
            }),
        );
        Ok(fh)
    }

    fn list_any(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        if is_snap(ino) {
            return self.snap_list_dir(ino);
        }
        let mut out = self.list_dir(ino)?;
        if ino == ROOT_INO && self.opts.snapdir_visible {
            out.push(DirEntry {
                ino: SNAPDIR_INO,
                kind: NodeKind::Dir,
                name: SNAPDIR_NAME.to_vec(),
            });
        }
        Ok(out)
    }

    fn list_dir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let ns = self.ns.read();
        let dir = ns.dir(ino)?;
        let parent = ns.node(ino)?.meta.lock().parent;
        let mut out = Vec::with_capacity(dir.len() + 2);
        out.push(DirEntry {
            ino,
            kind: NodeKind::Dir,
            name: b".".to_vec(),
        });
        out.push(DirEntry {
            ino: parent,
            kind: NodeKind::Dir,
            name: b"..".to_vec(),
        });
        for (name, child) in dir {
            if let Some(n) = ns.nodes.get(child) {
                out.push(DirEntry {
                    ino: *child,
                    kind: n.kind(),
                    name: name.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Entries from position `offset` on; entry `i` has offset `i + 1`. The listing
    /// is taken at opendir (and again on rewind) so removals while reading skip nothing.
    pub fn readdir(&self, fh: u64, ino: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let h = self
            .handles
            .read()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let Handle::Dir { entries, .. } = h.as_ref() else {
            return Err(FsError::BadHandle);
        };
        let mut e = entries.lock();
        if offset == 0 {
            *e = self.list_any(ino)?;
        }
        Ok(e.iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, d)| (i as u64 + 1, d.clone()))
            .collect())
    }

    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.write().remove(&fh);
        if let Some(h) = h
            && let Handle::Dir {
                node: Some(node), ..
            } = h.as_ref()
            && node.open.fetch_sub(1, Ordering::AcqRel) == 1
            && node.meta.lock().nlink == 0
        {
            let mut ns = self.ns.write();
            // Re-check under the namespace lock: another open may have raced.
            if node.open.load(Ordering::Acquire) == 0 && ns.nodes.contains_key(&node.ino) {
                ns.free(node.ino);
            }
        }
        Ok(())
    }

    pub fn statfs(&self) -> (PoolSpace, u64) {
        (self.pool.space(), self.ns.read().nodes.len() as u64)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        self.writable()?;
        refuse_snap(&[ino])?;
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::Range);
        }
        let node = self.ns.read().node(ino)?;
        {
            let mut m = node.meta.lock();
            let exists = m.xattrs.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(FsError::Exists);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(FsError::NoAttribute);
            }
            let (count, bytes) = m
                .xattrs
                .iter()
                .filter(|(k, _)| k.as_slice() != name)
                .fold((1, name.len() + value.len()), |(c, b), (k, v)| {
                    (c + 1, b + k.len() + v.len())
                });
            if count > XATTR_MAX_COUNT || bytes > XATTR_MAX_BYTES {
                return Err(FsError::NoSpace);
            }
            m.xattrs.insert(name.to_vec(), value.to_vec());
            m.ctime = self.now();
        }
        node.touch();
        Ok(())
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if is_snap(ino) {
            return self
                .snap_xattrs(ino)
                .and_then(|x| x.get(name).cloned().ok_or(FsError::NoAttribute));
        }
        let node = self.ns.read().node(ino)?;
        let m = node.meta.lock();
        m.xattrs.get(name).cloned().ok_or(FsError::NoAttribute)
    }

    /// Names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let xattrs = if is_snap(ino) {
            self.snap_xattrs(ino)?
        } else {
            self.ns.read().node(ino)?.meta.lock().xattrs.clone()
        };
        let mut out = Vec::new();
        for k in xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        refuse_snap(&[ino])?;
        let node = self.ns.read().node(ino)?;
        {
            let mut m = node.meta.lock();
            m.xattrs.remove(name).ok_or(FsError::NoAttribute)?;
            m.ctime = self.now();
        }
        node.touch();
        Ok(())
    }

    /// When a write runs out of space while files removed since the last commit
    /// still hold theirs, commit now so their extent files go. Returns whether
    /// anything was freed (worth retrying the write).
    /// After ENOSPC: whether a retry may now find room. Files of deleted data
    /// are removed by a commit, so one is run when any are pending; when none
    /// are, another writer's commit may be removing them right now (it took
    /// them), so wait for any running commit and retry if one freed space
    /// since the write began (`freed` then). Concurrent writers of a flush
    /// otherwise failed while the first one's commit was freeing the space.
    fn reclaim_space(&self, freed: u64) -> bool {
        if !self.ns.read().dead_extents.is_empty() {
            return self.commit().is_ok();
        }
        drop(self.commit_lock.lock());
        self.freed.load(Ordering::Acquire) != freed
    }

    /// Whether anything awaits a commit.
    /// The time for timestamps (the storage's clock: the simulator's is
    /// virtual, so that a seed replays byte for byte).
    fn now(&self) -> Timestamp {
        Timestamp::at(self.pool.storage().now())
    }

    pub fn has_pending(&self) -> bool {
        if self.snaps.has_changes() || self.pool.info_pending() {
            return true;
        }
        let ns = self.ns.read();
        ns.namespace_pending()
            || ns.nodes.values().any(|n| {
                n.dirty.load(Ordering::Acquire) || n.volume.as_ref().is_some_and(|v| v.needs_sync())
            })
    }

    /// Makes everything written so far durable, in the order the module doc gives:
    /// data, then directory entries of new extent files, then the metadata on every
    /// member, then removal of extent files nothing references any more.
    pub fn commit(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _g = self.commit_lock.lock();
        self.commit_locked(true)
    }

    /// The last commit before the pool closes: like [`Vfs::commit`] but logs
    /// no intent records ahead (no write follows it), so that a clean stop
    /// leaves no extent to resynchronise at the next mount. A resync
    /// recomputes checksums from the data, which would take any corruption
    /// arising in between for the truth.
    pub fn commit_final(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _g = self.commit_lock.lock();
        self.commit_locked(false)
    }

    /// Holds off commits (for work that must see the metadata copies still).
    pub(crate) fn commit_guard(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.commit_lock.lock()
    }

    /// Whether a commit is needed to make the layout durable (the namespace, a
    /// size or an extent map changed); timestamps alone do not count.
    fn layout_pending(&self) -> bool {
        let ns = self.ns.read();
        ns.namespace_pending()
            || ns.nodes.values().any(|n| {
                n.meta.lock().size != n.committed_size.load(Ordering::Acquire)
                    || n.volume.as_ref().is_some_and(|v| v.has_fresh())
            })
    }

    /// fsync/fdatasync of an open file. fdatasync of a file whose layout is
    /// already durable only flushes its data (what VM images do all the time);
    /// everything else is a full commit, skipped when nothing is pending.
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        if self.opts.read_only || self.snap_handle(fh).is_some() {
            return Ok(());
        }
        let node = self.file_node(fh)?;
        // Holding the commit lock also waits for a commit in flight, whose data
        // syncs this call must not overtake.
        let _g = self.commit_lock.lock();
        // The fast path flushes data only; after a member failure, only a
        // commit recording it behind makes the surviving copies the ones a
        // restart trusts (otherwise the stale copy matches the old table).
        if datasync && !self.layout_pending() && !self.pool.failure_unrecorded() {
            if let Some(v) = &node.volume {
                let (mut dirs, mut fresh) = (HashSet::new(), Vec::new());
                v.sync(&self.pool, &mut dirs, &mut fresh, None)?;
                if fresh.is_empty() && !self.pool.failure_unrecorded() {
                    return Ok(());
                }
            } else {
                return Ok(());
            }
        }
        if !self.has_pending() {
            return Ok(());
        }
        self.commit_locked(true)
    }

    fn commit_locked(&self, prelog: bool) -> FsResult<()> {
        if prelog {
            self.prelog_hot_extents();
        }
        let (batch, dirty_nodes, dirents, dead, volumes, cbt_taken, dead_cbt) = {
            // No change is in flight while the gate is held: the bitmaps taken
            // here cover every write made so far, and writes after it log their
            // intents under the next tag (see pool/intent.rs).
            let _gate = self.gate.write();
            let mut ns = self.ns.write();
            let mut batch = Batch::default();
            let mut dirty_nodes = Vec::new();
            for (ino, n) in &ns.nodes {
                if n.dirty.swap(false, Ordering::AcqRel) {
                    let rec = n.record();
                    batch.inodes.push((*ino, Some(encode_record(&rec))));
                    dirty_nodes.push((n.clone(), rec.size));
                }
            }
            for ino in std::mem::take(&mut ns.deleted) {
                batch.inodes.push((ino, None));
            }
            // In key order (deleted inodes were appended): redb inserts in
            // order, and one workload gives one sequence of writes.
            batch.inodes.sort_unstable_by_key(|(ino, _)| *ino);
            let dirents: Vec<_> = std::mem::take(&mut ns.dirent_changes).into_iter().collect();
            batch.dirents = dirents.clone();
            batch.next_ino = ns.next_ino;
            batch.next_file_id = self.pool.next_file_id.load(Ordering::SeqCst);
            batch.generation = self.generation.load(Ordering::SeqCst) + 1;
            let dead = std::mem::take(&mut ns.dead_extents);
            let volumes: Vec<Arc<Node>> = ns
                .nodes
                .values()
                .filter(|n| n.volume.is_some())
                .cloned()
                .collect();
            let mut cbt_taken = Vec::new();
            for n in &volumes {
                if let Some(v) = &n.volume {
                    let changes = v.take_cbt_changes();
                    if changes.is_empty() {
                        continue;
                    }
                    let mut idx = Vec::with_capacity(changes.len());
                    for (i, bits) in changes {
                        idx.push(i);
                        batch.cbt.push(((n.ino, i), bits.map(|w| encode_words(&w))));
                    }
                    cbt_taken.push((v.clone(), idx));
                }
            }
            let dead_cbt = std::mem::take(&mut ns.dead_cbt);
            batch.cbt.extend(dead_cbt.iter().map(|k| (*k, None)));
            let (snaps, next_snap) = self.snaps.take_changes();
            batch.snapshots = snaps;
            batch.next_snap_id = next_snap;
            batch.info = self.pool.take_info_changes();
            self.pool
                .intent_tag
                .store(batch.generation + 1, Ordering::SeqCst);
            (
                batch,
                dirty_nodes,
                dirents,
                dead,
                volumes,
                cbt_taken,
                dead_cbt,
            )
        };
        let mut fresh = Vec::new();
        let result = (|| -> FsResult<()> {
            let mut new_dirs = HashSet::new();
            for n in &volumes {
                if let Some(v) = &n.volume {
                    v.sync(
                        &self.pool,
                        &mut new_dirs,
                        &mut fresh,
                        Some(batch.generation),
                    )?;
                }
            }
            self.pool.sync_data_dirs(&new_dirs).map_err(FsError::Io)?;
            // A new extent file is durable only with its directory entry: one
            // whose every copy is on a member that failed before its entry was
            // synced is not, and the commit must not say it is.
            if fresh.iter().any(|e| e.usable_copies(&self.pool) == 0) {
                return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
            }
            self.pool.commit(&batch, true).map_err(FsError::from)
        })();
        match result {
            Ok(()) => {
                for e in fresh {
                    e.mark_published();
                }
                for (n, size) in &dirty_nodes {
                    n.committed_size.store(*size, Ordering::Release);
                }
                self.generation.store(batch.generation, Ordering::SeqCst);
                tracing::debug!(
                    generation = batch.generation,
                    inodes = batch.inodes.len(),
                    removed_files = dead.len(),
                    "committed"
                );
                self.pool.clear_intents(batch.generation);
                // Files a running snapshot capture may still read wait for it.
                let mut dead = self.snaps.defer_dead(dead);
                dead.extend(self.snaps.take_released());
                let dead = self.without_live(dead);
                self.pool.remove_extent_files(&dead);
                if !dead.is_empty() {
                    self.freed.fetch_add(1, Ordering::AcqRel);
                }
                Ok(())
            }
            Err(e) => {
                // Some members may hold this generation already: the retry must
                // use a new number, so that equal generations mean equal content.
                self.generation.store(batch.generation, Ordering::SeqCst);
                tracing::error!(error = %e, "metadata commit failed; changes stay pending");
                let mut ns = self.ns.write();
                for (n, _) in dirty_nodes {
                    n.touch();
                }
                for (ino, rec) in &batch.inodes {
                    if rec.is_none() {
                        ns.deleted.insert(*ino);
                    }
                }
                for (k, v) in dirents {
                    ns.dirent_changes.entry(k).or_insert(v);
                }
                ns.dead_extents.extend(dead);
                ns.dead_cbt.extend(dead_cbt);
                for (v, idx) in cbt_taken {
                    v.restore_cbt_changes(idx);
                }
                self.snaps
                    .restore_changes(batch.snapshots.iter().map(|(id, _)| *id));
                self.pool.info.restore_changes(batch.info.clone());
                Err(e)
            }
        }
    }

    /// Before a commit moves the intent tag from `T` to `T + 1`: logs intent
    /// records under `T + 1` for the extents changed in the last two
    /// intervals or the last [`HOT_WINDOW_MS`], so that their writers after
    /// the move do not each wait for an intent fdatasync. After a crash these
    /// extents are resynchronised and counted changed even if they were not
    /// written: over-reporting only.
    fn prelog_hot_extents(&self) {
        let tag = self.pool.intent_tag.load(Ordering::Acquire);
        let since_ms = self.pool.storage().clock_ms().saturating_sub(HOT_WINDOW_MS);
        let hot: Vec<(u64, Arc<crate::volume::Extent>)> = {
            let ns = self.ns.read();
            ns.nodes
                .iter()
                .filter_map(|(ino, n)| n.volume.as_ref().map(|v| (*ino, v)))
                .flat_map(|(ino, v)| {
                    v.hot_extents(tag.saturating_sub(1), since_ms)
                        .into_iter()
                        .map(move |e| (ino, e))
                })
                .collect()
        };
        if hot.is_empty() {
            return;
        }
        let items: Vec<(Vec<u32>, u64, u64)> = hot
            .iter()
            .map(|(ino, e)| (e.members(), *ino, e.index))
            .collect();
        match self.pool.prelog_intents(tag + 1, &items) {
            Ok(()) => {
                for (_, e) in &hot {
                    e.set_prelogged(tag + 1);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot log intents ahead; writers log their own"),
        }
    }

    /// Files and logical bytes (for status).
    pub fn counts(&self) -> (u64, u64) {
        let ns = self.ns.read();
        let mut files = 0;
        let mut bytes = 0;
        for n in ns.nodes.values() {
            let m = n.meta.lock();
            if m.kind == NodeKind::File {
                files += 1;
                bytes += m.size;
            }
        }
        (files, bytes)
    }

    pub fn status(&self) -> PoolStatus {
        let (files, bytes) = self.counts();
        let mut st = self.pool.status(files, bytes);
        let copies = self.pool.config().copies.max(1) as usize;
        let vols: Vec<Arc<crate::volume::Volume>> = self
            .ns
            .read()
            .nodes
            .values()
            .filter_map(|n| n.volume.clone())
            .collect();
        for v in vols {
            let (d, l) = v.degraded_bytes(&self.pool, copies);
            st.degraded_bytes += d;
            st.unavailable_bytes += l;
        }
        let infos = self.snaps.infos();
        st.snapshots = infos.len() as u64;
        st.newest_snapshot = infos
            .iter()
            .filter(|i| i.state == "complete")
            .max_by_key(|i| (i.created, i.id))
            .map(|i| crate::pool::NewestSnapshot {
                name: i.name.clone(),
                created: i.created,
            });
        st.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::CreateOptions;

    const ME: Caller = Caller { uid: 0, gid: 0 };

    fn setup(n: usize, esize: u64) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
        setup_with(
            n,
            CreateOptions {
                extent_size: esize,
                ..Default::default()
            },
        )
    }

    fn setup_with(n: usize, opts: CreateOptions) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
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

    fn open(dir: &std::path::Path) -> Vfs {
        Vfs::mount(Pool::open(dir).unwrap(), VfsOptions::default()).unwrap()
    }

    #[test]
    fn write_read_across_extents_and_members() {
        let (_d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        v.write(fh, 1000, &data).unwrap();
        assert_eq!(v.read(fh, 1000, data.len() as u32).unwrap(), data);
        assert_eq!(v.read(fh, 0, 1000).unwrap(), vec![0u8; 1000]);
        assert_eq!(v.getattr(a.ino).unwrap().size, 301_000);
        // Extents are spread over both members.
        let per: Vec<usize> = dirs
            .iter()
            .map(|d| std::fs::read_dir(d.join("data")).unwrap().count())
            .collect();
        assert!(per.iter().all(|c| *c > 0), "{per:?}");
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        let v = open(&dirs[1]);
        let fh = v.open(a.ino, false).unwrap();
        assert_eq!(v.read(fh, 1000, data.len() as u32).unwrap(), data);
    }

    /// Issue 12, point 5: dead extent files are removed by name after the
    /// commit; a name that a live copy has taken again (a copy moved back to
    /// its member before the old file there went) must survive.
    #[test]
    fn a_dead_file_whose_name_is_live_again_is_kept() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let data = vec![7u8; 100_000];
        v.write(fh, 0, &data).unwrap();
        v.commit().unwrap();
        let node = v.ns.read().node(a.ino).unwrap();
        let live = node.volume.as_ref().unwrap().all_files();
        assert!(!live.is_empty());
        // As if an old copy of the same names were still waiting for removal.
        node.touch();
        v.ns.write().dead_extents.extend(live.iter().copied());
        v.commit().unwrap();
        for (m, ino, idx, fid) in &live {
            let p = v.pool.extent_path(*m, *ino, *idx, *fid).unwrap();
            assert!(p.exists(), "live extent file {p:?} removed");
        }
        assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data);
        v.release(fh).unwrap();
    }

    /// A snapshot record that does not load (damaged, or invalid) is left out
    /// of the view, but its delta files are not taken for leftovers of a
    /// failed capture: they are all there is to rebuild it from.
    #[test]
    fn deltas_of_an_unreadable_snapshot_record_are_kept() {
        let (_d, dirs) = setup(1, 64 * 1024);
        drop(open(&dirs[0]));
        let store =
            crate::pool::meta::MemberStore::open(&crate::storage::real::RealStorage, &dirs[0])
                .unwrap();
        let generation = store.generation().unwrap() + 1;
        let batch = crate::pool::meta::Batch {
            generation,
            next_ino: ROOT_INO + 1,
            next_file_id: 1,
            next_snap_id: 6,
            snapshots: vec![(5, Some(crate::pool::meta::encode_blob(b"not a record")))],
            ..Default::default()
        };
        store.apply(&batch, true, &Default::default()).unwrap();
        drop(store);
        let snapdir = dirs[0].join(crate::snapshot::SNAP_DIR).join("5");
        std::fs::create_dir_all(&snapdir).unwrap();
        std::fs::write(snapdir.join("2.0.vd"), b"delta bytes").unwrap();
        let v = open(&dirs[0]);
        assert!(v.snaps.by_name("x").is_none());
        assert!(
            snapdir.join("2.0.vd").exists(),
            "deltas of an unreadable record removed"
        );
    }

    #[test]
    fn truncate_punch_and_seek() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[1u8; 200_000]).unwrap();
        v.fallocate(
            fh,
            65536,
            65536,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        assert_eq!(v.read(fh, 65536, 10).unwrap(), vec![0u8; 10]);
        assert_eq!(v.lseek(fh, 0, libc::SEEK_HOLE).unwrap(), 65536);
        assert_eq!(v.lseek(fh, 65536, libc::SEEK_DATA).unwrap(), 131072);
        v.setattr(
            a.ino,
            SetAttr {
                size: Some(70_000),
                ..Default::default()
            },
        )
        .unwrap();
        v.setattr(
            a.ino,
            SetAttr {
                size: Some(300_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(v.read(fh, 0, 4).unwrap(), vec![1u8; 4]);
        assert_eq!(v.read(fh, 69_990, 20).unwrap(), vec![0u8; 20]);
        assert!(matches!(
            v.lseek(fh, 70_000, libc::SEEK_DATA),
            Err(FsError::NoData)
        ));
    }

    #[test]
    fn namespace_ops_persist() {
        let (_d, dirs) = setup(2, 1 << 20);
        let v = open(&dirs[0]);
        let d = v.mkdir(ROOT_INO, b"d", 0o755, 0, ME).unwrap();
        let (f, fh) = v.create(d.ino, b"f", 0o600, 0, ME).unwrap();
        v.write(fh, 0, b"hello").unwrap();
        v.release(fh).unwrap();
        v.link(f.ino, ROOT_INO, b"hard").unwrap();
        v.symlink(ROOT_INO, b"s", b"d/f", ME).unwrap();
        v.rename(d.ino, b"f", ROOT_INO, b"g", 0).unwrap();
        v.setxattr(f.ino, b"user.a", b"1", 0).unwrap();
        assert!(matches!(v.rmdir(ROOT_INO, b"nope"), Err(FsError::NotFound)));
        v.commit().unwrap();
        drop(v);
        let v = open(&dirs[1]);
        let g = v.lookup(ROOT_INO, b"g").unwrap();
        assert_eq!(g.nlink, 2);
        assert_eq!(
            v.readlink(v.lookup(ROOT_INO, b"s").unwrap().ino).unwrap(),
            b"d/f"
        );
        assert_eq!(v.getxattr(g.ino, b"user.a").unwrap(), b"1");
        assert!(v.lookup(d.ino, b"f").is_err());
        v.rmdir(ROOT_INO, b"d").unwrap();
    }

    #[test]
    fn unlinked_open_file_stays_readable_then_is_freed() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, b"data").unwrap();
        v.unlink(ROOT_INO, b"f").unwrap();
        assert_eq!(v.read(fh, 0, 4).unwrap(), b"data");
        v.release(fh).unwrap();
        assert!(v.getattr(a.ino).is_err());
        v.commit().unwrap();
        assert_eq!(std::fs::read_dir(dirs[0].join("data")).unwrap().count(), 0);
    }

    #[test]
    fn rename_rules() {
        let (_d, dirs) = setup(1, 1 << 20);
        let v = open(&dirs[0]);
        let a = v.mkdir(ROOT_INO, b"a", 0o755, 0, ME).unwrap();
        v.mkdir(a.ino, b"b", 0o755, 0, ME).unwrap();
        assert!(matches!(
            v.rename(ROOT_INO, b"a", a.ino, b"x", 0),
            Err(FsError::Invalid)
        ));
        v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        assert!(matches!(
            v.rename(ROOT_INO, b"f", ROOT_INO, b"a", 0),
            Err(FsError::IsDir)
        ));
        v.mkdir(ROOT_INO, b"c", 0o755, 0, ME).unwrap();
        assert!(matches!(
            v.rename(ROOT_INO, b"c", ROOT_INO, b"a", 0),
            Err(FsError::NotEmpty)
        ));
        assert!(matches!(
            v.rename(ROOT_INO, b"f", ROOT_INO, b"c", libc::RENAME_NOREPLACE),
            Err(FsError::Exists)
        ));
        v.rename(ROOT_INO, b"f", ROOT_INO, b"c", libc::RENAME_EXCHANGE)
            .unwrap();
        assert_eq!(v.lookup(ROOT_INO, b"f").unwrap().kind, NodeKind::Dir);
        assert_eq!(v.getattr(ROOT_INO).unwrap().nlink, 4);
    }

    /// Overwrites inode `ino`'s record on member `dir` with garbage, keeping the generation.
    fn damage_record(dir: &std::path::Path, ino: u64) {
        use crate::pool::meta::MemberStore;
        let s = MemberStore::open(&crate::storage::real::RealStorage, dir).unwrap();
        let img = s.load().unwrap();
        let batch = crate::pool::meta::Batch {
            generation: img.generation,
            next_ino: img.next_ino,
            next_file_id: img.next_file_id,
            inodes: vec![(ino, Some(vec![1, 0, 0, 0, 9, 9, 9, 9, 42]))],
            dirents: vec![],
            ..Default::default()
        };
        s.apply(&batch, true, &Default::default()).unwrap();
    }

    #[test]
    fn damaged_record_is_repaired_from_another_member() {
        let (_d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[5u8; 100_000]).unwrap();
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        damage_record(&dirs[0], a.ino);
        let v = open(&dirs[0]);
        let fh = v.open(a.ino, false).unwrap();
        assert_eq!(v.read(fh, 0, 100_000).unwrap(), vec![5u8; 100_000]);
        v.release(fh).unwrap();
        drop(v);
        let r = crate::pool::inspect::check(&dirs[0]).unwrap();
        assert!(r.is_clean(), "{:?}", r.problems);
    }

    #[test]
    fn record_damaged_everywhere_refuses_mount_and_keeps_data() {
        let (_d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[5u8; 100_000]).unwrap();
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        let count = |dirs: &[std::path::PathBuf]| -> usize {
            dirs.iter()
                .map(|d| std::fs::read_dir(d.join("data")).unwrap().count())
                .sum()
        };
        let before = count(&dirs);
        damage_record(&dirs[0], a.ino);
        damage_record(&dirs[1], a.ino);
        let err = Vfs::mount(Pool::open(&dirs[0]).unwrap(), VfsOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("no readable copy"), "{err}");
        assert_eq!(count(&dirs), before);
        let r = crate::pool::inspect::check(&dirs[0]).unwrap();
        assert!(!r.is_clean());
    }

    #[test]
    fn copies_land_on_distinct_members_and_cover_a_lost_copy() {
        let (_d, dirs) = setup_with(
            3,
            CreateOptions {
                copies: 2,
                extent_size: 64 * 1024,
                ..Default::default()
            },
        );
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        let data: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
        v.write(fh, 0, &data).unwrap();
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        // Every extent has two files with the same name on two members.
        let mut names: std::collections::HashMap<String, usize> = Default::default();
        for dir in &dirs {
            for e in std::fs::read_dir(dir.join("data")).unwrap() {
                *names
                    .entry(e.unwrap().file_name().to_string_lossy().into_owned())
                    .or_default() += 1;
            }
        }
        // (Each extent file has its sum file beside it.)
        assert_eq!(names.len(), 16);
        assert!(names.values().all(|c| *c == 2), "{names:?}");
        // Remove every extent file of member 0: the other copies serve all reads.
        for e in std::fs::read_dir(dirs[0].join("data")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let v = open(&dirs[1]);
        let fh = v.open(a.ino, false).unwrap();
        assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data);
    }

    #[test]
    fn copy_file_range_of_a_hole_zeroes_the_destination() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (_, src) = v.create(ROOT_INO, b"src", 0o644, 0, ME).unwrap();
        v.setattr(
            v.lookup(ROOT_INO, b"src").unwrap().ino,
            SetAttr {
                size: Some(300_000),
                ..Default::default()
            },
        )
        .unwrap();
        v.write(src, 200_000, b"tail").unwrap();
        let (_, dst) = v.create(ROOT_INO, b"dst", 0o644, 0, ME).unwrap();
        v.write(dst, 0, &[9u8; 250_000]).unwrap();
        assert_eq!(v.copy_file_range(src, 0, dst, 0, 300_000).unwrap(), 300_000);
        let got = v.read(dst, 0, 300_000).unwrap();
        let mut want = vec![0u8; 300_000];
        want[200_000..200_004].copy_from_slice(b"tail");
        assert!(got == want);
    }
}
