//! The snapshot view: `.snapshots` and the trees of the snapshots below it,
//! read-only, served from the snapshot records and deltas (`SnapshotStore`).
//!
//! The route (`route.rs`) sends here every operation on an inode or a handle
//! of the snapshot range (`ino.rs`); this view answers only what reads:
//! attributes, lookup, readlink, xattrs, open/read/seek of files, directory
//! listings. Changes are refused by the route (EROFS), except `mkdir` and
//! `rmdir` directly in `.snapshots`, which are snapshot commands
//! (`snapcmd.rs`). The boundary with the live tree belongs to the route too:
//! `.snapshots` in the root, and its `..`.
//!
//! Invariants: only complete snapshots (and ones being captured, readable at
//! once) show; a snapshot's inode `i` is `ino::snap_ino(s, i)` and its root
//! is `i = ROOT_INO`, whose `..` is `.snapshots`; handles of this view are
//! numbered from `ino::SNAP_FH` and live in their own table, held only to
//! insert, find or remove one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::core::{Attr, DirEntry, Vfs};
use super::handles::entries_from;
use super::ino::{SNAP_FH, SnapIno, decode, snap_ino};
use super::namespace::xattr_names;
use crate::error::{FsError, FsResult};
use crate::pool::meta::{InodeRecord, NodeKind, ROOT_INO};
use crate::snapshot::SnapshotRecord;

// The admin socket names these here.
pub use super::ino::{SNAPDIR_INO, SNAPDIR_NAME};
pub use super::snapcmd::RestoreReport;

/// The snapshot view of a [`Vfs`]. It dereferences to the `Vfs`.
#[derive(Clone, Copy)]
pub(crate) struct SnapView<'a>(&'a Vfs);

impl std::ops::Deref for SnapView<'_> {
    type Target = Vfs;

    fn deref(&self) -> &Vfs {
        self.0
    }
}

impl Vfs {
    /// The snapshot view (only the route and the commands need to name it).
    pub(crate) fn snapview(&self) -> SnapView<'_> {
        SnapView(self)
    }
}

/// An open file or directory of the view.
enum SnapHandle {
    File {
        snap: u64,
        ino: u64,
    },
    Dir {
        /// The listing served, taken at opendir and again at offset 0.
        entries: Mutex<Vec<DirEntry>>,
    },
}

/// The view's handle table.
#[derive(Default)]
pub(crate) struct SnapHandles {
    next: AtomicU64,
    open: RwLock<HashMap<u64, Arc<SnapHandle>>>,
}

impl SnapHandles {
    fn insert(&self, h: SnapHandle) -> u64 {
        let fh = SNAP_FH | (self.next.fetch_add(1, Ordering::Relaxed) + 1);
        self.open.write().insert(fh, Arc::new(h));
        fh
    }

    fn get(&self, fh: u64) -> Option<Arc<SnapHandle>> {
        self.open.read().get(&fh).cloned()
    }

    fn remove(&self, fh: u64) -> Option<Arc<SnapHandle>> {
        self.open.write().remove(&fh)
    }

    /// `(snapshot, inode)` of a file handle.
    fn file(&self, fh: u64) -> FsResult<(u64, u64)> {
        match self.open.read().get(&fh).map(|h| h.as_ref()) {
            Some(SnapHandle::File { snap, ino }) => Ok((*snap, *ino)),
            _ => Err(FsError::BadHandle),
        }
    }
}

fn attr_of_record(ino: u64, r: &InodeRecord, blocks: u64, blksize: u32) -> Attr {
    let (size, blocks) = match r.kind {
        NodeKind::Dir => (4096, 8),
        NodeKind::Symlink => (r.target.len() as u64, 0),
        NodeKind::File => (r.size, blocks),
        _ => (0, 0),
    };
    Attr {
        ino,
        kind: r.kind,
        size,
        blocks,
        atime: r.atime,
        mtime: r.mtime,
        ctime: r.ctime,
        mode: r.mode,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        blksize,
    }
}

impl SnapView<'_> {
    fn readable_snap(&self, id: u64) -> FsResult<Arc<SnapshotRecord>> {
        self.snaps
            .get(id)
            .filter(|r| r.is_readable())
            .ok_or(FsError::NotFound)
    }

    pub(crate) fn snapdir_attr(&self) -> Attr {
        let recs = self.snaps.records();
        let t = recs
            .iter()
            .map(|r| r.created)
            .max_by_key(|t| (t.secs, t.nanos))
            .unwrap_or_default();
        Attr {
            ino: SNAPDIR_INO,
            kind: NodeKind::Dir,
            size: 4096,
            blocks: 8,
            atime: t,
            mtime: t,
            ctime: t,
            mode: 0o555,
            nlink: 2 + recs.iter().filter(|r| r.is_readable()).count() as u32,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.pool.config().block_size.max(4096),
        }
    }

    pub(crate) fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let SnapIno::Node { snap, ino: inner } = decode(ino) else {
            return Ok(self.snapdir_attr());
        };
        let rec = self.readable_snap(snap)?;
        let r = rec.inodes.get(&inner).ok_or(FsError::NotFound)?;
        let blocks = if r.kind == NodeKind::File {
            self.snaps.allocated(snap, inner)
        } else {
            0
        };
        Ok(attr_of_record(
            ino,
            r,
            blocks,
            self.pool.config().block_size.max(4096),
        ))
    }

    /// `name` in directory `parent` of the view (`..` of `.snapshots`, the
    /// live root, is the route's).
    pub(crate) fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let SnapIno::Node { snap, ino: inner } = decode(parent) else {
            if name == b"." {
                return Ok(self.snapdir_attr());
            }
            let name = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
            let rec = self
                .snaps
                .by_name(name)
                .filter(|r| r.is_readable())
                .ok_or(FsError::NotFound)?;
            return self.getattr(snap_ino(rec.id, ROOT_INO));
        };
        let rec = self.readable_snap(snap)?;
        let child = match name {
            b"." => inner,
            b".." if inner == ROOT_INO => return Ok(self.snapdir_attr()),
            b".." => rec.inodes.get(&inner).ok_or(FsError::NotFound)?.parent,
            _ => *rec
                .dirents
                .get(&(inner, name.to_vec()))
                .ok_or(FsError::NotFound)?,
        };
        self.getattr(snap_ino(snap, child))
    }

    pub(crate) fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let SnapIno::Node { snap, ino } = decode(ino) else {
            return Err(FsError::NotFound);
        };
        let rec = self.readable_snap(snap)?;
        let r = rec.inodes.get(&ino).ok_or(FsError::NotFound)?;
        if r.kind != NodeKind::Symlink {
            return Err(FsError::Invalid);
        }
        Ok(r.target.clone())
    }

    pub(crate) fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let SnapIno::Node { snap, ino } = decode(ino) else {
            return Err(FsError::NoAttribute);
        };
        let rec = self.readable_snap(snap)?;
        let r = rec.inodes.get(&ino).ok_or(FsError::NotFound)?;
        r.xattrs.get(name).cloned().ok_or(FsError::NoAttribute)
    }

    pub(crate) fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let SnapIno::Node { snap, ino } = decode(ino) else {
            return Ok(Vec::new());
        };
        let rec = self.readable_snap(snap)?;
        let r = rec.inodes.get(&ino).ok_or(FsError::NotFound)?;
        Ok(xattr_names(&r.xattrs))
    }

    pub(crate) fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let SnapIno::Node { snap, ino: inner } = decode(ino) else {
            return Err(FsError::IsDir);
        };
        let rec = self.readable_snap(snap)?;
        match rec.inodes.get(&inner).map(|r| r.kind) {
            Some(NodeKind::File) => {}
            Some(NodeKind::Dir) => return Err(FsError::IsDir),
            Some(_) => return Err(FsError::Invalid),
            None => return Err(FsError::NotFound),
        }
        Ok(self
            .snap_handles
            .insert(SnapHandle::File { snap, ino: inner }))
    }

    /// Size of the file behind a handle of the view.
    pub(crate) fn handle_size(&self, fh: u64) -> FsResult<u64> {
        let (snap, ino) = self.snap_handles.file(fh)?;
        let rec = self.readable_snap(snap)?;
        Ok(rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0))
    }

    pub(crate) fn read(&self, fh: u64, off: u64, len: u32) -> FsResult<Vec<u8>> {
        let (snap, ino) = self.snap_handles.file(fh)?;
        self.snaps.read(snap, ino, off, len as u64)
    }

    pub(crate) fn lseek(&self, fh: u64, off: u64, whence: i32) -> FsResult<u64> {
        let (snap, ino) = self.snap_handles.file(fh)?;
        let rec = self.readable_snap(snap)?;
        let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
        let r = match whence {
            libc::SEEK_DATA => self.snaps.seek(snap, ino, off, true)?,
            libc::SEEK_HOLE => self.snaps.seek(snap, ino, off, false)?,
            libc::SEEK_SET => Some(off),
            libc::SEEK_END => Some(size.saturating_add(off)),
            _ => return Err(FsError::Invalid),
        };
        r.ok_or(FsError::NoData)
    }

    /// Nothing to make durable: a file of the view never changes.
    pub(crate) fn fsync(&self, fh: u64) -> FsResult<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.snap_handles.file(fh).map(|_| ())
    }

    pub(crate) fn release(&self, fh: u64) -> FsResult<()> {
        self.snap_handles
            .remove(fh)
            .map(|_| ())
            .ok_or(FsError::BadHandle)
    }

    pub(crate) fn opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.list_dir(ino)?;
        Ok(self.snap_handles.insert(SnapHandle::Dir {
            entries: Mutex::new(entries),
        }))
    }

    /// As [`super::core::Vfs::readdir`]: the listing taken at opendir, taken
    /// again at offset 0.
    pub(crate) fn readdir(&self, fh: u64, ino: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let h = self.snap_handles.get(fh).ok_or(FsError::BadHandle)?;
        let SnapHandle::Dir { entries } = h.as_ref() else {
            return Err(FsError::BadHandle);
        };
        entries_from(entries, offset, || self.list_dir(ino))
    }

    pub(crate) fn releasedir(&self, fh: u64) -> FsResult<()> {
        self.snap_handles.remove(fh);
        Ok(())
    }

    fn list_dir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let dots = |parent: u64| {
            vec![
                DirEntry {
                    ino,
                    kind: NodeKind::Dir,
                    name: b".".to_vec(),
                },
                DirEntry {
                    ino: parent,
                    kind: NodeKind::Dir,
                    name: b"..".to_vec(),
                },
            ]
        };
        let SnapIno::Node { snap, ino: inner } = decode(ino) else {
            let mut out = dots(ROOT_INO);
            for r in self.snaps.records() {
                if r.is_readable() {
                    out.push(DirEntry {
                        ino: snap_ino(r.id, ROOT_INO),
                        kind: NodeKind::Dir,
                        name: r.name.as_bytes().to_vec(),
                    });
                }
            }
            return Ok(out);
        };
        let rec = self.readable_snap(snap)?;
        let me = rec.inodes.get(&inner).ok_or(FsError::NotFound)?;
        if me.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        let mut out = dots(if inner == ROOT_INO {
            SNAPDIR_INO
        } else {
            snap_ino(snap, me.parent)
        });
        for ((_, name), child) in rec
            .dirents
            .range((inner, Vec::new())..)
            .take_while(|((p, _), _)| *p == inner)
        {
            let kind = rec
                .inodes
                .get(child)
                .map(|r| r.kind)
                .unwrap_or(NodeKind::File);
            out.push(DirEntry {
                ino: snap_ino(snap, *child),
                kind,
                name: name.clone(),
            });
        }
        Ok(out)
    }
}
