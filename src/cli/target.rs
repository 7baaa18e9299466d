//! Where a command goes: the daemon serving a mounted pool, or the pool
//! opened here when it is not mounted ("open, run, commit"), with progress
//! bars and the job id of long requests.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::output::{bar, ui};
use crate::control::{self, Request, Response};
use crate::daemon;
use crate::fs::{Vfs, VfsOptions};
use crate::pool::{Pool, read_lock_info};

/// Where requests for a target go.
pub enum Target {
    Mounted(PathBuf),
    Offline(PathBuf),
}

pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// What a TARGET path names (canonical paths).
pub enum Named {
    /// A vpool mountpoint.
    Mountpoint(PathBuf),
    /// A member directory, with the mountpoint its lock file names when the
    /// daemon holding the lock is alive.
    Member {
        dir: PathBuf,
        daemon: Option<PathBuf>,
    },
}

/// TARGET is a mountpoint or a member directory (of a mounted pool or not).
/// A member's lock file decides whether it is mounted, not whether a daemon
/// answers there: callers choose what to do with one that does not.
pub fn name_target(target: &Path) -> Result<Named> {
    let canon = std::fs::canonicalize(target)
        .with_context(|| format!("{} does not exist", target.display()))?;
    if crate::pool::label::has_label(&crate::storage::real::RealStorage, &canon) {
        let daemon = read_lock_info(&crate::storage::real::RealStorage, &canon)
            .filter(|(pid, _)| pid_alive(*pid))
            .map(|(_, mp)| mp);
        return Ok(Named::Member { dir: canon, daemon });
    }
    if daemon::mount_type(&canon).is_some() {
        return Ok(Named::Mountpoint(canon));
    }
    bail!(
        "{} is neither a vpool mountpoint nor a member directory",
        canon.display()
    )
}

/// Where TARGET's requests go: its daemon when one holds the pool, else the
/// pool opened here.
pub fn resolve(target: &Path) -> Result<Target> {
    Ok(match name_target(target)? {
        Named::Mountpoint(mp)
        | Named::Member {
            daemon: Some(mp), ..
        } => Target::Mounted(mp),
        Named::Member { dir, daemon: None } => Target::Offline(dir),
    })
}

/// The mountpoints of every vpool mount this process can see.
pub fn mounted_pools() -> Vec<PathBuf> {
    std::fs::read("/proc/self/mountinfo")
        .map(|b| daemon::mounts_of_type(&b, "fuse.vpool"))
        .unwrap_or_default()
}

/// Opens an unmounted pool here, runs `f` on it and commits.
pub fn offline<T>(dir: &Path, f: impl FnOnce(&Vfs) -> T) -> Result<T> {
    let pool = Pool::open(dir)?;
    let vfs = Vfs::mount(pool, VfsOptions::default())?;
    let r = f(&vfs);
    vfs.snaps.wait_idle();
    vfs.commit().context("final commit")?;
    Ok(r)
}

/// Sends `req`, drawing a progress bar labelled `what` in `unit`s; a long
/// request run by a daemon tells its job id (on a terminal: how to see or
/// stop it after Ctrl-C).
pub fn send(target: &Target, req: &Request, what: &str, unit: &str) -> Result<Response> {
    let pb = bar(what, unit);
    let resp = match target {
        Target::Mounted(mp) => {
            let mut each = |r: &Response| {
                match r {
                    Response::Progress { done, total } => {
                        pb.set_length(*total);
                        pb.set_position(*done);
                    }
                    Response::Job { id } => {
                        let u = ui();
                        if !u.json && !u.quiet && std::io::stderr().is_terminal() {
                            pb.println(format!(
                                "job {id}: Ctrl-C leaves it running (`vpool jobs` shows it, `vpool jobs cancel {id}` stops it)"
                            ));
                        }
                    }
                    _ => {}
                }
                true
            };
            control::request_stream(mp, req, &mut each)
                .with_context(|| format!("no vpool daemon answers for {}", mp.display()))?
        }
        Target::Offline(dir) => offline(dir, |vfs| {
            control::execute_with_progress(vfs, req, &mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
                true
            })
        })?,
    };
    pb.finish_and_clear();
    Ok(resp)
}

/// Sends `req` with descriptor `fd` (the stream of a send or a receive):
/// to the daemon, which reads or writes it itself, or to the pool opened
/// here. The bar counts `unit`s, with the rate.
pub fn send_fd(
    target: &Target,
    req: &Request,
    fd: &std::fs::File,
    what: &str,
    unit: &str,
) -> Result<Response> {
    use std::os::fd::AsRawFd;
    let pb = super::output::rate_bar(what, unit);
    let resp = match target {
        Target::Mounted(mp) => {
            let mut each = |r: &Response| {
                if let Response::Progress { done, total } = r {
                    pb.set_length(*total);
                    pb.set_position(*done);
                }
                true
            };
            control::request_with_fd(mp, req, Some(fd.as_raw_fd()), &mut each)
                .with_context(|| format!("no vpool daemon answers for {}", mp.display()))?
        }
        Target::Offline(dir) => {
            let f = fd
                .try_clone()
                .context("duplicating the stream's descriptor")?;
            offline(dir, |vfs| {
                control::execute_io(vfs, req, Some(f), &mut |done, total| {
                    pb.set_length(total);
                    pb.set_position(done);
                    true
                })
            })?
        }
    };
    pb.finish_and_clear();
    Ok(resp)
}

/// The answer, or its error as an error.
pub fn expect_done(resp: Response) -> Result<Response> {
    match resp {
        Response::Error { message } => bail!("{message}"),
        other => Ok(other),
    }
}
