//! The mounted daemon: opens the pool, mounts it through FUSE, and serves until
//! unmounted or signalled. Around the session it runs the control socket, the
//! flusher (a durable commit every few seconds while anything is pending) and a
//! signal thread that turns SIGTERM/SIGINT/SIGHUP into a clean unmount.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use crate::control;
use crate::error::{Error, Result};
use crate::fs::fuse::FuseFs;
use crate::fs::{Vfs, VfsOptions};
use crate::pool::Pool;
use crate::pool::info::Severity;

/// How often pending changes are committed without an fsync asking for it.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// Mount options: the usual FUSE ones plus vpool's own.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    pub fuse: Vec<MountOption>,
    pub acl: SessionACL,
    pub read_only: bool,
    pub allow_nonempty: bool,
    pub threads: usize,
    /// `snapdir=visible`: list `.snapshots` in the root (it is always reachable by name).
    pub snapdir_visible: bool,
    /// `nowritebackcache` turns the kernel's writeback cache off.
    pub writeback_cache: bool,
    /// `odirect=cached` serves `O_DIRECT` opens with cached member I/O;
    /// the default (`odirect=direct`) uses `O_DIRECT` member I/O where the
    /// request is aligned, so that a VM with `cache=none` leaves the host's
    /// page cache alone, and for long requests of other opens, whose pages
    /// the mount caches itself.
    pub direct_members: bool,
    /// `max_request=SIZE`: the largest read or write the kernel sends in
    /// one request (default [`crate::kernel::DEFAULT_MAX_REQUEST`]; the
    /// daemon raises the host's `fs.fuse.max_pages_limit` to allow it).
    pub max_request: u32,
    /// `force` (`vpool mount --force`): open even when members diverged; the
    /// newest metadata copy wins and the other side's extent files are
    /// quarantined.
    pub force: bool,
    /// `writeback_nice=N` (0-19, default
    /// [`crate::fs::priority::WRITEBACK_NICE`]): the nice value of a worker
    /// while it writes the mount's page cache back, where the daemon has
    /// its own CPU share ([`crate::fs::priority::enable`]); 0 turns it off.
    pub writeback_nice: i32,
    /// `writeback_group_nice=N` (0-19, default
    /// [`crate::fs::priority::WRITEBACK_GROUP_NICE`]): the nice value of
    /// the daemon's autogroup while it serves only writeback
    /// ([`crate::fs::priority::enable_group`]); 0 turns it off.
    pub writeback_group_nice: i32,
    /// `event_hooks=DIR`: where the event hooks are (default
    /// [`crate::hooks::DEFAULT_DIR`]).
    pub event_hooks: Option<PathBuf>,
}

/// FUSE worker threads when `threads=` is not given: enough to keep a VM's
/// queue (32 requests in flight with `cache=none,aio=native`) reaching the
/// member disks, which is what the threads mostly wait for; 16 per CPU,
/// from 32 to 64 (on 2 CPUs, 32 workers served 4K random reads at qd 32
/// 40 % faster than 16, and 40 about 10 % slower than 32; an eighth is kept
/// from background requests, see [`background_requests`]). Each costs an
/// idle stack and a 1 MiB request buffer.
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 16).clamp(32, MAX_THREADS)
}

/// The kernel's limit on background requests in flight (writeback of the
/// mount's cache, asynchronous `O_DIRECT` requests) for `threads` workers:
/// all but an eighth of them (at least one), which always remain for
/// foreground requests. When every worker waited in a write (writeback
/// behind a snapshot's copy-before-write), a `stat`, or the
/// `security.capability` lookup the kernel makes before a write after each
/// attribute refresh, waited for one: a buffered writer stalled 77 ms on
/// that lookup. (On 2 CPUs, 32 workers with 28 in the background served 4K
/// random reads at qd 32 as fast as with 64 allowed.)
pub fn background_requests(threads: usize) -> u16 {
    (threads - (threads / 8).max(1)).clamp(1, u16::MAX as usize) as u16
}

/// Most FUSE worker threads `threads=` accepts.
pub const MAX_THREADS: usize = 64;

/// Options that are mount(8)'s or systemd's, not the filesystem's: fstab
/// lines carry them and mount helpers drop them.
pub fn is_helper_option(item: &str) -> bool {
    let key = item.split_once('=').map_or(item, |(k, _)| k);
    matches!(
        key,
        "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "_netdev"
            | "user"
            | "users"
            | "nouser"
            | "owner"
            | "group"
            | "comment"
            | "loud"
            | "silent"
            | "context"
            | "helper"
    ) || key.starts_with("x-")
}

impl MountOptions {
    pub fn parse(list: &[String]) -> Result<MountOptions> {
        let mut o = MountOptions {
            threads: default_threads(),
            writeback_cache: true,
            direct_members: true,
            max_request: crate::kernel::DEFAULT_MAX_REQUEST,
            writeback_nice: crate::fs::priority::WRITEBACK_NICE,
            writeback_group_nice: crate::fs::priority::WRITEBACK_GROUP_NICE,
            ..Default::default()
        };
        for item in list
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            match (k, v) {
                ("allow_other", None) => o.acl = SessionACL::All,
                ("allow_root", None) => o.acl = SessionACL::RootAndOwner,
                ("ro", None) => {
                    o.read_only = true;
                    o.fuse.push(MountOption::RO);
                }
                ("rw", None) => o.fuse.push(MountOption::RW),
                ("dev", None) => o.fuse.push(MountOption::Dev),
                ("nodev", None) => o.fuse.push(MountOption::NoDev),
                ("suid", None) => o.fuse.push(MountOption::Suid),
                ("nosuid", None) => o.fuse.push(MountOption::NoSuid),
                ("exec", None) => o.fuse.push(MountOption::Exec),
                ("noexec", None) => o.fuse.push(MountOption::NoExec),
                ("atime", None) => o.fuse.push(MountOption::Atime),
                ("noatime", None) => o.fuse.push(MountOption::NoAtime),
                ("sync", None) => o.fuse.push(MountOption::Sync),
                ("async", None) => o.fuse.push(MountOption::Async),
                ("dirsync", None) => o.fuse.push(MountOption::DirSync),
                ("auto_unmount", None) => o.fuse.push(MountOption::AutoUnmount),
                ("default_permissions", None) => {} // always on
                ("nonempty", None) => o.allow_nonempty = true,
                ("force", None) => o.force = true,
                ("nowritebackcache", None) => o.writeback_cache = false,
                ("writebackcache", None) => o.writeback_cache = true,
                ("odirect", Some("direct")) => o.direct_members = true,
                ("odirect", Some("cached")) => o.direct_members = false,
                ("odirect", Some(v)) => {
                    return Err(Error::Invalid(format!(
                        "odirect={v}: expected direct or cached"
                    )));
                }
                ("threads", Some(n)) => {
                    o.threads = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_THREADS).contains(n))
                        .ok_or_else(|| {
                            Error::Invalid(format!("threads={n}: expected 1 to {MAX_THREADS}"))
                        })?
                }
                (knob @ ("writeback_nice" | "writeback_group_nice"), Some(n)) => {
                    let nice = n
                        .parse()
                        .ok()
                        .filter(|n| (0..=19).contains(n))
                        .ok_or_else(|| Error::Invalid(format!("{knob}={n}: expected 0 to 19")))?;
                    if knob == "writeback_nice" {
                        o.writeback_nice = nice;
                    } else {
                        o.writeback_group_nice = nice;
                    }
                }
                ("max_request", Some(v)) => {
                    o.max_request = crate::kernel::parse_max_request(v).map_err(Error::Invalid)?
                }
                ("event_hooks", Some(d)) if !d.is_empty() => o.event_hooks = Some(PathBuf::from(d)),
                _ if is_helper_option(item) => {}
                ("snapdir", Some("visible")) => o.snapdir_visible = true,
                ("snapdir", Some("hidden")) => o.snapdir_visible = false,
                ("snapdir", Some(v)) => {
                    return Err(Error::Invalid(format!(
                        "snapdir={v}: expected visible or hidden"
                    )));
                }
                _ => return Err(Error::Invalid(format!("unknown mount option {item:?}"))),
            }
        }
        if o.fuse.contains(&MountOption::AutoUnmount) && o.acl == SessionACL::Owner {
            o.acl = SessionACL::RootAndOwner;
        }
        Ok(o)
    }
}

/// The mount points of every mount of type `fstype` in `info` (the text of
/// a `/proc/<pid>/mountinfo`).
pub fn mounts_of_type(info: &[u8], fstype: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    mountinfo_lines(info)
        .filter(|(_, _, t)| *t == fstype.as_bytes())
        .map(|(mp, _, _)| PathBuf::from(std::ffi::OsString::from_vec(mp)))
        .collect()
}

/// The well-formed lines of `info`, the text of a `/proc/<pid>/mountinfo`:
/// `id parent major:minor root mountpoint options [optional fields...] -
/// fstype source super-options`, as (mount point bytes, `major:minor`,
/// fstype). The mount point has space, tab, newline and backslash escaped
/// as `\ooo` (octal); lines without the separator or an fstype are skipped.
/// Bytes throughout: a mount point need not be UTF-8.
fn mountinfo_lines(info: &[u8]) -> impl Iterator<Item = (Vec<u8>, &[u8], &[u8])> {
    info.split(|b| *b == b'\n').filter_map(|line| {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        if fields.len() < 6 {
            return None;
        }
        // The separator comes after the six fixed fields and the optional ones.
        let sep = fields[6..].iter().position(|f| *f == b"-")? + 6;
        let fstype = fields.get(sep + 1).filter(|t| !t.is_empty())?;
        Some((unescape_mountinfo(fields[4]), fields[2], *fstype))
    })
}

/// Whether `path` (canonical) is a mountpoint, and of which filesystem type.
pub fn mount_type(path: &Path) -> Option<String> {
    mountinfo(path).map(|m| m.fstype)
}

/// One mount, as [`parse_mountinfo`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem (names its bdi in sysfs).
    pub dev: String,
    pub fstype: String,
}

/// The topmost mount at `path` (canonical) in /proc/self/mountinfo.
fn mountinfo(path: &Path) -> Option<MountEntry> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&info, path)
}

/// The last (topmost) mount at `path` in `info` (the lines
/// [`mountinfo_lines`] takes).
pub fn parse_mountinfo(info: impl AsRef<[u8]>, path: &Path) -> Option<MountEntry> {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    mountinfo_lines(info.as_ref())
        .filter(|(mp, _, _)| mp == want)
        .last()
        .map(|(_, dev, fstype)| MountEntry {
            dev: String::from_utf8_lossy(dev).into_owned(),
            fstype: String::from_utf8_lossy(fstype).into_owned(),
        })
}

/// The bytes of a mountinfo path field: `\ooo` (three octal digits, at most
/// `\377`) is one byte; anything else stands for itself.
fn unescape_mountinfo(s: impl AsRef<[u8]>) -> Vec<u8> {
    let b = s.as_ref();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(d) = b.get(i + 1..i + 4)
            && d.iter().all(|c| (b'0'..=b'7').contains(c))
            && d[0] <= b'3'
        {
            out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Validates a mountpoint before mounting: exists, is a directory, nothing is
/// mounted on it, and (unless allowed) it is empty.
pub fn check_mountpoint(mp: &Path, allow_nonempty: bool) -> Result<PathBuf> {
    let md = std::fs::metadata(mp).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Other(format!("mountpoint {} does not exist", mp.display()))
        } else if e.raw_os_error() == Some(libc::ENOTCONN) {
            Error::Other(format!(
                "mountpoint {} is busy: a dead FUSE mount is still attached (run `vpool unmount {}`)",
                mp.display(),
                mp.display()
            ))
        } else {
            Error::io(mp, e)
        }
    })?;
    if !md.is_dir() {
        return Err(Error::Other(format!(
            "mountpoint {} is not a directory",
            mp.display()
        )));
    }
    let canon = std::fs::canonicalize(mp).map_err(|e| Error::io(mp, e))?;
    if let Some(t) = mount_type(&canon) {
        return Err(Error::Other(format!(
            "mountpoint {} is busy: a {t} filesystem is already mounted there",
            canon.display()
        )));
    }
    if !allow_nonempty {
        let mut rd = std::fs::read_dir(&canon).map_err(|e| Error::io(&canon, e))?;
        if rd.next().is_some() {
            return Err(Error::Other(format!(
                "mountpoint {} is not empty (use -o nonempty to mount over its content)",
                canon.display()
            )));
        }
    }
    Ok(canon)
}

/// What the caller of [`run`] hears from the daemon.
pub struct Reporter {
    /// Where the daemon logs (`status` shows it).
    pub log: Option<String>,
    /// A step of the way to the mount (opening, recovering).
    pub step: Box<dyn Fn(&str)>,
    /// Called once the mount is visible, with a line saying so.
    pub ready: Box<dyn FnOnce(&str)>,
}

/// Mounts and serves in this process until unmounted.
pub fn run(member: &Path, mountpoint: &Path, opts: &MountOptions, rep: Reporter) -> Result<()> {
    let mp = check_mountpoint(mountpoint, opts.allow_nonempty)?;
    let member = std::fs::canonicalize(member).map_err(|e| Error::io(member, e))?;
    // Before any thread starts (they inherit the mask): only the signal
    // thread may take SIGTERM, or its default action would kill the daemon
    // without an unmount. One that comes while the pool opens waits for it.
    block_signals();
    // A daemon keeps no directory busy: `/` is its working directory
    // (paths are absolute from here on).
    if let Err(e) = std::env::set_current_dir("/") {
        tracing::warn!(error = %e, "cannot change to /");
    }
    // Whatever vpool creates in a member is its own (modes are also given
    // explicitly; this covers files made by libraries, such as redb's).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe {
        libc::umask(0o077);
    }
    (rep.step)("opening the pool: reading labels and metadata, replaying the intent log");
    let pool = Pool::open_in(member_storage(), &member)?;
    pool.force
        .store(opts.force, std::sync::atomic::Ordering::Release);
    for (dir, mode) in pool.open_members() {
        tracing::warn!(member = %dir.display(), mode = format!("{mode:o}"), "member directory is open to other users; chmod go-rwx it");
    }
    let pool_id = pool.pool_id().to_string();
    (rep.step)("recovering: checking extents and snapshots, resynchronising copies");
    let vfs = Arc::new(Vfs::mount(
        pool,
        VfsOptions {
            read_only: opts.read_only,
            snapdir_visible: opts.snapdir_visible,
        },
    )?);
    vfs.pool.write_lock_info(&mp)?;
    // Events: logged with their fields, and passed to the hooks.
    let hooks = crate::hooks::Hooks::start(
        opts.event_hooks
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::hooks::DEFAULT_DIR)),
        crate::hooks::Context {
            pool: pool_id.clone(),
            mountpoint: mp.clone(),
        },
    )
    .map_err(|e| Error::Other(format!("cannot start the event hook thread: {e}")))?;
    {
        let pool_id = pool_id.clone();
        vfs.pool.info.subscribe(Arc::new(move |ev| {
            log_event(&pool_id, ev);
            hooks.notify(ev);
        }));
    }

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("vpool:{pool_id}")),
        subtype(),
        MountOption::DefaultPermissions,
    ];
    config.mount_options.extend(opts.fuse.iter().cloned());
    config.acl = opts.acl;
    config.n_threads = Some(opts.threads);
    config.clone_fd = true;

    match crate::fs::priority::enable(opts.writeback_nice) {
        Ok(()) if opts.writeback_nice > 0 => tracing::info!(
            nice = opts.writeback_nice,
            "the mount's writeback is served at a lower CPU priority"
        ),
        Ok(()) => {}
        Err(why) => tracing::info!(%why, "the mount's writeback is served at normal CPU priority"),
    }
    match crate::fs::priority::enable_group(opts.writeback_group_nice) {
        Ok(()) if opts.writeback_group_nice > 0 => tracing::info!(
            nice = opts.writeback_group_nice,
            "the daemon's CPU share is lowered while it serves only writeback"
        ),
        Ok(()) => {}
        Err(why) => tracing::info!(%why, "the daemon's CPU share stays whole during writeback"),
    }

    (rep.step)("mounting");
    // The kernel caps the request size asked for at INIT by the host's
    // limit, so it is raised first.
    let page = crate::kernel::page_size();
    let limit = crate::kernel::raise_max_pages_limit(
        Path::new(crate::kernel::MAX_PAGES_LIMIT),
        crate::kernel::pages(opts.max_request, page),
    );
    let request = crate::kernel::granted(opts.max_request, limit, page);
    let mut session = fuser::Session::new(
        FuseFs::new(
            vfs.clone(),
            opts.writeback_cache,
            opts.direct_members,
            background_requests(opts.threads),
            opts.max_request,
        ),
        &mp,
        &config,
    )
    .map_err(|e| Error::Other(format!("cannot mount on {}: {e}", mp.display())))?;
    tune_bdi(&mp, crate::kernel::readahead_kb(request));
    vfs.set_kernel_cache(Box::new(crate::fs::fuse::Invalidator(session.notifier())));
    let server = control::Server::start(&mp, Arc::downgrade(&vfs), rep.log.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let vfs = vfs.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vpool-flusher".into())
            .spawn(move || flusher_loop(&vfs, &stop))
            .map_err(|e| Error::Other(format!("cannot start flusher: {e}")))?
    };
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("vpool-signals".into())
        .spawn(move || {
            if let Some(sig) = wait_signal() {
                tracing::info!(signal = sig, "signal received; unmounting");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                if let Err(e) = unmounter.unmount() {
                    tracing::error!(error = %e, "unmount on signal failed");
                }
            }
        })
        .map_err(|e| Error::Other(format!("cannot start signal thread: {e}")))?;

    let missing: Vec<String> = vfs
        .pool
        .missing()
        .iter()
        .map(|e| e.path.display().to_string())
        .collect();
    let msg = if missing.is_empty() {
        format!("pool {pool_id} mounted at {}", mp.display())
    } else {
        format!(
            "pool {pool_id} mounted at {} DEGRADED: member(s) missing: {} (see `vpool status`)",
            mp.display(),
            missing.join(", ")
        )
    };
    vfs.pool.emit(
        "mounted",
        if missing.is_empty() {
            Severity::Info
        } else {
            Severity::Warning
        },
        None,
        msg.clone(),
    );
    (rep.ready)(&msg);
    // systemd (Type=notify): the mount is up. Without NOTIFY_SOCKET this
    // does nothing.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&msg),
    ]);
    tracing::info!(pool = %pool_id, mountpoint = %mp.display(), "serving");
    let res = session.run();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    stop.store(true, Ordering::Release);
    flusher.thread().unpark();
    let _ = flusher.join();
    // A snapshot still being captured finishes first (it holds the pool).
    vfs.snaps.wait_idle();
    server.shutdown();
    vfs.pool.emit(
        "unmounted",
        Severity::Info,
        None,
        format!("pool {pool_id} unmounted from {}", mp.display()),
    );
    let final_commit = vfs.commit_final();
    vfs.pool.clear_lock_info();
    // The last strong reference: dropping it closes the metadata stores.
    drop(vfs);
    drop(server);
    if let Err(e) = res {
        tracing::warn!(error = %e, "session ended with an error");
    }
    final_commit.map_err(|e| Error::Other(format!("final commit failed: {e}")))?;
    tracing::info!("unmounted cleanly");
    Ok(())
}

/// Every event also goes to the log, with its fields (journald keeps them
/// as fields: `journalctl VPOOL_EVENT=member_failed`... see README).
fn log_event(pool: &str, ev: &crate::pool::info::Event) {
    let member = ev.member.as_deref().unwrap_or("");
    match ev.severity {
        Severity::Error => {
            tracing::error!(pool, event = %ev.kind, member, seq = ev.seq, "{}", ev.message)
        }
        Severity::Warning => {
            tracing::warn!(pool, event = %ev.kind, member, seq = ev.seq, "{}", ev.message)
        }
        Severity::Info => {
            tracing::info!(pool, event = %ev.kind, member, seq = ev.seq, "{}", ev.message)
        }
    }
}

/// The subtype that makes the mount `fuse.vpool` (`findmnt -t fuse.vpool`,
/// fstab's type): fusermount3 takes `Subtype` for unprivileged mounts, but
/// fuser's own mount(2) as root leaves it out of the kernel's options, so
/// root passes it to the kernel directly.
fn subtype() -> MountOption {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        MountOption::CUSTOM("subtype=vpool".into())
    } else {
        MountOption::Subtype("vpool".into())
    }
}

/// Tunes the mount's writeback device (`/sys/class/bdi/<dev>/`); needs
/// root, best effort:
/// - `read_ahead_kb` to `readahead_kb` ([`crate::kernel::readahead_kb`]):
///   the kernel reads ahead no more than the INIT reply's `max_readahead`
///   on a FUSE mount; volume images are read in long runs, and one request
///   in flight leaves the disk idle between requests;
/// - `strict_limit` off (Linux 6.2 and later): the kernel throttles the
///   writers of a FUSE mount as soon as it holds 1 % of the host's dirty
///   limit (about 48 MB here), a guard against slow or untrusted daemons;
///   this one writes to local disks, and its writers are then throttled like
///   a local disk's, when the host nears its dirty limit. A buffered 1 GiB
///   sequential write with fsync: 205-320 MiB/s strict, 702-735 MiB/s not;
/// - `max_ratio` to 100, a local disk's: FUSE caps a mount's share of the
///   host's dirty limit at 1 %. Past the host's free-run line the kernel
///   cuts the rate of a writer whose device is far over its share to a
///   quarter, in pauses of about 40 ms each; with a local disk's share it
///   paces the writer by the mount's own writeback, as `strict_limit` off
///   meant. The buffered 4 KiB writer during a capture (docs/perf change
///   18): longest write 36.3 ms against 41.3 ms, medians of 24 alternated
///   rounds.
fn tune_bdi(mp: &Path, readahead_kb: u32) {
    let Some(m) = mountinfo(mp) else { return };
    for (knob, value) in [
        ("read_ahead_kb", readahead_kb.to_string()),
        ("strict_limit", "0".to_string()),
        ("max_ratio", "100".to_string()),
    ] {
        let p = format!("/sys/class/bdi/{}/{knob}", m.dev);
        if let Err(e) = std::fs::write(&p, value) {
            tracing::debug!(path = %p, error = %e, "cannot tune the mount's writeback device");
        }
    }
}

/// Space warnings: below [`SPACE_LOW`] of the pool free, once, until it
/// is back above [`SPACE_OK`].
pub const SPACE_LOW: f64 = 0.10;
pub const SPACE_OK: f64 = 0.15;

fn space_watch(vfs: &Vfs, low: &mut bool) {
    let sp = vfs.pool.space();
    if sp.size == 0 {
        return;
    }
    let frac = sp.avail as f64 / sp.size as f64;
    if !*low && frac < SPACE_LOW {
        *low = true;
        vfs.pool.emit(
            "space_low",
            Severity::Warning,
            None,
            format!(
                "pool space low: {} free of {} ({:.0} %)",
                crate::util::human(sp.avail),
                crate::util::human(sp.size),
                frac * 100.0
            ),
        );
    } else if *low && frac > SPACE_OK {
        *low = false;
    }
}

fn flusher_loop(vfs: &Vfs, stop: &AtomicBool) {
    let mut space_low = false;
    while !stop.load(Ordering::Acquire) {
        std::thread::park_timeout(COMMIT_INTERVAL);
        if stop.load(Ordering::Acquire) {
            break;
        }
        // A member whose directory was deleted or unmounted fails now rather
        // than at its next I/O error.
        vfs.pool.probe_members();
        space_watch(vfs, &mut space_low);
        if vfs.has_pending()
            && let Err(e) = vfs.commit()
        {
            tracing::error!(error = %e, "periodic commit failed");
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the termination signals in this thread and every thread spawned after,
/// so only the signal thread receives them (through sigwait).
fn block_signals() {
    let set = signal_set();
    // SAFETY: valid sigset pointer; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_signal() -> Option<i32> {
    let set = signal_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: valid sigset and out-pointer.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    (rc == 0).then_some(sig)
}

/// The storage of the daemon's members: the host filesystem, or (test
/// builds only) the same with injected I/O errors when the environment asks.
fn member_storage() -> Arc<dyn crate::storage::Storage> {
    #[cfg(feature = "fault-injection")]
    if let Some(f) = crate::storage::faulty::FaultyStorage::from_env() {
        tracing::warn!("fault injection enabled (test build): I/O errors on request");
        return Arc::new(f);
    }
    crate::storage::real()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
36 22 8:1 / /mnt/a\\040b rw,relatime shared:1 master:2 - ext4 /dev/sda1 rw
37 36 0:50 / /mnt/a\\040b rw - fuse.vpool vpool rw,user_id=0
38 1 0:51 / /mnt/caf\\303\\251 rw - fuse.vpool vpool rw
39 1 0:52 / /mnt/\u{e9}t\u{e9} rw - tmpfs tmpfs rw
";

    /// Without `threads=` the workers follow the CPUs, enough for a queue
    /// depth of 32 on a small machine; the option sets them within bounds.
    #[test]
    fn worker_threads_default_and_option() {
        let o = MountOptions::parse(&[]).unwrap();
        assert_eq!(o.threads, default_threads());
        assert!((32..=MAX_THREADS).contains(&o.threads), "{}", o.threads);
        let o = MountOptions::parse(&["threads=3".into()]).unwrap();
        assert_eq!(o.threads, 3);
        assert!(o.direct_members, "O_DIRECT member I/O is the default");
        let o = MountOptions::parse(&["odirect=cached".into()]).unwrap();
        assert!(!o.direct_members);
        assert!(MountOptions::parse(&["odirect=maybe".into()]).is_err());
        for bad in ["threads=0", "threads=65", "threads=x"] {
            assert!(MountOptions::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    /// Requests of 4 MiB unless `max_request=` says otherwise; a bad size
    /// is refused by name.
    #[test]
    fn max_request_default_and_option() {
        let o = MountOptions::parse(&[]).unwrap();
        assert_eq!(o.max_request, crate::kernel::DEFAULT_MAX_REQUEST);
        let o = MountOptions::parse(&["max_request=1M".into()]).unwrap();
        assert_eq!(o.max_request, 1 << 20);
        let o = MountOptions::parse(&["max_request=16M".into()]).unwrap();
        assert_eq!(o.max_request, 16 << 20);
        for bad in ["max_request=3K", "max_request=32M", "max_request="] {
            let e = MountOptions::parse(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    /// The mount's writeback is served at nice 19 unless `writeback_nice=`
    /// says otherwise (0 turns it off); a bad value is refused by name.
    #[test]
    fn writeback_nice_default_and_option() {
        let o = MountOptions::parse(&[]).unwrap();
        assert_eq!(o.writeback_nice, 19);
        let o = MountOptions::parse(&["writeback_nice=0".into()]).unwrap();
        assert_eq!(o.writeback_nice, 0);
        let o = MountOptions::parse(&["writeback_nice=7".into()]).unwrap();
        assert_eq!(o.writeback_nice, 7);
        assert_eq!(o.writeback_group_nice, 5, "the group's knob is apart");
        let o = MountOptions::parse(&["writeback_group_nice=0".into()]).unwrap();
        assert_eq!((o.writeback_nice, o.writeback_group_nice), (19, 0));
        for bad in [
            "writeback_nice=20",
            "writeback_nice=-1",
            "writeback_nice=low",
            "writeback_group_nice=20",
            "writeback_group_nice=",
        ] {
            let e = MountOptions::parse(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    /// Background requests (writeback, a VM's queue) leave an eighth of
    /// the workers (at least one) to foreground ones.
    #[test]
    fn background_requests_leave_workers_free() {
        assert_eq!(background_requests(1), 1);
        for t in 2..=MAX_THREADS {
            let bg = background_requests(t) as usize;
            assert!(bg >= 1 && t - bg >= (t / 8).max(1), "{t}: {bg}");
        }
        assert_eq!(background_requests(32), 28);
        assert_eq!(background_requests(MAX_THREADS), 56);
    }

    #[test]
    fn topmost_mount_and_escapes() {
        let m = parse_mountinfo(INFO, Path::new("/mnt/a b")).unwrap();
        assert_eq!(m.dev, "0:50");
        assert_eq!(m.fstype, "fuse.vpool");
        assert_eq!(
            parse_mountinfo(INFO, Path::new("/proc")).unwrap().fstype,
            "proc"
        );
        assert_eq!(parse_mountinfo(INFO, Path::new("/mnt")), None);
    }

    /// Non-ASCII mount points: escaped or not, they match their path (each
    /// byte became a char of its own, so they never matched).
    #[test]
    fn non_ascii_mount_points_match() {
        let m = parse_mountinfo(INFO, Path::new("/mnt/caf\u{e9}")).unwrap();
        assert_eq!(m.dev, "0:51");
        let m = parse_mountinfo(INFO, Path::new("/mnt/\u{e9}t\u{e9}")).unwrap();
        assert_eq!(m.fstype, "tmpfs");
    }

    /// A backslash followed by a multibyte character panicked (a string
    /// sliced inside a character); malformed lines are skipped.
    #[test]
    fn malformed_lines_do_not_panic() {
        for line in [
            "1 1 0:1 / /x\\ab\u{e9} rw - t s o",
            "1 1 0:1 / /x\\\u{e9}\u{e9} rw - t s o",
            "1 1 0:1 / /x\\+12 rw - t s o",
            "1 1 0:1 / /x\\",
            "1 1 0:1 / /x rw",
            "1 1 0:1 / /x rw -",
            "1 1 0:1 / /x rw - ",
            "",
        ] {
            let p = Path::new("/x");
            assert_eq!(parse_mountinfo(line, p), None, "{line:?}");
        }
        assert_eq!(unescape_mountinfo("\\ab\u{e9}"), "\\ab\u{e9}".as_bytes());
        assert_eq!(unescape_mountinfo("\\400\\377\\0"), b"\\400\xff\\0");
        // Mount points are bytes: one that is not UTF-8 is found as it is.
        let raw = b"40 1 0:60 / /mnt/\xff\\040x rw - fuse.vpool vpool:1 rw\n41 1 0:61 / /y rw - ext4 d rw\n";
        assert_eq!(
            mounts_of_type(raw, "fuse.vpool"),
            vec![PathBuf::from(std::ffi::OsString::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"/mnt/\xff x")
            ))]
        );
        let m = parse_mountinfo("1 1 0:1 / /x rw a:1 - - t s o", Path::new("/x"));
        assert_eq!(m.unwrap().fstype, "-");
    }
}
