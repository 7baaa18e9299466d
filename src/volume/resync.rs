//! Whole-extent work under all of an extent's stripes or a region at a
//! time: moving and dropping copies (docs/design.md section 17.5),
//! resynchronising the copies after a crash (section 17.2), and scrub
//! (section 17.3).
//!
//! Invariants: a move swaps a new extent into the map only if the old one is
//! still there; the new layout is fresh and its table dirty, so the next
//! commit fsyncs its directory entries and writes its sum files; the old
//! copy's file goes back to the caller, to be removed only after a durable
//! commit records the new layout. Where copies differ, a copy on a member that missed commits
//! counts only when no copy on a member in step reads.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::extent::{Extent, ExtentCopy};
use super::raw::{eio, map_write_err, seek_data_ranges, widen_merge};
use super::stripes::Sums;
use super::{DeadExtent, Volume};
use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::sums::block_crc;
use crate::storage::OpenMode;

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

impl Volume {
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
            .ok_or_else(|| FsError::corrupt(format!("unknown member {to}")))?;
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
                            false,
                        )
                        .map(|bad| self.repair_locked(pool, &ext, &bad)),
                    None => Err(FsError::Invalid),
                };
                if verified.is_err() {
                    // No table, or a block with no good copy: copy the bytes as
                    // they are (a damaged block stays detectably damaged).
                    buf.fill(0);
                    self.read_any(pool, &ext, pos, &mut buf, false)?;
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
        pool.fds.put(ext.file_on(self.ino, to), out);
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
            from.map(|f| vec![ext.file_on(self.ino, f)])
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
            .then_some(ext.file_on(self.ino, member))
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
        self.changed();
        m.insert(old.index, Arc::new(old.with_copies(copies)));
        true
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
    pub(super) fn agree_blocks(
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
}
