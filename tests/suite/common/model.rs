//! The reference model shared by `tests/suite/model.rs` and `tests/suite/snapshot_model.rs`.
//!
//! Operations ([`FileOp`]) run against the storage core ([`Vfs`], no FUSE, no
//! kernel) and against [`Model`], a plain in-memory tree: directories map
//! names to node ids, a file is a byte vector, every node has a mode and
//! extended attributes, and a file's link count is the number of names it
//! has. After every step the [`Harness`] compares the two: every directory
//! lists the same names with the same kinds (`.` and `..` included), every
//! node has the same mode, link count, size and xattrs, two names share an
//! inode exactly when the model says they do, and the files the step changed
//! read back byte for byte (whole, in odd-sized pieces, and with what
//! SEEK_HOLE/SEEK_DATA call a hole reading zeros). A remount, an unclean stop
//! and a member change compare every file.
//!
//! An operation either succeeds in both or fails in both with the same errno:
//! the model predicts each refusal (ENOENT, ENOTDIR, EISDIR, EEXIST,
//! ENOTEMPTY, EINVAL, EPERM, ENODATA).
//!
//! **Unclean stops** ([`FileOp::Crash`]) drop the `Vfs` without a commit and
//! mount the pool again from a member directory. What must come back is what
//! docs/design.md section 7 promises: the namespace, sizes, modes and xattrs
//! of the last durable commit (a commit, an `fsync`, a member change, a clean
//! unmount), and every byte that commit or a later `fdatasync` covered;
//! bytes changed since may read old or new. `fdatasync` commits only when a
//! layout change (a name, a size, a new or dropped extent) is pending, which
//! the model cannot always tell, so it keeps every state that may be the
//! durable one ([`Durable`]): the state at the last sure commit, then one per
//! `fdatasync` since. After the stop the pool must match one of them.
//!
//! `PROPTEST_CASES=n` runs `n` cases instead of the default of each test,
//! `VPOOL_MODEL_STEPS=n` makes sequences up to `n` operations long, and
//! `VPOOL_MODEL_TRACE=1` prints every operation and the model after it. Runs
//! are bound by the disk's fsyncs: `TMPDIR=/dev/shm` makes long ones fast.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vpool::error::FsError;
use vpool::fs::core::{Attr, Caller, SetAttr, Vfs, VfsOptions};
use vpool::pool::meta::{NodeKind, ROOT_INO};
use vpool::pool::{CreateOptions, Pool};

pub const ME: Caller = Caller { uid: 0, gid: 0 };
/// Small extents so that every operation crosses extent boundaries often.
pub const EXTENT: u64 = 16 * 1024;
pub const MAX_OFF: u64 = 200 * 1024;
/// Paths operations name by number: four in the root (the only ones the
/// snapshot model uses), then two under each of them (`c` and `d` first: the
/// strategies make them directories more often). A path is a file, a
/// directory or nothing, as the sequence made it. Numbers past these stand
/// for paths the model holds, at any depth (see [`Harness::path_of`]).
pub const PATHS: [&str; 12] = [
    "a", "b", "c", "d", "c/a", "c/b", "d/a", "d/b", "a/a", "a/b", "b/a", "b/b",
];
/// The root names, `PATHS[..4]`.
pub const ROOT_NAMES: [&str; 4] = ["a", "b", "c", "d"];
pub const XATTR_NAMES: [&str; 3] = ["user.a", "user.b", "trusted.c"];
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// Cases of a proptest: `PROPTEST_CASES` when set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

/// The most operations in one case: `VPOOL_MODEL_STEPS` when set, else
/// `default`.
pub fn steps(default: usize) -> usize {
    std::env::var("VPOOL_MODEL_STEPS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

// ----- operations -----

/// An operation on the live filesystem. Paths are numbers that
/// [`Harness::path_of`] turns into paths.
#[derive(Clone, Debug)]
pub enum FileOp {
    /// Writes `len` bytes made from `byte` (see [`data_for`]), creating the
    /// file when it is missing.
    Write {
        p: usize,
        off: u64,
        len: usize,
        byte: u8,
    },
    /// Truncates (creating the file when it is missing).
    Truncate {
        p: usize,
        size: u64,
    },
    /// `FALLOC_FL_PUNCH_HOLE | KEEP_SIZE` on an existing file.
    Punch {
        p: usize,
        off: u64,
        len: u64,
    },
    /// `FALLOC_FL_ZERO_RANGE` on an existing file.
    ZeroRange {
        p: usize,
        off: u64,
        len: u64,
    },
    /// copy_file_range from an existing file to another (created when
    /// missing); copies within one inode are left out (the kernel refuses
    /// overlapping ones before they reach the daemon).
    Copy {
        from: usize,
        to: usize,
        off_in: u64,
        off_out: u64,
        len: u64,
    },
    /// rename(2) of a file or a directory, over what is there; `flags`:
    /// 0, `RENAME_NOREPLACE` or `RENAME_EXCHANGE` by `flags % 3`.
    Rename {
        from: usize,
        to: usize,
        flags: usize,
    },
    Unlink {
        p: usize,
    },
    Mkdir {
        p: usize,
    },
    Rmdir {
        p: usize,
    },
    /// A hard link `to` of `from`.
    Link {
        from: usize,
        to: usize,
    },
    Chmod {
        p: usize,
        mode: u32,
    },
    /// setxattr of `XATTR_NAMES[name]` with `len` bytes; `flags`: 0,
    /// `XATTR_CREATE` or `XATTR_REPLACE` by `flags % 3`.
    SetXattr {
        p: usize,
        name: usize,
        len: usize,
        byte: u8,
        flags: usize,
    },
    RemoveXattr {
        p: usize,
        name: usize,
    },
    /// fsync (`datasync`: fdatasync) of an existing file.
    Fsync {
        p: usize,
        datasync: bool,
    },
    Commit,
    /// Commit, drop the `Vfs`, mount again from member `member % count`.
    Remount {
        member: usize,
    },
    /// Drop the `Vfs` without a commit and mount again from member
    /// `member % count`.
    Crash {
        member: usize,
    },
    /// `device add` of the spare directory (of a member when there is no
    /// spare: nothing to do).
    DeviceAdd,
    /// `device remove` of member `member % count` (refused when fewer
    /// members than `copies` would remain).
    DeviceRemove {
        member: usize,
    },
}

/// How many path numbers stand for each kind of held path (see
/// [`Harness::path_of`]): plenty, so that `i % count` spreads evenly.
const HELD: usize = 32;

/// A name in a directory the model holds (or the root).
pub fn in_held_dir() -> BoxedStrategy<usize> {
    let n = PATHS.len() + 3 * HELD;
    (n..n + HELD).boxed()
}

/// A path for a new file: mostly `a`, `b`, one below `c` or `d` (which
/// [`new_dir`] prefers), or a name in a directory the model holds.
pub fn new_file() -> BoxedStrategy<usize> {
    prop_oneof![
        3 => 0..2usize,
        1 => 2..4usize,
        3 => 4..8usize,
        1 => 8..12usize,
        2 => in_held_dir(),
    ]
    .boxed()
}

/// A path for a new directory: mostly `c`, `d`, one below them, or a name
/// in a directory the model holds.
pub fn new_dir() -> BoxedStrategy<usize> {
    prop_oneof![
        3 => 2..4usize,
        1 => 0..2usize,
        2 => 4..8usize,
        1 => 8..12usize,
        2 => in_held_dir(),
    ]
    .boxed()
}

/// Mostly one of the paths the model holds, for operations on what exists.
pub fn existing() -> BoxedStrategy<usize> {
    let n = PATHS.len();
    prop_oneof![3 => n..n + HELD, 1 => new_file(), 1 => new_dir()].boxed()
}

/// Mostly one of the files the model holds.
pub fn existing_file() -> BoxedStrategy<usize> {
    let n = PATHS.len() + HELD;
    prop_oneof![4 => n..n + HELD, 1 => existing()].boxed()
}

/// Mostly one of the directories the model holds.
pub fn existing_dir() -> BoxedStrategy<usize> {
    let n = PATHS.len() + 2 * HELD;
    prop_oneof![4 => n..n + HELD, 1 => existing()].boxed()
}

/// A file path, new or held, half and half.
pub fn any_file() -> BoxedStrategy<usize> {
    prop_oneof![new_file(), existing_file()].boxed()
}

/// Changes to file data and names: writes, truncates, punches,
/// zero-ranges, renames and unlinks (weights 6/2/2/1/1/1); `new` gives
/// the paths that may be created, `old` those acted on.
pub fn file_change(
    new: impl Strategy<Value = usize> + Clone,
    old: impl Strategy<Value = usize> + Clone,
) -> impl Strategy<Value = FileOp> {
    prop_oneof![
        6 => (new.clone(), 0..MAX_OFF, 1..40_000usize, any::<u8>())
            .prop_map(|(p, off, len, byte)| FileOp::Write { p, off, len, byte }),
        2 => (new.clone(), 0..MAX_OFF).prop_map(|(p, size)| FileOp::Truncate { p, size }),
        2 => (old.clone(), 0..MAX_OFF, 1..50_000u64)
            .prop_map(|(p, off, len)| FileOp::Punch { p, off, len }),
        1 => (old.clone(), 0..MAX_OFF, 1..50_000u64)
            .prop_map(|(p, off, len)| FileOp::ZeroRange { p, off, len }),
        1 => (old.clone(), new).prop_map(|(from, to)| FileOp::Rename { from, to, flags: 0 }),
        1 => old.prop_map(|p| FileOp::Unlink { p }),
    ]
}

/// copy_file_range from paths `old` to paths `new`.
pub fn file_copy(
    new: impl Strategy<Value = usize>,
    old: impl Strategy<Value = usize>,
) -> impl Strategy<Value = FileOp> {
    (old, new, 0..MAX_OFF, 0..MAX_OFF, 1..60_000u64).prop_map(|(from, to, off_in, off_out, len)| {
        FileOp::Copy {
            from,
            to,
            off_in,
            off_out,
            len,
        }
    })
}

/// Every operation of the live model.
pub fn any_file_op() -> impl Strategy<Value = FileOp> {
    prop_oneof![
        12 => file_change(any_file(), existing_file()),
        2 => (existing(), prop_oneof![new_file(), new_dir(), existing()], prop_oneof![2 => Just(0usize), 1 => 1..3usize])
            .prop_map(|(from, to, flags)| FileOp::Rename { from, to, flags }),
        1 => file_copy(any_file(), existing_file()),
        2 => new_dir().prop_map(|p| FileOp::Mkdir { p }),
        1 => existing_dir().prop_map(|p| FileOp::Rmdir { p }),
        1 => (existing_file(), prop_oneof![new_file(), new_dir()])
            .prop_map(|(from, to)| FileOp::Link { from, to }),
        1 => (existing(), 0..0o2000u32).prop_map(|(p, mode)| FileOp::Chmod { p, mode }),
        2 => (existing(), 0..3usize, 0..300usize, any::<u8>(), 0..3usize)
            .prop_map(|(p, name, len, byte, flags)| FileOp::SetXattr { p, name, len, byte, flags }),
        1 => (existing(), 0..3usize).prop_map(|(p, name)| FileOp::RemoveXattr { p, name }),
        1 => (existing_file(), any::<bool>()).prop_map(|(p, datasync)| FileOp::Fsync { p, datasync }),
        1 => Just(FileOp::Commit),
        1 => (0..3usize).prop_map(|member| FileOp::Remount { member }),
        1 => (0..3usize).prop_map(|member| FileOp::Crash { member }),
        1 => prop_oneof![
            Just(FileOp::DeviceAdd),
            (0..3usize).prop_map(|member| FileOp::DeviceRemove { member }),
        ],
    ]
}

/// The bytes of a write: odd `byte`s give incompressible noise, even ones
/// a compressible pattern (snapshot deltas are compressed).
pub fn data_for(byte: u8, off: u64, len: usize) -> Vec<u8> {
    if byte % 2 == 1 {
        noise(byte as u64 + off, len)
    } else {
        (0..len).map(|i| byte.wrapping_add(i as u8) | 1).collect()
    }
}

/// Deterministic, poorly compressible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
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

pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

// ----- the model -----

/// A node of the model, by id (ids are never reused).
pub type Id = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<String, Id>),
}

#[derive(Clone, Debug)]
pub struct MNode {
    pub body: Body,
    pub mode: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What a layout-changing commit records: every directory's entries and
/// every file's size (not data, modes or xattrs).
type Layout = (BTreeMap<Id, BTreeMap<String, Id>>, BTreeMap<Id, usize>);

#[derive(Clone, Debug)]
pub struct Model {
    pub nodes: BTreeMap<Id, MNode>,
    next_id: Id,
}

/// `dir/name` split at its last `/`.
fn split(path: &str) -> (Option<&str>, &str) {
    match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    }
}

impl Model {
    pub const ROOT: Id = 0;

    /// An empty root directory of mode `root_mode`.
    fn new(root_mode: u32) -> Model {
        let root = MNode {
            body: Body::Dir(BTreeMap::new()),
            mode: root_mode,
            xattrs: BTreeMap::new(),
        };
        Model {
            nodes: [(Self::ROOT, root)].into(),
            next_id: 1,
        }
    }

    pub fn is_dir(&self, id: Id) -> bool {
        matches!(self.nodes[&id].body, Body::Dir(_))
    }

    pub fn entries(&self, dir: Id) -> &BTreeMap<String, Id> {
        match &self.nodes[&dir].body {
            Body::Dir(e) => e,
            Body::File(_) => panic!("model: {dir} is not a directory"),
        }
    }

    fn entries_mut(&mut self, dir: Id) -> &mut BTreeMap<String, Id> {
        match &mut self.nodes.get_mut(&dir).unwrap().body {
            Body::Dir(e) => e,
            Body::File(_) => panic!("model: {dir} is not a directory"),
        }
    }

    pub fn child(&self, dir: Id, name: &str) -> Option<Id> {
        self.entries(dir).get(name).copied()
    }

    /// Every path the model holds (the root left out), in order.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![(Self::ROOT, String::new())];
        while let Some((dir, prefix)) = todo.pop() {
            for (name, id) in self.entries(dir) {
                let p = format!("{prefix}{name}");
                if self.is_dir(*id) {
                    todo.push((*id, format!("{p}/")));
                }
                out.push(p);
            }
        }
        out.sort();
        out
    }

    /// The directories a walk of `dir` (a directory path, `None`: the root)
    /// passes, root first; or the errno the walk fails with.
    fn walk_dirs(&self, dir: Option<&str>) -> Result<Vec<Id>, i32> {
        let mut out = vec![Self::ROOT];
        for c in dir.into_iter().flat_map(|d| d.split('/')) {
            let cur = *out.last().unwrap();
            let next = self.child(cur, c).ok_or(libc::ENOENT)?;
            if !self.is_dir(next) {
                return Err(libc::ENOTDIR);
            }
            out.push(next);
        }
        Ok(out)
    }

    /// The directory holding `path` and its last name, or the errno a walk
    /// to it fails with.
    pub fn parent<'p>(&self, path: &'p str) -> Result<(Id, &'p str), i32> {
        let (dir, name) = split(path);
        Ok((*self.walk_dirs(dir)?.last().unwrap(), name))
    }

    /// The node at `path`, or the errno a walk to it fails with.
    pub fn resolve(&self, path: &str) -> Result<Id, i32> {
        let (d, n) = self.parent(path)?;
        self.child(d, n).ok_or(libc::ENOENT)
    }

    pub fn data(&self, id: Id) -> &Vec<u8> {
        match &self.nodes[&id].body {
            Body::File(d) => d,
            Body::Dir(_) => panic!("model: {id} is not a file"),
        }
    }

    fn data_mut(&mut self, id: Id) -> &mut Vec<u8> {
        match &mut self.nodes.get_mut(&id).unwrap().body {
            Body::File(d) => d,
            Body::Dir(_) => panic!("model: {id} is not a file"),
        }
    }

    /// The file at `path` (`None`: nothing there, or not a file).
    pub fn file_id(&self, path: &str) -> Option<Id> {
        self.resolve(path).ok().filter(|id| !self.is_dir(*id))
    }

    pub fn file(&self, path: &str) -> Option<&Vec<u8>> {
        self.file_id(path).map(|id| self.data(id))
    }

    /// Regular files directly in the root, by name (what a snapshot of the
    /// snapshot model holds).
    pub fn root_files(&self) -> BTreeMap<&'static str, Vec<u8>> {
        ROOT_NAMES
            .iter()
            .filter_map(|n| self.file(n).map(|d| (*n, d.clone())))
            .collect()
    }

    /// Links: names of a file; 2 + subdirectories of a directory.
    pub fn nlink(&self, id: Id) -> u32 {
        match &self.nodes[&id].body {
            Body::Dir(e) => 2 + e.values().filter(|c| self.is_dir(**c)).count() as u32,
            Body::File(_) => self
                .nodes
                .values()
                .filter_map(|n| match &n.body {
                    Body::Dir(e) => Some(e.values().filter(|c| **c == id).count() as u32),
                    Body::File(_) => None,
                })
                .sum(),
        }
    }

    fn insert(&mut self, dir: Id, name: &str, body: Body, mode: u32) -> Id {
        let id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(
            id,
            MNode {
                body,
                mode,
                xattrs: BTreeMap::new(),
            },
        );
        self.entries_mut(dir).insert(name.to_string(), id);
        id
    }

    /// Removes entry `name` of `dir`, and its node with its last link.
    fn remove_entry(&mut self, dir: Id, name: &str) {
        let id = self.entries_mut(dir).remove(name).unwrap();
        if self.is_dir(id) || self.nlink(id) == 0 {
            self.nodes.remove(&id);
        }
    }

    fn layout(&self) -> Layout {
        let mut dirs = BTreeMap::new();
        let mut sizes = BTreeMap::new();
        for (id, n) in &self.nodes {
            match &n.body {
                Body::Dir(e) => {
                    dirs.insert(*id, e.clone());
                }
                Body::File(d) => {
                    sizes.insert(*id, d.len());
                }
            }
        }
        (dirs, sizes)
    }

    /// Every node by path, for failure messages.
    pub fn describe(&self) -> String {
        fn walk(m: &Model, dir: Id, prefix: &str, out: &mut Vec<String>) {
            for (name, id) in m.entries(dir) {
                let p = format!("{prefix}{name}");
                let n = &m.nodes[id];
                match &n.body {
                    Body::Dir(_) => {
                        out.push(format!("{p}/ (#{id} {:o})", n.mode));
                        walk(m, *id, &format!("{p}/"), out);
                    }
                    Body::File(d) => {
                        out.push(format!("{p} (#{id} {:o}, {} bytes)", n.mode, d.len()))
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(self, Self::ROOT, "", &mut out);
        out.join(", ")
    }
}

// ----- durability -----

/// A state the pool may hold after an unclean stop.
#[derive(Clone, Debug)]
struct Durable {
    model: Model,
    /// Changes of a file from this `seq` on may have reached its bytes
    /// (`since`, per file, when a later `fdatasync` made it durable).
    seq: u64,
    since: BTreeMap<Id, u64>,
}

/// Bytes `[from, to)` of file `id` changed at `seq`.
#[derive(Clone, Copy, Debug)]
struct Touch {
    seq: u64,
    id: Id,
    from: u64,
    to: u64,
}

// ----- the harness -----

/// The core and the model side by side.
pub struct Harness {
    dir: tempfile::TempDir,
    /// The pool's member directories now.
    pub members: Vec<PathBuf>,
    /// A directory that is no member (one was removed, or never added).
    pub spare: Option<PathBuf>,
    pub copies: u32,
    pub vfs: Option<Vfs>,
    pub model: Model,
    /// The states that may be durable, oldest first (never empty).
    durable: Vec<Durable>,
    /// Data changes since the oldest of them.
    touches: Vec<Touch>,
    seq: u64,
    /// Files whose data changed since the last comparison.
    changed: BTreeSet<Id>,
}

/// Asserts that the core's `got` and the model's `want` agree: both succeed,
/// or both fail with the same errno. Returns whether they succeeded.
#[track_caller]
fn agree<T: std::fmt::Debug, U: std::fmt::Debug>(
    what: &str,
    got: &Result<T, FsError>,
    want: &Result<U, i32>,
) -> bool {
    match (got, want) {
        (Ok(_), Ok(_)) => true,
        (Err(e), Err(w)) if e.errno() == *w => false,
        _ => panic!(
            "{what}: the core gives {got:?}, the model expects {}",
            match want {
                Ok(u) => format!("success ({u:?})"),
                Err(w) => format!("errno {w} ({})", std::io::Error::from_raw_os_error(*w)),
            }
        ),
    }
}

/// Names listed in directory `ino` (without `.` and `..`), with their inode
/// and kind.
pub fn list_dir(v: &Vfs, ino: u64) -> BTreeMap<Vec<u8>, (u64, NodeKind)> {
    let fh = v.opendir(ino).unwrap();
    let out = v
        .readdir(fh, ino, 0)
        .unwrap()
        .into_iter()
        .map(|(_, e)| (e.name, (e.ino, e.kind)))
        .collect();
    v.releasedir(fh).unwrap();
    out
}

/// Checks the open file `fh` (live or snapshot) against `want`: content,
/// read whole and in odd-sized pieces, and SEEK_HOLE/SEEK_DATA.
pub fn check_content(v: &Vfs, what: &str, fh: u64, want: &[u8]) {
    let got = v.read(fh, 0, want.len() as u32 + 100).unwrap();
    assert!(
        got == want,
        "{what}: content differs (len {} want {}, first diff at {:?})",
        got.len(),
        want.len(),
        first_diff(&got, want)
    );
    // Reads that start and end inside blocks and frames.
    let mut pos = 0usize;
    while pos < want.len() {
        let piece = v.read(fh, pos as u64, 5003).unwrap();
        let end = (pos + 5003).min(want.len());
        assert!(
            piece == want[pos..end],
            "{what}: read at {pos} differs (first diff at {:?})",
            first_diff(&piece, &want[pos..end]).map(|d| d + pos)
        );
        pos = end;
    }
    // As the kernel's readahead reads it: each request taken from the
    // range the daemon read ahead after the one before.
    let mut pos = 0usize;
    while pos < want.len() {
        let piece = v.read_stream(fh, pos as u64, 12_288).unwrap();
        let end = (pos + 12_288).min(want.len());
        assert!(
            *piece == want[pos..end],
            "{what}: stream read at {pos} differs (first diff at {:?})",
            first_diff(&piece, &want[pos..end]).map(|d| d + pos)
        );
        v.read_ahead(fh, pos as u64, 12_288);
        pos = end;
    }
    // Whatever SEEK_HOLE/SEEK_DATA call a hole must read as zeros.
    let size = want.len() as u64;
    let mut pos = 0u64;
    while pos < size {
        let h = match v.lseek(fh, pos, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) => panic!("{what}: SEEK_HOLE at {pos} < size {size}: {e:?}"),
        };
        assert!(h >= pos && h <= size, "{what}: SEEK_HOLE({pos}) = {h}");
        if h >= size {
            break;
        }
        let d = match v.lseek(fh, h, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(FsError::NoData) => size,
            Err(e) => panic!("{what}: SEEK_DATA at {h}: {e:?}"),
        };
        assert!(d > h && d <= size, "{what}: SEEK_DATA({h}) = {d}");
        assert!(
            want[h as usize..d as usize].iter().all(|b| *b == 0),
            "{what}: hole [{h},{d}) holds data (first nonzero at {:?})",
            want[h as usize..d as usize]
                .iter()
                .position(|b| *b != 0)
                .map(|i| i as u64 + h)
        );
        pos = d;
    }
    // SEEK_DATA from any data byte's left must not skip it.
    if let Some(first) = want.iter().position(|b| *b != 0) {
        let d = v.lseek(fh, 0, libc::SEEK_DATA).unwrap();
        assert!(
            d <= first as u64,
            "{what}: SEEK_DATA(0) = {d} skips data at {first}"
        );
    }
}

fn open_vfs(member: &Path) -> Vfs {
    let pool = Pool::open(member).unwrap_or_else(|e| panic!("open {}: {e}", member.display()));
    Vfs::mount(pool, VfsOptions::default())
        .unwrap_or_else(|e| panic!("mount {}: {e}", member.display()))
}

impl Harness {
    /// A pool of two members (and a spare directory), mounted from the first.
    pub fn new(copies: u32, block_size: u32) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = dir.path().join(format!("m{i}"));
                std::fs::create_dir(&p).unwrap();
                p
            })
            .collect();
        let members = dirs[..2].to_vec();
        Pool::create(
            &members,
            CreateOptions {
                copies,
                extent_size: EXTENT,
                block_size,
            },
        )
        .unwrap();
        let vfs = open_vfs(&members[0]);
        let root = vfs.getattr(ROOT_INO).unwrap();
        let model = Model::new(root.mode & 0o7777);
        let mut h = Harness {
            dir,
            members,
            spare: Some(dirs[2].clone()),
            copies,
            vfs: Some(vfs),
            model,
            durable: Vec::new(),
            touches: Vec::new(),
            seq: 0,
            changed: BTreeSet::new(),
        };
        h.committed();
        h
    }

    pub fn vfs(&self) -> &Vfs {
        self.vfs.as_ref().unwrap()
    }

    /// Path number `i`: `PATHS[i]`; past them, by `i % count`, one of the
    /// paths the model holds (at any depth): any of them, then (from
    /// `PATHS.len() + HELD` on) a file, then a directory; with none of the
    /// kind, any, and with none at all, `PATHS[i % PATHS.len()]`. Then (from
    /// `PATHS.len() + 3 * HELD` on) one of [`ROOT_NAMES`] in one of the
    /// directories the model holds or the root.
    pub fn path_of(&self, i: usize) -> String {
        if i < PATHS.len() {
            return PATHS[i].to_string();
        }
        let all = self.model.paths();
        let kind = (i - PATHS.len()) / HELD;
        if kind >= 3 {
            let j = i - PATHS.len() - 3 * HELD;
            let mut dirs: Vec<&String> = all
                .iter()
                .filter(|p| self.model.file_id(p).is_none())
                .collect();
            let root = String::new();
            dirs.push(&root);
            let name = ROOT_NAMES[(j / dirs.len()) % ROOT_NAMES.len()];
            let dir = dirs[j % dirs.len()];
            return if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
        }
        let held: Vec<&String> = all
            .iter()
            .filter(|p| match kind {
                0 => true,
                1 => self.model.file_id(p).is_some(),
                _ => self.model.file_id(p).is_none(),
            })
            .collect();
        match (held.is_empty(), all.is_empty()) {
            (false, _) => held[i % held.len()].clone(),
            (true, false) => all[i % all.len()].clone(),
            (true, true) => PATHS[i % PATHS.len()].to_string(),
        }
    }

    // --- the core side of paths ---

    /// Walks `path` in the core.
    fn walk(&self, path: &str) -> Result<Attr, FsError> {
        let v = self.vfs();
        let mut a = v.getattr(ROOT_INO)?;
        for c in path.split('/') {
            a = v.lookup(a.ino, c.as_bytes())?;
        }
        Ok(a)
    }

    /// The directory holding `path` in the core, and its last name.
    fn walk_parent<'p>(&self, path: &'p str) -> Result<(u64, &'p str), FsError> {
        let (dir, name) = split(path);
        let d = match dir {
            None => ROOT_INO,
            Some(d) => {
                let a = self.walk(d)?;
                if a.kind != NodeKind::Dir {
                    return Err(FsError::NotDir);
                }
                a.ino
            }
        };
        Ok((d, name))
    }

    /// Opens file `path` for writing in the core, creating it when missing
    /// and `create`.
    fn core_open(&self, path: &str, create: bool) -> Result<(u64, u64), FsError> {
        let v = self.vfs();
        let (dir, name) = self.walk_parent(path)?;
        match v.lookup(dir, name.as_bytes()) {
            Ok(a) => Ok((v.open(a.ino, true)?, a.ino)),
            Err(FsError::NotFound) if create => {
                let (a, fh) = v.create(dir, name.as_bytes(), FILE_MODE, 0, ME)?;
                Ok((fh, a.ino))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens `path` in the core and the model (creating it in both when
    /// missing and `create`): the handle, the inode and the model's id, or
    /// `None` when both refused alike.
    fn open_both(&mut self, path: &str, create: bool) -> Option<(u64, u64, Id)> {
        let m = &self.model;
        let want = m.parent(path).and_then(|(d, n)| match m.child(d, n) {
            Some(id) if m.is_dir(id) => Err(libc::EISDIR),
            Some(id) => Ok(Some(id)),
            None if create => Ok(None),
            None => Err(libc::ENOENT),
        });
        let got = self.core_open(path, create);
        if !agree(&format!("open {path}"), &got, &want) {
            return None;
        }
        let (fh, ino) = got.unwrap();
        let id = match want.unwrap() {
            Some(id) => id,
            None => {
                let (d, n) = self.model.parent(path).unwrap();
                let id = self.model.insert(d, n, Body::File(Vec::new()), FILE_MODE);
                self.changed.insert(id);
                id
            }
        };
        Some((fh, ino, id))
    }

    // --- durability bookkeeping ---

    /// Bytes `[from, to)` of file `id` changed (in the model already).
    fn touch(&mut self, id: Id, from: u64, to: u64) {
        self.changed.insert(id);
        if from < to {
            self.touches.push(Touch {
                seq: self.seq,
                id,
                from,
                to,
            });
            self.seq += 1;
        }
    }

    /// A commit surely made the model's state durable.
    pub fn committed(&mut self) {
        self.durable = vec![Durable {
            model: self.model.clone(),
            seq: self.seq,
            since: BTreeMap::new(),
        }];
        self.touches.clear();
    }

    /// A commit may have happened: the model's state is one more that may be
    /// durable.
    fn maybe_committed(&mut self) {
        self.durable.push(Durable {
            model: self.model.clone(),
            seq: self.seq,
            since: BTreeMap::new(),
        });
    }

    /// `fdatasync` of file `id` returned: either it committed (the model's
    /// state is durable), or no layout change was pending, and then the
    /// durable state has the layout of now and the file's data of now.
    fn datasynced(&mut self, id: Id) {
        let layout = self.model.layout();
        let data = self.model.data(id).clone();
        let seq = self.seq;
        self.durable.retain_mut(|d| {
            if d.model.layout() != layout {
                return false;
            }
            *d.model.data_mut(id) = data.clone();
            d.since.insert(id, seq);
            true
        });
        self.maybe_committed();
    }

    /// Whether byte `at` of file `id` may differ from state `d` after an
    /// unclean stop (a change since `d` may have reached it).
    fn unsure(&self, d: &Durable, id: Id, at: u64) -> bool {
        let since = d.since.get(&id).copied().unwrap_or(d.seq);
        self.touches
            .iter()
            .any(|t| t.id == id && t.seq >= since && t.from <= at && at < t.to)
    }

    // --- operations ---

    /// Applies `op` to the core and the model, then compares them.
    pub fn apply(&mut self, op: &FileOp) {
        self.step(op);
        if std::env::var_os("VPOOL_MODEL_TRACE").is_some() {
            eprintln!("{op:?}\n    -> {}", self.model.describe());
        }
        self.verify();
    }

    /// Applies `op` to the core and the model.
    pub fn step(&mut self, op: &FileOp) {
        match *op {
            FileOp::Write { p, off, len, byte } => {
                self.write(&self.path_of(p), off, &data_for(byte, off, len));
            }
            FileOp::Truncate { p, size } => self.truncate(&self.path_of(p), size),
            FileOp::Punch { p, off, len } => self.fallocate(&self.path_of(p), off, len, true),
            FileOp::ZeroRange { p, off, len } => self.fallocate(&self.path_of(p), off, len, false),
            FileOp::Copy {
                from,
                to,
                off_in,
                off_out,
                len,
            } => {
                let (a, b) = (self.path_of(from), self.path_of(to));
                let Some(src) = self.model.file_id(&a) else {
                    return;
                };
                if self.model.resolve(&b) == Ok(src) {
                    return;
                }
                let content = self.model.data(src).clone();
                let (fa, _, _) = self.open_both(&a, false).unwrap();
                self.copy_into(fa, &content, &b, off_in, off_out, len);
                self.vfs().release(fa).unwrap();
            }
            FileOp::Rename { from, to, flags } => {
                let flags = [0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][flags % 3];
                self.rename(&self.path_of(from), &self.path_of(to), flags);
            }
            FileOp::Unlink { p } => self.unlink(&self.path_of(p)),
            FileOp::Mkdir { p } => self.mkdir(&self.path_of(p)),
            FileOp::Rmdir { p } => self.rmdir(&self.path_of(p)),
            FileOp::Link { from, to } => self.link(&self.path_of(from), &self.path_of(to)),
            FileOp::Chmod { p, mode } => self.chmod(&self.path_of(p), mode),
            FileOp::SetXattr {
                p,
                name,
                len,
                byte,
                flags,
            } => {
                let flags = [0, libc::XATTR_CREATE, libc::XATTR_REPLACE][flags % 3];
                let value = data_for(byte, 0, len);
                self.setxattr(&self.path_of(p), XATTR_NAMES[name % 3], &value, flags);
            }
            FileOp::RemoveXattr { p, name } => {
                self.removexattr(&self.path_of(p), XATTR_NAMES[name % 3])
            }
            FileOp::Fsync { p, datasync } => self.fsync(&self.path_of(p), datasync),
            FileOp::Commit => self.commit(),
            FileOp::Remount { member } => self.remount(member),
            FileOp::Crash { member } => self.crash(member),
            FileOp::DeviceAdd => self.device_add(),
            FileOp::DeviceRemove { member } => self.device_remove(member),
        }
    }

    /// Writes `data` at `off` of file `path` (created when missing).
    pub fn write(&mut self, path: &str, off: u64, data: &[u8]) {
        let Some((fh, _, id)) = self.open_both(path, true) else {
            return;
        };
        let n = self.vfs().write(fh, off, data).unwrap();
        assert_eq!(n as usize, data.len(), "write {path}: bytes written");
        self.vfs().release(fh).unwrap();
        let m = self.model.data_mut(id);
        let end = off as usize + data.len();
        if m.len() < end {
            m.resize(end, 0);
        }
        m[off as usize..end].copy_from_slice(data);
        self.touch(id, off, end as u64);
    }

    /// Truncates file `path` (created when missing) to `size`.
    pub fn truncate(&mut self, path: &str, size: u64) {
        let Some((fh, ino, id)) = self.open_both(path, true) else {
            return;
        };
        let set = SetAttr {
            size: Some(size),
            ..Default::default()
        };
        let a = self.vfs().setattr(ino, set).unwrap();
        assert_eq!(a.size, size, "truncate {path}: size");
        self.vfs().release(fh).unwrap();
        let m = self.model.data_mut(id);
        let old = m.len() as u64;
        m.resize(size as usize, 0);
        self.touch(id, size.min(old), size.max(old));
    }

    /// Punches (`punch`) or zeroes a range of existing file `path`.
    pub fn fallocate(&mut self, path: &str, off: u64, len: u64, punch: bool) {
        if self.model.file(path).is_none() {
            return;
        }
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        let (fh, _, id) = self.open_both(path, false).unwrap();
        self.vfs().fallocate(fh, off, len, mode).unwrap();
        self.vfs().release(fh).unwrap();
        let m = self.model.data_mut(id);
        let end = (off + len) as usize;
        if !punch && m.len() < end {
            m.resize(end, 0);
        }
        let lim = end.min(m.len());
        if (off as usize) < lim {
            m[off as usize..lim].fill(0);
        }
        self.touch(id, off, lim as u64);
    }

    /// copy_file_range from the open handle `fa` (whose content is `src`) to
    /// file `to` (created when missing).
    pub fn copy_into(
        &mut self,
        fa: u64,
        src: &[u8],
        to: &str,
        off_in: u64,
        off_out: u64,
        len: u64,
    ) {
        let Some((fb, _, id)) = self.open_both(to, true) else {
            return;
        };
        let n = self
            .vfs()
            .copy_file_range(fa, off_in, fb, off_out, len)
            .unwrap();
        self.vfs().release(fb).unwrap();
        let want = if off_in as usize >= src.len() {
            0
        } else {
            (len as usize).min(src.len() - off_in as usize)
        };
        assert_eq!(n as usize, want, "bytes copied to {to}");
        if want > 0 {
            let dst = self.model.data_mut(id);
            let end = off_out as usize + want;
            if dst.len() < end {
                dst.resize(end, 0);
            }
            dst[off_out as usize..end]
                .copy_from_slice(&src[off_in as usize..off_in as usize + want]);
        }
        self.touch(id, off_out, off_out + want as u64);
    }

    /// rename(2) (`flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE` or 0).
    pub fn rename(&mut self, from: &str, to: &str, flags: u32) {
        #[derive(Debug, PartialEq)]
        enum Renamed {
            /// Two names of one inode: nothing to do.
            Nothing,
            Moved,
            Swapped,
        }
        let m = &self.model;
        let want = (|| {
            let (sd, sn) = m.parent(from)?;
            let (dd, dn) = m.parent(to)?;
            let src = m.child(sd, sn).ok_or(libc::ENOENT)?;
            // A directory cannot go below itself.
            let below = |dir: Id, path: &str| -> Result<bool, i32> {
                Ok(m.is_dir(dir) && dd != sd && m.walk_dirs(split(path).0)?.contains(&dir))
            };
            if below(src, to)? {
                return Err(libc::EINVAL);
            }
            let dst = m.child(dd, dn);
            if flags & libc::RENAME_EXCHANGE != 0 {
                let dst = dst.ok_or(libc::ENOENT)?;
                if below(dst, from)? {
                    return Err(libc::EINVAL);
                }
                return Ok(Renamed::Swapped);
            }
            match dst {
                Some(_) if flags & libc::RENAME_NOREPLACE != 0 => Err(libc::EEXIST),
                Some(dst) if dst == src => Ok(Renamed::Nothing),
                Some(dst) => match (m.is_dir(src), m.is_dir(dst)) {
                    (true, false) => Err(libc::ENOTDIR),
                    (false, true) => Err(libc::EISDIR),
                    (true, true) if !m.entries(dst).is_empty() => Err(libc::ENOTEMPTY),
                    _ => Ok(Renamed::Moved),
                },
                None => Ok(Renamed::Moved),
            }
        })();
        let got = (|| {
            let (sp, sn) = self.walk_parent(from)?;
            let (dp, dn) = self.walk_parent(to)?;
            self.vfs()
                .rename(sp, sn.as_bytes(), dp, dn.as_bytes(), flags)
        })();
        if !agree(&format!("rename {from} -> {to} ({flags})"), &got, &want) {
            return;
        }
        let (sd, sn) = self.model.parent(from).unwrap();
        let (dd, dn) = self.model.parent(to).unwrap();
        let src = self.model.child(sd, sn).unwrap();
        match want.unwrap() {
            Renamed::Nothing => {}
            Renamed::Moved => {
                if self.model.child(dd, dn).is_some() {
                    self.model.remove_entry(dd, dn);
                }
                self.model.entries_mut(sd).remove(sn);
                self.model.entries_mut(dd).insert(dn.to_string(), src);
            }
            Renamed::Swapped => {
                let dst = self.model.child(dd, dn).unwrap();
                self.model.entries_mut(sd).insert(sn.to_string(), dst);
                self.model.entries_mut(dd).insert(dn.to_string(), src);
            }
        }
    }

    pub fn unlink(&mut self, path: &str) {
        let m = &self.model;
        let want = m.parent(path).and_then(|(d, n)| match m.child(d, n) {
            None => Err(libc::ENOENT),
            Some(id) if m.is_dir(id) => Err(libc::EISDIR),
            Some(_) => Ok(()),
        });
        let got = self
            .walk_parent(path)
            .and_then(|(d, n)| self.vfs().unlink(d, n.as_bytes()));
        if agree(&format!("unlink {path}"), &got, &want) {
            let (d, n) = self.model.parent(path).unwrap();
            self.model.remove_entry(d, n);
        }
    }

    pub fn mkdir(&mut self, path: &str) {
        let m = &self.model;
        let want = m.parent(path).and_then(|(d, n)| match m.child(d, n) {
            Some(_) => Err(libc::EEXIST),
            None => Ok(()),
        });
        let got = self
            .walk_parent(path)
            .and_then(|(d, n)| self.vfs().mkdir(d, n.as_bytes(), DIR_MODE, 0, ME));
        if agree(&format!("mkdir {path}"), &got, &want) {
            let (d, n) = self.model.parent(path).unwrap();
            self.model
                .insert(d, n, Body::Dir(BTreeMap::new()), DIR_MODE);
        }
    }

    pub fn rmdir(&mut self, path: &str) {
        let m = &self.model;
        let want = m.parent(path).and_then(|(d, n)| match m.child(d, n) {
            None => Err(libc::ENOENT),
            Some(id) if !m.is_dir(id) => Err(libc::ENOTDIR),
            Some(id) if !m.entries(id).is_empty() => Err(libc::ENOTEMPTY),
            Some(_) => Ok(()),
        });
        let got = self
            .walk_parent(path)
            .and_then(|(d, n)| self.vfs().rmdir(d, n.as_bytes()));
        if agree(&format!("rmdir {path}"), &got, &want) {
            let (d, n) = self.model.parent(path).unwrap();
            self.model.remove_entry(d, n);
        }
    }

    /// A hard link `to` of `from`.
    pub fn link(&mut self, from: &str, to: &str) {
        let m = &self.model;
        let want = (|| {
            let src = m.resolve(from)?;
            let (d, n) = m.parent(to)?;
            if m.is_dir(src) {
                return Err(libc::EPERM);
            }
            if m.child(d, n).is_some() {
                return Err(libc::EEXIST);
            }
            Ok(src)
        })();
        let got = (|| {
            let a = self.walk(from)?;
            let (d, n) = self.walk_parent(to)?;
            self.vfs().link(a.ino, d, n.as_bytes())
        })();
        if agree(&format!("link {from} -> {to}"), &got, &want) {
            let src = want.unwrap();
            let (d, n) = self.model.parent(to).unwrap();
            self.model.entries_mut(d).insert(n.to_string(), src);
            assert_eq!(
                got.unwrap().nlink,
                self.model.nlink(src),
                "link {from} -> {to}: nlink"
            );
        }
    }

    pub fn chmod(&mut self, path: &str, mode: u32) {
        let want = self.model.resolve(path);
        let got = self.walk(path).and_then(|a| {
            self.vfs().setattr(
                a.ino,
                SetAttr {
                    mode: Some(mode),
                    ..Default::default()
                },
            )
        });
        if agree(&format!("chmod {path} {mode:o}"), &got, &want) {
            assert_eq!(got.unwrap().mode & 0o7777, mode & 0o7777, "chmod {path}");
            self.model.nodes.get_mut(&want.unwrap()).unwrap().mode = mode & 0o7777;
        }
    }

    pub fn setxattr(&mut self, path: &str, name: &str, value: &[u8], flags: i32) {
        let m = &self.model;
        let want = m.resolve(path).and_then(|id| {
            let exists = m.nodes[&id].xattrs.contains_key(name.as_bytes());
            if flags == libc::XATTR_CREATE && exists {
                Err(libc::EEXIST)
            } else if flags == libc::XATTR_REPLACE && !exists {
                Err(libc::ENODATA)
            } else {
                Ok(id)
            }
        });
        let got = self
            .walk(path)
            .and_then(|a| self.vfs().setxattr(a.ino, name.as_bytes(), value, flags));
        if agree(&format!("setxattr {path} {name} ({flags})"), &got, &want) {
            let n = self.model.nodes.get_mut(&want.unwrap()).unwrap();
            n.xattrs.insert(name.as_bytes().to_vec(), value.to_vec());
        }
    }

    pub fn removexattr(&mut self, path: &str, name: &str) {
        let m = &self.model;
        let want = m.resolve(path).and_then(|id| {
            if m.nodes[&id].xattrs.contains_key(name.as_bytes()) {
                Ok(id)
            } else {
                Err(libc::ENODATA)
            }
        });
        let got = self
            .walk(path)
            .and_then(|a| self.vfs().removexattr(a.ino, name.as_bytes()));
        if agree(&format!("removexattr {path} {name}"), &got, &want) {
            let n = self.model.nodes.get_mut(&want.unwrap()).unwrap();
            n.xattrs.remove(name.as_bytes());
        }
    }

    /// fsync or fdatasync of existing file `path`.
    pub fn fsync(&mut self, path: &str, datasync: bool) {
        if self.model.file(path).is_none() {
            return;
        }
        let (fh, _, id) = self.open_both(path, false).unwrap();
        self.vfs().fsync(fh, datasync).unwrap();
        self.vfs().release(fh).unwrap();
        if datasync {
            self.datasynced(id);
        } else {
            self.committed();
        }
    }

    pub fn commit(&mut self) {
        self.vfs().commit().unwrap();
        self.committed();
    }

    /// Sets the model's file `path` to `content` after the core did (a
    /// snapshot restore or clone), creating it when missing.
    pub fn put_file(&mut self, path: &str, content: Vec<u8>) {
        let id = match self.model.file_id(path) {
            Some(id) => id,
            None => {
                let (d, n) = self.model.parent(path).unwrap();
                self.model.insert(d, n, Body::File(Vec::new()), FILE_MODE)
            }
        };
        let m = self.model.data_mut(id);
        let end = m.len().max(content.len()) as u64;
        *m = content;
        self.touch(id, 0, end);
    }

    /// Mounts the pool again from member `member % count`.
    fn reopen(&mut self, member: usize) {
        assert!(self.vfs.is_none());
        let m = self.members[member % self.members.len()].clone();
        self.vfs = Some(open_vfs(&m));
    }

    /// Runs the online check of the mounted pool.
    pub fn check_open(&self) {
        let report = vpool::pool::inspect::check_open(&self.vfs().pool).unwrap();
        assert!(report.is_clean(), "check: {:?}", report.problems);
    }

    /// Clean unmount (commit), mount again from member `member % count`,
    /// compare everything.
    pub fn remount(&mut self, member: usize) {
        let v = self.vfs.take().unwrap();
        v.commit().unwrap();
        drop(v);
        self.committed();
        self.reopen(member);
        self.verify_all();
        self.check_open();
    }

    /// Unclean stop: the `Vfs` goes without a commit; mounted again from
    /// member `member % count`, the pool must hold one of the states that may
    /// be durable.
    pub fn crash(&mut self, member: usize) {
        drop(self.vfs.take().unwrap());
        self.reopen_after_crash(member);
    }

    /// After an unclean stop (the `Vfs` is gone): mounts again from member
    /// `member % count` and checks the pool against the states that may be
    /// durable; the one found becomes the model.
    pub fn reopen_after_crash(&mut self, member: usize) {
        self.reopen(member);
        let mut why = Vec::new();
        let mut found = None;
        for (k, d) in self.durable.iter().enumerate().rev() {
            match self
                .compare(&d.model)
                .and_then(|inos| self.read_matching(d, &inos))
            {
                Ok(data) => {
                    found = Some((k, data));
                    break;
                }
                Err(e) => why.push(format!("state {k}: {e}")),
            }
        }
        let Some((k, data)) = found else {
            panic!(
                "after an unclean stop the pool matches none of the {} states that may be \
                 durable: {why:#?}\nnow: {}\nlast durable: {}",
                self.durable.len(),
                self.model.describe(),
                self.durable.last().unwrap().model.describe()
            );
        };
        let next_id = self.model.next_id;
        self.model = self.durable[k].model.clone();
        self.model.next_id = next_id;
        for (id, d) in data {
            *self.model.data_mut(id) = d;
        }
        // Mounting recovers and commits.
        self.committed();
        self.verify_all();
        self.check_open();
    }

    /// Reads every file of state `d` (found at `inos` by [`Harness::compare`])
    /// and checks it holds `d`'s bytes but where a later change may show.
    fn read_matching(
        &self,
        d: &Durable,
        inos: &BTreeMap<Id, u64>,
    ) -> Result<Vec<(Id, Vec<u8>)>, String> {
        let v = self.vfs();
        let mut out = Vec::new();
        for (id, n) in &d.model.nodes {
            let Body::File(want) = &n.body else { continue };
            let fh = v
                .open(inos[id], false)
                .map_err(|e| format!("#{id}: open: {e:?}"))?;
            let got = v.read(fh, 0, want.len() as u32 + 100);
            v.release(fh).unwrap();
            let got = got.map_err(|e| format!("#{id}: read: {e:?}"))?;
            if got.len() != want.len() {
                return Err(format!(
                    "#{id}: {} bytes read, {} expected",
                    got.len(),
                    want.len()
                ));
            }
            if let Some(at) =
                (0..got.len()).find(|i| got[*i] != want[*i] && !self.unsure(d, *id, *i as u64))
            {
                return Err(format!(
                    "#{id}: byte {at} is {} but {} was durable and no later change touched it",
                    got[at], want[at]
                ));
            }
            out.push((*id, got));
        }
        Ok(out)
    }

    /// `device add` of the spare (of a member when there is none: nothing
    /// to do), then compare everything.
    pub fn device_add(&mut self) {
        let (dir, new) = match &self.spare {
            Some(s) => (s.clone(), true),
            None => (self.members[0].clone(), false),
        };
        let r = self
            .vfs()
            .device_add(&dir, &mut |_, _| true)
            .unwrap_or_else(|e| panic!("device add {}: {e:?}", dir.display()));
        assert_eq!(
            r.changed,
            new,
            "device add {}: {}",
            dir.display(),
            r.message
        );
        if new {
            self.members.push(dir);
            self.spare = None;
        }
        self.committed();
        self.verify_all();
        self.check_open();
    }

    /// `device remove` of member `member % count`, refused when fewer than
    /// `copies` members (or none) would remain; then compare everything.
    pub fn device_remove(&mut self, member: usize) {
        let i = member % self.members.len();
        let dir = self.members[i].clone();
        let r = self.vfs().device_remove(&dir, &mut |_, _| true);
        if self.members.len() > self.copies.max(1) as usize {
            let r = r.unwrap_or_else(|e| panic!("device remove {}: {e:?}", dir.display()));
            assert!(r.changed, "device remove {}: {}", dir.display(), r.message);
            self.members.remove(i);
            // The spare is free again (a removed member takes its place).
            self.spare = Some(dir);
            self.committed();
        } else {
            assert!(
                r.is_err(),
                "device remove {} with {} member(s) and copies={}: {r:?}",
                dir.display(),
                self.members.len(),
                self.copies
            );
            self.maybe_committed();
        }
        self.verify_all();
        self.check_open();
    }

    /// Commits, unmounts and runs the offline check (snapshots included).
    pub fn close_and_check(mut self) {
        let v = self.vfs.take().unwrap();
        v.commit().unwrap();
        drop(v);
        let report = vpool::check::check_pool(&self.members[0]).unwrap();
        assert!(
            report.problems.is_empty(),
            "check_pool: {:?}",
            report.problems
        );
    }

    // --- comparisons ---

    /// Compares the names, kinds, modes, links, sizes and xattrs of the core
    /// with `model`; returns the inode of every node of the model.
    fn compare(&self, model: &Model) -> Result<BTreeMap<Id, u64>, String> {
        let v = self.vfs();
        let mut inos: BTreeMap<Id, u64> = BTreeMap::new();
        let mut ids: BTreeMap<u64, Id> = BTreeMap::new();
        // (model dir, its inode, its parent's inode, its path)
        let mut todo = vec![(Model::ROOT, ROOT_INO, None::<u64>, String::from("/"))];
        inos.insert(Model::ROOT, ROOT_INO);
        ids.insert(ROOT_INO, Model::ROOT);
        self.compare_node(
            model,
            Model::ROOT,
            "/",
            &v.getattr(ROOT_INO).map_err(|e| format!("/: {e:?}"))?,
        )?;
        while let Some((dir, ino, parent, path)) = todo.pop() {
            let mut listed = list_dir(v, ino);
            let dot = listed.remove(&b"."[..]);
            if dot.map(|d| d.0) != Some(ino) {
                return Err(format!("{path}: `.` is {dot:?}, not {ino}"));
            }
            let dotdot = listed.remove(&b".."[..]);
            if let Some(p) = parent
                && dotdot.map(|d| d.0) != Some(p)
            {
                return Err(format!("{path}: `..` is {dotdot:?}, not {p}"));
            }
            let want: BTreeSet<&[u8]> = model.entries(dir).keys().map(|n| n.as_bytes()).collect();
            let got: BTreeSet<&[u8]> = listed.keys().map(|n| n.as_slice()).collect();
            if want != got {
                let show = |s: &BTreeSet<&[u8]>| -> Vec<String> {
                    s.iter()
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .collect()
                };
                return Err(format!(
                    "{path}: lists {:?}, the model has {:?}",
                    show(&got),
                    show(&want)
                ));
            }
            for (name, id) in model.entries(dir) {
                let p = format!("{path}{name}");
                let (lino, lkind) = listed[name.as_bytes()];
                let a = v
                    .lookup(ino, name.as_bytes())
                    .map_err(|e| format!("{p}: lookup: {e:?}"))?;
                if a.ino != lino || a.kind != lkind {
                    return Err(format!(
                        "{p}: readdir says {lino} {lkind:?}, lookup {} {:?}",
                        a.ino, a.kind
                    ));
                }
                match (inos.insert(*id, a.ino), ids.insert(a.ino, *id)) {
                    (Some(i), _) if i != a.ino => {
                        return Err(format!(
                            "{p}: inode {} but another name of #{id} has {i}",
                            a.ino
                        ));
                    }
                    (_, Some(j)) if j != *id => {
                        return Err(format!(
                            "{p}: inode {} is also #{j}'s, the model has #{id}",
                            a.ino
                        ));
                    }
                    _ => {}
                }
                self.compare_node(model, *id, &p, &a)?;
                if model.is_dir(*id) {
                    todo.push((*id, a.ino, Some(ino), format!("{p}/")));
                }
            }
        }
        Ok(inos)
    }

    /// Compares node `id` of `model` with the core's attributes `a` (and
    /// its xattrs).
    fn compare_node(&self, model: &Model, id: Id, path: &str, a: &Attr) -> Result<(), String> {
        let n = &model.nodes[&id];
        let (kind, size) = match &n.body {
            Body::Dir(_) => (NodeKind::Dir, None),
            Body::File(d) => (NodeKind::File, Some(d.len() as u64)),
        };
        if a.kind != kind {
            return Err(format!("{path}: a {:?}, the model has a {kind:?}", a.kind));
        }
        if let Some(s) = size
            && a.size != s
        {
            return Err(format!("{path}: size {}, the model has {s}", a.size));
        }
        if a.mode & 0o7777 != n.mode {
            return Err(format!(
                "{path}: mode {:o}, the model has {:o}",
                a.mode & 0o7777,
                n.mode
            ));
        }
        if a.nlink != model.nlink(id) {
            return Err(format!(
                "{path}: nlink {}, the model has {}",
                a.nlink,
                model.nlink(id)
            ));
        }
        let v = self.vfs();
        let list = v
            .listxattr(a.ino)
            .map_err(|e| format!("{path}: listxattr: {e:?}"))?;
        let names: BTreeSet<&[u8]> = list.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
        let want: BTreeSet<&[u8]> = n.xattrs.keys().map(|k| k.as_slice()).collect();
        if names != want {
            return Err(format!("{path}: xattrs {names:?}, the model has {want:?}"));
        }
        for (k, val) in &n.xattrs {
            let got = v
                .getxattr(a.ino, k)
                .map_err(|e| format!("{path}: getxattr {k:?}: {e:?}"))?;
            if got != *val {
                return Err(format!(
                    "{path}: xattr {k:?} is {} bytes, the model has {}",
                    got.len(),
                    val.len()
                ));
            }
        }
        Ok(())
    }

    /// Compares the core with the model: the whole tree's names and
    /// attributes, and the content of the files changed since the last
    /// comparison.
    pub fn verify(&mut self) {
        self.verify_with(false);
    }

    /// [`Harness::verify`], and the content of every file.
    pub fn verify_all(&mut self) {
        self.verify_with(true);
    }

    fn verify_with(&mut self, all: bool) {
        let inos = self
            .compare(&self.model)
            .unwrap_or_else(|e| panic!("{e}\nthe model: {}", self.model.describe()));
        let v = self.vfs();
        for (id, n) in &self.model.nodes {
            let Body::File(want) = &n.body else { continue };
            if !all && !self.changed.contains(id) {
                continue;
            }
            let fh = v.open(inos[id], false).unwrap();
            check_content(v, &format!("file #{id} (inode {})", inos[id]), fh, want);
            v.release(fh).unwrap();
        }
        self.changed.clear();
    }
}
