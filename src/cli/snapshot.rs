//! `vpool snapshot ...`: sends the request to the daemon serving the pool, or,
//! when the pool is not mounted, opens it here and runs the same request.

use std::path::{Component, Path};

use anyhow::{Result, bail};

use super::SnapshotCmd;
use super::output::{json, local_time, say, ui};
use super::target::{Target, expect_done, resolve, send};
use crate::control::{Request, Response};
use crate::util::human;

/// A path as the pool sees it: relative paths are taken as inside the pool;
/// absolute ones must lie under the mountpoint.
pub(super) fn pool_path(target: &Target, p: &Path) -> Result<String> {
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

pub fn run(cmd: SnapshotCmd) -> Result<i32> {
    match cmd {
        SnapshotCmd::Send {
            from,
            resume,
            output,
            to,
            keep,
            target,
            name,
        } => super::transfer::send_cmd(super::transfer::SendArgs {
            target,
            name,
            from,
            resume,
            output,
            to,
            keep: keep.policy(),
        }),
        SnapshotCmd::Receive {
            name,
            input,
            abort,
            target,
        } => super::transfer::receive_cmd(target, name, input, abort),
        SnapshotCmd::Create {
            kind,
            wait,
            level,
            auto,
            prefix,
            target,
            name,
        } => {
            let t = resolve(&target)?;
            flush_kernel(&t);
            let base = match (auto, name) {
                (_, Some(n)) => n,
                (true, None) => crate::snapshot::prune::auto_name(
                    &prefix,
                    jiff::Timestamp::now().as_second(),
                    &jiff::tz::TimeZone::system(),
                ),
                (false, None) => bail!("give a NAME, or --auto"),
            };
            // Two automatic snapshots in one second get -2, -3, ...
            let mut attempt = 1;
            let resp = loop {
                let name = if attempt == 1 {
                    base.clone()
                } else {
                    format!("{base}-{attempt}")
                };
                let req = Request::SnapshotCreate {
                    name: name.clone(),
                    kind,
                    wait,
                    level,
                };
                let r = send(&t, &req, "capture", "blocks")?;
                match r {
                    Response::Error { message }
                        if auto && message.contains("already exists") && attempt < 10 =>
                    {
                        tracing::debug!("{message}; trying the next name");
                        attempt += 1;
                    }
                    other => break expect_done(other)?,
                }
            };
            if let Response::Snapshot(i) = resp {
                json(&i);
                let base = i
                    .base
                    .as_ref()
                    .map(|b| format!(", base {b}"))
                    .unwrap_or_default();
                if i.state == "complete" {
                    say(format!(
                        "snapshot {} created ({}{base}): {} changed block(s), {} stored",
                        i.name,
                        i.kind,
                        i.changed_blocks,
                        human(i.stored_bytes)
                    ));
                } else {
                    say(format!(
                        "snapshot {} created ({}{base}), {}; {} block(s) to capture",
                        i.name, i.kind, i.state, i.changed_blocks
                    ));
                }
            }
            Ok(0)
        }
        SnapshotCmd::List { target } => {
            let t = resolve(&target)?;
            let Response::Snapshots { list } =
                expect_done(send(&t, &Request::SnapshotList, "list", "")?)?
            else {
                bail!("unexpected answer");
            };
            json(&list);
            if ui().json {
                return Ok(0);
            }
            say(format!(
                "{:<24} {:<12} {:<20} {:<19} {:>10} {:>10} {:>10}  STATE",
                "NAME", "KIND", "BASE", "CREATED (LOCAL)", "LOGICAL", "STORED", "CHANGED"
            ));
            for i in list {
                say(format!(
                    "{:<24} {:<12} {:<20} {:<19} {:>10} {:>10} {:>10}  {}{}",
                    i.name,
                    i.kind,
                    i.base.clone().unwrap_or_else(|| "-".into()),
                    local_time(i.created, false),
                    human(i.logical_bytes),
                    human(i.stored_bytes),
                    i.changed_blocks,
                    i.state,
                    if i.held { " (held)" } else { "" }
                ));
            }
            Ok(0)
        }
        SnapshotCmd::Delete { target, name } => {
            let t = resolve(&target)?;
            expect_done(send(
                &t,
                &Request::SnapshotDelete { name: name.clone() },
                "delete",
                "files",
            )?)?;
            say(format!("snapshot {name} deleted"));
            json(&serde_json::json!({ "deleted": name }));
            Ok(0)
        }
        SnapshotCmd::Export {
            from,
            format,
            backing,
            backing_format,
            target,
            name,
            path,
            out,
        } => super::export::run(super::export::Args {
            from,
            format,
            backing,
            backing_format,
            target,
            name,
            path,
            out,
        }),
        SnapshotCmd::Hold { target, name } => hold(&target, name, true),
        SnapshotCmd::Release { target, name } => hold(&target, name, false),
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
                "restore",
                "blocks",
            )?)?;
            if let Response::Restored(r) = resp {
                json(&r);
                say(format!(
                    "restored {} file(s) from {name}: {} block(s) written, {} punched, {} compared",
                    r.files, r.blocks_written, r.blocks_punched, r.blocks_compared
                ));
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
                "clone",
                "",
            )?)?;
            say(format!("cloned {path} of snapshot {name} to {newpath}"));
            json(&serde_json::json!({ "snapshot": name, "path": path, "clone": newpath }));
            Ok(0)
        }
        SnapshotCmd::Prune {
            target,
            keep,
            dry_run,
        } => {
            let t = resolve(&target)?;
            let policy = keep.policy();
            let resp = expect_done(send(
                &t,
                &Request::SnapshotPrune { policy, dry_run },
                "prune",
                "snapshots",
            )?)?;
            if let Response::Pruned { plan } = resp {
                json(&serde_json::json!({ "dry_run": dry_run, "snapshots": plan }));
                let verb = if dry_run { "would delete" } else { "deleted" };
                let gone: Vec<_> = plan.iter().filter(|d| !d.keep).collect();
                if gone.is_empty() {
                    say("nothing to delete: every snapshot is kept");
                }
                for d in &plan {
                    if d.keep {
                        if ui().verbose > 0 {
                            say(format!("keep {} ({})", d.name, d.reasons.join(", ")));
                        }
                    } else {
                        say(format!("{verb} {} ({})", d.name, d.reasons.join(", ")));
                    }
                }
            }
            Ok(0)
        }
    }
}

fn hold(target: &Path, name: String, held: bool) -> Result<i32> {
    let t = resolve(target)?;
    expect_done(send(
        &t,
        &Request::SnapshotHold {
            name: name.clone(),
            held,
        },
        "hold",
        "",
    )?)?;
    let verb = if held { "held" } else { "released" };
    say(format!("snapshot {name} {verb}"));
    json(&serde_json::json!({ "snapshot": name, "held": held }));
    Ok(0)
}
