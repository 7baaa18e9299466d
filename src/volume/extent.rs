//! The extent map of one file and the extents in it.
//!
//! An [`Extent`] is one extent index of the file with its copies (one per
//! member), its file id and its state: data written since the last
//! fdatasync (`dirty`), created since the last durable commit (`fresh`), the
//! intent tag its change was logged under, and its checksum table
//! (stripes.rs). The map holds one `Arc<Extent>` per allocated index.
//!
//! Invariants: an extent in the map is never changed in place to name other
//! copies: a move swaps in a new `Extent` (resync.rs), so a caller that
//! waited for stripes takes the extent from the map again
//! ([`Volume::current`]). Every change to an extent is preceded, the first
//! time under the pool's current intent tag, by a durable intent record
//! ([`Extent::prepare`]), except under the tag the extent was created under
//! (no durable map names it before the commit of that tag).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::raw::{eio, map_write_err};
use super::stripes::Sums;
use super::{DeadExtent, Volume};
use crate::error::FsResult;
use crate::pool::meta::ExtentRecord;
use crate::pool::{ExtentFile, Pool};
use crate::storage::Handle;

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
    pub(super) dirty: AtomicBool,
    /// Created since the last durable commit (its directory entries need an fsync).
    pub(super) fresh: AtomicBool,
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
    pub(super) sums: Mutex<Sums>,
    /// Bytes written in [`super::WriteMode::Behind`] since this extent's
    /// writeback was last started (see `Volume::write_io`).
    pub(super) behind: AtomicU64,
}

impl Extent {
    pub(super) fn new(index: u64, file_id: u64, members: Vec<u32>, fresh: bool) -> Extent {
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
            behind: AtomicU64::new(0),
        }
    }

    /// This extent with the copies `copies`, for [`Volume::swap_copies`]:
    /// its state carried over, the layout fresh and the checksum table
    /// dirty.
    pub(super) fn with_copies(&self, copies: Vec<ExtentCopy>) -> Extent {
        // A copy: a snapshot capture still reading through the old extent
        // verifies against it.
        let sums = {
            let g = self.sums.lock();
            Sums {
                table: g.table.clone(),
                dirty: true,
                cleared: g.cleared,
            }
        };
        Extent {
            index: self.index,
            file_id: self.file_id,
            copies,
            dirty: AtomicBool::new(true),
            fresh: AtomicBool::new(true),
            blocks: AtomicU64::new(0),
            blocks_stale: AtomicBool::new(true),
            intent_tag: AtomicU64::new(0),
            prelogged: AtomicU64::new(0),
            touched_ms: AtomicU64::new(self.touched_ms.load(Ordering::Relaxed)),
            intent_lock: Mutex::new(()),
            sums: Mutex::new(sums),
            behind: AtomicU64::new(0),
        }
    }

    /// The copies but the one on `member`.
    pub(super) fn copies_without(&self, member: Option<u32>) -> Vec<ExtentCopy> {
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
    pub(super) fn prepare(&self, pool: &Pool, ino: u64) -> FsResult<()> {
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

    pub(super) fn file(&self, pool: &Pool, ino: u64, copy: usize) -> FsResult<Handle> {
        pool.extent_file(self.copies[copy].member, ino, self.index, self.file_id)
    }

    /// Drops the cached descriptor of the copy on `member`.
    pub(super) fn forget_file(&self, pool: &Pool, ino: u64, member: u32) {
        pool.fds.forget(&self.file_on(ino, member));
    }

    /// Runs `op` on the file of every copy on a usable member. A copy whose
    /// member fails meanwhile is skipped (the member is marked failed); any
    /// other error stops at once. Fails when no copy was done.
    pub(super) fn each_copy(
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
    pub(super) fn first_usable(&self, pool: &Pool) -> usize {
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

    pub(super) fn written(&self) {
        self.dirty.store(true, Ordering::Release);
        self.blocks_stale.store(true, Ordering::Release);
    }

    /// The file of this extent's copy on `member` (of file `ino`).
    pub(super) fn file_on(&self, ino: u64, member: u32) -> ExtentFile {
        ExtentFile {
            member,
            ino,
            index: self.index,
            file_id: self.file_id,
        }
    }

    pub(super) fn dead(&self, ino: u64) -> impl Iterator<Item = DeadExtent> + '_ {
        self.copies.iter().map(move |c| self.file_on(ino, c.member))
    }
}

impl Volume {
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

    pub(super) fn get(&self, index: u64) -> Option<Arc<Extent>> {
        self.map.read().get(&index).cloned()
    }

    /// The extents of the map whose index lies in `indexes` (taken out of the
    /// map's lock): walks what is allocated, never the index range itself.
    pub(super) fn extents_in(&self, indexes: impl std::ops::RangeBounds<u64>) -> Vec<Arc<Extent>> {
        self.map
            .read()
            .range(indexes)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The extent now in the map at `e`'s index (a migration may have swapped
    /// it while the caller waited for its stripes), else `e`.
    pub(super) fn current(&self, e: Arc<Extent>) -> Arc<Extent> {
        match self.get(e.index) {
            Some(c) => c,
            None => e,
        }
    }

    /// The extent at `index`, placed now if absent; `need` is the size of the
    /// write asking for it (members with less room are not chosen).
    pub(super) fn get_or_alloc(&self, pool: &Pool, index: u64, need: u64) -> FsResult<Arc<Extent>> {
        if let Some(e) = self.get(index) {
            return Ok(e);
        }
        let mut m = self.map.write();
        if let Some(e) = m.get(&index) {
            return Ok(e.clone());
        }
        self.changed();
        let (fid, files) = pool.create_extent_files(self.ino, index, need)?;
        let mut members = Vec::with_capacity(files.len());
        for (m, f) in files {
            let key = ExtentFile {
                member: m,
                ino: self.ino,
                index,
                file_id: fid,
            };
            pool.fds.put(key, f);
            members.push(m);
        }
        let e = Arc::new(Extent::new(index, fid, members, true));
        *e.sums.lock() = Sums::new_dirty(vec![self.zcrc; self.blocks_per_extent() as usize]);
        // Changes under the tag the extent is created under need no intent
        // record: the extent is in no durable map until the commit of that
        // tag, which syncs its data first, so after a crash before it there
        // is nothing of it to resynchronise or count. Changes under a later
        // tag log one as usual (the tag moved under the write gate, so the
        // commit's map holds the extent). A sequential writer no longer waits
        // for an intent fdatasync, queued behind its own data, at each new
        // extent (docs/perf, change 17).
        e.intent_tag
            .store(pool.intent_tag.load(Ordering::Acquire), Ordering::Release);
        m.insert(index, e.clone());
        Ok(e)
    }

    /// All extent files (for deleting the whole file).
    pub fn all_files(&self) -> Vec<ExtentFile> {
        self.map
            .read()
            .values()
            .flat_map(|e| e.dead(self.ino).collect::<Vec<_>>())
            .collect()
    }

    /// Indexes of the extents in the map.
    pub fn extent_indexes(&self) -> Vec<u64> {
        self.map.read().keys().copied().collect()
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
