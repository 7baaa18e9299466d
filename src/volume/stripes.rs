//! Stripe locks and block checksums (docs/design.md section 17.1).
//!
//! Every block of an extent has a CRC-32C in the extent's table, loaded on
//! first use from the valid sum file of the highest generation among its
//! copies and written back to every copy's sum file by the commit.
//!
//! Invariants: data and checksums change together under the blocks'
//! stripes, taken exclusively (verified reads take them shared), always in
//! ascending slot order; a partially covered block is read verified before
//! its new checksum is computed, so corruption is never blessed into a new
//! CRC; a sum file on disk matches its copy's blocks or is damaged (before
//! the first change to an extent with no usable table its sum files are
//! removed, durably).

use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;

use parking_lot::{MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Volume;
use super::extent::Extent;
use super::raw::map_write_err;
use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::sums::{self, SumId, block_crc};

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

/// Stripe slots covering blocks `[b0, b1)` of extent `index` of file `ino`,
/// ascending (the lock order). The regions of one extent take consecutive
/// slots from a hashed base, so that disjoint ranges of an extent of up to
/// `STRIPES` regions (256 MiB of 4 KiB blocks) never share a stripe: the
/// requests of one sequential flush, served at once, do not wait for each
/// other (docs/perf, change 17). Different extents meet only where their
/// bases fall close.
fn stripe_slots(ino: u64, index: u64, b0: u64, b1: u64) -> Vec<usize> {
    // splitmix64 of the extent's identity.
    let mut z = ino
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let base = (z ^ (z >> 31)) % STRIPES as u64;
    let (r0, r1) = (b0 / REGION_BLOCKS, b1.max(b0 + 1).div_ceil(REGION_BLOCKS));
    let mut v: Vec<usize> = (r0..r1)
        .map(|r| (base.wrapping_add(r % STRIPES as u64) % STRIPES as u64) as usize)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The block checksums of an extent, loaded from a sum file on first use.
#[derive(Default)]
pub(super) struct Sums {
    /// `None`: not loaded yet; `Some(None)`: no usable table (the extent's
    /// blocks are not verified until scrub rebuilds it).
    pub(super) table: Option<Option<Vec<u32>>>,
    /// Changed since the sum files were last written.
    pub(super) dirty: bool,
    /// With no usable table: the sum files on disk were removed (durably),
    /// so that one a read merely failed to load cannot come back later to
    /// judge blocks written since.
    pub(super) cleared: bool,
}

impl Sums {
    /// A table to be written by the next commit.
    pub(super) fn new_dirty(vals: Vec<u32>) -> Sums {
        Sums {
            table: Some(Some(vals)),
            dirty: true,
            cleared: false,
        }
    }
}

impl Volume {
    fn sum_id(&self, ext: &Extent) -> SumId {
        SumId {
            ino: self.ino,
            index: ext.index,
            file_id: ext.file_id,
            block_size: self.bs as u32,
            entries: self.blocks_per_extent() as u32,
        }
    }

    pub(super) fn lock_shared(&self, index: u64, b0: u64, b1: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        stripe_slots(self.ino, index, b0, b1)
            .into_iter()
            .map(|i| STRIPE_LOCKS[i].read())
            .collect()
    }

    /// The blocks' stripes, exclusively: every change to blocks takes
    /// them, and counts as begun once it holds them (`Volume::changed`).
    pub(super) fn lock_excl(&self, index: u64, b0: u64, b1: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        let g = stripe_slots(self.ino, index, b0, b1)
            .into_iter()
            .map(|i| STRIPE_LOCKS[i].write())
            .collect();
        self.changed();
        g
    }

    /// The extent's checksum table, loaded on first use (see `load_sums`).
    pub(super) fn sums<'a>(&self, pool: &Pool, ext: &'a Extent) -> MutexGuard<'a, Sums> {
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
    pub(super) fn has_table(&self, pool: &Pool, ext: &Extent) -> bool {
        matches!(self.sums(pool, ext).table, Some(Some(_)))
    }

    /// Expected checksums of blocks `[b0, b1)` of `ext` (`None`: not verified).
    pub(super) fn expected(&self, pool: &Pool, ext: &Extent, b0: u64, b1: u64) -> Option<Vec<u32>> {
        let g = self.sums(pool, ext);
        g.table
            .as_ref()
            .and_then(|t| t.as_ref())
            .map(|t| t[b0 as usize..b1 as usize].to_vec())
    }

    /// Stores checksums of blocks from `b0` on (caller holds their stripes).
    pub(super) fn set_sums(&self, pool: &Pool, ext: &Extent, b0: u64, vals: &[u32]) {
        let mut g = self.sums(pool, ext);
        if let Some(Some(t)) = g.table.as_mut() {
            t[b0 as usize..b0 as usize + vals.len()].copy_from_slice(vals);
            g.dirty = true;
        }
    }

    /// New checksums of blocks `[b0, b1)` after bytes `[s, e)` (offsets within
    /// the extent) become `new` (`None`: zeros); partial blocks are read
    /// verified first. `None` when the extent has no checksum table. The caller
    /// holds the stripes exclusively.
    pub(super) fn sums_after(
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

    /// Writes the extent's checksum table to every copy's sum file if it changed.
    pub(super) fn write_sums(
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
            // Named before the write: a file created by a write that then
            // fails still needs its entry synced by a later commit.
            if !pool.storage().exists(&p) {
                new_dirs.insert(c.member);
            }
            match sums::write(pool.storage(), &p, id, generation, &vals) {
                Ok(()) => written += 1,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent writes of disjoint ranges of one extent (the requests of a
    /// sequential writeback, served by many workers at once) never wait for
    /// each other's stripes. Hashing each 16-block region on its own made
    /// two 4 MiB requests share a stripe with a chance of about 63 %, and a
    /// sequential flush ran with 26 of 28 workers waiting on stripe locks.
    #[test]
    fn disjoint_ranges_of_one_extent_share_no_stripe() {
        let blocks = (64u64 << 20) / 4096; // a 64 MiB extent of 4 KiB blocks
        for (ino, index) in [(2u64, 0u64), (2, 1), (77, 5), (u64::MAX, u64::MAX)] {
            for len in [256u64, 1024] {
                let ranges: Vec<Vec<usize>> = (0..blocks / len)
                    .map(|i| stripe_slots(ino, index, i * len, (i + 1) * len))
                    .collect();
                for (i, a) in ranges.iter().enumerate() {
                    assert!(a.windows(2).all(|w| w[0] < w[1]), "lock order ascending");
                    assert_eq!(a.len() as u64, len / REGION_BLOCKS);
                    for b in &ranges[i + 1..] {
                        assert!(
                            a.iter().all(|s| !b.contains(s)),
                            "ino {ino} extent {index}: ranges of {len} blocks share a stripe"
                        );
                    }
                }
            }
        }
    }
}
