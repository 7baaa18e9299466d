//! The admin socket between the CLI and a mounted daemon: one JSON request per
//! connection, one JSON response. The socket lives in a directory only its owner
//! can enter (mode 0700) and the daemon also checks the peer's uid (SO_PEERCRED),
//! so only the daemon's owner and root can talk to it. A request that works
//! on a stream carries a descriptor ([`fdpass`]). The requests, their
//! execution and both ends of the protocol stay together (about 850 lines):
//! a new request is added in one place.

mod fdpass;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, FsError, FsResult, Result};
use crate::fs::Vfs;
use crate::fs::jobs::JobInfo;
use crate::fs::snapview::RestoreReport;
use crate::pool::PoolStatus;
use crate::pool::info::Event;
use crate::snapshot::prune::Decision;
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
    /// Hold (`held`) or release a snapshot.
    SnapshotHold {
        name: String,
        held: bool,
    },
    /// The export map of one file of a snapshot, with the ranges changed
    /// since `base` (`vpool snapshot export` then reads the bytes through the
    /// mount). `path` is pool-relative.
    SnapshotExportMap {
        name: String,
        path: String,
        base: Option<String>,
    },
    /// Verify and repair every copy of everything (answers with progress lines).
    Scrub,
    /// Stop the running scrub.
    ScrubStop,
    /// The running long jobs.
    Jobs,
    JobCancel {
        id: String,
    },
    /// The event history from `since` on; with `follow`, then every new
    /// event as it comes (one `event` answer per line) until the client
    /// goes away or the pool is unmounted.
    Events {
        since: u64,
        follow: bool,
    },
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
    /// Write the stream of snapshot `name` (relative to `base`) into the
    /// descriptor sent with the request; with `resume`, only the rest an
    /// interrupted receive is missing.
    SnapshotSend {
        name: String,
        base: Option<String>,
        resume: Option<String>,
    },
    /// Read a stream from the descriptor sent with the request and keep it
    /// as a new snapshot (`name`: instead of the stream's). `total`: the
    /// stream's length when known, for progress.
    SnapshotReceive {
        name: Option<String>,
        total: u64,
    },
    /// Drop what interrupted receives kept for a resume.
    ReceiveAbort,
}

impl Request {
    /// Whether the request works on a descriptor the client sends with it.
    pub fn needs_fd(&self) -> bool {
        matches!(
            self,
            Request::SnapshotSend { .. } | Request::SnapshotReceive { .. }
        )
    }
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
    /// Every snapshot the prune considered, with its verdict.
    Pruned {
        plan: Vec<Decision>,
    },
    Jobs {
        list: Vec<JobInfo>,
    },
    /// The jobs a cancel stopped.
    Cancelled {
        jobs: Vec<JobInfo>,
    },
    Event(Event),
    Events {
        list: Vec<Event>,
    },
    /// First line of the answer to a long request: the job it runs as.
    Job {
        id: String,
    },
    Scrubbed(Box<crate::fs::scrub::ScrubReport>),
    ExportMap {
        map: crate::export::ImageMap,
    },
    Member(crate::fs::members::MemberReport),
    /// An intermediate answer of a long request: `done` of `total` units.
    Progress {
        done: u64,
        total: u64,
    },
    Error {
        message: String,
    },
    Sent(crate::snapshot::send::SendReport),
    /// A receive that failed; `token` resumes it (`send --resume`).
    ReceiveFailed {
        message: String,
        token: Option<String>,
    },
    /// How many things a request removed.
    Removed {
        count: u64,
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

/// [`execute`], reporting the progress of long requests (scrub, member
/// changes, restore, delete, prune, waiting for a capture); the sink's
/// `false` stops them.
pub fn execute_with_progress(vfs: &Vfs, req: &Request, progress: crate::fs::Progress) -> Response {
    execute_io(vfs, req, None, progress)
}

/// [`execute_with_progress`] with the descriptor sent with the request
/// (the stream of a send or a receive).
pub fn execute_io(
    vfs: &Vfs,
    req: &Request,
    fd: Option<std::fs::File>,
    progress: crate::fs::Progress,
) -> Response {
    let err = |name: &str, e: FsError| Response::Error {
        message: snapshot_error(name, &e),
    };
    if req.needs_fd() && fd.is_none() {
        return Response::Error {
            message: "this request needs the stream's descriptor, and none came with it".into(),
        };
    }
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
                if *wait && let Err(e) = vfs.snapshot_wait_with(progress) {
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
            let r = vfs.snapshot_delete_with(name, progress);
            forget_deleted(vfs, before);
            match r {
                Ok(()) => Response::Done,
                Err(e) => err(name, e),
            }
        }
        Request::SnapshotRestore { name, paths } => {
            let paths: Vec<Vec<u8>> = paths.iter().map(|p| p.as_bytes().to_vec()).collect();
            match vfs.snapshot_restore_with(name, &paths, progress) {
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
            let r = vfs.snapshot_prune(policy, *dry_run, progress);
            // Also after a failure: the snapshots deleted before it are gone.
            forget_deleted(vfs, before);
            match r {
                Ok(plan) => Response::Pruned { plan },
                Err(e) => err("prune", e),
            }
        }
        Request::SnapshotHold { name, held } => match vfs.snapshot_hold(name, *held) {
            Ok(()) => Response::Done,
            Err(e) => err(name, e),
        },
        Request::SnapshotExportMap { name, path, base } => {
            match vfs.snapshot_export_map(name, path, base.as_deref()) {
                Ok(src) => Response::ExportMap { map: src.map },
                Err(FsError::Message(message)) => Response::Error { message },
                Err(e) => err(name, e),
            }
        }
        Request::Scrub => Response::Scrubbed(Box::new(vfs.scrub(progress))),
        Request::ScrubStop => {
            let n = vfs.jobs_cancel_kind("scrub");
            if n == 0 {
                return Response::Error {
                    message: "no scrub is running".into(),
                };
            }
            Response::Cancelled { jobs: Vec::new() }
        }
        Request::Jobs => Response::Jobs {
            list: vfs.jobs_list(),
        },
        Request::JobCancel { id } => match vfs.job_cancel(id) {
            Ok(j) => Response::Cancelled { jobs: vec![j] },
            Err(FsError::NotFound) => Response::Error {
                message: format!("no running job {id} (see `vpool jobs`)"),
            },
            Err(e) => Response::Error {
                message: format!("job {id}: {e}"),
            },
        },
        Request::Events { since, .. } => Response::Events {
            list: vfs.pool.info.events_since(*since),
        },
        Request::DeviceAdd { dir } => {
            member_event(vfs, "device_added", dir, vfs.device_add(dir, progress))
        }
        Request::DeviceRemove { dir } => {
            member_event(vfs, "device_removed", dir, vfs.device_remove(dir, progress))
        }
        Request::DeviceReplace { old, new } => member_event(
            vfs,
            "device_replaced",
            new,
            vfs.device_replace(old, new, progress),
        ),
        Request::Rebalance => member(vfs.rebalance(progress)),
        Request::SetCopies { copies } => member(vfs.set_copies(*copies, progress)),
        Request::SnapshotSend { name, base, resume } => {
            let Some(f) = fd else { return Response::Done };
            let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
            let r = vfs.snapshot_send(name, base.as_deref(), resume.as_deref(), &mut out, progress);
            match r.and_then(|r| out.flush().map(|_| r).map_err(FsError::Io)) {
                Ok(r) => Response::Sent(r),
                Err(e) => Response::Error {
                    message: format!("send of {name}: {}", snapshot_error(name, &e)),
                },
            }
        }
        Request::SnapshotReceive { name, total } => {
            let Some(mut f) = fd else {
                return Response::Done;
            };
            let total = *total;
            let mut p = |done: u64, _: u64| progress(done, total.max(done));
            // A stream in a regular file is read again on a retry: no spool.
            let resumable = !f.metadata().map(|m| m.is_file()).unwrap_or(false);
            match vfs.snapshot_receive(&mut f, name.as_deref(), resumable, &mut p) {
                Ok(info) => Response::Snapshot(info),
                Err(e) => Response::ReceiveFailed {
                    message: match e.error {
                        FsError::Message(m) => m,
                        other => format!("receive failed: {other}"),
                    },
                    token: e.token,
                },
            }
        }
        Request::ReceiveAbort => match vfs.receive_abort() {
            Ok(n) => Response::Removed { count: n as u64 },
            Err(e) => Response::Error {
                message: format!("cannot drop the interrupted receives: {e}"),
            },
        },
    }
}

/// [`member`], recording a member change that was done as an event.
fn member_event(
    vfs: &Vfs,
    kind: &str,
    dir: &Path,
    r: FsResult<crate::fs::members::MemberReport>,
) -> Response {
    if let Ok(rep) = &r {
        vfs.pool.emit(
            kind,
            crate::pool::info::Severity::Info,
            Some(dir),
            rep.message.clone(),
        );
    }
    member(r)
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
    shared: Arc<Shared>,
}

struct Shared {
    mountpoint: PathBuf,
    /// Where the daemon logs, for `status`.
    log: Option<String>,
    /// Set at unmount: event followers end.
    stopping: AtomicBool,
    followers: AtomicUsize,
}

impl Server {
    /// Holds the filesystem weakly: the daemon drops its last strong reference at
    /// exit, which closes the metadata stores cleanly.
    pub fn start(mountpoint: &Path, vfs: Weak<Vfs>, log: Option<String>) -> Result<Server> {
        ensure_runtime_dir()?;
        let path = socket_path(mountpoint);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(&path, e))?;
        let shared = Arc::new(Shared {
            mountpoint: mountpoint.to_path_buf(),
            log,
            stopping: AtomicBool::new(false),
            followers: AtomicUsize::new(0),
        });
        let sh = shared.clone();
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
                    if vfs.strong_count() == 0 {
                        break;
                    }
                    let (vfs, sh) = (vfs.clone(), sh.clone());
                    // One thread per connection: a long restore must not hold up status.
                    let _ = std::thread::Builder::new()
                        .name("vpool-control-req".into())
                        .spawn(move || serve_one(conn, &vfs, &sh));
                }
            })
            .map_err(|e| Error::Other(format!("cannot start control thread: {e}")))?;
        Ok(Server { path, shared })
    }

    /// Ends the event followers (they hold the filesystem while they wait)
    /// before the daemon lets the filesystem go.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let t0 = std::time::Instant::now();
        while self.shared.followers.load(Ordering::Acquire) > 0
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One answer line to the client.
fn send_line(conn: &UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    b.push(b'\n');
    let mut w = conn;
    w.write_all(&b)
}

/// The job a long request runs as: (kind, what it works on, unit).
fn job_of(req: &Request) -> Option<(&'static str, String, &'static str)> {
    Some(match req {
        Request::Scrub => ("scrub", "pool".into(), "extents"),
        Request::DeviceAdd { dir } => ("device-add", dir.display().to_string(), "extents"),
        Request::DeviceRemove { dir } => ("device-remove", dir.display().to_string(), "extents"),
        Request::DeviceReplace { old, new } => (
            "device-replace",
            format!("{} -> {}", old.display(), new.display()),
            "extents",
        ),
        Request::Rebalance => ("rebalance", "pool".into(), "extents"),
        Request::SetCopies { copies } => ("set-copies", format!("copies={copies}"), "extents"),
        Request::SnapshotRestore { name, .. } => ("restore", name.clone(), "blocks"),
        Request::SnapshotDelete { name } => ("delete", name.clone(), "files"),
        Request::SnapshotPrune { dry_run: false, .. } => ("prune", "snapshots".into(), "snapshots"),
        Request::SnapshotSend { name, .. } => ("send", name.clone(), "blocks"),
        Request::SnapshotReceive { .. } => ("receive", "stream".into(), "bytes"),
        _ => return None,
    })
}

fn serve_one(conn: UnixStream, vfs: &Weak<Vfs>, sh: &Shared) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (line, fd) = fdpass::read_request(&conn)?;
    conn.set_read_timeout(None)?;
    let req = match serde_json::from_str::<Request>(&line) {
        Ok(r) => r,
        Err(e) => {
            return send_line(
                &conn,
                &Response::Error {
                    message: format!("bad request: {e}"),
                },
            );
        }
    };
    if let Request::Events {
        since,
        follow: true,
    } = req
    {
        sh.followers.fetch_add(1, Ordering::AcqRel);
        let r = follow_events(&conn, vfs, sh, since);
        sh.followers.fetch_sub(1, Ordering::AcqRel);
        return r;
    }
    let Some(vfs) = vfs.upgrade() else {
        return Ok(());
    };
    if matches!(req, Request::Scrub) {
        background_priority();
    }
    let guard = job_of(&req).map(|(kind, what, unit)| {
        vfs.jobs
            .start(kind, &what, unit, vfs.pool.storage().now().0)
    });
    if let Some(g) = &guard {
        let _ = send_line(
            &conn,
            &Response::Job {
                id: g.job.id().to_string(),
            },
        );
    }
    let mut last = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        // A few lines a second; a client gone away does not stop the work.
        if done == 0 || done == total || last.elapsed() >= Duration::from_millis(200) {
            last = std::time::Instant::now();
            let _ = send_line(&conn, &Response::Progress { done, total });
        }
        guard.as_ref().is_none_or(|g| g.job.update(done, total))
    };
    let resp = match execute_io(&vfs, &req, fd, &mut progress) {
        Response::Status(mut st) => {
            st.mounted = true;
            st.mountpoint = Some(sh.mountpoint.clone());
            st.pid = Some(std::process::id());
            st.log = sh.log.clone();
            Response::Status(st)
        }
        // Through the mount, so before answering: the CLI's next look
        // at the files must find them right.
        Response::Restored(r) => {
            for p in crate::fs::kernel_refresh::refresh_restored(&sh.mountpoint, &r.restored) {
                tracing::warn!("{p}");
            }
            Response::Restored(r)
        }
        other => other,
    };
    drop(guard);
    send_line(&conn, &resp)
}

/// Lowers this thread (a scrub's: it reads everything and is never urgent)
/// to idle CPU and I/O priority, so that VMs' I/O goes first. Best effort.
fn background_priority() {
    crate::util::set_thread_nice(19);
    crate::util::idle_io_thread();
}

/// Sends the history from `since`, then each new event, until the client
/// goes or the daemon stops. Holds the filesystem only while looking.
fn follow_events(
    conn: &UnixStream,
    vfs: &Weak<Vfs>,
    sh: &Shared,
    mut since: u64,
) -> std::io::Result<()> {
    while !sh.stopping.load(Ordering::Acquire) {
        let events = match vfs.upgrade() {
            Some(v) => v.pool.info.wait_events(since, Duration::from_millis(250)),
            None => break,
        };
        for e in events {
            since = e.seq + 1;
            send_line(conn, &Response::Event(e))?;
        }
        // A client that went away shows only at a write: probe now and then.
        if peer_gone(conn) {
            break;
        }
    }
    Ok(())
}

/// Whether the client closed its end (a read would return end of file).
fn peer_gone(conn: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLIN) != 0
}

/// The CLI's side: sends one request to the daemon serving `mountpoint`.
pub fn request(mountpoint: &Path, req: &Request) -> Result<Response> {
    request_stream(mountpoint, req, &mut |_| true)
}

/// [`request`], passing every intermediate answer (progress, the job id,
/// followed events) to `each`; `each` returning `false` ends the request
/// (the answer is then [`Response::Done`]).
pub fn request_stream(
    mountpoint: &Path,
    req: &Request,
    each: &mut dyn FnMut(&Response) -> bool,
) -> Result<Response> {
    request_with_fd(mountpoint, req, None, each)
}

/// [`request_stream`], sending descriptor `fd` with the request (the
/// stream a send writes or a receive reads).
pub fn request_with_fd(
    mountpoint: &Path,
    req: &Request,
    fd: Option<std::os::fd::RawFd>,
    each: &mut dyn FnMut(&Response) -> bool,
) -> Result<Response> {
    let path = socket_path(mountpoint);
    // The socket is in the caller's own runtime directory: a pool another
    // user mounted (root's, from fstab) has its socket in theirs.
    let mut s = UnixStream::connect(&path).map_err(|e| {
        Error::Other(format!(
            "cannot reach the daemon serving {} ({}: {e}); only the user who \
             mounted the pool, and root, can administer it",
            mountpoint.display(),
            path.display()
        ))
    })?;
    // Status and sync answer quickly; snapshot work takes as long as the data.
    let timeout = match req {
        Request::Status | Request::Sync => Some(Duration::from_secs(120)),
        _ => None,
    };
    s.set_read_timeout(timeout)
        .map_err(|e| Error::io(&path, e))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| Error::Other(e.to_string()))?;
    msg.push(b'\n');
    match fd {
        Some(fd) => fdpass::send_with_fd(&s, &msg, fd),
        None => s.write_all(&msg),
    }
    .map_err(|e| Error::io(&path, e))?;
    let mut reader = BufReader::new(&s);
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(&path, e))?;
        if n == 0 {
            if matches!(req, Request::Events { follow: true, .. }) {
                return Ok(Response::Done);
            }
            return Err(Error::Other(
                "the daemon closed the connection without an answer".into(),
            ));
        }
        match serde_json::from_str(&line) {
            Ok(r @ (Response::Progress { .. } | Response::Job { .. } | Response::Event(_))) => {
                if !each(&r) {
                    return Ok(Response::Done);
                }
            }
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
