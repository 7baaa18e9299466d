//! Member labels: the record in every member directory that says which pool the
//! member belongs to, which member it is, and where the other members are.
//!
//! Each member holds two copies, `vpool-label.0` and `vpool-label.1`, written one
//! after the other (each by write-temp, fsync, rename, fsync-dir). A reader takes the
//! valid copy with the highest generation, so a crash while rewriting one copy
//! never loses the label. The byte layout is in `docs/design.md` and pinned by a test.

use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bytes::{LeReader, read_capped};
use crate::error::{Error, Result};
use crate::storage::{Storage, write_file_atomic};

pub const LABEL_MAGIC: &[u8; 8] = b"VPOOLLBL";
pub const LABEL_VERSION: u32 = 1;
pub use super::layout::{LABEL_FILES, RETIRED_FILE};
/// Size of the fixed part before the member entries.
const FIXED_LEN: usize = 88;
/// Bounds of the settings a label may hold (see [`PoolConfig::validate`]).
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
pub const MAX_EXTENT_SIZE: u64 = 1 << 32;
/// Most blocks in one extent: bounds its sum table (4 bytes a block) and its
/// changed-block bitmap (1 bit a block).
pub const MAX_EXTENT_BLOCKS: u64 = 1 << 20;
pub const MAX_MEMBERS: usize = 256;
/// Longest member path (bytes; `PATH_MAX` less the NUL).
pub const MAX_PATH: usize = 4095;
/// Largest label file a reader accepts: a valid label is always smaller.
pub const MAX_LABEL_BYTES: u64 = 2 << 20;
const _: () = assert!(FIXED_LEN + MAX_MEMBERS * (22 + MAX_PATH) + 4 <= MAX_LABEL_BYTES as usize);

/// Pool-wide settings fixed at creation (copies may change later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub copies: u32,
    pub block_size: u32,
    pub extent_size: u64,
}

impl PoolConfig {
    /// Checks the settings for a pool of `members` members: block size a power
    /// of two in [`MIN_BLOCK_SIZE`]`..=`[`MAX_BLOCK_SIZE`], extent size a power
    /// of two from the block size to [`MAX_EXTENT_SIZE`] and at most
    /// [`MAX_EXTENT_BLOCKS`] blocks, copies in `1..=members`.
    pub fn validate(&self, members: usize) -> std::result::Result<(), String> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(format!(
                "block size {bs} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            ));
        }
        let es = self.extent_size;
        if !es.is_power_of_two() || !(u64::from(bs)..=MAX_EXTENT_SIZE).contains(&es) {
            return Err(format!(
                "extent size {es} is not a power of two in {bs} (the block size)..={MAX_EXTENT_SIZE}"
            ));
        }
        if es / u64::from(bs) > MAX_EXTENT_BLOCKS {
            return Err(format!(
                "extent size {es} is {} blocks of {bs}, more than {MAX_EXTENT_BLOCKS}",
                es / u64::from(bs)
            ));
        }
        if self.copies == 0 || self.copies as usize > members {
            return Err(format!(
                "copies {} is not in 1..={members} (the number of members)",
                self.copies
            ));
        }
        Ok(())
    }
}

/// One member as the label lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEntry {
    pub uuid: Uuid,
    /// Stable small id used in extent records; never reused within a pool.
    pub id: u32,
    /// Absolute path where the member was last seen.
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub pool: Uuid,
    /// The member this label lives on.
    pub member: Uuid,
    pub generation: u64,
    pub created: i64,
    pub config: PoolConfig,
    pub members: Vec<MemberEntry>,
}

impl Label {
    pub fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let mut b = Vec::with_capacity(FIXED_LEN + 64 * self.members.len() + 4);
        b.extend_from_slice(LABEL_MAGIC);
        b.extend_from_slice(&LABEL_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // flags, reserved
        b.extend_from_slice(self.pool.as_bytes());
        b.extend_from_slice(self.member.as_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.created.to_le_bytes());
        b.extend_from_slice(&self.config.copies.to_le_bytes());
        b.extend_from_slice(&self.config.block_size.to_le_bytes());
        b.extend_from_slice(&self.config.extent_size.to_le_bytes());
        b.extend_from_slice(&(self.members.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // reserved
        debug_assert_eq!(b.len(), FIXED_LEN);
        for m in &self.members {
            let p = m.path.as_os_str().as_bytes();
            b.extend_from_slice(m.uuid.as_bytes());
            b.extend_from_slice(&m.id.to_le_bytes());
            b.extend_from_slice(&(p.len() as u16).to_le_bytes());
            b.extend_from_slice(p);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a label copy (see [`Label::validate`]); the
    /// error says what is wrong with it.
    pub fn decode(b: &[u8]) -> std::result::Result<Label, String> {
        use std::os::unix::ffi::OsStrExt;
        if b.len() < FIXED_LEN + 4 {
            return Err(format!("too short ({} bytes)", b.len()));
        }
        if &b[0..8] != LABEL_MAGIC {
            return Err("bad magic".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let want = crate::bytes::Fields::exact(crc, 4, "label checksum")?.u32(0);
        if crc32c::crc32c(body) != want {
            return Err("checksum mismatch".into());
        }
        let mut r = LeReader::new(body);
        r.bytes(8, "magic")?;
        let version = r.u32("version")?;
        if version != LABEL_VERSION {
            return Err(format!("unsupported label version {version}"));
        }
        r.u32("flags")?;
        let pool = Uuid::from_bytes(r.array("pool uuid")?);
        let member = Uuid::from_bytes(r.array("member uuid")?);
        let generation = r.u64("generation")?;
        let created = r.i64("creation time")?;
        let config = PoolConfig {
            copies: r.u32("copies")?,
            block_size: r.u32("block size")?,
            extent_size: r.u64("extent size")?,
        };
        let count = r.u32("member count")? as usize;
        r.u32("reserved")?;
        if count > MAX_MEMBERS {
            return Err(format!("{count} members, more than {MAX_MEMBERS}"));
        }
        let mut members = Vec::with_capacity(count);
        for i in 0..count {
            let uuid = Uuid::from_bytes(
                r.array("member uuid")
                    .map_err(|e| format!("member list: {e}"))?,
            );
            let id = r
                .u32("member id")
                .map_err(|e| format!("member list: {e}"))?;
            let plen = r
                .u16("path length")
                .map_err(|e| format!("member list: {e}"))?;
            let p = r
                .bytes(plen as usize, "member path")
                .map_err(|e| format!("member {i}: {e}"))?;
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(p));
            members.push(MemberEntry { uuid, id, path });
        }
        if r.remaining() != 0 {
            return Err(format!(
                "{} trailing bytes after member list",
                r.remaining()
            ));
        }
        let label = Label {
            pool,
            member,
            generation,
            created,
            config,
            members,
        };
        label.validate()?;
        Ok(label)
    }

    /// Checks the settings ([`PoolConfig::validate`]) and the member list:
    /// 1..=[`MAX_MEMBERS`] members, ids and UUIDs unique, paths absolute, of
    /// 1..=[`MAX_PATH`] bytes, with no NUL.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use std::os::unix::ffi::OsStrExt;
        let n = self.members.len();
        if n == 0 || n > MAX_MEMBERS {
            return Err(format!("{n} members, not 1..={MAX_MEMBERS}"));
        }
        self.config.validate(n)?;
        let mut ids = std::collections::BTreeSet::new();
        let mut uuids = std::collections::BTreeSet::new();
        for m in &self.members {
            if !ids.insert(m.id) {
                return Err(format!("member id {} listed twice", m.id));
            }
            if !uuids.insert(m.uuid) {
                return Err(format!("member {} listed twice", m.uuid));
            }
            let p = m.path.as_os_str().as_bytes();
            if p.is_empty() || p.len() > MAX_PATH || p[0] != b'/' || p.contains(&0) {
                return Err(format!(
                    "member {}: path {:?} is not an absolute path of 1..={MAX_PATH} bytes without NUL",
                    m.id, m.path
                ));
            }
        }
        Ok(())
    }

    /// The entry of this label's own member.
    pub fn own_entry(&self) -> Option<&MemberEntry> {
        self.members.iter().find(|m| m.uuid == self.member)
    }
}

/// Whether `dir` holds any label file (valid or not).
pub fn has_label(s: &dyn Storage, dir: &Path) -> bool {
    LABEL_FILES.iter().any(|f| s.exists(&dir.join(f)))
}

/// Reads the newest valid label copy in `dir`.
pub fn read_label(s: &dyn Storage, dir: &Path) -> Result<Label> {
    let mut best: Option<Label> = None;
    let mut problems = Vec::new();
    let mut found_any = false;
    for f in LABEL_FILES {
        let p = dir.join(f);
        match read_capped(s, &p, MAX_LABEL_BYTES) {
            Ok(bytes) => {
                found_any = true;
                match Label::decode(&bytes) {
                    Ok(l) => {
                        if best.as_ref().is_none_or(|b| l.generation > b.generation) {
                            best = Some(l);
                        }
                    }
                    Err(e) => problems.push(format!("{f}: {e}")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                found_any = true;
                problems.push(format!("{f}: {e}"));
            }
            Err(e) => return Err(Error::io(p, e)),
        }
    }
    match best {
        Some(l) => Ok(l),
        None if !found_any => Err(Error::NotAMember(dir.to_path_buf())),
        None => Err(Error::CorruptLabel {
            path: dir.to_path_buf(),
            reason: problems.join("; "),
        }),
    }
}

/// The pool's label as it was when the member of `dir` was retired
/// ([`RETIRED_FILE`]): `None` when there is none or it is unreadable (it only
/// ever adds members to look for). Valid when it decodes and does not list
/// the member it names, the one retired.
pub fn read_retired(s: &dyn Storage, dir: &Path) -> Option<Label> {
    let bytes = read_capped(s, &dir.join(RETIRED_FILE), MAX_LABEL_BYTES).ok()?;
    Label::decode(&bytes)
        .ok()
        .filter(|l| l.own_entry().is_none())
}

/// Checks both label copies of `dir` and returns a description of each bad one.
pub fn label_problems(s: &dyn Storage, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for f in LABEL_FILES {
        let p = dir.join(f);
        match read_capped(s, &p, MAX_LABEL_BYTES) {
            Ok(bytes) => {
                if let Err(e) = Label::decode(&bytes) {
                    out.push(format!("{}: {e}", p.display()));
                }
            }
            Err(e) => out.push(format!("{}: {e}", p.display())),
        }
    }
    out
}

/// Writes both label copies of `dir`, one after the other, each durably.
/// A label that [`Label::validate`] refuses is not written (no reader would
/// accept it).
pub fn write_label(s: &dyn Storage, dir: &Path, label: &Label) -> Result<()> {
    label
        .validate()
        .map_err(|why| Error::Invalid(format!("refusing to write an invalid label: {why}")))?;
    let bytes = label.encode();
    for f in LABEL_FILES {
        let p = dir.join(f);
        write_file_atomic(s, &p, &bytes).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::real::RealStorage as R;
    use std::fs;

    fn sample() -> Label {
        Label {
            pool: Uuid::from_u128(0x0102),
            member: Uuid::from_u128(0x0304),
            generation: 7,
            created: 1_700_000_000,
            config: PoolConfig {
                copies: 1,
                block_size: 4096,
                extent_size: 64 << 20,
            },
            members: vec![MemberEntry {
                uuid: Uuid::from_u128(0x0304),
                id: 0,
                path: PathBuf::from("/a"),
            }],
        }
    }

    #[test]
    fn roundtrip_and_offsets() {
        let l = sample();
        let b = l.encode();
        // Pinned offsets from docs/design.md.
        assert_eq!(&b[0..8], b"VPOOLLBL");
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
        assert_eq!(&b[16..32], Uuid::from_u128(0x0102).as_bytes());
        assert_eq!(u64::from_le_bytes(b[48..56].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(b[72..80].try_into().unwrap()), 64 << 20);
        assert_eq!(u32::from_le_bytes(b[80..84].try_into().unwrap()), 1);
        assert_eq!(b.len(), 88 + 22 + 2 + 4);
        assert_eq!(Label::decode(&b).unwrap(), l);
    }

    #[test]
    fn corruption_detected() {
        let mut b = sample().encode();
        b[50] ^= 1;
        assert!(Label::decode(&b).unwrap_err().contains("checksum"));
        assert!(Label::decode(&b[..10]).is_err());
    }

    /// `l` encoded with a valid checksum, whatever its settings.
    fn encoded(l: &Label) -> Vec<u8> {
        l.encode()
    }

    /// Settings a label must not carry, even with a valid checksum.
    #[test]
    fn invalid_settings_are_refused() {
        let bad = |f: &dyn Fn(&mut Label), want: &str| {
            let mut l = sample();
            f(&mut l);
            let e = Label::decode(&encoded(&l)).unwrap_err();
            assert!(e.contains(want), "{e} (want {want:?})");
        };
        bad(
            &|l| l.config.block_size = 0,
            "block size 0 is not a power of two",
        );
        bad(&|l| l.config.block_size = 4097, "block size 4097");
        bad(&|l| l.config.block_size = 256, "block size 256");
        bad(&|l| l.config.block_size = 2 << 20, "block size 2097152");
        bad(&|l| l.config.extent_size = 0, "extent size 0");
        bad(&|l| l.config.extent_size = 3 << 20, "extent size 3145728");
        bad(&|l| l.config.extent_size = 2048, "extent size 2048");
        bad(
            &|l| l.config.extent_size = 1 << 40,
            "extent size 1099511627776",
        );
        bad(
            &|l| {
                l.config.block_size = 512;
                l.config.extent_size = 1 << 30;
            },
            "more than 1048576",
        );
        bad(&|l| l.config.copies = 0, "copies 0 is not in 1..=1");
        bad(&|l| l.config.copies = 2, "copies 2 is not in 1..=1");
        bad(&|l| l.members.clear(), "0 members");
        bad(
            &|l| {
                let mut m = l.members[0].clone();
                m.uuid = Uuid::from_u128(9);
                l.members.push(m);
            },
            "member id 0 listed twice",
        );
        bad(
            &|l| {
                let mut m = l.members[0].clone();
                m.id = 5;
                l.members.push(m);
            },
            "listed twice",
        );
        bad(
            &|l| l.members[0].path = PathBuf::new(),
            "not an absolute path",
        );
        bad(
            &|l| l.members[0].path = PathBuf::from("rel"),
            "not an absolute path",
        );
        bad(
            &|l| l.members[0].path = PathBuf::from("/a\0b"),
            "without NUL",
        );
        // A member count far beyond the file is refused before reading entries.
        let mut b = sample().encode();
        b[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        let e = Label::decode(&b).unwrap_err();
        assert!(e.contains("4294967295 members, more than 256"), "{e}");
        b[80..84].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        let e = Label::decode(&b).unwrap_err();
        assert!(e.contains("member list: truncated"), "{e}");
    }

    /// Issue 10: a label with block size 0 and a valid checksum made
    /// `vpool mount` panic; `read_label` now reports it as corrupt.
    #[test]
    fn read_label_reports_invalid_settings() {
        let d = tempfile::tempdir().unwrap();
        let mut l = sample();
        l.config.block_size = 0;
        for f in LABEL_FILES {
            fs::write(d.path().join(f), encoded(&l)).unwrap();
        }
        match read_label(&R, d.path()) {
            Err(Error::CorruptLabel { reason, .. }) => {
                assert!(reason.contains("block size 0"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(label_problems(&R, d.path()).len(), 2);
        assert!(matches!(
            write_label(&R, d.path(), &l),
            Err(Error::Invalid(why)) if why.contains("block size 0")
        ));
    }

    /// A label file is read only up to its cap: a huge one is a damaged copy.
    #[test]
    fn oversized_label_file_is_a_damaged_copy() {
        let d = tempfile::tempdir().unwrap();
        let l = sample();
        write_label(&R, d.path(), &l).unwrap();
        let p = d.path().join(LABEL_FILES[1]);
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(MAX_LABEL_BYTES + 1).unwrap();
        assert_eq!(read_label(&R, d.path()).unwrap(), l);
        let problems = label_problems(&R, d.path());
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("more than the 2097152"),
            "{problems:?}"
        );
        fs::remove_file(d.path().join(LABEL_FILES[0])).unwrap();
        match read_label(&R, d.path()) {
            Err(Error::CorruptLabel { reason, .. }) => {
                assert!(reason.contains("more than the 2097152"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// `vpool create` refuses the settings a reader would refuse (it took a
    /// block size of 2 MiB, and the pool would no longer open).
    #[test]
    fn create_refuses_what_readers_refuse() {
        use crate::pool::{CreateOptions, Pool};
        let d = tempfile::tempdir().unwrap();
        for (bs, es) in [(2 << 20, 64 << 20), (512, 1 << 30), (4096, 1 << 33)] {
            let opts = CreateOptions {
                copies: 1,
                extent_size: es,
                block_size: bs,
            };
            let r = Pool::create(&[d.path().to_path_buf()], opts);
            assert!(matches!(r, Err(Error::Invalid(_))), "{bs} {es}: {r:?}");
            assert!(!has_label(&R, d.path()));
        }
    }

    #[test]
    fn newest_valid_copy_wins() {
        let d = tempfile::tempdir().unwrap();
        let mut l = sample();
        write_label(&R, d.path(), &l).unwrap();
        l.generation = 8;
        let p = d.path().join(LABEL_FILES[0]);
        fs::write(&p, l.encode()).unwrap();
        assert_eq!(read_label(&R, d.path()).unwrap().generation, 8);
        // Corrupt the newer copy: the older valid one is used.
        fs::write(&p, b"garbage").unwrap();
        assert_eq!(read_label(&R, d.path()).unwrap().generation, 7);
    }
}
