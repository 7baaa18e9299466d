//! Event hooks (zed's zedlets are the model): for every event of the pool,
//! the daemon runs each executable in the hook directory
//! (`/etc/vpool/events.d` unless the mount option `event_hooks=DIR` names
//! another), in name order, one event at a time, with the event in the
//! environment:
//!
//! `VPOOL_EVENT` (kind), `VPOOL_SEVERITY` (info, warning, error),
//! `VPOOL_POOL` (uuid), `VPOOL_MOUNTPOINT`, `VPOOL_MEMBER` (or empty),
//! `VPOOL_MESSAGE`, `VPOOL_TIME` (RFC 3339), `VPOOL_SEQ`, `VPOOL_EVENT_JSON`
//! (the whole event).
//!
//! Only files that cannot have been planted by someone else run: the
//! directory and the file must belong to root or to the daemon's user and
//! be writable by no one else; anything else is skipped with a warning. A
//! hook has [`HOOK_TIMEOUT`] to finish; its output goes to the log. Events
//! wait in a bounded queue: when hooks fall behind, the excess is dropped
//! (and logged), never the daemon's own work.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use crate::pool::info::Event;

pub const DEFAULT_DIR: &str = "/etc/vpool/events.d";
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
const QUEUE: usize = 256;

/// What every hook is told besides the event.
#[derive(Clone, Debug)]
pub struct Context {
    pub pool: String,
    pub mountpoint: PathBuf,
}

/// The hook runner: a thread taking events from a bounded queue.
pub struct Hooks {
    tx: SyncSender<Event>,
}

impl Hooks {
    pub fn start(dir: PathBuf, ctx: Context) -> std::io::Result<Hooks> {
        let (tx, rx) = sync_channel::<Event>(QUEUE);
        std::thread::Builder::new()
            .name("vpool-hooks".into())
            .spawn(move || {
                for ev in rx {
                    run_all(&dir, &ctx, &ev);
                }
            })?;
        Ok(Hooks { tx })
    }

    /// Queues `ev` for the hooks; never blocks.
    pub fn notify(&self, ev: &Event) {
        match self.tx.try_send(ev.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(event = %ev.kind, seq = ev.seq, "event hooks are behind; event not passed to them")
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Whether `md` (of a hook or its directory) is safe to trust: owned by
/// root or us, writable by nobody else.
fn trusted(md: &std::fs::Metadata, me: u32) -> Result<(), String> {
    if md.uid() != 0 && md.uid() != me {
        return Err(format!("owned by uid {}", md.uid()));
    }
    if md.permissions().mode() & 0o022 != 0 {
        return Err("writable by group or others".into());
    }
    Ok(())
}

/// The hooks of `dir` that may run, in name order.
pub fn hooks_in(dir: &Path) -> Vec<PathBuf> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    let Ok(md) = std::fs::metadata(dir) else {
        return Vec::new();
    };
    if let Err(why) = trusted(&md, me) {
        tracing::warn!(dir = %dir.display(), why, "event hook directory not trusted; no hook runs");
        return Vec::new();
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    out.sort();
    out.retain(|p| {
        let Ok(md) = std::fs::symlink_metadata(p) else {
            return false;
        };
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !md.is_file() || md.permissions().mode() & 0o111 == 0 || name.starts_with('.') {
            return false;
        }
        match trusted(&md, me) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(hook = %p.display(), why, "event hook not trusted; skipped");
                false
            }
        }
    });
    out
}

/// The environment of a hook for `ev`.
pub fn env_of(ctx: &Context, ev: &Event) -> Vec<(String, String)> {
    let time = jiff::Timestamp::from_second(ev.time)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ev.time.to_string());
    vec![
        ("VPOOL_EVENT".into(), ev.kind.clone()),
        ("VPOOL_SEVERITY".into(), ev.severity.as_str().into()),
        ("VPOOL_POOL".into(), ctx.pool.clone()),
        (
            "VPOOL_MOUNTPOINT".into(),
            ctx.mountpoint.display().to_string(),
        ),
        ("VPOOL_MEMBER".into(), ev.member.clone().unwrap_or_default()),
        ("VPOOL_MESSAGE".into(), ev.message.clone()),
        ("VPOOL_TIME".into(), time),
        ("VPOOL_SEQ".into(), ev.seq.to_string()),
        (
            "VPOOL_EVENT_JSON".into(),
            serde_json::to_string(ev).unwrap_or_default(),
        ),
    ]
}

fn run_all(dir: &Path, ctx: &Context, ev: &Event) {
    for hook in hooks_in(dir) {
        run_one(&hook, ctx, ev);
    }
}

fn run_one(hook: &Path, ctx: &Context, ev: &Event) {
    let mut cmd = Command::new(hook);
    cmd.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // systemd's notification socket is the daemon's, not the hook's.
        .env_remove("NOTIFY_SOCKET")
        .envs(env_of(ctx, ev));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(hook = %hook.display(), error = %e, "cannot run event hook");
            return;
        }
    };
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t0.elapsed() > HOOK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(hook = %hook.display(), "event hook timed out; killed");
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!(hook = %hook.display(), error = %e, "cannot wait for event hook");
                break None;
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.by_ref().take(64 * 1024).read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.by_ref().take(64 * 1024).read_to_string(&mut out);
    }
    match status {
        Some(s) if s.success() => {
            tracing::debug!(hook = %hook.display(), event = %ev.kind, output = %out.trim(), "event hook ran")
        }
        Some(s) => {
            tracing::warn!(hook = %hook.display(), event = %ev.kind, status = %s, output = %out.trim(), "event hook failed")
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::info::Severity;

    #[test]
    fn only_trusted_executables_run_with_the_event_in_their_environment() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("events.d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = d.path().join("out");
        let hook = dir.join("10-record");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$VPOOL_EVENT $VPOOL_SEVERITY $VPOOL_MEMBER $VPOOL_POOL\" >> {}\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Not executable; group-writable; hidden: none of them runs.
        for (name, mode) in [
            ("20-noexec", 0o644),
            ("30-open", 0o775),
            (".40-hidden", 0o755),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\necho {name} >> {}\n", out.display())).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        assert_eq!(hooks_in(&dir), vec![hook.clone()]);
        let ctx = Context {
            pool: "p-1".into(),
            mountpoint: "/mnt".into(),
        };
        let ev = Event {
            seq: 4,
            time: 0,
            kind: "member_failed".into(),
            severity: Severity::Error,
            member: Some("/disk1".into()),
            message: "gone".into(),
        };
        run_all(&dir, &ctx, &ev);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "member_failed error /disk1 p-1\n"
        );
        let env = env_of(&ctx, &ev);
        assert!(env.contains(&("VPOOL_TIME".into(), "1970-01-01T00:00:00Z".into())));
        // A directory others may write to runs nothing.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(hooks_in(&dir).is_empty());
    }
}
