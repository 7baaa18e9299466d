//! `vpool create`, `vpool scrub`, `vpool device ...`, `vpool rebalance`,
//! `vpool set`: sent to the daemon serving the pool, or run here on an
//! unmounted pool.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

use super::DeviceCmd;
use super::output::{EXIT_PROBLEMS, json, say};
use super::target::{Target, resolve, send};
use crate::control::{self, Request, Response};
use crate::fs::scrub::ScrubReport;
use crate::pool::{CreateOptions, Pool};
use crate::util::human;

pub fn create(dirs: &[PathBuf], copies: u32, extent_size: u64, block_size: u64) -> Result<i32> {
    let block_size =
        u32::try_from(block_size).map_err(|_| anyhow!("block size {block_size} is too large"))?;
    let label = Pool::create(
        dirs,
        CreateOptions {
            copies,
            extent_size,
            block_size,
        },
    )?;
    say(format!(
        "created pool {} over {} member(s), copies={}, extent size {}, block size {}",
        label.pool,
        label.members.len(),
        copies,
        human(extent_size),
        human(block_size as u64)
    ));
    for m in &label.members {
        say(format!("  {}", m.path.display()));
    }
    json(&serde_json::json!({
        "pool": label.pool,
        "members": label.members.iter().map(|m| &m.path).collect::<Vec<_>>(),
        "copies": copies,
        "extent_size": extent_size,
        "block_size": block_size,
    }));
    Ok(0)
}

pub fn scrub(target: &Path, stop: bool) -> Result<i32> {
    let target = resolve(target)?;
    if stop {
        let Target::Mounted(mp) = &target else {
            bail!("the pool is not mounted: no scrub is running");
        };
        match control::request(mp, &Request::ScrubStop)? {
            Response::Error { message } => bail!("{message}"),
            _ => {
                say("scrub stopping (what it checked and repaired stays done)");
                json(&serde_json::json!({ "stopped": "scrub" }));
                return Ok(0);
            }
        }
    }
    let report = match send(&target, &Request::Scrub, "scrub", "extents")? {
        Response::Scrubbed(r) => *r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    json(&report);
    print_report(&report);
    Ok(if report.clean() { 0 } else { EXIT_PROBLEMS })
}

fn print_report(r: &ScrubReport) {
    let d = &r.data;
    say(format!(
        "scrubbed {} extent(s), {} of block copies read in {:.1}s",
        d.extents,
        human(d.bytes),
        r.seconds
    ));
    say(format!(
        "data: {} checksum error(s), {} copy(ies) repaired, {} unrecoverable block(s), {} read error(s), {} table(s) rebuilt",
        d.checksum_errors, d.repaired, d.unrecoverable, d.io_errors, d.tables_rebuilt
    ));
    if r.cancelled {
        say("stopped before the end: metadata and snapshot deltas were not checked");
    } else {
        say(format!(
            "metadata: {} problem(s), {} copy(ies) rewritten",
            r.metadata_problems.len(),
            r.metadata_rewritten
        ));
        for p in &r.metadata_problems {
            say(format!("  {p}"));
        }
        say(format!(
            "snapshot deltas: {} copy(ies) verified, {} bad, {} rewritten, {} problem(s) left",
            r.deltas_checked,
            r.deltas_bad,
            r.deltas_repaired,
            r.delta_problems.len()
        ));
        for p in &r.delta_problems {
            say(format!("  {p}"));
        }
    }
    for e in &r.errors {
        say(format!("error: {e}"));
    }
    say(match r.result() {
        "problems" => "result: PROBLEMS REMAIN (files with unrecoverable blocks return EIO there)",
        "cancelled" => "result: cancelled",
        "repaired" => "result: clean (everything found was repaired)",
        _ => "result: clean",
    });
}

fn member_answer(resp: Response) -> Result<i32> {
    match resp {
        Response::Member(r) => {
            say(&r.message);
            json(&r);
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// Sends a member request to TARGET with a progress bar.
fn member_request(target: &Path, req: &Request, what: &str) -> Result<i32> {
    member_answer(send(&resolve(target)?, req, what, "extents")?)
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
            member_request(&target, &Request::DeviceAdd { dir }, "add")
        }
        DeviceCmd::Remove { target, dir } => {
            let dir = abs(&dir)?;
            member_request(&target, &Request::DeviceRemove { dir }, "remove")
        }
        DeviceCmd::Replace { target, old, new } => {
            let (old, new) = (abs(&old)?, abs(&new)?);
            if !new.is_dir() {
                bail!("{} is not a directory", new.display());
            }
            member_request(&target, &Request::DeviceReplace { old, new }, "replace")
        }
    }
}

pub fn rebalance(target: &Path) -> Result<i32> {
    member_request(target, &Request::Rebalance, "rebalance")
}

pub fn set(target: &Path, setting: &str) -> Result<i32> {
    let Some((key, value)) = setting.split_once('=') else {
        bail!("{setting}: expected KEY=VALUE (copies=N)");
    };
    match key {
        "copies" => {
            let copies: u32 = value
                .parse()
                .map_err(|_| anyhow!("copies={value}: not a number"))?;
            member_request(target, &Request::SetCopies { copies }, "copies")
        }
        other => bail!("{other}: unknown setting (known: copies)"),
    }
}
