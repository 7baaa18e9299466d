//! `vpool scrub`: sent to the daemon serving the pool, or run here on an
//! unmounted pool.

use std::path::Path;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::snapshot::{Target, resolve};
use crate::control::{self, Request, Response};
use crate::fs::scrub::ScrubReport;
use crate::fs::{Vfs, VfsOptions};
use crate::pool::Pool;
use crate::util::human;

/// A progress bar on stderr when it is a terminal (hidden otherwise).
fn bar(json: bool) -> ProgressBar {
    let pb = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    pb.set_style(
        ProgressStyle::with_template("scrub [{bar:40}] {pos}/{len} extents  {elapsed} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

pub fn scrub(target: &Path, json: bool) -> Result<i32> {
    let target = resolve(target)?;
    let pb = bar(json);
    let mut progress = |done: u64, total: u64| {
        pb.set_length(total);
        pb.set_position(done);
    };
    let resp = match &target {
        Target::Mounted(mp) => {
            control::request_with_progress(mp, &Request::Scrub, &mut progress)
                .with_context(|| format!("no vpool daemon answers for {}", mp.display()))?
        }
        Target::Offline(dir) => {
            let pool = Pool::open(dir)?;
            let vfs = Vfs::mount(pool, VfsOptions::default())?;
            let r = control::execute_with_progress(&vfs, &Request::Scrub, &mut progress);
            vfs.commit().context("final commit")?;
            r
        }
    };
    pb.finish_and_clear();
    let report = match resp {
        Response::Scrubbed(r) => *r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.clean() { 0 } else { 1 })
}

fn print_report(r: &ScrubReport) {
    let d = &r.data;
    println!(
        "scrubbed {} extent(s), {} of block copies read in {:.1}s",
        d.extents,
        human(d.bytes),
        r.seconds
    );
    println!(
        "data: {} checksum error(s), {} copy(ies) repaired, {} unrecoverable block(s), {} read error(s), {} table(s) rebuilt",
        d.checksum_errors, d.repaired, d.unrecoverable, d.io_errors, d.tables_rebuilt
    );
    println!(
        "metadata: {} problem(s), {} copy(ies) rewritten",
        r.metadata_problems.len(),
        r.metadata_rewritten
    );
    for p in &r.metadata_problems {
        println!("  {p}");
    }
    println!("snapshot deltas: {} problem(s)", r.delta_problems.len());
    for p in &r.delta_problems {
        println!("  {p}");
    }
    for e in &r.errors {
        println!("error: {e}");
    }
    if r.clean() {
        println!("result: clean (everything found was repaired)");
    } else {
        println!("result: PROBLEMS REMAIN (files with unrecoverable blocks return EIO there)");
    }
}
