//! The storage seam: everything vpool does to a member directory goes
//! through [`Storage`] and the [`FileIo`] handles it opens.
//!
//! Backends:
//! - [`real::RealStorage`]: the host filesystem (what the daemon uses);
//! - [`sim::SimStorage`]: an in-memory filesystem for the deterministic
//!   simulation, which keeps what was written but not yet synced apart and
//!   at a power cut drops or tears it at sector granularity, directory
//!   entries that were not fsynced included; it can also inject EIO, ENOSPC
//!   and short writes at a chosen operation or on a chosen file;
//! - [`faulty::FaultyStorage`]: the real backend with injected errors, for
//!   mounted tests (only with the `fault-injection` feature).
//!
//! Beside them, [`drain::Drain`] waits for the writeback of streamed writes
//! off the request path and drops their pages.
//!
//! Contract every backend keeps (and the core relies on): `sync_data`/
//! `sync_all` make a file's data and size durable; [`Storage::sync_dir`]
//! makes the entries created, renamed or removed in a directory durable;
//! nothing else is durable. New files and directories are private
//! ([`crate::util::PRIVATE_FILE_MODE`], [`crate::util::PRIVATE_DIR_MODE`]).

pub mod drain;
pub mod faulty;
pub mod real;
pub mod redb_backend;
pub mod sim;

use std::ffi::OsString;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open member file.
pub type Handle = Arc<dyn FileIo>;

/// How a file is opened. Files created are private.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    pub write: bool,
    pub create: bool,
    /// Fail with `AlreadyExists` if the file exists.
    pub create_new: bool,
    pub truncate: bool,
}

impl OpenMode {
    pub const READ: OpenMode = OpenMode {
        write: false,
        create: false,
        create_new: false,
        truncate: false,
    };
    pub const WRITE: OpenMode = OpenMode {
        write: true,
        create: false,
        create_new: false,
        truncate: false,
    };
    /// Read-write, created if missing, kept if present.
    pub const CREATE: OpenMode = OpenMode {
        write: true,
        create: true,
        create_new: false,
        truncate: false,
    };
    /// Read-write, created if missing, emptied if present.
    pub const REPLACE: OpenMode = OpenMode {
        write: true,
        create: true,
        create_new: false,
        truncate: true,
    };
    /// Read-write, emptied; must exist.
    pub const EMPTY: OpenMode = OpenMode {
        write: true,
        create: false,
        create_new: false,
        truncate: true,
    };
    /// Read-write, must not exist.
    pub const NEW: OpenMode = OpenMode {
        write: true,
        create: true,
        create_new: true,
        truncate: false,
    };
}

/// What [`Storage::stat`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    pub is_dir: bool,
    pub is_file: bool,
    pub len: u64,
    /// Allocated bytes.
    pub allocated: u64,
    pub mode: u32,
    pub dev: u64,
    pub ino: u64,
}

/// Space of the filesystem holding a path (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    /// Free, the root reserve included.
    pub free: u64,
    /// Available to unprivileged writers.
    pub avail: u64,
    /// Size of the filesystem's allocation unit.
    pub block: u64,
}

/// `fallocate` modes the core uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alloc {
    /// Allocate without changing the size (`FALLOC_FL_KEEP_SIZE`).
    KeepSize,
    /// Deallocate; reads return zeros (`PUNCH_HOLE | KEEP_SIZE`).
    Punch,
    /// Zeros, allocated, size kept (`ZERO_RANGE | KEEP_SIZE`).
    ZeroRange,
}

/// Alignment of the offsets, lengths and buffer addresses of
/// [`FileIo::read_direct_at`] and [`FileIo::write_direct_at`]: the largest
/// logical block size of the disks members sit on.
pub const DIRECT_ALIGN: usize = 4096;

/// An open file of a member.
pub trait FileIo: Send + Sync + Debug {
    /// Reads at `off`; fewer bytes only at the end of the file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize>;
    /// Makes the data and size durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the data and all metadata of the file durable.
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Allocated bytes.
    fn allocated(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn allocate(&self, mode: Alloc, off: u64, len: u64) -> io::Result<()>;
    /// `SEEK_DATA` (`data`) or `SEEK_HOLE` from `off`; `None` past the end
    /// (ENXIO).
    fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>>;
    /// Allocated ranges `(start, end)` within `[lo, hi)`, unwritten
    /// (preallocated) ranges included, merged and in order (FIEMAP); `None`
    /// when the filesystem cannot tell (tmpfs).
    fn allocated_ranges(&self, lo: u64, hi: u64) -> io::Result<Option<Vec<(u64, u64)>>>;

    /// `SEEK_DATA` from `off` (see [`FileIo::seek`]).
    fn seek_data(&self, off: u64) -> io::Result<Option<u64>> {
        self.seek(off, true)
    }

    /// `SEEK_HOLE` from `off` (see [`FileIo::seek`]).
    fn seek_hole(&self, off: u64) -> io::Result<Option<u64>> {
        self.seek(off, false)
    }

    /// A hint that `[off, off+len)` will be read soon (readahead).
    fn will_need(&self, _off: u64, _len: u64) {}

    /// Write-behind for a file written sequentially: starts the writeback of
    /// `[off, off+len)` (`wait`: also waits for it and drops those pages from
    /// the cache). Bounds the dirty pages a long writer leaves, which
    /// otherwise throttle every other writer of the host and end in one long
    /// flush. Only a hint: it makes nothing durable (that is
    /// [`FileIo::sync_data`]'s job) and its errors are left to that sync.
    fn write_behind(&self, _off: u64, _len: u64, _wait: bool) {}

    /// [`FileIo::read_at`] past the host's page cache (`O_DIRECT`) where
    /// the storage can; `buf`'s address and length and `off` are multiples
    /// of [`DIRECT_ALIGN`]. Storage without it (or a filesystem that
    /// refuses `O_DIRECT`) reads through the cache: the bytes are the same.
    fn read_direct_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.read_at(buf, off)
    }

    /// [`FileIo::write_at`] past the host's page cache, as
    /// [`FileIo::read_direct_at`]. Durability is unchanged: the data is
    /// durable after [`FileIo::sync_data`], as with a cached write.
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.write_at(buf, off)
    }

    /// [`FileIo::write_all_at`] through [`FileIo::write_direct_at`].
    fn write_direct_all_at(&self, mut buf: &[u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_direct_at(buf, off) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ));
                }
                // A short direct write ends on an aligned boundary (the
                // device took whole sectors), so the rest stays aligned;
                // else the rest goes through the cache.
                Ok(n) if n % DIRECT_ALIGN != 0 => {
                    return self.write_all_at(&buf[n..], off + n as u64);
                }
                Ok(n) => {
                    buf = &buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_exact_at(&self, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, off) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ));
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all_at(&self, mut buf: &[u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, off) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ));
                }
                Ok(n) => {
                    buf = &buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The first `len` bytes (fewer if the file is shorter).
    fn read_prefix(&self, len: u64) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; usize::try_from(len).map_err(|_| io::ErrorKind::OutOfMemory)?];
        let mut got = 0;
        while got < v.len() {
            match self.read_at(&mut v[got..], got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        v.truncate(got);
        Ok(v)
    }

    /// The whole file.
    fn read_all(&self) -> io::Result<Vec<u8>> {
        self.read_prefix(self.len()?)
    }
}

/// A held exclusive lock (released on drop).
pub trait LockGuard: Send + Sync + Debug {}

/// Everything vpool does to member directories.
pub trait Storage: Send + Sync + Debug {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Handle>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates one private directory (the parent must exist).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries created, renamed or removed in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Names in `dir` (without `.` and `..`).
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    /// Follows symlinks.
    fn stat(&self, path: &Path) -> io::Result<Stat>;
    fn space(&self, path: &Path) -> io::Result<Space>;
    /// An absolute path without symlinks, `.` or `..`.
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;
    /// Takes group and other permissions off `dir`.
    fn make_private(&self, dir: &Path) -> io::Result<()>;
    /// Whether `dir` is on a FUSE filesystem (never a valid member).
    fn on_fuse(&self, dir: &Path) -> io::Result<bool>;
    /// Takes the exclusive lock of the file `path` (created if missing) without
    /// waiting: `Ok(None)` when someone else holds it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>>;
    /// Whether the core may run member I/O from several threads at once. The
    /// simulator says no: one order of operations per seed.
    fn concurrent(&self) -> bool {
        true
    }

    /// Milliseconds on a monotonic clock, for the core's timing decisions
    /// (cached free space, recently changed extents). The simulator's clock
    /// is its count of operations, so that timing cannot change a seed's run.
    fn clock_ms(&self) -> u64 {
        monotonic_ms()
    }

    /// Seconds and nanoseconds since the epoch, for timestamps that go into
    /// metadata (virtual in the simulator, for the same reason).
    fn now(&self) -> (i64, u32) {
        crate::util::now()
    }

    fn exists(&self, path: &Path) -> bool {
        self.stat(path).is_ok()
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.stat(path).map(|s| s.is_dir).unwrap_or(false)
    }

    /// The whole content of the file `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.open(path, OpenMode::READ)?.read_all()
    }
}

/// Creates `dir` and its missing parents, private and durably: the parent
/// of every directory created is fsynced, so a file later made durable in
/// `dir` cannot vanish with its directory at a power cut.
pub fn create_dir_all(s: &dyn Storage, dir: &Path) -> io::Result<()> {
    if s.is_dir(dir) {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_all(s, parent)?;
    }
    match s.create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && s.is_dir(dir) => Ok(()),
        Err(e) => Err(e),
        Ok(()) => match parent {
            Some(p) => s.sync_dir(p),
            None => Ok(()),
        },
    }
}

/// Removes `dir` and everything below it.
pub fn remove_dir_all(s: &dyn Storage, dir: &Path) -> io::Result<()> {
    for name in s.list(dir)? {
        let p = dir.join(name);
        match s.stat(&p) {
            Ok(st) if st.is_dir => remove_dir_all(s, &p)?,
            _ => match s.remove_file(&p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r?,
            },
        }
    }
    s.remove_dir(dir)
}

/// The directory of `path` and the temporary name beside it that
/// [`write_file_atomic`] and [`copy_file_atomic`] write first.
fn tmp_beside(path: &Path) -> io::Result<(&Path, PathBuf)> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok((dir, dir.join(format!(".{}.tmp", name.to_string_lossy()))))
}

/// Replaces `path` with `data` durably: write a temporary file, fsync it,
/// rename it over `path`, fsync the directory. A crash leaves either the old
/// or the new file.
pub fn write_file_atomic(s: &dyn Storage, path: &Path, data: &[u8]) -> io::Result<()> {
    let (dir, tmp) = tmp_beside(path)?;
    {
        let f = s.open(&tmp, OpenMode::REPLACE)?;
        f.write_all_at(data, 0)?;
        f.sync_all()?;
    }
    s.rename(&tmp, path)?;
    s.sync_dir(dir)
}

/// Replaces (or creates) `dst` with a copy of `src` durably, the same way as
/// [`write_file_atomic`], a piece at a time.
pub fn copy_file_atomic(s: &dyn Storage, src: &Path, dst: &Path) -> io::Result<()> {
    const PIECE: usize = 1 << 20;
    let (dir, tmp) = tmp_beside(dst)?;
    {
        let from = s.open(src, OpenMode::READ)?;
        let to = s.open(&tmp, OpenMode::REPLACE)?;
        let mut buf = vec![0u8; PIECE];
        let mut off = 0u64;
        loop {
            let n = from.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            to.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        to.sync_all()?;
    }
    s.rename(&tmp, dst)?;
    s.sync_dir(dir)
}

/// Milliseconds on a monotonic clock local to this process.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The host filesystem, shared.
pub fn real() -> Arc<dyn Storage> {
    Arc::new(real::RealStorage)
}

/// An `io::Error` for an errno.
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_writes_and_copies_are_private() {
        let s = real::RealStorage;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_file_atomic(&s, &p, b"one").unwrap();
        write_file_atomic(&s, &p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p), 0o600);
        let src = d.path().join("src");
        fs::write(&src, b"data").unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
        // A temporary file left with another mode is made private again.
        let tmp = d.path().join(".dst.tmp");
        fs::write(&tmp, b"old").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        let dst = d.path().join("dst");
        copy_file_atomic(&s, &src, &dst).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"data");
        assert_eq!(mode(&dst), 0o600);
        let sub = d.path().join("a/b");
        create_dir_all(&s, &sub).unwrap();
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&d.path().join("a")), 0o700);
        remove_dir_all(&s, &d.path().join("a")).unwrap();
        assert!(!s.exists(&d.path().join("a")));
    }

    /// The simulated and the real backend agree on the same operations.
    #[test]
    fn sim_and_real_agree() {
        let d = tempfile::tempdir().unwrap();
        let sim = sim::SimStorage::new(1);
        let sroot = sim.add_device("r", None);
        let backends: [(&dyn Storage, PathBuf); 2] =
            [(&real::RealStorage, d.path().to_path_buf()), (&sim, sroot)];
        let mut seen = Vec::new();
        for (s, root) in backends {
            let p = root.join("f");
            let f = s.open(&p, OpenMode::NEW).unwrap();
            assert!(s.open(&p, OpenMode::NEW).is_err());
            f.write_all_at(&[7u8; 5000], 10_000).unwrap();
            f.allocate(Alloc::Punch, 12_288, 4096).unwrap();
            f.set_len(14_000).unwrap();
            let mut buf = vec![0u8; 20_000];
            let n = f.read_at(&mut buf, 0).unwrap();
            let data_at = f.seek(0, true).unwrap();
            s.rename(&p, &root.join("g")).unwrap();
            let names = s.list(&root).unwrap();
            seen.push((n, buf, data_at, names, f.len().unwrap()));
        }
        assert_eq!(seen[0], seen[1]);
    }
}
