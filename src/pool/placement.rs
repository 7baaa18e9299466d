//! Extent files on the members: placing the copies of a new extent
//! (docs/design.md section 6), opening them through the descriptor cache,
//! listing a member's `data/`, and removing or quarantining files no commit
//! references any more.
//!
//! Invariants: the copies of an extent are on distinct members, all named
//! with one fresh file id; a file is forgotten by the descriptor cache before
//! it is removed, so a later file of that name is never written through a
//! stale descriptor.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::layout::{self, ExtentFile, QUARANTINE_DIR, extent_file_name, sum_file_name};
use super::{Member, Pool};
use crate::error::{FsError, FsResult};
use crate::storage::{Handle, OpenMode};

/// The copies of a new extent created so far: dropped before
/// [`CopiesBeingCreated::keep`] (the placement failed, or moves on to the next
/// file id), it removes their files, which no metadata references yet.
struct CopiesBeingCreated<'a> {
    pool: &'a Pool,
    ino: u64,
    index: u64,
    fid: u64,
    /// `(member, open file)` of each copy created.
    files: Vec<(u32, Handle)>,
}

impl CopiesBeingCreated<'_> {
    /// Every copy is placed: hand the files over to the extent.
    fn keep(mut self) -> Vec<(u32, Handle)> {
        std::mem::take(&mut self.files)
    }
}

impl Drop for CopiesBeingCreated<'_> {
    fn drop(&mut self) {
        for (m, _) in &self.files {
            if let Some(p) = self.pool.extent_path(*m, self.ino, self.index, self.fid) {
                let _ = self.pool.storage.remove_file(&p);
            }
        }
    }
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

impl Pool {
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
        'fid: loop {
            let fid = self.next_file_id.fetch_add(1, Ordering::SeqCst);
            let mut made = CopiesBeingCreated {
                pool: self,
                ino,
                index,
                fid,
                files: Vec::with_capacity(copies),
            };
            while made.files.len() < copies {
                let exclude: Vec<u32> = made.files.iter().map(|(m, _)| *m).collect();
                let member_id = match self.place(&exclude, need) {
                    Ok(id) => id,
                    // Degraded: fewer usable members than copies. The extent gets
                    // the copies it can (status counts it as degraded).
                    Err(FsError::NoSpace)
                        if !made.files.is_empty() && self.usable_count() < copies =>
                    {
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let Some(m) = self.member(member_id) else {
                    return Err(FsError::NoSpace);
                };
                let p = m.data_dir.join(extent_file_name(ino, index, fid));
                match self.storage.open(&p, OpenMode::NEW) {
                    Ok(f) => made.files.push((member_id, f)),
                    // A leftover of a crash (never published): take the next id.
                    Err(io) if io.kind() == io::ErrorKind::AlreadyExists => continue 'fid,
                    Err(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                        return Err(FsError::NoSpace);
                    }
                    // A member failing under us: place on the others.
                    Err(io) if self.check_member(member_id, &io) => {}
                    Err(io) => return Err(FsError::Io(io)),
                }
            }
            let made = made.keep();
            for (m, _) in &made {
                if let Some(m) = self.member(*m) {
                    m.extents.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok((fid, made));
        }
    }

    pub fn extent_path(&self, member: u32, ino: u64, index: u64, file_id: u64) -> Option<PathBuf> {
        self.member(member)
            .map(|m| m.data_dir.join(extent_file_name(ino, index, file_id)))
    }

    /// The open file of an extent copy, from the descriptor cache.
    pub fn extent_file(&self, member: u32, ino: u64, index: u64, file_id: u64) -> FsResult<Handle> {
        let key = ExtentFile {
            member,
            ino,
            index,
            file_id,
        };
        self.fds
            .get_or_open(key, || self.open_extent_file(member, ino, index, file_id))
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
            .ok_or_else(|| FsError::corrupt(format!("extent on unknown member {member}")))?;
        match self.storage.open(&p, OpenMode::WRITE) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(FsError::corrupt_in(&p, None, "extent file is missing"))
            }
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
    pub fn quarantine_extent_files(&self, files: &[ExtentFile]) {
        for f in files {
            self.fds.forget(f);
            let Some(m) = self.member(f.member) else {
                continue;
            };
            let q = m.dir.join(QUARANTINE_DIR);
            if let Err(e) = crate::storage::create_dir_all(self.storage(), &q) {
                tracing::error!(dir = %q.display(), error = %e, "cannot create quarantine directory; files left in place");
                continue;
            }
            for name in [f.name(), f.sum_name()] {
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
    pub fn remove_extent_files(&self, files: &[ExtentFile]) {
        for f in files {
            self.fds.forget(f);
            if let Some(p) = self.sum_path(f.member, f.ino, f.index, f.file_id) {
                match self.storage.remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot remove sum file")
                    }
                }
            }
            if let Some(p) = self.extent_path(f.member, f.ino, f.index, f.file_id) {
                match self.storage.remove_file(&p) {
                    Ok(()) => {
                        if let Some(m) = self.member(f.member) {
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
}
