//! `vpool check`: the offline consistency check of a whole pool.
//!
//! It combines two layers and so lives above both: the pool checks of
//! [`crate::pool::inspect`] (labels, every metadata copy, the namespace, the
//! extents against the member files), then the snapshots of the newest
//! metadata copy ([`crate::snapshot::SnapshotStore::check`]: every record
//! that does not load, every delta copy opened and every frame read back).
//! Problems are inconsistencies; notes are states a crash leaves behind that
//! the next mount repairs by itself. It opens the pool, taking its locks, so
//! it refuses a mounted pool.

use std::path::Path;
use std::sync::Arc;

use crate::pool::Pool;
pub use crate::pool::inspect::CheckReport;
use crate::snapshot::SnapshotStore;
use crate::storage::Storage;

/// `vpool check`: the pool checks of [`crate::pool::inspect`], then every
/// snapshot record and every delta copy.
pub fn check_pool(dir: &Path) -> crate::Result<CheckReport> {
    check_pool_in(crate::storage::real(), dir)
}

/// [`check_pool`] on the given storage.
pub fn check_pool_in(storage: Arc<dyn Storage>, dir: &Path) -> crate::Result<CheckReport> {
    let pool = Arc::new(Pool::open_in(storage, dir)?);
    let mut report = crate::pool::inspect::check_open(&pool)?;
    let newest = pool
        .member_images()
        .into_iter()
        .flatten()
        .max_by_key(|i| i.generation);
    if let Some(img) = newest {
        let (store, bad) = SnapshotStore::load(pool.clone(), &img.snapshots, img.next_snap_id);
        for (id, why) in bad {
            report
                .problems
                .push(format!("snapshot record {id} is unreadable: {why}"));
        }
        let found = store.check();
        report.problems.extend(found.problems);
        report.notes.extend(found.notes);
    }
    Ok(report)
}
