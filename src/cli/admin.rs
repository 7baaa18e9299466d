//! `vpool scrub`, `vpool device ...`, `vpool rebalance`, `vpool set`: sent to
//! the daemon serving the pool, or run here on an unmounted pool.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::DeviceCmd;
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
    println!(
        "snapshot deltas: {} copy(ies) verified, {} bad, {} rewritten, {} problem(s) left",
        r.deltas_checked,
        r.deltas_bad,
        r.deltas_repaired,
        r.delta_problems.len()
    );
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

/// Sends `req` with a progress bar labelled `what`; returns the answer.
fn send_with_bar(target: &Path, req: &Request, what: &str) -> Result<Response> {
    let target = resolve(target)?;
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:40}}] {{pos}}/{{len}} extents  {{elapsed}} (eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut progress = |done: u64, total: u64| {
        pb.set_length(total);
        pb.set_position(done);
    };
    let resp = match &target {
        Target::Mounted(mp) => control::request_with_progress(mp, req, &mut progress)
            .with_context(|| format!("no vpool daemon answers for {}", mp.display()))?,
        Target::Offline(dir) => {
            let pool = Pool::open(dir)?;
            let vfs = Vfs::mount(pool, VfsOptions::default())?;
            let r = control::execute_with_progress(&vfs, req, &mut progress);
            vfs.commit().context("final commit")?;
            r
        }
    };
    pb.finish_and_clear();
    Ok(resp)
}

fn member_answer(resp: Response) -> Result<i32> {
    match resp {
        Response::Member(r) => {
            println!("{}", r.message);
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// An absolute form of a path given on the command line (canonical when it
/// exists: a missing member directory is named as it was).
fn abs(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Ok(c);
    }
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(p))
}

pub fn device(cmd: DeviceCmd) -> Result<i32> {
    match cmd {
        DeviceCmd::Add { target, dir } => {
            let dir = abs(&dir)?;
            if !dir.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            member_answer(send_with_bar(&target, &Request::DeviceAdd { dir }, "add")?)
        }
        DeviceCmd::Remove { target, dir } => {
            let dir = abs(&dir)?;
            member_answer(send_with_bar(
                &target,
                &Request::DeviceRemove { dir },
                "remove",
            )?)
        }
        DeviceCmd::Replace { target, old, new } => {
            let (old, new) = (abs(&old)?, abs(&new)?);
            if !new.is_dir() {
                bail!("{} is not a directory", new.display());
            }
            member_answer(send_with_bar(
                &target,
                &Request::DeviceReplace { old, new },
                "replace",
            )?)
        }
    }
}

pub fn rebalance(target: &Path) -> Result<i32> {
    member_answer(send_with_bar(target, &Request::Rebalance, "rebalance")?)
}

pub fn set(target: &Path, setting: &str) -> Result<i32> {
    let Some((key, value)) = setting.split_once('=') else {
        bail!("{setting}: expected KEY=VALUE (copies=N)");
    };
    match key {
        "copies" => {
            let copies: u32 = value
                .parse()
                .map_err(|_| anyhow::anyhow!("copies={value}: not a number"))?;
            member_answer(send_with_bar(
                target,
                &Request::SetCopies { copies },
                "copies",
            )?)
        }
        other => bail!("{other}: unknown setting (known: copies)"),
    }
}
