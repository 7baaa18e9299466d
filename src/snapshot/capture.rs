//! Creation and capture of a snapshot: the freeze hand-over, the background
//! capture job, and copy-before-write.
//!
//! Creation (the caller freezes writers for the duration of `begin`): the
//! blocks to save are fixed (full: every block below the size; incremental or
//! differential: the changed-block bitmap since the base), and the record is
//! published as `Pending`. Background threads then read those blocks from the
//! live files, compress them and append them to the delta files. A writer
//! about to change a block still pending first saves its 16-block frame
//! (`preserve`, copy-before-write), so the snapshot is browsable at once: a
//! pending block reads from the live file, a saved one from the delta. When all
//! is saved the delta files are finished (index, footer, fdatasync) and the
//! record turns `Complete`. A crash before that leaves a `Pending` record,
//! which the next mount turns `Failed` (its interval of changes goes back to
//! the live bitmap, so the next snapshot misses nothing) and whose files it
//! removes.
//!
//! Invariants (design.md section 16.4):
//! - a block to save moves one way, each step under the file's `state` lock:
//!   pending, reading (from the live file, no lock held), in flight (read,
//!   being compressed), saved (in the delta's index);
//! - the live file changes a block only once it is out of pending and
//!   reading: its content is then safe in memory or in the delta;
//! - `state` is never held across delta I/O, and `out` may be taken under
//!   `state`, never the other way round;
//! - a failure while saving fails the snapshot (its interval goes back to
//!   the live bitmaps), never the user's write.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{Condvar, Mutex};

use super::delta::{DeltaError, DeltaFile, DeltaHeader, DeltaId, DeltaWriter, Entry};
use super::ranges::RangeSet;
use super::record::{
    DeltaLoc, Kind, SnapshotRecord, State, delta_dir, delta_path, place_delta, prepare_delta_paths,
    sync_delta_dir,
};
use super::store::{SnapshotStore, delta_err};
use crate::error::{FsError, FsResult};
use crate::pool::meta::{InodeRecord, Timestamp};
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

/// A copy-before-write that takes longer is logged (debug).
const SLOW_PRESERVE: std::time::Duration = std::time::Duration::from_millis(20);

/// Bytes of blocks read by writers' copy-before-write that may wait in
/// memory for a capture thread to compress and append them; past this a
/// writer appends its own.
const HANDOFF_BYTES: u64 = 64 << 20;

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

/// The snapshot being captured.
pub struct Job {
    pub id: u64,
    pub(super) parent: Option<u64>,
    pub(super) full: bool,
    pub(super) level: i32,
    pub(super) bs: u64,
    pub(super) esize: u64,
    pub(super) files: BTreeMap<u64, JobFile>,
    /// The volume of every file the interval of changes names (a superset of
    /// `files`' when a file changed but has nothing to save, e.g. truncated
    /// to 0): a failed job gives each its changes back.
    pub(super) changed_vols: BTreeMap<u64, Arc<Volume>>,
    /// Extent files dropped while the job needs their data; removed at its end.
    pub(super) deferred: Mutex<Vec<DeadExtent>>,
    /// Ranges writers read before changing them (copy-before-write), in
    /// `inflight`, for the capture threads to append: (inode, first block,
    /// blocks read), and their bytes.
    handoff: Mutex<(Vec<HandedOff>, u64)>,
    pub(super) error: Mutex<Option<String>>,
    /// Blocks to save when the job started (its progress is measured
    /// against this).
    pub(super) total_blocks: u64,
    pub(super) started: std::time::Instant,
}
impl Job {
    /// Queues blocks a writer read (`inflight`) for a capture thread to
    /// append; gives them back when [`HANDOFF_BYTES`] already wait.
    fn hand_off(&self, ino: u64, s: u64, segs: Arc<Vec<Segment>>) -> Option<Arc<Vec<Segment>>> {
        let bytes: u64 = segs
            .iter()
            .filter(|g| g.data.is_some())
            .map(|g| g.count * self.bs)
            .sum();
        let mut h = self.handoff.lock();
        if h.1 + bytes > HANDOFF_BYTES {
            return Some(segs);
        }
        h.1 += bytes;
        h.0.push((ino, s, segs));
        None
    }

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

/// Blocks a writer read before changing them, for a capture thread to
/// append: inode, first block, the blocks.
type HandedOff = (u64, u64, Arc<Vec<Segment>>);

/// Pending pieces `(start, end)` of one extent read together: the span
/// `[start, end)` and the pieces.
struct ReadGroup {
    start: u64,
    end: u64,
    parts: Vec<(u64, u64)>,
}

/// One file being captured by the running snapshot.
pub(super) struct JobFile {
    pub(super) vol: Arc<Volume>,
    pub(super) size: u64,
    /// Which blocks are saved, being saved or still to save. Never held
    /// across I/O but the reads of a pending snapshot from the live file:
    /// every writer of the file takes it while the capture runs.
    pub(super) state: Mutex<BlockState>,
    /// Signalled when a range leaves `reading` or `inflight`, and when the
    /// job fails.
    pub(super) changed: Condvar,
    /// The delta being written; held across delta I/O (appends, finishing),
    /// never while waiting for `state`.
    pub(super) out: Mutex<DeltaOut>,
}

/// Lock order: `JobFile::out` may be taken while `JobFile::state` is held
/// (reads of a pending snapshot), never the other way round.
pub(super) struct BlockState {
    pub(super) pending: RangeSet,
    /// Entries saved so far, by first block.
    pub(super) index: BTreeMap<u64, Entry>,
    /// Blocks read but not yet appended (being compressed): first block ->
    /// (end, segments), so reads of the pending snapshot find them.
    pub(super) inflight: BTreeMap<u64, (u64, Arc<Vec<Segment>>)>,
    /// Blocks the capture or a writer's copy-before-write is reading from the
    /// live file without holding the lock: a writer about to change one waits
    /// for the read (`JobFile::changed`); until then the live file still
    /// holds the snapshot's content.
    pub(super) reading: RangeSet,
}

pub(super) struct DeltaOut {
    pub(super) writer: Option<DeltaWriter>,
    /// The finished delta (after the writer is done), for reads until the
    /// record turns complete.
    pub(super) finished: Option<Arc<DeltaFile>>,
    pub(super) loc: Option<DeltaLoc>,
    /// Members holding the delta's copies.
    pub(super) members: Vec<u32>,
}

impl SnapshotStore {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn active_job(&self) -> Option<Arc<Job>> {
        if !self.is_active() {
            return None;
        }
        self.job.lock().clone()
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
                // Capture and compression yield the CPU, and their reads and
                // writes the disk, to the FUSE threads: a writer's own
                // copy-before-write read must not queue behind the capture's.
                crate::util::background_thread();
                crate::util::idle_io_thread();
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

    /// Chooses the base of a new snapshot of `kind` (`None`: the default kind).
    /// Received snapshots are never a base: changed-block tracking counts
    /// changes since the pool's own last capture, and their inodes are
    /// another pool's.
    pub fn plan(&self, kind: Option<Kind>) -> FsResult<(Kind, Option<u64>)> {
        let recs = self.records.read();
        let own = || recs.values().rev().filter(|r| !r.is_received());
        let newest = own().find(|r| r.state == State::Complete).map(|r| r.id);
        let newest_full = own()
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
            origin: None,
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
            handoff: Mutex::new((Vec::new(), 0)),
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
    /// waits only for the read of the old blocks: once read they are in
    /// `inflight`, and a capture thread compresses and appends them (unless
    /// [`HANDOFF_BYTES`] already wait, when the caller appends them itself).
    /// A failure fails the snapshot, never the caller's write.
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
        let t0 = std::time::Instant::now();
        let first = (off / self.bs) / FRAME_BLOCKS * FRAME_BLOCKS;
        let last = (off + len).div_ceil(self.bs).div_ceil(FRAME_BLOCKS) * FRAME_BLOCKS;
        let per_extent = (job.esize / job.bs).max(1);
        let mut todo = Vec::new();
        let waited;
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
            waited = t0.elapsed();
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
        // The pending pieces of one extent a few blocks apart are read at
        // once: after an incremental's scattered changes a frame can hold a
        // dozen pieces, and one read each on a busy disk took ~100 ms.
        let mut groups: Vec<ReadGroup> = Vec::new();
        for (s, e) in todo {
            match groups.last_mut() {
                Some(g)
                    if s - g.end <= FRAME_BLOCKS && s / per_extent == (g.end - 1) / per_extent =>
                {
                    g.end = e;
                    g.parts.push((s, e));
                }
                _ => groups.push(ReadGroup {
                    start: s,
                    end: e,
                    parts: vec![(s, e)],
                }),
            }
        }
        let mut failed = None;
        for ReadGroup {
            start: gs,
            end: ge,
            parts,
        } in groups
        {
            if failed.is_some() {
                // Not read: out of `reading`, so that no one waits for it.
                let mut g = jf.state.lock();
                for (s, e) in parts {
                    g.reading.remove(s, e);
                }
                jf.changed.notify_all();
                continue;
            }
            let res = self.read_parts(jf, gs, ge, &parts).and_then(|read| {
                for (s, segs) in read {
                    if let Some(segs) = job.hand_off(ino, s, segs) {
                        self.append_range(&job, ino, jf, s, &segs)?;
                    }
                }
                Ok(())
            });
            if let Err(e) = res {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            self.fail_job(&job, format!("saving blocks before a write failed: {e}"));
        }
        let took = t0.elapsed();
        if took > SLOW_PRESERVE {
            tracing::debug!(
                ino,
                block = first,
                waited_ms = waited.as_millis() as u64,
                took_ms = took.as_millis() as u64,
                "slow copy-before-write"
            );
        }
    }

    /// Appends the ranges writers handed off (see [`SnapshotStore::preserve`]).
    fn append_handed_off(&self, job: &Job) -> FsResult<()> {
        loop {
            let batch = {
                let mut h = job.handoff.lock();
                h.1 = 0;
                std::mem::take(&mut h.0)
            };
            if batch.is_empty() {
                return Ok(());
            }
            for (ino, s, segs) in batch {
                if let Some(jf) = job.files.get(&ino) {
                    self.append_range(job, ino, jf, s, &segs)?;
                }
            }
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
                if let Err(err) = self.append_handed_off(job) {
                    self.fail_job(job, format!("saving blocks before a write failed: {err}"));
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

    /// Reads blocks `[s, stop)`, which the caller moved to `reading`, from
    /// the live file without holding the file's lock, then moves them to
    /// `inflight` and wakes the writers waiting for them.
    fn read_range(&self, jf: &JobFile, s: u64, stop: u64) -> FsResult<Arc<Vec<Segment>>> {
        let mut read = self.read_parts(jf, s, stop, &[(s, stop)])?;
        read.pop()
            .map(|(_, segs)| segs)
            .ok_or_else(|| FsError::corrupt("captured range missing"))
    }

    /// [`SnapshotStore::read_range`] for `parts`, disjoint ranges in order
    /// within `[s, stop)` of one extent, with one read of `[s, stop)`:
    /// returns each part's first block and blocks.
    fn read_parts(
        &self,
        jf: &JobFile,
        s: u64,
        stop: u64,
        parts: &[(u64, u64)],
    ) -> FsResult<Vec<(u64, Arc<Vec<Segment>>)>> {
        // Blocks between the parts are not pending: a writer may be changing
        // them, so they are read under their stripes (and then dropped).
        let whole = matches!(parts, [(ps, pe)] if (*ps, *pe) == (s, stop));
        let read = jf.vol.capture(&self.pool, s, stop - s, !whole).map(|segs| {
            if whole {
                return vec![(s, Arc::new(segs))];
            }
            parts
                .iter()
                .map(|&(ps, pe)| (ps, Arc::new(slice_segments(&segs, ps, pe, self.bs))))
                .collect()
        });
        let mut g = jf.state.lock();
        for &(ps, pe) in parts {
            g.reading.remove(ps, pe);
        }
        if let Ok(read) = &read {
            for (&(ps, pe), (_, segs)) in parts.iter().zip(read) {
                g.inflight.insert(ps, (pe, segs.clone()));
            }
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
                .ok_or_else(|| FsError::corrupt("delta writer missing"))?;
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

    fn open_writer(&self, job: &Job, ino: u64, size: u64) -> FsResult<(DeltaWriter, Vec<u32>)> {
        let members = place_delta(&self.pool)?;
        let paths = prepare_delta_paths(&self.pool, &members, job.id, ino, 0)?;
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
        // reading or appending, and the ranges they handed off, end before
        // the deltas are finished. (A hand-off wakes no one: the wait is
        // timed.)
        for jf in job.files.values() {
            loop {
                if let Err(err) = self.append_handed_off(&job) {
                    self.fail_job(&job, format!("saving blocks before a write failed: {err}"));
                }
                let mut g = jf.state.lock();
                if (g.reading.is_empty() && g.inflight.is_empty()) || job.error.lock().is_some() {
                    break;
                }
                jf.changed
                    .wait_for(&mut g, std::time::Duration::from_millis(10));
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
                    // `snap/` may have been created by an earlier capture
                    // whose sync failed, and its entry is durable only now.
                    if let Err(e) = sync_delta_dir(&self.pool, &d) {
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
    for seg in segs {
        let (start, count, data) = (seg.start, seg.count, &seg.data);
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
                let frame = super::compress::compress(raw, level).map_err(FsError::Io)?;
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

/// The blocks `[s, e)` of `segs` (which cover them, in order).
fn slice_segments(segs: &[Segment], s: u64, e: u64, bs: u64) -> Vec<Segment> {
    segs.iter()
        .filter(|g| g.start < e && s < g.start + g.count)
        .map(|g| {
            let (a, b) = (g.start.max(s), (g.start + g.count).min(e));
            let data = g
                .data
                .as_ref()
                .map(|d| d[((a - g.start) * bs) as usize..((b - g.start) * bs) as usize].to_vec());
            Segment::new(a, b - a, data)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_captured_segments_keep_data_and_holes() {
        let bs = 4;
        let segs = vec![
            Segment::new(10, 3, Some((0u8..12).collect())),
            Segment::new(13, 2, None),
            Segment::new(15, 2, Some((100u8..108).collect())),
        ];
        let s = slice_segments(&segs, 11, 16, bs);
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].start, s[0].count), (11, 2));
        assert_eq!(
            s[0].data.as_deref(),
            Some(&(4u8..12).collect::<Vec<_>>()[..])
        );
        assert_eq!((s[1].start, s[1].count, s[1].data.is_none()), (13, 2, true));
        assert_eq!((s[2].start, s[2].count), (15, 1));
        assert_eq!(s[2].data.as_deref(), Some(&[100u8, 101, 102, 103][..]));
        assert!(slice_segments(&segs, 17, 20, bs).is_empty());
        let one = slice_segments(&segs, 14, 15, bs);
        assert_eq!((one.len(), one[0].start, one[0].count), (1, 14, 1));
    }
}
