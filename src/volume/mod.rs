//! A file's data: its extent map and the read/write/punch/seek path.
//!
//! The life of an extent: a write lands in extent `i` (bytes `[i*E, (i+1)*E)`) of
//! a file that has none there; the pool places its copies (one per `copies`, on
//! distinct members) and creates the sparse member files
//! `data/<ino>.<i>.<file_id>`; data is written at the same offset within them as
//! within the extent, so holes stay holes. Every write goes to every copy; reads
//! are served by the first copy that answers. The extent is `fresh` until a
//! durable commit has fsynced its directory entries, and `dirty` until its data
//! has been fdatasynced. It leaves the map on truncate or delete, and its files
//! are removed only after the commit that dropped it is durable.
//!
//! Every change to an extent (write, punch, zero range, preallocation, a cut by
//! truncate) is preceded, the first time since the last commit, by a durable
//! write-intent record (pool/intent.rs), and marks its blocks in the volume's
//! changed-block bitmap (CBT), which the commit persists per extent and a
//! snapshot takes over as its interval of changes.
//!
//! Locking: the map is behind an `RwLock` taken for reading on every I/O and for
//! writing only to add or drop extents; member file I/O is positional
//! (`pread`/`pwrite`) and runs without any lock held. The caller (fs core)
//! holds its write gate for reading around every change, so the intent tag
//! cannot move while a change is in flight.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::meta::ExtentRecord;

/// One copy of an extent, on one member.
pub struct ExtentCopy {
    pub member: u32,
    file: RwLock<Option<Arc<File>>>,
}

pub struct Extent {
    pub index: u64,
    pub file_id: u64,
    /// At least one; the first is read first.
    pub copies: Vec<ExtentCopy>,
    /// Data written since the last fdatasync.
    dirty: AtomicBool,
    /// Created since the last durable commit (its directory entries need an fsync).
    fresh: AtomicBool,
    /// Allocated bytes of the first copy, valid unless `blocks_stale`.
    blocks: AtomicU64,
    blocks_stale: AtomicBool,
    /// Intent tag under which this extent's change was logged (0: none yet).
    intent_tag: AtomicU64,
    intent_lock: Mutex<()>,
}

impl Extent {
    fn new(index: u64, file_id: u64, copies: Vec<(u32, Option<File>)>, fresh: bool) -> Extent {
        Extent {
            index,
            file_id,
            copies: copies
                .into_iter()
                .map(|(member, f)| ExtentCopy {
                    member,
                    file: RwLock::new(f.map(Arc::new)),
                })
                .collect(),
            dirty: AtomicBool::new(fresh),
            fresh: AtomicBool::new(fresh),
            blocks: AtomicU64::new(0),
            blocks_stale: AtomicBool::new(true),
            intent_tag: AtomicU64::new(0),
            intent_lock: Mutex::new(()),
        }
    }

    /// Makes sure a durable intent record covers a change to this extent under
    /// the pool's current tag (see pool/intent.rs).
    fn prepare(&self, pool: &Pool, ino: u64) -> FsResult<()> {
        let tag = pool.intent_tag.load(Ordering::Acquire);
        if self.intent_tag.load(Ordering::Acquire) == tag {
            return Ok(());
        }
        let _g = self.intent_lock.lock();
        if self.intent_tag.load(Ordering::Acquire) == tag {
            return Ok(());
        }
        let members: Vec<u32> = self.copies.iter().map(|c| c.member).collect();
        let used = pool
            .log_intent(&members, ino, self.index)
            .map_err(map_write_err)?;
        self.intent_tag.store(used, Ordering::Release);
        Ok(())
    }

    fn file(&self, pool: &Pool, ino: u64, copy: usize) -> FsResult<Arc<File>> {
        let c = &self.copies[copy];
        if let Some(f) = c.file.read().as_ref() {
            return Ok(f.clone());
        }
        let mut g = c.file.write();
        if let Some(f) = g.as_ref() {
            return Ok(f.clone());
        }
        let f = Arc::new(pool.open_extent_file(c.member, ino, self.index, self.file_id)?);
        *g = Some(f.clone());
        Ok(f)
    }

    /// Runs `op` on every copy's file; stops at the first error.
    fn each_copy(
        &self,
        pool: &Pool,
        ino: u64,
        mut op: impl FnMut(u32, &File) -> FsResult<()>,
    ) -> FsResult<()> {
        for (i, c) in self.copies.iter().enumerate() {
            let f = self.file(pool, ino, i)?;
            op(c.member, &f)?;
        }
        Ok(())
    }

    /// The commit referencing this extent is durable, its directory entries too.
    pub fn mark_published(&self) {
        self.fresh.store(false, Ordering::Release);
    }

    fn written(&self) {
        self.dirty.store(true, Ordering::Release);
        self.blocks_stale.store(true, Ordering::Release);
    }

    fn dead(&self, ino: u64) -> impl Iterator<Item = DeadExtent> + '_ {
        self.copies
            .iter()
            .map(move |c| (c.member, ino, self.index, self.file_id))
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

/// Fills `dst` from `f` at `off`; past the member file's end is a hole (zeros).
fn read_full(f: &File, dst: &mut [u8], off: u64) -> FsResult<()> {
    let mut done = 0;
    while done < dst.len() {
        match f.read_at(&mut dst[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::Io(e)),
        }
    }
    Ok(())
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

/// Changed-block tracking of one file: one bit per block, one bitmap per extent
/// index (an extent dropped by truncate keeps its bits), and the extents whose
/// bitmap changed since the last commit.
#[derive(Default)]
struct Cbt {
    bits: BTreeMap<u64, Vec<u64>>,
    dirty: BTreeSet<u64>,
}

/// A range of blocks as a snapshot captures it: `None` is a hole.
pub type Segment = (u64, u64, Option<Vec<u8>>);

pub struct Volume {
    pub ino: u64,
    esize: u64,
    /// Block size: the unit of changed-block tracking.
    bs: u64,
    map: RwLock<BTreeMap<u64, Arc<Extent>>>,
    cbt: Mutex<Cbt>,
}

/// An extent file that can be removed once the commit dropping it is durable:
/// `(member, ino, index, file_id)`.
pub type DeadExtent = (u32, u64, u64, u64);

/// Refuses a write of `len` bytes at `within` of `f` on `member` when the member is
/// down to its reserve, unless the range is already allocated (overwrites need no space).
fn check_room(pool: &Pool, member: u32, f: &File, within: u64, len: u64) -> FsResult<()> {
    let m = pool
        .member(member)
        .ok_or_else(|| FsError::Corrupt(format!("unknown member {member}")))?;
    let avail = m.available().map_err(FsError::Io)?;
    if avail < len && !fully_allocated(f, within, len).map_err(FsError::Io)? {
        tracing::debug!(member = %m.dir.display(), avail, len, "member full: write refused");
        return Err(FsError::NoSpace);
    }
    Ok(())
}

fn invalidate_space(pool: &Pool, member: u32) {
    if let Some(m) = pool.member(member) {
        m.invalidate_space();
    }
}

impl Volume {
    /// `cbt`: the persisted changed-block bitmaps of this file, per extent index
    /// (little-endian `u64` words, bit `b % 64` of word `b / 64`).
    pub fn new(
        ino: u64,
        esize: u64,
        bs: u64,
        records: &[ExtentRecord],
        cbt: impl IntoIterator<Item = (u64, Vec<u64>)>,
    ) -> Volume {
        let map = records
            .iter()
            .filter(|r| !r.members.is_empty())
            .map(|r| {
                let copies = r.members.iter().map(|m| (*m, None)).collect();
                (
                    r.index,
                    Arc::new(Extent::new(r.index, r.file_id, copies, false)),
                )
            })
            .collect();
        Volume {
            ino,
            esize,
            bs,
            map: RwLock::new(map),
            cbt: Mutex::new(Cbt {
                bits: cbt.into_iter().collect(),
                dirty: BTreeSet::new(),
            }),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    fn words_per_extent(&self) -> usize {
        (self.esize / self.bs).div_ceil(64) as usize
    }

    /// Marks the blocks overlapping bytes `[off, off+len)` changed.
    pub fn mark_changed(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / self.bs;
        let last = (off + len - 1) / self.bs;
        self.mark_blocks(first, last + 1);
    }

    /// Marks blocks `[start, end)` changed.
    pub fn mark_blocks(&self, start: u64, end: u64) {
        let per = self.esize / self.bs;
        let words = self.words_per_extent();
        let mut c = self.cbt.lock();
        let mut b = start;
        while b < end {
            let index = b / per;
            let stop = end.min((index + 1) * per);
            let map = c.bits.entry(index).or_insert_with(|| vec![0; words]);
            for blk in (b - index * per)..(stop - index * per) {
                map[(blk / 64) as usize] |= 1 << (blk % 64);
            }
            c.dirty.insert(index);
            b = stop;
        }
    }

    /// Changed blocks, as sorted `[start, end)` block ranges.
    pub fn changed_ranges(&self) -> Vec<(u64, u64)> {
        let per = self.esize / self.bs;
        let c = self.cbt.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (index, words) in &c.bits {
            for (wi, w) in words.iter().enumerate() {
                if *w == 0 {
                    continue;
                }
                for bit in 0..64u64 {
                    if w & (1 << bit) != 0 {
                        let b = index * per + wi as u64 * 64 + bit;
                        match out.last_mut() {
                            Some((_, e)) if *e == b => *e += 1,
                            _ => out.push((b, b + 1)),
                        }
                    }
                }
            }
        }
        out
    }

    /// Empties the bitmap (a snapshot took its content over); the emptied
    /// extents are persisted by the next commit.
    pub fn clear_changed(&self) {
        let mut c = self.cbt.lock();
        let keys: Vec<u64> = c.bits.keys().copied().collect();
        c.dirty.extend(keys);
        c.bits.clear();
    }

    /// Bitmaps changed since the last call, for the commit: `(index, None)` when
    /// the extent has no changed block any more.
    pub fn take_cbt_changes(&self) -> Vec<(u64, Option<Vec<u64>>)> {
        let mut c = self.cbt.lock();
        let dirty = std::mem::take(&mut c.dirty);
        dirty
            .into_iter()
            .map(|i| {
                let w = c
                    .bits
                    .get(&i)
                    .filter(|w| w.iter().any(|x| *x != 0))
                    .cloned();
                (i, w)
            })
            .collect()
    }

    /// Puts back what [`Volume::take_cbt_changes`] returned (the commit failed).
    pub fn restore_cbt_changes(&self, indexes: impl IntoIterator<Item = u64>) {
        self.cbt.lock().dirty.extend(indexes);
    }

    /// Every extent index with a persisted or pending bitmap (for deleting the
    /// rows of a removed file).
    pub fn cbt_indexes(&self) -> Vec<u64> {
        let c = self.cbt.lock();
        c.bits.keys().chain(c.dirty.iter()).copied().collect()
    }

    /// Reads blocks `[start, start+count)` (all within one extent) as a snapshot
    /// captures them: runs of holes (unallocated in the first copy) and of data.
    pub fn capture(&self, pool: &Pool, start: u64, count: u64) -> FsResult<Vec<Segment>> {
        let bs = self.bs;
        let off = start * bs;
        let len = count * bs;
        let index = off / self.esize;
        debug_assert!((off + len - 1) / self.esize == index);
        let Some(ext) = self.get(index) else {
            return Ok(vec![(start, count, None)]);
        };
        let base = index * self.esize;
        let f = ext.file(pool, self.ino, 0)?;
        // Allocated ranges of the first copy, widened to whole blocks.
        let mut data: Vec<(u64, u64)> = Vec::new();
        let (lo, hi) = (off - base, off - base + len);
        let mut pos = lo;
        while pos < hi {
            let Some(d) = lseek(&f, pos, libc::SEEK_DATA).map_err(FsError::Io)? else {
                break;
            };
            if d >= hi {
                break;
            }
            let h = lseek(&f, d, libc::SEEK_HOLE)
                .map_err(FsError::Io)?
                .unwrap_or(hi)
                .min(hi);
            let (ds, de) = ((d / bs) * bs, h.div_ceil(bs) * bs);
            match data.last_mut() {
                Some((_, e)) if *e >= ds => *e = (*e).max(de),
                _ => data.push((ds, de)),
            }
            pos = h.max(d + 1);
        }
        let mut out = Vec::new();
        let mut cur = lo;
        for (ds, de) in data {
            if ds > cur {
                out.push(((base + cur) / bs, (ds - cur) / bs, None));
            }
            let mut buf = vec![0u8; (de - ds) as usize];
            self.read_extent(pool, &ext, ds, &mut buf)?;
            out.push(((base + ds) / bs, (de - ds) / bs, Some(buf)));
            cur = de;
        }
        if cur < hi {
            out.push(((base + cur) / bs, (hi - cur) / bs, None));
        }
        Ok(out)
    }

    /// Asks the kernel to start reading blocks `[start, start+count)` of the first
    /// copy (a capture that will read them next overlaps its compression with
    /// the disk). Best effort.
    pub fn prefetch(&self, pool: &Pool, start: u64, count: u64) {
        let off = start * self.bs;
        let Some(ext) = self.get(off / self.esize) else {
            return;
        };
        let within = off % self.esize;
        let len = (count * self.bs).min(self.esize - within);
        if let Ok(f) = ext.file(pool, self.ino, 0) {
            // SAFETY: posix_fadvise on a valid descriptor with plain integers;
            // it only affects the page cache.
            unsafe {
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    within as i64,
                    len as i64,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Fills `dst` from the extent at `within`, from the first copy that answers.
    fn read_extent(&self, pool: &Pool, ext: &Extent, within: u64, dst: &mut [u8]) -> FsResult<()> {
        let mut last_err = None;
        for copy in 0..ext.copies.len() {
            match ext
                .file(pool, self.ino, copy)
                .and_then(|f| read_full(&f, dst, within))
            {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(ino = self.ino, extent = ext.index, copy, error = %e, "read failed; trying the next copy");
                    dst.fill(0);
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn records(&self) -> Vec<ExtentRecord> {
        self.map
            .read()
            .values()
            .map(|e| ExtentRecord {
                index: e.index,
                file_id: e.file_id,
                members: e.copies.iter().map(|c| c.member).collect(),
            })
            .collect()
    }

    fn get(&self, index: u64) -> Option<Arc<Extent>> {
        self.map.read().get(&index).cloned()
    }

    /// The extent at `index`, placed now if absent; `need` is the size of the
    /// write asking for it (members with less room are not chosen).
    fn get_or_alloc(&self, pool: &Pool, index: u64, need: u64) -> FsResult<Arc<Extent>> {
        if let Some(e) = self.get(index) {
            return Ok(e);
        }
        let mut m = self.map.write();
        if let Some(e) = m.get(&index) {
            return Ok(e.clone());
        }
        let (fid, files) = pool.create_extent_files(self.ino, index, need)?;
        let copies = files.into_iter().map(|(m, f)| (m, Some(f))).collect();
        let e = Arc::new(Extent::new(index, fid, copies, true));
        m.insert(index, e.clone());
        Ok(e)
    }

    /// Reads `len` bytes at `off` of a file of `size` bytes; holes read as zeros.
    /// Each piece comes from the first copy that can be read.
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
            let dst = &mut buf[p.buf_off..p.buf_off + p.len];
            self.read_extent(pool, &ext, p.within, dst)?;
        }
        Ok(buf)
    }

    /// Writes `data` at `off` to every copy, placing new extents as needed.
    pub fn write(&self, pool: &Pool, off: u64, data: &[u8]) -> FsResult<()> {
        for p in pieces(self.esize, off, data.len()) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            ext.prepare(pool, self.ino)?;
            self.mark_changed(p.index * self.esize + p.within, p.len as u64);
            let piece = &data[p.buf_off..p.buf_off + p.len];
            let res = ext.each_copy(pool, self.ino, |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                f.write_all_at(piece, p.within).map_err(|e| {
                    invalidate_space(pool, member);
                    map_write_err(e)
                })
            });
            ext.written();
            res?;
        }
        Ok(())
    }

    /// Deallocates `[off, off+len)`; reads of it return zeros afterwards.
    pub fn punch(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let Some(ext) = self.get(p.index) else {
                continue;
            };
            ext.prepare(pool, self.ino)?;
            self.mark_changed(p.index * self.esize + p.within, p.len as u64);
            let res = ext.each_copy(pool, self.ino, |member, f| {
                fallocate(
                    f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    p.within,
                    p.len as u64,
                )
                .map_err(FsError::Io)?;
                invalidate_space(pool, member);
                Ok(())
            });
            ext.written();
            res?;
        }
        Ok(())
    }

    /// Makes `[off, off+len)` read as zeros and stay allocated.
    pub fn zero_range(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            ext.prepare(pool, self.ino)?;
            self.mark_changed(p.index * self.esize + p.within, p.len as u64);
            let res = ext.each_copy(pool, self.ino, |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                let zr = fallocate(
                    f,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    p.within,
                    p.len as u64,
                );
                match zr {
                    Ok(()) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        // The member filesystem lacks ZERO_RANGE: punch, then allocate.
                        fallocate(
                            f,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            p.within,
                            p.len as u64,
                        )
                        .map_err(FsError::Io)?;
                        fallocate(f, libc::FALLOC_FL_KEEP_SIZE, p.within, p.len as u64)
                            .map_err(map_write_err)
                    }
                    Err(e) => Err(map_write_err(e)),
                }
            });
            ext.written();
            res?;
        }
        Ok(())
    }

    /// Preallocates `[off, off+len)` on every copy.
    pub fn allocate(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            ext.prepare(pool, self.ino)?;
            self.mark_changed(p.index * self.esize + p.within, p.len as u64);
            let res = ext.each_copy(pool, self.ino, |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                fallocate(f, libc::FALLOC_FL_KEEP_SIZE, p.within, p.len as u64).map_err(|e| {
                    invalidate_space(pool, member);
                    map_write_err(e)
                })
            });
            ext.written();
            res?;
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
            ext.prepare(pool, self.ino)?;
            ext.each_copy(pool, self.ino, |_, f| {
                if f.metadata().map_err(FsError::Io)?.len() > cut {
                    f.set_len(cut).map_err(FsError::Io)?;
                }
                Ok(())
            })?;
            ext.written();
        }
        let mut m = self.map.write();
        let dead: Vec<u64> = m.range(first_dead..).map(|(k, _)| *k).collect();
        let mut out = Vec::new();
        for k in dead {
            if let Some(e) = m.remove(&k) {
                out.extend(e.dead(self.ino));
            }
        }
        Ok(out)
    }

    /// All extent files (for deleting the whole file).
    pub fn all_files(&self) -> Vec<DeadExtent> {
        self.map
            .read()
            .values()
            .flat_map(|e| e.dead(self.ino).collect::<Vec<_>>())
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
            let f = ext.file(pool, self.ino, 0)?;
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
            let f = ext.file(pool, self.ino, 0)?;
            match lseek(&f, pos - start, libc::SEEK_HOLE).map_err(FsError::Io)? {
                Some(h) if h < self.esize => return Ok(Some((start + h).min(size))),
                // Past the member file's end (ENXIO) is a hole too.
                None => return Ok(Some(pos)),
                Some(_) => pos = start + self.esize,
            }
        }
        Ok(Some(size))
    }

    /// Allocated 512-byte blocks of one copy of each extent (what `st_blocks`
    /// reports: the file's own allocation, as statfs divides by the copies too).
    pub fn blocks(&self, pool: &Pool) -> u64 {
        let exts: Vec<Arc<Extent>> = self.map.read().values().cloned().collect();
        let mut total = 0;
        for e in exts {
            if e.blocks_stale.swap(false, Ordering::AcqRel) {
                let b = e
                    .file(pool, self.ino, 0)
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
            if e.dirty.swap(false, Ordering::AcqRel)
                && let Err(err) =
                    e.each_copy(pool, self.ino, |_, f| f.sync_data().map_err(FsError::Io))
            {
                e.dirty.store(true, Ordering::Release);
                return Err(err);
            }
            if e.fresh.load(Ordering::Acquire) {
                new_dirs.extend(e.copies.iter().map(|c| c.member));
                fresh.push(e);
            }
        }
        Ok(())
    }

    /// Whether extents were added since the last durable commit.
    pub fn has_fresh(&self) -> bool {
        self.map
            .read()
            .values()
            .any(|e| e.fresh.load(Ordering::Acquire))
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
                for c in &e.copies {
                    *c.file.write() = None;
                }
            }
        }
    }
}
