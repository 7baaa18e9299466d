//! Reference-model test of the storage core (no mount): random writes, truncates,
//! punches, zero-ranges, renames, unlinks and remounts run against the filesystem
//! core and against a plain in-memory model (a byte vector per file); after every
//! step the touched files, and after every remount all files, must match byte for
//! byte. Shrunk failures are kept below as `regression_*` tests.

use std::collections::BTreeMap;
use std::path::PathBuf;

use proptest::prelude::*;
use vpool::fs::core::{Caller, SetAttr, Vfs, VfsOptions};
use vpool::pool::meta::ROOT_INO;
use vpool::pool::{CreateOptions, Pool};

const ME: Caller = Caller { uid: 0, gid: 0 };
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// Small extents so that every operation crosses extent boundaries often.
const EXTENT: u64 = 16 * 1024;
const MAX_OFF: u64 = 200 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Copy {
        from: usize,
        to: usize,
        off_in: u64,
        off_out: u64,
        len: u64,
    },
    Write {
        f: usize,
        off: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        f: usize,
        size: u64,
    },
    Punch {
        f: usize,
        off: u64,
        len: u64,
    },
    ZeroRange {
        f: usize,
        off: u64,
        len: u64,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Unlink {
        f: usize,
    },
    Commit,
    Remount {
        member: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4usize, 0..MAX_OFF, 1..40_000usize, any::<u8>())
            .prop_map(|(f, off, len, byte)| Op::Write { f, off, len, byte }),
        2 => (0..4usize, 0..MAX_OFF).prop_map(|(f, size)| Op::Truncate { f, size }),
        2 => (0..4usize, 0..MAX_OFF, 1..50_000u64).prop_map(|(f, off, len)| Op::Punch { f, off, len }),
        1 => (0..4usize, 0..MAX_OFF, 1..50_000u64).prop_map(|(f, off, len)| Op::ZeroRange { f, off, len }),
        1 => (0..4usize, 0..4usize).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0..4usize).prop_map(|f| Op::Unlink { f }),
        1 => (0..4usize, 0..4usize, 0..MAX_OFF, 0..MAX_OFF, 1..60_000u64)
            .prop_map(|(from, to, off_in, off_out, len)| Op::Copy { from, to, off_in, off_out, len }),
        1 => Just(Op::Commit),
        1 => (0..2usize).prop_map(|member| Op::Remount { member }),
    ]
}

struct Harness {
    _dir: tempfile::TempDir,
    members: Vec<PathBuf>,
    vfs: Option<Vfs>,
    model: BTreeMap<&'static str, Vec<u8>>,
}

impl Harness {
    fn new(copies: u32) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<PathBuf> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("m{i}"));
                std::fs::create_dir(&p).unwrap();
                p
            })
            .collect();
        Pool::create(
            &members,
            CreateOptions {
                copies,
                extent_size: EXTENT,
                ..Default::default()
            },
        )
        .unwrap();
        let vfs = Some(Self::open(&members[0]));
        Harness {
            _dir: dir,
            members,
            vfs,
            model: BTreeMap::new(),
        }
    }

    fn open(member: &std::path::Path) -> Vfs {
        Vfs::mount(Pool::open(member).unwrap(), VfsOptions::default()).unwrap()
    }

    fn vfs(&self) -> &Vfs {
        self.vfs.as_ref().unwrap()
    }

    /// Opens (creating if needed) file `name` and returns its handle.
    fn handle(&self, name: &str) -> u64 {
        let v = self.vfs();
        match v.lookup(ROOT_INO, name.as_bytes()) {
            Ok(a) => v.open(a.ino, true).unwrap(),
            Err(_) => v.create(ROOT_INO, name.as_bytes(), 0o644, 0, ME).unwrap().1,
        }
    }

    fn verify(&self, name: &str) {
        let v = self.vfs();
        match (self.model.get(name), v.lookup(ROOT_INO, name.as_bytes())) {
            (None, Err(_)) => {}
            (Some(want), Ok(a)) => {
                assert_eq!(a.size, want.len() as u64, "size of {name}");
                let fh = v.open(a.ino, false).unwrap();
                let got = v.read(fh, 0, want.len() as u32 + 100).unwrap();
                v.release(fh).unwrap();
                assert!(
                    got == *want,
                    "content of {name} differs (first diff at {:?})",
                    first_diff(&got, want)
                );
                // Holes reported by SEEK_HOLE must read as zeros.
                let fh = v.open(a.ino, false).unwrap();
                let mut pos = 0;
                while pos < want.len() as u64 {
                    let Ok(h) = v.lseek(fh, pos, libc::SEEK_HOLE) else {
                        break;
                    };
                    if h >= want.len() as u64 {
                        break;
                    }
                    let d = v.lseek(fh, h, libc::SEEK_DATA).unwrap_or(want.len() as u64);
                    assert!(
                        want[h as usize..d as usize].iter().all(|b| *b == 0),
                        "{name}: hole [{h},{d}) holds data"
                    );
                    pos = d;
                }
                v.release(fh).unwrap();
            }
            (m, f) => panic!(
                "{name}: model has {:?}, fs has {:?}",
                m.map(|v| v.len()),
                f.map(|a| a.size)
            ),
        }
    }

    fn verify_all(&self) {
        for n in NAMES {
            self.verify(n);
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { f, off, len, byte } => {
                let name = NAMES[f];
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8) | 1).collect();
                let fh = self.handle(name);
                self.vfs().write(fh, off, &data).unwrap();
                self.vfs().release(fh).unwrap();
                let m = self.model.entry(name).or_default();
                let end = off as usize + len;
                if m.len() < end {
                    m.resize(end, 0);
                }
                m[off as usize..end].copy_from_slice(&data);
                self.verify(name);
            }
            Op::Truncate { f, size } => {
                let name = NAMES[f];
                let fh = self.handle(name);
                let ino = self.vfs().lookup(ROOT_INO, name.as_bytes()).unwrap().ino;
                self.vfs()
                    .setattr(
                        ino,
                        SetAttr {
                            size: Some(size),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                self.vfs().release(fh).unwrap();
                self.model.entry(name).or_default().resize(size as usize, 0);
                self.verify(name);
            }
            Op::Punch { f, off, len } | Op::ZeroRange { f, off, len } => {
                let name = NAMES[f];
                if !self.model.contains_key(name) {
                    return;
                }
                let punch = matches!(op, Op::Punch { .. });
                let mode = if punch {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                let fh = self.handle(name);
                self.vfs().fallocate(fh, off, len, mode).unwrap();
                self.vfs().release(fh).unwrap();
                let m = self.model.get_mut(name).unwrap();
                let end = (off + len) as usize;
                if !punch && m.len() < end {
                    m.resize(end, 0);
                }
                let lim = end.min(m.len());
                if (off as usize) < lim {
                    m[off as usize..lim].fill(0);
                }
                self.verify(name);
            }
            Op::Rename { from, to } => {
                let (a, b) = (NAMES[from], NAMES[to]);
                let r = self
                    .vfs()
                    .rename(ROOT_INO, a.as_bytes(), ROOT_INO, b.as_bytes(), 0);
                match self.model.remove(a) {
                    Some(data) => {
                        r.unwrap();
                        self.model.insert(b, data);
                    }
                    None => assert!(r.is_err()),
                }
                self.verify(a);
                self.verify(b);
            }
            Op::Copy {
                from,
                to,
                off_in,
                off_out,
                len,
            } => {
                let (a, b) = (NAMES[from], NAMES[to]);
                if from == to || !self.model.contains_key(a) {
                    return;
                }
                let fa = self.handle(a);
                let fb = self.handle(b);
                let n = self
                    .vfs()
                    .copy_file_range(fa, off_in, fb, off_out, len)
                    .unwrap();
                self.vfs().release(fa).unwrap();
                self.vfs().release(fb).unwrap();
                let src = self.model[a].clone();
                let want = if off_in as usize >= src.len() {
                    0
                } else {
                    (len as usize).min(src.len() - off_in as usize)
                };
                assert_eq!(n as usize, want);
                let dst = self.model.entry(b).or_default();
                if want > 0 {
                    let end = off_out as usize + want;
                    if dst.len() < end {
                        dst.resize(end, 0);
                    }
                    dst[off_out as usize..end]
                        .copy_from_slice(&src[off_in as usize..off_in as usize + want]);
                }
                self.verify(b);
            }
            Op::Unlink { f } => {
                let name = NAMES[f];
                let r = self.vfs().unlink(ROOT_INO, name.as_bytes());
                assert_eq!(r.is_ok(), self.model.remove(name).is_some());
                self.verify(name);
            }
            Op::Commit => self.vfs().commit().unwrap(),
            Op::Remount { member } => {
                let v = self.vfs.take().unwrap();
                v.commit().unwrap();
                drop(v);
                self.vfs = Some(Self::open(&self.members[member]));
                self.verify_all();
                let report = vpool::pool::inspect::check_open(&self.vfs().pool).unwrap();
                assert!(report.is_clean(), "{:?}", report.problems);
            }
        }
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

fn run(copies: u32, ops: &[Op]) {
    let mut h = Harness::new(copies);
    for op in ops {
        h.apply(op);
    }
    h.apply(&Op::Remount { member: 1 });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn core_matches_model(copies in 1..=2u32, ops in proptest::collection::vec(op(), 1..40)) {
        run(copies, &ops);
    }
}

#[test]
fn regression_truncate_then_extend_reads_zeros() {
    run(
        1,
        &[
            Op::Write {
                f: 0,
                off: 0,
                len: 40_000,
                byte: 7,
            },
            Op::Truncate { f: 0, size: 10_000 },
            Op::Truncate { f: 0, size: 60_000 },
            Op::Remount { member: 0 },
        ],
    );
}
