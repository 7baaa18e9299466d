//! The CPU priority of a FUSE worker follows the request it serves: the
//! writeback of the mount's page cache (writes the kernel sends from its
//! cache, `FUSE_WRITE_CACHE`) is served at [`WRITEBACK_NICE`], every other
//! request at the thread's own priority (docs/perf, change 19).
//!
//! Why: the kernel keeps up to `max_background` (28 of 32 workers) such
//! writes in flight, and 28 runnable workers outweigh an application 28 to
//! 1 on the CPU; at nice 19 together they weigh less than one normal thread.
//! A buffered writer's longest write during a snapshot capture fell from
//! 36.9 to 28.2 ms (median of 16 and 20 rounds; the longest from 105 to 46),
//! and the capture (nice 10, `util::background_thread`) ends in half the
//! time.
//!
//! When: only where the daemon has its own share of the CPU, so that the
//! nice value orders its own threads and nothing else
//! ([`own_cpu_group`]): an application's `fsync` is served by the same
//! requests (the kernel sends them with pid 0 whoever asked), and beside
//! busy processes of the same group writeback at nice 19 made a 1 GiB
//! `fsync` take 8-10 s instead of 1.3. And only where a lowered thread can
//! come back ([`can_restore`]: raising a nice value needs `CAP_SYS_NICE`
//! or `RLIMIT_NICE`), or a worker would serve applications at nice 19.
//!
//! The whole daemon's share ([`enable_group`], change 22): thread nice
//! values order threads only inside the daemon's group, and the group as a
//! whole weighs as much as an application's. When `syncfs` (a snapshot)
//! sends a gigabyte of writeback at once, the flusher and the daemon's
//! workers fill both CPUs of a small machine, and a buffered writer that was
//! runnable waited 32-34 ms for a CPU in profiled rounds (the bench's
//! longest writes during a snapshot, up to 99 ms, came at that `syncfs`).
//! So while the daemon serves writeback and no other
//! request came for [`OTHER_GAP_NS`], its autogroup's nice is raised to
//! [`WRITEBACK_GROUP_NICE`]; the next other request sets it back before it
//! is served. Only for an autogroup: a service's cgroup weight belongs to
//! whoever runs the service.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::util::{set_thread_nice, thread_nice};

/// The nice value of a worker while it serves the mount's writeback.
pub const WRITEBACK_NICE: i32 = 19;

/// The nice value of the daemon's autogroup while it serves only
/// writeback: a third of an application's weight (335 against 1024).
pub const WRITEBACK_GROUP_NICE: i32 = 5;

/// How long after one change the daemon may lower its share again: bounds
/// the changes to 50 a second under mixed requests (each one write to
/// `/proc`).
pub const QUIET_NS: u64 = 20_000_000;

/// How long after its last other request the daemon may lower its share:
/// the granularity of that request's time (`Group::last_other`). A
/// snapshot's `syncfs` opens the mount's root just before it sends its
/// writeback, and the writer is held from the first milliseconds.
pub const OTHER_GAP_NS: u64 = 1_000_000;

/// The kernel's file for the calling process's autogroup (`sched(7)`).
const AUTOGROUP: &str = "/proc/self/autogroup";

/// Nice value for writeback requests; 0 while disabled.
static NICE: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// This thread's own nice value while it is lowered for writeback.
    static LOWERED: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Serve writeback at `nice` (1 to 19; 0 leaves every request at the
/// thread's priority) if this daemon can ([`can_restore`] and
/// [`own_cpu_group`]); otherwise the reason it cannot.
pub fn enable(nice: i32) -> Result<(), String> {
    if nice <= 0 {
        NICE.store(0, Ordering::Relaxed);
        return Ok(());
    }
    if !can_restore() {
        return Err("a lowered thread could not regain its priority (no CAP_SYS_NICE)".into());
    }
    if !own_cpu_group() {
        return Err("the daemon shares its CPU scheduling group with other processes".into());
    }
    NICE.store(nice.min(19), Ordering::Relaxed);
    Ok(())
}

/// The calling worker is about to serve a request: writeback (`true`) or
/// anything else. Costs a system call only when the class changes.
pub fn serve(writeback: bool) {
    if let Some(g) = GROUP.get() {
        g.serve(writeback);
    }
    let nice = NICE.load(Ordering::Relaxed);
    if nice == 0 {
        return;
    }
    LOWERED.with(|l| match (writeback, l.get()) {
        (true, None) => {
            let own = thread_nice();
            if own < nice && set_thread_nice(nice) {
                l.set(Some(own));
            }
        }
        // If this fails the thread stays lowered; tried again next time.
        (false, Some(own)) if set_thread_nice(own) => l.set(None),
        _ => {}
    });
}

/// The daemon's autogroup, lowered while it serves only writeback.
static GROUP: OnceLock<Group> = OnceLock::new();

struct Group {
    /// Its nice value while lowered, and its own.
    nice: i32,
    own: i32,
    /// The clock of `last_other` and [`Share`].
    base: Instant,
    /// Whether it is lowered now (read without the lock).
    lowered: AtomicBool,
    /// When the last request other than writeback came (ns from `base`;
    /// updated at most once a millisecond, so that requests do not all
    /// write one cache line).
    last_other: AtomicU64,
    share: Mutex<Share>,
}

impl Group {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn serve(&self, writeback: bool) {
        let lowered = self.lowered.load(Ordering::Relaxed);
        if writeback {
            if lowered {
                return;
            }
            let now = self.now();
            if now.saturating_sub(self.last_other.load(Ordering::Relaxed)) < OTHER_GAP_NS {
                return;
            }
            let mut share = self.share.lock();
            if share.lower(now, self.last_other.load(Ordering::Relaxed))
                && set_autogroup_nice(self.nice)
            {
                share.changed(true, now);
                self.lowered.store(true, Ordering::Relaxed);
            }
        } else {
            let now = self.now();
            // A request that races a lowering may be served lowered; the
            // next one sets the share back.
            if lowered {
                let mut share = self.share.lock();
                self.last_other.store(now, Ordering::Relaxed);
                // If this fails the next request tries again.
                if share.lowered && set_autogroup_nice(self.own) {
                    share.changed(false, now);
                    self.lowered.store(false, Ordering::Relaxed);
                }
            } else if now.saturating_sub(self.last_other.load(Ordering::Relaxed)) >= OTHER_GAP_NS {
                self.last_other.store(now, Ordering::Relaxed);
            }
        }
    }
}

/// When the daemon's share is lowered: a pure function of request times
/// (ns), kept apart for tests.
#[derive(Debug, Default)]
struct Share {
    lowered: bool,
    last_change: Option<u64>,
}

impl Share {
    /// A writeback request at `now`, the last other request at
    /// `last_other`: lower the share now?
    fn lower(&self, now: u64, last_other: u64) -> bool {
        !self.lowered
            && now.saturating_sub(last_other) >= OTHER_GAP_NS
            && self
                .last_change
                .is_none_or(|t| now.saturating_sub(t) >= QUIET_NS)
    }

    fn changed(&mut self, lowered: bool, now: u64) {
        self.lowered = lowered;
        self.last_change = Some(now);
    }
}

/// The nice value in an autogroup file's text (`/autogroup-25 nice 0`).
pub fn autogroup_nice(text: &str) -> Option<i32> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == "nice")?;
    words.next()?.parse().ok()
}

fn set_autogroup_nice(nice: i32) -> bool {
    std::fs::write(AUTOGROUP, nice.to_string()).is_ok()
}

/// Lower the whole daemon's CPU share to autogroup nice `nice` (1 to 19;
/// 0 turns it off) while it serves only writeback, if it can: it leads its
/// own autogroup (in the root CPU cgroup, autogroups on, a session leader)
/// and can set that group's nice back. Otherwise the reason it cannot.
pub fn enable_group(nice: i32) -> Result<(), String> {
    if nice <= 0 {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        // Without CAP_SYS_ADMIN the kernel takes ten changes a second, so a
        // request could wait 100 ms at the lowered share.
        return Err(
            "an unprivileged daemon may change its autogroup only ten times a second".into(),
        );
    }
    if !own_autogroup() {
        return Err("the daemon does not lead an autogroup of its own".into());
    }
    let own = std::fs::read_to_string(AUTOGROUP)
        .ok()
        .as_deref()
        .and_then(autogroup_nice)
        .ok_or_else(|| format!("cannot read {AUTOGROUP}"))?;
    if own >= nice {
        return Err(format!("its autogroup is already at nice {own}"));
    }
    // Setting its own value back is what restoring takes (a negative one
    // needs CAP_SYS_NICE).
    if !set_autogroup_nice(own) {
        return Err(format!("cannot write {AUTOGROUP}"));
    }
    let g = Group {
        nice: nice.min(19),
        own,
        base: Instant::now(),
        lowered: AtomicBool::new(false),
        last_other: AtomicU64::new(0),
        share: Mutex::new(Share::default()),
    };
    GROUP
        .set(g)
        .map_err(|_| "already enabled in this process".to_string())
}

/// Can a thread of this process lower its priority and regain it? Tried
/// on a short-lived thread, so no thread of ours is left lowered.
pub fn can_restore() -> bool {
    std::thread::spawn(|| {
        let own = thread_nice();
        own < WRITEBACK_NICE && set_thread_nice(WRITEBACK_NICE) && set_thread_nice(own)
    })
    .join()
    .unwrap_or(false)
}

/// Does this process have a CPU share of its own? Either its CPU cgroup is
/// not the root one and holds no other process but its parent (a service's
/// cgroup; `vpool mount` waits there until the mount is up), or it
/// is in the root group with the kernel's autogroups on and leads its own
/// session (each session then gets one share, whatever its thread count).
pub fn own_cpu_group() -> bool {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    match cpu_cgroup(&cgroup) {
        Some(path) if path != "/" => {
            let procs = [
                "/sys/fs/cgroup",
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/cpu,cpuacct",
            ]
            .iter()
            .find_map(|root| std::fs::read_to_string(format!("{root}{path}/cgroup.procs")).ok());
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() } as u32;
            procs.is_some_and(|p| alone_in(&p, &[std::process::id(), parent]))
        }
        _ => own_autogroup(),
    }
}

/// Is this process in the root CPU cgroup with the kernel's autogroups on,
/// and does it lead its own session (and so its own autogroup)?
fn own_autogroup() -> bool {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if cpu_cgroup(&cgroup).is_some_and(|p| p != "/") {
        return false;
    }
    let autogroup = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .is_ok_and(|s| s.trim() == "1");
    // SAFETY: getsid and getpid take no pointers and cannot fail for the
    // calling process.
    let leader = unsafe { libc::getsid(0) == libc::getpid() };
    autogroup && leader
}

/// The path of the CPU controller's cgroup in `text` (`/proc/self/cgroup`):
/// the v1 line naming `cpu`, else the v2 line (`0::`) when the v2 cgroup
/// has the CPU controller (then a `cpu.weight` file exists).
pub fn cpu_cgroup(text: &str) -> Option<String> {
    let mut v2 = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if ctrl.split(',').any(|c| c == "cpu") {
            return Some(path.to_string());
        }
        if id == "0" && ctrl.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    v2.filter(|p| {
        p == "/" || std::path::Path::new(&format!("/sys/fs/cgroup{p}/cpu.weight")).exists()
    })
}

/// Are the processes listed in `procs` (a `cgroup.procs`) all in `ours`?
fn alone_in(procs: &str, ours: &[u32]) -> bool {
    procs
        .split_whitespace()
        .all(|id| id.parse().is_ok_and(|id: u32| ours.contains(&id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_cgroup_is_found_in_v1_and_v2_listings() {
        let v1 = "9:name=systemd:/\n3:cpuset:/\n2:cpu,cpuacct:/system.slice/vpool.service\n0::/\n";
        assert_eq!(
            cpu_cgroup(v1).as_deref(),
            Some("/system.slice/vpool.service")
        );
        assert_eq!(cpu_cgroup("1:cpu:/\n0::/\n").as_deref(), Some("/"));
        assert_eq!(cpu_cgroup("0::/\n").as_deref(), Some("/"));
        // A v2 cgroup without the CPU controller shares the root's.
        assert_eq!(cpu_cgroup("0::/no/such/group/here\n"), None);
        assert_eq!(cpu_cgroup("garbage\n\n"), None);
    }

    /// docs/design.md (the FUSE workers' row) states the share's numbers.
    #[test]
    fn the_design_states_the_share() {
        crate::util::assert_design_says(&[
            format!("no other request for {} ms", OTHER_GAP_NS / 1_000_000),
            format!("its whole autogroup is at nice {WRITEBACK_GROUP_NICE}"),
            format!("{} ms after its last change", QUIET_NS / 1_000_000),
        ]);
    }

    #[test]
    fn the_autogroup_nice_is_read_from_its_file() {
        assert_eq!(autogroup_nice("/autogroup-10158 nice 0\n"), Some(0));
        assert_eq!(autogroup_nice("/autogroup-7 nice -3\n"), Some(-3));
        assert_eq!(autogroup_nice("/autogroup-7 nice\n"), None);
        assert_eq!(autogroup_nice(""), None);
    }

    /// The share is lowered by writeback only a moment after another
    /// request and a quiet spell after its last change; restoring is up to
    /// the caller (at once).
    #[test]
    fn the_share_is_lowered_after_a_quiet_spell_only() {
        let (q, g) = (QUIET_NS, OTHER_GAP_NS);
        let mut s = Share::default();
        assert!(!s.lower(g - 1, 0), "another request came {}ns ago", g - 1);
        assert!(s.lower(g, 0), "nothing changed yet");
        s.changed(true, g);
        assert!(!s.lower(10 * q, 0), "already lowered");
        // Set back by a request at 2q: writeback right after waits.
        s.changed(false, 2 * q);
        assert!(!s.lower(2 * q + g, 2 * q), "changed {g}ns ago");
        assert!(
            !s.lower(3 * q + g - 1, 3 * q),
            "another request {}ns ago",
            g - 1
        );
        assert!(s.lower(3 * q + g, 3 * q));
    }

    #[test]
    fn a_cgroup_is_the_daemons_own_only_when_it_alone_is_in_it() {
        assert!(alone_in("412\n", &[412, 1]));
        assert!(
            alone_in("1\n412\n", &[412, 1]),
            "its parent may still be there"
        );
        assert!(!alone_in("412\n977\n", &[412, 1]));
        assert!(!alone_in("977\n", &[412, 1]));
        assert!(!alone_in("412\nx\n", &[412, 1]));
    }

    /// A thread lowered for writeback regains its own priority at its next
    /// request, and only that thread is ever lowered.
    #[test]
    fn a_worker_serves_writeback_lowered_and_the_rest_at_its_own_priority() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Unprivileged: a lowered thread cannot come back, so the
            // daemon must not lower any.
            assert!(!can_restore(), "raising a nice value needs privilege");
            return;
        }
        assert!(can_restore(), "root can regain a priority");
        let main = thread_nice();
        NICE.store(WRITEBACK_NICE, Ordering::Relaxed);
        let seen = std::thread::spawn(move || {
            let own = thread_nice();
            serve(false);
            let a = thread_nice();
            serve(true);
            let b = thread_nice();
            serve(true);
            let c = thread_nice();
            serve(false);
            let d = thread_nice();
            (own, a, b, c, d)
        })
        .join()
        .unwrap();
        NICE.store(0, Ordering::Relaxed);
        let (own, a, b, c, d) = seen;
        assert_eq!((a, b, c, d), (own, WRITEBACK_NICE, WRITEBACK_NICE, own));
        assert_eq!(thread_nice(), main, "other threads keep theirs");
    }
}
