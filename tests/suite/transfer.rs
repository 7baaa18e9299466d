//! Backups that leave the pool, through the real command line and mounts:
//! `vpool snapshot send | vpool snapshot receive` between two mounted pools
//! (shell pipes), into an unmounted pool, a backup directory with `--to` and
//! its retention, `vpool stream verify|list|restore` after the source pool
//! is destroyed, and damaged or cut streams at every consumer, with the
//! resume token printed by the failed receive.
//!
//! Every external program runs under coreutils `timeout` (see common).

use crate::common;

use std::path::Path;

use common::*;

/// `sh -c SCRIPT` with `$V` the vpool binary, under a timeout.
fn sh(script: &str) -> std::process::Output {
    run_t_env(120, "sh", &["-c", script], &[("V", VPOOL)])
}

fn sh_ok(script: &str) -> std::process::Output {
    let o = sh(script);
    assert!(o.status.success(), "{script}\n{}", describe(&o));
    o
}

/// An image with data, an all-zero run and a hole.
fn write_image(p: &Path, seed: u64) {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(p)
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(seed, 3 << 20), 0).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 4 << 20).unwrap();
    f.write_all_at(&pattern(seed + 1, 1 << 20), 8 << 20)
        .unwrap();
    f.sync_all().unwrap();
}

fn rewrite(p: &Path, seed: u64, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&pattern(seed, 256 << 10), at).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        1 << 20,
        512 << 10,
    )
    .unwrap();
    f.sync_all().unwrap();
}

fn cmp_ok(a: &Path, b: &Path) {
    let o = run("cmp", &[a.as_os_str(), b.as_os_str()]);
    assert!(
        o.status.success(),
        "{} vs {}: {}",
        a.display(),
        b.display(),
        describe(&o)
    );
}

#[test]
fn send_receive_between_pools_resume_and_restore_without_a_pool() {
    let a = Pool::new(2, &[]);
    let b = Pool::new(3, &[]);
    let ma = a.mount();
    let mb = b.mount();
    std::fs::create_dir(ma.join("vm")).unwrap();
    let img = ma.join("vm/disk.img");
    write_image(&img, 1);
    std::fs::write(ma.join("notes.txt"), b"hello").unwrap();
    vpool_ok(&args!["snapshot", "create", "--wait", ma.path(), "s1"]);
    rewrite(&img, 7, 2 << 20);
    vpool_ok(&args!["snapshot", "create", "--wait", ma.path(), "s2"]);
    rewrite(&img, 9, 6 << 20);
    std::fs::remove_file(ma.join("notes.txt")).unwrap();
    vpool_ok(&args!["snapshot", "create", "--wait", ma.path(), "s3"]);
    let (pa, pb) = (ma.path().display(), mb.path().display());

    // A full, then an incremental, through pipes between two mounted pools.
    sh_ok(&format!(
        "$V snapshot send {pa} s1 | $V snapshot receive {pb}"
    ));
    let o = sh_ok(&format!(
        "$V snapshot send --from s1 {pa} s2 | $V --json snapshot receive {pb}"
    ));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["snapshot"]["received"], true, "{v}");
    assert_eq!(v["snapshot"]["base"], "s1", "{v}");
    for s in ["s1", "s2"] {
        cmp_ok(
            &ma.join(format!(".snapshots/{s}/vm/disk.img")),
            &mb.join(format!(".snapshots/{s}/vm/disk.img")),
        );
    }
    assert_eq!(
        std::fs::read(mb.join(".snapshots/s1/notes.txt")).unwrap(),
        b"hello"
    );

    // A stream cut short: exit 1, nothing received, a resume token; the
    // resumed send completes it.
    let stream3 = a.scratch("s3.vps");
    sh_ok(&format!(
        "$V snapshot send --from s2 -o {} {pa} s3",
        stream3.display()
    ));
    // A damaged stream: refused, with the record's offset.
    let mut bad = std::fs::read(&stream3).unwrap();
    let n = bad.len() / 2;
    bad[n] ^= 0x10;
    let badp = a.scratch("bad.vps");
    std::fs::write(&badp, &bad).unwrap();
    let o = vpool(&args![
        "snapshot",
        "receive",
        "--name",
        "x",
        "-i",
        &badp,
        mb.path()
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("corrupted"), "{}", describe(&o));
    vpool_ok(&args!["snapshot", "receive", "--abort", mb.path()]);

    let len = std::fs::metadata(&stream3).unwrap().len();
    let o = sh(&format!(
        "head -c {} {} | $V snapshot receive {pb}",
        len - 100,
        stream3.display()
    ));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    let err = text(&o);
    assert!(err.contains("truncated"), "{err}");
    let token = err
        .split_whitespace()
        .find(|w| w.starts_with("vpr1-"))
        .unwrap_or_else(|| panic!("no token in {err}"))
        .to_string();
    let o = vpool_ok(&args!["--json", "snapshot", "list", mb.path()]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("\"s3\""));
    sh_ok(&format!(
        "$V snapshot send --from s2 --resume {token} {pa} s3 | $V snapshot receive {pb}"
    ));
    cmp_ok(
        &ma.join(".snapshots/s3/vm/disk.img"),
        &mb.join(".snapshots/s3/vm/disk.img"),
    );
    assert!(!mb.join(".snapshots/s3/notes.txt").exists());
    // The received snapshot restores into B's live tree and clones.
    vpool_ok(&args!["snapshot", "restore", mb.path(), "s2"]);
    cmp_ok(
        &ma.join(".snapshots/s2/vm/disk.img"),
        &mb.join("vm/disk.img"),
    );
    vpool_ok(&args![
        "snapshot",
        "clone",
        mb.path(),
        "s3",
        "vm/disk.img",
        "copy.img"
    ]);
    cmp_ok(&ma.join(".snapshots/s3/vm/disk.img"), &mb.join("copy.img"));

    // Into a pool that is not mounted (the CLI opens it itself).
    let c = Pool::new(1, &[]);
    let c0 = c.members[0].clone();
    sh_ok(&format!(
        "$V snapshot send {pa} s2 | $V snapshot receive {}",
        c0.display()
    ));
    let mc = c.mount();
    cmp_ok(
        &ma.join(".snapshots/s2/vm/disk.img"),
        &mc.join(".snapshots/s2/vm/disk.img"),
    );
    drop(mc);

    // A backup directory: the chain by name, retention keeps what it needs.
    let dir = a.scratch("backups");
    for s in ["s1", "s2", "s3"] {
        vpool_ok(&args![
            "snapshot",
            "send",
            "--to",
            &dir,
            "--keep-last",
            "1",
            ma.path(),
            s
        ]);
    }
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "000001-s1.full.vpstream",
            "000002-s2.from-s1.vpstream",
            "000003-s3.from-s2.vpstream"
        ],
        "--keep-last 1 keeps s3 and the chain it needs"
    );
    let o = vpool_ok(&args!["status", ma.path()]);
    assert!(
        text(&o).contains("newest snapshot off the pool: s3"),
        "{}",
        describe(&o)
    );
    let streams: Vec<std::path::PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    let o = vpool_ok(&args!["stream", "list", &streams[1]]);
    assert!(text(&o).contains("incremental"), "{}", describe(&o));

    // The source pool is gone; the streams alone rebuild the newest tree.
    let want = std::fs::read(ma.join(".snapshots/s3/vm/disk.img")).unwrap();
    drop(mb);
    ma.unmount();
    for m in &a.members {
        std::fs::remove_dir_all(m).unwrap();
    }
    let dest = b.scratch("restored");
    let mut args = args!["stream", "restore"];
    args.extend(streams.iter().map(|p| p.into()));
    args.push(dest.clone().into());
    vpool_ok(&args);
    assert_same(
        &std::fs::read(dest.join("vm/disk.img")).unwrap(),
        &want,
        "restored image",
    );
    assert!(!dest.join("notes.txt").exists());
    // Sparse: the hole in the middle takes no space.
    assert!(alloc_bytes(&dest.join("vm/disk.img")) < want.len() as u64);
    // Verify: good streams pass; a damaged one is exit 3; a restore from a
    // cut one fails naming it.
    vpool_ok(&args!["stream", "verify", &streams[0], &streams[2]]);
    let o = vpool(&args!["stream", "verify", &badp]);
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    let cut = b.scratch("cut.vps");
    std::fs::write(&cut, &std::fs::read(&streams[1]).unwrap()[..1000]).unwrap();
    let o = vpool(&args![
        "stream",
        "restore",
        &streams[0],
        &cut,
        b.scratch("r2")
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cut.vps"), "{}", describe(&o));
    // Every consumer refuses both: verify a cut one (exit 3), list either
    // (exit 1, naming it), restore from a damaged one (exit 1, naming it).
    let o = vpool(&args!["stream", "verify", &cut]);
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    for p in [&cut, &badp] {
        let o = vpool(&args!["stream", "list", p]);
        assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
        assert!(text(&o).contains(&*p.to_string_lossy()), "{}", describe(&o));
    }
    let o = vpool(&args![
        "stream",
        "restore",
        &streams[0],
        &streams[1],
        &badp,
        b.scratch("r3")
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(text(&o).contains("bad.vps"), "{}", describe(&o));
}
