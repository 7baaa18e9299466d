//! The snapshot store: records, creation, background capture with
//! copy-before-write, reads through a cached chain index, deletion, prune.
//!
//! A snapshot is a record (in the metadata store, on every member) holding the
//! frozen namespace (every inode's attributes, every directory entry), the
//! changed-block interval since the previous snapshot, and where the delta file
//! of each file lives. Its data is the chain: its own deltas, then its parent's
//! (incremental: the previous snapshot; differential: the last full), down to a
//! full. A block of file `ino` at snapshot `S` is resolved by
//! [`super::flatten`]: the first level holding an entry for it, a hole when a
//! level did not have the file or the file was shorter there.
//!
//! Creation (the caller freezes writers for the duration of `begin`): the
//! blocks to save are fixed (full: every block below the size; incremental or
//! differential: the changed-block bitmap since the base), and the record is
//! published as `Pending`. A background thread then reads those blocks from the
//! live files, compresses them and appends them to the delta files. A writer
//! about to change a block still pending first saves its 16-block frame
//! (`preserve`, copy-before-write), so the snapshot is browsable at once: a
//! pending block reads from the live file, a saved one from the delta. When all
//! is saved the delta files are finished (index, footer, fdatasync) and the
//! record turns `Complete`. A crash before that leaves a `Pending` record,
//! which the next mount turns `Failed` (its interval of changes goes back to
//! the live bitmap, so the next snapshot misses nothing) and whose files it
//! removes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::{Condvar, Mutex, RwLock};

use super::delta::{
    DeltaError, DeltaFile, DeltaHeader, DeltaId, DeltaWriter, Entry, MAX_FRAME_BLOCKS,
};
use super::flatten::{self, Level, Run, Source};
use super::ranges::RangeSet;
use super::record::{
    DeltaLoc, Kind, SNAP_DIR, SnapshotInfo, SnapshotRecord, State, check_records, delta_dir,
    delta_path, parse_delta_name,
};
use crate::error::{FsError, FsResult};
use crate::pool::Pool;
use crate::pool::meta::{BlobChange, InodeRecord, NodeKind, Timestamp};
use crate::volume::{DeadExtent, Segment, Volume};

/// Blocks saved together by copy-before-write (one frame).
pub const FRAME_BLOCKS: u64 = 16;

/// Blocks the background capture reads per step (the longest a writer of the
/// same file waits for it is one such read).
const BATCH_BLOCKS: u64 = 128;

/// zstd level of new deltas unless the command names one: the fastest level,
/// so that capture keeps pace with the disks (level 3 compresses ~5 % better
/// at half the speed on the reference machine).
pub const DEFAULT_LEVEL: i32 = 1;

/// Blocks the capture asks the kernel to read ahead of it.
const PREFETCH_BLOCKS: u64 = 1024;

/// At most this many threads compress one capture.
const MAX_CAPTURE_THREADS: usize = 4;

/// Cached chain indexes (one per snapshot and file), at most. Each holds the
/// delta files of its chain open, so fewer are kept when descriptors are
/// scarce: one view per 64 descriptors of the extent-file cache's budget.
const VIEW_CACHE: usize = 256;

/// Cached decompressed frames (each up to 1 MiB, usually 64 KiB).
const FRAME_CACHE: usize = 512;

fn delta_err(e: DeltaError) -> FsError {
    match e {
        DeltaError::Io { source, .. } => {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                FsError::NoSpace
            } else {
                FsError::Io(source)
            }
        }
        DeltaError::Corrupt { .. } => FsError::Corrupt(e.to_string()),
    }
}

/// One file being captured by the running snapshot.
struct JobFile {
    vol: Arc<Volume>,
    size: u64,
    /// Which blocks are saved, being saved or still to save. Never held
    /// across I/O but the reads of a pending snapshot from the live file:
    /// every writer of the file takes it while the capture runs.
    state: Mutex<BlockState>,
    /// Signalled when a range leaves `reading` or `inflight`, and when the
    /// job fails.
    changed: Condvar,
    /// The delta being written; held across delta I/O (appends, finishing),
    /// never while waiting for `state`.
    out: Mutex<DeltaOut>,
}

/// Lock order: `JobFile::out` may be taken while `JobFile::state` is held
/// (reads of a pending snapshot), never the other way round.
struct BlockState {
    pending: RangeSet,
    /// Entries saved so far, by first block.
    index: BTreeMap<u64, Entry>,
    /// Blocks read but not yet appended (being compressed): first block ->
    /// (end, segments), so reads of the pending snapshot find them.
    inflight: BTreeMap<u64, (u64, Arc<Vec<Segment>>)>,
    /// Blocks the capture or a writer's copy-before-write is reading from the
    /// live file without holding the lock: a writer about to change one waits
    /// for the read (`JobFile::changed`); until then the live file still
    /// holds the snapshot's content.
    reading: RangeSet,
}

struct DeltaOut {
    writer: Option<DeltaWriter>,
    /// The finished delta (after the writer is done), for reads until the
    /// record turns complete.
    finished: Option<Arc<DeltaFile>>,
    loc: Option<DeltaLoc>,
    /// Members holding the delta's copies.
    members: Vec<u32>,
}

/// The snapshot being captured.
pub struct Job {
    pub id: u64,
    parent: Option<u64>,
    full: bool,
    level: i32,
    bs: u64,
    esize: u64,
    files: BTreeMap<u64, JobFile>,
    /// The volume of every file the interval of changes names (a superset of
    /// `files`' when a file changed but has nothing to save, e.g. truncated
    /// to 0): a failed job gives each its changes back.
    changed_vols: BTreeMap<u64, Arc<Volume>>,
    /// Extent files dropped while the job needs their data; removed at its end.
    deferred: Mutex<Vec<DeadExtent>>,
    error: Mutex<Option<String>>,
    /// Blocks to save when the job started (its progress is measured
    /// against this).
    total_blocks: u64,
    started: std::time::Instant,
}

impl Job {
    /// (blocks saved or being saved, blocks to save in all).
    pub fn progress(&self) -> (u64, u64) {
        let left: u64 = self
            .files
            .values()
            .map(|f| {
                let g = f.state.lock();
                g.pending.len() + g.reading.len()
            })
            .sum();
        (self.total_blocks.saturating_sub(left), self.total_blocks)
    }
}

/// What the caller captured while writers were frozen.
pub struct Freeze {
    pub name: String,
    pub kind: Kind,
    pub inodes: BTreeMap<u64, InodeRecord>,
    pub dirents: BTreeMap<(u64, Vec<u8>), u64>,
    /// Live files: inode, volume, size.
    pub files: Vec<(u64, Arc<Volume>, u64)>,
    /// The live changed-block bitmaps, taken over (now empty in the volumes).
    pub interval: BTreeMap<u64, RangeSet>,
    /// zstd level of the deltas (`None`: [`DEFAULT_LEVEL`]).
    pub level: Option<i32>,
}

/// The resolved chain of one file in one complete snapshot.
struct FileView {
    /// `SnapshotStore::cache_epoch` when the records it was built from were read.
    epoch: u64,
    size: u64,
    runs: Vec<Run>,
    /// Delta copies by snapshot id (the first that reads wins).
    deltas: HashMap<u64, Vec<Arc<DeltaFile>>>,
}

pub struct SnapshotStore {
    pool: Arc<Pool>,
    bs: u64,
    records: RwLock<BTreeMap<u64, Arc<SnapshotRecord>>>,
    next_id: AtomicU64,
    /// Records to write (present) or delete (absent) at the next commit.
    changes: Mutex<BTreeSet<u64>>,
    active: AtomicBool,
    job: Mutex<Option<Arc<Job>>>,
    job_cv: Condvar,
    /// Capture threads started by [`SnapshotStore::spawn_job`] and not yet
    /// ended. Each holds the store, hence the pool (its member locks and
    /// metadata stores), until it returns, a little after its job is over;
    /// [`SnapshotStore::wait_idle`] waits for them too, so that dropping the
    /// last `Vfs` after it really closes the pool (a reopen in the same
    /// process found it still locked).
    workers: Arc<(Mutex<usize>, Condvar)>,
    views: Mutex<LruCache<(u64, u64), Arc<FileView>>>,
    frames: Mutex<FrameCache>,
    /// Deferred dead extent files of a finished capture, for the next commit.
    released: Mutex<Vec<DeadExtent>>,
    /// Snapshots whose record is in the metadata but did not load (damaged or
    /// invalid): their delta files are kept, never taken for leftovers.
    unreadable: BTreeSet<u64>,
    /// Bumped by every deletion (which rewrites deltas, so that the same frame
    /// offset names other blocks), under the `records` write lock. A view is
    /// labelled with the value its records were read at, is cached only if
    /// it is still current, and keys its frames with it: a reader still
    /// holding a view from before a deletion can no longer put its frames
    /// where the new view finds them (reads returned other blocks' data).
    cache_epoch: AtomicU64,
    /// Serializes create, delete, restore, clone and prune.
    pub admin: Mutex<()>,
    pub level: AtomicI32,
}

/// Decompressed frames by (view epoch, snapshot, inode, frame offset).
type FrameCache = LruCache<(u64, u64, u64, u64), Arc<Vec<u8>>>;

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

    fn publish(&self, rec: SnapshotRecord) {
        let id = rec.id;
        self.records.write().insert(id, Arc::new(rec));
        self.changes.lock().insert(id);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn active_job(&self) -> Option<Arc<Job>> {
        if !self.is_active() {
            return None;
        }
        self.job.lock().clone()
    }

    /// Waits until no snapshot is being captured and the capture thread has
    /// ended (released the store and the pool).
    /// Waits up to `t` for the running capture (if any) to end.
    pub fn wait_idle_for(&self, t: std::time::Duration) {
        let mut g = self.job.lock();
        if g.is_some() {
            self.job_cv.wait_for(&mut g, t);
        }
    }

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

    /// Runs [`SnapshotStore::run_job`] on a new thread, counted in `workers`
    /// until it has dropped its reference to the store.
    pub fn spawn_job(self: &Arc<Self>, job: Arc<Job>) -> io::Result<()> {
        let workers = self.workers.clone();
        *workers.0.lock() += 1;
        let store = self.clone();
        let done = workers.clone();
        let spawned = std::thread::Builder::new()
            .name("vpool-snapshot".into())
            .spawn(move || {
                // Capture and compression yield the CPU to the FUSE threads.
                crate::util::background_thread();
                store.run_job(job);
                // Release the store (and the pool) before telling the waiters.
                drop(store);
                let (n, cv) = &*done;
                *n.lock() -= 1;
                cv.notify_all();
            });
        if let Err(e) = spawned {
            *workers.0.lock() -= 1;
            return Err(e);
        }
        Ok(())
    }

    /// Extent files dropped by a commit: kept while a capture may still read
    /// them (returned empty), else returned for removal now.
    /// Dead extent files a running capture may still read are kept until it
    /// ends; the others are returned for removal now.
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

    /// Chooses the base of a new snapshot of `kind` (`None`: the default kind).
    pub fn plan(&self, kind: Option<Kind>) -> FsResult<(Kind, Option<u64>)> {
        let recs = self.records.read();
        let newest = recs
            .values()
            .rev()
            .find(|r| r.state == State::Complete)
            .map(|r| r.id);
        let newest_full = recs
            .values()
            .rev()
            .find(|r| r.state == State::Complete && r.parent.is_none())
            .map(|r| r.id);
        let kind = kind.unwrap_or(if newest_full.is_some() {
            Kind::Incremental
        } else {
            Kind::Full
        });
        match kind {
            Kind::Full => Ok((kind, None)),
            Kind::Incremental => match newest {
                Some(p) => Ok((kind, Some(p))),
                None => Err(FsError::Message(
                    "no complete snapshot to base an incremental on; create a full one first"
                        .into(),
                )),
            },
            Kind::Differential => match newest_full {
                Some(p) => Ok((kind, Some(p))),
                None => Err(FsError::Message(
                    "no complete full snapshot to base a differential on; create a full one first"
                        .into(),
                )),
            },
        }
    }

    /// Publishes a `Pending` snapshot from what the caller froze and installs its
    /// capture job. Called with writers frozen; does no I/O.
    pub fn begin(&self, f: Freeze, parent: Option<u64>) -> FsResult<Arc<Job>> {
        if self.by_name(&f.name).is_some() {
            return Err(FsError::Exists);
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let full = f.kind == Kind::Full;
        // Blocks changed since the base: the intervals of the snapshots taken
        // after it (every one complete: a pending one is waited for, a failed
        // one gave its interval back to the live bitmap) and the live one.
        let mut since_base: BTreeMap<u64, RangeSet> = f.interval.clone();
        if let Some(p) = parent {
            for r in self.records.read().range(p + 1..).map(|(_, r)| r) {
                if r.state == State::Complete {
                    for (ino, set) in &r.interval {
                        since_base.entry(*ino).or_default().union_with(set);
                    }
                }
            }
        }
        let mut files = BTreeMap::new();
        let mut changed_vols = BTreeMap::new();
        let mut changed = 0;
        let mut logical = 0;
        for (ino, vol, size) in f.files {
            if f.interval.contains_key(&ino) {
                changed_vols.insert(ino, vol.clone());
            }
            logical += size;
            let nblocks = size.div_ceil(self.bs);
            let pending = if full {
                let mut s = RangeSet::new();
                if nblocks > 0 {
                    s.insert(0, nblocks);
                }
                s
            } else {
                let mut s = since_base.remove(&ino).unwrap_or_default();
                s.clip(nblocks);
                s
            };
            if pending.is_empty() {
                continue;
            }
            changed += pending.len();
            files.insert(
                ino,
                JobFile {
                    vol,
                    size,
                    state: Mutex::new(BlockState {
                        pending,
                        index: BTreeMap::new(),
                        inflight: BTreeMap::new(),
                        reading: RangeSet::new(),
                    }),
                    changed: Condvar::new(),
                    out: Mutex::new(DeltaOut {
                        writer: None,
                        finished: None,
                        loc: None,
                        members: Vec::new(),
                    }),
                },
            );
        }
        let rec = SnapshotRecord {
            id,
            name: f.name,
            kind: f.kind,
            parent,
            created: Timestamp::at(self.pool.storage().now()),
            state: State::Pending,
            block_size: self.bs as u32,
            inodes: f.inodes,
            dirents: f.dirents,
            deltas: BTreeMap::new(),
            interval: f.interval,
            logical_bytes: logical,
            stored_bytes: 0,
            changed_blocks: changed,
        };
        let job = Arc::new(Job {
            id,
            parent,
            full,
            level: f.level.unwrap_or(DEFAULT_LEVEL),
            bs: self.bs,
            esize: self.pool.config().extent_size,
            changed_vols,
            deferred: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            total_blocks: files.values().map(|f| f.state.lock().pending.len()).sum(),
            started: std::time::Instant::now(),
            files,
        });
        self.publish(rec);
        *self.job.lock() = Some(job.clone());
        self.active.store(true, Ordering::Release);
        Ok(job)
    }

    /// Copy-before-write: saves the pending frames overlapping bytes
    /// `[off, off+len)` of `ino` before the caller changes them. The caller
    /// waits for the read of the old blocks and their append to the delta,
    /// never for the capture's own I/O. A failure fails the snapshot, never
    /// the caller's write.
    pub fn preserve(&self, ino: u64, off: u64, len: u64) {
        if !self.is_active() || len == 0 {
            return;
        }
        let Some(job) = self.job.lock().clone() else {
            return;
        };
        let Some(jf) = job.files.get(&ino) else {
            return;
        };
        let first = (off / self.bs) / FRAME_BLOCKS * FRAME_BLOCKS;
        let last = (off + len).div_ceil(self.bs).div_ceil(FRAME_BLOCKS) * FRAME_BLOCKS;
        let per_extent = (job.esize / job.bs).max(1);
        let mut todo = Vec::new();
        {
            let mut g = jf.state.lock();
            // Blocks being read (by the capture or another writer) must not
            // change before the read ends; once read they wait in `inflight`.
            while !g.reading.intersect(first, last).is_empty() {
                if job.error.lock().is_some() {
                    return;
                }
                jf.changed.wait(&mut g);
            }
            for (s, e) in g.pending.intersect(first, last) {
                g.pending.remove(s, e);
                g.reading.insert(s, e);
                let mut b = s;
                while b < e {
                    let stop = e.min((b / per_extent + 1) * per_extent);
                    todo.push((b, stop));
                    b = stop;
                }
            }
        }
        let mut failed = None;
        for (s, stop) in todo {
            if failed.is_some() {
                // Not read: out of `reading`, so that no one waits for it.
                let mut g = jf.state.lock();
                g.reading.remove(s, stop);
                jf.changed.notify_all();
                continue;
            }
            let res = self
                .read_range(jf, s, stop)
                .and_then(|segs| self.append_range(&job, ino, jf, s, &segs));
            if let Err(e) = res {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            self.fail_job(&job, format!("saving blocks before a write failed: {e}"));
        }
    }

    /// Like [`SnapshotStore::preserve`] for a whole file from `off` on (truncate).
    pub fn preserve_from(&self, ino: u64, off: u64) {
        self.preserve(ino, off, (1u64 << 62) - off.min(1 << 61));
    }

    /// Stops a running capture: it fails (its changes go back to the live
    /// bitmaps, as for any failed capture).
    pub fn cancel_capture(&self, job: &Job) {
        self.fail_job(job, "cancelled".into());
    }

    fn fail_job(&self, job: &Job, why: String) {
        tracing::error!(snapshot = job.id, reason = %why, "snapshot failed");
        let mut e = job.error.lock();
        if e.is_none() {
            *e = Some(why);
        }
        drop(e);
        for jf in job.files.values() {
            // Under the file's lock, so no waiter misses it between its check and its wait.
            let _g = jf.state.lock();
            jf.changed.notify_all();
        }
        // No more copy-before-write: writers go on unhindered.
        self.active.store(false, Ordering::Release);
    }

    /// Reads blocks `[s, stop)`, which the caller moved to `reading`, from
    /// the live file without holding the file's lock, then moves them to
    /// `inflight` and wakes the writers waiting for them.
    fn read_range(&self, jf: &JobFile, s: u64, stop: u64) -> FsResult<Arc<Vec<Segment>>> {
        let read = jf.vol.capture(&self.pool, s, stop - s).map(Arc::new);
        let mut g = jf.state.lock();
        g.reading.remove(s, stop);
        if let Ok(segs) = &read {
            g.inflight.insert(s, (stop, segs.clone()));
        }
        jf.changed.notify_all();
        read
    }

    /// Compresses blocks read by [`SnapshotStore::read_range`] (first block
    /// `s`) without any lock, appends them under the delta's lock and indexes
    /// them.
    fn append_range(
        &self,
        job: &Job,
        ino: u64,
        jf: &JobFile,
        s: u64,
        segs: &[Segment],
    ) -> FsResult<()> {
        let prepared = prepare_segments(segs, job.full, job.bs, job.level)?;
        let entries = {
            let mut o = jf.out.lock();
            if o.writer.is_none() {
                let (w, members) = self.open_writer(job, ino, jf.size)?;
                o.writer = Some(w);
                o.members = members;
            }
            let w = o
                .writer
                .as_mut()
                .ok_or_else(|| FsError::Corrupt("delta writer missing".into()))?;
            append_prepared(w, &prepared).map_err(delta_err)?
        };
        let mut g = jf.state.lock();
        for en in entries {
            g.index.insert(en.start, en);
        }
        g.inflight.remove(&s);
        jf.changed.notify_all();
        Ok(())
    }

    /// One capture thread: takes the next pending range of some file, reads
    /// it, compresses it and appends it; other threads do other ranges
    /// meanwhile. No lock is held across the read, and writers wait only for
    /// the read of the blocks they change (see `preserve`).
    fn capture_worker(&self, job: &Job) {
        let per_extent = (job.esize / job.bs).max(1);
        for (ino, jf) in &job.files {
            loop {
                if job.error.lock().is_some() {
                    return;
                }
                let (s, stop, next) = {
                    let mut g = jf.state.lock();
                    let Some((s, e)) = g.pending.first() else {
                        break;
                    };
                    let stop = e
                        .min(s + BATCH_BLOCKS)
                        .min((s / per_extent + 1) * per_extent);
                    g.pending.remove(s, stop);
                    g.reading.insert(s, stop);
                    (s, stop, g.pending.first())
                };
                // The next ranges are read soon, by this thread or another.
                // (Not under the file's lock: readahead may block on a busy
                // disk, and writers of the file take that lock.)
                if let Some((ns, ne)) = next {
                    jf.vol
                        .prefetch(&self.pool, ns, (ne - ns).min(PREFETCH_BLOCKS));
                }
                let res = self
                    .read_range(jf, s, stop)
                    .and_then(|segs| self.append_range(job, *ino, jf, s, &segs));
                if let Err(err) = res {
                    self.fail_job(
                        job,
                        format!("capture of inode {ino} blocks {s}..{stop} failed: {err}"),
                    );
                    return;
                }
            }
        }
    }

    fn open_writer(&self, job: &Job, ino: u64, size: u64) -> FsResult<(DeltaWriter, Vec<u32>)> {
        let copies = self.pool.config().copies.max(1) as usize;
        let mut members = Vec::new();
        while members.len() < copies {
            match self.pool.place(&members, 0) {
                Ok(m) => members.push(m),
                // Degraded (fewer usable members than copies): as many as there are.
                Err(_) if !members.is_empty() && self.pool.degraded() => break,
                Err(e) => return Err(e),
            }
        }
        let mut paths = Vec::new();
        for m in &members {
            let dir = delta_dir(&self.pool, *m, job.id)
                .ok_or_else(|| FsError::Corrupt(format!("unknown member {m}")))?;
            crate::storage::create_dir_all(self.pool.storage(), &dir).map_err(FsError::Io)?;
            paths.push(dir.join(format!("{ino}.0.vd")));
        }
        let header = DeltaHeader {
            snap_id: job.id,
            base_id: job.parent.unwrap_or(0),
            ino,
            file_size: size,
            block_size: job.bs as u32,
        };
        let w = DeltaWriter::create(self.pool.storage_arc(), &paths, &header, job.level)
            .map_err(delta_err)?;
        tracing::debug!(snapshot = job.id, ino, ?members, "delta started");
        Ok((w, members))
    }

    /// The background capture of `job`: saves every pending block, finishes the
    /// delta files and publishes the record as complete (or failed).
    pub fn run_job(&self, job: Arc<Job>) {
        let threads = if self.pool.storage().concurrent() {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, MAX_CAPTURE_THREADS)
        } else {
            1
        };
        std::thread::scope(|sc| {
            for _ in 0..threads {
                sc.spawn(|| self.capture_worker(&job));
            }
        });
        // No block is pending any more; writers' copy-before-write still
        // reading or appending ends before the deltas are finished.
        for jf in job.files.values() {
            let mut g = jf.state.lock();
            while (!g.reading.is_empty() || !g.inflight.is_empty()) && job.error.lock().is_none() {
                jf.changed.wait(&mut g);
            }
        }
        // Copy-before-write is over. Writers never take the delta locks held
        // below while the deltas are finished (index, footer, fdatasync of
        // everything captured: long).
        if job.error.lock().is_none() {
            self.active.store(false, Ordering::Release);
        }
        let mut dirs = BTreeSet::new();
        if job.error.lock().is_none() {
            for (ino, jf) in &job.files {
                let mut g = jf.out.lock();
                let Some(w) = g.writer.take() else {
                    continue;
                };
                let members = g.members.clone();
                match w.finish() {
                    Ok((entries, len)) => {
                        let blocks = entries.iter().map(|e| e.count as u64).sum();
                        let opened = members
                            .first()
                            .and_then(|m| delta_path(&self.pool, *m, job.id, *ino, 0))
                            .map(|p| {
                                let want = DeltaId {
                                    snap_id: job.id,
                                    base_id: job.parent.unwrap_or(0),
                                    ino: *ino,
                                    block_size: job.bs as u32,
                                };
                                DeltaFile::open_checked(self.pool.storage(), &p, &want)
                            });
                        match opened {
                            Some(Ok(d)) => g.finished = Some(Arc::new(d)),
                            Some(Err(e)) => {
                                drop(g);
                                self.fail_job(&job, format!("finished delta unreadable: {e}"));
                                break;
                            }
                            None => {}
                        }
                        for m in &members {
                            dirs.insert(*m);
                        }
                        g.loc = Some(DeltaLoc {
                            members,
                            seq: 0,
                            stored: len,
                            blocks,
                        });
                    }
                    Err(e) => {
                        drop(g);
                        self.fail_job(&job, format!("finishing the delta of inode {ino}: {e}"));
                        break;
                    }
                }
            }
        }
        if job.error.lock().is_none() {
            for m in &dirs {
                if let Some(d) = delta_dir(&self.pool, *m, job.id) {
                    // The delta directory, `snap/` and the member directory:
                    // `snap/` may have been created by an earlier capture
                    // whose sync failed, and its entry is durable only now.
                    let s = self.pool.storage();
                    let r = d.ancestors().take(3).try_for_each(|dir| s.sync_dir(dir));
                    if let Err(e) = r {
                        self.fail_job(&job, format!("syncing {}: {e}", d.display()));
                        break;
                    }
                }
            }
        }
        self.finish_job(&job);
    }

    fn finish_job(&self, job: &Arc<Job>) {
        let error = job.error.lock().clone();
        if let Some(rec) = self.get(job.id) {
            let mut rec = (*rec).clone();
            match error {
                None => {
                    for (ino, jf) in &job.files {
                        if let Some(loc) = jf.out.lock().loc.clone() {
                            rec.stored_bytes += loc.stored;
                            rec.deltas.insert(*ino, loc);
                        }
                    }
                    rec.state = State::Complete;
                    tracing::info!(snapshot = %rec.name, stored = rec.stored_bytes, "snapshot complete");
                    let seconds = job.started.elapsed().as_secs_f64();
                    let bytes = job.total_blocks * job.bs;
                    self.pool.info.put(
                        crate::pool::info::KEY_CAPTURE,
                        &crate::pool::info::CaptureRecord {
                            snapshot: rec.name.clone(),
                            seconds,
                            bytes,
                            bytes_per_second: bytes as f64 / seconds.max(1e-3),
                        },
                    );
                    self.pool.emit(
                        "snapshot_created",
                        crate::pool::info::Severity::Info,
                        None,
                        format!(
                            "snapshot {} complete: {} block(s) changed, {} stored",
                            rec.name,
                            rec.changed_blocks,
                            crate::util::human(rec.stored_bytes)
                        ),
                    );
                }
                Some(why) => {
                    // The interval goes back to the live bitmap: the next snapshot
                    // must still see those changes. Every file of it, not only
                    // those with blocks to save (`job.files`): a file truncated
                    // to 0 has none, and its changes were lost.
                    for (ino, set) in std::mem::take(&mut rec.interval) {
                        if let Some(vol) = job.changed_vols.get(&ino) {
                            for (s, e) in set.iter() {
                                vol.mark_blocks(s, e);
                            }
                        }
                    }
                    for jf in job.files.values() {
                        if let Some(w) = jf.out.lock().writer.take() {
                            w.abandon();
                        }
                    }
                    self.remove_snapshot_dirs(job.id);
                    rec.deltas.clear();
                    self.pool.emit(
                        "snapshot_failed",
                        crate::pool::info::Severity::Error,
                        None,
                        format!("snapshot {} failed: {why}", rec.name),
                    );
                    rec.state = State::Failed(why);
                }
            }
            self.publish(rec);
        }
        self.views.lock().clear();
        let deferred = std::mem::take(&mut *job.deferred.lock());
        {
            let mut g = self.job.lock();
            *g = None;
            self.active.store(false, Ordering::Release);
            self.job_cv.notify_all();
        }
        // Removed by the next commit, which first checks that no extent has
        // taken the name again meanwhile (a copy moved back to its member).
        self.released.lock().extend(deferred);
    }

    /// Dead extent files a finished capture no longer reads (see `defer_dead`).
    pub fn take_released(&self) -> Vec<DeadExtent> {
        std::mem::take(&mut *self.released.lock())
    }

    fn remove_snapshot_dirs(&self, id: u64) {
        for m in self.pool.members().iter() {
            let d = m.dir.join(SNAP_DIR).join(id.to_string());
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
                    let keep = parse_delta_name(&fname).is_some_and(|(ino, seq)| {
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

    /// Opens the copies of the delta of `ino` in snapshot `rec`.
    fn open_delta(&self, rec: &SnapshotRecord, ino: u64) -> FsResult<Vec<Arc<DeltaFile>>> {
        let Some(loc) = rec.deltas.get(&ino) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut last = None;
        for m in &loc.members {
            let Some(p) = delta_path(&self.pool, *m, rec.id, ino, loc.seq) else {
                continue;
            };
            match DeltaFile::open_checked(self.pool.storage(), &p, &rec.delta_id(ino)) {
                Ok(d) => out.push(Arc::new(d)),
                Err(e) => {
                    tracing::error!(snapshot = %rec.name, ino, error = %e, "delta copy unreadable");
                    last = Some(e);
                }
            }
        }
        if out.is_empty() {
            return Err(match last {
                Some(e) => delta_err(e),
                None => FsError::Corrupt(format!(
                    "snapshot {}: no copy of the delta of inode {ino}",
                    rec.name
                )),
            });
        }
        Ok(out)
    }

    /// The chain of `ino` from snapshot `id` down to its full, newest first.
    /// Also returns the `cache_epoch` of the records it was read from.
    fn chain(&self, id: u64) -> (u64, Vec<Arc<SnapshotRecord>>) {
        let recs = self.records.read();
        let epoch = self.cache_epoch.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            let Some(r) = recs.get(&c) else { break };
            out.push(r.clone());
            cur = r.parent;
        }
        (epoch, out)
    }

    fn view(&self, id: u64, ino: u64) -> FsResult<Arc<FileView>> {
        if let Some(v) = self.views.lock().get(&(id, ino)) {
            return Ok(v.clone());
        }
        loop {
            let (epoch, chain) = self.chain(id);
            match self.build_view(epoch, &chain, ino) {
                Ok(v) => {
                    let v = Arc::new(v);
                    // Only a current view is cached (see `cache_epoch`).
                    let mut views = self.views.lock();
                    if self.cache_epoch.load(Ordering::Acquire) == epoch {
                        views.put((id, ino), v.clone());
                    }
                    return Ok(v);
                }
                // The records changed meanwhile: a deletion may have removed
                // delta files of the old chain. Again with the new records.
                Err(_) if self.cache_epoch.load(Ordering::Acquire) != epoch => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn build_view(
        &self,
        epoch: u64,
        chain: &[Arc<SnapshotRecord>],
        ino: u64,
    ) -> FsResult<FileView> {
        let Some(top) = chain.first() else {
            return Err(FsError::NotFound);
        };
        let size = top.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
        let mut deltas: HashMap<u64, Vec<Arc<DeltaFile>>> = HashMap::new();
        let mut entries: Vec<Vec<Entry>> = Vec::new();
        for r in chain {
            if r.size_blocks(ino).is_none() {
                entries.push(Vec::new());
                break;
            }
            let d = self.open_delta(r, ino)?;
            entries.push(d.first().map(|d| d.entries.clone()).unwrap_or_default());
            deltas.insert(r.id, d);
        }
        let levels: Vec<Level> = chain
            .iter()
            .zip(&entries)
            .map(|(r, e)| Level {
                snap_id: r.id,
                size_blocks: r.size_blocks(ino),
                entries: e,
            })
            .collect();
        let runs = flatten::flatten(&levels, true);
        Ok(FileView {
            epoch,
            size,
            runs,
            deltas,
        })
    }

    fn frame(&self, v: &FileView, ino: u64, snap: u64, e: &Entry) -> FsResult<Arc<Vec<u8>>> {
        let key = (v.epoch, snap, ino, e.offset);
        if let Some(f) = self.frames.lock().get(&key) {
            return Ok(f.clone());
        }
        let copies = v
            .deltas
            .get(&snap)
            .ok_or_else(|| FsError::Corrupt(format!("snapshot {snap}: delta missing")))?;
        let mut last = None;
        for d in copies {
            match d.read_frame(e) {
                Ok(b) => {
                    let b = Arc::new(b);
                    self.frames.lock().put(key, b.clone());
                    return Ok(b);
                }
                Err(err) => {
                    tracing::error!(snapshot = snap, ino, error = %err, "delta frame unreadable; trying another copy");
                    last = Some(err);
                }
            }
        }
        Err(last
            .map(delta_err)
            .unwrap_or(FsError::Corrupt("no delta copy".into())))
    }

    /// Reads `len` bytes at `off` of file `ino` as snapshot `id` holds it.
    pub fn read(&self, id: u64, ino: u64, off: u64, len: u64) -> FsResult<Vec<u8>> {
        let rec = self.get(id).ok_or(FsError::NotFound)?;
        let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
        if off >= size {
            return Ok(Vec::new());
        }
        let len = len.min(size - off);
        let mut buf = vec![0u8; len as usize];
        if rec.state == State::Pending
            && let Some(job) = self.job.lock().clone().filter(|j| j.id == id)
        {
            self.read_pending(&job, &rec, ino, off, &mut buf)?;
            return Ok(buf);
        }
        let v = self.view(id, ino)?;
        self.read_view(&v, ino, off, &mut buf)?;
        Ok(buf)
    }

    fn read_view(&self, v: &FileView, ino: u64, off: u64, buf: &mut [u8]) -> FsResult<()> {
        let bs = self.bs;
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let b = pos / bs;
            let Some(run) = flatten::lookup(&v.runs, b) else {
                // Past the runs (a gap cannot happen with holes resolved): zeros.
                pos = (b + 1) * bs;
                continue;
            };
            let run_end = ((run.start + run.count) * bs).min(end);
            if let Source::Data { snap_id, entry } = run.source {
                let frame = self.frame(v, ino, snap_id, &entry)?;
                let fstart = entry.start * bs;
                let n = (run_end.min(entry.end() * bs) - pos) as usize;
                let src = (pos - fstart) as usize;
                let dst = (pos - off) as usize;
                buf[dst..dst + n].copy_from_slice(&frame[src..src + n]);
                pos += n as u64;
            } else {
                pos = run_end;
            }
        }
        let _ = v.size;
        Ok(())
    }

    /// Reads a snapshot still being captured: pending blocks from the live file
    /// (unchanged: writers save them first), saved ones from the delta, the
    /// rest from the base.
    fn read_pending(
        &self,
        job: &Job,
        rec: &SnapshotRecord,
        ino: u64,
        off: u64,
        buf: &mut [u8],
    ) -> FsResult<()> {
        let bs = self.bs;
        let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
        let parent = job.parent.and_then(|p| self.get(p));
        let parent_view = match &parent {
            Some(p) if p.size_blocks(ino).is_some() => Some(self.view(p.id, ino)?),
            _ => None,
        };
        // The state lock is held throughout: blocks still pending are read from
        // the live file, which writers change only after saving them.
        let jf = job.files.get(&ino);
        let guard = jf.map(|f| (f, f.state.lock()));
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let b = pos / bs;
            let blk_end = ((b + 1) * bs).min(end);
            let n = (blk_end - pos) as usize;
            let dst = (pos - off) as usize;
            let within = (pos - b * bs) as usize;
            let mut done = false;
            if let Some((jf, g)) = &guard {
                let inflight = g
                    .inflight
                    .range(..=b)
                    .next_back()
                    .filter(|(_, (end, _))| *end > b)
                    .map(|(_, (_, segs))| segs.clone());
                if let Some(segs) = inflight {
                    // Read, not yet appended: served from the captured buffer.
                    if let Some((ss, _, Some(data))) =
                        segs.iter().find(|(ss, n, _)| *ss <= b && b < ss + n)
                    {
                        let src = ((b - ss) * bs) as usize + within;
                        buf[dst..dst + n].copy_from_slice(&data[src..src + n]);
                    }
                    done = true;
                } else if g.pending.contains(b) || g.reading.contains(b) {
                    let data = jf.vol.read(&self.pool, pos, n, size)?;
                    buf[dst..dst + data.len()].copy_from_slice(&data);
                    done = true;
                } else if let Some((_, e)) = g.index.range(..=b).next_back()
                    && e.end() > b
                {
                    if e.kind == super::delta::EntryKind::Data {
                        let o = jf.out.lock();
                        let frame = match (&o.writer, &o.finished) {
                            (Some(w), _) => w.read_frame(e).map_err(delta_err)?,
                            (None, Some(d)) => d.read_frame(e).map_err(delta_err)?,
                            (None, None) => return Err(FsError::Corrupt("delta gone".into())),
                        };
                        let src = ((b - e.start) * bs) as usize + within;
                        buf[dst..dst + n].copy_from_slice(&frame[src..src + n]);
                    }
                    done = true;
                }
            }
            if !done
                && let (Some(pv), Some(p)) = (&parent_view, &parent)
                && p.size_blocks(ino).is_some_and(|s| b < s)
            {
                self.read_view(pv, ino, pos, &mut buf[dst..dst + n])?;
            }
            pos = blk_end;
        }
        Ok(())
    }

    /// 512-byte blocks allocated to `ino` in snapshot `id` (its `st_blocks`).
    pub fn allocated(&self, id: u64, ino: u64) -> u64 {
        let Some(rec) = self.get(id) else { return 0 };
        if rec.state == State::Pending {
            // Approximated by the size while the capture runs.
            let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
            return size.div_ceil(512);
        }
        match self.view(id, ino) {
            Ok(v) => flatten::allocated_blocks(&v.runs) * (self.bs / 512),
            Err(_) => 0,
        }
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE in `ino` of snapshot `id`.
    pub fn seek(&self, id: u64, ino: u64, off: u64, data: bool) -> FsResult<Option<u64>> {
        let rec = self.get(id).ok_or(FsError::NotFound)?;
        let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
        if off >= size {
            return Ok(None);
        }
        if rec.state == State::Pending {
            return Ok(Some(if data { off } else { size }));
        }
        let v = self.view(id, ino)?;
        let bs = self.bs;
        let mut b = off / bs;
        loop {
            if b * bs >= size {
                return Ok(if data { None } else { Some(size) });
            }
            let run = flatten::lookup(&v.runs, b);
            let allocated = run.is_some_and(|r| !matches!(r.source, Source::Hole));
            if allocated == data {
                return Ok(Some((b * bs).max(off)));
            }
            b = match run {
                Some(r) => r.start + r.count,
                None => {
                    // Skip to the next run (or the end).
                    match v.runs.iter().find(|r| r.start > b) {
                        Some(r) => r.start,
                        None => size.div_ceil(bs),
                    }
                }
            };
        }
    }

    /// Deletes snapshot `id`, keeping every other one byte-identical: each
    /// snapshot based on it gets its blocks merged in (a full it was based on is
    /// folded into it, making it a full). Returns the paths to remove once the
    /// commit dropping the old record is durable, and the interval of changes
    /// to give back to the live bitmaps when it was the newest.
    ///
    /// `progress` counts the files merged; when it returns `false` the
    /// merge stops, its new files are removed and nothing changes
    /// ([`FsError::Cancelled`]).
    #[allow(clippy::type_complexity)]
    pub fn delete(
        &self,
        id: u64,
        progress: crate::fs::Progress,
    ) -> FsResult<(Vec<PathBuf>, BTreeMap<u64, RangeSet>)> {
        let x = self.get(id).ok_or(FsError::NotFound)?;
        if x.state == State::Pending {
            return Err(FsError::Busy);
        }
        let children: Vec<Arc<SnapshotRecord>> = self
            .records
            .read()
            .values()
            .filter(|r| r.parent == Some(id))
            .cloned()
            .collect();
        let mut old_paths = Vec::new();
        let mut updated: Vec<SnapshotRecord> = Vec::new();
        let total: u64 = children
            .iter()
            .filter(|c| c.state == State::Complete)
            .map(|c| {
                c.inodes
                    .values()
                    .filter(|i| i.kind == NodeKind::File)
                    .count() as u64
            })
            .sum();
        let mut done = 0u64;
        progress(0, total);
        let mut step = || {
            done += 1;
            progress(done, total)
        };
        for c in &children {
            if c.state != State::Complete {
                continue;
            }
            match self.merge_into(&x, c, &mut step) {
                Ok((rec, old)) => {
                    updated.push(rec);
                    old_paths.extend(old);
                }
                Err(e) => {
                    // The merges done so far wrote new delta files no record
                    // names yet.
                    for r in &updated {
                        for (ino, l) in &r.deltas {
                            for m in &l.members {
                                if let Some(p) = delta_path(&self.pool, *m, r.id, *ino, l.seq) {
                                    let _ = self.pool.storage().remove_file(&p);
                                }
                            }
                        }
                    }
                    return Err(e);
                }
            }
        }
        // The interval moves to the next snapshot in time, or to the live bitmaps.
        let next = self
            .records
            .read()
            .range(id + 1..)
            .map(|(_, r)| r.clone())
            .find(|r| r.is_readable());
        let mut to_live = BTreeMap::new();
        match next {
            Some(n) => {
                let mut n = updated
                    .iter()
                    .position(|r: &SnapshotRecord| r.id == n.id)
                    .map(|i| updated.remove(i))
                    .unwrap_or_else(|| (*n).clone());
                for (ino, set) in &x.interval {
                    n.interval.entry(*ino).or_default().union_with(set);
                }
                updated.push(n);
            }
            None if x.is_readable() => to_live = x.interval.clone(),
            None => {}
        }
        for m in self.pool.members().iter() {
            old_paths.push(m.dir.join(SNAP_DIR).join(id.to_string()));
        }
        // Every rewritten record is written at the next commit: the merged
        // children and the one that took the interval, which is the next
        // *readable* one (not always the record right after `id`: a failed
        // one may sit between them, and the interval was then lost at the
        // next mount).
        let rewritten: Vec<u64> = updated.iter().map(|r| r.id).collect();
        {
            let mut recs = self.records.write();
            recs.remove(&id);
            for r in updated {
                recs.insert(r.id, Arc::new(r));
            }
            self.cache_epoch.fetch_add(1, Ordering::AcqRel);
        }
        {
            let mut ch = self.changes.lock();
            ch.insert(id);
            ch.extend(children.iter().map(|c| c.id));
            ch.extend(rewritten);
        }
        self.views.lock().clear();
        self.frames.lock().clear();
        Ok((old_paths, to_live))
    }

    /// Rewrites the deltas of `c` (based on `x`) so that it is based on `x`'s
    /// parent, with the same content. Returns the new record and the old files.
    fn merge_into(
        &self,
        x: &SnapshotRecord,
        c: &SnapshotRecord,
        step: &mut dyn FnMut() -> bool,
    ) -> FsResult<(SnapshotRecord, Vec<PathBuf>)> {
        let full = x.parent.is_none();
        let mut rec = c.clone();
        rec.parent = x.parent;
        if full {
            rec.kind = Kind::Full;
        }
        rec.deltas.clear();
        rec.stored_bytes = 0;
        let mut old = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| -> FsResult<()> {
            for (ino, inode) in &c.inodes {
                if inode.kind != NodeKind::File {
                    continue;
                }
                if !step() {
                    return Err(FsError::Cancelled);
                }
                let cd = self.open_delta(c, *ino)?;
                let xd = if x.size_blocks(*ino).is_some() {
                    self.open_delta(x, *ino)?
                } else {
                    Vec::new()
                };
                let ce = cd.first().map(|d| d.entries.clone()).unwrap_or_default();
                let xe = xd.first().map(|d| d.entries.clone()).unwrap_or_default();
                let levels = [
                    Level {
                        snap_id: c.id,
                        size_blocks: c.size_blocks(*ino),
                        entries: &ce,
                    },
                    Level {
                        snap_id: x.id,
                        size_blocks: x.size_blocks(*ino),
                        entries: &xe,
                    },
                ];
                let runs = flatten::flatten(&levels, full);
                let runs: Vec<Run> = runs
                    .into_iter()
                    .filter(|r| !(full && r.source == Source::Hole))
                    .collect();
                if let Some(loc) = c.deltas.get(ino) {
                    for m in &loc.members {
                        old.extend(delta_path(&self.pool, *m, c.id, *ino, loc.seq));
                    }
                }
                if runs.is_empty() {
                    continue;
                }
                let seq = c.deltas.get(ino).map(|l| l.seq + 1).unwrap_or(1);
                let members = match c.deltas.get(ino).or(x.deltas.get(ino)) {
                    Some(l) => l.members.clone(),
                    None => vec![self.pool.place(&[], 0)?],
                };
                let mut paths = Vec::new();
                for m in &members {
                    let dir = delta_dir(&self.pool, *m, c.id)
                        .ok_or_else(|| FsError::Corrupt(format!("unknown member {m}")))?;
                    crate::storage::create_dir_all(self.pool.storage(), &dir)
                        .map_err(FsError::Io)?;
                    let p = dir.join(format!("{ino}.{seq}.vd"));
                    // A leftover of an interrupted merge.
                    let _ = self.pool.storage().remove_file(&p);
                    paths.push(p);
                }
                let header = DeltaHeader {
                    snap_id: c.id,
                    base_id: x.parent.unwrap_or(0),
                    ino: *ino,
                    file_size: inode.size,
                    block_size: self.bs as u32,
                };
                let mut w = DeltaWriter::create(
                    self.pool.storage_arc(),
                    &paths,
                    &header,
                    self.level.load(Ordering::Relaxed),
                )
                .map_err(delta_err)?;
                made.extend(paths.iter().cloned());
                let src = |snap: u64| if snap == c.id { &cd } else { &xd };
                for r in &runs {
                    match r.source {
                        Source::Hole => w.add_hole(r.start, r.count).map_err(delta_err)?,
                        Source::Zero => w.add_zero(r.start, r.count).map_err(delta_err)?,
                        Source::Data { snap_id, entry } => {
                            let copies = src(snap_id);
                            if r.start == entry.start && r.count == entry.count as u64 {
                                let raw = first_ok(copies, |d| d.read_raw(&entry))?;
                                w.add_raw(entry.start, entry.count, &raw, entry.crc)
                                    .map_err(delta_err)?;
                            } else {
                                let frame = first_ok(copies, |d| d.read_frame(&entry))?;
                                let bs = self.bs as usize;
                                let mut b = r.start;
                                while b < r.start + r.count {
                                    let n = (r.start + r.count - b).min(MAX_FRAME_BLOCKS as u64);
                                    let s = (b - entry.start) as usize * bs;
                                    w.add_data(b, &frame[s..s + n as usize * bs])
                                        .map_err(delta_err)?;
                                    b += n;
                                }
                            }
                        }
                    }
                }
                let (entries, len) = w.finish().map_err(delta_err)?;
                rec.stored_bytes += len;
                rec.deltas.insert(
                    *ino,
                    DeltaLoc {
                        members,
                        seq,
                        stored: len,
                        blocks: entries.iter().map(|e| e.count as u64).sum(),
                    },
                );
            }
            Ok(())
        })();
        if let Err(e) = result {
            for p in made {
                let _ = self.pool.storage().remove_file(&p);
            }
            return Err(e);
        }
        for l in rec.deltas.values() {
            for m in &l.members {
                if let Some(d) = delta_dir(&self.pool, *m, c.id) {
                    self.pool.storage().sync_dir(&d).map_err(FsError::Io)?;
                }
            }
        }
        rec.changed_blocks = rec.deltas.values().map(|l| l.blocks).sum();
        Ok((rec, old))
    }

    /// Every snapshot as the prune planner sees it (`held`: ids held).
    pub fn prune_candidates(&self, held: &BTreeSet<u64>) -> Vec<crate::snapshot::prune::Candidate> {
        self.records
            .read()
            .values()
            .map(|r| crate::snapshot::prune::Candidate {
                id: r.id,
                name: r.name.clone(),
                created: r.created.secs,
                complete: r.state == State::Complete,
                pending: r.state == State::Pending,
                held: held.contains(&r.id),
            })
            .collect()
    }

    /// Problems of the snapshots (every delta copy of every complete snapshot
    /// is opened and every frame read back) and notes (failed snapshots).
    /// Gives every finished snapshot's deltas `want` copies on usable members,
    /// none on `from`: copies on `from` (or on members that failed) are
    /// replaced by new ones made from a copy that verifies. Returns how many
    /// copies were made and the files to remove once the commit recording the
    /// new locations is durable. The caller holds `admin` with no capture
    /// running.
    pub fn place_deltas(&self, from: Option<u32>, want: usize) -> FsResult<(u64, Vec<PathBuf>)> {
        let want = want.max(1);
        let mut made = 0;
        let mut old = Vec::new();
        let recs: Vec<Arc<SnapshotRecord>> = self.records.read().values().cloned().collect();
        for rec in recs {
            if rec.state == State::Pending {
                continue;
            }
            let mut changed = (*rec).clone();
            let mut dirty = false;
            for (ino, loc) in changed.deltas.iter_mut() {
                let keep: Vec<u32> = loc
                    .members
                    .iter()
                    .copied()
                    .filter(|m| Some(*m) != from && self.pool.usable(*m))
                    .collect();
                if keep.len() >= want && keep.len() == loc.members.len() {
                    continue;
                }
                // A source that verifies: a kept copy, else the one on `from`.
                let source = loc
                    .members
                    .iter()
                    .filter(|m| self.pool.usable(**m))
                    .filter_map(|m| delta_path(&self.pool, *m, rec.id, *ino, loc.seq))
                    .find(|p| {
                        DeltaFile::open_checked(self.pool.storage(), p, &rec.delta_id(*ino))
                            .and_then(|d| d.verify())
                            .is_ok()
                    });
                let mut members = keep.clone();
                while members.len() < want {
                    let Some(src) = &source else {
                        return Err(FsError::Corrupt(format!(
                            "snapshot {}: no readable copy of the delta of inode {ino}",
                            rec.name
                        )));
                    };
                    let exclude: Vec<u32> = members.iter().copied().chain(from).collect();
                    let to = match self.pool.place(&exclude, loc.stored) {
                        Ok(m) => m,
                        Err(_) if !members.is_empty() => break,
                        Err(e) => return Err(e),
                    };
                    let dir = delta_dir(&self.pool, to, rec.id)
                        .ok_or_else(|| FsError::Corrupt(format!("unknown member {to}")))?;
                    crate::storage::create_dir_all(self.pool.storage(), &dir)
                        .map_err(FsError::Io)?;
                    let dst = dir.join(format!("{ino}.{}.vd", loc.seq));
                    crate::storage::copy_file_atomic(self.pool.storage(), src, &dst)
                        .map_err(FsError::Io)?;
                    members.push(to);
                    made += 1;
                }
                for m in loc.members.iter().filter(|m| !members.contains(m)) {
                    if let Some(p) = delta_path(&self.pool, *m, rec.id, *ino, loc.seq) {
                        old.push(p);
                    }
                }
                loc.members = members;
                dirty = true;
            }
            if dirty {
                self.records.write().insert(rec.id, Arc::new(changed));
                self.changes.lock().insert(rec.id);
            }
        }
        self.views.lock().clear();
        Ok((made, old))
    }

    /// Scrub of the deltas: verifies every copy of every finished snapshot's
    /// deltas and rewrites a bad copy from a good one (a new file renamed over
    /// it). Returns (copies verified, bad copies found, bad copies repaired,
    /// problems left).
    pub fn scrub_deltas(&self) -> (u64, u64, u64, Vec<String>) {
        let _a = self.admin.lock();
        let (mut checked, mut bad, mut fixed) = (0, 0, 0);
        let mut problems = Vec::new();
        let recs: Vec<Arc<SnapshotRecord>> = self.records.read().values().cloned().collect();
        for rec in recs.iter().filter(|r| r.state == State::Complete) {
            for (ino, loc) in &rec.deltas {
                let mut good = None;
                let mut broken = Vec::new();
                for m in &loc.members {
                    if !self.pool.usable(*m) {
                        continue;
                    }
                    let Some(p) = delta_path(&self.pool, *m, rec.id, *ino, loc.seq) else {
                        continue;
                    };
                    checked += 1;
                    match DeltaFile::open_checked(self.pool.storage(), &p, &rec.delta_id(*ino))
                        .and_then(|d| d.verify())
                    {
                        Ok(_) => good = good.or(Some(p)),
                        Err(e) => {
                            bad += 1;
                            tracing::warn!(snapshot = %rec.name, ino, path = %p.display(), error = %e, "scrub: bad delta copy");
                            broken.push((p, e.to_string()));
                        }
                    }
                }
                for (p, why) in broken {
                    let Some(src) = &good else {
                        problems.push(format!(
                            "snapshot {}: delta of inode {ino} has no good copy ({why})",
                            rec.name
                        ));
                        continue;
                    };
                    match crate::storage::copy_file_atomic(self.pool.storage(), src, &p) {
                        Ok(()) => {
                            fixed += 1;
                            tracing::warn!(snapshot = %rec.name, ino, path = %p.display(), "scrub: delta copy rewritten from a good copy");
                        }
                        Err(e) => problems.push(format!(
                            "snapshot {}: cannot rewrite {}: {e}",
                            rec.name,
                            p.display()
                        )),
                    }
                }
            }
        }
        if fixed > 0 {
            // Open views may hold descriptors of the replaced files.
            self.views.lock().clear();
        }
        (checked, bad, fixed, problems)
    }

    pub fn check(&self) -> (Vec<String>, Vec<String>) {
        let mut out = Vec::new();
        let mut notes = Vec::new();
        for r in self.records() {
            if let State::Failed(why) = &r.state {
                notes.push(format!(
                    "snapshot {} failed ({why}); `vpool snapshot delete` removes it",
                    r.name
                ));
                continue;
            }
            if r.state == State::Pending {
                notes.push(format!("snapshot {} was being captured at an unclean stop; the next mount marks it failed", r.name));
                continue;
            }
            if r.state != State::Complete {
                continue;
            }
            for (ino, loc) in &r.deltas {
                for m in &loc.members {
                    let Some(p) = delta_path(&self.pool, *m, r.id, *ino, loc.seq) else {
                        out.push(format!(
                            "snapshot {}: delta of inode {ino} on unknown member {m}",
                            r.name
                        ));
                        continue;
                    };
                    if let Err(e) =
                        DeltaFile::open_checked(self.pool.storage(), &p, &r.delta_id(*ino))
                            .and_then(|d| d.verify())
                    {
                        out.push(format!("snapshot {}: {e}", r.name));
                    }
                }
            }
            if let Some(p) = r.parent
                && self.get(p).is_none_or(|p| p.state != State::Complete)
            {
                out.push(format!(
                    "snapshot {}: its base snapshot {p} is missing",
                    r.name
                ));
            }
        }
        (out, notes)
    }
}

/// `vpool check`: the pool checks of [`crate::pool::inspect`], then every
/// snapshot record and every delta copy.
pub fn check_pool(dir: &std::path::Path) -> crate::Result<crate::pool::inspect::CheckReport> {
    check_pool_in(crate::storage::real(), dir)
}

/// [`check_pool`] on the given storage.
pub fn check_pool_in(
    storage: Arc<dyn crate::storage::Storage>,
    dir: &std::path::Path,
) -> crate::Result<crate::pool::inspect::CheckReport> {
    let pool = Arc::new(Pool::open_in(storage, dir)?);
    let mut report = crate::pool::inspect::check_open(&pool)?;
    let newest = pool
        .member_images()
        .into_iter()
        .flatten()
        .max_by_key(|i| i.generation);
    if let Some(img) = newest {
        let (store, bad) = SnapshotStore::load(pool.clone(), &img.snapshots, img.next_snap_id);
        for (id, why) in bad {
            report
                .problems
                .push(format!("snapshot record {id} is unreadable: {why}"));
        }
        let (problems, notes) = store.check();
        report.problems.extend(problems);
        report.notes.extend(notes);
    }
    Ok(report)
}

fn first_ok<T>(
    copies: &[Arc<DeltaFile>],
    f: impl Fn(&DeltaFile) -> Result<T, DeltaError>,
) -> FsResult<T> {
    let mut last = None;
    for d in copies {
        match f(d) {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(delta_err)
        .unwrap_or_else(|| FsError::Corrupt("no delta copy".into())))
}

/// A captured range ready to append: compressed frames, zero runs and holes.
enum Prepared {
    Data {
        start: u64,
        count: u32,
        frame: Vec<u8>,
        crc: u32,
    },
    Zero(u64, u64),
    Hole(u64, u64),
}

/// Compresses captured segments: holes (omitted in a full, where absence is a
/// hole), runs of all-zero blocks, and frames of up to [`FRAME_BLOCKS`] data
/// blocks.
fn prepare_segments(segs: &[Segment], full: bool, bs: u64, level: i32) -> FsResult<Vec<Prepared>> {
    let bsz = bs as usize;
    let mut out = Vec::new();
    for (start, count, data) in segs {
        let (start, count) = (*start, *count);
        let Some(buf) = data else {
            if !full {
                out.push(Prepared::Hole(start, count));
            }
            continue;
        };
        let zero = |k: u64| {
            let s = k as usize * bsz;
            buf[s..s + bsz].iter().all(|b| *b == 0)
        };
        let mut i = 0u64;
        while i < count {
            let z = zero(i);
            let mut j = i + 1;
            while j < count && zero(j) == z && (z || j - i < FRAME_BLOCKS) {
                j += 1;
            }
            if z {
                out.push(Prepared::Zero(start + i, j - i));
            } else {
                let raw = &buf[i as usize * bsz..j as usize * bsz];
                let frame = zstd::bulk::compress(raw, level).map_err(FsError::Io)?;
                let crc = crc32c::crc32c(&frame);
                out.push(Prepared::Data {
                    start: start + i,
                    count: (j - i) as u32,
                    frame,
                    crc,
                });
            }
            i = j;
        }
    }
    Ok(out)
}

/// Appends prepared ranges to a delta; returns the entries added.
fn append_prepared(w: &mut DeltaWriter, p: &[Prepared]) -> Result<Vec<Entry>, DeltaError> {
    let before = w.entries().len();
    for x in p {
        match x {
            Prepared::Data {
                start,
                count,
                frame,
                crc,
            } => {
                w.add_raw(*start, *count, frame, *crc)?;
            }
            Prepared::Zero(s, n) => w.add_zero(*s, *n)?,
            Prepared::Hole(s, n) => w.add_hole(*s, *n)?,
        }
    }
    Ok(w.entries()[before..].to_vec())
}
