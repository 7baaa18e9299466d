//! Small helpers shared by the layers: durable file replacement, private
//! files and directories, size parsing.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file vpool creates in a member directory: member files hold
/// every user's data, whatever the modes users see through the mount.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory vpool creates in (or makes of) a member directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Options creating a file readable by its owner only ([`PRIVATE_FILE_MODE`]).
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Takes group and other permissions off `dir` (a member root): it holds
/// every user's data in files named by inode, whatever the modes seen through
/// the mount.
pub fn make_private(dir: &Path) -> io::Result<()> {
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

/// Whether `path` is on a FUSE filesystem (a vpool mount among them): a member
/// there could be the pool's own mount, and its daemon would wait on itself.
pub fn on_fuse(path: &Path) -> io::Result<bool> {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    Ok(fs_type(path)? == FUSE_SUPER_MAGIC)
}

/// The magic number (`statfs(2)`'s `f_type`) of the filesystem `path` is on.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statfs is plain old data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    Ok(st.f_type as i64)
}

/// Whether `b` is an ASCII control character (NUL, newline, escape, DEL, ...),
/// refused in every name that enters the pool.
pub fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Parses a size such as `4096`, `4K`, `64M`, `1GiB`, `2T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K/M/G/T suffix")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("invalid size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Formats bytes for humans (binary units, one decimal).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Nice value of background threads (snapshot capture): they yield the CPU
/// to the FUSE threads serving applications, and get all of it when idle.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`]. Threads it
/// spawns afterwards inherit it. Only a hint: failure is ignored.
pub fn background_thread() {
    set_thread_nice(BACKGROUND_NICE);
}

/// The calling thread's nice value.
pub fn thread_nice() -> i32 {
    // SAFETY: gettid has no preconditions; getpriority on our own thread
    // reads no memory of ours. (It cannot fail for our own thread, so -1 is
    // a nice value, not an error.)
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

/// Sets the calling thread's nice value (a thread's own, not its
/// process's: `PRIO_PROCESS` with a thread id); false if refused (raising
/// the priority needs `CAP_SYS_NICE`).
pub fn set_thread_nice(nice: i32) -> bool {
    // SAFETY: gettid has no preconditions; setpriority with PRIO_PROCESS and a
    // thread id changes only that thread, and reads no memory of ours.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) == 0 }
}

/// Puts the calling thread's disk I/O in the idle class: with a scheduler
/// that knows classes (mq-deadline, bfq) its requests wait while any of a
/// normal thread's are queued (mq-deadline still serves one that waited
/// 10 s). Threads it spawns afterwards inherit it. Only a hint: failure is
/// ignored.
pub fn idle_io_thread() {
    // IOPRIO_WHO_PROCESS = 1; class IDLE (3) in the bits above the 13-bit level.
    const IOPRIO_IDLE: libc::c_long = 3 << 13;
    // SAFETY: gettid has no preconditions; ioprio_set with IOPRIO_WHO_PROCESS
    // and our own thread id changes only this thread's I/O scheduling.
    unsafe {
        let tid = libc::gettid();
        libc::syscall(libc::SYS_ioprio_set, 1, tid as libc::c_long, IOPRIO_IDLE);
    }
}

/// Is process `pid` exiting: its thread-group leader a zombie? After
/// SIGKILL the leader turns zombie while the kernel may still be tearing
/// down its other threads, which share its descriptors and so its flocks;
/// it is reaped only after they have all gone. A pid that does not exist
/// (gone, or of another pid namespace) is not exiting.
pub fn process_exiting(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the ")" that closes comm.
        Ok(s) => s.rfind(')').is_some_and(|i| {
            let state = s[i + 1..].trim_start();
            state.starts_with('Z') || state.starts_with('X')
        }),
        Err(_) => false,
    }
}

/// Seconds and nanoseconds since the epoch, now.
pub fn now() -> (i64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix seconds.
pub fn utc_string(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let t = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// The progress sink of a long operation: called with (done, total) units;
/// returning `false` asks the operation to stop (it ends with
/// [`crate::error::FsError::Cancelled`], or a report saying so, leaving
/// everything done so far consistent and committed). Here, below every
/// layer that runs long work, so that none has to look up for it.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

/// Asserts that docs/design.md says each of `said`, word for word,
/// whatever its line breaks: the tests that pin the design's numbers.
#[cfg(test)]
pub(crate) fn assert_design_says(said: &[String]) {
    let design = include_str!("../docs/design.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for said in said {
        assert!(
            design.contains(said.as_str()),
            "docs/design.md does not say {said:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("12Q").is_err());
    }
}
