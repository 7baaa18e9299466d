//! Names and attributes of the live tree: lookup, attributes, creation,
//! removal, links, rename and extended attributes.
//!
//! Invariants kept here:
//! - a directory has `nlink` 2 plus one per subdirectory, and its `parent`
//!   names the directory holding it (`..`); no directory gets a second link;
//! - a new entry's name passes [`check_new_name`]: not empty, not `.`/`..`,
//!   no `/` or control character, at most `NAME_MAX` bytes, and not a name
//!   the route takes for itself (`.snapshots` in the root, `ino.rs`);
//! - nothing is created in a directory that was removed while open;
//! - every change marks the nodes it touched dirty (`Node::touch`) and goes
//!   through `Namespace::set_entry`, so the next commit writes all of it.
//!
//! Only live inodes reach these methods (the route sends the others to the
//! snapshot view); changes take `ns` for writing, then `Node::meta`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::core::{
    Attr, Caller, Live, NAME_MAX, SetAttr, TimeSet, XATTR_MAX_BYTES, XATTR_MAX_COUNT,
    XATTR_SIZE_MAX,
};
use super::node::{Namespace, NewNode, Node, NodeMeta};
use crate::error::{FsError, FsResult};
use crate::pool::meta::NodeKind;
use crate::volume::Volume;

/// `mode` of a file with group `gid` after a write or truncate by `caller`,
/// who lacks `CAP_FSETID`: set-user-ID goes; set-group-ID goes when group
/// execute is set (without it the bit marks mandatory locking and stays)
/// or when the caller is not of the file's group (the kernel's
/// `setattr_should_drop_sgid`; only the caller's primary group is known
/// here, so a member through a supplementary group loses the bit too).
pub(crate) fn mode_without_setid(mode: u32, gid: u32, caller: Caller) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if m & libc::S_ISGID != 0 && (m & libc::S_IXGRP != 0 || caller.gid != gid) {
        m &= !libc::S_ISGID;
    }
    m
}

/// Longest symlink target.
const SYMLINK_MAX: usize = 4096;

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

/// [`check_name`], and the name is not taken by the route in `parent`.
fn check_new_name(parent: u64, name: &[u8]) -> FsResult<()> {
    check_name(name)?;
    if super::ino::is_reserved(parent, name) {
        return Err(FsError::Exists);
    }
    Ok(())
}

/// The kind of node `mknod` makes of `mode`.
pub(crate) fn mknod_kind(mode: u32) -> FsResult<NodeKind> {
    Ok(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => NodeKind::File,
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFSOCK => NodeKind::Socket,
        libc::S_IFCHR => NodeKind::CharDev,
        libc::S_IFBLK => NodeKind::BlockDev,
        libc::S_IFDIR => NodeKind::Dir,
        _ => return Err(FsError::Invalid),
    })
}

/// Whether `target` may be a symlink's.
pub(crate) fn check_symlink_target(target: &[u8]) -> FsResult<()> {
    if target.len() > SYMLINK_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

/// The names of `xattrs`, each followed by a NUL, as listxattr(2) returns them.
pub(crate) fn xattr_names(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for k in xattrs.keys() {
        out.extend_from_slice(k);
        out.push(0);
    }
    out
}

impl Live<'_> {
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

    pub(crate) fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
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

    pub(crate) fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let node = self.ns.read().node(ino)?;
        Ok(self.attr_of(&node))
    }

    pub(crate) fn setattr(&self, ino: u64, s: SetAttr) -> FsResult<Attr> {
        self.setattr_as(ino, s, None)
    }

    /// [`Live::setattr`] for `caller`, who lacks `CAP_FSETID` when given: a
    /// size change then clears the set-id bits of a regular file, as the
    /// kernel's truncate does (with `FUSE_HANDLE_KILLPRIV_V2` the kernel
    /// leaves this to the filesystem).
    pub(crate) fn setattr_as(
        &self,
        ino: u64,
        s: SetAttr,
        caller: Option<Caller>,
    ) -> FsResult<Attr> {
        self.writable()?;
        let _g = self.gate.read();
        let node = self.ns.read().node(ino)?;
        let now = self.now();
        if let Some(size) = s.size {
            self.set_size(&node, size, now)?;
        }
        {
            let mut m = node.meta.lock();
            if let Some(c) = caller
                && s.size.is_some()
                && s.mode.is_none()
                && m.kind == NodeKind::File
            {
                m.mode = mode_without_setid(m.mode, m.gid, c);
            }
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

    /// Before a write by `caller`, who lacks `CAP_FSETID` (the kernel says so
    /// with `FUSE_WRITE_KILL_SUIDGID`): clears the set-id bits of a regular
    /// file, as the kernel's `file_remove_privs` does. Whether the mode
    /// changed (the kernel's cached attributes are then stale).
    pub(crate) fn kill_setid(&self, ino: u64, caller: Caller) -> FsResult<bool> {
        let node = self.ns.read().node(ino)?;
        let changed = {
            let mut m = node.meta.lock();
            let mode = mode_without_setid(m.mode, m.gid, caller);
            if m.kind != NodeKind::File || mode == m.mode {
                return Ok(false);
            }
            m.mode = mode;
            m.ctime = self.now();
            true
        };
        node.touch();
        Ok(changed)
    }

    pub(crate) fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
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
        check_new_name(parent, name)?;
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
        let meta = NodeMeta {
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
        };
        let volume = (kind == NodeKind::File).then(|| {
            Arc::new(Volume::new(
                ino,
                self.pool.config().extent_size,
                self.pool.config().block_size as u64,
                &[],
                [],
            ))
        });
        let node = Arc::new(Node::new(ino, meta, volume, true, u64::MAX));
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

    pub(crate) fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let kind = mknod_kind(mode)?;
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

    pub(crate) fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
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

    pub(crate) fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        check_symlink_target(target)?;
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

    pub(crate) fn create(
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
    pub(crate) fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
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

    pub(crate) fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
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

    pub(crate) fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        self.writable()?;
        check_new_name(newparent, newname)?;
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

    pub(crate) fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.writable()?;
        check_new_name(newparent, newname)?;
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
        if src_is_dir && newparent != parent && ns.is_within(newparent, src_ino) {
            return Err(FsError::Invalid);
        }
        let now = self.now();
        if exchange {
            let dst_ino = dst_ino.ok_or(FsError::NotFound)?;
            let dst = ns.node(dst_ino)?;
            let dst_is_dir = dst.kind() == NodeKind::Dir;
            if dst_is_dir && newparent != parent && ns.is_within(parent, dst_ino) {
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

    pub(crate) fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        self.writable()?;
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

    pub(crate) fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let node = self.ns.read().node(ino)?;
        let m = node.meta.lock();
        m.xattrs.get(name).cloned().ok_or(FsError::NoAttribute)
    }

    pub(crate) fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let node = self.ns.read().node(ino)?;
        Ok(xattr_names(&node.meta.lock().xattrs))
    }

    pub(crate) fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        let node = self.ns.read().node(ino)?;
        {
            let mut m = node.meta.lock();
            m.xattrs.remove(name).ok_or(FsError::NoAttribute)?;
            m.ctime = self.now();
        }
        node.touch();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::error::FsError;
    use crate::fs::testing::{ME, open, setup};
    use crate::pool::meta::{NodeKind, ROOT_INO};

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
}
