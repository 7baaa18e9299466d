//! The byte maps of `docs/design.md`, pinned: each test encodes a sample
//! record through the public encoder and checks every offset and value the
//! document gives (section 5, the inode record; section 16.3, the snapshot
//! record; section 20.1, the operational record's envelope). A change of
//! encoding that the document does not follow fails here.

use std::collections::BTreeMap;

use vpool::pool::meta::{
    ExtentRecord, InodeRecord, NodeKind, Timestamp, check_blob, decode_record, encode_record,
};
use vpool::snapshot::ranges::RangeSet;
use vpool::snapshot::{DeltaLoc, Kind, Origin, SnapshotRecord, State};

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn inode() -> InodeRecord {
    let mut xattrs = BTreeMap::new();
    xattrs.insert(b"user.a".to_vec(), b"xy".to_vec());
    InodeRecord {
        kind: NodeKind::Symlink,
        mode: 0o4755,
        uid: 1000,
        gid: 100,
        nlink: 2,
        size: 0x0102_0304_0506,
        atime: Timestamp { secs: -5, nanos: 7 },
        mtime: Timestamp {
            secs: 11,
            nanos: 13,
        },
        ctime: Timestamp {
            secs: 17,
            nanos: 19,
        },
        rdev: 0x0801,
        parent: 0,
        target: b"tgt".to_vec(),
        xattrs,
        extents: vec![ExtentRecord {
            index: 3,
            file_id: 9,
            members: vec![4, 6],
        }],
    }
}

/// Section 5: the record envelope and the `InodeRecord` payload offsets.
#[test]
fn inode_record_byte_map() {
    let b = encode_record(&inode());
    assert_eq!(u16_at(&b, 0), 1, "record version");
    assert_eq!(u16_at(&b, 2), 0, "reserved");
    assert_eq!(
        u32_at(&b, 4),
        crc32c::crc32c(&b[8..]),
        "CRC-32C of the payload"
    );
    let p = &b[8..];
    assert_eq!(u32_at(p, 0), 2, "kind Symlink = 2");
    assert_eq!(u32_at(p, 4), 0o4755, "mode");
    assert_eq!(u32_at(p, 8), 1000, "uid");
    assert_eq!(u32_at(p, 12), 100, "gid");
    assert_eq!(u32_at(p, 16), 2, "nlink");
    assert_eq!(u64_at(p, 20), 0x0102_0304_0506, "size");
    assert_eq!((u64_at(p, 28) as i64, u32_at(p, 36)), (-5, 7), "atime");
    assert_eq!((u64_at(p, 40), u32_at(p, 48)), (11, 13), "mtime");
    assert_eq!((u64_at(p, 52), u32_at(p, 60)), (17, 19), "ctime");
    assert_eq!(u32_at(p, 64), 0x0801, "rdev");
    assert_eq!(u64_at(p, 68), 0, "parent");
    assert_eq!(u64_at(p, 76), 3, "target length");
    assert_eq!(&p[84..87], b"tgt");
    let mut o = 87;
    assert_eq!(u64_at(p, o), 1, "xattr count");
    o += 8;
    assert_eq!(u64_at(p, o), 6);
    assert_eq!(&p[o + 8..o + 14], b"user.a");
    o += 14;
    assert_eq!(u64_at(p, o), 2);
    assert_eq!(&p[o + 8..o + 10], b"xy");
    o += 10;
    assert_eq!(u64_at(p, o), 1, "extent count");
    o += 8;
    // ExtentRecord: index, file_id, member count, u32 ids: 24 + 4 x copies.
    assert_eq!(
        (u64_at(p, o), u64_at(p, o + 8), u64_at(p, o + 16)),
        (3, 9, 2)
    );
    assert_eq!((u32_at(p, o + 24), u32_at(p, o + 28)), (4, 6));
    assert_eq!(p.len(), o + 24 + 4 * 2, "nothing after the extents");
    assert_eq!(decode_record(&b).unwrap(), inode());
}

/// Section 16.3: the `SnapshotRecord` payload, field by field.
#[test]
fn snapshot_record_byte_map() {
    let mut inodes = BTreeMap::new();
    let mut ino = inode();
    ino.extents.clear();
    inodes.insert(5u64, ino.clone());
    let mut dirents = BTreeMap::new();
    dirents.insert((1u64, b"f".to_vec()), 5u64);
    let mut deltas = BTreeMap::new();
    deltas.insert(
        5u64,
        DeltaLoc {
            members: vec![2],
            seq: 3,
            stored: 4096,
            blocks: 8,
        },
    );
    let mut interval = BTreeMap::new();
    interval.insert(5u64, RangeSet::from_ranges(&[(0, 4), (10, 12)]));
    let rec = SnapshotRecord {
        id: 7,
        name: "nightly".into(),
        kind: Kind::Incremental,
        parent: Some(6),
        created: Timestamp {
            secs: 1_700_000_000,
            nanos: 5,
        },
        state: State::Failed("disk".into()),
        block_size: 4096,
        inodes,
        dirents,
        deltas,
        interval,
        logical_bytes: 100,
        stored_bytes: 200,
        changed_blocks: 6,
        origin: Some(Origin {
            pool: [9; 16],
            id: 41,
        }),
    };
    let b = rec.encode();
    assert_eq!(u16_at(&b, 0), 1, "envelope version");
    let p = check_blob(&b).unwrap();
    let mut o = 0;
    let mut take = |n: usize| {
        let at = o;
        o += n;
        at
    };
    assert_eq!(u64_at(p, take(8)), 7, "id");
    assert_eq!(u64_at(p, take(8)), 7, "name length");
    assert_eq!(&p[take(7)..][..7], b"nightly");
    assert_eq!(u32_at(p, take(4)), 1, "kind Incremental = 1");
    assert_eq!(p[take(1)], 1, "parent: Some");
    assert_eq!(u64_at(p, take(8)), 6, "parent id");
    assert_eq!(u64_at(p, take(8)), 1_700_000_000, "created seconds");
    assert_eq!(u32_at(p, take(4)), 5, "created nanoseconds");
    assert_eq!(u32_at(p, take(4)), 2, "state Failed = 2");
    assert_eq!(u64_at(p, take(8)), 4, "reason length");
    assert_eq!(&p[take(4)..][..4], b"disk");
    assert_eq!(u32_at(p, take(4)), 4096, "block size");
    assert_eq!(u64_at(p, take(8)), 1, "inode count");
    assert_eq!(u64_at(p, take(8)), 5, "inode number");
    let inode_payload = bincode::serialize(&ino).unwrap();
    let at = take(inode_payload.len());
    assert_eq!(
        &p[at..at + inode_payload.len()],
        &inode_payload[..],
        "inode record inline"
    );
    assert_eq!(u64_at(p, take(8)), 1, "dirent count");
    assert_eq!(u64_at(p, take(8)), 1, "dirent parent");
    assert_eq!(u64_at(p, take(8)), 1, "name length");
    assert_eq!(p[take(1)], b'f');
    assert_eq!(u64_at(p, take(8)), 5, "child");
    assert_eq!(u64_at(p, take(8)), 1, "delta count");
    assert_eq!(u64_at(p, take(8)), 5, "delta inode");
    assert_eq!(u64_at(p, take(8)), 1, "member count");
    assert_eq!(u32_at(p, take(4)), 2, "member id");
    assert_eq!(u32_at(p, take(4)), 3, "seq");
    assert_eq!(u64_at(p, take(8)), 4096, "stored");
    assert_eq!(u64_at(p, take(8)), 8, "blocks");
    assert_eq!(u64_at(p, take(8)), 1, "interval count");
    assert_eq!(u64_at(p, take(8)), 5, "interval inode");
    assert_eq!(u64_at(p, take(8)), 2, "range count");
    assert_eq!((u64_at(p, take(8)), u64_at(p, take(8))), (0, 4));
    assert_eq!((u64_at(p, take(8)), u64_at(p, take(8))), (10, 12));
    assert_eq!(u64_at(p, take(8)), 100, "logical bytes");
    assert_eq!(u64_at(p, take(8)), 200, "stored bytes");
    assert_eq!(u64_at(p, take(8)), 6, "changed blocks");
    let v1_end = take(0);
    assert_eq!(p[take(1)], 1, "origin: Some (payload version 2)");
    assert_eq!(&p[take(16)..][..16], &[9; 16], "origin pool");
    assert_eq!(u64_at(p, take(8)), 41, "origin id");
    assert_eq!(o, p.len(), "nothing after origin");
    let back = SnapshotRecord::decode(&b).unwrap();
    assert_eq!(back.encode(), b);
    // A payload version 1 record (written before `origin`) still loads, as
    // a snapshot of this pool.
    let v1 = vpool::pool::meta::encode_blob(&p[..v1_end]);
    let old = SnapshotRecord::decode(&v1).unwrap();
    assert_eq!(old.origin, None);
    assert_eq!(old.changed_blocks, 6);
    assert_eq!(old.name, "nightly");
}

/// Section 20.1: an operational record entry is the same envelope around
/// UTF-8 JSON.
#[test]
fn info_entries_are_enveloped_json() {
    let info = vpool::pool::info::PoolInfo::default();
    info.set_hold(3, true);
    let changes = info.take_changes();
    assert_eq!(changes.len(), 1);
    let (key, blob) = &changes[0];
    assert_eq!(key, vpool::pool::info::KEY_HOLDS);
    let blob = blob.as_ref().unwrap();
    assert_eq!(u16_at(blob, 0), 1);
    assert_eq!(check_blob(blob).unwrap(), b"[3]");
}
