//! The data path of the live tree: read, write, truncate, fallocate, seek
//! and copy_file_range on open files.
//!
//! A read or write takes no namespace lock (a handle holds its `Arc<Node>`):
//! I/O to different files, and to different extents of one file, runs in
//! parallel in the node's `Volume`. Only a truncate takes `ns`, briefly, to
//! queue the extent files it cut. Invariants:
//! - every change to file data or size holds `Vfs::gate` for reading (a
//!   commit or a snapshot's freeze takes it for writing: no change is in
//!   flight at that instant), and first lets a running snapshot capture save
//!   the blocks it is about to change (`SnapshotStore::preserve`);
//! - a change that fails part-way keeps what was done (the node is marked
//!   dirty: the next commit records the extent map as it is) but leaves
//!   nothing past the end of the file ([`Live::clear_past_end`]), and does
//!   not change the size;
//! - ENOSPC runs a commit when removed files still hold space, then retries
//!   once ([`Live::reclaim_space`]): the one place the data path commits,
//!   after it has dropped the gate.

use std::sync::atomic::Ordering;

use super::core::{Live, MAX_FILE_SIZE};
use super::node::Node;
use crate::error::{FsError, FsResult};
use crate::pool::meta::{NodeKind, Timestamp};
use crate::volume::{ReadBuf, Volume, WriteMode};

/// What `copy_file_range` reads from: an open file of either view (the
/// route resolves the source handle; the destination is always live).
pub(crate) trait CopySource {
    /// The file's size.
    fn size(&self) -> FsResult<u64>;
    /// Where data begins at or after `off` (`None`: only a hole is left).
    fn seek_data(&self, off: u64) -> FsResult<Option<u64>>;
    fn read(&self, off: u64, len: u32) -> FsResult<Vec<u8>>;
}

impl Live<'_> {
    /// Size of the file behind a live handle.
    pub(crate) fn handle_size(&self, fh: u64) -> FsResult<u64> {
        Ok(self.getattr(self.file_node(fh)?.ino)?.size)
    }

    pub(crate) fn read(&self, fh: u64, off: u64, len: u32) -> FsResult<Vec<u8>> {
        self.read_io(fh, off, len, false).map(ReadBuf::into_vec)
    }

    /// Reads of an `O_DIRECT` open pass `direct`: aligned member reads then
    /// bypass the host's page cache (see [`Volume::read_io`]).
    pub(crate) fn read_io(&self, fh: u64, off: u64, len: u32, direct: bool) -> FsResult<ReadBuf> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        vol.read_io(&self.pool, off, len as usize, size, direct)
    }

    /// A long read of a cached open (the kernel's readahead), served from
    /// the daemon's read-ahead where it holds the range (see
    /// [`Volume::read_stream`]).
    pub(crate) fn read_stream(&self, fh: u64, off: u64, len: u32) -> FsResult<ReadBuf> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        vol.read_stream(&self.pool, off, len as usize, size)
    }

    /// After [`Live::read_stream`] was answered: reads the stream's next
    /// request ahead (see [`Volume::read_ahead`]). Best effort.
    pub(crate) fn read_ahead(&self, fh: u64, off: u64, len: u32) {
        if let Ok(node) = self.file_node(fh)
            && let Some(vol) = node.volume.as_ref()
        {
            let size = node.meta.lock().size;
            vol.read_ahead(&self.pool, off, len as usize, size);
        }
    }

    /// A write in `mode` (see [`Volume::write_io`]).
    pub(crate) fn write_io(
        &self,
        fh: u64,
        off: u64,
        data: &[u8],
        mode: WriteMode,
    ) -> FsResult<u32> {
        self.writable()?;
        let freed = self.freed.load(Ordering::Acquire);
        let r = {
            let _g = self.gate.read();
            self.write_locked_io(fh, off, data, mode)
        };
        match r {
            // The commit that frees space takes the gate itself: retry without it held.
            Err(FsError::NoSpace) if self.reclaim_space(freed) => {
                let _g = self.gate.read();
                self.write_locked_io(fh, off, data, mode)
            }
            r => r,
        }
    }

    /// `write` with the gate held by the caller.
    pub(crate) fn write_locked(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        self.write_locked_io(fh, off, data, WriteMode::Cached)
    }

    /// [`Live::write_locked`] in `mode`.
    pub(crate) fn write_locked_io(
        &self,
        fh: u64,
        off: u64,
        data: &[u8],
        mode: WriteMode,
    ) -> FsResult<u32> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(FsError::FileTooLarge)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooLarge);
        }
        self.snaps.preserve(node.ino, off, data.len() as u64);
        if let Err(e) = vol.write_io(&self.pool, off, data, mode) {
            // Pieces before the failure are written, maybe into new extents:
            // the next commit must record the map as it is now (the data
            // shows, and a commit that says it is durable must make it so).
            // What landed past the end of the file is taken back: a later
            // extension must read zeros there.
            self.clear_past_end(&node, vol, off, end);
            node.touch();
            return Err(e);
        }
        let now = self.now();
        {
            let mut m = node.meta.lock();
            if end > m.size {
                m.size = end;
            }
            m.mtime = now;
            m.ctime = now;
        }
        node.touch();
        Ok(data.len() as u32)
    }

    /// After a failed write or allocation of `[off, end)`: punches the part
    /// past the file's size (best effort: what stays there is also cut at
    /// the next mount).
    pub(crate) fn clear_past_end(&self, node: &Node, vol: &Volume, off: u64, end: u64) {
        let size = node.meta.lock().size;
        let from = off.max(size);
        if end <= from {
            return;
        }
        // Whole blocks first: they need no read (a block the failed write
        // tore does not verify), and all of them lie past the end.
        let bs = vol.block_size();
        let (ws, we) = (from.next_multiple_of(bs), end.next_multiple_of(bs));
        let mut r = Ok(());
        if we > ws {
            r = vol.punch(&self.pool, ws, we - ws);
        }
        if r.is_ok() && ws > from {
            // The block holding `from`: a punch when it verifies (the piece
            // there was written whole), else what a torn write left past the
            // end is zeroed on the copies whose bytes before still verify.
            r = vol
                .punch(&self.pool, from, ws.min(end) - from)
                .or_else(|_| vol.zero_block_tail(&self.pool, from).map(|_| ()));
        }
        if let Err(e) = r {
            tracing::warn!(ino = node.ino, error = %e, "cannot punch what a failed write left past the end of the file");
        }
    }

    /// fallocate: plain allocation (extends the size unless KEEP_SIZE), PUNCH_HOLE
    /// (with KEEP_SIZE) and ZERO_RANGE.
    pub(crate) fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        self.writable()?;
        let _g = self.gate.read();
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let end = off.checked_add(len).ok_or(FsError::FileTooLarge)?;
        if len == 0 {
            return Err(FsError::Invalid);
        }
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooLarge);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = node.meta.lock().size;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(FsError::NotSupported);
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0
            && (!keep || mode & libc::FALLOC_FL_ZERO_RANGE != 0)
        {
            return Err(FsError::NotSupported);
        }
        self.snaps.preserve(node.ino, off, len);
        let r = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if off < size {
                vol.punch(&self.pool, off, end.min(size) - off)
            } else {
                Ok(())
            }
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            let zend = if keep { end.min(size) } else { end };
            if zend > off {
                vol.zero_range(&self.pool, off, zend - off)
            } else {
                Ok(())
            }
        } else {
            vol.allocate(&self.pool, off, len)
        };
        if let Err(e) = r {
            // As in `write_locked`: what was done before the failure is
            // recorded by the next commit, and nothing stays past the end.
            self.clear_past_end(&node, vol, off, end);
            node.touch();
            return Err(e);
        }
        let now = self.now();
        {
            let mut m = node.meta.lock();
            if !keep && end > m.size {
                m.size = end;
            }
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                m.mtime = now;
            }
            m.ctime = now;
        }
        node.touch();
        Ok(())
    }

    pub(crate) fn lseek(&self, fh: u64, off: u64, whence: i32) -> FsResult<u64> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        let r = match whence {
            libc::SEEK_DATA => vol.seek_data(&self.pool, off, size)?,
            libc::SEEK_HOLE => vol.seek_hole(&self.pool, off, size)?,
            libc::SEEK_SET => Some(off),
            libc::SEEK_END => Some(size.saturating_add(off)),
            _ => return Err(FsError::Invalid),
        };
        r.ok_or(FsError::NoData)
    }

    /// Copies from `src` (a file of either view) to live handle `fh_out` in
    /// 1 MiB pieces; holes in the source stay holes (skipped in one step
    /// each, whatever their length). The gate is taken per piece: a commit
    /// waits for one piece, not for a copy of gigabytes.
    pub(crate) fn copy_file_range(
        &self,
        src: &dyn CopySource,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        self.writable()?;
        let size = src.size()?;
        if off_in >= size {
            return Ok(0);
        }
        let len = len.min(size - off_in);
        let mut done = 0u64;
        const CHUNK: u64 = 1 << 20;
        while done < len {
            let _g = self.gate.read();
            let pos = off_in + done;
            let hole = match src.seek_data(pos)? {
                Some(d) if d > pos => (d - pos).min(len - done),
                None => len - done,
                _ => 0,
            };
            if hole > 0 {
                // The destination must read zeros there too, so deallocate what
                // it holds (past its end it reads zeros).
                self.punch_within_size(fh_out, off_out + done, hole)?;
                done += hole;
                continue;
            }
            let n = (len - done).min(CHUNK);
            let buf = src.read(pos, n as u32)?;
            if buf.is_empty() {
                break;
            }
            self.write_locked(fh_out, off_out + done, &buf)?;
            done += buf.len() as u64;
        }
        let _g = self.gate.read();
        let dst = self.file_node(fh_out)?;
        {
            let mut m = dst.meta.lock();
            if off_out + done > m.size {
                m.size = off_out + done;
            }
        }
        dst.touch();
        Ok(done)
    }

    /// Deallocates `[off, off+len)` of an open file, clipped to its size.
    pub(crate) fn punch_within_size(&self, fh: u64, off: u64, len: u64) -> FsResult<()> {
        let node = self.file_node(fh)?;
        let vol = node.volume.as_ref().ok_or(FsError::IsDir)?;
        let size = node.meta.lock().size;
        if off < size {
            self.snaps.preserve(node.ino, off, len.min(size - off));
            vol.punch(&self.pool, off, len.min(size - off))?;
        }
        Ok(())
    }

    /// Sets the size of `node` (truncate or extend), with the gate held by
    /// the caller. Blocks cut off are saved for a running capture first and
    /// marked changed; extent files dropped wait for the next commit.
    pub(crate) fn set_size(&self, node: &Node, size: u64, now: Timestamp) -> FsResult<()> {
        let vol = match &node.volume {
            Some(v) => v,
            None if node.kind() == NodeKind::Dir => return Err(FsError::IsDir),
            None => return Err(FsError::Invalid),
        };
        if size > MAX_FILE_SIZE {
            return Err(FsError::FileTooLarge);
        }
        let dead = {
            let mut m = node.meta.lock();
            let dead = if size < m.size {
                self.snaps.preserve_from(node.ino, size);
                let bs = vol.block_size();
                vol.mark_mapped_blocks(size / bs, m.size.div_ceil(bs));
                vol.truncate(&self.pool, size)?
            } else {
                Vec::new()
            };
            m.size = size;
            m.mtime = now;
            m.ctime = now;
            dead
        };
        if !dead.is_empty() {
            self.ns.write().dead_extents.extend(dead);
        }
        Ok(())
    }

    /// After ENOSPC: whether a retry may now find room. Files of deleted data
    /// are removed by a commit, so one is run when any are pending; when none
    /// are, another writer's commit may be removing them right now (it took
    /// them), so wait for any running commit and retry if one freed space
    /// since the write began (`freed` then). Concurrent writers of a flush
    /// otherwise failed while the first one's commit was freeing the space.
    pub(crate) fn reclaim_space(&self, freed: u64) -> bool {
        if !self.ns.read().dead_extents.is_empty() {
            return self.commit().is_ok();
        }
        drop(self.commit_lock.lock());
        self.freed.load(Ordering::Acquire) != freed
    }
}

#[cfg(test)]
mod tests {
    use crate::error::FsError;
    use crate::export::testing::pattern;
    use crate::fs::SetAttr;
    use crate::fs::testing::{ME, open, setup, setup_with};
    use crate::pool::CreateOptions;
    use crate::pool::meta::ROOT_INO;

    #[test]
    fn write_read_across_extents_and_members() {
        let (_d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        v.write(fh, 1000, &data).unwrap();
        assert_eq!(v.read(fh, 1000, data.len() as u32).unwrap(), data);
        assert_eq!(v.read(fh, 0, 1000).unwrap(), vec![0u8; 1000]);
        assert_eq!(v.getattr(a.ino).unwrap().size, 301_000);
        // Extents are spread over both members.
        let per: Vec<usize> = dirs
            .iter()
            .map(|d| std::fs::read_dir(d.join("data")).unwrap().count())
            .collect();
        assert!(per.iter().all(|c| *c > 0), "{per:?}");
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        let v = open(&dirs[1]);
        let fh = v.open(a.ino, false).unwrap();
        assert_eq!(v.read(fh, 1000, data.len() as u32).unwrap(), data);
    }

    /// A write into an extent created under the current intent tag logs no
    /// intent record: the extent is in no durable map before the commit of
    /// that tag, which syncs its data first. Once a commit has published it,
    /// its writes are covered by a record again (design.md section 16.2).
    #[test]
    fn new_extents_need_no_intent_record_until_published() {
        use std::sync::atomic::Ordering;
        let (_d, dirs) = setup(2, 1 << 20);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let durable = v.generation.load(Ordering::SeqCst);
        v.write(fh, 0, &[1u8; 4096]).unwrap();
        v.write(fh, 3 << 20, &[1u8; 4096]).unwrap();
        let pending = v.pool.pending_intents(durable).unwrap();
        assert!(
            !pending.iter().any(|(ino, _)| *ino == a.ino),
            "records for new extents: {pending:?}"
        );
        v.commit().unwrap();
        let durable = v.generation.load(Ordering::SeqCst);
        v.write(fh, 4096, &[2u8; 4096]).unwrap();
        v.write(fh, (3 << 20) + 4096, &[2u8; 4096]).unwrap();
        let pending = v.pool.pending_intents(durable).unwrap();
        for index in [0, 3] {
            assert!(pending.contains(&(a.ino, index)), "{index}: {pending:?}");
        }
        // An extent created by this commit interval's own first write, next
        // to published ones, again needs none.
        v.write(fh, 5 << 20, &[3u8; 4096]).unwrap();
        let pending = v.pool.pending_intents(durable).unwrap();
        assert!(!pending.contains(&(a.ino, 5)), "{pending:?}");
    }

    /// Direct and streamed writes differ from cached ones only in how they
    /// reach the member files (page cache hints); the bytes are the same,
    /// over several requests, unaligned, and rewritten.
    #[test]
    fn every_write_mode_stores_the_same_bytes() {
        use crate::volume::WriteMode;
        let (_d, dirs) = setup(2, 1 << 20);
        let v = open(&dirs[0]);
        let data: Vec<u8> = (0..12u32 << 20).map(|i| (i % 253) as u8).collect();
        let mut files = Vec::new();
        for (i, mode) in [
            WriteMode::Cached,
            WriteMode::Direct,
            WriteMode::Stream,
            WriteMode::Behind,
            WriteMode::BehindKept,
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("f{i}");
            let (a, fh) = v.create(ROOT_INO, name.as_bytes(), 0o644, 0, ME).unwrap();
            // 1 MiB pieces, then unaligned ones over the first half.
            for (n, c) in data.chunks(1 << 20).enumerate() {
                v.write_io(fh, (n as u64) << 20, c, mode).unwrap();
            }
            for off in (1000u64..6 << 20).step_by(700_001) {
                let c = &data[off as usize..off as usize + 300_000];
                v.write_io(fh, off, c, mode).unwrap();
            }
            assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data, "{mode:?}");
            v.fsync(fh, true).unwrap();
            v.release(fh).unwrap();
            files.push(a.ino);
        }
        v.commit().unwrap();
        drop(v);
        let v = open(&dirs[1]);
        for ino in files {
            let fh = v.open(ino, false).unwrap();
            assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data);
        }
    }

    /// The cached and the dirty pages of a whole file (`cachestat(2)`), or
    /// `None` where the kernel lacks it (before Linux 6.5).
    fn page_cache(path: &std::path::Path) -> Option<(u64, u64)> {
        use std::os::fd::AsRawFd;
        // The syscall's number is the same on every architecture (451);
        // libc 0.2 names it on a few only.
        const SYS_CACHESTAT: libc::c_long = 451;
        let f = std::fs::File::open(path).unwrap();
        let range = [0u64; 2]; // offset 0, length 0: to the end
        let mut stat = [0u64; 5]; // cache, dirty, writeback, evicted, recently evicted
        // SAFETY: cachestat reads `range` and fills `stat`, both live and
        // of the kernel's layout (struct cachestat_range, struct cachestat).
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                range.as_ptr(),
                stat.as_mut_ptr(),
                0,
            )
        };
        (rc == 0).then_some((stat[0], stat[1]))
    }

    /// The first extent file in member directory `dir`.
    fn first_extent_file(dir: &std::path::Path) -> std::path::PathBuf {
        std::fs::read_dir(dir.join("data"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                crate::pool::layout::parse_extent_file_name(name).is_some()
            })
            .unwrap()
    }

    /// [`setup`] of one member, or `None` (the test skipped) where the temp
    /// dir is on tmpfs, which has no writeback.
    fn setup_with_writeback(esize: u64) -> Option<(tempfile::TempDir, Vec<std::path::PathBuf>)> {
        let (d, dirs) = setup(1, esize);
        #[allow(clippy::unnecessary_cast)] // TMPFS_MAGIC's width differs between targets
        let tmpfs = libc::TMPFS_MAGIC as i64;
        if crate::util::fs_type(d.path()).ok() == Some(tmpfs) {
            eprintln!("skipped: tmpfs has no writeback");
            return None;
        }
        Some((d, dirs))
    }

    /// Write-behind of a random writer's short writes starts an extent's
    /// writeback once per 1 MiB gathered, not once per write (each page its
    /// own block request and disk doorbell: docs/perf, change 15).
    #[test]
    fn short_writes_behind_start_their_writeback_in_batches() {
        use crate::volume::WriteMode;
        let Some((_d, dirs)) = setup_with_writeback(4 << 20) else {
            return;
        };
        let v = open(&dirs[0]);
        let (_, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        // 255 pages, every other one, into a new extent (so that each is a
        // page cache folio of its own): just under the batch.
        for i in 0..255u64 {
            v.write_io(fh, i * 8192, &[2u8; 4096], WriteMode::Behind)
                .unwrap();
        }
        let file = first_extent_file(&dirs[0]);
        let Some((_, dirty)) = page_cache(&file) else {
            eprintln!("skipped: no cachestat(2)");
            return;
        };
        assert!(
            dirty >= 200,
            "writeback started before the batch: {dirty} dirty"
        );
        v.write_io(fh, 255 * 8192, &[2u8; 4096], WriteMode::Behind)
            .unwrap();
        let (_, dirty) = page_cache(&file).unwrap();
        assert_eq!(dirty, 0, "the batch did not start the writeback");
        assert_eq!(v.read(fh, 255 * 8192, 4096).unwrap(), vec![2u8; 4096]);
    }

    /// Short writes behind (the writeback of a random writer's pages, which
    /// the mount still holds) leave no copy in the members' cache once their
    /// batch is written back: a second copy of every page doubles the memory
    /// a buffered guest takes (docs/perf, change 21). `odirect=cached`
    /// (`BehindKept`) keeps them.
    #[test]
    fn short_writes_behind_leave_no_member_pages_cached() {
        use crate::volume::WriteMode;
        for (mode, dropped) in [(WriteMode::Behind, true), (WriteMode::BehindKept, false)] {
            let Some((_d, dirs)) = setup_with_writeback(4 << 20) else {
                return;
            };
            let v = open(&dirs[0]);
            let (_, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
            // Two batches of 256 pages, every other page of the extent.
            for i in 0..512u64 {
                v.write_io(fh, i * 8192, &[i as u8; 4096], mode).unwrap();
            }
            v.pool.drain.settle();
            let Some((cached, _)) = page_cache(&first_extent_file(&dirs[0])) else {
                eprintln!("skipped: no cachestat(2)");
                return;
            };
            if dropped {
                assert!(
                    cached <= 8,
                    "{cached} pages of 512 written behind stay in the member's cache"
                );
            } else {
                assert!(
                    cached >= 500,
                    "{mode:?} dropped pages: {cached} of 512 left"
                );
            }
            for i in 0..512u64 {
                assert_eq!(v.read(fh, i * 8192, 4096).unwrap(), vec![i as u8; 4096]);
            }
        }
    }

    /// A streamed write (the writeback of a sequential writer's pages, which
    /// the mount still holds) leaves none of its pages in the members'
    /// cache, in whatever order the requests come: a writeback's requests
    /// are served out of order, and dropping the pages some way behind each
    /// request kept half of them (docs/perf, change 16).
    #[test]
    fn streamed_writes_leave_no_member_pages_cached() {
        use crate::volume::WriteMode;
        let Some((_d, dirs)) = setup_with_writeback(16 << 20) else {
            return;
        };
        let v = open(&dirs[0]);
        let (_, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        // 16 requests of 1 MiB into one 16 MiB extent, each pair swapped.
        for i in (0..16u64).map(|i| i ^ 1) {
            v.write_io(fh, i << 20, &vec![i as u8 + 1; 1 << 20], WriteMode::Stream)
                .unwrap();
        }
        // The drain drops them off the request path.
        v.pool.drain.settle();
        let Some((cached, _)) = page_cache(&first_extent_file(&dirs[0])) else {
            eprintln!("skipped: no cachestat(2)");
            return;
        };
        assert!(
            cached <= 16,
            "{cached} pages of 4096 streamed stay in the member's cache"
        );
        for i in 0..16u64 {
            assert_eq!(
                v.read(fh, i << 20, 1 << 20).unwrap(),
                vec![i as u8 + 1; 1 << 20]
            );
        }
    }

    #[test]
    fn truncate_punch_and_seek() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, &[1u8; 200_000]).unwrap();
        v.fallocate(
            fh,
            65536,
            65536,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        assert_eq!(v.read(fh, 65536, 10).unwrap(), vec![0u8; 10]);
        assert_eq!(v.lseek(fh, 0, libc::SEEK_HOLE).unwrap(), 65536);
        assert_eq!(v.lseek(fh, 65536, libc::SEEK_DATA).unwrap(), 131072);
        v.setattr(
            a.ino,
            SetAttr {
                size: Some(70_000),
                ..Default::default()
            },
        )
        .unwrap();
        v.setattr(
            a.ino,
            SetAttr {
                size: Some(300_000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(v.read(fh, 0, 4).unwrap(), vec![1u8; 4]);
        assert_eq!(v.read(fh, 69_990, 20).unwrap(), vec![0u8; 20]);
        assert!(matches!(
            v.lseek(fh, 70_000, libc::SEEK_DATA),
            Err(FsError::NoData)
        ));
    }

    #[test]
    fn copies_land_on_distinct_members_and_cover_a_lost_copy() {
        let (_d, dirs) = setup_with(
            3,
            CreateOptions {
                copies: 2,
                extent_size: 64 * 1024,
                ..Default::default()
            },
        );
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        let data: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
        v.write(fh, 0, &data).unwrap();
        v.release(fh).unwrap();
        v.commit().unwrap();
        drop(v);
        // Every extent has two files with the same name on two members.
        let mut names: std::collections::HashMap<String, usize> = Default::default();
        for dir in &dirs {
            for e in std::fs::read_dir(dir.join("data")).unwrap() {
                *names
                    .entry(e.unwrap().file_name().to_string_lossy().into_owned())
                    .or_default() += 1;
            }
        }
        // (Each extent file has its sum file beside it.)
        assert_eq!(names.len(), 16);
        assert!(names.values().all(|c| *c == 2), "{names:?}");
        // Remove every extent file of member 0: the other copies serve all reads.
        for e in std::fs::read_dir(dirs[0].join("data")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let v = open(&dirs[1]);
        let fh = v.open(a.ino, false).unwrap();
        assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data);
    }

    #[test]
    fn copy_file_range_of_a_hole_zeroes_the_destination() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (_, src) = v.create(ROOT_INO, b"src", 0o644, 0, ME).unwrap();
        v.setattr(
            v.lookup(ROOT_INO, b"src").unwrap().ino,
            SetAttr {
                size: Some(300_000),
                ..Default::default()
            },
        )
        .unwrap();
        v.write(src, 200_000, b"tail").unwrap();
        let (_, dst) = v.create(ROOT_INO, b"dst", 0o644, 0, ME).unwrap();
        v.write(dst, 0, &[9u8; 250_000]).unwrap();
        assert_eq!(v.copy_file_range(src, 0, dst, 0, 300_000).unwrap(), 300_000);
        let got = v.read(dst, 0, 300_000).unwrap();
        let mut want = vec![0u8; 300_000];
        want[200_000..200_004].copy_from_slice(b"tail");
        assert!(got == want);
    }

    // ----- the daemon's read-ahead (volume/ahead.rs) -----

    const REQ: u32 = 128 << 10;

    /// The member files holding inode `ino`'s data (checksum tables left out).
    fn member_files(dirs: &[std::path::PathBuf], ino: u64) -> Vec<std::path::PathBuf> {
        let prefix = format!("{ino}.");
        dirs.iter()
            .flat_map(|d| std::fs::read_dir(d.join("data")).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with(&prefix) && !n.ends_with(".sum")
            })
            .collect()
    }

    /// Overwrites every member file of `ino` with other bytes, behind the
    /// daemon's back: a read that reaches the members now fails its
    /// checksums (one copy, nothing to repair from).
    fn spoil(dirs: &[std::path::PathBuf], ino: u64) {
        use std::os::unix::fs::FileExt;
        let files = member_files(dirs, ino);
        assert!(!files.is_empty());
        for p in files {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let len = f.metadata().unwrap().len() as usize;
            f.write_all_at(&vec![0xEEu8; len], 0).unwrap();
        }
    }

    /// A file of 8 requests in one extent, written and synced, one copy.
    fn streamed_file() -> (
        tempfile::TempDir,
        Vec<std::path::PathBuf>,
        crate::fs::Vfs,
        u64,
        u64,
        Vec<u8>,
    ) {
        let (d, dirs) = setup(1, 4 << 20);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let data = pattern(1, 8 * REQ as usize);
        v.write(fh, 0, &data).unwrap();
        v.fsync(fh, false).unwrap();
        (d, dirs, v, a.ino, fh, data)
    }

    /// A request that continues a stream is answered from the range read
    /// ahead after the one before: the members are not read again (they are
    /// spoiled in between, and the read still returns the file's bytes).
    #[test]
    fn a_stream_read_is_served_from_the_range_read_ahead() {
        let (_d, dirs, v, ino, fh, data) = streamed_file();
        let r = REQ as usize;
        assert_eq!(&*v.read_stream(fh, 0, REQ).unwrap(), &data[..r]);
        assert_eq!(
            &*v.read_stream(fh, REQ as u64, REQ).unwrap(),
            &data[r..2 * r]
        );
        v.read_ahead(fh, REQ as u64, REQ);
        spoil(&dirs, ino);
        let got = v.read_stream(fh, 2 * REQ as u64, REQ).unwrap();
        assert_eq!(&*got, &data[2 * r..3 * r]);
        // The next range was not read ahead: it comes from the spoiled members.
        assert!(matches!(
            v.read_stream(fh, 3 * REQ as u64, REQ),
            Err(FsError::Io(_))
        ));
    }

    /// A read that does not continue a stream reads nothing ahead, and a
    /// file's ranges read ahead are dropped when its last handle closes.
    #[test]
    fn only_a_stream_is_read_ahead_and_only_while_the_file_is_open() {
        let (_d, dirs, v, ino, fh, _data) = streamed_file();
        let r = REQ as u64;
        v.read_stream(fh, 5 * r, REQ).unwrap();
        v.read_ahead(fh, 5 * r, REQ);
        v.read_stream(fh, 0, REQ).unwrap();
        v.read_stream(fh, r, REQ).unwrap();
        v.read_ahead(fh, r, REQ);
        v.release(fh).unwrap();
        spoil(&dirs, ino);
        let fh = v.open(ino, false).unwrap();
        for at in [6 * r, 2 * r] {
            assert!(
                matches!(v.read_stream(fh, at, REQ), Err(FsError::Io(_))),
                "a range at {at} was kept"
            );
        }
    }

    /// Every kind of change made after a range was read ahead shows in the
    /// read of that range: the range read ahead is dropped, not served.
    #[test]
    fn a_change_after_the_read_ahead_shows_in_the_read() {
        let r = REQ as u64;
        let ru = REQ as usize;
        // (what, the change: vfs, inode, handle, the bytes it leaves)
        type Change<'a> = Box<dyn Fn(&crate::fs::Vfs, u64, u64, &mut Vec<u8>) + 'a>;
        let changes: Vec<(&str, Change)> = vec![
            (
                "write",
                Box::new(|v, _ino, fh, want| {
                    let new = pattern(9, 1000);
                    v.write(fh, 2 * r + 5000, &new).unwrap();
                    want[2 * ru + 5000..2 * ru + 6000].copy_from_slice(&new);
                }),
            ),
            (
                "punch",
                Box::new(|v, _ino, fh, want| {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    v.fallocate(fh, 2 * r, 8192, mode).unwrap();
                    want[2 * ru..2 * ru + 8192].fill(0);
                }),
            ),
            (
                "zero range",
                Box::new(|v, _ino, fh, want| {
                    v.fallocate(fh, 2 * r + 4096, 4096, libc::FALLOC_FL_ZERO_RANGE)
                        .unwrap();
                    want[2 * ru + 4096..2 * ru + 8192].fill(0);
                }),
            ),
            (
                "truncate and extend",
                Box::new(|v, ino, _fh, want| {
                    let size = want.len() as u64;
                    for s in [2 * r + 100, size] {
                        let set = SetAttr {
                            size: Some(s),
                            ..SetAttr::default()
                        };
                        v.setattr(ino, set).unwrap();
                    }
                    want[2 * ru + 100..].fill(0);
                }),
            ),
            (
                "copy_file_range",
                Box::new(|v, _ino, fh, want| {
                    let (_, src) = v.create(ROOT_INO, b"src", 0o644, 0, ME).unwrap();
                    let new = pattern(5, 8192);
                    v.write(src, 0, &new).unwrap();
                    assert_eq!(v.copy_file_range(src, 0, fh, 2 * r, 8192).unwrap(), 8192);
                    want[2 * ru..2 * ru + 8192].copy_from_slice(&new);
                    v.release(src).unwrap();
                }),
            ),
        ];
        for (what, change) in changes {
            let (_d, _dirs, v, ino, fh, mut want) = streamed_file();
            v.read_stream(fh, 0, REQ).unwrap();
            v.read_stream(fh, r, REQ).unwrap();
            v.read_ahead(fh, r, REQ);
            change(&v, ino, fh, &mut want);
            let got = v.read_stream(fh, 2 * r, REQ).unwrap();
            assert!(
                *got == want[2 * ru..3 * ru],
                "{what}: the range read ahead was served"
            );
        }
    }

    /// A writer and a streaming reader at once: every read shows at least
    /// the version of each block whose write was acknowledged before the
    /// read began (a range read ahead before such a write must not be
    /// served).
    #[test]
    fn a_streaming_reader_sees_every_write_acknowledged_before_its_read() {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        const BLOCKS: usize = 64;
        const BS: usize = 4096;
        const REQ_BLOCKS: usize = 4;
        let (_d, dirs) = setup(1, 1 << 20);
        let v = open(&dirs[0]);
        let (_, fh) = v.create(ROOT_INO, b"img", 0o644, 0, ME).unwrap();
        let block = |b: usize, ver: u32| -> Vec<u8> {
            let mut x = vec![0u8; BS];
            x[..4].copy_from_slice(&ver.to_le_bytes());
            x[4..8].copy_from_slice(&(b as u32).to_le_bytes());
            x
        };
        for b in 0..BLOCKS {
            v.write(fh, (b * BS) as u64, &block(b, 0)).unwrap();
        }
        let acked: Vec<AtomicU32> = (0..BLOCKS).map(|_| AtomicU32::new(0)).collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut ver = 0u32;
                let mut b = 7usize;
                while !stop.load(Ordering::Acquire) {
                    ver += 1;
                    b = (b * 17 + 5) % BLOCKS;
                    v.write(fh, (b * BS) as u64, &block(b, ver)).unwrap();
                    acked[b].store(ver, Ordering::Release);
                }
            });
            // The writer stops when the reader is done, or fails.
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _stop = Stop(&stop);
            let t0 = std::time::Instant::now();
            let mut reads = 0;
            while t0.elapsed() < std::time::Duration::from_millis(400) || reads < 200 {
                for r in 0..BLOCKS / REQ_BLOCKS {
                    let off = (r * REQ_BLOCKS * BS) as u64;
                    let len = (REQ_BLOCKS * BS) as u32;
                    let floor: Vec<u32> = (r * REQ_BLOCKS..(r + 1) * REQ_BLOCKS)
                        .map(|b| acked[b].load(Ordering::Acquire))
                        .collect();
                    let got = v.read_stream(fh, off, len).unwrap();
                    for (i, want) in floor.iter().enumerate() {
                        let b = r * REQ_BLOCKS + i;
                        let x = &got[i * BS..(i + 1) * BS];
                        let ver = u32::from_le_bytes(x[..4].try_into().unwrap());
                        assert_eq!(u32::from_le_bytes(x[4..8].try_into().unwrap()), b as u32);
                        assert!(
                            ver >= *want,
                            "block {b}: version {ver} read after {want} was acknowledged"
                        );
                    }
                    v.read_ahead(fh, off, len);
                    reads += 1;
                }
            }
        });
    }
}
