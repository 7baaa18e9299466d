//! The pool: its members (directories, each with a label, a metadata store and a
//! `data/` directory of extent files), placement of new extents, space accounting,
//! and the locks that keep two daemons off one pool.
//!
//! What a member directory holds, and every name in it, is in layout.rs.
//! This file holds the two types everything else hangs off, [`Pool`] and
//! [`Member`]; their work is split by job:
//!
//! - admit.rs: which directories may become members (`create`, `device add`);
//! - open.rs: creating a pool, opening one and locking its members;
//! - load.rs: loading, healing and scrubbing the members' metadata copies,
//!   and rewriting labels;
//! - commit.rs: metadata commits, who is behind, the write-intent log;
//! - placement.rs: placing, opening, listing and removing extent files;
//! - space.rs: free space, member health (probing, failing), status;
//! - members.rs: adding and retiring members of an open pool.
//!
//! Invariant: a member marked failed (I/O errors, directory gone) gets no
//! more I/O, no reads, writes, intent records, commits or new extents, until
//! the pool is opened again ([`Pool::usable`]).

pub mod fds;
pub mod info;
pub mod inspect;
pub mod intent;
pub mod label;
pub mod layout;
pub mod members;
pub mod meta;
pub mod sums;

mod admit;
mod commit;
mod load;
mod open;
mod placement;
mod space;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use uuid::Uuid;

use crate::storage::{LockGuard, Stat, Storage};
use label::{Label, MemberEntry, PoolConfig};
use meta::MemberStore;
use space::SpaceReading;

pub(crate) use admit::{admit_member_dir, canonical_dir};
pub use layout::{
    DATA_DIR, ExtentFile, LOCK_FILE, QUARANTINE_DIR, extent_file_name, parse_extent_file_name,
    sum_file_name,
};
pub use open::read_lock_info;
pub(crate) use open::try_lock;
pub use placement::ExtentFileEntry;
pub use space::{MemberStatus, NewestSnapshot, PoolSpace, PoolStatus, is_device_error};

pub const DEFAULT_EXTENT_SIZE: u64 = 64 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

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

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn fail_reason(&self) -> Option<String> {
        self.fail_reason.lock().clone()
    }
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
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
    /// Waits for the writeback of streamed writes and drops their pages
    /// (storage/drain.rs).
    pub drain: crate::storage::drain::Drain,
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
    /// Some present member's label is older than the pool's (it missed a
    /// label write while it was failed or away): the open with repair brings
    /// it up to date before its metadata copy, which may name members only
    /// the newer label lists.
    labels_lag: bool,
    /// Where every member file is read and written.
    storage: Arc<dyn Storage>,
    /// Members failed since the mount, and how many of those failures a
    /// durable commit has recorded (as members behind): until it has, a
    /// flush that wrote only the surviving copies is not durable (after a
    /// restart the stale copy could not be told from the good one).
    failures: AtomicU64,
    failures_recorded: AtomicU64,
}

impl Pool {
    /// The storage every member file goes through.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// A shared reference to [`Pool::storage`].
    pub fn storage_arc(&self) -> Arc<dyn Storage> {
        self.storage.clone()
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
        self.info.has_changes() || self.integrity.counts() != self.info.integrity()
    }

    /// The operational record's changes for the next commit.
    pub fn take_info_changes(&self) -> Vec<meta::BlobChange<String>> {
        self.info.note_integrity(self.integrity.counts());
        self.info.take_changes()
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
}
