//! After a restore, the kernel's view of the restored files is brought up to
//! date through the mount, from inside the daemon.
//!
//! With the kernel's writeback cache (the default mount), the kernel keeps its
//! own size and mtime of a regular file and ignores the daemon's values even
//! after the daemon invalidates the inode: a file rolled back to a smaller size
//! would still read past its end. Setting them again through the mount updates
//! the kernel's copy; the daemon already holds these values, so no data moves.
//!
//! This runs as the daemon's user (usually root) on paths that users control,
//! so it never follows a path blindly: each file is opened with `openat2`
//! beneath the mount root with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV` as `O_PATH`, must be a regular
//! file with the inode number the restore wrote, and only then is reopened
//! for writing through its own descriptor. A component swapped for a symlink,
//! or a file renamed into place meanwhile, is skipped and reported.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;

use crate::pool::meta::Timestamp;

/// A file the restore rewrote: its pool-relative path, inode, size and mtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub path: Vec<u8>,
    pub ino: u64,
    pub size: u64,
    pub mtime: Timestamp,
}

/// Opens `rel` beneath the directory `root` without following any symlink
/// and without leaving its filesystem, as an `O_PATH` descriptor.
fn open_beneath(root: &File, rel: &[u8]) -> io::Result<File> {
    let c = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain old data; all zeros is its empty value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    // SAFETY: openat2 reads the NUL-terminated path and the open_how of the
    // size we pass; both outlive the call. It returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor we own, just returned by openat2.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Sets the kernel's size and mtime of one restored file.
fn refresh_one(root: &File, r: &Restored) -> io::Result<()> {
    let rel: &[u8] = r.path.strip_prefix(b"/").unwrap_or(&r.path);
    let p = open_beneath(root, rel)?;
    let md = p.metadata()?;
    if !md.file_type().is_file() || md.ino() != r.ino {
        return Err(io::Error::other(format!(
            "no longer the restored file (inode {}, found inode {})",
            r.ino,
            md.ino()
        )));
    }
    // Reopened through the O_PATH descriptor: the same inode, whatever the path
    // names now. O_NONBLOCK: never wait on anything (it is a regular file).
    let w = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", p.as_raw_fd()))?;
    if w.metadata()?.ino() != r.ino {
        return Err(io::Error::other("reopened another file"));
    }
    w.set_len(r.size)?;
    // After the truncate: through the kernel it sets the mtime to now.
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: r.mtime.secs as libc::time_t,
            tv_nsec: r.mtime.nanos as libc::c_long,
        },
    ];
    // SAFETY: a valid descriptor and a two-element timespec array.
    if unsafe { libc::futimens(w.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Refreshes the kernel's view of every restored file under `mountpoint`;
/// returns one message per file that could not be refreshed (the restore
/// itself is done: they show right once the pool is remounted).
pub fn refresh_restored(mountpoint: &Path, files: &[Restored]) -> Vec<String> {
    if files.is_empty() {
        return Vec::new();
    }
    let root = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(mountpoint)
    {
        Ok(f) => f,
        Err(e) => return vec![format!("{}: {e}", mountpoint.display())],
    };
    let mut problems = Vec::new();
    for r in files {
        if let Err(e) = refresh_one(&root, r) {
            problems.push(format!(
                "{}: kernel's size and mtime not updated ({e}); they show once the pool is remounted",
                mountpoint
                    .join(std::ffi::OsStr::from_bytes(
                        r.path.strip_prefix(b"/").unwrap_or(&r.path)
                    ))
                    .display()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_follows_a_symlink_or_leaves_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root_dir = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root_dir.join("d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f"), b"outside!").unwrap();
        std::fs::write(root_dir.join("d/f"), b"inside").unwrap();
        std::os::unix::fs::symlink(&outside, root_dir.join("link")).unwrap();
        std::os::unix::fs::symlink("../outside", root_dir.join("rel")).unwrap();
        let root = File::open(&root_dir).unwrap();
        assert!(open_beneath(&root, b"d/f").is_ok());
        for bad in [&b"link/f"[..], b"rel/f", b"../outside/f", b"/etc/passwd"] {
            assert!(
                open_beneath(&root, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A restored file named by a path that now leads elsewhere is left alone.
        let ino = std::fs::metadata(outside.join("f")).unwrap().ino();
        let r = Restored {
            path: b"link/f".to_vec(),
            ino,
            size: 0,
            mtime: Timestamp::default(),
        };
        assert!(!refresh_restored(&root_dir, &[r]).is_empty());
        assert_eq!(std::fs::read(outside.join("f")).unwrap(), b"outside!");
        // The right inode under the right path is refreshed.
        let ino = std::fs::metadata(root_dir.join("d/f")).unwrap().ino();
        let r = Restored {
            path: b"d/f".to_vec(),
            ino,
            size: 2,
            mtime: Timestamp {
                secs: 1_000_000,
                nanos: 5,
            },
        };
        assert!(refresh_restored(&root_dir, std::slice::from_ref(&r)).is_empty());
        assert_eq!(std::fs::read(root_dir.join("d/f")).unwrap(), b"in");
        assert_eq!(
            std::fs::metadata(root_dir.join("d/f")).unwrap().mtime(),
            1_000_000
        );
        // Another file renamed into its place is not touched.
        std::fs::write(root_dir.join("d/g"), b"other file").unwrap();
        std::fs::rename(root_dir.join("d/g"), root_dir.join("d/f")).unwrap();
        let problems = refresh_restored(&root_dir, &[Restored { size: 0, ..r }]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(std::fs::read(root_dir.join("d/f")).unwrap(), b"other file");
    }
}
