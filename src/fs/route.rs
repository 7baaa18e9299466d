//! The route: the filesystem operations of [`Vfs`] (what the FUSE adapter
//! and the model tests call), each sent to the view its inode or handle
//! belongs to (`ino.rs`): the live tree ([`Live`]) or the snapshot view
//! ([`SnapView`]). This is the one place that knows both; neither view
//! branches on the other's numbers.
//!
//! The boundary between the views is kept here:
//! - `.snapshots` is found by lookup in the live root, and listed there with
//!   `snapdir=visible`; its `..` is the live root;
//! - `mkdir`/`rmdir` directly in `.snapshots` create and delete snapshots
//!   (`snapcmd.rs`);
//! - any other change in the snapshot view is refused with EROFS, and so
//!   is a rename or link across the boundary (tests/suite/snapshots.rs pins
//!   EROFS; with EXDEV `mv` would copy out of a snapshot and then fail to
//!   remove the source);
//! - a handle of the snapshot view can be read, sought and copied from
//!   (`copy_file_range` into a live file), never written (EBADF);
//! - argument errors come before EROFS, as they do in the live tree.
//!
//! The commands (snapshots, members, scrub, jobs) and the commit are not
//! routed: they work on the whole filesystem.

use super::core::{Attr, Caller, DirEntry, Live, NAME_MAX, SetAttr, Vfs};
use super::data::CopySource;
use super::ino::{SNAPDIR_INO, SNAPDIR_NAME, View, view_of, view_of_handle};
use super::namespace::{check_symlink_target, mknod_kind};
use super::snapview::SnapView;
use crate::error::{FsError, FsResult};
use crate::pool::meta::{NodeKind, ROOT_INO};
use crate::volume::{ReadBuf, WriteMode};

/// An open file of either view, read through the route (the source of a
/// `copy_file_range`; each call looks its handle up again, as a read does).
struct RoutedFile<'a> {
    vfs: &'a Vfs,
    fh: u64,
}

impl CopySource for RoutedFile<'_> {
    fn size(&self) -> FsResult<u64> {
        match view_of_handle(self.fh) {
            View::Live => self.vfs.live().handle_size(self.fh),
            View::Snapshots => self.vfs.snapview().handle_size(self.fh),
        }
    }

    fn seek_data(&self, off: u64) -> FsResult<Option<u64>> {
        match self.vfs.lseek(self.fh, off, libc::SEEK_DATA) {
            Ok(d) => Ok(Some(d)),
            Err(FsError::NoData) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read(&self, off: u64, len: u32) -> FsResult<Vec<u8>> {
        self.vfs.read(self.fh, off, len)
    }
}

impl Vfs {
    fn live_or_snap(&self, ino: u64) -> Result<Live<'_>, SnapView<'_>> {
        match view_of(ino) {
            View::Live => Ok(self.live()),
            View::Snapshots => Err(self.snapview()),
        }
    }

    fn by_handle(&self, fh: u64) -> Result<Live<'_>, SnapView<'_>> {
        match view_of_handle(fh) {
            View::Live => Ok(self.live()),
            View::Snapshots => Err(self.snapview()),
        }
    }

    /// What the route adds to the listing of live directory `ino`.
    fn extra_entry(&self, ino: u64) -> Option<DirEntry> {
        (ino == ROOT_INO && self.opts.snapdir_visible).then(|| DirEntry {
            ino: SNAPDIR_INO,
            kind: NodeKind::Dir,
            name: SNAPDIR_NAME.to_vec(),
        })
    }

    // ----- names and attributes -----

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        match self.live_or_snap(parent) {
            Ok(_) if super::ino::is_reserved(parent, name) => Ok(self.snapview().snapdir_attr()),
            Ok(live) => live.lookup(parent, name),
            Err(_) if parent == SNAPDIR_INO && name == b".." => self.live().getattr(ROOT_INO),
            Err(snap) => snap.lookup(parent, name),
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        match self.live_or_snap(ino) {
            Ok(live) => live.getattr(ino),
            Err(snap) => snap.getattr(ino),
        }
    }

    pub fn setattr(&self, ino: u64, s: SetAttr) -> FsResult<Attr> {
        self.setattr_as(ino, s, None)
    }

    /// [`Vfs::setattr`] by `caller`, who lacks `CAP_FSETID` when given: a
    /// size change then clears the file's set-id bits.
    pub fn setattr_as(&self, ino: u64, s: SetAttr, caller: Option<Caller>) -> FsResult<Attr> {
        match self.live_or_snap(ino) {
            Ok(live) => live.setattr_as(ino, s, caller),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    /// Clears the set-id bits of a file before a write by `caller`, who
    /// lacks `CAP_FSETID`. Whether the mode changed.
    pub fn kill_setid(&self, ino: u64, caller: Caller) -> FsResult<bool> {
        match self.live_or_snap(ino) {
            Ok(live) => live.kill_setid(ino, caller),
            Err(_) => Ok(false),
        }
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.live_or_snap(ino) {
            Ok(live) => live.readlink(ino),
            Err(snap) => snap.readlink(ino),
        }
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
        match self.live_or_snap(parent) {
            Ok(live) => live.mknod(parent, name, mode, umask, rdev, caller),
            Err(_) => mknod_kind(mode).and(Err(FsError::ReadOnly)),
        }
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        match self.live_or_snap(parent) {
            Ok(live) => live.mkdir(parent, name, mode, umask, caller),
            Err(_) if parent == SNAPDIR_INO => self.mkdir_snapshot(name),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        match self.live_or_snap(parent) {
            Ok(live) => live.symlink(parent, name, target, caller),
            Err(_) => check_symlink_target(target).and(Err(FsError::ReadOnly)),
        }
    }

    /// Creates and opens a regular file: its attributes and handle.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        match self.live_or_snap(parent) {
            Ok(live) => live.create(parent, name, mode, umask, caller),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    /// Removes one link of a non-directory; the node lives on while it is open.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        match self.live_or_snap(parent) {
            Ok(live) => live.unlink(parent, name),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        match self.live_or_snap(parent) {
            Ok(live) => live.rmdir(parent, name),
            Err(_) if parent == SNAPDIR_INO => self.rmdir_snapshot(name),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        match (self.live_or_snap(ino), view_of(newparent)) {
            (Ok(live), View::Live) => live.link(ino, newparent, newname),
            _ => Err(FsError::ReadOnly),
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
        match (self.live_or_snap(parent), view_of(newparent)) {
            (Ok(live), View::Live) => live.rename(parent, name, newparent, newname, flags),
            _ => Err(FsError::ReadOnly),
        }
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        match self.live_or_snap(ino) {
            Ok(live) => live.setxattr(ino, name, value, flags),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        match self.live_or_snap(ino) {
            Ok(live) => live.getxattr(ino, name),
            Err(snap) => snap.getxattr(ino, name),
        }
    }

    /// Names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.live_or_snap(ino) {
            Ok(live) => live.listxattr(ino),
            Err(snap) => snap.listxattr(ino),
        }
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        match self.live_or_snap(ino) {
            Ok(live) => live.removexattr(ino, name),
            Err(_) => Err(FsError::ReadOnly),
        }
    }

    // ----- open files -----

    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        match self.live_or_snap(ino) {
            Ok(live) => live.open(ino, write),
            Err(snap) => snap.open(ino, write),
        }
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        match self.by_handle(fh) {
            Ok(live) => live.release(fh),
            Err(snap) => snap.release(fh),
        }
    }

    pub fn read(&self, fh: u64, off: u64, len: u32) -> FsResult<Vec<u8>> {
        self.read_io(fh, off, len, false).map(ReadBuf::into_vec)
    }

    /// [`Vfs::read`] for an `O_DIRECT` open when `direct`: aligned member
    /// reads bypass the host's page cache (no double caching under a VM
    /// with `cache=none`).
    pub fn read_io(&self, fh: u64, off: u64, len: u32, direct: bool) -> FsResult<ReadBuf> {
        match self.by_handle(fh) {
            Ok(live) => live.read_io(fh, off, len, direct),
            Err(snap) => snap.read(fh, off, len).map(ReadBuf::from),
        }
    }

    /// A long read of a cached open (the kernel's readahead): like
    /// [`Vfs::read_io`] with `direct`, served from the daemon's read-ahead
    /// where it holds the range.
    pub fn read_stream(&self, fh: u64, off: u64, len: u32) -> FsResult<ReadBuf> {
        match self.by_handle(fh) {
            Ok(live) => live.read_stream(fh, off, len),
            Err(snap) => snap.read(fh, off, len).map(ReadBuf::from),
        }
    }

    /// After a [`Vfs::read_stream`] was answered: reads the stream's next
    /// request ahead (live files; best effort).
    pub fn read_ahead(&self, fh: u64, off: u64, len: u32) {
        if let Ok(live) = self.by_handle(fh) {
            live.read_ahead(fh, off, len);
        }
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        self.write_io(fh, off, data, WriteMode::Cached)
    }

    /// [`Vfs::write`] in `mode` (see [`crate::volume::Volume::write_io`]).
    pub fn write_io(&self, fh: u64, off: u64, data: &[u8], mode: WriteMode) -> FsResult<u32> {
        match self.by_handle(fh) {
            Ok(live) => live.write_io(fh, off, data, mode),
            Err(_) => self.writable().and(Err(FsError::BadHandle)),
        }
    }

    /// fallocate: plain allocation (extends the size unless KEEP_SIZE), PUNCH_HOLE
    /// (with KEEP_SIZE) and ZERO_RANGE.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        match self.by_handle(fh) {
            Ok(live) => live.fallocate(fh, off, len, mode),
            Err(_) => self.writable().and(Err(FsError::BadHandle)),
        }
    }

    pub fn lseek(&self, fh: u64, off: u64, whence: i32) -> FsResult<u64> {
        match self.by_handle(fh) {
            Ok(live) => live.lseek(fh, off, whence),
            Err(snap) => snap.lseek(fh, off, whence),
        }
    }

    /// Copies `len` bytes from `fh_in` (a file of either view) to live file
    /// `fh_out`; holes stay holes (see `Live::copy_file_range`).
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        let src = RoutedFile {
            vfs: self,
            fh: fh_in,
        };
        match self.by_handle(fh_out) {
            Ok(live) => live.copy_file_range(&src, off_in, fh_out, off_out, len),
            // The source is sized first, as for a live destination; a copy
            // from past its end copies nothing.
            Err(_) => {
                self.writable()?;
                if off_in >= src.size()? {
                    return Ok(0);
                }
                Err(FsError::BadHandle)
            }
        }
    }

    /// fsync/fdatasync of an open file (see `Live::fsync`).
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        match self.by_handle(fh) {
            Ok(live) => live.fsync(fh, datasync),
            Err(snap) => snap.fsync(fh),
        }
    }

    // ----- directories -----

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        match self.live_or_snap(ino) {
            Ok(live) => live.opendir(ino, self.extra_entry(ino)),
            Err(snap) => snap.opendir(ino),
        }
    }

    /// Entries from position `offset` on; entry `i` has offset `i + 1`. The listing
    /// is taken at opendir (and again on rewind) so removals while reading skip nothing.
    pub fn readdir(&self, fh: u64, ino: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        match self.by_handle(fh) {
            Ok(live) => live.readdir(fh, ino, offset, self.extra_entry(ino)),
            Err(snap) => snap.readdir(fh, ino, offset),
        }
    }

    pub fn releasedir(&self, fh: u64) -> FsResult<()> {
        match self.by_handle(fh) {
            Ok(live) => live.releasedir(fh),
            Err(snap) => snap.releasedir(fh),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ino::SNAP_FH;
    use crate::error::FsError;
    use crate::fs::testing::{ME, open, open_with, setup};
    use crate::fs::{SetAttr, VfsOptions};
    use crate::pool::meta::{NodeKind, ROOT_INO};

    fn names(v: &crate::fs::Vfs, ino: u64) -> Vec<Vec<u8>> {
        let fh = v.opendir(ino).unwrap();
        let out = v
            .readdir(fh, ino, 0)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.name)
            .collect();
        v.releasedir(fh).unwrap();
        out
    }

    /// The boundary between the views, as the route keeps it.
    #[test]
    fn the_boundary_between_live_tree_and_snapshots() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (f, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[7u8; 100_000]).unwrap();
        // `.snapshots` is found in the root, hidden from its listing, and
        // cannot be made there; its `..` is the root.
        let sd = v.lookup(ROOT_INO, b".snapshots").unwrap();
        assert_eq!(sd.ino, super::SNAPDIR_INO);
        assert_eq!(sd.kind, NodeKind::Dir);
        assert!(!names(&v, ROOT_INO).contains(&b".snapshots".to_vec()));
        assert_eq!(v.lookup(sd.ino, b"..").unwrap().ino, ROOT_INO);
        assert!(matches!(
            v.mkdir(ROOT_INO, b".snapshots", 0o755, 0, ME),
            Err(FsError::Exists)
        ));
        assert!(matches!(
            v.rename(ROOT_INO, b"f", ROOT_INO, b".snapshots", 0),
            Err(FsError::Exists)
        ));
        // mkdir in `.snapshots` takes a snapshot, readable through the view.
        let s1 = v.mkdir(sd.ino, b"s1", 0o755, 0, ME).unwrap();
        v.snapshot_wait().unwrap();
        assert_eq!(names(&v, sd.ino), [&b"."[..], b"..", b"s1"]);
        assert_eq!(v.lookup(s1.ino, b"..").unwrap().ino, sd.ino);
        let sf = v.lookup(s1.ino, b"f").unwrap();
        assert_ne!(sf.ino, f.ino);
        assert_eq!(sf.size, 100_000);
        let sfh = v.open(sf.ino, false).unwrap();
        assert_ne!(
            sfh & SNAP_FH,
            0,
            "a snapshot handle is in the snapshot range"
        );
        assert_eq!(v.read(sfh, 0, 10).unwrap(), vec![7u8; 10]);
        // Everything but reading is refused in the view, across it too.
        assert!(matches!(v.open(sf.ino, true), Err(FsError::ReadOnly)));
        assert!(matches!(v.write(sfh, 0, b"x"), Err(FsError::BadHandle)));
        assert!(matches!(
            v.setattr(sf.ino, SetAttr::default()),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            v.create(s1.ino, b"new", 0o644, 0, ME),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            v.mkdir(s1.ino, b"d", 0o755, 0, ME),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            v.rename(s1.ino, b"f", ROOT_INO, b"g", 0),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            v.rename(ROOT_INO, b"f", s1.ino, b"g", 0),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            v.link(sf.ino, ROOT_INO, b"g"),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            v.link(f.ino, s1.ino, b"g"),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(v.unlink(s1.ino, b"f"), Err(FsError::ReadOnly)));
        assert!(matches!(
            v.setxattr(sf.ino, b"user.a", b"1", 0),
            Err(FsError::ReadOnly)
        ));
        // A snapshot file copies into a live one, and the live file's
        // change does not reach the snapshot.
        v.write(fh, 0, &[9u8; 10]).unwrap();
        let (_, gh) = v.create(ROOT_INO, b"g", 0o644, 0, ME).unwrap();
        assert_eq!(v.copy_file_range(sfh, 0, gh, 0, 200_000).unwrap(), 100_000);
        assert_eq!(v.read(gh, 0, 10).unwrap(), vec![7u8; 10]);
        assert_eq!(v.read(sfh, 0, 10).unwrap(), vec![7u8; 10]);
        assert!(v.fsync(sfh, false).is_ok());
        v.release(sfh).unwrap();
        assert!(matches!(v.release(sfh), Err(FsError::BadHandle)));
        v.release(gh).unwrap();
        v.release(fh).unwrap();
        // rmdir in `.snapshots` deletes the snapshot.
        v.rmdir(sd.ino, b"s1").unwrap();
        assert!(matches!(v.lookup(sd.ino, b"s1"), Err(FsError::NotFound)));
        drop(v);
        // snapdir=visible lists it last in the root; a read-only mount
        // browses but makes no snapshot.
        let v = open_with(
            &dirs[0],
            VfsOptions {
                read_only: true,
                snapdir_visible: true,
            },
        );
        assert_eq!(names(&v, ROOT_INO).last().unwrap(), b".snapshots");
        assert!(matches!(
            v.mkdir(super::SNAPDIR_INO, b"s2", 0o755, 0, ME),
            Err(FsError::ReadOnly)
        ));
    }
}
