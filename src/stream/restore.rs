//! `vpool stream restore STREAM... DEST`: the files of the newest snapshot
//! of a chain of streams (a full, then incrementals each based on the one
//! before) rebuilt in an ordinary directory, without any pool.
//!
//! The files' contents are built by inode in a staging directory inside
//! DEST (`.vpool-restore/<ino>`): a full writes them, each incremental
//! changes the blocks it carries (holes punched, zeros allocated, sizes
//! set). After the last stream the tree of the newest snapshot is made:
//! directories, files moved into place (hard links for further names),
//! symlinks, FIFOs and devices, then owners (as root), modes, extended
//! attributes and times, directories' times last. DEST must be empty.
//!
//! Every stream is checked record by record as it is applied; a damaged or
//! truncated stream, or one that does not follow the one before, stops the
//! restore with a message naming it (DEST then holds a partial restore).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::format::{Checker, Decoder, Identity, Inode, InodeKind, Record};

/// A snapshot's tree: inodes, and entries by (parent, name).
type Tree = (BTreeMap<u64, Inode>, BTreeMap<(u64, Vec<u8>), u64>);

/// Where the files are built before they get their names.
pub const STAGING: &str = ".vpool-restore";

/// What a restore did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RestoreSummary {
    pub snapshot: String,
    pub streams: usize,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub other: u64,
    /// Bytes of data written (data runs).
    pub data_bytes: u64,
    /// Stream bytes read.
    pub stream_bytes: u64,
    pub seconds: f64,
    /// Attributes that could not be set (owners as non-root, devices, ...).
    pub notes: Vec<String>,
}

/// Restores the chain `streams` (in order: a full, then incrementals) into
/// `dest`. `progress(stream bytes read)` is called now and then.
pub fn restore(
    streams: &mut [(String, Box<dyn Read>)],
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<RestoreSummary, String> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    if std::fs::read_dir(dest)
        .map_err(|e| format!("{}: {e}", dest.display()))?
        .next()
        .is_some()
    {
        return Err(format!(
            "{} is not empty: restore into an empty directory",
            dest.display()
        ));
    }
    let staging = dest.join(STAGING);
    std::fs::create_dir(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut s = RestoreSummary {
        streams: streams.len(),
        ..Default::default()
    };
    let mut prev: Option<Identity> = None;
    let mut tree: Tree = Default::default();
    let mut read_before = 0u64;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    for (label, r) in streams.iter_mut() {
        let mut dec = Decoder::new(std::io::BufReader::with_capacity(1 << 20, r))
            .map_err(|e| format!("{label}: {e}"))?;
        let mut check = Checker::default();
        let mut inodes = BTreeMap::new();
        let mut dirents = BTreeMap::new();
        let mut file: Option<(std::sync::Arc<File>, u64)> = None;
        let mut bs = 0u64;
        // Frames are decompressed and written by `workers` threads (the
        // decompression is most of the CPU time); runs of one stream never
        // overlap, and the scope ends (every write done) before the next
        // stream, whose runs may rewrite these, starts.
        let failed: Mutex<Option<String>> = Mutex::new(None);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(workers * 8);
        let rx = Mutex::new(rx);
        std::thread::scope(|sc| -> Result<(), String> {
            // Owned here: dropped when this closure returns, which ends the writers.
            let tx = tx;
            for _ in 0..workers {
                sc.spawn(|| write_frames(&rx, &failed, dest));
            }
            let mut n = 0u64;
            while let Some(rec) = dec.next_record().map_err(|e| format!("{label}: {e}"))? {
                check.check(&rec).map_err(|e| format!("{label}: {e}"))?;
                match rec {
                    Record::Begin(b) => {
                        match (&prev, b.incremental) {
                            (None, true) => {
                                return Err(format!(
                                    "{label} is an incremental stream: the chain must start with a full one"
                                ));
                            }
                            (Some(p), true) if *p != b.base => {
                                return Err(format!(
                                    "{label} is based on {}, not on the stream before it ({})",
                                    super::ident_text(&b.base),
                                    super::ident_text(p)
                                ));
                            }
                            (Some(_), false) => {
                                return Err(format!(
                                    "{label} is a full stream: only the first of a chain can be"
                                ));
                            }
                            _ => {}
                        }
                        bs = u64::from(b.block_size);
                        prev = Some(b.snapshot);
                        s.snapshot = b.name.clone();
                    }
                    Record::Inode(i) => {
                        inodes.insert(i.ino, i);
                    }
                    Record::Dirent {
                        parent,
                        name,
                        child,
                    } => {
                        dirents.insert((parent, name), child);
                    }
                    Record::File { ino, size } => {
                        let path = staging.join(ino.to_string());
                        // A file this stream's base did not have as a file starts empty.
                        let fresh =
                            !matches!(tree.0.get(&ino), Some(i) if i.kind == InodeKind::File);
                        let f = OpenOptions::new()
                            .create(true)
                            .truncate(fresh)
                            .read(true)
                            .write(true)
                            .open(&path)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        f.set_len(size)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        file = Some((std::sync::Arc::new(f), size));
                    }
                    Record::Data {
                        start,
                        count,
                        frame,
                        ..
                    } => {
                        let (f, size) = file.as_ref().ok_or("data outside a file")?;
                        let want = count as usize * bs as usize;
                        let off = start * bs;
                        let len = (size.saturating_sub(off) as usize).min(want);
                        s.data_bytes += len as u64;
                        tx.send(Job {
                            file: f.clone(),
                            off,
                            start,
                            len,
                            want,
                            frame,
                        })
                        .map_err(|_| "the restore's writers stopped".to_string())?;
                    }
                    Record::Zero { start, count } | Record::Hole { start, count } => {
                        let (f, size) = file.as_ref().ok_or("data outside a file")?;
                        let off = start * bs;
                        let len = (count * bs).min(size.saturating_sub(off));
                        clear(f, off, len)
                            .map_err(|e| format!("writing {}: {e}", dest.display()))?;
                    }
                    Record::End { .. } | Record::Resume(_) => {}
                }
                n += 1;
                if n.is_multiple_of(64) {
                    progress(read_before + dec.offset);
                }
            }
            Ok(())
        })?;
        if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(format!("{label}: {e}"));
        }
        if !check.complete() {
            return Err(format!("{label}: the stream has no end record"));
        }
        read_before += dec.offset;
        s.stream_bytes = read_before;
        tree = (inodes, dirents);
    }
    build_tree(dest, &staging, &tree.0, &tree.1, &mut s)?;
    std::fs::remove_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    s.seconds = t0.elapsed().as_secs_f64();
    progress(read_before);
    Ok(s)
}

/// One data frame to write: its `want` decompressed bytes, the first `len`
/// of them at `off` of `file`.
struct Job {
    file: std::sync::Arc<File>,
    off: u64,
    /// Its first block, for messages.
    start: u64,
    len: usize,
    want: usize,
    frame: Vec<u8>,
}

/// A writer thread: decompresses and writes jobs until the channel closes;
/// the first error is kept in `failed` (the rest of the jobs are dropped).
fn write_frames(
    rx: &Mutex<std::sync::mpsc::Receiver<Job>>,
    failed: &Mutex<Option<String>>,
    dest: &Path,
) {
    let fail = |e: String| {
        let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    };
    let mut frames = match super::format::Frames::new() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    loop {
        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(j) = job else { return };
        if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            continue;
        }
        match frames.decompress(&j.frame, j.want) {
            Ok(data) => {
                if let Err(e) = j.file.write_all_at(&data[..j.len], j.off) {
                    fail(format!("writing {}: {e}", dest.display()));
                }
            }
            Err(e) => fail(format!("data at block {}: {e}", j.start)),
        }
    }
}

/// Makes `[off, off+len)` of `f` read as zeros without writing them: a hole
/// punched (the file keeps its size); where the filesystem cannot, zeros.
fn clear(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own, no pointers.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut p = off;
    while p < off + len {
        let n = (off + len - p).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], p)?;
        p += n as u64;
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{}: NUL in the name", p.display()))
}

/// The tree of the newest snapshot, made in `dest` from the staged files.
fn build_tree(
    dest: &Path,
    staging: &Path,
    inodes: &BTreeMap<u64, Inode>,
    dirents: &BTreeMap<(u64, Vec<u8>), u64>,
    s: &mut RestoreSummary,
) -> Result<(), String> {
    // Paths by breadth-first walk from the root; the first name of an
    // inode gets it, the others are hard links.
    let mut first: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut order: Vec<(u64, PathBuf)> = Vec::new();
    let mut queue = std::collections::VecDeque::from([(1u64, dest.to_path_buf())]);
    let mut dirs: Vec<(u64, PathBuf)> = vec![(1, dest.to_path_buf())];
    let mut seen = BTreeSet::from([1u64]);
    while let Some((d, dpath)) = queue.pop_front() {
        for ((_, name), c) in dirents
            .range((d, Vec::new())..)
            .take_while(|((p, _), _)| *p == d)
        {
            let p = dpath.join(OsStr::from_bytes(name));
            let Some(i) = inodes.get(c) else { continue };
            if i.kind == InodeKind::Dir {
                if !seen.insert(*c) {
                    continue;
                }
                std::fs::create_dir(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                s.directories += 1;
                dirs.push((*c, p.clone()));
                queue.push_back((*c, p));
            } else {
                order.push((*c, p));
            }
        }
    }
    for (ino, p) in &order {
        let Some(i) = inodes.get(ino) else { continue };
        if let Some(f) = first.get(ino) {
            std::fs::hard_link(f, p).map_err(|e| format!("{}: {e}", p.display()))?;
            continue;
        }
        match i.kind {
            InodeKind::File => {
                let staged = staging.join(ino.to_string());
                if staged.exists() {
                    std::fs::rename(&staged, p).map_err(|e| format!("{}: {e}", p.display()))?;
                } else {
                    // A file with no data record in any stream: empty at its size.
                    let f = File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    f.set_len(i.size)
                        .map_err(|e| format!("{}: {e}", p.display()))?;
                }
                s.files += 1;
            }
            InodeKind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&i.target), p)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                s.symlinks += 1;
            }
            InodeKind::Fifo | InodeKind::CharDev | InodeKind::BlockDev | InodeKind::Socket => {
                let ty = match i.kind {
                    InodeKind::Fifo => libc::S_IFIFO,
                    InodeKind::CharDev => libc::S_IFCHR,
                    InodeKind::BlockDev => libc::S_IFBLK,
                    _ => libc::S_IFSOCK,
                };
                let c = cpath(p)?;
                // SAFETY: a valid C string; mknod reads nothing else.
                let rc = unsafe {
                    libc::mknod(c.as_ptr(), ty | (i.mode & 0o7777), i.rdev as libc::dev_t)
                };
                if rc != 0 {
                    s.notes.push(format!(
                        "{}: not made ({})",
                        p.display(),
                        std::io::Error::last_os_error()
                    ));
                    continue;
                }
                s.other += 1;
            }
            InodeKind::Dir => {}
        }
        first.insert(*ino, p.clone());
    }
    // Attributes: non-directories, then directories deepest first (making
    // entries changed their times).
    for (ino, p) in first.iter() {
        if let Some(i) = inodes.get(ino) {
            set_attrs(p, i, s);
        }
    }
    dirs.sort_by_key(|(_, p)| std::cmp::Reverse(p.components().count()));
    for (ino, p) in &dirs {
        if let Some(i) = inodes.get(ino) {
            set_attrs(p, i, s);
        }
    }
    Ok(())
}

/// Owner (when allowed), mode, extended attributes and times of `p`, not
/// following a symlink. What cannot be set becomes a note.
fn set_attrs(p: &Path, i: &Inode, s: &mut RestoreSummary) {
    let Ok(c) = cpath(p) else { return };
    let mut note = |what: &str| {
        s.notes.push(format!(
            "{}: {what}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: valid C strings and buffers for each call; no pointer kept.
    unsafe {
        if libc::lchown(c.as_ptr(), i.uid, i.gid) != 0 && libc::geteuid() == 0 {
            note("owner");
        }
        for (name, value) in &i.xattrs {
            let Ok(n) = std::ffi::CString::new(name.clone()) else {
                continue;
            };
            if libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                0,
            ) != 0
            {
                note(&format!("xattr {}", String::from_utf8_lossy(name)));
            }
        }
        if i.kind != InodeKind::Symlink && libc::chmod(c.as_ptr(), i.mode & 0o7777) != 0 {
            note("mode");
        }
        let ts = [
            libc::timespec {
                tv_sec: i.atime.0 as libc::time_t,
                tv_nsec: i.atime.1 as libc::c_long,
            },
            libc::timespec {
                tv_sec: i.mtime.0 as libc::time_t,
                tv_nsec: i.mtime.1 as libc::c_long,
            },
        ];
        if libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            note("times");
        }
    }
}
