//! POSIX semantics of a mounted vpool, exercised through real syscalls.
//!
//! Each test builds its own pool (2 members, 1 MiB extents unless stated, so
//! modest sizes already cross extent boundaries) in a private temp dir and
//! mounts it with the `Mount` guard from `common`. Needs root and /dev/fuse.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// Two members on the same filesystem, 1 MiB extents, one copy.
fn pool() -> Pool {
    Pool::new(2, &["--extent-size", "1M"])
}

/// Apply a write to an in-memory model of the file.
fn model_write(model: &mut Vec<u8>, off: usize, data: &[u8]) {
    if model.len() < off + data.len() {
        model.resize(off + data.len(), 0);
    }
    model[off..off + data.len()].copy_from_slice(data);
}

/// Asserts that the bytes stored in the members' data dirs drop to at most
/// `max` within 10 s (space given back `what`).
#[track_caller]
fn assert_stored_at_most(pool: &Pool, max: u64, what: &str) {
    let mut last = 0;
    wait_until(Duration::from_secs(10), || {
        last = pool.stored_bytes_on_disk();
        last <= max
    });
    assert!(
        last <= max,
        "{last} bytes still stored in the member data dirs {what} (at most {max} expected)"
    );
}

/// st_blocks*512 of `p`, polled for up to 3 s until `ok` holds (the kernel may
/// serve attributes from its cache for up to the attribute TTL; the test
/// `st_blocks_current_right_after_fsync` checks freshness separately).
fn alloc_bytes_when(p: &Path, ok: impl Fn(u64) -> bool) -> u64 {
    let mut last = 0;
    wait_until(Duration::from_secs(3), || {
        last = alloc_bytes(p);
        ok(last)
    });
    last
}

// ---------------------------------------------------------------------------

#[test]
fn write_read_at_offsets() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("f");
    let f = open_rw_new(&p);
    let mut model = Vec::new();

    let writes: Vec<(usize, Vec<u8>)> = vec![
        (0, b"hello".to_vec()),
        (4099, b"world".to_vec()),
        (777, pattern(1, 5 * MIB as usize + 12345)), // crosses 5 extent boundaries
        (MIB as usize - 3, b"straddle".to_vec()),    // straddles an extent boundary
        (7 * MIB as usize + 100, pattern(2, 9000)),  // leaves a hole before it
        (2 * MIB as usize, pattern(3, 4096)),        // aligned overwrite
    ];
    for (off, data) in &writes {
        write_at(&f, *off as u64, data);
        model_write(&mut model, *off, data);
    }
    assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "file size");

    // Reads at assorted offsets, including across extent boundaries and holes.
    for &(off, len) in &[
        (0usize, 16usize),
        (MIB as usize - 50, 100),
        (3 * MIB as usize - 1, 2),
        (5 * MIB as usize, 3 * MIB as usize),
        (model.len() - 10, 10),
    ] {
        let len = len.min(model.len() - off);
        assert_same(
            &read_at(&f, off as u64, len),
            &model[off..off + len],
            &format!("pread({off},{len})"),
        );
    }
    // Read past EOF returns 0 bytes.
    let mut buf = [0u8; 10];
    assert_eq!(
        f.read_at(&mut buf, model.len() as u64 + 5).unwrap(),
        0,
        "read past EOF"
    );
    drop(f);

    // Whole-file read through a fresh descriptor.
    assert_same(&read_all(&p), &model, "whole file after close");

    // O_APPEND writes go to the end.
    {
        let mut a = OpenOptions::new().append(true).open(&p).unwrap();
        a.write_all(b"APPENDED").unwrap();
    }
    model.extend_from_slice(b"APPENDED");
    assert_same(&read_all(&p), &model, "after append");

    // O_TRUNC empties the file.
    {
        let mut t = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        t.write_all(b"new").unwrap();
    }
    assert_eq!(read_all(&p), b"new", "after O_TRUNC + write");
}

#[test]
fn truncate_up_and_down() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("t");
    let f = open_rw_new(&p);
    let data = pattern(10, 3 * MIB as usize + 100);
    write_at(&f, 0, &data);
    f.sync_all().unwrap();

    // Shrink into the middle of an extent and of a block.
    let cut = MIB + 10;
    f.set_len(cut).unwrap();
    assert_eq!(f.metadata().unwrap().len(), cut);
    assert_same(
        &read_at(&f, 0, cut as usize),
        &data[..cut as usize],
        "prefix after shrink",
    );

    // Grow again: everything past the old cut must read as zeros, not as the
    // data that used to be there.
    let grown = 5 * MIB / 2;
    f.set_len(grown).unwrap();
    assert_eq!(f.metadata().unwrap().len(), grown);
    let all = read_at(&f, 0, grown as usize);
    assert_same(
        &all[..cut as usize],
        &data[..cut as usize],
        "prefix after regrow",
    );
    assert_zeros(
        &all[cut as usize..],
        "bytes past the truncation point after growing the file again",
    );

    // Same via truncate(2) on the path.
    let c = cstr(&p);
    // SAFETY: c is a valid NUL-terminated path.
    cvt(unsafe { libc::truncate(c.as_ptr(), 4097) }).expect("truncate(2)");
    assert_eq!(len_of(&p), 4097);
    assert_same(&read_all(&p), &data[..4097], "after truncate(2)");

    // Down to zero frees the space (st_blocks and the member data).
    write_at(&f, 0, &pattern(11, 4 * MIB as usize));
    f.sync_all().unwrap();
    let before = alloc_bytes_when(&p, |b| b >= 3 * MIB);
    assert!(
        before >= 3 * MIB,
        "4 MiB written but st_blocks*512 = {before}"
    );
    f.set_len(0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    let after = alloc_bytes_when(&p, |b| b < MIB);
    assert!(
        after < MIB,
        "st_blocks*512 after truncate to 0 is {after} (was {before})"
    );
    assert_stored_at_most(&pool, MIB, "after truncating the only file to 0");
    f.set_len(8192).unwrap();
    assert_zeros(&read_at(&f, 0, 8192), "regrow from 0");
}

#[test]
fn unlink_while_open() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("victim");
    let data = pattern(20, 2 * MIB as usize + 3);
    {
        let f = open_rw_new(&p);
        write_at(&f, 0, &data);
        f.sync_all().unwrap();
    }
    let f = open_rw(&p);
    let r = File::open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists(), "unlinked file still visible by name");
    assert!(
        !names_in(m.path()).contains(&"victim".to_string()),
        "unlinked file still listed by readdir"
    );
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat nlink after unlink");
    assert_same(
        &read_at(&r, 0, data.len()),
        &data,
        "read via fd after unlink",
    );
    // Still writable through the open descriptor.
    write_at(&f, MIB, b"still alive");
    f.sync_all().unwrap();
    assert_eq!(
        read_at(&r, MIB, 11),
        b"still alive",
        "write after unlink visible via other fd"
    );
    // A new file with the same name is a different file.
    fs::write(&p, b"new").unwrap();
    assert_same(
        &read_at(&r, 0, 16),
        &data[..16],
        "old fd unaffected by new file of same name",
    );
    fs::remove_file(&p).unwrap();
    drop(f);
    drop(r);
    // After the last close the space is released.
    assert_stored_at_most(&pool, 256 * KIB, "after the last close of an unlinked file");
    drop(m);
    pool.assert_check_clean();
}

#[test]
fn rename_files_and_dirs() {
    let pool = pool();
    let m = pool.mount();
    let a = m.join("a");
    let b = m.join("b");
    let c = m.join("c");
    let da = pattern(30, 100_000);
    let dc = pattern(31, 3 * MIB as usize);
    fs::write(&a, &da).unwrap();
    let ino_a = ino_of(&a);

    fs::rename(&a, &b).unwrap();
    assert!(!a.exists(), "old name still exists after rename");
    assert_eq!(ino_of(&b), ino_a, "rename changed the inode number");
    assert_same(&read_all(&b), &da, "content after rename");

    // Rename over an existing file; an fd on the old target keeps its data.
    fs::write(&c, &dc).unwrap();
    let old_c = File::open(&c).unwrap();
    fs::rename(&b, &c).unwrap();
    assert!(!b.exists());
    assert_same(
        &read_all(&c),
        &da,
        "target content after rename over existing",
    );
    assert_same(
        &read_at(&old_c, 0, dc.len()),
        &dc,
        "replaced file via open fd",
    );
    drop(old_c);
    assert_stored_at_most(&pool, 2 * MIB, "after a rename over a 3 MiB file");

    // Into a subdirectory, then rename the directory itself.
    fs::create_dir(m.join("d")).unwrap();
    fs::rename(&c, m.join("d/c")).unwrap();
    fs::rename(m.join("d"), m.join("e")).unwrap();
    assert!(!m.join("d").exists());
    assert_same(&read_all(&m.join("e/c")), &da, "file inside renamed dir");

    // Directory over an empty directory: allowed.
    fs::create_dir(m.join("empty")).unwrap();
    fs::rename(m.join("e"), m.join("empty")).unwrap();
    assert_same(
        &read_all(&m.join("empty/c")),
        &da,
        "dir renamed over empty dir",
    );

    // Error cases.
    fs::create_dir(m.join("full")).unwrap();
    fs::write(m.join("full/x"), b"x").unwrap();
    fs::create_dir(m.join("src")).unwrap();
    expect_errno(
        fs::rename(m.join("src"), m.join("full")),
        libc::ENOTEMPTY,
        "dir over non-empty dir",
    );
    fs::write(m.join("file"), b"f").unwrap();
    expect_errno(
        fs::rename(m.join("file"), m.join("src")),
        libc::EISDIR,
        "file over dir",
    );
    expect_errno(
        fs::rename(m.join("src"), m.join("file")),
        libc::ENOTDIR,
        "dir over file",
    );
    expect_errno(
        fs::rename(m.join("nope"), m.join("x")),
        libc::ENOENT,
        "missing source",
    );
    expect_errno(
        fs::rename(m.join("src"), m.join("src/sub")),
        libc::EINVAL,
        "dir into itself",
    );

    // Names survive remount.
    drop(m);
    pool.assert_check_clean();
    let m = pool.mount();
    assert_same(&read_all(&m.join("empty/c")), &da, "after remount");
    assert!(!m.join("a").exists() && !m.join("b").exists() && !m.join("c").exists());
}

/// renameat2(2) with `RENAME_NOREPLACE`.
fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (cf, ct) = (cstr(from), cstr(to));
    // SAFETY: valid NUL-terminated paths, AT_FDCWD.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    cvt(r).map(|_| ())
}

#[test]
fn rename_noreplace() {
    let pool = pool();
    let m = pool.mount();
    fs::write(m.join("x"), b"x").unwrap();
    fs::write(m.join("y"), b"y").unwrap();
    expect_errno(
        renameat2_noreplace(&m.join("x"), &m.join("y")),
        libc::EEXIST,
        "renameat2(RENAME_NOREPLACE) onto existing name",
    );
    assert_eq!(fs::read(m.join("y")).unwrap(), b"y");
    renameat2_noreplace(&m.join("x"), &m.join("z"))
        .expect("renameat2(RENAME_NOREPLACE) onto a free name");
    assert_eq!(fs::read(m.join("z")).unwrap(), b"x");
}

#[test]
fn directories() {
    let pool = pool();
    let m = pool.mount();
    fs::create_dir_all(m.join("a/b/c")).unwrap();
    assert!(stat_of(&m.join("a/b/c")).is_dir());
    expect_errno(fs::create_dir(m.join("a")), libc::EEXIST, "mkdir existing");
    expect_errno(
        fs::create_dir(m.join("nope/x")),
        libc::ENOENT,
        "mkdir in missing parent",
    );

    // Enough entries that readdir needs several batches.
    let n = 600;
    let mut want: Vec<String> = (0..n)
        .map(|i| format!("file-{i:04}-{}", "x".repeat(i % 40)))
        .collect();
    for name in &want {
        fs::write(m.join("a").join(name), name.as_bytes()).unwrap();
    }
    want.push("b".into());
    want.sort();
    let got = names_in(&m.join("a"));
    assert_eq!(got.len(), want.len(), "readdir entry count");
    assert_eq!(got, want, "readdir names");
    // File types reported by readdir.
    for e in fs::read_dir(m.join("a")).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if e.file_name() == "b" {
            assert!(ft.is_dir(), "readdir type of b");
        } else {
            assert!(ft.is_file(), "readdir type of {:?}", e.file_name());
        }
    }

    expect_errno(
        fs::remove_dir(m.join("a")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    expect_errno(
        fs::remove_dir(m.join("a/file-0000-")),
        libc::ENOTDIR,
        "rmdir on a file",
    );
    expect_errno(
        fs::remove_file(m.join("a/b")),
        libc::EISDIR,
        "unlink on a dir",
    );
    fs::remove_dir(m.join("a/b/c")).unwrap();
    assert!(!m.join("a/b/c").exists());
    fs::remove_dir_all(m.join("a")).unwrap();
    assert!(!m.join("a").exists());
    assert_eq!(
        names_in(m.path()),
        Vec::<String>::new(),
        "root not empty after removing everything"
    );
    drop(m);
    pool.assert_check_clean();
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: timespec is plain data; zeroed then filled in.
    let mut ts: [libc::timespec; 2] = unsafe { std::mem::zeroed() };
    ts[0].tv_sec = atime.0 as libc::time_t;
    ts[0].tv_nsec = atime.1 as _;
    ts[1].tv_sec = mtime.0 as libc::time_t;
    ts[1].tv_nsec = mtime.1 as _;
    // SAFETY: valid path and a 2-element timespec array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) }).map(|_| ())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn chmod_chown_utimens() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("f");
    fs::write(&p, b"data").unwrap();

    chmod(&p, 0o640);
    assert_eq!(mode_of(&p), 0o640);
    chmod(&p, 0o4755);
    assert_eq!(mode_of(&p), 0o4755);
    assert!(stat_of(&p).is_file());

    chown(&p, Some(1234), Some(5678));
    assert_eq!(owner_of(&p), (1234, 5678), "owner after chown");
    // Linux clears set-user-ID on chown of a regular file, even for root.
    assert_eq!(mode_of(&p), 0o755, "chown did not clear the setuid bit");
    chown(&p, None, Some(42));
    assert_eq!(owner_of(&p), (1234, 42), "chown with uid -1 keeps uid");

    set_times(
        &p,
        (1_000_000_000, 123_456_789),
        (1_500_000_000, 987_654_321),
    )
    .unwrap();
    assert_eq!(atime_of(&p), (1_000_000_000, 123_456_789), "atime");
    assert_eq!(mtime_of(&p), (1_500_000_000, 987_654_321), "mtime");
    let ctime = stat_of(&p).ctime();
    assert!(
        (ctime - now_secs()).abs() < 120,
        "ctime {ctime} not near now after utimens"
    );

    // A write moves mtime to about now.
    set_times(&p, (1_000_000_000, 0), (1_000_000_000, 0)).unwrap();
    {
        let f = open_rw(&p);
        write_at(&f, 0, b"DATA");
    }
    let (mt, _) = mtime_of(&p);
    assert!(
        (mt - now_secs()).abs() < 120,
        "mtime {mt} not updated by write"
    );
    chmod(&p, 0o4755);

    // Directories too.
    let d = m.join("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o711);
    chown(&d, Some(7), Some(8));
    set_times(&d, (2_000_000_000, 5), (2_000_000_001, 6)).unwrap();
    assert_eq!(mode_of(&d), 0o711);
    assert_eq!(owner_of(&d), (7, 8));
    assert_eq!(mtime_of(&d), (2_000_000_001, 6));

    // Persisted.
    drop(m);
    let m = pool.mount();
    assert_eq!(mode_of(&m.join("f")), 0o4755, "mode after remount");
    assert_eq!(owner_of(&m.join("f")), (1234, 42), "owner after remount");
    assert_eq!(
        mtime_of(&m.join("d")),
        (2_000_000_001, 6),
        "dir mtime after remount"
    );
}

#[test]
fn hard_links() {
    let pool = pool();
    let m = pool.mount();
    let f = m.join("f");
    let g = m.join("g");
    let data = pattern(40, MIB as usize + 5);
    fs::write(&f, &data).unwrap();
    fs::hard_link(&f, &g).unwrap();
    assert_eq!(ino_of(&f), ino_of(&g), "hard link has a different inode");
    assert_eq!(nlink_of(&f), 2, "nlink after link");
    assert_eq!(nlink_of(&g), 2);

    // Writes via one name are visible via the other.
    {
        let w = open_rw(&g);
        write_at(&w, 10, b"LINKED");
    }
    assert_eq!(&read_all(&f)[10..16], b"LINKED");

    fs::create_dir(m.join("sub")).unwrap();
    fs::hard_link(&f, m.join("sub/h")).unwrap();
    assert_eq!(nlink_of(&f), 3);
    expect_errno(
        fs::hard_link(&f, &g),
        libc::EEXIST,
        "link onto existing name",
    );
    expect_errno(
        fs::hard_link(m.join("sub"), m.join("dirlink")),
        libc::EPERM,
        "link to a directory",
    );

    fs::remove_file(&f).unwrap();
    assert_eq!(nlink_of(&g), 2, "nlink after unlinking one name");
    let mut want = data.clone();
    want[10..16].copy_from_slice(b"LINKED");
    assert_same(&read_all(&g), &want, "data via remaining link");

    drop(m);
    pool.assert_check_clean();
    let m = pool.mount();
    assert_eq!(nlink_of(&m.join("g")), 2, "nlink after remount");
    assert_eq!(ino_of(&m.join("g")), ino_of(&m.join("sub/h")));
    fs::remove_file(m.join("g")).unwrap();
    fs::remove_file(m.join("sub/h")).unwrap();
    assert_stored_at_most(&pool, 256 * KIB, "after the last link was removed");
}

#[test]
fn symlinks() {
    let pool = pool();
    let m = pool.mount();
    fs::write(m.join("target"), b"T").unwrap();
    symlink("target", m.join("l")).unwrap();
    assert_eq!(fs::read_link(m.join("l")).unwrap(), Path::new("target"));
    let lmd = fs::symlink_metadata(m.join("l")).unwrap();
    assert!(lmd.file_type().is_symlink());
    assert_eq!(
        lmd.len(),
        "target".len() as u64,
        "lstat size of a symlink is its target length"
    );
    assert!(stat_of(&m.join("l")).is_file(), "stat follows the link");
    assert_eq!(fs::read(m.join("l")).unwrap(), b"T");

    // Dangling link.
    symlink("does/not/exist", m.join("dangling")).unwrap();
    assert!(fs::symlink_metadata(m.join("dangling")).is_ok());
    expect_errno(
        fs::metadata(m.join("dangling")),
        libc::ENOENT,
        "stat of dangling link",
    );

    // Long target, link to a directory, traversal.
    let long = "x/".repeat(500) + "end";
    symlink(&long, m.join("long")).unwrap();
    assert_eq!(fs::read_link(m.join("long")).unwrap(), Path::new(&long));
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/inner"), b"I").unwrap();
    symlink("dir", m.join("dl")).unwrap();
    assert_eq!(fs::read(m.join("dl/inner")).unwrap(), b"I");
    expect_errno(
        symlink("t", m.join("l")),
        libc::EEXIST,
        "symlink onto existing name",
    );
    fs::remove_file(m.join("l")).unwrap();
    assert!(
        m.join("target").exists(),
        "removing the link removed its target"
    );

    drop(m);
    let m = pool.mount();
    assert_eq!(
        fs::read_link(m.join("long")).unwrap(),
        Path::new(&long),
        "after remount"
    );
    assert_eq!(fs::read_link(m.join("dl")).unwrap(), Path::new("dir"));
}

#[test]
fn mmap_shared_write_then_reopen() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("mapped");
    let len = 2 * MIB as usize + 8192 + 100; // crosses extent boundaries, partial last page
    let data = pattern(50, len);
    {
        let f = open_rw_new(&p);
        f.set_len(len as u64).unwrap();
        let addr = mmap_shared(&f, len, libc::PROT_READ | libc::PROT_WRITE, "mmap");
        // SAFETY: `addr` maps `len` bytes of a regular file we just sized to
        // `len`; the mapping is used only through `s` below, which is not used
        // after munmap, and no other code maps or truncates the file meanwhile.
        unsafe {
            let s = std::slice::from_raw_parts_mut(addr as *mut u8, len);
            assert_zeros(s, "fresh mapping of a truncated-up file");
            s.copy_from_slice(&data);
            assert_eq!(libc::munmap(addr, len), 0, "munmap");
        }
    }
    assert_same(&read_all(&p), &data, "read back after munmap + reopen");

    // Write through write(2), read through a read-only mapping.
    {
        let f = open_rw(&p);
        write_at(&f, MIB - 2, b"ABCD");
    }
    let mut want = data.clone();
    want[MIB as usize - 2..MIB as usize + 2].copy_from_slice(b"ABCD");
    {
        let f = File::open(&p).unwrap();
        let addr = mmap_shared(&f, len, libc::PROT_READ, "mmap ro");
        // SAFETY: read-only shared mapping of a file of size `len`; only read
        // through `s` before munmap.
        unsafe {
            let s = std::slice::from_raw_parts(addr as *const u8, len);
            assert_same(s, &want, "read through mapping");
            libc::munmap(addr, len);
        }
    }

    // msync'd mapping write survives unmount/remount.
    {
        let f = open_rw(&p);
        let addr = mmap_shared(&f, len, libc::PROT_READ | libc::PROT_WRITE, "mmap");
        // SAFETY: as above, writable shared mapping of `len` bytes.
        unsafe {
            let s = std::slice::from_raw_parts_mut(addr as *mut u8, len);
            s[len - 5..].copy_from_slice(b"TAIL!");
            assert_eq!(
                libc::msync(addr, len, libc::MS_SYNC),
                0,
                "msync: {}",
                io::Error::last_os_error()
            );
            libc::munmap(addr, len);
        }
    }
    want[len - 5..].copy_from_slice(b"TAIL!");
    let m = pool.remount_checked(m);
    assert_same(
        &read_all(&m.join("mapped")),
        &want,
        "mmap-written data after remount",
    );
}

#[test]
fn copy_file_range_between_files() {
    let pool = pool();
    let m = pool.mount();
    let src_data = pattern(60, 3 * MIB as usize + 5);
    fs::write(m.join("src"), &src_data).unwrap();
    let src = File::open(m.join("src")).unwrap();
    let dst = open_rw_new(&m.join("dst"));
    let (in0, out0, n) = (1000u64, 4096u64 + 7, 2 * MIB as usize + 3);
    copy_range(&src, in0, &dst, out0, n);
    let got = read_all(&m.join("dst"));
    assert_eq!(got.len(), out0 as usize + n, "dst size");
    assert_zeros(&got[..out0 as usize], "bytes before the copied range");
    assert_same(
        &got[out0 as usize..],
        &src_data[in0 as usize..in0 as usize + n],
        "copied range",
    );
    assert_same(&read_all(&m.join("src")), &src_data, "source unchanged");
}

#[test]
fn xattrs() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("f");
    fs::write(&p, b"x").unwrap();

    setxattr(&p, "user.test", b"hello", 0).unwrap();
    assert_eq!(
        getxattr_into(&p, "user.test", &mut []).unwrap(),
        5,
        "size query"
    );
    assert_eq!(getxattr(&p, "user.test").unwrap(), b"hello");
    let big = pattern(70, 3000);
    setxattr(&p, "user.big", &big, 0).unwrap();
    assert_eq!(getxattr(&p, "user.big").unwrap(), big);
    setxattr(&p, "user.empty", b"", 0).unwrap();
    assert_eq!(getxattr(&p, "user.empty").unwrap(), b"");

    let mut names = listxattr(&p).unwrap();
    names.retain(|n| n.starts_with("user."));
    names.sort();
    assert_eq!(
        names,
        vec!["user.big", "user.empty", "user.test"],
        "listxattr"
    );

    expect_errno(
        setxattr(&p, "user.test", b"x", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on existing",
    );
    expect_errno(
        setxattr(&p, "user.nope", b"x", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on missing",
    );
    setxattr(&p, "user.test", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.test").unwrap(), b"replaced");
    let mut small = [0u8; 3];
    expect_errno(
        getxattr_into(&p, "user.test", &mut small),
        libc::ERANGE,
        "getxattr into too small a buffer",
    );
    expect_errno(
        getxattr(&p, "user.missing"),
        libc::ENODATA,
        "getxattr missing",
    );

    removexattr(&p, "user.empty").unwrap();
    expect_errno(
        getxattr(&p, "user.empty"),
        libc::ENODATA,
        "getxattr after remove",
    );
    expect_errno(
        removexattr(&p, "user.empty"),
        libc::ENODATA,
        "remove missing",
    );

    // On a directory.
    fs::create_dir(m.join("d")).unwrap();
    setxattr(&m.join("d"), "user.dir", b"D", 0).unwrap();
    assert_eq!(getxattr(&m.join("d"), "user.dir").unwrap(), b"D");

    drop(m);
    let m = pool.mount();
    assert_eq!(
        getxattr(&m.join("f"), "user.test").unwrap(),
        b"replaced",
        "xattr after remount"
    );
    assert_eq!(getxattr(&m.join("f"), "user.big").unwrap(), big);
    assert_eq!(getxattr(&m.join("d"), "user.dir").unwrap(), b"D");
    expect_errno(
        getxattr(&m.join("f"), "user.empty"),
        libc::ENODATA,
        "removed xattr after remount",
    );
}

// statvfs field types differ between targets; the casts are no-ops on x86_64.
#[allow(clippy::unnecessary_cast)]
fn fs_bytes(s: &libc::statvfs) -> (u64, u64, u64) {
    let fr = s.f_frsize as u64;
    (
        s.f_blocks as u64 * fr,
        s.f_bfree as u64 * fr,
        s.f_bavail as u64 * fr,
    )
}

fn assert_close(got: u64, want: u64, tol_frac: f64, tol_abs: u64, what: &str) {
    let diff = got.abs_diff(want);
    let tol = ((want as f64 * tol_frac) as u64).max(tol_abs);
    assert!(
        diff <= tol,
        "{what}: got {got}, expected about {want} (tolerance {tol})"
    );
}

#[test]
fn statfs_members_on_same_fs_count_once() {
    for copies in [1u64, 2] {
        let pool = Pool::new(2, &["--copies", &copies.to_string(), "--extent-size", "1M"]);
        let m = pool.mount();
        let under = fs_bytes(&statvfs(&pool.members[0]));
        let s = statvfs(m.path());
        let (total, free, avail) = fs_bytes(&s);
        assert!(
            s.f_frsize > 0 && s.f_bsize > 0,
            "statvfs block sizes are zero"
        );
        assert_close(
            total,
            under.0 / copies,
            0.02,
            64 * MIB,
            &format!("f_blocks*f_frsize, copies={copies}"),
        );
        assert!(
            free <= total && avail <= free,
            "free {free} / avail {avail} / total {total} inconsistent"
        );
        // Other tests write concurrently, so only roughly.
        assert_close(
            avail,
            under.2 / copies,
            0.10,
            512 * MIB,
            &format!("f_bavail*f_frsize, copies={copies}"),
        );
        assert!(s.f_namemax >= 255, "f_namemax {}", s.f_namemax);
    }
}

#[test]
fn statfs_distinct_filesystems_sum() {
    for copies in [1u64, 2] {
        let a = Tmpfs::new("32M");
        let b = Tmpfs::new("64M");
        let pool = Pool::from_dirs(vec![a.path.clone(), b.path.clone()]);
        pool.create_ok(&["--copies", &copies.to_string(), "--extent-size", "1M"]);
        let m = pool.mount();
        let (total, _, _) = fs_bytes(&statvfs(m.path()));
        let ua = fs_bytes(&statvfs(&a.path)).0;
        let ub = fs_bytes(&statvfs(&b.path)).0;
        assert_close(
            total,
            (ua + ub) / copies,
            0.05,
            2 * MIB,
            &format!("total of 32M+64M tmpfs, copies={copies}"),
        );
        drop(m);
    }
}

#[test]
fn sparse_write_far_offset() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("sparse");
    let f = open_rw_new(&p);
    let off = 100 * MIB;
    write_at(&f, off, &pattern(80, 4096));
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), off + 4096);
    let ab = alloc_bytes(&p);
    assert!(
        ab < 2 * MIB,
        "st_blocks*512 of a 4 KiB write at 100 MiB is {ab}: file is not sparse"
    );
    let stored = pool.stored_bytes_on_disk();
    assert!(
        stored < 4 * MIB,
        "members store {stored} bytes for a 4 KiB write at 100 MiB"
    );
    assert_zeros(&read_at(&f, 50 * MIB, MIB as usize), "the hole");
    assert_same(
        &read_at(&f, off, 4096),
        &pattern(80, 4096),
        "data at 100 MiB",
    );
}

#[test]
fn seek_data_and_hole() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("holes");
    let f = open_rw_new(&p);
    write_at(&f, 0, &pattern(90, 4096));
    write_at(&f, 10 * MIB, &pattern(91, 4096));
    f.set_len(20 * MIB).unwrap();
    f.sync_all().unwrap();

    let sd = |off: u64| lseek(&f, off as i64, libc::SEEK_DATA);
    let sh = |off: u64| lseek(&f, off as i64, libc::SEEK_HOLE);
    assert_eq!(sd(0).unwrap(), 0, "SEEK_DATA(0)");
    let h = sh(0).unwrap() as u64;
    assert!(
        (4096..=MIB).contains(&h),
        "SEEK_HOLE(0) = {h}: expected the hole after the first 4 KiB (at most one 1 MiB extent later)"
    );
    assert_eq!(
        sd(h).unwrap() as u64,
        10 * MIB,
        "SEEK_DATA from the first hole"
    );
    assert_eq!(sd(5 * MIB).unwrap() as u64, 10 * MIB, "SEEK_DATA(5 MiB)");
    let h2 = sh(10 * MIB).unwrap() as u64;
    assert!(
        (10 * MIB + 4096..=11 * MIB).contains(&h2),
        "SEEK_HOLE(10 MiB) = {h2}"
    );
    expect_errno(sd(11 * MIB), libc::ENXIO, "SEEK_DATA in the trailing hole");
    assert_eq!(
        sh(19 * MIB).unwrap() as u64,
        19 * MIB,
        "SEEK_HOLE inside the trailing hole"
    );
    expect_errno(sd(20 * MIB), libc::ENXIO, "SEEK_DATA at EOF");
    expect_errno(sh(20 * MIB), libc::ENXIO, "SEEK_HOLE at EOF");
}

#[test]
fn fallocate_plain_and_keep_size() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("fa");
    let f = open_rw_new(&p);
    fallocate(&f, 0, 0, 8 * MIB).expect("fallocate(mode 0)");
    assert_eq!(f.metadata().unwrap().len(), 8 * MIB, "size after fallocate");
    assert_zeros(&read_at(&f, 0, 8 * MIB as usize), "the fallocated range");
    let ab = alloc_bytes(&p);
    assert!(
        ab >= 8 * MIB,
        "fallocate must reserve space: st_blocks*512 = {ab} < 8 MiB"
    );

    let p2 = m.join("fk");
    let f2 = open_rw_new(&p2);
    write_at(&f2, 0, &[7u8; 4096]);
    fallocate(&f2, libc::FALLOC_FL_KEEP_SIZE, 0, 2 * MIB).expect("fallocate(KEEP_SIZE)");
    assert_eq!(
        f2.metadata().unwrap().len(),
        4096,
        "KEEP_SIZE changed the size"
    );
    assert_eq!(read_at(&f2, 0, 4096), vec![7u8; 4096]);
    // Extending write into the preallocated range.
    write_at(&f2, MIB, b"abc");
    assert_eq!(f2.metadata().unwrap().len(), MIB + 3);
    assert_zeros(
        &read_at(&f2, 4096, (MIB - 4096) as usize),
        "the preallocated range before the write",
    );
}

#[test]
fn fallocate_punch_hole() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("punch");
    let f = open_rw_new(&p);
    let data = pattern(100, 4 * MIB as usize);
    write_at(&f, 0, &data);
    f.sync_all().unwrap();
    let before = alloc_bytes_when(&p, |b| b >= 4 * MIB);
    let stored_before = pool.stored_bytes_on_disk();

    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        MIB,
        2 * MIB,
    )
    .expect("punch hole");
    f.sync_all().unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        4 * MIB,
        "punch hole changed the size"
    );
    let mut want = data.clone();
    want[MIB as usize..3 * MIB as usize].fill(0);
    assert_same(&read_at(&f, 0, want.len()), &want, "after punching 1M..3M");
    let after = alloc_bytes_when(&p, |a| a + 3 * MIB / 2 <= before);
    assert!(
        after + 3 * MIB / 2 <= before,
        "st_blocks*512 did not drop by ~2 MiB after punching 2 MiB: {before} -> {after}"
    );
    let stored_after = pool.stored_bytes_on_disk();
    assert!(
        stored_after + 3 * MIB / 2 <= stored_before,
        "member data did not shrink after punching 2 MiB: {stored_before} -> {stored_after}"
    );

    // Unaligned, inside a block.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        100,
        4900,
    )
    .unwrap();
    want[100..5000].fill(0);
    // Straddling the end of the file.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4 * MIB - 777,
        MIB,
    )
    .unwrap();
    want[4 * MIB as usize - 777..].fill(0);
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB);
    assert_same(
        &read_at(&f, 0, want.len()),
        &want,
        "after unaligned punches",
    );
    drop(f);
    assert_same(&read_all(&p), &want, "after reopen");
    let m = pool.remount_checked(m);
    assert_same(&read_all(&m.join("punch")), &want, "after remount");
}

#[test]
fn fallocate_zero_range() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("zr");
    let f = open_rw_new(&p);
    let data = pattern(110, 3 * MIB as usize);
    write_at(&f, 0, &data);
    let mut want = data.clone();
    let (off, len) = (512 * KIB + 3, MIB + 5);
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len).expect("fallocate(ZERO_RANGE)");
    want[off as usize..(off + len) as usize].fill(0);
    assert_eq!(
        f.metadata().unwrap().len(),
        3 * MIB,
        "ZERO_RANGE inside the file changed the size"
    );
    assert_same(&read_at(&f, 0, want.len()), &want, "after ZERO_RANGE");

    // Beyond EOF without KEEP_SIZE extends the file.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 3 * MIB - 10, MIB).expect("ZERO_RANGE past EOF");
    want.truncate(3 * MIB as usize - 10);
    want.resize(4 * MIB as usize - 10, 0);
    assert_eq!(
        f.metadata().unwrap().len(),
        4 * MIB - 10,
        "size after ZERO_RANGE past EOF"
    );
    assert_same(
        &read_at(&f, 0, want.len()),
        &want,
        "after ZERO_RANGE past EOF",
    );

    // With KEEP_SIZE beyond EOF: size unchanged.
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        4 * MIB,
        MIB,
    )
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4 * MIB - 10);
    drop(f);
    let m = pool.remount(m);
    assert_same(&read_all(&m.join("zr")), &want, "after remount");
}

#[test]
fn o_direct_aligned_io() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("direct");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open with O_DIRECT");
    let n = MIB as usize;
    let mut wbuf = AlignedBuf::new(n, 4096);
    wbuf.as_mut_slice().copy_from_slice(&pattern(120, n));
    for off in [0, 4096, MIB - 4096, 3 * MIB] {
        f.write_all_at(wbuf.as_slice(), off)
            .unwrap_or_else(|e| panic!("O_DIRECT pwrite at {off}: {e}"));
        let mut rbuf = AlignedBuf::new(n, 4096);
        f.read_exact_at(rbuf.as_mut_slice(), off)
            .unwrap_or_else(|e| panic!("O_DIRECT pread at {off}: {e}"));
        assert_same(
            rbuf.as_slice(),
            wbuf.as_slice(),
            &format!("O_DIRECT read back at {off}"),
        );
    }
    // Coherence with buffered I/O in both directions.
    let buffered = File::open(&p).unwrap();
    assert_same(
        &read_at(&buffered, 3 * MIB, n),
        wbuf.as_slice(),
        "buffered read of O_DIRECT data",
    );
    {
        let w = open_rw(&p);
        write_at(&w, 2 * MIB, &pattern(121, n));
        w.sync_all().unwrap();
    }
    let mut rbuf = AlignedBuf::new(n, 4096);
    f.read_exact_at(rbuf.as_mut_slice(), 2 * MIB).unwrap();
    assert_same(
        rbuf.as_slice(),
        &pattern(121, n),
        "O_DIRECT read of buffered data",
    );
    f.sync_all().unwrap();
}

#[test]
fn fsync_fdatasync_dirsync() {
    let pool = pool();
    let m = pool.mount();
    let mut f = open_rw_new(&m.join("f"));
    f.write_all(&pattern(130, 300_000)).unwrap();
    f.sync_data().expect("fdatasync");
    f.write_all(b"more").unwrap();
    f.sync_all().expect("fsync");
    File::open(m.path())
        .unwrap()
        .sync_all()
        .expect("fsync on the root directory");
    fs::create_dir(m.join("d")).unwrap();
    File::open(m.join("d"))
        .unwrap()
        .sync_all()
        .expect("fsync on a subdirectory");
    let mut r = File::open(m.join("f")).unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    assert_eq!(v.len(), 300_004);
}

#[test]
fn data_survives_unmount_and_remount() {
    let pool = pool();
    let big = pattern(140, 5 * MIB as usize + 333);
    let small = pattern(141, 777);
    {
        let m = pool.mount();
        fs::create_dir_all(m.join("dir/sub")).unwrap();
        fs::write(m.join("dir/big"), &big).unwrap();
        fs::write(m.join("dir/sub/small"), &small).unwrap();
        let f = open_rw_new(&m.join("sparse"));
        write_at(&f, 50 * MIB, b"far away");
        drop(f);
        fs::write(m.join("empty"), b"").unwrap();
        symlink("dir/big", m.join("link")).unwrap();
        fs::hard_link(m.join("dir/sub/small"), m.join("hard")).unwrap();
        chmod(&m.join("dir/big"), 0o751);
        chown(&m.join("dir/big"), Some(1000), Some(1001));
        m.unmount();
    }
    pool.assert_check_clean();
    for round in 0..2 {
        let m = pool.mount();
        assert_same(
            &read_all(&m.join("dir/big")),
            &big,
            &format!("big, round {round}"),
        );
        assert_same(&read_all(&m.join("dir/sub/small")), &small, "small");
        let sp = read_all(&m.join("sparse"));
        assert_eq!(sp.len() as u64, 50 * MIB + 8);
        assert_eq!(&sp[50 * MIB as usize..], b"far away");
        assert_zeros(&sp[..50 * MIB as usize], "the hole of sparse");
        assert_eq!(len_of(&m.join("empty")), 0);
        assert_eq!(fs::read_link(m.join("link")).unwrap(), Path::new("dir/big"));
        assert_eq!(nlink_of(&m.join("hard")), 2);
        assert_eq!(mode_of(&m.join("dir/big")), 0o751);
        assert_eq!(owner_of(&m.join("dir/big")), (1000, 1001));
        // Both names of the hard link still share one inode.
        assert_eq!(ino_of(&m.join("hard")), ino_of(&m.join("dir/sub/small")));
        m.unmount();
        pool.assert_check_clean();
    }
}

#[test]
fn permissions_enforced_with_allow_other() {
    let pool = pool();
    let m = pool.mount_opts(&["allow_other"]);
    let secret = m.join("secret");
    let public = m.join("public");
    fs::write(&secret, b"top secret\n").unwrap();
    chmod(&secret, 0o600);
    fs::write(&public, b"hello world\n").unwrap();
    chmod(&public, 0o644);

    // Positive control: another user can read a world-readable file.
    let o = run_as_nobody("cat", &args![&public]);
    assert_success(&o, "uid 65534 cannot read a 0644 file with allow_other");
    assert_eq!(o.stdout, b"hello world\n");

    let o = run_as_nobody("cat", &args![&secret]);
    assert_permission_denied(&o, "uid 65534 read a 0600 root-owned file!");

    // Cannot write a 0644 root file or create in a 0755 root dir.
    let o = run_as_nobody(
        "sh",
        &args!["-c", format!("echo x >> {}", public.display())],
    );
    assert_failure(&o, "uid 65534 appended to a 0644 root-owned file");
    chmod(m.path(), 0o755);
    let o = run_as_nobody("touch", &args![m.join("intruder")]);
    assert_failure(&o, "uid 65534 created a file in a 0755 root-owned dir");

    // In a world-writable dir it can, and owns the new file.
    fs::create_dir(m.join("tmp")).unwrap();
    chmod(&m.join("tmp"), 0o777);
    let o = run_as_nobody("touch", &args![m.join("tmp/mine")]);
    assert_success(&o, "uid 65534 cannot create in a 0777 dir");
    assert_eq!(
        owner_of(&m.join("tmp/mine")),
        (65534, 65534),
        "new file not owned by its creator"
    );
}

#[test]
fn other_users_denied_without_allow_other() {
    let pool = pool();
    let m = pool.mount();
    fs::write(m.join("f"), b"x").unwrap();
    chmod(&m.join("f"), 0o644);
    // Control: uid 65534 can reach the mountpoint's parent.
    let o = run_as_nobody("stat", &args![pool.dir.path()]);
    assert_success(&o, "control failed: nobody cannot stat the temp dir");

    let o = run_as_nobody("stat", &args![m.path()]);
    assert_permission_denied(&o, "uid 65534 could stat the mount without allow_other");
    let o = run_as_nobody("cat", &args![m.join("f")]);
    assert_permission_denied(&o, "uid 65534 read a file without allow_other");
    // root still can.
    assert_eq!(fs::read(m.join("f")).unwrap(), b"x");
}

#[test]
fn read_only_mount() {
    let pool = pool();
    let data = pattern(150, 2 * MIB as usize + 1);
    {
        let m = pool.mount();
        fs::write(m.join("f"), &data).unwrap();
        fs::create_dir(m.join("d")).unwrap();
    }
    let m = pool.mount_opts(&["ro"]);
    assert_same(&read_all(&m.join("f")), &data, "read on a ro mount");
    expect_errno(
        OpenOptions::new().write(true).open(m.join("f")),
        libc::EROFS,
        "open for write on ro mount",
    );
    expect_errno(
        fs::write(m.join("new"), b"x"),
        libc::EROFS,
        "create on ro mount",
    );
    expect_errno(
        fs::create_dir(m.join("d2")),
        libc::EROFS,
        "mkdir on ro mount",
    );
    expect_errno(
        fs::remove_file(m.join("f")),
        libc::EROFS,
        "unlink on ro mount",
    );
    expect_errno(
        fs::rename(m.join("f"), m.join("g")),
        libc::EROFS,
        "rename on ro mount",
    );
    expect_errno(
        fs::set_permissions(m.join("f"), fs::Permissions::from_mode(0o600)),
        libc::EROFS,
        "chmod on ro mount",
    );
    let st = statvfs(m.path());
    assert!(
        st.f_flag & libc::ST_RDONLY != 0,
        "statvfs does not report ST_RDONLY"
    );
    drop(m);
    pool.assert_check_clean();
}

/// copy_file_range(2) of `len` bytes, looping over short copies.
fn copy_range(src: &File, off_in: u64, dst: &File, off_out: u64, len: usize) {
    let (mut off_in, mut off_out) = (off_in as libc::loff_t, off_out as libc::loff_t);
    let mut left = len;
    while left > 0 {
        // SAFETY: valid fds and pointers to live loff_t variables.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            r > 0,
            "copy_file_range returned {r}: {}",
            io::Error::last_os_error()
        );
        left -= r as usize;
    }
}

/// Copying a hole must leave zeros in the destination, not its old bytes.
#[test]
fn copy_file_range_from_hole_zeroes_destination() {
    let pool = pool();
    let m = pool.mount();
    let dst = open_rw_new(&m.join("dst"));
    write_at(&dst, 0, &vec![0xaa; 3 * MIB as usize]);
    let src = open_rw_new(&m.join("src"));
    src.set_len(4 * MIB).unwrap(); // all hole
    write_at(&src, 2 * MIB + 100, b"island"); // a little data inside the range
    copy_range(&src, 0, &dst, 4096, (2 * MIB + 200) as usize);
    let mut want = vec![0xaa; 3 * MIB as usize];
    want[4096..4096 + (2 * MIB + 200) as usize].fill(0);
    want[4096 + (2 * MIB + 100) as usize..][..6].copy_from_slice(b"island");
    assert_same(
        &read_at(&dst, 0, want.len()),
        &want,
        "destination after copying a mostly-hole range",
    );
    drop(dst);
    drop(src);
    let m = pool.remount(m);
    assert_same(&read_all(&m.join("dst")), &want, "after remount");
}

/// Same-file copy from the trailing hole over data (what fsx does).
#[test]
fn copy_file_range_same_file_hole_over_data() {
    let pool = pool();
    let m = pool.mount();
    let f = open_rw_new(&m.join("f"));
    write_at(&f, 0, &vec![0xbb; MIB as usize]);
    f.set_len(4 * MIB).unwrap();
    copy_range(&f, 3 * MIB, &f, 1000, (MIB / 2) as usize);
    let mut want = vec![0xbb; MIB as usize];
    want[1000..1000 + (MIB / 2) as usize].fill(0);
    assert_same(
        &read_at(&f, 0, MIB as usize),
        &want,
        "after copying a hole over data in the same file",
    );
}

/// st_blocks via plain stat(2)/fstat(2) (what coreutils, tar and Python
/// use). Rust's `metadata()` uses statx with extra fields, which makes the
/// kernel refresh FUSE attributes and would hide a stale attribute cache.
fn plain_stat_blocks(p: &Path, f: &File) -> (u64, u64) {
    let c = cstr(p);
    // SAFETY: zeroed stat buffers are valid out-parameters; c is NUL-terminated
    // and f is an open descriptor.
    unsafe {
        let mut a: libc::stat = std::mem::zeroed();
        let mut b: libc::stat = std::mem::zeroed();
        cvt(libc::stat(c.as_ptr(), &mut a)).expect("stat");
        cvt(libc::fstat(f.as_raw_fd(), &mut b)).expect("fstat");
        (a.st_blocks as u64 * 512, b.st_blocks as u64 * 512)
    }
}

/// After write + fsync, stat must already count the blocks (du must not show
/// 0 for a file full of synced data; sparse-detection heuristics in some tools
/// treat st_blocks == 0 with a non-zero size as "all holes").
#[test]
fn st_blocks_current_right_after_fsync() {
    let pool = pool();
    let m = pool.mount();
    let p = m.join("f");
    let f = open_rw_new(&p);
    write_at(&f, 0, &vec![0xaa; 4 * MIB as usize]);
    f.sync_all().unwrap();
    let (via_path, via_fd) = plain_stat_blocks(&p, &f);
    assert!(
        via_fd >= 4 * MIB && via_path >= 4 * MIB,
        "immediately after writing 4 MiB and fsync: st_blocks*512 = {via_path} (stat), \
         {via_fd} (fstat); expected >= 4 MiB"
    );
}

/// A mountpoint with non-ASCII characters and a space (escaped in
/// /proc/self/mountinfo as octal) is recognised: status answers through it and
/// `vpool unmount` unmounts it (it said "not mounted" and left it mounted).
#[test]
fn non_ascii_mountpoint_mounts_and_unmounts() {
    let pool = Pool::new(1, &[]);
    let mp = pool.scratch("mnt é ü");
    fs::create_dir(&mp).unwrap();
    let m = Mount::new(&pool.members[0], &mp, &[]);
    write_synced(&m.join("f"), b"data");
    assert_eq!(status_json(&m.path)["mounted"], true);
    m.unmount();
    assert!(!is_mounted(&mp));
    pool.assert_check_clean();
}
