//! Chain resolution: which snapshot level supplies each block of a file.
//!
//! A chain for one file is a list of [`Level`]s from newest (index 0) to
//! oldest. Block `b < L0.size_blocks` resolves by walking the levels
//! `i = 0, 1, ..`:
//! - level `i` has no file (`size_blocks` is `None`) or `b >= size_blocks_i`:
//!   a hole (the file did not reach that far then, so nothing older shows);
//! - level `i` has an entry covering `b`: that entry (data, zero or hole);
//! - otherwise the next level decides.
//!
//! A block that falls through the last level is *unresolved*.
//!
//! [`flatten`] works on intervals, never block by block: it resolves
//! `[0, size_0)` against level 0's entries, and each gap between them against
//! level 1, and so on, emitting runs in ascending order. Its cost is
//! `O(E + G·log E)` where `E` is the total number of entries and `G` the number
//! of gaps passed down (at most `E + 1` per level), plus the output.

use super::delta::{Entry, EntryKind};

/// One snapshot of the file in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Level<'a> {
    pub snap_id: u64,
    /// File size in blocks at that snapshot; `None`: the file did not exist.
    pub size_blocks: Option<u64>,
    /// The snapshot's delta entries, sorted by start and not overlapping.
    pub entries: &'a [Entry],
}

/// What a block resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Unallocated (reads as zeros).
    Hole,
    /// Allocated, reads as zeros.
    Zero,
    /// Stored in `entry`'s frame of the delta of `snap_id`; block `b` is at
    /// `(b - entry.start) * block_size` in the decompressed frame.
    Data { snap_id: u64, entry: Entry },
}

/// Blocks `[start, start + count)` resolve to `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub count: u64,
    pub source: Source,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.start + self.count
    }
}

/// Appends a run, merging it into the last one when adjacent with an equal
/// source. Keeps the output invariant: sorted, non-empty, no two adjacent runs
/// with the same source.
fn emit(out: &mut Vec<Run>, start: u64, end: u64, source: Source) {
    if start >= end {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.end() == start
        && last.source == source
    {
        last.count += end - start;
        return;
    }
    out.push(Run {
        start,
        count: end - start,
        source,
    });
}

/// Pending work on the explicit stack (a chain may be long, so no recursion).
enum Task {
    /// Resolve `[pos, end)` at level `level`; `idx` is the next entry of the
    /// level that may cover `pos` (entries before it end at or before `pos`).
    Resolve {
        level: usize,
        pos: u64,
        end: u64,
        idx: usize,
    },
    /// Emit a hole run `[start, end)`: the part of a range past a level's size.
    Hole { start: u64, end: u64 },
}

/// Pushes the tasks resolving `[start, end)` at `level`: the part below the
/// level's size is resolved against its entries, the rest is a hole, emitted
/// after it (so pushed first).
fn push_range(stack: &mut Vec<Task>, levels: &[Level], level: usize, start: u64, end: u64) {
    let cap = levels[level].size_blocks.unwrap_or(0).min(end);
    if cap < end {
        stack.push(Task::Hole {
            start: start.max(cap),
            end,
        });
    }
    if start < cap {
        let entries = levels[level].entries;
        let idx = entries.partition_point(|e| e.end() <= start);
        stack.push(Task::Resolve {
            level,
            pos: start,
            end: cap,
            idx,
        });
    }
}

/// Runs covering `[0, size_blocks of levels[0])` in ascending order, adjacent
/// runs with an equal source merged (data runs only for the same snapshot and
/// entry). Unresolved blocks are holes if `unresolved_as_hole`, else they get
/// no run (gaps in the output). Empty if there is no level or the newest level
/// has no file.
///
/// Entries of each level must be sorted and not overlapping; otherwise the
/// result is unspecified (but this never panics or loops).
pub fn flatten(levels: &[Level], unresolved_as_hole: bool) -> Vec<Run> {
    let mut out = Vec::new();
    let Some(size) = levels.first().and_then(|l| l.size_blocks) else {
        return out;
    };
    let mut stack = Vec::new();
    push_range(&mut stack, levels, 0, 0, size);
    while let Some(task) = stack.pop() {
        let (level, mut pos, end, mut idx) = match task {
            Task::Hole { start, end } => {
                emit(&mut out, start, end, Source::Hole);
                continue;
            }
            Task::Resolve {
                level,
                pos,
                end,
                idx,
            } => (level, pos, end, idx),
        };
        let l = &levels[level];
        while pos < end {
            while idx < l.entries.len() && l.entries[idx].end() <= pos {
                idx += 1;
            }
            match l.entries.get(idx) {
                // An entry covers `pos`: it decides up to its end.
                Some(e) if e.start <= pos => {
                    let stop = e.end().min(end);
                    let source = match e.kind {
                        EntryKind::Data => Source::Data {
                            snap_id: l.snap_id,
                            entry: *e,
                        },
                        EntryKind::Zero => Source::Zero,
                        EntryKind::Hole => Source::Hole,
                    };
                    emit(&mut out, pos, stop, source);
                    pos = stop;
                }
                // A gap up to the next entry (or the end): the next level
                // decides; resolve it before continuing here.
                next => {
                    let stop = next.map_or(end, |e| e.start.min(end));
                    if level + 1 < levels.len() {
                        if stop < end {
                            stack.push(Task::Resolve {
                                level,
                                pos: stop,
                                end,
                                idx,
                            });
                        }
                        push_range(&mut stack, levels, level + 1, pos, stop);
                        break;
                    }
                    if unresolved_as_hole {
                        emit(&mut out, pos, stop, Source::Hole);
                    }
                    pos = stop;
                }
            }
        }
    }
    out
}

/// The run containing `block`, if any (`runs` sorted, as [`flatten`] returns).
pub fn lookup(runs: &[Run], block: u64) -> Option<&Run> {
    let i = runs.partition_point(|r| r.start <= block);
    let r = runs.get(i.checked_sub(1)?)?;
    (block < r.end()).then_some(r)
}

/// Blocks that are allocated (data or zero).
pub fn allocated_blocks(runs: &[Run]) -> u64 {
    runs.iter()
        .filter(|r| !matches!(r.source, Source::Hole))
        .map(|r| r.count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(start: u64, count: u32, kind: EntryKind) -> Entry {
        let data = kind == EntryKind::Data;
        Entry {
            start,
            count,
            kind,
            offset: if data { 64 + start * 10 } else { 0 },
            clen: if data { 10 } else { 0 },
            crc: if data { start as u32 } else { 0 },
        }
    }

    /// The rule of the module doc, block by block. `None`: unresolved.
    fn naive(levels: &[Level], b: u64) -> Option<Source> {
        for l in levels {
            match l.size_blocks {
                Some(size) if b < size => {}
                _ => return Some(Source::Hole),
            }
            if let Some(e) = l.entries.iter().find(|e| e.start <= b && b < e.end()) {
                return Some(match e.kind {
                    EntryKind::Data => Source::Data {
                        snap_id: l.snap_id,
                        entry: *e,
                    },
                    EntryKind::Zero => Source::Zero,
                    EntryKind::Hole => Source::Hole,
                });
            }
        }
        None
    }

    /// Checks `runs` against the naive resolver and the output invariants.
    fn check(levels: &[Level], unresolved_as_hole: bool) -> Result<(), TestCaseError> {
        let runs = flatten(levels, unresolved_as_hole);
        let size = levels.first().and_then(|l| l.size_blocks).unwrap_or(0);
        for r in &runs {
            prop_assert!(r.count > 0);
            prop_assert!(r.end() <= size);
        }
        for w in runs.windows(2) {
            prop_assert!(w[0].end() <= w[1].start, "unsorted or overlapping: {:?}", w);
            prop_assert!(
                !(w[0].end() == w[1].start && w[0].source == w[1].source),
                "unmerged: {:?}",
                w
            );
        }
        let mut allocated = 0;
        for b in 0..size + 2 {
            let want = if b < size {
                match naive(levels, b) {
                    None if unresolved_as_hole => Some(Source::Hole),
                    s => s,
                }
            } else {
                None
            };
            let got = lookup(&runs, b).map(|r| r.source);
            prop_assert_eq!(got, want, "block {}", b);
            if matches!(want, Some(Source::Zero | Source::Data { .. })) {
                allocated += 1;
            }
        }
        prop_assert_eq!(allocated_blocks(&runs), allocated);
        Ok(())
    }

    #[test]
    fn basic_chain() {
        // L0: 10 blocks, data at 2..4; L1: 8 blocks, zero 0..3, hole 6..7;
        // L2: 12 blocks, data 0..12 (one entry) — but L1 is only 8 long.
        let l0 = [entry(2, 2, EntryKind::Data)];
        let l1 = [entry(0, 3, EntryKind::Zero), entry(6, 1, EntryKind::Hole)];
        let l2 = [entry(0, 12, EntryKind::Data)];
        let levels = [
            Level {
                snap_id: 30,
                size_blocks: Some(10),
                entries: &l0,
            },
            Level {
                snap_id: 20,
                size_blocks: Some(8),
                entries: &l1,
            },
            Level {
                snap_id: 10,
                size_blocks: Some(12),
                entries: &l2,
            },
        ];
        let runs = flatten(&levels, false);
        let d0 = Source::Data {
            snap_id: 30,
            entry: l0[0],
        };
        let d2 = Source::Data {
            snap_id: 10,
            entry: l2[0],
        };
        let expect = vec![
            Run {
                start: 0,
                count: 2,
                source: Source::Zero,
            },
            Run {
                start: 2,
                count: 2,
                source: d0,
            },
            Run {
                start: 4,
                count: 2,
                source: d2,
            },
            Run {
                start: 6,
                count: 1,
                source: Source::Hole,
            },
            Run {
                start: 7,
                count: 1,
                source: d2,
            },
            Run {
                start: 8,
                count: 2,
                source: Source::Hole,
            },
        ];
        assert_eq!(runs, expect);
        assert_eq!(allocated_blocks(&runs), 7);
        assert_eq!(lookup(&runs, 3).map(|r| r.start), Some(2));
        assert_eq!(lookup(&runs, 10), None);
        // Without the oldest level, 4..6 and 7 are unresolved.
        let runs = flatten(&levels[..2], false);
        assert_eq!(
            runs.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 2), (2, 2), (6, 1), (8, 2)]
        );
        let runs = flatten(&levels[..2], true);
        assert_eq!(
            runs.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 2), (2, 2), (4, 6)]
        );
    }

    #[test]
    fn no_file_or_no_levels() {
        assert!(flatten(&[], true).is_empty());
        let levels = [Level {
            snap_id: 1,
            size_blocks: None,
            entries: &[],
        }];
        assert!(flatten(&levels, true).is_empty());
        let levels = [
            Level {
                snap_id: 2,
                size_blocks: Some(5),
                entries: &[],
            },
            Level {
                snap_id: 1,
                size_blocks: None,
                entries: &[],
            },
        ];
        assert_eq!(
            flatten(&levels, false),
            vec![Run {
                start: 0,
                count: 5,
                source: Source::Hole
            }]
        );
    }

    #[test]
    fn large_sizes_are_not_walked_block_by_block() {
        let big = 1u64 << 60;
        let l1 = [entry(big - 10, 4, EntryKind::Data)];
        let levels = [
            Level {
                snap_id: 2,
                size_blocks: Some(big),
                entries: &[],
            },
            Level {
                snap_id: 1,
                size_blocks: Some(big),
                entries: &l1,
            },
        ];
        let runs = flatten(&levels, true);
        assert_eq!(runs.len(), 3);
        assert_eq!(allocated_blocks(&runs), 4);
    }

    /// A level: maybe no file, a size, and sorted non-overlapping entries laid
    /// out from (gap, count, kind) triples, possibly past the size.
    fn level() -> impl Strategy<Value = (Option<u64>, Vec<Entry>)> {
        let kind = prop_oneof![
            Just(EntryKind::Data),
            Just(EntryKind::Zero),
            Just(EntryKind::Hole)
        ];
        (
            prop_oneof![1 => Just(None), 5 => (0u64..=64).prop_map(Some)],
            prop::collection::vec((0u64..6, 1u32..10, kind), 0..10),
        )
            .prop_map(|(size, parts)| {
                let mut pos = 0;
                let mut entries = Vec::new();
                for (gap, count, kind) in parts {
                    pos += gap;
                    entries.push(entry(pos, count, kind));
                    pos += u64::from(count);
                }
                (size, entries)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn matches_naive_resolver(chain in prop::collection::vec(level(), 1..=4)) {
            let levels: Vec<Level> = chain
                .iter()
                .enumerate()
                .map(|(i, (size, entries))| Level {
                    snap_id: 100 - i as u64,
                    size_blocks: *size,
                    entries,
                })
                .collect();
            check(&levels, false)?;
            check(&levels, true)?;
        }
    }
}
