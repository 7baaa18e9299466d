//! Degraded operation: a member missing at mount, or deleted under the
//! running daemon, does not take the pool down.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::*;

fn member_health(st: &serde_json::Value, path: &Path) -> String {
    member_status(st, path)["health"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn copies2_member_missing_at_mount_stays_readable_and_writable_then_heals() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let old = pattern(1, 3 * MIB as usize);
    {
        let m = pool.mount();
        write_synced(&m.join("old"), &old);
        m.unmount();
    }
    let away = pool.scratch("m1.away");
    fs::rename(&pool.members[1], &away).unwrap();
    let m = pool.mount();
    let st = m.status();
    assert_eq!(st["state"], "DEGRADED", "{st}");
    assert_eq!(member_health(&st, &pool.members[1]), "MISSING", "{st}");
    assert!(st["degraded_bytes"].as_u64().unwrap() >= 3 * MIB, "{st}");
    assert_same(
        &read_all(&m.join("old")),
        &old,
        "read with a member missing",
    );
    // Overwrites of existing extents and new files both work.
    let mut old2 = old.clone();
    let patch = pattern(2, 100_000);
    let f = OpenOptions::new().write(true).open(m.join("old")).unwrap();
    f.write_all_at(&patch, 500_000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    old2[500_000..600_000].copy_from_slice(&patch);
    let new = pattern(3, 2 * MIB as usize);
    write_synced(&m.join("new"), &new);
    assert_same(
        &read_all(&m.join("old")),
        &old2,
        "overwritten while degraded",
    );
    m.unmount();
    // The member comes back with stale copies: reads and scrub heal them.
    fs::rename(&away, &pool.members[1]).unwrap();
    let m = pool.mount();
    assert_eq!(m.status()["state"], "ONLINE");
    assert_same(
        &read_all(&m.join("old")),
        &old2,
        "after the member returned",
    );
    assert_same(
        &read_all(&m.join("new")),
        &new,
        "new file after the member returned",
    );
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "scrub after the member returned: {v}");
    let (ok, v) = scrub_json(m.path());
    assert!(
        ok && v["data"]["checksum_errors"] == 0 && v["data"]["repaired"] == 0,
        "second scrub must be clean: {v}"
    );
    m.unmount();
    pool.assert_check_clean();
}

#[test]
fn copies1_member_missing_only_its_extents_fail() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let data = pattern(4, 8 * MIB as usize);
    {
        let m = pool.mount();
        write_synced(&m.join("img"), &data);
        m.unmount();
    }
    // Extents spread over both members (most free space first).
    let on1: Vec<u64> = fs::read_dir(pool.members[1].join("data"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            (!n.ends_with(".sum")).then(|| n.split('.').nth(1).unwrap().parse().unwrap())
        })
        .collect();
    assert!(!on1.is_empty() && on1.len() < 8, "extents on m1: {on1:?}");
    let away = pool.scratch("m1.away");
    fs::rename(&pool.members[1], &away).unwrap();
    let m = pool.mount();
    assert_eq!(m.status()["state"], "DEGRADED");
    let f = File::open(m.join("img")).unwrap();
    for i in 0..8u64 {
        let mut b = vec![0u8; MIB as usize];
        let r = f.read_exact_at(&mut b, i * MIB);
        if on1.contains(&i) {
            let e = r.expect_err("extent on the missing member must not read");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "extent {i}: {e}");
        } else {
            r.unwrap_or_else(|e| panic!("extent {i} on the present member: {e}"));
            assert_same(
                &b,
                &data[(i * MIB) as usize..((i + 1) * MIB) as usize],
                "present extent",
            );
        }
    }
    drop(f);
    // New files land on the present member.
    let new = pattern(5, 3 * MIB as usize);
    write_synced(&m.join("new"), &new);
    assert_same(&read_all(&m.join("new")), &new, "new file while degraded");
    m.unmount();
    fs::rename(&away, &pool.members[1]).unwrap();
    let m = pool.mount();
    assert_same(&read_all(&m.join("img")), &data, "all back");
    m.unmount();
    pool.assert_check_clean();
}

/// A member directory deleted while fio writes with verification: the pool
/// stays mounted, fio's verify passes, status says DEGRADED.
#[test]
fn copies2_member_deleted_during_verified_fio_writes() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "4M"]);
    let m = pool.mount();
    let before = pattern(6, 5 * MIB as usize);
    write_synced(&m.join("before"), &before);
    let victim = pool.members[1].clone();
    let job = m.join("fio.img");
    let watched = job.clone();
    let killer = std::thread::spawn(move || {
        // Once fio is well into its writes, delete the member directory (the
        // daemon may create files in it meanwhile: retry until it is gone).
        wait_until(Duration::from_secs(60), || {
            fs::metadata(&watched).is_ok_and(|m| m.blocks() * 512 >= 24 * MIB)
        });
        let t0 = std::time::Instant::now();
        while victim.exists() && t0.elapsed() < Duration::from_secs(30) {
            let _ = fs::remove_dir_all(&victim);
        }
        assert!(!victim.exists(), "could not delete {victim:?}");
    });
    let o = run_t(
        300,
        "fio",
        &args![
            "--name=verified",
            format!("--filename={}", job.display()),
            "--size=96M",
            "--rw=randwrite",
            "--bs=16k",
            "--ioengine=psync",
            "--fsync=64",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=1",
            "--loops=2",
        ],
    );
    killer.join().unwrap();
    assert!(
        o.status.success(),
        "fio with verify failed\n{}",
        describe(&o)
    );
    assert!(is_mounted(m.path()), "the pool must stay mounted");
    assert!(
        wait_until(Duration::from_secs(15), || m.status()["state"]
            == "DEGRADED"),
        "status must say DEGRADED after the member directory is gone: {}",
        m.status()
    );
    let st = m.status();
    assert_eq!(member_health(&st, &pool.members[1]), "FAULTED", "{st}");
    assert_same(
        &read_all(&m.join("before")),
        &before,
        "file written before the loss",
    );
    // A file written after the loss reads back too.
    let after = pattern(7, 3 * MIB as usize);
    write_synced(&m.join("after"), &after);
    assert_same(
        &read_all(&m.join("after")),
        &after,
        "file written after the loss",
    );
    // Replace the lost member: every extent gets its second copy back, and
    // scrub finds nothing wrong.
    let fio_data = read_all(&job);
    let new = pool.scratch("new");
    fs::create_dir(&new).unwrap();
    let o = run_t(
        300,
        VPOOL,
        &args!["device", "replace", m.path(), &pool.members[1], &new],
    );
    assert!(o.status.success(), "replace\n{}", describe(&o));
    let st = m.status();
    assert_eq!(st["state"], "ONLINE", "{st}");
    assert_eq!(st["degraded_bytes"], 0, "{st}");
    let (ok, v) = scrub_json(m.path());
    assert!(
        ok && v["data"]["checksum_errors"] == 0,
        "scrub after replace: {v}"
    );
    assert_same(&read_all(&job), &fio_data, "fio's file after replace");
    assert_same(
        &read_all(&m.join("before")),
        &before,
        "before, after replace",
    );
    m.unmount();
    pool.assert_check_clean();
}
