//! Running vpool unattended, as an admin would (issue 13): an fstab line
//! mounted by `mount -a` through the `mount.fuse.vpool` helper, a
//! foreground daemon under systemd's notify protocol, the daemon's working
//! directory and log, health and exit codes (`status -x`, Prometheus
//! metrics), the event history and hooks, counters and the last scrub kept
//! across mounts, automatic snapshots with prefix-limited prune and holds,
//! long jobs listed and cancelled, JSON everywhere.
//!
//! The tests here look at every mounted pool (`status` without a target),
//! so they run one at a time (`SERIAL`).

use crate::common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", describe(o)))
}

fn code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// The daemon's working directory.
fn cwd_of(pid: i32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/cwd")).unwrap()
}

/// `/sbin/mount.fuse.vpool` pointing at the binary under test for as long
/// as it lives (what `scripts/install.sh` installs); a link that was there
/// before is put back.
struct Helper {
    path: PathBuf,
    before: Option<PathBuf>,
}

impl Helper {
    fn install() -> Option<Helper> {
        let path = PathBuf::from("/sbin/mount.fuse.vpool");
        let before = fs::read_link(&path).ok();
        if before.is_none() && path.exists() {
            eprintln!("skipped: {} exists and is not a link", path.display());
            return None;
        }
        let _ = fs::remove_file(&path);
        if let Err(e) = std::os::unix::fs::symlink(VPOOL, &path) {
            eprintln!(
                "skipped: cannot install {} ({e}; not root?)",
                path.display()
            );
            return None;
        }
        Some(Helper { path, before })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(b) = &self.before {
            let _ = std::os::unix::fs::symlink(b, &self.path);
        }
    }
}

/// The fstab line of the issue (`allow_other,nofail`), plus systemd's and
/// mount's own options, mounted with `mount -a` from a temporary fstab:
/// silent, listed by `findmnt -t fuse.vpool`, unmounted by plain `umount`
/// (the daemon commits and exits), and mounted again by mountpoint alone.
#[test]
fn an_fstab_line_mounts_with_mount_a_silently() {
    let _s = serial();
    let Some(_helper) = Helper::install() else {
        return;
    };
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let mnt = pool.mnt();
    let fstab = pool.scratch("fstab");
    fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} fuse.vpool allow_other,nofail,_netdev,noatime,x-systemd.device-timeout=30s 0 0\n",
            pool.members[0].display(),
            mnt.display()
        ),
    )
    .unwrap();
    let o = run_t(90, "mount", &args!["-a", "-T", &fstab]);
    assert!(o.status.success(), "mount -a\n{}", describe(&o));
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "a mount helper is silent on success\n{}",
        describe(&o)
    );
    let m = Mount::adopt(&pool.members[0], &mnt);
    let f = run_ok(
        "findmnt",
        &args![
            "-n",
            "-t",
            "fuse.vpool",
            "-o",
            "TARGET,FSTYPE,OPTIONS",
            &mnt
        ],
    );
    let t = text(&f);
    assert!(t.contains("fuse.vpool"), "{t}");
    assert!(
        t.contains("allow_other"),
        "allow_other reached the kernel: {t}"
    );
    assert!(t.contains("noatime"), "{t}");
    let data = pattern(3, 300_000);
    write_synced(&mnt.join("disk.img"), &data);
    let pid = m.pid.expect("daemon pid");
    // `umount` as root detaches the mount; the daemon sees its session end,
    // commits and exits.
    let o = run_t(60, "umount", &args![&mnt]);
    assert!(o.status.success(), "umount\n{}", describe(&o));
    assert!(
        wait_until(Duration::from_secs(30), || !pid_alive(pid)),
        "daemon still running after umount"
    );
    m.forget();
    // By mountpoint alone, as `mount /var/lib/images` does.
    let o = run_t(90, "mount", &args!["-T", &fstab, &mnt]);
    assert!(o.status.success(), "mount MOUNTPOINT\n{}", describe(&o));
    let m = Mount::adopt(&pool.members[0], &mnt);
    assert_same(
        &fs::read(mnt.join("disk.img")).unwrap(),
        &data,
        "after remount",
    );
    // The helper talks with -v and rejects what it does not know.
    let o = run_t(30, "/sbin/mount.fuse.vpool", &args!["-x", "a", "b"]);
    assert!(
        !o.status.success() && text(&o).contains("unknown option -x"),
        "{}",
        describe(&o)
    );
    m.unmount();
    pool.assert_check_clean();
}

/// `vpool mount --foreground` under systemd (Type=notify): READY=1 once
/// the mount is up, STOPPING=1 and a clean exit on SIGTERM; the daemon
/// keeps no directory busy (its working directory is `/`) and writes no
/// colour codes into a log that is not a terminal.
#[test]
fn foreground_daemon_speaks_sd_notify_and_stops_on_sigterm() {
    let _s = serial();
    let pool = Pool::new(1, &[]);
    let sock_path = pool.scratch("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let log = pool.scratch("fg.log");
    // Started from a directory of its own: the daemon must not stay in it.
    let start_dir = pool.scratch("start");
    fs::create_dir(&start_dir).unwrap();
    let mut child = Command::new(VPOOL)
        .args(["mount", "--foreground"])
        .arg(&pool.members[0])
        .arg(pool.mnt())
        .current_dir(&start_dir)
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify message within 60 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains("STATUS=pool "), "{msg}");
    assert!(is_mounted(&pool.mnt()), "READY before the mount was up");
    let m = Mount::adopt(&pool.members[0], &pool.mnt());
    assert_eq!(m.pid, Some(child.id() as i32));
    assert_eq!(cwd_of(child.id() as i32), Path::new("/"));
    let st = m.status();
    assert_eq!(st["log"], "stderr", "{st}");
    write_synced(&m.join("f"), b"kept");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let n = sock.recv(&mut buf).expect("no STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(
        wait_until(Duration::from_secs(30), || child
            .try_wait()
            .unwrap()
            .is_some()),
        "daemon did not exit on SIGTERM"
    );
    assert!(child.wait().unwrap().success(), "exit status after SIGTERM");
    assert!(!is_mounted(&pool.mnt()));
    m.forget();
    let l = fs::read_to_string(&log).unwrap();
    assert!(l.contains("serving"), "{l}");
    assert!(!l.contains('\x1b'), "colour codes in a log file:\n{l}");
    let m = pool.mount();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"kept");
    m.unmount();
}

/// `VPOOL_LOG_DIR` in the environment of `vpool mount` puts the daemon's
/// log file there (a test run or an admin keeps logs out of /var/log).
#[test]
fn the_log_directory_can_be_chosen() {
    let _s = serial();
    let pool = Pool::new(1, &[]);
    let dir = pool.scratch("logs");
    let o = run_t_env(
        60,
        VPOOL,
        &args!["mount", &pool.members[0], &pool.mnt()],
        &[("VPOOL_LOG_DIR", dir.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", describe(&o));
    let m = Mount::adopt(&pool.members[0], &pool.mnt());
    let st = m.status();
    let log = status_log(&st);
    assert_eq!(
        log,
        dir.join(format!("{}.log", st["pool"].as_str().unwrap())),
        "{st}"
    );
    m.unmount();
    let l = fs::read_to_string(&log).unwrap();
    assert!(l.contains("serving"), "{l}");
}

/// A detached daemon: silent mount, `/` as working directory, a log file
/// per pool that `status` names, appended to across mounts.
#[test]
fn detached_daemon_leaves_its_directory_and_keeps_one_log() {
    let _s = serial();
    let pool = Pool::new(1, &[]);
    let (m, o) = Mount::try_new_output(&pool.members[0], &pool.mnt(), &[]).unwrap();
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "vpool mount is silent on success\n{}",
        describe(&o)
    );
    let pid = m.pid.unwrap();
    assert_eq!(cwd_of(pid), Path::new("/"));
    let st = m.status();
    let log = status_log(&st);
    assert!(
        log.ends_with(format!("{}.log", st["pool"].as_str().unwrap())),
        "{log:?}"
    );
    let t = text(&vpool_ok(&args!["status", &m.path]));
    assert!(t.contains(&format!("log: {}", log.display())), "{t}");
    m.unmount();
    let m = pool.mount();
    m.unmount();
    let l = fs::read_to_string(&log).unwrap();
    assert_eq!(
        l.matches("serving").count(),
        2,
        "one log across mounts:\n{l}"
    );
    assert!(!l.contains('\x1b'), "colour codes in the log file");
    // Another user on an allow_other mount uses the files but cannot reach
    // the daemon's admin socket; the refusal says whose pool it is.
    let m = pool.mount_opts(&["allow_other"]);
    fs::set_permissions(&m.path, fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!("echo hi > '{0}/n' && cat '{0}/n'", m.path.display());
    let o = run_as_nobody("sh", &args!["-c", script]);
    assert_eq!(text(&o).trim(), "hi", "{}", describe(&o));
    for cmd in [
        args!["status", &m.path],
        args!["events", &m.path],
        args!["jobs", &m.path],
        args!["snapshot", "create", "--auto", &m.path],
        args!["scrub", "--stop", &m.path],
    ] {
        let o = run_as_nobody(VPOOL, &cmd);
        assert_refused(
            &o,
            &["only the user who mounted the pool"],
            "admin as another user",
        );
    }
    assert!(
        snapshot_names(&m.path).is_empty(),
        "another user made a snapshot"
    );
    m.unmount();
    // `-v` talks.
    let o = run_t(
        60,
        VPOOL,
        &args!["mount", "-v", &pool.members[0], &pool.mnt()],
    );
    assert!(o.status.success(), "{}", describe(&o));
    let m = Mount::adopt(&pool.members[0], &pool.mnt());
    assert!(text(&o).contains("mounted at"), "{}", describe(&o));
    m.unmount();
    let _ = fs::remove_file(&log);
}

/// A hook that appends its environment's event to a file.
fn recording_hook(dir: &Path, out: &Path) {
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let hook = dir.join("10-record");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$VPOOL_EVENT|$VPOOL_SEVERITY|$VPOOL_MEMBER|$VPOOL_POOL|$VPOOL_MOUNTPOINT\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Healthy, then a member gone: `status -x` does not list the pool (and
/// says "all pools are healthy" and exits 0 when no other test's pool is
/// unhealthy), then lists it and exits 3; so do `status` and
/// the Prometheus metrics; the failure is in the event history and reached
/// the hook with the member named.
#[test]
fn a_degraded_pool_shows_in_status_x_exit_codes_events_hooks_and_metrics() {
    let _s = serial();
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let hooks = pool.scratch("events.d");
    let out = pool.scratch("hook.out");
    recording_hook(&hooks, &out);
    let opt = format!("event_hooks={}", hooks.display());
    let m = pool.mount_opts(&[&opt]);
    write_synced(&m.join("a"), &pattern(1, 2 << 20));
    // `status -x` covers every pool mounted on the machine, and the tests of
    // other modules may have a degraded one mounted meanwhile: this pool
    // must not be among those listed.
    let o = vpool(&args!["status", "-x"]);
    if code(&o) == 0 {
        assert_eq!(text(&o).trim(), "all pools are healthy");
    } else {
        assert_eq!(code(&o), 3, "{}", describe(&o));
        let mnt = m.path.display().to_string();
        assert!(!text(&o).contains(&mnt), "{}", describe(&o));
    }
    let o = vpool(&args!["status", &m.path]);
    assert_eq!(code(&o), 0, "{}", describe(&o));
    assert!(text(&o).contains("health: healthy"), "{}", describe(&o));
    assert!(
        wait_until(Duration::from_secs(10), || fs::read_to_string(&out)
            .is_ok_and(|t| t.contains("mounted|info"))),
        "the hook did not hear the mount"
    );

    let gone = pool.members[1].canonicalize().unwrap();
    fs::remove_dir_all(&gone).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || m.status()["state"]
            == "DEGRADED"),
        "member loss not noticed"
    );
    let o = vpool(&args!["status", "-x"]);
    assert_eq!(code(&o), 3, "{}", describe(&o));
    let t = text(&o);
    assert!(
        t.contains("DEGRADED") && t.contains(&gone.display().to_string()),
        "{t}"
    );
    assert!(!t.contains("all pools are healthy"), "{t}");
    let o = vpool(&args!["status", &m.path]);
    assert_eq!(code(&o), 3, "{}", describe(&o));
    let o = vpool(&args!["status", "--json", &m.path]);
    assert_eq!(code(&o), 3);
    let st = json_of(&o);
    assert_eq!(st["healthy"], false, "{st}");
    assert!(
        st["problems"][0].as_str().unwrap().contains("FAULTED"),
        "{st}"
    );
    // Metrics: the pool and the member are down; the exit code says so too.
    let o = vpool(&args!["status", "--format", "prometheus"]);
    assert_eq!(code(&o), 3, "{}", describe(&o));
    let p = text(&o);
    let id = st["pool"].as_str().unwrap();
    let labels = format!("pool=\"{id}\",mountpoint=\"{}\"", m.path.display());
    assert!(
        p.contains(&format!("vpool_pool_healthy{{{labels}}} 0")),
        "{p}"
    );
    assert!(
        p.contains(&format!(
            "vpool_member_online{{{labels},member=\"{}\",health=\"FAULTED\"}} 0",
            gone.display()
        )),
        "{p}"
    );
    // The event history (the flusher's probe fails the member within a
    // commit interval) and the hook.
    assert!(
        wait_until(Duration::from_secs(20), || text(&vpool_ok(&args![
            "events", &m.path
        ]))
        .contains("member_failed")),
        "no member_failed event"
    );
    let o = vpool_ok(&args!["events", "--json", &m.path]);
    let evs: Vec<serde_json::Value> = text(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let failed = evs
        .iter()
        .find(|e| e["kind"] == "member_failed")
        .unwrap_or_else(|| panic!("{evs:?}"));
    assert_eq!(failed["severity"], "error");
    assert!(
        wait_until(Duration::from_secs(20), || fs::read_to_string(&out)
            .is_ok_and(|t| t.contains(&format!(
                "member_failed|error|{}|{id}|{}",
                gone.display(),
                m.path.display()
            )))),
        "hook output: {:?}",
        fs::read_to_string(&out)
    );
    m.unmount();
    // The history is the pool's: it is there offline, and after a remount.
    let o = vpool_ok(&args!["events", &pool.members[0]]);
    let t = text(&o);
    assert!(
        t.contains("member_failed") && t.contains("unmounted"),
        "{t}"
    );
}

/// Integrity counters and the last scrub are the pool's, not the mount's.
#[test]
fn counters_and_the_last_scrub_survive_a_remount() {
    let _s = serial();
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(7, 3 << 20);
    {
        let m = pool.mount();
        write_synced(&m.join("img"), &data);
        let st = m.status();
        assert!(st["last_scrub"].is_null(), "{st}");
        let t = text(&vpool_ok(&args!["status", &m.path]));
        assert!(t.contains("last scrub: never"), "{t}");
        m.unmount();
    }
    // One bad copy of one block.
    let mut files: Vec<PathBuf> = fs::read_dir(pool.members[0].join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "sum"))
        .collect();
    files.sort();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&files[0])
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 4096 * 5 + 3).unwrap();
        b[0] ^= 0xff;
        f.write_all_at(&b, 4096 * 5 + 3).unwrap();
    }
    let m = pool.mount();
    let o = vpool(&args!["scrub", "--json", &m.path]);
    assert_eq!(code(&o), 0, "{}", describe(&o));
    let r = json_of(&o);
    assert!(r["data"]["repaired"].as_u64().unwrap() >= 1, "{r}");
    let st = m.status();
    let errors = st["integrity"]["checksum_errors"].as_u64().unwrap();
    let repaired = st["integrity"]["repaired"].as_u64().unwrap();
    assert!(errors >= 1 && repaired >= 1, "{st}");
    assert_eq!(st["last_scrub"]["result"], "repaired", "{st}");
    let started = st["last_scrub"]["started"].as_i64().unwrap();
    m.unmount();
    let m = pool.mount();
    let st = m.status();
    assert_eq!(
        st["integrity"]["checksum_errors"].as_u64(),
        Some(errors),
        "{st}"
    );
    assert_eq!(st["integrity"]["repaired"].as_u64(), Some(repaired), "{st}");
    assert_eq!(st["last_scrub"]["started"].as_i64(), Some(started), "{st}");
    assert_eq!(st["healthy"], true, "a repaired pool is healthy: {st}");
    let t = text(&vpool_ok(&args!["status", &m.path]));
    assert!(t.contains("last scrub: repaired"), "{t}");
    let t = text(&vpool_ok(&args!["events", &m.path]));
    assert!(
        t.contains("checksum_repaired") && t.contains("scrub_finished"),
        "{t}"
    );
    assert_same(&fs::read(m.join("img")).unwrap(), &data, "after repair");
    m.unmount();
    // Offline too.
    let st = status_json(&pool.members[0]);
    assert_eq!(st["integrity"]["repaired"].as_u64(), Some(repaired), "{st}");
}

fn snapshot_names(mp: &Path) -> Vec<String> {
    let o = vpool_ok(&args!["snapshot", "list", "--json", mp]);
    json_of(&o)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// The nightly prune of the issue deleted a manual `before-upgrade`
/// snapshot; with `--prefix auto-` it never looks at it, and a held
/// snapshot stays whatever the rules say (and cannot be deleted until
/// released).
#[test]
fn auto_snapshots_prune_only_their_prefix_and_never_a_held_one() {
    let _s = serial();
    let pool = Pool::new(1, &["--extent-size", "1M"]);
    let m = pool.mount();
    write_synced(&m.join("f"), b"one");
    vpool_ok(&args!["snapshot", "create", &m.path, "before-upgrade"]);
    let mut autos = Vec::new();
    for i in 0..3 {
        write_synced(&m.join("f"), format!("v{i}").as_bytes());
        let o = vpool_ok(&args![
            "snapshot", "create", "--auto", "--wait", "--json", &m.path
        ]);
        let name = json_of(&o)["name"].as_str().unwrap().to_string();
        assert!(name.starts_with("auto-20"), "{name}");
        autos.push(name);
    }
    let mut uniq = autos.clone();
    uniq.dedup();
    assert_eq!(uniq.len(), 3, "auto names collide: {autos:?}");
    let o = vpool(&args![
        "snapshot",
        "create",
        "--auto",
        &m.path,
        "also-a-name"
    ]);
    assert_eq!(
        code(&o),
        2,
        "--auto with a NAME is a usage error\n{}",
        describe(&o)
    );
    vpool_ok(&args!["snapshot", "hold", &m.path, &autos[0]]);
    let list = json_of(&vpool_ok(&args!["snapshot", "list", "--json", &m.path]));
    let held = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == autos[0].as_str())
        .unwrap();
    assert_eq!(held["held"], true);

    let o = vpool_ok(&args![
        "snapshot",
        "prune",
        "--json",
        &m.path,
        "--prefix",
        "auto-",
        "--keep-last",
        "1",
        "--dry-run"
    ]);
    let plan = json_of(&o);
    assert_eq!(plan["dry_run"], true);
    let v = plan["snapshots"].as_array().unwrap();
    let verdict = |n: &str| v.iter().find(|d| d["name"] == n).cloned();
    assert!(
        verdict("before-upgrade").is_none(),
        "other prefixes are not considered: {plan}"
    );
    assert_eq!(verdict(&autos[2]).unwrap()["reasons"][0], "last");
    assert_eq!(verdict(&autos[0]).unwrap()["reasons"][0], "held");
    assert_eq!(verdict(&autos[1]).unwrap()["keep"], false);
    assert_eq!(
        snapshot_names(&m.path).len(),
        4,
        "dry run deleted something"
    );

    // Within an hour of the newest keeps them all.
    let o = vpool_ok(&args![
        "snapshot",
        "prune",
        &m.path,
        "--prefix",
        "auto-",
        "--keep-within",
        "1h"
    ]);
    assert!(text(&o).contains("nothing to delete"), "{}", describe(&o));
    let o = vpool(&args!["snapshot", "prune", &m.path, "--prefix", "auto-"]);
    assert_refused(&o, &["keep rule"], "prune without a rule");

    let o = vpool_ok(&args![
        "snapshot",
        "prune",
        &m.path,
        "--prefix",
        "auto-",
        "--keep-last",
        "1"
    ]);
    assert!(
        text(&o).contains(&format!("deleted {}", autos[1])),
        "{}",
        describe(&o)
    );
    let names = snapshot_names(&m.path);
    assert_eq!(names.len(), 3, "{names:?}");
    for keep in ["before-upgrade", &autos[0], &autos[2]] {
        assert!(names.iter().any(|n| n == keep), "{keep} gone: {names:?}");
    }
    let o = vpool(&args!["snapshot", "delete", &m.path, &autos[0]]);
    assert_refused(&o, &["held"], "deleting a held snapshot");
    assert_eq!(code(&o), 1);
    vpool_ok(&args!["snapshot", "release", &m.path, &autos[0]]);
    vpool_ok(&args!["snapshot", "delete", &m.path, &autos[0]]);
    // Holds are the pool's: they survive a remount.
    vpool_ok(&args!["snapshot", "hold", &m.path, &autos[2]]);
    m.unmount();
    let m = pool.mount();
    let o = vpool(&args!["snapshot", "delete", &m.path, &autos[2]]);
    assert_refused(&o, &["held"], "a hold after a remount");
    let t = text(&vpool_ok(&args!["events", &m.path]));
    assert!(
        t.contains("snapshot_created") && t.contains("snapshot_deleted"),
        "{t}"
    );
    m.unmount();
}

/// Every command answers in JSON with `--json`, errors too, with the
/// documented exit codes.
#[test]
fn json_answers_and_errors_with_stable_exit_codes() {
    let _s = serial();
    let pool = Pool::dirs(1);
    let o = vpool(&args!["create", "--json", &pool.members[0]]);
    assert_eq!(code(&o), 0, "{}", describe(&o));
    let created = json_of(&o);
    assert!(created["pool"].is_string(), "{created}");
    let o = vpool(&args!["--json", "status", "/nonexistent/x"]);
    assert_eq!(code(&o), 1);
    let e = json_of(&o);
    assert_eq!(e["error"]["code"], 1, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{e}"
    );
    let o = vpool(&args!["--json", "snapshot", "create"]);
    assert_eq!(code(&o), 2, "{}", describe(&o));
    assert_eq!(json_of(&o)["error"]["code"], 2);
    let o = vpool(&args!["no-such-command"]);
    assert_eq!(code(&o), 2);
    let m = pool.mount();
    let o = vpool_ok(&args![
        "snapshot", "create", "--json", "--wait", &m.path, "s1"
    ]);
    assert_eq!(json_of(&o)["state"], "complete");
    let o = vpool_ok(&args!["jobs", "--json"]);
    assert!(json_of(&o).is_array());
    let o = vpool_ok(&args!["set", "--json", &m.path, "copies=1"]);
    assert!(json_of(&o)["message"].is_string());
    let o = vpool_ok(&args!["snapshot", "delete", "--json", &m.path, "s1"]);
    assert_eq!(json_of(&o)["deleted"], "s1");
    let o = vpool(&args!["snapshot", "delete", "--json", &m.path, "s1"]);
    assert_eq!(code(&o), 1);
    assert!(
        json_of(&o)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no such snapshot")
    );
    // -q: nothing on stdout.
    let o = vpool_ok(&args!["snapshot", "create", "-q", &m.path, "s2"]);
    assert!(o.stdout.is_empty(), "{}", describe(&o));
    let o = run_t(60, VPOOL, &args!["unmount", "--json", &m.path]);
    assert!(o.status.success());
    assert!(json_of(&o)["unmounted"].is_string());
    m.forget();
}

/// `vpool events -f` streams new events and does not hold up an unmount.
#[test]
fn events_follow_streams_and_ends_with_the_mount() {
    let _s = serial();
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    let mut child = Command::new(VPOOL)
        .args(["events", "-f", "--json"])
        .arg(&m.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    // The history first (the mount), then what happens.
    let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.contains("\"mounted\""), "{first}");
    vpool_ok(&args!["snapshot", "create", "--wait", &m.path, "s1"]);
    let mut got = false;
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["kind"] == "snapshot_created" {
            got = true;
            break;
        }
    }
    assert!(got, "snapshot_created not streamed");
    let t0 = std::time::Instant::now();
    m.unmount();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "a follower held up the unmount"
    );
    assert!(
        wait_until(Duration::from_secs(20), || child
            .try_wait()
            .unwrap()
            .is_some()),
        "follower did not end with the mount"
    );
}

/// A scrub on a slow disk is listed by `vpool jobs` with its progress after
/// its command has gone quiet, `vpool jobs cancel` stops it (what it
/// checked stays; the last scrub reads `cancelled`), and so does `vpool
/// scrub --stop`.
#[cfg(feature = "fault-injection")]
#[test]
fn long_jobs_are_listed_and_cancelled() {
    let _s = serial();
    let pool = Pool::new(1, &["--extent-size", "1M"]);
    let d = pool.members[0].canonicalize().unwrap();
    let trigger = pool.scratch("slow");
    let env_path = format!("VPOOL_FAULT_PATH={}/data/", d.display());
    let env_trigger = format!("VPOOL_FAULT_TRIGGER={}", trigger.display());
    let m = Mount::try_new_wrapped(
        &["env", &env_path, &env_trigger, "VPOOL_FAULT_SLOW_MS=100"],
        &d,
        &pool.mnt(),
        &[],
    )
    .unwrap_or_else(|o| panic!("{}", describe(&o)));
    write_synced(&m.join("img"), &pattern(2, 48 << 20));
    fs::write(&trigger, b"").unwrap();
    let scrub = |extra: &[&str]| {
        let mut c = Command::new(VPOOL);
        c.arg("scrub").args(extra).arg(&m.path);
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_job = || -> serde_json::Value {
        let mut found = None;
        wait_until(Duration::from_secs(30), || {
            let o = vpool_ok(&args!["jobs", "--json"]);
            found = json_of(&o)
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["kind"] == "scrub" && j["total"].as_u64() > Some(0))
                .cloned();
            found.is_some()
        });
        found.expect("the scrub is not listed by `vpool jobs`")
    };
    let child = scrub(&["--json"]);
    let job = wait_job();
    assert_eq!(job["unit"], "extents");
    assert_eq!(
        job["mountpoint"].as_str().map(PathBuf::from),
        Some(m.path.clone())
    );
    let t = text(&vpool_ok(&args!["jobs"]));
    assert!(t.contains("scrub") && t.contains("extents"), "{t}");
    let id = job["id"].as_str().unwrap().to_string();
    let o = vpool_ok(&args!["jobs", "cancel", &id]);
    assert!(text(&o).contains("cancelled"), "{}", describe(&o));
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    let r = json_of(&o);
    assert_eq!(r["cancelled"], true, "{r}");
    let st = m.status();
    assert_eq!(st["last_scrub"]["result"], "cancelled", "{st}");
    let t = text(&vpool_ok(&args!["events", &m.path]));
    assert!(t.contains("job_cancelled"), "{t}");
    // `scrub --stop`.
    let child = scrub(&[]);
    wait_job();
    vpool_ok(&args!["scrub", "--stop", &m.path]);
    let o = child.wait_with_output().unwrap();
    assert!(text(&o).contains("result: cancelled"), "{}", describe(&o));
    let o = vpool(&args!["jobs", "cancel", "999"]);
    assert_refused(&o, &["no running job"], "cancel of an unknown job");
    fs::remove_file(&trigger).unwrap();
    m.unmount();
}

/// A slow start (a disk that answers slowly while the pool opens): the
/// parent waits for the daemon's verdict and says what it is doing (`-v`
/// at once, otherwise after a few seconds), instead of giving up.
#[cfg(feature = "fault-injection")]
#[test]
fn a_slow_start_is_waited_for_and_its_steps_are_shown() {
    let _s = serial();
    let pool = Pool::new(1, &[]);
    let d = pool.members[0].canonicalize().unwrap();
    {
        let m = pool.mount();
        write_synced(&m.join("f"), &pattern(1, 1 << 20));
        m.unmount();
    }
    let trigger = pool.scratch("slow");
    fs::write(&trigger, b"").unwrap();
    let env_path = format!("VPOOL_FAULT_PATH={}/", d.display());
    let env_trigger = format!("VPOOL_FAULT_TRIGGER={}", trigger.display());
    let o = run_t(
        300,
        "env",
        &args![
            &env_path,
            &env_trigger,
            "VPOOL_FAULT_SLOW_MS=20",
            VPOOL,
            "mount",
            "-v",
            &d,
            &pool.mnt()
        ],
    );
    assert!(o.status.success(), "{}", describe(&o));
    let m = Mount::adopt(&d, &pool.mnt());
    let t = text(&o);
    assert!(t.contains("opening the pool"), "{t}");
    assert!(t.contains("recovering"), "{t}");
    assert!(t.contains("mounted at"), "{t}");
    fs::remove_file(&trigger).unwrap();
    m.unmount();
}

/// Under systemd with a journal, the daemon's log goes there with its
/// fields. Only where a journal runs (not in a container without systemd).
#[test]
fn the_journal_gets_the_log_where_there_is_one() {
    let _s = serial();
    if !Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("skipped: no journald socket on this machine");
        return;
    }
    let pool = Pool::new(1, &[]);
    let mut child = Command::new(VPOOL)
        .args(["mount", "--foreground"])
        .arg(&pool.members[0])
        .arg(pool.mnt())
        .env("JOURNAL_STREAM", "0:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let m = Mount::adopt(&pool.members[0], &pool.mnt());
    assert_eq!(m.status()["log"], "journal");
    let id = m.status()["pool"].as_str().unwrap().to_string();
    m.unmount();
    let _ = child.wait();
    let found = wait_until(Duration::from_secs(10), || {
        let o = run_t(
            30,
            "journalctl",
            &args!["-t", "vpool", "--no-pager", "-o", "verbose", "-n", "200"],
        );
        text(&o).contains(&id)
    });
    assert!(found, "no journal entry names pool {id}");
}
