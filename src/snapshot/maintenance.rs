//! Upkeep of the snapshots' deltas: placing their copies (device remove and
//! replace, `set copies`), scrubbing them, the snapshot part of `vpool check`,
//! and the list the prune planner works on.
//!
//! Invariants:
//! - a copy is made or rewritten only from a copy that verifies (opened with
//!   the header its record expects, every frame read back), and lands under
//!   its final name only whole (written aside, synced, renamed);
//! - new locations reach the disk with the next commit; the copies they drop
//!   are removed only once that commit is durable (`place_deltas` returns
//!   them to the caller);
//! - none of this runs beside a capture: the callers hold `admin` with no
//!   capture running (`scrub_deltas` takes `admin` itself).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::delta::DeltaFile;
use super::prune::Candidate;
use super::record::{SnapshotRecord, State, delta_dir, delta_path};
use super::store::SnapshotStore;
use crate::error::{FsError, FsResult};
use crate::pool::layout;

/// What [`SnapshotStore::check`] found: problems are inconsistencies, notes
/// states that need no repair by hand (a failed or interrupted capture).
#[derive(Debug, Default)]
pub struct SnapshotCheck {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

/// What [`SnapshotStore::scrub_deltas`] did, in delta copies.
#[derive(Debug, Default)]
pub struct DeltaScrub {
    pub checked: u64,
    pub bad: u64,
    pub repaired: u64,
    /// Bad copies that could not be rewritten, each with the reason.
    pub problems: Vec<String>,
}

impl SnapshotStore {
    /// Gives every finished snapshot's deltas `want` copies on usable members,
    /// none on `from`: copies on `from` (or on members that failed) are
    /// replaced by new ones made from a copy that verifies. Returns how many
    /// copies were made and the files to remove once the commit recording the
    /// new locations is durable. The caller holds `admin` with no capture
    /// running.
    pub fn place_deltas(&self, from: Option<u32>, want: usize) -> FsResult<(u64, Vec<PathBuf>)> {
        let want = want.max(1);
        let mut made = 0;
        let mut old = Vec::new();
        let recs: Vec<Arc<SnapshotRecord>> = self.records.read().values().cloned().collect();
        for rec in recs {
            if rec.state == State::Pending {
                continue;
            }
            let mut changed = (*rec).clone();
            let mut dirty = false;
            for (ino, loc) in changed.deltas.iter_mut() {
                let keep: Vec<u32> = loc
                    .members
                    .iter()
                    .copied()
                    .filter(|m| Some(*m) != from && self.pool.usable(*m))
                    .collect();
                if keep.len() >= want && keep.len() == loc.members.len() {
                    continue;
                }
                // A source that verifies: a kept copy, else the one on `from`.
                let source = loc
                    .members
                    .iter()
                    .filter(|m| self.pool.usable(**m))
                    .filter_map(|m| delta_path(&self.pool, *m, rec.id, *ino, loc.seq))
                    .find(|p| {
                        DeltaFile::open_checked(self.pool.storage(), p, &rec.delta_id(*ino))
                            .and_then(|d| d.verify())
                            .is_ok()
                    });
                let mut members = keep.clone();
                while members.len() < want {
                    let Some(src) = &source else {
                        return Err(FsError::corrupt(format!(
                            "snapshot {}: no readable copy of the delta of inode {ino}",
                            rec.name
                        )));
                    };
                    let exclude: Vec<u32> = members.iter().copied().chain(from).collect();
                    let to = match self.pool.place(&exclude, loc.stored) {
                        Ok(m) => m,
                        Err(_) if !members.is_empty() => break,
                        Err(e) => return Err(e),
                    };
                    let dir = delta_dir(&self.pool, to, rec.id)
                        .ok_or_else(|| FsError::corrupt(format!("unknown member {to}")))?;
                    crate::storage::create_dir_all(self.pool.storage(), &dir)
                        .map_err(FsError::Io)?;
                    let dst = dir.join(layout::delta_file_name(*ino, loc.seq));
                    crate::storage::copy_file_atomic(self.pool.storage(), src, &dst)
                        .map_err(FsError::Io)?;
                    members.push(to);
                    made += 1;
                }
                for m in loc.members.iter().filter(|m| !members.contains(m)) {
                    if let Some(p) = delta_path(&self.pool, *m, rec.id, *ino, loc.seq) {
                        old.push(p);
                    }
                }
                loc.members = members;
                dirty = true;
            }
            if dirty {
                self.records.write().insert(rec.id, Arc::new(changed));
                self.changes.lock().insert(rec.id);
            }
        }
        self.views.lock().clear();
        Ok((made, old))
    }

    /// Scrub of the deltas: verifies every copy of every finished snapshot's
    /// deltas and rewrites a bad copy from a good one (a new file renamed over
    /// it).
    pub fn scrub_deltas(&self) -> DeltaScrub {
        let _a = self.admin.lock();
        let (mut checked, mut bad, mut fixed) = (0, 0, 0);
        let mut problems = Vec::new();
        let recs: Vec<Arc<SnapshotRecord>> = self.records.read().values().cloned().collect();
        for rec in recs.iter().filter(|r| r.state == State::Complete) {
            for (ino, loc) in &rec.deltas {
                let mut good = None;
                let mut broken = Vec::new();
                for m in &loc.members {
                    if !self.pool.usable(*m) {
                        continue;
                    }
                    let Some(p) = delta_path(&self.pool, *m, rec.id, *ino, loc.seq) else {
                        continue;
                    };
                    checked += 1;
                    match DeltaFile::open_checked(self.pool.storage(), &p, &rec.delta_id(*ino))
                        .and_then(|d| d.verify())
                    {
                        Ok(_) => good = good.or(Some(p)),
                        Err(e) => {
                            bad += 1;
                            tracing::warn!(snapshot = %rec.name, ino, path = %p.display(), error = %e, "scrub: bad delta copy");
                            broken.push((p, e.to_string()));
                        }
                    }
                }
                for (p, why) in broken {
                    let Some(src) = &good else {
                        problems.push(format!(
                            "snapshot {}: delta of inode {ino} has no good copy ({why})",
                            rec.name
                        ));
                        continue;
                    };
                    match crate::storage::copy_file_atomic(self.pool.storage(), src, &p) {
                        Ok(()) => {
                            fixed += 1;
                            tracing::warn!(snapshot = %rec.name, ino, path = %p.display(), "scrub: delta copy rewritten from a good copy");
                        }
                        Err(e) => problems.push(format!(
                            "snapshot {}: cannot rewrite {}: {e}",
                            rec.name,
                            p.display()
                        )),
                    }
                }
            }
        }
        if fixed > 0 {
            // Open views may hold descriptors of the replaced files.
            self.views.lock().clear();
        }
        DeltaScrub {
            checked,
            bad,
            repaired: fixed,
            problems,
        }
    }

    /// Problems of the snapshots (every delta copy of every complete snapshot
    /// is opened and every frame read back) and notes (failed snapshots).
    pub fn check(&self) -> SnapshotCheck {
        let mut out = Vec::new();
        let mut notes = Vec::new();
        for r in self.records() {
            if let State::Failed(why) = &r.state {
                notes.push(format!(
                    "snapshot {} failed ({why}); `vpool snapshot delete` removes it",
                    r.name
                ));
                continue;
            }
            if r.state == State::Pending {
                notes.push(format!("snapshot {} was being captured at an unclean stop; the next mount marks it failed", r.name));
                continue;
            }
            if r.state != State::Complete {
                continue;
            }
            for (ino, loc) in &r.deltas {
                for m in &loc.members {
                    let Some(p) = delta_path(&self.pool, *m, r.id, *ino, loc.seq) else {
                        out.push(format!(
                            "snapshot {}: delta of inode {ino} on unknown member {m}",
                            r.name
                        ));
                        continue;
                    };
                    if let Err(e) =
                        DeltaFile::open_checked(self.pool.storage(), &p, &r.delta_id(*ino))
                            .and_then(|d| d.verify())
                    {
                        out.push(format!("snapshot {}: {e}", r.name));
                    }
                }
            }
            if let Some(p) = r.parent
                && self.get(p).is_none_or(|p| p.state != State::Complete)
            {
                out.push(format!(
                    "snapshot {}: its base snapshot {p} is missing",
                    r.name
                ));
            }
        }
        SnapshotCheck {
            problems: out,
            notes,
        }
    }

    /// Every snapshot as the prune planner sees it (`held`: ids held).
    pub fn prune_candidates(&self, held: &BTreeSet<u64>) -> Vec<Candidate> {
        self.records
            .read()
            .values()
            .map(|r| Candidate {
                id: r.id,
                name: r.name.clone(),
                created: r.created.secs,
                complete: r.state == State::Complete,
                pending: r.state == State::Pending,
                held: held.contains(&r.id),
            })
            .collect()
    }
}
