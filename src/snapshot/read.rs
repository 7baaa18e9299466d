//! Reading a snapshot's files through the chain index and the caches.
//!
//! A block of file `ino` at snapshot `S` is resolved by [`super::flatten`]
//! through the chain (`S`, its parent, ... down to a full): the first level
//! holding an entry for it, a hole when a level did not have the file or the
//! file was shorter there. The resolved runs of `(S, ino)`, a [`FileView`],
//! are built once from the delta indexes and kept in an LRU (`views`);
//! decompressed frames go to a second LRU (`frames`). A snapshot still being
//! captured reads its pending blocks from the live file, those in flight from
//! the captured buffer, saved ones from the delta being written, the rest
//! from its parent.
//!
//! Invariants:
//! - a view, and the key of every frame read through it, carry the
//!   `cache_epoch` of the records the view was built from; a deletion (which
//!   rewrites deltas, so that an offset may name other blocks) bumps it, and
//!   only a current view is cached, so that a stale view never fills the
//!   caches a new one reads;
//! - a frame whose CRC or length does not check is tried on the next copy;
//!   with no good copy the read fails, it never returns other data.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lru::LruCache;

use super::capture::Job;
use super::delta::{DeltaError, DeltaFile, Entry, EntryKind};
use super::flatten::{self, Level, Run, Source};
use super::record::{SnapshotRecord, State, delta_path};
use super::store::{SnapshotStore, delta_err};
use crate::error::{FsError, FsResult};

/// Cached chain indexes (one per snapshot and file), at most. Each holds the
/// delta files of its chain open, so fewer are kept when descriptors are
/// scarce: one view per 64 descriptors of the extent-file cache's budget.
pub(super) const VIEW_CACHE: usize = 256;

/// Cached decompressed frames (each up to 1 MiB, usually 64 KiB).
pub(super) const FRAME_CACHE: usize = 512;

/// The open copies of a file's deltas, by snapshot id.
pub(super) type Copies = HashMap<u64, Vec<Arc<DeltaFile>>>;

/// The resolved chain of one file in one complete snapshot.
pub(super) struct FileView {
    /// `SnapshotStore::cache_epoch` when the records it was built from were read.
    epoch: u64,
    size: u64,
    pub(super) runs: Vec<Run>,
    /// Delta copies by snapshot id (the first that reads wins).
    pub(super) deltas: Copies,
}

/// Decompressed frames by (view epoch, snapshot, inode, frame offset).
pub(super) type FrameCache = LruCache<(u64, u64, u64, u64), Arc<Vec<u8>>>;

impl SnapshotStore {
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

    /// The chain of `ino` from snapshot `id` down to its full, newest first.
    /// Also returns the `cache_epoch` of the records it was read from.
    pub(super) fn chain(&self, id: u64) -> (u64, Vec<Arc<SnapshotRecord>>) {
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

    pub(super) fn view(&self, id: u64, ino: u64) -> FsResult<Arc<FileView>> {
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
        let (runs, deltas) = self.resolve(chain, ino, true)?;
        Ok(FileView {
            epoch,
            size,
            runs,
            deltas,
        })
    }

    /// Resolves `ino` through the levels `chain` (newest first, section
    /// 16.5): the runs ([`flatten::flatten`], unresolved blocks as holes when
    /// `unresolved_as_hole`) and the delta copies opened, by snapshot.
    pub(super) fn resolve(
        &self,
        chain: &[Arc<SnapshotRecord>],
        ino: u64,
        unresolved_as_hole: bool,
    ) -> FsResult<(Vec<Run>, Copies)> {
        let mut deltas = HashMap::new();
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
        Ok((flatten::flatten(&levels, unresolved_as_hole), deltas))
    }

    pub(super) fn frame(
        &self,
        v: &FileView,
        ino: u64,
        snap: u64,
        e: &Entry,
    ) -> FsResult<Arc<Vec<u8>>> {
        let key = (v.epoch, snap, ino, e.offset);
        if let Some(f) = self.frames.lock().get(&key) {
            return Ok(f.clone());
        }
        let b = Arc::new(from_copies(v, snap, ino, |d| d.read_frame(e))?);
        self.frames.lock().put(key, b.clone());
        Ok(b)
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
                    if let Some(seg) = segs.iter().find(|s| s.contains(b))
                        && let Some(data) = &seg.data
                    {
                        let src = ((b - seg.start) * bs) as usize + within;
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
                    if e.kind == EntryKind::Data {
                        let o = jf.out.lock();
                        let frame = match (&o.writer, &o.finished) {
                            (Some(w), _) => w.read_frame(e).map_err(delta_err)?,
                            (None, Some(d)) => d.read_frame(e).map_err(delta_err)?,
                            (None, None) => return Err(FsError::corrupt("delta gone")),
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

    /// Opens the copies of the delta of `ino` in snapshot `rec`.
    pub(super) fn open_delta(
        &self,
        rec: &SnapshotRecord,
        ino: u64,
    ) -> FsResult<Vec<Arc<DeltaFile>>> {
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
                None => FsError::corrupt(format!(
                    "snapshot {}: no copy of the delta of inode {ino}",
                    rec.name
                )),
            });
        }
        Ok(out)
    }
}

/// `read` on the copies of snapshot `snap`'s delta of `ino` in `v`, in
/// order: the first that reads and checks, else the last error.
pub(super) fn from_copies<T>(
    v: &FileView,
    snap: u64,
    ino: u64,
    read: impl Fn(&DeltaFile) -> Result<T, DeltaError>,
) -> FsResult<T> {
    let copies = v
        .deltas
        .get(&snap)
        .ok_or_else(|| FsError::corrupt(format!("snapshot {snap}: delta missing")))?;
    let mut last = None;
    for d in copies {
        match read(d) {
            Ok(b) => return Ok(b),
            Err(err) => {
                tracing::error!(snapshot = snap, ino, error = %err, "delta frame unreadable; trying another copy");
                last = Some(err);
            }
        }
    }
    Err(last
        .map(delta_err)
        .unwrap_or(FsError::corrupt("no delta copy")))
}
