//! Counts and status of the live filesystem: `statfs`, and what `vpool
//! status` shows of a mounted pool (files, bytes, degraded data, snapshots).
//! Read-only: each takes `ns` for reading, briefly, and then `Node::meta`.

use std::sync::Arc;

use super::core::Vfs;
use crate::pool::meta::NodeKind;
use crate::pool::{PoolSpace, PoolStatus};
use crate::volume::Volume;

impl Vfs {
    /// The pool's space and the number of live inodes.
    pub fn statfs(&self) -> (PoolSpace, u64) {
        (self.pool.space(), self.ns.read().nodes.len() as u64)
    }

    /// Files and logical bytes (for status).
    pub fn counts(&self) -> (u64, u64) {
        let ns = self.ns.read();
        let mut files = 0;
        let mut bytes = 0;
        for n in ns.nodes.values() {
            let m = n.meta.lock();
            if m.kind == NodeKind::File {
                files += 1;
                bytes += m.size;
            }
        }
        (files, bytes)
    }

    pub fn status(&self) -> PoolStatus {
        let (files, bytes) = self.counts();
        let mut st = self.pool.status(files, bytes);
        let copies = self.pool.config().copies.max(1) as usize;
        let vols: Vec<Arc<Volume>> = self
            .ns
            .read()
            .nodes
            .values()
            .filter_map(|n| n.volume.clone())
            .collect();
        for v in vols {
            let (d, l) = v.degraded_bytes(&self.pool, copies);
            st.degraded_bytes += d;
            st.unavailable_bytes += l;
        }
        let infos = self.snaps.infos();
        st.snapshots = infos.len() as u64;
        st.newest_snapshot = infos
            .iter()
            .filter(|i| i.state == "complete")
            .max_by_key(|i| (i.created, i.id))
            .map(|i| crate::pool::NewestSnapshot {
                name: i.name.clone(),
                created: i.created,
            });
        st.finish()
    }
}
