//! Members online: `vpool device add|remove|replace`, `vpool rebalance` and
//! `vpool set copies=N` on a mounted pool, while writes go on.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use common::*;

fn vp_ok(a: &[std::ffi::OsString]) -> String {
    let o = run_t(300, VPOOL, a);
    assert!(o.status.success(), "vpool {a:?} failed\n{}", describe(&o));
    text(&o)
}

fn stored_on(st: &serde_json::Value, dir: &Path) -> Option<u64> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    st["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["path"].as_str().unwrap()) == dir)
        .map(|m| m["stored_bytes"].as_u64().unwrap())
}

fn new_dir(pool: &Pool, name: &str) -> PathBuf {
    let d = pool.scratch(name);
    fs::create_dir(&d).unwrap();
    d
}

/// A writer that keeps rewriting blocks of `path` with known content until
/// stopped; returns the content the file must have.
fn start_writer(path: PathBuf, size: usize) -> (Arc<AtomicBool>, thread::JoinHandle<Vec<u8>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = thread::spawn(move || {
        let mut model = pattern(100, size);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let mut n = 0u64;
        while !s.load(Ordering::SeqCst) || n < 50 {
            let len = [4096usize, 65536, 1000][n as usize % 3];
            let off =
                ((n.wrapping_mul(2654435761) % (size as u64 - len as u64)) / 512 * 512) as usize;
            let data = pattern(1000 + n, len);
            f.write_all_at(&data, off as u64)
                .unwrap_or_else(|e| panic!("write {n} at {off}: {e}"));
            model[off..off + len].copy_from_slice(&data);
            if n.is_multiple_of(20) {
                f.sync_data().unwrap();
            }
            n += 1;
        }
        f.sync_all().unwrap();
        model
    });
    (stop, h)
}

#[test]
fn add_rebalance_copies_remove_replace_during_writes_byte_exact() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let m = pool.mount();
    let size = 24 * MIB as usize;
    let img = m.join("img");
    fs::write(&img, pattern(100, size)).unwrap();
    let (stop, writer) = start_writer(img.clone(), size);
    let target = m.path().to_path_buf();

    let c = new_dir(&pool, "c");
    let out = vp_ok(&args!["device", "add", &target, &c]);
    assert!(out.contains("added"), "{out}");
    let out = vp_ok(&args!["device", "add", &target, &c]);
    assert!(out.contains("already a member"), "{out}");
    vp_ok(&args!["rebalance", &target]);
    let st = m.status();
    assert!(
        stored_on(&st, &c).unwrap() >= 4 * MIB,
        "rebalance put nothing on the new member: {st}"
    );
    let out = vp_ok(&args!["set", &target, "copies=2"]);
    assert!(out.contains("copies 1 -> 2"), "{out}");
    assert_eq!(m.status()["copies"], 2);
    let out = vp_ok(&args!["device", "remove", &target, &pool.members[0]]);
    assert!(out.contains("removed"), "{out}");
    let out = vp_ok(&args!["device", "remove", &target, &pool.members[0]]);
    assert!(out.contains("nothing to remove"), "{out}");
    let d = new_dir(&pool, "d");
    let out = vp_ok(&args!["device", "replace", &target, &pool.members[1], &d]);
    assert!(out.contains("replaced"), "{out}");

    stop.store(true, Ordering::SeqCst);
    let model = writer.join().expect("writer panicked");
    assert_same(
        &read_all(&img),
        &model,
        "file written during member changes",
    );
    let st = m.status();
    assert_eq!(st["state"], "ONLINE", "{st}");
    let paths: Vec<&str> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 2, "{st}");
    let (ok, v) = scrub_json(&target);
    assert!(ok, "scrub after the changes: {v}");
    m.unmount();
    // The retired members hold nothing of the pool any more.
    for old in &pool.members {
        assert!(
            !old.join("vpool-label.0").exists(),
            "{old:?} still labelled"
        );
        assert!(
            !old.join("meta.redb").exists(),
            "{old:?} still has metadata"
        );
    }
    let o = vpool(&args!["check", &c]);
    assert!(
        o.status.success(),
        "check after the changes\n{}",
        describe(&o)
    );
    let m = Mount::new(&c, &pool.mnt(), &[]);
    assert_same(&read_all(&m.join("img")), &model, "after remount");
    m.unmount();
}

#[test]
fn member_commands_refuse_what_cannot_be_done() {
    let pool = Pool::new(2, &["--copies", "2"]);
    let m = pool.mount();
    fs::write(m.join("f"), b"data").unwrap();
    let t = m.path().to_path_buf();
    let o = vpool(&args!["device", "remove", &t, &pool.members[0]]);
    assert_refused(&o, &["copies=2 needs 2 members"], "remove below copies");
    let o = vpool(&args!["set", &t, "copies=3"]);
    assert_refused(&o, &["copies=3 needs 3 members"], "copies above members");
    let o = vpool(&args!["set", &t, "copies=2"]);
    assert!(text(&o).contains("already 2"), "{}", describe(&o));
    let o = vpool(&args!["set", &t, "colour=blue"]);
    assert_refused(&o, &["unknown setting"], "unknown setting");
    let other = Pool::new(1, &[]);
    let o = vpool(&args!["device", "add", &t, &other.members[0]]);
    assert_refused(
        &o,
        &["already belongs to pool"],
        "add a member of another pool",
    );
    let inside = pool.members[0].join("sub");
    fs::create_dir(&inside).unwrap();
    let o = vpool(&args!["device", "add", &t, &inside]);
    assert_refused(&o, &["inside"], "add a directory inside a member");
    let o = vpool(&args!["set", &t, "copies=1"]);
    assert!(o.status.success(), "{}", describe(&o));
    let o = vpool(&args!["device", "remove", &t, &pool.members[0]]);
    assert!(o.status.success(), "{}", describe(&o));
    let o = vpool(&args!["device", "remove", &t, &pool.members[1]]);
    assert_refused(&o, &["last member"], "remove the last member");
    assert_eq!(fs::read(m.join("f")).unwrap(), b"data");
    m.unmount();
}

#[test]
fn remove_refused_when_the_others_cannot_hold_the_data() {
    let big = Tmpfs::new("96M");
    let small = Tmpfs::new("24M");
    let mut pool = Pool::from_dirs(vec![big.path.clone(), small.path.clone()]);
    pool.tmpfs = vec![big, small];
    pool.create_ok(&["--extent-size", "1M"]);
    let m = pool.mount();
    let f = File::create(m.join("img")).unwrap();
    f.write_all_at(&pattern(1, 40 * MIB as usize), 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let o = vpool(&args!["device", "remove", m.path(), &pool.members[0]]);
    assert_refused(&o, &["free"], "remove onto a member too small");
    assert_eq!(m.status()["members"].as_array().unwrap().len(), 2);
    m.unmount();
    pool.assert_check_clean();
}

#[test]
fn replace_a_lost_member_of_a_copies2_pool_then_scrub_is_clean() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "1M"]);
    let data = pattern(7, 9 * MIB as usize);
    {
        let m = pool.mount();
        let f = File::create(m.join("img")).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        vp_ok(&args!["snapshot", "create", "--wait", m.path(), "s1"]);
        m.unmount();
    }
    fs::remove_dir_all(&pool.members[1]).unwrap();
    let m = pool.mount();
    assert_eq!(m.status()["state"], "DEGRADED");
    let new = new_dir(&pool, "new");
    let out = vp_ok(&args![
        "device",
        "replace",
        m.path(),
        &pool.members[1],
        &new
    ]);
    assert!(out.contains("replaced"), "{out}");
    let st = m.status();
    assert_eq!(st["state"], "ONLINE", "{st}");
    assert_eq!(st["degraded_bytes"], 0, "{st}");
    assert_same(&read_all(&m.join("img")), &data, "after replace");
    assert_same(
        &read_all(&m.join(".snapshots/s1/img")),
        &data,
        "snapshot after replace",
    );
    let (ok, v) = scrub_json(m.path());
    assert!(ok, "scrub after replace: {v}");
    assert_eq!(v["data"]["checksum_errors"], 0, "{v}");
    assert!(v["delta_problems"].as_array().unwrap().is_empty(), "{v}");
    let out = vp_ok(&args![
        "device",
        "replace",
        m.path(),
        &pool.members[1],
        &new
    ]);
    assert!(out.contains("already replaced"), "{out}");
    m.unmount();
    let o = vpool(&args!["check", &pool.members[0]]);
    assert!(o.status.success(), "check after replace\n{}", describe(&o));
    // The new member alone holds a full copy: every extent and delta is on it.
    let o = vpool(&args!["set", &pool.members[0], "copies=1"]);
    assert!(o.status.success(), "{}", describe(&o));
    let o = vpool(&args![
        "device",
        "remove",
        &pool.members[0],
        &pool.members[0]
    ]);
    assert!(o.status.success(), "{}", describe(&o));
    let m = Mount::new(&new, &pool.mnt(), &[]);
    assert_same(&read_all(&m.join("img")), &data, "on the new member alone");
    assert_same(
        &read_all(&m.join(".snapshots/s1/img")),
        &data,
        "snapshot on the new member alone",
    );
    m.unmount();
}

/// A member added while another was missing is found when the pool is later
/// mounted through the member whose label lagged.
#[test]
fn member_added_while_another_was_missing_is_found_through_the_lagging_one() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let away = pool.scratch("m1.away");
    fs::rename(&pool.members[1], &away).unwrap();
    let d = new_dir(&pool, "d");
    let data = pattern(11, 6 * MIB as usize);
    {
        let m = pool.mount();
        vp_ok(&args!["device", "add", m.path(), &d]);
        write_synced(&m.join("f"), &data);
        m.unmount();
    }
    fs::rename(&away, &pool.members[1]).unwrap();
    let m = Mount::new(&pool.members[1], &pool.mnt(), &[]);
    let st = m.status();
    assert_eq!(st["state"], "ONLINE", "{st}");
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");
    assert_same(&read_all(&m.join("f")), &data, "data on the added member");
    m.unmount();
    pool.assert_check_clean();
}
