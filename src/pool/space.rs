//! Space and health: each member's free space after its reserve
//! (docs/design.md section 8), the pool's capacity as statfs reports it,
//! probing members and failing the ones whose device or directory is at
//! fault (section 17.4), and `vpool status`.
//!
//! Invariants: near the reserve, free space is read afresh on every check,
//! so racing writes cannot eat into it; a failed member stays failed until
//! the pool is opened again.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{IntegrityCounts, Member, Pool, info, layout};
use crate::error::FsError;

/// How long a member's free-space reading is trusted on the write path.
const SPACE_TTL_MS: u64 = 100;
/// Below this many available bytes, free space is read on every check.
const NEAR_FULL: u64 = 64 << 20;

pub(super) struct SpaceReading {
    /// [`crate::storage::Storage::clock_ms`] of the reading.
    at_ms: u64,
    avail: u64,
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
    /// The newest snapshot sent out of the pool.
    #[serde(default)]
    pub last_sent: Option<info::SentRecord>,
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

impl Pool {
    /// Whether I/O may go to member `id` (present at open and not failed since).
    pub fn usable(&self, id: u32) -> bool {
        self.member(id).is_some_and(|m| !m.is_failed())
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
    pub(super) fn probe_failed(&self, m: &Member) -> bool {
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
            // What `check_member` makes of the I/O error inside, or of one
            // with no errno (it probes the member).
            FsError::Pool(e) => match e.io_source() {
                Some(io) => self.check_member(id, io),
                None => self.member(id).is_none_or(|m| self.probe_failed(&m)),
            },
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
            last_sent: self.info.get(info::KEY_SENT),
            log: None,
            healthy: false,
            problems: Vec::new(),
        }
        .finish()
    }
}
