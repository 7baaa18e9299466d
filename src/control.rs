//! The admin socket between the CLI and a mounted daemon: one JSON request per
//! connection, one JSON response. The socket lives in a directory only its owner
//! can enter (mode 0700) and the daemon also checks the peer's uid (SO_PEERCRED),
//! so only the daemon's owner and root can talk to it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fs::Vfs;
use crate::pool::PoolStatus;

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Commit everything durably (before an unmount, or on demand).
    Sync,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<PoolStatus>),
    Done,
    Error { message: String },
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
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(&d, e))?;
    Ok(d)
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
                    let _ = serve_one(conn, &vfs, &mp);
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
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => {
            let mut st = vfs.status();
            st.mounted = true;
            st.mountpoint = Some(mp.to_path_buf());
            st.pid = Some(std::process::id());
            Response::Status(Box::new(st))
        }
        Ok(Request::Sync) => match vfs.commit() {
            Ok(()) => Response::Done,
            Err(e) => Response::Error {
                message: format!("commit failed: {e}"),
            },
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
    let path = socket_path(mountpoint);
    let mut s = UnixStream::connect(&path).map_err(|e| Error::io(&path, e))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| Error::io(&path, e))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| Error::Other(e.to_string()))?;
    msg.push(b'\n');
    s.write_all(&msg).map_err(|e| Error::io(&path, e))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&line).map_err(|e| Error::Other(format!("bad answer from daemon: {e}")))
}
