//! Adding and retiring members of an open pool (`vpool device ...`). The data
//! migration itself is the fs layer's (`fs/members.rs`); this module keeps the
//! member list, the labels and the member directories right.
//!
//! Ordering (crash safety):
//! - add: the new member's metadata copy and data directory, then its label,
//!   then the labels of the others listing it. A crash before the last step
//!   leaves a directory whose label names this pool but that no other label
//!   lists: adding it again finishes the job.
//! - remove: the caller has migrated everything off and committed; then the
//!   others' labels stop listing it, then the retirement note (the new label,
//!   `vpool-retired`) is written durably in its directory, then its label
//!   files go, then its files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::admit::{Admission, refuse_nesting};
use super::label::{MemberEntry, write_label};
use super::layout::{self, DATA_DIR, LOCK_FILE, META_FILE};
use super::meta::{MemberStore, MetaImage};
use super::{Member, Pool, admit_member_dir, canonical_dir, try_lock};
use crate::error::{Error, Result};

/// What `add_member` found.
pub enum Added {
    New(Arc<Member>),
    /// The directory is a member already: nothing was changed.
    Already,
}

impl Pool {
    /// Makes `dir` a member: a copy of the metadata `image` (the caller holds
    /// off commits so that it is current), a data directory, labels. Capacity
    /// is usable at once.
    pub fn add_member(&self, dir: &Path, image: &MetaImage) -> Result<Added> {
        let s = self.storage();
        let dir = canonical_dir(s, dir)?;
        let mut l = self.label();
        if l.members.iter().any(|e| e.path == dir) && self.members().iter().any(|m| m.dir == dir) {
            return Ok(Added::Already);
        }
        let resumed = match admit_member_dir(s, &dir, Some(&l))? {
            Admission::Fresh => None,
            Admission::Listed => return Ok(Added::Already),
            // An add interrupted before the other labels listed it.
            Admission::Unlisted(uuid) => Some(uuid),
        };
        let present: Vec<PathBuf> = self.members().iter().map(|m| m.dir.clone()).collect();
        refuse_nesting(&dir, &present)?;
        let id = l
            .members
            .iter()
            .map(|e| e.id + 1)
            .chain(self.members().iter().map(|m| m.entry.id + 1))
            .max()
            .unwrap_or(0);
        let entry = MemberEntry {
            uuid: resumed.unwrap_or_else(Uuid::new_v4),
            id,
            path: dir.clone(),
        };
        s.make_private(&dir).map_err(|e| Error::io(&dir, e))?;
        let data = dir.join(DATA_DIR);
        crate::storage::create_dir_all(s, &data).map_err(|e| Error::io(&data, e))?;
        let _ = s.remove_file(&dir.join(META_FILE));
        let store = MemberStore::create(s, &dir, image)?;
        s.sync_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        l.members.push(entry.clone());
        // Its own label first (a member is complete once labelled), then the rest.
        let mut own = l.clone();
        own.generation = self.label().generation + 1;
        own.member = entry.uuid;
        write_label(s, &dir, &own)?;
        // Labelled now: a note of an earlier retirement says nothing.
        let _ = s.remove_file(&dir.join(layout::RETIRED_FILE));
        self.write_labels(l)?;
        let lock = try_lock(s, &dir, &self.pool_id())?;
        let md = s.stat(&dir).map_err(|e| Error::io(&dir, e))?;
        let member = Arc::new(Member::new(
            self.storage_arc(),
            entry,
            lock,
            &md,
            Some(store),
        ));
        // Best effort: the member is in the labels already.
        if let Some(mp) = self.mountpoint.lock().clone() {
            let _ = member.write_lock_info(&mp);
        }
        self.members.write().push(member.clone());
        tracing::info!(member = %dir.display(), id, "member added");
        Ok(Added::New(member))
    }

    /// The member (present or missing) a path or uuid names.
    pub fn find_member(&self, what: &Path) -> Option<MemberEntry> {
        let canon = self
            .storage()
            .canonicalize(what)
            .unwrap_or_else(|_| what.to_path_buf());
        let s = what.to_string_lossy();
        self.label()
            .members
            .into_iter()
            .find(|e| e.path == canon || e.path == what || e.uuid.to_string() == s)
    }

    /// Takes member `id` out of the pool once nothing references it: the
    /// others' labels stop listing it, then (if it is reachable) its label,
    /// metadata copy, intent log and leftover files are removed.
    pub fn retire_member(&self, id: u32) -> Result<()> {
        let mut l = self.label();
        let Some(pos) = l.members.iter().position(|e| e.id == id) else {
            return Ok(());
        };
        let entry = l.members.remove(pos);
        self.write_labels(l)?;
        let m = self.member(id);
        self.members.write().retain(|m| m.entry.id != id);
        self.missing.write().retain(|e| e.id != id);
        if let Some(m) = m
            && m.probe().is_ok()
        {
            let s = self.storage();
            // The note first: once the labels go, it is what tells an open
            // through a member that missed this change where the pool went.
            let mut note = self.label();
            note.member = entry.uuid;
            let p = m.dir.join(layout::RETIRED_FILE);
            if let Err(e) = crate::storage::write_file_atomic(s, &p, &note.encode()) {
                tracing::warn!(path = %p.display(), error = %e, "cannot leave the retirement note");
            }
            for f in layout::LABEL_FILES {
                let _ = s.remove_file(&m.dir.join(f));
            }
            let _ = s.sync_dir(&m.dir);
            *m.store.lock() = None;
            let [intent0, intent1] = layout::INTENT_FILES;
            for f in [META_FILE, intent0, intent1, LOCK_FILE] {
                let _ = s.remove_file(&m.dir.join(f));
            }
            let _ = crate::storage::remove_dir_all(s, &m.data_dir);
            let _ = crate::storage::remove_dir_all(s, &m.dir.join(layout::SNAP_DIR));
        }
        tracing::info!(member = %entry.path.display(), id, "member retired");
        Ok(())
    }
}
