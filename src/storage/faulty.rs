//! The real backend with injected I/O errors, for mounted fault tests.
//!
//! The daemon uses it only when built with the `fault-injection` feature
//! (the test suite's build, never a release one) and started with
//! `VPOOL_FAULT_PATH` (a substring of member paths) and `VPOOL_FAULT_TRIGGER`
//! (a file): while the trigger file exists, every operation on a matching
//! path fails with EIO, as a dying disk's would. With `VPOOL_FAULT_SLOW_MS`
//! set, matching operations are slowed by that many milliseconds instead of
//! failing (a disk that is merely slow: long jobs last long enough to be
//! watched and cancelled).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::real::RealStorage;
use super::{Alloc, FileIo, Handle, LockGuard, OpenMode, Space, Stat, Storage, errno};

#[derive(Debug, Clone)]
pub struct FaultyStorage {
    inner: RealStorage,
    rule: Arc<Rule>,
}

#[derive(Debug)]
struct Rule {
    path: String,
    trigger: PathBuf,
    /// Slow down instead of failing.
    slow: Option<std::time::Duration>,
}

impl Rule {
    fn check(&self, p: &Path) -> io::Result<()> {
        if p.to_string_lossy().contains(&self.path) && self.trigger.exists() {
            if let Some(d) = self.slow {
                std::thread::sleep(d);
                return Ok(());
            }
            return Err(errno(libc::EIO));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Handle,
    path: PathBuf,
    rule: Arc<Rule>,
}

impl FaultyStorage {
    pub fn new(path: String, trigger: PathBuf) -> FaultyStorage {
        FaultyStorage {
            inner: RealStorage,
            rule: Arc::new(Rule {
                path,
                trigger,
                slow: None,
            }),
        }
    }

    /// The backend the environment asks for (see the module comment), if any.
    pub fn from_env() -> Option<FaultyStorage> {
        let path = std::env::var("VPOOL_FAULT_PATH").ok()?;
        let trigger = std::env::var_os("VPOOL_FAULT_TRIGGER")?;
        let mut f = FaultyStorage::new(path, PathBuf::from(trigger));
        if let Some(ms) = std::env::var("VPOOL_FAULT_SLOW_MS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            f.rule = Arc::new(Rule {
                path: f.rule.path.clone(),
                trigger: f.rule.trigger.clone(),
                slow: Some(std::time::Duration::from_millis(ms)),
            });
        }
        Some(f)
    }
}

impl FaultyFile {
    fn check(&self) -> io::Result<()> {
        self.rule.check(&self.path)
    }
}

impl FileIo for FaultyFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.check()?;
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.check()?;
        self.inner.write_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.check()?;
        self.inner.sync_all()
    }
    fn len(&self) -> io::Result<u64> {
        self.check()?;
        self.inner.len()
    }
    fn allocated(&self) -> io::Result<u64> {
        self.check()?;
        self.inner.allocated()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn allocate(&self, mode: Alloc, off: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.allocate(mode, off, len)
    }
    fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        self.check()?;
        self.inner.seek(off, data)
    }
    fn allocated_ranges(&self, lo: u64, hi: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.check()?;
        self.inner.allocated_ranges(lo, hi)
    }
    fn will_need(&self, off: u64, len: u64) {
        self.inner.will_need(off, len)
    }
    fn write_behind(&self, off: u64, len: u64, wait: bool) {
        self.inner.write_behind(off, len, wait)
    }
}

impl Storage for FaultyStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Handle> {
        self.rule.check(path)?;
        Ok(Arc::new(FaultyFile {
            inner: self.inner.open(path, mode)?,
            path: path.to_path_buf(),
            rule: self.rule.clone(),
        }))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.rule.check(path)?;
        self.inner.remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.rule.check(path)?;
        self.inner.remove_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.rule.check(from)?;
        self.inner.rename(from, to)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.rule.check(path)?;
        self.inner.create_dir(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.rule.check(dir)?;
        self.inner.sync_dir(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        self.rule.check(dir)?;
        self.inner.list(dir)
    }
    fn stat(&self, path: &Path) -> io::Result<Stat> {
        self.rule.check(path)?;
        self.inner.stat(path)
    }
    fn space(&self, path: &Path) -> io::Result<Space> {
        self.rule.check(path)?;
        self.inner.space(path)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.canonicalize(path)
    }
    fn make_private(&self, dir: &Path) -> io::Result<()> {
        self.inner.make_private(dir)
    }
    fn on_fuse(&self, dir: &Path) -> io::Result<bool> {
        self.inner.on_fuse(dir)
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.inner.try_lock(path)
    }
}
