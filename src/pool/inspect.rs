//! Inspection of a pool that is not mounted: `vpool check` and the offline part of
//! `vpool status`. Problems are inconsistencies; notes are states a crash leaves
//! behind that the next mount repairs by itself (a lagging metadata copy, extent
//! files never published, inodes unlinked while open).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::label::label_problems;
use super::meta::{MetaImage, NodeKind, ROOT_INO};
use super::{Pool, PoolStatus};
use crate::error::Result;

#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub pool: String,
    pub members: usize,
    pub inodes: usize,
    pub extents: usize,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

fn counts(img: &MetaImage) -> (u64, u64) {
    img.inodes
        .values()
        .filter(|r| r.kind == NodeKind::File)
        .fold((0, 0), |(n, b), r| (n + 1, b + r.size))
}

/// Status of an unmounted pool, from its members and newest metadata copy.
pub fn offline_status(dir: &Path) -> Result<PoolStatus> {
    // Exclusive, so that a store left unclosed by a crash can be recovered by
    // redb on open; nothing else is written (no repair of copies or labels).
    let mut pool = Pool::open(dir)?;
    let img = pool.load_metadata(false)?;
    let (files, bytes) = counts(&img);
    Ok(pool.status(files, bytes))
}

/// Checks labels, every metadata copy, the namespace graph and the extent maps
/// against the member files. Takes the pool's locks, so it refuses a mounted pool.
pub fn check(dir: &Path) -> Result<CheckReport> {
    let pool = Pool::open(dir)?;
    check_open(&pool)
}

/// The checks of [`check`] on a pool already opened (used by tests on a live pool
/// right after a commit).
pub fn check_open(pool: &Pool) -> Result<CheckReport> {
    let mut r = CheckReport {
        pool: pool.pool_id().to_string(),
        members: pool.members().len(),
        ..Default::default()
    };
    for e in pool.missing().iter() {
        r.problems.push(format!(
            "member {} ({}) is missing: the pool is DEGRADED",
            e.path.display(),
            e.uuid
        ));
    }
    for m in pool.members().iter() {
        for p in label_problems(pool.storage(), &m.dir) {
            r.problems.push(format!("label copy damaged: {p}"));
        }
    }
    // Every metadata copy must open and decode; the newest one is checked in depth.
    let mut newest: Option<MetaImage> = None;
    let mut gens = Vec::new();
    for (m, loaded) in pool.members().iter().zip(pool.member_images()) {
        match loaded {
            Ok(img) => {
                for (ino, e) in &img.corrupt {
                    r.problems.push(format!(
                        "{}: inode {ino} record is corrupt: {e}",
                        m.dir.display()
                    ));
                }
                gens.push((m.dir.clone(), img.generation));
                if newest
                    .as_ref()
                    .is_none_or(|n| img.generation > n.generation)
                {
                    newest = Some(img);
                }
            }
            Err(e) => r
                .problems
                .push(format!("metadata of {}: {e}", m.dir.display())),
        }
    }
    let Some(img) = newest else {
        r.problems
            .push("no readable metadata copy on any member".into());
        return Ok(r);
    };
    for (dir, g) in gens {
        if g != img.generation {
            r.notes.push(format!(
                "metadata copy on {} is at generation {g}, newest is {}; it is rewritten at the next mount",
                dir.display(),
                img.generation
            ));
        }
    }
    r.inodes = img.inodes.len();
    check_namespace(&img, &mut r);
    check_extents(pool, &img, &mut r);
    Ok(r)
}

fn check_namespace(img: &MetaImage, r: &mut CheckReport) {
    match img.inodes.get(&ROOT_INO) {
        Some(root) if root.kind == NodeKind::Dir => {}
        Some(_) => r.problems.push("the root inode is not a directory".into()),
        None => r.problems.push("the root inode is missing".into()),
    }
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    for ((parent, name), child) in &img.dirents {
        let name_s = String::from_utf8_lossy(name);
        match img.inodes.get(parent) {
            Some(p) if p.kind == NodeKind::Dir => {}
            Some(_) => r.problems.push(format!(
                "entry {name_s:?} lives in inode {parent}, which is not a directory"
            )),
            None => r.problems.push(format!(
                "entry {name_s:?} lives in missing directory inode {parent}"
            )),
        }
        match img.inodes.get(child) {
            Some(c) => {
                *links.entry(*child).or_default() += 1;
                if c.kind == NodeKind::Dir {
                    *subdirs.entry(*parent).or_default() += 1;
                    if c.parent != *parent {
                        r.problems.push(format!(
                            "directory inode {child} ({name_s:?}) records parent {} but is listed in {parent}",
                            c.parent
                        ));
                    }
                }
            }
            None => r.problems.push(format!(
                "entry {name_s:?} in directory {parent} points to missing inode {child}"
            )),
        }
    }
    for (ino, rec) in &img.inodes {
        if *ino == ROOT_INO {
            continue;
        }
        let found = links.get(ino).copied().unwrap_or(0);
        if rec.nlink == 0 {
            if found == 0 {
                r.notes.push(format!(
                    "inode {ino} was unlinked while open; it is freed at the next mount"
                ));
            } else {
                r.problems.push(format!(
                    "inode {ino} has link count 0 but {found} directory entries"
                ));
            }
            continue;
        }
        if found == 0 {
            r.problems.push(format!(
                "inode {ino} has {} links but no directory entry",
                rec.nlink
            ));
            continue;
        }
        let expect = if rec.kind == NodeKind::Dir {
            if found > 1 {
                r.problems.push(format!(
                    "directory inode {ino} has {found} directory entries"
                ));
            }
            2 + subdirs.get(ino).copied().unwrap_or(0)
        } else {
            found
        };
        if rec.nlink != expect {
            r.problems.push(format!(
                "inode {ino} has link count {} but should have {expect}",
                rec.nlink
            ));
        }
    }
    if let Some(root) = img.inodes.get(&ROOT_INO) {
        let expect = 2 + subdirs.get(&ROOT_INO).copied().unwrap_or(0);
        if root.nlink != expect {
            r.problems.push(format!(
                "root directory has link count {} but should have {expect}",
                root.nlink
            ));
        }
    }
}

fn check_extents(pool: &Pool, img: &MetaImage, r: &mut CheckReport) {
    let esize = pool.config().extent_size;
    let mut referenced: HashSet<(u32, String)> = HashSet::new();
    let mut file_ids: BTreeMap<u64, u64> = BTreeMap::new();
    for (ino, rec) in &img.inodes {
        if rec.kind != NodeKind::File && !rec.extents.is_empty() {
            r.problems
                .push(format!("inode {ino} is not a regular file but has extents"));
        }
        for e in &rec.extents {
            r.extents += 1;
            if let Some(other) = file_ids.insert(e.file_id, *ino) {
                r.problems.push(format!(
                    "extent file id {} is used by inodes {other} and {ino}",
                    e.file_id
                ));
            }
            if e.index >= rec.size.div_ceil(esize) {
                r.notes.push(format!(
                    "inode {ino} has extent {} past its size {}; it is trimmed at the next mount",
                    e.index, rec.size
                ));
            }
            if e.members.is_empty() {
                r.problems
                    .push(format!("inode {ino} extent {} has no copy", e.index));
            }
            for m in &e.members {
                let name = super::layout::extent_file_name(*ino, e.index, e.file_id);
                referenced.insert((*m, name.clone()));
                let Some(path) = pool.extent_path(*m, *ino, e.index, e.file_id) else {
                    r.problems.push(format!(
                        "inode {ino} extent {} is on unknown member id {m}",
                        e.index
                    ));
                    continue;
                };
                if let Some(sp) = pool.sum_path(*m, *ino, e.index, e.file_id)
                    && !pool.storage().exists(&sp)
                {
                    r.problems.push(format!(
                        "inode {ino}: the checksums of extent {} ({}) are missing; `vpool scrub` rebuilds them",
                        e.index,
                        sp.display()
                    ));
                }
                match pool.storage().stat(&path) {
                    Ok(md) if md.len > esize => r.problems.push(format!(
                        "{} is {} bytes, larger than the extent size {esize}",
                        path.display(),
                        md.len
                    )),
                    Ok(_) => {}
                    Err(e) => r.problems.push(format!(
                        "inode {ino}: extent file {} is unreadable: {e}",
                        path.display()
                    )),
                }
            }
        }
    }
    for m in pool.members().iter() {
        match pool.list_extent_files(m) {
            Ok(list) => {
                for super::ExtentFileEntry {
                    name, parsed, sum, ..
                } in list
                {
                    if let (true, Some((ino, index, file_id))) = (sum, parsed) {
                        let base = super::layout::extent_file_name(ino, index, file_id);
                        if !referenced.contains(&(m.entry.id, base)) {
                            r.notes.push(format!(
                                "{}: sum file {name} belongs to no referenced extent; it is removed at the next mount",
                                m.data_dir.display()
                            ));
                            continue;
                        }
                        let cfg = pool.config();
                        let id = super::sums::SumId {
                            ino,
                            index,
                            file_id,
                            block_size: cfg.block_size,
                            entries: (cfg.extent_size / cfg.block_size as u64) as u32,
                        };
                        if let Err(e) =
                            super::sums::read(pool.storage(), &m.data_dir.join(&name), id)
                        {
                            r.problems.push(format!(
                                "{}: sum file {name} is damaged ({e}); `vpool scrub` rebuilds it",
                                m.data_dir.display()
                            ));
                        }
                        continue;
                    }
                    if parsed.is_none() {
                        r.notes.push(format!(
                            "{}: {name:?} is not an extent file of vpool",
                            m.data_dir.display()
                        ));
                    } else if !referenced.contains(&(m.entry.id, name.clone())) {
                        r.notes.push(format!(
                            "{}: extent file {name} is not referenced (written after the last commit); it is removed at the next mount",
                            m.data_dir.display()
                        ));
                    }
                }
            }
            Err(e) => r
                .problems
                .push(format!("cannot list {}: {e}", m.data_dir.display())),
        }
    }
}
