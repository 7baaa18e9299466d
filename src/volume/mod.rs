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
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::meta::ExtentRecord;
use crate::pool::sums::{self, SumId, block_crc};
use crate::storage::{Alloc, Handle, OpenMode};

/// Stripe locks, one table for the process: block checksums and data change
/// together under the stripe's write lock; verified reads hold it for reading.
/// A region of blocks maps to a stripe by a hash of (ino, extent, region), so
/// that a long read (a snapshot capture) holds few of them and a writer of
/// other blocks rarely waits for it.
const STRIPES: usize = 4096;
static STRIPE_LOCKS: std::sync::LazyLock<Vec<RwLock<()>>> =
    std::sync::LazyLock::new(|| (0..STRIPES).map(|_| RwLock::new(())).collect());
/// Blocks per stripe region.
const REGION_BLOCKS: u64 = 16;

/// One copy of an extent, on one member (its open file lives in the pool's
/// descriptor cache, pool/fds.rs).
pub struct ExtentCopy {
    pub member: u32,
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
    /// Tag a commit logged an intent record under ahead of time (see
    /// `Volume::hot_extents`).
    prelogged: AtomicU64,
    /// When it was last changed ([`crate::storage::Storage::clock_ms`]); recently changed extents keep
    /// intent records logged ahead across commits (see `Volume::hot_extents`).
    touched_ms: AtomicU64,
    intent_lock: Mutex<()>,
    sums: Mutex<Sums>,
}

/// The block checksums of an extent, loaded from a sum file on first use.
#[derive(Default)]
struct Sums {
    /// `None`: not loaded yet; `Some(None)`: no usable table (the extent's
    /// blocks are not verified until scrub rebuilds it).
    table: Option<Option<Vec<u32>>>,
    /// Changed since the sum files were last written.
    dirty: bool,
    /// With no usable table: the sum files on disk were removed (durably),
    /// so that one a read merely failed to load cannot come back later to
    /// judge blocks written since.
    cleared: bool,
}

impl Sums {
    /// A table to be written by the next commit.
    fn new_dirty(vals: Vec<u32>) -> Sums {
        Sums {
            table: Some(Some(vals)),
            dirty: true,
            cleared: false,
        }
    }
}

/// What a scrub found in one volume.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ScrubCounts {
    pub extents: u64,
    /// Bytes of block copies read and verified.
    pub bytes: u64,
    pub checksum_errors: u64,
    pub repaired: u64,
    pub unrecoverable: u64,
    pub io_errors: u64,
    /// Extents whose checksum table was missing or damaged and rebuilt.
    pub tables_rebuilt: u64,
}

impl Extent {
    fn new(index: u64, file_id: u64, members: Vec<u32>, fresh: bool) -> Extent {
        Extent {
            index,
            file_id,
            copies: members
                .into_iter()
                .map(|member| ExtentCopy { member })
                .collect(),
            dirty: AtomicBool::new(fresh),
            fresh: AtomicBool::new(fresh),
            blocks: AtomicU64::new(0),
            blocks_stale: AtomicBool::new(true),
            intent_tag: AtomicU64::new(0),
            prelogged: AtomicU64::new(0),
            touched_ms: AtomicU64::new(0),
            intent_lock: Mutex::new(()),
            sums: Mutex::new(Sums::default()),
        }
    }

    /// The copies but the one on `member`.
    fn copies_without(&self, member: Option<u32>) -> Vec<ExtentCopy> {
        self.copies
            .iter()
            .filter(|c| Some(c.member) != member)
            .map(|c| ExtentCopy { member: c.member })
            .collect()
    }

    /// Copies' members.
    pub fn members(&self) -> Vec<u32> {
        self.copies.iter().map(|c| c.member).collect()
    }

    /// A durable intent record under `tag` exists for this extent (logged by
    /// a commit ahead of time).
    pub fn set_prelogged(&self, tag: u64) {
        self.prelogged.fetch_max(tag, Ordering::AcqRel);
    }

    /// Makes sure a durable intent record covers a change to this extent under
    /// the pool's current tag (see pool/intent.rs).
    fn prepare(&self, pool: &Pool, ino: u64) -> FsResult<()> {
        self.touched_ms
            .store(pool.storage().clock_ms(), Ordering::Relaxed);
        let tag = pool.intent_tag.load(Ordering::Acquire);
        if self.intent_tag.load(Ordering::Acquire) == tag {
            return Ok(());
        }
        if self.prelogged.load(Ordering::Acquire) == tag {
            // Covered by the record the commit logged ahead; remember that the
            // extent changed under this tag (it stays hot).
            self.intent_tag.fetch_max(tag, Ordering::AcqRel);
            return Ok(());
        }
        let _g = self.intent_lock.lock();
        if self.intent_tag.load(Ordering::Acquire) == tag {
            return Ok(());
        }
        let used = pool
            .log_intent(&self.members(), ino, self.index)
            .map_err(map_write_err)?;
        self.intent_tag.store(used, Ordering::Release);
        Ok(())
    }

    fn file(&self, pool: &Pool, ino: u64, copy: usize) -> FsResult<Handle> {
        pool.extent_file(self.copies[copy].member, ino, self.index, self.file_id)
    }

    /// Drops the cached descriptor of the copy on `member`.
    fn forget_file(&self, pool: &Pool, ino: u64, member: u32) {
        pool.fds.forget(&(member, ino, self.index, self.file_id));
    }

    /// Runs `op` on the file of every copy on a usable member. A copy whose
    /// member fails meanwhile is skipped (the member is marked failed); any
    /// other error stops at once. Fails when no copy was done.
    fn each_copy(
        &self,
        pool: &Pool,
        ino: u64,
        mut op: impl FnMut(u32, &Handle) -> FsResult<()>,
    ) -> FsResult<()> {
        let mut done = 0;
        let mut last_err = None;
        for (i, c) in self.copies.iter().enumerate() {
            if !pool.usable(c.member) {
                continue;
            }
            match self.file(pool, ino, i).and_then(|f| op(c.member, &f)) {
                Ok(()) => done += 1,
                Err(e) if pool.check_member_fs(c.member, &e) => {
                    self.forget_file(pool, ino, c.member);
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if done == 0 {
            return Err(last_err.unwrap_or_else(eio));
        }
        Ok(())
    }

    /// The first copy on a usable member (0 when none is: its errors then tell).
    fn first_usable(&self, pool: &Pool) -> usize {
        self.copies
            .iter()
            .position(|c| pool.usable(c.member))
            .unwrap_or(0)
    }

    /// Copies on usable members.
    pub fn usable_copies(&self, pool: &Pool) -> usize {
        self.copies.iter().filter(|c| pool.usable(c.member)).count()
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

/// The data ranges of `f` within `[lo, hi)` by SEEK_DATA/SEEK_HOLE.
fn seek_data_ranges(f: &Handle, lo: u64, hi: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = lo;
    while pos < hi {
        let Some(d) = f.seek_data(pos)? else {
            break;
        };
        if d >= hi {
            break;
        }
        let h = f.seek_hole(d)?.unwrap_or(hi).min(hi);
        out.push((d, h));
        pos = h.max(d + 1);
    }
    Ok(out)
}

/// Byte ranges sorted by start, widened to whole blocks of `bs` and merged.
fn widen_merge(ranges: impl IntoIterator<Item = (u64, u64)>, bs: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (d, h) in ranges {
        let (ds, de) = (d / bs * bs, h.div_ceil(bs) * bs);
        match out.last_mut() {
            Some((_, e)) if *e >= ds => *e = (*e).max(de),
            _ => out.push((ds, de)),
        }
    }
    out
}

/// Fills `dst` from `f` at `off`; past the member file's end is a hole (zeros).
fn read_full(f: &Handle, dst: &mut [u8], off: u64) -> FsResult<()> {
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

fn eio() -> FsError {
    FsError::Io(io::Error::from_raw_os_error(libc::EIO))
}

fn map_write_err(e: io::Error) -> FsError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        FsError::NoSpace
    } else {
        FsError::Io(e)
    }
}

/// Whether `[off, off+len)` of `f` is already fully allocated (writing it needs no space).
fn fully_allocated(f: &Handle, off: u64, len: u64) -> io::Result<bool> {
    match f.seek_hole(off)? {
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
    /// Checksum of an all-zero block (holes, punched and never-written blocks).
    zcrc: u32,
}

/// An extent file that can be removed once the commit dropping it is durable:
/// `(member, ino, index, file_id)`.
pub type DeadExtent = (u32, u64, u64, u64);

/// Refuses a write of `len` bytes at `within` of `f` on `member` when the member is
/// down to its reserve, unless the range is already allocated (overwrites need no space).
fn check_room(pool: &Pool, member: u32, f: &Handle, within: u64, len: u64) -> FsResult<()> {
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
                (
                    r.index,
                    Arc::new(Extent::new(r.index, r.file_id, r.members.clone(), false)),
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
            zcrc: sums::zero_crc(bs as usize),
        }
    }

    fn blocks_per_extent(&self) -> u64 {
        self.esize / self.bs
    }

    fn sum_id(&self, ext: &Extent) -> SumId {
        SumId {
            ino: self.ino,
            index: ext.index,
            file_id: ext.file_id,
            block_size: self.bs as u32,
            entries: self.blocks_per_extent() as u32,
        }
    }

    /// Stripe slots covering blocks `[b0, b1)` of extent `index`, ascending
    /// (the lock order).
    fn stripe_slots(&self, index: u64, b0: u64, b1: u64) -> Vec<usize> {
        let (r0, r1) = (b0 / REGION_BLOCKS, b1.max(b0 + 1).div_ceil(REGION_BLOCKS));
        let mut v: Vec<usize> = (r0..r1)
            .map(|r| {
                // splitmix64 of the region's identity.
                let mut z = self
                    .ino
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                    .wrapping_add(r);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % STRIPES as u64) as usize
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn lock_shared(&self, index: u64, b0: u64, b1: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        self.stripe_slots(index, b0, b1)
            .into_iter()
            .map(|i| STRIPE_LOCKS[i].read())
            .collect()
    }

    fn lock_excl(&self, index: u64, b0: u64, b1: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        self.stripe_slots(index, b0, b1)
            .into_iter()
            .map(|i| STRIPE_LOCKS[i].write())
            .collect()
    }

    /// The extent's checksum table, loaded on first use (see `load_sums`).
    fn sums<'a>(&self, pool: &Pool, ext: &'a Extent) -> MutexGuard<'a, Sums> {
        let mut g = ext.sums.lock();
        if g.table.is_none() {
            let (t, rewrite) = self.load_sums(pool, ext);
            g.table = Some(t);
            // A copy's sum file that is damaged or missing is rewritten by the
            // next commit.
            g.dirty |= rewrite;
        }
        g
    }

    /// The table of the valid sum file with the highest generation among the
    /// copies, and whether some copy's file is damaged, missing or older.
    fn load_sums(&self, pool: &Pool, ext: &Extent) -> (Option<Vec<u32>>, bool) {
        let id = self.sum_id(ext);
        let mut found: Option<(u64, Vec<u32>)> = None;
        let mut bad = false;
        for c in &ext.copies {
            let Some(p) = pool.sum_path(c.member, self.ino, ext.index, ext.file_id) else {
                continue;
            };
            match sums::read(pool.storage(), &p, id) {
                Ok(Some((gen_, v))) => match &found {
                    // Copies of different generations: one missed commits.
                    Some((g, _)) if *g != gen_ => {
                        bad = true;
                        if gen_ > *g {
                            found = Some((gen_, v));
                        }
                    }
                    Some(_) => {}
                    None => found = Some((gen_, v)),
                },
                Ok(None) => bad = true,
                Err(e) => {
                    bad = true;
                    pool.integrity
                        .checksum_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %p.display(), error = %e, "sum file damaged; trying the next copy");
                }
            }
        }
        if let Some((_, v)) = found {
            return (Some(v), bad);
        }
        tracing::warn!(
            ino = self.ino,
            extent = ext.index,
            "no valid checksum table: blocks of this extent are not verified until `vpool scrub` rebuilds it"
        );
        (None, false)
    }

    /// Before the first change to an extent with no usable table: removes
    /// its sum files, durably. Invariant: a sum file on disk matches its
    /// copy's blocks (or is damaged); a table that failed to load for a
    /// passing reason would otherwise reappear, stale, after a restart.
    fn clear_sum_files(&self, pool: &Pool, ext: &Extent) -> FsResult<()> {
        if self.sums(pool, ext).cleared {
            return Ok(());
        }
        let st = pool.storage();
        for c in ext.copies.iter().filter(|c| pool.usable(c.member)) {
            let (Some(p), Some(m)) = (
                pool.sum_path(c.member, self.ino, ext.index, ext.file_id),
                pool.member(c.member),
            ) else {
                continue;
            };
            let r = match st.remove_file(&p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
            .and_then(|_| st.sync_dir(&m.data_dir));
            match r {
                Ok(()) => {}
                Err(e) if pool.check_member(c.member, &e) => {}
                Err(e) => return Err(FsError::Io(e)),
            }
        }
        self.sums(pool, ext).cleared = true;
        Ok(())
    }

    /// Whether `ext` has a usable checksum table (its blocks are verified).
    fn has_table(&self, pool: &Pool, ext: &Extent) -> bool {
        matches!(self.sums(pool, ext).table, Some(Some(_)))
    }

    /// Expected checksums of blocks `[b0, b1)` of `ext` (`None`: not verified).
    fn expected(&self, pool: &Pool, ext: &Extent, b0: u64, b1: u64) -> Option<Vec<u32>> {
        let g = self.sums(pool, ext);
        g.table
            .as_ref()
            .and_then(|t| t.as_ref())
            .map(|t| t[b0 as usize..b1 as usize].to_vec())
    }

    /// Stores checksums of blocks from `b0` on (caller holds their stripes).
    fn set_sums(&self, pool: &Pool, ext: &Extent, b0: u64, vals: &[u32]) {
        let mut g = self.sums(pool, ext);
        if let Some(Some(t)) = g.table.as_mut() {
            t[b0 as usize..b0 as usize + vals.len()].copy_from_slice(vals);
            g.dirty = true;
        }
    }

    /// Reads `buf` (whole blocks from block `b0`) from one copy.
    fn read_copy(
        &self,
        pool: &Pool,
        ext: &Extent,
        copy: usize,
        b0: u64,
        buf: &mut [u8],
    ) -> FsResult<()> {
        if !pool.usable(ext.copies[copy].member) {
            return Err(eio());
        }
        let r = ext
            .file(pool, self.ino, copy)
            .and_then(|f| read_full(&f, buf, b0 * self.bs));
        if let Err(e) = &r {
            pool.integrity.io_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(ino = self.ino, extent = ext.index, copy, error = %e, "read of a copy failed");
            pool.check_member_fs(ext.copies[copy].member, e);
        }
        r
    }

    /// Reads whole blocks `[b0, b0 + buf.len()/bs)` verified against `exp`: from
    /// the first copy that reads, each bad block from another copy whose block
    /// matches. Returns the blocks some copy of which needs a repair; a block
    /// with no good copy fails the read with EIO. The caller holds the stripes.
    fn read_verified(
        &self,
        pool: &Pool,
        ext: &Extent,
        b0: u64,
        buf: &mut [u8],
        exp: &[u32],
    ) -> FsResult<Vec<u64>> {
        let bs = self.bs as usize;
        let n = ext.copies.len();
        let mut first = None;
        let mut last_err = None;
        for c in 0..n {
            match self.read_copy(pool, ext, c, b0, buf) {
                Ok(()) => {
                    first = Some(c);
                    break;
                }
                Err(e) => {
                    buf.fill(0);
                    last_err = Some(e);
                }
            }
        }
        let Some(first) = first else {
            return Err(last_err.unwrap_or_else(eio));
        };
        let mut repair = Vec::new();
        let mut tmp = vec![0u8; bs];
        for (i, blk) in buf.chunks_mut(bs).enumerate() {
            if block_crc(blk) == exp[i] {
                continue;
            }
            let b = b0 + i as u64;
            pool.integrity
                .checksum_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                ino = self.ino,
                extent = ext.index,
                block = b,
                copy = first,
                "checksum mismatch"
            );
            let mut good = false;
            for c in (0..n).filter(|c| *c != first) {
                tmp.fill(0);
                if self.read_copy(pool, ext, c, b, &mut tmp).is_ok() && block_crc(&tmp) == exp[i] {
                    blk.copy_from_slice(&tmp);
                    good = true;
                    break;
                }
            }
            if !good {
                pool.integrity.unrecoverable.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    ino = self.ino,
                    extent = ext.index,
                    block = b,
                    "no copy of the block matches its checksum: the read fails with EIO"
                );
                pool.emit(
                    "unrecoverable",
                    crate::pool::info::Severity::Error,
                    None,
                    format!(
                        "inode {} block {b}: no copy matches its checksum; reads there fail with EIO",
                        self.ino
                    ),
                );
                return Err(eio());
            }
            repair.push(b);
        }
        Ok(repair)
    }

    /// Rewrites bad copies of `blocks` from a good one; the caller holds their
    /// stripes exclusively. Returns (repaired copies, blocks with no good copy).
    fn repair_locked(&self, pool: &Pool, ext: &Extent, blocks: &[u64]) -> (u64, u64) {
        let bs = self.bs as usize;
        let (mut fixed, mut lost) = (0, 0);
        for &b in blocks {
            let Some(exp) = self.expected(pool, ext, b, b + 1) else {
                continue;
            };
            let mut copies: Vec<Option<Vec<u8>>> = Vec::new();
            for c in 0..ext.copies.len() {
                let mut blk = vec![0u8; bs];
                copies.push(self.read_copy(pool, ext, c, b, &mut blk).ok().map(|_| blk));
            }
            let Some(good) = copies
                .iter()
                .flatten()
                .find(|d| block_crc(d) == exp[0])
                .cloned()
            else {
                lost += 1;
                continue;
            };
            for (c, d) in copies.iter().enumerate() {
                if d.as_ref().is_some_and(|d| block_crc(d) == exp[0])
                    || !pool.usable(ext.copies[c].member)
                {
                    continue;
                }
                let r = ext
                    .file(pool, self.ino, c)
                    .and_then(|f| f.write_all_at(&good, b * self.bs).map_err(map_write_err));
                match r {
                    Ok(()) => {
                        fixed += 1;
                        pool.integrity.repaired.fetch_add(1, Ordering::Relaxed);
                        ext.written();
                        let dir = pool.member(ext.copies[c].member).map(|m| m.dir.clone());
                        pool.emit(
                            "checksum_repaired",
                            crate::pool::info::Severity::Warning,
                            dir.as_deref(),
                            format!(
                                "inode {} block {b}: a bad copy was rewritten from a good one",
                                self.ino
                            ),
                        );
                        tracing::warn!(
                            ino = self.ino,
                            extent = ext.index,
                            block = b,
                            copy = c,
                            member = ext.copies[c].member,
                            "bad copy of a block rewritten from a good copy"
                        );
                    }
                    Err(e) => {
                        tracing::error!(ino = self.ino, extent = ext.index, block = b, copy = c, error = %e, "cannot repair a bad copy");
                    }
                }
            }
        }
        (fixed, lost)
    }

    fn repair(&self, pool: &Pool, ext: &Extent, blocks: &[u64]) -> (u64, u64) {
        if blocks.is_empty() {
            return (0, 0);
        }
        let (lo, hi) = (blocks[0], blocks[blocks.len() - 1] + 1);
        let _g = self.lock_excl(ext.index, lo, hi);
        let cur = self.get(ext.index);
        let ext: &Extent = cur.as_deref().unwrap_or(ext);
        self.repair_locked(pool, ext, blocks)
    }

    /// Content of block `b` verified (repaired in place when a copy is bad);
    /// the caller holds its stripe exclusively.
    fn block_locked(&self, pool: &Pool, ext: &Extent, b: u64) -> FsResult<Vec<u8>> {
        let mut blk = vec![0u8; self.bs as usize];
        match self.expected(pool, ext, b, b + 1) {
            Some(exp) => {
                let bad = self.read_verified(pool, ext, b, &mut blk, &exp)?;
                self.repair_locked(pool, ext, &bad);
            }
            None => self.read_any(pool, ext, b * self.bs, &mut blk)?,
        }
        Ok(blk)
    }

    /// New checksums of blocks `[b0, b1)` after bytes `[s, e)` (offsets within
    /// the extent) become `new` (`None`: zeros); partial blocks are read
    /// verified first. `None` when the extent has no checksum table. The caller
    /// holds the stripes exclusively.
    fn sums_after(
        &self,
        pool: &Pool,
        ext: &Extent,
        s: u64,
        e: u64,
        new: Option<&[u8]>,
    ) -> FsResult<Option<(u64, Vec<u32>)>> {
        if !self.has_table(pool, ext) {
            self.clear_sum_files(pool, ext)?;
            return Ok(None);
        }
        let bs = self.bs;
        let (b0, b1) = (s / bs, e.div_ceil(bs));
        let mut out = Vec::with_capacity((b1 - b0) as usize);
        for b in b0..b1 {
            let (bstart, bend) = (b * bs, (b + 1) * bs);
            let (ps, pe) = (s.max(bstart), e.min(bend));
            if ps == bstart && pe == bend {
                out.push(match new {
                    Some(d) => block_crc(&d[(ps - s) as usize..(pe - s) as usize]),
                    None => self.zcrc,
                });
                continue;
            }
            let mut blk = self.block_locked(pool, ext, b)?;
            let dst = &mut blk[(ps - bstart) as usize..(pe - bstart) as usize];
            match new {
                Some(d) => dst.copy_from_slice(&d[(ps - s) as usize..(pe - s) as usize]),
                None => dst.fill(0),
            }
            out.push(block_crc(&blk));
        }
        Ok(Some((b0, out)))
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// Zeros the bytes of the block holding `pos` from `pos` on, on every
    /// copy whose bytes before `pos` still match the block's checksum taken
    /// with zeros after (what the table holds for a block at the end of the
    /// file). For a failed write past the end, whose torn sectors make the
    /// block fail verification, so that a punch (a verified
    /// read-modify-write) cannot clear them. Returns the copies cleared.
    pub fn zero_block_tail(&self, pool: &Pool, pos: u64) -> FsResult<u64> {
        let (index, within) = (pos / self.esize, pos % self.esize);
        let tail = (within % self.bs) as usize;
        if tail == 0 {
            return Ok(0);
        }
        let Some(ext) = self.get(index) else {
            return Ok(0);
        };
        let b = within / self.bs;
        let _g = self.lock_excl(index, b, b + 1);
        let ext = self.current(ext);
        let Some(want) = self.expected(pool, &ext, b, b + 1) else {
            return Ok(0);
        };
        let bs = self.bs as usize;
        let mut cleared = 0;
        for c in 0..ext.copies.len() {
            let mut blk = vec![0u8; bs];
            if self.read_copy(pool, &ext, c, b, &mut blk).is_err() {
                continue;
            }
            if blk[tail..].iter().all(|x| *x == 0) {
                continue;
            }
            blk[tail..].fill(0);
            if block_crc(&blk) != want[0] {
                continue;
            }
            ext.file(pool, self.ino, c)?
                .write_all_at(&blk[tail..], b * self.bs + tail as u64)
                .map_err(map_write_err)?;
            ext.written();
            cleared += 1;
        }
        Ok(cleared)
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

    /// Marks the blocks of `[start, end)` that lie in extents of the map
    /// changed (a cut by truncate). Blocks outside every extent read as zeros
    /// now and did at the last snapshot, or were marked when their extent
    /// left the map (bitmaps outlive their extents): marking them would cost
    /// memory and metadata in proportion to a size any user can type.
    pub fn mark_mapped_blocks(&self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let per = self.blocks_per_extent();
        for ext in self.extents_in(start / per..=(end - 1) / per) {
            let i = ext.index;
            self.mark_blocks(start.max(i * per), end.min((i + 1) * per));
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
        let f = ext.file(pool, self.ino, ext.first_usable(pool))?;
        // Allocated ranges of the first copy (preallocated ones too: they
        // count in st_blocks and must stay allocated in the snapshot), widened
        // to whole blocks.
        let (lo, hi) = (off - base, off - base + len);
        let raw = match f.allocated_ranges(lo, hi).map_err(FsError::Io)? {
            Some(r) => r,
            None => seek_data_ranges(&f, lo, hi).map_err(FsError::Io)?,
        };
        let data = widen_merge(raw, bs);
        let mut out = Vec::new();
        let mut cur = lo;
        for (ds, de) in data {
            if ds > cur {
                out.push(((base + cur) / bs, (ds - cur) / bs, None));
            }
            let mut buf = vec![0u8; (de - ds) as usize];
            self.read_extent_with(pool, &ext, ds, &mut buf, false)?;
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
        if let Ok(f) = ext.file(pool, self.ino, ext.first_usable(pool)) {
            f.will_need(within, len);
        }
    }

    /// Fills `dst` from the extent at `within`, verified against the block
    /// checksums: bad blocks are served from a good copy and rewritten.
    fn read_extent(&self, pool: &Pool, ext: &Extent, within: u64, dst: &mut [u8]) -> FsResult<()> {
        self.read_extent_with(pool, ext, within, dst, true)
    }

    /// [`Volume::read_extent`]; without `lock`, the caller guarantees that
    /// nothing changes the blocks read meanwhile (a snapshot capture: writers
    /// of blocks being captured wait in copy-before-write), so that a long
    /// cold read holds no stripe other writers need.
    fn read_extent_with(
        &self,
        pool: &Pool,
        ext: &Extent,
        within: u64,
        dst: &mut [u8],
        lock: bool,
    ) -> FsResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let bs = self.bs;
        let end = within + dst.len() as u64;
        let (b0, b1) = (within / bs, end.div_ceil(bs));
        let guards = if lock {
            self.lock_shared(ext.index, b0, b1)
        } else {
            Vec::new()
        };
        // The extent may have moved (a copy migrated) while this waited.
        let cur = self.get(ext.index);
        let ext: &Extent = cur.as_deref().unwrap_or(ext);
        let Some(exp) = self.expected(pool, ext, b0, b1) else {
            return self.read_any(pool, ext, within, dst);
        };
        let bad = if within == b0 * bs && end == b1 * bs {
            self.read_verified(pool, ext, b0, dst, &exp)?
        } else {
            let mut buf = vec![0u8; ((b1 - b0) * bs) as usize];
            let bad = self.read_verified(pool, ext, b0, &mut buf, &exp)?;
            let at = (within - b0 * bs) as usize;
            dst.copy_from_slice(&buf[at..at + dst.len()]);
            bad
        };
        drop(guards);
        self.repair(pool, ext, &bad);
        Ok(())
    }

    /// Fills `dst` from the first copy that answers, unverified.
    fn read_any(&self, pool: &Pool, ext: &Extent, within: u64, dst: &mut [u8]) -> FsResult<()> {
        let mut last_err = Some(eio());
        for copy in 0..ext.copies.len() {
            if !pool.usable(ext.copies[copy].member) {
                continue;
            }
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
                members: e.members(),
            })
            .collect()
    }

    fn get(&self, index: u64) -> Option<Arc<Extent>> {
        self.map.read().get(&index).cloned()
    }

    /// The extents of the map whose index lies in `indexes` (taken out of the
    /// map's lock): walks what is allocated, never the index range itself.
    fn extents_in(&self, indexes: impl std::ops::RangeBounds<u64>) -> Vec<Arc<Extent>> {
        self.map
            .read()
            .range(indexes)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The extent now in the map at `e`'s index (a migration may have swapped
    /// it while the caller waited for its stripes), else `e`.
    fn current(&self, e: Arc<Extent>) -> Arc<Extent> {
        match self.get(e.index) {
            Some(c) => c,
            None => e,
        }
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
        let mut members = Vec::with_capacity(files.len());
        for (m, f) in files {
            pool.fds.put((m, self.ino, index, fid), f);
            members.push(m);
        }
        let e = Arc::new(Extent::new(index, fid, members, true));
        *e.sums.lock() = Sums::new_dirty(vec![self.zcrc; self.blocks_per_extent() as usize]);
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

    /// One change to piece `p` of `ext`, under the piece's stripes: the extent
    /// as the map holds it now (a migration may have swapped it meanwhile),
    /// its intent record, its changed blocks, `op` on every copy, and the
    /// blocks' new checksums for `content` (`Some(Some(data))`: written,
    /// `Some(None)`: zeros, `None`: content unchanged).
    fn change(
        &self,
        pool: &Pool,
        ext: Arc<Extent>,
        p: &Piece,
        content: Option<Option<&[u8]>>,
        op: impl FnMut(u32, &Handle) -> FsResult<()>,
    ) -> FsResult<()> {
        let end = p.within + p.len as u64;
        let _g = self.lock_excl(p.index, p.within / self.bs, end.div_ceil(self.bs));
        let ext = self.current(ext);
        ext.prepare(pool, self.ino)?;
        self.mark_changed(p.index * self.esize + p.within, p.len as u64);
        let new_sums = match content {
            Some(c) => self.sums_after(pool, &ext, p.within, end, c)?,
            None => None,
        };
        let res = ext.each_copy(pool, self.ino, op);
        ext.written();
        if let Err(e) = res {
            // Some copies may hold part of the change (a short write, then
            // ENOSPC): make the blocks agree with their checksums again, or
            // bytes outside the failed range would fail verification too.
            self.heal_blocks(pool, &ext, p.within / self.bs, end.div_ceil(self.bs));
            return Err(e);
        }
        if let Some((b0, v)) = new_sums {
            self.set_sums(pool, &ext, b0, &v);
        }
        Ok(())
    }

    /// After a change to blocks `[b0, b1)` of `ext` failed part-way: the
    /// copies are made to agree ([`Volume::agree_blocks`]) and the table takes
    /// the checksums of what they hold. Best effort; the caller holds the
    /// blocks' stripes.
    fn heal_blocks(&self, pool: &Pool, ext: &Extent, b0: u64, b1: u64) {
        let Some(old) = self.expected(pool, ext, b0, b1) else {
            return;
        };
        let bufs: Vec<Option<Vec<u8>>> = (0..ext.copies.len())
            .map(|c| {
                let mut buf = vec![0u8; ((b1 - b0) * self.bs) as usize];
                self.read_copy(pool, ext, c, b0, &mut buf).ok().map(|_| buf)
            })
            .collect();
        let mut now = old.clone();
        // An error leaves what was done; the blocks' checksums follow it.
        let _ = self.agree_blocks(pool, ext, b0, &bufs, Some(&old), &mut now);
        for (i, (was, is)) in old.iter().zip(&now).enumerate() {
            if was != is {
                self.set_sums(pool, ext, b0 + i as u64, &[*is]);
            }
        }
    }

    /// Writes `data` at `off` to every copy, placing new extents as needed.
    pub fn write(&self, pool: &Pool, off: u64, data: &[u8]) -> FsResult<()> {
        for p in pieces(self.esize, off, data.len()) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            let piece = &data[p.buf_off..p.buf_off + p.len];
            self.change(pool, ext, &p, Some(Some(piece)), |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                f.write_all_at(piece, p.within).map_err(|e| {
                    invalidate_space(pool, member);
                    map_write_err(e)
                })
            })?;
        }
        Ok(())
    }

    /// Deallocates `[off, off+len)`; reads of it return zeros afterwards.
    /// Walks the extents of the map in the range, not the range itself (a
    /// punch of a petabyte of holes costs nothing).
    pub fn punch(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off.saturating_add(len);
        for ext in self.extents_in(off / self.esize..=(end - 1) / self.esize) {
            let start = (ext.index * self.esize).max(off);
            let stop = ((ext.index + 1) * self.esize).min(end);
            let p = Piece {
                index: ext.index,
                within: start - ext.index * self.esize,
                len: (stop - start) as usize,
                buf_off: 0,
            };
            self.change(pool, ext, &p, Some(None), |member, f| {
                f.allocate(Alloc::Punch, p.within, p.len as u64)
                    .map_err(FsError::Io)?;
                invalidate_space(pool, member);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Makes `[off, off+len)` read as zeros and stay allocated.
    pub fn zero_range(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            self.change(pool, ext, &p, Some(None), |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                let zr = f.allocate(Alloc::ZeroRange, p.within, p.len as u64);
                match zr {
                    Ok(()) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        // The member filesystem lacks ZERO_RANGE: punch, then allocate.
                        f.allocate(Alloc::Punch, p.within, p.len as u64)
                            .map_err(FsError::Io)?;
                        f.allocate(Alloc::KeepSize, p.within, p.len as u64)
                            .map_err(map_write_err)
                    }
                    Err(e) => Err(map_write_err(e)),
                }
            })?;
        }
        Ok(())
    }

    /// Preallocates `[off, off+len)` on every copy (the content is unchanged).
    pub fn allocate(&self, pool: &Pool, off: u64, len: u64) -> FsResult<()> {
        for p in pieces(self.esize, off, len as usize) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            self.change(pool, ext, &p, None, |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                f.allocate(Alloc::KeepSize, p.within, p.len as u64)
                    .map_err(|e| {
                        invalidate_space(pool, member);
                        map_write_err(e)
                    })
            })?;
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
            && self.longer_than(pool, &ext, cut)?
        {
            let n = self.blocks_per_extent();
            let _g = self.lock_excl(ext.index, cut / self.bs, n);
            let ext = self.current(ext);
            ext.prepare(pool, self.ino)?;
            let new_sums = self.sums_after(pool, &ext, cut, self.esize, None)?;
            ext.each_copy(pool, self.ino, |_, f| {
                if f.len().map_err(FsError::Io)? > cut {
                    f.set_len(cut).map_err(FsError::Io)?;
                }
                Ok(())
            })?;
            ext.written();
            if let Some((b0, v)) = new_sums {
                self.set_sums(pool, &ext, b0, &v);
            }
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

    /// Whether some copy's member file extends past `len` (nothing past it to
    /// cut otherwise: writes are what lengthen member files).
    fn longer_than(&self, pool: &Pool, ext: &Extent, len: u64) -> FsResult<bool> {
        let mut longer = false;
        ext.each_copy(pool, self.ino, |_, f| {
            longer |= f.len().map_err(FsError::Io)? > len;
            Ok(())
        })?;
        Ok(longer)
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
        for ext in self.extents_in(off / self.esize..) {
            let start = ext.index * self.esize;
            if start >= size {
                break;
            }
            let within = off.saturating_sub(start);
            let f = ext.file(pool, self.ino, ext.first_usable(pool))?;
            if let Some(pos) = f.seek_data(within).map_err(FsError::Io)? {
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
            let f = ext.file(pool, self.ino, ext.first_usable(pool))?;
            match f.seek_hole(pos - start).map_err(FsError::Io)? {
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
                    .file(pool, self.ino, e.first_usable(pool))
                    .ok()
                    .and_then(|f| f.allocated().ok())
                    .map(|b| b / 512)
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
    ///
    /// With `sums_generation` (a commit's), changed checksum tables are written
    /// to the sum files and fdatasynced too; an fdatasync alone leaves them to
    /// the next commit, since until then the extent's intent record makes
    /// recovery recompute them.
    pub fn sync(
        &self,
        pool: &Pool,
        new_dirs: &mut HashSet<u32>,
        fresh: &mut Vec<Arc<Extent>>,
        sums_generation: Option<u64>,
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
            if let Some(g) = sums_generation {
                self.write_sums(pool, &e, g, new_dirs)?;
            }
            if e.fresh.load(Ordering::Acquire) {
                new_dirs.extend(e.copies.iter().map(|c| c.member));
                fresh.push(e);
            }
        }
        Ok(())
    }

    /// Writes the extent's checksum table to every copy's sum file if it changed.
    fn write_sums(
        &self,
        pool: &Pool,
        e: &Extent,
        generation: u64,
        new_dirs: &mut HashSet<u32>,
    ) -> FsResult<()> {
        let vals = {
            let mut g = e.sums.lock();
            if !g.dirty {
                return Ok(());
            }
            g.dirty = false;
            match g.table.as_ref().and_then(|t| t.clone()) {
                Some(v) => v,
                None => return Ok(()),
            }
        };
        let id = self.sum_id(e);
        let mut written = 0;
        let mut last_err = None;
        for c in e.copies.iter().filter(|c| pool.usable(c.member)) {
            let Some(p) = pool.sum_path(c.member, self.ino, e.index, e.file_id) else {
                continue;
            };
            match sums::write(pool.storage(), &p, id, generation, &vals) {
                Ok(created) => {
                    written += 1;
                    if created {
                        new_dirs.insert(c.member);
                    }
                }
                Err(err) if pool.check_member(c.member, &err) => last_err = Some(err),
                Err(err) => {
                    e.sums.lock().dirty = true;
                    return Err(map_write_err(err));
                }
            }
        }
        if written == 0 {
            // No copy took the table (every member holding one failed): the
            // commit must not claim the extent durable.
            e.sums.lock().dirty = true;
            return Err(FsError::Io(
                last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)),
            ));
        }
        Ok(())
    }

    /// Bytes (extent size each) of extents with fewer usable copies than
    /// `copies`, and of those with none.
    pub fn degraded_bytes(&self, pool: &Pool, copies: usize) -> (u64, u64) {
        let (mut degraded, mut lost) = (0, 0);
        for e in self.map.read().values() {
            match e.usable_copies(pool) {
                0 => lost += self.esize,
                n if n < copies => degraded += self.esize,
                _ => {}
            }
        }
        (degraded, lost)
    }

    /// Whether `member` holds a copy of extent `index` with file id `fid`.
    pub fn copy_is_live(&self, index: u64, fid: u64, member: u32) -> bool {
        self.get(index)
            .is_some_and(|e| e.file_id == fid && e.copies.iter().any(|c| c.member == member))
    }

    /// Members holding copies of extent `index` (empty when there is none).
    pub fn copy_members(&self, index: u64) -> Vec<u32> {
        self.get(index).map(|e| e.members()).unwrap_or_default()
    }

    /// Allocated bytes of the first usable copy of extent `index`.
    pub fn extent_bytes(&self, pool: &Pool, index: u64) -> u64 {
        let Some(e) = self.get(index) else { return 0 };
        e.file(pool, self.ino, e.first_usable(pool))
            .ok()
            .and_then(|f| f.allocated().ok())
            .unwrap_or(0)
    }

    /// Swaps extent `old` in the map for one with the copies `copies` (files
    /// already open are kept), carrying over its state; the new layout is
    /// fresh (its directory entries are fsynced, and an fdatasync commits it)
    /// and its checksum table dirty (written to every copy by the next commit).
    /// False when `old` is no longer in the map (truncated meanwhile).
    fn swap_copies(&self, old: &Arc<Extent>, copies: Vec<ExtentCopy>) -> bool {
        let mut m = self.map.write();
        if !m.get(&old.index).is_some_and(|e| Arc::ptr_eq(e, old)) {
            return false;
        }
        // A copy: a snapshot capture still reading through the old extent
        // verifies against it.
        let sums = {
            let g = old.sums.lock();
            Sums {
                table: g.table.clone(),
                dirty: true,
                cleared: g.cleared,
            }
        };
        let e = Extent {
            index: old.index,
            file_id: old.file_id,
            copies,
            dirty: AtomicBool::new(true),
            fresh: AtomicBool::new(true),
            blocks: AtomicU64::new(0),
            blocks_stale: AtomicBool::new(true),
            intent_tag: AtomicU64::new(0),
            prelogged: AtomicU64::new(0),
            touched_ms: AtomicU64::new(old.touched_ms.load(Ordering::Relaxed)),
            intent_lock: Mutex::new(()),
            sums: Mutex::new(sums),
        };
        m.insert(old.index, Arc::new(e));
        true
    }

    /// Copies extent `index` onto member `to` (from a good copy, verified
    /// block by block) and then, with `from`, drops the copy on `from`, else
    /// adds the new copy. Writers of the extent wait for the copy (its stripes
    /// are held). Returns the member file to remove once a commit recording
    /// the new layout is durable (the old copy), `Ok(None)` when there was
    /// nothing to do (extent gone, `from` holds no copy, `to` holds one).
    pub fn move_copy(
        &self,
        pool: &Pool,
        index: u64,
        from: Option<u32>,
        to: u32,
    ) -> FsResult<Option<Vec<DeadExtent>>> {
        const CHUNK: u64 = 1 << 20;
        let Some(ext) = self.get(index) else {
            return Ok(None);
        };
        let n = self.blocks_per_extent();
        let _g = self.lock_excl(index, 0, n);
        let ext = self.current(ext);
        if ext.copies.iter().any(|c| c.member == to)
            || from.is_some_and(|f| !ext.copies.iter().any(|c| c.member == f))
        {
            return Ok(None);
        }
        let path = pool
            .extent_path(to, self.ino, index, ext.file_id)
            .ok_or_else(|| FsError::Corrupt(format!("unknown member {to}")))?;
        // A leftover of an interrupted move is overwritten.
        let out = pool
            .storage()
            .open(&path, OpenMode::REPLACE)
            .map_err(map_write_err)?;
        let exp = self.expected(pool, &ext, 0, n);
        let bs = self.bs;
        for (ds, de) in self.data_ranges(pool, &ext) {
            let mut pos = ds;
            while pos < de {
                let len = (de - pos).min(CHUNK);
                let mut buf = vec![0u8; len as usize];
                let b0 = pos / bs;
                let verified = match &exp {
                    Some(t) => self
                        .read_verified(
                            pool,
                            &ext,
                            b0,
                            &mut buf,
                            &t[b0 as usize..(b0 + len / bs) as usize],
                        )
                        .map(|bad| self.repair_locked(pool, &ext, &bad)),
                    None => Err(FsError::Invalid),
                };
                if verified.is_err() {
                    // No table, or a block with no good copy: copy the bytes as
                    // they are (a damaged block stays detectably damaged).
                    buf.fill(0);
                    self.read_any(pool, &ext, pos, &mut buf)?;
                }
                out.write_all_at(&buf, pos).map_err(map_write_err)?;
                pos += len;
            }
        }
        // Same length as the source (reads past it are zeros either way).
        let src_len = ext
            .file(pool, self.ino, ext.first_usable(pool))
            .and_then(|f| f.len().map_err(FsError::Io))
            .unwrap_or(0);
        if out.len().map_err(FsError::Io)? < src_len {
            out.set_len(src_len).map_err(map_write_err)?;
        }
        out.sync_data().map_err(FsError::Io)?;
        let mut copies = ext.copies_without(from);
        copies.push(ExtentCopy { member: to });
        pool.fds.put((to, self.ino, index, ext.file_id), out);
        if !self.swap_copies(&ext, copies) {
            ext.forget_file(pool, self.ino, to);
            let _ = pool.storage().remove_file(&path);
            return Ok(None);
        }
        if let Some(m) = pool.member(to) {
            m.extents.fetch_add(1, Ordering::Relaxed);
            m.invalidate_space();
        }
        Ok(Some(
            from.map(|f| vec![(f, self.ino, index, ext.file_id)])
                .unwrap_or_default(),
        ))
    }

    /// Drops the copy of extent `index` on `member` (at least one copy stays).
    /// Returns its file for removal after the next durable commit.
    pub fn drop_copy(&self, index: u64, member: u32) -> Option<DeadExtent> {
        let ext = self.get(index)?;
        let n = self.blocks_per_extent();
        let _g = self.lock_excl(index, 0, n);
        let ext = self.current(ext);
        if ext.copies.len() < 2 || !ext.copies.iter().any(|c| c.member == member) {
            return None;
        }
        let copies = ext.copies_without(Some(member));
        self.swap_copies(&ext, copies)
            .then_some((member, self.ino, index, ext.file_id))
    }

    /// Extents changed under a tag of at least `since_tag` or at
    /// [`crate::storage::Storage::clock_ms`] `since_ms` or later: likely to change again in the next
    /// commit interval, so the commit logs their intent records for the next
    /// tag ahead of time, off the writers' path (a writer otherwise waits for
    /// that fdatasync, which is slow while the disk is busy with the commit's
    /// own flushes). The time bound keeps them covered across commits that
    /// come in quick succession (a snapshot commits twice within
    /// milliseconds), as md keeps a write-intent bit set until its chunk has
    /// been idle for a while.
    pub fn hot_extents(&self, since_tag: u64, since_ms: u64) -> Vec<Arc<Extent>> {
        self.map
            .read()
            .values()
            .filter(|e| {
                let tag = e.intent_tag.load(Ordering::Acquire);
                tag >= since_tag || (tag > 0 && e.touched_ms.load(Ordering::Relaxed) >= since_ms)
            })
            .cloned()
            .collect()
    }

    /// Indexes of the extents in the map.
    pub fn extent_indexes(&self) -> Vec<u64> {
        self.map.read().keys().copied().collect()
    }

    /// Byte ranges within extent `ext` that hold data on any copy (whole
    /// blocks, merged); the rest reads as zeros everywhere.
    fn data_ranges(&self, pool: &Pool, ext: &Extent) -> Vec<(u64, u64)> {
        let mut all: Vec<(u64, u64)> = Vec::new();
        for c in 0..ext.copies.len() {
            let Ok(f) = ext.file(pool, self.ino, c) else {
                continue;
            };
            match seek_data_ranges(&f, 0, self.esize) {
                Ok(r) => all.extend(r),
                // Cannot tell: everything counts as data.
                Err(_) => return vec![(0, self.esize)],
            }
        }
        all.sort_unstable();
        widen_merge(all, self.bs)
    }

    /// After an unclean stop, makes extent `index` consistent: where its copies
    /// differ, the copy matching the old checksum (else the first) is written
    /// to the others, and the checksum table is recomputed from the data
    /// (cf. the md write-intent bitmap resync). Returns the blocks rewritten.
    pub fn resync(&self, pool: &Pool, index: u64) -> FsResult<u64> {
        let Some(ext) = self.get(index) else {
            return Ok(0);
        };
        let n = self.blocks_per_extent();
        let _g = self.lock_excl(index, 0, n);
        let old = self.sums(pool, &ext).table.clone().flatten();
        let (vals, fixed) = self.rebuild_locked(pool, &ext, old.as_deref())?;
        *ext.sums.lock() = Sums::new_dirty(vals);
        Ok(fixed)
    }

    /// Recomputes the checksum table of `ext` from its copies, making them
    /// agree first (preferring, per block, a copy matching `old`). The caller
    /// holds every stripe of the extent.
    fn rebuild_locked(
        &self,
        pool: &Pool,
        ext: &Extent,
        old: Option<&[u32]>,
    ) -> FsResult<(Vec<u32>, u64)> {
        const CHUNK: u64 = 1 << 20;
        let mut vals = vec![self.zcrc; self.blocks_per_extent() as usize];
        let mut fixed = 0;
        for (ds, de) in self.data_ranges(pool, ext) {
            let mut pos = ds;
            while pos < de {
                let len = (de - pos).min(CHUNK);
                let b0 = pos / self.bs;
                let bufs: Vec<Option<Vec<u8>>> = (0..ext.copies.len())
                    .map(|c| {
                        let mut buf = vec![0u8; len as usize];
                        self.read_copy(pool, ext, c, b0, &mut buf).ok().map(|_| buf)
                    })
                    .collect();
                let n = len / self.bs;
                let want = old.map(|o| &o[b0 as usize..(b0 + n) as usize]);
                let out = &mut vals[b0 as usize..(b0 + n) as usize];
                fixed += self
                    .agree_blocks(pool, ext, b0, &bufs, want, out)?
                    .ok_or_else(eio)?;
                pos += len;
            }
        }
        Ok((vals, fixed))
    }

    /// Makes the copies of blocks `[b0, b0 + out.len())` of `ext` agree, given
    /// what each copy holds there (`bufs`, `None`: unreadable): per block, a
    /// trusted copy matching `old` (the table's checksums), else the first
    /// trusted copy, is written to the copies that differ, and its checksum
    /// goes to `out`. Returns the copies rewritten, or `None` when no copy
    /// reads. The caller holds the blocks' stripes.
    fn agree_blocks(
        &self,
        pool: &Pool,
        ext: &Extent,
        b0: u64,
        bufs: &[Option<Vec<u8>>],
        old: Option<&[u32]>,
        out: &mut [u32],
    ) -> FsResult<Option<u64>> {
        let bs = self.bs as usize;
        // Copies on a member that missed commits (failed, and back) are
        // stale: they may even match the old checksum, of data a flush since
        // replaced on the others. They count only when no copy on a member
        // in step reads.
        let in_step: Vec<bool> = (0..bufs.len())
            .map(|c| bufs[c].is_some() && !pool.is_behind(ext.copies[c].member))
            .collect();
        let trusted: Vec<bool> = if in_step.iter().any(|t| *t) {
            in_step
        } else {
            bufs.iter().map(|b| b.is_some()).collect()
        };
        let Some(first) = trusted.iter().position(|t| *t) else {
            return Ok(None);
        };
        let mut fixed = 0;
        for (i, slot) in out.iter_mut().enumerate() {
            let b = b0 + i as u64;
            let blk = |c: usize| bufs[c].as_ref().map(|d| &d[i * bs..(i + 1) * bs]);
            let crcs: Vec<Option<u32>> = (0..bufs.len()).map(|c| blk(c).map(block_crc)).collect();
            let want = old.map(|o| o[i]);
            let chosen = (0..crcs.len())
                .find(|c| trusted[*c] && crcs[*c].is_some() && crcs[*c] == want)
                .unwrap_or(first);
            let crc = crcs[chosen].unwrap_or(self.zcrc);
            *slot = crc;
            for (c, have) in crcs.iter().enumerate() {
                if c == chosen || have.is_none() || *have == Some(crc) {
                    continue;
                }
                let good = blk(chosen).unwrap_or(&[]);
                let r = ext
                    .file(pool, self.ino, c)
                    .and_then(|f| f.write_all_at(good, b * self.bs).map_err(map_write_err));
                match r {
                    Ok(()) => {
                        ext.written();
                        fixed += 1;
                    }
                    Err(FsError::Io(e)) if pool.check_member(ext.copies[c].member, &e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Some(fixed))
    }

    /// Verifies every copy of every block of extent `index` against its
    /// checksum, repairing bad copies from good ones; an extent without a valid
    /// table gets one rebuilt from its data. Runs a stripe region at a time so
    /// that I/O to the file goes on.
    pub fn scrub_extent(&self, pool: &Pool, index: u64, out: &mut ScrubCounts) -> FsResult<()> {
        const CHUNK_BLOCKS: u64 = 256;
        let Some(ext) = self.get(index) else {
            return Ok(());
        };
        out.extents += 1;
        let n = self.blocks_per_extent();
        if !self.has_table(pool, &ext) {
            let _g = self.lock_excl(index, 0, n);
            if !self.has_table(pool, &ext) {
                let (vals, fixed) = self.rebuild_locked(pool, &ext, None)?;
                *ext.sums.lock() = Sums::new_dirty(vals);
                out.tables_rebuilt += 1;
                out.repaired += fixed;
                tracing::warn!(
                    ino = self.ino,
                    extent = index,
                    "checksum table rebuilt from the data"
                );
                return Ok(());
            }
        }
        let bs = self.bs as usize;
        let holes_ok = |b0: u64, b1: u64, exp: &[u32], data: &[(u64, u64)]| -> Vec<u64> {
            // Blocks that are holes on every copy read as zeros.
            (b0..b1)
                .filter(|b| {
                    let off = b * self.bs;
                    !data.iter().any(|(s, e)| *s <= off && off < *e)
                        && exp[(b - b0) as usize] != self.zcrc
                })
                .collect()
        };
        let data = self.data_ranges(pool, &ext);
        let mut b0 = 0;
        while b0 < n {
            let b1 = (b0 + CHUNK_BLOCKS).min(n);
            let mut bad: BTreeSet<u64> = BTreeSet::new();
            {
                let _g = self.lock_shared(index, b0, b1);
                let Some(ext) = self.get(index) else {
                    break;
                };
                let Some(exp) = self.expected(pool, &ext, b0, b1) else {
                    break;
                };
                let (lo, hi) = (b0 * self.bs, b1 * self.bs);
                if data.iter().any(|(s, e)| *s < hi && *e > lo) {
                    let mut buf = vec![0u8; ((b1 - b0) as usize) * bs];
                    // Copies on failed or missing members are the status's
                    // business (DEGRADED), not read errors.
                    for c in (0..ext.copies.len()).filter(|c| pool.usable(ext.copies[*c].member)) {
                        out.bytes += buf.len() as u64;
                        if self.read_copy(pool, &ext, c, b0, &mut buf).is_err() {
                            out.io_errors += 1;
                            bad.extend(b0..b1);
                            continue;
                        }
                        for (i, blk) in buf.chunks(bs).enumerate() {
                            if block_crc(blk) != exp[i] {
                                out.checksum_errors += 1;
                                pool.integrity
                                    .checksum_errors
                                    .fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(
                                    ino = self.ino,
                                    extent = index,
                                    block = b0 + i as u64,
                                    copy = c,
                                    "scrub: checksum mismatch"
                                );
                                bad.insert(b0 + i as u64);
                            }
                        }
                    }
                } else {
                    for b in holes_ok(b0, b1, &exp, &data) {
                        out.checksum_errors += 1;
                        bad.insert(b);
                    }
                }
            }
            if !bad.is_empty() {
                let bad: Vec<u64> = bad.into_iter().collect();
                let (fixed, lost) = self.repair(pool, &ext, &bad);
                out.repaired += fixed;
                out.unrecoverable += lost;
                if lost > 0 {
                    pool.integrity
                        .unrecoverable
                        .fetch_add(lost, Ordering::Relaxed);
                    pool.emit(
                        "unrecoverable",
                        crate::pool::info::Severity::Error,
                        None,
                        format!(
                            "inode {} extent {index}: {lost} block(s) with no good copy; reads there fail with EIO",
                            self.ino
                        ),
                    );
                }
            }
            b0 = b1;
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

    /// Whether any extent has unsynced data, an unsynced directory entry or an
    /// unwritten checksum table.
    pub fn needs_sync(&self) -> bool {
        self.map.read().values().any(|e| {
            e.dirty.load(Ordering::Acquire)
                || e.fresh.load(Ordering::Acquire)
                || e.sums.lock().dirty
        })
    }

    /// Closes the member files (after the last handle of the file is released).
    pub fn close_files(&self, pool: &Pool) {
        for e in self.map.read().values() {
            if !e.dirty.load(Ordering::Acquire) {
                for c in &e.copies {
                    e.forget_file(pool, self.ino, c.member);
                }
            }
            let mut g = e.sums.lock();
            if !g.dirty {
                g.table = None;
            }
        }
    }
}
