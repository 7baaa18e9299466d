//! TEMPORARY stand-in for `snapshot::send` (file_runs, changed_between),
//! which lands in main with the send stream; removed when it does.

use super::ranges::RangeSet;
use super::store::SnapshotStore;
use crate::error::{FsError, FsResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Data,
    Zero,
    Hole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRun {
    pub start: u64,
    pub count: u64,
    pub piece: Piece,
}

impl SnapshotStore {
    pub fn file_runs(&self, id: u64, ino: u64) -> FsResult<Vec<FileRun>> {
        let rec = self.get(id).ok_or(FsError::NotFound)?;
        let bs = rec.block_size as u64;
        let size = rec.inodes.get(&ino).map(|r| r.size).unwrap_or(0);
        let blocks = size.div_ceil(bs);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < size {
            let data = self.seek(id, ino, pos, true)?.unwrap_or(size);
            if data > pos {
                out.push(FileRun {
                    start: pos / bs,
                    count: data.div_ceil(bs) - pos / bs,
                    piece: Piece::Hole,
                });
            }
            if data >= size {
                break;
            }
            let hole = self.seek(id, ino, data, false)?.unwrap_or(size);
            out.push(FileRun {
                start: data / bs,
                count: hole.div_ceil(bs).min(blocks) - data / bs,
                piece: Piece::Data,
            });
            pos = hole;
        }
        Ok(out)
    }

    pub fn changed_between(&self, base: u64, id: u64, ino: u64) -> FsResult<RangeSet> {
        let b = self.get(base).ok_or(FsError::NotFound)?;
        let r = self.get(id).ok_or(FsError::NotFound)?;
        let bs = r.block_size as u64;
        let sb = b.inodes.get(&ino).map(|r| r.size).unwrap_or(0).div_ceil(bs);
        let sr = r.inodes.get(&ino).map(|r| r.size).unwrap_or(0).div_ceil(bs);
        let (lo, hi) = (base.min(id), base.max(id));
        let mut set = RangeSet::new();
        for rec in self.records() {
            if rec.id > lo
                && rec.id <= hi
                && let Some(s) = rec.interval.get(&ino)
            {
                set.union_with(s);
            }
        }
        set.insert(sb.min(sr), sb.max(sr));
        set.clip(sr.max(sb));
        Ok(set)
    }
}
