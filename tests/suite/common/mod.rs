//! Shared helpers for the mounted integration tests.
//!
//! Everything that runs an external program goes through [`run_t`], which
//! wraps it in coreutils `timeout` and sends its output to anonymous files
//! (not pipes), so a daemon that keeps inherited descriptors open can never
//! block the test. A [`Mount`] also arms a watchdog: if the test has not
//! dropped the guard by the deadline, the daemon is killed with SIGKILL,
//! which aborts the FUSE connection and turns any hung syscall in the test
//! into an error (ENOTCONN) instead of a hung CI job.
//!
//! These tests need root (FUSE, tmpfs mounts, chown, setpriv). The
//! reference model of the storage core, which needs neither, is in [`model`].
#![allow(dead_code)]

mod files;
mod images;
pub mod model;

// Each test crate uses some of these, none uses them all.
#[allow(unused_imports)]
pub use files::*;
#[allow(unused_imports)]
pub use images::*;

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The binary under test.
pub const VPOOL: &str = env!("CARGO_BIN_EXE_vpool");

/// Default bound on any external command.
pub const CMD_TIMEOUT_SECS: u64 = 120;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// Build a `Vec<OsString>` from a mix of `&str`, `&Path`, `&PathBuf`, `String`...
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        #[allow(clippy::useless_vec)]
        let v: Vec<::std::ffi::OsString> = vec![$(::std::ffi::OsString::from($a)),*];
        v
    }};
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Run `program args...` under `timeout -k 10 SECS`, capturing stdout and
/// stderr into anonymous temp files. Never hangs longer than `secs + 10`.
pub fn run_t<S: AsRef<OsStr>>(secs: u64, program: impl AsRef<OsStr>, args: &[S]) -> Output {
    run_t_env(secs, program, args, &[])
}

/// Like [`run_t`] with extra environment variables.
pub fn run_t_env<S: AsRef<OsStr>>(
    secs: u64,
    program: impl AsRef<OsStr>,
    args: &[S],
    env: &[(&str, &str)],
) -> Output {
    let mut out = tempfile::tempfile().expect("tempfile for stdout");
    let mut err = tempfile::tempfile().expect("tempfile for stderr");
    let mut cmd = Command::new("timeout");
    cmd.arg("-k")
        .arg("10")
        .arg(secs.to_string())
        .arg(program.as_ref())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", program.as_ref()));
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_end(&mut stdout).unwrap();
    err.seek(SeekFrom::Start(0)).unwrap();
    err.read_to_end(&mut stderr).unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Run with the default timeout.
pub fn run<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Output {
    run_t(CMD_TIMEOUT_SECS, program, args)
}

/// Human-readable description of a finished command, for assertion messages.
pub fn describe(o: &Output) -> String {
    let code = o.status.code();
    let timed_out = matches!(code, Some(124) | Some(137));
    format!(
        "exit {:?}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        code,
        if timed_out { " (TIMED OUT)" } else { "" },
        tail(&String::from_utf8_lossy(&o.stdout), 6000),
        tail(&String::from_utf8_lossy(&o.stderr), 6000),
    )
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        s
    } else {
        let mut i = s.len() - max;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

/// stdout + stderr as one string.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run and assert exit 0.
pub fn run_ok<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Output {
    let o = run(program.as_ref(), args);
    assert!(
        o.status.success(),
        "command failed: {:?} {:?}\n{}",
        program.as_ref(),
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        describe(&o)
    );
    o
}

/// Run the vpool binary.
pub fn vpool<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(VPOOL, args)
}

/// Run the vpool binary and assert exit 0.
pub fn vpool_ok<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_ok(VPOOL, args)
}

/// Assert a command failed and its output mentions one of `needles`
/// (case-insensitive).
pub fn assert_refused(o: &Output, needles: &[&str], what: &str) {
    assert!(
        !o.status.success(),
        "{what}: expected a non-zero exit, got success\n{}",
        describe(o)
    );
    assert!(
        !matches!(o.status.code(), Some(124) | Some(137) | None),
        "{what}: command timed out or was killed instead of refusing\n{}",
        describe(o)
    );
    let t = text(o).to_lowercase();
    assert!(
        needles.iter().any(|n| t.contains(&n.to_lowercase())),
        "{what}: expected the message to mention one of {needles:?}\n{}",
        describe(o)
    );
}

/// Path of the fsx binary (crates.io `fsx`), if installed.
pub fn fsx_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FSX") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("fsx");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut cands = vec![PathBuf::from("/usr/local/cargo/bin/fsx")];
    if let Some(home) = std::env::var_os("HOME") {
        cands.insert(0, Path::new(&home).join(".cargo/bin/fsx"));
    }
    cands.into_iter().find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// Pools and mounts
// ---------------------------------------------------------------------------

/// A fresh private temp directory, traversable by other users (0755) so the
/// permission tests test vpool and not the temp dir's mode.
pub fn tempdir() -> TempDir {
    let d = tempfile::Builder::new()
        .prefix("vpool-it-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A set of member directories plus a mountpoint, in a private temp dir.
pub struct Pool {
    pub dir: TempDir,
    pub members: Vec<PathBuf>,
    /// tmpfs mounts backing the members, if any (unmounted after `dir` is gone).
    pub tmpfs: Vec<Tmpfs>,
}

impl Pool {
    /// `n` empty member directories `m0..m{n-1}`; `vpool create` not run.
    pub fn dirs(n: usize) -> Pool {
        let dir = tempdir();
        let members: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("m{i}"))).collect();
        for m in &members {
            fs::create_dir(m).unwrap();
        }
        fs::create_dir(dir.path().join("mnt")).unwrap();
        Pool {
            dir,
            members,
            tmpfs: Vec::new(),
        }
    }

    /// `n` members, each the root of its own tmpfs of `size` (e.g. "256M"),
    /// created with `extra` options. fsync on tmpfs is free, so fsync-heavy
    /// tests measure vpool rather than the disk.
    pub fn new_on_tmpfs(n: usize, size: &str, extra: &[&str]) -> Pool {
        let tmpfs: Vec<Tmpfs> = (0..n).map(|_| Tmpfs::new(size)).collect();
        let mut p = Pool::from_dirs(tmpfs.iter().map(|t| t.path.clone()).collect());
        p.tmpfs = tmpfs;
        p.create_ok(extra);
        p
    }

    /// Use existing directories (e.g. tmpfs mounts) as members; the mountpoint
    /// lives in a new temp dir. `vpool create` not run.
    pub fn from_dirs(members: Vec<PathBuf>) -> Pool {
        let dir = tempdir();
        fs::create_dir(dir.path().join("mnt")).unwrap();
        Pool {
            dir,
            members,
            tmpfs: Vec::new(),
        }
    }

    /// `n` members, created with `extra` options (e.g. `["--extent-size", "1M"]`).
    pub fn new(n: usize, extra: &[&str]) -> Pool {
        let p = Pool::dirs(n);
        p.create_ok(extra);
        p
    }

    /// Run `vpool create EXTRA... MEMBERS...`.
    pub fn create(&self, extra: &[&str]) -> Output {
        let mut a: Vec<OsString> = vec!["create".into()];
        a.extend(extra.iter().map(OsString::from));
        a.extend(self.members.iter().map(OsString::from));
        vpool(&a)
    }

    pub fn create_ok(&self, extra: &[&str]) {
        let o = self.create(extra);
        assert!(
            o.status.success(),
            "vpool create {extra:?} {:?} failed\n{}",
            self.members,
            describe(&o)
        );
    }

    /// The default mountpoint (`<tmp>/mnt`).
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// A path in the pool's temp dir (outside the mount), for scratch files.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn mount(&self) -> Mount {
        self.mount_opts(&[])
    }

    pub fn mount_opts(&self, opts: &[&str]) -> Mount {
        Mount::new(&self.members[0], &self.mnt(), opts)
    }

    /// Unmounts `m` (asserting it unmounts cleanly) and mounts the pool again.
    pub fn remount(&self, m: Mount) -> Mount {
        m.unmount();
        self.mount()
    }

    /// [`Pool::remount`] with a clean `vpool check` in between.
    pub fn remount_checked(&self, m: Mount) -> Mount {
        m.unmount();
        self.assert_check_clean();
        self.mount()
    }

    /// `vpool check` on the first member (pool must not be mounted).
    pub fn check(&self) -> Output {
        vpool(&args!["check", &self.members[0]])
    }

    pub fn assert_check_clean(&self) {
        let o = self.check();
        assert!(
            o.status.success(),
            "vpool check reported problems (or failed)\n{}",
            describe(&o)
        );
    }

    /// Total bytes allocated (st_blocks*512) under all members' data/ dirs.
    pub fn stored_bytes_on_disk(&self) -> u64 {
        self.members.iter().map(|m| du_bytes(&m.join("data"))).sum()
    }
}

/// Is `path` a mount point (according to /proc/self/mountinfo)?
/// `path` must be canonical (no symlinks), which temp dirs are.
pub fn is_mounted(path: &Path) -> bool {
    fs::read("/proc/self/mountinfo")
        .is_ok_and(|info| vpool::daemon::parse_mountinfo(info, path).is_some())
}

/// Is the process alive: does any of its threads still run? After SIGKILL
/// the leader turns zombie before the other threads have exited, and until
/// the last one has, their shared descriptors (the pool's flocks) stay open.
pub fn pid_alive(pid: i32) -> bool {
    let running = |stat: &str| {
        stat_fields(stat)
            .and_then(|mut f| f.next())
            .is_none_or(|state| !(state.starts_with('Z') || state.starts_with('X')))
    };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        fs::read_to_string(t.path().join("stat"))
            .map(|s| running(&s))
            .unwrap_or(false)
    })
}

/// The fields of a `/proc/<pid>/stat` line after the command name (which
/// may hold spaces and parentheses): the state (field 3) first.
pub fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// Poll `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Find a vpool daemon serving `mnt` by scanning /proc (fallback when
/// `status --json` does not give a pid).
fn find_daemon_pid(mnt: &Path) -> Option<i32> {
    let me = std::process::id() as i32;
    let want = mnt.as_os_str().as_bytes();
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let pid: i32 = match e.file_name().to_str().and_then(|s| s.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        if pid == me {
            continue;
        }
        let cmdline = match fs::read(e.path().join("cmdline")) {
            Ok(c) => c,
            Err(_) => continue,
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_vpool = args.first().map(|a| a.ends_with(b"vpool")).unwrap_or(false);
        if is_vpool && args.contains(&want) && pid_alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// Parse `vpool status --json TARGET`.
/// The entry of member `path` in a status JSON (by its path as given or
/// canonical).
pub fn member_status<'a>(st: &'a serde_json::Value, path: &Path) -> &'a serde_json::Value {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    st["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            let p = Path::new(m["path"].as_str().unwrap());
            p == canon || p == path
        })
        .unwrap_or_else(|| panic!("member {path:?} not in status: {st}"))
}

/// The daemon's log file that `status --json` names.
pub fn status_log(st: &serde_json::Value) -> PathBuf {
    PathBuf::from(
        st["log"]
            .as_str()
            .unwrap_or_else(|| panic!("no log in {st}")),
    )
}

pub fn status_json(target: &Path) -> serde_json::Value {
    let o = run_t(60, VPOOL, &args!["status", "--json", target]);
    // 3: the pool is degraded (a status all the same).
    assert!(
        o.status.success() || o.status.code() == Some(3),
        "vpool status --json {target:?} failed\n{}",
        describe(&o)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "vpool status --json {target:?}: invalid JSON ({e})\n{}",
            describe(&o)
        )
    })
}

/// Seconds a mounted test may run before the watchdog kills the daemon.
fn watchdog_secs() -> u64 {
    std::env::var("VPOOL_TEST_WATCHDOG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900)
}

/// A mounted pool. Unmounts on drop (with timeouts, lazy-unmount and SIGKILL
/// fallbacks), so a failing or hung test never leaves a mount behind.
pub struct Mount {
    pub path: PathBuf,
    pub member: PathBuf,
    pub pid: Option<i32>,
    mounted: bool,
    done: Arc<AtomicBool>,
}

impl Mount {
    /// Mount or panic.
    pub fn new(member: &Path, mountpoint: &Path, opts: &[&str]) -> Mount {
        match Mount::try_new(member, mountpoint, opts) {
            Ok(m) => m,
            Err(o) => panic!(
                "vpool mount {member:?} {mountpoint:?} (opts {opts:?}) failed\n{}",
                describe(&o)
            ),
        }
    }

    /// Run `vpool mount [-o OPTS] MEMBER MOUNTPOINT`; on failure return its
    /// output (and make sure nothing stayed mounted).
    pub fn try_new(member: &Path, mountpoint: &Path, opts: &[&str]) -> Result<Mount, Output> {
        Mount::try_new_output(member, mountpoint, opts).map(|(m, _)| m)
    }

    /// [`Mount::try_new`] run through a wrapper command (e.g. `prlimit ... --`).
    pub fn try_new_wrapped(
        wrap: &[&str],
        member: &Path,
        mountpoint: &Path,
        opts: &[&str],
    ) -> Result<Mount, Output> {
        Mount::mount_with(wrap, member, mountpoint, opts).map(|(m, _)| m)
    }

    /// [`Mount::try_new`], also returning the output of a successful mount.
    pub fn try_new_output(
        member: &Path,
        mountpoint: &Path,
        opts: &[&str],
    ) -> Result<(Mount, Output), Output> {
        Mount::mount_with(&[], member, mountpoint, opts)
    }

    fn mount_with(
        wrap: &[&str],
        member: &Path,
        mountpoint: &Path,
        opts: &[&str],
    ) -> Result<(Mount, Output), Output> {
        let path = mountpoint
            .canonicalize()
            .unwrap_or_else(|_| mountpoint.to_path_buf());
        let mut a: Vec<OsString> = vec!["mount".into()];
        if !opts.is_empty() {
            a.push("-o".into());
            a.push(opts.join(",").into());
        }
        a.push(member.into());
        a.push(path.clone().into());
        let o = match wrap.split_first() {
            None => run_t(60, VPOOL, &a),
            Some((prog, rest)) => {
                let mut w: Vec<OsString> = rest.iter().map(OsString::from).collect();
                w.push(VPOOL.into());
                w.extend(a);
                run_t(60, prog, &w)
            }
        };
        if !o.status.success() {
            return Err(o);
        }
        let mut m = Mount {
            path: path.clone(),
            member: member.to_path_buf(),
            pid: None,
            mounted: true,
            done: Arc::new(AtomicBool::new(false)),
        };
        if !wait_until(Duration::from_secs(20), || is_mounted(&path)) {
            // Drop cleans up whatever may have happened.
            panic!(
                "vpool mount returned success but {path:?} is not a mount point after 20 s\n{}",
                describe(&o)
            );
        }
        m.pid = m.lookup_pid();
        m.arm_watchdog();
        Ok((m, o))
    }

    /// Takes charge of a mount made some other way (`mount -a`, a
    /// foreground daemon): waits for it, finds its daemon, and from now on
    /// unmounts it on drop like any other.
    pub fn adopt(member: &Path, mountpoint: &Path) -> Mount {
        let path = mountpoint
            .canonicalize()
            .unwrap_or_else(|_| mountpoint.to_path_buf());
        let mut m = Mount {
            path: path.clone(),
            member: member.to_path_buf(),
            pid: None,
            mounted: true,
            done: Arc::new(AtomicBool::new(false)),
        };
        assert!(
            wait_until(Duration::from_secs(30), || is_mounted(&path)),
            "{path:?} did not become a mount point"
        );
        m.pid = m.lookup_pid();
        m.arm_watchdog();
        m
    }

    /// Forgets the mount (it was unmounted some other way, e.g. `umount`).
    pub fn forget(mut self) {
        self.done.store(true, Ordering::SeqCst);
        self.mounted = false;
    }

    fn lookup_pid(&self) -> Option<i32> {
        let o = run_t(30, VPOOL, &args!["status", "--json", &self.path]);
        if o.status.success()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout)
            && let Some(p) = v.get("pid").and_then(|p| p.as_i64())
        {
            return Some(p as i32);
        }
        find_daemon_pid(&self.path)
    }

    fn arm_watchdog(&self) {
        let done = self.done.clone();
        let pid = self.pid;
        let path = self.path.clone();
        let secs = watchdog_secs();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < deadline {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                thread::sleep(Duration::from_millis(250));
            }
            if done.load(Ordering::SeqCst) {
                return;
            }
            eprintln!(
                "WATCHDOG: mount {path:?} still in use after {secs} s; killing daemon {pid:?} \
                 and lazily unmounting"
            );
            if let Some(pid) = pid {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = run_t(30, "fusermount3", &args!["-u", "-z", &path]);
        });
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the mount.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// `vpool status --json MOUNTPOINT`.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.path)
    }

    /// Explicit unmount: asserts `vpool unmount` succeeds, the mount is gone
    /// and the daemon has exited.
    pub fn unmount(mut self) {
        self.done.store(true, Ordering::SeqCst);
        let o = run_t(120, VPOOL, &args!["unmount", &self.path]);
        let ok = o.status.success();
        let still = is_mounted(&self.path);
        let alive = self.pid.map(pid_alive).unwrap_or(false);
        if ok && !still && !alive {
            self.mounted = false;
            return;
        }
        // Let Drop clean up, then report.
        drop_cleanup(&self.path, self.pid);
        self.mounted = false;
        panic!(
            "vpool unmount {:?}: success={ok}, still mounted={still}, daemon {:?} alive after \
             unmount returned={alive}\n{}",
            self.path,
            self.pid,
            describe(&o)
        );
    }

    /// Simulate a crash: SIGKILL the daemon, wait for it to die, lazily
    /// unmount the dead mount.
    pub fn kill9(mut self) {
        self.done.store(true, Ordering::SeqCst);
        let pid = self
            .pid
            .expect("no daemon pid known (status --json gave none)");
        // SAFETY: kill(2) has no memory-safety preconditions.
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill -9 {pid}: {}", io::Error::last_os_error());
        assert!(
            wait_until(Duration::from_secs(20), || !pid_alive(pid)),
            "daemon {pid} did not die after SIGKILL"
        );
        let o = run_t(30, "fusermount3", &args!["-u", "-z", &self.path]);
        if is_mounted(&self.path) {
            let o2 = run_t(30, "umount", &args!["-l", &self.path]);
            assert!(
                !is_mounted(&self.path),
                "dead mount could not be detached\n{}\n{}",
                describe(&o),
                describe(&o2)
            );
        }
        self.mounted = false;
    }
}

fn drop_cleanup(path: &Path, pid: Option<i32>) {
    if is_mounted(path) {
        let _ = run_t(30, "fusermount3", &args!["-u", "-z", path]);
    }
    if is_mounted(path) {
        let _ = run_t(30, "umount", &args!["-l", path]);
    }
    if let Some(pid) = pid
        && !wait_until(Duration::from_secs(10), || !pid_alive(pid))
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        wait_until(Duration::from_secs(10), || !pid_alive(pid));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let o = run_t(60, VPOOL, &args!["unmount", &self.path]);
        if !o.status.success() || is_mounted(&self.path) {
            eprintln!(
                "warning: vpool unmount {:?} failed during cleanup; forcing\n{}",
                self.path,
                describe(&o)
            );
        }
        drop_cleanup(&self.path, self.pid);
    }
}

// ---------------------------------------------------------------------------
// tmpfs
// ---------------------------------------------------------------------------

/// A small tmpfs mounted in a private temp dir; unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: TempDir,
}

impl Tmpfs {
    /// `size` as understood by tmpfs, e.g. "24M".
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempdir();
        let path = dir.path().join("fs");
        fs::create_dir(&path).unwrap();
        let o = run_t(
            30,
            "mount",
            &args![
                "-t",
                "tmpfs",
                "-o",
                format!("size={size},mode=0755"),
                "tmpfs",
                &path
            ],
        );
        assert!(o.status.success(), "mount tmpfs failed\n{}", describe(&o));
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !is_mounted(&self.path) {
            return;
        }
        let o = run_t(30, "umount", &args![&self.path]);
        if !o.status.success() {
            let _ = run_t(30, "umount", &args!["-l", &self.path]);
        }
    }
}

// ---------------------------------------------------------------------------
// Data and syscall helpers
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compare two buffers and describe the first difference.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want.iter())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: data mismatch: got {} bytes, want {}; first difference at offset {first} \
         (got {:?}, want {:?})",
        got.len(),
        want.len(),
        got.get(first..(first + 16).min(got.len())),
        want.get(first..(first + 16).min(want.len())),
    );
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Check a libc return value (-1 = error).
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid open fd; no pointers involved.
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(|_| ())
}

pub fn lseek(f: &File, off: i64, whence: libc::c_int) -> io::Result<i64> {
    // SAFETY: lseek on a valid open fd; no pointers involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

pub fn statvfs(p: &Path) -> libc::statvfs {
    let c = cstr(p);
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        let r = libc::statvfs(c.as_ptr(), &mut s);
        assert_eq!(r, 0, "statvfs({p:?}): {}", io::Error::last_os_error());
        s
    }
}

/// Allocated bytes of one file (st_blocks * 512).
pub fn alloc_bytes(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// Allocated bytes (st_blocks*512) of everything under `p` (0 if missing).
/// Does not follow symlinks.
pub fn du_bytes(p: &Path) -> u64 {
    let md = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return 0,
    };
    let mut total = md.blocks() * 512;
    if md.is_dir()
        && let Ok(rd) = fs::read_dir(p)
    {
        for e in rd.flatten() {
            total += du_bytes(&e.path());
        }
    }
    total
}

/// Read a whole file.
pub fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
}

/// A heap buffer aligned to `align` (for O_DIRECT).
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, align).unwrap();
        assert!(len > 0);
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of layout.size() initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Run a command as uid/gid 65534 with no supplementary groups.
pub fn run_as_nobody<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let mut a: Vec<OsString> = args![
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        program
    ];
    a.extend(args.iter().map(|s| s.as_ref().to_owned()));
    run_t(60, "setpriv", &a)
}

/// Writes `data` as the whole content of a new file `p` and fsyncs it.
pub fn write_synced(p: &Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = File::create(p).unwrap();
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
}

/// `vpool scrub --json TARGET`: (exit status was 0, the report).
pub fn scrub_json(target: &Path) -> (bool, serde_json::Value) {
    let o = run_t(300, VPOOL, &args!["scrub", "--json", target]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("scrub --json: invalid JSON ({e})\n{}", describe(&o)));
    (o.status.success(), v)
}
