//! Deleting a snapshot, and the merge of each child into its parent's parent.
//!
//! Deleting `X` keeps every other snapshot byte-identical. Each snapshot `C`
//! whose parent is `X` gets `X`'s entries merged in: its delta of a file
//! becomes `flatten([C, X])`, with blocks beyond `X`'s size (or files `X`
//! lacked) recorded as holes, and its parent becomes `X`'s parent. If `X` is a
//! full, `C` becomes a full (a "synthetic full"). Whole frames are copied
//! verbatim (CRC checked), partial ones recompressed.
//!
//! Order, so that a crash or an error at any point changes nothing visible:
//! the merged deltas are new files (`seq + 1`), finished and their directories
//! fsynced before any record changes; the records change together at the next
//! commit; the old files go only once that commit is durable (the caller
//! removes the paths `delete` returns). Files of a merge that did not commit
//! are named by no record, and recovery removes them. `X`'s interval of
//! changes joins the next readable snapshot's (or the live bitmaps when `X`
//! was the newest), so later incrementals and differentials still see every
//! change. A delta that does not read refuses the deletion.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::delta::{DeltaError, DeltaFile, DeltaHeader, DeltaWriter, MAX_FRAME_BLOCKS};
use super::flatten::{self, Level, Run, Source};
use super::ranges::RangeSet;
use super::record::{DeltaLoc, Kind, SNAP_DIR, SnapshotRecord, State, delta_dir, delta_path};
use super::store::{SnapshotStore, delta_err};
use crate::error::{FsError, FsResult};
use crate::pool::meta::NodeKind;

impl SnapshotStore {
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
