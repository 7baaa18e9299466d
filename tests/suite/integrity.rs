//! Block checksums, self-heal, scrub and crash resynchronisation, on real
//! mounts: bytes flipped in member files behind the daemon's back must never
//! come back as data.

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

const BS: u64 = 4096;

/// Extent data files (not sum files) in a member, sorted by name.
fn extent_files(member: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(member.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "sum"))
        .collect();
    v.sort();
    v
}

/// Inverts one byte of `path` at `off`.
fn flip(path: &Path, off: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v["data"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no data.{key} in {v}"))
}

#[test]
fn copies2_flipped_blocks_read_correctly_and_scrub_repairs_every_one() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(1, 6 * MIB as usize);
    {
        let m = pool.mount();
        write_synced(&m.join("img"), &data);
        m.unmount();
    }
    // Different blocks on each member, in several extents: every block keeps
    // one good copy.
    let mut flipped = 0;
    for (mi, member) in pool.members.iter().enumerate() {
        for (fi, f) in extent_files(member).iter().enumerate() {
            if fi % 2 == mi {
                flip(f, (3 + mi as u64) * BS + 17);
                flip(f, 200 * BS + 1);
                flipped += 2;
            }
        }
    }
    assert!(flipped >= 6, "too few extents to damage: {flipped}");
    let m = pool.mount();
    // Reads are correct although first copies are damaged (they are repaired
    // on the way).
    assert_same(
        &read_all(&m.join("img")),
        &data,
        "reads over flipped copies",
    );
    let st = m.status();
    let found = st["integrity"]["checksum_errors"].as_u64().unwrap();
    let repaired = st["integrity"]["repaired"].as_u64().unwrap();
    assert!(found >= 1 && repaired >= 1, "status counts nothing: {st}");
    assert_eq!(st["integrity"]["unrecoverable"], 0, "{st}");
    // Scrub finds and repairs the flipped blocks the reads did not (those on
    // second copies), then a second scrub is clean.
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "scrub reported problems: {v}");
    // (A block read by two requests at once may be counted twice.)
    assert!(
        n(&v, "checksum_errors") + found >= flipped,
        "every flipped block found (by a read or by scrub): {v}"
    );
    assert_eq!(n(&v, "repaired") + repaired, flipped, "{v}");
    assert_eq!(n(&v, "unrecoverable"), 0, "{v}");
    let (ok, v) = scrub_json(m.path());
    assert!(ok && n(&v, "checksum_errors") == 0, "second scrub: {v}");
    m.unmount();
    pool.assert_check_clean();
    // The repairs reached the member files: both copies are identical now.
    let (a, b) = (
        extent_files(&pool.members[0]),
        extent_files(&pool.members[1]),
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(fs::read(x).unwrap(), fs::read(y).unwrap(), "{x:?} vs {y:?}");
    }
}

#[test]
fn copies1_flipped_block_gives_eio_never_wrong_data() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let data = pattern(2, 3 * MIB as usize);
    {
        let m = pool.mount();
        write_synced(&m.join("img"), &data);
        m.unmount();
    }
    let files: Vec<PathBuf> = pool.members.iter().flat_map(|m| extent_files(m)).collect();
    assert_eq!(files.len(), 3);
    // Which extent a file holds is in its name: <ino>.<index>.<file_id>.
    let target = files
        .iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().split('.').nth(1) == Some("1"))
        .unwrap();
    flip(target, 10 * BS + 100);
    let m = pool.mount();
    let f = File::open(m.join("img")).unwrap();
    let bad_off = MIB + 10 * BS;
    let mut buf = vec![0u8; BS as usize];
    let e = f
        .read_exact_at(&mut buf, bad_off)
        .expect_err("a damaged block with no good copy must not read");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // An unaligned read touching the block fails too.
    let mut small = [0u8; 10];
    let e = f.read_exact_at(&mut small, bad_off + 4000).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Everything else reads correctly.
    for (off, len) in [(0, MIB), (MIB, 10 * BS), (bad_off + BS, 2 * MIB - 11 * BS)] {
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, off).unwrap();
        assert_same(
            &b,
            &data[off as usize..(off + len) as usize],
            "undamaged range",
        );
    }
    drop(f);
    let (ok, v) = scrub_json(m.path());
    assert!(!ok, "scrub must fail when a block is lost: {v}");
    assert_eq!(n(&v, "unrecoverable"), 1, "{v}");
    assert_eq!(n(&v, "repaired"), 0, "{v}");
    // Overwriting the whole block heals it.
    let f = OpenOptions::new().write(true).open(m.join("img")).unwrap();
    f.write_all_at(&data[bad_off as usize..(bad_off + BS) as usize], bad_off)
        .unwrap();
    drop(f);
    assert_same(&read_all(&m.join("img")), &data, "after overwrite");
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "scrub after the overwrite: {v}");
    m.unmount();
    pool.assert_check_clean();
}

#[test]
fn damaged_sum_file_and_label_copy_are_reported_and_rewritten() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(3, MIB as usize);
    {
        let m = pool.mount();
        write_synced(&m.join("img"), &data);
        m.unmount();
    }
    let sum: PathBuf = fs::read_dir(pool.members[0].join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "sum"))
        .unwrap();
    flip(&sum, 20);
    // A label copy too.
    flip(&pool.members[1].join("vpool-label.1"), 10);
    let o = pool.check();
    assert!(
        !o.status.success(),
        "check must report the damaged sum file"
    );
    assert!(text(&o).contains("sum file"), "{}", describe(&o));
    let m = pool.mount();
    assert_same(
        &read_all(&m.join("img")),
        &data,
        "read with one damaged sum file",
    );
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "{v}");
    assert!(
        v["metadata_problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("label copy damaged")),
        "{v}"
    );
    m.unmount();
    pool.assert_check_clean();
}

#[test]
fn partial_block_writes_punches_and_truncates_keep_checksums_right() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let m = pool.mount();
    let p = m.join("f");
    let mut model = pattern(4, 2 * MIB as usize + 333);
    write_synced(&p, &model);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    for (i, off) in [1u64, 4095, 4096 * 3 + 7, MIB - 5, 2 * MIB + 100]
        .iter()
        .enumerate()
    {
        let d = pattern(40 + i as u64, 3000);
        f.write_all_at(&d, *off).unwrap();
        let end = *off as usize + d.len();
        if end > model.len() {
            model.resize(end, 0);
        }
        model[*off as usize..end].copy_from_slice(&d);
    }
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        5000,
        70000,
    )
    .unwrap();
    model[5000..75000].fill(0);
    f.set_len(MIB + 12345).unwrap();
    model.truncate((MIB + 12345) as usize);
    f.set_len(MIB + 50000).unwrap();
    model.resize((MIB + 50000) as usize, 0);
    f.sync_all().unwrap();
    drop(f);
    assert_same(&read_all(&p), &model, "content");
    let (ok, v) = scrub_json(m.path());
    assert!(ok && n(&v, "checksum_errors") == 0, "{v}");
    m.unmount();
    let m = pool.mount();
    assert_same(&read_all(&m.join("f")), &model, "after remount");
    let (ok, v) = scrub_json(m.path());
    assert!(ok && n(&v, "checksum_errors") == 0, "{v}");
    m.unmount();
}

/// kill -9 during heavy writes on a copies=2 pool: after remount the copies
/// agree and the checksums match (the extents being written are
/// resynchronised), so scrub reports zero errors.
#[test]
fn kill9_during_heavy_writes_copies2_then_scrub_is_clean() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let m = pool.mount();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let dir_fd = File::open(m.path()).unwrap();
        thread::spawn(move || -> Option<io::Error> {
            use std::os::unix::io::AsRawFd;
            let dir = PathBuf::from(format!("/proc/self/fd/{}", dir_fd.as_raw_fd()));
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
                let f = match OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(format!("vol{}", n % 3)))
                {
                    Ok(f) => f,
                    Err(e) => return Some(e),
                };
                for i in 0..32u64 {
                    // Unaligned pieces, so that blocks are written partially.
                    let chunk = pattern(n * 100 + i, 50_000);
                    let off = ((n * 31 + i * 7919) % 700) * 4099;
                    if let Err(e) = f.write_all_at(&chunk, off) {
                        return Some(e);
                    }
                }
                if n.is_multiple_of(4)
                    && let Err(e) = f.sync_data()
                {
                    return Some(e);
                }
                n += 1;
                rounds.store(n, Ordering::SeqCst);
            }
            None
        })
    };
    wait_until(Duration::from_secs(20), || {
        rounds.load(Ordering::SeqCst) >= 10
    });
    thread::sleep(Duration::from_millis(200));
    m.kill9();
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join().expect("writer panicked");
    pool.assert_check_clean();
    let m = pool.mount();
    for e in fs::read_dir(m.path()).unwrap() {
        let p = e.unwrap().path();
        fs::read(&p).unwrap_or_else(|e| panic!("{p:?} unreadable after crash: {e}"));
    }
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "scrub after the crash: {v}");
    assert_eq!(n(&v, "checksum_errors"), 0, "{v}");
    assert_eq!(n(&v, "repaired"), 0, "{v}");
    let st = m.status();
    assert_eq!(st["integrity"]["checksum_errors"], 0, "{st}");
    m.unmount();
    pool.assert_check_clean();
}

/// A snapshot delta copy damaged on one member: the snapshot still reads
/// right (the other copy), and scrub rewrites the bad copy.
#[test]
fn copies2_damaged_delta_copy_is_repaired_by_scrub() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(9, 2 * MIB as usize);
    let m = pool.mount();
    write_synced(&m.join("img"), &data);
    let o = run_t(
        120,
        VPOOL,
        &args!["snapshot", "create", "--wait", m.path(), "s1"],
    );
    assert!(o.status.success(), "{}", describe(&o));
    m.unmount();
    let find_delta = |member: &Path| -> PathBuf {
        let mut stack = vec![member.join("snap")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "vd") {
                    return p;
                }
            }
        }
        panic!("no delta under {member:?}");
    };
    let victim = find_delta(&pool.members[0]);
    flip(&victim, 200);
    let m = pool.mount();
    assert_same(
        &read_all(&m.join(".snapshots/s1/img")),
        &data,
        "snapshot read with one bad delta copy",
    );
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "scrub must repair the delta: {v}");
    assert_eq!(v["deltas_bad"], 1, "{v}");
    assert_eq!(v["deltas_repaired"], 1, "{v}");
    let (ok, v) = scrub_json(m.path());
    assert!(ok && v["deltas_bad"] == 0, "second scrub: {v}");
    m.unmount();
    pool.assert_check_clean();
}
