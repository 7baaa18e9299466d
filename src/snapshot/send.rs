//! A snapshot as seen from outside the pool: what it holds of a file as runs
//! of data, zeros and holes ([`SnapshotStore::file_runs`]), which blocks may
//! differ between two snapshots ([`SnapshotStore::changed_between`]), its
//! identity on any pool, and the send stream ([`SnapshotStore::send`],
//! format in `crate::stream::format`).
//!
//! Invariants:
//! - the stream of a snapshot is a function of its content and of the
//!   delta frames it is stored in: the same send writes the same bytes
//!   again (records in inode and block order, frames passed through or
//!   compressed at one fixed level), so that `send --resume` can skip what
//!   the receiver kept and check, by the prefix's CRC, that nothing changed;
//! - an incremental stream carries every block of the snapshot that may
//!   differ from its base (a superset is allowed, never a subset): the
//!   blocks resolved above the newest snapshot both chains share.

use std::collections::BTreeSet;
use std::io::Write;

use super::flatten::Source;
use super::ranges::RangeSet;
use super::record::{SnapshotRecord, State};
use super::store::SnapshotStore;
use crate::error::{FsError, FsResult};
use crate::pool::meta::{InodeRecord, NodeKind};
use crate::stream::format::{Begin, Encoder, Identity, Inode, InodeKind, Record};
use crate::util::Progress;

/// What a block of a snapshot's file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Data,
    /// Allocated, reads as zeros.
    Zero,
    /// Unallocated.
    Hole,
}

/// Blocks `[start, start + count)` are `piece`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRun {
    pub start: u64,
    pub count: u64,
    pub piece: Piece,
}

/// Blocks per data record a send compresses itself (as a capture does, so
/// that a received snapshot reads as fast as a local one).
const SEND_FRAME_BLOCKS: u64 = super::capture::FRAME_BLOCKS;
/// zstd level of the frames a send compresses itself: fixed, so that the
/// stream is the same on every send (see the module's invariants).
const SEND_LEVEL: i32 = super::capture::DEFAULT_LEVEL;

/// What a send wrote.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SendReport {
    pub snapshot: String,
    pub base: Option<String>,
    pub files: u64,
    /// Blocks the stream covers (data, zero and hole runs).
    pub blocks: u64,
    pub data_blocks: u64,
    /// Stream bytes (of a resumed send: from the resume point).
    pub bytes: u64,
    pub seconds: f64,
}

impl SnapshotStore {
    /// The identity of `rec` on any pool (a received one keeps its origin's).
    pub fn identity(&self, rec: &SnapshotRecord) -> Identity {
        let (pool, id) = match rec.origin {
            Some(o) => (o.pool, o.id),
            None => (*self.pool.label().pool.as_bytes(), rec.id),
        };
        Identity {
            pool,
            id,
            secs: rec.created.secs,
            nanos: rec.created.nanos,
        }
    }

    /// The snapshot with identity `want`, if this pool holds it.
    pub fn by_identity(&self, want: &Identity) -> Option<std::sync::Arc<SnapshotRecord>> {
        self.records()
            .into_iter()
            .find(|r| self.identity(r) == *want)
    }

    /// The runs of file `ino` in complete snapshot `id`, covering its size
    /// in blocks, ascending.
    pub fn file_runs(&self, id: u64, ino: u64) -> FsResult<Vec<FileRun>> {
        let rec = self.complete(id)?;
        let nblocks = rec.size_blocks(ino).ok_or(FsError::NotFound)?;
        let v = self.view(id, ino)?;
        let mut out: Vec<FileRun> = Vec::new();
        let mut pos = 0;
        for r in &v.runs {
            let (s, e) = (r.start.max(pos), r.end().min(nblocks));
            if s >= e {
                continue;
            }
            if s > pos {
                push_run(&mut out, pos, s, Piece::Hole);
            }
            let piece = match r.source {
                Source::Hole => Piece::Hole,
                Source::Zero => Piece::Zero,
                Source::Data { .. } => Piece::Data,
            };
            push_run(&mut out, s, e, piece);
            pos = e;
        }
        if pos < nblocks {
            push_run(&mut out, pos, nblocks, Piece::Hole);
        }
        Ok(out)
    }

    /// Blocks of `ino` that may differ between complete snapshots `base` and
    /// `id` (a superset: every block resolved above the newest snapshot both
    /// chains share; everything when they share none), within `id`'s size.
    pub fn changed_between(&self, base: u64, id: u64, ino: u64) -> FsResult<RangeSet> {
        let rec = self.complete(id)?;
        self.complete(base)?;
        let nblocks = rec.size_blocks(ino).unwrap_or(0);
        let (_, chain_s) = self.chain(id);
        let (_, chain_b) = self.chain(base);
        let in_b: BTreeSet<u64> = chain_b.iter().map(|r| r.id).collect();
        let mut set = RangeSet::new();
        match chain_s.iter().position(|r| in_b.contains(&r.id)) {
            None => {
                if nblocks > 0 {
                    set.insert(0, nblocks);
                }
            }
            Some(cut) => {
                let shared = chain_s[cut].id;
                set = self.resolved_above(&chain_s[..cut], ino)?;
                let cut_b = chain_b.iter().position(|r| r.id == shared).unwrap_or(0);
                set.union_with(&self.resolved_above(&chain_b[..cut_b], ino)?);
            }
        }
        set.clip(nblocks);
        Ok(set)
    }

    /// Blocks of `ino` that the levels `chain` (newest first) resolve
    /// themselves, not leaving them to the snapshot below the last one.
    fn resolved_above(
        &self,
        chain: &[std::sync::Arc<SnapshotRecord>],
        ino: u64,
    ) -> FsResult<RangeSet> {
        let mut set = RangeSet::new();
        if chain.is_empty() {
            return Ok(set);
        }
        for run in self.resolve(chain, ino, false)?.0 {
            set.insert(run.start, run.end());
        }
        Ok(set)
    }

    fn complete(&self, id: u64) -> FsResult<std::sync::Arc<SnapshotRecord>> {
        self.get(id)
            .filter(|r| r.state == State::Complete)
            .ok_or(FsError::NotFound)
    }

    /// Writes the stream of complete snapshot `id` (relative to `base`, a
    /// complete snapshot, when given) to `out`. `progress` counts blocks;
    /// returning `false` stops the send (`Cancelled`).
    pub fn send(
        &self,
        id: u64,
        base: Option<u64>,
        out: &mut dyn Write,
        progress: Progress,
    ) -> FsResult<SendReport> {
        let t0 = std::time::Instant::now();
        let rec = self.complete(id)?;
        let base_rec = base.map(|b| self.complete(b)).transpose()?;
        let files: Vec<u64> = rec
            .inodes
            .iter()
            .filter(|(_, r)| r.kind == NodeKind::File)
            .map(|(i, _)| *i)
            .collect();
        // What each file sends, known first for the progress total.
        let mut plan = Vec::with_capacity(files.len());
        for ino in &files {
            let nblocks = rec.size_blocks(*ino).unwrap_or(0);
            let set = match base {
                Some(b) => self.changed_between(b, id, *ino)?,
                None => RangeSet::from_ranges(&[(0, nblocks)]),
            };
            plan.push((*ino, set));
        }
        let total: u64 = plan.iter().map(|(_, s)| s.len()).sum();
        let mut enc = Encoder::new(out).map_err(FsError::Io)?;
        let mut report = SendReport {
            snapshot: rec.name.clone(),
            base: base_rec.as_ref().map(|b| b.name.clone()),
            ..Default::default()
        };
        enc.put(&Record::Begin(Begin {
            block_size: self.bs as u32,
            incremental: base.is_some(),
            snapshot: self.identity(&rec),
            base: base_rec
                .as_ref()
                .map(|b| self.identity(b))
                .unwrap_or_default(),
            sender: *self.pool.label().pool.as_bytes(),
            inodes: rec.inodes.len() as u64,
            logical_bytes: rec.logical_bytes,
            name: rec.name.clone(),
        }))
        .map_err(FsError::Io)?;
        for (ino, r) in &rec.inodes {
            enc.put(&Record::Inode(stream_inode(*ino, r)))
                .map_err(FsError::Io)?;
        }
        for ((parent, name), child) in &rec.dirents {
            enc.put(&Record::Dirent {
                parent: *parent,
                name: name.clone(),
                child: *child,
            })
            .map_err(FsError::Io)?;
        }
        let mut done = 0u64;
        progress(0, total);
        for (ino, set) in plan {
            let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
            enc.put(&Record::File { ino, size }).map_err(FsError::Io)?;
            report.files += 1;
            if set.is_empty() {
                continue;
            }
            let v = self.view(id, ino)?;
            for (cs, ce) in set.iter() {
                // The runs overlapping [cs, ce), cut to it.
                let first = v.runs.partition_point(|r| r.end() <= cs);
                let mut pos = cs;
                for r in &v.runs[first..] {
                    if r.start >= ce {
                        break;
                    }
                    let (s, e) = (r.start.max(cs), r.end().min(ce));
                    if s > pos {
                        self.put_hole(&mut enc, base.is_some(), pos, s)?;
                    }
                    match r.source {
                        Source::Hole => self.put_hole(&mut enc, base.is_some(), s, e)?,
                        Source::Zero => enc
                            .put(&Record::Zero {
                                start: s,
                                count: e - s,
                            })
                            .map_err(FsError::Io)?,
                        Source::Data { snap_id, entry } => {
                            if s == entry.start && e == entry.end() {
                                // The stored frame, as it is.
                                let frame = super::read::from_copies(&v, snap_id, ino, |d| {
                                    d.read_raw(&entry)
                                })?;
                                enc.put(&Record::Data {
                                    start: s,
                                    count: entry.count,
                                    crc: entry.crc,
                                    frame,
                                })
                                .map_err(FsError::Io)?;
                            } else {
                                let data = self.frame(&v, ino, snap_id, &entry)?;
                                let bs = self.bs;
                                let mut b = s;
                                while b < e {
                                    let n = (e - b).min(SEND_FRAME_BLOCKS);
                                    let lo = ((b - entry.start) * bs) as usize;
                                    let raw = &data[lo..lo + (n * bs) as usize];
                                    let frame = super::compress::compress(raw, SEND_LEVEL)
                                        .map_err(FsError::Io)?;
                                    enc.put(&Record::Data {
                                        start: b,
                                        count: n as u32,
                                        crc: crc32c::crc32c(&frame),
                                        frame,
                                    })
                                    .map_err(FsError::Io)?;
                                    b += n;
                                }
                            }
                            report.data_blocks += e - s;
                        }
                    }
                    pos = e;
                }
                if pos < ce {
                    self.put_hole(&mut enc, base.is_some(), pos, ce)?;
                }
                report.blocks += ce - cs;
                done += ce - cs;
                if !progress(done, total) {
                    return Err(FsError::Cancelled);
                }
            }
        }
        report.bytes = enc.written;
        enc.finish().map_err(FsError::Io)?;
        report.bytes += 36;
        report.seconds = t0.elapsed().as_secs_f64();
        progress(total, total);
        Ok(report)
    }

    /// A hole run: explicit in an incremental (it overrides the base), left
    /// out of a full (where a block no run covers is a hole).
    fn put_hole<W: Write>(
        &self,
        enc: &mut Encoder<W>,
        incremental: bool,
        s: u64,
        e: u64,
    ) -> FsResult<()> {
        if incremental && s < e {
            enc.put(&Record::Hole {
                start: s,
                count: e - s,
            })
            .map_err(FsError::Io)?;
        }
        Ok(())
    }
}

fn push_run(out: &mut Vec<FileRun>, s: u64, e: u64, piece: Piece) {
    if let Some(l) = out.last_mut()
        && l.piece == piece
        && l.start + l.count == s
    {
        l.count += e - s;
        return;
    }
    out.push(FileRun {
        start: s,
        count: e - s,
        piece,
    });
}

/// An inode as a stream carries it.
pub fn stream_inode(ino: u64, r: &InodeRecord) -> Inode {
    Inode {
        ino,
        kind: match r.kind {
            NodeKind::File => InodeKind::File,
            NodeKind::Dir => InodeKind::Dir,
            NodeKind::Symlink => InodeKind::Symlink,
            NodeKind::Fifo => InodeKind::Fifo,
            NodeKind::Socket => InodeKind::Socket,
            NodeKind::CharDev => InodeKind::CharDev,
            NodeKind::BlockDev => InodeKind::BlockDev,
        },
        mode: r.mode,
        uid: r.uid,
        gid: r.gid,
        nlink: r.nlink,
        rdev: r.rdev,
        size: if r.kind == NodeKind::File { r.size } else { 0 },
        atime: (r.atime.secs, r.atime.nanos),
        mtime: (r.mtime.secs, r.mtime.nanos),
        ctime: (r.ctime.secs, r.ctime.nanos),
        parent: r.parent,
        target: r.target.clone(),
        xattrs: r
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The record of an inode a stream carried.
pub fn record_of(i: &Inode) -> InodeRecord {
    use crate::pool::meta::Timestamp;
    let t = |(secs, nanos): (i64, u32)| Timestamp { secs, nanos };
    InodeRecord {
        kind: match i.kind {
            InodeKind::File => NodeKind::File,
            InodeKind::Dir => NodeKind::Dir,
            InodeKind::Symlink => NodeKind::Symlink,
            InodeKind::Fifo => NodeKind::Fifo,
            InodeKind::Socket => NodeKind::Socket,
            InodeKind::CharDev => NodeKind::CharDev,
            InodeKind::BlockDev => NodeKind::BlockDev,
        },
        mode: i.mode & 0o7777,
        uid: i.uid,
        gid: i.gid,
        nlink: i.nlink,
        size: i.size,
        atime: t(i.atime),
        mtime: t(i.mtime),
        ctime: t(i.ctime),
        rdev: i.rdev,
        parent: i.parent,
        target: i.target.clone(),
        xattrs: i.xattrs.iter().cloned().collect(),
        extents: Vec::new(),
    }
}
