//! On-disk parsers: version-1 fixtures that every future version must still
//! read, and (below) the fuzzing of every parser.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vpool::pool::intent;
use vpool::pool::label::{Label, MemberEntry, PoolConfig};
use vpool::pool::meta::{self, ExtentRecord, InodeRecord, NodeKind, Timestamp};
use vpool::pool::sums::{self, SumId};
use vpool::snapshot::delta::{DeltaFile, DeltaHeader, DeltaWriter, EntryKind};
use vpool::snapshot::ranges::RangeSet;
use vpool::snapshot::{DeltaLoc, Kind, SnapshotRecord, State};

// ----- version-1 fixtures -----

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn fixture_label() -> Label {
    Label {
        pool: Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888),
        member: Uuid::from_u128(0xaaaa_bbbb_cccc_dddd_eeee_ffff_0000_1111),
        generation: 5,
        created: 1_760_000_000,
        config: PoolConfig {
            copies: 2,
            block_size: 4096,
            extent_size: 1 << 20,
        },
        members: vec![
            MemberEntry {
                uuid: Uuid::from_u128(0xaaaa_bbbb_cccc_dddd_eeee_ffff_0000_1111),
                id: 0,
                path: PathBuf::from("/srv/disk0"),
            },
            MemberEntry {
                uuid: Uuid::from_u128(0x9999_8888_7777_6666_5555_4444_3333_2222),
                id: 3,
                path: PathBuf::from("/srv/disk1"),
            },
        ],
    }
}

fn fixture_sum_id() -> SumId {
    SumId {
        ino: 12,
        index: 3,
        file_id: 77,
        block_size: 4096,
        entries: 256,
    }
}

fn fixture_sums() -> Vec<u32> {
    (0..256u32)
        .map(|i| {
            if i % 3 == 0 {
                sums::zero_crc(4096)
            } else {
                i.wrapping_mul(0x9e37_79b9)
            }
        })
        .collect()
}

/// Intent records in the fixture file, in file order (then zeros).
const FIXTURE_INTENTS: [(u64, u64, u64); 4] = [(7, 12, 0), (7, 12, 1), (8, 13, 5), (8, 2, 1 << 40)];

fn fixture_inode() -> InodeRecord {
    let mut xattrs = BTreeMap::new();
    xattrs.insert(b"user.a".to_vec(), b"1".to_vec());
    xattrs.insert(b"user.bb".to_vec(), vec![0, 255, 7]);
    InodeRecord {
        kind: NodeKind::File,
        mode: 0o640,
        uid: 1000,
        gid: 100,
        nlink: 1,
        size: 5 << 20,
        atime: Timestamp {
            secs: 1_760_000_001,
            nanos: 1,
        },
        mtime: Timestamp {
            secs: 1_760_000_002,
            nanos: 999_999_999,
        },
        ctime: Timestamp { secs: -5, nanos: 0 },
        rdev: 0,
        parent: 0,
        target: Vec::new(),
        xattrs,
        extents: vec![
            ExtentRecord {
                index: 0,
                file_id: 40,
                members: vec![0, 3],
            },
            ExtentRecord {
                index: 4,
                file_id: 41,
                members: vec![3],
            },
        ],
    }
}

fn fixture_snapshot() -> SnapshotRecord {
    let mut inodes = BTreeMap::new();
    let mut file = fixture_inode();
    file.extents.clear();
    inodes.insert(12, file);
    let mut dir = fixture_inode();
    dir.kind = NodeKind::Dir;
    dir.mode = 0o755;
    dir.nlink = 2;
    dir.size = 0;
    dir.parent = 1;
    dir.xattrs.clear();
    dir.extents.clear();
    inodes.insert(1, dir);
    let mut dirents = BTreeMap::new();
    dirents.insert((1, b"disk.img".to_vec()), 12);
    let mut deltas = BTreeMap::new();
    deltas.insert(
        12,
        DeltaLoc {
            members: vec![0, 3],
            seq: 1,
            stored: 9000,
            blocks: 1280,
        },
    );
    let mut interval = BTreeMap::new();
    interval.insert(12, RangeSet::from_ranges(&[(0, 16), (100, 228)]));
    SnapshotRecord {
        id: 9,
        name: "nightly-1".into(),
        kind: Kind::Incremental,
        parent: Some(4),
        created: Timestamp {
            secs: 1_760_000_100,
            nanos: 5,
        },
        state: State::Complete,
        block_size: 4096,
        inodes,
        dirents,
        deltas,
        interval,
        logical_bytes: 5 << 20,
        stored_bytes: 9000,
        changed_blocks: 144,
    }
}

fn fixture_delta_header() -> DeltaHeader {
    DeltaHeader {
        snap_id: 9,
        base_id: 4,
        ino: 12,
        file_size: 20 * 512 - 100,
        block_size: 512,
    }
}

/// Data of the fixture delta's data entries, by first block.
fn fixture_delta_data() -> Vec<(u64, Vec<u8>)> {
    let pat = |n: usize, seed: u8| -> Vec<u8> {
        (0..n * 512)
            .map(|i| {
                if i % 7 == 0 {
                    seed.wrapping_add((i / 13) as u8)
                } else {
                    seed
                }
            })
            .collect()
    };
    vec![(0, pat(2, 1)), (10, pat(1, 9))]
}

/// Writes the fixtures with the code of the time. Run once, by hand
/// (`VPOOL_WRITE_FIXTURES=1 cargo test --test fuzz_parsers write_fixtures
/// -- --ignored`); the files are committed and never regenerated.
#[test]
#[ignore]
fn write_fixtures() {
    if std::env::var_os("VPOOL_WRITE_FIXTURES").is_none() {
        return;
    }
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("label.bin"), fixture_label().encode()).unwrap();
    std::fs::write(
        dir.join("extent.sum"),
        sums::encode(fixture_sum_id(), 31, &fixture_sums()),
    )
    .unwrap();
    let mut intents = Vec::new();
    for (tag, ino, index) in FIXTURE_INTENTS {
        intents.extend_from_slice(&intent::encode(tag, ino, index));
    }
    intents.resize(1024, 0);
    std::fs::write(dir.join("intent.0"), intents).unwrap();
    std::fs::write(dir.join("inode.rec"), meta::encode_record(&fixture_inode())).unwrap();
    std::fs::write(dir.join("snapshot.rec"), fixture_snapshot().encode()).unwrap();
    let p = dir.join("delta.vd");
    let _ = std::fs::remove_file(&p);
    let mut w = DeltaWriter::create(std::slice::from_ref(&p), &fixture_delta_header(), 3).unwrap();
    let data = fixture_delta_data();
    w.add_data(10, &data[1].1).unwrap();
    w.add_zero(2, 3).unwrap();
    w.add_data(0, &data[0].1).unwrap();
    w.add_hole(5, 2).unwrap();
    w.finish().unwrap();
}

fn read_fixture(name: &str) -> Vec<u8> {
    let p = fixture_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn v1_label_fixture() {
    let b = read_fixture("label.bin");
    assert_eq!(b.len(), 88 + 2 * (22 + 10) + 4);
    let l = Label::decode(&b).unwrap();
    let want = fixture_label();
    assert_eq!(l.pool, want.pool);
    assert_eq!(l.member, want.member);
    assert_eq!(l.generation, 5);
    assert_eq!(l.created, 1_760_000_000);
    assert_eq!(l.config.copies, 2);
    assert_eq!(l.config.block_size, 4096);
    assert_eq!(l.config.extent_size, 1 << 20);
    assert_eq!(l.members.len(), 2);
    assert_eq!(l.members[0].uuid, want.members[0].uuid);
    assert_eq!(l.members[0].id, 0);
    assert_eq!(l.members[0].path, Path::new("/srv/disk0"));
    assert_eq!(l.members[1].uuid, want.members[1].uuid);
    assert_eq!(l.members[1].id, 3);
    assert_eq!(l.members[1].path, Path::new("/srv/disk1"));
    assert_eq!(l.encode(), b);
}

#[test]
fn v1_sum_fixture() {
    let b = read_fixture("extent.sum");
    assert_eq!(b.len(), 64 + 4 * 256);
    let (generation, vals) = sums::decode(&b, fixture_sum_id()).unwrap();
    assert_eq!(generation, 31);
    assert_eq!(vals.len(), 256);
    assert_eq!(vals, fixture_sums());
    assert_eq!(vals[0], sums::zero_crc(4096));
    assert_eq!(vals[1], 0x9e37_79b9);
    // Read from a file too.
    let (generation, vals) = sums::read(&fixture_dir().join("extent.sum"), fixture_sum_id())
        .unwrap()
        .unwrap();
    assert_eq!((generation, vals.len()), (31, 256));
}

#[test]
fn v1_intent_fixture() {
    let b = read_fixture("intent.0");
    assert_eq!(b.len(), 1024);
    let recs: Vec<(u64, u64, u64)> = b.chunks_exact(32).filter_map(intent::decode).collect();
    assert_eq!(recs, FIXTURE_INTENTS.to_vec());
    // The log reads the file as it finds it in a member directory.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("intent.0"), &b).unwrap();
    let log = intent::IntentLog::new(d.path());
    let pending: Vec<(u64, u64)> = log.pending(7).unwrap().into_iter().collect();
    assert_eq!(pending, vec![(2, 1 << 40), (13, 5)]);
    assert_eq!(log.pending(6).unwrap().len(), 4);
}

#[test]
fn v1_inode_record_fixture() {
    let b = read_fixture("inode.rec");
    let r = meta::decode_record(&b).unwrap();
    assert_eq!(r.kind, NodeKind::File);
    assert_eq!(r.mode, 0o640);
    assert_eq!((r.uid, r.gid, r.nlink), (1000, 100, 1));
    assert_eq!(r.size, 5 << 20);
    assert_eq!(
        r.atime,
        Timestamp {
            secs: 1_760_000_001,
            nanos: 1
        }
    );
    assert_eq!(
        r.mtime,
        Timestamp {
            secs: 1_760_000_002,
            nanos: 999_999_999
        }
    );
    assert_eq!(r.ctime, Timestamp { secs: -5, nanos: 0 });
    assert_eq!((r.rdev, r.parent), (0, 0));
    assert!(r.target.is_empty());
    assert_eq!(r.xattrs.len(), 2);
    assert_eq!(r.xattrs[&b"user.bb".to_vec()], vec![0, 255, 7]);
    assert_eq!(r.extents.len(), 2);
    assert_eq!((r.extents[0].index, r.extents[0].file_id), (0, 40));
    assert_eq!(r.extents[0].members, vec![0, 3]);
    assert_eq!((r.extents[1].index, r.extents[1].file_id), (4, 41));
    assert_eq!(r.extents[1].members, vec![3]);
    assert_eq!(r, fixture_inode());
    assert_eq!(meta::encode_record(&r), b);
}

#[test]
fn v1_snapshot_record_fixture() {
    let b = read_fixture("snapshot.rec");
    let r = SnapshotRecord::decode(&b).unwrap();
    assert_eq!(r.id, 9);
    assert_eq!(r.name, "nightly-1");
    assert_eq!(r.kind, Kind::Incremental);
    assert_eq!(r.parent, Some(4));
    assert_eq!(
        r.created,
        Timestamp {
            secs: 1_760_000_100,
            nanos: 5
        }
    );
    assert_eq!(r.state, State::Complete);
    assert_eq!(r.block_size, 4096);
    assert_eq!(r.inodes.len(), 2);
    assert_eq!(r.inodes[&1].kind, NodeKind::Dir);
    assert_eq!(r.inodes[&12].size, 5 << 20);
    assert_eq!(r.dirents.len(), 1);
    assert_eq!(r.dirents[&(1, b"disk.img".to_vec())], 12);
    let loc = &r.deltas[&12];
    assert_eq!(loc.members, vec![0, 3]);
    assert_eq!((loc.seq, loc.stored, loc.blocks), (1, 9000, 1280));
    assert_eq!(r.interval[&12].to_vec(), vec![(0, 16), (100, 228)]);
    assert_eq!(
        (r.logical_bytes, r.stored_bytes, r.changed_blocks),
        (5 << 20, 9000, 144)
    );
    assert_eq!(r.encode(), b);
}

#[test]
fn v1_delta_fixture() {
    let f = DeltaFile::open(fixture_dir().join("delta.vd")).unwrap();
    assert_eq!(f.header, fixture_delta_header());
    let kinds: Vec<(u64, u32, EntryKind)> = f
        .entries
        .iter()
        .map(|e| (e.start, e.count, e.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, 2, EntryKind::Data),
            (2, 3, EntryKind::Zero),
            (5, 2, EntryKind::Hole),
            (10, 1, EntryKind::Data),
        ]
    );
    f.verify().unwrap();
    for (start, want) in fixture_delta_data() {
        let e = f.lookup(start).unwrap();
        assert_eq!(f.read_frame(e).unwrap(), want);
    }
    assert_eq!(f.lookup(7), None);
    assert_eq!(f.len, std::fs::metadata(f.path()).unwrap().len());
}
