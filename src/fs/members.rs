//! Members online: `vpool device add|remove|replace`, `vpool rebalance` and
//! `vpool set copies=N`, while the pool stays mounted and in use.
//!
//! Every data movement is [`Volume::move_copy`] (copy one extent to a member,
//! verified, then swap the copy list under the extent's stripes) or
//! [`Volume::drop_copy`]; the node is marked dirty before its old file is
//! queued for removal, so the file goes only after a durable commit records
//! the new layout (invariant 3). A crash in the middle leaves the last
//! committed layout, whose files all still exist; the new copies made since
//! are orphans that recovery removes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::core::Vfs;
use super::node::Node;
use crate::error::{FsError, FsResult};
use crate::pool::members::Added;
use crate::util::human;
use crate::volume::Volume;

/// What a member command did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemberReport {
    pub message: String,
    /// False when the action was already done and nothing changed.
    pub changed: bool,
    pub extents_moved: u64,
    pub bytes_moved: u64,
    pub deltas_copied: u64,
}

/// A user-facing refusal.
/// A member marked draining (no new extent copies are placed on it) for a
/// removal: dropped before [`Draining::keep`], it clears the mark again, so a
/// removal that fails leaves the member in use as before. A retired member
/// keeps the mark (it is gone from the pool anyway).
struct Draining(Option<Arc<crate::pool::Member>>);

impl Draining {
    fn start(member: Option<Arc<crate::pool::Member>>) -> Draining {
        if let Some(m) = &member {
            m.draining.store(true, Ordering::Release);
        }
        Draining(member)
    }

    /// The removal succeeded: the member stays marked.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.draining.store(false, Ordering::Release);
        }
    }
}

fn refuse(msg: impl Into<String>) -> FsError {
    FsError::Message(msg.into())
}

use super::Progress;

/// One extent of one file.
pub(crate) struct Item {
    pub(crate) node: Arc<Node>,
    pub(crate) vol: Arc<Volume>,
    pub(crate) index: u64,
}

impl Vfs {
    /// Every extent of every file as of now.
    pub(crate) fn extents(&self) -> Vec<Item> {
        let ns = self.ns.read();
        let mut out: Vec<Item> = ns
            .nodes
            .values()
            .filter_map(|n| n.volume.clone().map(|v| (n.clone(), v)))
            .flat_map(|(n, v)| {
                v.extent_indexes().into_iter().map(move |index| Item {
                    node: n.clone(),
                    vol: v.clone(),
                    index,
                })
            })
            .collect();
        // In file order: one run, one order of work (and of member I/O).
        out.sort_unstable_by_key(|it| (it.node.ino, it.index));
        out
    }

    /// Moves (`from`) or adds a copy of one extent onto `to` (placed when
    /// `None`). Returns the bytes moved, or `None` when nothing was done.
    fn move_one(&self, it: &Item, from: Option<u32>, to: Option<u32>) -> FsResult<Option<u64>> {
        let have = it.vol.copy_members(it.index);
        let bytes = it.vol.extent_bytes(&self.pool, it.index);
        let to = match to {
            Some(t) => t,
            None => {
                let exclude: Vec<u32> = have.iter().copied().chain(from).collect();
                self.pool.place(&exclude, bytes)?
            }
        };
        match it.vol.move_copy(&self.pool, it.index, from, to)? {
            Some(dead) => {
                // Dirty before the old file is queued: it goes only after a
                // commit that records the new layout.
                it.node.touch();
                self.ns.write().dead_extents.extend(dead);
                Ok(Some(bytes))
            }
            None => Ok(None),
        }
    }

    /// Drops the copy of `it` on `member`; false when there was none to drop,
    /// or when the copies that stay cannot be proven good first: every copy
    /// is verified (and a bad block of a survivor rewritten from the copy
    /// about to go) before redundancy is given up.
    fn drop_one(&self, it: &Item, member: u32) -> bool {
        let mut counts = crate::volume::ScrubCounts::default();
        let verified = it.vol.scrub_extent(&self.pool, it.index, &mut counts);
        if verified.is_err() || counts.unrecoverable > 0 || counts.io_errors > 0 {
            tracing::error!(
                ino = it.node.ino,
                extent = it.index,
                member,
                unrecoverable = counts.unrecoverable,
                io_errors = counts.io_errors,
                "copy kept: the copies that would stay do not all read good"
            );
            return false;
        }
        match it.vol.drop_copy(it.index, member) {
            Some(dead) => {
                it.node.touch();
                self.ns.write().dead_extents.push(dead);
                true
            }
            None => false,
        }
    }

    /// Runs `f` over `work` with progress, committing every 32 steps and at the end.
    fn run_work(
        &self,
        work: &[Item],
        progress: Progress,
        mut f: impl FnMut(&Item) -> FsResult<Option<u64>>,
    ) -> FsResult<(u64, u64)> {
        let (mut moved, mut bytes) = (0, 0);
        let total = work.len() as u64;
        progress(0, total);
        for (i, it) in work.iter().enumerate() {
            if let Some(b) = f(it)? {
                moved += 1;
                bytes += b;
            }
            if i % 32 == 31 {
                self.commit()?;
            }
            if !progress(i as u64 + 1, total) {
                self.commit()?;
                return Err(FsError::Cancelled);
            }
        }
        self.commit()?;
        Ok((moved, bytes))
    }

    /// Extents with fewer copies on usable members than `copies` get more
    /// (extents made while the pool was degraded, or after copies was raised).
    fn fill_copies(&self, progress: Progress) -> FsResult<(u64, u64)> {
        self.fill_copies_of(self.extents(), progress)
    }

    /// [`Vfs::fill_copies`] for the extents of `items` only.
    pub(crate) fn fill_copies_of(
        &self,
        items: Vec<Item>,
        progress: Progress,
    ) -> FsResult<(u64, u64)> {
        let want = self.pool.config().copies.max(1) as usize;
        let work: Vec<Item> = items
            .into_iter()
            .filter(|it| {
                // (An extent with no usable copy cannot be rebuilt: it stays
                // as it is, reads of it fail until its member returns.)
                let usable = it
                    .vol
                    .copy_members(it.index)
                    .iter()
                    .filter(|m| self.pool.usable(**m))
                    .count();
                usable > 0 && usable < want
            })
            .collect();
        self.run_work(&work, progress, |it| {
            let mut done = None;
            loop {
                let have = it.vol.copy_members(it.index);
                let usable = have.iter().filter(|m| self.pool.usable(**m)).count();
                if usable >= want {
                    break;
                }
                // A copy on a member that is gone is replaced, not kept beside.
                let from = have.iter().copied().find(|m| !self.pool.usable(*m));
                match self.move_one(it, from, None) {
                    Ok(Some(b)) => done = Some(done.unwrap_or(0) + b),
                    Ok(None) => break,
                    Err(FsError::NoSpace) => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(done)
        })
    }

    /// Moves snapshot deltas off `from` / up to `copies` copies; removes the
    /// old files after a durable commit.
    fn place_deltas(&self, from: Option<u32>) -> FsResult<u64> {
        self.snaps.wait_idle();
        let want = self.pool.config().copies.max(1) as usize;
        let (made, old) = self.snaps.place_deltas(from, want)?;
        self.commit()?;
        for p in old {
            let _ = self.pool.storage().remove_file(&p);
        }
        Ok(made)
    }

    /// `vpool device add`: the directory becomes a member at once.
    pub fn device_add(&self, dir: &Path, progress: Progress) -> FsResult<MemberReport> {
        self.writable()?;
        let _a = self.snaps.admin.lock();
        let added = {
            self.commit()?;
            let _c = self.commit_guard();
            let image = self
                .pool
                .member_images()
                .into_iter()
                .flatten()
                .max_by_key(|i| i.generation)
                .ok_or_else(|| refuse("no metadata copy could be read"))?;
            self.pool
                .add_member(dir, &image)
                .map_err(|e| refuse(e.to_string()))?
        };
        let Added::New(m) = added else {
            return Ok(MemberReport {
                message: format!(
                    "{} is already a member of this pool: nothing changed",
                    dir.display()
                ),
                ..Default::default()
            });
        };
        // Extents left with fewer copies than asked (the pool was degraded) get
        // them now.
        let (moved, bytes) = self.fill_copies(progress)?;
        let deltas = self.place_deltas(None)?;
        let space = self.pool.space();
        Ok(MemberReport {
            message: format!(
                "added {} (member id {}); pool size now {}",
                m.dir.display(),
                m.entry.id,
                human(space.size)
            ),
            changed: true,
            extents_moved: moved,
            bytes_moved: bytes,
            deltas_copied: deltas,
        })
    }

    /// Extents that cannot be rebuilt without member `id`: when it is
    /// unavailable, those with no usable copy elsewhere (0 when it is usable).
    fn lost_with(&self, id: u32) -> usize {
        if self.pool.usable(id) {
            return 0;
        }
        self.extents()
            .iter()
            .filter(|it| {
                let have = it.vol.copy_members(it.index);
                have.contains(&id) && !have.iter().any(|m| *m != id && self.pool.usable(*m))
            })
            .count()
    }

    /// Checks that the members other than `id` can take what `id` holds.
    fn check_can_leave(&self, id: u32, what: &str) -> FsResult<()> {
        let copies = self.pool.config().copies.max(1) as usize;
        let others: Vec<_> = self
            .pool
            .members()
            .into_iter()
            .filter(|m| m.entry.id != id && !m.is_failed())
            .collect();
        if others.len() < copies {
            return Err(refuse(format!(
                "cannot {what}: copies={copies} needs {copies} members, and only {} would remain (lower it first with `vpool set TARGET copies=N`)",
                others.len()
            )));
        }
        // Extents whose only usable copies are on `id` when it is unusable.
        let lost = self.lost_with(id);
        if lost > 0 {
            return Err(refuse(format!(
                "cannot {what}: {lost} extent(s) have no copy outside this member, which is unavailable; bring it back first"
            )));
        }
        let need: u64 = self
            .extents()
            .iter()
            .filter(|it| it.vol.copy_members(it.index).contains(&id))
            .map(|it| it.vol.extent_bytes(&self.pool, it.index))
            .sum();
        let mut seen = std::collections::HashSet::new();
        let mut avail = 0u64;
        for m in &others {
            if seen.insert(m.dev) {
                avail += m.available().unwrap_or(0);
            }
        }
        if need > avail {
            return Err(refuse(format!(
                "cannot {what}: it holds {} of extents and the other members have {} free",
                human(need),
                human(avail)
            )));
        }
        Ok(())
    }

    /// `vpool device remove`: migrates everything off the member, then
    /// retires it.
    pub fn device_remove(&self, dir: &Path, progress: Progress) -> FsResult<MemberReport> {
        self.writable()?;
        let _a = self.snaps.admin.lock();
        let Some(entry) = self.pool.find_member(dir) else {
            return Ok(MemberReport {
                message: format!(
                    "{} is not a member of this pool: nothing to remove",
                    dir.display()
                ),
                ..Default::default()
            });
        };
        if self.pool.label().members.len() <= 1 {
            return Err(refuse("the last member of a pool cannot be removed"));
        }
        let id = entry.id;
        self.check_can_leave(id, &format!("remove {}", entry.path.display()))?;
        let draining = Draining::start(self.pool.member(id));
        let report = self.drain_and_retire(&entry, progress)?;
        draining.keep();
        Ok(report)
    }

    /// The work of `device_remove` once the member is draining: moves its
    /// extents and deltas off it, then retires it.
    fn drain_and_retire(
        &self,
        entry: &crate::pool::label::MemberEntry,
        progress: Progress,
    ) -> FsResult<MemberReport> {
        let id = entry.id;
        let work: Vec<Item> = self
            .extents()
            .into_iter()
            .filter(|it| it.vol.copy_members(it.index).contains(&id))
            .collect();
        let (moved, bytes) =
            self.run_work(&work, progress, |it| self.move_one(it, Some(id), None))?;
        let deltas = self.place_deltas(Some(id))?;
        // Anything still there (written to it meanwhile) fails the removal.
        let left = self
            .extents()
            .iter()
            .filter(|it| it.vol.copy_members(it.index).contains(&id))
            .count();
        if left > 0 {
            return Err(refuse(format!(
                "{left} extent(s) are still on the member; run the removal again"
            )));
        }
        {
            let _c = self.commit_guard();
            self.pool
                .retire_member(id)
                .map_err(|e| refuse(format!("cannot retire the member: {e}")))?;
        }
        Ok(MemberReport {
            message: format!(
                "removed {}: moved {moved} extent(s) ({}) and {deltas} delta(s)",
                entry.path.display(),
                human(bytes)
            ),
            changed: true,
            extents_moved: moved,
            bytes_moved: bytes,
            deltas_copied: deltas,
        })
    }

    /// `vpool device replace`: rebuilds OLD's copies onto NEW (from OLD when
    /// it is readable, else from the other copies), then retires OLD.
    pub fn device_replace(
        &self,
        old: &Path,
        new: &Path,
        progress: Progress,
    ) -> FsResult<MemberReport> {
        self.writable()?;
        let old_entry = self.pool.find_member(old);
        let new_entry = self.pool.find_member(new);
        let Some(old_entry) = old_entry else {
            if new_entry.is_some() {
                return Ok(MemberReport {
                    message: format!(
                        "{} is not a member and {} is: already replaced, nothing changed",
                        old.display(),
                        new.display()
                    ),
                    ..Default::default()
                });
            }
            return Err(refuse(format!(
                "{} is not a member of this pool",
                old.display()
            )));
        };
        let id = old_entry.id;
        {
            // Refuse before adding anything when OLD's data cannot be rebuilt.
            let _a = self.snaps.admin.lock();
            let lost = self.lost_with(id);
            if lost > 0 {
                return Err(refuse(format!(
                    "cannot replace {}: {lost} extent(s) have no other copy (copies=1?) and it is unavailable",
                    old.display()
                )));
            }
        }
        let mut report = self.device_add(new, &mut |_, _| true)?;
        let _a = self.snaps.admin.lock();
        let new_id = self
            .pool
            .find_member(new)
            .map(|e| e.id)
            .ok_or_else(|| refuse(format!("{} did not become a member", new.display())))?;
        if let Some(m) = self.pool.member(id) {
            m.draining.store(true, Ordering::Release);
        }
        let work: Vec<Item> = self
            .extents()
            .into_iter()
            .filter(|it| it.vol.copy_members(it.index).contains(&id))
            .collect();
        let (moved, bytes) = self.run_work(&work, progress, |it| {
            match self.move_one(it, Some(id), Some(new_id)) {
                // NEW already holds a copy of it: drop OLD's.
                Ok(None) if it.vol.copy_members(it.index).contains(&id) => {
                    let _ = self.drop_one(it, id);
                    Ok(None)
                }
                r => r,
            }
        })?;
        let deltas = self.place_deltas(Some(id))?;
        {
            let _c = self.commit_guard();
            self.pool
                .retire_member(id)
                .map_err(|e| refuse(format!("cannot retire {}: {e}", old.display())))?;
        }
        report.message = format!(
            "replaced {} with {}: rebuilt {moved} extent(s) ({}) and {deltas} delta(s)",
            old.display(),
            new.display(),
            human(bytes)
        );
        report.changed = true;
        report.extents_moved += moved;
        report.bytes_moved += bytes;
        report.deltas_copied += deltas;
        Ok(report)
    }

    /// `vpool rebalance`: moves extents from the member storing the most to
    /// the one storing the least until they differ by at most one extent.
    pub fn rebalance(&self, progress: Progress) -> FsResult<MemberReport> {
        self.writable()?;
        let _a = self.snaps.admin.lock();
        let esize = self.pool.config().extent_size;
        let items = self.extents();
        let mut stored: std::collections::BTreeMap<u32, u64> = self
            .pool
            .members()
            .iter()
            .filter(|m| !m.is_failed() && !m.draining.load(Ordering::Acquire))
            .map(|m| (m.entry.id, 0))
            .collect();
        let mut sizes = Vec::with_capacity(items.len());
        for it in &items {
            let b = it.vol.extent_bytes(&self.pool, it.index);
            sizes.push(b);
            for m in it.vol.copy_members(it.index) {
                if let Some(s) = stored.get_mut(&m) {
                    *s += b;
                }
            }
        }
        let total = items.len() as u64;
        let (mut moved, mut bytes) = (0u64, 0u64);
        progress(0, total);
        for step in 0..items.len() {
            let (Some((&hi, &hi_b)), Some((&lo, &lo_b))) = (
                stored.iter().max_by_key(|(_, b)| **b),
                stored.iter().min_by_key(|(_, b)| **b),
            ) else {
                break;
            };
            if hi_b <= lo_b + esize {
                break;
            }
            let gap = hi_b - lo_b;
            // The biggest extent on `hi`, not on `lo`, that narrows the gap.
            let pick = (0..items.len())
                .filter(|i| sizes[*i] > 0 && sizes[*i] < gap)
                .filter(|i| {
                    let have = items[*i].vol.copy_members(items[*i].index);
                    have.contains(&hi) && !have.contains(&lo)
                })
                .max_by_key(|i| sizes[*i]);
            let Some(i) = pick else { break };
            if self.move_one(&items[i], Some(hi), Some(lo))?.is_some() {
                moved += 1;
                bytes += sizes[i];
                *stored.entry(hi).or_default() -= sizes[i];
                *stored.entry(lo).or_default() += sizes[i];
            } else {
                sizes[i] = 0;
            }
            if step % 32 == 31 {
                self.commit()?;
            }
            if !progress(step as u64 + 1, total) {
                self.commit()?;
                return Err(FsError::Cancelled);
            }
        }
        self.commit()?;
        progress(total, total);
        if moved == 0 {
            return Ok(MemberReport {
                message: "already balanced: nothing moved".into(),
                ..Default::default()
            });
        }
        Ok(MemberReport {
            message: format!("moved {moved} extent(s) ({})", human(bytes)),
            changed: true,
            extents_moved: moved,
            bytes_moved: bytes,
            deltas_copied: 0,
        })
    }

    /// `vpool set copies=N`: records the new setting, then adds copies to
    /// extents (and snapshot deltas) with fewer, or drops the extra ones.
    pub fn set_copies(&self, n: u32, progress: Progress) -> FsResult<MemberReport> {
        self.writable()?;
        let _a = self.snaps.admin.lock();
        let usable = self
            .pool
            .members()
            .iter()
            .filter(|m| !m.is_failed())
            .count();
        if n == 0 {
            return Err(refuse("copies must be at least 1"));
        }
        if n as usize > usable {
            return Err(refuse(format!(
                "copies={n} needs {n} members, and the pool has {usable} usable"
            )));
        }
        let old = self.pool.config().copies;
        let mismatched = self
            .extents()
            .iter()
            .filter(|it| it.vol.copy_members(it.index).len() != n as usize)
            .count();
        if old == n && mismatched == 0 {
            return Ok(MemberReport {
                message: format!("copies is already {n}: nothing changed"),
                ..Default::default()
            });
        }
        if old != n {
            let _c = self.commit_guard();
            let mut l = self.pool.label();
            l.config.copies = n;
            self.pool
                .write_labels(l)
                .map_err(|e| refuse(format!("cannot write the labels: {e}")))?;
        }
        let (moved, bytes) = if n > old || mismatched > 0 {
            self.fill_copies(progress)?
        } else {
            (0, 0)
        };
        // Trim extra copies: those on unusable members first, then the last
        // ones placed.
        let work: Vec<Item> = self
            .extents()
            .into_iter()
            .filter(|it| it.vol.copy_members(it.index).len() > n as usize)
            .collect();
        let mut dropped = 0;
        for it in &work {
            while it.vol.copy_members(it.index).len() > n as usize {
                let have = it.vol.copy_members(it.index);
                let Some(victim) = have
                    .iter()
                    .copied()
                    .find(|m| !self.pool.usable(*m))
                    .or(have.last().copied())
                else {
                    break;
                };
                if !self.drop_one(it, victim) {
                    break;
                }
                dropped += 1;
            }
        }
        self.commit()?;
        let deltas = self.place_deltas(None)?;
        Ok(MemberReport {
            message: format!(
                "copies {old} -> {n}: {moved} extent copy(ies) made ({}), {dropped} dropped, {deltas} delta copy(ies) made",
                human(bytes)
            ),
            changed: true,
            extents_moved: moved,
            bytes_moved: bytes,
            deltas_copied: deltas,
        })
    }
}
