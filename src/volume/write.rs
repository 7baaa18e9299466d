//! The change path: writes, punches, zero ranges, preallocation and
//! truncation, each piece of an extent under its stripes, and the
//! fdatasync of written extents.
//!
//! Invariants: before a change, its extent's intent record is durable and
//! its blocks are marked in the changed-block bitmap; every usable copy is
//! changed (a copy whose member fails meanwhile is skipped, and the member
//! failed); a change that fails part-way leaves its blocks consistent: the
//! copies are made to agree and the table takes the checksums of what they
//! hold ([`Volume::heal_blocks`]); a member down to its reserve refuses
//! writes that need new space.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::buffers::AlignedBuf;
use super::extent::Extent;
use super::raw::{direct_fits, fully_allocated, map_write_err};
use super::{DeadExtent, Piece, Volume, WriteMode, pieces};
use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::sums::block_crc;
use crate::storage::{Alloc, Handle};

/// Refuses a write of `len` bytes at `within` of `f` on `member` when the member is
/// down to its reserve, unless the range is already allocated (overwrites need no space).
fn check_room(pool: &Pool, member: u32, f: &Handle, within: u64, len: u64) -> FsResult<()> {
    let m = pool
        .member(member)
        .ok_or_else(|| FsError::corrupt(format!("unknown member {member}")))?;
    let avail = m.available().map_err(FsError::Io)?;
    if avail < len && !fully_allocated(f, within, len).map_err(FsError::Io)? {
        tracing::debug!(member = %m.dir.display(), avail, len, "member full: write refused");
        return Err(FsError::NoSpace);
    }
    Ok(())
}

/// Bytes an extent takes in [`WriteMode::Behind`] before its writeback is
/// started, all of it at once. Started per request, every 4 KiB page of a
/// random writer's flush was its own block request and its own doorbell to
/// the disk (a virtio notify: 6.7 % of the CPU of a flush); started per
/// extent, the member filesystem sends the batch sorted and merged under
/// one plug. At most this much per extent stays dirty twice (docs/perf,
/// change 15).
const BEHIND_BATCH: u64 = 1 << 20;

fn invalidate_space(pool: &Pool, member: u32) {
    if let Some(m) = pool.member(member) {
        m.invalidate_space();
    }
}

impl Volume {
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
        self.write_io(pool, off, data, WriteMode::Cached)
    }

    /// [`Volume::write`] in `mode`. With [`WriteMode::Direct`], pieces
    /// aligned to [`crate::storage::DIRECT_ALIGN`] in offset and length go to
    /// the members past their page cache, through an aligned copy; other
    /// pieces go through the cache (the kernel keeps both views coherent).
    /// With [`WriteMode::Stream`], each piece's writeback starts at once;
    /// after the stripe lock is let go, the piece goes to the pool's drain,
    /// which waits for that writeback and drops those member pages (the
    /// mount keeps its own copy until the request is answered: the members'
    /// would be a second one, and new page cache is costly where the host
    /// backs guest memory on first touch); with [`WriteMode::Behind`] the
    /// extent's writeback starts once per `BEHIND_BATCH` and the extent goes
    /// to the drain, which drops its member pages once written back, for
    /// the same reason (`write_behind_batched`; [`WriteMode::BehindKept`]
    /// keeps them). Write-behind
    /// is only a hint to the member's page cache: it changes when data
    /// reaches the disk, never what a crash may leave, since durability
    /// still comes from the fdatasync at commit. The ordering rules are
    /// the same in every mode: intent record and changed-block marks first,
    /// data next, and durability at the next fdatasync of the extent.
    pub fn write_io(&self, pool: &Pool, off: u64, data: &[u8], mode: WriteMode) -> FsResult<()> {
        for p in pieces(self.esize, off, data.len()) {
            let ext = self.get_or_alloc(pool, p.index, p.len as u64)?;
            let piece = &data[p.buf_off..p.buf_off + p.len];
            let aligned = (mode == WriteMode::Direct && direct_fits(p.within, p.len))
                .then(|| AlignedBuf::copy_of(piece));
            let batch =
                matches!(mode, WriteMode::Behind | WriteMode::BehindKept).then(|| ext.clone());
            let mut streamed = Vec::new();
            self.change(pool, ext, &p, Some(Some(piece)), |member, f| {
                check_room(pool, member, f, p.within, p.len as u64)?;
                match &aligned {
                    Some(a) => f.write_direct_all_at(a.as_slice(), p.within),
                    None => f.write_all_at(piece, p.within),
                }
                .map_err(|e| {
                    invalidate_space(pool, member);
                    map_write_err(e)
                })?;
                if mode == WriteMode::Stream {
                    f.write_behind(p.within, p.len as u64, false);
                    streamed.push(f.clone());
                }
                Ok(())
            })?;
            // Each piece's own range is dropped once written back (dropping
            // some distance behind missed half of them: a writeback's
            // requests are served out of order; docs/perf, change 16), by the
            // drain, so that the request is answered after the copy.
            for f in streamed {
                pool.drain.push(f, p.within, p.len as u64);
            }
            if let Some(ext) = batch {
                self.write_behind_batched(pool, &ext, p.len as u64, mode == WriteMode::Behind);
            }
        }
        Ok(())
    }

    /// Counts `len` bytes written to `ext` in [`WriteMode::Behind`] (or
    /// [`WriteMode::BehindKept`]) and,
    /// once [`BEHIND_BATCH`] have gathered, starts the writeback of every
    /// dirty page of the extent's copies in one call, and (`drop`) hands
    /// the extent to the drain, which waits for that writeback and drops the
    /// clean pages (the mount holds its own copy of each). Outside the stripe
    /// lock: a hint to the member's page cache, it changes no content and
    /// no ordering. Only files the descriptor cache holds get it, and
    /// nothing is opened: a file removed meanwhile (a truncate, a move) was
    /// dropped from the cache first, and must not be reported missing.
    fn write_behind_batched(&self, pool: &Pool, ext: &Extent, len: u64, drop: bool) {
        let gathered = ext.behind.fetch_add(len, Ordering::AcqRel) + len;
        // Of two writers past the line at once, the first to take the count
        // starts the writeback.
        if gathered < BEHIND_BATCH || ext.behind.swap(0, Ordering::AcqRel) < BEHIND_BATCH {
            return;
        }
        for c in ext.copies.iter().filter(|c| pool.usable(c.member)) {
            if let Some(f) = pool.fds.cached(&ext.file_on(self.ino, c.member)) {
                f.write_behind(0, self.esize, false);
                if drop {
                    pool.drain.push_counted(f, 0, self.esize, BEHIND_BATCH);
                }
            }
        }
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
        self.changed();
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
}
