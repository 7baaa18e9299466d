//! How large the requests are that the kernel sends a mounted daemon, and
//! how far it reads ahead: the `max_request=` mount option, the host's
//! `fs.fuse.max_pages_limit` that bounds it, and the mount's readahead.
//!
//! The kernel splits a FUSE mount's reads (its readahead too) and writes
//! into requests of at most `max_pages` pages, which the daemon asks for at
//! INIT and the kernel caps at `fs.fuse.max_pages_limit` (Linux 6.13 and
//! later; a fixed 256 pages, 1 MiB, before). Each request is one member read
//! or write: at 1 MiB a cold sequential read of a volume image ran at
//! 0.41-0.85 of a plain file's speed, whose readahead reaches the disk in
//! 4 MiB requests; at 4 MiB, 0.67-1.03 (median 0.90) in the same hour
//! (docs/perf/README.md, change 11).

use std::path::Path;

/// `max_request=` when not given: 4 MiB, the largest request this
/// machine's disk takes whole (`max_sectors_kb`).
pub const DEFAULT_MAX_REQUEST: u32 = 4 << 20;
/// The smallest and largest `max_request=`: the kernel's own default, and
/// the request buffer of each FUSE worker (16 MiB in `fuser`).
pub const MIN_MAX_REQUEST: u32 = 1 << 20;
pub const MAX_MAX_REQUEST: u32 = 16 << 20;

/// The host-wide cap on the pages of a FUSE request.
pub const MAX_PAGES_LIMIT: &str = "/proc/sys/fs/fuse/max_pages_limit";

/// Parses `max_request=SIZE`: 1M to 16M, a whole number of MiB.
pub fn parse_max_request(v: &str) -> Result<u32, String> {
    let bad = || {
        format!(
            "max_request={v}: expected a size from 1M to 16M in whole MiB (the largest read or write the kernel sends at once)"
        )
    };
    let n = crate::util::parse_size(v).map_err(|_| bad())?;
    if !(MIN_MAX_REQUEST as u64..=MAX_MAX_REQUEST as u64).contains(&n) || n % (1 << 20) != 0 {
        return Err(bad());
    }
    Ok(n as u32)
}

/// The host's page size.
pub fn page_size() -> u32 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u32 } else { 4096 }
}

/// Pages of a request of `bytes` bytes.
pub fn pages(bytes: u32, page: u32) -> u32 {
    bytes.div_ceil(page)
}

/// The value to write to `fs.fuse.max_pages_limit` so that requests of
/// `want` pages are granted: `None` when `current` already allows them (the
/// limit is only ever raised, never lowered: other mounts may rely on it).
pub fn limit_to_set(current: u32, want: u32) -> Option<u32> {
    (current < want).then_some(want)
}

/// The request size the kernel will grant: what was asked for, capped by
/// the host's limit (`None`: a kernel without the sysctl, 256 pages).
pub fn granted(asked: u32, limit_pages: Option<u32>, page: u32) -> u32 {
    let limit = limit_pages.unwrap_or(256).max(1) as u64 * page as u64;
    (asked as u64).min(limit) as u32
}

/// The mount's readahead, in KiB, for requests of `request` bytes: two of
/// them in flight, and at least 4 MiB (with 1 MiB requests, four in flight
/// read a cold 4 GiB image at 756-783 MB/s, one at 459-589). Two 4 MiB
/// requests read as fast as four (docs/perf, change 11).
pub fn readahead_kb(request: u32) -> u32 {
    (2 * request).max(4 << 20) / 1024
}

/// Raises `fs.fuse.max_pages_limit` (at `path`) to allow requests of
/// `want` pages, if it is lower and this process may write it (root).
/// Returns the limit in force afterwards (`None`: the kernel has no such
/// sysctl, so its fixed limit of 256 pages holds). Logs what it changed or
/// why requests stay small.
pub fn raise_max_pages_limit(path: &Path, want: u32) -> Option<u32> {
    let current: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    let Some(new) = limit_to_set(current, want) else {
        return Some(current);
    };
    match std::fs::write(path, new.to_string()) {
        Ok(()) => {
            tracing::info!(
                from = current,
                to = new,
                "raised fs.fuse.max_pages_limit so that reads and writes reach the daemon in requests as large as max_request= (the limit is host-wide and only raised)"
            );
            Some(new)
        }
        Err(e) => {
            tracing::info!(
                limit = current,
                wanted = new,
                error = %e,
                "fs.fuse.max_pages_limit stays as it is: requests stay smaller than max_request= and sequential reads slower (as root: sysctl fs.fuse.max_pages_limit={new})"
            );
            Some(current)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures README and design section 2 give.
    #[test]
    fn documented_figures() {
        assert_eq!(DEFAULT_MAX_REQUEST, 4 << 20);
        assert_eq!((MIN_MAX_REQUEST, MAX_MAX_REQUEST), (1 << 20, 16 << 20));
        assert_eq!(readahead_kb(DEFAULT_MAX_REQUEST), 8192);
    }

    #[test]
    fn max_request_accepts_whole_mib_from_1_to_16() {
        assert_eq!(parse_max_request("4M"), Ok(4 << 20));
        assert_eq!(parse_max_request("1M"), Ok(1 << 20));
        assert_eq!(parse_max_request("16MiB"), Ok(16 << 20));
        assert_eq!(parse_max_request("2048K"), Ok(2 << 20));
        for bad in [
            "0",
            "512K",
            "17M",
            "1536K",
            "x",
            "",
            "4G",
            "99999999999999999999",
        ] {
            let e = parse_max_request(bad).unwrap_err();
            assert!(e.contains("max_request="), "{bad}: {e}");
        }
    }

    /// The host-wide limit is raised to what the mount needs, never lowered.
    #[test]
    fn the_page_limit_is_only_raised() {
        assert_eq!(limit_to_set(256, 1024), Some(1024));
        assert_eq!(limit_to_set(1024, 1024), None);
        assert_eq!(limit_to_set(4096, 1024), None);
        assert_eq!(pages(4 << 20, 4096), 1024);
        assert_eq!(pages(4 << 20, 65536), 64);
    }

    #[test]
    fn granted_size_and_readahead() {
        assert_eq!(granted(4 << 20, Some(1024), 4096), 4 << 20);
        assert_eq!(granted(4 << 20, Some(256), 4096), 1 << 20);
        assert_eq!(granted(4 << 20, None, 4096), 1 << 20);
        assert_eq!(granted(1 << 20, Some(65535), 4096), 1 << 20);
        assert_eq!(readahead_kb(4 << 20), 8192);
        assert_eq!(readahead_kb(1 << 20), 4096);
        assert_eq!(readahead_kb(16 << 20), 32768);
    }

    /// Against a file standing in for the sysctl: raised when lower, left
    /// when higher, and a missing or unreadable one reports no limit.
    #[test]
    fn raising_the_limit_writes_only_when_lower() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("max_pages_limit");
        std::fs::write(&p, "256\n").unwrap();
        assert_eq!(raise_max_pages_limit(&p, 1024), Some(1024));
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "1024");
        std::fs::write(&p, "4096\n").unwrap();
        assert_eq!(raise_max_pages_limit(&p, 1024), Some(4096));
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "4096");
        assert_eq!(raise_max_pages_limit(&d.path().join("none"), 1024), None);
        std::fs::write(&p, "junk").unwrap();
        assert_eq!(raise_max_pages_limit(&p, 1024), None);
    }
}
