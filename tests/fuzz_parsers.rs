//! On-disk parsers: version-1 fixtures that every future version must still
//! read, and the fuzzing of every parser (see "Fuzzing" below and
//! `docs/design.md`, "Parser validation and fuzzing").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vpool::storage::real::RealStorage;

use uuid::Uuid;
use vpool::pool::intent;
use vpool::pool::label::{Label, MemberEntry, PoolConfig};
use vpool::pool::meta::{self, ExtentRecord, InodeRecord, NodeKind, Timestamp};
use vpool::pool::sums::{self, SumId};
use vpool::snapshot::delta::{
    DeltaFile, DeltaHeader, DeltaId, DeltaWriter, ENTRY_LEN, Entry, EntryKind, FOOTER_LEN, Footer,
    HEADER_LEN,
};
use vpool::snapshot::ranges::RangeSet;
use vpool::snapshot::{DeltaLoc, Kind, SnapshotRecord, State, check_records};

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
        origin: None,
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
    let mut w = DeltaWriter::create(
        vpool::storage::real(),
        std::slice::from_ref(&p),
        &fixture_delta_header(),
        3,
    )
    .unwrap();
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
    let (generation, vals) = sums::read(
        &RealStorage,
        &fixture_dir().join("extent.sum"),
        fixture_sum_id(),
    )
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
    let log = intent::IntentLog::new(vpool::storage::real(), d.path());
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
    // Payload version 1 has no origin: a snapshot of this pool. Written
    // again, it is version 2: the same bytes, then the origin's `None`.
    assert_eq!(r.origin, None);
    let mut v2 = vpool::pool::meta::check_blob(&b).unwrap().to_vec();
    v2.push(0);
    assert_eq!(r.encode(), vpool::pool::meta::encode_blob(&v2));
}

#[test]
fn v1_delta_fixture() {
    let f = DeltaFile::open(&RealStorage, fixture_dir().join("delta.vd")).unwrap();
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

// ----- Fuzzing -----
//
// Every on-disk parser is fed mutated versions of valid samples: first the
// kept regression inputs (`tests/fixtures/fuzz/<parser>/`), then, for the
// small samples, every truncation and every single-byte change (xor 0x01,
// 0x80, 0xff; each also with its checksums recomputed), then random stacked
// mutations (bit flips, random bytes, truncation, splices of two samples,
// inserted, duplicated or deleted chunks, known length/count/size fields set
// to 0, 1, all-ones, powers of two, sizes near the input's), with the
// checksums recomputed most of the time so that the checks behind them are
// reached. Each call runs under `catch_unwind` and must return a value that
// passes the parser's own invariants, or an error with a message: never
// panic. The bytes it allocates at its peak (counted per thread by the
// allocator below) must stay under `ALLOC_BOUND` (plus, for a delta frame,
// the decompressed size its entry declares: count x block size, what a valid
// delta of that shape needs), and it must return within `HANG_LIMIT` (of
// CPU time; a call slower only on the clock is run again, and must then
// finish in time), with a watchdog for a call that never returns.
//
// Short by default (fixed seed, a fixed number of iterations). Environment:
// `VPOOL_FUZZ_SECS=N` runs each parser for N seconds instead (random seed
// unless given), `VPOOL_FUZZ_SEED=S` sets the seed, `VPOOL_FUZZ_ITER=I` runs
// only iteration I (reproduction). A failure prints one line with the parser,
// seed and iteration and writes the input to `target/fuzz-failures/`.

/// Peak bytes one parser call may allocate.
const ALLOC_BOUND: usize = 64 << 20;
/// Longest one parser call may take.
const HANG_LIMIT: Duration = Duration::from_secs(if cfg!(debug_assertions) { 20 } else { 2 });
/// The wall-clock limit of one call (see `run_one`).
const WALL_LIMIT: Duration = Duration::from_secs(if cfg!(debug_assertions) { 60 } else { 10 });
/// Largest input the mutations build.
const MAX_INPUT: usize = 64 << 10;
/// Default seed of the short run.
const DEFAULT_SEED: u64 = 0x7670_6f6f_6c5f_667a;

struct Counting;

thread_local! {
    static CUR: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// Inputs the parser under test accepted (statistics).
    static ACCEPTED: Cell<u64> = const { Cell::new(0) };
}

fn accepted() {
    ACCEPTED.with(|a| a.set(a.get() + 1));
}

fn note_alloc(n: usize) {
    let _ = CUR.try_with(|c| {
        let v = c.get().saturating_add(n);
        c.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

fn note_free(n: usize) {
    let _ = CUR.try_with(|c| c.set(c.get().saturating_sub(n)));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only updates thread-local counters (const-initialized cells
// with no destructor: they never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note_alloc(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note_alloc(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note_free(l.size());
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` was allocated by `System` with layout `l`.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note_free(l.size());
            note_alloc(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak bytes it had allocated
/// (on this thread) beyond what was allocated when it started.
fn measured<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CUR.with(|c| c.get());
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(|p| p.get());
    (r, peak.saturating_sub(base))
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A valid encoded input and the places of its fixed-width fields
/// (offset, width in bytes).
#[derive(Clone)]
struct Sample {
    bytes: Vec<u8>,
    fields: Vec<(usize, usize)>,
}

/// What one parser call may allocate beyond [`ALLOC_BOUND`] (bytes a valid
/// input of that shape needs), or why the result is wrong.
type Check = fn(&[u8]) -> Result<usize, String>;

struct Target {
    name: &'static str,
    samples: Vec<Sample>,
    /// Recomputes the checksums of a (mutated) input.
    fixup: fn(&mut [u8]),
    check: Check,
    /// Random iterations of the short run.
    short_iters: u64,
}

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn get32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Offsets where a bincode payload (after the 8-byte envelope) holds a u64
/// below 4096: its lengths and counts, and some small values.
fn bincode_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let mut f = vec![(0, 2), (2, 2), (4, 4)];
    for at in 8..b.len().saturating_sub(8) {
        if get64(b, at).is_some_and(|v| v < 4096) {
            f.push((at, 8));
        }
    }
    f
}

/// The input of iteration `iter` of `t`: deterministic cases first (every
/// truncation and single-byte change of the small samples, raw and with
/// checksums recomputed), then random mutations.
fn case(t: &Target, seed: u64, iter: u64) -> Vec<u8> {
    let mut i = iter as usize;
    for s in t.samples.iter().filter(|s| s.bytes.len() <= 4096) {
        let n = s.bytes.len();
        if i <= n {
            return s.bytes[..i].to_vec();
        }
        i -= n + 1;
        if i < n * 6 {
            let mut b = s.bytes.clone();
            b[i / 6] ^= [0x01, 0x80, 0xff][i % 3];
            if i % 6 >= 3 {
                (t.fixup)(&mut b);
            }
            return b;
        }
        i -= n * 6;
    }
    let mut rng = Rng::new(seed ^ name_hash(t.name) ^ iter.wrapping_mul(0xd134_2543_de82_ef95));
    let si = rng.below(t.samples.len());
    let sample = &t.samples[si];
    let mut b = sample.bytes.clone();
    for _ in 0..1 + rng.below(4) {
        mutate(&mut b, sample, &t.samples, &mut rng);
    }
    b.truncate(MAX_INPUT);
    if rng.chance(70) {
        (t.fixup)(&mut b);
    }
    b
}

fn deterministic_cases(t: &Target) -> u64 {
    t.samples
        .iter()
        .filter(|s| s.bytes.len() <= 4096)
        .map(|s| (s.bytes.len() * 7 + 1) as u64)
        .sum()
}

fn interesting(rng: &mut Rng, width: usize, len: usize) -> u64 {
    let max = if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    };
    let v = match rng.below(12) {
        0 => 0,
        1 => 1,
        2 => max,
        3 => max >> 1,
        4 => 1u64 << rng.below(64),
        5 => len as u64,
        6 => (len as u64).wrapping_sub(1 + rng.below(64) as u64),
        7 => (len as u64) / 32,
        8 => rng.below(5) as u64,
        9 => 512u64 << rng.below(16),
        10 => u32::MAX as u64,
        _ => rng.next(),
    };
    v & max
}

fn mutate(b: &mut Vec<u8>, sample: &Sample, all: &[Sample], rng: &mut Rng) {
    match rng.below(10) {
        0 if !b.is_empty() => {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        1 if !b.is_empty() => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
        }
        2 => {
            let n = rng.below(b.len() + 1);
            b.truncate(n);
        }
        3 => {
            let other = &all[rng.below(all.len())].bytes;
            let cut = rng.below(b.len() + 1);
            let from = rng.below(other.len() + 1);
            b.truncate(cut);
            b.extend_from_slice(&other[from..]);
        }
        4 => {
            let at = rng.below(b.len() + 1);
            let n = 1 + rng.below(64);
            let chunk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(at..at, chunk);
        }
        5 if !b.is_empty() => {
            let a = rng.below(b.len());
            let n = 1 + rng.below((b.len() - a).min(256));
            let chunk = b[a..a + n].to_vec();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len() + 1);
                b.splice(at..at, chunk.iter().copied());
            }
        }
        6 if !b.is_empty() => {
            let a = rng.below(b.len());
            let n = 1 + rng.below((b.len() - a).min(256));
            b.drain(a..a + n);
        }
        7 | 8 if !sample.fields.is_empty() => {
            let (at, w) = sample.fields[rng.below(sample.fields.len())];
            if at + w <= b.len() {
                let v = interesting(rng, w, b.len());
                b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
        }
        9 => {
            let fill = if rng.chance(50) { 0 } else { 0xff };
            let n = 1 + rng.below(128);
            if rng.chance(50) || b.is_empty() {
                b.extend(std::iter::repeat_n(fill, n));
            } else {
                let a = rng.below(b.len());
                let end = (a + n).min(b.len());
                b[a..end].fill(fill);
            }
        }
        _ => {
            if !b.is_empty() {
                let i = rng.below(b.len());
                b[i] = !b[i];
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn failure_dir() -> PathBuf {
    // `target/tmp` for integration tests: failures go beside it.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|p| p.join("fuzz-failures"))
        .unwrap_or_else(|| PathBuf::from("fuzz-failures"))
}

fn regression_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(name)
}

/// One failure: the reproduction line (also printed), input saved.
fn report(t: &Target, seed: u64, iter: Option<u64>, input: &[u8], why: &str) -> String {
    let dir = failure_dir();
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(match iter {
        Some(i) => format!("{}-{seed:x}-{i}.bin", t.name),
        None => format!("{}-regression-{:08x}.bin", t.name, crc(input)),
    });
    let _ = std::fs::write(&file, input);
    let line = match iter {
        Some(i) => format!(
            "FUZZ FAILURE parser={} seed={seed:#x} iteration={i}: {why} (input: {}; rerun: VPOOL_FUZZ_SEED={seed:#x} VPOOL_FUZZ_ITER={i} cargo test --release --test fuzz_parsers fuzz_{})",
            t.name,
            file.display(),
            t.name
        ),
        None => format!(
            "FUZZ FAILURE parser={} regression input: {why} (input: {})",
            t.name,
            file.display()
        ),
    };
    eprintln!("{line}");
    line
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // the kernel knows.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One call of the parser on `input`: `Err` says what went wrong. A call
/// that used more than `HANG_LIMIT` of CPU time fails (a loop); one that
/// took longer than `WALL_LIMIT` on the clock is run again and fails if it
/// does again. The clock's limit is wider: the file parsers write and read a
/// temporary file, and on a busy 2-core machine with a slow disk one such
/// call took 2 s of wall time for 0.4 ms of CPU. A call blocked for good is
/// the watchdog's (below).
fn run_one(t: &Target, input: &[u8]) -> Result<(), String> {
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        let cpu = thread_cpu_time();
        let (r, peak) = measured(|| catch_unwind(AssertUnwindSafe(|| (t.check)(input))));
        let took = started.elapsed();
        let cpu = thread_cpu_time().saturating_sub(cpu);
        let extra = match r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(format!("panicked: {msg}"));
            }
            Ok(Err(why)) => return Err(why),
            Ok(Ok(extra)) => extra,
        };
        if peak > ALLOC_BOUND.saturating_add(extra) {
            return Err(format!(
                "allocated {peak} bytes at its peak, more than {ALLOC_BOUND} + {extra}"
            ));
        }
        if cpu > HANG_LIMIT {
            return Err(format!("used {cpu:?} of CPU, more than {HANG_LIMIT:?}"));
        }
        if took > WALL_LIMIT {
            if attempt == 0 {
                attempt += 1;
                continue;
            }
            return Err(format!(
                "took {took:?} ({cpu:?} of CPU) twice, more than {WALL_LIMIT:?}"
            ));
        }
        return Ok(());
    }
}

/// Where the worker is: the iteration under way, since when, and its input.
struct Progress {
    iter: AtomicU64,
    since_ms: AtomicU64,
    busy: AtomicBool,
    input: Mutex<Vec<u8>>,
}

fn fuzz(t: Target) {
    let secs = env_u64("VPOOL_FUZZ_SECS");
    let only = env_u64("VPOOL_FUZZ_ITER");
    let seed = env_u64("VPOOL_FUZZ_SEED").unwrap_or_else(|| {
        if secs.is_some() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        } else {
            DEFAULT_SEED
        }
    });
    let t = Arc::new(t);
    let clock = Instant::now();
    let progress = Arc::new(Progress {
        iter: AtomicU64::new(0),
        since_ms: AtomicU64::new(0),
        busy: AtomicBool::new(false),
        input: Mutex::new(Vec::new()),
    });
    let worker = {
        let (t, progress) = (t.clone(), progress.clone());
        std::thread::spawn(move || -> (u64, u64, Option<String>) {
            let mut failure = None;
            // The kept regression inputs, every run.
            let mut regressions: Vec<PathBuf> = std::fs::read_dir(regression_dir(t.name))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            regressions.sort();
            if only.is_none() {
                for p in regressions {
                    let Ok(input) = std::fs::read(&p) else {
                        continue;
                    };
                    if let Err(why) = run_one(&t, &input) {
                        let why = format!("{}: {why}", p.display());
                        failure.get_or_insert(report(&t, seed, None, &input, &why));
                    }
                }
            }
            let det = deterministic_cases(&t);
            let deadline = secs.map(|s| clock + Duration::from_secs(s));
            let mut iter = only.unwrap_or(0);
            let mut done = 0;
            loop {
                let go_on = match (only, deadline) {
                    (Some(i), _) => iter == i,
                    (None, Some(d)) => Instant::now() < d,
                    (None, None) => iter < det + t.short_iters,
                };
                if !go_on || failure.is_some() {
                    break;
                }
                let input = case(&t, seed, iter);
                if let Ok(mut g) = progress.input.lock() {
                    g.clear();
                    g.extend_from_slice(&input);
                }
                progress.iter.store(iter, Ordering::SeqCst);
                progress
                    .since_ms
                    .store(clock.elapsed().as_millis() as u64, Ordering::SeqCst);
                progress.busy.store(true, Ordering::SeqCst);
                let r = run_one(&t, &input);
                progress.busy.store(false, Ordering::SeqCst);
                if let Err(why) = r {
                    failure = Some(report(&t, seed, Some(iter), &input, &why));
                }
                iter += 1;
                done += 1;
            }
            (done, ACCEPTED.with(|a| a.get()), failure)
        })
    };
    // Watchdog: a call still running long past the limit is a hang (the
    // margin is for a busy machine: `run_one` checks the limit itself).
    let watchdog = HANG_LIMIT * 30;
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let since = Duration::from_millis(progress.since_ms.load(Ordering::SeqCst));
        if progress.busy.load(Ordering::SeqCst) && clock.elapsed() > since + watchdog {
            let input = progress.input.lock().map(|g| g.clone()).unwrap_or_default();
            let iter = progress.iter.load(Ordering::SeqCst);
            let line = report(
                &t,
                seed,
                Some(iter),
                &input,
                &format!("still running after {watchdog:?} (hang)"),
            );
            panic!("{line}");
        }
    }
    let (done, ok, failure) = match worker.join() {
        Ok(r) => r,
        Err(_) => panic!("fuzz worker of {} panicked outside a parser call", t.name),
    };
    eprintln!(
        "fuzz {}: seed {seed:#x}, {done} iterations ({ok} accepted) in {:.1} s",
        t.name,
        clock.elapsed().as_secs_f64()
    );
    if let Some(line) = failure {
        panic!("{line}");
    }
}

// ----- targets -----

fn label_sample(l: &Label) -> Sample {
    let bytes = l.encode();
    let mut fields = vec![
        (8, 4),
        (12, 4),
        (48, 8),
        (56, 8),
        (64, 4),
        (68, 4),
        (72, 8),
        (80, 4),
        (84, 4),
    ];
    let mut o = 88;
    for m in &l.members {
        fields.push((o + 16, 4));
        fields.push((o + 20, 2));
        o += 22 + m.path.as_os_str().len();
    }
    Sample { bytes, fields }
}

fn fix_label(b: &mut [u8]) {
    if b.len() >= 4 {
        let n = b.len() - 4;
        let c = crc(&b[..n]);
        put32(b, n, c);
    }
}

fn check_label(b: &[u8]) -> Result<usize, String> {
    let l = match Label::decode(b) {
        Err(e) if e.is_empty() => return Err("empty error message".into()),
        Err(_) => return Ok(0),
        Ok(l) => l,
    };
    accepted();
    let c = l.config;
    let bs = c.block_size;
    let n = l.members.len();
    if !bs.is_power_of_two()
        || !(512..=1 << 20).contains(&bs)
        || !c.extent_size.is_power_of_two()
        || c.extent_size < u64::from(bs)
        || c.extent_size > 1 << 32
        || c.extent_size / u64::from(bs) > 1 << 20
        || c.copies == 0
        || c.copies as usize > n
        || n == 0
        || n > 256
    {
        return Err(format!("accepted invalid settings {c:?} with {n} members"));
    }
    let ids: BTreeSet<u32> = l.members.iter().map(|m| m.id).collect();
    if ids.len() != n || l.members.iter().any(|m| !m.path.is_absolute()) {
        return Err(format!("accepted an invalid member list {:?}", l.members));
    }
    // Re-encoding gives the input back, but for the unchecked flags and
    // reserved fields.
    let mut norm = b.to_vec();
    norm[12..16].fill(0);
    norm[84..88].fill(0);
    fix_label(&mut norm);
    if l.encode() != norm {
        return Err("re-encoding differs from the input".into());
    }
    Ok(0)
}

fn inode_samples() -> Vec<InodeRecord> {
    let mut link = fixture_inode();
    link.kind = NodeKind::Symlink;
    link.target = b"../some/where".to_vec();
    link.extents.clear();
    let mut dir = fixture_inode();
    dir.kind = NodeKind::Dir;
    dir.extents.clear();
    dir.xattrs.clear();
    vec![fixture_inode(), link, dir]
}

fn fix_envelope(b: &mut [u8]) {
    if b.len() >= 8 {
        let c = crc(&b[8..]);
        put32(b, 4, c);
    }
}

fn check_inode(b: &[u8]) -> Result<usize, String> {
    match meta::check_blob(b) {
        Ok(p) if p != &b[8..] => return Err("check_blob returned another payload".into()),
        Err(e) if e.is_empty() => return Err("empty error message".into()),
        _ => {}
    }
    match meta::decode_record(b) {
        Err(e) if e.is_empty() => Err("empty error message".into()),
        Err(_) => Ok(0),
        Ok(r) => {
            accepted();
            let again = meta::decode_record(&meta::encode_record(&r))
                .map_err(|e| format!("re-encoded record does not decode: {e}"))?;
            if again != r {
                return Err("re-encoded record decodes to another".into());
            }
            Ok(0)
        }
    }
}

fn snapshot_samples() -> Vec<SnapshotRecord> {
    let mut failed = fixture_snapshot();
    failed.id = 12;
    failed.state = State::Failed("interrupted by an unclean stop".into());
    failed.deltas.clear();
    let mut full = fixture_snapshot();
    full.id = 1;
    full.parent = None;
    full.kind = Kind::Full;
    full.inodes.clear();
    full.dirents.clear();
    vec![fixture_snapshot(), failed, full]
}

fn check_snapshot(b: &[u8]) -> Result<usize, String> {
    match SnapshotRecord::decode(b) {
        Err(e) if e.is_empty() => Err("empty error message".into()),
        Err(_) => Ok(0),
        Ok(r) => {
            accepted();
            let bs = r.block_size;
            if r.id == 0
                || !bs.is_power_of_two()
                || !(512..=1 << 20).contains(&bs)
                || r.parent.is_some_and(|p| p == 0 || p >= r.id)
            {
                return Err(format!(
                    "accepted snapshot {} (base {:?}, block size {bs})",
                    r.id, r.parent
                ));
            }
            let e = r.encode();
            let again = SnapshotRecord::decode(&e)
                .map_err(|e| format!("re-encoded record does not decode: {e}"))?;
            if again.encode() != e {
                return Err("re-encoded record decodes to another".into());
            }
            Ok(0)
        }
    }
}

/// Records from bytes, 4 a record: id, base (0: none), state, block size
/// and key (another key than the id when the top bit is set).
fn records_from(b: &[u8]) -> BTreeMap<u64, SnapshotRecord> {
    let mut out = BTreeMap::new();
    for c in b.chunks_exact(4) {
        let mut r = snapshot_samples()[2].clone();
        r.id = u64::from(c[0]);
        r.parent = (c[1] != 0).then_some(u64::from(c[1]));
        r.state = match c[2] % 3 {
            0 => State::Complete,
            1 => State::Pending,
            _ => State::Failed("x".into()),
        };
        r.block_size = if c[3] & 1 == 0 {
            4096
        } else {
            1u32 << ((c[3] >> 1) & 31)
        };
        let key = if c[3] & 0x80 != 0 { r.id ^ 1 } else { r.id };
        out.insert(key, r);
    }
    out
}

fn check_snapshot_set(b: &[u8]) -> Result<usize, String> {
    let recs = records_from(b);
    let keys: BTreeSet<u64> = recs.keys().copied().collect();
    let (good, bad) = check_records(recs, 4096);
    if !good.is_empty() {
        accepted();
    }
    let mut seen: BTreeSet<u64> = good.keys().copied().collect();
    for (k, why) in &bad {
        if why.is_empty() || !seen.insert(*k) {
            return Err(format!("record {k} reported twice or without a reason"));
        }
    }
    if seen != keys {
        return Err("records lost or invented".into());
    }
    for (k, r) in &good {
        if r.id != *k || r.block_size != 4096 || r.parent.is_some_and(|p| p >= r.id) {
            return Err(format!("accepted record {k}: {r:?}"));
        }
        if r.is_readable()
            && let Some(p) = r.parent
            && good.get(&p).is_none_or(|b| b.state != State::Complete)
        {
            return Err(format!("accepted record {k} on base {p}"));
        }
        // Every chain of bases ends.
        let mut cur = r.parent;
        let mut steps = 0;
        while let Some(c) = cur {
            steps += 1;
            if steps > good.len() {
                return Err(format!("chain of {k} loops"));
            }
            cur = good.get(&c).and_then(|r| r.parent);
        }
    }
    Ok(0)
}

fn sum_sample(id: SumId, generation: u64, vals: &[u32]) -> Sample {
    let mut fields: Vec<(usize, usize)> = vec![
        (8, 4),
        (12, 4),
        (16, 8),
        (24, 8),
        (32, 8),
        (40, 4),
        (44, 4),
        (48, 8),
        (56, 4),
        (60, 4),
    ];
    fields.extend((0..vals.len().min(8)).map(|i| (64 + 4 * i, 4)));
    Sample {
        bytes: sums::encode(id, generation, vals),
        fields,
    }
}

fn fix_sum(b: &mut [u8]) {
    if b.len() >= 60 {
        let c = crc(&b[..56]);
        put32(b, 56, c);
    }
}

fn check_sum(b: &[u8]) -> Result<usize, String> {
    // As its extent expects it, and as the header says (to get past the
    // identity check).
    let mut ids = vec![fixture_sum_id()];
    if b.len() >= 44 {
        ids.push(SumId {
            block_size: get32(b, 12).unwrap_or(0),
            ino: get64(b, 16).unwrap_or(0),
            index: get64(b, 24).unwrap_or(0),
            file_id: get64(b, 32).unwrap_or(0),
            entries: get32(b, 40).unwrap_or(0),
        });
    }
    for id in ids {
        match sums::decode(b, id) {
            Err(e) if e.is_empty() => return Err("empty error message".into()),
            Err(_) => {}
            Ok((generation, vals)) => {
                accepted();
                // Version 2 (page checksums) or version 1 (none).
                let v1_len = 64 + 4 * vals.len() as u64;
                if vals.len() != id.entries as usize
                    || (b.len() as u64 != sums::file_len(id) && b.len() as u64 != v1_len)
                {
                    return Err(format!("{} entries from {} bytes", vals.len(), b.len()));
                }
                // A version-2 file re-encodes to itself (version 1 files are
                // rewritten as version 2).
                if b[8..12] == sums::SUM_VERSION.to_le_bytes()
                    && b[44..48] == [0; 4]
                    && b[60..64] == [0; 4]
                    && sums::encode(id, generation, &vals) != b
                {
                    return Err("re-encoding differs from the input".into());
                }
            }
        }
    }
    Ok(0)
}

fn intent_sample() -> Sample {
    let mut bytes = Vec::new();
    for (tag, ino, index) in FIXTURE_INTENTS {
        bytes.extend_from_slice(&intent::encode(tag, ino, index));
    }
    let mut fields = Vec::new();
    for r in 0..FIXTURE_INTENTS.len() {
        for (at, w) in [(0, 4), (4, 8), (12, 8), (20, 8), (28, 4)] {
            fields.push((32 * r + at, w));
        }
    }
    Sample { bytes, fields }
}

fn fix_intent(b: &mut [u8]) {
    for r in b.chunks_exact_mut(32) {
        if &r[0..4] == intent::INTENT_MAGIC {
            let c = crc(&r[..28]);
            put32(r, 28, c);
        }
    }
}

thread_local! {
    static TMP: tempfile::TempDir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
}

/// The records one at a time, then the whole input as an intent file.
fn check_intent(b: &[u8]) -> Result<usize, String> {
    let mut want = BTreeSet::new();
    for r in b.chunks(32) {
        if let Some((tag, ino, index)) = intent::decode(r) {
            if intent::encode(tag, ino, index) != r {
                return Err("decoded record re-encodes to other bytes".into());
            }
            if tag > 6 {
                want.insert((ino, index));
            }
        }
    }
    let dir = TMP.with(|d| d.path().join("intent"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("test setup: {e}"))?;
    std::fs::write(dir.join("intent.0"), b).map_err(|e| format!("test setup: {e}"))?;
    match intent::IntentLog::new(vpool::storage::real(), &dir).pending(6) {
        Ok(got) if got != want => Err(format!("pending {got:?}, records say {want:?}")),
        Ok(got) => {
            if !got.is_empty() {
                accepted();
            }
            Ok(0)
        }
        Err(e) if e.to_string().is_empty() => Err("empty error message".into()),
        Err(_) => Err("a small intent file failed to read".into()),
    }
}

/// A finished delta file with `n` data entries and zero and hole runs.
fn delta_sample(header: &DeltaHeader, n: u64) -> Sample {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let p = dir.path().join("d");
    let bs = header.block_size as usize;
    let mut w = DeltaWriter::create(vpool::storage::real(), std::slice::from_ref(&p), header, 3)
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..n {
        let data: Vec<u8> = (0..bs * (1 + i as usize % 3))
            .map(|j| (j as u64 * (i + 3) / 7) as u8)
            .collect();
        w.add_data(i * 10, &data).unwrap_or_else(|e| panic!("{e}"));
        w.add_zero(i * 10 + 4, 2).unwrap_or_else(|e| panic!("{e}"));
        w.add_hole(i * 10 + 6, 1).unwrap_or_else(|e| panic!("{e}"));
    }
    w.finish().unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{e}"));
    let len = bytes.len();
    let mut fields = vec![
        (8, 4),
        (12, 4),
        (16, 8),
        (24, 8),
        (32, 8),
        (40, 8),
        (48, 4),
        (52, 4),
        (56, 4),
    ];
    let f = len - FOOTER_LEN as usize;
    fields.extend([
        (f + 8, 8),
        (f + 16, 8),
        (f + 24, 4),
        (f + 28, 4),
        (f + 36, 4),
    ]);
    let io = get64(&bytes, f + 8).unwrap_or(0) as usize;
    for e in (io..f).step_by(ENTRY_LEN as usize) {
        fields.extend([
            (e, 8),
            (e + 8, 4),
            (e + 12, 1),
            (e + 13, 1),
            (e + 16, 8),
            (e + 24, 4),
        ]);
    }
    Sample { bytes, fields }
}

fn delta_samples() -> Vec<Sample> {
    let h = fixture_delta_header();
    vec![
        Sample {
            bytes: read_fixture("delta.vd"),
            fields: delta_sample(&h, 1).fields[..9].to_vec(),
        },
        delta_sample(&h, 3),
        delta_sample(
            &DeltaHeader {
                block_size: 4096,
                ..h
            },
            2,
        ),
    ]
}

/// Recomputes every checksum a delta holds: frames (of data entries whose
/// frame is inside the file), index, footer, header.
fn fix_delta(b: &mut [u8]) {
    let len = b.len();
    if len >= 64 {
        let c = crc(&b[..60]);
        put32(b, 60, c);
    }
    if len < (HEADER_LEN + FOOTER_LEN) as usize {
        return;
    }
    let f = len - FOOTER_LEN as usize;
    let Some(io) = get64(b, f + 8) else { return };
    let io = io as usize;
    if io < HEADER_LEN as usize || io > f {
        return;
    }
    for e in (io..f.saturating_sub(ENTRY_LEN as usize - 1)).step_by(ENTRY_LEN as usize) {
        if b[e + 12] != 0 {
            continue;
        }
        let (off, clen) = (get64(b, e + 16).unwrap_or(0), get32(b, e + 24).unwrap_or(0));
        let end = off.saturating_add(u64::from(clen));
        if off >= HEADER_LEN && end <= io as u64 {
            let c = crc(&b[off as usize..end as usize]);
            put32(b, e + 28, c);
        }
    }
    let c = crc(&b[io..f]);
    put32(b, f + 24, c);
    let c = crc(&b[f..f + 32]);
    put32(b, f + 32, c);
}

/// The header, footer and entry decoders on their own.
fn check_delta_parts(b: &[u8]) -> Result<usize, String> {
    if b.len() >= 64
        && let Ok(h) = DeltaHeader::decode(&b[..64])
    {
        accepted();
        let bs = h.block_size;
        if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
            return Err(format!("header with block size {bs} accepted"));
        }
        if get64(b, 16) != Some(h.snap_id) || get64(b, 32) != Some(h.ino) {
            return Err("header fields read from the wrong place".into());
        }
    }
    if let Ok(h) = DeltaHeader::decode(b)
        && b.len() != 64
    {
        return Err(format!("header of {} bytes accepted: {h:?}", b.len()));
    }
    for cut in [40, b.len()] {
        let Some(tail) = b.len().checked_sub(40).map(|s| &b[s..]) else {
            break;
        };
        if let Ok(f) = Footer::decode(tail, cut as u64)
            && (f.index_offset < 64
                || f.index_offset + f.entry_count * ENTRY_LEN + 40 != cut as u64)
        {
            return Err(format!("footer {f:?} accepted for a file of {cut} bytes"));
        }
    }
    for c in b.chunks(ENTRY_LEN as usize) {
        match Entry::decode(c) {
            Err(e) if e.is_empty() => return Err("empty error message".into()),
            Err(_) => {}
            Ok(e) => {
                let bad = e.count == 0
                    || e.start.checked_add(u64::from(e.count)).is_none()
                    || c.len() != 32
                    || match e.kind {
                        EntryKind::Data => e.count > 256 || e.clen == 0,
                        _ => e.offset != 0 || e.clen != 0 || e.crc != 0,
                    };
                if bad {
                    return Err(format!("entry {e:?} accepted"));
                }
            }
        }
    }
    Ok(0)
}

/// The whole file through `DeltaFile::open`, then every read a reader does.
fn check_delta_file(b: &[u8]) -> Result<usize, String> {
    let p = TMP.with(|d| d.path().join("delta"));
    std::fs::write(&p, b).map_err(|e| format!("test setup: {e}"))?;
    let f = match DeltaFile::open(&RealStorage, &p) {
        Err(e) if e.to_string().is_empty() => return Err("empty error message".into()),
        Err(_) => return Ok(0),
        Ok(f) => f,
    };
    accepted();
    let bs = f.header.block_size;
    if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) || f.len != b.len() as u64 {
        return Err(format!("opened with block size {bs}, length {}", f.len));
    }
    let mut extra = 0usize;
    let mut prev_end = 0u64;
    for (i, e) in f.entries.iter().enumerate() {
        if e.count == 0 || (i > 0 && e.start < prev_end) {
            return Err(format!("entries unsorted or empty at {e:?}"));
        }
        prev_end = e.end();
        if e.kind == EntryKind::Data {
            if e.offset < HEADER_LEN || e.offset + u64::from(e.clen) > f.len - FOOTER_LEN {
                return Err(format!("frame outside the file: {e:?}"));
            }
            extra = extra.max(e.count as usize * bs as usize);
        }
        if f.lookup(e.start) != Some(e) || f.lookup(e.end() - 1) != Some(e) {
            return Err(format!("lookup misses {e:?}"));
        }
    }
    for e in f
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Data)
        .take(16)
    {
        if let Ok(data) = f.read_frame(e)
            && data.len() != e.count as usize * bs as usize
        {
            return Err(format!("frame of {e:?} read as {} bytes", data.len()));
        }
    }
    let _ = f.verify();
    let want = f.header.id();
    if DeltaFile::open_checked(&RealStorage, &p, &want).is_err() {
        return Err("open_checked refused its own identity".into());
    }
    let other = DeltaId {
        ino: want.ino ^ 1,
        ..want
    };
    if DeltaFile::open_checked(&RealStorage, &p, &other).is_ok() {
        return Err("open_checked accepted another inode".into());
    }
    Ok(extra)
}

const MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
36 22 8:1 / /mnt/a\\040b rw,relatime shared:1 master:2 - ext4 /dev/sda1 rw,errors=remount-ro
37 36 0:50 / /mnt/a\\040b rw,nosuid,nodev,relatime shared:3 - fuse.vpool vpool rw,user_id=0,group_id=0
38 1 0:51 /sub /mnt/caf\\303\\251 rw - fuse.vpool vpool rw
39 1 0:52 / /mnt/\u{e9}t\u{e9}\\134x rw - tmpfs tmpfs rw,size=1k
";

fn check_mountinfo(b: &[u8]) -> Result<usize, String> {
    // Raw bytes, as the kernel gives them (a mount point need not be UTF-8):
    // every vpool mount found is one the lookup by its path finds too.
    for mp in vpool::daemon::mounts_of_type(b, "fuse.vpool") {
        match vpool::daemon::parse_mountinfo(b, &mp) {
            Some(m) if !m.fstype.is_empty() => accepted(),
            other => return Err(format!("{mp:?} listed but looked up as {other:?}")),
        }
    }
    for p in [
        "/mnt/a b",
        "/proc",
        "/mnt/caf\u{e9}",
        "/mnt/\u{e9}t\u{e9}\\x",
        "/",
    ] {
        let m = vpool::daemon::parse_mountinfo(b, Path::new(p));
        if m.is_some() {
            accepted();
        }
        if let Some(m) = m
            && (m.fstype.is_empty() || m.fstype.contains(' ') || m.dev.contains(' '))
        {
            return Err(format!("{p}: parsed {m:?}"));
        }
    }
    Ok(0)
}

/// Small send streams: a full with data, zeros and a hole, and an
/// incremental, encoded by the stream's own encoder.
fn stream_samples() -> Vec<Sample> {
    use vpool::stream::format::{Begin, Encoder, Identity, Inode, InodeKind, Record};
    let id = |n| Identity {
        pool: [3; 16],
        id: n,
        secs: 1_760_000_000,
        nanos: 0,
    };
    let inode = |ino, kind, size| Inode {
        ino,
        kind,
        mode: 0o644,
        uid: 1,
        gid: 2,
        nlink: 1,
        rdev: 0,
        size,
        atime: (1, 0),
        mtime: (2, 0),
        ctime: (3, 0),
        parent: 1,
        target: if kind == InodeKind::Symlink {
            b"t".to_vec()
        } else {
            Vec::new()
        },
        xattrs: vec![(b"user.x".to_vec(), b"y".to_vec())],
    };
    let frame = zstd::bulk::compress(&[5u8; 1024], 1).unwrap();
    let mut out = Vec::new();
    for incremental in [false, true] {
        let recs = vec![
            Record::Begin(Begin {
                block_size: 512,
                incremental,
                snapshot: id(2),
                base: if incremental {
                    id(1)
                } else {
                    Identity::default()
                },
                sender: [3; 16],
                inodes: 3,
                logical_bytes: 3000,
                name: "s".into(),
            }),
            Record::Inode(inode(1, InodeKind::Dir, 0)),
            Record::Inode(inode(4, InodeKind::File, 3000)),
            Record::Inode(inode(5, InodeKind::Symlink, 0)),
            Record::Dirent {
                parent: 1,
                name: b"f".to_vec(),
                child: 4,
            },
            Record::Dirent {
                parent: 1,
                name: b"l".to_vec(),
                child: 5,
            },
            Record::File { ino: 4, size: 3000 },
            Record::Data {
                start: 0,
                count: 2,
                crc: crc(&frame),
                frame: frame.clone(),
            },
            Record::Zero { start: 2, count: 1 },
            Record::Hole { start: 4, count: 2 },
        ];
        let mut e = Encoder::new(Vec::new()).unwrap();
        for r in &recs {
            e.put(r).unwrap();
        }
        let bytes = e.finish().unwrap();
        // The length fields of every record.
        let mut fields = Vec::new();
        let mut at = 8;
        while at + 8 <= bytes.len() {
            fields.push((at + 4, 4));
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            at += 12 + len;
        }
        out.push(Sample { bytes, fields });
    }
    out
}

/// Recomputes every record's CRC and the end record's stream CRC, as far
/// as the record lengths lead.
fn fix_stream(b: &mut [u8]) {
    let mut at = 8;
    let mut running = crc(&b[..8.min(b.len())]);
    while at + 8 <= b.len() {
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        let body = at + 8 + len;
        if body + 4 > b.len() {
            return;
        }
        if b[at] == b'E' && len == 24 {
            let r = running;
            put32(b, at + 8 + 16, r);
        }
        let c = crc(&b[at..body]);
        put32(b, body, c);
        running = crc32c::crc32c_append(running, &b[at..body + 4]);
        at = body + 4;
    }
}

fn check_stream(b: &[u8]) -> Result<usize, String> {
    match vpool::stream::verify(b) {
        Ok(s) => {
            accepted();
            if s.bytes != b.len() as u64 {
                return Err(format!("accepted {} of {} bytes", s.bytes, b.len()));
            }
            // A valid stream of that shape needs its frames decompressed.
            Ok(s.block_size as usize * 256)
        }
        Err(e) if e.is_empty() => Err("empty error message".into()),
        Err(_) => Ok(0),
    }
}

fn mountinfo_samples() -> Vec<Sample> {
    let all = MOUNTINFO.as_bytes().to_vec();
    let mut out = vec![Sample {
        bytes: all,
        fields: Vec::new(),
    }];
    for line in MOUNTINFO.lines() {
        out.push(Sample {
            bytes: line.as_bytes().to_vec(),
            fields: Vec::new(),
        });
    }
    out
}

fn target(name: &str) -> Target {
    let bin = |v: Vec<Vec<u8>>| -> Vec<Sample> {
        v.into_iter()
            .map(|bytes| Sample {
                fields: bincode_fields(&bytes),
                bytes,
            })
            .collect()
    };
    match name {
        "label" => {
            let mut one = fixture_label();
            one.members.truncate(1);
            one.config.copies = 1;
            let mut many = fixture_label();
            for i in 0..5u32 {
                many.members.push(MemberEntry {
                    uuid: Uuid::from_u128(u128::from(i) + 100),
                    id: 10 + i,
                    path: PathBuf::from(format!("/srv/more/disk{i}")),
                });
            }
            Target {
                name: "label",
                samples: [fixture_label(), one, many]
                    .iter()
                    .map(label_sample)
                    .collect(),
                fixup: fix_label,
                check: check_label,
                short_iters: 400_000,
            }
        }
        "inode_record" => Target {
            name: "inode_record",
            samples: bin(inode_samples().iter().map(meta::encode_record).collect()),
            fixup: fix_envelope,
            check: check_inode,
            short_iters: 300_000,
        },
        "snapshot_record" => Target {
            name: "snapshot_record",
            samples: bin(snapshot_samples()
                .iter()
                .map(SnapshotRecord::encode)
                .collect()),
            fixup: fix_envelope,
            check: check_snapshot,
            short_iters: 200_000,
        },
        "snapshot_set" => Target {
            name: "snapshot_set",
            samples: vec![
                Sample {
                    bytes: vec![1, 0, 0, 0, 2, 1, 0, 0, 3, 2, 1, 0, 4, 2, 2, 0, 5, 0, 0, 0],
                    fields: Vec::new(),
                },
                Sample {
                    bytes: vec![2, 3, 0, 0, 3, 2, 0, 0, 9, 9, 0, 0, 7, 6, 2, 0x81],
                    fields: Vec::new(),
                },
            ],
            fixup: |_| {},
            check: check_snapshot_set,
            short_iters: 100_000,
        },
        "sum" => Target {
            name: "sum",
            samples: vec![
                sum_sample(fixture_sum_id(), 31, &fixture_sums()),
                sum_sample(
                    SumId {
                        entries: 4,
                        ..fixture_sum_id()
                    },
                    2,
                    &[1, 2, 3, 4],
                ),
            ],
            fixup: fix_sum,
            check: check_sum,
            short_iters: 300_000,
        },
        "intent" => Target {
            name: "intent",
            samples: vec![intent_sample()],
            fixup: fix_intent,
            check: check_intent,
            short_iters: 5_000,
        },
        "delta_parts" => Target {
            name: "delta_parts",
            samples: delta_samples(),
            fixup: fix_delta,
            check: check_delta_parts,
            short_iters: 300_000,
        },
        "delta_file" => Target {
            name: "delta_file",
            samples: delta_samples(),
            fixup: fix_delta,
            check: check_delta_file,
            short_iters: 4_000,
        },
        "mountinfo" => Target {
            name: "mountinfo",
            samples: mountinfo_samples(),
            fixup: |_| {},
            check: check_mountinfo,
            short_iters: 200_000,
        },
        "stream" => Target {
            name: "stream",
            samples: stream_samples(),
            fixup: fix_stream,
            check: check_stream,
            short_iters: 100_000,
        },
        _ => panic!("no fuzz target {name}"),
    }
}

#[test]
fn fuzz_label() {
    fuzz(target("label"));
}

#[test]
fn fuzz_inode_record() {
    fuzz(target("inode_record"));
}

#[test]
fn fuzz_snapshot_record() {
    fuzz(target("snapshot_record"));
}

#[test]
fn fuzz_snapshot_set() {
    fuzz(target("snapshot_set"));
}

#[test]
fn fuzz_sum() {
    fuzz(target("sum"));
}

#[test]
fn fuzz_intent() {
    fuzz(target("intent"));
}

#[test]
fn fuzz_delta_parts() {
    fuzz(target("delta_parts"));
}

#[test]
fn fuzz_delta_file() {
    fuzz(target("delta_file"));
}

#[test]
fn fuzz_stream() {
    fuzz(target("stream"));
}

#[test]
fn fuzz_mountinfo() {
    fuzz(target("mountinfo"));
}

/// The harness itself: a parser that panics, allocates too much or hangs is
/// caught, and the same seed gives the same inputs.
#[test]
fn harness_catches_failures() {
    let mk = |check: Check| Target {
        name: "selftest",
        samples: vec![Sample {
            bytes: vec![1, 2, 3],
            fields: vec![(0, 2)],
        }],
        fixup: |_| {},
        check,
        short_iters: 10,
    };
    assert!(run_one(&mk(|_| Ok(0)), b"x").is_ok());
    let e = run_one(&mk(|b| Ok(usize::from(b[7]))), b"x").unwrap_err();
    assert!(e.starts_with("panicked"), "{e}");
    let e = run_one(
        &mk(|_| Ok(std::hint::black_box(vec![1u8; 80 << 20]).len() - (80 << 20))),
        b"x",
    )
    .unwrap_err();
    assert!(e.contains("allocated"), "{e}");
    assert!(
        run_one(
            &mk(|_| Ok(std::hint::black_box(vec![1u8; 80 << 20]).len())),
            b"x"
        )
        .is_ok()
    );
    // A call spinning past the limit (CPU time, not only the clock).
    let spin: Check = |_| {
        let t = thread_cpu_time();
        while thread_cpu_time().saturating_sub(t) < HANG_LIMIT + Duration::from_millis(200) {
            std::hint::spin_loop();
        }
        Ok(0)
    };
    let e = run_one(&mk(spin), b"x").unwrap_err();
    assert!(e.contains("of CPU"), "{e}");
    let t = mk(|_| Ok(0));
    let det = deterministic_cases(&t);
    assert_eq!(det, 3 * 7 + 1);
    assert_eq!(case(&t, 1, 2), vec![1, 2]);
    assert_eq!(case(&t, 1, det + 5), case(&t, 1, det + 5));
    assert_ne!(case(&t, 1, det + 5), case(&t, 2, det + 5));
}
