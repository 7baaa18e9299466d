//! The members' metadata copies (docs/design.md section 5): loading the
//! newest at open, healing damaged records from another copy of the same
//! generation, rebuilding a copy that does not open, telling a split brain
//! from a member that merely lagged, scrubbing the copies, and rewriting the
//! labels.
//!
//! Invariants: the open fails, changing nothing, when a record has no good
//! copy anywhere (recovery would otherwise take an unreadable inode's files
//! for orphans) and when members diverged (unless forced); `load_metadata`
//! without `repair` (`-o ro`, offline `status`) rewrites nothing.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::Ordering;

use super::Pool;
use super::label::{Label, write_label};
use super::layout;
use super::meta::{self, MemberStore, MetaImage};
use crate::error::{Error, Result};

/// Takes the damaged inode records of `best` from another metadata image of
/// the same generation (`others`) where one has it; the rest stay in
/// `best.corrupt`. (A damaged record is absent from its own image's inodes.)
fn heal_inodes(best: &mut MetaImage, others: &[&MetaImage]) {
    for (ino, why) in std::mem::take(&mut best.corrupt) {
        match others.iter().find_map(|o| o.inodes.get(&ino).cloned()) {
            Some(r) => {
                tracing::warn!(ino, reason = %why, "inode record damaged on one member; using another copy");
                best.inodes.insert(ino, r);
            }
            None => best.corrupt.push((ino, why)),
        }
    }
}

/// Replaces the enveloped blobs of `map` that fail their checksum with a good
/// copy of the same key from another metadata image (`others`).
fn heal_blobs<K: Ord + Copy>(
    map: &mut BTreeMap<K, Vec<u8>>,
    others: &[&MetaImage],
    table: impl Fn(&MetaImage) -> &BTreeMap<K, Vec<u8>>,
) {
    let bad: Vec<K> = map
        .iter()
        .filter(|(_, b)| meta::check_blob(b).is_err())
        .map(|(k, _)| *k)
        .collect();
    for k in bad {
        if let Some(good) = others
            .iter()
            .filter_map(|o| table(o).get(&k))
            .find(|b| meta::check_blob(b).is_ok())
        {
            map.insert(k, good.clone());
        }
    }
}

impl Pool {
    /// Loads the metadata: opens every member's store and takes the copy with the
    /// highest generation. Records of that copy that fail their checksum are taken
    /// from another copy of the same generation; if no good copy exists the open
    /// fails (so recovery never mistakes the files of an unreadable inode for
    /// orphans). With `repair`, lagging or damaged copies are rewritten from the
    /// result and labels with stale paths are rewritten.
    pub fn load_metadata(&mut self, repair: bool) -> Result<MetaImage> {
        let members = self.members();
        // A store that does not open or load is one damaged copy among several:
        // the pool opens from the others, and (with `repair`) it is rebuilt.
        let mut loaded: Vec<Option<MetaImage>> = Vec::with_capacity(members.len());
        let mut damaged = Vec::new();
        for m in &members {
            match MemberStore::open(self.storage(), &m.dir)
                .and_then(|s| s.load().map(|img| (s, img)))
            {
                Ok((s, img)) => {
                    loaded.push(Some(img));
                    *m.store.lock() = Some(s);
                }
                Err(e) => {
                    tracing::error!(member = %m.dir.display(), error = %e, "metadata copy does not open: it is damaged");
                    damaged.push((m.clone(), e));
                    loaded.push(None);
                }
            }
        }
        let Some(best_i) = (0..loaded.len())
            .filter(|i| loaded[*i].is_some())
            .max_by_key(|i| loaded[*i].as_ref().map_or(0, |g| g.generation))
        else {
            return Err(match damaged.into_iter().next() {
                Some((_, e)) => Error::Other(format!(
                    "no member holds a readable copy of the metadata ({e}); \
                     nothing was changed (see `vpool check`)"
                )),
                None => Error::Other("pool has no members".into()),
            });
        };
        let mut img = loaded[best_i].clone().unwrap_or_default();
        // A member the newest copy counts as behind since generation `g`, whose
        // own copy went on to `g` or later, took commits of its own while cut
        // off from the others: both sides hold changes the other lacks.
        let mut split = Vec::new();
        for (m, have) in members.iter().zip(&loaded) {
            // A copy that lists its own member as behind was rewritten from
            // another's image (at mount or by scrub), not committed by its
            // member: a member a commit reaches is in step, never behind.
            if let (Some(have), Some(g)) = (have, img.behind.get(&m.entry.uuid))
                && have.generation >= *g
                && !have.behind.contains_key(&m.entry.uuid)
            {
                split.push((m.clone(), have.generation, *g));
            }
        }
        if !split.is_empty() {
            let desc: Vec<String> = split
                .iter()
                .map(|(m, have, g)| {
                    format!(
                        "{} took commits up to generation {have} on its own, after the others \
                         counted it missing at generation {g}",
                        m.dir.display()
                    )
                })
                .collect();
            if !self.force.load(Ordering::Acquire) {
                return Err(Error::MembersDiverged(format!(
                    "{}; the newest copy is on {} (generation {}). Mounting would lose the \
                     other side's changes: mount the side you want alone, copy out what you \
                     need, or mount with --force to keep the newest copy (extent files only \
                     the other side references are moved to quarantine/, not deleted)",
                    desc.join("; "),
                    members[best_i].dir.display(),
                    img.generation
                )));
            }
            tracing::warn!(
                "members diverged, opened with --force: {}; the newest copy wins",
                desc.join("; ")
            );
            *self.diverged.lock() = split.iter().map(|(m, _, _)| m.entry.id).collect();
        }
        let same_gen: Vec<&MetaImage> = loaded
            .iter()
            .flatten()
            .filter(|o| o.generation == img.generation)
            .collect();
        heal_inodes(&mut img, &same_gen);
        if !img.corrupt.is_empty() {
            let list: Vec<String> = img
                .corrupt
                .iter()
                .map(|(i, w)| format!("inode {i} ({w})"))
                .collect();
            return Err(Error::CorruptMetadata {
                path: members[best_i].dir.join(layout::META_FILE),
                reason: format!(
                    "{} have no readable copy on any member; refusing to open the pool so that nothing is removed (run `vpool check`)",
                    list.join(", ")
                ),
            });
        }
        if repair {
            // Labels first: a member whose metadata names a member must list
            // it in its label, or an open through it would miss that member.
            self.refresh_labels()?;
            for (m, e) in &damaged {
                let path = m.dir.join(layout::META_FILE);
                let aside = m.dir.join(layout::META_DAMAGED_FILE);
                tracing::warn!(member = %m.dir.display(), error = %e, aside = %aside.display(), "rebuilding a damaged metadata copy from the newest good copy");
                let s = self.storage();
                s.rename(&path, &aside).or_else(|e| match e.kind() {
                    io::ErrorKind::NotFound => Ok(()),
                    _ => Err(Error::io(&path, e)),
                })?;
                *m.store.lock() = Some(MemberStore::create(s, &m.dir, &img)?);
                s.sync_dir(&m.dir).map_err(|e| Error::io(&m.dir, e))?;
            }
            damaged.clear();
            for (m, have) in members.iter().zip(&loaded) {
                let Some(have) = have else { continue };
                if have.generation == img.generation && have.corrupt.is_empty() {
                    continue;
                }
                if let Some(s) = m.store.lock().as_ref() {
                    tracing::warn!(
                        member = %m.dir.display(),
                        have = have.generation,
                        newest = img.generation,
                        "metadata copy lags or is damaged; rewriting it from the newest copy"
                    );
                    s.replace_all(&img)?;
                }
            }
        }
        *self.damaged_meta.lock() = damaged
            .iter()
            .map(|(m, e)| (m.entry.id, e.to_string()))
            .collect();
        self.after_load(&img);
        Ok(img)
    }

    fn after_load(&self, img: &MetaImage) {
        *self.behind.lock() = img.behind.clone();
        self.info.load(&img.info);
        let base = self.info.integrity();
        self.integrity
            .checksum_errors
            .store(base.checksum_errors, Ordering::Relaxed);
        self.integrity
            .repaired
            .store(base.repaired, Ordering::Relaxed);
        self.integrity
            .unrecoverable
            .store(base.unrecoverable, Ordering::Relaxed);
        self.integrity
            .io_errors
            .store(base.io_errors, Ordering::Relaxed);
        let mut max_fid = img.next_file_id;
        for rec in img.inodes.values() {
            for e in &rec.extents {
                max_fid = max_fid.max(e.file_id + 1);
                for id in &e.members {
                    if let Some(m) = self.member(*id) {
                        m.extents.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.next_file_id.store(max_fid, Ordering::SeqCst);
    }

    /// Rewrites labels when a member was found at another path than recorded
    /// or holds an older label than the pool's.
    fn refresh_labels(&mut self) -> Result<()> {
        let members = self.members();
        let label = self.label();
        let stale = std::mem::take(&mut self.labels_lag)
            || members.iter().any(|m| {
                label
                    .members
                    .iter()
                    .any(|e| e.uuid == m.entry.uuid && e.path != m.dir)
            });
        if !stale {
            return Ok(());
        }
        let mut l = label;
        for e in &mut l.members {
            if let Some(m) = members.iter().find(|m| m.entry.uuid == e.uuid) {
                e.path = m.dir.clone();
            }
        }
        self.write_labels(l)
    }

    /// Writes `l` (generation bumped) to every present member and makes it the
    /// pool's label. Members the new label no longer lists are not written.
    ///
    /// Once one member holds the new label it is the newest on disk, which
    /// the next open follows: from then on it is the pool's label in memory
    /// too, whatever happens to the other writes (a member whose write fails
    /// with an I/O error is failed; its older label loses at the next open).
    /// Fails only when no member took it.
    pub fn write_labels(&self, mut l: Label) -> Result<()> {
        l.generation = self.label.read().generation.max(l.generation) + 1;
        let mut wrote = 0;
        let mut first_err = None;
        for m in self.members().iter().filter(|m| !m.is_failed()) {
            if !l.members.iter().any(|e| e.uuid == m.entry.uuid) {
                continue;
            }
            l.member = m.entry.uuid;
            match write_label(self.storage(), &m.dir, &l) {
                Ok(()) => wrote += 1,
                Err(e) => {
                    tracing::error!(member = %m.dir.display(), error = %e, "cannot write the label");
                    if let Error::Io { source, .. } = &e {
                        self.check_member(m.entry.id, source);
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if wrote == 0 => Err(e),
            _ => {
                *self.label.write() = l;
                Ok(())
            }
        }
    }

    /// Verifies every member's metadata copy (record checksums, generation) and
    /// rewrites a damaged or lagging copy from the newest good one, a damaged
    /// record taken from another copy of the same generation. The caller holds
    /// off commits. Returns what was found and how many copies were rewritten.
    pub fn scrub_metadata(&self) -> (Vec<String>, u64) {
        let images = self.member_images();
        let mut found = Vec::new();
        let bad_blobs = |img: &MetaImage| -> usize {
            img.snapshots
                .values()
                .chain(img.cbt.values())
                .filter(|b| meta::check_blob(b).is_err())
                .count()
        };
        let Some(best_i) = (0..images.len())
            .filter(|i| images[*i].is_ok())
            .max_by_key(|i| images[*i].as_ref().map(|m| m.generation).unwrap_or(0))
        else {
            return (vec!["no member has a readable metadata copy".into()], 0);
        };
        let Ok(mut best) = images[best_i].as_ref().cloned() else {
            return (found, 0);
        };
        let same_gen: Vec<&MetaImage> = images
            .iter()
            .flatten()
            .filter(|o| o.generation == best.generation)
            .collect();
        heal_inodes(&mut best, &same_gen);
        heal_blobs(&mut best.snapshots, &same_gen, |o| &o.snapshots);
        heal_blobs(&mut best.cbt, &same_gen, |o| &o.cbt);
        let best_ok = best.corrupt.is_empty() && bad_blobs(&best) == 0;
        if !best_ok {
            found.push(format!(
                "{} damaged metadata records have no good copy on any member",
                best.corrupt.len() + bad_blobs(&best)
            ));
        }
        let mut rewritten = 0;
        for (m, img) in self.members().iter().zip(&images) {
            if m.is_failed() {
                // No I/O goes to a failed member.
                continue;
            }
            let why = match img {
                Err(e) => Some(format!("unreadable ({e})")),
                Ok(i) if i.generation != best.generation => Some(format!(
                    "generation {} lags the newest {}",
                    i.generation, best.generation
                )),
                Ok(i) if !i.corrupt.is_empty() || bad_blobs(i) > 0 => Some(format!(
                    "{} damaged records",
                    i.corrupt.len() + bad_blobs(i)
                )),
                Ok(_) => None,
            };
            let Some(why) = why else { continue };
            found.push(format!("{}: metadata copy {why}", m.dir.display()));
            if !best_ok {
                continue;
            }
            let r = match m.store.lock().as_ref() {
                Some(s) => s.replace_all(&best),
                None => continue,
            };
            match r {
                Ok(()) => {
                    rewritten += 1;
                    tracing::warn!(member = %m.dir.display(), reason = %why, "metadata copy rewritten from the newest good copy");
                }
                Err(e) => found.push(format!(
                    "{}: cannot rewrite the metadata copy: {e}",
                    m.dir.display()
                )),
            }
        }
        (found, rewritten)
    }

    /// Every member's metadata copy, loaded through the open store when there is one.
    pub fn member_images(&self) -> Vec<Result<MetaImage>> {
        self.members()
            .iter()
            .map(|m| match m.store.lock().as_ref() {
                Some(s) => s.load(),
                None => MemberStore::open(self.storage(), &m.dir).and_then(|s| s.load()),
            })
            .collect()
    }
}
