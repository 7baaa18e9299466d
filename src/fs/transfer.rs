//! `vpool snapshot send` and `receive` at the filesystem's level: names,
//! the admin lock, the commit, and the spool that lets an interrupted
//! receive resume (design.md section 22.4).
//!
//! A receive copies every stream byte it reads to a spool file in a member
//! (`recv/<identity>.part`, [`crate::pool::layout::recv_spool`]). When the
//! stream breaks off or a record fails its check, the spool is cut at the
//! last good record and synced, and the answer carries a resume token: the
//! snapshot's identity, that offset and the CRC of the bytes before it.
//! `send --resume TOKEN` writes the same stream again (sends are
//! deterministic), checks the CRC of what it skips, and sends `MAGIC R`
//! then the rest; the receive replays the spool, then reads on. A complete
//! receive, a refusal, or `receive --abort` removes the spool.

use std::io::{Read, Write};
use std::sync::Arc;

use super::Progress;
use super::core::Vfs;
use crate::error::{FsError, FsResult};
use crate::pool::layout;
use crate::snapshot::SnapshotInfo;
use crate::snapshot::send::SendReport;
use crate::storage::{Handle, OpenMode};
use crate::stream::format::{self, Decoder, Identity, MAGIC, Record, Resume};

/// A receive that did not complete: why, and the token to resume it with
/// when resuming can help.
#[derive(Debug)]
pub struct ReceiveFailure {
    pub error: FsError,
    pub token: Option<String>,
}

impl From<FsError> for ReceiveFailure {
    fn from(error: FsError) -> Self {
        ReceiveFailure { error, token: None }
    }
}

/// Skips the first `skip` bytes of a stream (checking their CRC against the
/// token's), then writes `MAGIC R` and the rest.
struct ResumeWriter<'a> {
    out: &'a mut dyn Write,
    token: Resume,
    seen: u64,
    crc: u32,
}

impl Write for ResumeWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = buf;
        if self.seen < self.token.offset {
            let n = (self.token.offset - self.seen).min(b.len() as u64) as usize;
            self.crc = crc32c::crc32c_append(self.crc, &b[..n]);
            self.seen += n as u64;
            b = &b[n..];
            if self.seen == self.token.offset {
                if self.crc != self.token.prefix_crc {
                    return Err(std::io::Error::other(
                        "the snapshot's stream differs from the one the receive kept (a snapshot was deleted and merged meanwhile?): send again without --resume, after `vpool snapshot receive --abort` on the receiving pool",
                    ));
                }
                self.out.write_all(MAGIC)?;
                self.out
                    .write_all(&Record::Resume(self.token.clone()).encode())?;
            }
        }
        if !b.is_empty() {
            self.out.write_all(b)?;
            self.seen += b.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Copies what the decoder reads to the spool.
struct Tee<R> {
    inner: R,
    spool: Handle,
    at: u64,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.spool.write_all_at(&buf[..n], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Reads `len` bytes of a handle from the start.
struct Prefix {
    h: Handle,
    at: u64,
    len: u64,
}

impl Read for Prefix {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.at).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let k = self.h.read_at(&mut buf[..n], self.at)?;
        if k == 0 {
            return Err(std::io::Error::other(
                "the receive's spool is shorter than it was",
            ));
        }
        self.at += k as u64;
        Ok(k)
    }
}

impl Vfs {
    /// Writes the stream of snapshot `name` (relative to `base`) to `out`; with
    /// `resume`, only what an interrupted receive is missing.
    pub fn snapshot_send(
        &self,
        name: &str,
        base: Option<&str>,
        resume: Option<&str>,
        out: &mut dyn Write,
        progress: Progress,
    ) -> FsResult<SendReport> {
        let complete = |n: &str| {
            self.snaps
                .by_name(n)
                .filter(|r| r.state == crate::snapshot::State::Complete)
                .ok_or_else(|| FsError::Message(format!("no complete snapshot named {n}")))
        };
        let rec = complete(name)?;
        let base_rec = base.map(complete).transpose()?;
        if base_rec.as_ref().is_some_and(|b| b.id == rec.id) {
            return Err(FsError::Message(format!("{name} cannot be its own base")));
        }
        let Some(tok) = resume else {
            let r = self
                .snaps
                .send(rec.id, base_rec.as_ref().map(|b| b.id), out, progress)?;
            self.note_sent(&rec, &r);
            return Ok(r);
        };
        let token = format::token_decode(tok).map_err(FsError::Message)?;
        if token.snapshot != self.snaps.identity(&rec) {
            return Err(FsError::Message(format!(
                "the resume token is for another snapshot than {name}"
            )));
        }
        let mut w = ResumeWriter {
            out,
            token: token.clone(),
            seen: 0,
            crc: 0,
        };
        let mut r = self
            .snaps
            .send(rec.id, base_rec.map(|b| b.id), &mut w, progress)?;
        if w.seen < token.offset {
            return Err(FsError::Message(
                "the resume token points past the end of the stream".into(),
            ));
        }
        r.bytes = w.seen - token.offset;
        self.note_sent(&rec, &r);
        Ok(r)
    }

    /// Records a completed send in the operational record (`vpool status`
    /// shows the newest snapshot that left the pool) and as an event.
    fn note_sent(&self, rec: &crate::snapshot::SnapshotRecord, r: &SendReport) {
        use crate::pool::info::{KEY_SENT, SentRecord, Severity};
        let newer = self
            .pool
            .info
            .get::<SentRecord>(KEY_SENT)
            .is_none_or(|s| s.created <= rec.created.secs);
        if newer {
            self.pool.info.put(
                KEY_SENT,
                &SentRecord {
                    snapshot: rec.name.clone(),
                    created: rec.created.secs,
                    base: r.base.clone(),
                    at: self.pool.storage().now().0,
                    bytes: r.bytes,
                },
            );
        }
        self.pool.emit(
            "snapshot_sent",
            Severity::Info,
            None,
            format!(
                "snapshot {} sent{}: {}",
                rec.name,
                r.base
                    .as_ref()
                    .map(|b| format!(" from {b}"))
                    .unwrap_or_default(),
                crate::util::human(r.bytes)
            ),
        );
    }

    /// Receives a stream from `input` as a new snapshot (named `name`, or
    /// as the stream says), committed before it returns. With `resumable`,
    /// what arrives is kept for a resume (a pipe or a socket); without, it
    /// is not (a stream read from a file: a retry reads the file again, and
    /// writing its bytes twice cost a third of the receive).
    pub fn snapshot_receive(
        &self,
        input: &mut dyn Read,
        name: Option<&str>,
        resumable: bool,
        progress: Progress,
    ) -> Result<SnapshotInfo, ReceiveFailure> {
        self.writable()?;
        let _admin = self.snaps.admin.lock();
        let mut input = std::io::BufReader::with_capacity(1 << 20, input);
        let (first, raw) = {
            let mut head = Decoder::new(&mut input).map_err(msg)?;
            head.next_raw()
                .map_err(msg)?
                .ok_or_else(|| msg("the stream is empty".into()))?
        };
        if !resumable && matches!(first, Record::Begin(_)) {
            let mut head = MAGIC.to_vec();
            head.extend_from_slice(&raw);
            let mut dec = Decoder::new(std::io::Cursor::new(head).chain(input)).map_err(msg)?;
            let info = self
                .snaps
                .receive(&mut dec, name, progress)
                .map_err(|e| ReceiveFailure::from(e.error))?;
            self.commit()?;
            return Ok(info);
        }
        let (ident, spool, replay) = match &first {
            Record::Begin(b) => {
                let path = self.spool_path(&b.snapshot)?;
                let h = self
                    .pool
                    .storage()
                    .open(&path, OpenMode::REPLACE)
                    .map_err(FsError::Io)?;
                let mut head = MAGIC.to_vec();
                head.extend_from_slice(&raw);
                h.write_all_at(&head, 0).map_err(FsError::Io)?;
                let replay: Box<dyn Read> = Box::new(std::io::Cursor::new(head));
                (b.snapshot, (path, h), replay)
            }
            Record::Resume(r) => {
                let path = self.spool_path(&r.snapshot)?;
                let h = self
                    .pool
                    .storage()
                    .open(&path, OpenMode::WRITE)
                    .map_err(|_| {
                        msg("this pool has no interrupted receive of that snapshot (completed, aborted, or sent elsewhere): send it again without --resume".into())
                    })?;
                let len = h.len().map_err(FsError::Io)?;
                let mut crc = 0;
                let mut at = 0;
                let mut buf = vec![0u8; 1 << 20];
                while at < r.offset.min(len) {
                    let n = (r.offset - at).min(buf.len() as u64) as usize;
                    h.read_exact_at(&mut buf[..n], at).map_err(FsError::Io)?;
                    crc = crc32c::crc32c_append(crc, &buf[..n]);
                    at += n as u64;
                }
                if len < r.offset || crc != r.prefix_crc {
                    return Err(msg("the interrupted receive kept other bytes than the resume token says: `vpool snapshot receive --abort`, then send again without --resume".into()));
                }
                h.set_len(r.offset).map_err(FsError::Io)?;
                let replay: Box<dyn Read> = Box::new(Prefix {
                    h: h.clone(),
                    at: 0,
                    len: r.offset,
                });
                (r.snapshot, (path, h), replay)
            }
            _ => {
                return Err(msg(
                    "the stream starts with neither a begin nor a resume record".into(),
                ));
            }
        };
        let (path, h) = spool;
        let start = match &first {
            Record::Resume(r) => r.offset,
            _ => (MAGIC.len() + raw.len()) as u64,
        };
        let tee = Tee {
            inner: input,
            spool: h.clone(),
            at: start,
        };
        let mut dec = Decoder::new(replay.chain(tee)).map_err(msg)?;
        let result = self.snaps.receive(&mut dec, name, progress);
        let storage = self.pool.storage();
        match result {
            Ok(info) => {
                self.commit()?;
                drop(h);
                let _ = storage.remove_file(&path);
                Ok(info)
            }
            Err(e) if e.resumable && dec.offset > MAGIC.len() as u64 => {
                // Keep what checked, for a resume.
                let kept = h.set_len(dec.offset).and_then(|_| h.sync_all());
                let token = kept.is_ok().then(|| {
                    format::token_encode(&Resume {
                        snapshot: ident,
                        offset: dec.offset,
                        prefix_crc: dec.crc(),
                    })
                });
                Err(ReceiveFailure {
                    error: e.error,
                    token,
                })
            }
            Err(e) => {
                drop(h);
                let _ = storage.remove_file(&path);
                Err(e.error.into())
            }
        }
    }

    /// Removes the spools of every interrupted receive; returns how many.
    pub fn receive_abort(&self) -> FsResult<usize> {
        let _admin = self.snaps.admin.lock();
        let storage = self.pool.storage();
        let mut n = 0;
        for m in self.pool.members().iter() {
            let dir = m.dir.join(layout::RECV_DIR);
            for f in storage.list(&dir).unwrap_or_default() {
                if storage.remove_file(&dir.join(&f)).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Where the spool of a receive of `ident` goes: the member it is on
    /// already, or the one placement picks.
    fn spool_path(&self, ident: &Identity) -> FsResult<std::path::PathBuf> {
        let storage = self.pool.storage();
        let members: Vec<Arc<crate::pool::Member>> = self.pool.members().to_vec();
        for m in &members {
            let p = layout::recv_spool(&m.dir, &ident.hex());
            if storage.exists(&p) {
                return Ok(p);
            }
        }
        let id = self.pool.place(&[], 0)?;
        let m = self
            .pool
            .member(id)
            .ok_or_else(|| FsError::Message("no member for the receive's spool".into()))?;
        let dir = m.dir.join(layout::RECV_DIR);
        crate::storage::create_dir_all(storage, &dir).map_err(FsError::Io)?;
        Ok(layout::recv_spool(&m.dir, &ident.hex()))
    }
}

fn msg(m: String) -> ReceiveFailure {
    FsError::Message(format!("stream rejected: {m}")).into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::fs::testing::{ME, open, setup};
    use crate::pool::meta::{NodeKind, ROOT_INO};
    use crate::snapshot::send::FileRun;

    /// Everything a snapshot shows: per path, kind, mode, owner, size,
    /// times, xattrs, target, content and runs (holes and zeros kept apart).
    type Tree = BTreeMap<Vec<u8>, (String, Vec<u8>, Vec<FileRun>)>;

    fn tree(v: &Vfs, name: &str) -> Tree {
        let rec = v.snaps.by_name(name).unwrap();
        let mut out = Tree::new();
        let mut stack = vec![(Vec::new(), ROOT_INO)];
        while let Some((path, dir)) = stack.pop() {
            for ((_, n), c) in rec
                .dirents
                .range((dir, Vec::new())..)
                .take_while(|((p, _), _)| *p == dir)
            {
                let mut p = path.clone();
                p.push(b'/');
                p.extend_from_slice(n);
                let r = &rec.inodes[c];
                let meta = format!(
                    "{:?} {:o} {}:{} size {} nlink {} mtime {:?} xattrs {:?} target {:?}",
                    r.kind, r.mode, r.uid, r.gid, r.size, r.nlink, r.mtime, r.xattrs, r.target
                );
                let (data, runs) = if r.kind == NodeKind::File {
                    (
                        v.snaps.read(rec.id, *c, 0, r.size).unwrap(),
                        v.snaps.file_runs(rec.id, *c).unwrap(),
                    )
                } else {
                    (Vec::new(), Vec::new())
                };
                if r.kind == NodeKind::Dir {
                    stack.push((p.clone(), *c));
                }
                out.insert(p, (meta, data, runs));
            }
        }
        out
    }

    fn snap(v: &Vfs, name: &str) {
        v.snapshot_create(name, None).unwrap();
        v.snapshot_wait().unwrap();
    }

    fn send(v: &Vfs, name: &str, base: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        v.snapshot_send(name, base, None, &mut out, &mut |_, _| true)
            .unwrap();
        out
    }

    fn receive(v: &Vfs, stream: &[u8]) -> Result<SnapshotInfo, ReceiveFailure> {
        v.snapshot_receive(&mut &stream[..], None, true, &mut |_, _| true)
    }

    const BS: u64 = 4096;

    /// A source pool with three snapshots of a changing tree: data, zeros,
    /// holes, punches, growth, shrinking, new and removed files, a
    /// directory, a symlink, a hard link and xattrs.
    fn source() -> (tempfile::TempDir, Vfs) {
        let (d, dirs) = setup(2, 64 * 1024);
        let v = open(&dirs[0]);
        let (f, fh) = v.create(ROOT_INO, b"disk.img", 0o640, 0, ME).unwrap();
        let mut data = vec![0u8; 200 * BS as usize];
        // Incompressible, so that stream sizes say what they carry.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        v.write(fh, 0, &data[..100 * BS as usize]).unwrap();
        v.write(fh, 100 * BS, &vec![0u8; 20 * BS as usize]).unwrap();
        // Blocks 120..150 stay a hole; data again after.
        v.write(fh, 150 * BS, &data[..30 * BS as usize + 123])
            .unwrap();
        v.setxattr(f.ino, b"user.vm", b"alpha", 0).unwrap();
        let dir = v.mkdir(ROOT_INO, b"sub", 0o750, 0, ME).unwrap();
        let (g, gh) = v.create(dir.ino, b"g", 0o600, 0, ME).unwrap();
        v.write(gh, 0, b"hello world").unwrap();
        v.symlink(dir.ino, b"link", b"../disk.img", ME).unwrap();
        v.link(g.ino, ROOT_INO, b"g-again").unwrap();
        snap(&v, "s1");
        // Rewrite, punch, grow, shrink, add, remove.
        v.write(fh, 10 * BS, &[9u8; 3 * BS as usize]).unwrap();
        v.fallocate(
            fh,
            40 * BS,
            8 * BS,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        v.write(fh, 300 * BS, b"tail").unwrap();
        v.setattr(
            g.ino,
            crate::fs::core::SetAttr {
                size: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
        let (_, hh) = v.create(ROOT_INO, b"new", 0o644, 0, ME).unwrap();
        v.write(hh, 5 * BS, &[1u8; 100]).unwrap();
        v.release(hh).unwrap();
        v.unlink(ROOT_INO, b"g-again").unwrap();
        snap(&v, "s2");
        v.write(fh, 11 * BS, &[8u8; 10]).unwrap();
        v.setattr(
            f.ino,
            crate::fs::core::SetAttr {
                size: Some(60 * BS + 7),
                ..Default::default()
            },
        )
        .unwrap();
        v.write(fh, 70 * BS, &[3u8; 2 * BS as usize]).unwrap();
        v.setxattr(f.ino, b"user.vm", b"beta", 0).unwrap();
        snap(&v, "s3");
        v.release(fh).unwrap();
        v.release(gh).unwrap();
        (d, v)
    }

    #[test]
    fn a_chain_sent_and_received_reads_as_the_source() {
        let (_ds, a) = source();
        let (_db, bdirs) = setup(3, 64 * 1024);
        let b = open(&bdirs[0]);
        let full = send(&a, "s1", None);
        let i2 = send(&a, "s2", Some("s1"));
        let i3 = send(&a, "s3", Some("s2"));
        for s in [&full, &i2, &i3] {
            receive(&b, s).unwrap();
        }
        for n in ["s1", "s2", "s3"] {
            assert_eq!(tree(&a, n), tree(&b, n), "{n}");
        }
        // The incremental carries about what changed, not the image.
        assert!(i3.len() < full.len() / 4, "{} vs {}", i3.len(), full.len());
        let list = b.snapshot_list();
        assert!(list.iter().all(|s| s.received && s.state == "complete"));
        assert_eq!(list[2].base.as_deref(), Some("s2"));
        // Skipping one: s3 from s1 into a pool that has only s1.
        let (_dc, cdirs) = setup(2, 64 * 1024);
        let c = open(&cdirs[0]);
        receive(&c, &full).unwrap();
        receive(&c, &send(&a, "s3", Some("s1"))).unwrap();
        assert_eq!(tree(&a, "s3"), tree(&c, "s3"));
        // And B sends on what it received: the identities travel.
        let (_dd, ddirs) = setup(1, 64 * 1024);
        let d = open(&ddirs[0]);
        receive(&d, &send(&b, "s2", None)).unwrap();
        receive(&d, &send(&b, "s3", Some("s2"))).unwrap();
        assert_eq!(tree(&a, "s3"), tree(&d, "s3"));
        // The received snapshots survive a remount and deleting a middle one.
        drop(b);
        let b = open(&bdirs[0]);
        b.snapshot_delete("s2").unwrap();
        assert_eq!(tree(&a, "s3"), tree(&b, "s3"));
        assert_eq!(tree(&a, "s1"), tree(&b, "s1"));
    }

    #[test]
    fn received_snapshots_restore_and_clone_into_the_live_tree() {
        let (_ds, a) = source();
        let (_db, bdirs) = setup(2, 64 * 1024);
        let b = open(&bdirs[0]);
        // B has live files of its own, with the inode numbers A used.
        let (x, xh) = b.create(ROOT_INO, b"disk.img", 0o600, 0, ME).unwrap();
        b.write(xh, 0, b"unrelated").unwrap();
        b.release(xh).unwrap();
        snap(&b, "local");
        receive(&b, &send(&a, "s2", None)).unwrap();
        b.snapshot_restore("s2", &[b"disk.img".to_vec()]).unwrap();
        let want = tree(&a, "s2");
        let got = b
            .read(b.open(x.ino, false).unwrap(), 0, 400 * BS as u32)
            .unwrap();
        assert_eq!(got, want[&b"/disk.img".to_vec()].1);
        b.snapshot_clone("s2", b"sub/g", b"g-clone").unwrap();
        let gc = b.lookup(ROOT_INO, b"g-clone").unwrap();
        assert_eq!(
            b.read(b.open(gc.ino, false).unwrap(), 0, 100).unwrap(),
            b"hello"
        );
        // The pool's own next snapshot builds on its own one, not on s2.
        snap(&b, "local2");
        let l2 = b
            .snapshot_list()
            .into_iter()
            .find(|s| s.name == "local2")
            .unwrap();
        assert_eq!(l2.base.as_deref(), Some("local"));
    }

    #[test]
    fn damaged_or_cut_streams_leave_nothing_and_resume() {
        let (_ds, a) = source();
        let (_db, bdirs) = setup(2, 64 * 1024);
        let b = open(&bdirs[0]);
        let full = send(&a, "s1", None);
        // A flipped byte in the data: refused, nothing published, a token.
        let mut bad = full.clone();
        let at = full.len() * 2 / 3;
        bad[at] ^= 1;
        let e = receive(&b, &bad).unwrap_err();
        assert!(e.error.to_string().contains("corrupted"), "{}", e.error);
        assert!(b.snapshot_list().is_empty());
        let tok = e.token.expect("a token");
        // The resumed stream carries only the rest.
        let mut rest = Vec::new();
        a.snapshot_send("s1", None, Some(&tok), &mut rest, &mut |_, _| true)
            .unwrap();
        assert!(rest.len() < full.len());
        let info = receive(&b, &rest).unwrap();
        assert_eq!(info.name, "s1");
        assert_eq!(tree(&a, "s1"), tree(&b, "s1"));
        // A spool no longer exists once done.
        for d in &bdirs {
            let r = d.join(layout::RECV_DIR);
            assert!(
                std::fs::read_dir(&r)
                    .map(|mut i| i.next().is_none())
                    .unwrap_or(true)
            );
        }
        // A frame whose checksum matches but that does not hold its blocks
        // (a crafted stream): refused by the verifier, nothing published.
        let mut dec = crate::stream::format::Decoder::new(&full[..]).unwrap();
        let mut enc = crate::stream::format::Encoder::new(Vec::new()).unwrap();
        let mut spoiled = false;
        while let Some(r) = dec.next_record().unwrap() {
            let r = match r {
                Record::End { .. } => break,
                Record::Data { start, count, .. } if !spoiled => {
                    spoiled = true;
                    let frame = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
                    Record::Data {
                        start,
                        count,
                        crc: crc32c::crc32c(&frame),
                        frame,
                    }
                }
                r => r,
            };
            enc.put(&r).unwrap();
        }
        let crafted = enc.finish().unwrap();
        let (_dx, xdirs) = setup(1, 64 * 1024);
        let x = open(&xdirs[0]);
        let e = receive(&x, &crafted).unwrap_err();
        assert!(
            e.error.to_string().contains("does not declare"),
            "{}",
            e.error
        );
        assert!(x.snapshot_list().is_empty());
        // Cut short at any point: refused, nothing published.
        let i2 = send(&a, "s2", Some("s1"));
        for cut in [9, 40, i2.len() / 2, i2.len() - 1] {
            let e = receive(&b, &i2[..cut]).unwrap_err();
            assert!(
                e.error.to_string().contains("truncated")
                    || e.error.to_string().contains("end of input"),
                "{cut}: {}",
                e.error
            );
            assert_eq!(b.snapshot_list().len(), 1);
        }
        // The last cut resumes.
        let e = receive(&b, &i2[..i2.len() - 1]).unwrap_err();
        let mut rest = Vec::new();
        a.snapshot_send(
            "s2",
            Some("s1"),
            e.token.as_deref(),
            &mut rest,
            &mut |_, _| true,
        )
        .unwrap();
        receive(&b, &rest).unwrap();
        assert_eq!(tree(&a, "s2"), tree(&b, "s2"));
        // Refusals: the same snapshot again, a missing base, a taken name.
        let e = receive(&b, &i2).unwrap_err();
        assert!(
            e.error.to_string().contains("holds that snapshot already"),
            "{}",
            e.error
        );
        assert!(e.token.is_none());
        let (_dc, cdirs) = setup(1, 64 * 1024);
        let c = open(&cdirs[0]);
        let e = receive(&c, &send(&a, "s3", Some("s2"))).unwrap_err();
        assert!(
            e.error
                .to_string()
                .contains("does not hold the stream's base"),
            "{}",
            e.error
        );
        snap(&c, "s1");
        let e = receive(&c, &full).unwrap_err();
        assert!(
            e.error.to_string().contains("named s1 exists"),
            "{}",
            e.error
        );
        c.snapshot_receive(&mut &full[..], Some("copy"), false, &mut |_, _| true)
            .unwrap();
        // A token for another snapshot, and garbage.
        let mut sink = Vec::new();
        assert!(
            a.snapshot_send("s3", None, Some(&tok), &mut sink, &mut |_, _| true)
                .is_err()
        );
        assert!(receive(&c, b"not a stream at all").is_err());
        assert!(c.receive_abort().is_ok());
    }

    #[test]
    fn streams_restore_without_a_pool() {
        let (ds, a) = source();
        let want = tree(&a, "s3");
        let streams = [
            send(&a, "s1", None),
            send(&a, "s2", Some("s1")),
            send(&a, "s3", Some("s2")),
        ];
        drop(a);
        drop(ds);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("r");
        let mut inputs: Vec<(String, Box<dyn Read>)> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    format!("s{i}"),
                    Box::new(std::io::Cursor::new(s.clone())) as Box<dyn Read>,
                )
            })
            .collect();
        let sum = crate::stream::restore::restore(&mut inputs, &dest, &mut |_| {}).unwrap();
        assert_eq!(sum.snapshot, "s3");
        for (p, (meta, data, _)) in &want {
            let path = dest.join(std::str::from_utf8(&p[1..]).unwrap());
            if meta.starts_with("File") {
                assert_eq!(&std::fs::read(&path).unwrap(), data, "{}", path.display());
            } else if meta.starts_with("Symlink") {
                assert_eq!(
                    std::fs::read_link(&path).unwrap(),
                    std::path::Path::new("../disk.img")
                );
            } else {
                assert!(path.is_dir());
            }
        }
        assert!(!dest.join("g-again").exists());
        assert!(!dest.join(crate::stream::restore::STAGING).exists());
        // Out of order, a gap, or a damaged stream: refused with its name.
        let mut gap: Vec<(String, Box<dyn Read>)> = vec![
            (
                "full".into(),
                Box::new(std::io::Cursor::new(streams[0].clone())),
            ),
            (
                "third".into(),
                Box::new(std::io::Cursor::new(streams[2].clone())),
            ),
        ];
        let e = crate::stream::restore::restore(&mut gap, &out.path().join("g"), &mut |_| {})
            .unwrap_err();
        assert!(e.contains("third is based on"), "{e}");
        let mut cut = streams[1].clone();
        cut.truncate(cut.len() - 5);
        let mut bad: Vec<(String, Box<dyn Read>)> = vec![
            (
                "full".into(),
                Box::new(std::io::Cursor::new(streams[0].clone())),
            ),
            ("second".into(), Box::new(std::io::Cursor::new(cut))),
        ];
        let e = crate::stream::restore::restore(&mut bad, &out.path().join("b"), &mut |_| {})
            .unwrap_err();
        assert!(e.contains("second") && e.contains("truncated"), "{e}");
        // A damaged data frame: refused, naming the stream.
        let mut flip = streams[0].clone();
        let at = flip.len() / 2;
        flip[at] ^= 0x20;
        let mut bad: Vec<(String, Box<dyn Read>)> =
            vec![("damaged".into(), Box::new(std::io::Cursor::new(flip)))];
        let e = crate::stream::restore::restore(&mut bad, &out.path().join("d"), &mut |_| {})
            .unwrap_err();
        assert!(e.contains("damaged") && e.contains("corrupted"), "{e}");
        // verify agrees, and refuses a cut stream too.
        assert!(crate::stream::verify(&streams[2][..]).is_ok());
        let e = crate::stream::verify(&streams[2][..streams[2].len() - 3]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let mut flipped = streams[2].clone();
        let n = flipped.len() / 2;
        flipped[n] ^= 4;
        assert!(crate::stream::verify(&flipped[..]).is_err());
    }
}
