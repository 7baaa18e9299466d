//! The `fuser` adapter: each callback opens a span, converts arguments,
//! calls the core ([`Vfs`]) and replies. No filesystem logic lives here.
//!
//! Observability: every request runs in a DEBUG span `fuse` with fields
//! `op`, the `ino`, `fh` and `size` it names (size: bytes asked, given or
//! set), then the `errno` it answers (0: success) and its duration `us`.
//! Logs written while a request is served carry these fields; a TRACE event
//! `served` closes each request (`VPOOL_LOG=vpool::fs::fuse=trace` shows one
//! line per request). With DEBUG off the span is disabled: no clock is read
//! and no field recorded.
//!
//! Why one file of about 900 lines: one job, the adapter; it has one
//! short callback per FUSE operation, each a span, a call and a reply, and
//! splitting them by operation would only scatter the same pattern.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::Empty;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::error::{FsError, FsResult};
use crate::fs::core::{Attr, Caller, SetAttr, TimeSet, Vfs};
use crate::pool::meta::{NodeKind, Timestamp};
use crate::volume::WriteMode;

/// How long the kernel may cache attributes and entries. Every change passes
/// through this daemon, so the kernel's copy only goes stale through us: the
/// kernel drops what its own requests change (size, times and allocation
/// after a write, truncate or fallocate), and the daemon invalidates what it
/// changes on its own ([`crate::fs::core::KernelCache`]).
const TTL: Duration = Duration::from_secs(1);

/// Reads of a cached open at least this long are served past the members'
/// page cache, and writes streamed (see `FuseFs::direct_read`,
/// `FuseFs::write_mode`).
const STREAM_IO: usize = 128 << 10;

pub struct FuseFs {
    vfs: Arc<Vfs>,
    writeback_cache: bool,
    direct_members: bool,
    max_background: u16,
    max_request: u32,
}

impl FuseFs {
    /// `writeback_cache`: let the kernel gather writes in its page cache (faster
    /// small and sequential writes; data reaches the daemon at writeback or fsync).
    /// `direct_members`: serve reads and writes of `O_DIRECT` opens with
    /// `O_DIRECT` member I/O where aligned (no second copy of a VM's disk in
    /// the host's page cache). `max_background`: background requests the
    /// kernel keeps in flight (`crate::daemon::background_requests`).
    /// `max_request`: the largest read or write asked for in one request
    /// (the kernel grants at most `fs.fuse.max_pages_limit` pages).
    pub fn new(
        vfs: Arc<Vfs>,
        writeback_cache: bool,
        direct_members: bool,
        max_background: u16,
        max_request: u32,
    ) -> FuseFs {
        FuseFs {
            vfs,
            writeback_cache,
            direct_members,
            max_background,
            max_request,
        }
    }

    /// Whether a request on a file opened with `flags` goes past the
    /// members' page cache.
    fn direct(&self, flags: OpenFlags) -> bool {
        self.direct_members && flags.0 & libc::O_DIRECT != 0
    }

    /// Whether a read goes past the members' page cache: an `O_DIRECT`
    /// open's ([`Self::direct`]), and a cached open's long one (at least
    /// [`STREAM_IO`]: readahead): the mount keeps those pages in its own
    /// cache (`FOPEN_KEEP_CACHE`), so caching them in the members' cache too
    /// is double caching, and its copy was a quarter of the CPU of a
    /// sequential read (docs/perf). Short reads keep the members' cache: its
    /// readahead serves them.
    fn direct_read(&self, flags: OpenFlags, size: usize) -> bool {
        self.direct(flags) || (self.direct_members && size >= STREAM_IO)
    }

    /// How a write reaches the members: an `O_DIRECT` open's past their
    /// cache; a cached open's long one (the writeback of a sequential
    /// writer's pages) streamed through it with write-behind; short ones
    /// through it, with write-behind when the mount holds the page in its
    /// own writeback cache (and the member pages dropped once written back,
    /// unless `odirect=cached`), else left to the members' cache (it absorbs
    /// small random writes).
    fn write_mode(&self, flags: OpenFlags, size: usize) -> WriteMode {
        write_mode(
            self.direct(flags),
            self.direct_members,
            self.writeback_cache,
            size,
        )
    }
}

/// [`FuseFs::write_mode`] as a pure function: `direct`, whether the open
/// goes past the members' cache; `direct_members` and `writeback_cache`, the
/// mount's options; `size`, the request's.
fn write_mode(direct: bool, direct_members: bool, writeback_cache: bool, size: usize) -> WriteMode {
    if direct {
        WriteMode::Direct
    } else if direct_members && size >= STREAM_IO {
        WriteMode::Stream
    } else if writeback_cache && direct_members {
        WriteMode::Behind
    } else if writeback_cache {
        WriteMode::BehindKept
    } else {
        WriteMode::Cached
    }
}

/// Invalidates the kernel's caches for changes made inside the daemon.
pub struct Invalidator(pub fuser::Notifier);

impl crate::fs::core::KernelCache for Invalidator {
    fn inval_inode(&self, ino: u64) {
        if let Err(e) = self.0.inval_inode(INodeNo(ino), 0, 0) {
            tracing::debug!(ino, error = %e, "cannot invalidate the kernel's cache");
        }
    }

    fn inval_attr(&self, ino: u64) {
        // A negative offset: attributes only, no page is touched (so no
        // page lock is waited for: safe while serving a request).
        if let Err(e) = self.0.inval_inode(INodeNo(ino), -1, 0) {
            tracing::debug!(ino, error = %e, "cannot invalidate the kernel's attributes");
        }
    }

    fn write_back(&self, ino: u64, from: u64) {
        // Invalidating a range makes the kernel write its dirty pages back
        // first (launder), through ordinary WRITE requests.
        if let Err(e) = self
            .0
            .inval_inode(INodeNo(ino), from.min(i64::MAX as u64) as i64, 0)
        {
            tracing::debug!(ino, error = %e, "cannot have the kernel write back its pages");
        }
    }

    fn inval_entry(&self, parent: u64, name: &[u8]) {
        if let Err(e) = self.0.inval_entry(INodeNo(parent), OsStr::from_bytes(name)) {
            tracing::debug!(parent, error = %e, "cannot invalidate a kernel dentry");
        }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// The span of one request (see the module doc).
struct Traced {
    span: tracing::Span,
    /// When it began; `None` when the span is disabled.
    t0: Option<Instant>,
}

impl Traced {
    /// The span of a request the worker serves at its own priority.
    fn new(op: &'static str) -> Traced {
        Traced::serving(op, false)
    }

    /// The span of a request, served at the writeback priority when
    /// `writeback` (see [`crate::fs::priority`]).
    fn serving(op: &'static str, writeback: bool) -> Traced {
        crate::fs::priority::serve(writeback);
        let span = tracing::debug_span!(
            "fuse",
            op,
            ino = Empty,
            fh = Empty,
            size = Empty,
            errno = Empty,
            us = Empty
        );
        let t0 = (!span.is_disabled()).then(Instant::now);
        Traced { span, t0 }
    }

    fn ino(self, ino: u64) -> Traced {
        self.span.record("ino", ino);
        self
    }

    fn fh(self, fh: u64) -> Traced {
        self.span.record("fh", fh);
        self
    }

    fn size(self, size: u64) -> Traced {
        self.span.record("size", size);
        self
    }

    /// Calls the core inside the span, then records the outcome.
    fn run<T>(self, call: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        let r = self.span.in_scope(call);
        if let Some(t0) = self.t0 {
            let errno = r.as_ref().map_or_else(|e| e.errno(), |_| 0);
            self.span.record("errno", errno);
            self.span.record("us", t0.elapsed().as_micros() as u64);
            tracing::trace!(parent: &self.span, "served");
        }
        r
    }
}

fn to_system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

fn from_system_time(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Timestamp { secs, nanos }
        }
    }
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDev => FileType::CharDevice,
        NodeKind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.ctime),
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The caller when it lacks `CAP_FSETID` (set-id bits must go when it
/// changes a file's size); taken as "not root", the request carries no
/// capabilities.
fn unprivileged(req: &Request) -> Option<Caller> {
    (req.uid() != 0).then(|| caller(req))
}

/// The time the kernel may keep attributes. Regular files are cached too:
/// with a TTL of zero every write cost two more round trips (a GETATTR for
/// the kernel's size and mode check, then a GETXATTR of
/// `security.capability` because each fresh attribute reply clears the
/// kernel's "no set-id, no capability" inode flag). Their allocation
/// (`st_blocks`) changes with writes: the kernel drops it after a direct or
/// write-through write, and `fsync` drops it here, so that `du` right after
/// `fsync` sees it.
fn attr_ttl(_a: &Attr) -> Duration {
    TTL
}

fn entry(reply: ReplyEntry, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.entry_with_ttls(&attr_ttl(&a), &TTL, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(from_system_time(s)),
    }
}

/// An xattr value or name list for a caller's buffer of `size` bytes (0:
/// the caller asks for the length only).
fn fit_xattr(v: Vec<u8>, size: u32) -> FsResult<Vec<u8>> {
    if size != 0 && v.len() > size as usize {
        return Err(FsError::Range);
    }
    Ok(v)
}

fn xattr(reply: ReplyXattr, size: u32, r: FsResult<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

fn attr(reply: ReplyAttr, r: FsResult<Attr>) {
    match r {
        Ok(a) => reply.attr(&attr_ttl(&a), &file_attr(&a)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn opened(reply: ReplyOpen, r: FsResult<u64>, flags: FopenFlags) {
    match r {
        Ok(fh) => reply.opened(FileHandle(fh), flags),
        Err(e) => reply.error(errno(&e)),
    }
}

fn data(reply: ReplyData, r: FsResult<impl std::ops::Deref<Target = [u8]>>) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(errno(&e)),
    }
}

fn written(reply: ReplyWrite, r: FsResult<u32>) {
    match r {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(errno(&e)),
    }
}

fn sought(reply: ReplyLseek, r: FsResult<u64>) {
    match r {
        Ok(o) => reply.offset(o as i64),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The kernel's request size (`max_pages`) follows the largest of
        // these; the readahead the kernel offers is smaller, so the write
        // size sets it, for reads as well (the mount's readahead is set
        // afterwards, `crate::daemon::tune_bdi`).
        let _ = config.set_max_write(self.max_request);
        let _ = config.set_max_readahead(self.max_request);
        let _ = config.set_max_background(self.max_background);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        // O_DIRECT requests submitted asynchronously (libaio, io_uring: a
        // VM's queue) reach the daemon together; without it the kernel
        // serves them one at a time.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // Set-id bits are cleared here on write and truncate (the kernel
        // says when: FUSE_WRITE_KILL_SUIDGID, or a size change by a caller
        // without CAP_FSETID), so the kernel sends no GETXATTR of
        // `security.capability` before each write (it marks the
        // superblock SB_NOSEC). vpool stores no file capability it would
        // have to drop: `security.*` xattrs are kept as given.
        if let Err(e) = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2) {
            tracing::debug!(unsupported = ?e, "the kernel does not offer FUSE_HANDLE_KILLPRIV_V2");
        }
        if self.writeback_cache {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = Traced::new("destroy").run(|| self.vfs.commit_final()) {
            tracing::error!(error = %e, "final commit at unmount failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = Traced::new("lookup")
            .ino(parent.0)
            .run(|| self.vfs.lookup(parent.0, name.as_bytes()));
        entry(reply, r);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        attr(
            reply,
            Traced::new("getattr")
                .ino(ino.0)
                .run(|| self.vfs.getattr(ino.0)),
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(from_system_time),
        };
        let mut t = Traced::new("setattr").ino(ino.0);
        if let Some(n) = size {
            t = t.size(n);
        }
        attr(
            reply,
            t.run(|| self.vfs.setattr_as(ino.0, s, unprivileged(req))),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        data(
            reply,
            Traced::new("readlink")
                .ino(ino.0)
                .run(|| self.vfs.readlink(ino.0)),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = Traced::new("mknod").ino(parent.0).run(|| {
            self.vfs
                .mknod(parent.0, name.as_bytes(), mode, umask, rdev, caller(req))
        });
        entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = Traced::new("mkdir").ino(parent.0).run(|| {
            self.vfs
                .mkdir(parent.0, name.as_bytes(), mode, umask, caller(req))
        });
        entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = Traced::new("unlink")
            .ino(parent.0)
            .run(|| self.vfs.unlink(parent.0, name.as_bytes()));
        empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = Traced::new("rmdir")
            .ino(parent.0)
            .run(|| self.vfs.rmdir(parent.0, name.as_bytes()));
        empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = Traced::new("symlink").ino(parent.0).run(|| {
            self.vfs.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
                caller(req),
            )
        });
        entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new("rename").ino(parent.0).run(|| {
            self.vfs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            )
        });
        empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = Traced::new("link")
            .ino(ino.0)
            .run(|| self.vfs.link(ino.0, newparent.0, newname.as_bytes()));
        entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let r = Traced::new("open")
            .ino(ino.0)
            .run(|| self.vfs.open(ino.0, write));
        // KEEP_CACHE: all writes pass through this mount, so cached pages stay valid.
        opened(reply, r, FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let direct = self.direct_read(flags, size as usize);
        // The kernel's readahead of a cached open: the daemon reads the
        // stream's next request ahead, after the reply (volume/ahead.rs).
        let stream = direct && !self.direct(flags);
        let r = Traced::new("read")
            .ino(ino.0)
            .fh(fh.0)
            .size(size as u64)
            .run(|| {
                if stream {
                    self.vfs.read_stream(fh.0, offset, size)
                } else {
                    self.vfs.read_io(fh.0, offset, size, direct)
                }
            });
        let served = r.is_ok();
        data(reply, r);
        if stream && served {
            let _ = Traced::new("read_ahead")
                .ino(ino.0)
                .fh(fh.0)
                .size(size as u64)
                .run(|| {
                    self.vfs.read_ahead(fh.0, offset, size);
                    Ok(())
                });
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel writing its page cache back (on its own or for an fsync).
        let writeback = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let r = Traced::serving("write", writeback)
            .ino(ino.0)
            .fh(fh.0)
            .size(data.len() as u64)
            .run(|| {
                if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
                    && self.vfs.kill_setid(ino.0, caller(req))?
                {
                    // The kernel keeps the mode it cached: drop it.
                    self.vfs.inval_kernel_attr(ino.0);
                }
                let mode = self.write_mode(flags, data.len());
                self.vfs.write_io(fh.0, offset, data, mode)
            });
        written(reply, r);
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do: writes reach the core as they come, and fsync
        // makes them durable.
        empty(
            reply,
            Traced::new("flush").ino(ino.0).fh(fh.0).run(|| Ok(())),
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new("release")
            .ino(ino.0)
            .fh(fh.0)
            .run(|| self.vfs.release(fh.0));
        empty(reply, r);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new(if datasync { "fdatasync" } else { "fsync" })
            .ino(ino.0)
            .fh(fh.0)
            .run(|| self.vfs.fsync(fh.0, datasync));
        // The allocation is now what `stat` must count (attributes are cached).
        self.vfs.inval_kernel_attr(ino.0);
        empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = Traced::new("opendir")
            .ino(ino.0)
            .run(|| self.vfs.opendir(ino.0));
        opened(reply, r, FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = Traced::new("readdir")
            .ino(ino.0)
            .fh(fh.0)
            .run(|| self.vfs.readdir(fh.0, ino.0, offset));
        match r {
            Ok(entries) => {
                for (next, e) in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        next,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new("releasedir")
            .ino(ino.0)
            .fh(fh.0)
            .run(|| self.vfs.releasedir(fh.0));
        empty(reply, r);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new("fsyncdir")
            .ino(ino.0)
            .fh(fh.0)
            .run(|| self.vfs.commit());
        empty(reply, r);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = Traced::new("statfs")
            .ino(ino.0)
            .run(|| Ok(self.vfs.statfs()));
        let (space, inodes) = match r {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e)),
        };
        let bs = 4096u64;
        let free_inodes = 1u64 << 32;
        reply.statfs(
            space.size / bs,
            space.free / bs,
            space.avail / bs,
            inodes + free_inodes,
            free_inodes,
            bs as u32,
            crate::fs::core::NAME_MAX as u32,
            bs as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new("setxattr")
            .ino(ino.0)
            .size(value.len() as u64)
            .run(|| self.vfs.setxattr(ino.0, name.as_bytes(), value, flags));
        empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = Traced::new("getxattr")
            .ino(ino.0)
            .size(size as u64)
            .run(|| fit_xattr(self.vfs.getxattr(ino.0, name.as_bytes())?, size));
        xattr(reply, size, r);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = Traced::new("listxattr")
            .ino(ino.0)
            .size(size as u64)
            .run(|| fit_xattr(self.vfs.listxattr(ino.0)?, size));
        xattr(reply, size, r);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = Traced::new("removexattr")
            .ino(ino.0)
            .run(|| self.vfs.removexattr(ino.0, name.as_bytes()));
        empty(reply, r);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions makes the kernel check modes; only existence is ours.
        let r = Traced::new("access")
            .ino(ino.0)
            .run(|| self.vfs.getattr(ino.0).map(|_| ()));
        empty(reply, r);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = Traced::new("create").ino(parent.0).run(|| {
            self.vfs
                .create(parent.0, name.as_bytes(), mode, umask, caller(req))
        });
        match r {
            Ok((a, fh)) => reply.created(
                &attr_ttl(&a),
                &file_attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = Traced::new("fallocate")
            .ino(ino.0)
            .fh(fh.0)
            .size(length)
            .run(|| self.vfs.fallocate(fh.0, offset, length, mode));
        empty(reply, r);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let t = Traced::new("lseek").ino(ino.0).fh(fh.0);
        if offset < 0 {
            return sought(reply, t.run(|| Err(FsError::Invalid)));
        }
        let fh = fh.0;
        if self.writeback_cache && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE) {
            // The kernel asks without writing back what its writeback cache
            // holds, so the daemon could call written data a hole. It is made
            // to write back its pages from `offset` first, from another thread:
            // the writes it sends need this session's threads, this one among
            // them, and the reply can come from anywhere.
            let vfs = self.vfs.clone();
            let spawned = std::thread::Builder::new()
                .name("vpool-seek".into())
                .spawn(move || {
                    let r = t.run(|| {
                        vfs.write_back_kernel(ino.0, offset as u64);
                        vfs.lseek(fh, offset as u64, whence)
                    });
                    sought(reply, r);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a thread for SEEK_DATA/SEEK_HOLE");
            }
            return;
        }
        let r = t.run(|| self.vfs.lseek(fh, offset as u64, whence));
        sought(reply, r);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let len = len.min(u32::MAX as u64 & !0xfff);
        let r = Traced::new("copy_file_range")
            .ino(ino_in.0)
            .fh(fh_in.0)
            .size(len)
            .run(|| {
                self.vfs
                    .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
            });
        written(reply, r.map(|n| n as u32));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tracing::field::{Field, Visit};
    use tracing::span;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::{Layer, filter::LevelFilter};

    use super::Traced;
    use crate::error::FsError;
    use crate::fs::testing::{ME, open, setup};
    use crate::pool::meta::ROOT_INO;

    /// A span's fields as text.
    #[derive(Default)]
    struct Fields(BTreeMap<String, String>);

    impl Visit for Fields {
        fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
            self.0.insert(f.name().into(), format!("{v:?}"));
        }
        fn record_str(&mut self, f: &Field, v: &str) {
            self.0.insert(f.name().into(), v.into());
        }
        fn record_u64(&mut self, f: &Field, v: u64) {
            self.0.insert(f.name().into(), v.to_string());
        }
        fn record_i64(&mut self, f: &Field, v: i64) {
            self.0.insert(f.name().into(), v.to_string());
        }
    }

    /// Collects the fields of every span as it closes, and the events.
    #[derive(Clone, Default)]
    struct Capture {
        spans: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
        events: Arc<Mutex<Vec<String>>>,
    }

    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
        fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
            let mut f = Fields::default();
            attrs.record(&mut f);
            ctx.span(id).unwrap().extensions_mut().insert(f);
        }

        fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
            let span = ctx.span(id).unwrap();
            let mut ext = span.extensions_mut();
            values.record(ext.get_mut::<Fields>().unwrap());
        }

        fn on_event(&self, e: &tracing::Event<'_>, ctx: Context<'_, S>) {
            let mut f = Fields::default();
            e.record(&mut f);
            let parent = ctx.event_span(e).map(|s| s.name()).unwrap_or("");
            self.events
                .lock()
                .push(format!("{parent}: {}", f.0["message"]));
        }

        fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
            let span = ctx.span(&id).unwrap();
            let f = span.extensions_mut().remove::<Fields>().unwrap();
            self.spans.lock().push(f.0);
        }
    }

    /// One request through the core, as a callback serves it: its span
    /// carries the operation, what it names, its errno and its duration.
    #[test]
    fn a_request_span_records_what_it_names_and_how_it_ended() {
        let (_d, dirs) = setup(1, 64 * 1024);
        let v = open(&dirs[0]);
        let (a, fh) = v.create(ROOT_INO, b"f", 0o644, 0, ME).unwrap();
        v.write(fh, 0, b"hello").unwrap();
        let cap = Capture::default();
        let sub = tracing_subscriber::registry().with(cap.clone());
        tracing::subscriber::with_default(sub, || {
            let r = Traced::new("read")
                .ino(a.ino)
                .fh(fh)
                .size(5)
                .run(|| v.read(fh, 0, 5));
            assert_eq!(r.unwrap(), b"hello");
            let r = Traced::new("lookup")
                .ino(ROOT_INO)
                .run(|| v.lookup(ROOT_INO, b"nope"));
            assert!(matches!(r, Err(FsError::NotFound)));
        });
        let spans = cap.spans.lock();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let read = &spans[0];
        assert_eq!(read["op"], "read");
        assert_eq!(read["ino"], a.ino.to_string());
        assert_eq!(read["fh"], fh.to_string());
        assert_eq!(read["size"], "5");
        assert_eq!(read["errno"], "0");
        assert!(read["us"].parse::<u64>().is_ok(), "{read:?}");
        let lookup = &spans[1];
        assert_eq!(lookup["op"], "lookup");
        assert_eq!(lookup["ino"], ROOT_INO.to_string());
        assert_eq!(lookup["errno"], libc::ENOENT.to_string());
        assert!(!lookup.contains_key("fh"), "{lookup:?}");
        assert_eq!(*cap.events.lock(), ["fuse: served", "fuse: served"]);
        v.release(fh).unwrap();
    }

    /// Which writes go how: an O_DIRECT open's past the members' cache; a
    /// cached open's long ones streamed; its short ones with write-behind
    /// when the mount holds its own copy (writeback cache), else cached.
    /// `odirect=cached` (direct_members off) never streams.
    #[test]
    fn write_modes_follow_the_open_the_size_and_the_mount() {
        use super::{STREAM_IO, write_mode};
        use crate::volume::WriteMode::*;
        let small = 4096;
        let long = STREAM_IO;
        assert_eq!(write_mode(true, true, true, small), Direct);
        assert_eq!(write_mode(true, true, false, long), Direct);
        assert_eq!(write_mode(false, true, true, long), Stream);
        assert_eq!(write_mode(false, true, false, long), Stream);
        assert_eq!(write_mode(false, true, true, long - 1), Behind);
        assert_eq!(write_mode(false, false, true, long), BehindKept);
        assert_eq!(write_mode(false, false, true, small), BehindKept);
        assert_eq!(write_mode(false, true, false, small), Cached);
        assert_eq!(write_mode(false, false, false, long), Cached);
    }

    /// Below DEBUG the span is disabled: no clock read, nothing recorded.
    #[test]
    fn a_request_span_costs_nothing_below_debug() {
        let cap = Capture::default();
        let sub = tracing_subscriber::registry().with(cap.clone().with_filter(LevelFilter::INFO));
        tracing::subscriber::with_default(sub, || {
            let t = Traced::new("getattr").ino(1);
            assert!(t.span.is_disabled());
            assert!(t.t0.is_none());
            assert_eq!(t.run(|| Ok(7)).unwrap(), 7);
        });
        assert!(cap.spans.lock().is_empty());
        assert!(cap.events.lock().is_empty());
    }
}
