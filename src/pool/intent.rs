//! The write-intent log: before the first change to an extent since the last
//! commit, a record naming it is appended to `intent.<tag % 2>` in the member
//! directory of every copy and fdatasynced. After an unclean stop, the extents
//! named by records whose tag is above the durable generation are the only ones
//! whose data may differ from what the last commit describes (cf. the md
//! write-intent bitmap): changed-block tracking marks them wholly changed, so a
//! later incremental snapshot may over-report but never misses a write.
//!
//! Record (32 bytes, little-endian):
//! `0 magic [4] "VPIN" | 4 tag u64 | 12 ino u64 | 20 index u64 | 28 crc32c(0..28) u32`.
//! A torn or damaged record fails its checksum and is skipped: it was never
//! followed by a data write, which waits for the record's fdatasync.
//!
//! Tags: writers log under the tag `T` = the generation of the next commit. A
//! commit of generation `G` first moves the tag to `G + 1` (no write is in
//! flight then: the caller holds the write gate), syncs data, commits, and then
//! truncates `intent.<G % 2>`, whose records all have tags `<= G` and are
//! covered. A truncate lost to a crash only leaves stale records, which recovery
//! ignores (tag `<=` durable generation).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::{Condvar, Mutex};

pub const INTENT_MAGIC: &[u8; 4] = b"VPIN";
pub const RECORD_LEN: usize = 32;

fn path(dir: &Path, parity: u64) -> PathBuf {
    dir.join(format!("intent.{}", parity % 2))
}

pub fn encode(tag: u64, ino: u64, index: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..4].copy_from_slice(INTENT_MAGIC);
    r[4..12].copy_from_slice(&tag.to_le_bytes());
    r[12..20].copy_from_slice(&ino.to_le_bytes());
    r[20..28].copy_from_slice(&index.to_le_bytes());
    let crc = crc32c::crc32c(&r[0..28]);
    r[28..32].copy_from_slice(&crc.to_le_bytes());
    r
}

/// `(tag, ino, index)` of a valid record.
pub fn decode(r: &[u8]) -> Option<(u64, u64, u64)> {
    if r.len() != RECORD_LEN || &r[0..4] != INTENT_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(r[28..32].try_into().ok()?);
    if crc32c::crc32c(&r[0..28]) != crc {
        return None;
    }
    let u = |a: usize| u64::from_le_bytes(r[a..a + 8].try_into().unwrap_or_default());
    Some((u(4), u(12), u(20)))
}

/// One member's pair of intent files. Appends are group-committed: records
/// queued while another thread is writing and syncing go out together in the
/// next write and fdatasync, so many extents starting to change at once (after
/// every commit) cost a few syncs, not one each.
pub struct IntentLog {
    dir: PathBuf,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Open files and their lengths, by parity; taken by the leader while it writes.
    files: [Option<(File, u64)>; 2],
    queue: Vec<(u64, [u8; RECORD_LEN])>,
    /// Sequence number of the next queued record.
    next: u64,
    /// Records with a sequence number below this are durable (or failed).
    durable: u64,
    /// Records with a sequence number below this whose write failed, and why.
    failed: Option<(u64, io::ErrorKind, String)>,
    leader: bool,
}

impl IntentLog {
    pub fn new(dir: &Path) -> IntentLog {
        IntentLog {
            dir: dir.to_path_buf(),
            state: Mutex::new(State::default()),
            done: Condvar::new(),
        }
    }

    fn open(dir: &Path, parity: u64) -> io::Result<(File, u64)> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path(dir, parity))?;
        let len = f.metadata()?.len();
        // A torn record at the end is skipped by readers; append after whole ones.
        Ok((f, len - len % RECORD_LEN as u64))
    }

    /// Writes `batch` to the files and syncs them; returns the files.
    fn write_batch(
        dir: &Path,
        mut files: [Option<(File, u64)>; 2],
        batch: &[(u64, [u8; RECORD_LEN])],
    ) -> ([Option<(File, u64)>; 2], io::Result<()>) {
        let mut touched = [false; 2];
        for (tag, rec) in batch {
            let p = (tag % 2) as usize;
            if files[p].is_none() {
                match Self::open(dir, *tag) {
                    Ok(f) => files[p] = Some(f),
                    Err(e) => return (files, Err(e)),
                }
            }
            if let Some((f, len)) = files[p].as_mut() {
                if let Err(e) = f.write_all_at(rec, *len) {
                    return (files, Err(e));
                }
                *len += RECORD_LEN as u64;
                touched[p] = true;
            }
        }
        for p in 0..2 {
            if touched[p]
                && let Some((f, _)) = files[p].as_ref()
                && let Err(e) = f.sync_data()
            {
                return (files, Err(e));
            }
        }
        (files, Ok(()))
    }

    /// Appends one record under `tag` and returns once it is durable.
    pub fn append(&self, tag: u64, ino: u64, index: u64) -> io::Result<()> {
        let mut g = self.state.lock();
        let me = g.next;
        g.next += 1;
        g.queue.push((tag, encode(tag, ino, index)));
        loop {
            if g.durable > me {
                return match &g.failed {
                    Some((upto, kind, msg)) if me < *upto => {
                        Err(io::Error::new(*kind, msg.clone()))
                    }
                    _ => Ok(()),
                };
            }
            if g.leader {
                self.done.wait(&mut g);
                continue;
            }
            // Lead: write everything queued so far in one go.
            g.leader = true;
            let batch = std::mem::take(&mut g.queue);
            let upto = g.next;
            let files = std::mem::take(&mut g.files);
            drop(g);
            let (files, res) = Self::write_batch(&self.dir, files, &batch);
            g = self.state.lock();
            g.files = files;
            g.leader = false;
            g.durable = upto;
            if let Err(e) = res {
                g.failed = Some((upto, e.kind(), e.to_string()));
            }
            self.done.notify_all();
        }
    }

    /// Drops the records of the file for `tag`'s parity (all covered by a durable
    /// commit of generation `tag`).
    pub fn clear(&self, tag: u64) -> io::Result<()> {
        let mut g = self.state.lock();
        while g.leader {
            self.done.wait(&mut g);
        }
        let slot = &mut g.files[(tag % 2) as usize];
        match slot {
            Some((f, len)) => {
                if *len > 0 {
                    f.set_len(0)?;
                    *len = 0;
                }
            }
            None => {
                let p = path(&self.dir, tag);
                if p.exists() {
                    OpenOptions::new().write(true).open(p)?.set_len(0)?;
                }
            }
        }
        Ok(())
    }

    /// Extents named by records with a tag above `durable`.
    pub fn pending(&self, durable: u64) -> io::Result<BTreeSet<(u64, u64)>> {
        let mut out = BTreeSet::new();
        for parity in 0..2 {
            let mut buf = Vec::new();
            match File::open(path(&self.dir, parity)) {
                Ok(mut f) => {
                    f.read_to_end(&mut buf)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            for r in buf.chunks_exact(RECORD_LEN) {
                if let Some((tag, ino, index)) = decode(r)
                    && tag > durable
                {
                    out.insert((ino, index));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_pending_filters_by_tag() {
        let d = tempfile::tempdir().unwrap();
        let log = IntentLog::new(d.path());
        log.append(5, 10, 0).unwrap();
        log.append(6, 11, 2).unwrap();
        log.append(6, 12, 3).unwrap();
        let p = log.pending(5).unwrap();
        assert_eq!(p.into_iter().collect::<Vec<_>>(), vec![(11, 2), (12, 3)]);
        log.clear(6).unwrap();
        assert!(log.pending(5).unwrap().is_empty());
        assert_eq!(log.pending(4).unwrap().len(), 1);
        let mut r = encode(1, 2, 3);
        r[13] ^= 1;
        assert!(decode(&r).is_none());
    }

    #[test]
    fn concurrent_appends_are_all_durable() {
        let d = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(IntentLog::new(d.path()));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        log.append(3, t, i).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(log.pending(2).unwrap().len(), 400);
    }
}
