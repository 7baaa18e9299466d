//! Files through real syscalls, for the mounted tests: opening, positioned
//! reads and writes, the `stat` fields the tests compare, extended
//! attributes, and the checks that a call failed with a given errno or that
//! another user was refused.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Output;

use super::{cstr, cvt, describe, errno, text};

/// Creates `p` (it must not exist) for reading and writing.
pub fn open_rw_new(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p)
        .unwrap_or_else(|e| panic!("create {p:?}: {e}"))
}

/// Opens existing `p` for reading and writing.
pub fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open rw {p:?}: {e}"))
}

/// Exactly `len` bytes at `off`.
pub fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read_exact_at({off}, {len}): {e}"));
    buf
}

pub fn write_at(f: &File, off: u64, data: &[u8]) {
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write_all_at({off}, {}): {e}", data.len()));
}

/// Asserts that `r` failed with errno `want`.
#[track_caller]
pub fn expect_errno<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {want}, got success ({v:?})"),
        Err(e) => assert_eq!(
            errno(&e),
            want,
            "{what}: expected errno {want} ({}), got {e}",
            io::Error::from_raw_os_error(want)
        ),
    }
}

/// `stat(p)` (following symlinks).
#[track_caller]
pub fn stat_of(p: &Path) -> fs::Metadata {
    fs::metadata(p).unwrap_or_else(|e| panic!("stat {p:?}: {e}"))
}

/// Permission bits of `p` (`st_mode & 07777`).
#[track_caller]
pub fn mode_of(p: &Path) -> u32 {
    stat_of(p).mode() & 0o7777
}

/// `(st_uid, st_gid)` of `p`.
#[track_caller]
pub fn owner_of(p: &Path) -> (u32, u32) {
    let md = stat_of(p);
    (md.uid(), md.gid())
}

#[track_caller]
pub fn nlink_of(p: &Path) -> u64 {
    stat_of(p).nlink()
}

#[track_caller]
pub fn ino_of(p: &Path) -> u64 {
    stat_of(p).ino()
}

/// `(seconds, nanoseconds)` of `p`'s atime.
#[track_caller]
pub fn atime_of(p: &Path) -> (i64, i64) {
    let md = stat_of(p);
    (md.atime(), md.atime_nsec())
}

/// `(seconds, nanoseconds)` of `p`'s mtime.
#[track_caller]
pub fn mtime_of(p: &Path) -> (i64, i64) {
    let md = stat_of(p);
    (md.mtime(), md.mtime_nsec())
}

/// Asserts that a command run as another user succeeded.
#[track_caller]
pub fn assert_success(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}\n{}", describe(o));
}

/// Asserts that a command run as another user failed; `what` says what
/// must not have happened.
#[track_caller]
pub fn assert_failure(o: &Output, what: &str) {
    assert!(!o.status.success(), "{what}\n{}", describe(o));
}

/// Asserts that a command run as another user failed with EACCES
/// ("Permission denied"); `what` says what must not have happened.
#[track_caller]
pub fn assert_permission_denied(o: &Output, what: &str) {
    assert_failure(o, what);
    assert!(
        text(o).contains("Permission denied"),
        "expected EACCES\n{}",
        describe(o)
    );
}

/// A shared mapping of the first `len` bytes of `f` (`prot`: `PROT_*`);
/// `what` names it in the failure message.
#[track_caller]
pub fn mmap_shared(f: &File, len: usize, prot: libc::c_int, what: &str) -> *mut libc::c_void {
    // SAFETY: a fresh mapping chosen by the kernel (no address given) of an
    // open descriptor; the caller uses it only within `len` bytes and unmaps it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        addr,
        libc::MAP_FAILED,
        "{what}: {}",
        io::Error::last_os_error()
    );
    addr
}

// --- extended attributes ----------------------------------------------------

pub fn setxattr(p: &Path, name: &str, val: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of val.len() bytes.
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    })
    .map(|_| ())
}

/// getxattr(2) into `buf` (a size query when it is empty).
pub fn getxattr_into(p: &Path, name: &str, buf: &mut [u8]) -> io::Result<usize> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings; buf is writable for buf.len() bytes (null when empty).
    let r = unsafe {
        let ptr = if buf.is_empty() {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr().cast()
        };
        libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, buf.len())
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The whole value of xattr `name`.
pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let size = getxattr_into(p, name, &mut [])?;
    let mut buf = vec![0u8; size];
    let got = getxattr_into(p, name, &mut buf)?;
    buf.truncate(got);
    Ok(buf)
}

/// The names listxattr(2) gives.
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let c = cstr(p);
    // SAFETY: size query with a null buffer.
    let size = unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf is writable for its length.
    let got = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

/// chmod(2), which must succeed.
#[track_caller]
pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {p:?}: {e}"));
}

/// `st_size` of `p`.
#[track_caller]
pub fn len_of(p: &Path) -> u64 {
    stat_of(p).len()
}

/// The names readdir lists in `dir` (without `.` and `..`), sorted.
#[track_caller]
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Asserts that every byte of `b` is zero (`what`: which bytes).
#[track_caller]
pub fn assert_zeros(b: &[u8], what: &str) {
    if let Some(i) = b.iter().position(|&x| x != 0) {
        panic!(
            "{what}: not zero (first non-zero at offset {i} of {}: {:#04x})",
            b.len(),
            b[i]
        );
    }
}

/// chown(2), which must succeed (`None`: that id unchanged).
#[track_caller]
pub fn chown(p: &Path, uid: Option<u32>, gid: Option<u32>) {
    std::os::unix::fs::chown(p, uid, gid)
        .unwrap_or_else(|e| panic!("chown {uid:?}:{gid:?} {p:?}: {e}"));
}
