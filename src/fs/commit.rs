//! The commit: makes everything changed so far durable, and fsync.
//!
//! Durability (the ordering invariants, also in docs/design.md):
//! 1. Data of dirty extents is fdatasynced, and the data directories that gained
//!    extent files are fsynced, before the metadata commit that references them.
//! 2. The metadata commit is one redb transaction per member, durable
//!    (`Durability::Immediate`) on every member before `fsync` returns.
//! 3. Extent files dropped by truncate, unlink, rename over a file or rmdir are
//!    removed only after a durable commit no longer references them.
//!
//! A commit runs in three typed steps, one at a time (`commit_lock`):
//! [`Vfs::take_changes`] takes, at one instant (gate and `ns` held for
//! writing), what changed into a [`Taken`]; [`Vfs::write_out`] syncs the data
//! and writes the metadata with no fs lock held; then [`Vfs::settle`]
//! finishes a durable commit (extent files go), or [`Vfs::put_back`] returns
//! everything taken to where the next commit finds it. `Taken` is consumed
//! by one of the two, so nothing taken is lost on either path.
//!
//! Commits happen on `fsync`/`fsyncdir`, every few seconds from the flusher
//! thread, around snapshot and member commands, and at unmount.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::core::{Live, Vfs};
use super::node::Node;
use crate::error::{FsError, FsResult};
use crate::pool::meta::{Batch, encode_blob, encode_record};
use crate::volume::{DeadExtent, Extent, Volume};

/// Extents changed this recently get intent records logged ahead by each
/// commit (see `prelog_hot_extents`). After a crash they are resynchronised
/// and counted changed, so longer means more work at mount, shorter more
/// writers waiting for an intent fdatasync.
const HOT_WINDOW_MS: u64 = 15_000;

/// What one commit took out of the namespace and the volumes at its instant.
/// Everything here has left its place (dirty flags cleared, pending lists
/// emptied, bitmaps taken): [`Vfs::settle`] or [`Vfs::put_back`] consumes it.
struct Taken {
    /// The metadata transaction: inode records, entries, bitmaps, snapshot
    /// records and pool information, and the new generation.
    batch: Batch,
    /// Nodes whose record is in the batch, with the size it records.
    dirty_nodes: Vec<(Arc<Node>, u64)>,
    /// Extent files to remove once the batch is durable.
    dead: Vec<DeadExtent>,
    /// Every file: their data is synced before the batch is written.
    files: Vec<Arc<Node>>,
    /// The changed-block bitmaps taken into the batch, per volume.
    cbt_taken: Vec<(Arc<Volume>, Vec<u64>)>,
    /// Bitmaps of removed files, deleted by the batch.
    dead_cbt: Vec<(u64, u64)>,
}

/// A changed-block bitmap as the metadata store keeps it.
fn encode_words(w: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(w.len() * 8);
    for x in w {
        b.extend_from_slice(&x.to_le_bytes());
    }
    encode_blob(&b)
}

impl Vfs {
    /// Whether anything awaits a commit.
    pub fn has_pending(&self) -> bool {
        if self.snaps.has_changes() || self.pool.info_pending() {
            return true;
        }
        let ns = self.ns.read();
        ns.namespace_pending()
            || ns.nodes.values().any(|n| {
                n.dirty.load(Ordering::Acquire) || n.volume.as_ref().is_some_and(|v| v.needs_sync())
            })
    }

    /// Makes everything written so far durable, in the order the module doc gives:
    /// data, then directory entries of new extent files, then the metadata on every
    /// member, then removal of extent files nothing references any more.
    pub fn commit(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _g = self.commit_lock.lock();
        self.commit_locked(true)
    }

    /// The last commit before the pool closes: like [`Vfs::commit`] but logs
    /// no intent records ahead (no write follows it), so that a clean stop
    /// leaves no extent to resynchronise at the next mount. A resync
    /// recomputes checksums from the data, which would take any corruption
    /// arising in between for the truth.
    pub fn commit_final(&self) -> FsResult<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _g = self.commit_lock.lock();
        self.commit_locked(false)
    }

    /// Holds off commits (for work that must see the metadata copies still).
    pub(crate) fn commit_guard(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.commit_lock.lock()
    }

    /// Whether a commit is needed to make the layout durable (the namespace, a
    /// size or an extent map changed); timestamps alone do not count.
    fn layout_pending(&self) -> bool {
        let ns = self.ns.read();
        ns.namespace_pending()
            || ns.nodes.values().any(|n| {
                n.meta.lock().size != n.committed_size.load(Ordering::Acquire)
                    || n.volume.as_ref().is_some_and(|v| v.has_fresh())
            })
    }

    /// A commit, with `commit_lock` held by the caller.
    fn commit_locked(&self, prelog: bool) -> FsResult<()> {
        if prelog {
            self.prelog_hot_extents();
        }
        let taken = self.take_changes();
        match self.write_out(&taken) {
            Ok(fresh) => {
                self.settle(taken, fresh);
                Ok(())
            }
            Err(e) => {
                self.put_back(taken, &e);
                Err(e)
            }
        }
    }

    /// Takes what changed since the last commit, at one instant: no change
    /// is in flight while the gate is held, so the bitmaps taken here cover
    /// every write made so far, and writes after it log their intents under
    /// the next tag (see pool/intent.rs), which this moves.
    fn take_changes(&self) -> Taken {
        let _gate = self.gate.write();
        let mut ns = self.ns.write();
        let mut batch = Batch::default();
        let mut dirty_nodes = Vec::new();
        for (ino, n) in &ns.nodes {
            if n.dirty.swap(false, Ordering::AcqRel) {
                let rec = n.record();
                batch.inodes.push((*ino, Some(encode_record(&rec))));
                dirty_nodes.push((n.clone(), rec.size));
            }
        }
        for ino in std::mem::take(&mut ns.deleted) {
            batch.inodes.push((ino, None));
        }
        // In key order (deleted inodes were appended): redb inserts in
        // order, and one workload gives one sequence of writes.
        batch.inodes.sort_unstable_by_key(|(ino, _)| *ino);
        batch.dirents = std::mem::take(&mut ns.dirent_changes).into_iter().collect();
        batch.next_ino = ns.next_ino;
        batch.next_file_id = self.pool.next_file_id.load(Ordering::SeqCst);
        batch.generation = self.generation.load(Ordering::SeqCst) + 1;
        let dead = std::mem::take(&mut ns.dead_extents);
        let files: Vec<Arc<Node>> = ns
            .nodes
            .values()
            .filter(|n| n.volume.is_some())
            .cloned()
            .collect();
        let mut cbt_taken = Vec::new();
        for n in &files {
            if let Some(v) = &n.volume {
                let changes = v.take_cbt_changes();
                if changes.is_empty() {
                    continue;
                }
                let mut idx = Vec::with_capacity(changes.len());
                for (i, bits) in changes {
                    idx.push(i);
                    batch.cbt.push(((n.ino, i), bits.map(|w| encode_words(&w))));
                }
                cbt_taken.push((v.clone(), idx));
            }
        }
        let dead_cbt = std::mem::take(&mut ns.dead_cbt);
        batch.cbt.extend(dead_cbt.iter().map(|k| (*k, None)));
        let (snaps, next_snap) = self.snaps.take_changes();
        batch.snapshots = snaps;
        batch.next_snap_id = next_snap;
        batch.info = self.pool.take_info_changes();
        self.pool
            .intent_tag
            .store(batch.generation + 1, Ordering::SeqCst);
        Taken {
            batch,
            dirty_nodes,
            dead,
            files,
            cbt_taken,
            dead_cbt,
        }
    }

    /// Writes `taken` out in the order of the module doc (invariants 1 and
    /// 2), with no fs lock held. Returns the extents created since the last
    /// commit, durable now with their directory entries.
    fn write_out(&self, taken: &Taken) -> FsResult<Vec<Arc<Extent>>> {
        let mut fresh = Vec::new();
        // Entries a failed commit created are synced by this one: the files
        // are there now, so nothing else would name their directories.
        let mut new_dirs = std::mem::take(&mut *self.dirs_unsynced.lock());
        let synced = taken
            .files
            .iter()
            .filter_map(|n| n.volume.as_ref())
            .try_for_each(|v| {
                v.sync(
                    &self.pool,
                    &mut new_dirs,
                    &mut fresh,
                    Some(taken.batch.generation),
                )
            })
            .and_then(|()| self.pool.sync_data_dirs(&new_dirs).map_err(FsError::Io));
        if let Err(e) = synced {
            self.dirs_unsynced.lock().extend(new_dirs);
            return Err(e);
        }
        // A new extent file is durable only with its directory entry: one
        // whose every copy is on a member that failed before its entry was
        // synced is not, and the commit must not say it is.
        if fresh.iter().any(|e| e.usable_copies(&self.pool) == 0) {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.pool
            .commit(&taken.batch, true)
            .map_err(FsError::from)?;
        Ok(fresh)
    }

    /// After a durable commit: records what is now durable, and removes the
    /// extent files it no longer references (invariant 3).
    fn settle(&self, taken: Taken, fresh: Vec<Arc<Extent>>) {
        let Taken {
            batch,
            dirty_nodes,
            dead,
            ..
        } = taken;
        for e in fresh {
            e.mark_published();
        }
        for (n, size) in &dirty_nodes {
            n.committed_size.store(*size, Ordering::Release);
        }
        self.generation.store(batch.generation, Ordering::SeqCst);
        tracing::debug!(
            generation = batch.generation,
            inodes = batch.inodes.len(),
            removed_files = dead.len(),
            "committed"
        );
        self.pool.clear_intents(batch.generation);
        // Files a running snapshot capture may still read wait for it.
        let mut dead = self.snaps.defer_dead(dead);
        dead.extend(self.snaps.take_released());
        let dead = self.without_live(dead);
        self.pool.remove_extent_files(&dead);
        if !dead.is_empty() {
            self.freed.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// After a failed commit: everything taken goes back, so that the next
    /// commit writes it (changes made meanwhile win over what is put back).
    fn put_back(&self, taken: Taken, e: &FsError) {
        let Taken {
            batch,
            dirty_nodes,
            dead,
            cbt_taken,
            dead_cbt,
            ..
        } = taken;
        // Some members may hold this generation already: the retry must
        // use a new number, so that equal generations mean equal content.
        self.generation.store(batch.generation, Ordering::SeqCst);
        tracing::error!(error = %e, "metadata commit failed; changes stay pending");
        let mut ns = self.ns.write();
        for (n, _) in dirty_nodes {
            n.touch();
        }
        for (ino, rec) in &batch.inodes {
            if rec.is_none() {
                ns.deleted.insert(*ino);
            }
        }
        for (k, v) in batch.dirents {
            ns.dirent_changes.entry(k).or_insert(v);
        }
        ns.dead_extents.extend(dead);
        ns.dead_cbt.extend(dead_cbt);
        for (v, idx) in cbt_taken {
            v.restore_cbt_changes(idx);
        }
        self.snaps
            .restore_changes(batch.snapshots.iter().map(|(id, _)| *id));
        self.pool.info.restore_changes(batch.info);
    }

    /// Before a commit moves the intent tag from `T` to `T + 1`: logs intent
    /// records under `T + 1` for the extents changed in the last two
    /// intervals or the last [`HOT_WINDOW_MS`], so that their writers after
    /// the move do not each wait for an intent fdatasync. After a crash these
    /// extents are resynchronised and counted changed even if they were not
    /// written: over-reporting only.
    fn prelog_hot_extents(&self) {
        let tag = self.pool.intent_tag.load(Ordering::Acquire);
        let since_ms = self.pool.storage().clock_ms().saturating_sub(HOT_WINDOW_MS);
        let hot: Vec<(u64, Arc<Extent>)> = {
            let ns = self.ns.read();
            ns.nodes
                .iter()
                .filter_map(|(ino, n)| n.volume.as_ref().map(|v| (*ino, v)))
                .flat_map(|(ino, v)| {
                    v.hot_extents(tag.saturating_sub(1), since_ms)
                        .into_iter()
                        .map(move |e| (ino, e))
                })
                .collect()
        };
        if hot.is_empty() {
            return;
        }
        let items: Vec<(Vec<u32>, u64, u64)> = hot
            .iter()
            .map(|(ino, e)| (e.members(), *ino, e.index))
            .collect();
        match self.pool.prelog_intents(tag + 1, &items) {
            Ok(()) => {
                for (_, e) in &hot {
                    e.set_prelogged(tag + 1);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot log intents ahead; writers log their own"),
        }
    }

    /// Dead extent files whose name no extent copy has taken again. Files are
    /// named by (ino, index, file_id) on their member, so a copy moved back
    /// onto a member before the old copy's file there was removed (a removal
    /// deferred for a snapshot capture, say) has the same name: removing by
    /// name would delete the live copy.
    fn without_live(&self, dead: Vec<DeadExtent>) -> Vec<DeadExtent> {
        if dead.is_empty() {
            return dead;
        }
        let ns = self.ns.read();
        dead.into_iter()
            .filter(|f| {
                let live = ns
                    .nodes
                    .get(&f.ino)
                    .and_then(|n| n.volume.as_ref())
                    .is_some_and(|v| v.copy_is_live(f.index, f.file_id, f.member));
                if live {
                    tracing::info!(
                        member = f.member,
                        ino = f.ino,
                        index = f.index,
                        "a dead extent file's name is live again; kept"
                    );
                }
                !live
            })
            .collect()
    }
}

impl Live<'_> {
    /// fsync/fdatasync of an open file. fdatasync of a file whose layout is
    /// already durable only flushes its data (what VM images do all the time);
    /// everything else is a full commit, skipped when nothing is pending.
    pub(crate) fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let node = self.file_node(fh)?;
        // Holding the commit lock also waits for a commit in flight, whose data
        // syncs this call must not overtake.
        let _g = self.commit_lock.lock();
        // The fast path flushes data only; after a member failure, only a
        // commit recording it behind makes the surviving copies the ones a
        // restart trusts (otherwise the stale copy matches the old table).
        if datasync && !self.layout_pending() && !self.pool.failure_unrecorded() {
            if let Some(v) = &node.volume {
                let (mut dirs, mut fresh) = (HashSet::new(), Vec::new());
                v.sync(&self.pool, &mut dirs, &mut fresh, None)?;
                if fresh.is_empty() && !self.pool.failure_unrecorded() {
                    return Ok(());
                }
            } else {
                return Ok(());
            }
        }
        if !self.has_pending() {
            return Ok(());
        }
        self.commit_locked(true)
    }
}

#[cfg(test)]
mod tests {
    use crate::fs::testing::{ME, open, setup};
    use crate::pool::meta::ROOT_INO;

    /// Issue 12, point 5: dead extent files are removed by name after the
    /// commit; a name that a live copy has taken again (a copy moved back to
    /// its member before the old file there went) must survive.
    #[test]
    fn a_dead_file_whose_name_is_live_again_is_kept() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let data = vec![7u8; 100_000];
        v.write(fh, 0, &data).unwrap();
        v.commit().unwrap();
        let node = v.ns.read().node(a.ino).unwrap();
        let live = node.volume.as_ref().unwrap().all_files();
        assert!(!live.is_empty());
        // As if an old copy of the same names were still waiting for removal.
        node.touch();
        v.ns.write().dead_extents.extend(live.iter().copied());
        v.commit().unwrap();
        for f in &live {
            let p = v
                .pool
                .extent_path(f.member, f.ino, f.index, f.file_id)
                .unwrap();
            assert!(p.exists(), "live extent file {p:?} removed");
        }
        assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data);
        v.release(fh).unwrap();
    }
}
