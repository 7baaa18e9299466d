//! The commands themselves.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::Command;
use crate::control::{self, Request, Response};
use crate::daemon::{self, MountOptions};
use crate::pool::inspect;
use crate::pool::{CreateOptions, Pool, PoolStatus, read_lock_info};
use crate::util::human;

/// How long `vpool mount` waits for the daemon to report the mount ready.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `vpool unmount` waits for the daemon to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Create {
            copies,
            extent_size,
            block_size,
            dirs,
        } => create(&dirs, copies, extent_size, block_size),
        Command::Mount {
            foreground,
            mut options,
            daemon_child,
            force,
            dir,
            mountpoint,
        } => {
            if force {
                options.push("force".into());
            }
            mount(&dir, &mountpoint, &options, foreground, daemon_child)
        }
        Command::Unmount { mountpoint } => unmount(&mountpoint),
        Command::Status { json, target } => status(&target, json),
        Command::Check { json, dir } => check(&dir, json),
        Command::Snapshot { cmd } => super::snapshot::run(cmd),
        Command::Scrub { json, target } => super::admin::scrub(&target, json),
        Command::Device { cmd } => super::admin::device(cmd),
        Command::Rebalance { target } => super::admin::rebalance(&target),
        Command::Set { target, setting } => super::admin::set(&target, &setting),
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn create(dirs: &[PathBuf], copies: u32, extent_size: u64, block_size: u64) -> Result<i32> {
    let block_size =
        u32::try_from(block_size).map_err(|_| anyhow!("block size {block_size} is too large"))?;
    let label = Pool::create(
        dirs,
        CreateOptions {
            copies,
            extent_size,
            block_size,
        },
    )?;
    println!(
        "created pool {} over {} member(s), copies={}, extent size {}, block size {}",
        label.pool,
        label.members.len(),
        copies,
        human(extent_size),
        human(block_size as u64)
    );
    for m in &label.members {
        println!("  {}", m.path.display());
    }
    Ok(0)
}

fn mount(
    dir: &Path,
    mountpoint: &Path,
    options: &[String],
    foreground: bool,
    daemon_child: bool,
) -> Result<i32> {
    let opts = MountOptions::parse(options)?;
    if foreground || daemon_child {
        init_logging("info");
        daemon::run(dir, mountpoint, &opts, |msg| {
            if daemon_child {
                daemon::say_ready(msg);
                redirect_stdout_to_null();
            } else {
                println!("vpool: {msg} (foreground; unmount with `vpool unmount` or Ctrl-C)");
            }
        })?;
        return Ok(0);
    }
    // Validate in the foreground so refusals come back as plain errors.
    let mp = daemon::check_mountpoint(mountpoint, opts.allow_nonempty)?;
    let pool = Pool::open(dir)?;
    warn_open_members(&pool);
    drop(pool);

    control::ensure_runtime_dir()?;
    let log_path = control::log_path(&mp);
    let log = crate::util::private_options()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the vpool executable")?;
    let mut cmd = Proc::new(exe);
    cmd.arg("mount").arg("--daemon-child");
    for o in options {
        cmd.arg("-o").arg(o);
    }
    cmd.arg(dir).arg(&mp);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
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
            match line {
                Ok(l) if l.starts_with("READY ") => {
                    let _ = tx.send(Some(l["READY ".len()..].to_string()));
                    return;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    match rx.recv_timeout(MOUNT_TIMEOUT) {
        Ok(Some(msg)) => {
            println!("vpool: {msg}");
            Ok(0)
        }
        Ok(None) => {
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).collect();
            let text = if errors.is_empty() {
                log.lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                errors.join("\n")
            };
            bail!("the daemon could not mount the pool:\n{text}")
        }
        Err(_) => {
            let _ = child.kill();
            bail!(
                "the daemon did not report the mount ready within {}s; see {}",
                MOUNT_TIMEOUT.as_secs(),
                log_path.display()
            )
        }
    }
}

fn redirect_stdout_to_null() {
    use std::os::unix::io::AsRawFd;
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 of a valid descriptor onto stdout; `null` stays open until after.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

fn fusermount(args: &[&str], mp: &Path) -> Result<std::process::Output> {
    Proc::new("fusermount3")
        .args(args)
        .arg(mp)
        .output()
        .context("cannot run fusermount3 (is fuse3 installed?)")
}

pub(super) fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn unmount(mountpoint: &Path) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint)
        .or_else(|_| std::path::absolute(mountpoint))
        .with_context(|| format!("{}", mountpoint.display()))?;
    let mounted = daemon::mount_type(&mp);
    match mounted.as_deref() {
        None => {
            println!("vpool: {} is not mounted; nothing done", mp.display());
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
        println!(
            "vpool: no daemon was serving {}; detached the dead mount",
            mp.display()
        );
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
    while pid_alive(pid) {
        if start.elapsed() > EXIT_TIMEOUT {
            bail!(
                "unmounted, but the daemon (pid {pid}) has not exited after {}s",
                EXIT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("vpool: unmounted {}", mp.display());
    Ok(0)
}

fn status_of(target: &Path) -> Result<PoolStatus> {
    let canon = std::fs::canonicalize(target)
        .with_context(|| format!("{} does not exist", target.display()))?;
    let ask = |mp: &Path| -> Result<PoolStatus> {
        match control::request(mp, &Request::Status)? {
            Response::Status(st) => Ok(*st),
            Response::Error { message } => bail!("daemon: {message}"),
            _ => bail!("daemon gave no status"),
        }
    };
    if crate::pool::label::has_label(&crate::storage::real::RealStorage, &canon) {
        // A member directory: ask the daemon if the pool is mounted.
        if let Some((pid, mp)) = read_lock_info(&crate::storage::real::RealStorage, &canon)
            && pid_alive(pid)
            && let Ok(st) = ask(&mp)
        {
            return Ok(st);
        }
        return Ok(inspect::offline_status(&canon)?);
    }
    if daemon::mount_type(&canon).is_some() {
        return ask(&canon)
            .with_context(|| format!("no vpool daemon answers for {}", canon.display()));
    }
    bail!(
        "{} is neither a vpool mountpoint nor a member directory",
        canon.display()
    )
}

fn status(target: &Path, json: bool) -> Result<i32> {
    let st = status_of(target)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(0);
    }
    match (&st.mountpoint, st.pid) {
        (Some(mp), Some(pid)) => println!(
            "pool {}  {}  mounted at {} (pid {pid})",
            st.pool,
            st.state,
            mp.display()
        ),
        _ => println!("pool {}  {}  not mounted", st.pool, st.state),
    }
    println!(
        "copies {}, extent size {}, block size {}",
        st.copies,
        human(st.extent_size),
        human(st.block_size as u64)
    );
    println!(
        "{:<40} {:<8} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "MEMBER", "HEALTH", "SIZE", "USED", "FREE", "STORED", "EXTENTS"
    );
    for m in &st.members {
        println!(
            "{:<40} {:<8} {:>10} {:>10} {:>10} {:>10} {:>8}",
            m.path.display(),
            m.health,
            human(m.size),
            human(m.used),
            human(m.free),
            human(m.stored_bytes),
            m.extents
        );
    }
    println!(
        "total: size {}, used {}, free {}; {} file(s), {} logical, {} stored",
        human(st.size),
        human(st.used),
        human(st.free),
        st.files,
        human(st.logical_bytes),
        human(st.stored_bytes)
    );
    for m in st.members.iter().filter(|m| m.health != "ONLINE") {
        println!(
            "member {} is {}: {}",
            m.path.display(),
            m.health,
            m.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    if st.state != "ONLINE" || st.degraded_bytes > 0 || st.unavailable_bytes > 0 {
        println!(
            "DEGRADED: {} with fewer copies than asked, {} with no copy left (reads there fail); \
             `vpool device replace` rebuilds a lost member's copies",
            human(st.degraded_bytes),
            human(st.unavailable_bytes)
        );
    }
    let i = &st.integrity;
    println!(
        "integrity since mount: {} checksum error(s), {} repaired, {} unrecoverable, {} read error(s)",
        i.checksum_errors, i.repaired, i.unrecoverable, i.io_errors
    );
    Ok(0)
}

fn check(dir: &Path, json: bool) -> Result<i32> {
    let r = crate::snapshot::check_pool(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "pool {}: {} member(s), {} inode(s), {} extent(s)",
            r.pool, r.members, r.inodes, r.extents
        );
        for n in &r.notes {
            println!("note: {n}");
        }
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
        if r.is_clean() {
            println!("consistent");
        } else {
            println!("{} problem(s) found", r.problems.len());
        }
    }
    Ok(if r.is_clean() { 0 } else { 1 })
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
