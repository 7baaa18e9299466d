//! Security and resource limits (issue 10): member data private to its owner,
//! no path races in restore, bounded costs for sizes users can type, names,
//! the admin socket directory.

use crate::common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

fn vp_ok(a: &[std::ffi::OsString]) -> String {
    let o = run_t(300, VPOOL, a);
    assert!(o.status.success(), "vpool {a:?} failed\n{}", describe(&o));
    text(&o)
}

/// Every file and directory under `root` (root included) with its mode.
fn walk(root: &Path, out: &mut Vec<(PathBuf, u32)>) {
    let md = fs::symlink_metadata(root).unwrap();
    out.push((root.to_path_buf(), md.mode() & 0o7777));
    if md.is_dir() {
        for e in fs::read_dir(root).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

fn assert_private(dirs: &[PathBuf], what: &str) {
    let mut all = Vec::new();
    for d in dirs {
        walk(d, &mut all);
    }
    let open: Vec<String> = all
        .iter()
        .filter(|(_, m)| m & 0o077 != 0)
        .map(|(p, m)| format!("{} {m:o}", p.display()))
        .collect();
    assert!(
        open.is_empty(),
        "{what}: member files or directories open to other users:\n{}",
        open.join("\n")
    );
    assert!(
        all.len() > 10,
        "{what}: too few member files to mean anything"
    );
}

/// Point 1: extent copies, deltas, metadata and labels were created 0644 and
/// member directories 0755; `nobody` could read another user's data.
#[test]
fn member_files_are_private_however_they_are_made() {
    // Member directories made with the usual umask (0755), as users make them.
    let pool = Pool::dirs(2);
    for m in &pool.members {
        fs::set_permissions(m, fs::Permissions::from_mode(0o755)).unwrap();
    }
    pool.create_ok(&["--extent-size", "1M"]);
    let mnt = pool.mount();
    let t = mnt.path.clone();
    let f = mnt.join("secret.img");
    let data = pattern(1, 3 << 20);
    write_synced(&f, &data);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    vp_ok(&args!["snapshot", "create", "--wait", &t, "s1"]);
    // Copies made by every route that moves data.
    let added = pool.scratch("added");
    fs::create_dir(&added).unwrap();
    fs::set_permissions(&added, fs::Permissions::from_mode(0o755)).unwrap();
    vp_ok(&args!["device", "add", &t, &added]);
    vp_ok(&args!["rebalance", &t]);
    vp_ok(&args!["set", &t, "copies=2"]);
    let replacement = pool.scratch("replacement");
    fs::create_dir(&replacement).unwrap();
    vp_ok(&args![
        "device",
        "replace",
        &t,
        &pool.members[1],
        &replacement
    ]);
    write_synced(&mnt.join("second.img"), &pattern(2, 2 << 20));
    vp_ok(&args!["snapshot", "create", "--wait", &t, "s2"]);
    let members = vec![pool.members[0].clone(), added.clone(), replacement.clone()];
    assert_private(&members, "mounted");
    // Nobody can read a delta, an extent copy or the metadata.
    let mut files = Vec::new();
    for d in &members {
        walk(d, &mut files);
    }
    let readable: Vec<&PathBuf> = files
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.is_file())
        .filter(|p| run_as_nobody("cat", &[p.as_os_str()]).status.success())
        .collect();
    assert!(
        readable.is_empty(),
        "nobody read member files: {readable:?}"
    );
    mnt.unmount();
    assert_private(&members, "after unmount");
}

/// A member directory open to others (made by hand or by an older vpool) is
/// named at mount.
#[test]
fn mount_warns_about_a_member_open_to_others() {
    let pool = Pool::new(2, &[]);
    let (m, o) = Mount::try_new_output(&pool.members[0], &pool.mnt(), &[])
        .unwrap_or_else(|o| panic!("mount failed\n{}", describe(&o)));
    assert!(
        !text(&o).contains("open to other users"),
        "a private pool was warned about\n{}",
        describe(&o)
    );
    m.unmount();
    fs::set_permissions(&pool.members[1], fs::Permissions::from_mode(0o755)).unwrap();
    let (m, o) = Mount::try_new_output(&pool.members[0], &pool.mnt(), &[])
        .unwrap_or_else(|o| panic!("mount failed\n{}", describe(&o)));
    let out = text(&o);
    assert!(
        out.contains("open to other users") && out.contains(&pool.members[1].display().to_string()),
        "no warning naming the open member\n{}",
        describe(&o)
    );
    m.unmount();
}

/// Point 2: a root restore fixed the kernel's view by path from the CLI; a
/// user swapping a directory of that path for a symlink made root truncate a
/// file outside the pool. Now the daemon opens each file beneath the mount
/// without following symlinks, and only the inode it restored.
#[test]
fn restore_never_touches_a_file_outside_the_pool_through_a_swapped_symlink() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let pool = Pool::new(1, &[]);
    let mnt = pool.mount();
    let t = mnt.path.clone();
    let outside = pool.scratch("outside");
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("img");
    let victim_data = pattern(7, 4 << 20);
    fs::write(&victim, &victim_data).unwrap();
    let victim_mtime = fs::metadata(&victim).unwrap().mtime();
    let d = mnt.join("d");
    fs::create_dir(&d).unwrap();
    write_synced(&d.join("img"), &pattern(1, 1 << 20));
    // The test grows the file through a second name the racer never swaps
    // (it runs as root too: by `d/img` it would follow the symlink itself).
    let alias = mnt.join("alias");
    fs::hard_link(d.join("img"), &alias).unwrap();
    vp_ok(&args!["snapshot", "create", "--wait", &t, "s1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let stop = stop.clone();
        let mnt = mnt.path.clone();
        let outside = outside.clone();
        std::thread::spawn(move || {
            let (d, real) = (mnt.join("d"), mnt.join("d.real"));
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut pause = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(std::time::Duration::from_micros(x % 3000));
            };
            while !stop.load(Ordering::Relaxed) {
                if fs::rename(&d, &real).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &d);
                    pause();
                    let _ = fs::remove_file(&d);
                    let _ = fs::rename(&real, &d);
                }
                pause();
            }
        })
    };
    for i in 0..150 {
        // Grow the file again so that each restore has a size to set.
        let f = fs::OpenOptions::new().write(true).open(&alias).unwrap();
        f.set_len((2 << 20) + i * 4096).unwrap();
        let _ = run_t(120, VPOOL, &args!["snapshot", "restore", &t, "s1", "d/img"]);
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    assert!(
        fs::read(&victim).unwrap() == victim_data,
        "a file outside the pool was changed"
    );
    assert_eq!(fs::metadata(&victim).unwrap().mtime(), victim_mtime);
    // With nothing racing, the restore is seen through the mount at once.
    if !d.is_dir() {
        let _ = fs::remove_file(&d);
        fs::rename(mnt.join("d.real"), &d).unwrap();
    }
    vp_ok(&args!["snapshot", "restore", &t, "s1", "d/img"]);
    assert_same(
        &fs::read(d.join("img")).unwrap(),
        &pattern(1, 1 << 20),
        "restored file",
    );
    mnt.unmount();
    pool.assert_check_clean();
}

/// VmRSS of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// fsync of a file commits the pool's metadata.
fn sync_pool(file: &Path) {
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .sync_all()
        .unwrap();
}

/// Point 3: `truncate -s 4T f; truncate -s 0 f` grew the daemon to 787 MB and
/// each metadata store to 539 MB (a bitmap per extent index, holes
/// included); `truncate -s 1P` then got the daemon killed by the OOM killer.
#[test]
fn sizes_a_user_can_type_cost_nothing() {
    let pool = Pool::new(2, &[]);
    let mnt = pool.mount();
    let pid = mnt.pid.expect("daemon pid");
    let f = mnt.join("f");
    write_synced(&f, b"x");
    let before = rss(pid);
    for size in ["4T", "1P"] {
        run_ok("truncate", &args!["-s", size, &f]);
        // A punch over the whole sparse range walks the extents, not the range.
        run_ok("fallocate", &args!["-p", "-o", "0", "-l", size, &f]);
        run_ok("truncate", &args!["-s", "0", &f]);
        sync_pool(&f);
        let grown = rss(pid).saturating_sub(before);
        assert!(
            grown < (64 << 20),
            "after {size}: the daemon grew by {grown} bytes"
        );
        for m in &pool.members {
            let store = fs::metadata(m.join("meta.redb")).unwrap().len();
            assert!(
                store < (16 << 20),
                "after {size}: {} is {store} bytes",
                m.display()
            );
        }
    }
    mnt.unmount();
    pool.assert_check_clean();
}

/// Point 3: extended attributes per inode were unbounded (200 × 60 KB
/// accepted on one file); past the cap setxattr fails with ENOSPC.
#[test]
fn extended_attributes_per_inode_are_bounded() {
    let pool = Pool::new(1, &[]);
    let mnt = pool.mount();
    let f = mnt.join("f");
    write_synced(&f, b"x");
    let c = cstr(&f);
    let value = vec![b'v'; 60_000];
    let mut stored = 0usize;
    let mut refused = None;
    for i in 0..200 {
        let name = std::ffi::CString::new(format!("user.big{i}")).unwrap();
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let rc = unsafe {
            libc::setxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                0,
            )
        };
        if rc != 0 {
            refused = Some(std::io::Error::last_os_error());
            break;
        }
        stored += 1;
    }
    let e = refused.expect("200 attributes of 60 KB were all accepted");
    assert_eq!(errno(&e), libc::ENOSPC, "{e}");
    assert!(
        (1..=5).contains(&stored),
        "{stored} attributes of 60 KB stored"
    );
    // Many small ones: bounded by count.
    let g = mnt.join("g");
    write_synced(&g, b"x");
    let c = cstr(&g);
    let mut n = 0;
    for i in 0..2000 {
        let name = std::ffi::CString::new(format!("user.s{i}")).unwrap();
        // SAFETY: as above.
        let rc = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
        if rc != 0 {
            break;
        }
        n += 1;
    }
    assert!(n < 2000, "2000 attributes accepted on one file");
    mnt.unmount();
    pool.assert_check_clean();
}

/// Point 4: every extent copy's descriptor was cached until the last release;
/// with a low limit, writes failed with EIO, commits failed, unmount refused.
#[test]
fn a_low_descriptor_limit_only_costs_reopens() {
    let pool = Pool::new(2, &["--extent-size", "1M", "--copies", "2"]);
    let mnt = Mount::try_new_wrapped(
        &["prlimit", "--nofile=400:400", "--"],
        &pool.members[0],
        &pool.mnt(),
        &[],
    )
    .unwrap_or_else(|o| panic!("mount failed\n{}", describe(&o)));
    let t = mnt.path.clone();
    // 300 extents of 2 copies each: 600 member files, more than the limit.
    let data = pattern(3, 300 << 20);
    let f = mnt.join("big");
    write_synced(&f, &data);
    vp_ok(&args!["snapshot", "create", "--wait", &t, "s1"]);
    let (ok, report) = scrub_json(&t);
    assert!(ok, "scrub failed: {report}");
    assert_same(&fs::read(&f).unwrap(), &data, "file read back");
    let pid = mnt.pid.expect("daemon pid");
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(fds < 400, "{fds} descriptors open");
    mnt.unmount();
    pool.assert_check_clean();
}

/// Point 5: names with NUL, `/` or control characters are refused wherever
/// names enter; members on a FUSE filesystem (the pool's own mount) are
/// refused instead of deadlocking `device add`.
#[test]
fn names_and_members_are_checked_where_they_enter() {
    let pool = Pool::new(1, &[]);
    let mnt = pool.mount();
    let t = mnt.path.clone();
    for bad in ["a\nb", "esc\x1b[31m", "tab\t"] {
        let e = fs::write(mnt.join(bad), b"x").unwrap_err();
        assert_eq!(errno(&e), libc::EINVAL, "{bad:?}: {e}");
        let o = vpool(&args!["snapshot", "create", &t, bad]);
        assert_refused(
            &o,
            &["control character"],
            "a snapshot name with a control character",
        );
    }
    write_synced(&mnt.join("f"), b"data");
    vp_ok(&args!["snapshot", "create", "--wait", &t, "s1"]);
    let o = vpool(&args!["snapshot", "clone", &t, "s1", "f", "g\nh"]);
    assert!(
        !o.status.success(),
        "a clone named with a newline was made\n{}",
        describe(&o)
    );
    assert!(
        fs::read_dir(&t).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .as_encoded_bytes()
            .contains(&b'\n')),
        "an entry with a newline exists"
    );
    // A member on the pool's own mount (or any FUSE filesystem).
    let inside = mnt.join("member");
    fs::create_dir(&inside).unwrap();
    let o = run_t(30, VPOOL, &args!["device", "add", &t, &inside]);
    assert_refused(&o, &["FUSE"], "a member inside the pool's own mount");
    let o = run_t(30, VPOOL, &args!["create", &inside]);
    assert_refused(&o, &["FUSE"], "a pool created on a FUSE mount");
    mnt.unmount();
    pool.assert_check_clean();
}
