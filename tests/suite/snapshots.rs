//! Snapshots on a real mount: the `.snapshots` directory (hidden or visible),
//! browsing a snapshot with real tools (cmp, diff, qemu-img, cp --sparse, du,
//! tar, SEEK_DATA/SEEK_HOLE), read-only semantics, the kinds and their chain
//! under deletion, restore, clone, prune, writers during creation (fio and a
//! point-in-time checker), a crash during the background capture and a
//! corrupted delta.
//!
//! Every external program runs under coreutils `timeout` (see common).

use crate::common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `vpool snapshot ARGS...`.
fn snap(a: &[OsString]) -> Output {
    let mut v: Vec<OsString> = vec!["snapshot".into()];
    v.extend(a.iter().cloned());
    vpool(&v)
}

/// `vpool snapshot ARGS...`, asserting success.
fn snap_ok(a: &[OsString]) -> Output {
    let mut v: Vec<OsString> = vec!["snapshot".into()];
    v.extend(a.iter().cloned());
    vpool_ok(&v)
}

/// `vpool snapshot list --json TARGET`.
fn list(target: &Path) -> Vec<serde_json::Value> {
    let o = snap_ok(&args!["list", "--json", target]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("snapshot list --json: invalid JSON ({e})\n{}", describe(&o)));
    v.as_array()
        .unwrap_or_else(|| panic!("snapshot list --json is not an array: {v}"))
        .clone()
}

fn names(target: &Path) -> Vec<String> {
    list(target)
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn info(target: &Path, name: &str) -> serde_json::Value {
    let l = list(target);
    l.iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("snapshot {name} not listed: {l:?}"))
}

/// Waits until `name` is no longer pending; returns its entry.
fn wait_settled(target: &Path, name: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(120), || {
        last = info(target, name);
        last["state"] != "pending"
    });
    assert!(ok, "snapshot {name} still pending after 120 s: {last}");
    last
}

fn assert_complete(i: &serde_json::Value) {
    assert_eq!(i["state"], "complete", "snapshot not complete: {i}");
}

fn cmp_ok(a: &Path, b: &Path) {
    run_ok("cmp", &args![a, b]);
}

/// `diff -r --no-dereference A B`: same tree, same file contents, same
/// symlink targets.
fn diff_tree(a: &Path, b: &Path) {
    run_ok("diff", &args!["-r", "--no-dereference", a, b]);
}

/// `cp -a --sparse=always SRC/. DST` (DST created).
fn save_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    run_ok("cp", &args!["-a", "--sparse=always", src.join("."), dst]);
}

/// Data segments of a file by SEEK_DATA / SEEK_HOLE.
fn data_map(p: &Path) -> Vec<(u64, u64)> {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {p:?}: {e}"));
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let d = match lseek(&f, off as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(e) if errno(&e) == libc::ENXIO => break,
            Err(e) => panic!("SEEK_DATA {off} in {p:?}: {e}"),
        };
        let h = lseek(&f, d as i64, libc::SEEK_HOLE)
            .unwrap_or_else(|e| panic!("SEEK_HOLE {d} in {p:?}: {e}")) as u64;
        assert!(h > d, "SEEK_HOLE {h} not after SEEK_DATA {d} in {p:?}");
        out.push((d, h));
        off = h;
    }
    out
}

/// The attributes a snapshot must keep.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
}

fn meta(p: &Path) -> Meta {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {p:?}: {e}"));
    Meta {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
    }
}

#[track_caller]
fn expect_errno<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {want}, got success ({v:?})"),
        Err(e) => assert_eq!(
            errno(&e),
            want,
            "{what}: expected errno {want} ({}), got {e}",
            io::Error::from_raw_os_error(want)
        ),
    }
}

fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let t = UNIX_EPOCH + Duration::new(secs, nanos);
    File::open(p)
        .and_then(|f| f.set_modified(t))
        .unwrap_or_else(|e| panic!("set mtime of {p:?}: {e}"));
}

fn write_at(p: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"));
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write {p:?} at {off}: {e}"));
    f.sync_all().unwrap();
}

/// Calls `f` with `p` as a NUL-terminated C string, valid during the call
/// (what the unsafe libc calls passed as `f` rely on).
fn libc_path_call(p: &Path, f: impl FnOnce(*const libc::c_char) -> libc::c_int) -> io::Result<()> {
    let c = cstr(p);
    cvt(f(c.as_ptr())).map(|_| ())
}

fn setxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    libc_path_call(p, |c| unsafe {
        libc::setxattr(
            c,
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    })
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings.
    libc_path_call(p, |c| unsafe { libc::removexattr(c, n.as_ptr()) })
}

fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let n = std::ffi::CString::new(name).unwrap();
    let c = cstr(p);
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings, buffer of the given length.
    let r = unsafe {
        libc::getxattr(
            c.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `ls -a DIR` as a set of names.
fn ls_a(dir: &Path) -> BTreeSet<String> {
    let o = run_ok("ls", &args!["-a", dir]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Reads `len` bytes at `off` with one pread.
fn pread(f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

// ---------------------------------------------------------------------------
// 1. Hidden or visible
// ---------------------------------------------------------------------------

#[test]
fn snapdir_hidden_by_default_visible_with_option() {
    let pool = Pool::new(1, &[]);
    for visible in [false, true] {
        let m = if visible {
            pool.mount_opts(&["snapdir=visible"])
        } else {
            pool.mount()
        };
        if !visible {
            fs::write(m.join("f"), b"hello").unwrap();
            snap_ok(&args!["create", "--wait", m.path(), "s1"]);
        }
        let names = ls_a(m.path());
        assert!(names.contains("f"), "ls -a {:?}: {names:?}", m.path());
        assert_eq!(
            names.contains(".snapshots"),
            visible,
            "ls -a with snapdir={}: {names:?}",
            if visible { "visible" } else { "hidden" }
        );
        let listed: Vec<_> = fs::read_dir(m.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            listed.iter().any(|n| n == ".snapshots"),
            visible,
            "readdir: {listed:?}"
        );
        // Reachable by name either way.
        let st = fs::metadata(m.join(".snapshots")).expect("stat .snapshots");
        assert!(st.is_dir());
        assert_eq!(st.mode() & 0o7777, 0o555, "mode of .snapshots");
        let o = run_ok(
            "sh",
            &args![
                "-c",
                "cd \"$1/.snapshots\" && pwd && ls -a && cd s1 && pwd && cat f",
                "sh",
                m.path()
            ],
        );
        let t = String::from_utf8_lossy(&o.stdout).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            m.join(".snapshots").to_str().unwrap(),
            "pwd in .snapshots: {t}"
        );
        assert!(lines.contains(&"s1"), "ls -a in .snapshots: {t}");
        assert!(t.ends_with("hello"), "cat in snapshot: {t}");
        assert!(
            fs::metadata(m.join(".snapshots/s1")).unwrap().is_dir(),
            "stat .snapshots/s1"
        );
        // `..` of .snapshots is the root.
        assert_eq!(
            fs::metadata(m.join(".snapshots/..")).unwrap().ino(),
            fs::metadata(m.path()).unwrap().ino()
        );
        m.unmount();
    }
    // Read-only mount: browsable, but no snapshot can be made or deleted.
    let m = pool.mount_opts(&["ro"]);
    assert_eq!(read_all(&m.join(".snapshots/s1/f")), b"hello");
    let o = snap(&args!["create", m.path(), "s2"]);
    assert_refused(&o, &["read-only"], "snapshot create on a read-only mount");
    expect_errno(
        fs::create_dir(m.join(".snapshots/s2")),
        libc::EROFS,
        "mkdir .snapshots/s2 on a read-only mount",
    );
    expect_errno(
        fs::remove_dir(m.join(".snapshots/s1")),
        libc::EROFS,
        "rmdir .snapshots/s1 on a read-only mount",
    );
    let o = snap(&args!["delete", m.path(), "s1"]);
    assert_refused(&o, &["read-only"], "snapshot delete on a read-only mount");
    assert_eq!(names(m.path()), ["s1"]);
    m.unmount();
    pool.assert_check_clean();
}

// ---------------------------------------------------------------------------
// 2. Browsing with real tools
// ---------------------------------------------------------------------------

#[test]
fn browse_snapshot_with_real_tools() {
    let pool = Pool::new(2, &["--extent-size", "16M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();

    // --- the tree ---
    fs::create_dir_all(m.join("d1/d2")).unwrap();
    fs::write(m.join("d1/small.txt"), b"small text file\n").unwrap();
    fs::write(m.join("d1/d2/deep.bin"), pattern(20, 300_000)).unwrap();
    let img = m.join("img.raw");
    {
        let f = File::create(&img).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&pattern(21, 64 * KIB as usize), 0).unwrap();
        f.write_all_at(&pattern(22, 100_000), 5 * MIB + 123)
            .unwrap();
        // Across the 16 MiB extent boundary.
        f.write_all_at(&pattern(23, 8192), 16 * MIB - 4096).unwrap();
        // Written zeros: allocated, not a hole.
        f.write_all_at(&vec![0u8; 4096], 30 * MIB).unwrap();
        f.write_all_at(&pattern(24, MIB as usize), 40 * MIB)
            .unwrap();
        f.write_all_at(&pattern(25, 5000), 64 * MIB - 5000).unwrap();
        f.sync_all().unwrap();
    }
    let qcow = m.join("vm.qcow2");
    run_ok("qemu-img", &args!["create", "-f", "qcow2", &qcow, "64M"]);
    run_ok(
        "qemu-io",
        &args!["-f", "qcow2", "-c", "write -P 0x5a 1M 2M", &qcow],
    );
    std::os::unix::fs::symlink("d1/small.txt", m.join("link")).unwrap();
    std::os::unix::fs::symlink("../img.raw", m.join("d1/rel-link")).unwrap();
    fs::hard_link(m.join("d1/small.txt"), m.join("d1/hard")).unwrap();
    // Modes, owners, times.
    fs::set_permissions(m.join("d1/small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.join("d1/small.txt"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(m.join("d1/d2"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(m.join("d1/d2"), Some(4321), Some(8765)).unwrap();
    fs::set_permissions(&img, fs::Permissions::from_mode(0o600)).unwrap();
    set_mtime(&img, 1_600_000_000, 123_456_789);
    set_mtime(&m.join("d1/small.txt"), 1_500_000_000, 5);
    set_mtime(&m.join("d1/d2/deep.bin"), 1_400_000_000, 0);
    set_mtime(&m.join("d1/d2"), 1_300_000_000, 999_999_999);
    set_mtime(&m.join("d1"), 1_200_000_000, 0);

    let paths = [
        "",
        "d1",
        "d1/d2",
        "d1/small.txt",
        "d1/hard",
        "d1/d2/deep.bin",
        "d1/rel-link",
        "img.raw",
        "vm.qcow2",
        "link",
    ];
    let files = ["d1/small.txt", "d1/d2/deep.bin", "img.raw", "vm.qcow2"];
    let metas: Vec<Meta> = paths.iter().map(|p| meta(&m.join(p))).collect();
    let maps: Vec<Vec<(u64, u64)>> = files.iter().map(|p| data_map(&m.join(p))).collect();
    // st_blocks settles once the data is durable: until then the member
    // filesystem counts delayed-allocation reservations, which can differ
    // by a block from what it allocates at the flush (and a snapshot is
    // taken after one).
    for p in files {
        File::open(m.join(p)).unwrap().sync_all().unwrap();
    }
    let blocks: Vec<u64> = files
        .iter()
        .map(|p| fs::metadata(m.join(p)).unwrap().blocks())
        .collect();
    let saved = pool.scratch("saved");
    save_tree(&mnt, &saved);
    assert!(
        !saved.join(".snapshots").exists(),
        "cp -a copied the hidden .snapshots"
    );

    snap_ok(&args!["create", "--wait", &mnt, "s1"]);
    assert_complete(&info(&mnt, "s1"));

    // --- change everything ---
    {
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&pattern(31, 64 * KIB as usize), 0).unwrap();
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            40 * MIB,
            MIB,
        )
        .unwrap();
        f.write_all_at(&pattern(32, MIB as usize), 50 * MIB)
            .unwrap();
        f.set_len(80 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    {
        use std::io::Write;
        let mut f = OpenOptions::new()
            .append(true)
            .open(m.join("d1/small.txt"))
            .unwrap();
        f.write_all(b"appended\n").unwrap();
    }
    fs::set_permissions(m.join("d1/small.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(m.join("d1/small.txt"), Some(0), Some(0)).unwrap();
    fs::remove_file(m.join("d1/d2/deep.bin")).unwrap();
    fs::rename(m.join("d1/d2"), m.join("d1/d2x")).unwrap();
    fs::set_permissions(m.join("d1"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(m.join("link")).unwrap();
    std::os::unix::fs::symlink("img.raw", m.join("link")).unwrap();
    fs::remove_file(m.join("d1/rel-link")).unwrap();
    run_ok(
        "qemu-io",
        &args![
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1536k 1M",
            "-c",
            "write -P 0x22 20M 1M",
            &qcow
        ],
    );
    fs::write(m.join("newfile"), b"new").unwrap();

    // --- the snapshot is what the tree was ---
    let s = m.join(".snapshots/s1");
    diff_tree(&s, &saved);
    for f in files {
        cmp_ok(&s.join(f), &saved.join(f));
    }
    assert!(!s.join("newfile").exists(), "file created later is in s1");
    // qemu-img
    let o = run_ok(
        "qemu-img",
        &args!["info", "--output=json", s.join("vm.qcow2")],
    );
    let qi: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(qi["format"], "qcow2", "qemu-img info: {qi}");
    assert_eq!(qi["virtual-size"], 64 * MIB, "qemu-img info: {qi}");
    run_ok("qemu-img", &args!["check", s.join("vm.qcow2")]);
    run_ok(
        "qemu-img",
        &args!["compare", s.join("vm.qcow2"), saved.join("vm.qcow2")],
    );
    let o = run("qemu-img", &args!["compare", s.join("vm.qcow2"), &qcow]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "qemu-img compare of the snapshot with the changed image should differ\n{}",
        describe(&o)
    );
    run_ok(
        "qemu-io",
        &args![
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 1M 2M",
            "-c",
            "read -P 0 3M 1M",
            s.join("vm.qcow2")
        ],
    );
    // cp --sparse=always out of the snapshot keeps the holes.
    let out = pool.scratch("out.raw");
    run_ok("cp", &args!["--sparse=always", s.join("img.raw"), &out]);
    cmp_ok(&out, &saved.join("img.raw"));
    let (a, b) = (alloc_bytes(&out), alloc_bytes(&saved.join("img.raw")));
    assert!(
        a.abs_diff(b) <= b / 20 + 64 * KIB,
        "du of a sparse copy out of the snapshot ({a}) vs of the original ({b})"
    );
    assert!(a < 8 * MIB, "sparse copy not sparse: {a} bytes allocated");
    // Holes, allocation, attributes, links.
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            data_map(&s.join(f)),
            maps[i],
            "SEEK_DATA/SEEK_HOLE map of {f} in the snapshot vs the original"
        );
        // The snapshot counts the blocks it maps: exactly the 4 KiB blocks
        // the original's data map covered. The live count is the member
        // filesystem's, which also charges its own mapping blocks to the
        // file (ext4: extent-tree blocks once an extent file has more than 4
        // extents, as fragmented free space makes it), so it may be larger.
        let snap = fs::metadata(s.join(f)).unwrap().blocks();
        let mapped: u64 = maps[i]
            .iter()
            .map(|&(d, h)| (h.next_multiple_of(4096) - d / 4096 * 4096) / 512)
            .sum();
        assert!(
            snap == mapped && snap <= blocks[i],
            "st_blocks of {f} in the snapshot ({snap}) vs its data map ({mapped}) \
             and the original's at snapshot time ({})",
            blocks[i]
        );
    }
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(meta(&s.join(p)), metas[i], "attributes of {p:?} in s1");
    }
    assert_eq!(
        fs::read_link(s.join("link")).unwrap(),
        PathBuf::from("d1/small.txt")
    );
    // A hard link is one inode in the snapshot too.
    let (a, b) = (
        fs::metadata(s.join("d1/small.txt")).unwrap(),
        fs::metadata(s.join("d1/hard")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard link in s1");
    assert_eq!(
        fs::read_link(s.join("d1/rel-link")).unwrap(),
        PathBuf::from("../img.raw")
    );
    assert_same(
        &read_all(&s.join("d1/rel-link")),
        &read_all(&saved.join("img.raw")),
        "follow rel-link in s1",
    );
    // tar sees everything.
    let o = run_ok(
        "bash",
        &args![
            "-c",
            "set -o pipefail; tar cf - -C \"$1\" . | tar tf -",
            "bash",
            &s
        ],
    );
    let listed: BTreeSet<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .collect();
    let want: BTreeSet<String> = paths.iter().map(|p| p.to_string()).collect();
    assert_eq!(listed, want, "tar listing of the snapshot");
    drop(m);
    pool.assert_check_clean();
}

/// Preallocated ranges (`fallocate` without PUNCH_HOLE, as qemu-img's
/// `preallocation=falloc` does: allocated, reading as zeros) count in the live
/// file's st_blocks; a snapshot should keep them as allocated zeros (the
/// delta's zero entries), not turn them into holes.
#[test]
fn snapshot_keeps_preallocated_ranges_allocated() {
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    let img = m.join("img");
    {
        let f = File::create(&img).unwrap();
        f.set_len(64 * MIB).unwrap();
        fallocate(&f, 0, 8 * MIB, MIB).unwrap();
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 20 * MIB, 256 * KIB).unwrap();
        f.write_all_at(b"abc", 30 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    // Preallocated to the end of the file, like `fallocate -l 4M`.
    let fal = m.join("fal");
    fallocate(&File::create(&fal).unwrap(), 0, 0, 4 * MIB).unwrap();
    let pre = m.join("pre.raw");
    run_ok(
        "qemu-img",
        &args![
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=falloc",
            &pre,
            "4M"
        ],
    );
    let blocks = |p: &Path| fs::metadata(p).unwrap().blocks();
    let live = (blocks(&img), blocks(&pre), blocks(&fal));
    assert!(
        live.0 * 512 >= MIB + 256 * KIB,
        "fallocate did not allocate: {live:?}"
    );
    assert!(
        live.1 * 512 >= 4 * MIB,
        "preallocation=falloc did not allocate: {live:?}"
    );
    snap_ok(&args!["create", "--wait", m.path(), "s1"]);
    let s = m.join(".snapshots/s1");
    cmp_ok(&s.join("img"), &img);
    cmp_ok(&s.join("pre.raw"), &pre);
    // (SEEK_DATA is not compared: ext4 reports unwritten ranges as holes,
    // while written zeros are data; a snapshot's zero entries are both.)
    // The snapshot counts exactly the blocks allocated above; the live count
    // may be larger by the member filesystem's own mapping blocks (ext4
    // extent-tree blocks of a fragmented extent file).
    let snap = (
        blocks(&s.join("img")),
        blocks(&s.join("pre.raw")),
        blocks(&s.join("fal")),
    );
    let allocated = (
        (MIB + 256 * KIB + 4 * KIB) / 512,
        4 * MIB / 512,
        4 * MIB / 512,
    );
    assert!(
        snap == allocated && snap.0 <= live.0 && snap.1 <= live.1 && snap.2 <= live.2,
        "st_blocks of preallocated files in the snapshot {snap:?} vs allocated \
         {allocated:?} and live at snapshot time {live:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Read-only, names, mkdir/rmdir
// ---------------------------------------------------------------------------

#[test]
fn snapshot_tree_is_read_only_and_mkdir_rmdir_manage_snapshots() {
    let pool = Pool::new(1, &[]);
    let m = pool.mount();
    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/f"), pattern(40, 10_000)).unwrap();
    fs::write(m.join("f"), pattern(41, 20_000)).unwrap();
    std::os::unix::fs::symlink("f", m.join("l")).unwrap();
    setxattr(&m.join("f"), "user.k", b"v").unwrap();
    // mkdir in .snapshots creates a snapshot.
    fs::create_dir(m.join(".snapshots/s1")).expect("mkdir .snapshots/s1");
    let i = wait_settled(m.path(), "s1");
    assert_complete(&i);
    let s = m.join(".snapshots/s1");
    assert_eq!(getxattr(&s.join("f"), "user.k").unwrap(), b"v");

    let rofs = libc::EROFS;
    // Writes and creation.
    expect_errno(
        OpenOptions::new().write(true).open(s.join("f")),
        rofs,
        "open for write",
    );
    expect_errno(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.join("d/f")),
        rofs,
        "open O_RDWR",
    );
    expect_errno(File::create(s.join("new")), rofs, "create");
    expect_errno(File::create(s.join("d/new")), rofs, "create in subdir");
    expect_errno(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(s.join("f")),
        rofs,
        "O_TRUNC an existing file",
    );
    expect_errno(
        fs::create_dir(s.join("nd")),
        rofs,
        "mkdir inside a snapshot",
    );
    expect_errno(
        fs::create_dir(s.join("d/nd")),
        rofs,
        "mkdir in a snapshot subdir",
    );
    expect_errno(
        std::os::unix::fs::symlink("x", s.join("sl")),
        rofs,
        "symlink",
    );
    expect_errno(fs::hard_link(s.join("f"), s.join("f2")), rofs, "link");
    expect_errno(
        fs::hard_link(s.join("f"), m.join("f-linked")),
        rofs,
        "link out of a snapshot",
    );
    // SAFETY (here and below): `c` is a valid NUL-terminated path.
    expect_errno(
        libc_path_call(&s.join("fifo"), |c| unsafe { libc::mkfifo(c, 0o644) }),
        rofs,
        "mkfifo",
    );
    // Renames, deletes.
    expect_errno(fs::rename(s.join("f"), s.join("g")), rofs, "rename");
    expect_errno(fs::rename(s.join("f"), m.join("g")), rofs, "rename out");
    expect_errno(fs::rename(m.join("f"), s.join("g")), rofs, "rename in");
    expect_errno(fs::remove_file(s.join("f")), rofs, "unlink");
    expect_errno(fs::remove_file(s.join("l")), rofs, "unlink symlink");
    expect_errno(fs::remove_dir(s.join("d")), rofs, "rmdir inside a snapshot");
    // Attributes.
    expect_errno(
        fs::set_permissions(s.join("f"), fs::Permissions::from_mode(0o600)),
        rofs,
        "chmod",
    );
    expect_errno(
        std::os::unix::fs::chown(s.join("f"), Some(1), Some(1)),
        rofs,
        "chown",
    );
    expect_errno(
        libc_path_call(&s.join("f"), |c| unsafe { libc::truncate(c, 5) }),
        rofs,
        "truncate",
    );
    expect_errno(
        libc_path_call(&s.join("f"), |c| unsafe {
            libc::utimes(c, std::ptr::null())
        }),
        rofs,
        "utime (now)",
    );
    expect_errno(
        File::open(s.join("f")).and_then(|f| f.set_modified(UNIX_EPOCH + Duration::from_secs(5))),
        rofs,
        "futimens",
    );
    expect_errno(
        fs::set_permissions(&s, fs::Permissions::from_mode(0o700)),
        rofs,
        "chmod of the snapshot root",
    );
    expect_errno(setxattr(&s.join("f"), "user.x", b"1"), rofs, "setxattr");
    expect_errno(removexattr(&s.join("f"), "user.k"), rofs, "removexattr");
    expect_errno(
        setxattr(&s, "user.x", b"1"),
        rofs,
        "setxattr on snapshot root",
    );
    // fallocate/write through a read-only descriptor are refused by the kernel
    // (EBADF); what matters is that the snapshot is unchanged.
    assert_same(
        &read_all(&s.join("f")),
        &pattern(41, 20_000),
        "s1/f after attempts",
    );
    assert_same(
        &read_all(&s.join("d/f")),
        &pattern(40, 10_000),
        "s1/d/f after attempts",
    );
    assert_eq!(
        fs::symlink_metadata(s.join("f")).unwrap().mode() & 0o7777,
        0o644
    );
    // .snapshots itself: no files, no attribute changes.
    expect_errno(
        File::create(m.join(".snapshots/file")),
        rofs,
        "create a file in .snapshots",
    );
    expect_errno(
        std::os::unix::fs::symlink("x", m.join(".snapshots/sl")),
        rofs,
        "symlink in .snapshots",
    );
    expect_errno(
        fs::set_permissions(m.join(".snapshots"), fs::Permissions::from_mode(0o777)),
        rofs,
        "chmod .snapshots",
    );
    expect_errno(
        fs::rename(m.join(".snapshots/s1"), m.join(".snapshots/s9")),
        rofs,
        "rename a snapshot",
    );
    // The live tree is untouched by all this.
    assert!(!m.join("g").exists() && !m.join("f-linked").exists());

    // Names.
    expect_errno(
        fs::create_dir(m.join(".snapshots/.x")),
        libc::EINVAL,
        "mkdir .snapshots/.x",
    );
    expect_errno(
        fs::create_dir(m.join(".snapshots/..")),
        libc::EEXIST,
        "mkdir .snapshots/.. (the kernel answers)",
    );
    expect_errno(
        fs::create_dir(m.join(".snapshots/s1")),
        libc::EEXIST,
        "mkdir of an existing snapshot",
    );
    fs::create_dir(m.join(".snapshots/a..b")).expect("mkdir .snapshots/a..b");
    for bad in [".x", "..", "a/b", ""] {
        let o = snap(&args!["create", m.path(), bad]);
        assert_refused(
            &o,
            &["invalid", "name"],
            &format!("snapshot create {bad:?}"),
        );
    }
    let o = snap(&args!["create", m.path(), "s1"]);
    assert_refused(
        &o,
        &["already exists"],
        "snapshot create of an existing name",
    );
    snap_ok(&args!["create", m.path(), "x..y"]);
    let want: BTreeSet<String> = ["s1", "a..b", "x..y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let got: BTreeSet<String> = names(m.path()).into_iter().collect();
    assert_eq!(got, want, "snapshot list after mkdir and create");
    let seen: BTreeSet<String> = fs::read_dir(m.join(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(seen, want, "readdir .snapshots");
    for n in &want {
        wait_settled(m.path(), n);
        assert_same(
            &read_all(&m.join(".snapshots").join(n).join("f")),
            &pattern(41, 20_000),
            n,
        );
    }
    // rmdir deletes.
    fs::remove_dir(m.join(".snapshots/a..b")).expect("rmdir .snapshots/a..b");
    expect_errno(
        fs::remove_dir(m.join(".snapshots/nosuch")),
        libc::ENOENT,
        "rmdir of a missing snapshot",
    );
    let got: BTreeSet<String> = names(m.path()).into_iter().collect();
    assert_eq!(
        got,
        ["s1", "x..y"].iter().map(|s| s.to_string()).collect(),
        "snapshot list after rmdir"
    );
    assert!(!m.join(".snapshots/a..b").exists());
    fs::remove_dir(m.join(".snapshots/s1")).expect("rmdir .snapshots/s1");
    assert_eq!(names(m.path()), vec!["x..y".to_string()]);
    assert_same(
        &read_all(&m.join(".snapshots/x..y/d/f")),
        &pattern(40, 10_000),
        "x..y after deleting the others",
    );
    m.unmount();
    pool.assert_check_clean();
}

// ---------------------------------------------------------------------------
// 4. Kinds and the chain under deletion
// ---------------------------------------------------------------------------

#[test]
fn kinds_chain_and_deletion_in_every_position() {
    let pool = Pool::new(2, &["--extent-size", "4M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    let saved = |n: &str| pool.scratch(&format!("saved-{n}"));
    let create = |kind: &str, name: &str| {
        snap_ok(&args!["create", "--kind", kind, "--wait", &mnt, name]);
        save_tree(&mnt, &saved(name));
    };
    let data = m.join("data");
    fs::write(&data, pattern(50, 24 * MIB as usize)).unwrap();
    fs::write(m.join("small"), pattern(51, 100 * KIB as usize)).unwrap();
    create("full", "F");

    write_at(&data, MIB, &pattern(52, 64 * KIB as usize));
    fs::write(m.join("new1"), pattern(53, 200 * KIB as usize)).unwrap();
    create("incremental", "I1");

    write_at(&data, 9 * MIB + 100, &pattern(54, 128 * KIB as usize));
    File::options()
        .write(true)
        .open(m.join("small"))
        .unwrap()
        .set_len(50 * KIB)
        .unwrap();
    create("differential", "D1");

    {
        let f = OpenOptions::new().write(true).open(&data).unwrap();
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            16 * MIB,
            256 * KIB,
        )
        .unwrap();
    }
    fs::remove_file(m.join("new1")).unwrap();
    create("incremental", "I2");

    write_at(&data, 0, &pattern(55, 4096));
    write_at(&data, 24 * MIB + 3 * KIB, &pattern(56, 70_000));
    create("incremental", "I3");

    let l = list(&mnt);
    let want = [
        ("F", "full", None),
        ("I1", "incremental", Some("F")),
        ("D1", "differential", Some("F")),
        ("I2", "incremental", Some("D1")),
        ("I3", "incremental", Some("I2")),
    ];
    assert_eq!(l.len(), want.len(), "{l:?}");
    for (n, kind, base) in want {
        let i = l.iter().find(|i| i["name"] == n).unwrap();
        assert_complete(i);
        assert_eq!(i["kind"], kind, "kind of {n}: {i}");
        assert_eq!(i["base"].as_str(), base, "base of {n}: {i}");
    }
    let stored = |n: &str| {
        l.iter().find(|i| i["name"] == n).unwrap()["stored_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        stored("F") > 20 * MIB,
        "full stored_bytes {} for 24 MiB of random data",
        stored("F")
    );
    assert!(
        stored("I1") * 10 < stored("F"),
        "incremental stored {} vs full {}",
        stored("I1"),
        stored("F")
    );
    assert!(
        stored("I3") < MIB,
        "incremental of 74 KiB changed stored {}",
        stored("I3")
    );
    // The differential holds everything since F (I1's change as well).
    assert!(
        stored("D1") >= stored("I1"),
        "differential {} < incremental {}",
        stored("D1"),
        stored("I1")
    );

    let check_all = |alive: &[&str]| {
        let mut got = names(&mnt);
        got.sort();
        let mut want: Vec<String> = alive.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "snapshots left");
        for n in alive {
            diff_tree(&m.join(".snapshots").join(n), &saved(n));
            cmp_ok(
                &m.join(".snapshots").join(n).join("data"),
                &saved(n).join("data"),
            );
        }
        for i in list(&mnt) {
            assert_complete(&i);
            if let Some(b) = i["base"].as_str() {
                assert!(
                    alive.contains(&b),
                    "base {b} of {} was deleted: {i}",
                    i["name"]
                );
            } else {
                assert_eq!(i["kind"], "full", "a snapshot without base: {i}");
            }
        }
    };
    check_all(&["F", "I1", "D1", "I2", "I3"]);
    // The kernel has the deleted snapshot's entry cached (check_all looked
    // it up): a deletion through the CLI must drop it at once.
    let gone = |n: &str| {
        let p = m.join(".snapshots").join(n);
        assert!(
            fs::symlink_metadata(&p).is_err(),
            "{p:?} still there after vpool snapshot delete"
        );
    };
    // Oldest (the full everything hangs on).
    snap_ok(&args!["delete", &mnt, "F"]);
    gone("F");
    check_all(&["I1", "D1", "I2", "I3"]);
    assert_eq!(info(&mnt, "I1")["kind"], "full", "I1 after its base went");
    // Middle.
    snap_ok(&args!["delete", &mnt, "I2"]);
    gone("I2");
    check_all(&["I1", "D1", "I3"]);
    assert_eq!(info(&mnt, "I3")["base"], "D1");
    // Newest.
    snap_ok(&args!["delete", &mnt, "I3"]);
    gone("I3");
    check_all(&["I1", "D1"]);
    // The changes I3 held are still seen by the next incremental.
    write_at(&data, 2 * MIB, &pattern(57, 8192));
    snap_ok(&args!["create", "--wait", &mnt, "I4"]);
    save_tree(&mnt, &saved("I4"));
    let i4 = info(&mnt, "I4");
    assert_eq!(i4["kind"], "incremental", "{i4}");
    assert_eq!(i4["base"], "D1", "{i4}");
    check_all(&["I1", "D1", "I4"]);
    let o = snap(&args!["delete", &mnt, "nosuch"]);
    assert_refused(&o, &["no such snapshot"], "delete of a missing snapshot");
    m.unmount();
    pool.assert_check_clean();
    let m = pool.mount();
    for n in ["I1", "D1", "I4"] {
        diff_tree(&m.join(".snapshots").join(n), &saved(n));
    }
}

// ---------------------------------------------------------------------------
// 5. Restore and clone
// ---------------------------------------------------------------------------

#[test]
fn restore_and_clone_by_relative_and_absolute_path() {
    let pool = Pool::new(2, &["--extent-size", "1M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    fs::create_dir(m.join("sub")).unwrap();
    fs::write(m.join("a"), pattern(60, 4 * MIB as usize + 5)).unwrap();
    fs::write(m.join("sub/b"), pattern(61, MIB as usize)).unwrap();
    fs::write(m.join("sub/c"), pattern(62, 300_000)).unwrap();
    fs::set_permissions(m.join("sub/b"), fs::Permissions::from_mode(0o640)).unwrap();
    snap_ok(&args!["create", "--wait", &mnt, "s1"]);
    let saved = pool.scratch("saved");
    save_tree(&mnt, &saved);
    let s = m.join(".snapshots/s1");

    let mess_up = || {
        write_at(&m.join("a"), 64 * KIB, &pattern(63, 64 * KIB as usize));
        write_at(&m.join("a"), 5 * MIB, b"tail beyond the old size");
        write_at(&m.join("sub/b"), 4096, &pattern(64, 10_000));
        File::options()
            .write(true)
            .open(m.join("sub/b"))
            .unwrap()
            .set_len(200_000)
            .unwrap();
        fs::set_permissions(m.join("sub/b"), fs::Permissions::from_mode(0o600)).unwrap();
        if m.join("sub/c").exists() {
            fs::remove_file(m.join("sub/c")).unwrap();
        }
        // Read everything once so the kernel caches the new content.
        let _ = read_all(&m.join("a"));
        let _ = read_all(&m.join("sub/b"));
        assert!(!m.join("sub/c").exists());
    };
    mess_up();
    // Content, size, mode, owner and mtime as in the snapshot, seen through
    // the mount (the kernel caches size and mtime with the writeback cache).
    let restored = |f: &str| {
        cmp_ok(&m.join(f), &s.join(f));
        cmp_ok(&m.join(f), &saved.join(f));
        assert_eq!(
            meta(&m.join(f)),
            meta(&s.join(f)),
            "attributes of restored {f}"
        );
    };
    // Pool-relative path (the file had grown).
    snap_ok(&args!["restore", &mnt, "s1", "a"]);
    restored("a");
    // Absolute path under the mountpoint (the file had shrunk).
    snap_ok(&args!["restore", &mnt, "s1", m.join("sub/b")]);
    restored("sub/b");
    assert_eq!(
        fs::metadata(m.join("sub/b")).unwrap().mode() & 0o7777,
        0o640,
        "mode restored"
    );
    // A deleted file is re-created (and visible at once despite the
    // negative lookup just made).
    snap_ok(&args!["restore", &mnt, "s1", "sub/c"]);
    restored("sub/c");
    // Everything.
    mess_up();
    fs::write(m.join("later"), b"created after s1").unwrap();
    let o = snap_ok(&args!["restore", &mnt, "s1"]);
    assert!(
        text(&o).contains("restored 3 file(s)"),
        "restore of everything\n{}",
        describe(&o)
    );
    for f in ["a", "sub/b", "sub/c"] {
        restored(f);
    }
    diff_tree(&s, &saved);
    // A directory restores what is below it.
    mess_up();
    snap_ok(&args!["restore", &mnt, "s1", "sub"]);
    restored("sub/b");
    restored("sub/c");
    snap_ok(&args!["restore", &mnt, "s1", "a"]);
    // Restore of something the snapshot does not have, or outside the mount.
    let o = snap(&args!["restore", &mnt, "s1", "later"]);
    assert_refused(
        &o,
        &["no such"],
        "restore of a path missing in the snapshot",
    );
    let o = snap(&args!["restore", &mnt, "s1", pool.scratch("saved/a")]);
    assert_refused(
        &o,
        &["not under the mountpoint"],
        "restore of a path outside",
    );

    // Clone: relative and absolute.
    assert!(!m.join("a-clone").exists());
    snap_ok(&args!["clone", &mnt, "s1", "a", "a-clone"]);
    cmp_ok(&m.join("a-clone"), &saved.join("a"));
    snap_ok(&args![
        "clone",
        &mnt,
        "s1",
        m.join("sub/c"),
        m.join("sub/c-clone")
    ]);
    cmp_ok(&m.join("sub/c-clone"), &saved.join("sub/c"));
    // Holes stay holes in the clone.
    assert_eq!(data_map(&m.join("a-clone")), data_map(&s.join("a")));
    // The clone is writable and independent of the snapshot.
    write_at(&m.join("a-clone"), 0, b"changed clone");
    cmp_ok(&s.join("a"), &saved.join("a"));
    // Existing NEWPATH: refused, nothing changed.
    let before = read_all(&m.join("a-clone"));
    let o = snap(&args!["clone", &mnt, "s1", "sub/b", "a-clone"]);
    assert_refused(&o, &["already exists"], "clone onto an existing file");
    assert!(
        text(&o).contains("a-clone"),
        "message names the path\n{}",
        describe(&o)
    );
    assert_eq!(
        read_all(&m.join("a-clone")),
        before,
        "existing file changed by a refused clone"
    );
    let o = snap(&args!["clone", &mnt, "s1", "sub", "sub-clone"]);
    assert!(
        !o.status.success(),
        "clone of a directory\n{}",
        describe(&o)
    );
    let o = snap(&args!["clone", &mnt, "s1", "a", "nodir/a"]);
    assert!(
        !o.status.success(),
        "clone into a missing directory\n{}",
        describe(&o)
    );
    m.unmount();
    pool.assert_check_clean();
    let m = pool.mount();
    cmp_ok(&m.join("sub/c-clone"), &saved.join("sub/c"));
    cmp_ok(&m.join("sub/b"), &saved.join("sub/b"));
}

// ---------------------------------------------------------------------------
// 6. Prune
// ---------------------------------------------------------------------------

#[test]
fn prune_keep_last_dry_run_then_for_real() {
    let pool = Pool::new(1, &["--extent-size", "1M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    let f = m.join("f");
    fs::write(&f, pattern(70, 2 * MIB as usize)).unwrap();
    for i in 1..=6u64 {
        write_at(&f, i * 100_000, &pattern(70 + i, 5000));
        snap_ok(&args!["create", "--wait", &mnt, format!("p{i}")]);
        save_tree(&mnt, &pool.scratch(&format!("saved-p{i}")));
    }
    let o = snap(&args!["prune", &mnt]);
    assert_refused(&o, &["keep rule"], "prune without a rule");
    assert_eq!(names(&mnt).len(), 6);

    let o = snap_ok(&args!["prune", &mnt, "--keep-last", "2", "--dry-run"]);
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    for i in 1..=4 {
        assert!(
            t.contains(&format!("would delete p{i}")),
            "dry run output:\n{t}"
        );
    }
    assert!(
        !t.contains("p5") && !t.contains("p6"),
        "dry run output:\n{t}"
    );
    assert_eq!(names(&mnt).len(), 6, "dry run deleted something");

    for i in 1..=6 {
        assert!(m.join(format!(".snapshots/p{i}/f")).exists());
    }
    let o = snap_ok(&args!["prune", &mnt, "--keep-last", "2"]);
    for i in 1..=4 {
        let p = m.join(format!(".snapshots/p{i}"));
        assert!(
            fs::symlink_metadata(&p).is_err(),
            "{p:?} still there after prune"
        );
    }
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    for i in 1..=4 {
        assert!(t.contains(&format!("deleted p{i}")), "prune output:\n{t}");
    }
    let mut left = names(&mnt);
    left.sort();
    assert_eq!(left, ["p5", "p6"]);
    for n in ["p5", "p6"] {
        diff_tree(
            &m.join(".snapshots").join(n),
            &pool.scratch(&format!("saved-{n}")),
        );
    }
    m.unmount();
    pool.assert_check_clean();

    // The same commands on the unmounted pool, through a member directory.
    let member = pool.members[0].clone();
    let mut left = names(&member);
    left.sort();
    assert_eq!(left, ["p5", "p6"]);
    snap_ok(&args!["create", "--wait", &member, "offline"]);
    let o = snap_ok(&args!["prune", &member, "--keep-last", "2"]);
    assert!(text(&o).contains("deleted p5"), "{}", describe(&o));
    pool.assert_check_clean();
    let m = pool.mount();
    let mut left = names(m.path());
    left.sort();
    assert_eq!(left, ["offline", "p6"]);
    diff_tree(&m.join(".snapshots/p6"), &pool.scratch("saved-p6"));
    cmp_ok(&m.join(".snapshots/offline/f"), &m.join("f"));
}

// ---------------------------------------------------------------------------
// 7. Writers during snapshot creation
// ---------------------------------------------------------------------------

const BS: usize = 4096;
const NBLOCKS: u64 = 8192; // 32 MiB

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Block `idx` written as version `ver` (>= 1): header (idx, ver), then words
/// derived from both.
fn block_content(idx: u64, ver: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS);
    b.extend_from_slice(&idx.to_le_bytes());
    b.extend_from_slice(&ver.to_le_bytes());
    let mut i = 0u64;
    while b.len() < BS {
        b.extend_from_slice(&splitmix(idx << 40 ^ ver << 1 ^ i).to_le_bytes());
        i += 1;
    }
    b
}

/// The version a block holds (0 = never written), or a description of why
/// it is not a valid block at all.
fn block_version(idx: u64, b: &[u8]) -> Result<u64, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(0);
    }
    let got_idx = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let ver = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if got_idx != idx || ver == 0 {
        return Err(format!("header says block {got_idx} version {ver}"));
    }
    if b != block_content(idx, ver).as_slice() {
        return Err(format!("torn or mixed content (header version {ver})"));
    }
    Ok(ver)
}

#[test]
fn writes_during_snapshot_creation() {
    let pool = Pool::new(2, &["--extent-size", "16M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();

    // A checker: random 4 KiB blocks, each write a new version; the log
    // (index = sequence number) says what was written when.
    let blocks = m.join("blocks");
    File::create(&blocks)
        .unwrap()
        .set_len(NBLOCKS * BS as u64)
        .unwrap();
    let completed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (completed, stop, blocks) = (completed.clone(), stop.clone(), blocks.clone());
        thread::spawn(move || -> Vec<(u64, bool)> {
            let f = OpenOptions::new().write(true).open(&blocks).unwrap();
            let mut log = Vec::new();
            let mut x = 0x1234_5678_9abc_def1u64;
            while !stop.load(Ordering::SeqCst) {
                x = splitmix(x);
                let idx = x % NBLOCKS;
                let seq = log.len() as u64;
                // One operation in 16 punches the block (copy-before-write of
                // a punch), the others write a new version of it.
                let punch = (x >> 32).is_multiple_of(16);
                if punch {
                    fallocate(
                        &f,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        idx * BS as u64,
                        BS as u64,
                    )
                    .unwrap_or_else(|e| panic!("checker punch {seq}: {e}"));
                } else {
                    f.write_all_at(&block_content(idx, seq + 1), idx * BS as u64)
                        .unwrap_or_else(|e| panic!("checker write {seq}: {e}"));
                }
                log.push((idx, punch));
                completed.store(seq + 1, Ordering::SeqCst);
                if seq % 64 == 63 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            log
        })
    };

    let img = m.join("img");
    let fio_done = Arc::new(AtomicBool::new(false));
    let fio = {
        let (img, fio_done) = (img.clone(), fio_done.clone());
        thread::spawn(move || {
            let o = run_t(
                180,
                "fio",
                &args![
                    "--name=w",
                    format!("--filename={}", img.display()),
                    "--size=256M",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--ioengine=psync",
                    "--verify=crc32c",
                    "--verify_backlog=1024",
                    "--verify_fatal=1",
                    // No verify state file left in the working directory.
                    "--verify_state_save=0",
                    "--time_based",
                    "--runtime=8",
                ],
            );
            fio_done.store(true, Ordering::SeqCst);
            o
        })
    };
    // Snapshots while both write: (name, completed before, completed after).
    let mut snaps: Vec<(String, u64, u64)> = Vec::new();
    let started = Instant::now();
    // Wait for fio to have laid out its file.
    wait_until(Duration::from_secs(60), || {
        fs::metadata(&img)
            .map(|m| m.len() == 256 * MIB)
            .unwrap_or(false)
            || fio_done.load(Ordering::SeqCst)
    });
    while !fio_done.load(Ordering::SeqCst) && snaps.len() < 6 {
        let name = format!("w{}", snaps.len() + 1);
        let lo = completed.load(Ordering::SeqCst);
        let mut a = args!["create"];
        if snaps.len() % 2 == 1 {
            a.push("--wait".into());
        }
        a.extend(args![&mnt, &name]);
        snap_ok(&a);
        let hi = completed.load(Ordering::SeqCst);
        snaps.push((name, lo, hi));
        thread::sleep(Duration::from_millis(300));
    }
    let fio_out = fio.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let log = writer.join().expect("checker writer panicked");
    eprintln!(
        "{} snapshots during {:?}; checker made {} writes and punches",
        snaps.len(),
        started.elapsed(),
        log.len()
    );
    let t = text(&fio_out);
    assert!(
        fio_out.status.success() && t.contains("err= 0") && !t.contains("verify: bad"),
        "fio with verification failed while snapshots were taken\n{}",
        describe(&fio_out)
    );
    assert!(
        snaps.len() >= 2,
        "only {} snapshot(s) taken during fio",
        snaps.len()
    );

    // Per block, its operations: (sequence number, version it leaves; 0 =
    // zeros, after a punch or never written).
    let mut writes: Vec<Vec<(u64, u64)>> = vec![Vec::new(); NBLOCKS as usize];
    for (seq, (idx, punch)) in log.iter().enumerate() {
        let seq = seq as u64;
        writes[*idx as usize].push((seq, if *punch { 0 } else { seq + 1 }));
    }
    // Live: every block holds its last write.
    let live = read_all(&blocks);
    for b in 0..NBLOCKS {
        let want = writes[b as usize].last().map(|w| w.1).unwrap_or(0);
        let got = block_version(b, &live[b as usize * BS..(b as usize + 1) * BS])
            .unwrap_or_else(|e| panic!("live block {b}: {e}"));
        assert_eq!(got, want, "live block {b}");
    }
    // A snapshot holds, per block, the last write completed before the
    // command started or one that ran while it ran: one instant in between.
    let check_snap = |root: &Path, name: &str, lo: u64, hi: u64| {
        let data = read_all(&root.join(name).join("blocks"));
        assert_eq!(data.len(), NBLOCKS as usize * BS);
        for b in 0..NBLOCKS {
            let got = block_version(b, &data[b as usize * BS..(b as usize + 1) * BS])
                .unwrap_or_else(|e| panic!("snapshot {name} block {b}: {e}"));
            let w = &writes[b as usize];
            let before = w.iter().rev().find(|o| o.0 < lo).map(|o| o.1).unwrap_or(0);
            let ok = got == before || w.iter().any(|o| (lo..=hi).contains(&o.0) && o.1 == got);
            assert!(
                ok,
                "snapshot {name} block {b}: version {got}, but the last operation before the \
                 command left {before} and the command ran during operations {lo}..={hi}: \
                 {w:?}"
            );
        }
    };
    for (name, lo, hi) in &snaps {
        let i = wait_settled(&mnt, name);
        assert_complete(&i);
        check_snap(&m.join(".snapshots"), name, *lo, *hi);
        // fio's file reads in full.
        let mut f = File::open(m.join(".snapshots").join(name).join("img")).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        let mut total = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("read {name}/img at {total}: {e}"));
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert_eq!(total, 256 * MIB, "size of {name}/img");
    }
    m.unmount();
    pool.assert_check_clean();
    let m = pool.mount();
    for (name, lo, hi) in &snaps {
        check_snap(&m.join(".snapshots"), name, *lo, *hi);
    }
}

// ---------------------------------------------------------------------------
// 8. Crash during the background capture
// ---------------------------------------------------------------------------

const BIG_CHUNK: u64 = 8 * MIB;
const BIG_CHUNKS: u64 = 64; // 512 MiB

fn big_chunk(i: u64) -> Vec<u8> {
    pattern(1000 + i, BIG_CHUNK as usize)
}

/// Compares a 512 MiB file with `big_chunk`s.
fn check_big(p: &Path, what: &str) {
    let f = File::open(p).unwrap_or_else(|e| panic!("{what}: open {p:?}: {e}"));
    assert_eq!(
        f.metadata().unwrap().len(),
        BIG_CHUNK * BIG_CHUNKS,
        "{what}: size"
    );
    for i in 0..BIG_CHUNKS {
        let got = pread(&f, i * BIG_CHUNK, BIG_CHUNK as usize)
            .unwrap_or_else(|e| panic!("{what}: read chunk {i}: {e}"));
        assert_same(&got, &big_chunk(i), &format!("{what}, chunk {i}"));
    }
}

#[test]
fn crash_during_background_capture() {
    let pool = Pool::new(2, &[]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    {
        let f = File::create(m.join("big")).unwrap();
        for i in 0..BIG_CHUNKS {
            f.write_all_at(&big_chunk(i), i * BIG_CHUNK).unwrap();
        }
    }
    let o = snap_ok(&args!["create", "--kind", "full", &mnt, "s1"]);
    m.kill9();
    eprintln!("create said: {}", text(&o).trim());

    let o = pool.check();
    assert!(
        o.status.success(),
        "vpool check after a crash during capture\n{}",
        describe(&o)
    );
    let m = pool.mount();
    let i = info(&mnt, "s1");
    let state = i["state"].as_str().unwrap().to_string();
    eprintln!("s1 after the crash: {state}");
    if state == "complete" {
        check_big(
            &m.join(".snapshots/s1/big"),
            "s1 completed before the crash",
        );
    } else {
        assert!(state.starts_with("failed: "), "state of s1: {i}");
        assert!(
            !m.join(".snapshots/s1").exists(),
            "failed snapshot is browsable"
        );
        let id = i["id"].as_u64().unwrap();
        for mb in &pool.members {
            let d = mb.join("snap").join(id.to_string());
            let left: Vec<_> = fs::read_dir(&d)
                .map(|r| r.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "delta files of the failed s1 left: {left:?}"
            );
        }
    }
    // The data the snapshot command committed survived.
    check_big(&m.join("big"), "live file after the crash");
    snap_ok(&args!["create", "--kind", "full", "--wait", &mnt, "s2"]);
    let i2 = info(&mnt, "s2");
    assert_complete(&i2);
    assert_eq!(i2["kind"], "full");
    check_big(&m.join(".snapshots/s2/big"), "s2");

    // Again with an incremental: its changes must not be lost for the next
    // one whether it completes or fails.
    let changed = |i: u64| {
        if i.is_multiple_of(2) {
            pattern(5000 + i, BIG_CHUNK as usize)
        } else {
            big_chunk(i)
        }
    };
    {
        let f = OpenOptions::new().write(true).open(m.join("big")).unwrap();
        for i in (0..BIG_CHUNKS).step_by(2) {
            f.write_all_at(&changed(i), i * BIG_CHUNK).unwrap();
        }
    }
    let o = snap_ok(&args!["create", &mnt, "s3"]);
    assert!(text(&o).contains("incremental"), "{}", describe(&o));
    m.kill9();
    let o = pool.check();
    assert!(
        o.status.success(),
        "vpool check after the second crash\n{}",
        describe(&o)
    );
    let m = pool.mount();
    let s3 = info(&mnt, "s3");
    eprintln!("s3 after the crash: {}", s3["state"]);
    let check_changed = |p: &Path, what: &str| {
        let f = File::open(p).unwrap_or_else(|e| panic!("{what}: open {p:?}: {e}"));
        for i in 0..BIG_CHUNKS {
            let got = pread(&f, i * BIG_CHUNK, BIG_CHUNK as usize)
                .unwrap_or_else(|e| panic!("{what}: read chunk {i}: {e}"));
            assert_same(&got, &changed(i), &format!("{what}, chunk {i}"));
        }
    };
    if s3["state"] == "complete" {
        check_changed(
            &m.join(".snapshots/s3/big"),
            "s3 completed before the crash",
        );
    } else {
        assert!(
            s3["state"].as_str().unwrap().starts_with("failed: "),
            "{s3}"
        );
    }
    snap_ok(&args!["create", "--wait", &mnt, "s4"]);
    let s4 = info(&mnt, "s4");
    assert_complete(&s4);
    assert_eq!(s4["kind"], "incremental", "{s4}");
    check_changed(
        &m.join(".snapshots/s4/big"),
        "s4 after a crashed incremental",
    );
    check_big(&m.join(".snapshots/s2/big"), "s2 after the second crash");
    // Failed snapshots are deleted like any other.
    for n in ["s1", "s3"] {
        if info(&mnt, n)["state"] != "complete" {
            snap_ok(&args!["delete", &mnt, n]);
        }
    }
    m.unmount();
    let o = pool.check();
    assert!(
        o.status.success(),
        "vpool check at the end\n{}",
        describe(&o)
    );
}

// ---------------------------------------------------------------------------
// 9. A corrupted delta
// ---------------------------------------------------------------------------

/// `(first block, block count, frame offset, compressed length)` of the data
/// entries of a delta file.
fn delta_data_entries(d: &[u8]) -> Vec<(u64, u64, u64, u64)> {
    let u64_at = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as u64;
    assert_eq!(&d[0..8], b"VPOOLDLT", "delta header magic");
    let foot = d.len() - 40;
    assert_eq!(&d[foot..foot + 8], b"VPDLTEND", "delta footer magic");
    let index = u64_at(foot + 8) as usize;
    let count = u64_at(foot + 16) as usize;
    (0..count)
        .map(|k| index + 32 * k)
        .filter(|e| d[e + 12] == 0)
        .map(|e| (u64_at(e), u32_at(e + 8), u64_at(e + 16), u32_at(e + 24)))
        .collect()
}

#[test]
fn corrupted_delta_gives_eio_and_check_names_the_snapshot() {
    let pool = Pool::new(2, &["--extent-size", "4M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    let f1 = pattern(90, 8 * MIB as usize);
    let f2 = pattern(91, MIB as usize);
    fs::write(m.join("f1"), &f1).unwrap();
    fs::write(m.join("f2"), &f2).unwrap();
    let ino = fs::metadata(m.join("f1")).unwrap().ino();
    snap_ok(&args!["create", "--wait", &mnt, "s1"]);
    let id = info(&mnt, "s1")["id"].as_u64().unwrap();
    m.unmount();

    // The delta of f1 in s1 (one copy, on one of the members).
    let delta: PathBuf = pool
        .members
        .iter()
        .filter_map(|mb| fs::read_dir(mb.join("snap").join(id.to_string())).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with(&format!("{ino}.")) && n.ends_with(".vd")
        })
        .unwrap_or_else(|| panic!("no delta of inode {ino} for snapshot {id}"));
    let mut d = fs::read(&delta).unwrap();
    let bs = u32::from_le_bytes(d[48..52].try_into().unwrap()) as u64;
    let entries = delta_data_entries(&d);
    assert!(entries.len() > 4, "delta entries: {entries:?}");
    let (first, count, off, clen) = entries[entries.len() / 2];
    let flip = (off + clen / 2) as usize;
    d[flip] ^= 0x5a;
    fs::write(&delta, &d).unwrap();
    let bad = (first * bs, (first + count) * bs);
    eprintln!("flipped byte {flip} of {delta:?}: frame of file bytes {bad:?}");

    let o = pool.check();
    assert!(
        !o.status.success(),
        "vpool check missed a corrupted delta\n{}",
        describe(&o)
    );
    assert!(
        text(&o).contains("snapshot s1"),
        "vpool check should name the snapshot\n{}",
        describe(&o)
    );

    let m = pool.mount();
    let s = m.join(".snapshots/s1");
    {
        let f = File::open(s.join("f1")).unwrap();
        expect_errno(
            pread(&f, bad.0, 4096),
            libc::EIO,
            "read of the corrupted frame",
        );
        expect_errno(
            pread(&f, bad.1 - 4096, 4096),
            libc::EIO,
            "read of the corrupted frame's last block",
        );
        // Far from the damage, the same file reads right.
        assert!(bad.0 >= 2 * MIB && bad.1 + 2 * MIB <= 8 * MIB, "{bad:?}");
        let f = File::open(s.join("f1")).unwrap();
        let head = pread(&f, 0, MIB as usize).unwrap();
        assert_same(&head, &f1[..MIB as usize], "s1/f1 first MiB");
        let tail = pread(&f, 7 * MIB, MIB as usize).unwrap();
        assert_same(&tail, &f1[7 * MIB as usize..], "s1/f1 last MiB");
    }
    let o = run("cmp", &args![s.join("f1"), m.join("f1")]);
    assert!(
        !o.status.success() && text(&o).contains("Input/output error"),
        "cmp of the damaged snapshot file should fail with EIO\n{}",
        describe(&o)
    );
    assert_same(&read_all(&s.join("f2")), &f2, "s1/f2");
    assert_same(&read_all(&m.join("f1")), &f1, "live f1");
    assert!(
        pid_alive(m.pid.unwrap()),
        "daemon died on a corrupted delta"
    );
    assert_eq!(m.status()["mounted"], true);

    // An incremental on top reads f1 through s1: the same damage, nothing else.
    write_at(&m.join("f2"), 0, b"changed");
    snap_ok(&args!["create", "--wait", &mnt, "s2"]);
    {
        let f = File::open(m.join(".snapshots/s2/f1")).unwrap();
        expect_errno(
            pread(&f, bad.0, 4096),
            libc::EIO,
            "s2 reading the damaged base",
        );
        let head = pread(&f, 0, MIB as usize).unwrap();
        assert_same(&head, &f1[..MIB as usize], "s2/f1 first MiB");
    }
    // Deleting s1 would have to merge the damaged frame into s2: refused,
    // nothing changes.
    let o = snap(&args!["delete", &mnt, "s1"]);
    assert!(
        !o.status.success(),
        "delete of s1 merged a damaged frame\n{}",
        describe(&o)
    );
    let mut left = names(&mnt);
    left.sort();
    assert_eq!(left, ["s1", "s2"]);
    assert_same(
        &read_all(&m.join(".snapshots/s2/f2"))[..7],
        b"changed",
        "s2/f2 after the refused delete",
    );
    // Deleting the newest needs no merge; then s1 goes too.
    snap_ok(&args!["delete", &mnt, "s2"]);
    snap_ok(&args!["delete", &mnt, "s1"]);
    assert!(names(&mnt).is_empty());
    assert!(pid_alive(m.pid.unwrap()));
    m.unmount();
    pool.assert_check_clean();
}

#[test]
fn corrupted_delta_copy_is_served_by_the_other_copy() {
    let pool = Pool::new(2, &["--copies", "2", "--extent-size", "4M"]);
    let m = pool.mount();
    let f1 = pattern(95, 8 * MIB as usize);
    fs::write(m.join("f1"), &f1).unwrap();
    let ino = fs::metadata(m.join("f1")).unwrap().ino();
    snap_ok(&args!["create", "--wait", m.path(), "s1"]);
    let id = info(m.path(), "s1")["id"].as_u64().unwrap();
    m.unmount();

    let copies: Vec<PathBuf> = pool
        .members
        .iter()
        .filter_map(|mb| fs::read_dir(mb.join("snap").join(id.to_string())).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with(&format!("{ino}.")) && n.ends_with(".vd")
        })
        .collect();
    assert_eq!(copies.len(), 2, "delta copies of inode {ino}: {copies:?}");
    let mut d = fs::read(&copies[0]).unwrap();
    let entries = delta_data_entries(&d);
    let (_, _, off, clen) = entries[entries.len() / 2];
    d[(off + clen / 2) as usize] ^= 0xff;
    fs::write(&copies[0], &d).unwrap();

    let o = pool.check();
    assert!(
        !o.status.success() && text(&o).contains("snapshot s1"),
        "vpool check should report the damaged copy\n{}",
        describe(&o)
    );
    let m = pool.mount();
    assert_same(
        &read_all(&m.join(".snapshots/s1/f1")),
        &f1,
        "s1/f1 with one damaged delta copy",
    );
    assert!(pid_alive(m.pid.unwrap()));
}
