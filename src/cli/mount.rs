//! `vpool mount`, `vpool unmount` and the mount helper `mount.fuse.vpool`
//! (what mount(8) runs for an fstab line of type `fuse.vpool`).
//!
//! A mount detaches a daemon and waits for its own verdict: the daemon
//! reports each step on its stdout (`STEP ...`), then `READY ...` once the
//! mount is visible; the parent shows the steps when they take a while and
//! never gives up on a daemon that is still recovering. Like every mount
//! helper it is silent on success (`-v` talks).
//!
//! Where the daemon logs: the journal when it runs under systemd
//! (`--foreground` in a unit, `JOURNAL_STREAM` set), otherwise a file per
//! pool that is appended to across mounts (`vpool status` names it).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::output::{say, ui};
use crate::control::{self, Request, Response};
use crate::daemon::{self, MountOptions, Reporter};
use crate::pool::Pool;

/// How long `vpool unmount` waits for the daemon to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Steps of a mount taking longer than this are shown (without `-v`).
const SHOW_STEPS_AFTER: Duration = Duration::from_secs(3);
/// A log file bigger than this at mount is moved to `.1`.
const LOG_ROTATE: u64 = 16 << 20;

pub struct MountArgs<'a> {
    pub dir: &'a Path,
    pub mountpoint: &'a Path,
    pub options: &'a [String],
    pub foreground: bool,
    pub daemon_child: bool,
    pub log_file: Option<&'a Path>,
}

pub fn mount(a: MountArgs) -> Result<i32> {
    let opts = MountOptions::parse(a.options)?;
    if a.daemon_child {
        // stderr is the log file the parent opened.
        init_daemon_logging(false);
        let log = a.log_file.map(|p| p.display().to_string());
        daemon::run(
            a.dir,
            a.mountpoint,
            &opts,
            Reporter {
                log,
                step: Box::new(|s| say_line("STEP", s)),
                ready: Box::new(|msg| {
                    say_line("READY", msg);
                    redirect_stdout_to_null();
                }),
            },
        )?;
        return Ok(0);
    }
    if a.foreground {
        let journal = init_daemon_logging(true);
        daemon::run(
            a.dir,
            a.mountpoint,
            &opts,
            Reporter {
                log: Some(if journal { "journal" } else { "stderr" }.into()),
                step: Box::new(|s| tracing::info!("{s}")),
                ready: Box::new(|msg| {
                    tracing::info!("{msg}");
                    if ui().verbose > 0 {
                        eprintln!(
                            "vpool: {msg} (foreground; unmount with `vpool unmount` or Ctrl-C)"
                        );
                    }
                }),
            },
        )?;
        return Ok(0);
    }
    detach(&a, &opts)
}

fn detach(a: &MountArgs, opts: &MountOptions) -> Result<i32> {
    // Validate in the foreground so refusals come back as plain errors.
    let mp = daemon::check_mountpoint(a.mountpoint, opts.allow_nonempty)?;
    let dir = std::fs::canonicalize(a.dir).with_context(|| format!("{}", a.dir.display()))?;
    let pool = Pool::open(&dir)?;
    warn_open_members(&pool);
    let log_path = log_path(&pool.pool_id().to_string())?;
    drop(pool);
    rotate(&log_path);
    let log = crate::util::private_options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the vpool executable")?;
    let mut cmd = Proc::new(exe);
    cmd.arg("mount").arg("--daemon-child");
    cmd.arg("--log-file").arg(&log_path);
    for o in a.options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(&dir).arg(&mp);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("daemon has no stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(l) = line else { break };
            if let Some(m) = l.strip_prefix("READY ") {
                let _ = tx.send(Some((true, m.to_string())));
                return;
            }
            if let Some(m) = l.strip_prefix("STEP ") {
                let _ = tx.send(Some((false, m.to_string())));
            }
        }
        let _ = tx.send(None);
    });
    let t0 = Instant::now();
    let verbose = ui().verbose > 0;
    let mut last_step: Option<String> = None;
    let mut shown = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(Some((true, msg))) => {
                super::output::json(&serde_json::json!({
                    "mounted": mp,
                    "degraded": msg.contains("DEGRADED"),
                    "message": msg,
                    "log": log_path,
                }));
                if verbose {
                    eprintln!("vpool: {msg}");
                } else if msg.contains("DEGRADED") && !ui().quiet {
                    eprintln!("vpool: warning: {msg}");
                }
                return Ok(0);
            }
            Ok(Some((false, step))) => {
                if verbose || t0.elapsed() > SHOW_STEPS_AFTER {
                    eprintln!("vpool: {step} ({:.0}s)", t0.elapsed().as_secs_f64());
                    shown = true;
                }
                last_step = Some(step);
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                bail!(
                    "the daemon could not mount the pool:\n{}",
                    log_tail(&log_path)
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Still working (recovery after a crash can take long): say
                // what it is doing, once, when it starts taking a while.
                if !shown
                    && t0.elapsed() > SHOW_STEPS_AFTER
                    && let Some(s) = &last_step
                {
                    if !ui().quiet {
                        eprintln!(
                            "vpool: {s} ({:.0}s; the log is {})",
                            t0.elapsed().as_secs_f64(),
                            log_path.display()
                        );
                    }
                    shown = true;
                }
            }
        }
    }
}

/// The daemon's log lines of this mount attempt that say what went wrong.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let recent = &lines[lines.len().saturating_sub(40)..];
    let errors: Vec<&str> = recent
        .iter()
        .copied()
        .filter(|l| l.contains("ERROR") || l.contains("error"))
        .collect();
    let pick = if errors.is_empty() {
        recent[recent.len().saturating_sub(10)..].to_vec()
    } else {
        errors
    };
    format!("{}\n(log: {})", pick.join("\n"), path.display())
}

fn say_line(tag: &str, msg: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{tag} {msg}");
    let _ = out.flush();
}

fn redirect_stdout_to_null() {
    use std::os::unix::io::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 of a valid descriptor onto stdout; `null` stays open until after.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// The directory of the daemons' log files: `$VPOOL_LOG_DIR` when set, else
/// `/var/log/vpool` for root, `$XDG_STATE_HOME/vpool` (or
/// `~/.local/state/vpool`) otherwise.
pub fn log_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VPOOL_LOG_DIR").filter(|s| !s.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/log/vpool");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        Some(d) => PathBuf::from(d).join("vpool"),
        None => match std::env::var_os("HOME").filter(|s| !s.is_empty()) {
            Some(h) => PathBuf::from(h).join(".local/state/vpool"),
            None => control::runtime_dir(),
        },
    }
}

fn log_path(pool: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let d = log_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .with_context(|| format!("cannot create the log directory {}", d.display()))?;
    Ok(d.join(format!("{pool}.log")))
}

fn rotate(p: &Path) {
    if std::fs::metadata(p).is_ok_and(|m| m.len() > LOG_ROTATE) {
        let _ = std::fs::rename(p, p.with_extension("log.1"));
    }
}

/// Logging of a daemon: to the journal when systemd gave it one (returns
/// true), otherwise to stderr (the log file, or the terminal), colour only
/// on a terminal. Default level info; `-v` debug, `-q` warnings;
/// `VPOOL_LOG` overrides.
fn init_daemon_logging(foreground: bool) -> bool {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let u = ui();
    let level = match (u.quiet, u.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    if foreground
        && std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(j) = tracing_journald::layer()
    {
        let j = j.with_syslog_identifier("vpool".into());
        if tracing_subscriber::registry()
            .with(filter)
            .with(j)
            .try_init()
            .is_ok()
        {
            return true;
        }
        return false;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    false
}

/// Warns about member directories that group or others may enter.
fn warn_open_members(pool: &Pool) {
    for (dir, mode) in pool.open_members() {
        eprintln!(
            "warning: member {} is open to other users (mode {mode:o}); \
             `chmod go-rwx {}` keeps them out of every user's data",
            dir.display(),
            dir.display()
        );
    }
}

/// `mount.fuse.vpool SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]`:
/// what mount(8) runs for a `fuse.vpool` line. Options that are mount's or
/// systemd's are dropped (see [`daemon::is_helper_option`]); `-n`, `-s` and
/// `-f` (no mtab, sloppy, fake) are accepted; `-v` talks.
pub fn helper(args: &[String]) -> i32 {
    let mut pos = Vec::new();
    let mut options = Vec::new();
    let mut verbose = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => match it.next() {
                Some(o) => options.push(o.clone()),
                None => return helper_usage("-o needs a value"),
            },
            "-t" => {
                let _ = it.next();
            }
            "-v" => verbose = true,
            "-n" | "-s" | "-f" | "-r" | "-w" => {
                if a == "-r" {
                    options.push("ro".into());
                }
            }
            s if s.starts_with("-o") => options.push(s[2..].to_string()),
            s if s.starts_with('-') => return helper_usage(&format!("unknown option {s}")),
            _ => pos.push(a.clone()),
        }
    }
    let [source, mountpoint] = &pos[..] else {
        return helper_usage("expected SOURCE and MOUNTPOINT");
    };
    // mount's and systemd's options are dropped by `MountOptions::parse`.
    super::output::set(super::output::Ui {
        verbose: verbose as u8,
        ..Default::default()
    });
    let r = mount(MountArgs {
        dir: Path::new(source),
        mountpoint: Path::new(mountpoint),
        options: &options,
        foreground: false,
        daemon_child: false,
        log_file: None,
    });
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mount.fuse.vpool: {e:#}");
            // mount(8)'s "mount failure".
            32
        }
    }
}

fn helper_usage(why: &str) -> i32 {
    eprintln!(
        "mount.fuse.vpool: {why}\nusage: mount.fuse.vpool MEMBER_DIR MOUNTPOINT [-o OPTION,...] [-v]"
    );
    1
}

fn fusermount(args: &[&str], mp: &Path) -> Result<std::process::Output> {
    Proc::new("fusermount3")
        .args(args)
        .arg(mp)
        .output()
        .context("cannot run fusermount3 (is fuse3 installed?)")
}

pub fn unmount(mountpoint: &Path) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint)
        .or_else(|_| std::path::absolute(mountpoint))
        .with_context(|| format!("{}", mountpoint.display()))?;
    let mounted = daemon::mount_type(&mp);
    match mounted.as_deref() {
        None => {
            say(format!(
                "vpool: {} is not mounted; nothing done",
                mp.display()
            ));
            super::output::json(&serde_json::json!({ "unmounted": null }));
            return Ok(0);
        }
        Some(t) if !t.starts_with("fuse") => {
            bail!("{} is a {t} mount, not a vpool mount", mp.display())
        }
        Some(_) => {}
    }
    let pid = match control::request(&mp, &Request::Status) {
        Ok(Response::Status(st)) => st.pid,
        _ => None,
    };
    let Some(pid) = pid else {
        // No daemon answers: a dead mount. Detach it so the mountpoint is usable.
        let out = fusermount(&["-u", "-z"], &mp)?;
        if !out.status.success() {
            bail!(
                "fusermount3 -u -z {}: {}",
                mp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        say(format!(
            "vpool: no daemon was serving {}; detached the dead mount",
            mp.display()
        ));
        super::output::json(&serde_json::json!({ "unmounted": mp, "dead": true }));
        return Ok(0);
    };
    if let Response::Error { message } = control::request(&mp, &Request::Sync)? {
        bail!("flushing before unmount failed: {message}")
    }
    let out = fusermount(&["-u"], &mp)?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        if msg.contains("busy") {
            bail!(
                "{} is busy: close the files and shells using it, then retry",
                mp.display()
            );
        }
        bail!("fusermount3 -u {}: {}", mp.display(), msg.trim());
    }
    let start = Instant::now();
    while super::target::pid_alive(pid) {
        if start.elapsed() > EXIT_TIMEOUT {
            bail!(
                "unmounted, but the daemon (pid {pid}) has not exited after {}s",
                EXIT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    say(format!("vpool: unmounted {}", mp.display()));
    super::output::json(&serde_json::json!({ "unmounted": mp }));
    Ok(0)
}
