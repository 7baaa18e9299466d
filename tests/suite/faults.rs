//! Data safety under faults made by hand (issue 12): no single damaged copy
//! refuses or loses anything, and members that went their own way are never
//! merged silently.

use crate::common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;

/// Moves a member directory out of the way (as if its disk were unplugged)
/// and returns where it went.
fn unplug(dir: &Path) -> PathBuf {
    let away = dir.with_extension("away");
    fs::rename(dir, &away).unwrap();
    away
}

fn replug(away: &Path, dir: &Path) {
    fs::rename(away, dir).unwrap();
}

/// Point 3: with d2 missing, d1 took writes (a new file y, x rewritten,
/// synced); then d2 alone was mounted (nothing written); with both back, y
/// was gone, x had its old contents and d1's extent file was deleted. Now the
/// reunion is refused as a split, and `--force` keeps the newest copy and
/// deletes no extent file of the other side.
#[test]
fn members_that_diverged_are_not_merged_silently() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let (d1, d2) = (pool.members[0].clone(), pool.members[1].clone());
    let old_x = pattern(1, 3 << 20);
    let new_x = pattern(2, 3 << 20);
    let y = pattern(3, 2 << 20);
    let m = pool.mount();
    write_synced(&m.join("x"), &old_x);
    m.unmount();

    let away2 = unplug(&d2);
    let m = Mount::new(&d1, &pool.mnt(), &[]);
    write_synced(&m.join("y"), &y);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.join("x"))
        .unwrap();
    f.write_all_at(&new_x, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();

    let away1 = unplug(&d1);
    replug(&away2, &d2);
    let m = Mount::new(&d2, &pool.mnt(), &[]);
    assert_same(&read_all(&m.join("x")), &old_x, "x on the stale side");
    m.unmount();

    replug(&away1, &d1);
    let files_before: Vec<PathBuf> = fs::read_dir(d1.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for dir in [&d1, &d2] {
        let o = Mount::try_new(dir, &pool.mnt(), &[])
            .err()
            .unwrap_or_else(|| panic!("the two sides were mounted together through {dir:?}"));
        assert_refused(
            &o,
            &["diverged", "--force"],
            "mounting members that diverged",
        );
    }
    for f in &files_before {
        assert!(f.exists(), "{f:?} was removed by a refused mount");
    }

    let m = Mount::new(&d1, &pool.mnt(), &["force"]);
    // The newest copy is d1's: it has y and the new x.
    assert_same(&read_all(&m.join("y")), &y, "y after --force");
    assert_same(&read_all(&m.join("x")), &new_x, "x after --force");
    let (ok, report) = scrub_json(&m.path);
    assert!(ok, "scrub after --force: {report}");
    m.unmount();
    for f in &files_before {
        let name = f.file_name().unwrap();
        assert!(
            f.exists() || d1.join("quarantine").join(name).exists(),
            "{f:?} was deleted"
        );
    }
    // Once reunited, the pool mounts as usual.
    let m = pool.mount();
    assert_same(&read_all(&m.join("y")), &y, "y after the reunion");
    m.unmount();
    pool.assert_check_clean();
}

/// A stale member that took no commits of its own (it was only missing)
/// rejoins without complaint.
#[test]
fn a_member_that_was_only_missing_rejoins() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let (d1, d2) = (pool.members[0].clone(), pool.members[1].clone());
    let m = pool.mount();
    write_synced(&m.join("x"), &pattern(1, 2 << 20));
    m.unmount();
    let away2 = unplug(&d2);
    let m = Mount::new(&d1, &pool.mnt(), &[]);
    write_synced(&m.join("y"), &pattern(2, 2 << 20));
    m.unmount();
    replug(&away2, &d2);
    let m = Mount::new(&d2, &pool.mnt(), &[]);
    assert_same(
        &read_all(&m.join("y")),
        &pattern(2, 2 << 20),
        "y through the stale member",
    );
    let (ok, report) = scrub_json(&m.path);
    assert!(ok, "scrub: {report}");
    m.unmount();
    pool.assert_check_clean();
}

/// Point 1: one damaged `meta.redb` (bytes flipped, or its first sector
/// torn) made `vpool mount` refuse the whole pool although the other member
/// held a good copy. Now the pool mounts from the good copy and the damaged
/// one is rebuilt (the damaged file kept aside).
#[test]
fn one_damaged_metadata_copy_is_rebuilt_from_the_other() {
    for damage in ["torn first sector", "flipped bytes"] {
        let pool = Pool::new(2, &["--copies", "2"]);
        let data = pattern(5, 3 << 20);
        let m = pool.mount();
        fs::create_dir(m.join("dir")).unwrap();
        write_synced(&m.join("dir/f"), &data);
        m.unmount();
        let store = pool.members[1].join("meta.redb");
        let f = fs::OpenOptions::new().write(true).open(&store).unwrap();
        let len = f.metadata().unwrap().len();
        match damage {
            "torn first sector" => f.write_all_at(&[0u8; 512], 0).unwrap(),
            _ => {
                for off in (4096..len).step_by(997) {
                    f.write_all_at(&[0xA5], off).unwrap();
                }
            }
        }
        drop(f);
        // Offline, status names the damaged copy (and repairs nothing).
        let st = status_json(&pool.members[0]);
        assert_eq!(st["state"], "DEGRADED", "{damage}: {st}");
        let bad = st["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["health"] == "DAMAGED")
            .unwrap_or_else(|| panic!("{damage}: no member shown DAMAGED: {st}"));
        assert_eq!(
            bad["path"],
            pool.members[1].display().to_string(),
            "{damage}"
        );
        let m = Mount::try_new(&pool.members[0], &pool.mnt(), &[])
            .unwrap_or_else(|o| panic!("{damage}: mount refused\n{}", describe(&o)));
        assert_eq!(m.status()["state"], "ONLINE", "{damage}: rebuilt at mount");
        assert_same(&read_all(&m.join("dir/f")), &data, damage);
        m.unmount();
        assert!(
            pool.members[1].join("meta.redb.damaged").exists(),
            "{damage}: the damaged copy was not kept aside"
        );
        pool.assert_check_clean();
    }
}

/// Extent copy files on `member`, by extent index.
fn extent_files(member: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    for e in fs::read_dir(member.join("data")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        // `<ino>.<index>.<file_id>`; sum files have a fourth part.
        if let [_, index, _] = name.split('.').collect::<Vec<_>>()[..]
            && let Ok(i) = index.parse()
        {
            out.push((i, p.clone()));
        }
    }
    out
}

/// Point 5: lowering `copies` dropped copies without checking that the copy
/// that stays reads good; a damaged survivor then lost the block for good.
/// Here every extent has one damaged copy (on alternating members), so
/// whichever copy `set copies=1` drops, half the survivors are damaged.
#[test]
fn lowering_copies_keeps_data_when_the_survivor_is_damaged() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(9, 6 << 20);
    let m = pool.mount();
    write_synced(&m.join("f"), &data);
    m.unmount();
    for (i, member) in pool.members.iter().enumerate() {
        for (index, p) in extent_files(member) {
            if index % 2 == i as u64 {
                let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.write_all_at(b"DAMAGED!", 8192).unwrap();
            }
        }
    }
    let m = pool.mount();
    let o = run_t(300, VPOOL, &args!["set", &m.path, "copies=1"]);
    assert!(o.status.success(), "set copies=1\n{}", describe(&o));
    assert_same(&read_all(&m.join("f")), &data, "file after copies=1");
    m.unmount();
    pool.assert_check_clean();
}

/// Point 2: with `copies=2`, bytes flipped in one copy's checksum table (past
/// the sum file's header) made good data unreadable (EIO) and scrub call the
/// blocks unrecoverable, although both data copies were intact. Tables now
/// carry page checksums: the damaged one is passed over and rewritten.
#[test]
fn a_damaged_checksum_table_does_not_hide_good_data() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(13, 6 << 20);
    let m = pool.mount();
    write_synced(&m.join("f"), &data);
    m.unmount();
    // One copy's table damaged per extent, on alternating members, so that
    // whichever copy is read first, some extents have it damaged.
    let mut damaged = 0;
    for (i, member) in pool.members.iter().enumerate() {
        for e in fs::read_dir(member.join("data")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let Some(index) = name.strip_suffix(".sum").and_then(|n| n.split('.').nth(1)) else {
                continue;
            };
            if index.parse::<u64>().unwrap() % 2 == i as u64 {
                let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
                // Entry of block 2: its checksum no longer matches the data.
                f.write_all_at(&[0xde, 0xad, 0xbe, 0xef], 64 + 8).unwrap();
                damaged += 1;
            }
        }
    }
    assert_eq!(damaged, 6, "one damaged table per extent");
    let m = pool.mount();
    assert_same(&read_all(&m.join("f")), &data, "file with damaged tables");
    let (ok, report) = scrub_json(&m.path);
    assert!(ok, "scrub: {report}");
    assert_eq!(report["data"]["unrecoverable"], 0, "{report}");
    m.unmount();
    pool.assert_check_clean();
}

/// Fills the pool through `path` with 1 MiB chunks, each synced, until ENOSPC.
fn fill_until_enospc(path: &Path) {
    let chunk = pattern(17, 1 << 20);
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    for i in 0..1024u64 {
        if let Err(e) = f.write_all_at(&chunk, i << 20).and_then(|_| f.sync_data()) {
            assert_eq!(errno(&e), libc::ENOSPC, "filling: {e}");
            return;
        }
    }
    panic!("1 GiB fit into a pool of two small tmpfs members");
}

/// Point 6: on a full pool of two small members, deleting a large file and
/// writing 20 MiB at once sometimes failed with ENOSPC at close; a few seconds
/// later the same copy succeeded. Freed space is usable by the next write.
#[test]
fn freed_space_is_usable_by_the_very_next_write() {
    let a = Tmpfs::new("48M");
    let b = Tmpfs::new("48M");
    let pool = Pool::from_dirs(vec![a.path.clone(), b.path.clone()]);
    pool.create_ok(&["--extent-size", "1M"]);
    let m = pool.mount();
    let src = pool.scratch("src");
    fs::write(&src, pattern(19, 20 << 20)).unwrap();
    for round in 0..6 {
        fill_until_enospc(&m.join("fill"));
        fs::remove_file(m.join("fill")).unwrap();
        let dst = m.join(format!("copy{round}"));
        let o = run_t(120, "cp", &args![&src, &dst]);
        assert!(
            o.status.success(),
            "round {round}: cp right after freeing space failed\n{}",
            describe(&o)
        );
        fs::remove_file(&dst).unwrap();
    }
    m.unmount();
    pool.assert_check_clean();
}

/// Point 7: `lseek(SEEK_DATA)` on a descriptor whose writes were still in the
/// kernel's writeback cache answered from the daemon's older size: after a
/// 1 MiB `pwrite` at 0 into a new file, SEEK_DATA at 0 failed with ENXIO (a
/// copying tool would skip the data; hole probes called holes unsupported).
#[test]
fn seek_data_sees_writes_still_in_the_kernel_cache() {
    use std::os::unix::io::AsRawFd;
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    for round in 0..20 {
        let p = m.join(format!("f{round}"));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.write_all_at(&pattern(round, 1 << 20), 0).unwrap();
        let data = lseek(&f, 0, libc::SEEK_DATA)
            .unwrap_or_else(|e| panic!("round {round}: SEEK_DATA at 0 after a 1 MiB write: {e}"));
        assert_eq!(data, 0, "round {round}: SEEK_DATA");
        let hole = lseek(&f, 0, libc::SEEK_HOLE).unwrap();
        assert_eq!(hole, 1 << 20, "round {round}: SEEK_HOLE");
        // A hole punched below cached data, then data past it.
        f.write_all_at(b"tail", 3 << 20).unwrap();
        assert_eq!(
            lseek(&f, 1 << 20, libc::SEEK_DATA).unwrap(),
            3 << 20,
            "round {round}"
        );
        let _ = f.as_raw_fd();
    }
    m.unmount();
}

/// Point 7: a directory replaced by `rename` while open: `fstat` on its
/// descriptor failed with ENOENT instead of showing it with no links.
#[test]
fn an_open_directory_replaced_by_rename_still_answers_fstat() {
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    fs::create_dir(m.join("a")).unwrap();
    fs::create_dir(m.join("b")).unwrap();
    let d = fs::File::open(m.join("a")).unwrap();
    fs::rename(m.join("b"), m.join("a")).unwrap();
    let md = d
        .metadata()
        .unwrap_or_else(|e| panic!("fstat of the replaced directory: {e}"));
    assert!(md.is_dir());
    assert_eq!(md.nlink(), 0, "a replaced directory has no links");
    drop(d);
    m.unmount();
    pool.assert_check_clean();
}

/// Point 4, mounted: an I/O error injected through the storage seam in a
/// running daemon (a test build's switch, `fault-injection`): the member
/// fails, the pool goes DEGRADED and goes on from the other copy, fsync
/// still means durable, and nothing written before or after is lost.
#[cfg(feature = "fault-injection")]
#[test]
fn io_error_in_a_running_daemon_fails_the_member_not_the_pool() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let (d1, d2) = (
        pool.members[0].clone(),
        pool.members[1].canonicalize().unwrap(),
    );
    let trigger = pool.scratch("trigger");
    let env_path = format!("VPOOL_FAULT_PATH={}/", d2.display());
    let env_trigger = format!("VPOOL_FAULT_TRIGGER={}", trigger.display());
    let m = Mount::try_new_wrapped(&["env", &env_path, &env_trigger], &d1, &pool.mnt(), &[])
        .unwrap_or_else(|o| panic!("mount with fault injection: {}", describe(&o)));
    let a = pattern(1, 3 << 20);
    write_synced(&m.join("a"), &a);
    assert_eq!(m.status()["state"], "ONLINE");

    // From now on every operation on d2 fails with EIO.
    fs::write(&trigger, b"").unwrap();
    let b = pattern(2, 3 << 20);
    write_synced(&m.join("b"), &b);
    let mut a2 = a.clone();
    a2[1 << 20..(1 << 20) + 4096].fill(7);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.join("a"))
        .unwrap();
    f.write_all_at(&a2[1 << 20..(1 << 20) + 4096], 1 << 20)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let st = m.status();
    assert_eq!(st["state"], "DEGRADED", "{st}");
    let bad = member_status(&st, &d2);
    assert_eq!(bad["health"], "FAULTED", "{st}");
    assert!(
        bad["reason"].as_str().unwrap_or("").contains("I/O error"),
        "{st}"
    );
    assert_same(&read_all(&m.join("a")), &a2, "a while degraded");
    assert_same(&read_all(&m.join("b")), &b, "b while degraded");
    m.unmount();

    // The disk is back: everything acknowledged is there, and scrub brings
    // d2's copies up to date.
    fs::remove_file(&trigger).unwrap();
    let m = pool.mount();
    assert_same(&read_all(&m.join("a")), &a2, "a after the member returned");
    assert_same(&read_all(&m.join("b")), &b, "b after the member returned");
    let (ok, report) = scrub_json(&m.path);
    assert!(ok, "scrub after the member returned: {report}");
    m.unmount();
    pool.assert_check_clean();
}

/// Point 4, mounted: a member directory swapped for another while mounted
/// (an empty directory renamed into its place, as a wrong disk mounted there
/// would be): the member fails ("replaced"), nothing is written into the
/// stranger, the pool goes on from the other copy, and once the right
/// directory is back everything is there.
#[test]
fn a_member_directory_swapped_while_mounted_fails_that_member() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let d2 = pool.members[1].clone();
    let m = pool.mount();
    let a = pattern(11, 3 << 20);
    write_synced(&m.join("a"), &a);
    let away = unplug(&d2);
    fs::create_dir(&d2).unwrap();
    let b = pattern(12, 2 << 20);
    write_synced(&m.join("b"), &b);
    assert!(
        wait_until(std::time::Duration::from_secs(15), || m.status()["state"]
            == "DEGRADED"),
        "status must say DEGRADED once the directory is swapped: {}",
        m.status()
    );
    let st = m.status();
    let member = member_status(&st, &d2);
    assert_eq!(member["health"], "FAULTED", "{st}");
    assert_same(&read_all(&m.join("a")), &a, "a with d2 swapped");
    assert_same(&read_all(&m.join("b")), &b, "b with d2 swapped");
    m.unmount();
    assert_eq!(
        fs::read_dir(&d2).unwrap().count(),
        0,
        "vpool wrote into the directory swapped in"
    );
    fs::remove_dir(&d2).unwrap();
    replug(&away, &d2);
    let m = pool.mount();
    assert_same(&read_all(&m.join("a")), &a, "a after the swap back");
    assert_same(&read_all(&m.join("b")), &b, "b after the swap back");
    let (ok, report) = scrub_json(&m.path);
    assert!(ok, "scrub after the swap back: {report}");
    m.unmount();
    pool.assert_check_clean();
}
