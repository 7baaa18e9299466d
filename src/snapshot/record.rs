//! Snapshot records: what the metadata store keeps of a snapshot, and where
//! its delta files live.
//!
//! A record (table `snapshots`, bincode in the metadata envelope, design.md
//! section 16.3) holds the frozen namespace (every inode's attributes, every
//! directory entry), the interval of changed blocks since the previous
//! snapshot, and where the delta file of each file lives ([`DeltaLoc`]: the
//! same bytes on every listed member, at `snap/<id>/<ino>.<seq>.vd`). bincode
//! writes fields and variants in declaration order: that order is the
//! on-disk format.
//!
//! Invariants a record must keep, checked on every load ([`SnapshotRecord::validate`]
//! for one record, [`check_records`] for the set): an id of at least 1, never
//! reused; the pool's block size; a base (`parent`) older than the record
//! itself, so that no chain of bases can loop; and, for a readable record
//! (pending or complete), a base that is present and complete.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::delta::DeltaId;
use super::ranges::RangeSet;
use crate::error::{FsError, FsResult};
use crate::pool::label::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::pool::meta::{InodeRecord, NodeKind, Timestamp, check_blob, encode_blob};
use crate::pool::{Pool, layout};

/// Directory of delta files in each member: `snap/<id>/<ino>.<seq>.vd`
/// ([`crate::pool::layout`] names every member file).
pub use crate::pool::layout::SNAP_DIR;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Full,
    Incremental,
    Differential,
}
impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
            Kind::Differential => "differential",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "full" => Some(Kind::Full),
            "incremental" | "incr" => Some(Kind::Incremental),
            "differential" | "diff" => Some(Kind::Differential),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Complete,
    Failed(String),
}

/// Where the delta of one file lives: the same bytes on every listed member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeltaLoc {
    pub members: Vec<u32>,
    /// Bumped when a merge rewrites the delta (the old file goes after the commit).
    pub seq: u32,
    /// Bytes of one copy of the delta file.
    pub stored: u64,
    /// Blocks the delta records (data, zero and hole entries).
    pub blocks: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SnapshotRecord {
    pub id: u64,
    pub name: String,
    pub kind: Kind,
    /// The snapshot this one's deltas are relative to (`None`: a full).
    pub parent: Option<u64>,
    pub created: Timestamp,
    pub state: State,
    pub block_size: u32,
    /// Every reachable inode as it was (extent lists left empty).
    pub inodes: BTreeMap<u64, InodeRecord>,
    pub dirents: BTreeMap<(u64, Vec<u8>), u64>,
    pub deltas: BTreeMap<u64, DeltaLoc>,
    /// Blocks changed between the previous snapshot and this one, per inode.
    pub interval: BTreeMap<u64, RangeSet>,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub changed_blocks: u64,
    /// A snapshot received from a stream: where it was taken. Its inode
    /// numbers are the origin's, its `interval` is empty, and the pool's own
    /// captures never build on it. Added in record payload version 2 (a
    /// version 1 payload ends before it: decoded as `None`).
    pub origin: Option<Origin>,
}

/// Where a received snapshot was taken (with the record's `created`, its
/// identity: [`crate::stream::format::Identity`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub pool: [u8; 16],
    pub id: u64,
}

/// The record as payload version 1 wrote it (before `origin`).
#[derive(Deserialize)]
struct RecordV1 {
    id: u64,
    name: String,
    kind: Kind,
    parent: Option<u64>,
    created: Timestamp,
    state: State,
    block_size: u32,
    inodes: BTreeMap<u64, InodeRecord>,
    dirents: BTreeMap<(u64, Vec<u8>), u64>,
    deltas: BTreeMap<u64, DeltaLoc>,
    interval: BTreeMap<u64, RangeSet>,
    logical_bytes: u64,
    stored_bytes: u64,
    changed_blocks: u64,
}

impl SnapshotRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode_blob(&bincode::serialize(self).unwrap_or_default())
    }

    /// Checks the envelope, decodes (bincode reading no further than the
    /// payload) and validates the record on its own ([`Self::validate`]).
    /// A version 1 payload (no `origin`) ends where version 2 reads the
    /// origin's tag, so the version 2 decode fails on it and the version 1
    /// decode takes it; a version 2 payload is never read as version 1 (the
    /// version 2 decode comes first and succeeds).
    pub fn decode(b: &[u8]) -> Result<SnapshotRecord, String> {
        let payload = check_blob(b)?;
        let r: SnapshotRecord = match crate::bytes::bincode_decode(payload) {
            Ok(r) => r,
            Err(e) => match crate::bytes::bincode_decode::<RecordV1>(payload) {
                Ok(v) => SnapshotRecord {
                    id: v.id,
                    name: v.name,
                    kind: v.kind,
                    parent: v.parent,
                    created: v.created,
                    state: v.state,
                    block_size: v.block_size,
                    inodes: v.inodes,
                    dirents: v.dirents,
                    deltas: v.deltas,
                    interval: v.interval,
                    logical_bytes: v.logical_bytes,
                    stored_bytes: v.stored_bytes,
                    changed_blocks: v.changed_blocks,
                    origin: None,
                },
                Err(_) => return Err(format!("snapshot record undecodable: {e}")),
            },
        };
        r.validate()?;
        Ok(r)
    }

    /// Whether this snapshot came from a stream (`vpool snapshot receive`).
    pub fn is_received(&self) -> bool {
        self.origin.is_some()
    }

    /// What a record must hold on its own: an id of at least 1, a block size
    /// a pool can have, and a base older than itself (so that no chain of
    /// bases can loop).
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("snapshot id 0".into());
        }
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(format!(
                "snapshot {}: block size {bs} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}",
                self.id
            ));
        }
        if let Some(p) = self.parent
            && (p == 0 || p >= self.id)
        {
            return Err(format!(
                "snapshot {}: base snapshot {p} is not an older snapshot",
                self.id
            ));
        }
        Ok(())
    }

    /// What the header of this snapshot's delta of `ino` must say.
    pub fn delta_id(&self, ino: u64) -> DeltaId {
        DeltaId {
            snap_id: self.id,
            base_id: self.parent.unwrap_or(0),
            ino,
            block_size: self.block_size,
        }
    }

    /// Size in blocks of `ino` here, `None` when it was not a file of this snapshot.
    pub(super) fn size_blocks(&self, ino: u64) -> Option<u64> {
        self.inodes
            .get(&ino)
            .filter(|r| r.kind == NodeKind::File)
            .map(|r| r.size.div_ceil(self.block_size as u64))
    }

    pub fn is_readable(&self) -> bool {
        matches!(self.state, State::Pending | State::Complete)
    }
}

/// One line of `vpool snapshot list`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: u64,
    pub name: String,
    pub kind: String,
    pub base: Option<String>,
    /// Unix seconds.
    pub created: i64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub changed_blocks: u64,
    pub state: String,
    /// Held against prune and delete (`vpool snapshot hold`).
    #[serde(default)]
    pub held: bool,
    /// Came from a stream (`vpool snapshot receive`).
    #[serde(default)]
    pub received: bool,
    /// Its identity on any pool (`POOL-UUID/ID@SECONDS`), as streams name it.
    #[serde(default)]
    pub identity: String,
}

/// What a snapshot name may be: a plain, visible directory name.
pub fn check_name(name: &str) -> FsResult<()> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > 255 {
        "is longer than 255 bytes"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.starts_with('.') {
        "starts with '.'"
    } else if name.bytes().any(crate::util::is_control) {
        "contains a control character (newline, tab, escape, NUL, ...)"
    } else {
        return Ok(());
    };
    Err(FsError::Message(format!(
        "snapshot name \"{}\" {why}",
        name.escape_debug()
    )))
}

/// Checks the loaded records together, in id order: each is stored under
/// its own id, has the pool's block size `bs`, and, when readable (pending or
/// complete), has its base among the good records and complete (a failed
/// record's base may be gone: deleting a snapshot leaves its failed children
/// as they are). Bases are older than their snapshot ([`SnapshotRecord::validate`]),
/// so no chain loops. Returns the good records and, for every other one, why.
#[allow(clippy::type_complexity)]
pub fn check_records(
    recs: BTreeMap<u64, SnapshotRecord>,
    bs: u32,
) -> (BTreeMap<u64, Arc<SnapshotRecord>>, Vec<(u64, String)>) {
    let mut good: BTreeMap<u64, Arc<SnapshotRecord>> = BTreeMap::new();
    let mut bad = Vec::new();
    for (key, r) in recs {
        let why = if r.id != key {
            Some(format!("record {key} holds snapshot {}", r.id))
        } else if let Err(e) = r.validate() {
            Some(e)
        } else if r.block_size != bs {
            Some(format!(
                "snapshot {}: block size {} differs from the pool's {bs}",
                r.id, r.block_size
            ))
        } else {
            match r.parent {
                Some(p) if r.is_readable() => match good.get(&p) {
                    None => Some(format!(
                        "snapshot {}: its base snapshot {p} is missing or unreadable",
                        r.id
                    )),
                    Some(b) if b.state != State::Complete => Some(format!(
                        "snapshot {}: its base snapshot {p} is not complete",
                        r.id
                    )),
                    Some(_) => None,
                },
                _ => None,
            }
        };
        match why {
            Some(why) => bad.push((key, why)),
            None => {
                good.insert(key, Arc::new(r));
            }
        }
    }
    (good, bad)
}

/// The directory of snapshot `id`'s deltas on `member` (`None`: no such member).
pub(super) fn delta_dir(pool: &Pool, member: u32, id: u64) -> Option<PathBuf> {
    pool.member(member)
        .map(|m| layout::snapshot_dir(&m.dir, id))
}

/// The copy on `member` of the delta of `ino` in snapshot `id`, version `seq`.
pub(super) fn delta_path(pool: &Pool, member: u32, id: u64, ino: u64, seq: u32) -> Option<PathBuf> {
    delta_dir(pool, member, id).map(|d| d.join(layout::delta_file_name(ino, seq)))
}

/// The members that get the copies of a new delta, chosen as extents' copies
/// are: the pool's `copies` distinct members, fewer only when the pool is
/// degraded (at least one). Every new delta is placed by this function, by a
/// capture and by a merge alike.
pub(super) fn place_delta(pool: &Pool) -> FsResult<Vec<u32>> {
    let copies = pool.config().copies.max(1) as usize;
    let mut members = Vec::new();
    while members.len() < copies {
        match pool.place(&members, 0) {
            Ok(m) => members.push(m),
            // Degraded (fewer usable members than copies): as many as there are.
            Err(_) if !members.is_empty() && pool.degraded() => break,
            Err(e) => return Err(e),
        }
    }
    Ok(members)
}

/// Creates the directories of a new delta of `ino` in snapshot `id`,
/// version `seq`, on `members`, and returns the paths of its copies.
pub(super) fn prepare_delta_paths(
    pool: &Pool,
    members: &[u32],
    id: u64,
    ino: u64,
    seq: u32,
) -> FsResult<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for m in members {
        let dir = delta_dir(pool, *m, id)
            .ok_or_else(|| FsError::corrupt(format!("unknown member {m}")))?;
        crate::storage::create_dir_all(pool.storage(), &dir).map_err(FsError::Io)?;
        paths.push(dir.join(layout::delta_file_name(ino, seq)));
    }
    Ok(paths)
}

/// Makes a delta directory durable with the names in it: the directory,
/// `snap/` and the member directory are synced, since writing a new delta
/// may have created the first two.
pub(super) fn sync_delta_dir(pool: &Pool, dir: &Path) -> io::Result<()> {
    let storage = pool.storage();
    dir.ancestors()
        .take(3)
        .try_for_each(|d| storage.sync_dir(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, parent: Option<u64>, state: State) -> SnapshotRecord {
        SnapshotRecord {
            id,
            name: format!("s{id}"),
            kind: if parent.is_some() {
                Kind::Incremental
            } else {
                Kind::Full
            },
            parent,
            created: Timestamp::default(),
            state,
            block_size: 4096,
            inodes: BTreeMap::new(),
            dirents: BTreeMap::new(),
            deltas: BTreeMap::new(),
            interval: BTreeMap::new(),
            logical_bytes: 0,
            stored_bytes: 0,
            changed_blocks: 0,
            origin: None,
        }
    }

    /// Issue 10: a record with block size 0 (its reads divided by it) or a
    /// base that is not older (a cycle of bases hung every read) decoded.
    #[test]
    fn decode_refuses_bad_sizes_and_bases() {
        let ok = rec(5, Some(3), State::Complete);
        let r = SnapshotRecord::decode(&ok.encode()).unwrap();
        assert_eq!((r.id, r.parent, r.block_size), (5, Some(3), 4096));
        let bad = |r: SnapshotRecord, want: &str| {
            let e = SnapshotRecord::decode(&r.encode()).unwrap_err();
            assert!(e.contains(want), "{e} (want {want:?})");
        };
        for bs in [0, 1, 511, 4095, 2 << 20, u32::MAX] {
            bad(
                SnapshotRecord {
                    block_size: bs,
                    ..ok.clone()
                },
                &format!("block size {bs} is not"),
            );
        }
        bad(
            rec(5, Some(5), State::Complete),
            "base snapshot 5 is not an older",
        );
        bad(
            rec(5, Some(9), State::Failed("x".into())),
            "base snapshot 9",
        );
        bad(rec(5, Some(0), State::Complete), "base snapshot 0");
        bad(rec(0, None, State::Complete), "snapshot id 0");
        // A length field beyond the payload (checksum valid).
        let payload = bincode::serialize(&ok).unwrap();
        let mut p = payload.clone();
        p[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // the name's length
        let e = SnapshotRecord::decode(&encode_blob(&p)).unwrap_err();
        assert!(e.contains("undecodable"), "{e}");
    }

    /// Records are checked together: stored under their own id, the pool's
    /// block size, readable ones on a complete base that is there. A cycle of
    /// bases (which hung `chain`) is refused, and a long chain is fine.
    #[test]
    fn check_records_finds_bad_sets() {
        let ids = |v: &[(u64, String)]| v.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        let set = |v: Vec<SnapshotRecord>| -> BTreeMap<u64, SnapshotRecord> {
            v.into_iter().map(|r| (r.id, r)).collect()
        };
        // A cycle 2 -> 3 -> 2 (and 4 on it): all out, none loops.
        let mut recs = set(vec![
            rec(1, None, State::Complete),
            rec(2, Some(3), State::Complete),
            rec(3, Some(2), State::Complete),
            rec(4, Some(3), State::Complete),
        ]);
        let (good, bad) = check_records(recs.clone(), 4096);
        assert_eq!(good.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(ids(&bad), vec![2, 3, 4]);
        assert!(
            bad[0].1.contains("base snapshot 3 is not an older"),
            "{bad:?}"
        );
        assert!(bad[1].1.contains("missing or unreadable"), "{bad:?}");
        // Missing base: a complete record is out, a failed one stays.
        recs = set(vec![
            rec(2, Some(1), State::Complete),
            rec(3, Some(1), State::Failed("x".into())),
            rec(4, Some(3), State::Pending),
            rec(5, None, State::Complete),
        ]);
        let mut wrong_key = rec(6, None, State::Complete);
        wrong_key.id = 7;
        recs.insert(6, wrong_key);
        let mut other_bs = rec(8, None, State::Complete);
        other_bs.block_size = 512;
        recs.insert(8, other_bs);
        let (good, bad) = check_records(recs, 4096);
        assert_eq!(good.keys().copied().collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(ids(&bad), vec![2, 4, 6, 8]);
        assert!(
            bad[1].1.contains("base snapshot 3 is not complete"),
            "{bad:?}"
        );
        assert!(bad[2].1.contains("record 6 holds snapshot 7"), "{bad:?}");
        assert!(
            bad[3]
                .1
                .contains("block size 512 differs from the pool's 4096"),
            "{bad:?}"
        );
        // A long chain.
        let mut v = vec![rec(1, None, State::Complete)];
        v.extend((2..20_000).map(|i| rec(i, Some(i - 1), State::Complete)));
        let (good, bad) = check_records(set(v), 4096);
        assert_eq!((good.len(), bad.len()), (19_999, 0));
    }

    #[test]
    fn names() {
        assert!(check_name("daily-1").is_ok());
        for bad in ["a\nb", "a\0b", "\x1b[31mred", "tab\there", "del\x7f"] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("control character"), "{bad:?}: {e}");
        }
        for bad in ["", ".hidden", "..", "a/b", "."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let parse = crate::pool::layout::parse_delta_file_name;
        assert_eq!(parse("12.3.vd"), Some((12, 3)));
        assert_eq!(parse("x.vd"), None);
    }
}
