//! The snapshot commands: create, wait, delete, hold, prune, restore and
//! clone (the admin socket's `vpool snapshot ...`), and `mkdir`/`rmdir`
//! directly in `.snapshots`, which create and delete.
//!
//! Invariants: one command at a time (`SnapshotStore::admin`, taken before
//! any other lock, fs/mod.rs), after any capture still running has ended
//! (`wait_idle`), except `wait` and `hold`; every command ends with a commit
//! (so what it reports done is durable); restore and clone change live files
//! only through the live view's own operations, under the gate, so a capture
//! running meanwhile still saves what they overwrite.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Progress;
use super::core::{Attr, Caller, SetAttr, TimeSet, Vfs};
use super::ino::{INO_BITS, MAX_SNAP_ID, snap_ino};
use super::node::NewNode;
use crate::error::{FsError, FsResult};
use crate::pool::meta::{NodeKind, ROOT_INO};
use crate::snapshot::prune::Decision;
use crate::snapshot::ranges::RangeSet;
use crate::snapshot::{Freeze, Kind, PrunePolicy, SnapshotInfo, SnapshotRecord, State, check_name};

/// What `snapshot restore` did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub files: u64,
    pub blocks_written: u64,
    pub blocks_punched: u64,
    pub blocks_compared: u64,
    /// The files rewritten, for the daemon to refresh the kernel's view
    /// (fs/kernel_refresh.rs); not sent to the CLI.
    #[serde(skip)]
    pub restored: Vec<super::kernel_refresh::Restored>,
}

/// Splits a pool-relative path into its names ("a/b/c", leading '/' allowed).
fn components(path: &[u8]) -> Vec<&[u8]> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect()
}

impl Vfs {
    /// `mkdir NAME` in `.snapshots`: creates snapshot `NAME`.
    pub(crate) fn mkdir_snapshot(&self, name: &[u8]) -> FsResult<Attr> {
        let name = std::str::from_utf8(name).map_err(|_| FsError::Invalid)?;
        let info = self.snapshot_create(name, None)?;
        self.snapview().getattr(snap_ino(info.id, ROOT_INO))
    }

    /// `rmdir NAME` in `.snapshots`: deletes snapshot `NAME`.
    pub(crate) fn rmdir_snapshot(&self, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        let name = std::str::from_utf8(name).map_err(|_| FsError::NotFound)?;
        self.snapshot_delete(name)
    }

    pub fn snapshot_list(&self) -> Vec<SnapshotInfo> {
        let held = self.pool.info.holds();
        let mut list = self.snaps.infos();
        for i in &mut list {
            i.held = held.contains(&i.id);
        }
        list
    }

    /// Creates snapshot `name`: freezes writers for as long as it takes to copy
    /// the namespace and take the changed-block bitmaps, then captures the data
    /// in the background (see snapshot/store.rs). The snapshot is readable at
    /// once.
    pub fn snapshot_create(&self, name: &str, kind: Option<Kind>) -> FsResult<SnapshotInfo> {
        self.snapshot_create_with(name, kind, None)
    }

    /// [`Vfs::snapshot_create`] with a zstd level for its deltas (1..=19;
    /// `None`: the default, the fastest).
    pub fn snapshot_create_with(
        &self,
        name: &str,
        kind: Option<Kind>,
        level: Option<i32>,
    ) -> FsResult<SnapshotInfo> {
        self.writable()?;
        if let Some(l) = level
            && !(1..=19).contains(&l)
        {
            return Err(FsError::Message(format!(
                "compression level {l}: expected 1 to 19"
            )));
        }
        check_name(name)?;
        let _admin = self.snaps.admin.lock();
        self.snaps.wait_idle();
        if self.snaps.by_name(name).is_some() {
            return Err(FsError::Exists);
        }
        let (kind, parent) = self.snaps.plan(kind)?;
        // Most of what is pending becomes durable outside the freeze.
        let t0 = std::time::Instant::now();
        self.commit()?;
        let t1 = std::time::Instant::now();
        let job = {
            let _gate = self.gate.write();
            let frozen = std::time::Instant::now();
            let ns = self.ns.read();
            let mut inodes = BTreeMap::new();
            let mut files = Vec::new();
            let mut interval = BTreeMap::new();
            for (ino, n) in &ns.nodes {
                let mut rec = n.record();
                if rec.nlink == 0 && *ino != ROOT_INO {
                    continue;
                }
                if *ino >= 1 << INO_BITS {
                    return Err(FsError::Message(format!(
                        "inode {ino} is beyond what .snapshots can number"
                    )));
                }
                rec.extents.clear();
                if let Some(v) = &n.volume {
                    let changed = v.changed_ranges();
                    v.clear_changed();
                    if !changed.is_empty() {
                        interval.insert(*ino, RangeSet::from_ranges(&changed));
                    }
                    files.push((*ino, v.clone(), rec.size));
                }
                inodes.insert(*ino, rec);
            }
            let mut dirents = BTreeMap::new();
            for (parent, children) in &ns.children {
                for (name, child) in children {
                    dirents.insert((*parent, name.clone()), *child);
                }
            }
            let freeze = Freeze {
                name: name.to_string(),
                kind,
                inodes,
                dirents,
                files,
                interval,
                level,
            };
            let job = self.snaps.begin(freeze, parent)?;
            tracing::debug!(
                commit_ms = (t1 - t0).as_millis() as u64,
                gate_wait_ms = (frozen - t1).as_millis() as u64,
                frozen_ms = frozen.elapsed().as_millis() as u64,
                "snapshot freeze"
            );
            job
        };
        if job.id > MAX_SNAP_ID {
            tracing::warn!(id = job.id, "snapshot id beyond the .snapshots numbering");
        }
        // The thread is waited for by `wait_idle` (it holds the pool). On
        // storage that wants one order of operations (the simulator) the
        // capture runs here, before anything else touches the pool.
        if !self.pool.storage().concurrent() {
            self.snaps.run_job(job.clone());
        } else if let Err(e) = self.snaps.spawn_job(job.clone()) {
            // Without a worker the capture runs here.
            tracing::warn!(error = %e, "cannot start the snapshot thread; capturing inline");
            self.snaps.run_job(job.clone());
        }
        // The record is durable only once this commit is: until then a crash
        // loses the snapshot, so its creation is not reported done before.
        if let Err(e) = self.commit() {
            tracing::warn!(error = %e, "commit after snapshot creation failed; it will be retried");
            return Err(FsError::Message(format!(
                "snapshot {name} is being captured, but its record could not be made durable ({e:?}); it may not survive a crash"
            )));
        }
        self.snaps
            .infos()
            .into_iter()
            .find(|i| i.id == job.id)
            .ok_or(FsError::NotFound)
    }

    /// Waits for a running capture to end, then commits its record.
    pub fn snapshot_wait(&self) -> FsResult<()> {
        self.snapshot_wait_with(&mut |_, _| true)
    }

    /// [`Vfs::snapshot_wait`] with progress: `progress` counts blocks saved; when it returns `false` the wait
    /// ends (the capture goes on: [`Vfs::job_cancel`] stops it).
    pub fn snapshot_wait_with(&self, progress: Progress) -> FsResult<()> {
        while let Some(job) = self.snaps.active_job() {
            let (done, total) = job.progress();
            if !progress(done, total) {
                return Err(FsError::Cancelled);
            }
            if !self.pool.storage().concurrent() {
                break;
            }
            self.snaps
                .wait_idle_for(std::time::Duration::from_millis(200));
        }
        self.snaps.wait_idle();
        self.commit()
    }

    /// Deletes a snapshot (see [`crate::snapshot::SnapshotStore::delete`]);
    /// a held one is refused. `progress` counts the files merged.
    pub fn snapshot_delete(&self, name: &str) -> FsResult<()> {
        self.snapshot_delete_with(name, &mut |_, _| true)
    }

    /// [`Vfs::snapshot_delete`] with progress.
    pub fn snapshot_delete_with(&self, name: &str, progress: Progress) -> FsResult<()> {
        self.writable()?;
        let _admin = self.snaps.admin.lock();
        self.snaps.wait_idle();
        self.delete_locked(name, progress)
    }

    /// Holds a snapshot (prune and delete leave it) or releases it.
    pub fn snapshot_hold(&self, name: &str, held: bool) -> FsResult<()> {
        self.writable()?;
        let _admin = self.snaps.admin.lock();
        let rec = self.snaps.by_name(name).ok_or(FsError::NotFound)?;
        self.pool.info.set_hold(rec.id, held);
        self.commit()
    }

    /// Names of the held snapshots.
    pub fn snapshot_holds(&self) -> BTreeSet<String> {
        let held = self.pool.info.holds();
        self.snaps
            .records()
            .iter()
            .filter(|r| held.contains(&r.id))
            .map(|r| r.name.clone())
            .collect()
    }

    fn delete_locked(&self, name: &str, progress: Progress) -> FsResult<()> {
        let rec = self.snaps.by_name(name).ok_or(FsError::NotFound)?;
        if self.pool.info.holds().contains(&rec.id) {
            return Err(FsError::Message(format!(
                "snapshot {name} is held: `vpool snapshot release` it first"
            )));
        }
        let (old, to_live) = self.snaps.delete(rec.id, progress)?;
        {
            let ns = self.ns.read();
            for (ino, set) in to_live {
                if let Some(v) = ns.nodes.get(&ino).and_then(|n| n.volume.as_ref()) {
                    for (s, e) in set.iter() {
                        v.mark_blocks(s, e);
                    }
                }
            }
        }
        self.commit()?;
        self.pool.emit(
            "snapshot_deleted",
            crate::pool::info::Severity::Info,
            None,
            format!("snapshot {name} deleted"),
        );
        for p in old {
            let st = self.pool.storage();
            let r = if st.is_dir(&p) {
                crate::storage::remove_dir_all(st, &p)
            } else {
                st.remove_file(&p)
            };
            if let Err(e) = r
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove old snapshot file");
            }
        }
        Ok(())
    }

    /// Deletes what `policy` does not keep (of the snapshots with its
    /// prefix; held ones stay). Returns the plan, every considered
    /// snapshot with its verdict; with `dry_run` nothing is deleted.
    /// `progress` counts the snapshots deleted.
    pub fn snapshot_prune(
        &self,
        policy: &PrunePolicy,
        dry_run: bool,
        progress: Progress,
    ) -> FsResult<Vec<Decision>> {
        if !policy.has_rule() {
            return Err(FsError::Message(
                "no keep rule given: refusing to delete every snapshot".into(),
            ));
        }
        let _admin = self.snaps.admin.lock();
        self.snaps.wait_idle();
        let plan = crate::snapshot::prune::plan(
            &self.snaps.prune_candidates(&self.pool.info.holds()),
            policy,
        );
        if !dry_run {
            self.writable()?;
            let gone: Vec<&Decision> = plan.iter().filter(|d| !d.keep).collect();
            let total = gone.len() as u64;
            for (i, d) in gone.iter().enumerate() {
                if !progress(i as u64, total) {
                    return Err(FsError::Cancelled);
                }
                self.delete_locked(&d.name, &mut |_, _| true)?;
            }
            progress(total, total);
        }
        Ok(plan)
    }

    /// Every file of a snapshot with its pool-relative path.
    fn snap_files(rec: &SnapshotRecord) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![(Vec::new(), ROOT_INO)];
        let mut seen = BTreeSet::new();
        while let Some((path, dir)) = stack.pop() {
            if !seen.insert(dir) {
                continue;
            }
            for ((_, name), child) in rec
                .dirents
                .range((dir, Vec::new())..)
                .take_while(|((p, _), _)| *p == dir)
            {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                match rec.inodes.get(child).map(|r| r.kind) {
                    Some(NodeKind::Dir) => stack.push((p, *child)),
                    Some(NodeKind::File) => out.push((p, *child)),
                    _ => {}
                }
            }
        }
        out.sort();
        out
    }

    pub(crate) fn snap_resolve(rec: &SnapshotRecord, path: &[u8]) -> FsResult<u64> {
        let mut cur = ROOT_INO;
        for c in components(path) {
            cur = *rec
                .dirents
                .get(&(cur, c.to_vec()))
                .ok_or(FsError::NotFound)?;
        }
        Ok(cur)
    }

    /// The live inode at `path`, creating missing directories (with the
    /// snapshot's attributes) and the file itself when `create` is given.
    fn live_resolve(&self, path: &[u8], create: Option<(&SnapshotRecord, bool)>) -> FsResult<u64> {
        let comps = components(path);
        let mut cur = ROOT_INO;
        let mut snap_cur = ROOT_INO;
        for (i, c) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            let found = {
                let ns = self.ns.read();
                ns.dir(cur)?.get(*c).copied()
            };
            if let Some((rec, _)) = create {
                snap_cur = rec
                    .dirents
                    .get(&(snap_cur, c.to_vec()))
                    .copied()
                    .unwrap_or(0);
            }
            cur = match (found, create) {
                (Some(ino), _) => ino,
                (None, Some((rec, make_parents))) if !last && make_parents => {
                    let r = rec.inodes.get(&snap_cur);
                    let node = self.live().make_node(
                        cur,
                        c,
                        NewNode {
                            kind: NodeKind::Dir,
                            mode: r.map(|r| r.mode).unwrap_or(0o755),
                            rdev: 0,
                            target: Vec::new(),
                        },
                        Caller {
                            uid: r.map(|r| r.uid).unwrap_or(0),
                            gid: r.map(|r| r.gid).unwrap_or(0),
                        },
                    )?;
                    node.ino
                }
                (None, Some((rec, _))) if last => {
                    if let Some(k) = self.kernel.get() {
                        k.inval_entry(cur, c);
                    }
                    let r = rec.inodes.get(&snap_cur);
                    let node = self.live().make_node(
                        cur,
                        c,
                        NewNode {
                            kind: NodeKind::File,
                            mode: r.map(|r| r.mode).unwrap_or(0o644),
                            rdev: 0,
                            target: Vec::new(),
                        },
                        Caller {
                            uid: r.map(|r| r.uid).unwrap_or(0),
                            gid: r.map(|r| r.gid).unwrap_or(0),
                        },
                    )?;
                    node.ino
                }
                _ => return Err(FsError::NotFound),
            };
        }
        Ok(cur)
    }

    /// Rolls files back to their content in snapshot `name` (every file of the
    /// snapshot when `paths` is empty), writing only blocks that differ. Paths
    /// are pool-relative. A file deleted since is re-created.
    /// `progress` counts blocks of the files examined; when it returns
    /// `false` the restore stops after the file it is in (files are
    /// restored whole or not touched).
    pub fn snapshot_restore(&self, name: &str, paths: &[Vec<u8>]) -> FsResult<RestoreReport> {
        self.snapshot_restore_with(name, paths, &mut |_, _| true)
    }

    /// [`Vfs::snapshot_restore`] with progress.
    pub fn snapshot_restore_with(
        &self,
        name: &str,
        paths: &[Vec<u8>],
        progress: Progress,
    ) -> FsResult<RestoreReport> {
        self.writable()?;
        let _admin = self.snaps.admin.lock();
        self.snaps.wait_idle();
        let rec = self
            .snaps
            .by_name(name)
            .filter(|r| r.state == State::Complete)
            .ok_or(FsError::NotFound)?;
        let targets: Vec<(Vec<u8>, u64)> = if paths.is_empty() {
            Self::snap_files(&rec)
        } else {
            let mut v = Vec::new();
            for p in paths {
                let ino = Self::snap_resolve(&rec, p)?;
                match rec.inodes.get(&ino).map(|r| r.kind) {
                    Some(NodeKind::File) => v.push((p.clone(), ino)),
                    Some(NodeKind::Dir) => {
                        // A directory restores every file below it.
                        let prefix = components(p).join(&b'/');
                        for (fp, fi) in Self::snap_files(&rec) {
                            if prefix.is_empty()
                                || (fp.starts_with(&prefix) && fp.get(prefix.len()) == Some(&b'/'))
                            {
                                v.push((fp, fi));
                            }
                        }
                    }
                    _ => return Err(FsError::Invalid),
                }
            }
            v
        };
        let mut report = RestoreReport::default();
        let bs = self.pool.config().block_size as u64;
        let blocks = |ino: &u64| rec.inodes.get(ino).map_or(0, |r| r.size.div_ceil(bs));
        let total: u64 = targets.iter().map(|(_, i)| blocks(i)).sum();
        let mut done = 0;
        progress(0, total);
        for (path, sino) in targets {
            if !progress(done, total) {
                self.commit()?;
                return Err(FsError::Cancelled);
            }
            done += blocks(&sino);
            let live = self.live_resolve(&path, Some((&rec, true)))?;
            self.restore_file(&rec, sino, live, &mut report)?;
            report.files += 1;
            if let Some(s) = rec.inodes.get(&sino) {
                report.restored.push(super::kernel_refresh::Restored {
                    path,
                    ino: live,
                    size: s.size,
                    mtime: s.mtime,
                });
            }
        }
        progress(total, total);
        self.commit()?;
        Ok(report)
    }

    /// Blocks of live file `live` that may differ from `sino` in `rec`.
    fn restore_candidates(
        &self,
        rec: &SnapshotRecord,
        sino: u64,
        live: u64,
        nblocks: u64,
    ) -> RangeSet {
        let mut set = RangeSet::new();
        // A received snapshot's inode numbers are another pool's (or this
        // pool's at another time): no shortcut, every block is compared.
        if sino != live || rec.is_received() {
            if nblocks > 0 {
                set.insert(0, nblocks);
            }
            return set;
        }
        // Same file: only blocks changed since the snapshot can differ.
        for r in self.snaps.records() {
            if r.id > rec.id
                && let Some(i) = r.interval.get(&sino)
            {
                set.union_with(i);
            }
        }
        if let Ok(n) = self.ns.read().node(live)
            && let Some(v) = &n.volume
        {
            for (s, e) in v.changed_ranges() {
                set.insert(s, e);
            }
        }
        set.clip(nblocks);
        set
    }

    fn restore_file(
        &self,
        rec: &SnapshotRecord,
        sino: u64,
        live: u64,
        report: &mut RestoreReport,
    ) -> FsResult<()> {
        let srec = rec.inodes.get(&sino).ok_or(FsError::NotFound)?.clone();
        let node = self.ns.read().node(live)?;
        if node.kind() != NodeKind::File {
            return Err(FsError::IsDir);
        }
        let bs = self.pool.config().block_size as u64;
        let live_size = self.live().getattr(live)?.size;
        let nblocks = srec.size.div_ceil(bs).max(live_size.div_ceil(bs));
        let candidates = self.restore_candidates(rec, sino, live, nblocks);
        let result = self.with_handle(&node, |fh| {
            if live_size > srec.size {
                self.live().setattr(
                    live,
                    SetAttr {
                        size: Some(srec.size),
                        ..Default::default()
                    },
                )?;
            }
            let snap_blocks = srec.size.div_ceil(bs);
            for (s, e) in candidates.iter() {
                let e = e.min(snap_blocks);
                let mut b = s;
                while b < e {
                    let n = (e - b).min(256);
                    let off = b * bs;
                    let len = n * bs;
                    let want = self.snaps.read(rec.id, sino, off, len)?;
                    let _gate = self.gate.read();
                    let have = self.live().read(fh, off, len as u32)?;
                    for k in 0..n as usize {
                        let lo = k * bs as usize;
                        if lo >= want.len() {
                            break;
                        }
                        let hi = (lo + bs as usize).min(want.len());
                        let w = &want[lo..hi];
                        let h = have.get(lo..hi.min(have.len())).unwrap_or(&[]);
                        report.blocks_compared += 1;
                        let same = h.len() == w.len() && h == w
                            || (w.iter().all(|x| *x == 0) && h.iter().all(|x| *x == 0));
                        if same {
                            continue;
                        }
                        let at = off + lo as u64;
                        if w.iter().all(|x| *x == 0) {
                            self.live().punch_within_size(fh, at, w.len() as u64)?;
                            report.blocks_punched += 1;
                        } else {
                            self.live().write_locked(fh, at, w)?;
                            report.blocks_written += 1;
                        }
                    }
                    b += n;
                }
            }
            self.live().setattr(
                live,
                SetAttr {
                    size: Some(srec.size),
                    mode: Some(srec.mode),
                    uid: Some(srec.uid),
                    gid: Some(srec.gid),
                    atime: Some(TimeSet::At(srec.atime)),
                    mtime: Some(TimeSet::At(srec.mtime)),
                    ctime: None,
                },
            )?;
            Ok(())
        });
        // The kernel may hold the old content in its page cache.
        if let Some(k) = self.kernel.get() {
            k.inval_inode(live);
        }
        result
    }

    /// Runs `f` with a write handle on `node`, released afterwards however
    /// `f` ends; `f`'s error comes first, then the release's.
    fn with_handle(
        &self,
        node: &std::sync::Arc<super::node::Node>,
        f: impl FnOnce(u64) -> FsResult<()>,
    ) -> FsResult<()> {
        let fh = self.live().new_file_handle(node.clone());
        let r = f(fh);
        let released = self.live().release(fh);
        r.and(released)
    }

    /// Creates `newpath` (pool-relative; its directory must exist) as a new
    /// writable file with the content of `path` in snapshot `name`.
    pub fn snapshot_clone(&self, name: &str, path: &[u8], newpath: &[u8]) -> FsResult<Attr> {
        self.writable()?;
        let _admin = self.snaps.admin.lock();
        self.snaps.wait_idle();
        let rec = self
            .snaps
            .by_name(name)
            .filter(|r| r.state == State::Complete)
            .ok_or(FsError::NotFound)?;
        let sino = Self::snap_resolve(&rec, path)?;
        let srec = rec.inodes.get(&sino).ok_or(FsError::NotFound)?.clone();
        if srec.kind != NodeKind::File {
            return Err(FsError::IsDir);
        }
        let comps = components(newpath);
        let (last, dirs) = comps.split_last().ok_or(FsError::Invalid)?;
        let mut parent = ROOT_INO;
        for c in dirs {
            parent = *self
                .ns
                .read()
                .dir(parent)?
                .get(*c)
                .ok_or(FsError::NotFound)?;
        }
        let node = self.live().make_node(
            parent,
            last,
            NewNode {
                kind: NodeKind::File,
                mode: srec.mode,
                rdev: 0,
                target: Vec::new(),
            },
            Caller {
                uid: srec.uid,
                gid: srec.gid,
            },
        )?;
        if let Some(k) = self.kernel.get() {
            k.inval_entry(parent, last);
        }
        let result = self.with_handle(&node, |fh| {
            let mut pos = 0u64;
            while pos < srec.size {
                let Some(d) = self.snaps.seek(rec.id, sino, pos, true)? else {
                    break;
                };
                let h = self
                    .snaps
                    .seek(rec.id, sino, d, false)?
                    .unwrap_or(srec.size);
                let mut p = d;
                while p < h {
                    let n = (h - p).min(1 << 20);
                    let buf = self.snaps.read(rec.id, sino, p, n)?;
                    let _gate = self.gate.read();
                    self.live().write_locked(fh, p, &buf)?;
                    p += n;
                }
                pos = h;
            }
            self.live().setattr(
                node.ino,
                SetAttr {
                    size: Some(srec.size),
                    ..Default::default()
                },
            )?;
            Ok(())
        });
        result?;
        self.commit()?;
        self.live().getattr(node.ino)
    }
}
