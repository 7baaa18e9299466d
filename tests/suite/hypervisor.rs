//! What a hypervisor host relies on when the kernel caches attributes and the
//! daemon handles kill-priv (issue 11): set-id bits cleared on write, truncate
//! and `O_TRUNC` open by a caller without `CAP_FSETID` (and kept for root),
//! attributes right at once after changes through another name or
//! descriptor, O_DIRECT reads and writes of aligned and unaligned pieces, and
//! a sequential reader seeing direct writes made in the ranges the daemon
//! read ahead of it.
//! All on a real mount; needs root (FUSE, setpriv).

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use common::*;

fn pool() -> Pool {
    Pool::new(2, &["--extent-size", "1M"])
}

/// `sh -c SCRIPT` as uid/gid 65534, which must succeed.
fn nobody_sh(script: &str, what: &str) {
    let o = run_as_nobody("sh", &args!["-c", script]);
    assert_success(&o, what);
}

fn sh_quote(p: &std::path::Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn unprivileged_write_truncate_and_o_trunc_clear_set_id_bits() {
    let pool = pool();
    let m = pool.mount_opts(&["allow_other"]);
    let p = m.join("f");
    fs::write(&p, b"0123456789").unwrap();

    // Root (CAP_FSETID) keeps the bits on write, as on any filesystem.
    chmod(&p, 0o6777);
    write_at(&open_rw(&p), 0, b"R");
    assert_eq!(mode_of(&p), 0o6777, "a root write cleared set-id bits");

    // Another user's write clears set-user-ID, and set-group-ID with group
    // execute; the new mode shows at once (the kernel caches attributes).
    nobody_sh(
        &format!(
            "printf abcd | dd of={} conv=notrunc status=none",
            sh_quote(&p)
        ),
        "write as nobody",
    );
    assert_eq!(mode_of(&p), 0o777, "write by nobody: set-id bits stay");
    assert_eq!(&fs::read(&p).unwrap()[..6], b"abcd45", "written data");

    // O_DIRECT write too.
    chmod(&p, 0o4777);
    nobody_sh(
        &format!(
            "dd if=/dev/zero of={} bs=4096 count=1 oflag=direct conv=notrunc status=none",
            sh_quote(&p)
        ),
        "O_DIRECT write as nobody",
    );
    assert_eq!(mode_of(&p), 0o777, "O_DIRECT write by nobody: setuid stays");

    // Truncate.
    chmod(&p, 0o4777);
    nobody_sh(&format!("truncate -s 100 {}", sh_quote(&p)), "truncate");
    assert_eq!(mode_of(&p), 0o777, "truncate by nobody: setuid stays");
    assert_eq!(len_of(&p), 100);

    // Open with O_TRUNC.
    chmod(&p, 0o6777);
    nobody_sh(&format!(": > {}", sh_quote(&p)), "O_TRUNC open");
    assert_eq!(
        mode_of(&p),
        0o777,
        "O_TRUNC open by nobody: set-id bits stay"
    );
    assert_eq!(len_of(&p), 0);

    // Set-group-ID without group execute marks mandatory locking: a writer
    // of the file's group keeps it (set-user-ID still goes).
    let q = m.join("g");
    fs::write(&q, b"x").unwrap();
    chown(&q, None, Some(65534));
    chmod(&q, 0o6766);
    nobody_sh(
        &format!("printf y | dd of={} conv=notrunc status=none", sh_quote(&q)),
        "write as nobody to a file of its group",
    );
    assert_eq!(mode_of(&q), 0o2766, "sgid without group execute");

    // Root's truncate keeps the bits.
    chmod(&p, 0o6777);
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(10)
        .unwrap();
    assert_eq!(mode_of(&p), 0o6777, "a root truncate cleared set-id bits");

    // Durable: the cleared mode is what the pool holds.
    chmod(&p, 0o4777);
    nobody_sh(
        &format!("printf z | dd of={} conv=notrunc status=none", sh_quote(&p)),
        "write as nobody",
    );
    drop(m);
    let m = pool.mount();
    assert_eq!(mode_of(&m.join("f")), 0o777, "mode after remount");
    assert_eq!(mode_of(&m.join("g")), 0o2766, "mode after remount");
}

/// With attributes cached by the kernel, a change through one name or
/// descriptor shows at once through every other.
#[test]
fn cached_attributes_follow_changes_through_other_names() {
    let pool = pool();
    let m = pool.mount();
    let a = m.join("a");
    let b = m.join("b");
    fs::write(&a, b"").unwrap();
    fs::hard_link(&a, &b).unwrap();
    // Prime the kernel's caches of both names.
    assert_eq!(len_of(&a), 0);
    assert_eq!(len_of(&b), 0);
    let fa = open_rw(&a);

    // Buffered write through one name: size through the other, and fstat.
    write_at(&fa, 0, &pattern(1, 8192));
    assert_eq!(len_of(&b), 8192, "size through the other name");
    assert_eq!(fa.metadata().unwrap().len(), 8192, "fstat");

    // Truncate through the other name.
    OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert_eq!(
        len_of(&a),
        100,
        "size after truncate through the other name"
    );
    assert_eq!(fa.metadata().unwrap().len(), 100, "fstat after truncate");
    assert_eq!(read_all(&a), pattern(1, 100));

    // O_DIRECT write through the other name extends the file.
    {
        let fb = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&b)
            .unwrap();
        let mut buf = AlignedBuf::new(64 * 1024, 4096);
        buf.as_mut_slice().copy_from_slice(&pattern(2, 64 * 1024));
        fb.write_all_at(buf.as_slice(), MIB).unwrap();
    }
    assert_eq!(len_of(&a), MIB + 64 * 1024, "size after an O_DIRECT write");
    assert_eq!(read_at(&fa, MIB, 64 * 1024), pattern(2, 64 * 1024));

    // Mode and owner through the other name.
    chmod(&b, 0o600);
    assert_eq!(mode_of(&a), 0o600);
    chown(&b, Some(7), Some(8));
    assert_eq!(owner_of(&a), (7, 8));

    // The allocation right after fsync (du must count it).
    let before = stat_of(&a).blocks();
    write_at(&fa, 4 * MIB, &pattern(3, 2 * MIB as usize));
    fa.sync_all().unwrap();
    let after = stat_of(&b).blocks();
    assert!(
        after * 512 >= before * 512 + 2 * MIB,
        "st_blocks right after fsync: {before} -> {after}"
    );

    // A punched hole frees blocks at once.
    fallocate(
        &fa,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4 * MIB,
        2 * MIB,
    )
    .unwrap();
    let punched = stat_of(&b).blocks();
    assert!(
        punched * 512 + 2 * MIB <= after * 512 + 64 * 1024,
        "st_blocks after punching 2 MiB: {after} -> {punched}"
    );
    assert_eq!(len_of(&b), 6 * MIB);

    // Unlink through one name: nlink through the other.
    fs::remove_file(&a).unwrap();
    assert_eq!(nlink_of(&b), 1);
}

/// O_DIRECT reads and writes of aligned and unaligned pieces (in offset,
/// length and buffer address), across extent boundaries, against a model.
#[test]
fn o_direct_aligned_and_unaligned_pieces_read_back_exactly() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("img");
    let size = 3 * MIB as usize;
    let mut model = pattern(10, size);
    write_synced(&p, &model);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    // (offset, length, buffer misalignment)
    let pieces: &[(u64, usize, usize)] = &[
        (0, 4096, 0),
        (8192, 65536, 0),
        (MIB - 8192, 16384, 0),        // across an extent boundary
        (2 * MIB - 512, 1024, 0),      // sector aligned, not block aligned
        (1000, 3000, 0),               // unaligned offset and length
        (MIB - 100, 300, 0),           // unaligned across an extent boundary
        (12288, 4096, 1),              // aligned range, unaligned buffer
        (2 * MIB + 4095, 8194, 3),     // nothing aligned
        (size as u64 - 10, 10, 0),     // the last bytes
        (size as u64 - 4096, 4096, 0), // the last block
    ];
    for (i, &(off, len, mis)) in pieces.iter().enumerate() {
        let data = pattern(100 + i as u64, len);
        let mut buf = AlignedBuf::new(len + mis, 4096);
        buf.as_mut_slice()[mis..].copy_from_slice(&data);
        f.write_all_at(&buf.as_slice()[mis..], off)
            .unwrap_or_else(|e| panic!("O_DIRECT write of {len} at {off}+{mis}: {e}"));
        model[off as usize..off as usize + len].copy_from_slice(&data);
        // Read back this piece, and a wider unaligned window around it.
        let mut rb = AlignedBuf::new(len + mis, 4096);
        f.read_exact_at(&mut rb.as_mut_slice()[mis..], off)
            .unwrap_or_else(|e| panic!("O_DIRECT read of {len} at {off}+{mis}: {e}"));
        assert_same(
            &rb.as_slice()[mis..],
            &data,
            &format!("piece {i} read back"),
        );
        let lo = off.saturating_sub(777) as usize;
        let hi = (off as usize + len + 555).min(size);
        let mut wide = AlignedBuf::new(hi - lo, 4096);
        f.read_exact_at(wide.as_mut_slice(), lo as u64).unwrap();
        assert_same(
            wide.as_slice(),
            &model[lo..hi],
            &format!("around piece {i}"),
        );
    }
    // A read past the end is short.
    let mut tail = AlignedBuf::new(8192, 4096);
    let n = f.read_at(tail.as_mut_slice(), size as u64 - 4096).unwrap();
    assert_eq!(n, 4096, "read across the end of the file");
    f.sync_all().unwrap();
    drop(f);
    // Buffered readers and a fresh mount see the same bytes.
    assert_same(&read_all(&p), &model, "buffered read after O_DIRECT writes");
    drop(m);
    let m = pool.mount();
    let mut all = vec![0u8; size];
    File::open(m.join("img"))
        .unwrap()
        .read_exact_at(&mut all, 0)
        .unwrap();
    assert_same(&all, &model, "after remount");
    assert_eq!(fs::metadata(m.join("img")).unwrap().len(), size as u64);
}

/// The daemon's log lines of requests served (`VPOOL_LOG` at trace) from
/// byte `from` on: `(op, size)` of each read and write.
fn served_sizes((log, from): &(std::path::PathBuf, usize)) -> Vec<(String, u64)> {
    let text = fs::read(log).unwrap_or_else(|e| panic!("read {log:?}: {e}"));
    String::from_utf8_lossy(&text[*from..])
        .lines()
        .filter(|l| l.contains(": served"))
        .filter_map(|l| {
            let op = l.split("op=\"").nth(1)?.split('"').next()?.to_string();
            let size = l.split(" size=").nth(1)?.split(' ').next()?.parse().ok()?;
            (op == "read" || op == "write").then_some((op, size))
        })
        .collect()
}

/// A mount whose daemon logs every request, and where its log (which
/// earlier mounts of the pool wrote to as well) stood once it was up.
fn mount_traced(pool: &Pool, opts: &[&str]) -> (Mount, (std::path::PathBuf, usize)) {
    let m = Mount::try_new_wrapped(
        &["env", "VPOOL_LOG=vpool::fs::fuse=trace"],
        &pool.members[0],
        &pool.mnt(),
        opts,
    )
    .unwrap_or_else(|o| panic!("mount {opts:?}\n{}", describe(&o)));
    let log = status_log(&m.status());
    let len = fs::metadata(&log).map_or(0, |md| md.len() as usize);
    (m, (log, len))
}

/// The value of `knob` of the mount's writeback device
/// (`/sys/class/bdi/<dev>/knob`), `None` where this kernel has no such knob.
fn bdi_knob(mnt: &std::path::Path, knob: &str) -> Option<String> {
    let info = fs::read("/proc/self/mountinfo").unwrap();
    let dev = vpool::daemon::parse_mountinfo(&info, mnt)
        .unwrap_or_else(|| panic!("{mnt:?} not in mountinfo"))
        .dev;
    fs::read_to_string(format!("/sys/class/bdi/{dev}/{knob}"))
        .ok()
        .map(|v| v.trim().to_string())
}

fn bdi_readahead_kb(mnt: &std::path::Path) -> String {
    bdi_knob(mnt, "read_ahead_kb").unwrap_or_else(|| panic!("no read_ahead_kb for {mnt:?}"))
}

/// The mount's writers are throttled like a local disk's (docs/perf
/// change 18): no strict per-mount limit, and the mount may hold the
/// host's whole dirty budget, so that past the host's free-run line the
/// kernel paces them by their own writeback instead of cutting their rate
/// to a quarter for exceeding FUSE's 1 % share.
#[test]
fn the_mounts_writers_are_throttled_like_a_local_disks() {
    let pool = pool();
    let m = pool.mount();
    match bdi_knob(&m.path, "strict_limit") {
        Some(v) => assert_eq!(v, "0", "strict_limit"),
        None => eprintln!("SKIPPED strict_limit: this kernel has no such knob"),
    }
    assert_eq!(
        bdi_knob(&m.path, "max_ratio").as_deref(),
        Some("100"),
        "max_ratio"
    );
}

/// Reads and writes reach the daemon in requests as large as `max_request=`
/// (4 MiB by default, docs/perf change 11): the mount raises the host's
/// limit on a request's pages (never lowers it) and reads ahead two
/// requests; such requests span extents (1 MiB here) and come back
/// intact through `O_DIRECT` and through the mount's cache. With
/// `max_request=1M` the kernel's 1 MiB requests stay.
#[test]
fn reads_and_writes_reach_the_daemon_in_requests_of_max_request() {
    const LIMIT: &str = vpool::kernel::MAX_PAGES_LIMIT;
    let Ok(before) = fs::read_to_string(LIMIT) else {
        eprintln!("SKIPPED: this kernel has no {LIMIT} (requests stay at 1 MiB)");
        return;
    };
    let pool = pool();
    let want = vpool::kernel::pages(4 << 20, vpool::kernel::page_size());
    // A lower limit is raised by the mount; a higher one is left.
    fs::write(LIMIT, "256").unwrap();
    let (m, log) = mount_traced(&pool, &[]);
    assert_eq!(fs::read_to_string(LIMIT).unwrap().trim(), want.to_string());
    assert_eq!(bdi_readahead_kb(&m.path), "8192", "two 4 MiB requests");

    let data = pattern(11, 16 << 20);
    let p = m.join("img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let mut buf = AlignedBuf::new(4 << 20, 4096);
    // From 512 KiB on: every request spans five extents, none aligned to them.
    for (i, c) in data.chunks(4 << 20).enumerate() {
        buf.as_mut_slice().copy_from_slice(c);
        f.write_all_at(buf.as_slice(), (512 << 10) + (i as u64) * (4 << 20))
            .unwrap();
    }
    f.sync_all().unwrap();
    let mut got = Vec::new();
    for i in 0..4u64 {
        f.read_exact_at(buf.as_mut_slice(), (512 << 10) + i * (4 << 20))
            .unwrap();
        got.extend_from_slice(buf.as_slice());
    }
    assert_same(&got, &data, "O_DIRECT read of 4 MiB requests");
    drop(f);
    // Through the mount's cache: dropped first, then read in one stream.
    let f = File::open(&p).unwrap();
    // SAFETY: fadvise on an open descriptor; no memory is passed.
    assert_eq!(
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        },
        0
    );
    drop(f);
    let all = read_all(&p);
    assert_same(&all[512 << 10..], &data, "buffered read");
    assert!(all[..512 << 10].iter().all(|&b| b == 0), "the hole before");
    let sizes = served_sizes(&log);
    for op in ["read", "write"] {
        assert!(
            sizes.iter().any(|(o, s)| o == op && *s == 4 << 20),
            "no {op} of 4 MiB reached the daemon: {sizes:?}"
        );
    }
    m.unmount();

    // Higher already: left as it is. max_request=1M: 1 MiB requests.
    fs::write(LIMIT, (want * 2).to_string()).unwrap();
    let (m, log) = mount_traced(&pool, &["max_request=1M"]);
    assert_eq!(
        fs::read_to_string(LIMIT).unwrap().trim(),
        (want * 2).to_string()
    );
    assert_eq!(bdi_readahead_kb(&m.path), "4096", "four 1 MiB requests");
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.join("img"))
        .unwrap();
    f.read_exact_at(buf.as_mut_slice(), 512 << 10).unwrap();
    assert_same(
        buf.as_slice(),
        &data[..4 << 20],
        "O_DIRECT read, 1 MiB requests",
    );
    let sizes = served_sizes(&log);
    assert!(
        sizes.iter().any(|(o, _)| o == "read") && sizes.iter().all(|(_, s)| *s <= 1 << 20),
        "max_request=1M: {sizes:?}"
    );
    drop(f);
    m.unmount();
    fs::write(LIMIT, before.trim()).unwrap();
}

/// The highest nice value among the daemon's threads.
fn highest_nice(pid: i32) -> i32 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return i32::MIN;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("stat")).ok())
        // Field 19 (nice), counted from field 3, the first after the name.
        .filter_map(|st| stat_fields(&st)?.nth(16)?.parse().ok())
        .max()
        .unwrap_or(i32::MIN)
}

/// The daemon log's last line that contains `what`.
fn last_said(m: &Mount, what: &str) -> String {
    let log = fs::read_to_string(status_log(&m.status())).unwrap();
    log.lines()
        .rev()
        .find(|l| l.contains(what))
        .unwrap_or_default()
        .to_string()
}

/// The highest value of `probe`, sampled every 200 us while `work` runs,
/// and what `work` returned.
fn highest_during<T>(probe: impl Fn() -> i32 + Sync, work: impl FnOnce() -> T) -> (i32, T) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut hi = i32::MIN;
            while !done.load(Ordering::SeqCst) {
                hi = hi.max(probe());
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            hi
        });
        let out = work();
        done.store(true, Ordering::SeqCst);
        (sampler.join().unwrap(), out)
    })
}

/// The workers write the mount's page cache back at nice 19 where the
/// daemon has a CPU share of its own (docs/perf change 19): seen while an
/// fsync writes 64 MiB back; with `writeback_nice=0` no thread is lowered.
#[test]
fn the_mounts_writeback_is_served_at_the_lowest_cpu_priority() {
    let pool = pool();
    for (opts, want) in [(&[][..], 19), (&["writeback_nice=0"][..], 0)] {
        let m = pool.mount_opts(opts);
        let pid = m.pid.expect("daemon pid");
        let said = last_said(&m, "the mount's writeback is served at");
        if want == 19 && said.contains("normal CPU priority") {
            // Root without its own CPU share (autogroups off, a shared cgroup).
            eprintln!("SKIPPED the lowered half: {said}");
            m.unmount();
            continue;
        }
        assert_eq!(
            highest_nice(pid),
            0,
            "{opts:?}: nothing lowered before any writeback"
        );
        let f = File::create(m.join("w.img")).unwrap();
        f.write_all_at(&pattern(5, 64 << 20), 0).unwrap();
        let (seen, ()) = highest_during(|| highest_nice(pid), || f.sync_all().unwrap());
        let seen = seen.max(highest_nice(pid));
        assert_eq!(
            seen, want,
            "{opts:?}: highest nice while writing back ({said})"
        );
        drop(f);
        m.unmount();
    }
}

/// The nice value of a process's autogroup (`/proc/PID/autogroup`).
fn autogroup_nice(pid: i32) -> i32 {
    let text = fs::read_to_string(format!("/proc/{pid}/autogroup")).unwrap_or_default();
    vpool::fs::priority::autogroup_nice(&text).unwrap_or(i32::MIN)
}

/// Does `pid` share the root CPU cgroup with the kernel's autogroups on
/// (so that `vpool mount`'s daemon, a session leader, has its own)?
fn in_root_cpu_group_with_autogroups(pid: i32) -> bool {
    let on = fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .is_ok_and(|s| s.trim() == "1");
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    on && vpool::fs::priority::cpu_cgroup(&cgroup).is_none_or(|p| p == "/")
}

/// The daemon's whole CPU share, its autogroup, is lowered to nice 5 while
/// it serves only writeback, and set back by the next request of another
/// kind, before it is served (docs/perf change 22): seen while 64 MiB is
/// written and an fsync writes it back, and back at 0 once the fsync (its
/// `FSYNC` request) returns; with `writeback_group_nice=0` it stays at 0
/// throughout.
#[test]
fn the_daemons_share_is_lowered_while_it_serves_only_writeback() {
    let pool = pool();
    for (opts, want) in [(&[][..], 5), (&["writeback_group_nice=0"][..], 0)] {
        let m = pool.mount_opts(opts);
        let pid = m.pid.expect("daemon pid");
        let said = last_said(&m, "the daemon's CPU share");
        if want == 5 && !in_root_cpu_group_with_autogroups(pid) {
            // Autogroups off, or a CPU cgroup (a service's) instead.
            eprintln!("SKIPPED the lowered half: no autogroup of its own ({said})");
            m.unmount();
            continue;
        }
        assert_eq!(
            autogroup_nice(pid),
            0,
            "{opts:?}: whole before any writeback"
        );
        let f = File::create(m.join("w.img")).unwrap();
        let data = pattern(6, 64 << 20);
        // Sampled from the write on: beside busy neighbours the kernel may
        // write the pages back before the fsync asks it to.
        let (seen, after) = highest_during(
            || autogroup_nice(pid),
            || {
                f.write_all_at(&data, 0).unwrap();
                // Past the gap after the create (fs::priority::OTHER_GAP_NS).
                std::thread::sleep(std::time::Duration::from_millis(10));
                f.sync_all().unwrap();
                autogroup_nice(pid)
            },
        );
        assert_eq!(
            seen, want,
            "{opts:?}: the autogroup's highest nice while writing back ({said})"
        );
        assert_eq!(after, 0, "{opts:?}: set back by the fsync's own request");
        drop(f);
        m.unmount();
    }
}

/// A sequential reader through the page cache, which the daemon reads ahead
/// of (volume/ahead.rs), sees what `O_DIRECT` writes put in the ranges ahead
/// of it meanwhile: a range the daemon read before such a write is not
/// served after it.
#[test]
fn a_sequential_reader_sees_direct_writes_made_ahead_of_it() {
    use std::os::unix::io::AsRawFd;
    let pool = Pool::new(2, &["--extent-size", "4M"]);
    let m = pool.mount();
    let p = m.join("img");
    let size = 64 * MIB as usize;
    let mut want = pattern(1, size);
    fs::write(&p, &want).unwrap();
    let r = File::open(&p).unwrap();
    r.sync_all().unwrap();
    // SAFETY: posix_fadvise on a live descriptor with plain integers: the
    // mount's cached pages of the file go, so the reads reach the daemon.
    let rc = unsafe { libc::posix_fadvise(r.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
    let step = MIB as usize;
    let mut got = vec![0u8; size];
    // The first 16 MiB: the kernel and the daemon now hold ranges ahead.
    for off in (0..16 * step).step_by(step) {
        r.read_exact_at(&mut got[off..off + step], off as u64)
            .unwrap();
    }
    // New bytes from the first MiB the mount has not cached (the kernel's
    // readahead ends there, and the daemon's begins) over 32 MiB, past the
    // mount's cache: the kernel's stream goes on undisturbed into ranges
    // the daemon read before the write.
    let ahead = first_uncached(&r, 16 * step, step);
    {
        let w = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        let mut buf = AlignedBuf::new(step, 4096);
        for off in (ahead..ahead + 32 * step).step_by(step) {
            let new = pattern(2 + off as u64, step);
            buf.as_mut_slice().copy_from_slice(&new);
            w.write_all_at(buf.as_slice(), off as u64).unwrap();
            want[off..off + step].copy_from_slice(&new);
        }
    }
    for off in (16 * step..size).step_by(step) {
        r.read_exact_at(&mut got[off..off + step], off as u64)
            .unwrap();
    }
    assert_same(
        &got,
        &want,
        "the file read sequentially around direct writes",
    );
}

/// The first offset from `from`, in steps of `step`, whose page the mount's
/// cache does not hold (`mincore` of a shared mapping of `f`).
fn first_uncached(f: &File, from: usize, step: usize) -> usize {
    use std::os::unix::io::AsRawFd;
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared mapping of a live descriptor, unmapped
    // below; mincore writes one byte per page into `vec`, sized for it.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0, "mincore");
        libc::munmap(map, len);
        (from..len)
            .step_by(step)
            .find(|off| vec[off / 4096] & 1 == 0)
            .expect("the whole file is cached")
    }
}
