//! The read path: whole blocks read from the first usable copy and verified
//! against their checksums, a bad block served from a good copy and the bad
//! copies rewritten from it (docs/design.md section 17.1); reads for a
//! snapshot capture; SEEK_DATA and SEEK_HOLE.
//!
//! Invariants: a read of an extent with a checksum table never returns
//! bytes that fail their checksum (with no matching copy it fails with
//! EIO); it holds the blocks' stripes shared (a snapshot capture holds none:
//! writers of the blocks it reads wait in copy-before-write), and a repair
//! re-verifies under the exclusive stripes, since a write may have come in
//! between.

use std::sync::atomic::Ordering;

use super::buffers::ReadBuf;
use super::extent::Extent;
use super::raw::{eio, map_write_err, read_full_io, seek_data_ranges, widen_merge};
use super::{Segment, Volume, clip, pieces};
use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::sums::block_crc;

impl Volume {
    /// Reads `len` bytes at `off` of a file of `size` bytes; holes read as zeros.
    /// Each piece comes from the first copy that can be read.
    pub fn read(&self, pool: &Pool, off: u64, len: usize, size: u64) -> FsResult<Vec<u8>> {
        self.read_io(pool, off, len, size, false)
            .map(ReadBuf::into_vec)
    }

    /// [`Volume::read`]; with `direct` (an `O_DIRECT` open, or a long read),
    /// the aligned member reads bypass the host's page cache, straight into
    /// the returned buffer.
    pub fn read_io(
        &self,
        pool: &Pool,
        off: u64,
        len: usize,
        size: u64,
        direct: bool,
    ) -> FsResult<ReadBuf> {
        let len = clip(off, len, size);
        if len == 0 {
            return Ok(ReadBuf::zeroed(0, false));
        }
        let mut buf = ReadBuf::zeroed(len, direct);
        for p in pieces(self.esize, off, len) {
            let Some(ext) = self.get(p.index) else {
                continue;
            };
            let dst = &mut buf[p.buf_off..p.buf_off + p.len];
            self.read_extent_with(pool, &ext, p.within, dst, true, direct)?;
        }
        Ok(buf)
    }

    /// Fills `dst` from the extent at `within`, verified against the block
    /// checksums: bad blocks are served from a good copy and rewritten.
    /// Without `lock`, the caller guarantees that nothing changes the blocks
    /// read meanwhile (a snapshot capture: writers of blocks being captured
    /// wait in copy-before-write), so that a long cold read holds no stripe
    /// other writers need. `direct`: see [`Volume::read_io`].
    fn read_extent_with(
        &self,
        pool: &Pool,
        ext: &Extent,
        within: u64,
        dst: &mut [u8],
        lock: bool,
        direct: bool,
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
            return self.read_any(pool, ext, within, dst, direct);
        };
        let bad = if within == b0 * bs && end == b1 * bs {
            self.read_verified(pool, ext, b0, dst, &exp, direct)?
        } else {
            let mut buf = vec![0u8; ((b1 - b0) * bs) as usize];
            let bad = self.read_verified(pool, ext, b0, &mut buf, &exp, direct)?;
            let at = (within - b0 * bs) as usize;
            dst.copy_from_slice(&buf[at..at + dst.len()]);
            bad
        };
        drop(guards);
        self.repair(pool, ext, &bad);
        Ok(())
    }

    /// Fills `dst` from the first copy that answers, unverified (`direct`:
    /// past the page cache where aligned).
    pub(super) fn read_any(
        &self,
        pool: &Pool,
        ext: &Extent,
        within: u64,
        dst: &mut [u8],
        direct: bool,
    ) -> FsResult<()> {
        let mut last_err = Some(eio());
        for copy in 0..ext.copies.len() {
            if !pool.usable(ext.copies[copy].member) {
                continue;
            }
            match ext
                .file(pool, self.ino, copy)
                .and_then(|f| read_full_io(&f, dst, within, direct))
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

    /// Reads `buf` (whole blocks from block `b0`) from one copy.
    pub(super) fn read_copy(
        &self,
        pool: &Pool,
        ext: &Extent,
        copy: usize,
        b0: u64,
        buf: &mut [u8],
    ) -> FsResult<()> {
        self.read_copy_io(pool, ext, copy, b0, buf, false)
    }

    /// [`Volume::read_copy`], past the page cache with `direct`.
    fn read_copy_io(
        &self,
        pool: &Pool,
        ext: &Extent,
        copy: usize,
        b0: u64,
        buf: &mut [u8],
        direct: bool,
    ) -> FsResult<()> {
        if !pool.usable(ext.copies[copy].member) {
            return Err(eio());
        }
        let r = ext
            .file(pool, self.ino, copy)
            .and_then(|f| read_full_io(&f, buf, b0 * self.bs, direct));
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
    /// `direct`: the first read bypasses the page cache where aligned.
    pub(super) fn read_verified(
        &self,
        pool: &Pool,
        ext: &Extent,
        b0: u64,
        buf: &mut [u8],
        exp: &[u32],
        direct: bool,
    ) -> FsResult<Vec<u64>> {
        let bs = self.bs as usize;
        let n = ext.copies.len();
        let mut first = None;
        let mut last_err = None;
        for c in 0..n {
            match self.read_copy_io(pool, ext, c, b0, buf, direct) {
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

    pub(super) fn repair(&self, pool: &Pool, ext: &Extent, blocks: &[u64]) -> (u64, u64) {
        if blocks.is_empty() {
            return (0, 0);
        }
        let (lo, hi) = (blocks[0], blocks[blocks.len() - 1] + 1);
        let _g = self.lock_excl(ext.index, lo, hi);
        let cur = self.get(ext.index);
        let ext: &Extent = cur.as_deref().unwrap_or(ext);
        self.repair_locked(pool, ext, blocks)
    }

    /// Rewrites bad copies of `blocks` from a good one; the caller holds their
    /// stripes exclusively. Returns (repaired copies, blocks with no good copy).
    pub(super) fn repair_locked(&self, pool: &Pool, ext: &Extent, blocks: &[u64]) -> (u64, u64) {
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

    /// Content of block `b` verified (repaired in place when a copy is bad);
    /// the caller holds its stripe exclusively.
    pub(super) fn block_locked(&self, pool: &Pool, ext: &Extent, b: u64) -> FsResult<Vec<u8>> {
        let mut blk = vec![0u8; self.bs as usize];
        match self.expected(pool, ext, b, b + 1) {
            Some(exp) => {
                let bad = self.read_verified(pool, ext, b, &mut blk, &exp, false)?;
                self.repair_locked(pool, ext, &bad);
            }
            None => self.read_any(pool, ext, b * self.bs, &mut blk, false)?,
        }
        Ok(blk)
    }

    /// Reads blocks `[start, start+count)` (all within one extent) as a snapshot
    /// captures them: runs of holes (unallocated in the first copy) and of data.
    /// Without `lock` the caller guarantees that no one changes them (they
    /// are pending in the capture, and writers wait); with it, the blocks'
    /// stripes are held shared while each run is read, so that a block being
    /// written meanwhile is read whole, with its checksum.
    pub fn capture(
        &self,
        pool: &Pool,
        start: u64,
        count: u64,
        lock: bool,
    ) -> FsResult<Vec<Segment>> {
        let bs = self.bs;
        let off = start * bs;
        let len = count * bs;
        let index = off / self.esize;
        debug_assert!((off + len - 1) / self.esize == index);
        let Some(ext) = self.get(index) else {
            return Ok(vec![Segment::new(start, count, None)]);
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
                out.push(Segment::new((base + cur) / bs, (ds - cur) / bs, None));
            }
            let mut buf = vec![0u8; (de - ds) as usize];
            self.read_extent_with(pool, &ext, ds, &mut buf, lock, false)?;
            out.push(Segment::new((base + ds) / bs, (de - ds) / bs, Some(buf)));
            cur = de;
        }
        if cur < hi {
            out.push(Segment::new((base + cur) / bs, (hi - cur) / bs, None));
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
}
