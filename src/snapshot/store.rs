//! The snapshot store: the records of every snapshot, the slot of the
//! capture running, and the life of the store (load, recovery at mount, the
//! record changes each commit writes, waiting for the capture to end).
//!
//! A snapshot is a record ([`super::record`]) holding the frozen namespace,
//! the changed-block interval since the previous snapshot, and where the
//! delta file of each file lives. Its data is the chain: its own deltas, then
//! its parent's (incremental: the previous snapshot; differential: the last
//! full), down to a full. The store's other jobs are `impl SnapshotStore`
//! blocks in their own files:
//! - [`super::capture`]: creation, the background capture, copy-before-write;
//! - [`super::read`]: reads through the chain index and its caches;
//! - [`super::merge`]: deletion, which merges each child into its parent's
//!   parent;
//! - [`super::maintenance`]: placement of delta copies, scrub, check, the
//!   prune candidates.
//!
//! Invariants:
//! - the records in memory are what the next commit writes: every change
//!   marks its id in `changes` (`publish` does both), `take_changes` hands
//!   them to the commit, and a commit that fails puts them back;
//! - ids are never reused: `next_id` only grows, and starts past every id
//!   found, loadable or not;
//! - at mount (`recover`) a `Pending` record turns `Failed` and gives its
//!   interval back to the live bitmaps, and every delta file that no complete
//!   record references is removed, but those of records that did not load.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::{Condvar, Mutex, RwLock};

use super::capture::{DEFAULT_LEVEL, Job};
use super::delta::DeltaError;
use super::read::{FRAME_CACHE, FileView, FrameCache, VIEW_CACHE};
use super::record::{SNAP_DIR, SnapshotInfo, SnapshotRecord, State, check_records};
use crate::error::FsError;
use crate::pool::meta::BlobChange;
use crate::pool::{Pool, layout};
use crate::volume::DeadExtent;

/// Every snapshot of a pool, and the capture running.
pub struct SnapshotStore {
    pub(super) pool: Arc<Pool>,
    pub(super) bs: u64,
    pub(super) records: RwLock<BTreeMap<u64, Arc<SnapshotRecord>>>,
    pub(super) next_id: AtomicU64,
    /// Records to write (present) or delete (absent) at the next commit.
    pub(super) changes: Mutex<BTreeSet<u64>>,
    /// Copy-before-write is on: writers call `preserve` first. Cleared once
    /// the capture needs it no more (everything saved, or the job failed).
    pub(super) active: AtomicBool,
    /// The capture running, if any; `job_cv` is signalled when it ends.
    pub(super) job: Mutex<Option<Arc<Job>>>,
    pub(super) job_cv: Condvar,
    /// Capture threads started by [`SnapshotStore::spawn_job`] and not yet
    /// ended. Each holds the store, hence the pool (its member locks and
    /// metadata stores), until it returns, a little after its job is over;
    /// [`SnapshotStore::wait_idle`] waits for them too, so that dropping the
    /// last `Vfs` after it really closes the pool (a reopen in the same
    /// process found it still locked).
    pub(super) workers: Arc<(Mutex<usize>, Condvar)>,
    /// Resolved chains by (snapshot, inode), and decompressed frames
    /// ([`super::read`]).
    pub(super) views: Mutex<LruCache<(u64, u64), Arc<FileView>>>,
    pub(super) frames: Mutex<FrameCache>,
    /// Deferred dead extent files of a finished capture, for the next commit.
    pub(super) released: Mutex<Vec<DeadExtent>>,
    /// Snapshots whose record is in the metadata but did not load (damaged or
    /// invalid): their delta files are kept, never taken for leftovers.
    pub(super) unreadable: BTreeSet<u64>,
    /// Bumped by every deletion (which rewrites deltas, so that the same frame
    /// offset names other blocks), under the `records` write lock. A view is
    /// labelled with the value its records were read at, is cached only if
    /// it is still current, and keys its frames with it: a reader still
    /// holding a view from before a deletion can no longer put its frames
    /// where the new view finds them (reads returned other blocks' data).
    pub(super) cache_epoch: AtomicU64,
    /// Serializes create, delete, restore, clone and prune.
    pub admin: Mutex<()>,
    pub level: AtomicI32,
}

fn lru<K: std::hash::Hash + Eq, V>(n: usize) -> Mutex<LruCache<K, V>> {
    Mutex::new(LruCache::new(
        NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
    ))
}

impl SnapshotStore {
    /// Loads the records of the metadata image. Records that do not decode are
    /// kept out and returned (reported by check; a mount goes on without them).
    pub fn load(
        pool: Arc<Pool>,
        raw: &BTreeMap<u64, Vec<u8>>,
        next_id: u64,
    ) -> (SnapshotStore, Vec<(u64, String)>) {
        let mut decoded = BTreeMap::new();
        let mut bad = Vec::new();
        let mut max = next_id.max(1);
        for (id, b) in raw {
            max = max.max(id.saturating_add(1));
            match SnapshotRecord::decode(b) {
                Ok(r) => {
                    decoded.insert(*id, r);
                }
                Err(e) => bad.push((*id, e)),
            }
        }
        let (records, more) = check_records(decoded, pool.config().block_size);
        bad.extend(more);
        bad.sort_by_key(|(id, _)| *id);
        let bs = pool.config().block_size as u64;
        let views = lru((pool.fds.capacity() / 64).clamp(4, VIEW_CACHE));
        (
            SnapshotStore {
                unreadable: bad.iter().map(|(id, _)| *id).collect(),
                pool,
                bs,
                records: RwLock::new(records),
                next_id: AtomicU64::new(max),
                changes: Mutex::new(BTreeSet::new()),
                active: AtomicBool::new(false),
                job: Mutex::new(None),
                job_cv: Condvar::new(),
                workers: Arc::new((Mutex::new(0), Condvar::new())),
                views,
                frames: lru(FRAME_CACHE),
                released: Mutex::new(Vec::new()),
                cache_epoch: AtomicU64::new(0),
                admin: Mutex::new(()),
                level: AtomicI32::new(DEFAULT_LEVEL),
            },
            bad,
        )
    }

    pub fn records(&self) -> Vec<Arc<SnapshotRecord>> {
        self.records.read().values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<SnapshotRecord>> {
        self.records.read().get(&id).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<SnapshotRecord>> {
        self.records
            .read()
            .values()
            .find(|r| r.name == name)
            .cloned()
    }

    pub fn infos(&self) -> Vec<SnapshotInfo> {
        let recs = self.records.read();
        recs.values()
            .map(|r| SnapshotInfo {
                id: r.id,
                name: r.name.clone(),
                kind: r.kind.as_str().into(),
                base: r.parent.and_then(|p| recs.get(&p)).map(|p| p.name.clone()),
                created: r.created.secs,
                logical_bytes: r.logical_bytes,
                stored_bytes: r.stored_bytes,
                changed_blocks: r.changed_blocks,
                state: match &r.state {
                    State::Pending => "pending".into(),
                    State::Complete => "complete".into(),
                    State::Failed(why) => format!("failed: {why}"),
                },
                held: false,
                received: r.is_received(),
                identity: crate::stream::ident_text(&self.identity(r)),
            })
            .collect()
    }

    /// Record changes for the next commit, and the next snapshot id.
    pub fn take_changes(&self) -> (Vec<BlobChange<u64>>, u64) {
        let ids = std::mem::take(&mut *self.changes.lock());
        let recs = self.records.read();
        let out = ids
            .into_iter()
            .map(|id| (id, recs.get(&id).map(|r| r.encode())))
            .collect();
        (out, self.next_id.load(Ordering::SeqCst))
    }

    /// Puts back changes whose commit failed.
    pub fn restore_changes(&self, ids: impl IntoIterator<Item = u64>) {
        self.changes.lock().extend(ids);
    }

    pub fn has_changes(&self) -> bool {
        !self.changes.lock().is_empty()
    }

    pub(super) fn publish(&self, rec: SnapshotRecord) {
        let id = rec.id;
        self.records.write().insert(id, Arc::new(rec));
        self.changes.lock().insert(id);
    }

    /// Waits up to `t` for the running capture (if any) to end.
    pub fn wait_idle_for(&self, t: std::time::Duration) {
        let mut g = self.job.lock();
        if g.is_some() {
            self.job_cv.wait_for(&mut g, t);
        }
    }

    /// Waits until no snapshot is being captured and the capture thread has
    /// ended (released the store and the pool).
    pub fn wait_idle(&self) {
        let mut g = self.job.lock();
        while g.is_some() {
            self.job_cv.wait(&mut g);
        }
        drop(g);
        let (n, cv) = &*self.workers;
        let mut n = n.lock();
        while *n > 0 {
            cv.wait(&mut n);
        }
    }

    /// Extent files dropped by a commit: while a capture runs (it may still
    /// read them) they are kept until it ends and none is returned; otherwise
    /// all are returned for removal now.
    pub fn defer_dead(&self, dead: Vec<DeadExtent>) -> Vec<DeadExtent> {
        if dead.is_empty() {
            return dead;
        }
        let g = self.job.lock();
        match g.as_ref() {
            Some(job) => {
                job.deferred.lock().extend(dead);
                Vec::new()
            }
            None => dead,
        }
    }

    /// Dead extent files a finished capture no longer reads (see `defer_dead`).
    pub fn take_released(&self) -> Vec<DeadExtent> {
        std::mem::take(&mut *self.released.lock())
    }

    pub(super) fn remove_snapshot_dirs(&self, id: u64) {
        for m in self.pool.members().iter() {
            let d = layout::snapshot_dir(&m.dir, id);
            if let Err(e) = crate::storage::remove_dir_all(self.pool.storage(), &d)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %d.display(), error = %e, "cannot remove snapshot files");
            }
        }
    }

    /// At mount: a snapshot left pending by an unclean stop is failed (its
    /// interval returns to the live bitmaps via `mark`), and delta files no
    /// record references are removed.
    pub fn recover(&self, mark: impl Fn(u64, u64, u64)) {
        let pending: Vec<Arc<SnapshotRecord>> = self
            .records
            .read()
            .values()
            .filter(|r| r.state == State::Pending)
            .cloned()
            .collect();
        for r in pending {
            tracing::warn!(snapshot = %r.name, "snapshot interrupted by an unclean stop; marking it failed");
            let mut rec = (*r).clone();
            for (ino, set) in std::mem::take(&mut rec.interval) {
                for (s, e) in set.iter() {
                    mark(ino, s, e);
                }
            }
            rec.deltas.clear();
            rec.state =
                State::Failed("interrupted by an unclean stop before it was complete".into());
            self.publish(rec);
        }
        let recs = self.records.read();
        for m in self.pool.members().iter() {
            let root = m.dir.join(SNAP_DIR);
            let s = self.pool.storage();
            let Ok(list) = s.list(&root) else {
                continue;
            };
            for ent in list {
                let name = ent.to_string_lossy().into_owned();
                let ent_path = root.join(&ent);
                if name
                    .parse::<u64>()
                    .is_ok_and(|id| self.unreadable.contains(&id))
                {
                    tracing::warn!(path = %ent_path.display(), "deltas of a snapshot whose record does not load are kept (see vpool check)");
                    continue;
                }
                let rec = name.parse::<u64>().ok().and_then(|id| recs.get(&id));
                let Some(rec) = rec.filter(|r| r.state == State::Complete) else {
                    let _ = crate::storage::remove_dir_all(s, &ent_path);
                    continue;
                };
                let Ok(files) = s.list(&ent_path) else {
                    continue;
                };
                for f in files {
                    let fname = f.to_string_lossy().into_owned();
                    let f_path = ent_path.join(&f);
                    let keep = layout::parse_delta_file_name(&fname).is_some_and(|(ino, seq)| {
                        rec.deltas
                            .get(&ino)
                            .is_some_and(|l| l.seq == seq && l.members.contains(&m.entry.id))
                    });
                    if !keep {
                        tracing::info!(path = %f_path.display(), "removing a delta file no snapshot references");
                        let _ = s.remove_file(&f_path);
                    }
                }
            }
        }
    }
}

/// A delta error as a filesystem error: running out of space is `NoSpace`,
/// any other I/O error keeps its cause, a damaged delta is `Corrupt`.
pub(crate) fn delta_err(e: DeltaError) -> FsError {
    match e {
        DeltaError::Io { source, .. } => {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                FsError::NoSpace
            } else {
                FsError::Io(source)
            }
        }
        DeltaError::Corrupt {
            path,
            offset,
            reason,
        } => FsError::corrupt_in(&path, offset, format!("corrupt delta: {reason}")),
    }
}
