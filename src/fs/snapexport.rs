//! The map of one file of a snapshot for `vpool snapshot export`: its size,
//! which byte ranges hold data, zeros or nothing, and for an export with a
//! base the ranges that may differ from the base; and a reader of its bytes.
//! The format writers (`crate::export`) take it from here.
//!
//! Both snapshots must be complete; one still being captured is waited for.
//! The changed ranges are a superset (`changed_between`): a cluster or
//! record exported although unchanged costs space, never correctness. When
//! the path names another file in the base than in the snapshot (the file was
//! replaced), everything counts as changed.

use crate::error::{FsError, FsResult};
use crate::export::{ImageMap, Piece, ReadAt, Span};
use crate::pool::meta::NodeKind;
use crate::snapshot::send::{self, FileRun};
use crate::snapshot::{SnapshotRecord, State};

use super::core::Vfs;
use std::sync::Arc;

/// One file of one snapshot, ready to export.
pub struct ExportSource {
    pub snap_id: u64,
    pub ino: u64,
    pub map: ImageMap,
}

/// Reads a snapshot's file through the snapshot store (a pool opened here).
pub struct SnapshotFileReader<'a> {
    pub vfs: &'a Vfs,
    pub snap_id: u64,
    pub ino: u64,
}

impl ReadAt for SnapshotFileReader<'_> {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let data = self
            .vfs
            .snaps
            .read(self.snap_id, self.ino, off, buf.len() as u64)
            .map_err(|e| std::io::Error::other(format!("reading the snapshot: {e}")))?;
        if data.len() != buf.len() {
            return Err(std::io::Error::other(format!(
                "reading the snapshot: {} bytes at {off}, {} expected",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
}

/// Spans in bytes from runs in blocks, cut at `size`, holes where the runs
/// leave a gap, adjacent spans of one kind merged.
fn spans(runs: &[FileRun], bs: u64, size: u64) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    let mut push = |start: u64, end: u64, piece: Piece| {
        if start >= end {
            return;
        }
        match out.last_mut() {
            Some(l) if l.end() == start && l.piece == piece => l.len += end - start,
            _ => out.push(Span {
                start,
                len: end - start,
                piece,
            }),
        }
    };
    let mut pos = 0u64;
    for r in runs {
        let s = r.start.saturating_mul(bs).min(size);
        let e = r.start.saturating_add(r.count).saturating_mul(bs).min(size);
        if s < pos {
            continue; // not ascending: ignore what was covered already
        }
        push(pos, s, Piece::Hole);
        let piece = match r.piece {
            send::Piece::Data => Piece::Data,
            send::Piece::Zero => Piece::Zero,
            send::Piece::Hole => Piece::Hole,
        };
        push(s, e, piece);
        pos = e;
    }
    push(pos, size, Piece::Hole);
    out
}

impl Vfs {
    /// Snapshot `name`, complete (waiting for its capture when it runs).
    fn complete_snapshot(&self, name: &str) -> FsResult<Arc<SnapshotRecord>> {
        let find = || {
            self.snaps
                .by_name(name)
                .ok_or_else(|| FsError::Message(format!("no snapshot named {name}")))
        };
        let mut rec = find()?;
        if rec.state == State::Pending {
            self.snaps.wait_idle();
            rec = find()?;
        }
        match &rec.state {
            State::Complete => Ok(rec),
            State::Pending => Err(FsError::Message(format!(
                "snapshot {name} is still being captured"
            ))),
            State::Failed(why) => Err(FsError::Message(format!(
                "snapshot {name} failed ({why}) and cannot be exported"
            ))),
        }
    }

    /// The regular file at `path` in snapshot `rec`.
    fn snapshot_file(rec: &SnapshotRecord, path: &str) -> FsResult<u64> {
        let ino = Self::snap_resolve(rec, path.as_bytes()).map_err(|_| {
            FsError::Message(format!("{path}: no such file in snapshot {}", rec.name))
        })?;
        match rec.inodes.get(&ino) {
            Some(i) if i.kind == NodeKind::File => Ok(ino),
            _ => Err(FsError::Message(format!(
                "{path}: not a regular file in snapshot {}",
                rec.name
            ))),
        }
    }

    /// The export map of `path` (pool-relative) in snapshot `name`, with the
    /// ranges changed since snapshot `base` when one is given.
    pub fn snapshot_export_map(
        &self,
        name: &str,
        path: &str,
        base: Option<&str>,
    ) -> FsResult<ExportSource> {
        let rec = self.complete_snapshot(name)?;
        let ino = Self::snapshot_file(&rec, path)?;
        let size = rec.inodes.get(&ino).map(|i| i.size).unwrap_or(0);
        let bs = rec.block_size as u64;
        let runs = self.snaps.file_runs(rec.id, ino)?;
        let changed = match base {
            None => None,
            Some(b) => {
                let brec = self.complete_snapshot(b)?;
                if brec.id == rec.id {
                    return Err(FsError::Message(format!(
                        "--from {b}: the base must be another snapshot than {name}"
                    )));
                }
                let bino = Self::snapshot_file(&brec, path)?;
                let blocks = if bino == ino {
                    self.snaps.changed_between(brec.id, rec.id, ino)?.to_vec()
                } else {
                    vec![(0, size.div_ceil(bs))]
                };
                Some(
                    blocks
                        .into_iter()
                        .map(|(s, e)| {
                            (
                                s.saturating_mul(bs).min(size),
                                e.saturating_mul(bs).min(size),
                            )
                        })
                        .filter(|(s, e)| s < e)
                        .collect(),
                )
            }
        };
        let map = ImageMap {
            size,
            spans: spans(&runs, bs, size),
            changed,
        };
        map.validate()
            .map_err(|e| FsError::corrupt(format!("snapshot {name}, {path}: {e}")))?;
        Ok(ExportSource {
            snap_id: rec.id,
            ino,
            map,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cut_at_size_and_fill_gaps() {
        let runs = [
            FileRun {
                start: 1,
                count: 2,
                piece: send::Piece::Data,
            },
            FileRun {
                start: 3,
                count: 1,
                piece: send::Piece::Data,
            },
            FileRun {
                start: 5,
                count: 3,
                piece: send::Piece::Zero,
            },
        ];
        let s = spans(&runs, 4096, 7 * 4096 + 100);
        let got: Vec<_> = s.iter().map(|s| (s.start, s.len, s.piece)).collect();
        assert_eq!(
            got,
            vec![
                (0, 4096, Piece::Hole),
                (4096, 3 * 4096, Piece::Data),
                (4 * 4096, 4096, Piece::Hole),
                (5 * 4096, 2 * 4096 + 100, Piece::Zero),
            ]
        );
    }
}
