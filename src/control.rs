//! The admin socket between the CLI and a mounted daemon: one JSON request per
//! connection, one JSON response. The socket lives in a directory only its owner
//! can enter (mode 0700) and the daemon also checks the peer's uid (SO_PEERCRED),
//! so only the daemon's owner and root can talk to it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, FsError, FsResult, Result};
use crate::fs::Vfs;
use crate::fs::snapview::RestoreReport;
use crate::pool::PoolStatus;
use crate::snapshot::{Kind, PrunePolicy, SnapshotInfo};

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Commit everything durably (before an unmount, or on demand).
    Sync,
    SnapshotCreate {
        name: String,
        kind: Option<Kind>,
        /// Answer only once the background capture is complete.
        wait: bool,
        /// zstd level of the deltas (default: the fastest).
        #[serde(default)]
        level: Option<i32>,
    },
    SnapshotList,
    SnapshotDelete {
        name: String,
    },
    /// Paths are pool-relative.
    SnapshotRestore {
        name: String,
        paths: Vec<String>,
    },
    SnapshotClone {
        name: String,
        path: String,
        newpath: String,
    },
    SnapshotPrune {
        policy: PrunePolicy,
        dry_run: bool,
    },
    /// Verify and repair every copy of everything (answers with progress lines).
    Scrub,
    /// Member changes (paths absolute; answer with progress lines).
    DeviceAdd {
        dir: PathBuf,
    },
    DeviceRemove {
        dir: PathBuf,
    },
    DeviceReplace {
        old: PathBuf,
        new: PathBuf,
    },
    Rebalance,
    SetCopies {
        copies: u32,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<PoolStatus>),
    Done,
    Snapshot(SnapshotInfo),
    Snapshots {
        list: Vec<SnapshotInfo>,
    },
    Restored(RestoreReport),
    Pruned {
        names: Vec<String>,
    },
    Scrubbed(Box<crate::fs::scrub::ScrubReport>),
    Member(crate::fs::members::MemberReport),
    /// An intermediate answer of a long request: `done` of `total` units.
    Progress {
        done: u64,
        total: u64,
    },
    Error {
        message: String,
    },
}

/// The message for a failed snapshot command about snapshot `name`.
pub fn snapshot_error(name: &str, e: &FsError) -> String {
    match e {
        FsError::Exists => format!("a snapshot (or file) named {name} already exists"),
        FsError::NotFound => format!("{name}: no such snapshot, or no such path in it"),
        FsError::Invalid => format!(
            "{name}: invalid name or path (a snapshot name must not be empty, contain '/' or start with '.')"
        ),
        FsError::ReadOnly => "the pool is mounted read-only".into(),
        other => format!("{name}: {other}"),
    }
}

/// Runs one request against a filesystem (a daemon's, or one the CLI opened).
pub fn execute(vfs: &Vfs, req: &Request) -> Response {
    execute_with_progress(vfs, req, &mut |_, _| {})
}

/// [`execute`], reporting the progress of long requests (scrub).
pub fn execute_with_progress(
    vfs: &Vfs,
    req: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Response {
    let err = |name: &str, e: FsError| Response::Error {
        message: snapshot_error(name, &e),
    };
    match req {
        Request::Status => Response::Status(Box::new(vfs.status())),
        Request::Sync => match vfs.commit() {
            Ok(()) => Response::Done,
            Err(e) => Response::Error {
                message: format!("commit failed: {e}"),
            },
        },
        Request::SnapshotCreate {
            name,
            kind,
            wait,
            level,
        } => match vfs.snapshot_create_with(name, *kind, *level) {
            Ok(info) => {
                if *wait && let Err(e) = vfs.snapshot_wait() {
                    return err(name, e);
                }
                match vfs.snapshot_list().into_iter().find(|i| i.id == info.id) {
                    Some(i) => Response::Snapshot(i),
                    None => Response::Snapshot(info),
                }
            }
            Err(e) => err(name, e),
        },
        Request::SnapshotList => Response::Snapshots {
            list: vfs.snapshot_list(),
        },
        Request::SnapshotDelete { name } => {
            let before = snapshot_names(vfs);
            let r = vfs.snapshot_delete(name);
            forget_deleted(vfs, before);
            match r {
                Ok(()) => Response::Done,
                Err(e) => err(name, e),
            }
        }
        Request::SnapshotRestore { name, paths } => {
            let paths: Vec<Vec<u8>> = paths.iter().map(|p| p.as_bytes().to_vec()).collect();
            match vfs.snapshot_restore(name, &paths) {
                Ok(r) => Response::Restored(r),
                Err(e) => err(name, e),
            }
        }
        Request::SnapshotClone {
            name,
            path,
            newpath,
        } => match vfs.snapshot_clone(name, path.as_bytes(), newpath.as_bytes()) {
            Ok(_) => Response::Done,
            Err(FsError::Exists) => Response::Error {
                message: format!("{newpath} already exists"),
            },
            Err(e) => err(name, e),
        },
        Request::SnapshotPrune { policy, dry_run } => {
            let before = snapshot_names(vfs);
            let r = vfs.snapshot_prune(policy, *dry_run);
            // Also after a failure: the snapshots deleted before it are gone.
            forget_deleted(vfs, before);
            match r {
                Ok(names) => Response::Pruned { names },
                Err(e) => err("prune", e),
            }
        }
        Request::Scrub => Response::Scrubbed(Box::new(vfs.scrub(progress))),
        Request::DeviceAdd { dir } => member(vfs.device_add(dir, progress)),
        Request::DeviceRemove { dir } => member(vfs.device_remove(dir, progress)),
        Request::DeviceReplace { old, new } => member(vfs.device_replace(old, new, progress)),
        Request::Rebalance => member(vfs.rebalance(progress)),
        Request::SetCopies { copies } => member(vfs.set_copies(*copies, progress)),
    }
}

fn member(r: FsResult<crate::fs::members::MemberReport>) -> Response {
    match r {
        Ok(rep) => Response::Member(rep),
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

fn snapshot_names(vfs: &Vfs) -> Vec<String> {
    vfs.snapshot_list().into_iter().map(|i| i.name).collect()
}

/// A snapshot deleted here (not by `rmdir`, where the kernel drops its own
/// entry) may still be in the kernel's dentry cache for the entry TTL: `stat
/// MOUNT/.snapshots/NAME` right after `vpool snapshot delete` would find it.
/// Invalidates the entries of the snapshots in `before` that are gone. Called
/// from the control thread, never from a FUSE request (the kernel would wait
/// for the directory lock that request holds).
fn forget_deleted(vfs: &Vfs, before: Vec<String>) {
    let Some(k) = vfs.kernel.get() else { return };
    let now = snapshot_names(vfs);
    for n in before.iter().filter(|n| !now.contains(n)) {
        k.inval_entry(crate::fs::snapview::SNAPDIR_INO, n.as_bytes());
    }
}

/// Directory holding sockets and logs of this user's daemons.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/vpool");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vpool"),
        _ => PathBuf::from(format!("/tmp/vpool-{uid}")),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Socket path of the daemon serving `mountpoint` (canonical path expected).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    runtime_dir().join(format!(
        "{:016x}.sock",
        fnv1a(mountpoint.as_os_str().as_bytes())
    ))
}

/// Log file of the detached daemon serving `mountpoint`.
pub fn log_path(mountpoint: &Path) -> PathBuf {
    socket_path(mountpoint).with_extension("log")
}

pub fn ensure_runtime_dir() -> Result<PathBuf> {
    let d = runtime_dir();
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    if let Some(parent) = d.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(&d, e)),
    }
    check_runtime_dir(&d, uid)?;
    Ok(d)
}

/// The socket directory must be a real directory (not a symlink) owned by
/// `uid` and closed to others: under `/tmp` another user could have made it
/// first, to catch or block admin connections. One that is ours but open is
/// closed.
pub fn check_runtime_dir(d: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(d).map_err(|e| Error::io(d, e))?;
    if !md.file_type().is_dir() {
        return Err(Error::Other(format!(
            "{}: the admin socket directory is not a directory (a symlink or file \
             someone else may have made); remove it",
            d.display()
        )));
    }
    if md.uid() != uid {
        return Err(Error::Other(format!(
            "{}: the admin socket directory belongs to uid {}, not to uid {uid}; \
             remove it or set XDG_RUNTIME_DIR",
            d.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(d, e))?;
    }
    Ok(())
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    // SAFETY: ucred is plain old data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket descriptor, valid out-pointers sized as declared.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// The daemon's side: serves requests until the process exits.
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Holds the filesystem weakly: the daemon drops its last strong reference at
    /// exit, which closes the metadata stores cleanly.
    pub fn start(mountpoint: &Path, vfs: Weak<Vfs>) -> Result<Server> {
        ensure_runtime_dir()?;
        let path = socket_path(mountpoint);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(&path, e))?;
        let mp = mountpoint.to_path_buf();
        std::thread::Builder::new()
            .name("vpool-control".into())
            .spawn(move || {
                // SAFETY: geteuid cannot fail and touches no memory.
                let me = unsafe { libc::geteuid() };
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    match peer_uid(&conn) {
                        Some(uid) if uid == me || uid == 0 => {}
                        _ => continue,
                    }
                    let Some(vfs) = vfs.upgrade() else { break };
                    let mp = mp.clone();
                    // One thread per connection: a long restore must not hold up status.
                    let _ = std::thread::Builder::new()
                        .name("vpool-control-req".into())
                        .spawn(move || serve_one(conn, &vfs, &mp));
                }
            })
            .map_err(|e| Error::Other(format!("cannot start control thread: {e}")))?;
        Ok(Server { path })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(conn: UnixStream, vfs: &Vfs, mp: &Path) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    conn.set_read_timeout(None)?;
    let mut last = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        // A few lines a second; a client gone away does not stop the work.
        if done == 0 || done == total || last.elapsed() >= Duration::from_millis(200) {
            last = std::time::Instant::now();
            let mut w = &conn;
            if let Ok(mut b) = serde_json::to_vec(&Response::Progress { done, total }) {
                b.push(b'\n');
                let _ = w.write_all(&b);
            }
        }
    };
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match execute_with_progress(vfs, &req, &mut progress) {
            Response::Status(mut st) => {
                st.mounted = true;
                st.mountpoint = Some(mp.to_path_buf());
                st.pid = Some(std::process::id());
                Response::Status(st)
            }
            // Through the mount, so before answering: the CLI's next look
            // at the files must find them right.
            Response::Restored(r) => {
                for p in crate::fs::kernel_refresh::refresh_restored(mp, &r.restored) {
                    tracing::warn!("{p}");
                }
                Response::Restored(r)
            }
            other => other,
        },
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut w = &conn;
    serde_json::to_writer(&mut w, &resp)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// The CLI's side: sends one request to the daemon serving `mountpoint`.
pub fn request(mountpoint: &Path, req: &Request) -> Result<Response> {
    request_with_progress(mountpoint, req, &mut |_, _| {})
}

/// [`request`], passing progress answers to `progress`.
pub fn request_with_progress(
    mountpoint: &Path,
    req: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Response> {
    let path = socket_path(mountpoint);
    let mut s = UnixStream::connect(&path).map_err(|e| Error::io(&path, e))?;
    // Status and sync answer quickly; snapshot work takes as long as the data.
    let timeout = match req {
        Request::Status | Request::Sync => Some(Duration::from_secs(120)),
        _ => None,
    };
    s.set_read_timeout(timeout)
        .map_err(|e| Error::io(&path, e))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| Error::Other(e.to_string()))?;
    msg.push(b'\n');
    s.write_all(&msg).map_err(|e| Error::io(&path, e))?;
    let mut reader = BufReader::new(&s);
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(&path, e))?;
        if n == 0 {
            return Err(Error::Other(
                "the daemon closed the connection without an answer".into(),
            ));
        }
        match serde_json::from_str(&line) {
            Ok(Response::Progress { done, total }) => progress(done, total),
            Ok(r) => return Ok(r),
            Err(e) => return Err(Error::Other(format!("bad answer from daemon: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_dir_must_be_our_own_real_directory() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        check_runtime_dir(&real, me).unwrap();
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o777, 0o700);
        // A symlink to our own directory is refused all the same.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = check_runtime_dir(&link, me).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(check_runtime_dir(&file, me).is_err());
        // Someone else's directory.
        let e = check_runtime_dir(&real, me + 1).unwrap_err().to_string();
        assert!(e.contains("belongs to uid"), "{e}");
    }
}
