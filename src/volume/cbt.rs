//! Changed-block tracking (docs/design.md section 16.2): one bit per block
//! changed since the last snapshot, one bitmap per extent index.
//!
//! Invariants: a bitmap outlives its extent (an extent dropped by truncate
//! keeps its bits until a snapshot takes them over); every bitmap changed
//! since the last commit is in `dirty`, so the commit persists it, and a
//! failed commit puts its indexes back.

use std::collections::{BTreeMap, BTreeSet};

use super::Volume;

/// Changed-block tracking of one file: one bit per block, one bitmap per extent
/// index (an extent dropped by truncate keeps its bits), and the extents whose
/// bitmap changed since the last commit.
#[derive(Default)]
pub(super) struct Cbt {
    pub(super) bits: BTreeMap<u64, Vec<u64>>,
    pub(super) dirty: BTreeSet<u64>,
}

impl Volume {
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
}
