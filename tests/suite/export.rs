//! `vpool snapshot export` with real clients: a sparse raw image compared
//! byte for byte with the snapshot, qcow2 images and overlays checked and
//! compared by `qemu-img`, `rbd diff v1` streams decoded strictly and applied;
//! on a mounted pool (the daemon serves the map, the bytes come through the
//! mount) and on an unmounted one; and the errors of a bad path, a missing
//! base and a corrupted one. The real Ceph test is in tests/suite/export_ceph.rs.

use crate::common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// `vpool --json snapshot export ARGS...`, asserting success; the summary.
fn export_ok(a: &[std::ffi::OsString]) -> serde_json::Value {
    let mut v = args!["--json", "snapshot", "export"];
    v.extend(a.iter().cloned());
    let o = vpool_ok(&v);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("export --json: invalid JSON ({e})\n{}", describe(&o)))
}

fn export(a: &[std::ffi::OsString]) -> Output {
    let mut v = args!["snapshot", "export"];
    v.extend(a.iter().cloned());
    vpool(&v)
}

fn snap_create(target: &Path, name: &str) {
    vpool_ok(&args!["snapshot", "create", "--wait", target, name]);
}

fn qemu(a: &[std::ffi::OsString]) -> Output {
    run_ok("qemu-img", a)
}

fn assert_qcow2_same(qcow: &Path, raw: &Path) {
    qemu(&args!["check", "-f", "qcow2", qcow]);
    qemu(&args!["compare", "-f", "qcow2", "-F", "raw", qcow, raw]);
    let o = qemu(&args!["info", "--output=json", "-f", "qcow2", qcow]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(fs::metadata(raw).unwrap().len()),
        "virtual size of {qcow:?}: {info}"
    );
}

/// Applies a stream (strictly decoded) to `image`.
fn apply_rbd(stream: &[u8], image: &mut Vec<u8>) -> vpool::export::rbd::Diff {
    let d = vpool::export::rbd::decode(stream).unwrap_or_else(|e| panic!("rbd diff: {e}"));
    d.apply(image);
    d
}

#[test]
fn exports_match_the_snapshots_mounted_and_unmounted() {
    let pool = Pool::new(2, &["--extent-size", "4M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    let img = m.join(IMG);
    write_first(&img);
    snap_create(&mnt, "s1");
    change(&img);
    snap_create(&mnt, "s2");
    let s1 = m.join(".snapshots/s1").join(IMG);
    let s2 = m.join(".snapshots/s2").join(IMG);
    let out = pool.scratch("out");
    fs::create_dir(&out).unwrap();
    let o = |n: &str| -> PathBuf { out.join(n) };

    // Raw: byte for byte, sparse.
    for (name, snap) in [("s1", &s1), ("s2", &s2)] {
        let raw = o(&format!("disk-{name}.raw"));
        let j = export_ok(&args!["--format", "raw", &mnt, name, IMG, &raw]);
        run_ok("cmp", &args![&raw, snap]);
        let data = j["data_bytes"].as_u64().unwrap();
        assert!(data > 0 && j["mib_per_s"].as_f64().is_some(), "{j}");
        let alloc = alloc_bytes(&raw);
        assert!(
            alloc <= data + 64 * KIB && alloc < 4 * MIB,
            "{name}: raw export not sparse: {alloc} bytes allocated for {data} of data"
        );
    }
    let raw1 = o("disk-s1.raw");
    let raw2 = o("disk-s2.raw");

    // qcow2: full, then the overlay over it (default backing name).
    let q1 = o("disk-s1.qcow2");
    export_ok(&args!["--format", "qcow2", &mnt, "s1", IMG, &q1]);
    assert_qcow2_same(&q1, &s1);
    let q2full = o("full-s2.qcow2");
    export_ok(&args!["--format", "qcow2", &mnt, "s2", IMG, &q2full]);
    assert_qcow2_same(&q2full, &s2);
    let q2 = o("disk-s2.qcow2");
    let j = export_ok(&args![
        "--format", "qcow2", "--from", "s1", &mnt, "s2", IMG, &q2
    ]);
    assert_eq!(j["backing"]["name"], "disk-s1.qcow2", "{j}");
    assert_eq!(j["backing"]["format"], "qcow2", "{j}");
    let chain = qemu(&args![
        "info",
        "--backing-chain",
        "--output=json",
        "-f",
        "qcow2",
        &q2
    ]);
    let chain: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
    assert_eq!(chain.as_array().map(|a| a.len()), Some(2), "{chain}");
    assert_eq!(chain[0]["backing-filename"], "disk-s1.qcow2", "{chain}");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2", "{chain}");
    assert_qcow2_same(&q2, &s2);
    let (over, full) = (
        fs::metadata(&q2).unwrap().len(),
        fs::metadata(&q2full).unwrap().len(),
    );
    assert!(
        over * 2 < full,
        "the overlay ({over} bytes) should hold only the changes (full: {full})"
    );
    // The discarded clusters are zero clusters of the overlay itself (depth
    // 0, zero, no data), not data of zeros and not the backing file's.
    let map = qemu(&args!["map", "--output=json", "-f", "qcow2", &q2]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let punched = (7 * MIB + 576 * KIB, 7 * MIB + 832 * KIB);
    let covering: Vec<_> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let s = e["start"].as_u64().unwrap();
            s < punched.1 && s + e["length"].as_u64().unwrap() > punched.0
        })
        .collect();
    assert!(
        !covering.is_empty()
            && covering
                .iter()
                .all(|e| e["depth"] == 0 && e["zero"] == true && e["data"] == false),
        "discarded range in the overlay: {covering:?}"
    );
    // An overlay over the raw export, named explicitly.
    let q2r = o("over-raw.qcow2");
    export_ok(&args![
        "--format",
        "qcow2",
        "--from",
        "s1",
        "--backing",
        "disk-s1.raw",
        &mnt,
        "s2",
        IMG,
        &q2r
    ]);
    assert_qcow2_same(&q2r, &s2);

    // rbd-diff on stdout: full s1, then s1 -> s2, applied strictly.
    let full = export(&args!["--format", "rbd-diff", &mnt, "s1", IMG, "-"]);
    assert!(full.status.success(), "{}", describe(&full));
    let inc = export(&args![
        "--format", "rbd-diff", "--from", "s1", &mnt, "s2", IMG, "-"
    ]);
    assert!(inc.status.success(), "{}", describe(&inc));
    let mut image = Vec::new();
    let d = apply_rbd(&full.stdout, &mut image);
    assert!(d.from.is_none() && d.to == "s1");
    assert_same(&image, &read_all(&raw1), "full rbd diff applied");
    let d = apply_rbd(&inc.stdout, &mut image);
    assert_eq!(d.from.as_deref(), Some("s1"));
    assert!(
        d.records.iter().any(|r| r.data.is_none()),
        "the discards should be zero records"
    );
    assert_same(&image, &read_all(&raw2), "incremental rbd diff applied");
    m.unmount();

    // Unmounted: the same exports from the pool opened here.
    let off = pool.scratch("offline");
    fs::create_dir(&off).unwrap();
    let member = &pool.members[0];
    let r2 = off.join("s2.raw");
    export_ok(&args!["--format", "raw", member, "s2", IMG, &r2]);
    run_ok("cmp", &args![&r2, &raw2]);
    fs::copy(&q1, off.join("disk-s1.qcow2")).unwrap();
    let oq2 = off.join("disk-s2.qcow2");
    export_ok(&args![
        "--format", "qcow2", "--from", "s1", member, "s2", IMG, &oq2
    ]);
    assert_qcow2_same(&oq2, &raw2);
    let rbd = off.join("inc.rbd");
    export_ok(&args![
        "--format", "rbd-diff", "--from", "s1", member, "s2", IMG, &rbd
    ]);
    let mut image = read_all(&raw1);
    apply_rbd(&read_all(&rbd), &mut image);
    assert_same(&image, &read_all(&raw2), "offline incremental rbd diff");
    pool.assert_check_clean();
}

#[test]
fn bad_path_missing_base_and_bad_usage_are_refused() {
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    write_first(&m.join(IMG));
    snap_create(&mnt, "s1");
    let out = pool.scratch("x.qcow2");
    let o = export(&args![
        "--format",
        "qcow2",
        &mnt,
        "s1",
        "vm/nosuch.img",
        &out
    ]);
    assert_refused(
        &o,
        &["vm/nosuch.img: no such file in snapshot s1"],
        "bad path",
    );
    let o = export(&args!["--format", "qcow2", &mnt, "s1", "vm", &out]);
    assert_refused(&o, &["not a regular file"], "a directory");
    let o = export(&args!["--format", "qcow2", &mnt, "nosuch", IMG, &out]);
    assert_refused(&o, &["no snapshot named nosuch"], "missing snapshot");
    let o = export(&args![
        "--format", "qcow2", "--from", "gone", &mnt, "s1", IMG, &out
    ]);
    assert_refused(&o, &["no snapshot named gone"], "missing base");
    let o = export(&args![
        "--format", "raw", "--from", "s1", &mnt, "s1", IMG, &out
    ]);
    assert_refused(&o, &["raw export is always full"], "raw with --from");
    let o = export(&args!["--format", "qcow2", &mnt, "s1", IMG, "-"]);
    assert_refused(&o, &["need a file"], "qcow2 to stdout");
    assert!(!out.exists(), "a refused export left {out:?}");
    m.unmount();
}

/// The delta files of snapshot `id` on the members.
fn deltas_of(pool: &Pool, id: u64) -> Vec<PathBuf> {
    pool.members
        .iter()
        .filter_map(|mb| fs::read_dir(mb.join("snap").join(id.to_string())).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "vd"))
        .collect()
}

#[test]
fn corrupted_base_is_reported_and_leaves_no_output() {
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    let img = m.join(IMG);
    write_first(&img);
    let ino = fs::metadata(&img).unwrap().ino();
    snap_create(&mnt, "s1");
    change(&img);
    snap_create(&mnt, "s2");
    let list = vpool_ok(&args!["--json", "snapshot", "list", &mnt]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "s1")
        .and_then(|i| i["id"].as_u64())
        .unwrap();
    m.unmount();
    // Cut the delta of the image in s1 in half: s2's chain reads it too.
    let delta = deltas_of(&pool, id)
        .into_iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{ino}."))
        })
        .unwrap_or_else(|| panic!("no delta of inode {ino} in snapshot {id}"));
    let len = fs::metadata(&delta).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&delta)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = pool.scratch("disk-s2.qcow2");
    let o = export(&args![
        "--format",
        "qcow2",
        "--from",
        "s1",
        &pool.members[0],
        "s2",
        IMG,
        &out
    ]);
    eprintln!("over a corrupted base: {}", text(&o).trim());
    assert_refused(&o, &["corrupt", "delta"], "export over a corrupted base");
    let o = export(&args!["--format", "raw", &pool.members[0], "s1", IMG, &out]);
    assert_refused(&o, &["corrupt", "delta"], "export of a corrupted snapshot");
    let left: Vec<_> = fs::read_dir(pool.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("disk-s2"))
        .collect();
    assert!(left.is_empty(), "a failed export left {left:?}");
}
