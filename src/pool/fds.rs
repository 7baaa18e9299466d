//! The bounded cache of open extent files.
//!
//! Every extent copy is a member file; keeping each open until its volume is
//! released ran the daemon out of descriptors (scrub, capture and moves touch
//! every extent), and then writes failed with EIO, commits failed and unmount
//! refused. Open files are therefore kept in one LRU for the process, sized
//! from `RLIMIT_NOFILE` (raised to its hard limit at start) with descriptors
//! kept in reserve for commits, sum files, deltas, labels and sockets.
//!
//! Invariants: a cached descriptor always names the file currently at its
//! path. A file created at a path replaces the cached entry ([`FdCache::put`]),
//! and a file is forgotten before it is removed ([`FdCache::forget`]), so a
//! later file of the same name is never written through a stale descriptor.
//! Eviction only drops the cache's reference: an I/O in progress keeps its
//! `Arc`, and fdatasync on a reopened descriptor flushes the same inode (and
//! reports its unseen writeback errors).

use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;
use parking_lot::Mutex;

use super::layout::ExtentFile;
use crate::storage::Handle;

const SHARDS: usize = 16;
/// Descriptors left for everything but cached extent files.
pub const FD_RESERVE: u64 = 256;
/// Upper bound of the cache, whatever the limit.
const MAX_CACHED: u64 = 1 << 16;

pub struct FdCache {
    shards: Vec<Mutex<LruCache<ExtentFile, Handle>>>,
    capacity: usize,
}

impl FdCache {
    /// A cache of at most `capacity` files (at least one per shard).
    pub fn new(capacity: usize) -> FdCache {
        let per = NonZeroUsize::new(capacity.div_ceil(SHARDS)).unwrap_or(NonZeroUsize::MIN);
        FdCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per)))
                .collect(),
            capacity: per.get() * SHARDS,
        }
    }

    /// A cache sized for the process's descriptor limit `limit`: a quarter
    /// of what is left after [`FD_RESERVE`], each entry holding up to two
    /// descriptors (the other half is for deltas being read or written and
    /// for files opened while the cache is full).
    pub fn for_limit(limit: u64) -> FdCache {
        // A quarter: each cached file may hold a second, O_DIRECT descriptor.
        let n = (limit.saturating_sub(FD_RESERVE) / 4).clamp(SHARDS as u64, MAX_CACHED);
        FdCache::new(n as usize)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn shard(&self, key: &ExtentFile) -> &Mutex<LruCache<ExtentFile, Handle>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    /// The cached file of `key`, or the one `open` returns (then cached).
    pub fn get_or_open<E>(
        &self,
        key: ExtentFile,
        open: impl FnOnce() -> Result<Handle, E>,
    ) -> Result<Handle, E> {
        if let Some(f) = self.shard(&key).lock().get(&key) {
            return Ok(f.clone());
        }
        // Opened without the shard's lock: a slow member must not hold up
        // the other files of the shard. Two racing opens of one file both
        // name the file at the path; the last one is kept.
        let f = open()?;
        self.shard(&key).lock().put(key, f.clone());
        Ok(f)
    }

    /// The cached file of `key`, if any; nothing is opened.
    pub fn cached(&self, key: &ExtentFile) -> Option<Handle> {
        self.shard(key).lock().peek(key).cloned()
    }

    /// Caches `f`, just created at the path of `key` (replacing any entry).
    pub fn put(&self, key: ExtentFile, f: Handle) {
        self.shard(&key).lock().put(key, f);
    }

    /// Drops the cached file of `key` (before its file is removed, or after
    /// an I/O error on it).
    pub fn forget(&self, key: &ExtentFile) {
        self.shard(key).lock().pop(key);
    }

    /// Files cached now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft
/// limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads the valid rlimit we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    r.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::real::RealFile;
    use std::fs::File;
    use std::sync::Arc;

    fn key(member: u32, ino: u64, index: u64, file_id: u64) -> ExtentFile {
        ExtentFile {
            member,
            ino,
            index,
            file_id,
        }
    }

    fn h(f: std::io::Result<File>) -> std::io::Result<Handle> {
        f.map(|f| Arc::new(RealFile::new(f)) as Handle)
    }

    #[test]
    fn bounded_and_forgets() {
        let d = tempfile::tempdir().unwrap();
        let c = FdCache::new(32);
        assert_eq!(c.capacity(), 32);
        for i in 0..200u64 {
            let p = d.path().join(i.to_string());
            c.get_or_open(key(0, i, 0, 0), || h(File::create(&p)))
                .unwrap();
        }
        assert!(c.len() <= 32, "{} cached", c.len());
        let p = d.path().join("x");
        let f = c
            .get_or_open(key(1, 1, 1, 1), || h(File::create(&p)))
            .unwrap();
        let again = c
            .get_or_open(key(1, 1, 1, 1), || -> std::io::Result<Handle> {
                panic!("reopened")
            })
            .unwrap();
        assert!(Arc::ptr_eq(&f, &again));
        c.forget(&key(1, 1, 1, 1));
        let reopened = c
            .get_or_open(key(1, 1, 1, 1), || h(File::open(&p)))
            .unwrap();
        assert!(!Arc::ptr_eq(&f, &reopened));
        assert!(FdCache::for_limit(64).capacity() >= SHARDS);
        assert!(FdCache::for_limit(1 << 30).capacity() as u64 <= MAX_CACHED + SHARDS as u64);
    }
}
