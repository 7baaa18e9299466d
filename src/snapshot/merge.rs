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

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::delta::{DeltaError, DeltaFile, DeltaHeader, DeltaWriter, Entry, MAX_FRAME_BLOCKS};
use super::flatten::{self, Level, Run, Source};
use super::ranges::RangeSet;
use super::record::{
    DeltaLoc, Kind, SnapshotRecord, State, delta_dir, delta_path, place_delta, prepare_delta_paths,
    sync_delta_dir,
};
use super::store::{SnapshotStore, delta_err};
use crate::error::{FsError, FsResult};
use crate::pool::layout;
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
        progress: crate::util::Progress,
    ) -> FsResult<(Vec<PathBuf>, BTreeMap<u64, RangeSet>)> {
        let deleted = self.get(id).ok_or(FsError::NotFound)?;
        if deleted.state == State::Pending {
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
            .filter(|child| child.state == State::Complete)
            .map(|child| {
                child
                    .inodes
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
        for child in &children {
            if child.state != State::Complete {
                continue;
            }
            match self.merge_into(&deleted, child, &mut step) {
                Ok((rebased, old)) => {
                    updated.push(rebased);
                    old_paths.extend(old);
                }
                Err(e) => {
                    // The merges done so far wrote new delta files no record
                    // names yet.
                    for rec in &updated {
                        for (ino, loc) in &rec.deltas {
                            for m in &loc.members {
                                if let Some(p) = delta_path(&self.pool, *m, rec.id, *ino, loc.seq) {
                                    let _ = self.pool.storage().remove_file(&p);
                                }
                            }
                        }
                    }
                    return Err(e);
                }
            }
        }
        // The interval moves to the next snapshot in time the pool took
        // itself (a received one has no interval), or to the live bitmaps.
        let next = self
            .records
            .read()
            .range(id + 1..)
            .map(|(_, r)| r.clone())
            .find(|r| r.is_readable() && !r.is_received());
        let mut to_live = BTreeMap::new();
        match next {
            Some(next) => {
                let mut next = updated
                    .iter()
                    .position(|r: &SnapshotRecord| r.id == next.id)
                    .map(|i| updated.remove(i))
                    .unwrap_or_else(|| (*next).clone());
                for (ino, set) in &deleted.interval {
                    next.interval.entry(*ino).or_default().union_with(set);
                }
                updated.push(next);
            }
            None if deleted.is_readable() => to_live = deleted.interval.clone(),
            None => {}
        }
        for m in self.pool.members().iter() {
            old_paths.push(layout::snapshot_dir(&m.dir, id));
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
            ch.extend(children.iter().map(|child| child.id));
            ch.extend(rewritten);
        }
        self.views.lock().clear();
        self.frames.lock().clear();
        Ok((old_paths, to_live))
    }

    /// Rewrites the deltas of `child` (based on `deleted`) so that it is
    /// based on `deleted`'s parent, with the same content. Returns the new
    /// record and the child's old delta files, to remove once that record is
    /// committed. On an error, the new files made so far are removed.
    fn merge_into(
        &self,
        deleted: &SnapshotRecord,
        child: &SnapshotRecord,
        step: &mut dyn FnMut() -> bool,
    ) -> FsResult<(SnapshotRecord, Vec<PathBuf>)> {
        let rebase = Rebase { deleted, child };
        let mut rebased = rebase.new_record();
        let mut old_files = Vec::new();
        let mut new_files = Vec::new();
        let merged = self.merge_files(&rebase, &mut rebased, &mut old_files, &mut new_files, step);
        if let Err(e) = merged {
            for p in new_files {
                let _ = self.pool.storage().remove_file(&p);
            }
            return Err(e);
        }
        self.sync_merged_dirs(&rebased)?;
        rebased.changed_blocks = rebased.deltas.values().map(|l| l.blocks).sum();
        Ok((rebased, old_files))
    }

    /// Writes the merged delta of every file of the child into `rebased`, in
    /// inode order; collects the child's current delta files (`old_files`)
    /// and the new ones (`new_files`, for the caller to remove on an error).
    fn merge_files(
        &self,
        rebase: &Rebase,
        rebased: &mut SnapshotRecord,
        old_files: &mut Vec<PathBuf>,
        new_files: &mut Vec<PathBuf>,
        step: &mut dyn FnMut() -> bool,
    ) -> FsResult<()> {
        for (&ino, inode) in &rebase.child.inodes {
            if inode.kind != NodeKind::File {
                continue;
            }
            if !step() {
                return Err(FsError::Cancelled);
            }
            let deltas = self.open_file_deltas(rebase, ino)?;
            let runs = rebase.merged_runs(ino, &deltas);
            if let Some(loc) = rebase.child.deltas.get(&ino) {
                for m in &loc.members {
                    old_files.extend(delta_path(&self.pool, *m, rebase.child.id, ino, loc.seq));
                }
            }
            if runs.is_empty() {
                // Every block resolves through the new base (or, in a new
                // full, is a hole): the file needs no delta.
                continue;
            }
            let loc =
                self.write_merged_delta(rebase, ino, inode.size, &runs, &deltas, new_files)?;
            rebased.stored_bytes += loc.stored;
            rebased.deltas.insert(ino, loc);
        }
        Ok(())
    }

    /// Opens the delta copies of `ino` in both snapshots of the merge.
    fn open_file_deltas(&self, rebase: &Rebase, ino: u64) -> FsResult<FileDeltas> {
        let child = self.open_delta(rebase.child, ino)?;
        let deleted = if rebase.deleted.size_blocks(ino).is_some() {
            self.open_delta(rebase.deleted, ino)?
        } else {
            // The deleted snapshot did not have the file.
            Vec::new()
        };
        Ok(FileDeltas { child, deleted })
    }

    /// Writes `runs` (the merged chain of `ino`, `size` bytes long, whose
    /// data lies in `deltas`) as the next version of the child's delta of
    /// `ino`, and returns where it lies. Its files join `new_files` as soon as
    /// they exist.
    fn write_merged_delta(
        &self,
        rebase: &Rebase,
        ino: u64,
        size: u64,
        runs: &[Run],
        deltas: &FileDeltas,
        new_files: &mut Vec<PathBuf>,
    ) -> FsResult<DeltaLoc> {
        let child = rebase.child;
        let seq = child.deltas.get(&ino).map(|l| l.seq + 1).unwrap_or(1);
        // Placed as a capture places a new delta: the pool's `copies`, on
        // members usable now. Neither snapshot may have had a delta of the
        // file, and the members of an older one may be fewer or failing.
        let members = place_delta(&self.pool)?;
        let paths = prepare_delta_paths(&self.pool, &members, child.id, ino, seq)?;
        for p in &paths {
            // A leftover of an interrupted merge.
            let _ = self.pool.storage().remove_file(p);
        }
        let header = DeltaHeader {
            snap_id: child.id,
            base_id: rebase.new_base().unwrap_or(0),
            ino,
            file_size: size,
            block_size: self.bs as u32,
        };
        let mut writer = DeltaWriter::create(
            self.pool.storage_arc(),
            &paths,
            &header,
            self.level.load(Ordering::Relaxed),
        )
        .map_err(delta_err)?;
        new_files.extend(paths.iter().cloned());
        for run in runs {
            self.copy_run(&mut writer, run, deltas, child.id)?;
        }
        let (entries, stored) = writer.finish().map_err(delta_err)?;
        Ok(DeltaLoc {
            members,
            seq,
            stored,
            blocks: entries.iter().map(|e| e.count as u64).sum(),
        })
    }

    /// Appends one run of the merged chain to `writer`: a hole or zero run
    /// as an entry, a whole frame verbatim (its CRC checked), part of a frame
    /// decompressed and compressed again. `child_id` tells which snapshot's
    /// copies in `deltas` hold a data run.
    fn copy_run(
        &self,
        writer: &mut DeltaWriter,
        run: &Run,
        deltas: &FileDeltas,
        child_id: u64,
    ) -> FsResult<()> {
        match run.source {
            Source::Hole => writer.add_hole(run.start, run.count).map_err(delta_err),
            Source::Zero => writer.add_zero(run.start, run.count).map_err(delta_err),
            Source::Data { snap_id, entry } => {
                let copies = if snap_id == child_id {
                    &deltas.child
                } else {
                    &deltas.deleted
                };
                if run.start == entry.start && run.count == entry.count as u64 {
                    let raw = first_ok(copies, |d| d.read_raw(&entry))?;
                    writer
                        .add_raw(entry.start, entry.count, &raw, entry.crc)
                        .map_err(delta_err)?;
                    return Ok(());
                }
                let frame = first_ok(copies, |d| d.read_frame(&entry))?;
                let bs = self.bs as usize;
                let mut block = run.start;
                while block < run.end() {
                    let n = (run.end() - block).min(MAX_FRAME_BLOCKS as u64);
                    let from = (block - entry.start) as usize * bs;
                    writer
                        .add_data(block, &frame[from..from + n as usize * bs])
                        .map_err(delta_err)?;
                    block += n;
                }
                Ok(())
            }
        }
    }

    /// Makes the names of the merged delta files durable before a commit
    /// refers to them, with the directories holding them: a merged delta
    /// may be the first file of the child on its member.
    fn sync_merged_dirs(&self, rebased: &SnapshotRecord) -> FsResult<()> {
        let members: BTreeSet<u32> = rebased
            .deltas
            .values()
            .flat_map(|l| l.members.iter().copied())
            .collect();
        for m in members {
            if let Some(dir) = delta_dir(&self.pool, m, rebased.id) {
                sync_delta_dir(&self.pool, &dir).map_err(FsError::Io)?;
            }
        }
        Ok(())
    }
}

/// The two snapshots of one merge: `deleted` goes, and `child`, based on
/// it, is rebased onto `deleted`'s parent.
struct Rebase<'a> {
    deleted: &'a SnapshotRecord,
    child: &'a SnapshotRecord,
}

impl Rebase<'_> {
    /// The child's new base: the deleted snapshot's (`None`: the child
    /// becomes a full).
    fn new_base(&self) -> Option<u64> {
        self.deleted.parent
    }

    /// The child's record once rebased, its deltas still to be written.
    fn new_record(&self) -> SnapshotRecord {
        let mut rec = self.child.clone();
        rec.parent = self.new_base();
        if rec.parent.is_none() {
            // A full folded into its child makes the child a full.
            rec.kind = Kind::Full;
        }
        rec.deltas.clear();
        rec.stored_bytes = 0;
        rec
    }

    /// The chain `[child, deleted]` of `ino` resolved: what the child's new
    /// delta must hold. Blocks neither level holds resolve through the new
    /// base and get no run. Into a new full, unresolved blocks are holes and
    /// holes get no entry (in a full, a block without one is a hole).
    fn merged_runs(&self, ino: u64, deltas: &FileDeltas) -> Vec<Run> {
        let into_full = self.new_base().is_none();
        let levels = [
            Level {
                snap_id: self.child.id,
                size_blocks: self.child.size_blocks(ino),
                entries: index_of(&deltas.child),
            },
            Level {
                snap_id: self.deleted.id,
                size_blocks: self.deleted.size_blocks(ino),
                entries: index_of(&deltas.deleted),
            },
        ];
        flatten::flatten(&levels, into_full)
            .into_iter()
            .filter(|r| !(into_full && r.source == Source::Hole))
            .collect()
    }
}

/// The open copies of one file's delta in both snapshots of a merge (empty
/// where the snapshot has no delta of it).
struct FileDeltas {
    child: Vec<Arc<DeltaFile>>,
    deleted: Vec<Arc<DeltaFile>>,
}

/// The entries of a delta (its copies have the same), none without a copy.
fn index_of(copies: &[Arc<DeltaFile>]) -> &[Entry] {
    copies.first().map_or(&[], |d| d.entries.as_slice())
}

/// `f` on the first copy it succeeds on; else the last copy's error.
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
        .unwrap_or_else(|| FsError::corrupt("no delta copy")))
}
