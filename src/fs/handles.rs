//! Open files and directories of the live tree: the handle table.
//!
//! A handle holds its `Arc<Node>`, so the data path never looks a name or an
//! inode up, and a node unlinked (or a directory removed) while open lives
//! on until its last handle goes: `Node::open` counts the handles, and the
//! last release frees a node that has no link left (re-checked under `ns`,
//! where `link` would have raced).
//!
//! Invariants: live handles are numbered from 1 up (the snapshot view's carry
//! bit 63, `ino.rs`); `Vfs::handles` is held only to insert, find or remove
//! a handle, never while another lock is taken; a directory handle's listing
//! mutex is taken before `ns` (readdir at offset 0 lists again).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use super::core::{DirEntry, Live};
use super::node::Node;
use crate::error::{FsError, FsResult};
use crate::pool::meta::NodeKind;

pub(crate) enum Handle {
    File {
        node: Arc<Node>,
    },
    Dir {
        /// The listing served, taken at opendir and again at offset 0.
        entries: Mutex<Vec<DirEntry>>,
        /// The directory, kept while open.
        node: Arc<Node>,
    },
}

/// Entries of a listing from position `offset` on; entry `i` has offset
/// `i + 1`. At offset 0 the listing is taken again with `relist` (both views
/// serve their directories this way).
pub(crate) fn entries_from(
    entries: &Mutex<Vec<DirEntry>>,
    offset: u64,
    relist: impl FnOnce() -> FsResult<Vec<DirEntry>>,
) -> FsResult<Vec<(u64, DirEntry)>> {
    let mut e = entries.lock();
    if offset == 0 {
        *e = relist()?;
    }
    Ok(e.iter()
        .enumerate()
        .skip(offset as usize)
        .map(|(i, d)| (i as u64 + 1, d.clone()))
        .collect())
}

impl Live<'_> {
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

    pub(crate) fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
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

    pub(crate) fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.write().remove(&fh).ok_or(FsError::BadHandle)?;
        if let Handle::File { node } = h.as_ref()
            && node.open.fetch_sub(1, Ordering::AcqRel) == 1
        {
            if let Some(v) = &node.volume {
                v.forget_read_ahead();
            }
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

    /// Opens directory `ino`; `extra` are entries the route adds at the end
    /// of its listing (`.snapshots` in the root).
    pub(crate) fn opendir(&self, ino: u64, extra: Option<DirEntry>) -> FsResult<u64> {
        let entries = self.list_dir(ino, extra)?;
        let node = self.ns.read().node(ino)?;
        node.open.fetch_add(1, Ordering::AcqRel);
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

    /// Entries from position `offset` on; entry `i` has offset `i + 1`. The listing
    /// is taken at opendir (and again on rewind) so removals while reading skip nothing.
    pub(crate) fn readdir(
        &self,
        fh: u64,
        ino: u64,
        offset: u64,
        extra: Option<DirEntry>,
    ) -> FsResult<Vec<(u64, DirEntry)>> {
        let h = self
            .handles
            .read()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let Handle::Dir { entries, .. } = h.as_ref() else {
            return Err(FsError::BadHandle);
        };
        entries_from(entries, offset, || self.list_dir(ino, extra))
    }

    pub(crate) fn releasedir(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.write().remove(&fh);
        if let Some(h) = h
            && let Handle::Dir { node, .. } = h.as_ref()
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

    fn list_dir(&self, ino: u64, extra: Option<DirEntry>) -> FsResult<Vec<DirEntry>> {
        let ns = self.ns.read();
        let dir = ns.dir(ino)?;
        let parent = ns.node(ino)?.meta.lock().parent;
        let mut out = Vec::with_capacity(dir.len() + 3);
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
        out.extend(extra);
        Ok(out)
    }
}
