//! Real clients on a mounted vpool: qemu-img, qemu-io (buffered and O_DIRECT),
//! mkfs.ext4 + e2fsck + debugfs, cp --sparse, and fsx.
//!
//! Every external program runs under coreutils `timeout` (see common).

use crate::common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

fn pool(copies: u32) -> Pool {
    Pool::new(2, &["--copies", &copies.to_string(), "--extent-size", "1M"])
}

/// Run qemu-io on `file` with the given commands; asserts exit 0 and no
/// verification failure in the output.
fn qemu_io(fmt: &str, direct: bool, file: &Path, cmds: &[&str]) -> String {
    let mut a = args!["-f", fmt];
    if direct {
        a.extend(args!["-t", "none"]);
    }
    for c in cmds {
        a.extend(args!["-c", *c]);
    }
    a.push(file.into());
    let o = run_t(300, "qemu-io", &a);
    let t = text(&o);
    assert!(
        o.status.success() && !t.contains("failed") && !t.contains("error"),
        "qemu-io -f {fmt} {} on {file:?} failed for commands {cmds:?}\n{}",
        if direct { "-t none" } else { "" },
        describe(&o)
    );
    t
}

fn qemu_img_ok(a: &[std::ffi::OsString]) -> std::process::Output {
    run_ok("qemu-img", a)
}

/// Pattern writes crossing 1 MiB extent boundaries, unaligned writes and
/// zero writes, verified in the same process, in a fresh process, and after
/// unmount + remount.
fn qemu_io_patterns(fmt: &str, direct: bool) {
    let pool = pool(1);
    let img;
    let writes = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1020k 8k",    // straddles the 1 MiB extent boundary
        "write -P 0x5a 3M 2M",       // two whole extents
        "write -P 0x11 4097 5000",   // unaligned
        "write -P 0x22 7340032 512", // sector at 7 MiB
        "write -z 3584k 64k",        // zeroes inside the 0x5a range
        "write -P 0x33 16777216 1M", // far into the image
    ];
    let reads = [
        "read -P 0xab 0 4097",
        "read -P 0x11 4097 5000",
        "read -P 0xab 9097 1035383", // rest of the 0xab run up to 1020k
        "read -P 0xcd 1020k 8k",
        "read -P 0x00 1028k 1020k", // never written
        "read -P 0x5a 3M 512k",
        "read -P 0x00 3584k 64k",
        "read -P 0x5a 3648k 1472k",
        "read -P 0x22 7340032 512",
        "read -P 0x33 16777216 1M",
        "read -P 0x00 17825792 1M",
    ];
    {
        let m = pool.mount();
        img = m.join(format!("disk.{fmt}"));
        qemu_img_ok(&args!["create", "-f", fmt, &img, "64M"]);
        let mut all: Vec<&str> = writes.to_vec();
        all.extend(reads);
        qemu_io(fmt, direct, &img, &all);
        // A fresh process reads what the first one wrote.
        qemu_io(fmt, direct, &img, &reads);
        qemu_io(fmt, !direct, &img, &reads);
        if fmt == "qcow2" {
            qemu_img_ok(&args!["check", &img]);
        }
        m.unmount();
    }
    pool.assert_check_clean();
    let _m = pool.mount();
    qemu_io(fmt, direct, &img, &reads);
    if fmt == "qcow2" {
        qemu_img_ok(&args!["check", &img]);
    }
}

#[test]
fn qemu_io_raw_buffered() {
    qemu_io_patterns("raw", false);
}

#[test]
fn qemu_io_raw_direct() {
    qemu_io_patterns("raw", true);
}

#[test]
fn qemu_io_qcow2_buffered() {
    qemu_io_patterns("qcow2", false);
}

#[test]
fn qemu_io_qcow2_direct() {
    qemu_io_patterns("qcow2", true);
}

/// `qemu-img map --output=json` regions: (start, length, data).
fn qemu_map(fmt: &str, img: &Path) -> Vec<(u64, u64, bool)> {
    let o = qemu_img_ok(&args!["map", "-f", fmt, "--output=json", img]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("qemu-img map JSON: {e}\n{}", describe(&o)));
    v.as_array()
        .expect("map output is an array")
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn is_data(map: &[(u64, u64, bool)], off: u64) -> bool {
    map.iter()
        .find(|(s, l, _)| (*s..s + l).contains(&off))
        .map(|r| r.2)
        .unwrap_or_else(|| panic!("offset {off} not covered by map {map:?}"))
}

#[test]
fn qemu_img_create_convert_check_map() {
    let pool = pool(1);
    let m = pool.mount();
    let raw = m.join("a.raw");
    let qcow = m.join("a.qcow2");
    let raw2 = m.join("b.raw");
    qemu_img_ok(&args!["create", "-f", "raw", &raw, "64M"]);
    assert_eq!(fs::metadata(&raw).unwrap().len(), 64 * MIB);
    qemu_io(
        "raw",
        false,
        &raw,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 32M 1M",
            "write -P 0xef 63M 4k",
        ],
    );

    // map on raw uses SEEK_DATA/SEEK_HOLE: written ranges are data, the
    // untouched middle is a hole.
    let map = qemu_map("raw", &raw);
    assert!(
        is_data(&map, 0) && is_data(&map, 32 * MIB) && is_data(&map, 63 * MIB),
        "raw map {map:?}"
    );
    assert!(
        !is_data(&map, 16 * MIB),
        "raw map reports no hole at 16 MiB: {map:?}"
    );
    assert!(
        !is_data(&map, 48 * MIB),
        "raw map reports no hole at 48 MiB: {map:?}"
    );

    // raw -> qcow2 -> raw, all inside the mount.
    qemu_img_ok(&args!["convert", "-f", "raw", "-O", "qcow2", &raw, &qcow]);
    qemu_img_ok(&args!["check", "-f", "qcow2", &qcow]);
    qemu_img_ok(&args!["compare", "-f", "raw", "-F", "qcow2", &raw, &qcow]);
    let info = qemu_img_ok(&args!["info", "--output=json", "-f", "qcow2", &qcow]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(64 * MIB));
    let qmap = qemu_map("qcow2", &qcow);
    assert!(
        is_data(&qmap, 32 * MIB) && !is_data(&qmap, 16 * MIB),
        "qcow2 map {qmap:?}"
    );

    qemu_img_ok(&args!["convert", "-f", "qcow2", "-O", "raw", &qcow, &raw2]);
    qemu_img_ok(&args!["compare", "-f", "raw", "-F", "raw", &raw, &raw2]);
    run_ok("cmp", &args![&raw, &raw2]);
    // convert writes zero regions sparsely.
    let ab = alloc_bytes(&raw2);
    assert!(
        ab < 16 * MIB,
        "converted raw image allocates {ab} bytes for ~2 MiB of data"
    );

    // qcow2 created natively in the mount, converted out to the host and back.
    let q2 = m.join("n.qcow2");
    qemu_img_ok(&args!["create", "-f", "qcow2", &q2, "128M"]);
    qemu_io(
        "qcow2",
        false,
        &q2,
        &["write -P 0x42 100M 3M", "write -P 0x24 1M 512k"],
    );
    qemu_img_ok(&args!["check", "-f", "qcow2", &q2]);
    let host_raw = pool.scratch("host.raw");
    qemu_img_ok(&args![
        "convert", "-f", "qcow2", "-O", "raw", &q2, &host_raw
    ]);
    qemu_img_ok(&args![
        "compare", "-f", "qcow2", "-F", "raw", &q2, &host_raw
    ]);
    let back = m.join("back.qcow2");
    qemu_img_ok(&args![
        "convert", "-f", "raw", "-O", "qcow2", "-c", &host_raw, &back
    ]);
    qemu_img_ok(&args!["check", "-f", "qcow2", &back]);
    qemu_img_ok(&args!["compare", "-f", "qcow2", "-F", "qcow2", &q2, &back]);
    qemu_io(
        "qcow2",
        true,
        &back,
        &[
            "read -P 0x42 100M 3M",
            "read -P 0x24 1M 512k",
            "read -P 0 0 1M",
        ],
    );

    // Resize grows the image.
    qemu_img_ok(&args!["resize", "-f", "qcow2", &q2, "+64M"]);
    qemu_img_ok(&args!["check", "-f", "qcow2", &q2]);
    qemu_io(
        "qcow2",
        false,
        &q2,
        &[
            "write -P 0x99 190M 1M",
            "read -P 0x99 190M 1M",
            "read -P 0x42 100M 3M",
        ],
    );

    m.unmount();
    pool.assert_check_clean();
    let m = pool.mount();
    qemu_img_ok(&args!["check", "-f", "qcow2", m.join("n.qcow2")]);
    qemu_img_ok(&args![
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        m.join("a.raw"),
        m.join("a.qcow2")
    ]);
}

#[test]
fn mkfs_ext4_and_fsck_1g_image() {
    let pool = pool(1);
    // Source tree for mke2fs -d, outside the mount.
    let src = pool.scratch("src");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    let big = pattern(1, 7 * MIB as usize + 1234);
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("sub/small"), b"small file\n").unwrap();
    for i in 0..50 {
        fs::write(
            src.join(format!("sub/deeper/f{i}")),
            pattern(100 + i, 5000 + i as usize * 37),
        )
        .unwrap();
    }

    let img;
    {
        let m = pool.mount();
        img = m.join("ext4.img");
        run_ok("truncate", &args!["-s", "1G", &img]);
        let o = run_t(300, "mkfs.ext4", &args!["-F", "-q", "-d", &src, &img]);
        assert!(o.status.success(), "mkfs.ext4 failed\n{}", describe(&o));
        let o = run_t(300, "e2fsck", &args!["-fn", &img]);
        assert!(
            o.status.success(),
            "e2fsck -fn on a fresh image failed\n{}",
            describe(&o)
        );
        let ab = alloc_bytes(&img);
        assert!(
            ab < 400 * MIB,
            "1 GiB ext4 image allocates {ab} bytes: not sparse"
        );
        m.unmount();
    }
    pool.assert_check_clean();
    let m = pool.mount();
    let o = run_t(300, "e2fsck", &args!["-fn", &img]);
    assert!(
        o.status.success(),
        "e2fsck -fn after remount failed\n{}",
        describe(&o)
    );
    // Contents via debugfs.
    let out = pool.scratch("big.out");
    let o = run_t(
        120,
        "debugfs",
        &args!["-R", format!("dump /big {}", out.display()), &img],
    );
    assert!(o.status.success(), "debugfs dump failed\n{}", describe(&o));
    assert_same(&read_all(&out), &big, "file dumped from the ext4 image");
    let o = run_t(120, "debugfs", &args!["-R", "cat /sub/deeper/f49", &img]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_same(
        &o.stdout,
        &pattern(149, 5000 + 49 * 37),
        "small file via debugfs cat",
    );
    // A write through debugfs (-w) then fsck again.
    let o = run_t(120, "debugfs", &args!["-w", "-R", "mkdir /newdir", &img]);
    assert!(o.status.success(), "{}", describe(&o));
    let o = run_t(300, "e2fsck", &args!["-fn", &img]);
    assert!(
        o.status.success(),
        "e2fsck -fn after debugfs -w failed\n{}",
        describe(&o)
    );
    drop(m);
}

fn du_k(p: &Path, apparent: bool) -> u64 {
    let a = if apparent {
        args!["-k", "--apparent-size", p]
    } else {
        args!["-k", p]
    };
    let o = run_ok("du", &a);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse du output\n{}", describe(&o)))
}

#[test]
fn cp_sparse_in_and_out() {
    let pool = pool(1);
    let m = pool.mount();
    let src = pool.scratch("src.sparse");
    let size = 200 * MIB;
    {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&src)
            .unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&pattern(7, MIB as usize), 0).unwrap();
        f.write_all_at(&pattern(8, MIB as usize + 17), 150 * MIB)
            .unwrap();
        f.write_all_at(&pattern(9, 4096), size - 4096).unwrap();
    }
    let inside = m.join("copy");
    run_ok("cp", &args!["--sparse=always", &src, &inside]);
    run_ok("cmp", &args![&src, &inside]);
    assert_eq!(
        du_k(&inside, true),
        size / 1024,
        "apparent size in the mount"
    );
    let used = du_k(&inside, false);
    assert!(
        used < 16 * 1024,
        "du reports {used} KiB for a sparse file with ~2 MiB of data"
    );
    let stored = pool.stored_bytes_on_disk();
    assert!(
        stored < 16 * MIB,
        "members store {stored} bytes for ~2 MiB of data"
    );

    let back = pool.scratch("back.sparse");
    run_ok("cp", &args!["--sparse=always", &inside, &back]);
    run_ok("cmp", &args![&src, &back]);
    let used = du_k(&back, false);
    assert!(
        used < 16 * 1024,
        "copy out of the mount is not sparse: {used} KiB"
    );

    // Also a plain (auto) copy within the mount.
    run_ok("cp", &args![&inside, m.join("copy2")]);
    run_ok("cmp", &args![&src, m.join("copy2")]);
}

fn run_fsx(pool: &Pool, m: &Mount, name: &str, cfg: &str, numops: u64, seed: u64) {
    let fsx = fsx_path().expect(
        "fsx not found (crate fsx 0.3.2: `cargo install fsx --locked`; or set FSX=/path/to/fsx)",
    );
    let cfg_path = pool.scratch(&format!("{name}.toml"));
    fs::write(&cfg_path, cfg).unwrap();
    let artifacts = pool.scratch(&format!("{name}-artifacts"));
    fs::create_dir_all(&artifacts).unwrap();
    let file = m.join(format!("{name}.bin"));
    let o = run_t(
        900,
        &fsx,
        &args![
            "-N",
            numops.to_string(),
            "-S",
            seed.to_string(),
            "-f",
            &cfg_path,
            "-P",
            &artifacts,
            &file
        ],
    );
    if !o.status.success() {
        // fsx prints the miscompare first, then a dump of up to 1024 ops:
        // show the head and the most recent ops.
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = err.lines().collect();
        let head = lines
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        panic!(
            "fsx {name} (seed {seed}, {numops} ops) failed with {:?}; reproduce with \
             `fsx -N {numops} -S {seed} -f CFG FILE` and this config:\n{cfg}\n\
             --- stdout ---\n{}\n--- stderr (head) ---\n{head}\n--- stderr (last ops) ---\n{tail}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
        );
    }
}

/// 100k random operations (read/write/mmap/truncate/punch hole/fallocate/
/// copy_file_range/...) on an 8 MiB file spanning 8 extents.
#[test]
fn fsx_100k_ops() {
    // Members on tmpfs: fsx msyncs after every mmap write, and disk flushes
    // would dominate the run time.
    let pool = Pool::new_on_tmpfs(2, "256M", &["--extent-size", "1M"]);
    let m = pool.mount();
    let cfg = r#"
flen = 8388608
[opsize]
max = 65536
[weights]
read = 10
write = 10
mapread = 4
mapwrite = 4
truncate = 3
punch_hole = 3
posix_fallocate = 1
copy_file_range = 2
sendfile = 1
posix_fadvise = 1
close_open = 1
invalidate = 1
fsync = 0.2
fdatasync = 0.2
"#;
    run_fsx(&pool, &m, "fsx", cfg, 100_000, 20240601);
    drop(m);
    pool.assert_check_clean();
}

/// Larger operations over a 40 MiB file on a two-copy pool.
#[test]
fn fsx_large_ops_two_copies() {
    let pool = Pool::new_on_tmpfs(2, "256M", &["--copies", "2", "--extent-size", "1M"]);
    let m = pool.mount();
    let cfg = r#"
flen = 41943040
[opsize]
max = 1048576
[weights]
read = 10
write = 10
mapread = 2
mapwrite = 2
truncate = 2
punch_hole = 2
posix_fallocate = 1
copy_file_range = 2
close_open = 1
fsync = 0.2
"#;
    run_fsx(&pool, &m, "fsx-large", cfg, 10_000, 77);
    drop(m);
    pool.assert_check_clean();
}
