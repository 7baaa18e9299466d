//! Long jobs of a mounted pool (scrub, rebalance, member changes, copies,
//! restore, snapshot deletion, snapshot capture): listed with their progress
//! after the command that started them has gone (`vpool jobs`), and
//! stoppable (`vpool jobs cancel ID`).
//!
//! A job started by a request registers here for as long as it runs; its
//! progress sink ([`super::Progress`]) updates it and answers `false` once a
//! cancel was asked. A snapshot capture runs in its own thread: it is listed
//! from the snapshot store, and cancelling it fails the capture (the
//! snapshot is then deleted).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::core::Vfs;
use crate::error::{FsError, FsResult};

/// One job as `vpool jobs` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobInfo {
    /// A number, or `capture:<snapshot>` for a snapshot capture.
    pub id: String,
    /// `scrub`, `rebalance`, `device-add`, `device-remove`,
    /// `device-replace`, `set-copies`, `restore`, `delete`, `prune`,
    /// `capture`.
    pub kind: String,
    /// What it works on (a member, a snapshot).
    pub what: String,
    /// Seconds since the epoch.
    pub started: i64,
    pub done: u64,
    pub total: u64,
    /// The unit of `done` and `total` (`extents`, `files`, `blocks`).
    pub unit: String,
    /// Seconds left at the rate so far (`None` until there is a rate).
    pub eta_seconds: Option<u64>,
    pub cancelling: bool,
}

pub struct Job {
    id: u64,
    kind: String,
    what: String,
    unit: String,
    started: i64,
    t0: Instant,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
}

impl Job {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Records progress; whether the job should go on.
    pub fn update(&self, done: u64, total: u64) -> bool {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        !self.cancel.load(Ordering::Acquire)
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    fn info(&self) -> JobInfo {
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        JobInfo {
            id: self.id.to_string(),
            kind: self.kind.clone(),
            what: self.what.clone(),
            started: self.started,
            done,
            total,
            unit: self.unit.clone(),
            eta_seconds: eta(self.t0, done, total),
            cancelling: self.cancelled(),
        }
    }
}

fn eta(t0: Instant, done: u64, total: u64) -> Option<u64> {
    let secs = t0.elapsed().as_secs_f64();
    if done == 0 || total < done || secs < 0.5 {
        return None;
    }
    Some(((total - done) as f64 * secs / done as f64).round() as u64)
}

/// The running jobs of one filesystem.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Mutex<BTreeMap<u64, Arc<Job>>>,
}

/// Keeps a job listed while it lives.
pub struct JobGuard<'a> {
    jobs: &'a Jobs,
    pub job: Arc<Job>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.jobs.list.lock().remove(&self.job.id);
    }
}

impl Jobs {
    /// Registers a job of `kind` on `what`, counted in `unit`.
    pub fn start(&self, kind: &str, what: &str, unit: &str, now: i64) -> JobGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id,
            kind: kind.into(),
            what: what.into(),
            unit: unit.into(),
            started: now,
            t0: Instant::now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
        });
        self.list.lock().insert(id, job.clone());
        JobGuard { jobs: self, job }
    }

    fn running(&self) -> Vec<Arc<Job>> {
        self.list.lock().values().cloned().collect()
    }
}

impl Vfs {
    /// Every running job, the snapshot capture included.
    pub fn jobs_list(&self) -> Vec<JobInfo> {
        let mut out: Vec<JobInfo> = self.jobs.running().iter().map(|j| j.info()).collect();
        if let Some(job) = self.snaps.active_job()
            && let Some(rec) = self.snaps.get(job.id)
        {
            let (done, total) = job.progress();
            out.push(JobInfo {
                id: format!("capture:{}", rec.name),
                kind: "capture".into(),
                what: rec.name.clone(),
                started: rec.created.secs,
                done,
                total,
                unit: "blocks".into(),
                eta_seconds: None,
                cancelling: false,
            });
        }
        out
    }

    /// Asks job `id` to stop. Jobs stop at their next step, leaving what
    /// they did consistent; a capture fails and its snapshot is deleted.
    /// Returns what was cancelled.
    pub fn job_cancel(&self, id: &str) -> FsResult<JobInfo> {
        if let Some(name) = id.strip_prefix("capture:") {
            let job = self.snaps.active_job().ok_or(FsError::NotFound)?;
            let rec = self.snaps.get(job.id).ok_or(FsError::NotFound)?;
            if rec.name != name {
                return Err(FsError::NotFound);
            }
            let info = self
                .jobs_list()
                .into_iter()
                .find(|j| j.id == id)
                .ok_or(FsError::NotFound)?;
            self.snaps.cancel_capture(&job);
            self.snaps.wait_idle();
            self.snapshot_delete(name)?;
            self.note_cancelled(&info);
            return Ok(info);
        }
        let n: u64 = id.parse().map_err(|_| FsError::NotFound)?;
        let job = self
            .jobs
            .list
            .lock()
            .get(&n)
            .cloned()
            .ok_or(FsError::NotFound)?;
        job.cancel.store(true, Ordering::Release);
        let info = job.info();
        self.note_cancelled(&info);
        Ok(info)
    }

    /// Cancels every running job of `kind`; how many.
    pub fn jobs_cancel_kind(&self, kind: &str) -> usize {
        let mut n = 0;
        for j in self.jobs.running() {
            if j.kind == kind && !j.cancel.swap(true, Ordering::AcqRel) {
                self.note_cancelled(&j.info());
                n += 1;
            }
        }
        n
    }

    fn note_cancelled(&self, j: &JobInfo) {
        self.pool.emit(
            "job_cancelled",
            crate::pool::info::Severity::Warning,
            None,
            format!(
                "{} job {} ({}) cancelled at {}/{} {}",
                j.kind, j.id, j.what, j.done, j.total, j.unit
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_list_update_cancel_and_leave() {
        let jobs = Jobs::default();
        let g = jobs.start("scrub", "pool", "extents", 5);
        assert!(g.job.update(3, 10));
        let list: Vec<JobInfo> = jobs.running().iter().map(|j| j.info()).collect();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].done, list[0].total), (3, 10));
        assert_eq!(list[0].id, "1");
        g.job.cancel.store(true, Ordering::Release);
        assert!(!g.job.update(4, 10), "a cancelled job is told to stop");
        drop(g);
        assert!(jobs.running().is_empty());
        assert_eq!(jobs.start("x", "", "", 0).job.id(), 2);
    }

    #[test]
    fn eta_needs_a_rate() {
        let t0 = Instant::now() - std::time::Duration::from_secs(10);
        assert_eq!(eta(t0, 0, 10), None);
        assert_eq!(eta(t0, 5, 10), Some(10));
        assert_eq!(eta(Instant::now(), 5, 10), None);
    }
}
