//! Scrub: verifies every copy of every data block, every metadata copy and
//! every snapshot delta while the pool stays mounted, repairing what a good
//! copy allows.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Progress;
use super::core::Vfs;
use crate::pool::info::{KEY_SCRUB, ScrubRecord, Severity};
use crate::volume::ScrubCounts;

/// What `vpool scrub` found and fixed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub data: ScrubCounts,
    /// Metadata copies found damaged or lagging (one line each).
    pub metadata_problems: Vec<String>,
    pub metadata_rewritten: u64,
    /// Snapshot delta copies verified, found bad, and rewritten from a good copy.
    #[serde(default)]
    pub deltas_checked: u64,
    #[serde(default)]
    pub deltas_bad: u64,
    #[serde(default)]
    pub deltas_repaired: u64,
    /// Delta problems left (no good copy, a missing base snapshot).
    pub delta_problems: Vec<String>,
    /// Files whose extents could not be scrubbed (e.g. a copy that cannot be opened).
    pub errors: Vec<String>,
    pub seconds: f64,
    /// Stopped before the end (`vpool scrub --stop`, `vpool jobs cancel`).
    #[serde(default)]
    pub cancelled: bool,
}

impl ScrubReport {
    /// Whether anything was found that is not repaired.
    pub fn clean(&self) -> bool {
        self.data.unrecoverable == 0
            && self.data.io_errors == 0
            && self.errors.is_empty()
            && self.delta_problems.is_empty()
            && self.metadata_problems.len() as u64 <= self.metadata_rewritten
    }

    /// One word for the outcome: `clean`, `repaired` (everything found was
    /// repaired), `problems` (some remain) or `cancelled`.
    pub fn result(&self) -> &'static str {
        let found = self.data.checksum_errors
            + self.data.tables_rebuilt
            + self.metadata_problems.len() as u64
            + self.deltas_bad;
        if !self.clean() {
            "problems"
        } else if self.cancelled {
            "cancelled"
        } else if found > 0 {
            "repaired"
        } else {
            "clean"
        }
    }
}

impl Vfs {
    /// Scrubs the pool; `progress(done, total)` counts extents (returning
    /// `false` stops the data pass; what was checked is reported). The
    /// outcome is recorded in the pool (`vpool status` shows it) and as a
    /// `scrub_finished` event.
    pub fn scrub(&self, progress: Progress) -> ScrubReport {
        let started = self.pool.storage().now().0;
        let r = self.scrub_inner(progress);
        let rec = ScrubRecord {
            started,
            seconds: r.seconds,
            result: r.result().into(),
            checksum_errors: r.data.checksum_errors,
            repaired: r.data.repaired,
            unrecoverable: r.data.unrecoverable,
            io_errors: r.data.io_errors,
        };
        self.pool.info.put(KEY_SCRUB, &rec);
        let severity = match rec.result.as_str() {
            "problems" => Severity::Error,
            "repaired" | "cancelled" => Severity::Warning,
            _ => Severity::Info,
        };
        self.pool.emit(
            "scrub_finished",
            severity,
            None,
            format!(
                "scrub {}: {} extent(s) in {:.1}s, {} checksum error(s), {} repaired, {} unrecoverable, {} read error(s)",
                rec.result,
                r.data.extents,
                r.seconds,
                rec.checksum_errors,
                rec.repaired,
                rec.unrecoverable,
                rec.io_errors
            ),
        );
        if !self.opts.read_only
            && let Err(e) = self.commit()
        {
            tracing::warn!(error = %e, "cannot record the scrub's outcome");
        }
        r
    }

    fn scrub_inner(&self, progress: Progress) -> ScrubReport {
        let t0 = Instant::now();
        let mut r = ScrubReport::default();
        // Every extent of every file as of now; files removed meanwhile are skipped.
        let work = self.extents();
        let total = work.len() as u64;
        progress(0, total);
        for (done, it) in work.iter().enumerate() {
            let (ino, index) = (it.node.ino, it.index);
            // No gate: a repair rewrites a copy with the content the block
            // already has, so neither the intent log nor a snapshot cares.
            if let Err(e) = it.vol.scrub_extent(&self.pool, index, &mut r.data) {
                r.errors.push(format!("inode {ino} extent {index}: {e}"));
            }
            if !progress(done as u64 + 1, total) {
                r.cancelled = true;
                break;
            }
        }
        // Rebuilt tables and repairs reach the disk now.
        if let Err(e) = self.commit() {
            r.errors.push(format!("commit after scrub failed: {e}"));
        }
        if r.cancelled {
            r.seconds = t0.elapsed().as_secs_f64();
            return r;
        }
        {
            let _c = self.commit_guard();
            let (found, rewritten) = self.pool.scrub_metadata();
            r.metadata_problems = found;
            r.metadata_rewritten = rewritten;
            // Label copies: a damaged one is rewritten (all of them, from the
            // pool's current label).
            let bad: Vec<String> = self
                .pool
                .members()
                .iter()
                .filter(|m| !m.is_failed())
                .flat_map(|m| crate::pool::label::label_problems(self.pool.storage(), &m.dir))
                .collect();
            if !bad.is_empty() {
                let n = bad.len() as u64;
                r.metadata_problems
                    .extend(bad.into_iter().map(|b| format!("label copy damaged: {b}")));
                match self.pool.write_labels(self.pool.label()) {
                    Ok(()) => r.metadata_rewritten += n,
                    Err(e) => r.errors.push(format!("cannot rewrite the labels: {e}")),
                }
            }
        }
        self.snaps.wait_idle();
        let deltas = self.snaps.scrub_deltas();
        r.deltas_checked = deltas.checked;
        r.deltas_bad = deltas.bad;
        r.deltas_repaired = deltas.repaired;
        let mut problems = deltas.problems;
        // What is left after the repairs (and base snapshots that are missing).
        for p in self.snaps.check().problems {
            if !problems.contains(&p) {
                problems.push(p);
            }
        }
        r.delta_problems = problems;
        r.seconds = t0.elapsed().as_secs_f64();
        tracing::info!(
            extents = r.data.extents,
            bytes = r.data.bytes,
            checksum_errors = r.data.checksum_errors,
            repaired = r.data.repaired,
            unrecoverable = r.data.unrecoverable,
            "scrub finished"
        );
        r
    }
}
