//! The metadata store: one redb database (`meta.redb`) per member, all holding the
//! same content. Every commit goes to every member with the same generation number;
//! at open the member with the highest generation wins and lagging copies are
//! rewritten from it, so losing one member's copy loses nothing.
//!
//! Tables (keys and values are fixed-width little-endian or versioned records):
//! - `inodes`: `u64` inode number -> [`encode_record`] of an [`InodeRecord`]
//! - `dirents`: `(u64 parent, &[u8] name)` -> `u64` child inode number
//! - `super`: `&str` -> `u64` (`generation`, `next_ino`, `next_file_id`,
//!   `next_snap_id`, `format`)
//! - `snapshots`: `u64` snapshot id -> [`encode_blob`] of the snapshot record
//!   (defined and decoded by the snapshot module)
//! - `cbt`: `(u64 ino, u64 extent index)` -> [`encode_blob`] of the changed-block
//!   bitmap of that extent since the last snapshot
//! - `info`: `&str` key -> [`encode_blob`] of a JSON document: the pool's
//!   operational record (integrity counters, the last scrub, snapshot holds,
//!   the event history; see `pool/info.rs`)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::redb_backend::SeamBackend;
use crate::storage::{OpenMode, Storage};

pub use super::layout::META_FILE;
pub const META_FORMAT: u64 = 1;
/// Version of the [`InodeRecord`] envelope.
pub const RECORD_VERSION: u16 = 1;
pub const ROOT_INO: u64 = 1;

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const DIRENTS: TableDefinition<(u64, &[u8]), u64> = TableDefinition::new("dirents");
const SUPER: TableDefinition<&str, u64> = TableDefinition::new("super");
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
const CBT: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("cbt");
const INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("info");
/// Key prefix in `super` of a member that fell behind: `behind:<member uuid>`
/// -> the first commit generation it missed (see `Pool::commit`).
const BEHIND_PREFIX: &str = "behind:";

/// Members that missed commits: member uuid -> the first generation missed.
pub type Behind = BTreeMap<uuid::Uuid, u64>;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::at(crate::util::now())
    }

    /// The time `(secs, nanos)` since the epoch.
    pub fn at((secs, nanos): (i64, u32)) -> Self {
        Timestamp { secs, nanos }
    }
}

/// Where one extent of a file lives. `members` has one entry per copy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ExtentRecord {
    /// Extent number within the file: bytes `[index*E, (index+1)*E)`.
    pub index: u64,
    /// Pool-unique id naming the member file (`data/<ino>.<index>.<file_id>`).
    pub file_id: u64,
    /// Member ids holding a copy.
    pub members: Vec<u32>,
}

/// Everything vpool knows about one inode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InodeRecord {
    pub kind: NodeKind,
    /// Permission and set-id bits (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u32,
    /// Directories: the parent directory (the root is its own parent).
    pub parent: u64,
    /// Symlinks: the target.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Regular files: allocated extents, sorted by index.
    pub extents: Vec<ExtentRecord>,
}

/// Record envelope: `u16 version | u16 reserved | u32 crc32c(payload) | payload`,
/// payload = bincode (fixed-width little-endian integers) of the record.
pub fn encode_record(r: &InodeRecord) -> Vec<u8> {
    let payload = bincode::serialize(r).unwrap_or_default();
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&RECORD_VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    b.extend_from_slice(&payload);
    b
}

/// Checks the envelope and decodes the record (bincode reading no further
/// than the payload: a length field beyond it fails).
pub fn decode_record(b: &[u8]) -> std::result::Result<InodeRecord, String> {
    crate::bytes::bincode_decode(check_blob(b)?).map_err(|e| format!("record undecodable: {e}"))
}

/// The same envelope around raw bytes (changed-block bitmaps, snapshot records).
pub fn encode_blob(payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload.len());
    b.extend_from_slice(&RECORD_VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// Checks an envelope's version and checksum and returns its payload.
pub fn check_blob(b: &[u8]) -> std::result::Result<&[u8], String> {
    if b.len() < 8 {
        return Err("record too short".into());
    }
    let f = crate::bytes::Fields::at_least(b, 8, "record")?;
    let version = f.u16(0);
    if version != RECORD_VERSION {
        return Err(format!("unsupported record version {version}"));
    }
    let crc = f.u32(4);
    if crc32c::crc32c(&b[8..]) != crc {
        return Err("record checksum mismatch".into());
    }
    Ok(&b[8..])
}

/// The whole metadata of a pool, as loaded at open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaImage {
    pub generation: u64,
    pub next_ino: u64,
    pub next_file_id: u64,
    pub inodes: BTreeMap<u64, InodeRecord>,
    pub dirents: BTreeMap<(u64, Vec<u8>), u64>,
    pub next_snap_id: u64,
    /// Snapshot records, enveloped ([`encode_blob`]); checked by their reader.
    pub snapshots: BTreeMap<u64, Vec<u8>>,
    /// Changed-block bitmaps per `(ino, extent index)`, enveloped.
    pub cbt: BTreeMap<(u64, u64), Vec<u8>>,
    /// Inodes whose record failed its checksum (reported by check).
    pub corrupt: Vec<(u64, String)>,
    /// Members that missed commits of this copy's history, and since when.
    pub behind: Behind,
    /// The operational record, enveloped ([`encode_blob`]), by key.
    pub info: BTreeMap<String, Vec<u8>>,
}

/// Key of a directory entry: parent inode and name.
pub type DirentKey = (u64, Vec<u8>);

/// A keyed record to write (`Some`) or delete (`None`).
pub type BlobChange<K> = (K, Option<Vec<u8>>);

/// One atomic change to the metadata, applied to every member.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub generation: u64,
    pub next_ino: u64,
    pub next_file_id: u64,
    /// `None` deletes the inode.
    pub inodes: Vec<(u64, Option<Vec<u8>>)>,
    /// `None` deletes the entry.
    pub dirents: Vec<(DirentKey, Option<u64>)>,
    pub next_snap_id: u64,
    /// `None` deletes the snapshot record.
    pub snapshots: Vec<BlobChange<u64>>,
    /// `None` deletes the bitmap.
    pub cbt: Vec<BlobChange<(u64, u64)>>,
    /// `None` deletes the key.
    pub info: Vec<BlobChange<String>>,
}

pub struct MemberStore {
    path: PathBuf,
    db: Database,
}

impl MemberStore {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a new store holding `image`.
    pub fn create(s: &dyn Storage, dir: &Path, image: &MetaImage) -> Result<MemberStore> {
        let path = dir.join(META_FILE);
        let f = s
            .open(&path, OpenMode::REPLACE)
            .map_err(|e| Error::io(&path, e))?;
        let db = Database::builder()
            .create_with_backend(SeamBackend(f))
            .map_err(|e| Error::store(&path, e))?;
        let st = MemberStore { path, db };
        st.replace_all(image)?;
        Ok(st)
    }

    pub fn open(s: &dyn Storage, dir: &Path) -> Result<MemberStore> {
        let path = dir.join(META_FILE);
        let missing = |reason: &str| Error::CorruptMetadata {
            path: path.clone(),
            reason: reason.into(),
        };
        let f = match s.open(&path, OpenMode::WRITE) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(missing("metadata file is missing"));
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        // redb would make a new, empty database of an empty file: that is
        // a lost copy, not an empty pool.
        if f.len().map_err(|e| Error::io(&path, e))? == 0 {
            return Err(missing("metadata file is empty"));
        }
        let db = Database::builder()
            .create_with_backend(SeamBackend(f))
            .map_err(|e| Error::store(&path, e))?;
        Ok(MemberStore { path, db })
    }

    pub fn generation(&self) -> Result<u64> {
        let p = &self.path;
        let rt = self.db.begin_read().map_err(|e| Error::store(p, e))?;
        let t = rt.open_table(SUPER).map_err(|e| Error::store(p, e))?;
        let g = t.get("generation").map_err(|e| Error::store(p, e))?;
        Ok(g.map(|v| v.value()).unwrap_or(0))
    }

    pub fn load(&self) -> Result<MetaImage> {
        load_from(&self.db, &self.path)
    }

    /// Applies one batch in one transaction, recording `behind` as the members
    /// that fell behind.
    pub fn apply(&self, batch: &Batch, durable: bool, behind: &Behind) -> Result<()> {
        let p = &self.path;
        let mut wt = self.db.begin_write().map_err(|e| Error::store(p, e))?;
        wt.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| Error::store(p, e))?;
        {
            let mut inodes = wt.open_table(INODES).map_err(|e| Error::store(p, e))?;
            for (ino, rec) in &batch.inodes {
                match rec {
                    Some(b) => inodes.insert(*ino, b.as_slice()),
                    None => inodes.remove(*ino),
                }
                .map_err(|e| Error::store(p, e))?;
            }
            let mut dirents = wt.open_table(DIRENTS).map_err(|e| Error::store(p, e))?;
            for ((parent, name), child) in &batch.dirents {
                match child {
                    Some(c) => dirents.insert((*parent, name.as_slice()), *c),
                    None => dirents.remove((*parent, name.as_slice())),
                }
                .map_err(|e| Error::store(p, e))?;
            }
            let mut snaps = wt.open_table(SNAPSHOTS).map_err(|e| Error::store(p, e))?;
            for (id, rec) in &batch.snapshots {
                match rec {
                    Some(b) => snaps.insert(*id, b.as_slice()),
                    None => snaps.remove(*id),
                }
                .map_err(|e| Error::store(p, e))?;
            }
            let mut cbt = wt.open_table(CBT).map_err(|e| Error::store(p, e))?;
            for (key, bits) in &batch.cbt {
                match bits {
                    Some(b) => cbt.insert(*key, b.as_slice()),
                    None => cbt.remove(*key),
                }
                .map_err(|e| Error::store(p, e))?;
            }
            let mut info = wt.open_table(INFO).map_err(|e| Error::store(p, e))?;
            for (key, blob) in &batch.info {
                match blob {
                    Some(b) => info.insert(key.as_str(), b.as_slice()),
                    None => info.remove(key.as_str()),
                }
                .map_err(|e| Error::store(p, e))?;
            }
            let mut sup = wt.open_table(SUPER).map_err(|e| Error::store(p, e))?;
            write_behind(&mut sup, behind, p)?;
            sup.insert("next_snap_id", batch.next_snap_id)
                .map_err(|e| Error::store(p, e))?;
            sup.insert("generation", batch.generation)
                .map_err(|e| Error::store(p, e))?;
            sup.insert("next_ino", batch.next_ino)
                .map_err(|e| Error::store(p, e))?;
            sup.insert("next_file_id", batch.next_file_id)
                .map_err(|e| Error::store(p, e))?;
            sup.insert("format", META_FORMAT)
                .map_err(|e| Error::store(p, e))?;
        }
        wt.commit().map_err(|e| Error::store(p, e))?;
        Ok(())
    }

    /// Replaces the whole content with `image` (creation, and resync of a lagging copy).
    pub fn replace_all(&self, image: &MetaImage) -> Result<()> {
        let p = &self.path;
        let mut wt = self.db.begin_write().map_err(|e| Error::store(p, e))?;
        wt.set_durability(Durability::Immediate)
            .map_err(|e| Error::store(p, e))?;
        {
            // Deleting and re-creating the tables empties them in one transaction.
            let _ = wt.delete_table(INODES).map_err(|e| Error::store(p, e))?;
            let _ = wt.delete_table(DIRENTS).map_err(|e| Error::store(p, e))?;
            let _ = wt.delete_table(SNAPSHOTS).map_err(|e| Error::store(p, e))?;
            let _ = wt.delete_table(CBT).map_err(|e| Error::store(p, e))?;
            let _ = wt.delete_table(INFO).map_err(|e| Error::store(p, e))?;
            let mut info = wt.open_table(INFO).map_err(|e| Error::store(p, e))?;
            for (key, blob) in &image.info {
                info.insert(key.as_str(), blob.as_slice())
                    .map_err(|e| Error::store(p, e))?;
            }
            let mut snaps = wt.open_table(SNAPSHOTS).map_err(|e| Error::store(p, e))?;
            for (id, rec) in &image.snapshots {
                snaps
                    .insert(*id, rec.as_slice())
                    .map_err(|e| Error::store(p, e))?;
            }
            let mut cbt = wt.open_table(CBT).map_err(|e| Error::store(p, e))?;
            for (key, bits) in &image.cbt {
                cbt.insert(*key, bits.as_slice())
                    .map_err(|e| Error::store(p, e))?;
            }
            let mut inodes = wt.open_table(INODES).map_err(|e| Error::store(p, e))?;
            for (ino, rec) in &image.inodes {
                inodes
                    .insert(*ino, encode_record(rec).as_slice())
                    .map_err(|e| Error::store(p, e))?;
            }
            let mut dirents = wt.open_table(DIRENTS).map_err(|e| Error::store(p, e))?;
            for ((parent, name), child) in &image.dirents {
                dirents
                    .insert((*parent, name.as_slice()), *child)
                    .map_err(|e| Error::store(p, e))?;
            }
            let mut sup = wt.open_table(SUPER).map_err(|e| Error::store(p, e))?;
            write_behind(&mut sup, &image.behind, p)?;
            for (k, v) in [
                ("generation", image.generation),
                ("next_ino", image.next_ino),
                ("next_file_id", image.next_file_id),
                ("next_snap_id", image.next_snap_id),
                ("format", META_FORMAT),
            ] {
                sup.insert(k, v).map_err(|e| Error::store(p, e))?;
            }
        }
        wt.commit().map_err(|e| Error::store(p, e))?;
        Ok(())
    }
}

/// Makes the `behind:` keys of `super` say exactly `behind`.
fn write_behind(sup: &mut redb::Table<&str, u64>, behind: &Behind, p: &Path) -> Result<()> {
    let mut old = Vec::new();
    for row in sup.range(BEHIND_PREFIX..).map_err(|e| Error::store(p, e))? {
        let (k, _) = row.map_err(|e| Error::store(p, e))?;
        let k = k.value().to_string();
        if !k.starts_with(BEHIND_PREFIX) {
            break;
        }
        old.push(k);
    }
    for k in old {
        sup.remove(k.as_str()).map_err(|e| Error::store(p, e))?;
    }
    for (m, g) in behind {
        sup.insert(format!("{BEHIND_PREFIX}{m}").as_str(), *g)
            .map_err(|e| Error::store(p, e))?;
    }
    Ok(())
}

fn load_from(db: &impl ReadableDatabase, p: &Path) -> Result<MetaImage> {
    let rt = db.begin_read().map_err(|e| Error::store(p, e))?;
    let mut img = MetaImage::default();
    {
        let sup = rt.open_table(SUPER).map_err(|e| Error::store(p, e))?;
        let get = |k: &str| -> Result<u64> {
            Ok(sup
                .get(k)
                .map_err(|e| Error::store(p, e))?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let format = get("format")?;
        if format != META_FORMAT {
            return Err(Error::CorruptMetadata {
                path: p.to_path_buf(),
                reason: format!("unsupported metadata format {format}"),
            });
        }
        img.generation = get("generation")?;
        for row in sup.range(BEHIND_PREFIX..).map_err(|e| Error::store(p, e))? {
            let (k, v) = row.map_err(|e| Error::store(p, e))?;
            let Some(id) = k.value().strip_prefix(BEHIND_PREFIX) else {
                break;
            };
            let id = uuid::Uuid::parse_str(id).map_err(|e| Error::CorruptMetadata {
                path: p.to_path_buf(),
                reason: format!("bad member in {}: {e}", k.value()),
            })?;
            img.behind.insert(id, v.value());
        }
        img.next_ino = get("next_ino")?;
        img.next_file_id = get("next_file_id")?;
        img.next_snap_id = get("next_snap_id")?;
    }
    let inodes = rt.open_table(INODES).map_err(|e| Error::store(p, e))?;
    for row in inodes.iter().map_err(|e| Error::store(p, e))? {
        let (k, v) = row.map_err(|e| Error::store(p, e))?;
        match decode_record(v.value()) {
            Ok(r) => {
                img.inodes.insert(k.value(), r);
            }
            Err(e) => img.corrupt.push((k.value(), e)),
        }
    }
    let dirents = rt.open_table(DIRENTS).map_err(|e| Error::store(p, e))?;
    for row in dirents.iter().map_err(|e| Error::store(p, e))? {
        let (k, v) = row.map_err(|e| Error::store(p, e))?;
        let (parent, name) = k.value();
        img.dirents.insert((parent, name.to_vec()), v.value());
    }
    // Tables added after format 1 was first written may be absent in an old store.
    match rt.open_table(SNAPSHOTS) {
        Ok(t) => {
            for row in t.iter().map_err(|e| Error::store(p, e))? {
                let (k, v) = row.map_err(|e| Error::store(p, e))?;
                img.snapshots.insert(k.value(), v.value().to_vec());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(Error::store(p, e)),
    }
    match rt.open_table(CBT) {
        Ok(t) => {
            for row in t.iter().map_err(|e| Error::store(p, e))? {
                let (k, v) = row.map_err(|e| Error::store(p, e))?;
                img.cbt.insert(k.value(), v.value().to_vec());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(Error::store(p, e)),
    }
    match rt.open_table(INFO) {
        Ok(t) => {
            for row in t.iter().map_err(|e| Error::store(p, e))? {
                let (k, v) = row.map_err(|e| Error::store(p, e))?;
                img.info.insert(k.value().to_string(), v.value().to_vec());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(Error::store(p, e)),
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> InodeRecord {
        InodeRecord {
            kind: NodeKind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 10,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            rdev: 0,
            parent: 0,
            target: vec![],
            xattrs: BTreeMap::new(),
            extents: vec![ExtentRecord {
                index: 0,
                file_id: 5,
                members: vec![1],
            }],
        }
    }

    #[test]
    fn record_roundtrip_and_checksum() {
        let b = encode_record(&rec());
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), RECORD_VERSION);
        assert_eq!(decode_record(&b).unwrap(), rec());
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(decode_record(&bad).unwrap_err().contains("checksum"));
    }

    /// Length and count fields far beyond the record (checksum valid) fail
    /// cleanly; the encoding is the one `bincode::serialize` wrote.
    #[test]
    fn oversized_fields_fail_cleanly() {
        let payload = bincode::serialize(&rec()).unwrap();
        assert_eq!(check_blob(&encode_record(&rec())).unwrap(), &payload[..]);
        // `target` length: after kind (4), mode, uid, gid, nlink (16), size
        // (8), 3 timestamps (36), rdev (4), parent (8).
        let at = 4 + 16 + 8 + 36 + 4 + 8;
        assert_eq!(&payload[at..at + 8], &0u64.to_le_bytes());
        for v in [u64::MAX, 1 << 40, payload.len() as u64] {
            let mut p = payload.clone();
            p[at..at + 8].copy_from_slice(&v.to_le_bytes());
            let e = decode_record(&encode_blob(&p)).unwrap_err();
            assert!(e.contains("record undecodable"), "{e}");
        }
        // The extent count (last field but one of the record).
        let at = payload.len() - (8 + 8 + 8 + 8 + 4);
        assert_eq!(&payload[at..at + 8], &1u64.to_le_bytes());
        let mut p = payload.clone();
        p[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_record(&encode_blob(&p)).is_err());
    }

    #[test]
    fn store_apply_and_load() {
        let d = tempfile::tempdir().unwrap();
        let mut img = MetaImage {
            generation: 1,
            next_ino: 2,
            next_file_id: 1,
            ..Default::default()
        };
        img.inodes.insert(1, rec());
        let s = MemberStore::create(&crate::storage::real::RealStorage, d.path(), &img).unwrap();
        let batch = Batch {
            generation: 2,
            next_ino: 3,
            next_file_id: 6,
            inodes: vec![(2, Some(encode_record(&rec())))],
            dirents: vec![((1, b"a".to_vec()), Some(2))],
            ..Default::default()
        };
        let mut behind = Behind::new();
        behind.insert(uuid::Uuid::from_u128(7), 2);
        s.apply(&batch, true, &behind).unwrap();
        let got = s.load().unwrap();
        assert_eq!(got.generation, 2);
        assert_eq!(got.inodes.len(), 2);
        assert_eq!(got.dirents.get(&(1, b"a".to_vec())), Some(&2));
        drop(s);
        let s = MemberStore::open(&crate::storage::real::RealStorage, d.path()).unwrap();
        let got = s.load().unwrap();
        assert_eq!(got.generation, 2);
        assert_eq!(got.behind, behind);
        // A member back in step is forgotten by the next commit.
        s.apply(
            &Batch {
                generation: 3,
                ..batch
            },
            true,
            &Behind::new(),
        )
        .unwrap();
        assert!(s.load().unwrap().behind.is_empty());
    }
}
