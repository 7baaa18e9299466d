//! Block checksums of one extent copy: the sum file `data/<ino>.<index>.<file_id>.sum`
//! beside the extent file on every member holding a copy.
//!
//! Layout (version 1, little-endian):
//! ```text
//! 0   8  magic "VPOOLSUM"
//! 8   4  version (1)
//! 12  4  block size
//! 16  8  ino
//! 24  8  extent index
//! 32  8  file id
//! 40  4  number of entries (extent size / block size)
//! 44  4  reserved (0)
//! 48  8  generation of the commit that wrote it
//! 56  4  crc32c of bytes 0..56
//! 60  4  reserved (0)
//! 64  4n entries: crc32c of each block as it reads (holes read as zeros)
//! ```
//! Every copy's sum file holds the same table (the copies hold the same data);
//! a reader verifies whichever copy it reads against the one table in memory,
//! loaded from the valid sum file of the highest generation (a member that
//! missed writes while it was failed has an older one).
//! The table is written and fdatasynced by the commit, before the intent records
//! covering the extent are cleared: between two commits the sum file may lag its
//! data, and that extent then has an intent record, so recovery after a crash
//! recomputes its table from the data (see `Volume::resync`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::bytes::read_capped;

pub const SUM_MAGIC: [u8; 8] = *b"VPOOLSUM";
pub const SUM_VERSION: u32 = 1;
pub const SUM_HEADER: usize = 64;

/// Identity a sum file must carry to belong to an extent copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumId {
    pub ino: u64,
    pub index: u64,
    pub file_id: u64,
    pub block_size: u32,
    pub entries: u32,
}

/// The checksum of one block.
pub fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}

/// The checksum of an all-zero block of `bs` bytes.
pub fn zero_crc(bs: usize) -> u32 {
    block_crc(&vec![0u8; bs])
}

pub fn encode(id: SumId, generation: u64, vals: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SUM_HEADER + vals.len() * 4);
    out.extend_from_slice(&SUM_MAGIC);
    out.extend_from_slice(&SUM_VERSION.to_le_bytes());
    out.extend_from_slice(&id.block_size.to_le_bytes());
    out.extend_from_slice(&id.ino.to_le_bytes());
    out.extend_from_slice(&id.index.to_le_bytes());
    out.extend_from_slice(&id.file_id.to_le_bytes());
    out.extend_from_slice(&(vals.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in vals {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes a sum file into its generation and entries; the error says what is
/// wrong with it.
pub fn decode(bytes: &[u8], id: SumId) -> Result<(u64, Vec<u32>), String> {
    if bytes.len() < SUM_HEADER {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if bytes[..8] != SUM_MAGIC {
        return Err("bad magic".into());
    }
    if crc32c::crc32c(&bytes[..56]) != le32(bytes, 56) {
        return Err("header checksum mismatch".into());
    }
    let version = le32(bytes, 8);
    if version != SUM_VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let got = SumId {
        block_size: le32(bytes, 12),
        ino: le64(bytes, 16),
        index: le64(bytes, 24),
        file_id: le64(bytes, 32),
        entries: le32(bytes, 40),
    };
    if got != id {
        return Err(format!("belongs to {got:?}, not {id:?}"));
    }
    let n = id.entries as usize;
    if bytes.len() as u64 != file_len(id) {
        return Err(format!(
            "{} bytes for {n} entries (want {})",
            bytes.len(),
            file_len(id)
        ));
    }
    let entries = (0..n).map(|i| le32(bytes, SUM_HEADER + 4 * i)).collect();
    Ok((le64(bytes, 48), entries))
}

/// Length of the sum file of `id`: the header and 4 bytes an entry.
pub fn file_len(id: SumId) -> u64 {
    SUM_HEADER as u64 + 4 * u64::from(id.entries)
}

/// Reads a sum file: `Ok(None)` when it does not exist, an `InvalidData` error
/// when it is damaged. Reads no more than [`file_len`] of `id` (a longer file
/// is damaged).
pub fn read(path: &Path, id: SumId) -> io::Result<Option<(u64, Vec<u32>)>> {
    let bytes = match read_capped(path, file_len(id)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    decode(&bytes, id)
        .map(Some)
        .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
}

/// Writes a whole sum file in place and fdatasyncs it. Returns whether the file
/// was created (its directory entry then needs an fsync).
pub fn write(path: &Path, id: SumId, generation: u64, vals: &[u32]) -> io::Result<bool> {
    let created = !path.exists();
    let f: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let bytes = encode(id, generation, vals);
    f.write_all_at(&bytes, 0)?;
    if f.metadata()?.len() > bytes.len() as u64 {
        f.set_len(bytes.len() as u64)?;
    }
    f.sync_data()?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SumId {
        SumId {
            ino: 7,
            index: 3,
            file_id: 99,
            block_size: 4096,
            entries: 4,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let vals = vec![1, 2, 3, zero_crc(4096)];
        let b = encode(id(), 42, &vals);
        assert_eq!(b.len(), SUM_HEADER + 16);
        assert_eq!(decode(&b, id()).unwrap(), (42, vals));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(decode(&bad, id()).unwrap_err().contains("checksum"));
        let other = SumId { ino: 8, ..id() };
        assert!(decode(&b, other).unwrap_err().contains("belongs"));
        assert!(decode(&b[..b.len() - 1], id()).is_err());
    }

    /// A sum file is read only up to the length its extent needs: a huge one
    /// is damaged, and not read into memory.
    #[test]
    fn oversized_file_is_damaged_without_reading_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.sum");
        write(&p, id(), 1, &[1, 2, 3, 4]).unwrap();
        assert_eq!(read(&p, id()).unwrap(), Some((1, vec![1, 2, 3, 4])));
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        let e = read(&p, id()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string().contains("1073741824 bytes, more than the 80"),
            "{e}"
        );
    }
}
