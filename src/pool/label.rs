//! Member labels: the record in every member directory that says which pool the
//! member belongs to, which member it is, and where the other members are.
//!
//! Each member holds two copies, `vpool-label.0` and `vpool-label.1`, written one
//! after the other (each by write-temp, fsync, rename, fsync-dir). A reader takes the
//! valid copy with the highest generation, so a crash while rewriting one copy
//! never loses the label. The byte layout is in `docs/design.md` and pinned by a test.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::util::write_file_atomic;

pub const LABEL_MAGIC: &[u8; 8] = b"VPOOLLBL";
pub const LABEL_VERSION: u32 = 1;
pub const LABEL_FILES: [&str; 2] = ["vpool-label.0", "vpool-label.1"];
/// Size of the fixed part before the member entries.
const FIXED_LEN: usize = 88;

/// Pool-wide settings fixed at creation (copies may change later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub copies: u32,
    pub block_size: u32,
    pub extent_size: u64,
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

    pub fn decode(b: &[u8]) -> std::result::Result<Label, String> {
        use std::os::unix::ffi::OsStrExt;
        if b.len() < FIXED_LEN + 4 {
            return Err(format!("too short ({} bytes)", b.len()));
        }
        if &b[0..8] != LABEL_MAGIC {
            return Err("bad magic".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let want = u32::from_le_bytes(crc.try_into().map_err(|_| "crc")?);
        if crc32c::crc32c(body) != want {
            return Err("checksum mismatch".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != LABEL_VERSION {
            return Err(format!("unsupported label version {version}"));
        }
        let uuid_at = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            Uuid::from_bytes(a)
        };
        let count = u32_at(80) as usize;
        let mut members = Vec::with_capacity(count.min(1024));
        let mut o = FIXED_LEN;
        for _ in 0..count {
            if o + 22 > body.len() {
                return Err("member list truncated".into());
            }
            let uuid = uuid_at(o);
            let id = u32_at(o + 16);
            let plen = u16::from_le_bytes([b[o + 20], b[o + 21]]) as usize;
            o += 22;
            if o + plen > body.len() {
                return Err("member path truncated".into());
            }
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(&b[o..o + plen]));
            o += plen;
            members.push(MemberEntry { uuid, id, path });
        }
        if o != body.len() {
            return Err("trailing bytes after member list".into());
        }
        Ok(Label {
            pool: uuid_at(16),
            member: uuid_at(32),
            generation: u64_at(48),
            created: u64_at(56) as i64,
            config: PoolConfig {
                copies: u32_at(64),
                block_size: u32_at(68),
                extent_size: u64_at(72),
            },
            members,
        })
    }

    /// The entry of this label's own member.
    pub fn own_entry(&self) -> Option<&MemberEntry> {
        self.members.iter().find(|m| m.uuid == self.member)
    }
}

/// Whether `dir` holds any label file (valid or not).
pub fn has_label(dir: &Path) -> bool {
    LABEL_FILES.iter().any(|f| dir.join(f).exists())
}

/// Reads the newest valid label copy in `dir`.
pub fn read_label(dir: &Path) -> Result<Label> {
    let mut best: Option<Label> = None;
    let mut problems = Vec::new();
    let mut found_any = false;
    for f in LABEL_FILES {
        let p = dir.join(f);
        match fs::read(&p) {
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

/// Checks both label copies of `dir` and returns a description of each bad one.
pub fn label_problems(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for f in LABEL_FILES {
        let p = dir.join(f);
        match fs::read(&p) {
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
pub fn write_label(dir: &Path, label: &Label) -> Result<()> {
    let bytes = label.encode();
    for f in LABEL_FILES {
        let p = dir.join(f);
        write_file_atomic(&p, &bytes).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn newest_valid_copy_wins() {
        let d = tempfile::tempdir().unwrap();
        let mut l = sample();
        write_label(d.path(), &l).unwrap();
        l.generation = 8;
        let p = d.path().join(LABEL_FILES[0]);
        fs::write(&p, l.encode()).unwrap();
        assert_eq!(read_label(d.path()).unwrap().generation, 8);
        // Corrupt the newer copy: the older valid one is used.
        fs::write(&p, b"garbage").unwrap();
        assert_eq!(read_label(d.path()).unwrap().generation, 7);
    }
}
