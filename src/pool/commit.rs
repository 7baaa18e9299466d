//! Metadata commits and the write-intent log, across the members.
//!
//! A commit applies one batch to every usable member, one transaction each,
//! side by side when the storage allows it, and records with it which members of the label it did not
//! reach (they are *behind* from that generation on, docs/design.md section
//! 17.4). Intent records name the extents about to change before they do
//! (section 16.2) and are dropped once the commit covering them is durable.
//!
//! Invariant: a member failure counts as recorded only once a durable commit
//! that began after it succeeded ([`Pool::failure_unrecorded`]).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::meta::{Batch, MemberStore};
use super::{Member, Pool};
use crate::error::{Error, Result};

impl Pool {
    /// Records, durably on each listed member, that extent `(ino, index)` is about
    /// to change (see intent.rs). Returns the tag used.
    pub fn log_intent(&self, members: &[u32], ino: u64, index: u64) -> io::Result<u64> {
        let tag = self.intent_tag.load(Ordering::Acquire);
        let mut logged = 0;
        let mut last_err = None;
        for id in members {
            let Some(m) = self.member(*id).filter(|m| !m.is_failed()) else {
                continue;
            };
            match m.intent.append(tag, ino, index) {
                Ok(()) => logged += 1,
                // The copy on a failing member is not written either.
                Err(e) if self.check_member(*id, &e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        if logged == 0 {
            return Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(tag)
    }

    /// Logs, durably, intent records under `tag` for many extents at once:
    /// `(members, ino, index)` each (see `Volume::hot_extents`).
    pub fn prelog_intents(&self, tag: u64, items: &[(Vec<u32>, u64, u64)]) -> io::Result<()> {
        let mut per: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for (members, ino, index) in items {
            for m in members {
                per.entry(*m).or_default().push((*ino, *index));
            }
        }
        type Work = (Arc<Member>, Vec<(u64, u64)>);
        let members: Vec<Work> = per
            .into_iter()
            .filter_map(|(id, v)| self.member(id).filter(|m| !m.is_failed()).map(|m| (m, v)))
            .collect();
        self.per_member(
            &members,
            |(m, v)| m.intent.append_many(tag, v),
            || Err(io::Error::other("intent thread panicked")),
        )
        .into_iter()
        .collect()
    }

    /// Runs `f` on every item (one per member), side by side when the
    /// storage allows it (each member waits on its own disk), else in order
    /// (the simulator's one order of operations); a run that panicked gives
    /// `panicked()`. Results are in the order of `items`.
    fn per_member<I: Sync, T: Send>(
        &self,
        items: &[I],
        f: impl Fn(&I) -> T + Sync,
        panicked: impl Fn() -> T,
    ) -> Vec<T> {
        if !self.storage.concurrent() {
            return items.iter().map(f).collect();
        }
        let f = &f;
        std::thread::scope(|sc| {
            let hs: Vec<_> = items.iter().map(|i| sc.spawn(move || f(i))).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panicked()))
                .collect()
        })
    }

    /// Drops intent records covered by the durable commit of generation `generation`.
    pub fn clear_intents(&self, generation: u64) {
        for m in self.members().iter().filter(|m| !m.is_failed()) {
            if let Err(e) = m.intent.clear(generation) {
                tracing::warn!(member = %m.dir.display(), error = %e, "cannot clear the intent log");
            }
        }
    }

    /// Extents that may have changed after the durable generation `durable`.
    pub fn pending_intents(&self, durable: u64) -> Result<std::collections::BTreeSet<(u64, u64)>> {
        let mut out = std::collections::BTreeSet::new();
        for m in self.members().iter() {
            out.extend(
                m.intent
                    .pending(durable)
                    .map_err(|e| Error::io(&m.dir, e))?,
            );
        }
        Ok(out)
    }

    /// fsyncs the data directories of the given members (new extent files durable).
    pub fn sync_data_dirs(&self, members: &HashSet<u32>) -> io::Result<()> {
        let mut members: Vec<&u32> = members.iter().collect();
        members.sort_unstable();
        for id in members {
            if let Some(m) = self.member(*id).filter(|m| !m.is_failed())
                && let Err(e) = self.storage.sync_dir(&m.data_dir)
                && !self.check_member(*id, &e)
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Applies a metadata batch to every member. Durable commits are what fsync
    /// promises; the batch's generation is the same everywhere.
    pub fn commit(&self, batch: &Batch, durable: bool) -> Result<()> {
        // Failures up to here are in this commit's record of who is behind.
        let failures = self.failures.load(Ordering::Acquire);
        let r = self.commit_inner(batch, durable);
        if r.is_ok() && durable {
            self.failures_recorded.fetch_max(failures, Ordering::AcqRel);
        }
        r
    }

    /// Whether a member failed since the last durable commit recorded who
    /// is behind.
    pub fn failure_unrecorded(&self) -> bool {
        self.failures.load(Ordering::Acquire) != self.failures_recorded.load(Ordering::Acquire)
    }

    fn commit_inner(&self, batch: &Batch, durable: bool) -> Result<()> {
        // One transaction per member, run side by side: each waits on its own disk.
        let members = self.members();
        // Every member of the label that this commit does not reach falls
        // behind at this generation (unless it already had); every member it
        // reaches is in step again. The record goes with the commit itself.
        let behind = {
            let label = self.label();
            let mut b = self.behind.lock();
            let reached: HashSet<Uuid> = members
                .iter()
                .filter(|m| !m.is_failed())
                .map(|m| m.entry.uuid)
                .collect();
            for e in &label.members {
                if reached.contains(&e.uuid) {
                    b.remove(&e.uuid);
                } else {
                    b.entry(e.uuid).or_insert(batch.generation);
                }
            }
            // Members removed from the pool are no one's concern any more.
            b.retain(|id, _| label.members.iter().any(|e| e.uuid == *id));
            b.clone()
        };
        let behind = &behind;
        let apply = |m: &Member| -> Result<()> {
            let mut g = m.store.lock();
            let res = match g.as_ref() {
                Some(s) => s.apply(batch, durable, behind),
                None => Err(Error::StoreNotOpen(m.dir.clone())),
            };
            if res.is_err() && g.is_some() {
                // Close and reopen so the next commit can go through once
                // the cause (a full disk, say) is gone.
                *g = None;
                match MemberStore::open(&*m.storage, &m.dir) {
                    Ok(s) => *g = Some(s),
                    Err(e) => {
                        tracing::error!(member = %m.dir.display(), error = %e, "cannot reopen metadata store")
                    }
                }
            }
            res
        };
        let live: Vec<&Arc<Member>> = members.iter().filter(|m| !m.is_failed()).collect();
        let done = self.per_member(
            &live,
            |m| apply(m),
            || Err(Error::Other("metadata commit thread panicked".into())),
        );
        let mut ok = 0;
        let mut first_err = None;
        for (m, r) in live.iter().zip(done) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    // A member whose directory is gone fails; the commit
                    // stands on the others, and the next one records that
                    // it missed this generation.
                    let gone = self.probe_failed(m);
                    if gone {
                        self.behind
                            .lock()
                            .entry(m.entry.uuid)
                            .or_insert(batch.generation);
                    }
                    if !gone && first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None if ok == 0 => Err(Error::NoMemberLeft),
            None => Ok(()),
        }
    }

    /// Whether member `id` missed commits (it failed or was missing, and the
    /// newest metadata copy counts it behind): its extent copies may be stale.
    pub fn is_behind(&self, id: u32) -> bool {
        let Some(m) = self.member(id) else {
            return true;
        };
        self.behind.lock().contains_key(&m.entry.uuid)
    }

    /// Members (ids) that went their own way and were overruled by `force`.
    pub fn diverged_members(&self) -> Vec<u32> {
        self.diverged.lock().clone()
    }
}
