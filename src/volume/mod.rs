//! A file's data: its extent map and the read/write/punch/seek path.
//!
//! The life of an extent: a write lands in extent `i` (bytes `[i*E, (i+1)*E)`) of
//! a file that has none there; the pool places it on a member and creates the
//! sparse member file `data/<ino>.<i>.<file_id>`; data is written at the same
//! offset within it as within the extent, so holes stay holes. The extent is
//! `fresh` until a durable commit has fsynced its directory entry, and `dirty`
//! until its data has been fdatasynced. It leaves the map on truncate or delete,
//! and its file is removed only after the commit that dropped it is durable.
//!
//! Locking: the map is behind an `RwLock` taken for reading on every I/O and for
//! writing only to add or drop extents; member file I/O is positional
//! (`pread`/`pwrite`) and runs without any lock held.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::meta::ExtentRecord;

pub struct Extent {
    pub index: u64,
    pub file_id: u64,
    pub member: u32,
    file: RwLock<Option<Arc<File>>>,
    /// Data written since the last fdatasync.
    dirty: AtomicBool,
    /// Created since the last durable commit (its directory entry needs an fsync).
    fresh: AtomicBool,
    /// Allocated bytes of the member file, valid unless `blocks_stale`.
    blocks: AtomicU64,
    blocks_stale: AtomicBool,
}

impl Extent {
    fn new(index: u64, file_id: u64, member: u32, file: Option<File>, fresh: bool) -> Extent {
        Extent {
            index,
            file_id,
            member,
            file: RwLock::new(file.map(Arc::new)),
            dirty: AtomicBool::new(fresh),
            fresh: AtomicBool::new(fresh),
            blocks: AtomicU64::new(0),
            blocks_stale: AtomicBool::new(true),
        }
    }

    fn file(&self, pool: &Pool, ino: u64) -> FsResult<Arc<File>> {
        if let Some(f) = self.file.read().as_ref() {
            return Ok(f.clone());
        }
        let mut g = self.file.write();
        if let Some(f) = g.as_ref() {
            return Ok(f.clone());
        }
        let f = Arc::new(pool.open_extent_file(self.member, ino, self.index, self.file_id)?);
        *g = Some(f.clone());
        Ok(f)
    }

    /// The commit referencing this extent is durable, its directory entry too.
    pub fn mark_published(&self) {
        self.fresh.store(false, Ordering::Release);
    }

    fn written(&self) {
        self.dirty.store(true, Ordering::Release);
        self.blocks_stale.store(true, Ordering::Release);
    }
}

/// One piece of an I/O split at extent boundaries.
struct Piece {
    index: u64,
    /// Offset within the extent.
    within: u64,
    len: usize,
    /// Offset within the caller's buffer.
    buf_off: usize,
}

fn pieces(esize: u64, off: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut pos = off;
    let end = off + len as u64;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / esize;
        let within = pos % esize;
        let n = (esize - within).min(end - pos);
        let p = Piece {
            index,
            within,
            len: n as usize,
            buf_off: (pos - off) as usize,
        };
        pos += n;
        Some(p)
    })
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid descriptor with plain integer arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lseek(f: &File, off: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor; moves only that descriptor's offset,
    // which vpool never uses (all I/O is positional).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

fn map_write_err(e: io::Error) -> FsError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        FsError::NoSpace
    } else {
        FsError::Io(e)
    }
}

/// Whether `[off, off+len)` of `f` is already fully allocated (writing it needs no space).
fn fully_allocated(f: &File, off: u64, len: u64) -> io::Result<bool> {
    match lseek(f, off, libc::SEEK_HOLE)? {
        Some(h) => Ok(h >= off + len),
        None => Ok(false),
    }
}

pub struct Volume {
    pub ino: u64,
    esize: u64,
    map: RwLock<BTreeMap<u64, Arc<Extent>>>,
}

/// An extent file that can be removed once the commit dropping it is durable:
/// `(member, ino, index, file_id)`.
pub type DeadExtent = (u32, u64, u64, u64);

impl Volume {
    pub fn new(ino: u64, esize: u64, records: &[ExtentRecord]) -> Volume {
        let map = records
            .iter()
            .filter_map(|r| {
                r.members.first().map(|m| {
                    (
                        r.index,
                        Arc::new(Extent::new(r.index, r.file_id, *m, None, false)),
                    )
                })
            })
            .collect();
        Volume {
            ino,
            esize,
            map: RwLock::new(map),
        }
    }

    pub fn records(&self) -> Vec<ExtentRecord> {
        self.map
            .read()
            .values()
            .map(|e| ExtentRecord {
                index: e.index,
                file_id: e.file_id,
                members: vec![e.member],
            })
            .collect()
    }

    fn get(&self, index: u64) -> Option<Arc<Extent>> {
        self.map.read().get(&index).cloned()
    }

    fn get_or_alloc(&self, pool: &Pool, index: u64) -> FsResult<Arc<Extent>> {
        if let Some(e) = self.get(index) {
            return Ok(e);
        }
        let mut m = self.map.write();
        if let Some(e) = m.get(&index) {
            return Ok(e.clone());
        }
        let (member, fid, file) = pool.create_extent_file(self.ino, index, &[])?;
        let e = Arc::new(Extent::new(index, fid, member, Some(file), true));
        m.insert(index, e.clone());
        Ok(e)
    }

    /// Reads `len` bytes at `off` of a file of `size` bytes; holes read as zeros.
    pub fn read(&self, pool: &Pool, off: u64, len: usize, size: u64) -> FsResult<Vec<u8>> {
        if off >= size {
            return Ok(Vec::new());
        }
        let len = (len as u64).min(size - off) as usize;
        let mut buf = vec![0u8; len];
        for p in pieces(self.esize, off, len) {
            let Some(ext) = self.get(p.index) else {
                continue;
            };
            let f = ext.file(pool, self.ino)?;
            let dst = &mut buf[p.buf_off..p.buf_off + p.len];
            let mut done = 0;
            while done < dst.len() {
                match f.read_at(&mut dst[done..], p.within + done as u64) {
                    Ok(0) => break, // past the member file's end: a hole
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(FsError::Io(e)),
                }
            }
        }
        Ok(buf)
    }

    /// Writes `data` at `off`, placing new extents as needed.
    pub fn write(&self, pool: &Pool, off: u64, data: &[u8]) -> FsResult<()> {
        for p in pieces(self.esize, off, data.len()) {
            let ext = self.get_or_alloc(pool, p.index)?;
            let f = ext.file(pool, self.ino)?;
            let member = pool
                .member(ext.member)
                .ok_or_else(|| FsError::Corrupt(format!("unknown member {}", ext.member)))?;
            // Near the reserve, only overwrites of allocated ranges may proceed.
            if member.available().map_err(FsError::Io)? < p.len as u64
                && !fully_allocated(&f, p.within, p.len as u64).map_err(FsError::Io)?
            {
                return Err(FsError::NoSpace);
            }
            let res = f.write_all_at(&data[p.buf_off..p.buf_off + p.len], p.within);
            ext.written();
            if let Err(e) = res {
                member.invalidate_space();
                return Err(map_write_err(e));
            }
        }
        Ok(())
    }

    /// Deallocates `[off, off+len)`; reads of it return zeros afterwards.
    pub fn punch(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let Some(ext) = self.get(p.index) else {
                continue;
            };
            let f = ext.file(pool, self.ino)?;
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                p.within,
                p.len as u64,
            )
            .map_err(FsError::Io)?;
            ext.written();
            if let Some(m) = pool.member(ext.member) {
                m.invalidate_space();
            }
        }
        Ok(())
    }

    /// Makes `[off, off+len)` read as zeros and stay allocated.
    pub fn zero_range(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let ext = self.get_or_alloc(pool, p.index)?;
            let f = ext.file(pool, self.ino)?;
            let zr = fallocate(
                &f,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                p.within,
                p.len as u64,
            );
            if let Err(e) = zr {
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(map_write_err(e));
                }
                // The member filesystem lacks ZERO_RANGE: punch, then allocate.
                fallocate(
                    &f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    p.within,
                    p.len as u64,
                )
                .map_err(FsError::Io)?;
                fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, p.within, p.len as u64)
                    .map_err(map_write_err)?;
            }
            ext.written();
        }
        Ok(())
    }

    /// Preallocates `[off, off+len)`.
    pub fn allocate(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let ext = self.get_or_alloc(pool, p.index)?;
            let f = ext.file(pool, self.ino)?;
            let member = pool
                .member(ext.member)
                .ok_or_else(|| FsError::Corrupt(format!("unknown member {}", ext.member)))?;
            if member.available().map_err(FsError::Io)? < p.len as u64
                && !fully_allocated(&f, p.within, p.len as u64).map_err(FsError::Io)?
            {
                return Err(FsError::NoSpace);
            }
            fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, p.within, p.len as u64).map_err(|e| {
                member.invalidate_space();
                map_write_err(e)
            })?;
            ext.written();
        }
        Ok(())
    }

    /// Shrinks the data to `new_size`: cuts the extent holding the new end and drops
    /// every extent past it. Returns the dropped extents' files for later removal.
    pub fn truncate(&self, pool: &Pool, new_size: u64) -> FsResult<Vec<DeadExtent>> {
        let first_dead = new_size.div_ceil(self.esize);
        let cut = new_size % self.esize;
        if cut != 0
            && let Some(ext) = self.get(new_size / self.esize)
        {
            let f = ext.file(pool, self.ino)?;
            let len = f.metadata().map_err(FsError::Io)?.len();
            if len > cut {
                f.set_len(cut).map_err(FsError::Io)?;
                ext.written();
            }
        }
        let mut m = self.map.write();
        let dead: Vec<u64> = m.range(first_dead..).map(|(k, _)| *k).collect();
        let mut out = Vec::new();
        for k in dead {
            if let Some(e) = m.remove(&k) {
                out.push((e.member, self.ino, e.index, e.file_id));
            }
        }
        Ok(out)
    }

    /// All extent files (for deleting the whole file).
    pub fn all_files(&self) -> Vec<DeadExtent> {
        self.map
            .read()
            .values()
            .map(|e| (e.member, self.ino, e.index, e.file_id))
            .collect()
    }

    /// SEEK_DATA: the first data offset at or after `off`, `None` when only holes follow.
    pub fn seek_data(&self, pool: &Pool, off: u64, size: u64) -> FsResult<Option<u64>> {
        if off >= size {
            return Ok(None);
        }
        let exts: Vec<Arc<Extent>> = self
            .map
            .read()
            .range(off / self.esize..)
            .map(|(_, e)| e.clone())
            .collect();
        for ext in exts {
            let start = ext.index * self.esize;
            if start >= size {
                break;
            }
            let within = off.saturating_sub(start);
            let f = ext.file(pool, self.ino)?;
            if let Some(pos) = lseek(&f, within, libc::SEEK_DATA).map_err(FsError::Io)? {
                let abs = start + pos;
                if pos < self.esize && abs < size {
                    return Ok(Some(abs.max(off)));
                }
            }
        }
        Ok(None)
    }

    /// SEEK_HOLE: the first hole offset at or after `off` (the end of file counts).
    pub fn seek_hole(&self, pool: &Pool, off: u64, size: u64) -> FsResult<Option<u64>> {
        if off >= size {
            return Ok(None);
        }
        let mut pos = off;
        while pos < size {
            let index = pos / self.esize;
            let start = index * self.esize;
            let Some(ext) = self.get(index) else {
                return Ok(Some(pos));
            };
            let f = ext.file(pool, self.ino)?;
            match lseek(&f, pos - start, libc::SEEK_HOLE).map_err(FsError::Io)? {
                Some(h) if h < self.esize => return Ok(Some((start + h).min(size))),
                // Past the member file's end (ENXIO) is a hole too.
                None => return Ok(Some(pos)),
                Some(_) => pos = start + self.esize,
            }
        }
        Ok(Some(size))
    }

    /// Allocated 512-byte blocks over all extents (what `st_blocks` reports).
    pub fn blocks(&self, pool: &Pool) -> u64 {
        let exts: Vec<Arc<Extent>> = self.map.read().values().cloned().collect();
        let mut total = 0;
        for e in exts {
            if e.blocks_stale.swap(false, Ordering::AcqRel) {
                let b = e
                    .file(pool, self.ino)
                    .ok()
                    .and_then(|f| f.metadata().ok())
                    .map(|m| m.blocks())
                    .unwrap_or(0);
                e.blocks.store(b, Ordering::Release);
            }
            total += e.blocks.load(Ordering::Acquire);
        }
        total
    }

    /// fdatasyncs written extents. Adds the members whose data directory gained
    /// entries to `new_dirs` (the caller fsyncs those directories) and the new
    /// extents to `fresh`; the caller marks them published once the commit that
    /// references them is durable.
    pub fn sync(
        &self,
        pool: &Pool,
        new_dirs: &mut HashSet<u32>,
        fresh: &mut Vec<Arc<Extent>>,
    ) -> FsResult<()> {
        let exts: Vec<Arc<Extent>> = self.map.read().values().cloned().collect();
        for e in exts {
            if e.dirty.swap(false, Ordering::AcqRel) {
                let f = e.file(pool, self.ino)?;
                if let Err(err) = f.sync_data() {
                    e.dirty.store(true, Ordering::Release);
                    return Err(FsError::Io(err));
                }
            }
            if e.fresh.load(Ordering::Acquire) {
                new_dirs.insert(e.member);
                fresh.push(e);
            }
        }
        Ok(())
    }

    /// Whether any extent has unsynced data or an unsynced directory entry.
    pub fn needs_sync(&self) -> bool {
        self.map
            .read()
            .values()
            .any(|e| e.dirty.load(Ordering::Acquire) || e.fresh.load(Ordering::Acquire))
    }

    /// Closes the member files (after the last handle of the file is released).
    pub fn close_files(&self) {
        for e in self.map.read().values() {
            if !e.dirty.load(Ordering::Acquire) {
                *e.file.write() = None;
            }
        }
    }
}
