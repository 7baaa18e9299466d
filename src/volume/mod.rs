//! A file's data: its extent map and the read/write/punch/seek path.
//!
//! The life of an extent: a write lands in extent `i` (bytes `[i*E, (i+1)*E)`) of
//! a file that has none there; the pool places its copies (one per `copies`, on
//! distinct members) and creates the sparse member files
//! `data/<ino>.<i>.<file_id>`; data is written at the same offset within them as
//! within the extent, so holes stay holes. Every write goes to every copy; reads
//! are served by the first copy that answers. The extent is `fresh` until a
//! durable commit has fsynced its directory entries, and `dirty` until its data
//! has been fdatasynced. It leaves the map on truncate or delete, and its files
//! are removed only after the commit that dropped it is durable.
//!
//! Every change to an extent (write, punch, zero range, preallocation, a cut by
//! truncate) is preceded, the first time since the last commit, by a durable
//! write-intent record (pool/intent.rs), and marks its blocks in the volume's
//! changed-block bitmap (CBT), which the commit persists per extent and a
//! snapshot takes over as its interval of changes.
//!
//! Locking: the map is behind an `RwLock` taken for reading on every I/O and for
//! writing only to add or drop extents; member file I/O is positional
//! (`pread`/`pwrite`) and runs without any lock held. The caller (fs core)
//! holds its write gate for reading around every change, so the intent tag
//! cannot move while a change is in flight.
//!
//! One job per file:
//! - extent.rs: the extent map and the extents in it (copies, flags, intent);
//! - stripes.rs: the stripe locks and the block checksum tables;
//! - cbt.rs: changed-block tracking;
//! - read.rs: verified reads, read repair, capture, SEEK_DATA/SEEK_HOLE;
//! - write.rs: writes, punches, zero ranges, preallocation, truncation,
//!   and the fdatasync of written extents;
//! - resync.rs: moving and dropping copies, resync after a crash, scrub;
//! - raw.rs: the member-file calls underneath (full reads, data ranges,
//!   errno mapping);
//! - buffers.rs: the aligned memory member I/O goes through, and the reply
//!   buffers of reads.

mod ahead;
mod buffers;
mod cbt;
mod extent;
mod raw;
mod read;
mod resync;
mod stripes;
mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::pool::ExtentFile;
use crate::pool::meta::ExtentRecord;
use crate::pool::sums;
use cbt::Cbt;

pub use buffers::ReadBuf;
pub use extent::{Extent, ExtentCopy};
pub use resync::ScrubCounts;

/// How a write reaches the member files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Through the members' page cache: it absorbs small writes, and the
    /// next fdatasync of the extent makes them durable.
    Cached,
    /// Past the members' page cache where aligned (an `O_DIRECT` open's:
    /// its data does not belong in the host's cache).
    Direct,
    /// A long write of a cached open (the writeback of a sequential
    /// writer's pages): through the members' cache, its writeback started
    /// at once; after the stripe lock, the pool's drain waits for that
    /// writeback and drops its pages (a second copy in the members' cache
    /// only takes memory, costly where the host backs guest memory on first
    /// touch; docs/perf, changes 16 and 17). The member
    /// filesystem writes long runs at depth (delayed allocation), where
    /// direct writes into new space wait on each other (ext4 takes the
    /// inode lock for those): 1 GiB written and fsynced went from 0.69 to
    /// 0.79 of the plain directory's speed (docs/perf, change 7).
    Stream,
    /// A short write of a mount with the writeback cache (the writeback of
    /// a page the mount still holds): through the members' cache, its
    /// extent's writeback started once 1 MiB of such writes have gathered
    /// (`BEHIND_BATCH`, volume/write.rs), and then the extent handed to the
    /// drain, which drops its clean member pages (the mount holds the page:
    /// a second copy only takes memory; docs/perf, change 21). Left dirty,
    /// the page would count twice against the host's dirty limit (once in
    /// the mount's cache, once in the members'), and a random writer reached
    /// that limit and was throttled for up to 660 ms during a snapshot; with
    /// write-behind its longest stall was 39 ms (docs/perf, change 9).
    Behind,
    /// [`WriteMode::Behind`] with the member pages kept: a mount whose
    /// opens all go through the members' cache (`odirect=cached`).
    BehindKept,
}

/// A range of blocks as a snapshot captures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub count: u64,
    /// The blocks' bytes; `None`: a hole.
    pub data: Option<Vec<u8>>,
}

impl Segment {
    pub fn new(start: u64, count: u64, data: Option<Vec<u8>>) -> Segment {
        Segment { start, count, data }
    }

    pub fn contains(&self, block: u64) -> bool {
        self.start <= block && block < self.start + self.count
    }
}

pub struct Volume {
    pub ino: u64,
    esize: u64,
    /// Block size: the unit of changed-block tracking.
    bs: u64,
    map: RwLock<BTreeMap<u64, Arc<Extent>>>,
    cbt: Mutex<Cbt>,
    /// Checksum of an all-zero block (holes, punched and never-written blocks).
    zcrc: u32,
    /// Changes begun to the blocks or the map: bumped under every exclusive
    /// stripe lock and every write lock of the map ([`Volume::changed`]).
    /// What a read-ahead slot is checked against (ahead.rs).
    changes: AtomicU64,
    ahead: ahead::Ahead,
}

/// An extent file that can be removed once the commit dropping it is durable.
/// The same identity as a live one ([`ExtentFile`]); the name says what the
/// caller may do with it.
pub type DeadExtent = ExtentFile;

/// One piece of an I/O split at extent boundaries.
struct Piece {
    index: u64,
    /// Offset within the extent.
    within: u64,
    len: usize,
    /// Offset within the caller's buffer.
    buf_off: usize,
}

/// `len` clipped to a file of `size` bytes at `off` (0 past the end).
fn clip(off: u64, len: usize, size: u64) -> usize {
    if off >= size {
        0
    } else {
        (len as u64).min(size - off) as usize
    }
}

fn pieces(esize: u64, off: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut pos = off;
    let end = off + len as u64;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / esize;
        let within = pos % esize;
        let n = (esize - within).min(end - pos);
        let p = Piece {
            index,
            within,
            len: n as usize,
            buf_off: (pos - off) as usize,
        };
        pos += n;
        Some(p)
    })
}

impl Volume {
    /// `cbt`: the persisted changed-block bitmaps of this file, per extent index
    /// (little-endian `u64` words, bit `b % 64` of word `b / 64`).
    pub fn new(
        ino: u64,
        esize: u64,
        bs: u64,
        records: &[ExtentRecord],
        cbt: impl IntoIterator<Item = (u64, Vec<u64>)>,
    ) -> Volume {
        let map = records
            .iter()
            .filter(|r| !r.members.is_empty())
            .map(|r| {
                (
                    r.index,
                    Arc::new(Extent::new(r.index, r.file_id, r.members.clone(), false)),
                )
            })
            .collect();
        Volume {
            ino,
            esize,
            bs,
            map: RwLock::new(map),
            cbt: Mutex::new(Cbt {
                bits: cbt.into_iter().collect(),
                dirty: BTreeSet::new(),
            }),
            zcrc: sums::zero_crc(bs as usize),
            changes: AtomicU64::new(0),
            ahead: ahead::Ahead::default(),
        }
    }

    /// Counts a change to the blocks or the map as begun; called with the
    /// blocks' stripes or the map held exclusively.
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn blocks_per_extent(&self) -> u64 {
        self.esize / self.bs
    }

    pub fn block_size(&self) -> u64 {
        self.bs
    }
}
