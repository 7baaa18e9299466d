//! `vpool snapshot ...`: sends the request to the daemon serving the pool, or,
//! when the pool is not mounted, opens it here and runs the same request.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::SnapshotCmd;
use super::commands::pid_alive;
use crate::control::{self, Request, Response};
use crate::daemon;
use crate::fs::{Vfs, VfsOptions};
use crate::pool::{Pool, read_lock_info};
use crate::snapshot::PrunePolicy;
use crate::util::{human, utc_string};

/// Where requests for `target` go.
pub(super) enum Target {
    Mounted(PathBuf),
    Offline(PathBuf),
}

pub(super) fn resolve(target: &Path) -> Result<Target> {
    let canon = std::fs::canonicalize(target)
        .with_context(|| format!("{} does not exist", target.display()))?;
    if crate::pool::label::has_label(&crate::storage::real::RealStorage, &canon) {
        if let Some((pid, mp)) = read_lock_info(&crate::storage::real::RealStorage, &canon)
            && pid_alive(pid)
        {
            return Ok(Target::Mounted(mp));
        }
        return Ok(Target::Offline(canon));
    }
    if daemon::mount_type(&canon).is_some() {
        return Ok(Target::Mounted(canon));
    }
    bail!(
        "{} is neither a vpool mountpoint nor a member directory",
        canon.display()
    )
}

fn send(target: &Target, req: &Request) -> Result<Response> {
    match target {
        Target::Mounted(mp) => control::request(mp, req)
            .with_context(|| format!("no vpool daemon answers for {}", mp.display())),
        Target::Offline(dir) => {
            let pool = Pool::open(dir)?;
            let vfs = Vfs::mount(pool, VfsOptions::default())?;
            let resp = control::execute(&vfs, req);
            vfs.snaps.wait_idle();
            vfs.commit().context("final commit")?;
            Ok(resp)
        }
    }
}

/// A path as the pool sees it: relative paths are taken as inside the pool;
/// absolute ones must lie under the mountpoint.
fn pool_path(target: &Target, p: &Path) -> Result<String> {
    let rel = if p.is_absolute() {
        let Target::Mounted(mp) = target else {
            bail!(
                "{}: give the path inside the pool (the pool is not mounted)",
                p.display()
            );
        };
        // The file may be gone from the live tree: only its directory must exist.
        let parent = p.parent().unwrap_or(Path::new("/"));
        let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
        let full = parent.join(p.file_name().unwrap_or_default());
        full.strip_prefix(mp)
            .map(|r| r.to_path_buf())
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} is not under the mountpoint {}",
                    p.display(),
                    mp.display()
                )
            })?
    } else {
        p.to_path_buf()
    };
    if rel.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("{}: '..' is not allowed in a pool path", p.display());
    }
    Ok(rel.to_string_lossy().into_owned())
}

/// Flushes what the kernel still holds for the mount (writeback cache) to the
/// daemon, so that a snapshot or restore sees every write made before it.
fn flush_kernel(target: &Target) {
    use std::os::unix::io::AsRawFd;
    if let Target::Mounted(mp) = target
        && let Ok(d) = std::fs::File::open(mp)
    {
        // SAFETY: syncfs on a valid descriptor of a directory we opened.
        unsafe {
            libc::syncfs(d.as_raw_fd());
        }
    }
}

fn expect_done(resp: Response) -> Result<Response> {
    match resp {
        Response::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}

pub fn run(cmd: SnapshotCmd) -> Result<i32> {
    match cmd {
        SnapshotCmd::Create {
            kind,
            wait,
            level,
            target,
            name,
        } => {
            let t = resolve(&target)?;
            flush_kernel(&t);
            let resp = expect_done(send(
                &t,
                &Request::SnapshotCreate {
                    name,
                    kind,
                    wait,
                    level,
                },
            )?)?;
            if let Response::Snapshot(i) = resp {
                let base = i.base.map(|b| format!(", base {b}")).unwrap_or_default();
                if i.state == "complete" {
                    println!(
                        "snapshot {} created ({}{base}): {} changed block(s), {} stored",
                        i.name,
                        i.kind,
                        i.changed_blocks,
                        human(i.stored_bytes)
                    );
                } else {
                    println!(
                        "snapshot {} created ({}{base}), {}; {} block(s) to capture",
                        i.name, i.kind, i.state, i.changed_blocks
                    );
                }
            }
            Ok(0)
        }
        SnapshotCmd::List { json, target } => {
            let t = resolve(&target)?;
            let Response::Snapshots { list } = expect_done(send(&t, &Request::SnapshotList)?)?
            else {
                bail!("unexpected answer");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<20} {:<12} {:<20} {:<19} {:>10} {:>10} {:>10}  STATE",
                "NAME", "KIND", "BASE", "CREATED (UTC)", "LOGICAL", "STORED", "CHANGED"
            );
            for i in list {
                println!(
                    "{:<20} {:<12} {:<20} {:<19} {:>10} {:>10} {:>10}  {}",
                    i.name,
                    i.kind,
                    i.base.unwrap_or_else(|| "-".into()),
                    utc_string(i.created),
                    human(i.logical_bytes),
                    human(i.stored_bytes),
                    i.changed_blocks,
                    i.state
                );
            }
            Ok(0)
        }
        SnapshotCmd::Delete { target, name } => {
            let t = resolve(&target)?;
            expect_done(send(&t, &Request::SnapshotDelete { name: name.clone() })?)?;
            println!("snapshot {name} deleted");
            Ok(0)
        }
        SnapshotCmd::Restore {
            target,
            name,
            paths,
        } => {
            let t = resolve(&target)?;
            let paths = paths
                .iter()
                .map(|p| pool_path(&t, p))
                .collect::<Result<Vec<_>>>()?;
            flush_kernel(&t);
            let resp = expect_done(send(
                &t,
                &Request::SnapshotRestore {
                    name: name.clone(),
                    paths: paths.clone(),
                },
            )?)?;
            if let Response::Restored(r) = resp {
                println!(
                    "restored {} file(s) from {name}: {} block(s) written, {} punched, {} compared",
                    r.files, r.blocks_written, r.blocks_punched, r.blocks_compared
                );
            }
            Ok(0)
        }
        SnapshotCmd::Clone {
            target,
            name,
            path,
            newpath,
        } => {
            let t = resolve(&target)?;
            let path = pool_path(&t, &path)?;
            let newpath = pool_path(&t, &newpath)?;
            expect_done(send(
                &t,
                &Request::SnapshotClone {
                    name: name.clone(),
                    path: path.clone(),
                    newpath: newpath.clone(),
                },
            )?)?;
            println!("cloned {path} of snapshot {name} to {newpath}");
            Ok(0)
        }
        SnapshotCmd::Prune {
            target,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
        } => {
            let t = resolve(&target)?;
            let policy = PrunePolicy {
                keep_last,
                keep_hourly,
                keep_daily,
                keep_weekly,
                keep_monthly,
            };
            let resp = expect_done(send(&t, &Request::SnapshotPrune { policy, dry_run })?)?;
            if let Response::Pruned { names } = resp {
                let verb = if dry_run { "would delete" } else { "deleted" };
                if names.is_empty() {
                    println!("nothing to delete: every snapshot is kept");
                }
                for n in names {
                    println!("{verb} {n}");
                }
            }
            Ok(0)
        }
    }
}
