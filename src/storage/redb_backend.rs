//! The metadata store (redb) on the storage seam: a `StorageBackend` over a
//! member file opened through [`super::Storage`], so the simulator's power
//! cuts and injected errors reach `meta.redb` like every other file.
//!
//! No byte-range locks: the member's `vpool.lock` already keeps a second
//! process off the pool, and redb then runs in its exclusive-writer mode.

use std::io;

use redb::StorageBackend;

use super::{FileIo, Handle};

#[derive(Debug)]
pub struct SeamBackend(pub Handle);

impl StorageBackend for SeamBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        FileIo::write_all_at(&*self.0, data, offset)
    }
}
