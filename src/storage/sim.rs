//! The simulated disk: an in-memory filesystem for deterministic simulation.
//!
//! Every file keeps two states: what the running system sees (`cur`) and what
//! would survive a power cut (`durable`). `sync_data`/`sync_all` copy `cur`
//! to `durable`; a directory keeps its durable entries and a log of the
//! entry changes (create, unlink, rename) since its last fsync.
//!
//! [`SimStorage::power_cut`] is the cut. Per file, each page that differs
//! between the two states comes back old, new, or torn (every 512-byte
//! sector old or new on its own), and the size old or new. Per directory, a
//! random prefix of the unsynced entry changes survives (a rename inside one
//! directory is one change). Files no surviving entry reaches are gone. All
//! choices come from the seed, so one seed gives one run.
//!
//! [`SimStorage::die_after`] makes the cut happen in the middle of whatever
//! the core is doing: after that many more operations every operation fails
//! with EIO and changes nothing (the machine is off), until `power_cut`.
//! [`Fault`]s inject EIO, ENOSPC or a short write at a chosen operation, on
//! files whose path contains a chosen string.
//!
//! Each top-level directory is its own device with its own capacity
//! ([`SimStorage::set_capacity`]): writes past it fail with ENOSPC.
//!
//! Why one file of about 1,200 lines: one job, the simulated filesystem;
//! its files, directory logs and power cut share one state under one lock,
//! and each operation must update both the running and the durable view.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Alloc, FileIo, Handle, LockGuard, OpenMode, Space, Stat, Storage, errno};

/// Granularity of allocation and of copy-on-write between the two states.
pub const PAGE: u64 = 4096;
/// Granularity of torn writes.
pub const SECTOR: u64 = 512;
const ROOT: u64 = 1;
const DEFAULT_CAPACITY: u64 = 1 << 40;

type Page = Arc<Vec<u8>>;

#[derive(Clone, Debug, Default)]
struct Data {
    pages: BTreeMap<u64, Page>,
    len: u64,
}

#[derive(Debug)]
struct FileNode {
    cur: Data,
    durable: Data,
    dev: u64,
    nlink: u32,
}

#[derive(Debug, Default)]
struct DirNode {
    cur: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    /// Entry changes since the last fsync, in order; each group is atomic.
    log: Vec<Vec<(OsString, Option<u64>)>>,
    dev: u64,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

/// Which operations a [`Fault`] hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Any,
    Read,
    /// Writes, size changes, allocation and namespace changes.
    Write,
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Eio,
    Enospc,
    /// Writes a sector-aligned prefix of the buffer, then fails with ENOSPC
    /// (other operations: ENOSPC).
    ShortWrite,
}

/// An injected error.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Fires at the first matching operation numbered at least this.
    pub at_op: u64,
    /// Only operations on paths containing this.
    pub path: Option<String>,
    pub class: OpClass,
    pub kind: FaultKind,
    /// Keeps firing after the first time (a failed device), instead of once.
    pub sticky: bool,
}

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug)]
struct State {
    /// Ordered: a power cut draws its choices node by node, in one order.
    nodes: BTreeMap<u64, Node>,
    next_ino: u64,
    /// Bumped by each power cut: handles of an earlier boot fail with EIO.
    boot: u64,
    ops: u64,
    rng: Rng,
    dead_after: Option<u64>,
    faults: Vec<Fault>,
    capacity: HashMap<u64, u64>,
    used: HashMap<u64, u64>,
    locks: HashSet<u64>,
    /// Faults that fired, with the operation and path.
    fired: Vec<String>,
    /// Prints every operation that changes the disk (debugging a seed).
    trace: bool,
}

/// The simulated disk (cheap to clone: clones share one disk).
#[derive(Clone, Debug)]
pub struct SimStorage {
    st: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct SimFile {
    st: Arc<Mutex<State>>,
    ino: u64,
    boot: u64,
    path: PathBuf,
    write: bool,
}

#[derive(Debug)]
struct SimLock {
    st: Arc<Mutex<State>>,
    ino: u64,
    boot: u64,
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = self.st.lock();
        if st.boot == self.boot {
            st.locks.remove(&self.ino);
        }
    }
}

fn not_found() -> io::Error {
    errno(libc::ENOENT)
}

impl Data {
    fn read(&self, buf: &mut [u8], off: u64) -> usize {
        if off >= self.len {
            return 0;
        }
        let n = (buf.len() as u64).min(self.len - off) as usize;
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let (pi, within) = (pos / PAGE, (pos % PAGE) as usize);
            let take = (PAGE as usize - within).min(n - done);
            match self.pages.get(&pi) {
                Some(p) => buf[done..done + take].copy_from_slice(&p[within..within + take]),
                None => buf[done..done + take].fill(0),
            }
            done += take;
        }
        n
    }

    /// Zeroes `[from, to)` inside existing pages, removing whole pages when
    /// `drop_whole`.
    fn zero(&mut self, from: u64, to: u64, drop_whole: bool) -> u64 {
        let mut freed = 0;
        let mut pos = from;
        while pos < to {
            let pi = pos / PAGE;
            let within = pos % PAGE;
            let end = ((pi + 1) * PAGE).min(to);
            if within == 0 && end == (pi + 1) * PAGE && drop_whole {
                if self.pages.remove(&pi).is_some() {
                    freed += PAGE;
                }
            } else if let Some(p) = self.pages.get_mut(&pi) {
                Arc::make_mut(p)[within as usize..(end - pi * PAGE) as usize].fill(0);
            }
            pos = end;
        }
        freed
    }
}

impl State {
    fn new(seed: u64) -> State {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::Dir(DirNode::default()));
        State {
            nodes,
            next_ino: ROOT + 1,
            boot: 0,
            ops: 0,
            rng: Rng::new(seed),
            dead_after: None,
            faults: Vec::new(),
            capacity: HashMap::new(),
            used: HashMap::new(),
            locks: HashSet::new(),
            fired: Vec::new(),
            trace: false,
        }
    }

    /// Counts one operation; fails it if the power is off or a fault fires.
    fn tick(&mut self, class: OpClass, path: &Path) -> io::Result<Option<FaultKind>> {
        // Only operations that change the disk are counted: how often the
        // core reads (free space, say, cached for a time) may vary between
        // runs, and a cut between two reads is a cut before the next write.
        if matches!(class, OpClass::Write | OpClass::Sync) {
            self.ops += 1;
            if self.trace {
                eprintln!("sim op {} {class:?} {}", self.ops, path.display());
            }
        }
        if let Some(d) = self.dead_after
            && self.ops > d
        {
            return Err(errno(libc::EIO));
        }
        let ops = self.ops;
        let p = path.to_string_lossy();
        let hit = self.faults.iter().position(|f| {
            ops >= f.at_op
                && (f.class == OpClass::Any || f.class == class)
                && f.path.as_ref().is_none_or(|s| p.contains(s.as_str()))
        });
        let Some(i) = hit else { return Ok(None) };
        let f = self.faults[i].clone();
        if !f.sticky {
            self.faults.remove(i);
        }
        self.fired
            .push(format!("op {ops}: {:?} on {p} ({class:?})", f.kind));
        match f.kind {
            FaultKind::Eio => Err(errno(libc::EIO)),
            FaultKind::Enospc => Err(errno(libc::ENOSPC)),
            FaultKind::ShortWrite if class == OpClass::Write => Ok(Some(FaultKind::ShortWrite)),
            FaultKind::ShortWrite => Err(errno(libc::ENOSPC)),
        }
    }

    fn dir(&self, ino: u64) -> io::Result<&DirNode> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(_) => Err(errno(libc::ENOTDIR)),
            None => Err(not_found()),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> io::Result<&mut DirNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            Some(_) => Err(errno(libc::ENOTDIR)),
            None => Err(not_found()),
        }
    }

    fn file_mut(&mut self, ino: u64) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(_) => Err(errno(libc::EISDIR)),
            None => Err(not_found()),
        }
    }

    fn file(&self, ino: u64) -> io::Result<&FileNode> {
        match self.nodes.get(&ino) {
            Some(Node::File(f)) => Ok(f),
            Some(_) => Err(errno(libc::EISDIR)),
            None => Err(not_found()),
        }
    }

    /// The inode at `path`.
    fn resolve(&self, path: &Path) -> io::Result<u64> {
        let mut ino = ROOT;
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => {
                    ino = *self.dir(ino)?.cur.get(n).ok_or_else(not_found)?;
                }
                _ => return Err(errno(libc::EINVAL)),
            }
        }
        Ok(ino)
    }

    /// The parent directory's inode and the last name of `path`.
    fn parent<'a>(&self, path: &'a Path) -> io::Result<(u64, &'a OsStr)> {
        let name = path.file_name().ok_or_else(|| errno(libc::EINVAL))?;
        let parent = path.parent().ok_or_else(|| errno(libc::EINVAL))?;
        let p = self.resolve(parent)?;
        self.dir(p)?;
        Ok((p, name))
    }

    fn set_entry(&mut self, dir: u64, name: &OsStr, child: Option<u64>) -> io::Result<()> {
        self.set_entries(dir, vec![(name.to_os_string(), child)])
    }

    /// Changes entries of `dir` as one atomic group; keeps link counts.
    fn set_entries(&mut self, dir: u64, group: Vec<(OsString, Option<u64>)>) -> io::Result<()> {
        let mut links: Vec<(u64, i32)> = Vec::new();
        {
            let d = self.dir_mut(dir)?;
            for (name, child) in &group {
                let old = match child {
                    Some(c) => d.cur.insert(name.clone(), *c),
                    None => d.cur.remove(name),
                };
                if let Some(o) = old {
                    links.push((o, -1));
                }
                if let Some(c) = child {
                    links.push((*c, 1));
                }
            }
            d.log.push(group);
        }
        for (ino, delta) in links {
            if let Some(Node::File(f)) = self.nodes.get_mut(&ino) {
                f.nlink = f.nlink.saturating_add_signed(delta);
                if f.nlink == 0 {
                    // Unlinked: its space is free for the running system (a
                    // cut may bring the file back; then usage is recounted).
                    let bytes = f.cur.pages.len() as u64 * PAGE;
                    let dev = f.dev;
                    *self.used.entry(dev).or_default() = self
                        .used
                        .get(&dev)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(bytes);
                } else if f.nlink == 1 && delta > 0 {
                    let bytes = f.cur.pages.len() as u64 * PAGE;
                    *self.used.entry(f.dev).or_default() += bytes;
                }
            }
        }
        Ok(())
    }

    /// The device of a node about to be made in `parent` (its inode will be
    /// `next_ino`).
    fn dev_of_new(&self, parent: u64) -> u64 {
        if parent == ROOT {
            // A top-level directory is a device of its own.
            self.next_ino
        } else {
            match self.nodes.get(&parent) {
                Some(Node::Dir(d)) => d.dev,
                _ => 0,
            }
        }
    }

    /// A new node (`make` gets its device) entered at `path`; its inode.
    fn make_node(&mut self, path: &Path, make: impl FnOnce(u64) -> Node) -> io::Result<u64> {
        let (parent, name) = self.parent(path)?;
        let dev = self.dev_of_new(parent);
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, make(dev));
        self.set_entry(parent, name, Some(ino))?;
        Ok(ino)
    }

    fn charge(&mut self, dev: u64, bytes: u64) -> io::Result<()> {
        let cap = self.capacity.get(&dev).copied().unwrap_or(DEFAULT_CAPACITY);
        let used = self.used.entry(dev).or_default();
        if *used + bytes > cap {
            return Err(errno(libc::ENOSPC));
        }
        *used += bytes;
        Ok(())
    }

    fn release(&mut self, dev: u64, bytes: u64) {
        let used = self.used.entry(dev).or_default();
        *used = used.saturating_sub(bytes);
    }

    /// New pages `[from, to)` would need.
    fn missing_pages(f: &FileNode, from: u64, to: u64) -> u64 {
        if from >= to {
            return 0;
        }
        (from / PAGE..to.div_ceil(PAGE))
            .filter(|p| !f.cur.pages.contains_key(p))
            .count() as u64
    }

    fn write(&mut self, ino: u64, buf: &[u8], off: u64) -> io::Result<usize> {
        let end = off
            .checked_add(buf.len() as u64)
            .ok_or_else(|| errno(libc::EFBIG))?;
        let (dev, need) = {
            let f = self.file(ino)?;
            (f.dev, Self::missing_pages(f, off, end))
        };
        let live = self.file(ino)?.nlink > 0;
        if live {
            self.charge(dev, need * PAGE)?;
        }
        let f = self.file_mut(ino)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (pi, within) = (pos / PAGE, (pos % PAGE) as usize);
            let take = (PAGE as usize - within).min(buf.len() - done);
            let p = f
                .cur
                .pages
                .entry(pi)
                .or_insert_with(|| Arc::new(vec![0u8; PAGE as usize]));
            Arc::make_mut(p)[within..within + take].copy_from_slice(&buf[done..done + take]);
            done += take;
        }
        f.cur.len = f.cur.len.max(end);
        Ok(buf.len())
    }

    fn set_len(&mut self, ino: u64, len: u64) -> io::Result<()> {
        let f = self.file_mut(ino)?;
        let mut freed = 0;
        if len < f.cur.len {
            let first_gone = len.div_ceil(PAGE);
            let gone: Vec<u64> = f.cur.pages.range(first_gone..).map(|(k, _)| *k).collect();
            for k in gone {
                f.cur.pages.remove(&k);
                freed += PAGE;
            }
            if !len.is_multiple_of(PAGE) {
                f.cur.zero(len, len.div_ceil(PAGE) * PAGE, false);
            }
        }
        f.cur.len = len;
        let (dev, live) = (f.dev, f.nlink > 0);
        if live {
            self.release(dev, freed);
        }
        Ok(())
    }

    fn allocate(&mut self, ino: u64, mode: Alloc, off: u64, len: u64) -> io::Result<()> {
        let end = off.checked_add(len).ok_or_else(|| errno(libc::EFBIG))?;
        let (dev, live) = {
            let f = self.file(ino)?;
            (f.dev, f.nlink > 0)
        };
        match mode {
            Alloc::Punch => {
                let freed = self.file_mut(ino)?.cur.zero(off, end, true);
                if live {
                    self.release(dev, freed);
                }
            }
            Alloc::KeepSize | Alloc::ZeroRange => {
                let need = Self::missing_pages(self.file(ino)?, off, end);
                if live {
                    self.charge(dev, need * PAGE)?;
                }
                let f = self.file_mut(ino)?;
                if mode == Alloc::ZeroRange {
                    f.cur.zero(off, end, false);
                }
                for pi in off / PAGE..end.div_ceil(PAGE) {
                    f.cur
                        .pages
                        .entry(pi)
                        .or_insert_with(|| Arc::new(vec![0u8; PAGE as usize]));
                }
            }
        }
        Ok(())
    }

    /// The power cut: see the module comment.
    fn cut(&mut self) {
        let mut rng = self.rng.clone();
        for node in self.nodes.values_mut() {
            match node {
                Node::File(f) => {
                    let mut out = f.durable.clone();
                    if f.cur.len != f.durable.len && rng.chance(50) {
                        out.len = f.cur.len;
                    }
                    let keys: BTreeSet<u64> = f
                        .cur
                        .pages
                        .keys()
                        .chain(f.durable.pages.keys())
                        .copied()
                        .collect();
                    for k in keys {
                        let (old, new) = (f.durable.pages.get(&k), f.cur.pages.get(&k));
                        let same = match (old, new) {
                            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                            (None, None) => true,
                            _ => false,
                        };
                        if same {
                            continue;
                        }
                        match rng.below(3) {
                            0 => {}
                            1 => match new {
                                Some(p) => {
                                    out.pages.insert(k, p.clone());
                                }
                                None => {
                                    out.pages.remove(&k);
                                }
                            },
                            _ => {
                                let zero = vec![0u8; PAGE as usize];
                                let a = old.map(|p| p.as_slice()).unwrap_or(&zero);
                                let b = new.map(|p| p.as_slice()).unwrap_or(&zero);
                                let mut torn = a.to_vec();
                                for s in 0..(PAGE / SECTOR) as usize {
                                    if rng.chance(50) {
                                        let r = s * SECTOR as usize..(s + 1) * SECTOR as usize;
                                        torn[r.clone()].copy_from_slice(&b[r]);
                                    }
                                }
                                out.pages.insert(k, Arc::new(torn));
                            }
                        }
                    }
                    // Nothing survives past the size.
                    let first_gone = out.len.div_ceil(PAGE);
                    let gone: Vec<u64> = out.pages.range(first_gone..).map(|(k, _)| *k).collect();
                    for k in gone {
                        out.pages.remove(&k);
                    }
                    if !out.len.is_multiple_of(PAGE) {
                        let l = out.len;
                        out.zero(l, l.div_ceil(PAGE) * PAGE, false);
                    }
                    f.cur = out.clone();
                    f.durable = out;
                }
                Node::Dir(d) => {
                    let keep = rng.below(d.log.len() as u64 + 1) as usize;
                    let mut out = d.durable.clone();
                    for group in &d.log[..keep] {
                        for (name, child) in group {
                            match child {
                                Some(c) => out.insert(name.clone(), *c),
                                None => out.remove(name),
                            };
                        }
                    }
                    d.log.clear();
                    d.cur = out.clone();
                    d.durable = out;
                }
            }
        }
        self.rng = rng;
        // Files and directories no surviving entry reaches are gone.
        let mut reach = HashSet::new();
        let mut todo = vec![ROOT];
        while let Some(i) = todo.pop() {
            if !reach.insert(i) {
                continue;
            }
            if let Some(Node::Dir(d)) = self.nodes.get(&i) {
                todo.extend(d.cur.values().copied());
            }
        }
        self.nodes.retain(|i, _| reach.contains(i));
        let mut links: HashMap<u64, u32> = HashMap::new();
        for n in self.nodes.values() {
            if let Node::Dir(d) = n {
                for c in d.cur.values() {
                    *links.entry(*c).or_default() += 1;
                }
            }
        }
        self.used.clear();
        for (i, n) in self.nodes.iter_mut() {
            if let Node::File(f) = n {
                f.nlink = links.get(i).copied().unwrap_or(0);
                *self.used.entry(f.dev).or_default() += f.cur.pages.len() as u64 * PAGE;
            }
        }
        self.boot += 1;
        self.dead_after = None;
        self.locks.clear();
    }
}

impl SimStorage {
    pub fn new(seed: u64) -> SimStorage {
        SimStorage {
            st: Arc::new(Mutex::new(State::new(seed))),
        }
    }

    /// Creates a top-level directory (a device) durably: `/name`.
    pub fn add_device(&self, name: &str, capacity: Option<u64>) -> PathBuf {
        let p = PathBuf::from("/").join(name);
        let mut st = self.st.lock();
        let ino = st.next_ino;
        st.next_ino += 1;
        st.nodes.insert(
            ino,
            Node::Dir(DirNode {
                dev: ino,
                ..Default::default()
            }),
        );
        if let Some(c) = capacity {
            st.capacity.insert(ino, c);
        }
        if let Ok(root) = st.dir_mut(ROOT) {
            root.cur.insert(name.into(), ino);
            root.durable.insert(name.into(), ino);
        }
        p
    }

    /// Operations that changed the disk so far (writes, namespace changes,
    /// syncs).
    pub fn ops(&self) -> u64 {
        self.st.lock().ops
    }

    /// The power goes off after `n` more operations that change the disk;
    /// the one after them fails, and every operation from then on.
    pub fn die_after(&self, n: u64) {
        let mut st = self.st.lock();
        st.dead_after = Some(st.ops + n);
    }

    /// Whether the power is off (waiting for [`SimStorage::power_cut`]).
    pub fn is_dead(&self) -> bool {
        let st = self.st.lock();
        st.dead_after.is_some_and(|d| st.ops > d)
    }

    /// Cuts the power now (see the module comment); handles opened before
    /// fail with EIO from now on, locks are released.
    pub fn power_cut(&self) {
        self.st.lock().cut();
    }

    /// Prints every operation that changes the disk from now on.
    pub fn set_trace(&self, on: bool) {
        self.st.lock().trace = on;
    }

    pub fn inject(&self, f: Fault) {
        self.st.lock().faults.push(f);
    }

    pub fn clear_faults(&self) {
        self.st.lock().faults.clear();
    }

    /// Faults that fired so far, one line each.
    pub fn fired(&self) -> Vec<String> {
        self.st.lock().fired.clone()
    }

    /// Operations numbered from now on: the `at_op` of a fault `n`
    /// operations ahead is `ops() + n`.
    pub fn set_capacity(&self, dir: &Path, bytes: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        let ino = st.resolve(dir)?;
        let dev = st.dir(ino)?.dev;
        st.capacity.insert(dev, bytes);
        Ok(())
    }

    /// Bytes allocated on the device of `dir`.
    pub fn used(&self, dir: &Path) -> io::Result<u64> {
        let st = self.st.lock();
        let ino = st.resolve(dir)?;
        let dev = st.dir(ino)?.dev;
        Ok(st.used.get(&dev).copied().unwrap_or(0))
    }
}

impl SimFile {
    fn with<T>(
        &self,
        class: OpClass,
        f: impl FnOnce(&mut State, Option<FaultKind>) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut st = self.st.lock();
        if st.boot != self.boot {
            return Err(errno(libc::EIO));
        }
        let fault = st.tick(class, &self.path)?;
        f(&mut st, fault)
    }

    fn writable(&self) -> io::Result<()> {
        if self.write {
            Ok(())
        } else {
            Err(errno(libc::EBADF))
        }
    }
}

impl FileIo for SimFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.with(OpClass::Read, |st, _| {
            Ok(st.file(self.ino)?.cur.read(buf, off))
        })
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.writable()?;
        self.with(OpClass::Write, |st, fault| match fault {
            Some(FaultKind::ShortWrite) => {
                let n = (buf.len() as u64 / 2 / SECTOR * SECTOR) as usize;
                st.write(self.ino, &buf[..n], off)?;
                Err(errno(libc::ENOSPC))
            }
            _ => st.write(self.ino, buf, off),
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(OpClass::Sync, |st, _| {
            let f = st.file_mut(self.ino)?;
            f.durable = f.cur.clone();
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(OpClass::Read, |st, _| Ok(st.file(self.ino)?.cur.len))
    }

    fn allocated(&self) -> io::Result<u64> {
        self.with(OpClass::Read, |st, _| {
            Ok(st.file(self.ino)?.cur.pages.len() as u64 * PAGE)
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.with(OpClass::Write, |st, _| st.set_len(self.ino, len))
    }

    fn allocate(&self, mode: Alloc, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        self.with(OpClass::Write, |st, _| {
            st.allocate(self.ino, mode, off, len)
        })
    }

    fn seek(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        self.with(OpClass::Read, |st, _| {
            let d = &st.file(self.ino)?.cur;
            if off >= d.len {
                return Ok(None);
            }
            let mut pi = off / PAGE;
            loop {
                let here = d.pages.contains_key(&pi);
                if here == data {
                    return Ok(Some((pi * PAGE).max(off).min(d.len)));
                }
                if pi * PAGE >= d.len {
                    // Past the end: the implicit hole at the end.
                    return Ok(if data { None } else { Some(d.len) });
                }
                if data {
                    // Jump to the next present page.
                    match d.pages.range(pi..).next() {
                        Some((k, _)) if *k * PAGE < d.len => pi = *k,
                        _ => return Ok(None),
                    }
                } else {
                    pi += 1;
                }
            }
        })
    }

    fn allocated_ranges(&self, lo: u64, hi: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        self.with(OpClass::Read, |st, _| {
            let d = &st.file(self.ino)?.cur;
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (k, _) in d.pages.range(lo / PAGE..hi.div_ceil(PAGE)) {
                let (s, e) = ((k * PAGE).max(lo), ((k + 1) * PAGE).min(hi));
                if s >= e {
                    continue;
                }
                match out.last_mut() {
                    Some((_, end)) if *end >= s => *end = e,
                    _ => out.push((s, e)),
                }
            }
            Ok(Some(out))
        })
    }
}

impl Storage for SimStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Handle> {
        let mut st = self.st.lock();
        let class = if mode.create || mode.truncate {
            OpClass::Write
        } else {
            OpClass::Read
        };
        st.tick(class, path)?;
        let ino = match st.resolve(path) {
            Ok(ino) => {
                if mode.create_new {
                    return Err(errno(libc::EEXIST));
                }
                st.file(ino)?;
                if mode.truncate {
                    st.set_len(ino, 0)?;
                }
                ino
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && mode.create => {
                st.make_node(path, |dev| {
                    Node::File(FileNode {
                        cur: Data::default(),
                        durable: Data::default(),
                        dev,
                        nlink: 0,
                    })
                })?
            }
            Err(e) => return Err(e),
        };
        Ok(Arc::new(SimFile {
            st: self.st.clone(),
            ino,
            boot: st.boot,
            path: path.to_path_buf(),
            write: mode.write,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        st.tick(OpClass::Write, path)?;
        let ino = st.resolve(path)?;
        st.file(ino)?;
        let (parent, name) = st.parent(path)?;
        st.set_entry(parent, name, None)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        st.tick(OpClass::Write, path)?;
        let ino = st.resolve(path)?;
        if !st.dir(ino)?.cur.is_empty() {
            return Err(errno(libc::ENOTEMPTY));
        }
        let (parent, name) = st.parent(path)?;
        st.set_entry(parent, name, None)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        st.tick(OpClass::Write, from)?;
        let ino = st.resolve(from)?;
        let (fp, fname) = st.parent(from)?;
        let (tp, tname) = st.parent(to)?;
        if let Ok(old) = st.resolve(to) {
            if old == ino {
                return Ok(());
            }
            match (st.nodes.get(&ino), st.nodes.get(&old)) {
                (Some(Node::File(_)), Some(Node::Dir(_))) => return Err(errno(libc::EISDIR)),
                (Some(Node::Dir(_)), Some(Node::File(_))) => return Err(errno(libc::ENOTDIR)),
                (Some(Node::Dir(_)), Some(Node::Dir(d))) if !d.cur.is_empty() => {
                    return Err(errno(libc::ENOTEMPTY));
                }
                _ => {}
            }
        }
        if fp == tp {
            st.set_entries(
                fp,
                vec![
                    (tname.to_os_string(), Some(ino)),
                    (fname.to_os_string(), None),
                ],
            )
        } else {
            st.set_entry(tp, tname, Some(ino))?;
            st.set_entry(fp, fname, None)
        }
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        st.tick(OpClass::Write, path)?;
        if st.resolve(path).is_ok() {
            return Err(errno(libc::EEXIST));
        }
        st.make_node(path, |dev| {
            Node::Dir(DirNode {
                dev,
                ..Default::default()
            })
        })
        .map(|_| ())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.st.lock();
        st.tick(OpClass::Sync, dir)?;
        let ino = st.resolve(dir)?;
        let d = st.dir_mut(ino)?;
        d.durable = d.cur.clone();
        d.log.clear();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let mut st = self.st.lock();
        st.tick(OpClass::Read, dir)?;
        let ino = st.resolve(dir)?;
        Ok(st.dir(ino)?.cur.keys().cloned().collect())
    }

    fn stat(&self, path: &Path) -> io::Result<Stat> {
        let mut st = self.st.lock();
        st.tick(OpClass::Read, path)?;
        let ino = st.resolve(path)?;
        Ok(match st.nodes.get(&ino) {
            Some(Node::File(f)) => Stat {
                is_dir: false,
                is_file: true,
                len: f.cur.len,
                allocated: f.cur.pages.len() as u64 * PAGE,
                mode: 0o100600,
                dev: f.dev,
                ino,
            },
            Some(Node::Dir(d)) => Stat {
                is_dir: true,
                is_file: false,
                len: 0,
                allocated: 0,
                mode: 0o40700,
                dev: d.dev,
                ino,
            },
            None => return Err(not_found()),
        })
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        let mut st = self.st.lock();
        st.tick(OpClass::Read, path)?;
        let ino = st.resolve(path)?;
        let dev = match st.nodes.get(&ino) {
            Some(Node::Dir(d)) => d.dev,
            Some(Node::File(f)) => f.dev,
            None => return Err(not_found()),
        };
        let total = st.capacity.get(&dev).copied().unwrap_or(DEFAULT_CAPACITY);
        let used = st.used.get(&dev).copied().unwrap_or(0);
        Ok(Space {
            total,
            free: total.saturating_sub(used),
            avail: total.saturating_sub(used),
            block: PAGE,
        })
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        let mut out = PathBuf::from("/");
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(n) => out.push(n),
                Component::Prefix(_) => return Err(errno(libc::EINVAL)),
            }
        }
        self.stat(&out)?;
        Ok(out)
    }

    fn make_private(&self, dir: &Path) -> io::Result<()> {
        self.stat(dir).map(|_| ())
    }

    fn on_fuse(&self, _dir: &Path) -> io::Result<bool> {
        Ok(false)
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let f = self.open(path, OpenMode::CREATE)?;
        drop(f);
        let mut st = self.st.lock();
        let ino = st.resolve(path)?;
        if !st.locks.insert(ino) {
            return Ok(None);
        }
        Ok(Some(Box::new(SimLock {
            st: self.st.clone(),
            ino,
            boot: st.boot,
        })))
    }

    fn concurrent(&self) -> bool {
        false
    }

    fn clock_ms(&self) -> u64 {
        self.st.lock().ops
    }

    fn now(&self) -> (i64, u32) {
        // 2026-01-01, then one millisecond per operation.
        let ops = self.st.lock().ops;
        (
            1_767_225_600 + (ops / 1000) as i64,
            (ops % 1000) as u32 * 1_000_000,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim() -> (SimStorage, PathBuf) {
        let s = SimStorage::new(7);
        let d = s.add_device("d", None);
        (s, d)
    }

    #[test]
    fn synced_data_survives_and_unsynced_entries_may_not() {
        let (s, d) = sim();
        let p = d.join("f");
        let f = s.open(&p, OpenMode::CREATE).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        s.sync_dir(&d).unwrap();
        f.write_all_at(b"HELLO world", 0).unwrap();
        let q = d.join("g");
        s.open(&q, OpenMode::CREATE).unwrap().sync_data().unwrap();
        s.power_cut();
        assert!(f.read_at(&mut [0u8; 4], 0).is_err(), "stale handle works");
        let got = s.read(&p).unwrap();
        assert!(got.len() == 5 || got.len() == 11, "{got:?}");
        // Sectors are old or new (zeros past the old end), nothing else.
        for (i, b) in got.iter().enumerate() {
            let old = b"hello".get(i).copied().unwrap_or(0);
            assert!(*b == old || b"HELLO world"[i] == *b, "{got:?}");
        }
    }

    #[test]
    fn synced_everything_survives_every_cut() {
        for seed in 0..50 {
            let s = SimStorage::new(seed);
            let d = s.add_device("d", None);
            let data: Vec<u8> = (0..20_000u32)
                .map(|i| (i * 7 + seed as u32) as u8)
                .collect();
            s.create_dir(&d.join("sub")).unwrap();
            s.sync_dir(&d).unwrap();
            let p = d.join("sub/f");
            super::super::write_file_atomic(&s, &p, &data).unwrap();
            let f = s.open(&p, OpenMode::WRITE).unwrap();
            f.write_all_at(b"unsynced", 100).unwrap();
            s.rename(&p, &d.join("sub/g")).unwrap();
            s.power_cut();
            let names = s.list(&d.join("sub")).unwrap();
            assert_eq!(names.len(), 1, "seed {seed}: {names:?}");
            let got = s.read(&d.join("sub").join(&names[0])).unwrap();
            assert_eq!(got.len(), data.len());
            assert_eq!(got[..100], data[..100]);
            assert_eq!(got[200..], data[200..]);
        }
    }

    #[test]
    fn unsynced_file_in_unsynced_dir_vanishes_sometimes() {
        let mut gone = 0;
        for seed in 0..40 {
            let s = SimStorage::new(seed);
            let d = s.add_device("d", None);
            let f = s.open(&d.join("x"), OpenMode::CREATE).unwrap();
            f.write_all_at(b"data", 0).unwrap();
            f.sync_data().unwrap();
            s.power_cut();
            if !s.exists(&d.join("x")) {
                gone += 1;
            }
        }
        assert!(gone > 5 && gone < 35, "{gone} of 40");
    }

    #[test]
    fn space_seek_and_faults() {
        let (s, d) = sim();
        s.set_capacity(&d, 3 * PAGE).unwrap();
        let f = s.open(&d.join("f"), OpenMode::CREATE).unwrap();
        f.write_all_at(&[1u8; 8192], 8192).unwrap();
        assert_eq!(f.seek(0, true).unwrap(), Some(8192));
        assert_eq!(f.seek(8192, false).unwrap(), Some(16384));
        assert_eq!(f.seek(0, false).unwrap(), Some(0));
        assert_eq!(
            f.allocated_ranges(0, 1 << 20).unwrap(),
            Some(vec![(8192, 16384)])
        );
        let e = f.write_all_at(&[1u8; 8192], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        f.allocate(Alloc::Punch, 8192, 4096).unwrap();
        assert_eq!(s.used(&d).unwrap(), PAGE);
        let mut b = [9u8; 4];
        f.read_exact_at(&mut b, 8192).unwrap();
        assert_eq!(b, [0; 4]);
        s.inject(Fault {
            at_op: 0,
            path: Some("/d/f".into()),
            class: OpClass::Sync,
            kind: FaultKind::Eio,
            sticky: false,
        });
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        f.sync_data().unwrap();
        assert_eq!(s.fired().len(), 1);
        s.die_after(1);
        f.len().unwrap();
        f.sync_data().unwrap();
        f.len().unwrap();
        assert!(f.sync_data().is_err() && s.is_dead());
        assert!(f.len().is_err(), "reads fail once the power is off");
    }
}
