//! The real backend: the host filesystem through `std::fs` and `libc`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Alloc, FileIo, Handle, LockGuard, OpenMode, Space, Stat, Storage};
use crate::util::{PRIVATE_DIR_MODE, PRIVATE_FILE_MODE};

/// The host filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

/// An open host file, and (opened on first use) a second descriptor of it
/// with `O_DIRECT` for I/O past the page cache: `None` when the filesystem
/// refuses `O_DIRECT` (then that I/O goes through the cache).
#[derive(Debug)]
pub struct RealFile(pub File, std::sync::OnceLock<Option<File>>);

impl RealFile {
    pub fn new(f: File) -> RealFile {
        RealFile(f, std::sync::OnceLock::new())
    }

    /// The `O_DIRECT` descriptor: the same file reopened through
    /// `/proc/self/fd` (its own open file description, same access mode).
    fn direct(&self) -> Option<&File> {
        self.1
            .get_or_init(|| {
                let fd = self.0.as_raw_fd();
                // SAFETY: F_GETFL on a descriptor we own; no pointer passed.
                let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                if fl < 0 {
                    return None;
                }
                let write = fl & libc::O_ACCMODE != libc::O_RDONLY;
                let r = OpenOptions::new()
                    .read(true)
                    .write(write)
                    .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                    .open(format!("/proc/self/fd/{fd}"));
                match r {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::debug!(error = %e, "no O_DIRECT for a member file: cached I/O");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// Whether `buf` and `off` suit `O_DIRECT` (see [`super::DIRECT_ALIGN`]).
fn direct_aligned(buf: &[u8], off: u64) -> bool {
    let a = super::DIRECT_ALIGN;
    (buf.as_ptr() as usize).is_multiple_of(a)
        && buf.len().is_multiple_of(a)
        && off.is_multiple_of(a as u64)
}

fn cstr(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn stat_of(md: &fs::Metadata) -> Stat {
    Stat {
        is_dir: md.is_dir(),
        is_file: md.is_file(),
        len: md.len(),
        allocated: md.blocks() * 512,
        mode: md.mode(),
        dev: md.dev(),
        ino: md.ino(),
    }
}

impl FileIo for RealFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.0.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.0.write_at(buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn allocated(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.blocks() * 512)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn allocate(&self, mode: Alloc, off: u64, len: u64) -> io::Result<()> {
        let m = match mode {
            Alloc::KeepSize => libc::FALLOC_FL_KEEP_SIZE,
            Alloc::Punch => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Alloc::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        // SAFETY: fallocate on a valid descriptor with plain integer arguments.
        let rc = unsafe { libc::fallocate(self.0.as_raw_fd(), m, off as i64, len as i64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        let whence = if data {
            libc::SEEK_DATA
        } else {
            libc::SEEK_HOLE
        };
        // SAFETY: lseek on a valid descriptor; moves only that descriptor's
        // offset, which vpool never uses (all I/O is positional).
        let r = unsafe { libc::lseek(self.0.as_raw_fd(), off as i64, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn allocated_ranges(&self, lo: u64, hi: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        fiemap_ranges(&self.0, lo, hi)
    }

    fn read_direct_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        match self.direct() {
            Some(d) if direct_aligned(buf, off) => match d.read_at(buf, off) {
                // A filesystem may refuse an alignment it does not take.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.0.read_at(buf, off),
                r => r,
            },
            _ => self.0.read_at(buf, off),
        }
    }

    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        match self.direct() {
            Some(d) if direct_aligned(buf, off) => match d.write_at(buf, off) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.0.write_at(buf, off),
                r => r,
            },
            _ => self.0.write_at(buf, off),
        }
    }

    fn will_need(&self, off: u64, len: u64) {
        fadvise(&self.0, off, len, libc::POSIX_FADV_WILLNEED);
    }

    fn write_behind(&self, off: u64, len: u64, wait: bool) {
        let fd = self.0.as_raw_fd();
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        // SAFETY: sync_file_range on a valid descriptor with plain
        // integers; it starts or waits for writeback, never changes the
        // file's content.
        unsafe {
            libc::sync_file_range(fd, off as i64, len as i64, flags);
        }
        if wait {
            fadvise(&self.0, off, len, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// `posix_fadvise(advice)` on `[off, off+len)` of `f`; only a hint.
fn fadvise(f: &File, off: u64, len: u64, advice: libc::c_int) {
    // SAFETY: posix_fadvise on a valid descriptor with plain integers; it
    // only affects the page cache (reads ahead, or drops clean pages).
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), off as i64, len as i64, advice);
    }
}

/// `FS_IOC_FIEMAP` (`_IOWR('f', 11, struct fiemap)`).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents asked for per FIEMAP call.
const FIEMAP_BATCH: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// The allocated ranges of `f` within `[lo, hi)`, written or not (FIEMAP sees
/// preallocated, unwritten extents, which SEEK_DATA reports as holes), merged
/// and clipped. `None` when the filesystem has no FIEMAP (tmpfs).
fn fiemap_ranges(f: &File, lo: u64, hi: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = lo;
    while pos < hi {
        let mut fm = Fiemap {
            start: pos,
            length: hi - pos,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); FIEMAP_BATCH],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
        // `extent_count` entries into `extents`, all inside `fm`, which lives
        // across the call.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, &mut fm as *mut Fiemap) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                    if out.is_empty() && pos == lo =>
                {
                    Ok(None)
                }
                _ => Err(e),
            };
        }
        let n = (fm.mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &fm.extents[..n] {
            let (s, t) = (e.logical.max(lo), (e.logical + e.length).min(hi));
            if s < t {
                match out.last_mut() {
                    Some((_, end)) if *end >= s => *end = (*end).max(t),
                    _ => out.push((s, t)),
                }
            }
            pos = pos.max(e.logical + e.length);
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    Ok(Some(out))
}

/// An flock held on a host file.
#[derive(Debug)]
struct Flock(#[allow(dead_code)] File);

impl LockGuard for Flock {}

impl Storage for RealStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Handle> {
        let f = OpenOptions::new()
            .read(true)
            .write(mode.write)
            .create(mode.create && !mode.create_new)
            .create_new(mode.create_new)
            .truncate(mode.truncate)
            .mode(PRIVATE_FILE_MODE)
            .open(path)?;
        if mode.truncate {
            // A file left by an earlier run may have another mode.
            let m = f.metadata()?.mode();
            if m & 0o077 != 0 {
                f.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
            }
        }
        Ok(Arc::new(RealFile::new(f)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn stat(&self, path: &Path) -> io::Result<Stat> {
        Ok(stat_of(&fs::metadata(path)?))
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        let c = cstr(path)?;
        // SAFETY: statvfs is plain old data; zeroed is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let frsize = st.f_frsize as u64;
        Ok(Space {
            total: st.f_blocks as u64 * frsize,
            free: st.f_bfree as u64 * frsize,
            avail: st.f_bavail as u64 * frsize,
            block: st.f_bsize as u64,
        })
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        fs::canonicalize(path)
    }

    fn make_private(&self, dir: &Path) -> io::Result<()> {
        crate::util::make_private(dir)
    }

    fn on_fuse(&self, dir: &Path) -> io::Result<bool> {
        crate::util::on_fuse(dir)
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_FILE_MODE)
            .open(path)?;
        // SAFETY: flock on a valid open descriptor; no memory is touched.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(Box::new(Flock(f))))
    }
}
