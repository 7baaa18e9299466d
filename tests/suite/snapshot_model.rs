//! Reference-model test of snapshots against the storage core (no mount).
//!
//! Random sequences of writes, truncates, punches, zero-ranges, renames,
//! unlinks, copy_file_range (from live or snapshot files), snapshot creations
//! (full, incremental, differential, default; incremental and differential
//! refused without a base), waits, deletions (any position in the chain),
//! restores (whole snapshot or one file), clones, commits, remounts, unclean
//! stops with a snapshot pending and captures that fail run against the
//! filesystem core and against a plain model: the live model of
//! `common::model` (the files `a` to `d` of the root), and per snapshot a
//! copy of its files taken at its creation. After every step every live file
//! and every file of every snapshot must match byte for byte (read through
//! `.snapshots/<name>/<file>` with the core's lookup/open/read, whole and in
//! odd-sized pieces), each snapshot must list exactly the model's files with
//! their sizes, and whatever SEEK_HOLE and SEEK_DATA report as a hole must
//! read as zeros. A snapshot creation is followed at once by changes to live
//! files, with no check in between, and snapshots are compared before they
//! are waited for too: the capture is most likely still running, so writers
//! must save blocks first (copy-before-write). The run ends with a clean
//! `check_pool`.
//!
//! Targeted tests follow, and failures found are kept as `regression_*`
//! tests. `PROPTEST_CASES=n` runs more cases than the default 48,
//! `VPOOL_MODEL_STEPS=n` sequences of up to `n` operations (default 60).

use crate::common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::model::{
    self, FileOp, ROOT_NAMES, cases, check_content, file_change, file_copy, first_diff, list_dir,
    noise, steps,
};
use proptest::prelude::*;
use vpool::error::FsError;
use vpool::fs::core::Vfs;
use vpool::pool::meta::ROOT_INO;
use vpool::snapshot::Kind;

/// The kind asked of `snapshot_create` (`Default`: `None`, the store chooses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SnapKind {
    Default,
    Full,
    Incremental,
    Differential,
}

#[derive(Clone, Debug)]
enum Op {
    /// A change to the live files (`FileOp` paths `0..4`: the root's `a` to
    /// `d`), or a commit.
    File(FileOp),
    /// copy_file_range from file `from` of the snapshot at position
    /// `pick % count` to live file `to`.
    CopyFromSnap {
        pick: usize,
        from: usize,
        to: usize,
        off_in: u64,
        off_out: u64,
        len: u64,
    },
    /// Creates a snapshot, then applies `then` (changes to live files, while
    /// the capture most likely runs: copy-before-write) with no check in
    /// between; `wait`: then waits for the capture.
    Snap {
        kind: SnapKind,
        then: Vec<Op>,
        wait: bool,
    },
    Wait,
    /// Deletes the snapshot at position `pick % count` (oldest first).
    Delete {
        pick: usize,
    },
    /// Restores every file of a snapshot (`file: None`) or one.
    Restore {
        pick: usize,
        file: Option<usize>,
    },
    /// Clones file `from` of a snapshot to the live name `to`.
    Clone {
        pick: usize,
        from: usize,
        to: usize,
    },
    /// Waits for the captures, commits, mounts again from `member`.
    Remount {
        member: usize,
    },
    /// An unclean stop while a snapshot is pending: its capture ends but the
    /// commit recording it complete never happens; the next mount (from
    /// `member`) marks it failed.
    Crash {
        member: usize,
    },
    /// A snapshot whose capture fails (a file stands where its delta
    /// directory goes, on every member, as an I/O error would): it ends
    /// failed, unless it had nothing to write.
    FailSnap {
        kind: SnapKind,
    },
    /// Sends the snapshot at position `pick % count` to a mirror pool of
    /// the same block size (incremental from the newest older one the
    /// mirror holds, else full) and receives it there; the mirror's copy
    /// must read as the model's snapshot, now and after later steps.
    Send {
        pick: usize,
    },
}

fn snap_kind() -> impl Strategy<Value = SnapKind> {
    prop_oneof![
        Just(SnapKind::Default),
        Just(SnapKind::Full),
        Just(SnapKind::Incremental),
        Just(SnapKind::Differential),
    ]
}

/// Changes to live files only.
fn change() -> impl Strategy<Value = Op> {
    prop_oneof![
        13 => file_change(0..4usize, 0..4usize).prop_map(Op::File),
        1 => copy(),
    ]
}

/// copy_file_range from a live file or from a snapshot's, half and half.
fn copy() -> impl Strategy<Value = Op> {
    prop_oneof![
        file_copy(0..4usize, 0..4usize).prop_map(Op::File),
        (
            0..8usize,
            0..4usize,
            0..4usize,
            0..model::MAX_OFF,
            0..model::MAX_OFF,
            1..60_000u64,
        )
            .prop_map(|(pick, from, to, off_in, off_out, len)| Op::CopyFromSnap {
                pick,
                from,
                to,
                off_in,
                off_out,
                len,
            }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => change(),
        4 => (snap_kind(), proptest::collection::vec(change(), 0..4), any::<bool>())
            .prop_map(|(kind, then, wait)| Op::Snap { kind, then, wait }),
        1 => Just(Op::Wait),
        2 => (0..8usize).prop_map(|pick| Op::Delete { pick }),
        2 => (0..8usize, proptest::option::of(0..4usize))
            .prop_map(|(pick, file)| Op::Restore { pick, file }),
        1 => (0..8usize, 0..4usize, 0..4usize).prop_map(|(pick, from, to)| Op::Clone { pick, from, to }),
        1 => Just(Op::File(FileOp::Commit)),
        1 => (0..2usize).prop_map(|member| Op::Remount { member }),
        1 => (0..2usize).prop_map(|member| Op::Crash { member }),
        1 => snap_kind().prop_map(|kind| Op::FailSnap { kind }),
        2 => (0..8usize).prop_map(|pick| Op::Send { pick }),
    ]
}

/// Files by name.
type Files = std::collections::BTreeMap<&'static str, Vec<u8>>;

struct ModelSnap {
    name: String,
    files: Files,
}

/// The live harness of `common::model` and the snapshots.
struct Harness {
    live: model::Harness,
    /// Complete snapshots, oldest first.
    snaps: Vec<ModelSnap>,
    /// Failed snapshots (unreadable, still listed by `snapshot_list`).
    failed: Vec<String>,
    /// Snapshot names are never reused.
    next_snap: usize,
    /// The id the next snapshot gets (ids are never reused either).
    next_id: u64,
    /// The pool `Send` receives into, made at the first send.
    mirror: Option<Mirror>,
    block_size: u32,
}

/// A second pool holding received snapshots: what each must read as.
struct Mirror {
    _dir: tempfile::TempDir,
    vfs: Vfs,
    got: Vec<ModelSnap>,
}

impl Mirror {
    fn new(block_size: u32) -> Mirror {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m0");
        std::fs::create_dir(&m).unwrap();
        vpool::pool::Pool::create(
            std::slice::from_ref(&m),
            vpool::pool::CreateOptions {
                copies: 1,
                extent_size: 64 * 1024,
                block_size,
            },
        )
        .unwrap();
        let vfs = Vfs::mount(
            vpool::pool::Pool::open(&m).unwrap(),
            vpool::fs::core::VfsOptions::default(),
        )
        .unwrap();
        Mirror {
            _dir: dir,
            vfs,
            got: Vec::new(),
        }
    }

    fn verify(&self) {
        let v = &self.vfs;
        let sd = v.lookup(ROOT_INO, b".snapshots").unwrap();
        for s in &self.got {
            let root = v
                .lookup(sd.ino, s.name.as_bytes())
                .unwrap_or_else(|e| panic!("mirror: snapshot {}: {e:?}", s.name));
            let want: BTreeSet<Vec<u8>> = s.files.keys().map(|n| n.as_bytes().to_vec()).collect();
            assert_eq!(list(v, root.ino), want, "mirror: files of {}", s.name);
            for (n, content) in &s.files {
                let a = v.lookup(root.ino, n.as_bytes()).unwrap();
                assert_eq!(
                    a.size,
                    content.len() as u64,
                    "mirror: size of {}/{n}",
                    s.name
                );
                let fh = v.open(a.ino, false).unwrap();
                check_content(
                    v,
                    &format!("mirror snapshot {} file {n}", s.name),
                    fh,
                    content,
                );
                v.release(fh).unwrap();
            }
        }
    }
}

fn name_of(f: usize) -> &'static str {
    ROOT_NAMES[f]
}

/// Names listed in directory `ino`, without `.` and `..`.
fn list(v: &Vfs, ino: u64) -> BTreeSet<Vec<u8>> {
    list_dir(v, ino)
        .into_keys()
        .filter(|n| n != b"." && n != b"..")
        .collect()
}

impl Harness {
    fn new(copies: u32, block_size: u32) -> Harness {
        Harness {
            live: model::Harness::new(copies, block_size),
            snaps: Vec::new(),
            failed: Vec::new(),
            next_snap: 0,
            next_id: 1,
            mirror: None,
            block_size,
        }
    }

    fn vfs(&self) -> &Vfs {
        self.live.vfs()
    }

    fn verify_snapshots(&self) {
        let v = self.vfs();
        let sd = v.lookup(ROOT_INO, b".snapshots").unwrap();
        assert_eq!(sd.nlink, 2 + self.snaps.len() as u32, ".snapshots nlink");
        let listed = list(v, sd.ino);
        let want: BTreeSet<Vec<u8>> = self
            .snaps
            .iter()
            .map(|s| s.name.as_bytes().to_vec())
            .collect();
        assert_eq!(listed, want, ".snapshots lists other snapshots");
        for f in &self.failed {
            assert!(v.lookup(sd.ino, f.as_bytes()).is_err(), "failed {f} found");
        }
        let list_info = v.snapshot_list();
        let mut names: Vec<(&str, bool)> = list_info
            .iter()
            .map(|i| {
                (
                    i.name.as_str(),
                    i.state == "complete" || i.state == "pending",
                )
            })
            .collect();
        names.sort();
        let mut want: Vec<(&str, bool)> = self
            .snaps
            .iter()
            .map(|s| (s.name.as_str(), true))
            .chain(self.failed.iter().map(|f| (f.as_str(), false)))
            .collect();
        want.sort();
        assert_eq!(names, want, "snapshot_list");
        for s in &self.snaps {
            let root = v
                .lookup(sd.ino, s.name.as_bytes())
                .unwrap_or_else(|e| panic!("snapshot {}: lookup: {e:?}", s.name));
            let listed = list(v, root.ino);
            let want: BTreeSet<Vec<u8>> = s.files.keys().map(|n| n.as_bytes().to_vec()).collect();
            assert_eq!(
                listed, want,
                "snapshot {} lists other files than the model",
                s.name
            );
            for n in ROOT_NAMES {
                let r = v.lookup(root.ino, n.as_bytes());
                let Some(content) = s.files.get(n) else {
                    assert!(r.is_err(), "snapshot {}: {n} found, model has none", s.name);
                    continue;
                };
                let a = r.unwrap_or_else(|e| panic!("snapshot {}: lookup {n}: {e:?}", s.name));
                assert_eq!(
                    a.size,
                    content.len() as u64,
                    "snapshot {}: size of {n}",
                    s.name
                );
                assert_eq!(v.getattr(a.ino).unwrap().size, content.len() as u64);
                let fh = v.open(a.ino, false).unwrap();
                check_content(v, &format!("snapshot {} file {n}", s.name), fh, content);
                v.release(fh).unwrap();
            }
        }
    }

    /// Every live file and every snapshot.
    fn verify_all(&mut self) {
        self.live.verify_all();
        self.verify_snapshots();
        if let Some(m) = &self.mirror {
            m.verify();
        }
    }

    fn write_bytes(&mut self, name: &'static str, off: u64, data: &[u8]) {
        self.live.write(name, off, data);
    }

    fn truncate(&mut self, name: &'static str, size: u64) {
        self.live.truncate(name, size);
    }

    /// Creates snapshot `s<n>`; returns its name, or `None` when the model
    /// expects a refusal (an incremental or differential without a base).
    fn snap(&mut self, kind: SnapKind) -> Option<String> {
        let name = format!("s{}", self.next_snap);
        self.next_snap += 1;
        let k = match kind {
            SnapKind::Default => None,
            SnapKind::Full => Some(Kind::Full),
            SnapKind::Incremental => Some(Kind::Incremental),
            SnapKind::Differential => Some(Kind::Differential),
        };
        let r = self.vfs().snapshot_create(&name, k);
        // Every snapshot's chain ends at a full (deleting a full turns the
        // snapshots based on it into fulls): a base exists iff any snapshot does.
        let no_base = self.snaps.is_empty();
        if no_base && matches!(kind, SnapKind::Incremental | SnapKind::Differential) {
            assert!(r.is_err(), "{kind:?} snapshot without a base: {r:?}");
            assert!(
                self.vfs().lookup(ROOT_INO, b".snapshots").is_ok()
                    && self.vfs().snapshot_list().iter().all(|i| i.name != name),
                "a refused snapshot is listed"
            );
            return None;
        }
        let info = r.unwrap_or_else(|e| panic!("create {name} ({kind:?}): {e:?}"));
        let want_kind = match kind {
            SnapKind::Default if no_base => "full",
            SnapKind::Default => "incremental",
            SnapKind::Full => "full",
            SnapKind::Incremental => "incremental",
            SnapKind::Differential => "differential",
        };
        assert_eq!(info.kind, want_kind, "kind of {name} ({kind:?})");
        assert_eq!(info.id, self.next_id, "id of {name}");
        self.next_id += 1;
        self.snaps.push(ModelSnap {
            name: name.clone(),
            files: self.live.model.root_files(),
        });
        Some(name)
    }

    fn delete(&mut self, pos: usize) {
        let s = self.snaps.remove(pos);
        let v = self.vfs();
        v.snapshot_delete(&s.name)
            .unwrap_or_else(|e| panic!("delete {}: {e:?}", s.name));
        let sd = v.lookup(ROOT_INO, b".snapshots").unwrap().ino;
        assert!(matches!(
            v.lookup(sd, s.name.as_bytes()),
            Err(FsError::NotFound)
        ));
    }

    /// Waits for captures, then remounts (the live harness compares every
    /// file and runs the online check), then compares the snapshots.
    fn remount(&mut self, member: usize) {
        self.vfs().snapshot_wait().unwrap();
        self.live.remount(member);
        self.verify_snapshots();
    }

    /// Waits for captures, commits, unmounts and runs the offline check.
    fn finish(mut self) {
        // The mirror's received snapshots outlive a remount.
        if let Some(mut m) = self.mirror.take() {
            let dir = m._dir.path().join("m0");
            drop(m.vfs);
            m.vfs = Vfs::mount(
                vpool::pool::Pool::open(&dir).unwrap(),
                vpool::fs::core::VfsOptions::default(),
            )
            .unwrap();
            m.verify();
        }
        self.remount(1);
        self.vfs().snapshot_wait().unwrap();
        self.live.close_and_check();
    }

    /// Applies `op` to the core and the model, then checks everything.
    fn apply(&mut self, op: &Op) {
        self.step(op);
        self.verify_all();
    }

    /// Applies `op` to the core and the model.
    fn step(&mut self, op: &Op) {
        match *op {
            Op::File(FileOp::Remount { member }) | Op::Remount { member } => self.remount(member),
            Op::File(ref f) => self.live.step(f),
            Op::CopyFromSnap {
                pick,
                from,
                to,
                off_in,
                off_out,
                len,
            } => {
                if self.snaps.is_empty() {
                    return;
                }
                let s = &self.snaps[pick % self.snaps.len()];
                let a = name_of(from);
                let Some(src) = s.files.get(a).cloned() else {
                    return;
                };
                let v = self.vfs();
                let sd = v.lookup(ROOT_INO, b".snapshots").unwrap().ino;
                let root = v.lookup(sd, s.name.as_bytes()).unwrap().ino;
                let ino = v.lookup(root, a.as_bytes()).unwrap().ino;
                let fa = v.open(ino, false).unwrap();
                self.live
                    .copy_into(fa, &src, name_of(to), off_in, off_out, len);
                self.vfs().release(fa).unwrap();
            }
            Op::Snap {
                kind,
                ref then,
                wait,
            } => {
                self.snap(kind);
                for o in then {
                    self.step(o);
                }
                if wait {
                    self.vfs().snapshot_wait().unwrap();
                }
            }
            Op::Wait => self.vfs().snapshot_wait().unwrap(),
            Op::Delete { pick } => {
                let total = self.snaps.len() + self.failed.len();
                if total == 0 {
                    let r = self.vfs().snapshot_delete("nothing");
                    assert!(matches!(r, Err(FsError::NotFound)), "{r:?}");
                    return;
                }
                let pos = pick % total;
                if pos < self.snaps.len() {
                    self.delete(pos);
                } else {
                    let f = self.failed.remove(pos - self.snaps.len());
                    self.vfs()
                        .snapshot_delete(&f)
                        .unwrap_or_else(|e| panic!("delete failed {f}: {e:?}"));
                }
            }
            Op::Restore { pick, file } => {
                if self.snaps.is_empty() {
                    return;
                }
                let s = &self.snaps[pick % self.snaps.len()];
                let name = s.name.clone();
                match file {
                    None => {
                        let files = s.files.clone();
                        self.vfs()
                            .snapshot_restore(&name, &[])
                            .unwrap_or_else(|e| panic!("restore {name}: {e:?}"));
                        for (n, c) in files {
                            self.live.put_file(n, c);
                        }
                    }
                    Some(f) => {
                        let n = name_of(f);
                        let content = s.files.get(n).cloned();
                        let r = self.vfs().snapshot_restore(&name, &[n.as_bytes().to_vec()]);
                        match content {
                            Some(c) => {
                                r.unwrap_or_else(|e| panic!("restore {name} {n}: {e:?}"));
                                self.live.put_file(n, c);
                            }
                            None => assert!(r.is_err(), "restore of {n} absent from {name}"),
                        }
                    }
                }
            }
            Op::Clone { pick, from, to } => {
                if self.snaps.is_empty() {
                    return;
                }
                let s = &self.snaps[pick % self.snaps.len()];
                let name = s.name.clone();
                let (a, b) = (name_of(from), name_of(to));
                let content = s.files.get(a).cloned();
                let r = self.vfs().snapshot_clone(&name, a.as_bytes(), b.as_bytes());
                match content {
                    Some(c) if self.live.model.resolve(b).is_err() => {
                        let attr = r.unwrap_or_else(|e| panic!("clone {name}/{a} -> {b}: {e:?}"));
                        assert_eq!(attr.size, c.len() as u64);
                        self.live.put_file(b, c);
                    }
                    _ => assert!(r.is_err(), "clone {name}/{a} -> {b} should fail"),
                }
            }
            Op::Crash { member } => {
                self.live.commit();
                let name = self.snap(SnapKind::Default).unwrap();
                let v = self.live.vfs.take().unwrap();
                v.snaps.wait_idle();
                drop(v);
                self.live.reopen_after_crash(member);
                let info = self
                    .vfs()
                    .snapshot_list()
                    .into_iter()
                    .find(|i| i.name == name);
                match info.as_ref().map(|i| i.state.as_str()) {
                    // The commit that follows creation can see a small capture
                    // done already: then the snapshot was complete before the
                    // stop, and it is compared with the model like the others.
                    Some("complete") => {}
                    Some(st) if st.starts_with("failed") => {
                        self.snaps.pop();
                        let v = self.vfs();
                        assert!(v.snapshot_restore(&name, &[]).is_err());
                        assert!(v.snapshot_clone(&name, b"a", b"zz").is_err());
                        self.failed.push(name);
                    }
                    _ => panic!("{name} after an unclean stop: {info:?}"),
                }
            }
            Op::Send { pick } => {
                if self.snaps.is_empty() {
                    return;
                }
                self.vfs().snapshot_wait().unwrap();
                let i = pick % self.snaps.len();
                let name = self.snaps[i].name.clone();
                let mut mirror = self
                    .mirror
                    .take()
                    .unwrap_or_else(|| Mirror::new(self.block_size));
                if mirror.got.iter().any(|g| g.name == name) {
                    self.mirror = Some(mirror);
                    return;
                }
                // The newest older snapshot both pools hold.
                let base = self.snaps[..i]
                    .iter()
                    .rev()
                    .find(|s| mirror.got.iter().any(|g| g.name == s.name))
                    .map(|s| s.name.clone());
                let mut stream = Vec::new();
                self.live
                    .vfs()
                    .snapshot_send(&name, base.as_deref(), None, &mut stream, &mut |_, _| true)
                    .unwrap_or_else(|e| panic!("send {name} from {base:?}: {e:?}"));
                let info = mirror
                    .vfs
                    .snapshot_receive(&mut &stream[..], None, true, &mut |_, _| true)
                    .unwrap_or_else(|e| panic!("receive {name} from {base:?}: {e:?}"));
                assert_eq!(info.base, base, "base of the received {name}");
                mirror.got.push(ModelSnap {
                    name,
                    files: self.snaps[i].files.clone(),
                });
                mirror.verify();
                self.mirror = Some(mirror);
            }
            Op::FailSnap { kind } => {
                let blockers: Vec<PathBuf> = self
                    .live
                    .members
                    .iter()
                    .map(|m| m.join("snap").join(self.next_id.to_string()))
                    .collect();
                for b in &blockers {
                    std::fs::create_dir_all(b.parent().unwrap()).unwrap();
                    std::fs::write(b, b"in the way").unwrap();
                }
                let created = self.snap(kind);
                if created.is_some() {
                    self.vfs().snapshot_wait().unwrap();
                }
                for b in &blockers {
                    std::fs::remove_file(b).unwrap();
                }
                let Some(name) = created else { return };
                let info = self
                    .vfs()
                    .snapshot_list()
                    .into_iter()
                    .find(|i| i.name == name);
                let state = info.map(|i| i.state).unwrap_or_default();
                if state != "complete" {
                    assert!(state.starts_with("failed"), "{name}: {state}");
                    self.snaps.pop();
                    self.failed.push(name);
                }
            }
        }
    }
}

fn run(copies: u32, block_size: u32, ops: &[Op]) {
    let mut h = Harness::new(copies, block_size);
    for op in ops {
        h.apply(op);
    }
    h.finish();
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES=n for a longer run.
        cases: cases(48),
        ..ProptestConfig::default()
    })]
    #[test]
    fn snapshots_match_model(
        copies in 1..=2u32,
        block_size in prop_oneof![Just(512u32), Just(1024), Just(4096)],
        ops in proptest::collection::vec(op(), 20..steps(60)),
    ) {
        run(copies, block_size, &ops);
    }
}

// ----- targeted tests -----

/// Builds full, incremental, incremental, differential, incremental with
/// changes between them (writes, a truncate, a punch, a new file, an unlink).
fn chain(bs: u32) -> Harness {
    let mut h = Harness::new(1, bs);
    h.write_bytes("a", 0, &noise(1, 100_000));
    h.write_bytes("b", 5_000, &noise(2, 30_000));
    assert_eq!(h.snap(SnapKind::Full).as_deref(), Some("s0"));
    h.write_bytes("a", 20_000, &noise(3, 9_000));
    h.truncate("b", 12_345);
    h.write_bytes("c", 70_000, &noise(4, 3_000));
    assert_eq!(h.snap(SnapKind::Incremental).as_deref(), Some("s1"));
    h.apply(&Op::File(FileOp::Punch {
        p: 0,
        off: 1_000,
        len: 40_000,
    }));
    h.truncate("b", 60_000);
    h.write_bytes("b", 50_000, &noise(5, 1_000));
    assert_eq!(h.snap(SnapKind::Incremental).as_deref(), Some("s2"));
    h.apply(&Op::File(FileOp::Unlink { p: 2 }));
    h.write_bytes("a", 90_000, &noise(6, 20_000));
    h.apply(&Op::File(FileOp::ZeroRange {
        p: 1,
        off: 0,
        len: 6_000,
    }));
    assert_eq!(h.snap(SnapKind::Differential).as_deref(), Some("s3"));
    h.write_bytes("d", 0, &noise(7, 33_000));
    h.truncate("a", 50_000);
    assert_eq!(h.snap(SnapKind::Incremental).as_deref(), Some("s4"));
    h.write_bytes("a", 10_000, &noise(8, 10_000));
    h.vfs().snapshot_wait().unwrap();
    h.verify_all();
    h
}

/// Deleting any position of a full/incr/incr/diff/incr chain leaves every
/// other snapshot byte-identical, and so does deleting the rest one by one.
#[test]
fn delete_every_position_of_a_chain() {
    for bs in [512, 4096] {
        for first in 0..5 {
            let mut h = chain(bs);
            // Delete `first`, then the others in a rotating order, checking
            // all remaining snapshots (and a remount in between) each time.
            h.delete(first);
            h.verify_all();
            h.remount(1);
            let mut k = first;
            while !h.snaps.is_empty() {
                k = (k + 2) % h.snaps.len();
                h.delete(k);
                h.verify_all();
            }
            h.finish();
        }
    }
}

/// Writes to many blocks of a big file right after a full snapshot starts
/// (copy-before-write): the snapshot shows the content before them.
#[test]
fn writes_while_a_big_full_snapshot_is_pending() {
    let mut h = Harness::new(1, 4096);
    let size = 8 << 20;
    h.write_bytes("a", 0, &noise(11, size));
    h.vfs().commit().unwrap();
    h.snap(SnapKind::Full).unwrap();
    let pending_at_start = h.vfs().snaps.is_active();
    for i in 0..200u64 {
        let off = (i * 41_017 * 7) % size as u64;
        h.write_bytes("a", off, &noise(100 + i, 3_000));
    }
    h.truncate("a", (size - 100_000) as u64);
    // Compared while the capture may still run, then after it.
    h.verify_all();
    h.vfs().snapshot_wait().unwrap();
    h.verify_all();
    h.finish();
    eprintln!("capture still pending at the first write: {pending_at_start}");
}

/// Writes over frames whose pending blocks are scattered (an incremental of
/// every third block): copy-before-write reads each frame's pieces at once
/// and saves only them.
#[test]
fn writes_while_a_scattered_incremental_is_pending() {
    for bs in [512u64, 4096] {
        let mut h = Harness::new(2, bs as u32);
        let size = 4 << 20;
        h.write_bytes("a", 0, &noise(31, size));
        h.snap(SnapKind::Full).unwrap();
        h.vfs().snapshot_wait().unwrap();
        let blocks = size as u64 / bs;
        for b in (0..blocks).step_by(3) {
            h.write_bytes("a", b * bs, &noise(1000 + b, bs as usize));
        }
        h.snap(SnapKind::Incremental).unwrap();
        for i in 0..300u64 {
            let off = (i * 7_919 * bs + i * 13) % (size as u64 - 40_000);
            h.write_bytes("a", off, &noise(5000 + i, 1 + (i as usize * 131) % 40_000));
        }
        h.verify_all();
        h.vfs().snapshot_wait().unwrap();
        h.verify_all();
        h.finish();
    }
}

/// Copy-before-write reads the pending pieces of the frames a write touches
/// in one read, with the blocks between them. A whole frame between two
/// pieces may hold nothing pending, and its writers do not wait for that
/// read: those blocks are read under their stripes, or a block read in the
/// middle of its write failed its checksum and the capture (so the
/// snapshot) with it. Pending here: frames 1 and 3 of every 4; one thread
/// writes frames 1 to 3 at once, three others frame 2 of the same group.
/// (A stress test: the race was found by reading the code, and this test
/// did not make the unlocked read fail in four runs on the reference
/// machine; it keeps the scenario and fails on any checksum error.)
#[test]
fn copy_before_write_reads_unpending_blocks_under_their_stripes() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut h = Harness::new(1, 4096);
    let bs = 4096u64;
    let size: u64 = 32 << 20;
    let groups = size / bs / 64;
    h.write_bytes("a", 0, &noise(61, size as usize));
    h.snap(SnapKind::Full).unwrap();
    h.vfs().snapshot_wait().unwrap();
    for g in 0..groups {
        for frame in [1u64, 3] {
            h.write_bytes(
                "a",
                (g * 64 + frame * 16) * bs,
                &noise(g * 4 + frame, 16 * bs as usize),
            );
        }
    }
    h.snap(SnapKind::Incremental).unwrap();
    let v = h.vfs();
    let ino = v.lookup(ROOT_INO, b"a").unwrap().ino;
    let current = AtomicU64::new(0);
    let seen = AtomicU64::new(u64::MAX - 1);
    std::thread::scope(|sc| {
        let (current, seen) = (&current, &seen);
        sc.spawn(move || {
            let fh = v.open(ino, true).unwrap();
            // From the end: the capture saves from the start.
            for g in (0..groups).rev() {
                current.store(g, Ordering::SeqCst);
                // Once frame 2 of this group is being written.
                while seen.load(Ordering::SeqCst) != g {
                    std::hint::spin_loop();
                }
                if !v.snaps.is_active() {
                    break;
                }
                v.write(fh, (g * 64 + 16) * bs, &vec![7u8; 48 * bs as usize])
                    .unwrap();
            }
            current.store(u64::MAX, Ordering::SeqCst);
            v.release(fh).unwrap();
        });
        for t in 0..3u64 {
            sc.spawn(move || {
                let fh = v.open(ino, true).unwrap();
                let mut k = t;
                loop {
                    let g = current.load(Ordering::SeqCst);
                    if g == u64::MAX {
                        break;
                    }
                    seen.store(g, Ordering::SeqCst);
                    let fill = vec![(k % 250) as u8 + 1; 16 * bs as usize];
                    v.write(fh, (g * 64 + 32) * bs, &fill).unwrap();
                    k += 3;
                }
                v.release(fh).unwrap();
            });
        }
    });
    v.snapshot_wait().unwrap();
    let states: Vec<String> = v.snapshot_list().into_iter().map(|s| s.state).collect();
    assert_eq!(states, ["complete", "complete"], "{:?}", v.snapshot_list());
    let errors = v
        .pool
        .integrity
        .checksum_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors, 0, "blocks read in the middle of their write");
    // The snapshots still read as they were taken (the live file is not
    // the model's any more, so only they are compared).
    h.verify_snapshots();
}

/// Truncating to 0 and regrowing between snapshots (by write and by truncate).
#[test]
fn truncate_to_zero_then_regrow_between_snapshots() {
    for bs in [512, 1024, 4096] {
        let mut h = Harness::new(2, bs);
        h.write_bytes("a", 0, &noise(21, 70_000));
        h.snap(SnapKind::Full).unwrap();
        h.truncate("a", 0);
        h.write_bytes("a", 30_000, &noise(22, 5_000));
        h.snap(SnapKind::Incremental).unwrap();
        h.truncate("a", 0);
        h.truncate("a", 90_000);
        h.snap(SnapKind::Incremental).unwrap();
        h.truncate("a", 0);
        h.snap(SnapKind::Differential).unwrap();
        h.truncate("a", 40_000);
        h.write_bytes("a", 100, &noise(23, 100));
        h.snap(SnapKind::Incremental).unwrap();
        h.vfs().snapshot_wait().unwrap();
        h.verify_all();
        h.apply(&Op::Restore {
            pick: 0,
            file: None,
        });
        h.apply(&Op::Restore {
            pick: 3,
            file: Some(0),
        });
        h.apply(&Op::Delete { pick: 1 });
        h.apply(&Op::Delete { pick: 0 });
        h.apply(&Op::Remount { member: 0 });
        h.finish();
    }
}

/// Unlinking a file (and committing, which would drop its extent files) while
/// its snapshot is still being captured: the snapshot still reads it.
#[test]
fn unlink_while_its_snapshot_is_pending() {
    let mut h = Harness::new(2, 4096);
    let size = 8 << 20;
    h.write_bytes("a", 0, &noise(31, size));
    h.write_bytes("b", 0, &noise(32, 100_000));
    h.snap(SnapKind::Full).unwrap();
    h.apply(&Op::File(FileOp::Unlink { p: 0 }));
    h.vfs().commit().unwrap();
    h.verify_all();
    h.vfs().snapshot_wait().unwrap();
    h.verify_all();
    // An incremental on top, after another unlink while pending.
    h.write_bytes("b", 0, &noise(33, 50_000));
    h.snap(SnapKind::Incremental).unwrap();
    h.apply(&Op::File(FileOp::Unlink { p: 1 }));
    h.apply(&Op::File(FileOp::Commit));
    h.apply(&Op::Wait);
    h.apply(&Op::Restore {
        pick: 0,
        file: None,
    });
    h.apply(&Op::Remount { member: 1 });
    h.finish();
}

// ----- regressions -----

/// `wait_idle` returned while the capture thread still held the store (and so
/// the pool's member locks): dropping the `Vfs` right after it and reopening
/// the pool failed with "already mounted" (the unclean stop of `Op::Crash`).
#[test]
fn regression_reopen_right_after_wait_idle() {
    let mut h = Harness::new(1, 4096);
    for i in 0..20 {
        h.write_bytes("a", 0, &noise(40 + i, 200_000));
        h.apply(&Op::Crash {
            member: i as usize % 2,
        });
    }
    h.apply(&Op::Snap {
        kind: SnapKind::Incremental,
        then: vec![],
        wait: false,
    });
    h.apply(&Op::Delete { pick: 3 });
    h.finish();
}

/// Deleting a snapshot moves its interval of changes to the next readable
/// snapshot in time, but only the record right after it was rewritten: with a
/// failed snapshot in between, the new interval never reached the disk, and a
/// differential after a remount missed the blocks changed before the deleted
/// one (it read them from the full).
#[test]
fn regression_delete_before_a_failed_snapshot_keeps_the_interval() {
    let mut h = Harness::new(1, 4096);
    h.write_bytes("a", 0, &noise(50, 50_000));
    h.apply(&Op::Snap {
        kind: SnapKind::Full,
        then: vec![],
        wait: true,
    });
    h.write_bytes("a", 0, &noise(51, 10_000));
    h.apply(&Op::Snap {
        kind: SnapKind::Incremental,
        then: vec![],
        wait: true,
    });
    h.apply(&Op::Crash { member: 0 });
    h.apply(&Op::Snap {
        kind: SnapKind::Differential,
        then: vec![],
        wait: true,
    });
    // s0 full, s1 incremental, s2 failed, s3 differential: delete s1.
    h.apply(&Op::Delete { pick: 1 });
    h.apply(&Op::Remount { member: 1 });
    h.apply(&Op::Snap {
        kind: SnapKind::Differential,
        then: vec![],
        wait: true,
    });
    h.finish();
}

/// A capture that fails gives its interval of changes back to the live
/// bitmaps, but only for the files it had blocks to save: a file truncated
/// to 0 (changed, nothing to save) lost its changes, and once regrown by a
/// truncate, the next incremental showed the old content of the full.
#[test]
fn regression_failed_capture_gives_back_every_change() {
    let mut h = Harness::new(1, 4096);
    h.write_bytes("a", 0, &noise(60, 40_000));
    h.apply(&Op::Snap {
        kind: SnapKind::Full,
        then: vec![],
        wait: true,
    });
    h.apply(&Op::File(FileOp::Truncate { p: 0, size: 0 }));
    h.write_bytes("b", 0, &noise(61, 10_000));
    h.apply(&Op::FailSnap {
        kind: SnapKind::Incremental,
    });
    assert_eq!(h.failed.len(), 1, "the capture did not fail");
    h.apply(&Op::File(FileOp::Truncate { p: 0, size: 40_000 }));
    h.apply(&Op::Snap {
        kind: SnapKind::Incremental,
        then: vec![],
        wait: true,
    });
    h.finish();
}

/// Reads of a snapshot from other threads while the snapshots it is based on
/// are deleted (each deletion rewrites its deltas): every read returns the
/// snapshot's content.
#[test]
fn reads_during_deletions_of_the_chain_below() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    for round in 0..3u64 {
        let mut h = Harness::new(1, 512);
        for i in 0..6u64 {
            for (k, f) in ["a", "b"].into_iter().enumerate() {
                let off = (i * 37_000 + k as u64 * 11_000) % 150_000;
                h.write_bytes(f, off, &noise(round * 100 + i * 2 + k as u64, 60_000));
            }
            h.snap(if i == 0 {
                SnapKind::Full
            } else {
                SnapKind::Incremental
            })
            .unwrap();
            h.vfs().snapshot_wait().unwrap();
        }
        let last = h.snaps.last().unwrap();
        let (name, want) = (last.name.clone(), last.files.clone());
        let stop = AtomicBool::new(false);
        let reads = AtomicU64::new(0);
        let v = h.vfs();
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let (stop, reads, want, name) = (&stop, &reads, &want, &name);
                sc.spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        let sd = v.lookup(ROOT_INO, b".snapshots").unwrap().ino;
                        let root = v.lookup(sd, name.as_bytes()).unwrap().ino;
                        for (f, content) in want {
                            let ino = v.lookup(root, f.as_bytes()).unwrap().ino;
                            let fh = v.open(ino, false).unwrap();
                            let step = 20_000 + t as usize * 7_001;
                            let mut pos = 0;
                            while pos < content.len() {
                                let got = v.read(fh, pos as u64, step as u32).unwrap();
                                let end = (pos + step).min(content.len());
                                assert!(
                                    got == content[pos..end],
                                    "{name}/{f} at {pos} read during deletions differs \
                                     (first diff at {:?})",
                                    first_diff(&got, &content[pos..end]).map(|d| d + pos)
                                );
                                pos = end;
                            }
                            v.release(fh).unwrap();
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            // Newest parent first: every deletion rewrites the last snapshot.
            for k in (0..5).rev() {
                std::thread::sleep(std::time::Duration::from_millis(5));
                v.snapshot_delete(&format!("s{k}")).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            stop.store(true, Ordering::Release);
        });
        assert!(reads.load(Ordering::Relaxed) > 0);
        h.snaps.drain(..5);
        h.verify_all();
        h.finish();
    }
}

/// A merge wrote the new delta of a file that had a delta in neither the
/// deleted snapshot nor its child on one new member, whatever the pool's
/// `copies`: a pool with copies=2 lost the second copy of that delta. Such
/// a file: created after the deleted snapshot and grown only by a truncate
/// (which marks no block changed), so the child has no delta for it either,
/// and the merge records its blocks as holes (the deleted snapshot lacked
/// the file). Every delta must keep `copies` copies, placed like a capture's.
#[test]
fn regression_merged_delta_gets_every_copy() {
    let mut h = Harness::new(2, 4096);
    h.write_bytes("a", 0, &noise(70, 50_000));
    h.snap(SnapKind::Full).unwrap();
    h.write_bytes("a", 10_000, &noise(71, 5_000));
    h.snap(SnapKind::Incremental).unwrap();
    // `b` is new after s1, and only grown by a truncate.
    h.truncate("b", 60_000);
    let child = h.snap(SnapKind::Incremental).unwrap();
    h.vfs().snapshot_wait().unwrap();
    let b = h.vfs().lookup(ROOT_INO, b"b").unwrap().ino;
    let before = h.vfs().snaps.by_name(&child).unwrap();
    assert!(
        !before.deltas.contains_key(&b),
        "the child already has a delta of b: the test no longer builds its case"
    );
    // Delete s1 (the child's base): the child's `b` is merged into a new delta.
    h.delete(1);
    h.verify_all();
    let after = h.vfs().snaps.by_name(&child).unwrap();
    let loc = after
        .deltas
        .get(&b)
        .expect("the merge wrote no delta of b: the test no longer builds its case");
    let mut members = loc.members.clone();
    members.sort_unstable();
    members.dedup();
    assert_eq!(
        members.len(),
        2,
        "merged delta of b on {:?}, want 2 distinct members (copies=2)",
        loc.members
    );
    for (ino, l) in &after.deltas {
        assert_eq!(
            l.members.len(),
            2,
            "delta of inode {ino} on {:?}",
            l.members
        );
    }
    h.remount(1);
    h.finish();
}
