//! Creating a pool over fresh directories, and opening the pool a member
//! belongs to: finding its members from the newest label, locking each one
//! (one daemon, `check` or offline `status` at a time) and recording who
//! holds the lock.
//!
//! Invariants: `create` writes every member's metadata and data directory
//! before any label, so a directory with a label is a complete member; on a
//! failure it removes what it wrote. `open` writes nothing but the lock
//! files it takes (created when missing): loading and repairing the
//! metadata is load.rs's job.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use uuid::Uuid;

use super::admit::admit_new_pool;
use super::label::{Label, MemberEntry, PoolConfig, read_label, read_retired, write_label};
use super::layout::{self, DATA_DIR, LOCK_FILE};
use super::meta::{self, InodeRecord, MemberStore, MetaImage, NodeKind, ROOT_INO, Timestamp};
use super::{CreateOptions, Integrity, Member, Pool, canonical_dir, fds, info, is_device_error};
use crate::error::{Error, Result};
use crate::storage::{LockGuard, OpenMode, Storage};

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

/// How long an opener waits for a lock whose recorded holder is exiting (a
/// daemon killed with SIGKILL releases its flock only when its last thread
/// is gone, which a thread blocked in member I/O can delay). A holder that
/// is running, or gone, is not waited for.
const DYING_HOLDER_WAIT: Duration = Duration::from_secs(30);

/// How long an opener waits for a lock whose holder recorded nothing. A
/// process that has just let go can hold it a moment longer through a child
/// it forked meanwhile (the descriptor lives in the child until its exec
/// closes it); a real holder (an offline `check`, a daemon still opening)
/// is reported after this.
const SILENT_HOLDER_WAIT: Duration = Duration::from_secs(1);

pub(crate) fn try_lock(s: &dyn Storage, dir: &Path, pool: &Uuid) -> Result<Box<dyn LockGuard>> {
    let p = dir.join(LOCK_FILE);
    let start = Instant::now();
    loop {
        if let Some(g) = s.try_lock(&p).map_err(|e| Error::io(&p, e))? {
            return Ok(g);
        }
        let info = read_lock_info(s, dir);
        let wait = match &info {
            Some((pid, _)) => {
                crate::util::process_exiting(*pid) && start.elapsed() < DYING_HOLDER_WAIT
            }
            None => start.elapsed() < SILENT_HOLDER_WAIT,
        };
        if wait {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let at = match info {
            Some((pid, mp)) => format!(" at {} by pid {pid}", mp.display()),
            None => String::new(),
        };
        return Err(Error::AlreadyMounted {
            pool: pool.to_string(),
            path: dir.to_path_buf(),
            at,
        });
    }
}

impl Member {
    /// Records in the member's lock file who holds it (pid, mountpoint).
    pub(super) fn write_lock_info(&self, mountpoint: &Path) -> Result<()> {
        let p = self.dir.join(LOCK_FILE);
        let f = self
            .storage
            .open(&p, OpenMode::EMPTY)
            .map_err(|e| Error::io(&p, e))?;
        let info = layout::lock_info(std::process::id(), mountpoint);
        f.write_all_at(info.as_bytes(), 0)
            .map_err(|e| Error::io(&p, e))
    }
}

/// The member directories a pool creation has written into so far: dropped
/// before [`MembersBeingCreated::commit`] (the creation failed), it removes
/// what the creation wrote there (metadata copy, `data/`, labels), so that no
/// directory is left looking like a member of a pool that does not exist.
/// Removal is best effort: the creation's own error is what is reported.
struct MembersBeingCreated<'a> {
    s: &'a dyn Storage,
    dirs: Vec<&'a PathBuf>,
}

impl MembersBeingCreated<'_> {
    /// Every member is complete: keep them all.
    fn commit(mut self) {
        self.dirs.clear();
    }
}

impl Drop for MembersBeingCreated<'_> {
    fn drop(&mut self) {
        for p in &self.dirs {
            let _ = self.s.remove_file(&p.join(layout::META_FILE));
            let _ = self.s.remove_dir(&p.join(DATA_DIR));
            for f in layout::LABEL_FILES {
                let _ = self.s.remove_file(&p.join(f));
            }
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
        let canon = admit_new_pool(s, dirs)?;
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
        let mut made = MembersBeingCreated {
            s,
            dirs: Vec::new(),
        };
        for m in &members {
            s.make_private(&m.path).map_err(|e| Error::io(&m.path, e))?;
            let data = m.path.join(DATA_DIR);
            crate::storage::create_dir_all(s, &data).map_err(|e| Error::io(&data, e))?;
            made.dirs.push(&m.path);
            MemberStore::create(s, &m.path, &image)?;
            s.sync_dir(&m.path).map_err(|e| Error::io(&m.path, e))?;
        }
        for m in &members {
            label.member = m.uuid;
            write_label(s, &m.path, &label)?;
            // Labelled now: a retirement note of a former pool says nothing.
            let _ = s.remove_file(&m.path.join(layout::RETIRED_FILE));
        }
        made.commit();
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
        let first = match read_label(s, &dir) {
            Err(Error::NotAMember(_)) if let Some(r) = read_retired(s, &dir) => {
                let paths: Vec<String> = r
                    .members
                    .iter()
                    .map(|e| e.path.display().to_string())
                    .collect();
                return Err(Error::Invalid(format!(
                    "{} was removed from pool {}; mount it through one of its members ({})",
                    dir.display(),
                    r.pool,
                    paths.join(", ")
                )));
            }
            r => r?,
        };
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
                    // Retired while the label read first lagged: the label of
                    // that moment lists the members that took its place.
                    Err(Error::NotAMember(_))
                        if let Some(r) = read_retired(s, &path).filter(|r| {
                            r.pool == first.pool
                                && r.member == entry.uuid
                                && r.generation > label.generation
                        }) =>
                    {
                        tracing::warn!(
                            member = %path.display(),
                            id = %entry.uuid,
                            "member was retired after the label read first; following the pool's newer label"
                        );
                        label = Label {
                            member: first.member,
                            ..r
                        };
                        continue;
                    }
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
        let labels_lag = found
            .iter()
            .any(|(_, _, l)| l.generation != label.generation);
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
            drain: crate::storage::drain::Drain::new(crate::storage::drain::DRAIN_LAG),
            behind: Mutex::new(meta::Behind::new()),
            force: std::sync::atomic::AtomicBool::new(false),
            diverged: Mutex::new(Vec::new()),
            damaged_meta: Mutex::new(Vec::new()),
            labels_lag,
            storage,
            failures: AtomicU64::new(0),
            failures_recorded: AtomicU64::new(0),
        })
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
}

#[cfg(test)]
mod tests {
    //! The words of the errors that opening a pool can end with: each names
    //! the member directory and what is wrong with it.

    use super::*;
    use crate::pool::CreateOptions;

    /// A pool over `n` fresh member directories (canonical paths, as the
    /// label records them).
    fn pool_of(n: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
        let t = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..n)
            .map(|i| {
                let d = t.path().join(format!("m{i}"));
                std::fs::create_dir(&d).unwrap();
                std::fs::canonicalize(&d).unwrap()
            })
            .collect();
        Pool::create(&dirs, CreateOptions::default()).unwrap();
        (t, dirs)
    }

    fn open_error(dir: &Path) -> String {
        match Pool::open(dir) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    /// A member that missed a label write (failed or away meanwhile) gets
    /// the newest label at the next open with repair, before its metadata
    /// copy is brought up to date: an open through it later finds the
    /// members that only the newer label lists.
    #[test]
    fn a_lagging_label_is_brought_up_to_date_at_open() {
        let (_t, dirs) = pool_of(2);
        let s = crate::storage::real::RealStorage;
        let saved: Vec<(PathBuf, Vec<u8>)> = crate::pool::layout::LABEL_FILES
            .iter()
            .map(|f| dirs[1].join(f))
            .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
            .collect();
        let old = read_label(&s, &dirs[1]).unwrap().generation;
        let p = Pool::open(&dirs[0]).unwrap();
        p.write_labels(p.label()).unwrap();
        drop(p);
        for (path, b) in &saved {
            std::fs::write(path, b).unwrap();
        }
        assert_eq!(read_label(&s, &dirs[1]).unwrap().generation, old);
        let newest = read_label(&s, &dirs[0]).unwrap().generation;
        assert!(newest > old);
        // Without repair nothing is written.
        Pool::open(&dirs[0]).unwrap().load_metadata(false).unwrap();
        assert_eq!(read_label(&s, &dirs[1]).unwrap().generation, old);
        Pool::open(&dirs[0]).unwrap().load_metadata(true).unwrap();
        let l0 = read_label(&s, &dirs[0]).unwrap();
        let l1 = read_label(&s, &dirs[1]).unwrap();
        assert!(l1.generation > newest, "{} {newest}", l1.generation);
        assert_eq!((l0.generation, &l0.members), (l1.generation, &l1.members));
    }

    /// A member that missed a `device replace` (its label still lists the
    /// retired member, not the new one) opens the whole pool: the retired
    /// member's note names the members that took its place. Opening through
    /// the retired directory says where the pool went.
    #[test]
    fn an_open_through_a_member_that_missed_a_replace_finds_the_new_member() {
        let (t, dirs) = pool_of(2);
        let s = crate::storage::real::RealStorage;
        let new = t.path().join("m2");
        std::fs::create_dir(&new).unwrap();
        let new = std::fs::canonicalize(&new).unwrap();
        let saved: Vec<(PathBuf, Vec<u8>)> = crate::pool::layout::LABEL_FILES
            .iter()
            .map(|f| dirs[0].join(f))
            .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
            .collect();
        let mut p = Pool::open(&dirs[1]).unwrap();
        let img = p.load_metadata(true).unwrap();
        assert!(matches!(
            p.add_member(&new, &img).unwrap(),
            super::super::members::Added::New(_)
        ));
        let old_id = p
            .members()
            .iter()
            .find(|m| m.dir == dirs[1])
            .unwrap()
            .entry
            .id;
        p.retire_member(old_id).unwrap();
        drop(p);
        // m0 missed all of it (it was failed meanwhile).
        for (path, b) in &saved {
            std::fs::write(path, b).unwrap();
        }
        assert!(s.exists(&dirs[1].join(layout::RETIRED_FILE)));
        let p = Pool::open(&dirs[0]).unwrap();
        let mut got: Vec<PathBuf> = p.members().iter().map(|m| m.dir.clone()).collect();
        got.sort();
        assert_eq!(got, vec![dirs[0].clone(), new.clone()]);
        assert!(p.missing().is_empty(), "{:?}", p.missing());
        drop(p);
        assert_eq!(
            open_error(&dirs[1]),
            format!(
                "invalid argument: {} was removed from pool {}; mount it through one of its members ({}, {})",
                dirs[1].display(),
                read_label(&s, &new).unwrap().pool,
                dirs[0].display(),
                new.display()
            )
        );
        // Added again, it is a member like any other, and the note goes.
        let mut p = Pool::open(&dirs[0]).unwrap();
        let img = p.load_metadata(true).unwrap();
        p.add_member(&dirs[1], &img).unwrap();
        assert!(!s.exists(&dirs[1].join(layout::RETIRED_FILE)));
    }

    #[test]
    fn a_missing_member_is_named() {
        let (_t, dirs) = pool_of(2);
        std::fs::remove_dir_all(&dirs[1]).unwrap();
        // Through the missing member: the directory is named.
        assert_eq!(
            open_error(&dirs[1]),
            format!("{} does not exist", dirs[1].display())
        );
        // Through the other: the pool opens degraded, and check names it.
        let report = crate::pool::inspect::check(&dirs[0]).unwrap();
        let want = format!("member {} (", dirs[1].display());
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.starts_with(&want) && p.ends_with("is missing: the pool is DEGRADED")),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn a_pool_locked_by_another_opener_names_it() {
        let (_t, dirs) = pool_of(1);
        let first = Pool::open(&dirs[0]).unwrap();
        first.members()[0]
            .write_lock_info(Path::new("/mnt/images"))
            .unwrap();
        let label = read_label(&crate::storage::real::RealStorage, &dirs[0]).unwrap();
        assert_eq!(
            open_error(&dirs[0]),
            format!(
                "pool {} is already mounted at /mnt/images by pid {} (member {} is locked)",
                label.pool,
                std::process::id(),
                dirs[0].display()
            )
        );
        drop(first);
        Pool::open(&dirs[0]).unwrap();
    }

    /// `kill -9` of a daemon: its pid is gone (or a zombie) while the
    /// kernel still tears down its threads, and their shared descriptor
    /// table still holds the flock. An opener waits for such a dying holder
    /// instead of calling the pool mounted.
    #[test]
    fn a_lock_held_by_a_dying_daemon_is_waited_for() {
        let (_t, dirs) = pool_of(1);
        let first = Pool::open(&dirs[0]).unwrap();
        // A zombie: a child that has exited and is not reaped yet.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        let t = std::time::Instant::now();
        while !crate::util::process_exiting(dead) {
            assert!(t.elapsed() < Duration::from_secs(10), "child did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(
            dirs[0].join(LOCK_FILE),
            layout::lock_info(dead, Path::new("/mnt/images")),
        )
        .unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        Pool::open(&dirs[0]).unwrap();
        release.join().unwrap();
        child.wait().unwrap();
        // A holder that is gone is not waited for: the lock is someone
        // else's (an offline check writes no lock information).
        let _held = Pool::open(&dirs[0]).unwrap();
        let t = std::time::Instant::now();
        assert!(Pool::open(&dirs[0]).is_err());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    /// A lock whose holder recorded nothing and lets go within a moment
    /// (a closed pool whose descriptor a forked child still held until its
    /// exec) is waited for; one still held after that is reported.
    #[test]
    fn a_lock_let_go_within_a_moment_is_waited_for() {
        let (_t, dirs) = pool_of(1);
        let first = Pool::open(&dirs[0]).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        Pool::open(&dirs[0]).unwrap();
        release.join().unwrap();
        let _held = Pool::open(&dirs[0]).unwrap();
        let t = Instant::now();
        assert!(open_error(&dirs[0]).contains("is already mounted"));
        assert!(t.elapsed() >= SILENT_HOLDER_WAIT, "{:?}", t.elapsed());
    }

    #[test]
    fn a_corrupt_label_names_its_member_and_copies() {
        let (_t, dirs) = pool_of(1);
        for f in layout::LABEL_FILES {
            std::fs::write(dirs[0].join(f), b"not a label").unwrap();
        }
        let e = open_error(&dirs[0]);
        let want = format!("label of {} is corrupt: ", dirs[0].display());
        assert!(e.starts_with(&want), "{e}");
        for f in layout::LABEL_FILES {
            assert!(e.contains(&format!("{f}: ")), "{e}");
        }
    }

    #[test]
    fn a_directory_of_no_pool_is_named() {
        let t = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(t.path()).unwrap();
        assert_eq!(
            open_error(&d),
            format!("{} is not a vpool member (no label found)", d.display())
        );
    }
}
