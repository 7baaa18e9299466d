//! Exports: one file's image as of a snapshot, written in a format that a
//! host without vpool reads (`vpool snapshot export`).
//!
//! The writers here are pure: they know nothing of pools or snapshots. They
//! take an [`ImageMap`] (the image's size, which byte ranges hold data, zeros
//! or nothing, and, for an incremental export, which ranges may have changed
//! since the base) and a [`ReadAt`] that reads the image's bytes, and write:
//!
//! - [`raw`]: a sparse raw image (only data is written; holes stay holes);
//! - [`qcow2`]: a qcow2 v3 image, or with a base an overlay holding only the
//!   changed clusters over a backing file (the export of the base);
//! - [`rbd`]: Ceph's `rbd diff v1` stream, as `rbd import-diff` reads it.
//!
//! The map is built by the filesystem (`fs::snapexport`) from the snapshot
//! store, here or in the daemon serving a mounted pool; the bytes come from
//! the store or through the mount. Nothing here imports the rest of vpool:
//! the layer sits beside `fs`, under `control` and `cli`.
//!
//! Formats and their byte layouts: docs/design.md, "Exports".

pub mod qcow2;
pub mod raw;
pub mod rbd;

use std::io;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What a range of the image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Piece {
    /// Stored data (which may happen to be zeros).
    Data,
    /// Allocated, reads as zeros.
    Zero,
    /// Unallocated, reads as zeros.
    Hole,
}

/// Bytes `[start, start + len)` of the image are `piece`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start: u64,
    pub len: u64,
    pub piece: Piece,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// What an export writes: the image's layout, and for an incremental
/// export what changed since the base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMap {
    /// Image size in bytes.
    pub size: u64,
    /// Ascending, non-overlapping, covering `[0, size)`.
    pub spans: Vec<Span>,
    /// Byte ranges `[start, end)` that may differ from the base (a superset),
    /// ascending and disjoint; `None`: a full export.
    pub changed: Option<Vec<(u64, u64)>>,
}

impl ImageMap {
    /// Checks the invariants the writers rely on.
    pub fn validate(&self) -> io::Result<()> {
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidData, m));
        let mut pos = 0u64;
        for s in &self.spans {
            if s.start != pos || s.len == 0 {
                return bad(format!("image map: span at {} expected at {pos}", s.start));
            }
            pos = match s.start.checked_add(s.len) {
                Some(e) => e,
                None => return bad("image map: span past 2^64".into()),
            };
        }
        if pos != self.size {
            return bad(format!("image map: spans end at {pos}, size {}", self.size));
        }
        if let Some(c) = &self.changed {
            let mut last = 0u64;
            for (i, &(s, e)) in c.iter().enumerate() {
                if s >= e || (i > 0 && s < last) {
                    return bad("image map: changed ranges unsorted or empty".into());
                }
                last = e;
            }
        }
        Ok(())
    }

    /// What the export must say, ascending: the data of a full export; every
    /// changed range, split by what it holds now, of an incremental one.
    /// Adjacent pieces of one kind are merged.
    pub fn pieces(&self) -> Vec<Span> {
        let mut out: Vec<Span> = Vec::new();
        let mut push = |start: u64, end: u64, piece: Piece| {
            if start >= end {
                return;
            }
            if let Some(l) = out.last_mut()
                && l.end() == start
                && l.piece == piece
            {
                l.len += end - start;
                return;
            }
            out.push(Span {
                start,
                len: end - start,
                piece,
            });
        };
        match &self.changed {
            None => {
                for s in self.spans.iter().filter(|s| s.piece == Piece::Data) {
                    push(s.start, s.end(), Piece::Data);
                }
            }
            Some(changed) => {
                // Both lists are sorted: walk them together.
                let mut i = 0;
                for &(cs, ce) in changed {
                    let ce = ce.min(self.size);
                    while i < self.spans.len() && self.spans[i].end() <= cs {
                        i += 1;
                    }
                    let mut j = i;
                    while j < self.spans.len() && self.spans[j].start < ce {
                        let s = self.spans[j];
                        push(s.start.max(cs), s.end().min(ce), s.piece);
                        j += 1;
                    }
                }
            }
        }
        out
    }

    /// Whether any byte of `[start, end)` is data.
    pub fn has_data(&self, start: u64, end: u64) -> bool {
        let i = self.spans.partition_point(|s| s.end() <= start);
        self.spans[i..]
            .iter()
            .take_while(|s| s.start < end)
            .any(|s| s.piece == Piece::Data)
    }
}

/// Reads the image's bytes: `buf.len()` bytes at `off` (zeros where the
/// image holds none). Never called past the image's size.
pub trait ReadAt {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// An image in memory (tests, and small tools).
impl ReadAt for &[u8] {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = usize::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = self
            .get(off..off + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Progress sink: bytes of the image read so far, of how many.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Largest read from the source at once (and largest rbd `w` record).
pub const CHUNK: u64 = 4 << 20;

/// What an export did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub format: String,
    /// Bytes of the output (the file's apparent size, or the stream's length).
    pub bytes_written: u64,
    /// Bytes of image data read and written.
    pub data_bytes: u64,
    pub seconds: f64,
    /// `data_bytes` per second, in MiB.
    pub mib_per_s: f64,
}

impl Summary {
    pub(crate) fn finish(format: &str, started: Instant, bytes_written: u64, data: u64) -> Self {
        let seconds = started.elapsed().as_secs_f64();
        Summary {
            format: format.to_string(),
            bytes_written,
            data_bytes: data,
            seconds,
            mib_per_s: if seconds > 0.0 {
                data as f64 / (1 << 20) as f64 / seconds
            } else {
                0.0
            },
        }
    }
}

/// Bytes of data an export of `pieces` reads (for the progress total).
pub fn data_total(pieces: &[Span]) -> u64 {
    pieces
        .iter()
        .filter(|p| p.piece == Piece::Data)
        .map(|p| p.len)
        .sum()
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A map of `size` bytes from `(start, len, piece)` triples (gaps are holes).
    pub fn map(size: u64, parts: &[(u64, u64, Piece)], changed: Option<&[(u64, u64)]>) -> ImageMap {
        let mut spans = Vec::new();
        let mut pos = 0;
        for &(s, l, p) in parts {
            if s > pos {
                spans.push(Span {
                    start: pos,
                    len: s - pos,
                    piece: Piece::Hole,
                });
            }
            spans.push(Span {
                start: s,
                len: l,
                piece: p,
            });
            pos = s + l;
        }
        if pos < size {
            spans.push(Span {
                start: pos,
                len: size - pos,
                piece: Piece::Hole,
            });
        }
        let m = ImageMap {
            size,
            spans,
            changed: changed.map(|c| c.to_vec()),
        };
        assert!(m.validate().is_ok());
        m
    }

    /// Deterministic bytes.
    pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::map;
    use super::*;

    #[test]
    fn full_export_pieces_are_the_data() {
        let m = map(
            100,
            &[
                (10, 10, Piece::Data),
                (20, 5, Piece::Data),
                (30, 10, Piece::Zero),
            ],
            None,
        );
        assert_eq!(
            m.pieces(),
            vec![Span {
                start: 10,
                len: 15,
                piece: Piece::Data
            }]
        );
        assert!(m.has_data(0, 11));
        assert!(!m.has_data(25, 100));
    }

    #[test]
    fn incremental_pieces_split_changed_ranges_by_content() {
        let m = map(
            100,
            &[(10, 10, Piece::Data), (30, 10, Piece::Zero)],
            Some(&[(5, 15), (35, 120)]),
        );
        let p: Vec<_> = m
            .pieces()
            .iter()
            .map(|s| (s.start, s.len, s.piece))
            .collect();
        assert_eq!(
            p,
            vec![
                (5, 5, Piece::Hole),
                (10, 5, Piece::Data),
                (35, 5, Piece::Zero),
                (40, 60, Piece::Hole)
            ]
        );
    }

    #[test]
    fn validate_refuses_gaps_and_short_maps() {
        let mut m = map(100, &[(10, 10, Piece::Data)], None);
        m.size = 101;
        assert!(m.validate().is_err());
        m.size = 100;
        m.spans.remove(1);
        assert!(m.validate().is_err());
        let mut m = map(100, &[], None);
        m.changed = Some(vec![(5, 5)]);
        assert!(m.validate().is_err());
        m.changed = Some(vec![(5, 10), (8, 12)]);
        assert!(m.validate().is_err());
    }
}
