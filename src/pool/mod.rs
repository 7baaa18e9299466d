//! The pool: its members (directories, each with a label, a metadata store and a
//! `data/` directory of extent files), placement of new extents, space accounting,
//! and the locks that keep two daemons off one pool.
//!
//! What a member directory holds, and every name in it, is in layout.rs.

pub mod fds;
pub mod info;
pub mod inspect;
pub mod intent;
pub mod label;
pub mod layout;
pub mod members;
pub mod meta;
pub mod sums;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, FsError, FsResult, Result};
use crate::storage::{Handle, LockGuard, OpenMode, Stat, Storage};
use label::{Label, MemberEntry, PoolConfig, has_label, read_label, write_label};
use meta::{Batch, InodeRecord, MemberStore, MetaImage, NodeKind, ROOT_INO, Timestamp};

pub use layout::{
    DATA_DIR, LOCK_FILE, QUARANTINE_DIR, extent_file_name, parse_extent_file_name, sum_file_name,
};
pub const DEFAULT_EXTENT_SIZE: u64 = 64 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// How long a member's free-space reading is trusted on the write path.
const SPACE_TTL_MS: u64 = 100;
/// Below this many available bytes, free space is read on every check.
const NEAR_FULL: u64 = 64 << 20;

/// Options of `vpool create`.
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    pub copies: u32,
    pub extent_size: u64,
    pub block_size: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            copies: 1,
            extent_size: DEFAULT_EXTENT_SIZE,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

struct SpaceReading {
    /// [`Storage::clock_ms`] of the reading.
    at_ms: u64,
    avail: u64,
}

pub struct Member {
    pub entry: MemberEntry,
    /// The directory as opened now (may differ from the label's last-seen path).
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// Device of the filesystem holding the member: members on one filesystem
    /// share capacity and are counted once.
    pub dev: u64,
    /// This member's metadata store; reopened after a failed commit (redb refuses
    /// further transactions after an I/O error until the database is reopened).
    store: Mutex<Option<MemberStore>>,
    _lock: Box<dyn LockGuard>,
    storage: Arc<dyn Storage>,
    space: Mutex<Option<SpaceReading>>,
    /// Number of extent files on this member (placement tie-break).
    pub extents: AtomicU64,
    pub intent: intent::IntentLog,
    /// Device and inode of the directory as opened: a directory deleted or
    /// replaced under the daemon no longer matches.
    dir_id: (u64, u64),
    /// Set once the member fails (I/O errors, directory gone): no I/O goes to
    /// it any more until the pool is mounted again.
    failed: std::sync::atomic::AtomicBool,
    fail_reason: Mutex<Option<String>>,
    /// Being removed: no new extent or delta is placed on it.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Member {
    /// Bytes the pool keeps free on each member so metadata commits never fail
    /// for lack of space: 1/64 of the filesystem, between 4 MiB and 256 MiB.
    pub fn reserve(total: u64) -> u64 {
        (total / 64).clamp(4 << 20, 256 << 20)
    }

    /// Free bytes available to new data (after the reserve), cached briefly.
    pub fn available(&self) -> io::Result<u64> {
        let mut g = self.space.lock();
        // Near the reserve every call reads the filesystem afresh, so that writes
        // racing within one cache period cannot eat into the reserve.
        let now = self.storage.clock_ms();
        if let Some(r) = g.as_ref()
            && now.saturating_sub(r.at_ms) < SPACE_TTL_MS
            && r.avail > NEAR_FULL
        {
            return Ok(r.avail);
        }
        let st = self.storage.space(&self.dir)?;
        let avail = st.avail.saturating_sub(Self::reserve(st.total));
        *g = Some(SpaceReading { at_ms: now, avail });
        Ok(avail)
    }

    pub fn invalidate_space(&self) {
        *self.space.lock() = None;
    }

    /// A member opened (and locked, `lock`) at `entry.path`, whose
    /// directory's metadata is `md`.
    fn new(
        storage: Arc<dyn Storage>,
        entry: MemberEntry,
        lock: Box<dyn LockGuard>,
        md: &Stat,
        store: Option<MemberStore>,
    ) -> Member {
        let dir = entry.path.clone();
        Member {
            data_dir: dir.join(DATA_DIR),
            intent: intent::IntentLog::new(storage.clone(), &dir),
            entry,
            dev: md.dev,
            store: Mutex::new(store),
            _lock: lock,
            storage,
            space: Mutex::new(None),
            extents: AtomicU64::new(0),
            dir_id: (md.dev, md.ino),
            failed: Default::default(),
            fail_reason: Mutex::new(None),
            draining: Default::default(),
            dir,
        }
    }

    /// Records in the member's lock file who holds it (pid, mountpoint).
    fn write_lock_info(&self, mountpoint: &Path) -> Result<()> {
        let p = self.dir.join(LOCK_FILE);
        let f = self
            .storage
            .open(&p, OpenMode::EMPTY)
            .map_err(|e| Error::io(&p, e))?;
        let info = layout::lock_info(std::process::id(), mountpoint);
        f.write_all_at(info.as_bytes(), 0)
            .map_err(|e| Error::io(&p, e))
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn fail_reason(&self) -> Option<String> {
        self.fail_reason.lock().clone()
    }

    /// Whether the member's directory is still the one opened, with its label.
    pub fn probe(&self) -> std::result::Result<(), String> {
        let s = &*self.storage;
        let md = s
            .stat(&self.dir)
            .map_err(|e| format!("directory unreachable: {e}"))?;
        if (md.dev, md.ino) != self.dir_id {
            return Err("directory was replaced".into());
        }
        let mut io_err = None;
        let mut labelled = false;
        for f in layout::LABEL_FILES {
            match s.stat(&self.dir.join(f)) {
                Ok(_) => labelled = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => io_err = Some(e),
            }
        }
        if !labelled {
            return Err(match io_err {
                Some(e) => format!("I/O error reading the label: {e}"),
                None => "label is gone".into(),
            });
        }
        match s.stat(&self.data_dir) {
            Ok(st) if st.is_dir => Ok(()),
            Ok(_) => Err("data directory is gone".into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err("data directory is gone".into()),
            Err(e) => Err(format!("I/O error on the data directory: {e}")),
        }
    }
}

/// Errors that mean the device under a member is failing (as opposed to a
/// full disk or a bad request).
pub fn is_device_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO)
            | Some(libc::ENOENT)
            | Some(libc::ENXIO)
            | Some(libc::ENODEV)
            | Some(libc::EROFS)
            | Some(libc::ESTALE)
            | Some(libc::ENOTCONN)
            | Some(libc::ESHUTDOWN)
    )
}

/// Integrity events over the pool's life (shown by `vpool status`; loaded
/// from and saved to the pool's operational record, see info.rs).
#[derive(Default)]
pub struct Integrity {
    /// Blocks (or sum files) found not matching their checksum.
    pub checksum_errors: AtomicU64,
    /// Bad copies of blocks rewritten from a good copy.
    pub repaired: AtomicU64,
    /// Blocks with no good copy left (reads of them fail with EIO).
    pub unrecoverable: AtomicU64,
    /// Reads of a member file that failed with an I/O error.
    pub io_errors: AtomicU64,
}

/// A copy of [`Integrity`] for status output.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct IntegrityCounts {
    pub checksum_errors: u64,
    pub repaired: u64,
    pub unrecoverable: u64,
    pub io_errors: u64,
}

impl Integrity {
    pub fn counts(&self) -> IntegrityCounts {
        IntegrityCounts {
            checksum_errors: self.checksum_errors.load(Ordering::Relaxed),
            repaired: self.repaired.load(Ordering::Relaxed),
            unrecoverable: self.unrecoverable.load(Ordering::Relaxed),
            io_errors: self.io_errors.load(Ordering::Relaxed),
        }
    }
}

pub struct Pool {
    pub integrity: Integrity,
    /// The operational record: counters, last scrub, holds, events.
    pub info: info::PoolInfo,
    /// The newest label (members, config); rewritten by member changes and
    /// `set copies`.
    label: RwLock<Label>,
    /// Members present (some may have failed since: see `usable`); grows and
    /// shrinks with `device add/remove` while mounted.
    members: RwLock<Vec<Arc<Member>>>,
    /// Members the label lists that were missing at open (or since removed
    /// from the label: then dropped from here too).
    missing: RwLock<Vec<MemberEntry>>,
    /// Mountpoint written into new members' lock files.
    mountpoint: Mutex<Option<PathBuf>>,
    pub next_file_id: AtomicU64,
    /// Tag of new write-intent records: the generation of the next commit
    /// (see intent.rs); changed only while no write is in flight.
    pub intent_tag: AtomicU64,
    /// Open extent files (bounded; see fds.rs).
    pub fds: fds::FdCache,
    /// Members that missed commits, and the first generation each missed:
    /// written with every commit (see [`Pool::commit`]), read at open to tell a
    /// stale member from one that went its own way.
    behind: Mutex<meta::Behind>,
    /// Open even when members diverged (`mount --force`): the newest copy wins.
    pub force: std::sync::atomic::AtomicBool,
    /// Members that took commits of their own while the winning copy counted
    /// them as behind (opened with `force`): extent files there that no
    /// record references are quarantined, not removed.
    diverged: Mutex<Vec<u32>>,
    /// Members whose metadata copy did not open or load and was not rebuilt
    /// (opened without repair), with the reason: `status` names them.
    damaged_meta: Mutex<Vec<(u32, String)>>,
    /// Where every member file is read and written.
    storage: Arc<dyn Storage>,
    /// Members failed since the mount, and how many of those failures a
    /// durable commit has recorded (as members behind): until it has, a
    /// flush that wrote only the surviving copies is not durable (after a
    /// restart the stale copy could not be told from the good one).
    failures: AtomicU64,
    failures_recorded: AtomicU64,
}

/// Space of the pool as statfs reports it (bytes).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PoolSpace {
    pub size: u64,
    pub free: u64,
    pub avail: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub path: PathBuf,
    pub id: String,
    pub size: u64,
    pub used: u64,
    pub free: u64,
    pub health: String,
    pub stored_bytes: u64,
    pub extents: u64,
    /// Why the member is not ONLINE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub pool: String,
    pub state: String,
    pub mounted: bool,
    pub mountpoint: Option<PathBuf>,
    pub pid: Option<u32>,
    pub copies: u32,
    pub extent_size: u64,
    pub block_size: u32,
    pub members: Vec<MemberStatus>,
    pub size: u64,
    pub used: u64,
    pub free: u64,
    pub files: u64,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// Integrity events seen by the running daemon (zero when offline).
    #[serde(default)]
    pub integrity: IntegrityCounts,
    /// Logical bytes of extents with fewer usable copies than `copies` (but at
    /// least one), and with none (they read as EIO).
    #[serde(default)]
    pub degraded_bytes: u64,
    #[serde(default)]
    pub unavailable_bytes: u64,
    /// The last scrub, as recorded in the pool.
    #[serde(default)]
    pub last_scrub: Option<info::ScrubRecord>,
    /// The newest complete snapshot.
    #[serde(default)]
    pub newest_snapshot: Option<NewestSnapshot>,
    #[serde(default)]
    pub snapshots: u64,
    /// The last snapshot capture's speed.
    #[serde(default)]
    pub last_capture: Option<info::CaptureRecord>,
    /// Where the daemon logs (a file, or `journal`).
    #[serde(default)]
    pub log: Option<String>,
    /// [`PoolStatus::problems`] as of this status (filled by
    /// [`PoolStatus::finish`]).
    #[serde(default)]
    pub healthy: bool,
    #[serde(default)]
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NewestSnapshot {
    pub name: String,
    /// Seconds since the epoch.
    pub created: i64,
}

impl PoolStatus {
    /// What makes the pool unhealthy (empty: healthy): members not ONLINE,
    /// data with fewer copies than asked, a last scrub that left problems.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.members.iter().filter(|m| m.health != "ONLINE") {
            out.push(format!(
                "member {} is {}: {}",
                m.path.display(),
                m.health,
                m.reason.as_deref().unwrap_or("unknown reason")
            ));
        }
        if self.degraded_bytes > 0 {
            out.push(format!(
                "{} of data with fewer copies than asked",
                crate::util::human(self.degraded_bytes)
            ));
        }
        if self.unavailable_bytes > 0 {
            out.push(format!(
                "{} of data with no copy left (reads there fail)",
                crate::util::human(self.unavailable_bytes)
            ));
        }
        if let Some(s) = &self.last_scrub
            && s.result == "problems"
        {
            out.push(format!(
                "the last scrub left problems ({} unrecoverable block(s), {} read error(s)); see `vpool scrub`",
                s.unrecoverable, s.io_errors
            ));
        }
        out
    }

    pub fn healthy(&self) -> bool {
        self.problems().is_empty()
    }

    /// Fills `healthy` and `problems` from the rest.
    pub fn finish(mut self) -> Self {
        self.problems = self.problems();
        self.healthy = self.problems.is_empty();
        self
    }
}

pub(crate) fn canonical_dir(s: &dyn Storage, dir: &Path) -> Result<PathBuf> {
    let md = s.stat(dir).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::DirectoryMissing(dir.to_path_buf())
        } else {
            Error::io(dir, e)
        }
    })?;
    if !md.is_dir {
        return Err(Error::NotADirectory(dir.to_path_buf()));
    }
    s.canonicalize(dir).map_err(|e| Error::io(dir, e))
}

/// The checks every directory passes before it becomes a member (by `create`
/// or `device add`), beyond carrying no other pool's label: not inside another
/// member, no unlabelled metadata to overwrite, not on a FUSE filesystem.
pub(crate) fn admit_member_dir(s: &dyn Storage, dir: &Path) -> Result<()> {
    if let Some(owner) = dir.ancestors().skip(1).find(|a| has_label(s, a)) {
        return Err(Error::NestedMember {
            inner: dir.to_path_buf(),
            outer: owner.to_path_buf(),
        });
    }
    if s.exists(&dir.join(layout::META_FILE)) {
        return Err(Error::Invalid(format!(
            "{} holds vpool metadata without a label; refusing to overwrite it",
            dir.display()
        )));
    }
    if s.on_fuse(dir).map_err(|e| Error::io(dir, e))? {
        return Err(Error::MemberOnFuse(dir.to_path_buf()));
    }
    Ok(())
}

/// A file found in a member's data directory.
pub struct ExtentFileEntry {
    pub name: String,
    /// `(ino, index, file_id)` when the name is an extent file name (or, with
    /// `sum`, a sum file name).
    pub parsed: Option<(u64, u64, u64)>,
    /// A sum file (`<extent file name>.sum`).
    pub sum: bool,
    /// Allocated bytes.
    pub bytes: u64,
}

fn root_record(now: Timestamp) -> InodeRecord {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    InodeRecord {
        kind: NodeKind::Dir,
        mode: 0o755,
        uid,
        gid,
        nlink: 2,
        size: 0,
        atime: now,
        mtime: now,
        ctime: now,
        rdev: 0,
        parent: ROOT_INO,
        target: Vec::new(),
        xattrs: BTreeMap::new(),
        extents: Vec::new(),
    }
}

/// Reads the mountpoint and pid a running daemon wrote into a member's lock file.
pub fn read_lock_info(st: &dyn Storage, dir: &Path) -> Option<(u32, PathBuf)> {
    let b = st.read(&dir.join(LOCK_FILE)).ok()?;
    layout::parse_lock_info(&b)
}

pub(crate) fn try_lock(s: &dyn Storage, dir: &Path, pool: &Uuid) -> Result<Box<dyn LockGuard>> {
    let p = dir.join(LOCK_FILE);
    match s.try_lock(&p).map_err(|e| Error::io(&p, e))? {
        Some(g) => Ok(g),
        None => {
            let at = match read_lock_info(s, dir) {
                Some((pid, mp)) => format!(" at {} by pid {pid}", mp.display()),
                None => String::new(),
            };
            Err(Error::AlreadyMounted {
                pool: pool.to_string(),
                path: dir.to_path_buf(),
                at,
            })
        }
    }
}

/// Takes the damaged inode records of `best` from another metadata image of
/// the same generation (`others`) where one has it; the rest stay in
/// `best.corrupt`. (A damaged record is absent from its own image's inodes.)
fn heal_inodes(best: &mut MetaImage, others: &[&MetaImage]) {
    for (ino, why) in std::mem::take(&mut best.corrupt) {
        match others.iter().find_map(|o| o.inodes.get(&ino).cloned()) {
            Some(r) => {
                tracing::warn!(ino, reason = %why, "inode record damaged on one member; using another copy");
                best.inodes.insert(ino, r);
            }
            None => best.corrupt.push((ino, why)),
        }
    }
}

/// Replaces the enveloped blobs of `map` that fail their checksum with a good
/// copy of the same key from another metadata image (`others`).
fn heal_blobs<K: Ord + Copy>(
    map: &mut BTreeMap<K, Vec<u8>>,
    others: &[&MetaImage],
    table: impl Fn(&MetaImage) -> &BTreeMap<K, Vec<u8>>,
) {
    let bad: Vec<K> = map
        .iter()
        .filter(|(_, b)| meta::check_blob(b).is_err())
        .map(|(k, _)| *k)
        .collect();
    for k in bad {
        if let Some(good) = others
            .iter()
            .filter_map(|o| table(o).get(&k))
            .find(|b| meta::check_blob(b).is_ok())
        {
            map.insert(k, good.clone());
        }
    }
}

impl Pool {
    /// Creates a pool over `dirs`. Validates everything before writing anything;
    /// writes each member's metadata before its label, so a directory with a label
    /// is always a complete member.
    pub fn create(dirs: &[PathBuf], opts: CreateOptions) -> Result<Label> {
        Self::create_in(&crate::storage::real::RealStorage, dirs, opts)
    }

    /// [`Pool::create`] on the given storage.
    pub fn create_in(s: &dyn Storage, dirs: &[PathBuf], opts: CreateOptions) -> Result<Label> {
        if dirs.is_empty() {
            return Err(Error::Invalid(
                "at least one member directory is needed".into(),
            ));
        }
        if opts.copies == 0 {
            return Err(Error::Invalid("copies must be at least 1".into()));
        }
        if opts.copies as usize > dirs.len() {
            return Err(Error::TooManyCopies {
                copies: opts.copies,
                members: dirs.len(),
            });
        }
        // Block and extent size: the bounds every reader of the label checks.
        PoolConfig {
            copies: opts.copies,
            block_size: opts.block_size,
            extent_size: opts.extent_size,
        }
        .validate(dirs.len())
        .map_err(Error::Invalid)?;
        let mut canon: Vec<PathBuf> = Vec::new();
        for d in dirs {
            let c = canonical_dir(s, d)?;
            if canon.contains(&c) {
                return Err(Error::DirectoryGivenTwice(d.clone()));
            }
            if has_label(s, &c) {
                let pool = match read_label(s, &c) {
                    Ok(l) => l.pool.to_string(),
                    Err(_) => "(unreadable label)".to_string(),
                };
                return Err(Error::AlreadyInPool { path: c, pool });
            }
            admit_member_dir(s, &c)?;
            canon.push(c);
        }
        for a in &canon {
            for b in &canon {
                if a != b && a.starts_with(b) {
                    return Err(Error::NestedMember {
                        inner: a.clone(),
                        outer: b.clone(),
                    });
                }
            }
        }
        let pool = Uuid::new_v4();
        let members: Vec<MemberEntry> = canon
            .iter()
            .enumerate()
            .map(|(i, p)| MemberEntry {
                uuid: Uuid::new_v4(),
                id: i as u32,
                path: p.clone(),
            })
            .collect();
        let mut image = MetaImage {
            generation: 1,
            next_ino: ROOT_INO + 1,
            next_file_id: 1,
            ..Default::default()
        };
        image
            .inodes
            .insert(ROOT_INO, root_record(Timestamp::at(s.now())));
        let config = PoolConfig {
            copies: opts.copies,
            block_size: opts.block_size,
            extent_size: opts.extent_size,
        };
        let mut label = Label {
            pool,
            member: members[0].uuid,
            generation: 1,
            created: s.now().0,
            config,
            members: members.clone(),
        };
        let mut done: Vec<&PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            for m in &members {
                s.make_private(&m.path).map_err(|e| Error::io(&m.path, e))?;
                let data = m.path.join(DATA_DIR);
                crate::storage::create_dir_all(s, &data).map_err(|e| Error::io(&data, e))?;
                done.push(&m.path);
                MemberStore::create(s, &m.path, &image)?;
                s.sync_dir(&m.path).map_err(|e| Error::io(&m.path, e))?;
            }
            for m in &members {
                label.member = m.uuid;
                write_label(s, &m.path, &label)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for p in done {
                let _ = s.remove_file(&p.join(layout::META_FILE));
                let _ = s.remove_dir(&p.join(DATA_DIR));
                for f in layout::LABEL_FILES {
                    let _ = s.remove_file(&p.join(f));
                }
            }
            return Err(e);
        }
        label.member = members[0].uuid;
        Ok(label)
    }

    /// Opens the pool that `dir` belongs to and locks every member (one daemon,
    /// `check` or offline `status` at a time). A member the label lists that is
    /// missing leaves the pool DEGRADED (listed in `missing`); one that carries
    /// another pool's label refuses the open.
    pub fn open(dir: &Path) -> Result<Pool> {
        Self::open_in(crate::storage::real(), dir)
    }

    /// [`Pool::open`] on the given storage.
    pub fn open_in(storage: Arc<dyn Storage>, dir: &Path) -> Result<Pool> {
        let s = &*storage;
        let dir = canonical_dir(s, dir)?;
        let first = read_label(s, &dir)?;
        let mut label = first.clone();
        let mut found: Vec<(MemberEntry, PathBuf, Label)> = Vec::new();
        let mut missing: Vec<MemberEntry> = Vec::new();
        // Members are taken from the newest label found so far: a label that
        // is older than another member's (its directory was missing while a
        // member was added) does not hide the members added since.
        let mut seen: HashSet<Uuid> = HashSet::new();
        let mut mismatched: Vec<(MemberEntry, PathBuf, Label)> = Vec::new();
        loop {
            let todo: Vec<MemberEntry> = label
                .members
                .iter()
                .filter(|e| !seen.contains(&e.uuid))
                .cloned()
                .collect();
            if todo.is_empty() {
                break;
            }
            for entry in todo {
                seen.insert(entry.uuid);
                let path = if entry.uuid == first.member {
                    dir.clone()
                } else {
                    entry.path.clone()
                };
                let l = match read_label(s, &path) {
                    Ok(l) => l,
                    Err(e) => {
                        let why = match &e {
                            Error::NotAMember(_) | Error::DirectoryMissing(_) => e.to_string(),
                            Error::Io { source, .. } if is_device_error(source) => e.to_string(),
                            _ => return Err(e),
                        };
                        tracing::error!(
                            member = %path.display(),
                            id = %entry.uuid,
                            reason = %why,
                            "member missing: the pool is DEGRADED"
                        );
                        missing.push(entry.clone());
                        continue;
                    }
                };
                if l.pool != first.pool {
                    return Err(Error::ForeignMember {
                        path,
                        found: format!("pool {} member {}", l.pool, l.member),
                        expected: format!("pool {} member {}", first.pool, entry.uuid),
                    });
                }
                if l.generation > label.generation {
                    label = l.clone();
                }
                if l.member != entry.uuid {
                    // Another member of this pool lives there now (removed, then
                    // added again): a conflict only if the newest label still
                    // lists the one expected (checked below); its own label
                    // joined the candidates for the newest above.
                    mismatched.push((entry.clone(), path, l));
                    continue;
                }
                found.push((entry.clone(), path, l));
            }
        }
        // Members the newest label no longer lists (removed while another
        // member's label lagged) are not opened.
        found.retain(|(e, _, _)| label.members.iter().any(|m| m.uuid == e.uuid));
        if let Some((entry, path, l)) = mismatched
            .into_iter()
            .find(|(e, _, _)| label.members.iter().any(|m| m.uuid == e.uuid))
        {
            return Err(Error::ForeignMember {
                path,
                found: format!("pool {} member {}", l.pool, l.member),
                expected: format!("pool {} member {}", first.pool, entry.uuid),
            });
        }
        missing.retain(|e| label.members.iter().any(|m| m.uuid == e.uuid));
        if !found.iter().any(|(e, _, _)| e.uuid == first.member) {
            return Err(Error::Invalid(format!(
                "{} was removed from pool {}; mount it through one of its members",
                dir.display(),
                first.pool
            )));
        }
        let mut members = Vec::new();
        for (entry, path, _) in found {
            let lock = try_lock(s, &path, &label.pool)?;
            let md = s.stat(&path).map_err(|e| Error::io(&path, e))?;
            members.push(Arc::new(Member::new(
                storage.clone(),
                MemberEntry {
                    path: path.clone(),
                    ..entry
                },
                lock,
                &md,
                None,
            )));
        }
        Ok(Pool {
            label: RwLock::new(label),
            members: RwLock::new(members),
            missing: RwLock::new(missing),
            mountpoint: Mutex::new(None),
            next_file_id: AtomicU64::new(1),
            intent_tag: AtomicU64::new(1),
            integrity: Integrity::default(),
            info: info::PoolInfo::default(),
            fds: fds::FdCache::for_limit(fds::raise_fd_limit()),
            behind: Mutex::new(meta::Behind::new()),
            force: std::sync::atomic::AtomicBool::new(false),
            diverged: Mutex::new(Vec::new()),
            damaged_meta: Mutex::new(Vec::new()),
            storage,
            failures: AtomicU64::new(0),
            failures_recorded: AtomicU64::new(0),
        })
    }

    /// The storage every member file goes through.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// Records an event in the pool's history (and tells its listeners).
    pub fn emit(
        &self,
        kind: &str,
        severity: info::Severity,
        member: Option<&Path>,
        message: impl Into<String>,
    ) {
        let time = self.storage.now().0;
        let member = member.map(|m| m.display().to_string());
        self.info.emit(time, kind, severity, member, message.into());
    }

    /// Whether the operational record has changes the next commit must
    /// write (counters moved, or values set).
    pub fn info_pending(&self) -> bool {
        let now = self.integrity.counts();
        let was = self.info.integrity();
        self.info.has_changes()
            || (
                now.checksum_errors,
                now.repaired,
                now.unrecoverable,
                now.io_errors,
            ) != (
                was.checksum_errors,
                was.repaired,
                was.unrecoverable,
                was.io_errors,
            )
    }

    /// The operational record's changes for the next commit.
    pub fn take_info_changes(&self) -> Vec<meta::BlobChange<String>> {
        self.info.note_integrity(self.integrity.counts());
        self.info.take_changes()
    }

    /// A shared reference to [`Pool::storage`].
    pub fn storage_arc(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// Loads the metadata: opens every member's store and takes the copy with the
    /// highest generation. Records of that copy that fail their checksum are taken
    /// from another copy of the same generation; if no good copy exists the open
    /// fails (so recovery never mistakes the files of an unreadable inode for
    /// orphans). With `repair`, lagging or damaged copies are rewritten from the
    /// result and labels with stale paths are rewritten.
    pub fn load_metadata(&mut self, repair: bool) -> Result<MetaImage> {
        let members = self.members();
        // A store that does not open or load is one damaged copy among several:
        // the pool opens from the others, and (with `repair`) it is rebuilt.
        let mut loaded: Vec<Option<MetaImage>> = Vec::with_capacity(members.len());
        let mut damaged = Vec::new();
        for m in &members {
            match MemberStore::open(self.storage(), &m.dir)
                .and_then(|s| s.load().map(|img| (s, img)))
            {
                Ok((s, img)) => {
                    loaded.push(Some(img));
                    *m.store.lock() = Some(s);
                }
                Err(e) => {
                    tracing::error!(member = %m.dir.display(), error = %e, "metadata copy does not open: it is damaged");
                    damaged.push((m.clone(), e));
                    loaded.push(None);
                }
            }
        }
        let Some(best_i) = (0..loaded.len())
            .filter(|i| loaded[*i].is_some())
            .max_by_key(|i| loaded[*i].as_ref().map_or(0, |g| g.generation))
        else {
            return Err(match damaged.into_iter().next() {
                Some((_, e)) => Error::Other(format!(
                    "no member holds a readable copy of the metadata ({e}); \
                     nothing was changed (see `vpool check`)"
                )),
                None => Error::Other("pool has no members".into()),
            });
        };
        let mut img = loaded[best_i].clone().unwrap_or_default();
        // A member the newest copy counts as behind since generation `g`, whose
        // own copy went on to `g` or later, took commits of its own while cut
        // off from the others: both sides hold changes the other lacks.
        let mut split = Vec::new();
        for (m, have) in members.iter().zip(&loaded) {
            // A copy that lists its own member as behind was rewritten from
            // another's image (at mount or by scrub), not committed by its
            // member: a member a commit reaches is in step, never behind.
            if let (Some(have), Some(g)) = (have, img.behind.get(&m.entry.uuid))
                && have.generation >= *g
                && !have.behind.contains_key(&m.entry.uuid)
            {
                split.push((m.clone(), have.generation, *g));
            }
        }
        if !split.is_empty() {
            let desc: Vec<String> = split
                .iter()
                .map(|(m, have, g)| {
                    format!(
                        "{} took commits up to generation {have} on its own, after the others \
                         counted it missing at generation {g}",
                        m.dir.display()
                    )
                })
                .collect();
            if !self.force.load(Ordering::Acquire) {
                return Err(Error::MembersDiverged(format!(
                    "{}; the newest copy is on {} (generation {}). Mounting would lose the \
                     other side's changes: mount the side you want alone, copy out what you \
                     need, or mount with --force to keep the newest copy (extent files only \
                     the other side references are moved to quarantine/, not deleted)",
                    desc.join("; "),
                    members[best_i].dir.display(),
                    img.generation
                )));
            }
            tracing::warn!(
                "members diverged, opened with --force: {}; the newest copy wins",
                desc.join("; ")
            );
            *self.diverged.lock() = split.iter().map(|(m, _, _)| m.entry.id).collect();
        }
        let same_gen: Vec<&MetaImage> = loaded
            .iter()
            .flatten()
            .filter(|o| o.generation == img.generation)
            .collect();
        heal_inodes(&mut img, &same_gen);
        if !img.corrupt.is_empty() {
            let list: Vec<String> = img
                .corrupt
                .iter()
                .map(|(i, w)| format!("inode {i} ({w})"))
                .collect();
            return Err(Error::CorruptMetadata {
                path: members[best_i].dir.join(layout::META_FILE),
                reason: format!(
                    "{} have no readable copy on any member; refusing to open the pool so that nothing is removed (run `vpool check`)",
                    list.join(", ")
                ),
            });
        }
        if repair {
            for (m, e) in &damaged {
                let path = m.dir.join(layout::META_FILE);
                let aside = m.dir.join(layout::META_DAMAGED_FILE);
                tracing::warn!(member = %m.dir.display(), error = %e, aside = %aside.display(), "rebuilding a damaged metadata copy from the newest good copy");
                let s = self.storage();
                s.rename(&path, &aside).or_else(|e| match e.kind() {
                    io::ErrorKind::NotFound => Ok(()),
                    _ => Err(Error::io(&path, e)),
                })?;
                *m.store.lock() = Some(MemberStore::create(s, &m.dir, &img)?);
                s.sync_dir(&m.dir).map_err(|e| Error::io(&m.dir, e))?;
            }
            damaged.clear();
            for (m, have) in members.iter().zip(&loaded) {
                let Some(have) = have else { continue };
                if have.generation == img.generation && have.corrupt.is_empty() {
                    continue;
                }
                if let Some(s) = m.store.lock().as_ref() {
                    tracing::warn!(
                        member = %m.dir.display(),
                        have = have.generation,
                        newest = img.generation,
                        "metadata copy lags or is damaged; rewriting it from the newest copy"
                    );
                    s.replace_all(&img)?;
                }
            }
            self.refresh_label_paths()?;
        }
        *self.damaged_meta.lock() = damaged
            .iter()
            .map(|(m, e)| (m.entry.id, e.to_string()))
            .collect();
        self.after_load(&img);
        Ok(img)
    }

    fn after_load(&self, img: &MetaImage) {
        *self.behind.lock() = img.behind.clone();
        self.info.load(&img.info);
        let base = self.info.integrity();
        self.integrity
            .checksum_errors
            .store(base.checksum_errors, Ordering::Relaxed);
        self.integrity
            .repaired
            .store(base.repaired, Ordering::Relaxed);
        self.integrity
            .unrecoverable
            .store(base.unrecoverable, Ordering::Relaxed);
        self.integrity
            .io_errors
            .store(base.io_errors, Ordering::Relaxed);
        let mut max_fid = img.next_file_id;
        for rec in img.inodes.values() {
            for e in &rec.extents {
                max_fid = max_fid.max(e.file_id + 1);
                for id in &e.members {
                    if let Some(m) = self.member(*id) {
                        m.extents.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.next_file_id.store(max_fid, Ordering::SeqCst);
    }

    /// Rewrites labels when a member was found at another path than recorded.
    fn refresh_label_paths(&mut self) -> Result<()> {
        let members = self.members();
        let label = self.label();
        let stale = members.iter().any(|m| {
            label
                .members
                .iter()
                .any(|e| e.uuid == m.entry.uuid && e.path != m.dir)
        });
        if !stale {
            return Ok(());
        }
        let mut l = label;
        for e in &mut l.members {
            if let Some(m) = members.iter().find(|m| m.entry.uuid == e.uuid) {
                e.path = m.dir.clone();
            }
        }
        self.write_labels(l)
    }

    /// Writes `l` (generation bumped) to every present member and makes it the
    /// pool's label. Members the new label no longer lists are not written.
    ///
    /// Once one member holds the new label it is the newest on disk, which
    /// the next open follows: from then on it is the pool's label in memory
    /// too, whatever happens to the other writes (a member whose write fails
    /// with an I/O error is failed; its older label loses at the next open).
    /// Fails only when no member took it.
    pub fn write_labels(&self, mut l: Label) -> Result<()> {
        l.generation = self.label.read().generation.max(l.generation) + 1;
        let mut wrote = 0;
        let mut first_err = None;
        for m in self.members().iter().filter(|m| !m.is_failed()) {
            if !l.members.iter().any(|e| e.uuid == m.entry.uuid) {
                continue;
            }
            l.member = m.entry.uuid;
            match write_label(self.storage(), &m.dir, &l) {
                Ok(()) => wrote += 1,
                Err(e) => {
                    tracing::error!(member = %m.dir.display(), error = %e, "cannot write the label");
                    if let Error::Io { source, .. } = &e {
                        self.check_member(m.entry.id, source);
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if wrote == 0 => Err(e),
            _ => {
                *self.label.write() = l;
                Ok(())
            }
        }
    }

    /// A copy of the current label.
    pub fn label(&self) -> Label {
        self.label.read().clone()
    }

    /// The pool's identity.
    pub fn pool_id(&self) -> Uuid {
        self.label.read().pool
    }

    /// The members present now.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.members.read().clone()
    }

    /// Members the label lists that are not present.
    pub fn missing(&self) -> Vec<MemberEntry> {
        self.missing.read().clone()
    }

    /// Verifies every member's metadata copy (record checksums, generation) and
    /// rewrites a damaged or lagging copy from the newest good one, a damaged
    /// record taken from another copy of the same generation. The caller holds
    /// off commits. Returns what was found and how many copies were rewritten.
    pub fn scrub_metadata(&self) -> (Vec<String>, u64) {
        let images = self.member_images();
        let mut found = Vec::new();
        let bad_blobs = |img: &MetaImage| -> usize {
            img.snapshots
                .values()
                .chain(img.cbt.values())
                .filter(|b| meta::check_blob(b).is_err())
                .count()
        };
        let Some(best_i) = (0..images.len())
            .filter(|i| images[*i].is_ok())
            .max_by_key(|i| images[*i].as_ref().map(|m| m.generation).unwrap_or(0))
        else {
            return (vec!["no member has a readable metadata copy".into()], 0);
        };
        let Ok(mut best) = images[best_i].as_ref().cloned() else {
            return (found, 0);
        };
        let same_gen: Vec<&MetaImage> = images
            .iter()
            .flatten()
            .filter(|o| o.generation == best.generation)
            .collect();
        heal_inodes(&mut best, &same_gen);
        heal_blobs(&mut best.snapshots, &same_gen, |o| &o.snapshots);
        heal_blobs(&mut best.cbt, &same_gen, |o| &o.cbt);
        let best_ok = best.corrupt.is_empty() && bad_blobs(&best) == 0;
        if !best_ok {
            found.push(format!(
                "{} damaged metadata records have no good copy on any member",
                best.corrupt.len() + bad_blobs(&best)
            ));
        }
        let mut rewritten = 0;
        for (m, img) in self.members().iter().zip(&images) {
            if m.is_failed() {
                // No I/O goes to a failed member.
                continue;
            }
            let why = match img {
                Err(e) => Some(format!("unreadable ({e})")),
                Ok(i) if i.generation != best.generation => Some(format!(
                    "generation {} lags the newest {}",
                    i.generation, best.generation
                )),
                Ok(i) if !i.corrupt.is_empty() || bad_blobs(i) > 0 => Some(format!(
                    "{} damaged records",
                    i.corrupt.len() + bad_blobs(i)
                )),
                Ok(_) => None,
            };
            let Some(why) = why else { continue };
            found.push(format!("{}: metadata copy {why}", m.dir.display()));
            if !best_ok {
                continue;
            }
            let r = match m.store.lock().as_ref() {
                Some(s) => s.replace_all(&best),
                None => continue,
            };
            match r {
                Ok(()) => {
                    rewritten += 1;
                    tracing::warn!(member = %m.dir.display(), reason = %why, "metadata copy rewritten from the newest good copy");
                }
                Err(e) => found.push(format!(
                    "{}: cannot rewrite the metadata copy: {e}",
                    m.dir.display()
                )),
            }
        }
        (found, rewritten)
    }

    /// Every member's metadata copy, loaded through the open store when there is one.
    pub fn member_images(&self) -> Vec<Result<MetaImage>> {
        self.members()
            .iter()
            .map(|m| match m.store.lock().as_ref() {
                Some(s) => s.load(),
                None => MemberStore::open(self.storage(), &m.dir).and_then(|s| s.load()),
            })
            .collect()
    }

    /// Members whose directory group or others may enter, with its mode: their
    /// files are private, but a member made by hand or an older vpool may
    /// still hold files they can read.
    pub fn open_members(&self) -> Vec<(PathBuf, u32)> {
        self.members()
            .iter()
            .filter_map(|m| {
                let mode = self.storage.stat(&m.dir).ok()?.mode;
                (mode & 0o077 != 0).then(|| (m.dir.clone(), mode & 0o7777))
            })
            .collect()
    }

    pub fn config(&self) -> PoolConfig {
        self.label.read().config
    }

    pub fn member(&self, id: u32) -> Option<Arc<Member>> {
        self.members
            .read()
            .iter()
            .find(|m| m.entry.id == id)
            .cloned()
    }

    /// Whether I/O may go to member `id` (present at open and not failed since).
    pub fn usable(&self, id: u32) -> bool {
        self.member(id).is_some_and(|m| !m.is_failed())
    }

    /// Marks member `id` failed: no more I/O goes to it; the pool is DEGRADED.
    pub fn fail_member(&self, id: u32, why: &str) {
        let Some(m) = self.member(id) else { return };
        if !m.failed.swap(true, Ordering::AcqRel) {
            self.failures.fetch_add(1, Ordering::AcqRel);
            *m.fail_reason.lock() = Some(why.to_string());
            tracing::error!(member = %m.dir.display(), reason = why, "member FAILED: the pool is DEGRADED; I/O goes to the other copies");
            self.emit(
                "member_failed",
                info::Severity::Error,
                Some(&m.dir),
                format!("member failed ({why}): the pool is DEGRADED; replace it with `vpool device replace`"),
            );
        }
    }

    /// After an I/O error on member `id`: fails the member if its device or
    /// directory is at fault. Returns whether it is failed now.
    pub fn check_member(&self, id: u32, e: &io::Error) -> bool {
        let Some(m) = self.member(id) else {
            return true;
        };
        if self.probe_failed(&m) {
            return true;
        }
        if e.raw_os_error() == Some(libc::EIO) {
            self.fail_member(id, &format!("I/O error: {e}"));
            return true;
        }
        false
    }

    /// Fails `m` if its directory no longer probes; whether it is failed.
    fn probe_failed(&self, m: &Member) -> bool {
        if m.is_failed() {
            return true;
        }
        match m.probe() {
            Err(why) => {
                self.fail_member(m.entry.id, &why);
                true
            }
            Ok(()) => false,
        }
    }

    /// [`Pool::check_member`] for an error of the volume layer: a missing
    /// extent file counts when the member's directory is gone.
    pub fn check_member_fs(&self, id: u32, e: &FsError) -> bool {
        match e {
            FsError::Io(io) => self.check_member(id, io),
            FsError::Corrupt(_) => self.member(id).is_none_or(|m| self.probe_failed(&m)),
            _ => false,
        }
    }

    /// Probes every member that has not failed (the daemon does so
    /// periodically): a directory deleted or unmounted under it fails it.
    pub fn probe_members(&self) {
        for m in self.members().iter() {
            self.probe_failed(m);
        }
    }

    /// Members present and not failed.
    pub fn usable_count(&self) -> usize {
        self.members
            .read()
            .iter()
            .filter(|m| !m.is_failed())
            .count()
    }

    /// Whether some member is missing or failed.
    pub fn degraded(&self) -> bool {
        !self.missing.read().is_empty() || self.members.read().iter().any(|m| m.is_failed())
    }

    pub fn extent_path(&self, member: u32, ino: u64, index: u64, file_id: u64) -> Option<PathBuf> {
        self.member(member)
            .map(|m| m.data_dir.join(extent_file_name(ino, index, file_id)))
    }

    /// Records in every member's lock file who holds the pool (pid, mountpoint).
    pub fn write_lock_info(&self, mountpoint: &Path) -> Result<()> {
        *self.mountpoint.lock() = Some(mountpoint.to_path_buf());
        for m in self.members().iter() {
            m.write_lock_info(mountpoint)?;
        }
        Ok(())
    }

    pub fn clear_lock_info(&self) {
        for m in self.members().iter() {
            // Never created here: a failed member's directory may be a
            // stranger now (a disk swapped in its place).
            if m.is_failed() {
                continue;
            }
            let _ = self.storage.open(&m.dir.join(LOCK_FILE), OpenMode::EMPTY);
        }
    }

    /// Chooses the member for a new extent copy: the most available space after the
    /// reserve, ties broken by the fewest extents. `exclude` holds members that
    /// already have a copy.
    /// Only members with at least `need` bytes available are considered: an
    /// extent placed on a member that cannot take the write that asked for it
    /// would stay there, refusing writes, while others have room.
    pub fn place(&self, exclude: &[u32], need: u64) -> FsResult<u32> {
        let mut best: Option<(u64, u64, u32)> = None;
        // Members on one filesystem share its free space: read it once per device so
        // that they tie and the extent count decides between them.
        let mut per_dev: Vec<(u64, u64)> = Vec::new();
        for m in self.members().iter() {
            if exclude.contains(&m.entry.id) || m.is_failed() || m.draining.load(Ordering::Acquire)
            {
                continue;
            }
            let avail = match per_dev.iter().find(|(d, _)| *d == m.dev) {
                Some((_, a)) => *a,
                None => match m.available() {
                    Ok(a) => {
                        per_dev.push((m.dev, a));
                        a
                    }
                    Err(e) => {
                        tracing::warn!(member = %m.dir.display(), error = %e, "cannot read free space");
                        continue;
                    }
                },
            };
            if avail == 0 || avail < need {
                continue;
            }
            let count = m.extents.load(Ordering::Relaxed);
            let better = match best {
                None => true,
                Some((ba, bc, _)) => avail > ba || (avail == ba && count < bc),
            };
            if better {
                best = Some((avail, count, m.entry.id));
            }
        }
        best.map(|(_, _, id)| id).ok_or_else(|| {
            tracing::debug!(?per_dev, "no member has room for a new extent");
            FsError::NoSpace
        })
    }

    /// Creates the member files of a new extent: one copy per `copies`, each on a
    /// distinct member chosen by [`Pool::place`], all named with one fresh file id.
    /// Returns the copies as `(member, file)` and the file id.
    pub fn create_extent_files(
        &self,
        ino: u64,
        index: u64,
        need: u64,
    ) -> FsResult<(u64, Vec<(u32, Handle)>)> {
        let copies = self.config().copies.max(1) as usize;
        let cleanup = |made: &[(u32, Handle)], fid: u64| {
            for (m, _) in made {
                if let Some(p) = self.extent_path(*m, ino, index, fid) {
                    let _ = self.storage.remove_file(&p);
                }
            }
        };
        'fid: loop {
            let fid = self.next_file_id.fetch_add(1, Ordering::SeqCst);
            let mut made: Vec<(u32, Handle)> = Vec::with_capacity(copies);
            while made.len() < copies {
                let exclude: Vec<u32> = made.iter().map(|(m, _)| *m).collect();
                let member_id = match self.place(&exclude, need) {
                    Ok(id) => id,
                    // Degraded: fewer usable members than copies. The extent gets
                    // the copies it can (status counts it as degraded).
                    Err(FsError::NoSpace) if !made.is_empty() && self.usable_count() < copies => {
                        break;
                    }
                    Err(e) => {
                        cleanup(&made, fid);
                        return Err(e);
                    }
                };
                let Some(m) = self.member(member_id) else {
                    cleanup(&made, fid);
                    return Err(FsError::NoSpace);
                };
                let p = m.data_dir.join(extent_file_name(ino, index, fid));
                match self.storage.open(&p, OpenMode::NEW) {
                    Ok(f) => made.push((member_id, f)),
                    // A leftover of a crash (never published): take the next id.
                    Err(io) if io.kind() == io::ErrorKind::AlreadyExists => {
                        cleanup(&made, fid);
                        continue 'fid;
                    }
                    Err(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                        cleanup(&made, fid);
                        return Err(FsError::NoSpace);
                    }
                    // A member failing under us: place on the others.
                    Err(io) if self.check_member(member_id, &io) => {}
                    Err(io) => {
                        cleanup(&made, fid);
                        return Err(FsError::Io(io));
                    }
                }
            }
            for (m, _) in &made {
                if let Some(m) = self.member(*m) {
                    m.extents.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok((fid, made));
        }
    }

    /// The open file of an extent copy, from the descriptor cache.
    pub fn extent_file(&self, member: u32, ino: u64, index: u64, file_id: u64) -> FsResult<Handle> {
        self.fds.get_or_open((member, ino, index, file_id), || {
            self.open_extent_file(member, ino, index, file_id)
        })
    }

    pub fn open_extent_file(
        &self,
        member: u32,
        ino: u64,
        index: u64,
        file_id: u64,
    ) -> FsResult<Handle> {
        let p = self
            .extent_path(member, ino, index, file_id)
            .ok_or_else(|| FsError::Corrupt(format!("extent on unknown member {member}")))?;
        match self.storage.open(&p, OpenMode::WRITE) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FsError::Corrupt(format!(
                "extent file {} is missing",
                p.display()
            ))),
            Err(e) => Err(FsError::Io(e)),
        }
    }

    /// Path of the sum file of an extent copy.
    pub fn sum_path(&self, member: u32, ino: u64, index: u64, file_id: u64) -> Option<PathBuf> {
        self.member(member)
            .map(|m| m.data_dir.join(sum_file_name(ino, index, file_id)))
    }

    /// Moves extent files and their sum files into `quarantine/` of their
    /// member (files of a diverged member that the winning copy does not
    /// reference: kept for inspection, never deleted by vpool).
    pub fn quarantine_extent_files(&self, files: &[(u32, u64, u64, u64)]) {
        for (member, ino, index, fid) in files {
            self.fds.forget(&(*member, *ino, *index, *fid));
            let Some(m) = self.member(*member) else {
                continue;
            };
            let q = m.dir.join(QUARANTINE_DIR);
            if let Err(e) = crate::storage::create_dir_all(self.storage(), &q) {
                tracing::error!(dir = %q.display(), error = %e, "cannot create quarantine directory; files left in place");
                continue;
            }
            for name in [
                extent_file_name(*ino, *index, *fid),
                sum_file_name(*ino, *index, *fid),
            ] {
                let from = m.data_dir.join(&name);
                match self.storage.rename(&from, &q.join(&name)) {
                    Ok(()) => {
                        tracing::warn!(file = %from.display(), to = %q.display(), "extent file of a diverged member quarantined")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(file = %from.display(), error = %e, "cannot quarantine")
                    }
                }
            }
            let _ = self.storage.sync_dir(&q);
            let _ = self.storage.sync_dir(&m.data_dir);
        }
    }

    /// Removes extent files and their sum files (after the commit that dropped
    /// them is durable).
    pub fn remove_extent_files(&self, files: &[(u32, u64, u64, u64)]) {
        for (member, ino, index, fid) in files {
            self.fds.forget(&(*member, *ino, *index, *fid));
            if let Some(p) = self.sum_path(*member, *ino, *index, *fid) {
                match self.storage.remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot remove sum file")
                    }
                }
            }
            if let Some(p) = self.extent_path(*member, *ino, *index, *fid) {
                match self.storage.remove_file(&p) {
                    Ok(()) => {
                        if let Some(m) = self.member(*member) {
                            m.extents.fetch_sub(1, Ordering::Relaxed);
                            m.invalidate_space();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot remove extent file")
                    }
                }
            }
        }
    }

    /// Records, durably on each listed member, that extent `(ino, index)` is about
    /// to change (see intent.rs). Returns the tag used.
    pub fn log_intent(&self, members: &[u32], ino: u64, index: u64) -> io::Result<u64> {
        let tag = self.intent_tag.load(Ordering::Acquire);
        let mut logged = 0;
        let mut last_err = None;
        for id in members {
            let Some(m) = self.member(*id).filter(|m| !m.is_failed()) else {
                continue;
            };
            match m.intent.append(tag, ino, index) {
                Ok(()) => logged += 1,
                // The copy on a failing member is not written either.
                Err(e) if self.check_member(*id, &e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        if logged == 0 {
            return Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(tag)
    }

    /// Logs, durably, intent records under `tag` for many extents at once:
    /// `(members, ino, index)` each (see `Volume::hot_extents`).
    pub fn prelog_intents(&self, tag: u64, items: &[(Vec<u32>, u64, u64)]) -> io::Result<()> {
        let mut per: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for (members, ino, index) in items {
            for m in members {
                per.entry(*m).or_default().push((*ino, *index));
            }
        }
        type Work = (Arc<Member>, Vec<(u64, u64)>);
        let members: Vec<Work> = per
            .into_iter()
            .filter_map(|(id, v)| self.member(id).filter(|m| !m.is_failed()).map(|m| (m, v)))
            .collect();
        self.per_member(
            &members,
            |(m, v)| m.intent.append_many(tag, v),
            || Err(io::Error::other("intent thread panicked")),
        )
        .into_iter()
        .collect()
    }

    /// Runs `f` on every item (one per member), side by side when the
    /// storage allows it (each member waits on its own disk), else in order
    /// (the simulator's one order of operations); a run that panicked gives
    /// `panicked()`. Results are in the order of `items`.
    fn per_member<I: Sync, T: Send>(
        &self,
        items: &[I],
        f: impl Fn(&I) -> T + Sync,
        panicked: impl Fn() -> T,
    ) -> Vec<T> {
        if !self.storage.concurrent() {
            return items.iter().map(f).collect();
        }
        let f = &f;
        std::thread::scope(|sc| {
            let hs: Vec<_> = items.iter().map(|i| sc.spawn(move || f(i))).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| panicked()))
                .collect()
        })
    }

    /// Drops intent records covered by the durable commit of generation `generation`.
    pub fn clear_intents(&self, generation: u64) {
        for m in self.members().iter().filter(|m| !m.is_failed()) {
            if let Err(e) = m.intent.clear(generation) {
                tracing::warn!(member = %m.dir.display(), error = %e, "cannot clear the intent log");
            }
        }
    }

    /// Extents that may have changed after the durable generation `durable`.
    pub fn pending_intents(&self, durable: u64) -> Result<std::collections::BTreeSet<(u64, u64)>> {
        let mut out = std::collections::BTreeSet::new();
        for m in self.members().iter() {
            out.extend(
                m.intent
                    .pending(durable)
                    .map_err(|e| Error::io(&m.dir, e))?,
            );
        }
        Ok(out)
    }

    /// fsyncs the data directories of the given members (new extent files durable).
    pub fn sync_data_dirs(&self, members: &HashSet<u32>) -> io::Result<()> {
        let mut members: Vec<&u32> = members.iter().collect();
        members.sort_unstable();
        for id in members {
            if let Some(m) = self.member(*id).filter(|m| !m.is_failed())
                && let Err(e) = self.storage.sync_dir(&m.data_dir)
                && !self.check_member(*id, &e)
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Applies a metadata batch to every member. Durable commits are what fsync
    /// promises; the batch's generation is the same everywhere.
    pub fn commit(&self, batch: &Batch, durable: bool) -> Result<()> {
        // Failures up to here are in this commit's record of who is behind.
        let failures = self.failures.load(Ordering::Acquire);
        let r = self.commit_inner(batch, durable);
        if r.is_ok() && durable {
            self.failures_recorded.fetch_max(failures, Ordering::AcqRel);
        }
        r
    }

    /// Whether a member failed since the last durable commit recorded who
    /// is behind.
    pub fn failure_unrecorded(&self) -> bool {
        self.failures.load(Ordering::Acquire) != self.failures_recorded.load(Ordering::Acquire)
    }

    fn commit_inner(&self, batch: &Batch, durable: bool) -> Result<()> {
        // One transaction per member, run side by side: each waits on its own disk.
        let members = self.members();
        // Every member of the label that this commit does not reach falls
        // behind at this generation (unless it already had); every member it
        // reaches is in step again. The record goes with the commit itself.
        let behind = {
            let label = self.label();
            let mut b = self.behind.lock();
            let reached: HashSet<Uuid> = members
                .iter()
                .filter(|m| !m.is_failed())
                .map(|m| m.entry.uuid)
                .collect();
            for e in &label.members {
                if reached.contains(&e.uuid) {
                    b.remove(&e.uuid);
                } else {
                    b.entry(e.uuid).or_insert(batch.generation);
                }
            }
            // Members removed from the pool are no one's concern any more.
            b.retain(|id, _| label.members.iter().any(|e| e.uuid == *id));
            b.clone()
        };
        let behind = &behind;
        let apply = |m: &Member| -> Result<()> {
            let mut g = m.store.lock();
            let res = match g.as_ref() {
                Some(s) => s.apply(batch, durable, behind),
                None => Err(Error::Other("pool opened without metadata store".into())),
            };
            if res.is_err() && g.is_some() {
                // Close and reopen so the next commit can go through once
                // the cause (a full disk, say) is gone.
                *g = None;
                match MemberStore::open(&*m.storage, &m.dir) {
                    Ok(s) => *g = Some(s),
                    Err(e) => {
                        tracing::error!(member = %m.dir.display(), error = %e, "cannot reopen metadata store")
                    }
                }
            }
            res
        };
        let live: Vec<&Arc<Member>> = members.iter().filter(|m| !m.is_failed()).collect();
        let done = self.per_member(
            &live,
            |m| apply(m),
            || Err(Error::Other("metadata commit thread panicked".into())),
        );
        let mut ok = 0;
        let mut first_err = None;
        for (m, r) in live.iter().zip(done) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    // A member whose directory is gone fails; the commit
                    // stands on the others, and the next one records that
                    // it missed this generation.
                    let gone = self.probe_failed(m);
                    if gone {
                        self.behind
                            .lock()
                            .entry(m.entry.uuid)
                            .or_insert(batch.generation);
                    }
                    if !gone && first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None if ok == 0 => Err(Error::Other("no member left to commit to".into())),
            None => Ok(()),
        }
    }

    /// Whether member `id` missed commits (it failed or was missing, and the
    /// newest metadata copy counts it behind): its extent copies may be stale.
    pub fn is_behind(&self, id: u32) -> bool {
        let Some(m) = self.member(id) else {
            return true;
        };
        self.behind.lock().contains_key(&m.entry.uuid)
    }

    /// Members (ids) that went their own way and were overruled by `force`.
    pub fn diverged_members(&self) -> Vec<u32> {
        self.diverged.lock().clone()
    }

    /// Pooled capacity: each distinct filesystem under the members counted once,
    /// divided by the copies setting; the per-member reserve is not free (like
    /// ext4's reserved blocks, it counts in the size but not in free space).
    pub fn space(&self) -> PoolSpace {
        let mut seen = HashSet::new();
        let mut s = PoolSpace::default();
        for m in self.members().iter() {
            if !seen.insert(m.dev) {
                continue;
            }
            if let Ok(st) = self.storage.space(&m.dir) {
                let reserve = Member::reserve(st.total);
                s.size += st.total;
                s.free += st.free.saturating_sub(reserve);
                s.avail += st.avail.saturating_sub(reserve);
            }
        }
        let c = self.config().copies.max(1) as u64;
        PoolSpace {
            size: s.size / c,
            free: s.free / c,
            avail: s.avail / c,
        }
    }

    /// Lists the files in a member's data directory.
    pub fn list_extent_files(&self, member: &Member) -> io::Result<Vec<ExtentFileEntry>> {
        let mut out = Vec::new();
        for ent in self.storage.list(&member.data_dir)? {
            let name = ent.to_string_lossy().into_owned();
            let bytes = self
                .storage
                .stat(&member.data_dir.join(&ent))
                .map(|m| m.allocated)
                .unwrap_or(0);
            let (parsed, sum) = layout::parse_data_file_name(&name);
            out.push(ExtentFileEntry {
                parsed,
                sum,
                name,
                bytes,
            });
        }
        Ok(out)
    }

    /// Status of the pool as `vpool status` shows it, computed from the metadata
    /// image and the member directories.
    pub fn status(&self, files: u64, logical_bytes: u64) -> PoolStatus {
        let mut members = Vec::new();
        let mut seen = HashSet::new();
        let (mut size, mut free) = (0u64, 0u64);
        let mut stored_total = 0u64;
        for m in self.members().iter() {
            let (msize, mfree) = match self.storage.space(&m.dir) {
                Ok(st) => (st.total, st.avail),
                Err(_) => (0, 0),
            };
            if seen.insert(m.dev) {
                size += msize;
                free += mfree;
            }
            let mut stored = 0;
            let mut count = 0;
            if let Ok(list) = self.list_extent_files(m) {
                for f in list.iter().filter(|f| f.parsed.is_some() && !f.sum) {
                    stored += f.bytes;
                    count += 1;
                }
            }
            stored_total += stored;
            let damaged = self
                .damaged_meta
                .lock()
                .iter()
                .find(|(id, _)| *id == m.entry.id)
                .map(|(_, why)| why.clone());
            let (health, reason) = match (m.fail_reason(), m.probe(), damaged) {
                (Some(why), _, _) => ("FAULTED", Some(why)),
                (None, Err(why), _) => ("FAULTED", Some(why)),
                (None, Ok(()), Some(why)) => (
                    "DAMAGED",
                    Some(format!(
                        "metadata copy damaged ({why}); rebuilt from the others at the next read-write mount"
                    )),
                ),
                (None, Ok(()), None) => ("ONLINE", None),
            };
            members.push(MemberStatus {
                reason,
                path: m.dir.clone(),
                id: m.entry.uuid.to_string(),
                size: msize,
                used: msize.saturating_sub(mfree),
                free: mfree,
                health: health.to_string(),
                stored_bytes: stored,
                extents: count,
            });
        }
        for e in self.missing().iter() {
            members.push(MemberStatus {
                path: e.path.clone(),
                id: e.uuid.to_string(),
                size: 0,
                used: 0,
                free: 0,
                health: "MISSING".into(),
                stored_bytes: 0,
                extents: 0,
                reason: Some("not found when the pool was opened".into()),
            });
        }
        let state = if members.iter().all(|m| m.health == "ONLINE") {
            "ONLINE"
        } else {
            "DEGRADED"
        };
        PoolStatus {
            pool: self.pool_id().to_string(),
            state: state.to_string(),
            mounted: false,
            mountpoint: None,
            pid: None,
            copies: self.config().copies,
            extent_size: self.config().extent_size,
            block_size: self.config().block_size,
            members,
            size,
            used: size.saturating_sub(free),
            free,
            files,
            logical_bytes,
            stored_bytes: stored_total,
            integrity: self.integrity.counts(),
            degraded_bytes: 0,
            unavailable_bytes: 0,
            last_scrub: self.info.get(info::KEY_SCRUB),
            newest_snapshot: None,
            snapshots: 0,
            last_capture: self.info.get(info::KEY_CAPTURE),
            log: None,
            healthy: false,
            problems: Vec::new(),
        }
        .finish()
    }
}
