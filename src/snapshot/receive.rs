//! Receiving a stream (crate::stream::format) as a new snapshot.
//!
//! Invariants (the same order as a capture's, design.md section 22):
//! - nothing is published before the stream's end record has checked: the
//!   delta files are written under a fresh snapshot id, each finished and
//!   synced, their directories synced, and only then the record is put in
//!   the store for the caller's commit; an error removes every file written,
//!   and a crash before the commit leaves files no record names, which
//!   recovery removes;
//! - an incremental applies only on a snapshot with its base's identity; a
//!   stream whose identity the pool holds already is refused;
//! - every frame is decompressed once on the way in (its size checked), so a
//!   snapshot that was received reads back.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use super::delta::{DeltaHeader, DeltaWriter};
use super::record::{
    DeltaLoc, Kind, Origin, SnapshotInfo, SnapshotRecord, State, check_name, delta_dir,
    place_delta, prepare_delta_paths, sync_delta_dir,
};
use super::send::record_of;
use super::store::{SnapshotStore, delta_err};
use crate::error::FsError;
use crate::pool::meta::{InodeRecord, NodeKind, ROOT_INO, Timestamp};
use crate::stream::format::{Begin, Checker, Decoder, Record};
use crate::util::Progress;

/// How a receive went wrong: why, and whether resuming can help (a stream
/// cut or damaged in transit can; a refusal cannot).
#[derive(Debug)]
pub struct ReceiveError {
    pub error: FsError,
    pub resumable: bool,
}

impl From<FsError> for ReceiveError {
    fn from(error: FsError) -> Self {
        ReceiveError {
            error,
            resumable: false,
        }
    }
}

fn stream_err(msg: String) -> ReceiveError {
    ReceiveError {
        error: FsError::Message(format!("stream rejected: {msg}")),
        resumable: true,
    }
}

fn refuse(msg: String) -> ReceiveError {
    ReceiveError {
        error: FsError::Message(msg),
        resumable: false,
    }
}

/// The delta being written for one file.
struct Open {
    ino: u64,
    writer: Option<DeltaWriter>,
    members: Vec<u32>,
    size: u64,
}

impl SnapshotStore {
    /// Reads the stream from `dec` (its magic already read) and publishes it
    /// as a complete snapshot named `name` (default: the stream's). The
    /// caller commits. `progress` counts stream bytes of `total` (0 when
    /// unknown).
    pub fn receive<R: Read>(
        &self,
        dec: &mut Decoder<R>,
        name: Option<&str>,
        progress: Progress,
    ) -> Result<SnapshotInfo, ReceiveError> {
        let mut check = Checker::default();
        let next = |dec: &mut Decoder<R>, check: &mut Checker| -> Result<Record, ReceiveError> {
            let r = dec
                .next_record()
                .map_err(stream_err)?
                .ok_or_else(|| stream_err("no end record".into()))?;
            check.check(&r).map_err(stream_err)?;
            Ok(r)
        };
        let Record::Begin(begin) = next(dec, &mut check)? else {
            return Err(stream_err(
                "the stream does not start with a begin record".into(),
            ));
        };
        let (parent, name) = self.admit(&begin, name)?;
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let result = self.receive_into(dec, &mut check, &begin, id, parent, name.clone(), progress);
        match result {
            Ok(rec) => {
                let info = SnapshotInfo {
                    id,
                    name: rec.name.clone(),
                    kind: rec.kind.as_str().into(),
                    base: parent.and_then(|p| self.get(p)).map(|p| p.name.clone()),
                    created: rec.created.secs,
                    logical_bytes: rec.logical_bytes,
                    stored_bytes: rec.stored_bytes,
                    changed_blocks: rec.changed_blocks,
                    state: "complete".into(),
                    held: false,
                    received: true,
                    identity: crate::stream::ident_text(&begin.snapshot),
                };
                self.publish(rec);
                self.pool.emit(
                    "snapshot_received",
                    crate::pool::info::Severity::Info,
                    None,
                    format!(
                        "snapshot {name} received: {} block(s), {} stored",
                        info.changed_blocks,
                        crate::util::human(info.stored_bytes)
                    ),
                );
                Ok(info)
            }
            Err(e) => {
                self.remove_snapshot_dirs(id);
                Err(e)
            }
        }
    }

    /// Whether the stream may apply here: its block size, its base held, its
    /// snapshot not yet, its name free. Returns the base's id and the name.
    fn admit(&self, b: &Begin, name: Option<&str>) -> Result<(Option<u64>, String), ReceiveError> {
        if u64::from(b.block_size) != self.bs {
            return Err(refuse(format!(
                "the stream's block size is {} bytes, this pool's {}: receive it into a pool created with --block-size {}",
                b.block_size, self.bs, b.block_size
            )));
        }
        if let Some(have) = self.by_identity(&b.snapshot) {
            return Err(refuse(format!(
                "this pool holds that snapshot already, as {}",
                have.name
            )));
        }
        let parent = if b.incremental {
            match self.by_identity(&b.base) {
                Some(r) if r.state == State::Complete => Some(r.id),
                _ => {
                    return Err(refuse(format!(
                        "this pool does not hold the stream's base (snapshot {} of pool {}, taken at {}): receive the streams in order, or send a full stream",
                        b.base.id,
                        uuid::Uuid::from_bytes(b.base.pool),
                        b.base.secs
                    )));
                }
            }
        } else {
            None
        };
        let name = name.unwrap_or(&b.name).to_string();
        check_name(&name).map_err(|_| refuse(format!("{name:?} is not a valid snapshot name")))?;
        if self.by_name(&name).is_some() {
            return Err(refuse(format!(
                "a snapshot named {name} exists; receive under another name with --name"
            )));
        }
        Ok((parent, name))
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_into<R: Read>(
        &self,
        dec: &mut Decoder<R>,
        check: &mut Checker,
        begin: &Begin,
        id: u64,
        parent: Option<u64>,
        name: String,
        progress: Progress,
    ) -> Result<SnapshotRecord, ReceiveError> {
        let mut inodes: BTreeMap<u64, InodeRecord> = BTreeMap::new();
        let mut dirents: BTreeMap<(u64, Vec<u8>), u64> = BTreeMap::new();
        let mut deltas: BTreeMap<u64, DeltaLoc> = BTreeMap::new();
        let mut open: Option<Open> = None;
        let mut tree_checked = false;
        let mut blocks = 0u64;
        let mut stored = 0u64;
        let mut members_used = BTreeSet::new();
        let bs = self.bs;
        // Every frame is decompressed once, to check that it holds its
        // blocks, by a verifier thread while the records that follow are
        // written; the snapshot is published only if none failed.
        let failed: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u32, Vec<u8>)>(64);
        let failed_ref = &failed;
        std::thread::scope(|sc| -> Result<(), ReceiveError> {
            // Owned here: dropped when this closure returns, which ends the verifier.
            let tx = tx;
            sc.spawn(move || verify_frames(rx, failed_ref, bs));
            loop {
                let r = dec
                    .next_record()
                    .map_err(stream_err)?
                    .ok_or_else(|| stream_err("no end record".into()))?;
                check.check(&r).map_err(stream_err)?;
                if !tree_checked && !matches!(r, Record::Inode(_) | Record::Dirent { .. }) {
                    check_tree(&inodes, &dirents).map_err(stream_err)?;
                    tree_checked = true;
                }
                if matches!(r, Record::File { .. } | Record::End { .. })
                    && let Some(o) = open.take()
                    && let Some(w) = o.writer
                {
                    let (entries, len) =
                        w.finish().map_err(|e| ReceiveError::from(delta_err(e)))?;
                    stored += len;
                    members_used.extend(o.members.iter().copied());
                    deltas.insert(
                        o.ino,
                        DeltaLoc {
                            members: o.members,
                            seq: 0,
                            stored: len,
                            blocks: entries.iter().map(|e| u64::from(e.count)).sum(),
                        },
                    );
                }
                match r {
                    Record::Inode(i) => {
                        inodes.insert(i.ino, record_of(&i));
                    }
                    Record::Dirent {
                        parent,
                        name,
                        child,
                    } => {
                        dirents.insert((parent, name), child);
                    }
                    Record::File { ino, size } => {
                        open = Some(Open {
                            ino,
                            writer: None,
                            members: Vec::new(),
                            size,
                        });
                    }
                    Record::Data {
                        start,
                        count,
                        crc,
                        frame,
                    } => {
                        let w = self.writer(&mut open, id, parent)?;
                        w.add_raw(start, count, &frame, crc)
                            .map_err(|e| ReceiveError::from(delta_err(e)))?;
                        blocks += u64::from(count);
                        // Checked by the verifier while the next records arrive.
                        let _ = tx.send((start, count, frame));
                    }
                    Record::Zero { start, count } => {
                        self.writer(&mut open, id, parent)?
                            .add_zero(start, count)
                            .map_err(|e| ReceiveError::from(delta_err(e)))?;
                        blocks += count;
                    }
                    Record::Hole { start, count } => {
                        self.writer(&mut open, id, parent)?
                            .add_hole(start, count)
                            .map_err(|e| ReceiveError::from(delta_err(e)))?;
                        blocks += count;
                    }
                    Record::End { .. } => break,
                    Record::Begin(_) | Record::Resume(_) => {
                        return Err(stream_err("a begin record inside the stream".into()));
                    }
                }
                if !progress(dec.offset, 0) {
                    return Err(FsError::Cancelled.into());
                }
            }
            Ok(())
        })?;
        if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(stream_err(e));
        }
        // The end record checked; nothing may follow it.
        if dec.next_record().map_err(stream_err)?.is_some() {
            return Err(stream_err("records after the end".into()));
        }
        for m in &members_used {
            if let Some(d) = delta_dir(&self.pool, *m, id) {
                sync_delta_dir(&self.pool, &d).map_err(|e| ReceiveError::from(FsError::Io(e)))?;
            }
        }
        let logical = inodes
            .values()
            .filter(|r| r.kind == NodeKind::File)
            .map(|r| r.size)
            .sum();
        Ok(SnapshotRecord {
            id,
            name,
            kind: if parent.is_some() {
                Kind::Incremental
            } else {
                Kind::Full
            },
            parent,
            created: Timestamp {
                secs: begin.snapshot.secs,
                nanos: begin.snapshot.nanos,
            },
            state: State::Complete,
            block_size: bs as u32,
            inodes,
            dirents,
            deltas,
            interval: BTreeMap::new(),
            logical_bytes: logical,
            stored_bytes: stored,
            changed_blocks: blocks,
            origin: Some(Origin {
                pool: begin.snapshot.pool,
                id: begin.snapshot.id,
            }),
        })
    }

    /// The delta writer of the file being received, created at its first run.
    fn writer<'a>(
        &self,
        open: &'a mut Option<Open>,
        id: u64,
        parent: Option<u64>,
    ) -> Result<&'a mut DeltaWriter, ReceiveError> {
        let Some(o) = open.as_mut() else {
            return Err(stream_err("data outside a file".into()));
        };
        if o.writer.is_none() {
            let members = place_delta(&self.pool)?;
            let paths = prepare_delta_paths(&self.pool, &members, id, o.ino, 0)?;
            let header = DeltaHeader {
                snap_id: id,
                base_id: parent.unwrap_or(0),
                ino: o.ino,
                file_size: o.size,
                block_size: self.bs as u32,
            };
            let level = self.level.load(std::sync::atomic::Ordering::Relaxed);
            let w = DeltaWriter::create(self.pool.storage_arc(), &paths, &header, level)
                .map_err(|e| ReceiveError::from(delta_err(e)))?;
            o.writer = Some(w);
            o.members = members;
        }
        o.writer
            .as_mut()
            .ok_or_else(|| refuse("no delta writer".into()))
    }
}

/// Decompresses every frame it is sent, keeping the first failure.
fn verify_frames(
    rx: std::sync::mpsc::Receiver<(u64, u32, Vec<u8>)>,
    failed: &std::sync::Mutex<Option<String>>,
    bs: u64,
) {
    let mut frames = match crate::stream::format::Frames::new() {
        Ok(f) => f,
        Err(e) => {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            return;
        }
    };
    for (start, count, frame) in rx {
        let want = u64::from(count) * bs;
        if let Err(e) = frames.decompress(&frame, want as usize) {
            let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                *f = Some(format!("data at block {start}: {e}"));
            }
        }
    }
}

/// The tree a stream carries must be one: the root a directory, every other
/// directory named by exactly one entry (in the directory its record names
/// as parent), every inode reachable from the root.
fn check_tree(
    inodes: &BTreeMap<u64, InodeRecord>,
    dirents: &BTreeMap<(u64, Vec<u8>), u64>,
) -> Result<(), String> {
    if inodes.get(&ROOT_INO).map(|r| r.kind) != Some(NodeKind::Dir) {
        return Err("no root directory".into());
    }
    let mut named: BTreeMap<u64, u32> = BTreeMap::new();
    for ((p, name), c) in dirents {
        *named.entry(*c).or_default() += 1;
        if let Some(r) = inodes.get(c)
            && r.kind == NodeKind::Dir
            && r.parent != *p
        {
            return Err(format!(
                "directory {:?} (inode {c}) is in {p}, its record says {}",
                String::from_utf8_lossy(name),
                r.parent
            ));
        }
    }
    for (ino, r) in inodes {
        if *ino != ROOT_INO && r.kind == NodeKind::Dir && named.get(ino) != Some(&1) {
            return Err(format!("directory inode {ino} is not named exactly once"));
        }
    }
    let mut seen = BTreeSet::from([ROOT_INO]);
    let mut stack = vec![ROOT_INO];
    while let Some(d) = stack.pop() {
        for ((_, _), c) in dirents
            .range((d, Vec::new())..)
            .take_while(|((p, _), _)| *p == d)
        {
            if seen.insert(*c) && inodes.get(c).is_some_and(|r| r.kind == NodeKind::Dir) {
                stack.push(*c);
            }
        }
    }
    if seen.len() != inodes.len() {
        return Err(format!(
            "{} inode(s) not reachable from the root",
            inodes.len() - seen.len()
        ));
    }
    Ok(())
}
