//! Opening a pool's filesystem: [`Vfs::mount`] loads the metadata into the
//! inode table, and, on a writable mount, cleans up what an unclean stop
//! left behind before anything is served.
//!
//! Recovery, in this order (each step relies on the ones before):
//! 1. inodes with no link (unlinked while open) are freed;
//! 2. a snapshot left pending is failed, its changes go back to the live bitmaps;
//! 3. extents named by intent records newer than the last commit are
//!    resynchronised (copies agree, checksums match the data);
//! 4. every file is trimmed to its size (data written past it must not
//!    show when the file grows again);
//! 5. extent copies listed but missing are dropped (when another copy is
//!    there), a commit records all this, and only then are orphan extent
//!    files removed (or quarantined on a diverged member) and the dropped
//!    copies rebuilt.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::core::{Vfs, VfsOptions};
use super::node::{Namespace, Node, NodeMeta};
use crate::error::Result;
use crate::pool::meta::{NodeKind, ROOT_INO, check_blob};
use crate::pool::{ExtentFile, Pool};
use crate::snapshot::SnapshotStore;
use crate::volume::Volume;

impl Vfs {
    /// Loads the pool's metadata, removes what a crash left behind (orphan extent
    /// files, unlinked inodes), and returns the filesystem ready to serve.
    pub fn mount(mut pool: Pool, opts: VfsOptions) -> Result<Vfs> {
        let img = pool.load_metadata(!opts.read_only)?;
        let esize = pool.config().extent_size;
        let bs = pool.config().block_size as u64;
        let words = (esize / bs).div_ceil(64) as usize;
        let mut cbt: HashMap<u64, Vec<(u64, Vec<u64>)>> = HashMap::new();
        for ((ino, index), blob) in &img.cbt {
            let bits = match check_blob(blob) {
                Ok(p) if p.len() == words * 8 => p
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect(),
                _ => {
                    // A damaged bitmap over-reports: the whole extent counts as changed.
                    tracing::warn!(
                        ino,
                        index,
                        "changed-block bitmap damaged; marking the extent changed"
                    );
                    vec![u64::MAX; words]
                }
            };
            cbt.entry(*ino).or_default().push((*index, bits));
        }
        // Extents being changed at an unclean stop may differ from what the last
        // commit knows: they count as wholly changed.
        pool.intent_tag.store(img.generation + 1, Ordering::SeqCst);
        let suspects = pool.pending_intents(img.generation)?;
        if !suspects.is_empty() {
            tracing::info!(
                extents = suspects.len(),
                "extents were being written at an unclean stop"
            );
        }
        let mut ns = Namespace {
            next_ino: img.next_ino.max(ROOT_INO + 1),
            ..Default::default()
        };
        for (ino, rec) in &img.inodes {
            let volume = (rec.kind == NodeKind::File).then(|| {
                let v = Volume::new(
                    *ino,
                    esize,
                    bs,
                    &rec.extents,
                    cbt.remove(ino).unwrap_or_default(),
                );
                let per = esize / bs;
                for (_, index) in suspects.range((*ino, 0)..=(*ino, u64::MAX)) {
                    v.mark_blocks(index * per, (index + 1) * per);
                }
                Arc::new(v)
            });
            let node = Node::new(*ino, NodeMeta::of_record(rec), volume, false, rec.size);
            if rec.kind == NodeKind::Dir {
                ns.children.insert(*ino, BTreeMap::new());
            }
            ns.nodes.insert(*ino, Arc::new(node));
            ns.next_ino = ns.next_ino.max(ino + 1);
        }
        for ((parent, name), child) in &img.dirents {
            ns.children
                .entry(*parent)
                .or_default()
                .insert(name.clone(), *child);
        }
        if !ns.nodes.contains_key(&ROOT_INO) {
            return Err(crate::Error::CorruptMetadata {
                path: pool.members()[0].dir.clone(),
                reason: "the root directory is missing".into(),
            });
        }
        let pool = Arc::new(pool);
        let (snaps, bad) = SnapshotStore::load(pool.clone(), &img.snapshots, img.next_snap_id);
        for (id, why) in bad {
            tracing::error!(snapshot = id, reason = %why, "snapshot record unreadable; it is left out (see vpool check)");
        }
        let vfs = Vfs {
            pool,
            kernel: std::sync::OnceLock::new(),
            opts,
            ns: RwLock::new(ns),
            gate: RwLock::new(()),
            snaps: Arc::new(snaps),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            snap_handles: Default::default(),
            commit_lock: Mutex::new(()),
            dirs_unsynced: Mutex::new(HashSet::new()),
            generation: AtomicU64::new(img.generation),
            freed: AtomicU64::new(0),
            jobs: Default::default(),
        };
        if !opts.read_only {
            vfs.recover(&suspects)?;
        }
        Ok(vfs)
    }

    /// Cleans up after an unclean stop: inodes left with no links (unlinked while
    /// open) are freed, and extent files no committed inode references are removed.
    fn recover(&self, suspects: &BTreeSet<(u64, u64)>) -> Result<()> {
        let mut referenced: HashSet<(u32, String)> = HashSet::new();
        // The member files there are, listed before anything reads or trims
        // an extent: copies found missing are dropped first, so that the
        // resync and the trim below work on the copies that exist and the
        // copies rebuilt at the end are made from trimmed ones.
        let mut listed = Vec::new();
        let mut present: HashSet<(u32, String)> = HashSet::new();
        for m in self.pool.members().iter() {
            let list = self
                .pool
                .list_extent_files(m)
                .map_err(|e| crate::Error::io(&m.data_dir, e))?;
            for f in &list {
                if !f.sum {
                    present.insert((m.entry.id, f.name.clone()));
                }
            }
            listed.push((m.entry.id, list));
        }
        let refill;
        {
            let mut ns = self.ns.write();
            let orphans: Vec<u64> = ns
                .nodes
                .iter()
                .filter(|(ino, n)| **ino != ROOT_INO && n.meta.lock().nlink == 0)
                .map(|(ino, _)| *ino)
                .collect();
            for ino in orphans {
                tracing::info!(ino, "freeing inode unlinked before an unclean stop");
                ns.free(ino);
            }
            // A snapshot left pending is failed; its changes go back to the files.
            self.snaps.recover(|ino, s, e| {
                if let Some(v) = ns.nodes.get(&ino).and_then(|n| n.volume.as_ref()) {
                    v.mark_blocks(s, e);
                }
            });
            refill = self.drop_missing_copies(&ns, &present);
            // Extents being written at the stop: make their copies agree and
            // their checksums match the data (the commit below writes them), before
            // anything reads them verified (the trim below does).
            let mut resynced = 0u64;
            for (ino, index) in suspects {
                if let Some(v) = ns.nodes.get(ino).and_then(|n| n.volume.as_ref()) {
                    match v.resync(&self.pool, *index) {
                        Ok(n) => resynced += n,
                        Err(e) => {
                            tracing::error!(ino, extent = index, error = %e, "cannot resynchronise an extent written at the stop")
                        }
                    }
                }
            }
            if !suspects.is_empty() {
                tracing::info!(
                    extents = suspects.len(),
                    blocks_copied = resynced,
                    "extents written at the unclean stop resynchronised"
                );
            }
            // Data written past the committed size before a crash must not show up
            // when the file is later extended: trim every file to its size.
            let mut trimmed = Vec::new();
            for n in ns.nodes.values() {
                if let Some(v) = &n.volume {
                    let size = n.meta.lock().size;
                    let dead = match v.truncate(&self.pool, size) {
                        Ok(d) => d,
                        Err(e) => {
                            // A copy that cannot be opened is reported by check and
                            // scrub; the mount goes on with the copies that can.
                            tracing::warn!(ino = n.ino, error = %e, "cannot trim data past the file size");
                            Vec::new()
                        }
                    };
                    if !dead.is_empty() {
                        n.touch();
                    }
                    trimmed.extend(dead);
                }
            }
            ns.dead_extents.extend(trimmed);
            // Live extents, and the files of freed inodes and trimmed extents (dead
            // extents, removed only after the commit below), are not orphans.
            let live = ns
                .nodes
                .values()
                .filter_map(|n| n.volume.as_ref())
                .flat_map(|v| v.all_files());
            for f in live.chain(ns.dead_extents.iter().copied()) {
                referenced.insert((f.member, f.name()));
            }
        }
        let mut orphan_files = Vec::new();
        for (member, list) in listed {
            for f in list {
                // A sum file goes with its extent file.
                if let Some((ino, index, file_id)) = f.parsed {
                    let file = ExtentFile {
                        member,
                        ino,
                        index,
                        file_id,
                    };
                    if !referenced.contains(&(file.member, file.name()))
                        && !orphan_files.contains(&file)
                    {
                        orphan_files.push(file);
                    }
                }
            }
        }
        if !orphan_files.is_empty() {
            tracing::info!(
                count = orphan_files.len(),
                "removing extent files no inode references"
            );
        }
        self.commit()
            .map_err(|e| crate::Error::Other(format!("recovery commit failed: {e}")))?;
        // On a member that took commits of its own (opened with --force), an
        // unreferenced file may be the other side's only copy of some data.
        let diverged = self.pool.diverged_members();
        let (keep, remove): (Vec<_>, Vec<_>) = orphan_files
            .into_iter()
            .partition(|f: &ExtentFile| diverged.contains(&f.member));
        self.pool.quarantine_extent_files(&keep);
        self.pool.remove_extent_files(&remove);
        // After the orphans are gone: a rebuilt copy takes the name of its
        // extent on its new member, which an orphan there may have had.
        if !refill.is_empty() {
            match self.fill_copies_of(refill, &mut |_, _| true) {
                Ok((n, bytes)) => {
                    tracing::warn!(
                        copies = n,
                        bytes,
                        "missing extent copies rebuilt from good copies"
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild missing extent copies; `vpool scrub` or `vpool set copies` retries")
                }
            }
        }
        Ok(())
    }

    /// Extent copies the metadata lists on a present member whose file is not
    /// there (created while the member was failing, its directory entry never
    /// made durable before a crash) are dropped from their extents when a
    /// copy that is there remains; those extents are returned, to get their
    /// copies back from the good ones. A missing only copy stays listed
    /// (`check` reports it: its data is lost).
    fn drop_missing_copies(
        &self,
        ns: &Namespace,
        present: &HashSet<(u32, String)>,
    ) -> Vec<super::members::Item> {
        let mut out = Vec::new();
        let members: HashSet<u32> = self.pool.members().iter().map(|m| m.entry.id).collect();
        for n in ns.nodes.values() {
            let Some(v) = &n.volume else { continue };
            for f in v.all_files() {
                let (m, ino, idx) = (f.member, f.ino, f.index);
                let name = f.name();
                if !members.contains(&m) || present.contains(&(m, name.clone())) {
                    continue;
                }
                let others_there = v
                    .copy_members(idx)
                    .iter()
                    .any(|o| *o != m && present.contains(&(*o, name.clone())));
                if !others_there {
                    tracing::error!(
                        member = m,
                        ino,
                        extent = idx,
                        "extent file missing and no other copy is there"
                    );
                    continue;
                }
                if v.drop_copy(idx, m).is_some() {
                    tracing::warn!(
                        member = m,
                        ino,
                        extent = idx,
                        "extent copy missing (its member failed before it was durable); rebuilding it from another copy"
                    );
                    n.touch();
                    out.push(super::members::Item {
                        node: n.clone(),
                        vol: v.clone(),
                        index: idx,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::fs::testing::{ME, open, setup};
    use crate::fs::{Vfs, VfsOptions};
    use crate::pool::Pool;
    use crate::pool::meta::ROOT_INO;

    /// A snapshot record that does not load (damaged, or invalid) is left out
    /// of the view, but its delta files are not taken for leftovers of a
    /// failed capture: they are all there is to rebuild it from.
    #[test]
    fn deltas_of_an_unreadable_snapshot_record_are_kept() {
        let (_d, dirs) = setup(1, 64 * 1024);
        drop(open(&dirs[0]));
        let store =
            crate::pool::meta::MemberStore::open(&crate::storage::real::RealStorage, &dirs[0])
                .unwrap();
        let generation = store.generation().unwrap() + 1;
        let batch = crate::pool::meta::Batch {
            generation,
            next_ino: ROOT_INO + 1,
            next_file_id: 1,
            next_snap_id: 6,
            snapshots: vec![(5, Some(crate::pool::meta::encode_blob(b"not a record")))],
            ..Default::default()
        };
        store.apply(&batch, true, &Default::default()).unwrap();
        drop(store);
        let snapdir = dirs[0].join(crate::snapshot::SNAP_DIR).join("5");
        std::fs::create_dir_all(&snapdir).unwrap();
        std::fs::write(snapdir.join("2.0.vd"), b"delta bytes").unwrap();
        let v = open(&dirs[0]);
        assert!(v.snaps.by_name("x").is_none());
        assert!(
            snapdir.join("2.0.vd").exists(),
            "deltas of an unreadable record removed"
        );
    }

    /// Overwrites inode `ino`'s record on member `dir` with garbage, keeping the generation.
    fn damage_record(dir: &std::path::Path, ino: u64) {
        use crate::pool::meta::MemberStore;
        let s = MemberStore::open(&crate::storage::real::RealStorage, dir).unwrap();
        let img = s.load().unwrap();
        let batch = crate::pool::meta::Batch {
            generation: img.generation,
            next_ino: img.next_ino,
            next_file_id: img.next_file_id,
            inodes: vec![(ino, Some(vec![1, 0, 0, 0, 9, 9, 9, 9, 42]))],
            dirents: vec![],
            ..Default::default()
        };
        s.apply(&batch, true, &Default::default()).unwrap();
    }

    #[test]
    fn damaged_record_is_repaired_from_another_member() {
        let (_d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[5u8; 100_000]).unwrap();
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        damage_record(&dirs[0], a.ino);
        let v = open(&dirs[0]);
        let fh = v.open(a.ino, false).unwrap();
        assert_eq!(v.read(fh, 0, 100_000).unwrap(), vec![5u8; 100_000]);
        v.release(fh).unwrap();
        drop(v);
        let r = crate::pool::inspect::check(&dirs[0]).unwrap();
        assert!(r.is_clean(), "{:?}", r.problems);
    }

    #[test]
    fn record_damaged_everywhere_refuses_mount_and_keeps_data() {
        let (_d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[5u8; 100_000]).unwrap();
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        let count = |dirs: &[std::path::PathBuf]| -> usize {
            dirs.iter()
                .map(|d| std::fs::read_dir(d.join("data")).unwrap().count())
                .sum()
        };
        let before = count(&dirs);
        damage_record(&dirs[0], a.ino);
        damage_record(&dirs[1], a.ino);
        let err = Vfs::mount(Pool::open(&dirs[0]).unwrap(), VfsOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("no readable copy"), "{err}");
        assert_eq!(count(&dirs), before);
        let r = crate::pool::inspect::check(&dirs[0]).unwrap();
        assert!(!r.is_clean());
    }
}
