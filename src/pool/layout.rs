//! The names of everything vpool keeps in a member directory, in one place
//! (docs/design.md section 3). No other code spells a member file's name: it
//! asks here, so that a name cannot drift between the layer that writes a
//! file and the one that finds, checks or removes it.
//!
//! ```text
//! DIR/vpool-label.0, DIR/vpool-label.1   two copies of the label (label.rs)
//! DIR/meta.redb                          this member's copy of the metadata (meta.rs)
//! DIR/meta.redb.damaged                  a copy that did not open, set aside when rebuilt
//! DIR/data/<ino>.<index>.<file_id>       one sparse file per extent copy
//! DIR/data/<ino>.<index>.<file_id>.sum   its block checksums (sums.rs)
//! DIR/vpool.lock                         flock held by the daemon: "<pid>\n<mountpoint>\n"
//! DIR/intent.0, DIR/intent.1             write-intent log, by tag parity (intent.rs)
//! DIR/quarantine/                        extent and sum files of a diverged member set aside
//! DIR/snap/<id>/<ino>.<seq>.vd           snapshot delta files (snapshot module)
//! DIR/recv/<identity>.part               a receive's stream so far, kept to resume it
//! ```
//!
//! Invariants: these names are part of the on-disk format and never change
//! (a test pins them). Numbers in names are decimal. A name in `data/` that
//! does not parse as an extent or sum file is not vpool's and is left alone.
//! A file replaced atomically is first written as `.<name>.tmp` beside it
//! (`storage::write_file_atomic`); a crash may leave one, which is ignored.

use std::path::{Path, PathBuf};

/// The two label copies, written one after the other.
pub const LABEL_FILES: [&str; 2] = ["vpool-label.0", "vpool-label.1"];

/// Left in a member directory when the member is retired (`device remove`,
/// `device replace`): the pool's label at that moment, which no longer lists
/// it, so that an open through a member that missed the change finds the
/// members that replaced it.
pub const RETIRED_FILE: &str = "vpool-retired";

/// This member's copy of the metadata (a redb database).
pub const META_FILE: &str = "meta.redb";

/// Where a metadata copy that did not open is kept when it is rebuilt.
pub const META_DAMAGED_FILE: &str = "meta.redb.damaged";

/// The directory of extent files and their sum files.
pub const DATA_DIR: &str = "data";

/// Suffix of a sum file: the name of its extent file, then this.
pub const SUM_SUFFIX: &str = ".sum";

/// The daemon's lock file; it also says who holds it ([`lock_info`]).
pub const LOCK_FILE: &str = "vpool.lock";

/// The write-intent log, one file per tag parity.
pub const INTENT_FILES: [&str; 2] = ["intent.0", "intent.1"];

/// Extent files of a diverged member that the winning copy does not reference.
pub const QUARANTINE_DIR: &str = "quarantine";

/// The directory of snapshot delta files, one subdirectory per snapshot id.
pub const SNAP_DIR: &str = "snap";

/// The directory of the streams of receives in progress or interrupted.
pub const RECV_DIR: &str = "recv";

/// The spool of a receive of the snapshot whose identity, in hex, is `ident`.
pub fn recv_spool(dir: &Path, ident: &str) -> PathBuf {
    dir.join(RECV_DIR).join(format!("{ident}.part"))
}

/// Suffix of a snapshot delta file.
pub const DELTA_SUFFIX: &str = ".vd";

/// The member file of one extent copy: `DIR/data/<ino>.<index>.<file_id>` on
/// member `member`. It names the file, not an open descriptor: the descriptor
/// cache (fds.rs) is keyed by it, and files to remove after a commit are
/// listed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentFile {
    /// Member id (the label's entry id, not its position).
    pub member: u32,
    pub ino: u64,
    /// Extent index within the file: bytes `[index*E, (index+1)*E)`.
    pub index: u64,
    /// The fresh id shared by the copies of one placement of the extent.
    pub file_id: u64,
}

impl ExtentFile {
    /// Its name within the member's `data/` ([`extent_file_name`]).
    pub fn name(&self) -> String {
        extent_file_name(self.ino, self.index, self.file_id)
    }

    /// The name of its sum file ([`sum_file_name`]).
    pub fn sum_name(&self) -> String {
        sum_file_name(self.ino, self.index, self.file_id)
    }
}

/// Name of the member file holding one extent copy.
pub fn extent_file_name(ino: u64, index: u64, file_id: u64) -> String {
    format!("{ino}.{index}.{file_id}")
}

/// Name of the sum file of one extent copy.
pub fn sum_file_name(ino: u64, index: u64, file_id: u64) -> String {
    format!("{}{SUM_SUFFIX}", extent_file_name(ino, index, file_id))
}

/// Parses an extent file name back into `(ino, index, file_id)`.
pub fn parse_extent_file_name(name: &str) -> Option<(u64, u64, u64)> {
    let mut it = name.split('.');
    let ino = it.next()?.parse().ok()?;
    let index = it.next()?.parse().ok()?;
    let fid = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((ino, index, fid))
}

/// Parses a name found in `data/`: `(ino, index, file_id)` when it is an
/// extent file or a sum file name, and whether it is a sum file (by its
/// suffix, even when the rest does not parse).
pub fn parse_data_file_name(name: &str) -> (Option<(u64, u64, u64)>, bool) {
    match name.strip_suffix(SUM_SUFFIX) {
        Some(base) => (parse_extent_file_name(base), true),
        None => (parse_extent_file_name(name), false),
    }
}

/// The intent file that records of tag parity `parity` go to.
pub fn intent_file_name(parity: u64) -> &'static str {
    INTENT_FILES[(parity % 2) as usize]
}

/// What the lock file holds while a daemon has the pool open.
pub fn lock_info(pid: u32, mountpoint: &Path) -> String {
    format!("{pid}\n{}\n", mountpoint.display())
}

/// Parses [`lock_info`] back into `(pid, mountpoint)`.
pub fn parse_lock_info(bytes: &[u8]) -> Option<(u32, PathBuf)> {
    let s = String::from_utf8_lossy(bytes);
    let mut lines = s.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let mp = PathBuf::from(lines.next()?.trim());
    Some((pid, mp))
}

/// The directory of snapshot `id`'s delta files in member directory `dir`.
pub fn snapshot_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(SNAP_DIR).join(id.to_string())
}

/// Name of delta file `seq` of inode `ino` in a snapshot directory.
pub fn delta_file_name(ino: u64, seq: u32) -> String {
    format!("{ino}.{seq}{DELTA_SUFFIX}")
}

/// Parses a delta file name back into `(ino, seq)`.
pub fn parse_delta_file_name(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(DELTA_SUFFIX)?;
    let (ino, seq) = stem.split_once('.')?;
    Some((ino.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are the on-disk format of docs/design.md section 3: any
    /// change here strands every existing pool.
    #[test]
    fn names_are_pinned() {
        assert_eq!(LABEL_FILES, ["vpool-label.0", "vpool-label.1"]);
        assert_eq!(META_FILE, "meta.redb");
        assert_eq!(RETIRED_FILE, "vpool-retired");
        assert_eq!(META_DAMAGED_FILE, format!("{META_FILE}.damaged"));
        assert_eq!(DATA_DIR, "data");
        assert_eq!(LOCK_FILE, "vpool.lock");
        assert_eq!(INTENT_FILES, ["intent.0", "intent.1"]);
        assert_eq!(QUARANTINE_DIR, "quarantine");
        assert_eq!(SNAP_DIR, "snap");
        assert_eq!(RECV_DIR, "recv");
        assert_eq!(
            recv_spool(Path::new("/m"), "ab"),
            Path::new("/m/recv/ab.part")
        );
        assert_eq!(extent_file_name(12, 3, 45), "12.3.45");
        assert_eq!(sum_file_name(12, 3, 45), "12.3.45.sum");
        assert_eq!(intent_file_name(0), "intent.0");
        assert_eq!(intent_file_name(7), "intent.1");
        assert_eq!(delta_file_name(12, 3), "12.3.vd");
        assert_eq!(
            snapshot_dir(Path::new("/m"), 5),
            Path::new("/m/snap/5").to_path_buf()
        );
        assert_eq!(lock_info(42, Path::new("/mnt/images")), "42\n/mnt/images\n");
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_extent_file_name("12.3.45"), Some((12, 3, 45)));
        for bad in ["12.3", "12.3.45.6", "12.x.45", "", "12.3.45.sum", "a.b.c"] {
            assert_eq!(parse_extent_file_name(bad), None, "{bad}");
        }
        assert_eq!(parse_data_file_name("12.3.45"), (Some((12, 3, 45)), false));
        assert_eq!(
            parse_data_file_name("12.3.45.sum"),
            (Some((12, 3, 45)), true)
        );
        assert_eq!(parse_data_file_name("notes.sum"), (None, true));
        assert_eq!(parse_data_file_name("notes"), (None, false));
        assert_eq!(parse_delta_file_name("12.3.vd"), Some((12, 3)));
        for bad in ["x.vd", "12.vd", "12.3", "12.3.4.vd"] {
            assert_eq!(parse_delta_file_name(bad), None, "{bad}");
        }
        assert_eq!(
            parse_lock_info(lock_info(42, Path::new("/mnt/images")).as_bytes()),
            Some((42, PathBuf::from("/mnt/images")))
        );
        assert_eq!(parse_lock_info(b""), None);
        assert_eq!(parse_lock_info(b"42\n"), None);
        assert_eq!(parse_lock_info(b"x\n/mnt\n"), None);
    }
}
