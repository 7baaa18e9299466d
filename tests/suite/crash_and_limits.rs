//! Crash consistency (kill -9 of the daemon), running out of space, placement
//! across members, `vpool status`, and every refusal of `create` and `mount`.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn write_file_synced(p: &Path, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap_or_else(|e| panic!("create {p:?}: {e}"));
    f.write_all_at(data, 0).unwrap();
    f.sync_all().unwrap();
}

/// Retries (create, truncate, write `data`, fsync) of `p` until it succeeds or
/// `limit` passes; returns the last error, `None` on success.
fn write_synced_within(p: &Path, data: &[u8], limit: Duration) -> Option<std::io::Error> {
    let mut last_err = None;
    wait_until(limit, || {
        let r = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .and_then(|f| f.write_all_at(data, 0).and_then(|_| f.sync_all()));
        last_err = r.err();
        last_err.is_none()
    });
    last_err
}

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

// ---------------------------------------------------------------------------
// Crash
// ---------------------------------------------------------------------------

#[test]
fn kill9_after_fsync_keeps_synced_data() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let a = pattern(1, 5 * MIB as usize + 17);
    let b = pattern(2, 100_000);
    let patch = pattern(3, 300_000);
    let dpatch = pattern(6, 200_000);
    let mut a_final = a.clone();
    a_final[2 * MIB as usize..2 * MIB as usize + patch.len()].copy_from_slice(&patch);
    a_final[4 * MIB as usize..4 * MIB as usize + dpatch.len()].copy_from_slice(&dpatch);
    {
        let m = pool.mount();
        write_file_synced(&m.join("a"), &a);
        fs::create_dir(m.join("d")).unwrap();
        write_file_synced(&m.join("d/b"), &b);
        fsync_dir(&m.join("d"));
        fsync_dir(m.path());
        // Overwrite in place, then fsync.
        let f = OpenOptions::new().write(true).open(m.join("a")).unwrap();
        f.write_all_at(&patch, 2 * MIB).unwrap();
        f.sync_all().unwrap();
        // Overwrite of allocated data, then fdatasync (the data-only fast path).
        f.write_all_at(&dpatch, 4 * MIB).unwrap();
        f.sync_data().unwrap();
        drop(f);
        // Renamed and fsynced.
        write_file_synced(&m.join("tmpname"), b"renamed");
        fs::rename(m.join("tmpname"), m.join("final")).unwrap();
        fsync_dir(m.path());
        // Unsynced tail: may or may not survive, but must not break anything.
        fs::write(m.join("unsynced"), pattern(4, 2 * MIB as usize)).unwrap();
        m.kill9();
    }
    pool.assert_check_clean();

    let m = pool.mount();
    assert_same(
        &read_all(&m.join("a")),
        &a_final,
        "fsynced file after kill -9",
    );
    assert_same(
        &read_all(&m.join("d/b")),
        &b,
        "fsynced file in subdir after kill -9",
    );
    assert_eq!(
        read_all(&m.join("final")),
        b"renamed",
        "fsynced rename after kill -9"
    );
    assert!(
        !m.join("tmpname").exists(),
        "old name of fsynced rename reappeared"
    );
    if m.join("unsynced").exists() {
        let _ = read_all(&m.join("unsynced")); // readable, whatever it holds
    }
    // The pool is fully usable afterwards.
    write_file_synced(&m.join("after"), &pattern(5, MIB as usize));
    // Crash again, and `vpool status` on the dead pool reports it unmounted.
    m.kill9();
    let st = status_json(&pool.members[0]);
    assert_eq!(
        st["mounted"],
        serde_json::json!(false),
        "status after crash: {st}"
    );
    assert!(st["pid"].is_null(), "status after crash: {st}");
    pool.assert_check_clean();
}

#[test]
fn kill9_during_heavy_writes_stays_consistent() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let m = pool.mount();
    let keep = pattern(10, 3 * MIB as usize + 5);
    write_file_synced(&m.join("keep"), &keep);
    fsync_dir(m.path());

    let stop = Arc::new(AtomicBool::new(false));
    let chunks = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, chunks) = (stop.clone(), chunks.clone());
        // Paths go through /proc/self/fd/N of a descriptor on the mount, so
        // once the dead mount is lazily detached the writer gets errors
        // instead of silently writing into the bare mountpoint directory.
        let dir_fd = File::open(m.path()).unwrap();
        thread::spawn(move || -> Option<io::Error> {
            use std::os::unix::io::AsRawFd;
            let dir = PathBuf::from(format!("/proc/self/fd/{}", dir_fd.as_raw_fd()));
            let chunk = pattern(11, 256 * KIB as usize);
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
                let name = dir.join(format!("stream{}", n % 4));
                let f = match OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&name)
                {
                    Ok(f) => f,
                    Err(e) => return Some(e),
                };
                for i in 0..16u64 {
                    if let Err(e) = f.write_all_at(&chunk, (n * 7 + i) % 64 * 256 * KIB) {
                        return Some(e);
                    }
                }
                if n.is_multiple_of(3)
                    && let Err(e) = f.sync_data()
                {
                    return Some(e);
                }
                if n.is_multiple_of(5) {
                    let _ = fs::rename(&name, dir.join(format!("renamed{}", n % 3)));
                }
                n += 1;
                chunks.store(n, Ordering::SeqCst);
            }
            None
        })
    };
    // Let it run a bit (at least a few rounds), then crash the daemon mid-stream.
    wait_until(Duration::from_secs(20), || {
        chunks.load(Ordering::SeqCst) >= 8
    });
    thread::sleep(Duration::from_millis(300));
    m.kill9();
    stop.store(true, Ordering::SeqCst);
    let err = writer.join().expect("writer thread panicked");
    eprintln!(
        "writer completed {} rounds; ended with {:?}",
        chunks.load(Ordering::SeqCst),
        err
    );

    pool.assert_check_clean();
    let m = pool.mount();
    assert_same(
        &read_all(&m.join("keep")),
        &keep,
        "fsynced file after crash under load",
    );
    // Every surviving file is fully readable (no EIO / dangling extents).
    for e in fs::read_dir(m.path()).unwrap() {
        let p = e.unwrap().path();
        fs::read(&p).unwrap_or_else(|e| panic!("{p:?} unreadable after crash: {e}"));
    }
    m.unmount();
    pool.assert_check_clean();
}

// ---------------------------------------------------------------------------
// Space
// ---------------------------------------------------------------------------

#[test]
fn enospc_on_full_pool_and_recovery() {
    let a = Tmpfs::new("24M");
    let b = Tmpfs::new("24M");
    let pool = Pool::from_dirs(vec![a.path.clone(), b.path.clone()]);
    pool.create_ok(&["--extent-size", "1M"]);
    let m = pool.mount();

    let keep = pattern(20, 4 * MIB as usize);
    write_file_synced(&m.join("keep"), &keep);
    fsync_dir(m.path());

    let chunk = pattern(21, MIB as usize);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.join("fill"))
        .unwrap();
    let mut written = 0u64;
    let err = loop {
        if let Err(e) = f.write_all_at(&chunk, written) {
            break e;
        }
        if let Err(e) = f.sync_data() {
            break e;
        }
        written += MIB;
        assert!(
            written <= 200 * MIB,
            "wrote 200 MiB into a pool of two 24 MiB members without ENOSPC"
        );
    };
    assert_eq!(
        errno(&err),
        libc::ENOSPC,
        "filling the pool failed with {err} (errno {:?}) instead of ENOSPC after {written} bytes",
        err.raw_os_error()
    );
    assert!(
        written >= 28 * MIB,
        "only {written} bytes fit before ENOSPC in a pool of two 24 MiB members (+4 MiB already \
         used): the second member is not being used"
    );

    // Everything written before is intact; the fs still works.
    assert_same(
        &read_all(&m.join("keep")),
        &keep,
        "fsynced file after ENOSPC",
    );
    for i in 0..written / MIB {
        let mut buf = vec![0u8; MIB as usize];
        f.read_exact_at(&mut buf, i * MIB).unwrap();
        assert_same(&buf, &chunk, &format!("fill chunk {i} after ENOSPC"));
    }
    drop(f);
    assert!(fs::read_dir(m.path()).unwrap().count() >= 2);
    let st = statvfs(m.path());
    assert!(st.f_blocks > 0);

    // Freeing space makes writes succeed again.
    fs::remove_file(m.join("fill")).unwrap();
    let again = pattern(22, 8 * MIB as usize);
    let last_err = write_synced_within(&m.join("again"), &again, Duration::from_secs(15));
    assert!(
        last_err.is_none(),
        "writing 8 MiB still fails 15 s after deleting the file that filled the pool: {last_err:?}"
    );
    assert_same(&read_all(&m.join("again")), &again, "write after recovery");
    m.unmount();
    pool.assert_check_clean();
}

/// Filling the pool with many small fsynced files grows the metadata on the
/// members as well; running out of space there must also surface as ENOSPC
/// and must not wedge the metadata store (deleting files frees space again,
/// and unmount still flushes).
#[test]
fn enospc_with_many_small_files_then_recovery() {
    let pool = Pool::new_on_tmpfs(2, "16M", &["--extent-size", "1M"]);
    let m = pool.mount();
    let body = pattern(25, 20 * KIB as usize);
    let mut n = 0usize;
    // The file whose write/fsync failed stays open (with whatever dirty pages
    // the kernel still holds) through the recovery phase, as an application
    // that does not clean up would leave it.
    let (err, _failed_file) = loop {
        let p = m.join(format!("f{n:05}"));
        let f = match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => f,
            Err(e) => break (e, None),
        };
        match f.write_all_at(&body, 0).and_then(|_| f.sync_all()) {
            Ok(()) => n += 1,
            Err(e) => break (e, Some(f)),
        }
        assert!(n < 20_000, "20000 x 20 KiB files fit in two 16 MiB members");
    };
    assert_eq!(
        errno(&err),
        libc::ENOSPC,
        "filling with small files failed with {err} instead of ENOSPC after {n} files"
    );
    for i in (0..n).step_by(2) {
        fs::remove_file(m.join(format!("f{i:05}"))).unwrap();
    }
    let big = pattern(26, 2 * MIB as usize);
    let last_err = write_synced_within(&m.join("again"), &big, Duration::from_secs(15));
    assert!(
        last_err.is_none(),
        "writing 2 MiB still fails 15 s after deleting half of {n} files: {last_err:?}"
    );
    drop(_failed_file);
    m.unmount();
    pool.assert_check_clean();
    let m = pool.mount();
    for i in (1..n).step_by(2).take(50) {
        assert_same(
            &read_all(&m.join(format!("f{i:05}"))),
            &body,
            &format!("kept file f{i:05} after remount"),
        );
    }
    assert!(
        !m.join("f00000").exists(),
        "deleted file is back after remount"
    );
    assert_same(
        &read_all(&m.join("again")),
        &big,
        "file written after recovery",
    );
}

#[test]
fn full_member_spills_to_the_other() {
    // Member A's filesystem is almost full of someone else's data.
    let a = Tmpfs::new("24M");
    let b = Tmpfs::new("24M");
    fs::write(a.path.join("junk"), vec![0x55u8; 20 * MIB as usize]).unwrap();
    let ma = a.path.join("member");
    let mb = b.path.join("member");
    fs::create_dir(&ma).unwrap();
    fs::create_dir(&mb).unwrap();
    let pool = Pool::from_dirs(vec![ma.clone(), mb.clone()]);
    pool.create_ok(&["--extent-size", "1M"]);
    let m = pool.mount();

    let st = m.status();
    let members = st["members"].as_array().expect("members array");
    assert_eq!(members.len(), 2, "status: {st}");

    let data = pattern(30, 16 * MIB as usize);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.join("big"))
        .unwrap();
    for (i, c) in data.chunks(MIB as usize).enumerate() {
        f.write_all_at(c, i as u64 * MIB).unwrap_or_else(|e| {
            panic!("write of MiB {i} failed ({e}) although member B has ~20 MiB free")
        });
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync failed ({e}) although member B has ~20 MiB free"));
    drop(f);
    assert_same(
        &read_all(&m.join("big")),
        &data,
        "16 MiB file spanning a nearly full member",
    );
    let on_b = du_bytes(&mb.join("data"));
    assert!(
        on_b >= 12 * MIB,
        "member B holds only {on_b} bytes of the 16 MiB file"
    );
    m.unmount();
    pool.assert_check_clean();
    let m = pool.mount();
    assert_same(&read_all(&m.join("big")), &data, "after remount");
}

#[test]
fn copies_two_stores_every_extent_on_both_members() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let m = pool.mount();
    let data = pattern(40, 6 * MIB as usize + 3);
    write_file_synced(&m.join("f"), &data);
    let st = m.status();
    assert_eq!(st["copies"].as_u64(), Some(2), "status: {st}");
    let logical = st["logical_bytes"].as_u64().expect("logical_bytes");
    let stored = st["stored_bytes"].as_u64().expect("stored_bytes");
    assert!(
        logical >= data.len() as u64,
        "logical_bytes {logical} < {} written",
        data.len()
    );
    assert!(
        stored >= 2 * data.len() as u64 * 9 / 10,
        "stored_bytes {stored} with copies=2 for {} bytes",
        data.len()
    );
    m.unmount();
    for mem in &pool.members {
        let d = du_bytes(&mem.join("data"));
        assert!(
            d >= 6 * MIB,
            "member {mem:?} holds {d} bytes; with copies=2 each should hold all 6 MiB"
        );
    }
    pool.assert_check_clean();
}

// ---------------------------------------------------------------------------
// status and check
// ---------------------------------------------------------------------------

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap()
}

#[test]
fn status_json_fields() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let m = pool.mount();
    write_file_synced(&m.join("x"), &pattern(50, MIB as usize));
    write_file_synced(&m.join("y"), &pattern(51, MIB as usize));
    let st = m.status();
    let uuid = st["pool"]
        .as_str()
        .unwrap_or_else(|| panic!("pool uuid missing: {st}"));
    assert_eq!(uuid.len(), 36, "pool uuid {uuid:?}");
    assert_eq!(st["state"], "ONLINE", "{st}");
    assert_eq!(st["mounted"], true, "{st}");
    assert_eq!(
        st["mountpoint"].as_str().map(PathBuf::from),
        Some(m.path().to_path_buf()),
        "{st}"
    );
    let pid = st["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("pid missing: {st}"));
    assert!(
        pid_alive(pid as i32),
        "status pid {pid} is not a live process"
    );
    assert_eq!(st["copies"].as_u64(), Some(1));
    assert_eq!(st["extent_size"].as_u64(), Some(MIB));
    assert!(st["block_size"].as_u64().unwrap_or(0) > 0, "{st}");
    let members = st["members"].as_array().unwrap();
    assert_eq!(members.len(), 2);
    let mut paths: Vec<PathBuf> = members
        .iter()
        .map(|x| PathBuf::from(x["path"].as_str().unwrap()))
        .collect();
    paths.sort();
    let mut want: Vec<PathBuf> = pool.members.iter().map(|p| canon(p)).collect();
    want.sort();
    assert_eq!(paths, want, "member paths");
    for mem in members {
        assert_eq!(mem["health"], "ONLINE", "{mem}");
        assert_eq!(mem["id"].as_str().map(str::len), Some(36), "{mem}");
        assert!(mem["size"].as_u64().unwrap() > 0);
        for k in ["used", "free", "stored_bytes"] {
            assert!(mem[k].is_u64(), "member field {k} missing: {mem}");
        }
    }
    for k in [
        "size",
        "used",
        "free",
        "files",
        "logical_bytes",
        "stored_bytes",
    ] {
        assert!(st[k].is_u64(), "field {k} missing or not a number: {st}");
    }
    assert!(st["files"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["logical_bytes"].as_u64().unwrap() >= 2 * MIB, "{st}");
    assert!(
        st["stored_bytes"].as_u64().unwrap() >= 2 * MIB * 9 / 10,
        "{st}"
    );

    // Same pool seen through a member directory.
    let via_member = status_json(&pool.members[1]);
    assert_eq!(via_member["pool"], st["pool"]);
    assert_eq!(via_member["mounted"], true);

    // Human-readable status works too.
    let o = vpool_ok(&args!["status", m.path()]);
    assert!(
        text(&o).contains(uuid) || text(&o).to_uppercase().contains("ONLINE"),
        "{}",
        describe(&o)
    );

    m.unmount();
    let st = status_json(&pool.members[0]);
    assert_eq!(st["mounted"], false, "{st}");
    assert!(st["pid"].is_null(), "{st}");
    assert!(st["mountpoint"].is_null(), "{st}");
    assert_eq!(st["pool"].as_str(), Some(uuid));
}

#[test]
fn check_detects_missing_extent_file() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let m = pool.mount();
    write_file_synced(&m.join("f"), &pattern(60, 4 * MIB as usize));
    m.unmount();
    pool.assert_check_clean();
    // Remove one extent file (any regular file under a member's data/).
    fn first_file(dir: &Path) -> Option<PathBuf> {
        for e in fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            let ft = e.file_type().ok()?;
            if ft.is_file() {
                return Some(p);
            }
            if ft.is_dir()
                && let Some(f) = first_file(&p)
            {
                return Some(f);
            }
        }
        None
    }
    let victim = pool
        .members
        .iter()
        .find_map(|mem| first_file(&mem.join("data")))
        .expect("no extent file found under any member's data/");
    fs::remove_file(&victim).unwrap();
    let o = pool.check();
    assert!(
        !o.status.success(),
        "vpool check exits 0 although extent file {victim:?} was deleted\n{}",
        describe(&o)
    );
    assert!(
        !text(&o).trim().is_empty(),
        "vpool check failed without printing the problem"
    );
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn create_refusals() {
    let p = Pool::dirs(3);
    let (m0, m1, m2) = (&p.members[0], &p.members[1], &p.members[2]);
    let missing = p.dir.path().join("does-not-exist");

    let o = vpool(&args!["create", m0, &missing]);
    assert_refused(&o, &["does not exist"], "create with a missing directory");

    let o = vpool(&args!["create", m0, m0]);
    assert_refused(&o, &["twice"], "create with the same directory twice");
    let o = vpool(&args!["create", m0, format!("{}/.", m0.display())]);
    assert_refused(
        &o,
        &["twice"],
        "create with the same directory twice (spelled differently)",
    );

    let sub = m1.join("sub");
    fs::create_dir(&sub).unwrap();
    let o = vpool(&args!["create", m1, &sub]);
    assert_refused(
        &o,
        &["inside"],
        "create with a directory inside another member",
    );
    let o = vpool(&args!["create", &sub, m1]);
    assert_refused(
        &o,
        &["inside"],
        "create with a member inside a later member",
    );
    fs::remove_dir(&sub).unwrap();

    let o = vpool(&args!["create", "--copies", "3", m0, m1]);
    assert_refused(&o, &["copies"], "create with more copies than members");

    // None of the refusals left anything behind.
    for m in [m0, m1] {
        let left: Vec<_> = fs::read_dir(m)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.is_empty(),
            "refused create left files in {m:?}: {left:?}"
        );
    }
    vpool_ok(&args!["create", m0, m1]);

    let o = vpool(&args!["create", m1, m2]);
    assert_refused(
        &o,
        &["already belongs to pool"],
        "create with a directory of an existing pool",
    );
    // m2 is still free.
    let left: Vec<_> = fs::read_dir(m2).unwrap().collect();
    assert!(left.is_empty(), "refused create left files in {m2:?}");
    p.assert_check_clean();
}

#[test]
fn create_refuses_dir_inside_existing_pool_member() {
    let p = Pool::new(2, &[]);
    let other = p.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    for nested in [
        p.members[0].join("nested"),
        p.members[0].join("data").join("nested"),
    ] {
        fs::create_dir_all(&nested).unwrap();
        let o = vpool(&args!["create", &nested, &other]);
        assert_refused(
            &o,
            &["inside", "already belongs"],
            &format!("create with {nested:?}, inside a member of an existing pool"),
        );
        fs::remove_dir(&nested).unwrap();
        let left: Vec<_> = fs::read_dir(&other).unwrap().collect();
        assert!(left.is_empty(), "refused create left files in {other:?}");
    }
    p.assert_check_clean();
}

#[test]
fn mount_refusals() {
    let pool = Pool::new(2, &[]);
    let m0 = pool.members[0].clone();
    let base = pool.dir.path().to_path_buf();

    // Mountpoint missing.
    let nomnt = base.join("no-such-mountpoint");
    let o = vpool(&args!["mount", &m0, &nomnt]);
    assert_refused(&o, &["does not exist"], "mount on a missing mountpoint");

    // Mountpoint not empty.
    let full = base.join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("something"), b"x").unwrap();
    let o = vpool(&args!["mount", &m0, &full]);
    assert_refused(
        &o,
        &["not empty", "busy"],
        "mount on a non-empty mountpoint",
    );
    assert!(!is_mounted(&full));

    // Mountpoint already a mount.
    let t = Tmpfs::new("1M");
    let o = vpool(&args!["mount", &m0, &t.path]);
    assert_refused(
        &o,
        &["busy"],
        "mount on a mountpoint that is already a mount",
    );

    // Not a member.
    let plain = base.join("plain");
    fs::create_dir(&plain).unwrap();
    let o = vpool(&args!["mount", &plain, pool.mnt()]);
    assert_refused(
        &o,
        &["not a vpool member"],
        "mount of an empty non-member directory",
    );
    fs::write(plain.join("file"), b"x").unwrap();
    let o = vpool(&args!["mount", &plain, pool.mnt()]);
    assert_refused(
        &o,
        &["not a vpool member"],
        "mount of a non-member directory with files",
    );
    assert!(!is_mounted(&pool.mnt()));

    // Pool already mounted (via either member).
    let m = pool.mount();
    let other = base.join("other");
    fs::create_dir(&other).unwrap();
    for member in &pool.members {
        let o = vpool(&args!["mount", member, &other]);
        assert_refused(&o, &["already mounted"], "mount of an already-mounted pool");
        assert!(!is_mounted(&other));
    }
    // The original mount is unaffected.
    fs::write(m.join("still-works"), b"ok").unwrap();
    m.unmount();

    // A member missing: the pool mounts DEGRADED (tests/suite/integrity.rs covers
    // what then works); a member of another pool in its place is refused.
    let moved = base.join("m1.moved");
    fs::rename(&pool.members[1], &moved).unwrap();
    let other_pool = Pool::new(1, &[]);
    fs::rename(&other_pool.members[0], &pool.members[1]).unwrap();
    let o = vpool(&args!["mount", &m0, pool.mnt()]);
    assert_refused(
        &o,
        &["another pool"],
        "mount with a foreign member in place of one",
    );
    assert!(!is_mounted(&pool.mnt()));
    fs::rename(&pool.members[1], &other_pool.members[0]).unwrap();
    let m = pool.mount();
    assert_eq!(m.status()["state"], "DEGRADED");
    m.unmount();
    fs::rename(&moved, &pool.members[1]).unwrap();

    // And with everything back it mounts and the data is there.
    let m = pool.mount();
    assert_eq!(fs::read(m.join("still-works")).unwrap(), b"ok");
    m.unmount();
    pool.assert_check_clean();
}

/// Kills a foreground `vpool mount` child and detaches its mount on drop.
struct Foreground {
    child: std::process::Child,
    mnt: PathBuf,
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run_t(30, "fusermount3", &args!["-u", "-z", &self.mnt]);
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn unmount_and_foreground_mount() {
    // `mount --foreground` keeps the daemon in the foreground; `vpool unmount`
    // from elsewhere makes it exit 0.
    let pool = Pool::new(2, &[]);
    let mnt = pool.mnt().canonicalize().unwrap();
    let log = tempfile::tempfile().unwrap();
    let child = std::process::Command::new("timeout")
        .args(["-k", "10", "120"])
        .arg(VPOOL)
        .arg("mount")
        .arg("--foreground")
        .arg(&pool.members[0])
        .arg(&mnt)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log.try_clone().unwrap())
        .spawn()
        .unwrap();
    let mut fg = Foreground {
        child,
        mnt: mnt.clone(),
    };
    assert!(
        wait_until(Duration::from_secs(20), || is_mounted(&mnt)),
        "mount --foreground did not mount within 20 s"
    );
    fs::write(mnt.join("f"), b"fg").unwrap();
    let o = vpool(&args!["unmount", &mnt]);
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(fg.child.try_wait(), Ok(Some(_)))
    });
    assert!(
        exited,
        "foreground daemon still running 30 s after vpool unmount\n{}",
        describe(&o)
    );
    assert!(o.status.success(), "vpool unmount failed\n{}", describe(&o));
    let status = fg.child.wait().unwrap();
    assert!(
        status.success(),
        "foreground vpool mount exited with {status:?} after unmount"
    );
    assert!(!is_mounted(&mnt));
    drop(fg);
    pool.assert_check_clean();
    let m = pool.mount();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"fg");
}

/// Changed-block tracking must never miss a write, even one that reached the
/// member disks while the daemon was killed before its next commit: the
/// write-intent log makes the next incremental snapshot see it (it may only
/// over-report).
#[test]
fn kill9_after_writes_next_incremental_snapshot_misses_nothing() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let base = pattern(21, 8 * MIB as usize);
    let mut live = base.clone();
    {
        let m = pool.mount();
        write_file_synced(&m.join("img"), &base);
        fsync_dir(m.path());
        vpool_ok(&[
            "snapshot",
            "create",
            "--kind",
            "full",
            "--wait",
            m.path().to_str().unwrap(),
            "s1",
        ]);
        // Scattered 4 KiB overwrites made durable with fdatasync only (the
        // data-only path: no metadata commit follows them).
        let f = OpenOptions::new().write(true).open(m.join("img")).unwrap();
        for i in 0..40u64 {
            let off = (i * 7919 * 4096) % (8 * MIB - 4096);
            let off = off / 4096 * 4096;
            let data = pattern(100 + i, 4096);
            f.write_all_at(&data, off).unwrap();
            live[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
        f.sync_data().unwrap();
        drop(f);
        m.kill9();
    }
    pool.assert_check_clean();
    let m = pool.mount();
    assert_same(&read_all(&m.join("img")), &live, "live file after kill -9");
    vpool_ok(&[
        "snapshot",
        "create",
        "--kind",
        "incremental",
        "--wait",
        m.path().to_str().unwrap(),
        "s2",
    ]);
    assert_same(
        &read_all(&m.join(".snapshots/s2/img")),
        &live,
        "incremental snapshot after kill -9",
    );
    assert_same(
        &read_all(&m.join(".snapshots/s1/img")),
        &base,
        "full snapshot before the writes",
    );
    m.unmount();
    pool.assert_check_clean();
}
