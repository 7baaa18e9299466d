//! `rbd diff v1` exports imported by a real single-node Ceph: a full export
//! and two incrementals with discards go through `rbd import-diff` (a file,
//! then stdin), and `rbd export` must give back each snapshot's file byte for
//! byte (`import-diff` exits 0 on many malformed streams, so its exit code
//! alone proves little).
//!
//! Ceph comes from Debian's packages (installed here when missing) and is
//! started by scripts/minceph.sh: one monitor, one BlueStore OSD on a file,
//! loopback only. The test is ignored by default (it installs packages and
//! starts daemons); scripts/test.sh runs it with `--ignored`. When Ceph cannot
//! be installed or started it prints `SKIPPED:` and why, and scripts/test.sh
//! reports it as skipped.

use crate::common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use common::*;

/// A running single-node cluster; stopped (by pid) and removed on drop.
struct Ceph {
    dir: PathBuf,
    conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/minceph.sh")
}

fn have_ceph() -> bool {
    ["ceph-mon", "ceph-osd", "rbd", "monmaptool", "uuidgen"]
        .iter()
        .all(|t| {
            run_t(10, "sh", &["-c", &format!("command -v {t}")])
                .status
                .success()
        })
}

impl Ceph {
    /// Installs (when missing) and starts a cluster, or says why not.
    fn start() -> Result<Ceph, String> {
        if !have_ceph() {
            eprintln!("installing ceph-mon ceph-osd ceph-common ...");
            let o = run_t(
                300,
                "apt-get",
                &[
                    "install",
                    "-y",
                    "ceph-mon",
                    "ceph-osd",
                    "ceph-common",
                    "uuid-runtime",
                ],
            );
            if !have_ceph() {
                return Err(format!(
                    "the Ceph packages cannot be installed: {}",
                    describe(&o)
                ));
            }
        }
        let busy = run_t(10, "sh", &["-c", "ss -ltn | grep -q ':3300 '"]);
        if busy.status.success() {
            return Err("port 3300 is in use (another Ceph monitor runs here)".into());
        }
        // Short: the daemons' admin sockets live under it.
        let dir = PathBuf::from(format!("/tmp/vpceph-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{dir:?}: {e}"))?;
        let c = Ceph {
            conf: dir.join("ceph.conf"),
            dir,
        };
        let t = Instant::now();
        let o = run_t(
            120,
            "bash",
            &[script().as_os_str(), "start".as_ref(), c.dir.as_os_str()],
        );
        if !o.status.success() {
            let log = std::fs::read_to_string(c.dir.join("log/osd.out")).unwrap_or_default();
            return Err(format!(
                "Ceph did not start: {}\n{}",
                describe(&o),
                &log[log.len().saturating_sub(2000)..]
            ));
        }
        eprintln!("ceph started in {:.1} s", t.elapsed().as_secs_f64());
        Ok(c)
    }

    fn rbd(&self, a: &[OsString]) -> Output {
        let mut v = args!["-c", &self.conf];
        v.extend(a.iter().cloned());
        run_t(60, "rbd", &v)
    }

    fn rbd_ok(&self, a: &[OsString]) -> Output {
        let o = self.rbd(a);
        assert!(o.status.success(), "rbd {a:?}\n{}", describe(&o));
        o
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        run_t(
            60,
            "bash",
            &[script().as_os_str(), "stop".as_ref(), self.dir.as_os_str()],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "installs and starts a real Ceph: scripts/test.sh runs it with --ignored"]
fn rbd_import_diff_rebuilds_every_snapshot() {
    let pool = Pool::new(2, &["--extent-size", "4M"]);
    let m = pool.mount();
    let mnt = m.path().to_path_buf();
    let img = m.join(IMG);
    write_first(&img);
    vpool_ok(&args!["snapshot", "create", "--wait", &mnt, "s1"]);
    change(&img);
    vpool_ok(&args!["snapshot", "create", "--wait", &mnt, "s2"]);
    change_again(&img);
    vpool_ok(&args!["snapshot", "create", "--wait", &mnt, "s3"]);
    let out = pool.scratch("rbd");
    std::fs::create_dir(&out).unwrap();
    let streams = [
        (None, "s1", out.join("s1.rbd")),
        (Some("s1"), "s2", out.join("s1-s2.rbd")),
        (Some("s2"), "s3", out.join("s2-s3.rbd")),
    ];
    for (base, name, file) in &streams {
        let mut a = args!["snapshot", "export", "--format", "rbd-diff"];
        if let Some(b) = base {
            a.extend(args!["--from", b]);
        }
        a.extend(args![&mnt, name, IMG, file]);
        vpool_ok(&a);
        // Strictly well-formed before Ceph sees it.
        vpool::export::rbd::decode(&read_all(file)).unwrap_or_else(|e| panic!("{file:?}: {e}"));
    }

    let t = Instant::now();
    let ceph = match Ceph::start() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("SKIPPED: rbd_import_diff_rebuilds_every_snapshot: {why}");
            return;
        }
    };
    let size = std::fs::metadata(m.join(".snapshots/s1").join(IMG))
        .unwrap()
        .len();
    ceph.rbd_ok(&args![
        "create",
        "--size",
        format!("{}K", size / 1024),
        "rbd/img"
    ]);
    for (i, (_, name, file)) in streams.iter().enumerate() {
        if i == 2 {
            // The last one through stdin.
            let cmd = format!(
                "rbd -c {} import-diff - rbd/img < {}",
                ceph.conf.display(),
                file.display()
            );
            run_ok("bash", &args!["-c", cmd]);
        } else {
            ceph.rbd_ok(&args!["import-diff", file, "rbd/img"]);
        }
        let got = out.join(format!("{name}.from-ceph"));
        ceph.rbd_ok(&args!["export", format!("rbd/img@{name}"), &got]);
        run_ok(
            "cmp",
            &args![&got, m.join(".snapshots").join(name).join(IMG)],
        );
    }
    // The head is the last snapshot; a stream applied twice is refused
    // (its to-snapshot exists).
    let head = out.join("head.from-ceph");
    ceph.rbd_ok(&args!["export", "rbd/img", &head]);
    run_ok("cmp", &args![&head, m.join(".snapshots/s3").join(IMG)]);
    let again = ceph.rbd(&args!["import-diff", &streams[2].2, "rbd/img"]);
    assert!(!again.status.success(), "import-diff applied s3 twice");
    eprintln!("ceph part took {:.1} s", t.elapsed().as_secs_f64());
    drop(ceph);
    m.unmount();
}
